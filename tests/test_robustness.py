"""Checkpoints and exports survive SIGKILL (at every file-system step, at byte offsets inside
writes, at random delays) and full disks; loading limits for models and datasets."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trainer.export as export_mod
from tests.conftest import EXAMPLES
from trainer import checkpoint
from trainer.data import load_arrays
from trainer.errors import DataError, ModelError, TrainerError
from trainer.export import export_model
from trainer.graph import load_model

pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="fork, SIGKILL and RLIMIT_FSIZE as on Linux")

DIGITS = onnx.load(EXAMPLES / "digits_mlp.onnx")


# -- kill injection ---------------------------------------------------------------------------
class _Killer:
    """Counts file-system events and written bytes in a child; SIGKILLs itself at a chosen one.

    Event k is killed *before* it happens; byte b is killed after the first b bytes (of all
    writes together) reached the file, so the file is torn exactly there.
    """

    def __init__(self, at_event: int | None = None, at_byte: int | None = None):
        self.at_event, self.at_byte = at_event, at_byte
        self.events = 0
        self.bytes = 0

    def event(self) -> None:
        self.events += 1
        if self.events == self.at_event:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(self, f, data) -> int:
        if not isinstance(data, str):  # text files count characters
            data = bytes(data)
        if self.at_byte is not None and self.bytes + len(data) >= self.at_byte:
            f.write(data[:self.at_byte - self.bytes])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.bytes += len(data)
        return f.write(data)


class _KillFile:
    def __init__(self, f, killer: _Killer):
        self._f, self._k = f, killer

    def write(self, data) -> int:
        return self._k.write(self._f, data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _install_killer(killer: _Killer) -> None:
    """Route the child's writes and file-system calls through `killer` (child only)."""
    real_open = builtins.open

    def kill_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax+"):
            killer.event()
            return _KillFile(f, killer)
        return f

    def hooked(fn):
        def call(*a, **k):
            killer.event()
            return fn(*a, **k)
        return call

    builtins.open = kill_open
    for mod, name in [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "unlink"),
                      (os, "rmdir"), (os, "mkdir"), (shutil, "rmtree"), (tempfile, "mkdtemp")]:
        setattr(mod, name, hooked(getattr(mod, name)))


