"""GPT decoders (tied, untied), a BERT encoder with a padding mask, an LSTM classifier and a
ResNet, exported by both PyTorch exporters, trained by the engine and by torch.optim (SGD, AdamW)
from the same weights and batches: per-step losses, final weights, the exported model."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

from tests.transformer_models import (  # noqa: E402
    export,
    make_model,
    reference_forms,
    sample_input,
    sample_target,
    sources,
    train_torch,
)
from trainer.config import config_from_dict  # noqa: E402
from trainer.errors import UnsupportedOpError  # noqa: E402
from trainer.train import Trainer  # noqa: E402

STEPS, BATCH = 20, 8
SAMPLES = STEPS * BATCH  # one epoch: every step sees new samples
OPTIMIZERS = {"sgd": {"type": "sgd", "lr": 0.1},
              "adamw": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.01}}
TORCH_DTYPE = {"fp64": torch.float64, "fp32": torch.float32}
KINDS = ("gpt", "gpt_tied", "bert", "lstm", "resnet")
EXPORTERS = ("dynamo", "torchscript")
# Exports without constant folding: the tied weight stays one initializer (Gather + Transpose).
NOFOLD = ("dynamo-nofold", "torchscript-nofold")
SEED = {k: 20 + i for i, k in enumerate(KINDS)}

OBSERVED: dict[str, dict[str, float]] = {}


def rel(a, b) -> float:
    """Max abs difference relative to the reference tensor's max magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def match_forms(inits: dict[str, np.ndarray], forms: dict[str, np.ndarray]) -> dict[str, str]:
    """{ONNX initializer: the one torch form (reference_forms key) it equals at step 0}."""
    out = {}
    for name, v in inits.items():
        hits = [k for k, f in forms.items() if f.shape == v.shape and np.array_equal(f, v)]
        assert len(hits) == 1, f"initializer {name} {v.shape} equals torch forms {hits}"
        out[name] = hits[0]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """get(kind, exporter) -> {dir, proto, init}: the exported model and its dataset; memoized."""
    cache = {}

    def get(kind, exporter):
        if (kind, exporter) not in cache:
            d = tmp_path_factory.mktemp(f"{kind}_{exporter}")
            rng = np.random.default_rng(SEED[kind])
            x = sample_input(kind, SAMPLES, rng)
            y = sample_target(kind, x, rng)
            np.savez(d / "data.npz", x=x, y=y)
            proto = export(make_model(kind, SEED[kind]), x, exporter.split("-")[0],
                           fold=not exporter.endswith("-nofold"))
            onnx.save(proto, str(d / "model.onnx"))
            init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
            cache[kind, exporter] = {"dir": d, "proto": proto, "init": init, "x": x, "y": y}
        return cache[kind, exporter]
    return get


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: torch's thread pool only adds overhead (and spins on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_runs(exported):
    """run(kind, opt, precision) -> (losses, reference_forms of the trained model, parameter
    and buffer names); the same for every exporter, so memoized without it."""
    cache = {}

    def run(kind, opt, precision):
        if (kind, opt, precision) not in cache:
            s = exported(kind, EXPORTERS[0])
            model = make_model(kind, SEED[kind])
            losses = train_torch(model, s["x"], s["y"], optimizer=OPTIMIZERS[opt], steps=STEPS,
                                 batch=BATCH, dtype=TORCH_DTYPE[precision])
            names = {k for k, _ in model.named_parameters()}
            names |= {k for k, _ in model.named_buffers() if not k.endswith("num_batches_tracked")}
            cache[kind, opt, precision] = (np.array(losses), reference_forms(model), names, model)
        return cache[kind, opt, precision]
    return run


@pytest.fixture(scope="module")
def engine_runs(exported):
    """run(kind, exporter, opt, precision) -> (Trainer after fit, fit's result); memoized."""
    cache = {}

    def run(kind, exporter, opt, precision):
        key = (kind, exporter, opt, precision)
        if key not in cache:
            cache[key] = train_engine(exported(kind, exporter), opt, precision)
        return cache[key]
    return run


