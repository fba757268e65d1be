"""Everything that can be checked before step 1 is checked before step 1, with one line that
names what is wrong; labels (ignore_index, ranges); evaluation in inference form; resume that
keeps everything; BatchNormalization kept in eval form; models as exported."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import EXAMPLES, ROOT
from trainer.config import config_from_dict
from trainer.errors import DataError, TrainerError
from trainer.train import Trainer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def one_line(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def trainer(tmp_path, raw):
    return Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


# -- labels --------------------------------------------------------------------------------------
def _digits_with_labels(tmp_path, y_train, name="d.npz"):
    d = np.load(ROOT / "examples" / "digits.npz")
    np.savez(tmp_path / name, x=d["x_train"][:len(y_train)], y=y_train,
             xt=d["x_test"], yt=d["y_test"])
    return str(tmp_path / name)


def _data(path, eval_path=None):
    out = {"train": {"path": path, "inputs": {"x": "x"}, "targets": {"label": "y"}},
           "batch_size": 32, "shuffle": False}
    if eval_path:
        out["eval"] = {"path": eval_path, "inputs": {"x": "xt"}, "targets": {"label": "yt"}}
    return out


@pytest.mark.parametrize("value", [-1, 10, 57])
def test_labels_out_of_range_are_named_before_training(tmp_path, digits_config, value):
    y = np.random.default_rng(0).integers(0, 10, 256)
    y[77] = value
    raw = digits_config(data=_data(_digits_with_labels(tmp_path, y)))
    with pytest.raises(DataError) as err:
        trainer(tmp_path, raw)
    msg = str(err.value)
    assert "data.train" in msg and f"holds {value} at sample 77" in msg and "[0, 10)" in msg


def test_ignore_index_labels_do_not_count(tmp_path, digits_config):
    """Label -100 is ignored as torch.nn.functional.cross_entropy ignores it: the loss of a
    batch is the mean over the other labels (engine loss == torch loss)."""
    import torch

    y = np.random.default_rng(0).integers(0, 10, 64)
    y[::3] = -100
    raw = digits_config(data=_data(_digits_with_labels(tmp_path, y)), steps=1,
                        optimizer={"type": "sgd", "lr": 1e-9}, precision="fp64")
    t = trainer(tmp_path, raw)
    w = {k: v.copy() for k, v in t.trained_values().items()}
    loss = t.fit()["loss"]
    x = np.load(tmp_path / "d.npz")["x"][:32].astype(np.float64)
    h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    logits = h @ w["fc2.weight"].T + w["fc2.bias"]
    want = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y[:32]))
    assert loss == pytest.approx(float(want), rel=1e-10)


@pytest.mark.parametrize("which", ["data.train", "data.eval"])
def test_a_dataset_whose_every_label_is_ignored_is_named(tmp_path, digits_config, which):
    """Every label equal to ignore_index: no position counts (the loss is 0 / 0: it trained
    with loss 0, or evaluated to eval_loss 0 and eval_accuracy 0, which `best` kept)."""
    y = np.random.default_rng(0).integers(0, 10, 64)
    if which == "data.train":
        y[:] = -100
    path = _digits_with_labels(tmp_path, y)
    if which == "data.eval":
        d = dict(np.load(path))
        d["yt"] = np.full_like(d["yt"], -100)
        np.savez(path, **d)
    raw = digits_config(data=_data(path, path), steps=2)
    with pytest.raises(DataError, match=f"{which}: every label of target 'label' is -100, "
                                        "loss.ignore_index: no position counts"):
        trainer(tmp_path, raw)


def test_data_inputs_that_name_no_fed_input_are_refused(tmp_path, digits_config):
    """A data.*.inputs key that is not an input of the model (a typo) was loaded and ignored;
    one naming an input that also has an initializer (ONNX's overridable default, trained as a
    parameter) was too, so the data never reached the model. Both are named before step 1, by
    train and by check."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.report import preflight

    path = _digits_with_labels(tmp_path, np.random.default_rng(0).integers(0, 10, 64))
    raw = digits_config(data=_data(path), steps=2)
    raw["data"]["train"]["inputs"]["xs"] = "x"
    with pytest.raises(DataError, match="data.train.inputs maps 'xs', which is not an input of "
                                        "the model .*did you mean 'x'"):
        trainer(tmp_path, raw)
    assert "did you mean 'x'" in str(preflight(config_from_dict(raw, tmp_path)).problems[0])
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["h"]),
         helper.make_node("MatMul", ["h", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["N", 64]) for k in ("x", "scale")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.ones(64, np.float32), "scale"),
         numpy_helper.from_array(np.zeros((64, 10), np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "opt.onnx"))
    raw = digits_config(model=str(tmp_path / "opt.onnx"), data=_data(path), steps=2)
    raw["data"]["train"]["inputs"]["scale"] = "x"
    with pytest.raises(DataError, match="maps 'scale', an input that the model also holds as an "
                                        "initializer"):
        trainer(tmp_path, raw)


def test_a_batch_larger_than_the_data_is_estimated_at_the_data(tmp_path, digits_config):
    """data.batch_size 10^9 with drop_last false over 1437 samples: each batch is all of them,
    which the pre-flight says and estimates (its estimate ran shape inference at 10^9 rows:
    gigabytes and minutes, or the machine's memory)."""
    from trainer.report import preflight

    raw = digits_config(data__batch_size=10 ** 9, data__drop_last=False)
    pre = preflight(config_from_dict(raw, tmp_path))
    assert not pre.problems, pre.text()
    assert "(more than the 1437 samples: each batch is all of them), 1437 per process" in \
        pre.text()
    assert pre.estimate is not None and pre.estimate.activations < 1437 * 4 * 1000


@pytest.mark.parametrize("kind,warmup,top", [
    ("cosine", 20, "its configured value"), ("step", 30, "20/30 of its configured value"),
    ("cosine", 19, None), ("constant", 20, "its configured value"), ("onecycle", 0, None)])
