"""Our own CIFAR reader (official pickle layout and dialect), its errors, subsets, synthetic data,
and the DDP sharding of training and evaluation batches."""
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from allconv_hpc import augment as aug
from allconv_hpc import data
from allconv_hpc.config import ConfigError, DataConfig

C10 = [f"c{i}" for i in range(10)]


def _fake(n: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, classes, (n,), generator=g))


@pytest.fixture
def cifar10(tmp_path):
    (xtr, ytr), (xte, yte) = _fake(23, 10, 0), _fake(7, 10, 1)
    data.write_cifar(tmp_path, "cifar10", xtr, ytr, xte, yte, C10)
    return tmp_path, xtr, ytr, xte, yte


def _cfg(root, name="cifar10", **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), num_classes=100 if name == "cifar100" else 10, **kw)


def test_cifar10_roundtrip_and_layout(cifar10):
    root, xtr, ytr, xte, yte = cifar10
    folder, files = data.expected_files(_cfg(root))
    assert folder == root / "cifar-10-batches-py" and sorted(p.name for p in folder.iterdir()) == sorted(files)
    data.check_present(_cfg(root))
    ds = data.load(_cfg(root), seed=0)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (23, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64 and ds.test.images.shape == (7, 3, 32, 32)
    assert torch.equal(ds.train.images, xtr) and torch.equal(ds.train.labels, ytr)
    assert torch.equal(ds.test.images, xte) and torch.equal(ds.test.labels, yte)
    assert ds.classes == C10 and ds.mean == (0.4914, 0.4822, 0.4465)
    # 5 training batches, as the official release; the file dialect also loads the latin1 way
    with open(folder / "data_batch_3", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    assert set(d) >= {"data", "labels"} and d["data"].shape[1] == 3072 and 0 < len(d["labels"]) < 23


def test_a_train_split_smaller_than_the_five_batch_files_loads(tmp_path):
    (xtr, ytr), (xte, yte) = _fake(3, 10, 4), _fake(2, 10, 5)  # data_batch_4 and _5 hold no image
    data.write_cifar(tmp_path, "cifar10", xtr, ytr, xte, yte, C10)
    ds = data.load(_cfg(tmp_path), seed=0)
    assert torch.equal(ds.train.images, xtr) and torch.equal(ds.train.labels, ytr)


def test_write_cifar_refuses_images_it_would_write_as_other_pictures(tmp_path):
    """Channels-last images, or floats in [0, 1], were written without a word as other pictures (a reshape of
    [N,32,32,3] to [N,3072] mixes the channels; 0.7 as uint8 is 0); now refused, naming the fix."""
    (xtr, ytr), (xte, yte) = _fake(4, 10, 4), _fake(2, 10, 5)
    with pytest.raises(ValueError, match=r"train images of shape \(4, 32, 32, 3\), for 4 labels; give \[N, 3, 32, "
                                         r"32\] \(or \[N, 3072\]\): channels last; give x.transpose"):
        data.write_cifar(tmp_path, "cifar10", xtr.permute(0, 2, 3, 1), ytr, xte, yte, C10)
    with pytest.raises(ValueError, match=r"test images of torch.float32|test images of float32"):
        data.write_cifar(tmp_path, "cifar10", xtr, ytr, xte.float() / 255, yte, C10)
    with pytest.raises(ValueError, match=r"test images of float32, values 0.0..1.0"):  # binarised, in [0, 1] too
        data.write_cifar(tmp_path, "cifar10", xtr, ytr, (xte > 127).float(), yte, C10)
    with pytest.raises(ValueError, match=r"train images of shape \(4, 3, 32, 32\), for 3 labels"):
        data.write_cifar(tmp_path, "cifar10", xtr, ytr[:3], xte, yte, C10)
    assert not (tmp_path / "cifar-10-batches-py").exists()  # refused before any file
    data.write_cifar(tmp_path, "cifar10", xtr.reshape(4, 3072).numpy(), ytr, xte, yte, C10)  # the files' rows
    assert torch.equal(data.load(_cfg(tmp_path), seed=0).train.images, xtr)
    data.write_cifar(tmp_path, "cifar10", xtr.float(), ytr, xte, yte, C10)  # whole numbers as floats: as they are
    assert torch.equal(data.load(_cfg(tmp_path), seed=0).train.images, xtr)


@pytest.mark.parametrize("empty", ["training", "test"])
def test_a_split_without_images_is_refused_at_load(tmp_path, empty):
    (xtr, ytr), (xte, yte) = _fake(0 if empty == "training" else 4, 10, 4), _fake(0 if empty == "test" else 2, 10, 5)
    data.write_cifar(tmp_path, "cifar10", xtr, ytr, xte, yte, C10)
    with pytest.raises(data.DataError, match=f"holds no {empty} images .* copy the dataset there again"):
        data.load(_cfg(tmp_path), seed=0)


def test_cifar100_roundtrip(tmp_path):
    (xtr, ytr), (xte, yte) = _fake(12, 100, 2), _fake(5, 100, 3)
    names = [f"f{i}" for i in range(100)]
    folder = data.write_cifar(tmp_path, "cifar100", xtr, ytr, xte, yte, names)
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    ds = data.load(_cfg(tmp_path, "cifar100"), seed=0)
    assert torch.equal(ds.train.images, xtr) and torch.equal(ds.train.labels, ytr)
    assert torch.equal(ds.test.images, xte) and torch.equal(ds.test.labels, yte)
    assert ds.classes == names and ds.std == (0.2673, 0.2564, 0.2762)


def test_reads_the_official_dialect_written_by_hand(cifar10):
    root, *_ = cifar10
    folder = root / "cifar-10-batches-py"
    # pixel layout: R plane, G plane, B plane, each 32x32 row-major
    img = np.zeros((2, 3, 32, 32), np.uint8)
    img[0, 0, 1, 2], img[0, 1, 3, 4], img[1, 2, 31, 0] = 10, 20, 30
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": [3, 9],
                     b"data": img.reshape(2, 3072), b"filenames": [b"a.png", b"b.png"]}, f, protocol=2)
    ds = data.load(_cfg(root), seed=0)
    assert ds.test.labels.tolist() == [3, 9]
    assert ds.test.images[0, 0, 1, 2] == 10 and ds.test.images[0, 1, 3, 4] == 20 and ds.test.images[1, 2, 31, 0] == 30
    assert int(ds.test.images.sum()) == 60
    # a Python 3 writer's str keys are accepted too
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"labels": [1, 2], "data": img.reshape(2, 3072)}, f)
    assert data.load(_cfg(root), seed=0).test.labels.tolist() == [1, 2]


