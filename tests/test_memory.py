"""The pre-flight report: the training graph built from shapes alone matches the real one, the
memory estimate is within 25% of the measured peak (tracemalloc) on an MLP, a BatchNorm CNN and a
GPT-style decoder, a billion-parameter model gets its report in seconds without its weights being
read, and a config that cannot fit, or has several problems, is refused before training."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import time
import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES, ROOT
from trainer import memory, report
from trainer.autodiff import build_training_graph, training_info
from trainer.config import config_from_dict
from trainer.errors import TrainerError
from trainer.executor import probe
from trainer.graph import input_dtypes, input_shapes, load_model
from trainer.train import Trainer

LOSS = {"type": "cross_entropy", "output": "logits", "target": "label"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (model path, dataset path, batch)}: the digits MLP, the LeNet-style CNN with
    BatchNorm and the GPT-style decoder, as PyTorch exports them, with random data."""
    from tests import torch_models, transformer_models

    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    onnx.save(torch_models.export_onnx(torch_models.make_model("cnn"), "cnn"), d / "cnn.onnx")
    np.savez(d / "cnn.npz", x=rng.standard_normal((256, 1, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, 256))
    x = transformer_models.sample_input("gpt", 128, rng)
    onnx.save(transformer_models.export(transformer_models.make_model("gpt"), x, "dynamo"),
              d / "gpt.onnx")
    np.savez(d / "gpt.npz", x=x, y=transformer_models.sample_target("gpt", x, rng))
    digits = np.load(EXAMPLES / "digits.npz")
    np.savez(d / "digits.npz", x=digits["x_train"], y=digits["y_train"])
    return {"mlp": (EXAMPLES / "digits_mlp.onnx", d / "digits.npz", 64),
            "cnn": (d / "cnn.onnx", d / "cnn.npz", 32),
            "gpt": (d / "gpt.onnx", d / "gpt.npz", 16)}


def _raw(model, data, batch, tmp_path, **over):
    raw = {"model": str(model), "output": str(tmp_path / "out.onnx"), "device": "cpu",
           "data": {"train": {"path": str(data), "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": batch},
           "loss": dict(LOSS), "optimizer": {"type": "adamw", "lr": 1e-3}, "steps": 50,
           "log": {"every_steps": 1000}}
    raw.update(over)
    return raw


def _measured_peak(cfg) -> tuple[int, Trainer]:
    """Bytes of NumPy arrays held between steps (the datasets excepted) plus the peak a step
    adds on top, by tracemalloc, with the same config the estimate is for."""
    Trainer(cfg, stream=io.StringIO(), check=False)  # imports and caches, outside the count
    gc.collect()
    tracemalloc.start()
    try:
        t = Trainer(cfg, stream=io.StringIO())
        for _ in range(3):
            t.train_step([t._next_micro_batch()[1:4]], t.schedule.lrs(t.step))
        gc.collect()
        steady = tracemalloc.get_traced_memory()[0]
        numpy_only = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
        held = sum(s.size for s in numpy_only.statistics("filename"))
        tracemalloc.reset_peak()
        for _ in range(3):
            t.train_step([t._next_micro_batch()[1:4]], t.schedule.lrs(t.step))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        memory.tracing_is_safe()  # (waits for the prefetch thread: no allocation at stop())
        tracemalloc.stop()
    data = sum(a.nbytes for a in t.train_arrays.values())
    return held - data + (peak - steady), t


@pytest.mark.parametrize("name, optimizer, precision, batch", [
    ("mlp", "sgd", "fp32", None), ("cnn", "adamw", "fp32", None), ("gpt", "adamw", "fp32", None),
    ("cnn", "adamw", "fp16", None), ("gpt", "adamw", "bf16", None),  # (16-bit: the Casts too)
    ("cnn", "adamw", "fp32", 256)])  # (convolutions in chunks of the batch)
def test_estimate_is_within_a_quarter_of_the_measured_peak(models, tmp_path, name, optimizer,
                                                           precision, batch):
    model, data, default = models[name]
    batch = batch or default
    opt = {"type": "sgd", "lr": 0.1, "momentum": 0.9} if optimizer == "sgd" else \
        {"type": "adamw", "lr": 1e-3}
    cfg = config_from_dict(_raw(model, data, batch, tmp_path, optimizer=opt,
                                precision=precision), tmp_path)
    measured, t = _measured_peak(cfg)
    est = t.preflight.estimate
    assert est.method == "ONNX shape inference"
    ratio = est.total / measured
    # A 16-bit CNN's estimate is an upper bound further off (measured 1.47): its peak is the
    # first convolution's weight gradient, counted with the Conv kernel's scratch when run
    # alone (float32 copies of the 16-bit operands; 1.1 MB, the same measured at batch 32 as
    # extended from 2 and 3), more than the whole step shows. At batch 256 a float32 CNN's
    # was 1.53 while convolution scratch was extended linearly (the kernels work in chunks of
    # the batch), 1.25 since: its peak is now MaxPool's backward, measured as the training
    # graph's ScatterElements, which the planner runs as one gather instead. The planner's
    # fused ReLU gradient (one select, no boolean mask) and compiled cross entropy lowered the
    # measured peaks further than the graph-based estimate sees: 1.47 -> 1.55 and 1.25 -> 1.30.
    upper = 1.6 if (name, precision) == ("cnn", "fp16") else 1.35 if batch == 256 else 1.25
    assert 0.75 <= ratio <= upper, (name, est, measured)
    # the parts that are plain sums are exact
    assert est.trainable == t.size
    assert est.gradients == t.grads_flat.nbytes


def test_the_shape_probe_frees_each_value_after_its_last_reader():
    """probe() runs the graph at the full batch while the training graph is built: it used to
    keep every value (a small ResNet's trainer peaked at 4.3 GB there, its steps at 1.2 GB).
    A chain of 30 nodes over a 1 MiB tensor: a few MiB at once, not 30; every value's shape
    and dtype as before (the executor that keeps them all gives the reference)."""
    from trainer.executor import Executor

    nodes, prev = [], "x"
    for i in range(30):
        op = ("Relu", "Neg", "Sigmoid")[i % 3]
        nodes.append(helper.make_node(op, [prev], [f"v{i}"]))
        prev = f"v{i}"
    nodes.append(helper.make_node("Cast", [prev], ["y"], to=TensorProto.DOUBLE))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 1024])], [helper.make_tensor_value_info(
            "y", TensorProto.DOUBLE, None)], [numpy_helper.from_array(np.ones(3, np.int64), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    gc.collect()
    tracemalloc.start()
    try:
        found = probe(m, {"x": (256, 1024)}, {"x": np.dtype(np.float32)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, peak  # (keeping every value: more than 30 MiB)
    env = Executor(m, keep_all=True).run({"x": np.zeros((256, 1024), np.float32)})
    want = {k: (tuple(v.shape), v.dtype) for k, v in env.items()}
    assert found == want and found["y"] == ((256, 1024), np.dtype(np.float64))
    assert found["k"] == ((3,), np.dtype(np.int64))


@pytest.mark.parametrize("device", [False, True])
def test_convolution_scratch_is_extended_by_the_chunks_the_kernels_take(tmp_path, device):
    """A 64-channel 3x3 convolution at 56x56 has 7.2 MB of columns per image: on the host the
    kernel takes one image at a time (CONV_CHUNK_BYTES), on a device 35 (DEVICE_CONV_CHUNK_
    BYTES). Its scratch, measured at batches 2 and 3 and extended to 8, is what the kernel
    allocates at 8 when chunking as that device does (the host kernel told to chunk as a GPU's
    stands in for one): 8153 KiB against 8152 on the host, 64961 against 64960 for a GPU,
    which the estimate measured with host chunks until now (8148 KiB: 8x too low)."""
    from trainer.kernels import nn

    w = numpy_helper.from_array(np.zeros((64, 64, 3, 3), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["y"], ["p"]),
         helper.make_node("Flatten", ["p"], ["logits"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 56, 56])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "conv.onnx")
    sm = memory.strip(memory.load_structure(tmp_path / "conv.onnx"))
    small = {b: memory.training_structure(sm, LOSS, in_shapes={"x": (b, 64, 56, 56)})
             for b in (2, 3)}
    got = memory.kernel_scratch(small, 8, device=device)["conv"]
    x, wv = np.zeros((8, 64, 56, 56), np.float32), np.zeros((64, 64, 3, 3), np.float32)
    saved, nn.CHUNK_AS_DEVICE = nn.CHUNK_AS_DEVICE, device
    tracemalloc.start()
    try:
        y = nn.conv_into(np, x, wv, None, [1, 1], [1, 1], [1, 1, 1, 1], [56, 56], 1)
        truth = tracemalloc.get_traced_memory()[1] - y.nbytes
    finally:
        tracemalloc.stop()
        nn.CHUNK_AS_DEVICE = saved
    columns = 64 * 9 * 56 * 56 * 4 * (8 if device else 1)
    assert columns <= truth <= 2.5 * columns  # (the columns, and the product before its
    assert 0.85 <= got / truth <= 1.15, (got, truth)  # transposition into y)
    per_image = 64 * 9 * 56 * 56 * 4
    assert nn.chunk_images(8, per_image, True) == 8 and nn.chunk_images(8, per_image, False) == 1


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt"])
def test_the_graph_built_from_shapes_is_the_training_graph(models, name):
    """The value-free training graph has the nodes of build_training_graph's, and ONNX shape
    inference gives every value the shape that running the graph gives it."""
    model_path, _, batch = models[name]
    model = load_model(model_path)
    real = build_training_graph(model, LOSS, batch_size=batch)
    info = training_info(real)
    st = memory.training_structure(memory.strip(memory.load_structure(model_path)), LOSS,
                                   in_shapes=input_shapes(model, batch))
    assert [(n.name, n.op_type, list(n.output)) for n in st.model.graph.node] == \
        [(n.name, n.op_type, list(n.output)) for n in real.graph.node]
    assert st.gradients == info.gradients and st.state == info.state and st.loss == info.loss
    inits = {t.name for t in real.graph.initializer}
    feeds = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
             for vi in real.graph.input if vi.name not in inits}
    ran = probe(real, feeds, {k: input_dtypes(real)[k] for k in feeds})
    assert not st.missing
    for k, (shape, dtype) in ran.items():
        assert st.shapes[k] == (tuple(shape), dtype), k


def test_walk_counts_views_lifetimes_and_scratch():
    """x -> a = x + x (4 KiB) -> r = relu(a) (4 KiB) -> v = reshape(r) (a view) -> m = a * v
    (4 KiB, fetched); a lives until m, r through its view, m to the end; Mul has 1 KiB of
    scratch. Peak at Mul: a + r + m + 1 KiB."""
    nodes = [helper.make_node("Add", ["x", "x"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "s"], ["v"], name="view"),
             helper.make_node("Mul", ["a", "v"], ["m"], name="mul"),
             helper.make_node("Neg", ["m"], ["unused"], name="neg")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1024])],
                          [helper.make_tensor_value_info("m", TensorProto.FLOAT, [1024])],
                          [numpy_helper.from_array(np.array([1024], np.int64), "s")])
    m = helper.make_model(g)
    sizes = {"a": 4096, "r": 4096, "v": 4096, "m": 4096, "unused": 4096}
    w = memory.walk(m, sizes, ["x"], ["m"], {"mul": 1024}, boundary="r")
    assert w.peak == 3 * 4096 + 1024 and w.peak_node == "mul"
    assert w.kept == 2 * 4096  # a and r alive after relu
    # the static plan: buffers of a and r stay; m leaves the run (fresh); 'unused' reuses a
    # dead buffer of its size, or adds one of another size
    assert memory.walk(m, sizes, ["x"], ["m"], {}, pooled=True).peak == 3 * 4096
    sizes["unused"] = 8192
    assert memory.walk(m, sizes, ["x"], ["m"], {}, pooled=True).peak == 2 * 4096 + 4096 + 8192