def test_a_warmup_as_long_as_the_run_is_said(tmp_path, digits_config, kind, warmup, top):
    """warmup_steps >= the run's optimizer steps: the lr only rises and the schedule never
    starts (a recipe's warmup kept on a short run); said before training, not refused."""
    from trainer.report import preflight

    sched = {"type": kind} | ({"warmup_steps": warmup} if warmup else {}) | (
        {"step_size": 5} if kind == "step" else {})
    pre = preflight(config_from_dict(digits_config(schedule=sched), tmp_path))  # (20 steps)
    assert not pre.problems, pre.text()
    line = (f"warning: schedule.warmup_steps {warmup} covers the whole run (20 optimizer "
            f"steps): the lr only rises, to {top} at the last step, and the {kind} schedule "
            "never starts")
    assert (line in pre.text()) == (top is not None), pre.text()
    assert top is not None or "warmup_steps" not in pre.text()


@pytest.mark.parametrize("tmpfile", [True, False])
def test_an_unwritable_folder_is_named_not_the_probe_file(tmp_path, monkeypatch, tmpfile):
    """A relative folder (`--profile-trace rel.json` in a read-only working directory): the
    message named the internal probe file, whose absolute name the relative one did not
    match. The probe is a file without a name (O_TMPFILE) where the file system makes one,
    else a named one (`tmpfile` False)."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    from trainer import preflight

    real_open = os.open

    def no_tmpfile(path, flags, *args):
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            code = errno.EROFS if tmpfile else errno.EOPNOTSUPP
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args)

    def refuse(dir, prefix):
        name = str(Path(dir).absolute() / f"{prefix}x1y2")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight.os, "open", no_tmpfile)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(TrainerError, match=r"^--profile-trace rel.json: cannot write in \.: "
                                           r"Read-only file system$"):
        preflight._probe(Path("."), Path("rel.json"), "--profile-trace")


def test_the_write_probe_leaves_no_file_a_kill_could_leave(tmp_path, monkeypatch):
    """The probe was a named file made and removed again: a run killed in between left
    `.onnx-trainer-probe-*` in the output folder for good. Where the file system makes files
    without a name (O_TMPFILE: Linux's tmpfs, ext4, xfs, btrfs), no named file is made."""
    import os
    import tempfile
    from pathlib import Path

    from trainer import preflight

    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this system")
    try:
        os.close(os.open(tmp_path, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError as exc:
        pytest.skip(f"the file system of {tmp_path} makes no O_TMPFILE files: {exc}")

    def named(*args, **kwargs):
        raise AssertionError("a named probe file was made")
    monkeypatch.setattr(tempfile, "mkstemp", named)
    preflight._probe(tmp_path / "out", Path(tmp_path / "out" / "m.onnx"), "output")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_batch_the_processes_do_not_divide_hides_no_other_problem(tmp_path, digits_config):
    """`check --world 3` with data.batch_size 32 listed that problem alone: a label out of
    range, which `--world 1` lists, was left out, as was everything else the estimate's build
    finds. The rest is checked at the next batch the processes divide (33)."""
    from trainer.report import preflight

    d = np.load(EXAMPLES / "digits.npz")
    y = d["y_train"].copy()
    y[5] = 10
    np.savez(tmp_path / "d.npz", x=d["x_train"], y=y)
    raw = digits_config(data__train={"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                                     "targets": {"label": "y"}})
    pre = preflight(config_from_dict(raw, tmp_path), world=3)
    said = [str(p) for p in pre.problems]
    assert said[0] == "data.batch_size 32 (global) must be divisible by the number of processes 3"
    assert len(said) == 2 and "holds 10 at sample 5" in said[1], said
    assert "global batch 32, checked at 33, 11 per process" in pre.text()


def test_more_blas_threads_than_cores_is_said(tmp_path, digits_config):
    """`threads: 64` on a machine of a few cores was taken in silence, and a step ran about a
    thousand times slower (found by a robustness sweep)."""
    import os

    from trainer.report import preflight

    many = 4 * (os.cpu_count() or 1)
    text = preflight(config_from_dict(digits_config(threads=many), tmp_path)).text()
    assert f"warning: {many} BLAS thread(s) (threads) x 1 process(es) on the" in text and \
        "leave `threads` out" in text, text
    assert "outnumber" not in preflight(config_from_dict(digits_config(threads=1),
                                                         tmp_path)).text()


def test_checkpoint_every_steps_without_a_dir_is_said(tmp_path, digits_config):
    """checkpoint.every_steps without checkpoint.dir was accepted in silence and saved
    nothing."""
    from trainer.report import preflight

    said = "warning: checkpoint.every_steps 5 without checkpoint.dir: no checkpoint is written"
    assert said in preflight(config_from_dict(digits_config(checkpoint={"every_steps": 5}),
                                              tmp_path)).text()
    assert said not in preflight(config_from_dict(digits_config(checkpoint={
        "every_steps": 5, "dir": str(tmp_path / "ck")}), tmp_path)).text()


@pytest.mark.parametrize("eval_t", [12, 6])
def test_an_eval_set_of_another_sequence_length_is_checked_at_its_own(tmp_path, eval_t,
                                                                      capsys):
    """ids [N, T] -> embedding -> logits [N, T, 5], T symbolic: an eval set with T=12 (or 6)
    next to training at T=8 was refused before training, its labels held against the
    training batch's output ("'logits' without its class axis has [8]"). Checked at its own
    length now; labels beyond the classes at that length are still named."""
    from trainer.cli import main

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]),
         helper.make_node("MatMul", ["h", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", 5])],
        [numpy_helper.from_array(rng.standard_normal((20, 4)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    y_eval = rng.integers(0, 5, (16, eval_t))
    np.savez(tmp_path / "d.npz", ids=rng.integers(0, 20, (32, 8)), y=rng.integers(0, 5, (32, 8)),
             ids_e=rng.integers(0, 20, (16, eval_t)), y_e=y_eval)
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 2,
           "data": {"train": {"path": "d.npz", "inputs": {"ids": "ids"}, "targets": {"y": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"ids": "ids_e"}, "targets": {"y": "y_e"}},
                    "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "y"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "c.yaml")]) == 0, capsys.readouterr().out
    t = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())
    t.fit()
    assert np.isfinite(t.history[-1]["eval_loss"])
    y_eval[3, eval_t - 1] = 7  # (beyond the 5 classes: named, at the eval set's length)
    np.savez(tmp_path / "d.npz", ids=rng.integers(0, 20, (32, 8)), y=rng.integers(0, 5, (32, 8)),
             ids_e=rng.integers(0, 20, (16, eval_t)), y_e=y_eval)
    capsys.readouterr()
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "data.eval" in capsys.readouterr().out
    with pytest.raises(TrainerError, match="data.eval"):
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO())


def test_a_best_or_early_stop_mode_against_its_metric_is_warned_of(tmp_path, digits_config):
    """best.mode max with eval_loss kept the worst model, in silence."""
    raw = digits_config(best={"metric": "eval_loss", "mode": "max"},
                        early_stop={"metric": "eval_accuracy", "mode": "min", "patience": 2},
                        schedule={"type": "plateau", "metric": "eval_loss", "mode": "max"})
    text = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).preflight.text()
    assert "warning: schedule.mode max with schedule.metric eval_loss counts its highest " \
        "value as the best" in text, text
    assert "warning: best.mode max with best.metric eval_loss counts its highest value as the " \
        "best (a loss is best at its lowest)" in text, text
    assert "warning: early_stop.mode min with early_stop.metric eval_accuracy counts its " \
        "lowest value as the best (an accuracy is best at its highest)" in text, text
    fine = digits_config(best={"metric": "eval_loss", "mode": "min"},
                         early_stop={"metric": "eval_accuracy", "patience": 2})
    text = Trainer(config_from_dict(fine, tmp_path), stream=io.StringIO()).preflight.text()
    assert "warning" not in text, text


def test_the_pre_flight_names_what_the_recipe_trains(tmp_path, digits_config):
    """`check CONFIG` gave only counts for a trainable/frozen recipe: which tensors train
    could not be seen before training (found by a fine-tuning sweep)."""
    raw = digits_config(frozen=["fc1.*"])
    text = Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).preflight.text()
    assert "parameters: 1,290 trained (5.0 KiB), 8,320 frozen (32.5 KiB): trained fc2.weight, " \
        "fc2.bias; left out fc1.weight, fc1.bias" in text, text


def test_check_config_reads_the_values_train_would_refuse(tmp_path, digits_config, capsys,
                                                          monkeypatch):
    """`check CONFIG` read array headers only, so it passed NaN data (and strings) that
    `train` refused as it loaded them; datasets up to a bound, held in memory or
    memory-mapped from a folder, have their values checked."""
    from trainer.cli import main

    d = np.load(EXAMPLES / "digits.npz")
    x = d["x_train"].copy()
    x[5, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=d["y_train"])
    raw = digits_config()
    raw["data"]["train"] = {"path": str(tmp_path / "nan.npz"), "inputs": {"x": "x"},
                            "targets": {"label": "y"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "data.train: array 'x' (for 'x') holds nan at sample 5, position [2]" in \
        capsys.readouterr().out
    np.savez(tmp_path / "nan.npz", x=x.astype(str), y=d["y_train"])
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "'x' holds <U32 values, but the model's input takes float32" in \
        capsys.readouterr().out
    # a folder of .npy files (memory-mapped, read in chunks): the same check
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", x)
    np.save(tmp_path / "folder" / "y.npy", d["y_train"])
    raw["data"]["train"]["path"] = str(tmp_path / "folder")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    out = capsys.readouterr().out
    assert "memory-mapped" in out and "array 'x' (for 'x') in " in out and \
        "holds nan at sample 5, position [2]" in out, out
    # beyond the bound, said, not read
    monkeypatch.setattr("trainer.report._VALUE_CHECK_BYTES", 1000)
    assert main(["check", str(tmp_path / "c.yaml")]) == 0
    assert "data.train: values not checked (over 1000 B; train checks them as it loads " \
        "them)" in capsys.readouterr().out


def test_check_config_reads_token_ids_against_the_embedding_table(tmp_path, capsys):
    """`check CONFIG` passed token ids past an embedding's rows, which `train` refused at
    load: the value check follows them to the Gather they index (through a Cast here)."""
    from trainer.cli import main

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["t64"], to=TensorProto.INT64),
         helper.make_node("Gather", ["E", "t64"], ["emb"], name="embed"),
         helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["pooled", "W"], ["logits"])], "g",
        [helper.make_tensor_value_info("tokens", TensorProto.INT32, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "m.onnx"))
    t = rng.integers(0, 20, (32, 6)).astype(np.int32)
    np.savez(tmp_path / "d.npz", tokens=t, label=rng.integers(0, 3, 32))
    raw = {"model": "m.onnx", "steps": 2,
           "data": {"train": {"path": "d.npz", "inputs": {"tokens": "tokens"},
                              "targets": {"label": "label"}}, "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "c.yaml")]) == 0, capsys.readouterr().out
    capsys.readouterr()
    t[3, 2] = 25
    np.savez(tmp_path / "d.npz", tokens=t, label=rng.integers(0, 3, 32))
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "data.train: input 'tokens' holds 25 at sample 3, but node 'embed' (Gather) reads " \
        "it as an index into axis 0 of 'E', which has 20 entries" in capsys.readouterr().out
    # (ids stored as whole-number floats, converted for the model: not checked, so a GPU's
    # Gather, which checks nothing, read row 25 % 20)
    np.savez(tmp_path / "d.npz", tokens=t.astype(np.float32), label=rng.integers(0, 3, 32))
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "data.train: input 'tokens' holds 25 at sample 3, but node 'embed' (Gather) reads " \
        "it as an index into axis 0 of 'E', which has 20 entries" in capsys.readouterr().out


def test_a_disk_without_room_for_the_result_is_named_before_training(tmp_path, digits_config,
                                                                     monkeypatch):
    """An output on a file system with less free space than the trained model takes (the
    model file's size; twice with `best`) is refused before step 1: the run trained to the end
    and lost everything at the export. A checkpoint.dir without room for one checkpoint (the
    trained values and the optimizer's state) is warned of."""
    import collections
    import shutil

    from trainer.report import preflight

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 5000, 5000))
    raw = digits_config(checkpoint={"dir": str(tmp_path / "ck")})
    with pytest.raises(TrainerError, match="output .*: 4.9 KiB free on its file system, where "
                                           "the trained model takes about"):
        trainer(tmp_path, raw)
    pre = preflight(config_from_dict(raw, tmp_path))
    assert "warning: checkpoint.dir" in pre.text() and "where a checkpoint takes about" in \
        pre.text()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 0, 10 ** 12))
    assert not preflight(config_from_dict(raw, tmp_path)).problems
    # (a disk with the model's size and a little more takes it: 64 KiB more were asked, and
    # said to be the model's size)
    from trainer.preflight import model_bytes

    room = model_bytes(config_from_dict(raw, tmp_path)) + 8192
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - room, room))
    assert not [p for p in preflight(config_from_dict(raw, tmp_path)).problems
                if "free on its file system" in str(p)]


