"""Data parallelism under mpirun: N processes give the weights of 1; failures end the job."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from tests.conftest import EXAMPLES, ROOT
from tests.families import FAMILIES, family_config
from tests.mpi_run import run_mpi
from trainer.comm.local import run_local as run_ranks
from trainer.config import config_from_dict
from trainer.errors import TrainerError
from trainer.train import Trainer

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(shutil.which("mpirun") is None,
                                 reason="mpirun not installed (pip install '.[mpi]')")]


def _launch(np_: int, config, *extra, timeout=240):
    env = {**os.environ, "PYTHON": sys.executable}
    return run_mpi([str(ROOT / "launch.sh"), "-np", str(np_), "--oversubscribe", str(config),
                    *extra], timeout=timeout, env=env, cwd=ROOT)


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("world", [2, 4])
def test_n_processes_match_one(tmp_path, digits_config, world):
    raw = digits_config(precision="fp64", steps=12, output=str(tmp_path / f"np{world}.onnx"),
                        data__batch_size=32,
                        optimizer={"type": "adamw", "lr": 3e-3})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx")}, tmp_path),
                     stream=io.StringIO())
    single.fit()
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints: one line per training step.
    assert proc.stdout.count("  lr ") == 12
    ours, ref = _weights(tmp_path / f"np{world}.onnx"), _weights(tmp_path / "one.onnx")
    for name, value in ref.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_batch_not_divisible_is_a_clear_error(tmp_path, digits_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(data__batch_size=30)))
    proc = _launch(4, path)
    assert proc.returncode != 0
    assert "must be divisible by the number of processes 4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_rank_ends_the_job(tmp_path, digits_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(steps=10**6, log={"every_steps": 1000})))
    env = {**os.environ, "PYTHON": sys.executable}
    # Rank 1 kills itself with SIGKILL a few seconds into training.
    script = (f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then (sleep 4; kill -9 $$) & fi; '
              f'exec "{sys.executable}" -m trainer train "{path}"')
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    "bash", "-c", script], timeout=120, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.seconds < 90
    assert not (tmp_path / "out" / "model.onnx").exists()


# -- every model family under mpirun (tests/families.py) ----------------------------------------
def _emulated(raw, world, base):
    """The same job on `world` emulated ranks in this process (a reference for mpirun)."""
    def job(comm):
        cfg = config_from_dict({**raw, "output": str(base / "emulated.onnx")}, base)
        trainer = Trainer(cfg, comm=comm, stream=io.StringIO())
        trainer.fit()
        return trainer.trained_values()
    return run_ranks(world, job)


@pytest.mark.parametrize("name,world", [(n, 2) for n in FAMILIES] + [("resnet_inference", 4)])
def test_every_family_trains_under_mpirun(zoo, tmp_path, name, world):
    """mpirun -np N trains each model family to the end; its export equals N emulated ranks
    (per-rank BatchNorm statistics and Dropout masks; rank 0's running statistics exported)
    and loads in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    d = zoo[name]
    raw = family_config(d, name, output=str(tmp_path / "out.onnx"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("  lr ") == 6
    ranks = _emulated(raw, world, tmp_path)
    got = _weights(tmp_path / "out.onnx")
    init = _weights(d / "model.onnx")
    for k, want in ranks[0].items():
        np.testing.assert_allclose(got[k], want.astype(np.float32), rtol=1e-6, atol=1e-7,
                                   err_msg=k)
    moved = [k for k in ranks[0] if k in init and not np.allclose(got[k], init[k])]
    assert moved, "nothing was trained"
    if name == "mlp_frozen":
        for k in ("fc1.weight", "fc1.bias"):
            np.testing.assert_array_equal(got[k], init[k])
    if name == "encoder_dynamo":  # restored: PyTorch's own tensors, trained and exported
        for k, start in (("enc.norm2.weight", 1.0), ("ln.bias", 0.0),
                         ("enc.self_attn.out_proj.bias", 0.0)):
            assert k not in init and not np.allclose(got[k], start), k
        assert not np.allclose(got["enc.norm2.weight"], got["enc.norm1.weight"])
    stats = [k for k in ranks[0] if "running" in k]
    if stats and world > 1:  # each rank kept its own statistics; rank 0's were exported
        assert any(not np.allclose(ranks[0][k], ranks[1][k]) for k in stats)
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(d / "data.npz")["x"][:5]
    (logits,) = sess.run(["logits"], {"x": x})
    assert logits.shape == (5, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("name", ["bn_cnn_inference", "encoder_dynamo", "token_rotary_dynamo"])
def test_16_bit_families_train_under_mpirun(zoo, tmp_path, name):
    """precision fp16 (a first loss scale that overflows, so steps are skipped) on a BatchNorm
    CNN and two default exports of attention models under mpirun -np 2: the export equals 2
    emulated ranks, and every rank skipped the same steps (the one flat buffer they share)."""
    d = zoo[name]
    raw = family_config(d, name, output=str(tmp_path / "out.onnx"), precision="fp16",
                        loss_scale={"init": 2.0 ** 20, "growth_interval": 2})  # 3 of 6 skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(2, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("overflowed at loss scale") >= 1
    ranks = _emulated(raw, 2, tmp_path)
    got = _weights(tmp_path / "out.onnx")
    for k, want in ranks[0].items():
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
    for k, want in ranks[0].items():  # (rank 1's weights: the same, statistics aside)
        if "running" not in k:
            np.testing.assert_array_equal(ranks[1][k], want, err_msg=k)
    init = _weights(d / "model.onnx")
    assert any(k in init and not np.allclose(got[k], init[k]) for k in ranks[0])


@pytest.mark.parametrize("name", ["bn_cnn_inference", "bn_cnn_training_form"])
def test_evaluation_under_ranks_scores_the_exported_model(zoo, tmp_path, name):
    """Each rank updates its own BatchNorm statistics, but a sharded evaluation uses rank 0's
    (the exported ones) on every rank: its metrics are those of the exported model."""
    d = zoo[name]
    raw = family_config(d, name, output=str(tmp_path / "out.onnx"))
    raw["data"]["eval"] = dict(raw["data"]["train"])
    raw["eval"] = {"every_steps": 3}

    def job(comm):
        t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
        t.fit()
        return [r for r in t.history if "eval_loss" in r][-1], t.trained_values()
    last, exported = run_ranks(2, job)[0]
    alone = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    for k, v in {**alone.params, **alone.state}.items():  # (in float64: not the file's float32)
        v[...] = exported[k]
    again = alone.evaluate()
    assert last["step"] == 6
    for k in ("eval_loss", "eval_accuracy"):
        assert again[k] == pytest.approx(last[k], rel=1e-12), k


_INJECT = """
import sys
import trainer.train as t
original = t.Trainer.train_step
def failing(self, *args):
    if self.rank == 1 and self.step == 2:
        raise {exc}
    return original(self, *args)
t.Trainer.train_step = failing
from trainer.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.parametrize("exc,code,text", [
    ("RuntimeError('injected fault')", 3, "internal error"),
    ("t.TrainerError('injected user error')", 2, "injected user error")])
def test_failure_on_one_rank_ends_the_job(tmp_path, digits_config, exc, code, text):
    """An exception on rank 1 alone, mid-training, ends every rank promptly, non-zero, with the
    message printed once; nothing is exported."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(steps=10**6, log={"every_steps": 1000})))
    script = tmp_path / "inject.py"
    script.write_text(_INJECT.format(exc=exc))
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, str(script), str(path)], timeout=120, cwd=ROOT)
    elapsed = proc.seconds
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert proc.stderr.count(text) == 1, proc.stderr[-3000:]
    assert "rank 1" in proc.stderr
    assert ("Traceback" in proc.stderr) == (code == 3)
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("over", [["--set", "device=gpu"],
                                  ["--set", "distributed.backend=nccl"]])
def test_a_setup_error_every_rank_meets_is_printed_once(tmp_path, digits_config, over):
    """device: gpu without CuPy, or nccl on a CPU: every rank fails before MPI starts; rank 0
    could not end the others, which printed it too, as "rank k: error" (4 lines on 4 ranks)."""
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: device: gpu may start")
    except ImportError:
        pass
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(steps=2)))
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3",
                    sys.executable, "-m", "trainer", "train", str(path), *over], timeout=120,
                   cwd=ROOT)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "rank " not in errors[0], proc.stderr[-3000:]


