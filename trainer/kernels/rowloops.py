"""Host loops of the normalizations' fast paths (kernels/rowfuse.py), compiled by numba:
LayerNormalization forward and backward over rows, BatchNormalization's training form forward
and backward over channels. Each reads its inputs once or twice while a row is in cache and
writes only its results, where the NumPy code makes 7-16 passes over the whole tensor.

Rounding: the statistics (means, variances, the backward's sums) are sums in float64, added in
any order (numba's `reassoc` flag on the summing helpers only, so they vectorize), then
rounded once to the input's dtype: at least as accurate as the NumPy path's float32 sums, but
not its bits. Everything computed element by element from those statistics (y, xhat, dX) is
the NumPy path's expression in the same order and precision (no other fast-math flag), so with
equal statistics the results are bit for bit the NumPy kernels' (tests/test_compiled.py checks
both). The softmax cross entropy of [N, C] scores (every classifier's loss) takes its
exponentials, their sums and the logarithm in float64 the same way, and its select (ReLU's
gradient, Where(c, x, 0)) is exact, as is the weighted, smoothed cross entropy's scale-and-add
(the NumPy expression's roundings). Imported only where trainer.kernels.compiled.enabled()
(this module imports numba).
"""

from __future__ import annotations

import numba
import numpy as np

_FLAGS = {"cache": True, "nogil": True, "error_model": "numpy"}
_loop = numba.njit(**_FLAGS)
_sums = numba.njit(fastmath={"reassoc"}, **_FLAGS)  # (reductions only: see the docstring)


@_sums
def _total(v):
    a = 0.0
    for j in range(v.size):
        a += v[j]
    return a


@_sums
def _squares(v, m):
    """The float64 sum of (v - m)^2, each difference and square rounded in v's dtype."""
    a = 0.0
    for j in range(v.size):
        d = v[j] - m
        a += d * d
    return a


@_sums
def _dot(u, v):
    a = 0.0
    for j in range(u.size):
        a += u[j] * v[j]
    return a


@_sums
def _ln_dots(dy, s, x, m, iv):
    """(sum of g, sum of g * xhat) over a row, g = dy * s, xhat = (x - m) * iv."""
    a = 0.0
    b = 0.0
    for j in range(dy.size):
        g = dy[j] * s[j]
        a += g
        b += g * ((x[j] - m) * iv)
    return a, b


@_loop
def layer_norm(x, s, b, c, y, mean, inv):
    """y, mean, inv of LayerNormalization over the rows of x [R, D] (s, b: [D]; b empty for no
    bias; c = [1, epsilon] in x's dtype): kernels/norm.py's _standardize and LayerNormalization."""
    rows, d = x.shape
    one, eps = c[0], c[1]
    bias = b.size > 0
    for r in range(rows):
        xr = x[r]
        mean[r] = _total(xr) / d
        m = mean[r]
        inv[r] = _squares(xr, m) / d  # (the variance, rounded, then its inverse square root)
        iv = one / np.sqrt(inv[r] + eps)
        inv[r] = iv
        yr = y[r]
        if bias:
            for j in range(d):
                yr[j] = (xr[j] - m) * iv * s[j] + b[j]
        else:
            for j in range(d):
                yr[j] = (xr[j] - m) * iv * s[j]


@_loop
def layer_norm_backward(dy, x, s, c, dx, ds, db, want_dx):
    """dX (into dx where want_dx) of LayerNormalization over the rows of x [R, D], and the
    float64 column sums ds += dy * xhat, db += dy: kernels/fused.py's layer_norm_backward."""
    rows, d = x.shape
    one, eps = c[0], c[1]
    st = np.empty(4, x.dtype)  # (the statistics, rounded to x's dtype)
    for r in range(rows):
        xr = x[r]
        gr = dy[r]
        st[0] = _total(xr) / d
        m = st[0]
        st[1] = _squares(xr, m) / d
        iv = one / np.sqrt(st[1] + eps)
        for j in range(d):
            ds[j] += gr[j] * ((xr[j] - m) * iv)
            db[j] += gr[j]
        if want_dx:
            mg, mgx = _ln_dots(gr, s, xr, m, iv)
            st[2] = mg / d
            st[3] = mgx / d
            a, k = st[2], st[3]
            out = dx[r]
            for j in range(d):
                out[j] = ((gr[j] * s[j] - a) - ((xr[j] - m) * iv) * k) * iv


