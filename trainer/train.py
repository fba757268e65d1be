"""The training loop: data shard -> training graph -> gradient all-reduce -> optimizer -> export.

Parameters and gradients live in one flat buffer each (views per tensor); one training-graph plan
is built per local batch size and reused for every step of that shape. A pre-flight report (and
its memory estimate) comes first; `profile()` times the nodes, communication and optimizer.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trainer import checkpoint, preflight, report
from trainer.autocast import LossScaler, autocast, precision_line
from trainer.autodiff import build_training_graph, training_info
from trainer.autodiff.build import binary_probabilities, loss_output_of, softmax_logits
from trainer.autodiff.lookups import lookups_line, tie_folded_lookups
from trainer.autodiff.params import (
    detached_inputs,
    parameter_aliases,
    partly_packed,
    quantization_scales,
    repair_exported_model,
    shared_constants,
    single_bias_masks,
    tie_folded_copies,
    tied_perm,
    tool_folded_constants,
)
from trainer.backend import (
    bfloat16_problem,
    device_name,
    get_xp,
    memory_high_water,
    set_tf32,
    to_device,
    to_host,
)
from trainer.comm import get_communicator
from trainer.comm.base import padded_size
from trainer.comm.buckets import Buckets
from trainer.config import Config, LossScaleConfig, blas_threads
from trainer.contrib import contrib_counts, lower_contrib
from trainer.data import (
    Batches,
    DeviceUploads,
    check_against_model,
    check_input_keys,
    keep_on_device,
    load_arrays,
    prefetching,
)
from trainer.errors import (
    DataError,
    Interrupted,
    ModelError,
    NonFiniteLoss,
    TrainerError,
    UnsupportedOpError,
    listing,
)
from trainer.executor import Executor, SharedValues, missing_kernels
from trainer.export import beyond_range, export_model
from trainer.graph import (
    RECURRENT_OPSET,
    NameScope,
    all_names,
    attr_type_code,
    bake_inputs,
    constant_batch_hint,
    constant_inputs,
    constant_lookup,
    convert_floats,
    data_sizing_nodes,
    inference_form,
    inferred_dims,
    input_dtypes,
    inputs_for_initializers,
    is_float_dtype,
    lift_weights,
    load_model,
    needs_recurrent_opset,
    np_dtype,
    opset_of,
    stub_values,
    subgraph_weights,
    subgraph_weights_line,
    tensor_value,
    without_initializers,
)
from trainer.kernels.collective import collectives
from trainer.kernels.ctc import CTCLoss
from trainer.kernels.reduce import squares_finite
from trainer.memory import SHARED_MIN, human, is_stub, release_freed_memory, strip
from trainer.metrics import MetricsLogger
from trainer.optim import clip_grad_norm_, grad_norm, make_optimizer
from trainer.schedule import make_schedule
from trainer.unfuse import unfuse_conv_batchnorms, unfuse_line

SCALE_MIN = float(np.finfo(np.float32).eps)  # learned quantization scales: torch's clamp
HISTORY_ROWS = 10_000  # rows a Trainer keeps in memory (about 300 bytes each; Trainer._remember)


def data_dependent_hint(model: onnx.ModelProto) -> str:
    """What a failed step says where the model has nodes whose output size follows the data
    (a sparse mixture of experts picks each expert's tokens with NonZero): most gradients read
    such sizes at run time, but a rule that still holds one from the probe fails."""
    found = [f"{n.op_type} '{n.name or n.output[0]}'" for n in data_sizing_nodes(model)]
    if not found:
        return ""
    return (f"the model has {len(found)} node(s) whose output size follows the data ("
            + ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
            + "), as a sparse mixture of experts picks each expert's tokens or a batch is "
            "trimmed to its longest row, and a gradient "
            "on that path still holds a size from the run the training graph was built from "
            "(GraniteMoE's split by computed sizes does); export a dense form of the model "
            "(every expert on every token, weighted by the router's probabilities)")


@dataclass
class Plan:
    executor: Executor
    gradients: dict[str, str]
    state: dict[str, str]
    loss: str
    targets: dict[str, str]  # loss target -> training-graph input
    out_shape: tuple[int, ...]  # the loss output's shape at this batch size
    model: onnx.ModelProto  # the training graph (for diagnosis, e.g. the first NaN)
    seed: str = ""  # the initializer holding dLoss/dLoss
    # gradient name -> callback run on it after the executor's run (a CUDA graph holds no
    # Python callbacks: with one, the all-reduce and accumulation hooks run after its launch)
    after: dict[str, Callable] = field(default_factory=dict)


def _retyped(exc: TrainerError, text: str) -> TrainerError:
    """An error of exc's kind (one of the engine's own, else TrainerError) saying `text`."""
    kind = type(exc) if type(exc) in (TrainerError, ModelError, DataError,
                                      checkpoint.WriteError) else TrainerError
    return kind(text)


def _step_as_named(path: Path, meta: dict) -> None:
    """A manifest's step must be its folder's (step_N): an edited or mixed-up manifest would
    resume, or stamp an export, at another step than the weights it comes with."""
    named = path.name[len(checkpoint.PREFIX):] if path.name.startswith(checkpoint.PREFIX) \
        else ""
    step = meta.get("step")  # (one that is no integer is named as such by the callers)
    if named.isdigit() and isinstance(step, int) and int(named) != step:
        raise TrainerError(f"checkpoint {path} is damaged: its manifest says step "
                           f"{meta.get('step')}, its folder step {int(named)}")


class Trainer:
    """Trains the model of a Config; `fit()` runs the whole job and exports the result."""

    def __init__(self, cfg: Config, comm=None, stream=None, *, check: bool = True,
                 writes: bool = True):
        """`check`: print the pre-flight report first and stop on every problem it finds
        (paths, model support, data, memory) before anything large is allocated; `writes`:
        False where nothing is written (`onnx-trainer eval`: the output, checkpoint and log
        paths are not checked)."""
        if not isinstance(cfg, Config):
            raise TrainerError(f"Trainer takes a Config, got {type(cfg).__name__}: "
                               "trainer.config.load_config(path) reads a YAML file, "
                               "config_from_dict(raw, base_dir) a mapping")
        self.cfg = cfg
        self.threads = apply_threads(cfg.threads)
        self.xp = get_xp(cfg.device)
        if cfg.precision == "fp64" and self.xp is not np:
            raise TrainerError("precision fp64 is for CPU verification runs; set device: cpu")
        if cfg.precision == "bf16" and (why := bfloat16_problem(self.xp)):
            raise TrainerError(f"precision bf16 on a GPU: {why}; use fp16 or tf32 there, or "
                               "device: cpu")
        self.comm = comm or get_communicator(cfg.distributed.backend, cfg.distributed.timeout_s,
                                             device="cpu" if self.xp is np else "gpu")
        self.rank, self.world = self.comm.rank, self.comm.size
        if self.world > 1:
            self._agree_on_config()
        self.buckets = None  # gradient all-reduce buckets (several processes)
        self.times = dict.fromkeys(("step", "data", "graph", "communication", "optimizer"), 0.0)
        self._profiling = False
        self._last_feeds = None
        self._profile_request: ProfileRequest | None = None
        self._profile_from, self._profile_start = 0, (0, dict(self.times))
        self.profile_result: dict | None = None
        self._w, self._last_micro = 1.0, True  # weight and role of the running micro-batch
        # SyncBatchNorm: batch statistics over every rank (a no-op in one process).
        self.sync_bn = cfg.distributed.sync_batchnorm and self.world > 1
        # One micro-batch per step: gradient kernels write into the flat buffer themselves.
        self.direct_grads = cfg.accumulate == 1
        # The loss weight of a micro-batch enters the backward as its seed where the gradients
        # are not weighted on their way into the buffer (direct), or cross ranks in the graph,
        # or with fp16's loss scale (float16 gradients then overflow where GradScaler's do),
        # or bf16 or fp16: the 16-bit products of the backward round the weighted values, as
        # an autocast loop's `(loss / accumulate).backward()` and N processes' do (a weight
        # applied after them, 1/3 with accumulate 3, rounded otherwise)
        self.seed_weighted = self.direct_grads or self.sync_bn or cfg.precision in (
            "fp16", "bf16")
        self._graphs: dict[int, tuple] = {}
        self._seeds: dict[float, object] = {}
        self._graph_told: set[int] = set()  # batch sizes whose failed graph capture was logged
        kwargs = {"stream": stream} if stream is not None else {}
        self.log = MetricsLogger(cfg.log.metrics, self.rank == 0,
                                 tensorboard=cfg.log.tensorboard, **kwargs)
        if cfg.precision == "tf32" or self.xp is not np:  # (fp32 turns a TF32 setting off)
            products = set_tf32(self.xp, cfg.precision == "tf32")
            if cfg.precision == "tf32":
                self.log.info(f"precision tf32: {products}")
        self.preflight = None
        if check:
            self.preflight = report.preflight(cfg, world=self.world, xp=self.xp,
                                              full_model=lambda: load_model(cfg.model))
            for line in self.preflight.text().splitlines():
                self.log.info(line)
            self.preflight.raise_problems()
        if writes:
            self._check_paths()
        # (the models the checks loaded, some held by reference cycles, recursive helpers'
        # closures over their nodes: freed before this run loads its own, where that is worth
        # a full collection and a heap trim, 0.1-0.5 s in a large process)
        self._large = preflight.model_bytes(cfg) >= LARGE_MODEL_BYTES
        if self._large:
            gc.collect()
            release_freed_memory()
        self.model = load_model(cfg.model)
        missing = missing_kernels(self.model, lowered=True)
        if missing:  # every unsupported node, before any data is read
            raise UnsupportedOpError("forward kernel", missing)
        lifted = lift_weights(self.model)
        if lifted:
            self.log.info(f"{len(lifted)} float tensor(s) the exporter stored in subgraphs or "
                          "as Constant nodes are initializers of the main graph here (trained "
                          f"by the same rules, exported there): {', '.join(lifted[:4])}"
                          + (" ..." if len(lifted) > 4 else ""))
        inner = subgraph_weights(self.model)
        if inner:
            self.log.info(subgraph_weights_line(inner))
        # (said once the trained tensors are known: constants untied are no parameters)
        self._untied = repair_exported_model(self.model)
        # The model's values of SHARED_MIN elements or more are read once, into arrays; the
        # protos the set-up converts and builds from hold stubs in their place, read from the
        # arrays (graph.stub_values; see _stub_large_values)
        train_model, self._setup_values = _stub_large_values(self.model)
        with stub_values(self._setup_values):
            fused = contrib_counts(train_model)
            if fused:  # (raises, naming each node of a form it does not lower)
                lower_contrib(train_model, inplace=True)
                self.log.info("onnxruntime's fused nodes train as the standard ONNX ops they stand "
                              "for (the export keeps them): " + ", ".join(
                                  f"{op} x{k}" for op, k in sorted(fused.items())))
            _, unfused = unfuse_conv_batchnorms(train_model, inplace=True)
            if unfused:
                self.log.info(unfuse_line(unfused))
            if needs_recurrent_opset(self.model):
                self.log.info(f"the training graph is built from the model converted from "
                              f"opset {opset_of(self.model)} to {RECURRENT_OPSET} (the recurrent "
                              "gradient rules need opset 10); the export keeps the model's own "
                              "opset and nodes")
            for line in report.warning_lines(*report.exporter_findings(self.model)):
                self.log.info(line)
            # {folded tensor: Lookup}, exported from the trained table's rows
            self.lookups = tie_folded_lookups(train_model)
            if self.lookups:
                self.log.info(lookups_line(self.lookups))
            # {copy: (source, kind)}, exported from the trained source
            self.tied = tie_folded_copies(train_model)
            self._copy_shapes = {t.name: tuple(t.dims) for t in self.model.graph.initializer
                                 if t.name in self.tied}
            for copy_name, (src, kind) in self.tied.items():
                self.log.info(report.tied_line(copy_name, src, kind))
            run_model = compute_form(train_model, cfg.precision)
        del train_model
        # (a 16-bit model's converted values: arrays too, in place of the model's own)
        self.run_model, converted = _stub_large_values(run_model)
        del run_model
        self._setup_values.update(converted)
        kept = {t.name for t in self.run_model.graph.initializer if is_stub(t)}
        self._setup_values = {k: v for k, v in self._setup_values.items() if k in kept}
        if self._large:
            release_freed_memory()
        # the training graph's forward: with bf16/fp16, its matrix products in 16 bits (evaluation
        # and export keep the model's own float32 products)
        self.step_model = self.run_model
        self.scaler = None  # fp16: dynamic loss scaling
        if cfg.precision in ("bf16", "fp16"):
            self.step_model, cast, total = autocast(self.run_model, cfg.precision)
            if writes:  # (`onnx-trainer eval` evaluates the model's own products)
                self.log.info(precision_line(self.run_model, cfg.precision, cast, total))
        if cfg.precision == "fp16":
            ls = cfg.loss_scale or LossScaleConfig()
            self.scaler = LossScaler(ls)
        if cfg.precision == "fp16" and writes:
            static = "a step whose gradients are not finite follows on_nan, as in fp32"
            self.log.info(f"loss scale {ls.init:g}, " + (
                f"dynamic (x{ls.growth_factor:g} after {ls.growth_interval} finite steps, "
                f"x{ls.backoff_factor:g} and the step skipped when a gradient overflows)"
                if self.scaler.backs_off else
                f"dynamic, growing x{ls.growth_factor:g} after {ls.growth_interval} finite "
                f"steps (backoff_factor 1: {static})" if ls.dynamic else
                f"static ({static})"))
        # (cross entropy and ctc on a Softmax's output train on its input: evaluation reads
        # its LogSoftmax (_eval_on_logits), or the output's log where another node reads it)
        self._softmax_output = _softmax_output(self.run_model, cfg.loss)
        self.in_dtypes = input_dtypes(self.run_model)
        self.out_dtypes = {vi.name: np_dtype(vi.type.tensor_type.elem_type)
                           for vi in self.run_model.graph.output}
        loss_output_of(self.run_model, cfg.loss)  # (before data.eval's targets read its dtype)
        init_names = {t.name for t in self.run_model.graph.initializer}
        # (data.constants: graph inputs fed the same value every step, not from the dataset)
        self.data_inputs = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                                      for d in vi.type.tensor_type.shape.dim]
                            for vi in self.run_model.graph.input if vi.name not in init_names
                            and vi.name not in cfg.data.constants}
        self._constant_feeds: dict[int, dict] = {}
        train = cfg.data.train
        preflight.batch_axis_first(self.run_model, set(self.data_inputs))
        # (`onnx-trainer eval`: the set it evaluates is checked against the model first, so a
        # model that does not fit the data is said of data.eval)
        early_eval = self._load(cfg.data.eval, "data.eval") if cfg.data.eval and not writes \
            else None
        # (`onnx-trainer eval` trains nothing: the set it evaluates stands in for data.train,
        # which it need not read, nor even find)
        self.train_arrays = self._load(train, "data.train") if early_eval is None \
            else early_eval
        n_eval = len(next(iter(early_eval.values()))) if early_eval is not None else None
        if n_eval is not None and n_eval < self.world:
            # (a set smaller than the processes is evaluated as training evaluates it, some
            # processes scoring none of it; as the training set it stands in for, which needs
            # a sample per process, its samples are repeated)
            reps = -(-self.world // n_eval)
            self.train_arrays = {k: np.concatenate([np.asarray(v)] * reps)
                                 for k, v in early_eval.items()}
        # data.on_device: the training set on the GPU, each batch gathered there (the host
        # arrays stay for the label counts and shapes)
        self.on_device = keep_on_device(
            cfg.data.on_device, sum(a.nbytes for a in self.train_arrays.values()),
            any(isinstance(a, np.memmap) for a in self.train_arrays.values()),
            self.xp is not np) and all(a.dtype.kind not in "OUS"  # (strings: host-only)
                                       for a in self.train_arrays.values())
        dtypes = self._batch_dtypes(self.train_arrays)
        if self.on_device:
            source = {k: to_device(self.xp, np.asarray(a).astype(dtypes.get(k, a.dtype),
                                                                  copy=False), "data.train")
                      for k, a in self.train_arrays.items()}
            held = human(sum(int(v.nbytes) for v in source.values()))
            self.log.info(f"data.train on the GPU ({held}): batches are gathered there "
                          "(data.on_device)")
        else:
            source = self.train_arrays
        prefetch = False if self.on_device else self._prefetch(self.train_arrays)
        if writes:
            preflight.fixed_batch_fits({k: v for k, v in self.data_inputs.items()
                                        if k in cfg.data.train.inputs},
                                       len(next(iter(self.train_arrays.values()))), self.world)
        # (`eval` and `export` train nothing: a batch size the processes do not divide is
        # rounded up for the batches they never take)
        batch = cfg.data.batch_size if writes else -(-cfg.data.batch_size // self.world) * \
            self.world
        self.batches = Batches(source, batch, rank=self.rank,
                               world=self.world, shuffle=cfg.data.shuffle,
                               drop_last=cfg.data.drop_last and early_eval is None,
                               seed=cfg.seed,
                               dtypes=None if self.on_device else dtypes,
                               prefetch=prefetch, xp=self.xp if self.on_device else np,
                               # a GPU: prefetched batches go up on a copy stream of their own
                               uploads=DeviceUploads(self.xp, held=cfg.accumulate)
                               if prefetch and self.xp is not np else None)
        self.eval_arrays = early_eval if early_eval is not None else (
            self._load(cfg.data.eval, "data.eval") if cfg.data.eval else None)
        if self.world > 1:
            self._agree_on_data()
        # (`onnx-trainer eval` and `export` train nothing: the training batches' sizes do
        # not matter, evaluation runs chunks of the model's fixed batch, and the graph that
        # lays out the parameters is built at that batch: a Reshape that bakes it in fails
        # at another)
        fixed = {d[0] for k, d in self.data_inputs.items() if d and d[0] is not None}
        self._probe_n = fixed.pop() if not writes and len(fixed) == 1 else None
        if writes:
            preflight.fixed_batch({k: v for k, v in self.data_inputs.items()  # (fed by the
                                   if k in cfg.data.train.inputs},  # data; others: constants)
                                  self.batches.local_sizes(), cfg.data.batch_size,
                                  self.world)
        self.plans: dict[int, Plan] = {}
        self._writes = writes  # (False: `eval` and `export`, which train nothing)
        # the values not trained, of SHARED_MIN elements or more (a frozen backbone, large
        # constants): held once, here, by every executor (see _drop_trained_values)
        self.shared = SharedValues()
        try:
            self._init_parameters()
            if writes and 1 in self.batches.any_rank_sizes():
                # (a process's batch of 1 sample, which BatchNormalization refuses: said at
                # the start, on every rank, rather than at the end of the first epoch)
                self._training_graph(1)
        except ModelError as exc:
            if "1 value per channel" not in str(exc):
                raise
            raise ModelError(f"{exc}; here {self.batches.one_sample_why()}") from None
        if early_eval is None:
            self._check_targets(self.train_arrays, "data.train")
        if self.eval_arrays is not None:
            self._check_targets(self.eval_arrays, "data.eval")
        ev = cfg.eval
        if cfg.data.eval is None and (ev.every_steps or ev.every_epochs not in (0, 1)):
            which = "eval.every_steps" if ev.every_steps else "eval.every_epochs"
            self.log.info(f"warning: {which} sets when to evaluate, but there is no data.eval: "
                          "nothing is evaluated")
        spe = self.batches.steps_per_epoch
        self.total_steps = cfg.steps if cfg.steps else (cfg.epochs * spe) // cfg.accumulate
        if self.total_steps < 1 or spe == 0:  # (`steps` too: an epoch without a batch)
            raise self.batches.empty_epoch_error(cfg.accumulate, cfg.epochs)
        left = 0 if cfg.steps else (cfg.epochs * spe) % cfg.accumulate
        # (steps draw their micro-batches across epoch ends: README, `accumulate`; said when
        # training starts, after a resume that may lay the run out again)
        self._left_note = (
            f"warning: accumulate {cfg.accumulate} over {cfg.epochs} epoch(s) of {spe} "
            f"batches: the last {left} batch(es) of the run are not trained "
            f"({self.total_steps} steps); choose epochs, data.batch_size or accumulate so "
            "that accumulate divides the batches, or set steps") if left else ""
        self.schedule = make_schedule(cfg.schedule, self.optimizer, self.total_steps)
        self.step = 0
        self.skipped = 0  # steps not applied because of a non-finite loss (on_nan: skip)
        self.scaler_skipped = 0  # fp16 steps skipped because a gradient overflowed
        self._stop_signal, self._stop_agreed, self._signal_code = False, False, 0
        self._finishing = False  # (past the last step: its evaluation, checkpoint, export)
        self._grad_norm = None  # (grad_clip: the gradients' norm before the last clipping)
        self.last_metrics: dict = {}
        self.last_eval_step = -1
        self._saved_step = -1  # (the step of the last checkpoint this run wrote)
        self._resumed = False  # (resume() was called: fit() goes on from there)
        self.stopped_early = ""  # early_stop's reason, once it stopped the run
        self.best_value = self.es_best = None
        self.best_step, self.best_path, self.es_bad = None, None, 0
        self.position = (0, 0)  # (epoch, index) of the next micro-batch
        self._order = (-1, None)
        self.history: list[dict] = []  # the latest rows logged (_remember)

    # -- set-up --------------------------------------------------------------------------------
    def _load(self, ds, what):
        mapping = {**ds.inputs, **ds.targets}
        inits = {t.name for t in self.run_model.graph.initializer}
        check_input_keys(ds.inputs, self.data_inputs,
                         {vi.name for vi in self.run_model.graph.input if vi.name in inits},
                         set(self.cfg.data.constants), what)
        arrays = load_arrays(ds.path, mapping, what)
        check_against_model({k: arrays[k] for k in ds.inputs}, self.data_inputs, what)
        preflight.gather_indices({k: arrays[k] for k in ds.inputs}, self.run_model, what)
        out = {}
        for name, a in arrays.items():
            want = self._dtype_for(name, a, what)
            # memory-mapped arrays stay on disk; each batch is converted (Batches' dtypes)
            with np.errstate(over="ignore"):  # (values beyond `want`: refused below)
                out[name] = a if isinstance(a, np.memmap) or want is None else \
                    a.astype(want, copy=False)
            if want is not None:
                preflight.within_range(a, want, f"{what}: array '{mapping[name]}' (for "
                                       f"'{name}')",
                                       None if isinstance(a, np.memmap) else out[name])
        return out

    def _dtype_for(self, name: str, a: np.ndarray, what: str) -> np.dtype | None:
        """The type the engine computes `name` in (None: as stored)."""
        if name in self.in_dtypes:
            preflight.convertible(a, self.in_dtypes[name], name, what)
            return self.in_dtypes[name]
        if self.cfg.loss.type in ("cross_entropy", "ctc"):  # (class labels)
            return np.dtype(np.int64) if a.dtype.kind in "iu" else None
        # mse targets take the dtype of the output they are compared with
        if a.dtype.kind not in "biuf":
            raise DataError(f"{what}: target '{name}' must be numeric, got {a.dtype}")
        return self.out_dtypes[self.cfg.loss.output]

    def _prefetch(self, arrays) -> bool:
        return prefetching(self.cfg.data.prefetch,
                           sum(a[:1].nbytes for a in arrays.values())
                           * (self.cfg.data.batch_size // self.world),
                           any(isinstance(a, np.memmap) for a in arrays.values()))

    def _batch_dtypes(self, arrays) -> dict[str, np.dtype]:
        """The types memory-mapped arrays are converted to, batch by batch."""
        out = {}
        for k, a in arrays.items():
            want = self._dtype_for(k, a, "data") if isinstance(a, np.memmap) else None
            if want is not None and want != a.dtype:
                out[k] = want
        return out

    def _check_paths(self) -> None:
        check_paths(self.cfg, lambda fn, *args: fn(*args))
        # (what the export leaves alone; read here: finding the model's external data files
        # loads the model file, which at an export added twice its size to the peak)
        self._files_read = preflight.files_read(self.cfg)

    def _check_targets(self, arrays, what: str, evaluated: bool | None = None) -> None:
        """Loss targets against the loss output of the training graph, before step 1
        (`evaluated`: a set evaluated, not trained on; by default data.eval)."""
        spec = self.cfg.loss
        if spec.type == "output":
            return
        local, plan = next(iter(self.plans.items()))
        shape = plan.out_shape
        preflight.batch_first_output(shape, local, spec.output, spec.type, _batch_axis(spec))
        if evaluated if evaluated is not None else what == "data.eval":
            # (its samples may be longer along a symbolic axis)
            shape = report.eval_output_shape(
                self.run_model, spec.output, shape, local,
                {k: v.shape[1:] for k, v in self.train_arrays.items() if k in self.data_inputs},
                {k: v.shape[1:] for k, v in arrays.items() if k in self.data_inputs},
                self._constants(local))
            if shape is None:
                return
        labels = arrays[spec.target]
        if spec.type == "mse":
            preflight.regression_targets(labels, spec.target, what, shape[1:], spec.output)
            return
        if spec.type == "bce":
            preflight.binary_targets(labels, spec.target, what, shape[1:], spec.output)
            return
        if spec.type == "ctc":
            preflight.ctc_labels(labels, spec.target, what, shape[-1], spec.blank,
                                 shape[spec.time_axis], spec.output,
                                 arrays[spec.lengths] if spec.lengths else None, spec.lengths)
            return
        axis = spec.class_axis % len(shape)
        if (what == "data.train" and spec.class_axis == -1 and len(shape) >= 3
                and shape[1] == shape[-1]):
            self.log.info(f"warning: loss.class_axis -1: the classes of '{spec.output}' "
                          f"{list(shape)} are taken on its last axis; axis 1 has as many "
                          "entries, and holds them in torch's F.cross_entropy layout [N, C, "
                          "...]: set loss.class_axis: 1 if they are there")
        per_sample = tuple(d for i, d in enumerate(shape) if i != axis)[1:]
        preflight.class_labels(labels, spec.target, what, shape[axis], per_sample,
                               spec.ignore_index, spec.output, tuple(shape), spec.weight)

    def _training_graph(self, local_n: int, batch: Mapping | None = None):
        """(training graph, its TrainingInfo) for local batches of local_n samples, built on
        `batch`'s values where given (the batch at hand: a trace may fail on zeros, as a
        Gather of the first token a router picked)."""
        got = self._graphs.get(local_n)
        if got is None:
            shapes = {k: (local_n,) + self.train_arrays[k].shape[1:] for k in self.data_inputs}
            # data.constants: integer and boolean ones (a sample rate, a flag) become
            # initializers of the training graph, so that control flow on them is lowered to
            # the branch taken; float ones (an initial state) are fed with each batch
            values = constant_inputs(self.cfg.data.constants, self.run_model, local_n,
                                     fed=self.cfg.data.train.inputs)
            baked = {k: v for k, v in values.items() if v.dtype.kind in "biu"}
            shapes.update({k: v.shape for k, v in values.items() if k not in baked})
            # (a batch on the GPU is read back once per batch size, for the build: on zeros
            # instead, the first-routed-token trace failed there as it did on the host)
            example = {k: to_host(v) for k, v in (batch or {}).items() if k in self.data_inputs}
            example.update((k, v) for k, v in values.items() if k not in baked)
            with self._values_in(self.step_model) as step_model:
                try:
                    tm = build_training_graph(bake_inputs(step_model, baked), self.cfg.loss,
                                              self.cfg.trainable,
                                              frozen=self.cfg.frozen, shapes=shapes,
                                              batchnorm=self.cfg.batchnorm,
                                              sync_batchnorm=self.sync_bn, example=example)
                except ModelError as exc:  # (maybe a constant written for another batch)
                    hint = constant_batch_hint(values, self.run_model, local_n,
                                               self.data_inputs) or _reshape_hint(exc)
                    if not hint or type(exc) is not ModelError:
                        raise
                    raise type(exc)(f"{str(exc).rstrip()}; {hint}") from exc
            if hasattr(self, "params"):  # (its trained values are fed, the values not
                # trained are the shared ones: see _drop_trained_values)
                tm = self._stubbed(tm, set(self.params) | self._same_as_shared(tm))
            got = self._graphs[local_n] = (tm, training_info(tm))
        return got

    def _drop_trained_values(self) -> None:
        """Once the trained tensors live in the flat buffers, their values leave the model
        protos (the model, its compute form and its 16-bit step form held two or three more
        copies of the weights): each becomes a stub of its name, type and shape
        (memory.is_stub), refilled from the current parameters while a training graph is
        built (_values_in), and taken from them by the export (trained_values). The values
        not trained of SHARED_MIN elements or more (a frozen backbone, a large constant table)
        leave them too, and the training graphs', for one host copy in self.shared that every
        executor reads (and one device copy on a GPU): they were held by the model, its
        compute form, each training graph and each executor, 4 to 7 times."""
        # (the trained tensors, and what the export makes of them: a lookup's source table
        # is trained, though the export writes its expanded form in its place)
        exported = set(self.trained_values())
        live = set(self.names) | set(self.state) | exported
        # (the set-up's arrays: those not trained are the shared values, the trained ones
        # live in the flat buffers now)
        self.shared.update((k, v) for k, v in self._setup_values.items() if k not in live)
        self._setup_values = {}
        for t in self.run_model.graph.initializer:
            if t.name not in live and not is_stub(t) and _shareable(t):
                value = numpy_helper.to_array(t)
                value.flags.writeable = False  # (executors share it: no kernel writes it)
                self.shared[t.name] = value

        stubbed = self._stubbed
        same = self.step_model is self.run_model
        self.run_model = stubbed(self.run_model, set(self.names) | set(self.shared))
        if same:
            self.step_model = self.run_model
        if self._large:  # (before the others: one more copy at most, for a while)
            release_freed_memory()
        # (the export writes the model's own tensors: those whose values the shared ones give
        # back exactly, in the model's type, are stubs too)
        self.model = stubbed(self.model, exported | self._same_as_shared(self.model))
        if not same:
            self.step_model = stubbed(self.step_model,
                                      set(self.names) | self._same_as_shared(self.step_model))
        for n, (tm, info) in list(self._graphs.items()):  # (its trained values are fed)
            self._graphs[n] = (stubbed(tm, set(self.names) | self._same_as_shared(tm)), info)
        release_freed_memory()

    @staticmethod
    def _stubbed(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
        """`model` with the initializers in `names` as stubs (memory.stub_of): a new proto,
        as protobuf frees a message's memory only with its whole tree."""
        from trainer.memory import stub_of

        if not names:
            return model
        out = without_initializers(model)
        out.graph.initializer.extend(stub_of(t) if t.name in names else t
                                     for t in model.graph.initializer)
        return out

    def _same_as_shared(self, model: onnx.ModelProto) -> set[str]:
        """The initializers of `model` that the shared values give exactly (in their type)."""
        out = set()
        for t in model.graph.initializer:
            v = self.shared.get(t.name)
            if v is None or is_stub(t) or tuple(t.dims) != v.shape:
                continue
            own = numpy_helper.to_array(t)
            if own.dtype != v.dtype:  # (a 16-bit model's tensor, a float32 one in fp64)
                if not (is_float_dtype(own.dtype) and is_float_dtype(v.dtype)):
                    continue
                v = v.astype(own.dtype)
            if _same_bytes(own, v):
                out.add(t.name)
        return out

    @contextlib.contextmanager
    def _values_in(self, model: onnx.ModelProto):
        """`model`, whose stubs read (graph.tensor_value) the current parameters and state,
        the shared values and, during the set-up, the values read from the model while the
        block runs (a training graph's build runs the forward to find every shape): no proto
        holds a copy of them for it."""
        with stub_values(_StubValues(self)):
            yield model

    def _constants(self, local_n: int, fed_only: bool = False) -> dict:
        """data.constants on the device for local batches of local_n samples (made once);
        `fed_only`: those the training graph reads as inputs (its float ones: the integer and
        boolean ones are its initializers, see _training_graph)."""
        got = self._constant_feeds.get(local_n)
        if got is None:
            values = constant_inputs(self.cfg.data.constants, self.run_model, local_n,
                                     fed=self.cfg.data.train.inputs)
            got = self._constant_feeds[local_n] = {
                k: to_device(self.xp, v, f"data.constants.{k}") for k, v in values.items()}
        if fed_only:
            return {k: v for k, v in got.items() if v.dtype.kind not in "biu"}
        return got

    def _plan(self, local_n: int, batch: Mapping | None = None) -> Plan:
        plan = self.plans.get(local_n)
        if plan is None:
            tm, info = self._training_graph(local_n, batch)
            feeds = list(info.gradients) + list(info.state)
            if self.seed_weighted:  # the loss weight (times fp16's loss scale) as the seed
                feeds.append(info.seed)
            fetch = [info.loss] + list(info.gradients.values()) + list(info.state.values())
            if self.direct_grads:
                # Each gradient kernel writes straight into the gradient's slice of the flat
                # buffer (already weighted, through the seed); its completion tells the
                # all-reduce buckets when they can start (overlap with the backward).
                into = {gname: self.grads[k] for k, gname in info.gradients.items()}
                hooks = {gname: self._bucket_hook(k) for k, gname in info.gradients.items()
                         } if self.world > 1 else {}
            else:  # accumulation: each micro-batch's gradients are added into the buffer
                into = {}
                hooks = {gname: self._gradient_sink(k) for k, gname in info.gradients.items()}

            def executor(on_produced, graph: bool) -> Executor:
                return Executor(tm, self.xp, feeds=feeds, fetch=fetch, values=self.shared,
                                seed=self.cfg.seed + self.rank, fetch_into=into,
                                on_produced=on_produced, cuda_graph=graph,
                                persistent=list(info.gradients) + list(info.state))
            after: dict[str, Callable] = {}
            if self.cfg.gpu.cuda_graph:
                # The graph holds no callbacks: the hooks run after its launch (the all-reduce
                # then starts after the backward instead of overlapping it).
                ex = executor({}, True)
                graphed, reason = ex.graph_off is None, ex.graph_off
                if graphed:
                    after = hooks
                elif hooks:
                    ex = executor(hooks, False)
                if not self.plans:
                    self.log.info("gpu.cuda_graph: " + (
                        f"off ({reason})" if not graphed else
                        "the training step is captured at its second run of each batch shape"
                        + ("; the gradient all-reduce starts after each launch (no overlap "
                           "with the backward)" if self.world > 1 else "")
                        + ("; each micro-batch's gradients are added after its launch"
                           if not self.direct_grads else "")))
            else:
                ex = executor(hooks, False)
            # (its executor read what it keeps; the parameters and statistics are fed)
            inputs_for_initializers(tm, list(info.gradients) + list(info.state))
            out = next(vi for vi in tm.graph.output if vi.name == self.cfg.loss.output)
            plan = Plan(ex, info.gradients, info.state, info.loss, dict(info.targets),
                        tuple(d.dim_value for d in out.type.tensor_type.shape.dim), tm,
                        info.seed, after)
            self.plans[local_n] = plan
        return plan

    def _seed_value(self, w: float):
        """The backward seed holding loss weight w (one array per distinct weight)."""
        v = self._seeds.get(w)
        if v is None:
            if len(self._seeds) > 64:
                self._seeds.clear()
            v = self._seeds[w] = self.xp.asarray(np.array(w, self.dtype))
        return v

    def _bucket_hook(self, name: str):
        def ready(_value) -> None:
            if self._profiling:  # the profiler's extra runs change nothing
                return
            self.buckets.ready(name)
            self.buckets.progress()
        return ready

    def _gradient_sink(self, name: str):
        def sink(value) -> None:
            if self._profiling:  # the profiler's extra runs change nothing
                return
            dst = self.grads[name]
            if self._w == 1.0:
                dst += value
            else:
                dst += value * self._w
            if self.buckets is not None:
                if self._last_micro:
                    self.buckets.ready(name)
                self.buckets.progress()
        return sink

    def _init_parameters(self) -> None:
        xp = self.xp
        first, _, _ = self.batches.get(0, 0)
        n_first = len(next(iter(first.values())))
        probe = getattr(self, "_probe_n", None)
        if probe and n_first and n_first != probe:  # (its samples repeated or cut to it)
            take = np.arange(probe) % n_first
            first, n_first = {k: v[take] for k, v in first.items()}, probe
        tm, info = self._training_graph(n_first, first)
        inits = {t.name: t for t in self.run_model.graph.initializer}
        # (the tensors' types and shapes from their protos: their values are read one at a
        # time, straight into the flat buffer below, and leave the set-up's arrays, so the
        # set-up holds no second copy of the trained values beside it)
        dtypes = {np_dtype(inits[k].data_type) for k in info.gradients}
        if len(dtypes) != 1:
            raise TrainerError(f"trainable parameters mix dtypes {sorted(map(str, dtypes))}; "
                               "train one dtype at a time (see 'trainable'/'frozen')")
        self.dtype = dtypes.pop()
        # The flat layout follows the order in which the backward produces the gradients, so a
        # bucket (a contiguous slice) is complete as early as possible.
        made = {o: i for i, n in enumerate(tm.graph.node) for o in n.output}
        self.names = sorted(info.gradients, key=lambda k: made.get(info.gradients[k], 0))
        self.shapes = {k: tuple(int(d) for d in inits[k].dims) for k in self.names}
        untied = [k for k in self._untied if k in self.shapes]
        if untied:
            self.log.info(f"{len(untied)} parameter(s) that the exporter merged into another "
                          f"tensor or dropped get their own tensor again: {', '.join(untied[:6])}"
                          + (" ..." if len(untied) > 6 else ""))
        single = [k for k in single_bias_masks(self.model) if k in self.shapes]
        if single:
            self.log.info(report.single_bias_line(single))
        shared = shared_constants(self.model, self.names + list(info.state))
        if shared:
            self.log.info(report.shared_line(shared))
        tool_constants = tool_folded_constants(self.model)
        if tool_constants:
            self.log.info(report.tool_constants_line(tool_constants))
        nodes = self.model.graph.node
        detached = list(dict.fromkeys(nodes[i].input[k]
                                      for i, k in detached_inputs(self.model)))
        if detached:
            self.log.info(report.detached_line(detached))
        sizes = [int(np.prod(self.shapes[k])) for k in self.names]
        self.offsets = dict(zip(self.names, np.cumsum([0] + sizes[:-1]).tolist(), strict=True))
        self.size = int(sum(sizes))
        # Every buffer a collective or an in-place update writes is a writable, contiguous copy
        # owned by the engine (onnx hands out read-only views of the model's bytes).
        # Extra slots after the gradients ride on one small all-reduce: the loss, a stop request
        # (a signal on any rank stops every rank after the same step), and under ZeRO-1 the
        # shard's non-finite flag and sum of squares (for the global clipping norm).
        # ZeRO-1 (distributed.shard_optimizer): the gradient buckets are reduce-scattered, so
        # rank r receives the summed gradient of elements [lo, lo + n_own) only (in grad_shard),
        # updates them with 1/N of the optimizer state, then the shards are all-gathered; the
        # parameter buffer is padded to N equal shards for that. Compressed buckets are
        # all-reduced (their 16-bit exchange has no reduce-scatter form yet).
        self.shard = self.cfg.distributed.shard_optimizer and self.world > 1
        preflight.shardable(self.cfg, self.world)
        padded = padded_size(self.size, self.world) if self.shard else self.size
        k_shard = padded // self.world
        self.shard_lo = self.rank * k_shard if self.shard else 0
        self.shard_k = k_shard if self.shard else self.size
        self.shard_n = max(0, min(self.size, self.shard_lo + self.shard_k) - self.shard_lo)
        flat = np.zeros(padded, self.dtype)
        for k, n in zip(self.names, sizes, strict=True):
            flat[self.offsets[k]:self.offsets[k] + n] = tensor_value(
                inits[k], self._setup_values).reshape(-1)
            self._setup_values.pop(k, None)  # (the flat buffer holds it now)
        # (NaN, not inf: a bias of -inf disables a class, and trains as such; `eval` and
        # `export` train nothing, and a checkpoint's values may replace these)
        bad = [k for k in self.names if np.isnan(self._view(flat, k)).any()] if \
            self._writes and np.isnan(flat).any() else []
        bad += [k for k in info.state if self._writes and
                np.isnan(tensor_value(inits[k], self._setup_values)).any()]
        if bad:  # (step 1 stopped on a non-finite loss, advising a lower learning rate)
            raise ModelError(f"the model holds NaN values in {listing(bad)}, which training "
                             "would update: the file is damaged or was saved from a diverged "
                             "run; export it again from finite weights (or list them in "
                             "'frozen' if they are meant so)")
        # (on the host, the buffer filled here is the engine's own: no second copy)
        self.params_flat = flat if xp is np else owned(xp, flat)
        del flat  # (on a device, the host's copy: handed back below)
        self.grads_flat = xp.zeros(self.size + 4, self.dtype)
        self.scatter = self.shard and self.cfg.distributed.compress is None
        self.grad_shard = xp.zeros(self.shard_k, self.dtype) if self.scatter else None
        self.params = {k: self._view(self.params_flat, k) for k in self.names}
        self.grads = {k: self._view(self.grads_flat, k) for k in self.names}
        # Learned quantization scales stay positive after every update, clamped to float32's
        # eps as PyTorch's learnable fake quantization clamps them (a non-positive scale
        # flips or collapses the integer grid; runtimes that check scales refuse the model).
        scales = quantization_scales(self.run_model.graph.node)
        self.positive = [self.params[k] for k in self.names if k in scales]
        self.state = {k: owned(xp, tensor_value(inits[k], self._setup_values))
                      for k in info.state}
        self.comm.bcast_(self.params_flat)
        for v in self.state.values():
            self.comm.bcast_(v)
        layout = [(k, self.offsets[k], int(np.prod(self.shapes[k]))) for k in self.names]
        lo, hi = self.shard_lo, self.shard_lo + self.shard_n
        own = [(k, min(max(o, lo), hi) - lo, max(0, min(o + n, hi) - max(o, lo)))
               for k, o, n in layout]  # this rank's part of each tensor (maybe empty)
        aliases = parameter_aliases(self.model)
        self.optimizer = make_optimizer(self.cfg.optimizer, xp, self.shard_n, self.dtype,
                                        own if self.shard else layout, aliases)
        for line in partly_packed(aliases, self._globs()):
            self.log.info(f"warning: {line}")
        if self.world > 1:
            d = self.cfg.distributed
            self.buckets = Buckets(self.comm, self.grads_flat[:self.size], layout, d.bucket_mb,
                                   compress=d.compress, overlap=d.overlap,
                                   shards=(self.grad_shard, self.shard_k) if self.scatter
                                   else None)
        # (what holds the protos that the stubs replace: the memory is handed back below)
        del tm, inits, nodes, first
        self._drop_trained_values()
        self._plan(n_first)  # (its gradient kernels write into self.grads)
        if self._large:  # (the protos the stubs replaced, the copies above)
            release_freed_memory()

    def _globs(self) -> list[tuple[str, str]]:
        """(config key, glob) of every glob naming parameters: trainable, frozen and the
        optimizer groups'."""
        cfg = self.cfg
        found = [("trainable", g) for g in ([] if isinstance(cfg.trainable, str) or
                                           cfg.trainable is None else cfg.trainable)
                 if g != "all"]
        found += [("frozen", g) for g in cfg.frozen]
        found += [(f"optimizer.groups[{i}].params", g)
                  for i, group in enumerate(getattr(cfg.optimizer, "groups", ()) or ())
                  for g in group.params]
        return found

    def check_consistency(self) -> None:
        """distributed.check_consistency_every: every rank holds the same bits of every
        trained tensor; otherwise every rank stops with the first tensor that differs and the
        ranks that hold other bits than rank 0. Each tensor's fingerprint is two sums of its
        words modulo 2^64, the plain one and one weighted by position (any one changed word
        changes the first; a swap, the second), made on the device, read once and
        all-gathered: 16 bytes a tensor."""
        xp, n = self.xp, len(self.names)
        words = self.params_flat[:self.size].view(np.uint64 if self.dtype.itemsize == 8
                                                   else np.uint32).astype(np.uint64)
        index = xp.arange(1, self.size + 1, dtype=np.uint64)
        ends = np.array([self.offsets[k] + int(np.prod(self.shapes[k])) for k in self.names],
                        np.int64)
        starts = ends - np.array([int(np.prod(self.shapes[k])) for k in self.names], np.int64)
        mine = np.zeros((n, 2), np.uint64)
        with np.errstate(over="ignore"):
            for j, part in enumerate((words, words * index)):
                total = xp.concatenate([xp.zeros(1, np.uint64), xp.cumsum(part)])
                mine[:, j] = to_host(total[xp.asarray(ends)] - total[xp.asarray(starts)])
        every = np.zeros((self.world * n, 2), np.uint64)
        self.comm.allgather_(mine.reshape(-1), every.reshape(-1),
                             label="parameter fingerprints (check_consistency_every)")
        every = every.reshape(self.world, n, 2)
        differ = (every != every[0]).any(axis=2)  # [rank, tensor]
        bad = np.flatnonzero(differ.any(axis=0))
        if bad.size:
            ranks = np.flatnonzero(differ[:, bad[0]]).tolist()
            raise TrainerError(
                f"distributed.check_consistency_every: after step {self.step}, rank(s) "
                f"{', '.join(map(str, ranks))} hold other values of '{self.names[bad[0]]}' "
                f"than rank 0 ({bad.size} of {n} trained tensors differ): the ranks no longer "
                "train one model (a rank's kernels or data differ, or its update was skipped); "
                "the job stops")

    def _agree_on_config(self) -> None:
        """Every process reads the config itself: one given another file (a node with a stale
        copy, an MPMD launch) waited in a collective the others never reached, or ended the
        job at its own step count. Compared once, before anything else: a digest per key."""
        keys, mine = config_digests(self.cfg)
        self._agree(keys, mine, "config digests", lambda named, ranks: (
            f"the processes were given different configs: {named} between rank 0 and "
            f"rank(s) {ranks}; every process reads the config: give each the same file and "
            "--set options"))

    def _agree_on_data(self) -> None:
        """Every process reads the datasets itself and takes its shard by index: one that read
        another copy (a node's stale file: fewer samples) ran collectives of other sizes than
        the others (Open MPI's heap corrupted, or a hang until distributed.timeout_s)."""
        keys, mine = [], []
        for key, arrays in (("data.train", self.train_arrays), ("data.eval", self.eval_arrays)):
            if arrays is not None:
                keys.append(key)
                mine.append(_digest([[k, list(np.shape(v)), np.asarray(v[:0]).dtype.str]
                                     for k, v in sorted(arrays.items())]))
        self._agree(keys, np.array(mine, np.uint64), "dataset digests", lambda named, ranks: (
            f"the processes read different data: {named} between rank 0 and rank(s) "
            f"{ranks} (their sample counts, or the arrays' shapes or dtypes); every process "
            "reads the dataset files: give each node the same files"))

    def _agree(self, keys: list[str], mine: np.ndarray, label: str, message) -> None:
        """Raise message(keys, ranks) on every process where a rank's digests differ."""
        every = np.zeros((self.world, len(keys)), np.uint64)
        if keys:
            self.comm.allgather_(mine, every.reshape(-1), label=label)
        differ = (every != every[0]).any(axis=0)
        if differ.any():
            ranks = [r for r in range(self.world) if (every[r] != every[0]).any()]
            named = [k for k, d in zip(keys, differ, strict=True) if d]
            raise TrainerError(message(
                ", ".join(named) + (" differs" if len(named) == 1 else " differ"),
                ", ".join(map(str, ranks))))

    def _view(self, flat, name):
        o = self.offsets[name]
        return flat[o:o + int(np.prod(self.shapes[name]))].reshape(self.shapes[name])

    # -- one step ------------------------------------------------------------------------------
    def _next_micro_batch(self):
        """The next micro-batch at self.position (epoch, index), advancing the position:
        (epoch, this rank's arrays, its weight, the global batch's weight). Weights count what
        the loss averages over: samples, or for cross entropy the labels that are not
        loss.ignore_index (so N ranks and accumulation give the mean of one big batch)."""
        t0 = time.perf_counter()
        try:
            return self._next_micro_batch_untimed()
        finally:
            self.times["data"] += time.perf_counter() - t0

    def _next_micro_batch_untimed(self):
        epoch, index = self.position
        if index >= self.batches.steps_per_epoch:
            epoch, index = epoch + 1, 0
        if self._order[0] != epoch:
            self._order = (epoch, self.batches.order(epoch))
        arrays, local_w, global_n = self.batches.get(epoch, index, self._order[1])
        self.position = (epoch, index + 1)
        global_w = global_n
        spec = self.cfg.loss
        if spec.type == "cross_entropy":  # (counted on the host: no device read)
            labels = arrays[spec.target]
            if not isinstance(labels, np.ndarray):  # (a batch on the device)
                labels = self.train_arrays[spec.target][
                    self.batches.local_indices(epoch, index, self._order[1])]
            local_w = _label_weight(spec, labels)
            global_w = local_w
            if self.world > 1:  # (one process: its batch is the global batch)
                idx = self.batches.global_indices(epoch, index, self._order[1])
                global_w = _label_weight(spec, self.train_arrays[spec.target][idx])
            if not local_w and spec.weight is not None and spec.label_smoothing and (
                    labels != spec.ignore_index).any():  # (this rank's micro-batch's labels)
                # labels of weight-0 classes alone: their smoothing term still counts (over the
                # global batch's weights, as torch's); the graph divides it by 1 here
                local_w = 1.0
        return epoch, arrays, local_w, global_w, global_n

    def train_step(self, micro: list[tuple[dict, int, int]], lr) -> float:
        """One optimizer step over `accumulate` micro-batches (arrays, local weight, global
        weight); returns the global mean loss."""
        # A non-finite value is found and reported by the step itself (the loss's check names
        # the first node that made one; on_nan; fp16's loss scaler), not by NumPy's warnings
        self._grad_norm = None  # (a step skipped before its clipping logs no norm)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                return self._train_step(micro, lr)
            except ModelError as exc:
                hint = data_dependent_hint(self.run_model)
                if not hint:
                    raise
                raise ModelError(f"{exc}; {hint}") from exc

    def _train_step(self, micro: list[tuple[dict, int, int]], lr) -> float:
        xp = self.xp
        clock = time.perf_counter
        t_start = clock()
        g = self.grads_flat
        # fp16: the backward runs on the loss times the scale (float16 gradients stay in range)
        scale = float(self.scaler.scale) if self.scaler else 1.0
        total = sum(global_w for _, _, global_w in micro)
        # A micro-batch whose labels are all ignored adds nothing to the loss, but its samples
        # still move the BatchNorm statistics (as a PyTorch forward does), and under
        # SyncBatchNorm every rank must enter the statistics' all-reduce: it runs, weight 0.
        forward_all = bool(self.state) or self.sync_bn
        # (a step whose labels all weigh nothing is skipped below: none of its micro-batches
        # counts, not even for a smoothing term)
        counts = [bool(local_w and total) for _, local_w, _ in micro]
        live = [m for m in range(len(micro)) if counts[m] or forward_all]
        # on_nan stop or skip: the state (BatchNorm running statistics) is kept as it was
        # before this step if the step is not applied (then the diagnosis reruns from it, a
        # checkpoint holds the last good state, and a skipped step leaves no NaN there). The
        # last micro-batch's new state is written only once the step is known to be finite;
        # with several micro-batches (each reads the state the one before wrote) the state
        # before the step is copied instead.
        guard = self.cfg.on_nan in ("stop", "skip") and bool(self.state)
        before = ({k: v.copy() for k, v in self.state.items()}
                  if guard and len(live) > 1 else {})
        pending: list = []
        if self.direct_grads and live:
            g[self.size:] = 0  # (the gradients are written whole by their kernels)
        else:
            g[...] = 0
        if self.buckets is not None:
            self.buckets.begin(sync=True)
        for m, (arrays, local_w, _) in enumerate(micro):
            if not counts[m] and not forward_all:  # (every label of this shard is ignored)
                continue
            n = len(next(iter(arrays.values())))
            plan = self._plan(n, arrays)
            plan.executor.rng.reseed(self.cfg.seed, self.rank, self.step, m)
            feeds = {plan.targets.get(k, k): xp.asarray(v) for k, v in arrays.items()}
            feeds.update(self._constants(n, fed_only=True))
            feeds.update(self.params)
            feeds.update(self.state)
            # Weight so that summing over ranks (and micro-batches) gives the global mean; the
            # gradients reach the flat buffer (written there by their kernels, or added by the
            # on_produced hooks when accumulating), and their buckets start as they complete.
            w, self._last_micro = (local_w / total if local_w and total else 0.0), m == live[-1]
            if self.seed_weighted:
                # The rank's loss weight enters the backward as its seed: the gradients come out
                # weighted (and SyncBatchNorm's in-graph all-reduce sees weighted terms).
                feeds[plan.seed] = self._seed_value(w * scale)
                self._w = 1.0
            else:
                self._w = w
            t = clock()
            if self.sync_bn:
                with collectives(self.comm):
                    out = plan.executor.run(feeds)
            else:
                out = plan.executor.run(feeds)
            for gname, hook in plan.after.items():
                hook(out[gname])
            self.times["graph"] += clock() - t
            if plan.executor.graph_errors and n not in self._graph_told:  # (once per shape)
                self._graph_told.add(n)
                self.log.info(f"gpu.cuda_graph: the step of {n} samples runs uncaptured: "
                              f"{plan.executor.graph_errors[-1]}")
            self._last_feeds = (plan, feeds)
            if counts[m]:  # (a loss over no label is 0/0)
                g[self.size] += out[plan.loss] * w
            if guard and self._last_micro:
                pending = [(self.state[k], out[new]) for k, new in plan.state.items()]
            else:
                for k, new in plan.state.items():
                    self.state[k][...] = out[new]
        g[self.size + 1] = 1.0 if self._stop_signal else 0.0
        t = clock()
        grads = self.grad_shard[:self.shard_n] if self.scatter else g[:self.size]
        if self.world > 1:
            self.buckets.wait_all()  # (every bucket, also when this rank ran no micro-batch)
        if scale != 1.0:  # (a power of two, usually: exact; inf and NaN stay what they are)
            grads *= self.scaler.inv_scale
        if self.world > 1:
            if self.scatter:  # each rank holds only its shard's summed gradient
                if xp is np:
                    g[self.size + 2] = 0.0 if _all_finite(grads) else 1.0
                else:
                    g[self.size + 2] = xp.logical_not(xp.isfinite(grads).all())
                if self.cfg.grad_clip is not None:
                    g[self.size + 3] = xp.vdot(grads, grads)
            self.comm.allreduce_(g[self.size:], label="loss and stop flag")
        # grad_clip: the norm before clipping, read with the loss (a logged step reads once)
        norm = None if self.cfg.grad_clip is None else grad_norm(
            xp, grads, g[self.size + 3] if self.scatter else None)
        if xp is np:
            loss, stop = float(g[self.size]), float(g[self.size + 1])
            finite = g[self.size + 2] == 0 if self.scatter else _all_finite(grads)
            norm_seen = None if norm is None else float(norm)
        else:  # one device-to-host read: the loss, the stop flag, "all finite" and the norm
            status = xp.stack([g[self.size], g[self.size + 1],
                               (g[self.size + 2] == 0 if self.scatter
                                else xp.isfinite(grads).all()).astype(g.dtype),
                               (norm if norm is not None else g[self.size]).astype(g.dtype)])
            loss, stop, finite, norm_seen = (float(v) for v in to_host(status))
        self.times["communication"] += clock() - t
        self._stop_agreed = stop > 0
        # (a step whose gradients are not finite is the scaler's overflow where it can lower
        # the scale; with a static scale it would skip the same overflow at every step, in
        # silence: that follows on_nan, as in fp32)
        scaled = self.scaler is not None and math.isfinite(loss) and (
            finite or self.scaler.backs_off)
        if math.isfinite(loss) and finite or scaled:
            for dst, src in pending:  # (a float16 overflow skips the update, not the state)
                dst[...] = src
            pending = []
        if scaled:
            self.scaler.update(overflow=not finite)
            if not finite:  # float16 overflowed at this scale: skipped, as GradScaler does
                self.step += 1
                self.scaler_skipped += 1
                self.log.info(f"step {self.step}: a float16 gradient overflowed at loss scale "
                              f"{scale:g}; update skipped, loss scale now "
                              f"{float(self.scaler.scale):g}")
                return loss
        if not (math.isfinite(loss) and finite):
            what = f"loss became {loss}" if not math.isfinite(loss) else \
                "a gradient became non-finite"
            if self.cfg.on_nan == "skip":
                if self.scaler:  # (as torch's GradScaler: a step whose gradients are not
                    self.scaler.update(overflow=True)  # finite halves the scale)
                for k, v in before.items():  # (the statistics as they were: no NaN kept)
                    self.state[k][...] = v
                self.skipped += 1
                self.step += 1
                self.log.info(f"step {self.step}: {what}; update skipped ({self.skipped} "
                              "skipped so far, on_nan: skip)")
                return loss
            for k, v in before.items():
                self.state[k][...] = v
            eps = getattr(self.cfg.optimizer, "eps", None)
            bce = self.cfg.loss.type == "bce" and not self.cfg.loss.logits
            cause = self._first_nonfinite_of_all(micro, scale)
            sent16 = (cause == self._NONE_ANYWHERE and self.world > 1
                      and self.cfg.distributed.compress == "fp16")
            static = self.scaler is not None and not self.scaler.backs_off
            raise NonFiniteLoss(f"{what} at step {self.step + 1}; {cause}; training stopped "
                               "before applying it" + (
                                   f" (a static loss scale, {float(self.scaler.scale):g}: "
                                   "where its product overflows float16, lower "
                                   "loss_scale.init or make it dynamic)" if static else "") + (
                                   " (distributed.compress: fp16 sends the gradients as "
                                   "float16, whose range ends at 65504, before any clipping: "
                                   "use compress: bf16, float32's range, or null)" if sent16
                                   else "" if "float16's range" in cause  # (said there)
                                   else " (lower optimizer.lr, set grad_clip, or on_nan: skip)")
                               + (f"; loss bce takes probabilities in [0, 1]: if "
                                  f"'{self.cfg.loss.output}' holds logits (no Sigmoid at the "
                                  "end), set loss.logits: true (torch's BCEWithLogitsLoss)"
                                  if bce else "")
                               + ("; optimizer.eps is 0, so an update divides by zero where a "
                                  "gradient's running average is 0: give it a small value "
                                  "(torch's default is 1e-8)" if eps == 0 else ""))
        if total == 0:  # (every rank knows: the count is the global batch's)
            # every label of the step's batch is ignore_index: no gradient, and no update
            # (momentum, weight decay and Adam's moments would still move the weights);
            # PyTorch's mean over no label is NaN
            self.step += 1
            weighted = " or of a class whose loss.weight is 0" if self.cfg.loss.weight else ""
            self.log.info(f"step {self.step}: every label of its batch is loss.ignore_index "
                          f"({self.cfg.loss.ignore_index}){weighted}: nothing to learn, update "
                          "skipped")
            self.times["step"] += clock() - t_start
            return loss
        t = clock()
        if norm is not None:  # (the global norm: every shard's squares)
            clip_grad_norm_(xp, grads, self.cfg.grad_clip.max_norm, total=norm)
            self._grad_norm = norm_seen
        if self.shard:
            lo, n = self.shard_lo, self.shard_n
            if n:
                own = grads if self.scatter else grads[lo:lo + n]
                self.optimizer.step(self.params_flat[lo:lo + n], own, lr)
            self.comm.allgather_(self.params_flat[lo:lo + self.shard_k], self.params_flat,
                                 label="parameter shards")
        else:
            self.optimizer.step(self.params_flat[:self.size], grads, lr)
        for v in self.positive:  # (after the all-gather: every rank clamps the same values)
            xp.maximum(v, SCALE_MIN, out=v)
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()  # the update's time, not its launch
        end = clock()
        self.times["optimizer"] += end - t
        self.times["step"] += end - t_start
        self.step += 1
        return loss

    def _step_row(self, epoch: int, loss: float, used: list, samples_per_s: float) -> dict:
        """The metrics row of a logged step (after train_step): what it reads is on the host
        already (the loss and the clipping norm came back in the step's one read)."""
        row = {"step": self.step, "epoch": epoch, "loss": loss, "lr": used[0],
               "samples_per_s": samples_per_s}
        if len(set(used)) > 1:
            row["lr_groups"] = used
        if self._grad_norm is not None:  # (this step's, before clipping)
            row["grad_norm"] = self._grad_norm
        if self.skipped:
            row["skipped_steps"] = self.skipped
        if self.scaler:
            row["loss_scale"] = float(self.scaler.scale)
            row["overflow_steps"] = self.scaler_skipped
        return row

    _NONE_HERE = "no value was non-finite on this rank (another rank's data caused it)"
    _NONE_ANYWHERE = ("no value of the training graph was non-finite on a second run (the "
                      "gradients' sum over ranks or accumulated micro-batches overflowed?)")

    def _first_nonfinite_of_all(self, micro, scale: float = 1.0) -> str:
        """_first_nonfinite of the lowest rank whose data made a value non-finite, on every
        rank (rank 0 prints the error and ends the job: its own "none here" hid the node
        another rank had found)."""
        mine = self._first_nonfinite(micro, scale)
        if self.world == 1:
            return mine if mine != self._NONE_HERE else self._NONE_ANYWHERE
        width = 1024  # (bytes of each rank's text, as float32 codes: any backend sums those)
        code = np.zeros(width, np.float32)
        if mine != self._NONE_HERE:
            raw = mine.encode("utf-8", "replace")[:width - 1]
            code[0] = 1.0
            code[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
        xp = self.xp
        part, out = xp.asarray(code), xp.zeros(width * self.world, np.float32)
        self.comm.allgather_(part, out, label="non-finite report")
        every = to_host(out).reshape(self.world, width)
        for r in range(self.world):
            if every[r, 0] == 1.0:
                text = bytes(every[r, 1:].astype(np.uint8)).rstrip(b"\0")
                return text.decode("utf-8", "replace")
        return self._NONE_ANYWHERE

    def _first_nonfinite(self, micro, scale: float = 1.0) -> str:
        """Re-run this rank's micro-batches keeping every value (the backward seeded as the
        step's, at fp16's loss `scale`); name the first node (in execution order) whose output
        is not finite."""
        from trainer.graph import topo_sort

        xp = self.xp
        for m, (arrays, local_w, _) in enumerate(micro):
            if local_w == 0 and not (self.state or self.sync_bn):  # (as _train_step runs them)
                continue
            plan = self._plan(len(next(iter(arrays.values()))), arrays)
            ex = Executor(plan.model, xp, feeds=list(plan.gradients) + list(plan.state),
                          seed=self.cfg.seed + self.rank, keep_all=True, values=self.shared)
            ex.rng.reseed(self.cfg.seed, self.rank, self.step, m)
            feeds = {plan.targets.get(k, k): xp.asarray(v) for k, v in arrays.items()}
            feeds.update(self._constants(len(next(iter(arrays.values()))), fed_only=True))
            feeds.update(self.params)
            feeds.update(self.state)
            if self.seed_weighted:  # (the step's seed: its weight times fp16's loss scale,
                # without which a float16 overflow of the scaled backward was not found)
                total = sum(global_w for _, _, global_w in micro)
                feeds[plan.seed] = self._seed_value(
                    (local_w / total if local_w and total else 0.0) * scale)
            env = ex.run(feeds)
            for name, v in feeds.items():
                if _nonfinite(v):
                    return f"input '{name}' holds non-finite values"
            g = plan.model.graph
            known = {v.name for v in g.input} | {t.name for t in g.initializer}
            for i, node in enumerate(topo_sort(list(g.node), known)):
                for o in node.output:
                    if o and _nonfinite(env.get(o)):
                        to16 = node.op_type == "Cast" and any(
                            a.name == "to" and attr_type_code(a) == onnx.TensorProto.FLOAT16
                            for a in node.attribute)
                        product16 = node.op_type in ("MatMul", "Gemm", "Conv",
                                                     "ConvTranspose") and \
                            getattr(env.get(o), "dtype", None) == np.float16
                        return (f"the first non-finite value is output '{o}' of node "
                                f"'{node.name or f'{node.op_type}_{i}'}' ({node.op_type}) "
                                f"on rank {self.rank}"
                                + (self._why_float16(node, env, feeds, to16)
                                   if to16 or product16 else ""))
        return self._NONE_HERE

    def _why_float16(self, node, env, feeds, cast: bool) -> str:
        """Why a float16 Cast or product overflowed, from where its input's values came: the
        data (scale it), a parameter or activations grown by the updates so far (a diverging
        run: the lr), or the model as given (step 1: whatever the lr)."""
        big = {}
        for name in node.input[:1] if cast else node.input[:2]:
            v = env.get(name, feeds.get(name)) if name else None
            if v is not None and getattr(v, "size", 0):
                with np.errstate(invalid="ignore"):
                    big[name] = float(to_host(self.xp.nanmax(self.xp.abs(v.astype(
                        np.float32)))))
        sizes = ", ".join(f"'{k}' up to {v:.4g}" for k, v in big.items())
        head = (f": a value beyond float16's range (65504) was cast to float16 ({sizes})"
                if cast else
                f": its float16 result exceeds float16's range (65504) (its inputs: {sizes})")
        bf16 = "precision bf16 (float32's range) or fp32"
        data = [k for k in big if k in feeds and k not in self.params and k not in self.state]
        if cast and data:
            return f"{head}: the data holds it; scale the data down, or use {bf16}"
        params = [k for k in big if k in self.params]
        if self.step == 0:
            given = (f": parameter '{params[0]}' holds it as the model gives it" if cast and
                     params else ", at the first step")
            return f"{head}{given}, whatever the learning rate; use {bf16}"
        what = f"parameter '{params[0]}' grew" if params else "the values grew"
        return (f"{head} after {self.step} update(s): {what} (a diverging run: lower "
                f"optimizer.lr or set grad_clip), or use {bf16}")

    # -- the job -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, profile: ProfileRequest | None = None) -> dict:
        """Train to the configured length (continuing from the newest checkpoint if `resume`),
        evaluate, and export to cfg.output from rank 0. With `profile`, the steps after its
        warm-up are timed and the profile is printed (and returned under "profile")."""
        if self.rank == 0 and self.cfg.checkpoint.dir is not None:
            self._hold_checkpoint_dir()
        if (not resume and not self._resumed and self.rank == 0
                and self.cfg.checkpoint.dir is not None):
            # (mixed with this run's, an earlier run's later steps would be what --resume picks)
            old = checkpoint.latest(self.cfg.checkpoint.dir)
            if old is not None:
                raise TrainerError(
                    f"checkpoint.dir {self.cfg.checkpoint.dir} holds checkpoints of an earlier "
                    f"run (the newest: {old.name}); continue that run with --resume, or give "
                    "this one another checkpoint.dir (or remove them)")
        resumed = self.resume() if resume else False
        if self._left_note:
            self.log.info(self._left_note)
        self.log.open(resume_step=self.step if resumed else None, total_steps=self.total_steps,
                      evaluated=self.last_eval_step == self.step)
        self._profile_request = profile
        self._profile_from = self.step
        self._profile_start = (self.step, dict(self.times))
        # (whether the timed window is open: from the first step where there is no warm-up)
        self._profile_warm = profile is not None and profile.warmup == 0
        try:
            return self._fit()
        finally:
            self.batches.close()
            self.log.close()
            if getattr(self, "_lock", None) is not None:  # (checkpoint.dir free again)
                os.close(self._lock)
                self._lock = None

    def _hold_checkpoint_dir(self) -> None:
        """An exclusive lock on checkpoint.dir (its `.lock` file, held while `fit` runs and
        released if the process is killed): a second run writing there, a requeued job started
        while the first still runs, is refused at its start (two writers deleted each other's
        checkpoints in progress, and the newest checkpoint could be the other run's)."""
        import errno
        import fcntl
        import socket

        if getattr(self, "_lock", None) is not None:
            return
        folder = Path(self.cfg.checkpoint.dir)
        checkpoint.make_dirs(folder)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TrainerError(f"checkpoint.dir {folder} is in use by another run "
                                   f"({holder}); wait for it to end, or give this run another "
                                   "checkpoint.dir") from None
            raise TrainerError(f"checkpoint.dir {folder}: cannot lock it "
                               f"({exc.strerror or exc})") from None
        try:  # (who holds it, for a second run's message: a full disk leaves it unsaid)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        except OSError:
            pass
        self._lock = fd  # (released at the end of fit, or when the process ends)
        try:  # (a killed writer's temporary or half-deleted folders: a resume of a finished
            checkpoint.remove_leftovers(folder)  # run saves nothing, so save never removed them)
        except OSError:
            pass

    def _fit(self) -> dict:
        cfg = self.cfg
        self.log.info(f"onnx-trainer: {cfg.model.name} on {device_name(self.xp)}, "
                      f"{self.world} process(es), {len(self.names)} tensors / {self.size} "
                      f"parameters, {self.total_steps} steps of global batch "
                      f"{cfg.data.batch_size}")
        t0, seen, last_epoch = time.perf_counter(), 0, self.position[0]
        row: dict = {}
        stopped = self.stopped_early  # (a resumed run that had stopped early stays stopped)
        # (a fit stopped by a signal leaves these set: the next fit of this Trainer, a
        # notebook's after an interrupt, stopped after one step, saying it was signalled)
        self._stop_signal, self._stop_agreed, self._signal_code = False, False, 0
        self._finishing = False
        with _StopOnSignal(self):
            while self.step < self.total_steps and not stopped:
                micro, epoch, start = [], last_epoch, self.position
                for _ in range(cfg.accumulate):
                    epoch, arrays, local_w, global_w, samples = self._next_micro_batch()
                    micro.append((arrays, local_w, global_w))
                    seen += samples
                # (an epoch whose end this step's accumulation crossed; one evaluated after
                # the step that ended it, below, is not evaluated again)
                if (epoch != last_epoch and self._eval_due(epochs_done=epoch)
                        and self.last_eval_step != self.step):
                    t_aside = time.perf_counter()
                    stopped = self._evaluate_and_track(last_epoch)
                    t0 += time.perf_counter() - t_aside  # (samples_per_s: training's)
                last_epoch = epoch
                if stopped:
                    break
                lrs = self.schedule.lrs(self.step)  # per parameter group; [0]: top level
                try:
                    loss = self.train_step(micro, lrs)
                except NonFiniteLoss as exc:  # (every rank: the loss and gradients are global)
                    raise self._saved_before(exc, start) from None
                self._profile_tick(final=self.step >= self.total_steps)
                now = time.perf_counter()
                # the lr of the first group that holds tensors (not the top level's where
                # groups cover every tensor); each such group's when they differ
                used = [lrs[g] for g in self.optimizer.used_groups]
                self.log.progress(self.step, loss, used[0], seen / max(now - t0, 1e-9))
                if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps:
                    row = self._step_row(epoch, loss, used, seen / max(now - t0, 1e-9))
                    t0, seen = now, 0
                    self._remember(row)
                    self.log.record(row)
                # Evaluations due after this step come before its checkpoint, which then holds
                # what they decided (a plateau's lr cut, the best so far, early stopping)
                ended = self.position[1] >= self.batches.steps_per_epoch
                t_aside = time.perf_counter()  # (evaluations and checkpoints: not in the
                if self.step < self.total_steps and (  # next row's samples_per_s)
                        (ended and self._eval_due(epochs_done=epoch + 1))
                        or self._eval_due(step=self.step)):
                    stopped = self._evaluate_and_track(epoch)
                check = cfg.distributed.check_consistency_every
                if check and self.world > 1 and (self.step % check == 0
                                                 or self.step == self.total_steps):
                    self.check_consistency()
                every = cfg.checkpoint.every_steps
                if (cfg.checkpoint.dir and every and self.step % every == 0
                        and self.step < self.total_steps):  # (the last: after its evaluation)
                    self.save_checkpoint()
                t0 += time.perf_counter() - t_aside
                if self._stop_agreed or stopped:
                    break
            # (a signal from here on: the finished run's evaluation, checkpoint and export
            # are completed first; _StopOnSignal says so)
            self._finishing = True
            if self._stop_agreed:
                if cfg.checkpoint.dir and self._saved_step != self.step:
                    self.save_checkpoint()
                raise Interrupted(self._signal_code, self.step,
                                  self.cfg.checkpoint.dir is not None)
            self._profile_tick(final=True)
            result = {"steps": self.step, "loss": row.get("loss")}
            if self.profile_result is not None:
                result["profile"] = self.profile_result
            # (a failure of the end-of-run evaluation, in one process, or of the last
            # checkpoint's write loses nothing: the checkpoint and the trained model are still
            # written, then the run fails saying so)
            failed: list[tuple[str, TrainerError]] = []
            if self.eval_arrays is not None:
                if self.last_eval_step != self.step:
                    try:
                        self._evaluate_and_track(last_epoch)
                    except TrainerError as exc:
                        if self.world > 1:  # (the other ranks wait in its collective)
                            raise
                        failed.append(("evaluation", exc))
                result.update(self.last_metrics)
            # the end of a run is always saved, after its evaluation (a run continued from it
            # with more steps knows the best model so far)
            if cfg.checkpoint.dir and self._saved_step != self.step:
                try:
                    self.save_checkpoint()
                except checkpoint.WriteError as exc:  # (rank 0's write, after the collectives)
                    failed.append(("checkpoint", exc))
            if stopped:
                result["early_stop"] = stopped
            if self.rank == 0:
                try:
                    path = self.export(cfg.output)
                except TrainerError as exc:  # (a full disk: the checkpoint's failure too)
                    if not failed:
                        raise
                    raise _retyped(exc, f"{exc}" + "".join(
                        f"; the end-of-run {w} failed too: {e}" for w, e in failed)) from exc
                result["output"] = str(path)
                self.log.info(f"wrote {path}")
                if self.best_path is not None:
                    result["best"] = {"output": str(self.best_path), "step": self.best_step,
                                      cfg.best.metric: self.best_value}
            # (last: the end-of-run evaluation, checkpoint and export take memory too, the
            # largest share with frozen weights)
            result["peak_memory_mb"] = self._report_memory()
            if failed:
                (what, first), more = failed[0], failed[1:]
                raise _retyped(first, f"{first}" + "".join(
                    f"; the end-of-run {w} failed too: {e}" for w, e in more)
                    + f"; the end-of-run {what} failed after all {self.step} steps, "
                    f"and the trained model is written to {result['output']}"
                    + ("" if what == "checkpoint" or not cfg.checkpoint.dir
                       else " (and checkpointed)" if not more else "")) from first
        return result

    def _saved_before(self, exc: NonFiniteLoss, position) -> NonFiniteLoss:
        """on_nan stop with checkpoint.dir: the state before the failing step (its parameters,
        optimizer and BatchNorm state, untouched or put back, and the data position of its
        first micro-batch) saved as a checkpoint, and the error saying so."""
        if not self.cfg.checkpoint.dir:
            return exc
        if self._saved_step == self.step:
            where = f"checkpoint {checkpoint.latest(self.cfg.checkpoint.dir)}"
        else:
            self.position = position
            path = self.save_checkpoint()
            where = f"checkpoint {path}" if path else "a checkpoint of checkpoint.dir (rank 0)"
        return NonFiniteLoss(f"{exc}; the state before step {self.step + 1} is saved in "
                             f"{where} (continue from it with --resume)")

    def _report_memory(self) -> float:
        """Log the memory the run needed, next to the pre-flight estimate; returns MiB."""
        used, what = memory_high_water(self.xp)
        est = getattr(self.preflight, "estimate", None) if self.preflight else None
        against = ""
        if est is not None:
            scope = " (the training state alone)" if self.xp is np else ""
            against = f"; estimated before training{scope}: {human(est.total)}" + (
                f", the set-up's peak {human(est.setup)}"
                if est.setup > est.total and self.xp is np else "")
        rank = f" (rank {self.rank})" if self.world > 1 else ""
        self.log.info(f"memory{rank}: {what}: {human(used)}{against}")
        return used / 2**20

    # -- profile --------------------------------------------------------------------------------
    def _profile_tick(self, final: bool = False) -> None:
        """Start the timed window after the warm-up steps (at once without one); at its end
        (or the run's: then over the steps the window holds, or, for a run that ended within
        the warm-up, over every step it made, which the report says), time the nodes and
        report."""
        req = self._profile_request
        if req is None or self._last_feeds is None:
            return
        first, before = self._profile_start
        done = self.step - first
        if not self._profile_warm and done >= req.warmup and not final:
            self._profile_start = (self.step, dict(self.times))
            self._profile_warm = True
            return
        if self._profile_warm and done >= req.steps or (final and done > 0):
            self._profile_request = None
            means = {k: (self.times[k] - before[k]) / done for k in self.times}
            self.profile_result = self._profile_report(req, means, done, self._profile_warm)

    def _profile_report(self, req: ProfileRequest, means: dict, steps: int,
                        warm: bool = True) -> dict:
        plan, feeds = self._last_feeds
        self._profiling = True
        try:
            nodes, events = node_times(plan.executor, feeds, req.repeat, plan.loss)
        finally:
            self._profiling = False
        # (a step runs the graph once per micro-batch: the table is per step, the trace shows
        # one run)
        acc = self.cfg.accumulate
        nodes = [(n, op, ph, t * acc) for n, op, ph, t in nodes]
        step = means["step"] + means["data"]
        total_nodes = sum(t for _, _, _, t in nodes)
        out = {"steps": steps, "step_s": step, "nodes_s": total_nodes, "data_s": means["data"],
               "graph_s": means["graph"], "communication_s": means["communication"],
               "optimizer_s": means["optimizer"], "runs_per_step": acc, "warm": warm,
               "nodes": [{"name": n, "op": op, "phase": ph, "s": t} for n, op, ph, t in nodes]}
        if self.rank == 0:
            for line in profile_table(out, req.top):
                self.log.info(line)
            if req.trace is not None:
                try:
                    path = write_trace(req.trace, out, events, self.rank)
                except checkpoint.WriteError as exc:  # (a by-product: training goes on)
                    self.log.info(f"warning: {exc}; training goes on")
                else:
                    self.log.info(f"wrote the Chrome trace {path} (open it in "
                                  "https://ui.perfetto.dev)")
        return out

    def _eval_due(self, *, step: int | None = None, epochs_done: int | None = None) -> bool:
        if self.eval_arrays is None:
            return False
        e = self.cfg.eval
        if step is not None:
            return bool(e.every_steps) and step % e.every_steps == 0
        return bool(e.every_epochs) and epochs_done % e.every_epochs == 0

    def _evaluate_and_track(self, epoch: int) -> str:
        """Evaluate and log; keep the best model; returns why to stop early ("" to go on)."""
        metrics = self._log_evaluation(epoch)
        self.last_metrics, self.last_eval_step = metrics, self.step
        cfg = self.cfg
        if self.schedule.metric:  # reduce-on-plateau follows its eval metric
            self.schedule.observe(metrics[self.schedule.metric])
        if cfg.best is not None:
            value = metrics[cfg.best.metric]
            if _better(value, self.best_value, _mode(cfg.best.mode, cfg.best.metric), 0.0):
                before = self.best_value, self.best_step
                self.best_value, self.best_step = value, self.step
                if self.rank == 0:
                    try:
                        self.best_path = self.export(best_path(cfg.output))
                    except checkpoint.WriteError as exc:
                        # (a by-product of the run: the steps since the last checkpoint are
                        # not lost over it; the next better evaluation writes it again)
                        self.best_value, self.best_step = before
                        self.log.info(f"warning: {exc}; the best model so far stays as it "
                                      "was, training goes on")
                    else:
                        self.log.info(f"best {cfg.best.metric} {value:.6g} at step "
                                      f"{self.step}: wrote {self.best_path}")
        es = cfg.early_stop
        if es is not None:
            value = metrics[es.metric]
            if _better(value, self.es_best, _mode(es.mode, es.metric), es.min_delta):
                self.es_best, self.es_bad = value, 0
            else:
                self.es_bad += 1
                if self.es_bad >= es.patience:
                    why = (f"{es.metric} did not improve on {self.es_best:.6g} for {es.patience} "
                           f"evaluation(s)" if self.es_best is not None else
                           f"{es.metric} was not finite at {es.patience} evaluation(s) in a row")
                    self.log.info(f"early stop at step {self.step}: {why}")
                    self.stopped_early = why
                    return why
        return ""

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Parameters, optimizer state, BN statistics, step and data position (rank 0). A
        sharded optimizer's state is gathered first (a collective: every rank calls this), so
        a checkpoint always holds the whole state and resumes sharded or not. Returns its
        folder (on rank 0; None on the others)."""
        optim = self._full_optimizer_state()
        self._sync_state("checkpoint")
        self._saved_step = self.step
        if self.rank != 0:
            return None
        arrays = {f"param/{k}": to_host(v) for k, v in self.params.items()}
        arrays.update({f"state/{k}": to_host(v) for k, v in self.state.items()})
        arrays.update({f"optim/{k}": v for k, v in optim.items()})
        arrays.update({f"sched/{k}": v for k, v in self.schedule.state_dict().items()})
        meta = {"position": list(self.position), "world_size": self.world,
                "batch_size": self.cfg.data.batch_size, "model": str(self.cfg.model),
                "optimizer": self.cfg.optimizer.type, "loss": self.cfg.loss.type,
                "accumulate": self.cfg.accumulate,
                "total_steps": self.total_steps,
                # (what a resume with another lr or schedule says it changed)
                "base_lrs": [float(b) for b in self.schedule.base_lrs],
                "schedule": self.cfg.schedule.type,
                # (the flat buffers' order: another precision's graph may make them in another)
                "layout": [[k, int(np.prod(self.shapes[k]))] for k in self.names],
                # (what the position's sample order follows from)
                "data_order": self._data_order()}
        if self.scaler:
            meta.update(self.scaler.state())
        # what evaluations and skipped steps decided so far, so that a resumed run goes on as
        # this one would (best model, early stopping, counters)
        def num(v):
            return None if v is None else float(v)
        meta["tracking"] = {"last_eval_step": self.last_eval_step,
                            "last_metrics": {k: num(v) for k, v in self.last_metrics.items()},
                            "best_value": num(self.best_value), "best_step": self.best_step,
                            "best_path": str(self.best_path) if self.best_path else None,
                            "es_best": num(self.es_best), "es_bad": self.es_bad,
                            "stopped_early": self.stopped_early,
                            # (the criterion the count follows: a resume that changes it)
                            "early_stop": self._early_stop_criterion(),
                            "skipped": self.skipped, "scaler_skipped": self.scaler_skipped}
        # (the TensorBoard rows so far, which a SIGKILL after the checkpoint lost for good:
        # the resume starts after it)
        self.log.flush_events()
        path = checkpoint.save(self.cfg.checkpoint.dir, self.step, arrays, meta,
                               self.cfg.checkpoint.keep)
        self.log.info(f"checkpoint {path}")
        return path

    def _sync_state(self, why: str) -> None:
        """Rank 0's training state (BatchNorm running statistics, which each process updates
        from its own batches) on every rank, as the checkpoint and the export hold it: after a
        checkpoint all ranks continue from what a resumed run loads, and an evaluation scores
        the weights and statistics that are exported. (Training-mode BatchNormalization uses
        batch statistics, so the weights do not depend on it.)"""
        if self.world > 1:
            for k, v in self.state.items():
                self.comm.bcast_(v, label=f"training state {k} ({why})")

    def _full_optimizer_state(self) -> dict:
        """The optimizer state as host arrays over the whole flat buffer."""
        state = self.optimizer.state_dict()
        if not self.shard:
            return {k: to_host(v) for k, v in state.items()}
        out = {}
        for name, v in state.items():
            # (by name, not shape: NAdam's mu product per group is as long as a shard of as
            # many elements, and only some ranks gathered it: a hang, or a wrong checkpoint)
            if name in self.optimizer.state:  # per-element: gather the shards
                buf = self.xp.zeros(self.shard_k * self.world, v.dtype)
                part = buf[self.shard_lo:self.shard_lo + self.shard_k]
                part[:self.shard_n] = v
                self.comm.allgather_(part, buf, label=f"optimizer state {name}")
                out[name] = to_host(buf[:self.size])
            else:
                out[name] = to_host(v)
        return out

    def _data_order(self) -> dict:
        """What makes an epoch's sample order (and so what a checkpoint's position means)."""
        return {"samples": int(self.batches.n), "seed": int(self.cfg.seed),
                "shuffle": bool(self.cfg.data.shuffle)}

    def _in_own_layout(self, full: dict, layout) -> dict:
        """A whole-buffer optimizer state of a checkpoint whose flat layout is `layout`
        ([name, size] in buffer order) with its per-element buffers reordered to this run's
        (the order in which the backward makes the gradients, which precision changes)."""
        mine = [(k, int(np.prod(self.shapes[k]))) for k in self.names]
        if not layout:
            return full
        theirs = [(str(k), int(n)) for k, n in layout]
        if theirs == mine:
            return full
        if sorted(theirs) != sorted(mine):
            raise TrainerError("the checkpoint's optimizer state covers other tensors "
                               f"({listing([k for k, _ in theirs])})")
        start, at = {}, 0
        for k, n in theirs:
            start[k] = at
            at += n
        order = np.concatenate([np.arange(start[k], start[k] + n) for k, n in mine])
        return {k: v[order] if k in self.optimizer.state else v for k, v in full.items()}

    def _own_optimizer_state(self, full: dict) -> dict:
        """This rank's part of a whole-buffer optimizer state (all of it when not sharded)."""
        if not self.shard:
            return full
        lo, n = self.shard_lo, self.shard_n
        return {k: v[lo:lo + n] if k in self.optimizer.state else v for k, v in full.items()}

    def resume(self) -> bool:
        """Load the newest complete checkpoint of checkpoint.dir; False if there is none."""
        directory = self.cfg.checkpoint.dir
        if directory is None:
            raise TrainerError("--resume needs checkpoint.dir in the config")
        path = checkpoint.latest(directory)
        newer = [p.name for p in checkpoint.incomplete(directory)
                 if path is None or p.name > path.name]
        if newer:
            self.log.info(f"warning: checkpoint.dir {directory}: {listing(newer)} without "
                          f"{checkpoint.MANIFEST} (not a complete checkpoint: a copy cut short?) "
                          "skipped" + (f"; resuming from {path.name}" if path else ""))
        if path is None:
            self.log.info(f"no checkpoint in {directory}; starting from the model's weights")
            return False
        arrays, meta = checkpoint.load(path)
        try:
            return self._resume_from(path, arrays, meta)
        except (KeyError, ValueError, TypeError, IndexError,  # (a manifest or arrays edited:
                AttributeError) as exc:  # a list where a mapping was, as much as a bad value)
            raise TrainerError(f"checkpoint {path} is damaged: {type(exc).__name__}: "
                               f"{exc}; resume from another one (remove this folder)") from None

    def _schedule_length_note(self, was: int | None) -> None:
        """A warning where the run's length changed since the checkpoint (steps or epochs
        raised to go on, as a finished run's resume suggests) and the schedule is laid over
        the run's length (cosine, onecycle, linear and polynomial without total_iters): the
        next step's lr jumps to the new length's curve."""
        if was is None or int(was) == self.total_steps or self.step >= self.total_steps:
            return
        from trainer.schedule import lr_at

        base = self.schedule.base_lrs[0]
        old, new = (lr_at(self.cfg.schedule, base, self.step, n)
                    for n in (int(was), self.total_steps))
        ckpt_type = getattr(self, "_ckpt_schedule", None)
        # (with the type changed too, the checkpoint's run followed another curve: the new
        # type over the old length is what keeping the length would give)
        then = ("the checkpoint's run gives" if ckpt_type in (None, self.schedule.type) else
                f"{self.schedule.type} over the checkpoint's {int(was)} steps gives")
        if old == new:
            return
        if self.step >= int(was) and ckpt_type in (None, self.schedule.type):
            # (a finished run continued: it has no such step, and its curve past its end is
            # no lr it gave)
            last = lr_at(self.cfg.schedule, base, int(was) - 1, int(was))
            self.log.info(f"the run is {self.total_steps} steps now and was {int(was)} at the "
                          f"checkpoint, which ended that run at lr {last:.6g}; schedule "
                          f"{self.schedule.type} is laid over the run's length, so step "
                          f"{self.step + 1} runs at lr {new:.6g}")
        else:
            self.log.info(f"warning: the run is {self.total_steps} steps now and was "
                          f"{int(was)} at the checkpoint; schedule {self.schedule.type} is laid "
                          f"over the run's length, so step {self.step + 1} runs at lr {new:.6g} "
                          f"where {then} {old:.6g} (keep steps/epochs as "
                          "they were to keep its curve; linear and polynomial also take "
                          "schedule.total_iters)")

    def _take_values(self, path: Path, arrays: Mapping) -> None:
        """The parameters and state of checkpoint `path` (its arrays) into this run's, after
        checking it holds the tensors this config trains, of this model's shapes."""
        names = {k.split("/", 1)[1] for k in arrays if k.startswith("param/")}
        if names != set(self.names):
            only_ck, only_cfg = sorted(names - set(self.names)), sorted(set(self.names) - names)
            raise TrainerError(
                f"checkpoint {path} trains another set of tensors than this config"
                + (f": only the checkpoint trains {listing(only_ck)}" if only_ck else "")
                + (f"{';' if only_ck else ':'} only this config trains {listing(only_cfg)}"
                   if only_cfg else "")
                + " ('trainable' or 'frozen' changed, or another model?). A resume continues "
                "the same run; to train another set from this point, write its model with the "
                f"config it was trained with (onnx-trainer export CONFIG --checkpoint {path} "
                "-o OUT.onnx) and start a new run from that file")
        odd = [f"'{k.split('/', 1)[1]}' ({v.dtype})" for k, v in arrays.items()
               if k.startswith(("param/", "state/")) and v.dtype.kind not in "biuf"]
        if odd:  # (complex values lost their imaginary part with NumPy's warning)
            raise TrainerError(f"checkpoint {path} is damaged: {listing(odd)} hold(s) no real "
                               "numbers; use another one")
        wrong = [f"'{k}' {tuple(arrays[f'{kind}/{k}'].shape)} (this model: {tuple(v.shape)})"
                 for kind, own in (("param", self.params), ("state", self.state))
                 for k, v in own.items()
                 if f"{kind}/{k}" in arrays and arrays[f"{kind}/{k}"].shape != v.shape]
        lost = [k for k in self.state if f"state/{k}" not in arrays]
        if wrong or lost:
            raise TrainerError(
                f"checkpoint {path} does not fit this model: "
                + (f"tensors of other shapes: {', '.join(wrong[:4])}" if wrong else "")
                + ("; " if wrong and lost else "")
                + (f"state it does not hold: {', '.join(lost[:4])}" if lost else "")
                + " (a checkpoint of another model? use another checkpoint.dir)")
        for k in self.names:
            self.params[k][...] = self.xp.asarray(arrays[f"param/{k}"])
        for k in self.state:
            self.state[k][...] = self.xp.asarray(arrays[f"state/{k}"])

    def load_checkpoint(self, where: Path) -> Path:
        """The parameters and state of a checkpoint folder, or of the newest one in a
        checkpoint.dir, for `eval --checkpoint` and `export` (no optimizer, no data position):
        returns the folder read."""
        where = Path(where)
        if not where.exists():
            near = [p.name for p in checkpoint.complete(where.parent)] \
                if where.parent.is_dir() else []
            raise TrainerError(f"checkpoint not found: {where}" + (
                f" ({where.parent} holds {listing(near[::-1], 6)}; or give the folder itself for "
                "its newest)" if near else ""))
        path = where if (where / checkpoint.MANIFEST).is_file() else checkpoint.latest(where)
        if path is None:
            raise TrainerError(f"{where} is no checkpoint and holds none (a checkpoint is a "
                               f"{checkpoint.PREFIX}N folder with {checkpoint.MANIFEST}, as "
                               "checkpoint.dir holds them)")
        arrays, meta = checkpoint.load(path)
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TrainerError(f"checkpoint {path} is damaged: its manifest's step {step!r} is "
                               "not an integer of at least 0")
        _step_as_named(path, meta)  # (the export's metadata would carry the manifest's)
        try:
            self._take_values(path, arrays)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            # (arrays edited: strings where a parameter's floats were; as --resume says it)
            raise TrainerError(f"checkpoint {path} is damaged: {type(exc).__name__}: {exc}; "
                               "use another one") from None
        self.step = step
        world = meta.get("world_size")  # (the export's metadata: the run's, not this launch's)
        self._trained_world = world if isinstance(world, int) and world >= 1 else None
        # (and the loss and optimizer that trained it, where the manifest names them)
        self._trained_with = {k: meta[k] for k in ("loss", "optimizer")
                              if isinstance(meta.get(k), str)}
        return path

    def _resume_from(self, path: Path, arrays: dict, meta: dict) -> bool:
        # (the manifest against its folder's name and the run: an edited or mixed-up manifest
        # would resume at another step or position than the weights it comes with)
        _step_as_named(path, meta)
        position = meta.get("position")
        if not (isinstance(position, list) and len(position) == 2
                and all(isinstance(v, int) and v >= 0 for v in position)):
            raise TrainerError(f"checkpoint {path} is damaged: its manifest's data position "
                               f"{position!r} is not [epoch, batch]")
        for key, low in (("step", 0), ("total_steps", 1), ("world_size", 1), ("batch_size", 1)):
            value = meta.get(key)  # (absent from checkpoints of older versions but step)
            if (value is not None or key == "step") and not (
                    isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise TrainerError(f"checkpoint {path} is damaged: its manifest's {key} "
                                   f"{value!r} is not an integer of at least {low}")
        if meta.get("world_size", self.world) != self.world:
            # (data.drop_last false: a last partial batch is trained where it holds a sample
            # for every process, so the epoch's length may change with their number)
            bs = int(meta.get("batch_size", self.cfg.data.batch_size))
            rest = self.batches.n % bs if bs == self.cfg.data.batch_size else 0
            trained = [bool(rest) and not self.cfg.data.drop_last and rest >= w
                       for w in (meta["world_size"], self.world)]
            self.log.info(
                f"resuming a run of {meta['world_size']} process(es) on {self.world}: the "
                "number of processes leaves the global batch and its order as they were "
                "(each process takes another share of it)" + (
                    "" if trained[0] == trained[1] else
                    f"; an epoch's last {rest} sample(s), a partial batch, "
                    + ("are trained now, where they were left out" if trained[1] else
                       "are left out now (fewer than one per process), where they were "
                       "trained") + f": an epoch is {self.batches.steps_per_epoch} batches"))
        self._take_values(path, arrays)
        optim = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optim/")}
        was = meta.get("optimizer")
        if was != self.cfg.optimizer.type:
            self.log.info(f"warning: the checkpoint's optimizer ({was}) differs from this "
                          f"config's ({self.cfg.optimizer.type}): the parameters are resumed, "
                          "the optimizer state starts fresh")
        elif not self.optimizer.state_keys_match(optim):
            mine = listing(sorted(self.optimizer.state_dict()))
            self.log.info(f"warning: the checkpoint's {was} state holds "
                          f"{listing(sorted(optim))}, this config's {mine} (its settings "
                          "changed): the parameters are resumed, the optimizer state starts "
                          "fresh")
        else:
            try:
                # (checkpoints written before the layout was recorded hold their parameters
                # in their flat buffers' order: the model's before 2026-12-03, the backward's
                # after)
                optim = self._in_own_layout(optim, meta.get("layout") or [
                    [k[len("param/"):], int(np.prod(v.shape))] for k, v in arrays.items()
                    if k.startswith("param/")])
                self.optimizer.load_state_dict(self._own_optimizer_state(optim))
            except TrainerError as exc:  # same keys, other shapes: the groups changed
                self.log.info(f"warning: {exc}; the optimizer state starts fresh")
        self.schedule.load_state_dict(
            {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("sched/")})
        self._schedule_change_note(meta)
        self.step = int(meta["step"])
        bs, acc = self.cfg.data.batch_size, self.cfg.accumulate
        old_bs = int(meta.get("batch_size", bs))
        old_acc = meta.get("accumulate", acc)  # (absent from checkpoints of older versions)
        old_acc = old_acc if isinstance(old_acc, int) and old_acc >= 1 else acc
        # (an epochs run whose steps take other numbers of samples now: its length in steps is
        # laid out again below, from the data position)
        resized = not self.cfg.steps and (old_bs, old_acc) != (bs, acc)
        self._ckpt_schedule = meta.get("schedule")  # (the checkpoint run's schedule type)
        if not resized:
            self._schedule_length_note(meta.get("total_steps"))
        if self.scaler:
            init = float(self.scaler.scale)
            if not self.scaler.load(meta):
                self.log.info(f"the checkpoint holds no loss scale (it was not an fp16 run): "
                              f"starting from loss_scale.init {init:g}")
            elif float(self.scaler.scale) != init:  # (as GradScaler's load_state_dict)
                self.log.info(f"loss scale {float(self.scaler.scale):g} from the checkpoint "
                              f"(loss_scale.init {init:g} is for runs that start fresh)")
        epoch, index = (int(v) for v in meta["position"])
        was, now = meta.get("data_order"), self._data_order()
        if was and not (was.get("shuffle") or now["shuffle"]):  # (no order to draw)
            was = {**was, "seed": now["seed"]}
        if was and was != now:  # (checkpoints written before it hold none)
            names = {"samples": "training samples", "seed": "seed", "shuffle": "shuffle"}
            what = ", ".join(f"{was.get(k)} -> {now[k]} {v}" if k == "samples" else
                             f"{v} {was.get(k)} -> {now[k]}"
                             for k, v in names.items() if was.get(k) != now[k])
            goes_on = (f"epoch {epoch} goes on at batch {index} of another order, so some of "
                       "its samples may be seen twice and others not at all"
                       if index < self.batches.steps_per_epoch or int(meta.get(
                           "batch_size", self.cfg.data.batch_size)) != self.cfg.data.batch_size
                       else
                       f"epoch {epoch} has no batch {index} now: epoch {epoch + 1} starts")
            self.log.info(f"warning: the data's sample order changed since the checkpoint "
                          f"({what}): {goes_on}")
        if old_bs != self.cfg.data.batch_size:
            # (the checkpoint's epoch was over when its batches were: the samples a partial
            # last batch left out at the old size are not trained at the new one)
            full, rest = divmod(self.batches.n, old_bs)
            old_spe = full + (1 if rest >= int(meta.get("world_size", self.world))
                              and not self.cfg.data.drop_last else 0)
            if index >= old_spe:
                epoch, index = epoch + 1, 0
                self.log.info(f"batch size changed from {old_bs} to "
                              f"{self.cfg.data.batch_size}: the checkpoint ended epoch "
                              f"{epoch - 1}; resuming at the start of epoch {epoch}")
            else:
                seen = index * old_bs
                index = seen // self.cfg.data.batch_size
                self.log.info(f"batch size changed from {old_bs} to "
                              f"{self.cfg.data.batch_size}: resuming epoch {epoch} at sample "
                              f"{index * self.cfg.data.batch_size}"
                              + ("" if seen % self.cfg.data.batch_size == 0 else
                                 f" (the checkpoint was at sample {seen}; the rest of that "
                                 "batch is seen again)"))
        self.position = (epoch, index)
        if resized:
            self._relength(epoch, index, old_bs, old_acc, meta.get("total_steps"))
        tracked = meta.get("tracking") or {}  # (checkpoints written before it hold none)
        for key in ("last_eval_step", "es_bad", "skipped", "scaler_skipped", "best_step"):
            value = tracked.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TrainerError(f"checkpoint {path} is damaged: its manifest's tracking."
                                   f"{key} {value!r} is not an integer; resume from another "
                                   "one (remove this folder)")
        self.last_eval_step = int(tracked.get("last_eval_step", -1))
        self.last_metrics = dict(tracked.get("last_metrics") or {})
        self.best_value, self.best_step = tracked.get("best_value"), tracked.get("best_step")
        self.best_path = Path(tracked["best_path"]) if tracked.get("best_path") else None
        self.es_best, self.es_bad = tracked.get("es_best"), int(tracked.get("es_bad", 0))
        self.stopped_early = tracked.get("stopped_early", "")
        self.skipped = int(tracked.get("skipped", 0))
        self.scaler_skipped = int(tracked.get("scaler_skipped", 0))
        self._saved_step = self.step
        self._resumed = True
        self.log.info(f"resumed from {path} at step {self.step}")
        self._early_stop_change(tracked)
        if self.stopped_early:
            self.log.info(f"the checkpoint's run stopped early ({self.stopped_early}): "
                          "nothing to train (remove or relax early_stop to go on)")
        if self.step >= self.total_steps:
            self.log.info(f"the checkpoint already reaches the configured length "
                          f"({self.total_steps} steps): nothing to train; raise steps or "
                          "epochs to continue")
        return True

    def _relength(self, epoch: int, index: int, old_bs: int, old_acc: int,
                  was_total: int | None) -> None:
        """An `epochs` run resumed with another batch size or accumulate: the checkpoint's
        step count is of steps of the old size, so the run's length in steps is what the
        checkpoint's steps took plus the steps left to the end of the last epoch from the data
        position (epoch, index); the schedule is laid over that length."""
        spe, acc = self.batches.steps_per_epoch, self.cfg.accumulate
        batches = max(self.cfg.epochs * spe - (epoch * spe + index), 0)
        left, rest = divmod(batches, acc)
        total = self.step + left
        if total != self.total_steps and total >= 1:
            state = self.schedule.state_dict()  # (plateau's reductions so far kept)
            self.schedule = make_schedule(self.cfg.schedule, self.optimizer, total)
            self.schedule.load_state_dict(state)
            self.total_steps = total
        self._left_note = ""  # (of the layout from the start, said here for this one)
        self.log.info(f"steps of {acc} x {self.cfg.data.batch_size} samples now (the "
                      f"checkpoint's: {old_acc} x {old_bs}): {left} more step(s) to the end of "
                      f"epoch {self.cfg.epochs - 1}, {self.step + left} in all"
                      + (f" (the last {rest} batch(es) are not trained: fewer than accumulate)"
                         if rest else ""))
        self._schedule_length_note(was_total)

    def _early_stop_criterion(self) -> dict | None:
        es = self.cfg.early_stop
        return None if es is None else {"metric": es.metric, "mode": _mode(es.mode, es.metric),
                                        "patience": es.patience, "min_delta": es.min_delta}

    def _early_stop_change(self, tracked: Mapping) -> None:
        """A resume whose early_stop differs from the checkpoint's: off now, the run goes on;
        another metric, mode or min_delta, its count starts again; another patience, the count
        so far is held against it (checkpoints written before the criterion was recorded: the
        same metric and mode assumed)."""
        now, was = self._early_stop_criterion(), tracked.get("early_stop")
        why = self.stopped_early
        if now is None:
            self.es_best, self.es_bad, self.stopped_early = None, 0, ""
            if why:
                self.log.info(f"the checkpoint's run stopped early ({why}); early_stop is off "
                              "now: training goes on")
            return
        if isinstance(was, Mapping) and (was.get("metric"), was.get("mode"),
                                         was.get("min_delta")) != (
                now["metric"], now["mode"], now["min_delta"]):
            self.es_best, self.es_bad, self.stopped_early = None, 0, ""
            self.log.info(f"early_stop follows {now['mode']} {now['metric']} with min_delta "
                          f"{now['min_delta']:g} now (the checkpoint's: {was.get('mode')} "
                          f"{was.get('metric')}, min_delta {was.get('min_delta')}): its count "
                          "starts again" + (f"; the checkpoint's run had stopped early ({why}), "
                                            "training goes on" if why else ""))
            return
        if why and self.es_bad < now["patience"]:
            self.stopped_early = ""
            self.log.info(f"the checkpoint's run stopped early ({why}); with patience "
                          f"{now['patience']} now ({self.es_bad} evaluation(s) without "
                          "improvement so far), training goes on")

    def _schedule_change_note(self, meta: Mapping) -> None:
        """Say what a resume does with an lr or schedule type changed since the checkpoint
        (checkpoints written before they were recorded say nothing): the config's lr is the
        new base of the schedule; reduce-on-plateau keeps the reductions it made so far, now
        applied to the new lr."""
        sched = self.schedule
        was_type = meta.get("schedule")
        if was_type is not None and was_type != sched.type:
            self.log.info(f"schedule.type changed from {was_type} to {sched.type} since the "
                          f"checkpoint: the lr follows {sched.type} from step "
                          f"{int(meta['step']) + 1}, as if the run had used it from the start")
        was = meta.get("base_lrs")
        now = [float(b) for b in sched.base_lrs]
        if was is not None and len(was) != len(now):  # (plateau's refuses: its state per group)
            self.log.info("optimizer.groups changed since the checkpoint (the groups' lrs: "
                          f"{', '.join(f'{w:g}' for w in was)} -> "
                          f"{', '.join(f'{n:g}' for n in now)}): each group's lr follows the "
                          "schedule from its configured lr")
            return
        if was is None or all(
                math.isclose(a, b, rel_tol=1e-12) for a, b in zip(was, now, strict=True)):
            return
        if sched.type == "plateau" and was_type == "plateau":
            sched.current = [n * (c / w) if w else n
                             for c, n, w in zip(sched.current, now, was, strict=True)]
        shown = ", ".join(f"{w:g} -> {n:g}" for w, n in zip(was, now, strict=True))
        self.log.info(f"optimizer.lr changed since the checkpoint ({shown}): the schedule goes "
                      "on from the new lr" + (" (with the plateau's reductions so far)"
                                             if sched.type == "plateau" else ""))

    def _log_evaluation(self, epoch: int) -> dict:
        metrics = self.evaluate()
        row = {"step": self.step, "epoch": epoch, **metrics}
        self._remember(row)
        self.log.record(row)
        return metrics

    def _remember(self, row: dict) -> None:
        """Keep a logged row in `history`, the latest HISTORY_ROWS of them at least (at most
        twice that: older ones are dropped in one go), so a long run's memory does not grow
        with its rows; log.metrics keeps them all."""
        self.history.append(row)
        if len(self.history) >= 2 * HISTORY_ROWS:
            del self.history[:len(self.history) - HISTORY_ROWS]

    # -- evaluation, prediction, export --------------------------------------------------------
    def _inference(self, evaluation: bool = False) -> Executor:
        """The inference form's executor (made at its first use: a run that never evaluates
        holds none); `evaluation`: the one whose loss output is read as the training graph
        reads it: a Softmax's as its LogSoftmax, a Sigmoid's as its logits, so that a
        probability that underflows to 0 in the file's output is no infinite loss where the
        step's is finite (predict gives the model's own outputs)."""
        key = "_infer_eval" if evaluation else "_infer"
        if getattr(self, key, None) is None:
            infer_model = inference_form(self.run_model)
            if evaluation:
                self._eval_reads = _eval_on_logits(infer_model, self.cfg.loss)
            inputs_for_initializers(infer_model, list(self.names) + list(self.state))
            setattr(self, key, Executor(infer_model, self.xp, values=self.shared,
                                        feeds=list(self.names) + list(self.state)))
        return getattr(self, key)

    def predict(self, inputs: dict[str, np.ndarray],
                _evaluation: bool = False) -> dict[str, np.ndarray]:
        """The model's outputs (inference form) with the current weights, on host arrays."""
        if not isinstance(inputs, Mapping):
            raise TrainerError(f"predict takes a mapping of the model's inputs to arrays "
                               f"({', '.join(self.data_inputs)}), got {type(inputs).__name__}")
        unknown = [k for k in inputs if k not in self.in_dtypes]
        if unknown:
            raise TrainerError(f"predict: the model has no input {', '.join(map(repr, unknown))}"
                               f" (its inputs: {', '.join(self.data_inputs)})")
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        if not _evaluation:  # (evaluate checks its arrays; a sample without its batch axis
            # ran as a batch of rows: [64] through a Gemm model gave [10], in silence)
            for k, v in arrays.items():
                want = self.data_inputs.get(k)
                if want is not None and len(want) and v.ndim != len(want):
                    one = " (one sample: add the batch axis, as x[None])" \
                        if v.ndim == len(want) - 1 else ""
                    raise TrainerError(f"predict: '{k}' has shape {list(v.shape)}; the model "
                                       f"takes [batch, ...] arrays of {len(want)} axes "
                                       f"{['?' if d is None else d for d in want]}{one}")
        feeds = {k: self.xp.asarray(v.astype(self.in_dtypes[k], copy=False))
                 for k, v in arrays.items()}
        if self.cfg.data.constants and inputs:
            n = len(next(iter(inputs.values())))
            feeds.update({k: v for k, v in self._constants(n).items() if k not in inputs})
        feeds.update(self.params)
        feeds.update(self.state)
        return {k: to_host(v) for k, v in self._inference(_evaluation).run(feeds).items()}

    def evaluate(self, arrays: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """Mean loss (and accuracy for cross_entropy) over a dataset, sharded across ranks."""
        given = arrays is not None
        if not given and self.eval_arrays is None:
            raise TrainerError("evaluate: the config has no data.eval; give the arrays "
                               "(evaluate({input: array, target: array}))")
        arrays = self.eval_arrays if arrays is None else arrays
        spec = self.cfg.loss
        wanted = list(self.data_inputs) + [getattr(spec, "target", None)] + (
            [spec.lengths] if spec.type == "ctc" else [])
        missing = [k for k in wanted if k is not None and k not in arrays]
        if missing:  # (a missing target read as None: bce's loss was NaN, in silence)
            raise TrainerError(f"evaluate: the arrays hold no {', '.join(map(repr, missing))}; "
                               "key them by the model's input names and the loss target's "
                               f"(given: {', '.join(map(repr, arrays)) or 'none'})")
        # (the samples: of the model's data inputs and the loss's arrays; another array given,
        # a constant's value, is not a set of samples)
        per_sample = [k for k in wanted if k is not None]
        counts = {k: len(arrays[k]) for k in per_sample}
        if len(set(counts.values())) > 1:
            raise TrainerError("evaluate: the arrays hold different numbers of samples ("
                               + ", ".join(f"{k}: {c}" for k, c in counts.items()) + ")")
        arrays = {k: arrays[k] for k in per_sample}
        if given and not next(iter(counts.values()), 0):  # (its metrics were 0.0)
            raise TrainerError("evaluate: the arrays hold no sample")
        if given:  # (checked and converted as a dataset file's arrays: an mse target of [N]
            what = "evaluate"  # for an output [N, 1] broadcast to [N, N], in silence)
            arrays = {k: np.asarray(v) for k, v in arrays.items()}
            check_against_model({k: v for k, v in arrays.items() if k in self.data_inputs},
                                self.data_inputs, what)
            for k, v in list(arrays.items()):
                want = self._dtype_for(k, v, what)
                if want is not None:
                    arrays[k] = v.astype(want, copy=False)
            self._check_targets(arrays, what, evaluated=True)
        self._sync_state("evaluation")
        n = next(iter(counts.values()), 0)
        lo, hi = (n * self.rank) // self.world, (n * (self.rank + 1)) // self.world
        # a model of a fixed batch runs chunks of that size (the training batches' in a run:
        # preflight.fixed_batch; `onnx-trainer eval` takes any data.batch_size), the last,
        # smaller one padded with copies of its last sample, whose outputs are left out
        fixed = {d[0] for k, d in self.data_inputs.items() if k in arrays and d
                 and d[0] is not None}
        fixed_n = fixed.pop() if len(fixed) == 1 else None
        bs = fixed_n or max(self.cfg.data.batch_size // self.world, 1)
        sums = np.zeros(4)  # loss sum, correct, count, the count's weight (the loss's mean)
        # (memory-mapped arrays are converted chunk by chunk, as the training batches are:
        # float64 mse targets were compared unrounded, in-memory ones rounded to float32)
        dtypes = self._batch_dtypes(arrays)
        for start in range(lo, hi, bs):
            chunk = {k: v[start:min(start + bs, hi)] if k not in dtypes else
                     np.asarray(v[start:min(start + bs, hi)]).astype(dtypes[k])
                     for k, v in arrays.items()}
            real = len(next(iter(chunk.values())))
            try:
                out = self._eval_chunk(chunk, fixed_n, spec)
            except ModelError as exc:
                # a model that runs at the training batch alone (a size baked into a Reshape
                # by tracing, a data.constants shape written as that number): the last,
                # smaller chunk fails; padded to the batch as a fixed-batch model's, it is
                # exact (the copies' outputs are left out)
                if fixed_n is not None or real >= bs or type(exc) is not ModelError:
                    raise self._eval_error(exc, real) from exc
                try:
                    out = self._eval_chunk(chunk, bs, spec)
                except ModelError:
                    raise self._eval_error(exc, real) from exc
                fixed_n = bs
                if not getattr(self, "_eval_padded_told", False):
                    self._eval_padded_told = True
                    self.log.info(f"evaluation: the model fails on a chunk of {real} "
                                  f"sample(s) ({' '.join(str(exc).split())[:200]}); chunks "
                                  f"are padded to the training batch, {bs}, whose extra "
                                  "outputs are left out")
            sums += _loss_sums(spec, out.astype(np.float64), chunk.get(spec.target),
                               real, self._softmax_output,
                               chunk.get(spec.lengths) if spec.type == "ctc" else None,
                               self._eval_reads)
        if self.world > 1:
            self.comm.allreduce_(sums, label="evaluation sums")
        metrics = {"eval_loss": float(sums[0] / (sums[3] if sums[3] > 0 else 1))}
        if spec.type == "cross_entropy":
            metrics["eval_accuracy"] = float(sums[1] / max(sums[2], 1))
        return metrics

    def _eval_error(self, exc: ModelError, n: int) -> ModelError:
        """An evaluation chunk's failure, with data.constants' hint where a constant may have
        been written for another batch size (as the training step says it)."""
        hint = constant_batch_hint(self._constants(n), self.run_model, n, self.data_inputs) \
            if self.cfg.data.constants and type(exc) is ModelError else ""
        hint = hint or _reshape_hint(exc)
        return ModelError(f"evaluation on a chunk of {n} sample(s): {str(exc).rstrip()}"
                          + (f"; {hint}" if hint else ""))

    def _eval_chunk(self, chunk: dict, fixed_n: int | None, spec):
        """The loss output of one evaluation chunk; with `fixed_n`, run padded to that many
        samples (copies of its last one), the copies' outputs left out."""
        feeds = {k: chunk[k] for k in self.data_inputs}
        real = len(next(iter(chunk.values())))
        if fixed_n is not None and real < fixed_n:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], fixed_n - real, 0)])
                     for k, v in feeds.items()}
        # (a non-finite value shows in the metrics, not as NumPy's warnings)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out = self.predict(feeds, _evaluation=True)[spec.output]
        ax = _batch_axis(spec)  # (ctc's time-major outputs hold the batch in axis 1)
        if fixed_n is not None and real < fixed_n and out.ndim > ax \
                and out.shape[ax] == fixed_n:
            out = out[(slice(None),) * ax + (slice(0, real),)]
        elif fixed_n is not None and real < fixed_n and spec.type == "output":
            # (one mean over the padded batch, its copies of the last sample included:
            # the batch of that sample alone gives its loss, which the copies take out)
            alone = {k: np.repeat(v[-1:], fixed_n, 0) for k, v in feeds.items()}
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                last = float(np.asarray(self.predict(alone, _evaluation=True)
                                        [spec.output]).reshape(-1)[0])
            total = float(np.asarray(out).reshape(-1)[0]) * fixed_n
            out = np.array((total - (fixed_n - real) * last) / real)
        return out

    def trained_values(self) -> dict[str, np.ndarray]:
        """Trained parameters and state by initializer name of the model (tied copies too)."""
        values = {k: to_host(v) for k, v in self.params.items()}
        values.update({k: to_host(v) for k, v in self.state.items()})
        for copy_name, (src, kind) in self.tied.items():
            if src in values:
                shape = self._copy_shapes[copy_name]
                values[copy_name] = np.ascontiguousarray(
                    values[src].transpose(tied_perm(kind)) if kind.startswith("transpose")
                    else np.broadcast_to(values[src], shape) if kind == "expand"
                    else values[src].reshape(shape))
        for name, lookup in self.lookups.items():
            if lookup.source in values:
                values[name] = lookup.expand(values.pop(lookup.source))
        return values

    def export(self, path: Path) -> Path:
        meta = {"onnx_trainer.steps": str(self.step),
                # (its name only: a deployed model carries no path of the training machine)
                "onnx_trainer.config": Path(self.cfg.config_path).name
                if self.cfg.config_path else "",
                "onnx_trainer.loss": self.cfg.loss.type,
                "onnx_trainer.optimizer": self.cfg.optimizer.type,
                **{f"onnx_trainer.{k}": v
                   for k, v in (getattr(self, "_trained_with", None) or {}).items()},
                "onnx_trainer.world_size": str(getattr(self, "_trained_world", None)
                                               or self.world)}
        model = inference_form(self.model) if self.cfg.output_form == "inference" else self.model
        meta["onnx_trainer.output_form"] = self.cfg.output_form
        release_freed_memory()  # (the steps' transients: the export's copy may reuse them)
        try:
            reads = getattr(self, "_files_read", None)
            values = self.trained_values()
            over = beyond_range(model, values)
            if over:
                types = sorted({onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
                                for t in model.graph.initializer if t.name in over})
                self.log.info(
                    f"warning: {path}: {sum(over.values())} trained value(s) of "
                    f"{listing(sorted(over))} lie beyond the range of the model's own type "
                    f"({', '.join(types)}) and are written as inf; the run's evaluations used "
                    "the float32 values (lower the lr, clip gradients, or convert the model "
                    "to float32 to keep them)")
            bad = [n for n, v in values.items()
                   if is_float_dtype(v.dtype) and not np.isfinite(v).all()]
            if bad:  # (`export` of a diverged run's checkpoint: written, said)
                self.log.info(f"warning: {path}: the values of {listing(bad)} are not all "
                              "finite (NaN or inf): the model will compute NaN; export an "
                              "earlier checkpoint (export --checkpoint PATH)")
            # (the model's values not trained that it holds as stubs: the shared ones)
            values.update((t.name, self.shared[t.name]) for t in model.graph.initializer
                          if t.name not in values and t.name in self.shared and is_stub(t))
            return export_model(model, values, path, meta,
                                keep=preflight.files_read(self.cfg) if reads is None else reads)
        finally:
            release_freed_memory()  # (the exported copy's: training may go on)


