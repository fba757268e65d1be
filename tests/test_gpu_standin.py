"""The GPU code path without a GPU, through tests/strictxp.py (a strict CuPy stand-in): kernels, the
node suite, training steps, optimizers, MPI staging (`mpirun ... python tests/test_gpu_standin.py
comm`), checkpoints and export match the NumPy run, and a step reads nothing back."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a program under mpirun
    sys.path.insert(0, str(ROOT))

from tests import strictxp as sx  # noqa: E402
from tests.families import FAMILIES, family_config, family_training_graph  # noqa: E402
from tests.mpi_run import run_mpi  # noqa: E402
from tests.opcases import make_model  # noqa: E402
from trainer import backend  # noqa: E402
from trainer.errors import ModelError, TrainerError  # noqa: E402
from trainer.executor import HOST_INPUTS, Executor  # noqa: E402

F32 = np.float32
TRAINER = str(ROOT / "trainer")


@pytest.fixture
def gpu(monkeypatch):
    """trainer.backend finds the stand-in as CuPy (one GPU); transfers counted from zero."""
    return sx.install(monkeypatch)


def host(a) -> np.ndarray:
    return backend.to_host(a)


def d2h_outside(paths: tuple[str, ...] = ()) -> list[str]:
    """Device reads since the last reset made by trainer code other than `paths`."""
    return [w for (f, _, _), w in zip(sx.TRANSFERS.d2h_sites, sx.TRANSFERS.where(),
                                      strict=True)
            if f.startswith(TRAINER) and not any(f.endswith(p) for p in paths)]


# -- the stand-in is strict -----------------------------------------------------------------------
def test_standin_refuses_implicit_host_device_mixing(gpu):
    xp = gpu
    d = xp.asarray(np.arange(4, dtype=F32))
    h = np.ones(4, F32)
    for bad in (lambda: np.asarray(d), lambda: np.array(d), lambda: d + h, lambda: h + d,
                lambda: np.add(h, d), lambda: xp.concatenate([d, h]), lambda: xp.where(d > 1, h, d),
                lambda: list(d), lambda: [v for v in d], lambda: range(d[0])):
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        d[1:3] = h[:2]
    d[1:3] = np.float32(7)  # scalars are fine, as on CuPy
    d += 1
    assert isinstance(d + np.float32(2), xp.ndarray) and isinstance(d.sum(), xp.ndarray)
    assert d.sum().ndim == 0 and isinstance(d[0], xp.ndarray)
    np.testing.assert_array_equal(host(d), [1, 8, 8, 4])


def test_standin_refuses_what_cupy_lacks(gpu):
    import ml_dtypes

    xp = gpu
    d = xp.asarray(np.arange(6, dtype=F32).reshape(2, 3))
    with pytest.raises(TypeError, match="sparse"):
        xp.indices((2, 3), sparse=True)
    with pytest.raises(TypeError, match="initial"):
        xp.max(d, initial=0)
    with pytest.raises(TypeError, match="initial"):
        d.min(axis=0, initial=1)
    with pytest.raises(NotImplementedError):
        xp.maximum.reduce(d)
    with pytest.raises(AttributeError):
        _ = xp.errstate
    for dt in (object, "U3", ml_dtypes.float8_e4m3fn, ml_dtypes.int4) + (
            () if sx.BFLOAT16 else (ml_dtypes.bfloat16,)):
        with pytest.raises(ValueError, match="Unsupported dtype"):
            xp.asarray(np.zeros(2, dt))
        with pytest.raises(ValueError, match="Unsupported dtype"):
            d.astype(dt)
    halves = [np.float16] + [ml_dtypes.bfloat16] * sx.BFLOAT16
    for half in (xp.asarray(np.ones((2, 3, 4), dt)) for dt in halves):
        with pytest.raises(TypeError):  # CuPy batches float32/64 only
            xp.matmul(half, half.swapaxes(1, 2))
        xp.matmul(half[0], half[0].T)  # 2-D float16 and bfloat16 are fine


def test_standin_counts_every_transfer(gpu):
    xp = gpu
    d = xp.asarray(np.arange(3, dtype=F32))
    assert (sx.TRANSFERS.h2d, sx.TRANSFERS.d2h) == (1, 0)
    sx.reset()
    d.get(), d[0].item(), float(d[0]), int(d[1]), bool(d[2]), d.tolist(), xp.asnumpy(d)
    assert sx.TRANSFERS.d2h == 7
    d.set(np.zeros(3, F32))
    assert sx.TRANSFERS.h2d == 1
    assert all(w.startswith(__file__) for w in sx.TRANSFERS.where())


def test_standin_detects_synchronization_like_cupyx(gpu):
    d = gpu.asarray(np.ones(3, F32))
    with gpu.x.allow_synchronize(False):
        d = d * 2 + 1  # device work only
        with pytest.raises(gpu.x.DeviceSynchronized):
            float(d.sum())
    assert float(d.sum()) == 9.0


def test_peak_memory_tracks_live_device_arrays(gpu):
    with backend.PeakMemory(gpu) as mem:
        a = gpu.zeros(1000, F32)
        b = a + 1
        del b
        c = a * 2
    assert mem.peak == 8000 and c.shape == (1000,)
    with backend.PeakMemory(np) as none:
        np.zeros(10)
    assert none.peak is None


# -- finding CuPy, picking the GPU ---------------------------------------------------------------
def test_get_xp_finds_the_standin_through_the_seam(gpu):
    assert backend.get_xp("gpu") is gpu and backend.get_xp("auto") is gpu
    assert backend.get_xp("cpu") is np
    assert backend.device_name(gpu) == "gpu strictxp stand-in (cupy)"


def test_each_rank_uses_its_own_gpu(monkeypatch):
    xp = sx.install(monkeypatch, devices=4)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "6")
    assert backend.get_xp("gpu") is xp
    assert xp.cuda.uses == [2] and xp.cuda.Device().id == 2  # local rank 6 of 4 GPUs
    assert backend.select_device(xp, 1) == 1 and xp.cuda.Device().id == 1


def test_cupy_13_is_refused(monkeypatch):
    """CuPy 13 (which the gpu-cuda12 extra allowed) refuses the int64 scatter-add/max/min the
    kernels use, and holds no bfloat16: the GPU path says it needs 14 (found by a CuPy audit)."""
    xp = sx.install(monkeypatch)
    monkeypatch.setattr(xp, "__version__", "13.6.0")
    with pytest.raises(TrainerError, match="needs CuPy 14 or later, found 13.6.0"):
        backend.get_xp("gpu")


def test_gpu_without_a_gpu_is_one_clear_error(monkeypatch):
    sx.install(monkeypatch, devices=0)
    assert backend.get_xp("auto") is np
    with pytest.raises(TrainerError) as err:
        backend.get_xp("gpu")
    assert "\n" not in str(err.value) and "device: cpu" in str(err.value)

    def no_cupy():
        raise ImportError("No module named 'cupy'")
    monkeypatch.setattr(backend, "_import_cupy", no_cupy)
    assert backend.cupy_or_none() is None
    with pytest.raises(TrainerError, match="gpu-cuda13"):
        backend.get_xp("gpu")


def test_gpu_extras_match_the_cuda_versions():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    # (14 on CUDA 12 too: CuPy 13 refuses the int64 scatter reductions the kernels use)
    assert extras["gpu-cuda12"] == ["cupy-cuda12x>=14"]
    assert extras["gpu-cuda13"] == ["cupy-cuda13x>=14"]
    assert extras["gpu"] == extras["gpu-cuda13"]


# -- kernels: the case tables of tests/test_kernels*.py, NumPy against the stand-in ----------------
_TABLES = {"test_kernels": "KCASES", "test_kernels_math": "CASES", "test_kernels_shape": "CASES",
           "test_kernels_norm_attention": "CASES", "test_kernels_image": "CASES"}


def _kernel_cases() -> list:
    out = []
    for module, attr in _TABLES.items():
        for c in getattr(importlib.import_module(f"tests.{module}"), attr):
            arrays = [a for _, a in c.inputs if a is not None]
            if all(backend.device_dtype_ok(a.dtype) and a.dtype.name != "bfloat16"
                   for a in arrays):  # inputs a GPU can hold
                out.append(pytest.param(c, id=f"{module[13:] or 'core'}:{c.id}"))
    return out


def case_model(c, shape_inputs_constant: bool) -> tuple[onnx.ModelProto, dict]:
    """The case's node with its inputs as graph inputs; with shape_inputs_constant, the inputs
    a kernel reads on the host (Reshape's shape, ...) are initializers instead (the usual form
    in exported models: the device executor keeps them on the host)."""
    pos = HOST_INPUTS.get(c.op, ()) if shape_inputs_constant else ()
    names = [n if a is not None else "" for n, a in c.inputs]
    while names and names[-1] == "":
        names.pop()
    outs = [f"y{i}" for i in range(getattr(c, "n_out", 1))]
    node = helper.make_node(c.op, names, outs, **c.attrs)
    inits = {n: a for k, (n, a) in enumerate(c.inputs) if a is not None and k in pos}
    feeds = {n: a for k, (n, a) in enumerate(c.inputs) if a is not None and k not in pos}
    model = make_model([node], inputs=feeds, initializers=inits, outputs=outs, opset=c.opset)
    return model, feeds


def check_on_device(model: onnx.ModelProto, feeds: dict, xp, rtol=1e-5, atol=1e-6,
                    random: bool = False) -> tuple[dict, list[str]]:
    """Run model on NumPy and on xp (CuPy or the stand-in) and compare every output. Outputs of
    dtypes CuPy cannot hold must fail with a clear error instead. Returns the device outputs
    and the device reads the run made in trainer code (always [] on CuPy: not counted)."""
    ref = Executor(model, np).run(dict(feeds))
    unholdable = [k for k, v in ref.items() if isinstance(v, np.ndarray) and v.dtype.kind
                  not in "OUS" and (v.dtype.kind == "V" or not backend.device_dtype_ok(v.dtype))]
    ex = Executor(model, xp)
    dev_feeds = {k: v if v.dtype.kind in "OUS" else xp.asarray(v) for k, v in feeds.items()}
    sx.reset()
    try:
        out = ex.run(dev_feeds)
    except (ModelError, ValueError) as exc:
        if not unholdable:
            raise
        # float8 / int4 (and bfloat16 without ml_dtypes): a clear error, not a wrong result
        assert "GPU" in str(exc) or "Unsupported dtype" in str(exc), exc
        return {}, []
    reads = d2h_outside() if xp is sx else []
    for k, want in ref.items():
        got = out[k]
        if isinstance(want, list):
            got, want = [host(v) for v in got], want
        else:
            got, want = [host(got)], [want]
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, w.dtype, g.shape)
            if random:
                continue
            if w.dtype.kind in "fc":
                r, a = (max(rtol, 2e-3), max(atol, 2e-3)) if w.dtype.itemsize == 2 else (
                    rtol, atol)
                np.testing.assert_allclose(g, w, rtol=r, atol=a, err_msg=k)
            else:
                np.testing.assert_array_equal(g, w, err_msg=k)
    return out, reads


@pytest.mark.parametrize("case", _kernel_cases())
def test_kernel_case_on_the_gpu_path(gpu, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for constant in (False, True):
            model, feeds = case_model(case, constant)
            _, reads = check_on_device(model, feeds, gpu)
            if constant and HOST_INPUTS.get(case.op):  # shape-like constants: no read-back
                assert not reads, reads


def test_onnx_node_suite_on_the_gpu_path(gpu):
    """Every case of ONNX's node suite that passes on the CPU and whose tensors a GPU can hold
    (about 1500: float ops, integer ops, strings on the host, sequences), through
    onnx_backend.prepare(model, "CUDA") against the case's expected outputs."""
    from tests.onnx_conformance import collect, device_failure, normalized_sets, read_expected

    expected = set(read_expected())

    def holdable(x) -> bool:
        if x is None:
            return True
        if isinstance(x, list):
            return all(holdable(v) for v in x)
        return isinstance(x, np.ndarray) and (x.dtype.kind in "OUS" or (
            backend.device_dtype_ok(x.dtype) and x.dtype.name != "bfloat16"))

    failures, ran = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in collect():
            if case.name in expected:
                continue
            sets = normalized_sets(case)
            if not all(holdable(x) for i, o in sets for x in i + o):
                continue
            ran += 1
            if (failure := device_failure(case, sets)) is not None:
                failures.append(failure)
    assert ran > 1400
    assert not failures, "\n".join(failures)


