"""Gradient rules for SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss."""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad
from trainer.errors import ModelError
from trainer.graph import elem_type


def _target_terms(ctx, scores: str, labels: str):
    """One-hot targets, validity mask and the mean's denominator (a tensor name or float)."""
    if ctx.I(2):
        raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): class weights are not "
                         "supported by the gradient yet")
    s_shape, dt = ctx.shape(scores), ctx.dtype(scores)
    # onehot = Cast(Unsqueeze(labels, 1) == classes): standard ops that every runtime has for
    # every float type (onnxruntime has no float64 OneHot); ignored labels match no class.
    lab1, hit, oh = ctx.tmp("labels_1"), ctx.tmp("hit"), ctx.tmp("onehot")
    classes = np.arange(s_shape[1], dtype=ctx.dtype(labels)).reshape(
        (-1,) + (1,) * (len(s_shape) - 2))
    nodes = [ctx.unsqueeze(labels, [1], lab1),
             ctx.node("Equal", [lab1, ctx.const(classes, suffix="classes")], [hit]),
             ctx.node("Cast", [hit], [oh], to=elem_type(dt))]
    ignore = ctx.attr("ignore_index")
    if ignore is None:
        return nodes, oh, None, float(np.prod(ctx.shape(labels)))
    eq, valid, vf = ctx.tmp("eq"), ctx.tmp("valid"), ctx.tmp("valid_f")
    count = ctx.tmp("count")
    nodes += [ctx.node("Equal", [labels, ctx.const(ignore, ctx.dtype(labels), "ignore")], [eq]),
              ctx.node("Not", [eq], [valid]),
              ctx.node("Cast", [valid], [vf], to=elem_type(dt)),
              ctx.reduce("ReduceSum", vf, list(range(len(ctx.shape(labels)))), count,
                         keepdims=0)]
    return nodes, oh, vf, count


def _scale(ctx, nodes, vf, denom, go):
    """Per-element factor for d(loss)/d(per-element term) under the node's reduction."""
    reduction = ctx.attr("reduction", "mean")
    g = go
    if reduction == "mean":
        g = ctx.tmp("g")
        d = ctx.scalar(denom, ctx.I(0)) if isinstance(denom, float) else denom
        nodes.append(ctx.node("Div", [go, d], [g]))
    if reduction == "none":
        g = ctx.tmp("g")
        nodes.append(ctx.unsqueeze(go, [1], g))
    if vf is not None:
        vf1, g2 = ctx.tmp("valid_1"), ctx.tmp("g_valid")
        nodes += [ctx.unsqueeze(vf, [1], vf1), ctx.node("Mul", [vf1, g], [g2])]
        g = g2
    return g


@grad("SoftmaxCrossEntropyLoss", inputs=(0,))
def softmax_cross_entropy_grad(ctx):
    # dX = (softmax(X) - onehot(label)) * dLoss / N   (+ the LogSoftmax term for d log_prob)
    nodes, oh, vf, denom = _target_terms(ctx, ctx.I(0), ctx.I(1))
    prob = ctx.tmp("prob")
    if len(ctx.onnx_node.output) < 2:
        raise ModelError(f"node '{ctx.name}': SoftmaxCrossEntropyLoss needs its log_prob output "
                         "to be differentiated")
    nodes.append(ctx.node("Exp", [ctx.O(1)], [prob]))
    parts = []
    if ctx.GO(0) is not None:
        diff, d = ctx.tmp("diff"), ctx.tmp("d_loss")
        g = _scale(ctx, nodes, vf, denom, ctx.GO(0))
        nodes += [ctx.node("Sub", [prob, oh], [diff]), ctx.node("Mul", [diff, g], [d])]
        parts.append(d)
    if ctx.GO(1) is not None:
        s, t, d = ctx.tmp("sum"), ctx.tmp("t"), ctx.tmp("d_logp")
        nodes += [ctx.reduce("ReduceSum", ctx.GO(1), [1], s, keepdims=1),
                  ctx.node("Mul", [prob, s], [t]), ctx.node("Sub", [ctx.GO(1), t], [d])]
        parts.append(d)
    nodes.append(ctx.node("Sum" if len(parts) > 1 else "Identity", parts, [ctx.GI(0)]))
    return nodes


@grad("NegativeLogLikelihoodLoss", inputs=(0,))
def nll_grad(ctx):
    # dX = -onehot(label) * dLoss / N
    nodes, oh, vf, denom = _target_terms(ctx, ctx.I(0), ctx.I(1))
    g = _scale(ctx, nodes, vf, denom, ctx.GO(0))
    t = ctx.tmp("t")
    nodes += [ctx.node("Mul", [oh, g], [t]), ctx.node("Neg", [t], [ctx.GI(0)])]
    return nodes
