"""Checkpoints: atomic directories, retention, and exact resume on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.conftest import EXAMPLES
from trainer import checkpoint
from trainer.config import config_from_dict
from trainer.errors import TrainerError
from trainer.train import Trainer


def test_resume_reproduces_the_uninterrupted_run(tmp_path, digits_config):
    over = dict(data__batch_size=128, optimizer={"type": "adamw", "lr": 3e-3})
    full = Trainer(config_from_dict(digits_config(steps=25, **over), tmp_path / "full"),
                   stream=io.StringIO())
    full.fit()
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 5, "keep": 2}
    first = Trainer(config_from_dict(digits_config(steps=15, checkpoint=ck, **over),
                                     tmp_path / "a"), stream=io.StringIO())
    first.fit()
    assert [p.name for p in checkpoint.complete(tmp_path / "ck")] == \
        ["step_00000010", "step_00000015"]
    second = Trainer(config_from_dict(digits_config(steps=25, checkpoint=ck, **over),
                                      tmp_path / "b"), stream=io.StringIO())
    second.fit(resume=True)
    assert second.step == 25
    for k, v in full.trained_values().items():
        np.testing.assert_array_equal(second.trained_values()[k], v, err_msg=k)
    losses = [r["loss"] for r in full.history if "loss" in r][15:]
    assert [r["loss"] for r in second.history if "loss" in r] == losses


def test_resume_before_sgds_momentum_began_reproduces_the_run(tmp_path, digits_config):
    """A onecycle momentum that starts at 0: the SGD buffer begins at the first step with
    momentum (a copy of d, no dampening), which a checkpoint at step 1 had not reached; the
    resume took it as begun (0.2 off the run's losses): the state says which groups began."""
    import shutil

    over = dict(optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.3},
                schedule={"type": "onecycle", "max_lr": 0.5, "max_momentum": 0.0,
                          "base_momentum": 0.9}, data__shuffle=False)
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 1, "keep": 10}
    full = Trainer(config_from_dict(digits_config(steps=6, checkpoint=ck, **over), tmp_path),
                   stream=io.StringIO())
    full.fit()
    for p in checkpoint.complete(tmp_path / "ck")[1:]:
        shutil.rmtree(p)
    again = Trainer(config_from_dict(digits_config(steps=6, checkpoint=ck, **over), tmp_path),
                    stream=io.StringIO())
    again.fit(resume=True)
    for k, v in full.trained_values().items():
        np.testing.assert_array_equal(again.trained_values()[k], v, err_msg=k)


@pytest.mark.parametrize("schedule,warned", [({"type": "cosine"}, True),
                                             ({"type": "onecycle", "max_lr": 0.05}, True),
                                             ({"type": "linear", "total_iters": 30}, False),
                                             ({"type": "step", "step_size": 3}, False)])
def test_resume_into_a_longer_run_says_where_the_schedule_jumps(tmp_path, digits_config,
                                                                schedule, warned):
    """A finished 10-step run resumed with steps raised to 20 (what its resume message
    suggests): a schedule laid over the run's length jumps to the new curve at step 11, which
    the resume now says (it was silent); one of fixed length goes on unchanged."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 5}
    over = dict(optimizer={"type": "adamw", "lr": 0.01}, schedule=schedule, checkpoint=ck)
    first = Trainer(config_from_dict(digits_config(steps=10, **over), tmp_path / "a"),
                    stream=io.StringIO())
    first.fit()
    out = io.StringIO()
    longer = Trainer(config_from_dict(digits_config(steps=20, **over), tmp_path / "b"),
                     stream=out)
    longer.fit(resume=True)
    said = "the run is 20 steps now and was 10 at the checkpoint" in out.getvalue()
    assert said == warned, out.getvalue()
    if warned:
        lr = next(r["lr"] for r in longer.history if r.get("step") == 11)
        assert f"step 11 runs at lr {lr:.6g}" in out.getvalue()
        # (the finished run's last lr: the one it gave, not its curve run on past its end)
        last = next(r["lr"] for r in first.history if r.get("step") == 10)
        assert f"which ended that run at lr {last:.6g}" in out.getvalue(), out.getvalue()


def test_a_resume_that_changes_the_schedules_type_and_length_says_what_each_gives(
        tmp_path, digits_config):
    """A constant-lr run resumed as cosine over more steps: the note said the checkpoint's
    run gives lr 0 at the next step, where it gave its constant lr (cosine over the old length
    ends at 0; found by a README sweep)."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 5}
    opt = {"type": "sgd", "lr": 0.01}
    Trainer(config_from_dict(digits_config(steps=10, optimizer=opt, checkpoint=ck),
                             tmp_path / "a"), stream=io.StringIO()).fit()
    out = io.StringIO()
    Trainer(config_from_dict(digits_config(steps=20, optimizer=opt, checkpoint=ck,
                                           schedule={"type": "cosine"}), tmp_path / "b"),
            stream=out).fit(resume=True)
    assert "where the checkpoint's run gives" not in out.getvalue()
    assert "where cosine over the checkpoint's 10 steps gives 0 " in out.getvalue(), \
        out.getvalue()


