"""Sections of benchmarks/gpu_check.sh (one python process per section, JSON into --out).

    python benchmarks/gpu_bench.py SECTION --out DIR [--dry-run] [--compiled]

SECTION: env | correctness | nccl | syncs | matmul | grid | overhead | epoch | checkpoint | whiten | summary
--out: the scratch folder of per-section JSON (gpu_check.sh merges it into one gpu_check.json).
--dry-run: CPU, tiny sizes, the same code paths; only CUDA-only calls are skipped (bf16 Trainer runs,
NCCL, TF32, the sync debug mode, cuda events) and say so.
GPU_CHECK_SECTION_DEADLINE (epoch seconds, set by gpu_check.sh): the grid starts no config it cannot
finish by then, and saves its JSON after every row.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
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
            epoch_train=50000, epoch_test=10000, epoch_batch=128, matmul_n=8192, matmul_iters=200,
            ckpt_repeats=5, ckpt_steps=10, overhead_batch=128, overhead_steps=40, overhead_rounds=3,
            graph_steps=60, compile_est_s=75, eager_est_s=15)
DRY = dict(width=0.125, grid_batch=16, grid_steps=3, grid_warmup=2, corr_batch=16, corr_steps=12,
           epoch_train=256, epoch_test=64, epoch_batch=16, matmul_n=256, matmul_iters=3,
           ckpt_repeats=2, ckpt_steps=2, overhead_batch=16, overhead_steps=3, overhead_rounds=1,
           graph_steps=3, compile_est_s=30, eager_est_s=5)

# The agreement check trains for real: constant LR (the default `schedule: paper` warms up from ~0
# over the first epoch, so a short epoch barely moves and any two precisions would agree), no dropout
# (deterministic), LR 0.005 for 20 steps. Measured on CPU at width 1, batch 128, fp32: the loss falls
# smoothly 2.30 -> 2.13 (mean of the last 5) by step 20 and 1.88 by step 24; at LR 0.01 it spikes to
# 4.8 at step 17, at 0.05 sooner, and past a spike two runs that differ by rounding alone part ways.
CORR_OVERRIDES = ["schedule=constant", "model.dropout=false", "optim.lr=0.005"]
SAME_WEIGHTS_TOL = dict(loss_rel=0.01, grad_cos=0.99)  # per step, on identical weights and batch
TRAJ_MIN_DROP = 0.05       # the reference's loss must fall by this much (else the check says nothing)
TRAJ_TOL_OF_DROP = 0.25    # |final loss difference| < this x the reference's drop
TRAINER_VS_BARE_REL = 0.01  # strict fp32: the real Trainer's step == a bare SGD step, every step


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


def _tf32(on: bool) -> None:
    """TF32 for fp32 matmuls/convs on CUDA. The Trainer switches it ON when built on CUDA, so its
    'fp32' is fp32 storage with TF32 tensor-core math; switching it off after building gives strict fp32."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


class Ctx:
    def __init__(self, a):
        self.dry = a.dry_run
        self.s = DRY if a.dry_run else FULL
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if self.dry else "cuda"
        self.deadline = float(os.environ.get("GPU_CHECK_SECTION_DEADLINE") or "inf")
        if not self.dry and not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible: run with --dry-run on a CPU machine")

    def left(self) -> float:
        """Seconds until this section's deadline (inf when run by hand)."""
        return self.deadline - time.time()

    def fp32_label(self) -> str:
        """What the Trainer's precision=fp32 really runs: TF32 math on CUDA (see _tf32)."""
        return "fp32" if self.device == "cpu" else "fp32 (tf32)"

    def save(self, name: str, doc: dict) -> None:  # atomic: a section killed mid-write leaves the old file
        tmp = self.out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.out / f"{name}.json")

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
          f"({'ok' if ok else 'UNEXPECTED'}: ~0.54 expected), training {info['flops_train_gflop']:.3f} GFLOP/image")
    x.save("env", info)
    if not ok:
        raise SystemExit(1)


def _trainer(x: Ctx, batch: int, n_images: int, precision="fp32", channels_last=False, compile=False,
             width=None, test=64, every_steps=None, run_dir=None, augment="paper", extra=(), env=None):
    ov = C.data_overrides("synthetic", n_images, test, augment)
    ov += C.trainer_overrides(width=width or x.s["width"], batch=batch, device=x.device, precision=precision,
                              channels_last=channels_last, compile=compile, every_steps=every_steps)
    return C.make_trainer([*ov, *extra], run_dir, env)


