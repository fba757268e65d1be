"""The `onnx-trainer` command: train, check, grad, eval, ops, convert, plot (also
`python -m trainer`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from trainer import __version__
from trainer.errors import Interrupted, TrainerError


def _train(args) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, args.set or [])
    _thread_environment(cfg.threads)
    from trainer.train import ProfileRequest, Trainer

    profile = None
    if args.profile_trace:
        from trainer.train import check_paths
        check_paths(cfg, lambda fn, *a: fn(*a), [(Path(args.profile_trace), "--profile-trace")])
    if args.profile is not None or args.profile_trace or args.profile_warmup is not None:
        warmup = 3 if args.profile_warmup is None else args.profile_warmup
        profile = ProfileRequest(steps=args.profile or 10, warmup=warmup,
                                 trace=Path(args.profile_trace) if args.profile_trace else None)
    Trainer(cfg).fit(resume=args.resume, profile=profile)
    return 0


def at_least(low: float, kind: type = int):
    """An argparse type: a number of `kind` (int by default) of at least `low` (the bench
    scripts use it too)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def above(low: float):
    """An argparse type: a number greater than `low`."""
    def parse(text: str) -> float:
        value = at_least(float("-inf"), float)(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"{value} is not above {low}")
        return value
    return parse


def _thread_environment(threads: int | None) -> None:
    """BLAS/OpenMP threads through the environment, set before NumPy loads its BLAS (the
    trainer also limits them at run time where it can, see trainer.train.limit_threads)."""
    import os

    from trainer.config import thread_environment

    os.environ.update(thread_environment(threads))


