"""SyncBatchNorm's training graph (ai.onnx_trainer AllReduce of the batch sums): N emulated
ranks, each with its shard, give the gradients and running statistics of one process with the
whole batch."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.autodiff import build_training_graph, training_info
from trainer.comm.local import run_local
from trainer.executor import Executor
from trainer.kernels.collective import collectives

EXTRA_TESTED = {"AllReduce"}  # rule checked below through whole training graphs
TESTED_OPS = {"AllReduce"}  # and its kernel (identity alone, a sum across emulated ranks)


def _bn_model():
    """x[N,3,4,4] -> Conv(w) -> BatchNormalization(train) -> ReduceMean -> logits[N,3]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 3), "s"),
             numpy_helper.from_array(rng.standard_normal(3), "b"),
             numpy_helper.from_array(rng.standard_normal(3), "rm"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 3), "rv"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "rm", "rv"], ["y"],
                              momentum=0.8),
             helper.make_node("ReduceMean", ["y", "axes"], ["logits"], keepdims=0)]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE,
                                                         ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.DOUBLE,
                                                         ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x, y, sync, comm=None, seed_weight=1.0):
    tm = build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                      "target": "label"}, shapes={"x": x.shape},
                              sync_batchnorm=sync)
    info = training_info(tm)
    fetch = [info.loss, *info.gradients.values(), *info.state.values()]
    ex = Executor(tm, np, feeds=[info.seed], fetch=fetch)
    feeds = {"x": x, info.targets["label"]: y, info.seed: np.array(seed_weight)}
    with collectives(comm):
        out = ex.run(feeds)
    grads = {k: out[v] for k, v in info.gradients.items()}
    stats = {k: out[v] for k, v in info.state.items()}
    return out[info.loss], grads, stats


@pytest.mark.parametrize("world", [2, 4])
def test_sync_batchnorm_ranks_equal_one_process(world):
    model = _bn_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 4, 4))
    y = rng.integers(0, 3, 8)
    loss, grads, stats = _run(model, x, y, sync=True)  # one process: AllReduce is the identity
    _, grads_plain, stats_plain = _run(model, x, y, sync=False)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads_plain[k], rtol=1e-12, atol=1e-14)
    for k in stats:
        np.testing.assert_allclose(stats[k], stats_plain[k], rtol=1e-12)
    n = len(x) // world

    def rank(comm):
        sl = slice(comm.rank * n, (comm.rank + 1) * n)
        # each rank's loss is the mean of its shard: weight it by its share of the batch
        return _run(model, x[sl], y[sl], sync=True, comm=comm, seed_weight=1.0 / world)

    results = run_local(world, rank)
    for k in grads:
        total = sum(r[1][k] for r in results)  # the gradient all-reduce
        np.testing.assert_allclose(total, grads[k], rtol=1e-10, atol=1e-12, err_msg=k)
    for r in results:  # every rank updates the running statistics with the global batch
        for k in stats:
            np.testing.assert_allclose(r[2][k], stats[k], rtol=1e-12, err_msg=k)
    assert sum(float(r[0]) for r in results) / world == pytest.approx(float(loss), rel=1e-12)


def test_without_sync_the_ranks_differ():
    """The control: per-rank statistics (plain BatchNorm) do not give the full-batch gradient."""
    model = _bn_model()
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 3, 4, 4)), rng.integers(0, 3, 8)
    _, grads, _ = _run(model, x, y, sync=False)

    def rank(comm):
        sl = slice(comm.rank * 4, (comm.rank + 1) * 4)
        return _run(model, x[sl], y[sl], sync=False, comm=comm, seed_weight=0.5)

    results = run_local(2, rank)
    assert not np.allclose(sum(r[1]["w"] for r in results), grads["w"], rtol=1e-6)