def test_eval_command_under_ranks_prints_one_line(tmp_path, digits_config):
    """`onnx-trainer eval` under mpirun: the metrics of one process, printed once (each rank
    printed its line)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config()))
    alone = Trainer(config_from_dict(digits_config(), tmp_path), check=False,
                    writes=False).evaluate()
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, "-m", "trainer", "eval", str(path)], timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval_loss") == 1, proc.stdout
    got = float(proc.stdout.split("eval_loss")[1].split()[0])
    assert got == pytest.approx(alone["eval_loss"], abs=1e-4)
    # an eval set of fewer samples than processes: scored as training's evaluation scores it
    # (it was refused as the training set it stands in for)
    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "one.npz", x=d["x_test"][:1], y=d["y_test"][:1])
    raw = digits_config()
    raw["data"]["eval"] = {"path": str(tmp_path / "one.npz"), "inputs": {"x": "x"},
                           "targets": {"label": "y"}}
    path.write_text(yaml.safe_dump(raw))
    alone = Trainer(config_from_dict(raw, tmp_path), check=False, writes=False).evaluate()
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, "-m", "trainer", "eval", str(path), "--json"], timeout=120,
                   cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == pytest.approx(alone, abs=1e-6)


def test_failure_during_setup_on_every_rank_is_printed_once(tmp_path, digits_config):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(model=str(tmp_path / "missing.onnx"))))
    proc = _launch(2, path)
    assert proc.returncode != 0
    assert proc.stderr.count("model file not found") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


_TIMELINE = """
import io, json, sys, time
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from trainer.comm.buckets import Buckets
from trainer.config import config_from_dict
from trainer.errors import TrainerError
from trainer.train import Trainer

