"""Optimizers and parameter groups against torch.optim (LAMB against the paper), in float64.

Each case trains a small torch model for 20 steps with torch.optim while our optimizer updates a
flat buffer from gradients torch computes at our weights; the final weights must agree.
"""

from __future__ import annotations

import fnmatch
import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from trainer.config import ConfigError, config_from_dict
from trainer.optim import SGD, Adam, clip_grad_norm_, make_optimizer
from trainer.train import Trainer

STEPS = 20
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
         "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad,
         "adadelta": torch.optim.Adadelta, "nadam": torch.optim.NAdam,
         "radam": torch.optim.RAdam}


@pytest.fixture(autouse=True)
def float64_torch():
    # torch keeps scalar optimizer state (steps, NAdam's mu product) in the default dtype;
    # one thread: these tiny models are far slower with threads on a shared CPU.
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.ln = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # LayerNorm away from its 1/0 init so its tensors matter
        net.ln.weight.add_(0.3 * torch.randn(7))
        net.ln.bias.add_(0.3 * torch.randn(7))
    return net


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def flat(net: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])


def layout(net: nn.Module):
    out, o = [], 0
    for name, p in net.named_parameters():
        out.append((name, o, p.numel()))
        o += p.numel()
    return out


class Oracle:
    """Gradients of the MSE loss at a flat weight vector, computed by torch."""

    def __init__(self):
        self.net = make_net()

    def __call__(self, p: np.ndarray, x, y) -> np.ndarray:
        with torch.no_grad():
            for (_, o, n), q in zip(layout(self.net), self.net.parameters(), strict=True):
                q.copy_(torch.from_numpy(p[o:o + n].copy()).view_as(q))
        self.net.zero_grad()
        F.mse_loss(self.net(x), y).backward()
        return np.concatenate([q.grad.numpy().ravel() for q in self.net.parameters()])


def torch_groups(net: nn.Module, groups: list[dict]) -> list[dict]:
    """param_groups for torch: the first group whose globs match a name takes it; the rest
    form a first group with the top-level settings (as our optimizer orders them)."""
    named = list(net.named_parameters())
    taken, out = set(), []
    for g in groups:
        globs = [g["params"]] if isinstance(g["params"], str) else g["params"]
        mine = [q for n, q in named if n not in taken and any(fnmatch.fnmatch(n, p) for p in globs)]
        taken |= {n for n, _ in named if any(fnmatch.fnmatch(n, p) for p in globs)}
        extra = {k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"}
        out.append({"params": mine, **extra})
    return [{"params": [q for n, q in named if n not in taken]}] + out


def config(opt: dict):
    raw = {"model": "m.onnx", "steps": 1,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"y": "y"}}},
           "loss": {"type": "mse", "output": "out", "target": "y"}, "optimizer": opt}
    return config_from_dict(raw, "/tmp")


def run_ours(opt: dict, lr_of_step=None) -> np.ndarray:
    net = make_net()
    p = flat(net)
    ours = make_optimizer(config(opt).optimizer, np, p.size, p.dtype, layout(net))
    grad = Oracle()
    for s, (x, y) in enumerate(batches()):
        ours.step(p, grad(p, x, y), lr_of_step(s) if lr_of_step else ours.base_lrs)
    return p


def run_torch(opt: dict) -> np.ndarray:
    net = make_net()
    kw = {k: tuple(v) if k == "betas" else v for k, v in opt.items()
          if k not in ("type", "groups")}
    params = torch_groups(net, opt.get("groups", [])) if opt.get("groups") else net.parameters()
    topt = TORCH[opt["type"]](params, foreach=False, **kw)
    for x, y in batches():
        topt.zero_grad()
        F.mse_loss(net(x), y).backward()
        topt.step()
    return flat(net)


