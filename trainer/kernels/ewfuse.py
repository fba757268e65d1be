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
import math
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
# On the host (NumPy), a group runs as one compiled loop (numba, trainer.kernels.compiled) only
# where that loop computes the nodes' own values: ops whose float results IEEE arithmetic rounds
# exactly (+, -, *, /, sqrt, negation, abs, selection, comparison), and the float32 Erf through
# the float64 rational steps of its NumPy kernel (erf_rational). Exp, Log, Tanh and Sigmoid stay
# out: NumPy's SIMD and numba's libm forms of them may round differently.
HOST_EXPR = {
    "Add": "({a} + {b})", "Sub": "({a} - {b})", "Mul": "({a} * {b})", "Div": "({a} / {b})",
    "Neg": "(-{a})", "Abs": "abs({a})", "Sqrt": "np.sqrt({a})", "Erf": "_erf32({a})",
    "Where": "({a} if {c} else {b})", "Greater": "({a} > {b})", "Less": "({a} < {b})",
    "GreaterOrEqual": "({a} >= {b})", "LessOrEqual": "({a} <= {b})", "Equal": "({a} == {b})",
    "Sum": None,
}
# A host group is fused where its tensors have at least this many elements: below, the NumPy
# calls it saves cost less than the group's first compilation (a few tenths of a second, once
# per process where numba's disk cache cannot be written).
HOST_MIN_ELEMENTS = 1 << 16
_ARITY = {"Where": 3, **{op: 2 for op in ("Add", "Sub", "Mul", "Div", "Greater", "Less",
                                         "GreaterOrEqual", "LessOrEqual", "Equal")}}
_COMPARE = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_BOOL = np.dtype(np.bool_)
MIN_NODES = 2  # a group of one node is left as it is


def _float_type(n: PNode, shapes: Mapping, host: bool = False):
    """The float dtype n computes in, if n may join a fused group; else None. On the host,
    only HOST_EXPR's ops, on inputs of the output's shape or of one element (the loop reads
    them at the output's flat index, or their one value), HOST_MIN_ELEMENTS or more."""
    arity = len(n.inputs) if n.op == "Sum" and len(n.inputs) >= 2 else _ARITY.get(n.op, 1)
    table = HOST_EXPR if host else C_EXPR
    if n.fused or n.domain or n.op not in table or n.attrs or n.subs or len(n.outputs) != 1 \
            or not n.outputs[0] or len(n.inputs) != arity \
            or not all(n.inputs) or n.outputs[0] not in shapes:
        return None
    dts = [shapes[v][1] if v in shapes else None for v in n.inputs]
    if any(d is None for d in dts):
        return None
    out = shapes[n.outputs[0]][1]
    if host:
        shape = tuple(shapes[n.outputs[0]][0])
        if math.prod(shape) < HOST_MIN_ELEMENTS or any(
                tuple(shapes[v][0]) != shape and math.prod(shapes[v][0]) != 1
                for v in n.inputs):
            return None
        if n.op == "Erf" and out != np.float32:  # (float64's Erf is another algorithm)
            return None
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


