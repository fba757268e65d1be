"""Argument types the bench scripts share: a bad value is one argparse error line."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` of at least `low`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def above(low: float) -> Callable[[str], float]:
    """An argparse type: a float greater than `low`."""
    def parse(text: str) -> float:
        value = at_least(float("-inf"), float)(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"{value} is not above {low}")
        return value
    return parse
