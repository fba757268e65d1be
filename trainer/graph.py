"""ModelProto helpers: safe loading, topological order, attributes, initializers, dtypes."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.errors import ModelError

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}

# the location of a stub initializer's "external data": its values are not in the proto
# (trainer.memory.is_stub), but held elsewhere (trainer.executor.SharedValues) or never read
STUB_LOCATION = "onnx-trainer:not-loaded"
# the arrays that stubs stand for while a block runs (stub_values): a run's set-up reads the
# model's values once, into arrays, and builds its training graphs from protos of stubs
_STUB_VALUES: contextvars.ContextVar[Mapping | None] = contextvars.ContextVar(
    "onnx_trainer_stub_values", default=None)


def is_stub_tensor(t: onnx.TensorProto) -> bool:
    """Whether initializer `t` is a stub: its values held outside the proto (STUB_LOCATION)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == STUB_LOCATION for e in t.external_data)


def values_unknown(t: onnx.TensorProto) -> bool:
    """Whether tensor `t`'s values cannot be read here (tensor_value): external data left on
    disk, or a stub outside a stub_values block that holds its name (the memory estimate's
    stripped models: value-dependent choices are then left as they fall without values)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return False
    source = _STUB_VALUES.get()
    return not is_stub_tensor(t) or source is None or t.name not in source


def tensor_value(t: onnx.TensorProto, values: Mapping | None = None) -> np.ndarray:
    """The value of tensor `t`: its own, or where `t` is a stub the array that `values`, else
    the innermost `stub_values` block, holds for its name (in `t`'s type). A stub's array is
    the run's own, shared: read-only, never to be changed in place (a copy where it is)."""
    if not is_stub_tensor(t):
        return numpy_helper.to_array(t)
    for source in (values, _STUB_VALUES.get()):
        if source is not None and t.name in source:
            value = np.asarray(source[t.name])
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
            return value if value.dtype == dtype else value.astype(dtype)
    raise ModelError(f"internal error: initializer '{t.name}' holds no values here and none "
                     "were given for it")


@contextlib.contextmanager
def stub_values(values: Mapping):
    """While the block runs, stubs are read (tensor_value) from `values` (name -> array)."""
    token = _STUB_VALUES.set(values)
    try:
        yield
    finally:
        _STUB_VALUES.reset(token)


# ops whose output's size follows the values of their input, not its shape alone
DATA_SIZED = ("NonZero", "Unique", "Compress", "NonMaxSuppression")
# ops whose output's size is given by an input's values: {op: those inputs}
_SIZE_INPUTS = {"Split": (1,), "Reshape": (1,), "Expand": (1,), "Tile": (1,),
                "ConstantOfShape": (0,), "Range": (0, 1, 2), "Slice": (1, 2, 3, 4),
                "Pad": (1,), "TopK": (1,), "Resize": (2, 3), "Upsample": (1,), "OneHot": (1,)}
# ops whose output has the shape of their first input whatever the others hold
_SHAPED_BY_FIRST = frozenset({"ScatterND", "ScatterElements", "Scatter"})


def data_sized(nodes, fixed, seed=()) -> set[str]:
    """Values whose shape may follow the data, for nodes given as (op, domain, inputs,
    outputs) in order, where `fixed(name)` says a value is known before the run (an
    initializer, a constant): the outputs of DATA_SIZED ops (the rows a sparse mixture of
    experts routes to each expert); of ops whose sizes are an input's values that come from
    the data, not from shapes (GraniteMoE splits its tokens by counts of the router's
    choices); and of the nodes whose output shape follows such a value (not a scatter into a
    tensor of fixed shape: the residual stream the experts' rows are added back into keeps
    its shape); and of control flow the data decides (an If on a condition from the data,
    whose branches may give other shapes; a Loop, sequence ops). `seed`: values known to be
    data-sized already (the outer graph's, read by a subgraph)."""
    return _sizes(nodes, fixed, seed)[0]


def from_shapes(nodes, fixed) -> set[str]:
    """Values computed from shapes and constants alone (known when the training graph is
    built, whatever values the data holds), for nodes and `fixed` as in data_sized."""
    return _sizes(nodes, fixed)[1]


# control flow and sequence ops whose outputs' shapes may follow the data (an If only on a
# condition that is not known before the run)
_DATA_CONTROL = frozenset({"Loop", "SequenceMap", "SequenceEmpty", "SequenceConstruct",
                           "SequenceInsert", "SequenceErase", "SequenceAt", "SplitToSequence",
                           "ConcatFromSequence"})


def _sizes(nodes, fixed, seed=()) -> tuple[set[str], set[str]]:
    sized: set[str] = set(seed)
    from_shapes: set[str] = set()  # values computed from shapes and constants alone
    for op, domain, inputs, outputs in nodes:
        std = domain in ("", "ai.onnx")
        ins = [i for i in inputs if i]
        if std and op in ("Shape", "Size") and ins and ins[0] not in sized:
            from_shapes.update(outputs)
            continue
        if all(fixed(i) or i in from_shapes for i in ins):  # (a Constant node: no inputs)
            from_shapes.update(outputs)
        shaping = inputs[:1] if op in _SHAPED_BY_FIRST else inputs
        by_values = std and any(
            k < len(inputs) and inputs[k] and not fixed(inputs[k])
            and inputs[k] not in from_shapes for k in _SIZE_INPUTS.get(op, ()))
        control = std and (op in _DATA_CONTROL or op == "If" and inputs and not (
            fixed(inputs[0]) or inputs[0] in from_shapes))
        if (std and op in DATA_SIZED) or by_values or control or any(i in sized
                                                                     for i in shaping):
            sized.update(o for o in outputs if o)
    return sized, from_shapes


def data_sizing_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The main graph's nodes where sizes start to follow the data (data_sized: an output
    whose size does, no input whose size does): a NonZero, or a Slice whose end is computed
    from the values."""
    g = model.graph
    fixed = {t.name for t in g.initializer}
    nodes = list(g.node)
    sized = data_sized(((n.op_type, n.domain, list(n.input), list(n.output)) for n in nodes),
                       lambda x: x in fixed)
    return [n for n in nodes if any(o in sized for o in n.output)
            and not any(i in sized for i in n.input)]


def is_float_dtype(dtype) -> bool:
    """A float NumPy dtype of FLOAT_TYPES: float16/32/64 and ml_dtypes' bfloat16 (whose kind is
    'V', not 'f')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


# Loading limits: beyond them a file is refused before anything large is allocated.
MAX_FILE_BYTES = 2**31  # protobuf cannot parse more; bigger models use external data
MAX_TENSOR_ELEMENTS = 2**34  # one stored tensor (64 GiB of float32)
MAX_NODES = 500_000  # all graphs, subgraphs and functions together
MAX_SUBGRAPH_DEPTH = 24  # nested If/Loop/Scan bodies; protobuf itself stops near 31
_SUB_BYTE_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6),
    ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, name)}


