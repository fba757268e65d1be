"""onnxruntime's fused operators, lowered to the standard ONNX operators they stand for.

onnxruntime's graph optimizers (`SessionOptions.optimized_model_filepath`,
`onnxruntime.transformers.optimizer`, optimum's `ORTOptimizer`) replace chains of standard
nodes by fused nodes of the `com.microsoft` domain (Attention, SkipLayerNormalization,
FusedMatMul, Gelu...), and below opset 17 write LayerNormalization and
SimplifiedLayerNormalization in the ONNX domain, where the specification has no such op yet.
A model saved that way trains here through a copy of its graph in which each such node is
replaced by the standard nodes that compute the same thing (`lower_contrib`): forward kernels
and gradient rules are those of the standard ops, and the training graph stays a standard ONNX
model. The export keeps the model's own fused nodes, which onnxruntime runs.

Each lowering follows onnxruntime's operator schemas (their documentation, as
`onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()` returns it) and is
tested against onnxruntime's own kernels. Forms that are for incremental decoding (past and
present key/value states, shared buffers, rotary embeddings inside Attention), packed batches
and quantized weights are not lowered: `check` and `train` name each such node.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trainer.errors import ModelError
from trainer.graph import NameScope, all_names, attrs_of, node_name, opset_of

CONTRIB = "com.microsoft"
# onnxruntime's contrib LayerNormalization (since opset 1 of the ONNX domain in its registry)
# is the standard one from opset 17; SimplifiedLayerNormalization (RMSNorm) is never standard.
_ONNX_DOMAIN_CONTRIB = {"LayerNormalization": 17, "SimplifiedLayerNormalization": None}


def contrib_key(node: onnx.NodeProto, model: onnx.ModelProto) -> str | None:
    """The op's name in LOWERINGS if node is an onnxruntime fused node this module lowers
    (whatever its inputs turn out to be), else None."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain == CONTRIB and node.op_type in LOWERINGS:
        return node.op_type
    if domain == "" and node.op_type in _ONNX_DOMAIN_CONTRIB:
        std = _ONNX_DOMAIN_CONTRIB[node.op_type]
        if std is None or opset_of(model) < std:
            return node.op_type
    return None


def has_contrib(model: onnx.ModelProto) -> bool:
    return any(contrib_key(n, model) for n in model.graph.node)


