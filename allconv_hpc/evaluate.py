"""`allconv-hpc evaluate RUN_FOLDER`: score one of a run's checkpoints on its test or held-out split
after the fact, in one process, with what the trainer scores with (scoring.py).

The checkpoint carries the run's config and the precision it resolved, so model, data split,
normalisation, precision, channels_last and kernel flags are the run's own: scoring the final weights
of a one-rank run on its device gives the trainer's numbers exactly (of a W-rank run: up to float
summation order). Its use: with data.val_size the trainer scores test once, by the final weights;
this scores best.pt (picked on the held-out images) or any other checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, from_dict
from .fsio import name_too_long, read_json, same_file
from .scoring import AMP_DTYPES, batch_sums, resolve_precision, set_math


USAGE_EPILOG = ("exit status: 0 scored, 1 the checkpoint is unreadable or corrupt, 2 bad arguments (no such "
                "folder or checkpoint, no held-out split, data not found)")


def _positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"{v!r} is not a whole number >= 1")
    return int(v)


ALL = "all"  # --test-size: every test image the data holds


@contextlib.contextmanager
def _said_as_option(test_size):
    """A --test-size over the images there is refused by the config's or the loader's check, in data.test_size's
    words: said as the option given, whose way to ask for every image is `all`."""
    from .data import DataError
    try:
        yield
    except (ConfigError, DataError) as e:
        said = f"data.test_size={test_size} "
        if test_size in (None, ALL) or not str(e).startswith(said):
            raise
        raise type(e)(re.sub(r" or null( for all)?$", " or all", str(e).replace(said, f"--test-size {test_size} ", 1))
                      ) from None


def _test_size(v: str):
    return ALL if v == ALL else _positive(v)


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="allconv-hpc evaluate", epilog=USAGE_EPILOG,
                                 description="Score a run's checkpoint with the run's own config.")
    ap.add_argument("run", type=Path, help="the run folder (the one holding checkpoints/)")
    ap.add_argument("--checkpoint", default="best",
                    help="best (default: best val_acc), last (the newest), a file in checkpoints/ (step_00001234.pt) or a path")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="test (default), or val: the run's held-out training images (data.val_size > 0)")
    ap.add_argument("--data-root", help="the dataset's folder now, when it moved since the run (sets data.root)")
    ap.add_argument("--test-size", type=_test_size, metavar="N|all",
                    help="score N test images (the same N for every run), or all the data holds, instead of the "
                         "run's data.test_size (--split test)")
    ap.add_argument("--batch-size", type=_positive, metavar="N",
                    help="images per forward pass (default: the run's trainer.eval_batch_size); smaller for a "
                         "device with less memory than the run's")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when there is one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


RUN_MARKS = ("checkpoints", "status.json", "submission.json", ".hydra")  # a sweep's point folder (not a sweep's own
# .submit.lock, nor a checkpoints.oldN holding wandb_id.txt: runlock.holds_run answers "is this folder in use")


def _run_folders(sweep: Path) -> list[Path]:
    """A sweep folder's point folders: sweep.json's run folders that exist (in sweep order), else its
    subfolders that look like runs."""
    doc = read_json(sweep / "sweep.json")  # {} when missing or damaged: the subfolders still tell
    jobs = doc.get("jobs") if isinstance(doc.get("jobs"), list) else []
    listed = [sweep / Path(j["run_dir"]).name for j in jobs if isinstance(j, dict) and isinstance(j.get("run_dir"), str)]
    return [d for d in listed if d.is_dir()] or sorted(
        d for d in sweep.iterdir() if d.is_dir() and any((d / f).exists() for f in RUN_MARKS))


def _bare(which: str) -> bool:
    """A --checkpoint with no folder part: the run's own file in checkpoints/."""
    return os.sep not in which and "/" not in which


def _scorable(run: Path, which: str) -> bool:
    """The run folder holds the `--checkpoint` asked for: best.pt (an epoch finished), a step checkpoint for last
    (a pending point's checkpoints/ may be empty), or the file named."""
    from .checkpoint import CheckpointDir
    if which == "best" or _bare(which) and which != "last":
        return (run / "checkpoints" / ("best.pt" if which == "best" else which)).is_file()
    return CheckpointDir(run / "checkpoints", 1).exists()


