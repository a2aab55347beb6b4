"""The GPU-machine scripts run end to end on the CPU (their --dry-run: the same Python paths, tiny
sizes), so a change to the package cannot break them unnoticed before a GPU is lent. Their timings
are not checked here (benchmarks/RESULTS.md holds those)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allconv_hpc import data
from proc import clean_env

REPO = Path(__file__).resolve().parents[1]


def _script(tmp: Path, name: str, *args: str, timeout: float, **env) -> subprocess.CompletedProcess:
    out = tmp / "out"
    r = subprocess.run(["bash", str(REPO / "benchmarks" / name), *args], cwd=tmp, capture_output=True, text=True,
                       timeout=timeout, env=clean_env(tmp, PYTHON=sys.executable, OUT=out, **env))
    assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_section(tmp_path):
    r = _script(tmp_path, "gpu_check.sh", "--dry-run", timeout=900, GPU_CHECK_BUDGET_S=800)  # a hang: the script says
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {s["key"]: s["status"] for s in doc["sections"]}
    assert len(status) == 15 and set(status.values()) == {"ok"} and not doc["failed"], status
    res = doc["results"]
    assert res["deterministic"]["bitwise_same"] and res["deterministic"]["error"] is None, res["deterministic"]
    assert res["correctness"]["pass"] and res["nccl"]["ok"] and res["ddp2_compile"]["ok"] and res["whiten"]["ok"]
    t1 = res["torchrun1"]  # evaluate's score of the resumed run's checkpoint, next to the run's own
    assert abs(t1["evaluate"]["accuracy"] - t1["run_test_acc"]) <= 2 / t1["evaluate"]["images"] + 1e-9, t1
    assert [r["compile_mode"] for r in res["graphs"]["rows"]] == ["reduce-overhead"], res["graphs"]
    ck = res["checkpoint"]
    assert ck["save_ms"] > 0 and ck["durable_save_ms"] > 0, ck  # blocking and durable (background write) both measured
    assert "gpu_check: all sections that ran passed" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_gpu_check_runs_only_the_sections_asked_for(tmp_path):
    """GPU_CHECK_SECTIONS: a short device call can measure what changed and leave its time to other runs."""
    r = _script(tmp_path, "gpu_check.sh", "--dry-run", timeout=600, GPU_CHECK_SECTIONS="env,matmul")
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {s["key"]: s["status"] for s in doc["sections"]}
    assert {k for k, v in status.items() if v == "ok"} == {"env", "matmul"}, status
    assert set(status.values()) == {"ok", "omitted"} and len(status) == 15 and not doc["failed"], status
    assert set(doc["results"]) >= {"env", "matmul"} and "grid_eager" not in doc["results"], sorted(doc["results"])
    assert "gpu_check: all sections that ran passed" in r.stdout


@pytest.mark.slow
def test_time_to_accuracy_dry_run_reports_every_epoch(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (2500,), generator=g)
    data.write_cifar(tmp_path / "cifar", "cifar10", images[:2000], labels[:2000], images[2000:], labels[2000:],
                     [f"c{i}" for i in range(10)])
    r = _script(tmp_path, "time_to_accuracy.sh", "--dry-run", "trainer.threads=1", timeout=600,
                ALLCONV_BENCH_CIFAR=tmp_path / "cifar")
    doc = json.loads((tmp_path / "out" / "tta.json").read_text())
    assert doc["exit_code"] == 0 and doc["epochs_run"] == 2 and [e["epoch"] for e in doc["per_epoch"]] == [1, 2]
    assert doc["target"] == 0.9275 and not doc["reached"]  # random labels: chance, and said so
    assert doc["per_epoch"][-1]["cumulative_seconds"] == pytest.approx(doc["train_seconds_total"])
    assert "experiment=fast" in doc["overrides"] and doc["overrides"].endswith("trainer.threads=1")
    assert doc["compile"] is True and "compile_retry" not in doc and "RETRY" not in r.stdout  # compiled, as on the GPU
    assert "92.75% NOT reached in 2 epochs" in r.stdout
    assert {"tta.json", "tta.log", "history.csv", "train.log"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert len((tmp_path / "out" / "history.csv").read_text().splitlines()) == 3  # header + 2 epochs


# stands in for ../shared/data/build_cifar10.py (the real archive is not beside a clean clone in CI)
_STUB_BUILD = '''import sys, torch
from pathlib import Path
from allconv_hpc import data
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (2500,), generator=g)
data.write_cifar(Path(sys.argv[1]), "cifar10", x[:2000], y[:2000], x[2000:], y[2000:], [f"c{i}" for i in range(10)])
'''


@pytest.mark.slow
def test_time_to_accuracy_forced_build_and_eager_retry(tmp_path):
    """TTA_FORCE_BUILD=1 takes the build branch (from ALLCONV_SHARED_DATA, a given folder ignored), and a
    compiled run that dies before its first epoch (here: no C++ compiler for inductor, which train's preflight
    refuses, exit 2) is rerun once eager."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "build_cifar10.py").write_text(_STUB_BUILD)
    (shared / "cifar10-jpg.tar.gz").write_bytes(b"")  # the stub does not read it
    r = _script(tmp_path, "time_to_accuracy.sh", "--dry-run", "trainer.threads=1", timeout=600,
                TTA_FORCE_BUILD=1, ALLCONV_SHARED_DATA=shared, ALLCONV_BENCH_CIFAR=tmp_path / "nowhere", CXX="/bin/false",
                TTA_CARRIED_DATA=tmp_path / "none", TTA_DATA_CACHE=tmp_path / "cache")  # a checkout's .data/ comes first
    assert f"built CIFAR-10 from the JPEG archive in {shared}" in r.stdout
    assert "RETRY: the compiled run exited 2 before finishing an epoch" in r.stdout
    doc = json.loads((tmp_path / "out" / "tta.json").read_text())
    assert doc["compile"] is False and "exited 2" in doc["compile_retry"], doc
    assert doc["exit_code"] == 0 and doc["epochs_run"] == 2 and doc["overrides"].endswith("trainer.compile=false trainer.compile_mode=default")
    assert doc["data"] == str(tmp_path / "cache" / "cifar")
    # the next run of the same device call takes the cached build (the build script now fails if run)
    (shared / "build_cifar10.py").write_text("raise SystemExit('built again')\n")
    (tmp_path / "out").rename(tmp_path / "out1")
    r = _script(tmp_path, "time_to_accuracy.sh", "--dry-run", "trainer.threads=1", "trainer.epochs=1", timeout=600,
                ALLCONV_SHARED_DATA=shared, TTA_CARRIED_DATA=tmp_path / "none", TTA_DATA_CACHE=tmp_path / "cache")
    assert f"reusing the CIFAR-10 built in {tmp_path / 'cache' / 'cifar'}" in r.stdout, r.stdout[-2000:]
    assert json.loads((tmp_path / "out" / "tta.json").read_text())["exit_code"] == 0


