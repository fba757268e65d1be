"""The bad-input catalogue: every case ends with a non-zero exit and ONE line that says what is
wrong (no traceback), before anything is written (an earlier output stays as it was); and the code
itself never loads unsafely (scanned)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES, ROOT

DIGITS = np.load(EXAMPLES / "digits.npz")


def _cfg(tmp, **over):
    raw = {"model": str(EXAMPLES / "digits_mlp.onnx"), "output": str(tmp / "out.onnx"),
           "device": "cpu", "steps": 3,
           "data": {"train": {"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_train"},
                              "targets": {"label": "y_train"}}, "batch_size": 32},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    for key, value in over.items():
        node = raw
        *head, last = key.split("__")
        for h in head:
            node = node.setdefault(h, {})
        if value is _DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


_DROP = object()


def _put(path: Path, data) -> Path:
    """Write bytes or text to path; returns the path."""
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _external(tmp) -> Path:
    """The digits MLP as m.onnx with its weights in m.onnx.data."""
    onnx.save(onnx.load(EXAMPLES / "digits_mlp.onnx"), str(tmp / "m.onnx"),
              save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return tmp / "m.onnx"


def _write(tmp, raw) -> str:
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp / "cfg.yaml")


def _train(**over):
    return lambda tmp: ["train", _write(tmp, _cfg(tmp, **over))]


# nine levels of nine aliases each: 9**9 values, 700 bytes of YAML
_ALIAS_BOMB = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi",
                                                                   strict=True))


def _external_data_output(tmp) -> list[str]:
    """The demo model with its weights in `b.onnx.data`, and an output of that name."""
    m = onnx.load(str(EXAMPLES / "digits_mlp.onnx"))
    onnx.save_model(m, str(tmp / "a.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="b.onnx.data", size_threshold=0)
    return ["train", _write(tmp, _cfg(tmp, model=str(tmp / "a.onnx"),
                                      output=str(tmp / "b.onnx.data")))]


def _digits_batchnorm(tmp, **over) -> list[str]:
    """x [N, 64] -> MatMul -> BatchNormalization (bn.scale, bn.mean...) -> logits, trained
    on the digits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32) * 0.1,
                                     "W")]
    inits += [numpy_helper.from_array(np.full(10, v, np.float32), f"bn.{k}")
              for k, v in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("BatchNormalization", ["h", "bn.scale", "bn.bias", "bn.mean",
                                                 "bn.var"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]),
              str(tmp / "bn.onnx"))
    return ["train", _write(tmp, _cfg(tmp, model=str(tmp / "bn.onnx"), **over))]


def _fixed_batch_model(tmp) -> str:
    """The digits MLP with its batch dimension fixed at 7."""
    m = onnx.load(str(EXAMPLES / "digits_mlp.onnx"))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 7
    onnx.save(m, str(tmp / "fixed.onnx"))
    return str(tmp / "fixed.onnx")


def _nul_location(tmp) -> list[str]:
    """The demo model with a weight in external data at a location holding a NUL (it made
    the pre-flight's path checks raise an internal error)."""
    m = onnx.load(str(EXAMPLES / "digits_mlp.onnx"))
    t = m.graph.initializer[0]
    (tmp / "w.bin").write_bytes(t.raw_data)
    n = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "w.bin\0x"), ("offset", "0"), ("length", str(n))):
        t.external_data.add(key=k, value=v)
    onnx.save(m, str(tmp / "m.onnx"))
    return ["train", _write(tmp, _cfg(tmp, model=str(tmp / "m.onnx")))]


def _old_checkpoints(tmp) -> list[str]:
    """A finished run's checkpoints in checkpoint.dir, and a new run (no --resume) there."""
    from trainer.cli import main

    raw = _cfg(tmp, checkpoint={"dir": str(tmp / "ck")}, output=str(tmp / "first.onnx"))
    assert main(["train", _write(tmp, raw)]) == 0
    return ["train", _write(tmp, _cfg(tmp, checkpoint={"dir": str(tmp / "ck")}))]


def _long_raw_data(tmp) -> bool:
    """The demo model with 8 bytes too many in a bias's raw data (onnx's checker finds too
    few, not too many)."""
    m = onnx.load(str(EXAMPLES / "digits_mlp.onnx"))
    t = next(t for t in m.graph.initializer if t.name == "fc2.bias")
    t.raw_data = numpy_helper.to_array(t).tobytes() + b"\0" * 8
    onnx.save(m, str(tmp / "m.onnx"))
    return True


def _escapes_model(tmp) -> bool:
    """The demo model with an op no kernel runs, in a node named with a newline and a
    terminal escape (printed raw, they forged a second line in red)."""
    m = onnx.load(str(EXAMPLES / "digits_mlp.onnx"))
    m.graph.node[0].op_type, m.graph.node[0].domain = "NoSuchOp", "my.ops"
    m.graph.node[0].name = "a\nFAKE: all good\x1b[31m"
    m.opset_import.append(helper.make_opsetid("my.ops", 1))
    onnx.save(m, str(tmp / "m.onnx"))
    return True


def _edited_arrays(key, value):
    """A checkpoint whose array `key` is replaced by `value`, then --resume (a negative
    optimizer step count gave complex bias corrections: a TypeError at the first step)."""
    def make(tmp) -> list[str]:
        from trainer.cli import main

        raw = _cfg(tmp, checkpoint={"dir": str(tmp / "ck")}, output=str(tmp / "first.onnx"),
                   optimizer={"type": "adam", "lr": 1e-3})
        assert main(["train", _write(tmp, raw)]) == 0
        path = next((tmp / "ck").glob("step_*")) / "arrays.npz"
        arrays = dict(np.load(path, allow_pickle=False))
        arrays[key] = np.array(value)
        np.savez(path, **arrays)
        return ["train", _write(tmp, {**raw, "steps": 6}), "--resume"]
    return make


def _edited_manifest(key, value):
    """A checkpoint whose manifest's `key` is edited to `value` (not a number, out of range),
    then --resume (total_steps -5 only gave a schedule warning)."""
    def make(tmp) -> list[str]:
        import json

        from trainer.cli import main

        raw = _cfg(tmp, checkpoint={"dir": str(tmp / "ck")}, output=str(tmp / "first.onnx"))
        assert main(["train", _write(tmp, raw)]) == 0
        manifest = next((tmp / "ck").glob("step_*")) / "manifest.json"
        meta = json.loads(manifest.read_text())
        meta[key] = value
        manifest.write_text(json.dumps(meta))
        return ["train", _write(tmp, _cfg(tmp, checkpoint={"dir": str(tmp / "ck")})),
                "--resume"]
    return make


def _data(name, **arrays):
    def make(tmp):
        np.savez(tmp / name, **arrays)
        return str(tmp / name)
    return make


def _with_data(make, inputs=None, targets=None, **over):
    def case(tmp):
        path = make(tmp)
        return ["train", _write(tmp, _cfg(tmp, data__train={
            "path": path, "inputs": inputs or {"x": "x"}, "targets": targets or {"label": "y"}},
            **over))]
    return case


def _model_file(build):
    def case(tmp):
        path = build(tmp)
        return ["train", _write(tmp, _cfg(tmp, model=str(path)))]
    return case


def _graph(nodes, inits=(), inputs=None, outputs=None, opset=18, domains=()):
    g = helper.make_graph(
        nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]
                             + [helper.make_opsetid(d, 1) for d in domains])


_W = numpy_helper.from_array(np.full((64, 10), 0.01, np.float32), "w")


def _retyped(model):
    """The model with its first initializer's type code bit-flipped to 94 (onnx.checker lets
    it pass; it was a KeyError)."""
    model.graph.initializer[0].data_type = 94
    return model


def _save(name, model_fn):
    def build(tmp):
        onnx.save(model_fn(tmp), tmp / name)
        return tmp / name
    return build


