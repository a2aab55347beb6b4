"""Seconds from process start to the first training step after a resume.

1. `allconv-hpc train ... trainer.epochs=1` writes a run with an end-of-epoch checkpoint.
2. The checkpoints folder is kept aside; before every timed start it is put back, so every start
   resumes the same state (epoch 2, step 0) with `trainer.epochs=2`.
3. CLI wall time: the real `allconv-hpc train` entry point as a subprocess (PYTHONUNBUFFERED,
   trainer.log_every_steps=1): time from spawn to the "resumed from" line and to the first
   "epoch 2 step 1/..." line (printed when the first step has finished).
4. Breakdown: the same command through benchmarks/_resume_probe.py, which stamps each phase
   (python start, import torch, import package+hydra, compose, data load, model build, checkpoint
   loads, rest of Trainer init, first batch ready, first step done).

    python benchmarks/bench_resume.py --width 1.0 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as C


def cli_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("allconv-hpc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "allconv_hpc.cli"]


def run_cli_timed(args: list[str], env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cli_cmd() + ["train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=C.REPO)
    out, seen = {}, []
    for line in proc.stdout:
        now = time.time() - t0
        seen.append(line)
        if "resumed from" in line and "resumed" not in out:
            out["resumed"] = now
        if " step 1/" in line and "first_step" not in out:
            out["first_step"] = now
    proc.wait()
    out["exit"] = now = time.time() - t0
    if proc.returncode != 0 or "first_step" not in out:
        raise RuntimeError(f"train exited {proc.returncode}:\n{''.join(seen[-30:])}")
    return out


def run_probe(args: list[str], env: dict, marks_file: Path) -> dict:
    e = dict(env, BENCH_MARKS=str(marks_file), BENCH_T0=repr(time.time()))
    r = subprocess.run([sys.executable, str(C.HERE / "_resume_probe.py"), *args], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=e, cwd=C.REPO)
    if r.returncode != 0 or not marks_file.exists():
        raise RuntimeError(f"probe exited {r.returncode}:\n{r.stdout[-3000:]}")
    return json.loads(marks_file.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--data", default="auto", choices=["auto", "cifar10", "synthetic"])
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    run_dir = Path(tempfile.mkdtemp(prefix="allconv-bench-resume-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    base = C.data_overrides(a.data, a.train_size, 200, "paper") + [
        f"model.width={a.width}", f"trainer.batch_size={a.batch}", f"trainer.device={a.device}",
        "trainer.log_every_steps=1", "trainer.progress=log", "wandb.mode=disabled",
        "checkpoint.every_steps=null", f"hydra.run.dir={run_dir}"]
    try:
        t = time.time()
        first = run_cli_timed(base + ["trainer.epochs=1"], env)
        print(f"first run (1 epoch of {a.train_size} images, writes the checkpoint): {time.time() - t:.1f} s")
        ck = run_dir / "checkpoints"
        keep = run_dir.parent / (run_dir.name + "-ckpt")
        shutil.copytree(ck, keep)
        size = (ck / "last.pt").stat().st_size

        def restore():
            shutil.rmtree(ck)
            shutil.copytree(keep, ck)

        resume = base + ["trainer.epochs=2"]
        cli_runs, probe_runs = [], []
        for i in range(a.repeats):  # interleave the two kinds of start
            restore()
            cli_runs.append(run_cli_timed(resume, env))
            restore()
            probe_runs.append(run_probe(resume, env, run_dir / f"marks{i}.json"))
            print(f"  repeat {i + 1}: CLI first step done at {cli_runs[-1]['first_step']:.2f} s, "
                  f"probe at {probe_runs[-1]['marks']['first_step_done']:.2f} s", flush=True)
        shutil.rmtree(keep, ignore_errors=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    med = lambda key, src: C.median(r[key] for r in src)  # noqa: E731
    cli = {k: med(k, cli_runs) for k in ("resumed", "first_step", "exit")}
    marks = {k: C.median(r["marks"][k] for r in probe_runs) for k in probe_runs[0]["marks"]}
    durs = {k: C.median(r["durations"].get(k, 0) for r in probe_runs) for k in probe_runs[0]["durations"]}
    labels = {"python_started": "spawn -> python running", "imported_torch": "import torch",
              "imported_package": "import allconv_hpc + hydra", "compose_done": "hydra compose + validate",
              "data_load_done": "data load (pickles -> uint8 tensors, subset)",
              "model_build_done": "model build (+ data/model to device)",
              "summary_done": "model summary table (rank 0)",
              "optimizer_done": "SGD() (first Optimizer imports torch._dynamo)",
              "load_latest_done": "load_latest: rank 0 reads+verifies the checkpoint",
              "checkpoint_load_file_done": "load_file again + load_state_dict",
              "resume_total_done": "rest of _maybe_resume (rng, sums)",
              "tracker_done": "tracker (wandb disabled)",
              "trainer_init_done": "rest of Trainer init",
              "first_batch_ready": "fit start -> first batch ready", "first_step_done": "first training step"}
    rows, prev = [], 0.0
    for k in sorted(labels, key=lambda k: marks.get(k, float("inf"))):
        if k in marks:
            rows.append({"phase": labels[k], "ends at s": marks[k], "takes s": marks[k] - prev})
            prev = marks[k]
    print(f"\nresume of All-CNN-C width {a.width} (checkpoint {size / 1e6:.2f} MB), {a.repeats} repeats, medians:")
    print(f"  real CLI: 'resumed from' line at {cli['resumed']:.2f} s, first step done at {cli['first_step']:.2f} s "
          f"after spawn")
    print(C.table(rows, ["phase", "ends at s", "takes s"], {"ends at s": "{:.3f}", "takes s": "{:.3f}"}))
    print(f"checkpoint.load_file calls on resume: {int(durs.get('checkpoint_load_file_calls', 0))} "
          f"({durs.get('checkpoint_load_file', 0):.3f} s in all); data.load {durs.get('data_load', 0):.3f} s; "
          f"model build {durs.get('model_build', 0):.3f} s")
    res = {"args": vars(a), "checkpoint_bytes": size, "cli_median_s": cli, "probe_marks_median_s": marks,
           "probe_durations_median_s": durs, "cli_runs": cli_runs, "probe_runs": probe_runs, "first_run": first}
    C.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
