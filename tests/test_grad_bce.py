"""The ai.onnx_trainer BinaryCrossEntropy of the `bce` loss on probabilities (kernels/loss.py)
and its gradient: values and gradients as torch's binary_cross_entropy, probabilities of
exactly 0 and 1 included; the rule through the training graph against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from trainer.autodiff import reverse
from trainer.executor import Executor
from trainer.kernels import CUSTOM_DOMAIN
from trainer.kernels.loss import BinaryCrossEntropy, BinaryCrossEntropyGrad

EXTRA_TESTED = {"BinaryCrossEntropy"}
TESTED_OPS = {"BinaryCrossEntropy", "BinaryCrossEntropyGrad"}


def _case(dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, (6, 5))
    p.reshape(-1)[:6] = [0.0, 1.0, 0.0, 1.0, 1e-30, 1 - 1e-12]  # (saturated and near it)
    t = rng.uniform(0, 1, (6, 5))
    t.reshape(-1)[:4] = [0.0, 1.0, 0.7, 0.2]
    return p.astype(dtype), t.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_and_gradients_are_torchs(dtype):
    """Per-element losses (each log at least -100) and d p for an upstream gradient, against
    torch's binary_cross_entropy with reduction none and its backward, which divides by
    max(p (1 - p), 1e-12): finite where p is 0 or 1."""
    p, t = _case(dtype)
    dloss = np.random.default_rng(1).standard_normal(p.shape).astype(dtype)
    (loss,) = BinaryCrossEntropy(np, p, t)
    tp = torch.tensor(p, requires_grad=True)
    want = torch.nn.functional.binary_cross_entropy(tp, torch.tensor(t), reduction="none")
    want.backward(torch.tensor(dloss))
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss, want.detach().numpy(), rtol=rtol)
    (grad,) = BinaryCrossEntropyGrad(np, p, t, dloss)
    assert grad.dtype == dtype and np.isfinite(grad).all()
    np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=rtol)


def test_the_rule_is_the_finite_difference_of_the_loss():
    """Through reverse() of a graph holding the node (the mean of its losses): the gradient of
    p is float64 central differences of the mean, at probabilities inside (0, 1)."""
    rng = np.random.default_rng(2)
    p = rng.uniform(0.05, 0.95, (4, 3))
    t = rng.uniform(0, 1, (4, 3))
    info = [helper.make_tensor_value_info(k, TensorProto.DOUBLE, [4, 3]) for k in ("p", "t")]
    g = helper.make_graph(
        [helper.make_node("BinaryCrossEntropy", ["p", "t"], ["per"], domain=CUSTOM_DOMAIN),
         helper.make_node("ReduceMean", ["per"], ["loss"], keepdims=0)], "bce", info,
        [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    rm = reverse(m, ["p"], ["loss"])
    got = Executor(rm, optimize=False).run({"p": p, "t": t, "loss_grad": np.array(1.0)})

    def mean(q):
        return float(BinaryCrossEntropy(np, q, t)[0].mean())
    for idx in np.ndindex(p.shape):
        up, down = p.copy(), p.copy()
        up[idx] += 1e-6
        down[idx] -= 1e-6
        fd = (mean(up) - mean(down)) / 2e-6
        assert got["p_grad"][idx] == pytest.approx(fd, rel=1e-6, abs=1e-10), idx
