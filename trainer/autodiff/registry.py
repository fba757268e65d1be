"""Gradient-rule registry: `@grad("Op")` functions emit ONNX nodes; NO_GRADIENT ops stop flow."""

from __future__ import annotations

from collections.abc import Callable

RULES: dict[tuple[str, str], Callable] = {}

# Ops whose outputs carry no gradient (integer/boolean results, or piecewise-constant maps).
NO_GRADIENT = {
    "Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
    "Or", "Xor", "ArgMax", "ArgMin", "ConstantOfShape", "Constant", "NonZero", "OneHot", "Floor",
    "Ceil", "Round", "Sign", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Range", "EyeLike", "IsNaN", "IsInf", "TopK_indices",
}


def grad(op_type: str, domain: str = ""):
    def register(fn: Callable) -> Callable:
        RULES[(domain, op_type)] = fn
        return fn
    return register


def get_rule(op_type: str, domain: str = "") -> Callable | None:
    return RULES.get(("" if domain == "ai.onnx" else domain, op_type))


def _load_all() -> None:
    """Import every rule module of trainer.autodiff.rules (one file per op family)."""
    import importlib
    import pkgutil

    from trainer.autodiff import rules

    for mod in sorted(m.name for m in pkgutil.iter_modules(rules.__path__)):
        importlib.import_module(f"{rules.__name__}.{mod}")
