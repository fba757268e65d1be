"""The appended losses through the whole Trainer, against PyTorch: mse, cross_entropy on
[B, T, V] logits (class_axis -1) and on [N, C, L] logits (class_axis 1)."""

from __future__ import annotations

import io
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trainer.config import config_from_dict
from trainer.errors import DataError
from trainer.train import Trainer


def linear_model(path, in_shape, w_shape, out_shape, perm=None, opset=18):
    """y = x @ w + b (then an optional Transpose), float32, symbolic batch."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=w_shape).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.normal(size=w_shape[-1:]).astype(np.float32) * 0.1, "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["y0" if perm else "y"])]
    if perm:
        nodes.append(helper.make_node("Transpose", ["y0"], ["y"], perm=perm))
    g = helper.make_graph(nodes, "lin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [w, b])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), path)
    return {"w": numpy_helper.to_array(w), "b": numpy_helper.to_array(b)}


def run_both(tmp_path, loss, x, t, init, torch_loss, perm=None, steps=5, lr=0.1):
    np.savez(tmp_path / "d.npz", x=x, t=t)
    cfg = config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "precision": "fp64", "device": "cpu",
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"target": "t"}},
                 "batch_size": 8, "shuffle": False},
        "loss": {"target": "target", "output": "y", **loss},
        "optimizer": {"type": "sgd", "lr": lr}, "steps": steps, "log": {"every_steps": 1}},
        tmp_path)
    trainer = Trainer(cfg, stream=io.StringIO())
    trainer.fit()
    w = torch.tensor(init["w"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(init["b"], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr)
    losses = []
    for s in range(steps):
        xb = torch.tensor(x[s * 8:(s + 1) * 8], dtype=torch.float64)
        tb = torch.tensor(t[s * 8:(s + 1) * 8])
        y = xb @ w + b
        if perm:
            y = y.permute(*perm)
        out = torch_loss(y, tb)
        opt.zero_grad()
        out.backward()
        opt.step()
        losses.append(out.item())
    ours = [r["loss"] for r in trainer.history if "loss" in r]
    np.testing.assert_allclose(ours, losses, rtol=1e-10)
    values = trainer.trained_values()
    np.testing.assert_allclose(values["w"], w.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(values["b"], b.detach().numpy(), rtol=1e-10, atol=1e-12)
    return trainer, (w, b)


def test_mse(tmp_path):
    init = linear_model(tmp_path / "m.onnx", ["N", 6], (6, 3), ["N", 3])
    rng = np.random.default_rng(1)
    run_both(tmp_path, {"type": "mse"}, rng.normal(size=(40, 6)).astype(np.float32),
             rng.normal(size=(40, 3)).astype(np.float32), init,
             lambda y, t: torch.nn.functional.mse_loss(y, t.double()))


@pytest.mark.parametrize("axis", [-1, 2])
def test_cross_entropy_sequence_logits(tmp_path, axis):
    init = linear_model(tmp_path / "m.onnx", ["N", 5, 6], (6, 7), ["N", 5, 7])
    rng = np.random.default_rng(2)
    run_both(tmp_path, {"type": "cross_entropy", "class_axis": axis},
             rng.normal(size=(40, 5, 6)).astype(np.float32), rng.integers(0, 7, (40, 5)), init,
             lambda y, t: torch.nn.functional.cross_entropy(y.permute(0, 2, 1), t))


def test_cross_entropy_class_axis_1(tmp_path):
    init = linear_model(tmp_path / "m.onnx", ["N", 5, 6], (6, 7), ["N", 7, 5], perm=[0, 2, 1])
    rng = np.random.default_rng(3)
    run_both(tmp_path, {"type": "cross_entropy", "class_axis": 1},
             rng.normal(size=(40, 5, 6)).astype(np.float32), rng.integers(0, 7, (40, 5)), init,
             lambda y, t: torch.nn.functional.cross_entropy(y, t), perm=(0, 2, 1))


@pytest.mark.parametrize("opset", [12, 18])
@pytest.mark.parametrize("eps,weighted", [(0.2, False), (1.0, False), (0.0, True),
                                          (0.3, True)])
def test_label_smoothing_and_class_weights_are_torchs(tmp_path, opset, eps, weighted):
    """loss.label_smoothing and loss.weight as torch's cross_entropy(weight=...,
    label_smoothing=eps): training (with ignored positions, SoftmaxCrossEntropyLoss's form
    and the one before opset 13) and the evaluation loss of the trained weights."""
    init = linear_model(tmp_path / "m.onnx", ["N", 5, 6], (6, 7), ["N", 5, 7], opset=opset)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 5, 6)).astype(np.float32)
    t = rng.integers(0, 7, (40, 5))
    t[rng.random((40, 5)) < 0.3] = -100
    weight = [0.5, 2.0, 0.0, 1.0, 3.5, 0.25, 1.5] if weighted else None

    def smoothed(y, tb):
        return torch.nn.functional.cross_entropy(
            y.permute(0, 2, 1), tb, label_smoothing=eps,
            weight=None if weight is None else torch.tensor(weight, dtype=torch.float64))

    trainer, (w, b) = run_both(tmp_path, {"type": "cross_entropy", "label_smoothing": eps,
                                          "weight": weight}, x, t, init, smoothed)
    got = trainer.evaluate({"x": x, "target": t})["eval_loss"]
    want = smoothed(torch.tensor(x, dtype=torch.float64) @ w + b, torch.tensor(t)).item()
    assert got == pytest.approx(want, rel=1e-10)
    if weighted:  # (every label of weight 0: a mean over no weight, torch's NaN; it was 0)
        with pytest.raises(DataError, match="every label of target 'target' is -100, "
                                            "loss.ignore_index or of a class whose "
                                            "loss.weight is 0: no position counts"):
            trainer.evaluate({"x": x, "target": np.where(t == -100, -100, 2)})


def _fit_cross_entropy(tmp_path, x, t, eps, weight, **over) -> Trainer:
    """Two fp64 SGD steps of m.onnx (output y) on x and labels t, in order, with
    label_smoothing `eps` and class weights `weight`; `over`: other config keys."""
    np.savez(tmp_path / "d.npz", x=x, t=t)
    raw = {"model": "m.onnx", "output": "out.onnx", "precision": "fp64", "device": "cpu",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                              "targets": {"label": "t"}}, "shuffle": False,
                    "batch_size": over.pop("batch_size")},
           "loss": {"type": "cross_entropy", "output": "y", "target": "label",
                    "label_smoothing": eps, "weight": weight},
           "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 2, "log": {"every_steps": 1},
           **over}
    trainer = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    trainer.fit()
    return trainer


@pytest.mark.parametrize("case,opset,eps", [("ignored", 11, 0.0), ("weight 0", 11, 0.2),
                                             ("weight 0", 17, 0.2), ("whole batch", 17, 0.2)])
def test_a_micro_batch_whose_labels_do_not_count_trains_as_torchs_whole_batch(tmp_path, case,
                                                                             opset, eps):
    """accumulate 2 on a BatchNorm model, the first micro-batch's labels all ignored or of a
    weight-0 class: before opset 13 its loss divided 0 by 0, a NaN that reached the gradients
    (the micro-batch runs for its statistics); with label_smoothing, its labels' smoothing
    term was left out, where torch counts it over the whole batch's weights."""
    rng = np.random.default_rng(0)
    w1, w2 = (np.float32(rng.normal(size=s) * 0.5).astype(np.float64) for s in ((6, 8), (8, 4)))
    x, t = rng.normal(size=(16, 6)).astype(np.float32), rng.integers(0, 4, 16)
    t[0:4] = -100 if case == "ignored" else 2
    if case == "whole batch":  # (the first step's: torch's mean is NaN; a ZeroDivisionError)
        t[0:8] = 2
    weight = [1.0, 0.5, 0.0, 2.0]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", w1), ("w2", w2), ("g", np.ones(8)), ("b", np.zeros(8)), ("m", np.zeros(8)),
        ("v", np.ones(8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["hn"]),
             helper.make_node("Relu", ["hn"], ["r"]), helper.make_node("MatMul", ["r", "w2"],
                                                                        ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]),
              tmp_path / "m.onnx")
    trainer = _fit_cross_entropy(tmp_path, x, t, eps, weight, batch_size=4, accumulate=2)
    if case == "whole batch":
        assert trainer.history[0]["loss"] == 0.0
        assert "step 1: every label of its batch is loss.ignore_index (-100) or of a class " \
            "whose loss.weight is 0: nothing to learn, update skipped" \
            in trainer.log.stream.getvalue()
        return
    p = [torch.tensor(a, requires_grad=True) for a in (w1, w2, np.ones(8), np.zeros(8))]
    opt, want = torch.optim.SGD(p, lr=0.1), []
    for s in range(2):  # (BatchNorm's statistics per micro-batch of 4, as accumulate's)
        xb = torch.tensor(x[s * 8:(s + 1) * 8], dtype=torch.float64)
        ys = [torch.relu(torch.nn.functional.batch_norm(xb[h] @ p[0], None, None, p[2], p[3],
                                                        training=True)) @ p[1]
              for h in (slice(0, 4), slice(4, 8))]
        loss = torch.nn.functional.cross_entropy(
            torch.cat(ys), torch.tensor(t[s * 8:(s + 1) * 8]), label_smoothing=eps,
            weight=torch.tensor(weight, dtype=torch.float64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    np.testing.assert_allclose([r["loss"] for r in trainer.history if "loss" in r], want,
                               rtol=1e-10)
    np.testing.assert_allclose(trainer.trained_values()["w1"], p[0].detach().numpy(),
                               rtol=1e-9, atol=1e-12)


def test_a_weight_0_class_whose_probability_is_0_adds_nothing_to_the_eval_loss():
    """An output of probabilities is evaluated as their logarithm: a class of weight 0 whose
    probability underflows to 0 made the smoothing term -inf * 0, NaN."""
    from trainer.train import _loss_sums

    spec = config_from_dict({"model": "m.onnx", "steps": 1, "data": {"train": {
        "path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}}},
        "loss": {"type": "cross_entropy", "output": "p", "target": "label",
                 "label_smoothing": 0.1, "weight": [1.0, 1.0, 0.0]}}, "/tmp").loss
    logits = np.array([[1.0, 0.0, -2000.0], [0.5, 1.0, -1000.0]])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert (p[:, 2] == 0).all()
    sums = _loss_sums(spec, p, np.array([0, 1]), 2, probabilities=True)
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits), torch.tensor([0, 1]), label_smoothing=0.1,
        weight=torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)).item()
    assert sums[0] / sums[3] == pytest.approx(want, rel=1e-12)


def test_a_step_whose_labels_all_weigh_nothing_is_skipped_whatever_its_values(tmp_path):
    """label_smoothing and loss.weight, a batch of weight-0 labels only, and a sample whose
    product overflows: the step was run for the labels' smoothing term (with no weight to
    divide by: a NaN loss, or a ZeroDivisionError in the diagnosis) where it counts nothing."""
    linear_model(tmp_path / "m.onnx", ["N", 6], (6, 4), ["N", 4])
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(16, 6)), rng.integers(0, 4, 16)
    t[:8], x[0] = 2, 1e308
    trainer = _fit_cross_entropy(tmp_path, x, t, 0.1, [1.0, 1.0, 0.0, 1.0], batch_size=8)
    assert trainer.history[0]["loss"] == 0.0 and np.isfinite(trainer.history[1]["loss"])


