"""Pre-flight memory estimate of a training run, per rank, before anything large is allocated:
the training graph is built from shapes alone (ONNX shape inference, big weights never read) and
its planned order is walked with every value's lifetime, plus each kernel's scratch memory."""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trainer.autodiff.params import mask_candidates
from trainer.data import PREFETCH_THREAD
from trainer.errors import ModelError, TrainerError
from trainer.graph import STUB_LOCATION, without_initializers

LARGE = 1 << 16  # elements: initializers above this are never read by the estimate
_STUB = STUB_LOCATION
# Ops whose NumPy/CuPy kernels return a view of their first input (no new memory).
VIEWS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity",
                   "Expand"})
# Ops whose outputs the CPU executor's static plan writes into planned buffers (out=); other
# kernels allocate their outputs afresh at every run.
POOLED_OPS = frozenset("""Add Sub Mul Div Neg Exp Log Sqrt Tanh Abs Reciprocal Floor Ceil Equal
Greater Less GreaterOrEqual LessOrEqual Where Relu Sum MatMul Gemm ReduceSum ReduceMean Conv
ConvTranspose""".split())
_MEASURE_CAP = 256 << 20  # bytes of a kernel's inputs and outputs above which it is not run
_MEASURE_BATCHES = (2, 3)  # local batch sizes whose kernel scratch is measured, then extended


# Memory ONNX's shape inference may take beyond the model's own bytes: its data propagation
# allocates by a tensor's declared length (a Reshape to [2^40, 0] in a 359-byte model took
# 10 GB, all a machine had, before the estimate could refuse the model)
_INFER_HEADROOM = 1 << 30


@contextmanager
def bounded_address_space(extra: int):
    """Within the block, this process may map at most `extra` more bytes than it has mapped
    now (RLIMIT_AS): an allocation beyond that is a MemoryError, not the machine's memory.
    Without the resource module or /proc (not Linux), under a tighter limit, or while other
    threads run, unbounded: the limit is the process's, so another thread's allocations would
    fail, and two threads' blocks (ranks run as threads) restored each other's limits, which
    left the process bounded for good."""
    import threading

    try:
        if threading.active_count() > 1:
            raise ValueError("other threads run")
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f
                          if line.startswith("VmSize:"))
        limit = mapped + int(extra)
        if soft != resource.RLIM_INFINITY and soft <= limit or \
                hard != resource.RLIM_INFINITY and hard < limit:
            raise ValueError("a tighter limit holds")
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError, StopIteration):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Incomplete(Exception):
    """Shapes that ONNX shape inference could not make concrete (the probe path takes over)."""


# -- the model without its large tensors -------------------------------------------------------
def load_structure(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at `path` as load_model checks it, but with external tensors of more than
    LARGE elements left unread (their dims and types are all the estimate needs), except
    the candidates for an additive mask, whose values decide whether they train."""
    from trainer.graph import (
        _external_data,
        _read_external_data,
        check_model,
        densify_sparse_initializers,
        inline_functions,
        known_type_codes,
        readable_model_file,
        stored_tensors,
        tensor_inputs,
        unknown_dims_symbolic,
        unparsable,
    )

    path = readable_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for corrupt files
        raise ModelError(f"cannot parse ONNX model {path}: {unparsable(path, exc)}") from None
    external = _external_data(stored_tensors(model, str(path)), path.parent, str(path))
    check_model(path, str(path))
    known_type_codes(model, str(path))
    tensor_inputs(model, str(path))
    masks = mask_candidates(model)
    _read_external_data([f for f in external if _elements(f[0]) <= LARGE or f[0].name in masks],
                        str(path))
    # sparse initializers as load_model makes them, dense (a large one a stub: its dims)
    g = model.graph
    large = [sp for sp in g.sparse_initializer if math.prod(sp.dims) > LARGE]
    g.initializer.extend(_stub(sp.values.name, sp.values.data_type, sp.dims) for sp in large)
    keep = [sp for sp in g.sparse_initializer if math.prod(sp.dims) <= LARGE]
    del g.sparse_initializer[:]
    g.sparse_initializer.extend(keep)
    densify_sparse_initializers(model, str(path))
    model = inline_functions(model)  # (as load_model)
    unknown_dims_symbolic(model)
    return model


def _elements(t: onnx.TensorProto) -> int:
    return math.prod(t.dims) if t.dims else 1


def is_stub(t: onnx.TensorProto) -> bool:
    """A tensor whose values were not read (external data left on disk, or stripped)."""
    return t.data_location == onnx.TensorProto.EXTERNAL


def strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose initializers of more than LARGE elements (candidates for an
    additive mask aside) keep only their name, type and dims: cheap to copy, to infer shapes on
    and to build a training graph from."""
    out = without_initializers(model)
    masks = mask_candidates(model)  # (whose values tell a mask from a parameter)
    for t in model.graph.initializer:
        if (_elements(t) > LARGE and t.name not in masks) or is_stub(t):
            stub = _stub(t.name, t.data_type, t.dims)
            stub.metadata_props.extend(t.metadata_props)  # (the exporter's records)
            out.graph.initializer.append(stub)
        else:
            out.graph.initializer.append(t)
    return out


def _stub(name: str, data_type: int, dims: Iterable[int]) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=_STUB)
    return t


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim): protobuf
    frees a model's tensors into the heap, where they stayed part of the process's resident
    memory, and of its peak once the optimizer's state was allocated beside them."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # (not glibc: musl, macOS)
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def stub_of(t: onnx.TensorProto) -> onnx.TensorProto:
    """A stub of `t` (is_stub: no values), keeping its name, type, shape, doc string and
    metadata."""
    stub = _stub(t.name, t.data_type, t.dims)
    stub.doc_string = t.doc_string
    stub.metadata_props.extend(t.metadata_props)
    return stub