records = []
original = Buckets.wait_all
def wait_all(self):
    end = time.perf_counter()  # the backward has finished: only the optimizer is left
    original(self)
    records.append({{"backward_end": end, "started": list(self.started_at),
                    "done": list(self.done_at)}})
Buckets.wait_all = wait_all

d = sys.argv[1]
rng = np.random.default_rng(0)
sizes = [256, 2048, 2048, 10]  # ~100 ms of backward after the last layer's gradients
inits, nodes, x = [], [], "x"
for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
    inits += [numpy_helper.from_array((rng.standard_normal((b, a)) / a ** 0.5).astype(np.float32),
                                      f"W{{i}}"),
              numpy_helper.from_array(np.zeros(b, np.float32), f"B{{i}}")]
    y = "logits" if i == len(sizes) - 2 else f"h{{i}}"
    nodes.append(helper.make_node("Gemm", [x, f"W{{i}}", f"B{{i}}"], [y + ("_" if y != "logits"
                                  else "")], transB=1))
    if y != "logits":
        nodes.append(helper.make_node("Relu", [y + "_"], [y]))
    x = y
graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["N", 256])],
                          [helper.make_tensor_value_info("logits", 1, ["N", 10])], inits)
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), d + "/m.onnx")
np.savez(d + "/d.npz", x=rng.standard_normal((2048, 256)).astype(np.float32),
         y=rng.integers(0, 10, 2048))
cfg = config_from_dict({{"model": "m.onnx", "output": "out.onnx", "device": "cpu",
    "data": {{"train": {{"path": "d.npz", "inputs": {{"x": "x"}}, "targets": {{"label": "y"}}}},
             "batch_size": 1024}}, "threads": 1,
    "loss": {{"type": "cross_entropy", "output": "logits", "target": "label"}},
    "optimizer": {{"type": "sgd", "lr": 0.01}}, "steps": 6, "log": {{"every_steps": 100}},
    "distributed": {{"bucket_mb": 0.05, "overlap": {overlap}}}}}, d)
t = Trainer(cfg, stream=io.StringIO())
t.fit()
print("TIMELINE", t.rank, json.dumps(records), flush=True)
print("PROGRESS THREAD", "on" if t.comm.progress and t.comm.progress.polls else "off", flush=True)
"""


@pytest.mark.parametrize("overlap", [True, False])
def test_gradient_buckets_complete_while_the_backward_still_runs(tmp_path, overlap):
    """Under mpirun, the all-reduce of the last layer's gradients starts as soon as they are
    produced and completes while the backward computes the next ones: communication
    progresses during compute. With overlap off, no bucket starts before the backward's end."""
    script = tmp_path / "timeline.py"
    script.write_text(_TIMELINE.format(overlap=overlap))
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, str(script), str(tmp_path)], timeout=180, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split(" ", 2) for ln in proc.stdout.splitlines() if ln.startswith("TIMELINE")]
    assert sorted(int(r) for _, r, _ in lines) == [0, 1]
    for _, rank, text in lines:
        steps = json.loads(text)[1:]  # (the first step also builds the plan)
        assert len(steps) == 5
        for s in steps:
            assert len(s["started"]) >= 3 and None not in s["done"]
            end = s["backward_end"]
            if overlap:  # bucket 0 (the last layer) starts early: while the backward runs
                assert s["started"][0] < end, (rank, s)
            else:
                assert min(s["started"]) >= end, (rank, s)
        if overlap:  # and is complete before the next gradients are (the progress thread moved
            # its data during their ~100 ms of compute; polled only at gradient events, it
            # often completed only at the backward's last poll or after it: BENCHMARKS.md)
            early = sum(s["done"][0] < s["started"][2] for s in steps)
            assert early >= 4, (rank, steps)
    assert proc.stdout.count("PROGRESS THREAD on") == 2


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_check_consistency_names_the_first_tensor_that_differs(tmp_path, digits_config,
                                                              precision):
    """distributed.check_consistency_every on emulated ranks: agreeing ranks pass every check;
    one bit of one tensor changed on rank 1 stops every rank, naming the tensor and rank."""
    raw = digits_config(precision=precision, steps=4, data__batch_size=30,
                        distributed={"check_consistency_every": 2})

    def job(comm):
        t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
        t.fit()
        t.check_consistency()
        if comm.rank == 1:
            bias = t.params["fc2.bias"]
            bias[3] = np.nextafter(bias[3], bias.dtype.type(np.inf))
        with pytest.raises(TrainerError) as err:
            t.check_consistency()
        return str(err.value)

    said = run_ranks(3, job)
    assert said[0] == said[1] == said[2] == (
        "distributed.check_consistency_every: after step 4, rank(s) 1 hold other values of "
        "'fc2.bias' than rank 0 (1 of 4 trained tensors differ): the ranks no longer train one "
        "model (a rank's kernels or data differ, or its update was skipped); the job stops")


