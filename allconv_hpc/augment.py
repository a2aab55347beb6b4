"""Batched, device-side augmentation whose randomness is a pure function of (seed, epoch, sample).

Why: parameters are drawn once per epoch for every sample of the training set, on CPU, from a
generator seeded only by (seed, epoch), and then looked up by sample index. So the augmentation a
sample gets does not depend on the world size, the rank, the batch it lands in, the device, or
whether the epoch was resumed halfway: DDP sharding and restarts reproduce it exactly.

Modes (data.augment):
  paper  random translation of up to 5 px in x and y, zero fill, plus horizontal flips (p = 0.5):
         the All-CNN paper's "translations and horizontal flipping".
  seed   the seed Keras script's shifts: Keras draws U(-0.1, 0.1) x 32 px per axis and samples
         nearest-neighbour (order=0), so the pixel shift is round(U(-3.2, 3.2)) in -3..3 (+-3 less
         often than the others); edge-replicate fill (fill_mode="nearest"), no flips.
  none   identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

MAX_SHIFT = {"paper": 5, "seed": 3, "none": 0}
KERAS_SHIFT_PX = 0.1 * 32  # width/height_shift_range=0.1 of a 32 px image
# torch's CPU generator (mt19937) draws from the low 32 bits of a seed alone: seeds equal in those bits
# give the same numbers, so every seed here is kept to 32 bits, where streams must differ.
SEED_MASK = (1 << 32) - 1
# A run's random streams: stream offset + i (an epoch, a rank) goes through mix_seed. The offsets are
# 2**28 apart and no epoch count or world size reaches 2**28, so within a run no two streams share a seed.
# The data subsets and the held-out split draw from small seeds of their own (data._split_off), which an
# epoch's augmentation may share (seed=0: epoch e's is e): a permutation there, shifts here, no correlation
# between an image's label and its shifts (chi-square, 2026-12-06); changing them would change runs' images.
AUG_STREAM, ORDER_STREAM, DROPOUT_STREAM, INIT_STREAM = 0, 1 << 28, 2 << 28, 3 << 28
# Runs begun before 2026-12-03 (their checkpoints' train_state has no "streams") shuffled with the offset
# 1 << 40, which is 0 in 32 bits: their order drew the numbers of their augmentation. They resume with it.
LEGACY_ORDER_STREAM = 1 << 40


def mix_seed(seed: int, epoch: int) -> int:
    """A stream's generator seed for (seed, epoch): seed * 1_000_003 + epoch, kept in 32 bits; `epoch` is
    a stream offset (above) plus an epoch or a rank.

    1_000_003 is a prime far above any epoch count, so a run's (seed, epoch) pairs never collide.
    (The data subsets, data.test_size and data.train_size, draw from the seed itself: a run resumes on its images.)
    """
    return (seed * 1_000_003 + epoch) & SEED_MASK


def augment_mode_fill(mode: str) -> str:
    """Fill for the pixels a translation vacates: "nearest" for the Keras seed mode, else "zero"."""
    if mode not in MAX_SHIFT:
        raise ValueError(f"augment mode {mode!r} is not one of {', '.join(MAX_SHIFT)}")
    return "nearest" if mode == "seed" else "zero"


@dataclass
class AugParams:
    dx: torch.Tensor    # int8 [n], content moves right by dx pixels
    dy: torch.Tensor    # int8 [n], content moves down by dy pixels
    flip: torch.Tensor  # bool [n], horizontal flip after the translation

    def __getitem__(self, idx: torch.Tensor) -> AugParams:
        return AugParams(self.dx[idx], self.dy[idx], self.flip[idx])


def draw_params(n: int, seed: int, epoch: int, mode: str) -> AugParams:
    """Per-sample augmentation parameters for all n samples of one epoch (CPU tensors)."""
    shift = MAX_SHIFT.get(mode)
    if shift is None:
        raise ValueError(f"augment mode {mode!r} is not one of {', '.join(MAX_SHIFT)}")
    if mode == "none":
        zeros = torch.zeros(n, dtype=torch.int8)
        return AugParams(zeros, zeros.clone(), torch.zeros(n, dtype=torch.bool))
    g = torch.Generator().manual_seed(mix_seed(seed, AUG_STREAM + epoch))
    if mode == "seed":  # Keras: a continuous shift, rounded by its nearest-neighbour sampling
        dx, dy = (((torch.rand(n, generator=g) * 2 - 1) * KERAS_SHIFT_PX).round().to(torch.int8) for _ in "xy")
    else:
        dx = torch.randint(-shift, shift + 1, (n,), generator=g, dtype=torch.int8)
        dy = torch.randint(-shift, shift + 1, (n,), generator=g, dtype=torch.int8)
    flip = torch.rand(n, generator=g) < 0.5
    if mode != "paper":
        flip.zero_()  # drawn anyway so every mode consumes the generator alike
    return AugParams(dx, dy, flip)


def apply(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor,
          fill: str = "zero") -> torch.Tensor:
    """Translate each image by its own integer (dx, dy), then flip it horizontally where `flip`.

    One gather with per-sample source indices (no loop, no interpolation, no host sync):
    out[b, :, y, x] = images[b, :, y - dy[b], x' - dx[b]] with x' = W-1-x where flipped, else x.
    Out-of-range sources are clamped to the edge ("nearest") or zeroed ("zero").
    """
    if fill not in ("zero", "nearest"):
        raise ValueError(f"fill={fill!r} must be 'zero' or 'nearest'")
    b, c, h, w = images.shape
    dev = images.device
    dx = dx.to(dev, torch.long).view(b, 1)
    dy = dy.to(dev, torch.long).view(b, 1)
    xs = torch.arange(w, device=dev).expand(b, w)
    xs = torch.where(flip.to(dev).view(b, 1), (w - 1) - xs, xs) - dx   # [b, w] source columns
    ys = torch.arange(h, device=dev).expand(b, h) - dy                 # [b, h] source rows
    src = ys.clamp(0, h - 1).unsqueeze(2) * w + xs.clamp(0, w - 1).unsqueeze(1)  # [b, h, w]
    out = images.reshape(b, c, h * w).gather(2, src.view(b, 1, h * w).expand(b, c, h * w))
    out = out.view(b, c, h, w)
    if fill == "zero":
        valid = ((ys >= 0) & (ys < h)).unsqueeze(2) & ((xs >= 0) & (xs < w)).unsqueeze(1)
        out.mul_(valid.unsqueeze(1))  # out is a fresh tensor; uint8 * bool is several times faster than masked_fill
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,3,H,W] -> (x/255 - mean)/std as `dtype`; mean/std per channel in [0, 1] pixel units."""
    scale, shift = _affine(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    # fp32 math (copy=True: never scale a float input in place), cast last so bf16/fp16 round once
    x = images.to(torch.float32, copy=True).mul_(scale).sub_(shift)
    if dtype != torch.float32:
        x = x.to(dtype)
    # NHWC last: per-channel broadcasts over an NHWC tensor (and uint8 permutes) are slow on CPU
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x/255*scale - shift constants, built once per device (no host-to-device copy per batch)."""
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    return ((1.0 / (255.0 * std_t)).float().to(device), (mean_t / std_t).float().to(device))