def test_resume_without_checkpoints_starts_fresh(tmp_path, digits_config):
    cfg = digits_config(steps=3, checkpoint={"dir": str(tmp_path / "none")})
    out = io.StringIO()
    t = Trainer(config_from_dict(cfg, tmp_path), stream=out)
    t.fit(resume=True)
    assert "no checkpoint" in out.getvalue() and t.step == 3


def test_resume_needs_a_checkpoint_dir(tmp_path, digits_config):
    t = Trainer(config_from_dict(digits_config(steps=3), tmp_path), stream=io.StringIO())
    with pytest.raises(TrainerError, match="checkpoint.dir"):
        t.fit(resume=True)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    checkpoint.save(tmp_path, 4, {"a": np.ones(2)}, {}, keep=3)
    (tmp_path / "step_00000009").mkdir()  # crashed before its manifest was written
    (tmp_path / ".step_00000010.tmp").mkdir()
    assert checkpoint.latest(tmp_path).name == "step_00000004"
    arrays, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 4 and (arrays["a"] == 1).all()


def test_a_step_folder_without_a_manifest_is_kept_when_that_step_is_saved(tmp_path):
    """A step folder save did not write is left as it is (a user's files may be there); a
    checkpoint saved at that step replaced it, deleting them (found by a hostile-input sweep):
    it is moved beside, to `<name>.incomplete`, first."""
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000002" / "notes.txt").write_text("mine")
    (tmp_path / "step_00000002.incomplete").mkdir()  # (a name taken: the next is used)
    checkpoint.save(tmp_path, 2, {"a": np.ones(2)}, {}, keep=3)
    assert (tmp_path / "step_00000002.incomplete.1" / "notes.txt").read_text() == "mine"
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_00000002"]
    assert checkpoint.load(tmp_path / "step_00000002")[1]["step"] == 2


