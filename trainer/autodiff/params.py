"""Which initializers are trained: the default parameter set of a model, with a reason for
every float initializer left out, and the `trainable` / `frozen` overrides.

The default set is what PyTorch calls the parameters of the exported module: float initializers
that reach the loss through a differentiable input, except
  - BatchNormalization running statistics (training state, updated from batch statistics), and
    the buffers of frozen BatchNorms (running statistics that feed no BatchNormalization);
  - additive attention masks (zeros and one fill of at most -100) that exporters fold from
    buffers, and a Keras Normalization or Rescaling layer's constants (tf2onnx);
  - one-element tensors (exporters store epsilons, exponents, attention scales and fill values
    as initializers), unless PyTorch's export signature in the model names them PARAMETER or
    their name is a module parameter's (`classifier.bias`: a regression head's bias);
  - the scales of QuantizeLinear/DequantizeLinear (fake quantization keeps them fixed, as
    PyTorch's observers do; listing them in `trainable` learns them, LSQ-style);
  - tensors PyTorch's export signature names BUFFER or CONSTANT_TENSOR, and those its default
    exporter makes while decomposing a module or computes from buffers by constant folding
    (`exporter_constants`).
Parameters an exporter merged or dropped get their own tensors first (`repair_exported_model`).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import re
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from trainer.autodiff.engine import active_nodes
from trainer.autodiff.registry import FREQ_KEY, PADDING_KEY, differentiable_inputs
from trainer.errors import ModelError
from trainer.graph import FLOAT_TYPES, tensor_value, values_unknown

SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"
_FX_NODE_KEY = "pkg.torch.onnx.fx_node"  # a node's FX node in a dynamo export (its metadata)
_LOWERED_KEY = "onnx_trainer.lowered_from"  # (trainer.contrib.LOWERED_KEY: no import cycle)
_TIED_KEY = "onnx_trainer.tied_to"  # metadata of tie_folded_copies' nodes: the source tensor
_SIGNATURE_LINE = re.compile(
    r"^\s*(\w+): (PARAMETER|BUFFER|CONSTANT_TENSOR) target='([^']+)'", re.M)

PARAMETER = "parameter"
STATE = "state"          # BatchNormalization running statistics
CONSTANT = "constant"    # left out by the default rules
UNUSED = "unused"        # no differentiable path to the loss


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    role: str
    reason: str = ""
    alias: str = ""  # the PyTorch parameter a folded tensor holds (parameter_aliases)


def signature_entries(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """{placeholder: (PARAMETER | BUFFER | CONSTANT_TENSOR, tensor name)} from the export
    signature that torch.onnx.export (dynamo) records in the graph's metadata; empty when
    absent. A node's FX node (its metadata) names the placeholders it read (`_fx_reads`)."""
    for prop in list(model.graph.metadata_props) + list(model.metadata_props):
        if prop.key == SIGNATURE_KEY:
            return {ph: (kind, target) for ph, kind, target in _SIGNATURE_LINE.findall(prop.value)}
    return {}


def torch_signature(model: onnx.ModelProto) -> dict[str, str]:
    """{tensor name: PARAMETER | BUFFER | CONSTANT_TENSOR} from the export signature."""
    return {target: kind for kind, target in signature_entries(model).values()}


def _fx_reads(n: onnx.NodeProto) -> set[str]:
    """The FX values (placeholders among them) that node n's FX node read."""
    return set(re.findall(r"%(\w+)", _meta(n, _FX_NODE_KEY)))


def batchnorm_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """The BatchNormalization nodes among `nodes` and in their subgraphs (If branches, Loop and
    Scan bodies), at any depth."""
    for n in nodes:
        if n.op_type == "BatchNormalization":
            yield n
        for a in n.attribute:
            inner = [a.g] if a.type == onnx.AttributeProto.GRAPH else \
                list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
            for g in inner:
                yield from batchnorm_nodes(g.node)


def batchnorm_stats(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """The running statistics BatchNormalization nodes read (in subgraphs too): state, never
    trained by the optimizer."""
    return {n.input[i] for n in batchnorm_nodes(nodes) for i in (3, 4) if i < len(n.input)}


def quantization_scales(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    return {n.input[1] for n in nodes
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1}


def exporter_constants(model: onnx.ModelProto, signature: Mapping[str, str]) -> dict[str, str]:
    """{initializer: reason} for float tensors that PyTorch's default exporter made while
    decomposing a module, which PyTorch does not train: GroupNorm becomes InstanceNormalization
    over the groups with a scale of ones and a bias of zeros, then the module's own weight and
    bias per channel (a tensor the export's signature does not name, read by an
    InstanceNormalization node that the FX node of a group_norm produced). Also a recurrent
    layer's initial state of zeros that an export wrote as an initializer (a fixed-batch
    export of nn.LSTM: h0 = c0 = zeros [layers, batch, hidden]), read by no node but as an
    initial state: PyTorch starts every call from zeros, it has no such parameter (one the
    signature names a parameter stays one)."""
    out = _computed_constants(model)
    out.update(_zero_initial_states(model, signature))
    if not signature:
        return out
    for n in model.graph.node:
        if n.op_type != "InstanceNormalization":
            continue
        fx = _meta(n, _FX_NODE_KEY)
        if "aten.group_norm" not in fx and "aten.native_group_norm" not in fx:
            continue
        for x in n.input[1:3]:
            if x and x not in signature:
                out[x] = ("the exporter's GroupNorm decomposition (its InstanceNormalization's "
                          "fixed scale or bias; the module's weight and bias come after it)")
    return out


_INITIAL_STATE_SLOTS = {"RNN": (5,), "GRU": (5,), "LSTM": (5, 6)}


def _zero_initial_states(model: onnx.ModelProto, signature: Mapping[str, str]
                         ) -> dict[str, str]:
    """{initializer: reason} for the zero initial states `exporter_constants` describes."""

    g = model.graph
    state_reads: set[str] = set()
    other_reads: set[str] = set()
    for n in g.node:
        slots = _INITIAL_STATE_SLOTS.get(n.op_type, ()) if n.domain in ("", "ai.onnx") else ()
        for i, x in enumerate(n.input):
            (state_reads if i in slots else other_reads).add(x)
    out = {}
    for t in g.initializer:
        if t.name not in state_reads or t.name in other_reads or t.data_type not in FLOAT_TYPES \
                or signature.get(t.name) == "PARAMETER" \
                or values_unknown(t):
            continue
        if not tensor_value(t).any():
            out[t.name] = ("a recurrent layer's initial state of zeros (PyTorch starts each "
                           "call from zeros; 'trainable' names it to learn one)")
    return out


def _computed_constants(model: onnx.ModelProto) -> dict[str, str]:
    """{initializer: reason} for float tensors that the default exporter's constant folding
    computed from buffers and constants alone (rotary cos/sin tables from `inv_freq`, ALiBi
    slopes, fixed masks), which PyTorch does not train. A folded tensor that is not named in
    the export's signature holds a parameter (a transposed Linear weight) when it carries one
    of the parameters missing from the graph (`_missing_parameter_uses`); the others are
    computed constants, except where a parameter is unaccounted for (folded into an
    expression, `folded_parameters`): a tensor read in that parameter's module or a module
    above it may be the expression, and stays trainable. Tensors of one value keep the rule
    for one-element constants. Empty without a signature (a TorchScript export cannot tell
    them apart)."""
    entries = signature_entries(model)
    if not entries:
        return {}
    g = model.graph
    named = {t for _, t in entries.values()}
    missing, explained, carriers = _missing_parameter_uses(model)
    # A parameter folded into an expression (`folded_parameters`) may be any folded tensor read
    # in its module or a module above it: those stay trainable, as they are.
    # Where the parameter's own module reads a folded tensor, that is the expression (Gemma3's
    # `1 + weight` in q_norm): the modules above it keep their computed constants (the rotary
    # tables its attention module reads).
    folded = _folded_tensors(g, named)
    reads_folded = {_module_of(n) for n in g.node if any(x in folded for x in n.input)}
    suspect: set[str] = set()
    for ph in missing.keys() - explained:
        module = missing[ph].rpartition(".")[0]
        if module in reads_folded:
            suspect.add(module)
            continue
        parts = module.split(".")
        suspect |= {".".join(parts[:k]) for k in range(len(parts) + 1)}
    if suspect:
        carriers = set(carriers)
        for n in g.node:
            module = _module_of(n)
            if module is None or module in suspect:
                carriers.update(n.input)
    # (a tensor whose record names a parameter is an expression of it: trainable, warned of by
    # folded_expressions)
    params = {k for k, v in torch_signature(model).items() if v == "PARAMETER"}
    of_params = {x for x, names in _folded_from(model).items() if params & set(names)}
    return {t.name: ("a constant the exporter computed from buffers or constants (it holds no "
                     "PyTorch parameter)")
            for t in g.initializer if t.data_type in FLOAT_TYPES and t.name not in named
            and t.name not in carriers and t.name not in of_params and int(np.prod(t.dims)) > 1}


def _folded_tensors(g: onnx.GraphProto, named: set[str]) -> set[str]:
    """Float initializers of more than one element that the export's signature does not name:
    values the default exporter's constant folding made."""
    return {t.name for t in g.initializer if t.data_type in FLOAT_TYPES
            and t.name not in named and int(np.prod(t.dims)) > 1}


def _reader_index(nodes) -> dict[str, str]:
    """{tensor: 'Greater input 1 (not differentiable), ...'}: where each tensor is read."""
    seen: dict[str, list[str]] = {}
    for n in nodes:
        slots = set(differentiable_inputs(n.op_type, len(n.input), n.domain))
        for i, x in enumerate(n.input):
            if x:
                seen.setdefault(x, []).append(
                    f"{n.op_type} input {i}" + ("" if i in slots else " (not differentiable)"))
    return {k: ", ".join(dict.fromkeys(v)) for k, v in seen.items()}


def parameter_table(model: onnx.ModelProto, nodes: list[onnx.NodeProto], targets,
                    shapes: Mapping[str, tuple], stats: set[str] | None = None
                    ) -> list[ParamInfo]:
    """Every float initializer of `model` with its role for a loss over `targets`; `nodes` is
    the graph in training form (loss included), `shapes` maps names to (shape, dtype), `stats`
    the BatchNormalization statistics (default: those of the model's nodes)."""
    inits = [t for t in model.graph.initializer if t.data_type in FLOAT_TYPES]
    stats = batchnorm_stats(model.graph.node) if stats is None else stats
    scales = quantization_scales(nodes)
    readers = None
    signature = torch_signature(model)
    made = exporter_constants(model, signature)
    aliases = parameter_aliases(model)
    reach = active_nodes(nodes, targets, {t.name for t in inits}, shapes)[1]
    keras = model.producer_name in _KERAS_PRODUCERS
    frozen_bn = frozen_batchnorm_buffers(model, stats)
    masks = mask_candidates(model)  # (only these are read for their values)
    single_out = single_output_biases(model)
    slopes = prelu_slopes(model)
    rows = []
    for t in inits:
        shape = tuple(t.dims)
        size = int(np.prod(shape)) if shape else 1
        kind = signature.get(t.name)
        if t.name in stats:
            rows.append(ParamInfo(t.name, shape, STATE, "BatchNormalization running statistic "
                                  "(updated from batch statistics, not by gradients)"))
        elif t.name not in reach:
            readers = _reader_index(nodes) if readers is None else readers
            rows.append(ParamInfo(t.name, shape, UNUSED, "no differentiable path to the loss "
                                  f"(read by {readers.get(t.name, 'nothing')})"))
        elif kind in ("BUFFER", "CONSTANT_TENSOR"):
            rows.append(ParamInfo(t.name, shape, CONSTANT, f"a PyTorch {kind.lower()}, "
                                  "not a parameter"))
        elif t.name in made:
            rows.append(ParamInfo(t.name, shape, CONSTANT, made[t.name]))
        elif t.name in scales and kind != "PARAMETER":
            rows.append(ParamInfo(t.name, shape, CONSTANT, "quantization scale (fixed, as "
                                  "PyTorch's observers keep it; list it in 'trainable' to learn "
                                  "it)"))
        elif kind is None and t.name in frozen_bn:
            rows.append(ParamInfo(t.name, shape, CONSTANT, "a frozen BatchNorm's buffer (its "
                                  "running statistics feed no BatchNormalization: "
                                  "FrozenBatchNorm2d, whose weight and bias are buffers too; "
                                  "list it in 'trainable' to train it)"))
        elif keras and _KERAS_PREPROCESSING.search(t.name):
            rows.append(ParamInfo(t.name, shape, CONSTANT, "a Keras Normalization or Rescaling "
                                  "layer's constant (Keras never trains them; list it in "
                                  "'trainable' to train it)"))
        elif t.name in masks and (fill := _additive_mask(t)) is not None:
            rows.append(ParamInfo(t.name, shape, CONSTANT, "an additive attention mask (only 0 "
                                  f"and {fill:g}; list it in 'trainable' to train it)"))
        elif (size == 1 and kind != "PARAMETER" and not _MODULE_PARAMETER.match(t.name)
              and t.name not in single_out and t.name not in aliases
              and t.name not in slopes):  # (a view of a
            # parameter the export folded, PReLU()'s one slope as [1, 1], is that parameter)
            rows.append(ParamInfo(t.name, shape, CONSTANT, "one-element constant of the graph "
                                  "(an epsilon, exponent or scale; list it in 'trainable' to "
                                  "train it)"))
        else:
            rows.append(ParamInfo(t.name, shape, PARAMETER, alias=aliases.get(t.name, "")))
    return rows


def single_output_biases(model: onnx.ModelProto) -> set[str]:
    """One-element initializers (of rank 1 or more) that are the bias of a layer with one
    output feature, whatever their name: Gemm's C where B (an initializer) has one output
    column, or the other operand of an Add of MatMul(x, W) where W (an initializer) has one
    column. jax2onnx names a Linear(16, 1)'s bias `const_3`, skl2onnx a one-output MLP's last
    intercept `intercepts1`: the one-element rule would leave them out as constants."""
    g = model.graph
    inits = {t.name: tuple(t.dims) for t in g.initializer}
    one = {n for n, d in inits.items() if d and int(np.prod(d)) == 1}
    if not one:
        return set()
    single: set[str] = set()  # outputs of one-column products
    found: set[str] = set()
    for n in g.node:
        if n.op_type == "MatMul" and len(inits.get(n.input[1], ())) == 2 \
                and inits[n.input[1]][1] == 1:
            single.add(n.output[0])
        elif n.op_type == "Gemm" and len(inits.get(n.input[1], ())) == 2:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            if inits[n.input[1]][0 if trans_b else 1] == 1:
                single.add(n.output[0])
                if len(n.input) > 2 and n.input[2] in one:
                    found.add(n.input[2])
    for n in g.node:
        if n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            if a in single and b in one:
                found.add(b)
            elif b in single and a in one:
                found.add(a)
    return found


def mask_candidates(model: onnx.ModelProto) -> set[str]:
    """Float initializers that may be additive masks (`_additive_mask`), from the structure
    alone: not a parameter by the export's signature, read only by Add, Where or Expand (T5's
    causal mask is expanded to the batch before it is added). Their values
    are read even where a large model's other tensors are left on disk (memory.strip)."""
    signature = torch_signature(model)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for k, x in enumerate(n.input):
            readers.setdefault(x, []).append((n, k))

    def added(name: str, depth: int = 0) -> bool:
        # read by Add or Where only, directly or through ops that take part of it or move it
        # as their data input (TorchScript's nanoGPT-style `mask[:t, :t]`: a Slice first)
        uses = readers.get(name)
        if not uses or depth > 8:
            return False
        return all(n.op_type in ("Add", "Where") or (
            n.op_type in _MASK_MOVES and k == 0 and all(added(o, depth + 1) for o in n.output))
            for n, k in uses)
    out = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES
           and signature.get(t.name) != "PARAMETER" and added(t.name)}
    added = None  # (a recursive closure's own cell held it: a cycle with the model's nodes)
    return out


# ops that pass on part of an additive mask, or the mask moved or cast (T5's causal mask is
# expanded to the batch before it is added)
_MASK_MOVES = ("Expand", "Slice", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Cast",
               "Identity")


def _additive_mask(t: onnx.TensorProto) -> float | None:
    """The fill of a float tensor that holds only zeros and one value of at most -100 (a
    shifted-window mask of -100, a causal mask of -inf or the dtype's minimum, added to
    attention scores), else None. Exporters fold such masks from buffers into initializers
    (timm's swin: `unsqueeze_3`); no parameter starts out that way."""

    if int(np.prod(t.dims)) < 2 or values_unknown(t):
        return None  # (a value left on disk: `mask_candidates` are read)
    a = tensor_value(t)
    low = a.min()
    if not (low <= -100 and a.max() == 0):
        return None
    return float(low) if ((a == 0) | (a == low)).all() else None


def fixed_floats(model: onnx.ModelProto, trainable="all") -> set[str]:
    """Float initializers that training does not change, known from the graph before the
    training graph exists, so that they may decide control flow and fold into constants:
    those no gradient can reach (every node reads them in a non-differentiable slot and no
    subgraph reads them), and the one-element constants the default rules leave out (tf2onnx's
    while loops start on `Less(0.0, 12.0)` of two float initializers, and expand the same 0.0
    into the first hidden state), unless a `trainable` glob names them."""
    from trainer.executor import outer_names, subgraphs

    g = model.graph
    signature = torch_signature(model)
    globs = [] if trainable in ("all", None) else [p for p in trainable if p != "all"]
    reachable: set[str] = set()
    for node in g.node:
        slots = set(differentiable_inputs(node.op_type, len(node.input), node.domain))
        reachable.update(x for i, x in enumerate(node.input) if i in slots)
        for _, graphs in subgraphs(node):
            for sub in graphs:
                reachable |= outer_names(sub)
    out = set()
    inits = {t.name for t in g.initializer}
    slopes = prelu_slopes(model)
    for t in g.initializer:
        if t.data_type not in FLOAT_TYPES or any(glob_match(t.name, p, inits) for p in globs):
            continue
        one = int(np.prod(t.dims)) == 1 and signature.get(t.name) != "PARAMETER" and \
            not _MODULE_PARAMETER.match(t.name) and t.name not in slopes
        if one or t.name not in reachable:
            out.add(t.name)
    return out


def prelu_slopes(model: onnx.ModelProto) -> set[str]:
    """The slopes PRelu nodes read: learned, one element or many (nn.PReLU()'s single slope,
    which TorchScript's constant folding names `onnx::PRelu_12`, [1, 1, 1])."""
    return {n.input[1] for n in model.graph.node
            if n.op_type == "PRelu" and n.domain in ("", "ai.onnx") and len(n.input) > 1}


def frozen_batchnorm_buffers(model: onnx.ModelProto, stats: set[str]) -> set[str]:
    """The buffers of frozen BatchNorm modules (torchvision's FrozenBatchNorm2d, in detection
    backbones and DETR's): a module whose `running_mean` and `running_var` feed no
    BatchNormalization (`stats`) but arithmetic, as TorchScript exports it, with its `weight`
    and `bias` (buffers too). Without an export signature they look like parameters, and
    training them moves statistics PyTorch keeps (a running variance can go negative)."""
    names = {t.name for t in model.graph.initializer}
    out: set[str] = set()
    for name in names:
        if not name.endswith(".running_mean"):
            continue
        module = name[:-len(".running_mean")]
        four = {f"{module}.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var")}
        if f"{module}.running_var" in names and not four & stats:
            out |= four & names
    return out


