"""Trainer overhead: the real Trainer's training throughput vs a bare PyTorch loop.

Both sides: the same model (build_model, same seed), the same SGD settings (foreach on CPU, fused on
CUDA), batch, precision, channels_last, compile, device and torch thread count, in one process.
Trainer side: `Trainer._train_epoch` over one epoch of `steps * batch` training images
(on-device augmentation, LR schedule, device-side metrics, stop polling, log every 50 steps;
checkpoint.every_steps=null), timed whole after `warmup` untimed steps (common.time_trainer_epoch:
batches are staged a chunk at a time, and the staging is spread over the steps). Bare side: forward, backward,
step on pre-normalised batches already on the device. Rounds alternate trainer/bare so machine
noise hits both alike; medians are reported.

    python benchmarks/bench_overhead.py --width 0.25 --batch 128 --steps 10 --rounds 8
"""
from __future__ import annotations

import argparse

import torch

import common as C


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the trainer's choice)")
    p.add_argument("--data", default="auto", choices=["auto", "cifar10", "synthetic"])
    p.add_argument("--augment", default="paper", choices=["paper", "seed", "none"])
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args(argv)
    if not 0 <= a.warmup < a.steps:
        p.error(f"--warmup {a.warmup} must be below --steps {a.steps} (the warm-up replays the epoch's last steps)")
    C.quiet_logs()

    ov = C.data_overrides(a.data, a.steps * a.batch, 100, a.augment)
    ov += C.trainer_overrides(width=a.width, batch=a.batch, device=a.device, precision=a.precision,
                              channels_last=a.channels_last, compile=a.compile, threads=a.threads)
    tr = C.make_trainer(ov)
    bare = C.BareLoop(tr.cfg, tr.device, C.prebuilt_batches(tr), a.precision, a.channels_last, a.compile)
    print(f"device {tr.device}, threads {torch.get_num_threads()}, width {a.width} ({tr.n_params:,} params), "
          f"batch {a.batch}, {a.precision}, channels_last={a.channels_last}, compile={a.compile}, "
          f"{tr.cfg.data.name} augment={a.augment}; {a.rounds} rounds x {a.steps} steps (+{a.warmup} warm-up)")
    rows, all_t, all_b, cpu_t, cpu_b = [], [], [], [], []
    for r in range(a.rounds):
        t = C.time_trainer_epoch(tr, a.warmup)
        b = bare.run(a.steps, a.warmup)
        row = {"round": r + 1, "trainer_img_s": t["images"] / t["seconds"], "bare_img_s": b["images"] / b["seconds"]}
        row["ratio"] = row["trainer_img_s"] / row["bare_img_s"]
        if t["step_s"]:  # CPU: per-step times; their medians shrug off bursts of load from other processes
            all_t += t["step_s"]
            all_b += b["step_s"]
            cpu_t += t["cpu_s"]
            cpu_b += b["cpu_s"]
            row["trainer_step_ms"] = 1e3 * C.median(t["step_s"])
            row["bare_step_ms"] = 1e3 * C.median(b["step_s"])
            row["step_ratio"] = row["bare_step_ms"] / row["trainer_step_ms"]
        rows.append(row)
        print(f"  round {r + 1}: trainer {row['trainer_img_s']:.1f} img/s, bare {row['bare_img_s']:.1f} img/s, "
              f"ratio {row['ratio']:.3f}", flush=True)
    med = {k: C.median(r[k] for r in rows) for k in rows[0] if k != "round"}
    cols = [c for c in ("round", "trainer_img_s", "bare_img_s", "ratio", "trainer_step_ms", "bare_step_ms",
                        "step_ratio") if c in rows[0]]
    print(C.table(rows + [{"round": "median", **med}], cols))
    if all_t:  # pooled over all rounds: the headline number on CPU
        med["pooled_trainer_step_ms"], med["pooled_bare_step_ms"] = 1e3 * C.median(all_t), 1e3 * C.median(all_b)
        med["headline_ratio"] = med["pooled_bare_step_ms"] / med["pooled_trainer_step_ms"]
        med["p10_trainer_step_ms"], med["p10_bare_step_ms"] = 1e3 * C.quantile(all_t, .1), 1e3 * C.quantile(all_b, .1)
        med["p10_ratio"] = med["p10_bare_step_ms"] / med["p10_trainer_step_ms"]
        med["cpu_trainer_step_ms"], med["cpu_bare_step_ms"] = 1e3 * C.median(cpu_t), 1e3 * C.median(cpu_b)
        med["cpu_ratio"] = med["cpu_bare_step_ms"] / med["cpu_trainer_step_ms"]
        how = (f"pooled over all {len(all_t)} timed steps per side (ms per step -> img/s):\n"
               f"  median wall : trainer {med['pooled_trainer_step_ms']:7.1f} ({a.batch / med['pooled_trainer_step_ms'] * 1e3:6.0f})"
               f"  bare {med['pooled_bare_step_ms']:7.1f} ({a.batch / med['pooled_bare_step_ms'] * 1e3:6.0f})  ratio {med['headline_ratio']:.3f}\n"
               f"  p10 wall    : trainer {med['p10_trainer_step_ms']:7.1f} ({a.batch / med['p10_trainer_step_ms'] * 1e3:6.0f})"
               f"  bare {med['p10_bare_step_ms']:7.1f} ({a.batch / med['p10_bare_step_ms'] * 1e3:6.0f})  ratio {med['p10_ratio']:.3f}\n"
               f"  median CPU  : trainer {med['cpu_trainer_step_ms']:7.1f}           bare {med['cpu_bare_step_ms']:7.1f}"
               f"           ratio {med['cpu_ratio']:.3f} (process CPU time, all threads)")
    else:  # CUDA: per-round totals (the device is synchronised only at the ends)
        med["headline_ratio"] = med["ratio"]
        how = "median over rounds of trainer img/s / bare img/s"
    verdict = "met" if med["headline_ratio"] >= 0.95 else "NOT met"
    print(f"{how}\ntrainer/bare throughput ratio {med['headline_ratio']:.3f} (target >= 0.95: {verdict})")
    doc = {"args": vars(a), "rounds": rows, "median": med, "n_params": tr.n_params}
    C.write_json(a.json, doc)
    tr.close()
    return doc


if __name__ == "__main__":
    main()