# -- what issue 13 found, one by one --------------------------------------------------------------
def _run_twice(model, feeds, xp):
    """Device outputs of the second run, with the transfers of that run only."""
    ex = Executor(model, xp)
    dev = {k: xp.asarray(v) for k, v in feeds.items()}
    ex.run(dev)
    sx.reset()
    return ex, ex.run(dev)


def test_shape_arithmetic_of_exported_graphs_stays_on_the_host(gpu):
    """PyTorch's Shape -> Gather -> Unsqueeze -> Concat -> Reshape, and a Shape-derived scale
    used as data: no device read; unplanned, the scale is copied up once per run; planned, the
    shape arithmetic is folded and its values copied up once, when the plan is made; results
    as NumPy's."""
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(F32)
    c = numpy_helper.from_array
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Constant", [], ["i0"], value=c(np.array(0, np.int64))),
             helper.make_node("Gather", ["s", "i0"], ["n"]),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("Shape", ["x"], ["last"], start=-1),
             helper.make_node("Cast", ["last"], ["lastf"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["lastf"], ["scale"]),
             helper.make_node("Div", ["flat", "scale"], ["y"]),
             helper.make_node("Size", ["x"], ["count"])]
    model = make_model(nodes, inputs={"x": x}, outputs=("y", "count"),
                       initializers={"ax": np.array([0], np.int64),
                                     "minus1": np.array([-1], np.int64)})
    ex, out = _run_twice(model, {"x": x}, gpu)
    assert {"s", "n", "n1", "shape", "last", "lastf", "scale", "count"} <= ex.host_values
    assert sx.TRANSFERS.d2h == 0
    assert sx.TRANSFERS.h2d == 0  # planned: the scale and the count are device constants
    np.testing.assert_allclose(host(out["y"]), x.reshape(4, -1) / np.sqrt(F32(5)), rtol=1e-6)
    assert isinstance(out["count"], gpu.ndarray) and int(out["count"]) == x.size
    sx.reset()
    again = ex.run_unplanned({"x": gpu.asarray(x)})
    assert sx.TRANSFERS.d2h == 0
    assert sx.TRANSFERS.h2d == 3  # x, then the scale (read as data) and the fetched count
    np.testing.assert_array_equal(host(again["y"]), host(out["y"]))


def test_range_and_onehot_with_host_and_device_inputs(gpu):
    c = numpy_helper.from_array
    nodes = [helper.make_node("Constant", [], ["zero"], value=c(np.array(0, np.int64))),
             helper.make_node("Constant", [], ["one"], value=c(np.array(1, np.int64))),
             helper.make_node("Shape", ["x"], ["s"], start=1),
             helper.make_node("Squeeze", ["s"], ["n"]),
             helper.make_node("Range", ["zero", "n", "one"], ["r"]),
             helper.make_node("OneHot", ["idx", "depth", "vals"], ["hot"]),
             helper.make_node("Range", ["a", "b", "d"], ["r2"])]
    feeds = {"x": np.zeros((2, 6), F32), "idx": np.array([[1, 4], [-1, 0]], np.int64),
             "a": np.array(1.5, F32), "b": np.array(4.0, F32), "d": np.array(0.5, F32)}
    model = make_model(nodes, inputs=feeds, outputs=("r", "hot", "r2"),
                       initializers={"depth": np.array(5, np.int64),
                                     "vals": np.array([0, 3], np.int64)})
    out, _ = check_on_device(model, feeds, gpu)
    np.testing.assert_array_equal(host(out["r"]), np.arange(6))
    _, _ = _run_twice(model, feeds, gpu)
    assert sx.TRANSFERS.d2h == 3  # Range over device scalars reads its 3 inputs (data-dependent)


def test_scatter_and_gather_nd_read_nothing_back(gpu):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(5, 3)).astype(F32)
    nodes = [helper.make_node("ScatterND", ["data", "rows", "upd"], ["a"], reduction="add"),
             helper.make_node("ScatterElements", ["data", "cols", "upd2"], ["b"], axis=1,
                              reduction="add"),
             helper.make_node("GatherND", ["data", "rows"], ["c"])]
    feeds = {"data": data, "rows": np.array([[1], [3], [1], [1]], np.int64),
             "upd": rng.normal(size=(4, 3)).astype(F32),
             "cols": np.array([[0, 0, 2]] * 5, np.int64), "upd2": np.ones((5, 3), F32)}
    model = make_model(nodes, inputs=feeds, outputs=("a", "b", "c"), opset=18)
    check_on_device(model, feeds, gpu)
    _run_twice(model, feeds, gpu)
    assert sx.TRANSFERS.d2h == 0 and sx.TRANSFERS.h2d == 0


def test_pooling_reads_nothing_back_and_copies_its_tables_once(gpu):
    x = np.random.default_rng(2).normal(size=(2, 3, 6, 6)).astype(F32)
    x[0, 1, 2, 3] = np.nan  # MaxPool keeps argmax's NaN semantics without a check
    nodes = [helper.make_node("MaxPool", ["x"], ["m", "i"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], pads=[1] * 4)]
    model = make_model(nodes, inputs={"x": x}, outputs=("m", "i", "a"))
    check_on_device(model, {"x": x}, gpu)
    _run_twice(model, {"x": x}, gpu)
    assert sx.TRANSFERS.d2h == 0 and sx.TRANSFERS.h2d == 0


def test_half_precision_batched_matmuls_run_on_the_gpu_path(gpu):
    """CuPy batches float16 matmul nowhere: MatMul, grouped Conv and its gradient's
    ConvTranspose take float32 internally on the device."""
    rng = np.random.default_rng(3)
    feeds = {"a": rng.normal(size=(2, 3, 4)).astype(np.float16),
             "b": rng.normal(size=(2, 4, 5)).astype(np.float16),
             "x": rng.normal(size=(1, 4, 5, 5)).astype(np.float16),
             "w": rng.normal(size=(4, 2, 3, 3)).astype(np.float16)}
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"]),
             helper.make_node("Conv", ["x", "w"], ["z"], group=2),
             helper.make_node("ConvTranspose", ["x", "w"], ["t"], group=2, strides=[2, 2])]
    model = make_model(nodes, inputs=feeds, outputs=("y", "z", "t"))
    check_on_device(model, feeds, gpu, rtol=2e-3, atol=2e-3)


def test_float8_cast_is_a_clear_error_on_the_gpu(gpu):
    x = np.ones(3, F32)
    model = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN)],
                       inputs={"x": x}, opset=19)
    with pytest.raises(ModelError) as err:
        Executor(model, gpu).run({"x": gpu.asarray(x)})
    assert "device: cpu" in str(err.value) and "\n" not in str(err.value)
    assert Executor(model, np).run({"x": x})["y"].dtype.name == "float8_e4m3fn"


def test_gradient_op_runs_on_the_gpu_path(gpu):
    nodes = [helper.make_node("Mul", ["a", "b"], ["c"]),
             helper.make_node("Gradient", ["a", "b"], ["da", "db"], xs=["a", "b"], y="c",
                              domain="ai.onnx.preview.training")]
    feeds = {"a": np.array([1.0, 2.0], F32), "b": np.array([3.0, 4.0], F32)}
    model = make_model(nodes, inputs=feeds, outputs=("da", "db"),
                       extra_opsets={"ai.onnx.preview.training": 1})
    check_on_device(model, feeds, gpu)


def test_constants_go_to_the_device_once(gpu):
    c = numpy_helper.from_array
    nodes = [helper.make_node("Constant", [], ["k"], value=c(np.full((3,), 2.0, F32))),
             helper.make_node("Mul", ["x", "k"], ["m"]),
             helper.make_node("Add", ["m", "bias"], ["y"])]
    x = np.arange(6, dtype=F32).reshape(2, 3)
    model = make_model(nodes, inputs={"x": x}, initializers={"bias": np.ones(3, F32)})
    _run_twice(model, {"x": x}, gpu)
    assert sx.TRANSFERS.h2d == 0 and sx.TRANSFERS.d2h == 0


def test_large_generated_tensors_are_made_on_the_device(gpu):
    """ConstantOfShape / Expand of constants into large tensors are not folded into constants
    (held for the executor's life, copied up): the device makes them at each run."""
    c = numpy_helper.from_array
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                              value=c(np.array([1.5], F32))),
             helper.make_node("Expand", ["one", "shape"], ["ones"]),
             helper.make_node("Add", ["x", "zeros"], ["a"]),
             helper.make_node("Mul", ["a", "ones"], ["y"])]
    x = np.ones((300, 400), F32)
    model = make_model(nodes, inputs={"x": x}, initializers={
        "shape": np.array([300, 400], np.int64), "one": np.array(2.0, F32)})
    ex, out = _run_twice(model, {"x": x}, gpu)
    assert sx.TRANSFERS.h2d == 0 and sx.TRANSFERS.d2h == 0
    assert all(np.size(v) < 1000 for v in ex.constants.values() if hasattr(v, "shape"))
    np.testing.assert_array_equal(host(out["y"]), np.full((300, 400), 5.0, F32))