@dataclass
class ProfileRequest:
    """`train --profile`: time `steps` steps after `warmup` ones; each node is timed over
    `repeat` extra runs of the step's graph on its last batch (which change nothing)."""

    warmup: int = 3
    steps: int = 10
    repeat: int = 5
    top: int = 25
    trace: Path | None = None


# a model file of this size or more is worth a full garbage collection and heap trims during
# the set-up (each 0.05-0.5 s in a large process; a small model's copies are small)
LARGE_MODEL_BYTES = 16 << 20


def _stub_large_values(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(a copy of `model` with its initializers of SHARED_MIN elements or more as stubs,
    {name: their values as read-only arrays}): the set-up converts the model and builds its
    training graphs from protos of stubs, whose values they read from the arrays
    (graph.stub_values), so that no copy of the model it makes (the training graph's model,
    the build's deepcopies, its probes' executors, its folded constants) holds the weights
    again: a 129 MiB MLP's set-up held 6 copies of them at its peak, now 3."""
    from trainer.memory import stub_of

    values = {}
    for t in model.graph.initializer:
        if _shareable(t) and not is_stub(t):
            value = numpy_helper.to_array(t)
            value.flags.writeable = False  # (every executor of the run may read it)
            values[t.name] = value
    out = without_initializers(model)  # (a new proto, whose changes leave `model` as it is;
    # protobuf frees a tree's memory whole, not a tensor's)
    out.graph.initializer.extend(stub_of(t) if t.name in values else t
                                 for t in model.graph.initializer)
    return out, values


class _StubValues(Mapping):
    """The values a Trainer's stubs stand for (see Trainer._values_in): its parameters and
    state as they are now (read-only host views, a device's copied once), the shared values,
    and during the set-up the values read from the model."""

    def __init__(self, trainer: Trainer):
        self.sources = [getattr(trainer, "params", {}), getattr(trainer, "state", {})]
        self.fixed = [trainer.shared, getattr(trainer, "_setup_values", {})]
        self.read: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str):
        got = self.read.get(name)
        if got is not None:
            return got
        for source in self.sources:
            if name in source:
                got = np.asarray(to_host(source[name])).view()
                got.flags.writeable = False
                self.read[name] = got
                return got
        for source in self.fixed:
            if name in source:
                return source[name]
        raise KeyError(name)

    def __contains__(self, name) -> bool:
        return any(name in s for s in self.sources + self.fixed)

    def __iter__(self):
        return iter({k for s in self.sources + self.fixed for k in s})

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _shareable(t: onnx.TensorProto) -> bool:
    """Whether initializer `t` is held once per run, in Trainer.shared (see
    _drop_trained_values): numbers of SHARED_MIN elements or more."""
    return math.prod(t.dims) >= SHARED_MIN and t.data_type not in (
        onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED)


