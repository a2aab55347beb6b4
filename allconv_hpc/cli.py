"""`allconv-hpc {train,submit,status,evaluate}`: a thin dispatcher; each subcommand lives in its own module."""
from __future__ import annotations

import sys

from .preempt import EXIT_GAVE_UP, EXIT_INTERRUPTED

COMMANDS = ("train", "submit", "status", "evaluate")
USAGE = """allconv-hpc train  [--print-config] [HYDRA_OVERRIDES ...]      train here (one rank of DDP under torchrun/srun)
allconv-hpc submit [-m] [--wait] [--dry-run] [HYDRA_OVERRIDES ...]  validate, then submit to Slurm (or cluster=local)
allconv-hpc status [--json] RUN_OR_SWEEP_FOLDER...                  table of jobs: state, restarts, progress, accuracy
allconv-hpc evaluate [--checkpoint best|last|FILE] [--split test|val] [--test-size N|all] [--batch-size N]
                     [--data-root DIR] [--device D] [--json] RUN_FOLDER  score a checkpoint of a run

Overrides use Hydra syntax, e.g.  model=allcnn_c data=cifar10 optim.lr=0.05 trainer.epochs=350 hydra.run.dir=runs/x
`allconv-hpc train --help` lists the config groups; `submit --help`, `status --help` and `evaluate --help` their options."""


