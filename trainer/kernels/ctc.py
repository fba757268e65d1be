"""Connectionist temporal classification (the `ctc` loss: OCR line recognizers, speech models) as
two kernels of the ai.onnx_trainer domain, written once against the array module:

- CTCLoss(log_probs [N, T, C], labels [N, S]) -> (nll [N], lengths [N]): the negative log
  likelihood of each sample's label sequence over all its alignments (blank `blank`, repeats
  separated by a blank), and its label count (at least 1: torch's `mean` reduction divides by
  it). Labels are class indices; a row ends at its first negative entry (padding).
- CTCLossGrad(log_probs, labels, dnll [N]) -> d log_probs: the posterior of each class at each
  step, -exp(alpha + beta - log_prob - log P), summed over the label positions of that class.
- Both take an optional last input, steps [N]: each sample's count of valid time steps
  (torch's input_lengths, for padded sequences of different lengths; `loss.lengths`). The
  steps after it take no part in the loss, and their gradient is 0.

The recursions run over time in log space (alpha forward, beta backward), each step one set of
whole-batch array operations over the 2S + 1 positions of the blank-extended labels; the
gradient's sum over positions is one batched product with their one-hot classes. An alignment
that cannot exist (fewer steps than labels plus repeats) has probability 0: an infinite loss,
as torch's `zero_infinity=False`."""

from __future__ import annotations

import numpy as np

from trainer.kernels import CUSTOM_DOMAIN, CUSTOM_SHAPES, kernel


def _extended(xp, labels, blank: int):
    """(ext [N, E] the labels with blanks between and around them, lengths [N], skip [N, E]:
    whether position s may be reached from s - 2, last [N] index of the final label position);
    a row's labels end at its first negative entry."""
    labels = labels.astype(np.int64)
    n, s = labels.shape
    valid = xp.cumprod(labels >= 0, axis=1).astype(bool) if s else labels >= 0
    lengths = valid.sum(axis=1)
    ext = xp.full((n, 2 * s + 1), blank, dtype=np.int64)
    if s:
        ext[:, 1::2] = xp.where(valid, labels, blank)
    skip = xp.zeros(ext.shape, dtype=bool)
    if s:
        skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    return ext, lengths, skip, 2 * lengths


def _steps(steps):
    """Each sample's count of valid time steps as int64 [N], or None (all of them)."""
    return None if steps is None else steps.astype(np.int64).reshape(-1)


def _logadd(xp, *terms):
    out = terms[0]
    for t in terms[1:]:
        out = xp.logaddexp(out, t)
    return out


def _shift(xp, a, k: int, fill):
    """a shifted right by k positions along its last axis (fill at the start)."""
    out = xp.full(a.shape, fill, dtype=a.dtype)
    out[..., k:] = a[..., :a.shape[-1] - k]
    return out


def _alphas(xp, log_probs, ext, skip, last, steps=None):
    """(alpha [T, N, E], log P [N]) in log space (alpha includes the emission at its step);
    with `steps` [N], a sample's alpha stays as it was after its own last step."""
    n, t_len, _ = log_probs.shape
    e_len = ext.shape[1]
    neg = log_probs.dtype.type(-np.inf)
    emit = xp.take_along_axis(log_probs, xp.broadcast_to(ext[:, None, :], (n, t_len, e_len)),
                              axis=2)  # [N, T, E]
    alpha = xp.full((t_len, n, e_len), neg, dtype=log_probs.dtype)
    alpha[0, :, 0] = emit[:, 0, 0]
    if e_len > 1:
        first = emit[:, 0, 1]
        alpha[0, :, 1] = xp.where(last > 0, first, neg)
    for t in range(1, t_len):
        prev = alpha[t - 1]
        alpha[t] = emit[:, t] + _logadd(xp, prev, _shift(xp, prev, 1, neg),
                                        xp.where(skip, _shift(xp, prev, 2, neg), neg))
        if steps is not None:  # (past its steps: the value at its last one)
            alpha[t] = xp.where((steps > t)[:, None], alpha[t], prev)
    final = alpha[t_len - 1]
    at_last = xp.take_along_axis(final, last[:, None], axis=1)[:, 0]
    before = xp.take_along_axis(final, xp.maximum(last - 1, 0)[:, None], axis=1)[:, 0]
    log_p = xp.where(last > 0, xp.logaddexp(at_last, before), at_last)
    return alpha, log_p, emit


