"""Tests for trainer.config: YAML loading, defaults, path resolution, overrides, error messages."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from trainer.config import (
    Config,
    ConfigError,
    DatasetConfig,
    GradClipConfig,
    apply_override,
    config_from_dict,
    load_config,
)

FULL_YAML = """\
model: models/mlp.onnx
output: /abs/out/trained.onnx
seed: 7
device: cpu
precision: fp64
data:
  train: {path: data/train.npz, inputs: {input: x}, targets: {label: y}}
  eval: {path: ~/eval.npz, inputs: {input: x}, targets: {label: y}}
  batch_size: 16
  shuffle: false
  drop_last: false
  prefetch: true
loss: {type: cross_entropy, output: logits, target: label, class_axis: 1}
trainable: [fc1.weight, "fc2.*"]
frozen: [fc2.bias]
optimizer: {type: adamw, lr: 1e-3, betas: [0.9, 0.98], eps: 1e-6}
schedule: {type: cosine, warmup_steps: 5, min_lr: 1e-5}
grad_clip: {max_norm: 1}
accumulate: 2
steps: 100
checkpoint: {dir: ckpt, every_steps: 50, keep: 3}
log: {every_steps: 1, metrics: logs/metrics.jsonl}
distributed: {backend: mpi, bucket_mb: 4, overlap: false}
threads: 2
memory_check: false
"""


def minimal(**extra: object) -> dict:
    raw: dict = {
        "model": "m.onnx",
        "data": {"train": {"path": "d.npz", "inputs": {"input": "x"}, "targets": {"label": "y"}}},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "steps": 10,
    }
    raw.update(extra)
    return raw


def error_of(raw: dict, overrides: tuple[str, ...] = (), base: str = "/base") -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, base, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_yaml_loads_with_types_and_resolved_paths(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.config_path == path and cfg.base_dir == tmp_path
    assert cfg.model == tmp_path / "models/mlp.onnx"
    assert cfg.output == Path("/abs/out/trained.onnx")
    assert (cfg.seed, cfg.device, cfg.precision) == (7, "cpu", "fp64")
    assert cfg.data.train.path == tmp_path / "data/train.npz"
    assert cfg.data.eval is not None and cfg.data.eval.path == Path.home() / "eval.npz"
    assert dict(cfg.data.train.inputs) == {"input": "x"}
    assert dict(cfg.data.train.targets) == {"label": "y"}
    assert (cfg.data.batch_size, cfg.data.shuffle, cfg.data.drop_last) == (16, False, False)
    assert (cfg.loss.type, cfg.loss.output, cfg.loss.target) == ("cross_entropy", "logits", "label")
    assert cfg.loss.class_axis == 1
    assert cfg.trainable == ("fc1.weight", "fc2.*") and cfg.frozen == ("fc2.bias",)
    opt = cfg.optimizer
    assert opt.type == "adamw" and opt.lr == pytest.approx(1e-3) and isinstance(opt.lr, float)
    assert opt.betas == (0.9, 0.98) and opt.eps == pytest.approx(1e-6)
    assert opt.weight_decay == pytest.approx(0.01)  # adamw default
    assert cfg.schedule.type == "cosine" and cfg.schedule.warmup_steps == 5
    assert cfg.schedule.min_lr == pytest.approx(1e-5)
    assert cfg.grad_clip == GradClipConfig(max_norm=1.0)
    assert isinstance(cfg.grad_clip.max_norm, float)
    assert (cfg.accumulate, cfg.steps, cfg.epochs) == (2, 100, None)
    assert cfg.checkpoint.dir == tmp_path / "ckpt"
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep) == (50, 3)
    assert cfg.log.every_steps == 1 and cfg.log.metrics == tmp_path / "logs/metrics.jsonl"
    dist = cfg.distributed
    assert (dist.backend, dist.bucket_mb, dist.overlap) == ("mpi", 4.0, False)
    assert cfg.data.prefetch is True and cfg.threads == 2 and cfg.memory_check is False


def test_defaults_for_minimal_config() -> None:
    cfg = config_from_dict(minimal(), "/base")
    assert cfg.config_path is None and cfg.base_dir == Path("/base")
    assert cfg.output == Path("/base/runs/m/model.onnx")
    assert (cfg.seed, cfg.device, cfg.precision) == (0, "auto", "fp32")
    assert cfg.data.eval is None
    assert (cfg.data.batch_size, cfg.data.shuffle, cfg.data.drop_last) == (32, True, True)
    assert cfg.loss.class_axis == -1
    assert cfg.trainable == "all" and cfg.frozen == ()
    opt = cfg.optimizer
    assert (opt.type, opt.lr, opt.momentum, opt.nesterov, opt.dampening, opt.weight_decay) == (
        "sgd", 1e-3, 0.0, False, 0.0, 0.0)  # (torch.optim.SGD's)
    assert (cfg.schedule.type, cfg.schedule.warmup_steps) == ("constant", 0)
    assert cfg.grad_clip is None and cfg.accumulate == 1
    assert (cfg.checkpoint.dir, cfg.checkpoint.every_steps, cfg.checkpoint.keep) == (None, 0, 2)
    assert (cfg.log.every_steps, cfg.log.metrics) == (10, None)
    assert (cfg.distributed.backend, cfg.distributed.bucket_mb) == ("auto", 25.0)
    assert cfg.distributed.overlap is True
    assert (cfg.data.prefetch, cfg.threads, cfg.memory_check) == ("auto", None, True)


def test_optimizer_defaults_depend_on_type() -> None:
    adam = config_from_dict(minimal(optimizer={"type": "adam"}), "/b").optimizer
    assert (adam.lr, adam.weight_decay, adam.betas, adam.eps) == (1e-3, 0.0, (0.9, 0.999), 1e-8)
    adamw = config_from_dict(minimal(optimizer={"type": "adamw"}), "/b").optimizer
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.01)


def test_config_is_frozen_and_hashable() -> None:
    cfg = config_from_dict(minimal(), "/base")
    with pytest.raises(AttributeError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.data.train.inputs["input"] = "z"  # type: ignore[index]
    copy = config_from_dict(minimal(), "/base")
    assert copy == cfg and hash(copy) == hash(cfg)
    direct = DatasetConfig(path=Path("/d.npz"), inputs={"input": "x"})
    assert dict(direct.inputs) == {"input": "x"} and dict(direct.targets) == {}


def test_overrides_apply_with_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_YAML)
    cfg = load_config(path, ["optimizer.lr=0.5", "data.batch_size=64", "optimizer.betas=[0.8,0.9]",
                             "grad_clip=null", "steps=null", "epochs=3"])
    assert cfg.optimizer.lr == 0.5 and cfg.data.batch_size == 64
    assert cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.grad_clip is None and (cfg.steps, cfg.epochs) == (None, 3)
    # (one override as a string: iterated, it was its characters, "malformed override 'o'")
    assert load_config(path, "optimizer.lr=0.25").optimizer.lr == 0.25


def test_apply_override_creates_sections_and_parses_values() -> None:
    raw: dict = {"optimizer": {"type": "sgd"}}
    apply_override(raw, "grad_clip.max_norm=2.5")
    apply_override(raw, "optimizer.momentum = 0.9")
    apply_override(raw, "schedule.type=null")
    apply_override(raw, "frozen=[a, b]")
    assert raw == {"optimizer": {"type": "sgd", "momentum": 0.9}, "grad_clip": {"max_norm": 2.5},
                   "schedule": {"type": None}, "frozen": ["a", "b"]}


def test_an_override_reaches_into_a_list_by_index() -> None:
    """`--set optimizer.groups.0.lr=...` was "is not a mapping" (the README says --set
    overrides any key)."""
    raw = {"optimizer": {"groups": [{"params": "*.bias", "lr": 0.1}, {"params": "*"}]},
           "frozen": ["a", "b"]}
    apply_override(raw, "optimizer.groups.0.lr=0.5")
    apply_override(raw, "optimizer.groups.1.weight_decay=0")
    apply_override(raw, "frozen.1=c")
    assert raw == {"optimizer": {"groups": [{"params": "*.bias", "lr": 0.5},
                                            {"params": "*", "weight_decay": 0}]},
                   "frozen": ["a", "c"]}
    apply_override(raw, "optimizer.groups.0.lr=null")  # (null leaves it out, as at the top)
    assert raw["optimizer"]["groups"][0] == {"params": "*.bias"}
    apply_override(raw, "optimizer.groups.0.lr=0.5")
    for bad in ("optimizer.groups.2.lr=1", "optimizer.groups.x.lr=1", "frozen.-1=d",
                "optimizer.groups.\u00b2.lr=1"):  # ('²' is a digit to str.isdigit)
        with pytest.raises(ConfigError, match=r"config key '(optimizer.groups|frozen)' is a list "
                                              r"of 2 item\(s\), and '.*' is not an index"):
            apply_override(raw, bad)
    with pytest.raises(ConfigError, match="the list is empty"):
        apply_override({"frozen": []}, "frozen.0=a")
    # (a list the config does not set: the item was made a mapping key '0', said as a dict;
    # a misspelt key is still named as one)
    base = {"model": "m.onnx", "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}}},
            "loss": {"type": "output", "output": "y"}, "optimizer": {"lr": 0.1}}
    with pytest.raises(ConfigError, match=r"config key 'optimizer.groups' must be a list .*, got "
                                          r"no list: the config does not set it, so --set cannot "
                                          r"reach its item 0 .*--set 'optimizer.groups=\[...\]'"):
        config_from_dict(base, "/tmp", ["optimizer.groups.0.lr=0.01"])
    with pytest.raises(ConfigError, match=r"did you mean 'optimizer.groups'"):
        config_from_dict(base, "/tmp", ["optimizer.groupz.0.lr=0.01"])
    with pytest.raises(ConfigError, match=r"'best.0' is unknown"):
        config_from_dict(base, "/tmp", ["best.0=1"])


def test_overrides_do_not_mutate_input_mapping() -> None:
    raw = minimal()
    raw["data"] = MappingProxyType(raw["data"])
    cfg = config_from_dict(raw, "/b", ["data.batch_size=8"])
    assert cfg.data.batch_size == 8 and "batch_size" not in raw["data"]


def test_an_override_reaches_a_key_with_dots_in_its_name() -> None:
    """TorchScript names inputs `input.1`: `--set data.train.inputs.input.1=x2` split at every
    dot and failed with "the config does not set it ... give the whole list". A key the config
    has is found with its dots; a new one is written in double quotes."""
    raw = {"data": {"train": {"inputs": {"input.1": "x", "mask": "m"}}}}
    apply_override(raw, "data.train.inputs.input.1=x2")
    apply_override(raw, 'data.train.inputs."onnx::Gemm.0"=x3')
    apply_override(raw, 'data."train".inputs.mask=m2')
    assert raw == {"data": {"train": {"inputs": {"input.1": "x2", "mask": "m2",
                                                 "onnx::Gemm.0": "x3"}}}}
    apply_override(raw, "data.train.inputs.mask=null")  # (null leaves an entry out)
    assert raw == {"data": {"train": {"inputs": {"input.1": "x2", "onnx::Gemm.0": "x3"}}}}
    # an entry of inputs/targets is a name, nothing nested below it: a new one's dots are its
    # name's, also unquoted (it was read as item 1 of a list the config does not set)
    apply_override(raw, "data.eval.inputs.input.1=xt")
    apply_override(raw, "data.eval.targets.label.0=yt")
    assert raw["data"]["eval"] == {"inputs": {"input.1": "xt"}, "targets": {"label.0": "yt"}}


@pytest.mark.parametrize("override", ["optimizer.lr", "=3", "optimizer..lr=1", "a.=1",
                                      'a."b=1', 'a.""=1'])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="malformed override"):
        apply_override({}, override)


def test_override_through_scalar_is_an_error() -> None:
    message = error_of(minimal(), ("model.path=x",))
    assert message.startswith("config key 'model' is not a mapping")


def test_unknown_override_key_is_named() -> None:
    message = error_of(minimal(), ("optimizer.lrr=0.5",))
    assert message == "config key 'optimizer.lrr' is unknown; did you mean 'optimizer.lr'?"


@pytest.mark.parametrize("key,want", [("optimizer.learning_rate", "optimizer.lr"),
                                      ("optimizer.wd", "optimizer.weight_decay"),
                                      ("max_steps", "steps"), ("data.bs", "data.batch_size"),
                                      ("gradient_accumulation_steps", "accumulate")])
def test_other_frameworks_key_names_suggest_ours(key, want) -> None:
    """Keys named as other frameworks name them, which no spelling distance reaches
    (learning_rate listed the valid keys but suggested none)."""
    message = error_of(minimal(), (f"{key}=1",))
    assert message == f"config key '{key}' is unknown; did you mean '{want}'?"


@pytest.mark.parametrize("key, value, want", [
    ("lr", 0.1, "'optimizer.lr' (optimizer: {lr: 0.1})"),
    ("batch_size", 64, "'data.batch_size' (data: {batch_size: 64})"),
    ("max_grad_norm", 1.0, "'grad_clip.max_norm' (grad_clip: {max_norm: 1.0})"),
    ("sync_batchnorm", True, "'distributed.sync_batchnorm' (distributed: "
                             "{sync_batchnorm: true})")])
def test_a_sections_key_at_the_top_level_is_named_where_it_belongs(key, value, want) -> None:
    """`lr: 0.1` at the top of a config listed the valid top-level keys, which do not say
    where lr goes."""
    assert error_of(minimal(**{key: value})) == \
        f"config key '{key}' is unknown at the top level: it is {want}"


def test_unknown_top_level_key_suggests_closest() -> None:
    message = error_of(minimal(optimiser={"type": "sgd"}))
    assert message == "config key 'optimiser' is unknown; did you mean 'optimizer'?"


def test_misspelled_keys_of_groups_and_constants_are_named() -> None:
    message = error_of(minimal(optimizer={"type": "sgd", "groups": [{"param": "*.bias"}]}))
    assert message.endswith("'optimizer.groups[0].param' is unknown: did you mean 'params'?")
    raw = minimal()
    raw["data"]["constants"] = {"sr": {"shape": [1], "fil": 1}}
    assert error_of(raw).endswith("unknown key 'fil'; did you mean 'data.constants.sr.fill'?")


@pytest.mark.parametrize("value, want", [
    ([1, [2]], "config key 'data.constants.k' must be a rectangular list (every entry of one "
               "shape, as an array): entry 0 has shape [], entry 1 [1]"),
    ([[1, 2], [3]], "config key 'data.constants.k' must be a rectangular list (every entry of "
                    "one shape, as an array): entry 0 has shape [2], entry 1 [1]"),
    (float("nan"), "config key 'data.constants.k' must be a finite number, got nan"),
    ([1, float("-inf")], "config key 'data.constants.k[1]' must be a finite number, got -inf"),
    ({"shape": [2], "fill": float("inf")},
     "config key 'data.constants.k.fill' must be a finite number, got inf"),
])
def test_constants_that_are_no_array_of_finite_numbers_are_named(value, want) -> None:
    """A ragged list ended in an internal error (np.asarray at step 1), and NaN or Inf failed
    at step 1 as a non-finite loss, advising a lower lr."""
    raw = minimal()
    raw["data"]["constants"] = {"k": value}
    assert error_of(raw) == want


def test_a_target_named_as_a_model_input_is_named() -> None:
    """An autoencoder's `inputs: {x: x}, targets: {x: x}`: the target took the input's place,
    which passed `check` and the pre-flight and stopped step 1 with "input 'x' was not
    provided"."""
    raw = minimal(loss={"type": "mse", "output": "y", "target": "x"})
    raw["data"]["train"].update(inputs={"x": "images"}, targets={"x": "images"})
    assert error_of(raw) == (
        "config key 'data.train.targets' names 'x', which data.train.inputs names too (a model "
        "input): give the loss target another name in data.train.targets and loss.target (e.g. "
        "'x_target: images'); both may read the same array")