def contrib_counts(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        if contrib_key(n, model):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


class _Lowering:
    """Emits the standard nodes for one fused node: names made unique in the graph, constants
    of the node's float type, forms chosen for the model's opset."""

    def __init__(self, node: onnx.NodeProto, index: int, opset: int, scope: NameScope,
                 ftype: int, rank: Callable[[str], int | None],
                 last_dim: Callable[[str], int | None], const_dims):
        self.node, self.opset, self.scope, self.ftype = node, opset, scope, ftype
        self.where = f"{node.op_type} node '{node_name(node, index)}'"
        self.base = node.name or f"{node.op_type}_{index}"
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._rank = rank
        self.last_dim = last_dim  # name -> its last axis's static length, or None
        self.const_dims = const_dims  # name -> dims of an initializer, or None
        self.attrs = attrs_of(node)

    # ---- inputs, outputs and attributes of the fused node
    def input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def output(self, i: int) -> str:
        return self.node.output[i] if i < len(self.node.output) else ""

    def attr(self, name: str, default=None):
        v = self.attrs.get(name, default)
        return v.decode() if isinstance(v, bytes) else v

    def refuse(self, why: str):
        raise ModelError(f"{self.where}: {why}; this form is not lowered to standard ONNX ops "
                         "for training (train the model as it was before onnxruntime's "
                         "optimizer fused it)")

    def rank(self, name: str) -> int:
        r = self._rank(name)
        if r is None:
            self.refuse(f"the rank of its input '{name}' is unknown")
        return r

    # ---- emitting
    def fresh(self, what: str) -> str:
        return self.scope.fresh(f"{self.base}/{what}")

    def op(self, op_type: str, inputs: list[str], out: str | None = None, n_out: int = 1,
           **attrs):
        outs = [out] if out else [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs,
                                           name=self.fresh(f"lowered/{op_type}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype: int | None = None) -> str:
        dtype = self.ftype if dtype is None else dtype
        np_type = helper.tensor_dtype_to_np_dtype(dtype)
        if np.issubdtype(np_type, np.floating):  # (float32's lowest mask value in float16)
            info = np.finfo(np_type)
            value = np.clip(np.asarray(value, np.float64), float(info.min), float(info.max))
        arr = np.array(value, dtype=np_type)
        name = self.fresh("const")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, values) -> str:
        return self.const(list(values), TensorProto.INT64)

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(axes)], keepdims=1)
        return self.op("ReduceMean", [x], axes=axes, keepdims=1)

    def reduce_sum(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.ints(axes)], keepdims=keepdims)
        return self.op("ReduceSum", [x], axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)])
        return self.op("Unsqueeze", [x], axes=axes)

    def scalar(self, x: str) -> str:
        """A one-element 1-D tensor as a scalar (Squeeze of axis 0)."""
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints([0])])
        return self.op("Squeeze", [x], axes=[0])

    def axis_length(self, x: str, axis: int) -> str:
        """x's length along `axis`, as an int64 scalar."""
        return self.scalar(self.op("Gather", [self.op("Shape", [x]), self.ints([axis])],
                                   axis=0))

    def slice_last(self, x: str, start: int, end: int, out: str | None = None) -> str:
        if self.opset < 10:
            return self.op("Slice", [x], out, axes=[-1], starts=[start], ends=[end])
        return self.op("Slice", [x, self.ints([start]), self.ints([end]), self.ints([-1])],
                       out)

    def gelu(self, x: str, out: str | None = None) -> str:
        """0.5 x (1 + erf(x / sqrt 2)), as onnxruntime's Gelu."""
        e = self.op("Erf", [self.op("Mul", [x, self.const(1 / np.sqrt(2))])])
        h = self.op("Mul", [self.op("Add", [e, self.const(1.0)]), self.const(0.5)])
        return self.op("Mul", [x, h], out)

    def activation(self, x: str, kind: str, params: list[float], out: str) -> str:
        """FusedConv's and FusedGemm's activation (onnxruntime's MLAS activations)."""
        if kind in ("", "Identity"):
            return self.op("Identity", [x], out)
        if kind in ("Relu", "Tanh", "Sigmoid"):
            return self.op(kind, [x], out)
        if kind == "LeakyRelu":
            return self.op("LeakyRelu", [x], out, alpha=params[0] if params else 0.01)
        if kind == "HardSigmoid":
            alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
            return self.op("HardSigmoid", [x], out, alpha=alpha, beta=beta)
        if kind == "Clip" and len(params) == 2:
            return self.op("Max", [self.op("Min", [x, self.const(params[1])]),
                                   self.const(params[0])], out)
        self.refuse(f"activation '{kind}' with parameters {params}")

    def layer_norm(self, x: str, gamma: str, beta: str, eps: float, out: str,
                   mean_out: str = "", inv_out: str = "", axis: int = -1) -> str:
        """(x - mean) / sqrt(var + eps) * gamma + beta over the axes from `axis` on."""
        axes = [axis] if axis == -1 else list(range(axis, self.rank(x))) if axis >= 0 else \
            list(range(axis, 0))
        if self.opset >= 17 and not mean_out and not inv_out:
            return self.op("LayerNormalization", [x, gamma] + ([beta] if beta else []), out,
                           axis=axes[0], epsilon=eps)
        mean = self.reduce_mean(x, axes)
        d = self.op("Sub", [x, mean])
        var = self.reduce_mean(self.op("Mul", [d, d]), axes)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [var, self.const(eps)])])])
        if mean_out:
            self.op("Identity", [mean], mean_out)
        if inv_out:
            self.op("Identity", [inv], inv_out)
        y = self.op("Mul", [self.op("Mul", [d, inv]), gamma], None if beta else out)
        return self.op("Add", [y, beta], out) if beta else y

    def rms_norm(self, x: str, gamma: str, eps: float, out: str, inv_out: str = "",
                 axis: int = -1) -> str:
        """x / sqrt(mean(x^2) + eps) * gamma over the axes from `axis` on."""
        axes = [axis] if axis == -1 else list(range(axis, self.rank(x))) if axis >= 0 else \
            list(range(axis, 0))
        ms = self.reduce_mean(self.op("Mul", [x, x]), axes)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.const(eps)])])])
        if inv_out:
            self.op("Identity", [inv], inv_out)
        return self.op("Mul", [self.op("Mul", [x, inv]), gamma], out)


