"""Checkpoints: atomic directories, retention, and exact resume on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest

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
