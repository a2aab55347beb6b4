"""Tracker, history.csv and the offline-run reader, against real wandb in offline mode.

No network and no API key: HOME, TMPDIR, WANDB_DIR and wandb's config/cache folders point into a
temporary folder for the whole module (wandb keeps one service process per Python process, so the
environment must not change under it between tests), and wandb is torn down at the end.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest

from allconv_hpc.config import Config, ConfigError, DataConfig, WandbConfig
from allconv_hpc.history import HISTORY_FIELDS, read_history, write_history
from allconv_hpc.tracking import STEPS_FILE, NullTracker, Tracker, make_tracker
from allconv_hpc.wandb_mode import api_key_configured, resolve_mode
from allconv_hpc.wandb_offline import WandbLogError, merged_history, read_records, read_run, segments

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, the shape of a real key
_WANDB_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC",
              "WANDB_DISABLED", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY",
              "WANDB_SERVICE")


@pytest.fixture(scope="module")
def wenv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wandb_env")
    env = {name: base / name for name in ("home", "tmp", "wandb_dir", "config", "cache", "data")}
    for p in env.values():
        p.mkdir()
    mp = pytest.MonkeyPatch()
    for name in _WANDB_ENV:
        mp.delenv(name, raising=False)
    mp.setenv("HOME", str(env["home"]))
    mp.setenv("TMPDIR", str(env["tmp"]))
    mp.setenv("WANDB_DIR", str(env["wandb_dir"]))  # must lose to dir=run_dir
    mp.setenv("WANDB_CONFIG_DIR", str(env["config"]))
    mp.setenv("WANDB_CACHE_DIR", str(env["cache"]))
    mp.setenv("WANDB_DATA_DIR", str(env["data"]))
    mp.setenv("WANDB_SILENT", "true")
    yield env
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    mp.undo()


def cfg_dict() -> dict:
    d = dataclasses.asdict(Config(data=DataConfig(name="synthetic", train_size=512)))
    d["note"] = {"float": 0.1 + 0.2, "none": None, "flag": True, "list": [1, 2.5, "x"]}
    return d


def train_metrics(step: int) -> dict:
    return {"loss": 1.0 / step + 1e-9 * step, "acc": step / 41.0, "lr": 0.05 * (1 - step / 100)}


def epoch_row(epoch: int, step: int) -> dict:
    return {"epoch": epoch, "step": step, "lr": 0.05 / epoch, "train_loss": 1.0 / (epoch + 0.3),
            "train_acc": 0.1 * epoch + 0.01, "val_loss": 2.0 / (epoch + 0.7), "val_acc": 0.11 * epoch,
            "epoch_seconds": 3.25 * epoch, "images_per_second": 1000.0 / 3.0}


def run_epochs(tracker, first_step: int, last_step: int, steps_per_epoch: int = 10) -> list[dict]:
    rows = []
    for step in range(first_step, last_step + 1):
        tracker.log_train(step, train_metrics(step))
        if step % steps_per_epoch == 0:
            row = epoch_row(step // steps_per_epoch, step)
            tracker.log_eval(step, row)  # the same step as the last train log: merges into it
            tracker.append_history(row)
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def resumed(wenv, tmp_path_factory):
    """A run preempted after step 20 and resumed for steps 21..40 (the resume raises inside ``with``)."""
    run_dir = tmp_path_factory.mktemp("runs") / "allcnn-c-seed0"
    cfg = cfg_dict()
    wcfg = WandbConfig(mode="offline", tags=["t1"], group="g")
    first = make_tracker(run_dir, cfg, wcfg, rank=0, resume_run_id=None, history_rows=[])
    rows = run_epochs(first, 1, 20)
    first.log_train(15, {"loss": 123.0})  # a step going backwards is dropped, not logged
    first.set_summary(best_val_acc=0.22)
    seg1 = first.segment_dir
    first.finish()
    first.finish()  # idempotent
    second = make_tracker(run_dir, cfg, wcfg, rank=0, resume_run_id=None, history_rows=rows)
    with pytest.raises(RuntimeError):
        with second:
            rows += run_epochs(second, 21, 40)
            second.set_summary(best_val_acc=0.44)
            raise RuntimeError("the job hits a bug after step 40")
    return {"run_dir": run_dir, "cfg": cfg, "first": first, "second": second, "seg1": seg1,
            "seg2": second.segment_dir, "rows": rows}


def test_offline_run_reads_back_exact_steps_values_config_summary(resumed, wenv):
    run_dir, first = resumed["run_dir"], resumed["first"]
    assert first.mode == "offline"
    assert (run_dir / "wandb_id.txt").read_text().strip() == first.run_id
    assert resumed["seg1"].parent == run_dir / "wandb"  # dir=run_dir beats WANDB_DIR
    assert list(wenv["wandb_dir"].iterdir()) == []
    run = read_run(resumed["seg1"])
    assert run["id"] == first.run_id
    assert run["exit_code"] == 0
    assert isinstance(run["start_time"], float)
    assert [r["_step"] for r in run["history"]] == list(range(1, 21))
    for r in run["history"]:
        m = train_metrics(r["_step"])
        assert r["train/loss"] == m["loss"] and r["train/acc"] == m["acc"] and r["train/lr"] == m["lr"]
        assert r["train/loss"] != 123.0
    evals = [r for r in run["history"] if "val/acc" in r]
    assert [r["_step"] for r in evals] == [10, 20]
    for r in evals:
        e = epoch_row(r["_step"] // 10, r["_step"])
        assert (r["epoch"], r["val/acc"], r["val/loss"]) == (e["epoch"], e["val_acc"], e["val_loss"])
        assert r["perf/images_per_second"] == e["images_per_second"]
        assert "step" not in r
    assert run["config"] == resumed["cfg"]
    assert run["summary"]["best_val_acc"] == 0.22


def test_resume_reuses_id_and_merged_history_is_contiguous(resumed):
    run_dir, first, second = resumed["run_dir"], resumed["first"], resumed["second"]
    assert second.run_id == first.run_id
    assert (run_dir / "wandb" / "latest-run").is_symlink()
    segs = segments(run_dir / "wandb", first.run_id)
    assert segs == [resumed["seg1"], resumed["seg2"]] and segs[0] != segs[1]
    assert segments(run_dir / "wandb") == segs and segments(run_dir) == segs
    assert segments(run_dir / "wandb", "nosuchid") == []
    assert [read_run(s)["id"] for s in segs] == [first.run_id] * 2
    steps = [r["_step"] for r in merged_history(run_dir / "wandb", first.run_id)]
    assert steps == list(range(1, 41))
    second_run = read_run(segs[1])
    assert second_run["exit_code"] == 1  # the exception inside `with` marks the segment failed
    assert second_run["summary"]["best_val_acc"] == 0.44
    assert second_run["config"] == resumed["cfg"]
    assert read_history(run_dir / "history.csv") == resumed["rows"]
    assert [r["epoch"] for r in resumed["rows"]] == [1, 2, 3, 4]


def test_reader_survives_a_killed_writer(resumed, tmp_path):
    log = next(resumed["seg1"].glob("run-*.wandb"))
    data = log.read_bytes()
    n_full = len(list(read_records(log, strict=True)))
    seg = tmp_path / resumed["seg1"].name
    seg.mkdir()
    cut = seg / log.name
    cut.write_bytes(data[: len(data) * 2 // 3])  # killed mid-write
    steps = [r["_step"] for r in read_run(seg)["history"]]
    assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) < 20
    with pytest.raises(WandbLogError):
        list(read_records(cut, strict=True))
    flipped = bytearray(data)
    flipped[100] ^= 0xFF  # inside the first records: crc32 catches it
    cut.write_bytes(bytes(flipped))
    assert len(list(read_records(cut))) < n_full
    with pytest.raises(WandbLogError):
        list(read_records(cut, strict=True))
    cut.write_bytes(b"not a wandb log")
    with pytest.raises(WandbLogError):
        list(read_records(cut))


def test_disabled_writes_no_wandb_and_never_imports_it(tmp_path, wenv):
    run_dir = tmp_path / "run"
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from allconv_hpc.config import WandbConfig\nfrom allconv_hpc.tracking import make_tracker\n"
        f"t = make_tracker(Path({str(run_dir)!r}), {{'a': 1}}, WandbConfig(mode='disabled'), 0, None, [])\n"
        "with t:\n"
        "    t.log_train(1, {'loss': 1.0}); t.log_eval(1, {'epoch': 1, 'step': 1, 'val_acc': 0.5})\n"
        "    t.append_history({'epoch': 1, 'step': 1, 'val_acc': 0.5}); t.set_summary(best_val_acc=0.5)\n"
        "assert t.run_id is None and t.segment_dir is None and t.mode == 'disabled'\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # history.csv, and the W&B logs a later start with W&B would log (no W&B file, no id)
    assert sorted(p.name for p in run_dir.iterdir()) == ["history.csv", "wandb_steps.jsonl"]
    rows = read_history(run_dir / "history.csv")
    assert rows == [{**dict.fromkeys(HISTORY_FIELDS), "epoch": 1, "step": 1, "val_acc": 0.5}]


def test_resolve_mode_precedence(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    base = {"HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    assert resolve_mode(None, base) == "offline"  # no key anywhere
    assert resolve_mode(None, {**base, "WANDB_API_KEY": FAKE_KEY}) == "online"
    assert resolve_mode(None, {**base, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}) == "offline"
    assert resolve_mode(None, {**base, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode(None, {**base, "WANDB_MODE": "online"}) == "online"
    assert resolve_mode(None, {**base, "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode(None, {**base, "WANDB_MODE": ""}) == "offline"
    for mode in ("online", "offline", "disabled"):  # explicit config beats env and key
        assert resolve_mode(mode, {**base, "WANDB_MODE": "disabled" if mode != "disabled" else "online",
                                   "WANDB_API_KEY": FAKE_KEY}) == mode
    with pytest.raises(ConfigError):
        resolve_mode(None, {**base, "WANDB_MODE": "sometimes"})
    with pytest.raises(ConfigError):
        resolve_mode("sometimes", base)
    # a netrc entry for the W&B host counts as a key; one for another host does not
    (home / ".netrc").write_text(f"machine example.com\n  login user\n  password {FAKE_KEY}\n")
    assert resolve_mode(None, base) == "offline"
    (home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert resolve_mode(None, base) == "online"  # wandb's default server is api.wandb.ai's Forge front
    assert resolve_mode(None, {**base, "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    (home / ".netrc").unlink()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings").write_text(f"[default]\napi_key = {FAKE_KEY}\n")
    assert resolve_mode(None, base) == "online"


def test_a_key_is_found_where_wandb_finds_it(tmp_path, monkeypatch):
    """api_key_configured mirrors wandb's netrc lookup (it must not import wandb): checked against wandb's own
    read_netrc_auth for every pair of netrc host and server, and against a real `wandb login`."""
    from wandb.sdk.lib import urls
    from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    from allconv_hpc import wandb_mode
    assert wandb_mode._DEFAULT_BASE_URL == urls.DEFAULT_BASE_URL and wandb_mode._FORGE_HOSTS == urls.FORGE_HOSTS
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    env = {"HOME": str(tmp_path), "NETRC": str(netrc_file), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    found = []
    for machine in ("api.wandb.ai", "api.forge.coreweave.com", "forge.coreweave.com", "wandb.example.org:8443",
                    "example.com"):
        netrc_file.write_text(f"machine {machine}\n  login user\n  password {FAKE_KEY}\n")
        for url in (urls.DEFAULT_BASE_URL, "https://api.wandb.ai", "https://forge.coreweave.com/api/wandb",
                    "https://wandb.example.org:8443", "https://wandb.example.org"):
            theirs = read_netrc_auth(host=url) is not None
            assert api_key_configured({**env, "WANDB_BASE_URL": url}) is theirs, (machine, url)
            found.append(theirs)
    assert 0 < sum(found) < len(found), found  # wandb read the netrc: found for some pairs, not for all
    netrc_file.unlink()
    home = tmp_path / "home"
    home.mkdir()
    login = subprocess.run([str(Path(sys.executable).parent / "wandb"), "login", "--no-verify", FAKE_KEY],
                           env={**os.environ, "HOME": str(home), "NETRC": ""}, capture_output=True, text=True,
                           timeout=120)
    assert login.returncode == 0, login.stderr
    assert api_key_configured({"HOME": str(home), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}) is True


def test_online_without_a_key_is_refused_before_any_work(tmp_path):
    from allconv_hpc.wandb_mode import preflight_mode
    env = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    with pytest.raises(ConfigError, match=r"wandb.mode=online but no W&B API key is configured here .*run "
                                          r"`wandb login`, or log offline \(wandb.mode=offline\)"):
        preflight_mode("online", env)
    with pytest.raises(ConfigError, match=r"^WANDB_MODE=online but no W&B API key"):
        preflight_mode(None, {**env, "WANDB_MODE": "online"})
    with pytest.raises(ConfigError, match=r"WANDB_MODE='bogus' is not one of"):
        preflight_mode(None, {**env, "WANDB_MODE": "bogus"})
    assert preflight_mode("online", {**env, "WANDB_API_KEY": FAKE_KEY}) == "online"
    assert preflight_mode(None, env) == "offline" and preflight_mode("disabled", env) == "disabled"


@pytest.mark.parametrize("wcfg,said", [
    (WandbConfig(project="a/b"), "wandb.project: W&B refuses it (Invalid project name 'a/b'"),
    (WandbConfig(tags=["x" * 70]), "wandb.tags: W&B refuses it (Tag 'xxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxx' "
                                   "is 70 characters. Tags must be between 1 and 64 characters)"),
])
def test_names_wandb_would_refuse_are_named_before_any_work(wcfg, said):
    """wandb's own validator, run by train's and submit's preflight: not a traceback at wandb.init after the
    data load and the model build (in a job, after its wait in the queue)."""
    from allconv_hpc.wandb_mode import check_names
    with pytest.raises(ConfigError) as e:
        check_names(wcfg)
    assert str(e.value).startswith(said), str(e.value)
    check_names(WandbConfig(project="allconv-hpc", tags=["a", "sweep-1"], group="g", name="n"))  # fine


@pytest.mark.parametrize("var,value,said", [
    ("WANDB_CONSOLE", "bogus", "environment WANDB_CONSOLE='bogus': W&B refuses it (Input should be 'auto', 'off'"),
    ("WANDB_INIT_TIMEOUT", "abc", "environment WANDB_INIT_TIMEOUT='abc': W&B refuses it (Input should be a valid "
                                  "number"),
    ("WANDB_RUN_ID", "abc/def", "environment WANDB_RUN_ID='abc/def': W&B refuses it (Run ID cannot contain"),
    ("WANDB_SILENT", "maybe", "environment WANDB_SILENT='maybe': W&B refuses it (Input should be a valid boolean"),
])
def test_wandb_variables_wandb_would_refuse_are_named_before_any_work(monkeypatch, tmp_path, var, value, said):
    """A traceback at the job's wandb.init (after the data load; on Slurm after the queue) before."""
    from allconv_hpc.wandb_mode import check_environment
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        check_environment()
    assert str(e.value).startswith(said) and str(e.value).endswith("; correct or unset it"), str(e.value)
    if var == "WANDB_CONSOLE":  # the command: exit 2, and no run folder made
        r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "data=synthetic", "wandb.mode=offline",
                            f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env={**os.environ, var: value})
        assert r.returncode == 2 and said in r.stderr and not (tmp_path / "run").exists(), r.stderr[-2000:]


