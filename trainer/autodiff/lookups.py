"""Folded lookups of a parameter by a buffer (`table[index]`), trained as the table.

Swin's relative-position bias is `table[index]` (a learned table of one row per relative offset
and one column per head, gathered by a buffer of indices), viewed and permuted into a
[1, heads, N, N] bias. The default exporter's optimizer folds the whole expression into one
initializer and leaves the table and the index out: trained as a tensor of its own, each of its
entries moves apart, where PyTorch moves every entry gathered from one row of the table together
(torchvision's swin_t: 3.4e-3 from PyTorch's losses in 3 steps).

The folded tensor still holds the lookup's structure in its values: entries gathered from one
row are equal across every head, and entries from different rows differ in some head (a
table's rows are not equal, trained or freshly drawn). Grouping positions by their vector of
values along the heads' axis (two heads or more) recovers which row each one came from, up to
the rows' order.
The training graph then holds the distinct rows as the parameter, named after PyTorch's table,
and gathers the folded tensor from them (Gather, Reshape, Transpose): every use trains the
shared rows, with PyTorch's gradient (the sum over the positions of a row) and its optimizer
state. Export writes the folded tensor back from the trained rows, in the same graph.

T5's relative-attention bias is the same lookup with indices computed from `torch.arange` (an
Embedding of buckets, whose one Gather the optimizer folds with them): the Embedding has no
node left, so its parent reads the folded tensor.

Only where the export's records say so: a module (or, for a parameter whose module has no node
left, its parent) with exactly one parameter that is missing from the graph and not otherwise
accounted for, and exactly one folded float tensor whose values group (not an additive mask,
not a folded copy of another parameter such as a Linear weight's transpose) that only nodes of
that module read. A tensor whose values do not group (all equal, as a zero-initialized table,
or all distinct) is left as it is, with the folded-parameter warning."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from trainer.autodiff.params import (
    _SCOPES_KEY,
    FLOAT_TYPES,
    _additive_mask,
    _meta,
    _missing_parameter_uses,
    _module_of,
    signature_entries,
)
from trainer.graph import tensor_value, values_unknown


@dataclass(frozen=True)
class Lookup:
    """The folded tensor `copy` as rows of `source` (named after PyTorch's table) gathered by
    `index`: copy = moveaxis(source[index].reshape(moved), -1, axis) with a heads' axis, else
    source[index].reshape(shape) (source [rows, 1], one head)."""
    copy: str
    source: str
    index: np.ndarray        # int64 [positions]: the row of each position
    shape: tuple[int, ...]   # the folded tensor's
    axis: int | None         # the heads' axis, None where there is none (one head)

    def expand(self, rows: np.ndarray) -> np.ndarray:
        """The folded tensor from the table's rows."""
        if self.axis is None:
            return np.ascontiguousarray(rows[self.index].reshape(self.shape))
        moved = tuple(d for i, d in enumerate(self.shape) if i != self.axis) \
            + (self.shape[self.axis],)
        return np.ascontiguousarray(np.moveaxis(rows[self.index].reshape(moved), -1, self.axis))


def lookups_line(found: dict[str, Lookup]) -> str:
    """What `check` and `train` say of the folded lookups tie_folded_lookups tied."""
    pairs = [f"'{lk.copy}' = {lk.source} ({int(lk.index.max()) + 1} rows)"
             for lk in found.values()]
    return (f"{len(found)} tensor(s) that the exporter's optimizer folded from a lookup "
            "table[index] by a buffer train as the shared rows of PyTorch's table: "
            + ", ".join(pairs[:4]) + (f" ... ({len(pairs)} in all)" if len(pairs) > 4 else ""))


def _group(a: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows [groups, heads] (heads 1 where axis is None), index [positions]) where grouping the
    positions of `a` by their values along `axis` (by value where None) gives fewer groups
    than positions and more than one; else None."""
    if axis is None:
        flat = a.reshape(-1, 1)
    else:
        flat = np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])
    rows, first, index = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    if not 1 < len(rows) < len(flat):
        return None
    order = np.argsort(first, kind="stable")  # rows in the order of their first position
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    rows = flat[first[order]]
    return rows, rank[index.reshape(-1)].astype(np.int64)


def find_folded_lookups(model: onnx.ModelProto) -> dict[str, Lookup]:
    """{folded tensor: Lookup} for the folded lookups of a default export (module docstring);
    reads only the candidates' values (a tensor left on disk is skipped)."""

    entries = signature_entries(model)
    if not entries:
        return {}
    # (views=False: a lookup read in the table's parent, T5's, is not taken for a view)
    missing, explained, carriers = _missing_parameter_uses(model, views=False)
    scopes: set[str] = set()  # modules that nodes come from, and the modules above them
    for n in model.graph.node:
        parts = re.findall(r"'([^']*)'", _meta(n, _SCOPES_KEY))[:-1]
        scopes.update(parts)
    tables: dict[str, list[str]] = {}  # module that reads the lookup -> its table
    for ph, name in missing.items():
        if ph not in explained:
            module = name.rpartition(".")[0]
            # (an Embedding whose one Gather was folded has no node left: its parent reads it)
            reader = module if module in scopes else module.rpartition(".")[0]
            tables.setdefault(reader, []).append(name)
    named = {t for _, t in entries.values()}
    readers: dict[str, set[str | None]] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, set()).add(_module_of(n))
    by_module: dict[str, list[onnx.TensorProto]] = {}
    for t in model.graph.initializer:
        mods = readers.get(t.name, set())
        if (t.data_type in FLOAT_TYPES and t.name not in named and t.name not in carriers
                and len(mods) == 1 and int(np.prod(t.dims)) > 1):  # (carriers: another
            # parameter folded, a Linear weight's transpose)
            (module,) = mods
            if len(tables.get(module, [])) == 1:
                by_module.setdefault(module, []).append(t)
    found: dict[str, Lookup] = {}
    for module, tensors in by_module.items():
        grouped = []
        for t in tensors:
            if values_unknown(t) or _additive_mask(t) is not None:
                continue
            a = tensor_value(t)
            if np.isfinite(a).all() and (picked := _pick(a)) is not None:
                grouped.append((t, a, picked))
        if len(grouped) == 1:  # (others: all equal, a shifted-window mask's region counts)
            t, a, (axis, (_, index)) = grouped[0]
            found[t.name] = Lookup(t.name, tables[module][0], index, tuple(a.shape), axis)
    return found