def test_ignore_index_is_configurable(tmp_path, digits_config):
    y = np.random.default_rng(0).integers(0, 10, 64)
    y[5] = 255
    raw = digits_config(data=_data(_digits_with_labels(tmp_path, y)), steps=2)
    with pytest.raises(DataError, match="holds 255"):
        trainer(tmp_path, raw)
    raw["loss"]["ignore_index"] = 255
    assert trainer(tmp_path, raw).fit()["steps"] == 2


def test_labels_shaped_n_by_1_are_refused_with_a_hint(tmp_path, digits_config):
    y = np.random.default_rng(0).integers(0, 10, (64, 1))
    raw = digits_config(data=_data(_digits_with_labels(tmp_path, y)))
    with pytest.raises(DataError, match=r"\[N, 1\]"):
        trainer(tmp_path, raw)


# -- checks before step 1 ------------------------------------------------------------------------
def test_bad_eval_set_fails_in_seconds_not_after_training(tmp_path, digits_config):
    d = np.load(ROOT / "examples" / "digits.npz")
    np.savez(tmp_path / "bad_eval.npz", xt=d["x_test"][:, :60], yt=d["y_test"])
    raw = digits_config(steps=200000)
    raw["data"]["eval"] = {"path": str(tmp_path / "bad_eval.npz"), "inputs": {"x": "xt"},
                           "targets": {"label": "yt"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    line = one_line(run_cli("train", str(path)))
    assert time.monotonic() - start < 30
    assert "data.eval" in line and "[60]" in line


def test_eval_labels_are_checked_before_training(tmp_path, digits_config):
    d = np.load(ROOT / "examples" / "digits.npz")
    yt = d["y_test"].copy()
    yt[3] = 12
    np.savez(tmp_path / "e.npz", xt=d["x_test"], yt=yt)
    raw = digits_config(steps=200000)
    raw["data"]["eval"] = {"path": str(tmp_path / "e.npz"), "inputs": {"x": "xt"},
                           "targets": {"label": "yt"}}
    with pytest.raises(DataError, match="data.eval: target 'label' holds 12 at sample 3"):
        trainer(tmp_path, raw)


def test_output_that_is_a_directory_fails_before_training(tmp_path, digits_config):
    (tmp_path / "outdir").mkdir()
    raw = digits_config(steps=200000, output=str(tmp_path / "outdir"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    line = one_line(run_cli("train", str(path)))
    assert time.monotonic() - start < 30
    assert "output" in line and "is a directory" in line


def test_unwritable_output_and_checkpoint_dir(tmp_path, digits_config):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainerError, match="not a directory"):
        trainer(tmp_path, digits_config(output=str(tmp_path / "file" / "m.onnx")))
    with pytest.raises(TrainerError, match="checkpoint.dir .* not a directory"):
        trainer(tmp_path, digits_config(checkpoint={"dir": str(tmp_path / "file")}))


def _fixed_batch_model(path, batch=2):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    w = numpy_helper.from_array(np.full((64, 10), 0.01, np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                           helper.make_node("Reshape", ["h", "shape"], ["logits"])], "g", [x],
                          [y], [w, numpy_helper.from_array(np.array([batch, 10]), "shape")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_fixed_batch_dimension_is_named(tmp_path, digits_config):
    _fixed_batch_model(tmp_path / "m.onnx")
    with pytest.raises(DataError,
                       match="fixed batch dimension of 2.*dynamic batch axis.*--dynamic-batch"):
        trainer(tmp_path, digits_config(model=str(tmp_path / "m.onnx")))
    t = trainer(tmp_path, digits_config(model=str(tmp_path / "m.onnx"), data__batch_size=2,
                                        steps=2))
    assert t.fit()["steps"] == 2


def test_a_loss_output_without_the_batch_first_is_refused(tmp_path, digits_config):
    """A recurrent model's [T, N, C] output (ddddocr's CRNN exports one, at batch 1): its
    targets would be broadcast over T rather than compared row by row, so the pre-flight (and
    the trainer) say the output's first axis is not the batch."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Transpose", ["h"], ["y"], perm=[1, 0, 2])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "N", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]),
              str(tmp_path / "t.onnx"))
    np.savez(tmp_path / "d.npz", x=np.ones((8, 2, 4), np.float32),
             t=np.zeros((8, 1, 3), np.float32))  # (per sample [1, 3], as y's [1:] at batch 1)
    raw = digits_config(model=str(tmp_path / "t.onnx"),
                        data={"train": {"path": str(tmp_path / "d.npz"), "inputs": {"x": "x"},
                                        "targets": {"target": "t"}}, "batch_size": 1},
                        loss={"type": "mse", "output": "y", "target": "target"})
    with pytest.raises(DataError, match=r"the mse loss output 'y' has shape \[2, 1, 3\] for "
                                        r"batches of 1 sample\(s\): its first axis is not the "
                                        r"batch"):
        trainer(tmp_path, raw)
    with pytest.raises(DataError, match="its first axis is not the batch"):  # (the trainer's)
        Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO(), check=False)


def test_class_axis_that_does_not_exist(tmp_path, digits_config):
    raw = digits_config()
    raw["loss"]["class_axis"] = 2
    with pytest.raises(TrainerError, match="class_axis 2 does not exist"):
        trainer(tmp_path, raw)


def test_mse_targets_must_match_the_output(tmp_path, digits_config):
    d = np.load(ROOT / "examples" / "digits.npz")
    np.savez(tmp_path / "r.npz", x=d["x_train"][:64], t=np.zeros((64, 3), np.float32))
    raw = digits_config(data={"train": {"path": str(tmp_path / "r.npz"), "inputs": {"x": "x"},
                                        "targets": {"target": "t"}}, "batch_size": 32},
                        loss={"type": "mse", "output": "logits", "target": "target"})
    with pytest.raises(DataError, match=r"per-sample shape \[3\].*\[10\]"):
        trainer(tmp_path, raw)


def test_nccl_backend_is_refused_until_it_exists(tmp_path, digits_config):
    with pytest.raises(TrainerError, match="nccl is not available"):
        trainer(tmp_path, digits_config(distributed={"backend": "nccl"}))


# -- checkpoints and resume ----------------------------------------------------------------------
def test_checkpoint_dir_alone_saves_the_end_of_the_run(tmp_path, digits_config):
    from trainer import checkpoint
    trainer(tmp_path, digits_config(steps=7, checkpoint={"dir": str(tmp_path / "ck")})).fit()
    assert [p.name for p in checkpoint.complete(tmp_path / "ck")] == ["step_00000007"]


def test_resume_keeps_the_metrics_before_the_checkpoint(tmp_path, digits_config):
    metrics = tmp_path / "m.jsonl"
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 4}
    trainer(tmp_path, digits_config(steps=10, checkpoint=ck, log={"every_steps": 1,
                                                                  "metrics": str(metrics)})).fit()
    # A crashed run wrote steps 9 and 10 after its last checkpoint (step 8): they are dropped.
    trainer(tmp_path, digits_config(steps=12, checkpoint=ck, log={"every_steps": 1,
            "metrics": str(metrics)})).fit(resume=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s in steps] == list(range(1, 13)) + [12] * 0 or steps[:10] == list(
        range(1, 11))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, 13)), train_steps


def test_resume_writes_an_evaluation_after_the_checkpoint_once(tmp_path, digits_config):
    """Accumulating 3 of the 44 batches of an epoch, epoch 0 ends inside step 15 and is
    evaluated at the weights of step 14, after step 14's checkpoint: a run resumed from it
    evaluates again, and its metrics file had that evaluation row twice."""
    import shutil

    metrics = tmp_path / "m.jsonl"
    raw = digits_config(steps=16, accumulate=3, checkpoint={"dir": str(tmp_path / "ck"),
                                                            "every_steps": 7},
                        log={"every_steps": 1, "metrics": str(metrics)})
    trainer(tmp_path, raw).fit()

    def rows():
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in metrics.read_text().splitlines()]
    full = rows()
    assert [r["step"] for r in full if "eval_loss" in r] == [14, 16]
    shutil.rmtree(tmp_path / "ck" / "step_00000016")  # (a run that died after step 14's)
    trainer(tmp_path, raw).fit(resume=True)
    assert rows() == full


def test_resume_with_another_optimizer_starts_its_state_fresh(tmp_path, digits_config):
    ck = {"dir": str(tmp_path / "ck")}
    trainer(tmp_path, digits_config(steps=5, checkpoint=ck)).fit()
    out = io.StringIO()
    raw = digits_config(steps=8, checkpoint=ck, optimizer={"type": "adamw", "lr": 1e-3})
    t = Trainer(config_from_dict(raw, tmp_path), stream=out)
    t.fit(resume=True)
    assert t.step == 8 and "optimizer state starts fresh" in out.getvalue()


def test_resume_with_another_batch_size_continues_by_samples(tmp_path, digits_config):
    ck = {"dir": str(tmp_path / "ck")}
    trainer(tmp_path, digits_config(steps=6, checkpoint=ck)).fit()  # 6 x 32 samples
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=9, checkpoint=ck, data__batch_size=64),
                                 tmp_path), stream=out)
    t.fit(resume=True)
    assert "batch size changed from 32 to 64" in out.getvalue()
    assert "at sample 192" in out.getvalue()
    assert t.position == (0, 6)  # batches of 64: 192 / 64 = 3, then 3 more steps


@pytest.mark.parametrize("change, total", [({"data__batch_size": 64}, 6 + 19),
                                           ({"accumulate": 4}, 6 + 9)])
def test_an_epochs_run_resumed_with_other_steps_ends_with_its_last_epoch(tmp_path, digits_config,
                                                                         change, total):
    """The checkpoint's step count is of steps of its size: an `epochs` run resumed with
    another batch size or accumulate stopped by that count at the new length (a batch of 64:
    5 batches of an epoch the config does not have; accumulate 2: mid-epoch, in silence). It
    ends with its last epoch: 1437 digits are 22 full batches of 64 (drop_last), of which
    6 x 32 = 192 samples (3 batches) were trained: 19 more; 44 batches of 32 leave 38, 9 steps
    of 4 (its last 2 batches left, as accumulate's rule for a run says)."""
    ck = {"dir": str(tmp_path / "ck")}
    trainer(tmp_path, digits_config(steps=6, checkpoint=ck)).fit()  # 6 x 32 samples
    out = io.StringIO()
    raw = digits_config(steps=None, epochs=1, checkpoint=ck, schedule={"type": "cosine"},
                        log={"every_steps": 1, "metrics": str(tmp_path / "m.jsonl")}, **change)
    t = Trainer(config_from_dict(raw, tmp_path), stream=out)
    t.fit(resume=True)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert t.step == total and steps == list(range(7, total + 1)), (steps, out.getvalue())
    assert {r["epoch"] for r in rows} == {0}
    last = [r for r in rows if "loss" in r][-1]
    assert t.schedule.total_steps == total and last["lr"] < 2e-3  # (cosine's end)
    text = out.getvalue()
    assert f"more step(s) to the end of epoch 0, {total} in all" in text
    # (what the new layout leaves untrained, not what the config's own layout would have; the
    # schedule's jump to the new length said)
    assert ("(the last 2 batch(es) are not trained: fewer than accumulate)" in text) == \
        ("accumulate" in change) and "of the run are not trained" not in text
    assert f"the run is {total} steps now and was 6 at the checkpoint" in text, text


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_with_another_batch_size_after_an_epoch_starts_the_next(tmp_path, digits_config,
                                                                       drop_last):
    """A checkpoint at the end of an epoch (batches of 32: 1437 training digits, 44 full
    batches and one of 29), resumed with batches of 64: the position 45 x 32 = 1440 read as
    sample 1408 of that epoch, which trained its last samples again (drop_last: false), or
    said so while moving on (true). The epoch was over: the next starts."""
    ck = {"dir": str(tmp_path / "ck")}
    spe = 45 if not drop_last else 44
    trainer(tmp_path, digits_config(steps=spe, checkpoint=ck, data__shuffle=False,
                                    data__drop_last=drop_last)).fit()
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=spe + 1, checkpoint=ck,
                                               data__batch_size=64, data__shuffle=False,
                                               data__drop_last=drop_last), tmp_path),
                stream=out)
    t.fit(resume=True)
    assert "the checkpoint ended epoch 0; resuming at the start of epoch 1" in out.getvalue()
    assert t.position == (1, 1)


def test_resume_at_the_configured_length_says_so(tmp_path, digits_config):
    ck = {"dir": str(tmp_path / "ck")}
    trainer(tmp_path, digits_config(steps=4, checkpoint=ck)).fit()
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=4, checkpoint=ck), tmp_path), stream=out)
    assert t.fit(resume=True)["steps"] == 4
    assert "nothing to train" in out.getvalue()


