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
import shlex
import socket
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .fsio import naming, read_json

LOCK_FILE = ".train.lock"
SUBMIT_LOCK = ".submit.lock"  # submit_lock's: one submit at a time checks a run (or sweep) folder and queues into it
PORT_FILE = ".port_requeues.json"  # how often a Slurm job requeued itself for a rendezvous port in use
FRESH_FILE = ".fresh_start.json"  # the job that started this run over (checkpoint.resume=never): its restarts resume
# what only this tool writes into a run folder (a project's root may hold wandb/, .hydra/ or a train.log of its
# own): a folder holding one is a run's (compose.check_run_dir goes by it; status and evaluate ask narrower
# questions: a sweep folder holds .submit.lock too)
OWN_FILES = frozenset({"status.json", "checkpoints", "submission.json", SUBMIT_LOCK, LOCK_FILE, "wandb_id.txt",
                       "wandb_steps.jsonl", FRESH_FILE, PORT_FILE})
NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # a file system without flock


def holds_run(folder: Path) -> bool:
    """Whether train or submit wrote into the folder: one of OWN_FILES, or checkpoints moved aside."""
    try:
        return any(n in OWN_FILES or n.startswith("checkpoints.old") for n in os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return False


class RunBusy(ConfigError):
    """Another process trains into the folder; the message names it and the ways out."""

    def __init__(self, run_dir: Path, who: str, way_out: Optional[str] = None):
        if way_out is None:
            way_out = (f"wait for it to end (allconv-hpc status {shlex.quote(str(run_dir))}), stop it, or give "
                       f"another hydra.run.dir")
            path = Path(run_dir) / LOCK_FILE
            host = read_json(path).get("host")
            if host and host != socket.gethostname():  # a dead node's lock outlives it on NFS: its lease, or for good
                way_out += f"; if {host} is down (a node failure), delete {path}"
        super().__init__(f"run folder {run_dir} is being trained into by {who}: two writers would interleave its "
                         f"checkpoints and history; {way_out}")


STALE_WAIT_S = 150.0  # an NFSv4 lease (90 s by default) and some: how long a dead node's lock may outlive it


def _describe(path: Path) -> str:
    who = read_json(path)
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["started"]))
        job = f", Slurm job {who['slurm_job_id']}" if who.get("slurm_job_id") else ""
        mine = who["pid"] == os.getpid() and who["host"] == socket.gethostname()
        return f"{'this process, ' if mine else ''}pid {who['pid']} on {who['host']}{job}, since {since}"
    except (KeyError, TypeError, ValueError, OverflowError):
        return "another process"


def _own_job(who: dict) -> bool:
    """The holder is an earlier run of this same Slurm job, requeued after its node failed: a lock that
    node still holds (NFSv4 frees it when the node's lease runs out, NFSv3 only when the node comes back).
    Only on another host (on this one the kernel drops a dead process's lock, so a held one is live) and
    from an earlier start of the job (two trains in one allocation share its job id, not its restarts)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or str(who.get("slurm_job_id")) != job or who.get("host") in (None, socket.gethostname()):
        return False
    try:
        return int(who.get("slurm_restart") or 0) < int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except (TypeError, ValueError):
        return False


def _take(fd: int, run_dir: Path, path: Path, wait_s: float) -> None:
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            who = read_json(path)  # read each time: a new holder writes its record just after taking the lock
            own = _own_job(who)
            if time.monotonic() - start > (max(wait_s, STALE_WAIT_S) if own else wait_s):
                if own:
                    raise RunBusy(run_dir, f"{_describe(path)}, this job's own earlier run, whose node still holds "
                                  f"the lock", way_out=f"if {who.get('host')} is down (a node failure), delete "
                                  f"{path} and submit again") from None
                raise RunBusy(run_dir, _describe(path)) from None
            time.sleep(1.0 if own else 0.1)


def acquire(run_dir: Path, wait_s: float = 2.0, group: Optional[str] = None) -> Optional[int]:
    """The lock's fd, held until it is closed or the process ends; RunBusy when another process holds it
    (retried for wait_s: `status` takes it for an instant to look; for STALE_WAIT_S when the holder is this
    job's own earlier run); None where the file system has no flock. `group`: the launch's rendezvous
    (MASTER_ADDR:MASTER_PORT), recorded so that its other ranks know the lock as their rank 0's."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            _take(fd, run_dir, path, wait_s)
        except OSError as e:
            if e.errno in NO_LOCKS:
                os.close(fd)
                return None
            raise
        who = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
               "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"),
               "group": group}
        with naming(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(who).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LockLost(RuntimeError):
    """The run folder's lock file was deleted while this process held it, and another process took a new one."""


def keep(run_dir: Path, fd: int) -> int:
    """The holder's check that `fd` still locks run_dir (before it writes again): its file may have been deleted by
    hand (the way out RunBusy names for a dead node's lock, taken for a live one). Deleted and not made again: locked
    again, the new fd returned (the old one closed). Made again by another start (held now or not): LockLost, so
    that this process stops before its files interleave with the other's."""
    path = Path(run_dir) / LOCK_FILE
    mine = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        now = None
    if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
        return fd
    if now is None:
        try:
            new = acquire(run_dir, wait_s=0.5)
        except RunBusy:
            new = -1  # made again, and locked, by another start just now
        if new is None:  # no flock on this file system any more: nothing to hold
            return fd
        if new >= 0:
            os.close(fd)
            return new
    held, _ = holder(run_dir)
    raise LockLost(f"run folder {run_dir}: its lock file was deleted while this process trained into it, and another "
                   f"start made a new one since ({_describe(path)}, {'still running' if held else 'ended since'}), "
                   f"which may have written into the folder: this process stops without writing again, so that the "
                   f"two do not interleave checkpoints and history; the same command resumes from the newest "
                   f"checkpoint once no other start trains there (delete {LOCK_FILE} only when its holder is gone)")


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
    host = read_json(path).get("host")
    return (False, "") if host is not None and host == socket.gethostname() else (None, "")


def taken_at(run_dir: Path) -> Optional[float]:
    """When the lock's last holder took it (time.time() of its record), None when no record says."""
    started = read_json(Path(run_dir) / LOCK_FILE).get("started")
    return float(started) if isinstance(started, (int, float)) else None


RECORD_WAIT_S = 2.0  # how long a rank waits for its rank 0, holding the lock, to write its record over the last one


def check_free(run_dir: Path, group: Optional[str] = None) -> None:
    """RunBusy when a process trains into run_dir now: refused before any expensive work. `group`: this
    rank's rendezvous; a holder of the same one is its own rank 0 (one port serves one launch at a time).
    Rank 0 takes the flock, then writes its record: a rank looking in between sees the lock held under an
    empty or an earlier run's record, so with a group it looks again for RECORD_WAIT_S before refusing."""
    path, deadline = Path(run_dir) / LOCK_FILE, time.monotonic() + RECORD_WAIT_S
    while True:
        held, who = holder(run_dir)
        if not held:
            return
        record = read_json(path)
        if group is not None and record.get("group") == group:
            return
        if _own_job(record):  # this job's earlier run: acquire() waits it out
            return
        if group is None or time.monotonic() > deadline:
            raise RunBusy(run_dir, who)
        time.sleep(0.05)
