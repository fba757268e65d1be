"""What `onnx-trainer check MODEL` reports: every node with its forward and gradient support, and
every float initializer with whether it is trained by default (and why not); for a config, the
pre-flight report printed before training: parameters, memory per process, data, steps, problems.

Nothing is executed: value types come from ONNX shape inference, so a report on a large model
takes the time of a graph walk.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from trainer.autodiff.engine import active_nodes
from trainer.autodiff.lookups import lookups_line, tie_folded_lookups
from trainer.autodiff.params import (
    PACK_SEPARATOR,
    PARAMETER,
    UNUSED,
    ParamInfo,
    detached_inputs,
    folded_conv_weights,
    folded_expressions,
    folded_parameters,
    fused_batchnorms,
    parameter_table,
    repair_exported_model,
    shared_constants,
    signature_entries,
    single_bias_masks,
    stop_detached,
    tie_folded_copies,
    tool_folded_constants,
    tool_fused_batchnorms,
)
from trainer.autodiff.registry import NO_GRADIENT, _load_all
from trainer.autodiff.subgraph import inline_static_ifs, reads
from trainer.contrib import contrib_key, has_contrib, lower_contrib
from trainer.errors import DataError, ModelError, listing, printable
from trainer.graph import (
    FLOAT_TYPES,
    constant_batch_hint,
    data_sizing_nodes,
    from_shapes,
    inferred_dims,
    lift_weights,
    needs_recurrent_opset,
    node_name,
    np_dtype,
    opset_of,
    recurrent_opset,
    subgraph_weights,
    subgraph_weights_line,
)
from trainer.kernels import get_kernel
from trainer.unfuse import unfuse_conv_batchnorms, unfuse_line


@dataclass
class NodeRow:
    name: str
    op: str
    forward: bool
    gradient: str  # "rule" | "not differentiable" | "not needed" | "MISSING" | "REFUSED: ..."
    inner: bool = False  # a node of a branch or loop body (listed only where unsupported)

    @property
    def ok(self) -> bool:
        return self.forward and self.gradient != "MISSING" and not self.gradient.startswith(
            "REFUSED")


# a Loop whose trip count or first condition the data computes: its gradient unrolls the
# loop when the training graph is built (trainer.autodiff.rules.control), which train refuses
DATA_LOOP = "REFUSED: trip count or condition from the data (make it a constant or a shape)"
RECURRENT_OLD = ("REFUSED: the rule needs opset 10, and onnx.version_converter cannot convert "
                 "this model to 11 (export it at opset 10 or later)")
PER_ACTIVATION = ("REFUSED: spatial=0 (statistics per activation, opsets 1-8) has no gradient "
                  "rule (export the model at opset 9 or later)")
TYPES_DISAGREE = "REFUSED: input types disagree"  # (then what: type_conflict)
LEGACY_AXIS = ("REFUSED: opset 1-6 broadcast along a middle axis (`axis`) of a product, "
               "which its gradient does not support (convert the model with "
               "onnx.version_converter)")


@dataclass
class Report:
    opset: int
    nodes: list[NodeRow]
    params: list[ParamInfo]
    untied: list[str]
    tied: dict[str, tuple[str, str]]  # {copy: (source, kind)}: params.tie_folded_copies
    folded: list[str] = field(default_factory=list)  # folded_parameters
    fused: list[str] = field(default_factory=list)  # BatchNorm layers folded (exporter_findings)
    computed: list[str] = field(default_factory=list)  # convolutions with a folded weight
    renorms: list[str] = field(default_factory=list)  # nn.Embedding(max_norm) modules
    hints: list[str] = field(default_factory=list)  # exporter_hints: whole warning lines
    imports: str = ""  # the other domains' opsets, where the model imports no ai.onnx one
    single_bias: list[str] = field(default_factory=list)  # params.single_bias_masks
    shared: list[str] = field(default_factory=list)  # params.shared_constants
    tool_constants: list[str] = field(default_factory=list)  # params.tool_folded_constants
    detached: list[str] = field(default_factory=list)  # values read through .detach()
    lookups: list[str] = field(default_factory=list)  # lookups.lookups_line, where any
    fused_error: str = ""  # onnxruntime fused nodes of forms trainer.contrib does not lower
    unfused: list[str] = field(default_factory=list)  # unfuse.unfuse_conv_batchnorms
    inner: list[str] = field(default_factory=list)  # graph.subgraph_weights: kept constant

    @property
    def node_count(self) -> int:
        """The main graph's nodes (the rows of subgraph nodes left out)."""
        return sum(not r.inner for r in self.nodes)

    @property
    def opset_text(self) -> str:
        return f"opset {self.opset}" if self.opset else f"no ai.onnx opset ({self.imports})"

    @property
    def ok(self) -> bool:
        return (all(r.ok for r in self.nodes) and any(p.role == PARAMETER for p in self.params)
                and not self.fused_error)

    def text(self) -> str:
        width = max([len(r.name) for r in self.nodes] + [4])
        lines = [f"{'node':<{width}}  {'op':<26} forward  gradient"]
        lines += [f"{r.name:<{width}}  {r.op:<26} {'yes' if r.forward else 'MISSING':<8} "
                  f"{r.gradient}" for r in self.nodes]
        bad = sum(not r.ok for r in self.nodes)
        trained = [p for p in self.params if p.role == PARAMETER]
        count = sum(int(np.prod(p.shape)) if p.shape else 1 for p in trained)
        lines.append("")
        lines.append(f"parameters trained by default: {len(trained)} tensors, {count} values"
                     + (": " + ", ".join(p.name for p in trained[:8])
                        + (f" ... ({len(trained)} in all)" if len(trained) > 8 else "")
                        if trained else ""))
        held = [p for p in trained if p.alias and PACK_SEPARATOR not in p.alias]
        if held:
            lines.append("tensors the exporter folded from one PyTorch parameter, trained as it "
                         "(a 'trainable'/'frozen'/'optimizer.groups' glob may name either): "
                         + ", ".join(f"{p.name} = {p.alias}" for p in held[:8])
                         + (f" ... ({len(held)} in all)" if len(held) > 8 else ""))
        packed = [p for p in trained if p.alias and PACK_SEPARATOR in p.alias]
        if packed:
            lines.append("tensors that pack several PyTorch parameters (a recurrent layer's "
                         "weights and biases), each trained as one tensor (a glob naming any "
                         "of the parameters names it): "
                         + "; ".join(f"{p.name} = [{p.alias}]" for p in packed[:8])
                         + (f" ... ({len(packed)} in all)" if len(packed) > 8 else ""))
        left = [p for p in self.params if p.role != PARAMETER]
        if left:
            lines.append(f"float initializers left out ({len(left)}; 'trainable'/'frozen' in "
                         "the config override):")
            w = max(len(p.name) for p in left)
            lines += [f"  {p.name:<{w}}  {list(p.shape)}  {p.reason}" for p in left]
        if self.inner:
            lines.append(subgraph_weights_line(self.inner))
        for copy_name, (src, kind) in self.tied.items():
            lines.append(tied_line(copy_name, src, kind))
        lines += self.lookups
        if self.untied:
            lines.append(f"parameters the exporter had merged into another tensor or dropped, "
                         f"restored and trained separately: {', '.join(self.untied)}")
        if self.single_bias:
            lines.append(single_bias_line(self.single_bias))
        if self.detached:
            lines.append(detached_line(self.detached))
        if self.unfused:
            lines.append(unfuse_line(self.unfused))
        lines += warning_lines(self.folded, self.fused, self.computed, self.renorms,
                               self.hints)
        if self.shared:
            lines.append(shared_line(self.shared))
        if self.tool_constants:
            lines.append(tool_constants_line(self.tool_constants))
        if self.fused_error:
            lines.append(self.fused_error)
            bad += self.fused_error.count(" node '")
        verdict = "all trainable" if not bad else f"{bad} node(s) cannot be trained"
        if not trained:
            verdict += "; no parameter reaches an output"
        lines.append(f"{self.node_count} nodes, {self.opset_text}: {verdict}")
        return "\n".join(printable(line) for line in lines)  # (names from the file)


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape unknown, dtype) of every value ONNX shape inference types; others are absent."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types count as float
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if vi.type.WhichOneof("value") == "tensor_type" and t.elem_type:
            out[vi.name] = ((), np_dtype(t.elem_type))
    for t in g.initializer:
        out[t.name] = ((), np_dtype(t.data_type))
    return out


