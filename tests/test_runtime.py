"""The run around the steps: non-finite losses (stop naming the node, or skip), signals (stop
after the step, checkpoint, exit 130/143, exact resume), evaluation schedule, best model, early
stopping."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES, ROOT
from trainer.config import config_from_dict
from trainer.errors import TrainerError
from trainer.train import Trainer, best_path


def _sqrt_model(path):
    """logits = Sqrt(x @ W): NaN as soon as a sample makes x @ W negative."""
    w = numpy_helper.from_array(np.full((4, 3), 0.1, np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul1"),
         helper.make_node("Sqrt", ["h"], ["logits"], name="sqrt1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def _sqrt_run(tmp_path, on_nan, steps=6, **over):
    _sqrt_model(tmp_path / "m.onnx")
    x = np.abs(np.random.default_rng(0).standard_normal((48, 4))).astype(np.float32) + 0.5
    x[16:24] *= -1  # batch 3 (of 8 samples) makes x @ W negative
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(48, np.int64))
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": steps,
           "on_nan": on_nan, "optimizer": {"type": "sgd", "lr": 1e-3},
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "batch_size": 8, "shuffle": False},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "log": {"every_steps": 1}, **over}
    return Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_all_finite_finds_every_non_finite_gradient(dtype):
    from trainer.train import _all_finite
    big = np.finfo(dtype).max
    g = np.linspace(-3, 3, 1001).astype(dtype)
    assert _all_finite(g) and _all_finite(g[:0])
    g[500] = big  # its square overflows: checked element by element, still finite
    with np.errstate(over="ignore"):  # (the trainer's check leaves NumPy's warning on)
        assert _all_finite(g) and _all_finite(g.reshape(7, 143))
    for bad in (np.inf, -np.inf, np.nan):
        h = g.copy()
        h[17] = bad
        with np.errstate(over="ignore"):
            assert not _all_finite(h) and not _all_finite(h.reshape(7, 143))
    h = np.full(4, big, dtype)
    h[0] = -big  # a sum that cancels to zero, with a NaN the sum of squares keeps
    h[3] = np.nan
    with np.errstate(over="ignore"):
        assert not _all_finite(h)


def test_nan_stop_names_the_first_node(tmp_path):
    t = _sqrt_run(tmp_path, "stop")
    with pytest.raises(TrainerError) as err:
        t.fit()
    msg = str(err.value)
    assert "at step 3" in msg and "node 'sqrt1' (Sqrt)" in msg and "on_nan: skip" in msg
    assert t.step == 2  # the bad update was not applied


def test_nan_stop_on_ranks_names_the_node_another_rank_found(tmp_path):
    """Two ranks, the non-finite value from rank 1's half of batch 3: every rank's error names
    rank 1's node (rank 0, which prints it and ends the job, said "no value was non-finite on
    this rank")."""
    from trainer.comm.local import run_local

    cfg = _sqrt_run(tmp_path, "stop").cfg  # (writes the model and the data)
    x = np.load(tmp_path / "d.npz")["x"]
    x[16:20] *= -1  # (rank 0's half of batch 3 is finite again)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(48, np.int64))

    def job(comm):
        with pytest.raises(TrainerError) as err:
            Trainer(cfg, comm=comm, stream=io.StringIO()).fit()
        return str(err.value)
    for msg in run_local(2, job):
        assert "at step 3" in msg and "node 'sqrt1' (Sqrt) on rank 1" in msg, msg


def test_nan_skip_skips_and_counts(tmp_path):
    t = _sqrt_run(tmp_path, "skip")
    result = t.fit()
    assert result["steps"] == 6 and t.skipped == 1
    rows = [r for r in t.history if "loss" in r]
    assert not np.isfinite(rows[2]["loss"]) and rows[-1]["skipped_steps"] == 1
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)