def _trainer_step_losses(tr) -> list[float]:
    """One epoch of the real Trainer; the mean loss of every step, from its device-side epoch sums
    (cloned at each batch boundary, read once at the end: no sync inside the loop)."""
    snaps = []
    orig = tr.batches.epoch

    def snapped(epoch, start=0):
        for item in orig(epoch, start):
            snaps.append(tr.epoch_sums.clone())
            yield item
        snaps.append(tr.epoch_sums.clone())

    tr.batches.epoch = snapped
    try:
        C.time_trainer_epoch(tr, 0)
    finally:
        tr.batches.epoch = orig
    s = torch.stack(snaps).double().cpu()
    d = s[1:] - s[:-1]
    return (d[:, 0] / d[:, 2]).tolist()


def _same_weights(x: Ctx, cfg, dev, batches, variants) -> dict:
    """Follow the strict-fp32 trajectory of a bare SGD loop; at every step, also compute each
    variant's loss and gradient on the SAME weights and batch (no update from them). Differences are
    then pure arithmetic (no chaotic drift): per-step loss rel. diff and gradient cosine."""
    ref = C.BareLoop(cfg, dev, batches, "fp32")
    params = [p for p in ref.model.parameters()]

    def loss_grad(amp, tf32):
        _tf32(tf32)
        ref.opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            out = ref.model(xb)
        loss = F.cross_entropy(out.float(), yb)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in params])

    rec = {name: {"loss": [], "ref": [], "cos": []} for name, _, _ in variants}
    for xb, yb in batches:
        got = {name: loss_grad(amp, tf32) for name, amp, tf32 in variants}
        l_ref, g_ref = loss_grad(None, False)  # last: its gradients are the ones the step uses
        for name, (l, g) in got.items():
            rec[name]["loss"].append(l)
            rec[name]["ref"].append(l_ref)
            rec[name]["cos"].append(F.cosine_similarity(g.double(), g_ref.double(), dim=0))
        ref.opt.step()
    _tf32(True)
    res = {}
    for name, r in rec.items():
        lv, rv = torch.stack(r["loss"]).double().cpu(), torch.stack(r["ref"]).double().cpu()
        rel = ((lv - rv).abs() / rv.abs()).tolist()
        cos = torch.stack(r["cos"]).cpu().tolist()
        res[name] = {"max_loss_rel_diff": max(rel), "min_grad_cos": min(cos), "ref_first": rv[0].item(),
                     "ref_last": rv[-1].item(), "loss": lv.tolist(),
                     "pass": max(rel) < SAME_WEIGHTS_TOL["loss_rel"] and min(cos) > SAME_WEIGHTS_TOL["grad_cos"]}
    return res


