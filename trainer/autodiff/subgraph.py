"""Subgraphs made plain for autodiff: If/Loop/Scan/SequenceMap whose control is known when the
training graph is built, and sequences of known structure, lowered into tensor nodes (`lower`);
and `Region`, the recomputed forward and backward of a node's subgraphs, for control-flow rules.
"""

# Why unrolling: the training graph is specialized to static shapes, so Scan lengths, most Loop
# trip counts (constants, or computed from shapes) and If conditions on shapes are known when it
# is built. Unrolled, every iteration is plain nodes: outer-scope reads become ordinary edges,
# iteration-dependent shapes and indices are constants, loop-carried sequences are lists of
# tensor names, and the existing rules differentiate it. Lowered sequence ops become Split /
# Concat / Identity, so fan-in of gradients is the engine's ordinary Sum of tensors.

from __future__ import annotations

import copy
import inspect
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.errors import ModelError
from trainer.executor import outer_names, subgraphs
from trainer.graph import (
    _SHAPED_BY_FIRST,
    _SIZE_INPUTS,
    DATA_SIZED,
    FLOAT_TYPES,
    NameScope,
    all_names,
    attrs_of,
    elem_type,
    is_float_dtype,
    node_name,
    tensor_value,
)

# Ops never folded or dropped as dead code: each run draws new values.
RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
          "Multinomial", "Dropout"}
CONTROL = {"If", "Loop", "Scan", "SequenceMap"}
SEQUENCE = {"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase",
            "SequenceAt", "SequenceLength", "SplitToSequence", "ConcatFromSequence",
            "OptionalHasElement", "OptionalGetElement"}
_FOLD_LIMIT = 1 << 16  # elements: folding is for shapes, indices, conditions
MAX_UNROLLED_NODES = 1 << 17  # body nodes per Loop/Scan (the backward adds ~2x more)


def implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names the node's subgraphs read, sorted (as the executor orders them)."""
    captured: set[str] = set()
    for _, graphs in subgraphs(node):
        for g in graphs:
            captured |= outer_names(g)
    return sorted(captured)


def input_slots(node: onnx.NodeProto) -> list[tuple[int, str]]:
    """(slot, name) of a node's differentiable inputs: its declared explicit slots, then the
    outer-scope tensors its subgraphs read as slots len(node.input) + j (none for NO_GRADIENT
    ops): what the engine should iterate to route gradients to implicit inputs."""
    from trainer.autodiff.registry import NO_GRADIENT, differentiable_inputs

    out = [(i, node.input[i])
           for i in differentiable_inputs(node.op_type, len(node.input), node.domain)]
    if node.op_type not in NO_GRADIENT and subgraphs(node):
        out += [(len(node.input) + j, x) for j, x in enumerate(implicit_inputs(node))]
    return out


def n_slots(node: onnx.NodeProto) -> int:
    """Explicit plus implicit input slots (the length of a rule's GI list)."""
    return len(node.input) + (len(implicit_inputs(node)) if subgraphs(node) else 0)