BIAS_LN = [{"params": "*.bias", "weight_decay": 0.0}, {"params": ["ln.*"], "lr": 0.02}]
CASES = [
    {"type": "sgd", "lr": 0.1},
    {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"type": "sgd", "lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-3},
    {"type": "sgd", "lr": 0.05, "momentum": 0.5, "maximize": True},
    {"type": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 1e-2,
     "groups": [{"params": "*.bias", "weight_decay": 0.0, "momentum": 0.0},
                {"params": "ln.*", "lr": 0.2, "dampening": 0.0}]},
    {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
     "groups": [{"params": "*.bias", "momentum": 0.0}]},
    {"type": "adam", "lr": 1e-2},
    {"type": "adam", "lr": 1e-2, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1},
    {"type": "adam", "lr": 1e-2, "amsgrad": True, "weight_decay": 0.05},
    {"type": "adam", "lr": 1e-2, "maximize": True},
    {"type": "adam", "lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"type": "adamw", "lr": 1e-2, "weight_decay": 0.01},
    {"type": "adamw", "lr": 3e-3, "betas": [0.85, 0.99], "weight_decay": 0.5, "amsgrad": True},
    {"type": "adamw", "lr": 1e-2, "weight_decay": 0.1,
     "groups": [{"params": "*.bias", "weight_decay": 0.0},
                {"params": ["ln.*", "fc2.weight"], "lr": 3e-2, "betas": [0.5, 0.9],
                 "eps": 1e-4}]},
    {"type": "rmsprop", "lr": 1e-2},
    {"type": "rmsprop", "lr": 1e-2, "alpha": 0.9, "centered": True},
    {"type": "rmsprop", "lr": 5e-3, "momentum": 0.9, "weight_decay": 0.01},
    {"type": "rmsprop", "lr": 5e-3, "momentum": 0.5, "centered": True, "maximize": True,
     "groups": [{"params": "*.bias", "momentum": 0.0, "alpha": 0.8}] + BIAS_LN[1:]},
    {"type": "adagrad", "lr": 0.1},
    {"type": "adagrad", "lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.3,
     "weight_decay": 0.01, "eps": 1e-8},
    {"type": "adagrad", "lr": 0.1, "initial_accumulator_value": 1.0,
     "groups": [{"params": "*.bias", "lr_decay": 0.1, "eps": 1e-3}]},
    {"type": "adadelta"},
    {"type": "adadelta", "lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 0.02},
    {"type": "adadelta", "groups": [{"params": "fc1.*", "rho": 0.5, "lr": 2.0}]},
    {"type": "nadam"},
    {"type": "nadam", "lr": 1e-2, "momentum_decay": 0.01, "weight_decay": 0.05},
    {"type": "nadam", "lr": 1e-2, "weight_decay": 0.05, "decoupled_weight_decay": True},
    {"type": "nadam", "lr": 1e-2, "groups": [{"params": "*.bias", "betas": [0.7, 0.9],
                                              "momentum_decay": 0.02}] + BIAS_LN[1:]},
    {"type": "radam", "lr": 1e-2},
    {"type": "radam", "lr": 1e-2, "weight_decay": 0.05},
    {"type": "radam", "lr": 1e-2, "weight_decay": 0.05, "decoupled_weight_decay": True,
     "maximize": True},
    # With beta2 0.5 a group never reaches torch's rectification threshold (rho_t > 5) while
    # the others rectify from step 6: both kinds of update in one step.
    {"type": "radam", "lr": 1e-2, "groups": [{"params": "*.bias", "betas": [0.9, 0.5]},
                                              {"params": "ln.*", "lr": 0.05}]},
]


@pytest.mark.parametrize("opt", CASES, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items() if k != "groups") + ("-groups" if "groups" in o else ""))
def test_matches_torch(opt):
    ours, theirs = run_ours(opt), run_torch(opt)
    assert np.abs(ours - flat(make_net())).max() > 1e-3  # it trained
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_defaults_are_torchs():
    for kind in TORCH:
        cfg = config({"type": kind}).optimizer
        ours = make_optimizer(cfg, np, 4, np.float64)
        theirs = TORCH[kind]([torch.zeros(1, requires_grad=True)]).defaults
        for k, v in ours.settings.items():
            want = theirs[k] if k in theirs else False
            assert v == (tuple(want) if k == "betas" else want), (kind, k)


# -- LAMB, against the paper's equations written per tensor --------------------------------


def lamb_reference(groups: list[dict], top: dict) -> np.ndarray:
    net = make_net()
    grad = Oracle()
    p = flat(net)
    names = [n for n, _, _ in layout(net)]
    sets = []  # settings of every tensor: the first matching group, else the top level
    for n in names:
        hit = next((g for g in groups if any(fnmatch.fnmatch(n, q) for q in
                    ([g["params"]] if isinstance(g["params"], str) else g["params"]))), {})
        sets.append({**top, **{k: v for k, v in hit.items() if k != "params"}})
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (x, y) in enumerate(batches(), start=1):
        g = grad(p, x, y)
        new = p.copy()
        for (_, o, n), s in zip(layout(net), sets, strict=True):
            b1, b2 = s["betas"]
            sl = slice(o, o + n)
            m[sl] = b1 * m[sl] + (1 - b1) * g[sl]
            v[sl] = b2 * v[sl] + (1 - b2) * g[sl] ** 2
            mh, vh = m[sl] / (1 - b1 ** t), v[sl] / (1 - b2 ** t)
            r = mh / (np.sqrt(vh) + s["eps"]) + s["weight_decay"] * p[sl]
            wn, rn = np.linalg.norm(p[sl]), np.linalg.norm(r)
            ratio = wn / rn if wn > 0 and rn > 0 else 1.0
            new[sl] = p[sl] - s["lr"] * ratio * r
        p = new
    return p


@pytest.mark.parametrize("top,groups", [
    ({}, []),
    ({"lr": 5e-3, "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": 0.1}, []),
    ({"lr": 5e-3}, [{"params": ["*.bias", "ln.*"], "weight_decay": 0.0},
                    {"params": "fc2.weight", "lr": 0.02, "betas": [0.5, 0.9]}]),
])
def test_lamb_matches_the_paper(top, groups):
    opt = {"type": "lamb", **top, **({"groups": groups} if groups else {})}
    settings = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, **top}
    np.testing.assert_allclose(run_ours(opt), lamb_reference(groups, settings),
                               rtol=1e-9, atol=1e-12)


def test_lamb_trust_ratio_is_per_tensor_and_one_for_zero_weights():
    # Two tensors: [3, 4] (norm 5) and [0, 0]; one step with g = p direction.
    p = np.array([3.0, 4.0, 0.0, 0.0])
    opt = make_optimizer(config({"type": "lamb", "lr": 0.1, "weight_decay": 0.0}).optimizer, np,
                         4, np.float64, [("a", 0, 2), ("b", 2, 2)])
    opt.step(p, np.array([1.0, 1.0, 2.0, -1.0]), 0.1)
    # First step: r = g / (|g| + eps) ~ sign(g); ||r_a|| = sqrt 2, trust ratio 5 / sqrt 2.
    eps = 1e-6
    r_a = np.array([1.0, 1.0]) / (1 + eps)
    np.testing.assert_allclose(p[:2], [3.0, 4.0] - 0.1 * 5 / np.linalg.norm(r_a) * r_a)
    np.testing.assert_allclose(p[2:], -0.1 * np.array([2.0, -1.0]) / (np.abs([2, -1]) + eps))


# -- steps, state, float lr, one-cycle momentum ---------------------------------------------


def test_float_lr_scales_groups_by_their_ratio():
    cfg = config({"type": "sgd", "lr": 0.1, "groups": [{"params": "b", "lr": 0.4}]}).optimizer
    opt = make_optimizer(cfg, np, 3, np.float64, [("a", 0, 2), ("b", 2, 1)])
    p = np.zeros(3)
    opt.step(p, np.ones(3), 0.05)
    np.testing.assert_allclose(p, [-0.05, -0.05, -0.2])
    opt.step(p, np.ones(3), [0.1, 0.3])
    np.testing.assert_allclose(p, [-0.15, -0.15, -0.5])
    assert opt.base_lrs == [0.1, 0.4]


@pytest.mark.parametrize("opt", [
    {"type": "sgd", "momentum": 0.9}, {"type": "adam", "amsgrad": True},
    {"type": "rmsprop", "centered": True, "momentum": 0.5}, {"type": "adagrad"},
    {"type": "adadelta"}, {"type": "nadam", "groups": BIAS_LN}, {"type": "radam"},
    {"type": "lamb", "groups": BIAS_LN}])
def test_state_round_trip_continues_exactly(opt):
    net = make_net()
    cfg, lay = config(opt).optimizer, layout(net)
    p0 = flat(net)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=p0.size) for _ in range(6)]
    a = make_optimizer(cfg, np, p0.size, p0.dtype, lay)
    pa = p0.copy()
    for g in grads[:3]:
        a.step(pa, g, a.base_lrs)
    b = make_optimizer(cfg, np, p0.size, p0.dtype, lay)
    state = {k: np.array(v, copy=True) for k, v in a.state_dict().items()}
    assert set(state) == set(b.state_dict())
    b.load_state_dict(state)
    pb = pa.copy()
    for g in grads[3:]:
        a.step(pa, g, a.base_lrs)
        b.step(pb, g, b.base_lrs)
    np.testing.assert_array_equal(pa, pb)


