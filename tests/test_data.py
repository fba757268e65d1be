"""Datasets: npz loading without pickle, shapes, batching and rank shards."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data import Batches, check_against_model, load_arrays
from trainer.errors import DataError


def test_pickled_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="without pickle"):
        load_arrays(tmp_path / "d.npz", {"x": "x"}, "data.train")


def test_missing_file_and_key(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_arrays(tmp_path / "none.npz", {"x": "x"}, "data.train")
    np.savez(tmp_path / "d.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="'x'.*has a"):
        load_arrays(tmp_path / "d.npz", {"x": "x"}, "data.train")


def test_sample_counts_must_agree(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 2)), b=np.zeros(4))
    with pytest.raises(DataError, match="first"):
        load_arrays(tmp_path / "d.npz", {"x": "a", "y": "b"}, "data.train")


def test_shape_check():
    check_against_model({"x": np.zeros((5, 3, 4))}, {"x": [None, 3, None]}, "d")
    with pytest.raises(DataError, match=r"\[3, 5\]"):
        check_against_model({"x": np.zeros((5, 3, 5))}, {"x": [None, 3, 4]}, "d")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), per_rank=st.integers(1, 5), world=st.integers(1, 4),
       shuffle=st.booleans(), drop_last=st.booleans())
def test_ranks_partition_each_global_batch(n, per_rank, world, shuffle, drop_last):
    bs = per_rank * world
    arrays = {"x": np.arange(n)}
    if n < bs and drop_last:
        with pytest.raises(DataError):
            Batches(arrays, bs, world=world, drop_last=drop_last)
        return
    shards = [Batches(arrays, bs, rank=r, world=world, shuffle=shuffle, drop_last=drop_last,
                      seed=3) for r in range(world)]
    seen = []
    for epoch in range(2):
        order = shards[0].order(epoch)
        assert sorted(order.tolist()) == list(range(n))
        for b in range(shards[0].steps_per_epoch):
            parts = [s.get(epoch, b) for s in shards]
            total = parts[0][2]
            assert all(p[1] >= 1 for p in parts) and sum(p[1] for p in parts) == total
            glob = np.concatenate([p[0]["x"] for p in parts])
            assert glob.tolist() == order[b * bs:b * bs + total].tolist()
            if epoch == 0:
                seen += glob.tolist()
    if drop_last:
        assert len(seen) == (n // bs) * bs
    assert len(seen) + shards[0].dropped == n  # (what the pre-flight names as left out)
    assert bool(shards[0].dropped_text()) == bool(shards[0].dropped)
    if not shuffle:
        assert seen == list(range(len(seen)))


def test_left_out_samples_are_named():
    """drop_last false: a last partial batch with fewer samples than processes is left out
    on N processes (one process trains it); the pre-flight line and the error say so."""
    one = Batches({"x": np.arange(50)}, 12, world=1, drop_last=False)
    four = Batches({"x": np.arange(50)}, 12, world=4, drop_last=False)
    assert (one.steps_per_epoch, one.dropped, one.dropped_text()) == (5, 0, "")
    assert (four.steps_per_epoch, four.dropped) == (4, 2)
    assert four.dropped_text() == ("the last 2 sample(s) of each epoch are left out (drop_last: "
                                   "false keeps a last partial batch only when each of the 4 "
                                   "processes gets a sample of it)")
    assert "data.drop_last: true" in Batches({"x": np.arange(50)}, 12).dropped_text()
    tiny = Batches({"x": np.arange(3)}, 12, world=4, drop_last=False)
    assert tiny.steps_per_epoch == 0
    assert str(tiny.empty_epoch_error(1)) == ("data.train has 3 sample(s), fewer than one per "
                                              "process (4 processes); run fewer processes or "
                                              "give more data")
    # (an empty set on one process was told to run fewer processes)
    empty = Batches({"x": np.arange(0)}, 12, drop_last=False)
    assert str(empty.empty_epoch_error(1)) == "data.train is empty (0 samples)"


def test_batch_must_divide_by_world():
    with pytest.raises(DataError, match="divisible"):
        Batches({"x": np.arange(10)}, 5, world=2)


def test_a_single_npy_file_and_a_scalar_array_are_named(tmp_path):
    """The pre-flight reads array headers first: a .npy file given as the dataset gets the hint
    of how to save one (it said only "not a zip archive"), and a 0-d array is called a scalar
    (it said "got label: None"; found by a data sweep)."""
    from trainer.data import describe_arrays
    from trainer.errors import DataError

    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(DataError, match="not a zip archive \\(a .npy file: save datasets with "
                                        "np.savez"):
        describe_arrays(tmp_path / "x.npy", {"x": "x"}, "data.train")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.array(3))
    with pytest.raises(DataError, match="data.train: 'label' is a scalar \\(0-d arrays\\)"):
        describe_arrays(tmp_path / "d.npz", {"x": "x", "label": "y"}, "data.train")


def test_a_damaged_npz_member_is_called_damaged(tmp_path):
    """A .npz whose member fails its CRC (bytes zeroed in the middle) is a zip archive: the
    error says the file is damaged, in zipfile's words, not "not a zip archive" (found by a
    robustness sweep)."""
    from pathlib import Path

    from trainer.data import describe_arrays

    raw = bytearray((Path(__file__).parent.parent / "examples" / "digits.npz").read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = b"\0" * 64
    (tmp_path / "d.npz").write_bytes(bytes(raw))
    mapping = {"x": "x_train", "label": "y_train"}
    describe_arrays(tmp_path / "d.npz", mapping, "data.train")  # (the headers are intact)
    with pytest.raises(DataError, match="data.train: .*d.npz is damaged: Bad CRC-32 for file "
                                        "'x_train.npy'"):
        load_arrays(tmp_path / "d.npz", mapping, "data.train")


def test_a_truncated_npz_is_called_truncated(tmp_path):
    """An .npz cut off (an interrupted copy or download) lacks the zip's directory at its end:
    it was "not a zip archive", which sent users looking for a wrong format."""
    from pathlib import Path

    raw = (Path(__file__).parent.parent / "examples" / "digits.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DataError, match=r"data.train: .*d.npz is truncated: a zip archive "
                                        r"\(.npz\) whose end is missing"):
        load_arrays(tmp_path / "d.npz", {"x": "x_train"}, "data.train")


@pytest.mark.parametrize("form", ["npz", "folder"])
def test_an_npy_header_cut_short_is_a_data_error(tmp_path, form):
    """A member whose header dict ends mid-tuple made NumPy raise tokenize.TokenError, which
    was no error of a damaged file: an internal error (found by a hostile-input sweep)."""
    import zipfile

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (32, 64\n".ljust(118) + b"\n"
    bad = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 256
    if form == "npz":
        with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
            z.writestr("x.npy", bad)
        path = tmp_path / "d.npz"
    else:
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "x.npy").write_bytes(bad)
        path = tmp_path / "ds"
    with pytest.raises(DataError, match="data.train: .*EOF in multi-line statement"):
        load_arrays(path, {"x": "x"}, "data.train")
