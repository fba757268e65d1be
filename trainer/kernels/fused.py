"""Fused kernels the planner substitutes for node chains of training graphs (BatchNormalization
training rewrite and its backward, softmax cross entropy, LayerNorm and Conv weight gradients, a
float32 Erf), and the matchers that find those chains; the training graph itself stays ONNX."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.graph import attrs_of
from trainer.kernels import compiled, get_kernel, nn, poolfuse, rowfuse
from trainer.kernels.elementwise import Erf, erf_rational
from trainer.kernels.reduce import ROW_MAX_MIN, max_of, mean_of, squares_finite, sum_of, sum_plan
from trainer.simplify import PNode, consumers, fold_constants, producers, remove_identities

# -- kernels --------------------------------------------------------------------------------------
BN_VALUES = ("mean", "xc", "sq", "var", "ve", "sd", "xhat", "scaled", "y")


def bn_train_forward(xp, x, s_b, b_b, *, axes, eps, want):
    """The BatchNormalization training rewrite's values (the ones named in `want`), computed
    with the same operations in the same order as its nodes, with fewer temporaries (on a
    device, as generated kernels: kernels/rowfuse.py)."""
    fast = rowfuse.bn_train(xp, x, s_b, b_b, axes=axes, eps=eps, want=want)
    if fast is not None:
        return fast
    mean = mean_of(xp, x, axes, True)
    xc = x - mean
    sq = xc * xc
    var = mean_of(xp, sq, axes, True)
    ve = var + eps
    sd = xp.sqrt(ve)
    if "sq" not in want:
        del sq
    if "xc" in want:
        xhat = xc / sd
    else:
        xhat = xp.divide(xc, sd, out=xc)
    scaled = xhat * s_b if s_b is not None else xhat
    if "scaled" in want:
        y = scaled + b_b if b_b is not None else scaled.copy()
    else:
        y = xp.add(scaled, b_b, out=scaled) if b_b is not None else scaled
    local = {"mean": mean, "xc": xc, "var": var, "ve": ve, "sd": sd, "xhat": xhat,
             "scaled": scaled, "y": y}
    if "sq" in want:
        local["sq"] = sq
    return tuple(local[k] for k in want)


def bn_train_backward(xp, dy, xhat, sd, s_b, *, axes, count, want_dx, want_ds, want_db,
                      ds_shape, db_shape):
    """dX, dScale, dBias of y = xhat * s + b with xhat = (x - mean(x)) / sd(x) (batch
    statistics): dX = s / sd * (dy - mean(dy) - xhat * mean(dy * xhat)). (On a device, as
    generated kernels: kernels/rowfuse.py.)"""
    fast = rowfuse.bn_train_backward(xp, dy, xhat, sd, s_b, axes=axes, count=count,
                                     want_dx=want_dx, want_ds=want_ds, want_db=want_db,
                                     ds_shape=ds_shape, db_shape=db_shape)
    if fast is not None:
        return fast
    db = sum_of(xp, dy, axes, True)
    t = dy * xhat
    ds = sum_of(xp, t, axes, True)
    out = []
    if want_dx:
        inv = dy.dtype.type(1.0 / count)
        xp.multiply(xhat, ds * inv, out=t)
        xp.subtract(dy, t, out=t)
        t -= db * inv
        t *= (s_b / sd) if s_b is not None else 1 / sd
        out.append(t)
    if want_ds:
        out.append(ds.reshape(ds_shape))
    if want_db:
        out.append(db.reshape(db_shape))
    return tuple(out)


def layer_norm_backward(xp, dy, x, scale, *, axes, eps, want_dx, want_ds, want_db,
                        ds_shape, db_shape):
    """dX, dScale, dBias of LayerNormalization (statistics recomputed from x, as its gradient
    rule does): dX = inv * (g - mean(g) - xhat * mean(g * xhat)), g = dY * scale. (On a
    device, as generated kernels: kernels/rowfuse.py.)"""
    fast = rowfuse.layer_norm_backward(xp, dy, x, scale, axes=axes, eps=eps, want_dx=want_dx,
                                       want_ds=want_ds, want_db=want_db, ds_shape=ds_shape,
                                       db_shape=db_shape)
    if fast is not None:
        return fast
    lead = tuple(range(axes[0]))
    mean = mean_of(xp, x, axes, True)
    xhat = x - mean
    var = mean_of(xp, xhat * xhat, axes, True)
    inv = 1 / xp.sqrt(var + x.dtype.type(eps))
    xhat *= inv
    out = []
    ds = sum_of(xp, dy * xhat, lead).reshape(ds_shape) if want_ds else None
    if want_dx:
        g = dy * scale.reshape(x.shape[axes[0]:])
        mg = mean_of(xp, g, axes, True)
        mgx = mean_of(xp, g * xhat, axes, True)
        xhat *= mgx
        g -= mg
        g -= xhat
        g *= inv
        out.append(g)
    if want_ds:
        out.append(ds)
    if want_db:
        out.append(sum_of(xp, dy, lead).reshape(db_shape))
    return tuple(out)


def softmax_cross_entropy_forward(xp, scores, labels, weights=None, spread=None, *,
                                  ignore_index, mean=False):
    """SoftmaxCrossEntropyLoss (mean, class axis 1): (loss, log_prob), the same operations as
    its kernel with the label lookup written for the 2-D case; with class `weights`, or with
    `mean` (label smoothing's ReduceMean over the classes of log_prob, each class times
    `spread` where given), _weighted_forward's (loss, log_prob[, class mean])."""
    if weights is not None or mean:
        return _weighted_forward(xp, scores, labels, weights, spread, ignore_index, mean)
    if xp is np and scores.ndim == 2 and labels.ndim == 1 and scores.size and \
            (ignore_index is None or not -scores.shape[1] <= ignore_index < scores.shape[1]):
        plan = _sce_host_plan(scores.shape, scores.dtype)
        if plan is not None:
            try:
                return plan(scores, labels)
            except IndexError:  # a label outside [-C, C) (ignore_index is one): masked form
                pass
    log_prob = rowfuse.softmax(xp, scores, (1,), log=True)  # (a device: generated kernels)
    if log_prob is None:
        log_prob = scores - max_of(xp, scores, (1,))
        log_prob -= xp.log(sum_of(xp, xp.exp(log_prob), (1,), True))
    lab = labels.astype(np.int64, copy=False)
    if _none_ignored(xp, lab, ignore_index, log_prob.shape[1]):
        try:  # every label counts: the mean of the picked -log_prob
            picked = _picked(xp, log_prob, lab)
        except IndexError:  # a label outside [-C, C): ignore_index is one (checked below)
            picked = None
        if picked is not None:
            loss = -picked.sum() / log_prob.dtype.type(picked.size)
            return (xp.asarray(loss, dtype=scores.dtype), log_prob)
    valid = lab != ignore_index
    picked = -_picked(xp, log_prob, xp.where(valid, lab, 0))
    w = valid.astype(log_prob.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):  # every label ignored: 0/0
        loss = (picked * w).sum() / w.sum()
    return (xp.asarray(loss).astype(scores.dtype), log_prob)


