"""The ctc loss (kernels/ctc.py, the CTCLoss rule, `loss.type: ctc`) against PyTorch's ctc_loss:
per-sample values, gradients through log_softmax, float64 finite differences, and a training run
of a small recognizer that ends in Softmax (as PaddleOCR's does) step for step."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.config import config_from_dict
from trainer.errors import TrainerError
from trainer.kernels.ctc import CTCLoss, CTCLossGrad
from trainer.train import Trainer

torch = pytest.importorskip("torch")

# (the coverage checks of tests/test_grad_rules.py and tests/test_kernels.py: the rule and both
# kernels are checked here, against torch and finite differences)
EXTRA_TESTED = {"CTCLoss"}
TESTED_OPS = {"CTCLoss", "CTCLossGrad"}


def _case(seed: int, n=4, t=12, c=6, s=5, blank=0):
    """Random log-probabilities [N, T, C] and labels [N, S] padded with -1, with repeats, an
    empty row, and a row that only just fits (labels + repeats = T)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, t, c))
    classes = [k for k in range(c) if k != blank]
    labels = np.full((n, s), -1, np.int64)
    lengths = [s, 0, 3, 2][:n]
    for i, length in enumerate(lengths):
        labels[i, :length] = rng.choice(classes, length)
    labels[0, 1] = labels[0, 0]  # a repeat: needs a blank between
    return logits, labels, lengths


def _torch(logits, labels, lengths, blank, reduction, steps=None):
    x = torch.tensor(logits, requires_grad=True)
    lp = torch.log_softmax(x, dim=2)
    targets = torch.tensor(np.concatenate([labels[i, :k] for i, k in enumerate(lengths)]))
    steps = torch.full((len(lengths),), logits.shape[1]) if steps is None else \
        torch.tensor(steps)
    loss = torch.nn.functional.ctc_loss(lp.transpose(0, 1), targets, steps,
                                        torch.tensor(lengths), blank=blank, reduction=reduction)
    return x, loss


def _log_softmax(x):
    z = x - x.max(axis=2, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=2, keepdims=True))


@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ctc_values_and_gradients_are_torchs(seed, blank):
    logits, labels, lengths = _case(seed, blank=blank)
    lp = _log_softmax(logits)
    nll, count = CTCLoss(np, lp, labels, blank=blank)
    _, want = _torch(logits, labels, lengths, blank, "none")
    np.testing.assert_allclose(nll, want.detach().numpy(), rtol=1e-10)
    np.testing.assert_array_equal(count, np.maximum(lengths, 1))
    # the mean loss's gradient with respect to the logits (through log_softmax, as the graph)
    x, loss = _torch(logits, labels, lengths, blank, "mean")
    loss.backward()
    dnll = 1.0 / (count * len(lengths))
    (d_lp,) = CTCLossGrad(np, lp, labels, dnll, blank=blank)
    d_x = d_lp - np.exp(lp) * d_lp.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(d_x, x.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_ctc_gradient_is_the_finite_difference_of_its_loss():
    """CTCLossGrad is the derivative of CTCLoss's nll with respect to each log-probability
    taken on its own (float64 central differences)."""
    logits, labels, _ = _case(7, n=3, t=7, c=4, s=3)
    lp = _log_softmax(logits)
    w = np.array([0.5, -1.0, 2.0])
    (grad,) = CTCLossGrad(np, lp, labels, w)
    rng = np.random.default_rng(0)
    for idx in [tuple(rng.integers(0, d) for d in lp.shape) for _ in range(40)]:
        up, down = lp.copy(), lp.copy()
        up[idx] += 1e-6
        down[idx] -= 1e-6
        fd = (w @ CTCLoss(np, up, labels)[0] - w @ CTCLoss(np, down, labels)[0]) / 2e-6
        assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), idx