# -- models as exported --------------------------------------------------------------------------
def _ir3_model(path):
    """An IR-3 model: initializers are also listed as graph inputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32) * 0.1, "w")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 10]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    onnx.save(m, path)


def test_ir3_model_with_initializers_as_inputs_trains(tmp_path, digits_config):
    _ir3_model(tmp_path / "m.onnx")
    t = trainer(tmp_path, digits_config(model=str(tmp_path / "m.onnx"), steps=5))
    assert sorted(t.names) == ["b", "w"]
    out = t.fit()["output"]
    onnx.checker.check_model(onnx.load(out))


def test_loss_target_named_like_a_graph_tensor(tmp_path, digits_config):
    raw = digits_config(steps=3)
    raw["loss"]["target"] = "h1"  # an internal tensor of the digits MLP
    raw["data"]["train"]["targets"] = {"h1": "y_train"}
    raw["data"]["eval"]["targets"] = {"h1": "y_test"}
    assert trainer(tmp_path, raw).fit()["steps"] == 3


def test_grad_batch_size_sets_only_the_batch_dimension(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "g", [x], [y],
                          [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "m.onnx")
    line = one_line(run_cli("grad", str(tmp_path / "m.onnx"), "--output", "logits",
                            "--batch-size", "8", "-o", str(tmp_path / "t.onnx")))
    assert "'T'" in line and "--shape x=" in line
    proc = run_cli("grad", str(tmp_path / "m.onnx"), "--output", "logits", "--shape",
                   "x=8,5,4", "-o", str(tmp_path / "t.onnx"))
    assert proc.returncode == 0, proc.stderr
    dims = [d.dim_value for d in onnx.load(tmp_path / "t.onnx").graph.input[0].type
            .tensor_type.shape.dim]
    assert dims == [8, 5, 4]


def test_grad_shape_of_one_input_sizes_the_dimensions_it_shares(tmp_path):
    """Inputs that share a symbolic dimension ('N', 'T'): --shape of one gives the others its
    sizes (they were built at batch 1, broadcasting one sample of xb over xa's batch, a graph
    of another function that onnxruntime refused a batch of 3 for); shapes that give one
    dimension two sizes are refused, naming both."""
    xa = helper.make_tensor_value_info("xa", TensorProto.FLOAT, ["N", "T", 4])
    xb = helper.make_tensor_value_info("xb", TensorProto.FLOAT, ["N", "T", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Add", ["xa", "xb"], ["h"]),
                           helper.make_node("MatMul", ["h", "w"], ["logits"])], "g",
                          [xa, xb], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "m.onnx")
    proc = run_cli("grad", str(tmp_path / "m.onnx"), "--output", "logits", "--shape",
                   "xa=3,5,4", "-o", str(tmp_path / "t.onnx"))
    assert proc.returncode == 0, proc.stderr
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.load(tmp_path / "t.onnx").graph.input}
    assert shapes["xa"] == shapes["xb"] == [3, 5, 4], shapes
    line = one_line(run_cli("grad", str(tmp_path / "m.onnx"), "--output", "logits",
                            "--shape", "xa=3,5,4", "--shape", "xb=3,6,4",
                            "-o", str(tmp_path / "t.onnx")))
    assert "--shape xa=... and --shape xb=... give the model's dimension 'T' (xa's axis 1, " \
        "xb's axis 1) the sizes 5 and 6: give it one size" in line, line


def test_eval_cli_on_a_trained_batchnorm_model(tmp_path):
    """`onnx-trainer eval CONFIG --model trained.onnx` on a BatchNorm CNN (its running
    statistics are loaded into engine-owned buffers)."""
    pytest.importorskip("onnxscript")
    from tests import torch_models as tm

    onnx.save(tm.export_form(tm.zoo_model("cnn"), (1, 16, 16)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 1, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, 40))
    raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 3,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert run_cli("train", str(tmp_path / "cfg.yaml")).returncode == 0
    proc = run_cli("eval", str(tmp_path / "cfg.yaml"), "--model", str(tmp_path / "out.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "eval_loss" in proc.stdout and "eval_accuracy" in proc.stdout


def test_evaluation_uses_inference_form(tmp_path):
    """A model exported in training form (Dropout active, BatchNormalization training_mode=1):
    evaluation, prediction and (on request) the export run it with Dropout off and the running
    statistics; repeated evaluations agree."""
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from tests import torch_models as tm

    model = tm.zoo_model("dropout_mlp")
    onnx.save(tm.export_form(model, (20,), "training"), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 10, 48))
    raw = {"model": "m.onnx", "output": "out.onnx", "device": "cpu", "steps": 2,
           "output_form": "inference",
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                    "batch_size": 8},
           "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    t = trainer(tmp_path, raw)
    first = t.evaluate()
    assert t.evaluate() == first == t.evaluate()
    import torch
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(t.predict({"x": x})["logits"], want, rtol=1e-5, atol=1e-6)
    out = t.fit()["output"]
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    a, b = (sess.run(["logits"], {"x": x})[0] for _ in range(2))
    np.testing.assert_array_equal(a, b)  # no dropout left in the exported inference form
    g = onnx.load(out).graph  # and no training_mode constant that nothing reads
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    unread = [t.name for t in g.initializer if t.name not in read]
    unread += [n.output[0] for n in g.node if n.op_type == "Constant" and n.output[0] not in read]
    assert unread == [], unread
    np.testing.assert_allclose(a, t.predict({"x": x})["logits"], rtol=1e-5, atol=1e-6)


def test_output_loss_eval_weighs_a_short_last_batch_by_its_samples(tmp_path):
    """loss.type output: the model's own (mean) loss; evaluation weighs each chunk by its
    samples, so the eval loss is the dataset mean whatever the batch size."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    w = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["p"]),
                           helper.make_node("ReduceMean", ["p"], ["loss"], keepdims=0)],
                          "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "m.onnx")
    data = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    np.savez(tmp_path / "d.npz", x=data)
    raw = {"model": "m.onnx", "output": "o.onnx", "device": "cpu", "steps": 1,
           "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}},
                    "eval": {"path": "d.npz", "inputs": {"x": "x"}}, "batch_size": 4},
           "loss": {"type": "output", "output": "loss"}, "precision": "fp64"}
    t = trainer(tmp_path, raw)
    want = float((data * np.array([1.0, 2.0])).mean())
    assert t.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-12)


