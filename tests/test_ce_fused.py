"""The fused cross entropy with class weights and label smoothing (kernels/fused.py): the planned
executor's loss and gradient against the unplanned interpreter of the same training graph,
PyTorch's autograd and float64 finite differences, over [N, C], [N, T, C] (a Transpose before
the loss) and [N, C, H, W] logits, ignored labels, weight-0 classes and fed or constant seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests import ckernels
from tests.ckernels import needs_cc
from trainer.autodiff import build_training_graph, training_info
from trainer.executor import Executor
from trainer.kernels import fused

LAYOUTS = {"2d": ((6, 5), -1), "seq": ((3, 4, 5), -1), "seg": ((2, 5, 3, 2), 1),
           "classes first": ((3, 5, 4), 1)}


def _case(shape, class_axis, eps, weights, dtype, opset=18, ignore_index=-100):
    """The training graph of logits = x * w (w trained, of the logits' shape) with the
    cross-entropy loss; (graph, info)."""
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    w = numpy_helper.from_array(np.ones(shape, dtype), "w")
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["logits"])], "ce",
                          [helper.make_tensor_value_info("x", t, list(shape))],
                          [helper.make_tensor_value_info("logits", t, list(shape))], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    tm = build_training_graph(model, {
        "type": "cross_entropy", "output": "logits", "target": "label",
        "class_axis": class_axis, "label_smoothing": eps, "ignore_index": ignore_index,
        "weight": None if weights is None else [float(v) for v in weights]}, wrt=["w"])
    return tm, training_info(tm)


def _labels(rng, shape, class_axis, ignore, ignore_index=-100):
    axis = class_axis % len(shape)
    lshape = [d for i, d in enumerate(shape) if i != axis]
    labels = rng.integers(0, shape[axis], lshape)
    if ignore == "some":
        labels[rng.random(lshape) < 0.3] = ignore_index
        labels.reshape(-1)[0] = ignore_index
    elif ignore == "all":
        labels[...] = ignore_index
    return labels


def _run(tm, info, x, w, labels, seed=None, optimize=True):
    """(loss, w's gradient, the plan's ops or None) of one step; `seed`: fed (as a training
    run's loss weight), else the graph's constant 1."""
    feeds_names = list(info.gradients) + ([info.seed] if seed is not None else [])
    ex = Executor(tm, feeds=feeds_names, fetch=[info.loss, info.gradients["w"]],
                  optimize=optimize)
    feeds = {"w": w, "x": x, info.targets["label"]: labels}
    if seed is not None:
        feeds[info.seed] = np.asarray(seed, x.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        ex.run(feeds)
        out = ex.run(feeds)
    plans = [p for p in ex._specialized.values() if p] if optimize else []
    ops = [op for _, op, _ in plans[-1].labels] if plans else None
    return out[info.loss], out[info.gradients["w"]], ops


def _torch(x, w, labels, class_axis, eps, weights):
    """torch's loss and d loss / d w (logits = x * w, classes moved to axis 1)."""
    wt = torch.tensor(w, requires_grad=True)
    logits = torch.tensor(x) * wt
    if class_axis % x.ndim != 1:
        logits = logits.movedim(class_axis % x.ndim, 1)
    loss = torch.nn.functional.cross_entropy(
        logits, torch.tensor(labels), label_smoothing=eps,
        weight=None if weights is None else torch.tensor(weights, dtype=logits.dtype))
    loss.backward()
    return loss.item(), wt.grad.numpy()


def _close(got, want, dtype, what):
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.1, False), (0.0, True),
                                          (0.25, True), (1.0, True)])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_loss_and_gradient_are_the_interpreters_and_torchs(layout, eps, weighted,
                                                                 ignore, dtype):
    """The plan fuses the loss and its gradient (no [N, C] node of the smoothing or the
    weighting stays), with the interpreter's values; with labels that count, torch's."""
    shape, class_axis = LAYOUTS[layout]
    rng = np.random.default_rng(len(layout) * 7 + int(eps * 8) + weighted)
    c = shape[class_axis]
    weights = None
    if weighted:  # (a weight-0 class included)
        weights = rng.uniform(0.2, 3.0, c)
        weights[1] = 0.0
    tm, info = _case(shape, class_axis, eps, weights, dtype)
    x = rng.standard_normal(shape).astype(dtype) * 2
    w = (1 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    labels = _labels(rng, shape, class_axis, ignore)
    for seed in (None, 0.75):
        loss, grad, ops = _run(tm, info, x, w, labels, seed)
        want_loss, want_grad, _ = _run(tm, info, x, w, labels, seed, optimize=False)
        assert "SoftmaxCrossEntropyGrad" in ops, ops
        assert not {"ReduceMean", "ScatterElements", "GatherElements", "Exp"} & set(ops), ops
        _close(np.asarray(loss), np.asarray(want_loss), dtype, "loss")
        _close(grad, want_grad, dtype, "gradient")
        if seed is None and ignore != "all" and (weights is None or (
                weights[labels[labels != -100]] > 0).any()):
            t_loss, t_grad = _torch(x, w, labels, class_axis, eps, weights)
            _close(np.asarray(loss), np.asarray(t_loss), dtype, "torch's loss")
            _close(grad, t_grad, dtype, "torch's gradient")


@pytest.mark.parametrize("eps,weighted", [(0.1, False), (0.0, True), (0.3, True)])
def test_fused_gradient_is_the_float64_finite_difference(eps, weighted):
    shape, class_axis = LAYOUTS["seg"]
    rng = np.random.default_rng(5)
    weights = rng.uniform(0.2, 3.0, shape[1]) if weighted else None
    tm, info = _case(shape, class_axis, eps, weights, np.float64)
    x = rng.standard_normal(shape)
    w = 1 + 0.1 * rng.standard_normal(shape)
    labels = _labels(rng, shape, class_axis, "some")
    loss, grad, ops = _run(tm, info, x, w, labels)
    assert "SoftmaxCrossEntropyGrad" in ops
    h = 1e-6
    for k in rng.choice(w.size, 12, replace=False):
        up, down = w.copy(), w.copy()
        up.reshape(-1)[k] += h
        down.reshape(-1)[k] -= h
        fd = (_run(tm, info, x, up, labels)[0] - _run(tm, info, x, down, labels)[0]) / (2 * h)
        assert grad.reshape(-1)[k] == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_opsets_before_13_keep_their_decomposed_loss(weighted):
    """Opset 12 has no SoftmaxCrossEntropyLoss in the graph: nothing to fuse, the same values
    as torch's."""
    shape, class_axis = LAYOUTS["2d"]
    rng = np.random.default_rng(2)
    weights = rng.uniform(0.2, 3.0, shape[1]) if weighted else None
    tm, info = _case(shape, class_axis, 0.2, weights, np.float64, opset=12)
    x, w = rng.standard_normal(shape), np.ones(shape)
    labels = _labels(rng, shape, class_axis, "some")
    loss, grad, ops = _run(tm, info, x, w, labels)
    assert "SoftmaxCrossEntropyGrad" not in ops
    t_loss, t_grad = _torch(x, w, labels, class_axis, 0.2, weights)
    _close(np.asarray(loss), np.asarray(t_loss), np.float64, "loss")
    _close(grad, t_grad, np.float64, "gradient")


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_the_weighted_smoothed_gradient_kernel_is_its_numpy_form(monkeypatch, compiled):
    """The [N, C] host backward (one compiled pass where numba is on) gives the N-D NumPy
    form's bits, run on the same values as [N, C, 1]."""
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", compiled)
    rng = np.random.default_rng(9)
    for dtype in (np.float32, np.float64):
        s = (rng.standard_normal((9, 7)) * 3).astype(dtype)
        lab = rng.integers(0, 7, 9)
        lab[2] = -100
        weights, q = rng.uniform(0, 2, 7).astype(dtype), rng.uniform(0, 2, 7).astype(dtype)
        loss, lp, mean = fused.softmax_cross_entropy_forward(np, s, lab, weights, q,
                                                             ignore_index=-100, mean=True)
        dmean = rng.standard_normal(9).astype(dtype)
        seed = np.asarray(0.5, dtype)
        (dx,) = fused.softmax_cross_entropy_backward(np, lp, lab, seed, weights, q, dmean,
                                                     ignore_index=-100)
        (want,) = fused.softmax_cross_entropy_backward(
            np, lp[:, :, None].copy(), lab[:, None], seed, weights, q.reshape(7, 1),
            dmean[:, None], ignore_index=-100)
        np.testing.assert_array_equal(dx, want[:, :, 0])
        np.testing.assert_allclose(mean, (lp * q).mean(axis=1), rtol=1e-5)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_shape_labels_and_weights_fuse_to_the_interpreters_values(data):
    """Property: random [N, C, d...] logits (class axis 1 or last), ignore_index inside or
    outside the classes, labels ignored at random, weights with zeros, any smoothing: the fused
    plan's loss and gradient are the interpreter's (float64)."""
    rank = data.draw(st.integers(2, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    class_axis = data.draw(st.sampled_from([1, -1]))
    c = shape[class_axis]
    eps = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    weighted = data.draw(st.booleans())
    ignore_index = data.draw(st.sampled_from([-100, 0, c - 1]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    weights = None
    if weighted:
        weights = rng.uniform(0, 2, c) * (rng.random(c) < 0.8)
    tm, info = _case(shape, class_axis, eps, weights, np.float64, ignore_index=ignore_index)
    x = rng.standard_normal(shape) * 3
    w = np.ones(shape)
    labels = _labels(rng, shape, class_axis, data.draw(st.sampled_from(["none", "some"])),
                     ignore_index)
    seed = data.draw(st.sampled_from([None, 2.0]))
    loss, grad, ops = _run(tm, info, x, w, labels, seed)
    want_loss, want_grad, _ = _run(tm, info, x, w, labels, seed, optimize=False)
    assert "SoftmaxCrossEntropyGrad" in ops
    _close(np.asarray(loss), np.asarray(want_loss), np.float64, "loss")
    _close(grad, want_grad, np.float64, "gradient")


@needs_cc
@pytest.mark.parametrize("shape", [(7, 5), (4, 5, 3)])
def test_the_device_path_gives_the_hosts_values(monkeypatch, shape):
    """On a device (the stand-in's generated kernels), the weighted, smoothed forward and
    backward give the host's values."""
    gpu = ckernels.install(monkeypatch)
    rng = np.random.default_rng(4)
    s = rng.standard_normal(shape).astype(np.float32)
    lab = rng.integers(0, 5, (shape[0],) + shape[2:])
    lab.reshape(-1)[0] = -100
    weights, q = rng.uniform(0, 2, 5).astype(np.float32), rng.uniform(0, 2, 5).astype(np.float32)
    dmean = rng.standard_normal(lab.shape).astype(np.float32)
    seed = np.asarray(0.5, np.float32)
    qs = q.reshape((5,) + (1,) * (len(shape) - 2))
    want = fused.softmax_cross_entropy_forward(np, s, lab, weights, qs, ignore_index=-100,
                                               mean=True)
    got = fused.softmax_cross_entropy_forward(gpu, gpu.asarray(s), gpu.asarray(lab),
                                              gpu.asarray(weights), gpu.asarray(qs),
                                              ignore_index=-100, mean=True)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(gpu.asnumpy(g), w, rtol=1e-5, atol=1e-6)
    (dx,) = fused.softmax_cross_entropy_backward(np, want[1], lab, seed, weights, qs, dmean,
                                                 ignore_index=-100)
    (gx,) = fused.softmax_cross_entropy_backward(
        gpu, gpu.asarray(want[1]), gpu.asarray(lab), gpu.asarray(seed), gpu.asarray(weights),
        gpu.asarray(qs), gpu.asarray(dmean), ignore_index=-100)
    np.testing.assert_allclose(gpu.asnumpy(gx), dx, rtol=1e-5, atol=1e-7)