@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_ctc_with_each_samples_steps_is_torchs_with_input_lengths(seed, blank):
    """A third input, each sample's count of valid time steps (torch's input_lengths: padded
    sequences of different lengths): the steps after it take no part, in the loss or its
    gradient (which is 0 there). One sample at the full T, one that only just fits its labels
    in fewer steps, one at a single step with no label."""
    logits, labels, lengths = _case(seed, blank=blank)
    steps = np.array([12, 9, 7, 4])
    steps[1] = 9 if seed else 5  # (labels 0 + repeats: row 1 is empty, any step count fits)
    labels[3] = -1
    lengths = [*lengths[:3], 0]
    steps[3] = 1
    lp = _log_softmax(logits)
    nll, count = CTCLoss(np, lp, labels, steps, blank=blank)
    _, want = _torch(logits, labels, lengths, blank, "none", steps)
    np.testing.assert_allclose(nll, want.detach().numpy(), rtol=1e-10)
    x, loss = _torch(logits, labels, lengths, blank, "mean", steps)
    loss.backward()
    dnll = 1.0 / (count * len(lengths))
    (d_lp,) = CTCLossGrad(np, lp, labels, dnll, steps, blank=blank)
    for i, k in enumerate(steps):
        assert not d_lp[i, k:].any()
    d_x = d_lp - np.exp(lp) * d_lp.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(d_x, x.grad.numpy(), rtol=1e-8, atol=1e-12)
    # (all steps valid: the two-input form's values)
    full = np.full(4, 12)
    np.testing.assert_array_equal(CTCLoss(np, lp, labels, full)[0], CTCLoss(np, lp, labels)[0])


def test_ctc_gradient_with_steps_is_the_finite_difference_of_its_loss():
    logits, labels, _ = _case(5, n=3, t=7, c=4, s=3)
    lp = _log_softmax(logits)
    steps = np.array([7, 5, 6])
    w = np.array([0.5, -1.0, 2.0])
    (grad,) = CTCLossGrad(np, lp, labels, w, steps)
    rng = np.random.default_rng(1)
    for idx in [tuple(rng.integers(0, d) for d in lp.shape) for _ in range(40)]:
        up, down = lp.copy(), lp.copy()
        up[idx] += 1e-6
        down[idx] -= 1e-6
        fd = (w @ CTCLoss(np, up, labels, steps)[0] - w @ CTCLoss(np, down, labels, steps)[0]) \
            / 2e-6
        assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), idx


def test_an_alignment_that_cannot_exist_is_an_infinite_loss():
    lp = _log_softmax(np.zeros((1, 3, 4)))
    nll, _ = CTCLoss(np, lp, np.array([[1, 1, 2]]))  # 1 _ 1 2 needs 4 steps, 3 given
    assert np.isinf(nll[0])