def _trajectory(cand: list[float], ref: list[float]) -> dict:
    k = min(5, len(ref))
    c_end, r_end = sum(cand[-k:]) / k, sum(ref[-k:]) / k
    drop = ref[0] - r_end
    d = {"first_rel_diff": abs(cand[0] - ref[0]) / abs(ref[0]), "final_cand": c_end, "final_ref": r_end,
         "ref_drop": drop, "final_abs_diff": abs(c_end - r_end),
         "max_step_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(cand, ref))}
    d["informative"] = drop >= TRAJ_MIN_DROP
    d["pass"] = (d["informative"] and d["first_rel_diff"] < SAME_WEIGHTS_TOL["loss_rel"]
                 and d["final_abs_diff"] < TRAJ_TOL_OF_DROP * drop)
    return d


def sec_correctness(x: Ctx) -> None:
    """bf16 and TF32 against strict fp32, on the same batches from the same init, while really training
    (constant LR, no dropout; see CORR_OVERRIDES):
      1. same weights per step (bare loop): loss rel. diff < 1 % and gradient cosine > 0.99 every step;
      2. the real Trainer's per-step losses: strict fp32 == a bare SGD loop (< 1 % every step), and
         bf16 / fp32 (tf32) / fp16 (its GradScaler, which skips overflowed steps: the first, often) end within
         25 % of strict fp32's loss drop (which must be >= 0.05).
    CPU (dry run): bf16 autocast in the bare loop only (the package runs bf16 on CUDA only); no TF32."""
    b, n = x.s["corr_batch"], x.s["corr_steps"]
    width = x.s["width"] if x.dry else 1.0
    dev = torch.device(x.device)
    res = {"batch": b, "steps": n, "width": width, "overrides": CORR_OVERRIDES,
           "reference": "strict fp32 (TF32 off)" if not x.dry else "fp32 (CPU)"}
    ok = True

    # 1. same weights, per step
    tr = _trainer(x, b, b * n, width=width, augment="none", extra=CORR_OVERRIDES)
    batches = [(xb.clone(), yb.clone()) for xb, yb, _ in tr.batches.epoch(0)]
    cfg = tr.cfg
    tr.close()
    variants = [("bf16", torch.bfloat16, False)] + ([] if x.dry else [("fp32 (tf32)", None, True)])
    sw = _same_weights(x, cfg, dev, batches, variants)
    res["same_weights"] = sw
    print(f"  1. same weights every step (bare loop, {n} steps, batch {b}, width {width}; reference "
          f"{res['reference']}: loss {sw['bf16']['ref_first']:.4f} -> {sw['bf16']['ref_last']:.4f})")
    for name, r in sw.items():
        ok &= r["pass"]
        print(f"     {name:12s} max loss rel diff {100 * r['max_loss_rel_diff']:.4f} % (< 1 %), min gradient "
              f"cosine {r['min_grad_cos']:.6f} (> 0.99): {'PASS' if r['pass'] else 'FAIL'}")

    # 2. the real Trainer's trajectories
    runs = [("fp32", "fp32", False)] if x.dry else [("fp32 (strict)", "fp32", False), ("fp32 (tf32)", "fp32", True),
                                                    ("bf16", "bf16", True), ("fp16", "fp16", True)]
    losses = {}
    for label, prec, tf32 in runs:
        tr = _trainer(x, b, b * n, precision=prec, width=width, augment="none", extra=CORR_OVERRIDES)
        _tf32(tf32)  # after building: the Trainer turned TF32 on
        losses[label] = _trainer_step_losses(tr)
        tr.close()
    _tf32(True)
    ref_label = runs[0][0]
    ref = losses[ref_label]
    bare = C.BareLoop(cfg, dev, batches, "fp32")
    _tf32(False)
    bare_l = torch.stack([bare.step().detach() for _ in range(n)]).double().cpu().tolist()
    _tf32(True)
    tvb = max(abs(a - c) / abs(c) for a, c in zip(ref, bare_l))
    res["trainer_losses"] = losses
    res["bare_losses"] = bare_l
    res["trainer_vs_bare_max_rel_diff"] = tvb
    tvb_ok = tvb < TRAINER_VS_BARE_REL
    ok &= tvb_ok
    print(f"  2. the real Trainer, {n} steps: {ref_label} loss {ref[0]:.4f} -> {sum(ref[-5:]) / 5:.4f} (mean of the "
          f"last 5)")
    print(f"     {ref_label} Trainer vs bare SGD loop: max per-step rel diff {100 * tvb:.4f} % (< 1 %): "
          f"{'PASS' if tvb_ok else 'FAIL'}")
    res["trajectory"] = {}
    for label, l in losses.items():
        if label == ref_label:
            continue
        t = _trajectory(l, ref)
        res["trajectory"][label] = t
        ok &= t["pass"]
        print(f"     {label:12s} first step rel diff {100 * t['first_rel_diff']:.4f} %, final {t['final_cand']:.4f} vs "
              f"{t['final_ref']:.4f}: |diff| {t['final_abs_diff']:.4f} < {TRAJ_TOL_OF_DROP} x drop "
              f"{t['ref_drop']:.4f}{'' if t['informative'] else ' (drop too small: NOT INFORMATIVE)'}: "
              f"{'PASS' if t['pass'] else 'FAIL'}")
    if x.dry:  # no bf16/TF32 Trainer on CPU: run the same comparison on Trainer vs bare, report only
        t = _trajectory(bare_l, ref)
        res["dry_trajectory_bare_vs_trainer"] = t
        print(f"     (dry run: no bf16/TF32 Trainer on CPU; the trajectory comparison on bare vs Trainer: |diff| "
              f"{t['final_abs_diff']:.6f}, reference drop {t['ref_drop']:.4f}"
              f"{'' if t['informative'] else ': too small to be informative at dry-run sizes, not gated'})")
    res["pass"] = bool(ok)
    print(f"  bf16/tf32/fp16 vs fp32 agreement: {'PASS' if ok else 'FAIL'}")
    x.save("correctness", res)
    if not ok:
        raise SystemExit(1)


def sec_deterministic(x: Ctx) -> None:
    """trainer.deterministic=true on the device: no kernel of a training step refuses it
    (use_deterministic_algorithms raises for one without a deterministic version), and two runs of the real
    Trainer from the same seed give the same per-step losses, bit for bit (augmentation and dropout on). bf16 on
    CUDA, the default there; fp32 in a dry run."""
    b, n = x.s["corr_batch"], x.s["corr_steps"]
    precision = "fp32" if x.dry else "bf16"
    runs, error = [], None
    for _ in range(2):
        try:
            tr = _trainer(x, b, b * n, precision=precision, extra=("trainer.deterministic=true",))
            try:
                runs.append(_trainer_step_losses(tr))
            finally:
                tr.close()
        except RuntimeError as e:  # e.g. "... does not have a deterministic implementation ..."
            error = (str(e).splitlines() or [type(e).__name__])[0][:300]
            break
    torch.use_deterministic_algorithms(False)
    same = error is None and runs[0] == runs[1]
    doc = {"precision": precision, "batch": b, "steps": n, "error": error, "bitwise_same": same,
           "losses": runs[0] if runs else None}
    print(f"  {precision}, {n} steps of batch {b}, twice: " + (f"refused: {error}" if error else
          f"per-step losses {'the same bit for bit' if same else 'DIFFER'} ({runs[0][0]:.4f} -> {runs[0][-1]:.4f})"))
    x.save("deterministic", doc)
    if not same:
        raise SystemExit(1)


def sec_nccl(x: Ctx) -> None:
    """The package's own process group (distributed.Dist: init_process_group with NCCL and device_id,
    plus its gloo control group) and DDP inside the real Trainer, on ONE rank: fit() one small epoch
    (train, eval, checkpoint), an all-reduce, then Trainer.close() destroys the group. gloo on CPU.

    The package takes its single-process path when WORLD_SIZE is 1 (DistEnv.distributed is
    world_size > 1), and NCCL cannot put two ranks on one GPU, so this uses a DistEnv whose
    `distributed` is forced true: everything else is the package's code path, no init here."""
    import socket
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from allconv_hpc.distributed import DistEnv

    class OneRankGroup(DistEnv):
        @property
        def distributed(self) -> bool:
            return True

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    backend = "gloo" if x.dry else "nccl"
    b = 32 if x.dry else 128
    import tempfile
    run_dir = Path(tempfile.mkdtemp(prefix="allconv-gpu-nccl-"))
    tr = _trainer(x, b, 4 * b, run_dir=run_dir, every_steps=2, env=OneRankGroup(master_port=port, source="torchrun"),
                  extra=[f"dist.backend={backend}", "trainer.epochs=1"])
    checks = {"group": dist.is_initialized(), "backend": dist.get_backend() if dist.is_initialized() else None,
              "ddp": isinstance(getattr(tr.net, "_orig_mod", tr.net), DDP)}
    code = tr.fit()
    t = tr.dist.all_reduce_sum(torch.ones(4, device=tr.device))
    checks["fit_exit"] = code
    checks["all_reduce"] = float(t.sum().item())
    checks["checkpoint"] = any((run_dir / "checkpoints").glob("*.pt"))
    checks["val_acc"] = tr.state.history[-1]["val_acc"]
    tr.close()
    checks["destroyed"] = not dist.is_initialized()
    ok = (checks["group"] and checks["backend"] == backend and checks["ddp"] and code == 0
          and checks["all_reduce"] == 4 and checks["checkpoint"] and checks["destroyed"]
          and math.isfinite(checks["val_acc"]))
    print(f"  {backend}, world 1 through allconv_hpc.distributed.Dist + Trainer(DDP): {checks}: "
          f"{'ok' if ok else 'FAILED'}")
    x.save("nccl", {"backend": backend, "ok": bool(ok), **checks})
    if not ok:
        raise SystemExit(1)


def sec_syncs(x: Ctx) -> None:
    """Host<->device synchronisations per training step of the real Trainer (CUDA sync debug mode), in bf16 (the
    default on a GPU) and fp16 (its GradScaler, given fused SGD, skips an overflowed step on the device)."""
    b = x.s["grid_batch"] // 4 or 1
    steps = 10
    docs = {}
    for precision in ["fp32"] if x.dry else ["bf16", "fp16"]:  # (no bf16/fp16 Trainer on a CPU)
        tr = _trainer(x, b, (2 + steps) * b, precision=precision)
        tr.cfg.trainer.log_every_steps = 10**9  # steady-state steps only (the log step syncs by design)
        tr.batches.chunk_steps = 4  # chunks staged at steps 4 and 8 too: the staging's copies are checked
        orig = tr.batches.epoch

        def gen(epoch, start=0, orig=orig):
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
            # a real sync's own words: the mode's one-time banner ("Synchronization debug mode is a prototype ...")
            # is no sync (it read as 0.1 per step of whichever precision ran first)
            caught = [str(m.message).splitlines()[0] for m in w
                      if "called a synchronizing CUDA operation" in str(m.message)]
        tr.batches.epoch = orig
        tr.close()
        docs[precision] = {"sync_warnings": len(caught), "per_step": len(caught) / steps, "examples": caught[:3]}
        if not x.dry:
            print(f"  {precision}: {len(caught)} synchronising CUDA calls in {steps} steady-state Trainer steps "
                  f"({len(caught) / steps:.1f} per step; 0 is the goal)")
            for m in caught[:3]:
                print(f"    e.g. {m[:160]}")
    doc = {"steps": steps, "by_precision": docs, "per_step": max(d["per_step"] for d in docs.values()),
           "sync_warnings": sum(d["sync_warnings"] for d in docs.values()), "skipped": x.dry}
    if x.dry:
        print("  (dry run: torch.cuda.set_sync_debug_mode is CUDA-only; the trainer steps ran without it)")
    x.save("syncs", doc)


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


def sec_grid(x: Ctx, compiled: bool) -> None:
    """img/s per precision x channels_last at batch 512, full width, eager (with the bare loop beside
    each) or compiled (--compiled; the most useful config first). A config starts only if the section's
    deadline leaves time for it (a compiled one needs ~compile_est_s); the JSON is saved after every row."""
    _cached_data_load()
    s = x.s
    b, steps, warm = s["grid_batch"], s["grid_steps"], s["grid_warmup"]
    train_gflop = flops_mod.allcnn_flops(s["width"])["train_flops"] / 1e9
    peak = (x.load("matmul") or {}).get("tflops")
    key = "grid_compiled" if compiled else "grid_eager"
    need = s["compile_est_s"] if compiled else s["eager_est_s"]
    doc = {"batch": b, "width": s["width"], "train_gflop_per_image": train_gflop, "peak_tflops": peak,
           "compile": compiled, "rows": []}
    configs = ([("bf16", True), ("bf16", False), ("fp32", True), ("fp32", False)] if compiled
               else [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)])
    for prec, cl in configs:
        row = {"precision": x.fp32_label() if prec == "fp32" else prec, "compile": compiled, "channels_last": cl}
        if x.dry and prec == "bf16":
            row["note"] = "skipped (dry run: bf16 Trainer is CUDA-only)"
        elif x.dry and compiled and cl:
            row["note"] = "skipped (dry run: one compiled config is enough to exercise the path)"
        elif x.left() < need:
            row["note"] = f"skipped for time ({max(0, x.left()):.0f} s left < ~{need} s a config needs)"
        else:
            row["note"] = "started, did not finish (killed by the section's timeout?)"
            x.save(key, {**doc, "rows": [*doc["rows"], row]})
            try:
                t0 = time.perf_counter()
                if compiled:  # each config compiles afresh (one shared frame would recompile on a stride change)
                    torch._dynamo.reset()
                tr = _trainer(x, b, (warm + steps) * b, prec, cl, compiled, test=64)
                r = C.time_trainer_epoch(tr, warm)
                row["img_s"] = r["images"] / r["seconds"]
                row["step_ms"] = 1e3 * r["seconds"] / r["steps"]
                if not compiled:
                    bare = C.BareLoop(tr.cfg, tr.device, C.prebuilt_batches(tr), prec, cl, False)
                    br = bare.run(steps, warm)
                    row["bare_img_s"] = br["images"] / br["seconds"]
                    row["trainer_vs_bare"] = row["img_s"] / row["bare_img_s"]
                if peak:
                    row["mfu_pct"] = 100 * row["img_s"] * train_gflop * 1e9 / (peak * 1e12)
                row["wall_s"] = time.perf_counter() - t0
                del row["note"]
                tr.close()
                del tr
            except Exception as e:  # one failing config must not hide the others
                row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                traceback.print_exc()
            if x.device == "cuda":
                torch.cuda.empty_cache()
        doc["rows"].append(row)
        x.save(key, doc)  # after every row: a timeout keeps the rows measured so far
        print(f"  {row['precision']} compile={compiled} channels_last={cl}: "
              + (f"{row['img_s']:.0f} img/s ({row['wall_s']:.0f} s)" if "img_s" in row else row.get("note", "")),
              flush=True)
    if any(r.get("note", "").startswith("FAILED") for r in doc["rows"]):
        raise SystemExit(1)


