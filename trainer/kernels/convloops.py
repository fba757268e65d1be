"""Host loops of the Winograd convolution (kernels/nn.py's `winograd_into`), compiled by numba:
the input and output transforms of F(2x2, 3x3). Imported only where
trainer.kernels.compiled.enabled() (this module imports numba).

The kernel transform writes U = G g G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],
[0, 0, 1]], of each 3x3 kernel g (computed in float64, rounded once) as U[xi, m, c]. For one
4x4 tile d of the padded input (rows 2ty..2ty+3, columns 2tx..2tx+3) the input
transform writes V = B^T d B, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
as V[xi, c, tile] for xi = 4 i + j; the output transform reads the products M[xi, m, tile] and
writes the 2x2 outputs A^T M A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], plus the bias, where
they fall inside the output. Each is one pass over its data, adds and subtractions only.
"""

from __future__ import annotations

import numba

TILE, PLANES = 2, 16  # (outputs per tile side, products per tile)

_loop = numba.njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)


@_loop
def _g_rows(a, b, e):
    """G (a, b, e)^T: the four transformed values of a column (or row) of three."""
    return a, (a + b + e) * 0.5, (a - b + e) * 0.5, e


@_loop
def kernel_transform(w, u):
    """U [16, M, C] of the kernels w [M, C, 3, 3]."""
    chans_out, chans_in = w.shape[0], w.shape[1]
    for m in range(chans_out):
        for c in range(chans_in):
            g = w[m, c]
            # t = G g (4 x 3), column by column
            t00, t10, t20, t30 = _g_rows(float(g[0, 0]), float(g[1, 0]), float(g[2, 0]))
            t01, t11, t21, t31 = _g_rows(float(g[0, 1]), float(g[1, 1]), float(g[2, 1]))
            t02, t12, t22, t32 = _g_rows(float(g[0, 2]), float(g[1, 2]), float(g[2, 2]))
            # U = t G^T, row by row
            u[0, m, c], u[1, m, c], u[2, m, c], u[3, m, c] = _g_rows(t00, t01, t02)
            u[4, m, c], u[5, m, c], u[6, m, c], u[7, m, c] = _g_rows(t10, t11, t12)
            u[8, m, c], u[9, m, c], u[10, m, c], u[11, m, c] = _g_rows(t20, t21, t22)
            u[12, m, c], u[13, m, c], u[14, m, c], u[15, m, c] = _g_rows(t30, t31, t32)


@_loop
def input_transform(xp, v, th, tw):
    """V [16, C, N th tw] (tile (n, ty, tx) at column (n th + ty) tw + tx) of the zero-padded
    input xp [N, C, 2 th + 2, 2 tw + 2]."""
    nb, ch = xp.shape[0], xp.shape[1]
    for c in range(ch):
        v0, v1, v2, v3 = v[0, c], v[1, c], v[2, c], v[3, c]
        v4, v5, v6, v7 = v[4, c], v[5, c], v[6, c], v[7, c]
        v8, v9, v10, v11 = v[8, c], v[9, c], v[10, c], v[11, c]
        v12, v13, v14, v15 = v[12, c], v[13, c], v[14, c], v[15, c]
        for n in range(nb):
            img = xp[n, c]
            for ty in range(th):
                r0, r1, r2, r3 = img[2 * ty], img[2 * ty + 1], img[2 * ty + 2], img[2 * ty + 3]
                base = (n * th + ty) * tw
                for tx in range(tw):
                    j = 2 * tx
                    # the rows of B^T d, column by column
                    a0, a1, a2, a3 = (r0[j] - r2[j], r0[j + 1] - r2[j + 1],
                                      r0[j + 2] - r2[j + 2], r0[j + 3] - r2[j + 3])
                    b0, b1, b2, b3 = (r1[j] + r2[j], r1[j + 1] + r2[j + 1],
                                      r1[j + 2] + r2[j + 2], r1[j + 3] + r2[j + 3])
                    c0, c1, c2, c3 = (r2[j] - r1[j], r2[j + 1] - r1[j + 1],
                                      r2[j + 2] - r1[j + 2], r2[j + 3] - r1[j + 3])
                    d0, d1, d2, d3 = (r1[j] - r3[j], r1[j + 1] - r3[j + 1],
                                      r1[j + 2] - r3[j + 2], r1[j + 3] - r3[j + 3])
                    col = base + tx
                    v0[col], v1[col], v2[col], v3[col] = a0 - a2, a1 + a2, a2 - a1, a1 - a3
                    v4[col], v5[col], v6[col], v7[col] = b0 - b2, b1 + b2, b2 - b1, b1 - b3
                    v8[col], v9[col], v10[col], v11[col] = c0 - c2, c1 + c2, c2 - c1, c1 - c3
                    v12[col], v13[col], v14[col], v15[col] = d0 - d2, d1 + d2, d2 - d1, d1 - d3