class _FloatDefault(dict):
    """Types for active_nodes: a value of unknown type is taken as float (conservative)."""

    def __contains__(self, key) -> bool:
        return True

    def __missing__(self, key):
        return ((), np.dtype(np.float32))


FUSED_HINT = ("BatchNormalization layers that the exporter folded into the convolution or "
              "linear layer (Gemm) before them (an eval-mode export does; the default "
              "exporter's optimizer does in any mode; "
              "so do onnxruntime's optimizers, onnxsim and onnxslim run on an export) "
              "train as part of it, without batch statistics, unlike PyTorch's .train(); to "
              "train them, export with optimize=False (default exporter) or with dynamo=False, "
              "training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, and train "
              "that file before simplifying or optimizing it")

KERAS_FUSED_HINT = ("BatchNormalization layers that tf2onnx wrote in inference form (folded "
                    "into the convolution before them, or as the Mul and Add of their running "
                    "statistics; it writes no training form) train as a fixed affine layer, "
                    "without batch statistics, unlike Keras's training; their losses differ "
                    "from Keras's")


def exporter_findings(model: onnx.ModelProto
                      ) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """(PyTorch parameters the exporter folded away; BatchNormalization layers it folded into a
    convolution: module names, or for a TorchScript export "the one after" each convolution
    that got them; TorchScript convolutions whose weight constant folding computed from an
    expression of parameters; nn.Embedding(max_norm) modules, whose in-place renormalization
    the export writes as graph ops; whole warning lines of exporter_hints), for the warnings
    of `check` and `train`."""
    bn, computed = folded_conv_weights(model)
    return (folded_parameters(model),
            fused_batchnorms(model) or [f"the one after {name}" for name in bn]
            or tool_fused_batchnorms(model), computed, embedding_renorms(model),
            exporter_hints(model))


