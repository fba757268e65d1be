"""Loss kernels: SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss (opsets 12, 13, 22);
the ai.onnx_trainer BinaryCrossEntropy of the `bce` loss on probabilities and its gradient.

float16/bfloat16 inputs are computed in float32 and the results cast back.
"""

from __future__ import annotations

import numpy as np

from trainer.kernels import CUSTOM_DOMAIN, CUSTOM_SHAPES, kernel
from trainer.kernels.reduce import _log_softmax


def _work(x):
    return x.astype(np.float32) if x.dtype.itemsize < 4 else x


def _nll(xp, log_prob, labels, weights, ignore_index, reduction):
    """log_prob [N, C, d...], labels [N, d...] -> loss [N, d...] or a scalar."""
    lab = labels.astype(np.int64)
    valid = xp.ones(lab.shape, dtype=bool) if ignore_index is None else lab != ignore_index
    safe = xp.where(valid, lab, 0)
    picked = -xp.take_along_axis(log_prob, xp.expand_dims(safe, 1), axis=1)[:, 0]
    w = valid.astype(log_prob.dtype)
    if weights is not None:
        w = w * _work(weights)[safe]
    loss = picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):  # every label ignored: 0/0
            return loss.sum() / w.sum()
    raise ValueError(f"unknown reduction '{reduction}'")


@kernel("SoftmaxCrossEntropyLoss", since=12)
def SoftmaxCrossEntropyLoss(xp, scores, labels, weights=None, *, ignore_index=None,
                            reduction="mean"):
    log_prob = _log_softmax(xp, _work(scores), (1,))
    loss = _nll(xp, log_prob, labels, weights, ignore_index, reduction)
    return (xp.asarray(loss).astype(scores.dtype), log_prob.astype(scores.dtype))


@kernel("NegativeLogLikelihoodLoss", since=12)
def NegativeLogLikelihoodLoss(xp, log_prob, labels, weights=None, *, ignore_index=None,
                              reduction="mean"):
    loss = _nll(xp, _work(log_prob), labels, weights, ignore_index, reduction)
    return (xp.asarray(loss).astype(log_prob.dtype),)


@kernel("BinaryCrossEntropy", domain=CUSTOM_DOMAIN)
def BinaryCrossEntropy(xp, p, t):
    """-(t log p + (1 - t) log(1 - p)) per element, each log at least -100: torch's
    binary_cross_entropy with reduction none (p = 0 or 1 gives a finite loss)."""
    dt, p, t = p.dtype, _work(p), _work(t)
    one, floor = p.dtype.type(1), p.dtype.type(-100)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = xp.maximum(xp.log(p), floor)
        logq = xp.maximum(xp.log(one - p), floor)
    return ((-(t * logp + (one - t) * logq)).astype(dt, copy=False),)


@kernel("BinaryCrossEntropyGrad", domain=CUSTOM_DOMAIN)
def BinaryCrossEntropyGrad(xp, p, t, dloss):
    """d loss / d p as torch's binary_cross_entropy_backward computes it: (p - t) /
    max((1 - p) p, 1e-12) times the incoming gradient, finite where p is 0 or 1 (the
    derivative of the clamped logs would be 0 * inf there)."""
    # (torch's EPSILON 1e-12 as a float32 constant, also in float64: 9.99999996e-13)
    dt, p, t, dloss = p.dtype, _work(p), _work(t), _work(dloss)
    eps, one = p.dtype.type(np.float32(1e-12)), p.dtype.type(1)
    return (((p - t) / xp.maximum((one - p) * p, eps) * dloss).astype(dt, copy=False),)


CUSTOM_SHAPES["BinaryCrossEntropy"] = lambda p, *_: [p]
CUSTOM_SHAPES["BinaryCrossEntropyGrad"] = lambda p, *_: [p]
