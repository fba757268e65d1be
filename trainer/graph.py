"""ModelProto helpers: safe loading, topological order, attributes, initializers, dtypes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.errors import ModelError

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model; external data must stay inside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for corrupt files
        raise ModelError(f"cannot parse ONNX model {path}: {exc}") from None
    _check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelError(f"cannot load external data of {path}: {exc}") from None
    check_model(model, str(path))
    return model


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    root = base.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise ModelError(
                f"initializer '{tensor.name}' points to external data '{location}' outside the "
                f"model's folder {root}; refusing to read it")


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(sub)


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{what} is not a valid ONNX model: {first}") from None


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    return 0


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def attr_value(attr: onnx.AttributeProto):
    """Python value of an attribute; float32 attributes read as their shortest decimal.

    ONNX stores float attributes as float32 (momentum 0.9 arrives as 0.8999999762). Reading the
    shortest decimal that rounds to the same float32 gives back the intended value, which keeps
    float64 verification runs faithful and changes nothing in float32.
    """
    value = helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.FLOAT:
        return float(str(np.float32(value)))
    if attr.type == onnx.AttributeProto.FLOATS:
        return [float(str(np.float32(v))) for v in value]
    if attr.type == onnx.AttributeProto.STRING:
        return value.decode()
    if attr.type == onnx.AttributeProto.STRINGS:
        return [v.decode() for v in value]
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(value)
    return value


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: attr_value(a) for a in node.attribute}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def topo_sort(nodes: list[onnx.NodeProto], available: Iterable[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before use (stable for sorted graphs)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready})
            raise ModelError(f"graph has a cycle or undefined inputs: {', '.join(missing[:10])}")
        pending = rest
    return ordered


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def input_shapes(model: onnx.ModelProto, batch_size: int | None = None,
                 overrides: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple]:
    """Concrete shapes of the graph inputs (not initializers): a symbolic first (batch)
    dimension takes batch_size; other symbolic dimensions need the input's shape in
    `overrides`."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if overrides and vi.name in overrides:
            shapes[vi.name] = tuple(overrides[vi.name])
            continue
        dims = []
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif axis == 0 and batch_size is not None:
                dims.append(batch_size)
            else:
                what = "batch dimension" if axis == 0 else f"dimension {axis}"
                raise ModelError(f"input '{vi.name}' has a symbolic {what} "
                                 f"'{d.dim_param or '?'}'; give "
                                 + ("a batch size" if axis == 0 else "the input's full shape "
                                    f"(e.g. --shape {vi.name}=...)"))
        shapes[vi.name] = tuple(dims)
    return shapes


def input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    return {vi.name: np_dtype(vi.type.tensor_type.elem_type) for vi in model.graph.input}


class NameScope:
    """Hands out tensor names unique within a graph, deterministic for the same graph."""

    def __init__(self, taken: Iterable[str]):
        self.taken = set(taken)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    names |= {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.discard("")
    return names


def convert_floats(model: onnx.ModelProto, src=np.float32, dst=np.float64) -> onnx.ModelProto:
    """Copy of the model computing in `dst` wherever it computed in `src`.

    Converts initializers, Constant/ConstantOfShape values, graph input/output and value_info
    types, Cast/CastLike targets and normalization stash types, in subgraphs too; `precision:
    fp64` verification runs use float32 -> float64.
    """
    import copy

    S, D = elem_type(src), elem_type(dst)
    m = copy.deepcopy(model)

    def conv_tensor(t: onnx.TensorProto) -> None:
        if t.data_type == S:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dst), t.name))

    def conv_graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            conv_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            _conv_type(vi.type, S, D)
        for node in g.node:
            if (node.op_type in _STASHED and S == onnx.TensorProto.FLOAT
                    and not any(a.name == "stash_type" for a in node.attribute)
                    and "stash_type" in onnx.defs.get_schema(
                        node.op_type, max(opset_of(m), 1)).attributes):
                # the default stash type is float32: statistics follow the conversion
                node.attribute.append(helper.make_attribute("stash_type", D))
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    conv_graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        conv_graph(sub)
                elif a.name in ("to", "output_dtype") and a.type == onnx.AttributeProto.INT \
                        and a.i == S and node.op_type in ("Cast", "RandomNormal",
                                                            "RandomUniform", "RandomNormalLike",
                                                            "RandomUniformLike", "EyeLike"):
                    a.i = D
                elif a.name == "dtype" and a.type == onnx.AttributeProto.INT and a.i == S:
                    a.i = D
                elif a.name == "stash_type" and a.i == S:
                    a.i = D

    conv_graph(m.graph)
    return m


# Ops whose statistics are computed in their `stash_type` (default float32).
_STASHED = ("LayerNormalization", "RMSNormalization", "GroupNormalization")


def _conv_type(t: onnx.TypeProto, S: int, D: int) -> None:
    """Convert a (possibly nested sequence/optional) tensor type from S to D in place."""
    kind = t.WhichOneof("value")
    if kind == "tensor_type" and t.tensor_type.elem_type == S:
        t.tensor_type.elem_type = D
    elif kind == "sequence_type":
        _conv_type(t.sequence_type.elem_type, S, D)
    elif kind == "optional_type":
        _conv_type(t.optional_type.elem_type, S, D)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    return convert_floats(model, np.float32, np.float64)


def inference_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of the model as it runs for evaluation and deployment: Dropout off and
    BatchNormalization on its running statistics (models exported in training form carry
    `training_mode` inputs and attributes, and BatchNormalization outputs of batch statistics,
    which become copies of the running statistics here). Models already in inference form come
    back unchanged."""
    import copy

    m = copy.deepcopy(model)
    g = m.graph
    taken = all_names(g)
    scope = NameScope(taken)
    opset = opset_of(m)
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        a = {at.name: at for at in node.attribute}
        if node.op_type == "BatchNormalization" and (
                ("training_mode" in a and a["training_mode"].i) or
                (opset < 9 and len(node.output) > 1 and not ("is_test" in a and a["is_test"].i))):
            extra = list(node.output[1:])
            del node.output[1:]
            for name in ("training_mode", "is_test"):
                if name in a:
                    a[name].i = 0 if name == "training_mode" else 1
            nodes.append(node)
            # running_mean/var outputs keep the input statistics; saved batch stats likewise
            for out, src in zip(extra, [node.input[3], node.input[4]] * 2, strict=False):
                if out:
                    nodes.append(helper.make_node("Identity", [src], [out],
                                                  name=scope.fresh(f"{out}/Inference")))
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            off = scope.fresh(f"{node.name or node.output[0]}/training_mode_off")
            g.initializer.append(numpy_helper.from_array(np.array(False), off))
            if m.ir_version < 4:
                g.input.append(helper.make_tensor_value_info(off, onnx.TensorProto.BOOL, []))
            node.input[2] = off
            nodes.append(node)
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return m
