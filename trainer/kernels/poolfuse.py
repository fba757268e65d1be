"""Device fast paths of pooling: MaxPool (Y, and its Indices), MaxPool's backward (the planner's
MaxPoolGrad) and AveragePool, each as ONE generated `cupy.ElementwiseKernel` whose thread loops
over its window's taps in C, instead of a few full-size xp operations per kernel tap. Kernel
launches of one call, counted through the tests' CuPy stand-in (tests/test_poolfuse.py checks
the table):

| operation (float32 [2, 3, 9, 9], a second call) | xp code | here |
|---|---|---|
| MaxPool 3x3, strides 2, pads 1: Y and Indices | 70: 8 per tap, then the Indices' gather | 1 |
| MaxPool 2x2, strides 2: Y only | 22 | 1 |
| MaxPool 5x5 (over 16 taps: argmax, take_along_axis, Indices) | 4 | 1 |
| AveragePool 3x3, pads 1 | 14: pad, a sum per tap, divide, casts | 1 |
| MaxPool's backward (MaxPoolGrad) | 2: bincount (float64 atomics), cast | 1: no atomics |

MaxPool: a thread per output element keeps the first maximal tap (a later tap wins only when
strictly greater; the first NaN tap wins and stays, as argmax), padded taps read as -inf, as
the xp code's padding; the index is the tap's flat index into x (padding excluded; column-major
spatial axes with storage_order=1), the corner + offset of kernels/nn.py's _maxpool_corner.
MaxPool's backward: a thread per input element adds, in float64 in the order of the outputs,
dY of each window that covers the element and whose Indices name it, and rounds once: what the
xp code's bincount computes (its float64 sums, without atomics: deterministic). AveragePool: a
thread per output element adds its taps in tap order in x's dtype (padding as zeros) and divides
by the count of its window (count_include_pad 0 or 1), as the xp code does, so it rounds alike
(up to more than 16 taps, where the xp code sums the window view at once).

One kernel source per number of spatial axes (any), the geometry passed as int64 scalars.
float32 and float64 only (other dtypes keep the xp code); where the array module has no kernel
API (NumPy, the tests' plain stand-in) the callers run their xp code; where a kernel fails to
build or run, they do too, after one RuntimeWarning that names it.

(One difference: a MaxPool window whose real taps are all -inf and whose first tap is padding
has, as in the xp code, an Indices entry pointing at no tap of the window; the backward's gather
adds its dY nowhere, where bincount adds it at that index.)"""

from __future__ import annotations

import math

import numpy as np

from trainer.kernels.generated import GeneratedKernel

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
KINDS = ("maxpool", "maxpool_y", "maxpool_grad", "avgpool")
# (kind, number of spatial axes) -> its kernel (named by kernel_name), made on first use
KERNELS: dict[tuple[str, int], GeneratedKernel] = {}


def kernel_name(kind: str, nd: int) -> str:
    return f"onnx_trainer_{kind}_{nd}d"


def _params(nd: int, names: str) -> str:
    """int64 scalar parameters: each letter group of `names` (space-separated) per axis."""
    return ", ".join(f"int64 {n}{d}" for d in range(nd) for n in names.split())


def _split(nd: int, sizes: str, out: str) -> list[str]:
    """Statements that split the loop index `i` into `{out}{d}` along the axes of sizes
    `{sizes}{d}` (the last fastest), leaving the (n, c) row in `nc_`."""
    lines = ["ptrdiff_t nc_ = i;"]
    for d in reversed(range(nd)):
        lines.append(f"const ptrdiff_t {out}{d} = nc_ % {sizes}{d}; nc_ /= {sizes}{d};")
    return lines


def _prod(nd: int, sizes: str) -> str:
    return " * ".join(f"(ptrdiff_t){sizes}{d}" for d in range(nd))


