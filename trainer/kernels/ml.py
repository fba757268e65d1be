"""ai.onnx.ml kernels: ArrayFeatureExtractor, Binarizer, LabelEncoder and TreeEnsemble.

LabelEncoder maps numbers on `xp` and strings on the host (object arrays).
"""

from __future__ import annotations

import math

import numpy as np

from trainer.backend import to_device, to_host
from trainer.kernels import kernel

ML = "ai.onnx.ml"


@kernel("ArrayFeatureExtractor", since=1, domain=ML)
def ArrayFeatureExtractor(xp, x, y):
    """x[..., y] with y flattened; a 1-D x gives a [1, k] result (as onnxruntime does)."""
    m = np if x.dtype == object else xp
    idx = y.reshape(-1)
    z = m.take(x, idx if m is xp else to_host(idx), axis=-1)
    return (z.reshape((1, -1)) if x.ndim == 1 else z,)


@kernel("Binarizer", since=1, domain=ML)
def Binarizer(xp, x, *, threshold=0.0):
    return ((x > threshold).astype(x.dtype),)


def _encode(xp, x, keys: np.ndarray, values: np.ndarray, default):
    """values[i] where x == keys[i] (the last equal key wins; NaN keys match NaN), else default."""
    if keys.dtype == object or values.dtype == object or x.dtype == object:
        table = dict(zip(keys.tolist(), values.tolist(), strict=True))
        flat = to_host(x).ravel().tolist()
        if keys.dtype.kind == "f":
            nan = [v for k, v in zip(keys.tolist(), values.tolist(), strict=True) if k != k]
            got = [nan[-1] if nan and k != k else table.get(k, default) for k in flat]
        else:
            got = [table.get(k, default) for k in flat]
        out = np.empty(len(got), dtype=values.dtype)
        out[:] = got
        out = out.reshape(x.shape)
        return out if out.dtype == object else to_device(xp, out)
    keys = keys.astype(x.dtype)
    isnan = np.isnan(keys) if keys.dtype.kind == "f" else np.zeros(len(keys), dtype=bool)
    nan_value = values[np.flatnonzero(isnan)[-1]] if isnan.any() else None
    keys, vals = keys[~isnan], values[~isnan]
    # Sorted unique keys, each keeping the value of its last occurrence.
    uniq, last_in_reversed = np.unique(keys[::-1], return_index=True)
    sorted_vals = vals[::-1][last_in_reversed]
    out = xp.full(x.shape, default, dtype=values.dtype)
    if len(uniq):
        k = to_device(xp, uniq)
        pos = xp.minimum(xp.searchsorted(k, x), len(uniq) - 1)
        out = xp.where(k[pos] == x, to_device(xp, sorted_vals)[pos], out)
    if nan_value is not None:
        out = xp.where(xp.isnan(x), values.dtype.type(nan_value), out)
    return out.astype(values.dtype)


@kernel("LabelEncoder", since=1, domain=ML)
def LabelEncoder_1(xp, x, *, classes_strings=(), default_int64=-1, default_string="_Unused"):
    """Strings -> their index in classes_strings; int64 -> classes_strings[x]."""
    classes = np.array(list(classes_strings), dtype=object)
    if x.dtype == object:
        return (_encode(xp, x, classes, np.arange(len(classes), dtype=np.int64),
                        default_int64),)
    return (_encode(xp, x, np.arange(len(classes), dtype=np.int64), classes, default_string),)