def _sweep_hint(run: Path, which: str = "best") -> Optional[str]:
    """The error for a sweep folder given where one run folder was meant, naming a few of its run folders;
    None when `run` is no sweep folder (sweep.json, or run folders but no checkpoints/ of its own)."""
    if (run / "checkpoints").exists() and not (run / "sweep.json").is_file():
        return None
    points = _run_folders(run)
    if not (run / "sweep.json").is_file() and not points:
        return None
    # only those it can score, in sweep order, quoted: a point's folder name holds commas (model=allcnn_c,seed=0)
    ready = [d for d in points if _scorable(d, which)]
    shown = ", ".join(f"'{d}'" for d in ready[:3]) + (f" ... ({len(ready)} in all)" if len(ready) > 3 else "")
    what = "a checkpoint" if which == "last" else f"{which}.pt" if which == "best" else shlex.quote(which)
    example = (f", e.g. {shown}" if ready else
               f" once one holds {what} ({'none does' if points else 'it holds no run folder'} yet)")
    if not (run / "sweep.json").is_file():
        return f"{run} holds run folders but is not one: evaluate one of them{example}"
    return (f"{run} is a sweep folder (allconv-hpc submit -m), not a run folder: evaluate one of its run folders"
            f"{example}; allconv-hpc status {shlex.quote(str(run))} shows each one's progress and best_val_acc")


