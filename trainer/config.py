"""Run configuration: YAML (safe_load only) -> validated frozen dataclasses (DESIGN.md section 3).

Every problem raises a one-line ConfigError naming the dotted key path, e.g. 'optimizer.lr'.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import TrainerError


class ConfigError(TrainerError, ValueError):
    """Invalid configuration; the message is one line and names the offending key path."""

    def __init__(self, message: str):
        # keys and values come from the user's file: escape what would break the line
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


class FrozenMap(Mapping[str, str]):
    """Immutable, hashable, picklable str -> str mapping (dataset inputs/targets)."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> None:
        self._d = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


# --- converters: (value, key path, base_dir) -> value; a wrong type raises ConfigError -----------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _NoList(dict):
    """What `--set a.b.0.c=...` makes of a list `a.b` the config does not set (an item by
    its index): a mapping, which the list's check names as such."""

    def __init__(self, key: str, index: str):
        super().__init__()
        self.key, self.index = key, index


def _got(v: Any) -> str:
    if isinstance(v, _NoList):
        return (f"no list: the config does not set it, so --set cannot reach its item "
                f"{v.index} (give the whole list as the value: --set '{v.key}=[...]')")
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config key '{key}' {msg}")


# other frameworks' names for keys, which no spelling distance finds
_SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "beta1": "betas", "beta2": "betas",
             "epsilon": "eps", "max_steps": "steps", "num_epochs": "epochs",
             "gradient_accumulation_steps": "accumulate", "max_grad_norm": "grad_clip",
             "clip_grad_norm": "grad_clip", "warmup": "warmup_steps", "bs": "batch_size"}


# keys of a section that users write at the top level: where they belong
_PLACED = {"lr": "optimizer.lr", "learning_rate": "optimizer.lr",
           "momentum": "optimizer.momentum", "weight_decay": "optimizer.weight_decay",
           "betas": "optimizer.betas", "batch_size": "data.batch_size",
           "bs": "data.batch_size", "shuffle": "data.shuffle", "drop_last": "data.drop_last",
           "warmup_steps": "schedule.warmup_steps", "max_norm": "grad_clip.max_norm",
           "max_grad_norm": "grad_clip.max_norm", "label_smoothing": "loss.label_smoothing",
           "ignore_index": "loss.ignore_index", "cuda_graph": "gpu.cuda_graph",
           "bucket_mb": "distributed.bucket_mb", "sync_batchnorm": "distributed.sync_batchnorm"}