def test_batchnorm_eval_keeps_statistics_fixed(tmp_path):
    pytest.importorskip("onnxscript")
    from tests import torch_models as tm

    onnx.save(tm.export_form(tm.zoo_model("resnet"), (3, 8, 8)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 32))
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx")
            .graph.initializer}
    base = {"model": "m.onnx", "device": "cpu", "steps": 2,
            "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                               "targets": {"label": "y"}}, "batch_size": 8},
            "loss": {"type": "cross_entropy", "output": "logits", "target": "label"}}
    # eval form everywhere: no statistic moves
    t = trainer(tmp_path, {**base, "output": "e.onnx", "batchnorm": "eval"})
    assert not t.state
    got = {t_.name: numpy_helper.to_array(t_) for t_ in onnx.load(t.fit()["output"])
           .graph.initializer}
    for k in init:
        if "running" in k:
            np.testing.assert_array_equal(got[k], init[k], err_msg=k)
    # eval form for the stem only (by scale initializer glob); the others train as usual
    t = trainer(tmp_path, {**base, "output": "p.onnx", "batchnorm": ["bn0.*"],
                           "frozen": ["stem.*", "bn0.*"]})
    assert set(t.state) == {k for k in init if "running" in k and not k.startswith("bn0.")}
    with pytest.raises(Exception, match="matches the scale of no BatchNormalization"):
        trainer(tmp_path, {**base, "output": "q.onnx", "batchnorm": ["nope.*"]})


