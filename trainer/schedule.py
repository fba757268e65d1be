"""Learning-rate schedules: constant, linear, cosine, step; all with linear warmup."""

from __future__ import annotations

import math


def lr_at(cfg, base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return base_lr * (step + 1) / warm
    if cfg.type == "constant":
        return base_lr
    if cfg.type == "step":
        return base_lr * cfg.gamma ** ((step - warm) // cfg.step_size)
    span = max(total_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    if cfg.type == "linear":
        return base_lr + (cfg.min_lr - base_lr) * progress
    if cfg.type == "cosine":
        return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule type '{cfg.type}'")