def test_gradient_is_not_modified():
    g = np.arange(4.0)
    for kind in ("sgd", "adam", "rmsprop", "adagrad", "adadelta", "nadam", "radam", "lamb"):
        cfg = config({"type": kind, "weight_decay": 0.1, "maximize": True}).optimizer
        make_optimizer(cfg, np, 4, np.float64).step(np.ones(4), g, 0.1)
        np.testing.assert_array_equal(g, np.arange(4.0))


def test_float32_buffers_stay_float32():
    p = np.ones(6, np.float32)
    for kind in ("sgd", "adamw", "rmsprop", "nadam", "radam", "lamb"):
        opt = make_optimizer(config({"type": kind, "groups": [{"params": "b", "lr": 0.5}]})
                             .optimizer, np, 6, np.float32, [("a", 0, 4), ("b", 4, 2)])
        opt.step(p, np.full(6, 0.5, np.float32), opt.base_lrs)
        assert p.dtype == np.float32 and all(v.dtype == np.float32 for k, v in
                                             opt.state_dict().items() if v.size == 6)


def test_old_constructor_spelling():
    p, q = np.ones(3), np.ones(3)
    SGD(np, 3, p.dtype, lr=0.1, momentum=0.9).step(p, np.ones(3), 0.1)
    Adam(np, 3, q.dtype, lr=0.1, decoupled=True, weight_decay=0.1).step(q, np.ones(3), 0.1)
    np.testing.assert_allclose(p, 0.9)
    np.testing.assert_allclose(q, 1 - 0.1 * 0.1 - 0.1 / (1 + 1e-8), rtol=1e-12)


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