_SCE_PLANS: dict[tuple, object] = {}


def _sce_host_plan(shape: tuple[int, int], dtype):
    """The forward above for host [N, C] float scores whose labels cannot equal ignore_index,
    bound once per shape and dtype (the same operations, so the same bits: a batch-16 MLP's loss
    spent most of its 24 us in the general path's per-call dispatch, not in arithmetic); None
    where the general path's sums or maxima differ in form (long rows, other dtypes)."""
    key = (shape, dtype)
    if key in _SCE_PLANS:
        return _SCE_PLANS[key]
    if len(_SCE_PLANS) > 256:
        _SCE_PLANS.clear()
    n, c = shape
    total = sum_plan(shape, dtype, (1,), True) if dtype in (np.float32, np.float64) else None
    if total is None or n * c >= ROW_MAX_MIN:  # (max_of's own forms above that size)
        _SCE_PLANS[key] = None
        return None
    rows, count, maximum, exp, log = np.arange(n), dtype.type(n), np.maximum, np.exp, np.log
    add = np.add

    def forward(scores, labels):
        loops = compiled.row_loops()
        if loops is not None and scores.flags.c_contiguous:  # (one compiled pass)
            log_prob = np.empty_like(scores)
            ok, nll = loops.softmax_cross_entropy(scores, labels, log_prob)
            if not ok:
                raise IndexError("a label outside [-C, C)")
            return (np.asarray(nll / n, dtype=dtype), log_prob)
        log_prob = scores - maximum.reduce(scores, axis=1, keepdims=True)
        s = total(exp(log_prob))
        log_prob -= log(s, out=s)
        picked = log_prob[rows, labels]  # (IndexError: a label outside [-C, C))
        return (np.asarray(-add.reduce(picked) / count, dtype=dtype), log_prob)
    _SCE_PLANS[key] = forward
    return forward


def _none_ignored(xp, labels, ignore_index, classes: int) -> bool:
    """Whether no label may equal ignore_index, as far as a cheap test tells: True when there
    is none, or when ignore_index lies outside [-classes, classes) on the host, where a label
    equal to it makes the 2-D label lookup raise IndexError (which the callers catch)."""
    if ignore_index is None:
        return True
    if xp is not np:  # (a device answer would be read back: the masked form always runs)
        return False
    if labels.ndim == 1 and not -classes <= ignore_index < classes:
        return True
    return not (labels == ignore_index).any()


def _picked(xp, log_prob, labels):
    """log_prob at each sample's label: [N] from [N, C] or [N, ...] from [N, C, ...]."""
    if log_prob.ndim == 2:
        return log_prob[xp.arange(labels.shape[0]), labels]
    return xp.take_along_axis(log_prob, xp.expand_dims(labels, 1), axis=1)[:, 0]


def softmax_cross_entropy_backward(xp, log_prob, labels, seed, weights=None, spread=None,
                                   dmean=None, *, ignore_index):
    """d(mean cross entropy)/d(logits) [N, C, ...] from the loss's log_prob output: softmax
    times c, minus c at each label, c = seed / (number of counted labels) (0 where ignored);
    with class `weights` or the class mean's gradient `dmean`, _weighted_backward's."""
    if weights is not None or dmean is not None:
        return (_weighted_backward(xp, log_prob, labels, seed, weights, spread, dmean,
                                   ignore_index),)
    if xp is np and log_prob.ndim == 2 and labels.ndim == 1 and \
            log_prob.dtype in (np.float32, np.float64) and log_prob.flags.c_contiguous and \
            log_prob.size < ROW_MAX_MIN and (loops := compiled.row_loops()) is not None and \
            _none_ignored(xp, labels, ignore_index, log_prob.shape[1]):  # (one compiled pass)
        c = np.asarray(seed / log_prob.dtype.type(labels.size), log_prob.dtype).reshape(1)
        dx = np.empty_like(log_prob)
        if loops.softmax_cross_entropy_backward(log_prob, labels, c, dx):
            return (dx,)
    prob = xp.exp(log_prob)
    if _none_ignored(xp, labels, ignore_index, log_prob.shape[1]):  # one c for every sample
        c = seed / prob.dtype.type(labels.size)
        if prob.ndim == 2:  # the label column of each row
            xp.multiply(prob, c, out=prob)
            rows = xp.arange(prob.shape[0])
            try:
                prob[rows, labels] -= c
                return (prob,)
            except IndexError:  # a label outside [-C, C): ignore_index is one (prob unchanged
                prob = xp.exp(log_prob)  # by the failed lookup, but already scaled)
        else:
            xp.multiply(prob, c, out=prob)
            at = labels[:, None]
            xp.put_along_axis(prob, at, xp.take_along_axis(prob, at, axis=1) - c, axis=1)
            return (prob,)
    ignored = labels == ignore_index
    safe = xp.where(ignored, 0, labels)
    valid = xp.where(ignored, prob.dtype.type(0), prob.dtype.type(1))
    total = valid.sum()
    denom = xp.where(total == 0, prob.dtype.type(1), total)
    c = valid * (seed / denom)
    c1 = c[:, None]
    xp.multiply(prob, c1, out=prob)
    if prob.ndim == 2:
        rows = xp.arange(prob.shape[0])
        prob[rows, safe] = prob[rows, safe] - c
        return (prob,)
    at = safe[:, None]
    xp.put_along_axis(prob, at, xp.take_along_axis(prob, at, axis=1) - c1, axis=1)
    return (prob,)


def _label_weights(xp, labels, weights, ignore_index, dtype):
    """(each position's label, 0 where ignored; its weight: 0 where ignored, else 1 or its
    class's weight), as the kernel and the gradient rule take them."""
    lab = labels.astype(np.int64, copy=False)
    if ignore_index is None:
        safe, w = lab, xp.ones(lab.shape, dtype)
    else:
        valid = lab != ignore_index
        safe, w = xp.where(valid, lab, 0), valid.astype(dtype)
    if weights is not None:
        w = w * weights.astype(dtype, copy=False)[safe]
    return safe, w


_ROWS_CHUNK = 1 << 18  # elements: exponentials summed a block of rows at a time, in cache