@_loop
def output_transform(mt, bias, y, th, tw):
    """y [N, M, OH, OW] (OH <= 2 th, OW <= 2 tw) from the products mt [16, M, N th tw], plus
    bias [M]."""
    nb, chans, oh, ow = y.shape
    even = oh == 2 * th and ow == 2 * tw
    for n in range(nb):
        for m in range(chans):
            bm = bias[m]
            out = y[n, m]
            for ty in range(th):
                base = (n * th + ty) * tw
                if even:
                    _full_rows(mt, m, base, tw, bm, out[2 * ty], out[2 * ty + 1])
                elif 2 * ty + 1 < oh:
                    _two_rows(mt, m, base, tw, ow, bm, out[2 * ty], out[2 * ty + 1])
                else:  # (an odd OH: the last tiles' first row only)
                    _two_rows(mt, m, base, tw, ow, bm, out[2 * ty], out[2 * ty][:0])


@_loop
def _full_rows(mt, m, base, tw, bm, o0, o1):
    """`_two_rows` where both rows and all 2 tw columns are in the output: no branch in the
    loop, which then vectorizes (1.2-1.4x faster)."""
    end = base + tw
    p0, p1, p2, p3 = mt[0, m, base:end], mt[1, m, base:end], mt[2, m, base:end], mt[3, m, base:end]
    p4, p5, p6, p7 = mt[4, m, base:end], mt[5, m, base:end], mt[6, m, base:end], mt[7, m, base:end]
    p8, p9, p10, p11 = (mt[8, m, base:end], mt[9, m, base:end], mt[10, m, base:end],
                        mt[11, m, base:end])
    p12, p13, p14, p15 = (mt[12, m, base:end], mt[13, m, base:end], mt[14, m, base:end],
                          mt[15, m, base:end])
    for tx in range(tw):
        s1, s2 = p1[tx] + p5[tx] + p9[tx], p2[tx] + p6[tx] + p10[tx]
        u1, u2 = p5[tx] - p9[tx] - p13[tx], p6[tx] - p10[tx] - p14[tx]
        j = 2 * tx
        o0[j] = p0[tx] + p4[tx] + p8[tx] + s1 + s2 + bm
        o0[j + 1] = s1 - s2 - (p3[tx] + p7[tx] + p11[tx]) + bm
        o1[j] = p4[tx] - p8[tx] - p12[tx] + u1 + u2 + bm
        o1[j + 1] = u1 - u2 - (p7[tx] - p11[tx] - p15[tx]) + bm


@_loop
def _two_rows(mt, m, base, tw, ow, bm, o0, o1):
    """The outputs of the tiles base..base + tw - 1 into rows o0 and o1 (o1 empty: o0 only),
    columns below ow."""
    both = o1.size > 0
    for tx in range(tw):
        col = base + tx
        m0, m1, m2, m3 = mt[0, m, col], mt[1, m, col], mt[2, m, col], mt[3, m, col]
        m4, m5, m6, m7 = mt[4, m, col], mt[5, m, col], mt[6, m, col], mt[7, m, col]
        m8, m9, m10, m11 = mt[8, m, col], mt[9, m, col], mt[10, m, col], mt[11, m, col]
        m12, m13, m14, m15 = mt[12, m, col], mt[13, m, col], mt[14, m, col], mt[15, m, col]
        s0, s1, s2, s3 = m0 + m4 + m8, m1 + m5 + m9, m2 + m6 + m10, m3 + m7 + m11
        j = 2 * tx
        o0[j] = s0 + s1 + s2 + bm
        if j + 1 < ow:
            o0[j + 1] = s1 - s2 - s3 + bm
        if both:
            u0, u1, u2, u3 = m4 - m8 - m12, m5 - m9 - m13, m6 - m10 - m14, m7 - m11 - m15
            o1[j] = u0 + u1 + u2 + bm
            if j + 1 < ow:
                o1[j + 1] = u1 - u2 - u3 + bm


