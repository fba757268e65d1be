"""Signal kernels: DFT, STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix.

Complex values travel as a trailing axis of size 2 (real, imaginary); a real signal has size 1.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.errors import ModelError
from trainer.graph import np_dtype
from trainer.kernels import host_ints, kernel


def _work_dtype(dtype) -> np.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are transformed in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _signal(xp, x, op: str = "DFT"):
    """The real ([..., 1]) or complex ([..., 2]) signal held by x, in its working precision."""
    if x.ndim < 2 or x.shape[-1] not in (1, 2):
        raise ModelError(f"{op}: the input's last axis holds a real (size 1) or complex (size "
                         f"2: real, imaginary) signal; got shape {tuple(x.shape)}"
                         + (" (a real signal [batch, length] needs a trailing axis of 1: "
                            "Unsqueeze it)" if op == "STFT" and x.ndim == 2 else ""))
    wd = _work_dtype(x.dtype)
    if x.shape[-1] == 1:
        return x[..., 0].astype(wd, copy=False)
    ct = np.complex128 if wd == np.float64 else np.complex64
    return x[..., 0].astype(ct) + x[..., 1].astype(ct) * 1j


def _pack(xp, c, dtype):
    """Complex c as [..., 2] (real, imaginary) of the given dtype."""
    return xp.stack([c.real, c.imag], axis=-1).astype(dtype)


def _dft(xp, x, dft_length, axis: int, inverse: int, onesided: int):
    r = x.ndim
    ax = axis + r if axis < 0 else axis
    if not 0 <= ax < r - 1:
        raise ValueError(f"DFT axis {axis} is out of range for rank {r} (the last axis holds "
                         "the real/imaginary parts)")
    n = host_ints(dft_length.reshape(-1))[0] if dft_length is not None else None
    sig = _signal(xp, x)
    if inverse and onesided:  # IRFFT: one-sided complex spectrum -> full real signal
        if n is None:
            n = 2 * (x.shape[ax] - 1)
        if sig.dtype.kind != "c":
            sig = sig.astype(np.complex128 if sig.dtype == np.float64 else np.complex64)
        return (xp.fft.irfft(sig, n=n, axis=ax)[..., None].astype(x.dtype),)
    if inverse:
        return (_pack(xp, xp.fft.ifft(sig, n=n, axis=ax), x.dtype),)
    if onesided:
        if sig.dtype.kind != "c":
            return (_pack(xp, xp.fft.rfft(sig, n=n, axis=ax), x.dtype),)
        full = xp.fft.fft(sig, n=n, axis=ax)
        keep = (full.shape[ax] // 2) + 1
        return (_pack(xp, xp.take(full, xp.arange(keep), axis=ax), x.dtype),)
    return (_pack(xp, xp.fft.fft(sig, n=n, axis=ax), x.dtype),)


@kernel("DFT", since=17)
def DFT_17(xp, x, dft_length=None, *, axis=1, inverse=0, onesided=0):
    return _dft(xp, x, dft_length, axis, inverse, onesided)


@kernel("DFT", since=20)
def DFT_20(xp, x, dft_length=None, axis=None, *, inverse=0, onesided=0):
    ax = -2 if axis is None else host_ints(axis.reshape(-1))[0]
    return _dft(xp, x, dft_length, ax, inverse, onesided)


@kernel("STFT", since=17)
def STFT(xp, signal, frame_step, window=None, frame_length=None, *, onesided=1):
    step = host_ints(frame_step.reshape(-1))[0]
    if signal.ndim != 3:
        _signal(xp, signal, "STFT")  # (names the layout)
        raise ModelError(f"STFT: the signal is [batch, length, 1 or 2]; got shape "
                         f"{tuple(signal.shape)}")
    length = signal.shape[1]
    if frame_length is not None:
        fl = host_ints(frame_length.reshape(-1))[0]
        if window is not None and window.shape[0] != fl:
            raise ValueError(f"STFT window has length {window.shape[0]}, frame_length is {fl}")
    else:
        fl = window.shape[0] if window is not None else length
    frames = (length - fl) // step + 1
    if frames < 1 or step < 1:
        raise ValueError(f"STFT: signal of length {length} holds no frame of length {fl} "
                         f"(frame_step {step})")
    sig = _signal(xp, signal, "STFT")                           # [batch, length]
    idx = xp.arange(frames)[:, None] * step + xp.arange(fl)[None, :]
    framed = sig[:, idx]                                        # [batch, frames, fl]
    if window is not None:
        framed = framed * window.astype(_work_dtype(signal.dtype))
    spec = xp.fft.fft(framed, axis=-1)
    if onesided:
        spec = spec[..., : fl // 2 + 1]
    return (_pack(xp, spec, signal.dtype),)


def _window(xp, size, periodic: int, output_datatype: int, terms):
    """sum_k a_k cos(2 pi k n / N), N = size (periodic) or size - 1 (symmetric)."""
    n = host_ints(size.reshape(-1))[0]
    denom = n if periodic else n - 1
    out_dtype = np_dtype(output_datatype)
    if denom <= 0:
        return (xp.ones((max(n, 0),), dtype=out_dtype),)
    phase = xp.arange(n, dtype=np.float64) * (2.0 * math.pi / denom)
    w = xp.zeros((n,), dtype=np.float64)
    for k, a in enumerate(terms):
        w = w + a * xp.cos(k * phase)
    return (w.astype(out_dtype),)


@kernel("HannWindow", since=17)
def HannWindow(xp, size, *, output_datatype=1, periodic=1):
    # sin^2(pi n / N) = 0.5 - 0.5 cos(2 pi n / N)
    return _window(xp, size, periodic, output_datatype, (0.5, -0.5))


@kernel("HammingWindow", since=17)
def HammingWindow(xp, size, *, output_datatype=1, periodic=1):
    return _window(xp, size, periodic, output_datatype, (25.0 / 46.0, -21.0 / 46.0))


@kernel("BlackmanWindow", since=17)
def BlackmanWindow(xp, size, *, output_datatype=1, periodic=1):
    return _window(xp, size, periodic, output_datatype, (0.42, -0.5, 0.08))


def _host_float(a) -> float:
    return float(a.reshape(-1)[0].item() if hasattr(a, "item") else a)


@kernel("MelWeightMatrix", since=17)
def MelWeightMatrix(xp, num_mel_bins, dft_length, sample_rate, lower_edge_hertz,
                    upper_edge_hertz, *, output_datatype=1):
    """Triangular filters with peak 1 between mel-spaced spectrogram bins (ONNX's layout:
    num_mel_bins + 2 edges spread over (num_mel_bins + 2) mel steps, bin = floor((n+1) f / sr))."""
    mels = host_ints(num_mel_bins.reshape(-1))[0]
    n_fft = host_ints(dft_length.reshape(-1))[0]
    rate = host_ints(sample_rate.reshape(-1))[0]
    lo = 2595.0 * math.log10(1.0 + _host_float(lower_edge_hertz) / 700.0)
    hi = 2595.0 * math.log10(1.0 + _host_float(upper_edge_hertz) / 700.0)
    step = (hi - lo) / (mels + 2)
    mel = xp.arange(mels + 2, dtype=np.float64) * step + lo
    hz = 700.0 * xp.expm1(mel / 2595.0 * math.log(10.0))
    edges = xp.floor((n_fft + 1) * hz / rate).astype(np.int64)
    left, center, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    j = xp.arange(n_fft // 2 + 1, dtype=np.int64)[:, None]
    rise = (j - left) / xp.maximum(center - left, 1)
    fall = (right - j) / xp.maximum(right - center, 1)
    out = xp.where((j >= left) & (j <= center), rise, 0.0)
    out = xp.where((j >= center) & (j < right), fall, out)
    out = xp.where(j == center, 1.0, out)
    return (out.astype(np_dtype(output_datatype)),)
