"""Checks made before step 1, so that a long run never fails at its end: output and checkpoint
paths, fixed batch dimensions, and loss targets (shapes, dtypes, label ranges) of every dataset.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from trainer.errors import DataError, TrainerError
from trainer.graph import constant_lookup


def _existing_parent(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_file(path: Path, what: str, keep: bool = True) -> None:
    """`path` can be written as a file: not a directory or another kind of file (a device, a
    pipe: the write replaces it), and its folder exists or can be made and is writable (tried:
    see `_probe`; `keep`: the folders made stay, for the run)."""
    path = Path(path)
    if path.is_dir():
        example = "metrics.jsonl" if "metrics" in what else (
            "trace.json" if "trace" in what else "model.onnx")
        raise TrainerError(f"{what} {path} is a directory; give a file path such as "
                           f"{path / example}")
    if os.path.lexists(path) and not path.is_file():
        raise TrainerError(f"{what} {path} exists and is not a regular file (a device, a pipe "
                           "or a broken link), which the write would replace; give a file path")
    parent = _existing_parent(path.parent)
    if not parent.is_dir():
        raise TrainerError(f"{what} {path}: {parent} is not a directory")
    _probe(path.parent, path, what, keep)


def convertible(a: np.ndarray, want: np.dtype, name: str, what: str) -> None:
    """Values of array `a` survive the conversion to the model input's dtype `want`: numbers
    for a number, real for real, whole numbers for an integer input (0.7 above one was cut
    off in silence). A memory-mapped array is read _RANGE_CHUNK bytes at a time."""
    from trainer.graph import is_float_dtype

    kind, want = a.dtype.kind, np.dtype(want)
    numeric = kind in "biuf" or is_float_dtype(a.dtype)
    if not numeric and not (kind == "c" and want.kind == "c"):
        raise DataError(f"{what}: '{name}' holds {a.dtype} values, but the model's input takes "
                        f"{want} (numbers); convert the array" + (
                            " (complex values would lose their imaginary part)"
                            if kind == "c" else ""))
    if not (kind == "f" and want.kind in "iub" and a.size):
        return
    for lo, chunk in _chunks(a):
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(chunk) & (np.floor(chunk) == chunk)
        if whole.all():
            continue
        rows = whole.reshape(len(chunk), -1).all(axis=1) if chunk.ndim else whole.reshape(1)
        i = int(np.flatnonzero(~rows)[0])
        bad = (chunk[i] if chunk.ndim else chunk).reshape(-1)
        bad = bad[~whole[i].reshape(-1)] if chunk.ndim else bad
        raise DataError(f"{what}: '{name}' holds values that are not whole numbers (sample "
                        f"{lo + i}: {bad[0]}), but the model's input takes {want}; round or "
                        "convert the array first")


def _largest(dtype: np.dtype) -> float:
    """The largest finite value of a numeric dtype (ml_dtypes' bfloat16 included)."""
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).max)
    if dtype.kind == "b":
        return 1.0
    try:
        return float(np.finfo(dtype).max)
    except ValueError:  # (bfloat16: ml_dtypes' own finfo)
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)


_RANGE_CHUNK = 1 << 24  # bytes of a memory-mapped array converted at a time


def within_range(a: np.ndarray, want: np.dtype, label: str,
                 converted: np.ndarray | None = None) -> None:
    """The finite values of `a` (the datasets' check refuses others) stay finite in the dtype
    `want` the engine computes them in: 1e39 in a float64 file becomes inf in float32, which
    failed at the step reaching that sample with an optimizer's advice. `converted` is `a` in
    `want` where the caller made it; a memory-mapped array is converted chunk by chunk.
    `label` names the array as the datasets' check does."""
    from trainer.graph import is_float_dtype

    want = np.dtype(want)
    if want.kind in "iub":
        return _within_integer_range(a, want, label)
    if not is_float_dtype(want) or a.dtype == want or not a.size \
            or not (a.dtype.kind in "biuf" or is_float_dtype(a.dtype)) \
            or _largest(a.dtype) <= _largest(want):
        return
    for lo, chunk in [(0, converted)] if converted is not None else _chunks(a):
        with np.errstate(over="ignore", invalid="ignore"):
            c = chunk if chunk.dtype == want else chunk.astype(want)
            bad = ~np.isfinite(c)
        if bad.any():
            idx, where = _where(bad, lo)
            src = a[idx] if idx else a[()]
            raise DataError(f"{label} holds {src} at {where}, beyond the range of "
                            f"{want} (largest {_largest(want):.4g}), the type the model "
                            "computes it in; scale or clip the data before training")