@pytest.mark.parametrize("opt", [
    {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    {"type": "adamw", "lr": 1e-3, "amsgrad": True},
    {"type": "adam", "lr": 1e-3, "weight_decay": 0.1,
     "groups": [{"params": "*.bias", "weight_decay": 0.0}]},
    {"type": "rmsprop", "lr": 1e-3, "centered": True, "momentum": 0.5},
])
def test_optimizer_bytes_are_what_the_optimizer_allocates(opt):
    from trainer.config import OptimizerConfig, _build
    from trainer.optim import make_optimizer

    cfg = _build(OptimizerConfig, opt, "optimizer", ROOT)
    names, sizes = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], [640, 10, 100, 10]
    layout = list(zip(names, np.cumsum([0] + sizes[:-1]).tolist(), sizes, strict=True))
    real = make_optimizer(cfg, np, sum(sizes), np.float32, layout)
    p, g = np.ones(sum(sizes), np.float32), np.full(sum(sizes), 0.1, np.float32)
    real.step(p, g, cfg.lr)
    # (the second scratch only where the step took it: SGD, Adam and RMSprop need none; it
    # was allocated for every optimizer, a parameter-sized buffer unused)
    held = {id(a): a.nbytes for a in [*real.state.values(), real.w1, real._w2,
                                      *real._vectors.values()]
            if isinstance(a, np.ndarray)}
    if real._gid is not None:
        held[id(real._gid)] = real._gid.nbytes
    # (up to the few bytes of per-group values the step turns into vectors)
    assert abs(memory.optimizer_bytes(cfg, sum(sizes), np.float32, names, sizes)
               - sum(held.values())) <= 16


