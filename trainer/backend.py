"""Array-module selection: NumPy on CPU, CuPy on GPU (each rank on its own GPU); host/device
transfer, device dtypes and the random source of stochastic kernels. CuPy is found through one
seam, `_import_cupy`, which tests replace with a strict CPU stand-in (tests/strictxp.py)."""

from __future__ import annotations

import contextlib
from types import ModuleType

import numpy as np

from trainer.errors import ModelError, TrainerError


def _import_cupy() -> tuple[ModuleType, ModuleType]:
    """(cupy, cupyx) of this installation; the one place that imports them."""
    import cupy
    import cupyx
    import cupyx.scipy.special  # noqa: F401 - erf/erfc of the GPU kernels
    return cupy, cupyx


def cupy_module() -> ModuleType:
    """CuPy (through the one seam that imports it; the tests' stand-in replaces it)."""
    return _import_cupy()[0]


def cupy_or_none() -> ModuleType | None:
    """CuPy when it imports and sees at least one GPU, else None."""
    try:
        cp, _ = _import_cupy()
        if cp.cuda.runtime.getDeviceCount() > 0:
            return cp
    except Exception:  # noqa: BLE001 - any CUDA/CuPy import or driver failure means "no GPU"
        return None
    return None


def cupyx_module() -> ModuleType:
    """cupyx (GPU-only extras: scipy.special, scatter_add, pinned arrays)."""
    return _import_cupy()[1]


def select_device(cp: ModuleType, local_rank: int | None = None) -> int:
    """Make GPU local_rank % count this process's current device (each MPI rank of a node on its
    own GPU, ranks beyond the GPU count sharing them round-robin); returns its id."""
    if local_rank is None:
        from trainer.comm import launched_local_rank
        local_rank = launched_local_rank()
    count = cp.cuda.runtime.getDeviceCount()
    device = local_rank % max(count, 1)
    cp.cuda.Device(device).use()
    return device


def get_xp(device: str = "auto") -> ModuleType:
    """The array module for a config's `device`: auto picks CuPy when a GPU is usable. Choosing
    CuPy also selects this rank's GPU (local rank modulo the GPU count)."""
    if device == "cpu":
        return np
    cp = cupy_or_none()
    if device == "gpu" and cp is None:
        raise TrainerError("device: gpu was requested but CuPy or a CUDA device is not available "
                           "(install the 'gpu-cuda13' or 'gpu-cuda12' extra, or set device: cpu)")
    if cp is None:
        return np
    major = str(getattr(cp, "__version__", "0")).split(".")[0]
    if major.isdigit() and int(major) < 14:
        # (CuPy 13 refuses the int64 scatter-add/max/min the kernels use, holds no bfloat16)
        raise TrainerError(f"the GPU path needs CuPy 14 or later, found {cp.__version__}: "
                           "pip install 'onnx-trainer[gpu-cuda13]' (or '[gpu-cuda12]'), or set "
                           "device: cpu")
    select_device(cp)
    return cp


def on_device(a) -> bool:
    """Whether a is a device (CuPy) array; NumPy arrays, scalars, lists and None are not."""
    return a is not None and not isinstance(a, np.ndarray | np.generic | list | tuple) \
        and hasattr(a, "get") and hasattr(a, "dtype")


def to_host(a) -> np.ndarray:
    return a.get() if on_device(a) else np.asarray(a)


def device_dtype_ok(dtype) -> bool:
    """Whether CuPy 14 can hold this dtype: not strings, objects, float8 or int4 (bfloat16 only
    with ml_dtypes on NumPy >= 2.1.2, and partially: the engine computes 16-bit models in
    float32)."""
    dt = np.dtype(dtype)
    return dt.kind in "biufc" or dt.name == "bfloat16"


def bfloat16_problem(xp: ModuleType) -> str | None:
    """Why xp cannot run `precision: bf16`, or None when it can. CuPy holds ml_dtypes' bfloat16
    from version 14 on, where NumPy is 2.1.2 or later (its elementwise kernels, casts,
    reductions and cuBLAS's 2-D bfloat16 GEMM with float32 accumulation); checked here by
    placing a bfloat16 array on the device and casting it."""
    if xp is np:
        return None
    import ml_dtypes

    try:
        a = xp.asarray(np.ones(2, ml_dtypes.bfloat16))
        a.astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - whatever this CuPy raises: the reason
        return (f"this CuPy ({getattr(xp, '__version__', '?')}, NumPy {np.__version__}) cannot "
                f"hold bfloat16 arrays ({type(exc).__name__}: {exc}); bfloat16 needs CuPy 14 or "
                "later with NumPy 2.1.2 or later")
    return None


def to_device(xp: ModuleType, a, what: str = ""):
    """a on xp's device; string (object) arrays stay on the host (string ops are host-only).
    A dtype CuPy lacks (float8, int4, ...) is a ModelError naming `what`."""
    if xp is np or isinstance(a, np.ndarray) and a.dtype.kind in "OUS":
        return a
    if isinstance(a, np.ndarray | np.generic) and not device_dtype_ok(a.dtype):
        raise ModelError(f"{what or 'a tensor'} has dtype {a.dtype}, which CuPy cannot hold on "
                         "the GPU; run with device: cpu")
    return xp.asarray(a)


