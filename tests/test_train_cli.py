"""`allconv-hpc train` end to end, as real processes: the run folder, learning, W&B offline read-back.

One tiny offline run (console script) is shared by the run-folder and W&B tests; its twin, run as
`python -m allconv_hpc` with W&B disabled, must train bitwise the same and write no wandb/.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from allconv_hpc.checkpoint import load_file, write_file
from allconv_hpc.config import from_dict
from allconv_hpc.models import build_model, count_parameters
from allconv_hpc.provenance import code_version, describe
from allconv_hpc.history import HISTORY_FIELDS, read_history
from allconv_hpc.tracking import EVAL_KEYS
from allconv_hpc.wandb_offline import merged_history, read_run, segments
from proc import PY, clean_env

HEADER = "epoch,step,lr,train_loss,train_acc,val_loss,val_acc,epoch_seconds,images_per_second"
FAKE_KEY = "local-fakekey0123456789abcdef0123456789abcdef0123456789abcd"

EPOCHS, TRAIN, BATCH, LOG_EVERY = 3, 320, 64, 2
STEPS_PER_EPOCH = math.ceil(TRAIN / BATCH)  # 5: epochs end at odd steps, so eval and train steps interleave
TOTAL = EPOCHS * STEPS_PER_EPOCH
TINY = ["data=synthetic", f"data.train_size={TRAIN}", "data.test_size=64", "model.width=0.125",
        f"trainer.batch_size={BATCH}", f"trainer.epochs={EPOCHS}", "trainer.threads=1", "trainer.progress=log",
        f"trainer.log_every_steps={LOG_EVERY}"]


def console_script() -> str:
    exe = Path(sys.executable).with_name("allconv-hpc")
    return str(exe) if exe.exists() else shutil.which("allconv-hpc")


def train(tmp: Path, run_dir: Path, overrides: list[str], module: bool = False, timeout: float = 300, **env):
    cmd = [sys.executable, "-m", "allconv_hpc"] if module else [console_script()]
    t0 = time.monotonic()
    r = subprocess.run([*cmd, "train", *overrides, f"hydra.run.dir={run_dir}"], env=clean_env(tmp, **env),
                       capture_output=True, text=True, timeout=timeout, cwd=tmp)
    r.elapsed = time.monotonic() - t0
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def _shared_run(tmp_path_factory, name: str, overrides: list[str], **kw):
    tmp = tmp_path_factory.mktemp(name)
    return tmp / "run", train(tmp, tmp / "run", [*TINY, *overrides], **kw)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    return _shared_run(tmp_path_factory, "offline", ["wandb.mode=offline"], WANDB_API_KEY=FAKE_KEY)


@pytest.fixture(scope="module")
def disabled_module_run(tmp_path_factory):
    return _shared_run(tmp_path_factory, "disabled", ["wandb.mode=disabled"], module=True)


def _history(run_dir: Path) -> list[dict]:
    return read_history(run_dir / "history.csv")


def _model_cfg(run_dir: Path):
    return from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))).model


# ----------------------------------------------------------------------------- the run folder


def test_run_folder_has_everything(offline_run):
    run_dir, r = offline_run
    # the console's last word on W&B syncs every start of the run, below wandb's footer naming this one's segment
    assert r.stdout.rstrip().splitlines()[-1].endswith(
        f"W&B offline: `wandb sync {run_dir}/wandb/offline-run-*` uploads every start of this run, in order "
        f"(wandb's own sync line names this start's alone)"), r.stdout[-2000:]

    # .hydra/config.yaml: the resolved task config (no interpolations left, no hydra/cluster keys)
    text = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "${" not in text
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    assert cfg["model"]["name"] == "allcnn_c" and cfg["model"]["num_classes"] == 10
    assert cfg["model"]["width"] == 0.125 and cfg["trainer"]["epochs"] == EPOCHS
    assert "hydra" not in cfg and "cluster" not in cfg
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / ".hydra" / "hydra.yaml").is_file()

    # history.csv: exact header, one sane row per epoch
    lines = (run_dir / "history.csv").read_text().splitlines()
    assert lines[0] == HEADER == ",".join(HISTORY_FIELDS)
    rows = _history(run_dir)
    assert len(lines) == 1 + EPOCHS and len(rows) == EPOCHS
    assert [h["epoch"] for h in rows] == list(range(1, EPOCHS + 1))
    assert [h["step"] for h in rows] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    for h in rows:
        assert 0.0 <= h["train_acc"] <= 1.0 and 0.0 <= h["val_acc"] <= 1.0
        # val_acc is a count over 64 test images
        assert (h["val_acc"] * 64) == round(h["val_acc"] * 64)
        for k in ("train_loss", "val_loss", "lr"):
            assert math.isfinite(h[k]) and h[k] > 0, (k, h)
        assert h["epoch_seconds"] > 0 and h["images_per_second"] > 0
        assert h["images_per_second"] == pytest.approx(TRAIN / h["epoch_seconds"], rel=1e-9)

    # checkpoints: last.pt and best.pt load, and their weights load strictly into the configured model
    model_cfg = _model_cfg(run_dir)
    last = load_file(run_dir / "checkpoints" / "last.pt")
    best = load_file(run_dir / "checkpoints" / "best.pt")
    for ck in (last, best):
        model = build_model(model_cfg)
        model.load_state_dict(ck["model"], strict=True)
    assert last["train_state"]["epoch"] == EPOCHS and last["train_state"]["global_step"] == TOTAL
    best_acc = max(h["val_acc"] for h in rows)
    assert best["val_acc"] == best_acc
    assert best["epoch"] == next(h["epoch"] for h in rows if h["val_acc"] == best_acc)
    assert best["config"] == cfg

    # train.log: the model summary and one line per epoch (plus the train lines every 2 steps)
    log = (run_dir / "train.log").read_text()
    n_params = count_parameters(build_model(model_cfg))
    assert "total parameters" in log and f"{n_params:,}" in log
    for e in range(1, EPOCHS + 1):
        assert f"epoch {e}/{EPOCHS}: train loss" in log
    for s in range(LOG_EVERY, TOTAL + 1, LOG_EVERY):
        assert f"(global {s}):" in log
    assert log.rstrip().splitlines()[-2].endswith(f"done: best val_acc {best_acc:.4f}, final {rows[-1]['val_acc']:.4f}")
    assert "W&B offline: `wandb sync " in log.rstrip().splitlines()[-1]  # then where to sync every start
    assert set(log.splitlines()) <= set(r.stdout.splitlines())  # rank 0 logs to stdout too

    # wandb/: one offline segment, id recorded next to it
    segs = segments(run_dir / "wandb")
    assert len(segs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert segs[0].name.startswith("offline-run-") and segs[0].name.endswith(run_id)

    # status.json
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed"
    assert (status["epoch"], status["epochs"], status["global_step"]) == (EPOCHS, EPOCHS, TOTAL)
    assert status["best_val_acc"] == best_acc and status["last_val_acc"] == rows[-1]["val_acc"]
    assert status["wandb_id"] == run_id and status["precision"] == "fp32"
    assert status["run_dir"] == str(run_dir.absolute())  # what tells a copy of the folder from it (status: COPY)
    # the code that trained it: in status.json, each checkpoint, the log's first line and W&B's summary
    code = code_version()
    assert status["code"] == last["code"] == code and code["version"], (status["code"], code)
    assert f"run folder {run_dir}; code: {describe(code)}" in log
    assert read_run(segs[0])["summary"]["code"] == describe(code)


def test_wandb_offline_read_back(offline_run):
    run_dir, _ = offline_run
    rows = _history(run_dir)
    (seg,) = segments(run_dir / "wandb")
    run = read_run(seg)
    assert run["id"] == (run_dir / "wandb_id.txt").read_text().strip()
    assert run["exit_code"] == 0

    # train metrics every LOG_EVERY steps, and only then
    train = [h for h in run["history"] if "train/loss" in h]
    assert [h["_step"] for h in train] == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))  # 2, 4, ..., 14
    for h in train:
        for k in ("train/loss", "train/acc", "train/lr", "train/images_per_second"):
            assert k in h and math.isfinite(h[k]), (k, h)
        assert 0.0 <= h["train/acc"] <= 1.0 and h["train/lr"] > 0 and h["train/images_per_second"] > 0

    # one eval entry per epoch, equal to history.csv. It is logged at the step after the epoch's last
    # one (trainer._end_epoch: a step no earlier log used, even when an eval is redone after a stop).
    evals = [h for h in run["history"] if "val/acc" in h]
    assert [h["_step"] for h in evals] == [r["step"] + 1 for r in rows]
    assert [h["val/acc"] for h in evals] == [r["val_acc"] for r in rows]
    assert [h["val/loss"] for h in evals] == [r["val_loss"] for r in rows]
    assert [h["epoch"] for h in evals] == [r["epoch"] for r in rows]
    for h, r in zip(evals, rows):  # the whole row, under tracking.EVAL_KEYS' names
        assert {EVAL_KEYS[k]: r[k] for k in EVAL_KEYS}.items() <= h.items(), (h, r)

    # no step logged twice as separate rows, none going backwards
    steps = [h["_step"] for h in run["history"]]
    assert steps == sorted(set(steps))

    assert run["summary"]["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert run["summary"]["final_val_acc"] == rows[-1]["val_acc"]

    # the W&B config is the resolved config, exactly as in .hydra/config.yaml
    assert run["config"] == OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def test_api_key_is_written_nowhere(offline_run):
    run_dir, _ = offline_run
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files)
    needle = FAKE_KEY.encode()
    leaked = [str(p) for p in files if needle in p.read_bytes()]
    assert leaked == []


# ----------------------------------------------------------------------------- W&B disabled, python -m


def test_disabled_writes_no_wandb(disabled_module_run):
    run_dir, r = disabled_module_run
    assert not (run_dir / "wandb").exists()
    assert not (run_dir / "wandb_id.txt").exists()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["wandb_id"] is None
    assert len(_history(run_dir)) == EPOCHS


def test_python_m_trains_the_same_as_the_console_script(offline_run, disabled_module_run):
    # same overrides but for wandb.mode: W&B must not change what is learned (bitwise, one thread)
    a, b = offline_run[0], disabled_module_run[0]
    ha, hb = _history(a), _history(b)
    timing = {"epoch_seconds", "images_per_second"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in ha] == \
           [{k: v for k, v in h.items() if k not in timing} for h in hb]
    wa, wb = load_file(a / "checkpoints" / "last.pt")["model"], load_file(b / "checkpoints" / "last.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / ".hydra" / "config.yaml").read_text().replace("offline", "disabled") == \
           (b / ".hydra" / "config.yaml").read_text()


# ----------------------------------------------------------------------------- it learns


# Found by a sweep over seeds 0-9 on this 2-core machine (final val_acc, chance 0.1): this setting
# gave 0.59-0.99 on 8/8 seeds tried (seed 0: 0.93; a later sweep of seeds 0-5: 0.37-0.98, below); dropout keeps the tiny, BN-free net from the
# loss spikes that sent runs without it (or at higher lr) back to chance. Everything that matters is
# pinned here so that changed config defaults do not change the test.
LEARN = ["data=synthetic", "data.train_size=2048", "data.test_size=256", "data.augment=none",
         "model=strided_cnn_c", "model.width=0.25", "model.dropout=true", "model.input_dropout=0.2",
         "model.hidden_dropout=0.5", "model.final_relu=false",
         "optim.lr=0.02", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=0.001",
         "optim.scale_lr=false", "schedule=cosine", "schedule.warmup_epochs=1", "schedule.final_lr_ratio=0",
         "trainer.batch_size=64", "trainer.epochs=4", "trainer.threads=1", "trainer.progress=log",
         "trainer.log_every_steps=8", "wandb.mode=disabled", "seed=0"]


@pytest.mark.slow
def test_a_run_that_stopped_before_its_first_checkpoint_is_not_taken_over_by_another_config(tmp_path):
    """A run that diverged at once left no checkpoint, but its .hydra/config.yaml, history and W&B id: the same
    folder with another optim.lr is refused (as with a checkpoint), not trained into under the old W&B run."""
    run, base = tmp_path / "run", [*TINY, "trainer.epochs=1", "wandb.mode=offline", "checkpoint.every_steps=null"]
    r = subprocess.run([console_script(), "train", *base, "optim.lr=100000", "schedule.warmup_epochs=0",
                        f"hydra.run.dir={run}"], env=clean_env(tmp_path), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and "no checkpoint was written yet" in r.stderr, r.stderr[-2000:]
    assert not (run / "checkpoints").exists() and (run / ".hydra" / "config.yaml").exists()
    before = (run / "wandb_id.txt").read_text()
    r = subprocess.run([console_script(), "train", *base, "optim.lr=0.05", f"hydra.run.dir={run}"],
                       env=clean_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"run folder {run} holds a run of a different config (optim.lr: 100000 -> 0.05; schedule.warmup_epochs: "
            f"0 -> 1.0)") in r.stderr
    assert ("an override left out of this command, or one given by mistake? optim.lr=100000 schedule.warmup_epochs=0 "
            "resumes that run") in r.stderr
    assert (run / "wandb_id.txt").read_text() == before and len(list((run / "wandb").glob("offline-run-*"))) == 1
    # starting over is one flag away; the old run's files are kept aside
    train(tmp_path, run, [*base, "optim.lr=0.05", "checkpoint.resume=never"])
    assert (run / "checkpoints.old1" / "wandb_id.txt").read_text() == before
    assert (run / "wandb_id.txt").read_text() != before


def test_a_copied_run_folder_is_said_to_share_the_w_and_b_run_and_a_moved_one_is_not(tmp_path):
    """cp -r of a run folder, then training the copy: both hold the same W&B id, and training both mixes two
    histories in one W&B run: the copy's first resume says so. A folder moved (mv) is the same run: no word."""
    base = [*TINY, "trainer.epochs=1", "wandb.mode=offline"]
    train(tmp_path, tmp_path / "run", base)
    shutil.copytree(tmp_path / "run", tmp_path / "copy", symlinks=True)
    wid = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    r = train(tmp_path, tmp_path / "copy", [*base, "trainer.epochs=2"])
    assert (f"this run folder is a copy of {tmp_path / 'run'} (its checkpoints were written there), which still holds "
            f"the run: both log to W&B run {wid}") in r.stderr, r.stderr[-2000:]
    (tmp_path / "run").rename(tmp_path / "moved")
    r = train(tmp_path, tmp_path / "moved", [*base, "trainer.epochs=2"])
    assert "is a copy of" not in r.stderr and "resumed from" in r.stdout, r.stderr[-2000:]
    # its history.csv deleted after it completed: the same command, which has nothing to train, writes it again
    rows = _history(tmp_path / "moved")
    (tmp_path / "moved" / "history.csv").unlink()
    r = train(tmp_path, tmp_path / "moved", [*base, "trainer.epochs=2"])
    assert "nothing to do" in r.stdout and "history.csv was missing: written again" in r.stderr, r.stderr[-2000:]
    assert _history(tmp_path / "moved") == rows and len(rows) == 2
    # cut to its last row, headless (an append after a deletion, before the fix): rewritten too, the cut copy kept
    cut = (tmp_path / "moved" / "history.csv").read_text().splitlines(keepends=True)[-1]
    (tmp_path / "moved" / "history.csv").write_text(cut)
    r = train(tmp_path, tmp_path / "moved", [*base, "trainer.epochs=2"])
    assert "nothing to do" in r.stdout and "(edited by hand?)" in r.stderr, r.stderr[-2000:]
    assert _history(tmp_path / "moved") == rows and (tmp_path / "moved" / "history.csv.edited1").read_text() == cut


