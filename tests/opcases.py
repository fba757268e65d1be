"""Tiny ONNX model builders shared by the kernel and gradient-rule tests."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.executor import Executor
from trainer.graph import convert_floats

Arrays = Mapping[str, np.ndarray]


def value_info(name: str, arr: np.ndarray) -> onnx.ValueInfoProto:
    arr = np.asarray(arr)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                         list(arr.shape))


def make_model(nodes: Sequence[onnx.NodeProto], *, inputs: Arrays | None = None,
               initializers: Arrays | None = None, outputs: Sequence[str] = ("y",),
               opset: int = 18, extra_opsets: Mapping[str, int] | None = None
               ) -> onnx.ModelProto:
    """A checked model: `inputs` become graph inputs (typed like the arrays), `initializers`
    constants; output types and shapes come from ONNX shape inference."""
    inputs, initializers = dict(inputs or {}), dict(initializers or {})
    graph = helper.make_graph(
        list(nodes), "case", [value_info(k, v) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = min(model.ir_version, 10)  # what the installed onnxruntime reads
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {o.name: o.type for o in inferred.graph.output}
    for o in model.graph.output:
        o.type.CopyFrom(types[o.name])
        if not o.type.tensor_type.elem_type:
            o.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        if not o.type.tensor_type.HasField("shape"):  # unknown rank: say rank 1, unchecked
            o.type.tensor_type.shape.dim.add().dim_param = "unknown"
    onnx.checker.check_model(model)
    return model


def node_model(op: str, inputs: Sequence[tuple[str, np.ndarray | None]], n_out: int = 1, *,
               as_initializers: bool = False, opset: int = 18, **attrs) -> onnx.ModelProto:
    """One `op` node; inputs are (name, array) pairs, a None array is an absent optional input.

    Outputs are named y0, y1, ...; with as_initializers the arrays are constants."""
    names = [name if arr is not None else "" for name, arr in inputs]
    while names and names[-1] == "":
        names.pop()
    outputs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outputs, **attrs)
    present = {name: arr for name, arr in inputs if arr is not None}
    if as_initializers:
        return make_model([node], initializers=present, outputs=outputs, opset=opset)
    return make_model([node], inputs=present, outputs=outputs, opset=opset)


def run(model: onnx.ModelProto, feeds: Arrays | None = None, **kw) -> dict[str, np.ndarray]:
    """Run with the engine's NumPy executor. Where the graph gets a specialized plan, a second
    run takes it (memory plan, simplification, fused kernels) and must agree with the first,
    unplanned one: every case of the suites that use this checks both paths."""
    ex = Executor(model, np, **kw)
    first = ex.run_unplanned(dict(feeds or {}))
    if ex.optimize:
        planned = ex.run(dict(feeds or {}))
        if any(ex._specialized.values()):
            for k, v in first.items():
                _agree(k, planned[k], v)
    return first


def _agree(name: str, planned, first) -> None:
    if isinstance(first, list):  # a sequence
        assert isinstance(planned, list) and len(planned) == len(first), name
        for p, f in zip(planned, first, strict=True):
            _agree(name, p, f)
        return
    if first is None or planned is None:
        assert first is None and planned is None, name
        return
    a, b = np.asarray(planned), np.asarray(first)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype.kind in "fc":
        tol = 1e-5 if a.dtype.itemsize <= 4 else 1e-11
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, equal_nan=True,
                                   err_msg=f"planned run differs: {name}")
    else:
        np.testing.assert_array_equal(a, b, err_msg=f"planned run differs: {name}")


def run_ort(model: onnx.ModelProto, feeds: Arrays | None = None) -> dict[str, np.ndarray]:
    """Run with onnxruntime on CPU (all graph outputs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds or {})), strict=True))


