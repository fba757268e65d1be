"""Plan an ONNX graph once (order, kernels, liveness) and run it as prebound closures; on NumPy each
input-shape signature gets a specialized plan: simplified graph, fused kernels, static memory plan.
Graph attributes (If/Loop/Scan bodies) are planned once with the outer plan and see its values."""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.backend import StepRNG, to_device
from trainer.errors import ModelError, UnsupportedOpError
from trainer.graph import attrs_of, node_name, opset_of, tensor_value, topo_sort
from trainer.kernels import CUSTOM_DOMAIN, CUSTOM_SHAPES, compiled, get_kernel
from trainer.kernels.collective import collectives
from trainer.kernels.reduce import squares_finite
from trainer.simplify import PNode, eliminate_dead, fold_reshapes_into_reductions, simplify


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, list[onnx.GraphProto]]]:
    """The node's graph-valued attributes as (attribute name, graphs) pairs."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, [a.g]))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.append((a.name, list(a.graphs)))
    return out


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads, directly or in nested subgraphs, that it does not define."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used = {v.name for v in graph.output}
    for node in graph.node:
        defined.update(node.output)
        used.update(node.input)
        for _, graphs in subgraphs(node):
            for g in graphs:
                used |= outer_names(g)
    return used - defined - {""}


MAX_PLANS = 8  # specialized signatures per executor; further ones run unspecialized
WHERE_SELECT = 4096  # below this many elements Where(c, x, 0) is a select, above a product

# Ops whose kernel is built from the enclosing graph: (domain, op) -> since version.
GRAPH_KERNEL_OPS = {("ai.onnx.preview.training", "Gradient"): 1}


def graph_kernel(node: onnx.NodeProto):
    """For ops whose kernel is built from the enclosing graph (ai.onnx.preview.training's
    Gradient): factory(model, graph, node) -> fn(xp, *inputs); None for ordinary ops."""
    if node.domain == "ai.onnx.preview.training" and node.op_type == "Gradient":
        from trainer.autodiff.gradient_op import gradient_kernel
        return gradient_kernel
    return None


def _missing(model: onnx.ModelProto, graph: onnx.GraphProto, prefix: str,
             lowered: bool = False) -> list[tuple[str, str]]:
    from trainer.contrib import contrib_key

    out = []
    for i, node in enumerate(graph.node):
        name = prefix + node_name(node, i)
        if lowered and not prefix and contrib_key(node, model):
            continue
        if get_kernel(node.op_type, opset_of(model, node.domain), node.domain) is None \
                and graph_kernel(node) is None:
            out.append((node.op_type, name))
        for attr, graphs in subgraphs(node):
            for k, g in enumerate(graphs):
                sub = f"{name}/{attr}" + (f"[{k}]" if len(graphs) > 1 else "")
                out += _missing(model, g, sub + "/")
    return out


def missing_kernels(model: onnx.ModelProto, lowered: bool = False) -> list[tuple[str, str]]:
    """Every (op_type, node name) of the graph and its subgraphs that has no forward kernel;
    with `lowered`, onnxruntime's fused nodes of the main graph that trainer.contrib lowers to
    standard ops are not listed.

    Nodes inside a subgraph are named by path: `loop/body/Add_3`."""
    return _missing(model, model.graph, "", lowered)


def _reads(node: onnx.NodeProto) -> tuple[str, ...]:
    """The node's inputs, then the outer-scope names its subgraphs read."""
    captured: set[str] = set()
    for _, graphs in subgraphs(node):
        for g in graphs:
            captured |= outer_names(g)
    return tuple(node.input) + tuple(sorted(captured))


class _Deps(NamedTuple):
    """A node with the outer-scope names its subgraphs read, for ordering and liveness."""
    input: tuple[str, ...]
    output: Sequence[str]
    node: onnx.NodeProto


class Subgraph:
    """A graph attribute planned once; called with its formal inputs, returns its outputs.

    The executor binds the outer-scope values the body reads (`captures`) before each call of
    the node's kernel; `input_types`/`output_types` are the body's declared onnx TypeProtos.
    """

    def __init__(self, plan: Executor, graph: onnx.GraphProto, captures: Iterable[str]):
        self.plan = plan
        self.name = graph.name
        self.input_names = [v.name for v in graph.input]
        self.output_names = [v.name for v in graph.output]
        self.input_types = [v.type for v in graph.input]
        self.output_types = [v.type for v in graph.output]
        self.captures = tuple(sorted(captures))
        self.scope: Mapping[str, object] = {}

    def bind(self, scope: Mapping[str, object]) -> Subgraph:
        bound = object.__new__(Subgraph)
        bound.__dict__.update(self.__dict__)
        bound.scope = scope
        return bound

    def __call__(self, *inputs) -> list:
        if len(inputs) != len(self.input_names):
            raise ModelError(f"subgraph '{self.name}' takes {len(self.input_names)} inputs, "
                             f"got {len(inputs)}")
        feeds = dict(self.scope)
        feeds.update(zip(self.input_names, inputs, strict=True))
        if self.plan.on_device:  # host values of the outer plan (shapes, counters) move over
            xp = self.plan.xp
            feeds = {k: to_device(xp, v) if isinstance(v, np.ndarray | np.generic) else v
                     for k, v in feeds.items()}
        out = self.plan.run(feeds)
        return [out[n] for n in self.output_names]


