"""`precision: bf16 | fp16`: 16-bit mixed precision as a graph rewrite, the way torch.autocast
does it.

The matrix products (MatMul, Gemm, Conv, ConvTranspose) of the float32 compute form read
bfloat16 (or float16) copies of their inputs (Cast nodes: the float32 parameters stay the master
weights) and their 16-bit results are cast back to float32, so every other op (normalizations,
softmax, reductions, the loss, the optimizer) runs in float32. The gradient rules of the Casts
make the backward's products 16-bit too and hand float32 gradients to the parameters. Kernels
compute a 16-bit product from the rounded operands with float32 accumulation and round the
result once, as 16-bit GEMMs do on GPUs and in PyTorch on CPUs. float16's narrow range is why
fp16 training scales the loss (LossScaler, below): the backward's float16 gradients
would otherwise underflow.

A Linear that the exporters write as MatMul + Add of its bias (nn.Linear on a 3-D input, both
torch.onnx exporters) is one 16-bit addmm in torch.autocast: the bias is rounded to 16 bits,
and the backward reduces the bias gradient to a 16-bit value (float32 accumulation, rounded
once: in float16 it can overflow where a float32 sum would not, and GradScaler then skips the
step). So there the Add reads the bias's 16-bit value (a Cast to 16 bits and one back), whose
Casts' gradient rules round its gradient so (_linear_biases says which Adds are such biases).
The product keeps its 16-bit operands and result (what the backward keeps, and a GPU's 16-bit
GEMM), and the Add stays float32: addmm rounds the float32 product plus the bias once, where
this sum of the rounded product and the rounded bias is not rounded again (a last-bit
difference in some elements; a sum rounded again after the rounded product was as far from
autocast's, and float32 operands for a single rounding would double the bytes the backward
keeps of them).

The rewrite is plain ONNX (`onnx-trainer grad` shows it); exports and evaluation use the model
as it was, with the trained float32 values. Products inside control-flow bodies keep float32.
Conv and ConvTranspose take bfloat16 only from opset 22: below it, their bfloat16 operands and
result are float32 tensors of bfloat16 values (a Cast to bfloat16 and one back), the product
float32, which is the same arithmetic (float32 products of the rounded operands, the result
rounded once) in a valid graph.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper

from trainer.graph import NameScope, all_names, attr_type_code, opset_of

CAST_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# precision -> (the products' ONNX type, its short name in tensor names, first opset with it)
LOW = {"bf16": (TensorProto.BFLOAT16, "bf16", 13), "fp16": (TensorProto.FLOAT16, "fp16", 1)}


# ops whose first output has the type of their first input (the ones of opsets 1-5 whose
# schemas have no type inference among them: Gemm-1..5, Relu-1, Add-1, BatchNormalization-1..)
_SAME_TYPE = frozenset("""Abs Add Affine AveragePool BatchNormalization Ceil Clip Concat Conv
    ConvTranspose Crop DepthToSpace Div Dropout Elu Exp Expand Flatten Floor Gather Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool HardSigmoid Identity ImageScaler
    InstanceNormalization LRN LeakyRelu Log LogSoftmax LpNormalization LpPool MatMul Max
    MaxPool Mean MeanVarianceNormalization Min Mul Neg PRelu Pad ParametricSoftplus Pow
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Reshape ScaledTanh Selu Sigmoid Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh ThresholdedRelu Tile
    Transpose Unsqueeze Upsample""".split())


def _float32_values(model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> set[str]:
    """Names of the float32 tensors of the main graph (inputs, initializers, value_info and
    outputs, after shape inference, `inferred` if given; where inference gives no type, as for
    the ops of opsets 1-5 without type inference, an op of _SAME_TYPE's output takes its first
    input's)."""
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    out = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    typed = {t.name for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type:
            typed.add(vi.name)
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.add(vi.name)
    for node in g.node:  # (in the graph's order: a value's producer comes first)
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Cast" and node.output and node.output[0] not in typed:
            # (Cast-1 has no type inference either: its type is its `to`, a name there)
            code = next((attr_type_code(a) for a in node.attribute if a.name == "to"), None)
            typed.add(node.output[0])
            if code == TensorProto.FLOAT:
                out.add(node.output[0])
            continue
        if node.op_type not in _SAME_TYPE or not node.input or node.input[0] not in out:
            continue
        for o in node.output if node.op_type == "Split" else node.output[:1]:
            if o and o not in typed:
                typed.add(o)
                out.add(o)
    return out


def _linear_biases(g: onnx.GraphProto, inferred: onnx.ModelProto,
                   f32: set[str]) -> dict[str, onnx.NodeProto]:
    """MatMul output -> the Add of its bias, where the pair is an exported nn.Linear: the
    MatMul by a 2-D B of N columns, its output (of rank 2 or more) read by that Add alone, whose
    other input is a float32 initializer of shape [N]. Where the exporter recorded each
    node's FX node (torch.onnx's dynamo exporter), both must be the same one (aten.linear):
    `x @ w + c` written out is a 16-bit product plus a float32 c in autocast (the Add
    promotes), and stays so here."""
    dims = {t.name: tuple(t.dims) for t in g.initializer}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(
            inferred.graph.output):
        t = vi.type.tensor_type
        if vi.type.WhichOneof("value") == "tensor_type" and t.HasField("shape"):
            dims.setdefault(vi.name, tuple(d.dim_value if d.HasField("dim_value") else None
                                           for d in t.shape.dim))
    inits = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in set(node.input):
            readers.setdefault(i, []).append(node)
    inner = set()  # (names the control-flow bodies read: a second reader)
    for node in g.node:
        for a in node.attribute:
            for body in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                inner |= all_names(body)
    outputs = {o.name for o in g.output}

    def fx(node):
        return next((p.value for p in node.metadata_props
                     if p.key == "pkg.torch.onnx.fx_node"), None)

    out = {}
    for node in g.node:
        if node.op_type != "MatMul" or node.domain or len(node.input) != 2:
            continue
        y, b = node.output[0], node.input[1]
        if len(dims.get(b) or ()) != 2 or len(dims.get(y) or ()) < 2 or y in outputs \
                or y in inner or len(readers.get(y, [])) != 1:
            continue
        add = readers[y][0]
        if add.op_type != "Add" or add.domain or len(add.input) != 2 or add.input[0] == \
                add.input[1] or any(a.name == "axis" for a in add.attribute) or \
                add.output[0] not in f32:
            continue
        bias = add.input[1] if add.input[0] == y else add.input[0]
        if bias not in inits or dims[bias] != (dims[b][1],) or dims[b][1] is None or \
                not all(x in f32 for x in node.input):  # (a product autocast casts)
            continue
        if fx(node) is not None and fx(add) is not None and fx(node) != fx(add):
            continue
        out[y] = add
    return out


def opset_note(model: onnx.ModelProto, precision: str) -> str:
    """Why `precision` cannot cast this model's products (its opset), with the fix; "" where
    it can."""
    if precision not in LOW or opset_of(model) >= LOW[precision][2]:
        return ""
    low, since = {"bf16": "bfloat16", "fp16": "float16"}[precision], LOW[precision][2]
    return (f"{low} Casts need opset {since} or later and this model's is {opset_of(model)}: "
            "it trains in float32; onnx.version_converter.convert_version(model, "
            f"{since}) raises its opset")


def precision_line(model: onnx.ModelProto, precision: str, cast: int, total: int) -> str:
    """What autocast(model, precision) did, said by `train` and `grad` alike."""
    low = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    why = (f" ({opset_note(model, precision)})" if total and not cast
           and opset_note(model, precision) else
           " (only float32 products take it: this model's are of another type)"
           if total and not cast else "")
    rest = "in float32" if cast else "in their own type"
    return (f"precision {precision}: {cast} of {total} matrix products (MatMul, Gemm, Conv, "
            f"ConvTranspose) in {low}, the rest {rest}{why}")


def autocast(model: onnx.ModelProto, precision: str) -> tuple[onnx.ModelProto, int, int]:
    """The model with its float32 matrix products in `precision` ("bf16" or "fp16", see the
    module docstring); returns (model, products cast, products in the main graph). bfloat16
    Casts need opset 13+; older models are left as they are then (none cast)."""
    to, short, since = LOW[precision]
    total = sum(n.op_type in CAST_OPS and not n.domain for n in model.graph.node)
    if opset_of(model) < since:
        return model, 0, total
    m = copy.deepcopy(model)
    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    f32 = _float32_values(m, inferred)
    biased = _linear_biases(g, inferred, f32)
    added = {id(a) for a in biased.values()}
    scope = NameScope(all_names(g))
    cast_of: dict[str, str] = {}  # float32 tensor -> its 16-bit copy (one Cast per tensor)
    rounded: dict[str, str] = {}  # float32 tensor -> float32 of its 16-bit copy
    # (Conv and ConvTranspose take bfloat16 from opset 22: below, float32 of bfloat16 values)
    round_trip = to == TensorProto.BFLOAT16 and opset_of(m) < 22
    nodes: list[onnx.NodeProto] = []
    count = 0

    def cast(x: str, name: str, dtype: int, like: onnx.NodeProto) -> onnx.NodeProto:
        node = helper.make_node("Cast", [x], [name], name=scope.fresh(
            f"{x}/to_{short if dtype == to else 'f32'}"),
            to=dtype if opset_of(m) >= 6 else TensorProto.DataType.Name(dtype))  # (Cast-1's)
        # the product's export records (its module, its FX node's reads), which tell the
        # parameter analysis whose weight a folded tensor is
        node.metadata_props.extend(like.metadata_props)
        return node

    for node in g.node:
        if id(node) in added:  # (a Linear's bias: its 16-bit value, see the module docstring)
            k = next(k for k, x in enumerate(node.input) if x not in biased)
            x = node.input[k]
            if x not in cast_of:
                cast_of[x] = scope.fresh(f"{x}/{short}")
                nodes.append(cast(x, cast_of[x], to, node))
            if x not in rounded:
                rounded[x] = scope.fresh(f"{x}/{short}_f32")
                nodes.append(cast(cast_of[x], rounded[x], TensorProto.FLOAT, node))
            node.input[k] = rounded[x]
            nodes.append(node)
            continue
        slots = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (0, 1, 2),
                 "ConvTranspose": (0, 1, 2)}.get(node.op_type) if not node.domain else None
        ins = [node.input[k] for k in slots or () if k < len(node.input) and node.input[k]]
        if not slots or not ins or not all(i in f32 for i in ins) or not all(
                o in f32 for o in node.output if o):
            nodes.append(node)
            continue
        trip = round_trip and node.op_type in ("Conv", "ConvTranspose")
        for k in slots:
            if k < len(node.input) and node.input[k]:
                x = node.input[k]
                if x not in cast_of:
                    cast_of[x] = scope.fresh(f"{x}/{short}")
                    nodes.append(cast(x, cast_of[x], to, node))
                if trip and x not in rounded:
                    rounded[x] = scope.fresh(f"{x}/{short}_f32")
                    nodes.append(cast(cast_of[x], rounded[x], TensorProto.FLOAT, node))
                node.input[k] = rounded[x] if trip else cast_of[x]
        y = node.output[0]
        low = scope.fresh(f"{y}/{short}")
        if trip:  # (the float32 product, rounded once to bfloat16)
            node.output[0] = scope.fresh(f"{y}/f32")
            nodes += [node, cast(node.output[0], low, to, node)]
        else:
            node.output[0] = low
            nodes.append(node)
        nodes.append(cast(low, y, TensorProto.FLOAT, node))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return m, count, total


class LossScaler:
    """Dynamic loss scaling for `precision: fp16` (config.LossScaleConfig), by
    torch.amp.GradScaler's rule and in its float32 arithmetic: the backward starts from the loss
    weight times `scale` (the seed), the summed gradients are multiplied by `inv_scale`, and a
    step whose gradients are not all finite is skipped (`update(True)`)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.scale = np.float32(cfg.init)
        self.good = 0  # finite steps in a row since the last change
        self.bad = 0  # steps in a row whose gradients were not finite
        self.backoffs = 0  # overflows since the scale last grew (or the run began)

    @property
    def backs_off(self) -> bool:
        """Whether an overflow lowers the scale: a static one (dynamic false, or
        backoff_factor 1) would skip the same overflow at every step."""
        return bool(self.cfg.dynamic) and self.cfg.backoff_factor < 1

    @property
    def inv_scale(self) -> np.float32:
        return np.float32(1.0 / float(self.scale))

    def update(self, overflow: bool) -> None:
        """After a step: back off on an overflow, grow after growth_interval finite steps."""
        c = self.cfg
        if not c.dynamic:
            return
        if overflow:
            self.bad += 1
            self.backoffs += 1
            # (the float32 scale times the float64 factor, rounded once, as torch's kernel)
            lower = np.float32(float(self.scale) * c.backoff_factor)
            if lower < np.finfo(np.float32).tiny:  # (on to 0, where 1 / scale fails)
                from trainer.errors import TrainerError
                if self.backoffs > self.bad:  # (finite steps between: some batches only)
                    raise TrainerError(
                        f"the float16 gradients were not finite in {self.backoffs} steps since "
                        f"the loss scale last grew ({self.bad} in a row at the end), which "
                        f"lowered it to {float(self.scale):.2g}: some batches are inf or NaN "
                        "in float16 at any scale (values beyond float16's 65504 in the data or "
                        "the activations, sqrt or log at 0, a division by 0?); precision: "
                        "bf16 keeps float32's range, or find them with precision: fp32")
                raise TrainerError(
                    f"the float16 gradients were not finite in the last {self.bad} steps in a "
                    f"row, down to a loss scale of {float(self.scale):.2g}: not an overflow, "
                    "but a gradient that is inf or NaN at any scale (sqrt or log at 0, a "
                    "division by 0?); see which with precision: fp32 or `onnx-trainer grad`")
            self.scale, self.good = lower, 0
            return
        self.good, self.bad = self.good + 1, 0
        # (>=: a resume with a shorter growth_interval than the checkpoint's count so far)
        if self.good >= c.growth_interval:
            with np.errstate(over="ignore"):  # (an infinite scale is refused just below)
                grown = np.float32(float(self.scale) * c.growth_factor)
            if np.isfinite(grown):
                self.scale = grown
            self.good = self.backoffs = 0

    def state(self) -> dict:
        return {"loss_scale": float(self.scale), "loss_scale_good_steps": self.good}

    def load(self, meta: dict) -> bool:
        """Restore from a checkpoint's meta; False if it holds no scaler state."""
        if "loss_scale" not in meta:
            return False
        self.scale = np.float32(meta["loss_scale"])
        self.good = int(meta.get("loss_scale_good_steps", 0))
        return True