def test_labels_that_fit_another_class_axis_say_which(tmp_path):
    """A segmentation model's [N, classes, ...] output with labels [N, ...] and the default
    class axis (the last): the error names the axis that fits (torchvision's lraspp)."""
    from trainer.errors import DataError

    linear_model(tmp_path / "m.onnx", ["N", 5, 6], (6, 7), ["N", 7, 5], perm=[0, 2, 1])
    rng = np.random.default_rng(3)
    with pytest.raises(DataError, match=r"set loss.class_axis: 1\)"):
        run_both(tmp_path, {"type": "cross_entropy"}, rng.normal(size=(40, 5, 6)).astype(
            np.float32), rng.integers(0, 7, (40, 5)), {}, None)


@pytest.mark.parametrize("shape,warned", [((5, 5), True), ((5, 6), False)])
def test_a_square_output_without_class_axis_is_warned_of(tmp_path, shape, warned):
    """[N, C, L] with C == L, torch's layout, and no class_axis: the default (the last axis)
    takes the classes from L, and the labels [N, L] fit either way: a different loss from
    torch's, silently. A warning says so now."""
    linear_model(tmp_path / "m.onnx", ["N", shape[1], shape[0]], (shape[0], shape[0]),
                 ["N", shape[0], shape[1]], perm=[0, 2, 1])
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(16, shape[1], shape[0])).astype(np.float32),
             t=rng.integers(0, min(shape), (16, shape[1] if shape[0] == shape[1] else shape[0])))
    out = io.StringIO()
    cfg = config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 1,
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"target": "t"}},
                 "batch_size": 8},
        "loss": {"type": "cross_entropy", "target": "target", "output": "y"}}, tmp_path)
    Trainer(cfg, stream=out)
    assert ("warning: loss.class_axis -1: the classes of 'y' [8, 5, 5] are taken on its last "
            "axis; axis 1 has as many entries" in out.getvalue()) == warned, out.getvalue()


