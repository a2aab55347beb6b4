"""Step time with 1 and 2 gloo ranks on this machine, through torchrun and the real Trainer.

Configurations (All-CNN-C width 0.25 by default, synthetic data, per-step stop polling and DDP as
in real runs, checkpoints off):
  1 rank  x 2 threads, global batch B
  1 rank  x 1 thread,  global batch B
  2 ranks x 1 thread,  global batch 2B (B per rank: weak scaling, each rank keeps its batch)
  2 ranks x 1 thread,  global batch B  (B/2 per rank: strong scaling)
Each configuration is started `--repeats` times (interleaved); medians of per-step times.
The 2-rank runs also time the trainer's per-step stop poll (a gloo all-reduce of three ints on
the control group): as a blocking round trip ("poll ms") and as the trainer does it, lagged by one
step so the answer arrives while the step runs ("lagged poll ms": what a step waits now); and a gloo
all-reduce of a 1,369,738-float gradient (All-CNN-C, 5.48 MB).
Then prints the multi-node model (see RESULTS.md).

    python benchmarks/bench_scaling.py --width 0.25 --batch 128 --steps 10 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common as C

PARAMS = 1_369_738


def allreduce_model(world_sizes=(2, 4, 8, 16, 32), bandwidths_gbps=(25, 100, 200, 400),
                    fwd_gflop=0.56, train_gflop=1.7, per_gpu_batch=128, gpu_tflops=(100, 300)) -> str:
    """Text table: ring all-reduce time of the fp32 gradient vs compute per step."""
    nbytes = PARAMS * 4
    lines = [f"gradient: {PARAMS:,} params x 4 B = {nbytes / 1e6:.2f} MB per step (fp32 grads)",
             "ring all-reduce sends and receives 2(N-1)/N x that per GPU; time = bytes / link bandwidth (no latency term)"]
    hdr = "| link (Gbit/s) | " + " | ".join(f"N={n}" for n in world_sizes) + " |"
    lines += ["", "all-reduce ms per step:", hdr, "|" + "---|" * (len(world_sizes) + 1)]
    for bw in bandwidths_gbps:
        cells = [f"{2 * (n - 1) / n * nbytes * 8 / (bw * 1e9) * 1e3:.2f}" for n in world_sizes]
        lines.append(f"| {bw} | " + " | ".join(cells) + " |")
    lines += ["", f"compute per step at {per_gpu_batch} images/GPU, {train_gflop} GFLOP per trained image:"]
    for tf in gpu_tflops:
        ms = per_gpu_batch * train_gflop * 1e9 / (tf * 1e12) * 1e3
        lines.append(f"  at {tf} TFLOP/s achieved: {ms:.2f} ms per step")
    return "\n".join(lines)


def run_config(world: int, threads: int, batch: int, width: float, steps: int, warmup: int, tmp: Path, tag: str) -> dict:
    out = tmp / f"{tag}.json"
    ov = C.data_overrides("synthetic", (warmup + steps) * batch, 64, "paper")
    ov += C.trainer_overrides(width=width, batch=batch, device="cpu", threads=threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONFAULTHANDLER="1", PYTHONPATH=f"{C.HERE}{os.pathsep}{C.REPO}")
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--standalone", f"--nproc_per_node={world}", str(C.HERE / "_scaling_worker.py"), str(out),
                      str(warmup), *ov]
    for attempt in (1, 2):  # one retry: other jobs on a shared machine can collide with --standalone
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
        if r.returncode == 0:
            return json.loads(out.read_text())
        log = tmp.parent / f"allconv-bench-scaling-failure-{tag.replace(' ', '_')}-{attempt}.log"
        log.write_text(r.stdout)
        print(f"  {tag}: torchrun exited {r.returncode} (attempt {attempt}); output kept in {log}", flush=True)
    raise RuntimeError(f"{' '.join(cmd)} failed twice; see {log}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=128, help="per-rank batch of the weak-scaling runs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    configs = [("1x2", 1, 2, a.batch), ("1x1", 1, 1, a.batch), ("2x1 weak", 2, 1, 2 * a.batch),
               ("2x1 strong", 2, 1, a.batch)]
    tmp = Path(tempfile.mkdtemp(prefix="allconv-bench-scaling-"))
    results = {c[0]: [] for c in configs}
    try:
        for r in range(a.repeats):
            for tag, world, threads, batch in configs:
                res = run_config(world, threads, batch, a.width, a.steps, a.warmup, tmp, f"{tag.replace(' ', '_')}_{r}")
                results[tag].append(res)
                print(f"  repeat {r + 1} {tag}: median step {1e3 * C.median(res['step_s']):.1f} ms", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    base = None
    for tag, world, threads, batch in configs:
        steps = [s for res in results[tag] for s in res["step_s"]]
        ms = 1e3 * C.median(steps)
        row = {"config": tag, "ranks x threads": f"{world} x {threads}", "global batch": batch,
               "median step ms": ms, "p10 step ms": 1e3 * C.quantile(steps, .1), "img/s": batch / ms * 1e3}
        if tag == "1x2":
            base = row["img/s"]
        row["vs 1x2"] = row["img/s"] / base
        polls = [res.get("poll_ms") for res in results[tag] if "poll_ms" in res]
        if polls:
            row["poll ms"] = C.median(polls)
            row["lagged poll ms"] = C.median(res["poll_lagged_ms"] for res in results[tag])
            row["5.48MB allreduce ms"] = C.median(res["allreduce_full_grad_ms"] for res in results[tag])
        rows.append(row)
    print(f"\nAll-CNN-C width {a.width}, gloo on this machine ({os.cpu_count()} cores, shared), "
          f"{a.repeats} starts x 2 epochs x {a.steps} steps per config:")
    print(C.table(rows, ["config", "ranks x threads", "global batch", "median step ms", "p10 step ms", "img/s",
                         "vs 1x2", "poll ms", "lagged poll ms", "5.48MB allreduce ms"],
                  {"median step ms": "{:.1f}", "p10 step ms": "{:.1f}", "img/s": "{:.0f}", "vs 1x2": "{:.2f}",
                   "poll ms": "{:.3f}", "lagged poll ms": "{:.3f}", "5.48MB allreduce ms": "{:.1f}"}))
    print("\nmulti-node model:\n" + allreduce_model())
    C.write_json(a.json, {"args": vars(a), "rows": rows, "raw": results})
    return {"rows": rows}


if __name__ == "__main__":
    main()