def test_a_bce_target_of_the_wrong_shape_names_bce():
    from trainer import preflight
    from trainer.errors import DataError

    with pytest.raises(DataError, match="the bce loss compares it with 'logits'"):
        preflight.binary_targets(np.zeros((4, 3)), "t", "data.train", (1,), "logits")


@pytest.mark.parametrize("bad_at", [(7, 1), (2, 0)])
def test_labels_are_checked_in_chunks_and_the_first_bad_one_named(monkeypatch, bad_at):
    """Class labels are checked a chunk of samples at a time (a memory-mapped label file of
    tokens is not copied whole into temporaries, 3 bytes a label before); the first bad one is
    still named by its sample and position, and an all-ignored set still refused."""
    from trainer import preflight
    from trainer.errors import DataError

    monkeypatch.setattr(preflight, "LABEL_CHECK_ELEMENTS", 6)  # (3 samples of 2)
    labels = np.zeros((10, 2), np.int64)
    labels[bad_at] = 9
    with pytest.raises(DataError, match=f"holds 9 at sample {bad_at[0]}, position "
                                        f"\\[{bad_at[1]}\\], outside \\[0, 5\\)"):
        preflight.class_labels(labels, "y", "data.train", 5, (2,), -100, "logits")
    with pytest.raises(DataError, match="every label of target 'y' is -100"):
        preflight.class_labels(np.full((10, 2), -100), "y", "data.train", 5, (2,), -100,
                               "logits")
    labels[bad_at] = -100  # (one ignored position, the rest class 0: fine)
    preflight.class_labels(labels, "y", "data.train", 5, (2,), -100, "logits")