def _checkpoint_path(run: Path, which: str) -> tuple[Path, Optional[dict]]:
    """(the file --checkpoint `which` names, its checkpoint where finding it loaded it: last's, else None)."""
    if not which.strip():  # Path("") is the current folder: "no checkpoint ." said nothing
        raise ConfigError("--checkpoint is empty; give best, last, a file in checkpoints/ or a path")
    for given, what in ((run, "the run folder"), (Path(which), "--checkpoint")):
        said = name_too_long(given)
        if said:  # nothing of that name can exist: said so, not as an OSError from is_dir
            raise ConfigError(f"{what}: {said}")
    if run.is_file() and run.parent.name == "checkpoints":  # a checkpoint given as the run: the command that scores it
        raise ConfigError(f"{run} is a checkpoint, not a run folder; give its run and the file: allconv-hpc evaluate "
                          f"{shlex.quote(str(run.parent.parent))} --checkpoint {shlex.quote(run.name)}")
    if run.is_file():  # a checkpoint kept apart: scored with the config it carries, from any folder
        raise ConfigError(f"{run} is a file, not a run folder (the one holding checkpoints/); a checkpoint outside a "
                          f"run is scored with the config it carries: allconv-hpc evaluate "
                          f"{shlex.quote(str(run.parent))} --checkpoint {shlex.quote(str(run))}")
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder; give a run folder (the one holding checkpoints/)")
    if (run / "checkpoints").exists() and not (run / "checkpoints").is_dir():
        raise ConfigError(f"{run / 'checkpoints'} is a file, not the run's checkpoint folder; give the run folder "
                          f"that holds its checkpoints/")
    mine = run / "checkpoints" / (f"{which}.pt" if which in ("best", "last") else which)
    if which == "last":  # the checkpoint a resume takes: last.pt (its link) may name the one before the newest step
        from .checkpoint import CheckpointDir, CheckpointError  # file (a kill between the two writes), or be gone
        ck = CheckpointDir(run / "checkpoints", keep=0)
        try:
            found = ck.load_latest(warn=False)
        except CheckpointError:  # none loads: the file named below says why
            found = None
        if found:
            return found[1], found[0]
        mine = mine if mine.is_file() else next(iter(ck.step_files()), mine)
    # a bare name is the run's own file, even if the current folder holds one of that name; one with a folder part
    # (./best.pt) is that path, though the run holds a file of its name
    bare = _bare(which)
    path = mine if which in ("best", "last") or (bare and mine.is_file()) else Path(which)
    if not path.is_file():
        if run.name == "checkpoints" and not (run / "checkpoints").exists() and any(run.glob("*.pt")):
            which_too = "" if which == "best" else f" --checkpoint {shlex.quote(which)}"
            raise ConfigError(f"{run} is a run's checkpoint folder; give its run folder: allconv-hpc evaluate "
                              f"{shlex.quote(str(run.absolute().parent))}{which_too}")
        aside = re.fullmatch(r"checkpoints\.old\d+", run.name)  # resume=never's: the old checkpoints, no run folder
        if aside and not (run / "checkpoints").exists() and any(run.glob("*.pt")):
            name = f"{which}.pt" if which in ("best", "last") else Path(which).name
            gone = "" if (run / name).is_file() else f" (it holds no {name})"
            if gone:  # e.g. no best.pt: no epoch of that run finished
                name = next((n for n in ("best.pt", "last.pt") if (run / n).is_file()),
                            sorted(p.name for p in run.glob("*.pt"))[-1])
            here = run.absolute()  # a file of a set-aside run is given by its path, with the run folder
            raise ConfigError(f"{run} holds the checkpoints of a run set aside by checkpoint.resume=never, not a run "
                              f"folder; score one of its files by path{gone}: allconv-hpc evaluate "
                              f"{shlex.quote(str(here.parent))} --checkpoint {shlex.quote(str(here / name))}")
        if aside and not (run / "checkpoints").exists():  # set aside with no checkpoint (they were gone already)
            raise ConfigError(f"{run} holds what was set aside of an earlier run of {run.absolute().parent} (no "
                              f"checkpoint file in it), nothing to score; the run folder "
                              f"itself: allconv-hpc evaluate {shlex.quote(str(run.absolute().parent))}")
        sweep = _sweep_hint(run, which)
        if sweep:
            raise ConfigError(sweep)
        there = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
        if which == "best" and there:  # best.pt comes with the first finished epoch
            raise ConfigError(f"no best.pt in {run / 'checkpoints'}: no epoch has finished yet (it holds "
                              f"{', '.join(there)}); use --checkpoint last")
        from .runlock import holds_run
        if not there and which in ("best", "last") and holds_run(run):  # its job has not trained yet (pending...)
            from .fsio import read_json
            done = read_json(run / "status.json").get("epoch")
            if isinstance(done, int) and done > 0:  # it trained: its checkpoints were removed (or moved) since
                raise ConfigError(f"{run} has no checkpoint, though its status.json says {done} epoch(s) done: its "
                                  f"checkpoints/ files were removed or moved since; give a checkpoint's path with "
                                  f"--checkpoint, or train the run again")
            raise ConfigError(f"{run} has no checkpoint yet: its run has not saved one (allconv-hpc status "
                              f"{shlex.quote(str(run))} shows how far it got)")
        if not (run / "checkpoints").is_dir() and not holds_run(run):
            raise ConfigError(f"{run} is not a run folder (no checkpoints/, nothing train writes); give the "
                              f"folder of a run (its hydra.run.dir)")
        what = f"--checkpoint {path} is a folder, not a checkpoint file" if path.is_dir() else f"no checkpoint {path}"
        raise ConfigError(f"{what} (checkpoints/ holds {', '.join(there) or 'nothing'}); use --checkpoint best, last "
                          f"or a file's path")
    return path, None


def _own_file(run: Path, path: Path) -> bool:
    """`path` is one of the run folder's own checkpoints (in its checkpoints/), not a set-aside run's or another's."""
    try:
        return path.resolve().parent == (run / "checkpoints").resolve()
    except OSError:
        return False


def _with_root(cfg, root: str):
    """`cfg` with data.root `root`."""
    import dataclasses
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))


def _recorded_root(run: Path, raw: dict) -> Optional[str]:
    """The data.root in the run folder's .hydra/config.yaml (its last start's) where it differs from the
    checkpoint's for the same dataset, else None. A resume checked the images there are the run's, and evaluate
    checks them again (other_images)."""
    from .compose import recorded, recorded_data_root
    now, then = recorded_data_root(run), (raw.get("data") or {})
    if (now is None or now == then.get("root") or then.get("name") == "synthetic"
            or recorded(run, "data", "name") != then.get("name")):
        return None
    return now


