"""Shape and data-movement kernels: Reshape, Transpose, Concat, Gather, Slice, Expand, ..."""

from __future__ import annotations

import numpy as np

from trainer.graph import np_dtype
from trainer.kernels import host_ints as _ints
from trainer.kernels import kernel


def reshape_target(in_shape: tuple, shape: list[int], allowzero: int = 0) -> tuple:
    out = [in_shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
    return tuple(out)


@kernel("Reshape", since=5)
def Reshape(xp, x, shape, *, allowzero=0):
    return (x.reshape(reshape_target(x.shape, _ints(shape), allowzero)),)


@kernel("Flatten")
def Flatten(xp, x, *, axis=1):
    axis %= x.ndim if axis < 0 else x.ndim + 1
    lead = int(np.prod(x.shape[:axis]))
    return (x.reshape(lead, -1) if x.size else x.reshape(lead, int(np.prod(x.shape[axis:]))),)


@kernel("Transpose")
def Transpose(xp, x, *, perm=None):
    return (xp.transpose(x, perm if perm is not None else None),)


@kernel("Shape", since=1)
def Shape(xp, x, *, start=0, end=None):
    return (np.array(x.shape[start:end], dtype=np.int64),)


@kernel("Size")
def Size(xp, x):
    return (np.array(x.size, dtype=np.int64),)


@kernel("Squeeze", since=1)
def Squeeze_1(xp, x, *, axes=None):
    return (xp.squeeze(x, axis=tuple(axes) if axes else None),)


@kernel("Squeeze", since=13)
def Squeeze_13(xp, x, axes=None):
    return (xp.squeeze(x, axis=tuple(_ints(axes)) if axes is not None else None),)


def _unsqueeze(xp, x, axes):
    rank = x.ndim + len(axes)
    out = x
    for a in sorted(a % rank for a in axes):
        out = xp.expand_dims(out, a)
    return out


@kernel("Unsqueeze", since=1)
def Unsqueeze_1(xp, x, *, axes):
    return (_unsqueeze(xp, x, axes),)


@kernel("Unsqueeze", since=13)
def Unsqueeze_13(xp, x, axes):
    return (_unsqueeze(xp, x, _ints(axes)),)


@kernel("Concat")
def Concat(xp, *xs, axis):
    if all(isinstance(x, np.ndarray) for x in xs) or xp is np:
        return (np.concatenate(xs, axis=axis),)
    return (xp.concatenate([xp.asarray(x) for x in xs], axis=axis),)


@kernel("Split", since=1)
def Split_1(xp, x, *, axis=0, split=None, n_outputs=2):
    return _split(xp, x, axis, split, n_outputs)


@kernel("Split", since=13)
def Split_13(xp, x, split=None, *, axis=0, num_outputs=None, n_outputs=2):
    # Without `split`, equal parts: as many as num_outputs (opset 18) or the node's outputs.
    return _split(xp, x, axis, _ints(split) if split is not None else None,
                  num_outputs or n_outputs)


def _split(xp, x, axis, split, num_outputs):
    if split is None:
        n = num_outputs or 2
        size = -(-x.shape[axis] // n)
        split = [min(size, x.shape[axis] - i * size) for i in range(n)]
    bounds = np.cumsum(split)[:-1]
    return tuple(xp.split(x, bounds.tolist(), axis=axis))


@kernel("Gather")
def Gather(xp, x, indices, *, axis=0):
    return (xp.take(x, indices.astype(np.int64) % x.shape[axis] if indices.size else indices,
                    axis=axis),)


@kernel("Slice", since=10)
def Slice(xp, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[a % x.ndim] = slice(s, e, st)  # Python clamps starts/ends as the spec does
    return (x[tuple(index)],)


@kernel("Expand", since=8)
def Expand(xp, x, shape):
    target = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
    return (xp.broadcast_to(x, target),)


@kernel("ConstantOfShape")
def ConstantOfShape(xp, shape, *, value=None):
    fill = np.zeros(1, np.float32) if value is None else value
    return (xp.full(tuple(_ints(shape)), fill.reshape(-1)[0], dtype=fill.dtype),)


@kernel("Constant")
def Constant(xp, *, value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, sparse_value=None, value_string=None, value_strings=None):
    if value is not None:
        return (xp.asarray(value),)
    if value_float is not None:
        return (xp.asarray(np.float32(value_float)),)
    if value_floats is not None:
        return (xp.asarray(np.array(value_floats, np.float32)),)
    if value_int is not None:
        return (np.asarray(np.int64(value_int)),)
    if value_ints is not None:
        return (np.array(value_ints, np.int64),)
    raise ValueError("Constant: unsupported value kind (sparse or string)")


@kernel("OneHot", since=9)
def OneHot(xp, indices, depth, values, *, axis=-1):
    d = int(np.asarray(depth).reshape(-1)[0])
    idx = indices.astype(np.int64)
    idx = xp.where(idx < 0, idx + d, idx)
    rank = idx.ndim + 1
    ax = axis % rank
    shape = [1] * rank
    shape[ax] = d
    classes = xp.arange(d).reshape(shape)
    hot = xp.expand_dims(idx, ax) == classes
    return (xp.where(hot, values[1], values[0]).astype(values.dtype),)


@kernel("ScatterElements", since=11)
def ScatterElements(xp, data, indices, updates, *, axis=0, reduction="none"):
    out = data.copy()
    idx = indices.astype(np.int64) % data.shape[axis]
    grids = list(xp.indices(indices.shape, sparse=True))
    grids[axis] = idx
    if reduction == "none":
        out[tuple(grids)] = updates
    elif reduction in _SCATTER_UFUNC:
        if xp is np:
            getattr(np, _SCATTER_UFUNC[reduction]).at(out, tuple(grids), updates)
        else:
            _scatter_gpu(out, grids, updates, reduction)
    else:
        raise ValueError(f"ScatterElements: reduction '{reduction}' is not supported")
    return (out,)


_SCATTER_UFUNC = {"add": "add", "mul": "multiply", "max": "maximum", "min": "minimum"}


def _scatter_gpu(out, grids, updates, reduction):  # pragma: no cover - GPU only
    import cupyx
    fn = getattr(cupyx, f"scatter_{reduction}", None)
    if fn is None:
        raise ValueError(f"ScatterElements: reduction '{reduction}' is not supported on GPU")
    fn(out, tuple(grids), updates)


@kernel("Range")
def Range(xp, start, limit, delta):
    return (np.arange(start, limit, delta, dtype=np.asarray(start).dtype),)


@kernel("EyeLike")
def EyeLike(xp, x, *, dtype=None, k=0):
    dt = np_dtype(dtype) if dtype is not None else x.dtype
    return (xp.eye(x.shape[0], x.shape[1], k=k, dtype=dt),)