def test_a_large_weight_read_by_two_nodes_passes_the_preflight(tmp_path):
    """The pre-flight builds its report from the model's structure, whose tensors of more than
    65536 elements hold no values: the check for shared constants (a tied weight of 90000
    values read by two MatMuls) skips them, where it failed on the stub as an internal error
    in `check CONFIG` and `train` (found by a memory sweep)."""
    from onnx import TensorProto, helper, numpy_helper

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("MatMul", ["r", "W"], ["b"]),
         helper.make_node("MatMul", ["b", "Wo"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array((rng.standard_normal((300, 300)) * 0.05).astype(np.float32),
                                 "W"),
         numpy_helper.from_array((rng.standard_normal((300, 10)) * 0.05).astype(np.float32),
                                 "Wo")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 300)).astype(np.float32),
             y=rng.integers(0, 10, 32))
    t = Trainer(config_from_dict({
        "model": "m.onnx", "output": "o.onnx",
        "data": {"train": {"path": "d.npz", "inputs": {"x": "x"}, "targets": {"label": "y"}},
                 "batch_size": 16},
        "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
        "optimizer": {"type": "sgd", "lr": 0.01}, "steps": 1}, tmp_path), stream=io.StringIO())
    assert t.fit()["steps"] == 1


def test_check_config_says_what_train_refuses(tmp_path, digits_config):
    """`check CONFIG` passed configs that `train` refused right after: an optimizer group
    that matches no trained tensor (its error was swallowed by the optimizer's memory count),
    and a checkpoint.dir with an earlier run's checkpoints (a note: --resume continues it)."""
    from trainer.report import preflight

    raw = digits_config(optimizer={"type": "adamw", "lr": 1e-3,
                                   "groups": [{"params": "nothing.*", "lr": 1e-4}]})
    problems = preflight(config_from_dict(raw, tmp_path)).problems
    assert any("'nothing.*' matches no trained parameter" in str(p) for p in problems)
    raw = digits_config(steps=2, checkpoint={"dir": "ck", "every_steps": 1})
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    pre = preflight(config_from_dict(raw, tmp_path))
    assert not pre.problems
    assert any("checkpoint.dir holds checkpoints of an earlier run (the newest: " in line
               and "--resume" in line for line in pre.lines)