def _reshape_hint(exc: Exception) -> str:
    """What a Reshape's failure on a batch may mean: a batch size baked into the model."""
    if "(Reshape) failed" not in str(exc) or "cannot reshape" not in str(exc):
        return ""
    return ("the model may hold the batch size it was exported at (a number of rows written "
            "into a Reshape's shape by tracing): set data.batch_size to that size per process "
            "(evaluation then runs chunks of it, the last one padded), or export the model "
            "with a dynamic batch axis")


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one dtype and shape hold the same bytes (NaNs and -0.0 too),
    compared in place (no copy of either)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _all_finite(a: np.ndarray) -> bool:
    """Whether every element of a host array is finite (one pass where the sum of squares
    says so; element by element where it overflows or is not finite)."""
    return squares_finite(a, quiet=False) or bool(np.isfinite(a).all())


def node_times(ex: Executor, feeds: dict, repeat: int, loss: str
               ) -> tuple[list[tuple[str, str, str, float]], list[tuple]]:
    """([(node, op, forward|backward, mean seconds)] in execution order, and the last run's
    [(node, op, phase, start s, seconds)]): the executor's program for these feeds is run
    `repeat` times with a clock around each of its steps (dispatch included)."""
    prog = None
    if getattr(ex, "optimize", False):
        ex.run(feeds)  # the plan of this signature exists after a run
        prog = ex._specialized.get(ex._signature(feeds)) or None
    if prog is None:
        prog = ex._generic
    nodes = getattr(prog, "nodes", None)
    outputs = ([list(n.outputs) for n in nodes] if nodes is not None
               else [list(st[3]) for st in ex.steps])
    boundary = next((k for k, outs in enumerate(outputs) if loss in outs), None)
    labels = prog.labels
    per = [0.0] * len(prog.steps)
    starts = [0.0] * len(prog.steps)
    last = [0.0] * len(prog.steps)  # (the last run's own durations: its slices do not overlap)
    clock = time.perf_counter

    sync = ex.xp.cuda.get_current_stream().synchronize if ex.xp is not np else None

    def timed(step, k):
        def run(env):
            t = clock()
            step(env)
            if sync is not None:  # the kernel's time, not its launch
                sync()
            end = clock()
            starts[k], last[k] = t, end - t
            per[k] += end - t
        return run

    runner = copy.copy(prog)
    runner.steps = [timed(st, k) for k, st in enumerate(prog.steps)]
    for _ in range(repeat):
        runner.run(feeds, ex.xp)
    if ex.xp is not np:
        ex.xp.cuda.get_current_stream().synchronize()

    def phase(k: int, name: str) -> str:
        if boundary is not None:
            return "forward" if k <= boundary else "backward"
        return "backward" if "Grad" in name or "_grad" in name else "forward"
    rows = [(name, op, phase(k, name), per[k] / repeat)
            for k, (name, op, _) in enumerate(labels)]
    t0 = min(starts) if starts else 0.0
    events = [(name, op, phase(k, name), starts[k] - t0, last[k])
              for k, (name, op, _) in enumerate(labels)]
    return rows, events


