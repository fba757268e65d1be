"""Shape, indexing and data-movement kernels: Reshape, Slice, Gather*, Scatter*, Pad, TopK, ...

Shape-like inputs are read on the host; index arithmetic on data runs with `xp` (NumPy or CuPy).
"""

from __future__ import annotations

import numpy as np

from trainer.backend import cupyx_module
from trainer.errors import ModelError
from trainer.graph import np_dtype
from trainer.kernels import axis_in, cached_constant, host_ints, host_scalar, kernel


def reshape_target(in_shape: tuple, shape: list[int], allowzero: int = 0) -> tuple:
    out = [in_shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    if out.count(-1) > 1 or any(d < -1 for d in out):
        raise ModelError(f"Reshape: the shape {list(shape)} has more than one -1 or a size "
                         "below -1 (at most one dimension may be -1, inferred)")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
    return tuple(out)


def _ints(a) -> list[int]:
    """A shape-like input of any rank (a scalar too) as a list of host ints."""
    return host_ints(a.reshape(-1) if hasattr(a, "reshape") else a)


def _same_device(xp, *arrays):
    """The array module for these arrays: NumPy when all are host arrays, else `xp` with every
    array moved there (device executors place shape arithmetic on the host themselves; this
    keeps direct kernel calls that mix the two working)."""
    if xp is np or all(isinstance(a, np.ndarray) for a in arrays if a is not None):
        return np, arrays
    return xp, tuple(a if a is None else xp.asarray(a) for a in arrays)


def _grids(xp, shape: tuple) -> list:
    """Open index grids of `shape` (like indices(shape, sparse=True), which CuPy lacks)."""
    r = len(shape)
    return [xp.arange(n).reshape((1,) * i + (n,) + (1,) * (r - i - 1))
            for i, n in enumerate(shape)]


def _row_major_strides(shape) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return strides[::-1]


# -- reshaping ------------------------------------------------------------------------------
@kernel("Reshape", since=1)
def Reshape_1(xp, x, *, shape=(), consumed_inputs=None):
    return (x.reshape(reshape_target(x.shape, list(shape))),)


@kernel("Reshape", since=5)
def Reshape(xp, x, shape, *, allowzero=0):
    return (x.reshape(reshape_target(x.shape, _ints(shape), allowzero)),)


@kernel("Flatten")
def Flatten(xp, x, *, axis=1):
    if not -x.ndim <= axis <= x.ndim:
        raise ModelError(f"Flatten: axis {axis} is out of range for an input of rank {x.ndim} "
                         f"(it must lie in [{-x.ndim}, {x.ndim}])")
    axis %= x.ndim if axis < 0 else x.ndim + 1
    lead = int(np.prod(x.shape[:axis]))
    return (x.reshape(lead, int(np.prod(x.shape[axis:]))),)


@kernel("Transpose")
def Transpose(xp, x, *, perm=None):
    if perm is not None and sorted(perm) != list(range(x.ndim)):
        # (PyTorch's TorchScript exporter writes perm=[0, -2, -1, 1] for some models, which
        # onnxruntime refuses too; NumPy would take it, and its gradient would be wrong)
        raise ValueError(f"perm {list(perm)} is not a permutation of the axes 0..{x.ndim - 1} "
                         "(ONNX allows no negative or repeated axes; onnxruntime refuses this "
                         "model as well): export the model again, e.g. with the default "
                         "exporter (dynamo=True)")
    return (x.transpose(perm) if perm is not None else x.transpose(),)


@kernel("Shape", since=1)
def Shape(xp, x, *, start=0, end=None):
    # Device executors run Shape (and the shape arithmetic after it) with NumPy: no transfer.
    return (xp.asarray(np.array(x.shape[start:end], dtype=np.int64)),)


@kernel("Size")
def Size(xp, x):
    return (xp.asarray(np.array(x.size, dtype=np.int64)),)


def _squeeze(x, axes):
    if axes is None or len(axes) == 0:
        return x.squeeze()
    return x.squeeze(axis=tuple(a % x.ndim for a in axes))


@kernel("Squeeze", since=1)
def Squeeze_1(xp, x, *, axes=None):
    return (_squeeze(x, axes),)


@kernel("Squeeze", since=13)
def Squeeze_13(xp, x, axes=None):
    return (_squeeze(x, _ints(axes) if axes is not None else None),)


def _unsqueeze(x, axes):
    rank = x.ndim + len(axes)
    if any(not -rank <= a < rank for a in axes):
        raise ModelError(f"Unsqueeze: the axes {list(axes)} are out of range for an output of "
                         f"rank {rank} (each must lie in [{-rank}, {rank - 1}])")
    new = sorted(a % rank for a in axes)
    if len(set(new)) < len(new):
        raise ModelError(f"Unsqueeze: the axes {list(axes)} name an axis twice")
    dims = iter(x.shape)
    return x.reshape(tuple(1 if i in new else next(dims) for i in range(rank)))


@kernel("Unsqueeze", since=1)
def Unsqueeze_1(xp, x, *, axes):
    return (_unsqueeze(x, axes),)


@kernel("Unsqueeze", since=13)
def Unsqueeze_13(xp, x, axes):
    return (_unsqueeze(x, _ints(axes)),)


@kernel("Expand", since=8)
def Expand(xp, x, shape):
    target = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
    mod, (x,) = _same_device(xp, x)
    return (mod.broadcast_to(x, target),)


# -- joining and splitting ------------------------------------------------------------------
@kernel("Concat", since=1)
def Concat_1(xp, *xs, axis=1):
    return Concat(xp, *xs, axis=axis)


@kernel("Concat", since=4)
def Concat(xp, *xs, axis):
    mod, xs = _same_device(xp, *xs)
    return (mod.concatenate(xs, axis=axis),)


@kernel("Split", since=1)
def Split_1(xp, x, split_input=None, *, axis=0, split=None, n_outputs=2):
    if split_input is not None:
        split = _ints(split_input)
    return _split(x, axis, split or None, n_outputs)


@kernel("Split", since=13)
def Split_13(xp, x, split=None, *, axis=0, num_outputs=None, n_outputs=2):
    # Without `split`, equal parts: as many as num_outputs (opset 18) or the node's outputs.
    return _split(x, axis, _ints(split) if split is not None else None,
                  num_outputs or n_outputs)


def _split(x, axis, split, num_outputs):
    dim = x.shape[axis]
    if split is None:
        # Opset 18: ceil(dim / n) per part, the last one smaller when dim does not divide.
        size = -(-dim // num_outputs)
        split = [max(0, min(size, dim - i * size)) for i in range(num_outputs)]
    elif any(n < 0 for n in split) or sum(split) != dim:
        raise ModelError(f"Split: the sizes {list(split)} do not add up to the axis's {dim} "
                         "elements (each must be 0 or more)")
    index = [slice(None)] * x.ndim
    out, start = [], 0
    for n in split:
        index[axis] = slice(start, start + n)
        out.append(x[tuple(index)])
        start += n
    return tuple(out)


@kernel("Tile", since=1)
def Tile_1(xp, x, tiles, axis):
    reps = [1] * x.ndim
    reps[int(host_scalar(axis)) % x.ndim] = int(host_scalar(tiles))
    return (xp.tile(x, reps),)


@kernel("Tile", since=6)
def Tile(xp, x, repeats):
    if repeats.ndim != 1 or repeats.shape[0] != x.ndim:
        raise ModelError(f"Tile: repeats of shape {list(repeats.shape)} for an input of rank "
                         f"{x.ndim} (it needs one count per axis: shape [{x.ndim}])")
    return (xp.tile(x, tuple(_ints(repeats))),)


# -- slicing and gathering ------------------------------------------------------------------
def spec_slice(start: int, end: int, step: int, n: int) -> slice:
    """The Python slice of ONNX Slice's start, end and step on an axis of size n. The spec
    clamps a negative step's start (after adding n to a negative one) into [0, n - 1], where
    Python takes a start below -n as before the beginning (nothing): x[-5:-10:-1] of 3 items
    is [x0] in ONNX and onnxruntime, [] in NumPy. Otherwise Python's clamping is the spec's."""
    start, end, step = int(start), int(end), int(step)
    if step > 0 or n == 0:
        return slice(start, end, step)
    if start < 0:
        start += n
    start = min(max(start, 0), n - 1)
    if end < 0:
        end += n
    end = min(max(end, -1), n - 1)
    return slice(start, end if end >= 0 else None, step)


def _slice(x, starts, ends, axes, steps):
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = a % x.ndim
        index[a] = spec_slice(s, e, st, x.shape[a])
    return x[tuple(index)]


@kernel("Slice", since=1)
def Slice_1(xp, x, *, starts, ends, axes=None):
    return (_slice(x, list(starts), list(ends), axes, None),)


@kernel("Slice", since=10)
def Slice(xp, x, starts, ends, axes=None, steps=None):
    return (_slice(x, _ints(starts), _ints(ends), _ints(axes) if axes is not None else None,
                   _ints(steps) if steps is not None else None),)


def _in_range(indices, n: int, op: str, axis: int) -> None:
    """Host indices against [-n, n), as the spec requires (an index past the end would wrap
    around silently, e.g. a token id past an embedding table: onnxruntime refuses it too). On
    a device nothing is checked (that would read the indices back at every call)."""
    if isinstance(indices, np.ndarray) and indices.size and (
            indices.min() < -n or indices.max() >= n):
        bad = indices[(indices < -n) | (indices >= n)].reshape(-1)[0]
        raise ModelError(f"{op}: index {int(bad)} is out of range for axis {axis} of size {n} "
                         f"(indices must lie in [{-n}, {n - 1}])")


def _each_in_range(indices, dims, op: str, first_axis: int) -> None:
    """_in_range for each column j of [..., k] indices against dims[j] (axis first_axis + j)."""
    if isinstance(indices, np.ndarray) and indices.size:
        cols = indices.reshape(-1, indices.shape[-1])
        for j, n in enumerate(dims):
            _in_range(cols[:, j], int(n), op, first_axis + j)


@kernel("Gather")
def Gather(xp, x, indices, *, axis=0):
    mod, (x, indices) = _same_device(xp, x, indices)
    axis = axis_in(axis, x.ndim, "Gather")
    _in_range(indices, x.shape[axis], "Gather", axis)
    return (mod.take(x, indices.astype(np.int64) % max(x.shape[axis], 1), axis=axis),)


@kernel("GatherElements", since=11)
def GatherElements(xp, x, indices, *, axis=0):
    axis = axis_in(axis, x.ndim, "GatherElements")
    _in_range(indices, x.shape[axis], "GatherElements", axis)
    idx = indices.astype(np.int64) % max(x.shape[axis], 1)
    # The indices may be smaller than the data along the other axes (as torch.gather allows):
    # only the leading part of each of those axes is read.
    x = x[tuple(slice(0, idx.shape[a]) if a != axis else slice(None) for a in range(x.ndim))]
    return (xp.take_along_axis(x, idx, axis=axis),)


@kernel("GatherND", since=11)
def GatherND(xp, data, indices, *, batch_dims=0):
    b, k = batch_dims, indices.shape[-1]
    _each_in_range(indices, data.shape[b:b + k], "GatherND", b)
    batch = data.shape[:b]
    mid = indices.shape[b:-1]
    nb, nm = int(np.prod(batch)), int(np.prod(mid))
    d = data.reshape((nb,) + data.shape[b:])
    dims = cached_constant(xp, ("dims", tuple(data.shape[b:b + k])), lambda: np.maximum(
        np.array(data.shape[b:b + k], dtype=np.int64), 1))
    idx = indices.reshape(nb, nm, k).astype(np.int64) % dims
    keys = (xp.arange(nb).reshape(nb, 1),) + tuple(idx[:, :, j] for j in range(k))
    return (d[keys].reshape(batch + mid + data.shape[b + k:]),)


@kernel("Compress", since=9)
def Compress(xp, x, condition, *, axis=None):
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis %= x.ndim
    keep = xp.nonzero(xp.asarray(condition).reshape(-1)[:x.shape[axis]])[0]
    return (xp.take(x, keep, axis=axis),)


@kernel("NonZero", since=9)
def NonZero(xp, x):
    if x.ndim == 0:
        return (xp.zeros((0, int(bool(x))), dtype=np.int64),)
    return (xp.stack(xp.nonzero(x)).astype(np.int64),)


# -- scattering -----------------------------------------------------------------------------
_REDUCE = {"add": "add", "mul": "multiply", "max": "maximum", "min": "minimum"}
# dtypes of CuPy's atomic scatters (cupy.add.at, cupyx.scatter_max / scatter_min)
_ATOMIC = {"add": {np.int32, np.int64, np.float16, np.float32, np.float64, np.uint32, np.uint64},
           "max": {np.int32, np.int64, np.float32, np.float64, np.uint32, np.uint64},
           "min": {np.int32, np.int64, np.float32, np.float64, np.uint32, np.uint64}}


def _scatter_rows(xp, out, rows, updates, reduction: str) -> None:
    """out[rows[i]] = f(out[rows[i]], updates[i]) in place, in order of i, duplicates included.

    Updates are applied in rounds: round r takes every row's r-th occurrence, so no round writes
    a row twice and plain fancy-index assignment is exact on NumPy and CuPy alike.
    """
    if reduction == "none":
        out[rows] = updates
        return
    if reduction not in _REDUCE:
        raise ValueError(f"unsupported reduction '{reduction}'")
    f = getattr(xp, _REDUCE[reduction])
    n = rows.shape[0]
    if n == 0:
        return
    if xp is not np and out.dtype.type in _ATOMIC.get(reduction, ()):
        # The device's atomic scatter: no read-back of the duplicate count (float sums may
        # add in another order than the host's rounds).
        scatter = xp.add.at if reduction == "add" else getattr(cupyx_module(),
                                                               f"scatter_{reduction}")
        scatter(out, rows, updates)
        return
    order = xp.argsort(rows, kind="stable")
    s = rows[order]
    first = xp.ones(n, dtype=bool)
    first[1:] = s[1:] != s[:-1]
    starts = xp.nonzero(first)[0]
    occurrence = xp.empty(n, dtype=np.int64)
    occurrence[order] = xp.arange(n) - starts[xp.cumsum(first) - 1]
    rounds = int(occurrence.max()) + 1
    for r in range(rounds):
        sel = xp.nonzero(occurrence == r)[0] if rounds > 1 else slice(None)
        target = rows[sel]
        out[target] = f(out[target], updates[sel])


@kernel("ScatterElements", since=11)
def ScatterElements(xp, data, indices, updates, *, axis=0, reduction="none"):
    axis = axis_in(axis, data.ndim, "ScatterElements")
    _in_range(indices, data.shape[axis], "ScatterElements", axis)
    out = data.copy()
    idx = indices.astype(np.int64) % max(data.shape[axis], 1)
    grids = _grids(xp, indices.shape)
    grids[axis] = idx
    if reduction == "none":
        out[tuple(grids)] = updates
        return (out,)
    strides = _row_major_strides(data.shape)
    flat = sum(g * s for g, s in zip(grids, strides, strict=True))
    flat = xp.broadcast_to(flat, indices.shape).reshape(-1)
    _scatter_rows(xp, out.reshape(-1), flat, updates.reshape(-1), reduction)
    return (out,)


@kernel("Scatter", since=9)
def Scatter(xp, data, indices, updates, *, axis=0):
    return ScatterElements(xp, data, indices, updates, axis=axis)


@kernel("ScatterND", since=11)
def ScatterND(xp, data, indices, updates, *, reduction="none"):
    k = indices.shape[-1]
    lead, rest = data.shape[:k], data.shape[k:]
    _each_in_range(indices, lead, "ScatterND", 0)
    dims = cached_constant(xp, ("dims", tuple(lead)), lambda: np.maximum(
        np.array(lead, dtype=np.int64), 1))
    strides = cached_constant(xp, ("strides", tuple(lead)), lambda: np.array(
        _row_major_strides(lead), dtype=np.int64))
    idx = indices.reshape(-1, k).astype(np.int64) % dims
    rows = (idx * strides).sum(axis=1)
    out = data.copy()
    width = int(np.prod(rest))
    _scatter_rows(xp, out.reshape(int(np.prod(lead)), width), rows,
                  updates.reshape(rows.shape[0], width), reduction)
    return (out,)


@kernel("TensorScatter", since=24)
def TensorScatter(xp, past_cache, update, write_indices=None, *, mode="linear", axis=-2):
    axis %= past_cache.ndim
    if axis == 0:
        raise ValueError("TensorScatter: axis must not be the batch axis 0")
    batch, seq, cap = update.shape[0], update.shape[axis], past_cache.shape[axis]
    start = (write_indices.astype(np.int64).reshape(batch, 1) if write_indices is not None
             else xp.zeros((batch, 1), dtype=np.int64))
    pos = start + xp.arange(seq).reshape(1, seq)
    if mode == "circular":
        pos = pos % cap
    elif mode != "linear":
        raise ValueError(f"TensorScatter: unknown mode '{mode}'")
    shape = [1] * update.ndim
    shape[0], shape[axis] = batch, seq
    grids = _grids(xp, update.shape)
    grids[axis] = pos.reshape(shape)
    out = past_cache.copy()
    out[tuple(grids)] = update
    return (out,)


# -- padding --------------------------------------------------------------------------------
def _pad_source(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """For each output position along one axis, the input position it copies (host ints)."""
    idx = np.arange(-before, n + after)
    if mode == "edge":
        return np.clip(idx, 0, n - 1)
    if mode == "wrap":
        return idx % n
    if mode == "reflect":  # mirror on the first and last values: period 2(n-1)
        if n == 1:
            return np.zeros_like(idx)
        m = idx % (2 * (n - 1))
        return np.where(m >= n, 2 * (n - 1) - m, m)
    raise ValueError(f"Pad: unknown mode '{mode}'")


def _pad(xp, x, pads, mode, value, axes=None):
    r = x.ndim
    axes = [a % r for a in axes] if axes is not None else list(range(r))
    if len(pads) != 2 * len(axes):
        raise ValueError(f"Pad: {len(pads)} pads for {len(axes)} axes")
    before, after = [0] * r, [0] * r
    for i, a in enumerate(axes):
        before[a], after[a] = pads[i], pads[i + len(axes)]
    for a in range(r):
        if x.shape[a] + before[a] + after[a] < 0:
            raise ValueError(f"Pad: pads {before[a]}, {after[a]} remove more than axis {a}'s "
                             f"{x.shape[a]} elements")
    if mode == "constant":
        # output position j of an axis holds input j - before: the input's overlap with the
        # output is copied (a negative pad that removes more than the axis holds eats into
        # the other side's padding: length n + before + after, as the spec says)
        shape = tuple(n + b + e for n, b, e in zip(x.shape, before, after, strict=True))
        if value is None:
            out = (np.full(shape, "", dtype=x.dtype) if x.dtype == object
                   else xp.zeros(shape, dtype=x.dtype))
        else:
            out = xp.empty(shape, dtype=x.dtype)
            out[...] = value.reshape(()) if hasattr(value, "reshape") else value
        lo = [max(0, -b) for b in before]
        hi = [max(lo_, min(n, n + e)) for lo_, n, e in zip(lo, x.shape, after, strict=True)]
        out[tuple(slice(l_ + b, h + b) for l_, h, b in zip(lo, hi, before, strict=True))] = \
            x[tuple(slice(l_, h) for l_, h in zip(lo, hi, strict=True))]
        return out
    # Negative pads remove elements: crop first, then pad by the positive amounts.
    for a in range(r):
        cut = max(-before[a], 0) + max(-after[a], 0)
        if cut > x.shape[a] or (cut == x.shape[a] and (before[a] > 0 or after[a] > 0)):
            raise ValueError(f"Pad: mode '{mode}' cannot pad axis {a} from its {x.shape[a]} "
                             f"elements after negative pads ({before[a]}, {after[a]}) remove "
                             f"{cut} of them (onnxruntime refuses it too)")
    x = x[tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0))
                for i, (b, e) in enumerate(zip(before, after, strict=True)))]
    before, after = [max(b, 0) for b in before], [max(e, 0) for e in after]
    for a in range(r):
        if before[a] or after[a]:
            src = _pad_source(x.shape[a], before[a], after[a], mode)
            x = xp.take(x, xp.asarray(src), axis=a)
    return x