def test_processes_given_different_configs_are_refused_before_anything_else(tmp_path,
                                                                          digits_config):
    """Each process reads the config itself: rank 1 given fewer steps and no data.eval (a
    node with a stale copy) ended the job at its own step count or left rank 0 waiting in the
    evaluation. Where files are, what rank 0 alone writes and threads may differ."""
    shutil.copy(EXAMPLES / "digits.npz", tmp_path / "copy.npz")
    raw = digits_config(steps=3, data__batch_size=30)

    def config(rank, same):
        if rank == 0 or (same and rank == 1):
            return dict(raw, output=str(tmp_path / "a.onnx"))
        if rank == 1:
            return {**raw, "steps": 2, "data": {k: v for k, v in raw["data"].items()
                                                if k != "eval"}}
        return {**raw, "output": str(tmp_path / "c.onnx"), "threads": 1,
                "log": {"every_steps": 2},
                "data": {**raw["data"], "train": {**raw["data"]["train"],
                                                  "path": str(tmp_path / "copy.npz")}}}

    def job(comm, same=False):
        t = Trainer(config_from_dict(config(comm.rank, same), tmp_path), comm=comm,
                    stream=io.StringIO())
        t.fit()
        return t.step

    with pytest.raises(TrainerError, match=r"^the processes were given different configs: data, "
                                           r"steps differ between rank 0 and rank\(s\) 1; "):
        run_ranks(3, job)
    assert run_ranks(3, lambda comm: job(comm, same=True)) == [3, 3, 3]
    # (a stale copy of the dataset on rank 2's node: fewer samples; ran collectives of other
    # sizes, which corrupted Open MPI's heap or hung until distributed.timeout_s)
    d = dict(np.load(EXAMPLES / "digits.npz"))
    np.savez(tmp_path / "copy.npz", **{**d, "x_train": d["x_train"][:1000],
                                       "y_train": d["y_train"][:1000]})
    with pytest.raises(TrainerError, match=r"^the processes read different data: data.train "
                                           r"differs between rank 0 and rank\(s\) 2 "):
        run_ranks(3, lambda comm: job(comm, same=True))


def test_mpmd_launch_of_two_configs_ends_at_once_with_one_message(tmp_path, digits_config):
    raw = digits_config(steps=40)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**raw, "steps": 30}))
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe",
                    "-np", "1", sys.executable, "-m", "trainer", "train", str(tmp_path / "a.yaml"),
                    ":", "-np", "1", sys.executable, "-m", "trainer", "train",
                    str(tmp_path / "b.yaml")], timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and proc.seconds < 60, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "steps differs between rank 0 and rank(s) 1" in errors[0], \
        proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# -- gradient synchronization variants ----------------------------------------------------------
SYNC_VARIANTS = {
    "blocking": ({"overlap": False}, {}, 2),
    "tiny-buckets-overlap": ({"bucket_mb": 0.002, "overlap": True}, {}, 2),
    "tiny-buckets-4-ranks": ({"bucket_mb": 0.002, "check_consistency_every": 3}, {}, 4),
    "accumulate": ({"bucket_mb": 0.01}, {"accumulate": 2}, 2),
    # ZeRO-1: buckets reduce-scattered into each rank's shard; the clipping norm crosses ranks
    "zero1-tiny-buckets-clip-4-ranks": ({"shard_optimizer": True, "bucket_mb": 0.002,
                                         "check_consistency_every": 1},
                                        {"grad_clip": {"max_norm": 0.05}}, 4),
    "zero1-blocking-accumulate": ({"shard_optimizer": True, "overlap": False},
                                  {"accumulate": 2}, 2),
}


