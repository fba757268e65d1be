"""Graph simplification before planning: constant folding (shape arithmetic included, once shapes
are known), Identity removal, transposes folded into Gemm flags, dead-node elimination."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from trainer.graph import data_sized

FOLD_LIMIT = 1 << 20  # elements: larger folded values would only duplicate weights


@dataclass
class PNode:
    """A node as the planner sees it: a bound kernel `fn(xp, *inputs, **attrs) -> tuple`."""
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    name: str
    fn: Callable | None = None
    domain: str = ""
    subs: tuple = ()   # (attribute name, planned subgraph(s)) of control-flow nodes
    fused: bool = False  # made by the planner (trainer.kernels.fused), not in the graph
    info: dict = field(default_factory=dict)  # planner notes (e.g. the nodes a fusion replaced)

    @property
    def random(self) -> bool:
        """Draws random numbers or communicates (a collective): never folded or dropped."""
        return "rng" in self.attrs or getattr(self.fn, "collective", False)


def consumers(nodes: Iterable[PNode]) -> dict[str, list[PNode]]:
    """value name -> the nodes that read it (once per node)."""
    out: dict[str, list[PNode]] = {}
    for n in nodes:
        for i in dict.fromkeys(n.inputs):
            if i:
                out.setdefault(i, []).append(n)
    return out


def producers(nodes: Iterable[PNode]) -> dict[str, PNode]:
    return {o: n for n in nodes for o in n.outputs if o}


def _data_sized(nodes: list[PNode], constants: Mapping) -> set[str]:
    """Values whose shape may follow the data (graph.data_sized): their Shape is read at run
    time, not taken from the run the plan was made from."""
    return data_sized(((n.op, n.domain, n.inputs, n.outputs) for n in nodes),
                      lambda x: x in constants)


def fold_constants(nodes: list[PNode], constants: dict, shapes: Mapping | None = None
                   ) -> list[PNode]:
    """Evaluate nodes whose inputs are all constants (and, with `shapes`, Shape/Size of any
    value) at plan time; their outputs join `constants`. Random and control-flow nodes stay."""
    kept = []
    sized = _data_sized(nodes, constants) if shapes is not None else set()
    for n in nodes:
        if shapes is not None and n.op in ("Shape", "Size") and not n.domain \
                and n.inputs[0] in shapes and n.inputs[0] not in sized:
            dims = np.array(shapes[n.inputs[0]][0], np.int64)
            if n.op == "Shape":
                start, end = n.attrs.get("start", 0), n.attrs.get("end")
                constants[n.outputs[0]] = dims[start:end]
            else:
                constants[n.outputs[0]] = np.array(int(np.prod(dims)), np.int64)
            continue
        ins = [i for i in n.inputs if i]
        if (n.fn is None or n.random or n.subs or n.fused
                or not all(i in constants for i in ins)):
            kept.append(n)
            continue
        try:
            values = n.fn(np, *[constants[i] if i else None for i in n.inputs], **n.attrs)
        except Exception:  # noqa: BLE001 - the run reports it, naming the node
            kept.append(n)
            continue
        arrays = [np.asarray(v) if isinstance(v, np.generic) else v
                  for v in list(values)[:len(n.outputs)]]
        if not all(isinstance(v, np.ndarray) and v.size <= FOLD_LIMIT for v in arrays):
            kept.append(n)
            continue
        for o, v in zip(n.outputs, arrays, strict=False):
            if o:
                constants[o] = v
    return kept


def remove_identities(nodes: list[PNode], alias: dict[str, str]) -> list[PNode]:
    """Drop Identity nodes: readers of the output read the input (recorded in `alias`)."""
    kept = []
    for n in nodes:
        n.inputs = [alias.get(i, i) for i in n.inputs]
        if n.op == "Identity" and not n.domain and len(n.inputs) == 1 and n.inputs[0]:
            alias[n.outputs[0]] = n.inputs[0]
            continue
        kept.append(n)
    return kept


def fold_transposes_into_gemm(nodes: list[PNode], shapes: Mapping) -> list[PNode]:
    """Gemm(Transpose(A)) -> Gemm(A, transA=1) (2-D transposes; B alike)."""
    made = producers(nodes)
    for n in nodes:
        if n.op != "Gemm" or n.domain:
            continue
        for slot, flag in ((0, "transA"), (1, "transB")):
            src = made.get(n.inputs[slot])
            if (src is not None and src.op == "Transpose" and not src.domain
                    and len(shapes.get(src.inputs[0], ((),))[0]) == 2
                    and list(src.attrs.get("perm") or [1, 0]) == [1, 0]):
                n.inputs[slot] = src.inputs[0]
                n.attrs[flag] = 1 - int(n.attrs.get(flag, 0))
    return nodes


def fold_gemm_output_transposes(nodes: list[PNode], shapes: Mapping, keep: Iterable[str]
                                ) -> list[PNode]:
    """Transpose(Gemm(A, B)) -> Gemm(B, A) with the flags swapped and negated, (op(A) op(B))^T
    = op(B)^T op(A)^T, when the Gemm has no C and only that 2-D Transpose reads its result (a
    weight gradient computed transposed then lands in place, without a transposing copy)."""
    readers = consumers(nodes)
    keep = set(keep)
    gone: set[int] = set()
    for n in nodes:
        if n.op != "Gemm" or n.domain or (len(n.inputs) > 2 and n.inputs[2]):
            continue
        rs = readers.get(n.outputs[0], [])
        t = rs[0] if len(rs) == 1 else None
        if (t is None or t.op != "Transpose" or t.domain or n.outputs[0] in keep
                or len(shapes.get(n.outputs[0], ((),))[0]) != 2
                or list(t.attrs.get("perm") or [1, 0]) != [1, 0]):
            continue
        ta, tb = int(n.attrs.get("transA", 0)), int(n.attrs.get("transB", 0))
        n.inputs = [n.inputs[1], n.inputs[0]]
        n.attrs["transA"], n.attrs["transB"] = 1 - tb, 1 - ta
        n.outputs = [t.outputs[0]]
        gone.add(id(t))
    return [n for n in nodes if id(n) not in gone]


def fold_reshapes_into_reductions(nodes: list[PNode], constants: Mapping, shapes: Mapping,
                                  keep: Iterable[str]) -> list[PNode]:
    """Reshape or Squeeze(ReduceSum/ReduceMean(x, keepdims=1)) -> the reduction with
    keepdims=0, when it only drops the reduced axes and is the reduction's only reader (the
    bias gradient of Gemm rules: one node, written straight into its place). Run after the
    fusions, whose patterns are the gradient rules' own nodes."""
    readers = consumers(nodes)
    keep = set(keep)
    gone: set[int] = set()
    for n in nodes:
        if n.op not in ("ReduceSum", "ReduceMean") or n.domain or not n.attrs.get("keepdims", 1):
            continue
        rs = readers.get(n.outputs[0], [])
        r = rs[0] if len(rs) == 1 else None
        if (r is None or r.op not in ("Reshape", "Squeeze") or r.domain
                or r.inputs[0] != n.outputs[0]
                or n.outputs[0] in keep or n.inputs[0] not in shapes
                or r.outputs[0] not in shapes):
            continue
        axes = n.attrs.get("axes")
        if len(n.inputs) > 1 and n.inputs[1]:
            axes = constants.get(n.inputs[1])
        if axes is None or np.size(axes) == 0:
            continue
        rank = len(shapes[n.inputs[0]][0])
        drop = {int(a) % rank for a in np.ravel(axes)}
        squeezed = tuple(d for k, d in enumerate(shapes[n.inputs[0]][0]) if k not in drop)
        if tuple(shapes[r.outputs[0]][0]) != squeezed:
            continue
        n.attrs["keepdims"] = 0
        n.outputs = [r.outputs[0]]
        gone.add(id(r))
    return [n for n in nodes if id(n) not in gone]


