"""Learning-rate schedules as a pure function of the global optimizer step.

A pure function of the step makes resume trivial (the step is in the checkpoint) and lets
`LambdaLR` carry it. Warmup is linear from ~0 to the peak over `warmup_epochs`.
"""
from __future__ import annotations

import math

from .config import ScheduleConfig


def lr_factor(step: int, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    total = max(1, steps_per_epoch * epochs)
    if cfg.name == "onecycle":  # its linear rise is the warmup; warmup_epochs is not used
        peak = max(1, round(cfg.pct_start * total))
        if step < peak:
            return (step + 1) / peak
        t = (step - peak) / max(1, total - peak)
        return 1.0 - (1.0 - cfg.final_lr_ratio) * min(1.0, t)
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.name == "paper":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "inverse_time":  # Keras' legacy SGD: lr * 1 / (1 + decay * updates so far)
        return 1.0 / (1.0 + cfg.decay * step)
    if cfg.name == "cosine":
        t = (step - warm) / max(1, total - warm)
        return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"unknown schedule {cfg.name!r}")
