"""Run one rank of training: compose -> validate -> build -> fit -> close, errors made one line."""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .jobs import START_UP_INTERRUPT
from .localjob import LOCAL_PORT_ENV, local_job_id, unhold

log = logging.getLogger("allconv_hpc")
# a Ctrl-C's word in start-up, logged and on stderr (status reads it by START_UP_INTERRUPT)
_START_UP_INTERRUPTED = f"{START_UP_INTERRUPT}, before training; nothing was written to the run's checkpoints"


class LogFile(logging.FileHandler):
    """train.log. A write that fails (a full disk, a quota) is said once on stderr, where the same lines go, not as
    Python's "--- Logging error ---" traceback at each line; later lines are tried again (space may come back)."""
    said = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.said:
            self.said = True
            sys.stderr.write(f"allconv-hpc: cannot write {self.baseFilename} ({sys.exc_info()[1]}): its lines are on "
                             f"stderr and stdout only (a job's output files) until it can\n")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0: everything to <run>/train.log; INFO to stdout, warnings and errors to stderr (a Slurm job's
    .err file holds what went wrong). Other ranks: warnings and errors to stderr, tagged with their rank."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()  # an earlier run's train.log in this process (a stream handler leaves its stream open)
    if rank == 0:
        fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err.setLevel(logging.WARNING)
        handlers = [out, err, LogFile(run_dir / "train.log")]
        level = logging.INFO
    else:
        fmt = logging.Formatter(f"[%(asctime)s %(levelname)s rank {rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
        handlers, level = [logging.StreamHandler(sys.stderr)], logging.WARNING
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("torch", "urllib3", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Slurm sends SIGCONT along with its signals, and submitit's handler logs every one as a WARNING
    # that only alarms: a preempted job's log would read as if something went wrong
    logging.getLogger("submitit").addFilter(lambda r: not r.getMessage().startswith("Bypassing signal SIGCONT"))


def tell_torchrun(message: str) -> None:
    """Why this worker exits, where torchrun reads a worker's error (TORCHELASTIC_ERROR_FILE): its report says
    "FAILED" of any non-zero exit, with "To enable traceback see: ..." where the why would be."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    from .fsio import write_atomic
    said = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:  # whole or not at all: torchrun fails on a half-written file
        write_atomic(Path(path), json.dumps(said))
    except OSError:  # torchrun then says what it says of any exit
        pass


def _refused(e) -> int:
    """A config or folder refused before any work: one line, also in torchrun's report."""
    said = f"{_rank_tag()}{e}"
    print(f"allconv-hpc: error: {said}", file=sys.stderr)
    tell_torchrun(f"refused before any work (exit 2): {said}")
    return 2


def run(overrides: list[str], submitted: bool = False, entry_point: bool = False) -> int:
    """The whole training process for this rank; returns the exit status. `submitted`: started by
    `allconv-hpc submit`, which read the cluster.* overrides itself. `entry_point`: this process is the run's
    (the CLI, a submitit job): once the run said its exit, signals are ignored (preempt.exit_said)."""
    from .preempt import EXIT_INTERRUPTED, EXIT_REQUEUED, StartupStop, catch_early, sigint_deferred
    try:
        # a Ctrl-C deferred to the end of the config's compose and the slow imports (torch: seconds): Hydra's
        # compose, and torch's own start-up as it imports numpy from C++, dropped a KeyboardInterrupt raised in
        # them (seen: 3 in 40 Ctrl-Cs in `import torch`), and the run trained on, or a local job's rank waited at
        # its rendezvous for a peer that had stopped
        with sigint_deferred():
            unhold()  # a cluster=local rank's signals held since its start come now, into this Ctrl-C guard
            from .compose import (check_growth, check_run_dir, check_train_args, compose, pin_data_root,
                                  with_recorded_root, write_hydra_files)
            from .runlock import LockLost, acquire, check_free
            from .jobs import START_UP_STOP, is_completed, is_diverged, other_jobs_state, stop_command
            from .wandb_mode import check_environment, check_names, preflight_mode
            check_train_args(overrides)
            composed = compose(overrides)  # a typo is said before torch's import, which comes next
            from .checkpoint import CheckpointError, check_resume
            from .data import check_files, check_present
            from .distributed import DistributedError, PortInUse, detect_env
            from .launch_checks import check_launch
            from .trainer import NonFiniteError, Trainer
        root_said = pin_data_root(composed)
        check_run_dir(composed.run_dir)
        busy = other_jobs_state(composed.run_dir)
        if busy is not None:  # two writers of one folder would interleave its checkpoints and history
            (rec, state), where = busy, composed.run_dir
            raise ConfigError(f"run folder {where} has job {rec['job_id']} ({state}) training into it: wait for "
                              f"it (allconv-hpc status {shlex.quote(str(where))}), stop it ({stop_command(rec)}), or "
                              f"give another hydra.run.dir")
        try:  # a resume the trainer would refuse, said before the data load and the model build
            if check_resume(composed.run_dir, composed.cfg) is not None:
                check_growth(composed.run_dir, composed.cfg.trainer.epochs, overrides)
        except CheckpointError:  # left to the trainer, which records it in status.json and train.log for `status`
            pass  # (submit refuses such a folder before queueing; a job finds it here)
        try:
            check_present(composed.cfg.data)
        except ConfigError as e:
            raise ConfigError(with_recorded_root(e, composed, check_present)) from None
        if not submitted and not (composed.run_dir / "checkpoints").is_dir():  # a new run (a resume's, and a
            # submitted job's, were checked): a size its files cannot give (a copy cut short, rebuilt) is refused
            t = composed.cfg.trainer  # before its folder is made, which was left a FAILED row
            check_files(composed.cfg.data, t.batch_size if t.drop_last else None)
        if preflight_mode(composed.cfg.wandb.mode) != "disabled":  # a bad WANDB_MODE, online with no key...
            check_names(composed.cfg.wandb)  # ...or a project or tag W&B would refuse at wandb.init...
            check_environment()  # ...or a WANDB_* variable it would
        catch_early(composed.cfg.checkpoint.signal)  # a warning during start-up is honoured at the first steps
    except ConfigError as e:
        return _refused(e)
    except KeyboardInterrupt:
        return _interrupted_in_start_up()
    lock_fd = None
    try:
        env = detect_env()
        check_launch(composed.cfg, env)
        # rank 0 holds the run lock from before its first line in train.log: `status` tells a start-up in
        # progress (a long rendezvous) from one that failed by it
        group = f"{env.master_addr}:{env.master_port}"  # the other ranks know their rank 0's lock by it
        if env.is_main:  # RunBusy names a process training into the folder now
            lock_fd = acquire(composed.run_dir, group=group)
        else:
            check_free(composed.run_dir, group=group)
        setup_logging(composed.run_dir, env.rank)
    except (DistributedError, ConfigError) as e:  # every rank fails alike, before the rendezvous
        return _released(lock_fd, _refused(e))
    except OSError as e:  # check_run_dir passed, yet the folder or train.log cannot be made (a race, a quota)
        return _released(lock_fd, _refused(f"cannot write the run folder {composed.run_dir} ({e}); give a writable "
                                           f"hydra.run.dir"))
    except KeyboardInterrupt:
        return _released(lock_fd, _interrupted_in_start_up())
    trainer = None
    code = 1
    try:  # from here a Ctrl-C in start-up is logged, and marked in status.json by rank 0
        if env.is_main:
            _log_start(composed, env, root_said, [] if submitted else overrides)
        trainer = Trainer(composed.cfg, composed.cfg_dict, composed.run_dir, env, lock_fd=lock_fd,
                          locked=env.is_main)  # up to the rendezvous
        trainer.entry_point = entry_point
        trainer.setup()
        if env.is_main:  # only now: a run folder refused as another config's keeps its own .hydra/
            write_hydra_files(composed)
        code = trainer.fit()
        return code
    except ConfigError as e:
        log.error("%s", e)
        if trainer is not None:  # the peers name it; status.json stays the folder's own (maybe another run's)
            trainer.dist.report_failure(str(e))
        tell_torchrun(f"refused (exit 2): {e}")
        code = 2
        return code
    except PortInUse as e:  # rank 0's rendezvous port (from the job id and restart count) is held on its node
        log.error("%s", e)
        if _requeued_for_port(env, composed.run_dir):
            code = EXIT_REQUEUED
        return code
    except DistributedError as e:
        return _peer_ended(trainer, e)
    except LockLost as e:  # another process trains into the folder now: nothing more of this one's, status.json too
        log.error("%s", e)
        if trainer is not None:
            trainer.drop_pending_status()  # the writer's queued "running" record lands no more
        return 1
    except StartupStop as e:  # every rank at the same point: a stop, as one in training, with nothing to save
        said = f"stopped by {e} {START_UP_STOP}; nothing was trained or written to its checkpoints"
        log.warning("%s", said)
        from .fsio import read_json
        st = read_json(composed.run_dir / "status.json")
        # a rerun of a finished run (nothing to do) stays completed, and a diverged one failed (a resume repeats
        # the divergence: the run's last word, nothing trained since), unless resume=never moved it
        if not (is_completed(st, st.get("epoch"), composed.cfg.trainer.epochs) or is_diverged(st)) \
                or (trainer is not None and trainer.set_aside):
            _report(trainer, said, "interrupted", tell_peers=False)
            if trainer is None and env.is_main:  # stopped before its rendezvous
                _mark_interrupted(composed.run_dir, said, env)
        code = EXIT_INTERRUPTED
        return code
    except (NonFiniteError, CheckpointError) as e:  # a failed write or an unreadable file: one line
        log.error("%s", e)
        _report(trainer, f"{e}", "failed")
        return 1
    except KeyboardInterrupt:  # Python's own Ctrl-C before fit's handlers are in place, or a second one while stopping
        code = 130
        if trainer is None or not trainer.training_started:  # start-up: this start trained nothing
            if trainer is None:
                _tell_peers_later()
            said = _START_UP_INTERRUPTED
            log.warning("%s", said)
            if trainer is not None:
                _report(trainer, said, "interrupted")
            elif env.is_main:  # no trainer to say it: status must not read the folder as a failed start
                _mark_interrupted(composed.run_dir, said, env)
            return code
        log.error("interrupted (Ctrl-C) away from a step boundary: stopped at once; the newest checkpoint "
                  "on disk stands")
        _report(trainer, "interrupted by Ctrl-C", "interrupted")
        return code
    except BaseException as e:
        peer = trainer.dist.as_peer_failure(e) if trainer is not None else None
        if peer is not None:  # a collective failed because another rank died: name it, no traceback soup
            return _peer_ended(trainer, peer)
        where = _run_folder_file(e, composed.run_dir)
        if where is not None:  # a file of the run folder (history.csv, status.json): one line, not a traceback
            msg = (f"cannot read/write {where} ({type(e).__name__}: {e.strerror}); check free space, quota and "
                   f"permissions (chattr, a sticky shared folder) of the run folder; its checkpoints are kept, and "
                   f"the same command resumes once it is fixed")
            log.error("%s", msg)
            _report(trainer, msg, "failed")
            return 1
        _report(trainer, f"{type(e).__name__}: {e}", "failed")
        raise
    finally:
        if trainer is not None:
            trainer.close(exit_code=code)
        elif lock_fd is not None:  # the trainer never took it (its rendezvous failed): this process keeps on
            os.close(lock_fd)


def _log_start(composed, env, root_said, overrides: list[str]) -> None:
    """Rank 0's first lines in train.log: the folder and code, the data root, and warnings on the config."""
    from .compose import train_warnings
    from .provenance import code_version, describe
    log.info("run folder %s; code: %s", composed.run_dir, describe(code_version()))
    if root_said:
        (log.warning if root_said[0] else log.info)("%s", root_said[1])
    # overrides are [] when submitted: submit read the cluster.* ones (a user expecting `train
    # cluster.tasks_per_node=4` to start 4 ranks is told otherwise)
    for said in train_warnings(composed, overrides, f"here {env.world_size} rank(s)"):
        log.warning("%s", said)
    if env.source == "torchrun" and os.environ.get("SLURM_JOB_ID"):
        log.warning("started by torchrun inside Slurm job %s: torchrun does not pass Slurm's warning signal "
                    "on to its workers, so a preemption or time limit is not checkpointed; start one rank "
                    "per srun task (allconv-hpc submit, slurm/train.sbatch)", os.environ["SLURM_JOB_ID"])


PORT_REQUEUES = 10  # how often a Slurm job whose rendezvous port is held requeues itself for it


def _requeued_for_port(env, run_dir: Path) -> bool:
    """A Slurm job's rank 0 found its port held: requeue the job, whose restart gets another port
    (distributed.slurm_port), instead of failing a job its user walked away from. Nothing trained yet. Bounded by
    the job's own count of such requeues (in the run folder, which rank 0 holds locked), not by its restarts,
    which preemptions and time limits add to."""
    from .fsio import read_json, write_atomic
    from .slurm import SlurmJob
    from .runlock import PORT_FILE
    job = SlurmJob()
    if env.source != "slurm" or not env.is_main or not job.in_slurm:
        return False
    record = read_json(run_dir / PORT_FILE)
    count = record.get("count") if record.get("job") == job.job_id else 0
    count = count if isinstance(count, int) else 0
    if count >= PORT_REQUEUES:
        log.error("not requeued: job %s requeued itself %d times for a port in use already (at most %d); submit the "
                  "same command again", job.job_id, count, PORT_REQUEUES)
        return False
    write_atomic(run_dir / PORT_FILE, json.dumps({"job": job.job_id, "count": count + 1}) + "\n")
    if not job.requeue():
        log.error("Slurm did not requeue job %s (cluster.requeue=false, or the site forbids requeues); submit the "
                  "same command again: a new job id gives another port", job.job_id)
        return False
    log.warning("requeued job %s: its restart gets another rendezvous port", job.job_id)
    return True


def _released(lock_fd: Optional[int], code: int) -> int:
    """code, after closing the run lock taken before a start-up failure (this process may go on: tests, a library)."""
    if lock_fd is not None:
        os.close(lock_fd)
    return code


def _rank_tag() -> str:
    """'rank N: ' in a launch of several ranks, whose errors share one console (torchrun) or are read side by side
    (status, from each task's .err): a refusal on one node only (its data missing) says whose it is."""
    if not any(k in os.environ for k in ("WORLD_SIZE", "SUBMITIT_LOCAL_NTASKS", "SLURM_STEP_NUM_TASKS")):
        return ""  # none of detect_env's ways to several ranks: one process, and a typo is said without torch's import
    from .distributed import DistributedError, detect_env
    try:
        env = detect_env()
    except DistributedError:
        return ""
    return f"rank {env.rank}: " if env.world_size > 1 else ""


# set when this rank was Ctrl-C'd before its Trainer existed: its peers may wait for it at the rendezvous, untold
# (a Trainer tells them: _report); a cluster=local rank then passes the Ctrl-C on (launcher.TrainJob)
peers_untold = False


def _mark_interrupted(run_dir: Path, said: str, env) -> None:
    """status.json says a start stopped before its Trainer existed (no Trainer to write it): `status` must not
    read the folder as a failed start."""
    from .fsio import read_json, write_atomic
    from .slurm import SlurmJob
    path = run_dir / "status.json"
    slurm = SlurmJob.of_rank(env.source)  # the job that wrote it, as Trainer.write_status records it
    write_atomic(path, json.dumps({**read_json(path), "state": "interrupted", "error": said, "updated": time.time(),
                                   "slurm_job_id": slurm.job_id if slurm.in_slurm else None,
                                   "local_job_id": local_job_id(env.source)}, indent=1).encode())


def _tell_peers_later() -> None:
    global peers_untold
    peers_untold = True
    if os.environ.get(LOCAL_PORT_ENV):  # a cluster=local rank: a peer Ctrl-C'd alike passes its own on to this one,
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # which is leaving with 130 now: no traceback of it


def _interrupted_in_start_up() -> int:
    _tell_peers_later()
    print(f"allconv-hpc: {_START_UP_INTERRUPTED}", file=sys.stderr)
    return 130


def _run_folder_file(e: BaseException, run_dir: Path) -> Optional[str]:
    """The run-folder file an OSError is about, or None for any other error (a compiler cache in the
    home folder is not the run folder's problem, and its traceback is what helps)."""
    if not isinstance(e, OSError):
        return None
    for name in (e.filename2, e.filename):
        if name is None:
            continue
        try:
            path = Path(os.fsdecode(name)).absolute()
        except (TypeError, ValueError):
            continue
        if path.is_relative_to(Path(run_dir).absolute()):
            return str(path)
    return None


def _peer_ended(trainer, e: Exception) -> int:
    """The exit status of a rank whose peer went down, status.json said (it must not stay "running"): a peer's
    Ctrl-C in start-up stops this rank as its own would (130), anything else fails it."""
    from .distributed import PeerInterrupted, PeerLost
    if isinstance(e, PeerInterrupted):  # the user's stop: no checkpoint since this start, and nothing failed
        log.warning("%s", e)
        _report(trainer, str(e), "interrupted", tell_peers=False)
        return 130
    log.error("%s", e)
    # a peer killed without a word (the OOM killer, a node): `status` says the same command resumes the run
    _report(trainer, str(e), "failed", tell_peers=False, peer_lost=isinstance(e, PeerLost))
    return 1


def _report(trainer, message: str, state: str, tell_peers: bool = True, **extra) -> None:
    from .distributed import clipped
    if trainer is None:
        return
    if tell_peers:  # an interruption is told as one: the peers stop, they do not fail
        trainer.dist.report_failure(message, interrupted=state == "interrupted")
    try:
        # whole, as train.log has it: a diverged run's advice ends with why the same command is no fix
        trainer.write_status(state, error=clipped(message), **extra)
    except Exception:  # never hide the original error
        pass