_KERAS_PRODUCERS = ("tf2onnx", "keras2onnx")
# A tensor in the scope of a Keras Normalization or Rescaling layer (default names
# `normalization_1`, `rescaling`): input preprocessing that tf2onnx writes as an Add and a Mul
# which look like any bias and scale (EfficientNet's `.../normalization_1/truediv_recip:0`).
_KERAS_PREPROCESSING = re.compile(r"(^|/)(normalization|rescaling)(_\d+)*/")


def shared_constants(model: onnx.ModelProto, trained: Iterable[str]) -> list[str]:
    """Trained tensors of more than one element whose values are all equal (a fresh model's
    LayerNorm ones, zero biases) that two or more nodes read: an exporter's optimizer or a
    later tool (onnxsim, onnxoptimizer, onnxruntime's optimizers, the version converter)
    stores equal tensors once, so the layers that PyTorch trains apart share one tensor. The
    default exporter's records let `repair_exported_model` give each its own again; those
    left (the records gone, or a TorchScript export) are listed as 'name (all 1, read by k
    nodes)'. A tensor that a model shares on purpose (tied embeddings, ALBERT's layers) holds
    trained values, not a constant; one the export's signature names a parameter is one in
    PyTorch too (a module used twice)."""

    signature = torch_signature(model)

    readers: dict[str, set[int]] = {}
    for i, n in enumerate(model.graph.node):
        for x in n.input:
            readers.setdefault(x, set()).add(i)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for name in trained:
        t = inits.get(name)
        k = len(readers.get(name, ()))
        if t is None or k < 2 or int(np.prod(t.dims)) < 2 or signature.get(name) == "PARAMETER":
            continue
        if values_unknown(t):  # (values not read: the pre-flight's
            continue  # stripped structure, external data left on disk)
        nodes = [model.graph.node[i] for i in sorted(readers[name])]
        layers = _layers_sharing(nodes, name)
        if layers:  # (tf2onnx stores a fresh Keras LSTM's bias, 0s and 1s, once for all)
            out.append(f"{name} (read by {k} {layers} layers, each with weights of its own)")
            continue
        a = tensor_value(t)
        if a.size and (a == a.flat[0]).all() and not _disjoint_slices(model, a.shape, nodes,
                                                                      name):
            out.append(f"{name} (all {a.flat[0]:g}, read by {k} nodes)")
    return out


# layer ops whose input 1 is the layer's weight, and the later inputs that belong to the layer
_LAYER_SLOTS = {"LSTM": (3, 5, 6, 7), "GRU": (3, 5), "RNN": (3, 5), "Conv": (2,),
                "ConvTranspose": (2,), "Gemm": (2,), "LayerNormalization": (2,),
                "BatchNormalization": (2,), "InstanceNormalization": (2,)}


def _layers_sharing(nodes: list, name: str) -> str:
    """The op type where every reader of `name` is a layer of it that reads `name` as the
    same later input (a bias), each layer with a weight (input 1) of its own: equal fresh
    tensors an exporter merged, not a layer used twice (which reads its weight twice too);
    "" otherwise."""
    ops = {n.op_type for n in nodes}
    if len(ops) != 1 or (op := ops.pop()) not in _LAYER_SLOTS or any(
            n.domain not in ("", "ai.onnx") or len(n.input) < 2 for n in nodes):
        return ""
    slots = {tuple(k for k, x in enumerate(n.input) if x == name) for n in nodes}
    if len(slots) != 1 or not set(slots.pop()) <= set(_LAYER_SLOTS[op]):
        return ""
    weights = [n.input[1] for n in nodes]
    return op if len(set(weights)) == len(weights) else ""


def _chained_slices(nodes: list, values: Mapping) -> bool:
    """Slices (opset 10 on) on the same axes, each starting where another ends or at 0, no two
    at one start: [0, a), [a, b), ... (TorchScript's MultiheadAttention cuts its in_proj_bias
    so, at sizes it reads from the inputs' shapes)."""
    if any(len(n.input) < 4 or not n.input[3] or (len(n.input) > 4 and n.input[4])
           for n in nodes):
        return False
    axes = {n.input[3] for n in nodes}
    starts = [n.input[1] for n in nodes]
    ends = {n.input[2] for n in nodes}
    if len(axes) != 1 or len(set(starts)) != len(starts):
        return False

    def zero(x):
        v = values.get(x)
        return v is not None and np.asarray(v).size == 1 and int(np.asarray(v).reshape(-1)[0]) == 0
    return all(zero(x) or x in ends for x in starts) and sum(map(zero, starts)) == 1