def test_wandb_disabled_which_wandb_no_longer_reads_is_not_ignored(tmp_path):
    from allconv_hpc.wandb_mode import preflight_mode
    env = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc"), "WANDB_DISABLED": "true"}
    with pytest.raises(ConfigError, match=r"^WANDB_DISABLED=true is not read by wandb \S+ \(nor here\) and this run "
                                          r"would log offline: set wandb.mode=disabled"):
        preflight_mode(None, env)
    assert preflight_mode("disabled", env) == "disabled"
    assert preflight_mode("offline", env) == "offline"  # a mode given says what is meant (Hugging Face reads it)
    assert preflight_mode(None, {**env, "WANDB_MODE": "disabled"}) == "disabled"
    assert preflight_mode(None, {**env, "WANDB_DISABLED": "false"}) == "offline"


def test_tags_that_are_not_strings_are_refused_by_the_config_itself(tmp_path):
    """wandb.tags=[1] passed `train --print-config` (and `train` with wandb.mode=disabled) as valid, while
    `submit` refused it: the typed config refuses it now, for every command alike."""
    with pytest.raises(ConfigError, match=r"^wandb.tags=\[1, 'b'\] must be strings; quote the others, e.g. "
                                          r"wandb.tags=\['1','b'\]"):
        WandbConfig(tags=[1, "b"])
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", "--print-config", "wandb.tags=[1]",
                        "wandb.mode=disabled"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "wandb.tags=[1] must be strings" in r.stderr, r.stderr


