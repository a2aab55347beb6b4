"""CIFAR-10/100 and synthetic data as uint8 tensors, plus DDP-sharded device batches.

The official python-pickle layout is read by our own loader (not torchvision's), because
torchvision checks the md5 of every file against the official release and so refuses any
other copy in the same format (rebuilt, subset or test files). torchvision is used only to
download, when data.download=true.

Whole splits live in memory as uint8 [N,3,32,32] (150 MB for CIFAR-10 train) and, for
training, on the device (as uint8, or whitened float32 with data.preprocess=gcn_zca): batches are
gathered, augmented and normalised there, so there are no DataLoader workers and no per-sample
Python work.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import shlex
import shutil
import socket
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from . import augment as aug
from .config import SYNTHETIC_SIZES, ConfigError, DataConfig
from .fsio import name_too_long


class DataError(ConfigError):
    """Data that is missing, corrupt or cannot be subset as asked; a one-line message with the fix."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N,3,32,32], CPU
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    test: Split
    mean: tuple[float, float, float]  # per channel, [0, 1] pixel units
    std: tuple[float, float, float]
    classes: list[str]
    val: Split | None = None  # data.val_size > 0: training images held out, never trained on


@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    archive: str                    # the release's python version, as downloaded (for a hint when not extracted)
    binary: str                     # the folder of the release's binary (C) version, which this does not read


# Fixed normalisation constants (the commonly published training-set statistics), so a subset or
# a rebuilt copy normalises exactly like the full official set.
_LAYOUTS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                       ("test_batch",), "batches.meta", "labels", "label_names", 10,
                       (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                       "cifar-10-python.tar.gz", "cifar-10-batches-bin"),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta",
                        "fine_labels", "fine_label_names", 100,
                        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                        "cifar-100-python.tar.gz", "cifar-100-binary"),
}


def _layout(name: str) -> _Layout:
    if name not in _LAYOUTS:
        raise DataError(f"data.name={name!r} has no file layout (one of {', '.join(_LAYOUTS)})")
    return _LAYOUTS[name]


def expected_files(cfg: DataConfig) -> tuple[Path, list[str]]:
    """The folder the dataset must be in and the files it must hold (synthetic: root, none)."""
    root = Path(cfg.root).expanduser().absolute()
    if cfg.name == "synthetic":
        return root, []
    lay = _layout(cfg.name)
    return root / lay.folder, [*lay.train, *lay.test, lay.meta]


def _missing(cfg: DataConfig) -> tuple[Path, list[str], list[str]]:
    folder, files = expected_files(cfg)
    said = name_too_long(folder)
    if said:  # no such folder can exist; is_file() would raise "File name too long"
        raise DataError(f"data.root: {said}; give the folder that holds {folder.name}")
    return folder, files, [f for f in files if not (folder / f).is_file()]


def check_present(cfg: DataConfig, fix: Optional[str] = None, root_option: str = "data.root=") -> None:
    """Cheap existence check (nothing is read) so a job fails before it queues or forms a group. `fix`: the
    way out to name instead of data.root / data.download, and `root_option` how to give the root, for a
    command with other options (evaluate's --data-root, whose run's data group is fixed)."""
    if not cfg.download or not _missing(cfg)[2]:  # with download=true, load() fetches what is missing (not a
        _require(cfg, fix, root_option)  # file cut short among files all there)
    else:
        _not_a_file(cfg, root_option)  # nothing could be downloaded into a file


def _not_a_file(cfg: DataConfig, root_option: str) -> None:
    root = Path(cfg.root).expanduser()
    if cfg.name != "synthetic" and root.exists() and not root.is_dir():  # generated data reads no folder
        lay = _layout(cfg.name)
        up = root.parent.parent if root.parent.name == lay.folder else root.parent
        raise DataError(f"{root_option}{root} is a file, not a folder: give the folder that holds {lay.folder} "
                        f"(try {root_option}{up})")