def _ext_model(location, data_len=None, symlink_to=None, offset=None):
    def build(tmp):
        m = onnx.load(EXAMPLES / "digits_mlp.onnx")
        t = m.graph.initializer[0]
        raw = numpy_helper.to_array(t).tobytes()
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("length", str(data_len or len(raw))),
                     *((("offset", str(offset)),) if offset is not None else ())):
            e = t.external_data.add()
            e.key, e.value = k, v
        (tmp / "m").mkdir(exist_ok=True)
        if symlink_to:  # (a file beside the model's folder, not in it)
            (tmp / symlink_to).write_bytes(raw)
            os.symlink(tmp / symlink_to, tmp / "m" / location)
        elif not location.startswith(("/", "..")) and data_len != -1:
            (tmp / "m" / location).write_bytes(raw[:data_len or len(raw)])
        onnx.save(m, tmp / "m" / "model.onnx")
        return tmp / "m" / "model.onnx"
    return build


def _resume_other_model(tmp):
    """A checkpoint written for the digits MLP, resumed with another model."""
    import io

    from trainer.config import config_from_dict
    from trainer.train import Trainer
    ck = tmp / "ck"
    Trainer(config_from_dict(_cfg(tmp, checkpoint={"dir": str(ck)}), tmp),
            stream=io.StringIO()).fit()
    other = _graph([helper.make_node("MatMul", ["x", "w2"], ["logits"])],
                   [numpy_helper.from_array(np.ones((64, 10), np.float32), "w2")])
    onnx.save(other, tmp / "other.onnx")
    (tmp / "out.onnx").unlink()
    return ["train", _write(tmp, _cfg(tmp, model=str(tmp / "other.onnx"),
                                      checkpoint={"dir": str(ck)})), "--resume"]


x, y = DIGITS["x_train"], DIGITS["y_train"]
def _past_the_embedding(reshaped: bool, wrapped: bool | str = False):
    """Token ids with a 10 past a 10-row embedding at sample 13, read by the Gather directly,
    through a Reshape, or through Where(x < 0, x + 10, x) (tf2onnx's Keras 3 Embedding), or
    (wrapped "arithmetic") that Where as tf2onnx 1.17 writes it: Cast(Less(Cast(x), 0)) *
    (x + 10) + x * Cast(Not(Less(...)))."""
    def case(t):
        ids = np.arange(96).reshape(32, 3)
        np.savez(t / "ids.npz", x=np.where(ids == 40, 10, ids % 10), y=y[:32])
        pre = [helper.make_node("Reshape", ["x", "shape"], ["ids"])] if reshaped else []
        inits = [numpy_helper.from_array(np.ones((10, 64), np.float32), "E"), _W]
        if reshaped:
            inits.append(numpy_helper.from_array(np.array([-1, 3], np.int64), "shape"))
        if wrapped == "arithmetic":
            i64 = TensorProto.INT64
            pre = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                   helper.make_node("Less", ["xf", "fzero"], ["neg"]),
                   helper.make_node("Cast", ["neg"], ["negi"], to=i64),
                   helper.make_node("Not", ["neg"], ["pos"]),
                   helper.make_node("Cast", ["pos"], ["posi"], to=i64),
                   helper.make_node("Add", ["x", "vocab"], ["up"]),
                   helper.make_node("Mul", ["negi", "up"], ["a"]),
                   helper.make_node("Mul", ["x", "posi"], ["b"]),
                   helper.make_node("Add", ["a", "b"], ["ids"])]
            inits += [numpy_helper.from_array(np.array(0, np.float32), "fzero"),
                      numpy_helper.from_array(np.array(10, np.int64), "vocab")]
        elif wrapped:
            pre = [helper.make_node("Less", ["x", "zero"], ["neg"]),
                   helper.make_node("Add", ["x", "vocab"], ["up"]),
                   helper.make_node("Where", ["neg", "up", "x"], ["ids"])]
            inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                      numpy_helper.from_array(np.array(10, np.int64), "vocab")]
        onnx.save(_graph(pre + [
            helper.make_node("Gather", ["E", "ids" if reshaped or wrapped else "x"], ["emb"],
                             name="embed"),
            helper.make_node("ReduceMean", ["emb"], ["h"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["h", "w"], ["logits"])], inits,
            inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3])],
            opset=17), t / "emb.onnx")
        return ["train", _write(t, _cfg(t, model=str(t / "emb.onnx"), data__train={
            "path": str(t / "ids.npz"), "inputs": {"x": "x"}, "targets": {"label": "y"}}))]
    return case


