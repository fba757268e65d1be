"""Generated row kernels of the device path (trainer/kernels/rowfuse.py): LayerNormalization
forward and backward, Softmax, LogSoftmax and the fused cross entropy, their cupy.ReductionKernel
and cupy.ElementwiseKernel sources compiled by the C compiler and run as the stand-in's kernels
(tests/ckernels.py), against the host's kernels."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import ckernels
from tests import strictxp as sx
from tests.ckernels import CElementwiseKernel, CReductionKernel, needs_cc
from tests.families import family_config, family_training_graph
from trainer.executor import Executor
from trainer.kernels import fused, norm, reduce, rowfuse

pytestmark = needs_cc


@pytest.fixture(autouse=True)
def fresh_kernels():
    """Every test builds the row kernels anew (they remember failures, per process)."""
    def reset():
        for k in rowfuse.KERNELS:
            k._built.clear()
            k.error = None
    reset()
    yield
    reset()


@pytest.fixture
def gpu(monkeypatch):
    return ckernels.install(monkeypatch)


def _host(a):
    return sx.asnumpy(a) if isinstance(a, sx.ndarray) else np.asarray(a)


def _close(got, want, dtype):
    rtol, atol = (2e-5, 2e-6) if dtype == np.float32 else (1e-12, 1e-13)
    np.testing.assert_allclose(_host(got), want, rtol=rtol, atol=atol)


def _calls():
    return CReductionKernel.calls + CElementwiseKernel.calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,bias", [((6, 5), -1, True), ((3, 4, 7), 1, True),
                                              ((3, 4, 7), -1, False), ((2, 1, 3), 0, True)])
def test_layer_norm_forward_and_backward_are_the_host_kernels(gpu, dtype, shape, axis, bias):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    norm_shape = shape[axis % len(shape):]
    scale = rng.normal(size=norm_shape).astype(dtype)
    b = rng.normal(size=norm_shape).astype(dtype) if bias else None
    stash = 11 if dtype == np.float64 else 1
    want = norm.LayerNormalization(np, x, scale, b, axis=axis, epsilon=1e-3, stash_type=stash)
    dev = [gpu.asarray(v) if v is not None else None for v in (x, scale, b)]
    before = _calls()
    got = norm.LayerNormalization(gpu, *dev, axis=axis, epsilon=1e-3, stash_type=stash)
    assert _calls() - before == 2  # variance, result (the mean is CuPy's own)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        _close(g, w, dtype)

    axes = tuple(range(axis % len(shape), len(shape)))
    dy = rng.normal(size=shape).astype(dtype)
    for want_dx, want_ds, want_db in [(True, True, True), (True, False, False),
                                      (False, True, True)]:
        kw = {"axes": axes, "eps": 1e-3, "want_dx": want_dx, "want_ds": want_ds,
              "want_db": want_db, "ds_shape": norm_shape, "db_shape": norm_shape}
        want = fused.layer_norm_backward(np, dy, x, scale, **kw)
        before = _calls()
        got = fused.layer_norm_backward(gpu, gpu.asarray(dy), dev[0], dev[1], **kw)
        assert _calls() - before == 1 + 3 * want_dx + want_ds  # (+ the variance)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            _close(g, w, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((6, 5), -1), ((3, 4, 7), 1)])
def test_rms_norm_is_the_host_kernel(gpu, dtype, shape, axis):
    rng = np.random.default_rng(6)
    x = rng.normal(size=shape).astype(dtype)
    scale = rng.normal(size=shape[axis % len(shape):]).astype(dtype)
    stash = 11 if dtype == np.float64 else 1
    want = norm.RMSNormalization(np, x, scale, axis=axis, stash_type=stash)
    before = _calls()
    got = norm.RMSNormalization(gpu, gpu.asarray(x), gpu.asarray(scale), axis=axis,
                                stash_type=stash)
    assert _calls() - before == 2
    _close(got[0], want[0], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axes", [((4, 3, 5, 6), (0, 2, 3)), ((6, 4), (0,)),
                                        ((2, 3, 7), (0, 2))])
def test_batch_norm_training_forward_and_backward_are_the_host_kernels(gpu, dtype, shape,
                                                                       axes):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=shape) * 2 - 1).astype(dtype)
    stat = tuple(1 if a in axes else d for a, d in enumerate(shape))
    s_b, b_b = (rng.normal(size=stat).astype(dtype) for _ in range(2))
    eps = dtype(1e-5)
    for want in [("mean", "var", "sd", "xhat", "y"), ("y",), ("ve", "y", "xhat")]:
        ref = fused.bn_train_forward(np, x, s_b, b_b, axes=axes, eps=eps, want=want)
        before = _calls()
        got = fused.bn_train_forward(gpu, gpu.asarray(x), gpu.asarray(s_b), gpu.asarray(b_b),
                                     axes=axes, eps=eps, want=want)
        assert _calls() - before == 2  # the variance, xhat and y together
        for g, w in zip(got, ref, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            _close(g, w, dtype)
    # values no gradient rule reads keep the xp code
    before = _calls()
    fused.bn_train_forward(gpu, gpu.asarray(x), gpu.asarray(s_b), gpu.asarray(b_b), axes=axes,
                           eps=eps, want=("xc", "y"))
    assert _calls() == before
    _, _, sd, xhat, _ = fused.bn_train_forward(np, x, s_b, b_b, axes=axes, eps=eps,
                                               want=("mean", "var", "sd", "xhat", "y"))
    dy = rng.normal(size=shape).astype(dtype)
    count = int(np.prod([shape[a] for a in axes]))
    flat = (shape[1],) if len(shape) > 2 or axes == (0,) else stat
    for want_dx, want_ds, want_db in [(True, True, True), (True, False, False),
                                      (False, True, True)]:
        kw = {"axes": axes, "count": count, "want_dx": want_dx, "want_ds": want_ds,
              "want_db": want_db, "ds_shape": flat, "db_shape": flat}
        ref = fused.bn_train_backward(np, dy, xhat, sd, s_b, **kw)
        before = _calls()
        got = fused.bn_train_backward(gpu, *(gpu.asarray(v) for v in (dy, xhat, sd, s_b)), **kw)
        assert _calls() - before == 1 + want_dx
        for g, w in zip(got, ref, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            _close(g, w, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axes", [((5, 9), (1,)), ((2, 3, 4, 6), (3,)),
                                        ((2, 3, 4), (1,)), ((2, 3, 4), (1, 2))])
def test_softmax_and_log_softmax_are_the_host_kernels(gpu, dtype, shape, axes):
    x = (np.random.default_rng(1).normal(size=shape) * 20).astype(dtype)
    for fn in (reduce._softmax, reduce._log_softmax):
        before = _calls()
        got = fn(gpu, gpu.asarray(x), axes)
        assert _calls() - before == 2  # the sum of exponentials, the result
        _close(got, fn(np, x, axes), dtype)


def test_cross_entropy_forward_reads_its_log_softmax_from_the_kernels(gpu):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(7, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 5, (7, 3))
    labels[0, 0] = -100
    want = fused.softmax_cross_entropy_forward(np, scores, labels, ignore_index=-100)
    before = _calls()
    got = fused.softmax_cross_entropy_forward(gpu, gpu.asarray(scores), gpu.asarray(labels),
                                              ignore_index=-100)
    assert _calls() - before == 2
    for g, w in zip(got, want, strict=True):
        _close(g, w, np.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_any_shape_and_axis(gpu, shape, data):
    """Property: on any shape, over any trailing axes (LayerNorm) or any axis set
    (softmax), the kernels give the host's values, including rows of one element."""
    axis = data.draw(st.integers(0, len(shape) - 1))
    x = np.random.default_rng(len(shape)).normal(size=shape).astype(np.float32) * 4
    scale = np.linspace(0.5, 2, int(np.prod(shape[axis:]))).astype(np.float32).reshape(
        shape[axis:])
    want = norm.LayerNormalization(np, x, scale, scale, axis=axis, epsilon=1e-5)
    got = norm.LayerNormalization(gpu, gpu.asarray(x), gpu.asarray(scale), gpu.asarray(scale),
                                  axis=axis, epsilon=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_host(g), w, rtol=1e-4, atol=1e-5)
    axes = tuple(sorted(set(data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1)))))
    np.testing.assert_allclose(_host(reduce._softmax(gpu, gpu.asarray(x), axes)),
                               reduce._softmax(np, x, axes), rtol=1e-5, atol=1e-7)


