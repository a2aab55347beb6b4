"""Atomic, verified checkpoint files.

A file is the torch-serialised state followed by an 86-byte trailer holding its SHA-256, written to
a temp file in the same folder, fsynced and renamed: a reader sees either the old file or the
complete new one, and a truncated or bit-flipped file fails verification instead of loading
garbage. Loading uses `torch.load(weights_only=True)`, which runs no pickled code.

Layout of `<run>/checkpoints/`: `step_00001234.pt` (the `keep` most recent), `last.pt` (a hard
link to the newest; a copy of it where the file system has no hard links), `best.pt` (best val_acc).

`Writer` writes in a background thread, in order: training waits only for a CPU copy of the state
(`snapshot`), not for torch.save + SHA-256 + fsync (~35 ms, more than a whole GPU step).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

from .config import ConfigError, OtherConfig, from_dict
from .fsio import (ASIDE_MARKER, CHECKPOINT_MAGIC as MAGIC, CHECKPOINT_TRAILER_LEN as TRAILER_LEN, aside_targets as
                   _aside_targets, fsync_dir, half_set_aside, renamed_aside, same_file, write_atomic)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class UnloadableCheckpoint(CheckpointError):
    """The file is whole (its checksum holds) but this torch refuses it: never a reason to fall back."""


# what a resume reads of a checkpoint (`evaluate` reads the model, config and where in training it was)
RESUMED_PARTS = ("model", "optimizer", "scheduler", "scaler", "train_state", "epoch_sums", "interval_sums", "rng")


@contextlib.contextmanager
def fitting(path: Path):
    """Loading checkpoint ``path``'s contents into this run's model or optimizer: what they refuse (missing or
    unexpected keys, other shapes, other groups) is `does_not_fit`, one line; a device's error while copying the
    tensors (out of memory, a fault) is no fault of the file and passes as it is."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        if isinstance(e, RuntimeError) and not str(e).startswith("Error(s) in loading state_dict"):
            raise
        raise does_not_fit(path, e) from None


def does_not_fit(path: Path, e: BaseException) -> UnloadableCheckpoint:
    """A whole checkpoint (its checksum holds) whose contents this code cannot load into its model or optimizer:
    written by other code (a model's layers renamed between requeues), or made by hand. One line naming the file,
    not a traceback; never a reason to fall back to an older checkpoint, which the same code wrote."""
    said = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    said = said if len(said) <= 240 else said[:240].rstrip() + " ..."
    return UnloadableCheckpoint(
        f"{path} is intact (its checksum holds) but does not fit this run's model or optimizer ({type(e).__name__}: "
        f"{said}): written by other code (its `code` names the version) or by hand? use the code that wrote it; a run "
        f"starts over with checkpoint.resume=never (its old checkpoints are kept)")


def snapshot(obj: Any) -> Any:
    """A CPU copy of every tensor in a state tree (dicts, lists, tuples), so the live weights and
    buffers can change while it is written. From a GPU: one synchronous copy per tensor (~1 ms for
    11 MB). A state_dict stays an OrderedDict with its `_metadata` (module versions)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((k, snapshot(v)) for k, v in obj.items())
        if getattr(obj, "_metadata", None) is not None:
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(snapshot(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class _Hashing:
    """A write-only stream that hashes what passes through to `f`. torch.save writes its zip
    sequentially to an object with only `write`, so body and hash are made in one pass."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()
        self.error: Optional[BaseException] = None

    def write(self, b) -> int:
        self.sha.update(b)  # hashlib and file writes release the GIL on large chunks
        try:
            return self.f.write(b)
        except BaseException as e:  # torch re-raises it as "unexpected pos": keep the real one (ENOSPC...)
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_to(f: BinaryIO, state: dict) -> None:
    """The serialised state, then its trailer. Streamed: never a whole-file bytes object, whose
    allocation and copies (~11 MB, twice) held the GIL for tens of ms next to a training loop."""
    h = _Hashing(f)
    try:
        torch.save(state, h)
    except Exception:
        if h.error is not None:
            raise h.error from None
        raise
    f.write(MAGIC + h.sha.hexdigest().encode() + b"\n")


def write_file(path: Path, state: dict) -> None:
    """Atomically write `state` as a verified checkpoint file at `path`."""
    write_atomic(path, lambda f: write_to(f, state))