def _with_data_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its stub initializers (for helpers that read every initializer)."""
    out = without_initializers(model)
    out.graph.initializer.extend(t for t in model.graph.initializer if not is_stub(t))
    return out


def compute_structure(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """trainer.train.compute_form of a stripped model: stubs take the compute type unread."""
    from trainer.train import compute_form

    stubs = [t for t in model.graph.initializer if is_stub(t)]
    out = compute_form(_with_data_only(model), precision)
    target = onnx.TensorProto.DOUBLE if precision == "fp64" else onnx.TensorProto.FLOAT
    floats = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT)
    out.graph.initializer.extend(
        _stub(t.name, target if t.data_type in floats else t.data_type, t.dims) for t in stubs)
    return _autocast(out, precision)


def _autocast(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The training step's forward: with bf16/fp16, the 16-bit copies of the products' inputs
    and outputs (trainer.autocast) are values of the step too."""
    from trainer.autocast import LOW, autocast

    return autocast(model, precision)[0] if precision in LOW else model


# -- shapes without running ---------------------------------------------------------------------
def infer(model: onnx.ModelProto, in_shapes: Mapping[str, tuple[int, ...]], rounds: int = 4
          ) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], list[str]]:
    """(shape, dtype) of every value ONNX shape inference makes concrete for these input
    shapes, and the values produced by nodes that it leaves unknown. Between rounds, values
    computed from constants and static shapes (shape arithmetic) are folded in as initializers,
    so that shapes read from tensors (Reshape, Expand, ConstantOfShape) become known too."""
    from trainer.autodiff.build import _constant_values
    from trainer.graph import np_dtype, tensor_type

    m = without_initializers(model)
    m.graph.initializer.extend(model.graph.initializer)
    for vi in m.graph.input:
        if vi.name in in_shapes:
            shape = tensor_type(vi.type).shape
            del shape.dim[:]
            for d in in_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    del m.graph.value_info[:]
    for vi in m.graph.output:  # (what the model declares may be wrong: plcmos_v2 declares a
        if vi.type.HasField("tensor_type"):  # scalar its Squeeze makes [batch]; inferred)
            vi.type.tensor_type.ClearField("shape")
    produced = [o for n in model.graph.node for o in n.output if o]
    made = set(produced)
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    folded: set[str] = set()
    for _ in range(rounds):
        try:
            with bounded_address_space(_INFER_HEADROOM + 4 * m.ByteSize()):
                inferred = onnx.shape_inference.infer_shapes(
                    m, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort; unknown values fall back
            inferred = m  # (MemoryError included: the probe path then names the node)
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = tensor_type(vi.type)
            if vi.type.WhichOneof("value") != "tensor_type" or not t.elem_type or \
                    not t.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if all(d >= 0 for d in dims):
                try:
                    shapes[vi.name] = (tuple(dims), np_dtype(t.elem_type))
                except (KeyError, ValueError, TypeError):
                    continue
        for t in model.graph.initializer:
            try:
                shapes[t.name] = (tuple(t.dims), np_dtype(t.data_type))
            except (KeyError, ValueError, TypeError):
                continue
        custom = _custom_shapes(m, shapes)  # (the engine's own ops: no ONNX schema)
        missing = [o for o in produced if o not in shapes]
        if not missing:
            break
        values = _constant_values(_with_data_only(m), shapes)
        new = [k for k in values if k in made and k not in folded]
        if not new and not custom:
            break
        for k in new:
            folded.add(k)
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(values[k]), k))
            shapes[k] = (tuple(np.shape(values[k])), np.asarray(values[k]).dtype)
    return shapes, [o for o in produced if o not in shapes]


def _custom_shapes(m: onnx.ModelProto, shapes: dict) -> bool:
    """Shapes of the outputs of the engine's own ops (kernels.CUSTOM_SHAPES) whose inputs'
    are known, into `shapes` and as value infos of m (for the next round of inference);
    whether any was new."""
    from trainer.kernels import CUSTOM_DOMAIN, CUSTOM_SHAPES, collective, ctc, nn  # noqa: F401

    new = False
    for n in m.graph.node:
        f = CUSTOM_SHAPES.get(n.op_type) if n.domain == CUSTOM_DOMAIN else None
        if f is None or all(o in shapes for o in n.output if o) or \
                any(i and i not in shapes for i in n.input):
            continue
        for o, (shape, dt) in zip(n.output, f(*[shapes[i] if i else None for i in n.input]),
                                  strict=False):
            if o and o not in shapes:
                shapes[o] = (tuple(int(d) for d in shape), np.dtype(dt))
                m.graph.value_info.append(helper.make_tensor_value_info(
                    o, helper.np_dtype_to_tensor_dtype(np.dtype(dt)), list(shape)))
                new = True
    return new


# -- the training graph from shapes -------------------------------------------------------------
@dataclass
class Structure:
    """The training graph built without values, and what the estimate reads from it."""

    model: onnx.ModelProto
    loss: str
    gradients: dict[str, str]  # parameter -> gradient value
    state: dict[str, str]  # BatchNormalization statistic -> its updated value
    table: list  # trainer.autodiff.params.ParamInfo rows
    chosen: list[str]
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]]
    missing: list[str]  # values without a concrete shape
    out_shape: tuple[int, ...]  # the loss output's shape
    consts: dict[str, np.ndarray] = field(default_factory=dict)