def test_unknown_nested_key_suggests_full_path() -> None:
    raw = minimal()
    raw["data"]["train"]["target"] = {"label": "y"}
    message = error_of(raw)
    assert message == (
        "config key 'data.train.target' is unknown; did you mean 'data.train.targets'?")


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    message = error_of(minimal(log={"zzz": 1}))
    assert message == "config key 'log.zzz' is unknown (valid: every_steps, metrics, tensorboard)"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("data.batch_size", "32x", "config key 'data.batch_size' must be an integer, got str '32x'"),
    ("data.batch_size", True, "config key 'data.batch_size' must be an integer, got bool True"),
    ("data.batch_size", 2.0, "config key 'data.batch_size' must be an integer, got float 2.0"),
    ("data.shuffle", "yes please", "config key 'data.shuffle' must be true or false"),
    ("optimizer.lr", "fast", "config key 'optimizer.lr' must be a finite number, got str 'fast'"),
    ("optimizer.lr", -1, "config key 'optimizer.lr' must be >= 0, got -1.0"),
    ("data.batch_size", 0, "config key 'data.batch_size' must be > 0, got 0"),
    ("optimizer.betas", [0.9], "config key 'optimizer.betas' must be a list of two numbers"),
    ("trainable", "fc1", "config key 'trainable' must be 'all' or a non-empty list"),
    ("frozen", [1], "config key 'frozen[0]' must be a non-empty string, got int 1"),
    ("data.train.inputs", {"input": 3}, "config key 'data.train.inputs.input' must be a non-empty"),
    ("loss", "mse", "config key 'loss' must be a mapping, got str 'mse'"),
    ("threads", 0, "config key 'threads' must be > 0, got 0"),
    ("loss.ignore_index", 10 ** 23, "config key 'loss.ignore_index' must be within int64's "
                                    "range (|value| < 2^63), got 100000000000000000000000"),
    ("steps", 2 ** 63, "config key 'steps' must be within int64's range"),
    ("loss.label_smoothing", 1.5, "config key 'loss.label_smoothing' must be in [0, 1]"),
    ("threads", "four", "config key 'threads' must be an integer, got str 'four'"),
    ("memory_check", "no way", "config key 'memory_check' must be true or false"),
    ("data.prefetch", "sometimes",
     "config key 'data.prefetch' must be true, false or auto, got str 'sometimes'"),
])
def test_wrong_types(key: str, value: object, expected: str) -> None:
    raw = minimal(optimizer={"type": "adam"} if key == "optimizer.betas" else {})
    apply_override(raw, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    assert error_of(raw).startswith(expected)


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("optimizer", "adam", "optimizer: {type: adam}"), ("schedule", "cosine",
                                                      "schedule: {type: cosine}"),
    ("grad_clip", 1.0, "grad_clip: {max_norm: 1.0}"), ("early_stop", 3,
                                                       "early_stop: {patience: 3}"),
    ("loss", "mse", "loss: {type: mse}"), ("best", "eval_accuracy",
                                           "best: {metric: eval_accuracy}")])
