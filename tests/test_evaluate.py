"""`allconv-hpc evaluate`: a run's checkpoint scored after the fact with the run's own config gives
the trainer's own numbers; bad arguments are one line and exit 2, a corrupt checkpoint exit 1."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from allconv_hpc import data
from allconv_hpc.config import ConfigError
from allconv_hpc.config import SYNTHETIC_SIZES
from allconv_hpc.evaluate import evaluate, evaluate_main
import torch

from allconv_hpc.history import read_history
from proc import PY, TINY, clean_env, run_train

HELD_OUT = TINY + ["data.val_size=50", "trainer.epochs=3"]


def _fake_cifar(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _status(run) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank DDP run with a held-out split; 101 test and 50 val images split unevenly over the ranks."""
    tmp = tmp_path_factory.mktemp("eval")
    run_train(tmp, tmp / "run", HELD_OUT, nproc=2)
    return tmp / "run"


def test_last_and_best_give_the_trainers_numbers(two_rank_run):
    st = _status(two_rank_run)
    last = evaluate(two_rank_run, "last", "test")
    assert (last["images"], last["epoch"], last["split"]) == (101, 3, "test")
    # one process scores what two ranks scored: the same images once each, in other batches (float
    # sums in another order: a near-tied image may flip, so within one image)
    assert abs(last["accuracy"] - st["test_acc"]) <= 1 / 101 + 1e-9
    assert math.isclose(last["loss"], st["test_loss"], rel_tol=1e-5)
    best = evaluate(two_rank_run, "best", "val")
    assert best["images"] == 50 and best["val_acc_when_saved"] == st["best_val_acc"]
    assert best["global_step"] == 5 * best["epoch"]  # 300 training images, batch 60
    assert abs(best["accuracy"] - st["best_val_acc"]) <= 1 / 50 + 1e-9
    step = sorted((two_rank_run / "checkpoints").glob("step_*.pt"))[-1].name  # a bare file name works too
    assert evaluate(two_rank_run, step, "test")["accuracy"] == last["accuracy"]
    # the precision the run resolved travels in every checkpoint: evaluate on a GPU uses it, not its own auto
    from allconv_hpc.checkpoint import load_file
    for f in ("best.pt", step):
        assert load_file(two_rank_run / "checkpoints" / f)["precision"] == st["precision"] == "fp32"