@kernel("Pad", since=1)
def Pad_1(xp, x, *, paddings, mode="constant", value=0.0):
    return (_pad(xp, x, list(paddings), mode, value),)


@kernel("Pad", since=2)
def Pad_2(xp, x, *, pads, mode="constant", value=0.0):
    return (_pad(xp, x, list(pads), mode, value),)


@kernel("Pad", since=11)
def Pad(xp, x, pads, constant_value=None, axes=None, *, mode="constant"):
    if constant_value is not None and constant_value.size == 0:
        constant_value = None
    return (_pad(xp, x, _ints(pads), mode, constant_value,
                 _ints(axes) if axes is not None else None),)


# -- sorting and selection ------------------------------------------------------------------
def _sort_keys(xp, x):
    """x in a dtype every backend sorts: bfloat16 widens exactly to float32, bool to uint8."""
    if x.dtype.kind == "V":
        return x.astype(np.float32)
    return x.astype(np.uint8) if x.dtype == bool else x


def _topk(xp, x, k, axis, largest):
    axis = axis_in(axis, x.ndim, "TopK")
    n = x.shape[axis]
    if not 0 <= k <= n:
        raise ModelError(f"TopK: k {k} is out of range for an axis of size {n} (it must lie in "
                         f"[0, {n}])")
    keys = _sort_keys(xp, x)
    if largest:
        # Descending with ties by lower index: stable ascending sort of the reversed axis,
        # read backwards.
        order = n - 1 - xp.flip(xp.argsort(xp.flip(keys, axis), axis=axis, kind="stable"), axis)
    else:
        order = xp.argsort(keys, axis=axis, kind="stable")
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, k)
    order = order[tuple(index)]
    return xp.take_along_axis(x, order, axis=axis), order.astype(np.int64)