def training_structure(model: onnx.ModelProto, loss, trainable="all", frozen=(),
                       batchnorm="train", in_shapes: Mapping[str, tuple] | None = None
                       ) -> Structure:
    """The training graph of a stripped model (see `strip`), as build_training_graph makes it,
    with shapes from ONNX shape inference instead of a run on zeros. Raises Incomplete where
    inference leaves a value that the rules need unknown, or control flow needs lowering."""
    from trainer.autodiff import build as B
    from trainer.autodiff.lookups import tie_folded_lookups
    from trainer.autodiff.params import (
        batchnorm_stats,
        repair_exported_model,
        stop_detached,
        tie_folded_copies,
    )
    from trainer.autodiff.subgraph import needs_lowering
    from trainer.graph import lift_weights, needs_recurrent_opset, recurrent_opset

    spec = B.LossSpec.of(loss)
    if spec.type not in B.LOSS_TYPES:
        raise ModelError(f"unknown loss type '{spec.type}'")
    if needs_lowering(model.graph):
        raise Incomplete("control flow or sequences to lower")
    if needs_recurrent_opset(model):  # (as build_training_graph: opset-9 RNNs converted)
        model = recurrent_opset(model)
        if needs_recurrent_opset(model):
            raise Incomplete("an opset-9 recurrent model that its stub values do not convert")
    B.loss_output_of(model, spec)
    eval_bn = B._eval_batchnorm(model, batchnorm)
    in_shapes = dict(in_shapes or {})
    first, missing = infer(model, in_shapes)
    if missing:
        raise Incomplete(f"{len(missing)} forward value(s) without a static shape, e.g. "
                         f"'{missing[0]}'")
    m = without_initializers(model)
    m.graph.initializer.extend(model.graph.initializer)
    lift_weights(m)  # (weights in subgraphs or Constant nodes: initializers)
    try:
        repair_exported_model(m)
    except Exception:  # noqa: BLE001 - a stub source: the aliases stay shared (same bytes)
        pass
    tie_folded_lookups(m)  # (as training does; reads only its candidates, mask candidates)
    if not any(is_stub(t) for t in m.graph.initializer):
        tie_folded_copies(m)  # (as training does; finding copies compares values)
    stop_detached(m)
    bn_stats = batchnorm_stats(m.graph.node)
    opset = B.ensure_default_opset(m)
    fw = B.training_forward(m, first, B._constant_values(_with_data_only(m), first, trainable),
                            opset, spec, eval_bn, in_shapes)
    fwd, loss_name, state, spec = fw.model, fw.loss, fw.state, fw.spec
    shapes, missing = infer(fwd, {**in_shapes, **fw.target_shapes})
    if missing:
        raise Incomplete(f"{len(missing)} value(s) of the forward and loss without a static "
                         f"shape, e.g. '{missing[0]}'")
    table, chosen, grads, _ = B.attach_backward(
        m, fw, shapes, B._constant_values(_with_data_only(fwd), shapes, trainable), trainable,
        frozen, bn_stats, opset)
    all_shapes, missing = infer(fwd, {**in_shapes, **fw.target_shapes})
    consts = B._constant_values(_with_data_only(fwd), all_shapes, trainable)
    out_shape = shapes[spec.output][0]
    return Structure(fwd, loss_name, dict(grads), state, table, chosen, all_shapes, missing,
                     tuple(out_shape), consts)


# -- liveness -----------------------------------------------------------------------------------
@dataclass
class Walk:
    peak: int  # bytes of values and kernel scratch at the worst point of one step
    kept: int  # bytes alive when the forward (and loss) ends: what the backward reads
    peak_node: str


def walk(model: onnx.ModelProto, nbytes: Mapping[str, int], fed: Iterable[str],
         fetched: Iterable[str], scratch: Mapping[str, int] | None = None,
         boundary: str | None = None, pooled: bool = False) -> Walk:
    """Bytes alive over one run of the graph in the executor's order: a value lives from its
    node to its last reader (fetched values to the end), views share their source's memory,
    and node k adds its kernel scratch while it runs. `boundary` names the loss value.

    `pooled` models a static memory plan (the executor's, on a CPU or a GPU): every value of
    POOLED_OPS that does not leave the run gets a buffer of its exact size, reused by later
    values of the same size once it is dead, and all buffers stay allocated; other values are
    fresh."""
    from trainer.graph import node_name, topo_sort

    g = model.graph
    scratch = scratch or {}
    fetched = set(fetched)
    listed = list(g.node)
    names = {id(n): node_name(n, i) for i, n in enumerate(listed)}
    available = set(fed) | {t.name for t in g.initializer} | {v.name for v in g.input}
    nodes = topo_sort(listed, available)
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                last[x] = i
    for f in fetched:
        last[f] = len(nodes)
    root: dict[str, str | None] = {}
    for n in nodes:
        for o in n.output:
            if not o:
                continue
            src = n.input[0] if n.input else ""
            root[o] = root.get(src) if n.op_type in VIEWS else o
    end: dict[str, int] = {}
    leaves: set[str] = set()
    for v, r in root.items():
        if r is not None:
            end[r] = max(end.get(r, -1), last.get(v, -1))
            if v in fetched:
                leaves.add(r)
    live, peak, kept, at = 0, 0, None, ""
    pool_total = 0
    free: dict[int, int] = {}  # pooled buffers by size: how many are free
    alive: dict[str, tuple[int, bool]] = {}
    expiring: dict[int, list[str]] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o and root.get(o) == o:
                b = int(nbytes.get(o, 0))
                in_pool = pooled and o not in leaves and n.op_type in POOLED_OPS
                if in_pool:
                    if free.get(b):
                        free[b] -= 1
                    else:
                        pool_total += b
                else:
                    live += b
                alive[o] = (b, in_pool)
                expiring.setdefault(max(end.get(o, i), i), []).append(o)
        name = names[id(n)]
        here = live + pool_total + int(scratch.get(name, 0))
        if here > peak:
            peak, at = here, name
        for r in expiring.pop(i, ()):
            b, in_pool = alive.pop(r, (0, False))
            if in_pool:
                free[b] = free.get(b, 0) + 1
            else:
                live -= b
        if boundary is not None and boundary in n.output:
            kept = live + pool_total - sum(b * k for b, k in free.items())
    return Walk(peak, kept or 0, at)


