"""Generated pooling kernels of the device path (trainer/kernels/poolfuse.py): MaxPool (Y and
Indices), its backward (the planner's MaxPoolGrad) and AveragePool, their cupy.ElementwiseKernel
sources compiled by the C compiler and run as the stand-in's kernels (tests/ckernels.py),
against the host's kernels."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests import ckernels
from tests import strictxp as sx
from tests.ckernels import CElementwiseKernel, needs_cc
from tests.families import family_config
from trainer.errors import ModelError
from trainer.executor import Executor
from trainer.kernels import fused, nn, poolfuse

pytestmark = needs_cc
# (derandomized: the same examples every run, so CI cannot turn red by chance)
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def fresh_kernels():
    """Every test builds the pooling kernels anew (they remember failures, per process)."""
    poolfuse.KERNELS.clear()
    yield
    poolfuse.KERNELS.clear()


@pytest.fixture
def gpu(monkeypatch):
    return ckernels.install(monkeypatch)


def _host(a):
    return sx.asnumpy(a) if isinstance(a, sx.ndarray) else np.asarray(a)


def _no_errors():
    assert all(k.error is None for k in poolfuse.KERNELS.values()), \
        [(k.what, k.error) for k in poolfuse.KERNELS.values()]


@st.composite
def geometries(draw, max_nd=3):
    """(x shape, pooling attributes) of a valid 1-D to 3-D pooling: any kernel, strides,
    dilations, pads (or auto_pad), ceil_mode."""
    nd = draw(st.integers(1, max_nd))
    kernel = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    strides = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    dilations = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    # (ONNX: a pad is smaller than the kernel's span)
    pads = [min(p, (kernel[i % nd] - 1) * dilations[i % nd]) for i, p in enumerate(pads)]
    spatial = draw(st.lists(st.integers(1, 7), min_size=nd, max_size=nd))
    ceil_mode = draw(st.integers(0, 1)) if auto_pad in ("NOTSET", "VALID") else 0
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations,
             "ceil_mode": ceil_mode}
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *spatial)
    try:  # (a window wider than the padded input: no output, refused)
        nn.conv_pads(spatial, kernel, strides, dilations, attrs.get("pads"), auto_pad, ceil_mode)
    except ModelError:
        assume(False)
    return shape, attrs


def _values(rng, shape, dtype, specials: bool):
    """Few distinct values (ties), with NaNs and infinities where `specials`."""
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    if specials:
        pick = rng.random(shape)
        x[pick < 0.08] = np.nan
        x[(pick >= 0.08) & (pick < 0.14)] = -np.inf
        x[(pick >= 0.14) & (pick < 0.17)] = np.inf
    return x


@PROPERTY
@given(geo=geometries(), dtype=st.sampled_from([np.float32, np.float64]),
       storage_order=st.integers(0, 1), specials=st.booleans(), seed=st.integers(0, 2**16))
def test_maxpool_is_the_host_kernel(gpu, geo, dtype, storage_order, specials, seed):
    """Property: Y and Indices of any geometry are the host's: the first maximal tap (ties),
    the first NaN, padding as -inf; Y alone too; one kernel call each."""
    shape, attrs = geo
    x = _values(np.random.default_rng(seed), shape, dtype, specials)
    kw = dict(attrs, storage_order=storage_order)
    want = nn.MaxPool(np, x, **kw)
    before = CElementwiseKernel.calls
    got = nn.MaxPool(gpu, gpu.asarray(x), **kw)
    assert CElementwiseKernel.calls - before == 1
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(_host(g), w)
    (y,) = nn.MaxPool(gpu, gpu.asarray(x), **kw, n_outputs=1)
    np.testing.assert_array_equal(_host(y), want[0])
    assert CElementwiseKernel.calls - before == 2
    _no_errors()


@PROPERTY
@given(geo=geometries(), dtype=st.sampled_from([np.float32, np.float64]),
       count_include_pad=st.integers(0, 1), specials=st.booleans(), seed=st.integers(0, 2**16))
def test_average_pool_is_the_host_kernel(gpu, geo, dtype, count_include_pad, specials, seed):
    """Property: AveragePool of any geometry is the host's, to the bit where the host adds the
    taps one by one (up to 16 taps): the same order and divisor."""
    shape, attrs = geo
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(dtype)
    if specials:
        x[rng.random(shape) < 0.1] = np.inf
        x[rng.random(shape) < 0.05] = np.nan
    kw = dict(attrs, count_include_pad=count_include_pad)
    with np.errstate(all="ignore"):  # (a window of padding only: 0 / 0)
        (want,) = nn.AveragePool(np, x, **kw)
    before = CElementwiseKernel.calls
    (got,) = nn.AveragePool(gpu, gpu.asarray(x), **kw)
    assert CElementwiseKernel.calls - before == 1
    assert got.shape == want.shape and got.dtype == want.dtype
    if math.prod(attrs["kernel_shape"]) <= nn._TAP_LOOP_MAX:
        np.testing.assert_array_equal(_host(got), want)
    else:  # (sums in another order: an absolute tolerance too, for windows that cancel)
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(_host(got), want, rtol=tol, atol=tol)
    _no_errors()


@PROPERTY
@given(geo=geometries(), dtype=st.sampled_from([np.float32, np.float64]),
       storage_order=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_maxpool_backward_is_the_host_bincount(gpu, geo, dtype, storage_order, seed):
    """Property: the gather kernel's dX is the host's bincount of dY at the Indices (float64
    sums rounded once), ties and NaNs included, overlapping windows adding up; with
    storage_order=1 Indices, dX in x's own layout."""
    shape, attrs = geo
    rng = np.random.default_rng(seed)
    x = _values(rng, shape, dtype, False)
    x[rng.random(shape) < 0.05] = np.nan
    y, ind = nn.MaxPool(np, x, **attrs)
    # (no window of padding only: its index names no element of it, see poolfuse)
    assume(not np.isneginf(y).any())
    dy = (rng.normal(size=y.shape) * 10).astype(dtype)
    (want,) = fused.maxpool_backward(np, ind, dy, shape=list(shape))
    geometry = poolfuse.geometry_attrs(shape, dict(attrs, storage_order=storage_order))
    if storage_order:
        ind = nn.MaxPool(np, x, **attrs, storage_order=1)[1]
    before = CElementwiseKernel.calls
    (got,) = fused.maxpool_backward(gpu, gpu.asarray(ind), gpu.asarray(dy), shape=list(shape),
                                    **geometry)
    assert CElementwiseKernel.calls - before == 1
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(_host(got), want)
    _no_errors()


