"""Training trajectories against PyTorch: models exported with torch.onnx.export, trained by the
engine and by torch.optim from the same initial weights and batches (per-step loss, final weights,
BatchNormalization running statistics, exported model)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from tests.torch_models import (  # noqa: E402
    SAMPLE_SHAPES,
    export_onnx,
    initializers,
    make_model,
    torch_from_values,
    train_torch,
)
from trainer.config import config_from_dict  # noqa: E402
from trainer.train import Trainer  # noqa: E402

STEPS, BATCH = 20, 16
# MLP: 320 samples, the 20 steps are one epoch. CNN: 200 samples = 12 full batches (drop_last),
# so steps 13..20 wrap around to sample 0 of epoch 2.
SAMPLES = {"mlp": 320, "cnn": 200}
OPTIMIZERS = {"sgd": {"type": "sgd", "lr": 0.1},
              "adamw": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.01}}
TORCH_DTYPE = {"fp64": torch.float64, "fp32": torch.float32}
KINDS = ("mlp", "cnn")

# Max errors seen per case, printed at the end of the module (visible with -s / -rA).
OBSERVED: dict[str, dict[str, float]] = {}


def rel(a, b) -> float:
    """Max abs difference relative to the reference tensor's max magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def rel_each(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per model kind: the exported ONNX file, its initial values and a dataset (.npz)."""
    out = {}
    for i, kind in enumerate(KINDS):
        d = tmp_path_factory.mktemp(kind)
        proto = export_onnx(make_model(kind, seed=10 + i), kind)
        onnx.save(proto, str(d / "model.onnx"))
        rng = np.random.default_rng(100 + i)
        n = SAMPLES[kind]
        x = rng.standard_normal((n,) + SAMPLE_SHAPES[kind]).astype(np.float32)
        y = rng.integers(0, 10, n).astype(np.int64)
        np.savez(d / "data.npz", x=x, y=y)
        out[kind] = {"dir": d, "proto": proto, "init": initializers(proto), "x": x, "y": y}
    return out


@pytest.fixture(scope="module")
def runs(setups):
    """run(kind, opt, precision) -> (engine Trainer, torch losses, torch model); memoized."""
    cache = {}

    def run(kind, opt, precision):
        key = (kind, opt, precision)
        if key not in cache:
            s = setups[kind]
            d = s["dir"]
            cfg = config_from_dict({
                "model": "model.onnx", "output": f"out_{opt}_{precision}.onnx",
                "precision": precision, "device": "cpu",
                "data": {"train": {"path": "data.npz", "inputs": {"x": "x"},
                                   "targets": {"label": "y"}},
                         "batch_size": BATCH, "shuffle": False, "drop_last": True},
                "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
                "optimizer": dict(OPTIMIZERS[opt]),
                "steps": STEPS, "log": {"every_steps": 1},
            }, base_dir=d)
            trainer = Trainer(cfg, stream=io.StringIO())
            result = trainer.fit()
            losses, model = train_torch(kind, s["init"], s["x"], s["y"],
                                        optimizer=OPTIMIZERS[opt], steps=STEPS, batch=BATCH,
                                        dtype=TORCH_DTYPE[precision])
            cache[key] = (trainer, result, losses, model)
        return cache[key]
    return run


