"""Errors the engine raises for bad user input; the CLI prints them as one line, no traceback."""

from __future__ import annotations


class TrainerError(Exception):
    """A problem with the user's model, data or config, stated in words the user can act on."""


class ModelError(TrainerError):
    """The ONNX model cannot be loaded, checked or run."""


class UnsupportedOpError(ModelError):
    """Some nodes have no forward kernel or no gradient rule; lists every one of them."""

    def __init__(self, what: str, nodes: list[tuple[str, str]]):
        self.nodes = nodes
        listing = ", ".join(f"{op} (node '{name}')" for op, name in nodes)
        super().__init__(f"{len(nodes)} node(s) have no {what}: {listing}")


class DataError(TrainerError):
    """The dataset does not match the model (missing arrays, shapes, dtypes)."""


class Interrupted(TrainerError):
    """SIGINT/SIGTERM: the run stopped after a complete step (checkpointed if configured)."""

    def __init__(self, code: int, step: int, saved: bool):
        self.code = code
        name = {130: "SIGINT", 143: "SIGTERM"}.get(code, "a signal")
        super().__init__(f"stopped by {name} after step {step}"
                         + ("; checkpoint saved (continue with --resume)" if saved else
                            "; no checkpoint.dir is set, so nothing was saved"))