CASES = {
    # -- the model --
    "model-not-a-file": (_train(model="/nonexistent/m.onnx"), "model file not found"),
    "model-a-folder": (lambda t: ["train", _write(t, _cfg(t, model=str(t)))],
                       "(it is a directory; give the .onnx file in it)"),
    "model-not-onnx": (_model_file(lambda t: _put(t / "m.onnx", b"\x08\x07junk" * 9)), "m.onnx"),
    "model-truncated": (_model_file(lambda t: _put(
        t / "m.onnx", (EXAMPLES / "digits_mlp.onnx").read_bytes()[:300])), "m.onnx"),
    "model-fails-checker": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("Add", ["x", "nowhere"], ["logits"])]))), "not a valid ONNX model"),
    "model-unknown-type-code": (_model_file(_save("m.onnx", lambda t: _retyped(_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W])))),
        "tensor 'w' has data type 94, which ONNX does not define"),
    # (onnx.checker lets an UNDEFINED input/output type pass; onnxruntime refuses: KeyErrors)
    "model-input-type-undefined": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W],
        inputs=[helper.make_tensor_value_info("x", TensorProto.UNDEFINED, ["N", 64])]))),
        "graph input 'x' declares no element type"),
    "model-output-type-undefined": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.UNDEFINED, ["N", 10])]))),
        "graph output 'logits' declares no element type"),
    # (trained in silence, where `check MODEL` found no parameter reaching the output)
    "loss-output-declared-a-string": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.STRING, ["N", 10])]))),
        "loss output 'logits' is declared STRING, not a float tensor"),
    # (a training-form node's running statistic of shape [C, 1]: a broadcast error at step 1)
    "batchnorm-statistic-of-two-dims": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h", "rm", "rv"],
                          training_mode=1, name="bn"),
         helper.make_node("MatMul", ["h", "w"], ["logits"])],
        [numpy_helper.from_array(np.ones(64, np.float32), "s"),
         numpy_helper.from_array(np.zeros(64, np.float32), "b"),
         numpy_helper.from_array(np.zeros(64, np.float32), "m"),
         numpy_helper.from_array(np.ones((64, 1), np.float32), "v"), _W], opset=17))),
        "BatchNormalization 'bn': its input_var 'v' has shape [64, 1]"),
    # (`eval` read the targets' dtype from the missing output first: a KeyError)
    "eval-loss-output-not-an-output": (lambda t: ["eval", _write(t, _cfg(
        t, loss__output="logit", loss__type="mse", data__eval={
            "path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_test"},
            "targets": {"label": "y_test"}}))],
        "loss output 'logit' is not an output of the model (outputs: logits)"),
    "grad-inconsistent-input-types": (lambda t: [
        "grad", str(_save("m.onnx", lambda t: _graph(
            [helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], [_W],
            inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 64])]))(t)),
        "--output", "logits", "-o", str(t / "g.onnx")],
        "node 'mm' (MatMul): input types disagree: 'x' int64, 'w' float32"),
    "grad-sequence-input": (lambda t: [
        "grad", str(_save("m.onnx", lambda t: _graph(
            [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W],
            inputs=[helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT,
                                                           ["N", 64])]))(t)),
        "--output", "logits", "-o", str(t / "g.onnx")], "input 'x' is a sequence, not a tensor"),
    "model-op-of-an-unknown-domain": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("Relu", ["x"], ["logits"], domain="evil.com", name="relu")],
        domains=["evil.com"]))), "no forward kernel: Relu of domain evil.com (node 'relu')"),
    "model-op-without-kernel": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("Warp", ["x"], ["logits"], domain="com.x")], domains=["com.x"]))),
        "no forward kernel: Warp of domain com.x (node"),
    # (scikit-learn's exports: what the op means, not only that it has no kernel)
    "model-zipmap": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("ZipMap", ["x"], ["logits"], domain="ai.onnx.ml",
                          classlabels_int64s=list(range(64)))], domains=["ai.onnx.ml"],
        outputs=[helper.make_value_info("logits", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
                TensorProto.FLOAT, []))))]))), "'zipmap': False"),
    "model-tree-ensemble": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("TreeEnsembleRegressor", ["x"], ["logits"], domain="ai.onnx.ml",
                          n_targets=10, nodes_treeids=[0], nodes_nodeids=[0],
                          nodes_featureids=[0], nodes_modes=["LEAF"], nodes_values=[0.0],
                          nodes_truenodeids=[0], nodes_falsenodeids=[0], target_treeids=[0],
                          target_nodeids=[0], target_ids=[0], target_weights=[1.0])],
        domains=["ai.onnx.ml"]))), "tree ensembles have no gradient"),
    "model-linear-coefficients-in-attributes": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("LinearRegressor", ["x"], ["logits"], domain="ai.onnx.ml",
                          coefficients=[0.01] * 640, intercepts=[0.0] * 10, targets=10)],
        domains=["ai.onnx.ml"]))), "LinearRegressor keep their coefficients in node attributes"),
    "model-unknown-opset": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W], opset=999))),
        "opset 999 of ai.onnx"),
    "model-nothing-to-train": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("Relu", ["x"], ["h"]),
         helper.make_node("Slice", ["h", "st", "en", "ax"], ["logits"])],
        [numpy_helper.from_array(np.array(v), n) for n, v in
         (("st", [0]), ("en", [10]), ("ax", [1]))]))), "nothing to train"),
    "model-loss-output-missing": (_train(loss__output="probs"), "'probs' is not an output"),
    "model-input-not-in-data": (_train(data__train__inputs={"pixels": "x_train"}),
                                "needs input 'x'"),
    "model-fixed-batch-mismatch": (_model_file(_save("m.onnx", lambda t: _graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], [_W],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 10])]))),
        "fixed batch dimension of 2"),
    "model-fixed-batch-over-the-data": (lambda t: np.savez(
        t / "five.npz", x=np.zeros((5, 64), np.float32), y=np.zeros(5, np.int64)) or [
        "train", _write(t, _cfg(t, model=_fixed_batch_model(t), data__batch_size=7,
                                data__train={"path": str(t / "five.npz"), "inputs": {"x": "x"},
                                             "targets": {"label": "y"}}))],
        "data.train has 5 sample(s), fewer than one batch of model input 'x', whose batch "
        "dimension is fixed at 7: give the model a dynamic batch axis"),
    # -- external data --
    "external-missing-file": (_model_file(_ext_model("w.bin", data_len=-1)), "w.bin"),
    "external-wrong-length": (_model_file(_ext_model("w.bin", data_len=7)), "length 7 bytes"),
    "external-negative-offset": (_model_file(_ext_model("w.bin", offset=-5)),
                                 "has a negative external data offset (-5)"),
    "external-absolute-path": (_model_file(_ext_model("/etc/passwd")), "outside"),
    "external-dotdot": (_model_file(_ext_model("../w.bin")), "outside"),
    "external-symlink-out": (_model_file(_ext_model("w.bin", symlink_to="outside_w.bin")),
                             "w.bin"),
    # -- the config --
    "config-not-found": (lambda t: ["train", str(t / "none.yaml")], "config file not found"),
    "config-a-device": (lambda t: ["train", "/dev/null"],
                        "config /dev/null is not a regular file (a pipe or a device)"),
    "export-without-a-checkpoint-dir": (lambda t: [
        "export", _write(t, _cfg(t)), "-o", str(t / "e.onnx")],
        "export without --checkpoint reads the config's checkpoint.dir, which it does not set"),
    "check-config-a-device": (lambda t: ["check", "/dev/null"],
                              "config /dev/null is not a regular file (a pipe or a device)"),
    "config-not-yaml": (lambda t: ["train", str(_put(t / "c.yaml", "a: [1, 2"))],
                        "cannot parse config file"),
    "config-not-a-mapping": (lambda t: ["train", str(_put(t / "c.yaml", "- 1\n- 2\n"))],
                             "mapping at the top level"),
    "config-python-tag": (lambda t: ["train", str(_put(
        t / "c.yaml", "model: !!python/object/apply:os.system ['true']\n"))],
        "cannot parse config file"),
    "config-key-twice": (lambda t: ["train", str(_put(t / "c.yaml", yaml.safe_dump(_cfg(t))
                                                      + "steps: 5\n"))], "given twice"),
    "config-alias-bomb": (lambda t: ["train", str(_put(t / "c.yaml", _ALIAS_BOMB))],
                          "aliases are expanded"),
    "config-nested-too-deeply": (lambda t: ["train", str(_put(t / "c.yaml", "a: " + "[" * 5000
                                                              + "]" * 5000))], "too deeply"),
    "config-override-without-value": (lambda t: ["train", _write(t, _cfg(t)), "--set",
                                                 "optimizer.lr="], "gives no value"),
    "config-unknown-key": (_train(optimizer={"type": "sgd", "lrr": 0.1}), "optimizer.lrr"),
    "config-frozen-takes-everything": (_train(frozen=["fc*"]), "'frozen' matches every"),
    # (a tied weight is stored under one of its names: T5's lm_head.weight as shared.weight)
    "config-frozen-names-a-tied-twin": (_train(frozen=["lm_head.weight"]),
                                        "is stored once, under one of its names"),
    "optimizer-eps-zero": (_train(optimizer={"type": "adam", "lr": 1e-3, "eps": 0.0}),
                           "optimizer.eps is 0"),
    "config-wrong-type": (_train(data__batch_size="many"), "data.batch_size"),
    "config-out-of-range": (_train(optimizer={"type": "sgd", "lr": -1}), "optimizer.lr"),
    "config-both-steps-and-epochs": (_train(epochs=2), "exactly one"),
    "config-neither-steps-nor-epochs": (_train(steps=None), "exactly one"),
    "config-unknown-choice": (_train(optimizer={"type": "adamax"}), "optimizer.type"),
    "config-bad-override": (lambda t: ["train", _write(t, _cfg(t)), "--set", "data.batchsize=8"],
                            "data.batchsize"),
    "config-output-is-a-folder": (lambda t: (t / "o").mkdir() or
                                  ["train", _write(t, _cfg(t, output=str(t / "o")))],
                                  "is a directory"),
    # (a folder not made yet: it was written as a file named 'new')
    "config-output-ends-with-a-slash": (_train(output="new/"), "'output' names a folder ('new/'); "
                                        "give a file path such as 'new/model.onnx'"),
    "config-metrics-ends-with-a-slash": (_train(log={"metrics": "logs/"}),
                                         "such as 'logs/metrics.jsonl'"),
    "config-output-under-a-file": (lambda t: _put(t / "f", "x") and
                                   ["train", _write(t, _cfg(t, output=str(t / "f" / "m.onnx")))],
                                   "not a directory"),
    # (a folder that permissions allow, root's, but the file system refuses)
    "config-output-in-a-pseudo-filesystem": (_train(output="/proc/onnx-trainer/m.onnx"),
                                             "output /proc/onnx-trainer/m.onnx: cannot write in"),
    "config-metrics-in-a-pseudo-filesystem": (_train(log={"metrics": "/proc/m.jsonl"}),
                                              "log.metrics /proc/m.jsonl: cannot write in /proc"),
    "config-batchnorm-glob-matches-nothing": (_train(batchnorm=["nope.*"]),
                                              "matches the scale of no"),
    "config-best-needs-eval": (_train(best={"metric": "eval_loss"}), "needs data.eval"),
    "config-checkpoint-of-another-model": (_resume_other_model,
                                           "trains another set of tensors than this config"),
    # -- the data --
    "data-file-missing": (_train(data__train__path="/nonexistent/d.npz"), "not found"),
    "data-folder-array-is-a-pipe": (_with_data(lambda t: (t / "f").mkdir() or np.save(
        t / "f" / "y.npy", np.zeros(8, np.int64)) or os.mkfifo(t / "f" / "x.npy") or str(t / "f")),
        "x.npy is not a regular file"),
    "data-bfloat16-array": (_with_data(lambda t: np.savez(
        t / "bf.npz", x=np.zeros((8, 64), __import__("ml_dtypes").bfloat16),
        y=np.zeros(8, np.int64)) or str(t / "bf.npz")),
        "NumPy saves a bfloat16 array as raw 2-byte records: save it as float32"),
    "data-not-npz": (_with_data(lambda t: str(_put(t / "d.npz", b"garbage"))), "cannot read"),
    "data-array-missing": (_train(data__train__inputs={"x": "pixels"}), "'pixels'"),
    "data-input-name-wrong": (_train(data__train__inputs={"input": "x_train"}),
                              "it maps 'input', which is not an input of the model"),
    "train-given-a-model": (lambda t: ["train", str(EXAMPLES / "digits_mlp.onnx")],
                            "is an ONNX model, not a YAML config"),
    "output-is-the-model": (lambda t: (t / "m.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and ["train", _write(t, _cfg(
            t, model=str(t / "m.onnx"), output=str(t / "m.onnx")))], "is the model file itself"),
    # -- what the run writes is none of what it reads, and a regular file --
    "metrics-is-the-model": (lambda t: (t / "m.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and ["train", _write(t, _cfg(
            t, model=str(t / "m.onnx"), log={"metrics": str(t / "m.onnx")}))],
        "log.metrics"),
    "output-is-the-models-external-data": (_external_data_output, "external data file"),
    "profile-trace-is-the-model": (lambda t: (t / "m.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and ["train", _write(t, _cfg(
            t, model=str(t / "m.onnx"))), "--profile-trace", str(t / "m.onnx")],
        "--profile-trace "),
    "profile-trace-is-the-output": (lambda t: ["train", _write(t, _cfg(t)), "--profile-trace",
                                               str(t / "out.onnx")],
                                    "is also output"),
    "metrics-is-a-hard-link-of-the-model": (lambda t: (t / "m.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and not os.link(t / "m.onnx", t / "h")
        and ["train", _write(t, _cfg(t, model=str(t / "m.onnx"), log={"metrics": str(t / "h")}))],
        "log.metrics"),
    "tensorboard-is-the-output": (_train(log={"tensorboard": "out.onnx"}), "is also output"),
    "config-trainable-names-a-running-statistic": (
        lambda t: _digits_batchnorm(t, trainable=["all", "bn.mean"]),
        "trainable entry 'bn.mean' names BatchNormalization running statistics (bn.mean)"),
    "config-frozen-glob-matching-nothing": (_train(frozen=["fc3.*"]),
                                            "frozen entry 'fc3.*' matches no float initializer "
                                            "of the model (available: "),
    "config-batchnorm-globs-on-a-model-without-any": (_train(batchnorm=["bn*"]),
                                                       "(the model has none)"),
    "config-batchnorm-on-one-sample": (lambda t: _digits_batchnorm(t, data__batch_size=1),
                                       "trains on 1 value per channel"),
    "output-is-the-config-file": (lambda t: ["train", _write(t, _cfg(
        t, output=str(t / "cfg.yaml")))], "cfg.yaml is the config file: writing it"),
    "external-data-location-with-a-nul": (_nul_location, "external data 'w.bin\\x00x' "
                                                         "outside the model's folder"),
    "output-is-the-dataset": (lambda t: (t / "d.npz").write_bytes(
        (EXAMPLES / "digits.npz").read_bytes()) and ["train", _write(t, _cfg(
            t, data__train__path=str(t / "d.npz"), output=str(t / "d.npz")))],
        "a file of data.train"),
    "best-is-the-model": (lambda t: (t / "m.best.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and ["train", _write(t, _cfg(
            t, model=str(t / "m.best.onnx"), output=str(t / "m.onnx"),
            data__eval={"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_test"},
                        "targets": {"label": "y_test"}}, best={"metric": "eval_loss"}))],
        "the best model"),
    "metrics-is-the-output": (lambda t: ["train", _write(t, _cfg(
        t, log={"metrics": str(t / "out.onnx")}))], "is also output"),
    "check-given-a-dataset": (lambda t: ["check", str(EXAMPLES / "digits.npz")],
                              "is a dataset, not a model"),
    "output-is-a-pipe": (lambda t: os.mkfifo(t / "pipe") or ["train", _write(t, _cfg(
        t, output=str(t / "pipe")))], "not a regular file"),
    "model-is-a-pipe": (lambda t: os.mkfifo(t / "m.onnx") or ["train", _write(t, _cfg(
        t, model=str(t / "m.onnx")))], "not a regular file"),  # (it waited for a writer)
    "fresh-run-into-old-checkpoints": (_old_checkpoints, "holds checkpoints of an earlier run"),
    # (the checkpoint of step 10 moved a metrics file of that name aside: its rows were lost)
    # (found by a hostile-input sweep: internal errors before)
    "config-integer-of-5000-digits": (lambda t: (t / "c.yaml").write_text(
        "model: m.onnx\nsteps: " + "9" * 5000 + "\n") and ["train", str(t / "c.yaml")],
        "config holds an integer too long to read"),
    "override-integer-of-5000-digits": (lambda t: ["train", _write(t, _cfg(t)), "--set",
                                                   "steps=" + "9" * 5000],
                                        "integer too long to read"),
    "config-of-megabytes": (lambda t: (t / "c.yaml").write_text(
        "model: m.onnx\nnotes:\n" + "  - [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]\n" * 120_000)
        and ["train", str(t / "c.yaml")], "config is 5 MiB of text; a config is a few hundred"),
    "config-path-with-a-nul": (_train(output="out/m\0.onnx"),
                               "config key 'output' holds a NUL character"),
    "check-of-a-deeply-nested-config-without-suffix": (lambda t: (t / "cfg.txt").write_text(
        "model: x\nx: " + "[" * 20000 + "]" * 20000 + "\n") and ["check", str(t / "cfg.txt")],
        "config nested too deeply to read"),
    "metrics-named-as-a-checkpoint": (lambda t: ["train", _write(t, _cfg(
        t, checkpoint={"dir": str(t / "ck"), "every_steps": 2},
        log={"metrics": str(t / "ck" / "step_00000002")}))],
        "/ck/step_00000002 takes a name of checkpoint.dir's own files"),
    "tensorboard-named-as-a-checkpoint": (lambda t: ["train", _write(t, _cfg(
        t, checkpoint={"dir": str(t / "ck"), "every_steps": 2},
        log={"tensorboard": str(t / "ck" / "step_00000002")}))],
        "/ck/step_00000002 takes a name of checkpoint.dir's own files"),
    "grad-shape-of-the-wrong-rank": (lambda t: [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "-o", str(t / "g.onnx"),
        "--shape", "x=4"], "input 'x' has 2 dimension(s) ['N', 64]; give every one"),
    "grad-batch-size-beyond-memory": (lambda t: [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "-o", str(t / "g.onnx"),
        "--batch-size", str(10 ** 11)], "out of memory (unable to allocate 23.3 TiB"),
    "grad-shape-against-batch-size": (lambda t: [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "-o", str(t / "g.onnx"),
        "--shape", "x=8,64", "--batch-size", "4"], "--batch-size is 4: give one of them"),
    "grad-batch-size-against-a-fixed-batch": (lambda t: [
        "grad", _fixed_batch_model(t), "--output", "logits", "-o", str(t / "g.onnx"),
        "--batch-size", "3"], "the model fixes the batch dimension of 'x' at 7"),
    "grad-shape-against-a-fixed-batch": (lambda t: [
        "grad", _fixed_batch_model(t), "--output", "logits", "-o", str(t / "g.onnx"),
        "--shape", "x=3,64"], "the model fixes dimension 0 of 'x' at 7, not 3"),
    "grad-flag-of-another-loss": (lambda t: [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "-o", str(t / "g.onnx"),
        "--time-axis", "0"], "--time-axis applies to --loss ctc, not cross_entropy"),
    "grad-output-under-a-file": (lambda t: _put(t / "f", "x") and [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "-o",
        str(t / "f" / "g.onnx")], "not a directory"),
    "grad-output-ends-with-a-slash": (lambda t: [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "-o",
        str(t / "out") + "/"], "names a folder; give a file path such as"),
    "grad-output-is-the-model": (lambda t: (t / "m.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and [
        "grad", str(t / "m.onnx"), "--output", "logits", "-o", str(t / "m.onnx")],
        "is the model file itself"),
    "grad-output-is-the-model-data": (lambda t: [
        "grad", str(_external(t)), "--output", "logits", "-o", str(t / "m.onnx.data")],
        "is an external data file of the model"),
    "convert-output-is-the-model-data": (lambda t: [
        "convert", str(_external(t)), "--dynamic-batch", "-o", str(t / "m.onnx.data")],
        "is an external data file of the model"),
    "grad-of-a-config": (lambda t: [
        "grad", str(ROOT / "configs" / "digits_mlp.yaml"), "--output", "logits", "-o",
        str(t / "g.onnx")], "digits_mlp.yaml is a config, not a model: grad takes MODEL.onnx"),
    "grad-shape-of-no-input": (lambda t: [
        "grad", str(EXAMPLES / "digits_mlp.onnx"), "--output", "logits", "--shape", "y=4,64",
        "-o", str(t / "g.onnx")], "has no input 'y'"),
    "convert-output-is-the-model": (lambda t: (t / "m.onnx").write_bytes(
        (EXAMPLES / "digits_mlp.onnx").read_bytes()) and [
        "convert", str(t / "m.onnx"), "--dynamic-batch", "-o", str(t / "m.onnx")],
        "is the model file itself"),
    "profile-trace-under-a-file": (lambda t: _put(t / "f", "x") and [
        "train", _write(t, _cfg(t)), "--profile-trace", str(t / "f" / "t.json")],
        "--profile-trace"),
    "data-strings-for-a-float-input": (_with_data(_data("d.npz", x=x.astype(str), y=y)),
                                       "holds <U"),
    "data-complex-input": (_with_data(_data("d.npz", x=x + 1j, y=y)), "imaginary part"),
    "model-raw-data-too-long": (lambda t: _long_raw_data(t) and ["train", _write(t, _cfg(
        t, model=str(t / "m.onnx")))], "the file is damaged"),
    "checkpoint-manifest-edited": (_edited_manifest("step", "abc"), "is damaged"),
    "checkpoint-manifest-tracking-not-a-mapping": (_edited_manifest("tracking", [1]),
                                                   "is damaged"),
    "checkpoint-manifest-data-order-not-a-mapping": (_edited_manifest("data_order", "x"),
                                                     "is damaged"),
    "checkpoint-negative-optimizer-steps": (_edited_arrays("optim/steps", -3),
                                            "the optimizer's step count -3 is not a whole"),
    "checkpoint-manifest-total-steps": (_edited_manifest("total_steps", -5),
                                        "manifest's total_steps -5 is not an integer of at "
                                        "least 1"),
    "checkpoint-manifest-world-size": (_edited_manifest("world_size", 0),
                                       "manifest's world_size 0 is not"),
    "model-name-with-terminal-escapes": (lambda t: _escapes_model(t) and ["train", _write(
        t, _cfg(t, model=str(t / "m.onnx")))], "'a\\nFAKE: all good\\x1b[31m'"),
    "data-shape-mismatch": (_with_data(_data("d.npz", x=x[:, :60], y=y)), "[60]"),
    "data-string-array": (_with_data(_data("d.npz", x=x, y=np.array(["a"] * len(y)))),
                          "label"),
    "data-labels-too-large": (_with_data(_data("d.npz", x=x, y=np.where(
        np.arange(len(y)) == 5, 10, y))), "holds 10 at sample 5"),
    "data-labels-negative": (_with_data(_data("d.npz", x=x, y=np.where(
        np.arange(len(y)) == 9, -3, y))), "holds -3 at sample 9"),
    "data-labels-n-by-1": (_with_data(_data("d.npz", x=x, y=y[:, None])), "[N, 1]"),
    "data-nan-input": (_with_data(_data("d.npz", x=np.where(
        np.arange(x.size).reshape(x.shape) == 70, np.nan, x).astype(np.float32), y=y)), "nan"),
    "data-empty": (_with_data(_data("d.npz", x=x[:0], y=y[:0])),
                   "d.npz is empty (shape [0, 64]); give at least one sample"),
    "data-batch-larger-than-dataset": (_with_data(_data("d.npz", x=x[:10], y=y[:10])),
                                       "data.train has 10 sample(s), fewer than one batch"),
    "data-batch-far-beyond-the-dataset": (_train(data__batch_size=10 ** 9),
                                          "fewer than one batch"),
    "data-samples-disagree": (_with_data(_data("d.npz", x=x, y=y[:-1])), "first (sample)"),
    "data-eval-labels-out-of-range": (lambda t: (np.savez(t / "e.npz", x=x, y=y + 1) or
                                     ["train", _write(t, _cfg(t, data__eval={
                                         "path": str(t / "e.npz"), "inputs": {"x": "x"},
                                         "targets": {"label": "y"}}))]), "data.eval"),
    "data-mse-target-shape": (_with_data(_data("d.npz", x=x, t=np.zeros((len(x), 3),
                                                                         np.float32)),
                                         targets={"target": "t"},
                                         loss={"type": "mse", "output": "logits",
                                               "target": "target"}), "[3]"),
    "data-token-id-past-the-embedding": (
        _past_the_embedding(reshaped=False),
        "input 'x' holds 10 at sample 13, but node 'embed' (Gather) reads it as an index"),
    # (through a Reshape, GPT-2's ids.view(-1, T): found at a step, without input or sample)
    "data-token-id-past-the-embedding-reshaped": (
        _past_the_embedding(reshaped=True),
        "input 'x' holds 10 at sample 13, but node 'embed' (Gather) reads it as an index"),
    # (through Where(x < 0, x + vocab, x), tf2onnx's Keras 3 Embedding: found at a step)
    "data-token-id-past-the-embedding-wrapped": (
        _past_the_embedding(reshaped=False, wrapped=True),
        "input 'x' holds 10 at sample 13, but node 'embed' (Gather) reads it as an index"),
    # (tf2onnx 1.17 writes that Where as Muls of Casts of the Less: found at a step)
    "data-token-id-past-the-embedding-wrapped-arithmetic": (
        _past_the_embedding(reshaped=False, wrapped="arithmetic"),
        "input 'x' holds 10 at sample 13, but node 'embed' (Gather) reads it as an index"),
    "data-eval-set-bad": (lambda t: (np.savez(t / "e.npz", x=x[:, :50], y=y) or
                          ["train", _write(t, _cfg(t, steps=10**6, data__eval={
                              "path": str(t / "e.npz"), "inputs": {"x": "x"},
                              "targets": {"label": "y"}}))]), "data.eval"),
}