def _npy_with_a_header_cut_short() -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (32, 64\n".ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 256


@pytest.mark.parametrize("damage", ["manifest-nested-deeply", "arrays-a-pipe",
                                    "member-header-cut-short"])
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    """Each ended in an internal error, or (a pipe where arrays.npz was, its size left out of
    the manifest) waited for ever (found by a hostile-input sweep)."""
    import json
    import os
    import zipfile

    path = checkpoint.save(tmp_path, 2, {"a": np.ones(2)}, {}, keep=3)
    meta = json.loads((path / checkpoint.MANIFEST).read_text())
    if damage == "manifest-nested-deeply":
        (path / checkpoint.MANIFEST).write_text("[" * 100000 + "]" * 100000)
        said = "is nested too deeply to read"
    elif damage == "arrays-a-pipe":
        (path / checkpoint.ARRAYS).unlink()
        os.mkfifo(path / checkpoint.ARRAYS)
        del meta["files"]
        (path / checkpoint.MANIFEST).write_text(json.dumps(meta))
        said = "arrays.npz is not a regular file"
    else:
        with zipfile.ZipFile(path / checkpoint.ARRAYS, "a") as z:
            z.writestr("extra.npy", _npy_with_a_header_cut_short())
        meta["files"][checkpoint.ARRAYS] = (path / checkpoint.ARRAYS).stat().st_size
        (path / checkpoint.MANIFEST).write_text(json.dumps(meta))
        said = "cannot read checkpoint"
    with pytest.raises(TrainerError, match=said):
        checkpoint.load(path)


def _checkpoint_altered(tmp_path, digits_config, suffix: str, alter):
    """A 2-step digits run's checkpoint with the array whose name ends in `suffix` replaced by
    alter(array) (the manifest's recorded size follows)."""
    ck = {"dir": str(tmp_path / "ck")}
    Trainer(config_from_dict(digits_config(steps=2, checkpoint=ck), tmp_path),
            stream=io.StringIO()).fit()
    path = checkpoint.latest(tmp_path / "ck")
    arrays, meta = checkpoint.load(path)
    name = next(k for k in arrays if k.endswith(suffix))
    arrays[name] = alter(arrays[name])
    np.savez(path / checkpoint.ARRAYS, **arrays)
    meta["files"][checkpoint.ARRAYS] = (path / checkpoint.ARRAYS).stat().st_size
    (path / checkpoint.MANIFEST).write_text(__import__("json").dumps(meta))
    return path


@pytest.mark.parametrize("alter,dtype", [(lambda a: np.array(["a"] * a.size), "<U1"),
                                         (lambda a: a + 1j, "complex64")])
def test_export_of_a_checkpoint_with_strings_for_a_parameter_is_one_clear_error(
        tmp_path, digits_config, alter, dtype):
    """(complex values were taken with NumPy's warning, their imaginary part dropped)"""
    path = _checkpoint_altered(tmp_path, digits_config, "fc1.bias", alter)
    t = Trainer(config_from_dict(digits_config(steps=2), tmp_path), stream=io.StringIO())
    with pytest.raises(TrainerError, match=rf"is damaged: 'fc1.bias' \({dtype}\) hold\(s\) "
                                           "no real numbers"):
        t.load_checkpoint(path)


def test_a_checkpoint_named_wrong_lists_the_ones_its_folder_holds(tmp_path, digits_config):
    """`export --checkpoint ck/step_2` said only "not found"."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 1, "keep": 2}
    t = Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path),
                stream=io.StringIO())
    t.fit()
    with pytest.raises(TrainerError, match=r"checkpoint not found: \S+step_2 \(\S+ holds "
                                           r"step_00000003, step_00000002; or give the folder"):
        t.load_checkpoint(tmp_path / "ck" / "step_2")


def test_export_of_a_checkpoint_with_nan_weights_warns(tmp_path, digits_config):
    """A diverged run's checkpoint exports as it is, said: the model computes NaN."""
    def nan_at_first(a):
        a[0, 0] = np.nan
        return a
    path = _checkpoint_altered(tmp_path, digits_config, "fc2.weight", nan_at_first)
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=2), tmp_path), stream=out)
    t.load_checkpoint(path)
    t.export(tmp_path / "nan.onnx")
    assert "fc2.weight are not all finite (NaN or inf)" in out.getvalue(), out.getvalue()
    assert (tmp_path / "nan.onnx").is_file()
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=2), tmp_path), stream=out)
    t.export(tmp_path / "ok.onnx")
    assert "finite" not in out.getvalue()


def test_resume_names_newer_folders_that_are_not_checkpoints(tmp_path, digits_config):
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 2}
    Trainer(config_from_dict(digits_config(steps=2, checkpoint=ck), tmp_path / "a"),
            stream=io.StringIO()).fit()
    (tmp_path / "ck" / "step_00000001").mkdir()  # older: not named
    (tmp_path / "ck" / "step_00000009").mkdir()  # a copy cut short
    (tmp_path / "ck" / "step_00000009" / "arrays.npz").write_bytes(b"x")
    out = io.StringIO()
    t = Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path / "b"),
                stream=out)
    t.fit(resume=True)
    text = out.getvalue()
    assert ("warning: checkpoint.dir" in text and "step_00000009 without manifest.json" in text
            and "resuming from step_00000002" in text and "step_00000001" not in text), text
    assert t.step == 3 and (tmp_path / "ck" / "step_00000009" / "arrays.npz").exists()