@pytest.mark.parametrize("axis", [0, -3])
def test_a_class_axis_on_the_batch_axis_is_refused_before_training(tmp_path, axis):
    """class_axis 0 is the batch axis: refused with the axis that holds classes (it was a
    Transpose with a repeated axis, failing in the first step)."""
    from trainer.errors import ModelError

    linear_model(tmp_path / "m.onnx", ["N", 5, 6], (6, 7), ["N", 7, 5], perm=[0, 2, 1])
    rng = np.random.default_rng(3)
    with pytest.raises(ModelError, match=r"class_axis -?\d is axis 0 of 'y' \(shape \[\d+, 7, "
                       r"5\] for this batch\), which the loss takes as the batch axis"
                       r".*the axis that holds the classes"):
        run_both(tmp_path, {"type": "cross_entropy", "class_axis": axis}, rng.normal(
            size=(40, 5, 6)).astype(np.float32), rng.integers(0, 7, (40, 5)), {}, None)


def test_cross_entropy_eval_loss_of_a_softmax_output_is_the_trained_loss(tmp_path):
    """A classifier ending in Softmax trains on the Softmax's input, and evaluation reports the
    same loss: the probabilities' log, not a second log-softmax (torch's cross_entropy on the
    logits)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "precision": "fp64",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "probs", "target": "t"},
           "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 2}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    result = t.fit()
    trained = torch.tensor(t.trained_values()["W"], dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(torch.tensor(x, dtype=torch.float64) @ trained,
                                             torch.tensor(y))
    assert result["eval_loss"] == pytest.approx(float(want), rel=1e-9)


@pytest.mark.parametrize("tail", ["transpose", "cast_transpose", "identity"])
def test_a_softmax_under_a_layout_change_trains_on_its_logits(tmp_path, tail):
    """Softmax over axis 1 of [N, C, T] then Transpose to [N, T, C] (tf2onnx's layout), with a
    float Cast or an Identity between: cross entropy on class_axis 2 trains on the logits laid
    out as the output (torch's cross_entropy on them), not on the probabilities (a second
    softmax, whose gradients vanish); evaluation reports the same loss."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((5, 4)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),  # [N, T, C]
             helper.make_node("Transpose", ["h"], ["logits"], perm=[0, 2, 1]),  # [N, C, T]
             helper.make_node("Softmax", ["logits"], ["p"], axis=1)]
    if tail == "transpose":
        nodes.append(helper.make_node("Transpose", ["p"], ["probs"], perm=[0, 2, 1]))
    elif tail == "cast_transpose":
        nodes += [helper.make_node("Cast", ["p"], ["p64"], to=TensorProto.DOUBLE),
                  helper.make_node("Transpose", ["p64"], ["p64t"], perm=[0, 2, 1]),
                  helper.make_node("Cast", ["p64t"], ["probs"], to=TensorProto.FLOAT)]
    else:
        nodes += [helper.make_node("Identity", ["p"], ["pt"]),
                  helper.make_node("Transpose", ["pt"], ["probs"], perm=[0, 2, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 6, 5])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                         ["N", 6, 4])],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    x = rng.standard_normal((16, 6, 5)).astype(np.float32)
    y = rng.integers(0, 4, (16, 6))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "precision": "fp64",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "batch_size": 8, "shuffle": False},
           "loss": {"type": "cross_entropy", "output": "probs", "target": "t", "class_axis": 2},
           "optimizer": {"type": "sgd", "lr": 0.5}, "steps": 4, "log": {"every_steps": 1}}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    result = t.fit()
    ours = [r["loss"] for r in t.history if "loss" in r]
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)

    def loss_of(xb, yb):  # (logits [N, T, C] -> [N, C, T])
        logits = torch.tensor(xb, dtype=torch.float64) @ wt
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(yb))
    want, want_eval = _torch_sgd([wt], loss_of, x, y, lr=0.5)
    np.testing.assert_allclose(ours, want, rtol=1e-9)
    np.testing.assert_allclose(t.trained_values()["W"], wt.detach().numpy(), rtol=1e-9)
    assert result["eval_loss"] == pytest.approx(want_eval, rel=1e-6)


def _torch_sgd(params, loss_of, x, y, steps=4, batch=8, lr=0.5):
    """([the losses of `steps` SGD steps over the batches of x, y in order], the loss on all of
    x, y after them), as the engine's runs above (shuffle off)."""
    opt = torch.optim.SGD(params, lr=lr)
    want = []
    for step in range(steps):
        lo = (step % (len(x) // batch)) * batch
        loss = loss_of(x[lo:lo + batch], y[lo:lo + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    with torch.no_grad():
        return want, float(loss_of(x, y))


def _sigmoid_model(path, w, b, hand_written: bool, tail: str | None = None):
    """x [N, 4] @ W + b -> Sigmoid (or 1 / (1 + exp(-z)) written out) -> probs [N, 3]; with
    `tail`, float Casts and an Identity after the Sigmoid."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["z"])]
    if hand_written:
        nodes += [helper.make_node("Neg", ["z"], ["nz"]), helper.make_node("Exp", ["nz"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["d"]),
                  helper.make_node("Reciprocal", ["d"], ["probs"])]
    elif tail == "none":  # (logits: no Sigmoid at all)
        nodes.append(helper.make_node("Identity", ["z"], ["probs"]))
    elif tail:
        nodes += [helper.make_node("Sigmoid", ["z"], ["p"]),
                  helper.make_node("Cast", ["p"], ["p64"], to=TensorProto.DOUBLE),
                  helper.make_node("Identity", ["p64"], ["p64i"]),
                  helper.make_node("Cast", ["p64i"], ["probs"], to=TensorProto.FLOAT)]
    else:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["probs"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 4])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
                           numpy_helper.from_array(np.array(1, np.float32), "one")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("form", ["sigmoid", "sigmoid_cast", "probabilities", "logits"])
@pytest.mark.parametrize("soft", [False, True])
def test_binary_cross_entropy_is_torchs(tmp_path, form, soft):
    """`loss.type: bce` (multi-label / binary targets in [0, 1], the output's shape): on a model
    ending in Sigmoid (also through Casts and Identities) it trains on the logits as
    torch's binary_cross_entropy_with_logits; on probabilities computed otherwise, as torch's
    binary_cross_entropy. Same weights and batches, SGD: losses, weights, evaluation loss."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((4, 3)) * 0.8).astype(np.float32)
    b = (rng.standard_normal(3) * 0.1).astype(np.float32)
    _sigmoid_model(tmp_path / "m.onnx", w, b, form == "probabilities",
                   {"sigmoid_cast": "cast", "logits": "none"}.get(form))
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = (rng.random((16, 3)) if soft else rng.integers(0, 2, (16, 3))).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}}
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "precision": "fp64",
           "data": {"train": ds, "eval": ds, "batch_size": 8, "shuffle": False},
           "loss": {"type": "bce", "output": "probs", "target": "t",
                    **({"logits": True} if form == "logits" else {})},
           "optimizer": {"type": "sgd", "lr": 0.5}, "steps": 4, "log": {"every_steps": 1}}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    result = t.fit()
    ours = [r["loss"] for r in t.history if "loss" in r]
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)

    def loss_of(xb, yb):
        z = torch.tensor(xb, dtype=torch.float64) @ wt + bt
        if form == "probabilities":
            return torch.nn.functional.binary_cross_entropy(torch.sigmoid(z), torch.tensor(
                yb, dtype=torch.float64))
        return torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(
            yb, dtype=torch.float64))
    want, want_eval = _torch_sgd([wt, bt], loss_of, x, y, lr=0.5)
    np.testing.assert_allclose(ours, want, rtol=1e-9)
    np.testing.assert_allclose(t.trained_values()["W"], wt.detach().numpy(), rtol=1e-9)
    assert result["eval_loss"] == pytest.approx(want_eval, rel=1e-9)
    from trainer.autodiff import build_training_graph
    tm = build_training_graph(onnx.load(str(tmp_path / "m.onnx")),
                              config_from_dict(raw, tmp_path).loss, batch_size=2)
    ops = {n.op_type for n in tm.graph.node if n.name.startswith("loss")}
    assert ("Softplus" in ops) == (form != "probabilities"), ops  # (logits where it can)