def _maxpool_source(nd: int, indices: bool) -> str:
    """Thread per output element: taps in row-major order, the first maximal (or NaN) wins."""
    body = _split(nd, "m", "o")
    body.append(f"const ptrdiff_t base_ = nc_ * ({_prod(nd, 'n')});")
    body += ["T best_ = 0;", "bool first_ = true;"] + (["ptrdiff_t arg_ = 0;"] if indices else [])
    indent = ""
    for d in range(nd):
        inside = f"in{d - 1}_ && " if d else ""
        off = f"off{d - 1}_ * n{d} + h{d}" if d else "(ptrdiff_t)h0"
        at = f"at{d - 1}_ + h{d} * st{d}" if d else "h0 * st0"
        body += [f"{indent}for (ptrdiff_t t{d} = 0; t{d} < k{d}; t{d}++) {{",
                 f"{indent}  const ptrdiff_t h{d} = o{d} * s{d} - p{d} + t{d} * dl{d};",
                 f"{indent}  const bool in{d}_ = {inside}h{d} >= 0 && h{d} < n{d};",
                 f"{indent}  const ptrdiff_t off{d}_ = {off};"]
        if indices:
            body.append(f"{indent}  const ptrdiff_t at{d}_ = {at};")
        indent += "  "
    last = nd - 1
    body += [f"{indent}const T v_ = in{last}_ ? x[base_ + off{last}_] : -(T)CUDART_INF;",
             f"{indent}if (first_ || v_ > best_ || (isnan(v_) && !isnan(best_))) {{",
             f"{indent}  best_ = v_;"]
    if indices:
        body.append(f"{indent}  arg_ = at{last}_;")
    body += [f"{indent}  first_ = false;", f"{indent}}}"]
    for d in reversed(range(nd)):
        body.append("  " * d + "}")
    body.append("y = best_;")
    if indices:
        body.append("ind = base_ + arg_;")
    return "\n".join(body)


def _maxpool_grad_source(nd: int) -> str:
    """Thread per input element: the windows over it in increasing output order (per axis the
    taps backwards), dY added in double where the window's index is this element."""
    body = _split(nd, "n", "h")
    me = " + ".join(f"h{d} * st{d}" for d in range(nd))
    body += [f"const long long me_ = nc_ * ({_prod(nd, 'n')}) + {me};",
             f"const ptrdiff_t obase_ = nc_ * ({_prod(nd, 'm')});",
             "double acc_ = 0;"]
    indent = ""
    for d in range(nd):
        flat = f"of{d - 1}_ * m{d} + o{d}" if d else "o0"
        body += [f"{indent}for (ptrdiff_t t{d} = k{d} - 1; t{d} >= 0; t{d}--) {{",
                 f"{indent}  const ptrdiff_t q{d} = h{d} + p{d} - t{d} * dl{d};",
                 f"{indent}  if (q{d} < 0 || q{d} % s{d} != 0 || q{d} / s{d} >= m{d}) continue;",
                 f"{indent}  const ptrdiff_t o{d} = q{d} / s{d};",
                 f"{indent}  const ptrdiff_t of{d}_ = {flat};"]
        indent += "  "
    last = nd - 1
    body += [f"{indent}if (ind[obase_ + of{last}_] == me_) acc_ += (double)dy[obase_ + of{last}_];"]
    for d in reversed(range(nd)):
        body.append("  " * d + "}")
    body.append("dx = (T)acc_;")
    return "\n".join(body)