@kernel("CTCLoss", domain=CUSTOM_DOMAIN)
def CTCLoss(xp, log_probs, labels, steps=None, *, blank=0):
    ext, lengths, skip, last = _extended(xp, labels, int(blank))
    with np.errstate(invalid="ignore"):  # (-inf - -inf: positions no alignment reaches)
        _, log_p, _ = _alphas(xp, log_probs, ext, skip, last, _steps(steps))
    count = xp.maximum(lengths, 1).astype(log_probs.dtype)
    return (-log_p, count)


@kernel("CTCLossGrad", domain=CUSTOM_DOMAIN)
def CTCLossGrad(xp, log_probs, labels, dnll, steps=None, *, blank=0):
    ext, _, skip, last = _extended(xp, labels, int(blank))
    n, t_len, classes = log_probs.shape
    e_len = ext.shape[1]
    neg = log_probs.dtype.type(-np.inf)
    steps = _steps(steps)
    with np.errstate(invalid="ignore", over="ignore"):
        alpha, log_p, emit = _alphas(xp, log_probs, ext, skip, last, steps)
        # beta (including the emission at its step), from the final positions backward: it
        # starts at each sample's last step, and is -inf (no alignment) after it
        pos = xp.arange(e_len)[None, :]
        ends = (pos == last[:, None]) | ((pos == last[:, None] - 1) & (last[:, None] > 0))
        beta = xp.full((t_len, n, e_len), neg, dtype=log_probs.dtype)
        beta[t_len - 1] = xp.where(ends, emit[:, t_len - 1], neg)
        if steps is not None:
            beta[t_len - 1] = xp.where((steps >= t_len)[:, None], beta[t_len - 1], neg)
        skip_next = xp.zeros(skip.shape, dtype=bool)  # s -> s + 2 allowed
        skip_next[:, :-2] = skip[:, 2:]
        for t in range(t_len - 2, -1, -1):
            nxt = beta[t + 1]
            ahead1 = xp.full(nxt.shape, neg, dtype=nxt.dtype)
            ahead1[:, :-1] = nxt[:, 1:]
            ahead2 = xp.full(nxt.shape, neg, dtype=nxt.dtype)
            ahead2[:, :-2] = nxt[:, 2:]
            beta[t] = emit[:, t] + _logadd(xp, nxt, ahead1, xp.where(skip_next, ahead2, neg))
            if steps is not None:
                start = xp.where(ends, emit[:, t], neg)  # (a sample whose last step is t)
                beta[t] = xp.where((steps == t + 1)[:, None], start,
                                   xp.where((steps > t + 1)[:, None], beta[t], neg))
        # posterior of each label position at each step, then summed per class
        post = xp.exp(alpha + beta - xp.moveaxis(emit, 1, 0) - log_p[None, :, None])
    post = xp.moveaxis(post, 0, 1)  # [N, T, E]
    onehot = (ext[:, :, None] == xp.arange(classes)[None, None, :]).astype(log_probs.dtype)
    grad = xp.matmul(post, onehot)  # [N, T, C]
    return (-(grad * dnll.astype(log_probs.dtype)[:, None, None]),)


# (nll and count per sample, in the scores' dtype; the gradient has the scores' shape)
CUSTOM_SHAPES["CTCLoss"] = lambda scores, *_: [((scores[0][0],), scores[1])] * 2
CUSTOM_SHAPES["CTCLossGrad"] = lambda scores, *_: [scores]