# -- launches -------------------------------------------------------------------------------------
_NO_LAUNCH = {"empty", "ascontiguousarray", "reshape", "as_strided", "transpose", "view", "ravel"}


def _launches(monkeypatch) -> list[str]:
    """The stand-in's device operations from now on, by name (allocations, views and
    contiguous no-op copies left out): its kernel launches."""
    seen: list[str] = []
    real = sx._compute

    def counted(fn, args=(), kwargs=None, post=None):
        name = getattr(fn, "__name__", "?")
        key = args[0] if args and name == "__getitem__" else None
        basic = name == "__getitem__" and not any(
            isinstance(k, np.ndarray) for k in (key if isinstance(key, tuple) else (key,)))
        if not basic and name not in _NO_LAUNCH:
            seen.append(name)
        return real(fn, args, kwargs, post)
    monkeypatch.setattr(sx, "_compute", counted)
    return seen


_TABLE = [  # (the module docstring's table: xp code, here)
    ("maxpool 3x3 stride 2 pads 1", nn.MaxPool,
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}, 70),
    ("maxpool 2x2 stride 2, Y only", nn.MaxPool,
     {"kernel_shape": [2, 2], "strides": [2, 2], "n_outputs": 1}, 22),
    ("maxpool 5x5", nn.MaxPool, {"kernel_shape": [5, 5]}, 4),
    ("averagepool 3x3 pads 1", nn.AveragePool, {"kernel_shape": [3, 3], "pads": [1] * 4}, 14),
]


@pytest.mark.parametrize("label,fn,kw,xp_launches", _TABLE, ids=[t[0] for t in _TABLE])
def test_one_launch_replaces_the_tap_loop(gpu, monkeypatch, label, fn, kw, xp_launches):
    """The kernel launches of one call (a second one: the index tables are cached), xp code
    (no kernel API) against the generated kernel: the module docstring's table."""
    x = gpu.asarray(np.random.default_rng(0).normal(size=(2, 3, 9, 9)).astype(np.float32))
    seen = _launches(monkeypatch)
    counts = []
    for has_api in (False, True):
        if not has_api:
            monkeypatch.delattr(sx, "ElementwiseKernel")
        else:
            monkeypatch.setattr(sx, "ElementwiseKernel", CElementwiseKernel, raising=False)
        want = fn(gpu, x, **kw)
        seen.clear()
        got = fn(gpu, x, **kw)
        counts.append(len(seen))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(_host(g), _host(w))
    assert counts == [xp_launches, 1], counts