# -- config validation ----------------------------------------------------------------------


def error(opt: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config(opt)
    return str(info.value)


@pytest.mark.parametrize("opt,message", [
    ({"type": "adam", "alpha": 0.9}, "config key 'optimizer.alpha' is not valid for optimizer "
     "type 'adam' (valid: lr, weight_decay, betas, eps, amsgrad, decoupled_weight_decay, "
     "maximize, groups)"),
    ({"type": "rmsprop", "alpha": 1.5}, "config key 'optimizer.alpha' must be in [0, 1], got 1.5"),
    ({"type": "adadelta", "rho": -0.1}, "config key 'optimizer.rho' must be in [0, 1]"),
    ({"type": "lamb", "betas": [0.9, 1.0]}, "config key 'optimizer.betas' must be two numbers"),
    ({"type": "nadam", "momentum_decay": -1}, "config key 'optimizer.momentum_decay' must be >= 0"),
    ({"type": "sgd", "groups": "*.bias"}, "config key 'optimizer.groups' must be a list"),
    ({"type": "sgd", "groups": ["*.bias"]}, "config key 'optimizer.groups[0]' must be a mapping"),
    ({"type": "sgd", "groups": [{"lr": 0.1}]},
     "config key 'optimizer.groups[0].params' is required"),
    ({"type": "sgd", "groups": [{"params": []}]},
     "config key 'optimizer.groups[0].params' must not be empty"),
    ({"type": "sgd", "groups": [{"params": "a"}, {"params": ["b", 3]}]},
     "config key 'optimizer.groups[1].params[1]' must be a non-empty string"),
    ({"type": "sgd", "groups": [{"params": "a", "betas": [0.9, 0.9]}]},
     "config key 'optimizer.groups[0].betas' is not valid for optimizer type 'sgd' in a group "
     "(valid: params, lr, momentum, dampening, weight_decay)"),
    ({"type": "adam", "groups": [{"params": "a", "amsgrad": True}]},
     "config key 'optimizer.groups[0].amsgrad' applies to the whole optimizer: set "
     "optimizer.amsgrad"),
    ({"type": "adagrad", "groups": [{"params": "a", "initial_accumulator_value": 1}]},
     "config key 'optimizer.groups[0].initial_accumulator_value' applies to the whole "
     "optimizer"),
    ({"type": "adam", "groups": [{"params": "a", "lrr": 1}]},
     "config key 'optimizer.groups[0].lrr' is unknown in a group; did you mean "
     "'optimizer.groups[0].lr'?"),
    ({"type": "adam", "groups": [{"params": "a", "lr": -1}]},
     "config key 'optimizer.groups[0].lr' must be >= 0, got -1.0"),
    ({"type": "adam", "groups": [{"params": "a", "betas": [0.9]}]},
     "config key 'optimizer.groups[0].betas' must be a list of two numbers"),
    ({"type": "adam", "groups": [{"params": "a", "eps": None}]},
     "config key 'optimizer.groups[0].eps' must be a value, got null"),
])
def test_config_errors_name_the_key(opt, message):
    assert error(opt).startswith(message)


def test_config_defaults_per_type():
    got = {k: config({"type": k}).optimizer for k in
           ("rmsprop", "adagrad", "adadelta", "nadam", "radam", "lamb")}
    assert [got[k].lr for k in got] == [1e-2, 1e-2, 1.0, 2e-3, 1e-3, 1e-3]
    assert [got[k].eps for k in got] == [1e-8, 1e-10, 1e-6, 1e-8, 1e-8, 1e-6]
    assert got["lamb"].weight_decay == 0.01 and got["radam"].weight_decay == 0.0
    cfg = config({"type": "adam", "groups": [{"params": "*.bias", "weight_decay": 0,
                                              "betas": [0.8, "0.9"]}]}).optimizer
    assert cfg.groups[0].params == ("*.bias",)
    assert dict(cfg.groups[0].settings) == {"weight_decay": 0.0, "betas": (0.8, 0.9)}
    hash(cfg)


def test_group_globs_must_match_and_first_match_wins():
    lay = [("fc.weight", 0, 4), ("fc.bias", 4, 2), ("ln.bias", 6, 2)]
    cfg = config({"type": "sgd", "groups": [{"params": "nothing*"}]}).optimizer
    with pytest.raises(ConfigError, match=r"'optimizer.groups\[0\].params': 'nothing\*' matches "
                       "no trained parameter"):
        make_optimizer(cfg, np, 8, np.float64, lay)
    cfg = config({"type": "sgd", "groups": [{"params": "*.bias"}, {"params": "ln.*"}]}).optimizer
    with pytest.raises(ConfigError, match=r"'optimizer.groups\[1\].params': every parameter it "
                       "matches is already in an earlier group"):
        make_optimizer(cfg, np, 8, np.float64, lay)
    cfg = config({"type": "sgd", "lr": 1.0, "groups": [{"params": "ln.*", "lr": 3.0},
                                                        {"params": "*.bias", "lr": 2.0}]})
    opt = make_optimizer(cfg.optimizer, np, 8, np.float64, lay)
    p = np.zeros(8)
    opt.step(p, np.ones(8), opt.base_lrs)
    np.testing.assert_array_equal(p, [-1, -1, -1, -1, -2, -2, -3, -3])


# -- through the trainer ---------------------------------------------------------------------


def test_trainer_groups_match_torch(tmp_path, digits_config):
    """The digits MLP in fp64 with AdamW, bias group without decay, and cosine warmup."""
    opt = {"type": "adamw", "lr": 3e-3, "weight_decay": 0.1,
           "groups": [{"params": "*.bias", "weight_decay": 0.0, "lr": 1e-2}]}
    sched = {"type": "cosine", "warmup_steps": 3, "min_lr": 1e-4}
    cfg = config_from_dict(digits_config(precision="fp64", data__shuffle=False, steps=12,
                                         optimizer=opt, schedule=sched), tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    t.fit()
    data = np.load(cfg.data.train.path)
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype(np.float64))
         for i in onnx.load(cfg.model).graph.initializer}
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for i, name in ((0, "fc1"), (2, "fc2")):
            net[i].weight.copy_(w[f"{name}.weight"])
            net[i].bias.copy_(w[f"{name}.bias"])
    topt = torch.optim.AdamW([{"params": [net[0].weight, net[2].weight]},
                              {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0,
                               "lr": 1e-2}], lr=3e-3, weight_decay=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(topt, 1 / 3, 1.0, total_iters=2)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=9, eta_min=1e-4)
    sch = torch.optim.lr_scheduler.SequentialLR(topt, [warm, cos], milestones=[3])
    x, y = torch.from_numpy(data["x_train"]).double(), torch.from_numpy(data["y_train"]).long()
    lrs = []
    for k in range(12):
        lrs.append(topt.param_groups[0]["lr"])
        topt.zero_grad()
        F.cross_entropy(net(x[32 * k:32 * k + 32]), y[32 * k:32 * k + 32]).backward()
        topt.step()
        sch.step()
    got = t.trained_values()
    for i, name in ((0, "fc1"), (2, "fc2")):
        np.testing.assert_allclose(got[f"{name}.weight"], net[i].weight.detach().numpy(),
                                   rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got[f"{name}.bias"], net[i].bias.detach().numpy(),
                                   rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([r["lr"] for r in t.history if "loss" in r], lrs, rtol=1e-12)


@pytest.mark.parametrize("cls", ["AdamW", "NAdam", "RAdam"])
def test_decoupled_decay_in_groups_needs_no_parameter_sized_vector(cls):
    """Groups that differ in weight decay (the README's `{params: "*.bias", weight_decay:
    0}`): on the host the decoupled decay is a product per run of the decaying tensors, with
    no per-element vector of the settings (two of them before: 2x the parameters' memory),
    and bit for bit the vector form's update."""
    from trainer import optim

    layout = [("w1", 0, 400), ("b1", 400, 100), ("w2", 500, 400), ("b2", 900, 100)]
    groups = [(["b1", "b2"], {"weight_decay": 0.0})]
    kw = {} if cls == "AdamW" else {"decoupled_weight_decay": True}
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(1000).astype(np.float32)
    grads = rng.standard_normal((3, 1000)).astype(np.float32)
    results = []
    for runs in (True, False):
        o = getattr(optim, cls)(np, 1000, np.float32, layout=layout, groups=groups, lr=1e-2,
                                weight_decay=0.1, **kw)
        if not runs:
            o._runs = None  # (the per-element vector form)
        p = p0.copy()
        for k in range(3):
            o.step(p, grads[k], [1e-2 * (k + 1)] * 2)
        assert ("decay" in o._vectors) != runs and "weight_decay" not in o._vectors
        results.append(p)
    np.testing.assert_array_equal(results[0], results[1])


def test_trainer_resume_keeps_group_state(tmp_path, digits_config):
    over = dict(data__batch_size=128, optimizer={
        "type": "nadam", "lr": 3e-3, "groups": [{"params": "*.bias", "betas": [0.8, 0.99]}]})
    full = Trainer(config_from_dict(digits_config(steps=10, **over), tmp_path / "full"),
                   stream=io.StringIO())
    full.fit()
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 5}
    Trainer(config_from_dict(digits_config(steps=5, checkpoint=ck, **over), tmp_path / "a"),
            stream=io.StringIO()).fit()
    out = io.StringIO()
    second = Trainer(config_from_dict(digits_config(steps=10, checkpoint=ck, **over),
                                      tmp_path / "b"), stream=out)
    second.fit(resume=True)
    assert "starts fresh" not in out.getvalue()
    for k, v in full.trained_values().items():
        np.testing.assert_array_equal(second.trained_values()[k], v, err_msg=k)