def test_skipped_steps_count_on_after_a_resume(tmp_path):
    """The count of skipped updates is checkpointed (it restarted at 0 on --resume)."""
    ck = {"checkpoint": {"dir": str(tmp_path / "ck"), "every_steps": 1}}
    first = _sqrt_run(tmp_path, "skip", steps=4, **ck)
    first.fit()
    assert first.skipped == 1
    second = _sqrt_run(tmp_path, "skip", steps=6, **ck)
    second.fit(resume=True)
    assert second.skipped == 1 and second.history[-1]["skipped_steps"] == 1


def _digits_cfg(tmp_path, digits_config, **over):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(**over)))
    return path


def test_sigterm_stops_after_the_step_checkpoints_and_resumes_exactly(tmp_path, digits_config):
    ck = str(tmp_path / "ck")
    over = dict(steps=400, checkpoint={"dir": ck}, data__batch_size=64,
                log={"every_steps": 1}, optimizer={"type": "adamw", "lr": 1e-3})
    path = _digits_cfg(tmp_path, digits_config, output=str(tmp_path / "run.onnx"), **over)
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step 20/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    stopped_at = int(err.split("after step ")[1].split(";")[0])
    assert 20 <= stopped_at < 400
    from trainer import checkpoint
    assert checkpoint.latest(ck).name == f"step_{stopped_at:08d}"
    assert not (tmp_path / "run.onnx").exists()
    # --resume finishes the run; it equals an uninterrupted run bit for bit
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", str(path), "--resume"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    full = Trainer(config_from_dict(digits_config(output=str(tmp_path / "full.onnx"), **{
        **over, "checkpoint": {"dir": None}}), tmp_path), stream=io.StringIO())
    full.fit()
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "run.onnx")
           .graph.initializer}
    for k, v in full.trained_values().items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_sigterm_after_the_last_step_finishes_the_export(tmp_path, digits_config, monkeypatch):
    """A SIGTERM while the finished run wrote its checkpoint or export (a Slurm time limit at
    the end) killed the process in silence: no exported model, no message. It now completes
    the run's end and says so."""
    import trainer.train as tt

    real = tt.export_model

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # (the handler runs before the next bytecode)
        return real(*args, **kwargs)

    monkeypatch.setattr(tt, "export_model", signalled)
    outside = []  # (a signal no handler of the trainer's takes: recorded, not fatal to pytest)
    before = signal.signal(signal.SIGTERM, lambda *a: outside.append(a))
    try:
        _signalled_run(tmp_path, digits_config, outside)
    finally:
        signal.signal(signal.SIGTERM, before)


def _signalled_run(tmp_path, digits_config, outside):
    mine = signal.getsignal(signal.SIGTERM)
    log = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=3, output=str(tmp_path / "run.onnx"),
                                               checkpoint={"dir": str(tmp_path / "ck")}),
                                 tmp_path), stream=log)
    result = t.fit()
    assert result["steps"] == 3 and (tmp_path / "run.onnx").exists()
    onnx.checker.check_model(onnx.load(tmp_path / "run.onnx"))
    assert "received SIGTERM after the last step: finishing its evaluation, checkpoint and " \
        "export first" in log.getvalue(), log.getvalue()
    assert not outside and signal.getsignal(signal.SIGTERM) is mine


def test_second_sigint_stops_at_once(tmp_path, digits_config):
    path = _digits_cfg(tmp_path, digits_config, steps=10**6, log={"every_steps": 1})
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    # Pretend the step takes forever: two signals in a row end the process promptly.
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT)


def _anti_eval(tmp_path):
    """Train on the digits, evaluate on the same images with shifted labels: the better the
    model fits, the worse the eval metric, so it peaks at the first evaluation."""
    d = np.load(ROOT / "examples" / "digits.npz")
    np.savez(tmp_path / "anti.npz", x=d["x_test"], y=(d["y_test"] + 1) % 10)
    return {"path": str(tmp_path / "anti.npz"), "inputs": {"x": "x"}, "targets": {"label": "y"}}