def test_the_backward_is_one_gather_instead_of_bincount_and_a_cast(gpu, monkeypatch):
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 9)).astype(np.float32)
    kw = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}
    y, ind = nn.MaxPool(np, x, **kw)
    geometry = poolfuse.geometry_attrs(x.shape, kw)
    seen = _launches(monkeypatch)
    args = (gpu.asarray(ind), gpu.asarray(y))
    fused.maxpool_backward(gpu, *args, shape=list(x.shape))
    assert seen == ["bincount", "astype"]
    seen.clear()
    fused.maxpool_backward(gpu, *args, shape=list(x.shape), **geometry)
    assert seen == ["_run"]  # (the generated kernel)


# -- where the xp code runs -----------------------------------------------------------------------
def test_other_dtypes_and_no_kernel_api_keep_the_xp_code(gpu, monkeypatch):
    rng = np.random.default_rng(3)
    kw = {"kernel_shape": [2, 2], "strides": [1, 2]}
    before = CElementwiseKernel.calls
    for dt in (np.float16, np.int8, np.int32):
        x = (rng.normal(size=(2, 2, 5, 6)) * 9).astype(dt)
        for g, w in zip(nn.MaxPool(gpu, gpu.asarray(x), **kw), nn.MaxPool(np, x, **kw),
                        strict=True):
            np.testing.assert_array_equal(_host(g), w)
    x = rng.normal(size=(2, 2, 5, 6)).astype(np.float16)
    np.testing.assert_array_equal(_host(nn.AveragePool(gpu, gpu.asarray(x), **kw)[0]),
                                  nn.AveragePool(np, x, **kw)[0])
    assert CElementwiseKernel.calls == before
    monkeypatch.delattr(sx, "ElementwiseKernel")
    x = rng.normal(size=(2, 2, 5, 6)).astype(np.float32)
    for g, w in zip(nn.MaxPool(gpu, gpu.asarray(x), **kw), nn.MaxPool(np, x, **kw),
                    strict=True):
        np.testing.assert_array_equal(_host(g), w)
    assert CElementwiseKernel.calls == before and not any(
        k._built for k in poolfuse.KERNELS.values())


@pytest.mark.parametrize("which", ["maxpool", "maxpool_grad", "avgpool"])
def test_a_failing_kernel_warns_once_and_the_xp_code_runs(gpu, monkeypatch, which):
    class Broken(CElementwiseKernel):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("nvrtc: error: identifier undefined")

    monkeypatch.setattr(sx, "ElementwiseKernel", Broken)
    x = np.random.default_rng(4).normal(size=(2, 3, 6, 7)).astype(np.float32)
    kw = {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1]}
    y, ind = nn.MaxPool(np, x, **kw)

    def call():
        if which == "maxpool":
            return nn.MaxPool(gpu, gpu.asarray(x), **kw), (y, ind)
        if which == "avgpool":
            return nn.AveragePool(gpu, gpu.asarray(x), **kw), nn.AveragePool(np, x, **kw)
        geometry = poolfuse.geometry_attrs(x.shape, kw)
        return (fused.maxpool_backward(gpu, gpu.asarray(ind), gpu.asarray(y),
                                       shape=list(x.shape), **geometry),
                fused.maxpool_backward(np, ind, y, shape=list(x.shape)))

    if which == "maxpool_grad":  # (the forward's kernel fails first otherwise)
        with pytest.warns(RuntimeWarning):
            nn.MaxPool(gpu, gpu.asarray(x), **kw)
    with pytest.warns(RuntimeWarning, match=f"onnx_trainer_{which}_2d failed .*identifier"):
        got, want = call()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_host(g), w, rtol=1e-6)
    assert poolfuse.KERNELS[(which, 2)].error is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no second warning: the kernel is not retried)
        got, want = call()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_host(g), w, rtol=1e-6)


