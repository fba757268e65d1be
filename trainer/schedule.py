"""Learning-rate schedules per optimizer step, as torch.optim.lr_scheduler, with linear warmup.

Every parameter group's lr follows the schedule from its own configured lr (as torch applies a
scheduler to each group's initial lr); reduce-on-plateau learns from `observe(metric)`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trainer.config import ConfigError
from trainer.errors import TrainerError


class Schedule:
    """Learning rates per group for each step (0-based) of a run of `total_steps` steps.

    With warmup_steps W, step s < W runs at lr * (s + 1) / W and the schedule proper starts at
    step W as its step 0 (torch: SequentialLR of LinearLR(1/W, 1, W - 1) and the scheduler).
    """

    def __init__(self, cfg, base_lrs: Sequence[float], total_steps: int, optimizer=None):
        self.cfg, self.type = cfg, cfg.type
        self.base_lrs = [float(b) for b in base_lrs]
        self.total_steps = int(total_steps)
        self.optimizer = optimizer
        self.warmup = 0 if self.type == "onecycle" else int(getattr(cfg, "warmup_steps", 0))
        self.span = max(self.total_steps - self.warmup, 1)  # steps after warmup
        self.metric: str | None = cfg.metric if self.type == "plateau" else None
        if self.type == "multistep":
            self.milestones = sorted(cfg.milestones)
        if self.type == "plateau":
            self.current = list(self.base_lrs)
            self.mode = cfg.mode if cfg.mode != "auto" else \
                "max" if "accuracy" in cfg.metric else "min"
            self.best = math.inf if self.mode == "min" else -math.inf
            self.num_bad_epochs = self.cooldown_counter = self.epochs = 0
        if self.type == "onecycle":
            self._init_onecycle()

    # -- learning rates ------------------------------------------------------------------------
    def lrs(self, step: int) -> list[float]:
        """Every group's lr for optimizer step `step`; one-cycle also sets the optimizer's
        momentum (beta1) for that step, as torch's OneCycleLR does."""
        if self.type == "onecycle":
            lrs, momentum = self._onecycle(step)
            if momentum is not None and self.optimizer is not None:
                self.optimizer.set_momentum(momentum)
            return lrs
        bases = self.current if self.type == "plateau" else self.base_lrs
        if step < self.warmup:
            return [b * (step + 1) / self.warmup for b in bases]
        return [self._grown(b, step - self.warmup) for b in bases]

    def _grown(self, b: float, t: int) -> float:
        """_main, where a growing schedule (gamma above 1, as an lr range test's) past float64's
        range gives inf, as torch's repeated products do, for the step's divergence to be
        named, not an OverflowError."""
        try:
            return self._main(b, t)
        except OverflowError:
            return math.inf

    def _main(self, b: float, t: int) -> float:
        c, kind = self.cfg, self.type
        if kind in ("constant", "plateau"):
            return b
        if kind == "step":
            return b * c.gamma ** (t // c.step_size)
        if kind == "multistep":
            return b * c.gamma ** bisect.bisect_right(self.milestones, t)
        if kind == "exponential":
            return b * c.gamma ** t
        if kind == "linear":
            n = c.total_iters or self.span
            start = b * c.start_factor
            # without end_factor: a decay to min_lr, or, from a start_factor below 1 and no
            # min_lr (torch's warm-up form), up to torch's default end_factor, 1
            end = (b * c.end_factor if c.end_factor is not None
                   else b if c.start_factor < 1 and c.min_lr is None else c.min_lr or 0.0)
            return start + (end - start) * (min(t, n) / n)
        if kind == "cosine":
            n = self.span
            low = c.min_lr or 0.0
            return low + (b - low) * (1 + math.cos(math.pi * min(t, n) / n)) / 2
        if kind == "cosine_restarts":
            cur, period = t, c.T_0
            if c.T_mult == 1:
                cur %= period
            else:
                while cur >= period:
                    cur, period = cur - period, period * c.T_mult
            low = c.min_lr or 0.0
            return low + (b - low) * (1 + math.cos(math.pi * cur / period)) / 2
        if kind == "polynomial":
            n = c.total_iters or self.span
            return b * (1.0 - min(t, n) / n) ** c.power
        raise ValueError(f"unknown schedule type '{kind}'")

    # -- one-cycle (torch.optim.lr_scheduler.OneCycleLR) ---------------------------------------
    def _init_onecycle(self) -> None:
        c, total = self.cfg, self.total_steps
        if c.cycle_momentum and self.optimizer is not None:  # torch sets it on construction
            self.optimizer.set_momentum(c.max_momentum)
        self.max_lrs = [c.max_lr if c.max_lr is not None else b for b in self.base_lrs]
        if c.three_phase:
            self.phases = [(float(c.pct_start * total) - 1, "initial", "max", "max_m", "base_m"),
                           (float(2 * c.pct_start * total) - 2, "max", "initial", "base_m",
                            "max_m"),
                           (total - 1, "initial", "min", "max_m", "max_m")]
        else:
            self.phases = [(float(c.pct_start * total) - 1, "initial", "max", "max_m", "base_m"),
                           (total - 1, "max", "min", "base_m", "max_m")]

    def _onecycle(self, step: int) -> tuple[list[float], float | None]:
        c = self.cfg
        anneal = _anneal_cos if c.anneal_strategy == "cos" else _anneal_linear
        lrs, momentum = [], None
        for max_lr in self.max_lrs:
            initial = max_lr / c.div_factor
            v = {"initial": initial, "max": max_lr, "min": initial / c.final_div_factor,
                 "max_m": c.max_momentum, "base_m": c.base_momentum}
            start = 0.0
            for i, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
                if step <= end or i == len(self.phases) - 1:
                    pct = (step - start) / (end - start) if end != start else 1.0
                    lrs.append(anneal(v[lr0], v[lr1], pct))
                    if c.cycle_momentum:
                        momentum = anneal(v[m0], v[m1], pct)
                    break
                start = end
        return lrs, momentum

    # -- reduce on plateau (torch.optim.lr_scheduler.ReduceLROnPlateau) ------------------------
    def observe(self, value: float) -> None:
        """Record one evaluation of the monitored metric (cfg.metric); for reduce-on-plateau
        this may lower every group's lr. Other schedules ignore it."""
        if self.type != "plateau":
            return
        c, current = self.cfg, float(value)
        self.epochs += 1
        if self._better(current):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > c.patience:
            for i, old in enumerate(self.current):
                new = max(old * c.factor, c.min_lr or 0.0)
                if old - new > 1e-8:  # torch's eps: smaller changes are ignored
                    self.current[i] = new
            self.cooldown_counter, self.num_bad_epochs = c.cooldown, 0

    def _better(self, a: float) -> bool:
        c, best = self.cfg, self.best
        if self.mode == "min":
            return a < best * (1.0 - c.threshold) if c.threshold_mode == "rel" else \
                a < best - c.threshold
        return a > best * (c.threshold + 1.0) if c.threshold_mode == "rel" else \
            a > best + c.threshold

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resumed run needs beyond the step number (only reduce-on-plateau has any)."""
        if self.type != "plateau":
            return {}
        return {"lrs": np.array(self.current, np.float64), "best": np.array(self.best),
                "num_bad_epochs": np.array(self.num_bad_epochs),
                "cooldown_counter": np.array(self.cooldown_counter),
                "epochs": np.array(self.epochs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.type != "plateau" or not state:
            return
        lrs = [float(x) for x in np.asarray(state["lrs"]).reshape(-1)]
        if len(lrs) != len(self.current):
            raise TrainerError(f"the checkpoint's plateau schedule has {len(lrs)} parameter "
                               f"group(s), this config {len(self.current)}; resume with the "
                               "same optimizer.groups")
        self.current = lrs
        self.best = float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.epochs = int(state["epochs"])


def _anneal_cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


def make_schedule(cfg, optimizer, total_steps: int) -> Schedule:
    """The schedule of a ScheduleConfig over the optimizer's parameter groups."""
    if cfg.type == "onecycle" and cfg.cycle_momentum and optimizer.momentum_key is None:
        raise ConfigError("config key 'schedule.cycle_momentum' needs an optimizer with a "
                          f"momentum or betas setting, and {type(optimizer).__name__} has "
                          "neither; set schedule.cycle_momentum: false")
    return Schedule(cfg, optimizer.base_lrs, total_steps, optimizer)


def lr_at(cfg, base_lr: float, step: int, total_steps: int) -> float:
    """The lr of step `step` for one group starting at base_lr (no optimizer, no plateau)."""
    return Schedule(cfg, [base_lr], total_steps).lrs(step)[0]
