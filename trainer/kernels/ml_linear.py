"""ai.onnx.ml linear models, SVMs and feature plumbing (Scaler, Normalizer, Imputer,
FeatureVectorizer), following onnxruntime where the spec leaves room (binary special cases,
single-score transforms). String class labels are host-only (object arrays)."""

from __future__ import annotations

import math

import numpy as np

from trainer.backend import to_host
from trainer.kernels import cached_constant, kernel
from trainer.kernels.ml import _erfinv

ML = "ai.onnx.ml"
# onnxruntime treats |score| <= 1e-7 as "no score" in SOFTMAX_ZERO
ZERO_SCORE = float(np.float32(1e-7))
# Row chunk of the RBF distances: at most this many [rows, vectors, features] elements at once
_RBF_CHUNK = 1 << 22


def compute_dtype(dtype) -> np.dtype:
    """Float64 inputs are computed in float64, every other input type in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _const(xp, values, dtype, shape=(-1,)):
    """An attribute list as a device array of `dtype` (made once per distinct content)."""
    values = tuple(values)
    key = ("ml_linear", np.dtype(dtype).str, tuple(shape), values)
    return cached_constant(xp, key, lambda: np.asarray(values, dtype).reshape(shape))


def _rows(x, op: str):
    """A [N, F] view: a 1-D input is one row."""
    if x.ndim == 1:
        return x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"{op}: expects a [N, F] or [F] input, got shape {tuple(x.shape)}")
    return x


def _logistic(xp, s):
    e = xp.exp(-xp.abs(s))
    return xp.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _probit(xp, p):
    # onnxruntime's probit: sqrt(2) * erfinv(2p - 1) with Winitzki's erfinv approximation
    with np.errstate(divide="ignore", invalid="ignore"):
        return math.sqrt(2.0) * _erfinv(xp, 2.0 * p - 1.0)


def post_transform_scores(xp, s, kind: str):
    """onnxruntime's score transforms over the rows of [N, C] scores. A single score column is
    only PROBIT-transformed: its LOGISTIC and SOFTMAX variants leave it as is."""
    if kind == "NONE":
        return s
    if kind == "PROBIT":
        return _probit(xp, s)
    if kind not in ("LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"):
        raise ValueError(f"unknown post_transform '{kind}'")
    if s.shape[1] == 1:
        return s
    if kind == "LOGISTIC":
        return _logistic(xp, s)
    top = s.max(axis=1, keepdims=True)
    if kind == "SOFTMAX":
        e = xp.exp(s - top)
        return e / e.sum(axis=1, keepdims=True)
    # SOFTMAX_ZERO: scores of (about) zero keep a value of about zero and stay out of the sum;
    # a row of zeros gives NaN, as in onnxruntime.
    nz = xp.abs(s) > ZERO_SCORE
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = xp.where(nz, xp.exp(s - top), s * xp.exp(-top))
        return e / xp.where(nz, e, 0).sum(axis=1, keepdims=True)


def _labels(xp, labels: list | None, index):
    """labels[index] (int64 on xp; strings on the host); without labels, the class index."""
    if labels is None:
        return index.astype(np.int64)
    if isinstance(labels[0], str):
        return np.array(labels, dtype=object)[to_host(index)]
    return _const(xp, labels, np.int64)[index]


def _class_labels(op: str, ints, strings) -> list | None:
    if ints and strings:
        raise ValueError(f"{op}: give classlabels_ints or classlabels_strings, not both")
    return list(strings) if strings else list(ints) if ints else None


@kernel("Scaler", since=1, domain=ML)
def Scaler(xp, x, *, offset=None, scale=None):
    """(x - offset) * scale; offset and scale have 1 or F values (F: dim 1, or dim 0 of a 1-D
    input), the F values repeating along the flat data as in onnxruntime."""
    if x.ndim == 0:
        raise ValueError("Scaler: the input needs at least one dimension")
    ct = compute_dtype(x.dtype)
    f = x.shape[0] if x.ndim == 1 else x.shape[1]
    offset, scale = list(offset or [0.0]), list(scale or [1.0])
    for name, v in (("offset", offset), ("scale", scale)):
        if len(v) not in (1, f):
            raise ValueError(f"Scaler: {name} has {len(v)} values; the input has {f} features")
    y = x.astype(ct, copy=False)
    per_feature = max(len(offset), len(scale)) > 1 and x.ndim > 2
    if per_feature:
        y = y.reshape(-1, f)
    y = (y - _const(xp, offset, ct)) * _const(xp, scale, ct)
    return (y.reshape(x.shape).astype(np.float32),)


@kernel("Normalizer", since=1, domain=ML)
def Normalizer(xp, x, *, norm="MAX"):
    """Each row divided by its (signed) max, L1 or L2 norm; a row whose divisor is 0 is copied."""
    ct = compute_dtype(x.dtype)
    y = _rows(x, "Normalizer").astype(ct, copy=False)
    if norm == "MAX":
        d = y.max(axis=1, keepdims=True)
    elif norm == "L1":
        d = xp.abs(y).sum(axis=1, keepdims=True)
    elif norm == "L2":
        d = xp.sqrt((y * y).sum(axis=1, keepdims=True))
    else:
        raise ValueError(f"Normalizer: norm must be MAX, L1 or L2, got '{norm}'")
    return ((y / xp.where(d == 0, 1, d)).reshape(x.shape).astype(np.float32),)


def imputer_values(float_input: bool, floats, ints, replaced_float, replaced_int):
    """(imputed values, replaced value): the float pair for float inputs, the int64 pair for
    integer inputs, or whichever pair the node has."""
    floats, ints = list(floats or []), list(ints or [])
    if floats and (float_input or not ints):
        return floats, float(replaced_float)
    if ints:
        return ints, int(replaced_int)
    raise ValueError("Imputer: imputed_value_floats or imputed_value_int64s is required")


@kernel("Imputer", since=1, domain=ML)
def Imputer(xp, x, *, imputed_value_floats=None, imputed_value_int64s=None,
            replaced_value_float=0.0, replaced_value_int64=0):
    """Elements equal to the replaced value (NaN matches NaN) take the imputed value: one per
    feature (dim 1, or dim 0 of a 1-D input) when there are F of them, else the first."""
    if x.ndim == 0:
        raise ValueError("Imputer: the input needs at least one dimension")
    values, replaced = imputer_values(x.dtype.kind == "f", imputed_value_floats,
                                      imputed_value_int64s, replaced_value_float,
                                      replaced_value_int64)
    f = x.shape[0] if x.ndim == 1 else x.shape[1]
    rows = x.reshape(-1, f) if len(values) == f else x
    if isinstance(replaced, float) and math.isnan(replaced):
        hit = xp.isnan(rows) if x.dtype.kind == "f" else xp.zeros(rows.shape, dtype=bool)
    else:
        hit = rows == replaced
    fill = _const(xp, values if len(values) == f else values[:1], x.dtype)
    return (xp.where(hit, fill, rows).reshape(x.shape),)


@kernel("FeatureVectorizer", since=1, domain=ML)
def FeatureVectorizer(xp, *xs, inputdimensions=None):
    """The inputs as [N, -1] rows (a 1-D input is one row), each cut or zero-padded to its
    inputdimensions width, concatenated along axis 1 (float32)."""
    dims = list(inputdimensions or [])
    if len(dims) != len(xs):
        raise ValueError(f"FeatureVectorizer: {len(xs)} inputs but {len(dims)} inputdimensions")
    rows = [x.reshape(1, -1) if x.ndim <= 1 else x.reshape(x.shape[0], -1) for x in xs]
    n = {r.shape[0] for r in rows}
    if len(n) > 1:
        raise ValueError(f"FeatureVectorizer: inputs have different batch sizes {sorted(n)}")
    n = n.pop() if n else 0
    parts = []
    for r, d in zip(rows, dims, strict=True):
        part = r[:, :d].astype(np.float32)
        if part.shape[1] < d:
            part = xp.concatenate(
                [part, xp.zeros((n, d - part.shape[1]), dtype=np.float32)], axis=1)
        parts.append(part)
    return (xp.concatenate(parts, axis=1) if parts else xp.zeros((n, 0), np.float32),)


def _weights(xp, op: str, coefficients, rows: int, f: int, ct):
    """The first rows * f coefficients as a [rows, f] matrix (onnxruntime ignores any rest)."""
    coefficients = list(coefficients or [])
    if len(coefficients) < rows * f:
        raise ValueError(f"{op}: {len(coefficients)} coefficients, need {rows} x {f} "
                         "(targets or classes x input features)")
    return _const(xp, coefficients[: rows * f], ct, (rows, f))


@kernel("LinearRegressor", since=1, domain=ML)
def LinearRegressor(xp, x, *, coefficients=None, intercepts=None, post_transform="NONE",
                    targets=1):
    """x @ W.T + b with W [targets, F]; intercepts count only when there is one per target."""
    ct = compute_dtype(x.dtype)
    xr = _rows(x, "LinearRegressor").astype(ct, copy=False)
    s = xr @ _weights(xp, "LinearRegressor", coefficients, targets, xr.shape[1], ct).T
    if intercepts and len(intercepts) == targets:
        s = s + _const(xp, intercepts, ct)
    return (post_transform_scores(xp, s, post_transform).astype(np.float32),)


def linear_classifier_classes(coefficients, intercepts, n_features: int) -> int:
    """Classes (score columns) of a LinearClassifier: one per intercept, else per F weights."""
    return len(intercepts) if intercepts else len(coefficients or []) // max(n_features, 1)


@kernel("LinearClassifier", since=1, domain=ML)
def LinearClassifier(xp, x, *, coefficients=None, classlabels_ints=None,
                     classlabels_strings=None, intercepts=None, multi_class=0,
                     post_transform="NONE"):
    """Scores x @ W.T + b (W [classes, F]) and the label of the best score. One weight row is
    binary: the label is labels[score > 0] (1/0 without labels); with two labels Z is
    [1 - t, t], t the LOGISTIC or PROBIT transform of the score (else the score), as in
    onnxruntime (its PROBIT result there is undefined). multi_class is ignored, as there."""
    ct = compute_dtype(x.dtype)
    xr = _rows(x, "LinearClassifier").astype(ct, copy=False)
    labels = _class_labels("LinearClassifier", classlabels_ints, classlabels_strings)
    classes = linear_classifier_classes(coefficients, intercepts, xr.shape[1])
    if classes < 1:
        raise ValueError("LinearClassifier: no classes (empty coefficients)")
    s = xr @ _weights(xp, "LinearClassifier", coefficients, classes, xr.shape[1], ct).T
    if intercepts:
        s = s + _const(xp, intercepts, ct)
    if classes > 1:
        if labels is not None and len(labels) < classes:
            raise ValueError(f"LinearClassifier: {len(labels)} class labels for {classes} "
                             "classes")
        z = post_transform_scores(xp, s, post_transform)
        return _labels(xp, labels, s.argmax(axis=1)), z.astype(np.float32)
    if labels is not None and len(labels) != 2:
        raise ValueError(f"LinearClassifier: one weight row is binary and needs 2 class labels,"
                         f" got {len(labels)}")
    positive = (s[:, 0] > 0).astype(np.int64)
    if labels is None:
        return positive, post_transform_scores(xp, s, post_transform).astype(np.float32)
    t = s if post_transform not in ("LOGISTIC", "PROBIT") else (
        _logistic(xp, s) if post_transform == "LOGISTIC" else _probit(xp, s))
    return _labels(xp, labels, positive), xp.concatenate([1.0 - t, t], axis=1).astype(
        np.float32)


def svm_kernel_params(kernel_params) -> tuple[float, float, float]:
    """(gamma, coef0, degree); zeros when absent."""
    p = list(kernel_params or []) + [0.0, 0.0, 0.0]
    return float(p[0]), float(p[1]), float(p[2])


def _sqdist(xp, x, sv):
    """Squared distances [N, V] by direct differences (no cancellation), in row chunks."""
    n, (v, f) = x.shape[0], sv.shape
    step = max(1, _RBF_CHUNK // max(1, v * f))
    parts = [((x[i:i + step, None, :] - sv[None]) ** 2).sum(axis=2) for i in range(0, n, step)]
    if not parts:
        return xp.zeros((0, v), dtype=x.dtype)
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)


def svm_gram(xp, x, sv, kernel_type: str, kernel_params):
    """K[n, v] = k(x_n, sv_v) for LINEAR, POLY, RBF or SIGMOID."""
    gamma, coef0, degree = svm_kernel_params(kernel_params)
    if kernel_type == "RBF":
        return xp.exp(-gamma * _sqdist(xp, x, sv))
    dot = x @ sv.T
    if kernel_type == "LINEAR":
        return dot
    if kernel_type == "POLY":
        with np.errstate(invalid="ignore"):
            return (gamma * dot + coef0) ** degree
    if kernel_type == "SIGMOID":
        return xp.tanh(gamma * dot + coef0)
    raise ValueError(f"SVM: unknown kernel_type '{kernel_type}'")


@kernel("SVMRegressor", since=1, domain=ML)
def SVMRegressor(xp, x, *, coefficients=None, kernel_params=None, kernel_type="LINEAR",
                 n_supports=0, one_class=0, post_transform="NONE", rho=None,
                 support_vectors=None):
    """K(x, SV) @ coefficients + rho[0] ([N, 1]); without support vectors x @ coefficients +
    rho[0]. one_class gives +1/-1; post_transform as for one score column (PROBIT only;
    onnxruntime ignores it)."""
    ct = compute_dtype(x.dtype)
    xr = _rows(x, "SVMRegressor").astype(ct, copy=False)
    f = xr.shape[1]
    coefficients, rho0 = list(coefficients or []), float((rho or [0.0])[0])
    if n_supports > 0:
        sv = _const(xp, list(support_vectors or [])[: n_supports * f], ct, (n_supports, f))
        k = svm_gram(xp, xr, sv, kernel_type, kernel_params)
        s = k @ _const(xp, coefficients[:n_supports], ct, (n_supports, 1)) + rho0
    else:
        s = xr @ _weights(xp, "SVMRegressor", coefficients, 1, f, ct).T + rho0
    if one_class:
        s = xp.where(s > 0, 1.0, -1.0).astype(ct)
    return (post_transform_scores(xp, s, post_transform).astype(np.float32),)


def svm_pairs(n_classes: int) -> list[tuple[int, int]]:
    """The one-vs-one classifiers (i, j), i < j, in libsvm's order."""
    return [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]