def profile_table(p: dict, top: int) -> list[str]:
    """The profile as text: the slowest nodes, then where the rest of a step goes."""
    step = max(p["step_s"], 1e-12)

    def ms(t: float) -> str:
        return f"{t * 1e3:9.3f} ms {100 * t / step:5.1f}%"
    rows = sorted(p["nodes"], key=lambda r: -r["s"])
    width = max([len(r["name"]) for r in rows[:top]] + [4])
    runs = p.get("runs_per_step", 1)
    when = "after the warm-up" if p.get("warm", True) else \
        "(the run ended within the warm-up: its first steps, planning included)"
    lines = [f"profile: {p['steps']} step(s) {when}, {len(rows)} nodes; mean per step"
             + (f" (the graph runs {runs} times a step, once per micro-batch)" if runs > 1
                else ""),
             f"  {'node':<{width}}  {'op':<24} {'phase':<8} {'time':>9}    share"]
    lines += [f"  {r['name']:<{width}}  {r['op']:<24} {r['phase']:<8} {ms(r['s'])}"
              for r in rows[:top]]
    if len(rows) > top:
        rest = sum(r["s"] for r in rows[top:])
        lines.append(f"  {f'({len(rows) - top} other nodes)':<{width}}  {'':<24} {'':<8} "
                     f"{ms(rest)}")
    fwd = sum(r["s"] for r in rows if r["phase"] == "forward")
    between = max(0.0, p["graph_s"] - p["nodes_s"])
    other = p["step_s"] - max(p["graph_s"], p["nodes_s"]) - p["communication_s"] \
        - p["optimizer_s"] - p["data_s"]
    lines += [f"  nodes, forward and loss       {ms(fwd)}",
              f"  nodes, backward               {ms(p['nodes_s'] - fwd)}",
              f"  executor, between nodes       {ms(between)}",
              f"  communication (waiting)       {ms(p['communication_s'])}",
              f"  optimizer                     {ms(p['optimizer_s'])}",
              f"  data (next batch)             {ms(p['data_s'])}",
              f"  other (loss, checks, loop)    {ms(max(0.0, other))}",
              f"  step (measured)               {ms(p['step_s'])}"]
    return lines


