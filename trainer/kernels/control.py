"""Control-flow kernels over planned subgraphs: If, Loop, Scan, SequenceMap, FlexAttention.

Graph attributes arrive as callables (`trainer.executor.Subgraph`): `body(*inputs) -> list`.
"""

from __future__ import annotations

import numpy as np
import onnx

from trainer.graph import np_dtype
from trainer.kernels import kernel, matmul


def _truth(cond) -> bool:
    """A one-element condition tensor read on the host."""
    return bool(cond.reshape(()))


def _empty_stack(xp, type_proto: onnx.TypeProto, axis: int = 0):
    """The stacked output of zero iterations: the body's declared element shape, 0 at `axis`
    (unknown dims count as 0)."""
    t = type_proto.tensor_type
    dtype = np_dtype(t.elem_type) if t.elem_type else np.dtype(np.float32)
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
    axis = axis % (len(dims) + 1)
    return xp.zeros(tuple(dims[:axis]) + (0,) + tuple(dims[axis:]), dtype=dtype)


def _stack(xp, items: list, type_proto: onnx.TypeProto, axis: int = 0):
    return xp.stack(items, axis=axis) if items else _empty_stack(xp, type_proto, axis)


@kernel("If")
def If(xp, cond, *, then_branch, else_branch):
    return tuple((then_branch if _truth(cond) else else_branch)())


@kernel("Loop")
def Loop(xp, M=None, cond=None, *v_initial, body):
    # As onnxruntime does, the body's condition output ends the loop even when the node has no
    # `cond` input; M (if given) bounds the trip count.
    trips = None if M is None else int(M.reshape(()))
    n = len(v_initial)
    state = list(v_initial)
    keep_going = xp.asarray(True) if cond is None else cond
    scans: list[list] = [[] for _ in body.output_names[1 + n:]]
    i = 0
    while (trips is None or i < trips) and _truth(keep_going):
        out = body(xp.asarray(np.int64(i)), keep_going, *state)
        keep_going, state = out[0], out[1:1 + n]
        for acc, v in zip(scans, out[1 + n:], strict=True):
            acc.append(v)
        i += 1
    types = body.output_types[1 + n:]
    return (*state, *[_stack(xp, acc, t) for acc, t in zip(scans, types, strict=True)])


@kernel("Scan", since=8)
def Scan_8(xp, sequence_lens, *args, body, num_scan_inputs, directions=None):
    """Batched form: axis 0 is the batch, axis 1 the sequence; `sequence_lens` [B] optional."""
    m = num_scan_inputs
    n = len(args) - m
    states, xs = args[:n], args[n:]
    directions = directions or [0] * m
    batch, max_len = xs[0].shape[0], xs[0].shape[1]
    lens = ([max_len] * batch if sequence_lens is None
            else [int(v) for v in sequence_lens.reshape(-1).tolist()])
    out_types = body.output_types[n:]
    finals: list[list] = [[] for _ in range(n)]
    scans: list[list] = [[] for _ in out_types]
    for b in range(batch):
        st = [s[b] for s in states]
        elems: list[list] = [[] for _ in out_types]
        for t in range(lens[b]):
            ins = [x[b, t if d == 0 else lens[b] - 1 - t] for x, d in zip(xs, directions,
                                                                         strict=True)]
            out = body(*st, *ins)
            st = out[:n]
            for acc, v in zip(elems, out[n:], strict=True):
                acc.append(v)
        for acc, s in zip(finals, st, strict=True):
            acc.append(s)
        for acc, items, ty in zip(scans, elems, out_types, strict=True):
            y = _stack(xp, items, ty)
            if y.shape[0] < max_len:  # padding past a short sequence is unspecified: zeros
                pad = xp.zeros((max_len - y.shape[0],) + y.shape[1:], dtype=y.dtype)
                y = xp.concatenate([y, pad])
            acc.append(y)
    finals_out = [xp.stack(f) if f else s for f, s in zip(finals, states, strict=True)]
    scans_out = []
    for acc, ty in zip(scans, out_types, strict=True):
        if not acc:  # an empty batch
            e = _empty_stack(xp, ty)
            scans_out.append(xp.zeros((0, max_len) + e.shape[1:], e.dtype))
        else:
            scans_out.append(xp.stack(acc))
    return (*finals_out, *scans_out)