# -- a billion parameters ---------------------------------------------------------------------
def _billion(folder, width=8192, layers=16):
    """An MLP of ~1.0e9 float32 parameters whose weights live in one sparse external-data file
    (4 GiB declared, nothing written): only their headers can be read cheaply."""
    nodes, inits, x, offset = [], [], "x", 0
    for i in range(layers):
        n_out = width if i < layers - 1 else 10
        t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, n_out])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "w.bin"), ("offset", str(offset)),
                     ("length", str(width * n_out * 4))):
            t.external_data.add(key=k, value=v)
        offset += width * n_out * 4
        inits += [t, numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", width])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 10])], inits)
    with open(folder / "w.bin", "wb") as f:
        f.truncate(offset)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
              folder / "big.onnx")
    data = folder / "data"
    data.mkdir()
    np.save(data / "x.npy", np.zeros((64, width), np.float32))
    np.save(data / "y.npy", np.zeros(64, np.int64))
    return sum(int(np.prod(t.dims)) for t in inits)


def test_a_billion_parameters_are_reported_in_seconds_without_reading_them(tmp_path):
    count = _billion(tmp_path)
    assert count > 1e9
    raw = _raw(tmp_path / "big.onnx", tmp_path / "data", 32, tmp_path)
    cfg = config_from_dict(raw, tmp_path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        pf = report.preflight(cfg)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = pf.estimate
    assert seconds < 10, seconds
    assert peak < 256 << 20, peak  # the weights alone are 4 GiB
    assert est.trainable == count and est.trainable_bytes == 4 * count
    # AdamW: parameters, gradients, two moments and one scratch buffer of 4 bytes each
    assert est.parameters >= 4 * count and est.gradients >= 4 * count
    assert est.optimizer == 3 * 4 * count
    assert est.total >= 5 * 4 * count
    assert "memory per process" in pf.text()


def test_a_config_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    _billion(tmp_path)
    monkeypatch.setattr(memory, "available_memory", lambda xp=np: (8 << 30, "MemAvailable"))
    cfg = config_from_dict(_raw(tmp_path / "big.onnx", tmp_path / "data", 32, tmp_path),
                           tmp_path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TrainerError) as err:
            Trainer(cfg, stream=io.StringIO())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10 and peak < 256 << 20
    msg = str(err.value)
    assert "estimated peak memory" in msg and "exceeds the 8.0 GiB of MemAvailable" in msg
    assert "memory_check: false" in msg and "\n" not in msg


def test_memory_check_false_starts_anyway(tmp_path, digits_config, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda xp=np: (1024, "MemAvailable"))
    with pytest.raises(TrainerError, match="exceeds the 1.0 KiB"):
        Trainer(config_from_dict(digits_config(), tmp_path), stream=io.StringIO())
    t = Trainer(config_from_dict(digits_config(memory_check=False, steps=2), tmp_path),
                stream=io.StringIO())
    assert t.fit()["steps"] == 2


# -- the probe, where shape inference cannot say ----------------------------------------------
def _if_model(path):
    """logits = If(true) then Gemm(x, W1, b1) else Gemm(x, W2, b2): control flow that the
    training graph lowers, so the estimate runs the graph at small batches instead."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal(s)).astype(np.float32), k)
             for k, s in (("W1", (64, 10)), ("b1", (10,)), ("W2", (64, 10)), ("b2", (10,)))]
    inits.append(numpy_helper.from_array(np.array(True), "cond"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])

    def branch(w, b):
        return helper.make_graph([helper.make_node("Gemm", ["x", w, b], ["logits_" + w])],
                                 w, [], [helper.make_tensor_value_info(
                                     "logits_" + w, TensorProto.FLOAT, ["N", 10])])
    node = helper.make_node("If", ["cond"], ["logits"], then_branch=branch("W1", "b1"),
                            else_branch=branch("W2", "b2"))
    g = helper.make_graph([node], "if", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 64])], [out], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_control_flow_falls_back_to_a_probe_at_small_batches(tmp_path, models):
    _if_model(tmp_path / "if.onnx")
    cfg = config_from_dict(_raw(tmp_path / "if.onnx", models["mlp"][1], 256, tmp_path,
                                optimizer={"type": "sgd", "lr": 0.1}), tmp_path)
    measured, t = _measured_peak(cfg)
    est = t.preflight.estimate
    assert est.method.startswith("probe at batch 2, 3, scaled to 256")
    assert 0.75 <= est.total / measured <= 1.25, (est, measured)
    assert est.out_shape == (256, 10)
    # the frozen tensors are the model's own left out (the else branch's W2 and b2), not also
    # the constants the probed training graph added (the loss's, the gradient seed: a Keras
    # LSTM showed "27 frozen (172 B)" at opset 13, "1 frozen (4 B)" at opset 17)
    assert (est.frozen, est.frozen_bytes) == (650, 2600), est
    # `check` (a process of its own) reads the values as training does, and reports the
    # same estimate rather than a problem (it said "needs the model's values" and failed)
    path = tmp_path / "if.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path / "if.onnx", models["mlp"][1], 256, tmp_path,
                                        optimizer={"type": "sgd", "lr": 0.1})))
    proc = subprocess.run([sys.executable, "-m", "trainer", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "estimate from probe at batch 2, 3, scaled to 256" in proc.stdout, proc.stdout


# -- every problem at once --------------------------------------------------------------------
def test_every_problem_is_listed_at_once(tmp_path, digits_config):
    d = np.load(EXAMPLES / "digits.npz")
    yt = d["y_test"].copy()
    yt[3] = 12
    np.savez(tmp_path / "e.npz", xt=d["x_test"], yt=yt)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "file").write_text("x")
    raw = digits_config(output=str(tmp_path / "outdir"),
                        log={"metrics": str(tmp_path / "file" / "m.jsonl")})
    raw["data"]["eval"] = {"path": str(tmp_path / "e.npz"), "inputs": {"x": "xt"},
                           "targets": {"label": "yt"}}
    with pytest.raises(TrainerError) as err:
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    msg = str(err.value)
    assert msg.startswith("3 problems found before training: (1) output")
    assert "(2) log.metrics" in msg and "(3) data.eval: target 'label' holds 12 at sample 3" \
        in msg


def test_check_prints_the_preflight_report_of_a_config(tmp_path, digits_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config()))
    proc = subprocess.run([sys.executable, "-m", "trainer", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "fc1" in out and "Gemm" in out  # the support table of the model
    for text in ("memory per process (estimate from ONNX shape inference",
                 "parameters: 9,610 trained", "data.train: 1437 samples",
                 "44 batch(es) per epoch", "20 optimizer steps"):
        assert text in out, text
    raw = digits_config(data__batch_size=5000)
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "trainer", "check", str(path), "--set",
                           "output=" + str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert "problems (2):" in proc.stdout and "fewer than one batch" in proc.stdout
    assert "is a directory" in proc.stdout


def test_kernel_scratch_is_not_traced_while_other_threads_run(models, tmp_path):
    """tracemalloc is process-wide and unsafe to start while another thread allocates (a
    CPython race): a pre-flight report made off the main thread, as by ranks emulated as
    threads, skips the scratch measurement and says so; on the main thread it measures."""
    import threading

    model, data, batch = models["cnn"]
    cfg = config_from_dict(_raw(model, data, batch, tmp_path), tmp_path)
    on_main = Trainer(cfg, stream=io.StringIO()).preflight.estimate
    assert memory.tracing_is_safe() and "scratch" not in on_main.method
    box = {}
    worker = threading.Thread(target=lambda: box.update(
        est=Trainer(cfg, stream=io.StringIO()).preflight.estimate))
    worker.start()
    worker.join()
    assert box["est"].method.endswith("kernel scratch not measured (other threads are running)")
    assert box["est"].total <= on_main.total


def test_zero1_estimate_counts_the_rank_share(models, tmp_path):
    """distributed.shard_optimizer on 4 (emulated) ranks: each rank's estimate holds 1/4 of
    the optimizer state and the reduced gradient shard, which is what each rank allocates."""
    from trainer.comm.local import run_local

    model, data, batch = models["mlp"]
    raw = _raw(model, data, batch, tmp_path, optimizer={"type": "adamw", "lr": 1e-3})
    one = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).preflight.estimate
    raw = _raw(model, data, batch * 4, tmp_path, optimizer={"type": "adamw", "lr": 1e-3},
               distributed={"shard_optimizer": True})

    def job(comm):
        t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
        state = sum(v.nbytes for v in t.optimizer.state.values())
        return t.preflight.estimate, t.grads_flat.nbytes + t.grad_shard.nbytes, state

    for est, grads, state in run_local(4, job):
        assert est.gradients == grads
        assert abs(est.optimizer * 4 - one.optimizer) <= 4 * 4 * 8  # (rounding of the shards)
        assert state <= est.optimizer


def _frozen_backbone(tmp_path, dtype=np.float32, samples: int = 16):
    """A MatMul model whose two 256x256 layers are frozen below a trained head, its data."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(dtype), n)
             for n, s in (("w0", (256, 256)), ("w1", (256, 256)), ("head", (256, 10)))]
    code = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "head"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", code, ["N", 256])],
                          [helper.make_tensor_value_info("logits", code, ["N", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    data = np.float32 if np.dtype(dtype).kind == "V" else dtype  # (bfloat16: fed float32)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((samples, 256)).astype(data),
             y=rng.integers(0, 10, samples))
    return tmp_path / "m.onnx", tmp_path / "d.npz"


@pytest.mark.parametrize("dtype, precision", [(np.float32, "fp32"), (np.float16, "fp32"),
                                              (np.float32, "fp64"), (np.float32, "bf16"),
                                              (ml_dtypes.bfloat16, "fp32")])
def test_values_not_trained_are_held_once_for_every_executor(tmp_path, dtype, precision):
    """A frozen backbone's values were held by the model as loaded, its run form, each
    training graph and each executor (the steps' at each batch size, the evaluation's): 4 to
    7 copies (a frozen 32 MiB backbone took 130 MiB in training, 227 MiB with an
    evaluation). Now one array per tensor, read-only, read by every executor; the protos hold
    stubs; the export writes the model's own values back, bit for bit, in its own type."""
    import onnxruntime as ort

    from trainer.memory import is_stub

    model, data = _frozen_backbone(tmp_path, dtype, samples=10)
    raw = _raw(model, data, 4, tmp_path, frozen=["w0", "w1"], steps=3, precision=precision)
    raw["data"].update(drop_last=False, eval={"path": str(data), "inputs": {"x": "x"},
                                              "targets": {"label": "y"}})
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    assert sorted(t.shared) == ["w0", "w1"] and t.names == ["head"]
    assert sorted(t.plans) == [2, 4]  # (the last partial batch's plan too)
    executors = [p.executor for p in t.plans.values()] + [t._inference(True), t._inference()]
    for name, value in t.shared.items():
        assert not value.flags.writeable
        for ex in executors:
            assert ex.constants[name] is value, name
        for m in [t.model, t.run_model, t.step_model] + [tm for tm, _ in t._graphs.values()]:
            assert all(is_stub(i) for i in m.graph.initializer if i.name == name), name
    given = {i.name: i for i in onnx.load(model).graph.initializer}
    out = onnx.load(tmp_path / "out.onnx")
    for i in out.graph.initializer:
        if i.name in t.shared:
            assert i.data_type == given[i.name].data_type
            assert numpy_helper_bytes(i) == numpy_helper_bytes(given[i.name]), i.name
    if np.dtype(dtype).kind == "V":  # (onnxruntime's CPU provider has no bfloat16 MatMul)
        return
    x = np.load(data)["x"][:3]
    got = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, t.predict({"x": x})["logits"], rtol=2e-2 if
                               dtype == np.float16 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype, precision, frozen", [
    (np.float32, "fp32", ["w0", "w1"]), (np.float32, "fp32", []), (np.float16, "fp32", []),
    (np.float32, "bf16", ["w0"]), (np.float32, "fp64", [])])
