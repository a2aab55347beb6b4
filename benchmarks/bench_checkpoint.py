"""Checkpoint cost: save and load of a full All-CNN-C checkpoint through the real code paths.

Save: `Trainer.save()` (finite check, RNG gather, metric-sum reduce, a CPU snapshot of the state
dicts, handed to the background writer) is what training waits for ("blocking"); with
`Trainer.wait_checkpoints()` after it, also torch.save streamed through SHA-256 into a temp file,
the trailer, fsync + rename + directory fsync, last.pt hard link, pruning ("durable"). Both are
measured after a few real training steps so the SGD momentum buffers exist. Parts are timed
separately (`checkpoint.snapshot`, `checkpoint.write_file`). Load: `CheckpointDir.load_latest()`
(what rank 0 runs to pick the file), `checkpoint.load_file()` and the state-dict copies a resume does.
Writer stall: while the writer thread writes one checkpoint, the main thread runs a loop of short
Python work (as a GPU loop launches kernels) and records its longest gap, i.e. how long the writer
held the GIL at a stretch.
The cost at the default interval is save_s / (checkpoint.every_steps x step_s) with step_s the
measured median training step time (or --step-ms); the end-of-epoch save's cost is save_s / (the
steps of a 50,000-image epoch x step_s). On a GPU the blocking figure is the cost (the writer thread
runs while the GPU computes); on a CPU whose cores all train, the durable one bounds it.

    python benchmarks/bench_checkpoint.py --width 1.0 --repeats 10
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import common as C
from allconv_hpc import checkpoint as ck_mod


def default_every_steps() -> int:
    import yaml  # PyYAML comes with hydra/omegaconf
    return yaml.safe_load((C.REPO / "conf" / "checkpoint" / "default.yaml").read_text())["every_steps"]


def longest_main_thread_gap(fn, *args) -> float:
    """Seconds of the longest pause of a main-thread Python loop while `fn(*args)` runs in a thread."""
    done, gap = threading.Event(), 0.0
    th = threading.Thread(target=lambda: (fn(*args), done.set()))
    last = time.perf_counter()
    th.start()
    while not done.is_set():
        sum(range(200))  # ~2 us of bytecode: a kernel launch's worth
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    th.join()
    return gap


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=4, help="training steps timed for the step time (after 1 warm-up)")
    p.add_argument("--step-ms", type=float, default=None, help="use this step time instead of measuring")
    p.add_argument("--every-steps", type=int, default=None, help="default: conf/checkpoint/default.yaml")
    p.add_argument("--dir", default=None, help="folder for the run (default: a temp folder; same disk matters)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    C.quiet_logs()
    every = a.every_steps or default_every_steps()
    run_dir = Path(tempfile.mkdtemp(prefix="allconv-bench-ckpt-", dir=a.dir))
    try:
        ov = C.data_overrides("synthetic", (1 + a.steps) * a.batch, 100, "paper")
        ov += C.trainer_overrides(width=a.width, batch=a.batch, device=a.device, precision=a.precision,
                                  channels_last=a.channels_last, threads=a.threads)
        tr = C.make_trainer(ov, run_dir)
        tr._epoch_t0, tr._epoch_base = time.perf_counter(), 0.0  # what fit() sets before an epoch
        ep = C.time_trainer_epoch(tr, 1)  # real steps: momentum buffers exist afterwards
        if a.step_ms is not None:
            step_s = a.step_ms / 1e3
        elif ep["step_s"]:
            step_s = C.median(ep["step_s"])
        else:
            step_s = ep["seconds"] / ep["steps"]
        st = tr.state
        st.step_in_epoch = 1  # a mid-epoch save, like a periodic one

        saves, durables, snaps, writes, stalls, dirsaves, loads, latest, restores = ([] for _ in range(9))
        for i in range(a.repeats):
            st.global_step += 1
            C.sync(tr.device)
            t = time.perf_counter()
            tr.save()
            saves.append(time.perf_counter() - t)
            tr.wait_checkpoints()  # the next one starts with an idle writer, as at a real interval
            st.global_step += 1
            t = time.perf_counter()
            tr.save()
            tr.wait_checkpoints()
            durables.append(time.perf_counter() - t)
            snaps.append(C.timed(ck_mod.snapshot, {"model": tr.model.state_dict(), "opt": tr.opt.state_dict()})[0])
        path = tr.ckpt.folder / "last.pt"
        size = path.stat().st_size
        state = ck_mod.load_file(path)
        for i in range(a.repeats):
            writes.append(C.timed(ck_mod.write_file, run_dir / "probe.pt", state)[0])
            stalls.append(longest_main_thread_gap(ck_mod.write_file, run_dir / "probe.pt", state))
            st.global_step += 1
            dirsaves.append(C.timed(tr.ckpt.save, state, st.global_step)[0])
            loads.append(C.timed(ck_mod.load_file, path)[0])
            latest.append(C.timed(tr.ckpt.load_latest)[0])
            t = time.perf_counter()
            s = ck_mod.load_file(path)
            tr.model.load_state_dict(s["model"])
            tr.opt.load_state_dict(s["optimizer"])
            tr.sched.load_state_dict(s["scheduler"])
            C.sync(tr.device)
            restores.append(time.perf_counter() - t)
        n_mom = sum(1 for v in state["optimizer"]["state"].values() if v.get("momentum_buffer") is not None)
        fs = os.popen(f"df -T {run_dir} | tail -1 | awk '{{print $2}}'").read().strip()
        res = {"width": a.width, "n_params": tr.n_params, "file_bytes": size, "momentum_buffers": n_mom,
               "save_ms": 1e3 * C.median(saves), "save_ms_min": 1e3 * min(saves),
               "durable_save_ms": 1e3 * C.median(durables), "snapshot_ms": 1e3 * C.median(snaps),
               "write_file_ms": 1e3 * C.median(writes), "writer_stall_ms": 1e3 * C.median(stalls),
               "writer_stall_ms_max": 1e3 * max(stalls),
               "checkpointdir_save_ms": 1e3 * C.median(dirsaves),
               "load_file_ms": 1e3 * C.median(loads), "load_latest_ms": 1e3 * C.median(latest),
               "resume_restore_ms": 1e3 * C.median(restores), "step_ms": 1e3 * step_s,
               "every_steps": every, "filesystem": fs, "device": str(tr.device)}
        res["cost_pct_at_default_interval"] = 100 * (res["save_ms"] / 1e3) / (every * step_s)
        res["durable_cost_pct_at_default_interval"] = 100 * (res["durable_save_ms"] / 1e3) / (every * step_s)
        res["epoch_steps"] = -(-50_000 // a.batch)
        res["cost_pct_epoch_end"] = 100 * (res["save_ms"] / 1e3) / (res["epoch_steps"] * step_s)
        res["durable_cost_pct_epoch_end"] = 100 * (res["durable_save_ms"] / 1e3) / (res["epoch_steps"] * step_s)
        tr.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    print(f"All-CNN-C width {a.width} ({res['n_params']:,} params), {res['momentum_buffers']} momentum buffers, "
          f"device {res['device']}, {res['filesystem']} at {run_dir.parent}")
    rows = [
        {"what": "file size", "value": f"{size / 1e6:.2f} MB"},
        {"what": "Trainer.save(), blocking (median)", "value": f"{res['save_ms']:.1f} ms (min {res['save_ms_min']:.1f})"},
        {"what": "  of which snapshot (CPU copy of model + optimizer)", "value": f"{res['snapshot_ms']:.1f} ms"},
        {"what": "Trainer.save() + wait_checkpoints(), durable", "value": f"{res['durable_save_ms']:.1f} ms"},
        {"what": "  of which write_file (torch.save+sha256+fsync+rename)", "value": f"{res['write_file_ms']:.1f} ms"},
        {"what": "  CheckpointDir.save (write_file+link+prune)", "value": f"{res['checkpointdir_save_ms']:.1f} ms"},
        {"what": "longest main-thread stall during a write (GIL)",
         "value": f"{res['writer_stall_ms']:.1f} ms median (max {res['writer_stall_ms_max']:.1f})"},
        {"what": "load_file (read + verify + torch.load)", "value": f"{res['load_file_ms']:.1f} ms"},
        {"what": "CheckpointDir.load_latest (rank 0 picks)", "value": f"{res['load_latest_ms']:.1f} ms"},
        {"what": "load_file + load_state_dict (resume)", "value": f"{res['resume_restore_ms']:.1f} ms"},
        {"what": "training step (median)", "value": f"{res['step_ms']:.1f} ms"},
        {"what": f"cost at every_steps={every}: blocking / durable",
         "value": f"{res['cost_pct_at_default_interval']:.4f} / {res['durable_cost_pct_at_default_interval']:.4f} %"},
        {"what": f"end-of-epoch save ({res['epoch_steps']} steps): blocking / durable",
         "value": f"{res['cost_pct_epoch_end']:.4f} / {res['durable_cost_pct_epoch_end']:.4f} %"},
    ]
    print(C.table(rows, ["what", "value"]))
    ok = max(res["cost_pct_at_default_interval"], res["cost_pct_epoch_end"]) < 1
    print(f"target < 1%: {'met' if ok else 'NOT met'}; break-even step time for 1% at every_steps={every}: "
          f"{res['save_ms'] / (0.01 * every):.1f} ms/step")
    C.write_json(a.json, {"args": vars(a), **res, "save_runs_ms": [1e3 * x for x in saves]})
    return res


if __name__ == "__main__":
    main()