def test_a_section_given_as_its_one_value_is_told_the_mapping(key, value, fix) -> None:
    """`optimizer: adam`, a new user's shorthand, was told "must be a mapping" alone (found by
    a README sweep): the error writes the mapping it stands for."""
    raw = minimal()
    raw[key] = value
    assert error_of(raw).endswith(f": write {fix}")


def test_numbers_given_as_strings_and_ints_are_floats() -> None:
    raw = minimal(optimizer={"type": "adam", "lr": "1e-3", "eps": 0}, grad_clip={"max_norm": 5})
    cfg = config_from_dict(raw, "/b")
    assert cfg.optimizer.lr == 1e-3 and type(cfg.optimizer.eps) is float
    assert type(cfg.grad_clip.max_norm) is float  # type: ignore[union-attr]


def test_bad_enum_value_lists_choices_and_suggests() -> None:
    assert error_of(minimal(device="gpus")) == (
        "config key 'device' must be one of auto, cpu, gpu; got 'gpus'; did you mean 'gpu'?")
    message = error_of(minimal(optimizer={"type": "adamx"}))
    assert message.startswith("config key 'optimizer.type' must be one of sgd, adam, adamw")
    assert error_of(minimal(precision="fp8")).startswith("config key 'precision' must be one of")


@pytest.mark.parametrize(("drop", "key"), [
    ("model", "model"), ("loss", "loss"), ("data", "data"), ("loss.output", "loss.output"),
    ("loss.type", "loss.type"), ("data.train", "data.train"),
    ("data.train.inputs", "data.train.inputs"),
])
def test_missing_required_key(drop: str, key: str) -> None:
    raw = minimal()
    *parents, last = drop.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    assert error_of(raw) == f"config key '{key}' is required"


