"""One `submit` at a time per run (or sweep) folder: the folder's .submit.lock, held while it is checked again
and queued into; folders a refused submission made are taken back."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from . import runlock
from .config import ConfigError
from .resources import warn


def _make_folders(folder: Path, made: list[Path]) -> None:
    """Make folder and its missing parents; adds the ones this process made itself to `made` as it goes (one that
    another process made in the meantime is not: its mkdir fails here), also where a later mkdir fails."""
    for d in reversed([folder, *folder.parents]):
        if not d.exists():
            try:
                d.mkdir()
                made.append(d)
            except FileExistsError:
                pass


def _unmake_folders(made: list[Path], lock: Path, fd: int) -> None:
    """A refused submission takes back the folders it made, as long as they hold nothing but its lock and empty
    folders: another process may have written into them since (a `train` started by hand)."""
    if lock.parent not in made:  # the folder (and its lock, which a waiting submit may hold) is another's
        return
    try:
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            lock.unlink()
    except OSError:
        pass
    for d in made:
        inside = d.rglob("*") if d == made[0] and d == lock.parent else ()  # e.g. submitit's empty .submitit/%j
        for sub in sorted(inside, key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir() and not sub.is_symlink():
                try:
                    sub.rmdir()
                except OSError:  # not empty
                    pass
        try:
            d.rmdir()
        except OSError:  # not empty (someone else's files) or gone
            return


@contextlib.contextmanager
def submit_lock(folder: Path):
    """Holds an exclusive lock on folder/.submit.lock while the folder is checked again and queued into, so two
    submits started at once cannot both queue a job into one folder (the later one then finds the earlier one's
    job). Folders this process made are removed again when the submission is refused (ConfigError) and hold
    nothing else. Where the file system has no flock (Lustre without -o flock), submission goes on unlocked,
    with a warning."""
    import fcntl
    made: list[Path] = []
    while True:
        path = folder / runlock.SUBMIT_LOCK
        made = [d for d in made if d.exists()]
        try:  # the checks before (os.access) pass where a mkdir fails: a full quota, NFS's root squash
            _make_folders(folder, made)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            for d in sorted(made, key=lambda d: len(d.parts), reverse=True):  # still empty: nothing else made them
                with contextlib.suppress(OSError):
                    d.rmdir()
            full = " (it is full, or your quota is)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise ConfigError(f"cannot write {e.filename or path} ({e.strerror}){full}; give a folder this user can "
                              f"write (hydra.run.dir, or hydra.sweep.dir for a sweep)") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another submit into {folder} to finish", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in runlock.NO_LOCKS:
                os.close(fd)
                raise
            warn(f"cannot lock {path} ({e.strerror}); submitting without the lock that keeps two submits at once "
                  f"out of one folder")
            break
        try:  # the earlier holder may have removed the folder (its submission refused): lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    except ConfigError:
        _unmake_folders(sorted(made, key=lambda d: len(d.parts), reverse=True), path, fd)
        raise
    finally:
        os.close(fd)