def _is_config(path: str) -> bool:
    """A YAML config (by its suffix, or a first line that is not ONNX's binary)."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return True
    if p.suffix.lower() == ".onnx" or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 20)  # (a config is small text; a model is binary protobuf)
        text = head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if "model" not in text:
        return False
    import yaml

    from trainer.config import ConfigError, _yaml
    try:
        return isinstance(_yaml(text), dict)
    except (yaml.YAMLError, ConfigError, ValueError):  # (too deep, too long an integer)
        return "model:" in text  # (a config with a YAML error: the config loader names it)


def _check(args) -> int:
    p = Path(args.model)
    if _is_config(args.model) or p.exists() and not p.is_file() and not p.is_dir():
        return _check_config(args)  # (a pipe or device: the config loader says what it is)
    if Path(args.model).suffix.lower() in (".npz", ".npy"):
        raise TrainerError(f"{args.model} is a dataset, not a model or a config: check takes "
                           "MODEL.onnx or CONFIG.yaml (the config names the dataset)")
    from trainer.graph import load_model
    from trainer.report import model_report

    report = model_report(load_model(args.model))
    print(report.text())
    if getattr(args, "world", None) not in (None, 1):
        print(f"note: --world {args.world} applies to check CONFIG (the pre-flight of a run "
              "on that many processes); a model alone has no processes")
    if getattr(args, "set", None):
        print(f"note: --set applies to check CONFIG (it overrides a config's keys); a model "
              f"alone has none: {', '.join(args.set)} ignored")
    return 0 if report.ok else 1


def _check_config(args) -> int:
    """The pre-flight report of a config (what `train` prints first) with the model's support
    table; non-zero when training could not start."""
    from trainer.config import load_config

    cfg = load_config(args.model, args.set or [])
    _thread_environment(cfg.threads)
    from trainer.comm import launched_world_size
    from trainer.memory import load_structure, strip
    from trainer.report import model_report, preflight

    try:
        print(model_report(strip(load_structure(cfg.model))).text())
        print()
    except TrainerError:
        pass  # the pre-flight report names the problem
    from trainer.backend import get_xp
    from trainer.graph import load_model

    # (the model's values are read only where shapes alone leave the estimate incomplete:
    # control flow to lower, shapes computed from values; as training itself does)
    pf = preflight(cfg, world=args.world or launched_world_size(), xp=get_xp(cfg.device),
                   full_model=lambda: load_model(cfg.model), values=True,
                   keep_folders=False)
    print(pf.text())
    return 1 if pf.problems else 0


def _ops(args) -> int:
    import json

    from trainer.report import support_table

    rows = support_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(f"{r['domain']}:{r['op']}" if r["domain"] else r["op"]) for r in rows)
    print(f"{'op':<{width}}  {'forward (since opset)':<24} gradient")
    for r in rows:
        name = f"{r['domain']}:{r['op']}" if r["domain"] else r["op"]
        fwd = ", ".join(map(str, r["forward"])) or "MISSING"
        print(f"{name:<{width}}  {fwd:<24} {r['gradient']}")
    with_fwd = [r for r in rows if r["forward"]]
    rules = sum(r["gradient"] == "rule" for r in rows)
    print(f"{len(rows)} ops: {len(with_fwd)} with a forward kernel, {rules} with a gradient "
          f"rule, {sum(r['gradient'] == 'not differentiable' for r in rows)} not differentiable")
    return 0


# A config's keys in the training graph's errors, and the `grad` flags that set them
_GRAD_FLAGS = (("batchnorm: eval", "--frozen-batchnorm"), ("set loss.class_axis to",
               "give --class-axis"), ("set loss.class_axis:", "give --class-axis"),
               ("loss.class_axis", "--class-axis"), ("leave logits out", "leave --logits out"),
               ("with logits: true", "with --logits"),
               ("give each process batches of at least 2 samples", "give --batch-size 2 or more"))


def _grad(args) -> int:
    from trainer.autodiff import build_training_graph
    from trainer.contrib import lower_contrib
    from trainer.graph import load_model
    from trainer.unfuse import unfuse_conv_batchnorms

    _a_model(args.model, "grad")

    model = unfuse_conv_batchnorms(lower_contrib(load_model(args.model), inplace=True),
                                   inplace=True)[0]
    # As `train` does: the exporter's merged tensors given back, and its folded copies (a tied
    # output projection's transpose, a view) and lookups computed from their source, so that
    # the source's gradient holds every use of it
    from trainer.autodiff.lookups import lookups_line, tie_folded_lookups
    from trainer.autodiff.params import repair_exported_model, tie_folded_copies
    from trainer.report import tied_line

    repair_exported_model(model)
    notes = []
    lookups = tie_folded_lookups(model)
    if lookups:
        notes.append(lookups_line(lookups))
    notes += [tied_line(c, src, kind) for c, (src, kind) in tie_folded_copies(model).items()]
    from trainer.errors import listing
    from trainer.report import CORNERS_HINT, fractional_corner_resizes
    corners = fractional_corner_resizes(model)
    if corners:  # (onnxruntime runs them otherwise: its loss is not the gradients' function)
        print(f"WARNING: {CORNERS_HINT}; onnxruntime computes the loss of the training graph "
              f"their way and its gradients the spec's: {listing(corners)}")
    if args.precision in ("bf16", "fp16"):  # (as `train` computes: its compute form first)
        from trainer.autocast import autocast, precision_line
        from trainer.graph import float_types
        from trainer.train import compute_form

        own = float_types(model)
        model = compute_form(model, args.precision)
        if own - float_types(model):
            notes.append(f"the model's {listing(sorted(own - float_types(model)))} values are "
                         "float32 in this graph, as `train` computes them (its export rounds "
                         "the trained values back)")
        model, cast, total = autocast(model, args.precision)
        notes.append(precision_line(model, args.precision, cast, total))
    shapes = {}
    for item in args.shape or []:
        name, sep, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep or not name or min(shapes.get(name, (1,))) < 1:
            raise TrainerError(f"--shape {item!r}: expected NAME=D1,D2,... (integers of at "
                               "least 1)")
    inputs = [vi.name for vi in model.graph.input
              if vi.name not in {t.name for t in model.graph.initializer}]
    for name in shapes:
        if name not in inputs:
            raise TrainerError(f"--shape {name}=...: the model has no input '{name}' (its "
                               f"inputs: {', '.join(inputs)})")
        vi = next(v for v in model.graph.input if v.name == name)
        if vi.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in vi.type.tensor_type.shape.dim]
            if len(dims) != len(shapes[name]):
                raise TrainerError(f"--shape {name}={','.join(map(str, shapes[name]))}: the "
                                   f"model's input '{name}' has {len(dims)} dimension(s) "
                                   f"{dims}; give every one")
            fixed = [(i, d, g) for i, (d, g) in enumerate(zip(dims, shapes[name], strict=True))
                     if isinstance(d, int) and d > 0 and d != g]
            if fixed:
                i, d, g = fixed[0]
                raise TrainerError(f"--shape {name}={','.join(map(str, shapes[name]))}: the "
                                   f"model fixes dimension {i} of '{name}' at {d}, not {g}"
                                   + (" (onnx-trainer convert --dynamic-batch makes a fixed "
                                      "batch symbolic)" if i == 0 else ""))
        if args.batch_size and shapes[name] and shapes[name][0] != args.batch_size:
            raise TrainerError(f"--shape {name}=... starts with {shapes[name][0]}, but "
                               f"--batch-size is {args.batch_size}: give one of them")
    _shapes_by_dim_names(model, inputs, shapes, args.batch_size)
    if args.batch_size:
        for vi in model.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if vi.name in inputs and vi.name not in shapes and dims and \
                    dims[0].HasField("dim_value") and dims[0].dim_value not in (0, args.batch_size):
                raise TrainerError(f"--batch-size {args.batch_size}: the model fixes the batch "
                                   f"dimension of '{vi.name}' at {dims[0].dim_value} (onnx-"
                                   "trainer convert --dynamic-batch makes it symbolic)")
    out = _output_path(args.o, args.model, "-o")
    from dataclasses import fields

    from trainer.config import LossConfig
    given = {"class_axis": args.class_axis, "blank": args.blank, "time_axis": args.time_axis,
             "lengths": args.lengths, "logits": args.logits or None,
             "ignore_index": args.ignore_index, "label_smoothing": args.label_smoothing,
             "weight": args.weight}
    for f in fields(LossConfig):  # (a flag of another loss type: refused, as the config does)
        only = f.metadata.get("only")
        if given.get(f.name) is not None and only and args.loss not in only:
            raise TrainerError(f"--{f.name.replace('_', '-')} applies to --loss "
                               f"{' or '.join(only)}, not {args.loss}")
    loss = {"type": args.loss, "output": args.output, "target": args.target,
            "class_axis": -1 if args.class_axis is None else args.class_axis,
            "blank": args.blank or 0, "time_axis": 1 if args.time_axis is None else args.time_axis,
            "lengths": args.lengths, "from_logits": args.logits}
    if args.ignore_index is not None:
        loss["ignore_index"] = args.ignore_index
    if args.label_smoothing is not None:
        if not 0 <= args.label_smoothing <= 1:
            raise TrainerError(f"--label-smoothing {args.label_smoothing:g} must be in [0, 1]")
        loss["label_smoothing"] = args.label_smoothing
    if args.weight is not None:
        try:
            loss["weight"] = [float(w) for w in args.weight.split(",")]
        except ValueError:
            raise TrainerError(f"--weight {args.weight}: give one number per class, "
                               "separated by commas (--weight 1,2.5,0.5)") from None
        if any(not math.isfinite(w) or w < 0 for w in loss["weight"]):
            raise TrainerError(f"--weight {args.weight}: the weights must be finite numbers "
                               ">= 0")
    try:
        tm = build_training_graph(model, loss,
                                  args.trainable or "all", batch_size=args.batch_size or 1,
                                  shapes=shapes,
                                  batchnorm="eval" if args.frozen_batchnorm else "train")
    except TrainerError as exc:  # (the advice in this command's words: its flags)
        text = str(exc)
        for key, flag in _GRAD_FLAGS:
            text = text.replace(key, flag)
        if text == str(exc):
            raise
        raise type(exc)(text) from None
    # fp16: the backward's seed (1) is an input with that default, so that a runtime may feed
    # it the loss scale (onnxruntime warns of an initializer that is an input: fp16 only)
    import onnx

    from trainer.autodiff.build import training_info
    seed = training_info(tm).seed
    if args.precision == "fp16" and seed not in {vi.name for vi in tm.graph.input}:
        init = next(t for t in tm.graph.initializer if t.name == seed)
        tm.graph.input.append(onnx.helper.make_tensor_value_info(seed, init.data_type, []))
    from trainer.export import save_model
    from trainer.graph import external_data_files
    save_model(tm, out, keep=[Path(args.model), *external_data_files(Path(args.model))])
    print(f"wrote {out}: {len(tm.graph.node)} nodes ({len(model.graph.node)} forward)")
    if args.precision == "fp16":
        notes.append(f"the backward starts from input '{seed}' (1 unless fed): feed it the loss "
                     "scale and divide the gradients by it, as `train`'s dynamic loss scaling "
                     "does")
    for line in notes:
        print(f"note: {line}")
    fed = [vi.name for vi in tm.graph.input if vi.name not in {
        i.name for i in model.graph.input} and not vi.name.endswith("_grad") and vi.name != seed]
    if args.loss != "output" and args.target not in fed:
        print(f"note: the model already has a tensor named '{args.target}', so the loss target "
              f"is an input of another name ({', '.join(fed)}); give --target a free name")
    from trainer.kernels import CUSTOM_DOMAIN

    own = sorted({n.op_type for n in tm.graph.node if n.domain == CUSTOM_DOMAIN})
    if own:
        print(f"note: it holds {CUSTOM_DOMAIN} ops ({', '.join(own)}): onnx-trainer's executor "
              "runs them, onnxruntime does not")
    return 0


def _evaluate(args) -> int:
    from trainer.config import load_config

    cfg = _trains_nothing(load_config(args.config, args.set or []))
    if cfg.data.eval is None:
        raise TrainerError("eval needs data.eval in the config")
    _thread_environment(cfg.threads)
    from trainer.train import Trainer

    if args.model and args.checkpoint is not None:
        raise TrainerError("eval takes --model or --checkpoint, not both")
    if args.model:  # (that file as it is: its graph and every one of its tensors)
        import dataclasses

        cfg = dataclasses.replace(cfg, model=Path(args.model).resolve())
    # (--json: stdout holds the one JSON object; the run's notes go to stderr)
    trainer = Trainer(cfg, check=False, writes=False, stream=sys.stderr if args.json else None)
    if args.checkpoint is not None:  # (the config's model with a checkpoint's values)
        path = trainer.load_checkpoint(_checkpoint_place(args.checkpoint, cfg, "eval"))
        trainer.log.info(f"evaluating {path} (step {trainer.step})")
    metrics = trainer.evaluate()
    if trainer.rank == 0:  # (under mpirun: one line, as train's)
        if args.json:
            import json
            import math

            # (a non-finite value is null, as in log.metrics: Infinity and NaN are no JSON)
            print(json.dumps({k: float(v) if math.isfinite(v) else None
                              for k, v in metrics.items()}, allow_nan=False))
        else:
            print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _checkpoint_place(given: str | None, cfg, command: str) -> Path:
    """--checkpoint PATH (a checkpoint folder, or a checkpoint.dir: its newest), or, given
    without a path, the config's checkpoint.dir."""
    if given:
        return Path(given)
    if cfg.checkpoint.dir is None:
        how = f"{command} --checkpoint without a path" if command != "export" or \
            given is not None else "export without --checkpoint"
        raise TrainerError(f"{how} reads the config's checkpoint.dir, which it does not set; "
                           "give the checkpoint folder (--checkpoint PATH)")
    return Path(cfg.checkpoint.dir)


