"""Build the bundled demo: ``digits.npz`` (scikit-learn 8x8 digits, fixed split) and
``digits_mlp.onnx`` (a He-initialized 64-128-10 MLP). Deterministic, byte for byte.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
TEST_SIZE = 0.2
HIDDEN = 128
CLASSES = 10
FEATURES = 64
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp so the .npz bytes are reproducible


def load_split() -> dict[str, np.ndarray]:
    """Return the stratified train/test split of the digits: x float32 [N,64] in [0,1], y int64."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError:
        raise SystemExit("make_digits.py reads the digits from scikit-learn, which the project "
                         "does not install: pip install scikit-learn (the bundled "
                         "examples/digits.npz and digits_mlp.onnx are its output)") from None

    digits = load_digits()
    x = (digits.images.reshape(len(digits.images), -1) / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SEED
    )
    return {
        "x_train": np.ascontiguousarray(x_train),
        "y_train": np.ascontiguousarray(y_train),
        "x_test": np.ascontiguousarray(x_test),
        "y_test": np.ascontiguousarray(y_test),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays like ``np.savez_compressed`` (deflated ``<name>.npy`` members, no pickle),
    but with fixed zip timestamps so repeated runs give identical bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def he_normal(rng: np.random.Generator, out_dim: int, in_dim: int) -> np.ndarray:
    """Kaiming-normal weight [out, in] (fan_in, gain sqrt(2)): N(0, 2 / in_dim), float32."""
    return (rng.standard_normal((out_dim, in_dim)) * np.sqrt(2.0 / in_dim)).astype(np.float32)


def build_mlp(seed: int = SEED) -> onnx.ModelProto:
    """Return the 64-128-10 MLP: Gemm(transB=1) -> Relu -> Gemm(transB=1), PyTorch Linear layout."""
    rng = np.random.default_rng(seed)
    params = {
        "fc1.weight": he_normal(rng, HIDDEN, FEATURES),
        "fc1.bias": np.zeros(HIDDEN, dtype=np.float32),
        "fc2.weight": he_normal(rng, CLASSES, HIDDEN),
        "fc2.bias": np.zeros(CLASSES, dtype=np.float32),
    }
    nodes = [
        helper.make_node(
            "Gemm", ["x", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1
        ),
        helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1"),
        helper.make_node(
            "Gemm", ["relu1_out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in params.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
        producer_name="onnx-trainer examples/make_digits.py",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> None:
    """CLI entry: write digits.npz and digits_mlp.onnx into --out-dir."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    arrays = load_split()
    save_npz(args.out_dir / "digits.npz", arrays)
    onnx.save_model(build_mlp(), str(args.out_dir / "digits_mlp.onnx"))
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    print(f"wrote {args.out_dir}/digits.npz ({shapes}) and {args.out_dir}/digits_mlp.onnx")


if __name__ == "__main__":
    main()
