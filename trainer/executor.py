"""Plan an ONNX graph once (order, kernels, attributes, liveness) and run it on xp arrays."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from types import ModuleType

import numpy as np
import onnx

from trainer.backend import StepRNG, to_device
from trainer.errors import ModelError, UnsupportedOpError
from trainer.graph import attrs_of, initializers, node_name, opset_of, topo_sort
from trainer.kernels import get_kernel


def missing_kernels(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Every (op_type, node name) of the graph that has no forward kernel."""
    out = []
    for i, node in enumerate(model.graph.node):
        if get_kernel(node.op_type, opset_of(model, node.domain), node.domain) is None:
            out.append((node.op_type, node_name(node, i)))
    return out


class Executor:
    """Runs one graph many times: everything per-graph is decided in __init__.

    `feeds` names the values given at each run (graph inputs, and initializers such as trained
    parameters that change between runs); the other initializers become device constants.
    """

    def __init__(self, model: onnx.ModelProto, xp: ModuleType = np,
                 feeds: Iterable[str] = (), fetch: Iterable[str] | None = None,
                 seed: int = 0, keep_all: bool = False):
        self.xp = xp
        graph = model.graph
        missing = missing_kernels(model)
        if missing:
            raise UnsupportedOpError("forward kernel", missing)
        inits = initializers(model)
        # Graph inputs that are also initializers (legal; usual before IR 4) keep their value
        # as a default, which a feed may override like any other constant.
        self.feeds = set(feeds) | {v.name for v in graph.input if v.name not in inits}
        self.constants = {k: to_device(xp, v) for k, v in inits.items() if k not in self.feeds}
        available = self.feeds | set(self.constants)
        nodes = topo_sort(list(graph.node), available)
        self.fetch = list(fetch) if fetch is not None else [o.name for o in graph.output]
        self.rng = StepRNG(xp, seed)
        self.steps = [self._bind(model, node, i) for i, node in enumerate(nodes)]
        self.keep_all = keep_all
        last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.input:
                last_use[name] = i
        keep = set(self.fetch)
        self.free_after: list[tuple[str, ...]] = [() for _ in nodes]
        if not keep_all:
            frees: dict[int, list[str]] = {}
            for name, i in last_use.items():
                if name and name not in keep:
                    frees.setdefault(i, []).append(name)
            for node_index, node in enumerate(nodes):  # outputs nobody reads die at once
                for name in node.output:
                    if name and name not in last_use and name not in keep:
                        frees.setdefault(node_index, []).append(name)
            self.free_after = [tuple(frees.get(i, ())) for i in range(len(nodes))]

    def _bind(self, model, node, index):
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
        return (fn, attrs, tuple(node.input), tuple(node.output), name, node.op_type)

    def run(self, feeds: Mapping[str, object]) -> dict[str, object]:
        """Run the graph; returns the fetched values (all values when keep_all)."""
        xp = self.xp
        env = dict(self.constants)
        env.update(feeds)
        env[""] = None
        for (fn, attrs, ins, outs, name, op), frees in zip(self.steps, self.free_after,
                                                           strict=True):
            try:
                results = fn(xp, *[env[i] for i in ins], **attrs)
            except KeyError as exc:
                raise ModelError(f"node '{name}' ({op}): input {exc} was not provided") from None
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


def probe(model: onnx.ModelProto, shapes: Mapping[str, tuple],
          dtypes: Mapping[str, np.dtype]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every value, by running the graph once on zeros (NumPy)."""
    ex = Executor(model, np, keep_all=True)
    feeds = {k: np.zeros(shapes[k], dtype=dtypes[k]) for k in shapes}
    env = ex.run(feeds)
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in env.items()
            if v is not None}