def _trains_nothing(cfg):
    """The config of a command that builds a Trainer but trains nothing (eval, export): the
    training set stays on the host (data.on_device would copy all of it to the GPU first)."""
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_device=False))


def _export(args) -> int:
    from trainer.config import load_config

    cfg = _trains_nothing(load_config(args.config, args.set or []))
    _thread_environment(cfg.threads)
    from trainer.train import Trainer

    where = _checkpoint_place(args.checkpoint, cfg, "export")
    what = "-o" if args.o else "output"
    out = _output_path(args.o or str(cfg.output), str(cfg.model), what)
    from trainer import preflight

    # (nothing the export reads: the config, the model, the datasets, the checkpoints)
    reads = preflight.files_read(cfg)
    if where.is_dir():
        reads.update((f, f"a file of checkpoint {f.parent}") for f in where.rglob("*")
                     if f.is_file())
    preflight.not_read(out, what, reads)
    from trainer.errors import DataError

    try:
        trainer = Trainer(cfg, check=False, writes=False)
    except DataError as exc:
        if "dataset file not found" not in str(exc):
            raise
        raise DataError(f"{exc}: export reads the samples' shapes of data.eval (else of "
                        "data.train), at which the training graph that lays out the "
                        "parameters is built; give the config a file of a few samples of "
                        "those shapes if the data is elsewhere") from None
    path = trainer.load_checkpoint(where)
    if trainer.rank == 0:
        written = trainer.export(out)
        print(f"wrote {written}: the model with the values of {path} (step {trainer.step})")
    return 0