def _recognizer(path, w, b):
    """[N, T, F] @ W + b -> Softmax over the classes: a recognizer head ending in probabilities
    (the ctc loss takes the Softmax's input)."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"],
                                                                       ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10, 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_recognizer_trains_with_ctc_as_in_pytorch(tmp_path):
    """`loss: {type: ctc}` on a model ending in Softmax: PyTorch's Linear + log_softmax +
    ctc_loss (mean) from the same weights and batches, SGD, six steps: the same losses and
    weights; evaluation reports the same loss on the probabilities (their log)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 5)) * 0.3).astype(np.float32)
    b = np.zeros(5, np.float32)
    _recognizer(tmp_path / "m.onnx", w, b)
    x = rng.standard_normal((24, 10, 8)).astype(np.float32)
    labels = np.full((24, 4), -1, np.int64)
    for i in range(24):
        k = int(rng.integers(1, 5))
        labels[i, :k] = rng.integers(1, 5, k)
    np.savez(tmp_path / "d.npz", x=x, y=labels)
    raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu", "precision": "fp64",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "batch_size": 8, "shuffle": False},
           "loss": {"type": "ctc", "output": "probs", "target": "t", "blank": 0},
           "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 6, "log": {"every_steps": 1}}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    result = t.fit()
    ours = [r["loss"] for r in t.history if "loss" in r]

    lin = torch.nn.Linear(8, 5).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w.T, dtype=torch.float64))
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    want = []
    for step in range(6):
        lo = (step % 3) * 8
        xb, yb = torch.tensor(x[lo:lo + 8], dtype=torch.float64), labels[lo:lo + 8]
        lengths = [(row >= 0).sum() for row in yb]
        lp = torch.log_softmax(lin(xb), dim=2)
        loss = torch.nn.functional.ctc_loss(
            lp.transpose(0, 1), torch.tensor(np.concatenate([r[r >= 0] for r in yb])),
            torch.full((8,), 10), torch.tensor(lengths), blank=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    np.testing.assert_allclose(ours, want, rtol=1e-9)
    got = t.trained_values()
    np.testing.assert_allclose(got["W"], lin.weight.detach().numpy().T, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        lp = torch.log_softmax(lin(torch.tensor(x, dtype=torch.float64)), dim=2)
        lengths = [(row >= 0).sum() for row in labels]
        per = torch.nn.functional.ctc_loss(
            lp.transpose(0, 1), torch.tensor(np.concatenate([r[r >= 0] for r in labels])),
            torch.full((24,), 10), torch.tensor(lengths), blank=0, reduction="none")
        want_eval = float((per / torch.tensor(lengths)).mean())
    assert result["eval_loss"] == pytest.approx(want_eval, rel=1e-6)


def test_a_recognizer_trains_on_padded_sequences_with_loss_lengths_as_in_pytorch(tmp_path):
    """Sequences of 4-10 steps padded to 10: `loss.lengths` names the target holding each
    sample's count of valid steps, and the run is PyTorch's ctc_loss with those input_lengths
    (same weights, batches, SGD): losses, weights and the evaluation loss. The padded steps
    take no part: changing the inputs there changes nothing."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((8, 5)) * 0.3).astype(np.float32)
    _recognizer(tmp_path / "m.onnx", w, np.zeros(5, np.float32))
    x = rng.standard_normal((24, 10, 8)).astype(np.float32)
    steps = rng.integers(4, 11, 24)
    labels = np.full((24, 3), -1, np.int64)
    for i in range(24):
        k = int(rng.integers(1, 4))
        labels[i, :k] = rng.choice([1, 2, 3, 4], k, replace=False)  # (no repeat: k <= steps)
    padded = x.copy()
    for i, k in enumerate(steps):
        padded[i, k:] = rng.standard_normal((10 - k, 8)) * 100  # (what lies past the end)
    np.savez(tmp_path / "d.npz", x=x, y=labels, n=steps)
    np.savez(tmp_path / "p.npz", x=padded, y=labels, n=steps)

    def run(data):
        ds = {"path": data, "inputs": {"x": "x"}, "targets": {"t": "y", "steps": "n"}}
        raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu", "precision": "fp64",
               "data": {"train": ds, "eval": ds, "batch_size": 8, "shuffle": False},
               "loss": {"type": "ctc", "output": "probs", "target": "t", "lengths": "steps"},
               "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 6, "log": {"every_steps": 1}}
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        result = t.fit()
        return [r["loss"] for r in t.history if "loss" in r], t.trained_values(), result

    ours, got, result = run("d.npz")
    lin = torch.nn.Linear(8, 5).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w.T, dtype=torch.float64))
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)

    def torch_loss(xb, yb, nb, reduction="mean"):
        lp = torch.log_softmax(lin(torch.tensor(xb, dtype=torch.float64)), dim=2)
        k = [int((r >= 0).sum()) for r in yb]
        return torch.nn.functional.ctc_loss(
            lp.transpose(0, 1), torch.tensor(np.concatenate([r[r >= 0] for r in yb])),
            torch.tensor(nb), torch.tensor(k), blank=0, reduction=reduction), torch.tensor(k)
    want = []
    for step in range(6):
        lo = (step % 3) * 8
        loss, _ = torch_loss(x[lo:lo + 8], labels[lo:lo + 8], steps[lo:lo + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    np.testing.assert_allclose(ours, want, rtol=1e-9)
    np.testing.assert_allclose(got["W"], lin.weight.detach().numpy().T, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        per, k = torch_loss(x, labels, steps, "none")
        assert result["eval_loss"] == pytest.approx(float((per / k).mean()), rel=1e-6)
    ours_padded, got_padded, _ = run("p.npz")
    np.testing.assert_allclose(ours_padded, ours, rtol=1e-12)
    np.testing.assert_allclose(got_padded["W"], got["W"], rtol=1e-12)


@pytest.mark.parametrize("steps,message", [
    ([3, 0], "target 'n' \\(loss.lengths\\) is 0 at sample 1, outside \\[1, 10\\]"),
    ([3, 11], "target 'n' \\(loss.lengths\\) is 11 at sample 1, outside \\[1, 10\\]"),
    ([3, 2], "target 't' needs 3 time steps at sample 1 .*its 'n' \\(loss.lengths\\) gives 2"),
    ([[3], [4]], "target 'n' \\(loss.lengths\\) must hold one integer per sample, \\[2\\]"),
])
def test_bad_ctc_lengths_are_named_before_training(tmp_path, steps, message):
    _recognizer(tmp_path / "m.onnx", np.ones((8, 5), np.float32), np.zeros(5, np.float32))
    np.savez(tmp_path / "d.npz", x=np.ones((2, 10, 8), np.float32),
             y=np.array([[1, 2, -1], [1, 1, -1]]), n=np.array(steps))
    raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                              "targets": {"t": "y", "n": "n"}}, "batch_size": 2},
           "loss": {"type": "ctc", "output": "probs", "target": "t", "lengths": "n"},
           "steps": 1}
    with pytest.raises(TrainerError, match=message):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


def test_check_reports_a_ctc_run_from_shapes_and_names_bad_lengths(tmp_path):
    """`onnx-trainer check` (report.preflight, no model values): the ctc loss's own ops get
    their shapes (ONNX shape inference has no schema for them: the estimate used to be a
    problem, "needs the model's values"), and bad loss.lengths are named as training does."""
    from trainer import report

    _recognizer(tmp_path / "m.onnx", np.ones((8, 5), np.float32), np.zeros(5, np.float32))
    labels = np.array([[1, 2, -1], [3, 4, -1]] * 4)
    for steps, problem in (([10, 4] * 4, None), ([10, 1] * 4, "target 't' needs 2 time steps "
                                                  "at sample 1 (its labels, and a blank between "
                                                  "repeats), but its 'n' (loss.lengths) gives 1")):
        np.savez(tmp_path / "d.npz", x=np.ones((8, 10, 8), np.float32), y=labels,
                 n=np.array(steps))
        for lengths in ({"lengths": "n"}, {}):
            raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu",
                   "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                      "targets": {"t": "y", "n": "n"}}, "batch_size": 4},
                   "loss": {"type": "ctc", "output": "probs", "target": "t", **lengths},
                   "steps": 1}
            pf = report.preflight(config_from_dict(raw, tmp_path))
            assert pf.estimate is not None and pf.estimate.method == "ONNX shape inference"
            texts = [str(p) for p in pf.problems]
            if problem and lengths:
                assert len(texts) == 1 and problem in texts[0], texts
            else:
                assert not texts, texts


def test_loss_lengths_must_name_a_target_of_every_dataset(tmp_path):
    from trainer.config import ConfigError

    base = {"model": "m.onnx", "output": "out.onnx",
            "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                               "targets": {"t": "y", "steps": "n"}}, "batch_size": 2},
            "loss": {"type": "ctc", "output": "probs", "target": "t", "lengths": "step"},
            "steps": 1}
    with pytest.raises(ConfigError, match="loss.lengths.*'step'.*not a key of "
                                          "data.train.targets.*steps"):
        config_from_dict(base, tmp_path)
    base["loss"]["lengths"] = "t"
    with pytest.raises(ConfigError, match="loss.lengths.*the labels' own target"):
        config_from_dict(base, tmp_path)
    base["loss"] = {"type": "mse", "output": "probs", "target": "t", "lengths": "steps"}
    with pytest.raises(ConfigError, match="lengths"):
        config_from_dict(base, tmp_path)


@pytest.mark.parametrize("labels,message", [
    (np.array([[1, 0, -1]]), "target 't' holds the blank class 0 at sample 0, position 1"),
    (np.array([[1, -1, 2]]), "target 't' has a label after its padding at sample 0"),
    (np.array([[1, 7, -1]]), "target 't' holds 7 at sample 0, position 1, outside \\[0, 5\\)"),
    (np.array([[1, 1, 1, 1, 1, 1]]), "target 't' needs 11 time steps at sample 0"),
])
def test_bad_ctc_labels_are_named_before_training(tmp_path, labels, message):
    _recognizer(tmp_path / "m.onnx", np.ones((8, 5), np.float32), np.zeros(5, np.float32))
    n = len(labels)
    np.savez(tmp_path / "d.npz", x=np.ones((n, 10, 8), np.float32), y=labels.astype(np.int64))
    raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "batch_size": n},
           "loss": {"type": "ctc", "output": "probs", "target": "t"}, "steps": 1}
    with pytest.raises(TrainerError, match=message):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("lengths", [False, True])
def test_ctc_on_the_gpu_path(tmp_path, monkeypatch, lengths):
    """Through the CuPy stand-in: the ctc kernels run on device arrays (no read back) and the
    run is the CPU run; also with each sample's steps (loss.lengths)."""
    from tests import strictxp as sx

    rng = np.random.default_rng(4)
    _recognizer(tmp_path / "m.onnx", (rng.standard_normal((8, 5)) * 0.3).astype(np.float32),
                np.zeros(5, np.float32))
    labels = np.full((16, 3), -1, np.int64)
    labels[:, 0] = rng.integers(1, 5, 16)
    labels[::2, 1] = rng.integers(1, 5, 8)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 10, 8)).astype(np.float32),
             y=labels, n=rng.integers(3, 11, 16))
    runs = {}
    for device in ("cpu", "gpu"):
        if device == "gpu":
            sx.install(monkeypatch)
        raw = {"model": "m.onnx", "output": f"{device}.onnx", "device": device,
               "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                  "targets": {"t": "y", "n": "n"}}, "batch_size": 8},
               "loss": {"type": "ctc", "output": "probs", "target": "t",
                        **({"lengths": "n"} if lengths else {})},
               "optimizer": {"type": "adamw", "lr": 0.01}, "steps": 4}
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        t.fit()
        runs[device] = ([r["loss"] for r in t.history if "loss" in r], t.trained_values())
    np.testing.assert_allclose(runs["gpu"][0], runs["cpu"][0], rtol=1e-5)
    np.testing.assert_allclose(runs["gpu"][1]["W"], runs["cpu"][1]["W"], rtol=1e-4, atol=1e-6)