def write_trace(path, p: dict, events: list[tuple], rank: int = 0) -> Path:
    """A Chrome trace (JSON, viewable in Perfetto or chrome://tracing): one timed run of the
    graph node by node, then one average step split into its parts."""
    import json

    path = Path(path)
    out = []
    for name, op, phase, start, dur in events:
        out.append({"name": name, "cat": phase, "ph": "X", "ts": start * 1e6,
                    "dur": dur * 1e6, "pid": rank, "tid": 1, "args": {"op": op}})
    t = 0.0
    for part in ("data", "graph", "communication", "optimizer"):
        dur = p[f"{part}_s"]
        out.append({"name": part, "cat": "step", "ph": "X", "ts": t * 1e6, "dur": dur * 1e6,
                    "pid": rank, "tid": 0, "args": {}})
        t += dur
    meta = [{"name": "thread_name", "ph": "M", "pid": rank, "tid": 0,
             "args": {"name": "average step"}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": 1,
             "args": {"name": "graph nodes (one run)"}}]
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"traceEvents": meta + out, "displayTimeUnit": "ms"}))
        tmp.replace(path)
    except OSError as exc:  # (a full disk: no part-written file left)
        tmp.unlink(missing_ok=True)
        raise checkpoint.write_error(exc, "the Chrome trace", path) from None
    return path


