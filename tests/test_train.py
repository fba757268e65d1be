"""End-to-end training on the bundled digits demo: accuracy, export, metrics, determinism."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT
from trainer.config import config_from_dict, load_config
from trainer.errors import ModelError, TrainerError
from trainer.train import Trainer


def test_demo_config_reaches_accuracy_and_exports(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "digits_mlp.yaml").read_text())
    raw["output"] = str(tmp_path / "model.onnx")
    raw["log"]["metrics"] = str(tmp_path / "metrics.jsonl")
    cfg = config_from_dict(raw, ROOT / "configs")
    out = io.StringIO()
    result = Trainer(cfg, stream=out).fit()
    assert result["eval_accuracy"] >= 0.93
    # The exported model predicts the test split with the same accuracy in onnxruntime.
    data = np.load(EXAMPLES / "digits.npz", allow_pickle=False)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"))
    logits = sess.run(None, {"x": data["x_test"]})[0]
    acc = float((logits.argmax(1) == data["y_test"]).mean())
    assert acc == pytest.approx(result["eval_accuracy"], abs=1e-9)
    # Same graph, names and signature as the input model.
    src, dst = onnx.load(cfg.model), onnx.load(tmp_path / "model.onnx")
    assert [n.SerializeToString() for n in src.graph.node] == \
        [n.SerializeToString() for n in dst.graph.node]
    assert src.graph.input == dst.graph.input and src.graph.output == dst.graph.output
    assert [(t.name, t.dims, t.data_type) for t in src.graph.initializer] == \
        [(t.name, t.dims, t.data_type) for t in dst.graph.initializer]
    assert src.opset_import == dst.opset_import
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["step"] == 660 and all(
        {"step", "epoch", "loss", "lr", "samples_per_s"} <= set(r) for r in train_rows)
    assert any("eval_accuracy" in r for r in rows)
    assert "step 660" in out.getvalue()


def test_engine_forward_matches_onnxruntime(tmp_path, digits_config):
    cfg = config_from_dict(digits_config(output=str(tmp_path / "m.onnx")), tmp_path)
    t = Trainer(cfg, stream=io.StringIO())
    t.fit()
    x = np.load(EXAMPLES / "digits.npz")["x_test"][:50]
    ours = t.predict({"x": x})["logits"]
    theirs = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_runs_are_deterministic(tmp_path, digits_config):
    a = Trainer(config_from_dict(digits_config(), tmp_path / "a"), stream=io.StringIO())
    b = Trainer(config_from_dict(digits_config(), tmp_path / "b"), stream=io.StringIO())
    a.fit()
    b.fit()
    for k, v in a.trained_values().items():
        np.testing.assert_array_equal(v, b.trained_values()[k])


def test_accumulate_equals_larger_batch(tmp_path, digits_config):
    base = digits_config(precision="fp64", data__shuffle=False, steps=5, optimizer={
        "type": "sgd", "lr": 0.1})
    big = Trainer(config_from_dict({**base, "data": {**base["data"], "batch_size": 64}},
                                   tmp_path / "a"), stream=io.StringIO())
    acc = Trainer(config_from_dict({**base, "accumulate": 2}, tmp_path / "b"),
                  stream=io.StringIO())
    big.fit()
    acc.fit()
    for k, v in big.trained_values().items():
        np.testing.assert_allclose(acc.trained_values()[k], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("accumulate,left", [(3, 2), (4, 0)])
def test_accumulate_that_leaves_batches_of_the_run_says_so(tmp_path, digits_config, accumulate,
                                                           left):
    """One epoch of 44 batches: accumulate 3 makes 14 steps and leaves 2 batches untrained,
    which the start-up says (it was silent); accumulate 4 leaves none."""
    raw = digits_config(epochs=1, accumulate=accumulate)
    del raw["steps"]
    out = io.StringIO()
    t = Trainer(config_from_dict(raw, tmp_path), stream=out)
    assert t.total_steps == 44 // accumulate
    t.fit()  # (said as training starts: a resume may lay the run out again)
    said = "the last 2 batch(es) of the run are not trained (14 steps)" in out.getvalue()
    assert said == bool(left), out.getvalue()


def test_trainable_and_frozen_select_parameters(tmp_path, digits_config):
    t = Trainer(config_from_dict(digits_config(frozen=["fc1.*"]), tmp_path),
                stream=io.StringIO())
    init = {k: v.copy() for k, v in t.trained_values().items()}
    assert sorted(t.names) == ["fc2.bias", "fc2.weight"]
    t.fit()
    out = onnx.load(tmp_path / "out" / "model.onnx")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    src = {i.name: onnx.numpy_helper.to_array(i)
           for i in onnx.load(EXAMPLES / "digits_mlp.onnx").graph.initializer}
    np.testing.assert_array_equal(weights["fc1.weight"], src["fc1.weight"])
    assert not np.array_equal(weights["fc2.weight"], init["fc2.weight"])


def _gemm_batchnorm_model() -> onnx.ModelProto:
    """x [N, 4] -> Gemm -> BatchNormalization (inference form) -> logits [N, 3]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = {"W": rng.standard_normal((3, 4)), "B": np.zeros(3), "scale": np.ones(3),
             "shift": np.zeros(3), "mean": np.zeros(3), "var": np.ones(3)}
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1),
             helper.make_node("BatchNormalization", ["h", "scale", "shift", "mean", "var"],
                              ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_trainable_globs_match_only_the_models_own_initializers(tmp_path):
    # The training rewrite of BatchNormalization adds constants of its own (the momentum, a
    # count); a glob such as '*' selects among the model's initializers only, as the check
    # lists them, and the job trains and exports the model's own tensors.
    from trainer.autodiff import build_training_graph, training_info

    model = _gemm_batchnorm_model()
    own = {t.name for t in model.graph.initializer}
    loss = {"type": "cross_entropy", "output": "logits", "target": "label"}
    info = training_info(build_training_graph(model, loss, ["*"], batch_size=8))
    assert set(info.gradients) == {"W", "B", "scale", "shift"}  # (statistics are state)
    # (one glob as a string: iterated, it was its characters, "entry 'W' matches no ...")
    one = training_info(build_training_graph(model, loss, "W", batch_size=8))
    assert set(one.gradients) == {"W"}
    rest = training_info(build_training_graph(model, loss, ["*"], frozen="s*", batch_size=8))
    assert set(rest.gradients) == {"W", "B"}
    onnx.save(model, str(tmp_path / "bn.onnx"))
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((16, 4)).astype(np.float32),
             y=rng.integers(0, 3, 16))
    t = Trainer(config_from_dict({
        "model": "bn.onnx", "output": "out.onnx", "trainable": ["*"],
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": 8},
        "loss": loss, "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 2}, tmp_path),
        stream=io.StringIO())
    t.fit()
    assert sorted(t.names) == ["B", "W", "scale", "shift"]
    assert {i.name for i in onnx.load(tmp_path / "out.onnx").graph.initializer} == own


def test_nan_loss_is_a_clear_error(tmp_path, digits_config):
    t = Trainer(config_from_dict(digits_config(optimizer={"type": "sgd", "lr": 1e30}),
                                 tmp_path), stream=io.StringIO())
    with pytest.raises(TrainerError, match="loss became"):
        t.fit()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_nan_stop_saves_the_state_before_the_failing_step(tmp_path, accumulate):
    """on_nan stop with checkpoint.dir: the run stops at the step whose loss is NaN (its third
    batch holds one) and saves the state before that step: the parameters, the BatchNorm
    running statistics (which that step's forward had moved: with accumulation, its first
    micro-batch's too) and the data position of its first batch, the same as a clean run's
    checkpoint after the steps before."""
    from trainer import checkpoint

    onnx.save(_gemm_batchnorm_model(), str(tmp_path / "bn.onnx"))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    bad = x.copy()
    bad[17, :] = 3e38  # (in the third batch of 8: its products overflow)
    np.savez(tmp_path / "good.npz", x=x, y=rng.integers(0, 3, 32))
    np.savez(tmp_path / "bad.npz", x=bad, y=np.load(tmp_path / "good.npz")["y"])

    def run(data: str, steps: int, folder: str) -> Trainer:
        return Trainer(config_from_dict({
            "model": "bn.onnx", "output": f"{folder}.onnx", "trainable": ["*"],
            "data": {"train": {"path": data, "inputs": {"x": "x"}, "targets": {"label": "y"}},
                     "batch_size": 8, "shuffle": False},
            "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9}, "steps": steps,
            "accumulate": accumulate,
            "checkpoint": {"dir": folder, "every_steps": 100}}, tmp_path),
            stream=io.StringIO())

    good = 2 // accumulate  # (the steps before the one that reads the third batch)
    with pytest.raises(TrainerError, match=f"loss became nan at step {good + 1}.*the state "
                                           f"before step {good + 1} is saved in checkpoint "
                                           ".*--resume"):
        run("bad.npz", 4 // accumulate, "bad").fit()
    run("good.npz", good, "good").fit()
    got, got_meta = checkpoint.load(checkpoint.latest(tmp_path / "bad"))
    want, want_meta = checkpoint.load(checkpoint.latest(tmp_path / "good"))
    assert got_meta["step"] == want_meta["step"] == good
    assert got_meta["position"] == want_meta["position"] == [0, 2]
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_skipped_nan_step_leaves_the_batchnorm_statistics_as_they_were(tmp_path, accumulate):
    """on_nan skip: the step whose loss is NaN is not applied, and neither are the BatchNorm
    running statistics its forward computed (they were written, NaN, and exported so, with
    exit code 0): the run ending on that step exports the parameters and statistics of the
    clean run that stopped before it."""
    onnx.save(_gemm_batchnorm_model(), str(tmp_path / "bn.onnx"))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    bad = x.copy()
    bad[17, :] = 3e38  # (in the third batch of 8: its products overflow)
    y = rng.integers(0, 3, 32)
    np.savez(tmp_path / "good.npz", x=x, y=y)
    np.savez(tmp_path / "bad.npz", x=bad, y=y)

    def run(data: str, steps: int, out: str) -> dict:
        t = Trainer(config_from_dict({
            "model": "bn.onnx", "output": out, "trainable": ["*"], "on_nan": "skip",
            "data": {"train": {"path": data, "inputs": {"x": "x"}, "targets": {"label": "y"}},
                     "batch_size": 8, "shuffle": False},
            "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9}, "steps": steps,
            "accumulate": accumulate}, tmp_path), stream=io.StringIO())
        t.fit()
        return t, {i.name: onnx.numpy_helper.to_array(i)
                   for i in onnx.load(tmp_path / out).graph.initializer}

    good = 2 // accumulate
    t, got = run("bad.npz", good + 1, "bad.onnx")
    assert t.skipped == 1
    _, want = run("good.npz", good, "good.onnx")
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("n,batch,why", [
    (17, 8, "data.drop_last: false keeps each epoch's last batch of 1 sample(s), a batch of 1"),
    (16, 1, "data.batch_size 1 over 1 process(es) gives each 1 sample a step")])
def test_batchnorm_on_one_sample_is_refused_before_training(tmp_path, n, batch, why):
    """A BatchNormalization over 1 value per channel (a batch of 1 sample without spatial
    axes) has variance 0: it outputs its bias and learns nothing, which PyTorch refuses. It
    trained silently; now the run refuses at the start, naming the node and why a batch of 1
    arises, before anything is written."""
    onnx.save(_gemm_batchnorm_model(), str(tmp_path / "bn.onnx"))
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((n, 4)).astype(np.float32),
             y=rng.integers(0, 3, n))
    raw = {"model": "bn.onnx", "output": "out.onnx",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "batch_size": batch, "drop_last": False},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.1}, "epochs": 1}
    with pytest.raises(ModelError, match="BatchNormalization .* trains on 1 value per channel "
                                         rf"\(input shape \[1, .*; here {re.escape(why)}"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    assert not (tmp_path / "out.onnx").exists()
    # with the last sample left out (drop_last: true) or the running statistics used, it trains
    raw["data"]["drop_last"] = True
    raw["batchnorm"] = "train" if batch > 1 else "eval"
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()


def test_the_batch_sizes_some_process_sees():
    from trainer.data import Batches

    x = {"x": np.zeros((21, 2), np.float32)}
    # 21 = 2 batches of 8 and 5 over 4 processes: shares of 2 and 1 (lo..hi of each)
    sizes = [Batches(x, 8, rank=r, world=4, drop_last=False).local_sizes() for r in range(4)]
    assert set().union(*sizes) == Batches(x, 8, world=4, drop_last=False).any_rank_sizes() \
        == {2, 1}
    assert "1 sample for some of the 4 processes" in \
        Batches(x, 8, world=4, drop_last=False).one_sample_why()
    assert Batches(x, 8, world=4, drop_last=True).any_rank_sizes() == {2}


def test_yaml_config_paths_are_relative_to_the_file(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml")
    assert cfg.model.resolve() == (EXAMPLES / "digits_mlp.onnx").resolve()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_in_the_flat_buffer_equal_the_interpreters(tmp_path, digits_config,
                                                              accumulate):
    """With one micro-batch per step the planned kernels write each gradient straight into its
    slice of the flat buffer (the loss weight enters as the backward seed); with accumulation
    they are added into it. Either way the buffer holds the unplanned interpreter's gradients
    of the step (mean over the micro-batches), and the fused cross-entropy gradient is used."""
    from trainer.executor import Executor
    raw = digits_config(precision="fp64", steps=3, accumulate=accumulate,
                        output=str(tmp_path / "m.onnx"), data__batch_size=32)
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    for _ in range(2):
        micro = [t._next_micro_batch()[1:4] for _ in range(accumulate)]
        before = {k: v.copy() for k, v in t.params.items()}
        t.train_step(micro, 0.1)
    want = {k: 0.0 for k in t.names}
    for arrays, local_w, _ in micro:
        plan = t._plan(len(next(iter(arrays.values()))))
        ref = Executor(plan.model, feeds=list(plan.gradients) + list(plan.state),
                       fetch=list(plan.gradients.values()), optimize=False)
        feeds = {plan.targets.get(k, k): v for k, v in arrays.items()}
        feeds.update(before)
        feeds.update(t.state)
        out = ref.run(feeds)
        for k, gname in plan.gradients.items():
            want[k] = want[k] + out[gname] * (local_w / sum(m[2] for m in micro))
    for k in t.names:
        np.testing.assert_allclose(t.grads[k], want[k], rtol=1e-10, atol=1e-14, err_msg=k)
    ops = {n.op for p in t.plans.values() for s in p.executor._specialized.values() if s
           for n in s.nodes}
    assert "SoftmaxCrossEntropyGrad" in ops


def test_a_batch_whose_labels_are_all_ignored_updates_nothing(tmp_path, digits_config):
    """Every label of a step's batch is ignore_index: no gradient, and no update either (AdamW
    still decayed the weights and moved its moments on the zero gradient; PyTorch's mean over
    no label is NaN). The step is logged; the steps around it train as without it."""
    d = np.load(digits_config()["data"]["train"]["path"])
    y = d["y_train"].copy()
    y[32:64] = -100  # (the second batch of 32)
    np.savez(tmp_path / "d.npz", x=d["x_train"], y=y)

    def run(steps: int, out: str):
        log = io.StringIO()
        raw = digits_config(steps=steps, optimizer={"type": "adamw", "lr": 1e-2},
                            output=str(tmp_path / out),
                            data__train={"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                                         "targets": {"label": "y"}},
                            data__shuffle=False, data__eval=None)
        t = Trainer(config_from_dict(raw, tmp_path), stream=log)
        t.fit()
        return t.trained_values(), log.getvalue()
    one, _ = run(1, "one.onnx")
    two, log = run(2, "two.onnx")
    assert "step 2: every label of its batch is loss.ignore_index (-100): nothing to learn, " \
        "update skipped" in log
    for k, v in one.items():
        np.testing.assert_array_equal(two[k], v, err_msg=k)
