"""Exact conv FLOPs of a model from its layers (forward hooks on one 32x32 image).

Per conv: MACs = output elements x (in_channels / groups) x kh x kw; FLOPs = 2 x MACs (+ one add
per output element for the bias, counted separately). Training FLOPs per image = forward +
grad-of-weights (= forward MACs of every conv) + grad-of-inputs (= forward MACs of every conv but
the first, whose input needs no gradient), i.e. about 3x forward. ReLU, dropout, pooling and
the loss are elementwise and left out (well under 1%).

    python benchmarks/flops.py --width 1.0 [--model allcnn_c] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allconv_hpc.config import MODEL_NAMES, ModelConfig  # noqa: E402
from allconv_hpc.models import build_model  # noqa: E402


def conv_flops(model: nn.Module, input_shape=(1, 3, 32, 32)) -> dict:
    rows = []

    def hook(m, inp, out):
        kh, kw = m.kernel_size
        macs = out.numel() * (m.in_channels // m.groups) * kh * kw
        rows.append({"layer": f"{m.in_channels}->{m.out_channels} {kh}x{kw}/{m.stride[0]}",
                     "out": tuple(out.shape[1:]), "macs": macs, "bias_adds": out.numel() if m.bias is not None else 0})

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    n = input_shape[0]
    macs = sum(r["macs"] for r in rows) / n
    fwd = 2 * macs
    first = 2 * rows[0]["macs"] / n
    train = fwd + fwd + (fwd - first)  # forward + dW + dX (no dX for the first layer)
    return {"layers": rows, "forward_macs": macs, "forward_flops": fwd,
            "bias_flops": sum(r["bias_adds"] for r in rows) / n, "train_flops": train,
            "params": sum(p.numel() for p in model.parameters())}


def allcnn_flops(width: float = 1.0, name: str = "allcnn_c") -> dict:
    return conv_flops(build_model(ModelConfig(name=name, width=width)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--model", default="allcnn_c", choices=MODEL_NAMES)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = allcnn_flops(a.width, a.model)
    for row in r["layers"]:
        print(f"  {row['layer']:<16} out {str(row['out']):<15} {row['macs'] / 1e6:8.2f} M MACs")
    print(f"{a.model} width {a.width}: {r['params']:,} params; forward {r['forward_macs'] / 1e6:.1f} M MACs = "
          f"{r['forward_flops'] / 1e9:.3f} GFLOP per image (+{r['bias_flops'] / 1e6:.2f} M bias adds); "
          f"training {r['train_flops'] / 1e9:.3f} GFLOP per image")
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in r.items() if k != "layers"}, indent=1))
    return r


if __name__ == "__main__":
    main()