def _chunks(a: np.ndarray):
    """(first sample, array) pieces of `a`: the whole of an in-memory array, a memory-mapped
    one _RANGE_CHUNK bytes at a time."""
    if not isinstance(a, np.memmap) or not a.ndim:
        return [(0, np.asarray(a))]
    step = max(1, _RANGE_CHUNK // max(a[:1].nbytes, 1))
    return ((lo, np.asarray(a[lo:lo + step])) for lo in range(0, len(a), step))


def _where(bad: np.ndarray, lo: int) -> tuple[tuple, str]:
    """(index, words) of the first True of `bad`, a chunk starting at sample `lo`."""
    idx = [int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape)]
    if idx:
        idx[0] += lo
    return tuple(idx), (f"sample {idx[0]}" + (f", position {idx[1:]}" if len(idx) > 1 else "")
                        if idx else "its only element")


def _within_integer_range(a: np.ndarray, want: np.dtype, label: str) -> None:
    """Integer (or whole float) values of `a` fit the integer or boolean type `want` (0 and 1
    for a bool): 300 into a uint8 image input was cast to 44, and -5 to 251, in silence."""
    from trainer.graph import is_float_dtype

    if not a.size or a.dtype == want or a.dtype.kind == "b":
        return
    low, high = (0, 1) if want.kind == "b" else (int(np.iinfo(want).min),
                                                 int(np.iinfo(want).max))
    if a.dtype.kind in "iu":
        if np.iinfo(a.dtype).min >= low and np.iinfo(a.dtype).max <= high:
            return
    elif not (a.dtype.kind == "f" or is_float_dtype(a.dtype)):
        return  # (convertible names other kinds)
    for lo, chunk in _chunks(a):
        if chunk.dtype.kind not in "iu":
            chunk = chunk.astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = (chunk < low) | (chunk > high)
        if bad.any():
            idx, where = _where(bad, lo)
            value = a[idx] if idx else a[()]
            raise DataError(f"{label} holds {value} at {where}, beyond the range of {want} "
                            f"({low} to {high}), the model input's type (it would wrap "
                            "around); clip or convert the data before training")


def files_read(cfg) -> dict[Path, str]:
    """{file: what it is} for the files a run reads: the model, its external data files, the
    datasets (each file of a folder dataset)."""
    from trainer.graph import external_data_files

    found = {Path(cfg.model): "the model file itself"}
    found.update((f, "an external data file of the model") for f in
                 external_data_files(cfg.model))
    if getattr(cfg, "config_path", None) is not None:
        found[Path(cfg.config_path)] = "the config file"
    for what, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if ds is None:
            continue
        path = Path(ds.path)
        files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
        found.update((f, f"a file of {what}") for f in files)
    return found


def model_bytes(cfg) -> int:
    """Bytes of the model on disk, its external data included (about what its export takes)."""
    from trainer.graph import external_data_files

    total = 0
    for f in [Path(cfg.model), *external_data_files(cfg.model)]:
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def optimizer_buffers(optimizer_cfg) -> int:
    """How many parameter-sized buffers of state the optimizer keeps (a checkpoint holds
    them): built over one element and stepped once."""
    from trainer.optim import make_optimizer

    try:
        opt = make_optimizer(optimizer_cfg, np, 1, np.float32, [("w", 0, 1)], None)
        opt.step(np.zeros(1, np.float32), np.ones(1, np.float32), 1e-3)
    except Exception:  # noqa: BLE001 - advice only: the run's own set-up names the problem
        return 2
    return sum(np.size(v) == 1 for k, v in opt.state.items())


def room_for(path: Path, need: int, what: str, writes: str) -> None:
    """The file system holding `path` (a file, or a folder the path checks made) has `need`
    bytes free for what the run writes there: a disk that fills at the end would lose the
    finished run's result."""
    import shutil

    from trainer.memory import human

    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    except OSError:
        return
    if free < need:
        raise TrainerError(f"{what} {path}: {human(free)} free on its file system, where "
                           f"{writes} takes about {human(need)}; free some space or give a "
                           "path on another disk")


