"""Random generators: RandomNormal/Uniform(Like), Bernoulli, Multinomial. Draws come from the
executor's reproducible `rng` (keyed by run seed, rank and step), like Dropout; a node's `seed`
attribute is accepted but does not select another stream."""

from __future__ import annotations

import math

import numpy as np

from trainer.graph import np_dtype
from trainer.kernels import kernel


def _draw_dtype(dtype) -> np.dtype:
    """Uniform draws are made in float64 for float64 outputs, in float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _like_dtype(x, dtype) -> np.dtype:
    """The output dtype of a *Like op: the attribute, else the input's if it is a float type."""
    if dtype is not None:
        return np_dtype(dtype)
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        return x.dtype
    return np.dtype(np.float32)


def _uniform(xp, rng, shape, dtype, low, high):
    u = rng.random(tuple(shape), dtype=_draw_dtype(dtype))
    return xp.asarray((u * (high - low) + low).astype(dtype))


def _normal(xp, rng, shape, dtype, mean, scale):
    # Box-Muller on two uniform draws in [0, 1): 1 - u1 lies in (0, 1], so the log is finite.
    dt = _draw_dtype(dtype)
    u1 = rng.random(tuple(shape), dtype=dt)
    u2 = rng.random(tuple(shape), dtype=dt)
    z = xp.sqrt(-2.0 * xp.log1p(-u1)) * xp.cos((2.0 * math.pi) * u2)
    return xp.asarray((z * scale + mean).astype(dtype))


@kernel("RandomUniform", since=1)
def RandomUniform(xp, *, shape, dtype=1, high=1.0, low=0.0, seed=None, rng):
    return (_uniform(xp, rng, shape, np_dtype(dtype), low, high),)


@kernel("RandomNormal", since=1)
def RandomNormal(xp, *, shape, dtype=1, mean=0.0, scale=1.0, seed=None, rng):
    return (_normal(xp, rng, shape, np_dtype(dtype), mean, scale),)


@kernel("RandomUniformLike", since=1)
def RandomUniformLike(xp, x, *, dtype=None, high=1.0, low=0.0, seed=None, rng):
    return (_uniform(xp, rng, x.shape, _like_dtype(x, dtype), low, high),)


@kernel("RandomNormalLike", since=1)
def RandomNormalLike(xp, x, *, dtype=None, mean=0.0, scale=1.0, seed=None, rng):
    return (_normal(xp, rng, x.shape, _like_dtype(x, dtype), mean, scale),)


@kernel("Bernoulli", since=15)
def Bernoulli(xp, x, *, dtype=None, seed=None, rng):
    """1 with probability x, else 0."""
    out = np_dtype(dtype) if dtype is not None else x.dtype
    u = rng.random(x.shape, dtype=_draw_dtype(x.dtype))
    return (xp.asarray((u < x.astype(u.dtype)).astype(out)),)


@kernel("Multinomial", since=7)
def Multinomial(xp, x, *, dtype=6, sample_size=1, seed=None, rng):
    """sample_size class indices per row of x ([batch, classes] unnormalized log-probabilities)."""
    dt = _draw_dtype(x.dtype)
    logits = x.astype(dt)
    p = xp.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = xp.cumsum(p, axis=1)
    u = rng.random((x.shape[0], sample_size), dtype=dt) * cdf[:, -1:]
    # The sample is the first class whose cumulative mass exceeds u.
    idx = (cdf[:, None, :] <= u[:, :, None]).sum(axis=-1)
    return (xp.minimum(idx, x.shape[1] - 1).astype(np_dtype(dtype)),)
