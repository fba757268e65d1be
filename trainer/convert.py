"""`onnx-trainer convert`: weights built by ConstantOfShape/Constant nodes become trainable
initializers (deterministic fresh initialization), and a fixed batch axis can become dynamic."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.errors import ModelError, TrainerError
from trainer.graph import (
    FLOAT_TYPES,
    NameScope,
    all_names,
    attrs_of,
    checker_message,
    has_main_weights,
    has_weights_to_lift,
    lift_weights,
    load_model,
    node_name,
    opset_of,
)

BATCH_PARAM = "N"

# Ops a weight may pass through (as input 0) on its way to the parameter slot it fills.
_PASS_THROUGH = {"Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Cast"}
_LINEAR = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}
_NORMS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization",
          "GroupNormalization", "RMSNormalization"}


@dataclass(frozen=True)
class Slot:
    """What a constant is for: its kind (for the summary) and how it is initialized."""
    kind: str
    init: str            # he_normal | zeros | ones | fill | normal | uniform
    fan_in: int = 0      # he_normal: fan-in; uniform: the bound is 1/sqrt(fan_in)
    fill: float = 0.0
    suffix: str = ""     # name suffix in --names consumer mode (the ONNX input name)


@dataclass
class Report:
    """What a conversion changed, for the one-line-per-kind summary."""
    converted: list[tuple[str, Slot, tuple[int, ...], str]] = field(default_factory=list)
    batch_inputs: list[str] = field(default_factory=list)
    batch_reshapes: int = 0
    batch_outputs: list[str] = field(default_factory=list)

    def lines(self, seed: int) -> list[str]:
        out = []
        kinds: dict[str, list] = {}
        for name, slot, shape, how in self.converted:
            kinds.setdefault(slot.kind, []).append((name, slot, shape, how))
        for kind, rows in kinds.items():
            values = sum(int(np.prod(s)) for _, _, s, _ in rows)
            hows = ", ".join(dict.fromkeys(how for *_, how in rows))
            out.append(f"{kind:<22} {len(rows):>5} tensor(s) {values:>13,} values  {hows}")
        if self.converted:
            stats = [r for r in self.converted if r[1].kind.startswith("running")]
            total = sum(int(np.prod(s)) for _, _, s, _ in self.converted)
            out.append(f"total: {len(self.converted)} constant(s), {total:,} values, are now "
                       f"initializers (seed {seed})" + (
                           f"; {len(stats)} of them, {sum(int(np.prod(s)) for *_, s, _ in stats):,}"
                           " values, BatchNormalization running statistics (updated by the "
                           "forward, not trained)" if stats else ": trainable"))
        if self.batch_inputs:
            out.append(f"batch axis: {', '.join(self.batch_inputs)} now dynamic "
                       f"('{BATCH_PARAM}'); {self.batch_reshapes} Reshape(s) made "
                       f"batch-relative; outputs with a batch axis: "
                       f"{', '.join(self.batch_outputs) or 'none'}")
        return out


def convert_file(src, dst, *, trainable_constants: bool = False, dynamic_batch: bool = False,
                 seed: int = 0, reinit: bool = False, names: str = "tensor") -> Report:
    """Load `src`, apply the requested conversions and write `dst` atomically."""
    from trainer.export import export_model

    if not (trainable_constants or dynamic_batch):
        raise TrainerError("convert: nothing to do; give --trainable-constants and/or "
                           "--dynamic-batch")
    model = load_model(src)
    report = Report()
    if dynamic_batch:  # first, while the weights are still small constant nodes
        model = make_batch_dynamic(model, report)
    if trainable_constants:
        model = make_constants_trainable(model, seed=seed, reinit=reinit, names=names,
                                         report=report)
    if not report.converted and not report.batch_inputs:
        raise TrainerError(f"convert: nothing to convert in {src}: no weight built by a "
                           "ConstantOfShape or float Constant node feeds a parameter slot"
                           + (" and no input has a fixed batch axis" if dynamic_batch else ""))
    meta = {"onnx_trainer.convert": f"trainable_constants={len(report.converted)} seed={seed}"
            + (" dynamic_batch" if report.batch_inputs else "")}
    from trainer.graph import external_data_files
    export_model(model, {}, Path(dst), meta,
                 keep=[Path(src), *external_data_files(Path(src))])
    return report


# -- trainable constants ---------------------------------------------------------------------

def make_constants_trainable(model: onnx.ModelProto, *, seed: int = 0, reinit: bool = False,
                             names: str = "tensor", report: Report | None = None
                             ) -> onnx.ModelProto:
    """Copy of `model` where every weight made by ConstantOfShape (values: a fresh
    initialization for its slot) or a float Constant (values kept unless `reinit`) that feeds a
    parameter slot is a float initializer; shape constants and everything else stay.

    `names="tensor"` keeps each tensor's name; "consumer" names it `<consumer>.<input>` after
    the node that reads it (e.g. `conv1.W`)."""
    if names not in ("tensor", "consumer"):
        raise TrainerError(f"convert: --names must be 'tensor' or 'consumer', got '{names}'")
    report = report if report is not None else Report()
    m = copy.deepcopy(model)
    g = m.graph
    # (the engine trains such a model's Constant and subgraph weights as they are; given
    # initializers here, it would train those alone: the others are lifted below)
    lift = has_weights_to_lift(m)
    opset = opset_of(m)
    shapes = _inferred_shapes(m)
    consts = _static_values(g)
    fixed = _fixed_names(g)
    consumers = _consumers(g)
    producers = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    scope = NameScope(all_names(g))
    removed: set[int] = set()
    new_inits: list[tuple[str, np.ndarray]] = []
    renames: dict[str, str] = {}
    for k, node in enumerate(g.node):
        made = _constant_weight(node, consts)
        if made is None:
            continue
        out = node.output[0]
        shape, dtype, value = made
        found = _find_slot(out, shape, consumers, shapes, fixed, producers=producers)
        if found is None:
            continue
        slot, reader, index = found
        if value is not None and not reinit:
            arr, how = value.astype(dtype, copy=False), "values kept (Constant)"
        else:
            arr, how = _initial_value(slot, shape, dtype, seed, out), _describe(slot)
        name = out
        if names == "consumer" and out not in outputs:
            base = reader.name or reader.output[0]
            name = scope.fresh(f"{base}.{slot.suffix or _input_name(reader, index, opset)}")
            renames[out] = name
        new_inits.append((name, arr))
        removed.add(k)
        report.converted.append((name, slot, tuple(shape), how))
    if removed:
        _make_initializers(m, removed, new_inits, renames)
    if lift:
        for name in lift_weights(m, force=True):
            t = next(t for t in g.initializer if t.name == name)
            report.converted.append((name, _LIFTED, tuple(t.dims), "values kept (as train "
                                     "lifts the weights of a model without initializers)"))
    return m


_LIFTED = Slot("constant weight", "keep")


def _make_initializers(m: onnx.ModelProto, removed: set[int],
                       new_inits: list[tuple[str, np.ndarray]], renames: dict[str, str]) -> None:
    """The nodes `removed` replaced by the initializers `new_inits`, inputs renamed."""
    g = m.graph
    feeders = {i for k in removed for i in g.node[k].input if i}
    for k in sorted(removed, reverse=True):
        del g.node[k]
    if renames:
        _rename_inputs(g, renames)
        keep_vi = [vi for vi in g.value_info if vi.name not in renames]
        del g.value_info[:]
        g.value_info.extend(keep_vi)
    for name, arr in new_inits:
        if arr.dtype in (np.float16, np.float32, np.float64):
            # filled in place: copying big tensors into a protobuf message is slow
            t = g.initializer.add()
            t.name = name
            t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            t.raw_data = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
        else:
            t = g.initializer.add()
            t.CopyFrom(numpy_helper.from_array(arr, name))
        if m.ir_version < 4:  # before IR 4 every initializer is also a graph input
            g.input.append(helper.make_tensor_value_info(name, t.data_type, list(arr.shape)))
    _drop_dead(g, feeders)


def constant_weights(model: onnx.ModelProto) -> list[str]:
    """Outputs of ConstantOfShape nodes (of a constant shape) that fill a parameter slot: a
    weight the graph makes as one repeated value (onnx's light_* models), which does not
    train; `convert --trainable-constants` makes it an initializer. (Float Constant nodes in
    a weight slot train as they are: graph.lift_weights.)"""
    g = model.graph
    if not any(n.op_type == "ConstantOfShape" for n in g.node):
        return []
    consts, fixed, consumers = _static_values(g), _fixed_names(g), _consumers(g)
    producers = {o: n for n in g.node for o in n.output}
    out = []
    for node in g.node:
        made = _constant_weight(node, consts) if node.op_type == "ConstantOfShape" else None
        if made is not None and _find_slot(node.output[0], made[0], consumers, {}, fixed,
                                           producers=producers):
            out.append(node.output[0])
    return out


# the slots whose constant is a product's weight (a bias or a normalization's scale may be
# meant to stay fixed)
_WEIGHT_KINDS = ("conv weight", "linear weight", "embedding", "recurrent weight")


def fixed_constant_weights(model: onnx.ModelProto) -> list[str]:
    """Float Constant nodes of the main graph that fill a product's weight slot (graph order,
    their outputs) in a model that keeps its other weights as initializers, where they stay
    constants (graph.lift_weights leaves such a model's Constants, the exporter's own: a
    normalization's ones, a literal in forward); `convert --trainable-constants` makes them
    initializers, their values kept. Tensors of one repeated value are left out."""
    g = model.graph
    if not has_main_weights(g) or not any(n.op_type == "Constant" for n in g.node):
        return []
    consts, fixed, consumers = _static_values(g), _fixed_names(g), _consumers(g)
    producers = {o: n for n in g.node for o in n.output}
    out = []
    for node in g.node:
        made = _constant_weight(node, consts) if node.op_type == "Constant" else None
        if made is None or made[2] is None or made[2].size < 2 or \
                (made[2] == made[2].flat[0]).all():
            continue
        found = _find_slot(node.output[0], made[0], consumers, {}, fixed, producers=producers)
        if found and found[0].kind in _WEIGHT_KINDS:
            out.append(node.output[0])
    return out


def _constant_weight(node: onnx.NodeProto, consts: dict[str, np.ndarray]):
    """(shape, dtype, value or None) when the node makes a float tensor of static shape:
    ConstantOfShape of a constant shape (value None: a fill), or Constant with a float value."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if node.op_type == "ConstantOfShape":
        if not node.input or node.input[0] not in consts:
            return None  # shape computed at run time: not a weight
        attrs = {a.name: a for a in node.attribute}
        dtype = (np.dtype(helper.tensor_dtype_to_np_dtype(attrs["value"].t.data_type))
                 if "value" in attrs else np.dtype(np.float32))
        if dtype.kind != "f":
            return None
        return tuple(int(d) for d in consts[node.input[0]].reshape(-1)), dtype, None
    if node.op_type == "Constant":
        a = attrs_of(node)
        value_attr = next((at for at in node.attribute if at.name == "value"), None)
        if value_attr is not None and value_attr.t.data_type in FLOAT_TYPES:
            value = np.asarray(a["value"])
        elif "value_floats" in a:
            value = np.asarray(a["value_floats"], np.float32)
        else:
            return None
        return value.shape, value.dtype, value
    return None


def _find_slot(name: str, shape, consumers, shapes, fixed: set[str], depth: int = 0,
               producers=None):
    """The first parameter slot (graph order) that tensor `name` fills, following it through
    layout ops: (Slot, consumer node, input index), or None."""
    for node, i in consumers.get(name, []):
        if node.op_type in _PASS_THROUGH and i == 0 and depth < 8:
            out = node.output[0]
            found = _find_slot(out, shapes.get(out, shape), consumers, shapes, fixed, depth + 1,
                               producers)
        else:
            found = _slot(node, i, tuple(shape), fixed, producers or {})
            found = found and (found, node, i)
        if found:
            return found
    return None


def _slot(node: onnx.NodeProto, i: int, shape: tuple[int, ...], fixed: set[str],
          producers=None) -> Slot | None:
    """The parameter slot input `i` of `node` is, for a weight of (consumer-view) `shape`;
    `fixed` names the tensors known before running, `producers` the node making each value."""
    op, a = node.op_type, attrs_of(node)
    size = int(np.prod(shape)) if shape else 1
    if op in ("Conv", "ConvTranspose"):
        if i == 1 and len(shape) >= 2:  # fan-in as PyTorch counts it: dim 1 times the kernel
            return Slot("conv weight", "he_normal", int(np.prod(shape[1:])))
        if i == 2:
            return Slot("bias", "zeros")
    if op == "Gemm":
        if i == 1 and len(shape) == 2:
            return Slot("linear weight", "he_normal", shape[1] if a.get("transB") else shape[0])
        if i == 0 and len(shape) == 2 and node.input[1] not in fixed:
            return Slot("linear weight", "he_normal", shape[0] if a.get("transA") else shape[1])
        if i == 2:
            return Slot("bias", "zeros")
    if op == "MatMul" and len(shape) >= 2:
        if i == 1:
            return Slot("linear weight", "he_normal", shape[-2])
        if i == 0 and node.input[1] not in fixed:
            return Slot("linear weight", "he_normal", shape[-1])
    if op in _NORMS:
        if op == "BatchNormalization" and i == 3:
            return Slot("running mean", "zeros")
        if op == "BatchNormalization" and i == 4:
            return Slot("running var", "ones")
        if i == 1:
            return Slot("normalization scale", "ones")
        if i == 2:
            return Slot("normalization bias", "zeros")
    if op == "PRelu" and i == 1:
        return Slot("prelu slope", "fill", fill=0.25)
    if op == "Gather" and i == 0 and len(shape) == 2:
        return Slot("embedding", "normal")
    if op in ("RNN", "GRU", "LSTM") and i in (1, 2, 3) and len(shape) >= 2:
        hidden = int(a.get("hidden_size") or shape[-1])  # torch: U(-1/sqrt(h), 1/sqrt(h))
        return Slot("recurrent weight" if i < 3 else "recurrent bias", "uniform", hidden)
    if op == "Add" and i in (0, 1) and size > 1 and sum(d > 1 for d in shape) == 1 \
            and node.input[1 - i] not in fixed and (producers or {}).get(node.input[1 - i]) \
            is not None and producers[node.input[1 - i]].op_type in _LINEAR:
        return Slot("bias", "zeros")  # (a MatMul's or Conv's bias added after it: paddle2onnx)
    if op in ("Mul", "Add") and i in (0, 1) and size > 1 and node.input[1 - i] not in fixed \
            and _after_normalization(node.input[1 - i], producers or {}, op == "Add"):
        # a per-channel affine after a normalization (Caffe2's SpatialBN + Mul/Add); not an
        # input's mean and scale, nor an additive attention mask
        if op == "Mul":
            return Slot("channel scale", "ones", suffix="scale")
        return Slot("channel shift", "zeros", suffix="bias")
    return None


_NORMALIZING = _NORMS | {"MeanVarianceNormalization", "LpNormalization"}


def _after_normalization(x: str, producers, shift: bool) -> bool:
    """Whether `x` is a normalization's output, or for a shift (Add) that output scaled by a
    Mul: the affine of a normalization that has none of its own."""
    made = producers.get(x)
    if made is None:
        return False
    if made.op_type in _NORMALIZING:
        return True
    return shift and made.op_type == "Mul" and any(
        getattr(producers.get(y), "op_type", None) in _NORMALIZING for y in made.input)


def _initial_value(slot: Slot, shape, dtype: np.dtype, seed: int, name: str) -> np.ndarray:
    """A fresh value for `slot`; each tensor draws from its own stream (seed, name), so a
    tensor's values do not depend on the others."""
    if slot.init in ("zeros", "ones", "fill"):
        fill = {"zeros": 0.0, "ones": 1.0}.get(slot.init, slot.fill)
        return np.full(shape, fill, dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    work = np.float64 if dtype == np.float64 else np.float32
    if slot.init == "uniform":
        bound = 1.0 / np.sqrt(max(slot.fan_in, 1))
        return rng.uniform(-bound, bound, size=shape).astype(dtype)
    std = np.sqrt(2.0 / max(slot.fan_in, 1)) if slot.init == "he_normal" else 1.0
    value = rng.standard_normal(size=shape, dtype=work)
    value *= work(std)
    return value.astype(dtype, copy=False)


def _describe(slot: Slot) -> str:
    return {"he_normal": "He normal (std sqrt(2/fan_in))", "zeros": "zeros", "ones": "ones",
            "fill": f"{slot.fill:g}", "normal": "normal(0, 1)",
            "uniform": "uniform(+-1/sqrt(hidden))"}[slot.init]


def _input_name(node: onnx.NodeProto, index: int, opset: int) -> str:
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
        return schema.inputs[min(index, len(schema.inputs) - 1)].name
    except Exception:  # noqa: BLE001 - unknown op or domain: a positional name
        return f"input{index}"


# -- dynamic batch ---------------------------------------------------------------------------

def make_batch_dynamic(model: onnx.ModelProto, report: Report | None = None) -> onnx.ModelProto:
    """Copy of `model` whose data inputs have a symbolic first (batch) dimension: Reshape
    shapes that spell the fixed batch size become batch-relative (0 copies the input's dim),
    outputs that carry the batch axis get the symbolic dim, value_info is dropped. Checked by
    shape inference at another batch size; a model it cannot fix is an error."""
    report = report if report is not None else Report()
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    data = [vi for vi in g.input if vi.name not in inits]
    fixed = {vi.name: vi.type.tensor_type.shape.dim[0].dim_value for vi in data
             if vi.type.tensor_type.shape.dim
             and vi.type.tensor_type.shape.dim[0].HasField("dim_value")}
    if not fixed:
        return m
    if len(set(fixed.values())) > 1:
        raise ModelError("convert --dynamic-batch: the inputs disagree on the batch size ("
                         + ", ".join(f"{k}: {v}" for k, v in fixed.items()) + ")")
    batch = next(iter(fixed.values()))
    for vi in data:
        if vi.name in fixed:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH_PARAM
    carrying = set(fixed)
    consts = _static_values(g)
    known = _inferred_shapes(model)  # (at the fixed batch: a Reshape's input sizes)
    known.update((vi.name, tuple(d.dim_value for d in vi.type.tensor_type.shape.dim))
                 for vi in model.graph.input if vi.type.tensor_type.shape.dim and all(
                     d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim))
    replaced: set[str] = set()
    scope = NameScope(all_names(g))
    patched = 0
    lost: list[str] = []  # nodes that read the batch axis and whose outputs do not keep it
    for i, node in enumerate(g.node):
        if not any(x in carrying for k, x in enumerate(node.input)
                   if x and k not in _TYPE_ONLY.get(node.op_type, ())):
            continue
        carries, new_shape = _carries_batch(node, carrying, consts, batch, known)
        if not carries:
            lost.append(f"'{node_name(node, i)}' ({node.op_type})")
        if new_shape is not None:
            if len(node.input) >= 2:  # Reshape-5+: a fresh shape tensor of its own
                replaced.add(node.input[1])
                name = scope.fresh(f"{node.input[1]}_batch")
                g.initializer.append(numpy_helper.from_array(new_shape, name))
                if m.ir_version < 4:
                    g.input.append(helper.make_tensor_value_info(
                        name, onnx.TensorProto.INT64, [len(new_shape)]))
                node.input[1] = name
            else:
                next(a for a in node.attribute if a.name == "shape").ints[0] = int(new_shape[0])
            patched += 1
        if carries:
            carrying.update(o for o in node.output if o)
    outs = []
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if o.name in carrying and dims:
            dims[0].Clear()
            dims[0].dim_param = BATCH_PARAM
            outs.append(o.name)
    if not outs and any(o.type.tensor_type.shape.dim
                        and o.type.tensor_type.shape.dim[0].dim_value == batch
                        for o in model.graph.output):
        # (an output of the fixed batch size that the batch axis does not reach: it was merged
        # into another axis, as a Reshape to [B*T, F], which no rule here can follow)
        where = f"; convert cannot follow it past {lost[0]}" if lost else ""
        raise ModelError(f"convert --dynamic-batch: the batch axis of {', '.join(fixed)} "
                         f"(size {batch}) reaches no output of size {batch} as far as convert "
                         f"can follow it (constant shapes, batch-preserving ops){where}: a "
                         "Reshape to [B*T, F], a shape computed from Shape, or an op whose "
                         "batch axis it does not know; export the model with a dynamic batch "
                         "axis")
    del g.value_info[:]
    _drop_dead(g, replaced)
    _check_batch(model, m, fixed, batch, outs)
    report.batch_inputs = [f"'{k}'" for k in fixed]
    report.batch_reshapes = patched
    report.batch_outputs = outs
    return m


# inputs that give only a type (CastLike's target: an input that carries the batch, read
# there, makes no batch-carrying value; the default exporter's zero Conv biases)
_TYPE_ONLY = {"CastLike": (1,)}


def _carries_batch(node: onnx.NodeProto, carrying: set[str], consts, batch: int,
                   known: Mapping[str, tuple] | None = None):
    """(whether the node's outputs keep the batch on axis 0, a new Reshape shape or None);
    `known`: static shapes of the original model."""
    op, a = node.op_type, attrs_of(node)
    first = node.input[0] in carrying if node.input else False
    if op == "Reshape":
        if not first:
            return False, None
        shape = (consts.get(node.input[1]) if len(node.input) > 1 else
                 np.asarray(a.get("shape", []), np.int64))
        if shape is None:  # computed at run time (from Shape): it follows the input
            return True, None
        if shape.size == 0:
            return False, None
        lead = int(shape.reshape(-1)[0])
        if lead == 0 and not a.get("allowzero"):
            return True, None
        if lead == -1 and shape.size > 1:
            # ([-1, F] keeps the batch only where F holds all of a sample: [B, T, F] to
            # [-1, F] merges the batch into B * T)
            rest = [int(d) for d in shape.reshape(-1)[1:]]
            src = (known or {}).get(node.input[0])
            return (src is not None and min(rest) > 0
                    and int(np.prod(src[1:])) == int(np.prod(rest))), None
        if lead != batch:
            return False, None
        new = shape.astype(np.int64).reshape(-1).copy()
        if a.get("allowzero") and (new == -1).any():
            if (new == 0).any():
                return False, None
            # (no 0 in the shape: allowzero changes nothing, and off, a 0 copies the batch;
            # the default exporter writes allowzero=1 on every view)
            next(at for at in node.attribute if at.name == "allowzero").i = 0
            new[0] = 0
        elif a.get("allowzero"):
            new[0] = -1
        else:
            new[0] = 0
        return True, new
    if op == "Transpose":
        perm = a.get("perm")
        return first and perm is not None and perm[0] == 0, None
    if op == "Flatten":
        return first and a.get("axis", 1) >= 1, None
    if op == "Gemm":
        return first and not a.get("transA"), None
    rank = len((known or {}).get(node.input[0], ())) if node.input else 0

    def touches_0(axes, rank: int) -> bool:  # (a negative axis of the input's rank: -rank is 0)
        axes = [int(x) for x in np.asarray(axes).reshape(-1)]
        return 0 in axes or bool(rank) and -rank in axes
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = consts.get(node.input[1])
        # (Unsqueeze's axes count in its output's rank)
        out_rank = rank + len(np.asarray(axes).reshape(-1)) if op == "Unsqueeze" and rank \
            and axes is not None else rank
        return first and axes is not None and not touches_0(axes, out_rank), None
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        return first, None  # a classifier's class axis is never its batch axis
    if op in ("Concat", "Split", "Gather", "ArgMax", "ArgMin", "TopK"):
        return first and not touches_0([a.get("axis", 0)], rank), None
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"):
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:  # (opset 13/18 on: input)
            axes = consts.get(node.input[1])
        return first and axes is not None and not touches_0(axes, rank), None
    if op in ("Shape", "Size", "Slice", "Expand", "Tile", "Pad", "Compress", "NonZero"):
        return False, None  # not followed: their results need not keep the batch on axis 0
    return True, None  # elementwise, Conv, pooling, normalization, activations, Dropout, ...


def _check_batch(original: onnx.ModelProto, m: onnx.ModelProto, fixed: dict[str, int],
                 batch: int, outs: list[str]) -> None:
    """Shape inference at batch+1 must give every batch-carrying output that batch size (where
    strict shape inference can check the original model at all)."""
    try:
        onnx.shape_inference.infer_shapes(original, strict_mode=True, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference cannot follow this model: no check
        return
    probe_model = copy.deepcopy(m)
    other = batch + 1
    for vi in probe_model.graph.input:
        if vi.name in fixed:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_value = other
    for o in probe_model.graph.output:
        if o.name in outs:
            o.type.tensor_type.shape.dim[0].Clear()
    try:
        inferred = onnx.shape_inference.infer_shapes(probe_model, strict_mode=True,
                                                     data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types
        first = checker_message(exc) or type(exc).__name__
        raise ModelError(f"convert --dynamic-batch: the model does not run at batch {other} "
                         f"after the change ({first}); its batch size is fixed in a way "
                         "convert cannot rewrite") from None
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name in outs:
        dims = known[name].type.tensor_type.shape.dim if name in known else []
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != other:
            raise ModelError(f"convert --dynamic-batch: output '{name}' keeps batch "
                             f"{dims[0].dim_value} when the input batch is {other}; its batch "
                             "size is fixed in a way convert cannot rewrite")


# -- graph helpers ---------------------------------------------------------------------------

def _static_values(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Non-float initializers and Constant outputs with integer values (shape constants), and
    what Identity, Reshape, Concat, Unsqueeze and Squeeze make of them (the default exporter
    with optimize=False writes a ReduceMean's axes as Reshape(Constant [-1, -2]))."""
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer
              if t.data_type not in FLOAT_TYPES}
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        a = attrs_of(node)
        if node.op_type == "Constant":
            for key in ("value", "value_int", "value_ints"):
                if key in a and np.asarray(a[key]).dtype.kind in "iu":
                    values[node.output[0]] = np.asarray(a[key])
            continue
        ins = [values.get(x) for x in node.input if x]
        if not ins or any(v is None for v in ins):
            continue
        try:
            out = _fold_integers(node.op_type, a, ins)
        except (ValueError, IndexError, TypeError):  # (a shape that does not fit: left alone)
            out = None
        if out is not None:
            values[node.output[0]] = out
    return values


def _fold_integers(op: str, a: Mapping, ins: list[np.ndarray]) -> np.ndarray | None:
    if op == "Identity":
        return ins[0]
    if op == "Reshape" and len(ins) == 2:
        shape = [int(d) for d in ins[1].reshape(-1)]
        shape = [ins[0].shape[i] if d == 0 and not a.get("allowzero") else d
                 for i, d in enumerate(shape)]
        return ins[0].reshape(shape)
    if op == "Concat":
        return np.concatenate(ins, axis=int(a.get("axis", 0)))
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes") if len(ins) == 1 else [int(v) for v in ins[1].reshape(-1)]
        if axes is None:
            return np.squeeze(ins[0]) if op == "Squeeze" else None
        if op == "Unsqueeze":
            rank = ins[0].ndim + len(axes)
            return np.expand_dims(ins[0], tuple(sorted(x % rank for x in axes)))
        return np.squeeze(ins[0], axis=tuple(x % ins[0].ndim for x in axes))
    return None


def _fixed_names(g: onnx.GraphProto) -> set[str]:
    """Tensors known before running: initializers and outputs of constant-producing nodes."""
    names = {t.name for t in g.initializer}
    names.update(n.output[0] for n in g.node
                 if n.op_type in ("Constant", "ConstantOfShape") and n.output)
    return names


def _consumers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list] = {}
    for node in g.node:
        for i, x in enumerate(node.input):
            out.setdefault(x, []).append((node, i))
    return out


def _inferred_shapes(m: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes from ONNX shape inference (empty where it cannot say)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - shapes only refine fan-in; the weight's own shape serves
        return {}
    shapes = {}
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for node in g.node:
        for a in node.attribute:
            for sub in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                yield from _graphs(sub)


def _rename_inputs(g: onnx.GraphProto, renames: dict[str, str]) -> None:
    for sub in _graphs(g):
        for node in sub.node:
            for i, x in enumerate(node.input):
                if x in renames:
                    node.input[i] = renames[x]


def _drop_dead(g: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the initializers (and their graph inputs) and Constant nodes among `candidates`
    that nothing reads any more."""
    read = {x for sub in _graphs(g) for n in sub.node for x in n.input}
    read |= {o.name for o in g.output}
    dead = {c for c in candidates if c not in read}
    if not dead:
        return
    for items in (g.initializer, g.input):  # deleted by index: no copies of big tensors
        for i in reversed([i for i, t in enumerate(items) if t.name in dead]):
            del items[i]
    for i in reversed([i for i, n in enumerate(g.node)
                       if n.op_type == "Constant" and n.output[0] in dead]):
        del g.node[i]