@pytest.mark.parametrize("name", list(SYNC_VARIANTS))
def test_sync_variants_match_one_process(tmp_path, digits_config, name):
    """Bucketed all-reduce (overlapped with the backward or not, many small buckets or one),
    accumulation, and ZeRO-1's reduce-scatter (with global-norm clipping) under mpirun give the
    single-process weights (SGD+momentum, fp64)."""
    dist, extra, world = SYNC_VARIANTS[name]
    raw = digits_config(precision="fp64", steps=8, output=str(tmp_path / "np.onnx"),
                        data__batch_size=32, distributed=dist, **extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx"),
                                       "distributed": {}}, tmp_path), stream=io.StringIO())
    single.fit()
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = _weights(tmp_path / "np.onnx"), _weights(tmp_path / "one.onnx")
    for k, v in ref.items():
        np.testing.assert_allclose(ours[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("dist,extra", [({"bucket_mb": 0.002}, {}),
                                        ({"shard_optimizer": True},
                                         {"grad_clip": {"max_norm": 0.05}})])
def test_fp16_loss_scaling_under_mpirun_equals_one_process(tmp_path, digits_config, dist,
                                                           extra):
    """precision fp16 on 2 ranks, an overflowing first scale included: every rank skips the
    same steps and keeps the same loss scale (the decision follows the all-reduced gradients,
    or under ZeRO-1 the all-reduced overflow flag), and the weights are those of one process
    accumulating the two half batches (the same float16 products, summed in float32)."""
    raw = digits_config(precision="fp16", steps=8, output=str(tmp_path / "np.onnx"),
                        loss_scale={"init": 2.0 ** 28, "growth_interval": 2},
                        distributed=dist, **extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx"),
                                       "accumulate": 2, "distributed": {}}, tmp_path),
                     stream=io.StringIO())
    single.fit()
    assert single.scaler_skipped >= 2
    proc = _launch(2, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("overflowed at loss scale") == single.scaler_skipped
    ours, ref = _weights(tmp_path / "np.onnx"), _weights(tmp_path / "one.onnx")
    for k, v in ref.items():
        np.testing.assert_allclose(ours[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_bf16_on_3_ranks_is_one_process_accumulating_3_bit_for_bit(tmp_path, digits_config):
    """With accumulate, bf16 applied each micro-batch's weight (1/3) after its backward, where
    N processes seed the backward with it: the 16-bit products rounded other values, and 3
    ranks were 1e-4 from one process accumulating 3 (2 and 4, powers of two, were exact)."""
    raw = digits_config(precision="bf16", steps=3, output=str(tmp_path / "np.onnx"),
                        data__batch_size=12, distributed={"shard_optimizer": True})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx"),
                                       "accumulate": 3, "distributed": {},
                                       "data": {**raw["data"], "batch_size": 4}}, tmp_path),
                     stream=io.StringIO())
    single.fit()
    proc = _launch(3, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = _weights(tmp_path / "np.onnx"), _weights(tmp_path / "one.onnx")
    for k, v in ref.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


def test_bf16_compression_stays_close(tmp_path, digits_config):
    """distributed.compress: bf16 (float32 runs): each rank's gradient travels rounded to bf16
    (relative error <= 2**-8 per element, see trainer/comm/buckets.py); after 8 SGD steps the
    weights differ from the uncompressed run's by under 5% of the update (2.7% measured: per-step
    rounding of ~2**-7 relative is amplified by momentum and the ReLU pattern it moves). (Adam-type
    optimizers normalize each element's step, so their error is relative to the step size of
    elements whose gradients are tiny: larger, though still bounded by lr per step.)"""
    over = dict(steps=8, data__batch_size=32, optimizer={"type": "sgd", "lr": 0.1,
                                                         "momentum": 0.9})
    raw = digits_config(output=str(tmp_path / "c.onnx"),
                        distributed={"compress": "bf16"}, **over)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    plain = digits_config(output=str(tmp_path / "p.onnx"), **over)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plain))
    for p in (path, tmp_path / "p.yaml"):
        proc = _launch(2, p)
        assert proc.returncode == 0, proc.stderr[-3000:]
    c, p0 = _weights(tmp_path / "c.onnx"), _weights(tmp_path / "p.onnx")
    init = _weights(ROOT / "examples" / "digits_mlp.onnx")
    for k in p0:
        update = np.abs(p0[k] - init[k]).max()
        assert np.abs(c[k] - p0[k]).max() <= 0.05 * update, k
    assert any(not np.array_equal(c[k], p0[k]) for k in p0)  # compression did something


def test_fp16_compression_overflow_names_the_compression(tmp_path, digits_config):
    """Gradients beyond float16's range overflow in distributed.compress: fp16's transfer,
    before clipping: the error says so and names bf16 or null, where lowering the lr or
    clipping cannot help (found by a distributed sweep)."""
    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "big.npz", x=d["x_train"] * 1e7, y=d["y_train"])
    raw = digits_config(output=str(tmp_path / "o.onnx"), steps=2, grad_clip={"max_norm": 1.0},
                        distributed={"compress": "fp16"})
    raw["data"] = {"train": {"path": str(tmp_path / "big.npz"), "inputs": {"x": "x"},
                             "targets": {"label": "y"}}, "batch_size": 32}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(2, path)
    assert proc.returncode != 0
    assert "distributed.compress: fp16 sends the gradients as float16" in proc.stderr, \
        proc.stderr[-2000:]