def test_a_resume_that_trains_nothing_removes_a_killed_writers_folders(tmp_path,
                                                                       digits_config):
    """A run killed while retention deleted an old checkpoint (renamed `.step_N.deleting`) or
    while a checkpoint was written (`.step_N.*.tmp`): a resume of the finished run saves
    nothing, and only `save` removed them, so they stayed for good."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 2, "keep": 2}
    Trainer(config_from_dict(digits_config(steps=4, checkpoint=ck), tmp_path / "a"),
            stream=io.StringIO()).fit()
    folder = tmp_path / "ck"
    (folder / ".step_00000001.deleting").mkdir()
    (folder / ".step_00000001.deleting" / "arrays.npz").write_bytes(b"x" * 100)
    (folder / ".step_00000006.abc123.tmp").mkdir()
    (folder / "notes").mkdir()  # (a user's folder: kept)
    t = Trainer(config_from_dict(digits_config(steps=4, checkpoint=ck), tmp_path / "b"),
                stream=io.StringIO())
    t.fit(resume=True)
    assert sorted(p.name for p in folder.iterdir()) == \
        [".lock", "notes", "step_00000002", "step_00000004"]


def test_resume_from_a_checkpoint_of_other_shapes_names_the_tensor(tmp_path, digits_config):
    """A checkpoint with the same tensor names but other shapes (the model's hidden size
    changed) is refused with the tensor and both shapes, before any value is loaded (it was an
    internal error from NumPy's broadcasting, and a shape that broadcasts loaded silently)."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 2}
    Trainer(config_from_dict(digits_config(steps=2, checkpoint=ck), tmp_path / "a"),
            stream=io.StringIO()).fit()
    path = checkpoint.latest(tmp_path / "ck")
    arrays, meta = checkpoint.load(path)
    name = next(k for k in arrays if k.startswith("param/") and arrays[k].ndim == 1)
    want = arrays[name].shape
    arrays[name] = arrays[name][:1]  # (broadcasts into the parameter)
    checkpoint.save(tmp_path / "ck", 4, arrays, meta, keep=5)
    t = Trainer(config_from_dict(digits_config(steps=6, checkpoint=ck), tmp_path / "b"),
                stream=io.StringIO())
    before = {k: np.array(v) for k, v in t.params.items()}
    with pytest.raises(TrainerError, match=rf"{name[6:]}.*\(1,\).*{want}"):
        t.fit(resume=True)
    for k, v in before.items():
        np.testing.assert_array_equal(t.params[k], v)


def _same_rows(got: list[dict], want: list[dict]) -> bool:
    """Metrics rows equal but for the throughput (wall time)."""
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]
    return strip(got) == strip(want)


class _Killed(Exception):
    pass


class _KilledAt(Trainer):
    """A run that dies (as from SIGKILL) at the start of step `at` + 1."""

    at = 0

    def train_step(self, micro, lr):
        if self.step == self.at:
            raise _Killed()
        return super().train_step(micro, lr)


@pytest.mark.parametrize("eval_at", ["steps", "epochs"])
def test_resume_keeps_what_evaluations_decided(tmp_path, digits_config, eval_at):
    """A run killed after a checkpoint and resumed goes on as the uninterrupted run: the best
    model so far, early stopping's count, reduce-on-plateau's lr cuts and the evaluation of
    the checkpoint's own step (once written after the checkpoint: lost, or logged twice)."""
    evaluation = {"every_steps": 5} if eval_at == "steps" else {"every_epochs": 1}
    batch = 64 if eval_at == "steps" else 256  # (digits: 1437 samples, 5 batches of 256)
    over = dict(data__batch_size=batch, optimizer={"type": "sgd", "lr": 1.0, "momentum": 0.9},
                schedule={"type": "plateau", "patience": 0, "factor": 0.5},
                best={"metric": "eval_accuracy"}, early_stop={"patience": 2}, eval=evaluation,
                steps=60)
    every = 10
    full = Trainer(config_from_dict(digits_config(**over), tmp_path / "full"),
                   stream=io.StringIO())
    want = full.fit()
    assert "early_stop" in want  # (the test means something: the run stops early)
    killed_at = 2 * every + 3 if eval_at == "steps" else 2 * every
    ck = {"dir": str(tmp_path / "ck"), "every_steps": every}
    first = _KilledAt(config_from_dict(digits_config(checkpoint=ck, **over), tmp_path / "a"),
                      stream=io.StringIO())
    first.at = killed_at
    with pytest.raises(_Killed):
        first.fit()
    second = Trainer(config_from_dict(digits_config(checkpoint=ck, **over), tmp_path / "b"),
                     stream=io.StringIO())
    got = second.fit(resume=True)
    resumed_from = killed_at // every * every
    rows = [r for r in full.history if r["step"] > resumed_from]
    assert any("lr" in r and r["lr"] < 1.0 for r in rows)  # (a plateau cut after the resume)
    assert _same_rows(second.history, rows)
    assert got["early_stop"] == want["early_stop"] and got["steps"] == want["steps"]
    assert got["best"]["step"] == want["best"]["step"]
    for k, v in full.trained_values().items():
        np.testing.assert_array_equal(second.trained_values()[k], v, err_msg=k)
    # a finished run that stopped early, resumed, stays stopped
    third = Trainer(config_from_dict(digits_config(checkpoint=ck, **over), tmp_path / "c"),
                    stream=io.StringIO())
    again = third.fit(resume=True)
    assert third.step == want["steps"] and again["early_stop"] == want["early_stop"]


