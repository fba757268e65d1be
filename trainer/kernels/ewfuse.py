"""Elementwise chains of a device plan as one generated kernel.

On a GPU each ONNX node is at least one kernel launch and one pass over memory: a GELU written
as Div -> Erf -> Add -> Mul -> Mul reads and writes its tensor five times, and the backward of
such chains more often still. `fuse_elementwise` (device plans only) groups chains of
elementwise nodes whose intermediate values nobody else reads into one node; on CuPy that node
is one `cupy.ElementwiseKernel` whose C++ body `kernel_source` generates (one read of each
input, one write of the result, broadcasting as the unfused nodes would). Where no such kernel
can run (the CPU stand-in, NumPy, or a kernel that fails to build) the node runs the original
kernels one after the other, so it computes exactly what the unfused nodes do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from trainer.kernels.generated import GeneratedKernel
from trainer.simplify import PNode

# op -> its value as a C/C++ expression of the operands' variable names ({a}, {b}; Where's
# condition {c}); T is the group's float type. Operands are always variable names, so one may
# appear twice.
C_EXPR = {
    "Add": "({a} + {b})", "Sub": "({a} - {b})", "Mul": "({a} * {b})", "Div": "({a} / {b})",
    "Neg": "(-{a})", "Exp": "exp({a})", "Log": "log({a})", "Sqrt": "sqrt({a})",
    "Tanh": "tanh({a})", "Erf": "erf({a})", "Reciprocal": "((T)1 / {a})",
    "Abs": "({a} < (T)0 ? -{a} : {a})", "Relu": "({a} < (T)0 ? (T)0 : {a})",
    "Sigmoid": "((T)1 / ((T)1 + exp(-{a})))", "Where": "({c} ? {a} : {b})",
    "Greater": "({a} > {b})", "Less": "({a} < {b})", "GreaterOrEqual": "({a} >= {b})",
    "LessOrEqual": "({a} <= {b})", "Equal": "({a} == {b})",
    "Sum": None,  # any number of operands: ((a + b) + c) ..., left to right as its kernel adds
}
_ARITY = {"Where": 3, **{op: 2 for op in ("Add", "Sub", "Mul", "Div", "Greater", "Less",
                                         "GreaterOrEqual", "LessOrEqual", "Equal")}}
_COMPARE = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_BOOL = np.dtype(np.bool_)
MIN_NODES = 2  # a group of one node is left as it is


def _float_type(n: PNode, shapes: Mapping):
    """The float dtype n computes in, if n may join a fused group; else None."""
    arity = len(n.inputs) if n.op == "Sum" and len(n.inputs) >= 2 else _ARITY.get(n.op, 1)
    if n.fused or n.domain or n.op not in C_EXPR or n.attrs or n.subs or len(n.outputs) != 1 \
            or not n.outputs[0] or len(n.inputs) != arity \
            or not all(n.inputs) or n.outputs[0] not in shapes:
        return None
    dts = [shapes[v][1] if v in shapes else None for v in n.inputs]
    if any(d is None for d in dts):
        return None
    out = shapes[n.outputs[0]][1]
    if n.op in _COMPARE:
        ok = out == _BOOL and dts[0] == dts[1] and dts[0] in _FLOATS
        return dts[0] if ok else None
    if n.op == "Where":
        ok = dts[0] == _BOOL and dts[1] == dts[2] == out and out in _FLOATS
        return out if ok else None
    return out if out in _FLOATS and all(d == out for d in dts) else None


class FusedElementwise:
    """The kernel of a fused group: `members` (fn, attrs, inputs, output) in order, reading
    `leaves` (the group's inputs) and giving `outputs` (its last member's value first, then
    the values of other members that nodes outside the group read, or that are kept)."""

    def __init__(self, members: list[tuple], leaves: list[str], outputs: list[str],
                 ops: list[str]):
        self.members, self.leaves, self.outputs, self.ops = members, leaves, outputs, ops
        self.in_params, self.out_params, self.body = kernel_source(members, leaves, outputs,
                                                                   ops)
        digest = hashlib.sha1((self.in_params + self.out_params + self.body).encode())
        self.name = "onnx_trainer_ew_" + digest.hexdigest()[:12]
        self._kernel = GeneratedKernel(
            "ElementwiseKernel", (self.in_params, self.out_params, self.body, self.name),
            f"fused elementwise kernel {self.name} ({' -> '.join(ops)})",
            "its nodes run one by one")

    @property
    def error(self) -> str | None:
        """Why the kernel failed (its nodes then run one by one), or None."""
        return self._kernel.error

    def kernel(self, xp):
        """The cupy.ElementwiseKernel on xp, or None (no such API, or it failed before)."""
        return self._kernel.get(xp)

    def _failed(self, exc: Exception) -> None:
        self._kernel.failed(exc)

    def unfused(self, xp, *args) -> tuple:
        env = dict(zip(self.leaves, args, strict=True))
        for fn, attrs, ins, out in self.members:
            env[out] = fn(xp, *[env[i] for i in ins], **attrs)[0]
        return tuple(env[o] for o in self.outputs)

    def __call__(self, xp, *args) -> tuple:
        k = self.kernel(xp)
        if k is not None:
            try:
                got = k(*args)
                return got if isinstance(got, tuple) else (got,)
            except Exception as exc:  # noqa: BLE001 - the nodes then run one by one
                self._failed(exc)
        return self.unfused(xp, *args)

    def out_impl(self, xp):
        """(impl(*leaves, out), arity) writing a one-output group into a planned buffer where
        the kernel runs; None otherwise."""
        if getattr(xp, "ElementwiseKernel", None) is None or len(self.outputs) != 1:
            return None

        def into(*args):
            *ins, out = args
            k = self.kernel(xp)
            if k is not None:
                try:
                    k(*ins, out)
                    return out
                except Exception as exc:  # noqa: BLE001 - see __call__
                    self._failed(exc)
            xp.copyto(out, self.unfused(xp, *ins)[0])
            return out
        return into, len(self.leaves)


def kernel_source(members: list[tuple], leaves: list[str], outputs: list[str],
                  ops: list[str]) -> tuple[str, str, str]:
    """(in_params, out_params, body) of the group's cupy.ElementwiseKernel: leaf i is `x<i>`
    (type T, or bool), member k's value the local `v<k>`, output j `y<j>`."""
    names = {leaf: f"x{i}" for i, leaf in enumerate(leaves)}
    kinds: dict[str, str] = {}
    lines = []
    for k, ((_, _, ins, out), op) in enumerate(zip(members, ops, strict=True)):
        operands = [names[v] for v in ins]
        if op == "Where":
            kinds[ins[0]] = "bool"
            expr = C_EXPR[op].format(c=operands[0], a=operands[1], b=operands[2])
        elif op == "Sum":
            expr = operands[0]
            for v in operands[1:]:
                expr = f"({expr} + {v})"
        else:
            expr = C_EXPR[op].format(a=operands[0], b=operands[1] if len(operands) > 1 else "")
        kind = "bool" if op in _COMPARE else "T"
        kinds[out] = kind
        names[out] = f"v{k}"
        lines.append(f"{kind} v{k} = {expr};")
    lines += [f"y{j} = {names[o]};" for j, o in enumerate(outputs)]
    in_params = ", ".join(f"{kinds.get(leaf, 'T')} x{i}" for i, leaf in enumerate(leaves))
    out_params = ", ".join(f"{kinds[o]} y{j}" for j, o in enumerate(outputs))
    return in_params, out_params, "\n".join(lines)


