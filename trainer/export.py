"""Write trained values back into the original model (same graph and names), atomically: temp
folder beside the file, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.checkpoint import fsync_dir, fsync_file, make_dirs, write_error
from trainer.errors import ModelError
from trainer.graph import check_model, external_locations, without_initializers
from trainer.memory import is_stub

TWO_GB = 2**31 - 1
_TMP = ".tmp"  # suffix of the temporary folder beside the output
_LOCK = ".lock"  # in it: locked while its export runs (a killed process's lock is released)
# The first bytes of the external-data files exports write (tensors follow at their offsets):
# a data file an export killed before its model was replaced left behind is known as ours by
# them, where another program's file of a candidate name (`model.onnx.data` of a backup copy
# `model.onnx.bak`) is left alone
_DATA_MAGIC = b"onnx-trainer external data\n".ljust(64, b"\0")


def beyond_range(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> dict[str, int]:
    """{tensor: how many of its finite trained values its own type (float16, bfloat16) cannot
    hold}: the export writes them as inf (a float16 model trained in float32 past 65504)."""
    out = {}
    for t in model.graph.initializer:
        if t.name not in values:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        a = np.asarray(values[t.name])
        if dtype.kind != "f" and dtype.name != "bfloat16" or dtype.itemsize >= a.dtype.itemsize \
                or a.dtype.kind != "f":
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            n = int(np.count_nonzero(np.isinf(a.astype(dtype)) & np.isfinite(a)))
        if n:
            out[t.name] = n
    return out


def export_model(model: onnx.ModelProto, values: Mapping[str, np.ndarray], path,
                 metadata: Mapping[str, str] | None = None,
                 keep: Iterable[os.PathLike] = ()) -> Path:
    """Copy of `model` with initializers replaced by `values` (cast to their dtype), saved to
    `path` atomically; models over 2 GB keep their tensors in `<name>.data` beside the file.
    Files in `keep` (what the run reads: the model it started from and its external data)
    are neither written nor removed.

    A full disk or an unwritable folder raises WriteError (a TrainerError) and leaves an
    earlier file at `path`, and the data file it refers to, unchanged.
    """
    inits = {t.name: t for t in model.graph.initializer}
    unknown = sorted(set(values) - set(inits))
    if unknown:
        raise ModelError(f"cannot export: {', '.join(unknown)} are not initializers of the model")
    skeleton = without_initializers(model)  # (the tensors are written one at a time)
    odd = [k for k, v in (metadata or {}).items() if not (isinstance(k, str)
                                                           and isinstance(v, str))]
    if odd:
        raise ModelError(f"cannot export: metadata keys and values are strings; "
                         f"{odd[0]!r} is not or holds no string ({metadata[odd[0]]!r})")
    if metadata:
        props = {p.key: p.value for p in skeleton.metadata_props}
        props.update(metadata)
        onnx.helper.set_model_props(skeleton, props)
    for t in model.graph.initializer:
        if t.name not in values and is_stub(t):  # (a trained tensor's values left the model)
            raise ModelError(f"internal error: cannot export: no values for '{t.name}'")

    def tensors() -> Iterator[Tensor]:
        for t in model.graph.initializer:
            if t.name not in values:
                yield t
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            with np.errstate(over="ignore"):  # (beyond_range names what overflows)
                arr = np.asarray(values[t.name]).astype(dtype, copy=False)
            if arr.size != int(np.prod(t.dims)):
                raise ModelError(f"cannot export: the values for '{t.name}' have shape "
                                 f"{list(arr.shape)}, the model's tensor {list(t.dims)}")
            arr = arr.reshape(tuple(t.dims))
            if arr.dtype.kind in "biufc" and arr.dtype.byteorder in "=<|" and \
                    np.little_endian:  # (its bytes as they are: no copy in a TensorProto)
                header = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                          doc_string=t.doc_string)
                header.metadata_props.extend(t.metadata_props)
                # (np.ascontiguousarray would make a 0-d array 1-d)
                yield header, arr if arr.flags.c_contiguous else arr.copy(order="C")
            else:
                yield _described(numpy_helper.from_array(arr, t.name), t)
    size = skeleton.ByteSize() + sum(
        _header_bytes(t) + np.asarray(values[t.name]).size * np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize + _FRAMING
        if t.name in values else t.ByteSize() + _FRAMING
        for t in model.graph.initializer)
    return _write(skeleton, tensors, size, path, keep, check=True)


# the most bytes _write_initializer frames a tensor with: three fields' keys and lengths
_FRAMING = 3 * 6


def _header_bytes(t: onnx.TensorProto) -> int:
    """The bytes of `t`'s TensorProto without its values (its name, dims, type, doc string
    and metadata): a file just under 2 GB in values was over it with these (an export onnx
    cannot load)."""
    header = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                              doc_string=t.doc_string)
    header.metadata_props.extend(t.metadata_props)
    return header.ByteSize()


def save_model(m: onnx.ModelProto, path, keep: Iterable[os.PathLike] = (),
               check: bool = False) -> Path:
    """`m` saved to `path` atomically (as export_model saves; over 2 GB with external data);
    files in `keep` are neither written nor removed; with `check`, onnx.checker reads the
    written file before it replaces an earlier one (a ModelError if it is not valid)."""
    skeleton = without_initializers(m)
    size = skeleton.ByteSize() + sum(t.ByteSize() + _FRAMING for t in m.graph.initializer)
    return _write(skeleton, lambda: iter(m.graph.initializer), size, path, keep, check)


# Exports of at most this many bytes are read back by onnx.checker before they replace the
# earlier file (it parses the whole file: twice its size in memory); larger ones are the
# input's graph, checked when it was loaded, with tensors of the input's types and shapes
CHECKED_BYTES = 256 << 20
EXTERNAL_MIN = 1024  # tensors of fewer bytes stay in a large model's file (as onnx does)


# A tensor to write: a TensorProto as it is, or (a TensorProto without data, the array whose
# bytes are its raw_data)
Tensor = onnx.TensorProto | tuple[onnx.TensorProto, np.ndarray]


def _write(skeleton: onnx.ModelProto, tensors: Callable[[], Iterator[Tensor]],
           size: int, path, keep: Iterable[os.PathLike], check: bool) -> Path:
    """`skeleton` (a model without its main graph's initializers) with `tensors()` as those,
    written atomically to `path` one tensor at a time: the file is the skeleton's bytes then
    one model message per tensor, which protobuf merges into one model as it reads (a
    message's fields repeated later are merged, a repeated field's items appended), so no
    copy of all the weights is ever built or serialized at once. Over 2 GB the tensors go to
    a `<name>.data` file beside it, as onnx's external data."""
    path = Path(path)
    try:
        make_dirs(path.parent)
        _save(skeleton, tensors, path, size > TWO_GB, keep, check and size <= CHECKED_BYTES)
    except OSError as exc:
        raise write_error(exc, "model", path) from None
    return path


@contextlib.contextmanager
def _holding(lock: Path):
    """An exclusive lock on the file `lock` (made) while the block runs."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _in_use(folder: Path) -> bool:
    """Whether another process's export still runs in the temporary folder `folder` (it
    holds the lock in it; one killed, or one of before the lock, holds none)."""
    try:
        fd = os.open(folder / _LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _resolved(path) -> Path | None:
    try:
        return Path(path).absolute().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _save(skeleton: onnx.ModelProto, tensors: Callable[[], Iterator[Tensor]],
          path: Path, large: bool, keep: Iterable[os.PathLike], check: bool) -> None:
    folder = path.parent
    # The data file gets a name the current file does not use, so until the model itself is
    # renamed into place the old model and its data stay a consistent pair.
    candidates = [f"{path.name}.data"] + [f"{path.name}.{k}.data" for k in range(1, 8)]
    # (names another model in the folder reads are neither written nor removed: the model
    # training started from may keep its weights in `<output>.data`; each .onnx file's framing
    # is read, not its tensors' bytes)
    others = set().union(*(_external_locations(f) for f in folder.glob("*.onnx")
                           if f.name != path.name and f.is_file()))
    kept = {_resolved(f) for f in keep} - {None}
    candidates = [c for c in candidates
                  if c not in others and _resolved(folder / c) not in kept]
    data_name = None
    replaced = _external_locations(path)  # (the data of the model this export replaces)
    for stale in folder.glob(f".{glob.escape(path.name)}.*{_TMP}"):  # of a killed export
        if not _in_use(stale):  # (not another process's export in progress to this output)
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.", suffix=_TMP) as tmp, \
            _holding(Path(tmp) / _LOCK):
        tmp_model = Path(tmp) / path.name
        if large:
            # (a name no file has, or one of a data file of ours no model reads any more)
            data_name = next((c for c in candidates if c not in replaced and (
                not os.path.lexists(folder / c) or _ours(folder / c))), None)
            if data_name is None:
                raise ModelError(f"cannot export {path} with its tensors in a data file beside "
                                 f"it: the names {path.name}.data and {path.name}.1.data to "
                                 f".7.data are all files of other models; move them, or give "
                                 "another output name")
            with open(Path(tmp) / data_name, "wb") as data:
                data.write(_DATA_MAGIC)
                for t in tensors():
                    skeleton.graph.initializer.append(_stored_in(t, data, data_name))
                written = data.tell() > len(_DATA_MAGIC)
            onnx.save_model(skeleton, str(tmp_model))
            if check:
                check_model(tmp_model, "exported model")
            if written:
                fsync_file(Path(tmp) / data_name)
                os.replace(Path(tmp) / data_name, folder / data_name)
                fsync_dir(folder)
            else:  # (every tensor small: all of them in the model's file)
                data_name = None
        else:
            with open(tmp_model, "wb") as f:
                f.write(skeleton.SerializeToString())
                for t in tensors():
                    _write_initializer(f, t)
            if check:
                check_model(tmp_model, "exported model")
        fsync_file(tmp_model)
        os.replace(tmp_model, path)
        fsync_dir(folder)
    for stale in candidates:  # data of the replaced model, or of an export that was killed
        if stale != data_name and (folder / stale).is_file() and (
                stale in replaced or _ours(folder / stale)):
            (folder / stale).unlink()


def _ours(path: Path) -> bool:
    """Whether the data file at `path` was written by an export (begins with _DATA_MAGIC)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_DATA_MAGIC)) == _DATA_MAGIC
    except OSError:
        return False


