"""`trainer.autodiff.reverse` over the float cases of ONNX's backend node suite, against finite
differences.

For each case with float inputs and float outputs: the model in float64, wrt = its float inputs
(integer inputs such as axes, indices and shapes held constant), of = its float outputs, random
adjoints u_y. The vector-Jacobian products g_x must satisfy, along random directions v,
    sum_x <g_x, v_x>  ==  d/dt sum_y <u_y, y(x + t v)>  at t = 0   (central differences).

    python -m tests.reverse_suite               # summary
    python -m tests.reverse_suite --ops Gather -v
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter

import numpy as np
import onnx

from tests.onnx_conformance import Result, _normalize, _ops, collect

F64 = np.float64
UNDETERMINED = "not differentiable at the case's input"


def _float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    from trainer.graph import convert_floats

    m = convert_floats(model, np.float32, np.float64)
    m = convert_floats(m, np.float16, np.float64)
    for node in m.graph.node:  # Attention's softmax in float64 too, not float32
        for a in node.attribute:
            if a.name == "softmax_precision" and a.i in (1, 10, 16):
                a.i = onnx.TensorProto.DOUBLE
    return m


def _read_differentiably(graph: onnx.GraphProto, name: str) -> bool:
    from trainer.autodiff.registry import differentiable_inputs

    for n in graph.node:
        slots = differentiable_inputs(n.op_type, len(n.input), n.domain)
        if any(n.input[i] == name for i in slots):
            return True
        if any(name in _ops_inputs(g) for _, g in _graphs(n)):
            return True
    return False


def _graphs(node):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        for g in a.graphs:
            yield a.name, g


def _ops_inputs(graph: onnx.GraphProto) -> set[str]:
    return {i for n in graph.node for i in n.input} | {
        i for n in graph.node for _, g in _graphs(n) for i in _ops_inputs(g)}


def _hold_constant(model: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """The model with these inputs turned into initializers of the given values."""
    import copy

    from onnx import numpy_helper

    from trainer.autodiff.build import add_initializers

    m = copy.deepcopy(model)
    keep = [vi for vi in m.graph.input if vi.name not in values]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    add_initializers(m.graph, [numpy_helper.from_array(np.asarray(v), k)
                               for k, v in values.items()], m.ir_version)
    return m


class _Jump(Exception):
    """The function is discontinuous at the case's input (its output shape changes)."""


def applicable(case) -> bool:
    """Tensor inputs/outputs only, at least one float input and one float output."""
    ins, outs = case.data_sets[0]
    ins, outs = [_normalize(x) for x in ins], [_normalize(x) for x in outs]
    arrays = all(isinstance(a, np.ndarray) for a in [*ins, *outs])
    return arrays and any(a.dtype.kind == "f" for a in ins) and any(
        a.dtype.kind == "f" for a in outs)