def test_a_resume_with_other_code_than_its_checkpoint_says_so(tmp_path):
    """A job requeued after its code was edited (or pulled) resumes with the new code: legal, but its curves then
    come from two versions, so the resume names both."""
    base = [*TINY, "trainer.epochs=1", "wandb.mode=disabled"]
    train(tmp_path, tmp_path / "run", base)
    older = {**code_version(), "version": "0.0.1", "git_sha": "0" * 40, "git_dirty": False}
    for f in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        if f.name != "best.pt":
            ck = load_file(f)
            write_file(f, {**ck, "code": older})
    r = train(tmp_path, tmp_path / "run", [*TINY, "trainer.epochs=2", "wandb.mode=disabled"])
    assert (f"resuming with other code than the checkpoint's (the code was allconv-hpc 0.0.1, git 000000000000, "
            f"now {describe(code_version())}): what follows is trained by the new code") in r.stderr, r.stderr[-2000:]
    r = train(tmp_path, tmp_path / "run", [*TINY, "trainer.epochs=3", "wandb.mode=disabled"])
    assert "resumed from" in r.stdout and "other code" not in r.stderr, r.stderr[-2000:]  # its own checkpoint


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_and_kept(tmp_path):
    """Whole checkpoints (their checksums hold) whose weights do not fit the net, as other code (a layer renamed
    or resized between requeues) or a hand would make them: one line naming the file and the fix, in train and
    evaluate (they were tracebacks), the files kept as they were; a checkpoint without an optimizer likewise."""
    import hashlib
    base = [*TINY, "trainer.epochs=1", "wandb.mode=disabled"]
    train(tmp_path, tmp_path / "run", base)
    files = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    for f in files:
        ck = load_file(f)
        write_file(f, {**ck, "model": {k: v[:1] if v.dim() else v for k, v in ck["model"].items()}})
    sums = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    def cli(*args):
        return subprocess.run([console_script(), *args], env=clean_env(tmp_path), capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    r = cli("train", *TINY, "trainer.epochs=2", "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}")
    last = [f for f in files if f.name.startswith("step_")][-1]  # the newest, which a resume reads
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"{last} is intact (its checksum holds) but does not fit this run's model or optimizer (RuntimeError: "
            f"Error(s) in loading state_dict for ") in r.stderr and "size mismatch for " in r.stderr, r.stderr[-3000:]
    assert "a run starts over with checkpoint.resume=never (its old checkpoints are kept)" in r.stderr
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == sums
    r = cli("evaluate", "--checkpoint", "last", str(tmp_path / "run"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # `last` is what a resume takes, the newest step file: named as train names it
    assert f"error: {last} is intact (its checksum holds) but does not fit" in r.stderr, r.stderr
    ck = load_file(last)
    write_file(last, {k: v for k, v in ck.items() if k != "optimizer"})
    r = cli("train", *TINY, "trainer.epochs=2", "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{last} is intact (its checksum holds) but does not fit this run's model or optimizer (KeyError: " \
           f"'no optimizer')" in r.stderr, r.stderr[-3000:]


def test_learns_synthetic_well_above_chance(tmp_path):
    run_dir = tmp_path / "run"
    r = train(tmp_path, run_dir, LEARN)
    rows = _history(run_dir)
    assert len(rows) == 4
    # chance is 0.1 (loss 2.30); over seeds 0-5: final val_acc 0.37-0.98, train loss down by 0.58-2.1 (half
    # the seeds find the squares within these 4 epochs, half are on their way)
    assert rows[-1]["val_acc"] >= 0.3, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.4
    print(f"learn run: {r.elapsed:.1f} s, val_acc {[h['val_acc'] for h in rows]}")


@pytest.mark.slow
@pytest.mark.parametrize("server", ["refuses", "fails"])
def test_online_init_without_network_logs_offline_and_says_so(tmp_path, server):
    """A compute node with no route to W&B: the run logs offline (the same id), and train.log and status.json say
    so. "refuses": the server's address refuses connections, found by a probe before wandb.init, which waited
    about 90 s at every start (each requeue, each sweep point) first (laptop journey audit). "fails": a server
    that answers, but not as W&B: wandb.init's own failure (a short init timeout). (W&B's service kept the failed
    id, and a plain second init died with 'run ID ... is in use'.)"""
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_POST = do_HEAD = _fail

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:9" if server == "refuses" else f"http://127.0.0.1:{httpd.server_address[1]}"
    run_dir = tmp_path / "run"
    try:
        t0 = time.monotonic()
        no_proxy = {v: "" for v in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                                    "ALL_PROXY")}  # the probe leaves a server behind a proxy to wandb.init
        r = train(tmp_path, run_dir, [*TINY, "trainer.epochs=1", "wandb.mode=online"], timeout=400,
                  WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=url, WANDB_INIT_TIMEOUT=8, **no_proxy)
        took = time.monotonic() - t0
    finally:
        httpd.shutdown()
        httpd.server_close()
    log = (run_dir / "train.log").read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["wandb_mode"] == "offline" and status["wandb_online_error"]
    if server == "refuses":
        assert (f"W&B online: the server {url} cannot be reached from this node (Connection refused; tried for up "
                f"to 10 s); logging offline") in log, log[-3000:]
        assert "W&B online init failed" not in log and "connecting" not in log
        assert status["wandb_online_error"] == f"{url} unreachable: Connection refused"
        print(f"refused: the run took {took:.1f} s")  # no init timeout waited
    else:
        assert "W&B online init failed" in log and "cannot be reached" not in log, r.stdout[-2000:]
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert [p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*")] == [True]
    assert len(merged_history(run_dir / "wandb", run_id)) > 0  # the offline record holds the run


def test_torchrun_inside_a_slurm_job_is_warned_about(tmp_path):
    # torchrun's variables (one worker) inside a Slurm job: the warning signal would not reach the ranks
    r = train(tmp_path, tmp_path / "run", [*TINY, "trainer.epochs=1", "wandb.mode=disabled"], RANK=0,
              WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29555, SLURM_JOB_ID=4242)
    assert "started by torchrun inside Slurm job 4242" in r.stderr  # a warning: stderr (a job's .err file)
    assert "started by torchrun" not in r.stdout and "training synthetic on cpu" in r.stdout
    plain = train(tmp_path, tmp_path / "plain", [*TINY, "trainer.epochs=1", "wandb.mode=disabled",
                                                 "cluster.tasks_per_node=3", "schedule.decay=0.5"], RANK=0,
                  WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29556)
    assert "started by torchrun" not in plain.stdout + plain.stderr
    # cluster.* given to train: said to be submit's, not silently dropped
    assert ("cluster.tasks_per_node=3: cluster settings are read by allconv-hpc submit only; train runs as it was "
            "launched (here 1 rank(s))") in plain.stderr, plain.stderr
    # a schedule key the run's schedule never reads: said, not silently dropped
    assert "schedule.decay=0.5: schedule=paper does not read it, so it changes nothing" in plain.stderr
    assert "does not read it" not in r.stderr


def test_timed_checkpoints_come_at_the_interval_once_each(tmp_path):
    """checkpoint.every_minutes alone: saves come by the clock, and each due time gives one save
    (the stop poll is answered a step late; a due flag sent again before the save would add one)."""
    run_dir = tmp_path / "run"
    steps = 80
    train(tmp_path, run_dir, [*TINY, f"data.train_size={steps * BATCH}", "trainer.epochs=1",
                              "checkpoint.every_steps=null", "checkpoint.every_minutes=0.005", "checkpoint.keep=1000"])
    saved = sorted(int(p.stem[5:]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    timed = [s for s in saved if s != steps]  # the end-of-epoch save is at the last step
    assert saved[-1] == steps and len(timed) >= 2, saved
    assert all(b - a >= 2 for a, b in zip(timed, timed[1:])), saved  # never two saves for one due time


# ----------------------------------------------------------------------------- the GPU-path switches on CPU


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compile_channels_last_and_progress_bar_train_the_same(tmp_path):
    """torch.compile, channels_last and the progress bar run for real (on CPU) and change no result."""
    base = TINY + ["trainer.epochs=1", "wandb.mode=disabled", "model.dropout=false"]
    plain = train(tmp_path, tmp_path / "plain", base)
    fast = train(tmp_path, tmp_path / "fast", base + ["trainer.compile=true", "trainer.channels_last=true",
                                                      "trainer.progress=bar", "trainer.precision=auto",
                                                      "trainer.compile_mode=reduce-overhead"], timeout=600)
    a, b = _history(tmp_path / "plain"), _history(tmp_path / "fast")
    assert len(a) == len(b) == 1
    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert b[0][k] == pytest.approx(a[0][k], rel=1e-3, abs=1e-4), (k, a, b)
    assert "epoch 1" in fast.stderr and ("it/s" in fast.stderr or "s/it" in fast.stderr)  # tqdm's bar
    assert "epoch 1 step" not in fast.stdout  # the bar replaces the periodic log lines
    assert "epoch 1 step" in plain.stdout
    assert "precision fp32 (auto)" in fast.stdout and "precision fp32," not in fast.stdout  # auto is fp32 on a CPU
    assert re.search(r"torch.compile: [1-9]\d* graph\(s\) compiled \(mode reduce-overhead\)", fast.stdout), fast.stdout[-2000:]
    # CUDA graphs are CUDA's: said once, not silently dropped
    assert "trainer.compile_mode=reduce-overhead captures CUDA graphs on CUDA only: on cpu" in fast.stdout + fast.stderr


# ----------------------------------------------------------------------------- a non-editable install


@pytest.mark.slow
def test_compile_without_a_compiler_is_refused_before_any_work(tmp_path):
    """inductor would fail at the first step (InvalidCxxCompiler, a traceback) after the data load."""
    r = subprocess.run([console_script(), "train", *TINY, "trainer.compile=true", f"hydra.run.dir={tmp_path / 'run'}"],
                       env=clean_env(tmp_path, CXX=str(tmp_path / "no-such-g++")), capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"trainer.compile=true needs a C++ compiler (inductor builds CPU kernels with $CXX, here "
            f"'{tmp_path / 'no-such-g++'}') and finds none on this node") in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_signal_lead_that_is_no_number_is_refused_at_start_not_at_the_time_limit(tmp_path):
    """ALLCONV_SIGNAL_LEAD_S (exported by slurm/train.sbatch) was first read at the stop: a typo made the job
    fail with a traceback exactly where it should have checkpointed and requeued."""
    for bad in ("abc", "-1"):
        r = subprocess.run([console_script(), "train", *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                           env=clean_env(tmp_path, ALLCONV_SIGNAL_LEAD_S=bad), capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert (f"ALLCONV_SIGNAL_LEAD_S='{bad}' is not a number of seconds >= 0: set it to the seconds of the job's "
                f"--signal=...@SECONDS") in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()


def test_wheel_install_trains_from_any_folder(tmp_path):
    """The configs ship inside the wheel (as allconv_hpc.conf): a plain install works outside the repo."""
    repo = Path(__file__).resolve().parent.parent
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(repo)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("allconv_hpc-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = clean_env(tmp_path, PYTHONPATH=site)  # ahead of the editable install of this checkout
    where = subprocess.run([sys.executable, "-c", "import allconv_hpc; print(allconv_hpc.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", *TINY, "trainer.epochs=1",
                        "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(_history(tmp_path / "run")) == 1


def test_a_one_epoch_run_says_epoch_not_epochs(tmp_path):
    """The start line and a rerun of a completed run count one epoch as "1 epoch" (was "1 epochs")."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.epochs=1", "wandb.mode=disabled"]
    train(tmp_path, run, args, module=True)
    train(tmp_path, run, args, module=True)  # completed: nothing to do
    log = (run / "train.log").read_text()
    assert re.search(r"training synthetic on cpu: 1 rank\(s\), global batch 64, 5 steps/epoch, 1 epoch, lr ", log), log
    assert "this run completed its 1 epoch already: nothing to do" in log, log
    assert "1 epochs" not in log, log


def test_train_log_drops_submitits_sigcont_warning_only(tmp_path):
    """Slurm sends SIGCONT with its signals; submitit logs each as 'Bypassing signal SIGCONT', a WARNING
    in every preempted job's log. That one line is dropped; submitit's other warnings stay."""
    code = ("import logging, sys; from pathlib import Path; from allconv_hpc.train import setup_logging; "
            "setup_logging(Path(sys.argv[1]), 0); s = logging.getLogger('submitit'); "
            "s.warning('Bypassing signal SIGCONT'); s.warning('Bypassing signal SIGTERM'); "
            "s.warning('Bypassing sacct error x')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "train.log").read_text()
    assert "SIGCONT" not in log + r.stderr
    assert "Bypassing signal SIGTERM" in log and "Bypassing sacct error x" in log and "SIGTERM" in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "--print-config", "data=synthetic"]])
def test_output_into_a_closed_pipe_is_no_traceback(tmp_path, args):
    """`allconv-hpc status ... | head -2`: the reader leaves early; the command ends quietly (141, as SIGPIPE).
    So do train's --help and --print-config, which only print (a training run's broken pipe stays an error)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([PY, "-m", "allconv_hpc", *args], stdout=w, stderr=subprocess.PIPE, text=True,
                           timeout=60, cwd=tmp_path)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


def test_a_run_grows_only_where_trainer_epochs_is_given(tmp_path):
    """A command that left trainer.epochs out took the default 350 and grew a finished 1-epoch run to it, unsaid,
    its last checkpoints rotated away (found by a laptop journey audit): refused before any work, naming both
    ways on; given, it grows. `submit` refuses it alike, before the queue."""
    run = tmp_path / "run"
    short = [o for o in TINY if not o.startswith("trainer.epochs=")] + ["wandb.mode=disabled"]
    train = lambda *extra: subprocess.run(  # noqa: E731
        [PY, "-m", "allconv_hpc", "train", *short, *extra, f"hydra.run.dir={run}"], env=clean_env(tmp_path),
        capture_output=True, text=True, timeout=300)
    assert train("trainer.epochs=1").returncode == 0
    files = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    r = train()
    assert r.returncode == 2 and (f"run folder {run} holds a run of trainer.epochs=1, and this command gives no "
                                  f"trainer.epochs: it would grow that run to the config's 350 epochs") in r.stderr, \
        r.stderr[-2000:]
    assert "add trainer.epochs=1 to resume it as it was, or trainer.epochs=350 to grow it" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == files
    from allconv_hpc import launcher
    from allconv_hpc.config import ConfigError
    with pytest.raises(ConfigError, match="holds a run of trainer.epochs=1, and this command gives no"):
        launcher.plan(["cluster=local", *short, f"hydra.run.dir={run}"], multirun=False)
    assert train("trainer.epochs=2").returncode == 0
    assert [row["epoch"] for row in read_history(run / "history.csv")] == [1, 2]


def test_a_size_the_files_cannot_give_is_refused_before_the_run_folder_is_made(tmp_path):
    """data.test_size past the images of a copy cut short (the official count passes the config's check): train
    found it in the data load, after the run folder and its train.log were made, left as a FAILED row in `status`
    for good (found by a laptop journey audit). Refused first now, as submit does."""
    import numpy as np
    from allconv_hpc import data
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # noqa: E731
    data.write_cifar(tmp_path / "data", "cifar10", images(20), np.arange(20) % 10, images(10), np.arange(10) % 10,
                     [f"c{i}" for i in range(10)])
    run_dir = tmp_path / "run"
    r = subprocess.run([console_script(), "train", "data=cifar10", f"data.root={tmp_path / 'data'}", "model.width=0.25",
                        "trainer.epochs=1", "data.test_size=30", f"hydra.run.dir={run_dir}"],
                       env=clean_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and ("data.test_size=30 is larger than the 10 images available; use <= 10 or null for "
                                  "all") in r.stderr, r.stderr[-2000:]
    assert not run_dir.exists()