# -- kernel scratch, measured at small batches --------------------------------------------------
def kernel_scratch(small: Mapping[int, Structure], batch: int, cap: int = _MEASURE_CAP,
                   budget_s: float = 20.0, device: bool = False) -> dict[str, int]:
    """{node name: bytes} each kernel allocates beyond its outputs while it runs, measured
    with tracemalloc on zeros at the local batch sizes of `small` ({b: structure built at
    batch b}) and extended to `batch`: linearly, except for kernels that split their work into
    chunks (convolutions: see _extend). `device`: the step runs on a GPU, whose kernels chunk
    differently (measured with the host kernels chunking as they do). Kernels whose inputs and
    outputs exceed `cap` bytes, with subgraphs or without a kernel are not run (0). Under a
    tracemalloc trace started by the caller, its peak is reset. Nothing is measured ({})
    where starting tracemalloc is unsafe (see tracing_is_safe)."""
    import tracemalloc

    from trainer.kernels import nn

    sizes = sorted(small)
    per: dict[int, dict[str, tuple]] = {}
    if not tracing_is_safe():
        return {}
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    as_device, nn.CHUNK_AS_DEVICE = nn.CHUNK_AS_DEVICE, device
    try:
        deadline = time.monotonic() + budget_s
        cache: dict[tuple, tuple] = {}
        for b in sizes:
            per[b] = _measure(small[b], cap, deadline, cache)
    finally:
        nn.CHUNK_AS_DEVICE = as_device
        if started:
            tracemalloc.stop()
    if len(sizes) == 1:
        return {k: w for k, (w, _) in per[sizes[0]].items()}
    b0, b1 = sizes[0], sizes[-1]
    return {name: _extend(per[b0][name], per[b1][name], b0, b1, batch, device)
            for name in set(per[b0]) & set(per[b1])}


def _extend(m0: tuple, m1: tuple, b0: int, b1: int, batch: int, device: bool) -> int:
    """A kernel's scratch at `batch` from (bytes, chunking decisions) measured at b0 and b1.
    Without decisions, linear in the batch. With them, the scratch is taken as linear in the
    bytes of the largest chunk's columns (images per chunk x bytes per image), with image
    counts and bytes per image extended linearly and the chunk at `batch` decided as the
    kernel decides it. (Extended linearly instead, the convolutions of a 1-channel CNN at batch
    512 were estimated at 14 MB of scratch where they take 2-4 MB.)"""
    from trainer.kernels.nn import chunk_images

    (w0, log0), (w1, log1) = m0, m1
    linear = max(0, int(round(w0 + (w1 - w0) * (batch - b0) / (b1 - b0))))
    d0, d1 = _decisions(log0), _decisions(log1)
    if not d0 or len(d0) != len(d1):
        return linear

    def columns(decisions) -> int:
        return max(chunk_images(n, p, device) * p for n, p in decisions)

    def at(n0: int, p0: int, n1: int, p1: int) -> tuple[int, int]:
        if n0 == n1 and p1 > p0:  # the batch inside each image: a weight gradient as a Conv
            per = max(1, int(round(n0 * (p1 - p0) / (b1 - b0))))  # over channels, which the
            return batch, per  # planner runs as chunks of the batch (ConvWeightGrad)
        return tuple(max(1, int(round(v0 + (v1 - v0) * (batch - b0) / (b1 - b0))))
                     for v0, v1 in ((n0, n1), (p0, p1)))
    x0, x1 = columns(d0), columns(d1)
    xb = columns([at(*a, *b) for a, b in zip(d0, d1, strict=True)])
    if x0 == x1:
        return linear if xb != x0 else max(w0, w1)
    return max(0, int(round(w0 + (w1 - w0) * (xb - x0) / (x1 - x0))))


def _decisions(log) -> list[tuple[int, int]]:
    """A kernel's chunking decisions, one per bytes-per-image (a chunked call repeats its own
    for each chunk), each with the largest image count it was asked for, in first order."""
    first: dict[int, int] = {}
    for n, p in log:
        first[p] = max(first.get(p, 0), n)
    return [(n, p) for p, n in first.items()]