def check(case, directions: int = 2, eps: float = 1e-6, rtol: float = 1e-4) -> Result:
    from trainer.autodiff import reverse
    from trainer.executor import Executor

    ops = tuple(sorted(_ops(case.model.graph)))
    try:
        model = _float64_model(case.model)
        ins = [_normalize(x) for x in case.data_sets[0][0]]
        values = {}
        for vi, a in zip(model.graph.input, ins, strict=False):
            values[vi.name] = a.astype(F64) if a.dtype.kind == "f" else a
        # Differentiate w.r.t. float inputs read by a differentiable slot; every other input
        # (axes, indices, shapes, sizes, scales) is held constant as an initializer.
        floats = [k for k, a in values.items() if a.dtype.kind == "f"]
        # (ops with no differentiable input at all, e.g. Floor: every float input, gradient 0)
        wrt = [k for k in floats if _read_differentiably(model.graph, k)] or floats
        model = _hold_constant(model, {k: v for k, v in values.items() if k not in wrt})
        feeds = {k: values[k] for k in wrt}
        fwd = Executor(model, np)
        base = fwd.run(feeds)
        of = [o.name for o in model.graph.output
              if isinstance(base[o.name], np.ndarray) and base[o.name].dtype.kind == "f"]
        if not of:
            return Result(case.name, ops, False, "no float output in float64")
        rng = np.random.default_rng(0)
        adj = {y: rng.standard_normal(np.shape(base[y])) for y in of}
        rm = reverse(model, wrt, of, example=feeds)
        grads = Executor(rm, np).run({**feeds, **{f"{y}_grad": adj[y] for y in of}})

        def f(t, v):
            out = fwd.run({**feeds, **{x: feeds[x] + t * v[x] for x in wrt}})
            if any(np.shape(out[y]) != np.shape(adj[y]) for y in of):
                raise _Jump("an output changes shape when the input moves")
            return sum(float(np.sum(adj[y] * out[y])) for y in of)

        for _ in range(directions):
            v = {x: rng.standard_normal(feeds[x].shape) for x in wrt}
            h = eps * max(1.0, max(float(np.abs(feeds[x]).max(initial=0)) for x in wrt))
            d1 = (f(h, v) - f(-h, v)) / (2 * h)
            d2 = (f(h / 2, v) - f(-h / 2, v)) / h
            fd = (4 * d2 - d1) / 3  # Richardson: error O(h^4) where the function is smooth
            an = sum(float(np.sum(grads[f"{x}_grad"] * v[x])) for x in wrt)
            scale = max(abs(fd), abs(an), 1e-3)
            if not np.isfinite(an) or abs(fd - an) > rtol * scale:
                # Central differences that do not settle as the step halves, or one-sided
                # differences that disagree (a kink or a tie, where central differences settle
                # on the mean of two slopes), mean the function is not differentiable at this
                # input: no reference.
                settled = np.isfinite(d1) and abs(d1 - d2) <= 1e-2 * max(abs(d1), abs(d2), 1e-3)
                f0 = f(0.0, v)
                ahead, behind = (f(h, v) - f0) / h, (f0 - f(-h, v)) / h
                smooth = abs(ahead - behind) <= 1e-2 * max(abs(ahead), abs(behind), 1e-3)
                why = "" if settled and smooth else f"{UNDETERMINED}; "
                return Result(case.name, ops, False, f"{why}directional derivative {an:.6g}, "
                              f"finite differences {fd:.6g}")
    except _Jump as exc:
        return Result(case.name, ops, False, f"{UNDETERMINED}; {exc}")
    except Exception as exc:  # noqa: BLE001 - every failure is a reported result
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Result(case.name, ops, False, f"{type(exc).__name__}: {first}")
    return Result(case.name, ops, True)


def run_all(ops: set[str] | None = None, match: str | None = None) -> list:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in collect():
            if ops and not (_ops(case.model.graph) & ops):
                continue
            if match and match not in case.name:
                continue
            if applicable(case):
                out.append(check(case))
    return out


def counts(results) -> tuple[int, int, int]:
    """(agreeing, all, cases with a finite-difference reference)."""
    passed = sum(r.ok for r in results)
    undetermined = sum(r.reason.startswith(UNDETERMINED) for r in results)
    return passed, len(results), len(results) - undetermined


def summary(results, verbose: bool = False) -> str:
    passed, total, defined = counts(results)
    lines = [f"reverse() on float node cases: {passed}/{total} agree with finite "
             f"differences ({100.0 * passed / max(total, 1):.1f}%); {passed}/{defined} "
             f"({100.0 * passed / max(defined, 1):.1f}%) of those where finite differences "
             "converge (the others sit on a kink, tie or jump)"]
    reasons = Counter(r.reason.split(":")[0] for r in results if not r.ok)
    lines += [f"  {n:4d}  {why}" for why, n in reasons.most_common()]
    if verbose:
        lines += [f"FAIL {r.name} [{','.join(r.ops)}]: {r.reason}" for r in results if not r.ok]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops")
    p.add_argument("--match")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    print(summary(run_all(set(a.ops.split(",")) if a.ops else None, a.match), a.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