def train_usage() -> str:
    """The config groups and their choices, read from the packaged conf/ (what compose sees)."""
    from importlib.resources import files
    conf = files("allconv_hpc.conf")
    groups = sorted((d.name, sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml")))
                    for d in conf.iterdir() if d.is_dir() and not d.name.startswith("__"))
    lines = [f"  {name:<11} {' | '.join(choices)}" for name, choices in groups]
    return ("usage: allconv-hpc train [--print-config] [HYDRA_OVERRIDES ...]\n\n"
            "Trains one run in hydra.run.dir (default runs/<model>-<data>-seed<seed>); running the same command\n"
            "again resumes it (a completed run: nothing to do; a larger trainer.epochs trains it on).\n"
            "One rank of a DDP job under torchrun or srun. Config groups (group=choice):\n"
            + "\n".join(lines) + "\n\n"
            "Keys: group.key=value, e.g. optim.lr=0.1 trainer.epochs=60 trainer.precision=bf16 model.width=0.5\n"
            "(every key with its default and meaning: README.md, 'Config groups', and conf/**/*.yaml).\n"
            "--print-config: print the composed, validated config and the run folder; run nothing (CUDA and\n"
            "the data files are checked where it trains).\n"
            "Exit codes: 0 done or requeued, 1 failure, 2 bad config (or a run folder refused on resume),\n"
            "3 stopped with a checkpoint, 4 gave up after checkpoint.max_requeues time limits,\n"
            "130 a Ctrl-C during start-up (this rank's or a peer's) or during a stop, or while W&B finishes a\n"
            "completed run (it stays completed).")


def print_config(overrides: list[str]) -> int:
    """`train --print-config ...`: the composed, validated config (what the run would record in .hydra/config.yaml)
    and its run folder, then the config's warnings as train gives them; nothing is written or started."""
    from omegaconf import OmegaConf

    from .compose import check_train_args, compose, pin_data_root, train_warnings
    from .config import ConfigError
    try:
        check_train_args(overrides)
        composed = compose(overrides)
    except ConfigError as e:
        print(f"allconv-hpc: error: {e}", file=sys.stderr)
        return 2
    root_said = pin_data_root(composed)
    print(f"# run folder: {composed.run_dir}")
    if root_said:
        print(f"# {root_said[1]}")
    print(OmegaConf.to_yaml(OmegaConf.create(composed.cfg_dict)), end="")
    sys.stdout.flush()  # the config first, then what train would warn of (stderr: the config stays pipeable)
    for said in train_warnings(composed, overrides, "one process, or the ranks torchrun starts"):
        print(f"allconv-hpc: warning: {said}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None, entry_point: bool = False) -> int:
    """`entry_point`: this process is the command's (the console script): once its status is decided, a Ctrl-C is
    ignored. Python puts SIGINT's default action back as it shuts down, so one in the process's last moments ended
    it 130 without a word (seen: 27 in 120 Ctrl-Cs near the end of a `status`; a `submit` that had queued its job
    and said so), and a script read that as "nothing was queued". (train ignores it itself: ignore_late_signals.)"""
    argv = list(sys.argv[1:] if argv is None else argv)
    trains = argv[:1] == ["train"] and not {"-h", "--help", "--print-config"} & set(argv[1:])
    if trains:  # a broken pipe in training (a W&B socket) is a failure to report, not a `| head`
        return _dispatch(argv)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could no longer be told apart
        return code
    except BrokenPipeError:  # `submit ... | head`: the reader left; what was asked is done, only output is lost
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit raises again
        return 141  # as a shell reports a writer killed by SIGPIPE
    except KeyboardInterrupt:  # status, evaluate, --print-config: they only read (submit says what it queued)
        print(f"allconv-hpc{' ' + argv[0] if argv else ''}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    finally:  # also after argparse's SystemExit (--help, a bad option)
        if entry_point:
            import signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the status is decided: nothing is left to interrupt


# what torchrun's failure report says of a worker that stopped on purpose (it says "FAILED" of any non-zero exit,
# with "To enable traceback see: ..." where a traceback would be)
_STOPPED_SAYS = {EXIT_INTERRUPTED: f"not a failure: stopped on a signal (exit {EXIT_INTERRUPTED}); the same command "
                                   f"resumes the run",
                 EXIT_GAVE_UP: f"gave up after checkpoint.max_requeues time limits (exit {EXIT_GAVE_UP}); its checkpoint "
                               f"stands: submitting the run again continues it",
                 130: "interrupted (Ctrl-C) in start-up or during a stop (exit 130); the run's newest checkpoint stands"}


def _tell_torchrun(code: int) -> None:
    """A torchrun worker's exit on purpose, said where torchrun reads a worker's error."""
    if code in _STOPPED_SAYS:
        from .train import tell_torchrun
        tell_torchrun(_STOPPED_SAYS[code])


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train" and any(a in ("-h", "--help") for a in rest):
        print(train_usage())
        return 0
    if cmd == "train" and "--print-config" in rest:
        return print_config([a for a in rest if a != "--print-config"])
    if cmd == "train":
        from .preempt import EXIT_REQUEUED, catch_early, ignore_late_signals
        catch_early()  # before the heavy imports: under srun an early USR2 would otherwise kill the rank
        try:
            from .train import run
            code = run(rest, entry_point=True)
        except KeyboardInterrupt:  # one train.run did not catch: a second Ctrl-C while it closes, say
            print("allconv-hpc: interrupted (Ctrl-C); the run's newest checkpoint on disk stands", file=sys.stderr)
            _tell_torchrun(130)
            return 130
        ignore_late_signals()
        _tell_torchrun(code)
        return 0 if code == EXIT_REQUEUED else code  # back in the queue: nothing failed
    if cmd == "submit":
        from .launcher import submit_main
        return submit_main(rest)
    if cmd == "status":
        from .status import status_main
        return status_main(rest)
    if cmd == "evaluate":
        from .evaluate import evaluate_main
        return evaluate_main(rest)
    import difflib
    close = difflib.get_close_matches(cmd, COMMANDS, n=1, cutoff=0.5) or [c for c in COMMANDS
                                                                           if cmd and c.startswith(cmd)]
    hint = f" (did you mean {close[0]}?)" if close else ""
    print(f"allconv-hpc: unknown command {cmd!r}{hint}\n\n{USAGE}", file=sys.stderr)
    return 2


def entry() -> None:
    """The console script, and `python -m allconv_hpc`."""
    sys.exit(main(entry_point=True))


if __name__ == "__main__":
    entry()