def test_other_dtypes_and_no_kernel_api_keep_the_xp_code(gpu, monkeypatch):
    """16-bit inputs and mixed dtypes run the xp operations (no kernel is made); so does an
    array module without the kernel APIs (the plain stand-in)."""
    x = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float16)
    before = _calls()
    got = reduce._softmax(gpu, gpu.asarray(x), (1,))
    assert _calls() == before and got.dtype == np.float16
    monkeypatch.delattr(sx, "ReductionKernel")
    y = np.float32(x)
    np.testing.assert_allclose(_host(reduce._softmax(gpu, gpu.asarray(y), (1,))),
                               reduce._softmax(np, y, (1,)), rtol=1e-6)
    assert _calls() == before


def test_a_failing_kernel_warns_once_and_the_xp_code_runs(gpu, monkeypatch):
    class Broken(CReductionKernel):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("nvrtc: error: identifier undefined")

    monkeypatch.setattr(sx, "ReductionKernel", Broken)
    x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="onnx_trainer_sum_exp failed .*identifier"):
        got = reduce._softmax(gpu, gpu.asarray(x), (1,))
    np.testing.assert_allclose(_host(got), reduce._softmax(np, x, (1,)), rtol=1e-6)
    assert rowfuse.SUM_EXP.error is not None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no second warning: the kernel is not retried)
        reduce._softmax(gpu, gpu.asarray(x), (1,))


