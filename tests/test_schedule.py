"""Learning-rate schedules against torch.optim.lr_scheduler: per-group lr sequences (warmup as
SequentialLR with LinearLR), one-cycle momentum, reduce-on-plateau, and 20-step trainings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler as L

from tests.test_optim import Oracle, batches, config, flat, layout, make_net, torch_groups
from trainer.config import ConfigError, config_from_dict
from trainer.optim import make_optimizer
from trainer.schedule import Schedule, lr_at, make_schedule

N = 20
BASES = (0.1, 0.03)


@pytest.fixture(autouse=True)
def float64_torch():
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def schedule_cfg(sched: dict, opt: dict | None = None):
    raw = {"model": "m.onnx", "steps": N, "schedule": sched,
           "optimizer": opt or {"type": "sgd", "lr": BASES[0]},
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"y": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"y": "y"}}},
           "loss": {"type": "mse", "output": "out", "target": "y"}}
    if sched.get("metric") == "eval_accuracy":  # only classification reports accuracy
        raw["loss"]["type"] = "cross_entropy"
    return config_from_dict(raw, "/tmp")


def torch_optimizer(kind=torch.optim.SGD, **kw):
    params = [torch.zeros(1, requires_grad=True) for _ in BASES]
    return kind([{"params": [p], "lr": b} for p, b in zip(params, BASES, strict=True)], **kw)


def torch_lrs(opt, sched, steps: int = N) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def with_warmup(opt, main_fn, warm: int):
    """torch's spelling of our warmup: LinearLR from 1/W to 1 over W steps, then the schedule."""
    first = L.LinearLR(opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1)
    return L.SequentialLR(opt, [first, main_fn(opt)], milestones=[warm])


def ours(sched: dict, steps: int = N) -> list[list[float]]:
    s = Schedule(schedule_cfg(sched).schedule, BASES, N)
    return [s.lrs(k) for k in range(steps)]


def span(warm: int) -> int:
    return N - warm


# (our config, torch scheduler from (optimizer, warmup steps))
CASES = [
    ({"type": "constant"}, lambda o, w: L.LambdaLR(o, lambda t: 1.0)),
    ({"type": "step", "step_size": 4, "gamma": 0.5}, lambda o, w: L.StepLR(o, 4, 0.5)),
    ({"type": "multistep", "milestones": [7, 3, 12, 7], "gamma": 0.3},
     lambda o, w: L.MultiStepLR(o, [3, 7, 7, 12], 0.3)),
    ({"type": "exponential", "gamma": 0.9}, lambda o, w: L.ExponentialLR(o, 0.9)),
    ({"type": "linear"}, lambda o, w: L.LinearLR(o, 1.0, 0.0, total_iters=span(w))),
    ({"type": "linear", "start_factor": 0.5, "end_factor": 0.2, "total_iters": 10},
     lambda o, w: L.LinearLR(o, 0.5, 0.2, total_iters=10)),
    # torch's warm-up form: from start_factor up to its default end_factor 1.0 (it decayed to
    # min_lr 0, then trained at lr 0)
    ({"type": "linear", "start_factor": 0.5, "total_iters": 10},
     lambda o, w: L.LinearLR(o, 0.5, total_iters=10)),
    ({"type": "linear", "min_lr": 0.01},  # absolute: every group ends at min_lr
     lambda o, w: L.LambdaLR(o, [lambda t, b=b: (b + (0.01 - b) * min(t, span(w)) / span(w)) / b
                                 for b in BASES])),
    ({"type": "cosine"}, lambda o, w: L.CosineAnnealingLR(o, T_max=span(w))),
    ({"type": "cosine", "min_lr": 0.001},
     lambda o, w: L.CosineAnnealingLR(o, T_max=span(w), eta_min=0.001)),
    ({"type": "cosine_restarts", "T_0": 6, "min_lr": 0.001},
     lambda o, w: L.CosineAnnealingWarmRestarts(o, T_0=6, eta_min=0.001)),
    ({"type": "cosine_restarts", "T_0": 2, "T_mult": 2},
     lambda o, w: L.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2)),
    ({"type": "polynomial"}, lambda o, w: L.PolynomialLR(o, total_iters=span(w))),
    ({"type": "polynomial", "power": 2.5, "total_iters": 8},
     lambda o, w: L.PolynomialLR(o, total_iters=8, power=2.5)),
]