def test_export_of_a_checkpoint_under_mpirun_is_the_runs_own(tmp_path, digits_config):
    """`export` launched on 2 processes writes once (rank 0) the run's own export, byte for
    byte: the metadata's world_size is the checkpoint's run's, not the launch's."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(
        steps=6, output=str(tmp_path / "run.onnx"),
        checkpoint={"dir": str(tmp_path / "ck"), "every_steps": 3})))
    import subprocess
    subprocess.run([sys.executable, "-m", "trainer", "train", str(path)], check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, "-m", "trainer", "export", str(path), "-o",
                    str(tmp_path / "again.onnx")], timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "run.onnx").read_bytes()


def test_sigterm_under_mpirun_stops_every_rank_after_the_same_step(tmp_path, digits_config):
    import signal
    ck = tmp_path / "ck"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(steps=10**5, log={"every_steps": 1},
                                                 checkpoint={"dir": str(ck), "every_steps": 5})))
    env = {**os.environ, "PYTHON": sys.executable}
    # SIGTERM to rank 1 only, once training is under way (its first checkpoint is written; a
    # fixed delay fell in the start-up on a loaded machine): the stop request travels with the
    # gradient all-reduce.
    script = (f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then (until [ -n "$(ls "{ck}" 2>/dev/null)"'
              f' ]; do sleep 0.2; done; kill -TERM $$) & fi; '
              f'exec "{sys.executable}" -m trainer train "{path}"')
    proc = run_mpi(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    "bash", "-c", script], timeout=120, env=env, cwd=ROOT)
    assert proc.seconds < 60
    # (rank 0's line, after its checkpoint: each rank printed its own, rank 1's "stopped by
    # SIGTERM" before rank 0 had saved; rank 0 was stopped by rank 1's signal)
    assert proc.returncode != 0 and proc.stderr.count("onnx-trainer: stopped by") == 1, \
        proc.stderr[-2000:]
    assert "stopped by a signal after step" in proc.stderr
    from trainer import checkpoint
    assert checkpoint.latest(ck) is not None
    del signal


# (Not the QDQ family: N ranks sum in another order than one process, and after a few steps a
# value within rounding of a quantization boundary lands on the other side of it; measured: the
# same weights to 3e-17 after 2 steps, 2e-3 apart after 6.)
@pytest.mark.parametrize("name,world", [("bn_cnn_inference", 2), ("resnet_inference", 4)])
def test_sync_batchnorm_under_mpirun_equals_one_process(zoo, tmp_path, name, world):
    """distributed.sync_batchnorm: the batch statistics are all-reduced, so N ranks train the
    weights and running statistics of one process with the same global batch."""
    d = zoo[name]
    raw = family_config(d, name, output=str(tmp_path / "sync.onnx"),
                         distributed={"sync_batchnorm": True})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx")}, tmp_path),
                     stream=io.StringIO())
    single.fit()
    got, want = _weights(tmp_path / "sync.onnx"), _weights(tmp_path / "one.onnx")
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert any("running" in k for k in want)


def test_sync_batchnorm_plans_a_new_shape_on_one_rank_only(zoo, tmp_path):
    """A SyncBatchNorm step is planned like any other (its all-reduce a step of the plan).
    Planning a new batch shape first runs the graph once to record its shapes, with the
    collectives as the identity: the last batch of 63 samples in batches of 8 gives one rank
    a shard of 3 where the other keeps its usual 4, so only one rank plans then, and no rank
    waits for an all-reduce the other never makes. The weights are one process's."""
    d = zoo["bn_cnn_inference"]
    data = np.load(d / "data.npz")
    np.savez(tmp_path / "odd.npz", x=data["x"][:63], y=data["y"][:63])
    raw = family_config(d, "bn_cnn_inference", output=str(tmp_path / "sync.onnx"), steps=8,
                        data={"train": {"path": str(tmp_path / "odd.npz"), "inputs": {"x": "x"},
                                        "targets": {"label": "y"}},
                              "batch_size": 8, "shuffle": False, "drop_last": False},
                        distributed={"sync_batchnorm": True, "timeout_s": 60})

    def job(comm):
        t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
        t.fit()
        assert all(p is not False for plan in t.plans.values()
                   for p in plan.executor._specialized.values()), "a step ran unplanned"
        return t.trained_values(), sorted(t.plans)
    ranks = run_ranks(2, job)
    assert sorted(sizes for _, sizes in ranks) == [[3, 4], [4]], [s for _, s in ranks]
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx")}, tmp_path),
                     stream=io.StringIO())
    single.fit()
    for k, v in single.trained_values().items():
        np.testing.assert_allclose(ranks[0][0][k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def _ignored_shard_run(zoo, tmp_path, world, tag, labels_ignored, batch=16, **over):
    """bn_cnn_inference on its data in order, one step of 16 samples (with 2 ranks rank 0
    takes the first 8; with batches of 8 and accumulate 2, the first micro-batch), the first 8
    labels -100 if labels_ignored: the exported tensors."""
    d = zoo["bn_cnn_inference"]
    data = np.load(d / "data.npz")
    y = data["y"].copy()
    if labels_ignored:
        y[:8] = -100
    np.savez(tmp_path / f"{tag}.npz", x=data["x"], y=y)
    raw = family_config(d, "bn_cnn_inference", output=str(tmp_path / f"{tag}.onnx"), steps=1,
                        data={"train": {"path": str(tmp_path / f"{tag}.npz"),
                                        "inputs": {"x": "x"}, "targets": {"label": "y"}},
                              "batch_size": batch, "shuffle": False}, **over)

    def job(comm):
        Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO()).fit()
    if world == 1:
        job(None)
    else:
        run_ranks(world, job)
    return _weights(tmp_path / f"{tag}.onnx")


@pytest.mark.parametrize("world,over", [
    (2, {"distributed": {"sync_batchnorm": True, "timeout_s": 60}}), (2, {}),
    (1, {"accumulate": 2, "batch": 8})], ids=["sync", "ranks", "accumulate"])
def test_a_shard_of_ignored_labels_still_moves_the_batchnorm_statistics(zoo, tmp_path, world,
                                                                         over):
    """A rank (or micro-batch) whose labels were all ignore_index skipped its forward: under
    sync_batchnorm the other rank waited in the statistics' all-reduce alone (MPI_ERR_TRUNCATE,
    the job ended), and otherwise the running statistics left its samples out (2e-2 to 8e-2
    off), where a PyTorch forward counts every sample. It runs now, with loss weight 0: the
    statistics do not depend on the labels, and under sync_batchnorm the weights and
    statistics are one process's."""
    got = _ignored_shard_run(zoo, tmp_path, world, "ignored", True, **over)
    plain = _ignored_shard_run(zoo, tmp_path, world, "plain", False, **over)
    stats = [k for k in got if "running" in k]
    assert stats
    for k in stats:
        np.testing.assert_array_equal(got[k], plain[k], err_msg=k)
    if "distributed" in over:  # (the one-process run with the same global batch)
        one = _ignored_shard_run(zoo, tmp_path, 1, "one", True)
        for k, v in one.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("world,opt,loss", [
    (2, {"type": "adamw", "lr": 3e-3}, {}),
    (4, {"type": "sgd", "lr": 0.1, "momentum": 0.9},
     {"label_smoothing": 0.1, "weight": [1, 2, 0.5, 1, 1, 3, 1, 1, 0.1, 1]})])
def test_zero1_sharded_optimizer_matches_one_process(tmp_path, digits_config, world, opt,
                                                     loss):
    """distributed.shard_optimizer (ZeRO-1): each rank keeps and updates 1/N of the optimizer
    state; the weights are the single-process ones (also with class weights, whose sums over
    each rank's labels weight its loss, and label smoothing)."""
    raw = digits_config(precision="fp64", steps=8, output=str(tmp_path / "z.onnx"),
                        optimizer=opt, distributed={"shard_optimizer": True})
    raw["loss"].update(loss)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx"),
                                       "distributed": {}}, tmp_path), stream=io.StringIO())
    single.fit()
    got, want = _weights(tmp_path / "z.onnx"), _weights(tmp_path / "one.onnx")
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_zero1_checkpoints_resume_unsharded_and_back(tmp_path, digits_config):
    """A checkpoint of a sharded run holds the whole optimizer state: it resumes in one
    process, and one process's checkpoint resumes sharded, both equal to the straight run."""
    over = dict(precision="fp64", optimizer={"type": "adamw", "lr": 3e-3})
    ck = str(tmp_path / "ck")
    full = Trainer(config_from_dict(digits_config(steps=12, output=str(tmp_path / "f.onnx"),
                                                  **over), tmp_path), stream=io.StringIO())
    full.fit()
    # sharded on 2 ranks for 6 steps, then one process to 12
    raw = digits_config(steps=6, output=str(tmp_path / "a.onnx"), checkpoint={"dir": ck},
                        distributed={"shard_optimizer": True}, **over)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    proc = _launch(2, tmp_path / "a.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = Trainer(config_from_dict(digits_config(steps=12, output=str(tmp_path / "b.onnx"),
                                                 checkpoint={"dir": ck}, **over), tmp_path),
                  stream=io.StringIO())
    one.fit(resume=True)
    for k, v in full.trained_values().items():
        np.testing.assert_allclose(one.trained_values()[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    # one process to 6 steps, then sharded on 2 ranks to 12
    ck2 = str(tmp_path / "ck2")
    Trainer(config_from_dict(digits_config(steps=6, output=str(tmp_path / "c.onnx"),
                                           checkpoint={"dir": ck2}, **over), tmp_path),
            stream=io.StringIO()).fit()
    raw = digits_config(steps=12, output=str(tmp_path / "d.onnx"), checkpoint={"dir": ck2},
                        distributed={"shard_optimizer": True}, **over)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(raw))
    proc = _launch(2, tmp_path / "d.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _weights(tmp_path / "d.onnx")
    for k, v in full.trained_values().items():
        np.testing.assert_allclose(got[k], v.astype(np.float32), rtol=1e-6, atol=1e-7,
                                   err_msg=k)


@pytest.mark.parametrize("world", [3, 4])
def test_zero1_nadam_on_shards_of_one_element_checkpoints_its_group_state(tmp_path, world):
    """NAdam's mu product (one per group, shape (1,)) was taken for a per-element buffer on
    ranks whose shard holds 1 element (3 parameters on 3 or 4 ranks): on 4 ranks only some
    gathered it (the collectives parted: a hang), on 3 the checkpoint held it 3 times (a
    resume lost the optimizer state). Both now equal one process, checkpoint included."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(np.array([[0.3, -0.2]], np.float32), "W"),
                           numpy_helper.from_array(np.array([0.1], np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, t=(x @ [[1.0], [2.0]] + 0.5).astype(np.float32))

    def raw(name, **over):
        return {"model": "m.onnx", "device": "cpu", "precision": "fp64", "steps": 10,
                "output": f"{name}.onnx", "checkpoint": {"dir": f"ck_{name}", "every_steps": 5},
                "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                                   "targets": {"t": "t"}}, "batch_size": 12},
                "loss": {"type": "mse", "output": "y", "target": "t"},
                "optimizer": {"type": "nadam", "lr": 0.05}, **over}

    cfg = config_from_dict(raw("z", distributed={"shard_optimizer": True}), tmp_path)
    ranks = run_ranks(world, lambda c: Trainer(cfg, comm=c, stream=io.StringIO()).fit(),
                      timeout_s=60)
    assert len(ranks) == world
    one = Trainer(config_from_dict(raw("one"), tmp_path), stream=io.StringIO())
    one.fit()
    got = _weights(tmp_path / "z.onnx")
    for k, v in one.trained_values().items():
        np.testing.assert_allclose(got[k], v.astype(np.float32), rtol=1e-6, err_msg=k)
    ours = np.load(tmp_path / "ck_z" / "step_00000005" / "arrays.npz")
    theirs = np.load(tmp_path / "ck_one" / "step_00000005" / "arrays.npz")
    assert ours["optim/mu_product"].shape == (1,)
    for k in theirs.files:
        if k.startswith("optim/"):
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-9, err_msg=k)


# -- ZeRO-1 and the transformers under mpirun ------------------------------------------------------
@pytest.mark.parametrize("name,world", [("bn_cnn_inference", 2), ("resnet_inference", 4),
                                        ("ort_qdq_cnn", 2)])
def test_zero1_on_batchnorm_families_equals_emulated_ranks(zoo, tmp_path, name, world):
    """ZeRO-1 (reduce-scattered buckets, tiny so that tensors straddle the shards) on models
    with BatchNorm state: mpirun gives the emulated ranks' export, which equals the same job
    without sharding (the optimizer is element-wise)."""
    d = zoo[name]
    dist = {"shard_optimizer": True, "bucket_mb": 0.001}
    raw = family_config(d, name, output=str(tmp_path / "out.onnx"), distributed=dist)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(world, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _weights(tmp_path / "out.onnx")
    plain = _emulated({**raw, "distributed": {}}, world, tmp_path)[0]
    for k, want in plain.items():
        np.testing.assert_allclose(got[k], want.astype(np.float32), rtol=1e-6, atol=1e-7,
                                   err_msg=k)


@pytest.mark.parametrize("kind,dist", [("gpt", {}), ("gpt", {"shard_optimizer": True}),
                                       ("bert", {"bucket_mb": 0.01})])
def test_transformers_under_mpirun_equal_one_process(tmp_path, kind, dist):
    """A GPT decoder (LayerNorm, Gather embeddings, GELU, causal attention) and a BERT encoder
    with padding, exported by PyTorch: 2 processes with the same global batch give the weights
    of one process (fp64, AdamW), with DDP buckets and with ZeRO-1."""
    tm = pytest.importorskip("tests.transformer_models")
    pytest.importorskip("onnxscript")
    rng = np.random.default_rng(3)
    x = tm.sample_input(kind, 64, rng)
    y = tm.sample_target(kind, x, rng)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    onnx.save(tm.export(tm.make_model(kind, 3), x, "dynamo"), str(tmp_path / "model.onnx"))
    raw = {"model": str(tmp_path / "model.onnx"), "output": str(tmp_path / "np.onnx"),
           "device": "cpu", "precision": "fp64",
           "data": {"train": {"path": str(tmp_path / "data.npz"), "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": 16, "shuffle": True},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "adamw", "lr": 3e-3, "weight_decay": 0.01}, "steps": 5,
           "grad_clip": {"max_norm": 1.0}, "log": {"every_steps": 1}, "distributed": dist}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = _launch(2, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = Trainer(config_from_dict({**raw, "output": str(tmp_path / "one.onnx"),
                                       "distributed": {}}, tmp_path), stream=io.StringIO())
    single.fit()
    ours, ref = _weights(tmp_path / "np.onnx"), _weights(tmp_path / "one.onnx")
    moved = [k for k, v in ref.items() if not np.allclose(v, _weights(tmp_path / "model.onnx")[k])]
    assert moved
    for k, v in ref.items():
        np.testing.assert_allclose(ours[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
