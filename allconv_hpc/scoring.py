"""What the trainer and `evaluate` share so that their scores agree: a run's precision and kernel choices,
and one batch's loss and correct count."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F


def batch_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """[summed cross-entropy, correct, images] of one batch as float64 on its device (no host sync)."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x)
    return torch.stack([F.cross_entropy(out.float(), y, reduction="sum").double(),
                        (out.argmax(1) == y).sum().double(), (y >= 0).sum().double()])


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype; fp32: none


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on a GPU with native bf16 (compute capability 8.0+: Ampere and newer;
    older GPUs only emulate it, slower than fp32), else fp32. Trainer agrees it across ranks."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    return "fp32"


def set_math(deterministic: bool, device: torch.device) -> None:
    """The process-wide kernel choices of a run: deterministic kernels, or on CUDA cuDNN's autotuner
    and TF32 matmuls/convolutions. The trainer and evaluate share them, so a score matches."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
