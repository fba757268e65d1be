"""Progress output: the live bar as a pseudo-terminal shows it, plain lines elsewhere,
TensorBoard scalars read back by TensorBoard's own reader, and `onnx-trainer plot` images."""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import json
import math
import os
import pty
import re
import struct
import sys
import termios
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from trainer.errors import TrainerError
from trainer.metrics import MetricsLogger

_END = b"<<end of output>>"


# -- a pseudo-terminal and a tiny screen model --------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _drain(master: int, chunks: list[bytes]) -> None:
    seen = b""
    while _END not in seen:
        try:
            data = os.read(master, 65536)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)
        seen = seen[-len(_END):] + data


@contextlib.contextmanager
def terminal(cols: int = 100):
    """A text stream whose isatty() is true; `out.raw` is what the terminal received."""
    try:
        master, slave = pty.openpty()
    except OSError as exc:  # a sandbox without /dev/ptmx
        pytest.skip(f"no pseudo-terminal: {exc}")
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
    reader.start()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    out = types.SimpleNamespace(raw="")
    try:
        yield stream, out
    finally:
        stream.write(_END.decode())
        stream.flush()
        reader.join(10)
        stream.close()
        os.close(master)
        out.raw = b"".join(chunks).split(_END)[0].decode("utf-8")


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`: CR, LF and erase-to-end-of-line are the only
    controls the logger may send."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            lines[row] = lines[row][:col]
            i += 3
            continue
        ch = raw[i]
        assert ch == "\r" or ch == "\n" or ch.isprintable(), f"unexpected control {ch!r}"
        if ch == "\r":
            col = 0
        elif ch == "\n":  # the pty turns \n into \r\n (ONLCR), as any terminal
            row += 1
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return [line.rstrip() for line in lines]


def _draws(raw: str) -> list[str]:
    """Each bar text as it was drawn."""
    return [m.group(1) for m in re.finditer(r"\r\x1b\[K(step [^\r\n]*)", raw)]


# -- the bar ------------------------------------------------------------------------------------
def test_bar_redraws_in_place_with_messages_above_it():
    clock = Clock()
    with terminal(100) as (stream, out):
        log = MetricsLogger(None, True, stream, clock=clock)
        assert log.live
        log.open(total_steps=100)
        log.info("starting")
        for step in range(1, 101):
            clock.t += 0.01
            log.progress(step, 2.0 / step, 0.1, 1234.0)
            if step == 50:
                log.info("a message mid-run")
            if step == 60:
                log.record({"step": 60, "epoch": 0, "eval_loss": 0.5, "eval_accuracy": 0.9})
        log.info("wrote model.onnx")
        log.close()
    lines = screen(out.raw)
    assert lines[:3] == ["starting", "a message mid-run",
                         "step 60/100  epoch 0  eval_loss 0.5000  eval_accuracy 0.9000"]
    assert lines[4:] == ["wrote model.onnx", ""]
    final = lines[3]
    assert final.startswith("step 100/100 |") and "100%" in final, final
    assert "loss 0.0200" in final and "lr 0.1" in final and "1.2k samples/s" in final
    assert "█" * 20 in final and "in 0:01" in final
    draws = _draws(out.raw)
    # 100 steps over 1 s at most 10 redraws a second (+ the last step, + 2 after messages)
    assert 8 <= len(draws) <= 14, draws
    assert all(len(d) <= 99 for d in draws)  # never the last column: no wrap
    mid = next(d for d in draws if d.startswith("step 3"))  # about 1/3 of the way
    n = int(mid.split()[1].split("/")[0])
    assert f" {n}%" in mid and "ETA 0:01" in mid


def test_bar_redraws_at_most_ten_times_a_second():
    clock = Clock()
    with terminal(80) as (stream, out):
        log = MetricsLogger(None, True, stream, clock=clock)
        log.open(total_steps=10_000)
        for step in range(1, 2001):  # 2000 steps in 2 s
            clock.t += 0.001
            log.progress(step, 1.0, 0.01, 100.0)
        log.close()
    draws = _draws(out.raw)
    assert 15 <= len(draws) <= 21, len(draws)
    steps = [int(re.match(r"step (\d+)", d).group(1)) for d in draws]
    # the last draw is close()'s: the latest values, and the end of the line
    assert all(b - a >= 99 for a, b in itertools.pairwise(steps[:-1])), steps
    assert steps[-1] == 2000 and screen(out.raw)[-2].startswith("step 2000/10000")


def test_bar_eta_and_training_rows():
    clock = Clock()
    with terminal(120) as (stream, out):
        log = MetricsLogger(None, True, stream, clock=clock)
        log.open(total_steps=100)
        for step in range(1, 12):  # 0.5 s a step, measured from step 1
            clock.t += 0.5
            log.progress(step, 1.0, 0.01, 64.0)
        # a logged training row goes to the bar, not to a line of its own
        log.record({"step": 11, "epoch": 0, "loss": 0.75, "lr": 0.02, "samples_per_s": 2.5e6})
        log.close()
    last = _draws(out.raw)[-1]
    assert last.startswith("step 11/100 |") and " 11%" in last
    assert "ETA 0:45" in last  # 89 steps at 0.5 s
    assert "loss 0.7500" in last and "lr 0.02" in last and "2.5M samples/s" in last
    assert [line for line in screen(out.raw) if line] == [last.rstrip()]


def test_narrow_terminal_without_total():
    clock = Clock()
    with terminal(30) as (stream, out):
        log = MetricsLogger(None, True, stream, clock=clock)
        log.open(total_steps=1000)
        clock.t += 1
        log.progress(500, 1.23456, 1e-3, 999.0)
        log.close()
        log2 = MetricsLogger(None, True, stream, clock=clock)
        log2.progress(7, 0.5)  # no total: no percentage, no ETA
        log2.close()
    draws = _draws(out.raw)
    assert len(draws) == 2 and all(len(d) <= 29 for d in draws)
    assert draws[0].startswith("step 500/1000 ") and "%" in draws[0]
    assert draws[1] == "step 7  loss 0.5000"
    # fields that do not fit are left out whole: a cut "lr 0.0001" read as a wrong value
    assert draws[0] == "step 500/1000  50%", draws[0]  # ("  loss 1.2346" would pass 29)


def test_a_terminal_too_narrow_for_a_field_leaves_it_out_whole():
    clock = Clock()
    with terminal(40) as (stream, out):
        log = MetricsLogger(None, True, stream, clock=clock)
        log.open(total_steps=88)
        clock.t += 1
        log.progress(80, 0.123456, 0.000127, 55321.0)
        log.close()
    (draw,) = _draws(out.raw)[:1]
    assert len(draw) <= 39
    fields = draw.split("  ")
    assert all(not f.startswith("lr ") or f == "lr 0.000127" for f in fields), draw


def test_plain_lines_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    path = tmp_path / "logs" / "m.jsonl"
    clock = Clock()
    log = MetricsLogger(path, True, out, clock=clock)
    assert not log.live
    log.open(total_steps=20)
    for step in range(1, 11):  # (steps 1 to 10 in 9 s: 1 s a step)
        log.progress(step, 1.0, 0.1, 50.0)
        clock.t += 1
    clock.t -= 1
    assert out.getvalue() == ""
    log.record({"step": 10, "epoch": 0, "loss": 0.5, "lr": 0.1, "samples_per_s": 1234.4})
    log.record({"step": 10, "epoch": 0, "eval_loss": 0.25, "eval_accuracy": 0.875})
    log.progress(11, 1.0, 0.1, 50.0)
    clock.t += 3  # (an evaluation's time counts in the pace)
    log.record({"step": 11, "epoch": 0, "loss": 0.5, "lr": 0.1, "samples_per_s": 0.314})
    log.record({"step": 11, "epoch": 0, "eval_loss": 2.5831e37, "eval_accuracy": 0.0})
    log.record({"step": 20, "epoch": 1, "loss": 0.25, "lr": 0.1, "samples_per_s": 0.314})
    log.info("done")
    log.close()
    assert out.getvalue().splitlines() == [
        "step 10/20  epoch 0  loss 0.5000  lr 0.1  samples_per_s 1234  ETA 0:10",
        "step 10/20  epoch 0  eval_loss 0.2500  eval_accuracy 0.8750",
        "step 11/20  epoch 0  loss 0.5000  lr 0.1  samples_per_s 0.31  ETA 0:11",  # (not 0)
        "step 11/20  epoch 0  eval_loss 2.583e+37  eval_accuracy 0.0000",  # (38 digits)
        "step 20/20  epoch 1  loss 0.2500  lr 0.1  samples_per_s 0.31", "done"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 10, "epoch": 0, "loss": 0.5, "lr": 0.1, "samples_per_s": 1234.4},
                    {"step": 10, "epoch": 0, "eval_loss": 0.25, "eval_accuracy": 0.875},
                    {"step": 11, "epoch": 0, "loss": 0.5, "lr": 0.1, "samples_per_s": 0.314},
                    {"step": 11, "epoch": 0, "eval_loss": 2.5831e37, "eval_accuracy": 0.0},
                    {"step": 20, "epoch": 1, "loss": 0.25, "lr": 0.1, "samples_per_s": 0.314}]


def test_other_ranks_and_dumb_terminals(tmp_path, monkeypatch):
    with terminal() as (stream, out):
        quiet = MetricsLogger(tmp_path / "m.jsonl", False, stream)
        quiet.open(total_steps=5)
        quiet.progress(1, 1.0, 0.1, 1.0)
        quiet.record({"step": 1, "epoch": 0, "loss": 1.0})
        quiet.info("hidden")
        quiet.close()
        monkeypatch.setenv("TERM", "dumb")
        dumb = MetricsLogger(None, True, stream)
        assert not dumb.live
        dumb.progress(1, 1.0, 0.1, 1.0)
        dumb.record({"step": 1, "epoch": 0, "loss": 1.0})
    assert out.raw.replace("\r", "") == "step 1  epoch 0  loss 1.0000\n"
    assert not (tmp_path / "m.jsonl").exists()


@pytest.mark.parametrize("env", [{"OMPI_COMM_WORLD_SIZE": "1"}, {"PMI_SIZE": "1"},
                                 {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"},
                                 {"OMPI_COMM_WORLD_SIZE": "4"}])
def test_under_mpirun_lines_are_plain_even_for_one_process(monkeypatch, env):
    """mpirun -np 1 (what launch.sh runs for a config without -np) gives the rank a
    pseudo-terminal whatever mpirun's own output is: the log file held bar redraws."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with terminal() as (stream, _):
        assert not MetricsLogger(None, True, stream).live
    for k in env:
        monkeypatch.delenv(k)
    with terminal() as (stream, _):
        assert MetricsLogger(None, True, stream).live


def test_close_mid_run_ends_the_bar_line():
    clock = Clock()
    with terminal() as (stream, out):
        log = MetricsLogger(None, True, stream, clock=clock)
        log.open(total_steps=10)
        log.progress(3, 1.0, 0.1, 10.0)
        log.close()
        log.close()
        print("error: something", file=stream)
    lines = screen(out.raw)
    assert lines[0].startswith("step 3/10 ") and lines[1:] == ["error: something", ""]


def test_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path, True, io.StringIO())
    log.open()
    for step in range(1, 7):
        log.record({"step": step, "epoch": 0, "loss": float(step)})
    with path.open("a") as f:
        f.write('{"step": 7, "ep')  # cut by a crash
    again = MetricsLogger(path, True, io.StringIO())
    again.open(resume_step=4)
    again.record({"step": 5, "epoch": 0, "loss": 50.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                      (5, 50.0)]


def test_resume_rewrites_the_rows_atomically(tmp_path, monkeypatch):
    """--resume's rewrite of the metrics file goes to a file beside it, renamed over it: a kill
    in between keeps every row (it truncated the file in place); a symbolic link stays one."""
    import trainer.metrics as metrics

    target = tmp_path / "real.jsonl"
    log = MetricsLogger(target, True, io.StringIO())
    log.open()
    for step in range(1, 7):
        log.record({"step": step, "epoch": 0, "loss": float(step)})
    target.chmod(0o640)
    path = tmp_path / "m.jsonl"
    path.symlink_to(target)
    before = target.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # (a SIGKILL at this point: the process stops here)

    monkeypatch.setattr(metrics.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(path, True, io.StringIO()).open(resume_step=4)
    assert target.read_text() == before
    monkeypatch.undo()
    MetricsLogger(path, True, io.StringIO()).open(resume_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert path.is_symlink() and (target.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "real.jsonl"]


# -- TensorBoard --------------------------------------------------------------------------------
def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    tb = tmp_path / "tb"
    log = MetricsLogger(None, True, io.StringIO(), tensorboard=tb)
    log.open(total_steps=30)
    for step in (10, 20, 30):
        log.record({"step": step, "epoch": step // 20, "loss": 1.0 / step, "lr": 0.1 - step / 1e3,
                    "samples_per_s": 1000.0 + step})
    log.record({"step": 30, "epoch": 1, "eval_loss": 0.125, "eval_accuracy": 0.96875})
    log.close()
    got = _scalars(tb)
    assert set(got) == {"train/loss", "train/lr", "train/samples_per_s", "eval/loss",
                        "eval/accuracy"}
    assert [s for s, _ in got["train/loss"]] == [10, 20, 30]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [0.1, 0.05, 1 / 30], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in got["train/lr"]], [0.09, 0.08, 0.07], rtol=1e-6)
    assert [v for _, v in got["train/samples_per_s"]] == [1010.0, 1020.0, 1030.0]
    assert got["eval/loss"] == [(30, 0.125)] and got["eval/accuracy"] == [(30, 0.96875)]


def test_tensorboard_resume_hides_the_crashed_runs_later_steps(tmp_path):
    pytest.importorskip("tensorboardX")
    tb = tmp_path / "tb"
    first = MetricsLogger(None, True, io.StringIO(), tensorboard=tb)
    first.open()
    for step in range(1, 7):
        first.record({"step": step, "epoch": 0, "loss": float(step)})
    first.close()
    second = MetricsLogger(None, True, io.StringIO(), tensorboard=tb)
    second.open(resume_step=3)  # within the same second: its own file all the same
    for step in range(4, 9):
        second.record({"step": step, "epoch": 0, "loss": 10.0 * step})
    second.close()
    assert len(list(tb.iterdir())) == 2
    assert _scalars(tb)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                                          (6, 60.0), (7, 70.0), (8, 80.0)]


def test_tensorboard_rows_are_written_before_each_checkpoint(tmp_path, digits_config,
                                                             monkeypatch):
    """Training rows waited for an evaluation or 10 s in the writer's buffer: a run killed
    (SIGKILL) after a checkpoint lost them for good, as its resume starts after it."""
    pytest.importorskip("tensorboardX")
    from trainer import checkpoint
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    tb = tmp_path / "tb"
    seen = []
    save = checkpoint.save

    def saved(folder, step, *args, **kwargs):  # (what a kill right after it would leave)
        seen.append((step, [s for s, _ in _scalars(tb).get("train/loss", [])]))
        return save(folder, step, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "save", saved)
    raw = digits_config(steps=6, log={"every_steps": 1, "tensorboard": str(tb)},
                        checkpoint={"dir": str(tmp_path / "ck"), "every_steps": 3})
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    assert seen == [(3, [1, 2, 3]), (6, [1, 2, 3, 4, 5, 6])]


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(TrainerError, match=r"pip install 'onnx-trainer\[tensorboard\]'"):
        MetricsLogger(None, True, io.StringIO(), tensorboard=tmp_path / "tb")
    MetricsLogger(None, False, io.StringIO(), tensorboard=tmp_path / "tb")  # other ranks


# -- onnx-trainer plot --------------------------------------------------------------------------
def _write_run(path: Path, rate: float, steps: int = 200, eval_every: int = 50) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in range(10, steps + 1, 10):
            f.write(json.dumps({"step": s, "epoch": s // 100, "loss": 2 * math.exp(-s * rate),
                                "lr": 0.1 * (1 - s / steps), "samples_per_s": 5e3}) + "\n")
            if s % eval_every == 0:
                f.write(json.dumps({"step": s, "epoch": s // 100,
                                    "eval_loss": 2.2 * math.exp(-s * rate),
                                    "eval_accuracy": 1 - math.exp(-s * rate)}) + "\n")
    return path


def _image(path: Path) -> np.ndarray:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def _near(img: np.ndarray, color: str, tol: float = 0.08) -> int:
    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img[..., :3] - rgb).max(axis=-1) < tol).sum())


BLUE, ORANGE = "#1f77b4", "#ff7f0e"  # matplotlib's first two cycle colors: run 1, run 2


def test_plot_overlays_runs_at_the_requested_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from trainer.plot import main

    a = _write_run(tmp_path / "runs" / "a" / "metrics.jsonl", 0.01)
    b = _write_run(tmp_path / "runs" / "b" / "metrics.jsonl", 0.02)
    out = tmp_path / "plots" / "curves.png"
    assert main([str(a), str(b), "-o", str(out), "--size", "640x480"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    img = _image(out)
    assert img.shape[:2] == (480, 640)
    assert img[..., :3].std() > 0.05  # not blank
    assert _near(img, BLUE) > 300 and _near(img, ORANGE) > 300  # both runs drawn
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary left
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (640, 480) and im.format == "PNG"


def test_plot_one_run_selected_metrics_overwrites(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from trainer.plot import main

    a = _write_run(tmp_path / "a.jsonl", 0.01)
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    assert main([str(a), "-o", str(out), "--metrics", "loss,eval_loss", "--size", "300x200",
                 "--log-y", "--title", "run a"]) == 0
    img = _image(out)
    assert img.shape[:2] == (200, 300) and img[..., :3].std() > 0.05
    assert _near(img, BLUE) > 100 and _near(img, ORANGE) == 0
    # a loss of 0 or less (the `output` loss type's, a regularized objective) cannot take a
    # log scale: --log-y was dropped without a word
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    rows[0]["loss"] = -0.5
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main([str(a), "-o", str(out), "--metrics", "loss,eval_loss", "--log-y"]) == 0
    assert "note: --log-y: loss hold(s) values of 0 or less, so the panel of loss, eval_loss " \
        "is drawn on a linear scale" in capsys.readouterr().out


def test_plot_smoothing_matches_tensorboards_debiased_average(tmp_path):
    from trainer.plot import main, smoothed

    w, xs = 0.6, [4.0, 2.0, 8.0, float("nan"), 1.0]
    ref, num, den = [], 0.0, 0.0
    for x in xs:  # sum_i w^(n-i) (1-w) x_i / sum_i w^(n-i) (1-w), over the finite points
        if x == x:
            num, den = w * num + (1 - w) * x, w * den + (1 - w)
        ref.append(num / den if x == x else x)
    np.testing.assert_allclose(smoothed(xs, w), ref, rtol=1e-12)
    assert smoothed(xs, w)[0] == 4.0 and smoothed([1.0, 3.0], 0.0) == [1.0, 3.0]
    with pytest.raises(TrainerError, match="--smooth"):
        main([str(_write_run(tmp_path / "a.jsonl", 0.01)), "-o", "x.png", "--smooth", "1"])


def test_plot_reads_numbers_beyond_floats_range(tmp_path):
    """A JSON integer too large for a float is +-inf, as json reads 1e400 (it was an
    OverflowError traceback); a row whose step is not finite is skipped."""
    pytest.importorskip("matplotlib")
    from trainer.plot import _series, main, read_runs

    a = tmp_path / "a.jsonl"
    a.write_text('{"step": 1, "loss": 1' + "0" * 400 + '}\n{"step": 2, "loss": -1' + "0" * 400
                 + '}\n{"step": 3, "loss": 0.5}\n{"step": 1' + "0" * 400 + ', "loss": 0.1}\n'
                 '{"step": NaN, "loss": 0.2}\n')
    (rows,) = read_runs([a]).values()
    assert _series(rows, "loss") == ([1.0, 2.0, 3.0], [float("inf"), float("-inf"), 0.5])
    assert main([str(a), "-o", str(tmp_path / "c.png")]) == 0


def test_plot_panels_group_losses_and_keep_lr_last():
    from trainer.plot import _panels

    assert _panels(["lr", "loss", "eval_accuracy", "eval_loss"]) == \
        [["loss", "eval_loss"], ["eval_accuracy"], ["lr"]]
    assert _panels(["lr"]) == [["lr"]]


def test_plot_errors_are_one_line(tmp_path, monkeypatch):
    from trainer.plot import main

    a = _write_run(tmp_path / "a.jsonl", 0.01)
    out = str(tmp_path / "c.png")
    with pytest.raises(TrainerError, match="not found"):
        main([str(tmp_path / "none.jsonl"), "-o", out])
    with pytest.raises(TrainerError, match="no file has metric.*bogus.*available: loss, lr"):
        main([str(a), "-o", out, "--metrics", "loss,bogus"])
    with pytest.raises(TrainerError, match="WIDTHxHEIGHT"):
        main([str(a), "-o", out, "--size", "big"])
    (tmp_path / "empty.jsonl").write_text("not json\n")
    with pytest.raises(TrainerError, match="no metrics rows"):
        main([str(tmp_path / "empty.jsonl"), "-o", out])
    (tmp_path / "binary.npz").write_bytes(bytes(range(256)) * 4)  # (not UTF-8: a traceback)
    with pytest.raises(TrainerError, match="no metrics rows"):
        main([str(tmp_path / "binary.npz"), "-o", out])
    with pytest.raises(TrainerError, match="is a folder"):
        main([str(tmp_path), "-o", out])
    with pytest.raises(TrainerError, match="/dev/null is not a regular file"):
        main(["/dev/null", "-o", out])  # (it was "not found")
    with pytest.raises(TrainerError, match=r"--dpi 100000 is too large; use 10 to 10000"):
        main([str(a), "-o", out, "--dpi", "100000"])  # (matplotlib ran out of memory)
    if pytest.importorskip("matplotlib"):
        with pytest.raises(TrainerError, match="must end with one of"):
            main([str(a), "-o", str(tmp_path / "c.xyz")])
        import trainer.plot as plot  # a folder that cannot be written: its OSError, one line
        monkeypatch.setattr(plot.os, "replace", lambda *a: (_ for _ in ()).throw(
            OSError(30, "Read-only file system")))
        monkeypatch.setattr(plot.Path, "unlink", lambda *a, **k: (_ for _ in ()).throw(
            OSError(30, "Read-only file system")))
        with pytest.raises(TrainerError, match="cannot write .*Read-only file system"):
            main([str(a), "-o", out])
        monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(TrainerError, match=r"pip install 'onnx-trainer\[plot\]'"):
        main([str(a), "-o", out])
    assert not (tmp_path / "c.png").exists()


def test_plot_reads_a_real_training_log(tmp_path, digits_config):
    pytest.importorskip("matplotlib")
    from trainer.config import config_from_dict
    from trainer.plot import main, read_runs
    from trainer.train import Trainer

    metrics = tmp_path / "digits" / "metrics.jsonl"
    cfg = digits_config(steps=20, log={"every_steps": 2, "metrics": str(metrics)},
                        eval={"every_steps": 10})
    Trainer(config_from_dict(cfg, tmp_path), stream=io.StringIO()).fit()
    with metrics.open("a") as f:
        f.write('{"step": 21, "lo')  # a line cut by a crash is skipped
    (run,) = read_runs([metrics]).values()
    assert sum("eval_loss" in r for r in run) == 2 and sum("loss" in r for r in run) == 10
    out = tmp_path / "digits.png"
    assert main([str(metrics), "-o", str(out), "--size", "400x300", "--smooth", "0.6"]) == 0
    img = _image(out)
    assert img.shape[:2] == (300, 400) and _near(img, BLUE) > 100


def test_each_parameter_groups_lr_is_plotted_and_in_tensorboard(tmp_path, digits_config):
    """With optimizer.groups the rows carry lr_groups (a list): plot said "no file has
    metric(s) lr_groups" and drew the first group's lr only; TensorBoard left it out."""
    pytest.importorskip("matplotlib")
    from trainer import plot
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    metrics = tmp_path / "m.jsonl"
    raw = digits_config(steps=8, log={"every_steps": 1, "metrics": str(metrics),
                                      "tensorboard": str(tmp_path / "tb")},
                        output=str(tmp_path / "o.onnx"))
    raw["optimizer"]["groups"] = [{"params": "*.bias", "lr": 5 * raw["optimizer"]["lr"]}]
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    (run,) = plot.read_runs([metrics]).values()
    want = [(r["step"], r.get("lr_groups", [r["lr"]] * 2)) for r in rows]
    assert [(r["step"], [r["lr_groups[0]"], r["lr_groups[1]"]]) for r in run
            if "loss" in r] == want and any(a != b for _, (a, b) in want)
    out = tmp_path / "lr.png"
    assert plot.main([str(metrics), "-o", str(out), "--metrics", "lr_groups",
                      "--size", "300x200"]) == 0
    img = _image(out)
    assert _near(img, BLUE) > 50
    assert plot._panels(["loss", "lr_groups[0]", "lr_groups[1]"]) == \
        [["loss"], ["lr_groups[0]", "lr_groups[1]"]]
    scalars = _scalars(tmp_path / "tb")
    got = [v for _, v in scalars["train/lr_groups/1"]]
    np.testing.assert_allclose(got, [g[1] for _, g in want if g[0] != g[1]], rtol=1e-6)


def test_training_writes_tensorboard_and_draws_the_bar(tmp_path, digits_config):
    """A real run: the progress bar on a pseudo-terminal, TensorBoard scalars per logged step."""
    from trainer.config import config_from_dict
    from trainer.train import Trainer

    raw = digits_config(steps=12, log={"every_steps": 4, "tensorboard": str(tmp_path / "tb")},
                        output=str(tmp_path / "o.onnx"))
    with terminal() as (stream, out):
        Trainer(config_from_dict(raw, tmp_path), stream=stream).fit()
    shown = screen(out.raw)
    assert any("12/12" in line and "100%" in line for line in shown), shown
    scalars = _scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [4, 8, 12]
    assert [s for s, _ in scalars["eval/accuracy"]] == [12]


def test_plot_smoothing_leaves_the_lr_as_it_is(tmp_path, monkeypatch):
    """--smooth averaged the lr too: a schedule drawn lagging (1e-3 where it had reached
    7e-6). The lr is exact; the losses are smoothed."""
    pytest.importorskip("matplotlib")
    from trainer import plot

    seen = []

    def record(values, weight):
        seen.append(list(values))
        return values
    monkeypatch.setattr(plot, "smoothed", record)
    a = _write_run(tmp_path / "a.jsonl", 0.01)
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert plot.main([str(a), "-o", str(tmp_path / "c.png"), "--smooth", "0.6",
                      "--size", "300x200"]) == 0
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert seen and lrs and lrs not in seen
