"""Shared helpers for the benchmarks: build the real Trainer in-process, time its steps, time a bare
PyTorch loop on the same model, and print/write results. Not a test; nothing here asserts timings."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # run from anywhere; an installed (or overlaid) allconv_hpc comes first
    sys.path.append(str(REPO))

from allconv_hpc import augment as aug  # noqa: E402
from allconv_hpc.compose import compose  # noqa: E402
from allconv_hpc.distributed import DistEnv  # noqa: E402
from allconv_hpc.models import build_model  # noqa: E402
from allconv_hpc.preempt import StopRequest  # noqa: E402

CIFAR_ROOT = os.environ.get("ALLCONV_BENCH_CIFAR", "/work/cifar")


def cifar_present(root: str = CIFAR_ROOT) -> bool:
    return (Path(root) / "cifar-10-batches-py" / "data_batch_1").is_file()


def data_overrides(kind: str, train_size: int, test_size: int = 100, augment: str = "paper") -> list[str]:
    """kind: cifar10 (real, from CIFAR_ROOT) | synthetic | auto (cifar10 when present)."""
    if kind == "auto":
        kind = "cifar10" if cifar_present() else "synthetic"
    elif kind == "cifar10" and not cifar_present():  # the package's error names data.root, which no benchmark takes
        raise SystemExit(f"--data cifar10: no CIFAR-10 in {CIFAR_ROOT}/cifar-10-batches-py; set ALLCONV_BENCH_CIFAR "
                         f"to the folder that holds cifar-10-batches-py, or use --data synthetic (or auto)")
    ov = [f"data={kind}", f"data.train_size={train_size}", f"data.test_size={test_size}", f"data.augment={augment}"]
    if kind == "cifar10":
        ov.append(f"data.root={CIFAR_ROOT}")
    return ov


def trainer_overrides(*, width: float, batch: int, device: str, precision: str = "fp32",
                      channels_last: bool = False, compile: bool = False, threads: Optional[int] = None,
                      every_steps: Optional[int] = None, drop_last: bool = True) -> list[str]:
    ov = [f"model.width={width}", f"trainer.batch_size={batch}", f"trainer.device={device}",
          f"trainer.precision={precision}", f"trainer.channels_last={str(channels_last).lower()}",
          f"trainer.compile={str(compile).lower()}", f"trainer.drop_last={str(drop_last).lower()}",
          "trainer.progress=log", "wandb.mode=disabled", "checkpoint.resume=never",
          f"checkpoint.every_steps={'null' if every_steps is None else every_steps}"]
    if threads is not None:
        ov.append(f"trainer.threads={threads}")
    return ov


def make_trainer(overrides: list[str], run_dir: Optional[Path] = None, env: Optional[DistEnv] = None):
    """The package's real Trainer, built exactly as `allconv-hpc train` builds it (minus logging setup)."""
    from allconv_hpc.trainer import Trainer
    if run_dir is None:  # a throw-away run folder, removed when this process exits
        import atexit
        import shutil
        run_dir = Path(tempfile.mkdtemp(prefix="allconv-bench-"))
        atexit.register(shutil.rmtree, run_dir, True)
    run_dir = Path(run_dir)
    c = compose([*overrides, f"hydra.run.dir={run_dir}"])
    return Trainer(c.cfg, c.cfg_dict, c.run_dir, env or DistEnv()).setup()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer_epoch(tr, warmup: int) -> dict:
    """Warm up on the epoch's last `warmup` steps, then time one whole epoch of the real `Trainer._train_epoch`.

    The trainer stages batches a chunk of steps at a time (data.TrainBatches.epoch): the step that starts
    a chunk gathers, augments and normalises for all of them, the others take a slice. So the timed region
    is a whole epoch from its first batch, staging included; the warm-up (compile, allocator, first-touch)
    is a separate partial epoch before it. On CPU (synchronous ops) every step is stamped when its batch
    is asked for, and split into getting the batch and the rest; `step_s` and `cpu_s` give each step its
    own rest plus the epoch's mean batch cost, so medians over steps keep the staging, spread evenly. On
    CUDA the device is synchronised only at the start and the end (the CPU may run ahead of the GPU, as in
    real training). Returns {"images", "seconds", "steps", "step_s" (CPU only), "cpu_s", "cpu_seconds",
    "batch_s": mean wall seconds per step spent getting batches}."""
    dev, st = tr.device, tr.state
    stop = StopRequest(tr.cfg.checkpoint.signal)
    if warmup:
        if warmup >= tr.steps_per_epoch:
            raise ValueError(f"epoch has {tr.steps_per_epoch} steps; need more than warmup={warmup}")
        st.step_in_epoch = tr.steps_per_epoch - warmup
        assert not tr._train_epoch(stop)
    st.step_in_epoch = 0
    orig = tr.batches.epoch
    asked: list[tuple[float, float]] = []  # (wall, CPU) when each batch was asked for, and at the end
    got: list[tuple[float, float]] = []    # ... and when it arrived
    sizes: list[int] = []

    def stamped(epoch: int, start: int = 0):
        it = orig(epoch, start)
        sync(dev)
        while True:
            asked.append((time.perf_counter(), time.process_time()))
            item = next(it, None)
            if item is None:
                sync(dev)
                asked[-1] = (time.perf_counter(), time.process_time())
                return
            got.append((time.perf_counter(), time.process_time()))
            sizes.append(item[2])
            yield item

    tr.batches.epoch = stamped
    try:
        stopped = tr._train_epoch(stop)
    finally:
        tr.batches.epoch = orig
    assert not stopped
    st.epoch += 1
    st.step_in_epoch = 0
    n = len(sizes)
    fetch = [[g[k] - a[k] for a, g in zip(asked, got)] for k in (0, 1)]  # getting each batch: wall, CPU
    rest = [[asked[i + 1][k] - got[i][k] for i in range(n)] for k in (0, 1)]
    mean_fetch = [sum(f) / n for f in fetch]
    step_s = [r + mean_fetch[0] for r in rest[0]] if dev.type == "cpu" else []
    cpu_s = [r + mean_fetch[1] for r in rest[1]]
    return {"images": sum(sizes), "seconds": asked[-1][0] - asked[0][0], "steps": n, "step_s": step_s,
            "cpu_s": cpu_s, "cpu_seconds": asked[-1][1] - asked[0][1], "batch_s": mean_fetch[0]}