@kernel("TopK", since=1)
def TopK_1(xp, x, *, k, axis=-1):
    return _topk(xp, x, k, axis, True)


@kernel("TopK", since=10)
def TopK(xp, x, k, *, axis=-1, largest=1, sorted=1):  # noqa: A002 - the spec's name
    # sorted=0 leaves the order unspecified: sorted order is a valid answer.
    return _topk(xp, x, _ints(k)[0], axis, bool(largest))


@kernel("Unique", since=11)
def Unique(xp, x, *, axis=None, sorted=1):  # noqa: A002 - the spec's name
    if axis is None:
        rows = x.reshape(-1, 1)
    else:
        axis = axis_in(axis, x.ndim, "Unique")
        moved = xp.moveaxis(x, axis, 0)
        # (the row length by the shape: -1 cannot be inferred where the axis is empty)
        rows = moved.reshape(moved.shape[0], int(np.prod(moved.shape[1:], dtype=np.int64)))
    n = rows.shape[0]
    keys = _sort_keys(xp, rows)
    if n == 0 or keys.shape[1] == 0:
        order = xp.arange(n)
    elif keys.shape[1] == 1:
        order = xp.argsort(keys[:, 0], kind="stable")
    else:  # lexicographic over the slice's elements, first element most significant
        order = xp.lexsort(xp.ascontiguousarray(keys.T[::-1]))
    s = keys[order]
    first = xp.ones(n, dtype=bool)
    if n > 1:
        differ = s[1:] != s[:-1]
        if axis is None and s.dtype.kind == "f":  # NaNs are one value, as in numpy.unique
            differ &= ~(xp.isnan(s[1:]) & xp.isnan(s[:-1]))
        first[1:] = differ.any(axis=1)
    starts = xp.nonzero(first)[0]
    indices = order[starts]  # a stable sort puts each value's first occurrence first
    group = xp.cumsum(first) - 1
    inverse = xp.empty(n, dtype=np.int64)
    inverse[order] = group
    counts = xp.diff(xp.concatenate([starts, xp.asarray([n])]))
    if not sorted:  # order of first occurrence
        perm = xp.argsort(indices)
        rank = xp.empty(perm.shape[0], dtype=np.int64)
        rank[perm] = xp.arange(perm.shape[0])
        indices, counts, inverse = indices[perm], counts[perm], rank[inverse]
    y = xp.take(x.reshape(-1), indices) if axis is None else xp.take(x, indices, axis=axis)
    return (y, indices.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64))