def _require(cfg: DataConfig, fix: Optional[str] = None, root_option: str = "data.root=") -> None:
    folder, files, missing = _missing(cfg)  # first: a name too long for the file system is said as such
    _not_a_file(cfg, root_option)
    cut = [f for f in files if f not in missing and not _ends_whole(folder / f)]
    if cut:  # an interrupted copy: found at once, not by the job after its wait in the queue
        raise DataError(f"{', '.join(str(folder / f) for f in cut)}: empty, cut short or damaged (it does not end as "
                        f"a pickle does: an interrupted copy?); copy the official python version there again")
    if not missing:
        return
    lay = _layout(cfg.name)
    hint = ""
    if (folder.parent / files[0]).is_file():  # root points at the batches folder itself
        hint = f" (the root looks one level too deep: try {root_option}{folder.parent.parent})"
    elif (folder / lay.folder / files[0]).is_file():  # extracted into a folder of that name (tar -C it)
        hint = f" (the files are one level further down, in {folder / lay.folder}: try {root_option}{folder})"
    elif len(down := sorted(p for p in folder.parent.glob(f"*/{lay.folder}/{files[0]}")  # root one level too high
                            if not p.parent.parent.name.startswith("."))) == 1:  # (not a download's own folder)
        hint = (f" (the root looks one level too high, the files are in {down[0].parent}: try "
                f"{root_option}{down[0].parent.parent})")
    other = [n for n, o in _LAYOUTS.items() if n != cfg.name and (folder.parent / o.folder).is_dir()]
    if other:  # the other CIFAR is there: the wrong data group, not a missing download
        hint += (f" ({folder.parent} holds {_LAYOUTS[other[0]].folder}: did you mean data={other[0]}?)"
                 if root_option == "data.root=" else f" ({folder.parent} holds {_LAYOUTS[other[0]].folder}, "
                                                     f"but the run trained on {cfg.name})")
    archive = folder.parent / lay.archive
    if archive.is_file():  # downloaded by hand, not unpacked
        hint += f" ({archive.name} is there, not extracted: tar -xzf {shlex.quote(str(archive))} -C " \
                f"{shlex.quote(str(folder.parent))})"
    binary = folder.parent / lay.binary
    if binary.is_dir():  # the C version of the release
        hint += f" ({binary.name} is the binary version; this reads the python version, {archive.name})"
    env = os.environ.get("ALLCONV_DATA")
    if env and root_option == "data.root=" and (os.path.normpath(Path(env).expanduser().absolute())
                                                == os.path.normpath(Path(cfg.root).expanduser().absolute())):
        hint += " (data.root came from the environment's ALLCONV_DATA)"
    fix = fix or (f"Put the official python version there, set data.root=<folder holding {lay.folder}>, or "
                  f"data.download=true on a machine with network")
    raise DataError(f"{lay.title} not found: expected {folder} with {', '.join(files)} (missing: "
                    f"{', '.join(missing)}). {fix}{hint}.")


def _ends_whole(path: Path) -> bool:
    """A pickle ends with its STOP opcode: a file cut short almost never does. One byte read, not the file."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    except OSError:  # unreadable: load() names it
        return True


# ----------------------------------------------------------------------------- reading

def _get(d: Any, key: str, path: Path) -> Any:
    """A value under b"key" (encoding="bytes", the Python 2 files) or "key" (Python 3 writers)."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise DataError(f"{path} is not a CIFAR python batch: no {key!r} entry; re-create or re-download it")