def _fork(work: Callable[[], object], setup: Callable[[], None] = lambda: None
          ) -> tuple[int | None, object]:
    """Run `work` in a forked child; (signal that ended it or None, its JSON result)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            setup()
            result = work()
            os.write(w, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001 - the traceback goes to the parent
            code = 3
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status), None
    out = b"".join(chunks).decode()
    assert os.WEXITSTATUS(status) == 0, f"the child failed without being killed:\n{out}"
    return None, json.loads(out or "null")


def _kill_points(work: Callable[[], object], setup: Callable[[], None]) -> list[dict]:
    """Every event, and 12 byte offsets spread over all written bytes, of one run of `work`."""
    def count():
        killer = _Killer()
        _install_killer(killer)
        work()
        return [killer.events, killer.bytes]
    sig, (events, nbytes) = _fork(count, setup)
    assert sig is None and events > 5 and nbytes > 1000
    offsets = sorted({1, 2, 7, *(int(nbytes * f) for f in np.linspace(0.05, 0.99, 9)),
                      nbytes - 1})
    return [{"at_event": e} for e in range(1, events + 1)] + [{"at_byte": b} for b in offsets]


def _run_kill_matrix(work, reset, verify, recover) -> int:
    points = _kill_points(work, reset)
    killed = 0
    for point in points:
        reset()

        def run(point=point):
            _install_killer(_Killer(**point))
            return work()
        sig, _ = _fork(run)
        killed += sig == signal.SIGKILL
        verify(point)
        recover(point)
    return killed


# -- checkpoints ------------------------------------------------------------------------------
def _arrays(version: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(version)
    return {"param/w": rng.standard_normal((120, 200)).astype(np.float32),
            "param/b": np.full(200, version, np.float32),
            "optim/m": np.arange(5000, dtype=np.float64) * version}


def _check_checkpoint(path: Path, versions: set[int], where) -> int:
    """The checkpoint loads, and all its arrays are one whole version among `versions`."""
    arrays, meta = checkpoint.load(path)
    version = meta["version"]
    assert version in versions, where
    assert path.name.lstrip(".").startswith(f"step_{meta['step']:08d}"), where
    want = _arrays(version)
    assert set(arrays) == set(want), where
    for k, v in want.items():
        np.testing.assert_array_equal(arrays[k], v, err_msg=f"{k} at {where}")
    return version


@pytest.mark.parametrize("same_step", [False, True], ids=["next-step", "same-step"])
def test_checkpoint_survives_a_kill_at_every_point(tmp_path, same_step):
    ck = tmp_path / "ck"
    new_step = 1 if same_step else 2

    def reset():
        shutil.rmtree(ck, ignore_errors=True)
        checkpoint.save(ck, 1, _arrays(1), {"version": 1}, keep=1)

    def work():
        checkpoint.save(ck, new_step, _arrays(2), {"version": 2}, keep=1)

    def verify(point):
        newest = checkpoint.latest(ck)
        assert newest is not None, point
        version = _check_checkpoint(newest, {1, 2}, point)
        if "at_event" in point and version == 1:  # a kill before the rename leaves step 1
            assert checkpoint.complete(ck) == [newest], point

    def recover(point):
        checkpoint.save(ck, 3, _arrays(3), {"version": 3}, keep=1)
        assert sorted(p.name for p in ck.iterdir()) == ["step_00000003"], point

    killed = _run_kill_matrix(work, reset, verify, recover)
    assert killed >= 20


def test_export_survives_a_kill_at_every_point(tmp_path):
    path = tmp_path / "out" / "m.onnx"
    bias = {v: np.full(10, v, np.float32) for v in (1, 2)}

    def reset():
        shutil.rmtree(path.parent, ignore_errors=True)
        export_model(DIGITS, {"fc2.bias": bias[1]}, path)

    def work():
        export_model(DIGITS, {"fc2.bias": bias[2]}, path, {"version": "2"})

    def verify(point):
        model = load_model(path)
        values = numpy_helper.to_array(next(t for t in model.graph.initializer
                                            if t.name == "fc2.bias"))
        props = {p.key: p.value for p in model.metadata_props}
        version = int(props.get("version", "1"))
        np.testing.assert_array_equal(values, bias[version], err_msg=str(point))

    def recover(point):
        export_model(DIGITS, {"fc2.bias": bias[1]}, path)
        assert [p.name for p in path.parent.iterdir()] == ["m.onnx"], point

    assert _run_kill_matrix(work, reset, verify, recover) >= 20


def test_export_with_external_data_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "TWO_GB", 1000)  # inherited by the children
    path = tmp_path / "m.onnx"
    weights = {v: np.full((128, 64), v, np.float32) for v in (1, 2)}

    def reset():
        for p in tmp_path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        export_model(DIGITS, {"fc1.weight": weights[1]}, path)

    def work():
        export_model(DIGITS, {"fc1.weight": weights[2]}, path, {"version": "2"})

    def verify(point):
        model = load_model(path)  # reads the external data, checking its length
        props = {p.key: p.value for p in model.metadata_props}
        version = int(props.get("version", "1"))
        w = numpy_helper.to_array(next(t for t in model.graph.initializer
                                       if t.name == "fc1.weight"))
        np.testing.assert_array_equal(w, weights[version], err_msg=str(point))

    def recover(point):
        export_model(DIGITS, {"fc1.weight": weights[1]}, path)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 2 and names[0] == "m.onnx" and names[1].endswith(".data"), point

    assert _run_kill_matrix(work, reset, verify, recover) >= 20


def test_random_kills_while_checkpointing_and_exporting_in_a_loop(tmp_path):
    ck, path = tmp_path / "ck", tmp_path / "m.onnx"
    checkpoint.save(ck, 1, _arrays(1), {"version": 1}, keep=2)
    export_model(DIGITS, {"fc2.bias": np.full(10, 1, np.float32)}, path)
    rng = random.Random(1234)
    for round_ in range(25):
        start = checkpoint.latest(ck)
        first = json.loads((start / "manifest.json").read_text())["step"] + 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, b"go")
                for step in range(first, first + 1000):
                    checkpoint.save(ck, step, _arrays(step), {"version": step}, keep=2)
                    export_model(DIGITS, {"fc2.bias": np.full(10, step, np.float32)}, path,
                                 {"version": str(step)})
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 2) == b"go"
        os.close(r)
        time.sleep(rng.uniform(0.0, 0.04) if round_ % 5 else 0.3)  # every 5th: some progress
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        newest = checkpoint.latest(ck)
        step = json.loads((newest / "manifest.json").read_text())["step"]
        assert _check_checkpoint(newest, {step}, round_) == step >= first - 1
        model = load_model(path)
        version = int({p.key: p.value for p in model.metadata_props}.get("version", "1"))
        b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc2.bias"))
        assert (b == version).all() and version <= step, round_
    assert step > 1  # the children got checkpoints done
    checkpoint.save(ck, step + 1, _arrays(step + 1), {"version": step + 1}, keep=2)
    export_model(DIGITS, {}, path)
    assert sorted(p.name for p in ck.iterdir()) == [f"step_{s:08d}" for s in (step, step + 1)]
    assert [p.name for p in tmp_path.iterdir() if p.is_file() or p.name != "ck"] == ["m.onnx"]


# -- full disks -------------------------------------------------------------------------------
def _limit_file_size(limit: int) -> Callable[[], None]:
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return setup


def _error_of(fn: Callable[[], object]) -> Callable[[], dict]:
    def work():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - the parent judges the type
            return {"type": type(exc).__name__, "trainer": isinstance(exc, TrainerError),
                    "message": str(exc)}
        return {"type": None}
    return work


def test_full_disk_while_checkpointing_is_one_clear_error(tmp_path):
    ck = tmp_path / "ck"
    checkpoint.save(ck, 1, _arrays(1), {"version": 1}, keep=1)
    before = sorted(p.name for p in ck.iterdir())
    work = _error_of(lambda: checkpoint.save(ck, 2, _arrays(2), {"version": 2}, keep=1))
    sig, got = _fork(work, _limit_file_size(50_000))
    assert sig is None and got["trainer"], got
    assert "\n" not in got["message"] and "File too large" in got["message"]
    assert "step_00000002" in got["message"] and "ulimit" in got["message"]
    assert sorted(p.name for p in ck.iterdir()) == before  # no temporary folder is left
    _check_checkpoint(checkpoint.latest(ck), {1}, "after EFBIG")


@pytest.mark.parametrize("large", [False, True], ids=["inline", "external-data"])
def test_full_disk_while_exporting_is_one_clear_error(tmp_path, monkeypatch, large):
    if large:
        monkeypatch.setattr(export_mod, "TWO_GB", 1000)
    path = tmp_path / "m.onnx"
    export_model(DIGITS, {"fc2.bias": np.ones(10, np.float32)}, path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    work = _error_of(lambda: export_model(DIGITS, {"fc2.bias": np.zeros(10, np.float32)}, path))
    sig, got = _fork(work, _limit_file_size(20_000))
    assert sig is None and got["trainer"], got
    assert "\n" not in got["message"] and "cannot write model" in got["message"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_no_space_left_is_a_write_error(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, _arrays(1), {"version": 1}, keep=2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint.np.lib.format, "write_array", full)
    with pytest.raises(checkpoint.WriteError, match="No space left.*free disk space"):
        checkpoint.save(tmp_path, 2, _arrays(2), {"version": 2}, keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_a_metrics_file_that_cannot_be_appended_to_does_not_end_training(tmp_path,
                                                                          digits_config):
    """The metrics file cannot be appended to any more (a full disk; here it turned into a
    folder after two rows): one warning, and the run goes on to its model (it was an internal
    error that lost the run)."""
    from trainer.config import config_from_dict
    from trainer.metrics import MetricsLogger
    from trainer.train import Trainer

    metrics, real, rows = tmp_path / "m.jsonl", MetricsLogger.record, []

    def record(self, row):
        rows.append(row)
        if len(rows) == 3:
            metrics.unlink()
            metrics.mkdir()
        return real(self, row)

    stream = io.StringIO()
    cfg = digits_config(steps=6, log={"every_steps": 1, "metrics": str(metrics)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MetricsLogger, "record", record)
        result = Trainer(config_from_dict(cfg, tmp_path), stream=stream).fit()
    assert f"cannot append to log.metrics {metrics}" in stream.getvalue()
    assert Path(result["output"]).exists() and len(rows) >= 6


def test_tensorboard_events_and_a_trace_that_cannot_be_written_do_not_end_training(
        tmp_path, digits_config):
    """log.tensorboard and --profile-trace on a full disk: tensorboardX's writer thread met it
    as a traceback that ended the run (blamed on "the terminal output"), and the trace left its
    part-written .tmp. Each is a by-product: one warning, and the run goes on to its model."""
    from trainer.config import config_from_dict
    from trainer.metrics import _EventFile
    from trainer.train import ProfileRequest, Trainer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    trace = tmp_path / "t.json"
    real_write = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "t.json.tmp":
            real_write(self, "{\"part")  # (some bytes got out first)
            full()
        return real_write(self, *a, **k)

    stream = io.StringIO()
    cfg = digits_config(steps=6, log={"every_steps": 1, "tensorboard": str(tmp_path / "tb")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_EventFile, "flush", full)
        mp.setattr(Path, "write_text", write_text)
        result = Trainer(config_from_dict(cfg, tmp_path), stream=stream).fit(
            profile=ProfileRequest(warmup=1, steps=2, repeat=1, trace=trace))
    out = stream.getvalue()
    assert out.count(f"warning: cannot write log.tensorboard {tmp_path / 'tb'}: No space left "
                     "on device; training goes on without TensorBoard events") == 1, out
    assert f"warning: cannot write the Chrome trace {trace}: No space left on device" in out
    assert Path(result["output"]).exists() and not trace.exists()
    assert not (tmp_path / "t.json.tmp").exists()


def test_a_checkpoint_dir_lock_on_a_full_disk_still_locks(tmp_path, digits_config,
                                                         monkeypatch):
    """The lock file's note of who holds it cannot be written on a full disk: that ended the
    run before step 1 as "cannot write the terminal output"; the lock (flock) holds anyway,
    and the note is left unsaid."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    t = Trainer(config_from_dict(digits_config(steps=2, checkpoint={
        "dir": str(tmp_path / "ck")}), tmp_path), stream=io.StringIO())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    t._hold_checkpoint_dir()
    monkeypatch.undo()
    assert t._lock is not None and (tmp_path / "ck" / ".lock").exists()
    os.close(t._lock)
    t._lock = None