def _disjoint_slices(model: onnx.ModelProto, shape: tuple, nodes: list, name: str) -> bool:
    """Whether `nodes` are all Slices of tensor `name` over parts that do not overlap: one
    tensor cut into parts (a cross-attention's in_proj_bias, its query part and its key and
    value part), not equal tensors of several layers stored once."""
    from trainer.autodiff.build import _constant_values
    from trainer.graph import attrs_of

    if not all(n.op_type == "Slice" and n.domain in ("", "ai.onnx") and n.input[0] == name
               for n in nodes):
        return False
    values = None
    boxes = []
    for n in nodes:
        a = attrs_of(n)
        if "starts" in a:  # (opsets 1-9: attributes)
            starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
        else:
            if values is None:
                values = _constant_values(model)
            starts, ends, axes, steps = (
                values.get(n.input[i]) if len(n.input) > i and n.input[i] else None
                for i in (1, 2, 3, 4))
            if starts is None or ends is None:  # (sizes read from shapes: symbolically)
                return _chained_slices(nodes, values)
        starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
        axes = np.arange(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
        if steps is not None and (np.asarray(steps) != 1).any():
            return False
        box = [(0, d) for d in shape]
        for ax, lo, hi in zip(axes, starts, ends, strict=True):
            ax = int(ax) % len(shape)
            lo, hi, _ = slice(int(lo), int(hi)).indices(shape[ax])
            box[ax] = (lo, hi)
        boxes.append(box)
    return all(any(p[1] <= q[0] or q[1] <= p[0] for p, q in zip(b1, b2, strict=True))
               for i, b1 in enumerate(boxes) for b2 in boxes[i + 1:])


def single_bias_masks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{bias initializer: gradient mask} for recurrent layers whose ONNX bias B = [Wb, Rb]
    holds one bias of the source model and zeros. Keras's LSTM and SimpleRNN (and its GRU
    without reset_after, ONNX's linear_before_reset=0) have one bias per gate; tf2onnx writes it
    as Wb, and Rb as zeros. Wb and Rb are added, so they get equal gradients: trained both, the
    bias would move at twice the learning rate, unlike Keras. The mask keeps Rb's gradient, and
    so Rb, at zero. (PyTorch's recurrent layers have both biases: no mask for other producers,
    nor where Rb is not all zeros.)"""

    if model.producer_name not in _KERAS_PRODUCERS:
        return {}
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for n in model.graph.node:
        if (n.op_type not in ("LSTM", "GRU", "RNN") or len(n.input) < 4
                or n.input[3] not in inits):
            continue
        if n.op_type == "GRU" and any(a.name == "linear_before_reset" and a.i for a in
                                      n.attribute):
            continue  # (Keras's reset_after: a recurrent bias of its own)
        b = tensor_value(inits[n.input[3]])
        half = b.shape[-1] // 2
        if b.ndim != 2 or not b[:, half:].size or (b[:, half:] != 0).any():
            continue
        mask = np.ones_like(b)
        mask[:, half:] = 0
        out[n.input[3]] = mask
    return out


# A module parameter's name as PyTorch's exporters keep it ("classifier.bias", "0.weight"):
# a one-element tensor so named is a parameter (a regression head's bias, a PReLU's slope).
_MODULE_PARAMETER = re.compile(r"^[\w.]*\w\.(weight|bias)$")


def glob_match(name: str, pattern: str, exact: Container[str] = ()) -> bool:
    """fnmatch, except that a pattern which is itself one of the `exact` names (a PyTorch name
    with brackets, `fc[0].weight`, which fnmatch reads as a character class matching
    `fc0.weight`) names that one alone."""
    if "[" in pattern and pattern in exact:
        return name == pattern
    return fnmatch.fnmatchcase(name, pattern)


def _exact_names(table: Iterable[ParamInfo]) -> set[str]:
    """Every tensor's name and every PyTorch parameter an alias holds: names a glob may be."""
    out = set()
    for r in table:
        out.add(r.name)
        out.update(alias_names(r.alias))
    return out


def _matches(r: ParamInfo, pattern: str, exact: Container[str] = ()) -> bool:
    """A `trainable`/`frozen` glob names a tensor by its own name or its parameter's."""
    return glob_match(r.name, pattern, exact) or alias_matches(r.alias, pattern, exact)


def select(table: list[ParamInfo], trainable, frozen: Iterable[str] = ()) -> list[str]:
    """The trained names: the default parameters (`trainable: all`) or every float initializer
    matching a `trainable` glob (state excluded; the entry `all` in the list adds the default
    parameters, e.g. [all, "*_scale"]), minus the `frozen` globs."""
    frozen = list(frozen)
    exact = _exact_names(table)

    def hit(r, pattern):
        return _matches(r, pattern, exact)
    if trainable == "all" or trainable is None:
        chosen = [r.name for r in table if r.role == PARAMETER]
    else:
        pool = [r for r in table if r.role != STATE]
        chosen = []
        for pattern in trainable:
            if pattern == "all":
                chosen += [r.name for r in table if r.role == PARAMETER and r.name not in chosen]
                continue
            hits = [r for r in pool if hit(r, pattern)]
            stats = [r.name for r in table if r.role == STATE and hit(r, pattern)]
            if not hits and stats:
                raise ModelError(f"trainable entry '{pattern}' names BatchNormalization running "
                                 f"statistics ({', '.join(stats[:4])}): the forward updates "
                                 "them, they have no gradient; leave them out of trainable")
            if not hits:
                raise ModelError(f"trainable entry '{pattern}' matches no float initializer of "
                                 "the model (available: "
                                 f"{', '.join(r.name for r in pool[:12])})"
                                 + _folded_names_hint(r.name for r in pool)
                                 + _tied_hint(pattern))
            dead = [r for r in hits if r.role == UNUSED and r.name == pattern]
            if dead:
                raise ModelError(f"trainable entry '{pattern}' cannot be trained: "
                                 f"{dead[0].reason}")
            chosen += [r.name for r in hits if r.role != UNUSED and r.name not in chosen]
    for pattern in frozen:
        if not any(hit(r, pattern) for r in table):
            pool = [r for r in table if r.role != STATE]
            raise ModelError(f"frozen entry '{pattern}' matches no float initializer of the "
                             f"model (available: {', '.join(r.name for r in pool[:12])})"
                             + _folded_names_hint(r.name for r in table) + _tied_hint(pattern))
    rows = {r.name: r for r in table}
    return [c for c in chosen if not any(hit(rows[c], p) for p in frozen)]


def _tied_hint(pattern: str) -> str:
    """For a module weight's name that matched nothing: a weight tied to another is stored
    once, under one of its names (TorchScript keeps T5's shared.weight, not lm_head.weight)."""
    if not pattern.endswith(".weight") or any(c in pattern for c in "*?["):
        return ""
    return ("; a weight tied to another (an output projection to its embedding) is stored "
            "once, under one of its names: `onnx-trainer check MODEL` lists them")


def _folded_names_hint(names: Iterable[str]) -> str:
    """For a glob that matched nothing: names like onnx::MatMul_37 are values the TorchScript
    exporter's constant folding made (a transposed weight), which lost the parameter's name."""
    folded = [n for n in names if n.startswith("onnx::")]
    if not folded:
        return ""
    return (f"; {', '.join(folded[:4])}{' ...' if len(folded) > 4 else ''} are tensors the "
            "TorchScript exporter's constant folding made (a weight stored as its transpose "
            "loses its name): export with do_constant_folding=False, or with the default "
            "exporter, to keep PyTorch's names")


def repair_exported_model(model: onnx.ModelProto) -> list[str]:
    """Give the parameters that a PyTorch exporter merged or dropped their own tensors again,
    in place (`untie_identity_aliases`, `restore_optimized_parameters`, `untie_merged_folds`,
    `untie_recurrent_layers`, `untie_merged_computations`), and carry over
    what the export records of nn.Embedding's padding_idx (`mark_padding_indices`); returns
    the names made into initializers. The computation is unchanged: each restored tensor
    holds the value the merged one had (or the zeros a dropped bias had). (Weights that other
    exporters keep in subgraphs or Constant nodes: graph.lift_weights, before lowering.)"""
    restored: list[str] = []
    while True:  # (to a fixed point: a tensor given back can settle an ambiguous match, and
        # building the training graph repairs again, which must find nothing more)
        more = (untie_identity_aliases(model) + restore_optimized_parameters(model)
                + untie_merged_folds(model) + untie_recurrent_layers(model)
                + untie_merged_computations(model) + unshare_plain_norm_constants(model))
        if not more:
            break
        restored += more
    mark_padding_indices(model)
    return restored


# The FX targets of normalization layers, whose weight and bias arguments are None for a layer
# without them (LayerNorm(elementwise_affine=False), InstanceNorm2d(affine=False))
_NORM_TARGET = re.compile(r"target=torch\.ops\.aten\.(native_)?(layer|instance|group|rms)_norm"
                          r"\.default\]")


def unshare_plain_norm_constants(model: onnx.ModelProto) -> list[str]:
    """Give each normalization node of a default export whose FX node read no parameter or
    buffer (a layer without weight and bias) its own fixed copy of every parameter's tensor it
    reads, in place; returns the names made. The exporter's optimizer stores the plain layer's
    scale of ones and bias of zeros once with another layer's fresh weight and bias of the same
    values (a LayerNorm(d) next to a LayerNorm(d, elementwise_affine=False)), and training
    would move that parameter through both layers, where PyTorch's plain layer stays fixed.
    The copies (`{node}/input{slot}`) are constants of the export: no parameter of the
    signature."""
    from onnx import numpy_helper

    entries = signature_entries(model)
    params = {target: ph for ph, (kind, target) in entries.items()
              if kind in ("PARAMETER", "BUFFER")}
    if not params:
        return []
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    placeholders = set(params.values())
    plain = [n for n in g.node if _NORM_TARGET.search(_meta(n, _FX_NODE_KEY))
             and not _fx_reads(n) & placeholders]
    if not plain:
        return []
    # (a parameter's tensor, or a view of one that trains as it: GroupNorm's [C, 1, 1] weight)
    held = set(params) | set(parameter_aliases(model))
    made: list[str] = []
    for n in plain:
        for slot in range(1, len(n.input)):
            x = n.input[slot]
            if x not in held or x not in inits:
                continue
            name = f"{n.name or n.output[0]}/input{slot}"
            if name not in inits:
                g.initializer.append(numpy_helper.from_array(
                    np.array(tensor_value(inits[x])), name))
                inits[name] = g.initializer[-1]
                made.append(name)
            n.input[slot] = name
    return made


_EMBEDDING = re.compile(r"aten\.embedding\.default\]\(args = \(%\w+, %\w+, (-?\d+)")


_DETACH_NODE = re.compile(r"target=torch\.ops\.aten\.detach\.default\]")
_DETACHED = re.compile(r"^detach(_\d+)?$")


def detached_inputs(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(node index, input slot) of the main graph's inputs that PyTorch's `.detach()` cut from
    the gradient (RAFT detaches its flow between refinement steps). ONNX has no such op: the
    default exporter writes an Identity whose FX node is `aten.detach` (slot 0 of that
    Identity), which its optimizer removes, leaving a node whose FX node reads `%detach_k`, a
    value no longer in the graph: the slots of that node (or of the other nodes of its FX node)
    reading a value that is not a constant, not one its FX node names, and not made by its own
    FX node, where there are as many such values as detached ones (otherwise: unclear, none).
    A TorchScript export keeps no trace of a detach."""
    g = model.graph
    consts = {t.name for t in g.initializer} | {
        o for n in g.node if n.op_type == "Constant" for o in n.output}
    present = consts | {o for n in g.node for o in n.output} | {vi.name for vi in g.input}
    fx = [_meta(n, _FX_NODE_KEY) for n in g.node]
    made_by = {o: fx[i] for i, n in enumerate(g.node) for o in n.output}
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(fx):
        if text:
            groups.setdefault(text, []).append(i)
    out: list[tuple[int, int]] = []
    for text, members in groups.items():
        if _DETACH_NODE.search(text):
            out += [(i, 0) for i in members if g.node[i].op_type == "Identity"]
            continue
        refs = set(re.findall(r"%(\w+)", text))
        gone = {r for r in refs if _DETACHED.match(r) and r not in present}
        if not gone:
            continue
        args = _fx_value_args(text)
        if len(members) == 1 and args is not None and \
                len(args) == len(g.node[members[0]].input):
            # one node of the FX node's values in its order: the detached ones by position
            # (h.detach() + h reads one value twice, detached once: by name, no slot is left)
            out += [(members[0], k) for k, a in enumerate(args) if a in gone]
            continue
        slots = [(i, k) for i in members for k, x in enumerate(g.node[i].input)
                 if x and x not in consts and x not in refs and made_by.get(x) != text]
        if len({g.node[i].input[k] for i, k in slots}) == len(gone):
            out += slots
    return sorted(out)


def _fx_value_args(text: str) -> list[str] | None:
    """The positional arguments of an FX node's text (`...](args = (%a, %b), kwargs = {})`)
    where every one is a value (`%name`): their names in order; None otherwise."""
    m = re.search(r"\]\(args = \((.*?)\), kwargs = ", text)
    if m is None:
        return None
    parts = [p.strip() for p in m.group(1).split(",")]
    parts = parts[:-1] if parts and parts[-1] == "" else parts  # ("(%x,)")
    if not parts or not all(re.fullmatch(r"%\w+", p) for p in parts):
        return None
    return [p[1:] for p in parts]


def stop_detached(model: onnx.ModelProto) -> list[str]:
    """Put PyTorch's `.detach()` back into the training graph, in place: each value found by
    `detached_inputs` is read through an ai.onnx_trainer StopGradient node (the identity,
    which passes no gradient back); returns the detached values' names. For the training
    graph only: the exported model keeps its own nodes."""
    from trainer.graph import NameScope, all_names
    from trainer.kernels import CUSTOM_DOMAIN

    found = detached_inputs(model)
    if not found:
        return []
    g = model.graph
    scope = NameScope(all_names(g))
    nodes = list(g.node)
    stops: dict[str, str] = {}
    before: dict[int, list[onnx.NodeProto]] = {}
    names = []
    for i, k in found:
        n = nodes[i]
        x = n.input[k]
        names.append(x)
        if n.op_type == "Identity" and _DETACH_NODE.search(_meta(n, _FX_NODE_KEY)):
            n.op_type, n.domain = "StopGradient", CUSTOM_DOMAIN
            continue
        if x not in stops:
            stops[x] = scope.fresh(f"{x}_detached")
            before.setdefault(i, []).append(onnx.helper.make_node(
                "StopGradient", [x], [stops[x]], domain=CUSTOM_DOMAIN,
                name=scope.fresh(f"{x}_detach")))
        n.input[k] = stops[x]
    del g.node[:]
    for i, n in enumerate(nodes):
        g.node.extend(before.get(i, []))
        g.node.append(n)
    if not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CUSTOM_DOMAIN, 1))
    return list(dict.fromkeys(names))


def mark_padding_indices(model: onnx.ModelProto) -> list[str]:
    """nn.Embedding(padding_idx=p) never updates row p of its table: PyTorch's embedding
    backward skips the positions holding p. ONNX's Gather has no such attribute, but the
    default exporter records the call in the node's FX node (`aten.embedding(w, ids, p)`);
    each such Gather gets the metadata entry PADDING_KEY = p, which the Gather gradient rule
    honours (set it by hand on any axis-0 Gather to the same effect). In place; returns the
    names of the marked nodes. A TorchScript export does not record padding_idx.
    scale_grad_by_freq=True (nn.Embedding's and nn.EmbeddingBag's fourth argument) marks the
    Gather of the table with FREQ_KEY: the Gather gradient divides each position's gradient
    by its index's count in the batch, as PyTorch's backward does."""
    marked = []
    entries = signature_entries(model)
    for n in model.graph.node:
        if n.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in n.attribute):
            continue
        fx = _meta(n, _FX_NODE_KEY)
        call = re.search(r"aten\.embedding(_bag)?\.\w+\]?\((?:args = \()?([^)]*)\)", fx)
        args = [a.strip() for a in call.group(2).split(",")] if call else []
        # (an EmbeddingBag's decomposition gathers other things too: the table's Gather reads
        # the tensor of the call's first argument)
        table = entries.get(args[0].lstrip("%"), ("", ""))[1] if args else ""
        if args[3:4] == ["True"] and (call.group(1) is None or n.input[0] == table) and \
                not _meta(n, FREQ_KEY):  # (scale_grad_by_freq=True, the fourth argument)
            n.metadata_props.add(key=FREQ_KEY, value="1")
            marked.append(n.name)
        m = _EMBEDDING.search(fx)
        if m is None or int(m.group(1)) < 0 or _meta(n, PADDING_KEY):
            continue
        n.metadata_props.add(key=PADDING_KEY, value=m.group(1))
        marked.append(n.name)
    return marked


def untie_identity_aliases(model: onnx.ModelProto) -> list[str]:
    """The TorchScript exporter stores equal tensors once when the module is exported in eval
    mode (by value; in train mode only tensors that share memory, i.e. tied ones): a fresh
    model's BatchNorm and LayerNorm weights (ones), biases and running means (zeros), running
    variances (ones), and zero-initialized Conv or Linear biases become Identity nodes of one
    shared initializer, which would train them as one tensor; so do the weights of layers
    that start as clones (nn.TransformerEncoder copies its layer). Each such Identity of a
    shared initializer (read more than once) becomes an initializer of that name with the
    shared value when its output feeds only normalization parameter slots, or the value is
    one number repeated, or the output is read only in roles (op, input slot) in which the
    shared tensor itself is read (a clone's); nothing tells a merge by value from a tie by
    memory, and these are the merges. Other aliases stay shared: tied weights read in another
    role (an embedding's table as an output projection). Identities inside subgraphs count
    too (optimum's merged decoders alias shared tensors in both branches of their If): such an
    alias becomes an initializer of the main graph, which the branches read from outside,
    where every definition of its name is an Identity of the same tensor."""
    from onnx import numpy_helper

    from trainer.graph import _subgraphs_of

    g = model.graph
    graphs = [g, *_subgraphs_of(g)] if model.ir_version >= 4 else [g]
    inits = {t.name: t for t in g.initializer}
    slots = {"BatchNormalization": (1, 2, 3, 4), "LayerNormalization": (1, 2),
             "GroupNormalization": (1, 2), "InstanceNormalization": (1, 2),
             "RMSNormalization": (1,)}
    users: dict[str, list[bool]] = {}
    reads: dict[str, int] = {}
    roles: dict[str, set[tuple[str, int]]] = {}  # (op, input slot) of each reader
    defined: dict[str, list] = {}  # name -> the nodes (or None: not a node) defining it
    for gr in graphs:
        for t in list(gr.initializer) + list(gr.input):
            if gr is not g or t.name not in inits:
                defined.setdefault(t.name, []).append(None)
        for n in gr.node:
            for o in n.output:
                defined.setdefault(o, []).append(n)
            for i, x in enumerate(n.input):
                users.setdefault(x, []).append(i in slots.get(n.op_type, ()))
                reads[x] = reads.get(x, 0) + 1
                if n.op_type != "Identity":
                    roles.setdefault(x, set()).add((n.op_type, i))
    outputs = {o.name for gr in graphs for o in gr.output}
    untied, drop = [], set()
    for gr in graphs:
        for n in gr.node:
            src = n.input[0] if n.op_type == "Identity" and n.input else None
            if src not in inits or inits[src].data_type not in FLOAT_TYPES or reads[src] < 2:
                continue
            out = n.output[0]
            if out in outputs or not users.get(out) or any(
                    d is None or d.op_type != "Identity" or list(d.input) != [src]
                    for d in defined[out]):
                continue
            if gr is not g and src in {t.name for t in gr.initializer} | {
                    v.name for v in gr.input}:  # (a name of the subgraph's own)
                continue
            # (a stub, the memory estimate's stripped model: no values, taken as not uniform)
            stub = values_unknown(inits[src])
            value = None if stub else tensor_value(inits[src])
            if not (all(users[out]) or (value is not None and value.size > 1
                                        and (value == value.flat[0]).all())
                    or roles.get(out, {None}) <= roles.get(src, set())):
                continue
            if out not in untied:
                if stub:
                    t = g.initializer.add()
                    t.CopyFrom(inits[src])
                    t.name = out
                else:
                    g.initializer.append(numpy_helper.from_array(np.array(value), out))
                untied.append(out)
            drop.add(id(n))
    for gr in graphs:
        keep = [n for n in gr.node if id(n) not in drop]
        if len(keep) != len(gr.node):
            del gr.node[:]
            gr.node.extend(keep)
    return untied


_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"
# onnxscript's rules that drop an all-zero bias: (op, the bias's input slot)
_DROPPED_BIAS = {"RemoveOptionalBiasFromConv": ("Conv", 2),
                 "RemoveOptionalBiasFromConvTranspose": ("ConvTranspose", 2),
                 "RemoveOptionalBiasFromGemm": ("Gemm", 2)}
# onnxscript's rules that fold a BatchNormalization into the Conv or Gemm before it
_FUSED_BN = frozenset({"FuseBatchNormIntoConv", "FuseBatchNormIntoConvTranspose",
                       "FuseBatchNormIntoGemm"})


def _rules(n: onnx.NodeProto) -> set[str]:
    """The optimizer's rules that rewrote node n (the metadata lists them, comma-separated)."""
    return {r.strip() for r in _meta(n, _RULE_KEY).split(",") if r.strip()}


# The PyTorch parameter each input slot of these ops holds, by its name's last part
_SLOT_LEAF = {(op, slot): leaf for op in ("LayerNormalization", "BatchNormalization",
                                          "InstanceNormalization", "GroupNormalization",
                                          "RMSNormalization", "Conv", "ConvTranspose", "Gemm")
              for slot, leaf in ((1, "weight"), (2, "bias"))}


def restore_optimized_parameters(model: onnx.ModelProto) -> list[str]:
    """Undo what the optimizer of PyTorch's default (dynamo) exporter does to the parameters of
    a freshly initialized model, where the export records enough to do it exactly; in place,
    returns the restored names.

    The optimizer (on by default: `torch.onnx.export(..., optimize=True)`) stores initializers
    with equal values once (so every LayerNorm of a fresh transformer reads one weight of ones
    and one bias of zeros) and drops all-zero biases from Conv, ConvTranspose and Gemm (an
    attention output projection's, a zero-initialized layer's). PyTorch trains each of them.
    The export's graph signature lists every parameter and buffer (placeholder -> name) and
    each node records the FX node it came from, with the placeholders it read:
    - a node that reads parameter A's tensor where its FX node read placeholder B, whose
      parameter is missing from the graph, reads a new initializer B with A's value (B chosen
      by the last part of the name when the node read several missing ones: weight, bias);
    - a node rewritten by a RemoveOptionalBias rule whose FX node read a missing parameter
      named ...bias gets it back: zeros of the output channels, in the weight's dtype;
    - a node that a FuseBatchNormInto* rule rewrote and a RemoveOptionalBias rule left without
      a bias gets the bias the fold made (the BatchNormalization's shift, zero in a fresh
      model) back under the fold's name, `{weight}_bias`, as a trained model's export has it.
    A model without the signature or without FX node records is left as it is."""
    from onnx import numpy_helper

    g = model.graph
    entries = {ph: target for ph, (kind, target) in signature_entries(model).items()
               if kind in ("PARAMETER", "BUFFER")}
    inits = {t.name: t for t in g.initializer}
    present = set(inits) | {vi.name for vi in g.input} | {o for n in g.node for o in n.output}
    missing = {ph: t for ph, t in entries.items() if t not in present}
    if not missing:
        return []
    placeholder_of = {t: ph for ph, t in entries.items()}
    restored: list[str] = []

    def leaf(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    def add(name: str, value: np.ndarray) -> None:
        g.initializer.append(numpy_helper.from_array(value, name))
        inits[name] = g.initializer[-1]
        restored.append(name)

    def zero_bias(n: onnx.NodeProto, name: str) -> None:
        w = inits[n.input[1]]
        dims = list(w.dims)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv":
            channels = dims[0]
        elif n.op_type == "ConvTranspose":
            channels = dims[1] * int(attrs.get("group", 1))
        else:
            channels = dims[0] if attrs.get("transB", 0) else dims[1]
        if name not in inits:
            add(name, np.zeros(channels, onnx.helper.tensor_dtype_to_np_dtype(w.data_type)))
        n.input.append(name)

    for n in g.node:
        refs = _fx_reads(n)
        here = sorted(ph for ph in refs if ph in missing)
        op_slot = next((_DROPPED_BIAS[r] for r in _rules(n) if r in _DROPPED_BIAS), None)
        if (_rules(n) & _FUSED_BN and op_slot == (n.op_type, len(n.input))
                and n.input[1] in inits):
            # A folded BatchNormalization's shift becomes the bias (named `{weight}_bias`);
            # a fresh one's is zero, which the optimizer then drops: the shift trains there.
            zero_bias(n, f"{n.input[1]}_bias")
            continue
        if not here or _rules(n) & _FUSED_BN:
            continue  # (a folded BatchNormalization's tensors are gone: fused_batchnorms)
        for slot, x in enumerate(n.input):
            own = placeholder_of.get(x)
            if x not in inits or own is None or own in refs:
                continue  # not a parameter's tensor, or the one this node read
            cands = [ph for ph in here if leaf(missing[ph]) == leaf(x)]
            if len(cands) != 1:  # (else by the slot's role: a LayerNorm reads `gain` and
                # `off` of `ln(h) * gain + off` in place of its own weight and bias)
                role = _SLOT_LEAF.get((n.op_type, slot))
                cands = [ph for ph in here if leaf(missing[ph]) == role]
            if len(cands) != 1:
                cands = here if len(here) == 1 else []
            if cands:
                name = missing[cands[0]]
                if name not in inits:
                    add(name, np.array(tensor_value(inits[x])))
                n.input[slot] = name
        if op_slot is None or op_slot != (n.op_type, len(n.input)) or n.input[1] not in inits:
            continue
        cands = [ph for ph in here if leaf(missing[ph]).endswith("bias")
                 and missing[ph] not in inits]
        if len(cands) == 1:
            zero_bias(n, missing[cands[0]])
    # A node the export recorded no FX node for (the Split of a cross-attention's packed
    # in_proj_bias into its query and key/value parts, in nn.TransformerDecoderLayer) reading
    # the tensor of another module's equal parameter: where every reader of its outputs comes
    # from one module whose parameter of that name is missing, it reads that one again.
    # The optimizer also merges such equal nodes (a stack of decoder layers: one Split for
    # every layer's cross-attention): each module reading it gets its own copy of the node.
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    nodes = list(g.node)
    for n in nodes:
        if (_meta(n, _FX_NODE_KEY) or len(n.input) < 1 or _meta(n, _LOWERED_KEY)
                or _meta(n, _TIED_KEY)):
            continue  # (a node of ours, lowered from an onnxruntime fused one, or the view of
            # a tied copy: no exporter's; repaired again, a tie read as such a node was undone)
        slot, x = next(((k, x) for k, x in enumerate(n.input)
                        if x in inits and x in placeholder_of), (None, None))
        if x is None:
            continue
        by_module: dict[str, list[onnx.NodeProto]] = {}
        for o in n.output:
            for c in consumers.get(o, []):
                by_module.setdefault(_module_of(c), []).append(c)
        if None in by_module:
            continue
        for module, readers in by_module.items():
            name = f"{module}.{leaf(x)}"
            if name == x or name not in missing.values() or name in inits:
                continue
            add(name, np.array(tensor_value(inits[x])))
            if len(by_module) == 1:  # (the node is this module's alone)
                n.input[slot] = name
                continue
            twin = copy.deepcopy(n)
            twin.input[slot] = name
            renamed = {o: f"{o}/{module}" for o in n.output if o}
            del twin.output[:]
            twin.output.extend(renamed.get(o, o) for o in n.output)
            twin.name = f"{n.name}/{module}" if n.name else ""
            g.node.insert(list(g.node).index(n) + 1, twin)
            for c in {id(c): c for c in readers}.values():
                for k, y in enumerate(c.input):
                    if y in renamed:
                        c.input[k] = renamed[y]
    # A parameter folded into another layout (a transposed Linear weight) is a tensor the
    # signature does not name; equal folded tensors (the layers of nn.TransformerEncoder start
    # as clones) are merged too: each further parameter reading it gets its own copy.
    missing = {ph: t for ph, t in missing.items() if t not in inits}
    readers: dict[str, list[tuple[onnx.NodeProto, int, list[str]]]] = {}
    for n in g.node:
        refs = _fx_reads(n)
        here = [] if _rules(n) & _FUSED_BN else sorted(ph for ph in refs if ph in missing)
        for slot, x in enumerate(n.input):
            if x in inits and x not in placeholder_of and inits[x].data_type in FLOAT_TYPES:
                readers.setdefault(x, []).append((n, slot, here))
    for x, reads in readers.items():
        groups: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n, slot, here in reads:
            ph = _pick_missing(n, here, missing)
            if ph is None:  # not a parameter's (no missing one read), or ambiguous
                groups = {}
                break
            groups.setdefault(ph, []).append((n, slot))
        for ph in list(groups)[1:]:
            name = f"{missing[ph]}/{x}"  # (the parameter, in the folded tensor's layout)
            add(name, np.array(tensor_value(inits[x])))
            for n, slot in groups[ph]:
                n.input[slot] = name
    return restored


_RNN_PARAM = re.compile(r"^(.*)\.(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
_RNN_SLOTS = {1: ("weight", "ih"), 2: ("weight", "hh"), 3: ("bias", None)}  # W, R, B


def recurrent_slots(model: onnx.ModelProto) -> dict[tuple[int, int], list[str]]:
    """{(node index, input slot): the PyTorch parameters that slot packs} for the LSTM, GRU
    and RNN nodes of a default export: W holds `weight_ih_l{k}`, R `weight_hh_l{k}`, B both
    biases (`_reverse` too where bidirectional), each reordered into ONNX's gate layout. One
    `nn.LSTM(num_layers=L)` is one FX node that becomes L ONNX nodes, layer k the k-th of them
    in graph order. Empty without FX node records."""
    entries = signature_entries(model)
    if not entries:
        return {}
    seen: dict[str, int] = {}
    out: dict[tuple[int, int], list[str]] = {}
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("LSTM", "GRU", "RNN") or not _meta(n, _FX_NODE_KEY):
            continue
        fx = _meta(n, _FX_NODE_KEY)
        k = seen[fx] = seen.get(fx, -1) + 1
        params = [m for m in (_RNN_PARAM.match(entries[ph][1]) for ph in _fx_reads(n)
                              if ph in entries and entries[ph][0] == "PARAMETER") if m]
        for slot, (kind, side) in _RNN_SLOTS.items():
            names = sorted(m.group(0) for m in params if m.group(2) == kind
                           and (side is None or m.group(3) == side) and int(m.group(4)) == k)
            if names and slot < len(n.input) and n.input[slot]:
                out[(i, slot)] = names
    return out


def untie_recurrent_layers(model: onnx.ModelProto) -> list[str]:
    """The default exporter's optimizer stores equal tensors once, also across the layers of a
    stacked recurrent layer (`nn.LSTM(num_layers=2)` with zero-initialized biases: both
    layers' B is one tensor), where PyTorch trains each layer's. A node reading, in its W, R
    or B slot, a tensor that the optimizer's records say it folded from another layer's
    parameters reads a copy named after its own (`{parameter}/{tensor}`, recorded as folded
    from them, so that globs may name it), in place; returns the names made."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    sources = _folded_from(model)
    made: list[str] = []
    for (i, slot), want in recurrent_slots(model).items():
        n = g.node[i]
        x = n.input[slot]
        if x not in inits or x not in sources:
            continue
        holds = sorted({y for y in sources[x] if _RNN_PARAM.match(y)})
        if not holds or holds == want:
            continue
        name = f"{want[0]}/{x}"
        if name not in inits:
            t = numpy_helper.from_array(np.array(tensor_value(inits[x])), name)
            entry = t.metadata_props.add()
            entry.key, entry.value = _FOLDED_FROM_KEY, repr(want)
            g.initializer.append(t)
            inits[name] = g.initializer[-1]
            made.append(name)
        n.input[slot] = name
    return made


def untie_merged_computations(model: onnx.ModelProto) -> list[str]:
    """The default exporter's optimizer merges equal computations: a fresh GPT-NeoX block's
    two LayerNorms of one input (equal ones and zeros) become one node, which both branches
    read, and the second module's parameters leave the graph. PyTorch trains both. A node
    reading a value where its FX node read a merged one (`%layer_norm_1`, which no node
    computes) of the same FX op as that value's producer (`%layer_norm`) reads a copy of the
    producer again, with the parameters of the one module that (a) the producer's parameters'
    module shares its parent with, (b) has the same parameter names and (c) has no node left;
    their values are the producer's (equal, or they would not have been merged). In place;
    returns the parameters made. Nothing where any of that is ambiguous."""
    g = model.graph
    vanished = set(merged_computations(model))
    entries = signature_entries(model)
    if not vanished or not entries:
        return []
    inits = {t.name: t for t in g.initializer}
    present = set(inits) | {vi.name for vi in g.input} | {o for n in g.node for o in n.output}
    placeholder = {t: ph for ph, (kind, t) in entries.items() if kind == "PARAMETER"}
    lost: dict[str, dict[str, str]] = {}  # module -> {leaf: parameter} of missing parameters
    for t in placeholder:
        if t not in present:
            module, _, leaf = t.rpartition(".")
            lost.setdefault(module, {})[leaf] = t
    used: set[str] = set()
    for n in g.node:
        used.update(re.findall(r"'([^']*)'", _meta(n, _SCOPES_KEY))[:-1])
    producer = {o: n for n in g.node for o in n.output}
    twins: dict[tuple[int, str], onnx.NodeProto | None] = {}
    made: list[str] = []
    for c in list(g.node):
        reads = _fx_reads(c)
        for slot, x in enumerate(c.input):
            n = producer.get(x)
            own = _FX_OWN.match(_meta(n, _FX_NODE_KEY)) if n is not None else None
            if own is None or own.group(1) in reads:
                continue
            op = _FX_NUMBER.sub("", own.group(1))
            merged = [v for v in reads & vanished if _FX_NUMBER.sub("", v) == op]
            if len(merged) != 1:
                continue
            key = (id(n), merged[0])
            if key not in twins:
                twins[key] = _twin(g, n, own.group(1), merged[0], inits, placeholder, lost, used)
                if twins[key] is not None:
                    made += [y for y in twins[key].input if y in inits and y not in made
                             and y in placeholder and y not in present]
            twin = twins[key]
            if twin is not None:
                c.input[slot] = twin.output[list(n.output).index(x)]
    return made


def _twin(g: onnx.GraphProto, n: onnx.NodeProto, name: str, merged: str, inits: dict,
          placeholder: Mapping[str, str], lost: dict[str, dict[str, str]], used: set[str]
          ) -> onnx.NodeProto | None:
    """untie_merged_computations: node n's copy computing `merged` with the one lost module's
    parameters (new initializers holding n's values), inserted after n; None if ambiguous."""
    from onnx import numpy_helper

    slots = {k: y for k, y in enumerate(n.input) if y in inits and y in placeholder}
    modules = {y.rpartition(".")[0] for y in slots.values()}
    if not slots or len(modules) != 1:
        return None
    module = modules.pop()
    parent = module.rpartition(".")[0]
    leaves = {y.rpartition(".")[2] for y in slots.values()}
    cands = [m for m, ps in lost.items() if m.rpartition(".")[0] == parent and set(ps) == leaves
             and m not in used and all(p not in inits for p in ps.values())]
    if len(cands) != 1:
        return None
    target = lost[cands[0]]
    twin = copy.deepcopy(n)
    renames = {}
    for k, y in slots.items():
        new = target[y.rpartition(".")[2]]
        g.initializer.append(numpy_helper.from_array(
            np.array(tensor_value(inits[y])), new))
        inits[new] = g.initializer[-1]
        twin.input[k] = new
        renames[f"%{placeholder[y]}"] = f"%{placeholder[new]}"
    del twin.output[:]
    twin.output.extend(f"{o}/{merged}" if o else "" for o in n.output)
    twin.name = f"{n.name}/{merged}" if n.name else ""
    renames[f"%{name} "] = f"%{merged} "
    for prop in twin.metadata_props:
        if prop.key == _FX_NODE_KEY:
            for a, b in renames.items():
                prop.value = re.sub(re.escape(a) + r"\b", b, prop.value)
        elif prop.key == _SCOPES_KEY:
            prop.value = prop.value.replace(f"'{module}'", f"'{cands[0]}'")
    g.node.insert(list(g.node).index(n) + 1, twin)
    return twin


def untie_merged_folds(model: onnx.ModelProto) -> list[str]:
    """The default exporter's constant folding names a folded tensor after the FX node that
    computed it (`view` for `gamma.reshape(1, -1, 1, 1)`, `view_1` for the next block's), and
    its optimizer then stores equal tensors once: the fresh layer-scale parameters of timm's
    convnext (all 1e-6) left 12 folded gammas as 4 tensors, which trained as 4. A node reading
    a folded tensor where its FX node read a value of the same FX op that is not in the graph
    (reads `view` for `%view_1`) of another module than the nodes that read it as `%view`
    reads a copy under that name again, in place; returns the names made. (Within one module
    the two are likely one parameter's view taken twice: they stay one tensor.) Nothing
    without FX node records (TorchScript exports)."""
    from onnx import numpy_helper

    g = model.graph
    named = {t for _, t in signature_entries(model).values()}
    inits = {t.name: t for t in g.initializer}
    present = set(inits) | {vi.name for vi in g.input} | {o for n in g.node for o in n.output}
    owners: dict[str, set[str | None]] = {}  # folded tensor -> modules reading it by its name
    for n in g.node:
        for x in set(n.input) & _fx_reads(n):
            owners.setdefault(x, set()).add(_module_of(n))
    made: list[str] = []
    for n in g.node:
        refs = _fx_reads(n)
        if not refs:
            continue
        for slot, x in enumerate(n.input):
            if (x not in inits or x in named or x in refs
                    or inits[x].data_type not in FLOAT_TYPES
                    or _module_of(n) in owners.get(x, {_module_of(n)})):
                continue
            op = _FX_NUMBER.sub("", x)
            cands = [r for r in refs if r not in present and _FX_NUMBER.sub("", r) == op]
            if len(cands) != 1:
                continue
            if cands[0] not in inits:
                g.initializer.append(numpy_helper.from_array(
                    np.array(tensor_value(inits[x])), cands[0]))
                inits[cands[0]] = g.initializer[-1]
                made.append(cands[0])
            n.input[slot] = cands[0]
    return made


_FX_NUMBER = re.compile(r"_\d+$")  # an FX node's name is its op's, numbered from the second


def _pick_missing(n: onnx.NodeProto, here: list[str], missing: Mapping[str, str]
                  ) -> str | None:
    """The missing parameter (placeholder) that node n's folded input holds, of those its FX
    node read (`here`): the only one, or, of a weight and a bias read together (GroupNorm's
    decomposition: InstanceNormalization, then Mul by the weight and Add of the bias, folded
    into [C, 1, 1] tensors), the weight for a Mul and the bias for an Add; else None."""
    if len(here) == 1:
        return here[0]
    leaves = {missing[ph].rpartition(".")[2]: ph for ph in here}
    if len(here) == 2 and set(leaves) == {"weight", "bias"}:
        return {"Mul": leaves["weight"], "Add": leaves["bias"]}.get(n.op_type)
    return None


def folded_expressions(model: onnx.ModelProto) -> list[str]:
    """Tensors the default exporter's optimizer folded from an expression of PyTorch
    parameters (its `folded_from` record names them; `s.exp()` next to a use of `s` itself,
    `lo + 0.8` next to `lo`), as 'tensor (from p, ...)': training cannot tie them to their
    parameter, so they train as tensors of their own. Views of a parameter (its transpose, a
    reshape: the same values) are not listed (tie_folded_copies and the repair make them
    the parameter again). Empty without a signature."""

    signature = torch_signature(model)
    params = {k for k, v in signature.items() if v == "PARAMETER"}
    if not params:
        return []
    inits = {t.name: t for t in model.graph.initializer}
    folded = _folded_from(model)
    if not any(params & set(names) for names in folded.values()):
        return []
    warned = set(folded_parameters(model))  # (a parameter folded away: warned of as such)
    aliases = parameter_aliases(model)  # (a view that stands for its parameter: trained as it)
    tensor_of = {p: p for p in params if p in inits}
    tensor_of.update((p, a) for a, p in aliases.items() if p not in tensor_of)
    out = []
    for x, names in folded.items():
        t = inits.get(x)
        sources = [p for p in names if p in tensor_of and p not in warned]
        if t is None or x in signature or x in aliases or not sources \
                or t.data_type not in FLOAT_TYPES or values_unknown(t):
            continue
        if len(sources) == 1:
            own = tensor_value(inits[tensor_of[sources[0]]])
            value = tensor_value(t)
            if own.size == value.size and np.array_equal(np.sort(own.ravel()),
                                                         np.sort(value.ravel())):
                continue  # (a view: the parameter's own values)
        out.append(f"{x} (from {', '.join(sources)})")
    return out


def folded_parameters(model: onnx.ModelProto) -> list[str]:
    """PyTorch parameters that the default exporter's constant folding turned into constants
    of something else (`self.logit_scale.exp()`, `self.w * self.w` where the parameter is not
    used otherwise): named a parameter in the export's signature, not in the graph, and read
    by no node's FX node (a parameter folded into a transposed or reshaped copy is still read
    by the nodes that read the copy). Training cannot reach them; empty without a signature.
    Parameters of a module that no node of the graph comes from are not listed (`in_use`
    below): the exported outputs do not use that module (a classifier head left out of a
    detector's export), so PyTorch gives them no gradient either. Nor is any listed where
    nothing was folded (every initializer is one the signature names, as in an export with
    optimize=False), no arithmetic removed (`removed_arithmetic`) and nothing merged
    (`merged_computations`): a missing parameter is then one the exported computation does
    not use (DINOv2's mask_token). Where the optimizer merged equal computations, a module
    whose node went into another's (a fresh GPT-NeoX block's second LayerNorm) has no node
    left: its parameters count as in use where its parent has nodes."""
    from trainer.autodiff.lookups import find_folded_lookups

    g = model.graph
    named = {t for _, t in signature_entries(model).values()}
    if all(t.name in named for t in g.initializer) and not removed_arithmetic(model) \
            and not merged_computations(model):
        return []
    missing, explained, _ = _missing_parameter_uses(model)
    used: set[str] = set()
    for n in g.node:
        used.update(re.findall(r"'([^']*)'", _meta(n, _SCOPES_KEY))[:-1])
    folded = _folded_tensors(g, named)
    reads_folded = {_module_of(n) for n in g.node if any(x in folded for x in n.input)}
    recovered = {lk.source for lk in find_folded_lookups(model).values()}  # table[index]
    # (a parameter the optimizer records as folded into a tensor is in use, wherever it was)
    consumed = {x for names in _folded_from(model).values() for x in names}
    # (where the optimizer merged equal computations, a module whose node went into another's
    # has none left, though it is used: its parent's other modules are)
    merged = bool(merged_computations(model))

    def in_use(name: str) -> bool:
        """Its module has nodes; a parametrization's (weight_norm's original0 under
        `conv.parametrizations.weight`) is its owner's; a module whose only node was folded
        away (an Embedding looked up by computed indices) is read in its parent, which reads
        a folded tensor."""
        module = name.rpartition(".")[0]
        owner = module.split(".parametrizations.")[0]
        parent = module.rpartition(".")[0]
        return (not used or owner in used or name in consumed
                or (parent != "" and parent in reads_folded)
                or (parent != "" and parent in used and merged))
    return sorted(t for ph, t in missing.items()
                  if ph not in explained and t not in recovered and in_use(t))


_ARITHMETIC = re.compile(r"^(mul|add|sub|div)(_\d+)?$")
_FX_OWN = re.compile(r"^%(\w+) :")
_ORIGINAL_NAME_KEY = "pkg.torch.onnx.original_node_name"


def _vanished(model: onnx.ModelProto) -> set[str]:
    """The FX values of a default export that nodes' FX nodes read (or graph outputs are)
    but no node of the graph comes from: removed or merged by the exporter's optimizer (or
    plumbing that has no node: a tuple's getitem, a folded view or constant). Empty without
    FX node records."""
    own: set[str] = set()
    read: set[str] = set()
    for n in model.graph.node:
        record = _meta(n, _FX_NODE_KEY)
        m = _FX_OWN.match(record)
        if m:
            own.add(m.group(1))
        read |= _fx_reads(n)
    for o in model.graph.output:
        read.update(p.value for p in o.metadata_props if p.key == _ORIGINAL_NAME_KEY)
    if not own:
        return set()
    return read - own - set(signature_entries(model)) - {i.name for i in model.graph.input}


def removed_arithmetic(model: onnx.ModelProto) -> list[str]:
    """The FX arithmetic nodes (mul, add, sub, div) of a default export that no node of the
    graph comes from, though a node's FX node read them or a graph output is theirs: the
    exporter's optimizer removed them as doing nothing (a product by a fresh parameter of
    ones, `self.scale * x` with `scale = nn.Parameter(torch.ones(()))`, or a sum with one of
    zeros), and the parameter with them. An unoptimized export translates each into a node.
    Empty without FX node records."""
    return sorted(x for x in _vanished(model) if _ARITHMETIC.match(x))


# FX values that have no node of their own in any export (plumbing), or that the optimizer's
# constant folding absorbs (views and constants); others missing were merged or removed
_PLUMBING = re.compile(r"^(getitem|sym_size_int|zeros|ones|full|arange|empty|scalar_tensor|"
                       r"lift_fresh_copy|_assert\w*)(_\d+)?$")


def merged_computations(model: onnx.ModelProto) -> list[str]:
    """The FX nodes of a default export that the optimizer merged into an equal one or removed
    (what _vanished finds, less plumbing and folded views): `layer_norm_1` of a fresh
    GPT-NeoX block, whose two LayerNorms read one input with equal ones and zeros."""
    return sorted(x for x in _vanished(model) if not _PLUMBING.match(x)
                  and not _VIEW_OPS.match(x))


# FX ops that only view or copy a tensor: a parameter folded through them trains as that copy
_VIEW_OPS = re.compile(r"^(permute|t|transpose|view|_unsafe_view|reshape|unsqueeze|squeeze|"
                       r"expand|clone|alias|contiguous|detach|_to_copy)(_\d+)?$")
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


_FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"
_VALUE_NAME = re.compile(r"^val_\d+$")  # a value inside one FX op's decomposition


_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'" + r'|"((?:[^"\\]|\\.)*)"')


def _string_list(text: str) -> list[str] | None:
    """The strings of a Python list of string literals (`['a', "b"]`), read without Python's
    parser (CPython 3.11's is not thread-safe: ranks run as threads in tests, and a lock here
    did not cover np.load's header parsing in another thread); None for anything else."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        return None
    found, rest = [], body[1:-1]
    for m in _QUOTED.finditer(rest):
        found.append(m.group(1) if m.group(1) is not None else m.group(2))
    if _QUOTED.sub("", rest).replace(",", "").strip():
        return None  # (something besides quoted strings)
    return [re.sub(r"\\(.)", r"\1", x) for x in found]


def _folded_from(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{folded initializer: the values its constant folding consumed}, as onnxscript's optimizer
    (>= 0.5, the default exporter's) records them in the value's metadata; empty without."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    out: dict[str, list[str]] = {}
    for holder in (*g.value_info, *g.initializer):
        text = next((p.value for p in holder.metadata_props if p.key == _FOLDED_FROM_KEY), None)
        if holder.name not in inits or text is None:
            continue
        names = _string_list(text)
        if names is not None:
            out[holder.name] = names
    return out


def folded_views(model: onnx.ModelProto) -> dict[str, str | None]:
    """{folded initializer: the parameter it is a view of, or None for any other expression}
    for the tensors whose origin the default exporter's optimizer recorded (onnxscript >= 0.5
    writes `folded_from`, every value the constant folding consumed, on the value's metadata).
    A view (`w.unsqueeze(-1)`, `w.t()`, a Linear weight's transpose) was folded from one
    parameter through FX view ops and values inside an op's decomposition (`val_3`) only;
    BiT's `batch_norm(w.reshape(...)).view_as(w)` names `getitem` too: an expression, though
    the tensor is named after its last op (`view_1`). Values the graph still computes at run
    time (a data input, a node's output) were read for their static shape only (Bilinear's
    weight, reshaped to a size taken from its inputs): they are no part of the expression.
    Empty for other exports."""
    entries = signature_entries(model)
    params = {t for kind, t in entries.values() if kind == "PARAMETER"}
    others = {t for kind, t in entries.values() if kind != "PARAMETER"}
    g = model.graph
    inits = {t.name for t in g.initializer}
    live = ({vi.name for vi in g.input} - inits) | {y for n in g.node for y in n.output}
    out: dict[str, str | None] = {}
    for x, names in _folded_from(model).items():
        names = [y for y in names if y not in live]
        sources = [y for y in names if y in params]
        # (the tensor's own name is its last op's: `exp` for `self.logit_scale.exp()`)
        ops = [y for y in (x, *names) if y not in params and y not in others
               and not _VALUE_NAME.match(y)]
        # (`expand` is no view here: its copies of one entry would train apart)
        view = (len(sources) == 1 and not any(y in others for y in names)
                and all(_VIEW_OPS.match(y) and not y.startswith("expand") for y in ops))
        out[x] = sources[0] if view else None
    return out


def _module_of(n: onnx.NodeProto) -> str | None:
    """The module a node of a dynamo export came from (its name scopes, less the FX node)."""
    text = _meta(n, _SCOPES_KEY)
    scopes = re.findall(r"'([^']*)'", text)
    return scopes[-2] if len(scopes) >= 2 else None


def _missing_parameters(model: onnx.ModelProto
                        ) -> tuple[dict[str, tuple[str, str]], dict[str, str],
                                   dict[str, list[str]]]:
    """(signature entries, missing: {placeholder: name} of its parameters not in the graph,
    by_module: {module: placeholders of its missing parameters})."""
    g = model.graph
    entries = signature_entries(model)
    present = {t.name for t in g.initializer} | {vi.name for vi in g.input}
    missing = {ph: t for ph, (kind, t) in entries.items()
               if kind == "PARAMETER" and t not in present}
    by_module: dict[str, list[str]] = {}
    for ph, t in missing.items():
        by_module.setdefault(t.rpartition(".")[0], []).append(ph)
    return entries, missing, by_module


def _folded_buffer_modules(model: onnx.ModelProto) -> set[str]:
    """Modules with a buffer that constant folding removed from the graph (Swin's
    relative_position_index): a folded tensor read there, even one named after a view op
    (`unsqueeze`), may be an expression of a parameter and that buffer (`table[index]`), whose
    entries PyTorch shares, not a view of the parameter."""
    g = model.graph
    present = {t.name for t in g.initializer} | {vi.name for vi in g.input}
    return {t.rpartition(".")[0] for kind, t in signature_entries(model).values()
            if kind == "BUFFER" and t not in present}


def _own_missing(n: onnx.NodeProto, by_module: Mapping[str, list[str]]) -> list[str]:
    """The missing parameters of the module node n came from."""
    module = _module_of(n)
    return by_module.get(module, []) if module is not None else []


def parameter_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """{initializer: PyTorch parameter} for the tensors of a default export that hold one
    parameter in another layout under a name the exporter made: a Linear weight folded into
    its transpose (`val_42`, what `F.linear` on a 3-D input becomes), a view folded in the
    parameter's own module (`permute`), a restored copy (`{parameter}/{tensor}`). They train
    as that parameter, and `trainable`, `frozen` and `optimizer.groups` globs may name them
    by it (`*lora*`). Empty without the export's signature (TorchScript names such tensors
    `onnx::MatMul_37` and records nothing more)."""
    entries, missing, by_module = _missing_parameters(model)
    if not entries:
        return torchscript_folded_weights(model)
    named = {t for _, t in entries.values()}
    folded = {t.name for t in model.graph.initializer
              if t.data_type in FLOAT_TYPES and t.name not in named}
    folded_buffers = _folded_buffer_modules(model)
    records = folded_views(model)
    found: dict[str, set[str]] = {}
    lost = set(missing.values())
    for x, src in [*records.items(), *_lookup_views(model).items()]:
        if x in folded and src in lost:
            found.setdefault(x, set()).add(src)
    base = _missing_parameter_uses(model, views=False)[1]
    for x, ph in _parent_views(model, missing, base).items():
        found.setdefault(x, set()).add(missing[ph])
    for n in model.graph.node:
        refs = sorted(_fx_reads(n) & missing.keys())
        own = _own_missing(n, by_module)
        picked = _pick_missing(n, refs, missing)
        for x in n.input:
            if x not in folded or x in records:
                continue
            if picked is not None:
                found.setdefault(x, set()).add(missing[picked])
            elif (not refs and len(own) == 1 and _VIEW_OPS.match(x)
                  and _module_of(n) not in folded_buffers):
                found.setdefault(x, set()).add(missing[own[0]])
    out = {x: next(iter(ts)) for x, ts in found.items() if len(ts) == 1}
    # tensors that pack several parameters (an LSTM's W, R and B: each direction's weights,
    # both biases), as the optimizer's records say: a glob may name any of them
    # (PACK_SEPARATOR between the names; it trains as the one tensor it is); a recurrent
    # node's W, R or B holds its parameters whatever the records name besides (a
    # unidirectional layer's W: its weight_ih alone, gates reordered)
    recurrent = {model.graph.node[i].input[slot] for i, slot in recurrent_slots(model)}
    for x, src in _folded_from(model).items():
        if x in folded and x not in out:
            packed = sorted(set(src) & lost)
            if len(packed) >= 2 or packed and x in recurrent:
                out[x] = PACK_SEPARATOR.join(packed)
    for x, name in tied_embedding_names(model).items():
        out.setdefault(x, name)
    return out


def _scope_path(scopes: list[str]) -> str:
    """A module's dotted path from an exporter's name scopes: TorchScript scopes a called
    container's child by its own full name under the container's (['seq', 'seq.0']: seq.0,
    not seq.seq.0), a ModuleList's by its name alone (['encoder', 'layer.0']:
    encoder.layer.0); the default exporter scopes each level by its full path
    (['emb2', 'emb2.0']: emb2.0)."""
    path: list[str] = []
    for s in scopes:
        if path and s.startswith(".".join(path) + "."):  # (a full path: the default
            path = [s]  # exporter's scopes, ['transformer.wte'])
        elif path and s.startswith(f"{path[-1]}."):
            path[-1] = s
        else:
            path.append(s)
    return ".".join(path)


def tied_embedding_names(model: onnx.ModelProto) -> dict[str, str]:
    """{initializer: PyTorch parameter} for an embedding whose weight is tied to another
    parameter that the default exporter stores it as (GPT-2's wte.weight as lm_head.weight):
    the Gather's records name its Embedding module, whose `weight` the tensor also is, so a
    glob may name it by either (`frozen: ["emb.weight"]` matched nothing)."""
    names = {t.name for t in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type != "Gather" or not n.input or n.input[0] not in names or \
                "aten.embedding" not in _meta(n, _FX_NODE_KEY):
            continue
        scopes = re.findall(r"'([^']*)'", _meta(n, _SCOPES_KEY))
        own = _scope_path(scopes[1:-1]) + ".weight" if len(scopes) >= 3 else ""
        if own and own != n.input[0] and own not in names and \
                own not in found.get(n.input[0], []):
            found.setdefault(n.input[0], []).append(own)
    # (one table looked up by several embeddings, BART's encoder's and decoder's embed_tokens:
    # a glob may name it by any of them)
    return {x: TIE_SEPARATOR.join(ts) for x, ts in found.items()}


def torchscript_folded_weights(model: onnx.ModelProto) -> dict[str, str]:
    """{initializer: PyTorch parameter} for a TorchScript export's folded Linear weights: a
    Linear on an input of 3 or more axes is a MatMul whose weight, folded into its transpose,
    is `onnx::MatMul_<n>`, with no record of the parameter; the MatMul's name holds its
    module's path ('/encoder/layer.0/query/MatMul': encoder.layer.0.query), so the tensor is
    that module's `weight` where no initializer has the name already and the module folds one
    such tensor (several: `<module>.<tensor>`), which module globs name (a `frozen: ["0.*"]`
    froze layer 0's bias and trained its weight, in silence)."""
    if model.producer_name != "pytorch":
        return {}
    names = {t.name for t in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    slots: dict[str, set[tuple[str, int]]] = {}
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            if x.startswith("onnx::MatMul_") and x in names:
                slots.setdefault(x, set()).add((n.op_type, i))
                parts = n.name.split("/")
                module = _scope_path(parts[1:-1]) if n.name.startswith("/") and \
                    len(parts) > 2 else ""
                readers.setdefault(x, set()).add(module)
    found: dict[str, list[str]] = {}
    for x, modules in readers.items():
        module = next(iter(modules))
        # (a module the model's own names confirm, by another of its tensors: its bias; a
        # scope TorchScript renamed, as a ModuleDict's `default_1`, is none of them)
        if len(modules) == 1 and module and slots[x] == {("MatMul", 1)} and any(
                k.startswith(f"{module}.") for k in names):
            found.setdefault(module, []).append(x)
    # (their biases, where TorchScript folded them too: `onnx::Add_<n>`, added to the MatMul's
    # product in the same module)
    made = {o: x for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2
            for x in n.input[1:] for o in n.output}
    biases: dict[str, list[str]] = {}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        for b, other in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            x = made.get(other)
            if b.startswith("onnx::Add_") and b in names and x is not None and \
                    any(x in xs for xs in found.values()):
                module = next(m for m, xs in found.items() if x in xs)
                if b not in biases.get(module, []):
                    biases.setdefault(module, []).append(b)
    out = {}
    for module, xs in found.items():  # (a module of several: each under its own name there)
        bs = biases.get(module, [])
        if f"{module}.out_proj.weight" in names and len(xs) in (2, 3):
            # (a MultiheadAttention over separate query, key and value: three slices of its
            # in_proj_weight, or its q/k/v_proj_weight where kdim or vdim differ from the
            # embedding's, in that order; over a key that is the value, two: the query's and
            # the key's and value's packed; their biases slices of in_proj_bias: a glob that
            # names the parameter names every slice)
            e = dims[f"{module}.out_proj.weight"][:1] * 2
            packed = len(xs) == 2 or all(dims[x] == e for x in xs)
            for x, leaf in zip(xs, ("q", "k", "v")[:len(xs)], strict=True):
                out[x] = f"{module}.in_proj_weight" if packed else f"{module}.{leaf}_proj_weight"
            for b in bs:
                out[b] = f"{module}.in_proj_bias"
            continue
        # (a MultiheadAttention's packed projection is its in_proj_weight, beside in_proj_bias)
        leaf = "in_proj_weight" if f"{module}.in_proj_bias" in names and \
            f"{module}.bias" not in names else "weight"
        for x in xs:
            out[x] = f"{module}.{leaf}" if len(xs) == 1 and f"{module}.{leaf}" not in names \
                else f"{module}.{x}"
        for b in bs:
            out[b] = f"{module}.bias" if len(xs) == 1 and len(bs) == 1 and \
                f"{module}.bias" not in names else f"{module}.{b}"
    return out


PACK_SEPARATOR = ", "  # (between the parameters a packed tensor holds, in its alias)
TIE_SEPARATOR = " = "  # (between the names of one tied parameter, in its alias)


def alias_names(alias: str) -> list[str]:
    """The PyTorch parameter names an alias holds: several where a tensor packs parameters
    (PACK_SEPARATOR) or one parameter goes by several names (TIE_SEPARATOR)."""
    return [a for part in alias.split(PACK_SEPARATOR) for a in part.split(TIE_SEPARATOR)] \
        if alias else []


def partly_packed(aliases: Mapping[str, str], globs: Iterable[tuple[str, str]]) -> list[str]:
    """Warnings for globs (config key, glob) that name some but not all of the PyTorch
    parameters one packed tensor holds (a bidirectional recurrent layer's two directions are
    one tensor): the glob acts on the whole tensor."""
    lines = []
    for key, pattern in globs:
        for name, alias in aliases.items():
            parts = alias.split(PACK_SEPARATOR)
            hit = [a for a in parts if fnmatch.fnmatchcase(a, pattern)]
            if len(parts) > 1 and hit and len(hit) < len(parts) and \
                    not fnmatch.fnmatchcase(name, pattern):
                rest = ", ".join(a for a in parts if a not in hit)
                lines.append(f"{key} '{pattern}' names {', '.join(hit)}, which the export "
                             f"packed into one tensor '{name}' with {rest}: it acts on all "
                             "of them")
    return lines


def alias_matches(alias: str, pattern: str, exact: Container[str] = ()) -> bool:
    """Whether a glob names the parameter (or one of the parameters) an alias holds."""
    return any(glob_match(a, pattern, exact) for a in alias_names(alias))


def _missing_parameter_uses(model: onnx.ModelProto, views: bool = True
                            ) -> tuple[dict[str, str], set[str], set[str]]:
    """(missing: {placeholder: name} of the export signature's parameters that are not in the
    graph, explained: those of them still in use, carriers: initializers holding them).
    A missing parameter is in use when
    - a node's FX node read it: the node reads it folded (a transposed Linear weight) in an
      initializer the signature does not name;
    - a node of its own module reads a folded view of it, an initializer the exporter named
      after an FX view op (`permute`, `t`, `view`...; `x @ self.weight.T` folds that way);
    - a node of its own module read, in its FX node, a parameter of the same leaf name that
      is in the graph: the module uses a tied weight under another name (an embedding tied
      to the output projection, `lm_head.weight`);
    - with `views`, its module's parent reads it through a folded view (`_parent_views`).
    Any other missing parameter was folded into an expression (`folded_parameters`)."""
    from trainer.executor import outer_names, subgraphs

    g = model.graph
    entries, missing, by_module = _missing_parameters(model)
    explained: set[str] = set()
    carriers: set[str] = set()
    if not missing:
        return missing, explained, carriers
    named = {t for _, t in entries.values()}
    params = {ph: t for ph, (kind, t) in entries.items() if kind == "PARAMETER"}
    sizes = {t.name: int(np.prod(t.dims)) for t in g.initializer}
    folded_buffers = _folded_buffer_modules(model)
    producer = {o: n for n in g.node for o in n.output}
    records = folded_views(model)  # (the optimizer's own record of a view, where it wrote one)
    placeholder = {t: ph for ph, t in missing.items()}
    for x, src in [*records.items(), *_lookup_views(model).items()]:
        if src in placeholder:
            explained.add(placeholder[src])
            carriers.add(x)

    def carried(names) -> set[str]:
        """The values, and back through nodes that a later tool added (no FX node: the
        QuantizeLinear and DequantizeLinear of fake quantization), their inputs."""
        out, todo = set(), list(names)
        while todo:
            x = todo.pop()
            if x in out:
                continue
            out.add(x)
            p = producer.get(x)
            if p is not None and not _meta(p, _FX_NODE_KEY):
                todo += list(p.input)
        return out
    consumed = _folded_from(model)
    for n in g.node:
        refs = _fx_reads(n)
        if refs & missing.keys():
            # (a folded input the optimizer records as an expression of the parameter with
            # other values, as Swinv2's position-bias Linear applied to its buffer table, is
            # no layout of it: the parameter stays unaccounted for, so warned of)
            mixed = {placeholder[y] for x in n.input if records.get(x, "") is None
                     for y in consumed.get(x, ()) if y in placeholder}
            explained |= (refs & missing.keys()) - mixed
            carriers |= carried(n.input)
        for _, graphs in subgraphs(n):  # a tensor read inside a subgraph: not judged here
            for sub in graphs:
                carriers |= outer_names(sub)
        own = _own_missing(n, by_module)
        if not own:
            continue
        copies = [x for x in n.input if x in sizes and x not in named and sizes[x] > 1
                  and x not in records and _VIEW_OPS.match(x)]
        if copies and len(own) == 1 and _module_of(n) not in folded_buffers:
            explained.add(own[0])
            carriers.update(copies)
        leaves = {params[ph].rpartition(".")[2] for ph in refs
                  if ph in params and ph not in missing}
        explained.update(ph for ph in own if missing[ph].rpartition(".")[2] in leaves)
    if views:  # (a child's parameter that its parent reads through a folded view)
        found = _parent_views(model, missing, explained)
        explained |= set(found.values())
        carriers |= set(found)
    return missing, explained, carriers


def _parent_views(model: onnx.ModelProto, missing: Mapping[str, str], explained: set[str]
                  ) -> dict[str, str]:
    """{folded initializer: placeholder} for a child module's parameter that its parent reads
    through a view (DETR: `self.query_position_embeddings.weight.unsqueeze(0).repeat(...)`), or
    through an Embedding's lookup of distinct rows (Whisper's positions, `embedding`):
    the optimizer folds the view into a tensor under a name of its own (`val_3`), read by a
    node of the parent whose FX node reads the folded view op's value (`%unsqueeze`, gone
    from the graph). It holds the one parameter of that module or a direct child that nothing
    else accounts for, where there is exactly one such parameter and one such tensor."""
    g = model.graph
    named = {t for _, t in signature_entries(model).values()}
    present = {t.name for t in g.initializer} | {vi.name for vi in g.input} | {
        o for n in g.node for o in n.output}
    folded = _folded_tensors(g, named)
    loose: dict[str, list[str]] = {}  # module -> its missing parameters nothing accounts for
    for ph, t in missing.items():
        if ph not in explained:
            loose.setdefault(t.rpartition(".")[0], []).append(ph)
    out: dict[str, str] = {}
    if not loose:
        return out
    made = {o for n in g.node for o in n.output}
    records = folded_views(model)
    viewed = _viewed_lookups(model)
    for n in g.node:
        module = _module_of(n)
        reads = _fx_reads(n)
        view = any(_VIEW_OPS.match(r) and r not in present for r in reads)
        # (a folded lookup keeps the FX value's name, `embedding`, as an initializer; a view
        # of one, `self.pos(torch.arange(t))[None]`, its last view's: `unsqueeze`)
        lookup = any(_EMBEDDING_OP.match(r) and r not in made or r in viewed for r in reads)
        if module is None or not (view or lookup):
            continue
        cands = [ph for mod, phs in loose.items() for ph in phs
                 if mod == module or mod.rpartition(".")[0] == module]
        # (an expression the optimizer recorded is no view; an Embedding's lookup is judged
        # by its rows below)
        xs = [x for x in dict.fromkeys(n.input)
              if x in folded and (lookup or records.get(x, "") is not None)]
        if len(cands) == 1 and len(xs) == 1:
            if not view and not _distinct_rows(g, xs[0]):
                continue  # (an Embedding's lookup with repeated rows is no slice of it)
            out[xs[0]] = cands[0]
    return out


# FX's name for an Embedding's lookup: by positions computed from torch.arange (Whisper's and
# GPT-2's position embeddings) it is a slice of the table's rows, which the optimizer folds
_EMBEDDING_OP = re.compile(r"^embedding(_\d+)?$")
_ARANGE = re.compile(r"^arange(_\d+)?$")


def _viewed_lookups(model: onnx.ModelProto) -> set[str]:
    """Folded initializers that the optimizer recorded as made from one parameter by an
    Embedding's lookup at torch.arange positions and views alone (`unsqueeze` for
    `self.pos(torch.arange(t))[None]`), judged as the lookup `embedding` is."""
    params = {t for kind, t in signature_entries(model).values() if kind == "PARAMETER"}
    out = set()
    for x, names in _folded_from(model).items():
        ops = [y for y in names if y not in params and not _VALUE_NAME.match(y)]
        if (sum(y in params for y in names) == 1 and any(_EMBEDDING_OP.match(y) for y in ops)
                and all(_EMBEDDING_OP.match(y) or _VIEW_OPS.match(y) or _ARANGE.match(y)
                        for y in ops + [x])):
            out.add(x)
    return out


def _lookup_views(model: onnx.ModelProto) -> dict[str, str]:
    """{folded initializer: parameter} for the `_viewed_lookups` whose rows are distinct: rows
    of the table at torch.arange positions, so a slice of it whatever node reads it (RoFormer's
    sinusoidal positions, `embed_positions(...)[None, None]`, read by a Split the optimizer
    made, which records no module for `_parent_views` to go by)."""
    params = {t for kind, t in signature_entries(model).values() if kind == "PARAMETER"}
    consumed = _folded_from(model)
    out = {}
    for x in _viewed_lookups(model):
        sources = [y for y in consumed[x] if y in params]
        if len(sources) == 1 and _distinct_rows(model.graph, x):
            out[x] = sources[0]
    return out


def _distinct_rows(g: onnx.GraphProto, name: str) -> bool:
    """Whether the float initializer `name`'s rows (its last axis) are pairwise distinct, as
    rows gathered from a table at distinct positions are."""

    t = next(t for t in g.initializer if t.name == name)
    if values_unknown(t) or not t.dims:
        return False
    a = tensor_value(t)
    rows = a.reshape(-1, a.shape[-1])
    return len(np.unique(rows, axis=0)) == len(rows)


def fused_batchnorms(model: onnx.ModelProto) -> list[str]:
    """BatchNormalization modules that the default exporter's optimizer folded into the Conv,
    ConvTranspose or Gemm before them (its FuseBatchNormInto* rules, recorded on the node, whose
    FX node read the module's running mean): the layer trains without batch statistics, which
    PyTorch's .train() would use. Their weights and statistics are gone from the graph, so this
    cannot be undone; empty without the export's records."""
    entries = signature_entries(model)
    found: dict[str, None] = {}
    for n in model.graph.node:
        if not _rules(n) & _FUSED_BN:
            continue
        modules = [entries[ph][1][:-len(".running_mean")] for ph in sorted(_fx_reads(n))
                   if ph in entries and entries[ph][1].endswith(".running_mean")]
        for m in modules or [n.name]:
            found[m] = None
    return list(found)


_CONV_OPS = ("Conv", "ConvTranspose", "FusedConv")
_ONNXSIM_VALUE = re.compile(r"^_v_\d+$")


def tool_fused_batchnorms(model: onnx.ModelProto) -> list[str]:
    """Convolutions into which a tool run on the export folded the BatchNormalization after
    them, told by the names the tool gives the new weights: onnxruntime's ConvBnFusion
    (`ConvBnFusion_W_<weight>`, by any session's optimizer from ORT_ENABLE_BASIC on), onnxslim
    (`<output>_weight`, the convolution now writing the BatchNormalization's output) and
    onnxsim (`_v_<n>`, a constant it computed, in a model carrying its `onnxsim.*` metadata).
    The layer trains without batch statistics, as in an eval-mode export."""
    inits = {t.name for t in model.graph.initializer}
    onnxsim = any(p.key.startswith("onnxsim.") for p in model.metadata_props)
    found = []
    for i, n in enumerate(model.graph.node):
        if n.op_type not in _CONV_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = n.input[1]
        tool = ("onnxruntime" if w.startswith("ConvBnFusion_")
                else "onnxslim" if w == f"{n.output[0]}_weight"
                else "onnxsim" if onnxsim and _ONNXSIM_VALUE.match(w) else None)
        if tool:
            found.append(f"the one after {n.name or f'{n.op_type} #{i}'} ({tool})")
    if model.producer_name in ("tf2onnx", "keras2onnx"):
        # tf2onnx writes a Keras BatchNormalization as the Mul and Add of its inference
        # statistics (`.../batch_normalization/batchnorm/mul_1`, `add_1`), or folds them into
        # the convolution before it, which then carries that name: a fixed affine layer
        layers = []
        for n in model.graph.node:
            m = _KERAS_BATCHNORM.search(n.name)
            if m and m.group(1) not in layers and (n.op_type in _CONV_OPS + ("Mul", "Add")):
                layers.append(m.group(1))
            elif n.op_type in _CONV_OPS and len(n.input) > 1 and \
                    n.input[1].endswith("_fused_bn"):
                # (tf_keras's FusedBatchNormV3 folded: the weights `..._fused_bn`, the
                # convolution writing the layer's output `.../batch_normalization/...`)
                m = _KERAS_FUSED_BATCHNORM.search(n.output[0]) if n.output else None
                name = m.group(1) if m else f"the one after {n.name or n.op_type}"
                if name not in layers:
                    layers.append(name)
        found += [f"{name} (tf2onnx)" for name in layers]
    return found


_KERAS_BATCHNORM = re.compile(r"([^/]*batch_normalization[^/]*)/batchnorm/")
_KERAS_FUSED_BATCHNORM = re.compile(r"([^/]*batch_normalization[^/]*)/FusedBatchNorm")


def tool_folded_constants(model: onnx.ModelProto) -> list[str]:
    """Float Constant nodes of more than one element that onnxsim computed from the graph, told
    by the value they stand for (`.../position_embeddings/Gather_output_0`, not a Constant's
    own output) in a model carrying onnxsim's metadata: a lookup of a parameter by constant
    indices folds that way (BERT's position embeddings by position_ids), and the table's rows
    then do not train. Listed as 'name [dims]'."""
    if not any(p.key.startswith("onnxsim.") for p in model.metadata_props):
        return []
    out = []
    for n in model.graph.node:
        if n.op_type != "Constant" or "Constant" in n.output[0] or n.output[0].startswith(
                "onnx::"):
            continue
        t = next((a.t for a in n.attribute if a.name == "value"), None)
        if t is not None and t.data_type in FLOAT_TYPES and int(np.prod(t.dims)) > 1:
            out.append(f"{n.output[0]} {list(t.dims)}")
    return out


def folded_conv_weights(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Conv, ConvTranspose and Gemm nodes of a TorchScript export whose weight the exporter's
    constant folding computed (named onnx::...), as (BatchNormalization folded in, other
    expressions; a Gemm's are all other):
    an eval-mode export folds a BatchNormalization into the convolution before it, weight and
    bias both (the bias is new, onnx::...); a weight parametrization (weight_norm's g * v / |v|)
    folds the weight alone and keeps the module's own bias. Empty for other producers and for
    exports with a graph signature (the default exporter: `fused_batchnorms`)."""
    if model.producer_name != "pytorch" or signature_entries(model):
        return [], []
    inits = {t.name for t in model.graph.initializer}
    bn, other = [], []
    for i, n in enumerate(model.graph.node):
        if len(n.input) < 2 or n.input[1] not in inits or not n.input[1].startswith("onnx::"):
            continue
        name = n.name or f"{n.op_type} #{i}"
        bias = n.input[2] if len(n.input) > 2 else ""
        if n.op_type in ("Conv", "ConvTranspose"):
            (bn if bias.startswith("onnx::") else other).append(name)
        elif n.op_type == "Gemm":  # (a Linear reads its own weight, transB=1: a computed
            other.append(name)     # one is a parametrization's, weight_norm on a Linear)
    return bn, other


def _meta(n: onnx.NodeProto, key: str) -> str:
    return next((p.value for p in n.metadata_props if p.key == key), "")


def tied_perm(kind: str) -> list[int]:
    """The axes' permutation of a "transpose" tie (2-D) or a "transpose:2,0,1" one."""
    return [1, 0] if kind == "transpose" else [int(i) for i in kind.split(":")[1].split(",")]


def _sha1_of(a: np.ndarray) -> bytes:
    """SHA-1 of the bytes of `a` in C order, read in blocks of rows (a transposed weight of
    64 MiB was copied twice, contiguous and as bytes, to be hashed)."""
    import hashlib

    h = hashlib.sha1()
    if a.flags.c_contiguous:
        h.update(a.reshape(-1).view(np.uint8))
        return h.digest()
    rows = a.reshape((a.shape[0], -1)) if a.ndim > 1 else a.reshape(1, -1)
    step = max(1, (1 << 22) // max(1, rows[0].nbytes))  # (about 4 MiB at a time)
    for i in range(0, len(rows), step):
        h.update(np.ascontiguousarray(rows[i:i + step]).reshape(-1).view(np.uint8))
    return h.digest()


def tie_folded_copies(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Tie parameters the exporter stored twice, in place; returns {copy: (source, "transpose"
    | "transpose:<perm>" | "reshape" | "copy" | "expand")}.

    Both PyTorch exporters fold an expression of initializers alone into a new initializer.
    With tied input and output embeddings (`lm_head.weight = embed.weight`) the output
    projection's transpose becomes a second initializer, the exact transpose of the embedding;
    a parameter used through a view (`self.w[None]`, `self.gamma.view(1, -1, 1, 1)` next to a
    use of `self.gamma` itself) becomes a copy of the same values in another shape. Training
    would move the copies apart from their source. Each float initializer that equals the
    transpose (2-D) or a reshape (another shape, the same values in the same order) of another
    one, with more than one distinct value (so that constants are not tied by chance), becomes
    `Transpose(source)` or `Reshape(source)`, so that every use trains one tensor; the source is
    the one PyTorch's export signature names a parameter, else one not named `onnx::...` (the
    TorchScript exporter's name for a folded value), else the first. Export writes each copy
    back from the trained source. A folded expression that the default exporter's records say
    was computed from parameters, and that equals one of them broadcast to its shape (an
    RNN's first step from a zero state: `0 @ W_hh + b_hh` per batch row), becomes
    `Expand(source)`. (Another folded expression, `self.w.exp()`, is not recognized:
    exporting without constant folding keeps it an expression.)"""

    from onnx import helper, numpy_helper

    g = model.graph
    inputs = {vi.name for vi in g.input}
    signature = torch_signature(model)
    order = {t.name: i for i, t in enumerate(g.initializer)}

    def rank(name: str) -> tuple:  # sources first
        return (signature.get(name) != "PARAMETER", name.startswith("onnx::"), order[name])

    arrays: dict[str, np.ndarray] = {}
    by_flat: dict[tuple, list[str]] = {}
    for t in g.initializer:
        if t.data_type not in FLOAT_TYPES or t.name in inputs:
            continue
        a = tensor_value(t)
        if a.size < 2 or (a == a.flat[0]).all():
            continue
        arrays[t.name] = a
        digest = _sha1_of(a)
        by_flat.setdefault((a.dtype.str, digest), []).append(t.name)
    tied: dict[str, tuple[str, str]] = {}
    # (the default exporter's records: which parameter each folded copy holds)
    aliases = parameter_aliases(model) if signature else {}
    # reshapes: the same bytes in another shape; copies: in the same shape, where the records
    # say both hold one parameter (a module used twice: its Linear's transpose folded per use)
    for names in by_flat.values():
        names = sorted(names, key=rank)
        for other in names[1:]:
            src = names[0]
            if signature.get(other) == "PARAMETER":
                continue  # two parameters of PyTorch's, equal by chance or by copy: separate
            if not np.array_equal(arrays[other].reshape(-1), arrays[src].reshape(-1)):
                continue
            if arrays[other].shape != arrays[src].shape:
                tied[other] = (src, "reshape")
            elif other in aliases and aliases[other] == aliases.get(src, src):
                tied[other] = (src, "copy")
    # transposes (2-D)
    for name, a in sorted(arrays.items(), key=lambda kv: rank(kv[0])):
        if a.ndim != 2 or name in tied:
            continue
        key = (a.dtype.str, _sha1_of(a.T))
        for other in by_flat.get(key, []):
            b = arrays[other]
            if signature.get(other) == "PARAMETER":
                continue
            if other != name and other not in tied and b.shape == a.shape[::-1] and \
                    all(other != s for s, _ in tied.values()) and np.array_equal(b, a.T):
                tied[other] = (name, "transpose")
    # permutations of 3 or 4 axes into another shape (TorchScript stores weight
    # standardization's reshaped weight as [1, out, k] and its transpose [1, k, out])
    groups: dict[tuple, list[str]] = {}
    for name, a in arrays.items():
        if 3 <= a.ndim <= 4:
            groups.setdefault((a.dtype.str, tuple(sorted(a.shape))), []).append(name)
    for names in groups.values():
        if len({arrays[n].shape for n in names}) < 2:
            continue
        for name in sorted(names, key=rank):
            a = arrays[name]
            if name in tied:
                continue
            for other in names:
                b = arrays[other]
                if (other == name or other in tied or b.shape == a.shape
                        or signature.get(other) == "PARAMETER"
                        or any(other == s for s, _ in tied.values())):
                    continue
                perm = next((p for p in itertools.permutations(range(a.ndim))
                             if tuple(a.shape[i] for i in p) == b.shape
                             and np.array_equal(a.transpose(p), b)), None)
                if perm is not None:
                    tied[other] = (name, "transpose:" + ",".join(map(str, perm)))
    # broadcasts: a folded expression of parameters that equals one of them broadcast (an
    # RNN's first step from a zero state: zeros @ W_hh + b_hh folded into b_hh per batch row)
    if signature:
        by_name = {t.name: t for t in g.initializer}
        params = {k: t for k, t in by_name.items() if signature.get(k) == "PARAMETER"
                  and t.data_type in FLOAT_TYPES}
        for x, names in _folded_from(model).items():
            if x in tied or x in inputs or signature.get(x) == "PARAMETER":
                continue
            c = arrays.get(x)
            if c is None:
                t = by_name[x]
                if t.data_type not in FLOAT_TYPES:
                    continue
                c = tensor_value(t)
            for src in (y for y in names if y in params):
                a = tensor_value(params[src])
                if c.size <= a.size or c.dtype != a.dtype:
                    continue
                try:
                    if np.broadcast_shapes(a.shape, c.shape) != c.shape:
                        continue
                except ValueError:
                    continue
                if np.array_equal(np.broadcast_to(a, c.shape), c):
                    tied[x] = (src, "expand")
                    arrays[x] = c
                    break
    if tied:
        keep = [t for t in g.initializer if t.name not in tied]
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = []
        for copy, (src, kind) in tied.items():
            if kind.startswith("transpose"):
                nodes.append(helper.make_node("Transpose", [src], [copy], name=f"{copy}/Tied",
                                              perm=tied_perm(kind)))
            elif kind == "expand":
                shape = f"{copy}/Tied/shape"
                g.initializer.append(numpy_helper.from_array(
                    np.array(arrays[copy].shape, np.int64), shape))
                nodes.append(helper.make_node("Expand", [src, shape], [copy],
                                              name=f"{copy}/Tied"))
            else:  # (a "copy" too: an Identity would read as one of untie_identity_aliases)
                shape = f"{copy}/Tied/shape"
                g.initializer.append(numpy_helper.from_array(
                    np.array(arrays[copy].shape, np.int64), shape))
                nodes.append(helper.make_node("Reshape", [src, shape], [copy],
                                              name=f"{copy}/Tied"))
        for n in nodes:
            n.metadata_props.add(key=_TIED_KEY, value=n.input[0])
        rest = list(g.node)
        del g.node[:]
        g.node.extend(nodes + rest)
    return tied