def test_type_specific_required_keys() -> None:
    raw = minimal(loss={"type": "mse", "output": "y"})
    assert error_of(raw) == "config key 'loss.target' is required for loss type 'mse'"
    message = error_of(minimal(schedule={"type": "step"}))
    assert message == "config key 'schedule.step_size' is required for schedule type 'step'"
    cfg = config_from_dict(minimal(loss={"type": "output", "output": "loss"}), "/b")
    assert cfg.loss.target is None


@pytest.mark.parametrize(("extra", "got"), [({"epochs": 2}, "both"), ({"steps": None}, "neither")])
def test_steps_and_epochs_exactly_one(extra: dict, got: str) -> None:
    message = error_of(minimal(**extra))
    assert "'steps'" in message and "'epochs'" in message and f"got {got}" in message
    # (both: a --set steps=N over a file's epochs; the message says how to drop one)
    assert ("--set epochs=null" in message) == (got == "both")


def test_optimizer_key_invalid_for_type() -> None:
    message = error_of(minimal(optimizer={"type": "sgd", "betas": [0.9, 0.99]}))
    assert message == ("config key 'optimizer.betas' is not valid for optimizer type 'sgd' "
                       "(valid: lr, momentum, nesterov, dampening, weight_decay, maximize, groups)")
    message = error_of(minimal(optimizer={"type": "adam", "momentum": 0.9}))
    assert message == ("config key 'optimizer.momentum' is not valid for optimizer type 'adam' "
                       "(valid: lr, weight_decay, betas, eps, amsgrad, decoupled_weight_decay, "
                       "maximize, groups)")