def test_missing_folder_names_folder_files_and_fix(tmp_path):
    cfg = _cfg(tmp_path / "nowhere")
    with pytest.raises(data.DataError) as e:
        data.check_present(cfg)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "missing: data_batch_1, data_batch_2" in msg and "test_batch" in msg and "batches.meta" in msg
    assert "data.root=" in msg and "data.download=true" in msg
    with pytest.raises(data.DataError, match="cifar-100-python"):
        data.load(_cfg(tmp_path, "cifar100"), seed=0)
    data.check_present(_cfg(tmp_path / "nowhere", download=True))  # download happens in load, not here


def test_a_missing_root_from_allconv_data_is_said_to_come_from_it_however_spelled(tmp_path, monkeypatch):
    """compose records data.root normalised (a/x/../b is a/b): ALLCONV_DATA spelled with .. is still its source."""
    monkeypatch.setenv("ALLCONV_DATA", str(tmp_path / "x" / ".." / "nowhere"))
    with pytest.raises(data.DataError, match=r"\(data.root came from the environment's ALLCONV_DATA\)\.$"):
        data.check_present(_cfg(tmp_path / "nowhere"))


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    """torchvision's own download, with no network (a proxy nothing answers at, also where there is one)."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    import urllib.request
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen keeps its first opener, and its proxies
    with pytest.raises(data.DataError, match="downloading CIFAR-10 into .* failed .*URLError.* no network") as e:
        data.load(_cfg(tmp_path, download=True), seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("broken", [None, RuntimeError("operator torchvision::nms does not exist")])
def test_a_torchvision_that_cannot_be_imported_is_named_not_the_network(tmp_path, monkeypatch, broken):
    """data.download=true where torchvision is missing, or built for another torch: its import failed, not the
    network, and the fix is another torchvision (or the files copied by hand)."""
    import sys
    if broken is None:
        monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ModuleNotFoundError
    else:  # its import raises as one built for another torch does
        monkeypatch.setattr("builtins.__import__", _failing_import(broken))
    with pytest.raises(data.DataError) as e:
        data.load(_cfg(tmp_path / "new", download=True), seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "no network" not in msg, msg
    kind = "ModuleNotFoundError" if broken is None else "RuntimeError: operator torchvision::nms does not exist"
    assert msg.startswith(f"data.download=true needs torchvision, whose import failed ({kind}"), msg
    assert msg.endswith(f"install the torchvision release that matches torch {torch.__version__}, or copy the "
                        f"official python version of CIFAR-10 into {tmp_path / 'new'} and set data.download=false"), msg


def _failing_import(error):
    """__import__ that raises `error` for torchvision, and imports anything else."""
    import builtins
    real = builtins.__import__

    def imp(name, *a, **k):
        if name == "torchvision":
            raise error
        return real(name, *a, **k)
    return imp


def test_a_pickle_with_a_damaged_header_says_what_is_wrong(cifar10):
    """A flipped byte near the start becomes a length of exabytes: a bare MemoryError, once said as
    "(MemoryError: )"."""
    root, *_ = cifar10
    path = root / "cifar-10-batches-py" / "data_batch_3"
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError) as e:
        data.load(_cfg(root), seed=0)
    assert str(e.value) == (f"{path} is corrupt or not a CIFAR python pickle (MemoryError: a size field in it is "
                            f"damaged: it asks for more memory than there is); re-create or re-download it")


def test_an_empty_or_cut_file_is_named_before_anything_is_read(cifar10):
    """submit checks the files before the job waits in the queue: an empty one, or one cut short (a pickle
    ends with its STOP opcode; only the last byte is read)."""
    root = cifar10[0]
    path = root / "cifar-10-batches-py" / "data_batch_3"
    whole = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(data.DataError, match=r"data_batch_3: empty, cut short or damaged \(it does not end as a "
                                              r"pickle does: an interrupted copy\?\); copy the official python"):
        data.check_present(_cfg(root))
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(data.DataError, match=r"data_batch_3: empty, cut short or damaged"):
        data.check_present(_cfg(root))
    path.write_bytes(whole[:-1] + b"\x00")  # its size, random bytes at its end
    with pytest.raises(data.DataError, match=r"data_batch_3: empty, cut short or damaged"):
        data.check_present(_cfg(root))
    # with data.download=true too: every file is there, so none is downloaded, and the load would find it
    with pytest.raises(data.DataError, match=r"data_batch_3: empty, cut short or damaged"):
        data.check_present(_cfg(root, download=True))
    path.write_bytes(whole)
    data.check_present(_cfg(root))
    (root / "cifar-10-batches-py" / "test_batch").unlink()  # one missing: the download fetches the whole archive
    data.check_present(_cfg(root, download=True))


class _Planted:
    """Unpickling this calls os.system: what a file planted in a shared data folder could do."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_a_data_file_that_would_run_code_is_refused_unrun(cifar10, tmp_path):
    """Unpickling calls what a pickle names: only numpy's array rebuilding is let through, for train, the
    submit-time size check (data.train_size) and evaluate alike."""
    root = cifar10[0]
    ran = tmp_path / "ran"
    path = root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps({b"data": _Planted(f"touch {ran}"), b"labels": [1]}, protocol=2))
    with pytest.raises(data.DataError, match=r"data_batch_2 is corrupt or not a CIFAR python pickle .*names "
                                             r"(posix|os)\.system, which no CIFAR batch holds; refused unread"):
        data.load(_cfg(root), seed=0)
    with pytest.raises(data.DataError, match="refused unread"):
        data.check_files(_cfg(root))
    assert not ran.exists()