@kernel("Scan", since=9)
def Scan(xp, *args, body, num_scan_inputs, scan_input_axes=None, scan_input_directions=None,
         scan_output_axes=None, scan_output_directions=None):
    m = num_scan_inputs
    n = len(args) - m
    states, xs = list(args[:n]), args[n:]
    in_axes = scan_input_axes or [0] * m
    in_dirs = scan_input_directions or [0] * m
    # Scan axis first (a view); reversed inputs are read backwards.
    xs = [xp.moveaxis(x, a % x.ndim, 0) for x, a in zip(xs, in_axes, strict=True)]
    xs = [x[::-1] if d else x for x, d in zip(xs, in_dirs, strict=True)]
    lengths = {x.shape[0] for x in xs}
    if len(lengths) > 1:
        raise ValueError(f"scan inputs have different sequence lengths {sorted(lengths)}")
    steps = lengths.pop() if lengths else 0
    out_types = body.output_types[n:]
    k = len(out_types)
    out_axes = scan_output_axes or [0] * k
    out_dirs = scan_output_directions or [0] * k
    scans: list[list] = [[] for _ in range(k)]
    for t in range(steps):
        out = body(*states, *[x[t] for x in xs])
        states = out[:n]
        for acc, v in zip(scans, out[n:], strict=True):
            acc.append(v)
    ys = [_stack(xp, acc[::-1] if d else acc, ty, a)
          for acc, d, ty, a in zip(scans, out_dirs, out_types, out_axes, strict=True)]
    return (*states, *ys)


@kernel("SequenceMap", since=17)
def SequenceMap(xp, input_sequence, *additional_inputs, body):
    """The body on each position of the sequences; tensor inputs are passed whole each time."""
    outs: list[list] = [[] for _ in body.output_names]
    for i in range(len(input_sequence)):
        extra = [a[i] if isinstance(a, list) else a for a in additional_inputs]
        for acc, v in zip(outs, body(input_sequence[i], *extra), strict=True):
            acc.append(v)
    return tuple(outs)


_SOFTMAX_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}


@kernel("FlexAttention", since=1, domain="ai.onnx.preview")
def FlexAttention(xp, Q, K, V, *, scale=None, score_mod=None, prob_mod=None,
                  softmax_precision=None):
    if Q.ndim != 4 or K.ndim != 4 or V.ndim != 4:
        raise ValueError(f"FlexAttention needs rank-4 Q, K, V; got {Q.shape}, {K.shape}, "
                         f"{V.shape}")
    hq, hkv = Q.shape[1], K.shape[1]
    if hq != hkv:
        if hq % hkv:
            raise ValueError(f"q_num_heads {hq} is not a multiple of kv_num_heads {hkv}")
        K = xp.repeat(K, hq // hkv, axis=1)  # query head h uses kv head h // group
        V = xp.repeat(V, hq // hkv, axis=1)
    if softmax_precision is not None:
        if softmax_precision not in _SOFTMAX_DTYPES:
            raise ValueError(f"unsupported softmax_precision {softmax_precision}")
        compute = np_dtype(softmax_precision)
    else:
        compute = np.dtype(np.float64) if Q.dtype == np.float64 else np.dtype(np.float32)
    if scale is None:
        scale = 1.0 / float(np.sqrt(Q.shape[-1]))
    # Q and K are each scaled by sqrt(scale) before the product (keeps float16 in range).
    root = xp.asarray(np.sqrt(np.float32(scale))).astype(Q.dtype)
    scores = matmul(xp, Q * root, xp.swapaxes(K * root, -1, -2)).astype(compute)
    if score_mod is not None:
        scores = score_mod(scores)[0].astype(compute, copy=False)
    scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    if prob_mod is not None:
        probs = prob_mod(probs)[0].astype(compute, copy=False)
    return (matmul(xp, probs, V.astype(compute)).astype(V.dtype),)