def test_group_globs_also_match_the_parameter_a_folded_tensor_holds():
    """A default export stores a Linear weight on a sequence as its transpose (`val_42`); its
    records name the parameter, and group globs match either name."""
    from trainer.optim import resolve_groups

    names = ["val_42", "l.lora_b/val_42", "head.weight"]
    aliases = {"val_42": "l.lora_a", "l.lora_b/val_42": "l.lora_b"}
    assert resolve_groups([["*lora_a"], ["*lora*"]], names, aliases=aliases) == [
        ["val_42"], ["l.lora_b/val_42"]]
    with pytest.raises(ConfigError, match="matches no trained parameter"):
        resolve_groups([["*lora_a"]], names)


def test_a_groups_globs_need_only_match_together():
    """A recipe's group ["*bias*", "*norm*"] on a model without norms was refused for its
    "*norm*" alone; the README's rule is the group's: refused where none matches."""
    from trainer.optim import resolve_groups

    names = ["fc.weight", "fc.bias"]
    assert resolve_groups([["*bias*", "*norm*"]], names) == [["fc.bias"]]
    with pytest.raises(ConfigError, match=r"groups\[0\].params': none of '\*ln\*', '\*norm\*' "
                       "matches a trained parameter"):
        resolve_groups([["*ln*", "*norm*"]], names)


