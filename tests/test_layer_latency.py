"""Single-layer latency models and their cache (no timing assertions)."""

import numpy as np
import onnx
import pytest

from conftest import rel_error, run
from onnx_dwd.runtimes import layer_latency as ll

GEO = ll.ConvGeometry(8, 12, (3, 3), (2, 2), (1, 0, 1, 2), (1, 1), 1, 15, 13)


@pytest.mark.parametrize("form", ["sum", "split", "multiplier", "concat-input"])
def test_decomposed_layer_model_is_the_optimize_rewrite(form):
    x = {"x": np.random.default_rng(1).standard_normal((1, 8, 15, 13)).astype(np.float32)}
    (want,) = run(ll.single_conv_model(GEO), x)
    (got,) = run(ll.decomposed_conv_model(GEO, 9, form), x)  # full rank: the same function
    assert rel_error(want, got) < 1e-5
    for model in (ll.single_conv_model(GEO), ll.decomposed_conv_model(GEO, 2, form)):
        onnx.checker.check_model(model, full_check=True)
    assert got.shape == (1, 12) + GEO.output_hw()
    ops = [n.op_type for n in ll.decomposed_conv_model(GEO, 2, form).graph.node]
    assert ops.count("Conv") >= 2


def test_cache_measures_each_key_once_and_persists(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ll, "time_model", lambda model, runner, threads: calls.append(threads) or 1.5)
    cache = ll.LatencyCache(tmp_path / "lat.json")
    assert ll.layer_latency(GEO, cache=cache) == 1.5
    assert ll.layer_latency(GEO, cache=cache) == 1.5
    assert ll.layer_latency(GEO, "sum", rank=2, cache=cache) == 1.5
    assert ll.layer_latency(GEO, threads=2, cache=cache) == 1.5
    assert calls == [1, 1, 2]  # original@t1 once, sum@2, original@t2
    again = ll.LatencyCache(tmp_path / "lat.json")
    assert ll.layer_latency(GEO, "sum", rank=2, cache=again) == 1.5 and len(calls) == 3
    keys = set(again._data)
    assert len(keys) == 3 and all(k.startswith("v2|ort|all|") for k in keys)


def test_damaged_cache_file_is_ignored(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    cache = ll.LatencyCache(path)
    assert cache.get("anything") is None
    cache.put("k", 2.0)
    assert ll.LatencyCache(path).get("k") == 2.0


def test_real_timing_runs(tmp_path):
    ms = ll.layer_latency(ll.ConvGeometry(4, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 8, 8), "multiplier",
                          cache=ll.LatencyCache(tmp_path / "c.json"))
    assert ms > 0


def test_channel_layer_model_has_the_baseline_structure():
    model = ll.channel_conv_model(GEO, 5)
    onnx.checker.check_model(model, full_check=True)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weights = {t.name: t.dims for t in model.graph.initializer}
    assert len(convs) == 2 and list(weights[convs[0].input[1]]) == [5, 8, 3, 3]
    assert list(weights[convs[1].input[1]]) == [12, 5, 1, 1]
    x = {"x": np.random.default_rng(1).standard_normal((1, 8, 15, 13)).astype(np.float32)}
    assert run(model, x)[0].shape == (1, 12) + GEO.output_hw()