def _avgpool_source(nd: int) -> str:
    """Thread per output element: taps added in row-major order in T, padding as zeros, divided
    by the number of taps in [lo, hi) on every axis."""
    body = _split(nd, "m", "o")
    body += [f"const ptrdiff_t base_ = nc_ * ({_prod(nd, 'n')});",
             "T sum_ = 0;", "long long count_ = 0;", "bool first_ = true;"]
    indent = ""
    for d in range(nd):
        inside, counted = (f"in{d - 1}_ && ", f"c{d - 1}_ && ") if d else ("", "")
        off = f"off{d - 1}_ * n{d} + h{d}" if d else "(ptrdiff_t)h0"
        body += [f"{indent}for (ptrdiff_t t{d} = 0; t{d} < k{d}; t{d}++) {{",
                 f"{indent}  const ptrdiff_t h{d} = o{d} * s{d} - p{d} + t{d} * dl{d};",
                 f"{indent}  const bool in{d}_ = {inside}h{d} >= 0 && h{d} < n{d};",
                 f"{indent}  const bool c{d}_ = {counted}h{d} >= lo{d} && h{d} < hi{d};",
                 f"{indent}  const ptrdiff_t off{d}_ = {off};"]
        indent += "  "
    last = nd - 1
    body += [f"{indent}const T v_ = in{last}_ ? x[base_ + off{last}_] : (T)0;",
             f"{indent}if (first_) {{ sum_ = v_; first_ = false; }} else {{ sum_ += v_; }}",
             f"{indent}count_ += c{last}_ ? 1 : 0;"]
    for d in reversed(range(nd)):
        body.append("  " * d + "}")
    body.append("y = sum_ / (T)count_;")
    return "\n".join(body)


def _get(kind: str, nd: int) -> GeneratedKernel:
    k = KERNELS.get((kind, nd))
    if k is None:
        name = kernel_name(kind, nd)
        if kind == "maxpool":
            spec = ("raw T x, " + _params(nd, "n m k s dl p st"), "T y, int64 ind",
                    _maxpool_source(nd, True), name)
        elif kind == "maxpool_y":
            spec = ("raw T x, " + _params(nd, "n m k s dl p"), "T y",
                    _maxpool_source(nd, False), name)
        elif kind == "maxpool_grad":
            spec = ("raw int64 ind, raw T dy, " + _params(nd, "n m k s dl p st"), "T dx",
                    _maxpool_grad_source(nd), name)
        else:
            spec = ("raw T x, " + _params(nd, "n m k s dl p lo hi"), "T y",
                    _avgpool_source(nd), name)
        k = KERNELS[(kind, nd)] = GeneratedKernel(
            "ElementwiseKernel", spec, f"generated kernel {name}",
            "the xp operations it replaces run instead")
    return k


def _steps(spatial, storage_order) -> list[int]:
    """The flat index's stride of each spatial axis (storage_order=1: the first axis fastest)."""
    nd = len(spatial)
    order = list(reversed(range(nd))) if storage_order else list(range(nd))
    step, acc = [0] * nd, 1
    for i in reversed(order):
        step[i] = acc
        acc *= int(spatial[i])
    return step


def _available(xp, kind: str, nd: int) -> bool:
    """Whether the kernel is there to run (checked before its outputs are allocated)."""
    return _get(kind, nd).get(xp) is not None


def _launch(xp, kind: str, nd: int, args: list, outs: list):
    """The kernel run over `outs`: True, or False where it is missing or failed (it warns once
    then)."""
    gk = _get(kind, nd)
    k = gk.get(xp)
    if k is None:
        return False
    try:
        k(*args, *outs)
    except Exception as exc:  # noqa: BLE001 - the caller's xp code runs instead
        gk.failed(exc)
        return False
    return True


def _applies(xp, x) -> bool:
    return xp is not np and x.dtype in _FLOATS and x.ndim >= 3