@pytest.mark.parametrize("damage,msg", [
    ("labels", r"data_batch_4 is corrupt: labels outside 0..9"),
    ("shape", r"data_batch_4 is corrupt: data is uint8 \[3, 3000\], expected uint8 \[N, 3072\]"),
    ("meta", r"batches.meta is corrupt: expected 10 label_names")])
def test_submits_file_check_finds_a_file_damaged_inside(cifar10, damage, msg):
    """A whole pickle (it ends as a pickle does) with wrong contents: submit's check reads the files as a job
    would, so the job does not wait in the queue to fail on them."""
    root = cifar10[0]
    folder = root / "cifar-10-batches-py"
    if damage == "meta":
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}, protocol=2))
    else:
        bad = {b"data": np.zeros((3, 3072 if damage == "labels" else 3000), np.uint8),
               b"labels": [0, 10, 1] if damage == "labels" else [0, 1, 2]}
        (folder / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=2))
    data.check_present(_cfg(root))  # whole files: the cheap check passes them
    with pytest.raises(data.DataError, match=msg):
        data.check_files(_cfg(root))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_batch_pickled_by_numpy_2_under_python_3_loads(cifar10, protocol):
    """Not only the official dialect (numpy.core.multiarray._reconstruct): a batch another tool wrote with this
    numpy (numpy._core paths; protocol 5's _frombuffer) holds only arrays too, and is read."""
    root, xtr = cifar10[0], cifar10[1]
    path = root / "cifar-10-batches-py" / "data_batch_1"
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d = {k.decode(): v for k, v in d.items()}
    d["labels"] = np.asarray(d["labels"], dtype=np.int64)
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    ds = data.load(_cfg(root), seed=0)
    assert torch.equal(ds.train.images, xtr)


def test_one_missing_file_is_named(cifar10):
    root, *_ = cifar10
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(data.DataError, match=r"\(missing: test_batch\)"):
        data.check_present(_cfg(root))


@pytest.mark.parametrize("download", [False, True])
def test_a_root_that_is_a_file_gets_the_root_to_use(cifar10, download):
    """data.root naming a data file: no folder was expected inside it, and no download can go there."""
    root, *_ = cifar10
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(data.DataError, match=rf"^data.root={batch} is a file, not a folder: give the folder that "
                                             rf"holds cifar-10-batches-py \(try data.root={root}\)$"):
        data.check_present(_cfg(batch, download=download))
    data.check_present(_cfg(batch, "synthetic", download=download))  # generated: no folder read, none refused


