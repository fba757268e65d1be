"""Compiled host kernels (trainer.kernels.compiled, numba): bit-identical to the NumPy path they
replace, over edge values and layouts (the normalizations' loops: given the same statistics,
which they sum in float64, at least as accurately); ONNX_TRAINER_COMPILED=0 switches them
off."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.families import FAMILIES
from trainer.kernels import compiled
from trainer.kernels.elementwise import Erf, erf_rational

pytest.importorskip("numba")


def _numpy_path(monkeypatch, fn, *args):
    monkeypatch.setenv(compiled.ENV, "0")
    try:
        return fn(*args)
    finally:
        monkeypatch.delenv(compiled.ENV)


def _erf_inputs():
    rng = np.random.default_rng(0)
    tiny = np.finfo(np.float32).smallest_subnormal
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, tiny, -tiny, 1e-30, 4.0,
                     -4.0, 3.9999998, 4.0000005, 1e30, -1e30, 0.5, -0.5], np.float32)
    return [edge, np.linspace(-6, 6, 200_001, dtype=np.float32),
            (rng.standard_normal((16, 64, 37)) * 3).astype(np.float32),
            np.geomspace(1e-38, 6, 50_000).astype(np.float32)]


@pytest.mark.parametrize("k", range(4))
def test_erf_is_the_numpy_paths_bit_for_bit(monkeypatch, k):
    x = _erf_inputs()[k]
    assert compiled.enabled()
    got = erf_rational(np, x)
    want = _numpy_path(monkeypatch, erf_rational, np, x)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5, 7)])
def test_erf_takes_any_shape_and_layout(monkeypatch, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    views = [x, x.T] if x.ndim == 2 else [x]
    if x.ndim == 2:
        views.append(np.asfortranarray(x)[:, ::2])
    for v in views:
        got, = Erf(np, v)
        want, = _numpy_path(monkeypatch, Erf, np, v)
        assert got.shape == v.shape
        np.testing.assert_array_equal(got, want)


def test_the_environment_switch_turns_the_compiled_path_off(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "erf_rational", lambda *a: calls.append(a) or a[0])
    x = np.linspace(-1, 1, 9, dtype=np.float32)
    erf_rational(np, x)
    assert len(calls) == 1
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.enabled() and "off (ONNX_TRAINER_COMPILED=0)" in compiled.status()
    erf_rational(np, x)
    assert len(calls) == 1


# -- elementwise chains of host plans as one compiled loop (trainer/kernels/ewfuse.py) ----------
def _bits_equal(got, want, what=""):
    """The same values bit for bit, NaN payloads aside (every NaN equals every NaN)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
    ints = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    np.testing.assert_array_equal(got[~nan].view(ints), want[~nan].view(ints), err_msg=what)


def _host_plans(model, feeds, fetch, monkeypatch):
    """(outputs, fused nodes) of the planned host run with the compiled loops, and the outputs
    with ONNX_TRAINER_COMPILED=0 (every node its NumPy kernel)."""
    from trainer.executor import Executor

    ex = Executor(model, np, fetch=fetch)
    got = ex.run(dict(feeds))  # (a new signature's first run is already the planned one)
    (plan,) = ex._specialized.values()
    fused = [n for n in plan.nodes if n.op == "FusedElementwise"]
    monkeypatch.setenv(compiled.ENV, "0")
    try:
        off = Executor(model, np, fetch=fetch)
        want = off.run(dict(feeds))
        (plan_off,) = off._specialized.values()
        assert not any(n.op == "FusedElementwise" for n in plan_off.nodes)
    finally:
        monkeypatch.delenv(compiled.ENV)
    return got, want, fused


def _edge_values(shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    tiny = np.finfo(np.float32).smallest_subnormal
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, tiny, -tiny, 1e30, -1e30, 3.4e38,
                     4.0, -4.0, 1.0, -1.0], np.float32)
    x.reshape(-1)[:edge.size * 7:7] = edge
    return x