# -- in graphs ------------------------------------------------------------------------------------
def _pool_model(opset: int, indices_output: bool):
    rng = np.random.default_rng(11)
    out = ["p", "i"] if indices_output else ["p"]
    nodes = [helper.make_node("MaxPool", ["x"], out, kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 0, 1, 1], ceil_mode=1),
             helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[2, 2], pads=[0, 1, 1, 0],
                              count_include_pad=1),
             helper.make_node("Flatten", ["a"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    x_shape = [3, 2, 9, 8]
    _, pool = nn.conv_pads(x_shape[2:], [3, 3], [2, 2], [1, 1], [1, 0, 1, 1], "NOTSET", 1)
    _, avg = nn.conv_pads(pool, [2, 2], [1, 1], [1, 1], [0, 1, 1, 0], "NOTSET")
    w = rng.standard_normal((2 * math.prod(avg), 4)).astype(np.float32)
    g = helper.make_graph(nodes, "pool",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 4])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    x = rng.integers(-2, 3, x_shape).astype(np.float32)  # (ties)
    return model, {"x": x, "logits_grad": rng.standard_normal((3, 4)).astype(np.float32)}


@pytest.mark.parametrize("opset,indices_output", [(18, False), (18, True), (13, False)])
def test_the_fused_maxpool_gradient_runs_the_gather_kernel(gpu, opset, indices_output):
    """The planner's MaxPoolGrad carries the pooling's explicit geometry (also where the
    gradient rule recomputed the Indices with a second MaxPool) and runs the gather kernel on
    the device: dX is the host plan's."""
    from tests.test_plan import planned
    from trainer.autodiff import reverse

    model, feeds = _pool_model(opset, indices_output)
    rm = reverse(model, ["x"], ["logits"])
    want = Executor(rm, np).run(dict(feeds))["x_grad"]
    ex = Executor(rm, gpu)
    dev = {k: gpu.asarray(v) for k, v in feeds.items()}
    ex.run(dict(dev))
    got = ex.run(dict(dev))["x_grad"]
    node = next(n for n in planned(ex).nodes if n.op == "MaxPoolGrad")
    assert node.attrs == {"shape": [3, 2, 9, 8], "kernel_shape": [3, 3], "strides": [2, 2],
                          "dilations": [1, 1], "pads": [1, 0, 1, 1], "storage_order": 0}
    assert poolfuse.KERNELS[("maxpool_grad", 2)]._built
    np.testing.assert_array_equal(_host(got), want)
    _no_errors()


def test_onnx_node_suite_pooling_cases_with_generated_kernels(gpu):
    """ONNX's node suite's MaxPool and AveragePool cases (tests/test_gpu_standin.py's test,
    those cases only) on the device path with the kernels run as compiled C: the expected
    outputs, every case through a generated kernel."""
    from tests.onnx_conformance import collect, device_failure, normalized_sets, read_expected

    expected = set(read_expected())
    failures, ran = [], 0
    for case in collect():
        if case.name in expected or not case.name.startswith(("test_maxpool",
                                                               "test_averagepool")):
            continue
        sets = normalized_sets(case)
        if any(x.dtype not in (np.float32, np.float64) for i, _ in sets for x in i):
            continue
        ran += 1
        before = CElementwiseKernel.calls
        if (failure := device_failure(case, sets)) is not None:
            failures.append(failure)
        if CElementwiseKernel.calls == before:
            failures.append(f"{case.name}: no generated kernel ran")
    assert ran >= 35, ran
    assert not failures, "\n".join(failures)
    assert {k[0] for k in poolfuse.KERNELS} >= {"maxpool", "maxpool_y", "avgpool"}
    assert {k[1] for k in poolfuse.KERNELS} >= {1, 2, 3}
    _no_errors()


@pytest.mark.parametrize("captured", [False, True], ids=["plain", "cuda_graph"])
def test_a_cnn_family_trains_alike_with_and_without_the_pooling_kernels(gpu, zoo, tmp_path,
                                                                        monkeypatch, captured):
    """bn_cnn_training_form (Conv-BN-ReLU-MaxPool, Conv-ReLU-AvgPool) trained on the device
    stand-in (also captured as a CUDA graph): the same losses and weights with the pooling
    kernels as with the xp code, and its MaxPool, AveragePool and MaxPool gradient ran as
    generated kernels."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    def run(tag: str):
        raw = family_config(zoo["bn_cnn_training_form"], "bn_cnn_training_form",
                            device="gpu", precision="fp32", gpu={"cuda_graph": captured},
                            output=str(tmp_path / f"{tag}.onnx"))
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        t.fit()
        ex = next(iter(t.plans.values())).executor
        assert not ex.graph_errors
        assert any(isinstance(g, tuple) for g in ex._graphs.values()) == captured
        return t.trained_values(), [r["loss"] for r in t.history if "loss" in r]

    with_kernels = run("kernels")
    assert {k for k, v in poolfuse.KERNELS.items() if v._built} >= {
        ("maxpool", 2), ("avgpool", 2), ("maxpool_grad", 2)}
    _no_errors()
    for name in ("maxpool", "averagepool", "maxpool_backward"):
        monkeypatch.setattr(poolfuse, name, lambda *a, **k: None)
    xp_code = run("xp")
    np.testing.assert_array_equal(with_kernels[1], xp_code[1])
    for k, v in xp_code[0].items():
        np.testing.assert_array_equal(with_kernels[0][k], v, err_msg=k)