def test_nesterov_requires_momentum_and_no_dampening() -> None:
    message = error_of(minimal(optimizer={"nesterov": True}))
    assert message == "config key 'optimizer.nesterov' requires momentum > 0 and dampening 0"
    error_of(minimal(optimizer={"nesterov": True, "momentum": 0.9, "dampening": 0.1}))
    cfg = config_from_dict(minimal(optimizer={"nesterov": True, "momentum": 0.9}), "/b")
    assert cfg.optimizer.nesterov is True


def test_loss_target_must_be_a_train_target() -> None:
    raw = minimal(loss={"type": "cross_entropy", "output": "logits", "target": "lable"})
    assert error_of(raw) == ("config key 'loss.target' is 'lable', which is not a key of "
                             "data.train.targets (label); did you mean 'label'?")
    raw = minimal()
    raw["data"]["eval"] = {"path": "e.npz", "inputs": {"input": "x"}}
    assert error_of(raw).startswith("config key 'loss.target' is 'label', which is not a key of "
                                    "data.eval.targets (none)")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level"):
        config_from_dict(["model"], "/b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top level"):
        load_config(write(tmp_path, "- model\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^config file not found: .*nope.yaml$"):
        load_config(tmp_path / "nope.yaml")


def test_python_object_tag_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "python/object" in message
    assert not marker.exists()


def test_invalid_yaml_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model: [unclosed\nseed: 1\n"))
    assert str(info.value).startswith("cannot parse config file ") and "\n" not in str(info.value)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- threads -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("affinity", "local", "expected"), [
    (8, None, 8), (8, "4", 2), (8, "3", 2), (8, "16", 1), (2, "4", 2), (8, "2(x3)", 4)])
def test_default_threads_are_the_share_of_the_cores(monkeypatch, affinity, local, expected):
    """Cores this process may use, divided among the node's processes; a launcher that binds
    the process to fewer cores than the node has already gave it its share."""
    from trainer import config as config_module

    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(affinity)),
                        raising=False)
    for var in config_module._LOCAL_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    if local is not None:
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE" if "(" in local
                           else "OMPI_COMM_WORLD_LOCAL_SIZE", local)
    assert config_module.resolve_threads(None) == expected
    assert config_module.resolve_threads(3) == 3


