"""Comparison: metrics summed feed by feed equal the metrics of all outputs at once."""

import math

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
