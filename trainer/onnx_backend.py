"""`onnx.backend.base.Backend` over the executor: ONNX's standard entry point for running models.

    from trainer import onnx_backend
    rep = onnx_backend.prepare(model, "CPU")
    outputs = rep.run([x])          # or rep.run({"x": x}); outputs in graph-output order
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.backend.base import Backend, BackendRep, namedtupledict

from trainer.backend import cupy_or_none, get_xp, to_host
from trainer.executor import Executor
from trainer.graph import np_dtype


def _host(value):
    """Device arrays back to NumPy; sequences element-wise; None (empty optional) stays."""
    if isinstance(value, list | tuple):
        return [_host(v) for v in value]
    if value is None or isinstance(value, np.ndarray):
        return value
    return to_host(value)


def _own(value, fed: list):
    """An output that views an input's memory (Identity, Reshape, Squeeze) as a copy, as
    onnxruntime returns it: writing into the output changed the caller's input."""
    if isinstance(value, list):
        return [_own(v, fed) for v in value]
    if isinstance(value, np.ndarray) and any(np.may_share_memory(value, f) for f in fed):
        return value.copy()
    return value


class TrainerRep(BackendRep):
    """A model planned once by the executor; `run` may be called many times."""

    def __init__(self, model: onnx.ModelProto, device: str = "CPU"):
        self.xp = get_xp("gpu" if device.upper().startswith("CUDA") else "cpu")
        self.model = model
        inits = {t.name for t in model.graph.initializer}
        self.all_inputs = [vi.name for vi in model.graph.input]
        # IR < 4 models list initializers as inputs: positional inputs fill the others first.
        self.data_inputs = [n for n in self.all_inputs if n not in inits]
        self.outputs = [vi.name for vi in model.graph.output]
        self.types = {}  # the NumPy type of each tensor input that declares one
        for vi in model.graph.input:
            code = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            try:
                self.types[vi.name] = np.dtype(np_dtype(code)) if code else None
            except (KeyError, TypeError, ValueError):
                self.types[vi.name] = None
        self.executor = Executor(model, self.xp)

    def _feeds(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
            unknown = [k for k in feeds if k not in self.all_inputs]
            if unknown:
                raise ValueError(f"no model input named {', '.join(map(repr, unknown))} "
                                 f"(inputs: {', '.join(self.all_inputs)})")
        else:
            if not isinstance(inputs, Sequence) or isinstance(inputs, str | bytes):
                inputs = [inputs]
            names = self.all_inputs if len(inputs) > len(self.data_inputs) else \
                self.data_inputs
            if len(inputs) > len(names):
                raise ValueError(f"model takes {len(names)} inputs, got {len(inputs)}")
            feeds = dict(zip(names, inputs, strict=False))
        for name, value in feeds.items():  # (as onnxruntime: a FLOAT input fed int64 values
            want = self.types.get(name)    # computed x / 2 in integers)
            if want is not None and isinstance(value, np.ndarray) and value.dtype != want:
                raise TypeError(f"input '{name}' is {value.dtype}, but the model declares "
                                f"{want}; convert it (np.asarray(x, np.{want}))")
        return feeds

    def _to_device(self, v):
        """Arrays (and sequences of them) to the device; strings stay on the host."""
        if isinstance(v, list | tuple):
            return [self._to_device(a) for a in v]
        if isinstance(v, np.ndarray) and v.dtype != object:
            return self.xp.asarray(v)
        return v

    def run(self, inputs: Any, planned: bool = True, **kwargs: Any) -> tuple[Any, ...]:
        """`planned=False` runs the executor's unspecialized program (no plan)."""
        feeds = self._feeds(inputs)
        if self.xp is not np:
            feeds = {k: self._to_device(v) for k, v in feeds.items()}
        got = self.executor.run(feeds) if planned else self.executor.run_unplanned(feeds)
        fed = [v for v in feeds.values() if isinstance(v, np.ndarray)]
        return namedtupledict("Outputs", self.outputs)(*[_own(_host(got[o]), fed)
                                                         for o in self.outputs])


class TrainerBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        from trainer.executor import missing_kernels
        return cls.supports_device(device) and not missing_kernels(model, lowered=True)

    @classmethod
    def prepare(cls, model: onnx.ModelProto | str | bytes, device: str = "CPU",
                **kwargs: Any) -> TrainerRep:
        if isinstance(model, str | os.PathLike):
            model = onnx.load(os.fspath(model))
        elif isinstance(model, bytes):
            model = onnx.load_from_string(model)
        super().prepare(model, device, **kwargs)  # onnx.checker
        from trainer.contrib import lower_contrib
        return TrainerRep(lower_contrib(model), device)  # (onnxruntime's fused nodes lowered)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> tuple[Any, ...]:
        """Run one node on inputs given in the node's input order (absent optionals skipped)."""
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        names = [n for n in node.input if n]
        if isinstance(inputs, Mapping):  # (by name: their order was taken for the node's)
            unknown = [k for k in inputs if k not in names]
            missing = [n for n in names if n not in inputs]
            if unknown or missing:
                raise ValueError(f"node {node.op_type} takes inputs {', '.join(names)}; "
                                 + (f"no input named {', '.join(map(repr, unknown))}"
                                    if unknown else f"{', '.join(missing)} not given"))
            inputs = [inputs[n] for n in names]
        arrays = list(inputs)
        if len(arrays) != len(names):
            raise ValueError(f"node takes {len(names)} inputs, got {len(arrays)}")
        vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(
            np.asarray(a).dtype), list(np.shape(a))) for n, a in zip(names, arrays, strict=True)]
        outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = helper.make_graph([node], "run_node", vis, outs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain, opset)])
        rep = TrainerRep(model, device)
        return rep.run(arrays)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        d = device.upper()
        if d.startswith("CPU"):
            return True
        return d.startswith("CUDA") and cupy_or_none() is not None


prepare = TrainerBackend.prepare
run_model = TrainerBackend.run_model
run_node = TrainerBackend.run_node
supports_device = TrainerBackend.supports_device