def test_best_model_and_early_stopping(tmp_path, digits_config):
    raw = digits_config(steps=200, eval={"every_steps": 5, "every_epochs": 0},
                        best={"metric": "eval_loss"},
                        early_stop={"metric": "eval_loss", "patience": 3},
                        output=str(tmp_path / "final.onnx"),
                        log={"every_steps": 1, "metrics": str(tmp_path / "m.jsonl")})
    raw["data"]["eval"] = _anti_eval(tmp_path)
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    result = t.fit()
    assert result["steps"] == 20 and "did not improve" in result["early_stop"]
    assert result["best"]["step"] == 5
    best = best_path(tmp_path / "final.onnx")
    assert best == tmp_path / "final.best.onnx" and best.exists()
    evals = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()
             if "eval_loss" in x]
    assert [e["step"] for e in evals] == [5, 10, 15, 20]
    # The best file holds the weights after step 5.
    ref = Trainer(config_from_dict(digits_config(steps=5, output=str(tmp_path / "r.onnx")),
                                   tmp_path), stream=io.StringIO())
    ref.fit()
    got = {x.name: numpy_helper.to_array(x) for x in onnx.load(best).graph.initializer}
    for k, v in ref.trained_values().items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("change,goes_to,said", [
    ({"early_stop": None}, 40, "early_stop is off now: training goes on"),
    ({"early_stop": {"metric": "eval_loss", "patience": 5}}, 30,
     "with patience 5 now (3 evaluation(s) without improvement so far), training goes on"),
    ({"early_stop": {"metric": "eval_loss", "patience": 2}}, 20, "nothing to train (remove or "
     "relax early_stop to go on)"),
    ({"early_stop": {"metric": "eval_accuracy", "patience": 3}}, 40,
     "early_stop follows max eval_accuracy with min_delta 0 now (the checkpoint's: min "
     "eval_loss, min_delta 0.0): its count starts again; the checkpoint's run had stopped "
     "early"),
    ({"early_stop": {"metric": "eval_loss", "patience": 3, "min_delta": 1e-9}}, 40,
     "its count starts again; the checkpoint's run had stopped early"),
])
def test_a_resume_with_early_stop_removed_or_relaxed_goes_on(tmp_path, digits_config, change,
                                                             goes_to, said):
    """A run that had stopped early stayed stopped whatever the resume's early_stop said,
    naming a criterion the user had just removed; only the same criterion keeps it stopped."""
    raw = digits_config(steps=30, eval={"every_steps": 5, "every_epochs": 0},
                        early_stop={"metric": "eval_loss", "patience": 3},
                        checkpoint={"dir": str(tmp_path / "ck")},
                        output=str(tmp_path / "final.onnx"))
    raw["data"]["eval"] = _anti_eval(tmp_path)
    first = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    assert first["steps"] == 20 and "did not improve" in first["early_stop"]
    out = io.StringIO()
    t = Trainer(config_from_dict({**raw, "steps": 40, **change}, tmp_path), stream=out)
    result = t.fit(resume=True)
    assert result["steps"] == goes_to and said in out.getvalue(), out.getvalue()


def test_the_gradient_norm_is_logged_with_grad_clip(tmp_path, digits_config):
    """grad_clip: each metrics row carries grad_norm, the last update's norm before clipping
    (the norm of the batch's gradient, onnxruntime running the training graph here)."""
    import onnxruntime as ort

    from trainer.autodiff import build_training_graph, training_info

    raw = digits_config(steps=1, grad_clip={"max_norm": 0.01},
                        data__shuffle=False, output=str(tmp_path / "o.onnx"))
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    tm = build_training_graph(onnx.load(EXAMPLES / "digits_mlp.onnx"),
                              {"type": "cross_entropy", "output": "logits", "target": "label"},
                              batch_size=32)
    d = np.load(EXAMPLES / "digits.npz")
    grads = ort.InferenceSession(tm.SerializeToString()).run(
        list(training_info(tm).gradients.values()),
        {"x": d["x_train"][:32], "label": d["y_train"][:32]})
    want = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)))
    (row,) = [r for r in t.history if "loss" in r]
    assert row["grad_norm"] == pytest.approx(want, rel=1e-5) and want > 0.01
    plain = Trainer(config_from_dict(digits_config(steps=1, output=str(tmp_path / "p.onnx")),
                                     tmp_path), stream=io.StringIO())
    plain.fit()
    assert "grad_norm" not in plain.history[0]
    # a step skipped before its clipping (on_nan: skip) logs no norm (it repeated the last)
    t = _sqrt_run(tmp_path, "skip", grad_clip={"max_norm": 1.0})
    t.fit()
    rows = [r for r in t.history if "loss" in r]
    assert ["grad_norm" in r for r in rows] == [True, True, False, True, True, True]