def test_root_one_level_too_deep_gets_a_hint(cifar10):
    root, *_ = cifar10
    with pytest.raises(data.DataError, match=rf"one level too deep: try data.root={root}\)"):
        data.check_present(_cfg(root / "cifar-10-batches-py"))
    # evaluate gives the root as --data-root, and its run's dataset is fixed
    with pytest.raises(data.DataError, match=rf"one level too deep: try --data-root {root}\)"):
        data.check_present(_cfg(root / "cifar-10-batches-py"), fix="Give --data-root DIR", root_option="--data-root ")
    with pytest.raises(data.DataError, match=rf"\({root} holds cifar-10-batches-py, but the run trained on cifar100\)"):
        data.check_present(_cfg(root, "cifar100"), fix="Give --data-root DIR", root_option="--data-root ")


def test_root_one_level_too_high_gets_a_hint(cifar10, tmp_path):
    """data.root=data where the files are in data/cifar10/cifar-10-batches-py: the folder to give is named, and
    only when one such folder is there (with two, which one is meant is not known)."""
    root, *_ = cifar10
    top = tmp_path / "data"
    (top / "cifar10").mkdir(parents=True)
    (root / "cifar-10-batches-py").rename(top / "cifar10" / "cifar-10-batches-py")
    with pytest.raises(data.DataError, match=rf"\(the root looks one level too high, the files are in "
                                             rf"{top}/cifar10/cifar-10-batches-py: try data.root={top}/cifar10\)\.$"):
        data.check_present(_cfg(top))
    with pytest.raises(data.DataError, match=rf"too high, .*: try --data-root {top}/cifar10\)\.$"):
        data.check_present(_cfg(top), fix="Give --data-root DIR", root_option="--data-root ")
    data.check_present(_cfg(top / "cifar10"))  # what it says to give
    shutil.copytree(top / "cifar10", top / "copy")
    with pytest.raises(data.DataError) as e:
        data.check_present(_cfg(top))
    assert "too high" not in str(e.value)


def test_files_extracted_one_level_too_far_down_get_a_hint(cifar10, tmp_path):
    """tar -xzf ... -C data/cifar-10-batches-py makes data/cifar-10-batches-py/cifar-10-batches-py/."""
    root, *_ = cifar10
    nested = tmp_path / "data" / "cifar-10-batches-py"
    nested.mkdir(parents=True)
    (root / "cifar-10-batches-py").rename(nested / "cifar-10-batches-py")
    down = nested / "cifar-10-batches-py"
    with pytest.raises(data.DataError, match=rf"\(the files are one level further down, in {down}: try data.root="
                                             rf"{nested}\)"):
        data.check_present(_cfg(tmp_path / "data"))
    data.check_present(_cfg(nested))  # what it says to give


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_an_unextracted_archive_or_the_binary_version_gets_a_hint(tmp_path, name):
    archive, binary = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-bin"),
                       "cifar100": ("cifar-100-python.tar.gz", "cifar-100-binary")}[name]
    (tmp_path / archive).write_bytes(b"x")
    with pytest.raises(data.DataError, match=rf"\({archive} is there, not extracted: tar -xzf {tmp_path / archive} "
                                             rf"-C {tmp_path}\)"):
        data.check_present(_cfg(tmp_path, name))
    (tmp_path / binary).mkdir()
    with pytest.raises(data.DataError, match=rf"\({binary} is the binary version; this reads the python version"):
        data.check_present(_cfg(tmp_path, name))


def test_the_other_cifar_in_root_is_named(cifar10):
    root, *_ = cifar10
    with pytest.raises(data.DataError, match=rf"CIFAR-100 not found.*\({root} holds cifar-10-batches-py: did you "
                                             rf"mean data=cifar10\?\)"):
        data.check_present(_cfg(root, "cifar100"))


def test_files_naming_numpy_core_load_where_numpy_has_only_numpy_core_private(cifar10, monkeypatch):
    """The official files (and ours) name numpy.core.multiarray; a numpy without that alias loads them too."""
    import sys
    root, xtr, _, _, _ = cifar10
    assert b"numpy.core.multiarray" in (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    monkeypatch.setitem(sys.modules, "numpy.core.multiarray", None)  # `import` of it now raises ImportError
    with pytest.raises(ImportError):
        import numpy.core.multiarray  # noqa: F401
    assert torch.equal(data.load(_cfg(root), seed=0).train.images, xtr)


def test_corrupt_file_is_named(cifar10):
    root, *_ = cifar10
    path = root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000] + b".")  # truncated mid-array, yet ending as a pickle does
    with pytest.raises(data.DataError, match="data_batch_2 is corrupt"):
        data.load(_cfg(root), seed=0)
    with open(path, "wb") as f:  # loads, but the wrong shape
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(data.DataError, match=r"data_batch_2 is corrupt: data is uint8 \[2, 100\]"):
        data.load(_cfg(root), seed=0)


