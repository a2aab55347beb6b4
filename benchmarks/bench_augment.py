"""On-device augmentation vs torchvision per-sample transforms, and whether augmentation ever
bounds a training step.

A. img/s of `data.TrainBatches` over an epoch (augment=paper: translate <=5 px + flip, then
   normalise; batches gathered from uint8 tensors already on the device), and augment=none.
B. img/s of the classic pipeline on the same images: a Dataset of HWC uint8 arrays ->
   PIL.Image -> RandomCrop(32, padding=5) (= translation <=5 px, zero fill) ->
   RandomHorizontalFlip -> ToTensor -> Normalize, batched by a torch DataLoader with
   num_workers 0 and 2 (shuffle, batch 128; the first batches, worker start-up included, are
   excluded from the rate).
C. "Never the bottleneck": training step time (same model, batch, optimizer) with batches from
   TrainBatches(augment=paper) vs TrainBatches(augment=none) vs pre-built tensors, interleaved in
   rounds, plus the augmentation's own cost per batch as a share of a step.

    python benchmarks/bench_augment.py --images 50000 --tv-images 5000 --width 0.25
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import common as C
from allconv_hpc import data as data_mod
from allconv_hpc.models import build_model


def load_images(kind: str, n: int, seed: int = 0):
    c = C.compose(C.data_overrides(kind, n, 100, "paper") + ["wandb.mode=disabled"])
    ds = data_mod.load(c.cfg.data, seed)
    return c.cfg, ds


def ondevice_rate(ds, device, batch: int, augment: str, channels_last: bool, epochs: int) -> list[float]:
    imgs, labels = ds.train.images.to(device), ds.train.labels.to(device)
    tb = data_mod.TrainBatches(imgs, labels, batch, 0, 1, 0, augment, ds.mean, ds.std, False, channels_last)
    rates = []
    for e in range(epochs):
        C.sync(device)
        t = time.perf_counter()
        n = 0
        for x, y, _ in tb.epoch(e):
            n += len(y)
        C.sync(device)
        rates.append(n / (time.perf_counter() - t))
    return rates


class _HWCDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: numpy HWC uint8 -> PIL -> transform."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


def torchvision_rate(ds, n: int, batch: int, workers: int, skip_batches: int = 2) -> float:
    import torchvision.transforms as T
    tf = T.Compose([T.RandomCrop(32, padding=5), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(ds.mean, ds.std)])
    d = _HWCDataset(ds.train.images[:n], ds.train.labels[:n], tf)
    dl = torch.utils.data.DataLoader(d, batch_size=batch, shuffle=True, num_workers=workers,
                                     generator=torch.Generator().manual_seed(0))
    count, t = 0, None
    for i, (x, y) in enumerate(dl):
        if i == skip_batches:
            t = time.perf_counter()
        elif i > skip_batches:
            count += len(y)
    return count / (time.perf_counter() - t)


def step_times(cfg, ds, device, width: float, batch: int, steps: int, rounds: int) -> dict:
    """Median step time per batch source; each round runs every source for `steps` steps."""
    n = len(ds.train.labels)
    imgs, labels = ds.train.images.to(device), ds.train.labels.to(device)
    sources = {s: data_mod.TrainBatches(imgs, labels, batch, 0, 1, 0, s, ds.mean, ds.std, True, False)
               for s in ("paper", "none")}
    from allconv_hpc import augment as aug
    prebuilt = [(aug.normalize(imgs[k * batch:(k + 1) * batch], ds.mean, ds.std), labels[k * batch:(k + 1) * batch])
                for k in range(min(4, n // batch))]
    cfg.model.width = width
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3,
                          **({"fused": True} if device.type == "cuda" else {"foreach": True}))

    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def gen(name, epoch):
        if name == "prebuilt":
            i = 0
            while True:
                yield prebuilt[i % len(prebuilt)] + (batch,)
                i += 1
        else:
            while True:
                yield from sources[name].epoch(epoch)
                epoch += 1

    times = {k: [] for k in ("paper", "none", "prebuilt")}
    aug_only = []
    iters = {k: gen(k, 0) for k in times}
    for _ in range(2):  # warm-up
        for k in times:
            train_step(*next(iters[k])[:2])
    for r in range(rounds):
        for k in times:
            it = iters[k]
            for _ in range(steps):
                C.sync(device)
                t = time.perf_counter()
                x, y, _ = next(it)
                train_step(x, y)
                C.sync(device)
                times[k].append(time.perf_counter() - t)
        # the augmentation alone: gather + translate/flip + normalise for one batch
        it = iters["paper"]
        for _ in range(steps):
            C.sync(device)
            t = time.perf_counter()
            x, y, _ = next(it)
            C.sync(device)
            aug_only.append(time.perf_counter() - t)
    out = {f"step_ms_{k}": 1e3 * C.median(v) for k, v in times.items()}
    out.update({f"p10_step_ms_{k}": 1e3 * C.quantile(v, .1) for k, v in times.items()})
    out["batch_ms_paper_only"] = 1e3 * C.median(aug_only)
    out["n_steps_each"] = len(times["paper"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="auto", choices=["auto", "cifar10", "synthetic"])
    p.add_argument("--images", type=int, default=50000, help="training images for the on-device epoch")
    p.add_argument("--tv-images", type=int, default=5000, help="images per torchvision DataLoader pass")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=3, help="on-device epochs timed (median)")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--repeats", type=int, default=3, help="torchvision passes per worker count (median)")
    p.add_argument("--width", type=float, default=0.25, help="model width for part C")
    p.add_argument("--steps", type=int, default=5, help="part C: steps per source per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--skip-steps", action="store_true", help="skip part C")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    C.quiet_logs()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg, ds = load_images(a.data, a.images)
    print(f"{cfg.data.name}: {len(ds.train.labels)} training images, device {device}, "
          f"threads {torch.get_num_threads()}, batch {a.batch}")

    res = {"args": vars(a)}
    rates = {m: ondevice_rate(ds, device, a.batch, m, False, a.epochs) for m in ("paper", "none")}
    res["ondevice_paper_img_s"] = C.median(rates["paper"])
    res["ondevice_none_img_s"] = C.median(rates["none"])
    res["ondevice_paper_runs"] = rates["paper"]
    rows = [{"pipeline": "TrainBatches augment=paper (on device)", "img_s": res["ondevice_paper_img_s"]},
            {"pipeline": "TrainBatches augment=none (gather+normalise)", "img_s": res["ondevice_none_img_s"]}]
    tv_n = min(a.tv_images, len(ds.train.labels))
    for w in (int(x) for x in a.workers.split(",")):
        rs = [torchvision_rate(ds, tv_n, a.batch, w) for _ in range(a.repeats)]
        res[f"torchvision_w{w}_img_s"] = C.median(rs)
        res[f"torchvision_w{w}_runs"] = rs
        ratio = res["ondevice_paper_img_s"] / res[f"torchvision_w{w}_img_s"]
        res[f"ratio_vs_w{w}"] = ratio
        rows.append({"pipeline": f"torchvision PIL transforms, DataLoader num_workers={w}",
                     "img_s": res[f"torchvision_w{w}_img_s"], "on-device speed-up": f"{ratio:.1f}x"})
    print(C.table(rows, ["pipeline", "img_s", "on-device speed-up"], {"img_s": "{:,.0f}"}))
    best = max(v for k, v in res.items() if k.startswith("torchvision_w") and k.endswith("_img_s"))
    res["ratio_vs_best_torchvision"] = res["ondevice_paper_img_s"] / best
    print(f"on-device / best torchvision: {res['ratio_vs_best_torchvision']:.1f}x "
          f"(target >= 10x: {'met' if res['ratio_vs_best_torchvision'] >= 10 else 'NOT met'})")

    if not a.skip_steps:
        st = step_times(cfg, ds, device, a.width, a.batch, a.steps, a.rounds)
        res["steps"] = st
        rows = [{"batches from": k, "median step ms": st[f"step_ms_{k}"], "p10 step ms": st[f"p10_step_ms_{k}"]}
                for k in ("paper", "none", "prebuilt")]
        print(f"\ntraining step, width {a.width}, batch {a.batch} ({st['n_steps_each']} steps each, interleaved):")
        print(C.table(rows, ["batches from", "median step ms", "p10 step ms"], {"median step ms": "{:.1f}",
                                                                                 "p10 step ms": "{:.1f}"}))
        share = st["batch_ms_paper_only"] / st["step_ms_prebuilt"]
        res["aug_share_of_step"] = share
        print(f"augment=paper batch alone: {st['batch_ms_paper_only']:.2f} ms = {100 * share:.2f}% of a "
              f"pre-built-batch step ({st['step_ms_prebuilt']:.1f} ms)")
    C.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
