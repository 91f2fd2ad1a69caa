"""ReferenceOutputs: sampled outputs recorded once, read back level by level unchanged."""

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


def test_replay_gives_each_level_its_layers_as_recorded(rng, tmp_path):
    batches = [batch(rng, images) for images in (1, 3, 2)]
    store = ReferenceOutputs(tmp_path, "ref", [["a", "c"], ["b"]])
    store.record(iter(batches))
    assert store.batches == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["ref-level000.bin",
                                                                                "ref-level001.bin"]
    # raw arrays only, positions as int32
    assert sum(path.stat().st_size for path in store.paths) == sum(map(nbytes, batches))
    for level, names in ((1, ["b"]), (0, ["a", "c"])):  # any order
        replayed = list(store.replay(level))
        assert len(replayed) == 3
        for got, want in zip(replayed, batches):
            assert sorted(got) == names
            for name in names:
                assert got[name].y.dtype == want[name].y.dtype
                np.testing.assert_array_equal(got[name].y, want[name].y)
                if want[name].positions is None:
                    assert got[name].positions is None
                else:
                    np.testing.assert_array_equal(got[name].positions, want[name].positions)
        assert not store.paths[level].exists()  # read once, then deleted


def test_an_error_while_recording_closes_the_files(rng, tmp_path):
    first = batch(rng, 1)

    def failing():
        yield first
        raise ValueError("feed broke")

    store = ReferenceOutputs(tmp_path, "ref", [["a", "b", "c"]])
    with pytest.raises(ValueError, match="feed broke"):
        store.record(failing())
    assert store.batches == 1
    # closed, so everything written before the error is on disk
    assert store.paths[0].stat().st_size == nbytes(first)
