"""How a split's images reach the device (data.preprocess).

channel  uint8 on the device; each batch is normalised per channel after augmentation (data.py).
gcn_zca  the paper's preprocessing: it follows the maxout paper, whose CIFAR-10 came from pylearn2's
         make_cifar10_gcn_whitened.py. Global contrast normalisation: each image minus its own mean,
         scaled to an L2 norm of 55 (pylearn2's CIFAR10(gcn=55.)). Then ZCA whitening fitted on the
         run's training images: x -> (x - m) P with P = V diag((l + 0.1)^-1/2) V^T from the
         eigendecomposition of their covariance (pylearn2's ZCA, filter_bias=0.1), which whitens the
         strong directions and damps, rather than blows up, those with variance below ~0.1.

The fit is done by every process, in float64 on its own device, from the training images only (never
the held-out or test ones): a pure function of them, so a resumed run and `evaluate` get the same
matrix. The whitened splits then live on the device as float32 (4x the uint8 bytes: 614 MB for
CIFAR-10's training images) and are augmented in whitened space, so a translation's zero fill is
the mean image, as in the paper's pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

GCN_SCALE = 55.0  # pylearn2 CIFAR10(gcn=55.)
ZCA_BIAS = 0.1    # pylearn2 ZCA(filter_bias=0.1)
_CHUNK = 8192     # images per block: one float64 block is 200 MB; GCN's temporaries make the peak ~2-3 of them


def gcn(images: torch.Tensor) -> torch.Tensor:
    """[N, ...] images -> [N, D] float64, each row centred and scaled to an L2 norm of GCN_SCALE (a
    constant image stays 0)."""
    x = images.reshape(len(images), -1).to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return x * (GCN_SCALE / torch.where(norm > 0, norm, torch.ones_like(norm)))


@dataclass(frozen=True)
class Whitening:
    mean: torch.Tensor    # [D] float64: the mean of the GCN'd training images
    matrix: torch.Tensor  # [D, D] float64, symmetric

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> whitened float32 [N, C, H, W] on the matrix's device."""
        dev = self.matrix.device
        out = torch.empty(images.shape, dtype=torch.float32, device=dev)
        flat = out.view(len(images), -1)
        for lo in range(0, len(images), _CHUNK):
            x = gcn(images[lo:lo + _CHUNK].to(dev))
            flat[lo:lo + _CHUNK] = ((x - self.mean) @ self.matrix).to(torch.float32)
        return out


def fit(images: torch.Tensor, device: torch.device | str = "cpu", bias: float = ZCA_BIAS) -> Whitening:
    """The GCN + ZCA whitening of `images` (uint8 [N, C, H, W], N >= 1), computed on `device`."""
    n = len(images)
    if n < 1:
        raise ValueError("fitting a whitening needs at least one image")
    d = images[0].numel()
    total = torch.zeros(d, dtype=torch.float64, device=device)
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    for lo in range(0, n, _CHUNK):  # sums of x and x x^T in blocks: one float64 copy of the data never exists
        x = gcn(images[lo:lo + _CHUNK].to(device))
        total += x.sum(dim=0)
        gram.addmm_(x.T, x)
    mean = total / n
    cov = gram / n - torch.outer(mean, mean)
    cov.diagonal().add_(bias)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    # eigvals >= bias up to rounding: cov is a covariance (positive semi-definite) plus bias * I
    return Whitening(mean, (eigvecs * eigvals.clamp_min(bias * 0.5).rsqrt()) @ eigvecs.T)


def to_device(preprocess: str, train_images: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """How images go to `device` under `preprocess`: a uint8 copy (channel), or whitened by a fit on
    `train_images` (gcn_zca), the same function for every split of a run."""
    if preprocess == "channel":
        return lambda images: images.to(device)
    if preprocess == "gcn_zca":
        return fit(train_images, device).apply
    raise ValueError(f"data.preprocess={preprocess!r} is not one of channel, gcn_zca")
