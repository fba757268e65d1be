"""ONNX's whole backend node test suite through trainer.onnx_backend, and the Backend API.

Every case is run and counted; the ones that fail must be listed with a reason in
tests/onnx_backend_expected_failures.txt, and a listed case that starts passing is reported so
the list shrinks (regenerate it with `python -m tests.onnx_conformance --write-expected`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests import onnx_conformance as conf
from trainer import onnx_backend

# Counted over all cases; the ones below the line are random draws that no engine can match.
PASS_BAR = 0.99


@pytest.fixture(scope="module")
def results():
    return conf.run_all()


def test_conformance_bar(results) -> None:
    passed = sum(r.ok for r in results)
    print(f"\n{conf.summary(results)}")
    assert len(results) >= 1800, "the suite was not collected in full"
    assert passed / len(results) >= PASS_BAR, conf.summary(results)


def test_every_failure_is_listed_with_a_reason(results) -> None:
    expected = conf.read_expected()
    unlisted = [f"{r.name}: {r.reason}" for r in results if not r.ok and r.name not in expected]
    assert not unlisted, "failing cases not in the expected-failures list:\n" + "\n".join(
        unlisted)
    assert all(expected.values()), "every expected failure needs a reason"


def test_listed_cases_still_fail(results) -> None:
    now_passing = [r.name for r in results if r.ok and r.name in conf.read_expected()]
    assert not now_passing, ("these cases pass now; remove them from the expected-failures "
                             "list: " + ", ".join(now_passing))


def _light_models():
    """The architectures of onnx's test data (`light_*.onnx`: weights made by ConstantOfShape)."""
    import onnx.backend.test.case.model as cases

    return [c for c in cases.collect_testcases() if c.kind == "real"]


@pytest.mark.parametrize("case", _light_models(), ids=lambda c: c.name)
def test_light_architectures_match_their_stored_outputs(case) -> None:
    """ResNet-50, DenseNet-121, Inception v1/v2, ShuffleNet, SqueezeNet, VGG-19, AlexNet,
    ZFNet-512 on ONNX's runner inputs, against the outputs stored beside each model."""
    import os

    from onnx import numpy_helper
    from onnx.backend.test.runner import Runner

    path = os.path.normpath(os.path.join(os.path.dirname(onnx.__file__), "..", case.url))
    model = onnx.load(path)
    inits = {t.name for t in model.graph.initializer}
    feeds = [Runner.generate_dummy_data(x, seed=0, name=case.model_name, random=False)
             for x in model.graph.input if x.name not in inits]
    got = onnx_backend.prepare(model).run(feeds)
    want = [numpy_helper.to_array(onnx.load_tensor(f"{os.path.splitext(path)[0]}_output_{i}.pb"))
            for i in range(len(model.graph.output))]
    Runner.assert_similar_outputs(want, list(got), case.rtol, case.atol)


def _add_model():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"]),
                           helper.make_node("Neg", ["y"], ["z"])], "g", [x, w], [y, z])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_prepare_and_run_positional_and_named() -> None:
    rep = onnx_backend.prepare(_add_model(), "CPU")
    a, b = np.array([1, 2], np.float32), np.array([10, 20], np.float32)
    y, z = rep.run([a, b])
    np.testing.assert_array_equal(y, [11, 22])
    np.testing.assert_array_equal(z, [-11, -22])
    out = rep.run({"x": a, "w": b})
    np.testing.assert_array_equal(out.z, [-11, -22])
    np.testing.assert_array_equal(onnx_backend.run_model(_add_model(), [a, b])[0], [11, 22])
    # (as onnxruntime: other types than the model declares are refused, not computed in
    # them, and a name that is no input is said)
    with pytest.raises(TypeError, match="input 'x' is int64, but the model declares float32"):
        rep.run([np.array([1, 2]), b])
    with pytest.raises(ValueError, match="no model input named 'v'"):
        rep.run({"x": a, "v": b})


def test_prepare_takes_a_path(tmp_path) -> None:
    onnx.save(_add_model(), tmp_path / "m.onnx")
    rep = onnx_backend.prepare(tmp_path / "m.onnx")  # (a pathlib.Path: an AttributeError)
    np.testing.assert_array_equal(rep.run([np.ones(2, np.float32)] * 2)[0], [2, 2])


def test_run_node_and_devices() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    (y,) = onnx_backend.run_node(node, [np.array([-1.0, 2.0], np.float32)])
    np.testing.assert_array_equal(y, [0, 2])
    # inputs given by name are bound by name (they were bound in the dict's order)
    sub = helper.make_node("Sub", ["a", "b"], ["c"])
    a, b = np.array([10.0, 20.0], np.float32), np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(onnx_backend.run_node(sub, {"b": b, "a": a})[0], [9, 18])
    with pytest.raises(ValueError, match="no input named 'x'"):
        onnx_backend.run_node(sub, {"x": a, "b": b})
    assert onnx_backend.supports_device("CPU")
    assert not onnx_backend.supports_device("TPU")


def test_an_output_that_views_an_input_is_a_copy() -> None:
    """Identity's and Reshape's outputs were the caller's input array (or a view of it):
    writing into an output changed the input; onnxruntime returns them as copies."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
            for n, s in (("a", [2, 3]), ("r", [3, 2]))]
    shape = onnx.numpy_helper.from_array(np.array([3, 2], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["a"]),
                           helper.make_node("Reshape", ["x", "shape"], ["r"])], "g", [x], outs,
                          [shape])
    rep = onnx_backend.prepare(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    a, r = rep.run([value])
    a[:] = -1
    r[:] = -2
    np.testing.assert_array_equal(value, np.arange(6).reshape(2, 3))


def test_prepare_rejects_an_invalid_model() -> None:
    m = _add_model()
    m.graph.node[0].input[0] = "nowhere"
    with pytest.raises(onnx.checker.ValidationError):
        onnx_backend.prepare(m)


@pytest.mark.parametrize("src,x", [
    (TensorProto.FLOAT, np.array([0.5, 1.0, -2.25, 0.1], np.float32)),
    (TensorProto.DOUBLE, np.array([1e-7, 3.0, -0.3, 2.5e300])),
    (TensorProto.INT64, np.array([3, -7, 12, 0]))])
def test_cast_to_string_writes_each_numbers_text(src, x) -> None:
    """Cast to STRING returned the numbers themselves (an object array of floats); the text
    onnx's reference evaluator writes (the node suite has no such case)."""
    from onnx.reference import ReferenceEvaluator

    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)], "g",
                          [helper.make_tensor_value_info("x", src, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.STRING, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    got = onnx_backend.prepare(m).run([x])[0]
    want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    assert [type(v) for v in got.ravel()] == [str] * 4
    assert list(got.ravel()) == [str(v) for v in want.ravel()]