def test_bce_on_probabilities_of_exactly_zero_and_one_trains_as_torch(tmp_path):
    """bce on probabilities p = x W (no Sigmoid) that are exactly 0 and 1 for some samples,
    with soft targets: torch's loss clamps each log at -100 and its gradient is (p - t) /
    max(p (1 - p), 1e-12), finite; the graph's own derivative there is 0 * inf (NaN: the run
    stopped at step 1). fp64, SGD: per-step losses and weights as torch."""
    rng = np.random.default_rng(12)
    x = np.stack([rng.uniform(0.2, 0.8, 16), rng.uniform(-0.1, 0.1, 16)], 1)
    x[0], x[1] = [1.0, 0.0], [0.0, 0.0]  # p exactly 1 and 0 at the start
    x = x.astype(np.float32)
    y = rng.uniform(0.1, 0.9, (16, 1)).astype(np.float32)
    w = np.array([[1.0], [0.0]], np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["probs"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = _bce_config() | {"precision": "fp64", "steps": 3, "log": {"every_steps": 1},
                           "optimizer": {"type": "sgd", "lr": 1e-12}}
    raw["data"] = raw["data"] | {"batch_size": 16, "shuffle": False}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    ours = [r["loss"] for r in t.history if "loss" in r]
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)

    def loss_of(xb, yb):
        probs = torch.tensor(xb, dtype=torch.float64) @ wt
        return torch.nn.functional.binary_cross_entropy(probs, torch.tensor(
            yb, dtype=torch.float64))
    want, _ = _torch_sgd([wt], loss_of, x, y, lr=1e-12, batch=16, steps=3)
    assert want[0] > 3 and abs(float(wt.detach()[0, 0]) - 1) > 1e-3  # (a saturated start)
    np.testing.assert_allclose(ours, want, rtol=1e-9)
    np.testing.assert_allclose(t.trained_values()["W"], wt.detach().numpy(), rtol=1e-7)


def _bce_config() -> dict:
    """One step of bce on 'probs' of m.onnx, targets 'y' of d.npz, batch 8."""
    return {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 1,
            "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                     "batch_size": 8},
            "loss": {"type": "bce", "output": "probs", "target": "t"}}


def test_bce_on_logits_without_the_flag_says_to_set_it(tmp_path):
    """loss bce on an output that holds logits (no Sigmoid at the end): NaN at step 1, and the
    error said only 'lower optimizer.lr, set grad_clip, or on_nan: skip'."""
    from trainer.errors import TrainerError

    _sigmoid_model(tmp_path / "m.onnx", -np.ones((4, 3), np.float32), np.zeros(3, np.float32),
                   False, "none")
    np.savez(tmp_path / "d.npz", x=np.ones((8, 4), np.float32), y=np.zeros((8, 3), np.float32))
    raw = _bce_config()
    with pytest.raises(TrainerError, match="loss bce takes probabilities in \\[0, 1\\]: if "
                                           "'probs' holds logits .* set loss.logits: true"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()


def test_bce_targets_outside_zero_one_are_named_before_training(tmp_path):
    from trainer.errors import TrainerError

    _sigmoid_model(tmp_path / "m.onnx", np.ones((4, 3), np.float32), np.zeros(3, np.float32),
                   False)
    y = np.zeros((8, 3), np.float32)
    y[5, 2] = 1.5
    np.savez(tmp_path / "d.npz", x=np.ones((8, 4), np.float32), y=y)
    raw = _bce_config()
    with pytest.raises(TrainerError, match="target 't' holds 1.5 at sample 5: binary cross "
                                           "entropy takes targets in \\[0, 1\\]"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("opset", [1, 4, 5, 13])
def test_loss_type_output_at_every_opset(opset: int) -> None:
    """Loss type 'output' on a scalar output, at opsets where Reshape takes its shape as an
    attribute (below 5: the scalar's shape is an empty INTS attribute) and as an input:
    dL/dW of L = sum(x W) is x^T times ones."""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.executor import Executor

    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("L", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4
    tm = build_training_graph(model, {"type": "output", "output": "L"}, batch_size=1)
    onnx.checker.check_model(tm)
    x = np.array([[1.0, -2.0, 0.5]], np.float32)
    info = training_info(tm)
    out = Executor(tm, np).run({"x": x})
    np.testing.assert_allclose(out[info.gradients["W"]], x.T @ np.ones((1, 2), np.float32))
    np.testing.assert_allclose(out[info.loss], (x @ w).sum(), rtol=1e-6)


@pytest.mark.parametrize("op,opset,axis,want", [
    ("Softmax", 13, 1, "'y' is a Softmax's probabilities over axis 1, but loss.class_axis is "
                       "-1: cross entropy would read them as logits; set loss.class_axis to "
                       "the output's axis of the classes (1)"),
    ("LogSoftmax", 13, 1, "'y' is a LogSoftmax's log-probabilities over axis 1"),
    ("Softmax", 11, 1, "over axes 1 to 2 together (Softmax below opset 13 flattens them)"),
    ("Softmax", 13, -1, None), ("Softmax", 11, 2, None), ("LogSoftmax", 13, 2, None),
    ("Softmax", 11, "squeezenet", None)])
def test_cross_entropy_on_a_softmax_over_another_axis_is_refused(op, opset, axis, want):
    """A model ending in a Softmax over an axis that is not the loss's class axis: cross
    entropy read its probabilities as logits (a second softmax; 1.50 where the log-likelihood
    of the output's probabilities is 1.78). Over the class axis it trains on the logits."""
    from trainer.autodiff import build_training_graph
    from trainer.errors import ModelError

    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    shape = [3, 4]
    loss = {"type": "cross_entropy", "output": "y", "target": "label"}
    if axis == "squeezenet":  # (its Softmax over axes 1 to 3 of [N, 1000, 1, 1]: the classes)
        shape, axis, loss["class_axis"] = [4, 1, 1], 1, 1
        w = w.reshape(4, 4, 1, 1)
    mm = "Conv" if len(shape) == 3 else "MatMul"
    g = helper.make_graph([helper.make_node(mm, ["x", "W"], ["h"]),
                           helper.make_node(op, ["h"], ["y"], axis=axis)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"] + shape)],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if want is None:
        from trainer.autodiff import training_info
        from trainer.executor import Executor

        tm = build_training_graph(m, loss, "all", batch_size=2)
        # over the class axis: the loss is cross entropy of the Softmax's input, the logits
        rng = np.random.default_rng(1)
        x = rng.standard_normal([2] + shape).astype(np.float32)
        k = axis % (len(shape) + 1)
        labels = rng.integers(0, shape[k - 1], [2] + [d for i, d in enumerate(shape, 1)
                                                      if i != k])
        h = Executor(m, np).run({"x": x})["y"] if op == "LogSoftmax" else \
            Executor(helper.make_model(helper.make_graph(
                [g.node[0]], "h", list(g.input),
                [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
                list(g.initializer)), opset_imports=m.opset_import), np).run({"x": x})["h"]
        want = torch.nn.functional.cross_entropy(
            torch.from_numpy(np.moveaxis(h, k, 1).copy()), torch.from_numpy(labels)).item()
        got = Executor(tm, np).run({"x": x, "label": labels})[training_info(tm).loss]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    else:
        with pytest.raises(ModelError, match=re.escape(want)):
            build_training_graph(m, loss, "all", batch_size=2)


def test_bce_with_logits_on_a_sigmoids_output_is_refused(tmp_path):
    """`loss.logits: true` on a model ending in Sigmoid applied a second sigmoid (0.689 where
    torch's binary cross entropy of that output is 0.744), silently."""
    from trainer.autodiff import build_training_graph
    from trainer.errors import ModelError

    rng = np.random.default_rng(1)
    _sigmoid_model(tmp_path / "m.onnx", rng.standard_normal((4, 3)).astype(np.float32),
                   np.zeros(3, np.float32), False, "cast")
    m = onnx.load(str(tmp_path / "m.onnx"))
    with pytest.raises(ModelError, match="'probs' is a Sigmoid's output .*leave logits out"):
        build_training_graph(m, {"type": "bce", "output": "probs", "target": "t",
                                 "from_logits": True}, "all", batch_size=2)


def test_a_fixed_batch_models_own_loss_is_evaluated_over_the_real_samples(tmp_path):
    """loss.type output on a model of a fixed batch of 16, 100 eval samples: the last chunk
    runs padded with copies of its last sample, and the model's one mean over the padded batch
    was counted for the 4 real samples (3.2948 where the mean is 3.3617). The copies' loss,
    taken from a batch of that sample alone, comes out: the mean a dynamic batch gives."""
    from tests.conftest import EXAMPLES

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((10, 64)) * 0.3).astype(np.float32)
    for name, n in (("fixed16", 16), ("dynamic", "N")):
        g = helper.make_graph(
            [helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1),
             helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "label"], ["loss"],
                              reduction="mean")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 64]),
             helper.make_tensor_value_info("label", TensorProto.INT64, [n])],
            [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
            [numpy_helper.from_array(W, "W")])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / f"{name}.onnx")
    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "d.npz", x=d["x_train"][:160], y=d["y_train"][:160],
             xt=d["x_test"][:100], yt=d["y_test"][:100])
    got = {}
    for name in ("fixed16", "dynamic"):
        cfg = config_from_dict({
            "model": f"{name}.onnx", "device": "cpu", "steps": 1,
            "data": {"train": {"path": "d.npz", "inputs": {"x": "x", "label": "y"}},
                     "eval": {"path": "d.npz", "inputs": {"x": "xt", "label": "yt"}},
                     "batch_size": 16},
            "loss": {"type": "output", "output": "loss"},
            "optimizer": {"type": "sgd", "lr": 0.01}}, tmp_path)
        got[name] = Trainer(cfg, stream=io.StringIO(), writes=False).evaluate()["eval_loss"]
    logits = d["x_test"][:100].astype(np.float64) @ W.T.astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    want = -logp[np.arange(100), d["y_test"][:100]].mean()
    np.testing.assert_allclose(got["dynamic"], want, rtol=1e-5)
    np.testing.assert_allclose(got["fixed16"], want, rtol=1e-5)


