"""`precision: bf16 | fp16` on a Linear that the exporters write as MatMul + Add of its bias
(nn.Linear on a 3-D input, both torch.onnx exporters): torch.autocast runs such a Linear as one
16-bit addmm, which reads the bias's 16-bit value and reduces the bias gradient to a 16-bit
value (float32 accumulation, rounded once: it overflows float16 where a float32 sum does not,
and GradScaler skips the step)."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest

from trainer.autocast import autocast
from trainer.config import config_from_dict
from trainer.executor import Executor
from trainer.train import Trainer

torch = pytest.importorskip("torch")
F = torch.nn.functional

T, D, H, CLASSES, BATCH, LR = 6, 4, 16, 10, 16, 0.1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Tokens(torch.nn.Module):
    """Two Linears on [N, T, D] tokens (MatMul + Add when exported), ReLUs (exact on 16-bit
    values, so autocast's 16-bit activations are ours) and a 2-D head (a Gemm)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(D, H)
        self.ff = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(T * H, CLASSES)

    def forward(self, x):
        h = F.relu(self.ff(F.relu(self.emb(x))))
        return self.head(h.flatten(1))


def _model(seed: int = 3) -> Tokens:
    torch.manual_seed(seed)
    m = Tokens()
    with torch.no_grad():  # (larger backward signals: the token biases' gradients overflow
        m.head.weight.mul_(8.0)  # float16 before any other gradient does)
        m.ff.weight.mul_(3.0)
    return m


def _export(model: torch.nn.Module, exporter: str, shape: tuple) -> onnx.ModelProto:
    x = torch.randn((2,) + shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(model.eval(), (x,), None, input_names=["x"],
                                     output_names=["logits"], optimize=False, verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("N")},)).model_proto
        f = io.BytesIO()
        torch.onnx.export(model.eval(), (x,), f, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}})
        return onnx.load_from_string(f.getvalue())


def _data():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4 * BATCH, T, D)) * 0.05).astype(np.float32)
    return x, rng.integers(0, CLASSES, len(x)).astype(np.int64)