@_loop
def gradient_transform(dy, w_out, n0, th, tw):
    """W [16, M, nb th tw] = A g A^T of each 2x2 tile g of dy[n0:n0 + nb] [N, M, OH, OW]
    (zeros past OH, OW), A = [[1, 0], [1, 1], [1, -1], [0, -1]]: the output gradient's side of
    the weight gradient, which pairs it with the input transform's V."""
    chans, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    nb = w_out.shape[2] // (th * tw)
    zero = dy.dtype.type(0)
    for m in range(chans):
        for n in range(nb):
            g = dy[n0 + n, m]
            for ty in range(th):
                base = (n * th + ty) * tw
                y0, y1 = 2 * ty, 2 * ty + 1
                for tx in range(tw):
                    x0, x1 = 2 * tx, 2 * tx + 1
                    g00 = g[y0, x0]
                    g01 = g[y0, x1] if x1 < ow else zero
                    g10 = g[y1, x0] if y1 < oh else zero
                    g11 = g[y1, x1] if y1 < oh and x1 < ow else zero
                    # A g: rows g0, g0 + g1, g0 - g1, -g1 (of the two rows of g)
                    a0, a1 = g00, g01
                    b0, b1 = g00 + g10, g01 + g11
                    c0, c1 = g00 - g10, g01 - g11
                    d0, d1 = -g10, -g11
                    col = base + tx
                    # (A g) A^T: each row (p, q) -> p, p + q, p - q, -q
                    w_out[0, m, col], w_out[1, m, col] = a0, a0 + a1
                    w_out[2, m, col], w_out[3, m, col] = a0 - a1, -a1
                    w_out[4, m, col], w_out[5, m, col] = b0, b0 + b1
                    w_out[6, m, col], w_out[7, m, col] = b0 - b1, -b1
                    w_out[8, m, col], w_out[9, m, col] = c0, c0 + c1
                    w_out[10, m, col], w_out[11, m, col] = c0 - c1, -c1
                    w_out[12, m, col], w_out[13, m, col] = d0, d0 + d1
                    w_out[14, m, col], w_out[15, m, col] = d0 - d1, -d1


@_loop
def _gt_rows(s0, s1, s2, s3):
    """G^T (s0, s1, s2, s3)^T: three values from four."""
    return s0 + 0.5 * s1 + 0.5 * s2, 0.5 * s1 - 0.5 * s2, 0.5 * s1 + 0.5 * s2 + s3


@_loop
def kernel_gradient(s, dw):
    """dw [M, C, 3, 3] = G^T S G of each S [16, M, C] (float64 sums of the 16 products)."""
    chans_out, chans_in = dw.shape[0], dw.shape[1]
    for m in range(chans_out):
        for c in range(chans_in):
            # t = G^T S (3 x 4), column by column
            t00, t10, t20 = _gt_rows(s[0, m, c], s[4, m, c], s[8, m, c], s[12, m, c])
            t01, t11, t21 = _gt_rows(s[1, m, c], s[5, m, c], s[9, m, c], s[13, m, c])
            t02, t12, t22 = _gt_rows(s[2, m, c], s[6, m, c], s[10, m, c], s[14, m, c])
            t03, t13, t23 = _gt_rows(s[3, m, c], s[7, m, c], s[11, m, c], s[15, m, c])
            # dw = t G, row by row
            dw[m, c, 0, 0], dw[m, c, 0, 1], dw[m, c, 0, 2] = _gt_rows(t00, t01, t02, t03)
            dw[m, c, 1, 0], dw[m, c, 1, 1], dw[m, c, 1, 2] = _gt_rows(t10, t11, t12, t13)
            dw[m, c, 2, 0], dw[m, c, 2, 1], dw[m, c, 2, 2] = _gt_rows(t20, t21, t22, t23)