def _softmax_chain_model(kind: str, W: np.ndarray, T: int) -> onnx.ModelProto:
    """x [N, T, F] @ W -> logits [N, T, C] -> probabilities `probs` [N, T, C], through a
    Softmax per time step Unsqueezed, Concatenated and Transposed back (tf2onnx's unrolled
    TimeDistributed(Dense(softmax))), or a Softmax over [N*T, C] Reshaped back."""
    C = W.shape[1]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"])]
    inits = [numpy_helper.from_array(W, "W"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    if kind == "per_step":
        parts = []
        for t in range(T):
            inits += [numpy_helper.from_array(np.array([t], np.int64), f"s{t}"),
                      numpy_helper.from_array(np.array([t + 1], np.int64), f"e{t}")]
            nodes += [helper.make_node("Slice", ["logits", f"s{t}", f"e{t}", "ax1"], [f"l{t}"]),
                      helper.make_node("Squeeze", [f"l{t}", "ax1"], [f"q{t}"]),
                      helper.make_node("Softmax", [f"q{t}"], [f"p{t}"], axis=-1),
                      helper.make_node("Unsqueeze", [f"p{t}", "ax0"], [f"u{t}"])]
            parts.append(f"u{t}")
        nodes += [helper.make_node("Concat", parts, ["stack"], axis=0),
                  helper.make_node("Transpose", ["stack"], ["probs"], perm=[1, 0, 2])]
    else:
        inits += [numpy_helper.from_array(np.array([-1, C], np.int64), "flat"),
                  numpy_helper.from_array(np.array([-1, T, C], np.int64), "back")]
        nodes += [helper.make_node("Reshape", ["logits", "flat"], ["l2"]),
                  helper.make_node("Softmax", ["l2"], ["p2"], axis=-1),
                  helper.make_node("Reshape", ["p2", "back"], ["probs"])]
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", T, W.shape[0]])], [helper.make_tensor_value_info(
            "probs", TensorProto.FLOAT, ["N", T, C])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("loss", ["cross_entropy", "ctc"])
@pytest.mark.parametrize("kind", ["per_step", "reshaped"])
def test_softmax_probabilities_reached_through_concat_or_reshape_train_on_their_logits(
        tmp_path, kind, loss):
    """A Softmax per time step joined by a Concat (tf2onnx's TimeDistributed softmax tagger)
    or a Softmax over [N*T, C] reshaped back: cross entropy and ctc took the probabilities as
    logits, a second softmax (step-1 loss 1.6104 where Keras and onnxruntime give 1.6168),
    in training and evaluation, silently (found by an other-exporters sweep). They train
    and evaluate on the logits, as a Softmax at the end does."""
    N, T, F, C = 16, 3, 5, 4
    rng = np.random.default_rng(0)
    W = (2 * rng.standard_normal((F, C))).astype(np.float32)
    x = rng.standard_normal((N, T, F)).astype(np.float32)
    onnx.save(_softmax_chain_model(kind, W, T), tmp_path / "m.onnx")
    if loss == "ctc":
        y = np.full((N, 2), -1, np.int64)
        y[:, 0] = rng.integers(1, C, N)
    else:
        y = rng.integers(0, C, (N, T))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = config_from_dict({
        "model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 1,
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": N, "shuffle": False},
        "loss": {"type": loss, "output": "probs", "target": "label"},
        "optimizer": {"type": "sgd", "lr": 0.1}, "log": {"every_steps": 1}}, tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    before = t.evaluate()["eval_loss"]
    t.fit()
    first = next(r["loss"] for r in t.history if "loss" in r)
    logits = torch.tensor(x.astype(np.float64) @ W.astype(np.float64))
    logp = torch.log_softmax(logits, -1)
    if loss == "ctc":
        want = float(torch.nn.functional.ctc_loss(
            logp.permute(1, 0, 2), torch.tensor(y[:, :1]), torch.full((N,), T),
            torch.ones(N, dtype=torch.long)))
    else:
        want = float(torch.nn.functional.nll_loss(logp.reshape(-1, C),
                                                  torch.tensor(y).reshape(-1)))
    np.testing.assert_allclose(first, want, rtol=1e-5)
    np.testing.assert_allclose(before, want, rtol=1e-5)


def _baked_batch_model(path, batch: int, W: np.ndarray, constant: bool = False) -> None:
    """x [N, 8, 8] -> Reshape to [batch, 64] (a size baked in, as tracing `x.view(32, -1)`
    writes it) -> MatMul W; `constant`: instead, an input `bias` [N, 10] that data.constants
    gives, added to the logits."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["z" if constant else "logits"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8])]
    if constant:
        nodes.append(helper.make_node("Add", ["z", "bias"], ["logits"]))
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["N", 10]))
    g = helper.make_graph(nodes, "g", inputs,
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(
                              np.array([-1 if constant else batch, 64], np.int64), "shape")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("case", ["reshape", "constant"])
def test_a_model_that_runs_at_the_training_batch_alone_is_evaluated_in_padded_chunks(
        tmp_path, case):
    """A size baked into a Reshape (or a data.constants shape written as the batch size where
    `batch` was meant) trains at its batch, 32, and failed on the eval set's last chunk of 8
    samples at the end of the run: nothing exported (found by a README sweep). That chunk runs
    padded to the training batch, as a fixed-batch model's, and scores exactly."""
    from tests.conftest import EXAMPLES

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 10)) * 0.05).astype(np.float32)
    _baked_batch_model(tmp_path / "m.onnx", 32, W, constant=case == "constant")
    d = np.load(EXAMPLES / "digits.npz")
    xt, yt = d["x_test"].reshape(-1, 8, 8), d["y_test"]  # (360 samples: 11 x 32 + 8)
    np.savez(tmp_path / "d.npz", x=d["x_train"].reshape(-1, 8, 8), y=d["y_train"], xt=xt, yt=yt)
    raw = {"model": "m.onnx", "output": "out/m.onnx", "device": "cpu", "steps": 3,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "xt"}, "targets": {"label": "yt"}},
                    "batch_size": 32},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.1}}
    if case == "constant":
        raw["data"]["constants"] = {"bias": {"shape": [32, 10], "fill": 0.5}}
    log = io.StringIO()
    result = Trainer(config_from_dict(raw, tmp_path), stream=log).fit()
    assert "evaluation: the model fails on a chunk of 8 sample(s)" in log.getvalue()
    assert "padded to the training batch, 32" in log.getvalue()
    trained = {t.name: numpy_helper.to_array(t)
               for t in onnx.load(tmp_path / "out" / "m.onnx").graph.initializer}
    logits = xt.reshape(-1, 64).astype(np.float64) @ trained["W"].astype(np.float64) + (
        0.5 if case == "constant" else 0.0)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(result["eval_loss"], -logp[np.arange(360), yt].mean(), rtol=1e-5)
    assert result["eval_accuracy"] == pytest.approx((logits.argmax(1) == yt).mean())