def test_null_tracker_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), rank=1, resume_run_id="abc",
                     history_rows=[epoch_row(1, 10)])
    assert isinstance(t, NullTracker)
    with t:
        t.log_train(1, {"loss": 1.0})
        t.log_eval(1, epoch_row(1, 1))
        t.append_history(epoch_row(1, 1))
        t.set_summary(best_val_acc=1.0)
    t.finish(0)
    assert t.run_id is None and t.segment_dir is None
    assert list(run_dir.iterdir()) == []


def test_a_history_edited_by_hand_is_kept_beside_when_a_resume_rewrites_it(tmp_path, caplog):
    run_dir = tmp_path / "run"
    wcfg = WandbConfig(mode="disabled")
    rows = [epoch_row(e, 10 * e) for e in range(1, 4)]
    t = make_tracker(run_dir, {}, wcfg, 0, None, [])
    for r in rows:
        t.append_history(r)
    t.finish()
    path = run_dir / "history.csv"
    edited = path.read_text().replace("\n", ",lr 0.05 looked high\n", 2)  # a note in a column of its own
    path.write_text(edited)
    make_tracker(run_dir, {}, wcfg, 0, None, rows[:2]).finish()
    assert read_history(path) == rows[:2]
    assert (run_dir / "history.csv.edited1").read_text() == edited
    assert (f"{path} differed from the checkpoint's record of the epochs it holds (edited by hand?): it is "
            f"rewritten from the checkpoint, and the old file is kept as history.csv.edited1") in caplog.text
    path.write_text(path.read_text().replace("0.05", "0.5"))  # a value changed: kept too, under the next name
    make_tracker(run_dir, {}, wcfg, 0, None, rows[:2]).finish()
    assert read_history(path) == rows[:2] and (run_dir / "history.csv.edited2").is_file()
    path.write_text(path.read_text() + "lr 0.05 looked high\n")  # a note below the rows
    make_tracker(run_dir, {}, wcfg, 0, None, rows[:2]).finish()
    assert (run_dir / "history.csv.edited3").is_file()
    # what a kill leaves is no edit: rows after the checkpoint, a torn last line, the checkpoint's last row not yet
    # appended (killed between the two)
    t = make_tracker(run_dir, {}, wcfg, 0, None, rows[:2])
    t.append_history(rows[2])
    t.finish()
    path.write_text(path.read_text() + "4,40,0.01")
    make_tracker(run_dir, {}, wcfg, 0, None, rows[:2]).finish()
    make_tracker(run_dir, {}, wcfg, 0, None, rows).finish()
    assert read_history(path) == rows
    assert sorted(p.name for p in run_dir.glob("history.csv.edited*")) == [f"history.csv.edited{i}" for i in (1, 2, 3)]


def test_a_history_deleted_while_the_run_trains_is_written_whole_at_the_next_epoch(tmp_path, caplog):
    """An append to a deleted history.csv made a file with no header and only the epochs after the deletion."""
    run_dir = tmp_path / "run"
    rows = [epoch_row(e, 10 * e) for e in range(1, 4)]
    t = make_tracker(run_dir, {}, WandbConfig(mode="disabled"), 0, None, [])
    t.append_history(rows[0], rows[:1])
    (run_dir / "history.csv").unlink()
    t.append_history(rows[1], rows[:2])
    t.append_history(rows[2], rows)
    t.finish()
    assert read_history(run_dir / "history.csv") == rows
    assert f"{run_dir / 'history.csv'} was missing (deleted?): written again with the 2 epoch(s)" in caplog.text


def test_history_rewrite_on_resume_drops_rows_not_in_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    wcfg = WandbConfig(mode="disabled")
    rows = [epoch_row(e, 10 * e) for e in range(1, 6)]
    rows[2]["train_loss"] = 0.1 + 0.2  # needs all 17 digits to round-trip
    rows[3]["val_loss"] = float("nan")
    t = make_tracker(run_dir, {}, wcfg, 0, None, [])
    assert (run_dir / "history.csv").read_text() == ",".join(HISTORY_FIELDS) + "\n"
    for r in rows:
        t.append_history(r)
    t.finish()
    back = read_history(run_dir / "history.csv")
    assert back[:3] == rows[:3] and math.isnan(back[3]["val_loss"]) and back[4] == rows[4]
    # preempted: the checkpoint holds epochs 1-3 only; epochs 4-5 are redone
    t = make_tracker(run_dir, {}, wcfg, 0, None, rows[:3])
    assert read_history(run_dir / "history.csv") == rows[:3]
    t.append_history(rows[3] | {"val_loss": 1.5})
    assert [r["epoch"] for r in read_history(run_dir / "history.csv")] == [1, 2, 3, 4]
    # restarted from scratch (no checkpoint yet): the header only
    make_tracker(run_dir, {}, wcfg, 0, None, [])
    assert read_history(run_dir / "history.csv") == []
    assert [p.name for p in run_dir.iterdir()] == ["history.csv"]  # no temp files left
    write_history(run_dir / "h.csv", [{"epoch": 1, "extra": 5}])
    assert (run_dir / "h.csv").read_text().splitlines()[1] == "1" + "," * (len(HISTORY_FIELDS) - 1)