def test_a_best_model_that_cannot_be_written_does_not_end_training(tmp_path, digits_config):
    """model.best.onnx cannot be written at the second improvement (a full disk): the run ended
    there with the error, losing the steps since the last checkpoint (all of them without
    one). One warning; the best model so far stays, the next better evaluation writes it, and
    the run goes on to its model."""
    from trainer import export as export_mod
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    calls, real = [], export_mod.export_model

    def export(model, values, path, *a, **k):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise checkpoint.write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                         "model", Path(path))
        return real(model, values, path, *a, **k)

    stream = io.StringIO()
    cfg = digits_config(steps=12, eval={"every_steps": 2},
                        best={"metric": "eval_loss", "mode": "min"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("trainer.train.export_model", export)
        t = Trainer(config_from_dict(cfg, tmp_path), stream=stream)
        result = t.fit()
    assert "No space left on device" in stream.getvalue()
    assert "the best model so far stays as it was, training goes on" in stream.getvalue()
    assert Path(result["output"]).exists() and t.step == 12
    assert calls.count("model.best.onnx") >= 3  # (written again at a later improvement)


# -- checkpoint folder rules ------------------------------------------------------------------
def test_retention_never_deletes_the_newest_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 100, _arrays(1), {"version": 1}, keep=1)  # from an older run
    written = checkpoint.save(tmp_path, 5, _arrays(2), {"version": 2}, keep=1)
    assert written.is_dir()
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_00000005", "step_00000100"]


def test_a_parked_same_step_checkpoint_still_counts(tmp_path):
    checkpoint.save(tmp_path, 7, _arrays(1), {"version": 1}, keep=2)
    os.replace(tmp_path / "step_00000007", tmp_path / ".step_00000007.replaced")
    assert checkpoint.latest(tmp_path).name == ".step_00000007.replaced"
    _check_checkpoint(checkpoint.latest(tmp_path), {1}, "parked")
    checkpoint.save(tmp_path, 8, _arrays(2), {"version": 2}, keep=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == [".step_00000007.replaced",
                                                               "step_00000008"]


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = checkpoint.save(tmp_path, 1, _arrays(1), {"version": 1}, keep=1)
    data = (path / "arrays.npz").read_bytes()
    (path / "arrays.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainerError, match="cannot read checkpoint.*bytes, the manifest says"):
        checkpoint.load(path)
    (path / "manifest.json").write_text("[1, 2")
    with pytest.raises(TrainerError, match="cannot read checkpoint"):
        checkpoint.load(path)


# -- model loading limits ---------------------------------------------------------------------
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])


def _save(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _one_init_model(t: TensorProto) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Identity", [t.name], ["y"])], "g", [], [Y], [t])
    return helper.make_model(g)


def test_a_tensor_of_a_trillion_elements_is_refused(tmp_path):
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10**6, 10**6],
                    raw_data=b"\0" * 16)
    with pytest.raises(ModelError, match=r"tensor 'w' .*\[1000000, 1000000\].*more than the"):
        load_model(_save(tmp_path, _one_init_model(t)))
    t.dims[:] = [4, -1]
    with pytest.raises(ModelError, match="negative dimension"):
        load_model(_save(tmp_path, _one_init_model(t)))


