"""GPU readiness. On a CUDA GPU (marked gpu): kernels, training graphs, optimizers and whole
training runs on CuPy match NumPy and the CPU run, and a training step does not synchronize. On
any machine: the GPU benchmark's dry run (through the CuPy stand-in) and the check script."""

from __future__ import annotations

import io
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_gpu_standin import (
    _compare_runs,
    _kernel_cases,
    _train,
    case_model,
    check_on_device,
    export_models,
)
from trainer.backend import cupy_or_none, cupyx_module
from trainer.config import config_from_dict
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
cp = cupy_or_none()
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_models(tmp_path_factory.mktemp("models"))


def gpu_test(fn):
    for mark in reversed(on_gpu):
        fn = mark(fn)
    return fn


@gpu_test
@pytest.mark.parametrize("optimizer", [{"type": "sgd", "lr": 0.1, "momentum": 0.9},
                                       {"type": "adamw", "lr": 3e-3}])
def test_mlp_training_matches_cpu(tmp_path, digits_config, optimizer):
    runs = {}
    for device in ("cpu", "gpu"):
        cfg = config_from_dict(digits_config(device=device, steps=20, optimizer=optimizer,
                                             output=str(tmp_path / f"{device}.onnx")), tmp_path)
        t = Trainer(cfg, stream=io.StringIO())
        result = t.fit()
        runs[device] = (t.trained_values(), [r["loss"] for r in t.history if "loss" in r],
                        result)
    (wc, lc, rc), (wg, lg, rg) = runs["cpu"], runs["gpu"]
    np.testing.assert_allclose(lg, lc, rtol=1e-4)
    for k in wc:
        np.testing.assert_allclose(wg[k], wc[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert abs(rg["eval_accuracy"] - rc["eval_accuracy"]) <= 0.01


def small_cnn() -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool-Conv-Relu-AveragePool-Flatten-Gemm on 1x16x16, built by hand."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)
    inits = [init("c1.w", 6, 1, 5, 5), init("bn.s", 6), init("bn.b", 6), init("bn.m", 6),
             numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "bn.v"),
             init("c2.w", 16, 6, 5, 5, scale=0.1), init("c2.b", 16),
             init("fc.w", 10, 64, scale=0.1), init("fc.b", 10)]
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], pads=[2, 2, 2, 2]),
             helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"],
                              ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["d", "c2.w", "c2.b"], ["e"]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("AveragePool", ["f"], ["g"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["g"], ["h"]),
             helper.make_node("Gemm", ["h", "fc.w", "fc.b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def training_step_check(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray,
                        rtol: float = 2e-3) -> None:
    """One training-graph run on CuPy equals NumPy's, through the static plan and without it,
    and the second (planned) run synchronizes nowhere (cupyx.allow_synchronize: a device read
    inside the step raises)."""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.executor import Executor
    from trainer.graph import initializers

    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label"}, batch_size=len(x))
    info = training_info(tm)
    inits = initializers(tm)
    names = list(info.gradients) + list(info.state)
    fetch = [info.loss] + list(info.gradients.values()) + list(info.state.values())
    label = info.targets.get("label", "label")
    feeds = {**{k: inits[k] for k in names}, "x": x, label: y}
    ref = Executor(tm, np, feeds=names, fetch=fetch).run(dict(feeds))
    ex = Executor(tm, cp, feeds=names, fetch=fetch)
    dev = {k: cp.asarray(v) for k, v in feeds.items()}
    ex.run(dev)  # first run: kernels compile, constants settle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # allow_synchronize is deprecated (it still works)
        with cupyx_module().allow_synchronize(False):
            out = ex.run(dev)
    assert [p is not False for p in ex._specialized.values()] == [True]  # planned on the GPU
    (plan,) = ex._specialized.values()
    fused = [n.info["kernel"] for n in plan.nodes if n.op == "FusedElementwise"]
    assert all(k.error is None for k in fused), [k.error for k in fused]  # their kernels built
    unplanned = ex.run_unplanned(dev)
    for k in fetch:
        np.testing.assert_allclose(cp.asnumpy(out[k]), ref[k], rtol=rtol, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(cp.asnumpy(unplanned[k]), ref[k], rtol=rtol, atol=1e-5,
                                   err_msg=k)


@gpu_test
def test_cnn_training_graph_matches_cpu_without_synchronizing():
    rng = np.random.default_rng(0)
    training_step_check(small_cnn(), rng.normal(size=(8, 1, 16, 16)).astype(np.float32),
                        rng.integers(0, 10, 8))


@gpu_test
@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_exported_training_graphs_match_cpu_without_synchronizing(exported, kind):
    cfg = exported(kind, {"type": "sgd", "lr": 0.1})
    d = np.load(cfg["data"]["train"]["path"], allow_pickle=False)
    training_step_check(onnx.load(cfg["model"]), d["x"][:8], d["y"][:8])


@gpu_test
@pytest.mark.parametrize("kind,optimizer", [("cnn", {"type": "sgd", "lr": 0.05,
                                                     "momentum": 0.9}),
                                            ("gpt", {"type": "adamw", "lr": 3e-3})])
def test_cnn_and_gpt_train_on_cupy_as_on_the_cpu(tmp_path, exported, kind, optimizer):
    cfg = exported(kind, optimizer)
    _compare_runs(_train(cfg, tmp_path, "cpu"), _train(cfg, tmp_path, "gpu"), rtol=1e-4,
                  atol=1e-5)


@gpu_test
@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_cuda_graph_steps_train_as_uncaptured_steps_on_cupy(tmp_path, exported, kind):
    """gpu.cuda_graph on a real GPU: the step is captured (no error) and launched, and the run
    matches the uncaptured one (to the order of atomic adds in scatter kernels)."""
    from tests.test_gpu_standin import _graph_run

    cfg = exported(kind, {"type": "sgd", "lr": 0.05, "momentum": 0.9})
    (plain, plain_losses, _), (run, losses, log) = (
        _graph_run(cfg, tmp_path, graphed, steps=6) for graphed in (False, True))
    ex = next(iter(run.plans.values())).executor
    assert not ex.graph_errors, ex.graph_errors
    assert "captured" in log and isinstance(next(iter(ex._graphs.values())), tuple)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    for k, v in plain.trained_values().items():
        np.testing.assert_allclose(run.trained_values()[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def _one_case_per_op() -> list:
    seen, out = set(), []
    for p in _kernel_cases():
        case = p.values[0]
        if case.op not in seen:
            seen.add(case.op)
            out.append(p)
    return out


@gpu_test
@pytest.mark.parametrize("case", _one_case_per_op())
def test_kernel_case_on_cupy(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for constant in (False, True):
            model, feeds = case_model(case, constant)
            check_on_device(model, feeds, cp, rtol=1e-4, atol=1e-5)


@gpu_test
@pytest.mark.parametrize("kind", ["sgd", "adamw", "lamb"])
def test_optimizers_on_cupy_match_numpy(kind):
    from trainer.optim import OPTIMIZERS

    layout = [("w", 0, 1200), ("b", 1200, 50)]
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=1250).astype(np.float32)
    grads = [rng.normal(size=1250).astype(np.float32) for _ in range(3)]
    results = []
    for xp in (np, cp):
        opt = OPTIMIZERS[kind](xp, 1250, np.float32, layout=layout,
                               groups=[(["b"], {"lr": 0.01})], lr=0.05)
        p = xp.asarray(p0.copy())
        for g in grads:
            opt.step(p, xp.asarray(g), [0.05, 0.01])
        results.append(p if xp is np else cp.asnumpy(p))
    assert opt.kernel_error is None  # (SGD and AdamW: one generated kernel per step on CuPy)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


@gpu_test
def test_the_rank_picks_its_gpu(monkeypatch):
    from trainer.backend import get_xp

    count = cp.cuda.runtime.getDeviceCount()
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", str(count + 1))
    try:
        assert get_xp("gpu") is cp
        assert cp.cuda.Device().id == (count + 1) % count
    finally:
        cp.cuda.Device(0).use()


# -- on any machine ------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,graph", [("fp32", False), ("fp16", False), ("bf16", False),
                                             ("fp32", True)])
def test_gpu_bench_dry_run(tmp_path, capsys, precision, graph):
    """bench/gpu_bench.py end to end on the CPU: tiny models through the CuPy stand-in against
    torch on the CPU (fp16: autocast + GradScaler against ours; --cuda-graph: ours captured,
    and the report says so); a table row per case and a JSON record."""
    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_bench

    out = tmp_path / "bench.json"
    assert gpu_bench.main(["--dry-run", "--precision", precision, "--json", str(out),
                           "--profile", "3"] + ["--cuda-graph"] * graph) == 0
    printed = capsys.readouterr().out
    assert printed.count("planned steps synchronized one by one") == 3  # --profile: per case
    assert f"GPU training step, {precision}, SGD" in printed
    assert ("ours with gpu.cuda_graph: MLP 64-4x128-10: captured" in printed) == graph
    import json

    record = json.loads(out.read_text())
    assert record["precision"] == precision
    rows = record["rows"]
    assert [r["case"].split(",")[0] for r in rows] == ["MLP 64-4x128-10",
                                                        "ResNet-18 layout 8/16/32/64",
                                                        "GPT 2x64"]
    assert len(rows) == 3 and all(r["ours"]["ms"] > 0 and r["torch"]["ms"] > 0 for r in rows)
    assert all(r["ours"]["peak_mb"] > 0 for r in rows)  # the stand-in's memory hook
    assert all(len(r["ours"]["profile"]["ops"]) == 3 for r in rows)


def test_gpu_check_script_parses():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-m gpu" in text and "bench/gpu_bench.py" in text


@gpu_test
@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_fp16_trains_on_cupy_as_on_the_cpu(tmp_path, exported, kind):
    """precision fp16 on CuPy (cuBLAS float16 products) against the CPU's float16 products
    (float32 accumulation, rounded once): the same overflow steps and loss scales, losses and
    weights within float16's rounding."""
    cfg = {**exported(kind, {"type": "sgd", "lr": 0.05}), "precision": "fp16",
           "loss_scale": {"init": 2.0 ** 30, "growth_interval": 2}, "steps": 8}
    cpu, run = _train(cfg, tmp_path, "cpu"), _train(cfg, tmp_path, "gpu")
    scales = [[r["loss_scale"] for r in t.history if "loss" in r] for t in (cpu[0], run[0])]
    assert scales[0] == scales[1], scales
    _compare_runs(cpu, run, rtol=5e-3, atol=1e-3)


@gpu_test
def test_the_row_kernels_build_and_compute_the_host_kernels_on_cupy():
    """trainer/kernels/rowfuse.py on CuPy: every generated kernel compiles (no fallback
    warning) and LayerNorm and BatchNorm (training) forward and backward, Softmax and
    LogSoftmax give the host's values (float32 and float64)."""
    from trainer.kernels import fused, norm, reduce, rowfuse

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):
            x = (rng.normal(size=(8, 5, 96)) * 3 + 1).astype(dt)
            s, b, dy = (rng.normal(size=shape).astype(dt) for shape in ((96,), (96,), x.shape))
            s2 = rng.normal(size=(5, 96)).astype(dt)  # (axis 1: normalized shape [5, 96])
            for axis, scale, bias in ((-1, s, b), (1, s2, None)):
                stash = 11 if dt == np.float64 else 1
                want = norm.LayerNormalization(np, x, scale, bias, axis=axis, stash_type=stash)
                got = norm.LayerNormalization(cp, cp.asarray(x), cp.asarray(scale),
                                              None if bias is None else cp.asarray(bias),
                                              axis=axis, stash_type=stash)
                for g, w in zip(got, want, strict=True):
                    np.testing.assert_allclose(cp.asnumpy(g), w, rtol=tol, atol=tol)
            kw = {"axes": (2,), "eps": 1e-5, "want_dx": True, "want_ds": True, "want_db": True,
                  "ds_shape": (96,), "db_shape": (96,)}
            want = fused.layer_norm_backward(np, dy, x, s, **kw)
            got = fused.layer_norm_backward(cp, cp.asarray(dy), cp.asarray(x), cp.asarray(s),
                                            **kw)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(cp.asnumpy(g), w, rtol=10 * tol, atol=10 * tol)
            for fn in (reduce._softmax, reduce._log_softmax):
                for axes in ((2,), (1,)):
                    np.testing.assert_allclose(cp.asnumpy(fn(cp, cp.asarray(x), axes)),
                                               fn(np, x, axes), rtol=tol, atol=tol)
            np.testing.assert_allclose(
                cp.asnumpy(norm.RMSNormalization(cp, cp.asarray(x), cp.asarray(s))[0]),
                norm.RMSNormalization(np, x, s)[0], rtol=tol, atol=tol)
            s_b, b_b = (rng.normal(size=(1, 5, 1)).astype(dt) for _ in range(2))
            kw = {"axes": (0, 2), "eps": dt(1e-5), "want": ("mean", "var", "sd", "xhat", "y")}
            want = fused.bn_train_forward(np, x, s_b, b_b, **kw)
            got = fused.bn_train_forward(cp, *(cp.asarray(v) for v in (x, s_b, b_b)), **kw)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(cp.asnumpy(g), w, rtol=tol, atol=tol)
            _, _, sd, xhat, _ = want
            kw = {"axes": (0, 2), "count": 8 * 96, "want_dx": True, "want_ds": True,
                  "want_db": True, "ds_shape": (5,), "db_shape": (5,)}
            want = fused.bn_train_backward(np, dy, xhat, sd, s_b, **kw)
            got = fused.bn_train_backward(cp, *(cp.asarray(v) for v in (dy, xhat, sd, s_b)),
                                          **kw)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(cp.asnumpy(g), w, rtol=10 * tol, atol=10 * tol)
    assert all(k.error is None and k._built for k in rowfuse.KERNELS), \
        [(k.what, k.error) for k in rowfuse.KERNELS]


@gpu_test
def test_the_pooling_kernels_build_and_compute_the_host_kernels_on_cupy():
    """trainer/kernels/poolfuse.py on CuPy: every pooling kernel (1-D to 3-D) compiles (no
    fallback warning); MaxPool's Y and Indices (storage_order 0 and 1, ties, NaNs), its
    backward (the gather: the host's float64 bincount) and AveragePool (count_include_pad 0
    and 1) give the host's values, float32 and float64."""
    from trainer.kernels import fused, nn, poolfuse

    poolfuse.KERNELS.clear()  # (made anew for CuPy: no kernel another test built)
    rng = np.random.default_rng(0)
    cases = [((2, 3, 17), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
             ((2, 3, 15, 16), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4,
                               "ceil_mode": 1}),
             ((2, 3, 9, 10), {"kernel_shape": [2, 3], "dilations": [2, 1],
                              "auto_pad": "SAME_UPPER"}),
             ((1, 2, 5, 6, 7), {"kernel_shape": [2, 2, 3], "strides": [1, 2, 2]})]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for dt in (np.float32, np.float64):
            tol = 1e-6 if dt == np.float32 else 1e-15
            for shape, kw in cases:
                x = rng.integers(-4, 5, size=shape).astype(dt)  # (ties)
                x.flat[::7] = np.nan
                for order in (0, 1):
                    want = nn.MaxPool(np, x, storage_order=order, **kw)
                    got = nn.MaxPool(cp, cp.asarray(x), storage_order=order, **kw)
                    for g, w in zip(got, want, strict=True):
                        np.testing.assert_array_equal(cp.asnumpy(g), w)
                (y,) = nn.MaxPool(cp, cp.asarray(x), n_outputs=1, **kw)
                np.testing.assert_array_equal(cp.asnumpy(y), want[0])
                _, ind = nn.MaxPool(np, x, **kw)
                dy = (rng.normal(size=ind.shape) * 10).astype(dt)
                (ref,) = fused.maxpool_backward(np, ind, dy, shape=list(shape))
                (dx,) = fused.maxpool_backward(cp, cp.asarray(ind), cp.asarray(dy),
                                               shape=list(shape),
                                               **poolfuse.geometry_attrs(shape, kw))
                np.testing.assert_array_equal(cp.asnumpy(dx), ref)
                xa = rng.normal(size=shape).astype(dt)
                for cip in (0, 1):
                    (want,) = nn.AveragePool(np, xa, count_include_pad=cip, **kw)
                    (got,) = nn.AveragePool(cp, cp.asarray(xa), count_include_pad=cip, **kw)
                    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=tol, atol=tol)
    assert all(k.error is None and k._built for k in poolfuse.KERNELS.values()), \
        [(k.what, k.error) for k in poolfuse.KERNELS.values()]
    assert set(poolfuse.KERNELS) >= {(kind, nd) for kind in poolfuse.KINDS for nd in (1, 2, 3)}


@gpu_test
@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_bf16_trains_on_cupy_as_on_the_cpu(tmp_path, exported, kind):
    """precision bf16 on CuPy (ml_dtypes' bfloat16: cuBLAS bfloat16 GEMMs with float32
    accumulation for the 2-D products) against the CPU's bfloat16 products (float32
    accumulation, rounded once): losses and weights within bfloat16's rounding."""
    cfg = {**exported(kind, {"type": "sgd", "lr": 0.05}), "precision": "bf16", "steps": 8}
    cpu, run = _train(cfg, tmp_path, "cpu"), _train(cfg, tmp_path, "gpu")
    _compare_runs(cpu, run, rtol=2e-2, atol=5e-3)


@gpu_test
def test_tf32_trains_on_cupy_close_to_the_cpu(tmp_path, exported):
    """precision tf32 on a TF32-capable GPU (compute capability 8.0+): the float32 products
    on tensor cores keep the run within TF32's rounding of the CPU's float32 run."""
    from trainer.backend import set_tf32

    cfg = {**exported("cnn", {"type": "sgd", "lr": 0.05}), "steps": 8}
    try:
        run = _train({**cfg, "precision": "tf32"}, tmp_path, "gpu")
        assert "TF32 tensor cores" in set_tf32(cp, True)
    finally:
        set_tf32(cp, False)
    _compare_runs(_train(cfg, tmp_path, "cpu"), run, rtol=2e-2, atol=2e-3)


@gpu_test
@pytest.mark.parametrize("accumulate", [1, 2])
def test_batches_copied_up_ahead_train_as_on_the_cpu(tmp_path, digits_config, accumulate):
    """data.prefetch with the data on the host: batches go up on the copy stream (pinned
    memory, a ring of device buffers) and the run is the CPU run, also with accumulation."""
    cfg = digits_config(steps=12, accumulate=accumulate, data__on_device=False,
                        data__prefetch=True)
    cpu, gpu = _train(cfg, tmp_path, "cpu"), _train(cfg, tmp_path, "gpu")
    assert gpu[0].batches.uploads is not None
    _compare_runs(cpu, gpu, rtol=1e-4, atol=1e-5)