def test_the_set_up_reads_each_large_tensor_once_and_builds_from_stubs(
        tmp_path, monkeypatch, dtype, precision, frozen):
    """The set-up read every weight of the model again and again, a copy each time: the
    training graph's model (a deepcopy), the build's deepcopies, its probes' executors, its
    folded constants, the flat buffer's parts and their concatenation (a 129 MiB MLP's set-up
    peaked at 5.5 copies of its values). Now each tensor of SHARED_MIN elements or more is read
    once into an array (a 16-bit model's converted once more); every proto the set-up makes
    holds a stub for it; and the run trains as it did."""
    from onnx import numpy_helper as nh

    from trainer.memory import is_stub

    model, data = _frozen_backbone(tmp_path, dtype, samples=10)
    reads: dict[str, int] = {}
    real = nh.to_array

    def counted(t, *args, **kwargs):
        if t.name in ("w0", "w1", "head") or t.name.startswith(("w0", "w1")):
            reads[t.name] = reads.get(t.name, 0) + 1
        return real(t, *args, **kwargs)
    raw = _raw(model, data, 4, tmp_path, frozen=frozen, steps=3, precision=precision)
    raw["data"]["drop_last"] = False
    cfg = config_from_dict(raw, tmp_path)
    monkeypatch.setattr(nh, "to_array", counted)
    # (without the pre-flight, whose estimate reads a small model's values as it finds them)
    t = Trainer(cfg, stream=io.StringIO(), check=False)
    monkeypatch.setattr(nh, "to_array", real)
    converted = dtype == np.float16 or precision == "fp64"  # (the compute form's values)
    assert reads and max(reads.values()) <= 1 + converted + bool(frozen), reads
    for m in [t.run_model, t.step_model] + [tm for tm, _ in t._graphs.values()]:
        assert all(is_stub(i) for i in m.graph.initializer if i.name in ("w0", "w1")), \
            [i.name for i in m.graph.initializer if not is_stub(i)]
    assert not t._setup_values
    t.fit()
    with monkeypatch.context() as mp:  # (the same run, built from protos holding values)
        import copy

        from trainer import train as train_mod

        mp.setattr(train_mod, "_stub_large_values", lambda m: (copy.deepcopy(m), {}))
        ref = Trainer(cfg, stream=io.StringIO())
    ref.fit()
    for name in t.names:
        np.testing.assert_array_equal(t.params[name], ref.params[name], err_msg=name)