def test_thread_environment_keeps_what_the_user_set(monkeypatch):
    from trainer.config import THREAD_VARS, thread_environment

    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert "OMP_NUM_THREADS" not in thread_environment(None)
    assert set(thread_environment(None)) - {"ONNX_TRAINER_THREADS"} == \
        set(THREAD_VARS) - {"OMP_NUM_THREADS"}
    assert thread_environment(2) == {**dict.fromkeys(THREAD_VARS, "2"),
                                     "ONNX_TRAINER_THREADS": "2"}


def test_a_thread_count_set_in_the_environment_is_kept(monkeypatch):
    from trainer.config import THREAD_VARS, blas_threads

    for var in THREAD_VARS + ("ONNX_TRAINER_THREADS",):
        monkeypatch.delenv(var, raising=False)
    assert blas_threads(3) == (3, "threads")
    assert blas_threads(None)[1] == "share of the cores"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert blas_threads(None) == (5, "OMP_NUM_THREADS")
    assert blas_threads(2) == (2, "threads")
    monkeypatch.setenv("ONNX_TRAINER_THREADS", "5")  # the CLI's default, not the user's
    assert blas_threads(None)[1] == "share of the cores"


def _openblas_threads():
    """(get, set) of the OpenBLAS that NumPy loaded, or None (another BLAS)."""
    import ctypes

    import numpy  # noqa: F401 - loads the BLAS

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "openblas" in line}
    for path in paths:
        lib = ctypes.CDLL(path)
        for get, put in (("scipy_openblas_get_num_threads64_",
                          "scipy_openblas_set_num_threads64_"),
                         ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, put):
                return getattr(lib, get), getattr(lib, put)
    return None


