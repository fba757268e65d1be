"""build_training_graph: forward in training mode + loss + backward, as one ONNX model.

The result is a valid ONNX model whose outputs are the loss, one gradient per trained
parameter (`<param>_grad`), the updated BatchNormalization running statistics, and the model's
own outputs. How to read them is recorded as JSON in metadata_props ("onnx_trainer.training").
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.autodiff.context import Builder
from trainer.autodiff.engine import active_nodes, build_backward
from trainer.autodiff.params import (
    CONSTANT,
    batchnorm_nodes,
    batchnorm_stats,
    fixed_floats,
    glob_match,
    parameter_table,
    repair_exported_model,
    select,
    single_bias_masks,
    stop_detached,
)
from trainer.autodiff.subgraph import lower_model, reads
from trainer.errors import ModelError, UnsupportedOpError
from trainer.executor import missing_kernels, probe
from trainer.graph import (
    FLOAT_TYPES,
    NameScope,
    all_names,
    attrs_of,
    check_model,
    elem_type,
    has_weights_to_lift,
    input_dtypes,
    input_shapes,
    is_float_dtype,
    lift_weights,
    node_name,
    opset_of,
    recurrent_opset,
    tensor_type,
    tensor_value,
)

META_KEY = "onnx_trainer.training"
LOSS_TYPES = ("cross_entropy", "mse", "bce", "ctc", "output")


@dataclass(frozen=True)
class LossSpec:
    type: str
    output: str
    target: str | None = None
    class_axis: int = -1
    ignore_index: int = -100  # cross_entropy: labels equal to it do not count (as torch)
    label_smoothing: float = 0.0  # cross_entropy: as torch's CrossEntropyLoss
    weight: tuple[float, ...] | None = None  # cross_entropy: torch's class weights
    blank: int = 0  # ctc: the blank class
    time_axis: int = 1  # ctc: 1 for [N, T, classes], 0 for [T, N, classes]
    lengths: str | None = None  # ctc: the target holding each sample's count of valid steps
    from_logits: bool = False  # bce: `output` is the logits of the model's Sigmoid output

    @classmethod
    def of(cls, spec) -> LossSpec:
        if isinstance(spec, LossSpec):
            return spec
        if isinstance(spec, Mapping):  # (the config's keys: `logits` is from_logits)
            raw = dict(spec)
            if "logits" in raw:
                raw["from_logits"] = bool(raw.pop("logits"))
            names = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in raw if k not in names]
            missing = [k for k in ("type", "output") if k not in raw]
            if unknown or missing:
                keys = ", ".join(n if n != "from_logits" else "logits" for n in names)
                raise ModelError("the loss " + (
                    f"has no key {', '.join(map(repr, unknown))}" if unknown
                    else f"needs {' and '.join(map(repr, missing))}") + f" (its keys: {keys})")
            return cls(**raw)
        if not hasattr(spec, "type"):
            raise ModelError(f"the loss must be a mapping such as {{'type': 'cross_entropy', "
                             f"'output': ..., 'target': ...}}, got {type(spec).__name__}")
        return cls(type=spec.type, output=spec.output, target=spec.target,
                   class_axis=getattr(spec, "class_axis", -1),
                   ignore_index=getattr(spec, "ignore_index", -100),
                   label_smoothing=float(getattr(spec, "label_smoothing", 0.0)),
                   weight=(None if getattr(spec, "weight", None) is None
                           else tuple(float(w) for w in spec.weight)),
                   blank=getattr(spec, "blank", 0), time_axis=getattr(spec, "time_axis", 1),
                   lengths=getattr(spec, "lengths", None),
                   from_logits=bool(getattr(spec, "logits", False)))


@dataclass(frozen=True)
class TrainingInfo:
    loss: str
    gradients: dict[str, str]  # parameter -> gradient output
    state: dict[str, str] = field(default_factory=dict)  # initializer -> its updated value
    inputs: list[str] = field(default_factory=list)  # data inputs of the model
    targets: dict[str, str] = field(default_factory=dict)  # loss target -> graph input added
    outputs: list[str] = field(default_factory=list)  # the model's own outputs
    seed: str = ""  # the initializer holding dLoss/dLoss (1.0); a feed may weight it


def training_info(model: onnx.ModelProto) -> TrainingInfo:
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            return TrainingInfo(**json.loads(prop.value))
    raise ModelError("model is not a training graph (no onnx_trainer.training metadata)")


def _model_and_batch(model, batch_size, what: str) -> onnx.ModelProto:
    """`model` as a ModelProto (a path is loaded, as `onnx-trainer` loads it); a batch size
    that is no positive integer refused (-1 was NumPy's "negative dimensions")."""
    if isinstance(model, str | os.PathLike):
        from trainer.graph import load_model

        model = load_model(model)
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"{what}: the model must be an onnx.ModelProto or a path to an .onnx "
                         f"file, got {type(model).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, int | np.integer) or batch_size < 1):
        raise ModelError(f"{what}: batch_size must be a positive integer, got {batch_size!r}")
    return model


def reverse(model: onnx.ModelProto, wrt: Iterable[str], of: Iterable[str], *,
            batch_size: int | None = None,
            shapes: Mapping[str, tuple[int, ...]] | None = None,
            example: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Generic reverse mode: the model extended with vector-Jacobian products.

    `wrt` names graph inputs and/or initializers, `of` names graph outputs (a name or names).
    The result keeps the original inputs and outputs, adds one adjoint input `<y>_grad` (shape
    and dtype of y) per y in `of`, and one output `<x>_grad` per x in `wrt` holding
    sum_y (dy/dx)^T <y>_grad (zeros where x does not reach `of`). Shapes are specialized:
    symbolic input dims take `batch_size`, or give `shapes` for the inputs; `example` gives
    values for inputs whose values decide shapes (a shape or size tensor), which are otherwise
    taken as zeros.
    """
    model = _model_and_batch(model, batch_size, "reverse")
    # (one name as a string: iterated, it was its characters, each "not an output")
    wrt = [wrt] if isinstance(wrt, str) else wrt
    of = [of] if isinstance(of, str) else of
    for arg, value in (("wrt", wrt), ("of", of)):
        if not isinstance(value, Iterable):
            raise ModelError(f"reverse: {arg} names tensors (a name or a list of names), "
                             f"got {type(value).__name__}")
    wrt, of = list(dict.fromkeys(wrt)), list(dict.fromkeys(of))
    g0 = model.graph
    outputs = [o.name for o in g0.output]
    inits = {t.name: t for t in g0.initializer}
    inputs = {vi.name for vi in g0.input}
    for y in of:
        if y not in outputs:
            raise ModelError(f"reverse: '{y}' is not an output of the model "
                             f"(outputs: {', '.join(outputs)})")
    for x in wrt:
        if x not in inputs and x not in inits:
            raise ModelError(f"reverse: '{x}' is neither a graph input nor an initializer")
    missing = missing_kernels(model)
    if missing:
        raise UnsupportedOpError("forward kernel", missing)
    model = recurrent_opset(model)  # (opset-9 RNNs: the gradient rules need opset 10)
    example = {k: np.asarray(v) for k, v in (example or {}).items()}
    in_shapes = input_shapes(model, batch_size,
                             {**{k: v.shape for k, v in example.items()}, **dict(shapes or {})})
    m = copy.deepcopy(model)
    opset = ensure_default_opset(m)
    g = m.graph
    for vi in g.input:  # specialize the data inputs to concrete shapes
        if vi.name in in_shapes:
            for d, v in zip(tensor_type(vi.type).shape.dim, in_shapes[vi.name], strict=True):
                d.Clear()
                d.dim_value = v
    m = lower_model(m, in_shapes, input_dtypes(model), example, trainable=wrt)
    g = m.graph
    shapes_all = probe(m, in_shapes, input_dtypes(model), example)
    for x in wrt + of:
        if x in shapes_all and not is_float_dtype(shapes_all[x][1]):
            raise ModelError(f"reverse: '{x}' is {shapes_all[x][1]}, not a float tensor")
    consts = _constant_values(m, shapes_all, trainable=wrt)
    scope = NameScope(all_names(g))
    seeds = {y: scope.fresh(f"{y}_grad") for y in of}
    public = {x: scope.fresh(f"{x}_grad") for x in wrt}  # reserved before internal names
    nodes = list(g.node)
    reach = active_nodes(nodes, list(seeds), set(wrt), shapes_all)[1]
    live = [x for x in wrt if x in reach or x in seeds]
    bwd, bwd_inits, grads = build_backward(nodes, seeds, live, shapes_all, opset, scope, consts)
    g.node.extend(bwd)
    add_initializers(g, bwd_inits, m.ir_version)

    def vi(name, like=None):
        shape, dt = shapes_all[like or name]
        return helper.make_tensor_value_info(name, elem_type(dt), list(shape))
    g.input.extend(vi(seeds[y], y) for y in of)
    for o in g.output:  # outputs declared without a type get the probed one
        if not o.type.tensor_type.elem_type and o.name in shapes_all:
            o.CopyFrom(vi(o.name))
    for x in wrt:
        name = public[x]
        shape, dt = shapes_all[x]
        if x in grads:
            g.node.append(helper.make_node("Identity", [grads[x]], [name],
                                           name=scope.fresh(f"{name}/Identity")))
        elif opset >= 9:  # x does not reach any of `of`: its gradient is zero
            g.node.append(helper.make_node(
                "ConstantOfShape", [_int_const(g, scope, list(shape), m.ir_version)], [name],
                name=scope.fresh(f"{name}/Zeros"),
                value=numpy_helper.from_array(np.zeros(1, dt))))
        else:  # (no ConstantOfShape before opset 9: the zeros as a Constant)
            g.node.append(helper.make_node(
                "Constant", [], [name], name=scope.fresh(f"{name}/Zeros"),
                value=numpy_helper.from_array(np.zeros(shape, dt))))
        g.output.append(vi(name, x))
    del g.value_info[:]
    check_model(m, "reverse-mode graph")
    return m


def _import_used_domains(m: onnx.ModelProto) -> None:
    """Add an opset import (version 1) for each node domain the graph uses but does not import
    (the engine's own ai.onnx_trainer ops)."""
    have = {o.domain for o in m.opset_import} | {"", "ai.onnx"}
    for d in sorted({n.domain for n in m.graph.node} - have):
        m.opset_import.append(helper.make_opsetid(d, 1))


def _int_const(g: onnx.GraphProto, scope: NameScope, values: list[int], ir: int) -> str:
    name = scope.fresh("shape")
    add_initializers(g, [numpy_helper.from_array(np.array(values, np.int64), name)], ir)
    return name


def add_initializers(g: onnx.GraphProto, tensors, ir_version: int) -> None:
    """Append initializers; before IR 4 every initializer must also be a graph input."""
    tensors = list(tensors)
    g.initializer.extend(tensors)
    if ir_version < 4:
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in tensors)


# Rules emit standard ops; a model with no default-domain import (only ai.onnx.ml, say) gets
# this one for its gradient nodes.
DEFAULT_GRAD_OPSET = 18


def ensure_default_opset(m: onnx.ModelProto) -> int:
    """The model's default-domain opset, importing DEFAULT_GRAD_OPSET when it has none."""
    opset = opset_of(m)
    if opset == 0:
        m.opset_import.append(helper.make_opsetid("", DEFAULT_GRAD_OPSET))
        opset = DEFAULT_GRAD_OPSET
    return opset


def build_training_graph(model: onnx.ModelProto, loss, wrt="all", *, frozen: Iterable[str] = (),
                         batch_size: int | None = None,
                         shapes: Mapping[str, tuple[int, ...]] | None = None,
                         batchnorm="train", sync_batchnorm: bool = False,
                         example: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The training graph of `model` for `loss` w.r.t. `wrt` (all: the default parameters, see
    trainer.autodiff.params; or names/globs).

    Symbolic input dims take `batch_size` (or give full `shapes`). `batchnorm="train"` uses
    batch statistics and updates running statistics as PyTorch's train mode; "eval" keeps the
    model's statistics fixed (inference form, as `.eval()`); a list of globs puts the
    BatchNormalization layers whose scale initializer matches in eval form, the rest in train.
    `sync_batchnorm` computes the batch statistics over all ranks of a data-parallel job
    (ai.onnx_trainer AllReduce nodes: the identity in one process). `example`: values of data
    inputs (a first batch) for the runs that find every value's shape, which otherwise feed
    zeros (a traced model may fail on zeros: a Gather of the first token a router picked).
    """
    spec = LossSpec.of(loss)
    if spec.type not in LOSS_TYPES:
        raise ModelError(f"unknown loss type '{spec.type}' (use one of {', '.join(LOSS_TYPES)})")
    model = _model_and_batch(model, batch_size, "build_training_graph")
    # (one name or glob as a string, "all" apart: iterated, it was its characters)
    wrt = [wrt] if isinstance(wrt, str) and wrt != "all" else wrt
    frozen = [frozen] if isinstance(frozen, str) else frozen
    eval_bn = _eval_batchnorm(model, batchnorm)
    missing = missing_kernels(model)
    if missing:
        raise UnsupportedOpError("forward kernel", missing)
    loss_output_of(model, spec)
    outputs = [o.name for o in model.graph.output]
    if has_weights_to_lift(model):  # (weights in subgraphs or Constant nodes: initializers)
        model = copy.deepcopy(model)
        lift_weights(model)
    model = recurrent_opset(model)  # (opset-9 RNNs: the gradient rules need opset 10)
    in_shapes = input_shapes(model, batch_size, dict(shapes or {}))
    dtypes = input_dtypes(model)
    # static control flow, sequences: plain nodes
    model = lower_model(model, in_shapes, dtypes, trainable=wrt)
    example = {k: np.asarray(v) for k, v in (example or {}).items()
               if k in in_shapes and np.shape(v) == tuple(in_shapes[k])}
    first = probe(model, in_shapes, dtypes, example)

    m = copy.deepcopy(model)
    repair_exported_model(m)
    stop_detached(m)  # (PyTorch's .detach(), from the export's records)
    bn_stats = batchnorm_stats(m.graph.node)
    opset = ensure_default_opset(m)
    fw = training_forward(m, first, _constant_values(m, first, wrt), opset, spec, eval_bn,
                          in_shapes, sync_batchnorm)
    fwd, state, spec, loss_name, target_vis = fw.model, fw.state, fw.spec, fw.loss, fw.targets
    t_dtypes = {vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
                for vi in target_vis}
    shapes_all = probe(fwd, {**in_shapes, **fw.target_shapes}, {**dtypes, **t_dtypes}, example)
    _, chosen, grads, seed = attach_backward(m, fw, shapes_all,
                                             _constant_values(fwd, shapes_all, wrt),
                                             wrt, frozen, bn_stats, opset)
    g = fwd.graph
    del g.output[:]

    def out(name, like=None):
        shape, dt = shapes_all[like or name]
        return helper.make_tensor_value_info(name, elem_type(dt), list(shape))
    g.output.extend([out(loss_name)] + [out(grads[p], p) for p in chosen] +
                    [out(v, k) for k, v in state.items()] + [out(o) for o in outputs])
    info = TrainingInfo(loss=loss_name, gradients=dict(grads), state=state, seed=seed,
                        inputs=list(in_shapes),
                        targets=loss_targets(spec, target_vis),
                        outputs=outputs)
    helper.set_model_props(fwd, {**{p.key: p.value for p in fwd.metadata_props},
                                 META_KEY: json.dumps(info.__dict__)})
    _drop_unread_constants(fwd, {t.name for t in m.graph.initializer
                                 if t.data_type in FLOAT_TYPES} | {seed})
    _import_used_domains(fwd)
    if opset < 6:
        _cast_types_as_names(fwd.graph)
    try:
        check_model(fwd, "training graph")
    except ModelError:  # (an invalid model gives an invalid training graph: say which it is)
        check_model(model, "the model")
        raise
    return fwd


def _cast_types_as_names(g: onnx.GraphProto) -> None:
    """Before opset 6 Cast's `to` is a type name ("FLOAT"), not an enum: the Casts the loss and
    the gradient rules add are written that way in a graph of such an opset."""
    for n in g.node:
        if n.op_type != "Cast" or n.domain not in ("", "ai.onnx"):
            continue
        for a in n.attribute:
            if a.name == "to" and a.type == onnx.AttributeProto.INT:
                name = onnx.TensorProto.DataType.Name(a.i)
                a.Clear()
                a.CopyFrom(helper.make_attribute("to", name))


def loss_targets(spec: LossSpec, target_vis: list) -> dict[str, str]:
    """{loss target name: training-graph input}: the target, then ctc's lengths (if any)."""
    names = [spec.target] + ([spec.lengths] if spec.type == "ctc" and spec.lengths else [])
    return {k: vi.name for k, vi in zip(names, target_vis, strict=False)}


@dataclass
class TrainingForward:
    """The forward graph with BatchNormalization in training form and the loss appended."""
    model: onnx.ModelProto  # the forward model: its nodes, initializers, inputs with targets
    nodes: list  # its nodes (forward and loss)
    state: dict  # running statistic -> the value that updates it
    spec: LossSpec  # the loss (its output moved to the logits when it read a Softmax)
    loss: str  # the loss value's name
    targets: list  # the targets' value infos
    target_shapes: dict  # target name -> static shape
    scope: NameScope  # names in use, for the backward's fresh names
    added: frozenset = frozenset()  # initializers the rewrite and the loss added (not the model's)


def _drop_unread_constants(model: onnx.ModelProto, keep: set[str]) -> None:
    """Remove the initializers and Constant nodes that no node reads (a rule's constant its
    simplification left unused, the model's training_mode flag that the train form replaced):
    onnxruntime warns of each. The model's float initializers (`keep`) stay, read or not."""
    from trainer.executor import outer_names, subgraphs

    g = model.graph
    read = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    for n in g.node:
        for _, graphs in subgraphs(n):
            for sub in graphs:
                read |= outer_names(sub)
    inputs = {vi.name for vi in g.input}
    idle = [n for n in g.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
            and not any(o in read for o in n.output)]
    if idle:
        gone = {id(n) for n in idle}
        nodes = [n for n in g.node if id(n) not in gone]
        del g.node[:]
        g.node.extend(nodes)
    drop = [t for t in g.initializer if t.name not in read and t.name not in keep
            and t.name not in inputs]
    if drop:
        names = {t.name for t in drop}
        kept = [t for t in g.initializer if t.name not in names]
        del g.initializer[:]
        g.initializer.extend(kept)


def training_forward(m: onnx.ModelProto, first: Mapping, consts: Mapping, opset: int,
                     spec: LossSpec, eval_bn, in_shapes: Mapping,
                     sync_batchnorm: bool = False) -> TrainingForward:
    """The training graph's forward part for model `m` (its forward values' `first` shapes
    and constant values `consts`): shared by build_training_graph and the memory estimate."""
    g = m.graph
    scope = NameScope(all_names(g))
    first = dict(first)  # (the logits' layout copies below add their shapes)
    builder = Builder(scope, opset, first, "train", consts)
    plain = _l2_norms(list(g.node), builder, consts, {o.name for o in g.output})
    nodes, state = _training_mode(plain, builder, first, consts, eval_bn, sync_batchnorm,
                                  unbiased=m.producer_name not in _BIASED_RUNNING_VAR)
    spec, laid_out = _logits_of_softmax(spec, list(g.node), first, opset, builder)
    loss_nodes, loss_name, target_vis = _append_loss(spec, builder, first, scope)
    nodes += laid_out + loss_nodes
    fwd = _forward_model(m, nodes, builder.initializers, target_vis, in_shapes)
    _import_used_domains(fwd)  # (the loss's own ops: ONNX shape inference needs the import)
    t_shapes = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
                for vi in target_vis}
    return TrainingForward(fwd, nodes, state, spec, loss_name, target_vis, t_shapes, scope,
                           frozenset(t.name for t in builder.initializers))


# ai.onnx.ml ops whose coefficients are attributes (scikit-learn's linear models and SVMs)
_ATTRIBUTE_WEIGHTS = frozenset({"LinearClassifier", "LinearRegressor", "SVMClassifier",
                                "SVMRegressor", "Scaler", "Normalizer"})


def attach_backward(m: onnx.ModelProto, fw: TrainingForward, shapes: Mapping, consts: Mapping,
                    wrt, frozen, bn_stats, opset: int):
    """Choose the parameters of `m` and append their backward to fw.model, seeded by a new
    initializer `<loss>_grad_seed` (1): (parameter table, chosen, gradient names, seed). The
    table holds the model's own initializers: `m` is fw.model, which also holds the constants
    its training rewrite added (fw.added), never candidates, not even for a `trainable` glob."""
    table = [r for r in parameter_table(m, fw.nodes, fw.loss, shapes, stats=bn_stats)
             if r.name not in fw.added]
    chosen = select(table, wrt, frozen)
    if not chosen and select(table, wrt, ()):  # (the frozen globs took every one)
        everything = select(table, wrt, ())
        raise ModelError(f"nothing to train: 'frozen' matches every tensor that would train "
                         f"({', '.join(everything[:6])}{'...' if len(everything) > 6 else ''}); "
                         "narrow its globs")
    if not chosen:
        from trainer.report import type_conflict  # (the report imports the autodiff)
        for k, node in enumerate(m.graph.node):  # (an int64 input into a float MatMul: its
            why = type_conflict(node, opset, shapes)  # weight reaches no float value)
            if why:
                raise ModelError(f"node '{node_name(node, k)}' ({node.op_type}): "
                                 f"{why[len('REFUSED: '):]} (onnxruntime refuses such a model "
                                 "too; cast one of them)")
        left_out = [r for r in table if r.role == CONSTANT]
        if left_out:  # (quantization scales of an integer-weight model, one-element constants)
            names = ", ".join(r.name for r in left_out[:6]) + ("..." if len(left_out) > 6 else "")
            kinds = sorted({r.reason.split(" (")[0] for r in left_out})
            raise ModelError(f"nothing to train by default: every float initializer that "
                             f"reaches the loss is left out ({names}: {' or '.join(kinds)}); "
                             "list them in 'trainable' to train them ('onnx-trainer check "
                             "MODEL' gives each one's reason)")
        held = sorted({n.op_type for n in m.graph.node if n.domain == "ai.onnx.ml"
                       and n.op_type in _ATTRIBUTE_WEIGHTS})
        raise ModelError("nothing to train: no float initializer reaches the loss (see "
                         "'onnx-trainer check MODEL' for why each one is left out)"
                         + (f"; {', '.join(held)} keep their coefficients in node "
                            "attributes, not in tensors, so there is nothing to train in them"
                            if held else ""))
    seed = fw.scope.fresh(f"{fw.loss}_grad_seed")
    bwd, bwd_inits, grads = build_backward(fw.nodes, {fw.loss: seed}, chosen, shapes, opset,
                                           fw.scope, consts)
    for p, mask in single_bias_masks(m).items():  # (Keras's one recurrent bias, split in two)
        if p in grads:
            name, keep = fw.scope.fresh(f"{grads[p]}_masked"), fw.scope.fresh(f"{p}_grad_mask")
            bwd.append(helper.make_node("Mul", [grads[p], keep], [name]))
            bwd_inits.append(numpy_helper.from_array(mask, keep))
            grads[p] = name
    g = fw.model.graph
    g.node.extend(bwd)
    add_initializers(g, [*bwd_inits, numpy_helper.from_array(
        np.array(1.0, shapes[fw.loss][1]), seed)], fw.model.ir_version)
    return table, chosen, grads, seed


# Ops never folded: their values change from run to run.
_UNFOLDABLE = {"Dropout", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike", "Bernoulli", "Multinomial"}
_FOLD_LIMIT = 1 << 16  # elements: folding is for shape-like values, not for weights


def _constant_values(model: onnx.ModelProto, shapes: Mapping | None = None, trainable="all"
                     ) -> dict[str, np.ndarray]:
    """Values known before running: initializers, Constant nodes, and every value computed only
    from Constant nodes, non-float initializers, float initializers that training does not
    change (`params.fixed_floats`, for the `trainable` globs) and static shapes (shape
    arithmetic, axes, ratios, a loop's start condition). Folded values never depend on a float
    initializer that training may change."""
    from trainer.kernels import get_kernel

    values = {t.name: tensor_value(t) for t in model.graph.initializer}
    pure = {t.name for t in model.graph.initializer if t.data_type not in FLOAT_TYPES}
    pure |= fixed_floats(model, trainable)
    for node in model.graph.node:
        a = attrs_of(node)
        if node.op_type == "Constant":
            for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                if key in a:
                    values[node.output[0]] = np.asarray(a[key])
                    pure.add(node.output[0])
            continue
        if node.op_type in ("Shape", "Size") and shapes and node.input[0] in shapes:
            dims = np.array(shapes[node.input[0]][0], np.int64)
            values[node.output[0]] = (dims[a.get("start", 0):a.get("end")]
                                      if node.op_type == "Shape" else np.array(dims.prod()))
            pure.add(node.output[0])
            continue
        ins = [i for i in node.input if i]
        if (node.op_type in _UNFOLDABLE or node.domain not in ("", "ai.onnx")
                or not all(i in pure for i in ins)
                or any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for at in node.attribute)):
            continue
        fn = get_kernel(node.op_type, opset_of(model, node.domain), node.domain)
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        if "n_outputs" in params:
            a["n_outputs"] = len(node.output)
        if "rng" in params:
            continue
        try:  # (a log of 0 that a Where then discards, T5's position buckets: no warning)
            with np.errstate(all="ignore"):
                outs = fn(np, *[values[i] if i else None for i in node.input], **a)
        except Exception:  # noqa: BLE001 - left unfolded; the run reports real failures
            continue
        for o, v in zip(node.output, outs, strict=False):
            if o and isinstance(v, np.ndarray | np.generic) and np.size(v) <= _FOLD_LIMIT:
                values[o] = np.asarray(v)
                pure.add(o)
    return values


def _forward_model(m, nodes, inits, target_vis, in_shapes) -> onnx.ModelProto:
    g = m.graph
    del g.node[:]
    g.node.extend(nodes)
    add_initializers(g, inits, m.ir_version)
    for vi in g.input:  # specialize the data inputs to the run's concrete shapes
        if vi.name in in_shapes:
            dims = tensor_type(vi.type).shape.dim
            for d, v in zip(dims, in_shapes[vi.name], strict=True):
                d.Clear()
                d.dim_value = v
    g.input.extend(target_vis)
    # (shapes are the run's now; the exporter's records on initializers stay: the parameter
    # table reads which PyTorch parameters a folded tensor holds from them)
    inits = {t.name for t in g.initializer}
    kept = [vi for vi in g.value_info if vi.name in inits and vi.metadata_props]
    del g.value_info[:]
    g.value_info.extend(kept)
    return m


def loss_output_of(model: onnx.ModelProto, spec) -> None:
    """The config's loss.output is one of the model's graph outputs, declared a float tensor
    where its type is declared (one declared a string over a float MatMul trained in silence,
    where `check MODEL` found no parameter reaching it and onnxruntime refuses the model)."""
    outputs = [o.name for o in model.graph.output]
    if spec.output not in outputs:
        raise ModelError(f"loss output '{spec.output}' is not an output of the model " + (
            f"(outputs: {', '.join(outputs)})" if outputs else "(it declares none)"))
    vi = model.graph.output[outputs.index(spec.output)]
    code = vi.type.tensor_type.elem_type if vi.type.WhichOneof("value") == "tensor_type" \
        else 0
    if code and code not in FLOAT_TYPES:
        raise ModelError(f"loss output '{spec.output}' is declared "
                         f"{helper.tensor_dtype_to_string(code).removeprefix('TensorProto.')}"
                         ", not a float tensor: a loss needs float values; if the node "
                         "computing it gives floats, fix the output's declared type "
                         "(onnxruntime refuses the model as it is)")


def _eval_batchnorm(model: onnx.ModelProto, batchnorm) -> set[str]:
    """Names (scale initializers) of the BatchNormalization layers kept in inference form."""
    scales = list(dict.fromkeys(n.input[1] for n in batchnorm_nodes(model.graph.node)))
    if batchnorm in ("train", None):
        return set()
    if batchnorm in ("eval", "frozen"):
        return set(scales)
    if isinstance(batchnorm, str) or not isinstance(batchnorm, Iterable):
        raise ModelError(f"batchnorm must be 'train', 'eval' or a list of globs, got "
                         f"{batchnorm!r}")
    chosen = set()
    for pattern in batchnorm:
        hits = {s for s in scales if glob_match(s, pattern, scales)}
        if not hits:
            raise ModelError(f"batchnorm entry '{pattern}' matches the scale of no "
                             "BatchNormalization layer " + (
                                 f"(scales: {', '.join(scales[:8])})" if scales else
                                 "(the model has none)"))
        chosen |= hits
    return chosen


# Exporters of frameworks whose BatchNorm moves its running variance toward the biased batch
# variance, as the ONNX specification's training mode does (PyTorch: the unbiased one)
_BIASED_RUNNING_VAR = frozenset({"tf2onnx", "keras2onnx", "jax2onnx", "paddle2onnx",
                                 "PaddlePaddle"})


def _l2_norms(nodes: list, b: Builder, consts: Mapping, keep: set[str]) -> list:
    """Pow(ReduceSum(Pow(X, 2), axes), 0.5), as PyTorch's TorchScript export writes
    torch.cdist, as ReduceL2(X, axes): the same value (to float rounding), whose gradient is 0
    where the norm is (torch.cdist's and torch.norm's backward). Through the Pows it was
    0.5 / sqrt(0) = inf at a zero distance, times 2 X = 0: NaN (cdist(x, x) at its diagonal).
    Intermediate values that another node or an output (`keep`) reads are left as they are."""
    def exponent(node, value):
        if node.op_type != "Pow" or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
            return False
        e = consts.get(node.input[1])
        # (within 1e-6: the export writes 1/p as 0.49999976; the norm is x^(2.4e-7) off it)
        return e is not None and np.size(e) == 1 and abs(float(np.asarray(e).reshape(()))
                                                         - value) <= 1e-6

    readers: dict[str, int] = {}
    for n in nodes:
        for i in reads(n):  # (a subgraph's read of an outer value counts)
            readers[i] = readers.get(i, 0) + 1
    made = {o: n for n in nodes for o in n.output}
    drop, replace = set(), {}
    for k, n in enumerate(nodes):
        if not exponent(n, 0.5):
            continue
        r = made.get(n.input[0])
        if r is None or r.op_type != "ReduceSum" or r.domain not in ("", "ai.onnx"):
            continue
        sq = made.get(r.input[0])
        if sq is None or not exponent(sq, 2.0) or any(
                readers.get(v, 0) != 1 or v in keep for v in (r.output[0], sq.output[0])):
            continue
        a = attrs_of(r)
        axes = a.get("axes")
        if len(r.input) > 1 and r.input[1]:
            axes = consts.get(r.input[1])
            if axes is None:
                continue
        if axes is None or len(np.atleast_1d(axes)) == 0:
            continue  # (no axes: every axis, or none with noop_with_empty_axes)
        replace[k] = [b.reduce("ReduceL2", sq.input[0], np.atleast_1d(axes).tolist(),
                               n.output[0], keepdims=a.get("keepdims", 1))]
        drop |= {id(r), id(sq)}
    if not replace:
        return nodes
    result = []
    for k, n in enumerate(nodes):
        if id(n) in drop:
            continue
        result += replace.get(k, [n])
    return result


def _training_mode(nodes, b: Builder, shapes, consts, eval_bn: set[str], sync: bool = False,
                   unbiased: bool = True):
    """Rewrite nodes to their training behaviour; returns (nodes, {stat: updated name}).
    BatchNormalization nodes that share running statistics (one module applied twice) update
    them one after the other, in graph order, as PyTorch does."""
    out, state = [], {}
    for k, node in enumerate(nodes):
        label = node_name(node, k)
        if node.op_type == "BatchNormalization" and b.opset < 9 and \
                attrs_of(node).get("spatial", 1) == 0:
            raise ModelError(f"BatchNormalization node '{label}': spatial=0 (statistics per "
                             "activation, opsets 1-8) has no gradient rule; export the model "
                             "at opset 9 or later")
        if node.op_type == "BatchNormalization" and (
                node.input[1] in eval_bn or any(s not in consts for s in node.input[3:5])):
            # (inference form as asked, or where the graph computes mean and variance from
            # the data: no running statistics, a function of its inputs as exported; tf2onnx
            # writes a Keras LayerNormalization so)
            out += _eval_form(node, b)
        elif node.op_type == "BatchNormalization":
            stats = list(node.input[3:5])
            if any(s in state for s in stats):  # (read after an earlier node's update)
                node = copy.deepcopy(node)
                for i, s in enumerate(stats, 3):
                    node.input[i] = state.get(s, s)
            new, upd = _batchnorm_train(node, label, b, shapes, consts, sync, unbiased)
            out += new
            state.update({orig: upd[now] for orig, now in zip(stats, node.input[3:5],
                                                               strict=True)})
        elif node.op_type == "Dropout" and b.opset >= 12:
            node = copy.deepcopy(node)
            while len(node.input) < 2:
                node.input.append("")
            if not node.input[1]:
                node.input[1] = b.const(0.5, shapes[node.input[0]][1], f"{label}/ratio")
            if len(node.input) < 3:
                node.input.append("")
            node.input[2] = b.const(True, np.bool_, f"{label}/training_mode")
            if len(node.output) < 2:
                node.output.append(b.scope.fresh(f"{node.output[0]}/mask"))
            out.append(node)
        elif node.op_type == "Dropout":  # before opset 12: no training_mode input
            out += _dropout_train_old(node, label, b, shapes)
        elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                 for a in node.attribute):
            # (control flow left after lowering: a branch or trip count the data decides)
            inner = [n for n in batchnorm_nodes([node]) if n.input[1] not in eval_bn]
            if inner:
                bn = inner[0]
                raise ModelError(
                    f"BatchNormalization '{bn.name or bn.output[0]}' runs inside {node.op_type} "
                    f"'{label}', whose branch or trip count depends on the data: its training "
                    "form (batch statistics, running statistics updated) is not built there; "
                    f"normalize it with its running statistics (batchnorm: ['{bn.input[1]}'], "
                    "the layers kept as PyTorch's .eval() has them), or export the model with "
                    "that branch fixed")
            out.append(node)
        elif node.op_type == "MaxPool" and len(node.output) < 2 and b.opset >= 8:
            node = copy.deepcopy(node)
            node.output.append(b.scope.fresh(f"{node.output[0]}/indices"))
            out.append(node)
        else:
            out.append(node)
    return out, state


def _dropout_train_old(node, label, b: Builder, shapes) -> list[onnx.NodeProto]:
    """Dropout of opsets 1-11 in training: Y = X * (U >= ratio) / (1 - ratio), U uniform in
    [0, 1) from the executor's per-step random stream (the mask output, when used, is the kept
    positions)."""
    a = attrs_of(node)
    ratio = float(a.get("ratio", 0.5))
    x, dt = node.input[0], shapes[node.input[0]][1]
    if ratio == 0.0:  # (opsets 1-6: is_test=1 marks an eval-mode export; training drops out,
        return [node]  # as BatchNormalization's is_test trains on batch statistics)
    b.prefix = f"{label}/Train"
    u, drop, keep, keepf, scaled = (b.tmp(k) for k in ("u", "drop", "keep", "keepf", "scaled"))
    nodes = [b.node("RandomUniformLike", [x], [u]),
             b.node("Less", [u, b.const(ratio, dt, "ratio")], [drop]),
             b.node("Not", [drop], [keep]),
             b.node("Cast", [keep], [keepf], to=elem_type(dt)),
             b.node("Mul", [keepf, b.const(1.0 / (1.0 - ratio), dt, "scale")], [scaled]),
             b.node("Mul", [x, scaled], [node.output[0]])]
    if len(node.output) > 1 and node.output[1]:
        mask = keep if b.opset >= 10 else keepf
        nodes.append(b.node("Identity", [mask], [node.output[1]]))
    b.prefix = "train"
    return nodes


def _eval_form(node, b: Builder) -> list[onnx.NodeProto]:
    """A BatchNormalization node in inference form (its extra outputs copy the statistics)."""
    from trainer.graph import inference_form

    g = helper.make_graph([node], "bn", [], [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", b.opset)])
    return list(inference_form(m).graph.node)


def _batchnorm_train(node, label, b: Builder, shapes, consts, sync: bool = False,
                     unbiased: bool = True):
    """BatchNormalization with batch statistics, as standard ops; PyTorch's running update.

    Y = (X - mean) / sqrt(var + eps) * scale + B with biased batch var; running_mean and
    running_var move by (1 - momentum) toward the batch mean and the unbiased batch var
    (the biased one where not `unbiased`: the ONNX specification's, Keras's, Flax's). With
    `sync` the sums and the count behind mean and var are all-reduced over the ranks first
    (SyncBatchNorm), so N ranks normalize as one process with the global batch does.
    """
    a = attrs_of(node)
    eps, mom = a.get("epsilon", 1e-5), a.get("momentum", 0.9)
    x, scale, bias, rmean, rvar = node.input[:5]
    x_shape, dt = shapes[x]
    rank, c = len(x_shape), x_shape[1]
    for name, role in ((scale, "scale"), (bias, "B"), (rmean, "input_mean"),
                       (rvar, "input_var")):
        got = shapes.get(name, (None,))[0]
        if got is not None and all(isinstance(d, int) for d in (*got, c)) and \
                tuple(got) != (c,):
            raise ModelError(f"BatchNormalization '{label}': its {role} '{name}' has shape "
                             f"{list(got)}, where the specification (and onnxruntime) asks for "
                             f"[C] = [{c}], one value per channel; store it as a 1-D tensor")
    n = int(np.prod(x_shape)) // c
    if n == 1 and not sync:
        raise ModelError(f"BatchNormalization '{label}' trains on 1 value per channel (input "
                         f"shape {list(x_shape)}): a batch of 1 sample has variance 0, so it "
                         "would output its bias alone and learn nothing (PyTorch refuses it "
                         "too); give each process batches of at least 2 samples, or "
                         "batchnorm: eval to normalize with the running statistics")
    b.prefix = f"{label}/Train"
    axes = [0] + list(range(2, rank))
    bshape = [c] + [1] * (rank - 2)
    t = {s: b.tmp(s) for s in ("mean", "xc", "sq", "var", "ve", "sd", "xhat", "s_b", "b_b",
                               "scaled", "m_flat", "v_flat", "rm_m", "bm", "rv_m", "bv",
                               "sum", "gsum", "count", "ssq", "gssq", "vu", "n1", "vu_flat")}

    def k(v):
        return b.const(v, dt, "c")
    if sync:
        from trainer.kernels import CUSTOM_DOMAIN

        def allreduce(src, dst):
            return b.node("AllReduce", [src], [dst], domain=CUSTOM_DOMAIN)
        nodes = [b.reduce("ReduceSum", x, axes, t["sum"]), allreduce(t["sum"], t["gsum"]),
                 allreduce(k(np.full([1] * rank, float(n))), t["count"]),
                 b.node("Div", [t["gsum"], t["count"]], [t["mean"]]),
                 b.node("Sub", [x, t["mean"]], [t["xc"]]),
                 b.node("Mul", [t["xc"], t["xc"]], [t["sq"]]),
                 b.reduce("ReduceSum", t["sq"], axes, t["ssq"]), allreduce(t["ssq"], t["gssq"]),
                 b.node("Div", [t["gssq"], t["count"]], [t["var"]]),
                 # unbiased: sum of squares / (count - 1), count > 1 (else the biased var)
                 b.node("Sub", [t["count"], k(1.0)], [t["n1"]]),
                 b.node("Max", [t["n1"], k(1.0)], [t["n1"] + "_pos"]),
                 b.node("Div", [t["gssq"], t["n1"] + "_pos"], [t["vu"]])]
    else:
        nodes = [b.reduce("ReduceMean", x, axes, t["mean"]),
                 b.node("Sub", [x, t["mean"]], [t["xc"]]),
                 b.node("Mul", [t["xc"], t["xc"]], [t["sq"]]),
                 b.reduce("ReduceMean", t["sq"], axes, t["var"])]
    nodes += [b.node("Add", [t["var"], k(eps)], [t["ve"]]),
              b.node("Sqrt", [t["ve"]], [t["sd"]]),
              b.node("Div", [t["xc"], t["sd"]], [t["xhat"]]),
              b.reshape(scale, bshape, t["s_b"]), b.reshape(bias, bshape, t["b_b"]),
              b.node("Mul", [t["xhat"], t["s_b"]], [t["scaled"]]),
              b.node("Add", [t["scaled"], t["b_b"]], [node.output[0]])]
    outs = list(node.output) + [""] * (3 - len(node.output))
    new_mean = outs[1] or b.scope.fresh(f"{rmean}_updated")
    new_var = outs[2] or b.scope.fresh(f"{rvar}_updated")
    if not unbiased:
        v_src, v_scale = t["var"], 1.0 - mom
    elif sync:
        v_src, v_scale = t["vu"], 1.0 - mom
    else:
        v_src, v_scale = t["var"], (1.0 - mom) * (n / (n - 1) if n > 1 else 1.0)
    nodes += [b.reshape(t["mean"], [c], t["m_flat"]), b.reshape(v_src, [c], t["v_flat"]),
              b.node("Mul", [rmean, k(mom)], [t["rm_m"]]),
              b.node("Mul", [t["m_flat"], k(1.0 - mom)], [t["bm"]]),
              b.node("Add", [t["rm_m"], t["bm"]], [new_mean]),
              b.node("Mul", [rvar, k(mom)], [t["rv_m"]]),
              b.node("Mul", [t["v_flat"], k(v_scale)], [t["bv"]]),
              b.node("Add", [t["rv_m"], t["bv"]], [new_var])]
    b.prefix = "train"
    return nodes, {rmean: new_mean, rvar: new_var}


# Ops between a Softmax and the loss output that move or retype the probabilities without
# mixing classes: the logits go through the same ones (float Casts only).
_LAYOUT_OPS = ("Transpose", "Identity", "Cast")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16)


def _under_layout(nodes, output: str, op: str, rank: int, axis: int):
    """(the `op` node, the layout nodes after it in order, `axis` of `output` as an axis of
    that node's output) where `output` is that node's output directly or through Transposes,
    Identities and float Casts; None otherwise."""
    made = {o: n for n in nodes for o in n.output}
    chain, name, k = [], output, axis % rank if rank else 0
    while (n := made.get(name)) is not None and n.op_type != op:
        if n.op_type not in _LAYOUT_OPS or n.domain not in ("", "ai.onnx") or len(chain) > 8:
            return None
        a = attrs_of(n)
        if n.op_type == "Transpose":
            perm = list(a.get("perm", range(rank - 1, -1, -1)))
            if len(perm) != rank:
                return None
            k = int(perm[k])
        if n.op_type == "Cast" and a.get("to") not in _FLOAT_TYPES:
            return None
        chain.append(n)
        name = n.input[0]
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    return n, chain[::-1], k


# Ops that keep each row of the class axis a row (a tf2onnx TimeDistributed softmax: one
# Softmax per time step, Unsqueezed and Concatenated; a Softmax over [N*T, C] reshaped back):
# the logits go through copies of them too.
_ROW_OPS = _LAYOUT_OPS + ("Concat", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def softmax_logits(nodes, output: str, rank: int, class_axis: int, opset: int, dims=None,
                   shape_of=None):
    """([the Softmax nodes], [the nodes after them, in order]) where `output` is made of
    Softmax probabilities over `class_axis` (of `output`, rank `rank`) by ops that keep each
    row of that axis a row: Transposes, Identities, float Casts, Concats along another axis,
    and Reshapes, Flattens, Squeezes and Unsqueezes that keep the class axis's size and stride
    (known from `shape_of(name)`: a tuple of ints, None for unknown ones, or None); None
    otherwise. tf2onnx ends classifiers in Softmax then a Transpose back to its layout, and
    writes a TimeDistributed softmax as one Softmax per step, joined by a Concat. `dims`: the
    output's dimensions where known, which tell a Softmax below opset 13 over axes k to the
    last from one over the class axis k alone (squeezenet's [N, 1000, 1, 1])."""
    made = {o: n for n in nodes for o in n.output}
    leaves: list = []
    chain: list = []
    seen: dict[int, int] = {}  # id(node) -> the class axis it was reached with

    def walk(name: str, k: int, r: int, depth: int) -> bool:
        n = made.get(name)
        if n is None or n.domain not in ("", "ai.onnx") or depth > 64:
            return False
        if id(n) in seen:
            return seen[id(n)] == k
        a = attrs_of(n)
        if n.op_type == "Softmax":
            axis = a.get("axis", -1 if opset >= 13 else 1) % r
            ok = axis == k and (opset >= 13 or axis == r - 1
                                or (name == output and _ones_after(axis, [], dims)))
            if ok:
                seen[id(n)] = k
                leaves.append(n)
            return ok
        if n.op_type not in _ROW_OPS:
            return False
        if n.op_type == "Transpose":
            perm = list(a.get("perm", range(r - 1, -1, -1)))
            if len(perm) != r or not walk(n.input[0], int(perm[k]), r, depth + 1):
                return False
        elif n.op_type == "Cast" and a.get("to") not in _FLOAT_TYPES:
            return False
        elif n.op_type == "Concat":
            if a.get("axis", 0) % r == k or not all(walk(x, k, r, depth + 1) for x in n.input):
                return False
        elif n.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            shape_in = shape_of(n.input[0]) if shape_of is not None else None
            shape_out = shape_of(name) if shape_of is not None else None
            j = _same_row_axis(shape_in, shape_out, k)
            if j is None or not walk(n.input[0], j, len(shape_in), depth + 1):
                return False
        elif not walk(n.input[0], k, r, depth + 1):  # (Identity, a float Cast)
            return False
        seen[id(n)] = k
        chain.append(n)
        return True

    found = bool(rank) and walk(output, class_axis % rank, rank, 0)
    walk = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return (leaves, chain) if found else None


def _same_row_axis(shape_in, shape_out, k: int) -> int | None:
    """The axis of `shape_in` whose rows are those of axis k of `shape_out` under a reshape
    (the same size and stride: every dim after it known), or None."""
    if shape_in is None or shape_out is None or not 0 <= k < len(shape_out):
        return None
    size, after = shape_out[k], _known_product(shape_out[k + 1:])
    if size is None or after is None:
        return None
    for j, d in enumerate(shape_in):
        if d == size and _known_product(shape_in[j + 1:]) == after:
            return j
    return None


def _known_product(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int | np.integer) or d < 0:
            return None
        out *= int(d)
    return out


def _ones_after(axis: int, chain, dims) -> bool:
    """Whether the output's axes after `axis` are all known to be of size 1 (and the output
    is the Softmax's own: no layout ops between)."""
    return not chain and dims is not None and all(d == 1 for d in list(dims)[axis + 1:])


def sigmoid_logits(nodes, output: str, rank: int):
    """(the Sigmoid node, the layout nodes after it) where `output` is a Sigmoid's, directly
    or through Transposes, Identities and float Casts; None otherwise."""
    found = _under_layout(nodes, output, "Sigmoid", rank, 0)
    return None if found is None else found[:2]


def _softmax_over_another_axis(nodes, spec: LossSpec, shapes, rank: int, opset: int) -> None:
    """Cross entropy on a Softmax's probabilities over an axis that is not the class axis
    would take them as logits (a second softmax, training with vanishing gradients): refused,
    naming the axis to use."""
    for op in ("Softmax", "LogSoftmax"):  # (a LogSoftmax over the class axis: logits as good)
        found = _under_layout(nodes, spec.output, op, rank, spec.class_axis)
        if found is None:
            continue
        n, chain, k = found
        axis = attrs_of(n).get("axis", -1 if opset >= 13 else 1) % rank
        if axis != k or (opset < 13 and axis != rank - 1
                         and not _ones_after(axis, chain, shapes[spec.output][0])):
            _refuse_softmax_axis(spec, op, axis, chain, rank, opset)


def _refuse_softmax_axis(spec: LossSpec, op: str, axis: int, chain, rank: int, opset: int):
    where = f"'{spec.output}' is a {op}'s " + (
        "probabilities" if op == "Softmax" else "log-probabilities")
    if opset < 13 and axis != rank - 1:
        raise ModelError(f"loss cross_entropy: {where} over axes {axis} to {rank - 1} together "
                         f"({op} below opset 13 flattens them), not over a class axis: cross "
                         "entropy would read them as logits; export the model at opset 13 or "
                         "later, or train on the logits before the Softmax")
    raise ModelError(f"loss cross_entropy: {where} over axis {axis}"
                     + (" (before the Transposes after it)" if chain else "")
                     + f", but loss.class_axis is {spec.class_axis}: cross entropy would read "
                     "them as logits; set loss.class_axis to the output's axis of the classes"
                     + ("" if chain else f" ({axis})"))


def _logits_of_softmax(spec: LossSpec, nodes, shapes, opset: int, b: Builder):
    """Cross entropy (and ctc) over a model that ends in Softmax (probabilities, as many
    exported classifiers do) is computed from the Softmax's input: applying softmax twice
    would train with vanishing gradients. Where Transposes, Identities or float Casts follow
    the Softmax, the logits go through copies of them (laid out as the output). Returns (spec,
    those copies); the model's output itself is unchanged."""
    if spec.type not in ("cross_entropy", "ctc", "bce") or spec.output not in shapes:
        return spec, []
    rank = len(shapes[spec.output][0])
    if spec.from_logits:  # (bce with loss.logits: the output is the logits)
        if spec.type == "bce" and sigmoid_logits(nodes, spec.output, rank) is not None:
            raise ModelError(f"loss bce with logits: true, but '{spec.output}' is a Sigmoid's "
                             "output (probabilities): a second sigmoid would be applied; leave "
                             "logits out (bce on a Sigmoid's output trains on its logits)")
        return spec, []
    if spec.type == "bce":  # (binary cross entropy on a Sigmoid's output: on its logits)
        found = sigmoid_logits(nodes, spec.output, rank)
    else:
        class_axis = spec.class_axis if spec.type == "cross_entropy" else -1
        found = softmax_logits(nodes, spec.output, rank, class_axis, opset,
                               shapes[spec.output][0],
                               lambda x: shapes[x][0] if x in shapes else None) if rank else None
    if found is None and spec.type == "cross_entropy" and rank:
        _softmax_over_another_axis(nodes, spec, shapes, rank, opset)
        return _logits_of_binary(spec, nodes, shapes, rank, b)
    if found is None:
        return spec, []
    heads, chain = found if isinstance(found[0], list) else ([found[0]], found[1])
    if any(h.input[0] not in shapes for h in heads):
        return spec, []
    # each Softmax's (Sigmoid's) output stands for its input, the logits, in copies of the
    # nodes after it
    logits_of = {h.output[0]: h.input[0] for h in heads}
    copies = []
    for n in chain:
        out = b.tmp(f"logits_{n.op_type.lower()}")
        copies.append(helper.make_node(n.op_type, [logits_of.get(x, x) for x in n.input], [out],
                                       name=out, **attrs_of(n)))
        shapes[out] = shapes[n.output[0]]
        logits_of[n.output[0]] = out
    value = logits_of[spec.output]
    return dataclasses.replace(spec, output=value, from_logits=spec.type == "bce"), copies


def binary_probabilities(nodes, output: str, rank: int, class_axis: int, value_of):
    """The z of a binary classifier's probabilities written as Concat(1 - Sigmoid(z),
    Sigmoid(z)) over the class axis (skl2onnx's MLPClassifier), where `output` is so made
    (`value_of(name)`: a constant's values, or None); None otherwise."""
    made = {o: n for n in nodes for o in n.output}
    cat = made.get(output)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 \
            or attrs_of(cat).get("axis", 0) % rank != class_axis % rank:
        return None
    neg, pos = (made.get(x) for x in cat.input)
    if pos is None or neg is None or pos.op_type != "Sigmoid" or neg.op_type != "Sub" \
            or neg.input[1] != pos.output[0]:
        return None
    one = value_of(neg.input[0])
    if one is None or np.size(one) != 1 or float(np.asarray(one).reshape(())) != 1.0:
        return None
    return pos.input[0]


def _logits_of_binary(spec: LossSpec, nodes, shapes, rank: int, b: Builder):
    """Cross entropy over binary probabilities (binary_probabilities): the logits are
    Concat(0, z), whose softmax is exactly those probabilities, so the loss is the
    classifier's log loss (on the probabilities themselves it would be another loss).
    Returns (spec, the nodes that make the logits), or (spec, [])."""
    z = binary_probabilities(nodes, spec.output, rank, spec.class_axis, b.constants.get)
    if z is None or z not in shapes:
        return spec, []
    zero, logits = b.tmp("logits_zero"), b.tmp("logits_binary")
    axis = spec.class_axis % rank
    copies = [b.node("Sub", [z, z], [zero]), b.node("Concat", [zero, z], [logits], axis=axis)]
    shapes[zero] = shapes[z]
    shapes[logits] = shapes[spec.output]
    return dataclasses.replace(spec, output=logits), copies


def _append_loss(spec: LossSpec, b: Builder, shapes, scope: NameScope):
    """Loss nodes after the model; returns (nodes, loss name, target value_infos). The target
    input takes the configured name unless the graph already uses it (then a fresh one)."""
    out_shape, dt = shapes[spec.output]
    b.prefix = "loss"
    nodes: list[onnx.NodeProto] = []
    targets = []
    if spec.type == "output":
        if int(np.prod(out_shape)) != 1:
            raise ModelError(f"loss type 'output' needs a scalar output; '{spec.output}' has "
                             f"shape {list(out_shape)}")
        loss = scope.fresh("loss")
        nodes.append(b.reshape(spec.output, [], loss))
        return nodes, loss, targets
    if spec.target is None:
        raise ModelError(f"loss type '{spec.type}' needs a target name")
    loss = scope.fresh("loss")
    target = scope.fresh(spec.target)
    if spec.type == "ctc":
        return _ctc_loss(spec, b, out_shape, target, loss, nodes, targets)
    if spec.type == "bce":
        return _bce_loss(spec, b, out_shape, dt, target, loss, nodes, targets)
    if spec.type == "mse":
        targets.append(helper.make_tensor_value_info(target, elem_type(dt), list(out_shape)))
        d, sq = b.tmp("diff"), b.tmp("sq")
        nodes += [b.node("Sub", [spec.output, target], [d]),
                  b.node("Mul", [d, d], [sq]),
                  b.reduce("ReduceMean", sq, list(range(len(out_shape))), loss, keepdims=0)
                  if out_shape else b.node("Identity", [sq], [loss])]  # (a scalar output)
        return nodes, loss, targets
    rank = len(out_shape)
    if rank < 2:
        raise ModelError(f"cross_entropy needs logits of rank >= 2; '{spec.output}' has shape "
                         f"{list(out_shape)}")
    if not -rank <= spec.class_axis < rank:
        raise ModelError(f"loss.class_axis {spec.class_axis} does not exist: '{spec.output}' has "
                         f"shape {list(out_shape)}")
    axis = spec.class_axis % rank
    if axis == 0:
        raise ModelError(f"loss.class_axis {spec.class_axis} is axis 0 of '{spec.output}' "
                         f"(shape {list(out_shape)} for this batch), which the loss takes as "
                         "the batch axis (outputs put one row per sample first): set it to the "
                         "axis that holds the classes (the default, -1, is the last; 1 for a "
                         "segmentation model's [N, classes, H, W]); an output with the classes "
                         "first needs a Transpose at the model's end")
    label_shape = [d for i, d in enumerate(out_shape) if i != axis]
    targets.append(helper.make_tensor_value_info(target, onnx.TensorProto.INT64, label_shape))
    eps = float(spec.label_smoothing)
    if spec.weight is not None and len(spec.weight) != out_shape[axis]:
        raise ModelError(f"the class weights (loss.weight, grad --weight) have "
                         f"{len(spec.weight)} entries, one per class, but "
                         f"'{spec.output}' {list(out_shape)} has {out_shape[axis]} classes "
                         f"on axis {axis}")
    weights = None if spec.weight is None else np.array(spec.weight, dt)
    nll = b.tmp("nll") if eps else loss
    if b.opset < 13:
        more, logp, validf, weightf = _cross_entropy_decomposed(spec, b, out_shape, dt, axis,
                                                                target, nll, weights)
        nodes += more
    else:
        scores = spec.output
        if axis != 1:
            rest = [i for i in range(rank) if i != axis]  # (SoftmaxCrossEntropyLoss: [N, C,
            perm = [rest[0], axis] + rest[1:]  # ...])
            scores = b.tmp("scores")
            nodes.append(b.node("Transpose", [spec.output], [scores], perm=perm))
        logp = b.tmp("log_prob")
        nodes.append(b.node("SoftmaxCrossEntropyLoss", [scores, target] + (
            [] if weights is None else [b.const(weights)]), [nll, logp], reduction="mean",
            ignore_index=spec.ignore_index))
        validf = weightf = None
        if eps:
            ignored, valid, validf = b.tmp("ignored"), b.tmp("valid"), b.tmp("validf")
            nodes += [b.node("Equal", [target, b.const(np.array(spec.ignore_index, np.int64))],
                             [ignored]),
                      b.node("Not", [ignored], [valid]),
                      b.node("Cast", [valid], [validf], to=elem_type(dt))]
            if weights is not None:  # (each counted label's weight)
                safe, at, weighted = b.tmp("safe"), b.tmp("label_weight"), b.tmp("weightf")
                nodes += [b.node("Where", [valid, target, b.const(np.array(0, np.int64))],
                                 [safe]),
                          b.node("Gather", [b.const(weights), safe], [at], axis=0),
                          b.node("Mul", [at, validf], [weighted])]
            weightf = validf if weights is None else weighted
            if weights is not None:  # (the classes' weights on axis 1 of [N, C, d...])
                weights = weights.reshape((-1,) + (1,) * (rank - 2))
    if eps:
        nodes += _label_smoothing(b, eps, nll, logp, validf, weightf,
                                  1 if b.opset < 13 else rank - 1, dt, loss, weights)
    return nodes, loss, targets


def _label_smoothing(b: Builder, eps: float, nll: str, logp: str, validf: str, weightf: str,
                     rank: int, dt, loss: str, weights: np.ndarray | None = None
                     ) -> list[onnx.NodeProto]:
    """torch's label_smoothing: (1 - eps) nll + eps * the mean over the counted positions of
    -mean_c(log_prob) (the cross entropy with the uniform distribution); `logp` holds the
    classes on axis 1, `validf` (rank `rank`) is 1 where the label counts, `weightf` what the
    mean divides by (validf, or with class `weights` each counted label's weight: then each
    class's log-probability is weighted too, as torch computes it)."""
    t = {k: b.tmp(k) for k in ("class_mean", "masked", "total", "counted", "safe", "ratio",
                               "has", "none", "count", "uniform", "kept", "spread", "weighted",
                               "nll_safe", "positive")}
    nodes = []
    if weights is not None:
        nodes.append(b.node("Mul", [logp, b.const(weights)], [t["weighted"]]))
        logp = t["weighted"]
    one, tiny = b.const(np.array(1.0, dt)), b.const(np.array(np.finfo(dt).tiny, dt))
    nodes += [b.reduce("ReduceMean", logp, [1], t["class_mean"], keepdims=0),
              b.node("Mul", [t["class_mean"], validf], [t["masked"]]),
              b.reduce("ReduceSum", t["masked"], list(range(rank)), t["total"], keepdims=0),
              b.reduce("ReduceSum", weightf, list(range(rank)), t["counted"], keepdims=0),
              # the labels' weight, or 1 where it is 0 (labels of weight-0 classes alone, whose
              # smoothing term the trainer weights by the global batch's: torch's sum over its
              # labels; none counted: a total of 0), from ops of every opset
              b.node("Max", [t["counted"], tiny], [t["safe"]]),
              b.node("Div", [t["counted"], t["safe"]], [t["ratio"]]),
              b.node("Min", [t["ratio"], one], [t["has"]]),
              b.node("Sub", [one, t["has"]], [t["none"]]),
              b.node("Add", [t["counted"], t["none"]], [t["count"]]),
              b.node("Div", [t["total"], t["count"]], [t["uniform"]])]
    if b.opset >= 13:  # (SoftmaxCrossEntropyLoss's mean over no weight is 0 / 0: NaN)
        nodes += [b.node("Greater", [t["counted"], b.const(np.array(0.0, dt))],
                         [t["positive"]]),
                  b.node("Where", [t["positive"], nll, b.const(np.array(0.0, dt))],
                         [t["nll_safe"]])]
        nll = t["nll_safe"]
    return nodes + [
            b.node("Mul", [nll, b.const(np.array(1.0 - eps, dt))], [t["kept"]]),
            b.node("Mul", [t["uniform"], b.const(np.array(eps, dt))], [t["spread"]]),
            b.node("Sub", [t["kept"], t["spread"]], [loss])]


def _bce_loss(spec: LossSpec, b: Builder, out_shape, dt, target: str, loss: str, nodes: list,
              targets: list):
    """Binary cross entropy, the mean over every element, targets in [0, 1] of the output's
    shape: from the logits z of a model ending in Sigmoid, softplus(z) - t z (torch's
    binary_cross_entropy_with_logits); from probabilities p otherwise, -(t log p + (1 - t)
    log(1 - p)) with each log at least -100, and torch's gradient (p - t) / max(p (1 - p),
    1e-12): the ai.onnx_trainer BinaryCrossEntropy (torch's binary_cross_entropy)."""
    targets.append(helper.make_tensor_value_info(target, elem_type(dt), list(out_shape)))
    axes = list(range(len(out_shape)))
    per = b.tmp("bce")
    if spec.from_logits:
        sp, tz = b.tmp("softplus"), b.tmp("tz")
        nodes += [b.node("Softplus", [spec.output], [sp]),
                  b.node("Mul", [target, spec.output], [tz]),
                  b.node("Sub", [sp, tz], [per])]
    else:  # (one node: its gradient is torch's, finite where p is 0 or 1)
        from trainer.kernels import CUSTOM_DOMAIN

        nodes.append(b.node("BinaryCrossEntropy", [spec.output, target], [per],
                            domain=CUSTOM_DOMAIN))
    nodes.append(b.reduce("ReduceMean", per, axes, loss, keepdims=0) if axes
                 else b.node("Identity", [per], [loss]))
    return nodes, loss, targets


def _ctc_loss(spec: LossSpec, b: Builder, out_shape, target: str, loss: str, nodes: list,
              targets: list):
    """CTC over scores [N, T, classes] ([T, N, classes] with time_axis 0: transposed first;
    logits: a Softmax's input where the model ends in one) and labels [N, S]: log_softmax, the
    ai.onnx_trainer CTCLoss per sample (over its first `lengths` steps where loss.lengths
    names them), each divided by its label count, the mean over the batch (torch's ctc_loss,
    reduction mean)."""
    if len(out_shape) != 3:
        raise ModelError(f"the ctc loss needs scores [batch, time, classes] (or [time, batch, "
                         f"classes] with loss.time_axis 0); '{spec.output}' has shape "
                         f"{list(out_shape)}")
    scores = spec.output
    if spec.time_axis == 0:
        scores = b.tmp("batch_major")
        nodes.append(b.node("Transpose", [spec.output], [scores], perm=[1, 0, 2]))
        out_shape = (out_shape[1], out_shape[0], out_shape[2])
    if not 0 <= spec.blank < out_shape[2]:
        raise ModelError(f"loss.blank {spec.blank} is not a class of '{spec.output}' "
                         f"({out_shape[2]} classes)")
    from trainer.kernels import CUSTOM_DOMAIN

    targets.append(helper.make_tensor_value_info(target, onnx.TensorProto.INT64,
                                                 [out_shape[0], "ctc_labels"]))
    ins = [target]
    if spec.lengths:  # each sample's count of valid steps (padded sequences)
        if spec.lengths == spec.target:
            raise ModelError(f"loss.lengths '{spec.lengths}' is the labels' target; name the "
                             "target holding each sample's count of valid time steps")
        steps = b.scope.fresh(spec.lengths)
        targets.append(helper.make_tensor_value_info(steps, onnx.TensorProto.INT64,
                                                     [out_shape[0]]))
        ins.append(steps)
    logp, nll, count, per = b.tmp("log_probs"), b.tmp("nll"), b.tmp("count"), b.tmp("per")
    nodes += [b.node("LogSoftmax", [scores], [logp], axis=2),
              b.node("CTCLoss", [logp] + ins, [nll, count], domain=CUSTOM_DOMAIN,
                     blank=spec.blank),
              b.node("Div", [nll, count], [per]),
              b.reduce("ReduceMean", per, [0], loss, keepdims=0)]
    return nodes, loss, targets


def _cross_entropy_decomposed(spec: LossSpec, b: Builder, out_shape, dt, axis: int,
                              target: str, loss: str, weights: np.ndarray | None = None
                              ) -> tuple[list[onnx.NodeProto], str, str]:
    """Mean cross entropy from ops of opsets 7-12 (before SoftmaxCrossEntropyLoss):
    -sum(onehot(label) * log_softmax(scores)) / count(label != ignore_index), or with class
    `weights` each position's term and count weighted by its label's; returns (nodes, the
    log-probabilities [positions, classes], 1 where a position counts, each position's weight:
    0 where ignored)."""
    rank = len(out_shape)
    c = out_shape[axis]
    perm = [i for i in range(rank) if i != axis] + [axis]
    t = {k: b.tmp(k) for k in ("last", "flat", "logp", "lab", "ignored", "valid", "validi",
                               "safe", "lab2", "hit", "onehot", "picked", "rowsum", "validf",
                               "masked", "total", "counted", "count", "mean")}
    m = int(np.prod(out_shape)) // c
    nodes = [b.node("Transpose", [spec.output], [t["last"]], perm=perm),
             b.reshape(t["last"], [m, c], t["flat"]),
             b.node("LogSoftmax", [t["flat"]], [t["logp"]], axis=1),
             b.reshape(target, [m], t["lab"]),
             b.node("Equal", [t["lab"], b.const(np.array(spec.ignore_index, np.int64))],
                    [t["ignored"]]),
             b.node("Not", [t["ignored"]], [t["valid"]]),
             b.node("Cast", [t["valid"]], [t["validi"]], to=onnx.TensorProto.INT64),
             b.node("Mul", [t["lab"], t["validi"]], [t["safe"]]),  # ignored labels -> class 0
             b.reshape(t["safe"], [m, 1], t["lab2"]),
             b.node("Equal", [t["lab2"], b.const(np.arange(c, dtype=np.int64).reshape(1, c))],
                    [t["hit"]]),
             b.node("Cast", [t["hit"]], [t["onehot"]], to=elem_type(dt)),
             b.node("Mul", [t["logp"], t["onehot"]], [t["picked"]]),
             b.reduce("ReduceSum", t["picked"], [1], t["rowsum"], keepdims=0),
             b.node("Cast", [t["valid"]], [t["validf"]], to=elem_type(dt))]
    weightf = t["validf"]
    if weights is not None:  # (the label's weight, from its one-hot row)
        at, row, weightf = b.tmp("hit_weight"), b.tmp("label_weight"), b.tmp("weightf")
        nodes += [b.node("Mul", [t["onehot"], b.const(weights.reshape(1, c))], [at]),
                  b.reduce("ReduceSum", at, [1], row, keepdims=0),
                  b.node("Mul", [row, t["validf"]], [weightf])]
    nodes += [b.node("Mul", [t["rowsum"], weightf], [t["masked"]]),
              b.reduce("ReduceSum", t["masked"], [0], t["total"], keepdims=0),
              b.reduce("ReduceSum", weightf, [0], t["counted"], keepdims=0),
              # (no label counted, as a micro-batch of a BatchNorm model that runs for its
              # statistics: 0, not 0 / 0, whose NaN reached the gradients through the seed)
              b.node("Max", [t["counted"], b.const(np.array(np.finfo(dt).tiny, dt))],
                     [t["count"]]),
              b.node("Div", [t["total"], t["count"]], [t["mean"]]),
              b.node("Neg", [t["mean"]], [loss])]
    return nodes, t["logp"], t["validf"], weightf