def not_read(path: Path, what: str, reads: Mapping[Path, str]) -> None:
    """`path`, which the run writes, is none of the files it reads (`files_read`): writing it
    would destroy them (an output named like the model's external data, a metrics file at the
    model's path)."""
    for f, role in reads.items():
        if _same(path, f):
            raise TrainerError(f"{what} {path} is {role}: writing it would destroy a file "
                               "this command reads; give another path")


def shardable(cfg, world: int) -> None:
    """distributed.shard_optimizer works with the config's optimizer at this world size."""
    if cfg.distributed.shard_optimizer and world > 1 and cfg.optimizer.type == "lamb":
        raise TrainerError("distributed.shard_optimizer does not support optimizer.type lamb "
                           "(its trust ratios need whole tensors on one rank); use adamw or "
                           "turn sharding off")


def distinct(written: list[tuple[Path, str]]) -> None:
    """The files a run writes are different files (metrics written to the output's path lost
    their rows to the export)."""
    for i, (a, what_a) in enumerate(written):
        for b, what_b in written[i + 1:]:
            if _same(a, b):
                raise TrainerError(f"{what_b} {b} is also {what_a}: give each its own path")


def not_checkpoint_names(written: list[tuple[Path, str]], folder: Path) -> None:
    """No file a run writes sits in checkpoint.dir under a name its checkpoints take
    (`step_<n>`, their temporary `.step_*` folders, `.lock`): the next checkpoint moved a
    metrics file named `step_00000010` aside, and its rows after that step were lost."""
    from trainer.checkpoint import PREFIX

    for path, what in written:
        if not _same(Path(path).parent, folder):
            continue
        name = Path(path).name
        if name.startswith((PREFIX, f".{PREFIX}")) or name == ".lock":
            raise TrainerError(f"{what} {path} takes a name of checkpoint.dir's own files "
                               f"('{PREFIX}*', '.{PREFIX}*' and '.lock' are the checkpoints "
                               "and their lock); give it another name or folder")


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once resolved, or hard links of one
    file."""
    try:
        if Path(a).absolute().resolve() == Path(b).absolute().resolve():
            return True
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except (OSError, RuntimeError, ValueError):  # (a symlink loop, a NUL in a name: not a
        # file the run reads; the model's own checks name such a path)
        return False


def writable_dir(path: Path, what: str, keep: bool = True) -> None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrainerError(f"{what} {path} exists and is not a directory")
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise TrainerError(f"{what} {path}: {parent} is not a directory")
    _probe(path, path, what, keep)


def _probe(folder: Path, path: Path, what: str, keep: bool = True) -> None:
    """Make `folder` (and the folders above it that are missing; the run writes there) and a
    file in it, then remove the file: permissions alone do not tell (root may write anywhere
    they allow, and a read-only or pseudo file system such as /proc refuses what they allow).
    Processes that share the folder may probe it at once. Not `keep` (`check CONFIG`, which
    writes nothing): the folders this made are removed again, where still empty."""
    import tempfile

    made = []
    p = Path(folder)
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:  # (a file without a name: a kill cannot leave it behind)
            os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
        except (AttributeError, OSError) as exc:  # (not Linux, or a file system without it)
            if isinstance(exc, OSError) and exc.errno not in (
                    errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".onnx-trainer-probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = exc.filename if exc.filename and not Path(exc.filename).name.startswith(
            ".onnx-trainer-probe-") else folder  # (the probe's own name is ours, not theirs)
        raise TrainerError(f"{what} {path}: cannot write in {where}: {reason}") from None
    finally:
        for p in made if not keep else ():  # (deepest first; one another process now
            try:                             # writes in stays)
                p.rmdir()
            except OSError:
                break


_BATCH_NAME = re.compile(r"^(batch([_ ]?size)?|bs|n|b)$|batch", re.IGNORECASE)


def batch_axis_first(model: onnx.ModelProto, fed: set[str]) -> None:
    """The data inputs `fed` take samples on axis 0: an input whose first dimension is fixed
    while a later one is a symbolic dimension named as a batch ([T, batch, F], a time-major
    export) would get time steps for samples, silently at a batch size of T."""
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in fed or len(dims) < 2 or not dims[0].HasField("dim_value"):
            continue
        axis = next((k for k, d in enumerate(dims) if k and d.HasField("dim_param")
                     and _BATCH_NAME.search(d.dim_param)), None)
        if axis is not None:
            shown = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise DataError(
                f"model input '{vi.name}' {shown} has its batch axis '{dims[axis].dim_param}' "
                f"at position {axis}, its first dimension fixed at {dims[0].dim_value}: the "
                "data gives samples on axis 0 (arrays [samples, ...]); export the model "
                "batch-first (a Transpose inside it, to the layout it computes in)")


def fixed_batch_fits(data_inputs: Mapping[str, list], n: int, world: int) -> None:
    """A training set smaller than one batch of a model input's fixed batch dimension (per
    process) cannot train at any data.batch_size: said so, rather than advice (drop_last, a
    smaller batch) that the fixed dimension refuses in turn."""
    for name, dims in data_inputs.items():
        if dims and dims[0] is not None and n < dims[0] * world:
            raise DataError(
                f"data.train has {n} sample(s), fewer than one batch of model input '{name}', "
                f"whose batch dimension is fixed at {dims[0]}"
                + (f" per process ({world} processes: {dims[0] * world})" if world > 1 else "")
                + ": give the model a dynamic batch axis (`onnx-trainer convert MODEL.onnx -o "
                "OUT.onnx --dynamic-batch`, or re-export with torch.onnx.export(..., "
                "dynamic_shapes=...) or dynamic_axes=...), or more data")


def fixed_batch(data_inputs: Mapping[str, list], local_sizes: set[int], batch_size: int,
                world: int) -> None:
    """A model input with a fixed first dimension runs only at that batch size."""
    for name, dims in data_inputs.items():
        if dims and dims[0] is not None and any(n != dims[0] for n in local_sizes):
            sizes = ", ".join(str(n) for n in sorted(local_sizes))
            raise DataError(
                f"model input '{name}' has a fixed batch dimension of {dims[0]}, but each of the "
                f"{world} process(es) gets batches of {sizes} samples (data.batch_size "
                f"{batch_size}); give the model a dynamic batch axis (`onnx-trainer convert "
                "MODEL.onnx -o OUT.onnx --dynamic-batch`, or re-export with torch.onnx.export(..., "
                "dynamic_shapes=...) or dynamic_axes=...), or set "
                f"data.batch_size to {dims[0] * world} with drop_last: true")


LABEL_CHECK_ELEMENTS = 8 << 20  # labels checked at a time (memory: a few bytes each)


def class_labels(labels: np.ndarray, name: str, what: str, classes: int,
                 per_sample: tuple[int, ...], ignore_index: int, output: str,
                 out_shape: tuple[int, ...] | None = None, weight=None) -> None:
    """Cross-entropy labels: integer, shaped like the output without its class axis, and in
    [0, classes) or equal to ignore_index; the first bad one is named (with the class axis
    that would fit, where the output's full shape `out_shape` has one); some label must count
    (not ignored, and of a class whose loss.`weight` is not 0)."""
    if labels.dtype.kind not in "iu":
        hint = ""
        if out_shape and tuple(labels.shape[1:]) == tuple(out_shape[1:]):
            # (one-hot rows or class probabilities, shaped like the scores)
            axis = next((k for k in reversed(range(1, len(out_shape)))
                         if tuple(d for i, d in enumerate(out_shape) if i != k)[1:]
                         == tuple(per_sample)), len(out_shape) - 1)
            hint = (f"; '{name}' is shaped like '{output}': one-hot rows are stored as class "
                    f"indices with np.argmax({name}, axis={axis}) (class probabilities, "
                    "soft labels, are not a cross_entropy target here)")
        raise DataError(f"{what}: target '{name}' must hold integer class labels, got "
                        f"{labels.dtype}{hint}")
    if tuple(labels.shape[1:]) != tuple(per_sample):
        hint = ""
        if labels.shape[1:] == (1,) and per_sample == ():
            hint = " (labels shaped [N, 1]: store them as a flat [N] array)"
        fits = [k for k in range(1, len(out_shape or ()))
                if tuple(d for i, d in enumerate(out_shape) if i != k)[1:] == labels.shape[1:]]
        if fits and not hint:  # (a segmentation model's [N, classes, H, W]: class_axis 1)
            hint = (f" (with the classes on axis {fits[0]} of '{output}' {list(out_shape)}, "
                    f"set loss.class_axis: {fits[0]})")
        raise DataError(f"{what}: target '{name}' has per-sample shape {list(labels.shape[1:])}, "
                        f"but '{output}' without its class axis has {list(per_sample)}{hint}")
    # (chunk by chunk of samples: a memory-mapped label file is not copied whole into
    # temporaries)
    rows = max(1, LABEL_CHECK_ELEMENTS // max(1, math.prod(labels.shape[1:])))
    all_ignored = labels.size > 0
    for lo in range(0, labels.shape[0], rows):  # (labels have a sample axis: checked above)
        part = np.asarray(labels[lo:lo + rows])
        bad = ((part < 0) | (part >= classes)) & (part != ignore_index)
        if bad.any():
            flat = int(np.flatnonzero(bad.reshape(-1))[0])
            idx = np.unravel_index(flat, part.shape)
            value = int(part[idx])
            idx = (int(idx[0]) + lo,) + tuple(int(i) for i in idx[1:])
            where = f"sample {idx[0]}" + (f", position {list(idx[1:])}" if len(idx) > 1
                                          else "")
            raise DataError(f"{what}: target '{name}' holds {value} at {where}, outside "
                            f"[0, {classes}) for the {classes} classes of '{output}' (label "
                            f"{ignore_index} marks a position to ignore, as loss.ignore_index)")
        counts = part != ignore_index
        if weight is not None and len(weight) == classes:
            counts &= np.asarray(weight)[np.where(counts, part, 0)] != 0
        all_ignored = all_ignored and not counts.any()
    if all_ignored:  # (a loss of 0/0: nothing to learn)
        weighted = " or of a class whose loss.weight is 0" if weight is not None else ""
        raise DataError(f"{what}: every label of target '{name}' is {ignore_index}, "
                        f"loss.ignore_index{weighted}: no position counts, so there is nothing "
                        f"to {'evaluate' if 'eval' in what else 'train on'} (its loss would be "
                        "0 / 0; PyTorch's is NaN)")


def batch_first_output(out_shape: tuple, local: int, output: str, loss: str,
                       axis: int = 0) -> None:
    """A loss that takes targets per sample needs its output's batch axis (the first; the
    second for ctc's time-major outputs) to be the batch: an output of another layout (a
    recurrent model's [T, N, C]) would meet its targets broadcast instead of row by row."""
    if len(out_shape) > axis and out_shape[axis] != local:
        which = "first" if axis == 0 else "second"
        hint = (" (a time-major [time, batch, classes] output takes loss.time_axis: 0)"
                if loss == "ctc" and axis == 0 else
                " (a batch-major output takes loss.time_axis: 1)" if loss == "ctc" else "")
        raise DataError(f"the {loss} loss output '{output}' has shape {list(out_shape)} for "
                        f"batches of {local} sample(s): its {which} axis is not the batch, so "
                        "its targets cannot be given per sample (export the model with the "
                        f"batch axis {which}, or give the loss an output that has it){hint}")


def ctc_labels(labels: np.ndarray, name: str, what: str, classes: int, blank: int, steps: int,
               output: str, lengths: np.ndarray | None = None,
               lengths_name: str | None = None) -> None:
    """CTC label rows [N, S]: class indices other than the blank, ended by negative padding,
    each row short enough to align with the output's time steps (its labels plus a blank
    between each repeated pair): all `steps` of them, or with loss.lengths each sample's own
    count (integers in [1, steps], one per sample); the first bad one is named."""
    if labels.dtype.kind not in "iu" or labels.ndim != 2:
        raise DataError(f"{what}: target '{name}' must hold integer label rows [N, S] (a row "
                        f"ends at its first negative entry), got {labels.dtype} "
                        f"{list(labels.shape)}")
    labels = np.asarray(labels)
    valid = np.cumprod(labels >= 0, axis=1).astype(bool)
    late = (labels >= 0) & ~valid
    if late.any():
        i, j = np.argwhere(late)[0]
        raise DataError(f"{what}: target '{name}' has a label after its padding at sample {i} "
                        f"(position {j}): a row's labels end at its first negative entry")
    for bad, text in (((labels >= classes) & valid, None), ((labels == blank) & valid, "blank")):
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataError(
                f"{what}: target '{name}' holds the blank class {blank} at sample {i}, position "
                f"{j}: labels are the other classes" if text else
                f"{what}: target '{name}' holds {int(labels[i, j])} at sample {i}, position {j}, "
                f"outside [0, {classes}) for the {classes} classes of '{output}'")
    have = steps
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.dtype.kind not in "iu" or lengths.shape != labels.shape[:1]:
            raise DataError(f"{what}: target '{lengths_name}' (loss.lengths) must hold one "
                            f"integer per sample, [{labels.shape[0]}], got {lengths.dtype} "
                            f"{list(lengths.shape)}")
        bad = (lengths < 1) | (lengths > steps)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{what}: target '{lengths_name}' (loss.lengths) is {int(lengths[i])} "
                            f"at sample {i}, outside [1, {steps}]: each sample's count of valid "
                            f"time steps of '{output}', which has {steps}")
        have = lengths
    repeats = ((labels[:, 1:] == labels[:, :-1]) & valid[:, 1:]).sum(axis=1)
    need = valid.sum(axis=1) + repeats
    short = need > have
    if short.any():
        i = int(np.flatnonzero(short)[0])
        where = f"'{output}' has {steps}" if lengths is None else \
            f"its '{lengths_name}' (loss.lengths) gives {int(lengths[i])}"
        raise DataError(f"{what}: target '{name}' needs {int(need[i])} time steps at sample {i} "
                        f"(its labels, and a blank between repeats), but {where}")