# ---- the lowerings: one function per op, emitting into a _Lowering

def _gelu(L: _Lowering) -> None:
    L.gelu(L.input(0), L.output(0))


def _bias_gelu(L: _Lowering) -> None:
    L.gelu(L.op("Add", [L.input(0), L.input(1)]), L.output(0))


def _fast_gelu(L: _Lowering) -> None:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), x = X + bias."""
    x = L.input(0)
    if L.input(1):
        x = L.op("Add", [x, L.input(1)])
    cube = L.op("Mul", [L.op("Mul", [x, x]), x])
    inner = L.op("Add", [x, L.op("Mul", [cube, L.const(0.044715)])])
    t = L.op("Tanh", [L.op("Mul", [inner, L.const(np.sqrt(2 / np.pi))])])
    h = L.op("Mul", [L.op("Add", [t, L.const(1.0)]), L.const(0.5)])
    L.op("Mul", [x, h], L.output(0))


def _quick_gelu(L: _Lowering) -> None:
    """x sigmoid(alpha x)."""
    x = L.input(0)
    s = L.op("Sigmoid", [L.op("Mul", [x, L.const(L.attr("alpha", 1.702))])])
    L.op("Mul", [x, s], L.output(0))


def _bias_add(L: _Lowering) -> None:
    L.op("Add", [L.op("Add", [L.input(0), L.input(1)]), L.input(2)], L.output(0))


def _fused_matmul(L: _Lowering) -> None:
    """alpha * (A or A^T) @ (B or B^T), the transposes of the last two axes."""
    if L.attr("transBatchA", 0) or L.attr("transBatchB", 0):
        L.refuse("transBatchA/transBatchB set")
    a, b = L.input(0), L.input(1)
    for flag, i in (("transA", 0), ("transB", 1)):
        if L.attr(flag, 0):
            x = L.input(i)
            r = L.rank(x)
            if r < 2:
                L.refuse(f"{flag} on a 1-D input")
            perm = list(range(r - 2)) + [r - 1, r - 2]
            t = L.op("Transpose", [x], perm=perm)
            a, b = (t, b) if i == 0 else (a, t)
    alpha = float(L.attr("alpha", 1.0))
    if alpha == 1.0:
        L.op("MatMul", [a, b], L.output(0))
    else:
        L.op("Mul", [L.op("MatMul", [a, b]), L.const(alpha)], L.output(0))


def _fused_gemm(L: _Lowering) -> None:
    params = [L.attr(k) for k in ("activation_alpha", "activation_beta", "activation_gamma")]
    params = [float(p) for p in params if p is not None]
    if L.attr("leaky_relu_alpha") is not None:
        params = [float(L.attr("leaky_relu_alpha"))]
    gemm_attrs = {k: L.attrs[k] for k in ("alpha", "beta", "transA", "transB") if k in L.attrs}
    ins = [x for x in L.node.input[:3]]
    y = L.op("Gemm", ins, **gemm_attrs)
    L.activation(y, L.attr("activation", "") or "", params, L.output(0))


def _fused_conv(L: _Lowering) -> None:
    """Conv, plus Z (a fourth input) where given, then the activation."""
    conv_attrs = {k: L.attrs[k] for k in ("auto_pad", "dilations", "group", "kernel_shape",
                                         "pads", "strides") if k in L.attrs}
    ins = [x for x in L.node.input[:3]]
    while ins and not ins[-1]:
        ins.pop()
    y = L.op("Conv", ins, **conv_attrs)
    if L.input(3):
        y = L.op("Add", [y, L.input(3)])
    params = [float(p) for p in (L.attr("activation_params") or [])]
    L.activation(y, L.attr("activation", "") or "", params, L.output(0))


def _skip_norm(L: _Lowering, simplified: bool) -> None:
    """s = input + skip (+ bias); y = LayerNorm(s) * gamma (+ beta), or RMSNorm(s) * gamma;
    outputs y, mean, inv_std_var, s."""
    x, skip, gamma = L.input(0), L.input(1), L.input(2)
    beta, bias = ("", L.input(3)) if simplified else (L.input(3), L.input(4))
    eps = float(L.attr("epsilon", 1e-12))
    s = L.op("Add", [x, skip], None if bias else (L.output(3) or None))
    if bias:
        s = L.op("Add", [s, bias], L.output(3) or None)
    if simplified:
        if L.output(1):
            L.refuse("its mean output is read (RMS normalization has no mean)")
        L.rms_norm(s, gamma, eps, L.output(0), inv_out=L.output(2))
    else:
        L.layer_norm(s, gamma, beta, eps, L.output(0), mean_out=L.output(1),
                     inv_out=L.output(2))


def _layer_norm(L: _Lowering) -> None:
    """onnxruntime's LayerNormalization below opset 17 (the standard op's semantics)."""
    L.layer_norm(L.input(0), L.input(1), L.input(2), float(L.attr("epsilon", 1e-5)),
                 L.output(0), mean_out=L.output(1), inv_out=L.output(2),
                 axis=int(L.attr("axis", -1)))


def _simplified_layer_norm(L: _Lowering) -> None:
    L.rms_norm(L.input(0), L.input(1), float(L.attr("epsilon", 1e-5)), L.output(0),
               inv_out=L.output(1), axis=int(L.attr("axis", -1)))


def _embed_layer_norm(L: _Lowering) -> None:
    """BERT's embeddings: word[input_ids] + position[position_ids or 0..S-1]
    (+ segment[segment_ids]), layer-normalized; mask_index = the number of ones in each row
    of the mask (the first padded position of a right-padded batch)."""
    ids, seg_ids, word, pos, seg = (L.input(i) for i in range(5))
    gamma, beta, mask, pos_ids = L.input(5), L.input(6), L.input(7), L.input(8)
    e = L.op("Gather", [word, ids], axis=0)
    if not pos_ids:
        if L.opset < 11:
            L.refuse("no position_ids below opset 11 (Range)")
        zero, one = L.const(0, TensorProto.INT64), L.const(1, TensorProto.INT64)
        pos_ids = L.op("Range", [zero, L.axis_length(ids, 1), one])
    p = L.op("Gather", [pos, pos_ids], axis=0)
    total = L.op("Add", [e, p])
    if seg_ids and seg:
        total = L.op("Add", [total, L.op("Gather", [seg, seg_ids], axis=0)])
    if L.output(2):
        L.op("Identity", [total], L.output(2))
    L.layer_norm(total, gamma, beta, float(L.attr("epsilon", 1e-12)), L.output(0))
    if L.output(1):
        if not mask:
            L.refuse("its mask_index output is read but it has no mask input")
        L.op("Cast", [L.reduce_sum(L.op("Cast", [mask], to=TensorProto.INT64), [1],
                                   keepdims=0)], L.output(1), to=TensorProto.INT32)


def _heads(L: _Lowering, x: str, heads: int, size: int, keys: bool = False) -> str:
    """[B, S, heads * size] -> [B, heads, S, size] ([B, heads, size, S] for keys)."""
    r = L.op("Reshape", [x, L.ints([0, 0, heads, size])])
    return L.op("Transpose", [r], perm=[0, 2, 3, 1] if keys else [0, 2, 1, 3])


def _attend(L: _Lowering, q: str, k: str, v: str, heads: int, qk_size: int, v_size: int,
            mask: str, mask_rank: int | None, bias: str, out: str) -> None:
    """softmax(q k^T * scale + masks + bias) v over heads, merged back to [B, S, heads*v]."""
    scale = L.attr("scale")
    scale = float(scale) if scale not in (None, 0.0) else 1.0 / np.sqrt(qk_size)
    filt = float(L.attr("mask_filter_value", -10000.0))
    qh, kh, vh = _heads(L, q, heads, qk_size), _heads(L, k, heads, qk_size, keys=True), \
        _heads(L, v, heads, v_size)
    scores = L.op("Mul", [L.op("MatMul", [qh, kh]), L.const(scale)])
    if mask:
        scores = L.op("Add", [scores, _additive_mask(L, mask, mask_rank, scores, filt)])
    if L.attr("unidirectional", 0):
        # (future keys removed, as onnxruntime does: the lowest value of the type, where
        # mask_filter_value, -3 say, or a query whose past keys are all padding would let
        # them weigh)
        lowest = float(np.finfo(helper.tensor_dtype_to_np_dtype(L.ftype)).min)
        scores = L.op("Add", [scores, _causal(L, scores, lowest)])
    if bias:
        scores = L.op("Add", [scores, bias])
    probs = L.op("Softmax", [scores], axis=-1)
    ctx = L.op("Transpose", [L.op("MatMul", [probs, vh])], perm=[0, 2, 1, 3])
    L.op("Reshape", [ctx, L.ints([0, 0, heads * v_size])], out)


def _additive_mask(L: _Lowering, mask: str, rank: int | None, scores: str,
                   filt: float) -> str:
    """A [B, 1 or S, T]-broadcastable additive mask from onnxruntime's mask forms: raw 0/1
    masks of shape (B, T) or (B, S, T), and right-padding lengths of shape (B)."""
    if rank == 2:
        m = L.unsqueeze(L.unsqueeze(mask, [1]), [1])
    elif rank == 3:
        m = L.unsqueeze(mask, [1])
    elif rank == 1:
        # key position j is kept where j < length[b]
        zero, one = L.const(0, TensorProto.INT64), L.const(1, TensorProto.INT64)
        j = L.op("Range", [zero, L.axis_length(scores, 3), one])
        lengths = L.unsqueeze(L.op("Cast", [mask], to=TensorProto.INT64), [1, 2, 3])
        keep = L.op("Less", [j, lengths])
        return L.op("Mul", [L.op("Sub", [L.const(1.0), L.op("Cast", [keep], to=L.ftype)]),
                            L.const(filt)])
    else:
        L.refuse(f"a mask_index of rank {rank} (lowered: (B, T), (B, S, T) raw masks and "
                 "(B) right-padding lengths)")
    return L.op("Mul", [L.op("Sub", [L.const(1.0), L.op("Cast", [m], to=L.ftype)]),
                        L.const(filt)])


def _causal(L: _Lowering, scores: str, filt: float) -> str:
    """filt where key position j > query position i, else 0, as [S, T]."""
    zero, one = L.const(0, TensorProto.INT64), L.const(1, TensorProto.INT64)
    s, t = L.axis_length(scores, 2), L.axis_length(scores, 3)
    i = L.unsqueeze(L.op("Range", [zero, s, one]), [1])
    j = L.unsqueeze(L.op("Range", [zero, t, one]), [0])
    later = L.op("Greater", [j, L.op("Add", [i, L.op("Sub", [t, s])])])
    return L.op("Mul", [L.op("Cast", [later], to=L.ftype), L.const(filt)])


def _attention(L: _Lowering) -> None:
    """BERT/GPT-2 self-attention with merged Q/K/V weights [D, Hq + Hk + Hv]."""
    if any(L.input(i) for i in (4, 6)) or L.output(1):
        L.refuse("past/present key-value state (incremental decoding)")
    for flag in ("do_rotary", "past_present_share_buffer"):
        if L.attr(flag, 0):
            L.refuse(f"{flag} set")
    heads = int(L.attr("num_heads"))
    dims = L.const_dims(L.input(1))
    sizes = L.attr("qkv_hidden_sizes")
    if sizes:
        sizes = [int(s) for s in sizes]
    elif dims is not None and len(dims) == 2 and dims[1] % 3 == 0:
        sizes = [dims[1] // 3] * 3
    else:
        L.refuse("its merged weights' shape is unknown (not an initializer)")
    if any(s % heads for s in sizes):
        L.refuse(f"hidden sizes {sizes} not multiples of num_heads {heads}")
    qkv = L.op("MatMul", [L.input(0), L.input(1)])
    if L.input(2):
        qkv = L.op("Add", [qkv, L.input(2)])
    edges = np.cumsum([0] + sizes)
    q, k, v = (L.slice_last(qkv, int(edges[i]), int(edges[i + 1])) for i in range(3))
    mask = L.input(3)
    _attend(L, q, k, v, heads, sizes[0] // heads, sizes[2] // heads, mask,
            L.rank(mask) if mask else None, L.input(5), L.output(0))


def _multi_head_attention(L: _Lowering) -> None:
    """Attention over separate query, key and value [B, S|L, D], with the projection bias."""
    if any(L.input(i) for i in range(6, 10)) or any(L.output(i) for i in (1, 2, 3)):
        L.refuse("past/present key-value state or a qk output")
    q, k, v = L.input(0), L.input(1), L.input(2)
    if not k or not v or L.rank(q) != 3 or L.rank(k) != 3 or L.rank(v) != 3:
        L.refuse("packed Q/K/V or past key/value inputs (lowered: query, key and value of "
                 "rank 3)")
    heads = int(L.attr("num_heads"))
    hq, hv = L.last_dim(q), L.last_dim(v)
    if not hq or not hv:
        L.refuse("the hidden sizes of query and value are unknown")
    bias = L.input(3)
    if bias:  # (hidden, hidden, v_hidden)
        q = L.op("Add", [q, L.slice_last(bias, 0, hq)])
        k = L.op("Add", [k, L.slice_last(bias, hq, 2 * hq)])
        v = L.op("Add", [v, L.slice_last(bias, 2 * hq, 2 * hq + hv)])
    mask = L.input(4)
    _attend(L, q, k, v, heads, hq // heads, hv // heads, mask,
            L.rank(mask) if mask else None, L.input(5), L.output(0))


LOWERINGS: dict[str, Callable[[_Lowering], None]] = {
    "Gelu": _gelu, "BiasGelu": _bias_gelu, "FastGelu": _fast_gelu, "QuickGelu": _quick_gelu,
    "BiasAdd": _bias_add, "FusedMatMul": _fused_matmul, "TransposeMatMul": _fused_matmul,
    "FusedGemm": _fused_gemm, "FusedConv": _fused_conv,
    "SkipLayerNormalization": lambda L: _skip_norm(L, simplified=False),
    "SkipSimplifiedLayerNormalization": lambda L: _skip_norm(L, simplified=True),
    "LayerNormalization": _layer_norm, "SimplifiedLayerNormalization": _simplified_layer_norm,
    "EmbedLayerNormalization": _embed_layer_norm, "Attention": _attention,
    "MultiHeadAttention": _multi_head_attention,
}


def _skeleton(model: onnx.ModelProto, nodes, inits) -> onnx.ModelProto:
    """The graph without initializer data (each one an input of its type and shape, but small
    integer constants), for shape inference."""
    g = model.graph
    inputs = list(g.input)
    have = {vi.name for vi in inputs}
    small = []  # (integer constants such as axes and shapes keep their values)
    for t in inits:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and \
                int(np.prod(t.dims)) <= 64 and t.data_location != TensorProto.EXTERNAL:
            small.append(t)
        elif t.name not in have:
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph = helper.make_graph(nodes, g.name or "g", inputs, list(g.output), small)
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _float_type(model: onnx.ModelProto, node: onnx.NodeProto, inits) -> int:
    """The float type of a node's float initializer input, else the model's most common one."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    for x in node.input:
        t = inits.get(x)
        if t is not None and t.data_type in floats:
            return t.data_type
    counts: dict[int, int] = {}
    for t in inits.values():
        if t.data_type in floats:
            counts[t.data_type] = counts.get(t.data_type, 0) + 1
    return max(counts, key=counts.get) if counts else TensorProto.FLOAT