def test_subsets_are_seeded_sorted_and_checked(cifar10):
    root, xtr, ytr, *_ = cifar10
    a = data.load(_cfg(root, train_size=9, test_size=4), seed=1)
    b = data.load(_cfg(root, train_size=9, test_size=4), seed=1)
    c = data.load(_cfg(root, train_size=9, test_size=4), seed=2)
    assert len(a.train) == 9 and len(a.test) == 4
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.test.images, c.test.images)  # every seed of a sweep scores on the same images
    # a subset keeps file order: its rows appear in the full set in increasing position
    pos = [next(i for i in range(23) if torch.equal(xtr[i], img)) for img in a.train.images]
    assert pos == sorted(pos) and torch.equal(ytr[pos], a.train.labels)
    with pytest.raises(data.DataError, match="data.train_size=24 is larger than the 23"):
        data.load(_cfg(root, train_size=24), seed=0)


def test_check_files_refuses_what_load_would(cifar10):
    """submit's check: the same refusals as load(), from the files' image counts (23 training, test below)."""
    root = cifar10[0]
    for kw, msg in ((dict(train_size=24), "data.train_size=24 is larger than the 23 images available; "),
                    (dict(val_size=6, train_size=18), "data.train_size=18 is larger than the 17 images available after "
                                                      "data.val_size=6"),
                    (dict(val_size=23), "data.val_size=23 leaves none of the 23 training images"),
                    (dict(test_size=10**4), "data.test_size=10000 is larger than the ")):
        with pytest.raises(data.DataError, match=re.escape(msg)):
            data.check_files(_cfg(root, **kw))
        with pytest.raises(data.DataError, match=re.escape(msg)):
            data.load(_cfg(root, **kw), seed=0)
    data.check_files(_cfg(root, val_size=6, train_size=17))  # fits exactly
    data.check_files(_cfg(root / "nowhere", train_size=24))  # missing files: check_present's (or a download's) part


def test_held_out_split_is_disjoint_fixed_and_subset_after(cifar10):
    root, xtr, *_ = cifar10
    a = data.load(_cfg(root, val_size=6), seed=1)
    b = data.load(_cfg(root, val_size=6, train_size=9), seed=2)
    assert len(a.val) == 6 and len(a.train) == 17 and data.load(_cfg(root), seed=1).val is None
    assert torch.equal(a.val.images, b.val.images)  # the same held-out images for every seed
    pos = lambda split: [next(i for i in range(23) if torch.equal(xtr[i], img)) for img in split.images]  # noqa: E731
    held, rest = pos(a.val), pos(a.train)
    assert sorted(held + rest) == list(range(23)) and held == sorted(held)  # disjoint, covering, file order
    assert set(pos(b.train)) <= set(rest) and len(b.train) == 9  # train_size subsets what is left
    with pytest.raises(data.DataError, match=r"data.train_size=18 is larger than the 17 images available after "
                                             r"data.val_size=6"):
        data.load(_cfg(root, val_size=6, train_size=18), seed=0)
    with pytest.raises(data.DataError, match="data.val_size=23 leaves none of the 23 training images"):
        data.load(_cfg(root, val_size=23), seed=0)
    s0, s1 = (data.load(DataConfig(name="synthetic", train_size=50, test_size=20, val_size=30), seed=k) for k in (0, 1))
    assert len(s0.val) == 30 and torch.equal(s0.val.images, s1.val.images)
    assert not torch.equal(s0.val.images[:20], s0.test.images)  # its own stream, not the test images


def test_synthetic_is_deterministic_and_balanced():
    cfg = DataConfig(name="synthetic", train_size=1000, test_size=300)
    a, b, c = data.load(cfg, seed=0), data.load(cfg, seed=0), data.load(cfg, seed=1)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (1000, 3, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.test.images, c.test.images)  # the test images do not depend on the seed
    assert torch.bincount(a.train.labels).tolist() == [100] * 10 and torch.bincount(a.test.labels).tolist() == [30] * 10
    assert len(data.load(DataConfig(name="synthetic"), seed=0).train) == 2048
    assert all(0 < m < 1 for m in a.mean) and all(0 < s < 1 for s in a.std)