@pytest.mark.parametrize("fails", ["evaluation", "checkpoint", "both"])
def test_an_end_of_run_failure_still_writes_the_model(tmp_path, digits_config, monkeypatch,
                                                     fails):
    """The end-of-run evaluation raising (a model error the pre-flight cannot foresee), or the
    last checkpoint's write (its disk full, the output's not): the run fails saying so, after
    the export of the trained model and, where it can, the checkpoint (both were lost: the
    error came first; found by a README sweep)."""
    from trainer import checkpoint
    from trainer.errors import ModelError, TrainerError

    cfg = config_from_dict(digits_config(steps=4, output=str(tmp_path / "out" / "m.onnx"),
                                         checkpoint={"dir": str(tmp_path / "ck")}), tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    evaluate, save = t.evaluate, checkpoint.save

    def failing_evaluate(*a, **k):
        if t.step == 4 and fails != "checkpoint":
            raise ModelError("node 'x' (Reshape) failed")
        return evaluate(*a, **k)

    def failing_save(*a, **k):
        if fails != "evaluation":
            raise checkpoint.WriteError("cannot write checkpoint ck/step_00000004: No space left")
        return save(*a, **k)

    monkeypatch.setattr(t, "evaluate", failing_evaluate)
    monkeypatch.setattr(checkpoint, "save", failing_save)
    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(cfg.model).graph.initializer}
    with pytest.raises(TrainerError) as info:
        t.fit()
    said = str(info.value)
    first = "checkpoint" if fails == "checkpoint" else "evaluation"
    assert said.startswith("node 'x' (Reshape) failed" if first == "evaluation"
                           else "cannot write checkpoint"), said
    assert isinstance(info.value, ModelError if first == "evaluation" else checkpoint.WriteError)
    assert f"the end-of-run {first} failed after all 4 steps, and the trained model is " \
        f"written to {tmp_path / 'out' / 'm.onnx'}" in said
    assert ("the end-of-run checkpoint failed too" in said) == (fails == "both")
    assert ("(and checkpointed)" in said) == (fails == "evaluation")
    if fails == "evaluation":
        assert checkpoint.latest(tmp_path / "ck").name.endswith("4")
    after = {i.name: numpy_helper.to_array(i)
             for i in onnx.load(tmp_path / "out" / "m.onnx").graph.initializer}
    assert any(not np.array_equal(after[k], before[k]) for k in before)