def svm_pair_matrix(coefficients, vectors_per_class) -> np.ndarray:
    """A [V, pairs] with pair scores = K @ A + rho: for pair (i, j) the support vectors of class
    i weigh with coefficient row j - 1 and those of class j with row i (libsvm's layout)."""
    counts = [int(c) for c in vectors_per_class]
    n, v = len(counts), sum(counts)
    coef = np.asarray(coefficients, np.float64)
    if coef.size < (n - 1) * v:
        raise ValueError(f"SVMClassifier: {coef.size} coefficients, need (classes - 1) x "
                         f"vectors = {(n - 1) * v}")
    coef = coef[: (n - 1) * v].reshape(n - 1, v)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    a = np.zeros((v, len(svm_pairs(n))))
    for p, (i, j) in enumerate(svm_pairs(n)):
        si, sj = starts[i], starts[j]
        a[si:si + counts[i], p] = coef[j - 1, si:si + counts[i]]
        a[sj:sj + counts[j], p] = coef[i, sj:sj + counts[j]]
    return a


def _pairwise_coupling(xp, r, ct):
    """onnxruntime's (libsvm's) multiclass_probability for every row of r [N, C, C] (r[i, j]:
    P(i | i or j)): up to 100 sweeps of coordinate updates, each row stopping on its own once
    max |Qp - pQp| < 0.005 / C."""
    n, c = r.shape[0], r.shape[1]
    eye = _const(xp, np.eye(c).ravel().tolist(), ct, (c, c))
    rt = r.transpose(0, 2, 1)
    off = 1 - eye
    q = -rt * r * off + eye * (rt * rt * off).sum(axis=2, keepdims=True)
    p = xp.full((n, c), 1.0 / c, dtype=ct)
    active = xp.ones(n, dtype=bool)
    for _ in range(100):
        qp = (q @ p[..., None])[..., 0]
        pqp = (p * qp).sum(axis=1)
        active = active & (xp.abs(qp - pqp[:, None]).max(axis=1) >= 0.005 / c)
        if not bool(active.any()):
            break
        for t in range(c):
            qtt = q[:, t, t]
            diff = xp.where(active, (pqp - qp[:, t]) / qtt, 0).astype(ct)
            pqp = (pqp + diff * (diff * qtt + 2 * qp[:, t])) / ((1 + diff) * (1 + diff))
            qp = (qp + diff[:, None] * q[:, t, :]) / (1 + diff)[:, None]
            p = (p + diff[:, None] * eye[t]) / (1 + diff)[:, None]
    return p


