"""The All Convolutional Net family (Springenberg et al. 2014: base models A, B, C and their
Strided-CNN, ConvPool-CNN and All-CNN variants) and the seed's Keras net.

Every model is a plain nn.Sequential ending in global average pooling, so the layer list printed
by `summary()` reads like the paper's Table 2. Widths 96/192 scale with `model.width`.

Initialisation (why): there is no batch norm, so the scale of the init decides whether nine
stacked ReLU convs train at all. Kaiming-normal (fan_in, ReLU gain) keeps activations at unit
scale through depth; the class-score conv gets a small init so the first losses sit at log(C)
instead of exploding, which lets the paper's learning rates (it searched 0.01-0.25) train from the first epoch.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


class SamePad(nn.Module):
    """TensorFlow/Keras "same" padding for a stride-2 3x3 conv on even inputs: 0 before, 1 after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (0, 1, 0, 1))


class GlobalAvgPool(nn.Module):
    """Mean over H and W: [B,C,H,W] -> [B,C]. A plain mean, not AdaptiveAvgPool2d, whose CUDA
    backward has no deterministic kernel (trainer.deterministic=true would raise on GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def _conv(cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k // 2) if pad is None else pad)


# The paper's three base nets (Table 1) differ only in the kernels of each of their two stages
# (96 then 192 channels, each ending in a downsampling); what follows stage 2 is shared.
BASES = {"a": (5,), "b": (5, 1), "c": (3, 3)}
# How each variant ends a stage (Table 3 / section 3.2): max-pooling (the base model), the last conv
# strided instead of pooling (Strided-CNN), an extra 3x3 conv before the pooling (ConvPool-CNN), or
# the pooling replaced by a 3x3 stride-2 conv (All-CNN).
VARIANTS = ("model", "strided_cnn", "convpool_cnn", "allcnn")


def build_model(cfg: ModelConfig) -> nn.Sequential:
    """Build `cfg.name` at `cfg.width`. The returned module maps [B,3,32,32] float -> [B,C] logits."""
    w1, w2 = round(96 * cfg.width), round(192 * cfg.width)
    p_in = cfg.input_dropout if cfg.dropout else 0.0
    p_hid = cfg.hidden_dropout if cfg.dropout else 0.0
    relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
    drop = lambda p: nn.Dropout(p) if p > 0 else nn.Identity()  # noqa: E731

    layers: list[nn.Module] = [drop(p_in)]
    if cfg.name == "allcnn_seed":
        # Keras: strided convs with "same" padding and no activation; layer 7 is "same", not valid.
        layers += [_conv(3, w1, 3), relu(), _conv(w1, w1, 3), relu(), SamePad(), _conv(w1, w1, 3, 2, pad=0),
                   drop(p_hid),
                   _conv(w1, w2, 3), relu(), _conv(w2, w2, 3), relu(), SamePad(), _conv(w2, w2, 3, 2, pad=0),
                   drop(p_hid),
                   _conv(w2, w2, 3), relu()]
    else:
        variant, base = cfg.name.rsplit("_", 1)
        if variant not in VARIANTS or base not in BASES:  # config validation makes this unreachable
            raise ValueError(f"unknown model {cfg.name!r}")
        cin = 3
        for width in (w1, w2):
            layers += _stage(BASES[base], variant, cin, width, relu)
            layers.append(drop(p_hid))
            cin = width
        layers += [_conv(w2, w2, 3, pad=0), relu()]  # layer 7: 3x3 valid, 8x8 -> 6x6
    layers += [_conv(w2, w2, 1), relu(), _conv(w2, cfg.num_classes, 1)]
    if cfg.final_relu:
        layers.append(relu())
    layers.append(GlobalAvgPool())
    model = nn.Sequential(*layers)
    init_weights(model, final_relu=cfg.final_relu)
    return model


def _stage(convs: tuple[int, ...], variant: str, cin: int, width: int, relu) -> list[nn.Module]:
    """One stage at `width` channels that halves the resolution (32 -> 16 or 16 -> 8)."""
    out: list[nn.Module] = []
    for i, k in enumerate(convs):
        last = i == len(convs) - 1
        stride = 2 if last and variant == "strided_cnn" else 1  # Strided-CNN: the conv before the pool
        out += [_conv(cin, width, k, stride), relu()]
        cin = width
    if variant in ("convpool_cnn", "allcnn"):
        out += [_conv(width, width, 3, 2 if variant == "allcnn" else 1), relu()]
    if variant in ("model", "convpool_cnn"):
        out.append(nn.MaxPool2d(3, stride=2, padding=1))  # paper: 3x3, stride 2
    return out


FINAL_RELU_BIAS = 1.0


def init_weights(model: nn.Module, final_relu: bool = False) -> None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(m.bias)
    # class scores: small, so the initial loss is ~log(C) rather than large
    nn.init.normal_(convs[-1].weight, std=1.0 / math.sqrt(convs[-1].in_channels) * 0.1)
    if final_relu:
        # A ReLU on the scores passes gradient only where a score is > 0. Zero biases start them at the
        # kink, and lr 0.05 without warmup pushes every score below 0 within a few steps: a dead net
        # (measured: loss stuck at log 10). One equal positive bias keeps them alive; equal biases keep
        # the first loss at log(C), and while the scores are > 0 their gradients sum to 0 across classes.
        nn.init.constant_(convs[-1].bias, FINAL_RELU_BIAS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: nn.Module, input_shape=(1, 3, 32, 32)) -> str:
    """Keras-style table: layer, output shape, parameters (as the seed prints at start)."""
    rows, x = [], torch.zeros(input_shape)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(model):
            x = layer(x)
            n = sum(p.numel() for p in layer.parameters())
            rows.append((f"{i:>2} {layer.__class__.__name__}{_desc(layer)}", str(tuple(x.shape[1:])), n))
    model.train(was_training)
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{'layer':<{w}}{'output shape':<18}{'params':>10}", "-" * (w + 28)]
    lines += [f"{a:<{w}}{b:<18}{c:>10,}" for a, b, c in rows]
    lines += ["-" * (w + 28), f"{'total parameters':<{w + 18}}{count_parameters(model):>10,}"]
    return "\n".join(lines)


def _desc(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        return f"({layer.in_channels}->{layer.out_channels}, {k}x{k}, stride {s}, pad {p})"
    if isinstance(layer, nn.Dropout):
        return f"(p={layer.p})"
    if isinstance(layer, nn.MaxPool2d):
        return f"({layer.kernel_size}x{layer.kernel_size}, stride {layer.stride})"
    return ""
