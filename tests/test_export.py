"""Export and model loading: faithful copy, atomic write, external data, path safety."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import trainer.export as export_mod
from tests.conftest import EXAMPLES
from trainer.errors import ModelError
from trainer.export import export_model
from trainer.graph import load_model


def test_export_replaces_only_values(tmp_path):
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    w = np.full((10, 128), 0.5, np.float64)  # float64 values are cast to the model's dtype
    path = export_model(model, {"fc2.weight": w}, tmp_path / "sub" / "m.onnx", {"k": "v"})
    out = onnx.load(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert arrays["fc2.weight"].dtype == np.float32 and (arrays["fc2.weight"] == 0.5).all()
    src = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(arrays["fc1.weight"], src["fc1.weight"])
    assert {p.key: p.value for p in out.metadata_props}["k"] == "v"
    assert sorted(p.name for p in tmp_path.joinpath("sub").iterdir()) == ["m.onnx"]


def test_export_rejects_unknown_names(tmp_path):
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    with pytest.raises(ModelError, match="not initializers"):
        export_model(model, {"nope": np.zeros(1)}, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    path = export_model(model, {}, tmp_path / "m.onnx")
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(export_mod.onnx, "save_model", broken)
    with pytest.raises(OSError):
        export_model(model, {"fc2.bias": np.ones(10)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left


def test_large_models_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "TWO_GB", 1000)  # treat this small model as "large"
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    path = export_model(model, {"fc2.bias": np.ones(10)}, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    loaded = load_model(path)
    bias = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}["fc2.bias"]
    assert (bias == 1).all()


def test_external_data_outside_the_folder_is_refused(tmp_path):
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 40960)
    inner = tmp_path / "models"
    inner.mkdir()
    t = next(t for t in model.graph.initializer if t.name == "fc1.weight")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, inner / "m.onnx")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(inner / "m.onnx")


@pytest.mark.parametrize("large", [False, True], ids=["one-file", "external-data"])
def test_an_export_leaves_another_models_data_alone(tmp_path, monkeypatch, large):
    """The model training starts from keeps its weights in `b.onnx.data`, and the output is
    `b.onnx`: the export removed (or, written with external data, replaced) that file, as
    data of a model it replaced. Names another model in the folder reads are left alone."""
    if large:
        monkeypatch.setattr(export_mod, "TWO_GB", 1000)
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    onnx.save_model(model, str(tmp_path / "a.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    before = (tmp_path / "b.onnx.data").read_bytes()
    out = export_model(load_model(tmp_path / "a.onnx"), {"fc2.bias": np.ones(10)},
                       tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx.data").read_bytes() == before
    weights = {t.name: numpy_helper.to_array(t)
               for t in load_model(tmp_path / "a.onnx").graph.initializer}
    assert not (weights["fc2.bias"] == 1).all()
    assert (numpy_helper.to_array(next(t for t in load_model(out).graph.initializer
                                       if t.name == "fc2.bias")) == 1).all()