def test_a_finished_run_continued_for_more_steps_knows_its_last_evaluation(tmp_path,
                                                                          digits_config):
    """The end of a run was saved before its final evaluation: a run continued from it with
    more steps lost that evaluation's lr cut and best model. It is saved after it now."""
    over = dict(data__batch_size=64, optimizer={"type": "sgd", "lr": 1.0, "momentum": 0.9},
                schedule={"type": "plateau", "patience": 0, "factor": 0.5},
                best={"metric": "eval_accuracy"}, eval={"every_steps": 5})
    full = Trainer(config_from_dict(digits_config(steps=30, **over), tmp_path / "full"),
                   stream=io.StringIO())
    want = full.fit()
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 100}
    Trainer(config_from_dict(digits_config(steps=20, checkpoint=ck, **over), tmp_path / "a"),
            stream=io.StringIO()).fit()
    more = Trainer(config_from_dict(digits_config(steps=30, checkpoint=ck, **over),
                                    tmp_path / "b"), stream=io.StringIO())
    got = more.fit(resume=True)
    assert _same_rows(more.history, [r for r in full.history if r["step"] > 20])
    assert got["best"]["step"] == want["best"]["step"]


def test_a_checkpoint_at_the_last_step_follows_its_evaluation(tmp_path, digits_config):
    """checkpoint.every_steps dividing the last step wrote that checkpoint before the run's
    final evaluation: continued with more steps, the run logged step 12's evaluation twice."""
    over = dict(data__batch_size=64, eval={"every_steps": 4},
                checkpoint={"dir": str(tmp_path / "ck"), "every_steps": 4})
    Trainer(config_from_dict(digits_config(steps=12, **over), tmp_path / "a"),
            stream=io.StringIO()).fit()
    more = Trainer(config_from_dict(digits_config(steps=16, **over), tmp_path / "b"),
                   stream=io.StringIO())
    more.fit(resume=True)
    assert [r["step"] for r in more.history if "eval_loss" in r] == [16]


def test_resume_under_another_precision_gives_each_tensor_its_optimizer_state(tmp_path,
                                                                             digits_config):
    """The flat buffers follow the order in which the backward makes the gradients, which
    bf16's casts change (a bias's gradient before its weight's). A checkpoint records its
    layout, and a run resumed in another order takes each tensor's optimizer state from that
    tensor's place in the checkpoint (before, the buffers came back in the checkpoint's order:
    every tensor got another's momentum)."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 3}
    first = Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path / "a"),
                    stream=io.StringIO())
    first.fit()

    want = _per_tensor(first)
    second = Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck, precision="bf16"),
                                      tmp_path / "b"), stream=io.StringIO())
    assert second.names != first.names  # (the case: another layout)
    assert second.resume()
    got = _per_tensor(second)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _per_tensor(t: Trainer) -> dict:
    """Each trained tensor's part of the SGD momentum buffer."""
    buf, out, at = t.optimizer.state["momentum_buffer"], {}, 0
    for k in t.names:
        n = int(np.prod(t.shapes[k]))
        out[k] = np.asarray(buf[at:at + n]).reshape(t.shapes[k])
        at += n
    return out


