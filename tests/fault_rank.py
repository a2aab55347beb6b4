"""`allconv-hpc train`, with one rank made to raise (fault injection for the tests, never shipped).

FAIL_RANK=N FAIL_STEP=K python tests/fault_rank.py [overrides]: rank N raises a RuntimeError when it
logs global step K, as a bug or an out-of-memory error would, while its peers go on into a collective.
FAIL_AT=epoch_end_save: rank N kills itself (SIGKILL, as the OOM killer would) as it enters the checkpoint save
at the end of the epoch whose last step is global step K, so its peers lose it inside the save's collectives.
FAIL_AT=checkpoint_write: the process is killed (SIGKILL) from its checkpoint writer, a second into writing the
checkpoint of global step K, before the file lands (a node lost while a slow file system writes).
FAIL_AT=write_error: the checkpoint writer's write of global step K fails (ENOSPC, a full disk) a second in, once
the saves submitted after it (best.pt, status.json) wait behind it.
FAIL_AT=slow_close: no failure; the process group's teardown at the end says "closing the process group" on stdout
and takes a second (to signal a process that has said its exit).
FAIL_AT=folder FAIL_PATH=P FAIL_WHEN=setup|save: rank N makes P, a file the run writes later, a folder (as another
process might) once its trainer is set up, or as it enters its first checkpoint save: after start-up's checks, which
refuse such a folder, so that the run's own write there fails.
"""
import errno
import os
import signal
import sys
import time

from allconv_hpc import checkpoint, trainer
from allconv_hpc.cli import main

RANK, STEP = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
_log_train, _save = trainer.Trainer._log_train, trainer.Trainer.save


def _failing_log_train(self, *args, **kwargs):
    if self.env.rank == RANK and self.state.global_step >= STEP:
        raise RuntimeError(f"injected failure at global step {self.state.global_step}")
    return _log_train(self, *args, **kwargs)


def _killed_in_save(self, epoch_end=None):
    if self.env.rank == RANK and epoch_end is not None and self.state.global_step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(self, epoch_end)


_ckpt_save, _dist_close = checkpoint.CheckpointDir.save, trainer.Dist.close


def _slow_close(self):
    print("closing the process group", flush=True)
    time.sleep(1.0)
    return _dist_close(self)


def _killed_in_write(self, state, step):
    if step == STEP:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    return _ckpt_save(self, state, step)


def _failed_write(self, state, step):
    if step == STEP:
        time.sleep(1.0)
        raise OSError(errno.ENOSPC, "No space left on device", str(self.step_path(step)))
    return _ckpt_save(self, state, step)


def _folder_in_place() -> None:
    path = os.environ["FAIL_PATH"]
    if os.path.isfile(path):
        os.unlink(path)
    os.makedirs(path, exist_ok=True)


_setup = trainer.Trainer.setup


def _folder_after_setup(self):
    out = _setup(self)
    if self.env.rank == RANK:
        _folder_in_place()
    return out


def _folder_at_save(self, epoch_end=None):
    if self.env.rank == RANK:
        _folder_in_place()
    return _save(self, epoch_end)


if os.environ.get("FAIL_AT") == "folder":
    if os.environ["FAIL_WHEN"] == "setup":
        trainer.Trainer.setup = _folder_after_setup
    else:
        trainer.Trainer.save = _folder_at_save
elif os.environ.get("FAIL_AT") == "epoch_end_save":
    trainer.Trainer.save = _killed_in_save
elif os.environ.get("FAIL_AT") == "checkpoint_write":
    checkpoint.CheckpointDir.save = _killed_in_write
elif os.environ.get("FAIL_AT") == "write_error":
    checkpoint.CheckpointDir.save = _failed_write
elif os.environ.get("FAIL_AT") == "slow_close":
    trainer.Dist.close = _slow_close
else:
    trainer.Trainer._log_train = _failing_log_train
sys.exit(main(["train", *sys.argv[1:]]))