LOWERED_KEY = "onnx_trainer.lowered_from"  # metadata of a lowered node: the fused node's name


def lower_contrib(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """`model` (a copy, unless inplace) with every onnxruntime fused node of its main graph
    replaced by the standard nodes it stands for (same input and output names); the model
    itself where it has none. Raises ModelError naming each node whose form is not lowered."""
    if not has_contrib(model):
        return model
    m = model if inplace else copy.deepcopy(model)
    g = m.graph
    opset = opset_of(m)
    scope = NameScope(all_names(g) | {n.name for n in g.node})
    inits = {t.name: t for t in g.initializer}
    done: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    ranks: dict[str, int] = {}
    last_dims: dict[str, int | None] = {}
    refusals: list[str] = []
    stale = True

    def infer() -> None:
        nonlocal stale
        if not stale:
            return
        rest = [n for n in g.node[len(done_src):]]
        sk = _skeleton(m, done + rest, list(inits.values()) + added)
        try:
            sk = onnx.shape_inference.infer_shapes(sk)
        except Exception:  # noqa: BLE001 - then ranks stay unknown and the node says so
            pass
        for vi in (*sk.graph.value_info, *sk.graph.input, *sk.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
                d = tt.shape.dim[-1] if tt.shape.dim else None
                last_dims[vi.name] = d.dim_value if d is not None and d.HasField(
                    "dim_value") else None
        stale = False

    def rank(name: str) -> int | None:
        if name in inits:
            return len(inits[name].dims)
        if name not in ranks:
            infer()
        return ranks.get(name)

    def const_dims(name: str):
        t = inits.get(name)
        return list(t.dims) if t is not None else None

    def last_dim(name: str) -> int | None:
        if name in inits:
            return inits[name].dims[-1] if inits[name].dims else None
        if name not in last_dims:
            infer()
        return last_dims.get(name)

    done_src: list[onnx.NodeProto] = []
    for i, node in enumerate(list(g.node)):
        done_src.append(node)
        key = contrib_key(node, m)
        if key is None:
            done.append(node)
            continue
        L = _Lowering(node, i, opset, scope, _float_type(m, node, inits), rank, last_dim,
                      const_dims)
        try:
            LOWERINGS[key](L)
        except ModelError as exc:
            refusals.append(str(exc))
            done.append(node)
            continue
        for made in L.nodes:  # (no exporter's node: params.restore_optimized_parameters
            # takes nodes without an FX record for the exporter's own)
            made.metadata_props.add(key=LOWERED_KEY, value=node.name or node.op_type)
        done.extend(L.nodes)
        added.extend(L.inits)
        stale = True
    if refusals:
        raise ModelError(f"{len(refusals)} onnxruntime fused node(s) cannot be trained: "
                         + "; ".join(refusals[:6])
                         + (f" ... ({len(refusals)} in all)" if len(refusals) > 6 else ""))
    del g.node[:]
    g.node.extend(done)
    g.initializer.extend(added)
    return m
