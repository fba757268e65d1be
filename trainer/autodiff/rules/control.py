"""Gradient rules through control flow (If, Loop, Scan), optionals and FlexAttention: each
rule recomputes what the node stands for as plain nodes (trainer.autodiff.subgraph.Region)
and differentiates that with the engine; outer-scope tensors get gradients as implicit inputs.
"""

# Slots: explicit input i is slot i; the j-th outer-scope tensor the node's subgraphs read
# (sorted, subgraph.implicit_inputs) is slot len(node.input) + j, which the engine fills once it
# routes implicit inputs (ctx.needs is false for them until then).
# Loop/Scan: unrolled over the trip count / sequence length known when the training graph is
# built, forward recomputed (a Loop whose trip count or condition depends on data is refused).
# Measured on a Scan RNN (body of 5 nodes, [16, 64] state): 16 nodes and ~2.6 KB of graph per
# step (T=1024: 16k nodes, 2.7 MB, built in ~5 s), step time 1.1-1.4x that of lowering the Scan
# before autodiff (which skips the recompute) and ~4x the forward Scan alone. A reverse Scan
# would keep the graph O(body) but needs the per-step states saved by a second forward Scan
# and iteration-invariant shapes, and gains little per step in our executor (each body call
# is an interpreted plan: the unrolled forward runs within 1.1-1.5x of the Scan kernel), so
# unrolling was chosen; subgraph.MAX_UNROLLED_NODES bounds it.
# Sequences carry no gradient through the engine (its shapes hold tensors only): sequence ops
# and SequenceMap are lowered into tensor ops before differentiation (subgraph.lower), inside
# these rules' regions as well.

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from trainer.autodiff.registry import grad
from trainer.autodiff.subgraph import Region, zeros
from trainer.graph import elem_type, np_dtype

_ALL = tuple(range(1 << 12))  # variadic ops: every slot


@grad("Loop", inputs=_ALL[2:])
def loop_grad(ctx):
    # Unrolled (iteration i is the body with i and the previous state bound), then the plain
    # graph's backward: d state_{i-1} = body_i^T d state_i, scan outputs seed each iteration.
    r = Region(ctx)
    return r.emit(r.node_copy())


@grad("Scan", inputs=_ALL)
def scan_grad(ctx):
    # Unrolled over the static sequence length (any axes and directions; Scan-8 per batch
    # row), then the plain graph's backward. sequence_lens (Scan-8) is integer: no gradient.
    r = Region(ctx)
    return r.emit(r.node_copy())


@grad("If", inputs=())
def if_grad(ctx):
    # The gradient takes the branch the forward took: If(cond) whose branches each recompute
    # their forward and return d(outer tensor) for every outer tensor the If reads (zeros for
    # those a branch does not touch). A condition known when the graph is built needs no If.
    wanted = Region(ctx).wanted()
    slots, want = [s for s, _ in wanted], [x for _, x in wanted]
    if not want:
        return []
    attrs = {a.name: a.g for a in ctx.onnx_node.attribute}
    cond = ctx.static_value(ctx.I(0))
    if cond is not None:
        branch = "then_branch" if bool(np.asarray(cond).reshape(())) else "else_branch"
        return _branch(ctx, attrs[branch], branch, want, [ctx.GI(s) for s in slots])
    graphs = {}
    for branch in ("then_branch", "else_branch"):
        outs = [ctx.tmp(f"{branch}/d{j}") for j in range(len(want))]
        nodes = _branch(ctx, attrs[branch], branch, want, outs)
        vis = [helper.make_tensor_value_info(o, elem_type(ctx.dtype(x)), list(ctx.shape(x)))
               for o, x in zip(outs, want, strict=True)]
        graphs[branch] = helper.make_graph(nodes, ctx.tmp(branch), [], vis)
    return [ctx.node("If", [ctx.I(0)], [ctx.GI(s) for s in slots], **graphs)]


def _branch(ctx, graph: onnx.GraphProto, name: str, want: list[str], outs: list[str]
            ) -> list[onnx.NodeProto]:
    """A branch's recompute and backward, its gradient of each wanted outer tensor in outs."""
    r = Region(ctx)
    results = r.inline(graph, [], name)
    nodes, grads = r.gradients(results, want)
    for x, o in zip(want, outs, strict=True):
        nodes.append(ctx.node("Identity", [grads[x]], [o]) if x in grads else zeros(ctx, x, o))
    return nodes


@grad("Optional")
def optional_grad(ctx):
    # An optional holding X is X: dX = d(optional)
    return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]


@grad("OptionalGetElement")
def optional_get_element_grad(ctx):
    # Y is the optional's (or tensor's) value: d(input) = dY
    return [ctx.node("Identity", [ctx.GO(0)], [ctx.GI(0)])]


@grad("FlexAttention", domain="ai.onnx.preview")
def flex_attention_grad(ctx):
    # Y = mod_p(softmax(mod_s((Q*r) (K*r)^T))) V with r = sqrt(scale), KV heads repeated for
    # GQA, the softmax in softmax_precision; recomputed as standard ops with score_mod and
    # prob_mod inlined, then differentiated (dV = P^T dY, dS = P * (dP - rowsum(dP * P)), ...).
    r = Region(ctx)
    q, k, v = (r.input(i) for i in range(3))
    (b, hq, _, d), dt = ctx.shape(ctx.I(0)), ctx.dtype(ctx.I(0))
    hkv, skv, dv = ctx.shape(ctx.I(1))[1], ctx.shape(ctx.I(1))[2], ctx.shape(ctx.I(2))[3]
    prec = ctx.attr("softmax_precision")
    compute = np_dtype(prec) if prec is not None else (
        np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32))
    scale = ctx.attr("scale")
    scale = 1.0 / float(np.sqrt(d)) if scale is None else scale

    def emit(op, *inputs, **attrs):
        out = ctx.tmp(op)
        r.nodes.append(ctx.node(op, list(inputs), [out], **attrs))
        return out

    def repeat(x, last):  # [B, Hkv, S, E] -> [B, Hq, S, E], head h reads h // (Hq / Hkv)
        if hq == hkv:
            return x
        g = hq // hkv
        x5 = emit("Unsqueeze", x, ctx.const([2], np.int64, "axes"))
        x5 = emit("Expand", x5, ctx.const([b, hkv, g, skv, last], np.int64, "shape"))
        return emit("Reshape", x5, ctx.const([b, hq, skv, last], np.int64, "shape"))

    def cast(x, src, to):
        return x if src == to else emit("Cast", x, to=elem_type(to))

    root = ctx.const(np.sqrt(np.float32(scale)), dt, "root")
    kt = emit("Transpose", repeat(emit("Mul", k, root), d), perm=[0, 1, 3, 2])
    s = cast(emit("MatMul", emit("Mul", q, root), kt), dt, compute)
    mods = {a.name: a.g for a in ctx.onnx_node.attribute}
    if "score_mod" in mods:
        s = emit("Cast", r.inline(mods["score_mod"], [s], "score_mod")[0],
                 to=elem_type(compute))
    p = emit("Softmax", s, axis=-1 if ctx.opset >= 13 else 3)
    if "prob_mod" in mods:
        p = emit("Cast", r.inline(mods["prob_mod"], [p], "prob_mod")[0], to=elem_type(compute))
    y = emit("MatMul", p, cast(repeat(v, dv), dt, compute))
    return r.emit([cast(y, compute, dt)])
