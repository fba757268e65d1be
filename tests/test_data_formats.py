"""Datasets as directories of memory-mapped .npy files, several inputs and targets per example, a
correctly weighted last batch (drop_last: false) against PyTorch, and background prefetch."""

from __future__ import annotations

import io
import re
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES
from trainer import data as data_module
from trainer.comm.local import run_local
from trainer.config import config_from_dict
from trainer.data import Batches, describe_arrays, load_arrays
from trainer.errors import DataError
from trainer.train import Trainer


def _npy_dir(path, **arrays):
    path.mkdir(parents=True, exist_ok=True)
    for k, v in arrays.items():
        np.save(path / f"{k}.npy", v)
    return path


def _digits_dir(tmp_path, n=None):
    d = np.load(EXAMPLES / "digits.npz")
    return _npy_dir(tmp_path / "digits", x=d["x_train"][:n], y=d["y_train"][:n],
                    xt=d["x_test"], yt=d["y_test"])


def _fit(tmp_path, raw, world=1):
    if world == 1:
        t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        t.fit()
        return t.trained_values()

    def job(comm):
        t = Trainer(config_from_dict(raw, tmp_path), comm=comm, stream=io.StringIO())
        t.fit()
        return t.trained_values()
    return run_local(world, job)[0]


# -- .npy directories -------------------------------------------------------------------------
def test_a_directory_of_npy_files_is_memory_mapped(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 64)).astype(np.float32)
    _npy_dir(tmp_path / "d", x=x, y=np.arange(1000))
    got = load_arrays(tmp_path / "d", {"input": "x", "label": "y"}, "data.train")
    assert isinstance(got["input"], np.memmap) and not got["input"].flags.writeable
    np.testing.assert_array_equal(got["input"], x)
    info = describe_arrays(tmp_path / "d", {"input": "x", "label": "y"}, "data.train")
    assert info == {"input": ((1000, 64), np.dtype(np.float32), True),
                    "label": ((1000,), np.dtype(np.int64), True)}


