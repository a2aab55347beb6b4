"""`allconv-hpc {train,submit,status}`: a thin dispatcher; each subcommand lives in its own module."""
from __future__ import annotations

import sys

USAGE = """allconv-hpc train  [HYDRA_OVERRIDES ...]          train here (one rank of DDP under torchrun/srun)
allconv-hpc submit [-m] [--wait] [HYDRA_OVERRIDES ...]  validate, then submit to Slurm (or cluster=local)
allconv-hpc status RUN_OR_SWEEP_FOLDER                 table of jobs: state, restarts, progress, accuracy

Overrides use Hydra syntax, e.g.  model=allcnn_c data=cifar10 optim.lr=0.05 trainer.epochs=350 hydra.run.dir=runs/x"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .preempt import EXIT_REQUEUED, catch_early, ignore_late_signals
        catch_early()  # before the heavy imports: under srun an early USR2 would otherwise kill the rank
        from .train import run
        code = run(rest)
        ignore_late_signals()
        return 0 if code == EXIT_REQUEUED else code  # back in the queue: nothing failed
    if cmd == "submit":
        from .launcher import submit_main
        return submit_main(rest)
    if cmd == "status":
        from .status import status_main
        return status_main(rest)
    print(f"allconv-hpc: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