@functools.cache
def ort_u8s8_saturates() -> bool:
    """Whether onnxruntime's uint8 x int8 integer products (MatMulInteger, and the QLinearConv /
    QLinearMatMul its QDQ fusions make) saturate on this CPU: without AVX-512 VNNI its kernels
    add pairs of products in int16 with saturation (vpmaddubsw), so 255 * 127 twice comes out
    as 32767 (measured on an AVX2 machine: 65534 for 129540). Exactness checks against those
    kernels only hold where this is False."""
    from onnx import TensorProto

    k = 4
    a, b = np.full((1, k), 255, np.uint8), np.full((k, 1), 127, np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k]),
                           helper.make_tensor_value_info("b", TensorProto.INT8, [k, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 10)])
    return int(run_ort(model, {"a": a, "b": b})["y"].item()) != 255 * 127 * k


def run_reference(model: onnx.ModelProto, feeds: Arrays | None = None
                  ) -> dict[str, np.ndarray]:
    """Run with onnx.reference.ReferenceEvaluator (all graph outputs)."""
    from onnx.reference import ReferenceEvaluator

    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(None, dict(feeds or {})),
                    strict=True))


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every float64 tensor, type and Cast target turned into float32."""
    return convert_floats(model, np.float64, np.float32)


def distinct(rng: np.random.Generator, shape: Sequence[int], spread: float = 1.0,
             dtype=np.float64) -> np.ndarray:
    """Values that are pairwise at least spread/size apart (no ties for max/argmax)."""
    n = int(np.prod(shape))
    vals = (rng.permutation(n) - n / 2) * (2 * spread / max(n, 1))
    return (vals + rng.uniform(0, 0.3 * spread / max(n, 1), n)).reshape(shape).astype(dtype)


def away_from_zero(rng: np.random.Generator, shape: Sequence[int], low: float = 0.2,
                   high: float = 1.5, dtype=np.float64) -> np.ndarray:
    """Random values with |x| in [low, high] and random sign (no kinks for Relu/Abs)."""
    mag = rng.uniform(low, high, shape)
    return (mag * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def assert_same(got, want, rtol: float = 1e-5, atol: float = 1e-6, what: str = "",
                low_tol: float | None = None) -> None:
    """Equal shape and dtype; floats within rtol/atol (NaN matches NaN), others exactly.
    float16, bfloat16 and float8 values are compared in float64 (with tolerances raised to
    `low_tol` when given)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.dtype.kind == "V" or want.dtype == np.float16:
        got, want = got.astype(np.float64), want.astype(np.float64)
        if low_tol is not None:
            rtol, atol = max(rtol, low_tol), max(atol, low_tol)
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


@dataclass
class KernelCase:
    """One node against a reference: `ref` is "ort" (onnxruntime), "reference" (ONNX's
    reference evaluator, where onnxruntime lacks the op or differs) or a per-file variant."""
    id: str
    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    opset: int = 18
    n_out: int = 1
    ref: object = "ort"
    rtol: float = 1e-5
    atol: float = 1e-6

    def __str__(self) -> str:
        return self.id


class KernelTable:
    """The case table of a kernel test file: `table.add(op, id, inputs, **attrs)`; the file
    exposes `CASES = table.cases` (the kernel-coverage test reads it)."""

    def __init__(self, opset: int = 18, rtol: float = 1e-5, atol: float = 1e-6,
                 suffix: str = ""):
        self.cases: list[KernelCase] = []
        self.opset, self.rtol, self.atol, self.suffix = opset, rtol, atol, suffix

    def add(self, op: str, id: str, inputs, *, opset: int | None = None, n_out: int = 1,
            ref: object = "ort", rtol: float | None = None, atol: float | None = None,
            **attrs) -> None:
        opset = self.opset if opset is None else opset
        suffix = self.suffix.format(opset=opset)
        self.cases.append(KernelCase(f"{op}-{id}{suffix}", op, list(inputs), attrs, opset, n_out,
                                     ref, self.rtol if rtol is None else rtol,
                                     self.atol if atol is None else atol))


def ours_and_reference(c: KernelCase) -> tuple[dict, dict]:
    """Run a case's single-node model through the executor and through its reference
    (onnxruntime, or ONNX's reference evaluator when c.ref == "reference")."""
    model = node_model(c.op, c.inputs, c.n_out, opset=c.opset, **c.attrs)
    feeds = {n: a for n, a in c.inputs if a is not None}
    want = run_ort(model, feeds) if c.ref == "ort" else run_reference(model, feeds)
    return run(model, feeds), want