class HostFusedElementwise(FusedElementwise):
    """A host group as one compiled loop over the flat elements (HOST_EXPR's ops): leaf i is
    read at the element's index, or once where `scalar[i]` (one element); the outputs have
    `shape`. Where numba is missing or switched off, or the loop fails to build, the nodes run
    one after the other (the same values: see HOST_EXPR)."""

    def __init__(self, members: list[tuple], leaves: list[str], outputs: list[str],
                 ops: list[str], scalar: list[bool], shape: tuple, out_dtypes: list):
        self.members, self.leaves, self.outputs, self.ops = members, leaves, outputs, ops
        self.shape, self.out_dtypes = tuple(shape), list(out_dtypes)
        self.source = host_source(members, leaves, outputs, ops, scalar)
        self.name = "onnx_trainer_ew_" + hashlib.sha1(self.source.encode()).hexdigest()[:16]
        self._fn, self._error = None, None
        self._bufs, self.reuse = None, [False] * len(outputs)

    @property
    def error(self) -> str | None:
        return self._error

    def kernel(self, xp):
        """The compiled loop, or None (a device, numba off or missing, or it failed)."""
        from trainer.kernels import compiled

        if xp is not np or self._error is not None or not compiled.enabled():
            return None
        if self._fn is None:
            try:
                self._fn = compiled.generated(self.name, self.source)
            except Exception as exc:  # noqa: BLE001 - the nodes then run one by one
                self._failed(exc)
                return None
        return self._fn

    def _failed(self, exc: Exception) -> None:
        self._error = f"{type(exc).__name__}: {exc}"

    def _run(self, xp, args, outs) -> bool:
        fn = self.kernel(xp)
        if fn is None:
            return False
        flat = [np.ascontiguousarray(a).reshape(-1) for a in args]
        try:
            fn(outs[0].size, *flat, *[o.reshape(-1) for o in outs])
        except Exception as exc:  # noqa: BLE001 - (numba compiles at the first call)
            self._failed(exc)
            return False
        return True

    def __call__(self, xp, *args) -> tuple:
        # (a group of several outputs, which the memory plan does not place: its own buffers,
        # reused by every run, as a planned value's are; `reuse` says which outputs may be,
        # the values no caller receives)
        if self._bufs is None:
            self._bufs = [np.empty(self.shape, dt) for dt in self.out_dtypes]
        outs = [b if ok else np.empty(self.shape, b.dtype)
                for b, ok in zip(self._bufs, self.reuse, strict=True)]
        return tuple(outs) if self._run(xp, args, outs) else self.unfused(xp, *args)

    def out_impl(self, xp):
        if xp is not np or len(self.outputs) != 1:
            return None

        def into(*args):
            *ins, out = args
            if not (out.flags.c_contiguous and self._run(xp, ins, [out])):
                np.copyto(out, self.unfused(xp, *ins)[0])
            return out
        return into, len(self.leaves)


def _expressions(members: list[tuple], ops: list[str], names: dict[str, str], table: dict):
    """Per member k, in order: (its value's name, (its inputs, its op), its expression in
    `table`'s language over `names`), naming the value `v<k>` in `names` as it goes."""
    for k, ((_, _, ins, out), op) in enumerate(zip(members, ops, strict=True)):
        operands = [names[v] for v in ins]
        if op == "Where":
            expr = table[op].format(c=operands[0], a=operands[1], b=operands[2])
        elif op == "Sum":
            expr = operands[0]
            for v in operands[1:]:
                expr = f"({expr} + {v})"
        else:
            expr = table[op].format(a=operands[0], b=operands[1] if len(operands) > 1 else "")
        names[out] = f"v{k}"
        yield out, (ins, op), expr