def tracing_is_safe() -> bool:
    """Whether tracemalloc may be started and stopped now: it is process-wide, and doing so
    while another thread allocates can crash CPython before 3.12.9/3.13.2 (gh-128679; seen
    here as segfaults when ranks emulated as threads ran kernels meanwhile). So only on the
    main thread, once the batch prefetch threads (one gather each) have finished, with no
    other Python thread alive."""
    me = threading.current_thread()
    if me is not threading.main_thread():
        return False
    others = [t for t in threading.enumerate() if t is not me]
    for t in others:
        if t.name == PREFETCH_THREAD:
            t.join()
    return not any(t.is_alive() for t in others)


def _measure(st: Structure, cap: int, deadline: float, cache: dict[tuple, tuple]
             ) -> dict[str, tuple]:
    """{node name: (scratch bytes, chunking decisions)} of the kernels of one structure, run
    one by one on zeros (constants with their values); kernels with the same op, attributes
    and input shapes are run once."""
    import inspect
    import tracemalloc

    from trainer.backend import StepRNG
    from trainer.graph import attrs_of, node_name, opset_of
    from trainer.kernels import get_kernel

    model = st.model
    found: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        if time.monotonic() > deadline:
            break
        name = node_name(node, i)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            continue
        ins = [st.shapes.get(x) if x else None for x in node.input]
        outs = [st.shapes.get(o) for o in node.output if o]
        if any(x and s is None for x, s in zip(node.input, ins, strict=True)) or \
                any(s is None for s in outs):
            continue
        if sum(_nb(s) for s in ins if s) + sum(_nb(s) for s in outs) > cap:
            continue
        key = (node.op_type, node.domain, _attr_key(node), tuple(ins),
               tuple(x in st.consts for x in node.input))
        if key not in cache:
            cache[key] = _scratch_of(node, model, st, ins, get_kernel, opset_of, attrs_of,
                                     StepRNG, inspect, tracemalloc)
        found[name] = cache[key]
    return found


def _scratch_of(node, model, st, ins, get_kernel, opset_of, attrs_of, StepRNG, inspect,
                tracemalloc) -> tuple[int, tuple]:
    """(bytes the node's kernel allocates beyond its outputs, its chunking decisions)."""
    from trainer.kernels import nn

    nn.CHUNK_LOG = []
    try:
        return (_scratch_bytes(node, model, st, ins, get_kernel, opset_of, attrs_of, StepRNG,
                               inspect, tracemalloc), tuple(nn.CHUNK_LOG))
    finally:
        nn.CHUNK_LOG = None


_WARMED: set[tuple] = set()  # (domain, op, input dtypes) of kernels run once before measuring


def _scratch_bytes(node, model, st, ins, get_kernel, opset_of, attrs_of, StepRNG, inspect,
                   tracemalloc) -> int:
    fn = get_kernel(node.op_type, opset_of(model, node.domain), node.domain)
    if fn is None:
        return 0
    attrs = attrs_of(node)
    params = inspect.signature(fn).parameters
    if "rng" in params:
        attrs["rng"] = StepRNG(np, 0)
    if "n_outputs" in params:
        attrs["n_outputs"] = len(node.output)
    args = [None if not x else (np.asarray(st.consts[x]) if x in st.consts
                                else np.zeros(s[0], s[1]))
            for x, s in zip(node.input, ins, strict=True)]
    first = (node.domain, node.op_type, tuple(None if a is None else a.dtype.str for a in args))
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if first not in _WARMED:  # (a compiled host kernel's first call compiles or loads
                _WARMED.add(first)    # it: megabytes that are no scratch of the step)
                fn(np, *args, **attrs)
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            result = fn(np, *args, **attrs)
    except Exception:  # noqa: BLE001 - a kernel that needs real values: no measurement
        return 0
    peak = tracemalloc.get_traced_memory()[1]
    own = sum(r.nbytes for r in result if isinstance(r, np.ndarray) and r.base is None)
    return max(0, peak - before - own)


def _nb(s: tuple) -> int:
    return int(math.prod(s[0])) * np.dtype(s[1]).itemsize


def _attr_key(node: onnx.NodeProto) -> bytes:
    return b"".join(a.SerializeToString(deterministic=True) for a in node.attribute)


# -- the estimate ---------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Bytes per rank of one training step at its worst point, by what holds them."""

    trainable: int  # values
    trainable_bytes: int
    frozen: int  # values of float initializers not trained (and not statistics)
    frozen_bytes: int
    parameters: int  # trained values, frozen tensors and constants, statistics
    gradients: int
    optimizer: int  # optimizer state and scratch
    activations: int  # forward values alive when the loss is computed (read by the backward)
    workspace: int  # the rest of the step's peak: backward temporaries, kernel scratch
    batches: int  # the batch being trained on, and the one prefetched (host memory on CPU)
    allreduce: int  # bytes each rank sends through the gradient all-reduce per step
    method: str  # how the values' sizes were found
    peak_node: str = ""
    out_shape: tuple[int, ...] = ()  # the loss output's shape at the local batch
    seconds: float = 0.0
    trained: tuple[str, ...] = ()  # the tensors trained (names), `frozen` the others left out
    left_out: tuple[str, ...] = ()
    # the set-up's peak before step 1: the model loaded, converted and its training graph
    # built hold SETUP_COPIES copies of its values for a while (see SETUP_COPIES)
    setup: int = 0

    @property
    def total(self) -> int:
        """The training state: what a step holds."""
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.workspace + self.batches)

    @property
    def peak(self) -> int:
        """The run's peak: the training state's, or the set-up's where that is higher (a
        frozen backbone: a few copies of the model for a while, one in training)."""
        return max(self.total, self.setup)