def binary_targets(targets: np.ndarray, name: str, what: str, per_sample: tuple[int, ...],
                   output: str) -> None:
    """Binary cross entropy targets: the output's per-sample shape, numbers in [0, 1] (labels
    0/1, or soft ones); the first bad one is named."""
    regression_targets(targets, name, what, per_sample, output, loss="bce")
    t = np.asarray(targets)
    bad = ~((t >= 0) & (t <= 1))
    if bad.any():
        at = np.argwhere(bad)[0]
        raise DataError(f"{what}: target '{name}' holds {t[tuple(at)]:g} at sample {int(at[0])}: "
                        "binary cross entropy takes targets in [0, 1] (one per element of "
                        f"'{output}')")


# ops whose output holds the values of their first input (rearranged, repeated)
_SAME_VALUES = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose",
                "Expand")


def _negative_wrap(where: onnx.NodeProto, made: Mapping, model: onnx.ModelProto) -> int | None:
    """K where `where` is Where(Less(v, 0), Add(v, K), v) (a negative id counted from the end,
    as tf2onnx writes Keras 3's Embedding), K an integer constant; None otherwise."""
    cond, wrapped, v = (made.get(where.input[0]), made.get(where.input[1]), where.input[2])
    if cond is None or wrapped is None or cond.op_type != "Less" or list(cond.input[:1]) != [v] \
            or wrapped.op_type != "Add" or v not in wrapped.input:
        return None
    value_of = constant_lookup(model)
    zero = _int_constant(cond.input[1], value_of) if len(cond.input) > 1 else None
    k = _int_constant(next((x for x in wrapped.input if x != v), v), value_of)
    return k if zero == 0 and k is not None else None


