"""data.preprocess=gcn_zca: what the whitening costs a run.

A. The fit at start-up (every process, on its device): GCN + the float64 covariance of the training
   images, the eigendecomposition, and applying it to train + test; timed in parts.
B. The training data path per step: `TrainBatches` (gather, augment=paper, normalise) over the uint8
   images (channel) and over the whitened float32 ones, interleaved in rounds; the float images are 4x
   the bytes the gather and the translation move.

    python benchmarks/bench_preprocess.py [--data cifar10|synthetic] [--images 50000] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common as C
from allconv_hpc import data as data_mod, preprocess


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_fit(train: torch.Tensor, test: torch.Tensor, dev: torch.device) -> dict:
    t0 = time.perf_counter()
    x = preprocess.gcn(train.to(dev))
    _sync(dev)
    gcn_s = time.perf_counter() - t0
    del x
    t0 = time.perf_counter()
    w = preprocess.fit(train, dev)  # gcn again + covariance + eigh: the fit as the trainer runs it
    _sync(dev)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    white = w.apply(train)
    w.apply(test)
    _sync(dev)
    apply_s = time.perf_counter() - t0
    return {"gcn_s": gcn_s, "fit_s": fit_s, "apply_train_test_s": apply_s, "total_s": fit_s + apply_s,
            "whitened_std": white.std().item(), "white": white}


def time_batches(sources: dict, steps: int, rounds: int, dev: torch.device) -> dict:
    per = {k: [] for k in sources}
    for _ in range(rounds):
        for name, tb in sources.items():
            it = tb.epoch(0)
            next(it)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            _sync(dev)
            per[name].append((time.perf_counter() - t0) / steps * 1000)
    return {k: statistics.median(v) for k, v in per.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="auto", help="cifar10 (from ALLCONV_BENCH_CIFAR) | synthetic | auto")
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cfg = C.compose(C.data_overrides(a.data, a.images, a.test_images)).cfg
    ds = data_mod.load(cfg.data, 0)
    if len(ds.train) // a.batch < a.steps + 1:  # one epoch must hold the warm-up batch and the timed ones
        p.error(f"--steps {a.steps} + 1 batches of {a.batch} need {(a.steps + 1) * a.batch} images; "
                f"there are {len(ds.train)}")
    print(f"{cfg.data.name}: {len(ds.train)} training + {len(ds.test)} test images on {dev}, "
          f"{torch.get_num_threads()} threads")
    fit = time_fit(ds.train.images, ds.test.images, dev)
    print(f"A. fit: gcn {fit['gcn_s']:.2f} s; fit (gcn + covariance + eigh) {fit['fit_s']:.2f} s; apply to "
          f"train + test {fit['apply_train_test_s']:.2f} s; total {fit['total_s']:.2f} s "
          f"(whitened std {fit['whitened_std']:.3f})")
    labels = ds.train.labels.to(dev)
    mk = lambda images: data_mod.TrainBatches(images, labels, a.batch, 0, 1, 0, "paper", ds.mean, ds.std, True)  # noqa: E731
    ms = time_batches({"channel (uint8)": mk(ds.train.images.to(dev)), "gcn_zca (float32)": mk(fit["white"])},
                      a.steps, a.rounds, dev)
    print(f"B. batch of {a.batch}, augment=paper, median of {a.rounds} rounds x {a.steps} steps: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    C.write_json(a.json, {"args": vars(a), "images": len(ds.train), "test_images": len(ds.test),
                          "threads": torch.get_num_threads(), "device": str(dev),
                          "fit": {k: v for k, v in fit.items() if k != "white"}, "batch_ms": ms})


if __name__ == "__main__":
    main()