def maxpool(xp, x, kernel_shape, strides, dilations, pads, out, storage_order, indices: bool):
    """MaxPool's (Y,) or (Y, Indices) for the explicit geometry of kernels/nn.py's _geometry, or
    None where the fast path does not apply."""
    if not _applies(xp, x) or not _available(xp, "maxpool" if indices else "maxpool_y",
                                                x.ndim - 2):
        return None
    nd = x.ndim - 2
    st = _steps(x.shape[2:], storage_order)
    geo = [int(v) for d in range(nd) for v in (
        x.shape[2 + d], out[d], kernel_shape[d], strides[d], dilations[d], pads[d])
        + ((st[d],) if indices else ())]
    shape = tuple(x.shape[:2]) + tuple(int(o) for o in out)
    y = xp.empty(shape, x.dtype)
    outs = [y, xp.empty(shape, np.int64)] if indices else [y]
    if not _launch(xp, "maxpool" if indices else "maxpool_y", nd,
                   [xp.ascontiguousarray(x), *geo], outs):
        return None
    return tuple(outs)


def maxpool_backward(xp, indices, dy, shape, kernel_shape, strides, dilations, pads,
                     storage_order=0):
    """dX of MaxPool (x of `shape`) from its Indices and dY as a gather, or None where the
    fast path does not apply (no geometry: the planner's node predates it)."""
    if kernel_shape is None or xp is np or dy.dtype not in _FLOATS or \
            indices.dtype != np.int64 or len(shape) < 3 or indices.shape != dy.shape:
        return None
    nd = len(shape) - 2
    out = dy.shape[2:]
    if len(out) != nd or tuple(dy.shape[:2]) != tuple(shape[:2]) or \
            not _available(xp, "maxpool_grad", nd):
        return None
    st = _steps(shape[2:], storage_order)
    geo = [int(v) for d in range(nd) for v in (
        shape[2 + d], out[d], kernel_shape[d], strides[d], dilations[d], pads[d], st[d])]
    dx = xp.empty(tuple(int(s) for s in shape), dy.dtype)
    if not _launch(xp, "maxpool_grad", nd, [xp.ascontiguousarray(indices),
                                            xp.ascontiguousarray(dy), *geo], [dx]):
        return None
    return dx


def averagepool(xp, x, kernel_shape, strides, dilations, pads, out, count_include_pad):
    """AveragePool's Y for the explicit geometry of kernels/nn.py's _geometry, or None where
    the fast path does not apply."""
    if not _applies(xp, x) or not _available(xp, "avgpool", x.ndim - 2):
        return None
    nd = x.ndim - 2
    geo = []
    for d in range(nd):
        n = int(x.shape[2 + d])
        lo, hi = (-int(pads[d]), n + int(pads[d + nd])) if count_include_pad else (0, n)
        geo += [n, int(out[d]), int(kernel_shape[d]), int(strides[d]), int(dilations[d]),
                int(pads[d]), lo, hi]
    y = xp.empty(tuple(x.shape[:2]) + tuple(int(o) for o in out), x.dtype)
    if not _launch(xp, "avgpool", nd, [xp.ascontiguousarray(x), *geo], [y]):
        return None
    return y


def geometry_attrs(x_shape, attrs) -> dict | None:
    """The explicit geometry maxpool_backward needs, from a MaxPool node's attributes and its
    input's shape (kernels/nn.py's conv_pads), or None where the shape is not known."""
    from trainer.kernels.nn import conv_pads

    if x_shape is None or len(x_shape) < 3 or not all(isinstance(d, int | np.integer)
                                                      for d in x_shape):
        return None
    nd = len(x_shape) - 2
    kernel = [int(v) for v in attrs["kernel_shape"]]
    strides = [int(v) for v in (attrs.get("strides") or [1] * nd)]
    dilations = [int(v) for v in (attrs.get("dilations") or [1] * nd)]
    if len(kernel) != nd or len(strides) != nd or len(dilations) != nd or \
            math.prod(kernel) < 1:
        return None
    pads, _ = conv_pads(list(x_shape[2:]), kernel, strides, dilations, attrs.get("pads"),
                        attrs.get("auto_pad", "NOTSET"), attrs.get("ceil_mode", 0))
    return {"kernel_shape": kernel, "strides": strides, "dilations": dilations,
            "pads": [int(p) for p in pads], "storage_order": int(attrs.get("storage_order", 0))}