def sec_overhead(x: Ctx) -> None:
    """Trainer vs bare loop at the paper's batch (128), fp32 eager: the most host-overhead-sensitive case."""
    import bench_overhead
    s = x.s
    args = ["--device", x.device, "--width", str(s["width"]), "--batch", str(s["overhead_batch"]), "--steps",
            str(s["overhead_steps"]), "--warmup", "5" if not x.dry else "1", "--rounds", str(s["overhead_rounds"]),
            "--data", "synthetic", "--json", str(x.out / "overhead.json")]
    bench_overhead.main(args)


def sec_graphs(x: Ctx) -> None:
    """The compiled Trainer at batch 128 (bf16, channels_last: the fast recipe's settings at the paper's batch),
    trainer.compile_mode=default vs reduce-overhead (CUDA graphs: one launch per graph replay). At this batch
    the host's launches set the pace (section "overhead"); this measures what CUDA graphs take off it."""
    from allconv_hpc.trainer import _compile_counts
    s = x.s
    b, steps, warm = s["overhead_batch"], s["graph_steps"], s["grid_warmup"]
    # CUDA graphs first: the number wanted, where the section's time runs out (dry: CPU compiles as default anyway)
    modes = ["reduce-overhead"] if x.dry else ["reduce-overhead", "default"]
    prec = "fp32" if x.dry else "bf16"
    rows = []
    for mode in modes:
        torch._dynamo.reset()
        t0, before = time.perf_counter(), _compile_counts()
        tr = _trainer(x, b, (warm + steps) * b, prec, True, True, extra=[f"trainer.compile_mode={mode}"])
        r = C.time_trainer_epoch(tr, warm)
        after = _compile_counts()  # process-wide counters (reset() keeps them): this Trainer's part
        row = {"compile_mode": mode, "precision": prec, "channels_last": True, "batch": b,
               "img_s": r["images"] / r["seconds"], "step_ms": 1e3 * r["seconds"] / r["steps"],
               "cudagraph_skips": after[1] - before[1] if before and after else -1,
               "wall_s": time.perf_counter() - t0}
        tr.close()
        del tr
        rows.append(row)
        print(f"  compile_mode={mode}: {row['img_s']:.0f} img/s, {row['step_ms']:.2f} ms/step "
              f"(cudagraph skips {row['cudagraph_skips']}; {row['wall_s']:.0f} s with compile)")
        x.save("graphs", {"rows": rows})
        if x.device == "cuda":
            torch.cuda.empty_cache()
    if len(rows) == 2:
        print(f"  CUDA graphs / default: {rows[0]['img_s'] / rows[1]['img_s']:.3f}x")  # (graphs ran first)