class SharedValues(dict):
    """Host values of initializers held once for every executor of a run (name -> read-only
    array), where the models' protos hold stubs (trainer.memory.is_stub) in their place; on a
    device, their device copies too, made once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device: dict[str, object] = {}

    def on_device(self, name: str, xp):
        dev = self.device.get(name)
        if dev is None:
            dev = self.device[name] = to_device(xp, self[name], f"initializer '{name}'")
        return dev


def initializer_value(t: onnx.TensorProto, values: Mapping | None = None):
    """The value of initializer `t`: its own, or from `values` (else the running
    graph.stub_values block) where `t` is a stub."""
    return tensor_value(t, values)


# -- the program: prebound closures over a slot list ------------------------------------------
class _Graphed(NamedTuple):
    """A plan captured as a CUDA graph, with what it reads and writes (kept alive with it)."""
    graph: object
    feeds: dict      # name -> the array the graph reads (its own buffer, or a persistent feed)
    outputs: dict    # name -> the array the graph writes the fetched value into
    pool: object     # the private memory pool of its intermediate values
    stream: object   # the stream it was captured on


class _Program:
    """Closures `step(env)` over a list `env` of slots; slot 0 always holds None ("")."""

    def __init__(self, slots: dict[str, int], template: list, steps: list[Callable],
                 labels: list[tuple[str, str, tuple[str, ...]]], feeds: list[tuple[str, int]],
                 outputs: dict[str, int]):
        self.slots = slots
        self.template = template
        self.steps = steps
        self.labels = labels  # per step: (node name, op, input names) for error messages
        self.feeds = feeds
        self.outputs = outputs
        self.by_feed = False

    def run(self, feeds: Mapping[str, object], xp) -> list:
        env = self.template.copy()
        if self.by_feed:  # any fed name overrides: initializers given as inputs are defaults
            slots = self.slots
            for name, value in feeds.items():
                s = slots.get(name)
                if s is not None:
                    env[s] = value
        else:
            for name, slot in self.feeds:
                if name in feeds:
                    env[slot] = feeds[name]
        i = 0
        try:
            for i, step in enumerate(self.steps):  # noqa: B007 - i names a failing step
                step(env)
        except ModelError as exc:
            name, op, _ = self.labels[i]
            if f"'{name}'" in str(exc):
                raise
            raise ModelError(f"node '{name}' ({op}) failed: {exc}") from exc
        except Exception as exc:
            name, op, ins = self.labels[i]
            shapes = [getattr(env[self.slots[n]], "shape", None) if n in self.slots else None
                      for n in ins]
            raise ModelError(f"node '{name}' ({op}) failed on input shapes {shapes}: "
                             f"{type(exc).__name__}: {exc}") from exc
        return env


def _call_step(fn, attrs: dict, ins: tuple[int, ...], outs: tuple[int, ...], xp) -> Callable:
    """The closure running one kernel: inputs read from env slots, outputs stored."""
    if len(outs) == 1:
        o = outs[0]
        if len(ins) == 1:
            i0 = ins[0]
            if attrs:
                def step(env):
                    env[o] = fn(xp, env[i0], **attrs)[0]
            else:
                def step(env):
                    env[o] = fn(xp, env[i0])[0]
        elif len(ins) == 2:
            i0, i1 = ins
            if attrs:
                def step(env):
                    env[o] = fn(xp, env[i0], env[i1], **attrs)[0]
            else:
                def step(env):
                    env[o] = fn(xp, env[i0], env[i1])[0]
        else:
            def step(env):
                env[o] = fn(xp, *[env[i] for i in ins], **attrs)[0]
        return step

    def step(env):
        results = fn(xp, *[env[i] for i in ins], **attrs)
        for slot, r in zip(outs, results, strict=False):
            env[slot] = r
    return step


def _with_frees(step: Callable, frees: tuple[int, ...]) -> Callable:
    if not frees:
        return step
    if len(frees) == 1:
        f0 = frees[0]

        def freeing(env):
            step(env)
            env[f0] = None
        return freeing

    def freeing_many(env):
        step(env)
        for f in frees:
            env[f] = None
    return freeing_many


def _then(step: Callable, after: Callable) -> Callable:
    def both(env):
        step(env)
        after(env)
    return both


class Executor:
    """Runs one graph many times: everything per-graph is decided in __init__, everything
    per-shape at the first run of each input-shape signature (that run records every value's
    shape; later runs use the plan of trainer.simplify, trainer.kernels.fused and a static memory
    plan: buffers assigned by liveness and reused, outputs written with out=; on NumPy and on a
    device alike). Sequences are Python lists of arrays; an empty optional is None.

    `feeds` names the values given at each run (graph inputs, and initializers such as trained
    parameters that change between runs); the other initializers become device constants.
    `fetch_into` {name: array}: that fetched value is written into the caller's array (e.g. a
    slice of a flat gradient buffer), straight from its kernel where it can be. `on_produced`
    {name: callback(value)}: called as soon as the value is computed (e.g. to start a
    gradient all-reduce). `optimize=False` keeps the unspecialized interpreter.

    `cuda_graph` (device executors): from the second run of a planned shape on, the plan runs
    as one captured CUDA graph, launched with one call (see `_capture`); `persistent` names the
    feeds the caller passes as the same arrays at every run (parameters, optimizer state), which
    the graph reads in place; other feeds are copied into the graph's own input buffers. Fetched
    values come back as copies (a graph's outputs are rewritten at its next launch), those in
    `fetch_into` arrays in place. A graph is refused, with the reason in `graph_off`, for
    random kernels, on_produced callbacks and values that cannot be captured.
    """

    def __init__(self, model: onnx.ModelProto, xp: ModuleType = np,
                 feeds: Iterable[str] = (), fetch: Iterable[str] | None = None,
                 seed: int = 0, keep_all: bool = False,
                 fetch_into: Mapping[str, object] | None = None,
                 on_produced: Mapping[str, Callable] | None = None,
                 optimize: bool = True, cuda_graph: bool = False,
                 persistent: Iterable[str] = (), values: SharedValues | None = None):
        missing = missing_kernels(model)
        if missing:
            raise UnsupportedOpError("forward kernel", missing)
        graph = model.graph
        init_names = {t.name for t in graph.initializer}
        # Graph inputs that are also initializers (legal; usual before IR 4) keep their value
        # as a default, which a feed may override like any other constant.
        feeds = set(feeds) | {v.name for v in graph.input if v.name not in init_names}
        # (initializers fed at every run, such as trained parameters, are not read: no
        # transient copy of the weights; those whose values left the model, stubs, are read
        # from `values`, shared by every executor of a run: no copy per executor)
        self.shared = values
        inits = {t.name: initializer_value(t, values) for t in graph.initializer
                 if t.name not in feeds}
        fetch = list(fetch) if fetch is not None else [o.name for o in graph.output]
        self.fetch_into = dict(fetch_into or {})
        self.on_produced = dict(on_produced or {})
        for what, names in (("fetch_into", self.fetch_into), ("on_produced", self.on_produced)):
            unknown = [n for n in names if n not in fetch]
            if unknown:
                raise ModelError(f"Executor {what} names {', '.join(map(repr, unknown))}, which "
                                 f"{'is' if len(unknown) == 1 else 'are'} not fetched; add "
                                 "them to fetch")
        self._plan(model, graph, inits, xp, StepRNG(xp, seed), feeds, fetch, keep_all)
        self.optimize = (optimize and not keep_all
                         and not any(s[6] for s in self.steps)
                         and all(graph_kernel(d) is None for d in graph.node))
        self._specialized: dict[tuple, object] = {}
        self.persistent = frozenset(persistent)
        self._graphs: dict[tuple, _Graphed | bool] = {}
        # why shapes run uncaptured: captures that failed, shapes without a plan
        self.graph_errors: list[str] = []
        self.graph_off = None if cuda_graph else "not asked for"
        if cuda_graph:
            if not self.on_device:
                self.graph_off = "CUDA graphs need a GPU"
            elif not self.optimize:
                self.graph_off = "the graph is not planned"
            elif any("rng" in s[1] for s in self._plan_steps):
                self.graph_off = "random kernels (a graph would replay the same draws)"
            elif any(getattr(s[0], "collective", False) for s in self._plan_steps):
                self.graph_off = ("collectives inside the step: SyncBatchNorm's all-reduce of "
                                  "the batch statistics")
            elif self.on_produced:
                self.graph_off = "on_produced callbacks (e.g. all-reduce hooks)"

    @classmethod
    def _subgraph(cls, model: onnx.ModelProto, graph: onnx.GraphProto, xp: ModuleType,
                  rng: StepRNG) -> Subgraph:
        """Plan a graph attribute: its formal inputs and outer-scope reads are its feeds."""
        captures = outer_names(graph)
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        feeds = {v.name for v in graph.input} | captures
        plan = object.__new__(cls)
        plan.fetch_into, plan.on_produced, plan.shared = {}, {}, None
        plan._plan(model, graph, inits, xp, rng, feeds, [o.name for o in graph.output], False)
        plan.optimize = False
        plan._specialized = {}
        plan.graph_off = "a subgraph"
        return Subgraph(plan, graph, captures)

    def _plan(self, model, graph, inits, xp, rng, feeds, fetch, keep_all) -> None:
        self.xp = xp
        self.opset = opset_of(model, "")
        self.model = model
        self.feeds = set(feeds)
        self.on_device = xp is not np
        # Host (NumPy) values; on a device, _place decides which of them go there, once.
        self.constants = {k: v for k, v in inits.items() if k not in self.feeds}
        available = self.feeds | set(self.constants)
        deps = topo_sort([_Deps(_reads(n), n.output, n) for n in graph.node], available)
        self.fetch = fetch
        self.rng = rng
        self.steps = [self._bind(model, d.node, i, graph) for i, d in enumerate(deps)]
        self.keep_all = keep_all
        self._out_alias: dict[str, str] = {}
        self.host_values: frozenset[str] = frozenset()  # device executors: values kept on host
        # What the planner starts from: the nodes and host constants before device placement
        # (a plan folds the shape arithmetic away and places what is left itself).
        self._plan_steps, self._plan_constants = list(self.steps), dict(self.constants)
        self._arrays = (np.ndarray,) if not self.on_device else (np.ndarray, xp.ndarray)
        if self.on_device:
            deps = self._place(graph, deps)
        last_use: dict[str, int] = {}
        for i, d in enumerate(deps):
            for name in d.input:
                last_use[name] = i
        keep = set(self.fetch) | set(self._out_alias.values())
        self.free_after: list[tuple[str, ...]] = [() for _ in deps]
        if not keep_all:
            frees: dict[int, list[str]] = {}
            for name, i in last_use.items():
                if name and name not in keep:
                    frees.setdefault(i, []).append(name)
            for node_index, d in enumerate(deps):  # outputs nobody reads die at once
                for name in d.output:
                    if name and name not in last_use and name not in keep:
                        frees.setdefault(node_index, []).append(name)
            self.free_after = [tuple(frees.get(i, ())) for i in range(len(deps))]
        self._reads = [d.input for d in deps]
        read = {i for r in self._reads for i in r}
        self._feed_order = sorted(n for n in self.feeds if n in read or n in self.fetch)
        self._required = []
        seen: set[str] = set()
        for (_, _, _, _, name, op, _), reads in zip(self.steps, self._reads, strict=True):
            for i in reads:
                if i in self.feeds and i not in self.constants and i not in seen:
                    seen.add(i)
                    self._required.append((i, name, op))
        self._required_names = frozenset(name for name, _, _ in self._required)
        self._constant_names = frozenset(self.constants)
        self._generic = self._compile_generic()

    def _bind(self, model, node, index, graph):
        factory = graph_kernel(node)
        if factory is not None:
            return (factory(model, graph, node), {}, tuple(node.input), tuple(node.output),
                    node_name(node, index), node.op_type, ())
        fn = get_kernel(node.op_type, opset_of(model, node.domain), node.domain)
        attrs = attrs_of(node)
        params = inspect.signature(fn).parameters
        takes_kw = {p.name for p in params.values() if p.kind == p.KEYWORD_ONLY}
        unknown = sorted(set(attrs) - (takes_kw - {"rng", "n_outputs"}))
        name = node_name(node, index)
        if unknown:
            raise ModelError(f"node '{name}' ({node.op_type}): attribute(s) "
                             f"{', '.join(unknown)} are not supported")
        if "rng" in takes_kw:
            attrs["rng"] = self.rng
        if "n_outputs" in takes_kw:
            attrs["n_outputs"] = len(node.output)
        subs = []
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                subs.append((a.name, self._subgraph(model, a.g, self.xp, self.rng)))
            elif a.type == onnx.AttributeProto.GRAPHS:
                subs.append((a.name, [self._subgraph(model, g, self.xp, self.rng)
                                      for g in a.graphs]))
        return (fn, attrs, tuple(node.input), tuple(node.output), name, node.op_type,
                tuple(subs))

    # -- device placement (GPU) ---------------------------------------------------------------
    def _place(self, graph: onnx.GraphProto, deps: list[_Deps]) -> list[_Deps]:
        """Decide once, for a device executor, where each value lives. Nodes of constants only
        are folded now (NumPy); shape arithmetic on host values (Shape, Size, Range of host
        ints, Gather/Concat/Unsqueeze/... of shape vectors) runs on the host; everything else
        runs on the device. A host value a device node reads as data is copied to the device
        (constants once, here; run-time host values when made); at shape-like positions
        (Reshape's shape, Dropout's ratio, ...) the device node reads the host value, so no
        kernel reads device memory back for a shape. Rewrites self.steps and self.constants."""
        host = dict(self.constants)  # host values known now: constants, then folded outputs
        # Initializers that are also graph inputs are defaults a feed may override: run-time.
        runtime_consts = {v.name for v in graph.input} & set(host)
        for k in runtime_consts:
            host.pop(k)
        hooked = set(self.fetch_into) | set(self.on_produced)
        host_runtime: set[str] = set()
        device_consts: dict[str, object] = {
            k: self._upload(k, self.constants[k], f"initializer '{k}'") for k in runtime_consts}
        steps, new_deps = [], []
        converted: set[str] = set()

        def device_name(v: str, where: str) -> str:
            """The name of v's device copy, made once for a constant, by a step otherwise."""
            dev = v + _DEV
            if v in host:
                if dev not in device_consts:
                    device_consts[dev] = self._upload(v, host[v], f"'{v}' (read by {where})")
            elif dev not in converted:
                converted.add(dev)
                steps.append((_to_device_kernel, {}, (v,), (dev,), f"{v}/ToDevice",
                               "ToDevice", ()))
                new_deps.append(_Deps((v,), (dev,), None))
            return dev

        for d, step in zip(deps, self.steps, strict=True):
            fn, attrs, ins, outs, name, op, subs = step
            standard = d.node.domain in ("", "ai.onnx") and graph_kernel(d.node) is None
            plain = standard and not subs and "rng" not in attrs
            expands = False
            if (plain and all(i == "" or i in host for i in ins)
                    and not any(o in hooked or o in self.fetch for o in outs)):
                args = [host[i] if i else None for i in ins]
                folded = _fold(fn, attrs, args)
                if folded is not None and len(folded) >= len([o for o in outs if o]):
                    made = sum(v.size for v in folded)
                    # A large tensor made from small inputs (ConstantOfShape, Expand) is made
                    # on the device at each run instead: no constant held, nothing copied.
                    expands = made > _FOLD_MAX and made > 4 * sum(
                        a.size for a in args if isinstance(a, np.ndarray))
                    if not expands:
                        for o, value in zip(outs, folded, strict=False):
                            if o:
                                host[o] = value
                        continue
            meta = _METADATA_INPUTS.get(op, ())
            data = [i for k, i in enumerate(ins) if i and k not in meta]
            if (plain and op in _HOST_OPS and not expands and not any(o in hooked for o in outs)
                    and all(i in host or i in host_runtime for i in data)):
                host_runtime.update(o for o in outs if o)
                steps.append((_on_host(fn), attrs, ins, outs, name, op, subs))
                new_deps.append(d)
                continue
            shape_like = HOST_INPUTS.get(op, ()) if standard else ()
            new_ins = tuple(
                device_name(i, f"node '{name}'")
                if i and (i in host or i in host_runtime) and k not in shape_like
                and k not in meta else i
                for k, i in enumerate(ins))
            steps.append((fn, attrs, new_ins, outs, name, op, subs))
            captured = d.input[len(ins):]
            new_deps.append(_Deps(new_ins + captured, d.output, d.node))
        # Fetched host values leave the run as device arrays too.
        for f in self.fetch:
            if f in host or f in host_runtime:
                self._out_alias[f] = device_name(f, "the fetched outputs")
        read = {i for dd in new_deps for i in dd.input} | set(self.fetch)
        self.constants = {k: v for k, v in host.items() if k in read}
        self.constants.update(device_consts)
        self.host_values = frozenset(host_runtime) | frozenset(self.constants) - set(
            device_consts)
        self.steps = steps
        return new_deps

    def _upload(self, name: str, value, what: str):
        """The device copy of host constant `value`: one per run for a shared value (the
        training steps', the evaluation's and the diagnosis's executors read one copy)."""
        if self.shared is not None and self.shared.get(name) is value:
            return self.shared.on_device(name, self.xp)
        return to_device(self.xp, value, what)

    def _device_constant(self, name: str, value):
        """The device copy of a plan's constant: copied once per executor for a given value
        (an initializer, or a folded value that every plan shares), at plan time."""
        dev = self.constants.get(name + _DEV)
        if dev is not None and value is self._plan_constants.get(name):
            return dev  # (the unplanned program's copy)
        cache = self.__dict__.setdefault("_uploads", {})
        hit = cache.get(name)
        if hit is not None and (hit[0] is value or (
                hit[0].shape == value.shape and hit[0].dtype == value.dtype
                and np.array_equal(hit[0], value))):
            return hit[1]
        dev = self._upload(name, value, f"'{name}'")
        cache[name] = (value, dev)
        return dev

    # -- the unspecialized program ------------------------------------------------------------
    def _compile_generic(self, record: dict | None = None, deliver: bool = True) -> _Program:
        """Closures for every node as planned; with `record`, each produced value's (shape,
        dtype) is stored there (None for values that are not arrays); without `deliver`, no
        fetch_into copies or on_produced calls."""
        slots: dict[str, int] = {"": 0, _TRASH: 1}

        def slot(name: str) -> int:
            if name not in slots:
                slots[name] = len(slots)
            return slots[name]

        for name in sorted(self.constants):
            slot(name)
        feed_slots = [(n, slot(n)) for n in sorted(self.feeds)]
        steps, labels = [], []
        for (fn, attrs, ins, outs, name, op, subs), frees in zip(
                self.steps, self.free_after, strict=True):
            in_slots = tuple(slot(i) for i in ins)
            out_slots = tuple(slot(o) if o else 1 for o in outs)
            step = self._generic_step(fn, attrs, in_slots, out_slots, subs, slots)
            if record is not None:
                step = _then(step, _recorder(record, outs, out_slots, self._arrays))
            if deliver:
                step = self._deliveries(step, [(o, s) for o, s in zip(outs, out_slots,
                                                                      strict=True) if o])
            steps.append(_with_frees(step, tuple(slot(f) for f in frees)))
            labels.append((name, op, ins))
        template: list = [None] * len(slots)
        for name, value in self.constants.items():
            template[slots[name]] = value
        alias = self._out_alias
        outputs = {n: slots[alias.get(n, n)] for n in self.fetch if alias.get(n, n) in slots}
        prog = _Program(slots, template, steps, labels, feed_slots, outputs)
        prog.by_feed = True
        return prog

    def _generic_step(self, fn, attrs, in_slots, out_slots, subs, slots):
        xp = self.xp
        if subs:
            subs = [(k, sub, [(n, slots[n]) for n in _captures(sub) if n in slots])
                    for k, sub in subs]

            def step(env):
                bound = dict(attrs)
                for k, sub, pairs in subs:
                    bound[k] = _bound(sub, {n: env[s] for n, s in pairs})
                results = fn(xp, *[env[i] for i in in_slots], **bound)
                for s, r in zip(out_slots, results, strict=False):
                    env[s] = r
            return step
        return _call_step(fn, attrs, in_slots, out_slots, xp)

    def _deliveries(self, step: Callable, produced: list[tuple[str, int]]) -> Callable:
        """Wrap a step with the copies into `fetch_into` arrays and the on_produced calls."""
        xp = self.xp
        for name, s in produced:
            dest = self.fetch_into.get(name)
            if dest is not None:
                def copy(env, s=s, dest=dest):
                    xp.copyto(dest, env[s])
                    env[s] = dest
                step = _then(step, copy)
            cb = self.on_produced.get(name)
            if cb is not None:
                step = _then(step, lambda env, s=s, cb=cb: cb(env[s]))
        return step

    # -- running ------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, object]) -> dict[str, object]:
        """Run the graph; returns the fetched values (all values when keep_all)."""
        self._check_feeds(feeds)
        if self.optimize and self._constant_names.isdisjoint(feeds):
            key = self._signature(feeds)
            plan = self._specialized.get(key)
            if plan is None:
                plan = self._plan_signature(key, feeds)
                if plan is False and self.graph_off is None:  # (said once per shape)
                    self.graph_errors.append("this batch shape's step has no plan (shapes that "
                                             "depend on values, or too many batch shapes)")
            if plan is not False:
                if self.graph_off is None:
                    out = self._run_graph(key, plan, feeds)
                    if out is not None:
                        return out
                env = plan.run(feeds, self.xp)
                return self._deliver({k: env[s] for k, s in plan.outputs.items()})
        return self.run_unplanned(feeds)

    # -- CUDA graphs --------------------------------------------------------------------------
    def _run_graph(self, key: tuple, plan: _Program, feeds: Mapping[str, object]):
        """The run as a launch of the plan's graph (captured at the second run of the shape;
        the first compiles the kernels); None where the plan runs uncaptured."""
        g = self._graphs.get(key)
        if g is None:
            self._graphs[key] = True  # (warm: the next run captures)
            return None
        if g is True:
            g = self._graphs[key] = self._capture(plan, feeds)
        if g is False:
            return None
        xp = self.xp
        for name, buf in g.feeds.items():
            value = feeds[name]
            if value is not buf:
                xp.copyto(buf, value)
        g.graph.launch(stream=xp.cuda.get_current_stream())
        return {k: v if self.fetch_into.get(k) is v else v.copy() for k, v in g.outputs.items()}

    def _capture(self, plan: _Program, feeds: Mapping[str, object]):
        """Capture one planned run on a stream of its own, into a private memory pool (memory
        the graph's kernels use is never handed to other arrays, and stays the graph's): a
        _Graphed, or False (the reason in graph_errors) where the run cannot be captured."""
        xp = self.xp
        static = {}
        for name, _ in plan.feeds:
            v = feeds.get(name)
            if v is None:
                continue
            if name in self.persistent:
                static[name] = v
            else:
                static[name] = buf = xp.empty_like(v)
                xp.copyto(buf, v)
        stream, pool = xp.cuda.Stream(non_blocking=True), xp.cuda.MemoryPool()
        try:
            with xp.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    env = plan.run(static, xp)
                    outputs = self._deliver({k: env[s] for k, s in plan.outputs.items()})
                finally:
                    graph = stream.end_capture()
        except Exception as exc:  # noqa: BLE001 - the plan runs uncaptured, and says why
            self.graph_errors.append(f"{type(exc).__name__}: {exc}")
            return False
        return _Graphed(graph, static, outputs, pool, stream)

    def run_unplanned(self, feeds: Mapping[str, object]) -> dict[str, object]:
        """Run the unspecialized program (every node's kernel as bound, no plan)."""
        env = self._generic.run(feeds, self.xp)
        if self.keep_all:
            return {k: env[s] for k, s in self._generic.slots.items()
                    if k and k != _TRASH and _DEV not in k
                    and (env[s] is not None or k in feeds)}
        return self._deliver({k: env[s] for k, s in self._generic.outputs.items()})

    def _deliver(self, out: dict) -> dict:
        """fetch_into values not yet in their arrays (constants, feeds, repeated names)."""
        for name, dest in self.fetch_into.items():
            if out.get(name) is not dest:
                self.xp.copyto(dest, out[name])
                out[name] = dest
        return out

    def _check_feeds(self, feeds: Mapping[str, object]) -> None:
        if self._required_names.issubset(feeds):
            return
        for name, node, op in self._required:
            if name not in feeds:
                raise ModelError(f"node '{node}' ({op}): input '{name}' was not provided")

    def _signature(self, feeds: Mapping[str, object]) -> tuple:
        sig = []
        arrays = self._arrays
        for name in self._feed_order:
            v = feeds.get(name)
            if isinstance(v, arrays):
                sig.append((v.shape, v.dtype))
            else:
                sig.append(type(v))
        return tuple(sig)

    def _plan_signature(self, key: tuple, feeds: Mapping[str, object]):
        """Plan a new signature: an unspecialized run records every value's shape, then the
        plan is built (False where none is: too many signatures, non-array feeds). That run is
        a dry one: its outputs are dropped, nothing is delivered and its random draws come
        from a stream aside, so a planned signature computes with the plan's kernels from its
        first run on (a run resumed from a checkpoint repeats the uninterrupted one bit for
        bit, whichever step it starts at)."""
        plan = False
        # (on a device, every feed a device array: a host array fed where the plan's kernels
        # read device data would mix the two)
        kind = self._arrays[-1]
        if len(self._specialized) < MAX_PLANS and all(
                isinstance(v, kind) for v in (feeds.get(n) for n in self._feed_order)):
            record: dict[str, tuple | None] = {}
            # (collectives are the identity in this run: only this rank may be planning now,
            # e.g. its first shard of another size, and the shapes do not depend on them)
            with self.rng.aside(), collectives(None):
                self._compile_generic(record, deliver=False).run(feeds, self.xp)
            for n in self._feed_order:
                record[n] = (feeds[n].shape, feeds[n].dtype)
            plan = build_plan(self, record) or False
        self._specialized[key] = plan
        return plan

    def profile(self, feeds: Mapping[str, object], repeat: int = 20) -> dict:
        """Time a run and its kernels: {"run_s", "kernel_s", "dispatch_s", "nodes", "by_op":
        {op: [count, s]}}, medians over `repeat` runs. Kernel time is measured inside the
        steps, around the kernel calls of a second copy of the plan; dispatch_s / nodes is the
        executor's own cost per node (closure call, slot reads and writes, frees): in each
        timed run, its wall time less its kernel time and less the timers' own cost outside
        the intervals they record (calibrated), so the two come from the same run."""
        self.run(feeds)
        self.run(feeds)
        plan = self._specialized.get(self._signature(feeds)) if self.optimize else None
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            self.run(feeds)
            runs.append(time.perf_counter() - t)
        if plan:
            per: list[float] = []
            timed = build_plan(self, plan.record, timers=per)
        else:
            timed, per = self._generic, [0.0] * len(self._generic.steps)
            timed = _Program(timed.slots, timed.template, [_timed(s, per, k) for k, s in
                                                           enumerate(timed.steps)],
                             timed.labels, timed.feeds, timed.outputs)
            timed.by_feed = True
        timed.run(feeds, self.xp)  # (a fresh plan's first run is cold: not counted)
        totals, walls, each = [], [], []
        for _ in range(repeat):
            before = list(per)
            t = time.perf_counter()
            timed.run(feeds, self.xp)
            walls.append(time.perf_counter() - t)
            each.append([a - b for a, b in zip(per, before, strict=True)])
            totals.append(sum(each[-1]))
        outside = _timer_overhead() * len(timed.steps)
        dispatch = [max(0.0, w - k - outside) for w, k in zip(walls, totals, strict=True)]
        by_op: dict[str, list] = {}  # (each node's median over the runs, as the totals are)
        medians = np.median(np.asarray(each), axis=0) if each else np.zeros(len(per))
        for (_, op, _), t in zip(timed.labels, medians, strict=True):
            entry = by_op.setdefault(op, [0, 0.0])
            entry[0] += 1
            entry[1] += float(t)
        return {"run_s": float(np.median(runs)), "kernel_s": float(np.median(totals)),
                "dispatch_s": float(np.median(dispatch)),
                "nodes": len(timed.steps), "by_op": by_op}


def _timer_overhead(calls: int = 2000) -> float:
    """Seconds per call that a `_timed_fn` wrapper adds outside the interval it records."""
    per = [0.0]

    def noop():
        return None
    wrapped = _timed_fn(noop, per, 0)
    clock = time.perf_counter
    best = float("inf")
    for _ in range(3):
        per[0] = 0.0
        t = clock()
        for _ in range(calls):
            noop()
        plain = clock() - t
        t = clock()
        for _ in range(calls):
            wrapped()
        best = min(best, clock() - t - per[0] - plain)
    return max(0.0, best / calls)


def _timed_fn(fn: Callable, per: list, k: int) -> Callable:
    clock = time.perf_counter

    def timed(*args, **kwargs):
        t = clock()
        result = fn(*args, **kwargs)
        per[k] += clock() - t
        return result
    return timed


def _timed(step: Callable, per: list, k: int) -> Callable:
    clock = time.perf_counter

    def timed(env):
        t = clock()
        step(env)
        per[k] += clock() - t
    return timed


_TRASH = "\x00unused"  # slot for outputs the graph leaves unnamed
_DEV = "\x00dev"  # suffix of the device copy of a host value (device executors)
_FOLD_MAX = 1 << 16  # elements: a larger folded tensor made from small inputs is not kept

# Device executors: ops that run on the host when their (data) inputs are host values: the
# shape arithmetic of exported graphs (Shape -> Gather -> Unsqueeze -> Concat -> Reshape).
_HOST_OPS = frozenset("""
Shape Size Gather Concat Unsqueeze Squeeze Reshape Flatten Slice Cast CastLike Identity Add Sub
Mul Div Mod Neg Abs Sign Equal Less Greater LessOrEqual GreaterOrEqual Not And Or Xor Where Range
Max Min ReduceProd ReduceSum ReduceMax ReduceMin Sqrt Floor Ceil Clip Pow Reciprocal Expand Tile
Transpose Split
""".split())
# Inputs an op reads only the dtype or shape of (they may stay on the device).
_METADATA_INPUTS = {"Shape": (0,), "Size": (0,), "CastLike": (1,)}


def _to_device_kernel(xp, x):
    return (xp.asarray(x) if isinstance(x, np.ndarray) and x.dtype.kind not in "OUS" else x,)


def _on_host(fn: Callable) -> Callable:
    """The kernel run with NumPy whatever the executor's array module."""
    def host(_xp, *args, **kwargs):
        return fn(np, *args, **kwargs)
    return host


def _fold(fn: Callable, attrs: dict, inputs: list) -> list | None:
    """fn's outputs on host inputs as NumPy arrays, or None (an error or a non-tensor output
    leaves the node to run time, where its error names the node)."""
    try:
        with np.errstate(all="ignore"):
            results = fn(np, *inputs, **attrs)
    except Exception:  # noqa: BLE001 - see above
        return None
    out = []
    for r in results:
        if isinstance(r, np.generic):
            r = np.asarray(r)
        if not isinstance(r, np.ndarray):
            return None
        out.append(r)
    return out


def _captures(sub) -> list[str]:
    subs = sub if isinstance(sub, list) else [sub]
    return sorted({n for s in subs for n in s.captures})


def _recorder(record: dict, names: Sequence[str], slots: Sequence[int],
              arrays: tuple[type, ...] = (np.ndarray,)) -> Callable:
    pairs = [(n, s) for n, s in zip(names, slots, strict=True) if n]
    arrays = (*arrays, np.generic)

    def rec(env):
        for n, s in pairs:
            v = env[s]
            record[n] = (v.shape, v.dtype) if isinstance(v, arrays) else None
    return rec


def _bound(sub: Subgraph | list[Subgraph], env: Mapping[str, object]):
    if isinstance(sub, list):
        return [_bound(s, env) for s in sub]
    return sub.bind({n: env[n] for n in sub.captures if n in env})


# -- the specialized plan ---------------------------------------------------------------------
# Ops a specialized plan may hold: their output shapes follow from their input shapes and the
# values of their SHAPE_INPUTS slots, which must be constants (after folding) in the plan.
STATIC_OPS = frozenset("""
Add Sub Mul Div Pow Neg Abs Exp Log Sqrt Reciprocal Tanh Relu Sigmoid Erf Gelu Softplus Softsign
LeakyRelu Elu Selu Celu HardSigmoid HardSwish Mish Swish Clip Floor Ceil Round Sign Sin Cos Tan
Not And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual Where Cast CastLike IsNaN IsInf
Max Min Sum Mean Mod PRelu ThresholdedRelu MatMul Gemm Einsum Conv ConvTranspose MaxPool
AveragePool GlobalAveragePool GlobalMaxPool LpPool BatchNormalization LayerNormalization
InstanceNormalization GroupNormalization RMSNormalization Dropout LRN Softmax LogSoftmax Hardmax
ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare ArgMax ArgMin CumSum Reshape Flatten Squeeze Unsqueeze
Transpose Expand Tile Slice Pad Concat Split Gather GatherElements GatherND ScatterElements
ScatterND Scatter Shape Size ConstantOfShape Identity Range OneHot Trilu Constant DepthToSpace
SpaceToDepth SoftmaxCrossEntropyLoss NegativeLogLikelihoodLoss TopK QuantizeLinear DequantizeLinear
RNN GRU LSTM ReverseSequence Resize Upsample Acos Acosh Asin Asinh Atan Atanh Cosh Sinh Shrink
BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BitCast CumProd Det LpNormalization
MeanVarianceNormalization GlobalLpPool GridSample RoiAlign MaxRoiPool DeformConv AffineGrid
Col2Im CenterCropPad MaxUnpool ConvInteger MatMulInteger QLinearConv QLinearMatMul
DynamicQuantizeLinear EyeLike DFT STFT BlackmanWindow HammingWindow HannWindow MelWeightMatrix
Attention RotaryEmbedding SwiGLU LinearAttention CausalConvWithState TensorScatter
""".split())
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4),
                "Pad": (1, 3), "ConstantOfShape": (0,), "Range": (0, 1, 2), "OneHot": (1,),
                "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "TopK": (1,), "CumSum": (1,),
                "Resize": (1, 2, 3), "Upsample": (1,),  # (roi, scales, sizes: read on the host)
                "AffineGrid": (1,), "Col2Im": (1, 2), "CenterCropPad": (1,), "MaxUnpool": (2,),
                "DFT": (1, 2), "STFT": (1, 3), "BlackmanWindow": (0,), "HammingWindow": (0,),
                "HannWindow": (0,), "MelWeightMatrix": (0, 1, 2, 3, 4),
                **{r: (1,) for r in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
                                     "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                                     "ReduceLogSumExp", "ReduceSumSquare")}}
# Inputs a kernel reads on the host (shape-like values, scalars that steer the computation):
# device executors hand them over as host values where they are (SHAPE_INPUTS and more).
HOST_INPUTS = {**SHAPE_INPUTS, "Dropout": (1, 2), "If": (0,), "Loop": (0, 1), "Trilu": (1,),
               "Col2Im": (1, 2), "MaxUnpool": (2,), "Tile": (1, 2)}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_UFUNC2 = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
_UFUNC1 = {"Neg": np.negative, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt, "Tanh": np.tanh,
           "Abs": np.abs, "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil}
_COMPARE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less,
            "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}
_ELEMENTWISE = set(_UFUNC2) | set(_UFUNC1) | {"Relu", "Sum"}  # may write over a dying input
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the system: NumPy kernels
    allocate their results afresh, and a large array that comes back from the system costs a
    page fault per 4 KiB page on first touch (about half the time of a float64 elementwise
    chain on arrays of a few MiB). Process-wide, once; False where glibc is not there."""
    global _TUNED
    with _TUNE_LOCK:
        if _TUNED is not None:
            return _TUNED
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            # mallopt: M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3 (its maximum)
            _TUNED = bool(libc.mallopt(-1, 1 << 30) and libc.mallopt(-2, 64 << 20)
                          and libc.mallopt(-3, 32 << 20))
        except (OSError, AttributeError):
            _TUNED = False
    return _TUNED


_TUNED: bool | None = None
_TUNE_LOCK = threading.Lock()


def build_plan(ex: Executor, record: dict, timers: list | None = None) -> _Program | None:
    """The specialized program of one input-shape signature, from the first run's `record`
    (value -> (shape, dtype)); None when the graph's shapes depend on values. With `timers`
    (a list), every kernel call adds its time to its step's entry there."""
    if any(v is None for v in record.values()):
        return None
    if not ex.on_device:
        tune_allocator()
    shapes = dict(record)
    constants = dict(ex._plan_constants)  # host values (a device plan places them itself)
    keep = set(ex.fetch)
    nodes, alias = simplify(plan_nodes(ex), constants, keep, shapes)
    for k, v in constants.items():
        if k not in shapes:
            shapes[k] = (np.shape(v), np.asarray(v).dtype)
    from trainer.kernels.fused import fuse
    resolved = {alias.get(k, k) for k in keep}
    nodes = fuse(nodes, constants, shapes, resolved, ex.opset, host=not ex.on_device)
    nodes = fold_reshapes_into_reductions(nodes, constants, shapes, resolved)
    if ex.on_device:  # (on a GPU, each chain of elementwise nodes becomes one kernel)
        from trainer.kernels.ewfuse import fuse_elementwise
        nodes = fuse_elementwise(nodes, shapes, resolved)
    elif compiled.enabled():  # (on the host, large chains of exact ops: one compiled loop)
        from trainer.kernels.ewfuse import fuse_elementwise
        nodes = fuse_elementwise(nodes, shapes, resolved, host=True)
    nodes = _stable_order(eliminate_dead(nodes, resolved), set(constants) | set(ex.feeds))
    if nodes is None:
        return None
    for n in nodes:
        # (the engine's own ops with a shape function: SyncBatchNorm's AllReduce, ctc's loss)
        if not n.fused and not _own_static(n) and not getattr(n.fn, "collective", False) and (
                n.op not in STATIC_OPS or n.domain not in ("", "ai.onnx")):
            return None
        # (on a device, also the host-read scalars: a device value there would be read back)
        for k in (HOST_INPUTS if ex.on_device and not n.fused else SHAPE_INPUTS).get(n.op, ()):
            if k < len(n.inputs) and n.inputs[k] and n.inputs[k] not in constants:
                return None
    prog = _compile_static(ex, nodes, constants, shapes, alias, timers)
    prog.record = record
    return prog


def _own_static(n: PNode) -> bool:
    """Whether n runs one of the engine's own kernels with a shape function (CUSTOM_SHAPES)."""
    return n.op in CUSTOM_SHAPES and n.fn is get_kernel(n.op, 1, CUSTOM_DOMAIN)


def _stable_order(nodes: list[PNode], available: set[str]) -> list[PNode] | None:
    """Nodes in dependency order, the given order wherever it already is one (None for a
    cycle or a value nobody makes)."""
    import heapq

    made = {o: k for k, n in enumerate(nodes) for o in n.outputs if o}
    waiting = [0] * len(nodes)
    after: list[list[int]] = [[] for _ in nodes]
    for k, n in enumerate(nodes):
        deps = set()
        for i in n.inputs:
            if i and i not in available:
                if i not in made:
                    return None
                deps.add(made[i])
        waiting[k] = len(deps)
        for d in deps:
            after[d].append(k)
    ready = [k for k in range(len(nodes)) if not waiting[k]]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for j in after[k]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, j)
    return order if len(order) == len(nodes) else None


def _out_impl(n: PNode, shapes: Mapping, constants: Mapping, xp: ModuleType = np):
    """(impl(*inputs, out) -> value, arity) for nodes whose value xp can write into a given
    array as the kernel computes it (on the host exactly: its BLAS shortcuts, and Where's
    product form; on a device through xp's ufuncs, matmul and sums with out=); None
    otherwise."""
    if n.fused:
        make = n.info.get("out_impl")  # (a factory: xp -> (impl, arity))
        return make(xp) if make is not None else None
    if len(n.outputs) != 1 or not n.outputs[0] or n.domain:
        return None
    ins = [shapes.get(i) if i else None for i in n.inputs]
    if any(i and v is None for i, v in zip(n.inputs, ins, strict=True)):
        return None
    host = xp is np
    out_shape, out_dt = shapes[n.outputs[0]]
    dts = [v[1] for v in ins if v is not None]
    floats = out_dt in _FLOATS and all(d == out_dt for d in dts)
    op, a = n.op, n.attrs
    legacy = any(k in a for k in ("broadcast", "axis", "consumed_inputs"))

    def ufunc(table):
        return table[op] if host else getattr(xp, table[op].__name__)
    if op in _UFUNC2 and floats and not legacy and len(ins) == 2:
        uf = ufunc(_UFUNC2)
        return (lambda x, y, out: uf(x, y, out=out)), 2
    if op in _UFUNC1 and floats and not legacy:
        uf = ufunc(_UFUNC1)
        return (lambda x, out: uf(x, out=out)), 1
    if op in _COMPARE and not legacy and len(ins) == 2 and out_dt == np.bool_ \
            and len(set(dts)) == 1 and dts[0].kind in "fiu":
        uf = ufunc(_COMPARE)
        return (lambda x, y, out: uf(x, y, out=out)), 2
    if op == "Where" and host and len(ins) == 3 and out_dt in _FLOATS and ins[0][1] == np.bool_:
        return _where_impl(n, ins, out_dt, constants)
    if op == "Relu" and floats:
        zero = out_dt.type(0)
        return (lambda x, out: xp.maximum(x, zero, out=out)), 1
    if op == "Sum" and floats and len(ins) >= 2:
        def total(*xs):
            *xs, out = xs
            xp.add(xs[0], xs[1], out=out)
            for x in xs[2:]:
                xp.add(out, x, out=out)
            return out
        return total, len(ins)
    # 2-D products on the host through np.dot: the same BLAS call as np.matmul with less
    # overhead per call (1.9 -> 1.0 us for a [16, 64] @ [64, 10]); out is C-contiguous in the
    # operands' dtype.
    _gemm2 = np.dot if host else (lambda x, y, out: xp.matmul(x, y, out=out))
    if op == "MatMul" and floats and len(ins) == 2:
        (sa, _), (sb, _) = ins
        if len(sa) >= 3 and len(sb) == 2:  # one GEMM over the stacked rows
            k, m = sb

            def mm(x, y, out):  # (rows by the shape: -1 is ambiguous where k is 0)
                _gemm2(x.reshape(math.prod(x.shape[:-1]), k), y,
                       out.reshape(math.prod(out.shape[:-1]), m))
                return out
            return mm, 2
        if len(sa) == len(sb) == 2:
            return (lambda x, y, out: _gemm2(x, y, out)), 2
        return (lambda x, y, out: xp.matmul(x, y, out=out)), 2
    if op == "Gemm" and floats and not legacy and len(ins[0][0]) == len(ins[1][0]) == 2:
        ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
        alpha, beta = out_dt.type(a.get("alpha", 1.0)), out_dt.type(a.get("beta", 1.0))

        def gemm(x, w, c, out):
            _gemm2(x.T if ta else x, w.T if tb else w, out)
            if alpha != 1:
                out *= alpha
            if c is not None:
                out += c * beta if beta != 1 else c
            return out
        return gemm, 3
    if op in ("ReduceSum", "ReduceMean") and out_dt in _FLOATS and dts[0] == out_dt:
        # (the axes input, from opset 13/18, is int64: only the data's dtype matters)
        rank = len(ins[0][0])
        ax = _reduce_axes(n, rank, constants)
        if ax is False:
            return None
        keep = bool(a.get("keepdims", 1))
        if not host:
            if op == "ReduceSum":
                return (lambda x, _axes, out: xp.sum(x, axis=ax, keepdims=keep, out=out)), 2
            return (lambda x, _axes, out: xp.mean(x, axis=ax, keepdims=keep, out=out)), 2
        from trainer.kernels.reduce import sum_plan  # (the kernels' own sums: same bits)
        blas = sum_plan(tuple(ins[0][0]), dts[0], tuple(range(rank)) if ax is None else ax, keep)
        if blas is None:
            def total(x, _axes, out):
                x = x if x.flags.c_contiguous else np.ascontiguousarray(x)
                return np.add.reduce(x, axis=ax, keepdims=keep, out=out)
        else:
            def total(x, _axes, out):
                return blas(x if x.flags.c_contiguous else np.ascontiguousarray(x), out)
        if op == "ReduceSum":
            return total, 2
        count = math.prod(ins[0][0]) // max(math.prod(out_shape), 1)

        def mean(x, _axes, out):  # as np.mean: the sum, then one division
            return np.true_divide(total(x, _axes, out), count, out=out)
        return mean, 2
    if op in ("Conv", "ConvTranspose") and floats and ins[0] is not None and \
            a.get("group", 1) >= 1:
        return _conv_impl(n, ins, xp)
    return None


def _reduce_axes(n: PNode, rank: int, constants: Mapping):
    """The axes a ReduceSum/ReduceMean node sums over (None: all), or False where it does
    nothing (no axes and noop_with_empty_axes). The axes input is a constant in a plan."""
    a = n.attrs
    axes = a.get("axes")
    if len(n.inputs) > 1 and n.inputs[1]:  # (the input of opsets 13/18)
        axes = constants[n.inputs[1]].reshape(-1).tolist()
    if not axes:
        return False if a.get("noop_with_empty_axes", 0) else None
    return tuple(sorted({int(v) % max(rank, 1) for v in axes} & set(range(rank))))


def _conv_impl(n: PNode, ins: list, xp: ModuleType):
    """Conv and ConvTranspose written into their output (nn.conv_into and its transpose)."""
    from trainer.kernels import nn
    a = n.attrs
    xs, ws = ins[0][0], ins[1][0]
    kshape = list(ws[2:])
    g = a.get("group", 1)
    if n.op == "Conv":
        strides, dil, pads, osp = nn.conv_geometry(xs, kshape, a.get("strides"),
                                                   a.get("dilations"), a.get("pads"),
                                                   a.get("auto_pad", "NOTSET"))
        return (lambda x, w, b, out: nn.conv_into(xp, x, w, b, strides, dil, pads, osp, g,
                                                   out)), 3
    geo = nn.conv_transpose_geometry(xs, kshape, a.get("strides"), a.get("dilations"),
                                     a.get("pads"), a.get("output_padding"),
                                     a.get("output_shape"), a.get("auto_pad", "NOTSET"))
    return (lambda x, w, b, out: nn.conv_transpose_into(xp, x, w, b, *geo, g, out)), 3


def _where_impl(n: PNode, ins: list, out_dt, constants: Mapping):
    """Where(c, a, b) on floats as products and sums, where one branch is a constant scalar
    (NumPy's select is several times slower): (impl, 3) or None.
    - Where(c, x, 0) = x * c and Where(c, 0, x) = x * ~c (+0 turns -0.0 into 0.0);
    - c constant, the other branch a constant fill f (a causal or padding mask): x * keep +
      fill, with keep = ~c (or c) and fill = f where masked, 0 elsewhere (x + fill alone when f
      is infinite).
    Each is the select for finite x; otherwise (checked in one pass) the select runs. Below
    WHERE_SELECT elements the select is cheaper than the product and its check."""

    def scalar(k):
        v = constants.get(n.inputs[k])
        v = None if v is None else np.asarray(v)
        return v.reshape(()) if v is not None and v.size == 1 and v.dtype == out_dt else None
    fa, fb = scalar(1), scalar(2)
    cond = constants.get(n.inputs[0])
    cond = None if cond is None else np.asarray(cond)
    zero = out_dt.type(0)
    for fill, x_at, keep_if in ((fb, 1, True), (fa, 2, False)):
        if fill is None or ins[x_at][1] != out_dt:
            continue
        if fill == 0 and not np.signbit(fill):
            pick = cond if keep_if or cond is None else np.logical_not(cond)

            def where_zero(c, a, b, out, x_at=x_at, keep_if=keep_if, pick=pick):
                x = a if x_at == 1 else b
                loops = compiled.row_loops()
                if loops is not None and c.shape == x.shape == out.shape and \
                        c.flags.c_contiguous and x.flags.c_contiguous and \
                        out.flags.c_contiguous and c.dtype == np.bool_:  # (one exact pass)
                    loops.select(c.reshape(-1), x.reshape(-1), keep_if, out.reshape(-1))
                    return out
                if out.size <= WHERE_SELECT:
                    np.copyto(out, np.where(c, a, b))
                    return out
                m = c if keep_if else (pick if pick is not None else np.logical_not(c))
                with np.errstate(invalid="ignore", over="ignore"):
                    np.multiply(x, m, out=out)
                    out += zero
                if not squares_finite(out):  # (x not finite where masked: the select's zero)
                    np.copyto(out, np.where(c, a, b))
                return out
            return where_zero, 3
        if cond is None:
            continue
        masked = cond if not keep_if else np.logical_not(cond)  # where the fill goes
        fills = np.where(masked, fill, zero).astype(out_dt)
        keep = None if np.isinf(fill) else np.logical_not(masked).astype(out_dt)

        def where_fill(c, a, b, out, x_at=x_at, fills=fills, keep=keep):
            x = a if x_at == 1 else b
            if out.size <= WHERE_SELECT or not squares_finite(x):
                np.copyto(out, np.where(c, a, b))
                return out
            if keep is None:  # x + (+-inf) is the fill, x + 0 is x
                return np.add(x, fills, out=out)
            np.multiply(x, keep, out=out)  # x * 0 + fill is the fill, x * 1 + 0 is x
            return np.add(out, fills, out=out)
        return where_fill, 3
    return None


def _view_step(n: PNode, shapes: Mapping, i0: int, o: int) -> Callable | None:
    """Reshape-family and Transpose nodes as a prebound NumPy view (as their kernels do)."""
    if n.domain or len(n.outputs) != 1 or n.outputs[0] not in shapes:
        return None
    if n.op in _RESHAPES:
        shape = tuple(shapes[n.outputs[0]][0])

        def reshape(env):
            env[o] = env[i0].reshape(shape)
        return reshape
    if n.op == "Transpose":
        perm = n.attrs.get("perm")
        perm = tuple(perm) if perm is not None else None

        def transpose(env):
            env[o] = env[i0].transpose(perm)
        return transpose
    return None


def _out_step(impl: Callable, ins: tuple[int, ...], o: int, target, shape, dtype,
              empty: Callable = np.empty) -> Callable:
    if target is None:  # the value leaves the run: a new array each time
        if len(ins) == 2:
            i0, i1 = ins

            def fresh2(env):
                env[o] = impl(env[i0], env[i1], empty(shape, dtype))
            return fresh2

        def fresh(env):
            env[o] = impl(*[env[i] for i in ins], empty(shape, dtype))
        return fresh
    if len(ins) == 1:
        i0 = ins[0]

        def into1(env):
            env[o] = impl(env[i0], target)
        return into1
    if len(ins) == 2:
        i0, i1 = ins

        def into2(env):
            env[o] = impl(env[i0], env[i1], target)
        return into2
    if len(ins) == 3:
        i0, i1, i2 = ins

        def into3(env):
            env[o] = impl(env[i0], env[i1], env[i2], target)
        return into3

    def into(env):
        env[o] = impl(*[env[i] for i in ins], target)
    return into


def _compile_static(ex: Executor, nodes: list[PNode], constants: dict, shapes: Mapping,
                    alias: Mapping[str, str], timers: list | None = None) -> _Program:
    """Slots, out= implementations, the memory plan (buffers by liveness, reused by exact
    size; an elementwise node may take over a dying input's buffer) and the closures. On a
    device, the buffers are device memory, and a constant a kernel reads as data is read from
    its device copy (made once); shape-like inputs (HOST_INPUTS) read the host value."""
    xp = ex.xp
    fetch = [(name, alias.get(name, name)) for name in ex.fetch]
    escaping = {v for _, v in fetch} | {alias.get(n, n) for n in ex.on_produced}
    end_of_run = len(nodes)
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v:
                last[v] = i
    for v in escaping:
        last[v] = end_of_run
    impls = [_out_impl(n, shapes, constants, xp) for n in nodes]
    producer = {o: i for i, n in enumerate(nodes) for o in n.outputs if o}
    readers: dict[str, int] = {}
    for n in nodes:
        for v in set(n.inputs):
            readers[v] = readers.get(v, 0) + 1

    # fetch_into: written straight by the producing kernel, through a reshape, or copied.
    dest: dict[str, object] = {}
    bind_after: dict[str, object] = {}
    copy_into: dict[str, object] = {}
    for name, v in fetch:
        d = ex.fetch_into.get(name)
        if d is None:
            continue
        want = shapes.get(v)
        if want is not None and (tuple(d.shape) != tuple(want[0]) or d.dtype != want[1]):
            raise ModelError(f"fetch_into['{name}'] is {d.dtype}{list(d.shape)} but the value "
                             f"is {want[1]}{list(want[0])}; pass an array of that shape and "
                             "dtype")
        i = producer.get(v)
        if i is None or v in dest or v in bind_after or v in copy_into:
            continue  # a constant, a feed or a second name: copied when the run ends
        if impls[i] is not None:
            dest[v] = d
        elif (nodes[i].op in _RESHAPES and d.flags.c_contiguous
              and nodes[i].inputs[0] in producer
              and impls[producer[nodes[i].inputs[0]]] is not None
              and readers.get(nodes[i].inputs[0]) == 1
              and nodes[i].inputs[0] not in escaping and nodes[i].inputs[0] not in dest):
            u = nodes[i].inputs[0]
            dest[u] = d.reshape(shapes[u][0])
            bind_after[v] = d
        else:
            copy_into[v] = d

    # Virtual buffers: each value an out= kernel writes owns one; other values may alias the
    # buffers of their inputs (views, kernels returning an input), so they keep them alive.
    roots: dict[str, frozenset] = {}
    for i, n in enumerate(nodes):
        inherited = frozenset().union(*[roots.get(u, frozenset()) for u in n.inputs if u])
        for o in n.outputs:
            if not o:
                continue
            if impls[i] is not None and o not in dest:
                roots[o] = frozenset({o})
            elif o in dest:
                roots[o] = frozenset()
            else:
                roots[o] = inherited
    end: dict[str, int] = {}
    escapes: set[str] = set()
    for v, rs in roots.items():
        for r in rs:
            end[r] = max(end.get(r, producer[r]), last.get(v, producer[v]))
            if v in escaping:
                escapes.add(r)

    # Physical buffers, by exact byte size.
    free: dict[int, list[np.ndarray]] = {}
    phys: dict[str, np.ndarray] = {}
    expiring: dict[int, list[str]] = {}
    for r, e in end.items():
        expiring.setdefault(e, []).append(r)
    targets: dict[str, object] = {}
    released: set[str] = set()
    for i, n in enumerate(nodes):
        o = n.outputs[0] if n.outputs else ""
        if impls[i] is not None and o in roots and o not in dest and o not in escapes:
            shape, dt = shapes[o]
            nbytes = int(np.prod(shape)) * dt.itemsize
            buf = None
            if n.op in _ELEMENTWISE:
                # Sum adds pairwise into its output: its first add reads inputs 0 and 1 and
                # writes the output, so only their buffers can be taken over, and only by a
                # value the later adds do not read again.
                for u in ([v for v in n.inputs[:2] if v not in n.inputs[2:]]
                          if n.op == "Sum" else n.inputs):
                    others = [roots.get(v, ()) for v in n.inputs if v and v != u]
                    if (u in phys and u not in released and end.get(u) == i
                            and shapes[u] == (shape, dt) and u not in escapes
                            and not any(u in rs for rs in others)):
                        buf = phys[u]
                        released.add(u)
                        break
            if buf is None:
                pool = free.get(nbytes)
                buf = pool.pop() if pool else xp.empty(max(nbytes, 1), np.uint8)
            phys[o] = buf
            targets[o] = buf[:nbytes].view(dt).reshape(shape)
        for r in expiring.get(i, ()):
            if r in phys and r not in released:
                released.add(r)
                free.setdefault(_nbytes(shapes[r]), []).append(phys[r])

    # Slots and closures.
    slots: dict[str, int] = {"": 0, _TRASH: 1}

    def slot(name: str) -> int:
        if name not in slots:
            slots[name] = len(slots)
        return slots[name]

    reads = [list(n.inputs) for n in nodes]  # per node: the value names its kernel reads
    if ex.on_device:
        device_consts: dict[str, object] = {}

        def on_device(v: str) -> str:
            dev = v + _DEV
            if dev not in device_consts:
                device_consts[dev] = ex._device_constant(v, constants[v])
            return dev
        for n, names in zip(nodes, reads, strict=True):
            host_read = () if n.fused else (*HOST_INPUTS.get(n.op, ()),
                                            *_METADATA_INPUTS.get(n.op, ()))
            for k, v in enumerate(names):
                if v in constants and k not in host_read:
                    names[k] = on_device(v)
        fetch = [(name, on_device(v) if v in constants else v) for name, v in fetch]
        constants = {**constants, **device_consts}
    used_consts = {v for names in reads for v in names if v in constants}
    used_consts |= {v for _, v in fetch if v in constants}
    for name in sorted(used_consts):
        slot(name)
    feed_slots = [(name, slot(name)) for name in sorted(ex.feeds) if name not in constants
                  or name in used_consts]
    steps, labels = [], []
    pooled = {o for o in targets} | set(dest)
    for i, n in enumerate(nodes):
        outs = tuple(slot(o) if o else 1 for o in n.outputs)
        impl = impls[i]
        kernel = n.fn
        if timers is not None:
            timers.append(0.0)
            kernel = _timed_fn(n.fn, timers, i)
            if impl is not None:
                impl = (_timed_fn(impl[0], timers, i), impl[1])
        if impl is not None:
            fn, arity = impl
            names = reads[i] + [""] * (arity - len(n.inputs))
            ins = tuple(slot(v) for v in names[:arity])
            o = n.outputs[0]
            target = dest.get(o, targets.get(o))
            shape, dt = shapes[o]
            step = _out_step(fn, ins, outs[0], target, shape, dt, xp.empty)
        else:
            ins = tuple(slot(v) for v in reads[i])
            step = _view_step(n, shapes, ins[0], outs[0]) if ins else None
            if step is None:
                step = _call_step(kernel, n.attrs, ins, outs, xp)
        for o, s in zip(n.outputs, outs, strict=True):
            if o in bind_after:
                step = _then(step, lambda env, s=s, d=bind_after[o]: env.__setitem__(s, d))
            if o in copy_into:
                def copy(env, s=s, d=copy_into[o]):
                    xp.copyto(d, env[s])
                    env[s] = d
                step = _then(step, copy)
            for name in ex.on_produced:
                if alias.get(name, name) == o and o:
                    step = _then(step, lambda env, s=s, cb=ex.on_produced[name]: cb(env[s]))
        frees = tuple(slots[v] for v in n.inputs if v and last.get(v) == i and v not in pooled
                      and v not in constants and v not in escaping)
        frees += tuple(s for o, s in zip(n.outputs, outs, strict=True)
                       if o and o not in last and o not in escaping and s != 1)
        steps.append(_with_frees(step, tuple(dict.fromkeys(frees))))
        labels.append((n.name, n.op, tuple(n.inputs)))
    template: list = [None] * len(slots)
    for name in used_consts:
        template[slots[name]] = constants[name]
    outputs = {}
    for name, v in fetch:
        outputs[name] = slots[v] if v in slots else slot(v)
    if len(template) < len(slots):
        template += [None] * (len(slots) - len(template))
    prog = _Program(slots, template, steps, labels, feed_slots, outputs)
    prog.buffers = sum(b.nbytes for b in {id(b): b for b in phys.values()}.values())
    prog.nodes = nodes
    return prog


def _nbytes(shape_dtype) -> int:
    shape, dt = shape_dtype
    return int(np.prod(shape)) * dt.itemsize


def plan_nodes(ex: Executor) -> list[PNode]:
    """The executor's nodes as PNodes for the planner (before any device placement)."""
    return [PNode(op, list(ins), list(outs), dict(attrs), name, fn,
                  subs=subs) for (fn, attrs, ins, outs, name, op, subs) in ex._plan_steps]


__all__ = ["Executor", "Subgraph", "eliminate_dead", "missing_kernels", "plan_nodes", "probe",
           "simplify"]


def probe(model: onnx.ModelProto, shapes: Mapping[str, tuple],
          dtypes: Mapping[str, np.dtype], values: Mapping[str, np.ndarray] | None = None
          ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor value, by running the graph once (NumPy) on `values`
    where given (inputs whose values decide shapes) and zeros elsewhere. Each value is freed
    after its last reader, as in training (keeping them all made this run, at the full batch
    while the training graph is built, the process's peak: 4.3 GB against 1.2 GB for the
    steps of a small ResNet at batch 1024)."""
    ex = Executor(model, np, optimize=False)
    feeds = {k: np.zeros(shapes[k], dtype=dtypes[k]) for k in shapes}
    feeds.update({k: np.asarray(v) for k, v in (values or {}).items()})
    ex._check_feeds(feeds)
    record: dict[str, tuple | None] = {}
    with np.errstate(all="ignore"):  # (zeros: a Sqrt's gradient divides by zero, harmlessly)
        ex._compile_generic(record, deliver=False).run(feeds, np)
    found = {k: (tuple(v.shape), v.dtype) for k, v in ex.constants.items()}
    found.update((k, (tuple(np.shape(v)), np.asarray(v).dtype)) for k, v in feeds.items()
                 if k in ex._generic.slots and v is not None and not isinstance(v, list))
    found.update((k, (tuple(v[0]), v[1])) for k, v in record.items() if v is not None)
    return found
