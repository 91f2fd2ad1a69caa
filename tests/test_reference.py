"""ReferenceOutputs: sampled outputs recorded once, read back for any grouping of the layers unchanged."""

import numpy as np
import pytest

from onnx_dwd.capture import Sampled
from onnx_dwd.reference import ReferenceOutputs


def batch(rng, images):
    return {"a": Sampled(rng.standard_normal((images, 5, 3)).astype(np.float32),
                         rng.integers(0, 40, (images, 5))),
            "b": Sampled(rng.standard_normal((images, 9, 2)).astype(np.float32), None),  # every position
            "c": Sampled(rng.standard_normal((images, 2, 4)), rng.integers(0, 9, (images, 2)))}


def nbytes(sampled):
    return sum(s.y.nbytes + (0 if s.positions is None else s.positions.size * 4) for s in sampled.values())


def assert_same(got, want, names):
    assert sorted(got) == sorted(names)
    for name in names:
        assert got[name].y.dtype == want[name].y.dtype
        np.testing.assert_array_equal(got[name].y, want[name].y)
        if want[name].positions is None:
            assert got[name].positions is None
        else:
            np.testing.assert_array_equal(got[name].positions, want[name].positions)


def test_replay_gives_any_group_of_layers_as_recorded(rng, tmp_path):
    batches = [batch(rng, images) for images in (1, 3, 2)]
    store = ReferenceOutputs(tmp_path, "ref", ["a", "b", "c"])
    store.record(iter(batches))
    assert store.batches == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["ref-000.bin", "ref-001.bin",
                                                                                "ref-002.bin"]
    # raw arrays only, positions as int32
    assert sum(path.stat().st_size for path in store.paths.values()) == sum(map(nbytes, batches))
    for names in (["b"], ["a", "c"]):  # any order
        replayed = list(store.replay(names))
        assert len(replayed) == 3
        for got, want in zip(replayed, batches):
            assert_same(got, want, names)
        assert not any(store.paths[name].exists() for name in names)  # read once, then deleted
    with pytest.raises(FileNotFoundError):
        next(store.replay(["a"]))


def test_a_kept_store_replays_again_in_another_grouping(rng, tmp_path):
    batches = [batch(rng, images) for images in (2, 1)]
    store = ReferenceOutputs(tmp_path, "ref", ["a", "b", "c"])
    store.record(iter(batches))
    for names in (["a", "b", "c"], ["c"], ["b", "a"]):  # as the budgeted choice's rounds replay it
        replayed = list(store.replay(names, delete=False))
        assert len(replayed) == 2
        for got, want in zip(replayed, batches):
            assert_same(got, want, names)
    assert all(path.exists() for path in store.paths.values())
    with pytest.raises(RuntimeError, match="recorded once"):
        store.record(iter(batches))


def test_an_error_while_recording_closes_the_files(rng, tmp_path):
    first = batch(rng, 1)

    def failing():
        yield first
        raise ValueError("feed broke")

    store = ReferenceOutputs(tmp_path, "ref", ["a", "b", "c"])
    with pytest.raises(ValueError, match="feed broke"):
        store.record(failing())
    assert store.batches == 1
    # closed, so everything written before the error is on disk
    assert sum(path.stat().st_size for path in store.paths.values()) == nbytes(first)


def test_a_batch_that_fails_part_way_is_not_counted(rng, tmp_path):
    store = ReferenceOutputs(tmp_path, "ref", ["a", "b", "c"])
    whole, broken = batch(rng, 2), batch(rng, 1)
    del broken["c"]  # the last layer's outputs are missing
    with pytest.raises(KeyError):
        with store.recording() as write:
            write(whole)
            write(broken)
    assert store.batches == 1 and all(len(entries) == 1 for entries in store.layout.values())
    (got,) = store.replay(["a", "b", "c"], delete=False)
    assert_same(got, whole, ["a", "b", "c"])