def _host_log_softmax_rows(scores):
    """log_softmax over the rows of host [N, C] scores, the exponentials taken into one small
    buffer a block of rows at a time instead of an [N, C] temporary ([512, 32000] float32:
    its fresh 65 MB cost more than the exponentials themselves)."""
    log_prob = scores - max_of(np, scores, (1,))
    n, c = log_prob.shape
    rows = max(1, _ROWS_CHUNK // c)
    buf = np.empty((min(rows, n), c), log_prob.dtype)
    total = np.empty((n, 1), log_prob.dtype)
    for i in range(0, n, rows):
        block = log_prob[i:i + rows]
        total[i:i + rows] = sum_of(np, np.exp(block, out=buf[:len(block)]), (1,), True)
    log_prob -= np.log(total, out=total)
    return log_prob


def _weighted_forward(xp, scores, labels, weights, spread, ignore_index, mean: bool):
    """(loss, log_prob[, class mean]) of SoftmaxCrossEntropyLoss with class `weights` (the
    picked -log_prob's mean weighted by its label's: 0 / 0, NaN, where none weighs anything, as
    the kernel's) and, where `mean`, the ReduceMean over axis 1 of log_prob (times `spread`
    per class where given) that label smoothing reads: one log-softmax for both, the weighted
    class mean as one product (BLAS on [N, C]) instead of an [N, C] temporary."""
    log_prob = rowfuse.softmax(xp, scores, (1,), log=True)  # (a device: generated kernels)
    if log_prob is None and xp is np and scores.ndim == 2 and scores.size > _ROWS_CHUNK:
        log_prob = _host_log_softmax_rows(scores)
    elif log_prob is None:
        log_prob = scores - max_of(xp, scores, (1,))
        log_prob -= xp.log(sum_of(xp, xp.exp(log_prob), (1,), True))
    safe, w = _label_weights(xp, labels, weights, ignore_index, log_prob.dtype)
    picked = -_picked(xp, log_prob, safe)
    with np.errstate(invalid="ignore", divide="ignore"):  # (nothing counted: 0 / 0)
        loss = (picked * w).sum() / w.sum()
    out = (xp.asarray(loss).astype(scores.dtype), log_prob)
    if not mean:
        return out
    c = log_prob.shape[1]
    if spread is None:  # (the ReduceMean kernel's own sum: the same bits)
        return out + (mean_of(xp, log_prob, (1,)),)
    q = spread.reshape(-1).astype(log_prob.dtype, copy=False)
    if log_prob.ndim == 2:
        total = log_prob @ q
    else:
        total = sum_of(xp, log_prob * q.reshape((c,) + (1,) * (log_prob.ndim - 2)), (1,))
    return out + (total / log_prob.dtype.type(c),)


def _weighted_backward(xp, log_prob, labels, seed, weights, spread, dmean, ignore_index):
    """dX of SoftmaxCrossEntropyLoss with class `weights`, and of the class mean of log_prob
    (times `spread` per class) whose gradient is `dmean` (label smoothing): with a = w seed /
    sum(w) (w: the label's weight, 0 where ignored; a sum of 0 divides by 1, as the gradient
    rule) and b = dmean / C, dX = p (a - b sum(spread)) + b spread, less a at the label: the
    rules' G - p sum_c(G), G = b spread - a onehot(label), in two passes over [N, C, ...]."""
    dt = log_prob.dtype.type
    safe, w = _label_weights(xp, labels, weights, ignore_index, log_prob.dtype)
    total = w.sum()
    a = w * (seed / xp.where(total == 0, dt(1), total))
    dx = xp.exp(log_prob)
    shape = (a.shape[0], 1) + a.shape[1:]
    if dmean is None:
        xp.multiply(dx, a.reshape(shape), out=dx)
    else:
        c = log_prob.shape[1]
        b = dmean * dt(1.0 / c)
        q = None if spread is None else spread.reshape(-1).astype(log_prob.dtype, copy=False)
        t = a - b * (dt(c) if q is None else q.sum())
        loops = compiled.row_loops() if xp is np and dx.ndim == 2 and q is not None else None
        if loops is not None:  # (one pass, no [N, C] product)
            loops.scale_add_outer(dx, t, b, q)
        else:
            xp.multiply(dx, t.reshape(shape), out=dx)
            dx += b.reshape(shape) if q is None else \
                b.reshape(shape) * q.reshape((1, c) + (1,) * (dx.ndim - 2))
    if dx.ndim == 2:  # (each row's label column; an ignored row's a is 0)
        rows = xp.arange(dx.shape[0])
        dx[rows, safe] = dx[rows, safe] - a
        return dx
    at = xp.expand_dims(safe, 1)
    xp.put_along_axis(dx, at, xp.take_along_axis(dx, at, axis=1) - a.reshape(shape), axis=1)
    return dx


def erf_float32(xp, x):
    """Erf for float32 inputs (the planned executor's substitute for Erf nodes); on a device,
    the Erf kernel's own (one elementwise kernel, where the rational form takes twenty)."""
    if xp is not np:
        return Erf(xp, x)
    return (erf_rational(xp, x),)


def maxpool_backward(xp, indices, dy, *, shape, kernel_shape=None, strides=None,
                     dilations=None, pads=None, storage_order=0):
    """dX of MaxPool: dY added at its flat Indices into X (overlapping windows add up), one
    bincount (sums in float64, rounded once); on a device, with the pooling's geometry (explicit
    pads), one generated gather kernel that adds the same float64 sums (poolfuse)."""
    if (fast := poolfuse.maxpool_backward(xp, indices, dy, shape, kernel_shape, strides,
                                          dilations, pads, storage_order)) is not None:
        return (fast,)
    total = math.prod(shape)
    flat = xp.bincount(indices.reshape(-1), weights=dy.reshape(-1), minlength=total)
    return (flat.astype(dy.dtype, copy=False).reshape(shape),)


def conv_weight_grad(xp, x, dy, *, kernel_shape, strides, dilations, pads):
    return (nn.conv_weight_grad_into(xp, x, dy, kernel_shape, strides, dilations, pads, 1),)


# -- matching helpers -----------------------------------------------------------------------------
# Backward chains are found by regenerating them with the gradient rules on the matched forward
# nodes (a template) and matching that template node by node, so a rule change can only turn a
# fusion off, never change what it computes.
def _const(constants: Mapping, name: str):
    return constants.get(name) if name else None


def _same_attrs(a: dict, b: dict) -> bool:
    skip = {"rng", "n_outputs"}
    ka, kb = set(a) - skip, set(b) - skip
    if ka != kb:
        return False
    for k in ka:
        x, y = a[k], b[k]
        if isinstance(x, onnx.TensorProto):
            x = numpy_helper.to_array(x)
        if isinstance(y, onnx.TensorProto):
            y = numpy_helper.to_array(y)
        if isinstance(x, bytes):
            x = x.decode()
        if isinstance(y, bytes):
            y = y.decode()
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(np.asarray(x), np.asarray(y)):
                return False
        elif (list(x) if isinstance(x, tuple | list) else x) != (
                list(y) if isinstance(y, tuple | list) else y):
            return False
    return True


def _equal_values(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def _proto(n: PNode) -> onnx.NodeProto:
    attrs = {k: v for k, v in n.attrs.items() if k not in ("rng", "n_outputs")}
    return helper.make_node(n.op, n.inputs, n.outputs, name=n.name, domain=n.domain or None,
                            **attrs)


def _reduce_axes(n: PNode, constants: Mapping):
    if len(n.inputs) > 1 and n.inputs[1]:
        v = _const(constants, n.inputs[1])
        return None if v is None else tuple(int(a) for a in np.asarray(v).reshape(-1))
    axes = n.attrs.get("axes")
    return None if axes is None else tuple(int(a) for a in axes)


class _Graph:
    """The planner's node list with producer/consumer indexes, edited in place."""

    def __init__(self, nodes: list[PNode], constants: dict, shapes: Mapping, keep: set[str],
                 opset: int):
        self.nodes, self.constants, self.shapes, self.keep = nodes, constants, shapes, keep
        self.opset = opset
        self.reindex()

    def reindex(self) -> None:
        self.made = producers(self.nodes)
        self.readers = consumers(self.nodes)

    def only_reader(self, value: str, op: str) -> PNode | None:
        rs = self.readers.get(value, [])
        if len(rs) == 1 and rs[0].op == op and not rs[0].domain and value not in self.keep:
            return rs[0]
        return None

    def reader(self, value: str, op: str, exclude=()) -> list[PNode]:
        return [r for r in self.readers.get(value, []) if r.op == op and not r.domain
                and all(r is not e for e in exclude)]

    def replace(self, old: list[PNode], new: PNode) -> None:
        """Put `new` where the last of `old` was and drop the rest."""
        ids = {id(n) for n in old}
        last = max(i for i, n in enumerate(self.nodes) if id(n) in ids)
        self.nodes[last] = new
        self.nodes[:] = [n for n in self.nodes if id(n) not in ids]
        self.reindex()


def _template(g: _Graph, region: list[PNode], seeds: dict[str, str], wrt: list[str]):
    """The backward nodes the gradient rules emit for `region` (template PNodes, simplified as
    the plan was), their constants, and {wrt: gradient value}; None when rules refuse."""
    from trainer.autodiff.engine import build_backward
    from trainer.graph import NameScope

    names = {v for n in g.nodes for v in n.inputs + n.outputs} | set(g.constants)
    scope = NameScope(names | set(seeds.values()))
    try:
        bwd, inits, grads = build_backward([_proto(n) for n in region], seeds, wrt,
                                           dict(g.shapes), g.opset, scope, g.constants)
    except Exception:  # noqa: BLE001 - no template: the nodes stay unfused
        return None
    consts = dict(g.constants)
    tconsts = {t.name: numpy_helper.to_array(t) for t in inits}
    consts.update(tconsts)
    tnodes = []
    for k, p in enumerate(bwd):
        fn = get_kernel(p.op_type, g.opset if not p.domain else 1, p.domain)
        attrs = attrs_of(p)  # (as the executor reads them: tensors as arrays, strings decoded)
        if "n_outputs" in inspect.signature(fn).parameters:
            attrs["n_outputs"] = len(p.output)
        tnodes.append(PNode(p.op_type, list(p.input), list(p.output), attrs, p.name or str(k),
                            fn, p.domain or ""))
    tnodes = fold_constants(tnodes, consts)
    alias: dict[str, str] = {}
    tnodes = remove_identities(tnodes, alias)
    grads = {w: alias.get(v, v) for w, v in grads.items()}
    return tnodes, consts, set(tconsts) | (set(consts) - set(g.constants)), grads


def _match(g: _Graph, tnodes: list[PNode], tconsts: dict, tnames: set[str], seeds: set[str],
           region: list[PNode], last: bool = False, producers: bool = False):
    """Map template nodes onto the plan's nodes: same op, attributes and wiring (forward values
    as they are, template constants by value, each seed bound on first use). Returns
    ({template value: plan value}, matched plan nodes) or None. `last`: a value's latest
    readers tried first; `producers`: a template node that no matched node reaches yet is
    matched through its plan producers (see _fuse_backward's `widened`)."""
    produced = {o for n in tnodes for o in n.outputs}
    region_ids = {id(n) for n in region}
    m: dict[str, str] = {}
    used: set[int] = set()
    matched: list[PNode] = []
    pending = list(tnodes)
    const_tag, seed_tag = object(), object()

    def resolve(t: str):
        if not t:
            return ""
        if t in m:
            return m[t]
        if t in produced:
            return None
        if t in seeds:
            return seed_tag
        if t in tnames:
            return const_tag
        return t

    def fits(tn: PNode, res: list, c: PNode | None):
        """The seed bindings under which plan node c is template node tn, or None."""
        if (c is None or id(c) in used or id(c) in region_ids or c.op != tn.op
                or c.domain != tn.domain or len(c.inputs) != len(tn.inputs)
                or len(c.outputs) != len(tn.outputs) or not _same_attrs(c.attrs, tn.attrs)):
            return None
        binds: dict[str, str] = {}
        for t, r, a in zip(tn.inputs, res, c.inputs, strict=True):
            if r is seed_tag:
                ok = binds.setdefault(t, a) == a and bool(a)
            elif r is const_tag:
                ok = a in g.constants and _equal_values(g.constants[a], tconsts[t])
            else:
                ok = r == a
            if not ok:
                return None
        return binds

    def take(tn: PNode, c: PNode, binds: dict) -> None:
        m.update(binds)
        m.update(zip(tn.outputs, c.outputs, strict=True))
        used.add(id(c))
        matched.append(c)
        pending.remove(tn)

    def through_reader(tn: PNode, res: list) -> bool:
        """Match tn, whose inputs are only seeds and constants (nothing to find it by), as
        the producer of the input that a template reader of its output reads in the plan."""
        for tc in pending:
            slots = [j for j, t in enumerate(tc.inputs) if t in tn.outputs]
            rres = [resolve(t) for t in tc.inputs]
            anchors = [r for r in rres if isinstance(r, str) and r]
            if not slots or not anchors:
                continue
            for c in readers(anchors[0]):
                p = g.made.get(c.inputs[slots[0]]) if len(c.inputs) == len(tc.inputs) else None
                binds = fits(tn, res, p)
                if binds is not None:
                    take(tn, p, binds)
                    return True
        return False

    made = {o: tn for tn in tnodes for o in tn.outputs if o}

    def readers(value: str) -> list[PNode]:  # (`last`: the latest first)
        rs = g.readers.get(value, [])
        return rs[::-1] if last else rs

    def unify(tn: PNode, c: PNode | None, tm: dict, took: list) -> bool:
        """Whether plan node c is template node tn, its inputs that pending template nodes
        make matched in turn to the plan nodes that make c's (tentative bindings into tm,
        pairs into took)."""
        if (c is None or id(c) in used or id(c) in region_ids or any(c is k for _, k in took)
                or c.op != tn.op or c.domain != tn.domain or len(c.inputs) != len(tn.inputs)
                or len(c.outputs) != len(tn.outputs) or not _same_attrs(c.attrs, tn.attrs)):
            return False
        for t, a in zip(tn.inputs, c.inputs, strict=True):
            if not t or t in m or t in tm:
                ok = (m.get(t) if t in m else tm.get(t, "")) == a
            elif t in produced:
                ok = unify(made[t], g.made.get(a), tm, took) and tm.get(t) == a
            elif t in seeds:
                ok = bool(a) and tm.setdefault(t, a) == a
            elif t in tnames:
                ok = a in g.constants and _equal_values(g.constants[a], tconsts[t])
            else:
                ok = t == a
            if not ok:
                return False
        tm.update(zip(tn.outputs, c.outputs, strict=True))
        took.append((tn, c))
        return True

    def through_producers(tn: PNode) -> bool:
        """Match tn, some of whose inputs no matched node makes yet (a gradient that reaches
        it from a seed through nodes of seeds and constants alone, as the ReduceMean rule's
        Reshape, Mul and Expand), by a plan reader of one of its known inputs, its other
        inputs by their plan producers in turn."""
        anchors = [m.get(t, t) for t in tn.inputs if t and (t in m or (
            t not in produced and t not in seeds and t not in tnames))]
        if not anchors or all(t in m or t not in produced for t in tn.inputs if t):
            return False
        for c in readers(anchors[0]):
            tm: dict[str, str] = {}
            took: list = []
            if unify(tn, c, tm, took):
                m.update(tm)
                for t, k in took:
                    used.add(id(k))
                    matched.append(k)
                    pending.remove(t)
                return True
        return False

    while pending:
        progress = False
        for tn in list(pending):
            res = [resolve(t) for t in tn.inputs]
            if any(r is None for r in res):
                continue
            anchors = [r for r in res if isinstance(r, str) and r]
            if not anchors:
                continue
            for c in readers(anchors[0]):
                binds = fits(tn, res, c)
                if binds is not None:
                    take(tn, c, binds)
                    progress = True
                    break
        if not progress:
            for tn in list(pending):
                res = [resolve(t) for t in tn.inputs]
                if all(r is seed_tag or r is const_tag or r == "" for r in res) \
                        and any(r is seed_tag for r in res) and through_reader(tn, res):
                    progress = True
                    break
        if not progress and producers:
            for tn in list(pending):
                if through_producers(tn):
                    progress = True
                    break
        if not progress:
            return None
    return m, matched


def _fuse_backward(g: _Graph, region: list[PNode], seeds: dict[str, str], wrt: list[str],
                   widened: bool = False):
    """Template-match the backward of `region`; (bound seeds, {wrt: plan gradient value},
    matched nodes) when every internal value stays inside the match. `widened`: the matcher's
    fallbacks too (_match's `producers` and `last`), for a fused kernel that computes every
    node they may bind (the cross entropy's); another fusion's kernel may not (MaxPool's
    leaves out the mask of windows of padding alone, which they bound: its gradient went to
    the neighbours of such windows)."""
    made = _template(g, region, seeds, wrt)
    if made is None:
        return None
    tnodes, tconsts, tnames, grads = made
    found = _match(g, tnodes, tconsts, tnames, set(seeds.values()), region, producers=widened)
    if found is None and widened:  # (a forward node may fit a template node too, as label
        # smoothing's Equal(labels, ignore_index) does the rule's: the training graph's
        # gradient nodes follow its forward nodes, so the latest readers first)
        found = _match(g, tnodes, tconsts, tnames, set(seeds.values()), region, last=True,
                       producers=True)
    if found is None:
        return None
    m, matched = found
    outs = {m[v] for v in grads.values() if v in m}
    if len(outs) != len(grads):
        return None
    ids = {id(n) for n in matched}
    for n in matched:
        for o in n.outputs:
            if o and o not in outs and (o in g.keep or any(
                    id(r) not in ids for r in g.readers.get(o, []))):
                return None
    return {s: m.get(t) for s, t in seeds.items()}, {w: m[v] for w, v in grads.items()}, matched


# -- BatchNormalization training rewrite ----------------------------------------------------------
def _match_bn_forward(g: _Graph, mean_node: PNode):
    """The rewrite's forward chain from its first ReduceMean: {role: node} or None."""
    c = g.constants
    x = mean_node.inputs[0]
    axes = _reduce_axes(mean_node, c)
    shape = g.shapes.get(x, ((),))[0]
    if axes is None or len(shape) < 2 or not mean_node.attrs.get("keepdims", 1):
        return None
    rank = len(shape)
    if sorted(a % rank for a in axes) != [0] + list(range(2, rank)):
        return None
    mean = mean_node.outputs[0]
    role = {"mean": mean_node}
    sub = [n for n in g.reader(mean, "Sub") if n.inputs == [x, mean]]
    if len(sub) != 1:
        return None
    role["xc"] = sub[0]
    xc = sub[0].outputs[0]
    sq = [n for n in g.reader(xc, "Mul") if n.inputs == [xc, xc]]
    if len(sq) != 1:
        return None
    role["sq"] = sq[0]
    var_n = g.only_reader(sq[0].outputs[0], "ReduceMean")
    if var_n is None or _reduce_axes(var_n, c) != axes or not var_n.attrs.get("keepdims", 1):
        return None
    role["var"] = var_n
    ve = [n for n in g.reader(var_n.outputs[0], "Add")
          if n.inputs[0] == var_n.outputs[0] and np.size(_const(c, n.inputs[1])) == 1]
    if len(ve) != 1:
        return None
    role["ve"] = ve[0]
    sd = g.only_reader(ve[0].outputs[0], "Sqrt")
    if sd is None:
        return None
    role["sd"] = sd
    div = [n for n in g.reader(sd.outputs[0], "Div") if n.inputs == [xc, sd.outputs[0]]]
    if len(div) != 1:
        return None
    role["xhat"] = div[0]
    xhat = div[0].outputs[0]
    cshape = (shape[1],) + (1,) * (rank - 2)
    mul = [n for n in g.reader(xhat, "Mul") if n.inputs[0] == xhat
           and tuple(g.shapes.get(n.inputs[1], ((),))[0]) == cshape]
    if len(mul) != 1:
        return None
    role["scaled"] = mul[0]
    add = [n for n in g.reader(mul[0].outputs[0], "Add") if n.inputs[0] == mul[0].outputs[0]
           and tuple(g.shapes.get(n.inputs[1], ((),))[0]) == cshape]
    if len(add) != 1:
        return None
    role["y"] = add[0]
    if g.shapes[x][1] not in (np.float32, np.float64):
        return None
    return role


def _fuse_batchnorm(g: _Graph) -> int:
    fused = 0
    for mean_node in [n for n in g.nodes if n.op == "ReduceMean" and not n.domain]:
        if not any(n is mean_node for n in g.nodes):
            continue
        role = _match_bn_forward(g, mean_node)
        if role is None:
            continue
        x = mean_node.inputs[0]
        axes = tuple(sorted(a % len(g.shapes[x][0]) for a in _reduce_axes(mean_node,
                                                                             g.constants)))
        s_b, b_b = role["scaled"].inputs[1], role["y"].inputs[1]
        eps = g.constants[role["ve"].inputs[1]]
        values = {k: role[k].outputs[0] for k in BN_VALUES}
        region = [role[k] for k in BN_VALUES]
        # The scale/bias reshapes belong to the region when their sources are trained.
        extra, wrt = [], []
        if x not in g.constants:
            wrt.append(x)
        for v in (s_b, b_b):
            src = g.made.get(v)
            if src is not None and src.op == "Reshape" and src.inputs[0] not in g.constants:
                extra.append(src)
                wrt.append(src.inputs[0])
            elif v not in g.constants:
                wrt.append(v)
        y = values["y"]
        count = int(np.prod([g.shapes[x][0][a] for a in axes]))
        seed = "\x00seed:" + y
        back = None
        for variant in (wrt, [w for w in wrt if w != x]):  # X may need no gradient
            back = _fuse_backward(g, extra + region, {y: seed}, variant) if variant else None
            if back is not None:
                break
        if back is not None:
            bound, grads, matched = back
            sname = extra[0].inputs[0] if extra and extra[0].outputs[0] == s_b else s_b
            bname = (extra[-1].inputs[0] if extra and extra[-1].outputs[0] == b_b else b_b)
            outs = [grads[w] for w in (x, sname, bname) if w in grads]
            dy = bound[y]
            attrs = dict(axes=axes, count=count, want_dx=x in grads, want_ds=sname in grads,
                         want_db=bname in grads,
                         ds_shape=g.shapes[sname][0] if sname in g.shapes else None,
                         db_shape=g.shapes[bname][0] if bname in g.shapes else None)
            node = PNode("BatchNormTrainGrad", [dy, values["xhat"], values["sd"], s_b], outs,
                         attrs, f"{role['y'].name}/fused_grad", bn_train_backward, fused=True,
                         info={"replaces": [n.name for n in matched]})
            g.replace(matched, node)
        # Forward: one kernel for the chain, returning the values other nodes still read.
        inside = {id(n) for n in region}
        want = tuple(k for k in BN_VALUES if k == "y" or values[k] in g.keep or any(
            id(r) not in inside for r in g.readers.get(values[k], [])))
        node = PNode("BatchNormTrain", [x, s_b, b_b], [values[k] for k in want],
                     dict(axes=axes, eps=np.asarray(eps).reshape(()).astype(g.shapes[x][1])[()],
                          want=want),
                     f"{role['y'].name}/fused", bn_train_forward, fused=True,
                     info={"replaces": [n.name for n in region]})
        g.replace(region, node)
        fused += 1
    return fused


# -- SoftmaxCrossEntropyLoss gradient ------------------------------------------------------------
def _class_mean_of(g: _Graph, log_prob: str, rank: int):
    """Label smoothing's reading of log_prob (autodiff/build.py's _label_smoothing): a
    ReduceMean over axis 1 (no kept axis) of it, or of it times a constant per class (the
    class weights, [C, 1, ...]); (nodes, the constant's name or "", the mean) or None."""
    for r in g.reader(log_prob, "ReduceMean") + g.reader(log_prob, "Mul"):
        mul, spread, mean = None, "", r
        if r.op == "Mul":
            other = [v for v in r.inputs if v != log_prob]
            q = _const(g.constants, other[0]) if len(other) == 1 else None
            if q is None or g.shapes.get(r.outputs[0]) != g.shapes[log_prob] or \
                    np.asarray(q).dtype != g.shapes[log_prob][1]:
                continue
            dims = (1,) * (rank - np.ndim(q)) + np.shape(q)
            if np.ndim(q) > rank or [d for i, d in enumerate(dims) if i != 1] != \
                    [1] * (rank - 1) or dims[1] != g.shapes[log_prob][0][1]:
                continue
            mean = g.only_reader(r.outputs[0], "ReduceMean")
            if mean is None:
                continue
            mul, spread = r, other[0]
        axes = _reduce_axes(mean, g.constants)
        if axes is None or [a % rank for a in axes] != [1] or mean.attrs.get("keepdims", 1) \
                or len(mean.inputs) > 1 and mean.inputs[1] not in g.constants:
            continue
        return [m for m in (mul, mean) if m is not None], spread, mean.outputs[0]
    return None


def _fuse_softmax_cross_entropy(g: _Graph) -> int:
    """SoftmaxCrossEntropyLoss (mean) and its gradient: with class weights, and with label
    smoothing's class mean of log_prob (one forward node gives it; its gradient and the
    loss's are one SoftmaxCrossEntropyGrad); the scalar and per-position nodes around them
    stay as the graph has them."""
    fused = 0
    for n in [n for n in g.nodes if n.op == "SoftmaxCrossEntropyLoss" and not n.domain]:
        reduction = n.attrs.get("reduction", "mean")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if (reduction != "mean" or len(n.outputs) < 2 or not n.outputs[1]
                or n.inputs[0] in g.constants or n.attrs.get("ignore_index") is None):
            continue
        logits, labels = n.inputs[:2]
        weights = n.inputs[2] if len(n.inputs) > 2 else ""
        shape, dt = g.shapes[logits]
        if dt not in (np.float32, np.float64) or (weights and g.shapes[weights][1] != dt):
            continue
        nll, log_prob = n.outputs[:2]
        found = _class_mean_of(g, log_prob, len(shape))
        extra, spread, mean = found if found is not None else ([], "", "")
        seeds = {nll: "\x00seed:" + nll}
        if mean:
            seeds[mean] = "\x00seed:" + mean
        back = _fuse_backward(g, [n] + extra, seeds, [logits], widened=True)
        if back is None or any(v is None for v in back[0].values()):
            continue
        bound, grads, matched = back  # (the seed: a constant, or a fed loss weight)
        inner = extra[0].outputs[0] if len(extra) == 2 else ""
        if inner and (inner in g.keep or len(g.readers.get(inner, [])) != 1):
            continue  # (the weighted log_prob: read by the mean alone)
        ignore_index = n.attrs.get("ignore_index")
        n.fn = softmax_cross_entropy_forward
        n.attrs = {"ignore_index": ignore_index}
        n.info["substituted"] = "softmax_cross_entropy_forward"
        ins = [n.outputs[1], labels, bound[nll]]
        if weights or mean:
            n.inputs = [logits, labels, weights, spread]
            n.outputs = [nll, log_prob] + ([mean] if mean else [])
            n.attrs["mean"] = bool(mean)
            n.info["replaces"] = [m.name for m in extra]
            ins += [weights, spread, bound[mean] if mean else ""]
        node = PNode("SoftmaxCrossEntropyGrad", ins, [grads[logits]],
                     {"ignore_index": ignore_index}, f"{n.name}/fused_grad",
                     softmax_cross_entropy_backward, fused=True,
                     info={"replaces": [m.name for m in matched]})
        g.replace(matched, node)
        if extra:  # (the mean's nodes: given by the loss's node, which stays where it is)
            ids = {id(m) for m in extra}
            g.nodes[:] = [m for m in g.nodes if id(m) not in ids]
            g.reindex()
        fused += 1
    return fused


# -- Conv weight gradient ------------------------------------------------------------------------
def _swap01(n: PNode, rank: int) -> bool:
    perm = n.attrs.get("perm")
    return perm is not None and list(perm) == [1, 0] + list(range(2, rank))


def _leading_crop(g: _Graph, n: PNode, value: str) -> bool:
    """Whether Slice `n` keeps the first elements (start 0, step 1) of the spatial axes of
    `value` and all of its first two axes."""
    if len(n.inputs) == 1:
        starts, steps = n.attrs.get("starts"), None
    else:
        starts = _const(g.constants, n.inputs[1])
        steps = _const(g.constants, n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] else None
    if starts is None or (len(n.inputs) > 4 and n.inputs[4] and steps is None):
        return False
    whole, part = g.shapes[value][0], g.shapes[n.outputs[0]][0]
    return (all(int(v) == 0 for v in np.ravel(starts))
            and (steps is None or all(int(v) == 1 for v in np.ravel(steps)))
            and len(whole) == len(part) and list(whole[:2]) == list(part[:2]))


def _fuse_conv_weight_grad(g: _Graph) -> int:
    fused = 0
    for conv in [n for n in g.nodes if n.op == "Conv" and not n.domain]:
        a = conv.attrs
        if len(conv.inputs) != 2 or a.get("group", 1) != 1 or a.get("auto_pad", "NOTSET") \
                not in ("NOTSET", b"NOTSET"):
            continue
        tx, tdy = g.made.get(conv.inputs[0]), g.made.get(conv.inputs[1])
        crop = g.only_reader(conv.outputs[0], "Slice")  # (strided: extra taps cut off)
        if crop is not None and not _leading_crop(g, crop, conv.outputs[0]):
            continue
        dw_full = crop.outputs[0] if crop is not None else conv.outputs[0]
        out = g.only_reader(dw_full, "Transpose")
        if tx is None or tdy is None or out is None or tx.op != "Transpose" \
                or tdy.op != "Transpose":
            continue
        rank = len(g.shapes[conv.inputs[0]][0])
        if not all(_swap01(t, rank) for t in (tx, tdy, out)):
            continue
        x, dy = tx.inputs[0], tdy.inputs[0]
        if g.shapes[x][1] not in (np.float32, np.float64) or g.shapes[dy][1] != g.shapes[x][1]:
            continue
        k = rank - 2
        kshape = list(g.shapes[dw_full][0][2:])
        pads = list(a.get("pads") or [0] * 2 * k)
        attrs = dict(kernel_shape=kshape, strides=list(a.get("dilations") or [1] * k),
                     dilations=list(a.get("strides") or [1] * k), pads=pads[:k] + [0] * k)
        node = PNode("ConvWeightGrad", [x, dy], [out.outputs[0]], attrs,
                     f"{conv.name}/fused", conv_weight_grad, fused=True,
                     info={"replaces": [m.name for m in (conv, crop, out) if m is not None]})

        def out_impl(xp, attrs=attrs):  # (for the memory plan: xp -> (impl, arity))
            def into(x_, dy_, dw):
                return nn.conv_weight_grad_into(xp, x_, dy_, attrs["kernel_shape"],
                                                attrs["strides"], attrs["dilations"],
                                                attrs["pads"], 1, dw)
            return into, 2
        node.info["out_impl"] = out_impl
        g.replace([m for m in (conv, crop, out) if m is not None], node)
        fused += 1
    return fused


# -- MaxPool gradient ----------------------------------------------------------------------------
def _fuse_maxpool_grad(g: _Graph) -> int:
    """MaxPool's backward (a scatter of dY at the Indices, or before opset 16 with overlapping
    windows a one-hot tap chain folded by a grouped ConvTranspose, 9x the output's size) as
    one MaxPoolGrad. Where the rule recomputed the Indices with a second MaxPool, that node
    stays and feeds it."""
    fused = 0
    for n in [n for n in g.nodes if n.op == "MaxPool" and not n.domain]:
        x, y = n.inputs[0], n.outputs[0]
        shape, dtype = g.shapes.get(x, (None, None))
        if shape is None or dtype not in (np.float32, np.float64) \
                or n.attrs.get("storage_order", 0):
            continue
        back = _fuse_backward(g, [n], {y: "\x00seed:" + y}, [x])
        if back is None:
            continue
        bound, grads, matched = back
        pre = [m for m in matched if m.op == "MaxPool"]
        if len(n.outputs) > 1 and n.outputs[1] and not pre:
            indices = n.outputs[1]
        elif len(pre) == 1 and len(pre[0].outputs) > 1 and pre[0].outputs[1]:
            indices = pre[0].outputs[1]
        else:
            continue
        rest = [m for m in matched if all(m is not p for p in pre)]
        attrs = {"shape": list(shape)}
        # the geometry of the gather kernel (poolfuse), where the Indices are this pooling's:
        # a recomputing MaxPool with the same attributes
        geometry = poolfuse.geometry_attrs(shape, n.attrs)
        same = not pre or all(pre[0].attrs.get(a) == n.attrs.get(a) for a in (
            "kernel_shape", "strides", "dilations", "pads", "auto_pad", "ceil_mode",
            "storage_order"))
        if geometry is not None and same:
            attrs.update(geometry)
        node = PNode("MaxPoolGrad", [indices, bound[y]], [grads[x]], attrs,
                     f"{n.name}/fused_grad", maxpool_backward, fused=True,
                     info={"replaces": [m.name for m in rest]})
        g.replace(rest, node)
        fused += 1
    return fused


# -- LayerNormalization gradient -------------------------------------------------------------------
def _fuse_layer_norm(g: _Graph) -> int:
    fused = 0
    for n in [n for n in g.nodes if n.op == "LayerNormalization" and not n.domain]:
        x, scale = n.inputs[0], n.inputs[1]
        bias = n.inputs[2] if len(n.inputs) > 2 else ""
        shape, dt = g.shapes[x]
        if dt not in (np.float32, np.float64) or any(o for o in n.outputs[1:]):
            continue
        axis = n.attrs.get("axis", -1) % len(shape)
        if int(np.prod(g.shapes[scale][0])) != int(np.prod(shape[axis:])) or (
                bias and int(np.prod(g.shapes[bias][0])) != int(np.prod(shape[axis:]))):
            continue
        wrt = [v for v in (x, scale, bias) if v and v not in g.constants]
        if not wrt:
            continue
        y = n.outputs[0]
        back = None
        for variant in (wrt, [w for w in wrt if w != x]):  # X may need no gradient
            back = _fuse_backward(g, [n], {y: "\x00seed:" + y}, variant) if variant else None
            if back is not None:
                break
        if back is None:
            continue
        bound, grads, matched = back
        attrs = dict(axes=tuple(range(axis, len(shape))), eps=float(n.attrs.get("epsilon", 1e-5)),
                     want_dx=x in grads, want_ds=scale in grads, want_db=bias in grads,
                     ds_shape=g.shapes[scale][0], db_shape=g.shapes[bias][0] if bias else None)
        node = PNode("LayerNormGrad", [bound[y], x, scale], [grads[w] for w in (x, scale, bias)
                                                             if w in grads],
                     attrs, f"{n.name}/fused_grad", layer_norm_backward, fused=True,
                     info={"replaces": [m.name for m in matched]})
        g.replace(matched, node)
        fused += 1
    return fused


def nan_to_zero(xp, x):
    """Where(IsNaN(x), 0, x): x itself when it holds no NaN (checked in one pass)."""
    if xp is np and (squares_finite(x) or not np.isnan(x).any()):
        return (x,)
    return (xp.where(xp.isnan(x), x.dtype.type(0), x),)


def _fuse_nan_to_zero(g: _Graph) -> int:
    """Where(IsNaN(x), 0, x) (softmax gradients guard fully masked rows so) as one NanToZero,
    which passes x through unless it holds a NaN."""
    count = 0
    for w in [n for n in g.nodes if n.op == "Where" and not n.domain and len(n.inputs) == 3]:
        test = g.made.get(w.inputs[0])
        zero = g.constants.get(w.inputs[1])
        if (test is None or test.op != "IsNaN" or test.domain or test.inputs[0] != w.inputs[2]
                or g.only_reader(test.outputs[0], "Where") is not w or zero is None
                or np.size(zero) != 1 or np.ravel(zero)[0] != 0 or np.signbit(np.ravel(zero)[0])
                or g.shapes.get(w.inputs[2], ((), None))[1] not in (np.float32, np.float64)
                or g.shapes[w.outputs[0]] != g.shapes[w.inputs[2]]
                or np.asarray(zero).dtype != g.shapes[w.inputs[2]][1]):
            continue
        node = PNode("NanToZero", [w.inputs[2]], [w.outputs[0]], {}, f"{w.name}/fused",
                     nan_to_zero, fused=True, info={"replaces": [test.name, w.name]})
        g.replace([test, w], node)
        count += 1
    return count


def positive_select(xp, v, x):
    """x where v > 0, else +0 (ReLU's gradient, Where(Greater(v, 0), x, 0)): on the host one
    compiled pass where the compiled path is on (exact: a selection), else the two NumPy
    operations."""
    if xp is np and (loops := compiled.row_loops()) is not None and \
            v.flags.c_contiguous and x.flags.c_contiguous:
        out = np.empty_like(x)
        loops.positive_select(v.reshape(-1), x.reshape(-1), out.reshape(-1))
        return (out,)
    return (xp.where(v > 0, x, x.dtype.type(0)),)


def _fuse_positive_select(g: _Graph) -> int:
    """Where(Greater(v, 0), x, 0), v and x floats of one shape and dtype (the ReLU gradient
    rule's two nodes), as one PositiveSelect: on the host one pass instead of a comparison,
    a mask and a select (4-5 us of a batch-16 MLP's step each). (Device plans leave the pair
    to the generated elementwise kernels, which fuse longer chains.)"""
    count = 0
    for w in [n for n in g.nodes if n.op == "Where" and not n.domain and len(n.inputs) == 3]:
        test = g.made.get(w.inputs[0])
        if test is None or test.op != "Greater" or test.domain or len(test.inputs) != 2:
            continue
        v, x = test.inputs[0], w.inputs[1]
        zero, fill = g.constants.get(test.inputs[1]), g.constants.get(w.inputs[2])
        sv, sx = g.shapes.get(v), g.shapes.get(x)
        if (sv is None or sx is None or sv[1] not in (np.float32, np.float64) or sv != sx
                or g.shapes.get(w.outputs[0]) != sx or g.only_reader(test.outputs[0], "Where")
                is not w or zero is None or np.size(zero) != 1 or np.ravel(zero)[0] != 0
                or fill is None or np.size(fill) != 1 or np.ravel(fill)[0] != 0
                or np.signbit(np.ravel(fill)[0]) or np.asarray(fill).dtype != sx[1]):
            continue
        node = PNode("PositiveSelect", [v, x], [w.outputs[0]], {}, f"{w.name}/fused",
                     positive_select, fused=True, info={"replaces": [test.name, w.name]})
        g.replace([test, w], node)
        count += 1
    return count


def _fast_erf(g: _Graph) -> int:
    count = 0
    for n in g.nodes:
        if n.op == "Erf" and not n.domain and g.shapes.get(n.inputs[0], ((), None))[1] == \
                np.float32:
            n.fn, n.info["substituted"] = erf_float32, "erf_float32"
            count += 1
    return count


def fuse(nodes: list[PNode], constants: dict, shapes: Mapping, keep: set[str], opset: int,
         host: bool = False) -> list[PNode]:
    """Every fusion that matches (`host`: a NumPy plan's too); other nodes are left as they
    are."""
    g = _Graph(list(nodes), constants, shapes, set(keep), opset)
    if host:
        _fuse_positive_select(g)
    _fuse_batchnorm(g)
    _fuse_softmax_cross_entropy(g)
    _fuse_conv_weight_grad(g)
    _fuse_maxpool_grad(g)
    _fuse_layer_norm(g)
    _fuse_nan_to_zero(g)
    _fast_erf(g)
    return g.nodes