def test_api_key_never_written_and_config_mode_beats_env(tmp_path, wenv, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the explicit config mode wins over this
    run_dir = tmp_path / "run"
    t = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, "fixedid01", [])
    run_epochs(t, 1, 10)
    t.finish()
    assert t.mode == "offline" and t.run_id == "fixedid01"
    assert (run_dir / "wandb_id.txt").read_text() == "fixedid01\n"
    assert t.segment_dir.is_dir() and read_run(t.segment_dir)["id"] == "fixedid01"
    leaks = [p for root in (run_dir, wenv["home"], wenv["tmp"], wenv["cache"], wenv["config"])
             for p in root.rglob("*") if p.is_file() and not p.is_symlink()
             and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.parametrize("env_mode,cfg_mode", [(" ", None), (" Offline", None), ("dryrun", None), ("", "offline")])
def test_wandb_mode_in_the_environment_is_read_once(tmp_path, wenv, monkeypatch, env_mode, cfg_mode):
    """`WANDB_MODE=` (exported empty, e.g. by a cluster profile) means auto here, and ' Offline' offline;
    wandb's own settings validation, which refuses both, never sees them. What chose offline, where nothing in the
    config did, is kept for train.log: with no reason given, auto's offline read as a fault (laptop audit)."""
    monkeypatch.setenv("WANDB_MODE", env_mode)
    assert resolve_mode(cfg_mode, {"WANDB_MODE": env_mode}) == "offline"
    t = make_tracker(tmp_path / "run", {"a": 1}, WandbConfig(mode=cfg_mode), 0, None, [])
    run_epochs(t, 1, 10)
    t.finish()
    assert t.mode == "offline" and read_run(t.segment_dir)["history"]
    assert t.auto_why == (None if cfg_mode else f"WANDB_MODE={env_mode.strip()}" if env_mode.strip() else
                          "no W&B API key here: wandb login, or WANDB_API_KEY, makes it online"), t.auto_why


def test_online_init_failure_falls_back_to_offline(tmp_path, wenv, monkeypatch, caplog):
    import wandb
    real_init = wandb.init

    def fake_init(*args, mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.CommError("dial tcp: connection refused")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr("allconv_hpc.tracking.unreachable", lambda url: None)  # the server answers its probe
    run_dir = tmp_path / "run"
    with make_tracker(run_dir, {"a": 1}, WandbConfig(mode="online"), 0, None, []) as t:
        t.log_train(1, {"loss": 0.5})
    assert t.mode == "offline" and t.segment_dir.name.startswith("offline-run-")
    assert "logging offline" in caplog.text and "CommError: dial tcp" in caplog.text  # a warning in train.log
    assert t.online_error == "CommError: dial tcp: connection refused"  # and in status.json
    # Under load (1 in ~5 runs with other work on both cores, also before the re-log change) this
    # segment read back empty right after finish(): give W&B's service a moment to write it out.
    for _ in range(50):
        steps = [r["_step"] for r in read_run(t.segment_dir)["history"]]
        if steps:
            break
        time.sleep(0.1)
    assert steps == [1]
    assert isinstance(t, Tracker)


def test_segments_order_by_recorded_start_time_not_folder_name(resumed, tmp_path):
    import shutil
    rid = resumed["first"].run_id
    wdir = tmp_path / "wandb"
    wdir.mkdir()
    late_name = wdir / f"offline-run-20300101_000000-{rid}"   # really the first segment
    early_name = wdir / f"offline-run-20200101_000000-{rid}"  # really the second
    shutil.copytree(resumed["seg1"], late_name, symlinks=True)
    shutil.copytree(resumed["seg2"], early_name, symlinks=True)
    killed = wdir / f"offline-run-20250101_000000-{rid}-1"    # died before writing anything
    killed.mkdir()
    (killed / f"run-{rid}.wandb").write_bytes(b"")
    (wdir / "latest-run").symlink_to(late_name.name)
    (wdir / "offline-run-20250101_000000-otherid1").mkdir()
    assert segments(wdir, rid) == [killed, late_name, early_name]
    assert [r["_step"] for r in merged_history(wdir, rid)] == list(range(1, 41))
    assert read_run(killed)["history"] == [] and read_run(killed)["exit_code"] is None
    with pytest.raises(WandbLogError):
        read_run(killed, strict=True)


def _steps_when_written(segment: Path, n: int) -> list[int]:
    for _ in range(50):  # W&B's service may still be writing the segment just after finish()
        steps = [r["_step"] for r in read_run(segment)["history"]]
        if len(steps) >= n:
            break
        time.sleep(0.1)
    return steps


def test_steps_trained_again_after_a_kill_are_not_logged_twice(wenv, tmp_path, caplog):
    # killed at step 27 with the newest checkpoint at step 20: the resumed process trains 21..27 again
    run_dir = tmp_path / "run"
    wcfg = WandbConfig(mode="offline")
    first = make_tracker(run_dir, {"a": 1}, wcfg, 0, None, [])
    rows = run_epochs(first, 1, 27)
    first.finish()
    assert _steps_when_written(first.segment_dir, 27) == list(range(1, 28))
    second = make_tracker(run_dir, {"a": 1}, wcfg, 0, None, rows, global_step=20)
    for step in range(21, 41):
        second.log_train(step, {"loss": -float(step)})  # values of the retraining, told apart
        if step == 30:
            second.log_eval(30, epoch_row(3, 30))
    second.finish()
    assert "steps up to 27 are in this run's W&B record" in caplog.text
    assert _steps_when_written(second.segment_dir, 13) == list(range(28, 41))
    merged = merged_history(run_dir / "wandb", first.run_id)
    assert [r["_step"] for r in merged] == list(range(1, 41))  # each step once
    assert [r["train/loss"] for r in merged[20:27]] == [train_metrics(s)["loss"] for s in range(21, 28)]
    assert merged[29]["val/acc"] == epoch_row(3, 30)["val_acc"] and merged[29]["train/loss"] == -30.0
    # an earlier segment that cannot be read: nothing is skipped (nor re-logged) rather than guessed
    next(first.segment_dir.glob("run-*.wandb")).write_bytes(b"not a wandb log")
    third = make_tracker(run_dir, {"a": 1}, wcfg, 0, None, rows, global_step=20)
    third.log_train(21, {"loss": 1.0})
    third.finish()
    assert "cannot read W&B segment" in caplog.text
    assert _steps_when_written(third.segment_dir, 1) == [21]


def test_a_stretch_trained_with_wandb_disabled_is_logged_by_the_next_start_with_it(wenv, tmp_path, caplog):
    """offline to step 9, disabled to step 27 (checkpoint 25), offline again: the run's W&B record has every
    step once, the disabled stretch's epoch evaluations included (wandb.* may change on resume)."""
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 9)
    first.finish()
    off = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="disabled"), 0, None, rows, global_step=9)
    rows += run_epochs(off, 10, 27)
    off.finish()
    third = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, rows[:2], global_step=25)
    run_epochs(third, 26, 30)
    third.finish()
    assert "re-logging 18 W&B log(s), steps 10..25" in caplog.text, caplog.text  # 16 train, 2 evals
    _steps_when_written(third.segment_dir, 21)
    merged = merged_history(run_dir / "wandb", first.run_id)
    assert [r["_step"] for r in merged] == list(range(1, 31))
    assert [r["epoch"] for r in merged if "val/acc" in r] == [1, 2, 3]  # epoch 2's eval from the disabled stretch
    assert merged[19]["val/acc"] == epoch_row(2, 20)["val_acc"]


