"""`onnx-trainer plot`: training curves (loss, evaluation metrics, lr against step) of one or more
metrics JSONL files drawn into one image, several runs overlaid (matplotlib, Agg backend)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError

_STYLES = ("-", "--", ":", "-.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `plot`, for the `onnx-trainer` parser and for `main`."""
    p.add_argument("files", nargs="+", metavar="METRICS.jsonl",
                   help="metrics files written by log.metrics; one run each")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="image to write (.png, .svg, .pdf)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated keys to draw (default: loss, every eval_* key, lr)")
    p.add_argument("--size", default="1200x800", metavar="WxH",
                   help="image size in pixels (default 1200x800)")
    p.add_argument("--dpi", type=int, default=100, help="dots per inch (default 100)")
    p.add_argument("--log-y", action="store_true", help="logarithmic scale for the losses")
    p.add_argument("--smooth", type=float, default=0.0, metavar="W",
                   help="exponential moving average of the training losses, weight W in [0, 1) "
                        "as TensorBoard's slider (0.6 is typical; default 0: none; the lr is "
                        "drawn as it is)")
    p.add_argument("--title", default=None, help="a title above the plots")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="onnx-trainer plot", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    runs = read_runs([Path(f) for f in args.files])
    width, height = _parse_size(args.size)
    if not 0.0 <= args.smooth < 1.0:
        raise TrainerError(f"plot: --smooth {args.smooth} is outside [0, 1); use e.g. 0.6")
    if not 10 <= args.dpi <= 10000:  # (far above: matplotlib ran out of memory)
        raise TrainerError(f"plot: --dpi {args.dpi} is too {'small' if args.dpi < 10 else 'large'}"
                           "; use 10 to 10000 (default 100; --size sets the pixels)")
    available = _keys_in_order(runs)
    if args.metrics:
        wanted = [k.strip() for k in args.metrics.split(",") if k.strip()]
        # (lr_groups: each group's lr, lr_groups[0], lr_groups[1], ...)
        wanted = [x for k in wanted for x in ([a for a in available if a.startswith(f"{k}[")]
                                              or [k])]
        missing = [k for k in wanted if k not in available]
        if missing:
            raise TrainerError(f"plot: no file has metric(s) {', '.join(missing)}; "
                               f"available: {', '.join(available)}")
    else:
        wanted = [k for k in available if k == "loss" or k.startswith("eval_")]
        groups = [k for k in available if k.startswith("lr_groups[")]
        wanted += groups or [k for k in available if k == "lr"]  # (lr: the first group's)
    if not wanted:
        raise TrainerError(f"plot: the files have no loss, eval_* or lr values; pick some with "
                           f"--metrics from: {', '.join(available) or '(none)'}")
    out = Path(args.output)
    for note in render(runs, wanted, out, (width, height), dpi=args.dpi, log_y=args.log_y,
                       title=args.title, smooth=args.smooth):
        print(note)
    print(f"wrote {out}")
    return 0


def read_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """Each file's rows by run name (the file name, with as many parent folders as it takes to
    tell the files apart); lines that are not JSON objects with a step (cut by a crash) are
    skipped."""
    names = _run_names(paths)
    runs: dict[str, list[dict]] = {}
    for name, path in zip(names, paths, strict=True):
        if not path.is_file():
            raise TrainerError(f"plot: metrics file {path} " + (
                "is a folder" if path.is_dir() else "is not a regular file (a device, a pipe)"
                if path.exists() else "not found"))
        rows = []
        with path.open(errors="replace") as f:  # (a binary file: no rows, said below)
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) \
                        and math.isfinite(_number(row["step"])):
                    rows.append(row)
        if not rows:
            raise TrainerError(f"plot: {path} has no metrics rows (JSON lines with a 'step'); "
                               "is it a log.metrics file?")
        runs[name] = _groups_split(rows)
    return runs


def _groups_split(rows: list[dict]) -> list[dict]:
    """Each parameter group's lr (`lr_groups`, a list in the rows where the groups' lrs
    differ) as a key of its own, lr_groups[i]; a row without the list, where every group
    runs at `lr`, gives each that lr."""
    n = max((len(r["lr_groups"]) for r in rows if isinstance(r.get("lr_groups"), list)),
            default=0)
    for r in rows:
        values = r.get("lr_groups")
        if not isinstance(values, list):
            values = [r["lr"]] * n if n and "lr" in r else []
        for i, v in enumerate(values):
            r[f"lr_groups[{i}]"] = v
    return rows


def _is_lr(key: str) -> bool:
    return key == "lr" or key.startswith("lr_groups[")