def train_engine(s: dict, opt: str, precision: str) -> tuple[Trainer, dict]:
    cfg = config_from_dict({
        "model": "model.onnx", "output": f"out_{opt}_{precision}.onnx",
        "precision": precision, "device": "cpu",
        "data": {"train": {"path": "data.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": BATCH, "shuffle": False, "drop_last": True},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": dict(OPTIMIZERS[opt]), "steps": STEPS, "log": {"every_steps": 1},
    }, base_dir=s["dir"])
    trainer = Trainer(cfg, stream=io.StringIO())
    return trainer, trainer.fit()


# Constant folding stores the tied output projection as a transposed copy of the embedding;
# the engine ties them again (trainer.autodiff.params.tie_folded_copies).
# Without its optimizer the dynamo exporter writes torch.split as SplitToSequence + SequenceAt:
# the builder lowers static sequences to plain nodes first (trainer.autodiff.subgraph).
CASES = [pytest.param(k, e, o, p, id=f"{k}-{e}-{o}-{p}")
         for k in KINDS for e in EXPORTERS for o in OPTIMIZERS for p in ("fp64", "fp32")
         if k != "gpt_tied" or p == "fp64"]
CASES += [pytest.param("gpt_tied", e, o, p, id=f"gpt_tied-{e}-{o}-{p}")
          for e in NOFOLD for o in OPTIMIZERS for p in ("fp64", "fp32")]


@pytest.mark.parametrize("kind,exporter,opt,precision", CASES)
def test_trajectory_matches_torch(exported, engine_runs, torch_runs, kind, exporter, opt,
                                  precision):
    s = exported(kind, exporter)
    step0 = reference_forms(make_model(kind, SEED[kind]))
    trainer, _ = engine_runs(kind, exporter, opt, precision)
    t_losses, t_final, t_names, _ = torch_runs(kind, opt, precision)
    e_vals = trainer.trained_values()
    forms = match_forms({k: s["init"][k] for k in e_vals}, step0)
    # The engine trains every torch parameter (and BatchNorm statistic), in some form.
    covered = {src for f in forms.values() for src in sources(f)}
    assert covered == t_names, (sorted(t_names - covered), sorted(covered - t_names))

    rows = [r for r in trainer.history if "step" in r and "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    e_losses = np.array([r["loss"] for r in rows])
    want_dtype = np.float64 if precision == "fp64" else np.float32
    for k, v in e_vals.items():
        assert v.dtype == want_dtype and v.shape == s["init"][k].shape, (k, v.dtype, v.shape)
        assert rel(t_final[forms[k]], step0[forms[k]]) > 1e-4, f"{k} barely moved in torch"

    def upd(a, b, f):  # max |a - b| relative to the (float64) update of form f
        return float(np.max(np.abs(np.asarray(a, np.float64) - b))
                     / np.max(np.abs(exact[f] - step0[f])))

    exact = torch_runs(kind, opt, "fp64")[1]
    loss_err = np.abs(e_losses - t_losses) / np.abs(t_losses)
    w_err = {k: rel(e_vals[k], t_final[forms[k]]) for k in e_vals}
    upd_err = {k: upd(e_vals[k], t_final[forms[k]], forms[k]) for k in e_vals}
    # How far float32 rounding alone takes torch from its float64 run, relative to the update.
    floor = max(upd(t_final[f], exact[f], f) for f in forms.values())
    OBSERVED[f"{kind}-{exporter}-{opt}-{precision}"] = {
        "loss": float(loss_err.max()), "tensor": max(w_err.values()),
        "tensor/update": max(upd_err.values()), "torch32/update": floor}

    tol = 1e-8 if precision == "fp64" else 1e-4
    bad = {i + 1: (e_losses[i], t_losses[i]) for i in np.flatnonzero(loss_err > tol)}
    assert not bad, f"per-step losses differ beyond {tol} (step: engine, torch): {bad}"
    if precision == "fp64":  # relative to the tensor and (stricter: updates are small) its update
        bad = {k: (forms[k], e, upd_err[k]) for k, e in w_err.items()
               if max(e, upd_err[k]) > tol}
    else:
        # Float32 AdamW normalizes each gradient element, so elements whose gradient is mostly
        # rounding take rounding-sized different steps in any two float32 runs: where torch's
        # own float32 run is further than 1e-4 of the update from its float64 run, agreeing
        # within twice that distance is agreeing to float32 precision.
        tol = max(tol, 2 * floor)
        bad = {k: (forms[k], e) for k, e in upd_err.items() if e > tol}
    assert not bad, f"final tensors differ beyond {tol:.2g} (name: torch form, errors): {bad}"


EXPORT_CASES = [(k, e) for k in KINDS for e in EXPORTERS]
EXPORT_CASES += [("gpt_tied", "torchscript-nofold")]


@pytest.mark.parametrize("kind,exporter", EXPORT_CASES, ids=[f"{k}-{e}" for k, e in EXPORT_CASES])
def test_exported_model_runs_like_trained_torch(exported, engine_runs, torch_runs, kind,
                                                exporter):
    """The exported model of the float64 SGD run: the source graph with the trained values
    (float32), and onnxruntime gives the trained torch model's outputs (eval mode) on new data."""
    ort = pytest.importorskip("onnxruntime")
    s = exported(kind, exporter)
    trainer, result = engine_runs(kind, exporter, "sgd", "fp64")
    out = onnx.load(result["output"])
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in s["proto"].graph.node]
    got = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert got.keys() == s["init"].keys()
    for k, v in trainer.trained_values().items():
        np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)

    x = sample_input(kind, 16, np.random.default_rng(99))
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"x": x})
    model = make_model(kind, SEED[kind]).to(torch.float64).eval()
    model.load_state_dict(torch_runs(kind, "sgd", "fp64")[3].state_dict())
    with torch.no_grad():
        xt = torch.from_numpy(x)
        ref = model(xt.double() if xt.is_floating_point() else xt).numpy()
    assert logits.shape == ref.shape
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_split_to_sequence_on_the_gradient_path():
    """x @ W -> SplitToSequence -> SequenceAt(0), (1) -> Add: the loss depends on W through a
    sequence. The engine must differentiate it (lowered to Split) or name the op it cannot,
    never build a graph that reads undefined gradients. Reduction of the dynamo-nofold case."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.autodiff import build_training_graph, training_info

    w = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("SplitToSequence", ["h"], ["seq"], axis=1),
         helper.make_node("SequenceAt", ["seq", "i0"], ["a"]),
         helper.make_node("SequenceAt", ["seq", "i1"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.int64(0), "i0"),
         numpy_helper.from_array(np.int64(1), "i1")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    # Each SequenceAt takes one [N, 1] column of the 6 (SplitToSequence's default split is 1).
    try:
        tm = build_training_graph(model, {"type": "mse", "output": "logits", "target": "y"},
                                  batch_size=3)
    except UnsupportedOpError as exc:  # acceptable: the op named, before anything is built
        assert "SplitToSequence" in str(exc) or "SequenceAt" in str(exc)
        return
    onnx.checker.check_model(tm)
    assert list(training_info(tm).gradients) == ["W"]


def teardown_module(module):
    if OBSERVED:
        print("\nmax relative errors (losses per step; tensors vs torch; tensors vs update; "
              "torch float32 vs float64, relative to the update):")
        for case, errs in sorted(OBSERVED.items()):
            print(f"  {case:34s} " + "  ".join(f"{k}={v:.2e}" for k, v in errs.items()))


def test_preflight_counts_a_tied_copy_once(engine_runs):
    """The pre-flight's estimate built the training graph without tying the transposed copy of
    a tied embedding (BART's decoder from optimum: 34,340 parameters estimated, 31,140 trained):
    its count is the trainer's now."""
    from trainer.report import preflight

    trainer, _ = engine_runs("gpt_tied", "torchscript", "sgd", "fp32")
    assert trainer.tied  # (constant folding stored the output projection as a copy)
    trained = sum(int(np.prod(trainer.shapes[k])) for k in trainer.names)
    text = preflight(trainer.cfg).text()
    assert f"parameters: {trained:,} trained" in text, text