def test_host_chains_compute_the_numpy_kernels_bits(monkeypatch):
    """Every op of HOST_EXPR in chains over [256, 300] float32 values (edge values among them:
    signed zeros, infinities, NaN, subnormals, overflowing products), one-element operands,
    several outputs of a group (values read later, a kept comparison): the compiled loops give
    the NumPy kernels' values bit for bit."""
    from onnx import helper

    from tests.opcases import make_model
    from trainer.kernels.ewfuse import HOST_EXPR, HOST_MIN_ELEMENTS, HostFusedElementwise

    shape = (256, 300)
    assert np.prod(shape) >= HOST_MIN_ELEMENTS
    x, y, z = (_edge_values(shape, s) for s in (0, 1, 2))
    y[::5] = x[::5]  # (equal pairs for Equal and the ordered comparisons)
    mk = helper.make_node
    nodes = [mk("Div", ["x", "sqrt2"], ["a"]), mk("Erf", ["a"], ["b"]),
             mk("Add", ["b", "one"], ["c"]), mk("Mul", ["x", "c"], ["d"]),
             mk("Mul", ["d", "half"], ["gelu"]),
             mk("Sub", ["gelu", "y"], ["e"]), mk("Neg", ["e"], ["f"]), mk("Abs", ["f"], ["g"]),
             mk("Sqrt", ["g"], ["h"]), mk("Div", ["h", "y"], ["i"]),
             mk("Greater", ["x", "y"], ["gt"]), mk("Less", ["y", "z"], ["lt"]),
             mk("GreaterOrEqual", ["z", "x"], ["ge"]), mk("LessOrEqual", ["x", "z"], ["le"]),
             mk("Equal", ["x", "y"], ["eq"]),
             mk("Where", ["gt", "i", "z"], ["w1"]), mk("Where", ["lt", "w1", "zero"], ["w2"]),
             mk("Where", ["ge", "w2", "x"], ["w3"]), mk("Where", ["le", "w3", "y"], ["w4"]),
             mk("Where", ["eq", "zero", "w4"], ["w5"]),
             mk("Sum", ["w5", "x", "y", "z"], ["s"]), mk("Mul", ["s", "s"], ["out"]),
             mk("MatMul", ["c", "ident"], ["read_later"])]  # (c: an output of its group)
    model = make_model(nodes, inputs={"x": x, "y": y, "z": z}, outputs=("out", "read_later",
                                                                       "gt"),
                       initializers={"sqrt2": np.array(np.sqrt(2), np.float32),
                                     "one": np.array(1, np.float32),
                                     "half": np.array([[0.5]], np.float32),
                                     "zero": np.array(0, np.float32),
                                     "ident": np.eye(300, dtype=np.float32)})
    with np.errstate(all="ignore"):
        got, want, fused = _host_plans(model, {"x": x, "y": y, "z": z},
                                       ["out", "read_later", "gt"], monkeypatch)
    ops = {op for n in fused for op in n.info["ops"]}
    assert ops == set(HOST_EXPR), set(HOST_EXPR) - ops
    assert all(isinstance(n.info["kernel"], HostFusedElementwise) for n in fused)
    assert all(n.info["kernel"].error is None for n in fused)
    assert any(len(n.outputs) > 1 for n in fused)
    for k in ("out", "read_later", "gt"):
        _bits_equal(got[k], want[k], k)