def reads(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs, then implicit ones."""
    return [*node.input, *implicit_inputs(node)]


def deep_names(graph: onnx.GraphProto) -> set[str]:
    """Every name of the graph and of its subgraphs (fresh names must avoid all of them)."""
    names = all_names(graph)
    for node in graph.node:
        for _, graphs in subgraphs(node):
            for g in graphs:
                names |= deep_names(g)
    return names


def _opsets_of(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if i.domain == "ai.onnx" else i.domain): i.version for i in model.opset_import}


def _rename_outer(graph: onnx.GraphProto, resolve: Callable[[str], str],
                  bound: frozenset = frozenset()) -> None:
    """Rename, in place, the names a subgraph reads from outside it."""
    defined = set(bound) | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name and name not in defined:
                node.input[k] = resolve(name)
        for _, graphs in subgraphs(node):
            for g in graphs:
                _rename_outer(g, resolve, frozenset(defined))
    for v in graph.output:
        if v.name not in defined:
            v.name = resolve(v.name)


def constants_of(graph: onnx.GraphProto, bound: Mapping[str, str]) -> list[onnx.NodeProto]:
    """A subgraph's initializers (those not overridden by a bound input) as Constant nodes."""
    return [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer
            if t.name not in bound]


def _data_controlled(node: onnx.NodeProto, known: Mapping) -> bool:
    """Control flow or sequence work left in the graph whose output shapes may follow the
    data: an If on a condition not `known` whose branches do not declare one static shape per
    output, a Loop, sequence ops (a Scan's shapes follow its inputs')."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return False
    if op == "If":
        if node.input[0] in known:
            return False
        a = {at.name: at.g for at in node.attribute}
        shapes = [[_static_dims(v) for v in a[b].output] for b in ("then_branch", "else_branch")
                  if b in a]
        return not (len(shapes) == 2 and shapes[0] == shapes[1]
                    and all(d is not None for d in shapes[0]))
    # (a Loop left in the graph: its condition follows the data, or it is too long to unroll)
    return op in ("Loop", "SequenceMap") or op in SEQUENCE


def _static_dims(v: onnx.ValueInfoProto) -> tuple | None:
    t = v.type.tensor_type
    if not v.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if None in dims else tuple(dims)


class Folder:
    """Host values known before running: Constant nodes, given values, static shapes, and what
    deterministic default-domain kernels compute from them (as build._constant_values)."""

    def __init__(self, opsets: Mapping[str, int], shapes: Mapping, values: Mapping | None = None):
        self.opsets = opsets
        self.shapes = shapes
        self.values: dict[str, np.ndarray] = dict(values or {})
        # values whose shape may follow the data (graph.data_sized, and the outputs of control
        # flow the data decides): their Shape and Size are not the probe's, so not folded (a
        # Size of an If output that skips padding tokens unrolled a Loop for the probe's batch:
        # a wrong forward for every other batch)
        self.sized: set[str] = set()

    def get(self, name: str) -> np.ndarray | None:
        return self.values.get(name) if name else None

    def _mark_sized(self, node: onnx.NodeProto) -> None:
        op, std = node.op_type, node.domain in ("", "ai.onnx")
        if std and op in ("Shape", "Size"):
            return
        ins = [i for i in node.input if i]
        shaping = node.input[:1] if std and op in _SHAPED_BY_FIRST else ins
        by_values = std and any(k < len(node.input) and node.input[k]
                                and node.input[k] not in self.values
                                for k in _SIZE_INPUTS.get(op, ()))
        if (std and op in DATA_SIZED) or by_values or any(i in self.sized for i in shaping) \
                or _data_controlled(node, self.values):
            self.sized.update(o for o in node.output if o)

    def add(self, node: onnx.NodeProto) -> None:
        from trainer.kernels import get_kernel

        self._mark_sized(node)
        if node.op_type == "Constant":
            a = attrs_of(node)
            for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                if key in a:
                    self.values[node.output[0]] = np.asarray(a[key])
            return
        if node.op_type in ("Shape", "Size") and node.input[0] in self.shapes \
                and node.input[0] not in self.sized:
            a = attrs_of(node)
            dims = np.array(self.shapes[node.input[0]][0], np.int64)
            self.values[node.output[0]] = (dims[a.get("start", 0):a.get("end")]
                                           if node.op_type == "Shape" else np.array(dims.prod()))
            return
        if (node.op_type in RANDOM or node.domain not in ("", "ai.onnx")
                or not all(i in self.values for i in node.input if i) or subgraphs(node)):
            return
        a = attrs_of(node)
        fn = get_kernel(node.op_type, self.opsets.get("", 0), "")
        if fn is None:
            return
        params = inspect.signature(fn).parameters
        if "rng" in params:
            return
        if "n_outputs" in params:
            a["n_outputs"] = len(node.output)
        try:
            outs = fn(np, *[self.values[i] if i else None for i in node.input], **a)
        except Exception:  # noqa: BLE001 - left unfolded; the run reports real failures
            return
        for o, v in zip(node.output, outs, strict=False):
            if o and isinstance(v, np.ndarray | np.generic) and np.size(v) <= _FOLD_LIMIT:
                self.values[o] = np.asarray(v)


class Lowering:
    """One pass over a node list: static If inlined, static Loop/Scan/SequenceMap unrolled,
    sequences of known structure replaced by their tensors. Nodes it cannot lower stay (with
    the reason in `why`); `changed` says whether anything was lowered."""

    def __init__(self, opsets: Mapping[str, int], scope: NameScope, shapes: Mapping,
                 values: Mapping | None = None):
        self.opset = opsets.get("", 0)
        self.scope = scope
        self.shapes = shapes
        self.fold = Folder(opsets, shapes, values)
        self.seqs: dict[str, list[str]] = {}  # sequence value -> its tensors
        self.seq_types: dict[str, int] = {}  # sequence value -> element type, when known
        self.optionals: dict[str, str] = {}  # optional value -> its tensor ("" when empty)
        self.out: list[onnx.NodeProto] = []
        self.mine: list[bool] = []  # out[k] was made by the lowering (dead-code removable)
        self.changed = False
        self.why: dict[str, str] = {}
        self._consts: dict[tuple, tuple[str, int]] = {}

    # -- emitting -------------------------------------------------------------------------------
    def emit(self, node: onnx.NodeProto, mine: bool = True) -> None:
        self.out.append(node)
        self.mine.append(mine)
        self.fold.add(node)

    def node(self, op: str, inputs: list[str], outputs: list[str], base: str, **attrs) -> None:
        name = self.scope.fresh(f"{outputs[0]}/{op}")  # (outputs are fresh: no search)
        self.emit(helper.make_node(op, inputs, outputs, name=name,
                                   **{k: v for k, v in attrs.items() if v is not None}))

    def tmp(self, base: str) -> str:
        return self.scope.fresh(base)

    def const(self, value, dtype, base: str) -> str:
        arr = np.asarray(value, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.tmp(f"{base}/const{len(self._consts)}")
            self.node("Constant", [], [name], base, value=numpy_helper.from_array(arr, name))
            self._consts[key] = (name, len(self.out) - 1)
        return self._consts[key][0]

    def axes_op(self, op: str, x: str, axes: list[int], out: str, base: str) -> None:
        """Squeeze/Unsqueeze (axes an input from opset 13)."""
        if self.opset >= 13:
            self.node(op, [x, self.const(axes, np.int64, base)], [out], base)
        else:
            self.node(op, [x], [out], base, axes=axes)

    def split(self, x: str, axis: int, sizes: list[int], base: str) -> list[str]:
        outs = [self.tmp(f"{base}/part{k}") for k in range(len(sizes))]
        if self.opset >= 13:
            self.node("Split", [x, self.const(sizes, np.int64, base)], outs, base, axis=axis)
        else:
            self.node("Split", [x], outs, base, axis=axis, split=sizes)
        return outs

    def slices(self, x: str, axis: int, n: int, base: str) -> list[str]:
        """x split along `axis` into its n slices, the axis removed."""
        parts = self.split(x, axis, [1] * n, base) if n > 1 else [x]
        outs = [self.tmp(f"{base}/slice{k}") for k in range(len(parts))]
        for p, o in zip(parts, outs, strict=True):
            self.axes_op("Squeeze", p, [axis], o, base)
        return outs

    def stack(self, items: list[str], axis: int, out: str, base: str) -> None:
        """Stacked along a new `axis` (negative counts from the back of the result)."""
        if len(items) == 1:
            self.axes_op("Unsqueeze", items[0], [axis], out, base)
            return
        ups = [self.tmp(f"{out}/item{k}") for k in range(len(items))]
        for x, u in zip(items, ups, strict=True):
            self.axes_op("Unsqueeze", x, [axis], u, base)
        self.node("Concat", ups, [out], base, axis=axis)

    def materialize(self, name: str, items: list[str], elem: int | None, base: str) -> None:
        """Define sequence `name` from its tensors (dropped later if nothing reads it)."""
        self.seqs[name] = list(items)
        if elem:
            self.seq_types[name] = elem
        if items:
            self.node("SequenceConstruct", list(items), [name], base)
        else:
            self.node("SequenceEmpty", [], [name], base, dtype=elem or onnx.TensorProto.FLOAT)

    def _mark(self) -> tuple:
        return len(self.out), self.changed, dict(self.why)

    def _rollback(self, mark: tuple) -> None:
        n, self.changed, self.why = mark
        del self.out[n:], self.mine[n:]
        self._consts = {k: v for k, v in self._consts.items() if v[1] < n}

    # -- names ----------------------------------------------------------------------------------
    @staticmethod
    def name(x: str, env: ChainMap) -> str:
        return env.get(x, x) if x else ""

    def define(self, x: str, env: ChainMap, prefix: str | None) -> str:
        """A name a node defines: kept at the top level, fresh inside a copy."""
        if not x or prefix is None:
            return x
        fresh = self.tmp(f"{prefix}/{x}")
        env.maps[0][x] = fresh
        return fresh

    def bind(self, x: str, src: str, env: ChainMap, prefix: str | None, base: str) -> None:
        """Make output x hold value src (a copy maps the name; the top level emits Identity)."""
        if not x:
            return
        if prefix is not None:
            env.maps[0][x] = src
        elif src in self.seqs:
            self.materialize(x, self.seqs[src], self.seq_types.get(src), base)
        else:
            self.node("Identity", [src], [x], base)

    def elem_type(self, x: str) -> int | None:
        if x in self.shapes:
            return elem_type(self.shapes[x][1])
        return self.seq_types.get(x)

    # -- the walk -------------------------------------------------------------------------------
    def visit_all(self, nodes: Iterable[onnx.NodeProto], env: ChainMap,
                  prefix: str | None) -> None:
        for k, node in enumerate(nodes):
            self.visit(node, env, prefix, node_name(node, k))

    def visit(self, node: onnx.NodeProto, env: ChainMap, prefix: str | None,
              label: str) -> None:
        ins = [self.name(i, env) for i in node.input]
        base = f"{prefix}/{label}" if prefix else label
        handler = (getattr(self, f"_{node.op_type}", None)
                   if node.domain in ("", "ai.onnx") else None)
        if handler is not None:
            mark = self._mark()
            try:
                done = handler(node, ins, env, prefix, base)
            except _Stuck as why:
                self._rollback(mark)
                self.why[base] = str(why)
                done = False
            if done:
                self.changed = True
                return
        outs = [self.define(o, env, prefix) for o in node.output]
        new = copy.deepcopy(node)
        del new.input[:], new.output[:]
        new.input.extend(ins)
        new.output.extend(outs)
        if prefix is not None:
            new.name = self.tmp(base)
            for _, graphs in subgraphs(new):
                for g in graphs:
                    _rename_outer(g, lambda x: self.name(x, env))
        plumbing = node.op_type in ("SequenceConstruct", "SequenceEmpty", "Identity")
        self.emit(new, mine=prefix is not None or plumbing)
        if node.op_type == "SequenceEmpty":
            self.seqs[outs[0]] = []
            self.seq_types[outs[0]] = attrs_of(node).get("dtype", onnx.TensorProto.FLOAT)
        elif node.op_type == "SequenceConstruct":
            self.seqs[outs[0]] = ins
            if ins and self.elem_type(ins[0]):
                self.seq_types[outs[0]] = self.elem_type(ins[0])
        elif node.op_type == "Identity" and ins[0] in self.seqs:
            self.seqs[outs[0]] = self.seqs[ins[0]]
        elif node.op_type == "Optional":
            self.optionals[outs[0]] = ins[0] if ins else ""

    def run_body(self, graph: onnx.GraphProto, bound: list[str], env: ChainMap, base: str
                 ) -> list[str]:
        """One copy of a body with its inputs bound to names; returns its output names."""
        sub = env.new_child({v.name: b for v, b in zip(graph.input, bound, strict=False)})
        for node in constants_of(graph, sub.maps[0]):
            self.visit(node, sub, base, "init")
        self.visit_all(graph.node, sub, base)
        return [self.name(v.name, sub) for v in graph.output]

    def static(self, x: str, what: str) -> np.ndarray:
        value = self.fold.get(x)
        if value is None:
            raise _Stuck(f"its {what} is computed from data")
        return value

    def _budget(self, trips: int, body: onnx.GraphProto) -> None:
        if trips * max(len(body.node), 1) > MAX_UNROLLED_NODES:
            raise _Stuck(f"unrolling {trips} iterations of {len(body.node)} nodes is too large "
                         f"(limit {MAX_UNROLLED_NODES} nodes)")

    # -- control flow ---------------------------------------------------------------------------
    def _If(self, node, ins, env, prefix, base) -> bool:
        cond = bool(self.static(ins[0], "condition").reshape(()))
        a = {at.name: at.g for at in node.attribute}
        branch = a["then_branch" if cond else "else_branch"]
        outs = self.run_body(branch, [], env, f"{base}/{'then' if cond else 'else'}")
        for o, src in zip(node.output, outs, strict=False):
            self.bind(o, src, env, prefix, base)
        return True

    def _Loop(self, node, ins, env, prefix, base) -> bool:
        ins = ins + [""] * (2 - len(ins))
        trips = int(self.static(ins[0], "trip count").reshape(())) if ins[0] else None
        keep_going = bool(self.static(ins[1], "condition").reshape(())) if ins[1] else True
        body = next(at.g for at in node.attribute if at.name == "body")
        n = len(ins) - 2
        state = ins[2:]
        cond = ins[1] or self.const(True, np.bool_, base)
        scans: list[list[str]] = [[] for _ in body.output[1 + n:]]
        i = 0
        while (trips is None or i < trips) and keep_going:
            self._budget(i + 1, body)  # (exporters write while loops as M = INT64_MAX)
            it = self.const(np.int64(i), np.int64, base)
            outs = self.run_body(body, [it, cond, *state], env, f"{base}/it{i}")
            cond = outs[0]
            keep_going = bool(self.static(cond, "loop condition").reshape(()))
            state = outs[1:1 + n]
            for acc, y in zip(scans, outs[1 + n:], strict=True):
                acc.append(y)
            i += 1
        for o, s in zip(node.output[:n], state, strict=False):
            self.bind(o, s, env, prefix, base)
        for o, acc in zip(node.output[n:], scans, strict=False):
            self.stacked(o, acc, 0, env, prefix, base)
        return True

    def stacked(self, o: str, items: list[str], axis: int, env, prefix, base) -> None:
        """Scan output o: the items stacked along axis (an empty stack needs o's probed shape)."""
        if not o:
            return
        if not items:
            if o not in self.shapes:
                raise _Stuck("it runs no iteration and its output shapes are unknown")
            shape, dt = self.shapes[o]
            self.bind(o, self.const(np.zeros(shape, dt), dt, base), env, prefix, base)
            return
        self.stack(items, axis, self.define(o, env, prefix), base)

    def _Scan(self, node, ins, env, prefix, base) -> bool:
        if self.opset < 9:
            return self._scan8(node, ins, env, prefix, base)
        a = attrs_of(node)
        body = next(at.g for at in node.attribute if at.name == "body")
        m = a["num_scan_inputs"]
        n = len(ins) - m
        in_axes = a.get("scan_input_axes") or [0] * m
        in_dirs = a.get("scan_input_directions") or [0] * m
        k = len(body.output) - n
        out_axes = a.get("scan_output_axes") or [0] * k
        out_dirs = a.get("scan_output_directions") or [0] * k
        xs = ins[n:]
        shapes = [self.shapes.get(x) for x in xs]
        if any(s is None for s in shapes):
            raise _Stuck("the shapes of its scan inputs are not known yet")
        axes = [ax % len(s[0]) for ax, s in zip(in_axes, shapes, strict=True)]
        steps = {s[0][ax] for s, ax in zip(shapes, axes, strict=True)}
        if len(steps) != 1 or 0 in steps:
            raise _Stuck("its scan inputs are empty or of different lengths")
        t_len = steps.pop()
        self._budget(t_len, body)
        per = [self.slices(x, ax, t_len, base) for x, ax in zip(xs, axes, strict=True)]
        per = [p[::-1] if d else p for p, d in zip(per, in_dirs, strict=True)]
        state = ins[:n]
        ys: list[list[str]] = [[] for _ in range(k)]
        for t in range(t_len):
            outs = self.run_body(body, [*state, *[p[t] for p in per]], env, f"{base}/it{t}")
            state = outs[:n]
            for acc, y in zip(ys, outs[n:], strict=True):
                acc.append(y)
        for o, s in zip(node.output[:n], state, strict=False):
            self.bind(o, s, env, prefix, base)
        for o, acc, ax, d in zip(node.output[n:], ys, out_axes, out_dirs, strict=False):
            if ax < 0 and self.opset < 11:
                if o not in self.shapes:
                    raise _Stuck("a negative scan output axis needs the output's rank")
                ax %= len(self.shapes[o][0])
            self.stacked(o, acc[::-1] if d else acc, ax, env, prefix, base)
        return True

    def _scan8(self, node, ins, env, prefix, base) -> bool:
        """Scan-8: axis 0 is the batch, axis 1 the sequence; sequence_lens must be static."""
        a = attrs_of(node)
        body = next(at.g for at in node.attribute if at.name == "body")
        m = a["num_scan_inputs"]
        lens_in, args = ins[0], ins[1:]
        n = len(args) - m
        dirs = a.get("directions") or [0] * m
        xs = args[n:]
        if any(x not in self.shapes for x in [*xs, *args[:n]]):
            raise _Stuck("the shapes of its inputs are not known yet")
        batch, t_len = self.shapes[xs[0]][0][:2]
        lens = ([t_len] * batch if not lens_in else
                [int(v) for v in self.static(lens_in, "sequence_lens").reshape(-1)])
        self._budget(sum(lens), body)
        states = [self.slices(s, 0, batch, base) for s in args[:n]]
        per_b = [self.slices(x, 0, batch, base) for x in xs]
        k = len(body.output) - n
        finals: list[list[str]] = [[] for _ in range(n)]
        scans: list[list[str]] = [[] for _ in range(k)]
        for b in range(batch):
            steps = [self.slices(p[b], 0, t_len, base) if lens[b] else [] for p in per_b]
            st = [s[b] for s in states]
            ys: list[list[str]] = [[] for _ in range(k)]
            for t in range(lens[b]):
                x_t = [s[t if d == 0 else lens[b] - 1 - t] for s, d in zip(steps, dirs,
                                                                          strict=True)]
                outs = self.run_body(body, [*st, *x_t], env, f"{base}/b{b}/it{t}")
                st = outs[:n]
                for acc, y in zip(ys, outs[n:], strict=True):
                    acc.append(y)
            for acc, s in zip(finals, st, strict=True):
                acc.append(s)
            for j, (acc, items) in enumerate(zip(scans, ys, strict=True)):
                o = node.output[n + j] if n + j < len(node.output) else ""
                pad = t_len - lens[b]
                if pad and o:
                    if o not in self.shapes:
                        raise _Stuck("padding short sequences needs the output shapes")
                    shape, dt = self.shapes[o]
                    items = items + [self.const(np.zeros(shape[2:], dt), dt, base)] * pad
                one = self.tmp(f"{base}/b{b}/y{j}")
                if items:
                    self.stack(items, 0, one, base)
                    acc.append(one)
        for o, acc in zip(node.output[:n], finals, strict=False):
            self.stacked(o, acc, 0, env, prefix, base)
        for o, acc in zip(node.output[n:], scans, strict=False):
            self.stacked(o, acc, 0, env, prefix, base)
        return True

    def _SequenceMap(self, node, ins, env, prefix, base) -> bool:
        body = next(at.g for at in node.attribute if at.name == "body")
        if ins[0] not in self.seqs:
            raise _Stuck("its input sequence is not of known structure")
        count = len(self.seqs[ins[0]])
        extra = []
        for x in ins[1:]:
            if x in self.seqs:
                if len(self.seqs[x]) != count:
                    raise _Stuck("its sequences have different lengths")
                extra.append(self.seqs[x])
            elif x in self.shapes:
                extra.append([x] * count)
            else:
                raise _Stuck("an input sequence is not of known structure")
        per_out: list[list[str]] = [[] for _ in body.output]
        for i in range(count):
            bound = [self.seqs[ins[0]][i], *[e[i] for e in extra]]
            outs = self.run_body(body, bound, env, f"{base}/it{i}")
            if any(y in self.seqs for y in outs):
                raise _Stuck("its body returns sequences")
            for acc, y in zip(per_out, outs, strict=True):
                acc.append(y)
        for o, items, v in zip(node.output, per_out, body.output, strict=False):
            if o:
                target = self.define(o, env, prefix)
                self.materialize(target, items, v.type.tensor_type.elem_type or None, base)
        return True

    # -- sequences ------------------------------------------------------------------------------
    def _seq(self, x: str) -> list[str]:
        if x not in self.seqs:
            raise _Stuck("its sequence input is not of known structure")
        return self.seqs[x]

    def _position(self, x: str, n: int, insert: bool) -> int:
        p = int(self.static(x, "position").reshape(()))
        p = p + n if p < 0 else p
        if not 0 <= p <= (n if insert else n - 1):
            raise _Stuck(f"position {p} is out of range")
        return p

    def _new_seq(self, node, items, env, prefix, base, elem=None) -> bool:
        o = self.define(node.output[0], env, prefix)
        self.materialize(o, items, elem, base)
        return True

    def _SequenceInsert(self, node, ins, env, prefix, base) -> bool:
        items = self._seq(ins[0])
        p = self._position(ins[2], len(items), True) if len(ins) > 2 and ins[2] else len(items)
        return self._new_seq(node, [*items[:p], ins[1], *items[p:]], env, prefix, base,
                             self.elem_type(ins[1]))

    def _SequenceErase(self, node, ins, env, prefix, base) -> bool:
        items = self._seq(ins[0])
        if not items:
            raise _Stuck("it erases from an empty sequence")
        p = self._position(ins[1], len(items), False) if len(ins) > 1 and ins[1] else -1
        return self._new_seq(node, [x for k, x in enumerate(items) if k != p % len(items)],
                             env, prefix, base, self.seq_types.get(ins[0]))

    def _SequenceAt(self, node, ins, env, prefix, base) -> bool:
        items = self._seq(ins[0])
        src = items[self._position(ins[1], len(items), False)]
        self.bind(node.output[0], src, env, prefix, base)
        return True

    def _SequenceLength(self, node, ins, env, prefix, base) -> bool:
        n = self.const(np.int64(len(self._seq(ins[0]))), np.int64, base)
        self.bind(node.output[0], n, env, prefix, base)
        return True

    def _SplitToSequence(self, node, ins, env, prefix, base) -> bool:
        a = attrs_of(node)
        if ins[0] not in self.shapes:
            raise _Stuck("the shape of its input is not known yet")
        shape, dt = self.shapes[ins[0]]
        axis = a.get("axis", 0) % len(shape)
        size = shape[axis]
        if len(ins) < 2 or not ins[1]:
            parts = self.split(ins[0], axis, [1] * size, base) if size > 1 else [ins[0]]
            if not a.get("keepdims", 1):
                parts = [self._squeezed(p, axis, base) for p in parts]
        else:
            split = self.static(ins[1], "split").astype(np.int64)
            if split.ndim == 0:
                step = int(split)
                lengths = [step] * (size // step) + ([size % step] if size % step else [])
            else:
                lengths = [int(v) for v in split]
            parts = self.split(ins[0], axis, lengths, base)
        return self._new_seq(node, parts, env, prefix, base, elem_type(dt))

    def _squeezed(self, x: str, axis: int, base: str) -> str:
        out = self.tmp(f"{x}/item")
        self.axes_op("Squeeze", x, [axis], out, base)
        return out

    def _ConcatFromSequence(self, node, ins, env, prefix, base) -> bool:
        items = self._seq(ins[0])
        if not items:
            raise _Stuck("it concatenates an empty sequence")
        a = attrs_of(node)
        axis = a["axis"]
        o = self.define(node.output[0], env, prefix)
        if a.get("new_axis", 0):
            if axis < 0 and self.opset < 11:
                raise _Stuck("a negative new axis needs opset >= 11")
            self.stack(items, axis, o, base)
        elif len(items) == 1:
            self.node("Identity", items, [o], base)
        else:
            self.node("Concat", items, [o], base, axis=axis)
        return True

    def _OptionalHasElement(self, node, ins, env, prefix, base) -> bool:
        if not ins or ins[0] not in self.optionals:
            raise _Stuck("its optional is not built by an Optional node")
        flag = self.const(bool(self.optionals[ins[0]]), np.bool_, base)
        self.bind(node.output[0], flag, env, prefix, base)
        return True

    def _OptionalGetElement(self, node, ins, env, prefix, base) -> bool:
        if not self.optionals.get(ins[0]):
            raise _Stuck("its optional is not built by an Optional node from a tensor")
        self.bind(node.output[0], self.optionals[ins[0]], env, prefix, base)
        return True

    # -- result ---------------------------------------------------------------------------------
    def finish(self, keep: Iterable[str]) -> list[onnx.NodeProto]:
        """The emitted nodes less those made here that nothing reads (random ones stay)."""
        used = set(keep)
        out = []
        for node, mine in zip(reversed(self.out), reversed(self.mine), strict=True):
            if mine and node.op_type not in RANDOM and not any(o in used for o in node.output):
                continue
            out.append(node)
            used.update(reads(node))
        return out[::-1]


class _Stuck(Exception):
    """A node cannot be lowered (the message says why)."""


def needs_lowering(graph: onnx.GraphProto) -> bool:
    return any(n.op_type in CONTROL | SEQUENCE and n.domain in ("", "ai.onnx")
               for n in graph.node)


def lower(model: onnx.ModelProto, shapes: Mapping[str, tuple], dtypes: Mapping[str, np.dtype],
          values: Mapping[str, np.ndarray] | None = None, *, scope: NameScope | None = None,
          known: Mapping[str, tuple] | None = None, max_rounds: int = 16, trainable="all"
          ) -> tuple[onnx.ModelProto, dict, dict[str, str]]:
    """A copy of the model with static control flow and sequences lowered into tensor nodes.

    `shapes`/`dtypes` give the graph inputs (as for executor.probe), `values` input values that
    decide shapes. Non-float initializers, float ones training does not change
    (`params.fixed_floats`, for the `trainable` globs), Constant nodes and static shapes
    decide control.
    `known` gives the (shape, dtype) of top-level tensors instead of a first probe; then no
    probe runs a Loop whose trip count is not static (it might never end on made-up values).
    Returns (model, probed (shape, dtype) of every tensor, {node: why it stays} for nodes
    that could not be lowered). Same outputs, same inputs.
    """
    from trainer.executor import probe

    m = copy.deepcopy(model)
    g = m.graph
    if scope is None:
        scope = NameScope(deep_names(g))
    else:
        scope.taken |= deep_names(g)
    from trainer.autodiff.params import fixed_floats

    fixed = fixed_floats(m, trainable)
    seeds = {t.name: tensor_value(t) for t in g.initializer
             if t.data_type not in FLOAT_TYPES or t.name in fixed}
    opsets = _opsets_of(m)
    why: dict[str, str] = {}
    probed = known is None
    found = probe(m, shapes, dtypes, values) if probed else dict(known)
    for _ in range(max_rounds):
        if not needs_lowering(g):
            why = {}
            break
        low = Lowering(opsets, scope, found, seeds)
        low.visit_all(g.node, ChainMap(), None)
        why = low.why
        if low.changed:
            nodes = low.finish(o.name for o in g.output)
            del g.node[:]
            g.node.extend(nodes)
        elif probed:
            break
        if not probed and any(n.op_type == "Loop" and low.fold.get(n.input[0] if n.input else "")
                              is None for n in g.node):
            return m, found, why
        found, probed = probe(m, shapes, dtypes, values), True
    if not probed:
        found = probe(m, shapes, dtypes, values)
    return m, found, why


class _IfOnly(Lowering):
    """Lowering of If nodes alone (no shapes needed: the other nodes stay as they are)."""


for _name in [k for k in vars(Lowering) if k[:1] == "_" and k[1:2].isupper() and k != "_If"]:
    setattr(_IfOnly, _name, None)


def inline_static_ifs(model: onnx.ModelProto, trainable="all") -> onnx.ModelProto:
    """A copy of the model with every If whose condition is static (non-float initializers,
    float ones training does not change, Constant nodes, and arithmetic on them) replaced by
    the branch taken, other nodes as they are, without a probe: what `check MODEL` reads the
    parameters from, as training lowers such an If to its branch (the other branch's weights
    do not train). The model itself where there is no such If."""
    from trainer.autodiff.params import fixed_floats

    if not any(n.op_type == "If" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    m = copy.deepcopy(model)
    g = m.graph
    fixed = fixed_floats(m, trainable)
    seeds = {t.name: tensor_value(t) for t in g.initializer
             if t.data_type not in FLOAT_TYPES or t.name in fixed}
    scope = NameScope(deep_names(g))
    changed = False
    for _ in range(16):  # (an inlined branch may hold another static If)
        low = _IfOnly(_opsets_of(m), scope, {}, seeds)
        low.visit_all(g.node, ChainMap(), None)
        if not low.changed:
            break
        nodes = low.finish(o.name for o in g.output)
        del g.node[:]
        g.node.extend(nodes)
        changed = True
    return m if changed else model


def lower_model(model: onnx.ModelProto, shapes: Mapping[str, tuple],
                dtypes: Mapping[str, np.dtype], values: Mapping[str, np.ndarray] | None = None,
                trainable="all") -> onnx.ModelProto:
    """The model with its static control flow and sequences lowered (the model itself when it
    has none): what autodiff should differentiate, before its training-mode rewrite."""
    if not needs_lowering(model.graph):
        return model
    return lower(model, shapes, dtypes, values, trainable=trainable)[0]


# -- differentiating a node's subgraphs ---------------------------------------------------------

def _domain_versions() -> dict[str, int]:
    versions: dict[str, int] = {}
    for s in onnx.defs.get_all_schemas_with_history():
        versions[s.domain] = max(versions.get(s.domain, 1), s.since_version)
    return versions


_VERSIONS: dict[str, int] = {}


class Region:
    """The nodes a control-flow node stands for, as plain nodes reading its explicit inputs
    (through one alias per slot, so each slot gets its own gradient) and outer-scope tensors.

    `gradients` recomputes them in the backward (lowered, probed) and differentiates them with
    engine.build_backward; `emit` writes GI(i) for every needed explicit and implicit slot.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.nodes: list[onnx.NodeProto] = []
        self.alias: dict[int, str] = {}
        node = ctx.onnx_node
        self.n = len(node.input)
        self.implicit = implicit_inputs(node)
        self.known: dict[str, tuple] = {}  # (shape, dtype) of region names, before probing
        ctx.scope.taken |= {x for _, gs in subgraphs(node) for g in gs for x in deep_names(g)}

    def input(self, i: int) -> str:
        """The name region nodes read for explicit input slot i ("" when absent)."""
        if i not in self.alias:
            name = self.ctx.I(i)
            self.alias[i] = self.ctx.tmp(f"in{i}") if name else ""
            if name:
                self.nodes.append(self.ctx.node("Identity", [name], [self.alias[i]]))
                if name in self.ctx.shapes:
                    self.known[self.alias[i]] = self.ctx.shapes[name]
        return self.alias[i]

    def node_copy(self) -> list[str]:
        """Add the node itself, reading the aliases of its inputs; returns its fresh outputs."""
        ctx = self.ctx
        node = onnx.NodeProto()
        node.CopyFrom(ctx.onnx_node)
        node.name = ctx.tmp(node.op_type)
        del node.input[:], node.output[:]
        node.input.extend(self.input(i) for i in range(self.n))
        outs = [ctx.tmp(f"y{k}") if o else "" for k, o in enumerate(ctx.onnx_node.output)]
        node.output.extend(outs)
        self.known.update((y, ctx.shapes[o]) for y, o in zip(outs, ctx.onnx_node.output,
                                                             strict=True) if o in ctx.shapes)
        self.nodes.append(node)
        return outs

    def inline(self, graph: onnx.GraphProto, bound: list[str], base: str) -> list[str]:
        """Copy a subgraph's nodes into the region (inputs bound to names, its own names
        fresh); returns its output names."""
        env = ChainMap({v.name: b for v, b in zip(graph.input, bound, strict=False)})
        copier = Lowering({}, self.ctx.scope, {})
        prefix = f"{self.ctx.prefix}/{base}"
        for k, node in enumerate([*constants_of(graph, env.maps[0]), *graph.node]):
            new = copy.deepcopy(node)
            del new.input[:], new.output[:]
            new.input.extend(copier.name(i, env) for i in node.input)
            new.output.extend(copier.define(o, env, prefix) for o in node.output)
            new.name = self.ctx.scope.fresh(f"{prefix}/{node_name(node, k)}")
            for _, graphs in subgraphs(new):
                for g in graphs:
                    _rename_outer(g, lambda x: copier.name(x, env))
            self.nodes.append(new)
        return [copier.name(v.name, env) for v in graph.output]

    def wanted(self) -> list[tuple[int, str]]:
        """(slot, name) of the needed explicit slots (their aliases) and implicit inputs."""
        ctx = self.ctx
        out = [(i, self.alias[i]) for i in range(self.n) if ctx.needs(i) and self.alias.get(i)]
        out += [(self.n + j, x) for j, x in enumerate(self.implicit) if ctx.needs(self.n + j)]
        return out

    def gradients(self, outputs: list[str], wrt: list[str]
                  ) -> tuple[list[onnx.NodeProto], dict[str, str]]:
        """(recompute + backward nodes, {x: gradient}) for the wrt names the seeds reach; the
        seeds are GO(k) for region output k."""
        from trainer.autodiff.build import _constant_values
        from trainer.autodiff.engine import active_nodes, build_backward

        ctx = self.ctx
        nodes = list(self.nodes)
        seeds = {}
        for k, out in enumerate(outputs):
            if out and ctx.GO(k):
                y = ctx.tmp(f"out{k}")
                nodes.append(ctx.node("Identity", [out], [y]))
                seeds[y] = ctx.GO(k)
        model, in_shapes, dtypes, values = self._model(nodes, list(seeds))
        if needs_lowering(model.graph):
            known = {**self.known, **{x: ctx.shapes[x] for x in self._outer_reads(nodes)
                                      if x in ctx.shapes}}
            model, shapes, why = lower(model, in_shapes, dtypes, values, scope=ctx.scope,
                                       known=known)
            stuck = [(n.op_type, n.name) for n in model.graph.node
                     if n.op_type in ("Loop", "Scan", "SequenceMap", "SequenceAt",
                                      "ConcatFromSequence")]
            if stuck:
                reason = "; ".join(f"{k}: {v}" for k, v in why.items()) or "not lowered"
                raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): gradients need "
                                 f"its control flow known when the training graph is built "
                                 f"({reason}); make trip counts, conditions and sequence "
                                 "positions constants or functions of shapes")
        else:
            from trainer.executor import probe
            shapes = probe(model, in_shapes, dtypes, values)
        nodes = list(model.graph.node)
        consts = _constant_values(model, shapes)
        reach = active_nodes(nodes, list(seeds), set(wrt), shapes)[1]
        live = [x for x in dict.fromkeys(wrt) if x in reach]
        if not live:
            return [], {}
        bwd, inits, grads = build_backward(nodes, seeds, live, shapes, ctx.opset, ctx.scope,
                                           consts, sized_inputs=ctx.data_sized)
        ctx.initializers.extend(inits)
        needed = {x for n in bwd for x in reads(n)}
        fwd = []
        for node in reversed(nodes):
            if any(o in needed for o in node.output):
                fwd.append(node)
                needed.update(reads(node))
        fwd.reverse()
        redrawn = [n.name for n in fwd
                   if n.op_type in RANDOM and not _deterministic(n, consts, ctx.opset)]
        if redrawn:
            raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}): its gradient "
                             f"recomputes the random node(s) {', '.join(redrawn)}, which would "
                             "draw new values; move them out of the subgraph")
        return fwd + bwd, grads

    def _model(self, nodes, outputs):
        """The region as a model: outer tensors it reads are inputs (initializers when they are
        non-float values known before running, which control may depend on)."""
        ctx = self.ctx
        outer = self._outer_reads(nodes)
        inputs, inits, in_shapes, dtypes = [], [], {}, {}
        made = {t.name: t for t in ctx.initializers}  # constants the rule built
        for x in outer:
            if x in made:
                inits.append(made[x])
                continue
            if x not in ctx.shapes:
                raise ModelError(f"node '{ctx.name}' ({ctx.onnx_node.op_type}) reads '{x}', "
                                 "a sequence or optional value from outside; gradients through "
                                 "it are not supported")
            shape, dt = ctx.shapes[x]
            value = ctx.static_value(x) if not is_float_dtype(dt) else None
            if value is not None:
                inits.append(numpy_helper.from_array(np.asarray(value).astype(dt), x))
            else:
                inputs.append(helper.make_tensor_value_info(x, elem_type(dt), list(shape)))
                in_shapes[x], dtypes[x] = tuple(shape), dt
        g = helper.make_graph(nodes, "region", inputs,
                              [helper.make_empty_tensor_value_info(y) for y in outputs], inits)
        if not _VERSIONS:
            _VERSIONS.update(_domain_versions())
        domains = {n.domain for n in nodes} - {"", "ai.onnx"}
        opsets = [helper.make_opsetid("", ctx.opset)]
        opsets += [helper.make_opsetid(d, _VERSIONS.get(d, 1)) for d in sorted(domains)]
        return helper.make_model(g, opset_imports=opsets), in_shapes, dtypes, {}

    @staticmethod
    def _outer_reads(nodes) -> list[str]:
        defined = {o for n in nodes for o in n.output}
        return [x for x in dict.fromkeys(x for n in nodes for x in reads(n))
                if x and x not in defined]

    def emit(self, outputs: list[str]) -> list[onnx.NodeProto]:
        """Recompute + backward, and GI(i) (zeros where the seeds do not reach) for every
        needed slot."""
        ctx = self.ctx
        want = self.wanted()
        nodes, grads = self.gradients(outputs, [x for _, x in want])
        for slot, x in want:
            if x in grads:
                nodes.append(ctx.node("Identity", [grads[x]], [ctx.GI(slot)]))
            else:
                nodes.append(zeros(ctx, self._outer(slot), ctx.GI(slot)))
        return nodes

    def _outer(self, slot: int) -> str:
        return self.ctx.I(slot) if slot < self.n else self.implicit[slot - self.n]


def _deterministic(node: onnx.NodeProto, consts: Mapping, opset: int) -> bool:
    """Dropout draws only from opset 12, with a training_mode that is not a constant false."""
    if node.op_type != "Dropout":
        return False
    if opset < 12 or len(node.input) < 3 or not node.input[2]:
        return True
    value = consts.get(node.input[2])
    return value is not None and not bool(np.asarray(value).reshape(()))


def zeros(ctx, like: str, out: str) -> onnx.NodeProto:
    """out = zeros with the shape and dtype of tensor `like`."""
    shape, dt = ctx.shapes[like]
    if ctx.opset >= 9:
        return ctx.node("ConstantOfShape", [ctx.const(list(shape), np.int64, "shape")], [out],
                        value=numpy_helper.from_array(np.zeros(1, dt)))
    return ctx.node("Identity", [ctx.const(np.zeros(shape, dt), suffix="zeros")], [out])