def numpy_helper_bytes(t) -> bytes:
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def test_the_estimate_counts_what_a_run_holds_of_frozen_values_and_accumulation(tmp_path):
    """A frozen backbone's values are held once (see above), however many executors read
    them, where the estimate counted 4 copies, 7 with an evaluation (its smaller constants
    are still held by each model form and executor); accumulate's micro-batch gradients
    were not counted at all."""
    _frozen_backbone(tmp_path)

    def estimate(**over):
        raw = _raw(tmp_path / "m.onnx", tmp_path / "d.npz", 8, tmp_path, frozen=["w0", "w1"])
        raw.update(over)
        return Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).preflight.estimate

    plain = estimate()
    frozen = 2 * 256 * 256 * 4
    assert plain.frozen_bytes == frozen
    assert frozen <= plain.parameters - plain.trainable_bytes < frozen + 1024
    # (the set-up holds a few copies of the model's values for a while: its peak, here)
    assert plain.peak == plain.setup >= memory.SETUP_COPIES * (frozen + plain.trainable_bytes)
    assert plain.setup > plain.total
    evaluated = estimate(data={**_raw(tmp_path / "m.onnx", tmp_path / "d.npz", 8,
                                      tmp_path)["data"],
                               "eval": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                                        "targets": {"label": "y"}}})
    assert plain.parameters <= evaluated.parameters < plain.parameters + 1024
    accumulated = estimate(accumulate=2)
    assert accumulated.gradients - plain.gradients == plain.trainable_bytes == 2560 * 4


