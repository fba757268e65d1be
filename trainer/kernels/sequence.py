"""Sequence and optional kernels: a sequence is a Python list of arrays, an empty optional None.

Kernels never modify an input list (values may be shared by several consumers).
"""

from __future__ import annotations

import numpy as np

from trainer.kernels import host_ints as _ints
from trainer.kernels import kernel


def _position(position, n: int, low: int, high: int, what: str) -> int:
    """A position input read on the host, negative counting from the back; checked in
    [low, high]."""
    p = int(position.reshape(()))
    if not low <= p <= high:
        raise IndexError(f"{what} position {p} is out of range [{low}, {high}]")
    return p + n if p < 0 else p


@kernel("SequenceEmpty", since=11)
def SequenceEmpty(xp, *, dtype=None):
    return ([],)


@kernel("SequenceConstruct", since=11)
def SequenceConstruct(xp, *inputs):
    return (list(inputs),)


@kernel("SequenceLength", since=11)
def SequenceLength(xp, input_sequence):
    return (xp.asarray(np.int64(len(input_sequence))),)


@kernel("SequenceAt", since=11)
def SequenceAt(xp, input_sequence, position):
    n = len(input_sequence)
    return (input_sequence[_position(position, n, -n, n - 1, "SequenceAt")],)


@kernel("SequenceInsert", since=11)
def SequenceInsert(xp, input_sequence, tensor, position=None):
    n = len(input_sequence)
    p = n if position is None else _position(position, n, -n, n, "SequenceInsert")
    return ([*input_sequence[:p], tensor, *input_sequence[p:]],)


@kernel("SequenceErase", since=11)
def SequenceErase(xp, input_sequence, position=None):
    n = len(input_sequence)
    p = n - 1 if position is None else _position(position, n, -n, n - 1, "SequenceErase")
    if not 0 <= p < n:
        raise IndexError("SequenceErase on an empty sequence")
    return ([*input_sequence[:p], *input_sequence[p + 1:]],)


@kernel("SplitToSequence", since=11)
def SplitToSequence(xp, input, split=None, *, axis=0, keepdims=1):
    axis %= input.ndim
    size = input.shape[axis]
    lead = (slice(None),) * axis
    if split is None:  # pieces of length 1; keepdims=0 drops the split axis
        if keepdims:
            return ([input[lead + (slice(i, i + 1),)] for i in range(size)],)
        return ([input[lead + (i,)] for i in range(size)],)
    if split.ndim == 0:
        step = _ints(split.reshape(1))[0]
        if step <= 0:
            raise ValueError(f"split must be positive, got {step}")
        lengths = [step] * (size // step) + ([size % step] if size % step else [])
    else:
        lengths = _ints(split)
        if sum(lengths) != size or min(lengths, default=0) < 0:
            raise ValueError(f"split {lengths} does not add up to the axis length {size}")
    bounds = np.cumsum([0, *lengths]).tolist()
    return ([input[lead + (slice(a, b),)] for a, b in zip(bounds[:-1], bounds[1:],
                                                          strict=True)],)


@kernel("ConcatFromSequence", since=11)
def ConcatFromSequence(xp, input_sequence, *, axis, new_axis=0):
    if not input_sequence:
        raise ValueError("ConcatFromSequence of an empty sequence")
    if new_axis:
        return (xp.stack(input_sequence, axis=axis),)
    return (xp.concatenate(input_sequence, axis=axis),)


@kernel("Optional", since=15)
def Optional(xp, input=None, *, type=None):
    """An optional holding `input`, or an empty optional (None) when there is no input."""
    return (input,)


@kernel("OptionalHasElement", since=15)
def OptionalHasElement(xp, input=None):
    return (xp.asarray(input is not None),)


@kernel("OptionalGetElement", since=15)
def OptionalGetElement(xp, input):
    if input is None:
        raise ValueError("OptionalGetElement on an empty optional")
    return (input,)