def test_small_host_chains_and_inexact_ops_stay_numpy_nodes(monkeypatch):
    """Below HOST_MIN_ELEMENTS, and for ops whose NumPy and compiled forms may round apart
    (Exp, Tanh) or a float64 Erf, no group is made."""
    from onnx import helper

    from tests.opcases import make_model

    mk = helper.make_node
    for shape, dtype, ops in [((8, 9), np.float32, ["Neg", "Abs"]),
                              ((256, 300), np.float32, ["Exp", "Tanh"]),
                              ((256, 300), np.float64, ["Erf", "Erf"])]:
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        model = make_model([mk(ops[0], ["x"], ["a"]), mk(ops[1], ["a"], ["y"])],
                           inputs={"x": x}, outputs=("y",))
        got, want, fused = _host_plans(model, {"x": x}, ["y"], monkeypatch)
        assert not fused, (shape, dtype, ops)
        _bits_equal(got["y"], want["y"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_familys_training_graph_keeps_its_bits_with_the_compiled_loops(zoo, monkeypatch,
                                                                              name):
    """A family's training graph (forward, loss, backward, BatchNorm statistics) planned on the
    host with every elementwise chain fused at any size (HOST_MIN_ELEMENTS 1): loss, gradients
    and statistics bit for bit those of the NumPy kernels."""
    from tests.families import family_training_graph
    from trainer.kernels import ewfuse

    monkeypatch.setattr(ewfuse, "HOST_MIN_ELEMENTS", 1)
    monkeypatch.setattr(compiled, "row_loops", lambda: None)  # (their sums: tested below)
    monkeypatch.setattr(compiled, "conv_loops", lambda: None)  # (Winograd: test_kernels_image)
    tm, feeds = family_training_graph(zoo[name])
    fetch = [o.name for o in tm.graph.output]
    got, want, fused = _host_plans(tm, feeds, fetch, monkeypatch)
    assert all(n.info["kernel"].error is None for n in fused)
    # (token_rotary_dynamo's chains mix shapes, or int64; mlp_frozen's one chain, a ReLU
    # gradient, is a PositiveSelect)
    assert fused or name in ("token_rotary_dynamo", "mlp_frozen")
    for k in fetch:
        _bits_equal(got[k], want[k], k)


def test_generated_loops_build_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    """A generated loop's source goes to cache_dir(); where that folder cannot be made (here:
    under a file), a temporary folder holds it and the loop still runs."""
    import atexit

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ONNX_TRAINER_CACHE", str(blocker))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # (TMPDIR read again)
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: at_exit.append((f, a, k)))
    source = "@JIT\ndef run(n, a0, o0):\n    for i in range(n):\n        o0[i] = a0[i] * 3\n"
    run = compiled.generated(f"onnx_trainer_ew_test_{tmp_path.name[-8:]}", source)
    a, out = np.arange(5, dtype=np.float32), np.empty(5, np.float32)
    run(5, a, out)
    np.testing.assert_array_equal(out, a * 3)
    assert not (blocker / "kernels").exists()
    # the temporary folder is removed at exit (it was left in /tmp by every such process)
    made = list(tmp_path.glob("onnx-trainer-kernels-*"))
    assert len(made) == 1 and len(at_exit) == 1
    f, args, kw = at_exit[0]
    f(*args, **kw)
    assert not made[0].exists()


# -- the normalizations' loops (trainer/kernels/rowloops.py through kernels/rowfuse.py) ---------
def _norm_cases(x, scale, bias, dy, axis):
    """{name: outputs} of LayerNormalization forward and backward and BatchNormalization's
    training forward and backward on these inputs (axis: LayerNormalization's)."""
    from trainer.kernels.fused import bn_train_backward, bn_train_forward, layer_norm_backward
    from trainer.kernels.norm import LayerNormalization

    axes = tuple(range(axis % x.ndim, x.ndim))
    trailing = x.shape[axes[0]:]
    out = {"ln": LayerNormalization(np, x, scale.reshape(trailing),
                                    None if bias is None else bias.reshape(trailing),
                                    axis=axis, epsilon=1e-5)}
    for want_dx in (True, False):
        out[f"ln_grad_{want_dx}"] = layer_norm_backward(
            np, dy, x, scale.reshape(trailing), axes=axes, eps=1e-5, want_dx=want_dx,
            want_ds=True, want_db=True, ds_shape=trailing, db_shape=trailing)
    c = x.shape[1]
    s_b = scale.reshape(-1)[:c].reshape((1, c) + (1,) * (x.ndim - 2))
    b_b = (bias if bias is not None else scale).reshape(-1)[:c].reshape(s_b.shape)
    bn_axes = (0,) + tuple(range(2, x.ndim))
    want = ("mean", "var", "ve", "sd", "xhat", "y")
    out["bn"] = bn_train_forward(np, x, s_b, b_b, axes=bn_axes, eps=x.dtype.type(1e-5),
                                 want=want)
    xhat, sd = out["bn"][4], out["bn"][3]
    count = x.size // c
    for want_dx in (True, False):
        out[f"bn_grad_{want_dx}"] = bn_train_backward(
            np, dy, xhat, sd, s_b, axes=bn_axes, count=count, want_dx=want_dx, want_ds=True,
            want_db=True, ds_shape=(c,), db_shape=(c,))
    return out


def _both_paths(monkeypatch, *args, calls=None):
    """(_norm_cases with the compiled loops, the same with the NumPy code); `calls` counts the
    loops' uses."""
    from trainer.kernels import rowloops

    if calls is not None:
        for name in ("layer_norm", "layer_norm_backward", "bn_train", "bn_train_backward"):
            real = getattr(rowloops, name)
            monkeypatch.setattr(rowloops, name, lambda *a, _r=real, _n=name: (
                calls.append(_n), _r(*a))[1])
    got = _norm_cases(*args)
    want = _numpy_path(monkeypatch, _norm_cases, *args)
    return got, want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_normalization_loops_round_elementwise_as_the_numpy_code(monkeypatch, dtype, bias):
    """Given the statistics a loop summed, every value it computes element by element (y,
    inv, xhat, sd, var + eps, dX) is the NumPy code's expression of them, bit for bit; and
    the four loops are what the host kernels call."""
    from trainer.kernels import rowloops

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 8, 4, 16)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    d, eps = 8 * 4 * 16, dtype(1e-5)
    s = rng.uniform(0.5, 2, d).astype(dtype)
    b = rng.standard_normal(d).astype(dtype) if bias else np.empty(0, dtype)
    x2 = x.reshape(4, d)
    y, mean, inv = np.empty_like(x2), np.empty(4, dtype), np.empty(4, dtype)
    rowloops.layer_norm(x2, s, b, np.array([1, eps], dtype), y, mean, inv)
    if dtype == np.float32:  # (a float64 variance's last bit depends on the order of its sum)
        var = (((x2 - mean[:, None]) ** 2).astype(np.float64).sum(1) / d).astype(dtype)
        _bits_equal(inv, 1 / np.sqrt(var + eps), "ln inv")
    want = (x2 - mean[:, None]) * inv[:, None] * s
    _bits_equal(y, want + b if bias else want, "ln y")
    x3, dy3 = x.reshape(4, 8, 64), dy.reshape(4, 8, 64)
    s8, b8 = s[:8], (b[:8] if bias else s[8:16])
    xhat, yb, stats = np.empty_like(x3), np.empty_like(x3), np.empty((4, 8), dtype)
    rowloops.bn_train(x3, s8, b8, np.array([eps], dtype), xhat, yb, stats)
    m, v, ve, sd = (stats[i][None, :, None] for i in range(4))
    _bits_equal(ve, v + eps, "bn ve")
    _bits_equal(sd, np.sqrt(ve), "bn sd")
    _bits_equal(xhat, (x3 - m) / sd, "bn xhat")
    _bits_equal(yb, xhat * s8[:, None] + b8[:, None], "bn y")
    k = s8 / stats[3]
    dx, sums = np.empty_like(dy3), np.empty((2, 8), dtype)
    c = np.array([1 / 256], dtype)
    rowloops.bn_train_backward(dy3, xhat, k, c, dx, sums, True)
    p, q = (sums[i][None, :, None] * c[0] for i in range(2))
    _bits_equal(dx, ((dy3 - xhat * p) - q) * k[:, None], "bn dx")
    calls: list[str] = []
    _both_paths(monkeypatch, x, s, b if bias else None, dy, 1, calls=calls)
    assert sorted(set(calls)) == ["bn_train", "bn_train_backward", "layer_norm",
                                  "layer_norm_backward"]


