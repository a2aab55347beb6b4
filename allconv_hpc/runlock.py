"""One writer per run folder: rank 0 holds an exclusive flock on <run>/.train.lock while it trains.

Two processes training into one folder would interleave checkpoints and history rows (a second
`train` started by hand, or a `submit` into a folder a hand-started `train` uses). The kernel drops
the lock when the process ends however it ends (SIGKILL too), so a free lock whose file names this
host means its writer is gone. On file systems that lock per node only (Lustre's localflock) a
holder on another node is invisible: the lock then guards one node, and `status` concludes nothing
from a free lock written on another host.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError

LOCK_FILE = ".train.lock"
NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # a file system without flock


class RunBusy(ConfigError):
    """Another process trains into the folder; the message names it and the ways out."""

    def __init__(self, run_dir: Path, who: str):
        super().__init__(f"run folder {run_dir} is being trained into by {who}: two writers would interleave its "
                         f"checkpoints and history; wait for it to end (allconv-hpc status {run_dir}), stop it, or "
                         f"give another hydra.run.dir")


def _describe(path: Path) -> str:
    try:
        who = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["started"]))
        job = f", Slurm job {who['slurm_job_id']}" if who.get("slurm_job_id") else ""
        return f"pid {who['pid']} on {who['host']}{job}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(run_dir: Path, wait_s: float = 2.0) -> Optional[int]:
    """The lock's fd, held until it is closed or the process ends; RunBusy when another process holds it
    (retried for wait_s: `status` takes it for an instant to look); None where the file system has no flock."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunBusy(run_dir, _describe(path)) from None
                time.sleep(0.1)
    except OSError as e:
        os.close(fd)
        if e.errno in NO_LOCKS:
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    who = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
           "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(who).encode(), 0)
    return fd


def holder(run_dir: Path) -> tuple[Optional[bool], str]:
    """(held, who): True with its holder's description while a process trains into run_dir; False when the
    lock is free and was last taken on this host (its writer is gone); None when it cannot tell (no lock
    file: a run of an older version or never started; no flock; a lock last taken on another host)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None, ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True, _describe(path)
    except OSError:
        return None, ""
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    try:
        host = json.loads(path.read_text()).get("host")
    except (OSError, ValueError, AttributeError):
        return None, ""
    return (False, "") if host == socket.gethostname() else (None, "")


def check_free(run_dir: Path) -> None:
    """RunBusy when a process trains into run_dir now: refused before any expensive work."""
    held, who = holder(run_dir)
    if held:
        raise RunBusy(run_dir, who)