def test_cli_prints_json_and_exit_codes(two_rank_run, tmp_path):
    def cli(*args):
        return subprocess.run([PY, "-m", "allconv_hpc", "evaluate", *map(str, args)], env=clean_env(tmp_path),
                              capture_output=True, text=True, timeout=120)
    r = cli(two_rank_run, "--checkpoint", "last", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == evaluate(two_rank_run, "last")
    # last.pt is a step checkpoint: its val_acc is the one of the last epoch it finished (no val_acc of its own)
    st = _status(two_rank_run)
    assert (json.loads(r.stdout)["val_acc_when_saved"], json.loads(r.stdout)["val_acc_epoch"]) == (st["last_val_acc"], 3)
    best = json.loads(cli(two_rank_run, "--json").stdout)
    assert best["val_acc_when_saved"] == st["best_val_acc"] and best["val_acc_epoch"] == best["epoch"]
    r = cli(two_rank_run, "--checkpoint", "step_00000099.pt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "checkpoints/ holds best.pt, last.pt" in r.stderr
    bad = tmp_path / "run"
    shutil.copytree(two_rank_run / "checkpoints", bad / "checkpoints")
    raw = bytearray((bad / "checkpoints" / "best.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / "checkpoints" / "best.pt").write_bytes(bytes(raw))
    r = cli(bad)
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "Traceback" not in r.stderr
    steps = sorted(p.name for p in (bad / "checkpoints").glob("step_*.pt"))
    assert f"the run's other checkpoints ({', '.join(steps)}) may be whole: --checkpoint one of them" in r.stderr
    outside = tmp_path / "elsewhere.pt"  # a damaged file of another place: the run's checkpoints are no way out
    shutil.copy(bad / "checkpoints" / "best.pt", outside)
    r = cli(bad, "--checkpoint", str(outside))
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "may be whole" not in r.stderr, r.stderr
    # a whole checkpoint kept apart, given as the run: the command that scores it is named, and it does (it was
    # "is not a folder; give a run folder", a dead end: found by a laptop journey audit)
    kept = tmp_path / "kept" / "final.pt"
    kept.parent.mkdir()
    shutil.copy(two_rank_run / "checkpoints" / "last.pt", kept)
    r = cli(kept)
    command = f"allconv-hpc evaluate {kept.parent} --checkpoint {kept}"
    assert r.returncode == 2 and r.stderr.rstrip().endswith(command), r.stderr
    r = cli(*command.split()[2:], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accuracy"] == evaluate(two_rank_run, "last")["accuracy"], \
        r.stderr


def _cli(tmp_path, *args, **env):
    return subprocess.run([PY, "-m", "allconv_hpc", "evaluate", *map(str, args)], env=clean_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_step_checkpoint_reports_the_val_acc_of_its_last_finished_epoch(tmp_path):
    """Step checkpoints hold no val_acc of their own but the history of the epochs they finished: the last
    one's val_acc is reported with its epoch; before the first epoch's end there is none (null)."""
    run = tmp_path / "run"  # 5 steps an epoch: step 2 and 4 in epoch 1, 6 and 8 in epoch 2
    run_train(tmp_path, run, TINY + ["checkpoint.every_steps=2", "checkpoint.keep=20"])
    rows = read_history(run / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2]

    def saved(which):
        r = _cli(tmp_path, run, "--checkpoint", which, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        return doc["val_acc_when_saved"], doc["val_acc_epoch"]
    assert saved("step_00000002.pt") == (None, None)  # no epoch finished yet
    assert saved("step_00000006.pt") == (rows[0]["val_acc"], 1)  # mid-epoch 2: epoch 1's
    assert saved("last") == (rows[1]["val_acc"], 2)
    # killed between the newest step file and last.pt's relink (last.pt names the one before): the newest, as a
    # resume takes it (a checkpoint review: it scored the older one)
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    os.link(run / "checkpoints" / "step_00000006.pt", last)
    assert saved("last") == (rows[1]["val_acc"], 2)
    newest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]  # ... unless that newest one is damaged: last.pt's
    whole = newest.read_bytes()
    data = bytearray(whole)
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert saved("last") == (rows[0]["val_acc"], 1)
    newest.write_bytes(whole)  # as it was
    last.unlink()
    os.link(newest, last)
    assert saved("best") == (max(r["val_acc"] for r in rows), max(rows, key=lambda r: r["val_acc"])["epoch"])
    text = _cli(tmp_path, run, "--checkpoint", "last").stdout
    # a bare name is the run's own file, though the current folder (tmp_path) holds one of that name
    shutil.copy(run / "checkpoints" / "step_00000002.pt", tmp_path / "step_00000006.pt")
    mid = _cli(tmp_path, run, "--checkpoint", "step_00000006.pt").stdout
    assert mid.startswith("step_00000006.pt (allcnn_c on synthetic, epoch 2 step 1, global step 6; val_acc"), mid
    assert f"val_acc {rows[1]['val_acc']:.4f} after epoch 2" in text, text
    ignored = _cli(tmp_path, run, "--data-root", tmp_path)  # synthetic data has no folder: refused, not ignored
    assert ignored.returncode == 2 and "trained on data=synthetic, which is generated" in ignored.stderr, ignored.stderr
    own = _cli(tmp_path, run, "--checkpoint", "step_00000002.pt")
    assert "val_acc" not in own.stdout and "note:" not in own.stderr
    # a path to a file elsewhere (here another run's, in effect) is scored with the config it carries: said so
    other = _cli(tmp_path, run, "--checkpoint", str(tmp_path / "step_00000006.pt"))
    assert other.returncode == 0 and (f"note: {tmp_path / 'step_00000006.pt'} is not one of {run}'s checkpoints: "
                                      f"scored with the config it carries (allcnn_c on synthetic)") in other.stderr
    here = _cli(tmp_path, run, "--checkpoint", "./step_00000006.pt")  # a folder part: that path (it was the run's)
    assert here.returncode == 0 and "is not one of" in here.stderr and here.stdout.startswith(
        "step_00000006.pt (allcnn_c on synthetic, epoch 1 step 2, global step 2"), (here.stdout, here.stderr)


def test_a_sweep_folder_names_its_run_folders(tmp_path):
    """`evaluate SWEEP` (the folder of `submit -m`) says it is a sweep and names run folders that work."""
    sweep = tmp_path / "sweep"
    # cluster=local on this machine; Slurm's commands off PATH, so nothing can reach a cluster
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "-m", "--wait", "cluster=local", "cluster.array_parallelism=2",
                        *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"], env=clean_env(tmp_path, PATH=path),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (sweep / "sweep.json").is_file() and not (sweep / "checkpoints").exists()

    def named(*args, said: str = "is a sweep folder (allconv-hpc submit -m), not a run folder") -> list[str]:
        r = _cli(tmp_path, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{sweep} {said}" in r.stderr, r.stderr
        return re.findall(r"'([^']*)'", r.stderr)
    assert named(sweep) == [str(sweep / "seed=0"), str(sweep / "seed=1")]
    assert named(sweep, "--checkpoint", "last") == [str(sweep / "seed=0"), str(sweep / "seed=1")]
    ok = _cli(tmp_path, named(sweep)[0], "--json")  # what it names is what evaluate takes
    assert ok.returncode == 0 and json.loads(ok.stdout)["images"] == 101, ok.stderr
    shutil.rmtree(sweep / "seed=0" / "checkpoints")  # a point not started yet: only the scorable ones are named
    (sweep / "seed=0" / "checkpoints").mkdir()  # (a start that saved nothing leaves an empty one)
    assert named(sweep) == [str(sweep / "seed=1")]
    step = sorted((sweep / "seed=1" / "checkpoints").glob("step_*.pt"))[0]  # stopped before its first epoch ended:
    shutil.copy(step, sweep / "seed=0" / "checkpoints" / step.name)  # a step checkpoint, no best.pt
    assert named(sweep) == [str(sweep / "seed=1")]  # --checkpoint best (the default) could not score seed=0
    assert named(sweep, "--checkpoint", "last") == [str(sweep / "seed=0"), str(sweep / "seed=1")]
    (sweep / "sweep.json").unlink()  # without sweep.json: run folders and no checkpoints/ of its own
    assert named(sweep, said="holds run folders but is not one") == [str(sweep / "seed=1")]
    shutil.rmtree(sweep / "seed=1" / "checkpoints")
    assert named(sweep, said="holds run folders but is not one: evaluate one of them once one holds best.pt "
                             "(none does yet)") == []
    assert named(sweep, "--checkpoint", "last", said="holds run folders but is not one: evaluate one of them, "
                 "e.g.") == [str(sweep / "seed=0")]
    # a run folder is still told about its checkpoints/, not called a sweep
    r = _cli(tmp_path, sweep / "seed=0")
    assert r.returncode == 2 and "no best.pt in" in r.stderr and "sweep folder" not in r.stderr, r.stderr
    r = _cli(tmp_path, sweep / "seed=1")
    assert r.returncode == 2 and "no checkpoint" in r.stderr and "sweep folder" not in r.stderr, r.stderr


def test_a_moved_dataset_and_a_missing_held_out_split_are_named(tmp_path, capsys):
    (xtr, ytr), (xte, yte) = _fake_cifar(120, 0), _fake_cifar(40, 1)
    data.write_cifar(tmp_path / "old", "cifar10", xtr, ytr, xte, yte, [f"c{i}" for i in range(10)])
    run = tmp_path / "run"
    ov = [o for o in TINY if not o.startswith("data.")] + ["data=cifar10", f"data.root={tmp_path / 'old'}",
                                                          "data.augment=none", "data.download=true"]
    run_train(tmp_path, run, ov)  # the data is there: nothing downloaded; nor by evaluate, which names it
    hydra = run / ".hydra" / "config.yaml"
    kept = hydra.read_text()
    # the run resumed since on a copy that is gone now (a node's own disk): the checkpoint's root still holds the
    # data, and is read (a diff review found it refused)
    hydra.write_text(kept.replace(str(tmp_path / "old"), str(tmp_path / "gone")))
    assert evaluate(run, "best")["other_images"] is None
    (tmp_path / "old").rename(tmp_path / "new")
    with pytest.raises(ConfigError, match=r"cifar-10-batches-py.*Give --data-root DIR, the folder that holds "
                                          r"cifar-10-batches-py now") as e:
        evaluate(run, "last")
    assert "data.download" not in str(e.value)  # options evaluate does not have are not offered
    # resumed since with the new root (the run records it), its best.pt written before: found there (it named the
    # old root only; a Slurm journey audit)
    hydra.write_text(kept.replace(str(tmp_path / "old"), str(tmp_path / "new")))
    assert evaluate(run, "best")["other_images"] is None
    # a checkpoint file that is not the run's own (a set-aside run's, another's) is scored as its config says
    shutil.copy(run / "checkpoints" / "best.pt", tmp_path / "elsewhere.pt")
    with pytest.raises(ConfigError, match=r"old/cifar-10-batches-py.*Give --data-root DIR"):
        evaluate(run, str(tmp_path / "elsewhere.pt"))
    hydra.write_text(kept)
    moved = evaluate(run, "last", data_root=str(tmp_path / "new"))
    final = read_history(run / "history.csv")[-1]  # one rank, same batches, same threads: exactly the trainer's
    assert (moved["images"], moved["accuracy"], moved["loss"]) == (40, final["val_acc"], final["val_loss"])
    with pytest.raises(ConfigError, match=r"no held-out split \(data.val_size=0\).*--split test"):
        evaluate(run, "best", "val", data_root=str(tmp_path / "new"))
    assert moved["other_images"] is None
    # a folder of other images is scored, and said to be other than the run's (its checkpoints record them)
    (xo, yo) = _fake_cifar(40, 5)
    data.write_cifar(tmp_path / "other", "cifar10", xtr, ytr, xo, yo, [f"c{i}" for i in range(10)])
    assert evaluate(run, "last", data_root=str(tmp_path / "other"))["other_images"] == \
        "test images: 40 then, 40 now, other images"
    # --test-size all is the run's own test split here (it trained with data.test_size=null): checked alike
    assert evaluate(run, "last", data_root=str(tmp_path / "other"), test_size="all")["other_images"] == \
        "test images: 40 then, 40 now, other images"
    assert evaluate(run, "last", data_root=str(tmp_path / "other"), test_size=30)["other_images"] is None
    # gcn_zca: the whitening is fitted again on the training images; other ones with the same test images scored
    # another way unsaid (found by a laptop journey audit)
    zca = tmp_path / "zca"
    run_train(tmp_path, zca, ov[:-2] + [f"data.root={tmp_path / 'new'}", "data.augment=none",
                                        "data.preprocess=gcn_zca"])
    (xt2, yt2) = _fake_cifar(120, 7)
    data.write_cifar(tmp_path / "mix", "cifar10", xt2, yt2, xte, yte, [f"c{i}" for i in range(10)])
    assert evaluate(zca, "last", data_root=str(tmp_path / "new"))["other_images"] is None
    assert evaluate(zca, "last", data_root=str(tmp_path / "mix"))["other_images"] == \
        "training images: 120 then, 120 now, other images"
    r = _cli(tmp_path, zca, "--data-root", str(tmp_path / "mix"))
    assert r.returncode == 0 and ("warning: the whitening (data.preprocess=gcn_zca) is fitted on other training "
                                  "images than the run's (training images: 120 then") in r.stderr, r.stderr
    # more than there are: said as the option given, whose every image is `all` (not data.test_size's null); past
    # this copy's 40 by the loader's check, past CIFAR-10's 10,000 by the config's
    with pytest.raises(data.DataError, match=r"^--test-size 41 is larger than the 40 images available; use <= 40 or "
                                             r"all$"):
        evaluate(run, "last", data_root=str(tmp_path / "other"), test_size=41)
    with pytest.raises(ConfigError, match=r"^--test-size 10001 is larger than the 10000 cifar10 images; use <= 10000 "
                                          r"or all$") as e:
        evaluate(run, "last", data_root=str(tmp_path / "other"), test_size=10001)
    assert not isinstance(e.value, data.DataError)
    code = evaluate_main([str(run), "--checkpoint", "last", "--data-root", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 0 and ("warning: these are not the images the run scored (test images: 40 then, 40 now, other "
                          "images; another copy or dataset?)") in err, err


def test_test_size_batch_size_and_a_missing_last_pt(two_rank_run, tmp_path, capsys):
    """--test-size scores other test images than the run's data.test_size (all of them, or N); --batch-size only
    splits the work; `last` without last.pt (deleted) is the newest step file, which it links."""
    last = evaluate(two_rank_run, "last")
    every = evaluate(two_rank_run, "last", test_size="all")
    assert (last["images"], every["images"]) == (101, SYNTHETIC_SIZES[1]) and every["other_images"] is None
    assert evaluate(two_rank_run, "last", test_size=50)["images"] == 50
    small = evaluate(two_rank_run, "last", batch_size=7)
    assert small["accuracy"] == last["accuracy"] and math.isclose(small["loss"], last["loss"], rel_tol=1e-5)
    with pytest.raises(ConfigError, match="--test-size is for --split test"):
        evaluate(two_rank_run, "best", "val", test_size=50)
    run = tmp_path / "run"
    shutil.copytree(two_rank_run / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "last.pt").unlink()
    newest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    got = evaluate(run, "last")
    assert got["checkpoint"] == str(newest) and got["accuracy"] == last["accuracy"]
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(run), "--test-size", "0"])
    assert e.value.code == 2 and "argument --test-size: '0' is not a whole number >= 1" in capsys.readouterr().err


def test_a_relative_data_root_is_recorded_absolute(tmp_path):
    """train's data.root as seen from where it started: evaluate and a resume from another folder find it, and a
    resume reads another root only when told to."""
    (xtr, ytr), (xte, yte) = _fake_cifar(120, 0), _fake_cifar(40, 1)
    data.write_cifar(tmp_path / "data", "cifar10", xtr, ytr, xte, yte, [f"c{i}" for i in range(10)])
    run = tmp_path / "run"
    ov = [o for o in TINY if not o.startswith("data.")] + ["data=cifar10", "data.root=data", "data.augment=none"]
    r = subprocess.run([PY, "-m", "allconv_hpc", "train", *ov, f"hydra.run.dir={run}"], cwd=tmp_path,
                       env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"root: {tmp_path / 'data'}" in (run / ".hydra" / "config.yaml").read_text()
    assert evaluate(run, "last")["images"] == 40  # from the test's own folder, not tmp_path

    def rerun(cwd: Path, *more: str) -> subprocess.CompletedProcess:
        base = [o for o in ov if o != "data.root=data"]  # the default root: ./data, wherever the rerun starts
        return subprocess.run([PY, "-m", "allconv_hpc", "train", *base, *more, f"hydra.run.dir={run}"], cwd=cwd,
                              env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    # a resume from a folder without ./data reads the run's own (it failed naming ./data there)
    (tmp_path / "elsewhere").mkdir()
    r = rerun(tmp_path / "elsewhere", "trainer.epochs=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"data.root {tmp_path / 'data'}: this run's, recorded in {run / '.hydra'}/config.yaml (the default "
            f"resolves to {tmp_path / 'elsewhere' / 'data'} here)") in r.stdout, r.stdout[-2000:]
    assert len(read_history(run / "history.csv")) == 3
    # ./data there holding another dataset (40 test images -> 10) is not read behind the user's back
    (xtr2, ytr2), (xte2, yte2) = _fake_cifar(120, 2), _fake_cifar(10, 3)
    data.write_cifar(tmp_path / "elsewhere" / "data", "cifar10", xtr2, ytr2, xte2, yte2, [f"c{i}" for i in range(10)])
    assert rerun(tmp_path / "elsewhere", "trainer.epochs=4").returncode == 0
    assert read_history(run / "history.csv")[-1]["epoch"] == 4 and "root: " + str(tmp_path / "data") in (
        run / ".hydra" / "config.yaml").read_text()
    # named on the command line, another root is read (a moved dataset), with a warning naming both
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    r = rerun(tmp_path / "elsewhere", "trainer.epochs=5", f"data.root={tmp_path / 'moved'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"WARNING] data.root={tmp_path / 'moved'} is not the {tmp_path / 'data'} this run read "
            f"before") in r.stderr, r.stderr[-2000:]
    assert evaluate(run, "last")["images"] == 40 and f"root: {tmp_path / 'moved'}" in (
        run / ".hydra" / "config.yaml").read_text()  # its record now names the new root
    # one holding other images is refused before a step (the run would go on on other data): nothing changes
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = rerun(tmp_path / "elsewhere", "trainer.epochs=6", "data.root=data")
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"trained on other images than data.root={tmp_path / 'elsewhere' / 'data'} holds (it trained on "
            f"{tmp_path / 'moved'}) (training images: 120 then, 120 now, other images; test images: 40 then, 10 now): "
            f"give data.root the folder it trained on") in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept
    assert read_history(run / "history.csv")[-1]["epoch"] == 5 and f"root: {tmp_path / 'moved'}" in (
        run / ".hydra" / "config.yaml").read_text()


def test_best_before_any_finished_epoch_points_at_last(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000059.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"no best.pt in .*: no epoch has finished yet \(it holds "
                                          r"step_00000059.pt\); use --checkpoint last"):
        evaluate(tmp_path / "run", "best")


def test_a_run_without_any_checkpoint_says_so_and_points_at_status(tmp_path):
    """A job cancelled before it started (or still pending): no checkpoint to pick, so none is offered."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "submission.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"{run} has no checkpoint yet: its run has not saved one \(allconv-hpc "
                                          rf"status {run} shows how far it got\)"):
        evaluate(run, "best")
    with pytest.raises(ConfigError, match=rf"no checkpoint {tmp_path}/x.pt \(checkpoints/ holds nothing\)"):
        evaluate(run, str(tmp_path / "x.pt"))  # a file asked for by name: named
    with pytest.raises(ConfigError, match=rf"--checkpoint {tmp_path} is a folder, not a checkpoint file \(checkpoints/ "
                                          rf"holds nothing\)"):  # (it said "no checkpoint" of a folder that is there)
        evaluate(run, str(tmp_path))
    (run / "status.json").write_text('{"state": "completed", "epoch": 3, "epochs": 3}')  # it trained: files gone
    with pytest.raises(ConfigError, match=rf"{run} has no checkpoint, though its status.json says 3 epoch\(s\) done: "
                                          rf"its checkpoints/ files were removed or moved since"):
        evaluate(run, "last")
    (run / "checkpoints").write_text("")  # not "no checkpoint yet": what is there is wrong
    with pytest.raises(ConfigError, match=rf"{run}/checkpoints is a file, not the run's checkpoint folder"):
        evaluate(run, "best")


def test_a_checkpoint_given_as_the_run_gets_the_command_that_scores_it(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"{ckpt} is a checkpoint, not a run folder; give its run and the file: "
                                          rf"allconv-hpc evaluate {tmp_path}/run --checkpoint best.pt"):
        evaluate(ckpt, "best")
    # its checkpoints/ folder given as the run: the run's folder named
    with pytest.raises(ConfigError, match=rf"{ckpt.parent} is a run's checkpoint folder; give its run folder: "
                                          rf"allconv-hpc evaluate {tmp_path}/run$"):
        evaluate(ckpt.parent, "best")
    with pytest.raises(ConfigError, match=rf"give its run folder: allconv-hpc evaluate {tmp_path}/run --checkpoint "
                                          rf"last$"):
        evaluate(ckpt.parent, "last")
    for empty in ("", " "):  # Path("") is the current folder: once "no checkpoint ."
        with pytest.raises(ConfigError, match=r"^--checkpoint is empty; give best, last, a file in checkpoints/ or "):
            evaluate(tmp_path / "run", empty)


def test_a_set_aside_runs_checkpoint_folder_gets_the_command_that_scores_its_files(tmp_path):
    """checkpoint.resume=never moves a run's checkpoints (and history, W&B files) to checkpoints.old1/: given as
    the run, it was "has no checkpoint yet" with a status command that fails; the command it names scores one."""
    run = tmp_path / "run"
    run_train(tmp_path, run, TINY)
    run_train(tmp_path, run, TINY + ["checkpoint.resume=never", "seed=1"])
    old = run / "checkpoints.old1"
    assert (old / "best.pt").is_file() and not (old / "checkpoints").exists()
    for which, name in (("best", "best.pt"), ("last", "last.pt"), ("step_00000010.pt", "step_00000010.pt")):
        with pytest.raises(ConfigError) as e:
            evaluate(old, which)
        assert str(e.value) == (f"{old} holds the checkpoints of a run set aside by checkpoint.resume=never, not a "
                                f"run folder; score one of its files by path: allconv-hpc evaluate {run} "
                                f"--checkpoint {old / name}"), str(e.value)
    r = _cli(tmp_path, run, "--checkpoint", old / "best.pt", "--json")  # what it names: the old run's file scored
    assert r.returncode == 0, r.stderr
    best = max(row["val_acc"] for row in read_history(old / "history.csv"))
    assert json.loads(r.stdout)["val_acc_when_saved"] == best
    (old / "best.pt").unlink()  # no finished epoch's best.pt: the file that is there
    with pytest.raises(ConfigError, match=rf"by path \(it holds no best.pt\): allconv-hpc evaluate {run} --checkpoint "
                                          rf"{old}/last.pt$"):
        evaluate(old, "best")
    for f in old.glob("*.pt"):  # set aside with no checkpoint (they were gone): nothing to score, said so; it was
        f.unlink()  # "has no checkpoint yet", naming a status command that fails (laptop journey audit)
    with pytest.raises(ConfigError, match=rf"^{old} holds what was set aside of an earlier run of {run} \(no "
                                          rf"checkpoint file in it\), nothing to score; .*allconv-hpc evaluate "
                                          rf"{run}$"):
        evaluate(old, "best")


def test_a_folder_that_is_no_run_is_named_so(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=rf"{tmp_path}/plain is not a run folder \(no checkpoints/, nothing train "
                                          rf"writes\)"):
        evaluate(tmp_path / "plain", "best")