def test_dropout_reads_its_ratio_once_and_builds_its_generators_once(gpu):
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y", "mask"])]
    x = np.ones((50, 40), F32)
    model = make_model(nodes, inputs={"x": x}, outputs=("y", "mask"),
                       initializers={"ratio": np.array(0.25, F32),
                                     "train": np.array(True)})
    ex = Executor(model, gpu, seed=3)
    built = sx.random.stats.generators
    dev = {"x": gpu.asarray(x)}
    sx.reset()
    outs = []
    for step in range(3):
        ex.rng.reseed(3, 0, step)
        outs.append(ex.run(dev))
    assert sx.TRANSFERS.d2h == 0 and sx.TRANSFERS.h2d == 0
    masks = [host(o["mask"]) for o in outs]
    out = outs[-1]
    # two cuRAND generators, each reseeded, never rebuilt: the steps' and the planning run's
    # (that run draws from a stream aside, so a planned step draws what an unplanned one would)
    assert sx.random.stats.generators - built == 2
    assert not np.array_equal(masks[0], masks[1])
    wide = {"x": gpu.asarray(np.ones((50, 80), F32))}  # a second shape: a second plan
    for step in range(2):
        ex.rng.reseed(3, 0, step)
        ex.run(wide)
    assert sx.random.stats.generators - built == 2 and len(ex._specialized) == 2
    ex.rng.reseed(3, 0, 1)
    np.testing.assert_array_equal(host(ex.run_unplanned(dev)["mask"]), masks[1])
    y = host(out["y"])
    np.testing.assert_array_equal(y, np.where(masks[-1], F32(1 / 0.75), F32(0)))
    assert abs(masks[-1].mean() - 0.75) < 0.03
    ex.rng.reseed(3, 0, 0)  # the same keys, the same draws
    np.testing.assert_array_equal(host(ex.run(dev)["mask"]), masks[0])


# -- training steps -------------------------------------------------------------------------------
def _train(cfg_dict: dict, tmp_path: Path, device: str):
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    cfg = config_from_dict({**cfg_dict, "device": device,
                            "output": str(tmp_path / f"{device}.onnx")}, tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    result = t.fit()
    losses = [r["loss"] for r in t.history if "loss" in r]
    return t, losses, result


def _compare_runs(cpu, gpu_run, rtol=1e-5, atol=1e-6) -> None:
    (tc, lc, _), (tg, lg, _) = cpu, gpu_run
    np.testing.assert_allclose(lg, lc, rtol=rtol)
    wc, wg = tc.trained_values(), tg.trained_values()
    assert set(wc) == set(wg)
    for k in wc:
        np.testing.assert_allclose(wg[k], wc[k], rtol=rtol, atol=atol, err_msg=k)


def _step_reads(t, steps: int = 3, logged: bool = False) -> list[list[str]]:
    """Device reads of each of `steps` optimizer steps (their code sites); `logged`: each
    step's metrics row made too, as at a step that logs."""
    lrs = t.schedule.lrs(t.step)
    per_step = []
    for _ in range(steps):
        _, arrays, lw, gw, _ = t._next_micro_batch()
        sx.reset()
        loss = t.train_step([(arrays, lw, gw)], lrs)
        if logged:
            row = t._step_row(0, loss, [lrs[0]], 1.0)
            assert t.cfg.grad_clip is None or row["grad_norm"] > 0
        per_step.append(sx.TRANSFERS.where())
    return per_step


@pytest.mark.parametrize("optimizer", [{"type": "sgd", "lr": 0.1, "momentum": 0.9},
                                       {"type": "adamw", "lr": 3e-3}])
def test_digits_mlp_trains_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path, digits_config,
                                                         optimizer, monkeypatch):
    # (the CPU reference: the NumPy kernels the device path mirrors; the host's compiled cross
    # entropy sums in float64, and AdamW's normalized step turns that into 1e-5 on an element
    # whose gradient is rounding noise)
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", "0")
    cfg = digits_config(steps=12, optimizer=optimizer, output="unused.onnx")
    cpu = _train(cfg, tmp_path, "cpu")
    run = _train(cfg, tmp_path, "gpu")
    assert run[0].xp is gpu and cpu[0].xp is np
    _compare_runs(cpu, run)
    assert abs(run[2]["eval_accuracy"] - cpu[2]["eval_accuracy"]) <= 1e-9
    plan = next(iter(run[0].plans.values()))
    reshapes = [ins for _, _, ins, _, _, op, _ in plan.executor.steps if op == "Reshape"]
    assert all(ins[1] in plan.executor.host_values for ins in reshapes)  # shape slots: host
    for reads in _step_reads(run[0]):
        assert not d2h_outside(("train.py",)), reads


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_models(tmp_path_factory.mktemp("models"))