@_loop
def bn_train(x, s, b, eps, xhat, y, stats):
    """BatchNormalization's training values over x [N, C, L] per channel (s, b: [C]; eps: [1]
    in x's dtype): stats [4, C] = mean, var, var + eps, sd; xhat = (x - mean) / sd,
    y = xhat * s + b: kernels/fused.py's bn_train_forward."""
    n, ch, length = x.shape
    count = n * length
    for c in range(ch):
        a = 0.0
        for i in range(n):
            a += _total(x[i, c])
        stats[0, c] = a / count
        m = stats[0, c]
        a = 0.0
        for i in range(n):
            a += _squares(x[i, c], m)
        stats[1, c] = a / count
        stats[2, c] = stats[1, c] + eps[0]
        stats[3, c] = np.sqrt(stats[2, c])
        sd, sc, bc = stats[3, c], s[c], b[c]
        for i in range(n):
            xr, hr, yr = x[i, c], xhat[i, c], y[i, c]
            for j in range(length):
                h = (xr[j] - m) / sd
                hr[j] = h
                yr[j] = h * sc + bc


@_loop
def bn_train_backward(dy, xhat, k, inv, dx, sums, want_dx):
    """sums [2, C] = dScale, dBias (sums of dy * xhat and of dy per channel of [N, C, L]) and,
    where want_dx, dx = ((dy - xhat * (dScale * inv)) - dBias * inv) * k (k = scale / sd per
    channel, inv = [1 / count]): kernels/fused.py's bn_train_backward."""
    n, ch, length = dy.shape
    for c in range(ch):
        a = 0.0
        t = 0.0
        for i in range(n):
            a += _dot(dy[i, c], xhat[i, c])
            t += _total(dy[i, c])
        sums[0, c] = a
        sums[1, c] = t
        if want_dx:
            p = sums[0, c] * inv[0]
            q = sums[1, c] * inv[0]
            kc = k[c]
            for i in range(n):
                g, h, o = dy[i, c], xhat[i, c], dx[i, c]
                for j in range(length):
                    o[j] = ((g[j] - h[j] * p) - q) * kc


@_loop
def _labels_ok(labels, c):
    """Whether every label lies in [-c, c) (NumPy's 2-D lookup raises IndexError otherwise)."""
    for i in range(labels.size):
        if labels[i] < -c or labels[i] >= c:
            return False
    return True


@_loop
def softmax_cross_entropy(scores, labels, log_prob):
    """Mean cross entropy over rows of [N, C] scores (labels in [-C, C), checked first:
    False, nothing written, otherwise): log_prob = scores - max - log(sum(exp(scores - max)))
    per row, the exponentials, their sum and the logarithm in float64, rounded once; returns
    (ok, the float64 sum of -log_prob at the labels). A NaN in a row propagates as NumPy's
    maximum does."""
    n, c = scores.shape
    if not _labels_ok(labels, c):
        return False, 0.0
    total = 0.0
    for i in range(n):
        m = scores[i, 0]
        for j in range(1, c):
            v = scores[i, j]
            if v > m or v != v:
                m = v
        acc = 0.0
        for j in range(c):
            d = scores[i, j] - m
            log_prob[i, j] = d
            acc += np.exp(np.float64(d))
        s = np.log(acc)
        for j in range(c):
            log_prob[i, j] = np.float64(log_prob[i, j]) - s
        k = labels[i]
        total -= log_prob[i, k + c if k < 0 else k]
    return True, total


@_loop
def softmax_cross_entropy_backward(log_prob, labels, c, dx):
    """dX of the mean cross entropy: exp(log_prob) (in float64, rounded once) times c[0], less
    c[0] at each row's label (in [-C, C), checked first: False, nothing written, otherwise),
    each product and difference in dx's dtype as the NumPy path takes them."""
    n, k = log_prob.shape
    if not _labels_ok(labels, k):
        return False
    w = c[0]
    for i in range(n):
        for j in range(k):
            dx[i, j] = np.exp(np.float64(log_prob[i, j]))
            dx[i, j] = dx[i, j] * w
        t = labels[i]
        t = t + k if t < 0 else t
        dx[i, t] = dx[i, t] - w
    return True


@_loop
def scale_add_outer(x, t, b, q):
    """x[i, j] = x[i, j] * t[i] + b[i] * q[j] in place over [N, C]: NumPy's x * t[:, None] +
    b[:, None] * q[None, :] (each product and the sum in x's dtype), one pass and no [N, C]
    temporary (the weighted, smoothed cross entropy's gradient)."""
    n, c = x.shape
    for i in range(n):
        ti, bi = t[i], b[i]
        row = x[i]
        for j in range(c):
            row[j] = row[j] * ti + bi * q[j]


@_loop
def select(cond, x, keep, out):
    """out = x where cond == keep, else +0.0: NumPy's where(cond, x, 0) (keep True) or
    where(cond, 0, x) (keep False), one pass over flat arrays of one size."""
    for i in range(out.size):
        out[i] = x[i] if cond[i] == keep else 0


@_loop
def positive_select(v, x, out):
    """out = x where v > 0, else +0.0 (NaN in v: 0), over flat arrays of one size: NumPy's
    where(v > 0, x, 0), ReLU's gradient."""
    for i in range(out.size):
        out[i] = x[i] if v[i] > 0 else 0