# What a CIFAR batch's pickle may name: numpy's array and scalar rebuilding (numpy 1's and 2's module paths;
# _frombuffer for protocol 5) and Python 3's bytes under protocol 2 (_codecs.encode of a str, bytes()). Any other global is
# refused: unpickling calls what a pickle names, so a file planted in a shared data folder would run its code on
# the login node (submit) and on every rank.
_CIFAR_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("__builtin__", "bytes"),
                  ("builtins", "bytes"),
                  *((f"numpy.{core}.{mod}", fn) for core in ("core", "_core")
                    for mod, fn in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")))}


class _Unpickler(pickle.Unpickler):
    """Builds numpy arrays and plain data, nothing else (_CIFAR_GLOBALS). The official files name
    numpy.core.multiarray (numpy 1); numpy 2 keeps numpy.core only as a deprecated alias of numpy._core, which a
    later numpy may drop: then the arrays come from numpy._core."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds; refused unread, as "
                                         f"loading it could run code")
        if module == "numpy.core" or module.startswith("numpy.core."):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _Unpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged pickle can raise almost anything (EOFError, UnpicklingError, ...)
        said = (str(e).splitlines()[0] if str(e).strip() else  # a bare MemoryError: a damaged length field
                "a size field in it is damaged: it asks for more memory than there is"
                if isinstance(e, MemoryError) else "its bytes are damaged")
        raise DataError(f"{path} is corrupt or not a CIFAR python pickle ({type(e).__name__}: {said}); "
                        f"re-create or re-download it") from None


def _read_batch(path: Path, lay: _Layout) -> Split:
    d = _unpickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, lay.label_key, path))
    if labels.size == 0:  # an empty batch file: [] comes back as float64
        labels = labels.astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} is corrupt: data is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} is corrupt: {len(data)} images but labels of shape {list(labels.shape)}"
                        f" ({labels.dtype})")
    if len(labels) and (labels.min() < 0 or labels.max() >= lay.num_classes):
        raise DataError(f"{path} is corrupt: labels outside 0..{lay.num_classes - 1}")
    # [N, 3072] holds R, G, B planes of 32x32 row-major: a plain reshape gives [N, 3, 32, 32]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def _read_split(folder: Path, files: Sequence[str], lay: _Layout) -> Split:
    parts = [_read_batch(folder / f, lay) for f in files]
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _read_classes(path: Path, lay: _Layout) -> list[str]:
    names = _get(_unpickle(path), lay.names_key, path)
    if not isinstance(names, (list, tuple)) or len(names) != lay.num_classes:
        raise DataError(f"{path} is corrupt: expected {lay.num_classes} {lay.names_key}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


# a transfer that sends nothing for this long is dead: torchvision's urlopen has no timeout, and hung a rank for good
DOWNLOAD_STALL_S = 60.0
DOWNLOAD_PREFIX = ".allconv-download-"  # a download's own folder in the root, moved in when whole
STALE_DOWNLOAD_S = 24 * 3600  # such a folder this old is a killed download's (one takes minutes)


def _download_prefix() -> str:
    return f"{DOWNLOAD_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _killed_here(name: str) -> bool:
    """A download folder of this host whose process is gone (killed: SIGKILL, an OOM): ~350 MB freed now, not a day
    later. Another host's, or one whose pid is alive (perhaps reused), waits for its age."""
    host, _, rest = name[len(DOWNLOAD_PREFIX):].rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


def _idle_s(d: Path) -> float:
    """Seconds since anything in `d` was written (a live download writes at least every DOWNLOAD_STALL_S)."""
    return time.time() - max(p.lstat().st_mtime for p in (d, *d.rglob("*")))


def _remove_stale_downloads(root: Path) -> None:
    for d in root.glob(DOWNLOAD_PREFIX + "*"):
        with contextlib.suppress(OSError):
            # idle too, lest a pid in another PID namespace (a container on this host) read as gone
            if (_killed_here(d.name) and _idle_s(d) > 2 * DOWNLOAD_STALL_S
                    or time.time() - d.stat().st_mtime > STALE_DOWNLOAD_S):
                shutil.rmtree(d, ignore_errors=True)


def _make_root(root: Path, made: list[Path]) -> None:
    """`root` made a level at a time, each folder this call made put first in `made` (deepest first: what a failed
    download takes away, also where a level fails). Made, not found missing: /x/new/../mine makes /x/new (mine
    is then found there), never mine."""
    for p in (*reversed(root.parents), root):
        if not p.is_dir():
            try:
                p.mkdir()
            except FileExistsError:  # another process's, just made: not ours to take away
                continue
            made.insert(0, p)


def _move_in(src: Path, dst: Path) -> None:
    """`src` to `dst` whole: a rename, or where `dst`'s folder is another file system (a symlink to scratch, a
    bind mount) a copy beside `dst` renamed onto it."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        part = dst.with_name(f"{DOWNLOAD_PREFIX}{dst.name}.part")
        try:
            shutil.copyfile(src, part)
            os.replace(part, dst)
        finally:
            part.unlink(missing_ok=True)


def _download(cfg: DataConfig) -> None:
    """Fetched and unpacked in a folder of its own inside the root, then moved in a file at a time (each rename
    atomic): a sweep's tasks on one node, or a node whose stale cache missed the files, read whole files or none,
    never one being written, and a failed download leaves nothing behind (a bad archive read as one unpacked
    by hand)."""
    root = Path(cfg.root).expanduser().absolute()
    title = _layout(cfg.name).title
    try:
        import torchvision  # only here: reading never needs it
    except Exception as e:  # not installed, or built for another torch ("operator torchvision::nms does not exist")
        msg = str(e).splitlines()[0] if str(e).strip() else "no detail given"
        raise DataError(f"data.download=true needs torchvision, whose import failed ({type(e).__name__}: {msg}); "
                        f"install the torchvision release that matches torch {torch.__version__}, or copy the "
                        f"official python version of {title} into {root} and set data.download=false") from None
    from torchvision.datasets.utils import check_integrity
    tmp, before, bad_copy, made, whole = None, socket.getdefaulttimeout(), False, [], False
    try:
        cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
        try:  # no network fault: said as what it is (it read as "this machine may have no network")
            _make_root(root, made)
            tmp = Path(tempfile.mkdtemp(prefix=_download_prefix(), dir=root))
        except OSError as e:
            raise DataError(f"cannot make a folder to download {title} into, in {root} ({type(e).__name__}: {e}); "
                            f"give a data.root this user can write, or copy the official python version there and "
                            f"set data.download=false") from None
        try:
            _remove_stale_downloads(root)
            copied = root / cls.filename
            if copied.is_file():  # one there already (copied by hand): unpacked offline; a bad one is fetched anew
                bad_copy = not check_integrity(str(copied), cls.tgz_md5)
                if not bad_copy:  # torchvision checks the copy's md5 again, and fetches where it is missing
                    shutil.copy2(copied, tmp / cls.filename)
            socket.setdefaulttimeout(DOWNLOAD_STALL_S)
            cls(str(tmp), train=True, download=True)  # fetches and unpacks the whole archive
        except Exception as e:  # URLError, timeouts, md5 mismatch
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            also = (f"; the {cls.filename} already there is not the official release (its md5 differs: cut short, or "
                    f"another file), so it was fetched anew: copy the official one there again") if bad_copy else ""
            raise DataError(f"downloading {title} into {root} failed ({type(e).__name__}: {msg}){also}; this machine"
                            f" may have no network: copy the official python version there instead and set"
                            f" data.download=false") from None
        try:
            for entry in tmp.iterdir():  # the archive, and the folder of batches
                if entry.is_dir():
                    (root / entry.name).mkdir(exist_ok=True)
                    for f in entry.iterdir():
                        os.utime(tmp)  # alive (_idle_s): the unpacked files bear the release's dates, a copy
                        _move_in(f, root / entry.name / f.name)  # onto another file system writes nothing here
                else:
                    os.utime(tmp)
                    _move_in(entry, root / entry.name)
        except OSError as e:  # no network fault: a full disk, permissions
            raise DataError(f"{title} was downloaded, but moving it into {root} failed ({type(e).__name__}: {e}); "
                            f"check free space and permissions there, or copy the official python version there "
                            f"and set data.download=false") from None
        whole = True
    finally:
        socket.setdefaulttimeout(before)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made if not whole else ():  # a mistyped data.root leaves no empty folders behind
            with contextlib.suppress(OSError):
                p.rmdir()


def _subset(split: Split, size: int | None, seed: int, key: str) -> Split:
    """A fixed seeded subset (sorted, so it keeps the file order): first k of randperm(seed)."""
    return split if size is None else _split_off(split, size, seed, key)[0]


def _split_off(split: Split, size: int, seed: int, key: str) -> tuple[Split, Split]:
    """(the first `size` of randperm(seed), the rest), each sorted so it keeps the file order."""
    n = len(split)
    if size > n:  # load() checked the sizes first (_check_sizes); a safety net for other callers
        raise DataError(f"data.{key}={size} is larger than the {n} images available; use <= {n} or null for all")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed & aug.SEED_MASK))
    take, rest = perm[:size].sort().values, perm[size:].sort().values
    return Split(split.images[take], split.labels[take]), Split(split.images[rest], split.labels[rest])


def to_download(cfg: DataConfig) -> bool:
    """Files missing and data.download=true: what fetch_if_missing downloads."""
    return cfg.name != "synthetic" and cfg.download and bool(_missing(cfg)[2])


def fetch_if_missing(cfg: DataConfig) -> None:
    """Download the dataset when files are missing and data.download=true (one rank per job calls it)."""
    if to_download(cfg):
        _download(cfg)


def fetch_for_submit(cfg: DataConfig) -> None:
    """`submit`: what the jobs would download, fetched once on this host before the queue (a login node has
    network, compute nodes often none; and a sweep's jobs would all write the same archive at once), then
    checked as if data.download were false."""
    fetch_if_missing(cfg)
    _require(cfg)


# The evaluation images never depend on the run's seed: a seed sweep with data.test_size or
# data.val_size set (or on synthetic data) scores every run on the same images.
_TEST_SEED = 0
_VAL_SEED = 1


def load(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset named by cfg as uint8 CPU tensors; a train subset and synthetic training data
    depend on seed, the test and held-out validation images never do."""
    if cfg.name == "synthetic":
        return synthetic(cfg.train_images, cfg.test_size or SYNTHETIC_SIZES[1], seed, cfg.val_size)
    lay = _layout(cfg.name)
    folder = expected_files(cfg)[0]
    fetch_if_missing(cfg)
    _require(cfg)
    train, val = _read_split(folder, lay.train, lay), None
    test = _read_split(folder, lay.test, lay)
    _check_sizes(cfg, len(train), len(test), folder)
    if cfg.val_size:  # held out first, so that train_size subsets what is left, seed by seed
        val, train = _split_off(train, cfg.val_size, _VAL_SEED, "val_size")
    train = _subset(train, cfg.train_size, seed, "train_size")
    test = _subset(test, cfg.test_size, _TEST_SEED, "test_size")
    return Dataset(train, test, lay.mean, lay.std, _read_classes(folder / lay.meta, lay), val)


def fingerprint(ds: Dataset) -> dict:
    """Each split's image count and CRC-32s of its images and of its labels (0.04 s for CIFAR-10 here; a
    cryptographic hash took 0.2 s of a resume's start), recorded in the checkpoints: a resume checks that it trains
    on the images its checkpoint did. The same files moved or copied (to a node's own disk) give the same; a
    rebuilt or another dataset, or other subsets, do not (what is guarded against is a mix-up, not tampering)."""
    return {"train": split_print(ds.train), "val": split_print(ds.val), "test": split_print(ds.test)}


def split_print(s: Optional[Split]) -> Optional[str]:
    """One split's part of `fingerprint`: "<count>:<crc of images><crc of labels>"."""
    if s is None:
        return None
    crcs = (zlib.crc32(memoryview(t.contiguous().numpy()).cast("B")) for t in (s.images, s.labels))
    return f"{len(s)}:" + "".join(f"{c:08x}" for c in crcs)


_SPLIT_WORDS = {"train": "training", "val": "held-out (data.val_size)", "test": "test"}


def other_images(then: Optional[dict], now: dict) -> list[str]:
    """What differs between two fingerprints, split by split ([] where the same, or none was recorded)."""
    if not isinstance(then, dict):  # a checkpoint written before they were recorded
        return []
    out = []
    for k, word in _SPLIT_WORDS.items():
        a, b = then.get(k), now.get(k)
        if a != b:
            n_a, n_b = (str(x).split(":")[0] if x else "none" for x in (a, b))
            out.append(f"{word} images: {n_a} then, {n_b} now" + (", other images" if n_a == n_b else ""))
    return out


def _check_sizes(cfg: DataConfig, n_train: int, n_test: int, folder: Path,
                 drop_last_batch: Optional[int] = None) -> None:
    """The files' image counts against data.val_size, train_size and test_size, and the batch that
    trainer.drop_last keeps whole (None without it)."""
    lay = _layout(cfg.name)
    for name, n, files in (("training", n_train, lay.train), ("test", n_test, lay.test)):
        if not n:  # a copy cut short: fail now, not with a division by zero after an epoch
            raise DataError(f"{folder} holds no {name} images ({', '.join(files)} are empty); copy the "
                            f"dataset there again")
    if cfg.val_size and cfg.val_size >= n_train:
        raise DataError(f"data.val_size={cfg.val_size} leaves none of the {n_train} training images in "
                        f"{folder}; lower it")
    left = n_train - (cfg.val_size or 0)
    after = f" after data.val_size={cfg.val_size}" if cfg.val_size else ""
    for key, size, n, where in (("train_size", cfg.train_size, left, after), ("test_size", cfg.test_size, n_test, "")):
        if size is not None and size > n:
            raise DataError(f"data.{key}={size} is larger than the {n} images available{where}; use <= {n} or "
                            f"null for all")
    used = left if cfg.train_size is None else cfg.train_size
    if drop_last_batch is not None and drop_last_batch > used:  # a copy smaller than the config says (a cut one)
        raise DataError(_no_step(drop_last_batch, used, f" in {folder}"))


def _no_step(global_batch: int, n: int, where: str = "") -> str:
    return (f"trainer.batch_size={global_batch} with trainer.drop_last=true leaves no step for {n} training "
            f"images{where}; lower the batch size or set trainer.drop_last=false")


def check_files(cfg: DataConfig, drop_last_batch: Optional[int] = None) -> None:
    """The dataset's files read and checked as a job would read them (shapes, labels, class names, what the
    pickles name) and data.val_size / train_size / test_size (and the batch trainer.drop_last keeps whole: it
    must leave a step) against them, for `submit`: a job must not wait
    in the queue to learn that a file is damaged inside or its subset is larger than the data. About a second
    for CIFAR, once per folder for a sweep; nothing when a file is missing (check_present, or a download in
    the job, deals with those)."""
    if cfg.name == "synthetic":
        return
    folder, files, missing = _missing(cfg)
    if missing:
        return
    stamp = tuple((f, st.st_mtime_ns, st.st_size) for f in files for st in [(folder / f).stat()])
    _check_sizes(cfg, *_checked_counts(folder, cfg.name, stamp), folder, drop_last_batch)


@lru_cache(maxsize=8)
def _checked_counts(folder: Path, name: str, stamp: tuple) -> tuple[int, int]:
    """(training, test) image counts of the files in `folder`, each file checked whole; `stamp` (names, mtimes,
    sizes) keys the cache."""
    lay = _layout(name)
    _read_classes(folder / lay.meta, lay)
    return tuple(sum(len(_read_batch(folder / f, lay).labels) for f in part) for part in (lay.train, lay.test))


# ----------------------------------------------------------------------------- synthetic data

_PALETTE = torch.tensor([[230, 40, 40], [40, 200, 40], [50, 70, 230], [230, 220, 40], [40, 210, 220],
                         [220, 50, 210], [240, 140, 30], [120, 40, 160], [200, 200, 200], [90, 60, 30]],
                        dtype=torch.float32)
_SQUARE = 12  # side of the class-coloured square
_NOISE = 30.0  # per-pixel Gaussian noise, in 0..255 units
_CORNERS = torch.tensor([[2, 2], [2, 10], [2, 18], [10, 2], [10, 10], [10, 18], [18, 2], [18, 10],
                         [18, 18], [6, 14]])  # top-left (y, x) of each class's square


def _synthetic_split(n: int, seed: int) -> Split:
    """Balanced, learnable images: a square of the class colour at a class position (jittered by
    +-2 px) on a random-grey, noisy background. Grey level, brightness jitter and noise blur the
    global colour statistics, so a CNN has to find the square: test_data's 3-conv CNN reaches ~90% in
    3 short epochs, not in the first few steps (the first version, colour alone, was solved at once).
    The deeper All-CNNs take longer, so the README's 3-epoch smoke run checks the plumbing only."""
    g = torch.Generator().manual_seed(seed & aug.SEED_MASK)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]  # counts differ by at most 1
    corner = _CORNERS[labels] + torch.randint(-2, 3, (n, 2), generator=g)
    ys = torch.arange(32).view(1, 32, 1)
    xs = torch.arange(32).view(1, 1, 32)
    y0, x0 = corner[:, 0].view(n, 1, 1), corner[:, 1].view(n, 1, 1)
    inside = (ys >= y0) & (ys < y0 + _SQUARE) & (xs >= x0) & (xs < x0 + _SQUARE)  # [n, 32, 32]
    colour = _PALETTE[labels].view(n, 3, 1, 1) * (0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g))
    background = 120 * torch.rand(n, 1, 1, 1, generator=g)  # a random grey: the colour is the square's
    img = torch.where(inside.unsqueeze(1), colour, background)
    img = img + _NOISE * torch.randn(n, 3, 32, 32, generator=g)
    return Split(img.round().clamp_(0, 255).to(torch.uint8), labels.to(torch.int64))