def test_a_deleted_steps_file_that_held_what_wandb_lacks_is_said(wenv, tmp_path, caplog):
    """As above, but wandb_steps.jsonl deleted before the third start: steps 10..25 cannot come back, and the
    log says so rather than leaving a silent gap in the W&B run."""
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 9)
    first.finish()
    _steps_when_written(first.segment_dir, 9)
    off = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="disabled"), 0, None, rows, global_step=9)
    rows += run_epochs(off, 10, 27)
    off.finish()
    (run_dir / STEPS_FILE).unlink()
    third = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, rows[:2], global_step=25)
    third.finish()
    assert "re-logging" not in caplog.text
    assert (f"{run_dir / STEPS_FILE} is missing (deleted?), and this run's W&B record ends at step 9, before the "
            f"checkpoint's step 25: what earlier processes logged after step 9 (the evaluations of epochs 1-2, and "
            f"train logs) cannot be re-logged" in caplog.text), caplog.text
    caplog.clear()  # nothing to say where W&B holds every epoch up to the checkpoint
    assert not (run_dir / STEPS_FILE).exists()
    fourth = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [], global_step=9)
    fourth.finish()
    assert "is missing" not in caplog.text, caplog.text
    # nor where the file was never made: stopped before the first log (a requeue at step 5, log every 50)
    early = make_tracker(tmp_path / "early", {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    early.finish()
    again = make_tracker(tmp_path / "early", {"a": 1}, WandbConfig(mode="offline"), 0, None, [], global_step=5)
    again.finish()
    assert "is missing" not in caplog.text, caplog.text


def _own_wandb_services() -> list[int]:
    """The pids of this process's children that are W&B's service (wandb-core)."""
    from allconv_hpc.jobs import children, process_cmdline
    return [pid for pid in children(os.getpid()) if "wandb" in (process_cmdline(pid) or "")]


def test_a_start_whose_wandb_service_died_unwritten_sets_its_own_segment_aside(wenv, tmp_path, caplog):
    """A scancel some seconds into a start ends W&B's service with the job before it writes its buffered block: the
    segment held the file header only, and the start's last line told to `wandb sync` a glob that stops at it (a
    sweep's too), until the run started again, which a run stopped for good never does. Renamed as the start ends;
    the next start logs its steps to W&B."""
    import signal
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 10)
    services = _own_wandb_services()
    assert services, "no W&B service process found"
    for pid in services:  # as the job's SIGTERM or a KillWait SIGKILL does
        os.kill(pid, signal.SIGKILL)
    seg = first.segment_dir
    first.finish(1)
    assert not seg.exists() and (seg.parent / f"empty-{seg.name}").is_dir()
    assert f"W&B segment {seg.name} of this start holds no record" in caplog.text
    second = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, rows, global_step=10)
    second.finish()
    _steps_when_written(second.segment_dir, 10)
    assert [r["_step"] for r in merged_history(run_dir / "wandb", first.run_id)] == list(range(1, 11))
    caplog.clear()  # a start whose service wrote its records keeps its segment
    third = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, rows, global_step=10)
    run_epochs(third, 11, 12)
    third.finish()
    assert third.segment_dir.is_dir() and "holds no record" not in caplog.text


def test_an_offline_segment_without_records_is_set_aside_for_wandb_sync(wenv, tmp_path, caplog):
    """A process killed right after wandb.init leaves a segment of the file header only; `wandb sync` given it
    with other folders uploads none (exit 0). The next start renames it out of the offline-run-* glob."""
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 10)
    first.finish()
    _steps_when_written(first.segment_dir, 10)
    dead = run_dir / "wandb" / f"offline-run-20990101_000000-{first.run_id}"  # as a killed start leaves it
    dead.mkdir()
    (dead / f"run-{first.run_id}.wandb").write_bytes(next(first.segment_dir.glob("run-*.wandb")).read_bytes()[:7])
    # cut after wandb's header record, before the run record: `wandb sync` stops at it alike ("EOF")
    whole = next(first.segment_dir.glob("run-*.wandb")).read_bytes()
    header_only = whole[:7 + 7 + int.from_bytes(whole[11:13], "little")]
    half = run_dir / "wandb" / f"offline-run-20990101_000001-{first.run_id}"
    half.mkdir()
    (half / f"run-{first.run_id}.wandb").write_bytes(header_only)
    second = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, rows, global_step=10)
    run_epochs(second, 11, 12)
    second.finish()
    for seg in (dead, half):
        assert not seg.exists() and (seg.parent / f"empty-{seg.name}" / f"run-{first.run_id}.wandb").exists()
        assert f"W&B segment {seg.name} holds no record" in caplog.text
    assert [p.name for p in segments(run_dir / "wandb")] == [first.segment_dir.name, second.segment_dir.name]
    _steps_when_written(second.segment_dir, 2)
    assert [r["_step"] for r in merged_history(run_dir / "wandb", first.run_id)] == list(range(1, 13))


def test_a_resume_into_another_wandb_project_logs_the_whole_run_there(wenv, tmp_path, caplog):
    """W&B keeps a run per entity/project: the earlier segments, in the old project, hold nothing of the new
    project's run. Offline as online (the server's record in the new project starts empty), the resume logs every
    step there again from wandb_steps.jsonl, and says so once; the old project keeps its steps. An entity only one
    side names (offline records often have none) is no other run."""
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline", project="old"), 0, None, [])
    rows = run_epochs(first, 1, 20)
    first.finish()
    second = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline", project="new"), 0, None, rows,
                          global_step=20)
    rows += run_epochs(second, 21, 30)
    second.finish()
    one, two = (read_run(s) for s in segments(run_dir / "wandb"))
    assert (one["project"], two["project"], one["id"]) == ("old", "new", two["id"])
    assert [r["_step"] for r in one["history"]] == list(range(1, 21))
    assert [r["_step"] for r in two["history"]] == list(range(1, 31))  # the whole run, in its project
    assert (f"wandb.entity/project is new now; earlier W&B segments of run {first.run_id} are in old" in caplog.text
            and caplog.text.count(" is new now") == 1)
    third = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline", project="new", entity="me"), 0, None, rows,
                         global_step=30)
    third.finish()  # the same project, an entity where the records have none: nothing logged again, nothing said
    assert read_run(segments(run_dir / "wandb")[-1])["history"] == [] and caplog.text.count(" is new now") == 1
    from allconv_hpc.tracking import elsewhere
    assert elsewhere({"entity": "a", "project": "p"}, ("b", "p")) == "a/p"  # another entity: another run
    assert elsewhere({"entity": None, "project": "p"}, ("b", "p")) is None


