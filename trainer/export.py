"""Write trained values back into the original model (same graph and names), atomically."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trainer.errors import ModelError
from trainer.graph import check_model

TWO_GB = 2**31 - 1


def export_model(model: onnx.ModelProto, values: Mapping[str, np.ndarray], path,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Copy of `model` with initializers replaced by `values` (cast to their dtype), saved to
    `path` atomically; models over 2 GB keep their tensors in `<name>.data` beside the file."""
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    unknown = sorted(set(values) - set(inits))
    if unknown:
        raise ModelError(f"cannot export: {', '.join(unknown)} are not initializers of the model")
    for name, value in values.items():
        old = inits[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        arr = np.asarray(value).astype(dtype, copy=False).reshape(tuple(old.dims))
        old.CopyFrom(numpy_helper.from_array(arr, name))
    if metadata:
        props = {p.key: p.value for p in m.metadata_props}
        props.update(metadata)
        onnx.helper.set_model_props(m, props)
    check_model(m, "exported model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = m.ByteSize() > TWO_GB if _fits_bytesize(m) else True
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_model = Path(tmp) / path.name
        if large:
            data_name = f"{path.name}.data"
            onnx.save_model(m, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name)
            _fsync(Path(tmp) / data_name)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(m, str(tmp_model))
        _fsync(tmp_model)
        os.replace(tmp_model, path)
    return path


def _fits_bytesize(m: onnx.ModelProto) -> bool:
    try:
        m.ByteSize()
        return True
    except Exception:  # noqa: BLE001 - protobuf refuses to size messages over 2 GB
        return False


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
