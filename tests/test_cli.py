"""The command line: demo-style runs, check/grad/eval, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES, ROOT


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write_cfg(tmp_path, raw) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_train_with_overrides(tmp_path, digits_config):
    cfg = write_cfg(tmp_path, digits_config(steps=5))
    proc = run("train", cfg, "--set", "optimizer.lr=0.05", "--set", "log.every_steps=5")
    assert proc.returncode == 0, proc.stderr
    assert "step 5" in proc.stdout and "lr 0.05" in proc.stdout
    assert (tmp_path / "out" / "model.onnx").exists()


def test_bad_config_key_names_the_key(tmp_path, digits_config):
    raw = digits_config()
    raw["optimizer"]["lrr"] = 0.1
    line = one_line_error(run("train", write_cfg(tmp_path, raw)))
    assert "optimizer.lrr" in line and "optimizer.lr" in line


def test_bad_override_names_the_key(tmp_path, digits_config):
    line = one_line_error(run("train", write_cfg(tmp_path, digits_config()), "--set",
                              "data.batchsize=8"))
    assert "data.batchsize" in line and "batch_size" in line


def test_missing_model_file(tmp_path, digits_config):
    line = one_line_error(run("train", write_cfg(tmp_path, digits_config(
        model=str(tmp_path / "nope.onnx")))))
    assert "model file not found" in line and "nope.onnx" in line


def test_corrupt_model_file(tmp_path, digits_config):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    line = one_line_error(run("train", write_cfg(tmp_path, digits_config(model=str(bad)))))
    assert "bad.onnx" in line


def test_missing_dataset_array(tmp_path, digits_config):
    raw = digits_config()
    raw["data"]["train"]["inputs"] = {"x": "pixels"}
    line = one_line_error(run("train", write_cfg(tmp_path, raw)))
    assert "'pixels'" in line and "x_train" in line


def test_data_shape_mismatch(tmp_path, digits_config):
    np.savez(tmp_path / "d.npz", x=np.zeros((40, 63), np.float32), y=np.zeros(40, np.int64))
    raw = digits_config()
    raw["data"] = {"train": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                             "targets": {"label": "y"}}, "batch_size": 8}
    line = one_line_error(run("train", write_cfg(tmp_path, raw)))
    assert "[63]" in line and "[64]" in line


def _model(path, ops):
    """x[N,64] @ w -> Round-gated -> ops... -> logits[N,10] (ops are (op_type, name))."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    w = numpy_helper.from_array(np.full((64, 10), 0.01, np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Round", ["h"], ["r"], name="round1"),
             helper.make_node("Add", ["h", "r"], ["t0"], name="add")]
    for k, (op, name, *domain) in enumerate(ops):
        nodes.append(helper.make_node(op, [f"t{k}"], [f"t{k + 1}"], name=name,
                                      domain=domain[0] if domain else None))
    nodes.append(helper.make_node("Identity", [f"t{len(ops)}"], ["logits"], name="out"))
    g = helper.make_graph(nodes, "g", [x], [y], [w])
    imports = [helper.make_opsetid("", 18)]
    if any(len(o) > 2 for o in ops):
        imports.append(helper.make_opsetid("com.example", 1))
    onnx.save(helper.make_model(g, opset_imports=imports), path)


@pytest.fixture
def twist_kernel():
    """A forward kernel (identity) for com.example's Twist op, which has no gradient rule."""
    from trainer.kernels import KERNELS, kernel

    kernel("Twist", domain="com.example")(lambda xp, x: (x,))
    yield
    del KERNELS[("com.example", "Twist")]


def test_ops_without_gradient_rule_are_all_listed(tmp_path, digits_config, twist_kernel,
                                                  capsys):
    from trainer.cli import main

    model = tmp_path / "m.onnx"
    _model(model, [("Twist", "twist1", "com.example"), ("Relu", "relu"),
                   ("Twist", "twist2", "com.example")])
    assert main(["train", write_cfg(tmp_path, digits_config(model=str(model)))]) == 2
    line = capsys.readouterr().err.strip()
    assert "no gradient rule" in line and len(line.splitlines()) == 1
    assert "Twist of domain com.example (node 'twist1')" in line
    assert "Twist of domain com.example (node 'twist2')" in line
    assert "relu" not in line and "round1" not in line  # Round carries no gradient
    assert main(["check", str(model)]) == 1
    out = capsys.readouterr().out
    assert "twist1" in out and "MISSING" in out
    assert "not differentiable" in out  # Round