def _pick(kind: str, floats, int64s, strings, tensor=None) -> np.ndarray:
    given = [(n, v) for n, v in (("floats", floats), ("int64s", int64s), ("strings", strings),
                                 ("tensor", tensor)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"LabelEncoder needs exactly one {kind}_* attribute, got "
                         f"{[f'{kind}_{n}' for n, _ in given] or 'none'}")
    name, v = given[0]
    if name == "floats":
        return np.asarray(v, dtype=np.float32)
    if name == "int64s":
        return np.asarray(v, dtype=np.int64)
    if name == "strings":
        return np.array(list(v), dtype=object)
    return np.asarray(v).reshape(-1)


def _default(values: np.ndarray, default_float, default_int64, default_string, default_tensor):
    if default_tensor is not None:
        return np.asarray(default_tensor).reshape(-1)[0].item()
    if values.dtype == object:
        return default_string
    return default_float if values.dtype.kind == "f" else default_int64


@kernel("LabelEncoder", since=2, domain=ML)
def LabelEncoder_2(xp, x, *, default_float=-0.0, default_int64=-1, default_string="_Unused",
                   keys_floats=None, keys_int64s=None, keys_strings=None, values_floats=None,
                   values_int64s=None, values_strings=None):
    keys = _pick("keys", keys_floats, keys_int64s, keys_strings)
    values = _pick("values", values_floats, values_int64s, values_strings)
    return (_encode(xp, x, keys, values,
                    _default(values, default_float, default_int64, default_string, None)),)


@kernel("LabelEncoder", since=4, domain=ML)
def LabelEncoder_4(xp, x, *, default_float=-0.0, default_int64=-1, default_string="_Unused",
                   default_tensor=None, keys_floats=None, keys_int64s=None, keys_strings=None,
                   keys_tensor=None, values_floats=None, values_int64s=None,
                   values_strings=None, values_tensor=None):
    keys = _pick("keys", keys_floats, keys_int64s, keys_strings, keys_tensor)
    values = _pick("values", values_floats, values_int64s, values_strings, values_tensor)
    if values_tensor is not None and default_tensor is None:
        default_tensor = np.array(["_Unused"] if values.dtype == object
                                  else [-0.0] if values.dtype.kind == "f" else [-1])
    return (_encode(xp, x, keys, values,
                    _default(values, default_float, default_int64, default_string,
                             default_tensor)),)


# TreeEnsemble node modes
LEQ, LT, GTE, GT, EQ, NEQ, MEMBER = range(7)


def _members(modes: np.ndarray, membership_values, dtype) -> np.ndarray:
    """[nodes, width] set members per node (NaN-padded): the NaN-delimited sets of
    membership_values, in the order BRANCH_MEMBER nodes appear in nodes_modes."""
    member_nodes = np.flatnonzero(modes == MEMBER)
    table = np.full((len(modes), 1), np.nan, dtype=dtype)
    if not len(member_nodes):
        return table
    if membership_values is None:
        raise ValueError("TreeEnsemble: BRANCH_MEMBER nodes need membership_values")
    flat = np.asarray(membership_values, dtype=np.float64).reshape(-1)
    sets, cur = [], []
    for v in flat.tolist():
        if math.isnan(v):
            sets.append(cur)
            cur = []
        else:
            cur.append(v)
    if cur:
        sets.append(cur)
    if len(sets) < len(member_nodes):
        raise ValueError(f"TreeEnsemble: {len(member_nodes)} BRANCH_MEMBER nodes but "
                         f"{len(sets)} member sets")
    width = max(1, max(len(s) for s in sets))
    table = np.full((len(modes), width), np.nan, dtype=dtype)
    for node, s in zip(member_nodes, sets, strict=False):
        table[node, : len(s)] = s
    return table


def _erfinv(xp, x):
    # Winitzki's closed-form approximation (a = 0.147), relative error about 2e-3.
    a = 0.147
    ln = xp.log((1.0 - x) * (1.0 + x))
    t = 2.0 / (math.pi * a) + 0.5 * ln
    return xp.sign(x) * xp.sqrt(xp.sqrt(t * t - ln / a) - t)


def _post_transform(xp, y, kind: int):
    if kind == 0:
        return y
    if kind == 1:
        e = xp.exp(y - y.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if kind == 2:
        return 1.0 / (1.0 + xp.exp(-y))
    if kind == 3:  # softmax over the non-zero scores; zeros stay zero
        e = xp.where(y != 0, xp.exp(y - y.max(axis=1, keepdims=True)), 0.0)
        s = e.sum(axis=1, keepdims=True)
        return e / xp.where(s == 0, 1.0, s)
    if kind == 4:  # probit; scores of 0 and 1 give -inf and inf
        with np.errstate(divide="ignore"):
            return math.sqrt(2.0) * _erfinv(xp, 2.0 * y - 1.0)
    raise ValueError(f"TreeEnsemble: unknown post_transform {kind}")


@kernel("TreeEnsemble", since=5, domain=ML)
def TreeEnsemble(xp, x, *, leaf_targetids, leaf_weights, n_targets, nodes_falseleafs,
                 nodes_falsenodeids, nodes_featureids, nodes_modes, nodes_splits,
                 nodes_trueleafs, nodes_truenodeids, tree_roots, aggregate_function=1,
                 membership_values=None, nodes_hitrates=None,
                 nodes_missing_value_tracks_true=None, post_transform=0):
    """All (sample, tree) pairs descend one level per step until every one sits on a leaf;
    leaf weights are then aggregated per target (a target no leaf reaches scores 0)."""
    ct = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
    data = x.astype(ct).reshape(x.shape[0], -1)
    n_nodes = len(nodes_modes)
    modes_h = np.asarray(nodes_modes).astype(np.int64).reshape(-1)

    def dev(a, dtype):
        return to_device(xp, np.asarray(a).astype(dtype).reshape(-1))

    modes = dev(modes_h, np.int64)
    feats, splits = dev(nodes_featureids, np.int64), dev(nodes_splits, ct)
    true_ids, false_ids = dev(nodes_truenodeids, np.int64), dev(nodes_falsenodeids, np.int64)
    true_leaf, false_leaf = dev(nodes_trueleafs, bool), dev(nodes_falseleafs, bool)
    tracks = dev(nodes_missing_value_tracks_true if nodes_missing_value_tracks_true is not None
                 else np.zeros(n_nodes), bool)
    members = to_device(xp, _members(modes_h, membership_values, ct))
    n, trees = data.shape[0], len(tree_roots)
    node = xp.broadcast_to(dev(tree_roots, np.int64)[None, :], (n, trees)).copy()
    at_leaf = xp.zeros((n, trees), dtype=bool)
    for _ in range(n_nodes + 1):
        if bool(at_leaf.all()):
            break
        nd = xp.where(at_leaf, 0, node)
        v = xp.take_along_axis(data, feats[nd], axis=1)
        s, md = splits[nd], modes[nd]
        member = (v[..., None] == members[nd]).any(axis=-1)
        go_true = xp.where(md == LEQ, v <= s, xp.where(md == LT, v < s, xp.where(
            md == GTE, v >= s, xp.where(md == GT, v > s, xp.where(
                md == EQ, v == s, xp.where(md == NEQ, v != s, member))))))
        go_true = go_true | (xp.isnan(v) & tracks[nd])
        nxt = xp.where(go_true, true_ids[nd], false_ids[nd])
        nxt_leaf = xp.where(go_true, true_leaf[nd], false_leaf[nd])
        node = xp.where(at_leaf, node, nxt)
        at_leaf = at_leaf | nxt_leaf
    else:
        raise ValueError("TreeEnsemble: the trees do not end in leaves (cycle in nodes_*)")
    weights = dev(leaf_weights, ct)[node]                                   # [n, trees]
    hit = dev(leaf_targetids, np.int64)[node][..., None] == xp.arange(n_targets)
    if aggregate_function in (0, 1):
        y = (xp.where(hit, weights[..., None], 0)).sum(axis=1)
        if aggregate_function == 0 and trees:
            y = y / trees
    elif aggregate_function in (2, 3):
        fill = np.inf if aggregate_function == 2 else -np.inf
        cand = xp.where(hit, weights[..., None], fill)
        y = cand.min(axis=1) if aggregate_function == 2 else cand.max(axis=1)
        y = xp.where(hit.any(axis=1), y, 0)
    else:
        raise ValueError(f"TreeEnsemble: unknown aggregate_function {aggregate_function}")
    return (_post_transform(xp, y.astype(ct), post_transform).astype(x.dtype),)