def synthetic(train_size: int, test_size: int, seed: int, val_size: int = 0) -> Dataset:
    """Training images deterministic in seed; test and validation images the same for every seed
    (odd streams, never a training one)."""
    train = _synthetic_split(train_size, seed * 2)
    test = _synthetic_split(test_size, _TEST_SEED * 2 + 1)
    val = _synthetic_split(val_size, _VAL_SEED * 2 + 1) if val_size else None
    x = train.images.to(torch.float32) / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return Dataset(train, test, mean, std, [f"synthetic_{i}" for i in range(10)], val)


# ----------------------------------------------------------------------------- writing

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str`, as the official (Python 2) files hold them, so that
    pickle.load(f, encoding="bytes") gives b"data" keys and encoding="latin1" gives "data"."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((b"U" + bytes([n]) if n < 256 else b"T" + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":  # the official files' module path
            self.write(b"cnumpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _array(t: Any) -> np.ndarray:
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _np(t: Any, dtype: Any) -> np.ndarray:
    return _array(t).astype(dtype, copy=False)


def _check_images(images: Any, labels: Any, split: str) -> None:
    """ValueError unless `images` are [N,3,32,32] (or [N,3072], the files' rows) of whole numbers 0-255 with N
    labels: channels-last images, or floats in [0, 1], were written as other pictures without a word."""
    x, n = _array(images), len(labels)
    if x.shape not in ((n, 3, 32, 32), (n, 3072)):
        hint = (": channels last; give x.transpose(0, 3, 1, 2) (numpy) or x.permute(0, 3, 1, 2) (torch)"
                if x.shape == (n, 32, 32, 3) else "")
        raise ValueError(f"write_cifar: {split} images of shape {tuple(x.shape)}, for {n} labels; give [N, 3, 32, 32] "
                         f"(or [N, 3072]){hint}")
    if x.dtype.kind not in "uif" or (x.size and (x.min() < 0 or x.max() > 255 or (x != np.round(x)).any()
                                                  or x.dtype.kind == "f" and x.max() <= 1)):  # ([0, 1] scaled)
        lo, hi = (x.min(), x.max()) if x.size and x.dtype.kind in "uif" else ("?", "?")
        raise ValueError(f"write_cifar: {split} images of {x.dtype}, values {lo}..{hi}; give whole numbers 0-255 "
                         f"(e.g. (x * 255).round() of images in [0, 1], as uint8)")


def write_cifar(root: str | Path, name: str, train_images: Any, train_labels: Any, test_images: Any,
                test_labels: Any, classes: Sequence[str]) -> Path:
    """Write uint8 [N,3,32,32] images in the official layout and pickle dialect; returns the folder.

    CIFAR-10 train is split into 5 batches (sizes as even as tensor_split makes them).
    """
    _check_images(train_images, train_labels, "train")
    _check_images(test_images, test_labels, "test")
    lay = _layout(name)
    folder = Path(root) / lay.folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = lay.label_key.encode()

    def batch(path: Path, images: Any, labels: Any, title: str) -> None:
        x = np.ascontiguousarray(_np(images, np.uint8).reshape(-1, 3072))
        y = [int(v) for v in _np(labels, np.int64).reshape(-1)]
        _dump(path, {b"batch_label": title.encode(), label_key: y, b"data": x, b"filenames": [b""] * len(y)})

    tx, ty = _np(train_images, np.uint8), _np(train_labels, np.int64)
    parts = np.array_split(np.arange(len(ty)), len(lay.train))
    for i, (f, idx) in enumerate(zip(lay.train, parts)):
        batch(folder / f, tx[idx], ty[idx], f"training batch {i + 1} of {len(lay.train)}")
    batch(folder / lay.test[0], test_images, test_labels, "testing batch 1 of 1")
    _dump(folder / lay.meta, {lay.names_key.encode(): [c.encode() for c in classes],
                              b"num_cases_per_batch": len(parts[0]), b"num_vis": 3072})
    return folder


# ----------------------------------------------------------------------------- sharded batches

def _chunk(n: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's part of range(n), exactly as torch.tensor_split(range(n), world)[rank]."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def _order_seed(seed: int, epoch: int, stream: int = aug.ORDER_STREAM) -> int:
    """Shuffle-order generator seed: its own stream, so order and augmentation never meet (`stream`:
    aug.LEGACY_ORDER_STREAM for a run begun before they were apart)."""
    return aug.mix_seed(seed, stream + epoch)


# Images a rank stages at once (see TrainBatches.epoch): 8192 normalised float32 CIFAR images are 100 MB
# (staging peaks at ~140 MB, measured on a CPU, with the augmentation's index tensors); at batch 128, 64 steps.
CHUNK_IMAGES = 8192


class TrainBatches:
    """One epoch = one seeded permutation of all N samples cut into global batches of B; each rank
    takes a contiguous chunk of every global batch (tensor_split), so the union over ranks is the
    global batch exactly and the global batches do not depend on the world size."""

    def __init__(self, images_dev: torch.Tensor, labels_dev: torch.Tensor, global_batch: int, rank: int,
                 world: int, seed: int, augment: str, mean: Sequence[float], std: Sequence[float],
                 drop_last: bool = False, channels_last: bool = False) -> None:
        n = len(labels_dev)
        if images_dev.dtype not in (torch.uint8, torch.float32) or images_dev.dim() != 4 or len(images_dev) != n:
            raise DataError(f"training images must be uint8 or preprocessed float32 [N,3,H,W] matching {n} labels, "
                            f"got {images_dev.dtype} {list(images_dev.shape)}")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside a world of {world}")
        if global_batch < world:
            raise DataError(f"trainer.batch_size={global_batch} is smaller than the {world} ranks; "
                            f"use at least one sample per rank")
        if n == 0:
            raise DataError("there are no training images to train on; check data.train_size and the dataset")
        if drop_last and global_batch > n:
            raise DataError(_no_step(global_batch, n))
        self.images, self.labels = images_dev, labels_dev
        self.n, self.batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.augment, self.fill = seed, augment, aug.augment_mode_fill(augment)
        self.mean, self.std = tuple(mean), tuple(std)
        self.drop_last, self.channels_last = drop_last, channels_last
        self.order_stream = aug.ORDER_STREAM  # the trainer sets a resumed older run's
        # steps staged at once (see epoch): about CHUNK_IMAGES of this rank's images, whole steps
        self.chunk_steps = max(1, CHUNK_IMAGES // max(1, math.ceil(global_batch / world)))

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch if self.drop_last else math.ceil(self.n / self.batch)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of range(N) (CPU int64); the same on every rank."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(_order_seed(self.seed, epoch, self.order_stream)))

    def _bounds(self, step: int) -> tuple[int, int, int]:
        """This rank's [lo, hi) in the epoch order for `step`, and the global batch size."""
        start = step * self.batch
        n_global = min(self.batch, self.n - start)
        lo, hi = _chunk(n_global, self.world, self.rank)
        return start + lo, start + hi, n_global

    def indices(self, epoch: int, step: int) -> torch.Tensor:
        """This rank's sample indices at (epoch, step)."""
        lo, hi, _ = self._bounds(step)
        return self.order(epoch)[lo:hi]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yields (x normalised float, y, n_global) per step from start_step on; skipped steps cost nothing.

        The batches of `chunk_steps` steps are gathered, augmented and normalised together, and each
        step takes a slice: per step the host launches no data kernel at all (on a GPU each launch costs
        microseconds of host time, and at small batches the host, not the GPU, sets the pace). Every op is
        per sample, so a step's batch is bit-identical however the steps are grouped."""
        order = self.order(epoch)  # CPU, like the parameters: a chunk's indices and parameters are picked here
        params = aug.draw_params(self.n, self.seed, epoch, self.augment)
        for first in range(start_step, self.steps_per_epoch, self.chunk_steps):
            steps = [self._bounds(s) for s in range(first, min(first + self.chunk_steps, self.steps_per_epoch))]
            # one rank's steps are contiguous in the order (a slice, no op per step); several ranks' are not
            contiguous = all(a[1] == b[0] for a, b in zip(steps, steps[1:]))
            idx = order[steps[0][0]:steps[-1][1]] if contiguous else torch.cat([order[lo:hi] for lo, hi, _ in steps])
            x, y = self._stage(idx, params)
            at = 0
            for lo, hi, n_global in steps:
                yield x[at:at + hi - lo], y[at:at + hi - lo], n_global
                at += hi - lo

    def _stage(self, idx: torch.Tensor, params: aug.AugParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The model inputs and labels of the samples `idx` (CPU), in that order, on the images' device."""
        dev = self.images.device
        idx_dev = _to_device(idx, dev)
        x = self.images.index_select(0, idx_dev)  # 20x faster than x[idx] for uint8 on CPU
        if self.augment != "none":
            p = params[idx]
            x = aug.apply(x, *(_to_device(t, dev) for t in (p.dx, p.dy, p.flip)), self.fill)
        return model_input(x, self.mean, self.std, self.channels_last), self.labels.index_select(0, idx_dev)


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A CPU tensor on `dev` without a host sync: a copy from pageable memory is staged by the host, so on CUDA
    it goes through page-locked memory (torch's caching host allocator reuses it) and runs asynchronously."""
    if dev.type == "cuda":
        t = t.pin_memory()
    return t.to(dev, non_blocking=True)


def model_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool) -> torch.Tensor:
    """A batch as the model takes it: uint8 pixels normalised per channel; float32 images are already
    preprocessed (data.preprocess=gcn_zca, see preprocess.py) and only change memory format."""
    if x.dtype == torch.uint8:
        return aug.normalize(x, mean, std, channels_last=channels_last)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eval_shard(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous part of range(n) (tensor_split sizes): every sample once across ranks."""
    lo, hi = _chunk(n, world, rank)
    return slice(lo, hi)


def eval_batches(images_dev: torch.Tensor, labels_dev: torch.Tensor, rank: int, world: int,
                 global_eval_batch: int, mean: Sequence[float], std: Sequence[float],
                 channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches over this rank's shard, ceil(global_eval_batch / world) images each. Every
    rank gets the same number of batches (the trainer polls its peers once per batch); a rank whose
    shard ran out gets empty ones at the end."""
    n = len(labels_dev)
    shard = eval_shard(n, rank, world)
    per_rank = max(1, math.ceil(global_eval_batch / world))
    for b in range(math.ceil(math.ceil(n / world) / per_rank)):
        lo = min(shard.start + b * per_rank, shard.stop)
        hi = min(lo + per_rank, shard.stop)
        yield model_input(images_dev[lo:hi], mean, std, channels_last), labels_dev[lo:hi]
