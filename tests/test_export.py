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


@pytest.mark.parametrize("large", [False, True], ids=["one-file", "external-data"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, large):
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    path = export_model(model, {}, tmp_path / "m.onnx")
    before = path.read_bytes()
    if large:
        monkeypatch.setattr(export_mod, "TWO_GB", 1000)

    def broken(*a, **k):  # (the written file's flush to disk fails)
        raise OSError("disk full")
    monkeypatch.setattr(export_mod, "fsync_file", broken)
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


@pytest.mark.parametrize("how", ["values", "model"])
def test_a_file_that_would_pass_2_gb_by_its_tensors_headers_takes_external_data(
        tmp_path, monkeypatch, how):
    """The size that chooses external data left out each tensor's name, dims and framing: an
    export whose values alone were just under 2 GB was written as one file over it, which
    onnx cannot load (the limit is scaled down here to the file's own size less one)."""
    from onnx import TensorProto, helper

    names = [f"model.layers.{i}.mlp.a_rather_long_projection_name.weight" for i in range(64)]
    values = {n: np.full((2, 256), i, np.float32) for i, n in enumerate(names)}
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [numpy_helper.from_array(np.zeros((2, 256), np.float32), n)
                           for n in names])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    def write(folder):
        if how == "values":
            return export_model(m, values, folder / "model.onnx")
        trained = onnx.ModelProto()
        trained.CopyFrom(m)
        for t in trained.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
        return export_mod.save_model(trained, folder / "model.onnx")

    one = write(tmp_path / "one")
    assert sorted(p.name for p in one.parent.iterdir()) == ["model.onnx"]
    monkeypatch.setattr(export_mod, "TWO_GB", one.stat().st_size - 1)
    two = write(tmp_path / "two")
    assert sorted(p.name for p in two.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    got = {t.name: numpy_helper.to_array(t, base_dir=str(two.parent))
           for t in onnx.load(str(two)).graph.initializer}
    for n, v in values.items():
        np.testing.assert_array_equal(got[n], v)


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


@pytest.mark.parametrize("large", [False, True], ids=["one-file", "external-data"])
def test_an_export_removes_only_data_files_it_or_the_replaced_model_wrote(tmp_path,
                                                                          monkeypatch, large):
    """`b.onnx.data` of a backup copy `b.onnx.bak` (no `*.onnx` name, so not scanned) was
    removed by an export to `b.onnx` as a candidate data name; the data of the model the export
    replaces, and a data file of an export killed before its model was replaced, still go."""
    onnx.save_model(onnx.load(EXAMPLES / "digits_mlp.onnx"), str(tmp_path / "b.onnx.bak"),
                    save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    backup = (tmp_path / "b.onnx.data").read_bytes()
    if large:
        monkeypatch.setattr(export_mod, "TWO_GB", 1000)
    export_model(model, {"fc2.bias": np.ones(10)}, tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx.data").read_bytes() == backup
    assert load_model(tmp_path / "b.onnx.bak") is not None
    if not large:
        return
    written = sorted(p.name for p in tmp_path.glob("b.onnx.*.data"))
    assert written == ["b.onnx.1.data"]
    # (a killed export's data file, moved into place before its model was)
    (tmp_path / "b.onnx.5.data").write_bytes((tmp_path / "b.onnx.1.data").read_bytes())
    export_model(model, {"fc2.bias": np.full(10, 2.0)}, tmp_path / "b.onnx")
    assert sorted(p.name for p in tmp_path.glob("b.onnx.*")) == ["b.onnx.2.data", "b.onnx.bak",
                                                               "b.onnx.data"]
    assert (numpy_helper.to_array(next(t for t in load_model(tmp_path / "b.onnx")
                                       .graph.initializer if t.name == "fc2.bias")) == 2).all()


@pytest.mark.parametrize("opset", [8, 11, 13, 14])
def test_batchnorm_of_a_training_form_export_at_each_opset(tmp_path, opset):
    """PyTorch's training-form export of Conv + BatchNorm: at opsets 9-13 the node says
    training mode by its five outputs (Y, running mean and var, the batch's mean and var), as
    the specification's output cases do; the engine's forward, the inference form (export's
    output_form: inference) and a training graph with the layer frozen (batchnorm: eval, `grad
    --frozen-batchnorm`) each compute what onnxruntime and PyTorch do, as at opsets 8 and 14."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    import contextlib
    import io

    from trainer.autodiff import build_training_graph
    from trainer.executor import Executor
    from trainer.graph import inference_form

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 2, 5, 5, generator=g), torch.randn(8, 3, generator=g)
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # (running statistics that differ from one batch's)
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "m.onnx"
    with contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"],
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    model = onnx.load(path)
    (bn,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn.output) > 1  # (the training form)
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def ort_run(m, feeds):
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    with torch.no_grad():  # (the running statistics as exported: tracing may have moved them)
        net.bn.running_mean.copy_(torch.from_numpy(inits[bn.input[3]]))
        net.bn.running_var.copy_(torch.from_numpy(inits[bn.input[4]]))
        eval_y = net.eval()(x).numpy()
        eval_loss = float(torch.nn.functional.mse_loss(net(x), t))
        train_y = net.train()(x).numpy()
    feeds = {"x": x.numpy()}
    np.testing.assert_allclose(ort_run(model, feeds)["y"], train_y, atol=1e-5)
    np.testing.assert_allclose(Executor(model).run(feeds)["y"], train_y, atol=1e-5)

    inference = inference_form(model)
    (bn,) = [n for n in inference.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn.output) == 1
    np.testing.assert_allclose(ort_run(inference, feeds)["y"], eval_y, atol=1e-5)
    np.testing.assert_allclose(Executor(inference).run(feeds)["y"], eval_y, atol=1e-5)

    tm = build_training_graph(model, {"type": "mse", "output": "y", "target": "t"}, "all",
                              batch_size=8, batchnorm="eval")
    feeds["t"] = t.numpy()
    assert float(ort_run(tm, feeds)["loss"]) == pytest.approx(eval_loss, rel=1e-5)
    assert float(Executor(tm).run(feeds)["loss"]) == pytest.approx(eval_loss, rel=1e-5)


def _loop_model(kind: str) -> onnx.ModelProto:
    """x @ W1 -> a Loop of one iteration whose body runs a Dropout (training_mode from the outer
    scope, True) or a BatchNormalization in training mode -> Relu -> @ W2."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    rng = np.random.default_rng(0)

    def vi(n, s, t=TP.FLOAT):
        return h.make_tensor_value_info(n, t, s)

    inner = h.make_node("Dropout", ["h", "ratio", "tm"], ["z"]) if kind == "Dropout" else \
        h.make_node("BatchNormalization", ["h", "g", "b", "rm", "rv"], ["z", "rm_o", "rv_o"],
                    training_mode=1)
    body = h.make_graph([h.make_node("Identity", ["c"], ["c_out"]), inner,
                         h.make_node("Identity", ["z"], ["s"])], "body",
                        [vi("i", [], TP.INT64), vi("c", [], TP.BOOL)],
                        [vi("c_out", [], TP.BOOL), vi("s", ["N", 8])])
    inits = {"W1": rng.standard_normal((6, 8)).astype(np.float32),
             "W2": rng.standard_normal((8, 3)).astype(np.float32),
             "ax0": np.array([0]), "g": np.ones(8, np.float32), "b": np.zeros(8, np.float32),
             "rm": rng.standard_normal(8).astype(np.float32), "rv": np.full(8, 3, np.float32),
             "ratio": np.array(0.5, np.float32), "tm": np.array(True),
             "one": np.array(1), "tr": np.array(True)}
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["h"]),
                      h.make_node("Loop", ["one", "tr"], ["seq"], body=body),
                      h.make_node("Squeeze", ["seq", "ax0"], ["z2"]),
                      h.make_node("MatMul", ["z2", "W2"], ["logits"])], "g",
                     [vi("x", ["N", 6])], [vi("logits", ["N", 3])],
                     [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["Dropout", "BatchNormalization"])
def test_inference_form_reaches_loop_bodies_and_branches(kind):
    """output_form: inference turned off the main graph's Dropout and training-mode
    BatchNormalization only: one inside a Loop body stayed random (two onnxruntime runs 0.77
    apart) or batch-dependent in the deployed file. Now: repeatable, each row on its own."""
    ort = pytest.importorskip("onnxruntime")
    from trainer.graph import inference_form

    model = inference_form(_loop_model(kind))
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)
    a, b = s.run(None, {"x": x})[0], s.run(None, {"x": x})[0]
    one = s.run(None, {"x": x[:1]})[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(one, a[:1], rtol=1e-6, atol=1e-6)


def test_inference_form_keeps_a_model_already_in_it():
    """A Dropout whose training_mode is already a False constant: kept with its name (each
    round of fine-tuning an inference export renamed it, dropout_off -> .../training_mode_off
    -> ..._2), not replaced."""
    from onnx import helper as h

    from trainer.graph import inference_form

    g = h.make_graph([h.make_node("Dropout", ["x", "ratio", "dropout_off"], ["y"], name="d")],
                     "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
                     [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                      numpy_helper.from_array(np.array(False), "dropout_off")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    again = inference_form(inference_form(model))
    assert list(again.graph.node[0].input) == ["x", "ratio", "dropout_off"]
    assert [t.name for t in again.graph.initializer] == ["ratio", "dropout_off"]


def test_inference_form_turns_an_opset_6_dropouts_is_test_on():
    """Dropout before opset 7 drops while is_test is 0 (the spec): the inference form set
    BatchNormalization's is_test and left Dropout's (found by an export sweep)."""
    from onnx import helper as h

    from trainer.graph import inference_form

    g = h.make_graph([h.make_node("Dropout", ["x"], ["y"], is_test=0, ratio=0.5),
                      h.make_node("Dropout", ["y"], ["z"], ratio=0.5)], "g",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4])])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 6)])
    got = inference_form(model)
    assert [{a.name: a.i for a in n.attribute if a.name == "is_test"} for n in got.graph.node] \
        == [{"is_test": 1}] * 2  # (without is_test: its default, 0, drops too)
    onnx.checker.check_model(got)