def test_a_time_major_recognizer_trains_as_the_batch_major_one(tmp_path):
    """An output [time, batch, classes] (torch's layout, ddddocr's CRNN) with loss.time_axis 0
    trains exactly as the same recognizer giving [batch, time, classes]; evaluation too. The
    wrong time_axis for either layout is named before training."""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((8, 5)) * 0.3).astype(np.float32)
    _recognizer(tmp_path / "bm.onnx", w, np.zeros(5, np.float32))
    m = onnx.load(str(tmp_path / "bm.onnx"))
    g = m.graph  # (logits -> Transpose -> Softmax: the loss still takes the Softmax's input)
    g.node[-1].input[0] = "logits_tm"
    g.node.insert(len(g.node) - 1, helper.make_node("Transpose", ["logits"], ["logits_tm"],
                                                    perm=[1, 0, 2]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [10, "N", 5]))
    onnx.save(m, str(tmp_path / "tm.onnx"))
    labels = np.full((16, 3), -1, np.int64)
    labels[:, :2] = rng.integers(1, 5, (16, 2))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 10, 8)).astype(np.float32),
             y=labels)

    def raw(model, time_axis):
        return {"model": model, "output": f"out_{model}", "device": "cpu", "precision": "fp64",
                "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                   "targets": {"t": "y"}},
                         "eval": {"path": "d.npz", "inputs": {"x": "x"},
                                  "targets": {"t": "y"}}, "batch_size": 8},
                "loss": {"type": "ctc", "output": "probs", "target": "t",
                         "time_axis": time_axis},
                "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 4, "log": {"every_steps": 1}}
    runs = {}
    for model, axis in (("bm.onnx", 1), ("tm.onnx", 0)):
        t = Trainer(config_from_dict(raw(model, axis), tmp_path), stream=io.StringIO())
        result = t.fit()
        runs[model] = ([r["loss"] for r in t.history if "loss" in r], t.trained_values()["W"],
                       result["eval_loss"])
    np.testing.assert_allclose(runs["tm.onnx"][0], runs["bm.onnx"][0], rtol=1e-12)
    np.testing.assert_allclose(runs["tm.onnx"][1], runs["bm.onnx"][1], rtol=1e-12)
    assert runs["tm.onnx"][2] == pytest.approx(runs["bm.onnx"][2], rel=1e-12)
    for model, axis, hint in (("tm.onnx", 1, "time_axis: 0"), ("bm.onnx", 0, "time_axis: 1")):
        with pytest.raises(TrainerError, match=f"axis is not the batch.*{hint}"):
            Trainer(config_from_dict(raw(model, axis), tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("time", [10, 4])
def test_a_time_major_recognizer_of_a_fixed_batch_evaluates_a_ragged_set(tmp_path, time):
    """A fixed batch of 4 with an output [time, 4, classes], 13 evaluation samples: the last
    chunk runs padded with copies of its last sample, and its outputs were cut along axis 0,
    the time axis: the copies were counted (4.37 for 4.33), a time axis of 4 lost its end,
    and under mpirun the shapes did not fit. The evaluation is the dynamic-batch model's."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((8, 5)) * 0.3).astype(np.float32)
    labels = np.full((13, 3), -1, np.int64)
    labels[:, :2] = rng.integers(1, 5, (13, 2))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((13, time, 8)).astype(np.float32),
             y=labels)
    for name, batch in (("dyn.onnx", "N"), ("fixed.onnx", 4)):
        _recognizer(tmp_path / name, w, np.zeros(5, np.float32))
        m = onnx.load(str(tmp_path / name))
        g = m.graph
        g.node[-1].input[0] = "logits_tm"
        g.node.insert(len(g.node) - 1, helper.make_node("Transpose", ["logits"], ["logits_tm"],
                                                        perm=[1, 0, 2]))
        del g.input[:], g.output[:]
        g.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, time, 8]))
        g.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                      [time, batch, 5]))
        onnx.save(m, str(tmp_path / name))
    split = {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}}
    got = {}
    for name in ("dyn.onnx", "fixed.onnx"):
        raw = {"model": name, "output": f"out_{name}", "device": "cpu", "precision": "fp64",
               "data": {"train": split, "eval": split, "batch_size": 4},
               "loss": {"type": "ctc", "output": "probs", "target": "t", "time_axis": 0},
               "steps": 1}
        got[name] = Trainer(config_from_dict(raw, tmp_path),
                            stream=io.StringIO()).evaluate()["eval_loss"]
    assert got["fixed.onnx"] == pytest.approx(got["dyn.onnx"], rel=1e-12)