def test_samples_per_s_leaves_out_evaluations_and_checkpoints(tmp_path, digits_config,
                                                             monkeypatch):
    """The row after an evaluation or a checkpoint counted its time as training time (a
    throughput many times too low). On a clock that only evaluations and checkpoints move
    (by 1000 s each), every row's samples_per_s is the same."""
    import trainer.train as tt

    now = [0.0]

    class Clock:
        @staticmethod
        def perf_counter():
            now[0] += 1e-3
            return now[0]

    real_eval, real_save = tt.Trainer._evaluate_and_track, tt.Trainer.save_checkpoint

    def slow(real):
        def call(self, *a, **k):
            now[0] += 1000.0
            return real(self, *a, **k)
        return call

    monkeypatch.setattr(tt, "time", Clock)
    monkeypatch.setattr(tt.Trainer, "_evaluate_and_track", slow(real_eval))
    monkeypatch.setattr(tt.Trainer, "save_checkpoint", slow(real_save))
    raw = digits_config(steps=12, log={"every_steps": 2}, eval={"every_steps": 4},
                        checkpoint={"dir": str(tmp_path / "ck"), "every_steps": 6},
                        output=str(tmp_path / "o.onnx"))
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    rates = [r["samples_per_s"] for r in t.history if "loss" in r]
    assert len(rates) == 6 and max(rates) < 2 * min(rates), rates


def test_an_eval_schedule_without_eval_data_is_warned_of(tmp_path, digits_config):
    """(it was accepted, and nothing was evaluated, without a word)"""
    cfg = digits_config(steps=2, eval={"every_steps": 1})
    cfg["data"].pop("eval")
    out = io.StringIO()
    Trainer(config_from_dict(cfg, tmp_path), stream=out).fit()
    assert "warning: eval.every_steps sets when to evaluate, but there is no data.eval: " \
        "nothing is evaluated" in out.getvalue()