def test_threads_limit_the_blas_of_a_running_process(tmp_path: Path, digits_config) -> None:
    import io

    from trainer.train import Trainer

    blas = _openblas_threads()
    if blas is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS")
    get, put = blas
    before = get()
    try:
        Trainer(config_from_dict(digits_config(threads=1), tmp_path), stream=io.StringIO(),
                check=False)
        assert get() == 1
    finally:
        put(before)


def test_threads_reach_the_environment_before_numpy_loads(tmp_path: Path, digits_config) -> None:
    """`onnx-trainer train` sets the variables before NumPy (and its BLAS) is imported: an
    import hook records OPENBLAS_NUM_THREADS when NumPy is first looked for."""
    import subprocess
    import sys

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(threads=1, steps=1)))
    code = f"""
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(os.environ.get("OPENBLAS_NUM_THREADS"))
sys.meta_path.insert(0, Spy())
from trainer import cli
code = cli.main(["train", {str(path)!r}])
print("NUMPY SAW", seen)
sys.exit(code)
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "NUMPY SAW ['1']" in proc.stdout


@pytest.mark.parametrize("init", [1e300, 3.5e38])
def test_a_loss_scale_beyond_float32_is_refused(tmp_path, init):
    """loss_scale.init is held as a float32: a larger one would be inf (every fp16 step then
    skipped, the run ending untrained without an error), so it is refused by name."""
    raw = {"model": "m.onnx", "output": "o.onnx", "precision": "fp16",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}}},
           "loss": {"type": "output", "output": "y"}, "loss_scale": {"init": init}, "steps": 1}
    with pytest.raises(ConfigError, match="loss_scale.init.*at most 3.4e38"):
        config_from_dict(raw, tmp_path)
    raw["loss_scale"]["init"] = 3.4e38
    assert config_from_dict(raw, tmp_path).loss_scale.init == 3.4e38


def test_switching_optimizer_type_with_null_for_the_old_types_keys() -> None:
    """`--set optimizer.type=adam --set optimizer.momentum=null`: null is the key left out
    (the override error says so), so the old type's keys no longer block the switch."""
    raw = minimal(optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True})
    cfg = config_from_dict(raw, "/base", ("optimizer.type=adam", "optimizer.momentum=null",
                                          "optimizer.nesterov=null"))
    assert cfg.optimizer.type == "adam" and cfg.optimizer.lr == 0.1
    assert "'optimizer.momentum' is not valid for optimizer type 'adam'" in error_of(
        raw, ("optimizer.type=adam",))


def test_a_dataset_folder_may_end_with_a_slash() -> None:
    """A folder of <key>.npy files is a dataset: `data.train.path: dsdir/` was refused as 'a
    folder' (what output and log.metrics refuse)."""
    raw = minimal()
    raw["data"]["train"]["path"] = "dsdir/"
    assert config_from_dict(raw, "/base").data.train.path == Path("/base/dsdir")


def test_choices_suggest_the_other_case_and_empty_mappings_read_plainly() -> None:
    assert "did you mean 'gpu'?" in error_of(minimal(device="GPU"))
    raw = minimal()
    raw["data"]["train"]["inputs"] = {}
    assert error_of(raw).endswith("'data.train.inputs' must not be empty, got {}")