def _biasless_keras_layers(model: onnx.ModelProto) -> list[str]:
    """Convolutions and weight products of a tf2onnx export without a bias: a Conv or
    ConvTranspose without its third input, a MatMul of a weight initializer whose output no
    Add of a float initializer reads (tf2onnx's Dense: MatMul, then the BiasAdd as an Add)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    found = []
    for i, n in enumerate(model.graph.node):
        if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and \
                n.input[1] in inits and (len(n.input) < 3 or not n.input[2]):
            found.append(node_name(n, i))
        elif n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and \
                inits[n.input[1]].data_type in FLOAT_TYPES and not any(
                    r.op_type == "Add" and any(x in inits for x in r.input if x != n.output[0])
                    for r in readers.get(n.output[0], [])):
            found.append(node_name(n, i))
    return found


def exporter_hints(model: onnx.ModelProto) -> list[str]:
    """Warnings of what an export cannot say: BatchNormalization layers with momentum 1.0 or
    0.0 (PyTorch's momentum=None, a cumulative average, exports so), InstanceNorm with running
    statistics (a BatchNormalization reading them through Tile), and the default
    exporter's constants (val_<n>) in a model that lost its records of which tensors are
    PyTorch parameters (an export at an opset below 18, converted down): tensors of one
    repeated value, the ones and zeros that stand in for a normalization's missing affine
    weights (a val_<n> of varied values is a folded expression, a weight's transpose)."""
    lines = []
    # (running statistics stored in the model, or copies of stored tensors: a fresh module's
    # zeros and ones are one tensor with its bias and scale for TorchScript; not statistics
    # computed from the data, as tf2onnx's LayerNormalization)
    made = {o: n.op_type for n in model.graph.node for o in n.output}
    fixed = []
    for i, n in enumerate(model.graph.node):
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and \
                len(n.input) > 4 and made.get(n.input[3], "Identity") == "Identity":
            momentum = next((a.f for a in n.attribute if a.name == "momentum"), 0.9)
            if momentum in (0.0, 1.0):
                fixed.append(f"{node_name(n, i)} ({momentum:g})")
    if fixed:
        lines.append(f"WARNING: {MOMENTUM_HINT}: {listing(fixed)}")
    if model.producer_name in ("tf2onnx", "keras2onnx"):
        unset = [node_name(n, i) for i, n in enumerate(model.graph.node)
                 if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
                 and len(n.input) > 4 and made.get(n.input[3], "Identity") == "Identity"
                 and not any(a.name == "momentum" for a in n.attribute)]
        if unset:
            lines.append(f"WARNING: {KERAS_MOMENTUM_HINT}: {listing(unset)}")
        biasless = _biasless_keras_layers(model)
        if biasless:
            lines.append(f"WARNING: {KERAS_BIAS_HINT}: {listing(biasless)}")
    expressions = folded_expressions(model)
    if expressions:
        lines.append(f"WARNING: {EXPRESSION_HINT}: {listing(expressions)}")
    tiled = [node_name(n, i) for i, n in enumerate(model.graph.node)
             if n.op_type == "BatchNormalization" and len(n.input) > 4
             and made.get(n.input[3]) == "Tile"]
    if tiled:
        lines.append(f"WARNING: {TILED_HINT}: {listing(tiled)}")
    corners = fractional_corner_resizes(model)
    if corners:
        lines.append(f"WARNING: {CORNERS_HINT}: {listing(corners)}")
    dropouts = _dropouts_in_data_branches(model)
    if dropouts:
        lines.append(f"WARNING: {BRANCH_DROPOUT_HINT}: {listing(dropouts)}")
    from trainer.convert import constant_weights, fixed_constant_weights
    made = constant_weights(model)
    if made:
        lines.append(f"WARNING: {CONSTANT_WEIGHTS_HINT}: {listing(made)}")
    fixed = fixed_constant_weights(model)
    if fixed:
        lines.append(f"WARNING: {FIXED_CONSTANTS_HINT}: {listing(fixed)}")
    if model.producer_name == "pytorch" and not signature_entries(model):
        from onnx import numpy_helper

        from trainer.memory import is_stub

        consts = []  # (a val_<n> of varied values is a folded expression of parameters,
        for t in model.graph.initializer:  # a weight's transpose: that one trains as it should)
            if re.fullmatch(r"val_\d+", t.name) and t.data_type in FLOAT_TYPES and \
                    math.prod(t.dims) > 1 and not is_stub(t):
                a = numpy_helper.to_array(t)
                if (a == a.flat[0]).all():
                    consts.append(t.name)
        if consts:
            lines.append(f"WARNING: {UNRECORDED_HINT}: {listing(consts)}")
        # (TorchScript names the tensors it folds onnx::<op>_<n>: a one-element initializer
        # of a module path's name is a PyTorch parameter or buffer, which the one-element rule
        # leaves out unless it is a weight or bias)
        scalars = [t.name for t in model.graph.initializer
                   if t.data_type in FLOAT_TYPES and math.prod(t.dims) == 1
                   and re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", t.name)
                   and not re.fullmatch(r"val_\d+", t.name)  # (the default exporter's
                   and not re.search(r"(^|\.)(weight|bias)$", t.name)]  # constants)
        if scalars:
            lines.append(f"WARNING: {SCALAR_HINT}: {listing(scalars)}")
        # (what else TorchScript's folding computed from the module's tensors: a Linear's
        # transposed weight (onnx::MatMul_<n>) trains as that weight, a Conv's with a folded
        # BatchNorm is said above, a MultiheadAttention's in_proj_bias slices train as it;
        # the rest may be buffers: FrozenBatchNorm2d's scale, shift)
        from trainer.autodiff.params import torchscript_folded_weights
        held = torchscript_folded_weights(model)
        folded = [t.name for t in model.graph.initializer
                  if t.data_type in FLOAT_TYPES and math.prod(t.dims) > 1 and t.name not in held
                  and re.fullmatch(r"onnx::(?!MatMul_|Conv_|Gemm_)\w+_\d+", t.name)]
        if folded:
            lines.append(f"WARNING: {TORCHSCRIPT_FOLDED_HINT}: {listing(folded)}")
    return lines




def fractional_corner_resizes(model: onnx.ModelProto) -> list[str]:
    """Resize nodes with coordinate_transformation_mode align_corners whose constant `scales`
    (no `sizes`) hold a value that is not a whole number."""
    from onnx import numpy_helper

    from trainer.convert import _fold_integers

    inits = {t.name: t for t in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output if o}

    def value(name: str, depth: int = 0) -> np.ndarray | None:
        """A constant value: an initializer, a Constant (any of its value attributes), or
        Identity/Cast/Concat/Reshape/Unsqueeze/Squeeze of such (a default export at
        optimize=False, TorchScript without constant folding); None otherwise."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = made.get(name)
        if n is None or depth > 16:
            return None
        if n.op_type == "Constant":
            a = next(iter(n.attribute), None)
            if a is None or a.name in ("sparse_value",):
                return None
            v = onnx.helper.get_attribute_value(a)
            return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else \
                np.asarray(v)
        if n.op_type not in ("Identity", "Cast", "Concat", "Reshape", "Unsqueeze", "Squeeze"):
            return None
        ins = [value(x, depth + 1) for x in n.input if x]
        if any(v is None for v in ins):
            return None
        if n.op_type == "Cast":
            return ins[0].astype(np.float64)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        try:
            return _fold_integers(n.op_type, attrs, ins)
        except (ValueError, IndexError):
            return None

    out = []
    for i, n in enumerate(model.graph.node):
        mode = next((a.s for a in n.attribute if a.name == "coordinate_transformation_mode"), b"")
        if n.op_type != "Resize" or mode != b"align_corners" or len(n.input) < 3 or \
                len(n.input) > 3 and n.input[3]:
            continue
        scales = value(n.input[2])
        if scales is None or scales.dtype.kind not in "fiu":
            continue
        scales = scales.astype(np.float64)
        if scales.size and (scales != np.floor(scales)).any():
            out.append(node_name(n, i))
    value = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return out


CONSTANT_WEIGHTS_HINT = ("weights that the graph builds with ConstantOfShape (one repeated value: "
                         "an untrained model's placeholder) are constants and do not train; "
                         "`onnx-trainer convert MODEL -o OUT --trainable-constants` makes them "
                         "initializers, freshly initialized for their slot")
FIXED_CONSTANTS_HINT = ("weights that the model stores as Constant nodes, beside its "
                        "initializers, are constants and do not train (as a buffer in "
                        "PyTorch); where they are parameters, `onnx-trainer convert MODEL -o OUT "
                        "--trainable-constants` makes them initializers, their values kept")
BRANCH_DROPOUT_HINT = ("Dropout nodes inside If branches that the data picks run as in "
                       "inference there (nothing dropped out), where PyTorch's train mode drops "
                       "out")


def _dropouts_in_data_branches(model: onnx.ModelProto) -> list[str]:
    """Dropout nodes (ratio not 0) inside the branches of an If whose condition is computed
    (not an initializer or a Constant node's: those branches are inlined and train as the
    main graph's nodes), at any depth."""
    fixed = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found = []

    def walk(nodes, inside: bool):
        for i, n in enumerate(nodes):
            if inside and n.op_type == "Dropout" and n.domain in ("", "ai.onnx"):
                ratio = next((a.f for a in n.attribute if a.name == "ratio"), 0.5)
                if ratio != 0.0:
                    found.append(node_name(n, i))
            for a in n.attribute:
                graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for g in graphs:
                    walk(g.node, inside or (n.op_type == "If" and n.input[0] not in fixed))
    walk(model.graph.node, False)
    walk = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return found


CORNERS_HINT = ("Resize nodes with coordinate_transformation_mode align_corners and scales "
                "that are not whole numbers: where scale x length is fractional, ONNX maps the "
                "corners over that fractional length (the spec and onnx.reference, which the "
                "engine follows), while PyTorch's F.interpolate(scale_factor=..., "
                "align_corners=True) and onnxruntime use the whole output length, so the "
                "values differ from theirs (export with size=... instead of scale_factor to "
                "get PyTorch's)")


SCALAR_HINT = ("one-element tensors named as PyTorch parameters or buffers are left out as "
               "constants of the graph (an epsilon or a fixed scale, by default): if they are "
               "parameters, such as a ReZero gate or a learned temperature, list them in "
               "'trainable' (with the other parameters, e.g. trainable: ['*'])")


TORCHSCRIPT_FOLDED_HINT = (
    "tensors that TorchScript's constant folding computed from the module's tensors "
    "(onnx::<op>_<n>) train as parameters: they may hold buffers that PyTorch never trains "
    "(FrozenBatchNorm2d's scale and shift) or parameters in another form; export with "
    "do_constant_folding=False to train exactly PyTorch's parameters, or list them in "
    "'frozen'")


MOMENTUM_HINT = ("BatchNormalization layers whose momentum is 1.0 keep their running statistics "
                 "unchanged in training, and with 0.0 replace them by each batch's: PyTorch's "
                 "BatchNorm(momentum=None), a cumulative average over num_batches_tracked that "
                 "ONNX cannot express, exports so; the engine applies the exported momentum at "
                 "every step (set the module's momentum, e.g. 0.1, before exporting, unless "
                 "that value was meant)")
KERAS_MOMENTUM_HINT = ("BatchNormalization layers that tf2onnx wrote without their momentum "
                       "(it writes none): their running statistics move with ONNX's default "
                       "0.9, where Keras's default is 0.99 (ten times slower); losses are "
                       "unaffected, the trained model's inference outputs are not: set the "
                       "node's momentum attribute to the layer's before training "
                       "(onnx.helper.make_attribute('momentum', 0.99))")
KERAS_BIAS_HINT = ("layers of a tf2onnx export without a bias: tf2onnx drops a bias whose values "
                   "are all zero (a fresh Keras layer's), and the engine cannot tell it from "
                   "use_bias=False, so such a layer trains without the bias Keras trains (the "
                   "losses drift from Keras's); export a model whose biases are not all zero "
                   "(trained a step, or given a tiny value), unless these layers have none")
TILED_HINT = ("InstanceNorm layers with track_running_stats=True export as one "
              "BatchNormalization over every sample's channels, reading running statistics "
              "tiled per sample; PyTorch trains such a layer on each instance's own statistics "
              "and updates the running ones, which the export cannot say: the engine "
              "normalizes by the running statistics from the first step on and never updates "
              "them, and its scale and bias do not train (export with "
              "track_running_stats=False, PyTorch's default, to train it as PyTorch does)")
UNRECORDED_HINT = ("these initializers of one repeated value, named val_<n>, look like the "
                   "default exporter's constants (the ones and zeros that stand in for a "
                   "normalization's missing affine weights), and this model lost the exporter's "
                   "records of which tensors are PyTorch parameters (an export at an opset below "
                   "18 is converted down, without them), so they train as parameters: export "
                   "with opset_version=18 or later, or list them in 'frozen'")


def embedding_renorms(model: onnx.ModelProto) -> list[str]:
    """Modules whose nodes the default exporter records as aten.embedding_renorm (nn.Embedding
    with max_norm)."""
    found = []
    for n in model.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        if "aten.embedding_renorm" in meta.get("pkg.torch.onnx.fx_node", ""):
            scopes = re.findall(r"'([^']*)'", meta.get("pkg.torch.onnx.name_scopes", ""))
            found.append(".".join(x for x in scopes[:-1] if x) or n.name)
    return list(dict.fromkeys(found))


RENORM_HINT = ("nn.Embedding(max_norm=...) renormalizes the rows it looks up in place, outside "
               "autograd; the export computes that as graph ops, which training goes through "
               "as a differentiable function while the stored rows stay as they are: losses "
               "leave PyTorch's (README, 'Exporting a model from PyTorch')")


def warning_lines(folded: list[str], fused: list[str], computed: list[str],
                  renorms: list[str] = (), hints: list[str] = ()) -> list[str]:
    """What `check` and `train` print of exporter_findings."""
    names = listing

    lines = list(hints)
    if renorms:
        lines.append(f"WARNING: {RENORM_HINT}: {names(renorms)}")
    if folded:
        lines.append(f"WARNING: {FOLDED_HINT}: {names(folded)}")
    keras = [f for f in fused if f.endswith(" (tf2onnx)")]
    fused = [f for f in fused if f not in keras]
    if fused:
        lines.append(f"WARNING: {FUSED_HINT}: {names(fused)}")
    if keras:
        lines.append(f"WARNING: {KERAS_FUSED_HINT}: {names(keras)}")
    if computed:
        lines.append(f"WARNING: {COMPUTED_HINT}: {names(computed)}")
    return lines


EXPRESSION_HINT = ("tensors that the exporter's optimizer folded from an expression of PyTorch "
                   "parameters the graph also reads (s.exp() next to s, lo + 0.8 next to lo) "
                   "train as tensors of their own, apart from those parameters, unlike in "
                   "PyTorch; export with optimize=False to train the expression")


COMPUTED_HINT = ("convolutions and linear layers (Gemm) whose weight the TorchScript exporter's "
                 "constant folding computed "
                 "from PyTorch parameters (a parametrization such as weight_norm's g * v / |v|) "
                 "train that weight as one tensor, not the parameters; export with "
                 "do_constant_folding=False to train them")


FOLDED_HINT = ("PyTorch parameters that the exporter's optimizer removed (constant folding made "
               "an expression of the parameter, e.g. w.exp() or a lookup table[index] by a "
               "buffer, a constant, or two equal computations of a fresh model were merged into "
               "one, or a product by a fresh parameter of ones or a sum with one of zeros was "
               "removed as doing nothing) do not train as in PyTorch (a folded expression "
               "trains as a tensor of its own, entries PyTorch shares apart); export with "
               "optimize=False to train them "
               "(a parameter that the exported computation does not use, such as a mask token "
               "read only with an optional input, is listed too and needs nothing)")
_TIED = {"transpose": "is the exact transpose of (tied weights stored twice by the exporter)",
         "reshape": "is a copy in another shape (a view the exporter folded) of",
         "copy": "is a second copy (one parameter used twice, folded once per use) of",
         "expand": "is a folded expression equal to the broadcast (an RNN's first step from a "
                   "zero state) of"}


def tool_constants_line(found: list[str]) -> str:
    """The warning for params.tool_folded_constants."""
    return ("WARNING: float constants that onnxsim computed from the graph do not train; one "
            "computed from a parameter (an embedding's rows looked up by fixed positions) "
            "leaves that parameter fixed, where PyTorch trains it: train the export before "
            "simplifying it: " + listing(found))


def shared_line(found: list[str]) -> str:
    """The warning for params.shared_constants."""
    return ("WARNING: tensors of equal values that several nodes read train as one tensor: a "
            "fresh model's equal parameters (LayerNorm ones, zero biases, a Keras LSTM's "
            "initial bias) that the exporter (tf2onnx too) or a later tool (onnxsim, "
            "onnxoptimizer, onnxruntime's optimizers) stored once, where the framework "
            "trains one per layer; export a trained or perturbed checkpoint, or train "
            "the exporter's own output (its records let each get its own tensor back): "
            + listing(found))


def single_bias_line(names: list[str]) -> str:
    """What `check` and `train` say of the recurrent biases params.single_bias_masks masks."""
    return ("recurrent biases that hold Keras's one bias per gate and zeros (tf2onnx's B = "
            "[input bias, recurrent bias]): the zero half stays zero, as Keras trains one "
            f"bias: {', '.join(names)}")


def detached_line(names: list[str]) -> str:
    """What `check` and `train` say of the values params.stop_detached cuts from the gradient."""
    return ("values that PyTorch's .detach() cut from the gradient (the export's records): no "
            f"gradient flows back through them: {listing(names, 6)}")


def tied_line(copy_name: str, src: str, kind: str) -> str:
    """What `check` and `train` say of a copy tie_folded_copies tied to its source."""
    return f"'{copy_name}' {_TIED[kind.split(':')[0]]} '{src}': trained as one tensor"


def model_report(model: onnx.ModelProto) -> Report:
    """The report for a model whose loss may read any of its outputs."""
    from trainer.memory import is_stub

    _load_all()
    lift_weights(model)  # (weights in subgraphs or Constant nodes: initializers)
    try:
        untied = repair_exported_model(model)
    except Exception:  # noqa: BLE001 - a shared tensor left unread (load_structure): kept shared
        untied = []
    folded = exporter_findings(model)  # (before the ties: which parameters are missing)
    found = tie_folded_lookups(model)
    lookups = [lookups_line(found)] if found else []
    # Finding tied copies compares values; a model whose large tensors were left unread skips it.
    tied = {} if any(is_stub(t) for t in model.graph.initializer) else \
        tie_folded_copies(model)
    run, fused_error = model, ""  # (onnxruntime's fused nodes: as the standard ops they are)
    lowered: set[str] = set()  # (the initializers their lowering added)
    if has_contrib(model):
        try:
            run = lower_contrib(model)
            lowered = {t.name for t in run.graph.initializer} - {
                t.name for t in model.graph.initializer}
        except ModelError as exc:
            fused_error = str(exc)
    run, unfused = unfuse_conv_batchnorms(run)  # (onnxoptimizer's arithmetic: BatchNorms)
    branched = run  # (training takes a static If's branch: the other's weights are fixed)
    try:
        run = inline_static_ifs(run)
    except Exception:  # noqa: BLE001 - a branch the lowering cannot take: the If stays
        run = branched
    if detached_inputs(run):  # (PyTorch's .detach(): what it cuts off does not train)
        run = copy.deepcopy(run) if run is model else run
        stop_detached(run)
    nodes = list(run.graph.node)
    known_types = _value_types(run)
    types = _FloatDefault(known_types)
    outputs = [o.name for o in model.graph.output]
    params = parameter_table(run, nodes, outputs, types)
    if lowered:  # (a lowered contrib op's own constants are none of the model's)
        params = [p for p in params if p.name not in lowered]
    if run is not branched:
        params = _untaken_branches(params, branched, nodes)
    trained = {p.name for p in params if p.role == PARAMETER}
    active = {o for i in active_nodes(nodes, outputs, trained, types)[0] for o in nodes[i].output}
    rows = []
    ranks: dict[str, int] = {}  # (opsets 1-6: of the values a legacy broadcast reads)
    inits = {t.name for t in model.graph.initializer} - trained  # (what training changes is
    known = inits | from_shapes(((n.op_type, n.domain, list(n.input), list(n.output))  # data)
                                 for n in model.graph.node), inits.__contains__)
    # (an RNN/GRU/LSTM below opset 10 trains on the model converted to opset 11: where
    # onnx.version_converter cannot, its rule refuses the node, as the gradient says here)
    unconverted = needs_recurrent_opset(model) and recurrent_opset(model) is model
    for i, node in enumerate(model.graph.node):
        if unconverted and node.op_type in ("RNN", "GRU", "LSTM") and node.domain in (
                "", "ai.onnx") and any(o in active for o in node.output):
            rows.append(NodeRow(node_name(node, i), node.op_type, True, RECURRENT_OLD))
            continue
        if node.op_type == "Loop" and node.domain in ("", "ai.onnx") and any(
                o in active for o in node.output) and _loop_from_data(node, known):
            rows.append(NodeRow(node_name(node, i), node.op_type, True, DATA_LOOP))
            continue
        if node.op_type == "BatchNormalization" and opset_of(model) < 9 and any(
                a.name == "spatial" and a.i == 0 for a in node.attribute) and any(
                o in active for o in node.output):
            rows.append(NodeRow(node_name(node, i), node.op_type, True, PER_ACTIVATION))
            continue
        if node.op_type in ("Mul", "Div", "Pow") and node.domain in ("", "ai.onnx") \
                and opset_of(model) < 7 and any(o in active for o in node.output) \
                and _middle_axis(node, ranks := ranks or _ranks(model)):
            rows.append(NodeRow(node_name(node, i), node.op_type, True, LEGACY_AXIS))
            continue
        if run is not model and contrib_key(node, model):
            rows.append(NodeRow(node_name(node, i), node.op_type, True, "lowered"))
            continue
        conflict = type_conflict(node, opset_of(model), known_types)
        if conflict:
            rows.append(NodeRow(node_name(node, i), node.op_type, True, conflict))
            continue
        fwd = get_kernel(node.op_type, opset_of(model, node.domain), node.domain) is not None
        grad = gradient_status(node.op_type, "" if node.domain == "ai.onnx" else node.domain)
        if grad == "missing":
            grad = "MISSING" if any(o in active for o in node.output) else "not needed"
        rows.append(NodeRow(node_name(node, i), _op_label(node, fwd and grad != "MISSING"),
                            fwd, grad))
    # nodes inside the branches and bodies that training runs (a static If's untaken branch
    # is gone from `run`), listed where they lack a kernel or a needed gradient rule
    outer = {o for n in model.graph.node for o in n.output}
    for i, node in enumerate(nodes):
        needed = any(o in active for o in node.output)
        # (and the nodes that a static If's taken branch put in the graph)
        here = [] if set(node.output) <= outer else [(node_name(node, i), node)]
        for path, inner in here + list(_inner_nodes(node, node_name(node, i))):
            fwd = get_kernel(inner.op_type, opset_of(model, inner.domain),
                             inner.domain) is not None
            grad = gradient_status(inner.op_type,
                                   "" if inner.domain == "ai.onnx" else inner.domain)
            if not fwd or grad == "missing" and needed:
                rows.append(NodeRow(path, _op_label(inner, False), fwd,
                                    "MISSING" if grad == "missing" and needed else grad,
                                    inner=True))
    imports = ", ".join(f"{o.domain} {o.version}" for o in model.opset_import
                        if o.domain not in ("", "ai.onnx"))
    untied = [u for u in untied if u in trained]  # (untied constants are no parameters)
    single = [p for p in single_bias_masks(model) if p in trained]
    stats = {i for n in nodes if n.op_type == "BatchNormalization" for i in n.input[3:5]}
    shared = shared_constants(model, sorted(trained | stats))
    tool_constants = tool_folded_constants(model)
    detached = list(dict.fromkeys(model.graph.node[i].input[k]
                                  for i, k in detached_inputs(model)))
    return Report(opset_of(model), rows, params, untied, tied, *folded,
                  imports=imports, single_bias=single, detached=detached, lookups=lookups,
                  fused_error=fused_error, shared=shared, tool_constants=tool_constants,
                  unfused=unfused, inner=subgraph_weights(model))


def type_conflict(node: onnx.NodeProto, opset: int, types: Mapping) -> str:
    """Where inputs of `node` that its schema binds to one type variable have different types
    (an int64 input into a float MatMul, which onnx.checker lets pass and onnxruntime refuses
    on loading): which, with their types; "" where they agree or a type is unknown."""
    if node.domain not in ("", "ai.onnx"):
        return ""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # noqa: BLE001 - an op this opset does not define: the kernel table says
        return ""
    formal = list(schema.inputs)
    variables = {c.type_param_str for c in schema.type_constraints}
    bound: dict[str, list[str]] = {}
    for i, name in enumerate(node.input):
        if not name or not formal:
            continue
        param = formal[min(i, len(formal) - 1)]
        if i >= len(formal) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            continue
        if param.type_str not in variables or (
                i >= len(formal) - 1 and param.option ==
                onnx.defs.OpSchema.FormalParameterOption.Variadic and not param.is_homogeneous):
            continue
        if name in types:
            bound.setdefault(param.type_str, []).append(name)
    for var, names in bound.items():
        if len({np.dtype(types[n][1]) for n in names}) > 1:
            return f"{TYPES_DISAGREE}: " + ", ".join(
                f"'{n}' {np.dtype(types[n][1]).name}" for n in names) + \
                f" are bound to one type {var}"
    return ""


def _op_label(node: onnx.NodeProto, supported: bool) -> str:
    """The op's name in the table and the errors: with its domain where it is unsupported and
    not ONNX's own (a Relu of domain evil.com has no kernel: "Relu" alone misled)."""
    if supported or node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.op_type} of domain {node.domain}"


def _inner_nodes(node: onnx.NodeProto, path: str):
    """(path/name, node) of every node inside `node`'s subgraphs, nested ones included."""
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            for j, inner in enumerate(g.node):
                here = f"{path}/{node_name(inner, j)}"
                yield here, inner
                yield from _inner_nodes(inner, here)


def _untaken_branches(params: list, before: onnx.ModelProto, nodes: list[onnx.NodeProto]
                      ) -> list:
    """The parameter table's rows for tensors that only an If's untaken branch read (the If's
    condition is static: training takes the other), with that reason."""
    from dataclasses import replace

    now = {x for n in nodes for x in reads(n)}
    ifs = {x: node_name(n, i) for i, n in enumerate(before.graph.node) if n.op_type == "If"
           for x in reads(n)}
    out = []
    for p in params:
        if p.role == UNUSED and p.name in ifs and p.name not in now:
            p = replace(p, reason=f"read only by the branch that If '{ifs[p.name]}' does not "
                        "take (its condition is a constant)")
        out.append(p)
    return out


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every value ONNX shape inference gives one (best effort)."""
    from trainer.memory import strip

    out = {k: len(v) for k, v in inferred_dims(strip(model)).items()}
    return out or {"": 0}  # (not empty: computed once)


def _middle_axis(node: onnx.NodeProto, ranks: dict[str, int]) -> bool:
    """An opset 1-6 broadcast (`broadcast: 1`) whose `axis` aligns B with A's middle axes,
    not its last: what trainer.autodiff.context.to_input refuses for a product."""
    a = {x.name: x for x in node.attribute}
    if "broadcast" not in a or not a["broadcast"].i or "axis" not in a or len(node.input) < 2:
        return False
    ra, rb = ranks.get(node.input[0]), ranks.get(node.input[1])
    if ra is None or rb is None or ra == 0:
        return False
    return a["axis"].i % ra != ra - rb


def _loop_from_data(node: onnx.NodeProto, known: set[str]) -> bool:
    """The Loop's trip count, first condition or body condition follows the data's values
    (`known`: the outer values computed from shapes and constants alone)."""
    if any(x and x not in known for x in node.input[:2]):
        return True
    body = next((a.g for a in node.attribute if a.name == "body"), None)
    if body is None or len(body.output) < 1 or len(body.input) < 2:
        return False
    base = known | {t.name for t in body.initializer} | {body.input[0].name}
    # the first condition and the carried values known before the loop stay known through it
    # when each iteration computes them from known ones (a counter carried instead of the
    # iteration number, as the default exporter writes nn.EmbeddingBag's loop over bags): the
    # largest such set, by dropping any whose update is not
    carried = [(body.input[k].name, body.output[k - 1].name)
               for k in range(1, min(len(body.input), len(body.output) + 1))
               if k == 1 or (k < len(node.input) and node.input[k] in known)]
    if node.input[1:2] and node.input[1] and node.input[1] not in known:
        carried = carried[1:]
    while True:
        fixed = base | {name for name, _ in carried}
        inner = from_shapes(((n.op_type, n.domain, list(n.input), list(n.output))
                             for n in body.node), fixed.__contains__)
        kept = [(a, b) for a, b in carried if b in inner or b in fixed]
        if kept == carried:
            break
        carried = kept
    cond = body.output[0].name
    return cond not in inner and cond not in fixed


def gradient_status(op: str, domain: str = "") -> str:
    """rule | lowered (static sequences and control flow become plain ops before
    differentiation, trainer.autodiff.subgraph) | not differentiable | missing."""
    from trainer.autodiff.registry import RULES
    from trainer.autodiff.subgraph import CONTROL, SEQUENCE

    if op in NO_GRADIENT:
        return "not differentiable"
    if (domain, op) in RULES:
        return "rule"
    if domain == "" and op in CONTROL | SEQUENCE:
        return "lowered"
    return "missing"


def support_table() -> list[dict]:
    """One row per operator of the installed onnx's domains (and any other op with a kernel):
    `{"op", "domain", "forward": [kernel since-versions], "gradient": "rule" | "lowered" |
    "not differentiable" | "missing"}` (gradient is "missing" too for ops without a kernel)."""
    import onnx.defs

    from trainer.executor import GRAPH_KERNEL_OPS
    from trainer.kernels import KERNELS

    _load_all()
    ops = {("" if s.domain == "ai.onnx" else s.domain, s.name)
           for s in onnx.defs.get_all_schemas_with_history() if not s.deprecated}
    ops |= set(KERNELS)
    rows = []
    for domain, op in sorted(ops, key=lambda k: (k[0], k[1])):
        forward = sorted({since for since, _ in KERNELS.get((domain, op), [])})
        if (domain, op) in GRAPH_KERNEL_OPS:
            forward = [GRAPH_KERNEL_OPS[(domain, op)]]
        rows.append({"op": op, "domain": domain, "forward": forward,
                     "gradient": gradient_status(op, domain)})
    # onnxruntime's fused ops, trained as the standard ops they stand for (trainer.contrib)
    from trainer.contrib import CONTRIB, LOWERINGS
    known = {(r["domain"], r["op"]) for r in rows}
    for op in sorted(LOWERINGS):
        domain = "" if op == "SimplifiedLayerNormalization" else CONTRIB
        if op == "LayerNormalization" or (domain, op) in known:
            continue  # (the standard op's row; onnxruntime's form before opset 17 is lowered)
        rows.append({"op": op, "domain": domain, "forward": [1], "gradient": "lowered"})
    return sorted(rows, key=lambda r: (r["domain"], r["op"]))


# -- the pre-flight report of a config -------------------------------------------------------------
@dataclass
class Preflight:
    """What is known before step 1: report lines, every problem found, the memory estimate."""

    lines: list[str]
    problems: list[Exception]
    estimate: object | None = None  # trainer.memory.Estimate
    out_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        # (one problem found by two checks, as a missing data.eval file: said once)
        seen: set[str] = set()
        self.problems = [p for p in self.problems
                         if not (str(p) in seen or seen.add(str(p)))]

    def text(self) -> str:
        lines = list(self.lines)
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(printable(line) for line in lines)  # (names from the file)

    def raise_problems(self) -> None:
        """Raise the only problem as it is, or several as one error that lists them all."""
        if len(self.problems) == 1:
            raise self.problems[0]
        if self.problems:
            from trainer.errors import TrainerError
            listing = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
            raise TrainerError(f"{len(self.problems)} problems found before training: "
                               f"{listing}")


def _check_values(ds, what: str, structure, precision: str, problems: list) -> None:
    """The values of a dataset as `train` checks them when loading it: finite floats, and
    inputs the model's types hold (whole numbers in an integer input's range, no complex);
    what is wrong goes to `problems`."""
    from trainer import preflight as checks
    from trainer.data import load_arrays
    from trainer.errors import TrainerError
    from trainer.graph import input_dtypes, is_float_dtype

    mapping = {**ds.inputs, **ds.targets}
    try:
        arrays = load_arrays(ds.path, mapping, what)
        if structure is None:
            return
        # (in the types the engine computes them in: train.compute_form's)
        wide = np.dtype(np.float64 if precision == "fp64" else np.float32)
        dtypes = {k: wide if is_float_dtype(v) and v.itemsize <= wide.itemsize else v
                  for k, v in input_dtypes(structure).items()}
        for name in ds.inputs:
            if name in arrays and name in dtypes:
                checks.convertible(arrays[name], dtypes[name], name, what)
                checks.within_range(arrays[name], dtypes[name],
                                    f"{what}: array '{mapping[name]}' (for '{name}')")
        # (token ids against the embedding tables they index)
        checks.gather_indices({k: arrays[k] for k in ds.inputs if k in arrays}, structure, what)
    except TrainerError as exc:
        problems.append(exc)


class _Shaped:
    """Stands for an array where only its shape is read."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


# datasets up to this size (in memory or memory-mapped) have their values checked by `check
# CONFIG` as `train` checks them when it loads them (NaN, values the model's types cannot hold)
_VALUE_CHECK_BYTES = 512 << 20


def preflight(cfg, *, world: int = 1, xp=np, full_model=None,
              values: bool = False, keep_folders: bool = True) -> Preflight:
    """Check a config before anything large is allocated: paths, the model's op support, the
    datasets (headers, and the loss targets' values), the batch against the model, and the
    memory a step needs per process against what the device has free. Every problem is
    collected (none is raised here); `full_model()` loads the model with its values, for the
    estimate of models whose shapes ONNX inference cannot make concrete; `values`: also the
    values of datasets up to _VALUE_CHECK_BYTES, memory-mapped ones in chunks (`check CONFIG`;
    `train` checks them as it loads them); not `keep_folders`: the output folders the write
    probes make are removed again (`check CONFIG` writes nothing)."""
    from trainer import memory
    from trainer import preflight as checks
    from trainer.config import blas_threads, local_processes, usable_cores
    from trainer.data import (
        Batches,
        check_against_model,
        check_input_keys,
        describe_arrays,
        keep_on_device,
        load_arrays,
        prefetching,
    )
    from trainer.errors import ModelError, TrainerError, UnsupportedOpError
    from trainer.graph import bake_inputs, constant_inputs, input_shapes, tensor_type

    problems: list[Exception] = []
    lines: list[str] = []

    def attempt(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrainerError as exc:
            problems.append(exc)
            return None

    from trainer.train import check_paths
    check_paths(cfg, attempt, keep=keep_folders)
    attempt(checks.shardable, cfg, world)
    if world > 1:  # (the gradients' dtype: float64 for fp64 runs, float32 masters otherwise)
        from trainer.comm.base import check_compress

        attempt(check_compress, cfg.distributed.compress,
                np.empty(0, np.float64 if cfg.precision == "fp64" else np.float32))
    exports = 2 if cfg.best is not None else 1  # (the best model goes beside it)
    size = checks.model_bytes(cfg)  # (and a margin for the file's framing: a hundredth)
    attempt(checks.room_for, Path(cfg.output), exports * size + size // 100 + 4096,
            "output", "the trained model" + (" and the best one" if exports == 2 else ""))
    # (a batch the processes do not divide is a problem; the rest is checked at the next one
    # they do, so that the data's and the model's own problems are listed too)
    batch = -(-cfg.data.batch_size // world) * world
    local = batch // world
    if batch != cfg.data.batch_size:
        problems.append(TrainerError(f"data.batch_size {cfg.data.batch_size} (global) must be "
                                     f"divisible by the number of processes {world}"))
    where = f"{world} process(es) on {'cpu' if xp is np else 'gpu'}"
    threads, source = blas_threads(cfg.threads)
    lines.append(f"pre-flight: {Path(cfg.model).name}, {where}, precision {cfg.precision}, "
                 f"{threads} BLAS thread(s) per process ({source})")
    cores = usable_cores()
    if xp is np and threads > 1 and threads * local_processes() > cores:  # (each waits)
        fix = "leave `threads` out" if source == "threads" else f"unset {source}"
        lines.append(f"  warning: {threads} BLAS thread(s) ({source}) x {local_processes()} "
                     f"process(es) on the {cores} core(s) this process may use: threads that "
                     "outnumber the cores wait on each other and a step can run many times "
                     f"slower; {fix} (each process then takes its share of the cores)")
    if xp is np:
        from trainer.kernels import compiled

        lines.append(f"  {compiled.status()}")

    structure = attempt(memory.load_structure, cfg.model)
    data_inputs: dict[str, list] = {}
    mismatched = False  # (a dataset whose arrays do not fit the model's inputs)
    if structure is not None and cfg.precision in ("bf16", "fp16"):
        from trainer.autocast import CAST_OPS, opset_note

        note = opset_note(structure, cfg.precision)
        if note and any(n.op_type in CAST_OPS and not n.domain for n in structure.graph.node):
            lines.append(f"  warning: precision {cfg.precision}: {note}")
    if structure is not None:
        report = model_report(memory.strip(structure))
        bad_fwd = [(r.op, r.name) for r in report.nodes if not r.forward]
        bad_grad = [(r.op, r.name) for r in report.nodes if r.gradient == "MISSING"]
        if bad_fwd:
            problems.append(UnsupportedOpError("forward kernel", bad_fwd))
        if bad_grad:
            problems.append(UnsupportedOpError("gradient rule", bad_grad))
        problems += [ModelError(f"node '{r.name}' ({r.op}): {r.gradient[len('REFUSED: '):]} "
                                "(onnxruntime refuses such a model too; cast one of them)")
                     for r in report.nodes if r.gradient.startswith(TYPES_DISAGREE)]
        support = "every node has a forward kernel and, where needed, a gradient" if not (
            bad_fwd or bad_grad) else f"{len(set(bad_fwd) | set(bad_grad))} node(s) unsupported"
        lines.append(f"  model: {report.node_count} nodes, {report.opset_text}; {support}")
        inits = {t.name for t in structure.graph.initializer}
        data_inputs = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                                 for d in tensor_type(vi.type).shape.dim]
                       for vi in structure.graph.input if vi.name not in inits
                       and vi.name not in cfg.data.constants}
        defaults = {vi.name for vi in structure.graph.input if vi.name in inits}
        for what, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
            if ds is not None:
                attempt(check_input_keys, ds.inputs, data_inputs, defaults,
                        set(cfg.data.constants), what)
        attempt(checks.batch_axis_first, structure, set(data_inputs))
    constants: dict[str, np.ndarray] = {}
    if structure is not None and cfg.data.constants:
        constants = attempt(constant_inputs, cfg.data.constants, structure, local,
                            cfg.data.train.inputs) or {}
        if constants:
            lines.append("  data.constants: " + ", ".join(
                f"{k} {list(v.shape)} {v.dtype}" for k, v in constants.items()))

    shapes: dict[str, tuple] = {}
    eval_shapes: dict[str, tuple] = {}
    samples: dict[str, int] = {}
    host_data = per_sample = resident = 0
    train_mapped = False
    for what, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if ds is None:
            continue
        info = attempt(describe_arrays, ds.path, {**ds.inputs, **ds.targets}, what)
        if info is None:
            continue
        empty = [(k, shape) for k, (shape, _, _) in info.items() if math.prod(shape) == 0]
        if empty:  # (named here: the batches' "data.train is empty" named no file or array)
            k, shape = empty[0]
            key = {**ds.inputs, **ds.targets}[k]
            problems.append(DataError(f"{what}: array '{key}' (for '{k}') in {ds.path} is "
                                      f"empty (shape {list(shape)}); give at least one sample"))
            continue
        n = next(iter(info.values()))[0][0]
        samples[what] = n
        in_memory = sum(0 if mapped else math.prod(s) * np.dtype(d).itemsize
                        for s, d, mapped in info.values())
        mapped = sum(math.prod(s) * np.dtype(d).itemsize for s, d, m in info.values() if m)
        kinds = ", ".join(f"{k} {list(s)} {np.dtype(d)}" for k, (s, d, _) in info.items())
        lines.append(f"  {what}: {n} samples ({kinds}); {memory.human(in_memory)} in memory"
                     + (f", {memory.human(mapped)} memory-mapped" if mapped else ""))
        if what == "data.train":
            shapes = {k: s for k, (s, _, _) in info.items()}
            host_data = in_memory
            # data.on_device: the whole training set held on the GPU as well
            resident = in_memory if keep_on_device(cfg.data.on_device, in_memory + mapped,
                                                   bool(mapped), xp is not np) else 0
            train_mapped = bool(mapped)
            per_sample = sum(math.prod(s[1:]) * np.dtype(d).itemsize
                             for s, d, _ in info.values())
        else:
            eval_shapes = {k: s for k, (s, _, _) in info.items()}
            host_data += in_memory
        if data_inputs:
            before = len(problems)
            attempt(check_against_model, {k: _Shaped(info[k][0]) for k in ds.inputs
                                          if k in info}, data_inputs, what)
            mismatched = mismatched or len(problems) > before
        if values and in_memory + mapped <= _VALUE_CHECK_BYTES:
            _check_values(ds, what, structure, cfg.precision, problems)
        elif values:
            lines.append(f"  {what}: values not checked (over {memory.human(_VALUE_CHECK_BYTES)}"
                         "; train checks them as it loads them)")
    if "data.train" not in samples:
        return Preflight(lines, problems)
    n = samples["data.train"]
    fake = {"n": np.broadcast_to(np.zeros(1, np.int8), (n,))}
    fed = {k: v for k, v in data_inputs.items() if k in cfg.data.train.inputs}
    before = len(problems)
    attempt(checks.fixed_batch_fits, fed, n, world)
    batches = attempt(Batches, fake, batch, world=world,
                      drop_last=cfg.data.drop_last) if len(problems) == before else None
    if batches is not None:
        if data_inputs:
            attempt(checks.fixed_batch, fed, batches.local_sizes(), batch, world)
        spe = batches.steps_per_epoch
        total = cfg.steps if cfg.steps else (cfg.epochs * spe) // cfg.accumulate
        length = f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs} epoch(s)"
        biggest = max(batches.local_sizes(), default=local)
        whole = (f" (more than the {n} samples: each batch is all of them)"
                 if biggest < local else "")
        at = f", checked at {batch}" if batch != cfg.data.batch_size else ""
        lines.append(f"  steps: {spe} batch(es) per epoch (global batch {cfg.data.batch_size}"
                     f"{at}{whole}, {min(local, biggest)} per process, accumulate "
                     f"{cfg.accumulate}); {total} optimizer steps ({length})")
        # (the estimate at the batches the run makes: one at the configured size, far above
        # the data's, took gigabytes and minutes, or the machine)
        local = min(local, biggest)
        if batches.dropped_text() and total >= 1:
            lines.append(f"  {batches.dropped_text()}")
        warmup = getattr(cfg.schedule, "warmup_steps", 0) if cfg.schedule.type != \
            "onecycle" else 0
        if 1 <= total <= warmup:  # (step s of a warmup of W runs at lr * (s + 1) / W)
            top = "its configured value" if total == warmup else \
                f"{total}/{warmup} of its configured value"
            lines.append(f"  warning: schedule.warmup_steps {warmup} covers the whole run "
                         f"({total} optimizer steps): the lr only rises, to {top} at the last "
                         f"step, and the {cfg.schedule.type} schedule never starts")
        if cfg.checkpoint.every_steps and cfg.checkpoint.dir is None:
            lines.append(f"  warning: checkpoint.every_steps {cfg.checkpoint.every_steps} "
                         "without checkpoint.dir: no checkpoint is written (set "
                         "checkpoint.dir to keep them)")
        plateau = cfg.schedule if cfg.schedule.type == "plateau" else None
        for key, section in (("best", cfg.best), ("early_stop", cfg.early_stop),
                             ("schedule", plateau)):
            if section is not None and _against_its_sense(section.metric, section.mode):
                high = section.mode == "max"
                lines.append(f"  warning: {key}.mode {section.mode} with {key}.metric "
                             f"{section.metric} counts its {'highest' if high else 'lowest'} "
                             f"value as the best (a{' loss' if high else 'n accuracy'} is best "
                             f"at its {'lowest' if high else 'highest'}); mode auto follows "
                             "the metric (min for a loss, max for an accuracy)")
        if total < 1 or spe == 0:
            problems.append(batches.empty_epoch_error(cfg.accumulate, cfg.epochs))
    if structure is None or batches is None or mismatched or any(
            isinstance(p, (ModelError, UnsupportedOpError)) for p in problems):
        # (data that does not fit the model's inputs: a build at its shapes would only fail
        # again, in a kernel's words; no batch: an estimate at a batch size larger than the
        # data held up the error for gigabytes and minutes)
        return Preflight(lines, problems)
    # Batches held: on a CPU, the one being trained on and the one prefetched; on a GPU, the
    # ring of device buffers that prefetched batches are copied up into (DeviceUploads: one
    # more than the micro-batches of a step), else the step's own copy; a training set kept
    # on the GPU: the batch gathered there.
    if xp is np:
        copies = 1 + (cfg.data.prefetch is not False)
    elif not resident and prefetching(cfg.data.prefetch, per_sample * local, train_mapped):
        copies = cfg.accumulate + 1
    else:
        copies = 1
    est = None
    if cfg.data.constants and not constants:  # (their problem is listed: no estimate without)
        return Preflight(lines, problems)
    try:
        in_shapes = input_shapes(structure, local, {
            **{k: (local,) + tuple(shapes[k][1:]) for k in data_inputs if k in shapes},
            **{k: v.shape for k, v in constants.items()}})
        # (integer and boolean data.constants are initializers of the training graph)
        baked = {k: v for k, v in constants.items() if v.dtype.kind in "biu"}
        in_shapes = {k: v for k, v in in_shapes.items() if k not in baked}
        est = memory.estimate(memory.strip(bake_inputs(structure, baked)), loss=cfg.loss,
                              batch=local,
                              in_shapes=in_shapes, trainable=cfg.trainable, frozen=cfg.frozen,
                              batchnorm=cfg.batchnorm, precision=cfg.precision,
                              optimizer=cfg.optimizer, world=world,
                              eval_copy=cfg.data.eval is not None,
                              compress=cfg.distributed.compress,
                              full_model=(lambda: bake_inputs(full_model(), baked))
                              if baked and full_model is not None else full_model,
                              pooled=True,  # (the plan of either device)
                              batch_bytes=per_sample * local * copies + resident,
                              shard_optimizer=cfg.distributed.shard_optimizer,
                              accumulate=cfg.accumulate,
                              constant_shapes=(lambda b: {
                                  k: v.shape for k, v in constant_inputs(
                                      cfg.data.constants, structure, b).items()
                                  if k not in baked})
                              if constants else None, device=xp is not np,
                              # (constants baked for this batch: a probe at 2 and 3 would not fit)
                              at_batch_only=any(v.size > 1 for v in baked.values()))
        if 1 in batches.any_rank_sizes() and local != 1 and not (
                cfg.distributed.sync_batchnorm and world > 1) and any(
                n.op_type == "BatchNormalization" for n in structure.graph.node):
            # a process's batch of 1 sample, which a BatchNormalization in train form refuses
            # at `train`'s start (check said nothing): its training graph at that batch
            one = {k: (1,) + tuple(v[1:]) if k in data_inputs else v
                   for k, v in in_shapes.items()}
            try:
                memory.training_structure(memory.strip(bake_inputs(structure, baked)),
                                          cfg.loss, cfg.trainable, cfg.frozen, cfg.batchnorm,
                                          one)
            except ModelError as exc:
                if "1 value per channel" in str(exc):
                    problems.append(ModelError(f"{exc}; here {batches.one_sample_why()}"))
            except Exception:  # noqa: BLE001 - (only that refusal is looked for here)
                pass
    except TrainerError as exc:
        sized = sorted({n.op_type for n in data_sizing_nodes(structure)})
        hint = constant_batch_hint(constants, structure, local, data_inputs) if constants \
            else ""
        if hint and type(exc) is ModelError:  # (the model failed on a constant written for
            exc = ModelError(f"{str(exc).rstrip()}; {hint}")  # another batch size, maybe)
        if not sized:
            problems.append(exc)
        else:  # (its probes on zeros route the data otherwise than training will)
            lines.append(f"  memory: no estimate (sizes follow the data through "
                         f"{', '.join(sized)}: {' '.join(str(exc).split())[:160]})")
    except Exception as exc:  # noqa: BLE001 - the estimate is advice: training can go on
        lines.append(f"  memory: no estimate ({type(exc).__name__}: {exc})")
    out_shape = None
    if cfg.checkpoint.dir is not None:
        from trainer import checkpoint

        old = checkpoint.latest(cfg.checkpoint.dir) if Path(cfg.checkpoint.dir).is_dir() \
            else None
        if old is not None:
            lines.append(f"  note: checkpoint.dir holds checkpoints of an earlier run (the "
                         f"newest: {old.name}): train continues it with --resume and refuses "
                         "a fresh run there")
    if est is not None and cfg.checkpoint.dir is not None:
        try:  # (the trained values and as many buffers of optimizer state)
            checks.room_for(Path(cfg.checkpoint.dir),
                            est.trainable_bytes * (1 + checks.optimizer_buffers(cfg.optimizer)),
                            "checkpoint.dir", "a checkpoint")
        except TrainerError as exc:
            lines.append(f"  warning: {exc}")
    if est is not None:
        out_shape = est.out_shape
        lines += _memory_lines(est, device=xp is not np)
        host = host_data if xp is np else 0
        free, what = memory.available_memory(xp)
        sharing = local_processes() if xp is np else 1
        # (the set-up's copies of the model are host memory: on a GPU, the device holds the
        # training state, and the set-up is checked against the host's memory below)
        need = ((est.peak if xp is np else est.total) + host) * sharing
        if free is not None:
            lines.append(f"    available: {memory.human(free)} ({what}"
                         + (f", shared by {sharing} processes on this node" if sharing > 1
                            else "") + ")")
        if world > 1:
            lines.append(f"  all-reduce per step: {memory.human(est.allreduce)} per process")
        if free is not None and need > free and cfg.memory_check:
            problems.append(TrainerError(
                f"the estimated peak memory, {memory.human(need)}"
                + (f" for {sharing} processes" if sharing > 1 else " per process")
                + (" (with the datasets held in memory)" if host else "")
                + f", exceeds the {memory.human(free)} of {what}: lower data.batch_size, "
                "freeze parameters, use fewer processes per node, or set memory_check: false "
                "to start anyway"))
        if xp is not np and cfg.memory_check:
            host_free, host_what = memory.available_memory(np)
            ranks = local_processes()
            if host_free is not None and est.setup * ranks > host_free:
                problems.append(TrainerError(
                    f"the set-up's estimated peak of host memory, "
                    f"{memory.human(est.setup * ranks)}"
                    + (f" for {ranks} processes" if ranks > 1 else " per process")
                    + f" (about {memory.SETUP_COPIES:g} copies of the model's values while "
                    f"it loads, converts and builds the training graph), exceeds the "
                    f"{memory.human(host_free)} of {host_what}: use fewer processes per node, "
                    "or set memory_check: false to start anyway"))
        # (a fixed batch the data does not fit is its own problem, listed above)
        fits = all(not dims or dims[0] in (None, local) for dims in data_inputs.values())
        eval_out = eval_output_shape(structure, cfg.loss.output, out_shape, local, {
            k: shapes[k][1:] for k in data_inputs if k in shapes}, {
            k: eval_shapes[k][1:] for k in data_inputs if k in eval_shapes}, constants)
        _check_labels(cfg, out_shape, problems, load_arrays, local if fits else None,
                      eval_out)
    return Preflight(lines, problems, est, out_shape)