def evaluate(run: Path, which: str = "best", split: str = "test", data_root: Optional[str] = None,
             device: str = "auto", test_size=None, batch_size: Optional[int] = None) -> dict:
    """Score checkpoint `which` of `run` on `split`; returns what `--json` prints. `test_size`: None = the run's
    data.test_size, ALL or N instead; `batch_size`: None = the run's trainer.eval_batch_size."""
    from . import data as data_mod, preprocess
    from .checkpoint import fitting, load_file
    from .models import build_model

    path, ck = _checkpoint_path(run, which)
    ck = ck or load_file(path)  # CheckpointError when corrupt: verified before anything is read from it
    if not isinstance(ck.get("config"), dict) or "model" not in ck:
        raise ConfigError(f"{path} holds no model and config: not a checkpoint of allconv-hpc train")
    raw = ck["config"]
    # never a download: a wrong --data-root must say the data is not there, not fetch it there
    raw = {**raw, "data": {**raw.get("data", {}), "download": False,
                           **({"root": data_root} if data_root is not None else {}),
                           **({"test_size": None if test_size == ALL else test_size} if test_size is not None
                              else {})}}
    if batch_size is not None:
        raw = {**raw, "trainer": {**raw.get("trainer", {}), "eval_batch_size": batch_size}}
    if test_size is not None and split != "test":
        raise ConfigError("--test-size is for --split test; the held-out split is the run's data.val_size images")
    with _said_as_option(test_size):
        cfg = from_dict(raw)
    if data_root is not None and cfg.data.name == "synthetic":  # it would be ignored: say so rather than score
        raise ConfigError(f"--data-root {data_root}: the run in {run} trained on data=synthetic, which is generated, "
                          f"not read from a folder; drop --data-root")
    if split == "val" and not cfg.data.val_size:
        raise ConfigError(f"the run in {run} has no held-out split (data.val_size=0): its val_acc is test "
                          f"accuracy; use --split test")
    lay = data_mod.expected_files(cfg.data)[0].name  # e.g. cifar-10-batches-py
    try:
        data_mod.check_present(cfg.data, fix=f"Give --data-root DIR, the folder that holds {lay} now",
                               root_option="--data-root ")
    except data_mod.DataError as gone:  # not in the checkpoint's root: a file of the run's own is read where the
        # run last read its data (a resume given another data.root, which it checked holds the same images: a
        # best.pt written before names the old root)
        moved = _recorded_root(run, raw) if data_root is None and _own_file(run, path) else None
        if moved is None:
            raise
        try:
            data_mod.check_present(_with_root(cfg, moved).data)
        except data_mod.DataError:
            raise gone from None
        cfg = _with_root(cfg, moved)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    set_math(cfg.trainer.deterministic, dev)  # the trainer's matmul/conv math
    if dev.type == "cpu" and cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)  # the run's thread count: the run's summation order
    with _said_as_option(test_size):
        ds = data_mod.load(cfg.data, cfg.seed)
    part = ds.val if split == "val" else ds.test
    # the images the run scored, recorded in its checkpoints: other ones here give another accuracy, said
    then = ck.get("data") if isinstance(ck.get("data"), dict) else None
    asked = None if test_size in (None, ALL) else test_size  # --test-size naming the run's own images is checked too
    own = test_size is None or asked == (ck["config"].get("data") or {}).get("test_size")
    scored = {split: data_mod.split_print(part)} if own else {}
    if cfg.data.preprocess == "gcn_zca":  # the whitening is fitted again on the training images: theirs too
        scored["train"] = data_mod.split_print(ds.train)
    other = data_mod.other_images({k: then.get(k) for k in scored}, scored) if then is not None else []
    model = build_model(cfg.model)
    with fitting(path):
        model.load_state_dict(ck["model"])
    model = model.to(dev, memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format)
    model.eval()
    # the precision the run trained in (auto resolved, agreed across ranks), not this GPU's own choice
    precision = ck.get("precision") or resolve_precision(cfg.trainer.precision, dev)
    if dev.type == "cpu" and precision != "fp32":
        precision = "fp32"  # bf16/fp16 autocast is the GPU path; a CPU scores in fp32
    amp = AMP_DTYPES.get(precision)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    with torch.no_grad():
        put = preprocess.to_device(cfg.data.preprocess, ds.train.images, dev)  # the run's own fit
        for x, y in data_mod.eval_batches(put(part.images), part.labels.to(dev), 0, 1,
                                          cfg.trainer.eval_batch_size, ds.mean, ds.std,
                                          channels_last=cfg.trainer.channels_last):
            sums += batch_sums(model, x, y, amp)
    loss, correct, n = sums.tolist()
    ts = ck.get("train_state") or {}
    epoch = ck.get("epoch", ts.get("epoch"))
    val_acc, val_epoch = saved_val_acc(ck)
    return {"checkpoint": str(path), "epoch": epoch, "step_in_epoch": ts.get("step_in_epoch", 0),
            "global_step": ck.get("global_step", ts.get("global_step")),
            "val_acc_when_saved": val_acc, "val_acc_epoch": val_epoch, "split": split, "loss": loss / n,
            "accuracy": correct / n, "images": int(n), "precision": precision, "device": str(dev),
            "model": cfg.model.name, "data": cfg.data.name, "other_images": "; ".join(other) or None}