def sec_epoch(x: Ctx) -> None:
    """Two full epochs through Trainer.fit() (train + eval), as in a real run: the first pays for cuDNN's
    autotuning of each new shape, lazy module loading and the first checkpoint writes; the second is what
    every later epoch of a run costs."""
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
        ov += ["trainer.epochs=2", "trainer.log_every_steps=50"]
        t = time.perf_counter()
        tr = C.make_trainer(ov, run_dir)
        init_s = time.perf_counter() - t
        code = tr.fit()
        first, h = tr.state.history[0], tr.state.history[-1]
        tr.close()
        row = {"precision": x.fp32_label() if prec == "fp32" else prec, "channels_last": cl, "batch": s["epoch_batch"],
               "train_images": s["epoch_train"],
               "epoch_seconds": h["epoch_seconds"], "images_per_second": h["images_per_second"],
               "first_epoch_seconds": first["epoch_seconds"],
               "val_acc": h["val_acc"], "trainer_init_s": init_s, "exit": code}
        res.append(row)
        print(f"  {row['precision']} channels_last={cl}, batch {row['batch']}, {row['train_images']} images: epoch 2 "
              f"{row['epoch_seconds']:.2f} s (epoch 1: {row['first_epoch_seconds']:.2f} s; train+eval, checkpoints "
              f"every 500 steps), "
              f"{row['images_per_second']:.0f} img/s, val_acc {row['val_acc']:.3f}")
    x.save("epoch", {"rows": res})