def host_source(members: list[tuple], leaves: list[str], outputs: list[str], ops: list[str],
                scalar: list[bool]) -> str:
    """Python source of the host group's loop `run(n, a0.., o0..)` over flat arrays, for numba
    (compiled with NumPy's error model, no fastmath: each operation as NumPy rounds it), with
    its float32 Erf helper (erf_rational's float64 steps; the coefficients written in)."""
    from trainer.kernels.elementwise import _ERF_P, _ERF_Q

    names = {leaf: f"x{i}" for i, leaf in enumerate(leaves)}
    head = [f"x{i} = a{i}[0]" for i in range(len(leaves)) if scalar[i]]
    body = [f"x{i} = a{i}[i]" for i in range(len(leaves)) if not scalar[i]]
    for k, (_, _, expr) in enumerate(_expressions(members, ops, names, HOST_EXPR)):
        body.append(f"v{k} = {expr}")
    body += [f"o{j}[i] = {names[o]}" for j, o in enumerate(outputs)]
    params = ", ".join([f"a{i}" for i in range(len(leaves))]
                       + [f"o{j}" for j in range(len(outputs))])
    p = [repr(float(c)) for c in _ERF_P]
    q = [repr(float(c)) for c in _ERF_Q]
    erf = [
        "@JIT", "def _erf32(x):",
        "    v = np.float64(x)",
        "    v = -4.0 if v < -4.0 else (4.0 if v > 4.0 else v)",
        "    u = v * v",
        f"    num = (((((({p[6]} * u + {p[5]}) * u + {p[4]}) * u + {p[3]}) * u + {p[2]}) * u"
        f" + {p[1]}) * u + {p[0]}) * v",
        f"    den = ((((u * {q[5]} + {q[4]}) * u + {q[3]}) * u + {q[2]}) * u + {q[1]}) * u"
        f" + {q[0]}",
        "    return np.float32(num / den)", ""] if "Erf" in ops else []
    loop = ["@JIT", f"def run(n, {params}):", *(f"    {ln}" for ln in head),
            "    for i in range(n):", *(f"        {ln}" for ln in body)]
    return "\n".join(erf + loop) + "\n"


def kernel_source(members: list[tuple], leaves: list[str], outputs: list[str],
                  ops: list[str]) -> tuple[str, str, str]:
    """(in_params, out_params, body) of the group's cupy.ElementwiseKernel: leaf i is `x<i>`
    (type T, or bool), member k's value the local `v<k>`, output j `y<j>`."""
    names = {leaf: f"x{i}" for i, leaf in enumerate(leaves)}
    kinds: dict[str, str] = {}
    lines = []
    for k, (out, (ins, op), expr) in enumerate(_expressions(members, ops, names, C_EXPR)):
        if op == "Where":
            kinds[ins[0]] = "bool"
        kind = "bool" if op in _COMPARE else "T"
        kinds[out] = kind
        lines.append(f"{kind} v{k} = {expr};")
    lines += [f"y{j} = {names[o]};" for j, o in enumerate(outputs)]
    in_params = ", ".join(f"{kinds.get(leaf, 'T')} x{i}" for i, leaf in enumerate(leaves))
    out_params = ", ".join(f"{kinds[o]} y{j}" for j, o in enumerate(outputs))
    return in_params, out_params, "\n".join(lines)


def fuse_elementwise(nodes: list[PNode], shapes: Mapping, keep: set[str], host: bool = False
                     ) -> list[PNode]:
    """Nodes with each group of at least MIN_NODES chained elementwise nodes (one float type)
    replaced by one FusedElementwise node at its last member's place (`host`: one
    HostFusedElementwise, of HOST_EXPR's ops). A value of the group
    that other nodes read, or that is kept, is one of its outputs, if it has the last member's
    shape (the kernel's outputs all have the broadcast shape) and every reader outside the
    group comes after that place."""
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for v in dict.fromkeys(n.inputs):
            if v:
                readers.setdefault(v, []).append(i)
    producer = {o: i for i, n in enumerate(nodes) for o in n.outputs if o}
    ftype = [_float_type(n, shapes, host) for n in nodes]
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
        members = [(p.fn, p.attrs, list(p.inputs), p.outputs[0]) for p in parts]
        if host:
            shape = tuple(shapes[n.outputs[0]][0])
            kernel = HostFusedElementwise(
                members, leaves, outputs, [p.op for p in parts],
                [tuple(shapes[v][0]) != shape for v in leaves], shape,
                [shapes[o][1] for o in outputs])
            kernel.reuse = [o not in keep for o in outputs]
        else:
            kernel = FusedElementwise(members, leaves, outputs, [p.op for p in parts])
        out.append(PNode("FusedElementwise", leaves, outputs, {}, f"{n.name}/fused", kernel,
                         fused=True,
                         info={"replaces": [p.name for p in parts], "ops": kernel.ops,
                               "out_impl": kernel.out_impl, "kernel": kernel}))
    return out