def _float64_reference(x, scale, bias, dy, axis):
    return {k: [np.asarray(v, np.float64) for v in vals] for k, vals in
            _norm_cases(x.astype(np.float64), scale.astype(np.float64),
                        None if bias is None else bias.astype(np.float64),
                        dy.astype(np.float64), axis).items()}


@pytest.mark.parametrize("shape,axis", [((16, 64, 128), -1), ((8, 16, 32, 32), 2),
                                        ((3, 5, 7), 1), ((32, 6), -1)])
def test_normalization_loops_are_at_least_as_accurate_as_the_numpy_code(monkeypatch, shape,
                                                                         axis):
    """float32 inputs with a large common offset (where the order of float32 sums shows):
    each output of the loops is within the NumPy code's own error of the float64 result
    (plus one rounding of the value), output by output."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 + 40).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    d = int(np.prod(shape[axis % len(shape):]))
    scale = rng.uniform(0.5, 2, d).astype(np.float32)
    bias = rng.standard_normal(d).astype(np.float32)
    calls: list[str] = []
    got, want = _both_paths(monkeypatch, x, scale, bias, dy, axis, calls=calls)
    assert len(calls) == 6
    exact = _float64_reference(x, scale, bias, dy, axis)
    for k in exact:
        for i, (g, w, e) in enumerate(zip(got[k], want[k], exact[k], strict=True)):
            ulp = np.spacing(np.abs(e).max().astype(np.float32))
            ours, theirs = np.abs(g - e).max(), np.abs(w - e).max()
            assert ours <= theirs + ulp, (k, i, ours, theirs, ulp)


def test_normalization_loops_leave_other_layouts_to_the_numpy_code(monkeypatch):
    """A strided input is copied and taken; a LayerNormalization scale that broadcasts over
    the normalized axes, 16-bit and mixed dtypes, and empty inputs keep the NumPy code
    (bit for bit its results)."""
    from trainer.kernels import rowloops
    from trainer.kernels.norm import LayerNormalization

    calls: list[str] = []
    monkeypatch.setattr(rowloops, "layer_norm", lambda *a, _r=rowloops.layer_norm: (
        calls.append(1), _r(*a))[1])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4, 8)).astype(np.float32)
    LayerNormalization(np, x.transpose(1, 0, 2), np.ones(8, np.float32), axis=-1)
    assert calls == [1]
    cases = [(x, rng.random(8, np.float32), -2),                       # scale [8] over (4, 8)
             (x.astype(np.float16), np.ones(8, np.float16), -1),
             (x, np.ones(8, np.float64), -1),
             (np.zeros((0, 8), np.float32), np.ones(8, np.float32), -1)]
    for v, scale, axis in cases:
        got = LayerNormalization(np, v, scale, axis=axis)
        want = _numpy_path(monkeypatch, lambda v=v, scale=scale, axis=axis:
                           LayerNormalization(np, v, scale, axis=axis))
        for g, w in zip(got, want, strict=True):
            _bits_equal(g, w)
    assert calls == [1]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_familys_training_graph_with_the_normalization_loops(zoo, monkeypatch, name):
    """A family's training graph planned on the host with and without the compiled loops:
    loss, gradients and statistics agree to float32 rounding of their sums."""
    from tests.families import family_training_graph

    tm, feeds = family_training_graph(zoo[name])
    fetch = [o.name for o in tm.graph.output]
    got, want, _ = _host_plans(tm, feeds, fetch, monkeypatch)
    for k in fetch:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        scale = max(float(np.abs(w).max()), 1e-30) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * scale, err_msg=k)


def _sce_cases(dtype):
    """(scores [N, C], labels) with repeated, negative and extreme values: a NaN row, an inf
    score, rows 50 apart, labels counted from the end."""
    rng = np.random.default_rng(6)
    out = []
    for n, c in ((16, 10), (5, 3), (64, 1000), (1, 1)):
        s = (rng.standard_normal((n, c)) * 4).astype(dtype)
        lab = rng.integers(-c, c, n)
        out.append((s, lab))
    s, lab = out[0][0].copy(), out[0][1]
    s[3, 2], s[5, 0], s[7] = np.nan, np.inf, s[7] + 50
    out.append((s, lab))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_cross_entropy_is_at_least_as_accurate_as_the_numpy_code(monkeypatch,
                                                                              dtype):
    """The mean cross entropy of [N, C] scores and its gradient, compiled (exponentials, sums
    and logarithm in float64, rounded once) against the NumPy path and a float64 (longdouble
    for float64 inputs) reference: within the NumPy path's own error plus one rounding, and the
    same NaN wherever a NaN or inf reaches them."""
    from trainer.kernels import fused, rowloops

    calls: list[str] = []
    for name in ("softmax_cross_entropy", "softmax_cross_entropy_backward"):
        real = getattr(rowloops, name)
        monkeypatch.setattr(rowloops, name, lambda *a, _f=real, _n=name: (
            calls.append(_n), _f(*a))[1])
    wide = np.longdouble if dtype == np.float64 else np.float64
    for s, lab in _sce_cases(dtype):
        seed = np.asarray(1.0, dtype)

        def both(s=s, lab=lab, seed=seed):
            loss, lp = fused.softmax_cross_entropy_forward(np, s, lab, ignore_index=-100)
            dx, = fused.softmax_cross_entropy_backward(np, lp, lab, seed, ignore_index=-100)
            return loss, lp, dx
        got = both()
        want = _numpy_path(monkeypatch, both)
        z = s.astype(wide)
        lp = z - z.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        rows = np.arange(len(lab))
        p = np.exp(lp) / len(lab)
        p[rows, lab] -= 1.0 / len(lab)
        exact = (-lp[rows, lab].mean(), lp, p)
        for g, w, e in zip(got, want, exact, strict=True):
            assert g.dtype == w.dtype == dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            ok = ~np.isnan(w) & np.isfinite(e)
            if not ok.any():
                continue
            ulp = np.spacing(np.abs(e[ok]).max().astype(dtype))
            ours, theirs = np.abs(g[ok] - e[ok]).max(), np.abs(w[ok] - e[ok]).max()
            assert ours <= theirs + 2 * ulp, (s.shape, ours, theirs, ulp)
    # (the loops serve [N, C] below ROW_MAX_MIN elements; [64, 1000] takes the NumPy path's
    # vectorized exponentials, which the backward's loop, one float64 exp at a time, took 3x
    # as long as)
    assert calls.count("softmax_cross_entropy") == 4
    assert calls.count("softmax_cross_entropy_backward") == 4


def test_the_compiled_cross_entropy_leaves_ignored_labels_to_the_numpy_code(monkeypatch):
    """A label equal to ignore_index (-100, outside [-C, C)): the compiled loops decline
    (nothing written) and the masked NumPy form runs: its loss and gradient bit for bit."""
    from trainer.kernels import fused

    s = np.random.default_rng(7).standard_normal((6, 4)).astype(np.float32)
    lab = np.array([0, -100, 3, 2, -100, 1])
    seed = np.asarray(1.0, np.float32)

    def both():
        loss, lp = fused.softmax_cross_entropy_forward(np, s, lab, ignore_index=-100)
        return (loss, lp, *fused.softmax_cross_entropy_backward(np, lp, lab, seed,
                                                                 ignore_index=-100))
    for g, w in zip(both(), _numpy_path(monkeypatch, both), strict=True):
        _bits_equal(g, w)
    assert both()[2][1].tolist() == [0.0] * 4  # (an ignored row passes nothing)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_gradients_fuse_into_one_exact_compiled_select(monkeypatch, dtype):
    """Where(Greater(v, 0), dy, 0), the ReLU gradient rule's pair, is one PositiveSelect node
    in a host plan; it and Where(c, x, 0) run as compiled selects: bit for bit the NumPy
    path's, NaN, infinities and signed zeros included."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.executor import Executor

    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    zero = numpy_helper.from_array(np.zeros((), dtype), "zero")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Greater", ["v", "zero"], ["m"]),
         helper.make_node("Where", ["m", "dy", "zero"], ["g"]),
         helper.make_node("Less", ["v", "dy"], ["c"]),
         helper.make_node("Where", ["c", "dy", "zero"], ["h"])], "g",
        [helper.make_tensor_value_info(k, t, [5, 7]) for k in ("v", "dy")],
        [helper.make_tensor_value_info(k, t, [5, 7]) for k in ("g", "h")], [zero]),
        opset_imports=[helper.make_opsetid("", 17)])
    v, dy = (_edge_values((14, 7), k)[:5].astype(dtype) for k in (8, 9))
    v[0, :4] = [np.nan, -0.0, 0.0, np.inf]
    dy[1, :4] = [np.nan, -0.0, np.inf, -np.inf]

    def run():
        ex = Executor(model, np, fetch=["g", "h"])
        out = ex.run({"v": v, "dy": dy})
        (plan,) = ex._specialized.values()
        return out, [n.op for n in plan.nodes]
    (got, ops), (want, _) = run(), _numpy_path(monkeypatch, run)
    assert "PositiveSelect" in ops and "Greater" not in ops, ops
    for k in ("g", "h"):
        _bits_equal(got[k], want[k], k)
    np.testing.assert_array_equal(got["g"], np.where(v > 0, dy, dtype(0)))