# copies of the values not trained a run holds (see estimate): those of SHARED_MIN elements
# or more once (trainer.train.Trainer.shared), smaller ones in each model form and executor
CONSTANT_COPIES = 4
SHARED_MIN = 1024  # elements
# copies of the model's values the set-up holds at its peak (the model as loaded, its values
# read once into arrays, which its converted forms and training graphs hold as stubs, the flat
# buffer they move to): measured 3.0-3.4 on 2048- and 4096-wide MatMul models, their backbone
# frozen or trained (the pre-flight's libraries included), 1.8-2.2 on a 4-layer Transformer
# encoder (BENCHMARKS.md, 2026-12-07, session 17; it was 5.5 while every form of the model
# and every probe of the build held the values)
SETUP_COPIES = 3.0


def estimate(model: onnx.ModelProto, *, loss, batch: int,
             in_shapes: Mapping[str, tuple[int, ...]], trainable="all", frozen=(),
             batchnorm="train", precision: str = "fp32", optimizer=None, world: int = 1,
             eval_copy: bool = False, compress: str | None = None, full_model=None,
             scratch: bool = True, pooled: bool = True, batch_bytes: int = 0,
             shard_optimizer: bool = False,
             constant_shapes: Callable[[int], Mapping[str, tuple]] | None = None,
             device: bool = False, at_batch_only: bool = False,
             accumulate: int = 1) -> Estimate:
    """The memory of one training step per rank for `model` (a stripped model, see `strip`)
    at local batch `batch`; `in_shapes` gives every data input's full shape at that batch.
    Shapes come from ONNX shape inference; where it leaves some unknown, the training graph is
    built and run at local batches 2 and 3 (`full_model()` loads the model with its values)
    and every size is extended linearly to `batch`. Kernel scratch is measured on zeros at
    batches 2 and 3 for kernels of at most 256 MiB (`scratch=False`: not measured). `pooled`:
    the CPU executor's static memory plan (see `walk`); `batch_bytes`: the data batches held
    on the device; `shard_optimizer`: ZeRO-1 over `world` ranks (1/N of the optimizer state,
    plus the rank's reduced gradient shard); `constant_shapes(b)`: the shapes at local batch
    b of the inputs fed the same value every step (data.constants), whose batch axis, if
    any, need not be the first; `device`: the step runs on a GPU (its convolutions split the
    batch into larger chunks than the host's); `at_batch_only`: a probe runs at `batch` itself
    (the model holds values made for that batch: integer data.constants baked in);
    `accumulate`: micro-batches per step (their gradients are added into the flat buffer)."""
    from trainer.contrib import lower_contrib
    from trainer.unfuse import unfuse_conv_batchnorms

    def standard(m: onnx.ModelProto) -> onnx.ModelProto:  # (as the training graph is built)
        return unfuse_conv_batchnorms(lower_contrib(m))[0]

    t0 = time.perf_counter()
    sm = compute_structure(standard(model), precision)

    def at(b: int) -> dict[str, tuple[int, ...]]:
        fixed = dict(constant_shapes(b)) if constant_shapes is not None else {}
        return {**{k: (b,) + tuple(v[1:]) for k, v in in_shapes.items() if k not in fixed},
                **fixed}

    fixed = _fixed_batch(sm)
    small_batches = (batch,) if fixed or at_batch_only else _MEASURE_BATCHES
    try:
        st = training_structure(sm, loss, trainable, frozen, batchnorm, at(batch))
        if st.missing:
            raise Incomplete(f"'{st.missing[0]}'")
        method = "ONNX shape inference"
        nbytes = {k: _nb(v) for k, v in st.shapes.items()}
        small = {}
        if scratch:
            for b in small_batches:
                small[b] = st if b == batch else training_structure(
                    sm, loss, trainable, frozen, batchnorm, at(b))
    except (Incomplete, ModelError) as why:
        # A model error found from shapes alone is confirmed (or not) by the real build below.
        if full_model is None:
            if isinstance(why, ModelError):
                raise
            raise TrainerError(f"the memory estimate needs the model's values: {why}") from None
        full = standard(full_model())
        note = ""
        try:
            small = {b: _probed_structure(full, loss, trainable, frozen, batchnorm, at(b),
                                          precision) for b in small_batches}
        except TrainerError as failed:
            if small_batches == (batch,):
                raise
            # (a model that does not run at the small batches, Longformer's TorchScript
            # export at 2: the configured batch alone, which training runs)
            note = (f"; the model does not run at batch {', '.join(map(str, small_batches))}: "
                    f"{' '.join(str(failed).split())[:160]}")
            small_batches = (batch,)
            small = {batch: _probed_structure(full, loss, trainable, frozen, batchnorm,
                                              at(batch), precision)}
        st = small[small_batches[0]]
        nbytes = _extended({b: {k: _nb(v) for k, v in s.shapes.items()}
                            for b, s in small.items()}, batch)
        method = (f"probe at batch {', '.join(map(str, small_batches))}, scaled to {batch} "
                  f"(from shapes alone: {why}){note}")
        st = _scaled_out_shape(st, small, batch)
    if scratch and small and not tracing_is_safe():
        scratch = False
        method += "; kernel scratch not measured (other threads are running)"
    work = kernel_scratch(small, batch, device=device) if scratch and small else {}
    fed = list(st.chosen) + list(st.state)
    fetched = [st.loss] + list(st.gradients.values()) + list(st.state.values())
    w = walk(st.model, nbytes, fed, fetched, work, boundary=st.loss, pooled=pooled)
    inits = {t.name: t for t in st.model.graph.initializer}
    dtype = _itemsize(inits[st.chosen[0]]) if st.chosen else 4
    n_train = sum(_elements(inits[k]) for k in st.chosen)
    stats = sum(_nbytes_tensor(inits[k]) for k in st.state if k in inits)
    held = [t for k, t in inits.items() if k not in st.gradients and k not in st.state]
    shared = sum(_nbytes_tensor(t) for t in held if _elements(t) >= SHARED_MIN)
    const = sum(_nbytes_tensor(t) for t in held) - shared
    from trainer.autodiff.params import STATE

    left = [r for r in st.table if r.name not in st.gradients and r.role != STATE]
    frozen_n = sum(math.prod(r.shape) if r.shape else 1 for r in left)
    frozen_b = sum(_nbytes_tensor(inits[r.name]) for r in left if r.name in inits)
    # the values not trained (frozen tensors, constants) of SHARED_MIN elements or more are
    # held once by the run, for every executor; smaller ones by the model as loaded, its run
    # form, the training graph and the plan's arrays, and an evaluation's inference form and
    # plan (BENCHMARKS.md: a frozen 32 MiB backbone)
    params = n_train * dtype + stats + shared + const * (
        CONSTANT_COPIES + (3 if eval_copy else 0))
    grads = (n_train + 4) * dtype  # (+ the loss, stop, finiteness and norm slots)
    if accumulate > 1:  # (each micro-batch's gradients, added into the flat buffer)
        grads += n_train * dtype
    sharded = shard_optimizer and world > 1
    shard = -(-n_train // world) if sharded else n_train
    opt = optimizer_bytes(optimizer, shard, dtype, st.chosen,
                          [_elements(inits[k]) for k in st.chosen],
                          {r.name: r.alias for r in st.table if r.alias}) if optimizer else 0
    if world > 1 and compress:
        grads += n_train * 2  # the 16-bit copy that travels
    elif sharded:
        grads += shard * dtype  # the reduce-scattered gradient of this rank's shard
    sent = 0 if world <= 1 else n_train * (2 if compress else dtype) + 2 * dtype
    values = n_train * dtype + stats + shared + const  # (the model's, as training holds them)
    return Estimate(n_train, n_train * dtype, frozen_n, frozen_b, params, grads, opt, w.kept,
                    max(0, w.peak - w.kept), batch_bytes, sent, method, w.peak_node,
                    st.out_shape, time.perf_counter() - t0, tuple(st.chosen),
                    tuple(r.name for r in left), int(SETUP_COPIES * values + batch_bytes))


def _fixed_batch(model: onnx.ModelProto) -> bool:
    from trainer.graph import tensor_type

    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        dims = tensor_type(vi.type).shape.dim
        if vi.name not in inits and dims and dims[0].HasField("dim_value"):
            return True
    return False


def _itemsize(t: onnx.TensorProto) -> int:
    from trainer.graph import np_dtype

    return np_dtype(t.data_type).itemsize


def _nbytes_tensor(t: onnx.TensorProto) -> int:
    try:
        return _elements(t) * _itemsize(t)
    except (KeyError, ValueError, TypeError):
        return 0


def _extended(sizes: Mapping[int, Mapping[str, int]], batch: int) -> dict[str, int]:
    """Per value, the bytes at `batch` from the bytes at two (or one) other batches."""
    bs = sorted(sizes)
    if len(bs) == 1:
        return dict(sizes[bs[0]])
    b0, b1 = bs[0], bs[-1]
    out = {}
    for k, v0 in sizes[b0].items():
        v1 = sizes[b1].get(k, v0)
        out[k] = max(0, int(round(v0 + (v1 - v0) * (batch - b0) / (b1 - b0))))
    return out


def _scaled_out_shape(st: Structure, small: Mapping[int, Structure], batch: int) -> Structure:
    bs = sorted(small)
    if len(bs) < 2:
        return st
    s0, s1 = small[bs[0]].out_shape, small[bs[-1]].out_shape
    st.out_shape = tuple(int(a + (b - a) * (batch - bs[0]) / (bs[-1] - bs[0]))
                         for a, b in zip(s0, s1, strict=True))
    return st


def _probed_structure(model: onnx.ModelProto, loss, trainable, frozen, batchnorm,
                      shapes: Mapping[str, tuple], precision: str) -> Structure:
    """The real training graph at a small batch, its values' shapes found by running it."""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.autodiff.build import LossSpec, _constant_values
    from trainer.autodiff.params import parameter_table
    from trainer.executor import probe
    from trainer.graph import input_dtypes
    from trainer.train import compute_form

    m = _autocast(compute_form(model, precision), precision)
    tm = build_training_graph(m, loss, trainable, frozen=frozen, shapes=dict(shapes),
                              batchnorm=batchnorm)
    info = training_info(tm)
    inits = {t.name for t in tm.graph.initializer}
    dts = input_dtypes(tm)
    feeds = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
             for vi in tm.graph.input if vi.name not in inits}
    found = probe(tm, feeds, {k: dts[k] for k in feeds})
    spec = LossSpec.of(loss)
    out = spec.output if spec.output in found else info.outputs[0]
    own = {t.name for t in m.graph.initializer} | set(info.gradients)
    table = [r for r in parameter_table(tm, list(tm.graph.node), info.loss, found)
             if r.name in own]  # (not the constants the training graph added)
    return Structure(tm, info.loss, dict(info.gradients), dict(info.state), table,
                     list(info.gradients), found, [], tuple(found[out][0]),
                     _constant_values(tm, found))