def test_a_name_with_brackets_names_its_own_tensor(tmp_path):
    """`fc[0].weight` (an nn.ModuleList's layer as some exporters name it) read as a glob is a
    character class: it froze `fc0.weight` and trained itself, silently. A glob that is a
    tensor's exact name names that tensor; other globs still match as globs."""
    from onnx import TensorProto, helper

    from trainer.autodiff import build_training_graph
    from trainer.autodiff.build import training_info
    from trainer.optim import resolve_groups

    rng = np.random.default_rng(0)
    w = {"fc0.weight": rng.standard_normal((3, 8)), "fc[0].weight": rng.standard_normal((8, 4))}
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc0.weight"], ["h"]),
         helper.make_node("MatMul", ["h", "fc[0].weight"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    loss = {"type": "cross_entropy", "output": "logits", "target": "label"}
    for frozen, trained in ((["fc[0].weight"], ["fc0.weight"]), (["fc0.weight"], ["fc[0].weight"]),
                            (["fc[0]*"], ["fc[0].weight"])):  # (a real glob: fc0.weight)
        tm = build_training_graph(model, loss, "all", batch_size=2, frozen=frozen)
        assert list(training_info(tm).gradients) == trained, frozen
    names = ["fc0.weight", "fc[0].weight"]
    assert resolve_groups([["fc[0].weight"], ["*"]], names) == [["fc[0].weight"],
                                                                 ["fc0.weight"]]


@pytest.mark.parametrize("groups,lr,lr_groups", [
    ([{"params": "*", "lr": 0.01}], 0.01, None),  # (the top level's 0.1 trained nothing)
    ([{"params": "fc1.*", "lr": 0.01}], 0.1, [0.1, 0.01]),  # (top level first)
    ([{"params": "fc1.*", "weight_decay": 0.1}], 0.1, None),
])
def test_the_logged_lr_is_one_a_tensor_trains_at(tmp_path, digits_config, groups, lr,
                                                 lr_groups):
    cfg = digits_config(steps=3, log={"every_steps": 1},
                        optimizer={"type": "sgd", "lr": 0.1, "groups": groups})
    t = Trainer(config_from_dict(cfg, tmp_path), stream=io.StringIO())
    t.fit()
    rows = [r for r in t.history if "loss" in r]
    assert [r["lr"] for r in rows] == [lr] * 3
    assert [r.get("lr_groups") for r in rows] == [lr_groups] * 3


FUSED = [c for c in CASES if c["type"] in ("sgd", "adam", "adamw") and not c.get("amsgrad")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt", FUSED, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items() if k != "groups") + ("-groups" if "groups" in o else ""))
def test_the_compiled_host_update_is_the_numpy_update_bit_for_bit(opt, dtype, monkeypatch):
    """SGD and Adam(W) on the host run their update as one compiled loop (the device kernel's
    body, one pass over the buffers instead of one per operation): parameters and state are
    those of the NumPy operations bit for bit. (With parameter groups the NumPy form runs.)"""
    pytest.importorskip("numba")
    from trainer import optim
    from trainer.kernels import compiled

    calls = []
    monkeypatch.setattr(optim._HostUpdate, "__call__", lambda self, *a, _c=optim._HostUpdate.
                        __call__: (calls.append(self.kind), _c(self, *a))[1])

    def run():
        net = make_net()
        p = flat(net).astype(dtype)
        ours = make_optimizer(config(opt).optimizer, np, p.size, p.dtype, layout(net))
        grad = Oracle()
        for x, y in batches():
            ours.step(p, grad(p.astype(np.float64), x, y).astype(dtype), ours.base_lrs)
        return p, {k: v.copy() for k, v in ours.state.items()}

    assert compiled.enabled()
    got, got_state = run()
    fused = 0 if "groups" in opt else STEPS  # (groups keep their per-group NumPy products)
    assert len(calls) == fused
    monkeypatch.setenv(compiled.ENV, "0")
    want, want_state = run()
    assert len(calls) == fused
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    for k, v in want_state.items():
        np.testing.assert_array_equal(got_state[k].view(np.uint8), v.view(np.uint8), err_msg=k)


@pytest.mark.parametrize("compiled_on", ["1", "0"])
@pytest.mark.parametrize("top, bottom, nesterov, groups", [
    (0.0, 0.9, False, False),  # momentum 0 at the first and last steps
    (0.9, 0.0, False, True),  # 0 at the peak, mid-run; a group with its own dampening
    (0.0, 0.8, True, False)])
def test_sgd_momentum_through_zero_under_onecycle_matches_torch(top, bottom, nesterov, groups,
                                                                compiled_on, monkeypatch):
    """torch's SGD starts a buffer as a copy of d at its first step with momentum, leaves it
    at a step without, and uses d there: a onecycle momentum starting at 0 made our buffer
    start at the run's first step (a zero buffer then took (1 - dampening) * d: 0.22 apart
    from torch after 6 steps)."""
    from trainer.kernels import compiled
    from trainer.schedule import make_schedule

    monkeypatch.setenv(compiled.ENV, compiled_on)
    steps, n = 8, 6
    opt = {"type": "sgd", "lr": 0.1, "dampening": 0.5, "nesterov": nesterov}
    if nesterov:  # (nesterov asks for a momentum when built; onecycle then sets it)
        opt.update(dampening=0.0, momentum=0.5)
    if groups:
        opt["groups"] = [{"params": "b", "dampening": 0.25}]
    cfg = config_from_dict({"model": "m.onnx", "steps": steps,
                            "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}}},
                            "loss": {"type": "output", "output": "y"}, "optimizer": opt,
                            "schedule": {"type": "onecycle", "max_momentum": top,
                                         "base_momentum": bottom, "pct_start": 0.5}},
                           base_dir="/tmp")
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n)
    w, b = (torch.nn.Parameter(torch.tensor(p[:4].copy())),
            torch.nn.Parameter(torch.tensor(p[4:].copy())))
    ours = make_optimizer(cfg.optimizer, np, n, np.float64, [("w", 0, 4), ("b", 4, 2)])
    sched = make_schedule(cfg.schedule, ours, steps)
    tgroups = [{"params": [w]}] + ([{"params": [b], "dampening": 0.25}] if groups else [])
    if not groups:
        tgroups[0]["params"].append(b)
    theirs = torch.optim.SGD(tgroups, lr=0.1, dampening=opt["dampening"], nesterov=nesterov,
                             momentum=0.5 if nesterov else 0.0)
    tsched = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.1, total_steps=steps,
                                                 pct_start=0.5, max_momentum=top,
                                                 base_momentum=bottom)
    moms = []
    for s in range(steps):
        g = rng.standard_normal(n)
        ours.step(p, g, sched.lrs(s))
        moms.append(ours.groups[0]["momentum"])
        w.grad, b.grad = torch.tensor(g[:4]), torch.tensor(g[4:])
        theirs.step()
        if s + 1 < steps:
            tsched.step()
        np.testing.assert_allclose(p, np.concatenate([w.detach().numpy(), b.detach().numpy()]),
                                   rtol=1e-12, atol=1e-14, err_msg=f"step {s + 1}")
    assert 0.0 in moms and max(moms) > 0.5


def test_sgd_state_of_an_earlier_version_loads_without_its_momentum_started():
    """Checkpoints written before `momentum_started` was part of SGD's state load (their
    groups taken as begun after a step), where the key's absence would start the state
    fresh."""
    cfg = config({"type": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.5})
    a = make_optimizer(cfg.optimizer, np, 4, np.float64, [("w", 0, 4)])
    p = np.ones(4)
    a.step(p, np.full(4, 0.5), a.base_lrs)
    state = a.state_dict()
    assert state["momentum_started"].tolist() == [1]
    old = {k: v for k, v in state.items() if k != "momentum_started"}
    b = make_optimizer(cfg.optimizer, np, 4, np.float64, [("w", 0, 4)])
    assert b.state_keys_match(old) and not b.state_keys_match({**old, "other": 1})
    b.load_state_dict(old)
    q = p.copy()
    a.step(p, np.full(4, 0.25), a.base_lrs)
    b.step(q, np.full(4, 0.25), b.base_lrs)
    np.testing.assert_array_equal(p, q)