def _suggest(word: str, options: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    if not close and isinstance(word, str):  # (GPU for gpu)
        close = [o for o in options if isinstance(o, str) and o.lower() == word.lower()][:1]
    if not close and _SYNONYMS.get(word) in options:
        close = [_SYNONYMS[word]]
    return f"; did you mean '{_join(prefix, close[0])}'?" if close else ""


def _typed(ok: Callable[[Any], bool], text: str) -> Callable[[Any, str, Path], Any]:
    def conv(v: Any, key: str, base: Path) -> Any:
        if ok(v):
            return v
        raise _err(key, f"must be {text}, got {_got(v)}")
    return conv


_whole = _typed(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")


def _int(v: Any, key: str, base: Path) -> int:
    v = _whole(v, key, base)
    if not -2 ** 63 <= v < 2 ** 63:  # (the values reach NumPy and ONNX attributes)
        raise _err(key, f"must be within int64's range (|value| < 2^63), got {v}")
    return v


_bool = _typed(lambda v: isinstance(v, bool), "true or false")
_str = _typed(lambda v: isinstance(v, str) and v != "", "a non-empty string")


def _float(v: Any, key: str, base: Path) -> float:
    # YAML 1.1 reads "1e-3" as a string, so numeric strings are accepted.
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if math.isfinite(x):
            return x
    raise _err(key, f"must be a finite number, got {_got(v)}")


def _path(v: Any, key: str, base: Path) -> Path:
    if not (isinstance(v, os.PathLike) or (isinstance(v, str) and v)):
        raise _err(key, f"must be a path string, got {_got(v)}")
    if "\0" in os.fspath(v):  # (the system takes no such name: an internal error later)
        raise _err(key, f"holds a NUL character, which no file name can: {os.fspath(v)!r}")
    try:
        p = Path(v).expanduser()
    except RuntimeError:  # "~user" of an unknown user
        raise _err(key, f"names a home directory that does not exist: {v!r}") from None
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _file(v: Any, key: str, base: Path) -> Path:
    """A path that names a file: one written as a folder (a trailing separator, as in
    `outdir/`) was written to as a file named `outdir`."""
    p = _path(v, key, base)
    text = os.fspath(v)
    if text.endswith(("/", os.sep)) or os.path.basename(text) in (".", ".."):
        leaf = key.rsplit(".", 1)[-1]
        example = {"metrics": "metrics.jsonl", "path": "data.npz"}.get(leaf, "model.onnx")
        raise _err(key, f"names a folder ({text!r}); give a file path such as "
                        f"{os.path.join(text, example)!r}")
    return p


def _names(v: Any, key: str, base: Path) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise _err(key, f"must be a list of names or glob patterns, got {_got(v)}")
    return tuple(_str(x, f"{key}[{i}]", base) for i, x in enumerate(v))


def _auto_bool(v: Any, key: str, base: Path) -> bool | str:
    if isinstance(v, bool) or v == "auto":
        return v
    raise _err(key, f"must be true, false or auto, got {_got(v)}")


def _trainable(v: Any, key: str, base: Path) -> tuple[str, ...] | str:
    if v == "all":
        return "all"
    if not isinstance(v, (list, tuple)) or not v:
        raise _err(key, f"must be 'all' or a non-empty list of names/globs, got {_got(v)}")
    return _names(v, key, base)


def _batchnorm(v: Any, key: str, base: Path) -> tuple[str, ...] | str:
    if v in ("train", "eval"):
        return v
    if not isinstance(v, (list, tuple)) or not v:
        raise _err(key, "must be 'train', 'eval' or a list of globs naming the BatchNormalization "
                   f"layers (by scale initializer) to keep in eval form, got {_got(v)}")
    return _names(v, key, base)


def _mapping(v: Any, key: str, base: Path) -> FrozenMap:
    if not isinstance(v, Mapping):
        raise _err(key, f"must be a mapping of name -> array key, got {_got(v)}")
    return FrozenMap({_str(k, f"{key} (a key)", base): _str(x, _join(key, str(k)), base)
                      for k, x in v.items()})


@dataclass(frozen=True)
class ConstantInput:
    """A graph input fed the same value at every step (data.constants): `value` (a number or
    nested tuples of numbers), or a tensor of `shape` (ints, and "batch" for the local batch
    size) filled with `fill`."""
    value: Any = None
    shape: tuple[int | str, ...] | None = None
    fill: float = 0.0


def _number(v: Any, key: str) -> int | float | bool:
    if isinstance(v, (bool, int)):
        return v
    if isinstance(v, (float, str)):
        try:
            return float(v)  # (YAML 1.1 reads "1e-3" as a string)
        except ValueError:
            pass
    raise _err(key, f"must be a number, got {_got(v)}")


def _finite(v: Any, key: str) -> int | float | bool:
    """A number fed to the model as it is: NaN and Inf are refused as in the datasets."""
    v = _number(v, key)
    if not math.isfinite(v):
        raise _err(key, f"must be a finite number, got {v}")
    return v


def _nested(v: Any, key: str) -> Any:
    """A number or (nested) lists of numbers of a rectangular shape, every one finite."""
    if isinstance(v, (list, tuple)):
        items = tuple(_nested(x, f"{key}[{i}]") for i, x in enumerate(v))
        shapes = [_shape_of(x) for x in items]
        for i, sh in enumerate(shapes[1:], 1):
            if sh != shapes[0]:
                raise _err(key, f"must be a rectangular list (every entry of one shape, as "
                           f"an array): entry 0 has shape {list(shapes[0])}, entry {i} "
                           f"{list(sh)}")
        return items
    return _finite(v, key)


def _shape_of(v: Any) -> tuple[int, ...]:
    return (len(v), *(_shape_of(v[0]) if v else ())) if isinstance(v, tuple) else ()


def _constants(v: Any, key: str, base: Path) -> FrozenMap:
    """data.constants: {graph input: a number | a list | {shape: [...], fill: number}}."""
    if not isinstance(v, Mapping):
        raise _err(key, "must be a mapping of graph input -> value (a number, a list, or "
                        f"{{shape: [...], fill: 0}}), got {_got(v)}")
    out = {}
    for name, spec in v.items():
        k = _join(key, _str(name, f"{key} (a key)", base))
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"shape", "fill"}
            if unknown or "shape" not in spec:
                raise _err(k, "must be a number, a list, or {shape: [...], fill: number}"
                           + (f"; unknown key '{sorted(unknown)[0]}'"
                              + _suggest(str(sorted(unknown)[0]), ["shape", "fill"], k)
                              if unknown else
                              "; 'shape' is missing"))
            shape = spec["shape"]
            if not isinstance(shape, (list, tuple)) or not all(
                    d == "batch" or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                    for d in shape):
                raise _err(f"{k}.shape", "must be a list of sizes (integers >= 0, or 'batch' "
                           f"for the batch size of each process), got {_got(shape)}")
            out[name] = ConstantInput(shape=tuple(shape),
                                      fill=_finite(spec.get("fill", 0), f"{k}.fill"))
        else:
            out[name] = ConstantInput(value=_nested(spec, k))
    return FrozenMap(out)


def _class_weights(v: Any, key: str, base: Path) -> tuple[float, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v:
        raise _err(key, f"must be a list of one number per class, got {_got(v)}")
    out = tuple(_float(x, f"{key}[{i}]", base) for i, x in enumerate(v))
    bad = next((i for i, x in enumerate(out) if x < 0), None)
    if bad is not None:
        raise _err(key, f"must hold numbers >= 0, got {out[bad]} at [{bad}]")
    return out


def _betas(v: Any, key: str, base: Path) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _err(key, f"must be a list of two numbers, got {_got(v)}")
    return (_float(v[0], f"{key}[0]", base), _float(v[1], f"{key}[1]", base))


_POS = (lambda v: v > 0, "must be > 0")
_NONNEG = (lambda v: v >= 0, "must be >= 0")
_GE1 = (lambda v: v >= 1, "must be >= 1")
_NONEMPTY = (lambda v: len(v) > 0, "must not be empty")
_UNIT = (lambda v: all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")


def _k(conv: Any, default: Any = MISSING, **meta: Any) -> Any:
    """Declare a config key. conv: a converter or a section dataclass. meta: choices, check
    (predicate, text), nullable, only (section types the key is valid for), required_for
    (section types needing it), default_fn ((values so far, base_dir) -> default), factory."""
    factory = meta.pop("factory", MISSING)
    return field(default=default, default_factory=factory, metadata={"conv": conv, **meta})


# --- schema --------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "nadam", "radam", "lamb")
SCHEDULES = ("constant", "step", "multistep", "exponential", "linear", "cosine", "cosine_restarts",
             "polynomial", "onecycle", "plateau")
_SGD, _ADAM = ("sgd",), ("adam", "adamw")


@dataclass(frozen=True)
class DatasetConfig:
    path: Path = _k(_path)  # (a .npz or .npy file, or a folder of <key>.npy)
    inputs: Mapping[str, str] = _k(_mapping, check=_NONEMPTY)
    targets: Mapping[str, str] = _k(_mapping, factory=FrozenMap)

    def __post_init__(self) -> None:  # freeze plain dicts given by direct construction
        for name in ("inputs", "targets"):
            object.__setattr__(self, name, FrozenMap(getattr(self, name)))


@dataclass(frozen=True)
class DataConfig:
    train: DatasetConfig = _k(DatasetConfig)
    eval: DatasetConfig | None = _k(DatasetConfig, None, nullable=True)
    batch_size: int = _k(_int, 32, check=_POS)
    shuffle: bool = _k(_bool, True)
    drop_last: bool = _k(_bool, True)
    # gather the next batch in a background thread; auto: for memory-mapped data or batches of
    # 1 MiB or more (a thread costs more than gathering a small in-memory batch)
    prefetch: bool | str = _k(_auto_bool, "auto")
    # device: gpu: keep the training set on the GPU and gather each batch there (no host copy
    # per step); auto: when it is in memory (not memory-mapped) and at most 1 GiB
    on_device: bool | str = _k(_auto_bool, "auto")
    # graph inputs fed the same value at every step rather than from the dataset (a sample
    # rate, a recurrent model's initial state: {shape: [2, batch, 128], fill: 0})
    constants: Mapping[str, ConstantInput] = _k(_constants, factory=FrozenMap)


@dataclass(frozen=True)
class LossConfig:
    type: str = _k(_str, choices=("cross_entropy", "mse", "bce", "ctc", "output"))
    output: str = _k(_str)
    target: str | None = _k(_str, None, only=("cross_entropy", "mse", "bce", "ctc"),
                            required_for=("cross_entropy", "mse", "bce", "ctc"))
    class_axis: int = _k(_int, -1, only=("cross_entropy",))
    ignore_index: int = _k(_int, -100, only=("cross_entropy",))
    # cross_entropy: torch's label_smoothing, the target a mix of the label (1 - e) and the
    # uniform distribution over the classes (e)
    label_smoothing: float = _k(_float, 0.0, only=("cross_entropy",),
                                check=(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    # cross_entropy: torch's weight, one number per class (a weighted mean over the labels)
    weight: tuple[float, ...] | None = _k(_class_weights, None, only=("cross_entropy",))
    # ctc: the blank class (the output is [N, T, classes]; labels [N, S], ended by a negative)
    blank: int = _k(_int, 0, only=("ctc",), check=(lambda v: v >= 0, "must be >= 0"))
    # ctc: 1 for outputs [N, T, classes], 0 for time-major ones [T, N, classes] (torch's layout)
    time_axis: int = _k(_int, 1, only=("ctc",), check=(lambda v: v in (0, 1), "must be 0 or 1"))
    # ctc: the target (a key of data.*.targets) holding each sample's count of valid time steps
    # of the output (torch's input_lengths; padded sequences); default: every step counts
    lengths: str | None = _k(_str, None, only=("ctc",))
    # bce: the output holds logits (torch's BCEWithLogitsLoss), not probabilities; a model
    # ending in Sigmoid needs no flag (its logits are found and used)
    logits: bool = _k(_bool, False, only=("bce",))


# torch.optim's defaults where they depend on the type (torch 2.x: SGD's lr is 1e-3, as the
# README promises; it was 0.1 here, 100x torch's); LAMB's follow the paper's BERT setting
# (eps 1e-6, weight decay 0.01).
_DEFAULT_LR = {"rmsprop": 1e-2, "adagrad": 1e-2, "adadelta": 1.0, "nadam": 2e-3}
_DEFAULT_EPS = {"adagrad": 1e-10, "adadelta": 1e-6, "lamb": 1e-6}
_DEFAULT_WD = {"adamw": 1e-2, "lamb": 1e-2}
_BETAS = _ADAM + ("nadam", "radam", "lamb")
_WITH_EPS = tuple(t for t in OPTIMIZERS if t != "sgd")
# Keys set once for the whole optimizer (switches; Adagrad's initial accumulator, which torch
# takes from the constructor for every group); a group may set any other key of its type.
OPTIMIZER_WIDE = ("nesterov", "amsgrad", "centered", "decoupled_weight_decay", "maximize",
                  "initial_accumulator_value")
_CLOSED_UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_OPEN_UNIT = (lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)")
_START = (lambda v: 0 < v <= 1, "must be in (0, 1]")


def _milestones(v: Any, key: str, base: Path) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise _err(key, f"must be a non-empty list of step numbers, got {_got(v)}")
    out = tuple(_int(x, f"{key}[{i}]", base) for i, x in enumerate(v))
    for i, x in enumerate(out):
        if x < 1:
            raise _err(f"{key}[{i}]", f"must be >= 1, got {x}")
    return out


@dataclass(frozen=True)
class OptimizerGroup:
    """One entry of optimizer.groups: parameter globs (the first matching group wins) and the
    settings that replace the top-level ones for those parameters."""

    params: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", FrozenMap(self.settings))


def _groups(v: Any, key: str, base: Path) -> tuple[OptimizerGroup, ...]:
    """Structure only; the settings are checked against the optimizer type in _check_optimizer."""
    if not isinstance(v, (list, tuple)):
        raise _err(key, f"must be a list of mappings like {{params: '*.bias', weight_decay: 0}}, "
                   f"got {_got(v)}")
    out = []
    for i, g in enumerate(v):
        k = f"{key}[{i}]"
        if not isinstance(g, Mapping):
            raise _err(k, f"must be a mapping like {{params: '*.bias', weight_decay: 0}}, "
                       f"got {_got(g)}")
        if g.get("params") is None:
            typo = next((str(n) for n in g
                         if n != "params" and difflib.get_close_matches(str(n), ["params"])), None)
            raise _err(_join(k, "params"), "is required (a glob or a list of globs over "
                       "parameter names)" + (f"; '{_join(k, typo)}' is unknown: did you mean "
                                             "'params'?" if typo else ""))
        p = g["params"]
        params = (_str(p, _join(k, "params"), base),) if isinstance(p, str) else \
            _names(p, _join(k, "params"), base)
        if not params:
            raise _err(_join(k, "params"), "must not be empty")
        out.append(OptimizerGroup(params, {n: x for n, x in g.items() if n != "params"}))
    return tuple(out)


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = _k(_str, "sgd", choices=OPTIMIZERS)
    # (0 as torch allows: the steps then change BatchNorm's running statistics only, a
    # recalibration of a model's statistics on new data)
    lr: float = _k(_float, 1e-3, check=_NONNEG,
                   default_fn=lambda v, b: _DEFAULT_LR.get(v["type"], 1e-3))
    momentum: float = _k(_float, 0.0, check=_NONNEG, only=("sgd", "rmsprop"))
    nesterov: bool = _k(_bool, False, only=_SGD)
    dampening: float = _k(_float, 0.0, check=_NONNEG, only=_SGD)
    weight_decay: float = _k(_float, 0.0, check=_NONNEG,
                             default_fn=lambda v, b: _DEFAULT_WD.get(v["type"], 0.0))
    betas: tuple[float, float] = _k(_betas, (0.9, 0.999), check=_UNIT, only=_BETAS)
    eps: float = _k(_float, 1e-8, check=_NONNEG, only=_WITH_EPS,
                    default_fn=lambda v, b: _DEFAULT_EPS.get(v["type"], 1e-8))
    amsgrad: bool = _k(_bool, False, only=_ADAM)
    alpha: float = _k(_float, 0.99, check=_CLOSED_UNIT, only=("rmsprop",))
    centered: bool = _k(_bool, False, only=("rmsprop",))
    lr_decay: float = _k(_float, 0.0, check=_NONNEG, only=("adagrad",))
    initial_accumulator_value: float = _k(_float, 0.0, check=_NONNEG, only=("adagrad",))
    rho: float = _k(_float, 0.9, check=_CLOSED_UNIT, only=("adadelta",))
    momentum_decay: float = _k(_float, 4e-3, check=_NONNEG, only=("nadam",))
    decoupled_weight_decay: bool = _k(_bool, False, only=("adam", "nadam", "radam"))
    maximize: bool = _k(_bool, False)
    groups: tuple[OptimizerGroup, ...] = _k(_groups, ())


_WARMUP = tuple(s for s in SCHEDULES if s != "onecycle")  # one-cycle warms up by itself
_ONECYCLE, _PLATEAU = ("onecycle",), ("plateau",)


@dataclass(frozen=True)
class ScheduleConfig:
    type: str = _k(_str, "constant", choices=SCHEDULES)
    warmup_steps: int = _k(_int, 0, check=_NONNEG, only=_WARMUP)
    # (None: not given, 0 for every type but linear from a start_factor below 1, whose end is
    # then the lr, torch's LinearLR warm-up; an explicit 0 decays it to 0)
    min_lr: float | None = _k(_float, None, nullable=True, check=_NONNEG,
                              only=("linear", "cosine", "cosine_restarts", "plateau"))
    step_size: int | None = _k(_int, None, check=_POS, only=("step",), required_for=("step",))
    milestones: tuple[int, ...] = _k(_milestones, (), only=("multistep",),
                                     required_for=("multistep",))
    gamma: float = _k(_float, 0.1, check=_POS, only=("step", "multistep", "exponential"),
                      required_for=("exponential",))
    start_factor: float = _k(_float, 1.0, check=_START, only=("linear",))
    end_factor: float | None = _k(_float, None, nullable=True, check=_CLOSED_UNIT,
                                  only=("linear",))
    total_iters: int | None = _k(_int, None, nullable=True, check=_POS,
                                 only=("linear", "polynomial"))
    power: float = _k(_float, 1.0, check=_POS, only=("polynomial",))
    T_0: int | None = _k(_int, None, check=_POS, only=("cosine_restarts",),
                         required_for=("cosine_restarts",))
    T_mult: int = _k(_int, 1, check=_GE1, only=("cosine_restarts",))
    max_lr: float | None = _k(_float, None, nullable=True, check=_POS, only=_ONECYCLE)
    pct_start: float = _k(_float, 0.3, check=_CLOSED_UNIT, only=_ONECYCLE)
    anneal_strategy: str = _k(_str, "cos", choices=("cos", "linear"), only=_ONECYCLE)
    div_factor: float = _k(_float, 25.0, check=_POS, only=_ONECYCLE)
    final_div_factor: float = _k(_float, 1e4, check=_POS, only=_ONECYCLE)
    three_phase: bool = _k(_bool, False, only=_ONECYCLE)
    cycle_momentum: bool = _k(_bool, True, only=_ONECYCLE)
    base_momentum: float = _k(_float, 0.85, check=_CLOSED_UNIT, only=_ONECYCLE)
    max_momentum: float = _k(_float, 0.95, check=_CLOSED_UNIT, only=_ONECYCLE)
    metric: str = _k(_str, "eval_loss", choices=("eval_loss", "eval_accuracy"), only=_PLATEAU)
    # auto: max for accuracy, else min, as best.mode and early_stop.mode (torch's default is
    # min: with metric eval_accuracy, every rise of the accuracy counted against it)
    mode: str = _k(_str, "auto", choices=("auto", "min", "max"), only=_PLATEAU)
    factor: float = _k(_float, 0.1, check=_OPEN_UNIT, only=_PLATEAU)
    patience: int = _k(_int, 10, check=_NONNEG, only=_PLATEAU)
    threshold: float = _k(_float, 1e-4, check=_NONNEG, only=_PLATEAU)
    threshold_mode: str = _k(_str, "rel", choices=("rel", "abs"), only=_PLATEAU)
    cooldown: int = _k(_int, 0, check=_NONNEG, only=_PLATEAU)


@dataclass(frozen=True)
class GradClipConfig:
    max_norm: float = _k(_float, check=_POS)


_GROW = (lambda v: v >= 1, "must be >= 1 (1: the scale never grows)")
_BACKOFF = (lambda v: 0 < v <= 1, "must be in (0, 1]")


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling of `precision: fp16` (torch.amp.GradScaler's defaults): the loss is
    multiplied by the scale before the backward and the gradients divided by it after; a step
    whose gradients overflow float16 is skipped and the scale multiplied by backoff_factor;
    after growth_interval good steps in a row it is multiplied by growth_factor."""
    init: float = _k(_float, 65536.0, check=(
        # (float32's normal range: smaller ones round to 0, where 1 / scale fails)
        lambda v: 1.1754943508222875e-38 <= v <= 3.4028234663852886e38,
        "must be at least 1.2e-38 and at most 3.4e38 (the scale is a float32, in its normal "
        "range; torch's GradScaler refuses larger ones too)"))
    growth_factor: float = _k(_float, 2.0, check=_GROW)
    backoff_factor: float = _k(_float, 0.5, check=_BACKOFF)
    growth_interval: int = _k(_int, 2000, check=_GE1)
    dynamic: bool = _k(_bool, True)  # false: the scale stays `init` (non-finite: on_nan)


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Path | None = _k(_path, None, nullable=True)
    every_steps: int = _k(_int, 0, check=_NONNEG)
    keep: int = _k(_int, 2, check=_GE1)


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = _k(_int, 10, check=_GE1)
    metrics: Path | None = _k(_file, None, nullable=True)
    tensorboard: Path | None = _k(_path, None, nullable=True)  # a folder for event files


@dataclass(frozen=True)
class DistributedConfig:
    backend: str = _k(_str, "auto", choices=("auto", "mpi", "nccl"))
    bucket_mb: float = _k(_float, 25.0, check=_POS)
    overlap: bool = _k(_bool, True)
    compress: str | None = _k(_str, None, nullable=True, choices=("bf16", "fp16"))
    timeout_s: float = _k(_float, 300.0, check=_POS)
    sync_batchnorm: bool = _k(_bool, False)
    shard_optimizer: bool = _k(_bool, False)  # ZeRO-1: each rank keeps 1/N of the state
    # every N steps: all ranks hold the same bits of every trained tensor (0: never)
    check_consistency_every: int = _k(_int, 0, check=_NONNEG)


@dataclass(frozen=True)
class GpuConfig:
    # capture each planned training step (forward and backward) as one CUDA graph, launched
    # with one call from the second step of a batch shape on (not with Dropout; README)
    cuda_graph: bool = _k(_bool, False)


_MODES = ("auto", "min", "max")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = _k(_int, 0, check=_NONNEG)    # 0: not by steps
    every_epochs: int = _k(_int, 1, check=_NONNEG)   # 0: not by epochs (the end always is)


@dataclass(frozen=True)
class BestConfig:
    metric: str = _k(_str, "eval_loss")
    mode: str = _k(_str, "auto", choices=_MODES)     # auto: max for accuracy, else min


@dataclass(frozen=True)
class EarlyStopConfig:
    patience: int = _k(_int, check=_GE1)             # evaluations without improvement
    metric: str = _k(_str, "eval_loss")
    mode: str = _k(_str, "auto", choices=_MODES)
    min_delta: float = _k(_float, 0.0, check=_NONNEG)


@dataclass(frozen=True, kw_only=True)
class Config:
    model: Path = _k(_file)
    output: Path = _k(_file, default_fn=lambda v, b: b / "runs" / v["model"].stem / "model.onnx")
    seed: int = _k(_int, 0, check=_NONNEG)
    device: str = _k(_str, "auto", choices=("auto", "cpu", "gpu"))
    precision: str = _k(_str, "fp32", choices=("fp32", "fp64", "tf32", "bf16", "fp16"))
    loss_scale: LossScaleConfig | None = _k(LossScaleConfig, None, nullable=True)  # fp16 only
    data: DataConfig = _k(DataConfig)
    loss: LossConfig = _k(LossConfig)
    trainable: tuple[str, ...] | str = _k(_trainable, "all")
    frozen: tuple[str, ...] = _k(_names, ())
    batchnorm: tuple[str, ...] | str = _k(_batchnorm, "train")
    output_form: str = _k(_str, "model", choices=("model", "inference"))
    optimizer: OptimizerConfig = _k(OptimizerConfig, factory=OptimizerConfig)
    schedule: ScheduleConfig = _k(ScheduleConfig, factory=ScheduleConfig)
    grad_clip: GradClipConfig | None = _k(GradClipConfig, None, nullable=True)
    accumulate: int = _k(_int, 1, check=_GE1)
    steps: int | None = _k(_int, None, nullable=True, check=_POS)
    epochs: int | None = _k(_int, None, nullable=True, check=_POS)
    checkpoint: CheckpointConfig = _k(CheckpointConfig, factory=CheckpointConfig)
    log: LogConfig = _k(LogConfig, factory=LogConfig)
    distributed: DistributedConfig = _k(DistributedConfig, factory=DistributedConfig)
    gpu: GpuConfig = _k(GpuConfig, factory=GpuConfig)
    eval: EvalConfig = _k(EvalConfig, factory=EvalConfig)
    best: BestConfig | None = _k(BestConfig, None, nullable=True)
    early_stop: EarlyStopConfig | None = _k(EarlyStopConfig, None, nullable=True)
    on_nan: str = _k(_str, "stop", choices=("stop", "skip"))
    # BLAS/OpenMP threads per process; null: this process's share of the node's cores
    threads: int | None = _k(_int, None, nullable=True, check=_POS)
    # refuse to start when the pre-flight memory estimate exceeds the device's free memory
    memory_check: bool = _k(_bool, True)
    config_path: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)


# --- generic validator ---------------------------------------------------------------------------


def _check_optimizer(v: dict[str, Any], key: str) -> None:
    if v.get("nesterov") and (v["momentum"] <= 0 or v["dampening"] != 0):
        raise _err(_join(key, "nesterov"), "requires momentum > 0 and dampening 0")
    kind, specs = v["type"], {f.name: f for f in fields(OptimizerConfig)}
    settable = [n for n in v if n not in ("type", "groups") + OPTIMIZER_WIDE]
    groups = []
    for i, group in enumerate(v["groups"]):
        gkey = f"{_join(key, 'groups')}[{i}]"
        settings = {}
        for name, raw in group.settings.items():
            skey = _join(gkey, str(name))
            if name in OPTIMIZER_WIDE and name in v:
                raise _err(skey, f"applies to the whole optimizer: set {_join(key, name)} "
                           "instead of a per-group value")
            if name not in settable:
                valid = ", ".join(["params"] + settable)
                what = f"is not valid for optimizer type '{kind}'" if name in specs else \
                    "is unknown"
                raise _err(skey, f"{what} in a group{_suggest(str(name), settable, gkey)} "
                           f"(valid: {valid})")
            if raw is None:
                raise _err(skey, "must be a value, got null (leave the key out to use "
                           f"{_join(key, name)})")
            settings[name] = _value(specs[name], {name: raw}, skey, Path(), v, kind)
        groups.append(OptimizerGroup(group.params, settings))
    v["groups"] = tuple(groups)


def _check_schedule(v: dict[str, Any], key: str) -> None:
    if v["type"] == "linear" and v["end_factor"] is not None and v["min_lr"] is not None:
        raise ConfigError(f"config keys '{_join(key, 'end_factor')}' and "
                          f"'{_join(key, 'min_lr')}': give at most one of them (the end of the "
                          "linear decay, relative or absolute)")


def _check_config(v: dict[str, Any], key: str) -> None:
    if v["loss_scale"] is not None and v["precision"] != "fp16":
        raise _err("loss_scale", f"scales float16 gradients; precision is '{v['precision']}' "
                   "(set precision: fp16, or remove loss_scale)")
    if (v["steps"] is None) == (v["epochs"] is None):
        got = "neither" if v["steps"] is None else "both"
        raise ConfigError(f"config keys 'steps' and 'epochs': give exactly one of them, got {got}"
                          + (" (on the command line, drop the file's with --set epochs=null or "
                             "--set steps=null)" if got == "both" else ""))
    data = v["data"]
    for name, ds in (("train", data.train), ("eval", data.eval)):
        both = [k for k in (ds.targets if ds is not None else ()) if k in ds.inputs]
        if both:  # (one name for an input and a target: the target took the input's place,
            # and step 1 said the input was not provided)
            raise _err(f"data.{name}.targets", f"names '{both[0]}', which data.{name}.inputs "
                       "names too (a model input): give the loss target another name in "
                       f"data.{name}.targets and loss.target (e.g. '{both[0]}_target: "
                       f"{ds.targets[both[0]]}'); both may read the same array")
    for key, target in (("loss.target", v["loss"].target), ("loss.lengths", v["loss"].lengths)):
        for name, ds in (("train", data.train), ("eval", data.eval)):
            if target is not None and ds is not None and target not in ds.targets:
                have = ", ".join(ds.targets) or "none"
                raise _err(key, f"is '{target}', which is not a key of data.{name}.targets "
                           f"({have}){_suggest(target, list(ds.targets))}")
    if v["loss"].lengths is not None and v["loss"].lengths == v["loss"].target:
        raise _err("loss.lengths", f"is '{v['loss'].lengths}', the labels' own target: name the "
                   "target holding each sample's count of valid time steps")
    for what in ("best", "early_stop"):
        section = v.get(what)
        if section is None:
            continue
        if data.eval is None:
            raise _err(what, "needs data.eval (an evaluation set)")
        known = ["eval_loss"] + (["eval_accuracy"] if v["loss"].type == "cross_entropy" else [])
        if section.metric not in known:
            raise _err(f"{what}.metric", f"is '{section.metric}', which is not an evaluation "
                       f"metric of this run (use one of {', '.join(known)})"
                       + _suggest(section.metric, known))
    sched = v["schedule"]
    if sched.type == "plateau":
        if data.eval is None:
            raise _err("schedule.type", "is 'plateau', which follows an evaluation metric: it "
                       "needs data.eval")
        if sched.metric == "eval_accuracy" and v["loss"].type != "cross_entropy":
            raise _err("schedule.metric", "is 'eval_accuracy', which only cross_entropy runs "
                       "report (use eval_loss)")


_POST_CHECKS: dict[type, Callable[[dict[str, Any], str], None]] = {
    OptimizerConfig: _check_optimizer, ScheduleConfig: _check_schedule, Config: _check_config}


def _value(f: dataclasses.Field, raw: Mapping, key: str, base: Path, values: dict[str, Any],
           kind: str | None) -> Any:
    meta, conv, v = f.metadata, f.metadata["conv"], raw.get(f.name)
    if v is None and f.name in raw and meta.get("nullable"):
        return None
    if v is None:  # absent (or null where null is not a value): required or default
        if kind in meta.get("required_for", ()):
            raise _err(key, f"is required for {key.rsplit('.', 2)[-2]} type '{kind}'")
        if "default_fn" in meta:
            return meta["default_fn"](values, base)
        if f.default is not MISSING:
            return f.default
        if f.default_factory is MISSING:
            raise _err(key, "is required")
        return _build(conv, {}, key, base) if is_dataclass(conv) else f.default_factory()
    v = _build(conv, v, key, base) if is_dataclass(conv) else conv(v, key, base)
    choices = meta.get("choices")
    if choices and v not in choices:
        raise _err(key, f"must be one of {', '.join(choices)}; got {v!r}{_suggest(v, choices)}")
    check = meta.get("check")
    if check and not check[0](v):
        raise _err(key, f"{check[1]}, got {dict(v) if isinstance(v, Mapping) else v!r}")
    return v


# a section given as its one usual value (`optimizer: adam`): the mapping it stands for
_SHORTHAND = {"optimizer": "type", "schedule": "type", "loss": "type", "grad_clip": "max_norm",
              "early_stop": "patience", "checkpoint": "dir", "best": "metric"}


def _build(cls: type, raw: Any, key: str, base: Path, **extra: Any) -> Any:
    if not isinstance(raw, Mapping):
        field = _SHORTHAND.get(key)
        if field and isinstance(raw, str | int | float) and not isinstance(raw, bool):
            raise _err(key, f"must be a mapping, got {_got(raw)}: write "
                       f"{key}: {{{field}: {raw}}}")
        raise _err(key, f"must be a mapping, got {_got(raw)}")
    specs = {f.name: f for f in fields(cls) if "conv" in f.metadata}
    kind = None
    if "type" in specs:
        kind = _value(specs["type"], raw, _join(key, "type"), base, {}, None)
    allowed = [n for n, f in specs.items() if kind in f.metadata.get("only", [kind])]
    for k in raw:
        name = _join(key, str(k))
        if k in allowed or (k in specs and raw[k] is None):  # (null: left out, as its
            continue  # default; `--set optimizer.momentum=null` when switching type)
        if k in specs:
            valid = ", ".join(n for n in allowed if n != "type")
            raise _err(name, f"is not valid for {key.rsplit('.', 1)[-1]} type '{kind}' "
                       f"(valid: {valid})")
        hint = _suggest(str(k), allowed, key) or f" (valid: {', '.join(allowed)})"
        placed = _PLACED.get(str(k)) if not key else None
        if placed:  # (a section's key written at the top: `lr: 0.1` for optimizer.lr)
            section, field = placed.split(".")
            hint = (f" at the top level: it is '{placed}' ({section}: {{{field}: "
                    f"{json.dumps(raw[k], default=str)}}})")
        raise _err(name, f"is unknown{hint}")
    values: dict[str, Any] = {"type": kind} if kind is not None else {}
    for n in allowed:
        if n not in values:
            values[n] = _value(specs[n], raw, _join(key, n), base, values, kind)
    if cls in _POST_CHECKS:
        _POST_CHECKS[cls](values, key)
    return cls(**values, **extra)


# --- public entry points -------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(text).split())


_MAX_VALUES = 100_000  # values of a config with its aliases expanded (a real one has hundreds)
_MAX_DEPTH = 64  # nesting of mappings and lists


def _no_duplicate_keys(node, seen_nodes: set) -> None:
    """Refuse a key given twice in one mapping of the composed YAML (the last would win)."""
    if id(node) in seen_nodes:  # (an alias: checked where it is defined)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in lines and key != "<<":
                raise ConfigError(f"config key '{key}' is given twice (lines {lines[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            lines[key] = key_node.start_mark.line + 1
            _no_duplicate_keys(value_node, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, seen_nodes)


_MAX_TEXT = 1 << 20  # characters of a config (a real one has a few thousand)
# libyaml's parser where PyYAML has it (the same safe constructor, ten times faster to parse)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(text: str) -> Any:
    """yaml.safe_load(text), with a key given twice in one mapping refused and nesting that
    exhausts the parser's recursion named; parsed once (the duplicate check reads the composed
    nodes that are then constructed)."""
    if len(text) > _MAX_TEXT:  # (parsing megabytes of YAML takes minutes: say so at once)
        raise ConfigError(f"config is {len(text) / 2**20:.0f} MiB of text; a config is a few "
                          f"hundred values (at most {_MAX_TEXT >> 20} MiB are read): is it a "
                          "data file? Data goes in .npz/.npy files named by data.train.path")
    loader = _SAFE_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:  # (an empty document)
            return None
        _no_duplicate_keys(node, set())
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError("config nested too deeply to read") from None
    except yaml.YAMLError as exc:  # (libyaml's own nesting limit)
        if "maximum nesting depth" in str(exc):
            raise ConfigError("config nested too deeply to read") from None
        raise
    except ValueError as exc:  # (an integer of more digits than Python converts: 4300)
        if "integer string conversion" not in str(exc):
            raise
        raise ConfigError("config holds an integer too long to read (more than "
                          f"{sys.get_int_max_str_digits()} digits); no setting takes one of "
                          "that size") from None
    finally:
        loader.dispose()


def _plain(x: Any, count: list | None = None, depth: int = 0) -> Any:
    """Deep copy of the YAML-like tree with every mapping as a plain dict (overrides edit it);
    aliases are copied out, within _MAX_VALUES values and _MAX_DEPTH levels (nine nested
    aliases of ten make a billion: a few hundred bytes that never finish loading)."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > _MAX_VALUES or depth > _MAX_DEPTH:
        raise ConfigError(f"config holds more than {_MAX_VALUES} values or {_MAX_DEPTH} levels "
                          "of nesting once its YAML aliases are expanded; a config is a few "
                          "hundred values")
    if isinstance(x, Mapping):
        return {k: _plain(v, count, depth + 1) for k, v in x.items()}
    return [_plain(v, count, depth + 1) for v in x] if isinstance(x, list) else x


def apply_override(raw: dict, override: str) -> None:
    """Set raw[a][b][c] = yaml.safe_load(value) for "a.b.c=value", creating missing sections;
    a part that is a number indexes a list (optimizer.groups.0.lr=0.01)."""
    key, sep, text = override.partition("=")
    parts, quoted = _key_parts(key)
    if not sep or not all(parts):
        raise ConfigError(f"malformed override {override!r}: expected key.path=value")
    if not text.strip():  # (read as null, it would silently mean the key's default)
        raise ConfigError(f"override {override!r} gives no value; write the value after '=' "
                          "(null: the key's default, or no section)")
    try:
        value = _plain(_yaml(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: invalid YAML value: {_one_line(exc)}") from exc
    node = raw
    in_list = False  # (below a list's item: null there leaves the key out, as at the top)
    i = 0
    while i < len(parts):
        part = parts[i]
        if isinstance(node, dict) and not quoted[i]:
            # a key with dots in its name that the config has (TorchScript's input names:
            # data.train.inputs.input.1=x): the longest one of the parts that follow
            for j in range(len(parts), i + 1, -1):
                if not any(quoted[i:j]) and ".".join(parts[i:j]) in node:
                    parts[i:j], quoted[i:j] = [".".join(parts[i:j])], [True]
                    part = parts[i]
                    break
            else:
                # an entry of data.*.inputs/targets maps a name to an array key, nothing
                # nested: the parts that follow are its name's, dots and all (a new
                # data.eval.inputs.input.1=x was read as item 1 of a list)
                if re.fullmatch(r"data\.(train|eval)\.(inputs|targets)",
                                ".".join(map(str, parts[:i]))) and not any(quoted[i:]):
                    parts[i:], quoted[i:] = [".".join(parts[i:])], [True]
                    part = parts[i]
        key: str | int = part
        if isinstance(node, list):  # (an item of a list by its index: optimizer.groups.0.lr)
            if not (re.fullmatch(r"[0-9]+", part) and int(part) < len(node)):
                span = f"0 to {len(node) - 1}" if node else "the list is empty"
                raise _err(".".join(parts[:i]), f"is a list of {len(node)} item(s), and "
                           f"{part!r} is not an index of one ({span}); cannot apply "
                           f"{override!r} (or give the whole list as the value)")
            key, in_list = int(part), True
        if i == len(parts) - 1:
            named = re.fullmatch(r"data\.(train|eval)\.(inputs|targets)|data\.constants",
                                 ".".join(map(str, parts[:i])))
            if value is None and (in_list or named) and isinstance(node, dict):
                # (an entry of a mapping the user names, as an item's key: null leaves it out)
                node.pop(key, None)
            else:
                node[key] = value
            break
        if isinstance(node, dict) and node.get(key) is None:
            # (an index into a list the config does not set: said where the list is checked,
            # after the key's name is)
            node[key] = _NoList(".".join(parts[: i + 1]), parts[i + 1]) \
                if re.fullmatch(r"[0-9]+", parts[i + 1]) else {}
        elif not isinstance(node[key], (dict, list)):
            raise _err(".".join(parts[: i + 1]), f"is not a mapping; cannot apply {override!r}")
        node = node[key]
        i += 1


def _key_parts(key: str) -> tuple[list[str], list[bool]]:
    """The parts of an override's key path split at dots, where a part in double quotes keeps
    its dots (data.train.inputs."input.1"); and which parts were quoted ([""]: unbalanced)."""
    parts, quoted, part, was_quoted, inside = [], [], "", False, False
    for ch in key + ".":
        if ch == '"':
            inside, was_quoted = not inside, True
        elif ch == "." and not inside:
            parts.append(part if was_quoted else part.strip())
            quoted.append(was_quoted)
            part, was_quoted = "", False
        else:
            part += ch
    return ([""], [False]) if inside else (parts, quoted)


def config_from_dict(raw: Mapping, base_dir: str | os.PathLike,
                     overrides: Sequence[str] = ()) -> Config:
    """Validate a raw mapping (as read from YAML); relative paths resolve against base_dir."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config must be a mapping at the top level, got {_got(raw)}")
    if not isinstance(base_dir, str | os.PathLike):
        raise ConfigError(f"config_from_dict: base_dir is the folder relative paths resolve "
                          f"from (a str or path), got {type(base_dir).__name__}")
    raw = _plain(raw)
    # (one override as a string: iterated, it was its characters, "malformed override 'e'")
    for override in [overrides] if isinstance(overrides, str) else overrides:
        apply_override(raw, override)
    base = Path(base_dir).expanduser().absolute()
    return _build(Config, raw, "", base, config_path=None, base_dir=base)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file (yaml.safe_load only), apply "key.path=value" overrides, validate."""
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        if p.exists() and not p.is_dir():  # (a pipe, /dev/stdin: read once, in no folder)
            raise ConfigError(f"config {p} is not a regular file (a pipe or a device): write "
                              "the config to a file (its relative paths resolve from its "
                              "folder, and each process reads it)")
        raise ConfigError(f"config file not found: {p}" + (
            " (it is a directory)" if p.is_dir() else ""))
    kind = {".onnx": "an ONNX model", ".npz": "a dataset", ".npy": "a dataset"}.get(
        p.suffix.lower())
    if kind:
        raise ConfigError(f"{p} is {kind}, not a YAML config: the config names it (model: or "
                          "data.train.path:) with the loss and optimizer; "
                          "`onnx-trainer check MODEL.onnx` reads a model alone (README, 'A "
                          "config')")
    try:
        raw = _yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config file {p}: {_one_line(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {_one_line(exc)}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {_got(raw)}")
    return dataclasses.replace(config_from_dict(raw, p.parent, overrides), config_path=p)


# --- threads -------------------------------------------------------------------------------------
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE",
                    "SLURM_NTASKS_PER_NODE")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def local_processes() -> int:
    """Processes of this job on this node, from the launcher's environment (1 if unknown)."""
    for var in _LOCAL_SIZE_VARS:
        text = os.environ.get(var, "")
        digits = text[:len(text) - len(text.lstrip("0123456789"))]
        if digits and int(digits) > 0:
            return int(digits)
    return 1


def usable_cores() -> int:
    """The cores this process may run on (a cpuset, taskset, srun -c bind it to fewer than
    the node has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """BLAS threads for this process: `threads` if given, else its share of the node's cores
    (the cores it may run on, divided among the node's processes; when the launcher already
    binds it to fewer cores than the node has, those are its share)."""
    if threads is not None:
        return int(threads)
    total, mine = os.cpu_count() or 1, usable_cores()
    if mine < total:
        return max(1, mine)
    return max(1, mine // local_processes())


_SET_BY_US = "ONNX_TRAINER_THREADS"  # marks thread variables the CLI set itself


def thread_environment(threads: int | None) -> dict[str, str]:
    """The environment variables that set BLAS/OpenMP threads before NumPy loads its BLAS:
    all of them for an explicit `threads`; for the default, only those the user left unset."""
    n = str(resolve_threads(threads))
    out = {var: n for var in THREAD_VARS if threads is not None or var not in os.environ}
    if out:
        out[_SET_BY_US] = n
    return out


def blas_threads(threads: int | None) -> tuple[int, str]:
    """(BLAS threads for this process, where the number comes from): the config's `threads`,
    else a count the user set in the environment, else the process's share of the cores."""
    if threads is not None:
        return int(threads), "threads"
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        text = os.environ.get(var, "").strip()
        if text and text == os.environ.get(_SET_BY_US):
            continue  # the CLI's own default
        if text.isdigit() and int(text) > 0:
            return int(text), var
    return resolve_threads(None), "share of the cores"
