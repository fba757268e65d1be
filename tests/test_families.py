"""Every model family (tests/families.py) through the paths that are not mpirun's: an exact
resume, alone and under emulated ranks, and the training graph as ONNX that onnxruntime runs."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.families import FAMILIES, family_config, family_training_graph
from trainer.comm.local import run_local as run_ranks
from trainer.config import config_from_dict
from trainer.executor import Executor
from trainer.train import Trainer


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_resumes_exactly(zoo, tmp_path, name, world):
    """A run stopped at step 3 and resumed from its checkpoint ends bit for bit where the
    uninterrupted run does, on every rank (weights, optimizer, BatchNorm statistics, Dropout
    streams; the resumed first step runs the same planned kernels as the uninterrupted run's
    fourth). Checkpointing itself changes nothing that is exported."""
    d = zoo[name]

    def run(steps, resume=False, ck=None):
        raw = family_config(d, name, steps=steps, output=str(tmp_path / f"{steps}.onnx"))
        if ck:
            raw["checkpoint"] = {"dir": str(tmp_path / ck), "every_steps": 3, "keep": 1}

        def job(comm):
            t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
            t.fit(resume=resume)
            return t.trained_values(), [r["loss"] for r in t.history if "loss" in r]
        return run_ranks(world, job)

    full = run(6, ck="full")
    run(3, ck="ck")
    resumed = run(6, True, ck="ck")
    for (values, losses), (want, want_losses) in zip(resumed, full, strict=True):
        assert losses == want_losses[3:]
        for k, v in want.items():
            np.testing.assert_array_equal(values[k], v, err_msg=k)
    plain, _ = run(6)[0]
    for k, v in full[0][0].items():
        np.testing.assert_array_equal(plain[k], v, err_msg=k)


@pytest.mark.parametrize("opt", [{"type": "sgd", "momentum": 0.9},
                                 {"type": "adamw", "weight_decay": 0.1}])
def test_lr_0_recalibrates_batchnorm_statistics_only(zoo, tmp_path, opt):
    """lr 0 (refused before, as torch allows it) trains nothing, weight decay included, and
    the steps still update BatchNorm's running statistics: a recalibration on new data."""
    name = "bn_cnn_training_form"
    raw = family_config(zoo[name], name, optimizer={**opt, "lr": 0},
                        output=str(tmp_path / "out.onnx"))
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    before = {i.name: numpy_helper.to_array(i)
              for i in onnx.load(zoo[name] / "model.onnx").graph.initializer}
    assert t.state and set(t.params)
    for k in t.params:
        np.testing.assert_array_equal(t.trained_values()[k], before[k], err_msg=k)
    assert all(not np.array_equal(t.trained_values()[k], before[k]) for k in t.state)


@pytest.mark.parametrize("batchnorm", ["train", "eval"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_familys_training_graph_runs_in_onnxruntime(zoo, name, batchnorm):
    """The training graph (forward, loss, backward, state updates) is plain ONNX: onnxruntime
    runs it and gives the loss, gradients and new BatchNorm statistics of both our paths (the
    planned and the unplanned) to float32 rounding. (Dropout draws its own masks there.)"""
    ort = pytest.importorskip("onnxruntime")
    tm, feeds = family_training_graph(zoo[name], batchnorm)
    onnx.checker.check_model(tm, full_check=True)
    outs = [o.name for o in tm.graph.output]
    sess = ort.InferenceSession(tm.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = dict(zip(outs, sess.run(None, feeds), strict=True))
    assert np.isfinite(theirs[outs[0]]).all()
    if name == "dropout_mlp":
        return
    ex = Executor(tm, np)
    for ours in (ex.run(dict(feeds)), ex.run_unplanned(dict(feeds))):
        for k in outs:
            want = np.asarray(theirs[k], np.float64)
            scale = max(float(np.abs(want).max(initial=0)), 1e-6)
            assert np.abs(np.asarray(ours[k], np.float64) - want).max(initial=0) <= \
                2e-5 * scale, k


@pytest.mark.parametrize("name", list(FAMILIES))
def test_no_familys_sizes_are_taken_for_data_sized(zoo, name):
    """graph.data_sized marks values whose sizes follow the data (NonZero, Split by counted
    sizes...); their Shape is then read at run time and never folded into the plan. None of
    the families has such a value: sizes from shapes, initializers and Constant nodes are
    fixed (a Constant node's Split sizes were once taken for data, and a GPT's plan lost its
    folding: 525 steps for 220)."""
    from trainer.graph import data_sized

    tm, _ = family_training_graph(zoo[name], "train")
    inits = {t.name for t in tm.graph.initializer}
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output)) for n in tm.graph.node]
    assert not data_sized(nodes, lambda x: x in inits)