class _StopOnSignal:
    """While training: the first SIGINT/SIGTERM asks every rank to stop after the current step
    (the request rides on the gradient all-reduce); after the last step, the run's end (its
    evaluation, checkpoint and export) is completed first; a second one ends the process at
    once."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread (tests run ranks as threads)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import os
        import signal

        t = self.trainer
        if t._stop_signal:  # second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        t._stop_signal = True
        t._signal_code = 128 + signum
        if t._finishing:  # (the steps are done: what is left of the run is kept)
            t.log.info(f"received {signal.Signals(signum).name} after the last step: finishing "
                       "its evaluation, checkpoint and export first (send it again to stop at "
                       "once)")
            return
        t.log.info(f"received {signal.Signals(signum).name}: stopping after this step "
                   "(send it again to stop at once)")

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def apply_threads(threads: int | None) -> int:
    """Limit this process's BLAS threads to the config's `threads` (default: its share of the
    node's cores; a thread count the user set in the environment is left as it is)."""
    n, source = blas_threads(threads)
    if source in ("threads", "share of the cores"):
        limit_threads(n)
    return n


def limit_threads(n: int) -> str:
    """Limit the BLAS threads of this process to n, now (NumPy is loaded): through
    threadpoolctl if it is installed, else by calling the set_num_threads function of the
    OpenBLAS or MKL library NumPy loaded. Returns how ("" if no library could be told; then
    only the environment variables the CLI sets before NumPy loads apply).

    Process-wide and not safe while another thread runs a BLAS call (OpenBLAS resizes its
    thread pool and buffers), so the library is told only when n changes, under a lock: ranks
    emulated as threads of one process all set the same count."""
    global _THREADS_SET
    with _THREADS_LOCK:
        if _THREADS_SET is not None and _THREADS_SET[0] == n:
            return _THREADS_SET[1]
        try:
            import threadpoolctl
        except ImportError:
            threadpoolctl = None
        if threadpoolctl is not None:
            threadpoolctl.threadpool_limits(n, user_api="blas")
            how = "threadpoolctl"
        else:
            how = _set_blas_threads(n)
        _THREADS_SET = (n, how)
        return how


_THREADS_LOCK = threading.Lock()
_THREADS_SET: tuple[int, str] | None = None  # (count, how) last set in this process


_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads",
                 "MKL_Set_Num_Threads", "mkl_set_num_threads")