def _against_its_sense(metric: str, mode: str) -> bool:
    """A best/early_stop mode opposite to its metric's sense (max of a loss, min of an
    accuracy), which keeps the worst model."""
    return (mode == "max" and metric.endswith("loss")) or (
        mode == "min" and "accuracy" in metric)


def _memory_lines(est, device: bool = False) -> list[str]:
    from trainer.memory import human

    parts = [("parameters", est.parameters), ("gradients", est.gradients),
             ("optimizer", est.optimizer), ("activations", est.activations),
             ("workspace", est.workspace), ("batches", est.batches)]
    named = (f": trained {listing(est.trained, 6)}"
             + (f"; left out {listing(est.left_out, 6)}" if est.left_out else "")
             if est.trained else "")  # (what trainable, frozen and the defaults select)
    lines = [f"  parameters: {est.trainable:,} trained ({human(est.trainable_bytes)}), "
             f"{est.frozen:,} frozen ({human(est.frozen_bytes)}){named}",
             f"  memory per process (estimate from {est.method}, {est.seconds:.2f} s): "
             + (f"{human(est.total)} on the GPU; the set-up's peak in host memory "
                f"{human(est.setup)}" if device else
                f"{human(est.peak)}" + (
                    f" (the set-up's, which loads, converts and builds the training graph "
                    f"from the model; training holds {human(est.total)})"
                    if est.setup > est.total else "")),
             "    " + " | ".join(f"{k} {human(v)}" for k, v in parts)]
    return lines