def test_a_numba_that_fails_to_import_is_said_to_be_off(tmp_path):
    """An installed numba that refuses the installed NumPy ("Numba needs NumPy 2.3 or less")
    leaves the compiled kernels off, and the pre-flight said they ran (`numba 0.68.1`): it
    read the version of the installed package without importing it."""
    import subprocess
    import sys

    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text(
        "raise ImportError('Numba needs NumPy 2.3 or less. Got NumPy 2.4.')\n")
    code = ("import trainer.kernels.compiled as c\n"
            "print(c.enabled()); print(c.enabled()); print(c.status())\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "False", "False", "compiled host kernels: off (numba cannot be imported: ImportError: "
        "Numba needs NumPy 2.3 or less. Got NumPy 2.4; pip install -U numba, or "
        "'onnx-trainer[fast]', for a numba that fits this NumPy)"]


def test_switched_off_the_compiled_path_never_imports_numba(tmp_path):
    """ONNX_TRAINER_COMPILED=0: `check` and a short `train` run without numba in the process
    (the pre-flight's status line imported it, and with it llvmlite's 120 MB)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = ("import sys\nfrom trainer.cli import main\n"
            f"cfg = {str(root / 'configs' / 'digits_mlp.yaml')!r}\n"
            f"out = {str(tmp_path / 'm.onnx')!r}\n"
            "main(['check', cfg])\n"
            "main(['train', cfg, '--set', 'epochs=null', '--set', 'steps=2', '--set',"
            " 'output=' + out])\n"
            "print('numba loaded:', 'numba' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, compiled.ENV: "0",
                                             "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compiled host kernels: off (ONNX_TRAINER_COMPILED=0)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "numba loaded: False"
