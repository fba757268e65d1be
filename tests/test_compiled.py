"""Compiled host kernels (trainer.kernels.compiled, numba): bit-identical to the NumPy path they
replace, over edge values and layouts; ONNX_TRAINER_COMPILED=0 switches them off."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.kernels import compiled
from trainer.kernels.elementwise import Erf, erf_rational

pytest.importorskip("numba")


def _numpy_path(monkeypatch, fn, *args):
    monkeypatch.setenv(compiled.ENV, "0")
    try:
        return fn(*args)
    finally:
        monkeypatch.delenv(compiled.ENV)


def _erf_inputs():
    rng = np.random.default_rng(0)
    tiny = np.finfo(np.float32).smallest_subnormal
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, tiny, -tiny, 1e-30, 4.0,
                     -4.0, 3.9999998, 4.0000005, 1e30, -1e30, 0.5, -0.5], np.float32)
    return [edge, np.linspace(-6, 6, 200_001, dtype=np.float32),
            (rng.standard_normal((16, 64, 37)) * 3).astype(np.float32),
            np.geomspace(1e-38, 6, 50_000).astype(np.float32)]


@pytest.mark.parametrize("k", range(4))
def test_erf_is_the_numpy_paths_bit_for_bit(monkeypatch, k):
    x = _erf_inputs()[k]
    assert compiled.enabled()
    got = erf_rational(np, x)
    want = _numpy_path(monkeypatch, erf_rational, np, x)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5, 7)])
def test_erf_takes_any_shape_and_layout(monkeypatch, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    views = [x, x.T] if x.ndim == 2 else [x]
    if x.ndim == 2:
        views.append(np.asfortranarray(x)[:, ::2])
    for v in views:
        got, = Erf(np, v)
        want, = _numpy_path(monkeypatch, Erf, np, v)
        assert got.shape == v.shape
        np.testing.assert_array_equal(got, want)


def test_the_environment_switch_turns_the_compiled_path_off(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "erf_rational", lambda *a: calls.append(a) or a[0])
    x = np.linspace(-1, 1, 9, dtype=np.float32)
    erf_rational(np, x)
    assert len(calls) == 1
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.enabled() and "off (ONNX_TRAINER_COMPILED=0)" in compiled.status()
    erf_rational(np, x)
    assert len(calls) == 1