def decode(data: bytes, name: str = "checkpoint") -> dict:
    if len(data) < TRAILER_LEN or data[-TRAILER_LEN:-65] != MAGIC:
        raise CheckpointError(f"{name}: no completeness trailer (truncated or not an allconv checkpoint)")
    body, digest = data[:-TRAILER_LEN], data[-65:-1].decode(errors="replace")
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"{name}: checksum mismatch (corrupted)")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except MemoryError:  # not the file's doing
        raise
    except Exception as e:  # the bytes are the ones written: another torch, or a type weights_only refuses
        said = (str(e).splitlines() or [""])[0][:300]
        raise UnloadableCheckpoint(
            f"{name} is intact (its checksum holds) but torch {torch.__version__} cannot load it "
            f"({type(e).__name__}{': ' + said if said else ''}); load it with the torch version that wrote it, "
            f"or start over with checkpoint.resume=never (the old checkpoints "
            f"are kept)") from None


def load_file(path: Path) -> dict:
    return decode(path.read_bytes(), str(path))


# os.link's errors where the file system has no hard links (not a full disk, a permission or a missing file)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


class CheckpointDir:
    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), keep
        self._copies_last = False  # warned once that last.pt is a copy

    def step_files(self) -> list[Path]:
        files = [p for p in self.folder.glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", p.name)]
        return sorted(files, key=lambda p: int(p.stem[5:]), reverse=True)

    def exists(self) -> bool:
        return (self.folder / "last.pt").exists() or bool(self.step_files())

    def step_path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def save(self, state: dict, step: int) -> Path:
        """Write step_<step>.pt, point last.pt at it, prune old step files. Rank 0 only."""
        path = self.step_path(step)
        self._remove_partial()
        write_file(path, state)
        self._point_last(path)
        for old in self.step_files()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def _remove_partial(self) -> None:
        """Partial files of a writer that was killed (SIGKILL, OOM): up to a checkpoint's size each."""
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _point_last(self, path: Path) -> None:
        """last.pt becomes a hard link to the step file `path`, atomically; a copy of it on a file system that has
        no hard links (some FUSE, SMB and object-store mounts), where every save failed (load_latest reads either)."""
        link_tmp = self.folder / f".last.pt.{os.getpid()}.tmp"
        link_tmp.unlink(missing_ok=True)
        try:
            os.link(path, link_tmp)
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            if not self._copies_last:
                self._copies_last = True
                log.warning("%s has no hard links (%s): last.pt is written as a copy of each step file, twice the "
                            "bytes per save", self.folder, e.strerror or e)
            with open(path, "rb") as src:  # streamed, as write_atomic writes a state
                write_atomic(self.folder / "last.pt", lambda f: shutil.copyfileobj(src, f, 1 << 20))
            return
        os.replace(link_tmp, self.folder / "last.pt")
        fsync_dir(self.folder)

    def save_best(self, state: dict) -> None:
        write_file(self.folder / "best.pt", state)

    def load_latest(self, quarantine: bool = False, warn: bool = True,
                    folder_key: str = "hydra.run.dir") -> Optional[tuple[dict, Path]]:
        """The newest checkpoint that verifies; corrupt ones are skipped with a warning (unless not
        ``warn``: a look ahead of the trainer, which warns itself). With ``quarantine`` (the trainer
        resuming) skipped step files are renamed ``*.corrupt``: kept for a look, but out of the
        rotation, where they would take a `keep` slot from the good files. ``folder_key``: the option
        that places the run, named in the error (a sweep's points are placed by hydra.sweep.dir)."""
        # highest step first: a kill between writing step_N and relinking last.pt must not lose step N. Then
        # last.pt, the newest save that finished: a hard link to a step file (skipped if to a damaged one), or
        # a copy of its own (cp -r, rsync without -H), which is newer than every older step file
        if quarantine:  # the resuming trainer, under the run's lock: a run killed in its last write never saves again
            self._remove_partial()
        files, last = self.step_files(), self.folder / "last.pt"
        bad = []
        for path in files[:1] + [last] + files[1:]:
            if not path.exists() or (path == last and any(same_file(last, b) for b in bad)):
                continue
            try:
                state = load_file(path)
            except FileNotFoundError:  # pruned since the listing
                continue
            except OSError as e:  # the file may be fine (EIO, ESTALE, permissions): never silently go back
                raise CheckpointError(f"cannot read {path}: {e}; fix the file system problem and run again (or move "
                                      f"the file aside to resume from the one before)") from None
            except UnloadableCheckpoint:  # whole, so the newer progress is there: never silently go back either
                raise
            except CheckpointError as e:  # truncated or corrupted
                if warn:
                    log.warning("skipping unusable checkpoint %s", str(e).splitlines()[0][:300])  # e names the file
                bad.append(path)
                continue
            if bad and warn:
                log.warning("resuming from the previous good checkpoint %s", path.name)
            if quarantine and path != last and last.exists() and any(b == last or same_file(last, b) for b in bad):
                # until the next save last.pt would name the damaged data (evaluate --checkpoint last, a copy)
                self._point_last(path)
            for b in bad if quarantine else ():
                if b.name != "last.pt":  # last.pt was relinked above
                    aside, i = b.with_name(b.name + ".corrupt"), 1
                    while aside.exists():  # an earlier corrupt copy of the same step stays too
                        aside, i = b.with_name(f"{b.name}.corrupt.{i}"), i + 1
                    os.replace(b, aside)
                    log.warning("moved %s aside to %s", b.name, aside.name)
            return state, path
        if bad:
            raise CheckpointError(f"every checkpoint in {self.folder} is unusable ({', '.join(p.name for p in bad)}); "
                                  f"rerun with checkpoint.resume=never to start fresh (they are moved to checkpoints.oldN/, "
                                  f"not deleted), or give another {folder_key}")
        return None

    def nothing_to_resume(self) -> ConfigError:
        """checkpoint.resume=must with no checkpoint here (submit's look ahead and the trainer say it alike)."""
        return ConfigError(f"checkpoint.resume=must but {self.folder} holds no checkpoint; give the run folder that "
                           f"has them (hydra.run.dir), or checkpoint.resume=auto to start this run")

    def move_aside(self, also: tuple[Path, ...] | list[Path] = ()) -> Optional[Path]:
        """For checkpoint.resume=never: keep the old run whole (never delete, never overwrite), start with an empty
        folder. The files in `also` move into the checkpoint folder first, which then becomes `checkpoints.oldN/`
        in one rename. A start killed part-way leaves them in checkpoints/ with ASIDE_MARKER, and any next start
        finishes the move (`interrupted_aside`): one oldN holds the run, not two, and no resume reads the half-moved
        folder as its own. A checkpoints/ that links elsewhere (scratch) stays the user's link: its target becomes
        `<target>.oldN`, which `checkpoints.oldN` links to, and an empty target is made again."""
        folder = self.folder
        if renamed_aside(folder):  # a start killed between the target's rename and its mkdir
            Path(os.path.realpath(folder)).mkdir()
            for marker in _aside_targets(folder):
                marker.unlink(missing_ok=True)
        for part in folder.glob(f".*{_PART}"):  # a killed start's copy across file systems: its original is whole
            shutil.rmtree(part) if part.is_dir() and not part.is_symlink() else part.unlink()
        present = [p for p in also if os.path.lexists(p)]
        if not (folder.is_dir() and any(folder.iterdir())) and not present:
            return None
        folder.mkdir(exist_ok=True)
        (folder / ASIDE_MARKER).touch()  # first: until the rename, checkpoints/ holds a run half set aside
        fsync_dir(folder)
        for p in present:
            _move_into(p, folder)
        fsync_dir(folder)
        if folder.is_symlink():
            dest = _move_target_aside(folder)
        else:
            dest = _free_aside(folder)
            os.rename(folder, dest)
            fsync_dir(folder.parent)
        (dest / ASIDE_MARKER).unlink(missing_ok=True)
        return dest

    def interrupted_aside(self) -> bool:
        """A start with checkpoint.resume=never was stopped while it set the old run aside (its marker is here, or
        checkpoints/ links to a target it renamed aside): the next start finishes that, whatever its own mode."""
        return half_set_aside(self.folder)


_PART = ".aside-part"  # the copy of a file moved aside across file systems, until it is whole


def _free_aside(folder: Path) -> Path:
    """The first `checkpoints.oldN` not taken (a dangling link takes its name too)."""
    i = 1
    while os.path.lexists(dest := folder.with_name(f"{folder.name}.old{i}")):
        i += 1
    return dest


def _move_into(src: Path, folder: Path) -> None:
    """`src` into `folder`, never over a file there: a copy left by a start killed after copying it, before
    removing the original, stays beside as `name.1`. Across file systems (checkpoints/ on scratch) a copy,
    renamed whole into place, then the original removed."""
    name, i = src.name, 0
    while os.path.lexists(folder / name):
        i += 1
        name = f"{src.name}.{i}"
    try:
        os.rename(src, folder / name)  # `name` is free: a rename replaces nothing
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    part = folder / f".{name}{_PART}"
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, part, symlinks=True)
    else:
        shutil.copy2(src, part, follow_symlinks=False)
    fsync_dir(folder)
    os.rename(part, folder / name)
    shutil.rmtree(src) if src.is_dir() and not src.is_symlink() else src.unlink()


