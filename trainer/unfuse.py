"""BatchNormalization layers that a tool wrote as arithmetic on a convolution's weights, given
back their own node in the training copy of a model.

onnxoptimizer's `fuse_bn_into_conv` pass (in its default pass list) replaces an eval-form
BatchNormalization after a Conv by nodes that compute the convolution's new weight and bias from
the layer's tensors, which stay initializers:

    W' = W * Unsqueeze(s / Sqrt(var + Cast(eps)))        b' = (Cast(b) - mean) * (s / ...) + beta

The computation is the eval-form layer's, but every tensor in it is a parameter to the engine:
the running mean and variance would train by gradient, and the layer would never see batch
statistics, where PyTorch's .train() uses them. `unfuse_conv_batchnorms` finds that exact pattern
(each intermediate value read only inside it) and puts the Conv and a BatchNormalization of the
same tensors back (epsilon from the pass's constant), so the layer trains as any eval-form
BatchNormalization does (batch statistics and running updates with `batchnorm: train`, fixed
statistics with `batchnorm: eval`). The export keeps the model's own arithmetic, which reads the
same initializers. A bias the pass made for a bias-less convolution (zeros read only there) is
dropped again. Weights a tool computed outright (onnxsim, onnxslim, onnxruntime) cannot be
taken apart: `params.tool_fused_batchnorms` warns of those.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from trainer.errors import listing
from trainer.graph import NameScope, all_names, attrs_of, tensor_value, values_unknown


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output}


def _readers(g: onnx.GraphProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            out[i] = out.get(i, 0) + 1
    for o in g.output:
        out[o.name] = out.get(o.name, 0) + 1
    return out


def _match(conv: onnx.NodeProto, made: dict, reads: dict, inits: dict):
    """(nodes of the pattern, W, b or None, scale, beta, mean, var, eps, the pass's own
    constants) for a Conv whose weight and bias are onnxoptimizer's fused arithmetic, else
    None."""
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) != 3:
        return None

    def node(value: str, op: str):
        n = made.get(value)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def through_cast(value: str):
        """(the value a Cast reads, that Cast) or (value, None)."""
        c = node(value, "Cast")
        return (c.input[0], c) if c is not None else (value, None)

    mul_w = node(conv.input[1], "Mul")
    add_b = node(conv.input[2], "Add")
    if mul_w is None or add_b is None:
        return None
    w, unsq = mul_w.input[0], node(mul_w.input[1], "Unsqueeze")
    if unsq is None or w not in inits:
        return None
    div = node(unsq.input[0], "Div")
    if div is None:
        return None
    scale, sqrt = div.input[0], node(div.input[1], "Sqrt")
    if sqrt is None:
        return None
    add_v = node(sqrt.input[0], "Add")
    if add_v is None:
        return None
    var, (eps, cast_eps) = add_v.input[0], through_cast(add_v.input[1])
    mul_b = node(add_b.input[0], "Mul")
    beta = add_b.input[1]
    if mul_b is None or mul_b.input[1] != div.output[0]:
        return None
    sub = node(mul_b.input[0], "Sub")
    if sub is None:
        return None
    (bias, cast_b), mean = through_cast(sub.input[0]), sub.input[1]
    names = (w, bias, scale, beta, mean, var, eps)
    if any(n not in inits for n in names):
        return None
    dims = {k: tuple(inits[k].dims) for k in names}  # (values read only where needed: a large
    c = dims[w][0] if len(dims[w]) > 2 else -1  # weight may be a stub, see memory.strip)
    if (int(np.prod(dims[eps])) != 1 or any(dims[k] != (c,) for k in names[1:6])
            or any(values_unknown(inits[k]) for k in (eps, bias))):
        return None
    eps_value = tensor_value(inits[eps])
    if eps_value.dtype.kind != "f":
        return None
    if len(unsq.input) > 1:  # (opset 13: the axes input)
        if unsq.input[1] not in inits or values_unknown(inits[unsq.input[1]]):
            return None
        axes = tensor_value(inits[unsq.input[1]]).tolist()
    else:
        axes = list(attrs_of(unsq).get("axes", []))
    if axes != list(range(1, len(dims[w]))):
        return None
    nodes = [n for n in (cast_eps, add_v, sqrt, div, unsq, mul_w, cast_b, sub, mul_b, add_b)
             if n is not None]
    inner = {o for n in nodes for o in n.output}
    uses = {}
    for n in nodes + [conv]:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    if any(reads.get(v, 0) != uses.get(v, 0) for v in inner):
        return None  # (a value of the pattern read elsewhere: not the pass's own nodes)
    zeros = not np.any(tensor_value(inits[bias]))
    b = None if (zeros and reads.get(bias, 0) == 1) else bias
    own = [eps] + ([unsq.input[1]] if len(unsq.input) > 1 else []) + ([] if b else [bias])
    return nodes, w, b, scale, beta, mean, var, float(eps_value.reshape(())), own


def unfuse_conv_batchnorms(model: onnx.ModelProto, inplace: bool = False
                           ) -> tuple[onnx.ModelProto, list[str]]:
    """(`model` with each of onnxoptimizer's fused Conv + BatchNormalization patterns of its main
    graph made a Conv and a BatchNormalization again (a copy, unless inplace; the model itself
    where there are none), the names of those convolutions)."""
    g = model.graph
    if not any(n.op_type == "Conv" for n in g.node):
        return model, []
    inits = {t.name: t for t in g.initializer}
    made, reads = _producers(g), _readers(g)
    found = []
    for i, n in enumerate(g.node):
        got = _match(n, made, reads, inits)
        if got is not None:
            found.append((i, got))
    if not found:
        return model, []
    m = model if inplace else copy.deepcopy(model)
    g = m.graph
    scope = NameScope(all_names(g) | {n.name for n in g.node})
    drop = {id(p) for _, got in found for p in got[0]}
    convs = {i: got for i, got in found}
    nodes, names = [], []
    for i, n in enumerate(model.graph.node):
        if id(n) in drop:
            continue
        if i not in convs:
            nodes.append(g.node[i])
            continue
        _, w, b, scale, beta, mean, var, eps, _ = convs[i]
        name = n.name or f"Conv #{i}"
        y = scope.fresh(f"{n.output[0]}_conv")
        conv = helper.make_node("Conv", [n.input[0], w] + ([b] if b else []), [y],
                                name=scope.fresh(f"{name}/unfused"))
        conv.attribute.extend(copy.deepcopy(n.attribute))
        bn = helper.make_node("BatchNormalization", [y, scale, beta, mean, var],
                              [n.output[0]], name=scope.fresh(f"{name}/BatchNormalization"),
                              epsilon=eps)
        nodes += [conv, bn]
        names.append(name)
    del g.node[:]
    g.node.extend(nodes)
    # (the pass's own constants, now unread: epsilon, the axes, a bias of zeros it made)
    used = {i for n in g.node for i in n.input} | {v.name for v in (*g.input, *g.output)}
    gone = {k for _, got in found for k in got[-1]} - used
    keep = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m, names


def unfuse_line(names: list[str]) -> str:
    """What `check` and `train` say of the layers unfuse_conv_batchnorms gave back."""
    return ("BatchNormalization layers that onnxoptimizer's fuse_bn_into_conv wrote as "
            "arithmetic on the convolution's weights train as BatchNormalization layers again "
            "(batch statistics, running statistics updated, not trained; the export keeps the "
            "arithmetic): the ones after " + listing(names))