def _run_names(paths: list[Path]) -> list[str]:
    parts = [p.resolve().with_suffix("").parts for p in paths]
    if len(set(parts)) < len(parts):  # the same file given twice
        return [f"{q[-1]} ({i + 1})" for i, q in enumerate(parts)]
    while len(parts) > 1 and min(map(len, parts)) > 1 and len({q[-1] for q in parts}) == 1:
        parts = [q[:-1] for q in parts]  # runs/a/metrics, runs/b/metrics: name them a and b
    for depth in range(1, max(len(q) for q in parts)):
        names = ["/".join(q[-depth:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return ["/".join(q) for q in parts]


def _keys_in_order(runs: dict[str, list[dict]]) -> list[str]:
    keys: dict[str, None] = {}
    for rows in runs.values():
        for row in rows:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    keys[k] = None
    return list(keys)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if not (16 <= w <= 20000 and 16 <= h <= 20000):
        raise TrainerError(f"plot: --size {text!r} is not WIDTHxHEIGHT in pixels, each 16 to "
                           "20000 (e.g. 1200x800)")
    return w, h


def _panels(metrics: list[str]) -> list[list[str]]:
    """Losses share one panel (train against eval), lr gets the last one, every other metric
    its own."""
    losses = [m for m in metrics if m.endswith("loss")]
    others = [[m] for m in metrics if not m.endswith("loss") and not _is_lr(m)]
    lrs = [m for m in metrics if _is_lr(m)]
    return ([losses] if losses else []) + others + ([lrs] if lrs else [])


def _number(v: int | float) -> float:
    """A JSON number as a float; an integer beyond float's range is +-inf (as json reads 1e400)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = sorted((_number(r["step"]), _number(r[key])) for r in rows
                    if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool))
    return [s for s, _ in points], [v for _, v in points]


def smoothed(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first point is kept)."""
    out, ema, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        ema = weight * ema + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(ema / norm)
    return out


def _label(key: str) -> str:
    return {"lr": "learning rate", "samples_per_s": "samples/s"}.get(key, key.replace("_", " "))


def render(runs: dict[str, list[dict]], metrics: list[str], out: Path, size: tuple[int, int],
           dpi: int = 100, log_y: bool = False, title: str | None = None,
           smooth: float = 0.0) -> list[str]:
    """Draw `metrics` of every run against step into `out` (written atomically); returns
    notes on what was drawn otherwise than asked."""
    notes = []
    Figure, FigureCanvasAgg = _matplotlib()
    fmt = out.suffix.lower().lstrip(".")
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise TrainerError(f"plot: cannot write {out.name!r}: the file name must end with one of "
                           f"{', '.join('.' + k for k in sorted(supported))} (e.g. .png)")
    panels = _panels(metrics)
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ratios = [0.6 if _is_lr(panel[0]) and len(panels) > 1 else 1.0 for panel in panels]
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": ratios})[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, panels, strict=True):
        drawn = 0
        for (name, rows), color in zip(runs.items(), colors, strict=True):
            for j, key in enumerate(panel):
                x, y = _series(rows, key)
                if not x:
                    continue
                sparse = len(x) <= 50 or key.startswith("eval_")
                label = " ".join(filter(None, (name if len(runs) > 1 else "",
                                               key if len(panel) > 1 else "")))
                style = _STYLES[j % len(_STYLES)]
                # (the lr is the schedule's, exact: an average would draw it lagging)
                if smooth and not key.startswith("eval_") and not _is_lr(key) and len(x) > 1:
                    ax.plot(x, y, style, color=color, alpha=0.25, linewidth=1.0)
                    y = smoothed(y, smooth)
                ax.plot(x, y, style, color=color, label=label or None,
                        marker="o" if sparse else None, markersize=3, linewidth=1.4)
                drawn += 1
        ax.set_ylabel(_label(panel[0]) if len(panel) == 1 else
                      "learning rate" if _is_lr(panel[0]) else "loss")
        ax.grid(True, alpha=0.3)
        low = [k for k in panel if any(v <= 0 for name_rows in runs.values()
                                         for v in _series(name_rows, k)[1] if math.isfinite(v))]
        if log_y and panel[0].endswith("loss") and not low:
            ax.set_yscale("log")
        elif log_y and panel[0].endswith("loss"):
            notes.append(f"note: --log-y: {', '.join(low)} hold(s) values of 0 or less, so "
                         f"the panel of {', '.join(panel)} is drawn on a linear scale")
        if drawn and (len(runs) > 1 or len(panel) > 1):
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    _save_atomic(fig, out, fmt, dpi)
    return notes


def _save_atomic(fig: Any, out: Path, fmt: str, dpi: int) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt, dpi=dpi)
        os.replace(tmp, out)
    except OSError as exc:
        raise TrainerError(f"plot: cannot write {out}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # (a read-only folder: nothing was written there)
            pass


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise TrainerError("onnx-trainer plot needs matplotlib, which is not installed: "
                           "pip install 'onnx-trainer[plot]'") from None
    return Figure, FigureCanvasAgg


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrainerError as exc:
        print(f"onnx-trainer: error: {exc}", file=sys.stderr)
        sys.exit(2)