def test_best_and_early_stop_need_an_eval_set_and_a_known_metric(tmp_path, digits_config):
    """Refused by the config itself (so `check CONFIG` says so too, which passed them)."""
    raw = digits_config(best={"metric": "eval_accuracy"})
    del raw["data"]["eval"]
    with pytest.raises(TrainerError, match="'best' needs data.eval"):
        config_from_dict(raw, tmp_path)
    with pytest.raises(TrainerError, match="'early_stop.metric' is 'eval_f1', which is not an "
                                           "evaluation metric"):
        config_from_dict(digits_config(early_stop={"metric": "eval_f1", "patience": 2}),
                         tmp_path)
    with pytest.raises(TrainerError, match="did you mean 'eval_loss'"):
        config_from_dict(digits_config(best={"metric": "eval_los"}), tmp_path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_train_in_float32_and_export_in_their_type(tmp_path,
                                                                        digits_config, dtype):
    """A float16/bfloat16 model trains with float32 master weights and compute, and the export
    keeps the model's own type (the float32 values rounded once)."""
    import ml_dtypes

    from trainer.graph import convert_floats

    half = np.dtype(np.float16) if dtype == "float16" else np.dtype(ml_dtypes.bfloat16)
    model = convert_floats(onnx.load(ROOT / "examples" / "digits_mlp.onnx"), np.float32, half)
    onnx.save(model, tmp_path / "half.onnx")
    t = Trainer(config_from_dict(digits_config(model=str(tmp_path / "half.onnx"), steps=30,
                                               output=str(tmp_path / "o.onnx")), tmp_path),
                stream=io.StringIO())
    assert t.dtype == np.float32
    result = t.fit()
    losses = [r["loss"] for r in t.history if "loss" in r]
    assert losses[-1] < losses[0] and result["eval_accuracy"] > 0.5
    out = onnx.load(result["output"])
    for init in out.graph.initializer:
        assert init.data_type == onnx.helper.np_dtype_to_tensor_dtype(half), init.name
    got = {x.name: numpy_helper.to_array(x) for x in out.graph.initializer}
    for k, v in t.trained_values().items():
        np.testing.assert_array_equal(got[k], v.astype(half), err_msg=k)
    assert out.graph.input[0].type.tensor_type.elem_type == \
        model.graph.input[0].type.tensor_type.elem_type


def test_a_float16_models_values_beyond_its_range_are_warned_of_at_export(tmp_path,
                                                                            digits_config):
    """A float16 model trains float32 copies: a trained value past 65504 was exported as inf
    with exit code 0 (NumPy's RuntimeWarning only) while the run's evaluation, of the float32
    values, was fine. The export says which tensors and how many values."""
    from trainer.export import beyond_range
    from trainer.graph import convert_floats

    model = convert_floats(onnx.load(ROOT / "examples" / "digits_mlp.onnx"), np.float32,
                           np.float16)
    onnx.save(model, tmp_path / "half.onnx")
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(model=str(tmp_path / "half.onnx"), steps=1,
                                               output=str(tmp_path / "o.onnx")), tmp_path),
                stream=out)
    t.fit()
    assert "warning" not in out.getvalue()
    name = sorted(t.trained_values())[0]
    t.params[name][:3] = np.array([7e4, -1e6, 6e4], np.float32)  # (60000 fits)
    assert beyond_range(model, t.trained_values()) == {name: 2}
    t.export(tmp_path / "o.onnx")
    assert f"2 trained value(s) of {name} lie beyond the range of the model's own type " \
        "(float16) and are written as inf" in out.getvalue()
    got = {x.name: numpy_helper.to_array(x)
           for x in onnx.load(tmp_path / "o.onnx").graph.initializer}
    assert np.isinf(got[name]).sum() == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_float32_models_own_rounding_to_16_bits_is_kept(tmp_path, dtype):
    """A float32 model with a deliberate rounding, `h.half().float()`: the engine computes
    16-bit types in float32, and this Cast became float32 to float32, dropped in silence
    (losses 1e-3 off PyTorch's at step 1, 0.4 after 8 steps). It rounds as the model does,
    forward and backward (PyTorch rounds the Cast's gradient too)."""
    torch = pytest.importorskip("torch")
    half = getattr(torch, dtype)

    class Rounded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2((torch.relu(self.fc1(x)) * 37.0).to(half).to(torch.float32))

    torch.manual_seed(0)
    net = Rounded()
    torch.onnx.export(net, (torch.zeros(2, 6),), str(tmp_path / "m.onnx"),
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 6)).astype(np.float32), rng.integers(0, 3, 32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = {"model": str(tmp_path / "m.onnx"), "output": str(tmp_path / "o.onnx"),
           "device": "cpu", "steps": 4,
           "data": {"train": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": 8, "shuffle": False},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.01}, "log": {"every_steps": 1}}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    ours = [r["loss"] for r in t.history if "loss" in r]
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    theirs = []
    for i in range(4):
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[8 * i:8 * i + 8])),
                                                 torch.from_numpy(y[8 * i:8 * i + 8]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)
    got = t.trained_values()
    for name, p in net.named_parameters():
        np.testing.assert_allclose(got[name], p.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("like,listed", [(False, False), (True, False), (False, True)])
def test_a_float32_models_16_bit_region_computes_as_float16_arithmetic(like, listed):
    """`relu(h.half() * w.half() + 1).float()` as the exporters write it: the 16-bit constants
    and the weight cast inside the region are float16 initializers, which made the model look
    like a float16 one, so the region's
    rounding was dropped (its Cast became float32 to float32); the region's other nodes also
    computed in float32 unrounded. Each now rounds its result to float16, which is float16
    arithmetic (NumPy's, correctly rounded) to the bit; the same with a CastLike, and where
    the model lists its initializers as graph inputs too, as models of IR version 3 do (their
    float16 constants made the inputs look 16-bit)."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.executor import Executor
    from trainer.train import compute_form

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    to16 = helper.make_node("CastLike", ["h", "c"], ["h16"]) if like else \
        helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), to16,
         helper.make_node("Mul", ["h16", "c"], ["m"]),
         helper.make_node("Add", ["m", "one"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, "W"),
         # (a weight cast inside the region, `h * self.w.half()`: float16 too, as a vector)
         numpy_helper.from_array(np.linspace(0.1, 0.8, 8).astype(np.float16), "c"),
         numpy_helper.from_array(np.array(1.0, np.float16), "one")])
    if listed:
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in g.initializer)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = (rng.standard_normal((16, 6)) * 3).astype(np.float32)
    got = Executor(compute_form(model, "fp32"), np).run({"x": x})["y"]
    h16, c = (x @ w).astype(np.float16), np.linspace(0.1, 0.8, 8).astype(np.float16)
    want = np.maximum(h16 * c + np.float16(1.0), np.float16(0)).astype(np.float32)
    assert not np.array_equal(want, np.maximum(x @ w * c.astype(np.float32) + 1, 0))
    np.testing.assert_array_equal(got, want)


def test_float64_runs_widen_cast_1s_named_types():
    """Cast-1 (opsets 1-5) names its type as a string: `precision: fp64` left a Cast "FLOAT"
    as it was, so the verification run rounded to float32 there."""
    from onnx import TensorProto, helper

    from trainer.executor import Executor
    from trainer.graph import to_float64

    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to="FLOAT")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    m = to_float64(helper.make_model(g, opset_imports=[helper.make_opsetid("", 5)],
                                     ir_version=3))
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.node[0].attribute[0].s == b"DOUBLE"
    x = np.array([0.1, 1 / 3, 1e-300])
    np.testing.assert_array_equal(Executor(m, np).run({"x": x})["y"], x)


def test_a_long_runs_history_keeps_its_latest_rows_and_the_file_all(tmp_path, monkeypatch):
    """Trainer.history held every row of the run (about 300 bytes each: 10 MB at every step
    over 40,000 steps, found by a resource sweep); it keeps the latest HISTORY_ROWS to
    2 x HISTORY_ROWS now, and log.metrics every row."""
    import json

    from trainer import train as train_mod

    monkeypatch.setattr(train_mod, "HISTORY_ROWS", 4)
    t = _sqrt_run(tmp_path, "skip", steps=30, log={"every_steps": 1,
                                                   "metrics": str(tmp_path / "m.jsonl")})
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert 4 <= len(t.history) < 8
    assert [r["step"] for r in t.history] == [r["step"] for r in rows[-len(t.history):]]


def test_metrics_rows_are_strict_json(tmp_path):
    """A skipped step's NaN loss is null in the metrics file (bare NaN is not JSON: jq and
    JSON.parse refuse the file); the run's history keeps the value."""
    import json

    t = _sqrt_run(tmp_path, "skip", log={"every_steps": 1, "metrics": str(tmp_path / "m.jsonl")})
    t.fit()

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    rows = [json.loads(line, parse_constant=refuse)
            for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[2] is None and all(v is not None for i, v in enumerate(losses) if i != 2)
    assert not np.isfinite([r["loss"] for r in t.history if "loss" in r][2])


def test_early_stop_on_a_metric_never_finite_stops_and_says_so(tmp_path, digits_config):
    """An evaluation whose metric is NaN at every evaluation (its inputs overflow) counts
    toward early_stop.patience; the stop says the metric was not finite (it failed as an
    internal error formatting the best value, which there was none of)."""
    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "ev.npz", x=d["x_test"] * 3e38, y=d["y_test"])
    raw = digits_config(steps=50, eval={"every_steps": 5, "every_epochs": 0},
                        early_stop={"metric": "eval_loss", "patience": 2},
                        output=str(tmp_path / "final.onnx"))
    raw["data"]["eval"] = {"path": str(tmp_path / "ev.npz"), "inputs": {"x": "x"},
                           "targets": {"label": "y"}}
    result = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    assert result["steps"] == 10
    assert result["early_stop"] == "eval_loss was not finite at 2 evaluation(s) in a row"
    assert (tmp_path / "final.onnx").exists()


def test_a_fixed_batch_model_evaluates_a_set_of_any_size(tmp_path):
    """A model exported at a fixed batch (TorchScript bakes `reshape(8, ...)`) trains on
    batches of that size; its evaluation set need not be a multiple of it: the last chunk runs
    padded with copies of its last sample, whose outputs are left out. The metrics are
    PyTorch's over the 13 samples (it failed at the first evaluation, in the Reshape)."""
    torch = pytest.importorskip("torch")

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(8, 64))

    torch.manual_seed(0)
    net = Fixed()
    torch.onnx.export(net, (torch.zeros(8, 1, 4, 4),), str(tmp_path / "m.onnx"),
                      input_names=["x"], output_names=["logits"], dynamo=False,
                      opset_version=17)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((13, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 13)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 1, 4, 4)).astype(np.float32),
             y=rng.integers(0, 3, 32), xe=x, ye=y)
    t = Trainer(config_from_dict({
        "model": "m.onnx", "output": "o.onnx",
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "eval": {"path": "d.npz", "inputs": {"x": "xe"}, "targets": {"label": "ye"}},
                 "batch_size": 8},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 1}, tmp_path), stream=io.StringIO())
    got = t.evaluate()
    logits = torch.cat([net(torch.from_numpy(np.concatenate([x[8:], x[12:13].repeat(3, 0)])))[:5]
                        if k else net(torch.from_numpy(x[:8])) for k in (0, 1)])
    want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert got["eval_accuracy"] == pytest.approx(
        float((logits.argmax(1).numpy() == y).mean()))


