"""The Gradient operator of ai.onnx.preview.training, run through trainer.autodiff.reverse.

Gradient(xs, zs, y) outputs dy/dx for each x in xs, where y is computed in the enclosing graph
from xs and zs (dy/dx of the sum of y's elements when y is not a scalar). The part of the graph
between them is cut out once, differentiated once per input shape signature, and planned by the
executor like any other graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from trainer.errors import ModelError


def _slice(graph: onnx.GraphProto, sources: list[str], y: str) -> tuple[list, list]:
    """Nodes computing y from `sources` (and constants), and the initializers they read."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    stop = set(sources)
    nodes, needed, seen = [], [], set()

    def visit(name: str) -> None:
        if not name or name in stop or name in seen:
            return
        seen.add(name)
        if name in inits:
            needed.append(inits[name])
            return
        node = producer.get(name)
        if node is None:
            raise ModelError(f"Gradient: '{y}' depends on '{name}', which is neither computed "
                             "in the graph nor listed in xs or zs")
        for i in node.input:
            visit(i)
        if not any(n is node for n in nodes):
            nodes.append(node)

    visit(y)
    visit = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return nodes, needed


def gradient_kernel(model: onnx.ModelProto, graph: onnx.GraphProto, node: onnx.NodeProto):
    """The kernel for one Gradient node: fn(xp, *xs_then_zs) -> tuple of dy/dx."""
    from trainer.autodiff.build import reverse
    from trainer.executor import Executor

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    xs = [v.decode() for v in attrs.get("xs", [])]
    zs = [v.decode() for v in attrs.get("zs", [])]
    y = attrs["y"].decode() if isinstance(attrs.get("y"), bytes) else attrs.get("y")
    if not xs or not y:
        raise ModelError(f"Gradient node '{node.name}' needs the attributes xs and y")
    nodes, inits = _slice(graph, xs + zs, y)
    plans: dict[tuple, tuple] = {}

    def run(xp, *values):
        if len(values) != len(xs) + len(zs):
            raise ValueError(f"Gradient takes {len(xs) + len(zs)} inputs (xs then zs), got "
                             f"{len(values)}")
        key = tuple((tuple(v.shape), np.dtype(v.dtype).str) for v in values)
        if key not in plans:
            from trainer.backend import to_host

            host = [to_host(v) for v in values]
            vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                 list(v.shape))
                   for n, v in zip(xs + zs, host, strict=True)]
            sub = helper.make_model(
                helper.make_graph(nodes, "gradient_of", vis,
                                  [helper.make_empty_tensor_value_info(y)], inits),
                opset_imports=[o for o in model.opset_import
                               if o.domain != "ai.onnx.preview.training"])
            sub.ir_version = model.ir_version
            rm = reverse(sub, xs, [y], example=dict(zip(xs + zs, host, strict=True)))
            seed = next(v for v in rm.graph.input if v.name == f"{y}_grad").type.tensor_type
            plans[key] = (Executor(rm, xp), tuple(d.dim_value for d in seed.shape.dim),
                          helper.tensor_dtype_to_np_dtype(seed.elem_type))
        ex, dims, dtype = plans[key]
        feeds = dict(zip(xs + zs, values, strict=True))
        out = ex.run({**feeds, f"{y}_grad": xp.ones(dims, dtype)})
        return tuple(out[f"{x}_grad"] for x in xs)

    return run