def _select_wrap(add: onnx.NodeProto, made: Mapping, model: onnx.ModelProto,
                 source: Mapping) -> tuple[str, int] | None:
    """(v, K) where `add` is tf2onnx 1.17's arithmetic form of Where(Less(v, 0), v + K, v):
    Cast(Less(v', 0)) * Add(v, K) + v * Cast(Not(Less(v', 0))), v' being v or a Cast of it
    (Keras 3's Embedding, whatever the order of each Mul's and Add's inputs); None otherwise."""
    if len(add.input) != 2:
        return None
    muls = [made.get(x) for x in add.input]
    if any(m is None or m.op_type != "Mul" or len(m.input) != 2 for m in muls):
        return None

    def producer(x, op):
        n = made.get(x)
        return n if n is not None and n.op_type == op else None

    def less_of(x):  # Cast(Less(...)) or Cast(Not(Less(...))): (the Less, negated)
        cast = producer(x, "Cast")
        if cast is None:
            return None, False
        inner = made.get(cast.input[0])
        if inner is not None and inner.op_type == "Not":
            return producer(inner.input[0], "Less"), True
        return (inner, False) if inner is not None and inner.op_type == "Less" else (None, False)

    value_of = constant_lookup(model)
    for wrap_mul, keep_mul in (muls, muls[::-1]):
        for c, w in (wrap_mul.input, wrap_mul.input[::-1]):
            less, negated = less_of(c)
            added = producer(w, "Add")
            if less is None or negated or added is None:
                continue
            v = next((x for x in keep_mul.input if x in source), None)
            other = next((x for x in keep_mul.input if x != v), None)
            kept, kept_negated = less_of(other) if other else (None, False)
            if v is None or kept is not less or not kept_negated or v not in added.input:
                continue
            tested = less.input[0]
            cast = producer(tested, "Cast")
            zero = value_of(less.input[1]) if len(less.input) > 1 else None
            k = _int_constant(next((x for x in added.input if x != v), v), value_of)
            if (tested == v or cast is not None and cast.input[0] == v) and k is not None \
                    and zero is not None and zero.size == 1 and float(zero.reshape(())) == 0:
                return v, k
    return None


