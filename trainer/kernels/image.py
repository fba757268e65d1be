"""Resampling and detection kernels: Resize, Upsample, GridSample, AffineGrid, CenterCropPad,
DeformConv, RoiAlign, MaxRoiPool, NonMaxSuppression. Interpolation weights that depend only on
shapes are built on the host; data is gathered and weighted on the device."""

from __future__ import annotations

import itertools
import math

import numpy as np

from trainer.backend import to_host
from trainer.errors import ModelError
from trainer.kernels import host_ints, kernel


def _floats(a) -> list[float]:
    """A small float input (scales, roi) read on the host."""
    return [float(v) for v in (a.tolist() if hasattr(a, "tolist") else a)]


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """Interpolation arithmetic: float64 for float64, integer and bool data, else float32."""
    if dtype == np.float64 or dtype.kind in "iub":
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _cast_back(xp, y, dtype: np.dtype, rounding: bool):
    """Interpolated values back to the input dtype; ints saturate (rounding half to even)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if rounding:
            y = xp.rint(y)
        return xp.clip(y, info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return y != 0
    return y.astype(dtype)


def _keys(d, a: float):
    """Keys' cubic convolution kernel at distances d (NumPy or CuPy array)."""
    d = abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return (d <= 1) * near + ((d > 1) & (d < 2)) * far


