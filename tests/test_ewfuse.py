"""Fused elementwise kernels of device plans (trainer/kernels/ewfuse.py). Their generated C++ body
is compiled here by the C compiler (the same expressions in C, `T` a typedef) and run as the
stand-in's cupy.ElementwiseKernel, so every fused group of the model families' training graphs
runs its generated code on the CPU against the unfused host plan."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import helper

from tests import strictxp as sx
from tests.ckernels import CC, CElementwiseKernel, needs_cc
from tests.families import FAMILIES, family_training_graph
from tests.opcases import make_model
from tests.test_plan_fuzz import SHAPE, _constants, graphs
from trainer.executor import Executor
from trainer.kernels import poolfuse
from trainer.kernels.ewfuse import C_EXPR, FusedElementwise, kernel_source

F32 = np.float32


@pytest.fixture
def gpu(monkeypatch):
    xp = sx.install(monkeypatch)
    return xp


@pytest.fixture
def gpu_kernels(monkeypatch):
    """The stand-in with cupy.ElementwiseKernel run as compiled C."""
    if CC is None:
        pytest.skip("no C compiler to build the generated kernels")
    xp = sx.install(monkeypatch)
    monkeypatch.setattr(sx, "ElementwiseKernel", CElementwiseKernel, raising=False)
    return xp


def _gelu_model(n=6, d=5):
    x = np.random.default_rng(0).normal(size=(n, d)).astype(F32)
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["a"]),
             helper.make_node("Erf", ["a"], ["b"]),
             helper.make_node("Add", ["b", "one"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["e"]),
             helper.make_node("Mul", ["e", "half"], ["y"]),
             helper.make_node("Greater", ["y", "zero"], ["pos"]),
             helper.make_node("Where", ["pos", "y", "bias"], ["z"])]
    model = make_model(nodes, inputs={"x": x}, outputs=("z",), initializers={
        "sqrt2": np.array(np.sqrt(2), F32), "one": np.array(1, F32),
        "half": np.array(0.5, F32), "zero": np.array(0, F32),
        "bias": np.linspace(-1, 1, d).astype(F32)})
    return model, x


def test_kernel_source_of_a_chain():
    members = [(None, {}, ["x", "s"], "a"), (None, {}, ["a"], "b"), (None, {}, ["b", "x"], "c"),
               (None, {}, ["c", "x"], "p"), (None, {}, ["p", "c", "k"], "y")]
    ops = ["Div", "Erf", "Mul", "Greater", "Where"]
    ins, outs, body = kernel_source(members, ["x", "s", "k"], ["y", "p"], ops)
    assert ins == "T x0, T x1, T x2" and outs == "T y0, bool y1"
    assert body.splitlines() == ["T v0 = (x0 / x1);", "T v1 = erf(v0);", "T v2 = (v1 * x0);",
                                 "bool v3 = (v2 > x0);", "T v4 = (v3 ? v2 : x2);", "y0 = v4;",
                                 "y1 = v3;"]
    assert set(C_EXPR) >= {"Add", "Mul", "Erf", "Relu", "Sigmoid", "Where", "Greater", "Sum"}
    _, _, body = kernel_source([(None, {}, ["a", "b", "c"], "s"), (None, {}, ["s"], "y")],
                               ["a", "b", "c"], ["y"], ["Sum", "Exp"])
    assert body.splitlines() == ["T v0 = ((x0 + x1) + x2);", "T v1 = exp(v0);", "y0 = v1;"]


def test_a_chain_is_one_node_on_the_device_and_none_on_the_host(gpu):
    model, x = _gelu_model()
    ex = Executor(model, gpu)
    out = ex.run({"x": gpu.asarray(x)})
    (plan,) = ex._specialized.values()
    fused = [n for n in plan.nodes if n.op == "FusedElementwise"]
    assert [n.info["ops"] for n in fused] == [["Div", "Erf", "Add", "Mul", "Mul", "Greater",
                                               "Where"]]
    assert len(plan.steps) == 1
    host = Executor(model, np)
    want = host.run({"x": x})["z"]
    (hplan,) = host._specialized.values()
    assert not any(n.op == "FusedElementwise" for n in hplan.nodes)
    # without a kernel API (the stand-in), the fused node runs the nodes' own kernels
    np.testing.assert_array_equal(sx.asnumpy(out["z"]), Executor(model, gpu).run_unplanned(
        {"x": gpu.asarray(x)})["z"].get())
    np.testing.assert_allclose(sx.asnumpy(out["z"]), want, rtol=1e-6)


def test_kept_values_and_values_read_later_are_outputs_of_the_group(gpu):
    model, x = _gelu_model()
    ex = Executor(model, gpu, fetch=["z", "c"])  # c is fetched: the group gives it too
    out = ex.run({"x": gpu.asarray(x)})
    (plan,) = ex._specialized.values()
    (node,) = [n for n in plan.nodes if n.op == "FusedElementwise"]
    assert node.outputs == ["z", "c"] and len(node.info["ops"]) == 7
    want = Executor(model, np, fetch=["z", "c"]).run({"x": x})
    for k in ("z", "c"):
        np.testing.assert_allclose(sx.asnumpy(out[k]), want[k], rtol=1e-6)


def test_a_value_read_before_the_group_ends_splits_it(gpu):
    """A value of the chain that an outside node reads before the chain's last node cannot be
    an output of a kernel placed there; a value of another shape cannot be one at all."""
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(F32)
    nodes = [helper.make_node("Exp", ["x"], ["a"]),
             helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("MatMul", ["a", "w"], ["m"]),  # reads a between the two
             helper.make_node("Add", ["b", "m"], ["y"]),
             helper.make_node("Tanh", ["r"], ["rt"]),  # [4, 1]: read later, other shape
             helper.make_node("Mul", ["rt", "y"], ["z"]),
             helper.make_node("Add", ["rt", "one"], ["u"]),
             helper.make_node("Mul", ["z", "u"], ["out"])]
    r = np.linspace(0.5, 1, 4).astype(F32).reshape(4, 1)
    model = make_model(nodes, inputs={"x": x, "r": r}, outputs=("out",), initializers={
        "w": np.eye(3, dtype=F32), "one": np.array(1, F32)})
    ex = Executor(model, gpu)
    got = ex.run({"x": gpu.asarray(x), "r": gpu.asarray(r)})["out"]
    (plan,) = ex._specialized.values()
    groups = {tuple(n.info["replaces"]): n.outputs for n in plan.nodes
              if n.op == "FusedElementwise"}
    # Exp -> Neg gives a too (MatMul reads it after Neg, before Add); rt, [4, 1], stays the
    # output of Tanh alone, and Add_6 (read after Mul_5) joins the last group
    assert groups == {("Exp_0", "Neg_1"): ["b", "a"],
                      ("Add_3", "Mul_5", "Add_6", "Mul_7"): ["out"]}
    np.testing.assert_allclose(sx.asnumpy(got), Executor(model, np).run({"x": x, "r": r})["out"],
                               rtol=1e-6)


@needs_cc
def test_the_generated_kernel_computes_the_chain(gpu_kernels):
    model, x = _gelu_model(40, 33)
    made, calls = CElementwiseKernel.made, CElementwiseKernel.calls
    ex = Executor(model, gpu_kernels)
    for _ in range(2):
        out = ex.run({"x": gpu_kernels.asarray(x)})
    assert CElementwiseKernel.made - made == 1 and CElementwiseKernel.calls - calls == 2
    want = Executor(model, np).run({"x": x})["z"]
    np.testing.assert_allclose(sx.asnumpy(out["z"]), want, rtol=2e-6, atol=1e-7)


def _fused_calls() -> int:
    """Calls of generated elementwise kernels but the pooling kernels (kernels/poolfuse.py)."""
    pools = {poolfuse.kernel_name(kind, nd) for kind in poolfuse.KINDS for nd in range(1, 9)}
    return CElementwiseKernel.calls - sum(n for name, n in CElementwiseKernel.by_name.items()
                                          if name in pools)


@needs_cc
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "dropout_mlp"])
def test_every_familys_fused_kernels_run_their_generated_code(gpu_kernels, zoo, name):
    """Each family's training graph planned on the device with its fused groups run as the
    generated code: loss, gradients and BatchNorm statistics are the host plan's (float32
    rounding: C's math functions round differently from NumPy's)."""
    tm, feeds = family_training_graph(zoo[name])
    ex = Executor(tm, gpu_kernels)
    calls = _fused_calls()
    out = ex.run({k: gpu_kernels.asarray(v) for k, v in feeds.items()})
    (plan,) = ex._specialized.values()
    groups = [n for n in plan.nodes if n.op == "FusedElementwise"]
    assert groups and _fused_calls() - calls == len(groups)
    assert all(n.info["kernel"].error is None for n in groups)
    want = Executor(tm, np).run(dict(feeds))
    for k, v in want.items():
        v = np.asarray(v, np.float64)
        scale = max(float(np.abs(v).max(initial=0)), 1e-6)
        assert np.abs(sx.asnumpy(out[k]).astype(np.float64) - v).max(initial=0) <= \
            2e-5 * scale, k


def test_a_kernel_that_fails_to_build_falls_back_with_a_warning(gpu, monkeypatch):
    class Broken:
        def __init__(self, *args):
            raise RuntimeError("nvrtc: error (a test)")
    monkeypatch.setattr(sx, "ElementwiseKernel", Broken, raising=False)
    model, x = _gelu_model()
    ex = Executor(model, gpu)
    with pytest.warns(RuntimeWarning, match="nvrtc: error"):
        out = ex.run({"x": gpu.asarray(x)})
    np.testing.assert_allclose(sx.asnumpy(out["z"]), Executor(model, np).run({"x": x})["z"],
                               rtol=1e-6)
    (plan,) = ex._specialized.values()
    kernel = next(n.info["kernel"] for n in plan.nodes if n.op == "FusedElementwise")
    assert isinstance(kernel, FusedElementwise) and "nvrtc" in kernel.error


@needs_cc
@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_with_fused_kernels_match_numpy(case):
    """tests/test_plan_fuzz.py's random graphs (values read several times, kept outputs in the
    middle, views) planned on the device, their fused groups run as the generated code: every
    planned run gives what NumPy computes op by op, for the first feeds and for new ones."""
    from onnx import TensorProto, numpy_helper

    nodes, program, outputs = case
    consts = _constants(np.random.default_rng(0))
    g = helper.make_graph(
        nodes, "fuzz",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(SHAPE)) for n in ("x", "y")],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(SHAPE)) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    with pytest.MonkeyPatch.context() as mp:
        xp = sx.install(mp)
        mp.setattr(sx, "ElementwiseKernel", CElementwiseKernel, raising=False)
        ex = Executor(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), xp)
        for feeds_seed in (1, 1, 2):
            r = np.random.default_rng(feeds_seed)
            feeds = {n: r.standard_normal(SHAPE).astype(F32) for n in ("x", "y")}
            env = {**feeds, "W": consts["W"]}
            for out, fn, args in program:
                env[out] = np.asarray(fn(*[env[a] for a in args]), F32)
            got = ex.run({k: xp.asarray(v) for k, v in feeds.items()})
            scale = max(1.0, max(float(np.abs(v[np.isfinite(v)]).max(initial=0))
                                 for v in env.values()))
            for o in outputs:
                np.testing.assert_allclose(sx.asnumpy(got[o]), env[o], rtol=1e-5,
                                           atol=1e-5 * scale, err_msg=o)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.test_gpu_standin import export_models
    return export_models(tmp_path_factory.mktemp("models"))


@needs_cc
@pytest.mark.parametrize("kind", ["cnn", "gpt"])
def test_fused_kernels_inside_a_cuda_graph(gpu_kernels, tmp_path, exported, kind):
    """gpu.cuda_graph with the generated kernels: their launches are captured with the rest of
    the step, and the run is bit for bit the uncaptured one."""
    from tests.test_gpu_standin import _graph_run

    cfg = exported(kind, {"type": "sgd", "lr": 0.05, "momentum": 0.9})
    plain, plain_losses, _ = _graph_run(cfg, tmp_path, False)
    calls = _fused_calls()
    run, losses, log = _graph_run(cfg, tmp_path, True)
    ex = next(iter(run.plans.values())).executor
    (g,) = ex._graphs.values()
    assert "captured" in log and g.graph.launches == 4 and not ex.graph_errors
    (plan,) = ex._specialized.values()
    groups = sum(n.op == "FusedElementwise" for n in plan.nodes)
    # the uncaptured first step and the capture call them, the launches replay them; and
    # the optimizer's update is one kernel per step (outside the graph)
    assert groups and _fused_calls() - calls == 2 * groups + 4 * groups + 5
    assert run.optimizer.kernel_error is None
    assert losses == plain_losses
    for k, v in plain.trained_values().items():
        np.testing.assert_array_equal(run.trained_values()[k], v, err_msg=k)


# -- fused optimizer updates -------------------------------------------------------------------
OPTIMIZERS = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.01}),
    ("adam", {"lr": 1e-2, "maximize": True}),
    ("adamw", {"lr": 1e-2}),
    ("adamw", {"lr": 1e-2, "groups": [(["b"], {"lr": 1e-3, "weight_decay": 0.0})]}),
]


@needs_cc
@pytest.mark.parametrize("kind,settings", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_optimizer_updates_are_the_separate_operations(monkeypatch, kind, settings,
                                                             dtype):
    """SGD (momentum, dampening, Nesterov, weight decay, maximize), Adam and AdamW (coupled and
    decoupled weight decay, per-group settings as per-element vectors) as one generated kernel
    each step: the parameters and state, bit for bit, of the separate xp operations."""
    from trainer.optim import OPTIMIZERS as CLASSES

    xp = sx.install(monkeypatch)
    layout = [("w", 0, 40), ("b", 40, 7)]
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(47).astype(dtype)
    grads = [rng.standard_normal(47).astype(dtype) for _ in range(4)]

    def run(kernels: bool):
        if kernels:
            monkeypatch.setattr(sx, "ElementwiseKernel", CElementwiseKernel, raising=False)
        else:
            monkeypatch.delattr(sx, "ElementwiseKernel", raising=False)
        kw = dict(settings)
        groups = kw.pop("groups", ())
        opt = CLASSES[kind](xp, 47, dtype, layout=layout, groups=groups, **kw)
        p = xp.asarray(p0)
        calls = CElementwiseKernel.calls
        for k, g in enumerate(grads):
            opt.step(p, xp.asarray(g), [settings["lr"] * 0.9 ** k] * len(opt.groups))
        used = CElementwiseKernel.calls - calls
        return p.get(), {k: v.get() for k, v in opt.state.items()}, used, opt.kernel_error

    p_sep, s_sep, used_sep, _ = run(False)
    p_ker, s_ker, used_ker, error = run(True)
    assert used_sep == 0 and used_ker == len(grads) and error is None
    np.testing.assert_array_equal(p_ker, p_sep)
    for k in s_sep:
        np.testing.assert_array_equal(s_ker[k], s_sep[k], err_msg=k)


def test_a_generated_kernel_does_not_outlive_the_api_that_built_it():
    """GeneratedKernel remembered its kernel by the array module alone: after a test's
    stand-in lost (or replaced) its kernel API, the kernel built with the old one still ran,
    so a later test's planned BatchNorm took stale compiled loops where it expected the xp
    code (an order-dependent failure of tests/test_gpu_standin.py after test_poolfuse.py)."""
    import types

    from trainer.kernels.generated import GeneratedKernel

    made = []

    def make(*spec):
        made.append(spec)
        return ("kernel", len(made))

    xp = types.SimpleNamespace(ElementwiseKernel=make)
    k = GeneratedKernel("ElementwiseKernel", ("a", "b"), "test kernel", "xp code instead")
    assert k.get(xp) == ("kernel", 1) and k.get(xp) == ("kernel", 1)  # (built once)
    del xp.ElementwiseKernel
    assert k.get(xp) is None
    xp.ElementwiseKernel = lambda *spec: make(*spec)  # (another API: built with it)
    assert k.get(xp) == ("kernel", 2)