def test_memory_check_counts_the_set_ups_peak(tmp_path, monkeypatch):
    """With a frozen backbone the set-up's copies of the model (loaded, converted, the first
    training graph's build) set the run's peak, measured 5.4-5.5 times the model's values
    (3.0-3.4 since the set-up reads them once and builds from stubs), where training holds
    them once: memory_check compared the training state alone (a 32 MiB
    backbone: estimated 33 MiB, measured 172 MiB)."""
    _frozen_backbone(tmp_path)
    raw = _raw(tmp_path / "m.onnx", tmp_path / "d.npz", 8, tmp_path, frozen=["w0", "w1"])
    est = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).preflight.estimate
    monkeypatch.setattr(memory, "available_memory",
                        lambda xp=None: ((est.total + est.setup) // 2, "MemAvailable"))
    out = io.StringIO()
    with pytest.raises(TrainerError, match="the estimated peak memory, .* exceeds"):
        Trainer(config_from_dict(raw, tmp_path), stream=out)
    assert f"{memory.human(est.setup)} (the set-up's, which loads, converts and builds the " \
        f"training graph from the model; training holds {memory.human(est.total)})" in \
        out.getvalue()


@pytest.mark.parametrize("version", [1, 2])
def test_a_memory_cgroups_limit_bounds_the_memory_available(tmp_path, monkeypatch, version):
    """memory_check compared the estimate with the host's MemAvailable alone: in a container
    or a Slurm job limited below it, a config the kernel would end was taken. The limit less
    the cgroup's use (its inactive file cache left out, as reclaimable) bounds it, the lowest
    along the cgroup's parents; a cgroup without a limit changes nothing."""
    root = tmp_path / "cg"
    own = "job/step" if version == 2 else "memory/job/step"
    (root / own).mkdir(parents=True)
    names = (("memory.max", "memory.current", "inactive_file") if version == 2 else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))

    def limit(folder, value, used, inactive):
        (root / folder / names[0]).write_text(f"{value}\n")
        (root / folder / names[1]).write_text(f"{used}\n")
        (root / folder / "memory.stat").write_text(f"anon 1\n{names[2]} {inactive}\n")

    no_limit = "max" if version == 2 else str(2**63 - 4096)
    limit(own, no_limit, 5 << 30, 0)
    limit(os.path.dirname(own), 4 << 30, 3 << 30, 1 << 30)  # (the job's: 2 GiB left)
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/job/step\n" if version == 2 else
                      "4:memory:/job/step\n3:cpuset:/\n")
    assert memory.cgroup_available(str(cgroup), str(root)) == 2 << 30
    limit(os.path.dirname(own), no_limit, 3 << 30, 0)
    assert memory.cgroup_available(str(cgroup), str(root)) is None
    monkeypatch.setattr(memory, "cgroup_available", lambda: 2 << 30)
    got, what = memory.available_memory()
    assert (got, what) == (2 << 30, "the memory cgroup's limit less its use") or \
        what == "MemAvailable" and got < 2 << 30