def _move_target_aside(link: Path) -> Path:
    """`link`'s target to `<target>.oldN` beside it (one rename on its own file system), linked from
    `checkpoints.oldN` (relative where `link` is), and an empty target made for the new run. The new link comes
    first: a start killed after the rename leaves the old run reachable, and the next start takes that N again."""
    target, text = Path(os.path.realpath(link)), os.readlink(link)
    head, tail = os.path.split(text.rstrip("/"))
    same_place = tail == target.name and os.path.realpath(os.path.join(link.parent, head or ".")) == str(target.parent)
    i = 1
    while True:
        dest, moved = link.with_name(f"{link.name}.old{i}"), target.with_name(f"{target.name}.old{i}")
        points = os.path.join(head, moved.name) if same_place else str(moved)
        if not os.path.lexists(moved) and (not os.path.lexists(dest) or
                                           (dest.is_symlink() and os.readlink(dest) == points)):
            break  # free, or the link a killed start made before it renamed the target
        i += 1
    if not os.path.lexists(dest):
        os.symlink(points, dest)
        fsync_dir(link.parent)
    os.rename(target, moved)
    target.mkdir()
    fsync_dir(target.parent)
    return dest


class _NotRun(Exception):
    """A write queued after one that failed: not run."""


class Writer:
    """Runs checkpoint writes one after another in a background thread (rank 0 only).

    A failed write is raised by the next `submit` or `wait` (the older files stay as they were), and no write
    queued after it runs: the files on disk stay those of one moment of the run (a later epoch's history row
    after a failed one's left a gap in history.csv). `wait()` makes everything submitted durable: call it before
    a requeue, an exit or a status of "completed". At most `depth` writes are pending (5: a periodic save and its
    status.json, the epoch's step file, its best.pt and status.json never wait); more waits, bounding the memory
    of snapshots."""

    def __init__(self, depth: int = 5):
        self.depth = depth
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: list[tuple[str, Future]] = []
        self._halted = threading.Event()  # set by the writer's thread at a failure: later writes do not run
        self.failed = False  # a write failed (raised): what landed before it is the run's newest on disk

    def failing(self) -> bool:
        """A write has failed and not yet been raised (no wait: for the step poll)."""
        return any(fut.done() and fut.exception() is not None for _, fut in self._pending)

    def submit(self, what: str, fn: Callable, *args) -> None:
        self._reap(block_until=self.depth - 1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="allconv-ckpt")
        self._pending.append((what, self._pool.submit(self._run, fn, *args)))

    def _run(self, fn: Callable, *args) -> None:  # in the writer's thread
        if self._halted.is_set():
            raise _NotRun()
        try:
            fn(*args)
        except BaseException:
            self._halted.set()
            raise

    def wait(self) -> None:
        self._reap(block_until=0)

    def close(self) -> None:
        """Wait, then stop the thread; the first failed write is raised after the thread is gone."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _reap(self, block_until: int) -> None:
        """Collect finished writes, blocking on the oldest until at most `block_until` are pending."""
        while self._pending and (len(self._pending) > block_until or self._pending[0][1].done()):
            what, fut = self._pending[0]
            error = fut.exception()  # waits; removed only after, so an interrupt here loses no report
            self._pending.pop(0)
            if error is None:
                continue
            if isinstance(error, _NotRun):  # queued after the failure already raised
                log.warning("%s not written: a write before it failed", what)
                continue
            skipped = [other for other, rest in self._pending if isinstance(rest.exception(), _NotRun)]
            self._pending.clear()
            self.failed = True
            after = f", and the writes queued after it were not made ({', '.join(skipped)})" if skipped else ""
            raise CheckpointError(f"writing {what} failed: {type(error).__name__}: {error}; any checkpoint already "
                                  f"on disk is kept{after} (check free space and permissions of the run "
                                  f"folder)") from error


def check_resume(run_dir: Path, cfg, folder_key: str = "hydra.run.dir",
                 also: Optional[Callable[[dict, Path], None]] = None) -> Optional[dict]:
    """What resuming in run_dir would refuse, found before any work: a checkpoint of another config, a run
    already past cfg.trainer.epochs, checkpoint.resume=must with no checkpoint (ConfigError each). Returns
    the newest checkpoint's train_state, or None (no checkpoint, or resume=never: the old ones move aside).
    CheckpointError when every checkpoint is unusable or one cannot be read. ``folder_key``: the option
    that places the run (hydra.sweep.dir for a sweep's point, where -m refuses hydra.run.dir). ``also``: a further
    check of the checkpoint to resume (its dict, its path), which may raise ConfigError too."""
    ckpt = CheckpointDir(Path(run_dir) / "checkpoints", cfg.checkpoint.keep)
    if ckpt.interrupted_aside():  # the start finishes setting the old run aside, then has nothing to resume
        if cfg.checkpoint.resume == "must":
            raise ConfigError(f"checkpoint.resume=must but a start with checkpoint.resume=never was stopped while it "
                              f"set the old run in {ckpt.folder} aside (its {ASIDE_MARKER} is there): the next start "
                              f"finishes that and trains anew, with nothing to resume; start it with "
                              f"checkpoint.resume=auto, or give another {folder_key}")
        return None
    if cfg.checkpoint.resume == "never":
        return None
    found = ckpt.load_latest(warn=False, folder_key=folder_key)
    if found is None:
        if cfg.checkpoint.resume == "must":
            raise ckpt.nothing_to_resume()
        theirs = recorded_identity(Path(run_dir))  # a run that stopped before its first checkpoint
        if theirs is not None:  # its W&B id and .hydra/ would go on under another config
            cfg.check_resumable(theirs, run_dir, folder_key=folder_key)
        return None
    check_resumable_file(cfg, found[0], found[1], Path(run_dir), folder_key)
    if also is not None:
        also(*found[:2])
    return found[0].get("train_state") or {}


def check_resumable_file(cfg, ck: dict, path: Path, run_dir: Path, folder_key: str = "hydra.run.dir") -> None:
    """cfg.check_resumable on checkpoint ``path``. Where the run's own .hydra/config.yaml is of this config and
    only the checkpoint is not (copied in from another run), the refusal names that file instead of the run."""
    try:
        cfg.check_resumable(ck.get("identity", {}), run_dir, ck.get("train_state"), folder_key=folder_key)
    except OtherConfig as e:
        own = recorded_identity(run_dir, warn=False)
        if own is None:  # nothing else to compare with
            raise
        try:
            cfg.check_resumable(own, run_dir)
        except OtherConfig:
            raise e from None  # the run itself is of another config: said as such
        raise OtherConfig(f"checkpoint {path} is of a different config ({'; '.join(e.diff)}) than its run folder's "
                          f".hydra/config.yaml, which is of this one: copied in from another run? Move it out of "
                          f"{path.parent}; the run then resumes from its own newest checkpoint, or starts over where it has "
                          f"none", e.diff) from None


def earlier_epochs(run_dir: Path, ckpt: CheckpointDir) -> bool:
    """Whether run_dir holds finished epochs of a run (history.csv rows, a best.pt) that has no checkpoint."""
    try:
        rows = len((Path(run_dir) / "history.csv").read_text().splitlines()) > 1  # more than the header
    except FileNotFoundError:
        rows = False
    return rows or (ckpt.folder / "best.pt").is_file()


def recorded_identity(run_dir: Path, warn: bool = True) -> Optional[dict]:
    """The identity of a run set up in run_dir that has no checkpoint (it stopped before its first, or its
    checkpoints were removed: the trainer then moves its finished epochs aside to start over, under the same
    config only), from its .hydra/config.yaml (written once it was set up); None when there is none, or it
    does not read as a config of this version (said unless not ``warn``)."""
    cfg = recorded_config(run_dir, warn)
    return None if cfg is None else cfg.identity()


def recorded_config(run_dir: Path, warn: bool = True):
    """The Config in run_dir's .hydra/config.yaml; None as for `recorded_identity`."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf
    try:
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if not doc:  # no keys: from_dict would make it the defaults' config, which this run may not be
            raise ValueError("it is empty: a write cut short, by a full disk?")
        return from_dict(doc)
    except Exception as e:  # hand-edited or of another version: nothing to compare with, as before it was kept
        if not warn:
            return None
        log.warning("%s does not read as a config (%s), so the run there cannot be compared with this config: were "
                    "it of another one, this start would take it over (its finished epochs, if any, moved aside "
                    "first); give a new run folder if unsure", path,
                    str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return None
