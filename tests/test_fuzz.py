"""Fuzzed configs, models and datasets either load or raise a TrainerError (derandomized, < 20 s
each). Longer random run: `FUZZ_LONG=1 pytest tests/test_fuzz.py` (50x the examples), or
`--hypothesis-profile=long` once tests/conftest.py registers a profile named "long"."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import zipfile

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES
from trainer import config as config_mod
from trainer.config import load_config
from trainer.data import load_arrays
from trainer.errors import TrainerError
from trainer.graph import load_model

LONG = bool(os.environ.get("FUZZ_LONG")) or settings.get_current_profile_name() == "long"


def fuzz(examples: int):
    return settings(max_examples=examples * 50 if LONG else examples, derandomize=not LONG,
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _outcome(fn, *args, one_line: bool = True) -> str:
    """'ok' or 'refused'; any exception other than a TrainerError fails the test."""
    try:
        fn(*args)
    except TrainerError as exc:
        assert str(exc), repr(exc)
        assert not one_line or "\n" not in str(exc), repr(exc)  # one line for the CLI
        return "refused"
    return "ok"


# -- configs ----------------------------------------------------------------------------------
def _key_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        conv = f.metadata.get("conv")
        if isinstance(conv, type) and dataclasses.is_dataclass(conv):
            out += _key_paths(conv, path + ".")
    return out


KEYS = _key_paths(config_mod.Config) + ["data.train.path", "data.train.inputs.x",
                                        "data.eval.targets.label", "optimizer.groups"]
DIGITS_CONFIG = yaml.safe_load((EXAMPLES.parent / "configs" / "digits_mlp.yaml").read_text())

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["all", "sgd", "adamw", "cosine", "auto", "cpu", "~",
                                          "~nobody/x", "1e-3", "-1", "", ".", "..", "\x00"]))
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from([k.split(".")[-1] for k in KEYS]),
                              st.text(max_size=6)), inner, max_size=4)), max_leaves=12)


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


@fuzz(300)
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), trees), max_size=4),
       drops=st.lists(st.sampled_from(KEYS), max_size=2),
       overrides=st.lists(st.one_of(
           st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
                     st.one_of(st.text(max_size=10), scalars.map(yaml.safe_dump))),
           st.text(max_size=20)), max_size=3))
def test_config_loader_on_mutated_configs(tmp_path, edits, drops, overrides):
    tree = copy.deepcopy(DIGITS_CONFIG)
    for key, value in edits:
        _set(tree, key, value)
    for key in drops:
        *head, last = key.split(".")
        node = tree
        for p in head:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    _outcome(load_config, path, overrides)


@fuzz(200)
@given(st.one_of(st.text(max_size=200), trees.map(lambda t: yaml.safe_dump(t)),
                 st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
def test_config_loader_on_random_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _outcome(load_config, path, [])


def test_config_errors_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('? "\\n\\n"\n')  # a mapping whose only key is two newlines
    assert _outcome(load_config, path, []) == "refused"


# -- models -----------------------------------------------------------------------------------
DIGITS_BYTES = (EXAMPLES / "digits_mlp.onnx").read_bytes()


@st.composite
def mutated_model(draw) -> bytes:
    data = bytearray(DIGITS_BYTES)
    n = len(data)
    # Structure lives at both ends (nodes first; inputs, outputs and opsets last) and before
    # each raw_data run, so half the edits land in the first and last kilobytes.
    pos = st.one_of(st.integers(0, n - 1), st.integers(0, 1024), st.integers(n - 1024, n - 1))
    for kind, at, value in draw(st.lists(st.tuples(
            st.sampled_from(["set", "insert", "delete", "bits"]), pos, st.integers(0, 255)),
            min_size=1, max_size=6)):
        at = min(at, len(data) - 1)
        if kind == "set":
            data[at] = value
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete":
            del data[at]
        else:
            data[at] ^= 1 << (value % 8)
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut] if cut is not None else data)


@fuzz(400)
@given(mutated_model())
def test_model_loader_on_mutated_protobuf_bytes(tmp_path, blob):
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    _outcome(load_model, path)


OPS = [("Add", 2), ("MatMul", 2), ("Relu", 1), ("Identity", 1), ("Reshape", 2), ("Concat", 2),
       ("Softmax", 1), ("Gemm", 3), ("If", 1), ("Loop", 2), ("Constant", 0), ("NoSuchOp", 1)]
DTYPES = [TensorProto.FLOAT, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.BOOL,
          TensorProto.STRING, TensorProto.UNDEFINED, 99]
dims = st.lists(st.integers(-3, 2**40), max_size=4)
attrs = st.dictionaries(st.sampled_from(["axis", "alpha", "perm", "to", "value", "body",
                                         "then_branch", "transA", "mode", "location"]),
                        st.one_of(st.integers(-5, 5), st.floats(allow_nan=True),
                                  st.lists(st.integers(-5, 5), max_size=3), st.text(max_size=5)),
                        max_size=3)


@st.composite
def chaotic_graph(draw) -> bytes:
    """Any ops, inputs, attributes, dtypes, dims and external-data fields."""
    names = ["x"]
    inits = []
    for i in range(draw(st.integers(0, 3))):
        dt = draw(st.sampled_from(DTYPES))
        t = TensorProto(name=f"w{i}", data_type=dt, dims=draw(dims))
        if draw(st.booleans()):
            t.raw_data = draw(st.binary(max_size=64))
        else:
            t.float_data.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        if draw(st.integers(0, 4)) == 0:
            t.data_location = TensorProto.EXTERNAL
            for k, v in draw(st.dictionaries(st.sampled_from(["location", "offset", "length"]),
                                             st.sampled_from(["w.bin", "../x", "/etc/hostname",
                                                              "", "-1", "8", "99999999999",
                                                              "nope"]), max_size=3)).items():
                t.external_data.add(key=k, value=v)
        inits.append(t)
        names.append(t.name)
    nodes = []
    for i in range(draw(st.integers(0, 6))):
        op, arity = draw(st.sampled_from(OPS))
        ins = [draw(st.sampled_from(names + [""])) for _ in range(arity)]
        node = helper.make_node(op, ins, [f"v{i}"], name=f"n{i}")
        for key, value in draw(attrs).items():
            try:
                node.attribute.append(helper.make_attribute(key, value))
            except (ValueError, TypeError):
                pass
        nodes.append(node)
        names.append(f"v{i}")
    x = helper.make_tensor_value_info("x", draw(st.sampled_from(DTYPES[:4])),
                                      draw(st.lists(st.integers(0, 2**40), max_size=3)))
    outs = [helper.make_tensor_value_info(draw(st.sampled_from(names)), TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", [x], outs, inits)
    opset = draw(st.integers(1, 25))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=draw(st.integers(1, 12)))
    return model.SerializeToString()


@st.composite
def valid_graph(draw) -> bytes:
    """A well-formed chain of Relu/Identity/Add over float[3], weights inline or external."""
    value, nodes, inits = "x", [], []
    for i in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["Relu", "Identity", "Add"]))
        ins = [value]
        if op == "Add":
            w = numpy_helper.from_array(np.full(3, i, np.float32), f"w{i}")
            if draw(st.booleans()):  # external: 12 bytes at offset 4 * i of w.bin
                w.ClearField("raw_data")
                w.data_location = TensorProto.EXTERNAL
                for k, v in (("location", "w.bin"), ("offset", str(4 * i)), ("length", "12")):
                    w.external_data.add(key=k, value=v)
            inits.append(w)
            ins.append(w.name)
        nodes.append(helper.make_node(op, ins, [f"v{i}"], name=f"n{i}"))
        value = f"v{i}"
    io_type = TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", io_type, [3])],
                          [helper.make_tensor_value_info(value, io_type, [3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@fuzz(300)
@given(st.one_of(chaotic_graph().map(lambda b: (b, False)),
                 valid_graph().map(lambda b: (b, True))))
def test_model_loader_on_random_small_graphs(tmp_path, case):
    blob, valid = case
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    (folder / "w.bin").write_bytes(np.zeros(64, np.float32).tobytes())
    path = folder / "m.onnx"
    path.write_bytes(blob)
    assert _outcome(load_model, path) == "ok" or not valid


# -- datasets ---------------------------------------------------------------------------------
def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


DATASET = _npz(x=np.arange(24, dtype=np.float32).reshape(6, 4), y=np.arange(6))
DATASET_Z = io.BytesIO()
np.savez_compressed(DATASET_Z, x=np.arange(24, dtype=np.float32).reshape(6, 4), y=np.arange(6))


@st.composite
def mutated_npz(draw) -> bytes:
    data = bytearray(draw(st.sampled_from([DATASET, DATASET_Z.getvalue()])))
    for at, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1),
                                             st.integers(0, 255)), min_size=1, max_size=5)):
        data[at] = value
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data[:cut] if cut is not None else data)


@fuzz(400)
@given(mutated_npz())
def test_dataset_loader_on_mutated_npz_bytes(tmp_path, blob):
    path = tmp_path / "d.npz"
    path.write_bytes(blob)
    _outcome(load_arrays, path, {"input": "x", "label": "y"}, "data.train")


arrays = st.one_of(
    st.builds(lambda shape, dt, fill: np.full(shape, fill).astype(dt),
              st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
              st.sampled_from(["f4", "f8", "f2", "i8", "u1", "?", "c8", "U3", "S2", "M8[D]"]),
              st.sampled_from([0, 1, np.nan, np.inf, -np.inf])),
    st.just(np.zeros(2, dtype=[("a", "f4")])),
    st.just(np.array([None, 1], dtype=object)))


@fuzz(200)
@given(x=arrays, y=arrays)
def test_dataset_loader_on_random_arrays(tmp_path, x, y):
    path = tmp_path / "d.npz"
    path.write_bytes(_npz(x=x, y=y))
    got = _outcome(load_arrays, path, {"input": "x", "label": "y"}, "data.train")
    finite = all(a.dtype.kind not in "fc" or np.isfinite(a).all() for a in (x, y))
    plain = all(a.dtype.kind not in "OVMm" for a in (x, y))
    same = x.ndim and y.ndim and x.shape[0] == y.shape[0] and x.size and y.size
    assert (got == "ok") == bool(finite and plain and same), (x, y)


def test_the_fuzzed_inputs_load_unmodified(tmp_path):
    """The seeds themselves are valid: fuzzing starts from working files."""
    (tmp_path / "m.onnx").write_bytes(DIGITS_BYTES)
    assert _outcome(load_model, tmp_path / "m.onnx") == "ok"
    for blob in (DATASET, DATASET_Z.getvalue()):
        (tmp_path / "d.npz").write_bytes(blob)
        assert _outcome(load_arrays, tmp_path / "d.npz", {"i": "x", "l": "y"}, "d") == "ok"
    config = tmp_path / "configs" / "c.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(DIGITS_CONFIG))
    assert _outcome(load_config, config, []) == "ok"
    with zipfile.ZipFile(io.BytesIO(DATASET)) as zf:
        assert sorted(zf.namelist()) == ["x.npy", "y.npy"]


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(all="ignore"):
        yield

