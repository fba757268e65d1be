"""The context a gradient rule sees: I/O/GO/GI names, static shapes, and node-building helpers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.errors import ModelError
from trainer.graph import NameScope, attrs_of


class Builder:
    """Emits nodes and constant initializers into a graph under construction (opset-aware)."""

    def __init__(self, scope: NameScope, opset: int, shapes: dict, prefix: str,
                 constants: dict | None = None):
        self.scope = scope
        self.constants = constants or {}  # name -> host array of values known before running
        self.opset = opset
        self.shapes = shapes  # name -> (shape, dtype)
        self.prefix = prefix
        self.initializers: list[onnx.TensorProto] = []

    def tmp(self, suffix: str) -> str:
        return self.scope.fresh(f"{self.prefix}/{suffix}")

    def node(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "",
             **attrs) -> onnx.NodeProto:
        name = self.scope.fresh(f"{self.prefix}/{op_type}")
        return helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None,
                                **{k: v for k, v in attrs.items() if v is not None})

    def const(self, value, dtype=None, suffix: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.tmp(suffix)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name][0]

    def dtype(self, name: str) -> np.dtype:
        return self.shapes[name][1]

    def _known_dtype(self, name: str):
        """The dtype of a value, or of an output's incoming gradient (its output's); None for
        a rule's own temporaries."""
        if name in self.shapes:
            return self.dtype(name)
        for i, go in enumerate(self._go):
            if go == name and self.O(i) in self.shapes:
                return self.dtype(self.O(i))
        return None

    def static_value(self, name: str) -> np.ndarray | None:
        """Value of a constant input (initializer or Constant node), None if computed."""
        return self.constants.get(name)

    # -- opset-aware building blocks ---------------------------------------------------------
    def reduce(self, op: str, x: str, axes, out: str, keepdims: int = 1) -> onnx.NodeProto:
        axes = [int(a) for a in axes]
        input_axes = 13 if op == "ReduceSum" else 18
        if self.opset >= input_axes:
            return self.node(op, [x, self.const(axes, np.int64, "axes")], [out], keepdims=keepdims)
        return self.node(op, [x], [out], axes=axes, keepdims=keepdims)

    def reshape(self, x: str, shape, out: str, dtype=None) -> onnx.NodeProto:
        if self.opset < 5:  # Reshape-1 takes the shape as an attribute (typed: a scalar's is
            node = self.node("Reshape", [x], [out])  # empty, which make_node cannot type)
            node.attribute.append(helper.make_attribute(
                "shape", [int(d) for d in shape], attr_type=onnx.AttributeProto.INTS))
            return node
        # a 0 in the target copies the input's dim unless allowzero (opset 14) says otherwise;
        # before it, an empty target's one 0 is inferred as -1 (the other sizes are not 0),
        # and one of several 0s is a tensor of zeros of its shape
        shape = [int(d) for d in shape]
        zero = 1 if 0 in shape and self.opset >= 14 else None
        if 0 in shape and self.opset < 14:
            if shape.count(0) == 1 and -1 not in shape:
                shape = [-1 if d == 0 else d for d in shape]
            elif (dtype is not None or self._known_dtype(x) is not None) and self.opset >= 9:
                dtype = self._known_dtype(x) if dtype is None else dtype  # (x's or as given)
                return self.node("ConstantOfShape", [self.const(shape, np.int64, "shape")],
                                 [out], value=numpy_helper.from_array(np.zeros(1, dtype)))
        return self.node("Reshape", [x, self.const(list(shape), np.int64, "shape")], [out],
                         allowzero=zero)

    def expand(self, x: str, shape, out: str, dtype) -> onnx.NodeProto:
        """Broadcast x to `shape` (Expand from opset 8; before it, adding zeros broadcasts)."""
        if self.opset >= 8:
            return self.node("Expand", [x, self.const(list(shape), np.int64, "shape")], [out])
        zeros = self.const(np.zeros(shape, dtype), suffix="zeros")
        return self.node("Add", [zeros, x], [out], broadcast=1 if self.opset < 7 else None)

    def unsqueeze(self, x: str, axes, out: str) -> onnx.NodeProto:
        if self.opset >= 13:
            return self.node("Unsqueeze", [x, self.const(list(axes), np.int64, "axes")], [out])
        return self.node("Unsqueeze", [x], [out], axes=list(axes))

    def squeeze(self, x: str, axes, out: str) -> onnx.NodeProto:
        if self.opset >= 13:
            return self.node("Squeeze", [x, self.const(list(axes), np.int64, "axes")], [out])
        return self.node("Squeeze", [x], [out], axes=list(axes))

    def sum_to(self, dy: str, shape_from: tuple, shape_to: tuple, out: str
               ) -> list[onnx.NodeProto]:
        """Undo NumPy broadcasting: sum dy (shape_from) down to shape_to, into `out`."""
        shape_from, shape_to = tuple(shape_from), tuple(shape_to)
        if shape_from == shape_to:
            return [self.node("Identity", [dy], [out])]
        lead = len(shape_from) - len(shape_to)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(shape_to)
                                    if d == 1 and shape_from[lead + i] != 1]
        if not axes:
            return [self.reshape(dy, shape_to, out)]
        if lead == 0:  # (keepdims leaves shape_to: no size baked in, as for rows picked by
            return [self.reduce("ReduceSum", dy, axes, out, keepdims=1)]  # the data)
        summed = self.tmp("sum")
        nodes = [self.reduce("ReduceSum", dy, axes, summed, keepdims=1)]
        nodes.append(self.squeeze(summed, list(range(lead)), out))
        return nodes