def test_an_export_failing_after_the_end_of_run_checkpoint_failed_names_both(
        tmp_path, digits_config, monkeypatch):
    """A disk filling at the end of a run: the last checkpoint's write fails, then the export;
    the error named the export only (the checkpoint's failure was dropped)."""
    from trainer import checkpoint

    cfg = config_from_dict(digits_config(steps=4, output=str(tmp_path / "out" / "m.onnx"),
                                         checkpoint={"dir": str(tmp_path / "ck")}), tmp_path)
    t = Trainer(cfg, stream=io.StringIO())

    def full(*a, **k):
        raise checkpoint.WriteError("cannot write checkpoint ck/step_00000004: No space left")

    def full_export(*a, **k):
        raise checkpoint.WriteError("cannot write model out/m.onnx: No space left")

    monkeypatch.setattr(checkpoint, "save", full)
    monkeypatch.setattr(t, "export", full_export)
    with pytest.raises(checkpoint.WriteError, match=r"^cannot write model out/m.onnx: No space "
                       r"left; the end-of-run checkpoint failed too: cannot write checkpoint "
                       r"ck/step_00000004: No space left$"):
        t.fit()


@pytest.mark.parametrize("head", ["Softmax", "Sigmoid", "binary"])
def test_a_saturated_models_eval_loss_is_its_step_loss(tmp_path, head):
    """Training takes cross entropy on a Softmax's input and bce on a Sigmoid's; evaluation
    took the log of the output's probabilities, which underflow to 0 on a saturated model:
    eval_loss inf (or bce's clamp, 30.3 for 16.8) where the step's loss was finite, so `best`
    and `early_stop` never saw an improvement. Evaluation reads the logits too now; also
    those of a binary classifier written as Concat(1 - Sigmoid(z), Sigmoid(z)) (skl2onnx's
    MLPClassifier), which still gave inf. `predict` gives the model's own outputs after an
    evaluation (it gave the log-probabilities evaluation reads)."""
    rng = np.random.default_rng(0)
    c = 3 if head == "Softmax" else 1
    W = (rng.standard_normal((4, c)) * 60).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node(head, ["z"], ["p"], **({"axis": -1} if head == "Softmax" else {}))]
    if head == "binary":
        nodes[1:] = [helper.make_node("Sigmoid", ["z"], ["s"]),
                     helper.make_node("Sub", ["one", "s"], ["q"]),
                     helper.make_node("Concat", ["q", "s"], ["p"], axis=1)]
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 4])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT,
                                                         ["N", 2 if head == "binary" else c])],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = rng.integers(0, c, 32) if head == "Softmax" else \
        rng.integers(0, 2, (32, 1)).astype(np.float32)
    if head == "binary":
        y = y[:, 0].astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 1,
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                 "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                 "batch_size": 32, "shuffle": False},
        "loss": {"type": "bce" if head == "Sigmoid" else "cross_entropy", "output": "p",
                 "target": "t"},
        "optimizer": {"type": "sgd", "lr": 1e-30}, "log": {"every_steps": 1},
        "eval": {"every_steps": 1}}, tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    t.fit()
    step = next(r["loss"] for r in t.history if "loss" in r)
    z = torch.from_numpy(x.astype(np.float64)) @ torch.from_numpy(W.astype(np.float64))
    if head == "binary":
        z, y = z[:, 0], y[:, None].astype(np.float32)
    want = (torch.nn.functional.cross_entropy(z, torch.from_numpy(y)) if head == "Softmax"
            else torch.nn.functional.binary_cross_entropy_with_logits(z, torch.from_numpy(
                y.reshape(z.shape).astype(np.float64)))).item()
    ev = next(r["eval_loss"] for r in t.history if "eval_loss" in r)
    assert np.isfinite(ev) and ev > 10
    np.testing.assert_allclose([step, ev], [want, want], rtol=1e-4)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    np.testing.assert_allclose(t.predict({"x": x})["p"], session.run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_evaluate_names_the_arrays_it_lacks(tmp_path, digits_config):
    """Trainer.evaluate(arrays) keyed by the dataset's names instead of the loss target's read
    the target as None: bce's loss was NaN, in silence."""
    from tests.conftest import EXAMPLES
    from trainer.errors import TrainerError

    t = Trainer(config_from_dict(digits_config(), tmp_path), stream=io.StringIO())
    d = np.load(EXAMPLES / "digits.npz")
    with pytest.raises(TrainerError, match=r"evaluate: the arrays hold no 'label'; key them .* "
                                           r"\(given: 'x', 'y_test'\)"):
        t.evaluate({"x": d["x_test"], "y_test": d["y_test"]})
    assert t.evaluate({"x": d["x_test"], "label": d["y_test"]})["eval_accuracy"] > 0
    # (checked as a dataset file's: negative labels indexed from the end, in silence; labels
    # of 10 and more were NumPy's IndexError)
    with pytest.raises(DataError, match=r"evaluate: target 'label' holds -\d+ at sample 0"):
        t.evaluate({"x": d["x_test"], "label": -1 - d["y_test"]})
    with pytest.raises(DataError, match=r"evaluate: target 'label' holds 1\d at sample 0"):
        t.evaluate({"x": d["x_test"], "label": d["y_test"] + 10})
    with pytest.raises(DataError, match=r"evaluate: array for 'x' has per-sample shape \[60\]"):
        t.evaluate({"x": d["x_test"][:, :60], "label": d["y_test"]})
    no_eval = digits_config()
    no_eval["data"]["eval"] = None
    with pytest.raises(TrainerError, match="evaluate: the config has no data.eval; give"):
        Trainer(config_from_dict(no_eval, tmp_path), stream=io.StringIO()).evaluate()


def test_evaluate_checks_given_targets_as_a_datasets(tmp_path):
    """An mse target of [N] for an output [N, 1] broadcast to [N, N]: a loss of 0.98 where
    it is 0.01, in silence; refused, as from a dataset file."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 1)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(W, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "reg.onnx")
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = x @ W + 0.1
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    t = Trainer(config_from_dict({
        "model": "reg.onnx", "output": "out.onnx",
        "data": {"train": {"path": "reg.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                 "batch_size": 16},
        "loss": {"type": "mse", "output": "y", "target": "t"},
        "optimizer": {"type": "sgd", "lr": 0.0}, "steps": 1}, tmp_path), stream=io.StringIO())
    assert t.evaluate({"x": x, "t": y})["eval_loss"] == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(DataError, match=r"evaluate: target 't' has per-sample shape \[\], but "
                       r"the mse loss compares it with 'y' of per-sample shape \[1\]"):
        t.evaluate({"x": x, "t": y[:, 0]})
    got = t.evaluate({"x": x.astype(np.float64), "t": y.astype(np.float64)})  # (converted)
    assert got["eval_loss"] == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("form", ["constant-node", "opset11-axis1-rank3"])
def test_a_binary_classifiers_eval_loss_is_its_step_loss_in_other_forms(tmp_path, form):
    """Concat(1 - Sigmoid(z), Sigmoid(z)) with its 1 a Constant node (evaluation read the
    probabilities as logits, a loss of its own), or over axis 1 of a [N, 2, T] output at
    opset 11 (evaluation left it as it was: inf on a saturated z): the step's loss, and
    PyTorch's binary cross entropy on z."""
    rng = np.random.default_rng(11)
    t_len = 3 if form.startswith("opset11") else 1
    W = (rng.standard_normal((4, 1)) * 40).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z0"])]
    if form == "constant-node":
        nodes += [helper.make_node("Reshape", ["z0", "shape"], ["z"]),
                  helper.make_node("Constant", [], ["one"],
                                   value=numpy_helper.from_array(np.array(1.0, np.float32)))]
        inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "shape"))
        x_shape, out_shape, opset = ["N", 4], ["N", 2], 17
    else:
        nodes.append(helper.make_node("Transpose", ["z0"], ["z"], perm=[0, 2, 1]))
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
        x_shape, out_shape, opset = ["N", t_len, 4], ["N", 2, t_len], 11
    nodes += [helper.make_node("Sigmoid", ["z"], ["s"]),
              helper.make_node("Sub", ["one", "s"], ["q"]),
              helper.make_node("Concat", ["q", "s"], ["p"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     x_shape)],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, out_shape)],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]),
              tmp_path / "m.onnx")
    x = rng.standard_normal([16] + x_shape[1:]).astype(np.float32)
    y = rng.integers(0, 2, (16,) + ((t_len,) if t_len > 1 else ()))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    split = {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}}
    t = Trainer(config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 1,
        "data": {"train": split, "eval": split, "batch_size": 16, "shuffle": False},
        "loss": {"type": "cross_entropy", "output": "p", "target": "t", "class_axis": 1},
        "optimizer": {"type": "sgd", "lr": 0.0}, "log": {"every_steps": 1}}, tmp_path),
        stream=io.StringIO())
    t.fit()
    step = next(r["loss"] for r in t.history if "loss" in r)
    z = torch.from_numpy(x.astype(np.float64)) @ torch.from_numpy(W.astype(np.float64))
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        z.reshape(y.shape), torch.from_numpy(y.astype(np.float64))).item()
    np.testing.assert_allclose([step, t.evaluate()["eval_loss"]], [want, want], rtol=1e-5)