def _int_constant(name: str, value_of) -> int | None:
    """The one integer value of constant `name` (value_of: graph.constant_lookup), or None."""
    value = value_of(name)
    if value is None or value.size != 1 or value.dtype.kind not in "iu":
        return None
    return int(value.reshape(()))


def gather_indices(arrays: Mapping[str, np.ndarray], model: onnx.ModelProto, what: str) -> None:
    """Integer data inputs that a Gather reads as indices into an initializer (an embedding's
    token ids), directly or through ops that keep its values (a Cast, a Reshape: GPT-2's
    ids.view(-1, T)): every value within the gathered axis.
    (The host kernel refuses such an index when it meets it, a device kernel cannot check
    without reading it back; here the whole dataset is checked before training.)"""
    tables = {t.name: tuple(t.dims) for t in model.graph.initializer}
    # value -> (the data input it holds, the wraps of negative ids applied on the way)
    source: dict[str, tuple[str, tuple[int, ...]]] = {k: (k, ()) for k in arrays}
    made = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in _SAME_VALUES and n.input and n.input[0] in source:
            source[n.output[0]] = source[n.input[0]]
        elif n.op_type == "Where" and len(n.input) == 3 and n.input[2] in source:
            k = _negative_wrap(n, made, model)  # (tf2onnx's Keras 3 Embedding)
            if k is not None:
                name, wraps = source[n.input[2]]
                source[n.output[0]] = (name, wraps + (k,))
        elif n.op_type == "Add" and (got := _select_wrap(n, made, model, source)):
            v, k = got  # (the same, as tf2onnx 1.17 writes it: Muls of Casts of Less)
            name, wraps = source[v]
            source[n.output[0]] = (name, wraps + (k,))
    for n in model.graph.node:
        if n.op_type != "Gather" or len(n.input) < 2 or n.input[1] not in source or \
                n.input[0] not in tables or not tables[n.input[0]]:
            continue
        (name, wraps), table = source[n.input[1]], tables[n.input[0]]
        a = arrays[name]
        if a.dtype.kind not in "iuf" or not a.size:
            continue
        axis = next((x.i for x in n.attribute if x.name == "axis"), 0) % len(table)
        size = table[axis]
        ids = a
        if a.dtype.kind == "f":  # (ids stored as floats, converted for the model: 25.0 past a
            # table of 20 was taken modulo its size on a GPU; values that are no whole
            # numbers are named by the conversion's check)
            with np.errstate(invalid="ignore"):
                ids = np.trunc(np.where(np.isfinite(a), a, 0))
        for k in wraps:  # (the values the Gather reads)
            ids = np.where(ids < 0, ids + k, ids)
        if ids.min() >= -size and ids.max() < size:
            continue
        bad = np.argwhere((ids < -size) | (ids >= size))[0]
        raise DataError(f"{what}: input '{name}' holds {int(ids[tuple(bad)])} at sample "
                        f"{int(bad[0])}, but node '{n.name or n.output[0]}' (Gather) reads it as "
                        f"an index into axis {axis} of '{n.input[0]}', which has {size} entries "
                        f"(indices must lie in [{-size}, {size - 1}])")


def regression_targets(targets: np.ndarray, name: str, what: str,
                       per_sample: tuple[int, ...], output: str, loss: str = "mse") -> None:
    if tuple(targets.shape[1:]) != tuple(per_sample):
        raise DataError(f"{what}: target '{name}' has per-sample shape "
                        f"{list(targets.shape[1:])}, but the {loss} loss compares it with "
                        f"'{output}' of per-sample shape {list(per_sample)}")
    if targets.dtype.kind not in "biuf":
        raise DataError(f"{what}: target '{name}' must be numeric, got {targets.dtype}")
