"""Progress output from rank 0 only: a live bar on a terminal (plain lines elsewhere), the JSONL
metrics file and, optionally, TensorBoard event files."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from trainer.errors import TrainerError, printable

_ROW_FIELDS = (("loss", ".4f"), ("lr", ".3g"), ("samples_per_s", ".0f"),
               ("eval_loss", ".4f"), ("eval_accuracy", ".4f"))
_CLEAR = "\r\x1b[K"  # back to column 0, erase to the end of the line
_BLOCKS = " ▏▎▍▌▋▊▉█"


def _is_terminal(stream: IO[str]) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    from trainer.comm import launched
    if launched():
        # mpirun forwards each rank's output through a pseudo-terminal of its own, whatever
        # mpirun's own output is (often a log file): plain lines there (-np 1 included, as
        # launch.sh starts a config without -np).
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _clock_text(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _rate_text(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


# errno codes of an output that cannot take more (a full disk, a quota, a file size limit;
# a pipe whose reader went away, `train ... | head -1`)
_FULL = {getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT", "EIO", "EPIPE")
         if hasattr(errno, n)}


class _Bar:
    """The state of the live progress line: the latest values, when it was last drawn, the pace."""

    def __init__(self, stream: IO[str], clock: Callable[[], float], interval: float):
        self.stream, self.clock, self.interval = stream, clock, interval
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.unicode = enc.startswith("utf")
        self.reset(None)

    def reset(self, total: int | None) -> None:
        self.total = total
        self.step = 0
        self.loss = self.lr = self.rate = None
        self.shown = False      # a bar line is on the screen, with the cursor at its end
        self.finished = False   # the final state was drawn and the line ended
        self.last_draw = -float("inf")
        self.drawn_step = -1
        self.t0: float | None = None  # pace: time and step of the first update
        self.step0 = 0

    def update(self, step: int, loss: float | None, lr: float | None,
               rate: float | None, force: bool = False) -> None:
        now = self.clock()
        if self.t0 is None:
            self.t0, self.step0 = now, step
        self.step = step
        if loss is not None:
            self.loss = loss
        if lr is not None:
            self.lr = lr
        if rate is not None:
            self.rate = rate
        done = self.total is not None and step >= self.total
        if self.finished or not (force or done or now - self.last_draw >= self.interval):
            return
        self.last_draw, self.drawn_step = now, step
        self.stream.write(_CLEAR + self.text(now))
        if done:
            self.stream.write("\n")
            self.shown, self.finished = False, True
        else:
            self.shown = True
        self.stream.flush()

    def text(self, now: float) -> str:
        cols = _columns(self.stream) - 1  # never touch the last column: no wrap, \r stays on it
        total = self.total
        head = f"step {self.step}/{total}" if total else f"step {self.step}"
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        if self.rate is not None:
            parts.append(f"{_rate_text(self.rate)} samples/s")
        elapsed = now - self.t0 if self.t0 is not None else 0.0
        if total and self.step >= total:
            parts.append(f"in {_clock_text(elapsed)}")
        elif total and self.step > self.step0 and elapsed > 0:
            eta = (total - self.step) * elapsed / (self.step - self.step0)
            parts.append(f"ETA {_clock_text(eta)}")
        tail = "  ".join(parts)
        if total:
            frac = min(max(self.step / total, 0.0), 1.0)
            pct = f"{100 * frac:3.0f}%"
            width = min(30, cols - len(head) - len(pct) - len(tail) - 7)
            if width >= 8:
                return f"{head} |{self._graphic(frac, width)}| {pct}  {tail}"
            head = f"{head} {pct}"
        # (too narrow: whole fields left out from the end, never a number cut in two)
        while parts and len(f"{head}  {'  '.join(parts)}") > cols:
            parts.pop()
        return f"{head}  {'  '.join(parts)}".rstrip()[:cols]

    def _graphic(self, frac: float, width: int) -> str:
        if not self.unicode:
            n = int(frac * width)
            return "#" * n + "-" * (width - n)
        eighths = int(frac * width * 8)
        full, part = divmod(eighths, 8)
        s = "█" * full + (_BLOCKS[part] if part and full < width else "")
        return s + " " * (width - len(s))

    def clear(self) -> None:
        """Take the bar off its line, so that a message can be printed there."""
        if self.shown:
            self.stream.write(_CLEAR)
            self.shown = False

    def redraw(self) -> None:
        if not self.finished and self.t0 is not None:
            self.drawn_step = self.step
            self.stream.write(_CLEAR + self.text(self.clock()))
            self.shown = True
            self.stream.flush()

    def end(self) -> None:
        """Leave the bar as it is and move below it (the run stopped before its last step)."""
        if self.shown:
            if self.step != self.drawn_step:  # show the latest values
                self.stream.write(_CLEAR + self.text(self.clock()))
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
        self.finished = True


class MetricsLogger:
    """Rank 0's output: messages, one JSONL line per logged row and, on a terminal, a progress bar
    fed every step by `progress`; with `tensorboard`, the rows' numbers as TensorBoard scalars.

    `bar`: None decides by whether `stream` is a terminal; the bar redraws at most every
    `bar_interval` seconds.
    """

    def __init__(self, path: Path | None, enabled: bool, stream: IO[str] | None = None, *,
                 tensorboard: Path | None = None, bar: bool | None = None,
                 bar_interval: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.path = Path(path) if path else None
        self.tensorboard = Path(tensorboard) if tensorboard else None
        self.start = time.perf_counter()
        self.opened = False
        self.total_steps: int | None = None
        self._writer: Any = None
        if bar is None:
            bar = _is_terminal(self.stream)
        self._bar = _Bar(self.stream, clock, bar_interval) if (enabled and bar) else None
        self._clock = clock
        self._pace: tuple[float, int] | None = None  # plain lines' ETA: first step's time, step
        self._mute = False  # (the output's disk is full: see _silence)
        if enabled and self.tensorboard is not None:
            _summary_writer_class()  # a missing tensorboardX is reported before training starts

    @property
    def live(self) -> bool:
        """Whether a progress bar is drawn (rank 0 on a terminal)."""
        return self._bar is not None

    def open(self, resume_step: int | None = None, total_steps: int | None = None,
             evaluated: bool = True) -> None:
        """Start the JSONL file: a new run truncates it; a resumed run keeps the rows up to the
        checkpoint's step (and drops rows a crashed run wrote after it; also the evaluation row
        of the checkpoint's step where the checkpoint was written before it, not `evaluated`:
        an epoch that ends inside the next step's accumulation is evaluated at the weights of
        that step, after its checkpoint, and the resumed run evaluates it again). TensorBoard
        readers likewise hide the events of earlier runs in the directory from step
        resume_step + 1 on."""
        self.opened = True
        if total_steps is not None:
            self.set_total(total_steps)
        if not self.enabled:
            return
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.is_file():
                # (bytes that are not UTF-8 make lines that do not parse: not kept)
                text = self.path.read_text(encoding="utf-8", errors="replace")
                for line in text.splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut by a crash
                        continue
                    step = row.get("step", 0) if isinstance(row, dict) else None
                    if isinstance(step, (int, float)) and (step < resume_step or (
                            step == resume_step and (evaluated or "loss" in row))):
                        kept.append(line)
            text = "".join(f"{line}\n" for line in kept)
            if resume_step is None or not self.path.is_file():
                self.path.write_text(text)
            else:  # rewritten beside it and renamed: a kill mid-write keeps the old rows
                target = Path(os.path.realpath(self.path))
                tmp = target.with_name(f".{target.name}.resume-tmp")
                tmp.write_text(text)
                shutil.copymode(target, tmp)
                os.replace(tmp, target)
        if self.tensorboard is not None:
            self._close_writer()
            self.tensorboard.mkdir(parents=True, exist_ok=True)
            # purge_step: a SessionLog START that makes readers drop older events from that step
            # on; the suffix keeps two writers started within one second from sharing a file.
            try:
                self._writer = _EventFile(self.tensorboard, (resume_step or 0) + 1)
            except OSError as exc:
                self._lose_tensorboard(exc)

    def set_total(self, total_steps: int) -> None:
        """The run's length in steps, for the bar's percentage and ETA."""
        self.total_steps = int(total_steps)
        if self._bar is not None:
            self._bar.clear()
            self._bar.reset(self.total_steps)

    def info(self, text: str) -> None:
        if not self.enabled or self._mute:
            return
        text = "\n".join(printable(line) for line in text.split("\n"))  # (names from files)
        try:
            if self._bar is not None:
                self._bar.clear()
                print(text, file=self.stream)
                self._bar.redraw()
                self.stream.flush()
            else:
                print(text, file=self.stream, flush=True)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            self._silence(exc)

    def _silence(self, exc: OSError) -> None:
        """The output's disk is full: training goes on without it (its model, checkpoints and
        metrics are written elsewhere, or say why not), said once on stderr; later writes of
        what Python still holds for the stream go nowhere, so that the run ends as it should."""
        self._mute, self._bar = True, None
        try:
            fd = self.stream.fileno()
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        except (OSError, ValueError, AttributeError):  # (a stream without a file: dropped)
            pass
        if self.stream is not sys.stderr:
            try:
                print(f"onnx-trainer: warning: cannot write the terminal output "
                      f"({exc.strerror or exc}); training goes on without it", file=sys.stderr,
                      flush=True)
            except OSError:
                pass

    def progress(self, step: int, loss: float | None = None, lr: float | None = None,
                 samples_per_s: float | None = None) -> None:
        """Called every step; redraws the bar at most every `bar_interval` seconds (and at the
        last step); off a terminal it only notes the pace for the plain lines' ETA."""
        if self._pace is None and self.enabled:
            self._pace = (self._clock(), step)
        if self._bar is not None:
            self._bar.update(step, loss, lr, samples_per_s)

    def record(self, row: dict) -> None:
        """Write one JSONL line, the TensorBoard scalars and a terminal summary of it (on a
        terminal, training rows go to the bar and evaluation rows print above it)."""
        if not self.enabled:
            return
        if not self.opened:
            self.open()
        if self.path:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(_finite_or_null(row), allow_nan=False) + "\n")
            except OSError as exc:  # (a full disk: training goes on, its model is the output)
                self.info(f"warning: cannot append to log.metrics {self.path}: "
                          f"{exc.strerror or exc}; training goes on without the metrics file")
                self.path = None
        if self._writer is not None:
            self._add_scalars(row)
        if self._bar is not None and "loss" in row and "step" in row:
            self._bar.update(row["step"], row["loss"], row.get("lr"), row.get("samples_per_s"),
                             force=True)
            return
        total = self.total_steps
        step = row["step"]
        parts = [f"step {step}/{total}" if total else f"step {step}", f"epoch {row['epoch']}"]
        for key, fmt in _ROW_FIELDS:
            if key in row:
                value = row[key]
                if key == "samples_per_s" and value < 10:  # (0.31, not 0: slow steps)
                    fmt = ".2g"
                elif fmt == ".4f" and abs(value) >= 1e6:  # (1.2e+37, not 38 digits)
                    fmt = ".4g"
                parts.append(f"{key} {value:{fmt}}")
        if "loss" in row and total and self._pace is not None and self._pace[1] < step < total:
            t0, step0 = self._pace  # (training rows: the time left at the pace so far)
            eta = (total - step) * (self._clock() - t0) / (step - step0)
            parts.append(f"ETA {_clock_text(eta)}")
        self.info("  ".join(parts))

    def _add_scalars(self, row: dict) -> None:
        step = int(row["step"])
        evaluation = False
        scalars = []
        for key, value in row.items():
            if key == "lr_groups":  # (each parameter group's lr, where they differ)
                scalars += [(f"train/lr_groups/{i}", float(v)) for i, v in enumerate(value)]
                continue
            if key in ("step", "epoch") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            if key.startswith("eval_"):
                evaluation = True
                tag = "eval/" + key[5:]
            else:
                tag = "train/" + key
            scalars.append((tag, float(value)))
        try:
            self._writer.add_scalars(scalars, step)
            # (evaluations, rare and worth seeing at once; the rest every 10 s)
            if evaluation or time.monotonic() - self._writer.flushed >= 10:
                self._writer.flush()
        except OSError as exc:
            self._lose_tensorboard(exc)

    def _lose_tensorboard(self, exc: OSError) -> None:
        """log.tensorboard cannot be written (a full disk): training goes on without it, said
        once (a by-product of the run, as the metrics file)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        self.info(f"warning: cannot write log.tensorboard {self.tensorboard}: "
                  f"{exc.strerror or exc}; training goes on without TensorBoard events")

    def flush_events(self) -> None:
        """Write the TensorBoard events buffered so far (before a checkpoint: a run killed after
        it loses no row a resume from it does not write again; a resume hides the steps after
        its checkpoint)."""
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as exc:
                self._lose_tensorboard(exc)

    def close(self) -> None:
        """End the bar's line and close the TensorBoard files; call it when the run ends,
        however it ends. Safe to call more than once."""
        if self._bar is not None:
            self._bar.end()
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                self._lose_tensorboard(exc)
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer_class() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise TrainerError("log.tensorboard needs the tensorboardX package, which is not "
                           "installed: pip install 'onnx-trainer[tensorboard]' (or remove "
                           "log.tensorboard)") from None
    return SummaryWriter


class _EventFile:
    """A TensorBoard event file of scalars, written in this thread (tensorboardX's
    SummaryWriter writes from a thread of its own, where a full disk is a traceback the run
    cannot catch, and ends the process at exit): `purge_step` opens it with the SessionLog
    START by which readers drop the events of earlier runs from that step on, as
    SummaryWriter(purge_step=...) does."""

    def __init__(self, folder: Path, purge_step: int):
        _summary_writer_class()  # (tensorboardX present: said before training starts)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        # (the suffix keeps two writers started within one second from sharing a file)
        self._events = EventsWriter(str(folder / "events"), f".{time.time_ns():020d}")
        self._events.write_event(Event(step=purge_step, wall_time=time.time(),
                                       session_log=SessionLog(status=SessionLog.START)))
        self.flushed = time.monotonic()

    def add_scalars(self, scalars: list[tuple[str, float]], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if scalars:
            self._events.write_event(Event(
                step=step, wall_time=time.time(), summary=Summary(value=[
                    Summary.Value(tag=tag, simple_value=v) for tag, v in scalars])))

    def flush(self) -> None:
        self._events.flush()
        self.flushed = time.monotonic()

    def close(self) -> None:
        self._events.close()


def _finite_or_null(row: dict) -> dict:
    """The row with NaN and infinite values as null: the JSON other tools read (jq, a
    browser's JSON.parse) has no NaN; the terminal and TensorBoard keep the value."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}