def _shapes_by_dim_names(model, inputs: list[str], shapes: dict, batch: int | None) -> None:
    """`grad --shape`: a symbolic dimension the model names in several inputs ('N', a batch
    axis they share) takes one value: a shape given for one input gives it to the others
    (they were built at batch 1, or --batch-size, and broadcast one sample over the batch);
    two shapes that give it different values are refused. Inputs whose every dimension is
    then known are added to `shapes`."""
    def dims(name):
        vi = next(v for v in model.graph.input if v.name == name)
        if not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim]

    bound: dict[str, tuple[int, str, int]] = {}  # dim name -> (value, input, axis)
    for name, shape in shapes.items():
        for axis, (d, v) in enumerate(zip(dims(name) or [], shape, strict=False)):
            if isinstance(d, str):
                if d in bound and bound[d][0] != v:
                    w, other, oaxis = bound[d]
                    raise TrainerError(f"--shape {other}=... and --shape {name}=... give the "
                                       f"model's dimension '{d}' ({other}'s axis {oaxis}, "
                                       f"{name}'s axis {axis}) the sizes {w} and {v}: give it "
                                       "one size")
                bound.setdefault(d, (v, name, axis))
    if batch and any(b[2] == 0 and b[0] != batch for b in bound.values()):
        return  # (said by the --batch-size check above)
    for name in inputs:
        if name in shapes or not bound:
            continue
        own = dims(name)
        if not own:
            continue
        known = [d if isinstance(d, int) and d > 0 else bound[d][0]
                 if isinstance(d, str) and d in bound else None for d in own]
        if known and known[0] is None and batch:
            known[0] = batch
        if own and any(isinstance(d, str) and d in bound for d in own) and None not in known:
            shapes[name] = tuple(known)