@pytest.mark.parametrize("name", ["encoder_dynamo", "token_rotary_dynamo", "bn_cnn_training_form"])
def test_a_familys_training_graph_runs_the_row_kernels_on_the_device(gpu, zoo, name):
    """The training graph planned on the device, its fused elementwise groups and row
    kernels run as generated code: the loss, gradients and BatchNorm statistics of the host
    plan (float32 rounding), nothing read back."""
    tm, feeds = family_training_graph(zoo[name])
    outs = [o.name for o in tm.graph.output]
    want = Executor(tm, np).run(dict(feeds))
    ex = Executor(tm, gpu)
    dev = {k: gpu.asarray(v) for k, v in feeds.items()}
    ex.run(dict(dev))
    before, reductions = _calls(), CReductionKernel.calls
    sx.reset()
    got = ex.run(dict(dev))
    assert sx.TRANSFERS.d2h == 0, sx.TRANSFERS.where()
    assert CReductionKernel.calls > reductions and _calls() > before
    for k in outs:
        w = np.asarray(want[k], np.float64)
        scale = max(float(np.abs(w).max(initial=0)), 1e-6)
        assert np.abs(_host(got[k]).astype(np.float64) - w).max(initial=0) <= 2e-5 * scale, k


def test_a_captured_encoder_step_runs_the_row_kernels_as_the_host_step(gpu, zoo, tmp_path):
    """gpu.cuda_graph with the row kernels (recorded by the capture as launches): the job's
    losses and weights are the host's."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    def run(device: str):
        raw = family_config(zoo["encoder_dynamo"], "encoder_dynamo", device=device,
                            precision="fp32", output=str(tmp_path / f"{device}.onnx"),
                            gpu={"cuda_graph": True})
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        t.fit()
        return t, [r["loss"] for r in t.history if "loss" in r]

    cpu, (dev, losses) = run("cpu"), run("gpu")
    ex = next(iter(dev.plans.values())).executor
    assert not ex.graph_errors and any(isinstance(g, tuple) for g in ex._graphs.values())
    np.testing.assert_allclose(losses, cpu[1], rtol=1e-5)
    for k, v in cpu[0].trained_values().items():
        np.testing.assert_allclose(dev.trained_values()[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_onnx_node_suite_on_the_device_path_with_generated_kernels(gpu):
    """ONNX's node suite on the device path (tests/test_gpu_standin.py's test) with both kernel
    APIs run as compiled C: every normalization and softmax case (NaN, infinities, odd shapes)
    and every planned elementwise chain through the generated kernels gives the expected
    outputs. (Measured: 324 reduction and 618 elementwise kernel calls.)"""
    from tests.test_gpu_standin import test_onnx_node_suite_on_the_gpu_path

    reductions, elementwise = CReductionKernel.calls, CElementwiseKernel.calls
    test_onnx_node_suite_on_the_gpu_path(gpu)
    assert CReductionKernel.calls - reductions > 200
    assert CElementwiseKernel.calls - elementwise > 400


def test_one_input_reductions_survive_cupys_cub_renaming():
    """CuPy runs a ReductionKernel of one input and one output through CUB, renaming them to
    in0/out0 by replacing their names in the map and post expressions' text
    (cupy/_core/_cub_reduction.pyx); an output named `r` turned the mean's `_type_reduce` into
    `_type_out0educe`: RMSNormalization's kernel failed to compile on a GPU and its fast path
    stayed off (found by a CuPy audit). The rename must leave every expression as it was."""
    def param_names(spec: str) -> list[str]:
        return [p.split()[-1] for p in spec.split(",") if p.strip()]

    checked = 0
    for k in rowfuse.KERNELS:
        if k.kind != "ReductionKernel":
            continue
        ins, outs, map_expr, _, post = k.spec[:5]
        (old_out,) = param_names(outs)
        if len(param_names(ins)) != 1:
            continue
        (old_in,) = param_names(ins)
        for name, text in ((old_in, map_expr), (old_out, post)):
            # (the text replace hits only the name itself, nothing that contains it)
            assert len(re.findall(re.escape(name), text)) == \
                len(re.findall(rf"\b{re.escape(name)}\b", text)), (k.spec[-1], name, text)
        checked += 1
    assert checked >= 1  # (the RMS mean square)