def readable_model_file(path: str | os.PathLike) -> Path:
    """`path`, a regular file protobuf can parse, or the ModelError saying why not (before a
    byte is read: a pipe blocks, a device never ends)."""
    path = Path(path)
    if not path.is_file():
        there = os.path.lexists(path)
        raise ModelError(f"model file not found: {path}" + (
            # (a step_N folder of checkpoint.dir: trainer.checkpoint.MANIFEST)
            " (it is a checkpoint folder: `onnx-trainer eval CONFIG --checkpoint "
            f"{path}` evaluates it, `onnx-trainer export CONFIG --checkpoint {path}` writes "
            "its model)" if (path / "manifest.json").is_file() else
            " (it is a directory; give the .onnx file in it)" if path.is_dir() else
            " (it is not a regular file: a device, a pipe or a broken or looping link)"
            if there else ""))
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ModelError(f"model file {path} is {size} bytes, over protobuf's 2 GB limit; save "
                         "large models with external data (onnx.save_model(..., "
                         "save_as_external_data=True))")
    return path


_TORCH_EXPORT = ("export the network with torch.onnx.export(model, example_inputs, "
                 "'model.onnx') (README: Exporting a model from PyTorch)")


def unparsable(path: Path, exc: Exception) -> str:
    """Why the file at `path` is no ONNX model that protobuf parses (`exc`, its error): what
    the file is where its first bytes say (a dataset, a PyTorch file), or protobuf's words."""
    import zipfile

    text = " ".join(str(exc).split())[:200]
    if "MaxDepth" in text:
        text = "messages nested too deeply (subgraphs deeper than protobuf's limit)"
    try:
        with open(path, "rb") as fp:
            head = fp.read(16)
        names = zipfile.ZipFile(path).namelist() if head[:4] == b"PK\x03\x04" else []
    except (OSError, zipfile.BadZipFile):
        names = []
    if any(n.endswith("data.pkl") or n.endswith("/version") for n in names) or \
            head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05"):  # (torch.save, a pickle)
        return f"it is a PyTorch file (torch.save) or a Python pickle, not an ONNX model: " \
               f"{_TORCH_EXPORT}"
    if head[:4] == b"PK\x03\x04" and not names:  # (cut off: its directory is at its end)
        return ("it is a zip archive that cannot be read (cut off?), such as a NumPy archive "
                "(a dataset) or a PyTorch file, not an ONNX model")
    if head[:4] == b"PK\x03\x04" and any(n.endswith(".npy") for n in names) \
            or head[:4] == b"\x93NUM":  # (a zip archive of arrays, a .npy file)
        return ("it is a NumPy archive or array (a dataset, or a checkpoint's arrays: "
                "`onnx-trainer export CONFIG --checkpoint FOLDER` writes a checkpoint's "
                "model), not an ONNX model")
    if head[:4] == b"PK\x03\x04":
        return f"it is a zip archive ({', '.join(names[:3])}), not an ONNX model"
    if len(head) >= 9 and head[8:10] == b'{"':  # (an 8-byte header length, then JSON)
        return ("it is a safetensors file (weights only), not an ONNX model: load the weights "
                f"into their network and {_TORCH_EXPORT}")
    return text


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model; refuse absurd sizes and external data that is missing,
    the wrong length, or outside the model's folder (by absolute path, `..` or a symlink)."""
    path = readable_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for corrupt files
        raise ModelError(f"cannot parse ONNX model {path}: {unparsable(path, exc)}") from None
    known = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > known:
            raise ModelError(f"{path} uses opset {imp.version} of ai.onnx, newer than this onnx "
                             f"{onnx.__version__} knows ({known}): upgrade onnx, or export the "
                             f"model at opset {known} or lower")
    tensors = stored_tensors(model, str(path))
    external = _external_data(tensors, path.parent, str(path))
    check_model(path, str(path))  # as saved, so over 2 GB too; external data is not read
    known_type_codes(model, str(path))
    tensor_inputs(model, str(path))
    _read_external_data(external, str(path))
    densify_sparse_initializers(model, str(path))
    model = inline_functions(model)
    unknown_dims_symbolic(model)
    return model


def densify_sparse_initializers(model: onnx.ModelProto, what: str = "model") -> None:
    """The main graph's sparse_initializer entries as ordinary (dense) initializers, in place:
    the engine trains every value of a tensor (the export writes them dense)."""
    g = model.graph
    for sp in g.sparse_initializer:
        name = sp.values.name
        try:
            dense = _dense(sp)
        except (ValueError, IndexError, TypeError) as exc:
            raise ModelError(f"{what}: sparse initializer '{_printable(name)}' does not fit its "
                             f"dims {list(sp.dims)}: {exc}") from None
        t = numpy_helper.from_array(dense, name)
        t.doc_string = sp.values.doc_string
        t.metadata_props.extend(sp.values.metadata_props)
        g.initializer.append(t)
    del g.sparse_initializer[:]


