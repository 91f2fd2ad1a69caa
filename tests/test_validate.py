"""Comparison: metrics summed feed by feed equal the metrics of all outputs at once."""

import math
import threading
from pathlib import Path

import numpy as np
import pytest

from onnx_dwd.validate import Comparison, agreement


def test_streamed_metrics_equal_those_of_the_joined_outputs(rng):
    feeds = [(rng.standard_normal((b, 10)), rng.standard_normal((b, 3, 4))) for b in (2, 5, 1)]
    noisy = [(a + 0.1 * rng.standard_normal(a.shape), m * 0.9) for a, m in feeds]
    labels = rng.integers(0, 10, 8)
    comparison = Comparison(["logits", "map"], labels)
    for ref, cand in zip(feeds, noisy):
        comparison.add(ref, cand)
    got = comparison.result()
    assert got["samples"] == 8 and got["classifier_output"] == "logits"
    for i, name in enumerate(["logits", "map"]):
        joined = agreement(np.concatenate([f[i].ravel() for f in feeds]),
                           np.concatenate([f[i].ravel() for f in noisy]))
        for key, want in joined.items():
            assert got["outputs"][name][key] == pytest.approx(want, rel=1e-9), (name, key)
    ref_top1 = np.concatenate([f[0].argmax(1) for f in feeds])
    cand_top1 = np.concatenate([f[0].argmax(1) for f in noisy])
    assert got["top1_agreement"] == np.mean(ref_top1 == cand_top1)
    assert got["accuracy_before"] == np.mean(ref_top1 == labels)
    assert got["accuracy_after"] == np.mean(cand_top1 == labels)


def test_identical_outputs_and_no_classifier():
    comparison = Comparison(["y"])
    y = np.ones((2, 3, 4, 4))
    comparison.add([y], [y.copy()])
    out = comparison.result()
    assert out["outputs"]["y"]["rel_error"] == 0 and out["outputs"]["y"]["cosine"] == pytest.approx(1)
    assert math.isinf(out["outputs"]["y"]["sqnr_db"]) and "top1_agreement" not in out


def _models_and_feeds(rng, count):
    from conftest import conv_model
    model = conv_model(rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), (1, 3, 8, 8))
    other = conv_model(rng.standard_normal((4, 3, 3, 3)), None, (1, 3, 8, 8))
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]
    return model, other, feeds


def _ready():
    ready = threading.Event()
    ready.set()
    return ready


def test_a_background_reference_gives_what_the_session_gives(rng):
    """The original's outputs computed beside the fit, on one thread at low priority, make the
    same comparison as running it during validation; fewer validation feeds than it ran is an error."""
    import time

    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model, other, feeds = _models_and_feeds(rng, 5)
    want = compare_models(make_session(model), make_session(other), feeds, ["y"])
    with BackgroundReference(model, lambda: iter(feeds), _ready(), ["y"]) as reference:
        while len(reference._saved) < 5:  # let it finish: every feed read back
            time.sleep(0.01)
        recorded = reference.recorded()
        assert len(recorded) == 5
        assert all(np.array_equal(files[0].load(), make_session(model).run(["y"], f)[0])
                   for files, f in zip(recorded, feeds))
        assert compare_models(reference, make_session(other), feeds, ["y"]) == want
        with pytest.raises(RuntimeError, match="ran 5 feeds, validation has 4"):
            compare_models(reference, make_session(other), feeds[:4], ["y"])


def test_validation_runs_what_the_background_reference_did_not_reach(rng):
    """Validation stops the thread after its current feed and runs the rest itself."""
    import time

    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model, other, feeds = _models_and_feeds(rng, 20)

    def slow():
        for f in feeds:
            time.sleep(0.02)
            yield f

    with BackgroundReference(model, slow, _ready(), ["y"]) as reference:
        deadline = time.monotonic() + 10
        while not reference._saved and time.monotonic() < deadline:  # it has run one feed at least
            time.sleep(0.005)
        got = compare_models(reference, make_session(other), feeds, ["y"])
        assert 0 < len(reference.recorded()) < 20
    assert got == compare_models(make_session(model), make_session(other), feeds, ["y"])


def test_a_failing_background_reference_leaves_the_error_to_validation(rng):
    from onnx_dwd.errors import DwdError
    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model, _, _ = _models_and_feeds(rng, 0)
    bad = [{"x": np.zeros((1, 5, 8, 8), np.float32)}]  # 5 channels where the conv takes 3
    with BackgroundReference(model, lambda: iter(bad), _ready(), ["y"], what="m.onnx") as reference:
        with pytest.raises(DwdError, match="m.onnx: onnxruntime failed"):
            compare_models(reference, make_session(model), bad, ["y"], what=("m.onnx", "out"))


def test_a_background_reference_whose_feeds_never_got_ready_leaves_the_run_to_validation(rng):
    """Feeds not cached by validation time: the thread never reads them, and compare_models
    runs the original itself, with the same result."""
    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model, other, feeds = _models_and_feeds(rng, 3)
    read = []

    def tracked():
        read.append(None)
        return iter(feeds)

    with BackgroundReference(model, tracked, threading.Event(), ["y"]) as reference:
        got = compare_models(reference, make_session(other), feeds, ["y"])
    assert read == [] and got == compare_models(make_session(model), make_session(other), feeds, ["y"])


def test_a_recorded_reference_serves_the_feeds_it_holds_and_validation_runs_the_rest(rng, monkeypatch):
    """A pass that ran the original records its outputs feed by feed, up to the byte cap
    (nothing after it: feeds are read back in order); validation reads those back and runs
    the original on the others, with the comparison a plain session gives."""
    import onnx_dwd.validate as validate
    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import RecordedReference, compare_models
    model, other, feeds = _models_and_feeds(rng, 5)
    want = compare_models(make_session(model), make_session(other), feeds, ["y"])
    session = make_session(model)
    outputs = [session.run(["y"], f) for f in feeds]
    monkeypatch.setattr(validate, "MAX_RECORDED_BYTES", 2 * outputs[0][0].nbytes)
    with RecordedReference(model, ["y"]) as reference:
        for outs in outputs[:3]:  # the third is past the cap: it and every later one are not kept
            reference.record(outs)
        recorded = reference.recorded()
        assert len(recorded) == 2 and np.array_equal(recorded[1][0].load(), outputs[1][0])
        assert compare_models(reference, make_session(other), feeds, ["y"]) == want
        with pytest.raises(RuntimeError, match="ran 2 feeds, validation has 1"):
            compare_models(reference, make_session(other), feeds[:1], ["y"])
    assert not Path(reference._dir.name).exists()  # its files go with it
    with RecordedReference(model, ["y"]) as nothing:  # no pass ran: validation runs every feed
        assert compare_models(nothing, make_session(other), feeds, ["y"]) == want
