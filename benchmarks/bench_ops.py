"""Host ops per training step: the real Trainer vs a bare PyTorch loop, counted, not timed.

On a GPU every op the host dispatches costs a few microseconds of Python, dispatcher and launch time,
and at small batches (batch 128 on an H200: ~3 ms steps) the host, not the GPU, sets the pace. So the
Trainer's overhead there is its extra ops per step. They are the same on any device, so this counts
them here on the CPU, exactly, with a TorchDispatchMode (every ATen op the host dispatches, views
included; on a GPU most are kernel launches). Both sides are warmed up first (the optimizer's first
step creates its buffers), then one epoch of the Trainer (`--steps` steps: at batch 128 one staging
chunk is 64 steps) and as many bare steps are counted. The extra ops are listed by where they come
from (the package file and line that called them).

    python benchmarks/bench_ops.py --batch 128 --steps 64
"""
from __future__ import annotations

import argparse
import collections
import traceback

from torch.utils._python_dispatch import TorchDispatchMode

import common as C
from allconv_hpc.preempt import StopRequest


class Count(TorchDispatchMode):
    def __init__(self, where: bool = False):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        if self.where:
            ours = [f for f in traceback.extract_stack(limit=40) if "/allconv_hpc/" in f.filename]
            self.sites[f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "torch"] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="steps of the counted epoch")
    p.add_argument("--width", type=float, default=0.0625, help="the op count does not depend on it")
    p.add_argument("--augment", default="paper", choices=["paper", "seed", "none"])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    C.quiet_logs()
    ov = C.data_overrides("synthetic", a.steps * a.batch, 100, a.augment)
    ov += C.trainer_overrides(width=a.width, batch=a.batch, device="cpu", threads=1)
    tr = C.make_trainer(ov)
    bare = C.BareLoop(tr.cfg, tr.device, C.prebuilt_batches(tr), "fp32", False, False)
    stop = StopRequest(tr.cfg.checkpoint.signal)
    tr.state.step_in_epoch = tr.steps_per_epoch - 1  # warm-up: the last step
    tr._train_epoch(stop)
    bare.step()
    tr.state.step_in_epoch = 0
    with Count(where=True) as t:
        tr._train_epoch(stop)
    with Count() as b:
        for _ in range(a.steps):
            bare.step()
    n_t, n_b = sum(t.ops.values()) / a.steps, sum(b.ops.values()) / a.steps
    extra = {k: t.ops[k] / a.steps - b.ops.get(k, 0) / a.steps for k in t.ops | b.ops}
    print(f"batch {a.batch}, {a.steps} steps, augment={a.augment}, chunk of {getattr(tr.batches, 'chunk_steps', 1)} "
          f"steps: ops per step: trainer {n_t:.2f}, bare {n_b:.2f}, extra {n_t - n_b:.2f}")
    print("extra ops per step by op:  " + ", ".join(f"{k} {v:+.2f}" for k, v in
                                                     sorted(extra.items(), key=lambda kv: -abs(kv[1])) if abs(v) >= 0.01))
    print("trainer ops per step by caller (package file:line; 'torch' = inside torch, e.g. autograd):")
    for site, n in sorted(t.sites.items(), key=lambda kv: -kv[1]):
        print(f"  {n / a.steps:7.2f}  {site}")
    doc = {"args": vars(a), "trainer_ops_per_step": n_t, "bare_ops_per_step": n_b, "extra_per_step": n_t - n_b,
           "extra_by_op": extra, "trainer_by_site": {k: v / a.steps for k, v in t.sites.items()}}
    C.write_json(a.json, doc)
    tr.close()
    return doc


if __name__ == "__main__":
    main()
