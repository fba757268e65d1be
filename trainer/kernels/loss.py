"""Loss kernels: SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss (opset 12/13 semantics)."""

from __future__ import annotations

import numpy as np

from trainer.kernels import kernel
from trainer.kernels.reduce import _log_softmax


def _nll(xp, log_prob, labels, weights, ignore_index, reduction):
    # log_prob [N, C, d...], labels [N, d...]
    lab = labels.astype(np.int64)
    valid = xp.ones(lab.shape, dtype=bool) if ignore_index is None else lab != ignore_index
    safe = xp.where(valid, lab, 0)
    picked = -xp.take_along_axis(log_prob, xp.expand_dims(safe, 1), axis=1)[:, 0]
    w = xp.where(valid, 1.0, 0.0).astype(log_prob.dtype)
    if weights is not None:
        w = w * weights[safe]
    loss = picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / w.sum()
    raise ValueError(f"unknown reduction '{reduction}'")


@kernel("SoftmaxCrossEntropyLoss", since=12)
def SoftmaxCrossEntropyLoss(xp, scores, labels, weights=None, *, ignore_index=None,
                            reduction="mean"):
    log_prob = _log_softmax(xp, scores, (1,))
    loss = _nll(xp, log_prob, labels, weights, ignore_index, reduction)
    return (xp.asarray(loss, dtype=scores.dtype), log_prob)


@kernel("NegativeLogLikelihoodLoss", since=12)
def NegativeLogLikelihoodLoss(xp, log_prob, labels, weights=None, *, ignore_index=None,
                              reduction="mean"):
    return (xp.asarray(_nll(xp, log_prob, labels, weights, ignore_index, reduction),
                       dtype=log_prob.dtype),)