@pytest.fixture
def one_thread():
    # tiny ops: threads only add spin-wait, badly so on a shared, busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_synthetic_is_learnable_by_a_tiny_cnn(one_thread):
    ds = data.load(DataConfig(name="synthetic", train_size=1024, test_size=300), seed=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 10, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    tb = data.TrainBatches(ds.train.images, ds.train.labels, 64, 0, 1, 0, "paper", ds.mean, ds.std)
    for epoch in range(3):
        for x, y, _ in tb.epoch(epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    with torch.no_grad():
        x, y = next(data.eval_batches(ds.test.images, ds.test.labels, 0, 1, 300, ds.mean, ds.std))
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.4, acc  # chance is 0.1; 0.52-0.83 over 22 seeds of TrainBatches (2026-12-03)


# ----------------------------------------------------------------------------- sharding

def _tb(n=103, b=16, rank=0, world=1, seed=0, augment="paper", drop_last=False):
    x = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32)
    return data.TrainBatches(x.contiguous(), torch.arange(n), b, rank, world, seed, augment,
                             (0.5,) * 3, (0.25,) * 3, drop_last)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_sample_once_per_epoch_across_ranks(world, drop_last):
    n, b = 103, 16  # neither divisible by the batch nor by 2 or 3
    ranks = [_tb(n, b, r, world, drop_last=drop_last) for r in range(world)]
    steps = ranks[0].steps_per_epoch
    assert steps == (6 if drop_last else 7)
    seen = []
    for step in range(steps):
        parts = [tb.indices(4, step) for tb in ranks]
        batch = torch.cat(parts)
        assert torch.equal(batch, ranks[0].order(4)[step * b:(step + 1) * b])  # global batch, in order
        assert [len(p) for p in parts] == [len(t) for t in torch.tensor_split(batch, world)]
        seen.append(batch)
    seen = torch.cat(seen)
    assert len(seen) == len(set(seen.tolist())) == (96 if drop_last else n)


def test_global_batches_do_not_depend_on_world_size():
    def batches(world):
        ranks = [_tb(world=world, rank=r) for r in range(world)]
        return [sorted(torch.cat([tb.indices(2, s) for tb in ranks]).tolist()) for s in range(7)]
    assert batches(1) == batches(2) == batches(3)


def test_yielded_batches_match_indices_labels_and_augmentation():
    world, n = 3, 103
    for rank in range(world):
        tb = _tb(n, 16, rank, world)
        p = aug.draw_params(n, 0, 1, "paper")
        got = list(tb.epoch(1))
        assert len(got) == 7
        for step, (x, y, n_global) in enumerate(got):
            idx = tb.indices(1, step)
            assert torch.equal(y, idx) and n_global == (16 if step < 6 else 7)
            assert x.dtype == torch.float32 and x.shape == (len(idx), 3, 32, 32)
            ref = aug.apply(tb.images[idx], p.dx[idx], p.dy[idx], p.flip[idx], "zero")
            assert torch.equal(x, aug.normalize(ref, (0.5,) * 3, (0.25,) * 3))
    # the last global batch of 7 split 3 ways: 3, 2, 2; a batch of 1 over 3 ranks leaves two ranks empty
    tiny = [list(_tb(n=17, b=16, rank=r, world=3).epoch(0))[-1] for r in range(3)]
    assert [len(y) for _, y, _ in tiny] == [1, 0, 0] and all(ng == 1 for *_, ng in tiny)
    assert tiny[2][0].shape == (0, 3, 32, 32)


def test_start_step_resumes_exactly():
    tb = _tb(world=2, rank=1)
    full = list(tb.epoch(3))
    tail = list(tb.epoch(3, start_step=4))
    assert len(tail) == len(full) - 4
    for (xa, ya, na), (xb, yb, nb) in zip(full[4:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and na == nb
    assert list(tb.epoch(3, start_step=tb.steps_per_epoch)) == []


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 1)])
def test_chunked_staging_gives_the_same_batches_as_one_step_at_a_time(world, rank):
    """Steps are staged chunk_steps at a time; the batches must not depend on the grouping, on a
    chunk boundary, or on a resume that starts inside a chunk."""
    n = 103
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)

    def run(chunk, start=0, channels_last=False):
        tb = data.TrainBatches(x, torch.arange(n), 16, rank, world, 7, "paper", (0.4, 0.5, 0.6),
                               (0.2, 0.25, 0.3), channels_last=channels_last)
        tb.chunk_steps = chunk
        return list(tb.epoch(2, start))

    one = run(1)  # one step per chunk: the batch is staged in the step that takes it
    assert len(one) == 7
    for chunk in (2, 3, 100):
        for start in (0, 3, 5):
            got = run(chunk, start)
            assert len(got) == 7 - start
            for (xa, ya, na), (xb, yb, nb) in zip(one[start:], got):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and na == nb
    nhwc = run(3, 1, channels_last=True)
    assert all(xb.is_contiguous(memory_format=torch.channels_last) for xb, _, _ in nhwc if len(xb) > 1)
    assert all(torch.equal(xa, xb) for (xa, _, _), (xb, _, _) in zip(one[1:], nhwc))


def test_chunk_steps_holds_about_chunk_images_per_rank():
    def tb(batch, world):
        return data.TrainBatches(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.zeros(10, dtype=torch.long),
                                 batch, 0, world, 0, "none", (0.5,) * 3, (0.25,) * 3)
    assert tb(128, 2).chunk_steps == data.CHUNK_IMAGES // 64
    assert tb(2 * data.CHUNK_IMAGES, 1).chunk_steps == 1  # a batch above a chunk: still whole steps


