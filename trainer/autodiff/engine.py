"""Reverse-mode autodiff over ONNX nodes: needs-grad analysis, reverse walk, fan-in Sum."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from trainer.autodiff.context import GradContext
from trainer.autodiff.registry import STRAIGHT_THROUGH, _load_all, get_rule
from trainer.autodiff.subgraph import input_slots, n_slots
from trainer.errors import ModelError, UnsupportedOpError
from trainer.graph import NameScope, data_sized, is_float_dtype, node_name

_load_all()


def diff_inputs(node: onnx.NodeProto) -> list[str]:
    """Names in the node's differentiable input slots ("" for absent optionals), then the
    outer-scope tensors its subgraphs read (implicit inputs)."""
    return [name for _, name in input_slots(node)]


def active_nodes(nodes: list[onnx.NodeProto], targets, wrt: set[str], shapes: dict
                 ) -> tuple[list[int], set[str]]:
    """Indices of nodes on a float path from `wrt` to the `targets` (a name or names), through
    differentiable input slots only, and the tensors on such paths (with the quantized outputs
    of straight-through ops)."""
    requires = set(wrt)
    for node in nodes:
        if any(i in requires for i in diff_inputs(node)):
            through = node.op_type in STRAIGHT_THROUGH
            requires.update(o for o in node.output
                            if o in shapes and (through or is_float_dtype(shapes[o][1])))
    useful = {targets} if isinstance(targets, str) else set(targets)
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            useful.update(diff_inputs(node))
    on_path = requires & useful
    # (what reaches a target through values on the path only: a parameter read only through
    # a Cast to an integer type is useful by the walk above, which crossed the integer value,
    # yet carries no gradient there, as PyTorch's .long() does not)
    producer = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    alive = {t for t in useful if t in on_path} & (
        {targets} if isinstance(targets, str) else set(targets))
    stack = list(alive)
    while stack:
        k = producer.get(stack.pop())
        if k is None:
            continue
        for i in diff_inputs(nodes[k]):
            if i in on_path and i not in alive:
                alive.add(i)
                stack.append(i)
    on_path = alive
    active = [k for k, node in enumerate(nodes)
              if any(o in on_path for o in node.output)
              and any(i in on_path for i in diff_inputs(node))]
    return active, on_path


def _no_float_path(nodes: list[onnx.NodeProto], w: str, shapes: dict) -> str:
    """Why no gradient reaches `w` although the loss reads it: its readers' outputs are not
    float (a MatMul of an int64 input and a float weight, which onnx.checker lets pass)."""
    def typed(x: str) -> str:
        return f"'{x}' {np.dtype(shapes[x][1]).name}" if x in shapes else f"'{x}'"

    for k, node in enumerate(nodes):
        if w in node.input:
            return (f"no gradient reaches '{w}': node '{node_name(node, k)}' ({node.op_type}) "
                    f"reads it with {', '.join(typed(x) for x in node.input if x)} and gives "
                    f"{', '.join(typed(o) for o in node.output if o)}, not float values; are "
                    "its input types consistent? (onnx.checker.check_model(model, "
                    "full_check=True) checks them)")
    return f"no gradient reaches '{w}'"


def data_sized_values(nodes: list[onnx.NodeProto], constants: Mapping | None = None,
                      seed=()) -> frozenset[str]:
    """Values whose shape may follow the data (graph.data_sized; `constants`: the values known
    before the run). Their gradients take sizes from the values at run time, not from the
    probe's shapes."""
    known = constants or {}
    return frozenset(data_sized(((n.op_type, n.domain, list(n.input), list(n.output))
                                 for n in nodes), lambda x: x in known, seed))


def reachable_params(nodes, targets, candidates, shapes) -> set[str]:
    """Which candidate tensors the targets depend on through differentiable float paths."""
    return active_nodes(nodes, targets, set(candidates), shapes)[1] & set(candidates)


def build_backward(nodes: list[onnx.NodeProto], seeds: Mapping[str, str], wrt: list[str],
                   shapes: dict, opset: int, scope: NameScope, constants: dict | None = None,
                   sized_inputs=()
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], dict[str, str]]:
    """Gradient nodes of the outputs in `seeds` w.r.t. `wrt`: `seeds` maps each differentiated
    tensor y to the tensor holding dL/dy (a constant 1 for a scalar loss, or an adjoint input).

    Returns (nodes, constant initializers, {wrt name: gradient tensor name}).
    `sized_inputs`: values read from an enclosing graph whose shape follows the data.
    """
    active, on_path = active_nodes(nodes, list(seeds), set(wrt), shapes)
    unreached = [w for w in wrt if w not in on_path and w not in seeds]
    if unreached:
        raise ModelError(f"the loss does not depend on {', '.join(unreached)} through "
                         "differentiable ops; remove them from 'trainable'")
    missing = [(nodes[k].op_type, node_name(nodes[k], k)) for k in active
               if get_rule(nodes[k].op_type, nodes[k].domain) is None]
    if missing:
        raise UnsupportedOpError("gradient rule", missing)

    # Each (node, input slot) on the path contributes one gradient term to that input tensor;
    # a differentiated output also receives its seed.
    terms: dict[str, list[str]] = {y: ["seed"] for y in seeds}
    sized = data_sized_values(nodes, constants, sized_inputs)  # (and an outer graph's)
    slots: dict[tuple[int, int], str] = {}
    for k in active:
        node = nodes[k]
        for i, name in input_slots(node):
            if name in on_path:
                terms.setdefault(name, []).append(f"{k}:{i}")
    stuck = [w for w in wrt if w not in terms]
    if stuck:  # (on a path by its readers, yet no reader passes a float gradient back)
        raise ModelError(_no_float_path(nodes, stuck[0], shapes))
    final = {}
    for name, parts in terms.items():
        final[name] = seeds[name] if parts == ["seed"] else scope.fresh(f"{name}_grad")
    for name, parts in terms.items():
        for p in parts:
            if p == "seed":
                continue
            k, i = (int(v) for v in p.split(":"))
            if len(parts) == 1:
                slots[(k, i)] = final[name]
            else:
                slots[(k, i)] = scope.fresh(f"{final[name]}/{node_name(nodes[k], k)}/{i}")

    out_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    done: set[str] = set()

    def accumulate(name: str) -> None:
        parts = terms.get(name, [])
        if len(parts) > 1 and name not in done:
            names = [seeds[name] if p == "seed" else slots[tuple(int(v) for v in p.split(":"))]
                     for p in parts]
            out_nodes.append(onnx.helper.make_node("Sum", names, [final[name]],
                                                   name=scope.fresh(f"{final[name]}/Sum")))
        done.add(name)

    for k in reversed(active):
        node = nodes[k]
        gos: list[str | None] = []
        for o in node.output:
            if o in terms:
                accumulate(o)
                gos.append(final[o])
            else:
                gos.append(None)
        if all(g is None for g in gos):
            continue
        gis = [slots.get((k, i)) for i in range(n_slots(node))]
        label = node_name(node, k)
        ctx = GradContext(node, label, gos, gis, scope, opset, shapes, constants, sized)
        emitted = get_rule(node.op_type, node.domain)(ctx)
        produced = {o for n in emitted for o in n.output}
        lost = [g for g in gis if g is not None and g not in produced]
        if lost:
            raise ModelError(f"gradient rule for {node.op_type} (node '{label}') did not produce "
                             f"{', '.join(lost)}")
        out_nodes.extend(emitted)
        inits.extend(ctx.initializers)
    for w in wrt:
        accumulate(w)
    return out_nodes, inits, {w: final[w] for w in wrt}
