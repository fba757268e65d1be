"""Gradient rules for SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss: class weights,
ignore_index, every reduction, [N, C, d1, ..., dk] inputs (as torch.nn.functional.nll_loss).

Only the labelled class of each element has a non-zero NLL gradient, so the rules write it with
one ScatterElements instead of building a [N, C, ...] one-hot tensor (large vocabularies)."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from trainer.autodiff.registry import grad, no_gradient
from trainer.kernels import CUSTOM_DOMAIN


def _label_terms(ctx, nodes: list) -> tuple[str, str]:
    """(labels [N, 1, d...] safe to index with, c): -c is d(loss)/d(log_prob) at the label, the
    gradient of the element's loss times w[label] (0 for ignored labels), divided by the sum
    of the valid weights for mean (a mean over no valid element gives 0, as in PyTorch)."""
    scores, labels = ctx.I(0), ctx.I(1)
    ldt = ctx.dtype(labels)
    l_rank = len(ctx.shape(labels))
    ignore = ctx.attr("ignore_index")
    safe, weight = labels, None
    if ignore is not None:
        eq, valid, safe = ctx.tmp("ignored"), ctx.tmp("valid"), ctx.tmp("labels_safe")
        nodes += [ctx.node("Equal", [labels, ctx.const(ignore, ldt, "ignore")], [eq]),
                  ctx.node("Where", [eq, ctx.const(0, ldt, "zero"), labels], [safe]),
                  ctx.node("Where", [eq, ctx.scalar(0.0, scores), ctx.scalar(1.0, scores)],
                           [valid])]
        weight = valid
    if ctx.I(2):
        wl = ctx.tmp("label_weight")
        nodes.append(ctx.node("Gather", [ctx.I(2), safe], [wl], axis=0))
        if weight is not None:
            both = ctx.tmp("weight")
            nodes.append(ctx.node("Mul", [wl, weight], [both]))
            wl = both
        weight = wl
    reduction = ctx.attr("reduction", "mean")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    g = ctx.GO(0)
    if reduction == "mean" and weight is not None:
        total, empty, denom, g = (ctx.tmp(s) for s in ("total", "empty", "denom", "g"))
        nodes += [ctx.reduce("ReduceSum", weight, list(range(l_rank)), total, keepdims=0),
                  ctx.node("Equal", [total, ctx.scalar(0.0, scores)], [empty]),
                  ctx.node("Where", [empty, ctx.scalar(1.0, scores), total], [denom]),
                  ctx.node("Div", [ctx.GO(0), denom], [g])]
    elif reduction == "mean":
        g = ctx.tmp("g")
        count = float(np.prod(ctx.shape(labels)))
        nodes.append(ctx.node("Div", [ctx.GO(0), ctx.scalar(count, scores)], [g]))
    if weight is not None:
        c = ctx.tmp("c")
        nodes.append(ctx.node("Mul", [weight, g], [c]))
        g = c
    lab1, c1 = ctx.tmp("labels_1"), ctx.tmp("c_1")
    nodes.append(ctx.unsqueeze(safe, [1], lab1))
    if reduction == "none" or weight is not None:
        nodes.append(ctx.unsqueeze(g, [1], c1))
    else:  # a scalar: every element has the same factor
        nodes.append(ctx.node("Expand", [g, ctx.const([ctx.shape(labels)[0], 1] +
                                                      list(ctx.shape(labels)[1:]), np.int64,
                                                      "shape")], [c1]))
    return lab1, c1


@grad("SoftmaxCrossEntropyLoss", inputs=(0,))
def softmax_cross_entropy_grad(ctx):
    # log_prob = log_softmax(X, axis 1), loss = -c log_prob[label]. Loss only:
    # dX = p c - onehot(label) c (p = softmax(X)), written as p c with the label's entry
    # replaced. With a gradient G for log_prob too: dX = T - p sum_c(T), T = G - onehot c
    nodes: list = []
    prob = _softmax_axis1(ctx, nodes)
    if ctx.GO(0) is not None and ctx.GO(1) is None:
        lab1, c1 = _label_terms(ctx, nodes)
        base, picked, at_label = ctx.tmp("pc"), ctx.tmp("pc_label"), ctx.tmp("at_label")
        nodes += [ctx.node("Mul", [prob, c1], [base]),
                  ctx.node("GatherElements", [base, lab1], [picked], axis=1),
                  ctx.node("Sub", [picked, c1], [at_label]),
                  ctx.node("ScatterElements", [base, lab1, at_label], [ctx.GI(0)], axis=1)]
        return nodes
    g = ctx.GO(1)
    if ctx.GO(0) is not None:
        g = _nll_grad_into(ctx, nodes, ctx.GO(1))
    s, t = ctx.tmp("sum"), ctx.tmp("t")
    nodes += [ctx.reduce("ReduceSum", g, [1], s, keepdims=1),
              ctx.node("Mul", [prob, s], [t]),
              ctx.node("Sub", [g, t], [ctx.GI(0)])]
    return nodes


def _nll_grad_into(ctx, nodes: list, base: str | None, out: str | None = None) -> str:
    """base (zeros when None) with -c added at each element's label."""
    lab1, c1 = _label_terms(ctx, nodes)
    out = out or ctx.tmp("d_logp")
    neg = ctx.tmp("neg_c")
    nodes.append(ctx.node("Neg", [c1], [neg]))
    if base is None:
        zeros = ctx.tmp("zeros")
        nodes.append(ctx.node("ConstantOfShape", [ctx.const(list(ctx.shape(ctx.I(0))), np.int64,
                                                            "shape")], [zeros],
                              value=_zero_tensor(ctx.dtype(ctx.I(0)))))
        nodes.append(ctx.node("ScatterElements", [zeros, lab1, neg], [out], axis=1))
        return out
    picked, upd = ctx.tmp("at_label"), ctx.tmp("updated")
    nodes += [ctx.node("GatherElements", [base, lab1], [picked], axis=1),
              ctx.node("Add", [picked, neg], [upd]),
              ctx.node("ScatterElements", [base, lab1, upd], [out], axis=1)]
    return out


