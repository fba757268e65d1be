"""Train Keras models exported with tf2onnx through the engine and check them against Keras
trained from the same initial weights on the same batches: small hand-built models (a CNN, Conv1D,
LSTM, GRU, bidirectional LSTM, a Transformer block with MultiHeadAttention and
LayerNormalization, BatchNormalization and separable convolutions) built with Keras 3 and with
tf_keras (Keras 2), exported at opsets 13 and 17 with a dynamic batch; with `--apps`, also
keras.applications' MobileNetV2 (alpha 0.35) and EfficientNetB0 at 32x32, untrained weights.
Weights that Keras initializes to one constant (zero biases, LayerNorm's ones and zeros) get
noise before export, as a trained model has, so tf2onnx folds none of them away. Cross entropy on
the softmax output, SGD (lr 0.01), batches of 4, one thread everywhere, the CPU.

    python scripts/keras_sweep.py --tf-python /tmp/tfenv/bin/python [--models gap_dense,lstm]
        [--keras 2,3] [--opsets 13,17] [--apps] [--steps 4] [--work DIR]

Runs in the engine's environment, which cannot hold TensorFlow (its protobuf and onnx pins);
the export and the Keras reference run in a second Python, `--tf-python`, which runs this same
file with a hidden sub-command (that half imports TensorFlow, never the engine). Make it once:

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf_keras tf2onnx \\
        onnxruntime

About 4 minutes on two cores with `--apps` (the hand-built ones: about 3). Writes the exports, data,
Keras's results and each engine run (config.yaml, check.txt, train.txt, metrics.jsonl,
trained.onnx) under --work (default: a new temporary folder, printed at the end).
Prints one row per model, Keras version and opset: the tensors the engine trains and Keras's
trainable tensors, the largest relative difference of the per-step losses, the largest absolute
difference between the trained export (run by onnxruntime) and the trained Keras model on the
first batch, and the outcome: ok (both within 1e-6), differs, refused (the engine's last error
line) or export failed. tf2onnx folds BatchNormalization into the convolutions with Keras's
inference statistics (mostly: tf_keras's applications keep a dozen BatchNormalization nodes),
so a model with BatchNormalization layers (cnn_bn, dense_bn, sepconv, the applications) trains
another function than Keras's training mode: the engine trains it with `batchnorm: eval` (the
unfolded ones on their running statistics too), only its first loss is compared, with Keras's
inference-mode loss on that batch, and its row says "folded BatchNorm: step 1 only". The tensor
counts differ where tf2onnx merges tensors (folded BatchNorm; a bidirectional LSTM's two
directions are one ONNX LSTM). Exit status 1 if any row is not ok.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("gap_dense", "conv1d", "lstm", "gru", "bilstm", "transformer", "cnn_bn", "dense_bn",
          "sepconv")
APPS = ("mobilenetv2", "efficientnetb0")
BATCH, CLASSES, LR = 4, 5, 0.01
TOL = 1e-6  # relative, on the losses; absolute, on the trained softmax outputs
FOLDED = "folded BatchNorm: step 1 only"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---- the TensorFlow half (runs under --tf-python; imports neither the engine nor onnx) ----

def _builders(keras) -> dict:
    """name -> a function that returns (the Keras model, its input: ("float", per-sample shape)
    or ("int", per-sample shape, vocabulary))."""
    L = keras.layers
    image, tokens = ("float", (32, 32, 3)), ("int", (12,), 100)

    def sequential(spec, *layers):
        dtype = "int32" if spec[0] == "int" else "float32"
        return keras.Sequential([keras.Input(spec[1], dtype=dtype), *layers]), spec

    def softmax():
        return L.Dense(CLASSES, activation="softmax")

    def recurrent(kind):
        def build():
            cell = {"lstm": lambda: L.LSTM(16), "gru": lambda: L.GRU(16),
                    "bilstm": lambda: L.Bidirectional(L.LSTM(8))}[kind]()
            return sequential(tokens, L.Embedding(100, 16), cell, softmax())
        return build

    def transformer():  # one encoder block, post-norm, then mean over the tokens
        inp = keras.Input(tokens[1], dtype="int32")
        x = L.Embedding(100, 16)(inp)
        x = L.LayerNormalization()(x + L.MultiHeadAttention(num_heads=2, key_dim=8)(x, x))
        f = L.Dense(16)(L.Dense(32, activation="relu")(x))
        x = L.GlobalAveragePooling1D()(L.LayerNormalization()(x + f))
        return keras.Model(inp, softmax()(x)), tokens

    def app(make, **kw):
        return lambda: (make(weights=None, input_shape=image[1], classes=CLASSES, **kw), image)

    A = keras.applications
    return {
        "gap_dense": lambda: sequential(
            image, L.Conv2D(8, 3, activation="relu"), L.GlobalAveragePooling2D(),
            L.Dense(16, activation="relu"), softmax()),
        "conv1d": lambda: sequential(
            ("float", (64, 4)), L.Conv1D(8, 5, activation="relu"), L.MaxPooling1D(2),
            L.Conv1D(16, 3, padding="same", activation="relu"), L.GlobalMaxPooling1D(),
            softmax()),
        "lstm": recurrent("lstm"),
        "gru": recurrent("gru"),
        "bilstm": recurrent("bilstm"),
        "transformer": transformer,
        "cnn_bn": lambda: sequential(
            image, L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
            L.MaxPooling2D(), L.Conv2D(16, 3), L.BatchNormalization(), L.Activation("relu"),
            L.GlobalAveragePooling2D(), L.Dropout(0.3), softmax()),
        "dense_bn": lambda: sequential(
            image, L.Conv2D(8, 3, strides=2), L.Flatten(), L.Dense(16),
            L.BatchNormalization(), L.ReLU(), softmax()),
        "sepconv": lambda: sequential(
            image, L.SeparableConv2D(8, 3, padding="same", activation="relu"),
            L.DepthwiseConv2D(3, strides=2), L.BatchNormalization(), L.ReLU(6.0),
            L.Conv2D(16, 1), L.GlobalAveragePooling2D(), softmax()),
        "mobilenetv2": app(A.MobileNetV2, alpha=0.35),
        "efficientnetb0": app(A.EfficientNetB0),
    }


def export_models(names: list[str], version: str, opsets: list[int], steps: int,
                  out: Path) -> None:
    """Build, export and train each model with Keras `version` ("2": tf_keras, "3": keras),
    writing out/NAME/{data.npz, opOPSET.onnx, keras_out.npy, ref.json} (or ref.json with the
    error); out/versions.json names the versions used."""
    os.environ.update(ONE_THREAD)
    if version == "2":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # (read when tensorflow is first imported)
    import tensorflow as tf
    import tf2onnx

    if version == "2":
        import tf_keras as keras
    else:
        import keras
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(
        {"keras": keras.__version__, "tensorflow": tf.__version__,
         "tf2onnx": tf2onnx.__version__}))
    builders = _builders(keras)
    for name in names:
        d = out / name
        d.mkdir(exist_ok=True)
        try:
            ref = _export_one(tf, tf2onnx, keras, builders[name], opsets, steps, d)
        except Exception as exc:  # noqa: BLE001 - a row per failure
            ref = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
        (d / "ref.json").write_text(json.dumps(ref, indent=1))
        print(name, ref.get("losses", ref.get("error")), flush=True)


def _export_one(tf, tf2onnx, keras, build, opsets: list[int], steps: int, d: Path) -> dict:
    keras.utils.set_random_seed(0)
    model, spec = build()
    # the data: steps batches, taken in order by both trainers
    rng = np.random.default_rng(0)
    n = steps * BATCH
    if spec[0] == "float":
        x, dtype = rng.standard_normal((n, *spec[1])).astype(np.float32), tf.float32
    else:
        x, dtype = rng.integers(0, spec[2], (n, *spec[1])).astype(np.int32), tf.int32
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    np.savez(d / "data.npz", x=x, y=y)
    # a weight that holds one value everywhere gets noise (tf2onnx would fold a zero bias away)
    noise = np.random.default_rng(1)
    for v in model.trainable_weights:
        a = v.numpy()
        if np.all(a == a.flat[0]):
            v.assign(a + 0.1 * noise.standard_normal(a.shape).astype(a.dtype))
    model.output_names = ["probs"]
    signature = (tf.TensorSpec((None, *spec[1]), dtype, name="x"),)  # a dynamic batch
    for opset in opsets:
        tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset,
                                   output_path=str(d / f"op{opset}.onnx"))
    # the reference: Keras's training mode (batch statistics), dropout off, plain SGD
    layers = list(model._flatten_layers())
    for layer in layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    optimizer = keras.optimizers.SGD(learning_rate=LR)
    first_inference = float(loss_fn(y[:BATCH], model(x[:BATCH], training=False)))
    losses = []
    for s in range(steps):
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    np.save(d / "keras_out.npy", model(x[:BATCH], training=False).numpy())
    return {"losses": losses, "first_inference_loss": first_inference,
            "trainable": len(model.trainable_weights),
            "batchnorm": any(isinstance(layer, keras.layers.BatchNormalization)
                             for layer in layers)}


# ---- the engine half (runs in the engine's environment; never imports TensorFlow) ----

CONFIG = """model: ../op{opset}.onnx
output: trained.onnx
seed: 0
device: cpu
threads: 1
data:
  train: {{path: ../data.npz, inputs: {{{input}: x}}, targets: {{label: y}}}}
  batch_size: {batch}
  shuffle: false