@pytest.mark.parametrize("warm", [0, 4])
@pytest.mark.parametrize("sched,make", CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_lr_sequence_matches_torch(sched, make, warm):
    opt = torch_optimizer()
    if warm:
        sched = {**sched, "warmup_steps": warm}
        theirs = torch_lrs(opt, with_warmup(opt, lambda o: make(o, warm), warm))
    else:
        theirs = torch_lrs(opt, make(opt, 0))
    got = ours(sched)
    np.testing.assert_allclose(got, theirs, rtol=1e-12, atol=1e-15)
    assert len({tuple(r) for r in got}) > (1 if sched["type"] != "constant" or warm else 0)


@pytest.mark.parametrize("kw", [
    {},
    {"max_lr": 0.5, "pct_start": 0.25, "anneal_strategy": "linear"},
    {"three_phase": True, "div_factor": 10.0, "final_div_factor": 100.0},
    {"pct_start": 0.4, "base_momentum": 0.7, "max_momentum": 0.9},
])
@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam])
def test_onecycle_lr_and_momentum_match_torch(kw, kind):
    opt = torch_optimizer(kind)
    max_lr = kw.get("max_lr", list(BASES))  # ours: each group's lr unless max_lr is given
    theirs = L.OneCycleLR(opt, max_lr=max_lr, total_steps=N,
                          **{k: v for k, v in kw.items() if k != "max_lr"})
    name = "sgd" if kind is torch.optim.SGD else "adam"
    cfg = schedule_cfg({"type": "onecycle", **kw}, {"type": name, "lr": BASES[0], "groups": [
        {"params": "b", "lr": BASES[1]}]})
    mine = make_optimizer(cfg.optimizer, np, 2, np.float64, [("a", 0, 1), ("b", 1, 1)])
    sched = make_schedule(cfg.schedule, mine, N)
    key = "momentum" if name == "sgd" else "betas"
    for k in range(N):
        lrs = sched.lrs(k)
        np.testing.assert_allclose(lrs, [g["lr"] for g in opt.param_groups], rtol=1e-12)
        for a, b in zip(mine.groups, opt.param_groups, strict=True):
            assert a[key] == pytest.approx(b[key], rel=1e-12)
        opt.step()
        theirs.step()


PLATEAU = [
    ({}, [1.0, 0.9, 0.95, 0.95, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]),
    ({"patience": 1, "factor": 0.5, "cooldown": 2, "min_lr": 0.01},
     [5, 4, 4, 4, 4, 4, 3.9999, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]),
    ({"mode": "max", "metric": "eval_accuracy", "patience": 0, "threshold": 0.05,
      "threshold_mode": "abs"}, [0.5, 0.6, 0.62, 0.7, 0.7, 0.9, 0.8, 0.95]),
    ({"patience": 2, "threshold": 0.1}, [10, 9.5, 9.2, 9.0, 8.9, 8.0, 7.99, 7.98, 7.97, 7.0]),
    ({"mode": "max", "patience": 1, "factor": 0.2}, [1, 2, float("nan"), 2, 2, 3, 3, 3, 3]),
    # mode auto (the default): max for an accuracy, as best.mode and early_stop.mode (torch's
    # default is min: every rise of the accuracy counted as a bad evaluation)
    ({"mode": "auto", "metric": "eval_accuracy", "patience": 1},
     [0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75, 0.8]),
]


@pytest.mark.parametrize("kw,metrics", PLATEAU)
def test_plateau_matches_torch(kw, metrics):
    opt = torch_optimizer()
    mode = kw.get("mode", "auto")
    mode = mode if mode != "auto" else "max" if "accuracy" in kw.get("metric", "") else "min"
    theirs = L.ReduceLROnPlateau(opt, mode=mode,
                                 **{k: v for k, v in kw.items() if k not in ("metric", "mode")})
    s = Schedule(schedule_cfg({"type": "plateau", **kw}).schedule, BASES, N)
    assert s.metric == kw.get("metric", "eval_loss")
    for step, value in enumerate(metrics):
        assert s.lrs(step) == [g["lr"] for g in opt.param_groups]
        s.observe(value)
        theirs.step(value)
    assert s.current == [g["lr"] for g in opt.param_groups] and s.current != list(BASES)


def test_plateau_with_warmup_and_state_round_trip():
    cfg = schedule_cfg({"type": "plateau", "warmup_steps": 4, "patience": 0}).schedule
    s = Schedule(cfg, BASES, N)
    assert s.lrs(1) == [b * 2 / 4 for b in BASES] and s.lrs(4) == list(BASES)
    for v in (3.0, 3.0):
        s.observe(v)
    assert s.lrs(1) == pytest.approx([b * 0.1 * 2 / 4 for b in BASES])
    assert s.lrs(9) == pytest.approx([b * 0.1 for b in BASES])
    t = Schedule(cfg, BASES, N)
    t.load_state_dict({k: np.array(v) for k, v in s.state_dict().items()})
    for v in (3.0, 2.0, 2.0):
        s.observe(v)
        t.observe(v)
        assert s.lrs(10) == t.lrs(10)
    assert s.lrs(10) == pytest.approx([b * 1e-3 for b in BASES])
    assert Schedule(schedule_cfg({"type": "cosine"}).schedule, BASES, N).state_dict() == {}