def svm_platt(xp, s, prob_a, prob_b, ct):
    """Pairwise probabilities 1 - logistic(s * A + B) of the one-vs-one scores, clipped to
    [1e-7, 1 - 1e-7]."""
    a, b = _const(xp, prob_a[: s.shape[1]], ct), _const(xp, prob_b[: s.shape[1]], ct)
    return xp.clip(_logistic(xp, -(s * a + b)), 1e-7, 1 - 1e-7)


@kernel("SVMClassifier", since=1, domain=ML)
def SVMClassifier(xp, x, *, classlabels_ints=None, classlabels_strings=None, coefficients=None,
                  kernel_params=None, kernel_type="LINEAR", post_transform="NONE", prob_a=None,
                  prob_b=None, rho=None, support_vectors=None, vectors_per_class=None):
    """libsvm's one-vs-one SVC (with support vectors) or a linear SVM (without), with
    onnxruntime's conventions: one-vs-one votes pick the label; Z holds the pair scores, or with
    prob_a/prob_b the Platt-coupled class probabilities. Two classes without probabilities give
    Z = [-s, s] (post_transform NONE), [1 - t, t] (t = logistic(s) for LOGISTIC, else s) or
    [probit(s), s] (PROBIT, whose second column onnxruntime leaves unset)."""
    ct = compute_dtype(x.dtype)
    xr = _rows(x, "SVMClassifier").astype(ct, copy=False)
    n, f = xr.shape
    labels = _class_labels("SVMClassifier", classlabels_ints, classlabels_strings)
    if labels is None:
        raise ValueError("SVMClassifier: classlabels_ints or classlabels_strings is required")
    c = len(labels)
    coefficients, rho = list(coefficients or []), list(rho or [0.0])
    prob_a, prob_b = list(prob_a or []), list(prob_b or [])
    counts = [int(v) for v in (vectors_per_class or [])]
    if sum(counts) == 0:  # linear SVM: one weight row per class, rho[0] for all of them
        s = xr @ _weights(xp, "SVMClassifier", coefficients, c, f, ct).T + rho[0]
        best = s.argmax(axis=1)
        z = post_transform_scores(xp, s, post_transform)
        if c == 2 and not prob_a:
            top = s.max(axis=1)
            if min(coefficients) >= 0:
                best = xp.where(top >= 0.5, 1, best)
            else:
                best = xp.where(top > 0, 1, best)
        return _labels(xp, labels, best), z.astype(np.float32)
    if len(counts) != c or c < 2:
        raise ValueError(f"SVMClassifier: {len(counts)} vectors_per_class for {c} class labels"
                         " (need at least 2 classes)")
    v, pairs = sum(counts), svm_pairs(c)
    sv = _const(xp, list(support_vectors or [])[: v * f], ct, (v, f))
    a = cached_constant(xp, ("ml_linear.svm_pairs", tuple(coefficients), tuple(counts),
                             ct.str), lambda: svm_pair_matrix(coefficients, counts).astype(ct))
    if len(rho) < len(pairs):
        raise ValueError(f"SVMClassifier: {len(rho)} rho values for {len(pairs)} class pairs")
    s = svm_gram(xp, xr, sv, kernel_type, kernel_params) @ a + _const(xp, rho[: len(pairs)], ct)
    # votes: pair (i, j) votes for i when its score is > 0, else for j
    first = _const(xp, np.eye(c)[[i for i, _ in pairs]].ravel().tolist(), ct, (len(pairs), c))
    second = _const(xp, np.eye(c)[[j for _, j in pairs]].ravel().tolist(), ct, (len(pairs), c))
    win = (s > 0).astype(ct)
    best = (win @ first + (1 - win) @ second).argmax(axis=1)
    if prob_a:
        if len(prob_a) < len(pairs) or len(prob_b) < len(pairs):
            raise ValueError(f"SVMClassifier: prob_a/prob_b need {len(pairs)} values")
        val = svm_platt(xp, s, prob_a, prob_b, ct)
        # r[i, j] = val of pair (i, j), r[j, i] = 1 - val: scattered by two 0/1 matrices
        to_ij = _const(xp, np.eye(c * c)[[i * c + j for i, j in pairs]].ravel().tolist(), ct,
                       (len(pairs), c * c))
        to_ji = _const(xp, np.eye(c * c)[[j * c + i for i, j in pairs]].ravel().tolist(), ct,
                       (len(pairs), c * c))
        r = (val @ to_ij + (1 - val) @ to_ji).reshape(n, c, c)
        z = post_transform_scores(xp, _pairwise_coupling(xp, r, ct), post_transform)
    elif c == 2:
        if post_transform == "PROBIT":  # onnxruntime leaves the second column unset here
            z = xp.concatenate([_probit(xp, s), s], axis=1)
        elif post_transform == "NONE":
            z = xp.concatenate([-s, s], axis=1)
        else:
            t = _logistic(xp, s) if post_transform == "LOGISTIC" else s
            z = xp.concatenate([1 - t, t], axis=1)
    else:
        z = post_transform_scores(xp, s, post_transform)
    return _labels(xp, labels, best), z.astype(np.float32)