def fuse_elementwise(nodes: list[PNode], shapes: Mapping, keep: set[str]) -> list[PNode]:
    """Nodes with each group of at least MIN_NODES chained elementwise nodes (one float type)
    replaced by one FusedElementwise node at its last member's place. A value of the group
    that other nodes read, or that is kept, is one of its outputs, if it has the last member's
    shape (the kernel's outputs all have the broadcast shape) and every reader outside the
    group comes after that place."""
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for v in dict.fromkeys(n.inputs):
            if v:
                readers.setdefault(v, []).append(i)
    producer = {o: i for i, n in enumerate(nodes) for o in n.outputs if o}
    ftype = [_float_type(n, shapes) for n in nodes]
    group: dict[int, list[int]] = {}  # node index -> its group (members, in order)

    def fits(members: list[int], root: int) -> bool:
        """Whether every value of `members` other than root's that is read outside them (or
        kept) can be an output of the group placed at root."""
        inside = set(members)
        shape = shapes[nodes[root].outputs[0]][0]
        for m in members:
            v = nodes[m].outputs[0]
            outside = [r for r in readers.get(v, ()) if r not in inside]
            if m != root and (outside or v in keep):
                if shapes[v][0] != shape or any(r < root for r in outside):
                    return False
        return True

    for i, n in enumerate(nodes):
        if ftype[i] is None:
            continue
        members = [i]
        for v in dict.fromkeys(n.inputs):
            j = producer.get(v)
            if j is None or j not in group or group[j][-1] != j or ftype[j] != ftype[i] \
                    or j in members:
                continue
            merged = sorted(members + group[j])
            if fits(merged, i):
                members = merged
        for m in members:
            group[m] = members
    roots = {g[-1]: g for g in group.values() if len(g) >= MIN_NODES}
    absorbed = {m for g in roots.values() for m in g[:-1]}
    out = []
    for i, n in enumerate(nodes):
        if i in absorbed:
            continue
        g = roots.get(i)
        if g is None:
            out.append(n)
            continue
        parts = [nodes[m] for m in g]
        made = {p.outputs[0] for p in parts}
        inside = set(g)
        leaves = list(dict.fromkeys(v for p in parts for v in p.inputs if v not in made))
        extra = [p.outputs[0] for p in parts[:-1]
                 if p.outputs[0] in keep or any(r not in inside
                                                for r in readers.get(p.outputs[0], ()))]
        outputs = [n.outputs[0], *extra]
        kernel = FusedElementwise([(p.fn, p.attrs, list(p.inputs), p.outputs[0]) for p in parts],
                                  leaves, outputs, [p.op for p in parts])
        out.append(PNode("FusedElementwise", leaves, outputs, {}, f"{n.name}/fused", kernel,
                         fused=True,
                         info={"replaces": [p.name for p in parts], "ops": kernel.ops,
                               "out_impl": kernel.out_impl, "kernel": kernel}))
    return out