def test_a_resume_under_another_wandb_entity_variable_logs_the_whole_run_there(wenv, tmp_path, caplog, monkeypatch):
    """wandb.entity null (the default): wandb takes WANDB_ENTITY, and a resume with another one (a job's environment
    changed between requeues) went into another W&B run without a word, as for wandb.entity given (above)."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_ENTITY", "ent1")
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 10)
    first.finish()
    monkeypatch.setenv("WANDB_ENTITY", "ent2")
    second = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, rows, global_step=10)
    rows += run_epochs(second, 11, 15)
    second.finish()
    one, two = (read_run(s) for s in segments(run_dir / "wandb"))
    assert (one["entity"], two["entity"]) == ("ent1", "ent2"), (one["entity"], two["entity"])
    assert [r["_step"] for r in two["history"]] == list(range(1, 16))  # the whole run, where it now goes
    assert f"earlier W&B segments of run {first.run_id} are in ent1/" in caplog.text, caplog.text


def test_wandb_variables_the_run_outranks_are_warned_of():
    """wandb.init is given project, name, id, resume and dir: an `export WANDB_PROJECT=x` was ignored silently."""
    from allconv_hpc.wandb_mode import outranked_env
    env = {"WANDB_PROJECT": "mine", "WANDB_DIR": "/scratch/w", "WANDB_ENTITY": "me", "WANDB_MODE": "offline",
           "WANDB_NAME": " "}
    said = outranked_env(WandbConfig(), env)
    assert said == ["environment WANDB_PROJECT='mine' is not read: wandb.project (allconv-hpc) names the project: "
                    "give wandb.project=mine instead",
                    "environment WANDB_DIR='/scratch/w' is not read: W&B's files are written in the run folder"], said
    assert outranked_env(WandbConfig(project="mine"), env) == said[1:]  # given alike: nothing to say of it
    assert outranked_env(WandbConfig(mode="disabled"), env) == []  # no W&B run: nothing is ignored
    grouped = {"WANDB_RUN_GROUP": "mine"}  # read where wandb.group is empty; a sweep sets it (found by a sweep audit)
    assert outranked_env(WandbConfig(), grouped) == [] == outranked_env(WandbConfig(group="mine"), grouped)
    assert outranked_env(WandbConfig(group="seed-1a2b"), grouped) == [
        "environment WANDB_RUN_GROUP='mine' is not read: wandb.group (seed-1a2b; a sweep's is its folder's name) names "
        "the group: give wandb.group=... instead"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_error_names_the_run_folder_file(tmp_path):
    """write() and fsync() errors carry no file name; the trainer's one-line message needs it, and needs
    to tell a run-folder file from, say, a compiler cache in the home folder (whose traceback helps)."""
    from allconv_hpc.train import _run_folder_file
    run_dir = tmp_path / "run"
    t = make_tracker(run_dir, {}, WandbConfig(mode="disabled"), 0, None, [])
    t.history_path.unlink()
    t.history_path.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(OSError) as e:
        t.append_history(epoch_row(1, 10))
    assert e.value.errno == 28 and e.value.filename == str(run_dir / "history.csv")
    assert _run_folder_file(e.value, run_dir) == str(run_dir / "history.csv")
    outside = OSError(28, "No space left on device", str(tmp_path / "cache" / "x.so"))
    assert _run_folder_file(outside, run_dir) is None and _run_folder_file(OSError(28, "x"), run_dir) is None
    assert _run_folder_file(ValueError("x"), run_dir) is None


def test_sync_makes_the_steps_file_durable_in_every_mode(wenv, tmp_path, monkeypatch):
    """The checkpoint writer calls sync() before a checkpoint lands: wandb_steps.jsonl, which a later start with
    W&B logs from, must be on disk up to it with W&B disabled as well as offline."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    for mode in ("disabled", "offline"):
        run_dir = tmp_path / mode
        t = make_tracker(run_dir, {}, WandbConfig(mode=mode), 0, None, [])
        t.log_train(5, {"loss": 1.0})
        synced.clear()
        t.sync()
        assert synced == [str(run_dir / "wandb_steps.jsonl")], mode
        t.finish()


def test_a_steps_file_deleted_while_the_run_trains_is_written_whole_again(wenv, tmp_path, caplog):
    """Deleted mid-run, it was appended to from there on: a kill then left W&B without the steps before (a resume
    re-logs from this file), unsaid."""
    from allconv_hpc.tracking import _read_steps
    run_dir = tmp_path / "run"
    t = make_tracker(run_dir, {}, WandbConfig(mode="disabled"), 0, None, [])
    for step in (3, 6):
        t.log_train(step, {"loss": 1.0 / step})
    (run_dir / "wandb_steps.jsonl").unlink()
    t.log_train(9, {"loss": 0.1})
    t.log_eval(10, epoch_row(1, 10))
    t.finish()
    entries = _read_steps(run_dir / "wandb_steps.jsonl")
    assert [(e["kind"], e["step"]) for e in entries] == [("train", 3), ("train", 6), ("train", 9), ("eval", 10)]
    assert caplog.text.count("wandb_steps.jsonl was missing (deleted?): written again with this run's 3 W&B logs") == 1


def test_damaged_wandb_id_and_steps_files_are_read_as_damaged_not_a_traceback(wenv, tmp_path, caplog):
    """Bytes that are no text (another file's, a bad disk block) in wandb_id.txt or wandb_steps.jsonl: the
    steps file keeps its entries before them (as for a torn line), the id file is ignored with a warning and
    the checkpoint's id (given) is used; the run resumes instead of failing on a UnicodeDecodeError."""
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 10)
    first.finish()
    with open(run_dir / "wandb_steps.jsonl", "ab") as f:
        f.write(b'{"kind": "train", \x00\xff garbage\n[1, 2]\n')
    (run_dir / "wandb_id.txt").write_bytes(b"\x00\xff\xfe\n")
    second = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, first.run_id, rows, global_step=10)
    second.log_train(11, {"loss": 1.0})
    second.finish()
    assert "wandb_id.txt is damaged" in caplog.text
    assert (run_dir / "wandb_id.txt").read_text() == first.run_id + "\n"  # rewritten from the checkpoint's id
    lines = (run_dir / "wandb_steps.jsonl").read_text().splitlines()
    assert len(lines) == 11 + 1 and all(json.loads(ln)["kind"] in ("train", "eval") for ln in lines)
    assert [r["_step"] for r in merged_history(run_dir / "wandb", first.run_id)] == list(range(1, 12))


class _ServerRun:
    """What wandb.init(mode="online") returns, with the W&B server faked: it holds the run's steps up to
    ``held`` (its resume point is the step after); what the process logs is kept in ``logged``."""

    def __init__(self, run_dir: Path, run_id: str, held: int) -> None:
        self.starting_step = held + 1
        self.settings = type("Settings", (), {"sync_dir": str(run_dir / "wandb" / f"run-20990101_000000-{run_id}")})
        self.summary: dict = {}
        self.logged: list = []

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, dict(data)))

    def finish(self, exit_code: int = 0) -> None:
        pass