def test_evaluating_non_finite_outputs_gives_nan_without_a_numpy_warning():
    """Outputs of inf (a run gone bad under on_nan: skip) made the evaluation loss print
    NumPy's 'invalid value encountered in subtract'; the loss is NaN, and nothing else."""
    import warnings

    from trainer.config import config_from_dict
    from trainer.train import _loss_sums

    spec = config_from_dict({"model": "m.onnx", "steps": 1, "data": {"train": {
        "path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}}},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}, "/tmp").loss
    out = np.array([[np.inf, 1.0, 0.0], [0.0, 1.0, 2.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sums = _loss_sums(spec, out, np.array([0, 2]), 2)
    assert np.isnan(sums[0])


def test_folding_the_models_constants_prints_no_numpy_warnings():
    """T5's relative-position buckets take the log of 0 and cast -inf, values a Where then
    discards: folding them when the training graph is built printed 80 RuntimeWarnings a run
    (found by a fine-tuning sweep)."""
    import warnings

    from trainer.autodiff import build_training_graph

    g = helper.make_graph(
        [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
            np.zeros((2, 2), np.float32))),
         helper.make_node("Log", ["zero"], ["lg"]),
         helper.make_node("Cast", ["lg"], ["li"], to=TensorProto.INT64),
         helper.make_node("Cast", ["li"], ["lf"], to=TensorProto.FLOAT),
         helper.make_node("Where", ["keep", "w", "lf"], ["sel"]),
         helper.make_node("MatMul", ["x", "sel"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.ones((2, 2), bool), "keep"),
         numpy_helper.from_array(np.ones((2, 2), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_training_graph(model, {"type": "cross_entropy", "output": "logits",
                                     "target": "label"}, batch_size=2)
    assert not [w for w in seen if w.category is RuntimeWarning], [str(w.message) for w in seen]