def test_bench_preprocess_writes_its_numbers(tmp_path):
    """The whitening benchmark (CPU-only here, like the other bench_*.py) runs and its JSON holds the fit."""
    out = tmp_path / "bp.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_preprocess.py"), "--data", "synthetic",
                        "--images", "300", "--test-images", "50", "--steps", "2", "--rounds", "1", "--batch", "50", "--threads", "1",
                        "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert (doc["images"], doc["test_images"], doc["threads"]) == (300, 50, 1), doc
    assert doc["fit"]["fit_s"] > 0 and 0 < doc["fit"]["whitened_std"] < 10, doc["fit"]
    assert set(doc["batch_ms"]) == {"channel (uint8)", "gcn_zca (float32)"}, doc["batch_ms"]


def test_a_benchmark_asked_for_missing_cifar_names_its_variable(tmp_path):
    """--data cifar10 without the files ended in a traceback whose advice (data.root, data.download) no benchmark
    takes."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_preprocess.py"), "--data", "cifar10",
                        "--images", "300"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path, ALLCONV_BENCH_CIFAR=tmp_path / "none"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == (f"--data cifar10: no CIFAR-10 in {tmp_path / 'none'}/cifar-10-batches-py; set "
                                f"ALLCONV_BENCH_CIFAR to the folder that holds cifar-10-batches-py, or use --data "
                                f"synthetic (or auto)"), r.stderr


def test_trainer_dispatches_few_ops_per_step_beyond_a_bare_loop(tmp_path):
    """On a GPU at small batches the host sets the pace and every op costs host time, so the Trainer's
    overhead there is its extra ops per step (benchmarks/RESULTS.md, sections 6 and 8). Counted, not
    timed: 59 extra ops per step when each batch was augmented by itself, 11.8 since batches are staged
    a chunk of steps at a time."""
    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_ops.py"), "--batch", "16", "--steps", "64",
                        "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=clean_env(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["bare_ops_per_step"] > 50, doc  # the count sees the model's own ops
    assert doc["extra_per_step"] < 16, doc
    data_ops = sum(n for site, n in doc["trainer_by_site"].items() if site.startswith(("data.py", "augment.py")))
    assert data_ops < 4, doc["trainer_by_site"]  # two slices and a CPU arange per step, the rest per chunk
