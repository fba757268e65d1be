"""Plan an ONNX graph once (order, kernels, attributes, liveness) and run it on xp arrays.

Graph attributes (If/Loop/Scan bodies) are planned once with the outer plan; they see the
outer scope's values. Sequences are Python lists of arrays; an empty optional is None.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.backend import StepRNG, to_device
from trainer.errors import ModelError, UnsupportedOpError
from trainer.graph import attrs_of, initializers, node_name, opset_of, topo_sort
from trainer.kernels import get_kernel


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


# Ops whose kernel is built from the enclosing graph: (domain, op) -> since version.
GRAPH_KERNEL_OPS = {("ai.onnx.preview.training", "Gradient"): 1}


def graph_kernel(node: onnx.NodeProto):
    """For ops whose kernel is built from the enclosing graph (ai.onnx.preview.training's
    Gradient): factory(model, graph, node) -> fn(xp, *inputs); None for ordinary ops."""
    if node.domain == "ai.onnx.preview.training" and node.op_type == "Gradient":
        from trainer.autodiff.gradient_op import gradient_kernel
        return gradient_kernel
    return None


def _missing(model: onnx.ModelProto, graph: onnx.GraphProto, prefix: str
             ) -> list[tuple[str, str]]:
    out = []
    for i, node in enumerate(graph.node):
        name = prefix + node_name(node, i)
        if get_kernel(node.op_type, opset_of(model, node.domain), node.domain) is None \
                and graph_kernel(node) is None:
            out.append((node.op_type, name))
        for attr, graphs in subgraphs(node):
            for k, g in enumerate(graphs):
                sub = f"{name}/{attr}" + (f"[{k}]" if len(graphs) > 1 else "")
                out += _missing(model, g, sub + "/")
    return out


def missing_kernels(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Every (op_type, node name) of the graph and its subgraphs that has no forward kernel.

    Nodes inside a subgraph are named by path: `loop/body/Add_3`."""
    return _missing(model, model.graph, "")


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
        out = self.plan.run(feeds)
        return [out[n] for n in self.output_names]


class Executor:
    """Runs one graph many times: everything per-graph is decided in __init__.

    `feeds` names the values given at each run (graph inputs, and initializers such as trained
    parameters that change between runs); the other initializers become device constants.
    """

    def __init__(self, model: onnx.ModelProto, xp: ModuleType = np,
                 feeds: Iterable[str] = (), fetch: Iterable[str] | None = None,
                 seed: int = 0, keep_all: bool = False):
        missing = missing_kernels(model)
        if missing:
            raise UnsupportedOpError("forward kernel", missing)
        graph = model.graph
        inits = initializers(model)
        # Graph inputs that are also initializers (legal; usual before IR 4) keep their value
        # as a default, which a feed may override like any other constant.
        feeds = set(feeds) | {v.name for v in graph.input if v.name not in inits}
        fetch = list(fetch) if fetch is not None else [o.name for o in graph.output]
        self._plan(model, graph, inits, xp, StepRNG(xp, seed), feeds, fetch, keep_all)

    @classmethod
    def _subgraph(cls, model: onnx.ModelProto, graph: onnx.GraphProto, xp: ModuleType,
                  rng: StepRNG) -> Subgraph:
        """Plan a graph attribute: its formal inputs and outer-scope reads are its feeds."""
        captures = outer_names(graph)
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        feeds = {v.name for v in graph.input} | captures
        plan = object.__new__(cls)
        plan._plan(model, graph, inits, xp, rng, feeds, [o.name for o in graph.output], False)
        return Subgraph(plan, graph, captures)

    def _plan(self, model, graph, inits, xp, rng, feeds, fetch, keep_all) -> None:
        self.xp = xp
        self.feeds = set(feeds)
        self.constants = {k: to_device(xp, v) for k, v in inits.items() if k not in self.feeds}
        available = self.feeds | set(self.constants)
        deps = topo_sort([_Deps(_reads(n), n.output, n) for n in graph.node], available)
        self.fetch = fetch
        self.rng = rng
        self.steps = [self._bind(model, d.node, i, graph) for i, d in enumerate(deps)]
        self.keep_all = keep_all
        last_use: dict[str, int] = {}
        for i, d in enumerate(deps):
            for name in d.input:
                last_use[name] = i
        keep = set(self.fetch)
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

    def run(self, feeds: Mapping[str, object]) -> dict[str, object]:
        """Run the graph; returns the fetched values (all values when keep_all)."""
        xp = self.xp
        env = dict(self.constants)
        env.update(feeds)
        env[""] = None
        for (fn, attrs, ins, outs, name, op, subs), frees in zip(self.steps, self.free_after,
                                                                 strict=True):
            try:
                args = [env[i] for i in ins]
            except KeyError as exc:
                raise ModelError(f"node '{name}' ({op}): input {exc} was not provided") from None
            try:
                if subs:
                    attrs = {**attrs, **{k: _bound(s, env) for k, s in subs}}
                results = fn(xp, *args, **attrs)
            except Exception as exc:
                shapes = [getattr(env.get(i), "shape", None) for i in ins]
                raise ModelError(f"node '{name}' ({op}) failed on input shapes {shapes}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            for o, r in zip(outs, results, strict=False):
                if o:
                    env[o] = r
            for f in frees:
                env.pop(f, None)
        if self.keep_all:
            env.pop("")
            return env
        return {k: env[k] for k in self.fetch}


def _bound(sub: Subgraph | list[Subgraph], env: Mapping[str, object]):
    if isinstance(sub, list):
        return [_bound(s, env) for s in sub]
    return sub.bind({n: env[n] for n in sub.captures})


def probe(model: onnx.ModelProto, shapes: Mapping[str, tuple],
          dtypes: Mapping[str, np.dtype], values: Mapping[str, np.ndarray] | None = None
          ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor value, by running the graph once (NumPy) on `values`
    where given (inputs whose values decide shapes) and zeros elsewhere."""
    ex = Executor(model, np, keep_all=True)
    feeds = {k: np.zeros(shapes[k], dtype=dtypes[k]) for k in shapes}
    feeds.update({k: np.asarray(v) for k, v in (values or {}).items()})
    env = ex.run(feeds)
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in env.items()
            if v is not None and not isinstance(v, list)}