def test_memory_mapped_data_is_not_read_into_memory(tmp_path):
    """A 64 MiB array is opened and checked (NaN scan in chunks) without holding it."""
    n = 1 << 14
    big = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                    shape=(n, 1024))
    big[::97] = 1.0
    big.flush()
    del big
    np.save(tmp_path / "y.npy", np.zeros(n, np.int64))
    tracemalloc.start()
    try:
        got = load_arrays(tmp_path, {"input": "x", "label": "y"}, "data.train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got["input"].shape == (n, 1024)
    assert peak < 24 << 20, peak  # the file is 64 MiB; checked 16 MiB at a time


def test_training_from_npy_files_equals_training_from_npz(tmp_path, digits_config):
    raw = digits_config(steps=12, data__shuffle=True)
    from_npz = _fit(tmp_path, raw)
    folder = _digits_dir(tmp_path)
    raw["data"]["train"] = {"path": str(folder), "inputs": {"x": "x"}, "targets": {"label": "y"}}
    raw["data"]["eval"] = {"path": str(folder), "inputs": {"x": "xt"},
                           "targets": {"label": "yt"}}
    from_npy = _fit(tmp_path, raw)
    for k, v in from_npz.items():
        np.testing.assert_array_equal(from_npy[k], v, err_msg=k)


def test_memory_mapped_data_of_another_type_is_converted_per_batch(tmp_path, digits_config):
    """float64 data on disk for a float32 model: converted batch by batch, same training as
    converting the whole array first."""
    d = np.load(EXAMPLES / "digits.npz")
    raw = digits_config(steps=6)
    raw["data"]["eval"] = None
    f32 = _npy_dir(tmp_path / "f32", x=d["x_train"].astype(np.float32), y=d["y_train"])
    f64 = _npy_dir(tmp_path / "f64", x=d["x_train"].astype(np.float64),
                   y=d["y_train"].astype(np.int32))
    out = []
    for folder in (f32, f64):
        raw["data"]["train"] = {"path": str(folder), "inputs": {"x": "x"},
                                "targets": {"label": "y"}}
        out.append(_fit(tmp_path, raw))
    for k in out[0]:
        np.testing.assert_array_equal(out[0][k], out[1][k])


@pytest.mark.parametrize("where", ["npz", "mapped"])
def test_finite_data_beyond_the_models_type_is_refused_before_training(tmp_path, digits_config,
                                                                       monkeypatch, where):
    """1e39 in a float64 dataset is finite there and inf in the float32 model: the run failed
    at the step reaching that sample, advising a lower lr (`on_nan: skip` dropped the batch
    every epoch). Refused before step 1, naming the array, sample and position; a memory-mapped
    file is converted chunk by chunk."""
    from trainer import preflight

    d = np.load(EXAMPLES / "digits.npz")
    x = d["x_train"].astype(np.float64)
    x[37, 5] = 1e39
    raw = digits_config(steps=2)
    raw["data"]["eval"] = None
    if where == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=d["y_train"])
        path = tmp_path / "d.npz"
    else:
        path = _npy_dir(tmp_path / "f64", x=x, y=d["y_train"])
        monkeypatch.setattr(preflight, "_RANGE_CHUNK", 64 * 8 * 4)  # 4 samples at a time
    raw["data"]["train"] = {"path": str(path), "inputs": {"x": "x"}, "targets": {"label": "y"}}
    with pytest.raises(DataError, match=r"array 'x' \(for 'x'\) holds 1e\+39 at sample 37, "
                       r"position \[5\], beyond the range of float32"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    x[37, 5] = 3.4e38  # (in float32's range: trains)
    np.save(path / "x.npy", x) if where == "mapped" else np.savez(path, x=x, y=d["y_train"])
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


def _uint8_model(path, kind=TensorProto.UINT8):
    """img (kind) [N, 6] -> Cast -> / 255 -> MatMul W [6, 3] -> logits."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Cast", ["img"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["f", "s"], ["fs"]),
         helper.make_node("MatMul", ["fs", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("img", kind, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array(1 / 255, np.float32), "s")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _img_case(tmp_path, monkeypatch, img: np.ndarray, where: str):
    """(dataset path, config, labels) of `img` [32, 6] for _uint8_model's m.onnx, as an .npz
    or (where "mapped") a folder of .npy files checked 4 samples at a time."""
    from trainer import preflight

    y = np.random.default_rng(2).integers(0, 3, len(img))
    if where == "npz":
        np.savez(tmp_path / "d.npz", img=img, y=y)
        path = tmp_path / "d.npz"
    else:
        path = _npy_dir(tmp_path / "mapped", img=img, y=y)
        monkeypatch.setattr(preflight, "_RANGE_CHUNK", 4 * img[:1].nbytes)
    raw = {"model": "m.onnx", "device": "cpu", "steps": 1,
           "data": {"train": {"path": str(path), "inputs": {"img": "img"},
                              "targets": {"label": "y"}}, "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": 0.1}}
    return path, raw, y


@pytest.mark.parametrize("kind,dtype,value,where", [
    (TensorProto.UINT8, np.int64, 300, "npz"), (TensorProto.UINT8, np.int64, -5, "mapped"),
    (TensorProto.UINT8, np.float32, 256.0, "npz"), (TensorProto.INT8, np.uint16, 128, "npz"),
    (TensorProto.BOOL, np.int64, 2, "npz")])
def test_integers_beyond_an_integer_inputs_type_are_refused(tmp_path, monkeypatch, kind, dtype,
                                                            value, where):
    """300 into a uint8 image input was cast to 44 (and -5 to 251) and trained in silence;
    refused before training, naming the array, sample and position; the same data inside the
    range trains."""
    _uint8_model(tmp_path / "m.onnx", kind)
    img = np.random.default_rng(1).integers(0, 2, (32, 6)).astype(dtype)
    img[21, 4] = value
    path, raw, y = _img_case(tmp_path, monkeypatch, img, where)
    want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kind))
    span = "0 to 1" if want.kind == "b" else f"{np.iinfo(want).min} to {np.iinfo(want).max}"
    with pytest.raises(DataError, match=re.escape(
            f"array 'img' (for 'img') holds {img[21, 4]} at sample 21, position [4], beyond the "
            f"range of {want} ({span})")):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    img[21, 4] = 1
    np.save(path / "img.npy", img) if where == "mapped" else np.savez(path, img=img, y=y)
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("where", ["npz", "mapped"])
def test_fractions_for_an_integer_input_are_refused_memory_mapped_too(tmp_path, monkeypatch,
                                                                      where):
    """0.5 into a uint8 input was refused from an .npz but, memory-mapped from a folder of
    .npy files, truncated to 0 and trained in silence; both refused, naming the sample (the
    mapped file read 4 samples at a time here, so the sample's number counts the chunks)."""
    _uint8_model(tmp_path / "m.onnx")
    img = np.random.default_rng(1).integers(0, 2, (32, 6)).astype(np.float32)
    img[21, 4] = 0.5
    path, raw, y = _img_case(tmp_path, monkeypatch, img, where)
    with pytest.raises(DataError, match=re.escape(
            "'img' holds values that are not whole numbers (sample 21: 0.5), but the model's "
            "input takes uint8")):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    img[21, 4] = 1
    np.save(path / "img.npy", img) if where == "mapped" else np.savez(path, img=img, y=y)
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("loss", ["bce", "mse"])
@pytest.mark.parametrize("where", ["npz", "mapped"])
def test_bool_targets_train_as_their_zeros_and_ones(tmp_path, loss, where):
    """Multi-label targets stored as bool were refused ("must be numeric, got bool") where
    the same 0/1 values as uint8 trained; bool inputs were taken all along."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                          [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    x = rng.standard_normal((16, 4)).astype(np.float32)
    t = rng.integers(0, 2, (16, 3))
    out = []
    for kind in (np.uint8, bool):
        name = f"{np.dtype(kind).name}"
        if where == "npz":
            np.savez(tmp_path / f"{name}.npz", x=x, t=t.astype(kind))
            path = tmp_path / f"{name}.npz"
        else:
            path = _npy_dir(tmp_path / name, x=x, t=t.astype(kind))
        raw = {"model": "m.onnx", "device": "cpu", "steps": 3,
               "data": {"train": {"path": str(path), "inputs": {"x": "x"},
                                  "targets": {"t": "t"}}, "batch_size": 8},
               "loss": {"type": loss, "output": "logits", "target": "t"}
               | ({"logits": True} if loss == "bce" else {}),
               "optimizer": {"type": "sgd", "lr": 0.1}}
        out.append(_fit(tmp_path, raw))
    for k in out[0]:
        np.testing.assert_array_equal(out[0][k], out[1][k])


@pytest.mark.parametrize("limit", [{"steps": 2}, {"epochs": 2}])
def test_fewer_samples_than_processes_is_refused_with_steps_too(tmp_path, digits_config, limit):
    """3 samples on 4 processes (drop_last: false): no batch per epoch, as the pre-flight says.
    With `epochs` that was refused; with `steps` every step trained on the partial batch that
    the pre-flight said is left out, one rank holding none of it."""
    from trainer.report import preflight

    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "d.npz", x=d["x_train"][:3], y=d["y_train"][:3])
    raw = {**digits_config(data__batch_size=4, data__drop_last=False, steps=None), **limit}
    raw["data"]["train"] = {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                            "targets": {"label": "y"}}
    raw["data"]["eval"] = None
    cfg = config_from_dict(raw, tmp_path)
    want = r"data.train has 3 sample\(s\), fewer than one per process \(4 processes\)"
    with pytest.raises(DataError, match=want):
        run_local(4, lambda comm: Trainer(cfg, comm=comm, stream=io.StringIO()))
    assert any(re.search(want, str(p)) for p in preflight(cfg, world=4).problems)


def test_one_hot_labels_are_answered_with_argmax(tmp_path, digits_config):
    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "d.npz", x=d["x_train"], y=np.eye(10, dtype=np.float32)[d["y_train"]])
    raw = digits_config(steps=1)
    raw["data"]["train"] = {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                            "targets": {"label": "y"}}
    with pytest.raises(DataError, match=r"must hold integer class labels, got float32; "
                       r"'label' is shaped like 'logits': one-hot rows are stored as class "
                       r"indices with np.argmax\(label, axis=1\)"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


@pytest.mark.parametrize("key, match", [
    ("../x", "must be a plain file name"),
    ("a/b", "must be a plain file name"),
    ("missing", r"no missing\.npy; it has x"),
])
def test_bad_keys_are_named(tmp_path, key, match):
    _npy_dir(tmp_path / "d", x=np.zeros(3))
    with pytest.raises(DataError, match=match):
        load_arrays(tmp_path / "d", {"input": key}, "data.train")


def test_damaged_and_unusable_npy_files_are_refused(tmp_path):
    folder = _npy_dir(tmp_path / "d", x=np.zeros((4, 3)), o=np.array([{"a": 1}], dtype=object))
    raw = (folder / "x.npy").read_bytes()
    (folder / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(DataError, match=r"declares shape \[4, 3\].*stores 88 bytes.*damaged"):
        load_arrays(folder, {"input": "cut"}, "data.train")
    with pytest.raises(DataError, match="Python objects.*without pickle"):
        load_arrays(folder, {"input": "o"}, "data.train")
    (folder / "link.npy").symlink_to(tmp_path / "outside.npy")
    np.save(tmp_path / "outside.npy", np.zeros(3))
    with pytest.raises(DataError, match="links outside the dataset folder"):
        load_arrays(folder, {"input": "link"}, "data.train")


def test_non_finite_values_are_found_chunk_by_chunk(tmp_path, monkeypatch):
    x = np.zeros((50, 4), np.float32)
    x[37, 2] = np.nan
    _npy_dir(tmp_path / "d", x=x)
    monkeypatch.setattr(data_module, "_CHECK_CHUNK", 64)  # 4 samples per chunk
    with pytest.raises(DataError, match=r"holds nan at sample 37, position \[2\]"):
        load_arrays(tmp_path / "d", {"input": "x"}, "data.train")


def test_sample_counts_must_agree_across_files(tmp_path):
    _npy_dir(tmp_path / "d", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="share their first"):
        load_arrays(tmp_path / "d", {"input": "x", "label": "y"}, "data.train")


# -- several inputs and targets ---------------------------------------------------------------
def _two_input_model(path):
    """y = relu(a @ W1 + b @ W2) @ W3: two graph inputs, one output (mse against a target)."""
    rng = np.random.default_rng(0)
    w = {k: (0.3 * rng.standard_normal(s)).astype(np.float32)
         for k, s in (("w1", (5, 8)), ("w2", (3, 8)), ("w3", (8, 2)))}
    nodes = [helper.make_node("MatMul", ["a", "w1"], ["ha"]),
             helper.make_node("MatMul", ["b", "w2"], ["hb"]),
             helper.make_node("Add", ["ha", "hb"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w3"], ["y"])]
    g = helper.make_graph(nodes, "two", [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return w


def test_two_inputs_and_extra_targets_train_as_torch(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    a = rng.standard_normal((n, 5)).astype(np.float32)
    b = rng.standard_normal((n, 3)).astype(np.float32)
    t = rng.standard_normal((n, 2)).astype(np.float32)
    folder = _npy_dir(tmp_path / "d", a=a, b=b, t=t, unused=np.arange(n))
    w = _two_input_model(tmp_path / "m.onnx")
    raw = {"model": str(tmp_path / "m.onnx"), "output": str(tmp_path / "o.onnx"),
           "device": "cpu", "precision": "fp64",
           "data": {"train": {"path": str(folder), "inputs": {"a": "a", "b": "b"},
                              "targets": {"target": "t", "other": "unused"}},
                    "batch_size": 8, "shuffle": False},
           "loss": {"type": "mse", "output": "y", "target": "target"},
           "optimizer": {"type": "sgd", "lr": 0.1}, "steps": 5}
    got = _fit(tmp_path, raw)
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in w.items()}
    opt = torch.optim.SGD(list(p.values()), lr=0.1)
    for k in range(5):
        s = slice(8 * k, 8 * k + 8)
        xa, xb, y = (torch.tensor(v[s], dtype=torch.float64) for v in (a, b, t))
        out = torch.relu(xa @ p["w1"] + xb @ p["w2"]) @ p["w3"]
        loss = F.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in p.items():
        np.testing.assert_allclose(got[k], v.detach().numpy(), rtol=1e-6, atol=1e-6)


# -- the last batch ---------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_last_partial_batch_is_weighted_as_torch(tmp_path, digits_config, world):
    """100 samples, batch 32, drop_last false: batches of 32, 32, 32 and 4, each the mean of
    its own samples (torch DataLoader(drop_last=False) + F.cross_entropy), over 2 epochs; on
    2 ranks the last batch is split 2 + 2."""
    d = np.load(EXAMPLES / "digits.npz")
    x, y = d["x_train"][:100].astype(np.float64), d["y_train"][:100]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = digits_config(precision="fp64", steps=None, epochs=2,
                        optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9})
    raw["data"] = {"train": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                             "targets": {"label": "y"}},
                   "batch_size": 32, "shuffle": False, "drop_last": False}
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = _fit(tmp_path, raw, world)
    # digits_mlp: logits = relu(x @ fc1.W^T + b1) @ fc2.W^T + b2 (Gemm transB)
    names = [t.name for t in model.graph.initializer]
    p = {k: torch.tensor(init[k], dtype=torch.float64, requires_grad=True) for k in names}
    w1, b1, w2, b2 = (p[k] for k in names)
    opt = torch.optim.SGD(list(p.values()), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y).long()),
        batch_size=32, shuffle=False, drop_last=False)
    steps = 0
    for _ in range(2):
        for xb, yb in loader:
            logits = torch.relu(xb @ w1.T + b1) @ w2.T + b2
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    assert steps == 8
    for k in names:
        np.testing.assert_allclose(got[k], p[k].detach().numpy(), rtol=1e-9, atol=1e-11,
                                   err_msg=k)


# -- prefetch -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
def test_prefetch_gives_the_same_batches(tmp_path, shuffle):
    arrays = {"x": np.arange(103 * 3).reshape(103, 3), "y": np.arange(103)}
    plain = Batches(arrays, 10, shuffle=shuffle, drop_last=False, seed=4)
    ahead = Batches(arrays, 10, shuffle=shuffle, drop_last=False, seed=4, prefetch=True)
    spe = plain.steps_per_epoch
    # in order across epochs, then jumps (a resume, a repeated batch) that miss the prefetch
    keys = [(e, i) for e in range(3) for i in range(spe)] + [(1, 3), (1, 3), (0, spe - 1), (5, 0)]
    for e, i in keys:
        order = plain.order(e)
        a, b = plain.get(e, i, order), ahead.get(e, i, order)
        assert a[1:] == b[1:]
        for k in arrays:
            np.testing.assert_array_equal(a[0][k], b[0][k])
    ahead.close()


def test_prefetch_does_not_change_training(tmp_path, digits_config):
    raw = digits_config(steps=50)  # crosses an epoch boundary (44 batches per epoch)
    out = []
    for prefetch in (False, True):
        raw["data"]["prefetch"] = prefetch
        out.append(_fit(tmp_path, raw))
    for k in out[0]:
        np.testing.assert_array_equal(out[0][k], out[1][k])


def test_eval_of_fewer_samples_than_processes_is_scored_as_training_scores_it(tmp_path,
                                                                          digits_config):
    """`onnx-trainer eval` under 2 processes on a 1-sample eval set blamed data.train (which
    it does not read), after NumPy warnings from a batch of 0 samples; then refused it, where
    training's evaluation scored it. It is scored as one process scores it, warning-free."""
    import warnings

    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "one.npz", x=d["x_test"][:1], y=d["y_test"][:1])
    raw = digits_config()
    raw["data"]["eval"] = {"path": str(tmp_path / "one.npz"), "inputs": {"x": "x"},
                           "targets": {"label": "y"}}
    cfg = config_from_dict(raw, tmp_path)
    alone = Trainer(cfg, stream=io.StringIO(), writes=False).evaluate()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = run_local(2, lambda comm: Trainer(cfg, comm=comm, stream=io.StringIO(),
                                                writes=False).evaluate())
    assert got[0] == got[1] == pytest.approx(alone, abs=1e-6)
    # (a data.batch_size the processes do not divide: eval trains nothing, it was refused)
    odd = config_from_dict({**raw, "data": {**raw["data"], "batch_size": 3}}, tmp_path)
    got = run_local(2, lambda comm: Trainer(odd, comm=comm, stream=io.StringIO(), check=False,
                                            writes=False).evaluate())  # (as the CLI's)
    assert got[0] == pytest.approx(alone, abs=1e-6)


def _tiny_model(path, x_dims, extra=()):
    """logits = ReduceMean(x, axis 0 or 1) @ W (+ an extra scalar input `temp` divides)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["x", "ax"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["z"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)]
    if "temp" in extra:
        nodes.append(helper.make_node("Div", ["z", "temp"], ["logits"]))
        inputs.append(helper.make_tensor_value_info("temp", TensorProto.FLOAT, []))
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["logits"]))
    axis = 0 if x_dims[0] == 4 else 1  # (time-major: the mean over time, axis 0)
    g = helper.make_graph(nodes, "g", inputs,
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                         ["N", 3])],
                          [numpy_helper.from_array(np.array([axis], np.int64), "ax"),
                           numpy_helper.from_array(np.ones((5, 3), np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_a_time_major_input_is_refused_not_fed_time_steps_for_samples(tmp_path):
    """[T, batch, F] (a time-major export, batch on axis 1): the data's samples went on axis
    0, time steps for samples, silently at a batch of T and refused at others with "give the
    model a dynamic batch axis", which it has. Refused, naming the axis."""
    _tiny_model(tmp_path / "m.onnx", [4, "batch", 5])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 4, 5)).astype(np.float32),
             y=rng.integers(0, 3, 16))
    raw = {"model": "m.onnx", "device": "cpu", "steps": 1,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": 4},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    with pytest.raises(DataError, match=r"'x' \[4, 'batch', 5\] has its batch axis 'batch' at "
                       r"position 1"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


def test_a_scalar_input_mapped_to_per_sample_data_is_refused(tmp_path):
    """A model input of shape [] mapped in data.train.inputs passed the per-sample check
    (both () past the first axis): an internal error at one batch size, a Div's broadcast
    error at another. Refused, pointing to data.constants."""
    _tiny_model(tmp_path / "m.onnx", ["N", 4, 5], extra=("temp",))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((12, 4, 5)).astype(np.float32),
             t=np.ones(12, np.float32), y=rng.integers(0, 3, 12))
    raw = {"model": "m.onnx", "device": "cpu", "steps": 1,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x", "temp": "t"},
                              "targets": {"label": "y"}}, "batch_size": 3},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    with pytest.raises(DataError, match=r"input 'temp' is a scalar .* data.constants"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    raw["data"]["train"]["inputs"] = {"x": "x"}
    raw["data"]["constants"] = {"temp": 2.0}
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()


def test_memory_mapped_targets_are_evaluated_as_in_memory_ones(tmp_path):
    """float64 mse targets are rounded to the output's float32, as training uses them: an
    .npz's at load, a memory-mapped folder's only in the training batches, so the same data
    gave another eval_loss from the folder (unrounded targets)."""
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(
                              rng.standard_normal((3, 2)).astype(np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "m.onnx")
    x = rng.standard_normal((16, 3)).astype(np.float32)
    t = rng.random((16, 2)) * 1000 + 1e-4 * rng.random((16, 2))  # (not float32 numbers)
    np.savez(tmp_path / "d.npz", x=x, t=t)
    _npy_dir(tmp_path / "dir", x=x, t=t)
    got = {}
    for path in ("d.npz", "dir"):
        ds = {"path": path, "inputs": {"x": "x"}, "targets": {"t": "t"}}
        raw = {"model": "m.onnx", "output": f"o_{path}/m.onnx", "device": "cpu",
               "data": {"train": ds, "eval": ds, "batch_size": 8},
               "loss": {"type": "mse", "output": "y", "target": "t"},
               "optimizer": {"type": "sgd", "lr": 0.0}, "steps": 1}
        tr = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
        got[path] = tr.evaluate()["eval_loss"]
    assert isinstance(tr.eval_arrays["t"], np.memmap)
    assert got["dir"] == got["d.npz"]