def test_epochs_and_seeds_differ_and_order_is_not_the_aug_stream():
    tb = _tb()
    assert not torch.equal(tb.order(0), tb.order(1))
    assert not torch.equal(tb.order(0), _tb(seed=1).order(0))
    assert torch.equal(tb.order(5), _tb().order(5))
    x0 = torch.cat([x for x, _, _ in tb.epoch(0)])
    x1 = torch.cat([x for x, _, _ in tb.epoch(1)])
    assert not torch.equal(x0, x1)


def test_channels_last_and_bad_arguments():
    x = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    tb = data.TrainBatches(x, torch.zeros(10, dtype=torch.long), 4, 0, 2, 0, "seed", (0.5,) * 3, (0.25,) * 3,
                           channels_last=True)
    xb, _, _ = next(tb.epoch(0))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(data.DataError, match="smaller than the 3 ranks"):
        data.TrainBatches(x, torch.zeros(10, dtype=torch.long), 2, 0, 3, 0, "none", (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(data.DataError, match="no training images"):
        data.TrainBatches(x[:0], torch.zeros(0, dtype=torch.long), 4, 0, 1, 0, "none", (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(data.DataError, match="drop_last"):
        data.TrainBatches(x, torch.zeros(10, dtype=torch.long), 16, 0, 1, 0, "none", (0.5,) * 3, (0.25,) * 3,
                          drop_last=True)


def test_eval_shard_covers_exactly_once():
    shards = [data.eval_shard(10, r, 3) for r in range(3)]
    assert [list(range(10))[s] for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert data.eval_shard(2, 2, 3) == slice(2, 2)  # more ranks than samples: an empty shard


def test_eval_batches_cover_the_test_set_once():
    n = 25
    x = torch.arange(n).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n)
    seen, counts = [], []
    for r in range(3):
        batches = list(data.eval_batches(x, y, r, 3, 10, (0.0,) * 3, (1.0,) * 3, channels_last=False))
        counts.append(len(batches))
        for xb, yb in batches:
            assert len(yb) <= 4  # ceil(10 / 3)
            assert torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())
            seen += yb.tolist()
    assert sorted(seen) == list(range(n)) and len(seen) == n
    assert counts == [3, 3, 3]  # shards of 9, 8, 8: the same count everywhere (the trainer polls per batch)
    last = list(data.eval_batches(x[:4], y[:4], 3, 4, 8, (0.0,) * 3, (1.0,) * 3))
    assert [len(b) for _, b in last] == [1]
    assert [len(b) for _, b in data.eval_batches(x[:5], y[:5], 3, 4, 4, (0.0,) * 3, (1.0,) * 3)] == [1, 0]


class _Archive:
    """torchvision's own CIFAR-10 download, from an HTTP server on this machine (no network here) that serves a
    small release in the official layout; its md5s are put in torchvision's class as the real release's are."""

    def __init__(self, tmp_path, monkeypatch, stall_after: int | None = None, corrupt: bool = False):
        import hashlib
        import http.server
        import tarfile
        import threading
        from torchvision.datasets import CIFAR10
        src = tmp_path / "release"
        (xtr, ytr), (xte, yte) = _fake(23, 10, 0), _fake(7, 10, 1)
        folder = data.write_cifar(src, "cifar10", xtr, ytr, xte, yte, C10)
        md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
        with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        body = (tmp_path / "a.tar.gz").read_bytes()
        sums = {p.name: md5(p.read_bytes()) for p in folder.iterdir()}
        self.sent = body[: len(body) // 2] + b"x" * (len(body) - len(body) // 2) if corrupt else body
        self.stalled = threading.Event()
        archive = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(archive.sent)))
                self.end_headers()
                if stall_after is None:
                    self.wfile.write(archive.sent)
                    return
                self.wfile.write(archive.sent[:stall_after])
                self.wfile.flush()
                archive.stalled.wait(60)  # a transfer that stops sending, its connection open

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.delenv(var, raising=False)
        import urllib.request
        monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen keeps its first opener, and its proxies
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{self.server.server_address[1]}/c.tar.gz")
        monkeypatch.setattr(CIFAR10, "tgz_md5", md5(body))
        monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
        monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": sums["batches.meta"]})

    def close(self):
        self.stalled.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("how", ["whole", "corrupt", "stalled", "archive_here", "elsewhere", "bad_archive_here"])
def test_a_download_lands_whole_or_not_at_all(tmp_path, monkeypatch, how):
    """torchvision wrote the archive into the root and unpacked it there: a sweep's tasks sharing a node's root read
    a batch being written, and a corrupt archive stayed, later said to be one downloaded by hand and not unpacked.
    Its urlopen has no timeout: a transfer that stopped sending hung the rank for good (found by a code review).
    Now it is fetched and unpacked apart and moved in whole, and a stalled transfer fails."""
    import time
    monkeypatch.setattr(data, "DOWNLOAD_STALL_S", 1.0, raising=False)
    archive = _Archive(tmp_path, monkeypatch, stall_after=1000 if how == "stalled" else None,
                       corrupt=how in ("corrupt", "archive_here", "bad_archive_here"))
    root = tmp_path / "data"
    try:
        began = time.monotonic()
        if how == "elsewhere":  # the dataset's folder a symlink onto another file system (scratch), where no rename
            # reaches: the move failed, said as a network fault (found by a diff review)
            other = type(tmp_path)(tempfile.mkdtemp(dir="/dev/shm"))
            assert other.stat().st_dev != tmp_path.stat().st_dev, "/dev/shm is no other file system here"
            root.mkdir()
            (root / "cifar-10-batches-py").symlink_to(other)
            try:
                ds = data.load(_cfg(root, download=True), seed=0)
                release = sorted(p.name for p in (tmp_path / "release" / "cifar-10-batches-py").iterdir())
                assert len(ds.train) == 23 and sorted(p.name for p in other.iterdir()) == release
            finally:
                shutil.rmtree(other)
            return
        if how in ("whole", "archive_here"):
            if how == "archive_here":  # the release copied in by hand, unpacked offline (the server's is bad)
                root.mkdir()
                shutil.copy(tmp_path / "a.tar.gz", root / "cifar-10-python.tar.gz")
            gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            host = socket.gethostname()
            old, new = root / f"{data.DOWNLOAD_PREFIX}old", root / f"{data.DOWNLOAD_PREFIX}{host}-{os.getppid()}-new"
            killed = root / f"{data.DOWNLOAD_PREFIX}{host}-{gone}-x1"  # SIGKILLed 3 min ago on this host
            away = root / f"{data.DOWNLOAD_PREFIX}elsewhere-{gone}-x2"  # another host's, under way there
            boxed = root / f"{data.DOWNLOAD_PREFIX}{host}-{gone}-x3"  # written to now: a container's own pids
            for d in (old, new, killed, away, boxed):  # old: killed a day ago (a node lost); new: under way
                (d / "cifar-10-batches-py").mkdir(parents=True)
            (new / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")  # being written
            os.utime(old, (time.time() - 2 * data.STALE_DOWNLOAD_S,) * 2)
            for f in (killed, killed / "cifar-10-batches-py", away, away / "cifar-10-batches-py"):  # idle 3 min
                os.utime(f, (time.time() - 180,) * 2)
            with pytest.raises(data.DataError, match=r"CIFAR-10 not found") as e:  # no download's folder as the root
                data.load(_cfg(root), seed=0)
            assert "looks one level too high" not in str(e.value), e.value
            ds = data.load(_cfg(root, download=True), seed=0)
            assert len(ds.train) == 23 and len(ds.test) == 7
            kept = [new.name, away.name, boxed.name, "cifar-10-batches-py", "cifar-10-python.tar.gz"]
            assert sorted(p.name for p in root.iterdir()) == sorted(kept)
            return
        if how == "bad_archive_here":  # a copy cut short, and no good one to fetch: said, not only "no network"
            root.mkdir()
            (root / "cifar-10-python.tar.gz").write_bytes((tmp_path / "a.tar.gz").read_bytes()[:100])
        with pytest.raises(data.DataError, match="downloading CIFAR-10 into .* failed") as e:
            data.load(_cfg(root, download=True), seed=0)
        assert ("timed out" in str(e.value)) == (how == "stalled"), e.value
        assert ("the cifar-10-python.tar.gz already there is not the official release (its md5 differs: cut short, "
                "or another file)" in str(e.value)) == (how == "bad_archive_here"), e.value
        if how == "bad_archive_here":
            assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # the user's, kept
            return
        assert time.monotonic() - began < 30
        assert not root.exists()  # nothing half-written, no archive, and no folder made for it (a mistyped
        # data.root was left as an empty folder)
    finally:
        archive.close()


def test_a_failed_download_takes_away_only_the_folders_it_made(tmp_path):
    """data.root=/x/new/../mine: /x/new was missing, so mine read as missing too, and a failed download's cleanup
    removed the user's empty mine (found by a diff review). Only what mkdir made is taken away."""
    (tmp_path / "mine").mkdir()
    made: list = []
    data._make_root(tmp_path / "new" / ".." / "mine" / "a", made)
    assert made == [tmp_path / "new" / ".." / "mine" / "a", tmp_path / "new"]
    assert (tmp_path / "mine" / "a").is_dir()


def test_a_download_root_that_cannot_be_made_is_said_as_such(tmp_path):
    """data.root under a file (or where this user cannot write): said as the folder that cannot be made; it read
    "downloading ... failed; this machine may have no network" (diff review)."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(data.DataError, match=r"^cannot make a folder to download CIFAR-10 into, in .*/afile/sub "
                                             r"\(NotADirectoryError: .*give a data.root this user can write"):
        data.fetch_if_missing(_cfg(tmp_path / "afile" / "sub", download=True))