# -- Resize / Upsample -------------------------------------------------------------------------
def _source_coords(ctm: str, out_len: int, in_len: int, scale: float, width: float,
                   roi: tuple[float, float] | None, dtype=np.float64) -> np.ndarray:
    """Input coordinate of each output index (host, in `dtype`); width = scale * in_len as a
    possibly fractional output length (what align_corners and half_pixel_symmetric use)."""
    if dtype != np.float64:  # (every operand in that type: each operation rounds to it)
        f = np.dtype(dtype).type
        scale, width = f(scale), f(width)
        in_len = f(in_len)
        roi = None if roi is None else (f(roi[0]), f(roi[1]))
    y = np.arange(out_len, dtype=dtype)
    if ctm == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if ctm == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / width)
        return offset + (y + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return (y + 0.5) / scale - 0.5 if out_len > 1 else np.zeros(out_len)
    if ctm == "align_corners":
        return y * (in_len - 1) / (width - 1) if width != 1 else np.zeros(out_len)
    if ctm == "asymmetric":
        return y / scale
    if ctm == "tf_half_pixel_for_nn":
        return (y + 0.5) / scale
    if ctm == "tf_crop_and_resize":
        start, end = roi if roi is not None else (0.0, 1.0)
        if width == 1:
            return np.full(out_len, (start + end) / 2 * (in_len - 1))
        return start * (in_len - 1) + y * (end - start) * (in_len - 1) / (width - 1)
    raise ValueError(f"Resize: unknown coordinate_transformation_mode {ctm!r}")


def _axis_table(in_len: int, out_len: int, scale: float, width: float, roi, *, mode: str,
                ctm: str, nearest_mode: str, cubic_coeff_a: float, exclude_outside: int,
                antialias: int):
    """(indices [out, taps], weights [out, taps] or None for nearest, extrapolated [out] or None)
    for resampling one axis."""
    # (nearest: the coordinate in float32, as onnxruntime computes it: the float32 scale
    # widened to float64 kept its rounding, and 3 / float32(0.6) was 4.9999998, floored to
    # pixel 4 where onnxruntime and PyTorch take 5; linear and cubic weights: float64)
    x = _source_coords(ctm, out_len, in_len, scale, width, roi,
                       np.float32 if mode == "nearest" else np.float64)
    outside = (x < 0) | (x > in_len - 1) if ctm == "tf_crop_and_resize" else None
    if mode == "nearest":
        lo = np.floor(x)
        frac = x - lo
        if nearest_mode == "simple":  # Resize-10 / Upsample: ceil when downsampling
            idx = np.ceil(x) if scale < 1 else lo
        elif nearest_mode == "round_prefer_floor":
            idx = lo + (frac > 0.5)
        elif nearest_mode == "round_prefer_ceil":
            idx = lo + (frac >= 0.5)
        elif nearest_mode == "floor":
            idx = lo
        elif nearest_mode == "ceil":
            idx = np.ceil(x)
        else:
            raise ValueError(f"Resize: unknown nearest_mode {nearest_mode!r}")
        return np.clip(idx, 0, in_len - 1).astype(np.int64)[:, None], None, outside
    if mode not in ("linear", "cubic"):
        raise ValueError(f"Resize: unknown mode {mode!r}")
    # The filter is stretched by 1/scale when antialiasing a downscale; taps are the window of
    # input positions around x that the stretched support can reach.
    s = min(scale, 1.0) if antialias else 1.0
    support = (1.0 if mode == "linear" else 2.0) / s
    first = math.floor(-support) + 1
    taps = 2 - 2 * first
    idx = (np.ceil(x) - 1)[:, None] + np.arange(first, first + taps)[None, :]
    d = (idx - x[:, None]) * s
    w = np.clip(1 - np.abs(d), 0, 1) if mode == "linear" else _keys(d, cubic_coeff_a)
    if antialias:
        w = w / w.sum(axis=1, keepdims=True)
    if exclude_outside:
        w = np.where((idx < 0) | (idx > in_len - 1), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    return np.clip(idx, 0, in_len - 1).astype(np.int64), w, outside


_DENSE_LIMIT = 1 << 22  # largest in * out resampled by a dense matrix rather than by gathers


def _resize(xp, x, scales: list[float] | None, sizes: list[int] | None, roi: list[float] | None,
            axes: list[int] | None, *, mode: str, ctm: str, nearest_mode: str,
            cubic_coeff_a: float = -0.75, exclude_outside: int = 0,
            extrapolation_value: float = 0.0, antialias: int = 0,
            keep_aspect_ratio_policy: str = "stretch"):
    r = x.ndim
    axes = [a % r for a in axes] if axes else list(range(r))
    n = len(axes)
    inputs = [x.shape[a] for a in axes]
    if sizes is not None:
        ratios = [sizes[i] / inputs[i] for i in range(n)]
        if keep_aspect_ratio_policy == "stretch":
            scale, out, width = ratios, list(sizes), [float(v) for v in sizes]
        elif keep_aspect_ratio_policy in ("not_larger", "not_smaller"):
            s = min(ratios) if keep_aspect_ratio_policy == "not_larger" else max(ratios)
            scale = [s] * n
            out = [int(s * v + 0.5) for v in inputs]
            width = [s * v for v in inputs]
        else:
            raise ValueError(f"Resize: unknown keep_aspect_ratio_policy "
                             f"{keep_aspect_ratio_policy!r}")
    elif scales is not None:
        scale = list(scales)
        width = [scale[i] * inputs[i] for i in range(n)]
        # floor(length * scale) in float32, the scales' type, as onnxruntime takes it (and
        # PyTorch, whose exporter writes its scale_factor so): 5 * float32(1.4) is 7, where
        # the product in float64, 6.99999988, gave 6
        out = [int(np.floor(np.float32(scale[i]) * np.float32(inputs[i]))) for i in range(n)]
    else:
        raise ValueError("Resize: one of scales and sizes is required")
    rois = [(roi[i], roi[i + n]) for i in range(n)] if roi else [None] * n

    dtype = x.dtype
    interpolate = mode != "nearest"
    cdtype = _compute_dtype(dtype)
    y = x.astype(cdtype) if interpolate else x
    for i, axis in enumerate(axes):
        crop = ctm == "tf_crop_and_resize" and rois[i] is not None and rois[i] != (0.0, 1.0)
        if out[i] == inputs[i] and not crop and (scale[i] == 1.0 or not interpolate):
            continue  # (nearest to the same length copies the axis, as onnxruntime does, and
            # PyTorch's 2-D kernel: nn.Upsample(scale_factor=1.1) on 8 rows)
        idx, w, outside = _axis_table(
            inputs[i], out[i], scale[i], width[i], rois[i], mode=mode, ctm=ctm,
            nearest_mode=nearest_mode, cubic_coeff_a=cubic_coeff_a,
            exclude_outside=exclude_outside, antialias=antialias)
        tail = (1,) * (r - axis - 1)
        if w is not None and inputs[i] * out[i] <= _DENSE_LIMIT:
            # one matmul with the dense [out, in] interpolation matrix (taps clamped at the
            # edges add up in it)
            dense = np.zeros((out[i], inputs[i]))
            np.add.at(dense, (np.arange(out[i])[:, None], idx), w)
            dense = xp.asarray(dense.astype(cdtype))
            lead, trail = math.prod(y.shape[:axis]), math.prod(y.shape[axis + 1:])
            if trail == 1:
                g = xp.matmul(y.reshape(lead, inputs[i]), dense.T)
            else:
                g = xp.matmul(dense, y.reshape(lead, inputs[i], trail))
            g = g.reshape(y.shape[:axis] + (out[i],) + y.shape[axis + 1:])
        elif w is not None:
            g = xp.take(y, xp.asarray(idx.reshape(-1)), axis=axis)
            g = g.reshape(y.shape[:axis] + idx.shape + y.shape[axis + 1:])
            g = (g * xp.asarray(w.astype(cdtype)).reshape(idx.shape + tail)).sum(axis=axis + 1)
        else:
            g = xp.take(y, xp.asarray(idx.reshape(-1)), axis=axis)
        if outside is not None and outside.any():
            fill = xp.asarray(np.asarray(extrapolation_value).astype(g.dtype))
            g = xp.where(xp.asarray(outside).reshape((-1,) + tail), fill, g)
        y = g
    if not interpolate:
        return xp.ascontiguousarray(y)
    return _cast_back(xp, y, dtype, rounding=True)


@kernel("Resize", since=10)
def Resize_10(xp, x, scales, *, mode="nearest"):
    """Resize-10: asymmetric coordinates; nearest floors when upsampling and ceils when
    downsampling (as onnxruntime does for opset 10)."""
    return (_resize(xp, x, _floats(scales), None, None, None, mode=mode, ctm="asymmetric",
                    nearest_mode="simple"),)


@kernel("Resize", since=11)
def Resize(xp, x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None,
           coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75, exclude_outside=0,
           extrapolation_value=0.0, keep_aspect_ratio_policy="stretch", mode="nearest",
           nearest_mode="round_prefer_floor"):
    """Resize-11 to -19 (antialias, axes and keep_aspect_ratio_policy since 18,
    half_pixel_symmetric since 19). Output sizes from scales ignore roi, as onnxruntime and the
    ONNX reference do."""
    scales = _floats(scales) if scales is not None and scales.size else None
    sizes = host_ints(sizes) if sizes is not None and sizes.size else None
    if scales is not None and sizes is not None:
        raise ModelError("Resize: scales and sizes are both given (the spec takes exactly one "
                         "of them; leave the other input empty)")
    roi = _floats(roi) if roi is not None and roi.size else None
    return (_resize(xp, x, scales, sizes, roi, axes, mode=mode,
                    ctm=coordinate_transformation_mode, nearest_mode=nearest_mode,
                    cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                    extrapolation_value=extrapolation_value, antialias=antialias,
                    keep_aspect_ratio_policy=keep_aspect_ratio_policy),)


def _upsample(xp, x, scales: list[float], mode: str):
    mode = "linear" if mode in ("linear", "bilinear") else mode
    return _resize(xp, x, scales, None, None, None, mode=mode, ctm="asymmetric",
                   nearest_mode="simple")


@kernel("Upsample", since=1)
def Upsample_1(xp, x, *, height_scale, width_scale, mode="nearest"):
    return (_upsample(xp, x, [1.0, 1.0, height_scale, width_scale], mode),)


@kernel("Upsample", since=7)
def Upsample_7(xp, x, *, scales, mode="nearest"):
    return (_upsample(xp, x, list(scales), mode),)


@kernel("Upsample", since=9)
def Upsample_9(xp, x, scales, *, mode="nearest"):
    return (_upsample(xp, x, _floats(scales), mode),)


# -- point sampling shared by GridSample and DeformConv ---------------------------------------
def _taps(xp, x, mode: str, a: float = -0.75):
    """Integer tap positions [..., T] and weights [..., T] (None for nearest) around x."""
    if mode == "nearest":
        return xp.rint(x).astype(np.int64)[..., None], None
    lo = xp.floor(x)
    f = x - lo
    lo = lo.astype(np.int64)
    if mode == "linear":
        return xp.stack([lo, lo + 1], axis=-1), xp.stack([1 - f, f], axis=-1)
    if mode == "cubic":
        idx = xp.stack([lo - 1, lo, lo + 1, lo + 2], axis=-1)
        w = xp.stack([_keys(f + 1, a), _keys(f, a), _keys(1 - f, a), _keys(2 - f, a)], axis=-1)
        return idx, w.astype(x.dtype)
    raise ValueError(f"unknown interpolation mode {mode!r}")


def _reflect(xp, x, lo: float, hi: float):
    """Reflect x at the borders lo and hi until it lies within them."""
    span = hi - lo
    if span <= 0:
        return xp.zeros_like(x) + lo
    below = x < lo
    d = xp.where(below, lo - x, x - hi)
    flips = xp.floor(d / span)
    rest = d - flips * span
    even = (flips % 2) == 0
    inside_low = lo + rest  # distance measured from the low border
    inside_high = hi - rest
    refl = xp.where(below, xp.where(even, inside_low, inside_high),
                    xp.where(even, inside_high, inside_low))
    return xp.where((x < lo) | (x > hi), refl, x)


def _gather(xp, xf, flat):
    """xf [N, G, Cg, S]; flat [N, G, P] spatial indices -> [N, G, Cg, P]."""
    n, g = flat.shape[:2]
    return xf[xp.arange(n)[:, None, None, None], xp.arange(g)[None, :, None, None],
              xp.arange(xf.shape[2])[None, None, :, None], flat[:, :, None, :]]


def _sample(xp, xf, sizes, coords, mode, padding, borders, cdtype, a=-0.75):
    """Sample xf [N, G, Cg, *sizes] at float positions coords (one [N, G, P] array per
    spatial dim; channel group g uses coords[:, g]) -> [N, G, Cg, P]. padding: zeros (taps
    outside read 0), border (clamp) or reflection (reflect at borders[d] = (lo, hi))."""
    k = len(sizes)
    xf = xf.reshape(xf.shape[:3] + (-1,))
    if mode != "nearest":
        xf = xf.astype(cdtype)
    per_dim = []
    for d in range(k):
        idx, w = _taps(xp, coords[d], mode, a)
        size = sizes[d]
        valid = None
        if padding == "zeros":
            valid = (idx >= 0) & (idx < size)
        elif padding == "reflection":
            idx = _reflect(xp, idx.astype(cdtype), *borders[d]).astype(np.int64)
        idx = xp.clip(idx, 0, size - 1)
        per_dim.append((idx, w, valid))
    strides = [math.prod(sizes[d + 1:]) for d in range(k)]
    total = None
    for combo in itertools.product(*[range(p[0].shape[-1]) for p in per_dim]):
        flat, weight, valid = 0, None, None
        for d, t in enumerate(combo):
            idx, w, ok = per_dim[d]
            flat = flat + idx[..., t] * strides[d]
            if w is not None:
                weight = w[..., t] if weight is None else weight * w[..., t]
            if ok is not None:
                valid = ok[..., t] if valid is None else valid & ok[..., t]
        v = _gather(xp, xf, flat)
        if weight is None:  # nearest: one tap, exact values
            return v if valid is None else xp.where(valid[:, :, None, :], v, xp.zeros(
                (), dtype=v.dtype))
        if valid is not None:
            weight = weight * valid
        v = v * weight[:, :, None, :].astype(cdtype)
        total = v if total is None else total + v
    return total


# -- GridSample / AffineGrid -------------------------------------------------------------------
def _grid_sample(xp, x, grid, mode, padding_mode, align_corners):
    n, c = x.shape[:2]
    sizes = list(x.shape[2:])
    k = len(sizes)
    out = grid.shape[1:-1]
    gdtype = np.dtype(np.float64) if grid.dtype == np.float64 else np.dtype(np.float32)
    cdtype = _compute_dtype(x.dtype)
    g = grid.astype(gdtype).reshape(n, 1, -1, k)
    coords, borders = [], []
    for d in range(k):
        size = sizes[d]
        v = g[..., k - 1 - d]  # the grid lists the innermost (x) coordinate first
        if align_corners:
            v = (v + 1) / 2 * (size - 1)
            lo, hi = 0.0, size - 1.0
        else:
            v = ((v + 1) * size - 1) / 2
            lo, hi = -0.5, size - 0.5
        if mode == "nearest":
            v = xp.rint(v)
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"GridSample: unknown padding_mode {padding_mode!r}")
        # Linear and nearest move an outside location in (as PyTorch does); cubic pads each of
        # its taps instead (in _sample), as PyTorch and onnxruntime do.
        if padding_mode == "border" and mode != "cubic":
            v = xp.where((v < lo) | (v > hi), xp.clip(v, 0, size - 1), v)
        elif padding_mode == "reflection" and mode != "cubic":
            v = _reflect(xp, v, lo, hi)
        coords.append(v)
        borders.append((lo, hi))
    y = _sample(xp, x.reshape(n, 1, c, *sizes), sizes, coords, mode, padding_mode, borders,
                cdtype)
    y = y.reshape((n, c) + tuple(out))
    return y if mode == "nearest" else _cast_back(xp, y, x.dtype, rounding=False)


@kernel("GridSample", since=16)
def GridSample_16(xp, x, grid, *, align_corners=0, mode="bilinear", padding_mode="zeros"):
    """GridSample-16: 4-D input only, modes bilinear / nearest / bicubic."""
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    return (_grid_sample(xp, x, grid, mode, padding_mode, align_corners),)


@kernel("GridSample", since=20)
def GridSample(xp, x, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    """N-D GridSample: modes linear / nearest (round half to even) / cubic (Keys, a=-0.75)."""
    return (_grid_sample(xp, x, grid, mode, padding_mode, align_corners),)


@kernel("AffineGrid", since=20)
def AffineGrid(xp, theta, size, *, align_corners=0):
    spatial = host_ints(size)[2:]
    k = len(spatial)
    axes = []
    for length in reversed(spatial):  # x (innermost) first, as in the grid's last axis
        if align_corners:
            axes.append(np.linspace(-1.0, 1.0, length) if length > 1 else np.zeros(length))
        else:
            axes.append((2 * np.arange(length) + 1) / length - 1)
    mesh = np.meshgrid(*axes[::-1], indexing="ij")  # outermost spatial dim first
    base = np.stack([mesh[k - 1 - i] for i in range(k)] + [np.ones(spatial)], axis=-1)
    base = xp.asarray(base.reshape(-1, k + 1).astype(theta.dtype))
    grid = xp.matmul(base[None], theta.transpose(0, 2, 1))
    return (grid.reshape((theta.shape[0],) + tuple(spatial) + (k,)),)


# -- CenterCropPad -----------------------------------------------------------------------------
@kernel("CenterCropPad", since=18)
def CenterCropPad(xp, x, shape, *, axes=None):
    r = x.ndim
    axes = [a % r for a in axes] if axes else list(range(r))
    target = list(x.shape)
    src = [slice(None)] * r
    dst = [slice(None)] * r
    for a, t in zip(axes, host_ints(shape), strict=True):
        dim = x.shape[a]
        target[a] = t
        if t < dim:
            start = (dim - t) // 2
            src[a] = slice(start, start + t)
        elif t > dim:
            start = (t - dim) // 2
            dst[a] = slice(start, start + dim)
    y = xp.zeros(tuple(target), dtype=x.dtype)
    y[tuple(dst)] = x[tuple(src)]
    return (y,)


# -- DeformConv --------------------------------------------------------------------------------
@kernel("DeformConv", since=19)
def DeformConv(xp, x, w, offset, b=None, mask=None, *, dilations=None, group=1,
               kernel_shape=None, offset_group=1, pads=None, strides=None):
    """Deformable convolution: each kernel tap samples x bilinearly at its regular position
    plus a learned offset (zero outside x), times mask; then one grouped matmul."""
    n, c = x.shape[:2]
    sizes = list(x.shape[2:])
    k = len(sizes)
    kshape = list(kernel_shape or w.shape[2:])
    strides = list(strides or [1] * k)
    dilations = list(dilations or [1] * k)
    pads = list(pads or [0] * (2 * k))
    out = list(offset.shape[2:])
    og, nk, po = offset_group, math.prod(kshape), math.prod(out)
    cdtype = _compute_dtype(x.dtype)
    off = offset.astype(cdtype).reshape((n, og, nk, k, po))
    # regular sampling positions [K, O] per spatial dim: o * stride - pad_begin + tap * dilation
    taps = np.stack(np.unravel_index(np.arange(nk), kshape))  # [k, K]
    grid = np.stack(np.unravel_index(np.arange(po), out))  # [k, O]
    coords = []
    for d in range(k):
        base = (grid[d][None, :] * strides[d] - pads[d]
                + taps[d][:, None] * dilations[d]).astype(cdtype)
        coords.append((off[:, :, :, d, :] + xp.asarray(base)).reshape(n, og, nk * po))
    cols = _sample(xp, x.reshape(n, og, c // og, *sizes), sizes, coords, "linear", "zeros",
                   None, cdtype)  # [N, og, C/og, K*O]
    if mask is not None:
        cols = cols * mask.astype(cdtype).reshape(n, og, 1, nk * po)
    g, m = group, w.shape[0]
    cols = cols.reshape(n, g, (c // g) * nk, po)
    wm = w.astype(cdtype).reshape(g, m // g, (c // g) * nk)
    y = xp.matmul(wm[None], cols).reshape((n, m) + tuple(out))
    if b is not None:
        y = y + b.astype(cdtype).reshape((1, m) + (1,) * k)
    return (y.astype(x.dtype),)


# -- RoiAlign / MaxRoiPool ---------------------------------------------------------------------
def _bin_weights(xp, low, high, frac, ok, size, cdtype):
    """Dense [R, pooled, size] sum of the linear-interpolation weights of each bin's samples
    (low/high/frac/ok: [R, pooled, samples])."""
    grid = xp.arange(size)[None, None, None, :]
    wl = ((1 - frac) * ok)[..., None] * (low[..., None] == grid)
    wh = (frac * ok)[..., None] * (high[..., None] == grid)
    return (wl + wh).sum(axis=2).astype(cdtype)


def _roi_align(xp, x, rois, batch_indices, *, coordinate_transformation_mode, mode,
               output_height, output_width, sampling_ratio, spatial_scale):
    n, c, h, w = x.shape
    nr = rois.shape[0]
    cdtype = _compute_dtype(x.dtype)
    half = coordinate_transformation_mode == "half_pixel"
    if not half and coordinate_transformation_mode != "output_half_pixel":
        raise ValueError(f"RoiAlign: unknown coordinate_transformation_mode "
                         f"{coordinate_transformation_mode!r}")
    box = rois.astype(cdtype) * cdtype.type(spatial_scale) - cdtype.type(0.5 if half else 0.0)
    starts = [box[:, 1], box[:, 0]]  # (y, x)
    lengths = [box[:, 3] - box[:, 1], box[:, 2] - box[:, 0]]
    if not half:  # malformed RoIs are forced to 1x1
        lengths = [xp.maximum(v, 1) for v in lengths]
    pooled = [output_height, output_width]
    per_dim, counts = [], []
    for d, size in enumerate((h, w)):
        bin_size = lengths[d] / pooled[d]
        if sampling_ratio > 0:
            grid = xp.full(nr, sampling_ratio, dtype=np.int64)
            most = sampling_ratio
        else:
            grid = xp.ceil(lengths[d] / pooled[d]).astype(np.int64)
            most = max(int(grid.max()) if nr else 0, 1)
        counts.append(grid)
        ph = xp.arange(pooled[d], dtype=cdtype)[None, :, None]
        it = xp.arange(most, dtype=cdtype)[None, None, :]
        gs = xp.maximum(grid, 1).astype(cdtype)[:, None, None]
        pos = (starts[d][:, None, None] + ph * bin_size[:, None, None]
               + (it + 0.5) * bin_size[:, None, None] / gs)  # [R, pooled, most]
        used = xp.arange(most)[None, None, :] < grid[:, None, None]
        inside = (pos >= -1.0) & (pos <= size)
        pos = xp.maximum(pos, 0)
        low = xp.minimum(xp.floor(pos).astype(np.int64), size - 1)
        high = xp.minimum(low + 1, size - 1)
        pos = xp.where(low >= size - 1, low.astype(cdtype), pos)
        frac = pos - low
        per_dim.append((low, high, frac, used, inside))
    (ylo, yhi, ly, yused, yin), (xlo, xhi, lx, xused, xin) = per_dim
    if mode == "avg":
        # Bilinear sampling and the bin average are separable: Y = Ay @ X[b] @ Ax^T / count,
        # with dense [R, pooled, size] weight matrices; one pair of matmuls per batch image.
        ay = _bin_weights(xp, ylo, yhi, ly, yused & yin, h, cdtype)  # [R, PH, H]
        ax = _bin_weights(xp, xlo, xhi, lx, xused & xin, w, cdtype)  # [R, PW, W]
        count = xp.maximum(counts[0] * counts[1], 1).astype(cdtype).reshape(nr, 1, 1, 1)
        y = xp.zeros((nr, c, output_height, output_width), dtype=cdtype)
        rows = to_host(batch_indices).astype(np.int64).reshape(-1)
        for b in np.unique(rows):
            sel = xp.asarray(np.flatnonzero(rows == b))
            k = sel.shape[0]
            cols = xp.matmul(x[int(b)].astype(cdtype).reshape(c * h, w),
                             ax[sel].transpose(2, 0, 1).reshape(w, k * output_width))
            cols = cols.reshape(c, h, k, output_width).transpose(2, 1, 0, 3)
            yb = xp.matmul(ay[sel], cols.reshape(k, h, c * output_width))
            y[sel] = yb.reshape(k, output_height, c, output_width).transpose(0, 2, 1, 3)
        y = y / count
    elif mode == "max":
        # onnxruntime's (and the ONNX reference's) max mode: the largest weighted corner of
        # each sample (not the largest interpolated value)
        e = (slice(None), slice(None), slice(None), None, None)  # [R, PH, GH, 1, 1]
        f = (slice(None), None, None, slice(None), slice(None))  # [R, 1, 1, PW, GW]
        inside = yin[e] & xin[f]
        rows = batch_indices.astype(np.int64)
        xf = x.astype(cdtype).reshape(n, c, h * w)
        best = None
        for yi, xi, wy, wx in ((ylo, xlo, 1 - ly, 1 - lx), (ylo, xhi, 1 - ly, lx),
                               (yhi, xlo, ly, 1 - lx), (yhi, xhi, ly, lx)):
            flat = (yi[e] * w + xi[f]).reshape(nr, -1)
            v = xf[rows[:, None, None], xp.arange(c)[None, :, None], flat[:, None, :]]
            v = v * (wy[e] * wx[f] * inside).reshape(nr, 1, -1)
            best = v if best is None else xp.maximum(best, v)
        shape = (nr, c, output_height, ylo.shape[2], output_width, xlo.shape[2])
        used = xp.broadcast_to(yused[e] & xused[f], (nr,) + shape[2:])[:, None]
        best = xp.where(used, best.reshape(shape), -xp.inf).max(axis=(3, 5))
        y = xp.where(best == -np.inf, 0, best)
    else:
        raise ValueError(f"RoiAlign: unknown mode {mode!r}")
    return y.astype(x.dtype)


@kernel("RoiAlign", since=10)
def RoiAlign_10(xp, x, rois, batch_indices, *, mode="avg", output_height=1, output_width=1,
                sampling_ratio=0, spatial_scale=1.0):
    """RoiAlign-10: no input pixel shift (output_half_pixel)."""
    return (_roi_align(xp, x, rois, batch_indices,
                       coordinate_transformation_mode="output_half_pixel", mode=mode,
                       output_height=output_height, output_width=output_width,
                       sampling_ratio=sampling_ratio, spatial_scale=spatial_scale),)


@kernel("RoiAlign", since=16)
def RoiAlign(xp, x, rois, batch_indices, *, coordinate_transformation_mode="half_pixel",
             mode="avg", output_height=1, output_width=1, sampling_ratio=0, spatial_scale=1.0):
    return (_roi_align(xp, x, rois, batch_indices,
                       coordinate_transformation_mode=coordinate_transformation_mode, mode=mode,
                       output_height=output_height, output_width=output_width,
                       sampling_ratio=sampling_ratio, spatial_scale=spatial_scale),)


@kernel("MaxRoiPool", since=1)
def MaxRoiPool(xp, x, rois, *, pooled_shape, spatial_scale=1.0):
    """Max over each of pooled_shape bins of each RoI [batch, x1, y1, x2, y2] (corners rounded
    half away from zero after scaling); empty bins give 0."""
    n, c, h, w = x.shape
    nr = rois.shape[0]
    r = rois.astype(np.float64) * spatial_scale
    corner = xp.sign(r) * xp.floor(xp.abs(r) + 0.5)
    rows = rois[:, 0].astype(np.int64)
    bins = []
    for d, (size, pooled) in enumerate(((h, pooled_shape[0]), (w, pooled_shape[1]))):
        start = corner[:, 2 - d].astype(np.int64)  # y1 is column 2, x1 column 1
        length = xp.maximum(corner[:, 4 - d].astype(np.int64) - start + 1, 1)
        bin_size = length.astype(np.float64) / pooled
        p = xp.arange(pooled, dtype=np.float64)[None, :]
        lo = xp.clip(xp.floor(p * bin_size[:, None]).astype(np.int64) + start[:, None], 0, size)
        hi = xp.clip(xp.ceil((p + 1) * bin_size[:, None]).astype(np.int64) + start[:, None],
                     0, size)
        most = max(int((hi - lo).max()) if nr else 0, 1)
        idx = lo[:, :, None] + xp.arange(most)[None, None, :]  # [R, pooled, most]
        bins.append((xp.clip(idx, 0, size - 1), idx < hi[:, :, None]))
    (yi, yok), (xi, xok) = bins
    e = (slice(None), slice(None), slice(None), None, None)
    f = (slice(None), None, None, slice(None), slice(None))
    flat = (yi[e] * w + xi[f]).reshape(nr, -1)
    ok = (yok[e] & xok[f]).reshape(nr, 1, -1)
    v = x.reshape(n, c, h * w)[rows[:, None, None], xp.arange(c)[None, :, None],
                               flat[:, None, :]]
    low = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    v = xp.where(ok, v, xp.asarray(low, dtype=x.dtype))
    shape = (nr, c, pooled_shape[0], yi.shape[2], pooled_shape[1], xi.shape[2])
    best = v.reshape(shape).max(axis=(3, 5))
    empty = ~ok.reshape((nr, 1) + shape[2:]).any(axis=(3, 5))
    return (xp.where(empty, xp.zeros((), dtype=x.dtype), best),)


# -- NonMaxSuppression -------------------------------------------------------------------------
def _suppressed(box, others, center_point_box: int, threshold):
    """IoU(box, others) > threshold, with the ONNX rules for empty and flipped boxes (host)."""
    if center_point_box:
        lo = np.stack([box[..., 0] - box[..., 2] / 2, box[..., 1] - box[..., 3] / 2], -1)
        hi = np.stack([box[..., 0] + box[..., 2] / 2, box[..., 1] + box[..., 3] / 2], -1)
        olo = np.stack([others[:, 0] - others[:, 2] / 2, others[:, 1] - others[:, 3] / 2], -1)
        ohi = np.stack([others[:, 0] + others[:, 2] / 2, others[:, 1] + others[:, 3] / 2], -1)
    else:  # [y1, x1, y2, x2], any diagonal pair of corners
        lo, hi = np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])
        olo, ohi = np.minimum(others[:, :2], others[:, 2:]), np.maximum(others[:, :2],
                                                                         others[:, 2:])
    inter_lo, inter_hi = np.maximum(lo, olo), np.minimum(hi, ohi)
    overlap = (inter_hi > inter_lo).all(axis=1)
    inter = np.prod(inter_hi - inter_lo, axis=1)
    area, oarea = np.prod(hi - lo), np.prod(ohi - olo, axis=1)
    union = area + oarea - inter
    ok = overlap & (inter > 0) & (area > 0) & (oarea > 0) & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ok & (inter / np.where(ok, union, 1) > threshold)


@kernel("NonMaxSuppression", since=10)
def NonMaxSuppression(xp, boxes, scores, max_output_boxes_per_class=None, iou_threshold=None,
                      score_threshold=None, *, center_point_box=0):
    """Greedy per-class NMS (host-side: the selection is sequential and data-dependent).
    Candidates go by descending score, ties by lower box index; a candidate is dropped when its
    IoU with an already selected box is strictly above iou_threshold."""
    boxes, scores = to_host(boxes), to_host(scores)
    limit = 0
    if max_output_boxes_per_class is not None and max_output_boxes_per_class.size:
        limit = max(int(to_host(max_output_boxes_per_class).reshape(-1)[0]), 0)
    iou = (to_host(iou_threshold).reshape(-1)[0] if iou_threshold is not None
           and iou_threshold.size else np.float32(0))
    floor = (to_host(score_threshold).reshape(-1)[0] if score_threshold is not None
             and score_threshold.size else None)
    selected = []
    for b, cls in itertools.product(range(scores.shape[0]), range(scores.shape[1])):
        sc = scores[b, cls]
        cand = np.arange(sc.shape[0]) if floor is None else np.flatnonzero(sc > floor)
        order = cand[np.argsort(-sc[cand], kind="stable")]
        alive = np.ones(order.shape[0], dtype=bool)
        count, i = 0, 0
        while count < limit:
            rest = np.flatnonzero(alive[i:])
            if not rest.size:
                break
            i += int(rest[0])
            selected.append((b, cls, int(order[i])))
            count += 1
            alive[i] = False
            if i + 1 < order.shape[0]:
                alive[i + 1:] &= ~_suppressed(boxes[b, order[i]], boxes[b, order[i + 1:]],
                                              center_point_box, iou)
    return (xp.asarray(np.array(selected, dtype=np.int64).reshape(-1, 3)),)