def synchronize(xp: ModuleType) -> None:
    """Wait for the device's queued work (a no-op on NumPy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


class StepRNG:
    """Random source of stochastic kernels (Dropout), re-seeded from (seed, rank, step) keys.

    Deriving each step's stream from its keys makes runs reproducible and resumable without
    saving generator state. The generator is (re)seeded at the first draw after a reseed, so
    graphs without random ops pay nothing per step; on the GPU one counter-based cuRAND generator
    (Philox) is made once and only reseeded, never rebuilt per step.
    """

    def __init__(self, xp: ModuleType, *keys: int):
        self.xp = xp
        self._device_gen = None
        self._gen = None
        self.reseed(*keys)

    def reseed(self, *keys: int) -> None:
        self._keys = keys
        self._gen = None

    @contextlib.contextmanager
    def aside(self):
        """Draws inside come from a throwaway stream (seeded from the same keys); the step's
        own stream and generators are left exactly where they were."""
        saved = self._keys, self._gen, self._device_gen
        self._gen, self._device_gen = None, getattr(self, "_aside_device_gen", None)
        try:
            yield self
        finally:  # (on a device, the aside generator is kept for the next time: made once)
            self._aside_device_gen = self._device_gen
            self._keys, self._gen, self._device_gen = saved

    def _seed(self) -> int:
        return int(np.random.SeedSequence(list(self._keys)).generate_state(1)[0])

    @property
    def gen(self):
        if self._gen is None:
            seed = self._seed()
            if self.xp is np:
                self._gen = np.random.default_rng(seed)
            else:
                if self._device_gen is None:
                    philox = self.xp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10
                    self._device_gen = self.xp.random.RandomState(seed, method=philox)
                else:
                    self._device_gen.seed(seed)
                self._gen = self._device_gen
        return self._gen

    def random(self, shape, dtype=np.float64):
        """Uniform [0, 1) draws of `shape` (float32 or float64) on xp's device."""
        if self.xp is np:
            return self.gen.random(shape, dtype=dtype)
        return self.gen.random_sample(tuple(shape), dtype=dtype)


class PeakMemory:
    """Peak bytes of device memory held by arrays while the context is open, those held when it
    opened included (a CuPy memory hook on the default pool: exact, but it slows allocation, so
    measure outside timed runs). `peak` stays None on NumPy or without memory hooks."""

    def __init__(self, xp: ModuleType):
        self.xp, self.peak, self._hook = xp, None, None

    def __enter__(self) -> PeakMemory:
        hook_base = getattr(getattr(self.xp, "cuda", None), "MemoryHook", None)
        if self.xp is np or hook_base is None:
            return self
        tracker = self
        start = int(self.xp.get_default_memory_pool().used_bytes())

        class _Hook(hook_base):
            name = "onnx_trainer_peak"

            def __init__(self):
                self.now = start

            def malloc_postprocess(self, **kw):
                self.now += kw["mem_size"]
                tracker.peak = max(tracker.peak or 0, self.now)

            def free_postprocess(self, **kw):
                self.now -= kw["mem_size"]

        self.peak = start
        self._hook = _Hook()
        self._hook.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if self._hook is not None:
            self._hook.__exit__(*exc)
        return False


def memory_high_water(xp: ModuleType) -> tuple[int, str]:
    """(bytes, what they are) of the memory this process has needed so far, read without
    synchronizing: on a GPU the device memory CuPy's default pool holds (it keeps freed blocks
    for reuse, so this is its high-water mark, fragmentation included); on the host the peak
    resident set of the process (interpreter, libraries and data included)."""
    if xp is np:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
        return int(peak if sys.platform == "darwin" else peak * 1024), \
            "peak resident memory of the process (interpreter, libraries and data included)"
    return int(xp.get_default_memory_pool().total_bytes()), \
        "peak device memory held by CuPy's memory pool"


def device_name(xp: ModuleType) -> str:
    if xp is np:
        return "cpu (numpy)"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return f"gpu {props['name'].decode()} (cupy)"


def set_tf32(xp: ModuleType, on: bool) -> str:
    """float32 matrix products (MatMul, Gemm and the convolutions' GEMMs, all cuBLAS through
    CuPy's matmul) on TF32 tensor cores (on: operands rounded to a 10-bit mantissa, float32
    accumulation) or in full float32 (off), for this process: CuPy's compute type for float32
    is global. Returns what float32 products now do, in words, for the log."""
    if xp is np:
        return "float32 matrix products stay float32 (a CPU has no TF32 units)" if on else \
            "float32 matrix products in float32"
    capability = int(xp.cuda.Device().compute_capability)
    why = ""
    if on and capability < 80:
        on = False
        why = f" (TF32 needs compute capability 8.0 or later; this GPU has {capability / 10:g})"
    try:  # (CuPy's internal API: a CuPy without it leaves float32 products as they were)
        linalg = xp._core._routines_linalg
        linalg.set_compute_type(np.float32, getattr(linalg, "COMPUTE_TYPE_TF32", 7) if on else
                                getattr(linalg, "COMPUTE_TYPE_DEFAULT", 1))
    except (AttributeError, TypeError, ValueError) as exc:
        if not on:
            return "float32 matrix products in CuPy's default mode"
        return ("float32 matrix products stay float32 (this CuPy has no float32 compute-type "
                f"setting: {type(exc).__name__}: {exc})")
    if on:
        return ("2-D float32 matrix products on TF32 tensor cores (operands rounded to a "
                "10-bit mantissa, float32 accumulation; CuPy's batched products stay float32)")
    return "float32 matrix products " + ("stay float32" + why if why else "in float32")