def _set_blas_threads(n: int) -> str:
    import ctypes
    import os

    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return ""
    done = ""
    for path in sorted(p for p in paths if "blas" in p.lower() or "mkl" in p.lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = name
                break
    return done


def compute_form(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The model as the engine computes it: float16/bfloat16 models in float32 (the trained
    float32 values are rounded back to the model's own types on export), everything in float64
    for `precision: fp64` verification runs."""
    import ml_dtypes
    from onnx import helper

    target = np.float64 if precision == "fp64" else np.float32
    g = model.graph
    elements: dict[int, int] = {}
    for t in g.initializer:
        elements[t.data_type] = elements.get(t.data_type, 0) + math.prod(t.dims)
    inits = {t.name for t in g.initializer}  # (older models list them as inputs too)
    io = {vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output)
          if vi.name not in inits}
    used = set(elements) | io | {attr_type_code(a) for n in g.node for a in n.attribute
                                 if a.name in ("to", "dtype")}
    m = model
    for src in (np.float16, ml_dtypes.bfloat16, np.float32):
        code = helper.np_dtype_to_tensor_dtype(np.dtype(src))
        if np.dtype(src) != np.dtype(target) and code in used:
            # (a 16-bit model: its inputs or outputs, or most of its weights, are of the type;
            # otherwise the type is a float32 model's own region, `relu(h.half() * 0.3)`, its
            # constants a scalar or a weight cast inside it, `w.half()`: its rounding is kept)
            own = code in io or elements.get(code, 0) > elements.get(onnx.TensorProto.FLOAT, 0)
            m = convert_floats(m, src, target, rounding=src is not np.float32 and not own)
    return m


# Config keys each process may hold its own way: where files are (one node's mount point is
# not another's), what rank 0 alone writes, and the process's own threads
_LOCAL_KEYS = ("model", "output", "log", "threads", "memory_check", "config_path", "base_dir")


def config_digests(cfg) -> tuple[list[str], np.ndarray]:
    """(keys, one 64-bit digest each) of what the processes of one job must agree on: every
    config key but _LOCAL_KEYS, with file paths left out (a dataset given or not counts)."""
    import dataclasses
    import json

    def plain(v):
        if isinstance(v, Path):
            return "<path>"
        if isinstance(v, Mapping):
            return {str(k): v[k] for k in sorted(v)}
        return repr(v)

    keys, digests = [], []
    for f in dataclasses.fields(cfg):
        if f.name in _LOCAL_KEYS:
            continue
        v = getattr(cfg, f.name)
        v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        text = json.dumps(v, sort_keys=True, default=plain)
        keys.append(f.name)
        digests.append(_digest(text))
    return keys, np.array(digests, np.uint64)


def _digest(value) -> int:
    """64 bits of the SHA-256 of `value` (a string, or JSON of it)."""
    import hashlib
    import json

    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def written_files(cfg) -> list[tuple[Path, str]]:
    """(path, config key) of the files a run writes: the output, the best model, metrics."""
    out = [(Path(cfg.output), "output")]
    if cfg.best is not None:
        out.append((best_path(cfg.output), "the best model (from output)"))
    if cfg.log.metrics is not None:
        out.append((Path(cfg.log.metrics), "log.metrics"))
    return out


def check_paths(cfg, attempt: Callable, extra: Sequence[tuple[Path, str]] = (),
                keep: bool = True) -> None:
    """The paths a run writes (written_files, the folders of log.tensorboard and
    checkpoint.dir, and `extra` files such as --profile-trace) are none of the files it reads,
    each other's, or unwritable: each check is run through `attempt(fn, *args)` (which raises,
    or collects the problem for `check CONFIG`); `keep`: the folders the write probes make stay
    (a run writes there; `check CONFIG` leaves none behind)."""
    files = written_files(cfg) + list(extra)
    folders = [(Path(p), what) for p, what in ((cfg.log.tensorboard, "log.tensorboard"),
                                               (cfg.checkpoint.dir, "checkpoint.dir"))
               if p is not None]
    reads = preflight.files_read(cfg)
    for path, what in files + folders:
        attempt(preflight.not_read, path, what, reads)
    attempt(preflight.distinct, files)
    for folder in folders:  # (the two folders may be one)
        attempt(preflight.distinct, files + [folder])
    if cfg.checkpoint.dir is not None:
        attempt(preflight.not_checkpoint_names, files + folders[:1] if cfg.log.tensorboard
                else files, Path(cfg.checkpoint.dir))
    attempt(preflight.writable_file, cfg.output, "output", keep)
    for path, what in files[1:]:
        if what != "the best model (from output)":  # (beside the output)
            attempt(preflight.writable_file, path, what, keep)
    for path, what in folders:
        attempt(preflight.writable_dir, path, what, keep)


def best_path(output: Path) -> Path:
    """Where the best model goes: next to the final one, `<name>.best.onnx`."""
    output = Path(output)
    return output.with_name(f"{output.stem}.best{output.suffix or '.onnx'}")


def _mode(mode: str, metric: str) -> str:
    if mode != "auto":
        return mode
    return "max" if "accuracy" in metric else "min"


def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _nonfinite(v) -> bool:
    if v is None or not hasattr(v, "dtype") or getattr(v.dtype, "kind", "") not in "fc":
        return False
    return not bool(np.isfinite(to_host(v)).all())


def owned(xp, a):
    """A writable, C-contiguous copy of `a` on xp's device, owned by the engine."""
    return xp.array(a, copy=True, order="C")


def _batch_axis(spec) -> int:
    """The axis of the loss output that holds the batch (ctc's time-major outputs: 1)."""
    return 1 if spec.type == "ctc" and spec.time_axis == 0 else 0


def _softmax_output(model: onnx.ModelProto, spec) -> bool:
    """Whether the loss reads probabilities: a Softmax's output over its class axis, directly
    or through layout ops, or a binary classifier's Concat(1 - Sigmoid(z), Sigmoid(z)) (what
    the training graph replaces by logits: autodiff.build._logits_of_softmax)."""
    if spec.type not in ("cross_entropy", "ctc"):
        return False
    out = next((o for o in model.graph.output if o.name == spec.output), None)
    rank = len(out.type.tensor_type.shape.dim) if out is not None else 0
    if not rank:
        return False
    class_axis = spec.class_axis if spec.type == "cross_entropy" else -1
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in out.type.tensor_type.shape.dim]
    if softmax_logits(model.graph.node, spec.output, rank, class_axis,
                      opset_of(model), dims, _value_dims(model)) is not None:
        return True
    return spec.type == "cross_entropy" and binary_probabilities(
        model.graph.node, spec.output, rank, class_axis, constant_lookup(model)) is not None


def _eval_on_logits(model: onnx.ModelProto, spec) -> str:
    """Rewrite, in place, the inference model's Softmax under the loss output (cross entropy,
    ctc) as LogSoftmax, or its Sigmoid (bce) as Identity, where nothing else reads them:
    "log" (the output holds log-probabilities), "logits" (a Sigmoid's input), or "" (as
    the model has it)."""
    from trainer.autodiff.build import sigmoid_logits

    out = next((o for o in model.graph.output if o.name == spec.output), None)
    rank = len(out.type.tensor_type.shape.dim) if out is not None else 0
    if not rank or spec.type not in ("cross_entropy", "ctc", "bce") or \
            getattr(spec, "logits", False):
        return ""
    nodes = model.graph.node
    if spec.type == "bce":
        found, new_op, reads = sigmoid_logits(nodes, spec.output, rank), "Identity", "logits"
    elif spec.type == "cross_entropy" and _binary_on_logits(model, spec, rank):
        return "log"
    else:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in out.type.tensor_type.shape.dim]
        class_axis = spec.class_axis if spec.type == "cross_entropy" else -1
        found = softmax_logits(nodes, spec.output, rank, class_axis, opset_of(model), dims,
                               _value_dims(model))
        new_op, reads = "LogSoftmax", "log"
    if found is None:
        return ""
    heads, chain = found if isinstance(found[0], list) else ([found[0]], found[1])
    inner = {*(h.output[0] for h in heads), *(o for c in chain for o in c.output)} - {
        spec.output}
    readers = {id(n) for n in nodes for x in n.input if x in inner}
    if readers != {id(c) for c in chain} or any(o.name in inner for o in model.graph.output):
        return ""  # (another node reads the probabilities: as they are)
    for node in heads:  # (log commutes with the moves, reshapes and concatenations after)
        node.op_type = new_op
        if new_op == "Identity":
            del node.attribute[:]
    return reads


