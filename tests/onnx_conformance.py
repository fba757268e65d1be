"""Every case of ONNX's backend node test suite through `trainer.onnx_backend`.

Used by tests/test_onnx_backend.py and as a developer tool:

    python -m tests.onnx_conformance                       # summary: passed/total, failures by op
    python -m tests.onnx_conformance --ops Resize,Upsample -v   # only cases using these ops
    python -m tests.onnx_conformance --write-expected      # rewrite the expected-failures list

Outputs are compared exactly as ONNX's own backend test runner does (its
`Runner.assert_similar_outputs`, with each case's rtol/atol).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

EXPECTED_FILE = Path(__file__).with_name("onnx_backend_expected_failures.txt")


@dataclass
class Result:
    name: str
    ops: tuple[str, ...]
    ok: bool
    reason: str = ""


def collect():
    """ONNX's node test cases (generated in memory by the installed onnx)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.seed(0)
        return [c for c in collect_testcases() if c.kind == "node"]


def _ops(graph: onnx.GraphProto) -> set[str]:
    out = set()
    for n in graph.node:
        out.add(n.op_type)
        for a in n.attribute:
            for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                out |= _ops(g)
    return out


def _normalize(x):
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, onnx.SequenceProto):
        return numpy_helper.to_list(x)
    if isinstance(x, onnx.OptionalProto):
        return numpy_helper.to_optional(x)
    if isinstance(x, onnx.MapProto):
        return numpy_helper.to_dict(x)
    return x


def _compare(ref, out, rtol, atol) -> None:
    """ONNX's runner comparison, plus empty optionals (None) compared as such."""
    from onnx.backend.test.runner import Runner

    if len(out) != len(ref):
        raise AssertionError(f"{len(out)} outputs, expected {len(ref)}")
    for r, o in zip(ref, out, strict=True):
        if r is None or o is None:
            if not (r is None and o is None):
                raise AssertionError(f"optional output: got {type(o).__name__}, expected "
                                     f"{type(r).__name__}")
            continue
        if isinstance(r, list | tuple):
            if not isinstance(o, list | tuple) or len(r) != len(o):
                got = f"{len(o)} items" if isinstance(o, list | tuple) else type(o).__name__
                raise AssertionError(f"expected a sequence of {len(r)} items, got {got}")
            _compare(list(r), list(o), rtol, atol)
            continue
        Runner.assert_similar_outputs([r], [o], rtol=rtol, atol=atol)


def run_case(case) -> Result:
    from trainer import onnx_backend
    from trainer.executor import missing_kernels

    model = case.model
    ops = tuple(sorted(_ops(model.graph)))
    try:
        missing = missing_kernels(model)
        if missing:
            names = sorted({op for op, _ in missing})
            return Result(case.name, ops, False, f"no kernel: {', '.join(names)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = onnx_backend.prepare(model, "CPU")
            # both paths: the unspecialized program, then the specialized plan (memory plan,
            # simplification, fused kernels) where the graph gets one
            for planned in (False, True):
                for inputs, outputs in case.data_sets:
                    got = rep.run([_normalize(x) for x in inputs], planned=planned)
                    _compare([_normalize(x) for x in outputs], list(got), case.rtol, case.atol)
    except Exception as exc:  # noqa: BLE001 - every failure is a reported result
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Result(case.name, ops, False, f"{type(exc).__name__}: {first}")
    return Result(case.name, ops, True)


def run_all(cases=None, ops: set[str] | None = None, match: str | None = None) -> list[Result]:
    cases = collect() if cases is None else cases
    results = []
    for case in cases:
        if ops and not (_ops(case.model.graph) & ops):
            continue
        if match and match not in case.name:
            continue
        results.append(run_case(case))
    return results


def normalized_sets(case) -> list[tuple[list, list]]:
    """The case's (inputs, expected outputs) data sets as the engine's array types."""
    return [([_normalize(x) for x in i], [_normalize(x) for x in o]) for i, o in case.data_sets]


def device_failure(case, sets=None) -> str | None:
    """Run a case on the device path (onnx_backend.prepare(model, "CUDA")): None where it
    gives the expected outputs, else one line naming the case and the error."""
    from trainer import onnx_backend

    try:
        rep = onnx_backend.prepare(case.model, "CUDA")
        for inputs, outputs in normalized_sets(case) if sets is None else sets:
            _compare(outputs, list(rep.run(inputs)), case.rtol, case.atol)
    except Exception as exc:  # noqa: BLE001 - the caller lists every failure
        return f"{case.name}: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def read_expected(path: Path = EXPECTED_FILE) -> dict[str, str]:
    """{case name: reason} from the expected-failures list (`name  # reason` lines)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition("#")
            out[name.strip()] = reason.strip()
    return out


def write_expected(results: list[Result], path: Path = EXPECTED_FILE) -> None:
    old = read_expected(path)
    lines = ["# ONNX backend node cases that do not pass through trainer.onnx_backend, with the",
             "# reason. Regenerate with: python -m tests.onnx_conformance --write-expected",
             "# Reasons written by hand start with 'set aside:' and are kept while the case fails."]
    for r in sorted((r for r in results if not r.ok), key=lambda r: r.name):
        kept = old.get(r.name, "")
        reason = kept if kept.startswith("set aside:") else r.reason
        lines.append(f"{r.name}  # {reason}")
    path.write_text("\n".join(lines) + "\n")


def summary(results: list[Result], verbose: bool = False) -> str:
    passed = sum(r.ok for r in results)
    lines = [f"ONNX backend node cases: {passed}/{len(results)} passed "
             f"({100.0 * passed / max(len(results), 1):.1f}%)"]
    by_op: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        key = r.name.removeprefix("test_").split("_")[0]
        by_op[",".join(r.ops) if len(r.ops) <= 2 else key][r.ok] += 1
    failing = {k: c for k, c in by_op.items() if c[False]}
    if failing:
        lines.append("failing (ops: failed/total):")
        for k, c in sorted(failing.items(), key=lambda kv: -kv[1][False]):
            lines.append(f"  {k}: {c[False]}/{c[False] + c[True]}")
    if verbose:
        for r in results:
            if not r.ok:
                lines.append(f"FAIL {r.name}: {r.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", help="comma-separated op types: only cases that use them")
    p.add_argument("--match", help="only cases whose name contains this text")
    p.add_argument("-v", "--verbose", action="store_true", help="list every failure")
    p.add_argument("--trace", help="run this one case and print the full traceback")
    p.add_argument("--write-expected", action="store_true",
                   help=f"rewrite {EXPECTED_FILE.name} from this run (all cases)")
    a = p.parse_args(argv)
    if a.trace:
        from trainer import onnx_backend
        case = next(c for c in collect() if c.name == a.trace)
        try:
            rep = onnx_backend.prepare(case.model)
            for inputs, outputs in case.data_sets:
                got = rep.run([_normalize(x) for x in inputs])
                _compare([_normalize(x) for x in outputs], list(got), case.rtol, case.atol)
            print("passed")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        return 0
    ops = set(a.ops.split(",")) if a.ops else None
    results = run_all(ops=ops, match=a.match)
    print(summary(results, a.verbose))
    if a.write_expected:
        if ops or a.match:
            print("--write-expected needs the full run (no --ops/--match)", file=sys.stderr)
            return 2
        write_expected(results)
        print(f"wrote {EXPECTED_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