@pytest.mark.parametrize("held,gone", [(0, False), (20, False), (0, True)])
def test_an_online_start_sets_aside_the_offline_segments_it_holds(wenv, tmp_path, monkeypatch, caplog, held, gone):
    """Offline start (a node without network) to step 20, then an online one: the server gets steps 1..20 by the
    re-log from wandb_steps.jsonl (held=0), or had them from a `wandb sync` before (held=20). Either way the
    offline segments are renamed out of `offline-run-*`: syncing them as well would log their steps twice."""
    import shutil
    import wandb
    run_dir = tmp_path / "run"
    first = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="offline"), 0, None, [])
    rows = run_epochs(first, 1, 20)
    first.finish()
    rid, seg1 = first.run_id, first.segment_dir
    assert _steps_when_written(seg1, 20) == list(range(1, 21))
    wdir = run_dir / "wandb"
    dead = wdir / f"offline-run-20990101_000000-{rid}"  # a start killed as it began: its file header only
    dead.mkdir()
    (dead / f"run-{rid}.wandb").write_bytes(next(seg1.glob("run-*.wandb")).read_bytes()[:7])
    other = wdir / "offline-run-20200101_000000-otherid1"  # another run's (checkpoint.resume=never): left alone
    shutil.copytree(seg1, other)
    next(other.glob("run-*.wandb")).rename(other / "run-otherid1.wandb")
    servers = []
    real_init = wandb.init

    def fake_init(*args, mode=None, **kwargs):
        if mode != "online":
            return real_init(*args, mode=mode, **kwargs)
        servers.append(_ServerRun(run_dir, kwargs["id"], held))
        return servers[-1]

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr("allconv_hpc.tracking.unreachable", lambda url: None)  # the server answers its probe
    if gone:  # wandb_steps.jsonl deleted: nothing to re-log, so the offline segment is the steps' one copy
        (run_dir / STEPS_FILE).unlink()
    second = make_tracker(run_dir, {"a": 1}, WandbConfig(mode="online"), 0, None, rows, global_step=20)
    second.log_train(21, {"loss": 0.5})
    second.finish()
    assert second.mode == "online" and second.run_id == rid
    (server,) = servers
    if gone:
        assert [s for s, _ in server.logged] == [21] and seg1.is_dir() and (wdir / f"empty-{dead.name}").is_dir()
        assert "evaluations of epochs 1-2" in caplog.text and "offline segments are left as they are" in caplog.text
        return
    relogged = [s for s in range(held + 1, 21) for _ in range(1 + (s % 10 == 0))]  # an epoch's eval at 10, 20
    assert [s for s, _ in server.logged] == relogged + [21]
    assert not seg1.exists() and (wdir / f"relogged-{seg1.name}" / f"run-{rid}.wandb").is_file()
    assert not dead.exists() and (wdir / f"empty-{dead.name}").is_dir()
    assert sorted(p.name for p in wdir.glob("offline-run-*")) == [other.name]
    assert f"W&B segment {seg1.name}" in caplog.text and "must not be synced" in caplog.text
    assert f"W&B segment {dead.name} holds no record" in caplog.text


