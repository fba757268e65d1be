"""Errors the engine raises for bad user input; the CLI prints them as one line, no traceback."""

from __future__ import annotations


class TrainerError(Exception):
    """A problem with the user's model, data or config, stated in words the user can act on
    (control characters from the input, as in a node name, escaped: one line, no terminal
    escapes)."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (printable(args[0]),)
        super().__init__(*args)


def listing(names, first: int = 8) -> str:
    """The first `first` names, comma-separated, and the count when there are more."""
    names = list(names)
    return ", ".join(names[:first]) + (f" ... ({len(names)} in all)" if len(names) > first
                                       else "")


def printable(text: str) -> str:
    """`text` with control characters (newlines, terminal escapes) written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ModelError(TrainerError):
    """The ONNX model cannot be loaded, checked or run."""


class UnsupportedOpError(ModelError):
    """Some nodes have no forward kernel or no gradient rule; lists every one of them."""

    def __init__(self, what: str, nodes: list[tuple[str, str]]):
        self.nodes = nodes
        listing = ", ".join(f"{op} (node '{name}')" for op, name in nodes)
        hints = [why for key, why in _WHY.items()  # (by the op's name: "X of domain D")
                 if any(key(op.split(" of domain ")[0]) for op, _ in nodes)]
        super().__init__(f"{len(nodes)} node(s) have no {what}: {listing}"
                         + "".join(f"; {why}" for why in hints))


# What an unsupported op usually means, for the ops users meet from scikit-learn's exporters.
_WHY = {
    (lambda op: op == "ZipMap"): (
        "ZipMap turns probabilities into a sequence of maps, which no loss reads: export "
        "with skl2onnx's options={id(model): {'zipmap': False}} (or {'zipmap': False} for "
        "the classifier) to get a probability tensor"),
    (lambda op: op.startswith("TreeEnsemble")): (
        "tree ensembles have no gradient (their splits are not differentiable): they cannot "
        "be trained by gradient descent"),
    # onnxruntime's own operators that trainer.contrib does not lower
    (lambda op: op in ("ReorderInput", "ReorderOutput")): (
        "ReorderInput/ReorderOutput are onnxruntime's NCHWc layout for one CPU (a model saved "
        "at ORT_ENABLE_ALL, which onnxruntime warns is hardware specific): save it at "
        "ORT_ENABLE_EXTENDED, or train the model before optimizing it"),
    (lambda op: op in ("MatMulNBits", "MatMulBnb4", "GatherBlockQuantized")): (
        "4-bit weights (onnxruntime's MatMulNBits quantization) hold no float parameter to "
        "train: fine-tune the float model, then quantize it"),
    (lambda op: op in ("GroupQueryAttention", "RotaryEmbedding", "PagedAttention",
                       "DecoderMaskedMultiHeadAttention", "SparseAttention")): (
        "onnxruntime's decoding operators (key/value caches, rotary embeddings) belong to a "
        "model built for generation (onnxruntime-genai's builder): train the model it was "
        "built from"),
}


class DataError(TrainerError):
    """The dataset does not match the model (missing arrays, shapes, dtypes)."""


class NonFiniteLoss(TrainerError):
    """on_nan stop: the loss or a gradient became non-finite; the step was not applied."""


class Interrupted(TrainerError):
    """SIGINT/SIGTERM: the run stopped after a complete step (checkpointed if configured)."""

    def __init__(self, code: int, step: int, saved: bool):
        self.code = code
        name = {130: "SIGINT", 143: "SIGTERM"}.get(code, "a signal")
        super().__init__(f"stopped by {name} after step {step}"
                         + ("; checkpoint saved (continue with --resume)" if saved else
                            "; no checkpoint.dir is set, so nothing was saved"))
