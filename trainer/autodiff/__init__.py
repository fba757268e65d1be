"""Autodiff over ONNX graphs: training-mode rewrite, loss, and backward nodes as ONNX."""

from trainer.autodiff.build import (
    LossSpec,
    TrainingInfo,
    build_training_graph,
    reverse,
    training_info,
)

__all__ = ["LossSpec", "TrainingInfo", "build_training_graph", "reverse", "training_info"]