def eval_output_shape(model: onnx.ModelProto, output: str, train_shape, local: int,
                      train_inputs: Mapping[str, tuple], eval_inputs: Mapping[str, tuple],
                      constants: Mapping[str, np.ndarray] | None = None):
    """The loss output's shape for a batch of `local` samples of the eval set, whose samples
    (`eval_inputs`: per-sample shapes) may differ from the training set's along symbolic
    axes (a sequence length): by ONNX shape inference where they do; None where unknown."""
    if not train_shape or all(tuple(eval_inputs.get(k, v)) == tuple(v)
                              for k, v in train_inputs.items()):
        return train_shape
    from trainer import memory
    from trainer.graph import input_shapes

    try:
        given = {k: (local,) + tuple(v) for k, v in {**train_inputs, **eval_inputs}.items()}
        given.update((k, v.shape) for k, v in (constants or {}).items())
        found, _ = memory.infer(memory.strip(model), input_shapes(model, local, given))
        got = found.get(output)
        return tuple(got[0]) if got and all(d > 0 for d in got[0][1:]) else None
    except Exception:  # noqa: BLE001 - unknown: the eval set's targets are checked as it runs
        return None


def _check_labels(cfg, out_shape, problems: list, load_arrays, local: int | None,
                  eval_shape=None) -> None:
    """The loss targets' values against the loss output (as the trainer checks them later);
    with `local`, the output's first axis against the batch of each process; `eval_shape`:
    the output's at the eval set's samples (None: unknown, not checked)."""
    from trainer import preflight as checks
    from trainer.errors import TrainerError

    spec = cfg.loss
    if spec.type == "output" or not out_shape:
        return
    try:
        if local is not None:
            checks.batch_first_output(tuple(out_shape), local, spec.output, spec.type,
                                      1 if spec.type == "ctc" and spec.time_axis == 0 else 0)
    except TrainerError as exc:
        problems.append(exc)
        return
    train_shape = out_shape
    for what, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if ds is None or spec.target not in ds.targets:
            continue
        out_shape = train_shape if what == "data.train" else eval_shape
        if not out_shape:
            continue
        try:
            labels = load_arrays(ds.path, {spec.target: ds.targets[spec.target]},
                                 what)[spec.target]
            if spec.type == "mse":
                checks.regression_targets(labels, spec.target, what, out_shape[1:],
                                          spec.output)
                continue
            if spec.type == "bce":
                checks.binary_targets(np.asarray(labels), spec.target, what, out_shape[1:],
                                      spec.output)
                continue
            if spec.type == "ctc":
                steps = None
                if spec.lengths and spec.lengths in ds.targets:
                    steps = np.asarray(load_arrays(ds.path, {spec.lengths: ds.targets[
                        spec.lengths]}, what)[spec.lengths])
                checks.ctc_labels(np.asarray(labels), spec.target, what, out_shape[-1],
                                  spec.blank, out_shape[spec.time_axis], spec.output, steps,
                                  spec.lengths)
                continue
            axis = spec.class_axis % len(out_shape)
            per_sample = tuple(d for i, d in enumerate(out_shape) if i != axis)[1:]
            if labels.dtype.kind in "iu":
                labels = np.asarray(labels)
            checks.class_labels(labels, spec.target, what, out_shape[axis], per_sample,
                                spec.ignore_index, spec.output, tuple(out_shape),
                                getattr(spec, "weight", None))
        except TrainerError as exc:
            problems.append(exc)