class _CountingXP:
    """An array module whose arrays hold nothing: it counts the bytes it was asked for (to size
    an optimizer's buffers without allocating them)."""

    def __init__(self) -> None:
        self.bytes = 0

    def _take(self, shape, dtype) -> np.ndarray:
        n = math.prod(shape) if isinstance(shape, tuple | list) else int(shape)
        self.bytes += n * np.dtype(dtype or np.float64).itemsize
        return np.empty(0, dtype)

    def empty(self, shape, dtype=None, **_):
        return self._take(shape, dtype)

    zeros = empty
    ones = empty

    def full(self, shape, fill, dtype=None, **_):
        return self._take(shape, dtype)

    def asarray(self, a, dtype=None, **_):
        a = np.asarray(a, dtype)
        self.bytes += a.nbytes
        return np.empty((0,) + a.shape[1:], a.dtype)

    def __getattr__(self, name):
        return getattr(np, name)


def optimizer_bytes(cfg, size: int, dtype: int | np.dtype, names: list[str],
                    sizes: list[int], aliases: Mapping[str, str] | None = None) -> int:
    """Bytes the optimizer of `cfg` allocates for these parameters (state, scratch, and the
    per-element settings of parameter groups): counted by building it over an array module
    that allocates nothing and taking one step, with every tensor of 1 and then 2 elements
    (all its buffers are as long as the flat parameters), extended to `size`."""
    from trainer.config import ConfigError
    from trainer.optim import make_optimizer

    dt = np.dtype(f"f{dtype}") if isinstance(dtype, int) else np.dtype(dtype)

    def count(each: int) -> int:
        xp = _CountingXP()
        layout = [(name, k * each, each) for k, name in enumerate(names)]
        try:
            opt = make_optimizer(cfg, xp, each * len(names), dt, layout, aliases)
            empty = np.empty(0, dt)
            opt.step(empty, empty, float(cfg.lr))
        except ConfigError:  # (a group glob matching no trained tensor: what train refuses)
            raise
        except (ValueError, TypeError, IndexError):
            pass  # a step's shapes that an empty buffer does not fit: the state is counted
        return xp.bytes

    if not names:
        return 0
    one, two = count(1), count(2)
    per = (two - one) / len(names)
    return int(round(one - per * len(names) + per * size))


