"""What `onnx-trainer check MODEL` reports: every node with its forward and gradient support, and
every float initializer with whether it is trained by default (and why not).

Nothing is executed: value types come from ONNX shape inference, so a report on a large model
takes the time of a graph walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from trainer.autodiff.engine import active_nodes
from trainer.autodiff.params import (
    PARAMETER,
    ParamInfo,
    parameter_table,
    tie_transposed_copies,
    untie_normalization_aliases,
)
from trainer.autodiff.registry import NO_GRADIENT, _load_all
from trainer.graph import node_name, np_dtype, opset_of
from trainer.kernels import get_kernel


@dataclass
class NodeRow:
    name: str
    op: str
    forward: bool
    gradient: str  # "rule" | "not differentiable" | "not needed" | "MISSING"

    @property
    def ok(self) -> bool:
        return self.forward and self.gradient != "MISSING"


@dataclass
class Report:
    opset: int
    nodes: list[NodeRow]
    params: list[ParamInfo]
    untied: list[str]
    tied: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.nodes) and any(p.role == PARAMETER for p in self.params)

    def text(self) -> str:
        width = max([len(r.name) for r in self.nodes] + [4])
        lines = [f"{'node':<{width}}  {'op':<26} forward  gradient"]
        lines += [f"{r.name:<{width}}  {r.op:<26} {'yes' if r.forward else 'MISSING':<8} "
                  f"{r.gradient}" for r in self.nodes]
        bad = sum(not r.ok for r in self.nodes)
        trained = [p for p in self.params if p.role == PARAMETER]
        count = sum(int(np.prod(p.shape)) if p.shape else 1 for p in trained)
        lines.append("")
        lines.append(f"parameters trained by default: {len(trained)} tensors, {count} values")
        left = [p for p in self.params if p.role != PARAMETER]
        if left:
            lines.append(f"float initializers left out ({len(left)}; 'trainable'/'frozen' in "
                         "the config override):")
            w = max(len(p.name) for p in left)
            lines += [f"  {p.name:<{w}}  {list(p.shape)}  {p.reason}" for p in left]
        for copy_name, src in self.tied.items():
            lines.append(f"'{copy_name}' is the exact transpose of '{src}' (tied weights stored "
                         "twice by the exporter): trained as one tensor")
        if self.untied:
            lines.append(f"normalization tensors the exporter had merged, trained separately: "
                         f"{', '.join(self.untied)}")
        verdict = "all trainable" if not bad else f"{bad} node(s) cannot be trained"
        if not trained:
            verdict += "; no parameter reaches an output"
        lines.append(f"{len(self.nodes)} nodes, opset {self.opset}: {verdict}")
        return "\n".join(lines)


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape unknown, dtype) of every value ONNX shape inference types; others are absent."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types count as float
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if vi.type.WhichOneof("value") == "tensor_type" and t.elem_type:
            out[vi.name] = ((), np_dtype(t.elem_type))
    for t in g.initializer:
        out[t.name] = ((), np_dtype(t.data_type))
    return out


class _FloatDefault(dict):
    """Types for active_nodes: a value of unknown type is taken as float (conservative)."""

    def __contains__(self, key) -> bool:
        return True

    def __missing__(self, key):
        return ((), np.dtype(np.float32))


def model_report(model: onnx.ModelProto) -> Report:
    """The report for a model whose loss may read any of its outputs."""
    _load_all()
    untied = untie_normalization_aliases(model)
    tied = tie_transposed_copies(model)
    nodes = list(model.graph.node)
    types = _FloatDefault(_value_types(model))
    outputs = [o.name for o in model.graph.output]
    params = parameter_table(model, nodes, outputs, types)
    trained = {p.name for p in params if p.role == PARAMETER}
    active = set(active_nodes(nodes, outputs, trained, types)[0])
    rows = []
    for i, node in enumerate(nodes):
        fwd = get_kernel(node.op_type, opset_of(model, node.domain), node.domain) is not None
        grad = gradient_status(node.op_type, "" if node.domain == "ai.onnx" else node.domain)
        if grad == "missing":
            grad = "MISSING" if i in active else "not needed"
        rows.append(NodeRow(node_name(node, i), node.op_type, fwd, grad))
    return Report(opset_of(model), rows, params, untied, tied)


def gradient_status(op: str, domain: str = "") -> str:
    """rule | lowered (static sequences and control flow become plain ops before
    differentiation, trainer.autodiff.subgraph) | not differentiable | missing."""
    from trainer.autodiff.registry import RULES
    from trainer.autodiff.subgraph import CONTROL, SEQUENCE

    if op in NO_GRADIENT:
        return "not differentiable"
    if (domain, op) in RULES:
        return "rule"
    if domain == "" and op in CONTROL | SEQUENCE:
        return "lowered"
    return "missing"


def support_table() -> list[dict]:
    """One row per operator of the installed onnx's domains (and any other op with a kernel):
    `{"op", "domain", "forward": [kernel since-versions], "gradient": "rule" | "lowered" |
    "not differentiable" | "missing"}` (gradient is "missing" too for ops without a kernel)."""
    import onnx.defs

    from trainer.executor import GRAPH_KERNEL_OPS
    from trainer.kernels import KERNELS

    _load_all()
    ops = {("" if s.domain == "ai.onnx" else s.domain, s.name)
           for s in onnx.defs.get_all_schemas_with_history() if not s.deprecated}
    ops |= set(KERNELS)
    rows = []
    for domain, op in sorted(ops, key=lambda k: (k[0], k[1])):
        forward = sorted({since for since, _ in KERNELS.get((domain, op), [])})
        if (domain, op) in GRAPH_KERNEL_OPS:
            forward = [GRAPH_KERNEL_OPS[(domain, op)]]
        rows.append({"op": op, "domain": domain, "forward": forward,
                     "gradient": gradient_status(op, domain)})
    return rows