def saved_val_acc(ck: dict) -> tuple[Optional[float], Optional[int]]:
    """(val_acc, the epoch it was scored after) that a checkpoint records: best.pt's own; a step
    checkpoint's last finished epoch in its train_state history (mid-epoch: the epoch before, whose
    weights were trained further since); (None, None) before any epoch finished."""
    if ck.get("val_acc") is not None:  # best.pt
        return ck["val_acc"], ck.get("epoch")
    ts = ck.get("train_state")
    history = ts.get("history") if isinstance(ts, dict) else None
    rows = [r for r in history or () if isinstance(r, dict) and r.get("val_acc") is not None]
    if not rows:
        return None, None
    return rows[-1]["val_acc"], rows[-1].get("epoch")


def evaluate_main(argv: list[str]) -> int:
    from .checkpoint import CheckpointError, UnloadableCheckpoint

    args = _parse(argv)
    try:
        r = evaluate(args.run, args.checkpoint, args.split, args.data_root, args.device, args.test_size,
                     args.batch_size)
    except ConfigError as e:  # DataError too
        print(f"allconv-hpc evaluate: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError) as e:
        damaged = isinstance(e, CheckpointError) and not isinstance(e, UnloadableCheckpoint)  # not another torch's
        try:
            bad = _checkpoint_path(args.run, args.checkpoint)[0]  # the file that failed: not offered again
        except ConfigError:
            bad = Path()
        ours = bad.resolve().is_relative_to((args.run / "checkpoints").resolve())  # a file of another place: its own
        others = sorted(p.name for p in (args.run / "checkpoints").glob("step_*.pt") if not same_file(p, bad)) \
            if damaged and ours and args.run.is_dir() else []
        also = (f"; the run's other checkpoints ({', '.join(others)}) may be whole: --checkpoint one of them (train "
                f"falls back to the newest whole one by itself)") if others else ""
        print(f"allconv-hpc evaluate: error: {e}{also}", file=sys.stderr)
        return 1
    if not Path(r["checkpoint"]).resolve().is_relative_to((args.run / "checkpoints").resolve()):
        print(f"allconv-hpc evaluate: note: {r['checkpoint']} is not one of {args.run}'s checkpoints: scored with "
              f"the config it carries ({r['model']} on {r['data']})", file=sys.stderr)
    if r["other_images"]:
        scored = "these are not the images the run scored"
        if r["other_images"].startswith("training"):  # (each split that differs, training first)
            fit = "the whitening (data.preprocess=gcn_zca) is fitted on other training images than the run's"
            scored = f"{fit}, and {scored}" if ";" in r["other_images"] else fit
        print(f"allconv-hpc evaluate: warning: {scored} ({r['other_images']}; another copy or dataset?): the accuracy "
              f"is not comparable with its val_acc", file=sys.stderr)
    if args.json:
        print(json.dumps(r))
    else:
        when = f"epoch {r['epoch']}" if r["epoch"] is not None else "?"
        if r["step_in_epoch"] and r["epoch"] is not None:  # inside epoch+1 (epoch counts finished ones)
            when = f"epoch {r['epoch'] + 1} step {r['step_in_epoch']}, global step {r['global_step']}"
        if r["val_acc_when_saved"] is not None:
            when += f"; val_acc {r['val_acc_when_saved']:.4f} after epoch {r['val_acc_epoch']}"
        print(f"{Path(r['checkpoint']).name} ({r['model']} on {r['data']}, {when}): {r['split']} loss "
              f"{r['loss']:.4f} acc {r['accuracy']:.4f} ({r['images']} images, {r['precision']} on {r['device']})")
    return 0