def test_other_schedules_ignore_observe_and_have_no_metric():
    s = Schedule(schedule_cfg({"type": "step", "step_size": 2}).schedule, BASES, N)
    s.observe(1.0)
    assert s.metric is None and s.lrs(2) == pytest.approx([b * 0.1 for b in BASES])


@pytest.mark.parametrize("kw", [{"type": "exponential", "gamma": 1.5},
                                {"type": "step", "gamma": 1e10, "step_size": 1}])
def test_a_growing_schedule_past_float64_gives_inf(kw):
    """gamma above 1 (an lr range test) past float64's range: lr inf, as torch's repeated
    products give (the step's divergence is then named), not an OverflowError mid-run."""
    s = Schedule(schedule_cfg(kw).schedule, [1e-300], 5000)
    assert 0 < s.lrs(10)[0] < math.inf and s.lrs(4000) == [math.inf]


def test_known_values_and_lr_at():
    c = schedule_cfg({"type": "constant", "warmup_steps": 4}).schedule
    assert [lr_at(c, 1.0, k, 10) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    c = schedule_cfg({"type": "cosine"}).schedule
    assert lr_at(c, 2.0, 5, 10) == pytest.approx(1.0) and lr_at(c, 2.0, 0, 10) == 2.0
    assert math.isclose(lr_at(c, 0.3, 20, 20), 0.0, abs_tol=1e-15)  # clamped past the end
    c = schedule_cfg({"type": "linear", "min_lr": 0.1}).schedule
    assert lr_at(c, 1.0, 10, 10) == pytest.approx(0.1)
    # from a start_factor below 1: without min_lr up to the lr (LinearLR's warm-up); with an
    # explicit min_lr, 0 included, down to it (0 was taken for "not given"; found by an
    # optimizer sweep)
    c = schedule_cfg({"type": "linear", "start_factor": 0.5}).schedule
    assert [lr_at(c, 0.1, k, 10) for k in (0, 5, 10)] == pytest.approx([0.05, 0.075, 0.1])
    c = schedule_cfg({"type": "linear", "start_factor": 0.5, "min_lr": 0}).schedule
    assert [lr_at(c, 0.1, k, 10) for k in (0, 5, 10)] == pytest.approx([0.05, 0.025, 0.0])


# -- 20 training steps with groups: weights against torch --------------------------------------


def train_both(opt: dict, sched: dict, make_torch, observe_every: int = 0):
    net = make_net()
    kw = {k: tuple(v) if k == "betas" else v for k, v in opt.items()
          if k not in ("type", "groups")}
    topt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW,
            "adam": torch.optim.Adam}[opt["type"]](torch_groups(net, opt["groups"]),
                                                   foreach=False, **kw)
    tsched = make_torch(topt)
    cfg = schedule_cfg(sched, opt)
    p = flat(net)
    mine = make_optimizer(cfg.optimizer, np, p.size, p.dtype, layout(net))
    s = make_schedule(cfg.schedule, mine, N)
    grad = Oracle()
    for k, (x, y) in enumerate(batches()):
        lrs = s.lrs(k)
        assert lrs == pytest.approx([g["lr"] for g in topt.param_groups], rel=1e-12)
        mine.step(p, grad(p, x, y), lrs)
        topt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        topt.step()
        if observe_every and (k + 1) % observe_every == 0:
            metric = round(loss.item(), 1)  # coarse, so that plateaus happen
            s.observe(metric)
            tsched.step(metric)
        elif not observe_every:
            tsched.step()
    np.testing.assert_allclose(p, flat(net), rtol=1e-9, atol=1e-12)
    return s


GROUPS = [{"params": "*.bias", "weight_decay": 0.0, "lr": 0.05}, {"params": "ln.*", "lr": 0.01}]


def test_training_sgd_onecycle_cycles_momentum_like_torch():
    opt = {"type": "sgd", "lr": 0.1, "weight_decay": 1e-3, "groups": GROUPS}
    train_both(opt, {"type": "onecycle", "pct_start": 0.25},
               lambda o: L.OneCycleLR(o, max_lr=[0.1, 0.05, 0.01], total_steps=N,
                                      pct_start=0.25))


def test_training_adamw_cosine_warmup_like_torch():
    opt = {"type": "adamw", "lr": 1e-2, "weight_decay": 0.1, "groups": GROUPS}
    train_both(opt, {"type": "cosine", "warmup_steps": 5, "min_lr": 1e-3},
               lambda o: with_warmup(o, lambda q: L.CosineAnnealingLR(q, 15, 1e-3), 5))


def test_training_adam_plateau_like_torch():
    opt = {"type": "adam", "lr": 3e-2, "groups": GROUPS}
    s = train_both(opt, {"type": "plateau", "patience": 0, "factor": 0.5},
                   lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5), observe_every=2)
    assert s.current != [3e-2, 0.05, 0.01]  # it did reduce