@kernel("Trilu", since=14)
def Trilu(xp, x, k=None, *, upper=1):
    k = _ints(k)[0] if k is not None else 0
    if x.ndim < 2:
        raise ModelError(f"Trilu: the input needs at least 2 axes, got shape {list(x.shape)}")
    n, m = x.shape[-2:]
    diag = xp.arange(m).reshape(1, m) - xp.arange(n).reshape(n, 1)
    keep = diag >= k if upper else diag <= k
    return (xp.where(keep, x, xp.zeros((), dtype=x.dtype)),)


@kernel("ReverseSequence", since=10)
def ReverseSequence(xp, x, sequence_lens, *, batch_axis=1, time_axis=0):
    batch, time = x.shape[batch_axis], x.shape[time_axis]
    if sequence_lens.size != batch:
        raise ModelError(f"ReverseSequence: sequence_lens holds {sequence_lens.size} lengths "
                         f"for a batch of {batch}")
    lens = sequence_lens.astype(np.int64).reshape(batch, 1)
    if isinstance(lens, np.ndarray):  # (on a device a length out of range is clipped: no read)
        bad = lens[(lens < 0) | (lens > time)]
        if bad.size:
            raise ModelError(f"ReverseSequence: sequence length {int(bad[0])} is out of range "
                             f"for a time axis of {time} (lengths lie in [0, {time}])")
    else:
        lens = xp.clip(lens, 0, time)
    t = xp.arange(time).reshape(1, time)
    src = xp.where(t < lens, lens - 1 - t, t)  # [batch, time]
    if time_axis < batch_axis:
        src = src.T
    shape = [1] * x.ndim
    shape[batch_axis], shape[time_axis] = batch, time
    src = xp.broadcast_to(src.reshape(shape), x.shape)
    return (xp.take_along_axis(x, src, axis=time_axis),)