def _pick(a: np.ndarray) -> tuple[int | None, tuple[np.ndarray, np.ndarray]] | None:
    """(heads' axis, _group's rows and index) for the grouping with the fewest rows along an
    axis of more than one entry (the heads': any other groups no positions, where the table's
    rows differ); None where nothing groups. Not by single values: a one-head table's entries
    cannot be told from a structured table's equal values (a sinusoidal position table's zeros
    and ones), so a one-head lookup stays as it is, warned."""
    best = None
    for axis in [i for i, d in enumerate(a.shape) if d > 1]:
        grouped = _group(a, axis)
        if grouped is not None and (best is None or len(grouped[0]) < len(best[1][0])):
            best = (axis, grouped)
    return best


def tie_folded_lookups(model: onnx.ModelProto) -> dict[str, Lookup]:
    """Replace each folded lookup (find_folded_lookups) in place by its table's rows, an
    initializer named after PyTorch's table, and the nodes that gather the folded tensor from
    them; returns them by folded tensor."""
    from onnx import helper, numpy_helper

    found = find_folded_lookups(model)
    if not found:
        return found
    g = model.graph
    values = {t.name: tensor_value(t) for t in g.initializer if t.name in found}
    keep = [t for t in g.initializer if t.name not in found]
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = []
    for name, lk in found.items():
        a = values[name]
        rows = _pick(a)[1][0]
        g.initializer.append(numpy_helper.from_array(rows.astype(a.dtype), lk.source))
        index, shape = f"{name}/Lookup/index", f"{name}/Lookup/shape"
        g.initializer.append(numpy_helper.from_array(lk.index, index))
        if lk.axis is None:
            moved = lk.shape
        else:
            moved = tuple(d for i, d in enumerate(lk.shape) if i != lk.axis) \
                + (lk.shape[lk.axis],)
        g.initializer.append(numpy_helper.from_array(np.array(moved, np.int64), shape))
        gathered = f"{name}/Lookup/rows"
        nodes.append(helper.make_node("Gather", [lk.source, index], [gathered], axis=0,
                                      name=f"{name}/Lookup/Gather"))
        out = name if lk.axis is None or lk.axis == len(lk.shape) - 1 else f"{name}/Lookup/moved"
        nodes.append(helper.make_node("Reshape", [gathered, shape], [out],
                                      name=f"{name}/Lookup/Reshape"))
        if out != name:
            perm = list(range(len(lk.shape) - 1))
            perm.insert(lk.axis, len(lk.shape) - 1)
            nodes.append(helper.make_node("Transpose", [out], [name], perm=perm,
                                          name=f"{name}/Lookup/Transpose"))
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    return found