def _value_dims(model: onnx.ModelProto):
    """name -> the value's dims as ONNX shape inference gives them (ints, None where not a
    known number), or None; inferred when first asked."""
    dims: dict | None = None

    def shape_of(name: str):
        nonlocal dims
        if dims is None:  # (on the large tensors' stubs: a frozen base model's not copied)
            dims = inferred_dims(strip(model))
        return dims.get(name)
    return shape_of


def _binary_on_logits(model: onnx.ModelProto, spec, rank: int) -> bool:
    """Rewrite, in place, a binary classifier's Concat(1 - Sigmoid(z), Sigmoid(z)) under the
    loss output (binary_probabilities) as Concat(-Softplus(z), -Softplus(-z)), its
    log-probabilities (the log-softmax of the logits Concat(0, z) training reads): in float32
    1 - Sigmoid(z) is 0 from z of about 17, and the log of the probabilities was inf where the
    step's loss was finite. Where no other node reads the output; whether it was rewritten."""
    from onnx import helper

    nodes = model.graph.node
    axis = spec.class_axis % rank
    z = binary_probabilities(nodes, spec.output, rank, axis, constant_lookup(model))
    if z is None or any(spec.output in n.input for n in nodes):
        return False
    cat = next(n for n in nodes if spec.output in n.output)
    scope = NameScope(all_names(model.graph))
    neg, soft_neg, log_p, soft, log_q = (scope.fresh(f"{spec.output}/eval_{k}") for k in
                                         ("neg", "softplus_neg", "log_p", "softplus", "log_q"))
    at = list(nodes).index(cat)
    made = [helper.make_node("Neg", [z], [neg], name=neg),
            helper.make_node("Softplus", [neg], [soft_neg], name=soft_neg),
            helper.make_node("Neg", [soft_neg], [log_p], name=log_p),
            helper.make_node("Softplus", [z], [soft], name=soft),
            helper.make_node("Neg", [soft], [log_q], name=log_q),
            helper.make_node("Concat", [log_q, log_p], [spec.output], name=f"{log_q}/concat",
                             axis=axis)]
    del nodes[at]
    for k, n in enumerate(made):
        nodes.insert(at + k, n)
    return True


def _label_weight(spec, labels: np.ndarray) -> int | float:
    """What a batch's cross entropy averages over: its labels that are not ignore_index, or
    with loss.weight the sum of their classes' weights (torch's weighted mean)."""
    valid = labels != spec.ignore_index
    if getattr(spec, "weight", None) is None:
        return int(np.count_nonzero(valid))
    return float(np.asarray(spec.weight, np.float64)[labels[valid]].sum())


def _loss_sums(spec, out: np.ndarray, target, n: int, probabilities: bool = False,
               steps=None, reads: str = "") -> np.ndarray:
    """[sum of per-item losses, correct predictions, items, the items' weight] for one eval
    chunk of n samples; items are samples, or for cross entropy the labels that are not
    loss.ignore_index, and their weight is their count (with loss.weight: the sum of their
    classes' weights, which the loss is averaged over).
    `probabilities`: the output is a Softmax's (the loss trained on its input: its log-softmax
    is the output's log); `steps`: ctc's valid time steps per sample (loss.lengths); `reads`:
    what `_eval_on_logits` made the output ("log": log-probabilities, "logits": a Sigmoid's
    input)."""
    if spec.type == "output":  # the model's own loss, taken as the mean over the chunk
        return np.array([float(out.reshape(-1)[0]) * n, 0.0, float(n), float(n)])
    if spec.type == "mse":
        per = ((out - target) ** 2).reshape(out.shape[0], -1).mean(axis=1)
        return np.array([per.sum(), 0.0, out.shape[0], out.shape[0]])
    if spec.type == "bce" and (getattr(spec, "logits", False) or reads == "logits"):
        # (loss.logits, or a Sigmoid's input: the output is z)
        z, t = np.asarray(out, np.float64), np.asarray(target, np.float64)
        per = np.logaddexp(0.0, z) - t * z  # softplus(z) - t z, as the training graph's
        return np.array([per.reshape(out.shape[0], -1).mean(axis=1).sum(), 0.0, out.shape[0],
                         out.shape[0]])
    if spec.type == "bce":  # (the output: probabilities, a Sigmoid's or not)
        t = np.asarray(target, np.float64)
        with np.errstate(divide="ignore"):
            logp, logq = np.log(out), np.log(1 - out)
        per = -(t * np.maximum(logp, -100) + (1 - t) * np.maximum(logq, -100))
        return np.array([per.reshape(out.shape[0], -1).mean(axis=1).sum(), 0.0, out.shape[0],
                         out.shape[0]])
    axis = spec.class_axis % out.ndim if spec.type == "cross_entropy" else out.ndim - 1
    if reads == "log":
        logp = out
    elif probabilities:
        with np.errstate(divide="ignore"):
            logp = np.log(out)
    else:  # (non-finite outputs give a NaN loss, reported as such: no NumPy warning)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            z = out - out.max(axis=axis, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    if spec.type == "ctc":
        if spec.time_axis == 0:  # (time-major: batch-major for the kernel)
            logp = logp.swapaxes(0, 1)
        nll, count = CTCLoss(np, np.ascontiguousarray(logp), np.asarray(target),
                             None if steps is None else np.asarray(steps), blank=spec.blank)
        return np.array([float((nll / count).sum()), 0.0, float(logp.shape[0]),
                         float(logp.shape[0])])
    valid = target != spec.ignore_index
    safe = np.where(valid, target, 0)
    picked = np.take_along_axis(logp, np.expand_dims(safe, axis), axis=axis).squeeze(axis)
    eps = float(getattr(spec, "label_smoothing", 0.0))
    weight = valid.astype(np.float64)
    classes = None
    if getattr(spec, "weight", None) is not None:  # (torch's weighted mean)
        classes = np.asarray(spec.weight, np.float64)
        weight = weight * classes[safe]
    if eps:  # (as the training graph: the uniform distribution's share of the target, its
        # classes weighted by loss.weight, and the whole divided by the labels' weights)
        shape = [1] * logp.ndim
        shape[axis] = -1
        if classes is None:
            spread = logp.mean(axis=axis)
        else:  # (a class of weight 0 adds 0, also where its log-probability is -inf)
            weights = classes.reshape(shape)
            with np.errstate(invalid="ignore"):
                spread = np.where(weights == 0, 0.0, logp * weights).mean(axis=axis)
        total = -((1 - eps) * (picked * weight).sum() + eps * (spread * valid).sum())
    else:
        total = -(picked * weight).sum()
    correct = ((out.argmax(axis=axis) == target) & valid).sum()
    return np.array([total, float(correct), float(valid.sum()), float(weight.sum())])
