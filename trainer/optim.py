"""Optimizers over flat parameter buffers, with torch.optim's exact update rules.

Each optimizer updates one contiguous parameter buffer in place from the matching gradient
buffer, so a step is a handful of vectorized operations whatever the number of tensors.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.errors import TrainerError


class SGD:
    """torch.optim.SGD: weight decay, momentum with dampening, Nesterov."""

    def __init__(self, xp, size: int, dtype, *, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        self.xp, self.lr = xp, lr
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.weight_decay = weight_decay
        self.buf = xp.zeros(size, dtype) if momentum else None
        self.steps = 0

    def step(self, p, g, lr: float) -> None:
        d = g + self.weight_decay * p if self.weight_decay else g
        if self.momentum:
            if self.steps == 0:
                self.buf[...] = d
            else:
                self.buf *= self.momentum
                self.buf += (1.0 - self.dampening) * d
            d = d + self.momentum * self.buf if self.nesterov else self.buf
        p -= lr * d
        self.steps += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"steps": np.array(self.steps)}
        if self.buf is not None:
            out["momentum_buffer"] = self.buf
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if self.buf is not None:
            self.buf[...] = self.xp.asarray(state["momentum_buffer"])


class Adam:
    """torch.optim.Adam / AdamW (decoupled=True), without amsgrad."""

    def __init__(self, xp, size: int, dtype, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        self.xp, self.lr, self.eps = xp, lr, eps
        self.b1, self.b2 = betas
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.m = xp.zeros(size, dtype)
        self.v = xp.zeros(size, dtype)
        self.steps = 0

    def step(self, p, g, lr: float) -> None:
        xp = self.xp
        self.steps += 1
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        self.m += (1.0 - self.b1) * (g - self.m)
        self.v *= self.b2
        self.v += (1.0 - self.b2) * g * g
        bc1 = 1.0 - self.b1 ** self.steps
        bc2_sqrt = math.sqrt(1.0 - self.b2 ** self.steps)
        denom = xp.sqrt(self.v) / bc2_sqrt + self.eps
        p -= (lr / bc1) * (self.m / denom)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"steps": np.array(self.steps), "exp_avg": self.m, "exp_avg_sq": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.m[...] = self.xp.asarray(state["exp_avg"])
        self.v[...] = self.xp.asarray(state["exp_avg_sq"])


def make_optimizer(cfg, xp, size: int, dtype):
    """An optimizer from an OptimizerConfig (type sgd | adam | adamw)."""
    if cfg.type == "sgd":
        return SGD(xp, size, dtype, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.type in ("adam", "adamw"):
        return Adam(xp, size, dtype, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                    weight_decay=cfg.weight_decay, decoupled=cfg.type == "adamw")
    raise TrainerError(f"unknown optimizer type '{cfg.type}'")


def clip_grad_norm_(xp, g, max_norm: float) -> float:
    """Scale g in place so its 2-norm is at most max_norm (torch.nn.utils.clip_grad_norm_)."""
    total = float(xp.sqrt((g * g).sum()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        g *= coef
    return total