def test_the_catalogue_covers_at_least_40_cases():
    print(f"\nbad-input catalogue: {len(CASES)} cases")
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(tmp_path, capsys, name):
    from trainer.cli import main

    make, expected = CASES[name]
    earlier = tmp_path / "out.onnx"
    argv = make(tmp_path)
    earlier.write_bytes(b"an earlier output")
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("onnx-trainer: error:"), lines[0]
    assert expected.lower() in lines[0].lower(), (expected, lines[0])
    assert earlier.read_bytes() == b"an earlier output"  # nothing was overwritten


def test_check_of_a_config_whose_model_is_a_pipe_says_so(tmp_path, capsys):
    """`check CONFIG` waited for a writer of the pipe, forever."""
    from trainer.cli import main

    os.mkfifo(tmp_path / "m.onnx")
    assert main(["check", _write(tmp_path, _cfg(tmp_path, model=str(tmp_path / "m.onnx")))]) == 1
    assert "(it is not a regular file: a device, a pipe" in capsys.readouterr().out


@pytest.mark.parametrize("world,drop_last,refused", [(2, False, True), (1, False, False),
                                                     (2, True, False)])
def test_check_names_a_batch_of_one_sample_that_batchnorm_refuses(tmp_path, world, drop_last,
                                                                 refused):
    """1437 samples in batches of 6 on 2 processes, the last batch of 3 kept: one process gets
    1 sample, which `train` refused at its start while `check --world 2` said nothing."""
    from trainer.config import config_from_dict
    from trainer.report import preflight

    args = _digits_batchnorm(tmp_path, data__batch_size=6, data__drop_last=drop_last)
    cfg = config_from_dict(yaml.safe_load(open(args[1])), tmp_path)
    problems = [str(p) for p in preflight(cfg, world=world).problems]
    one = [p for p in problems if "trains on 1 value per channel" in p]
    assert bool(one) == refused, problems
    if refused:
        assert one[0].endswith("1 sample for some of the 2 processes (set data.drop_last: "
                               "true)"), one[0]