class BareLoop:
    """A plain PyTorch training loop on the same model/optimizer settings as the trainer; inputs are
    pre-normalised device tensors (no data pipeline, no scheduler, no metrics, no checks)."""

    def __init__(self, cfg, device: torch.device, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        torch.manual_seed(aug.mix_seed(cfg.seed, aug.INIT_STREAM))  # the trainer's init
        self.model = build_model(cfg.model).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
        cuda = device.type == "cuda"
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.optim.momentum,
                                   nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay,
                                   **({"fused": True} if cuda else {"foreach": True}))
        self.net = torch.compile(self.model) if compile else self.model
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device, self.batches = device, batches
        self.i = 0

    def step(self) -> torch.Tensor:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.net(x)
        loss = F.cross_entropy(out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def run(self, steps: int, warmup: int) -> dict:
        for _ in range(warmup):
            self.step()
        sync(self.device)
        times, cpu, t0, c0 = [], [], time.perf_counter(), time.process_time()
        t, c = t0, c0
        for _ in range(steps):
            self.step()
            if self.device.type == "cpu":
                now, cnow = time.perf_counter(), time.process_time()
                times.append(now - t)
                cpu.append(cnow - c)
                t, c = now, cnow
        sync(self.device)
        seconds = time.perf_counter() - t0
        b = len(self.batches[0][1])
        return {"images": steps * b, "seconds": seconds, "steps": steps, "step_s": times, "cpu_s": cpu,
                "cpu_seconds": time.process_time() - c0}


def prebuilt_batches(tr, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n normalised, un-augmented batches of the trainer's own training images, on its device."""
    b = tr.cfg.trainer.batch_size
    imgs, labels = tr.batches.images, tr.batches.labels
    out = []
    for k in range(n):
        idx = torch.arange(k * b, (k + 1) * b, device=imgs.device) % len(labels)
        out.append((aug.normalize(imgs[idx], tr.mean, tr.std), labels[idx]))
    return out


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: Iterable[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; q=0.1 is a noise-robust 'best case' on a shared box."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], cols: list[str], fmt: Optional[dict] = None) -> str:
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c, "")
        if isinstance(v, float):
            return fmt.get(c, "{:.4g}").format(v)
        return str(v)

    cells = [[cell(r, c) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w[i]) for i, x in enumerate(xs)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, cells)])


def write_json(path: Optional[str], doc: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": machine_info(), **doc}, indent=1, default=str))
        print(f"wrote {path}")


def quiet_logs() -> None:
    import logging
    logging.getLogger().setLevel(logging.WARNING)


def timed(fn: Callable, *a, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn(*a, **kw)
    return time.perf_counter() - t, r