def sec_whiten(x: Ctx) -> None:
    """data.preprocess=gcn_zca on the device: the float64 fit (covariance, eigh) on all of CIFAR-10's
    50,000 training images (synthetic ones of that size), its time, and the agreement of a fit of 5,000 of
    them on both devices: the CUDA float64 matmul/eigh path runs nowhere else."""
    from allconv_hpc import data as data_mod, preprocess
    n = 50000 if not x.dry else 512
    images = data_mod.synthetic(n, 64, 0).train.images
    dev = torch.device(x.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    w = preprocess.fit(images, dev)
    sync()
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    white = w.apply(images)
    sync()
    apply_s = time.perf_counter() - t0
    cpu_s, diff = None, 0.0
    if dev.type != "cpu":  # the dry run fitted on the CPU already: no second fit to compare
        # both devices fit the same 5,000 images: the CPU's float64 covariance of all 50,000 would take a
        # good part of the section's minute, and the comparison is of the CUDA path, not of the data size
        sub = images[:5000]
        on_dev = preprocess.fit(sub, dev).apply(sub[:1000]).cpu()
        t0 = time.perf_counter()
        ref = preprocess.fit(sub, "cpu").apply(sub[:1000])
        cpu_s = time.perf_counter() - t0
        diff = (on_dev - ref).abs().max().item()
    doc = {"images": n, "device": str(dev), "fit_s": fit_s, "apply_s": apply_s, "cpu_fit_apply_s": cpu_s,
           "max_abs_diff_vs_cpu": diff, "whitened_std": white.std().item(), "bytes_on_device": white.numel() * 4,
           "ok": diff < 1e-3 and math.isfinite(white.std().item())}
    x.save("whiten", doc)
    vs_cpu = f"CPU fit of 5,000 {cpu_s:.1f} s; max |{dev} - cpu| {diff:.2e}" if cpu_s is not None else "no CPU comparison (dry run)"
    print(f"  gcn_zca fit on {n} images: {fit_s:.2f} s on {dev}, apply {apply_s:.2f} s "
          f"({doc['bytes_on_device'] / 1e6:.0f} MB float32); {vs_cpu}")
    if not doc["ok"]:
        raise SystemExit(1)


def sec_checkpoint(x: Ctx) -> None:
    import bench_checkpoint
    s = x.s
    bench_checkpoint.main(["--device", x.device, "--width", "1.0" if not x.dry else str(s["width"]),
                           "--batch", str(s["epoch_batch"]), "--repeats", str(s["ckpt_repeats"]),
                           "--steps", str(s["ckpt_steps"]), "--json", str(x.out / "checkpoint.json")])


def sec_summary(x: Ctx) -> None:
    env = x.load("env") or {}
    print(f"  device: {env.get('gpu', 'CPU (dry run)')}, torch {env.get('torch')}, CUDA {env.get('cuda')}")
    corr = x.load("correctness")
    if corr:
        parts = [f"{k} same-weights loss {100 * v['max_loss_rel_diff']:.3f}% / grad cos {v['min_grad_cos']:.5f}"
                 for k, v in corr.get("same_weights", {}).items()]
        parts += [f"{k} Trainer final {v['final_cand']:.4f} vs {v['final_ref']:.4f} (drop {v['ref_drop']:.3f})"
                  for k, v in corr.get("trajectory", {}).items()]
        parts.append(f"Trainer vs bare {100 * corr['trainer_vs_bare_max_rel_diff']:.4f}%")
        print(f"  agreement vs {corr['reference']}: " + "; ".join(parts) + f" -> {'PASS' if corr['pass'] else 'FAIL'}")
    nc = x.load("nccl")
    if nc:
        print(f"  package process group ({nc['backend']}, 1 rank) + DDP Trainer fit: {'ok' if nc['ok'] else 'FAILED'}")
    d2 = x.load("ddp2_compile")
    if d2:
        print(f"  2 ranks over gloo on one device with trainer.compile=true: {'ok' if d2.get('ok') else 'FAILED'}")
    mm = x.load("matmul")
    if mm:
        print(f"  bf16 matmul peak: {mm['tflops']:.4g} TFLOP/s (n={mm['n']})")
    grids = [g for g in (x.load("grid_eager"), x.load("grid_compiled")) if g]
    if grids:
        g = grids[0]
        print(f"  throughput, width {g['width']}, batch {g['batch']} (MFU: {g['train_gflop_per_image']:.3f} "
              f"GFLOP/image vs the bf16 matmul peak, for every row; 'fp32 (tf32)': the Trainer's fp32 on CUDA runs "
              f"TF32 math, whose peak is about half bf16's, so its MFU reads about 2x low against its own):")
        print(C.table([r for g in grids for r in g["rows"]],
                      ["precision", "compile", "channels_last", "img_s", "step_ms", "mfu_pct", "bare_img_s",
                       "trainer_vs_bare", "note"],
                      {"img_s": "{:.0f}", "step_ms": "{:.2f}", "mfu_pct": "{:.1f}", "bare_img_s": "{:.0f}",
                       "trainer_vs_bare": "{:.3f}"}))
    ov = x.load("overhead")
    if ov:
        m = ov["median"]
        print(f"  trainer/bare at batch {ov['args']['batch']} {x.fp32_label()} eager: {m['headline_ratio']:.3f} "
              f"(trainer {m['trainer_img_s']:.0f} img/s, bare {m['bare_img_s']:.0f} img/s; target >= 0.95)")
    sy = x.load("syncs")
    if sy and not sy.get("skipped"):
        per = ", ".join(f"{k} {d['per_step']:.1f}" for k, d in sy["by_precision"].items())
        print(f"  synchronising CUDA calls per steady-state step: {per}")
    ep = x.load("epoch")
    if ep:
        for r in ep["rows"]:
            print(f"  epoch ({r['precision']}, channels_last={r['channels_last']}, batch {r['batch']}, "
                  f"{r['train_images']} images): {r['epoch_seconds']:.2f} s a warm epoch, {r['images_per_second']:.0f} "
                  f"img/s (the first: {r['first_epoch_seconds']:.2f} s)")
    wh = x.load("whiten")
    if wh:
        cpu = wh["cpu_fit_apply_s"]
        vs = f"(CPU {cpu:.1f} s), max diff vs CPU {wh['max_abs_diff_vs_cpu']:.1e}" if cpu is not None else "(dry run)"
        print(f"  data.preprocess=gcn_zca fit, {wh['images']} images: {wh['fit_s']:.2f} s on {wh['device']} "
              f"{vs}: {'ok' if wh['ok'] else 'FAILED'}")
    gr = x.load("graphs")
    if gr:
        for r in gr["rows"]:
            print(f"  compiled Trainer, batch {r['batch']} {r['precision']} NHWC, compile_mode={r['compile_mode']}: "
                  f"{r['img_s']:.0f} img/s, {r['step_ms']:.2f} ms/step (cudagraph skips {r['cudagraph_skips']})")
    ck = x.load("checkpoint")
    if ck:
        print(f"  checkpoint: {ck['file_bytes'] / 1e6:.2f} MB, save {ck['save_ms']:.1f} ms blocking "
              f"({ck['durable_save_ms']:.1f} ms durable, writer holds the GIL <= {ck['writer_stall_ms_max']:.1f} ms), "
              f"load {ck['load_file_ms']:.1f} ms; step {ck['step_ms']:.2f} "
              f"ms -> {ck['cost_pct_at_default_interval']:.2f}% at every_steps={ck['every_steps']}, "
              f"{ck['cost_pct_epoch_end']:.2f}% per epoch-end save (target < 1%)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("section")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--compiled", action="store_true", help="grid: the torch.compile configs (else eager)")
    a = p.parse_args(argv)
    C.quiet_logs()
    x = Ctx(a)
    fn = {"env": sec_env, "correctness": sec_correctness, "deterministic": sec_deterministic, "nccl": sec_nccl, "syncs": sec_syncs,
          "matmul": sec_matmul, "grid": lambda c: sec_grid(c, a.compiled), "overhead": sec_overhead,
          "epoch": sec_epoch, "checkpoint": sec_checkpoint, "whiten": sec_whiten, "graphs": sec_graphs,
          "summary": sec_summary}[a.section]
    fn(x)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