def eliminate_dead(nodes: list[PNode], keep: Iterable[str]) -> list[PNode]:
    """Drop nodes none of whose outputs is kept or read (random nodes stay: they draw from the
    run's random stream, which later nodes share)."""
    live = set(keep)
    out = []
    for n in reversed(nodes):
        if n.random or n.subs or any(o in live for o in n.outputs if o):
            out.append(n)
            live.update(i for i in n.inputs if i)
    out.reverse()
    return out


def simplify(nodes: list[PNode], constants: dict, keep: Iterable[str],
             shapes: Mapping | None = None) -> tuple[list[PNode], dict[str, str]]:
    """All passes; returns (nodes, alias: removed value -> the value that replaces it).
    `constants` gains the folded values; `shapes` (name -> (shape, dtype)) enables Shape/Size
    folding and the Gemm transpose flags (on its inputs and its output)."""
    alias: dict[str, str] = {}
    nodes = fold_constants(nodes, constants, shapes)
    nodes = remove_identities(nodes, alias)
    keep = {alias.get(k, k) for k in keep}
    if shapes is not None:
        nodes = fold_transposes_into_gemm(nodes, shapes)
        nodes = fold_gemm_output_transposes(nodes, shapes, keep)
    return eliminate_dead(nodes, keep), alias
