"""Comparison: metrics summed feed by feed equal the metrics of all outputs at once."""

import math
import threading

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


def test_a_background_reference_gives_what_the_session_gives(rng):
    """The original's outputs computed beside the fit, on one thread at low priority, make the
    same comparison as running it during validation; a feed-count mismatch is an error."""
    from conftest import conv_model

    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model = conv_model(rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), (1, 3, 8, 8))
    other = conv_model(rng.standard_normal((4, 3, 3, 3)), None, (1, 3, 8, 8))
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    names = [o.name for o in model.graph.output]
    want = compare_models(make_session(model), make_session(other), feeds, names)
    ready = threading.Event()
    ready.set()
    with BackgroundReference(model, lambda: iter(feeds), ready, names) as reference:
        assert compare_models(reference, make_session(other), feeds, names) == want
        recorded = [outs for outs in reference.outputs()]
        assert len(recorded) == 5 and all(np.array_equal(outs[0], run_out)
                                           for outs, (run_out,) in zip(recorded, (make_session(model).run(names, f)
                                                                                  for f in feeds)))
        with pytest.raises(RuntimeError, match="fewer feeds"):
            compare_models(reference, make_session(other), feeds + feeds[:1], names)


def test_a_background_reference_raises_its_error_at_validation(rng):
    from conftest import conv_model

    from onnx_dwd.errors import DwdError
    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model = conv_model(rng.standard_normal((4, 3, 3, 3)), None, (1, 3, 8, 8))
    bad = [{"x": np.zeros((1, 5, 8, 8), np.float32)}]  # 5 channels where the conv takes 3
    ready = threading.Event()
    ready.set()
    with BackgroundReference(model, lambda: iter(bad), ready, ["y"], what="m.onnx") as reference:
        with pytest.raises(DwdError, match="m.onnx: onnxruntime failed"):
            compare_models(reference, make_session(model), bad, ["y"])


def test_a_background_reference_whose_feeds_never_got_ready_leaves_the_run_to_validation(rng):
    """Feeds not cached by validation time: the thread never reads them, and compare_models
    runs the original itself, with the same result."""
    from conftest import conv_model

    from onnx_dwd.runtimes import make_session
    from onnx_dwd.validate import BackgroundReference, compare_models
    model = conv_model(rng.standard_normal((4, 3, 3, 3)), None, (1, 3, 8, 8))
    other = conv_model(rng.standard_normal((4, 3, 3, 3)), None, (1, 3, 8, 8))
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    read = []

    def tracked():
        read.append(None)
        return iter(feeds)

    with BackgroundReference(model, tracked, threading.Event(), ["y"]) as reference:
        got = compare_models(reference, make_session(other), feeds, ["y"])
    assert read == [] and got == compare_models(make_session(model), make_session(other), feeds, ["y"])