def test_a_model_file_over_the_limit_is_not_read_for_its_external_data(tmp_path, monkeypatch):
    """A sparse 2.5 GB model file: looking for its external data read it whole (2.6 GB of
    memory, /dev/zero without end) before load_model refused it unread."""
    import onnx

    from trainer import graph

    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(graph.MAX_FILE_BYTES + 1)
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("the file was read"))
    assert graph.external_data_files(big) == []
    assert graph.external_data_files("/dev/zero") == []
    with pytest.raises(graph.ModelError, match="over protobuf's 2 GB limit"):
        graph.load_model(big)


def _ops_in_subgraphs(tmp):
    """x @ w -> If (constant condition: its then-branch runs Warp) -> Loop whose body runs
    Weft -> logits; both ops of a domain no kernel serves."""
    f, b = TensorProto.FLOAT, TensorProto.BOOL
    then = helper.make_graph([helper.make_node("Warp", ["h"], ["t"], domain="com.x",
                                               name="warp_in_then")], "then", [],
                             [helper.make_tensor_value_info("t", f, None)])
    other = helper.make_graph([helper.make_node("Tanh", ["h"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", f, None)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Weft", ["v_in"], ["v_out"], domain="com.x", name="weft_in_body")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", b, []),
                 helper.make_tensor_value_info("v_in", f, None)],
        [helper.make_tensor_value_info("c_out", b, []),
         helper.make_tensor_value_info("v_out", f, None)])
    return _graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                   helper.make_node("If", ["cond"], ["h1"], then_branch=then,
                                    else_branch=other, name="if1"),
                   helper.make_node("Loop", ["trip", "cond", "h1"], ["logits"], body=body,
                                    name="loop1")],
                  [_W, numpy_helper.from_array(np.array(True), "cond"),
                   numpy_helper.from_array(np.array(2, np.int64), "trip")], domains=["com.x"])