# -- config -----------------------------------------------------------------------------------


def error(sched: dict, opt: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        schedule_cfg(sched, opt)
    return str(info.value)


@pytest.mark.parametrize("sched,message", [
    ({"type": "cosin"}, "config key 'schedule.type' must be one of constant, step, multistep, "
     "exponential, linear, cosine, cosine_restarts, polynomial, onecycle, plateau; got 'cosin'; "
     "did you mean 'cosine'?"),
    ({"type": "multistep"}, "config key 'schedule.milestones' is required for schedule type "
     "'multistep'"),
    ({"type": "multistep", "milestones": 3}, "config key 'schedule.milestones' must be a "
     "non-empty list of step numbers, got int 3"),
    ({"type": "multistep", "milestones": [2, 0]}, "config key 'schedule.milestones[1]' must be "
     ">= 1, got 0"),
    ({"type": "exponential"}, "config key 'schedule.gamma' is required for schedule type "
     "'exponential'"),
    ({"type": "cosine_restarts"}, "config key 'schedule.T_0' is required for schedule type "
     "'cosine_restarts'"),
    ({"type": "cosine_restarts", "T_0": 3, "T_mult": 0}, "config key 'schedule.T_mult' must be "
     ">= 1, got 0"),
    ({"type": "onecycle", "warmup_steps": 3}, "config key 'schedule.warmup_steps' is not valid "
     "for schedule type 'onecycle'"),
    ({"type": "onecycle", "pct_start": 1.5}, "config key 'schedule.pct_start' must be in [0, 1]"),
    ({"type": "onecycle", "anneal_strategy": "cosine"}, "config key 'schedule.anneal_strategy' "
     "must be one of cos, linear; got 'cosine'; did you mean 'cos'?"),
    ({"type": "plateau", "factor": 1.0}, "config key 'schedule.factor' must be between 0 and 1 "
     "(exclusive), got 1.0"),
    ({"type": "plateau", "mode": "minimum"}, "config key 'schedule.mode' must be one of auto, "
     "min, max"),
    ({"type": "plateau", "metric": "loss"}, "config key 'schedule.metric' must be one of "
     "eval_loss, eval_accuracy"),
    ({"type": "plateau", "patience": -1}, "config key 'schedule.patience' must be >= 0"),
    ({"type": "linear", "start_factor": 0}, "config key 'schedule.start_factor' must be in "
     "(0, 1]"),
    ({"type": "linear", "end_factor": 0.5, "min_lr": 0.01}, "config keys 'schedule.end_factor' "
     "and 'schedule.min_lr': give at most one of them"),
    ({"type": "linear", "end_factor": 0.5, "min_lr": 0}, "config keys 'schedule.end_factor' "
     "and 'schedule.min_lr': give at most one of them"),
    ({"type": "step", "step_size": 2, "min_lr": 0.1}, "config key 'schedule.min_lr' is not valid "
     "for schedule type 'step'"),
    ({"type": "polynomial", "power": 0}, "config key 'schedule.power' must be > 0"),
])
def test_config_errors_name_the_key(sched, message):
    assert error(sched).startswith(message)


def test_cycle_momentum_needs_momentum():
    cfg = schedule_cfg({"type": "onecycle"}, {"type": "adagrad"})
    opt = make_optimizer(cfg.optimizer, np, 3, np.float64)
    with pytest.raises(ConfigError, match="'schedule.cycle_momentum' needs an optimizer with a "
                       "momentum or betas setting"):
        make_schedule(cfg.schedule, opt, N)
    cfg = schedule_cfg({"type": "onecycle", "cycle_momentum": False}, {"type": "adagrad"})
    assert make_schedule(cfg.schedule, opt, N).lrs(0) == pytest.approx([1e-2 / 25], rel=1e-12)


def test_defaults_are_torchs():
    c = schedule_cfg({"type": "onecycle"}).schedule
    assert (c.pct_start, c.anneal_strategy, c.div_factor, c.final_div_factor, c.three_phase,
            c.cycle_momentum, c.base_momentum, c.max_momentum) == (
        0.3, "cos", 25.0, 1e4, False, True, 0.85, 0.95)
    c = schedule_cfg({"type": "plateau"}).schedule
    assert (c.mode, c.factor, c.patience, c.threshold, c.threshold_mode, c.cooldown,
            c.min_lr) == ("auto", 0.1, 10, 1e-4, "rel", 0, None)  # (None: 0, not given)
    c = schedule_cfg({"type": "cosine_restarts", "T_0": 3}).schedule
    assert c.T_mult == 1 and schedule_cfg({"type": "polynomial"}).schedule.power == 1.0
    assert config({"type": "sgd"}).optimizer.groups == ()