def test_a_checkpoint_without_a_recorded_layout_is_read_in_its_parameters_order(
        tmp_path, digits_config):
    """Checkpoints of versions before the layout was recorded (those before 2026-12-03 held
    the flat buffers in the model's order, not the backward's) were read in this run's order:
    every tensor resumed with another's momentum, in silence (0.11 off the uninterrupted run
    after 200 more steps). Their parameters were written in the buffers' order: it is read
    from there. Such a checkpoint is made here as those versions wrote it."""
    import json

    ck = {"dir": str(tmp_path / "ck"), "every_steps": 3}
    first = Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path / "a"),
                    stream=io.StringIO())
    first.fit()
    want = _per_tensor(first)
    path = checkpoint.latest(tmp_path / "ck")
    arrays, meta = checkpoint.load(path)
    old_order = list(reversed(first.names))
    assert old_order != first.names
    old = {f"param/{k}": arrays[f"param/{k}"] for k in old_order}
    old.update((k, v) for k, v in arrays.items() if not k.startswith(("param/", "optim/")))
    old["optim/momentum_buffer"] = np.concatenate([want[k].ravel() for k in old_order])
    old.update((k, v) for k, v in arrays.items() if k.startswith("optim/") and k not in old)
    np.savez(path / checkpoint.ARRAYS, **old)
    del meta["layout"]
    meta["files"] = {checkpoint.ARRAYS: (path / checkpoint.ARRAYS).stat().st_size}
    (path / checkpoint.MANIFEST).write_text(json.dumps(meta))
    second = Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path / "b"),
                     stream=io.StringIO())
    assert second.resume()
    got = _per_tensor(second)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_tensors_named_w_and_w_npy_keep_their_own_values(tmp_path):
    """np.savez leaves a key that ends in .npy as it is, so the tensors `w` and `w.npy` were
    one member name twice, and np.load gave `w.npy` the values of `w`."""
    arrays = {"param/w": np.zeros(3, np.float32), "param/w.npy": np.ones(3, np.float32),
              "param/v.npy.npy": np.full(2, 2.0)}
    path = checkpoint.save(tmp_path, 1, arrays, {"position": [0, 0]}, keep=1)
    got, _ = checkpoint.load(path)
    assert list(got) == list(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got[k].dtype == v.dtype
    with np.load(path / checkpoint.ARRAYS, allow_pickle=False) as npz:  # (still an .npz)
        assert npz.files == list(arrays)


def test_resume_with_another_data_order_says_so(tmp_path, digits_config):
    """The checkpoint's data position is a batch of the epoch's sample order, which the
    dataset's size, the seed and shuffle make: a run resumed with any of them changed says
    that the rest of that epoch follows another order (some samples seen twice, some not at
    all), where it was silent (found by a data sweep)."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 3}
    Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path / "a"),
            stream=io.StringIO()).fit()
    d = np.load(EXAMPLES / "digits.npz")
    np.savez(tmp_path / "fewer.npz", x=d["x_train"][:-40], y=d["y_train"][:-40])
    fewer = {"path": str(tmp_path / "fewer.npz"), "inputs": {"x": "x"},
             "targets": {"label": "y"}}
    for over, said in [({}, None), ({"seed": 7}, "seed 0 -> 7"),
                       ({"data__shuffle": False}, "shuffle True -> False"),
                       ({"data__train": fewer}, f"{len(d['x_train'])} -> "
                                                f"{len(d['x_train']) - 40} training samples")]:
        log = io.StringIO()
        t = Trainer(config_from_dict(digits_config(steps=6, checkpoint=ck, **over),
                                     tmp_path / "b"), stream=log)
        assert t.resume()
        text = log.getvalue()
        if said is None:
            assert "sample order" not in text
        else:
            assert f"the data's sample order changed since the checkpoint ({said})" in text, \
                text


def test_a_second_run_on_the_same_checkpoint_dir_is_refused_while_the_first_runs(
        tmp_path, digits_config):
    """Two runs writing one checkpoint.dir deleted each other's checkpoints in progress (a
    requeued job started while the first still ran); the folder is locked while a run trains
    there, and a second one is refused at its start, naming the holder (found by a robustness
    sweep). After the first run, the folder is free."""
    ck = {"dir": str(tmp_path / "ck"), "every_steps": 2}
    first = Trainer(config_from_dict(digits_config(steps=2, checkpoint=ck), tmp_path / "a"),
                    stream=io.StringIO())
    second = Trainer(config_from_dict(digits_config(steps=4, checkpoint=ck), tmp_path / "b"),
                     stream=io.StringIO())
    first._hold_checkpoint_dir()  # (as its fit does first)
    with pytest.raises(TrainerError, match="checkpoint.dir .*ck is in use by another run "
                                           "\\(pid \\d+ on .*\\); wait for it to end"):
        second.fit(resume=True)
    first.fit()
    assert second.fit(resume=True)["steps"] == 4


@pytest.mark.parametrize("edit,said", [
    ({"step": 10}, "its manifest says step 10, its folder step 3"),
    ({"tracking": {"last_eval_step": "z"}}, "its manifest's tracking.last_eval_step 'z' is not "
                                            "an integer"),
    ({"position": [5]}, "its manifest's data position \\[5\\] is not \\[epoch, batch\\]"),
    ({"position": [0, -2]}, "its manifest's data position \\[0, -2\\] is not"),
])
def test_a_manifest_that_contradicts_its_checkpoint_is_refused(tmp_path, digits_config, edit,
                                                               said):
    """An edited or mixed-up manifest resumed silently at another step or data position than
    its weights (found by a robustness sweep): it is refused as damaged."""
    import json

    ck = {"dir": str(tmp_path / "ck"), "every_steps": 3}
    Trainer(config_from_dict(digits_config(steps=3, checkpoint=ck), tmp_path / "a"),
            stream=io.StringIO()).fit()
    manifest = checkpoint.latest(tmp_path / "ck") / checkpoint.MANIFEST
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, **edit}))
    t = Trainer(config_from_dict(digits_config(steps=6, checkpoint=ck), tmp_path / "b"),
                stream=io.StringIO())
    with pytest.raises(TrainerError, match=f"step_00000003 is damaged: {said}"):
        t.resume()
    if "step" in edit:  # (export took it, and wrote step 10 into the model's metadata)
        with pytest.raises(TrainerError, match=f"step_00000003 is damaged: {said}"):
            t.load_checkpoint(tmp_path / "ck")


def test_a_resume_on_another_number_of_processes_says_so(tmp_path, digits_config):
    import json

    raw = digits_config(steps=2, checkpoint={"dir": "ck", "every_steps": 1})
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    manifest = checkpoint.latest(tmp_path / "ck") / "manifest.json"
    meta = json.loads(manifest.read_text())
    assert meta["world_size"] == 1
    manifest.write_text(json.dumps({**meta, "world_size": 4}))
    log = io.StringIO()
    Trainer(config_from_dict(dict(raw, steps=3), tmp_path), stream=log).fit(resume=True)
    assert "resuming a run of 4 process(es) on 1: the number of processes leaves the global " \
        "batch and its order as they were" in log.getvalue()
    # the 1437 samples in batches of 8 leave 5: trained by one process, not by 8 (fewer than
    # one each), which changed the epoch's length without a word
    raw = digits_config(steps=2, checkpoint={"dir": "ck8", "every_steps": 1},
                        data__batch_size=8, data__drop_last=False)
    Trainer(config_from_dict(raw, tmp_path), stream=io.StringIO()).fit()
    manifest = checkpoint.latest(tmp_path / "ck8") / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "world_size": 8}))
    log = io.StringIO()
    t = Trainer(config_from_dict(dict(raw, steps=3), tmp_path), stream=log)
    t.fit(resume=True)
    assert t.batches.steps_per_epoch == 180
    assert "(each process takes another share of it); an epoch's last 5 sample(s), a partial " \
        "batch, are trained now, where they were left out: an epoch is 180 batches" \
        in log.getvalue(), log.getvalue()