def _dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse tensor's values at its indices (linear, or one row of coordinates each)."""
    values = numpy_helper.to_array(sp.values).reshape(-1)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(tuple(sp.dims), values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


# Where TensorProtos sit in an ONNX file, by protobuf field number: {message: {field: the
# message it holds}} (onnx.proto: ModelProto.graph 7, .training_info 20, .functions 25;
# GraphProto.node 1, .initializer 5, .sparse_initializer 15; NodeProto.attribute 5;
# AttributeProto.t 5, .g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23;
# FunctionProto.node 7, .attribute_proto 11; TrainingInfoProto's two graphs; a sparse
# tensor's values 1 and indices 2)
_HOLDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
# TensorProto.external_data 13 (StringStringEntryProto: key 1, value 2), .data_location 14
_EXTERNAL_DATA, _DATA_LOCATION = 13, 14


def external_locations(path: str | os.PathLike) -> set[str]:
    """The external data locations the tensors of the ONNX file at `path` name (the files
    their values are in, relative to its folder), read from the file's protobuf framing,
    memory-mapped: the bytes of its tensors and its nodes' other fields are skipped, never
    read (onnx.load of a model that holds its weights read them all, a copy of the model in
    memory, to find that it names no file). ValueError for a file whose framing is damaged."""
    import mmap

    found: set[str] = set()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _scan(buf, "model", 0, size, found, 0)
    return found


def _varint(buf, at: int, end: int) -> tuple[int, int]:
    """(the varint at `at`, the position after it)."""
    value, shift = 0, 0
    while True:
        if at >= end or shift > 63:
            raise ValueError("a varint runs past its message")
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, at


def _scan(buf, kind: str, at: int, end: int, found: set[str], depth: int) -> None:
    """The locations of the external tensors inside the message of `kind` at buf[at:end]
    (see external_locations)."""
    if depth > 4 * MAX_SUBGRAPH_DEPTH:  # (a graph is four messages deep in its parent's)
        raise ValueError("messages nested too deeply")
    holds = _HOLDS.get(kind, {})
    locations: list[str] = []
    external = False
    while at < end:
        key, at = _varint(buf, at, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(buf, at, end)
            if kind == "tensor" and field == _DATA_LOCATION:
                external = value == onnx.TensorProto.EXTERNAL
            continue
        if wire in (1, 5):
            at += 8 if wire == 1 else 4
            continue
        if wire != 2:
            raise ValueError(f"wire type {wire} in an ONNX file")
        length, at = _varint(buf, at, end)
        stop = at + length
        if stop > end:
            raise ValueError("a field runs past its message")
        if kind == "tensor" and field == _EXTERNAL_DATA:
            entry = {}
            while at < stop:  # (key 1, value 2: short strings)
                k, at = _varint(buf, at, stop)
                n, at = _varint(buf, at, stop)
                if k & 7 != 2 or at + n > stop:
                    raise ValueError("an external data entry that is not two strings")
                entry[k >> 3] = bytes(buf[at:at + n]).decode("utf-8", "replace")
                at += n
            if entry.get(1) == "location" and 2 in entry:
                locations.append(entry[2])
        elif field in holds:
            _scan(buf, holds[field], at, stop, found, depth + 1)
        at = stop
    if at != end:
        raise ValueError("a field runs past its message")
    if external:
        found.update(locations)


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files the model at `path` names, inside its folder (none when it
    cannot be read: load_model says why where it matters)."""
    path = Path(path)
    try:
        # (a pipe or device would block or never end, a file over protobuf's limit be read
        # whole before load_model refuses it: none is read here)
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return []
        names = external_locations(path)
        root = path.parent.resolve()
        return sorted(root / n for n in names
                      if n and "\0" not in n and not os.path.isabs(n)
                      and (root / n).resolve().is_relative_to(root))
    except Exception:  # noqa: BLE001 - a file that does not load has nothing to protect
        return []


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its model-local functions (onnxscript's @script functions, jax2onnx's
    @onnx_function blocks) inlined at every call, as onnxruntime runs them: the graph that
    trains and is exported, its initializers, inputs and outputs those of the model. A call of
    a function that the inliner leaves is refused, naming it."""
    if not model.functions:
        return model
    import onnx.inliner

    model = _with_function_defaults(model)
    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # noqa: BLE001 - the inliner raises several types
        raise ModelError(f"cannot inline the model's local functions "
                         f"({', '.join(f.name for f in model.functions)}): "
                         f"{' '.join(str(exc).split())[:200]}") from None
    left = {(f.domain, f.name) for f in inlined.functions}
    calls = [f"{n.op_type} ({n.domain}, node '{n.name}')" for n in inlined.graph.node
             if (n.domain, n.op_type) in left]
    if calls:  # (jax2onnx's @onnx_function blocks import their own domain at another version)
        raise ModelError(f"{len(calls)} node(s) call functions defined in the model that onnx's "
                         f"inliner leaves as they are: {', '.join(calls[:6])}; export the model "
                         "with them inlined (jax2onnx: without @onnx_function)")
    return inlined


def _with_function_defaults(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model (a copy where needed) whose calls of its local functions give every attribute
    that the function declares with a default (`attribute_proto`, what onnxscript writes for
    a Python default argument) and the call leaves out: onnx's inliner drops such defaults, so
    a body's `LeakyRelu(alpha=@alpha)` took LeakyRelu's own default instead."""
    defaults = {(f.domain, f.name): list(f.attribute_proto) for f in model.functions
                if len(f.attribute_proto)}
    if not defaults:
        return model
    model = copy.deepcopy(model)

    def fill(nodes) -> None:
        for n in nodes:
            given = {a.name for a in n.attribute}
            for d in defaults.get((n.domain, n.op_type), []):
                if d.name not in given:
                    n.attribute.append(copy.deepcopy(d))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    fill(a.g.node)
                for sub in a.graphs:
                    fill(sub.node)
    fill(model.graph.node)
    for f in model.functions:
        fill(f.node)
    fill = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return model


def unknown_dims_symbolic(model: onnx.ModelProto) -> int:
    """Negative dimension values (-1: paddle2onnx's and some other exporters' way of writing a
    dynamic axis, which ONNX spells as a dim_param) become dim_params of their own
    (`unk_dim_0`, ...), in place, in the inputs, outputs and value_info of every graph;
    returns how many. (onnxruntime reads them so too.)"""
    taken = {d.dim_param for vi in _value_infos(model.graph)
             for d in _dims(vi) if d.HasField("dim_param")}
    count = 0
    for vi in _value_infos(model.graph):
        for d in _dims(vi):
            if d.HasField("dim_value") and d.dim_value < 0:
                while f"unk_dim_{count}" in taken:
                    count += 1
                d.dim_param = f"unk_dim_{count}"  # (clears dim_value: a oneof)
                taken.add(d.dim_param)
                count += 1
    return count


def _value_infos(graph: onnx.GraphProto):
    yield from graph.input
    yield from graph.output
    yield from graph.value_info
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _value_infos(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _value_infos(g)


def constant_lookup(model: onnx.ModelProto):
    """name -> value of an initializer or a Constant node (each of its value forms), read
    when asked (a large initializer the report left unread is never asked for), or None."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: attrs_of(n) for n in model.graph.node
              if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}

    def value_of(name: str):
        if name in inits:
            return tensor_value(inits[name])
        a = consts.get(name, {})
        return next((np.asarray(a[k]) for k in ("value", "value_float", "value_floats",
                                                "value_int", "value_ints") if k in a), None)
    return value_of


def inferred_dims(model: onnx.ModelProto) -> dict[str, tuple]:
    """name -> the dims of each tensor value of the main graph as ONNX shape inference gives
    them (ints; None where not a known number), initializers included; best effort (the
    model's own value infos where inference fails). Pass a stripped model (memory.strip)
    where the weights are large: inference copies the model."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference is best effort
        g = model.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if vi.type.WhichOneof("value") == "tensor_type" and t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                 for d in t.shape.dim)
    out.update((t.name, tuple(t.dims)) for t in g.initializer)
    return out


def _dims(vi: onnx.ValueInfoProto):
    t = vi.type
    while True:  # (sequences and optionals of tensors: their element type)
        kind = t.WhichOneof("value")
        if kind == "tensor_type":
            return list(t.tensor_type.shape.dim) if t.tensor_type.HasField("shape") else []
        if kind == "sequence_type":
            t = t.sequence_type.elem_type
        elif kind == "optional_type":
            t = t.optional_type.elem_type
        else:
            return []


_A = onnx.AttributeProto
_CONTAINERS = {_A.TENSOR, _A.TENSORS, _A.SPARSE_TENSOR, _A.SPARSE_TENSORS, _A.GRAPH, _A.GRAPHS}


def stored_tensors(model: onnx.ModelProto, what: str = "model"
                   ) -> list[tuple[onnx.TensorProto, str]]:
    """Every TensorProto stored in the model, with where it sits, after checking the limits:
    node count, subgraph depth, declared elements per tensor (ModelError beyond them).

    Attributes are read by their declared type; one holding a tensor or graph under another
    type is refused by the checker, so nothing reads it."""
    out: list[tuple[onnx.TensorProto, str]] = []
    nodes = 0
    _utf8([model.producer_name, model.producer_version, model.domain, model.doc_string]
          + [o.domain for o in model.opset_import]
          + [s for p in model.metadata_props for s in (p.key, p.value)], what, "the model")
    pending: list[tuple[onnx.GraphProto | onnx.FunctionProto, int, str]] = [
        (model.graph, 0, "graph")]
    pending += [(f, 0, f"function '{_printable(f.name)}'") for f in model.functions]
    for k, info in enumerate(model.training_info):
        pending += [(info.initialization, 0, f"training_info[{k}]"),
                    (info.algorithm, 0, f"training_info[{k}]")]
    while pending:
        graph, depth, where = pending.pop()
        if depth > MAX_SUBGRAPH_DEPTH:
            raise ModelError(f"{what}: subgraphs are nested more than {MAX_SUBGRAPH_DEPTH} "
                             f"levels deep (at {where}); refusing to load it")
        nodes += len(graph.node)
        if nodes > MAX_NODES:
            raise ModelError(f"{what} has more than {MAX_NODES} nodes; refusing to load it "
                             "(raise trainer.graph.MAX_NODES if the model is genuine)")
        tensors: list[onnx.TensorProto] = []
        sparse: list[onnx.SparseTensorProto] = []
        owners: list[tuple[onnx.NodeProto | None, Iterable[onnx.AttributeProto]]]
        if isinstance(graph, onnx.GraphProto):
            tensors += graph.initializer
            sparse += graph.sparse_initializer
            owners = [(node, node.attribute) for node in graph.node]
            values = list(graph.input) + list(graph.output) + list(graph.value_info)
            _utf8([graph.name, graph.doc_string] + [v.name for v in values]
                  + [d.dim_param for v in values for d in v.type.tensor_type.shape.dim],
                  what, where)
        else:  # a function: its nodes, and the default values of its attributes
            owners = [(node, node.attribute) for node in graph.node]
            owners.append((None, graph.attribute_proto))
            _utf8([graph.name, graph.domain, graph.doc_string, *graph.input, *graph.output,
                   *graph.attribute] + [o.domain for o in graph.opset_import], what, where)
        for node, attributes in owners:
            if node is not None:
                _utf8([node.name, node.op_type, node.domain, node.doc_string, *node.input,
                       *node.output], what, where)
            for a in attributes:
                _utf8([a.name, a.ref_attr_name], what, where)
                kind = a.type
                if kind not in _CONTAINERS:
                    continue
                if kind == _A.TENSOR:
                    tensors.append(a.t)
                elif kind == _A.TENSORS:
                    tensors += a.tensors
                elif kind == _A.SPARSE_TENSOR:
                    sparse.append(a.sparse_tensor)
                elif kind == _A.SPARSE_TENSORS:
                    sparse += a.sparse_tensors
                else:
                    owner = "defaults" if node is None else f"{node.op_type} '{node.name}'"
                    inner = f"{where} > {_printable(owner)}.{_printable(a.name)}"
                    subs = [a.g] if kind == _A.GRAPH else list(a.graphs)
                    pending += [(g, depth + 1, inner) for g in subs]
        for sp in sparse:
            _check_elements(sp.values.name or "sparse tensor", list(sp.dims), what, where)
            tensors += [sp.values, sp.indices]
        for t in tensors:
            _utf8([t.name] + [s for e in t.external_data for s in (e.key, e.value)], what,
                  where)
            _check_elements(t.name, t.dims, what, where)
            if t.data_location != onnx.TensorProto.EXTERNAL and t.raw_data:
                need = _raw_nbytes(t)
                if need is not None and len(t.raw_data) != need:
                    raise ModelError(f"{what}: tensor '{_printable(t.name)}' in {where} holds "
                                     f"{len(t.raw_data)} bytes of data where its dims "
                                     f"{list(t.dims)} and type take {need}; the file is "
                                     "damaged")
            out.append((t, where))
    return out


def _utf8(texts: list, what: str, where: str) -> None:
    """Protobuf hands Python a string field that is not UTF-8 as bytes; refuse those here, as
    later code would fail on them anywhere."""
    try:
        "".join(texts)
    except TypeError:
        bad = next(t for t in texts if not isinstance(t, str))
        raise ModelError(f"{what}: text in {where} is not valid UTF-8 ({_printable(bad)}); the "
                         "file is damaged") from None


def _printable(text: str | bytes) -> str:
    """Text from the file with control characters (and bytes that are not UTF-8) escaped, so
    messages stay on one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check_elements(name: str | bytes, dims, what: str, where: str) -> None:
    n = 1
    for d in dims:
        n *= d
    if n <= MAX_TENSOR_ELEMENTS and all(d >= 0 for d in dims):
        return
    name, dims = _printable(name), list(dims)
    if any(d < 0 for d in dims):
        raise ModelError(f"{what}: tensor '{name}' in {where} has a negative dimension "
                         f"({_dims_text(dims)}); the file is damaged")
    raise ModelError(f"{what}: tensor '{name}' in {where} declares shape {_dims_text(dims)} "
                     f"({n:.3g} elements), more than the limit of {MAX_TENSOR_ELEMENTS}; "
                     "refusing to load it")


def _dims_text(dims: list[int]) -> str:
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ...]"


def _raw_nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's raw data from its dims and type; None for types without one."""
    n = int(np.prod(t.dims, dtype=object)) if t.dims else 1
    bits = _SUB_BYTE_BITS.get(t.data_type)
    if bits is None:
        if t.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
            return None
        try:
            bits = 8 * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return None
    return -(-n * bits // 8)


def _external_data(tensors: list[tuple[onnx.TensorProto, str]], folder: Path, what: str
                   ) -> list[tuple[onnx.TensorProto, str, Path, int, int]]:
    """(tensor, label, file, offset, bytes) of each external tensor, every field checked:
    inside the model's folder after resolving symlinks, present, and of the right length."""
    root = folder.resolve()
    found = []
    for t, where in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        name = f"tensor '{_printable(t.name)}' in {where}"
        shown = _printable(location)
        if not location:
            raise ModelError(f"{what}: {name} is stored as external data but names no file")
        try:
            target = (root / location).resolve()
        except (OSError, RuntimeError, ValueError):
            target = None
        if os.path.isabs(location) or target is None or root not in target.parents:
            raise ModelError(f"{what}: {name} points to external data '{shown}' outside the "
                             f"model's folder {root}; refusing to read it (copy the file "
                             "itself next to the model)")
        if (root / location).is_symlink():  # onnx's checker refuses links as well
            raise ModelError(f"{what}: external data file '{shown}' of {name} is a symbolic "
                             "link; copy the file itself next to the model")
        if not target.is_file():
            raise ModelError(f"{what}: external data file '{shown}' of {name} " + (
                "is not a regular file (a folder, pipe or device); name the file that holds "
                "its bytes" if target.exists() else
                f"is missing (looked for {target}); copy it next to the model"))
        need = _raw_nbytes(t)
        if need is None:
            raise ModelError(f"{what}: {name} has data type {t.data_type}, which cannot be "
                             "stored as external data")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else need
        except ValueError:
            raise ModelError(f"{what}: {name} has a non-integer external data offset or "
                             f"length ({info.get('offset')!r}, {info.get('length')!r})") from None
        if length != need:
            raise ModelError(f"{what}: external data of {name} has length {length} bytes, but "
                             f"its shape {_dims_text(list(t.dims))} and type need {need}")
        if offset < 0:
            raise ModelError(f"{what}: {name} has a negative external data offset ({offset}); "
                             "the model's file is damaged")
        size = target.stat().st_size
        if offset + need > size:
            raise ModelError(f"{what}: external data file '{shown}' ({size} bytes) is too "
                             f"short for {name}: {need} bytes at offset {offset}")
        found.append((t, name, target, offset, need))
    return found


def _read_external_data(found: list[tuple[onnx.TensorProto, str, Path, int, int]],
                        what: str) -> None:
    """Read exactly the checked bytes of each external tensor into its raw_data."""
    for t, name, target, offset, need in found:
        try:
            with open(target, "rb") as f:
                f.seek(offset)
                data = f.read(need)
        except OSError as exc:
            raise ModelError(f"{what}: cannot read external data of {name} from {target}: "
                             f"{exc.strerror or exc}") from None
        if len(data) != need:
            raise ModelError(f"{what}: external data file {target} shrank while reading {name}")
        t.raw_data = data
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def _stubs_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose stub initializers are graph inputs of their type and shape."""
    out = without_initializers(model)
    listed = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if not is_stub_tensor(t):
            out.graph.initializer.append(t)
        elif t.name not in listed:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type,
                                                                 list(t.dims)))
    return out


def checker_message(exc: Exception) -> str:
    """onnx.checker's message on one line, its node context in parentheses (its first line alone
    stopped mid-sentence where the message spans lines: "... input 'shp' of node:")."""
    main, _, context = str(exc).partition("==> Context:")
    main, context = " ".join(main.split()), " ".join(context.split())
    return f"{main} ({context})" if context else main


def check_model(model: onnx.ModelProto | str | os.PathLike, what: str = "model") -> None:
    """onnx.checker as a ModelError; give a path for models whose tensors exceed 2 GB. Stubs
    (is_stub_tensor) are checked as the graph inputs of their type and shape that they stand
    for (the checker looks for their external data's file)."""
    if isinstance(model, onnx.ModelProto) and any(map(is_stub_tensor, model.graph.initializer)):
        model = _stubs_as_inputs(model)
    try:
        # (an absolute path: a relative one's folder is '' in the checker's messages)
        onnx.checker.check_model(os.path.abspath(model) if isinstance(model, (str, os.PathLike))
                                 else model)
    except onnx.checker.ValidationError as exc:
        text = checker_message(exc)
        if "No Op registered for" in text and _checks_lowered(model, what):
            return  # (onnxruntime's LayerNormalization below opset 17: valid once lowered)
        raise ModelError(f"{what} is not a valid ONNX model: {text}") from None
    except UnicodeDecodeError:  # the checker's message quotes a damaged name
        raise ModelError(f"{what} is not a valid ONNX model: it holds text that is not valid "
                         "UTF-8") from None


def known_type_codes(model: onnx.ModelProto, what: str = "model") -> None:
    """Every tensor's data type code, in every graph, is one ONNX defines: onnx.checker lets
    an unknown one pass (a bit-flipped file), which failed later as a KeyError."""
    def types(t: onnx.TypeProto):
        kind = t.WhichOneof("value")
        if kind == "tensor_type":
            yield t.tensor_type.elem_type
        elif kind in ("sequence_type", "optional_type"):
            yield from types(getattr(t, kind).elem_type)

    for g in [model.graph, *_subgraphs_of(model.graph)]:
        found = [(t.name, t.data_type) for t in g.initializer]
        found += [(v.name, code) for v in [*g.input, *g.output, *g.value_info]
                  for code in types(v.type)]
        for name, code in found:
            if code == 0 and not any(t.name == name for t in g.initializer):
                continue  # (a value of no declared type: shape inference gives it one)
            try:
                helper.tensor_dtype_to_np_dtype(code)
            except (KeyError, ValueError, TypeError):
                raise ModelError(f"{what}: tensor '{_printable(name)}' has data type {code}, "
                                 "which ONNX does not define (a damaged file?)") from None
    types = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)


def tensor_inputs(model: onnx.ModelProto, what: str = "model") -> None:
    """The graph inputs that data feeds are tensors: a sequence or map input has no batch of
    arrays to take (it failed as a KeyError in `grad` and was called a scalar in `train`); and
    they and the graph's outputs declare their element type (onnx.checker lets an UNDEFINED
    one pass, onnxruntime refuses the model, and training failed on it as a KeyError)."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        kind = vi.type.WhichOneof("value")
        if vi.name not in inits and kind in ("sequence_type", "map_type"):
            raise ModelError(f"{what}: input '{_printable(vi.name)}' is a "
                             f"{kind.split('_')[0]}, not a tensor; onnx-trainer feeds each "
                             "input a batch of one array (export the model with tensor inputs)")
    for where, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            if (vi.name not in inits and vi.type.WhichOneof("value") == "tensor_type"
                    and vi.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED):
                raise ModelError(
                    f"{what}: graph {where} '{_printable(vi.name)}' declares no element type "
                    "(elem_type 0, UNDEFINED), which onnxruntime refuses too; give it its type "
                    "(e.g. onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, "
                    "shape))")


def _checks_lowered(model: onnx.ModelProto | str | os.PathLike, what: str) -> bool:
    """Whether a model that onnx.checker refused for an op unknown in the ONNX domain at its
    opset holds onnxruntime's ONNX-domain fused ops (LayerNormalization before opset 17,
    SimplifiedLayerNormalization) and passes once they are lowered (trainer.contrib)."""
    from trainer.contrib import contrib_key, lower_contrib

    m = model if isinstance(model, onnx.ModelProto) else onnx.load(
        os.fspath(model), load_external_data=False)
    if not any(contrib_key(n, m) and n.domain in ("", "ai.onnx") for n in m.graph.node):
        return False
    check_model(lower_contrib(m), what)
    return True


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


def inputs_for_initializers(model: onnx.ModelProto, names) -> None:
    """The initializers of `model`'s main graph named in `names` turned into graph inputs of
    their type and shape, in place: their values are left out (a training step feeds its
    parameters and statistics at every run, and its graph need not hold a second copy)."""
    g = model.graph
    names = set(names)
    inputs = {v.name for v in g.input}
    for i in reversed(range(len(g.initializer))):
        t = g.initializer[i]
        if t.name in names:
            if t.name not in inputs:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                  list(t.dims)))
            del g.initializer[i]


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its main graph's initializers, copied field by field, so
    that its large tensors are never duplicated (the caller adds what it needs)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = getattr(fd, "is_repeated", None)
        if repeated is None:  # protobuf before 5: the label says it
            repeated = fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: tensor_value(t) for t in model.graph.initializer}


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


def float_types(model: onnx.ModelProto) -> set[str]:
    """Names of the float types (float16, bfloat16, float32, float64) of the main graph's
    initializers, inputs and outputs."""
    g = model.graph
    codes = {t.data_type for t in g.initializer}
    codes |= {vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output)}
    out = set()
    for c in codes - {0}:
        try:
            dtype = np_dtype(c)
        except (KeyError, ValueError, TypeError):
            continue
        if is_float_dtype(dtype):
            out.add(dtype.name)
    return out


def elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def tensor_type(t: onnx.TypeProto) -> onnx.TypeProto.Tensor:
    """The tensor type of a tensor or optional-tensor type (empty for sequences and maps)."""
    while t.WhichOneof("value") == "optional_type":
        t = t.optional_type.elem_type
    return t.tensor_type


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
            t = tensor_type(vi.type)
            if vi.type.HasField("tensor_type") and t.HasField("shape") and \
                    len(t.shape.dim) != len(shapes[vi.name]):
                raise ModelError(f"the shape given for input '{vi.name}', "
                                 f"{list(shapes[vi.name])}, has {len(shapes[vi.name])} axes; "
                                 f"the model's input has {len(t.shape.dim)}")
            continue
        dims = []
        for axis, d in enumerate(tensor_type(vi.type).shape.dim):
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


def constant_inputs(specs: Mapping, model: onnx.ModelProto, batch: int,
                    fed: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The values of `data.constants` (name -> config.ConstantInput) for a local batch of
    `batch` samples, each in its graph input's dtype and checked against its declared shape
    (a number fills a fully known shape); ConfigError naming the key where a name is not a
    graph input, is also fed from the dataset (`fed`), or its value does not fit."""
    from trainer.config import ConfigError
    from trainer.errors import DataError
    from trainer.preflight import within_range

    inits = {t.name for t in model.graph.initializer}
    declared = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
    fed = set(fed)
    out = {}
    for name, spec in specs.items():
        key = f"config key 'data.constants.{name}'"
        if name not in declared:
            raise ConfigError(f"{key}: '{name}' is not an input of the model (its inputs: "
                              f"{', '.join(declared) or 'none'})")
        if name in fed:
            # (the words of data.check_input_keys: one problem that both checks find)
            raise ConfigError(f"data.train.inputs maps '{name}', which data.constants also "
                              "sets: keep one of them")
        t = tensor_type(declared[name].type)
        dtype = np_dtype(t.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if spec.shape is not None:
            value = np.full([batch if d == "batch" else d for d in spec.shape], spec.fill)
        else:
            value = np.asarray(spec.value)
            if value.ndim == 0 and dims and all(d is not None for d in dims):
                value = np.broadcast_to(value, dims)
        if dtype.kind in "iub" and not np.array_equal(value, np.round(value)):
            raise ConfigError(f"{key}: input '{name}' holds {dtype} values, got "
                              f"{value.ravel()[:4]}")
        if t.HasField("shape") and (value.ndim != len(dims) or any(
                d is not None and d != v for d, v in zip(dims, value.shape, strict=True))):
            want = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            raise ConfigError(f"{key}: input '{name}' has shape {want}, the value has shape "
                              f"{list(value.shape)}")
        try:  # (256 for a uint8 input was fed as 0, 1e39 for a float32 one as inf: as the
            # datasets' values, refused; a 16-bit float input is computed in float32)
            within_range(value, np.dtype(np.float32) if is_float_dtype(dtype) and
                         dtype.itemsize < 4 else dtype, f"{key}: its value")
        except DataError as exc:
            raise ConfigError(str(exc).replace("clip or convert the data", "change the value")
                              .replace("scale or clip the data", "change the value")) from None
        out[name] = np.array(value, dtype=dtype, order="C")  # (ascontiguousarray: 1-d)
    return out


def constant_batch_hint(values: Mapping[str, np.ndarray], model: onnx.ModelProto, batch: int,
                        fed: Iterable[str]) -> str:
    """A hint for a model that failed with these data.constants: an axis of a constant that the
    model names as a fed input's batch axis, with neither the local batch's size nor 1 (a
    constant written for another batch size, where `batch` was meant); "" where none is. (A
    hint, not a check: converters name unrelated axes alike, paddle2onnx every one '?'.)"""
    inits = {t.name for t in model.graph.initializer}
    declared = {vi.name: tensor_type(vi.type) for vi in model.graph.input
                if vi.name not in inits}
    names: dict[str, str] = {}
    for x in sorted(set(fed) & set(declared)):
        t = declared[x]
        if t.HasField("shape") and t.shape.dim and t.shape.dim[0].dim_param:
            names.setdefault(t.shape.dim[0].dim_param, x)
    for name, value in values.items():
        t = declared.get(name)
        if t is None or not t.HasField("shape") or len(t.shape.dim) != np.ndim(value):
            continue
        for i, (d, v) in enumerate(zip(t.shape.dim, np.shape(value), strict=True)):
            if d.dim_param in names and v not in (batch, 1):
                shape = ", ".join("batch" if j == i else str(n)
                                  for j, n in enumerate(np.shape(value)))
                return (f"config key 'data.constants.{name}': axis {i} of input '{name}' is "
                        f"'{d.dim_param}', as the batch axis of input '{names[d.dim_param]}' "
                        f"({batch} samples per process), and the value's is {v}: if it is the "
                        f"batch, write `batch` there ({{shape: [{shape}], fill: ...}})")
    return ""


def bake_inputs(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model with the graph inputs `values` names turned into initializers of
    those values (kept among the inputs before IR 4, where initializers are inputs too): what
    is computed from them becomes constant, so that control flow on them (an If on a sample
    rate) is lowered to the branch taken."""
    if not values:
        return model
    m = copy.deepcopy(model)
    g = m.graph
    if m.ir_version >= 4:
        keep = [vi for vi in g.input if vi.name not in values]
        del g.input[:]
        g.input.extend(keep)
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in values.items())
    return m


def input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    return {vi.name: np_dtype(tensor_type(vi.type).elem_type) for vi in model.graph.input
            if tensor_type(vi.type).elem_type}


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


def lift_weights(model: onnx.ModelProto, force: bool = False) -> list[str]:
    """In a model that keeps no weight among its main graph's initializers (no float or
    quantized initializer of more than one element there: paddle2onnx stores every weight as a
    Constant node, spox's conversion of silero-vad keeps them as Constants inside its If's
    branches), the weights are made initializers of the main graph, in place, so that the
    parameter rules see them (the computation is unchanged; the export holds them there);
    returns their names. Weights are float tensors of more than one element: initializers of
    subgraphs (an If branch, a Loop body) and Constant nodes of the main graph and of
    subgraphs; one of a subgraph moves only where its name is defined once in the whole model
    (subgraphs read the main graph's names). A model with such initializers is left as it is:
    its Constant nodes and subgraph tensors are the exporter's own constants (TorchScript's
    GroupNorm keeps its InstanceNormalization's ones and zeros as Constants; a scripted loop's
    tensor literals live in its body; a quantized model's float Constants are data). Run it
    before control flow is lowered (which makes subgraph initializers Constant nodes).
    `force`: also where the main graph now holds weights (`convert --trainable-constants` of
    a model this would have lifted, which its own conversion gave initializers)."""
    g = model.graph
    if has_main_weights(g) and not force:
        return []
    unique = _defined_once(model)
    inner = list(_subgraphs_of(g)) if model.ir_version >= 4 else []
    lifted = []
    for gr in inner:
        move = [t for t in gr.initializer if _is_weight(t) and t.name in unique]
        if move:
            names = {t.name for t in move}
            keep = [t for t in gr.initializer if t.name not in names]
            g.initializer.extend(move)
            del gr.initializer[:]
            gr.initializer.extend(keep)
            lifted += [t.name for t in move]
    for gr in [g, *inner]:
        keep = []
        for n in gr.node:
            t = _weight_constant(n)
            if t is None or (gr is not g and n.output[0] not in unique):
                keep.append(n)
                continue
            init = g.initializer.add()
            init.CopyFrom(t)
            init.name = n.output[0]
            lifted.append(init.name)
            if model.ir_version < 4:  # (initializers were also graph inputs before IR 4)
                g.input.append(helper.make_tensor_value_info(init.name, init.data_type,
                                                             list(init.dims)))
        if len(keep) != len(gr.node):
            del gr.node[:]
            gr.node.extend(keep)
    return lifted


def subgraph_weights(model: onnx.ModelProto) -> list[str]:
    """Float initializers of more than one element inside subgraphs (If branches, Loop and
    Scan bodies) that lift_weights leaves there (the main graph holds weights): they stay
    constants, untrained, and the export keeps them as they were."""
    if model.ir_version < 4:
        return []
    return sorted({t.name for gr in _subgraphs_of(model.graph)
                   for t in gr.initializer if _is_weight(t)})


def subgraph_weights_line(names: list[str]) -> str:
    """What `check` and `train` say of subgraph_weights."""
    return (f"{len(names)} float tensor(s) inside subgraphs (If branches, Loop or Scan bodies) "
            f"stay constant, untrained: {', '.join(names[:6])}"
            + (" ..." if len(names) > 6 else "") + " (subgraph weights train only in a model "
            "whose main graph holds none, each defined by one name)")


RECURRENT_OPSET = 11  # the recurrent gradient rules emit ReverseSequence, Slice and Clip inputs


def needs_recurrent_opset(model: onnx.ModelProto) -> bool:
    """Whether the model has RNN/GRU/LSTM nodes at an opset below what their gradient rules
    emit (opset 9: PyTorch's default export opset before 1.12)."""
    return opset_of(model, "") < 10 and any(
        n.op_type in ("RNN", "GRU", "LSTM") and n.domain in ("", "ai.onnx")
        for n in model.graph.node)


def recurrent_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model converted to opset RECURRENT_OPSET (onnx.version_converter) where
    needs_recurrent_opset says so, for its training graph; the model itself otherwise, or where
    the conversion fails or does not keep every initializer (the rule then says what to do).
    Exports keep the model's own opset and nodes: only values move between the two."""
    if not needs_recurrent_opset(model):
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, RECURRENT_OPSET)
    except Exception:  # noqa: BLE001 - the gradient rule names the opset problem
        return model
    have = {t.name for t in converted.graph.initializer}
    if any(t.name not in have for t in model.graph.initializer):
        return model
    return converted


def has_weights_to_lift(model: onnx.ModelProto) -> bool:
    """Whether lift_weights would change the model (without copying anything)."""
    g = model.graph
    if has_main_weights(g):
        return False
    inner = list(_subgraphs_of(g)) if model.ir_version >= 4 else []
    return any(_is_weight(t) for sub in inner for t in sub.initializer) or \
        any(_weight_constant(n) is not None for gr in [g, *inner] for n in gr.node)


# Quantized weights are stored in these (QDQ's DequantizeLinear input, MatMulInteger's and
# QLinearConv's weights): a model holding them keeps its weights in its initializers.
_QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                    onnx.TensorProto.UINT4}


def has_main_weights(g: onnx.GraphProto) -> bool:
    """Whether the main graph keeps weights among its initializers: a float or quantized
    (8- or 4-bit integer) tensor of more than one element."""
    return any((t.data_type in FLOAT_TYPES or t.data_type in _QUANTIZED_TYPES)
               and math.prod(t.dims) > 1 for t in g.initializer)


def _defined_once(model: onnx.ModelProto) -> set[str]:
    """Names defined (initializer, input, node output) exactly once in the whole model."""
    count: dict[str, int] = {}
    for gr in [model.graph, *_subgraphs_of(model.graph)]:
        for name in ([t.name for t in gr.initializer] + [v.name for v in gr.input]
                     + [o for n in gr.node for o in n.output if o]):
            count[name] = count.get(name, 0) + 1
    return {k for k, v in count.items() if v == 1}


def _is_weight(t: onnx.TensorProto) -> bool:
    return t.data_type in FLOAT_TYPES and math.prod(t.dims) > 1 and \
        t.data_location != onnx.TensorProto.EXTERNAL


def _weight_constant(n: onnx.NodeProto) -> onnx.TensorProto | None:
    """The float tensor of more than one element a Constant node holds (as `value`, a
    `value_floats` list or a `sparse_value`), or None."""
    if n.op_type != "Constant" or n.domain not in ("", "ai.onnx") or len(n.output) != 1 \
            or len(n.attribute) != 1:
        return None
    a = n.attribute[0]
    if a.name == "value":
        t = a.t
    elif a.name == "value_floats" and len(a.floats) > 1:
        t = numpy_helper.from_array(np.asarray(a.floats, np.float32))
    elif a.name == "sparse_value":
        try:
            t = numpy_helper.from_array(_dense(a.sparse_tensor))
        except (ValueError, IndexError, TypeError):
            return None  # (its kernel says what is wrong)
    else:
        return None
    return t if _is_weight(t) else None


def _subgraphs_of(graph: onnx.GraphProto):
    for node in graph.node:
        for a in node.attribute:
            inner = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
            for g in inner:
                yield g
                yield from _subgraphs_of(g)


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    names |= {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.discard("")
    return names


def convert_floats(model: onnx.ModelProto, src=np.float32, dst=np.float64, *,
                   rounding: bool = False) -> onnx.ModelProto:
    """Copy of the model computing in `dst` wherever it computed in `src`.

    Converts initializers, Constant/ConstantOfShape values, graph input/output and value_info
    types, Cast/CastLike targets and normalization stash types, in subgraphs too; `precision:
    fp64` verification runs use float32 -> float64. With `rounding` (a float32 model's own
    16-bit region, `relu(h.half() * 0.3).float()`), its values keep their rounding: a Cast to
    `src` casts to `src` and then to `dst`, and each other node of the main graph whose output
    is of type `src` (by ONNX type inference) computes in `dst` and rounds its result through
    `src` (as PyTorch's CPU float16 operations compute in float32 and round).
    """
    import copy

    S, D = elem_type(src), elem_type(dst)
    m = copy.deepcopy(model)
    sname, dname = np.dtype(src).name, np.dtype(dst).name
    narrow: set[str] = set()  # main-graph values of type S
    if rounding:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            narrow = {vi.name for vi in inferred.graph.value_info
                      if vi.type.tensor_type.elem_type == S}
        except Exception:  # noqa: BLE001 - (no types: the Casts alone keep their rounding)
            narrow = set()

    def rounded(node: onnx.NodeProto, main: bool) -> list[onnx.NodeProto]:
        """[node] and the Casts that round its 16-bit results (see above)."""
        if not rounding or node.domain not in ("", "ai.onnx") or node.op_type == "Constant":
            return [node]
        to = next((attr_type_code(a) for a in node.attribute if a.name == "to"), None)
        cast = node.op_type == "Cast" and to == S
        extra = []
        for i, out in enumerate(node.output):
            if not out or not (cast and i == 0 or main and out in narrow):
                continue
            low = f"{out}__rounded_{sname}"
            if cast:  # (the Cast itself rounds: kept to S)
                node.output[0] = low
            else:
                node.output[i] = f"{out}__{dname}"
                extra.append(helper.make_node("Cast", [node.output[i]], [low], to=S,
                                              name=f"{node.name or out}/round_{sname}"))
            extra.append(helper.make_node("Cast", [low], [out], to=D,
                                          name=f"{node.name or out}/to_{dname}"))
        return [node, *extra]

    def conv_tensor(t: onnx.TensorProto) -> None:
        if t.data_type == S:
            t.CopyFrom(numpy_helper.from_array(tensor_value(t).astype(dst), t.name))

    def conv_graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            conv_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            _conv_type(vi.type, S, D)
        nodes = [n for node in g.node for n in rounded(node, g is m.graph)]
        if len(nodes) != len(g.node):
            del g.node[:]
            g.node.extend(nodes)
        for node in g.node:
            keep = rounding and node.op_type == "Cast" and node.output and \
                node.output[0].endswith(f"__rounded_{sname}")
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
                        and a.i == S and not keep and node.op_type in ("Cast", "RandomNormal",
                                                            "RandomUniform", "RandomNormalLike",
                                                            "RandomUniformLike", "EyeLike"):
                    a.i = D
                elif a.name == "to" and a.type == onnx.AttributeProto.STRING and \
                        node.op_type == "Cast" and attr_type_code(a) == S and not keep:
                    a.s = onnx.TensorProto.DataType.Name(D).encode()  # (Cast-1's `to`)
                elif a.name == "dtype" and a.type == onnx.AttributeProto.INT and a.i == S:
                    a.i = D
                elif a.name == "stash_type" and a.i == S:
                    a.i = D

    conv_graph(m.graph)
    conv_graph = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return m


def attr_type_code(a: onnx.AttributeProto) -> int | None:
    """A type attribute's TensorProto code: an integer, or Cast-1's name ("FLOAT")."""
    if a.type == onnx.AttributeProto.STRING:
        try:
            return onnx.TensorProto.DataType.Value(a.s.decode("utf-8", "replace").upper())
        except ValueError:
            return None
    return a.i


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
    which become copies of the running statistics here), in If branches and Loop bodies too.
    Models already in inference form come back unchanged."""
    import copy

    m = copy.deepcopy(model)
    g = m.graph
    scope = NameScope(all_names(g))
    opset = opset_of(m)
    replaced: set[str] = set()
    off = _false_values(g)  # (a training_mode already False: kept, its name too)

    def convert(graph: onnx.GraphProto) -> None:
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            for at in node.attribute:  # (branches and bodies first: their nodes alike)
                for sub in ([at.g] if at.type == onnx.AttributeProto.GRAPH else
                            list(at.graphs) if at.type == onnx.AttributeProto.GRAPHS else []):
                    convert(sub)
            a = {at.name: at for at in node.attribute}
            if node.op_type == "BatchNormalization" and (
                    ("training_mode" in a and a["training_mode"].i) or
                    (opset < 9 and len(node.output) > 1 and not ("is_test" in a and
                                                                 a["is_test"].i))
                    # (opsets 9-13: outputs past Y are the training mode's, as the spec says)
                    or (9 <= opset < 14 and len(node.output) > 1)):
                extra = list(node.output[1:])
                del node.output[1:]
                for name in ("training_mode", "is_test"):
                    if name in a:
                        a[name].i = 0 if name == "training_mode" else 1
                nodes.append(node)
                # running_mean/var outputs keep the input statistics; saved batch stats too
                for out, src in zip(extra, [node.input[3], node.input[4]] * 2, strict=False):
                    if out:
                        nodes.append(helper.make_node("Identity", [src], [out],
                                                      name=scope.fresh(f"{out}/Inference")))
            elif node.op_type == "Dropout" and opset < 7 and not ("is_test" in a and
                                                               a["is_test"].i):
                # (opsets 1-6: is_test 0, the default, drops, as the spec says)
                if "is_test" in a:
                    a["is_test"].i = 1
                else:
                    node.attribute.append(helper.make_attribute("is_test", 1))
                nodes.append(node)
            elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2] and \
                    node.input[2] not in off:
                name = scope.fresh(f"{node.name or node.output[0]}/training_mode_off")
                g.initializer.append(numpy_helper.from_array(np.array(False), name))
                if m.ir_version < 4:
                    g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.BOOL,
                                                                 []))
                replaced.add(node.input[2])
                node.input[2] = name
                nodes.append(node)
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)

    convert(g)
    convert = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    # the training_mode constants that no node reads now (onnxruntime warns of them)
    graphs = [g, *_subgraphs_of(g)]
    read = {v.name for gr in graphs for v in gr.output}
    read |= {i for gr in graphs for n in gr.node for i in n.input}
    dead = replaced - read - {v.name for v in g.input}
    for gr in graphs:
        kept_nodes = [n for n in gr.node if not (n.op_type == "Constant" and
                                                 len(n.output) == 1 and n.output[0] in dead)]
        del gr.node[:]
        gr.node.extend(kept_nodes)
        for field in (gr.initializer, gr.value_info):
            kept = [t for t in field if t.name not in dead]
            del field[:]
            field.extend(kept)
    return m


def _false_values(graph: onnx.GraphProto) -> set[str]:
    """Names of the boolean constants False in `graph` and its subgraphs (initializers and
    Constant nodes): a Dropout's training_mode that is already off."""
    out = set()
    for gr in [graph, *_subgraphs_of(graph)]:
        tensors = [(t.name, t) for t in gr.initializer]
        tensors += [(n.output[0], a.t) for n in gr.node if n.op_type == "Constant"
                    and n.output for a in n.attribute if a.name == "value"]
        for name, t in tensors:
            if t.data_type == onnx.TensorProto.BOOL and math.prod(t.dims) == 1:
                try:
                    if not bool(tensor_value(t).reshape(-1)[0]):
                        out.add(name)
                except (ValueError, TypeError):
                    pass
    return out
