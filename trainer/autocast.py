"""`precision: bf16`: bfloat16 mixed precision as a graph rewrite, the way torch.autocast does it.

The matrix products (MatMul, Gemm, Conv, ConvTranspose) of the float32 compute form read
bfloat16 copies of their inputs (Cast nodes: the float32 parameters stay the master weights) and
their bfloat16 results are cast back to float32, so every other op (normalizations, softmax,
reductions, the loss, the optimizer) runs in float32. The gradient rules of the Casts make the
backward's products bfloat16 too and hand float32 gradients to the parameters. Kernels compute
a bfloat16 product from the bfloat16-rounded operands with float32 accumulation and round the
result once, as bf16 GEMMs do on GPUs and in PyTorch on CPUs.

The rewrite is plain ONNX (`onnx-trainer grad` shows it); exports and evaluation use the model
as it was, with the trained float32 values. Products inside control-flow bodies keep float32.
"""

from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper

from trainer.graph import NameScope, all_names, opset_of

BF16_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def _float32_values(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of the main graph (inputs, initializers, value_info and
    outputs, after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    out = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.add(vi.name)
    return out


def autocast_bf16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """The model with its float32 matrix products in bfloat16 (see the module docstring);
    returns (model, products cast, products in the main graph). Opset 13+ is needed for
    bfloat16 Casts; older models are left as they are (none cast)."""
    total = sum(n.op_type in BF16_OPS and not n.domain for n in model.graph.node)
    if opset_of(model) < 13:
        return model, 0, total
    m = copy.deepcopy(model)
    g = m.graph
    f32 = _float32_values(m)
    scope = NameScope(all_names(g))
    cast_of: dict[str, str] = {}  # float32 tensor -> its bfloat16 copy (one Cast per tensor)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in g.node:
        slots = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (0, 1, 2),
                 "ConvTranspose": (0, 1, 2)}.get(node.op_type) if not node.domain else None
        ins = [node.input[k] for k in slots or () if k < len(node.input) and node.input[k]]
        if not slots or not ins or not all(i in f32 for i in ins) or not all(
                o in f32 for o in node.output if o):
            nodes.append(node)
            continue
        for k in slots:
            if k < len(node.input) and node.input[k]:
                x = node.input[k]
                if x not in cast_of:
                    cast_of[x] = scope.fresh(f"{x}/bf16")
                    cast = helper.make_node("Cast", [x], [cast_of[x]],
                                            name=scope.fresh(f"{x}/to_bf16"),
                                            to=TensorProto.BFLOAT16)
                    # the product's export records (its module, its FX node's reads), which
                    # tell the parameter analysis whose weight a folded tensor is
                    cast.metadata_props.extend(node.metadata_props)
                    nodes.append(cast)
                node.input[k] = cast_of[x]
        y = node.output[0]
        low = scope.fresh(f"{y}/bf16")
        node.output[0] = low
        nodes.append(node)
        back = helper.make_node("Cast", [low], [y], name=scope.fresh(f"{y}/to_f32"),
                                to=TensorProto.FLOAT)
        back.metadata_props.extend(node.metadata_props)
        nodes.append(back)
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return m, count, total
