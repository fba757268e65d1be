"""onnx-trainer: train ONNX graphs with autodiff as ONNX, on NumPy/CuPy, data-parallel over MPI."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_config", "Trainer", "build_training_graph", "export_model", "__version__"]


def __getattr__(name: str):
    # Lazy public API: keeps `import trainer` cheap and free of import cycles.
    if name == "load_config":
        from trainer.config import load_config

        return load_config
    if name == "Trainer":
        from trainer.train import Trainer

        return Trainer
    if name == "build_training_graph":
        from trainer.autodiff import build_training_graph

        return build_training_graph
    if name == "export_model":
        from trainer.export import export_model

        return export_model
    raise AttributeError(name)