# -- depth / space ---------------------------------------------------------------------------
@kernel("DepthToSpace", since=1)
def DepthToSpace(xp, x, *, blocksize, mode="DCR"):
    b, c, h, w = x.shape
    bs = blocksize
    if mode == "DCR":
        t = x.reshape(b, bs, bs, c // bs**2, h, w).transpose(0, 3, 4, 1, 5, 2)
    elif mode == "CRD":
        t = x.reshape(b, c // bs**2, bs, bs, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        raise ValueError(f"DepthToSpace: unknown mode '{mode}'")
    return (t.reshape(b, c // bs**2, h * bs, w * bs),)


@kernel("SpaceToDepth", since=1)
def SpaceToDepth(xp, x, *, blocksize, mode="DCR"):
    b, c, h, w = x.shape
    bs = blocksize
    t = x.reshape(b, c, h // bs, bs, w // bs, bs)
    if mode == "DCR":
        t = t.transpose(0, 3, 5, 1, 2, 4)
    elif mode == "CRD":
        t = t.transpose(0, 1, 3, 5, 2, 4)
    else:
        raise ValueError(f"SpaceToDepth: unknown mode '{mode}'")
    return (t.reshape(b, c * bs * bs, h // bs, w // bs),)


# -- constants and generators ---------------------------------------------------------------
@kernel("ConstantOfShape")
def ConstantOfShape(xp, shape, *, value=None):
    fill = np.zeros(1, np.float32) if value is None else value
    return (xp.full(tuple(_ints(shape)), fill.reshape(-1)[0], dtype=fill.dtype),)


def _sparse_to_dense(sp) -> np.ndarray:
    from onnx import numpy_helper

    values = numpy_helper.to_array(sp.values)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    dims = tuple(sp.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if idx.ndim == 1:  # linearized indices
        dense.reshape(-1)[idx] = values
    else:
        dense[tuple(idx.T)] = values
    return dense


@kernel("Constant")
def Constant(xp, *, value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, sparse_value=None, value_string=None, value_strings=None):
    """String values stay host-only NumPy object arrays. (Device executors fold Constant nodes
    once, on the host, and copy a value to the device only where a kernel reads it as data.)"""
    if value is not None:
        return (value if value.dtype == object else xp.asarray(value),)
    if value_float is not None:
        return (xp.asarray(np.float32(value_float)),)
    if value_floats is not None:
        return (xp.asarray(np.array(value_floats, np.float32)),)
    if value_int is not None:
        return (xp.asarray(np.int64(value_int)),)
    if value_ints is not None:
        return (xp.asarray(np.array(value_ints, np.int64)),)
    if value_string is not None:
        return (np.array(value_string, dtype=object),)
    if value_strings is not None:
        return (np.array(value_strings, dtype=object),)
    if sparse_value is not None:
        return (xp.asarray(_sparse_to_dense(sparse_value)),)
    raise ValueError("Constant: no value attribute")


@kernel("OneHot", since=9)
def OneHot(xp, indices, depth, values, *, axis=-1):
    d = int(host_scalar(depth))
    idx = indices.astype(np.int64)
    idx = xp.where(idx < 0, idx + d, idx)
    rank = idx.ndim + 1
    ax = axis % rank
    shape = [1] * rank
    shape[ax] = d
    classes = xp.arange(d).reshape(shape)
    hot = xp.expand_dims(idx, ax) == classes
    return (xp.where(hot, values[1], values[0]).astype(values.dtype),)


@kernel("Range", since=11)
def Range(xp, start, limit, delta, *, stash_type=1):
    dtype = start.dtype
    s, e, d = (host_scalar(v) for v in (start, limit, delta))
    if d == 0:
        raise ModelError("Range: delta is 0 (the number of elements, ceil((limit - start) / "
                         "delta), is undefined)")
    if dtype.kind in "iu":
        n = max(-((s - e) // d), 0)  # exact ceil((e - s) / d)
        return (xp.asarray(s + xp.arange(n, dtype=np.int64) * d).astype(dtype),)
    n = max(int(np.ceil((e - s) / d)), 0)
    # float16/bfloat16 compute in the stash type (opset 27); other floats in float64.
    work = np_dtype(stash_type) if dtype.itemsize == 2 else np.dtype(np.float64)
    return ((work.type(s) + xp.arange(n, dtype=work) * work.type(d)).astype(dtype),)


@kernel("EyeLike")
def EyeLike(xp, x, *, dtype=None, k=0):
    dt = np_dtype(dtype) if dtype is not None else x.dtype
    if x.ndim != 2:
        raise ModelError(f"EyeLike: the input must be 2-D, got shape {list(x.shape)}")
    return (xp.eye(x.shape[0], x.shape[1], k=k, dtype=dt),)