def test_ops_without_forward_kernel_are_listed_before_data_is_read(tmp_path, digits_config):
    model = tmp_path / "m.onnx"
    _model(model, [("Warp", "warp1", "com.example"), ("Relu", "relu"),
                   ("Weft", "weft1", "com.example")])
    raw = digits_config(model=str(model))
    raw["data"]["train"]["path"] = str(tmp_path / "missing.npz")
    line = one_line_error(run("train", write_cfg(tmp_path, raw)))
    assert "no forward kernel" in line
    assert "Warp of domain com.example (node 'warp1')" in line
    assert "Weft of domain com.example (node 'weft1')" in line


def test_check_on_demo_model():
    proc = run("check", str(EXAMPLES / "digits_mlp.onnx"))
    assert proc.returncode == 0, proc.stdout
    assert "all trainable" in proc.stdout and "Gemm" in proc.stdout


def _grad_graph(tmp_path, *extra: str) -> tuple[str, onnx.ModelProto]:
    """`grad` on the digits MLP at batch 8: the written path and its (fully checked) model."""
    out = tmp_path / "train.onnx"
    proc = run("grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits",
               "--batch-size", "8", *extra, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    return str(out), model


DIGITS_BATCH = {"x": np.random.rand(8, 64).astype(np.float32),
                "label": np.arange(8, dtype=np.int64)}


def test_grad_writes_a_training_graph_onnxruntime_runs(tmp_path):
    out, model = _grad_graph(tmp_path, "--loss", "cross_entropy")
    names = [o.name for o in model.graph.output]
    assert names[0] == "loss" and "fc1.weight_grad" in names
    res = ort.InferenceSession(out).run(["loss"], DIGITS_BATCH)
    assert np.isfinite(res[0])


def test_grad_label_smoothing_runs_in_onnxruntime_as_torchs_loss(tmp_path):
    """grad --label-smoothing --weight: the training graph of torch's cross_entropy
    (label_smoothing, weight), its loss and gradients in onnxruntime those of torch
    autograd."""
    import torch
    from onnx import numpy_helper

    weight = [1.0, 2.0, 0.5, 1.0, 0.0, 3.0, 1.0, 1.0, 0.25, 1.0]
    out, model = _grad_graph(tmp_path, "--label-smoothing", "0.3", "--weight",
                             ",".join(map(str, weight)))
    names = ["loss", "fc1.weight_grad", "fc2.bias_grad"]
    got = ort.InferenceSession(out).run(names, DIGITS_BATCH)
    p = {t.name: torch.tensor(numpy_helper.to_array(t), dtype=torch.float64, requires_grad=True)
         for t in onnx.load(EXAMPLES / "digits_mlp.onnx").graph.initializer}
    x = torch.tensor(DIGITS_BATCH["x"], dtype=torch.float64)
    h = torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"])
    loss = torch.nn.functional.cross_entropy(h @ p["fc2.weight"].T + p["fc2.bias"],
                                             torch.tensor(DIGITS_BATCH["label"]),
                                             label_smoothing=0.3,
                                             weight=torch.tensor(weight, dtype=torch.float64))
    loss.backward()
    want = [loss.item(), p["fc1.weight"].grad.numpy(), p["fc2.bias"].grad.numpy()]
    for name, a, b in zip(names, got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
    assert "must be in [0, 1]" in one_line_error(run(
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "--label-smoothing",
        "1.5", "-o", str(tmp_path / "x.onnx")))
    assert "the class weights (loss.weight, grad --weight) have 2 entries, one per class, " \
        "but 'logits' [8, 10] has 10 classes" in one_line_error(run(
            "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "--weight", "1,2",
            "--batch-size", "8", "-o", str(tmp_path / "x.onnx")))
    assert "give one number per class" in one_line_error(run(
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "--weight", "1,a",
        "-o", str(tmp_path / "x.onnx")))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_grad_16_bit_writes_the_mixed_precision_training_graph(tmp_path, precision):
    """`grad --precision bf16|fp16`: the products read 16-bit copies (Casts) and their
    gradients come back to the float32 parameters; the graph checks and our executor runs
    it."""
    from trainer.executor import Executor

    _, model = _grad_graph(tmp_path, "--precision", precision)
    low = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16}[precision]
    to_low = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == low]
    assert {n.input[0] for n in to_low} >= {"fc1.weight", "fc2.weight", "x"}
    got = Executor(model).run(dict(DIGITS_BATCH))
    assert got["fc1.weight_grad"].dtype == np.float32
    assert np.isfinite(got["loss"]) and np.abs(got["fc1.weight_grad"]).sum() > 0