@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_external_data_that_is_not_a_file_is_named_so(tmp_path, kind):
    import os

    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    (tmp_path / "w.bin").mkdir() if kind == "folder" else os.mkfifo(tmp_path / "w.bin")
    with pytest.raises(ModelError, match="'w.bin' of .* is not a regular file"):
        load_model(tmp_path / "m.onnx")


def test_external_data_locations_are_read_from_the_files_framing(tmp_path, monkeypatch):
    """The external data files a model names (what an export must neither overwrite nor
    delete, what a run reads) were found by onnx.load: a model holding its weights was read
    whole, a copy in memory, to find it names none (at each export for the model it replaces,
    and several times in the pre-flight). The file's protobuf framing is read instead: the
    same names as onnx.load's, in the main graph, a subgraph, a Constant node or a sparse
    tensor; none for a model of inline weights, read without parsing them; a ValueError for
    damaged framing."""
    from onnx import TensorProto, helper

    from trainer.graph import external_data_files, external_locations, stored_tensors

    def by_onnx(path):
        m = onnx.load(str(path), load_external_data=False)
        return {e.value for t, _ in stored_tensors(m)
                if t.data_location == TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.full((32, 32), 2.0, np.float32), "cv"))
    then = helper.make_graph([helper.make_node("Identity", ["w2"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.zeros((40, 40), np.float32), "w2")])
    other = helper.make_graph([helper.make_node("Add", ["w", "c"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [const, helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.arange(300, dtype=np.float32), "sv"),
        numpy_helper.from_array(np.arange(300, dtype=np.int64), "si"), [600])
    g.sparse_initializer.append(sparse)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    inline = tmp_path / "inline.onnx"
    onnx.save(model, str(inline))
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=False, size_threshold=0)
    want = by_onnx(tmp_path / "m.onnx")
    assert len(want) >= 2 and external_locations(tmp_path / "m.onnx") == want
    assert [p.name for p in external_data_files(tmp_path / "m.onnx")] == sorted(want)
    assert by_onnx(inline) == set()
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("the model was parsed"))
    assert external_locations(inline) == set()
    data = (tmp_path / "m.onnx").read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        with pytest.raises(ValueError):
            external_locations(tmp_path / "cut.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert external_locations(tmp_path / "empty.onnx") == set()


@pytest.mark.parametrize("name,large", [("a.pb", False), ("a.pb", True), ("big.onnx", False)],
                         ids=["not-named-onnx", "not-named-onnx-external-data", "an-onnx-model"])
def test_a_run_never_removes_or_rewrites_its_own_models_data(tmp_path, monkeypatch,
                                                             digits_config, name, large):
    """The model a run trains keeps its weights in `b.onnx.data` and the output is `b.onnx`.
    Where the export's scan of the folder did not see that model (a file not named *.onnx,
    or, before the scan read files' framing alone, one over 64 MB), the export deleted
    `b.onnx.data` as its own stale data (or, written with external data, replaced it with
    the trained weights): the run's files are now left alone whatever their names."""
    import io

    from trainer import Trainer
    from trainer.config import config_from_dict

    if large:
        monkeypatch.setattr(export_mod, "TWO_GB", 1000)
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    onnx.save_model(model, str(tmp_path / name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    before = (tmp_path / "b.onnx.data").read_bytes()
    raw = digits_config(model=name, output="b.onnx", steps=2)
    del raw["data"]["eval"]
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    assert (tmp_path / "b.onnx.data").read_bytes() == before
    onnx.checker.check_model(str(tmp_path / name), full_check=True)
    trained = load_model(tmp_path / "b.onnx")
    assert {t.name for t in trained.graph.initializer} == \
        {t.name for t in model.graph.initializer}


def test_the_export_keeps_each_initializers_doc_string(tmp_path):
    """Trained tensors keep their doc string and metadata_props (the latter were dropped)."""
    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    model.graph.initializer[0].doc_string = "the first layer's weight"
    model.graph.initializer[0].metadata_props.add(key="origin", value="layer 1")
    name = model.graph.initializer[0].name
    out = export_model(model, {name: np.zeros(tuple(model.graph.initializer[0].dims))},
                       tmp_path / "m.onnx")
    t = onnx.load(out).graph.initializer[0]
    assert t.doc_string == "the first layer's weight"
    assert [(p.key, p.value) for p in t.metadata_props] == [("origin", "layer 1")]


def test_a_sparse_initializer_made_dense_keeps_its_doc_string_and_metadata():
    from onnx import helper

    from trainer.graph import densify_sparse_initializers

    values = numpy_helper.from_array(np.array([0.5], np.float32), "w")
    values.doc_string = "sparse w"
    values.metadata_props.add(key="origin", value="pruned")
    sp = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([3]), "i"), [2, 2])
    g = helper.make_graph([], "g", [], [], sparse_initializer=[sp])
    model = helper.make_model(g)
    densify_sparse_initializers(model)
    (t,) = model.graph.initializer
    assert t.doc_string == "sparse w" and [(p.key, p.value) for p in t.metadata_props] == [
        ("origin", "pruned")]
    np.testing.assert_array_equal(numpy_helper.to_array(t), [[0, 0], [0, 0.5]])


def test_an_export_is_written_one_tensor_at_a_time_and_reads_back_whole(tmp_path):
    """The file is the model without its initializers, then one model message per tensor
    (protobuf merges them as it reads): onnx, its checker and onnxruntime read it as the one
    model, initializers in their order, with the trained values."""
    import onnxruntime as ort

    model = onnx.load(EXAMPLES / "digits_mlp.onnx")
    names = [t.name for t in model.graph.initializer]
    values = {k: np.full(tuple(t.dims), 0.5, np.float32)
              for k, t in ((t.name, t) for t in model.graph.initializer)}
    out = export_model(model, values, tmp_path / "m.onnx", {"k": "v"})
    onnx.checker.check_model(str(out), full_check=True)
    back = onnx.load(out)
    assert [t.name for t in back.graph.initializer] == names
    assert all((numpy_helper.to_array(t) == 0.5).all() for t in back.graph.initializer)
    assert back.graph.node == model.graph.node and back.graph.input == model.graph.input
    assert {p.key: p.value for p in back.metadata_props}["k"] == "v"
    want = onnx.load(EXAMPLES / "digits_mlp.onnx")  # (the values set the usual way)
    for t in want.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (str(out), want.SerializeToString())]
    np.testing.assert_array_equal(run[0], run[1])


@pytest.mark.parametrize("large", [False, True], ids=["one-file", "external-data"])
def test_every_dtype_and_shape_round_trips_through_the_streamed_export(tmp_path, monkeypatch,
                                                                      large):
    """The tensors' bytes are written from the arrays themselves (framed by hand): float16,
    float64, integers, bool, complex, a 0-d scalar (np.ascontiguousarray made it 1-d), an
    empty tensor and a transposed (non-contiguous) array come back as they went, with their
    doc strings; over 2 GB, the large ones from the data file."""
    from onnx import TensorProto, helper

    if large:
        monkeypatch.setattr(export_mod, "TWO_GB", 10)
    rng = np.random.default_rng(0)
    kinds = {"f16": np.float16, "f64": np.float64, "i8": np.int8, "b": np.bool_,
             "i64": np.int64, "c64": np.complex64, "big": np.float32}
    shapes = {**{k: (3, 4) for k in kinds}, "big": (40, 40)}
    values = {k: (rng.standard_normal(shapes[k]) * 10).astype(t) for k, t in kinds.items()}
    values["big"] = values["big"].T
    values["scalar"], values["empty"] = np.float32(3.5), np.zeros((0, 4), np.float32)
    inits = [numpy_helper.from_array(np.zeros_like(v), k) for k, v in values.items()]
    inits[0].doc_string = "half"
    for t in inits:
        t.metadata_props.add(key="kind", value=t.name)
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = export_model(model, values, tmp_path / "m.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    back = onnx.load(out)
    got = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    assert list(got) == list(values) and back.graph.initializer[0].doc_string == "half"
    assert [[(p.key, p.value) for p in t.metadata_props] for t in back.graph.initializer] == [
        [("kind", t.name)] for t in back.graph.initializer]
    for k, v in values.items():
        v = np.asarray(v)
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v)
    assert (tmp_path / "m.onnx.data").exists() == large
    if large:  # (with every tensor under 1 KiB no data file, rather than an empty one)
        small = {k: v for k, v in values.items() if k != "big"}
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(numpy_helper.from_array(np.zeros_like(v), k)
                                       for k, v in small.items())
        export_model(model, small, tmp_path / "s.onnx")
        assert not (tmp_path / "s.onnx.data").exists()
        assert {t.name for t in onnx.load(tmp_path / "s.onnx").graph.initializer} == set(small)


def test_the_exports_metadata_names_the_run_not_the_machines_paths(tmp_path, digits_config):
    """onnx_trainer.config held the config's absolute path (a home folder in every deployed
    model); its file name now, with the run's other records."""
    import io

    import yaml

    from trainer.config import load_config
    from trainer.train import Trainer

    (tmp_path / "deep").mkdir()
    path = tmp_path / "deep" / "run.yaml"
    path.write_text(yaml.safe_dump(digits_config(steps=2, output=str(tmp_path / "o.onnx"))))
    Trainer(load_config(path), stream=io.StringIO()).fit()
    meta = {p.key: p.value for p in onnx.load(tmp_path / "o.onnx").metadata_props}
    assert meta["onnx_trainer.config"] == "run.yaml" and meta["onnx_trainer.steps"] == "2"
    assert {"onnx_trainer.loss", "onnx_trainer.optimizer", "onnx_trainer.world_size",
            "onnx_trainer.output_form"} <= set(meta)
    assert not any(str(tmp_path) in v for v in meta.values())
