"""Optimizers and schedules against torch.optim / torch's clip_grad_norm_, in float64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.optim import SGD, Adam, clip_grad_norm_
from trainer.schedule import lr_at

CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.01)),
    ("adamw", dict(lr=3e-3, betas=(0.85, 0.99), weight_decay=0.5)),
]


@pytest.mark.parametrize("kind,kw", CASES)
def test_matches_torch(kind, kw):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=50)
    grads = [rng.normal(size=50) for _ in range(7)]
    lrs = [kw["lr"] * f for f in (1, 1, 0.5, 0.5, 0.25, 1, 2)]
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW}[kind]([tp], **kw)
    p = p0.copy()
    if kind == "sgd":
        opt = SGD(np, p.size, p.dtype, **kw)
    else:
        opt = Adam(np, p.size, p.dtype, decoupled=kind == "adamw", **kw)
    for g, lr in zip(grads, lrs, strict=True):
        for group in topt.param_groups:
            group["lr"] = lr
        tp.grad = torch.tensor(g)
        topt.step()
        opt.step(p, g.copy(), lr)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_state_round_trip():
    p = np.ones(4)
    a = Adam(np, 4, p.dtype, lr=0.1)
    a.step(p, np.arange(4.0), 0.1)
    b = Adam(np, 4, p.dtype, lr=0.1)
    b.load_state_dict(a.state_dict())
    q = p.copy()
    a.step(p, np.ones(4), 0.1)
    b.step(q, np.ones(4), 0.1)
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_matches_torch(max_norm):
    g = np.random.default_rng(1).normal(size=30)
    t = torch.tensor(g.copy(), requires_grad=True)
    t.grad = torch.tensor(g.copy())
    torch.nn.utils.clip_grad_norm_([t], max_norm)
    ours = g.copy()
    norm = clip_grad_norm_(np, ours, max_norm)
    assert norm == pytest.approx(np.linalg.norm(g))
    np.testing.assert_allclose(ours, t.grad.numpy(), rtol=1e-12)


def sched(**kw):
    base = dict(type="constant", warmup_steps=0, min_lr=0.0, step_size=None, gamma=0.1)
    return SimpleNamespace(**{**base, **kw})


def test_schedules():
    assert [lr_at(sched(), 1.0, s, 10) for s in (0, 9)] == [1.0, 1.0]
    assert [lr_at(sched(warmup_steps=4), 1.0, s, 10) for s in range(5)] == \
        [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(sched(type="linear"), 1.0, 5, 10) == pytest.approx(0.5)
    assert lr_at(sched(type="linear", min_lr=0.1), 1.0, 10, 10) == pytest.approx(0.1)
    assert lr_at(sched(type="cosine"), 2.0, 5, 10) == pytest.approx(1.0)
    assert lr_at(sched(type="cosine"), 2.0, 0, 10) == pytest.approx(2.0)
    assert [lr_at(sched(type="step", step_size=3, gamma=0.5), 1.0, s, 10)
            for s in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]
    # torch's CosineAnnealingLR over the same horizon
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for s in range(20):
        assert lr_at(sched(type="cosine"), 0.3, s, 20) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        cos.step()
    assert math.isclose(lr_at(sched(type="cosine"), 0.3, 20, 20), 0.0, abs_tol=1e-15)