def test_a_run_reports_the_memory_it_needed(tmp_path, digits_config):
    """The end of a CPU run logs the process's peak resident memory next to the pre-flight
    estimate (which covers the training state only, so it is the smaller one), and returns it."""
    stream = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=3, output=str(tmp_path / "m.onnx")),
                                 tmp_path), stream=stream)
    result = t.fit()
    text = stream.getvalue()
    assert "memory: peak resident memory of the process (interpreter, libraries and data " \
           "included): " in text
    assert "; estimated before training (the training state alone): " in text
    assert result["peak_memory_mb"] * 2**20 > t.preflight.estimate.total > 0
    # (after the end-of-run evaluation and export, which take memory too: it came before)
    assert text.index("memory: peak resident") > text.index(f"wrote {tmp_path / 'm.onnx'}")


def test_a_wrongly_declared_output_shape_is_inferred_not_believed(tmp_path):
    """plcmos_v2 (speechmos) declares its output a scalar while its Squeeze of [batch, 1]
    makes it [batch]: the estimate infers the shape instead of taking the declaration (it
    failed with "no estimate: ValueError" from a ReduceMean over no axes), and training runs."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Squeeze", ["h"],
                                                                        ["score"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.ones((4, 1), np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)]),
              tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 4)).astype(np.float32),
             y=rng.standard_normal(16).astype(np.float32))
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 2,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "batch_size": 8},
           "loss": {"type": "mse", "output": "score", "target": "t"},
           "optimizer": {"type": "sgd", "lr": 0.1}}
    cfg = config_from_dict(raw, tmp_path)
    pf = report.preflight(cfg)
    assert not pf.problems and pf.estimate.method == "ONNX shape inference"
    assert pf.estimate.out_shape == (8,)
    t = Trainer(cfg, stream=io.StringIO())
    t.fit()
    assert t.step == 2 and not np.array_equal(t.trained_values()["W"], np.ones((4, 1)))


def test_a_model_that_does_not_run_at_the_probe_batches_is_probed_at_its_own(tmp_path, models,
                                                                              monkeypatch):
    """Longformer's TorchScript export fails at batch 2 (a Gather past its window table) and
    runs at 3: the probe at 2 and 3 refused a configuration that trains. The estimate probes
    the configured batch alone and says why."""
    from trainer import memory
    from trainer.errors import ModelError

    real = memory._probed_structure

    def probed(model, loss, trainable, frozen, batchnorm, in_shapes, precision):
        if next(iter(in_shapes.values()))[0] in (2, 3):
            raise ModelError("node 'g' (Gather) failed: index 288 is out of range")
        return real(model, loss, trainable, frozen, batchnorm, in_shapes, precision)
    monkeypatch.setattr(memory, "_probed_structure", probed)
    _if_model(tmp_path / "if.onnx")
    cfg = config_from_dict(_raw(tmp_path / "if.onnx", models["mlp"][1], 256, tmp_path,
                                optimizer={"type": "sgd", "lr": 0.1}), tmp_path)
    measured, t = _measured_peak(cfg)
    est = t.preflight.estimate
    assert est.method.startswith("probe at batch 256, scaled to 256") and \
        "does not run at batch 2, 3: node 'g' (Gather) failed" in est.method
    assert 0.75 <= est.total / measured <= 1.25, (est, measured)


def test_shape_inference_is_bounded_in_memory(tmp_path, digits_config, capsys):
    """A Reshape to [2^40, 0] in a 359-byte model: ONNX's data propagation took 10 GB (all the
    machine had) before the estimate could refuse the model. Its address space is bounded
    now: the pre-flight names the node, as it does where memory is short."""
    from onnx import TensorProto, helper, numpy_helper

    with memory.bounded_address_space(256 << 20):
        with pytest.raises(MemoryError):
            np.ones(1 << 30, np.uint8)
    assert np.ones(1 << 28, np.uint8).sum() == 1 << 28  # (the limit is gone after the block)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]),
         helper.make_node("Reshape", ["h", "shp"], ["r"], name="rs"),
         helper.make_node("MatMul", ["r", "W2"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.ones((64, 6), np.float32), "W1"),
         numpy_helper.from_array(np.ones((6, 10), np.float32), "W2"),
         numpy_helper.from_array(np.array([2 ** 40, 0], np.int64), "shp")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    from trainer.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(digits_config(model=str(tmp_path /
                                                                          "m.onnx"))))
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "node 'rs' (Reshape) failed" in capsys.readouterr().out


def test_the_address_space_bound_waits_for_a_process_of_one_thread():
    """RLIMIT_AS is the process's: with ranks run as threads, one rank's bound failed the
    other's allocations, and two blocks restored each other's limits, which left the whole
    process bounded (a CI run ended in MemoryErrors). With other threads running, no bound."""
    import threading

    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with memory.bounded_address_space(1 << 20):
            assert np.ones(1 << 28, np.uint8).sum() == 1 << 28
    finally:
        release.set()
        other.join()
    import resource

    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY


def test_the_estimate_counts_cloned_layers_the_exporter_merged(tmp_path):
    """TorchScript's export of two cloned Linear layers (identical values) keeps one tensor
    read through Identity nodes, which training gives its own tensor again; the estimate's
    stripped model (large tensors without values) could not copy a stub, so it counted the
    file's tensors alone (a 4-layer Transformer encoder: 154 MiB estimated, 358 measured)."""
    import copy

    import torch

    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 300)  # (90,000 values: above what the estimate reads)
    net = torch.nn.Sequential(layer, torch.nn.ReLU(), copy.deepcopy(layer), torch.nn.ReLU(),
                              torch.nn.Linear(300, 10))
    torch.onnx.export(net, (torch.randn(4, 300),), str(tmp_path / "m.onnx"),
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    assert len(onnx.load(str(tmp_path / "m.onnx")).graph.initializer) == 4  # (merged)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 300)).astype(np.float32),
             y=rng.integers(0, 10, 16))
    raw = _raw(tmp_path / "m.onnx", tmp_path / "d.npz", 8, tmp_path)
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    assert t.preflight.estimate.trainable == t.size == 2 * 300 * 301 + 3010