def test_a_huge_sparse_or_attribute_tensor_is_refused(tmp_path):
    values = numpy_helper.from_array(np.ones(1, np.float32), "v")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [10**13])
    node = helper.make_node("Constant", [], ["y"], sparse_value=sparse)
    model = helper.make_model(helper.make_graph([node], "g", [], [Y]))
    with pytest.raises(ModelError, match="more than the limit"):
        load_model(_save(tmp_path, model))


def test_a_million_nodes_are_refused(tmp_path):
    node = helper.make_node("Identity", ["y0"], ["y"]).SerializeToString()
    graph = onnx.GraphProto()
    graph.ParseFromString((b"\x0a" + bytes([len(node)]) + node) * 10**6)  # field 1: node
    model = helper.make_model(graph)
    with pytest.raises(ModelError, match="more than 500000 nodes"):
        load_model(_save(tmp_path, model))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, built by hand: upb cannot even build deep messages."""
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _nested_bytes(depth: int) -> bytes:
    """A model whose graph nests If then-branches `depth` levels deep (unique names)."""
    def const(name: str, dtype=TensorProto.FLOAT, value=1.0) -> bytes:
        node = helper.make_node("Constant", [], [name],
                                value=helper.make_tensor(name + "v", dtype, [], [value]))
        return _field(1, node.SerializeToString())  # GraphProto.node

    def graph(name: str, nodes: bytes, out: str) -> bytes:
        vi = helper.make_tensor_value_info(out, TensorProto.FLOAT, [])
        return nodes + _field(2, name.encode()) + _field(12, vi.SerializeToString())

    body = graph("leaf", const("y0"), "y0")
    for i in range(1, depth + 1):
        branches = b""
        for attr, g in (("then_branch", body),
                        ("else_branch", graph(f"else{i}", const(f"e{i}"), f"e{i}"))):
            head = onnx.AttributeProto(name=attr, type=onnx.AttributeProto.GRAPH)
            branches += _field(5, head.SerializeToString() + _field(6, g))  # node.attribute
        node = helper.make_node("If", [f"c{i}"], [f"y{i}"], name=f"if{i}").SerializeToString()
        body = graph(f"b{i}", const(f"c{i}", TensorProto.BOOL, True)
                     + _field(1, node + branches), f"y{i}")
    head = helper.make_model(onnx.GraphProto()).SerializeToString()
    return head + _field(7, body)  # ModelProto.graph (merged into the empty one)


def test_deeply_nested_subgraphs_are_refused(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_nested_bytes(3))
    assert load_model(path).graph.node[1].op_type == "If"
    path.write_bytes(_nested_bytes(25))
    with pytest.raises(ModelError, match=r"nested more than 24 levels deep \(at graph > If"):
        load_model(path)
    path.write_bytes(_nested_bytes(40))
    with pytest.raises(ModelError, match="nested too deeply"):  # protobuf's own limit
        load_model(path)


def test_a_model_file_over_two_gigabytes_is_refused_unread(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31 + 1)  # sparse: no disk space used
    with pytest.raises(ModelError, match="over protobuf's 2 GB limit"):
        load_model(path)


def _external(tmp_path: Path, location: str, **entries) -> Path:
    """digits model with fc1.weight moved to external data `location` (not written here)."""
    model = onnx.ModelProto()
    model.CopyFrom(DIGITS)
    t = next(t for t in model.graph.initializer if t.name == "fc1.weight")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    for k, v in entries.items():
        t.external_data.add(key=k, value=str(v))
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    return _save(folder, model)


def _fc1_bytes() -> bytes:
    return next(t for t in DIGITS.graph.initializer if t.name == "fc1.weight").raw_data


def test_external_data_is_read_exactly(tmp_path):
    data = _fc1_bytes()
    path = _external(tmp_path, "w.bin", offset=64, length=len(data))
    (path.parent / "w.bin").write_bytes(b"x" * 64 + data + b"trailing")
    loaded = load_model(path)
    w = next(t for t in loaded.graph.initializer if t.name == "fc1.weight")
    assert w.raw_data == data and w.data_location == TensorProto.DEFAULT
    inside = path.parent / "sub"
    inside.mkdir()
    (inside / "real.bin").write_bytes(data)
    assert load_model(_external(tmp_path, "sub/real.bin")).graph.initializer
    (path.parent / "link.bin").symlink_to(inside / "real.bin")  # as onnx's checker: no links
    with pytest.raises(ModelError, match="'link.bin' of tensor 'fc1.weight' .* symbolic link"):
        load_model(_external(tmp_path, "link.bin"))
    linked = tmp_path / "linked"  # the model file itself may be a link (e.g. a hub cache)
    linked.mkdir()
    (linked / "m.onnx").symlink_to(_external(tmp_path, "sub/real.bin"))
    (linked / "sub").symlink_to(inside, target_is_directory=True)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(linked / "m.onnx")  # its data resolves outside the link's folder


@pytest.mark.parametrize("location, match", [
    ("missing.bin", "is missing"),
    ("/etc/hostname", "outside the model's folder"),
    ("../secret.bin", "outside the model's folder"),
    ("sub/../../secret.bin", "outside the model's folder"),
    ("escape.bin", "outside the model's folder"),  # a symlink to ../secret.bin
    ("", "names no file"),
])
def test_external_data_locations_are_contained(tmp_path, location, match):
    (tmp_path / "secret.bin").write_bytes(_fc1_bytes())
    path = _external(tmp_path, location)
    (path.parent / "escape.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ModelError, match=match):
        load_model(path)


def test_a_relative_model_paths_folder_is_named_in_the_checkers_message(tmp_path,
                                                                       monkeypatch):
    """A location that leaves the folder and comes back ('../models/w.bin') passes the
    engine's containment check and onnx.checker refuses it: given a relative path, the
    message said the data should be "inside ''"."""
    data = _fc1_bytes()
    path = _external(tmp_path, "../models/w.bin", length=len(data))
    (path.parent / "w.bin").write_bytes(data)
    monkeypatch.chdir(path.parent)
    with pytest.raises(ModelError, match=f"should be file inside '{path.parent}/?'"):
        load_model(path.name)


@pytest.mark.parametrize("entries, data, match", [
    ({"length": 12}, None, "has length 12 bytes, but its shape"),
    ({}, b"\0" * 100, r"too short for tensor 'fc1.weight'"),
    ({"offset": 10**15}, None, "too short"),
    ({"offset": "ten"}, None, "non-integer"),
])
def test_external_data_of_the_wrong_length_is_refused(tmp_path, entries, data, match):
    path = _external(tmp_path, "w.bin", **entries)
    (path.parent / "w.bin").write_bytes(_fc1_bytes() if data is None else data)
    with pytest.raises(ModelError, match=match):
        load_model(path)


def test_external_data_in_a_function_is_contained(tmp_path):
    t = helper.make_tensor("k", TensorProto.FLOAT, [1], [1.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")
    fn = helper.make_function("local", "F", [], ["y"],
                              [helper.make_node("Constant", [], ["y"], value=t)],
                              [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("F", [], ["y"], domain="local")], "g", [], [Y])
    model = helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("local", 1)])
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4)
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="function 'F'.*outside the model's folder"):
        load_model(_save(tmp_path / "m", model))
    fn.ClearField("node")  # the same tensor as the default value of a function attribute
    fn.node.append(helper.make_node("Constant", [], ["y"], value_float=1.0))
    fn.attribute_proto.append(helper.make_attribute("k", t))
    model.ClearField("functions")
    model.functions.append(fn)
    with pytest.raises(ModelError, match="tensor 'k' in function 'F'.*outside the model"):
        load_model(_save(tmp_path / "m", model))


# -- dataset loading --------------------------------------------------------------------------
@pytest.mark.parametrize("bad, where", [(np.nan, "sample 3, position [1, 2]"),
                                        (np.inf, "sample 3, position [1, 2]")])
def test_non_finite_values_are_named_with_their_index(tmp_path, bad, where):
    x = np.zeros((5, 2, 3), np.float32)
    x[3, 1, 2] = bad
    x[4, 0, 0] = bad
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=rf"array 'x' \(for 'input'\) holds -?{bad} at "
                       + where.replace("[", r"\[").replace("]", r"\]")):
        load_arrays(tmp_path / "d.npz", {"input": "x", "label": "y"}, "data.train")


@pytest.mark.parametrize("array, match", [
    (np.zeros((0, 4), np.float32), "is empty"),
    (np.array([{"a": 1}], dtype=object), "Python objects.*without pickle"),
    (np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]), "structured"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetimes"),
])
def test_unusable_arrays_are_refused(tmp_path, array, match):
    np.savez(tmp_path / "d.npz", x=array)
    with pytest.raises(DataError, match=match):
        load_arrays(tmp_path / "d.npz", {"x": "x"}, "data.train")


def _npy_bytes(header_shape: tuple, data: bytes) -> bytes:
    header = {"descr": "<f8", "fortran_order": False, "shape": header_shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def test_a_header_declaring_more_than_the_file_holds_is_refused_unread(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
        zf.writestr("x.npy", _npy_bytes((10**12,), b"\0" * 80))
    with pytest.raises(DataError, match=r"declares shape \[1000000000000\].*stores 80 bytes"):
        load_arrays(tmp_path / "d.npz", {"x": "x"}, "data.train")


def test_a_zip_entry_claiming_a_huge_size_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", _npy_bytes((10,), b"\0" * 80))
    data = bytearray((tmp_path / "d.npz").read_bytes())
    central = data.rfind(b"PK\x01\x02")  # central directory entry: uncompressed size at +24
    data[central + 24:central + 28] = (10**9).to_bytes(4, "little")
    (tmp_path / "d.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="claims 1000000000 bytes, more than its archive"):
        load_arrays(tmp_path / "d.npz", {"x": "x"}, "data.train")


def test_a_npy_file_gets_a_hint(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros(3))
    with pytest.raises(DataError, match="not a zip archive .*np.savez"):
        load_arrays(tmp_path / "d.npy", {"x": "x"}, "data.train")


def test_valid_datasets_still_load(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez_compressed(tmp_path / "d.npz", x=x, y=np.arange(4), s=np.array(list("abcd")))
    got = load_arrays(tmp_path / "d.npz", {"a": "x", "b": "y", "c": "s"}, "data.train")
    np.testing.assert_array_equal(got["a"], x)
    assert got["b"].tolist() == [0, 1, 2, 3] and got["c"].tolist() == list("abcd")



def test_text_that_is_not_utf8_is_refused(tmp_path):
    w = numpy_helper.from_array(np.zeros(3, np.float32), "wXX")
    g = helper.make_graph([helper.make_node("Identity", ["wXX"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [w])
    blob = helper.make_model(g).SerializeToString().replace(b"wXX", b"w\xff\n")
    (tmp_path / "m.onnx").write_bytes(blob)
    with pytest.raises(ModelError, match=r"not valid UTF-8 \(w\\xff\\n\)"):
        load_model(tmp_path / "m.onnx")


def test_names_from_a_file_are_escaped_to_one_line(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
        zf.writestr("a\nb.npy", buf.getvalue())
    with pytest.raises(DataError, match=r"it has a\\nb$"):
        load_arrays(tmp_path / "d.npz", {"x": "x"}, "data.train")


def test_checkpoint_folders_follow_the_umask(tmp_path):
    """A checkpoint's folder gets the umask's permissions, as the exported model does (it was
    0700, from mkdtemp: the group could not read a shared folder's checkpoints; found by a
    robustness sweep)."""
    import stat

    old = os.umask(0o027)
    try:
        path = checkpoint.save(tmp_path, 3, {"a": np.zeros(2)}, {}, keep=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750


def test_an_export_leaves_another_process_export_in_progress_alone(tmp_path):
    """Two processes exporting to one output: each removed the other's temporary folder as a
    killed export's, and one failed with a disk error (found by a robustness sweep). An
    export holds a lock in its folder; the next export removes only folders whose lock nobody
    holds (a killed process's is released)."""
    import fcntl

    path = tmp_path / "m.onnx"
    other = tmp_path / ".m.onnx.other.tmp"
    other.mkdir()
    fd = os.open(other / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # (the other process, exporting)
    try:
        export_model(DIGITS, {"fc2.bias": np.ones(10, np.float32)}, path)
        assert other.is_dir() and path.is_file()
    finally:
        os.close(fd)  # (it was killed: its lock is gone)
    export_model(DIGITS, {"fc2.bias": np.ones(10, np.float32)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_trainer_stopped_by_a_signal_trains_again_on_its_next_fit(tmp_path, digits_config):
    """A fit stopped by SIGINT (a notebook's interrupt) left the Trainer's stop flags set: its
    next fit stopped after one step, "stopped by SIGINT", no signal sent (and a real Ctrl-C
    then counted as the second one)."""
    from trainer.config import config_from_dict
    from trainer.errors import Interrupted
    from trainer.train import Trainer

    t = Trainer(config_from_dict(digits_config(steps=12), tmp_path), stream=io.StringIO())
    step, calls = t.train_step, [0]

    def interrupted_once(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    t.train_step = interrupted_once
    with pytest.raises(Interrupted, match="stopped by SIGINT after step 3"):
        t.fit()
    assert t.fit()["steps"] == 12
