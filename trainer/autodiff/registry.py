"""Gradient-rule registry: `@grad("Op")` functions emit ONNX nodes; NO_GRADIENT ops stop flow."""

from __future__ import annotations

from collections.abc import Callable

RULES: dict[tuple[str, str], Callable] = {}
# Input slots a rule differentiates, for ops with non-differentiable inputs (shapes, axes,
# indices, type templates, ratios...); ops not listed differentiate every input.
DIFF_INPUTS: dict[tuple[str, str], tuple[int, ...]] = {}

# Ops whose outputs carry no gradient (integer/boolean results, or piecewise-constant maps).
NO_GRADIENT = {
    "Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
    "Or", "Xor", "ArgMax", "ArgMin", "ConstantOfShape", "Constant", "NonZero", "OneHot", "Floor",
    "Ceil", "Round", "Sign", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Range", "EyeLike", "IsNaN", "IsInf", "TopK_indices",
    "StopGradient",  # (ai.onnx_trainer: PyTorch's .detach())
    "MaxPoolIndices",  # (ai.onnx_trainer: a MaxPool's Indices before opset 8, for its gradient)
}

# Node metadata a rule honours: on an axis-0 Gather, the row of input 0 that gets no gradient
# (nn.Embedding's padding_idx; params.mark_padding_indices sets it from a PyTorch export).
PADDING_KEY = "onnx_trainer.padding_idx"
# metadata of a Gather whose gradient rows are divided by how often the batch looks each up
# (nn.Embedding(scale_grad_by_freq=True); params.mark_padding_indices sets it from the export)
FREQ_KEY = "onnx_trainer.scale_grad_by_freq"

# Ops whose integer (or low-precision float) outputs still carry a float gradient: the
# straight-through estimator of fake quantization (rules/quant.py).
STRAIGHT_THROUGH: set[str] = set()


def no_gradient(*op_types: str) -> None:
    """Declare ops whose outputs carry no gradient (a rule module lists those of its family)."""
    NO_GRADIENT.update(op_types)


def straight_through(*op_types: str) -> None:
    """Declare ops whose non-float outputs carry a gradient (their rules define it)."""
    STRAIGHT_THROUGH.update(op_types)


def grad(op_type: str, domain: str = "", inputs: tuple[int, ...] | None = None):
    """Register a rule; `inputs` names the differentiable input slots (default: all)."""
    def register(fn: Callable) -> Callable:
        RULES[(domain, op_type)] = fn
        if inputs is not None:
            DIFF_INPUTS[(domain, op_type)] = tuple(inputs)
        return fn
    return register


def get_rule(op_type: str, domain: str = "") -> Callable | None:
    return RULES.get(("" if domain == "ai.onnx" else domain, op_type))


def differentiable_inputs(op_type: str, n_inputs: int, domain: str = "") -> tuple[int, ...]:
    """The input slots of an op that carry gradients (none for NO_GRADIENT ops)."""
    if op_type in NO_GRADIENT:
        return ()
    slots = DIFF_INPUTS.get(("" if domain == "ai.onnx" else domain, op_type))
    return tuple(range(n_inputs)) if slots is None else tuple(i for i in slots if i < n_inputs)


def _load_all() -> None:
    """Import every rule module of trainer.autodiff.rules (one file per op family)."""
    import importlib
    import pkgutil

    from trainer.autodiff import rules

    for mod in sorted(m.name for m in pkgutil.iter_modules(rules.__path__)):
        importlib.import_module(f"{rules.__name__}.{mod}")