def _external_locations(path: Path) -> set[str]:
    """External-data file names the model currently at `path` refers to (none if unreadable)."""
    if not path.is_file():
        return set()
    try:  # (from the file's framing: a model holding its weights is not read whole)
        return external_locations(path)
    except Exception:  # noqa: BLE001 - a damaged or foreign file refers to nothing we wrote
        return set()


# Field numbers of onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _write_initializer(f, t: Tensor) -> None:
    """One model message holding one more initializer, written to `f` (protobuf merges it
    into the model before it): ModelProto{graph{initializer{t}}}, framed by hand so that an
    array's bytes go to the file from its own memory, and a TensorProto's serialization is
    the only copy of it."""
    if isinstance(t, tuple):
        header, arr = t
        raw = arr.reshape(-1).view(np.uint8)  # (its bytes, not a copy)
        head = header.SerializeToString() + _field(_RAW_DATA, len(raw))
        size = len(head) + len(raw)
    else:
        head, raw = t.SerializeToString(), b""
        size = len(head)
    inner = _field(_INITIALIZER, size)
    f.write(_field(_GRAPH, len(inner) + size) + inner + head)
    f.write(raw)


def _stored_in(t: Tensor, data, name: str) -> onnx.TensorProto:
    """`t` for a large model's file: its raw bytes appended to the open file `data` (named
    `name` beside the model) and referred to there, as onnx's external data; small tensors
    and those of other fields stay as they are."""
    if isinstance(t, tuple):
        header, arr = t
        if arr.nbytes < EXTERNAL_MIN:
            return _described(numpy_helper.from_array(arr, header.name), header)
        out, raw = header, arr.reshape(-1).view(np.uint8)
    else:
        if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN:
            return t
        raw = t.raw_data
        out = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims),
                               doc_string=t.doc_string)
        out.metadata_props.extend(t.metadata_props)
    offset = data.tell()
    data.write(raw)
    out.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", name), ("offset", str(offset)), ("length", str(len(raw)))):
        out.external_data.add(key=key, value=value)
    return out


def _described(t: onnx.TensorProto, like: onnx.TensorProto) -> onnx.TensorProto:
    """`t` with the doc string and metadata_props of the tensor `like` it stands for."""
    t.doc_string = like.doc_string
    t.metadata_props.extend(like.metadata_props)
    return t
