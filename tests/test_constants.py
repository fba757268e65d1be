"""data.constants: graph inputs fed the same value at every step instead of from the dataset (a
sample rate, a recurrent model's initial state with its batch axis second), as silero-vad's
exported models need: integer ones become initializers of the training graph (control flow on
them lowered to the branch taken), float ones are fed with each batch; evaluation and export see
the model's own inputs."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import strictxp as sx
from trainer.config import ConfigError, config_from_dict
from trainer.errors import TrainerError
from trainer.train import Trainer

F = TensorProto.FLOAT
RNG = np.random.default_rng(5)
W = RNG.standard_normal((4, 3)).astype(np.float32)


def _model(path) -> None:
    """y = If(sr == 16000, x @ W, Reshape(x, [-1, 5]) @ V) + ReduceSum(state, axis 0), state
    [2, N, 3] (the branch not taken fails if it is ever run at a batch of 8)."""
    def branch(name, w):
        nodes = [helper.make_node("MatMul", ["x", w], [f"{name}_y"])]
        if w == "V":
            nodes = [helper.make_node("Reshape", ["x", "five"], ["x5"]),
                     helper.make_node("MatMul", ["x5", w], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [
            helper.make_tensor_value_info(f"{name}_y", F, ["N", 3])])
    nodes = [helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(
                 np.array(16000, np.int64), "rate")),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["xw"], then_branch=branch("then", "W"),
                              else_branch=branch("other", "V")),
             helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0),
             helper.make_node("Add", ["xw", "s"], ["y"])]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", F, ["N", 4]),
         helper.make_tensor_value_info("state", F, [2, "N", 3]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", F, ["N", 3])],
        [numpy_helper.from_array(W, "W"),
         numpy_helper.from_array(RNG.standard_normal((5, 3)).astype(np.float32), "V"),
         numpy_helper.from_array(np.array([0], np.int64), "axis0"),
         numpy_helper.from_array(np.array([-1, 5], np.int64), "five")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _reference(path, shift: float) -> None:
    """What the model computes with sr 16000 and a state filled with shift / 2: x @ W + shift."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "shift"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F, ["N", 4])],
        [helper.make_tensor_value_info("y", F, ["N", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.float32([shift]), "shift")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.fixture
def job(tmp_path):
    _model(tmp_path / "m.onnx")
    _reference(tmp_path / "ref.onnx", 1.0)
    x = RNG.standard_normal((48, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, t=RNG.standard_normal((48, 3)).astype(np.float32))

    def make(model="m.onnx", constants=None, **over):
        raw = {"model": model, "output": str(tmp_path / f"out_{model}"), "device": "cpu",
               "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                  "targets": {"t": "t"}},
                        "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "t"}},
                        "batch_size": 8, "shuffle": False},
               "loss": {"type": "mse", "output": "y", "target": "t"},
               "optimizer": {"type": "adamw", "lr": 0.01}, "steps": 6,
               "log": {"every_steps": 1}, **over}
        if constants is not None:
            raw["data"]["constants"] = constants
        return config_from_dict(raw, tmp_path)
    return make


CONSTANTS = {"sr": 16000, "state": {"shape": [2, "batch", 3], "fill": 0.5}}


def _run(cfg):
    stream = io.StringIO()
    t = Trainer(cfg, stream=stream)
    result = t.fit()
    return t, [r["loss"] for r in t.history if "loss" in r], result, stream.getvalue()


def test_constant_inputs_train_as_the_model_they_make(job, tmp_path):
    """The model with sr and state given as constants trains exactly as the model they make
    (x @ W + 1): same losses, weights and evaluation; the If's other branch is never run; the
    pre-flight names them; the export keeps the model's inputs and onnxruntime runs it."""
    t, losses, result, log = _run(job(constants=CONSTANTS))
    rt, ref_losses, ref_result, _ = _run(job(model="ref.onnx"))
    assert "data.constants: sr [] int64, state [2, 8, 3] float32" in log
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(t.trained_values()["W"], rt.trained_values()["W"], rtol=1e-6)
    assert result["eval_loss"] == pytest.approx(ref_result["eval_loss"], rel=1e-6)
    out = onnx.load(result["output"])
    assert [vi.name for vi in out.graph.input] == ["x", "state", "sr"]
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    got = ort.InferenceSession(result["output"], providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "state": np.full((2, 5, 3), 0.5, np.float32),
               "sr": np.array(16000, np.int64)})[0]
    np.testing.assert_allclose(got, x @ t.trained_values()["W"] + 1.0, rtol=1e-5, atol=1e-6)


def test_constant_inputs_on_the_gpu_path(job, monkeypatch):
    """Through the CuPy stand-in: the constants go to the device once per batch size, and the
    run is the CPU run."""
    cpu = _run(job(constants=CONSTANTS))
    sx.install(monkeypatch)
    gpu = _run(job(constants=CONSTANTS, device="gpu"))
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-5)
    np.testing.assert_allclose(gpu[0].trained_values()["W"], cpu[0].trained_values()["W"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("constants,message", [
    ({"rate": 1}, "config key 'data.constants.rate': 'rate' is not an input of the model "
                  "(its inputs: x, state, sr)"),
    ({"x": 1, **CONSTANTS}, "data.train.inputs maps 'x', which data.constants also sets: "
                            "keep one of them"),
    ({"sr": 16000.5, "state": CONSTANTS["state"]}, "config key 'data.constants.sr': input "
                                                   "'sr' holds int64 values"),
    ({"sr": 16000, "state": {"shape": [2, "batch"]}}, "config key 'data.constants.state': "
                                                      "input 'state' has shape [2, ?, 3], the "
                                                      "value has shape [2, 8]"),
    ({"sr": 16000}, "the model needs input 'state' but the data config maps only x"),
    # (an axis the model names as the fed input's batch axis, given another size: the model's
    # failure, an Add of (8, 3) and (5, 3), named no key; a hint, not a check: a size 1
    # broadcasts, and converters name unrelated axes alike)
    ({"sr": 16000, "state": {"shape": [2, 5, 3], "fill": 0.5}},
     "; config key 'data.constants.state': axis 1 of input 'state' is 'N', as the batch axis "
     "of input 'x' (8 samples per process), and the value's is 5: if it is the batch, write "
     "`batch` there ({shape: [2, batch, 3], fill: ...})"),
])
def test_bad_constants_are_named_before_training(job, constants, message):
    with pytest.raises(TrainerError) as err:
        Trainer(job(constants=constants), stream=io.StringIO())
    assert message in str(err.value)


def test_a_constant_of_size_1_on_a_batch_named_axis_broadcasts(job):
    """A state of one row on the axis the model names as the batch's broadcasts over the batch
    (position ids [[0, 1, 2, 3]] on a [batch, 4] input): it trains (a check refused it)."""
    t, losses, _, _ = _run(job(constants={"sr": 16000, "state": {"shape": [2, 1, 3],
                                                                  "fill": 0.5}}))
    assert len(losses) == 6 and np.isfinite(losses).all()


def test_an_input_both_mapped_and_constant_is_one_problem(job):
    """Found by the data check and by the constants' check: listed once (data.eval maps it
    too: the second problem)."""
    with pytest.raises(TrainerError) as err:
        Trainer(job(constants={"x": 1, **CONSTANTS}), stream=io.StringIO())
    assert str(err.value).startswith("2 problems found")
    assert str(err.value).count("data.train.inputs maps 'x'") == 1


def test_an_input_left_out_of_constants_is_one_problem(job):
    """'state' [2, N, 3] left out of data.constants: that alone, not also a "fixed batch
    dimension of 2" of an input no batch feeds."""
    with pytest.raises(TrainerError) as err:
        Trainer(job(constants={"sr": 16000}), stream=io.StringIO())
    assert "needs input 'state'" in str(err.value) and "fixed batch" not in str(err.value)


def test_the_constants_key_is_checked_when_the_config_is_read(job):
    with pytest.raises(ConfigError, match=r"data.constants.state.shape' must be a list of "
                                          r"sizes \(integers >= 0, or 'batch'"):
        job(constants={"state": {"shape": [2, "N", 3]}})


def test_a_merged_decoders_aliases_inside_its_branches_train_as_their_own_tensors(tmp_path):
    """optimum's merged decoders store equal tensors once and alias them inside both branches
    of their If (`Identity(shared) -> decoder.final_layer_norm.weight`): such an alias becomes
    an initializer of the main graph (the branches read it from outside) and trains as its own
    tensor, as the unmerged model's; it failed with an internal KeyError on a lowered name."""
    def branch(name, extra):
        nodes = [helper.make_node("Identity", ["shared"], ["final.w"]),
                 helper.make_node("Mul", ["h", "final.w"], [f"{name}_m"])]
        if extra:
            nodes.append(helper.make_node("Add", [f"{name}_m", "h"], [f"{name}_y"]))
        else:
            nodes.append(helper.make_node("Identity", [f"{name}_m"], [f"{name}_y"]))
        return helper.make_graph(nodes, name, [], [
            helper.make_tensor_value_info(f"{name}_y", F, ["N", 4])])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Mul", ["xw", "shared"], ["h"]),
         helper.make_node("If", ["use_cache"], ["y"], then_branch=branch("then", False),
                          else_branch=branch("else", True))], "merged",
        [helper.make_tensor_value_info("x", F, ["N", 4]),
         helper.make_tensor_value_info("use_cache", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("y", F, ["N", 4])],
        [numpy_helper.from_array(RNG.standard_normal((4, 4)).astype(np.float32), "W"),
         numpy_helper.from_array(np.ones(4, np.float32), "shared")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    x, y = RNG.standard_normal((16, 4)).astype(np.float32), RNG.standard_normal((16, 4))
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.float32))
    raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 4,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"t": "y"}},
                    "batch_size": 8, "constants": {"use_cache": [False]}},
           "loss": {"type": "mse", "output": "y", "target": "t"},
           "optimizer": {"type": "adam", "lr": 0.05}}
    log = io.StringIO()
    t = Trainer(config_from_dict(raw, tmp_path), stream=log)
    t.fit()
    assert "get their own tensor again: final.w" in log.getvalue()
    got = t.trained_values()
    assert not np.allclose(got["final.w"], 1) and not np.allclose(got["shared"], 1)
    assert not np.allclose(got["final.w"], got["shared"])  # (two tensors, trained apart)
    session = ort.InferenceSession(str(tmp_path / "out.onnx"),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x, "use_cache": np.array([False])})[0]
    h = (x @ got["W"]) * got["shared"]
    want = h * got["final.w"] + h
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("given", ["shape", "literal"])
def test_an_integer_constant_with_a_batch_axis_is_baked_at_each_batch(tmp_path, given):
    """token_type_ids or an attention mask given in data.constants (integers [batch, T],
    baked into the training graph): the pre-flight's estimate ran its kernels at batches 2
    and 3 against the constant baked for the real batch, and failed ("operands could not be
    broadcast together"); it now measures at the real batch. Training gives the same as the
    same ids fed from the dataset."""
    rng = np.random.default_rng(1)
    g = helper.make_graph(
        [helper.make_node("Gather", ["E", "tt"], ["emb"]),  # [N, 3, 4]
         helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "emb"], ["y"])], "tt",
        [helper.make_tensor_value_info("x", F, ["N", 3, 4]),
         helper.make_tensor_value_info("tt", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", F, ["N", 3, 4])],
        [numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    x, y = (rng.standard_normal((16, 3, 4)).astype(np.float32) for _ in range(2))
    np.savez(tmp_path / "d.npz", x=x, y=y, tt=np.zeros((16, 3), np.int64))
    const = {"shape": ["batch", 3], "fill": 0} if given == "shape" else [[0, 0, 0]] * 4
    runs = []
    for constants in ({"tt": const}, None):
        inputs = {"x": "x"} if constants else {"x": "x", "tt": "tt"}
        raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 3,
               "data": {"train": {"path": "d.npz", "inputs": inputs, "targets": {"t": "y"}},
                        "batch_size": 4, **({"constants": constants} if constants else {})},
               "loss": {"type": "mse", "output": "y", "target": "t"},
               "optimizer": {"type": "sgd", "lr": 0.1}, "log": {"every_steps": 1}}
        cfg = config_from_dict(raw, tmp_path)
        from trainer import report
        assert not report.preflight(cfg).problems
        t = Trainer(cfg, stream=io.StringIO())
        t.fit()
        runs.append(([r["loss"] for r in t.history if "loss" in r], t.trained_values()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
    np.testing.assert_allclose(runs[0][1]["E"], runs[1][1]["E"], rtol=1e-6)


def test_a_lookup_onnxsim_folded_into_a_constant_node_is_warned_of():
    """onnxsim folds BERT's position-embedding lookup (the table's rows by the fixed
    position_ids) into a float Constant node named after the Gather it replaced: the table
    stopped training, silently (40 of PyTorch's 41 tensors). `check` names it; a Constant of
    the exporter's own (`/Constant_output_0`) is not named."""
    from trainer.report import model_report

    rows = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["/m/position_embeddings/Gather_output_0"],
                          value=numpy_helper.from_array(rows)),
         helper.make_node("Constant", [], ["/m/Constant_output_0"],
                          value=numpy_helper.from_array(rows)),
         helper.make_node("Add", ["x", "/m/position_embeddings/Gather_output_0"], ["h"]),
         helper.make_node("Add", ["h", "/m/Constant_output_0"], ["h2"]),
         helper.make_node("MatMul", ["h2", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])],
        [numpy_helper.from_array(np.ones((8, 3), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert not model_report(model).tool_constants  # (no onnxsim: the exporter's constants)
    helper.set_model_props(model, {"onnxsim.constant_folding": "True"})
    report = model_report(model)
    assert report.tool_constants == ["/m/position_embeddings/Gather_output_0 [1, 4, 8]"]
    assert "WARNING: float constants that onnxsim computed" in report.text()


@pytest.mark.parametrize("elem, value", [(TensorProto.UINT8, 256), (TensorProto.UINT8, -1),
                                         (TensorProto.INT32, 2**32), (TensorProto.BOOL, 2),
                                         (TensorProto.FLOAT16, 1e39),
                                         (TensorProto.FLOAT, 1e39)])
def test_a_constant_beyond_its_inputs_type_is_refused(elem, value):
    """data.constants were cast to the input's type unchecked: 256 for a uint8 flag was fed as
    0 (the If it selects took the other branch), 1e39 for a float32 input as inf; the same
    values in a dataset are refused. Named with the key, as a dataset's are."""
    from trainer.graph import constant_inputs

    g = helper.make_graph([helper.make_node("Identity", ["flag"], ["y"])], "g",
                          [helper.make_tensor_value_info("flag", elem, [])],
                          [helper.make_tensor_value_info("y", elem, [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    raw = {"model": "m.onnx", "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}},
                                       "constants": {"flag": value}},
           "loss": {"type": "output", "output": "y"}, "steps": 1}
    specs = config_from_dict(raw, ".").data.constants
    with pytest.raises(ConfigError, match=r"'data.constants.flag': its value holds .* beyond "
                                          r"the range of (uint8|int32|bool|float16|float32)"):
        constant_inputs(specs, model, 4)
    np.testing.assert_array_equal(constant_inputs(
        config_from_dict({**raw, "data": {**raw["data"], "constants": {"flag": 1}}},
                         ".").data.constants, model, 4)["flag"], 1)
    if elem == TensorProto.FLOAT16:  # (a float16 model is computed in float32: 70000 fits,
        # as a dataset's values for it do)
        constant_inputs(config_from_dict({**raw, "data": {**raw["data"],
                                                          "constants": {"flag": 70000.0}}},
                                         ".").data.constants, model, 4)