def _output_path(out: str, model: str, what: str) -> Path:
    """An output path a command may write: a file (its folder made), not the model it reads
    nor its external data files."""
    from trainer import preflight
    from trainer.graph import external_data_files

    if out.endswith(("/", os.sep)):
        raise TrainerError(f"{what} {out} names a folder; give a file path such as "
                           f"{os.path.join(out, 'model.onnx')}")
    out = Path(out)
    preflight.not_read(out, what, {Path(model): "the model file itself",
                                   **{f: "an external data file of the model"
                                      for f in external_data_files(model)}})
    preflight.writable_file(out, what)
    return out


def _a_model(path: str, command: str) -> None:
    """`path`, given to a command that takes a model, is not a config (protobuf's "Wire
    format was corrupt" said nothing)."""
    if _is_config(path):
        raise TrainerError(f"{path} is a config, not a model: {command} takes MODEL.onnx (the "
                           "config's `model`)")


def _convert(args) -> int:
    from trainer.convert import convert_file

    _a_model(args.model, "convert")
    if not args.trainable_constants:  # (options of the constants' conversion, else unused)
        given = [f for f, v in (("--seed", args.seed), ("--reinit", args.reinit or None),
                                ("--names", args.names)) if v is not None]
        if given:
            raise TrainerError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} "
                               "to --trainable-constants (the weights of constant nodes it "
                               "makes trainable); add it, or leave "
                               f"{'it' if len(given) == 1 else 'them'} out")
    seed = 0 if args.seed is None else args.seed
    _output_path(args.o, args.model, "-o")
    report = convert_file(args.model, args.o, trainable_constants=args.trainable_constants,
                          dynamic_batch=args.dynamic_batch, seed=seed, reinit=args.reinit,
                          names=args.names or "tensor")
    for line in report.lines(seed):
        print(line)
    print(f"wrote {args.o}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print a traceback with every error")
    p = argparse.ArgumentParser(prog="onnx-trainer", description="Train ONNX models.",
                                parents=[common])
    p.add_argument("--version", action="version", version=f"onnx-trainer {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common],
                       help="train the model of a YAML config and export it")
    t.add_argument("config")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=0.05 (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in checkpoint.dir")
    t.add_argument("--profile", type=at_least(1), nargs="?", const=10, default=None,
                   metavar="STEPS",
                   help="after the warm-up, time STEPS steps (default 10) and print the slowest "
                        "nodes, communication and optimizer time")
    t.add_argument("--profile-warmup", type=at_least(0), default=None, metavar="STEPS",
                   help="steps run before the profiled ones (default 3); implies --profile")
    t.add_argument("--profile-trace", metavar="OUT.json",
                   help="also write the profile as a Chrome trace (Perfetto-viewable); implies "
                        "--profile")
    t.set_defaults(fn=_train)
    c = sub.add_parser("check", parents=[common],
                       help="a model: every op with its forward/gradient support; a config: the "
                            "pre-flight report (parameters, memory, data, steps, problems)")
    c.add_argument("model", metavar="MODEL_OR_CONFIG")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (with a config)")
    c.add_argument("--world", type=at_least(1), default=None, metavar="N",
                   help="number of processes to plan for (with a config; default: this "
                        "launch's)")
    c.set_defaults(fn=_check)
    g = sub.add_parser("grad", parents=[common],
                       help="write the training graph (forward+loss+backward) as ONNX")
    g.add_argument("model")
    g.add_argument("--loss", default="cross_entropy",
                   choices=["cross_entropy", "mse", "bce", "ctc", "output"])
    g.add_argument("--output", required=True, help="model output the loss reads")
    g.add_argument("--target", default="label", help="name of the loss target input")
    g.add_argument("--class-axis", type=int, default=None)
    g.add_argument("--blank", type=int, default=None, help="ctc: the blank class")
    g.add_argument("--logits", action="store_true",
                   help="bce: the output holds logits (no Sigmoid at the end)")
    g.add_argument("--ignore-index", type=int, default=None,
                   help="cross_entropy: the label to ignore (default -100)")
    g.add_argument("--label-smoothing", type=float, default=None, metavar="E",
                   help="cross_entropy: torch's label_smoothing, in [0, 1] (default 0)")
    g.add_argument("--weight", default=None, metavar="W1,W2,...",
                   help="cross_entropy: a weight per class (torch's weight)")
    g.add_argument("--time-axis", type=int, choices=[0, 1], default=None,
                   help="ctc: 1 for outputs [batch, time, classes], 0 for [time, batch, classes]")
    g.add_argument("--lengths", default=None, metavar="NAME",
                   help="ctc: an input of each sample's count of valid time steps")
    g.add_argument("--batch-size", type=at_least(1), default=None,
                   help="value for a symbolic batch (first) dimension (default 1)")
    g.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                   help="full shape of an input with other symbolic dims (repeatable)")
    g.add_argument("--trainable", nargs="*", help="initializer names/globs (default: all)")
    g.add_argument("--frozen-batchnorm", action="store_true",
                   help="keep BatchNormalization statistics fixed (inference form)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16/fp16: the float32 matrix products in bfloat16/float16, as "
                        "`precision: bf16`/`fp16` trains")
    g.add_argument("-o", required=True, help="path of the training graph to write")
    g.set_defaults(fn=_grad)
    o = sub.add_parser("ops", parents=[common],
                       help="the support table: forward kernels and gradients of every op")
    o.add_argument("--json", action="store_true", help="print the table as JSON")
    o.set_defaults(fn=_ops)
    e = sub.add_parser("eval", parents=[common], help="evaluate on the config's data.eval")
    e.add_argument("config")
    e.add_argument("--model", help="trained .onnx to evaluate (default: the config's model)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.batch_size=256 (repeatable)")
    e.add_argument("--checkpoint", nargs="?", const="", default=None, metavar="PATH",
                   help="evaluate the config's model with a checkpoint's values (a step_N "
                        "folder, or a checkpoint.dir: its newest; no PATH: the config's "
                        "checkpoint.dir)")
    e.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object, at full precision")
    e.set_defaults(fn=_evaluate)
    x = sub.add_parser("export", parents=[common],
                       help="write the config's model with a checkpoint's values, as train "
                            "exports it")
    x.add_argument("config")
    x.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a step_N folder, or a checkpoint.dir: its newest (default: the "
                        "config's checkpoint.dir)")
    x.add_argument("-o", default=None, metavar="OUT.onnx",
                   help="where to write it (default: the config's output)")
    x.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set output=trained.onnx (repeatable)")
    x.set_defaults(fn=_export)
    v = sub.add_parser("convert", parents=[common],
                       help="rewrite a model for training (weights of constant nodes, batch axis)")
    v.add_argument("model")
    v.add_argument("--trainable-constants", action="store_true",
                   help="weights made by ConstantOfShape/Constant nodes become initializers")
    v.add_argument("--dynamic-batch", action="store_true",
                   help="make a fixed first (batch) dimension of the inputs symbolic")
    v.add_argument("--seed", type=at_least(0), default=None,
                   help="seed of the fresh initialization (default 0)")
    v.add_argument("--reinit", action="store_true",
                   help="re-initialize Constant weights too (default: keep their values)")
    v.add_argument("--names", choices=["tensor", "consumer"], default=None,
                   help="initializer names: the tensor's own (default) or <node>.<input>")
    v.add_argument("-o", required=True, help="path of the converted model to write")
    v.set_defaults(fn=_convert)
    from trainer import plot

    pl = sub.add_parser("plot", parents=[common],
                        help="loss/eval/lr curves of metrics JSONL files as an image")
    plot.add_arguments(pl)
    pl.set_defaults(fn=plot.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        code = args.fn(args)
        if sys.stdout is not None:  # (None: started with stdout closed)
            sys.stdout.flush()  # (here, where a closed pipe is caught, not at exit)
        return code
    except Interrupted as exc:  # SIGINT/SIGTERM after a complete step: every rank exits so
        from trainer.comm import launched_rank
        if launched_rank() == 0:  # (as the run's other lines: each of N ranks printed it)
            print(f"onnx-trainer: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except TrainerError as exc:
        from trainer.config import ConfigError
        return _fail(f"onnx-trainer: error: {exc}", 2, traceback_too=debug,
                     everywhere=isinstance(exc, ConfigError))
    except KeyboardInterrupt:
        return _fail("onnx-trainer: interrupted", 130, traceback_too=debug)
    except MemoryError as exc:  # (sizes beyond the machine: --batch-size 1e11, a constant's
        what = f" ({exc})" if str(exc) else ""  # shape, a dataset's header)
        return _fail(f"onnx-trainer: error: out of memory{what}: an array of the sizes given "
                     "does not fit this machine; lower data.batch_size (grad: --batch-size, "
                     "--shape) or the shapes in data.constants (`onnx-trainer check CONFIG` "
                     "estimates what a run needs)", 2, traceback_too=debug)
    except BrokenPipeError:  # (`onnx-trainer ops | head`: the reader stopped reading)
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no flush error)
        return 141  # (128 + SIGPIPE, as other tools that write to a closed pipe)
    except OSError as exc:
        import errno
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return _fail(f"onnx-trainer: error: cannot write the terminal output: "
                         f"{exc.strerror}", 2, traceback_too=debug)  # (stdout or stderr)
        if exc.filename is None and exc.errno == errno.EIO:  # (a device or network file
            # system failing a read or write that names no file: a dataset's, the terminal's)
            return _fail("onnx-trainer: error: input/output error (EIO) of the system, in a "
                         "read or write of the data, the model, a checkpoint or the terminal: "
                         "check the disk or network file system (--debug shows where)", 2,
                         traceback_too=debug)
        return _fail(f"onnx-trainer: internal error (a bug in onnx-trainer, please report it "
                     f"with this traceback): {type(exc).__name__}: {exc}", 3,
                     traceback_too=True)
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: say so, end every rank
        return _fail(f"onnx-trainer: internal error (a bug in onnx-trainer, please report it "
                     f"with this traceback): {type(exc).__name__}: {exc}", 3,
                     traceback_too=True)


def _fail(message: str, code: int, traceback_too: bool = False, everywhere: bool = False
          ) -> int:
    """Print the error once and, under mpirun, end every rank of the job (no rank may wait
    forever in a collective for the one that failed). `everywhere`: an error every rank meets
    alike (the config's), which rank 0 alone prints."""
    import traceback

    from trainer.comm import launched_rank, launched_world_size

    world = launched_world_size()
    rank = launched_rank()
    if world > 1 and rank != 0:
        # When every rank fails the same way, rank 0 speaks and aborts the others before they
        # print; a failure on this rank alone is printed a moment later (3 s: at 1 s a loaded
        # machine printed such an error twice; a config's error is rank 0's to print). MPI
        # starts first: its start waits for every rank, so rank 0, failing alike before it had
        # started MPI (device: gpu without CuPy), could not end the others while they waited
        import time
        try:
            from mpi4py import MPI  # noqa: F401 - (importing it starts MPI)
        except Exception:  # noqa: BLE001 - no MPI here: the wait alone
            pass
        time.sleep(3.0)
        message = message.replace("onnx-trainer: ", f"onnx-trainer: rank {rank}: ", 1)
    if traceback_too:
        traceback.print_exc()
    if not (everywhere and world > 1 and rank != 0):
        print(message, file=sys.stderr, flush=True)
    if world > 1:
        from trainer.comm import abort_world
        abort_world(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