def test_a_problem_two_checks_find_is_listed_once(tmp_path, digits_config):
    """A missing data.eval file: the datasets' check and the labels' check both found it."""
    from trainer.report import preflight

    raw = digits_config(steps=2)
    raw["data"]["eval"]["path"] = str(tmp_path / "missing.npz")
    problems = [str(p) for p in preflight(config_from_dict(raw, tmp_path)).problems]
    assert problems == [f"data.eval: dataset file not found: {tmp_path / 'missing.npz'}"]


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_resume_with_another_lr_says_so_and_follows_it(tmp_path, digits_config, schedule):
    """The config's lr changed on --resume: cosine took the new one and plateau kept the
    checkpoint's, both in silence. Both go on from the new lr (plateau with its reductions so
    far), and say so; a changed schedule type is said too."""
    ck = {"dir": str(tmp_path / "ck")}
    sched = {"type": schedule}
    trainer(tmp_path, digits_config(steps=4, checkpoint=ck, schedule=sched)).fit()
    out = io.StringIO()
    raw = digits_config(steps=6, checkpoint=ck, schedule=sched, optimizer__lr=0.05)
    t = Trainer(config_from_dict(raw, tmp_path), stream=out)
    t.fit(resume=True)
    assert "optimizer.lr changed since the checkpoint (0.1 -> 0.05)" in out.getvalue()
    if schedule == "plateau":
        assert t.schedule.current == [0.05]
    out = io.StringIO()
    raw = digits_config(steps=8, checkpoint=ck, schedule={"type": "linear"}, optimizer__lr=0.05)
    Trainer(config_from_dict(raw, tmp_path), stream=out).fit(resume=True)
    assert f"schedule.type changed from {schedule} to linear since the checkpoint" in \
        out.getvalue()
    out = io.StringIO()  # (groups added: said too, where plateau's per-group state refuses)
    raw = digits_config(steps=10, checkpoint=ck, schedule={"type": "linear"}, optimizer__lr=0.05)
    raw["optimizer"]["groups"] = [{"params": "*bias*", "lr": 0.01}]
    Trainer(config_from_dict(raw, tmp_path), stream=out).fit(resume=True)
    assert "optimizer.groups changed since the checkpoint (the groups' lrs: 0.05 -> 0.05, " \
        "0.01): each group's lr follows the schedule from its configured lr" in out.getvalue()


def test_resume_on_fewer_samples_past_their_last_batch_says_the_next_epoch(tmp_path,
                                                                           digits_config):
    ck = {"dir": str(tmp_path / "ck")}
    trainer(tmp_path, digits_config(steps=20, checkpoint=ck)).fit()  # epoch 0, batch 20
    from tests.conftest import EXAMPLES

    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "small.npz", x=d["x_train"][:320], y=d["y_train"][:320])
    raw = digits_config(steps=22, checkpoint=ck)
    raw["data"]["train"] = {"path": str(tmp_path / "small.npz"), "inputs": {"x": "x"},
                            "targets": {"label": "y"}}
    out = io.StringIO()
    t = Trainer(config_from_dict(raw, tmp_path), stream=out)
    t.fit(resume=True)
    assert "1437 -> 320 training samples" in out.getvalue()
    assert "epoch 0 has no batch 20 now: epoch 1 starts" in out.getvalue()
    assert t.position == (1, 2)


def test_a_run_shorter_than_one_accumulated_step_says_how_long_it_must_be(tmp_path,
                                                                           digits_config):
    """1 epoch of 44 batches with accumulate 50 was refused as "one epoch has 44 batches, fewer
    than accumulate=50", though accumulate 45 trains (a step draws its micro-batches across an
    epoch's end) and 2 epochs make it train: the run's batches in all are what fall short."""
    raw = digits_config(steps=None, epochs=1, accumulate=50)
    with pytest.raises(DataError) as err:
        trainer(tmp_path, raw)
    assert str(err.value) == (
        "1 epoch(s) of 44 batches make 44, fewer than the 50 micro-batches of one optimizer "
        "step (accumulate); nothing to train: set epochs to 2 or more, lower accumulate, or "
        "set steps (a step draws its micro-batches across an epoch's end)")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "trainer", "check", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "set epochs to 2 or more" in proc.stdout + proc.stderr
    assert trainer(tmp_path, digits_config(steps=None, epochs=2, accumulate=50)).total_steps == 1


def test_check_config_leaves_no_folders_behind(tmp_path, digits_config, capsys):
    """`check CONFIG` tries that the output, metrics and checkpoint folders can be written,
    and removes the folders the try made (it left them empty behind); train keeps them; an
    unwritable one is still named; a folder that existed stays."""
    from trainer.cli import main

    (tmp_path / "kept").mkdir()
    raw = digits_config(output=str(tmp_path / "a" / "b" / "model.onnx"),
                        checkpoint={"dir": str(tmp_path / "kept" / "c" / "ckpt"), "every_steps": 1},
                        log={"every_steps": 1, "metrics": str(tmp_path / "m" / "x.jsonl"),
                             "tensorboard": str(tmp_path / "a" / "tb")}, steps=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "c.yaml")]) == 0, capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "ro").write_text("a file, not a folder")
    raw["log"]["metrics"] = str(tmp_path / "ro" / "x.jsonl")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["check", str(tmp_path / "c.yaml")]) == 1
    assert "log.metrics" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "kept", "ro"]
    raw["log"]["metrics"] = str(tmp_path / "m" / "x.jsonl")
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    assert (tmp_path / "a" / "b" / "model.onnx").is_file()
    assert (tmp_path / "m" / "x.jsonl").is_file()