# -- what the device holds ----------------------------------------------------------------------
def available_memory(xp=np) -> tuple[int | None, str]:
    """(free bytes, what was read) on the device of `xp`: the GPU's free memory, or on CPU
    MemAvailable of /proc/meminfo (None where neither can be read)."""
    if xp is not np:
        try:
            free, _ = xp.cuda.runtime.memGetInfo()
            return int(free), "free GPU memory"
        except Exception:  # noqa: BLE001 - no usable answer from the driver
            return None, "GPU memory (unknown)"
    found: tuple[int | None, str] = (None, "available memory (unknown)")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = (int(line.split()[1]) * 1024, "MemAvailable")
                    break
    except OSError:
        pass
    # (a container's or a Slurm job's memory limit: the kernel ends the process there, with
    # the host's MemAvailable still large)
    limited = cgroup_available()
    if limited is not None and (found[0] is None or limited < found[0]):
        return limited, "the memory cgroup's limit less its use"
    return found


def cgroup_available(proc_cgroup: str = "/proc/self/cgroup",
                     root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup (v2, or v1's memory controller) and its parents
    still allow: the lowest limit less that cgroup's use without its inactive file cache
    (reclaimable), as container runtimes count a working set; None where none is set."""
    try:
        with open(proc_cgroup) as f:
            lines = [ln.rstrip("\n").split(":", 2) for ln in f if ln.count(":") >= 2]
    except OSError:
        return None
    places = []  # (folder, limit file, use file)
    for _, controllers, path in lines:
        if controllers == "":  # v2
            places.append((os.path.join(root, path.lstrip("/")), "memory.max",
                           "memory.current", "inactive_file"))
        elif "memory" in controllers.split(","):  # v1
            places.append((os.path.join(root, "memory", path.lstrip("/")),
                           "memory.limit_in_bytes", "memory.usage_in_bytes",
                           "total_inactive_file"))
    best = None
    for folder, limit_file, use_file, inactive_key in places:
        # (in a container's namespace its own cgroup is the controller's root: the path
        # named may not exist there)
        here = folder
        seen = set()
        while here not in seen:
            seen.add(here)
            left = _cgroup_left(here, limit_file, use_file, inactive_key)
            if left is not None and (best is None or left < best):
                best = left
            if os.path.normpath(here) == os.path.normpath(
                    os.path.join(root, "memory") if limit_file.endswith("bytes") else root):
                break
            here = os.path.dirname(here)
    return best


def _cgroup_left(folder: str, limit_file: str, use_file: str, inactive_key: str) -> int | None:
    try:
        with open(os.path.join(folder, limit_file)) as f:
            raw = f.read().strip()
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:  # (no limit)
            return None
        limit = int(raw)
        with open(os.path.join(folder, use_file)) as f:
            used = int(f.read().strip())
        inactive = 0
        try:
            with open(os.path.join(folder, "memory.stat")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == inactive_key:
                        inactive = int(value)
                        break
        except (OSError, ValueError):
            pass
        return max(0, limit - max(0, used - inactive))
    except (OSError, ValueError):
        return None


def human(n: float) -> str:
    """Bytes as a short human-readable size (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