def test_grad_fp16_takes_the_loss_scale_as_an_input(tmp_path):
    """The fp16 graph's backward seed was a fixed initializer (1): a runtime could not apply
    a loss scale. It is an input defaulting to 1; fed 1024, the gradients are 1024 times."""
    out, model = _grad_graph(tmp_path, "--precision", "fp16")
    assert "loss_grad_seed" in [vi.name for vi in model.graph.input]
    sess = ort.InferenceSession(out)
    plain = sess.run(["loss", "fc1.weight_grad"], DIGITS_BATCH)
    scaled = sess.run(["loss", "fc1.weight_grad"],
                      {**DIGITS_BATCH, "loss_grad_seed": np.array(1024, np.float32)})
    assert plain[0] == scaled[0] and np.abs(plain[1]).max() > 0
    np.testing.assert_allclose(scaled[1], 1024 * plain[1], rtol=1e-3, atol=1e-6)


def test_grad_16_bit_says_what_it_cast_and_computes_as_train(tmp_path):
    """`grad --precision` wrote a graph other than train's in silence: on an opset-12 model
    no bfloat16 Cast (train says why), and a float16 model all in float16 (train computes its
    float32 copies, the products in float16). It now builds train's form and says so."""
    from trainer.executor import Executor
    from trainer.graph import convert_floats

    m = onnx.load(EXAMPLES / "digits_mlp.onnx")
    m.opset_import[0].version = 12
    onnx.save(m, tmp_path / "m12.onnx")
    proc = run("grad", str(tmp_path / "m12.onnx"), "--output", "logits", "--precision", "bf16",
               "-o", str(tmp_path / "g12.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "note: precision bf16: 0 of 2 matrix products (MatMul, Gemm, Conv, ConvTranspose) " \
        "in bfloat16, the rest in their own type (bfloat16 Casts need opset 13 or later and " \
        "this model's is 12: it trains in float32; onnx.version_converter.convert_version(" \
        "model, 13) raises its opset)" in proc.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(
        {"model": str(tmp_path / "m12.onnx"), "precision": "bf16", "steps": 1,
         "data": {"train": {"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_train"},
                            "targets": {"label": "y_train"}}, "batch_size": 8},
         "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}))
    proc = run("check", str(cfg))
    assert "warning: precision bf16: bfloat16 Casts need opset 13 or later and this model's " \
        "is 12: it trains in float32" in proc.stdout, proc.stdout
    onnx.save(convert_floats(onnx.load(EXAMPLES / "digits_mlp.onnx"), np.float32, np.float16),
              tmp_path / "half.onnx")
    proc = run("grad", str(tmp_path / "half.onnx"), "--output", "logits", "--precision", "fp16",
               "--batch-size", "8", "-o", str(tmp_path / "gh.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "note: the model's float16 values are float32 in this graph, as `train` computes " \
        "them" in proc.stdout
    assert "note: precision fp16: 2 of 2 matrix products (MatMul, Gemm, Conv, ConvTranspose) " \
        "in float16, the rest in float32" in proc.stdout
    written = onnx.load(tmp_path / "gh.onnx")
    onnx.checker.check_model(written, full_check=True)
    got = Executor(written).run(dict(DIGITS_BATCH))
    assert got["loss"].dtype == np.float32 and got["fc1.weight_grad"].dtype == np.float32


def test_grad_bf16_of_a_convolution_below_opset_22_is_a_valid_graph(tmp_path):
    """Conv takes bfloat16 from opset 22: below it, `grad --precision bf16` wrote a Conv on
    bfloat16 that onnx's checker refuses. Its operands and result are now float32 tensors of
    bfloat16 values, and the executor gives the loss and gradients of the bfloat16 Conv."""
    from trainer.autocast import autocast
    from trainer.executor import Executor

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["c"], ["logits"], axes=[2, 3], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")])
    m17 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m17, str(tmp_path / "conv.onnx"))
    out = tmp_path / "train.onnx"
    proc = run("grad", str(tmp_path / "conv.onnx"), "--output", "logits", "--precision", "bf16",
               "--batch-size", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    feeds = {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32),
             "label": np.array([1, 3])}
    got = Executor(written).run(dict(feeds))
    # the same model at opset 22, where the Conv itself takes bfloat16
    m22, cast, _ = autocast(onnx.version_converter.convert_version(m17, 22), "bf16")
    assert cast == 1
    from trainer.autodiff import build_training_graph
    want = Executor(build_training_graph(m22, {"type": "cross_entropy", "output": "logits",
                                               "target": "label"}, "all", batch_size=2)
                    ).run(dict(feeds))
    for k in ("loss", "W_grad"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_grad_options_of_the_loss_and_its_notes(tmp_path):
    """grad takes --logits (bce on an output of logits: BCEWithLogits) and --ignore-index,
    refuses --shape dimensions below 1 in one line (a traceback before), and says when the
    graph holds ai.onnx_trainer ops, which onnxruntime cannot run."""
    out = tmp_path / "g.onnx"
    base = ["grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "--batch-size",
            "2", "-o", str(out)]
    proc = run(*base, "--loss", "bce", "--target", "t")
    assert proc.returncode == 0 and "note: it holds ai.onnx_trainer ops (BinaryCrossEntropy, " \
        "BinaryCrossEntropyGrad): onnx-trainer's executor runs them, onnxruntime does not" \
        in proc.stdout, proc.stdout + proc.stderr
    proc = run(*base, "--loss", "bce", "--target", "t", "--logits")
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert proc.returncode == 0 and "note:" not in proc.stdout
    assert "Softplus" in ops and "BinaryCrossEntropy" not in ops
    proc = run(*base, "--ignore-index", "255")
    sce = next(n for n in onnx.load(out).graph.node if n.op_type == "SoftmaxCrossEntropyLoss")
    assert proc.returncode == 0 and [a.i for a in sce.attribute if a.name == "ignore_index"] \
        == [255]
    for bad in ("x=-3,64", "x=0,64"):
        assert "integers of at least 1" in one_line_error(run(*base, "--shape", bad))


def test_small_command_line_notes(tmp_path, digits_config):
    """`grad --target` naming a tensor of the model says which input the target became (it was
    renamed silently); `check MODEL --world N` says --world is for configs (ignored silently);
    `eval --model` with a model the data does not fit names data.eval, the set it evaluates
    (it named data.train)."""
    proc = run("grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "--target",
               "x", "--batch-size", "2", "-o", str(tmp_path / "g.onnx"))
    assert proc.returncode == 0 and "note: the model already has a tensor named 'x', so the " \
        "loss target is an input of another name (x_2)" in proc.stdout, proc.stdout
    proc = run("check", str(EXAMPLES / "digits_mlp.onnx"), "--world", "2", "--set",
               "steps=3")
    assert "note: --world 2 applies to check CONFIG" in proc.stdout
    assert "note: --set applies to check CONFIG (it overrides a config's keys); a model alone " \
        "has none: steps=3 ignored" in proc.stdout, proc.stdout
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(np.zeros((32, 10), np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m32.onnx"))
    cfg = write_cfg(tmp_path, digits_config())
    line = one_line_error(run("eval", cfg, "--model", str(tmp_path / "m32.onnx")))
    assert "data.eval: array for 'x' has per-sample shape [64]" in line, line


def test_grad_with_the_ctc_loss(tmp_path):
    """`grad --loss ctc --time-axis 0`: a time-major recognizer's training graph, with the
    ai.onnx_trainer CTCLoss and its gradient; our executor runs it on labels."""
    from tests.test_grad_ctc import _recognizer
    from trainer.executor import Executor

    _recognizer(tmp_path / "m.onnx", np.ones((8, 5), np.float32), np.zeros(5, np.float32))
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.node.append(helper.make_node("Transpose", ["probs"], ["tm"], perm=[1, 0, 2]))
    m.graph.output.append(helper.make_tensor_value_info("tm", TensorProto.FLOAT, [10, "N", 5]))
    onnx.save(m, str(tmp_path / "m.onnx"))
    out = tmp_path / "g.onnx"
    proc = run("grad", str(tmp_path / "m.onnx"), "--loss", "ctc", "--output", "tm", "--target",
               "t", "--time-axis", "0", "--batch-size", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    assert {n.op_type for n in model.graph.node if n.domain} == {"CTCLoss", "CTCLossGrad"}
    got = Executor(model).run({"x": np.random.rand(2, 10, 8).astype(np.float32),
                               "t": np.array([[1, 2], [3, -1]], np.int64)})
    assert np.isfinite(got["loss"]) and np.abs(got["W_grad"]).sum() > 0
    # with --lengths: each sample's count of valid steps is an input of the loss
    proc = run("grad", str(tmp_path / "m.onnx"), "--loss", "ctc", "--output", "tm", "--target",
               "t", "--time-axis", "0", "--lengths", "n", "--batch-size", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    ctc = next(n for n in model.graph.node if n.op_type == "CTCLoss")
    assert list(ctc.input)[1:] == ["t", "n"]
    got = Executor(model).run(
        {"x": np.random.rand(2, 10, 8).astype(np.float32),
         "t": np.array([[1, 2], [3, -1]], np.int64), "n": np.array([10, 4], np.int64)})
    assert np.isfinite(got["loss"]) and np.abs(got["W_grad"]).sum() > 0


def test_eval_command(tmp_path, digits_config):
    cfg = write_cfg(tmp_path, digits_config(steps=30))
    assert run("train", cfg).returncode == 0
    proc = run("eval", cfg, "--model", str(tmp_path / "out" / "model.onnx"))
    assert proc.returncode == 0, proc.stderr
    acc = float(proc.stdout.split("eval_accuracy")[1].split()[0])
    assert acc > 0.5
    # --model evaluates that file as it is, whatever the config trains: a config freezing fc1
    # (whose tensors eval once took from the config's untrained model) gives onnxruntime's
    # accuracy of the trained file
    import onnxruntime as ort

    data = np.load(EXAMPLES / "digits.npz")
    logits = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(
        ["logits"], {"x": data["x_test"]})[0]
    want = float((logits.argmax(1) == data["y_test"]).mean())
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    cfg = write_cfg(frozen, digits_config(frozen=["fc1.*"], output=str(frozen / "o.onnx")))
    proc = run("eval", cfg, "--model", str(tmp_path / "out" / "model.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("eval_accuracy")[1].split()[0]) == pytest.approx(want,
                                                                                    abs=1e-4)
    assert not (frozen / "o.onnx").exists()
    # eval reads data.eval only: a training set that is missing is no error (it was; found
    # by a data sweep)
    gone = digits_config(output=str(frozen / "o.onnx"))
    gone["data"]["train"]["path"] = str(tmp_path / "no-such.npz")
    proc = run("eval", write_cfg(frozen, gone), "--model", str(tmp_path / "out" / "model.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("eval_accuracy")[1].split()[0]) == pytest.approx(want,
                                                                                    abs=1e-4)


def test_export_and_eval_read_a_checkpoint(tmp_path, digits_config):
    """A checkpoint's model could be had only by resuming a run to its end: `export` writes
    the config's model with a checkpoint's values (the newest: the run's own export, byte for
    byte), `eval --checkpoint` evaluates them, and a checkpoint folder given as a model, or
    a resume that trains another set of tensors, says so."""
    ck = tmp_path / "ck"
    cfg = write_cfg(tmp_path, digits_config(steps=30, checkpoint={
        "dir": str(ck), "every_steps": 10, "keep": 3}, log={"every_steps": 10}))
    assert run("train", cfg).returncode == 0
    proc = run("export", cfg, "-o", str(tmp_path / "last.onnx"))
    assert proc.returncode == 0 and "(step 30)" in proc.stdout, proc.stderr
    assert (tmp_path / "last.onnx").read_bytes() == \
        (tmp_path / "out" / "model.onnx").read_bytes()
    proc = run("export", cfg, "--checkpoint", str(ck / "step_00000010"), "-o",
               str(tmp_path / "s10.onnx"))
    assert proc.returncode == 0, proc.stderr
    s10 = onnx.load(tmp_path / "s10.onnx")
    assert {p.key: p.value for p in s10.metadata_props}["onnx_trainer.steps"] == "10"
    # (the metadata names the optimizer that trained the checkpoint, not the config's now)
    proc = run("export", cfg, "--checkpoint", str(ck / "step_00000010"), "-o",
               str(tmp_path / "s10b.onnx"), "--set", "optimizer.type=adamw", "--set",
               "optimizer.momentum=null")
    assert proc.returncode == 0, proc.stderr
    props = {p.key: p.value for p in onnx.load(tmp_path / "s10b.onnx").metadata_props}
    assert props["onnx_trainer.optimizer"] == "sgd" and \
        props["onnx_trainer.loss"] == "cross_entropy"
    by_file = run("eval", cfg, "--model", str(tmp_path / "s10.onnx"), "--json")
    by_checkpoint = run("eval", cfg, "--checkpoint", str(ck / "step_00000010"), "--json")
    assert by_file.returncode == 0 and by_checkpoint.returncode == 0, by_checkpoint.stderr
    assert json.loads(by_file.stdout) == json.loads(by_checkpoint.stdout)
    assert json.loads(by_file.stdout) != json.loads(run("eval", cfg, "--checkpoint",
                                                        "--json").stdout)
    # -o never overwrites what the export reads: a checkpoint's file, the config, a dataset
    manifest = ck / "step_00000010" / "manifest.json"
    before = manifest.read_bytes()
    for target, role in ((manifest, "is a file of checkpoint"), (cfg, "is the config file"),
                         (EXAMPLES / "digits.npz", "is a file of data.")):
        assert role in one_line_error(run("export", cfg, "-o", str(target)))
    assert manifest.read_bytes() == before
    # (a dataset moved away: export needs its samples' shapes, and says so)
    line = one_line_error(run("export", cfg, "-o", str(tmp_path / "x.onnx"), "--set",
                              f"data.eval.path={tmp_path / 'gone.npz'}"))
    assert "dataset file not found" in line and "export reads the samples' shapes of " \
        "data.eval" in line, line
    assert "it is a checkpoint folder: `onnx-trainer eval CONFIG --checkpoint" in \
        one_line_error(run("eval", cfg, "--model", str(ck / "step_00000010")))
    assert "it is a NumPy archive or array" in one_line_error(
        run("eval", cfg, "--model", str(ck / "step_00000010" / "arrays.npz")))
    line = one_line_error(run("train", cfg, "--resume", "--set", "steps=40", "--set",
                              'frozen=["fc1.*"]'))
    assert "trains another set of tensors than this config: only the checkpoint trains " \
        "fc1.bias, fc1.weight ('trainable' or 'frozen' changed" in line and \
        "onnx-trainer export CONFIG --checkpoint" in line, line


def test_eval_command_takes_a_fixed_batch_model_whatever_the_training_batches(tmp_path):
    """A model whose batch dimension is fixed at 8, a training set whose last batch is
    partial (drop_last false): train refuses it, but eval trains nothing and scores the eval
    set (it refused it for the training batches' sizes). The model bakes its batch into a
    Reshape, as a fixed-batch CNN export's flatten does: eval and export built the graph that
    lays out the parameters at data.batch_size, which failed there (export too)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["flat"]),
                           helper.make_node("MatMul", ["flat", "W"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 3])],
                          [numpy_helper.from_array(w, "W"),
                           numpy_helper.from_array(np.array([8, 4], np.int64), "shape")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((43, 4)).astype(np.float32),
             y=rng.integers(0, 3, 43), xe=rng.standard_normal((16, 4)).astype(np.float32),
             ye=rng.integers(0, 3, 16))
    raw = {"model": "m.onnx", "device": "cpu", "steps": 2,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "xe"},
                             "targets": {"label": "ye"}},
                    "batch_size": 8, "drop_last": False},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    cfg = write_cfg(tmp_path, raw)
    assert "fixed batch dimension of 8" in one_line_error(run("train", cfg))
    proc = run("eval", cfg, "--json")  # (--json: the metrics at full precision)
    assert proc.returncode == 0, proc.stderr
    logits = np.load(tmp_path / "d.npz")["xe"] @ w
    want = float((logits.argmax(1) == np.load(tmp_path / "d.npz")["ye"]).mean())
    assert json.loads(proc.stdout)["eval_accuracy"] == want
    # ... at any data.batch_size: its chunks are the model's batch (a batch of 32 was refused,
    # the hint naming drop_last, which eval does not use)
    for bs in ("32", "3"):
        proc = run("eval", cfg, "--json", "--set", f"data.batch_size={bs}")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["eval_accuracy"] == want


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['echo hi']"])
def test_yaml_tags_are_refused(tmp_path, tag):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: {tag}\n")
    line = one_line_error(run("train", str(path)))
    assert "cfg.yaml" in line


def test_check_names_the_opsets_of_a_model_without_an_ai_onnx_one(tmp_path):
    """A model importing ai.onnx.ml only (onnxmltools' logistic regression, say): `check`
    names that import rather than "opset 0"."""
    g = helper.make_graph([helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml",
                                            offset=[0.0, 1.0], scale=[2.0, 3.0])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "m.onnx"))
    proc = run("check", str(tmp_path / "m.onnx"))
    assert "1 nodes, no ai.onnx opset (ai.onnx.ml 1)" in proc.stdout, proc.stdout + proc.stderr
    assert "opset 0" not in proc.stdout


def test_grad_with_the_bce_loss(tmp_path):
    """`grad --loss bce` on a model ending in Sigmoid: the loss is taken on its logits
    (Softplus), and our executor runs the graph."""
    from tests.test_losses import _sigmoid_model
    from trainer.executor import Executor

    _sigmoid_model(tmp_path / "m.onnx", np.ones((4, 3), np.float32), np.zeros(3, np.float32),
                   False)
    out = tmp_path / "g.onnx"
    proc = run("grad", str(tmp_path / "m.onnx"), "--loss", "bce", "--output", "probs",
               "--target", "t", "--batch-size", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    assert "Softplus" in {n.op_type for n in model.graph.node}
    got = Executor(model).run({"x": np.ones((2, 4), np.float32),
                               "t": np.array([[1, 0, 1], [0, 0, 1]], np.float32)})
    assert np.isfinite(got["loss"]) and np.abs(got["W_grad"]).sum() > 0


def test_check_counts_an_unsupported_node_once(tmp_path, digits_config):
    """A node with neither a forward kernel nor a gradient rule is one unsupported node (the
    pre-flight said 2: each problem counted apart), and both problems are listed."""
    g = helper.make_graph([helper.make_node("Warp", ["x", "w"], ["logits"], domain="com.x")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["N", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                         ["N", 10])],
                          [onnx.numpy_helper.from_array(np.ones((64, 10), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                  helper.make_opsetid("com.x", 1)]),
              str(tmp_path / "m.onnx"))
    proc = run("check", write_cfg(tmp_path, digits_config(model=str(tmp_path / "m.onnx"))))
    assert proc.returncode == 1
    assert "1 node(s) unsupported" in proc.stdout, proc.stdout
    assert "no forward kernel: Warp" in proc.stdout and "no gradient rule: Warp" in proc.stdout


@pytest.mark.parametrize("args", [["ops"], ["check", str(EXAMPLES / "digits_mlp.onnx")]],
                         ids=["long", "short"])
def test_output_into_a_closed_pipe_is_not_an_internal_error(args):
    """`onnx-trainer ops | head -1`: the reader has closed the pipe (here before the first
    write); no traceback, no 'internal error', exit 141 (128 + SIGPIPE), for an output longer
    than the buffer and for one written at exit."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "trainer", *args], stdout=w,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert proc.returncode == 141 and "internal error" not in err and "Traceback" not in err, err


def test_a_full_disk_under_the_terminal_output_is_one_line():
    """stdout redirected to a full disk: one error line, not an internal error."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "trainer", "ops"], stdout=full,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "onnx-trainer: error: cannot write the terminal output: No space left on device"]


def _logged_digits_run(tmp_path, steps: int) -> Path:
    """A config of the digits MLP logging every step, checkpointing to tmp_path/ck and
    exporting to tmp_path/out.onnx."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(EXAMPLES / "digits_mlp.onnx"), "output": str(tmp_path / "out.onnx"),
        "device": "cpu", "steps": steps, "log": {"every_steps": 1},
        "checkpoint": {"dir": str(tmp_path / "ck")},
        "data": {"train": {"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_train"},
                           "targets": {"label": "y_train"}}, "batch_size": 32},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}))
    return cfg


def test_train_onto_a_full_terminal_output_goes_on_and_exports(tmp_path):
    """`train c.yaml > log` with the log's disk full ended the run at the next line it
    printed, without its export or last checkpoint; training goes on without the output."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    cfg = _logged_digits_run(tmp_path, steps=4)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "trainer", "train", str(cfg)], stdout=full,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "onnx-trainer: warning: cannot write the terminal output (No space left on device); "
        "training goes on without it"]
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
    assert (tmp_path / "ck" / "step_00000004").is_dir()


@pytest.mark.parametrize("closed", ["pipe", "stdout"])
def test_train_whose_output_reader_goes_away_goes_on_and_exports(tmp_path, closed):
    """`train c.yaml | head -1`: the run ended at its next line with exit 141, silently, with
    neither its export nor its checkpoints; started with stdout closed (`>&-`), it exported
    and then failed as an internal error. Training goes on without the output."""
    import os

    cfg = _logged_digits_run(tmp_path, steps=6)
    cmd = [sys.executable, "-m", "trainer", "train", str(cfg)]
    if closed == "pipe":
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        proc.stdout.readline()
        proc.stdout.close()  # (as `head -1` does after its line)
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=300)
        assert code == 0 and err.strip().splitlines() == [
            "onnx-trainer: warning: cannot write the terminal output (Broken pipe); training "
            "goes on without it"], err
    else:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=300, preexec_fn=lambda: os.close(1))
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
    assert (tmp_path / "ck" / "step_00000006").is_dir()


def test_grad_trains_a_tied_output_projection_as_its_embedding(tmp_path):
    """A TorchScript export folds a tied output projection (`head.weight = emb.weight`) into a
    second initializer, the embedding's transpose. `train` ties it back; `grad` does too, so
    the embedding's gradient in the written graph holds both uses (PyTorch's), and the copy is
    no parameter of its own."""
    torch = pytest.importorskip("torch")

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.mid = torch.nn.Linear(6, 6)

        def forward(self, tok):
            h = torch.tanh(self.mid(self.emb(tok)))
            return h @ self.emb.weight.t()

    torch.manual_seed(0)
    net = Tied()
    tok = torch.tensor([[1, 4, 7], [2, 9, 0]])
    torch.onnx.export(net, (tok,), str(tmp_path / "m.onnx"), input_names=["tok"],
                      output_names=["logits"], dynamo=False, opset_version=17)
    out = tmp_path / "train.onnx"
    r = subprocess.run([sys.executable, "-m", "trainer", "grad", str(tmp_path / "m.onnx"),
                        "--output", "logits", "--loss", "cross_entropy", "--class-axis", "2",
                        "--batch-size", "2", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "'emb.weight': trained as one tensor" in r.stdout
    label = np.array([[3, 0, 5], [10, 1, 2]])
    model = onnx.load(out)
    grads = [o.name for o in model.graph.output if o.name.endswith("_grad")]
    # (mid's weight is stored as its transpose, a parameter of its own name; the embedding's
    # transpose is no parameter)
    assert len(grads) == 3 and {"emb.weight_grad", "mid.bias_grad"} <= set(grads)
    got = dict(zip(grads, ort.InferenceSession(str(out)).run(
        grads, {"tok": tok.numpy(), "label": label}), strict=True))
    logits = net(tok)
    torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), torch.tensor(label)).backward()
    np.testing.assert_allclose(got["emb.weight_grad"], net.emb.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-7)


def _eval_json(tmp_path, w: np.ndarray, x: np.ndarray, y: np.ndarray, constant: bool = False):
    """`eval --json` of logits = x @ W (W an initializer, or a Constant node) for labels y,
    cross entropy; the finished process."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"])]
    inits = [numpy_helper.from_array(w, "W")]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=inits.pop()))
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d", x=x, y=y)
    raw = {"model": "m.onnx", "device": "cpu", "steps": 1,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    proc = run("eval", write_cfg(tmp_path, raw), "--json")
    assert proc.returncode == 0, proc.stderr
    return proc


def test_eval_json_stdout_is_one_json_object_when_the_run_has_notes(tmp_path):
    """The run's notes (here: a weight stored as a Constant node, made an initializer) went
    to stdout before the JSON object, so `eval --json | jq` failed; they go to stderr."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    rng = np.random.default_rng(1)
    proc = _eval_json(tmp_path, w, rng.standard_normal((16, 4)).astype(np.float32),
                      rng.integers(0, 3, 16), constant=True)
    assert "Constant nodes" in proc.stderr
    logits = np.load(tmp_path / "d.npz")["x"] @ w
    assert json.loads(proc.stdout)["eval_accuracy"] == \
        float((logits.argmax(1) == np.load(tmp_path / "d.npz")["y"]).mean())


def test_check_reads_a_config_of_any_name_with_a_long_header(tmp_path):
    """`check FILE` tells a config from a model by its content: one without a .yaml suffix
    whose `model:` came after 512 bytes of comments was read as an ONNX model."""
    text = "".join(f"# comment line {i}: {'x' * 40}\n" for i in range(20)) + yaml.safe_dump({
        "model": str(EXAMPLES / "digits_mlp.onnx"), "steps": 1,
        "data": {"train": {"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_train"},
                           "targets": {"label": "y_train"}}},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}})
    (tmp_path / "run.cfg").write_text(text)
    proc = run("check", str(tmp_path / "run.cfg"))
    assert proc.returncode == 0, proc.stderr
    assert "pre-flight" in proc.stdout.lower() or "memory per process" in proc.stdout


def test_every_command_runs_without_numba(tmp_path):
    """numba is optional (the `fast` extra), and README command (a) installs without it: the
    kernel package imported its compiled loops with the rest, so every command failed with
    ModuleNotFoundError. Without numba (made unimportable here), `ops` and the demo's training
    run, and the pre-flight says the compiled kernels are off."""
    script = ("import sys; sys.modules['numba'] = None\n"
              "from trainer.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    cfg = ROOT / "configs" / "digits_mlp.yaml"
    for args in (["ops"], ["train", str(cfg), "--set", f"output={tmp_path / 'o.onnx'}",
                           "--set", "epochs=null", "--set", "steps=5"]):
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled host kernels: off (numba not installed" in proc.stdout + proc.stderr
    assert (tmp_path / "o.onnx").exists()


def test_grad_errors_name_its_flags_not_config_keys(tmp_path):
    """`grad` has no config: its advice names --logits, --class-axis, --frozen-batchnorm."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Sigmoid", ["h"], ["p"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.ones((4, 1), np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    proc = run("grad", str(tmp_path / "m.onnx"), "--output", "p", "--loss", "bce", "--logits",
               "-o", str(tmp_path / "t.onnx"))
    line = one_line_error(proc)
    assert "loss bce with --logits" in line and "leave --logits out" in line
    assert "logits: true" not in line


def test_eval_json_writes_a_non_finite_metric_as_null(tmp_path):
    """`eval --json` printed Infinity or NaN, which JSON has not (jq refuses them); null, as
    log.metrics writes them."""
    w = np.full((4, 3), 3e38, np.float32)
    w[:, 1] = -3e38
    proc = _eval_json(tmp_path, w, np.ones((8, 4), np.float32), np.ones(8, np.int64))

    def refuse(name):
        raise AssertionError(f"{name} in {proc.stdout!r}")
    assert json.loads(proc.stdout, parse_constant=refuse)["eval_loss"] is None


def test_an_io_error_that_names_no_file_is_not_called_a_terminal_write(tmp_path, digits_config,
                                                                       monkeypatch, capsys):
    """EIO from a network file system's read of a dataset names no file: it was reported as
    "cannot write the terminal output"."""
    import errno

    import trainer.train as train_mod
    from trainer.cli import main

    def failing(self, *a, **k):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(train_mod.Trainer, "fit", failing)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(digits_config(steps=1)))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "input/output error (EIO)" in err and "cannot write the terminal" not in err, err