def export_models(d: Path):
    """A BatchNorm CNN (tests/torch_models.py LeNet) and a GPT-style decoder
    (tests/transformer_models.py), exported by torch.onnx into d, with small datasets;
    returns config(kind, optimizer) -> a raw training config for one of them."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from tests import torch_models, transformer_models

    rng = np.random.default_rng(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnn = torch_models.export_onnx(torch_models.make_model("cnn", seed=3), "cnn")
        gpt_x = transformer_models.sample_input("gpt", 32, rng)
        gpt = transformer_models.export(transformer_models.make_model("gpt", seed=4), gpt_x,
                                        "dynamo")
    onnx.save(cnn, str(d / "cnn.onnx"))
    onnx.save(gpt, str(d / "gpt.onnx"))
    np.savez(d / "cnn.npz", x=rng.normal(size=(48, 1, 16, 16)).astype(F32),
             y=rng.integers(0, 10, 48))
    np.savez(d / "gpt.npz", x=gpt_x, y=transformer_models.sample_target("gpt", gpt_x, rng))

    def config(kind: str, optimizer: dict) -> dict:
        return {"model": str(d / f"{kind}.onnx"), "seed": 0,
                "data": {"train": {"path": str(d / f"{kind}.npz"), "inputs": {"x": "x"},
                                   "targets": {"label": "y"}},
                         "batch_size": 8, "shuffle": False},
                "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
                "optimizer": optimizer, "steps": 4, "log": {"every_steps": 1}}
    return config


# AdamW with eps 1e-4: an update moves by up to lr * d / eps for a gradient change d, and the
# two paths (different fusions and erf roundings) differ by d ~ 5e-10 on gradients at
# rounding-noise level (~1e-8, where others are ~1e-2, in rows of the GPT's tables); with
# the default eps 1e-8 that is a full-size step apart, with 1e-4 at most 1.5e-8 per step.
@pytest.mark.parametrize("kind,optimizer", [("cnn", {"type": "sgd", "lr": 0.05,
                                                     "momentum": 0.9}),
                                            ("gpt", {"type": "adamw", "lr": 3e-3,
                                                     "eps": 1e-4})])
def test_cnn_and_gpt_train_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path, exported, kind,
                                                        optimizer):
    cfg = exported(kind, optimizer)
    cpu = _train(cfg, tmp_path, "cpu")
    run = _train(cfg, tmp_path, "gpu")
    _compare_runs(cpu, run)
    # The executor, kernels and optimizer read nothing back during a step.
    for reads in _step_reads(run[0]):
        assert not d2h_outside(("train.py",)), reads


def test_a_qdq_model_trains_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path):
    # Fake quantization (QuantizeLinear/DequantizeLinear and their straight-through rules),
    # its learned scales included, on the device; nothing is read back during a step.
    from tests.test_grad_quant import qdq_mlp

    rng = np.random.default_rng(9)
    onnx.save(qdq_mlp(rng, classes=10)[0], str(tmp_path / "qdq.onnx"))
    np.savez(tmp_path / "qdq.npz", x=rng.normal(size=(48, 8)).astype(F32),
             y=rng.integers(0, 10, 48))
    cfg = {"model": str(tmp_path / "qdq.onnx"), "seed": 0,
           "data": {"train": {"path": str(tmp_path / "qdq.npz"), "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": 8, "shuffle": False},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "trainable": ["W*", "B*", "S1", "S_h"],
           "optimizer": {"type": "sgd", "lr": 0.1, "groups": [{"params": "S*", "lr": 1e-4}]},
           "steps": 4, "log": {"every_steps": 1}}
    cpu = _train(cfg, tmp_path, "cpu")
    run = _train(cfg, tmp_path, "gpu")
    _compare_runs(cpu, run)
    for reads in _step_reads(run[0]):
        assert not d2h_outside(("train.py",)), reads


@pytest.mark.parametrize("kind,clip", [("cnn", False), ("gpt", False), ("cnn", True)])
def test_a_logged_step_reads_back_at_most_the_loss(gpu, tmp_path, exported, kind, clip):
    # (with grad_clip the logged row holds the norm before clipping: it comes back with the
    # loss, in the same read)
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    raw = exported(kind, {"type": "sgd", "lr": 0.01})
    if clip:
        raw["grad_clip"] = {"max_norm": 0.5}
    cfg = config_from_dict({**raw, "device": "gpu", "output": str(tmp_path / "m.onnx")},
                           tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    for reads in _step_reads(t, logged=True):
        assert len(reads) <= 1, reads


# -- the planner on the device --------------------------------------------------------------------
def _new_arrays(gpu):
    """A memory hook counting the new device arrays (not views) made while it is open."""
    class Count(gpu.cuda.MemoryHook):
        name = "count_new_arrays"
        made = 0

        def malloc_postprocess(self, **kw):
            self.made += 1
    return Count()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_familys_training_graph_is_planned_on_the_device(gpu, zoo, name):
    """A device executor runs the planner's program, as the host's does (shape arithmetic
    folded, fused kernels, buffers planned once, out= kernels): its loss, gradients and
    BatchNorm statistics are those of the unplanned device program and of the host plan (to
    float32 rounding); a planned run reads nothing back, copies nothing up and makes fewer new
    device arrays than an unplanned run."""
    tm, feeds = family_training_graph(zoo[name])
    outs = [o.name for o in tm.graph.output]
    ex = Executor(tm, gpu)
    dev = {k: gpu.asarray(v) for k, v in feeds.items()}

    def run(unplanned=False):
        ex.rng.reseed(0, 0, 1)
        sx.reset()
        with _new_arrays(gpu) as made:
            out = (ex.run_unplanned if unplanned else ex.run)(dict(dev))
        moved = (sx.TRANSFERS.d2h, sx.TRANSFERS.h2d, sx.TRANSFERS.where(),
                 sx.TRANSFERS.where("h2d"))
        return {k: host(out[k]) for k in outs}, made.made, moved

    run()  # (the plan is made)
    planned, made_planned, moved = run()
    assert moved[:2] == (0, 0), moved[2:]
    plans = list(ex._specialized.values())
    assert len(plans) == 1 and plans[0] is not False, "no plan on the device"
    assert len(plans[0].steps) < len(ex.steps)
    unplanned, made_unplanned, _ = run(unplanned=True)
    assert made_planned < made_unplanned, (made_planned, made_unplanned)
    on_host = None if name == "dropout_mlp" else Executor(tm, np).run(dict(feeds))
    for k in outs:
        for want in ([unplanned[k]] + ([] if on_host is None else [on_host[k]])):
            want = np.asarray(want, np.float64)
            scale = max(float(np.abs(want).max(initial=0)), 1e-6)
            assert np.abs(planned[k].astype(np.float64) - want).max(initial=0) <= \
                2e-5 * scale, k


_BF16_FAMILIES = ("bn_cnn_training_form", "resnet_inference", "encoder_dynamo",
                  "token_rotary_dynamo")


@pytest.mark.parametrize("name,precision", [(n, "fp32") for n in FAMILIES] + [
    pytest.param(n, "bf16", marks=pytest.mark.skipif(
        not sx.BFLOAT16, reason="CuPy holds bfloat16 with NumPy >= 2.1.2 only"))
    for n in _BF16_FAMILIES])
def test_every_family_trains_on_the_device_as_on_the_host(monkeypatch, zoo, tmp_path, name,
                                                         precision):
    """Every family's job with the device path's options together: a captured graph, two
    micro-batches per step, two ranks (threads, a GPU each) with SyncBatchNorm; in float32
    and, for four families, with bfloat16 products. Each rank ends with the losses and weights
    of the same job on the host's two ranks (Dropout's masks come from another generator on a
    device: finite losses only)."""
    from trainer.comm.local import run_local
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    sx.install(monkeypatch, devices=2)

    def run(device: str) -> list:
        raw = family_config(zoo[name], name, output=str(tmp_path / f"{device}.onnx"),
                            device=device, precision=precision, accumulate=2,
                            gpu={"cuda_graph": True}, distributed={"sync_batchnorm": True})

        def job(comm):
            t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
            t.fit()
            errors = [] if device == "cpu" else \
                next(iter(t.plans.values())).executor.graph_errors
            return t.trained_values(), [r["loss"] for r in t.history if "loss" in r], errors
        return run_local(2, job)

    # The host's and the device's SyncBatchNorm statistics may differ in their last bit (BLAS
    # shortcuts in the host's sums); where a value lies at a rounding tie of bfloat16 or of a
    # fake quantization, the two round it a step apart. Measured: the ResNet in bfloat16,
    # losses 2e-5 apart after six steps, weights 1.4e-3; the quantized CNN, losses 5e-5 and
    # weights 6e-4 (without SyncBatchNorm: 0 and 1e-8); float32 otherwise 2.4e-7 and 3e-8.
    rtol, atol = (1e-2, 5e-3) if precision == "bf16" else (1e-3, 2e-3) if "qdq" in name \
        else (1e-5, 1e-6)
    for (want, want_losses, _), (got, losses, errors) in zip(run("cpu"), run("gpu"),
                                                            strict=True):
        assert not errors and len(losses) == 6 and np.isfinite(losses).all()
        if name == "dropout_mlp":
            continue
        np.testing.assert_allclose(losses, want_losses, rtol=rtol)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pointwise_convolutions_are_products_per_image_on_the_device(gpu, strides, dtype,
                                                                      monkeypatch):
    """A 1x1 convolution (a ResNet's shortcut, a bottleneck's ends) and its weight gradient on
    the device: one batched product, no columns and no transposed copy of the result (as on
    the host); float16 through float32 (CuPy batches no 16-bit product). Values as the host's."""
    from trainer.kernels import nn

    def no_columns(*args, **kwargs):
        raise AssertionError("im2col for a pointwise convolution")
    monkeypatch.setattr(nn, "im2col", no_columns)
    monkeypatch.setattr(nn, "im2col_wide", no_columns)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 5, 6, 7)).astype(dtype)
    w = rng.normal(size=(4, 5, 1, 1)).astype(dtype)
    b = rng.normal(size=4).astype(dtype)
    out = [-(-6 // strides[0]), -(-7 // strides[1])]
    args = (list(strides), [1, 1], [0, 0, 0, 0], out, 1)
    want = nn.conv_into(np, x, w, b, *args)
    sx.reset()
    got = nn.conv_into(gpu, gpu.asarray(x), gpu.asarray(w), gpu.asarray(b), *args)
    assert sx.TRANSFERS.d2h == 0
    np.testing.assert_allclose(host(got), want, rtol=2e-3 if dtype == np.float16 else 1e-6)
    dy = rng.normal(size=want.shape).astype(dtype)
    grad = (list(strides), [1, 1], [0, 0, 0, 0], 1)
    want = nn.conv_weight_grad_into(np, x, dy, [1, 1], *grad)
    got = nn.conv_weight_grad_into(gpu, gpu.asarray(x), gpu.asarray(dy), [1, 1], *grad)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(host(got), want, rtol=2e-3 if dtype == np.float16 else 1e-5,
                               atol=1e-2 if dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("method", ["conv", "rows", "fold", "phases"])
def test_device_convolutions_bound_their_columns_by_chunks_of_the_batch(gpu, monkeypatch,
                                                                        strides, method):
    """Conv, its weight gradient and ConvTranspose (its input gradient, each method) on the
    device split the batch where its columns would pass DEVICE_CONV_CHUNK_BYTES: the same
    values as the whole batch at once (bias, an uneven last chunk), and a peak that the
    budget bounds instead of the batch."""
    from trainer.kernels import nn

    rng = np.random.default_rng(4)
    n, c, m, h, k = 7, 3, 4, 9, 3
    x = rng.normal(size=(n, c, h, h)).astype(F32)
    w = rng.normal(size=(m, c, k, k)).astype(F32)
    b, bt = rng.normal(size=m).astype(F32), rng.normal(size=c).astype(F32)
    sp, dil, pads = list(strides), [1, 1], [1, 1, 1, 1]
    out = [(h + 2 - k) // s + 1 for s in strides]
    dy = rng.normal(size=(n, m, *out)).astype(F32)
    extra = [(h + 2 - k) % s for s in strides]
    geo = nn.conv_transpose_geometry(dy.shape, [k, k], sp, dil, pads, extra, None, "NOTSET")

    def run():
        xd, wd, bd, btd, dyd = (gpu.asarray(a) for a in (x, w, b, bt, dy))
        with backend.PeakMemory(gpu) as mem:
            y = nn.conv_into(gpu, xd, wd, bd, sp, dil, pads, out, 1)
            dw = nn.conv_weight_grad_into(gpu, xd, dyd, [k, k], sp, dil, pads, 1)
            dx = nn.conv_transpose_into(gpu, dyd, wd, btd, *geo, 1, method=method)
        return [host(a) for a in (y, dw, dx)], mem.peak

    whole, whole_peak = run()
    columns = c * k * k * out[0] * out[1] * 4  # bytes per image of the forward's columns
    monkeypatch.setattr(nn, "DEVICE_CONV_CHUNK_BYTES", 2 * columns)  # chunks of 2, 2, 2, 1
    chunked, chunked_peak = run()
    for got, want in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want = nn.conv_into(np, x, w, b, sp, dil, pads, out, 1)
    np.testing.assert_allclose(chunked[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked[2], nn.conv_transpose_into(np, dy, w, bt, *geo, 1),
                               rtol=1e-5, atol=1e-5)
    assert chunked_peak < whole_peak, (chunked_peak, whole_peak)


# -- CUDA graphs ----------------------------------------------------------------------------------
def test_standin_graphs_replay_the_captured_work_only(gpu):
    """The stand-in's capture records device work, as a stream capture records kernels: a
    launch recomputes it from the arrays' current contents, with host scalars frozen at their
    captured values; transfers, synchronization and work on the null stream are refused."""
    a, b, out = gpu.asarray(np.ones(4, F32)), gpu.asarray(np.arange(4, dtype=F32)), None
    s = gpu.cuda.Stream(non_blocking=True)
    k = 2.0
    with s:
        s.begin_capture()
        out = a * k + b
        out += 1
        graph = s.end_capture()
    a[...] = 5.0
    k = 3.0  # noqa: F841 - frozen in the graph
    graph.launch()
    np.testing.assert_array_equal(host(out), 5.0 * 2 + np.arange(4) + 1)
    with pytest.raises(RuntimeError, match="default"):
        gpu.cuda.Stream(null=True).begin_capture()
    def on_the_null_stream():
        with gpu.cuda.Stream(null=True):
            return a + b
    for work in (lambda: float(a.sum()), lambda: gpu.asarray(np.ones(2)), s.synchronize,
                 on_the_null_stream):
        with s:
            s.begin_capture()
            try:
                with pytest.raises(sx.StreamCaptureUnsupported):
                    work()
            finally:
                s.end_capture()


def _graph_run(cfg_dict: dict, tmp_path: Path, graphed: bool, steps: int = 5):
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    raw = {**cfg_dict, "device": "gpu", "steps": steps, "gpu": {"cuda_graph": graphed},
           "output": str(tmp_path / f"graph_{graphed}.onnx")}
    stream = io.StringIO()
    t = Trainer(config_from_dict(raw, tmp_path), stream=stream)
    t.fit()
    return t, [r["loss"] for r in t.history if "loss" in r], stream.getvalue()


@pytest.mark.parametrize("kind,optimizer", [("cnn", {"type": "sgd", "lr": 0.05,
                                                     "momentum": 0.9}),
                                            ("gpt", {"type": "adamw", "lr": 3e-3})])
def test_a_cuda_graph_step_trains_as_the_uncaptured_step(gpu, tmp_path, exported, kind,
                                                          optimizer):
    """gpu.cuda_graph: from the second step on, the training step's forward and backward are
    one graph launch; the run is bit for bit the uncaptured one (new batches reach the graph
    through its input buffers, parameters are read in place, the loss and BatchNorm
    statistics come back as copies), and a captured step reads nothing back."""
    cfg = exported(kind, optimizer)
    plain, plain_losses, _ = _graph_run(cfg, tmp_path, False)
    captures = sx.cuda.captures
    run, losses, log = _graph_run(cfg, tmp_path, True)
    assert "gpu.cuda_graph: the training step is captured" in log
    assert losses == plain_losses
    for k, v in plain.trained_values().items():
        np.testing.assert_array_equal(run.trained_values()[k], v, err_msg=k)
    ex = next(iter(run.plans.values())).executor
    (g,) = ex._graphs.values()
    assert sx.cuda.captures - captures == 1 and g.graph.launches == 5 - 1
    assert len(g.graph) > 20 and not ex.graph_errors
    for reads in _step_reads(run):
        assert not d2h_outside(("train.py",)), reads
    assert g.graph.launches == 4 + 3


def test_a_cuda_graph_step_in_fp16_with_loss_scaling(gpu, tmp_path, exported):
    """precision fp16 with gpu.cuda_graph: the loss scale reaches the graph through the seed
    (an input copied at each launch), so the overflowing first steps, their skipped updates and
    the backed-off scales are those of the uncaptured run, bit for bit."""
    cfg = {**exported("cnn", {"type": "sgd", "lr": 0.05, "momentum": 0.9}),
           "precision": "fp16", "loss_scale": {"init": 1e9, "growth_interval": 2}}
    plain, plain_losses, _ = _graph_run(cfg, tmp_path, False, steps=6)
    run, losses, log = _graph_run(cfg, tmp_path, True, steps=6)
    assert "captured" in log and "skipped" in log
    assert losses == plain_losses
    assert [r.get("loss_scale") for r in run.history] == \
        [r.get("loss_scale") for r in plain.history]
    for k, v in plain.trained_values().items():
        np.testing.assert_array_equal(run.trained_values()[k], v, err_msg=k)


def test_a_shape_without_a_plan_says_it_runs_uncaptured(gpu, monkeypatch):
    """gpu.cuda_graph where a batch shape gets no plan (here: the executor's plan limit
    reached): the run is the unplanned one, and graph_errors says why, once for the shape."""
    from trainer import executor as executor_module

    model, x = make_model([helper.make_node("Exp", ["x"], ["y"])],
                          inputs={"x": np.ones((2, 3), F32)}, outputs=("y",)), np.ones((2, 3), F32)
    monkeypatch.setattr(executor_module, "MAX_PLANS", 0)
    ex = Executor(model, gpu, cuda_graph=True)
    for _ in range(3):
        out = ex.run({"x": gpu.asarray(x)})
    np.testing.assert_allclose(host(out["y"]), np.exp(x), rtol=1e-6)
    assert ex.graph_errors == ["this batch shape's step has no plan (shapes that depend on "
                               "values, or too many batch shapes)"]
    assert not ex._graphs


@pytest.mark.parametrize("world,accumulate", [(1, 2), (2, 1), (2, 2)])
def test_cuda_graphs_with_accumulation_and_ranks(monkeypatch, tmp_path, exported, world,
                                                 accumulate):
    """With gradient accumulation or several ranks, the graph holds no callbacks: each
    micro-batch's gradients are added, and the all-reduce buckets started, after its launch;
    every rank's run equals the uncaptured one bit for bit (ranks emulated as threads, each
    with its own GPU, current stream and capture)."""
    from trainer.comm.local import run_local
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    sx.install(monkeypatch, devices=2)
    cfg = exported("cnn", {"type": "sgd", "lr": 0.05, "momentum": 0.9})

    def run(graphed: bool):
        raw = {**cfg, "device": "gpu", "steps": 4, "accumulate": accumulate,
               "gpu": {"cuda_graph": graphed}, "output": str(tmp_path / f"{graphed}.onnx")}

        def job(comm):
            stream = io.StringIO()
            t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=stream)
            t.fit()
            ex = next(iter(t.plans.values())).executor
            launches = [g.graph.launches for g in ex._graphs.values() if isinstance(g, tuple)]
            return (t.trained_values(), [r["loss"] for r in t.history if "loss" in r],
                    stream.getvalue(), launches, ex.graph_errors)
        return run_local(world, job)

    graphed = run(True)
    for (want, want_losses, *_), (got, losses, _, launches, errors) in zip(
            run(False), graphed, strict=True):
        assert not errors and launches == [4 * accumulate - 1]
        assert losses == want_losses
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    log = graphed[0][2]  # (rank 0 logs)
    assert ("all-reduce starts after each launch" in log) == (world > 1)
    assert ("gradients are added after its launch" in log) == (accumulate > 1)


def test_zero1_on_emulated_gpu_ranks_equals_the_cpu_run(monkeypatch, tmp_path, digits_config):
    """ZeRO-1 on emulated ranks with device: gpu: the emulated communicator wrote host arrays
    into device buffers (its all-gather and reduce-scatter), which CuPy refuses. The ranks'
    consistency is checked at every step (its fingerprints made on the device)."""
    from trainer.comm.local import run_local
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    sx.install(monkeypatch, devices=2)

    def run(device: str):
        raw = digits_config(device=device, steps=3, output=str(tmp_path / f"{device}.onnx"),
                            optimizer={"type": "adamw", "lr": 1e-3},
                            distributed={"shard_optimizer": True,
                                         "check_consistency_every": 1})

        def job(comm):
            t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
            t.fit()
            if comm.rank == 1:  # (and a difference is seen there too)
                t.params["fc1.bias"][0] += 1
            with pytest.raises(TrainerError, match="rank.s. 1 hold other values of 'fc1.bias'"):
                t.check_consistency()
            return t.trained_values()
        return run_local(2, job)

    for got, want in zip(run("gpu"), run("cpu"), strict=True):
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_cuda_graphs_are_refused_with_the_reason(gpu, tmp_path, digits_config):
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y", "mask"])]
    x = np.ones((4, 3), F32)
    model = make_model(nodes, inputs={"x": x}, outputs=("y",),
                       initializers={"ratio": np.array(0.5, F32), "train": np.array(True)})
    assert Executor(model, gpu, cuda_graph=True).graph_off.startswith("random kernels")
    assert Executor(model, np, cuda_graph=True).graph_off == "CUDA graphs need a GPU"
    # a capture that fails: the step runs uncaptured, the same, and the log says why
    cfg = digits_config(steps=4, output="unused.onnx")
    plain = _graph_run(cfg, tmp_path, False, steps=4)

    def broken(self, mode=None):
        raise RuntimeError("cudaErrorStreamCaptureUnsupported: (a test)")
    orig = sx.cuda.Stream.begin_capture
    sx.cuda.Stream.begin_capture = broken
    try:
        run = _graph_run(cfg, tmp_path, True, steps=4)
    finally:
        sx.cuda.Stream.begin_capture = orig
    assert run[1] == plain[1]
    assert "runs uncaptured: RuntimeError: cudaErrorStreamCaptureUnsupported" in run[2]
    # on the CPU, the key is accepted and the log says it does nothing there
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    stream = io.StringIO()
    raw = {**cfg, "device": "cpu", "gpu": {"cuda_graph": True},
           "output": str(tmp_path / "cpu.onnx")}
    Trainer(config_from_dict(raw, tmp_path), stream=stream).fit()
    assert "gpu.cuda_graph: off (CUDA graphs need a GPU)" in stream.getvalue()


# -- optimizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta",
                                  "nadam", "radam", "lamb"])
def test_optimizers_step_on_the_gpu_path_without_reading_back(gpu, kind):
    from trainer.optim import OPTIMIZERS

    layout = [("w", 0, 12), ("b", 12, 5)]
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=17).astype(F32)
    grads = [rng.normal(size=17).astype(F32) for _ in range(3)]
    extra = {"momentum": 0.9} if kind in ("sgd", "rmsprop") else {}
    groups = [(["b"], {"lr": 0.01, "weight_decay": 0.0})]
    results = []
    for xp in (np, gpu):
        opt = OPTIMIZERS[kind](xp, 17, F32, layout=layout, groups=groups, lr=0.05, **extra)
        p = xp.asarray(p0.copy())
        dev_grads = [xp.asarray(g) for g in grads]
        sx.reset()
        for step, g in enumerate(dev_grads):
            opt.step(p, g, [0.05 / (step + 1), 0.01])
        if xp is gpu:
            assert sx.TRANSFERS.d2h == 0, sx.TRANSFERS.where()
        results.append((host(p), {k: host(v) for k, v in opt.state_dict().items()}))
    (pc, sc), (pg, sg) = results
    np.testing.assert_allclose(pg, pc, rtol=1e-6, atol=1e-7)
    for k in sc:
        np.testing.assert_allclose(sg[k], sc[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_grad_clip_reads_nothing_back(gpu):
    from trainer.optim import clip_grad_norm_

    g = gpu.asarray(np.full(10, 3.0, F32))
    sx.reset()
    clip_grad_norm_(gpu, g, 1.0)
    assert sx.TRANSFERS.d2h == 0
    np.testing.assert_allclose(np.linalg.norm(host(g)), 1.0, rtol=1e-5)


# -- checkpoints and export -----------------------------------------------------------------------
def test_gpu_checkpoint_resume_and_export(gpu, tmp_path, digits_config, monkeypatch):
    """A GPU run resumed from its checkpoint equals the uninterrupted GPU run; the exported
    model holds the CPU run's values (the NumPy kernels', which the device path mirrors)."""
    monkeypatch.setenv("ONNX_TRAINER_COMPILED", "0")
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    def trainer(steps: int, device: str, name: str, ckpt: str | None = None) -> Trainer:
        raw = digits_config(steps=steps, optimizer={"type": "adamw", "lr": 3e-3},
                            output=str(tmp_path / f"{name}.onnx"), device=device)
        if ckpt:
            raw["checkpoint"] = {"dir": str(tmp_path / ckpt), "every_steps": 3}
        return Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())

    whole = trainer(6, "gpu", "whole")
    whole.fit()
    trainer(3, "gpu", "first", ckpt="ck").fit()
    resumed = trainer(6, "gpu", "resumed", ckpt="ck")
    resumed.fit(resume=True)
    assert resumed.step == 6
    a, b = whole.trained_values(), resumed.trained_values()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    cpu = trainer(6, "cpu", "cpu")
    cpu.fit()
    exported_gpu = {t.name: numpy_helper.to_array(t)
                    for t in onnx.load(str(tmp_path / "whole.onnx")).graph.initializer}
    exported_cpu = {t.name: numpy_helper.to_array(t)
                    for t in onnx.load(str(tmp_path / "cpu.onnx")).graph.initializer}
    assert set(exported_gpu) == set(exported_cpu)
    for k, v in exported_cpu.items():
        np.testing.assert_allclose(exported_gpu[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # `export` and `eval` of the checkpoint train nothing: the training set stays on the host
    # (data.on_device copied all of it to the GPU first)
    import yaml

    from trainer.cli import main
    raw = digits_config(steps=6, optimizer={"type": "adamw", "lr": 3e-3}, device="gpu",
                        output=str(tmp_path / "cli.onnx"),
                        checkpoint={"dir": str(tmp_path / "ck")})
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(raw))
    seen = []
    for method in ("export", "evaluate"):
        original = getattr(Trainer, method)
        monkeypatch.setattr(Trainer, method, lambda self, *a, _f=original, **k: (
            seen.append(self.on_device), _f(self, *a, **k))[1])
    assert main(["export", str(tmp_path / "cli.yaml")]) == 0
    assert main(["eval", str(tmp_path / "cli.yaml"), "--checkpoint"]) == 0
    assert seen == [False, False]
    exported = {t.name: numpy_helper.to_array(t)
                for t in onnx.load(str(tmp_path / "cli.onnx")).graph.initializer}
    first = trainer(3, "gpu", "again")
    first.load_checkpoint(tmp_path / "ck")
    for k, v in first.trained_values().items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


# -- the MPI staging path of device arrays -------------------------------------------------------
MPIRUN = shutil.which("mpirun")


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install '.[mpi]')")
def test_mpi_stages_device_arrays_through_reused_pinned_buffers():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ONNX_TRAINER_CUDA_AWARE_MPI": "0"}
    cmd = [MPIRUN, "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = run_mpi(cmd + [sys.executable, __file__, "comm"], timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("staging ok") == 2


def _worker_comm() -> None:
    """Under mpirun: collectives on stand-in device arrays go through pinned host buffers (one
    read and one write per collective), allocated once and reused; buckets of a device flat
    buffer equal one big all-reduce."""
    from trainer.comm.base import compress16, decompress16
    from trainer.comm.buckets import Buckets
    from trainer.comm.mpi import MPIComm

    backend._import_cupy = lambda: (sx, sx.x)
    comm = MPIComm(timeout_s=60, pinned_alloc=sx.cuda.alloc_pinned_memory)
    assert not comm.cuda_aware
    p, r = comm.size, comm.rank
    values = [np.random.default_rng(10 + k).normal(size=301).astype(F32) for k in range(p)]
    exact = np.sum(values, axis=0, dtype=np.float64)
    for _ in range(2):
        dev = sx.asarray(values[r])
        sx.reset()
        comm.allreduce_(dev, label="plain")
        assert (sx.TRANSFERS.d2h, sx.TRANSFERS.h2d) == (1, 1), sx.TRANSFERS.where()
        np.testing.assert_allclose(host(dev), exact, rtol=1e-5, atol=1e-5)
    allocated = sx.cuda.pinned_allocations
    dev = sx.asarray(values[r])
    comm.synchronize(comm.allreduce_async_(dev, label="bf16", compress="bf16"))
    rounded = [decompress16(compress16(v, "bf16"), "bf16") for v in values]
    want = decompress16(compress16(np.sum(rounded, axis=0, dtype=F32), "bf16"), "bf16")
    np.testing.assert_array_equal(host(dev), want)
    flat = sx.asarray(values[r])
    layout = [("a", 200, 101), ("b", 0, 200)]
    bk = Buckets(comm, flat, layout, bucket_mb=1e-4)
    bk.begin()
    for name in ("a", "b"):
        bk.ready(name)
        bk.progress()
    bk.wait_all()
    np.testing.assert_allclose(host(flat), exact, rtol=1e-5, atol=1e-5)
    again = sx.asarray(values[r])
    comm.allreduce_(again, label="plain again")
    assert sx.cuda.pinned_allocations <= allocated + 3  # bf16 and the two bucket sizes
    print(f"rank {r}: staging ok", flush=True)


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install '.[mpi]')")
@pytest.mark.parametrize("world", [2, 3])
def test_a_cuda_aware_mpi_moves_device_arrays_and_the_engine_sums_them(world):
    """With a CUDA-aware MPI (forced here: the stand-in's device memory is host memory, which
    this MPI moves too) device arrays go to MPI directly, with no host copy, and MPI is never
    asked to reduce one: Open MPI's CUDA support covers the blocking reductions only, so its
    MPI_Iallreduce or MPI_Ireduce_scatter_block would sum device memory on the host. Every
    rank gets the rank-order sum, bit for bit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ONNX_TRAINER_CUDA_AWARE_MPI": "1"}
    cmd = [MPIRUN, "--oversubscribe", "-np", str(world)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = run_mpi(cmd + [sys.executable, __file__, "aware"], timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("cuda-aware ok") == world


def _rank_order_sum(values: list[np.ndarray]) -> np.ndarray:
    total = values[0].copy()
    for v in values[1:]:
        total += v
    return total


def _worker_aware() -> None:
    """Under mpirun with ONNX_TRAINER_CUDA_AWARE_MPI=1: each collective of the protocol on
    stand-in device arrays, the MPI calls watched."""
    from trainer.comm.base import compress16, decompress16
    from trainer.comm.buckets import Buckets
    from trainer.comm.mpi import MPIComm

    backend._import_cupy = lambda: (sx, sx.x)
    comm = MPIComm(timeout_s=60)
    assert comm.cuda_aware
    calls: list[tuple[str, bool]] = []

    def on_device(a) -> bool:
        if isinstance(a, (list, tuple)) and a:
            a = a[0]
        return isinstance(a, sx.ndarray)

    class Watched:
        def __init__(self, c):
            self._c = c

        def __getattr__(self, name):
            method = getattr(self._c, name)

            def call(*args, **kwargs):
                calls.append((name, any(on_device(a) for a in args)))
                return method(*args, **kwargs)
            return call

    comm._steps = [Watched(c) for c in comm._steps]
    p, r = comm.size, comm.rank
    rng = [np.random.default_rng(20 + k) for k in range(p)]
    for n in (301, 96 * p, 1):  # padded parts, whole parts, fewer elements than ranks
        values = [g.normal(size=n).astype(F32) for g in rng]
        dev = sx.asarray(values[r])
        sx.reset()
        comm.allreduce_(dev, label=f"sum of {n}")
        assert (sx.TRANSFERS.d2h, sx.TRANSFERS.h2d) == (0, 0), sx.TRANSFERS.where()
        np.testing.assert_array_equal(host(dev), _rank_order_sum(values))
    counts = [np.arange(7, dtype=np.int64) * (k + 1) for k in range(p)]
    dev = sx.asarray(counts[r])
    comm.allreduce_(dev, label="counts")
    np.testing.assert_array_equal(host(dev), sum(counts))
    values = [g.normal(size=500).astype(F32) for g in rng]
    flat = sx.asarray(values[r])
    bk = Buckets(comm, flat, [("a", 300, 200), ("b", 0, 300)], bucket_mb=1e-4)
    bk.begin()
    for name in ("a", "b"):
        bk.ready(name)
        bk.progress()
    bk.wait_all()
    np.testing.assert_array_equal(host(flat), _rank_order_sum(values))
    k = 5
    values = [g.normal(size=p * k).astype(F32) for g in rng]
    out = sx.zeros(k, F32)
    comm.reduce_scatter_(sx.asarray(values[r]), out, label="reduce-scatter")
    np.testing.assert_array_equal(host(out), _rank_order_sum(values)[r * k:(r + 1) * k])
    whole = sx.zeros(p * k, F32)
    comm.allgather_(sx.full(k, float(r), F32), whole, label="all-gather")
    np.testing.assert_array_equal(host(whole), np.repeat(np.arange(p, dtype=F32), k))
    sent = sx.asarray(np.full(4, 7.0 if r == p - 1 else 0.0, F32))
    comm.bcast_(sent, root=p - 1, label="broadcast")
    np.testing.assert_array_equal(host(sent), np.full(4, 7.0, F32))
    values = [g.normal(size=301).astype(F32) for g in rng]
    dev = sx.asarray(values[r])
    comm.allreduce_(dev, label="bf16", compress="bf16")
    rounded = [decompress16(compress16(v, "bf16"), "bf16") for v in values]
    want = decompress16(compress16(_rank_order_sum(rounded), "bf16"), "bf16")
    np.testing.assert_array_equal(host(dev), want)
    reductions = {"Iallreduce", "Ireduce", "Ireduce_scatter", "Ireduce_scatter_block", "Iscan",
                  "Iexscan", "Allreduce", "Reduce", "Reduce_scatter_block"}
    assert not [c for c in calls if c[1] and c[0] in reductions], calls
    assert ("Ialltoall", True) in calls and ("Ibcast", True) in calls, calls
    print(f"rank {r}: cuda-aware ok", flush=True)


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install '.[mpi]')")
@pytest.mark.parametrize("own_gpus", [False, True])
def test_nccl_is_chosen_when_no_two_ranks_drive_one_gpu(own_gpus):
    """Two ranks of a node, each seeing one GPU (device 0, as with CUDA_VISIBLE_DEVICES set
    per task by Slurm): whether they drive one GPU is told by its PCI bus id. By the device
    count (2 ranks > 1 GPU) auto refused NCCL to ranks with a GPU each, and backend: nccl
    refused them too. Sharing one, auto picks MPI and backend: nccl stops, naming the ranks
    and the GPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [MPIRUN, "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = run_mpi(cmd + [sys.executable, __file__, "nccl", str(int(own_gpus))], timeout=120,
                   env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("nccl choice ok") == 2


def _worker_nccl() -> None:
    """Under mpirun: NCCL's choice on stand-in GPUs (one per rank if argv[2] is 1, else one
    for both), NCCL itself stubbed (its communicator is never used here)."""
    import trainer.comm.nccl as nccl_module
    from trainer.comm import get_communicator, launched_rank
    from trainer.comm.mpi import MPIComm

    own = sys.argv[2] == "1"
    backend._import_cupy = lambda: (sx, sx.x)
    sx.cuda.nccl = types.SimpleNamespace(available=True, get_unique_id=lambda: bytes(128))
    nccl_module.nccl_available = lambda: True
    nccl_module.make_nccl_comm = lambda nccl, size, uid, rank: ("stub", size, rank)
    if own:  # device 0 of each rank is another GPU
        bus = f"0000:{0x40 + launched_rank():02X}:00.0"
        sx.cuda.Device.pci_bus_id = property(lambda self: bus)
    comm = get_communicator("auto", 60, device="gpu")
    if own:
        assert isinstance(comm, nccl_module.NCCLComm), type(comm)
        assert comm.device == 0 and comm.comm == ("stub", 2, comm.rank)
    else:
        assert isinstance(comm, MPIComm), type(comm)
        with pytest.raises(TrainerError) as err:
            nccl_module.NCCLComm(60, mpi=comm)
        assert "nccl needs one GPU per rank, but local ranks 0 and 1 on " in str(err.value)
        assert "share GPU 0000:18:00.0 (this rank sees 1 GPU(s))" in str(err.value)
    print(f"rank {comm.rank}: nccl choice ok", flush=True)


@pytest.mark.mpi
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install '.[mpi]')")
@pytest.mark.parametrize("sync_bn", [False, True])
def test_the_device_step_under_mpirun_is_the_host_step(zoo, tmp_path, sync_bn):
    """mpirun -np 2 with the device path in each process (the stand-in as its GPU): the BatchNorm
    CNN family with gpu.cuda_graph and two micro-batches per step, its gradients all-reduced
    through pinned host buffers, the generated kernels (elementwise chains, normalizations,
    the optimizer) run as compiled C where there is a C compiler. Without SyncBatchNorm every
    rank captures its step (the all-reduce after each launch); with it, the step is planned
    but not captured (its all-reduce of the batch statistics runs inside the step), and the
    log says why. The export equals the same job's on the CPU under mpirun."""
    d = zoo["bn_cnn_training_form"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ONNX_TRAINER_CUDA_AWARE_MPI": "0"}
    cmd = [MPIRUN, "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    for device in ("cpu", "gpu"):
        proc = run_mpi(cmd + [sys.executable, __file__, "train", str(d), device,
                              str(tmp_path / f"{device}.onnx"), str(int(sync_bn))],
                       timeout=180, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.stdout.count(f"{device} training ok") == 2
    want, got = (onnx.load(str(tmp_path / f"{k}.onnx")).graph.initializer for k in ("cpu", "gpu"))
    got = {t.name: numpy_helper.to_array(t) for t in got}
    for t in want:  # (the two sides' sums may differ in their last bit)
        np.testing.assert_allclose(got[t.name], numpy_helper.to_array(t), rtol=1e-5, atol=1e-6,
                                   err_msg=t.name)


def _worker_train() -> None:
    """Under mpirun: the BatchNorm CNN family's job on `device` (gpu: the stand-in), rank 0
    exporting to the given path; SyncBatchNorm if asked."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    d, device, out, sync_bn = Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    if device == "gpu":
        backend._import_cupy = lambda: (sx, sx.x)
        from tests import ckernels
        if ckernels.CC is not None:  # the generated kernels run too, as compiled C
            sx.ElementwiseKernel = ckernels.CElementwiseKernel
            sx.ReductionKernel = ckernels.CReductionKernel
    raw = family_config(d, "bn_cnn_training_form", output=out, device=device,
                        precision="fp32", accumulate=2, gpu={"cuda_graph": True},
                        distributed={"sync_batchnorm": sync_bn})
    log = io.StringIO()
    t = Trainer(config_from_dict(raw, d), stream=log)
    t.fit()
    assert t.world == 2 and len([r for r in t.history if "loss" in r]) == 6
    ex = next(iter(t.plans.values())).executor
    assert all(p is not False for p in ex._specialized.values()), "not planned"
    if device == "gpu":
        from tests import ckernels
        assert ckernels.CC is None or ckernels.CReductionKernel.calls > 0
        captured = any(isinstance(g, tuple) for g in ex._graphs.values())
        assert not ex.graph_errors and captured != sync_bn, (ex.graph_errors, captured)
        assert ("off (collectives inside the step" in log.getvalue()) == (sync_bn and t.rank == 0)
    print(f"rank {t.rank}: {device} training ok", flush=True)


if __name__ == "__main__":
    {"comm": _worker_comm, "train": _worker_train, "aware": _worker_aware,
     "nccl": _worker_nccl}[sys.argv[1]]()


def _classifier_cfg(tmp_path) -> dict:
    """m.onnx on d.npz in tmp_path: cross entropy on 'logits', SGD, 4 steps of 8 in order."""
    return {"model": str(tmp_path / "m.onnx"), "seed": 0,
            "data": {"train": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                               "targets": {"label": "y"}}, "batch_size": 8, "shuffle": False},
            "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
            "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 4, "log": {"every_steps": 1}}


@pytest.mark.parametrize("name", ["encoder", "viewed_parameter", "rotary", "padded_bag"])
def test_exporter_repairs_train_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path, name):
    # A default-exporter model whose merged LayerNorm tensors and dropped attention bias are
    # restored (encoder), whose folded views of a parameter are tied to it by Reshape
    # (viewed_parameter), whose folded cos/sin tables stay constants (rotary), or whose
    # embedding's padding row gets no gradient (padded_bag): the rewritten graphs run on the
    # device, reading nothing back.
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from tests.test_user_models import MODELS, PaddedBag, export

    torch.manual_seed(3)
    rng = np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "padded_bag":
            proto = torch.onnx.export(
                PaddedBag(0).eval(), (torch.zeros(2, 7, dtype=torch.int64),), None,
                input_names=["x"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
            x = rng.integers(0, 12, (32, 7))
        else:
            cls, sample = MODELS[name]
            proto = export(cls(), sample, "dynamo")
            x = rng.normal(size=(32,) + sample).astype(F32)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 5, 32))
    cfg = _classifier_cfg(tmp_path)
    cpu = _train(cfg, tmp_path, "cpu")
    run = _train(cfg, tmp_path, "gpu")
    _compare_runs(cpu, run)
    if name == "encoder":
        assert "enc.norm2.weight" in run[0].names
    elif name == "viewed_parameter":
        assert {kind for _, kind in run[0].tied.values()} == {"reshape"}
    else:
        assert len(run[0].names) == (4 if name == "rotary" else 3)
    for reads in _step_reads(run[0]):
        assert not d2h_outside(("train.py",)), reads


def test_bf16_needs_a_cupy_that_holds_bfloat16(gpu, tmp_path, digits_config, monkeypatch):
    """precision bf16 on a CuPy without bfloat16 (before 14, or NumPy before 2.1.2): a clear
    error at start that says what is needed, not a failed Cast in the first step."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    monkeypatch.setattr(sx, "BFLOAT16", False)
    raw = digits_config(steps=2, output=str(tmp_path / "g.onnx"), device="gpu",
                        precision="bf16")
    with pytest.raises(TrainerError, match="cannot hold bfloat16.*CuPy 14 or later"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.skipif(not sx.BFLOAT16, reason="CuPy holds bfloat16 with NumPy >= 2.1.2 only")
@pytest.mark.parametrize("kind,graph", [("cnn", False), ("gpt", False), ("gpt", True)])
def test_bf16_trains_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path, exported, kind, graph):
    """precision bf16 (bfloat16 products: 2-D ones as CuPy's bfloat16 GEMMs, batched ones and
    the convolutions through float32, rounded once) on the device path, with and without a
    captured graph: the losses and weights of the CPU run, and a step reads back only its
    status."""
    cfg = {**exported(kind, {"type": "sgd", "lr": 0.05}), "precision": "bf16", "steps": 6,
           "gpu": {"cuda_graph": graph}}
    cpu = _train(cfg, tmp_path, "cpu")
    run = _train(cfg, tmp_path, "gpu")
    _compare_runs(cpu, run, rtol=1e-4, atol=1e-5)
    ex = next(iter(run[0].plans.values())).executor
    assert not graph or any(isinstance(g, tuple) for g in ex._graphs.values())  # captured
    model = ex.model
    assert any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.BFLOAT16
               for n in model.graph.node)
    for reads in _step_reads(run[0]):
        assert len(reads) <= 1 and not d2h_outside(("train.py",)), reads


@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_fp16_trains_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path, exported, kind):
    """precision fp16 (float16 products, dynamic loss scaling) on the device path: the same
    losses, loss scales and weights as on the CPU, an overflow included (the first scale is
    too large, so the first steps are skipped), and a step reads back only its status."""
    cfg = {**exported(kind, {"type": "sgd", "lr": 0.05}), "precision": "fp16",
           "loss_scale": {"init": 2.0 ** 30, "growth_interval": 2}, "steps": 8}
    cpu = _train(cfg, tmp_path, "cpu")
    run = _train(cfg, tmp_path, "gpu")
    _compare_runs(cpu, run, rtol=1e-4, atol=1e-5)
    scales = [[r["loss_scale"] for r in t.history if "loss" in r] for t in (cpu[0], run[0])]
    assert scales[0] == scales[1] and scales[0][0] < 2.0 ** 30, scales
    assert run[0].scaler_skipped == cpu[0].scaler_skipped >= 1
    for reads in _step_reads(run[0]):
        assert len(reads) <= 1 and not d2h_outside(("train.py",)), reads


def test_tf32_sets_cupys_float32_compute_type_and_fp32_resets_it(gpu, tmp_path, exported):
    """precision tf32 puts CuPy's float32 products on TF32 (the stand-in then rounds matmul
    operands to a 10-bit mantissa, as tensor cores do): the run differs from fp32 by that
    rounding and no more; an fp32 run afterwards in the same process is float32 again."""
    linalg = gpu._core._routines_linalg
    cfg = {**exported("cnn", {"type": "sgd", "lr": 0.05}), "steps": 6}
    try:
        tf32 = _train({**cfg, "precision": "tf32"}, tmp_path, "gpu")
        assert linalg.float32 == linalg.COMPUTE_TYPE_TF32
        fp32 = _train(cfg, tmp_path, "gpu")
        assert linalg.float32 == linalg.COMPUTE_TYPE_DEFAULT
    finally:
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_DEFAULT)
    off = np.abs(np.array(tf32[1]) - fp32[1]).max()
    assert 1e-6 < off < 1e-2, (tf32[1], fp32[1])  # measured: 3.2e-5
    _compare_runs(fp32, tf32, rtol=2e-2, atol=2e-3)
    assert np.array_equal(gpu._tf32(np.float32([1 + 2 ** -11, 1 + 2 ** -10, 3.14159265])),
                          np.float32([1 + 2 ** -10, 1 + 2 ** -10, 3.140625]))


def test_tf32_on_a_cpu_trains_in_float32(tmp_path, digits_config):
    """A CPU has no TF32 units: precision tf32 says so and trains exactly as fp32 (a config
    written for a GPU cluster still runs on a laptop)."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    runs = {}
    for precision in ("fp32", "tf32"):
        stream = io.StringIO()
        t = Trainer(config_from_dict(digits_config(steps=3, precision=precision,
                                                   output=str(tmp_path / f"{precision}.onnx")),
                                     tmp_path), stream=stream)
        t.fit()
        runs[precision] = t.trained_values(), stream.getvalue()
    assert "precision tf32: float32 matrix products stay float32 (a CPU has no TF32 units)" in \
        runs["tf32"][1]
    for k, v in runs["fp32"][0].items():
        np.testing.assert_array_equal(runs["tf32"][0][k], v)


def test_a_gpu_run_reports_the_device_memory_it_needed(gpu, tmp_path, digits_config,
                                                       monkeypatch):
    """The end of a run logs CuPy's pool high-water mark next to the pre-flight estimate, a
    host-side read (no device synchronization)."""
    pool = gpu.get_default_memory_pool()
    monkeypatch.setattr(type(pool), "total_bytes", lambda self: 3 << 30)
    t, _, result = _train(digits_config(steps=2), tmp_path, "gpu")
    assert result["peak_memory_mb"] == 3 * 1024
    text = t.log.stream.getvalue()
    assert "memory: peak device memory held by CuPy's memory pool: 3.0 GiB; estimated " \
           "before training: " in text


def _step_uploads(t, steps: int = 3) -> list[list[str]]:
    """Host-to-device copies of each of `steps` steps, the next batch's gathering included."""
    lrs = t.schedule.lrs(t.step)
    per_step = []
    for _ in range(steps):
        sx.reset()
        _, arrays, lw, gw, _ = t._next_micro_batch()
        t.train_step([(arrays, lw, gw)], lrs)
        per_step.append(sx.TRANSFERS.where("h2d"))
    return per_step


def test_training_data_stays_on_the_device(gpu, tmp_path, digits_config):
    """data.on_device (auto for an in-memory set of at most 1 GiB): the training set is
    uploaded once and each batch gathered on the device, so a step uploads only the batch's
    sample indices (off: every input and label array, every step); the weights are those of
    the CPU run either way, and the label counts come from the host (no device read)."""
    cfg = digits_config(steps=6, optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9})
    cpu = _train(cfg, tmp_path, "cpu")
    runs = {choice: _train({**cfg, "data": {**cfg["data"], "on_device": choice}}, tmp_path,
                           "gpu") for choice in ("auto", False)}
    resident, copied = runs["auto"][0], runs[False][0]
    assert resident.on_device and not copied.on_device
    assert "data.train on the GPU (" in resident.log.stream.getvalue()
    for run in runs.values():
        _compare_runs(cpu, run)
    for uploads in _step_uploads(resident):
        assert len(uploads) == 1 and "data.py" in uploads[0], uploads
    for uploads in _step_uploads(copied):
        assert len(uploads) == 2, uploads  # x and the labels
    for reads in _step_reads(resident):
        assert not d2h_outside(("train.py",)), reads


@pytest.mark.parametrize("accumulate", [1, 2])
def test_prefetched_batches_go_up_ahead_of_their_step(gpu, tmp_path, digits_config, accumulate):
    """Data on the host with data.prefetch: the prefetch thread copies each batch up (pinned
    memory, a stream of its own) into a ring of device buffers, so a step uploads nothing
    itself; the weights are the CPU run's (also with accumulation, whose micro-batches queue
    without a synchronization between them); a batch's buffers hold it until the batch after
    it is asked for, then take the batch after that."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    cfg = digits_config(steps=6, accumulate=accumulate, data__on_device=False,
                        data__prefetch=True)
    _compare_runs(_train(cfg, tmp_path, "cpu"), _train(cfg, tmp_path, "gpu"))
    t = Trainer(config_from_dict({**cfg, "device": "gpu", "output": str(tmp_path / "o.onnx")},
                                 tmp_path), stream=io.StringIO())
    assert t.batches.uploads is not None and not t.on_device
    lrs = t.schedule.lrs(t.step)

    def batch():
        epoch, index = t.position
        _, arrays, lw, gw, _ = t._next_micro_batch()
        mine = t.batches.local_indices(epoch, index)
        return arrays, lw, gw, {k: t.train_arrays[v][mine] for k, v in
                                (("x", "x"), ("label", "label"))}

    first = batch()  # (asked for before any prefetch: gathered on the spot, on the host)
    assert all(isinstance(v, np.ndarray) for v in first[0].values())
    t.train_step([first[:3]], lrs)
    seen = []
    for _ in range(5):
        sx.reset()
        arrays, lw, gw, want = batch()
        assert all(isinstance(v, sx.ndarray) for v in arrays.values())
        t.train_step([(arrays, lw, gw)], lrs)
        assert not [w for w in sx.TRANSFERS.where("h2d") if "train.py" in w]
        t.batches._ahead.thread.join()  # (the next batch is up: the other buffer)
        for k, v in want.items():
            np.testing.assert_array_equal(host(arrays[k]), v.astype(host(arrays[k]).dtype))
        seen.append(arrays)
    ring = t.batches.uploads.ring  # buffers per input: one more than the batches of a step
    assert ring == accumulate + 1
    for a, b in zip(seen, seen[ring:], strict=False):
        assert all(a[k] is b[k] for k in a)
    for k in seen[0]:
        assert len({id(a[k]) for a in seen[:ring]}) == ring
    t.batches.close()


def test_batch_uploads_use_the_ranks_gpu_and_wait_for_the_release(monkeypatch):
    """The prefetch thread selects the caller's GPU (a thread starts on GPU 0), makes its copy
    stream wait for the event recorded when the batch before was asked for, then copies; a
    failing upload warns once and hands the batch over on the host."""
    from trainer.data import PREFETCH_THREAD, Batches, DeviceUploads

    gpu = sx.install(monkeypatch, devices=2)
    gpu.cuda.Device(1).use()
    log = []
    set_ = sx.ndarray.set
    monkeypatch.setattr(sx.ndarray, "set", lambda self, arr, stream=None: (
        log.append(("set", sx.cuda._current, __import__("threading").current_thread().name,
                    stream)), set_(self, arr, stream))[-1])
    monkeypatch.setattr(gpu.cuda.Stream, "wait_event",
                        lambda self, event: log.append(("wait", event)))
    arrays = {"x": np.arange(40, dtype=F32).reshape(10, 4), "y": np.arange(10)}
    up = DeviceUploads(gpu)
    b = Batches(arrays, 2, shuffle=False, prefetch=True, uploads=up)
    for i in range(4):  # (each batch used before the next is asked for: held=1)
        g = b.get(0, i)[0]
        assert all(isinstance(v, np.ndarray if i == 0 else sx.ndarray) for v in g.values())
        np.testing.assert_array_equal(host(g["x"]), arrays["x"][2 * i:2 * i + 2])
        np.testing.assert_array_equal(host(g["y"]), arrays["y"][2 * i:2 * i + 2])
    b.close()
    waits = [e for e in log if e[0] == "wait"]
    sets = [e for e in log if e[0] == "set"]
    assert len(waits) == 4 and len(sets) == 8  # (get 3 started the upload of batch 4)
    assert all(s[1] == 1 and s[2] == PREFETCH_THREAD and s[3] is up.stream for s in sets)
    assert [e[0] for e in log] == ["wait", "set", "set"] * 4
    assert len({id(e[1]) for e in waits}) == 4  # (a new release event each time)

    def fails(arrays, release):
        raise RuntimeError("cudaErrorMemoryAllocation")
    monkeypatch.setattr(up, "upload", fails)
    b = Batches(arrays, 2, shuffle=False, prefetch=True, uploads=up)
    with pytest.warns(RuntimeWarning, match="copying batches to the GPU ahead of their step "
                      "failed .*cudaErrorMemoryAllocation.*copied in its step instead"):
        b.get(0, 0)
        b._ahead.thread.join()
    assert b.uploads is None
    second = b.get(0, 1)[0]
    b.close()
    np.testing.assert_array_equal(second["x"], arrays["x"][2:4])


def test_the_estimate_counts_a_training_set_kept_on_the_device(gpu, tmp_path, digits_config):
    from trainer import report
    from trainer.config import config_from_dict

    est = {}
    for choice in ("auto", False):
        cfg = digits_config(device="gpu", output=str(tmp_path / "m.onnx"))
        cfg["data"]["on_device"] = choice
        est[choice] = report.preflight(config_from_dict(cfg, tmp_path), xp=gpu).estimate
    d = np.load(cfg["data"]["train"]["path"])
    held = d["x_train"].astype(F32).nbytes + d["y_train"].astype(np.int64).nbytes
    assert est["auto"].batches - est[False].batches == pytest.approx(held, rel=0.01)
    # prefetched batches copied up: a ring of one more device batch than a step's micro-batches
    batch = 32 * (64 * 4 + 8)
    assert est[False].batches == batch
    for accumulate in (1, 3):
        cfg = digits_config(device="gpu", output=str(tmp_path / "m.onnx"), accumulate=accumulate,
                            data__on_device=False, data__prefetch=True)
        ring = report.preflight(config_from_dict(cfg, tmp_path), xp=gpu).estimate.batches
        assert ring == (accumulate + 1) * batch


def test_tf32_without_cupys_compute_type_api_says_so(gpu, monkeypatch):
    """set_tf32 uses an internal CuPy API; where it is missing, training still starts (fp32
    unchanged) and tf32 says that the products stay float32."""
    from trainer.backend import set_tf32

    monkeypatch.setattr(gpu, "_core", types.SimpleNamespace())
    assert set_tf32(gpu, False) == "float32 matrix products in CuPy's default mode"
    assert set_tf32(gpu, True).startswith("float32 matrix products stay float32 (this CuPy "
                                          "has no float32 compute-type setting")


@pytest.mark.parametrize("name", ["trimmed", "first_routed"])
def test_sizes_that_follow_the_data_train_on_the_gpu_path_as_on_the_cpu(gpu, tmp_path, name):
    """A batch trimmed to its longest row (a Slice ending at a value computed from the data),
    and a trace that gathers the first token a router picks: their training graphs are built
    on the first batch's values, which on the device path are device arrays. They were left
    out there, so the second model's graph was built on zeros and failed ("Gather: index 0 is
    out of range")."""
    torch = pytest.importorskip("torch")
    from tests import test_user_models as um

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "trimmed":
            torch.manual_seed(0)
            torch.onnx.export(um.TrimmedEncoder().eval(), (torch.randint(1, 20, (2, 8)).float(),),
                              str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}})
            x = rng.integers(1, 20, (32, 8)).astype(F32)
            lengths = np.minimum(rng.integers(1, 9, 32), 3 + np.arange(32) // 8)
            x[np.arange(8)[None, :] >= lengths[:, None]] = 0
        else:
            torch.manual_seed(1)
            model = um.FirstRoutedToken()
            with torch.no_grad():
                model.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
            onnx.save(um.export(model, (4,), "torchscript"), str(tmp_path / "m.onnx"))
            x = rng.standard_normal((32, 4)).astype(F32)
            x[::8, 0] = np.abs(x[::8, 0]) + 0.1  # (a token routed in every batch)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 5, 32))
    cfg = _classifier_cfg(tmp_path)
    _compare_runs(_train(cfg, tmp_path, "cpu"), _train(cfg, tmp_path, "gpu"))


def test_values_not_trained_go_to_the_device_once(gpu, tmp_path):
    """On a GPU the values not trained are copied up once for every executor (the steps' at
    each batch size, the evaluation's), as the host holds them once, and the run equals the
    CPU's."""
    from tests.test_memory import _frozen_backbone, _raw
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    model, data = _frozen_backbone(tmp_path, samples=10)
    runs = {}
    for device in ("cpu", "gpu"):
        raw = _raw(model, data, 4, tmp_path, frozen=["w0", "w1"], steps=3, device=device,
                   output=str(tmp_path / f"{device}.onnx"))
        raw["data"].update(drop_last=False, eval={"path": str(data), "inputs": {"x": "x"},
                                                  "targets": {"label": "y"}})
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        t.fit()
        runs[device] = t
    t = runs["gpu"]
    assert sorted(t.shared.device) == ["w0", "w1"]
    executors = [p.executor for p in t.plans.values()] + [t._inference(True)]
    assert len(executors) == 3
    shared = {id(v) for v in t.shared.device.values()}
    assert all(isinstance(v, sx.ndarray) for v in t.shared.device.values())
    for ex in executors:  # (the only device arrays of the backbone's shape: the shared ones)
        held = {id(v) for v in ex.constants.values() if isinstance(v, sx.ndarray)
                and v.shape == (256, 256)}
        assert held == shared
    np.testing.assert_allclose(t.trained_values()["head"],
                               runs["cpu"].trained_values()["head"], rtol=1e-5, atol=1e-7)


def test_memory_check_on_a_gpu_keeps_the_set_up_to_the_host(gpu, tmp_path, monkeypatch):
    """The set-up's copies of the model are host memory: compared with the GPU's free memory,
    a config whose training state fit the GPU was refused (a frozen 28 GB backbone would have
    needed 154 GB of an 80 GB GPU). The GPU holds the training state; the set-up is checked
    against the host's memory."""
    from tests.test_memory import _frozen_backbone, _raw
    from trainer import memory
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    model, data = _frozen_backbone(tmp_path)
    raw = _raw(model, data, 8, tmp_path, frozen=["w0", "w1"], steps=1, device="gpu")
    est = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).preflight.estimate
    assert est.setup > est.total
    monkeypatch.setattr(sx.cuda.runtime, "memGetInfo",
                        lambda: ((est.total + est.setup) // 2, 80 << 30), raising=False)
    out = io.StringIO()
    Trainer(config_from_dict(raw, tmp_path), stream=out)
    assert f"{memory.human(est.total)} on the GPU; the set-up's peak in host memory " \
        f"{memory.human(est.setup)}" in out.getvalue()
    real = memory.available_memory
    monkeypatch.setattr(memory, "available_memory", lambda xp=np: (
        est.setup // 2, "MemAvailable") if xp is np else real(xp))
    with pytest.raises(TrainerError, match="the set-up's estimated peak of host memory"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
