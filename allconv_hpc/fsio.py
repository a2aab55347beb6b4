"""Crash-safe file writes (a reader sees the old file or the new one, never half of one), small JSON records, a
checkpoint's completeness trailer read without torch, and the name limit."""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union


def name_too_long(path: Union[str, Path]) -> Optional[str]:
    """What is wrong when a name in `path` not yet made (or not found) is longer than its file system's NAME_MAX,
    else None: a stat or mkdir of it fails with "File name too long", as an OSError no caller expects."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p) or p == p.parent)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 0
    limit = limit if limit > 0 else 255
    for part in path.relative_to(existing).parts:
        if len(part.encode()) > limit:
            return (f"the name {part[:40]}... is {len(part.encode())} bytes, over the {limit} this file system "
                    f"allows (under {existing})")
    return None


# checkpoint.py's completeness trailer (the file's SHA-256 after it), here to be looked for without torch (status)
CHECKPOINT_MAGIC = b"\nALLCONV-CKPT-SHA256:"
CHECKPOINT_TRAILER_LEN = len(CHECKPOINT_MAGIC) + 64 + 1


def has_trailer(path: Union[str, Path]) -> Optional[bool]:
    """The file ends in a checkpoint's completeness trailer (only its last bytes read): a copy cut short has none.
    None where it cannot be read (missing, EIO, permissions): no answer either way."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < CHECKPOINT_TRAILER_LEN:
                return False
            f.seek(-CHECKPOINT_TRAILER_LEN, os.SEEK_END)
            tail = f.read()
    except OSError:
        return None
    return tail.startswith(CHECKPOINT_MAGIC) and tail.endswith(b"\n")


def same_file(a: Union[str, Path], b: Union[str, Path]) -> bool:
    """`a` and `b` are one file (a hard link: last.pt and its step file); False where either is gone."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# in a run's checkpoints/ while checkpoint.resume=never moves the old run's files into it (checkpoint.move_aside)
ASIDE_MARKER = ".setting-aside"


def aside_targets(link: Path) -> list[Path]:
    """The markers in `<target>.oldN` beside a checkpoints/ link's target: where a start renamed the target aside."""
    import glob
    target = Path(os.path.realpath(link))
    return [p / ASIDE_MARKER for p in target.parent.glob(f"{glob.escape(target.name)}.old*")
            if (p / ASIDE_MARKER).exists()]


def renamed_aside(link: Path) -> bool:
    """`link` (a run's checkpoints/) dangles because a start setting the old run aside renamed its target to
    `<target>.oldN` and was stopped before it made the target again (its marker is still there)."""
    return link.is_symlink() and not link.exists() and bool(aside_targets(link))


def half_set_aside(folder: Path) -> bool:
    """A start with checkpoint.resume=never was stopped while it set the old run in `folder` (a run's checkpoints/)
    aside: its marker is there, or `folder` links to a target it renamed aside. The next start finishes that."""
    return (folder / ASIDE_MARKER).exists() or renamed_aside(folder)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Some network filesystems refuse fsync on a folder; that is
    not worth failing a run for (the rename itself is still atomic)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, exclusive `.<name>.<random>.tmp` next to `path`, created as a plain open() creates a file:
    mode 0o666 less the umask, or what the folder's default ACL gives. Not mkstemp, whose 0600 survives
    the rename and locks group members of a shared project folder out of checkpoints and status files;
    nor a umask read plus chmod, which is process-wide to read and would override a default ACL."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:  # 48 random bits: a clash is a leftover of a killed writer, try another name
            continue
    raise FileExistsError(f"no free temp file name next to {path}")


@contextmanager
def naming(path: Union[str, Path]):
    """Give an OSError raised inside the file's path: write() and fsync() errors (a full disk, a quota)
    carry none, and the error then could not say which file, or that it belongs to the run folder."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_atomic(path: Union[str, Path], data: Union[bytes, str, Callable[[BinaryIO], None]]) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder.
    `data` may be a function that writes into the open file (streaming, no copy in memory)."""
    path = Path(path)
    with naming(path):
        _write_atomic(path, data)


def _write_atomic(path: Path, data: Union[bytes, str, Callable[[BinaryIO], None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def read_json(path: Union[str, Path]) -> dict:
    """A small JSON record (status.json, submission.json), or {} when it is missing, unreadable or not an
    object (a hand-edited `[]`)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