def test_unsupported_ops_in_branches_and_loop_bodies_are_listed_before_training(tmp_path,
                                                                              capsys):
    """`check` and the pre-flight listed only the main graph's nodes: with unsupported ops
    only inside an If's branch and a Loop's body, `check` said "all trainable" and exited 0,
    and `train` found them only when building."""
    from trainer.cli import main

    onnx.save(_ops_in_subgraphs(tmp_path), tmp_path / "m.onnx")
    assert main(["check", str(tmp_path / "m.onnx")]) == 1
    out = capsys.readouterr().out
    assert "3 nodes, opset 18: 2 node(s) cannot be trained" in out, out
    assert "if1/then/warp_in_then" in out and "loop1/weft_in_body" in out, out
    code = main(["train", _write(tmp_path, _cfg(tmp_path, model=str(tmp_path / "m.onnx")))])
    err = capsys.readouterr().err
    assert code == 2 and "have no forward kernel: Warp of domain com.x (node " \
        "'if1/then/warp_in_then'), Weft of domain com.x (node 'loop1/weft_in_body')" in err, err


def test_inputs_of_disagreeing_types_are_named_by_check_and_before_training(tmp_path, capsys):
    """An int64 input into a float MatMul passes onnx.checker; `check` said "all trainable"
    (exit 0) and only the backward's builder refused it, for a parameter it reads."""
    from trainer.cli import main

    onnx.save(_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], [_W],
                     inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 64])]),
              tmp_path / "m.onnx")
    assert main(["check", str(tmp_path / "m.onnx")]) == 1
    out = capsys.readouterr().out
    assert "REFUSED: input types disagree: 'x' int64, 'w' float32 are bound to one type T" \
        in out and "1 nodes, opset 18: 1 node(s) cannot be trained" in out, out
    code = main(["train", _write(tmp_path, _cfg(tmp_path, model=str(tmp_path / "m.onnx")))])
    err = capsys.readouterr().err
    assert code == 2 and "node 'mm' (MatMul): input types disagree: 'x' int64, 'w' float32" \
        in err, err


# -- what the code never does ------------------------------------------------------------------
_UNSAFE = [(r"\byaml\.load\(", "yaml.load (use yaml.safe_load)"),
           (r"\bimport pickle\b|\bpickle\.", "pickle"),
           (r"allow_pickle\s*=\s*True", "allow_pickle=True"),
           (r"(?<![\w.])eval\(|(?<![\w.])exec\(", "eval/exec"),
           (r"yaml\.(unsafe_load|full_load|UnsafeLoader|FullLoader)", "an unsafe YAML loader")]


def test_the_engine_never_loads_unsafely():
    found = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        text = path.read_text()
        for pattern, what in _UNSAFE:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not found, "\n".join(found)


def test_a_conv_bias_of_the_wrong_shape_says_what_conv_takes():
    """PyTorch 2.13's default exporter with optimize=False writes a Conv3d without a bias as a
    Conv whose bias is Expand(0, ...) of shape [C, 2]: the error names the node, the shape and
    the shape a Conv bias has."""
    from trainer.errors import TrainerError
    from trainer.executor import Executor

    w = np.zeros((4, 3, 3, 3, 3), np.float32)
    g = helper.make_graph(
        [helper.make_node("Expand", ["zero", "bshape"], ["b"]),
         helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv3d")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0), "zero"),
         numpy_helper.from_array(np.array([4, 2], np.int64), "bshape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises((TrainerError, ValueError), match=r"conv3d.*bias has shape \[4, 2\].*\[4\]"):
        Executor(model).run({"x": np.zeros((2, 3, 4, 8, 8), np.float32)})


def test_data_that_does_not_fit_the_model_is_one_problem(tmp_path):
    """Per-sample shape [60] for a [64] input: the data problem alone, not also the build's
    kernel failure on those shapes (a NumPy matmul message)."""
    from trainer.config import config_from_dict
    from trainer.report import preflight

    np.savez(tmp_path / "d.npz", x=np.zeros((40, 60), np.float32), y=np.zeros(40, np.int64))
    raw = _cfg(tmp_path, data={"train": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                                         "targets": {"label": "y"}}, "batch_size": 8})
    report = preflight(config_from_dict(raw, tmp_path))
    assert [str(p) for p in report.problems] == [
        "data.train: array for 'x' has per-sample shape [60], the model expects [64]"]


def test_an_overflowing_step_prints_no_numpy_warnings(tmp_path):
    """An lr that makes the loss NaN: the engine's message names the node; NumPy's
    RuntimeWarnings from the kernels on the way are not printed."""
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", _write(
        tmp_path, _cfg(tmp_path, steps=30, optimizer={"type": "sgd", "lr": 1e12}))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "loss became nan" in proc.stderr
    assert "RuntimeWarning" not in proc.stdout + proc.stderr


def test_a_transpose_with_negative_axes_is_refused_by_name():
    """PyTorch's TorchScript exporter writes perm=[0, -2, -1, 1] for Hugging Face's Mamba2 and
    Bamba, which ONNX does not allow (onnxruntime refuses the file). NumPy ran it, and the
    gradient rule's inverse permutation of it was wrong: a shape error in a Mul's gradient.
    Now the node and its perm are named."""
    from trainer.errors import TrainerError
    from trainer.executor import Executor

    g = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], name="bad_perm", perm=[0, -2, -1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(TrainerError, match=r"bad_perm.*perm \[0, -2, -1, 1\] is not a perm"):
        Executor(model).run({"x": np.zeros((2, 3, 4, 5), np.float32)})


@pytest.mark.parametrize("argv", [
    ["grad", "m.onnx", "--output", "y", "--batch-size", "0", "-o", "g.onnx"],
    ["grad", "m.onnx", "--output", "y", "--batch-size", "-4", "-o", "g.onnx"],
    ["convert", "m.onnx", "--seed", "-1", "-o", "c.onnx"],
    ["check", "c.yaml", "--world", "0"],
    ["train", "c.yaml", "--profile", "-1"],
    ["train", "c.yaml", "--profile-warmup", "-5"]], ids=" ".join)
def test_numbers_out_of_range_on_the_command_line_are_refused(capsys, argv):
    """Counts below what they count are usage errors (a batch of -4 reached NumPy)."""
    from trainer.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "is below" in capsys.readouterr().err


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_a_sparse_initializer_trains_as_a_dense_tensor(tmp_path, op):
    """A weight stored as a sparse_initializer (valid ONNX) was "a cycle or undefined
    inputs"; it is read as the dense tensor it stands for, and every value trains (a Gemm's
    failed on in the pre-flight's estimate, which read the model without densifying)."""
    from trainer.graph import load_model

    sp = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "w"),
        numpy_helper.from_array(np.array([0, 5], np.int64), "w_idx"), [64, 10])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]) if op == "MatMul" else
         helper.make_node("Gemm", ["x", "w"], ["h"]),
         helper.make_node("Add", ["h", "b"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.zeros(10, np.float32), "b")], sparse_initializer=[sp])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp_path / "m.onnx"))
    w = numpy_helper.to_array(next(t for t in load_model(tmp_path / "m.onnx").graph.initializer
                                   if t.name == "w"))
    want = np.zeros(640, np.float32)
    want[[0, 5]] = [0.5, 0.25]
    np.testing.assert_array_equal(w, want.reshape(64, 10))
    from trainer.cli import main
    assert main(["train", _write(tmp_path, _cfg(tmp_path, model=str(tmp_path / "m.onnx")))]) == 0