def test_a_start_with_wandb_disabled_sets_aside_empty_segments_without_importing_wandb(resumed, tmp_path, wenv):
    """The run's next start renames an offline segment without records whatever its W&B mode: with W&B disabled
    too (the run id from wandb_id.txt), never importing wandb. Segments with records, and another run's, stay."""
    import shutil
    run_dir = tmp_path / "run"
    rid = resumed["first"].run_id
    wdir = run_dir / "wandb"
    kept = wdir / resumed["seg1"].name
    shutil.copytree(resumed["seg1"], kept, symlinks=True)
    header = next(kept.glob("run-*.wandb")).read_bytes()[:7]
    dead, others = wdir / f"offline-run-20990101_000000-{rid}", wdir / "offline-run-20990101_000000-otherid1"
    for seg, sid in ((dead, rid), (others, "otherid1")):
        seg.mkdir()
        (seg / f"run-{sid}.wandb").write_bytes(header)
    (run_dir / "wandb_id.txt").write_text(rid + "\n")
    code = (
        "import logging, sys\nfrom pathlib import Path\nlogging.basicConfig()\n"
        "from allconv_hpc.config import WandbConfig\nfrom allconv_hpc.tracking import make_tracker\n"
        f"make_tracker(Path({str(run_dir)!r}), {{}}, WandbConfig(mode='disabled'), 0, None, []).finish()\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in wdir.iterdir()) == sorted([kept.name, f"empty-{dead.name}", others.name])
    assert f"W&B segment {dead.name} holds no record" in proc.stderr


def test_a_ctrl_c_inside_wandb_init_closes_its_segment_as_interrupted(tmp_path, wenv, monkeypatch):
    """A Ctrl-C that lands inside wandb.init, after it began the run: the segment is closed with 130 (left to
    wandb's exit hook it read finished, exit 0, although nothing was trained)."""
    import wandb
    real = wandb.init

    def init_then_ctrl_c(**kwargs):
        real(**kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(wandb, "init", init_then_ctrl_c)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_tracker(run_dir, cfg_dict(), WandbConfig(mode="offline"), rank=0, resume_run_id=None, history_rows=[])
    [seg] = segments(run_dir / "wandb", (run_dir / "wandb_id.txt").read_text().strip())
    assert read_run(seg)["exit_code"] == 130


def test_the_online_probe_tells_no_route_from_a_server_that_answers(monkeypatch, tmp_path):
    """tracking.unreachable, asked before an online wandb.init (which waits about 90 s where nothing answers): a
    refused connection and a name that does not resolve are no route; a server that takes the connection is left
    to wandb.init to judge, and so is any server behind a proxy, wandb's own proxy settings included (a probe
    past them forced offline a node whose only way out they are: diff review)."""
    import http.server
    import socket
    import threading
    from allconv_hpc.tracking import unreachable
    for var in ("http_proxy", "https_proxy", "all_proxy", "WANDB_HTTP_PROXY", "WANDB_HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))

    class Teapot(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(418)
            self.end_headers()

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Teapot)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    try:
        assert unreachable(f"http://127.0.0.1:{httpd.server_address[1]}") is None
        assert unreachable(dead, timeout=5) == "Connection refused"
        assert unreachable("http://no-such-host.invalid", timeout=5).startswith("its name does not resolve: ")
        # a proxy for the server's scheme: the way out is through it, so it is what is tried (a probe past it forced
        # offline a node whose only way out it is: diff review); wandb's own setting, else Go's variables
        live = f"127.0.0.1:{httpd.server_address[1]}"
        (tmp_path / "settings").write_text(f"[default]\nhttp_proxy = http://{live}\n")
        assert unreachable("http://wandb.invalid:8080", timeout=5) is None  # the proxy took the connection
        (tmp_path / "settings").unlink()
        for var in ("HTTP_PROXY", "http_proxy", "WANDB_HTTP_PROXY"):
            monkeypatch.setenv(var, dead)
            assert unreachable("http://wandb.invalid:8080", timeout=5) == \
                f"through the proxy 127.0.0.1:{closed.getsockname()[1]}: Connection refused", var
            monkeypatch.delenv(var)
        for var in ("HTTPS_PROXY", "all_proxy"):  # another scheme's, and one Go's client never reads: straight there
            monkeypatch.setenv(var, dead)
            assert unreachable("http://wandb.invalid:8080", timeout=5).startswith("its name does not resolve"), var
            monkeypatch.delenv(var)
        assert unreachable(dead, timeout=5) == "Connection refused"
    finally:
        closed.close()
        httpd.shutdown()
        httpd.server_close()


def test_the_online_probe_asks_the_proxy_for_a_tunnel(monkeypatch, tmp_path):
    """A node whose way out is a proxy waited wandb.init's ~90 s at every start where the proxy refused W&B: the
    probe was skipped wherever a proxy was configured (a wall the twelfth session left). Where the proxy wandb would
    use can be told (wandb_mode.proxy_route), the probe asks it for a tunnel to an https server (CONNECT, as
    wandb's client does), with the credentials its URL holds; any answer but 200 (Go's client takes no other), or
    none, is no way out. A real proxy stand-in on a real socket answers here."""
    import socket
    import socketserver
    import threading
    from allconv_hpc.tracking import unreachable
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "WANDB_HTTP_PROXY", "WANDB_HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    asked, answer = [], ["HTTP/1.1 403 Forbidden"]

    class Proxy(socketserver.StreamRequestHandler):
        def handle(self):
            head = []
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                head.append(line.decode().strip())
            asked.append(head)
            if answer[0] is not None:  # None: take the connection and say nothing
                self.wfile.write(f"{answer[0]}\r\n\r\n".encode())
            else:
                self.rfile.read()
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Proxy)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxy = f"127.0.0.1:{srv.server_address[1]}"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user%40site:pa%3Ass@{proxy}")
        assert unreachable("https://api.wandb.ai", timeout=5) == \
            f"through the proxy {proxy}: CONNECT api.wandb.ai:443 answered 403 Forbidden"
        assert asked[-1][:2] == ["CONNECT api.wandb.ai:443 HTTP/1.1", "Host: api.wandb.ai:443"], asked
        assert asked[-1][2] == "Proxy-Authorization: Basic " + base64.b64encode(b"user@site:pa:ss").decode()
        for said in ("HTTP/1.1 407 Proxy Authentication Required", "HTTP/1.1 204 No Content"):
            answer[0] = said
            assert unreachable("https://api.wandb.ai", timeout=5).endswith(f"answered {said[9:]}"), said
        for said in ("HTTP/1.1 200 Connection established", "HTTP/1.0 200"):
            answer[0] = said
            assert unreachable("https://api.wandb.ai", timeout=5) is None, said  # a tunnel: the rest is wandb's
        answer[0] = None
        assert unreachable("https://api.wandb.ai", timeout=2) == \
            f"through the proxy {proxy}: no answer to CONNECT api.wandb.ai:443"
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{closed.getsockname()[1]}")  # no scheme: http, as Go reads it
        assert unreachable("https://api.wandb.ai", timeout=5) == \
            f"through the proxy 127.0.0.1:{closed.getsockname()[1]}: Connection refused"
        monkeypatch.setenv("NO_PROXY", "localhost,.wandb.invalid")  # straight there, as wandb's client goes
        assert unreachable("https://api.wandb.invalid", timeout=5).startswith("its name does not resolve: ")
    finally:
        closed.close()
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("env,url,route", [
    ({}, "https://api.wandb.ai", (True, None)),
    # the proxy for the URL's scheme only, upper case first; never all_proxy (Go's ProxyFromEnvironment)
    ({"HTTPS_PROXY": "http://a:1"}, "https://api.wandb.ai", (True, "http://a:1")),
    ({"HTTP_PROXY": "http://a:1"}, "https://api.wandb.ai", (True, None)),
    ({"HTTPS_PROXY": "http://a:1"}, "http://wandb.local:8080", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "https_proxy": "http://b:2"}, "https://api.wandb.ai", (True, "http://a:1")),
    ({"https_proxy": "b:2"}, "https://api.wandb.ai", (True, "http://b:2")),
    ({"ALL_PROXY": "http://a:1", "all_proxy": "http://a:1"}, "https://api.wandb.ai", (True, None)),
    # wandb's own setting for the scheme comes first
    ({"WANDB_HTTPS_PROXY": "http://w:3", "HTTPS_PROXY": "http://a:1"}, "https://api.wandb.ai", (True, "http://w:3")),
    ({"WANDB_HTTP_PROXY": "http://w:3"}, "https://api.wandb.ai", (True, None)),
    # NO_PROXY as Go reads it (NO_PROXY before no_proxy)
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "localhost,*"}, "https://api.wandb.ai", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "wandb.ai"}, "https://api.wandb.ai", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": ".wandb.ai"}, "https://wandb.ai", (True, "http://a:1")),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "*.wandb.ai"}, "https://api.wandb.ai", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "wandb.ai:8443"}, "https://api.wandb.ai", (True, "http://a:1")),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "wandb.ai:443"}, "https://api.wandb.ai", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "192.0.2.0/24"}, "https://192.0.2.7:8443", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "192.0.2.7:8443"}, "https://192.0.2.7:8443", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "fd00::/8"}, "https://[fd00::5]", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "192.0.2.7", "no_proxy": "localhost"}, "https://192.0.2.7",
     (True, None)),
    ({"HTTPS_PROXY": "http://a:1"}, "https://localhost:8080", (True, None)),
    ({"HTTPS_PROXY": "http://a:1"}, "https://[::1]:8080", (True, None)),
    ({"HTTPS_PROXY": "http://a:1"}, "https://LOCALHOST:8080", (True, "http://a:1")),  # Go: "localhost" as given
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "10.0.0.0/8"}, "https://[::ffff:10.1.2.3]", (True, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "10.0.0.0/255.0.0.0"}, "https://10.1.2.3", (True, "http://a:1")),
    # cannot tell: a proxy of another kind, wandb's own beside a NO_PROXY for the host, HTTP_PROXY under CGI (NO_PROXY
    # or not), a value with spaces around it (Go reads it untrimmed), a name not ASCII (Go compares IDNA forms)
    ({"HTTPS_PROXY": "socks5://a:1"}, "https://api.wandb.ai", (False, None)),
    ({"WANDB_HTTPS_PROXY": "http://w:3", "NO_PROXY": "wandb.ai"}, "https://api.wandb.ai", (False, None)),
    ({"HTTP_PROXY": "http://a:1", "REQUEST_METHOD": "GET"}, "http://wandb.local", (False, None)),
    ({"HTTP_PROXY": "http://a:1", "REQUEST_METHOD": "GET", "NO_PROXY": "*"}, "http://wandb.local", (False, None)),
    ({"HTTPS_PROXY": " http://a:1"}, "https://api.wandb.ai", (False, None)),
    ({"HTTPS_PROXY": "http://a:1", "NO_PROXY": "bücher.example"}, "https://xn--bcher-kva.example", (False, None))])
def test_the_proxy_wandb_would_use_is_told_as_its_client_tells_it(tmp_path, env, url, route):
    """wandb_mode.proxy_route, as wandb 0.31's wandb-core (Go) picks: a probe through a proxy wandb would not use
    forced runs offline that wandb would have got online (diff review: another scheme's proxy, all_proxy, NO_PROXY
    read by Python's rules)."""
    from allconv_hpc.wandb_mode import proxy_route
    assert proxy_route(url, {"WANDB_CONFIG_DIR": str(tmp_path), **env}) == route
    (tmp_path / "settings").write_text("[default]\nhttps_proxy = http://s:4\n")  # its settings file's, alike
    if not env:
        assert proxy_route(url, {"WANDB_CONFIG_DIR": str(tmp_path)}) == (True, "http://s:4")