loss: {{type: cross_entropy, output: "{output}", target: label}}
batchnorm: {batchnorm}
optimizer: {{type: sgd, lr: {lr}}}
steps: {steps}
log: {{every_steps: 1, metrics: metrics.jsonl}}
eval: {{every_steps: 0}}
"""


def engine_row(d: Path, opset: int, steps: int, env: dict) -> tuple[str, str, str, str]:
    """`check` and `train` the export of d at opset; the engine's tensor count, the losses'
    largest relative difference, the trained export's largest difference and the outcome."""
    import onnx
    import onnxruntime as ort

    ref = json.loads((d / "ref.json").read_text())
    if "error" in ref:
        return "-", "-", "-", f"export failed: {ref['error']}"
    graph = onnx.load(str(d / f"op{opset}.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inp = next(i.name for i in graph.input if i.name not in inits)
    out = graph.output[0].name
    run = d / f"op{opset}"
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    # (a BatchNormalization that tf2onnx left unfolded runs on its running statistics, as the
    # folded ones do: the model is then Keras's in inference mode, all of it)
    (run / "config.yaml").write_text(CONFIG.format(
        opset=opset, input=inp, output=out, batch=BATCH, lr=LR, steps=steps,
        batchnorm="eval" if ref["batchnorm"] else "train"))
    tensors = "-"
    for command in ("check", "train"):
        p = subprocess.run([sys.executable, "-m", "trainer", command, "config.yaml"], cwd=run,
                           env=env, capture_output=True, text=True)
        text = p.stdout + p.stderr
        (run / f"{command}.txt").write_text(text)
        m = re.search(r"parameters trained by default: (\d+) tensors", text)
        tensors = m.group(1) if m else tensors
        if p.returncode != 0:
            last = [line for line in text.splitlines() if line.strip()] or ["(no output)"]
            return tensors, "-", "-", f"refused ({command}): {last[-1].strip()[:200]}"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]
    if len(losses) < steps:
        return tensors, "-", "-", f"differs: {len(losses)} losses logged for {steps} steps"
    if ref["batchnorm"]:  # trained in inference form: only the first loss is Keras's
        rel = abs(losses[0] - ref["first_inference_loss"]) / abs(ref["first_inference_loss"])
        return tensors, f"{rel:.2e}", "-", ("ok" if rel <= TOL else "differs") + f" ({FOLDED})"
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses[:steps], ref["losses"], strict=True))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(run / "trained.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    x = np.load(d / "data.npz")["x"][:BATCH]
    diff = float(np.abs(session.run([out], {inp: x})[0] - np.load(d / "keras_out.npy")).max())
    return tensors, f"{rel:.2e}", f"{diff:.2e}", "ok" if rel <= TOL and diff <= TOL else "differs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tf-python", help="a Python with tensorflow-cpu, tf_keras and tf2onnx")
    p.add_argument("--models", default="", help="comma-separated (default: the hand-built ones)")
    p.add_argument("--apps", action="store_true", help="add " + ", ".join(APPS))
    p.add_argument("--keras", default="2,3", help="Keras versions: 2 (tf_keras), 3 (keras)")
    p.add_argument("--opsets", default="13,17")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--work", type=Path, help="default: a new temporary folder")
    p.add_argument("--export-one", help=argparse.SUPPRESS)  # (the TF half: names, comma-separated)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    opsets = [int(o) for o in a.opsets.split(",")]
    if a.export_one:  # this file, run by --tf-python
        export_models(a.export_one.split(","), a.keras, opsets, a.steps, a.out)
        return 0
    names = [n for n in a.models.split(",") if n] or list(MODELS)
    names += [n for n in APPS if a.apps and n not in names]
    unknown = [n for n in names if n not in MODELS + APPS]
    versions = [v for v in a.keras.split(",") if v]
    if not a.tf_python:
        p.error("--tf-python is required (see the module docstring for making one)")
    if not (os.path.isfile(a.tf_python) and os.access(a.tf_python, os.X_OK)):
        p.error(f"--tf-python {a.tf_python} is not an executable file (see the module "
                "docstring for making one)")
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(MODELS + APPS)}")
    if not set(versions) <= {"2", "3"}:
        p.error("--keras takes 2 and/or 3")
    work = a.work or Path(tempfile.mkdtemp(prefix="keras_sweep_"))
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # the TF half: one process per Keras version exports every model and trains it in Keras
    for v in versions:
        start, log = time.time(), work / f"keras{v}" / "export.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            rc = subprocess.run([a.tf_python, str(Path(__file__).resolve()), "--export-one",
                                 ",".join(names), "--keras", v, "--opsets", a.opsets,
                                 "--steps", str(a.steps), "--out", str(log.parent)],
                                env={**os.environ, **ONE_THREAD}, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            print(f"keras {v}: the export failed (exit {rc}); see {log}:", file=sys.stderr)
            print(*log.read_text().splitlines()[-5:], sep="\n", file=sys.stderr)
            return 2
        found = json.loads((log.parent / "versions.json").read_text())
        print(f"keras {v}: Keras {found['keras']}, TensorFlow {found['tensorflow']}, tf2onnx "
              f"{found['tf2onnx']}: exported and trained in {time.time() - start:.0f} s")
    print(f"{'model':15s} {'keras':>5s} {'opset':>5s} {'engine':>6s} {'keras':>5s} "
          f"{'loss diff':>9s} {'out diff':>9s}  outcome")
    bad = 0
    for v in versions:
        for name in names:
            d = work / f"keras{v}" / name
            trainable = json.loads((d / "ref.json").read_text()).get("trainable", "-")
            for opset in opsets:
                try:
                    tensors, loss, out, outcome = engine_row(d, opset, a.steps, env)
                except Exception as exc:  # noqa: BLE001 - a row per failure
                    tensors, loss, out = "-", "-", "-"
                    outcome = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                bad += not outcome.startswith("ok")
                print(f"{name:15s} {v:>5s} {opset:5d} {tensors:>6s} {trainable!s:>5s} "
                      f"{loss:>9s} {out:>9s}  {outcome}", flush=True)
    print(f"(work: {work})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
