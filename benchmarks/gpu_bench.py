"""Sections of benchmarks/gpu_check.sh (one python process per section, JSON into --out).

    python benchmarks/gpu_bench.py SECTION --out DIR [--dry-run]

SECTION: env | correctness | nccl | syncs | matmul | grid | epoch | checkpoint | summary
--dry-run: CPU, tiny sizes, the same code paths; only CUDA-only calls are skipped (bf16 Trainer runs,
NCCL, the sync debug mode, cuda events) and say so.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import common as C
import flops as flops_mod

FULL = dict(width=1.0, grid_batch=512, grid_steps=30, grid_warmup=10, corr_batch=128, corr_steps=20,
            epoch_train=50000, epoch_test=10000, epoch_batch=128, matmul_n=8192, matmul_iters=50,
            ckpt_repeats=5, ckpt_steps=10, overhead_batch=128, overhead_steps=40, overhead_rounds=3)
DRY = dict(width=0.125, grid_batch=16, grid_steps=3, grid_warmup=2, corr_batch=16, corr_steps=20,
           epoch_train=256, epoch_test=64, epoch_batch=16, matmul_n=256, matmul_iters=3,
           ckpt_repeats=2, ckpt_steps=2, overhead_batch=16, overhead_steps=3, overhead_rounds=1)


def _cached_data_load():
    """Memoise data.load inside this process (the grid/epoch sections build several Trainers on the
    same synthetic set; generating 50k images each time would only cost CPU time)."""
    from allconv_hpc import data as data_mod
    orig = data_mod.load

    @functools.lru_cache(maxsize=4)
    def key_load(name, train_size, test_size, seed):
        from allconv_hpc.config import DataConfig
        return orig(DataConfig(name=name, train_size=train_size, test_size=test_size, augment="none"), seed)

    def load(cfg, seed):
        if cfg.name != "synthetic":
            return orig(cfg, seed)
        return key_load(cfg.name, cfg.train_size, cfg.test_size, seed)

    data_mod.load = load


class Ctx:
    def __init__(self, a):
        self.dry = a.dry_run
        self.s = DRY if a.dry_run else FULL
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if self.dry else "cuda"
        if not self.dry and not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible: run with --dry-run on a CPU machine")

    def save(self, name: str, doc: dict) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))

    def load(self, name: str):
        p = self.out / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None


def sec_env(x: Ctx) -> None:
    info = C.machine_info()
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_mem_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    f = flops_mod.allcnn_flops(1.0)
    info["flops_forward_gflop"] = f["forward_flops"] / 1e9
    info["flops_train_gflop"] = f["train_flops"] / 1e9
    ok = 0.5 <= info["flops_forward_gflop"] <= 0.6
    info["flops_check"] = ok
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(f"  exact conv FLOPs at width 1: forward {info['flops_forward_gflop']:.3f} GFLOP/image "
          f"({'ok' if ok else 'UNEXPECTED'}: ~0.56 expected), training {info['flops_train_gflop']:.3f} GFLOP/image")
    x.save("env", info)
    if not ok:
        raise SystemExit(1)


def _trainer(x: Ctx, batch: int, n_images: int, precision="fp32", channels_last=False, compile=False,
             width=None, test=64, every_steps=None, run_dir=None, augment="paper"):
    ov = C.data_overrides("synthetic", n_images, test, augment)
    ov += C.trainer_overrides(width=width or x.s["width"], batch=batch, device=x.device, precision=precision,
                              channels_last=channels_last, compile=compile, every_steps=every_steps)
    return C.make_trainer(ov, run_dir)


def sec_correctness(x: Ctx) -> None:
    """bf16 vs fp32: mean training loss over the same 20 batches from the same init; < 2% apart."""
    b, n = x.s["corr_batch"], x.s["corr_steps"]
    res = {}
    # 1. a bare loop over the trainer's own batches, autocast bf16 vs fp32 (runs on CPU too)
    tr = _trainer(x, b, b * n, width=1.0 if not x.dry else x.s["width"])
    batches = [(xb.clone(), yb.clone()) for xb, yb, _ in tr.batches.epoch(0)]
    losses = {}
    for prec in ("fp32", "bf16"):
        bare = C.BareLoop(tr.cfg, tr.device, batches, prec)
        torch.manual_seed(1)
        losses[prec] = [float(bare.step()) for _ in range(n)]
    m32, m16 = sum(losses["fp32"]) / n, sum(losses["bf16"]) / n
    res["bare_mean_loss"] = {"fp32": m32, "bf16": m16}
    res["bare_rel_diff"] = abs(m16 - m32) / abs(m32)
    print(f"  bare loop, {n} steps, batch {b}: mean loss fp32 {m32:.5f}, bf16 {m16:.5f}, "
          f"rel diff {100 * res['bare_rel_diff']:.3f}%")
    print(f"    first/last loss fp32 {losses['fp32'][0]:.4f}/{losses['fp32'][-1]:.4f}, "
          f"bf16 {losses['bf16'][0]:.4f}/{losses['bf16'][-1]:.4f}")
    tr.close()
    # 2. the real Trainer in each precision (bf16 is CUDA-only in the package)
    precs = ("fp32",) if x.dry else ("fp32", "bf16")
    tmeans = {}
    for prec in precs:
        tr = _trainer(x, b, b * n, precision=prec, width=1.0 if not x.dry else x.s["width"])
        C.time_trainer_epoch(tr, 0)
        s = tr.epoch_sums.tolist()
        tmeans[prec] = s[0] / s[2]
        tr.close()
    res["trainer_mean_loss"] = tmeans
    if "bf16" in tmeans:
        res["trainer_rel_diff"] = abs(tmeans["bf16"] - tmeans["fp32"]) / abs(tmeans["fp32"])
        print(f"  Trainer, {n} steps: mean loss fp32 {tmeans['fp32']:.5f}, bf16 {tmeans['bf16']:.5f}, "
              f"rel diff {100 * res['trainer_rel_diff']:.3f}%")
    else:
        print(f"  Trainer fp32 mean loss {tmeans['fp32']:.5f}; Trainer bf16 skipped (dry run: the package "
              f"runs bf16 on CUDA only)")
    worst = max(res["bare_rel_diff"], res.get("trainer_rel_diff", 0))
    res["pass"] = worst < 0.02
    print(f"  bf16 vs fp32 agreement < 2%: {'PASS' if res['pass'] else 'FAIL'}")
    x.save("correctness", res)
    if not res["pass"]:
        raise SystemExit(1)


def sec_nccl(x: Ctx) -> None:
    """A 1-rank process group + DDP step through the backend a GPU job uses (NCCL; gloo when dry)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from allconv_hpc.config import ModelConfig
    from allconv_hpc.models import build_model
    backend = "gloo" if x.dry else "nccl"
    dev = torch.device(x.device, 0) if not x.dry else torch.device("cpu")
    store = dist.HashStore()
    kw = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
    try:
        m = build_model(ModelConfig(width=x.s["width"])).to(dev)
        net = DDP(m, device_ids=[0] if backend == "nccl" else None)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            loss = F.cross_entropy(net(torch.randn(8, 3, 32, 32, device=dev)), torch.randint(0, 10, (8,), device=dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        t = torch.ones(4, device=dev)
        dist.all_reduce(t)
        ok = bool(torch.isfinite(loss).item()) and t.sum().item() == 4
    finally:
        dist.destroy_process_group()
    print(f"  {backend}, world 1: DDP forward/backward/step x3 and all_reduce: {'ok' if ok else 'FAILED'}")
    x.save("nccl", {"backend": backend, "ok": ok})
    if not ok:
        raise SystemExit(1)


def sec_syncs(x: Ctx) -> None:
    """Host<->device synchronisations per training step of the real Trainer (CUDA sync debug mode)."""
    b = x.s["grid_batch"] // 4 or 1
    steps = 10
    tr = _trainer(x, b, (2 + steps) * b)
    tr.cfg.trainer.log_every_steps = 10**9  # steady-state steps only (the log step syncs by design)
    orig = tr.batches.epoch
    caught = []

    def gen(epoch, start=0):
        for i, item in enumerate(orig(epoch, start)):
            if i == 2 and not x.dry:
                torch.cuda.set_sync_debug_mode("warn")
            yield item
        if not x.dry:
            torch.cuda.set_sync_debug_mode(0)

    tr.batches.epoch = gen
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr._train_epoch(C.StopRequest())
        caught = [str(m.message).splitlines()[0] for m in w if "synchroniz" in str(m.message)]
    tr.batches.epoch = orig
    doc = {"steps": steps, "sync_warnings": len(caught), "per_step": len(caught) / steps, "examples": caught[:3],
           "skipped": x.dry}
    if x.dry:
        print("  (dry run: torch.cuda.set_sync_debug_mode is CUDA-only; the trainer steps ran without it)")
    else:
        print(f"  {len(caught)} synchronising CUDA calls in {steps} steady-state Trainer steps "
              f"({len(caught) / steps:.1f} per step; 0 is the goal)")
        for m in caught[:3]:
            print(f"    e.g. {m[:160]}")
    x.save("syncs", doc)
    tr.close()


def sec_matmul(x: Ctx) -> None:
    n, iters = x.s["matmul_n"], x.s["matmul_iters"]
    dev = torch.device(x.device)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    C.sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    C.sync(dev)
    dt = (time.perf_counter() - t) / iters
    tflops = 2 * n**3 / dt / 1e12
    print(f"  bf16 matmul {n}^3: {dt * 1e3:.3f} ms -> {tflops:.1f} TFLOP/s achievable peak")
    x.save("matmul", {"n": n, "seconds": dt, "tflops": tflops})


def sec_grid(x: Ctx, budget_s: float) -> None:
    """img/s per precision x compile x channels_last, batch 512 full width; trainer vs bare (eager)."""
    _cached_data_load()
    s = x.s
    b, steps, warm = s["grid_batch"], s["grid_steps"], s["grid_warmup"]
    train_gflop = flops_mod.allcnn_flops(s["width"])["train_flops"] / 1e9
    peak = (x.load("matmul") or {}).get("tflops")
    t_start = time.perf_counter()
    rows = []
    precs = ("fp32",) if x.dry else ("fp32", "bf16")
    for compile in (False, True):
        for prec in ("fp32", "bf16"):
            for cl in (False, True):
                row = {"precision": prec, "compile": compile, "channels_last": cl}
                if prec not in precs:
                    row["note"] = "skipped (dry run: bf16 Trainer is CUDA-only)"
                    rows.append(row)
                    continue
                if x.dry and compile and cl:
                    row["note"] = "skipped (dry run: one compiled config is enough to exercise the path)"
                    rows.append(row)
                    continue
                if time.perf_counter() - t_start > budget_s:
                    row["note"] = f"skipped (section budget {budget_s:.0f} s spent)"
                    rows.append(row)
                    continue
                try:
                    t0 = time.perf_counter()
                    tr = _trainer(x, b, (warm + steps) * b, prec, cl, compile, test=64)
                    r = C.time_trainer_epoch(tr, warm)
                    row["img_s"] = r["images"] / r["seconds"]
                    row["step_ms"] = 1e3 * r["seconds"] / r["steps"]
                    if not compile:
                        bare = C.BareLoop(tr.cfg, tr.device, C.prebuilt_batches(tr), prec, cl, False)
                        br = bare.run(steps, warm)
                        row["bare_img_s"] = br["images"] / br["seconds"]
                        row["trainer_vs_bare"] = row["img_s"] / row["bare_img_s"]
                    if peak:
                        row["mfu_pct"] = 100 * row["img_s"] * train_gflop * 1e9 / (peak * 1e12)
                    row["wall_s"] = time.perf_counter() - t0
                    tr.close()
                    del tr
                except Exception as e:  # one failing config must not hide the others
                    row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    traceback.print_exc()
                rows.append(row)
                print(f"  {prec} compile={compile} channels_last={cl}: "
                      + (f"{row['img_s']:.0f} img/s" if "img_s" in row else row.get("note", "")), flush=True)
                if x.device == "cuda":
                    torch.cuda.empty_cache()
    x.save("grid", {"batch": b, "width": s["width"], "train_gflop_per_image": train_gflop, "peak_tflops": peak,
                    "rows": rows})
    if any(r.get("note", "").startswith("FAILED") for r in rows):
        raise SystemExit(1)


def sec_overhead(x: Ctx) -> None:
    """Trainer vs bare loop at the paper's batch (128), fp32 eager: the most host-overhead-sensitive case."""
    import bench_overhead
    s = x.s
    args = ["--device", x.device, "--width", str(s["width"]), "--batch", str(s["overhead_batch"]), "--steps",
            str(s["overhead_steps"]), "--warmup", "5" if not x.dry else "1", "--rounds", str(s["overhead_rounds"]),
            "--data", "synthetic", "--json", str(x.out / "overhead.json")]
    bench_overhead.main(args)


def sec_epoch(x: Ctx) -> None:
    """One full epoch through Trainer.fit() (train + eval), as in a real run."""
    _cached_data_load()
    s = x.s
    res = []
    cfgs = [("fp32", False)] if x.dry else [("fp32", False), ("bf16", True)]
    for prec, cl in cfgs:
        import tempfile
        run_dir = Path(tempfile.mkdtemp(prefix="allconv-gpu-epoch-"))
        ov = C.data_overrides("synthetic", s["epoch_train"], s["epoch_test"], "paper")
        ov += C.trainer_overrides(width=1.0 if not x.dry else s["width"], batch=s["epoch_batch"], device=x.device,
                                  precision=prec, channels_last=cl, every_steps=500, drop_last=False)
        ov += ["trainer.epochs=1", "trainer.log_every_steps=50"]
        t = time.perf_counter()
        tr = C.make_trainer(ov, run_dir)
        init_s = time.perf_counter() - t
        code = tr.fit()
        h = tr.state.history[-1]
        tr.close()
        row = {"precision": prec, "channels_last": cl, "batch": s["epoch_batch"], "train_images": s["epoch_train"],
               "epoch_seconds": h["epoch_seconds"], "images_per_second": h["images_per_second"],
               "val_acc": h["val_acc"], "trainer_init_s": init_s, "exit": code}
        res.append(row)
        print(f"  {prec} channels_last={cl}, batch {row['batch']}, {row['train_images']} images: epoch "
              f"{row['epoch_seconds']:.2f} s (train+eval, checkpoints every 500 steps), "
              f"{row['images_per_second']:.0f} img/s, val_acc {row['val_acc']:.3f}")
    x.save("epoch", {"rows": res})


def sec_checkpoint(x: Ctx) -> None:
    import bench_checkpoint
    s = x.s
    bench_checkpoint.main(["--device", x.device, "--width", "1.0" if not x.dry else str(s["width"]),
                           "--batch", str(s["epoch_batch"]), "--repeats", str(s["ckpt_repeats"]),
                           "--steps", str(s["ckpt_steps"]), "--json", str(x.out / "checkpoint.json")])


def sec_summary(x: Ctx) -> None:
    env, grid = x.load("env") or {}, x.load("grid")
    print(f"  device: {env.get('gpu', 'CPU (dry run)')}, torch {env.get('torch')}, CUDA {env.get('cuda')}")
    corr = x.load("correctness")
    if corr:
        print(f"  bf16 vs fp32 mean loss: bare {100 * corr['bare_rel_diff']:.3f}%"
              + (f", Trainer {100 * corr['trainer_rel_diff']:.3f}%" if "trainer_rel_diff" in corr else "")
              + f" -> {'PASS' if corr['pass'] else 'FAIL'}")
    mm = x.load("matmul")
    if mm:
        print(f"  bf16 matmul peak: {mm['tflops']:.4g} TFLOP/s (n={mm['n']})")
    if grid:
        print(f"  throughput, width {grid['width']}, batch {grid['batch']} "
              f"(MFU: {grid['train_gflop_per_image']:.3f} GFLOP/image vs the bf16 matmul peak):")
        print(C.table(grid["rows"], ["precision", "compile", "channels_last", "img_s", "step_ms", "mfu_pct",
                                     "bare_img_s", "trainer_vs_bare", "note"],
                      {"img_s": "{:.0f}", "step_ms": "{:.2f}", "mfu_pct": "{:.1f}", "bare_img_s": "{:.0f}",
                       "trainer_vs_bare": "{:.3f}"}))
    ov = x.load("overhead")
    if ov:
        m = ov["median"]
        print(f"  trainer/bare at batch {ov['args']['batch']} fp32 eager: {m['headline_ratio']:.3f} "
              f"(trainer {m['trainer_img_s']:.0f} img/s, bare {m['bare_img_s']:.0f} img/s; target >= 0.95)")
    sy = x.load("syncs")
    if sy and not sy.get("skipped"):
        print(f"  synchronising CUDA calls per steady-state step: {sy['per_step']:.1f}")
    ep = x.load("epoch")
    if ep:
        for r in ep["rows"]:
            print(f"  epoch ({r['precision']}, channels_last={r['channels_last']}, batch {r['batch']}, "
                  f"{r['train_images']} images): {r['epoch_seconds']:.2f} s, {r['images_per_second']:.0f} img/s")
    ck = x.load("checkpoint")
    if ck:
        print(f"  checkpoint: {ck['file_bytes'] / 1e6:.2f} MB, save {ck['save_ms']:.1f} ms, load "
              f"{ck['load_file_ms']:.1f} ms; step {ck['step_ms']:.2f} ms -> {ck['cost_pct_at_default_interval']:.2f}% "
              f"at every_steps={ck['every_steps']} (target < 1%)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("section")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=float, default=240, help="grid: stop starting configs after this")
    a = p.parse_args(argv)
    C.quiet_logs()
    x = Ctx(a)
    fn = {"env": sec_env, "correctness": sec_correctness, "nccl": sec_nccl, "syncs": sec_syncs,
          "matmul": sec_matmul, "grid": lambda c: sec_grid(c, a.budget_s), "overhead": sec_overhead,
          "epoch": sec_epoch, "checkpoint": sec_checkpoint, "summary": sec_summary}[a.section]
    fn(x)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