def test_a_model_of_opset_1_trains_as_one_of_opset_13(tmp_path):
    """The loss's and the gradients' Casts were written with opset 6's enum type, which an
    opset-1 graph reads as a type name: "Mismatched attribute type in 'loss/Cast : to'"."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    losses = {}
    for opset in (1, 13):
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
            [numpy_helper.from_array(np.full((64, 10), 0.01, np.float32), "w")])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]),
                  str(tmp_path / f"m{opset}.onnx"))
        raw = _cfg(tmp_path, model=str(tmp_path / f"m{opset}.onnx"),
                   output=str(tmp_path / f"o{opset}.onnx"), log={"every_steps": 1})
        t = Trainer(config_from_dict(raw, tmp_path), stream=__import__("io").StringIO())
        t.fit()
        losses[opset] = [r["loss"] for r in t.history if "loss" in r]
    assert losses[1] == losses[13]


def test_check_with_a_world_refuses_what_train_would(tmp_path):
    """lamb with a sharded optimizer, 16-bit compression of fp64 gradients: check --world 2
    passed them, mpirun -np 2 train refused."""
    from trainer.config import config_from_dict
    from trainer.report import preflight

    raw = _cfg(tmp_path, optimizer={"type": "lamb"}, distributed={"shard_optimizer": True})
    problems = preflight(config_from_dict(raw, tmp_path), world=2).problems
    assert any("shard_optimizer does not support optimizer.type lamb" in str(p)
               for p in problems)
    # fp64 gradients with a 16-bit compression: check --world 2 passed, train on 2 refused
    raw = _cfg(tmp_path, precision="fp64", distributed={"compress": "bf16"})
    problems = preflight(config_from_dict(raw, tmp_path), world=2).problems
    assert any("compress: bf16 compresses float32 gradients; these are float64" in str(p)
               for p in problems)
    assert not preflight(config_from_dict(raw, tmp_path), world=1).problems


@pytest.mark.parametrize("opset", [5, 9])
def test_an_lstm_the_version_converter_cannot_lift_is_refused_by_check_too(opset):
    """An LSTM below opset 10 trains on the model converted to opset 11; onnx's converter
    cannot convert an opset-5 one, which the rule refuses: `check` called it trainable."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.autodiff import build_training_graph
    from trainer.errors import ModelError
    from trainer.graph import recurrent_opset
    from trainer.report import model_report

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("Wf", (6, 5)), ("W", (1, 24, 4)), ("R", (1, 24, 6)))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["", "yh"], hidden_size=6),
             helper.make_node("Squeeze", ["yh"], ["s"], axes=[0]),
             helper.make_node("MatMul", ["s", "Wf"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [3, 8, 4])]
                          + [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, t.dims)
                             for t in inits],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 5])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)
    report = model_report(model)
    (row,) = [r for r in report.nodes if r.op == "LSTM"]
    if opset == 9:  # (converted: trains)
        assert report.ok and not row.gradient.startswith("REFUSED")
        return
    assert not report.ok and row.gradient.startswith("REFUSED: the rule needs opset 10")
    with pytest.raises(ModelError, match="needs opset >= 10"):
        build_training_graph(recurrent_opset(model), {"type": "cross_entropy", "output":
                                                      "logits", "target": "t"}, "all")


