"""Compiled host kernels (trainer.kernels.compiled, numba): bit-identical to the NumPy path they
replace, over edge values and layouts; ONNX_TRAINER_COMPILED=0 switches them off."""

from __future__ import annotations

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
    tm, feeds = family_training_graph(zoo[name])
    fetch = [o.name for o in tm.graph.output]
    got, want, fused = _host_plans(tm, feeds, fetch, monkeypatch)
    assert all(n.info["kernel"].error is None for n in fused)
    assert fused or name == "token_rotary_dynamo"  # (its chains mix shapes, or int64)
    for k in fetch:
        _bits_equal(got[k], want[k], k)


def test_generated_loops_build_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    """A generated loop's source goes to cache_dir(); where that folder cannot be made (here:
    under a file), a temporary folder holds it and the loop still runs."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ONNX_TRAINER_CACHE", str(blocker))
    source = "@JIT\ndef run(n, a0, o0):\n    for i in range(n):\n        o0[i] = a0[i] * 3\n"
    run = compiled.generated(f"onnx_trainer_ew_test_{tmp_path.name[-8:]}", source)
    a, out = np.arange(5, dtype=np.float32), np.empty(5, np.float32)
    run(5, a, out)
    np.testing.assert_array_equal(out, a * 3)
    assert not (blocker / "kernels").exists()