def _torch_run(model, dtype, steps, scaler=None):
    """Losses, GradScaler's scale after each step and, per step, the parameters whose scaled
    gradients were not finite."""
    x, y = _data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sc = torch.amp.GradScaler("cpu", **scaler) if scaler is not None else None
    losses, scales, bad = [], [], []
    for k in range(steps):
        lo = k % (len(x) // BATCH) * BATCH
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            logits = model.train()(xt[lo:lo + BATCH])
        loss = F.cross_entropy(logits.float(), yt[lo:lo + BATCH])
        losses.append(loss.item())
        (sc.scale(loss) if sc else loss).backward()
        bad.append(sorted(n for n, p in model.named_parameters()
                          if not torch.isfinite(p.grad).all()))
        if sc:
            sc.step(opt)
            sc.update()
            scales.append(sc.get_scale())
        else:
            opt.step()
    return np.array(losses), scales, bad


def _ours(tmp_path, proto, precision, steps, **extra):
    x, y = _data()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    raw = {"model": str(tmp_path / "model.onnx"), "output": str(tmp_path / "out.onnx"),
           "device": "cpu", "precision": precision,
           "data": {"train": {"path": str(tmp_path / "data.npz"), "inputs": {"x": "x"},
                              "targets": {"label": "y"}}, "batch_size": BATCH,
                    "shuffle": False},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
           "optimizer": {"type": "sgd", "lr": LR}, "steps": steps, "log": {"every_steps": 1},
           **extra}
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    rows = [r for r in t.history if "loss" in r]
    return np.array([r["loss"] for r in rows]), [r.get("loss_scale") for r in rows], t


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fp16_token_linears_overflow_and_skip_as_grad_scaler(tmp_path, exporter):
    """The token Linears' bias gradients (sums over N x T = 96 rows) overflow float16 at steps
    1, 2 and 11 of torch.autocast + GradScaler, no other gradient does: we skip the same steps
    with the same scales. Summed in float32, they never overflowed here, and no step was
    skipped."""
    model = _model()
    proto = _export(copy.deepcopy(model), exporter, (T, D))
    scaler = {"init_scale": 65536.0, "growth_interval": 2}
    want, want_scales, bad = _torch_run(model, torch.float16, 12, scaler)
    assert [k + 1 for k, b in enumerate(bad) if b] == [1, 2, 11]
    assert {n for b in bad for n in b} == {"emb.bias", "ff.bias"}  # (the case is as meant)
    got, scales, t = _ours(tmp_path, proto, "fp16", 12,
                           loss_scale={"init": 65536.0, "growth_interval": 2})
    assert scales == want_scales
    assert t.scaler_skipped == 3
    # (measured 4.8e-3 of losses near 2.5: the product plus the bias is not rounded again, as
    # autocast's addmm rounds it, a last-bit difference that this model's large weights and
    # biases carry to the loss; summed in float32, no step was skipped)
    assert np.abs(got - want).max() <= 1e-2, (got.tolist(), want.tolist())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_linears_bias_gradient_is_rounded_to_16_bits_as_autocasts(tmp_path, exporter,
                                                                     precision):
    """One step from the same weights and batch: the token Linears' bias gradients are
    16-bit values (float32 sums rounded once), as autocast's, near its values; they were the
    float32 sums."""
    model = _model()
    proto = _export(copy.deepcopy(model), exporter, (T, D))
    x, y = _data()
    with torch.autocast("cpu", dtype=DTYPES[precision]):
        logits = model.train()(torch.from_numpy(x[:BATCH]))
    F.cross_entropy(logits.float(), torch.from_numpy(y[:BATCH])).backward()
    _, _, t = _ours(tmp_path, proto, precision, 1, **(
        {"loss_scale": {"init": 1.0, "dynamic": False}} if precision == "fp16" else {}))
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    low = DTYPES[precision]
    for name in ("emb.bias", "ff.bias"):
        got = np.asarray(t.grads[name])
        assert np.array_equal(torch.from_numpy(got).to(low).float().numpy(), got), name
        np.testing.assert_allclose(got, grads[name], rtol=0.05,
                                   atol=0.05 * np.abs(grads[name]).max(), err_msg=name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_linear_adds_its_biass_16_bit_value_to_the_16_bit_product(exporter, precision):
    """Forward values of the rewritten graph: the 16-bit product plus the bias's 16-bit value
    (in float32, exactly), within the product's rounding and the sum's of autocast's F.linear,
    which rounds the float32 product plus that value once."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    with torch.no_grad():
        lin.bias.mul_(30.0)
    proto = _export(copy.deepcopy(lin), exporter, (5, 32))
    m, count, total = autocast(proto, precision)
    assert (count, total) == (1, 1)
    x = torch.randn(3, 5, 32)
    low = DTYPES[precision]
    with torch.autocast("cpu", dtype=low), torch.no_grad():
        want = lin(x).float().numpy()
    got = Executor(m, np).run({"x": x.numpy()})["logits"]
    with torch.no_grad():
        product = (x.to(low).float() @ lin.weight.to(low).float().T).to(low).float()
        ours = (product + lin.bias.to(low).float()).numpy()
    np.testing.assert_array_equal(got, ours)
    # (half a 16-bit step of the product, ours, and of the sum, autocast's rounding)
    half = 2.0 ** -(8 if low == torch.bfloat16 else 11)
    assert np.all(np.abs(got - want) <= (np.abs(product.numpy()) + np.abs(want)) * half)
    onnx.checker.check_model(m, full_check=True)


def test_only_a_linears_bias_add_is_rounded():
    """`x @ w + c` written out in torch is a float16 product plus a float32 c under autocast
    (the Add promotes): the dynamo exporter's records tell it from nn.Linear (one aten.linear
    for both nodes), and it stays a float32 Add. So do an Add of two products and a product
    that is read twice."""
    from onnx import TensorProto, helper, numpy_helper

    class Manual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 3))
            self.c = torch.nn.Parameter(torch.randn(3) * 30)

        def forward(self, x):
            return x @ self.w + self.c

    torch.manual_seed(1)
    model = Manual()
    m, count, _ = autocast(_export(copy.deepcopy(model), "dynamo", (5, 8)), "fp16")
    assert count == 1 and not any(n.op_type == "Cast" and n.input[0] == "c"
                                  for n in m.graph.node)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        want = model(x)
    assert want.dtype == torch.float32
    np.testing.assert_array_equal(Executor(m, np).run({"x": x.numpy()})["logits"],
                                  want.detach().numpy())

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (4, 3)), ("b", (3,)), ("v", (4, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
             helper.make_node("MatMul", ["x", "v"], ["q"]),
             helper.make_node("Add", ["p", "q"], ["s"]),  # (no initializer)
             helper.make_node("Add", ["q", "b"], ["t"]),  # (q is read twice)
             helper.make_node("Add", ["s", "t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     ["N", 5, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    out, count, _ = autocast(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                             "fp16")
    assert count == 2 and not any(n.op_type == "Cast" and n.input[0] == "b"
                                  for n in out.graph.node)