@pytest.mark.parametrize("batchnorm", ["train", "eval"])
def test_per_activation_batchnorm_is_refused_by_check_and_by_training(batchnorm):
    """BatchNormalization-7 with spatial=0 (statistics per activation): `check` names the node
    as one that cannot be trained, and building the training graph refuses it with the advice,
    in either batchnorm mode (both crashed inside the step)."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.autodiff import build_training_graph
    from trainer.errors import ModelError
    from trainer.report import model_report

    rng = np.random.default_rng(0)
    inits = {k: rng.uniform(0.5, 1.5, (3, 2, 2)).astype(np.float32) for k in "sbmv"}
    inits["W"] = rng.standard_normal((12, 2)).astype(np.float32)
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"], spatial=0),
             helper.make_node("Flatten", ["h"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "W"], ["y"])]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])] +
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inits.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    report = model_report(model)
    assert not report.ok
    (row,) = [r for r in report.nodes if r.op == "BatchNormalization"]
    assert row.gradient.startswith("REFUSED") and "spatial=0" in row.gradient
    with pytest.raises(ModelError, match="spatial=0.*opset 9 or later"):
        build_training_graph(model, {"type": "mse", "output": "y", "target": "t"}, "all",
                             batch_size=6, batchnorm=batchnorm)


def test_python_api_names_the_model_when_the_model_itself_is_invalid() -> None:
    """build_training_graph on a model onnx.checker refuses (GroupNormalization-18, which onnx
    marks deprecated) says the model is invalid, not the training graph built from it."""
    from trainer.autodiff import build_training_graph
    from trainer.errors import ModelError

    g = helper.make_graph(
        [helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=2)],
        "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])],
        [numpy_helper.from_array(np.ones(2, np.float32), "scale"),
         numpy_helper.from_array(np.zeros(2, np.float32), "bias")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    with pytest.raises(ModelError, match="^the model is not a valid ONNX model: .*deprecated"):
        build_training_graph(model, {"type": "mse", "output": "y", "target": "t"})


def test_a_checker_message_over_several_lines_is_kept_whole(tmp_path) -> None:
    """onnx.checker's message for unsorted nodes spans lines; only its first was kept, which
    stopped at "... input 'shp' of node:" without the node; its context part goes in
    parentheses."""
    from trainer.errors import ModelError
    from trainer.graph import check_model

    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["b1"], name="cos1",
                              value=numpy_helper.from_array(np.array([0.0], np.float32))),
             helper.make_node("Constant", [], ["shp"],
                              value=numpy_helper.from_array(np.array([4], np.int64))),
             helper.make_node("Add", ["x", "b1"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"^m is not a valid ONNX model: Nodes in a graph must "
                       r"be topologically sorted, however input 'shp' of node: name: cos1 "
                       r"OpType: ConstantOfShape is not output of any previous nodes\.$"):
        check_model(model, "m")
    del model.graph.node[:]
    model.graph.node.extend([nodes[1], nodes[0], nodes[2]])
    model.graph.node[0].attribute[0].name = "bogus"
    with pytest.raises(ModelError, match=r"Unrecognized attribute: bogus for operator Constant "
                       r"\(Bad node spec for node\. Name: +OpType: Constant\)$"):
        check_model(model, "m")


def test_log_metrics_naming_a_directory_suggests_a_metrics_file(tmp_path):
    """(it suggested .../model.onnx, the output's example, for the metrics log)"""
    import io

    from trainer.config import config_from_dict
    from trainer.errors import TrainerError
    from trainer.train import Trainer

    (tmp_path / "logs").mkdir()
    cfg = config_from_dict(_cfg(tmp_path, log__metrics=str(tmp_path / "logs")), tmp_path)
    with pytest.raises(TrainerError, match="log.metrics .*logs is a directory; give a file "
                                           "path such as .*logs/metrics.jsonl"):
        Trainer(cfg, stream=io.StringIO())


def test_python_api_misuse_is_one_clear_error(tmp_path, digits_config) -> None:
    """Plausible misuses of the Python API raised AttributeError, KeyError, TypeError or
    ValueError from deep inside (found by an API sweep); each names the problem now."""
    import io

    from trainer.autodiff import build_training_graph, reverse
    from trainer.config import config_from_dict
    from trainer.errors import ModelError, TrainerError
    from trainer.export import export_model
    from trainer.graph import load_model
    from trainer.train import Trainer

    raw = digits_config(steps=1)
    with pytest.raises(TrainerError, match="Trainer takes a Config, got dict"):
        Trainer(raw)
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    x = np.load(EXAMPLES / "digits.npz")["x_test"][:4]
    with pytest.raises(TrainerError, match=r"predict: the model has no input 'input' \(its "
                                           r"inputs: x\)"):
        t.predict({"input": x})
    with pytest.raises(TrainerError, match="predict takes a mapping of the model's inputs"):
        t.predict(x)
    assert t.predict({"x": x.tolist()})["logits"].shape == (4, 10)  # (lists: as arrays)
    with pytest.raises(TrainerError, match=r"predict: 'x' has shape \[64\]; the model takes "
                                           r"\[batch, ...\] arrays of 2 axes \['\?', 64\] \(one "
                                           r"sample: add the batch axis"):
        t.predict({"x": x[0]})  # (it gave logits of shape [10], a Gemm on a vector)
    model_path = EXAMPLES / "digits_mlp.onnx"
    loss = {"type": "cross_entropy", "output": "logits", "target": "label"}
    with pytest.raises(ModelError, match=r"the loss has no key 'ignore_idx' \(its keys: type, "
                                         r"output, target"):
        build_training_graph(load_model(model_path), {**loss, "ignore_idx": 0}, batch_size=2)
    with pytest.raises(ModelError, match="the loss must be a mapping"):
        build_training_graph(load_model(model_path), "cross_entropy", batch_size=2)
    with pytest.raises(ModelError, match="reverse: batch_size must be a positive integer, "
                                         "got -1"):
        reverse(load_model(model_path), ["fc1.weight"], ["logits"], batch_size=-1)
    # (a path is loaded, as the CLI loads it; bce's `logits` key as in a config)
    assert reverse(str(model_path), "fc1.weight", "logits", batch_size=2).graph.output
    bce = {"type": "bce", "output": "logits", "target": "t", "logits": True}
    assert build_training_graph(model_path, bce, batch_size=2).graph.node
    m = load_model(model_path)
    with pytest.raises(ModelError, match=r"cannot export: the values for 'fc1.bias' have shape "
                                         r"\[7\], the model's tensor \[\d+\]"):
        export_model(m, {"fc1.bias": np.zeros(7, np.float32)}, tmp_path / "o.onnx")
    with pytest.raises(ModelError, match="metadata keys and values are strings"):
        export_model(m, {}, tmp_path / "o.onnx", {"steps": 5})
    with pytest.raises(ModelError, match="reverse: wrt names tensors"):
        reverse(m, None, "logits", batch_size=2)
    with pytest.raises(ModelError, match=r"the shape given for input 'x', \[2\], has 1 axes; "
                                         r"the model's input has 2"):
        reverse(m, "fc1.weight", "logits", shapes={"x": (2,)})
    with pytest.raises(TrainerError, match="evaluate: the arrays hold no sample"):
        t.evaluate({"x": x[:0], "label": np.zeros(0, np.int64)})
    with pytest.raises(TrainerError, match="config_from_dict: base_dir is the folder"):
        config_from_dict(raw, None)


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "safetensors", "npz",
                                  "other_zip", "cut_zip"])
def test_a_file_that_is_no_onnx_model_is_named_for_what_it_is(tmp_path, kind):
    """`model:` naming a PyTorch file was called "a NumPy archive" (any zip was), and the
    pre-flight's own reading of the model, which `train` does first, gave protobuf's "Wire
    format was corrupt" for every such file: both say what the file is, and a PyTorch file
    how to export it."""
    import json
    import struct
    import zipfile

    import torch

    from trainer.errors import ModelError
    from trainer.graph import load_model
    from trainer.memory import load_structure

    path = tmp_path / "model.bin"
    if kind.startswith("torch"):
        torch.save({"w": torch.zeros(3)}, path,
                   _use_new_zipfile_serialization=kind == "torch_zip")
        want = "it is a PyTorch file (torch.save) or a Python pickle, not an ONNX model: " \
               "export the network with torch.onnx.export"
    elif kind == "safetensors":
        header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}})
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 12)
        want = "it is a safetensors file (weights only), not an ONNX model"
    elif kind == "npz":
        np.savez(path, x=np.zeros(3))
        path = path.with_suffix(".bin.npz")
        want = "it is a NumPy archive or array (a dataset"
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello" * 100)
        want = "it is a zip archive (notes.txt), not an ONNX model"
        if kind == "cut_zip":  # (a copy cut off: no directory to say what it holds)
            path.write_bytes(path.read_bytes()[:200])
            want = "it is a zip archive that cannot be read (cut off?), such as a NumPy " \
                   "archive (a dataset) or a PyTorch file"
    for load in (load_model, load_structure):
        with pytest.raises(ModelError, match=re.escape(f"cannot parse ONNX model {path}: {want}")):
            load(path)


@pytest.mark.parametrize("bad", ["W", "rv"])
def test_a_model_holding_nan_trained_values_is_refused_at_the_start(tmp_path, bad):
    """A weight or a BatchNorm running statistic that is NaN in the file stopped step 1 on a
    non-finite loss with advice to lower the learning rate (and evaluation counted argmax of
    NaN): the tensor is named before training."""
    import io

    from trainer.config import config_from_dict
    from trainer.errors import ModelError
    from trainer.train import Trainer

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    rv = np.ones(3, np.float32)
    (w if bad == "W" else rv)[1] = np.nan
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("BatchNormalization", ["h", "s", "b", "rm", "rv"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(3, np.float32), "s"),
         numpy_helper.from_array(np.zeros(3, np.float32), "b"),
         numpy_helper.from_array(np.zeros(3, np.float32), "rm"),
         numpy_helper.from_array(rv, "rv")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]),
              tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 4)).astype(np.float32),
             y=rng.integers(0, 3, 16))
    raw = {"model": "m.onnx", "device": "cpu", "steps": 2,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    with pytest.raises(ModelError, match=f"the model holds NaN values in '?{bad}'?, which "
                                         "training would update"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    # (eval and export train nothing: a checkpoint's values may replace the file's)
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO(), check=False, writes=False)
    # (-inf is no damage: a bias that disables a class trains as such)
    (w if bad == "W" else rv)[1] = -np.inf if bad == "W" else np.inf
    g.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    g.initializer[4].CopyFrom(numpy_helper.from_array(rv, "rv"))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]),
              tmp_path / "m.onnx")
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


def test_a_batch_size_baked_into_a_reshape_is_hinted_at(tmp_path):
    """A traced model with a dynamic batch input whose Reshape holds the export's batch (16)
    failed `eval` at data.batch_size 64 with NumPy's words alone."""
    import io

    from trainer.config import config_from_dict
    from trainer.errors import ModelError
    from trainer.train import Trainer

    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["x2"]),
                           helper.make_node("MatMul", ["x2", "W"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(np.array([16, 64], np.int64), "shape"),
                           numpy_helper.from_array(
                               rng.standard_normal((64, 10)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((100, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 100))
    ds = {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}}
    raw = {"model": "m.onnx", "device": "cpu", "steps": 1,
           "data": {"train": ds, "eval": ds, "batch_size": 64},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    with pytest.raises(ModelError, match="cannot reshape array of size 4096 into shape "
                                         r"\(16,64\); the model may hold the batch size it was "
                                         "exported at"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO(), check=False,
                writes=False)