def torch_values(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


CASES = [(k, o, p) for k in KINDS for o in OPTIMIZERS for p in ("fp64", "fp32")]


@pytest.mark.parametrize("kind,opt,precision", CASES,
                         ids=[f"{k}-{o}-{p}" for k, o, p in CASES])
def test_trajectory_matches_torch(runs, setups, kind, opt, precision):
    trainer, result, t_losses, t_model = runs(kind, opt, precision)
    init = setups[kind]["init"]
    rows = [r for r in trainer.history if "step" in r and "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    e_losses = np.array([r["loss"] for r in rows])
    t_losses = np.array(t_losses)
    assert result["steps"] == STEPS

    e_vals = trainer.trained_values()
    t_vals = torch_values(t_model)
    # Every trained parameter and every BatchNormalization running statistic, nothing else.
    assert set(e_vals) == set(t_vals), (sorted(e_vals), sorted(t_vals))
    assert set(e_vals) == set(init)
    want_dtype = np.float64 if precision == "fp64" else np.float32
    for k, v in e_vals.items():
        assert v.dtype == want_dtype and v.shape == init[k].shape, (k, v.dtype, v.shape)
    # The test means something only if the weights (and BN statistics) really moved.
    for k in e_vals:
        assert rel(t_vals[k], init[k]) > 1e-4, f"{k} barely moved in torch"

    loss_err = rel_each(e_losses, t_losses)
    w_err = {k: rel(e_vals[k], t_vals[k]) for k in e_vals}
    upd_err = {k: float(np.max(np.abs(e_vals[k] - t_vals[k]))
                        / np.max(np.abs(t_vals[k] - init[k]))) for k in e_vals}
    OBSERVED[f"{kind}-{opt}-{precision}"] = {
        "loss": float(loss_err.max()), "loss[:3]": float(loss_err[:3].max()),
        "tensor": max(w_err.values()), "tensor/update": max(upd_err.values())}

    if precision == "fp64" or kind == "mlp":
        tol = 1e-8 if precision == "fp64" else 1e-4
        bad = {s + 1: (e_losses[s], t_losses[s]) for s in np.flatnonzero(loss_err > tol)}
        assert not bad, f"per-step losses differ beyond {tol} (step: engine, torch): {bad}"
        bad = {k: e for k, e in w_err.items() if e > tol}
        assert not bad, f"final tensors differ beyond {tol} relative: {bad}"
    else:
        # float32 CNN: rounding flips ReLU/MaxPool decisions, so two correct float32 runs drift
        # apart; the first losses still agree, and the weights agree relative to their update.
        assert loss_err[:3].max() <= 1e-4, (e_losses[:3], t_losses[:3])
        bad = {k: e for k, e in upd_err.items() if e > 0.1}
        assert not bad, f"final tensors differ beyond 0.1 of their update: {bad}"

    # The exported file holds exactly the trained values, cast to the model's float32.
    exported = initializers(onnx.load(result["output"]))
    for k, v in e_vals.items():
        np.testing.assert_array_equal(exported[k], v.astype(np.float32), err_msg=k)


@pytest.mark.parametrize("kind,opt", [(k, o) for k in KINDS for o in OPTIMIZERS])
def test_export_matches_torch(runs, setups, kind, opt):
    """The exported model (of the fp64 run) is the input model with torch's trained values:
    same graph and initializer names/dtypes/shapes, BN running stats as torch's, and onnxruntime
    gives the outputs of torch in inference mode."""
    trainer, result, _, t_model = runs(kind, opt, "fp64")
    src = setups[kind]["proto"]
    out = onnx.load(result["output"])
    onnx.checker.check_model(out)

    def sig(t):
        return t.name, t.data_type, tuple(t.dims)
    assert [sig(t) for t in out.graph.initializer] == [sig(t) for t in src.graph.initializer]
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in src.graph.node]
    assert out.graph.input == src.graph.input and out.graph.output == src.graph.output
    assert [(o.domain, o.version) for o in out.opset_import] == \
        [(o.domain, o.version) for o in src.opset_import]
    bn = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn) == (1 if kind == "cnn" else 0)

    got = initializers(out)
    t_vals = torch_values(t_model)
    init = setups[kind]["init"]
    for k, v in t_vals.items():
        assert got[k].dtype == np.float32
        assert rel(got[k], v) < 1e-6, k
    for n in bn:  # running stats: torch's momentum-0.1 update with the unbiased batch variance
        for name in n.input[3:5]:
            assert rel(got[name], t_vals[name]) < 1e-6, name
            assert rel(got[name], init[name]) > 1e-3, f"{name} was not updated"

    # onnxruntime on the exported model == the torch model (float32, eval mode), on fresh inputs.
    x = np.random.default_rng(7).standard_normal((24,) + SAMPLE_SHAPES[kind]).astype(np.float32)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"x": x})
    ref_model = torch_from_values(kind, {k: v.astype(np.float32) for k, v in t_vals.items()},
                                  torch.float32).train(False)  # inference mode
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    assert logits.shape == ref.shape == (24, 10)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def teardown_module(module):
    if OBSERVED:
        print("\nmax relative errors (losses per step; tensors vs torch; tensors vs update):")
        for case, errs in sorted(OBSERVED.items()):
            print(f"  {case:18s} " + "  ".join(f"{k}={v:.2e}" for k, v in errs.items()))