def _zero_tensor(dtype):
    return numpy_helper.from_array(np.zeros(1, dtype))


def _softmax_axis1(ctx, nodes: list) -> str:
    """softmax(X) over axis 1: exp(log_prob) from the forward, or recomputed when the node has
    no log_prob output (Softmax before opset 13 flattens the trailing axes: spelled out)."""
    prob = ctx.tmp("prob")
    if len(ctx.onnx_node.output) > 1 and ctx.O(1):
        nodes.append(ctx.node("Exp", [ctx.O(1)], [prob]))
    elif ctx.opset >= 13 or len(ctx.shape(ctx.I(0))) == 2:
        nodes.append(ctx.node("Softmax", [ctx.I(0)], [prob], axis=1))
    else:
        m, c, e, s = (ctx.tmp(k) for k in ("max", "centered", "exp", "sum"))
        nodes += [ctx.reduce("ReduceMax", ctx.I(0), [1], m, keepdims=1),
                  ctx.node("Sub", [ctx.I(0), m], [c]), ctx.node("Exp", [c], [e]),
                  ctx.reduce("ReduceSum", e, [1], s, keepdims=1),
                  ctx.node("Div", [e, s], [prob])]
    return prob


@grad("NegativeLogLikelihoodLoss", inputs=(0,))
def nll_grad(ctx):
    # dX = -w[label] * onehot(label) * dLoss (/ sum of the valid weights for mean): zeros with
    # one scattered entry per element
    nodes: list = []
    _nll_grad_into(ctx, nodes, None, ctx.GI(0))
    return nodes


@grad("BinaryCrossEntropy", domain=CUSTOM_DOMAIN, inputs=(0,))
def binary_cross_entropy_grad(ctx):
    """d p of the ai.onnx_trainer BinaryCrossEntropy (kernels/loss.py): torch's formula, one
    node; the targets take none."""
    return [ctx.node("BinaryCrossEntropyGrad", [ctx.I(0), ctx.I(1), ctx.GO(0)], [ctx.GI(0)],
                     domain=CUSTOM_DOMAIN)]


no_gradient("BinaryCrossEntropyGrad")