class GradContext(Builder):
    """Per-node view for a rule: I(i), O(i), GO(i) (None if no gradient), GI(i), needs(i)."""

    def __init__(self, node: onnx.NodeProto, node_label: str, grad_outputs: list[str | None],
                 grad_inputs: list[str | None], scope: NameScope, opset: int, shapes: dict,
                 constants: dict | None = None, data_sized: frozenset = frozenset()):
        super().__init__(scope, opset, shapes, f"{node_label}/Grad", constants)
        self.data_sized = data_sized  # (engine.data_sized_values: sizes read at run time)
        self.onnx_node = node
        self.name = node_label
        self.attrs = attrs_of(node)
        self._go = grad_outputs
        self._gi = grad_inputs

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def reshape_as(self, x: str, like: str, out: str) -> list[onnx.NodeProto]:
        """x reshaped to `like`'s shape: read at run time where that follows the data."""
        if like in self.data_sized and self.opset >= 5:
            dims = self.tmp("shape")
            return [self.node("Shape", [like], [dims]), self.node("Reshape", [x, dims], [out])]
        return [self.reshape(x, self.shape(like), out, self.dtype(like))]

    def I(self, i: int) -> str:  # noqa: E743
        return self.onnx_node.input[i] if i < len(self.onnx_node.input) else ""

    def O(self, i: int) -> str:  # noqa: E743
        return self.onnx_node.output[i]

    def GO(self, i: int) -> str | None:
        return self._go[i] if i < len(self._go) else None

    def GI(self, i: int) -> str:
        name = self._gi[i]
        assert name is not None, f"rule asked for GI({i}) of {self.name}, which is not needed"
        return name

    def needs(self, i: int) -> bool:
        return i < len(self._gi) and self._gi[i] is not None

    def n_inputs(self) -> int:
        return sum(1 for x in self.onnx_node.input if x)

    def to_input(self, dy: str, i: int, shape_from: tuple | None = None) -> list[onnx.NodeProto]:
        """sum_to(dy, like=I(i)) written into GI(i); dy has the node output's shape by default."""
        src = tuple(shape_from if shape_from is not None else self.shape(self.O(0)))
        dst = tuple(self.shape(self.I(i)))
        if self.opset < 7 and self.attr("broadcast", 0) and dst != src:
            # opsets 1-6: B's dims align with A's from `axis` on (the end, without it): summed
            # over the others, as NumPy's right-aligned sum_to does for its dims padded with 1s
            # up to the end (Gemm's C and a bias Add's; products read B as the forward
            # broadcasts it only where that is NumPy's alignment)
            axis = self.attr("axis", None)
            axis = len(src) - len(dst) if axis is None else axis % max(len(src), 1)
            if not 0 <= axis <= len(src) - len(dst):
                raise ModelError(f"node '{self.name}' ({self.onnx_node.op_type}): input "
                                 f"{i}'s shape {list(dst)} does not fit the output's "
                                 f"{list(src)} from axis {axis} (opset {self.opset} broadcast)")
            tail = len(src) - axis - len(dst)
            if tail and self.onnx_node.op_type not in ("Add", "Sub", "Gemm"):
                raise ModelError(f"node '{self.name}' ({self.onnx_node.op_type}) uses the opset "
                                 f"{self.opset} 'broadcast' attribute along axis {axis}, not "
                                 "the last axes, which its gradient does not support; convert "
                                 "the model with onnx.version_converter (opset >= 7)")
            if tail:
                padded = self.tmp("aligned")
                return [*self.sum_to(dy, src, dst + (1,) * tail, padded),
                        self.reshape(padded, dst, self.GI(i))]
        return self.sum_to(dy, src, dst, self.GI(i))

    def scalar(self, value, like: str | None = None) -> str:
        """A scalar constant with the dtype of `like` (default: the first input)."""
        return self.const(value, self.dtype(like or self.I(0)), "c")