def test_evaluate_counts_the_samples_of_the_model_and_loss_arrays(tmp_path):
    """Trainer.evaluate(arrays) took the sample count from the first array given: a constant's
    value first (data.constants' [1] scale) scored 1 sample of 21 (1.8e-07 for 3.36). A ctc
    model whose output is a binary Concat(1 - Sigmoid(z), Sigmoid(z)) is evaluated as it
    trains, on that output as logits (the binary reading is cross entropy's)."""
    from trainer.errors import TrainerError

    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("Mul", ["a", "scale"], ["l"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 6]),
                                       helper.make_tensor_value_info("scale", TensorProto.FLOAT,
                                                                     [1])],
                          [helper.make_tensor_value_info("l", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(W, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    x, y = rng.standard_normal((21, 6)).astype(np.float32), rng.integers(0, 3, 21)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    t = Trainer(config_from_dict({
        "model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 1,
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                 "batch_size": 4, "constants": {"scale": [2.0]}},
        "loss": {"type": "cross_entropy", "output": "l", "target": "t"}}, tmp_path),
        stream=io.StringIO())
    want = torch.nn.functional.cross_entropy(2 * torch.from_numpy(x) @ torch.from_numpy(W),
                                             torch.from_numpy(y)).item()
    for arrays in ({"x": x, "t": y}, {"scale": np.array([2.0], np.float32), "x": x, "t": y}):
        assert t.evaluate(arrays)["eval_loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(TrainerError, match=r"different numbers of samples \(x: 21, t: 20\)"):
        t.evaluate({"x": x, "t": y[:20]})

    n, steps = 8, 6
    w = rng.standard_normal((4, 1)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["s"]),
             helper.make_node("Sub", ["one", "s"], ["q"]),
             helper.make_node("Concat", ["q", "s"], ["p"], axis=-1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", steps, 4])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT,
                                                         ["N", steps, 2])],
                          [numpy_helper.from_array(w, "W"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "c.onnx")
    xc = rng.standard_normal((n, steps, 4)).astype(np.float32)
    yc = np.full((n, 2), -1, np.int64)
    yc[:, 0] = 1
    np.savez(tmp_path / "c.npz", x=xc, y=yc)
    split = {"path": "c.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}}
    t = Trainer(config_from_dict({
        "model": "c.onnx", "output": "out_c.onnx", "device": "cpu", "steps": 1,
        "precision": "fp64", "data": {"train": split, "eval": split, "batch_size": n},
        "loss": {"type": "ctc", "output": "p", "target": "t"},
        "optimizer": {"type": "sgd", "lr": 0.0}, "log": {"every_steps": 1}}, tmp_path),
        stream=io.StringIO())
    t.fit()
    step = next(r["loss"] for r in t.history if "loss" in r)
    assert t.evaluate()["eval_loss"] == pytest.approx(step, rel=1e-10)
