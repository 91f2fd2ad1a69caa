"""The budgeted per-layer choice: planner options, the adjustment loops, the report.

Layer latencies are faked (proportional to MACs, a fixed cost per extra graph
form) so that plans are deterministic; one test runs the real timing path.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnx_dwd import planner, selection
from onnx_dwd.api import optimize
from onnx_dwd.budget import Option
from onnx_dwd.config import DEFAULT_MAX_ERROR, OptimizeConfig
from onnx_dwd.cost import conv_macs, decomposed_macs
from onnx_dwd.errors import OptionError
from onnx_dwd.fit.stats import LayerStats, ResidualSums, relative_error
from onnx_dwd.runtimes.layer_latency import ConvGeometry
from onnx_dwd.select import classify_convs
from test_capture import e2e as model_and_feeds  # noqa: F401 (a fixture: three 3x3 convs, 20 feeds)

FORM_COST = {"sum": 1.0, "split": 1.05, "multiplier": 1.3, "concat-input": 1.1}


def fake_layer_ms(geo: ConvGeometry, form="original", *, rank=1, threads=1, runner=None, cache=None):
    """ms = MACs / 1e4 (+ a fixed 0.5 per call); decomposed forms cost FORM_COST times their MACs."""
    out_hw = [(geo.height + geo.pads[0] + geo.pads[2] - geo.kernel[0]) // geo.strides[0] + 1,
              (geo.width + geo.pads[1] + geo.pads[3] - geo.kernel[1]) // geo.strides[1] + 1]
    shape = [1, geo.out_channels] + out_hw
    if form == "original":
        macs = conv_macs(shape, geo.out_channels, geo.in_channels, geo.group, geo.kernel)
        return 0.5 + macs / 1e4
    macs = decomposed_macs(shape, geo.out_channels, geo.in_channels, geo.group, geo.kernel, rank)
    return 0.5 + FORM_COST[form] * macs / 1e4 * (1 if rank == 1 else 1.2)


def model_fake_ms(model: onnx.ModelProto, feed) -> float:
    """A whole model's fake time: 1 ms plus, per Conv node, 0.5 + MACs / 1e4. It does not
    add up to fake_layer_ms exactly (as real timings do not): the loop must adjust."""
    from onnx_dwd.capture import tensor_shapes
    graph = gs.import_onnx(model)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    shapes = tensor_shapes(model, feed, [n.outputs[0].name for n in convs])
    return 1.0 + sum(0.5 + np.prod(shapes[n.outputs[0].name][2:]) * n.inputs[1].values.size / 1e4 for n in convs)


@pytest.fixture
def fake_latency(monkeypatch):
    monkeypatch.setattr(planner, "layer_latency", fake_layer_ms)


def layer(weight, name="conv"):
    graph = gs.Graph(nodes=[gs.Node("Conv", name, attrs={"pads": [1, 1, 1, 1]},
                                    inputs=[gs.Variable("x"), gs.Constant(name + ".w", weight)],
                                    outputs=[gs.Variable("y")])])
    (l,) = classify_convs(graph)
    return l


def test_time_options_stop_at_the_first_rank_not_faster(fake_latency):
    rng = np.random.default_rng(0)
    l = layer(rng.standard_normal((16, 16, 3, 3)).astype(np.float32))
    geo = planner.geometry(l, (1, 16, 10, 10))
    assert geo.pads == (1, 1, 1, 1) and geo.height == 10
    keep, times, _ = planner.time_options(l, geo, runner=None, threads=1, cache=None)
    # original 16*16*9*100 = 230k MACs; rank K costs K*16*(9+16)*100 = 40k*K, x1.2 for K > 1
    assert keep == pytest.approx(0.5 + 23.04)
    assert sorted(times) == [1, 2, 3]  # rank 4: 1.2 * 160k MACs is 84% of the original: under MIN_GAIN
    assert times[1][0] == "multiplier" and all(f == "sum" for f, _ in list(times.values())[1:])
    assert all(ms < keep for _, ms in times.values())


def test_option_errors_fall_with_rank_and_data_free_uses_the_weight():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    l = layer(w)
    stats = LayerStats.zeros(8, 36)
    x = rng.standard_normal((2000, 36))
    stats.add(x, x @ w.reshape(8, -1).T)
    held = rng.standard_normal((500, 36)).astype(np.float32)  # other positions of the same layer
    for method in ("refit", "dwd", "nd", "channel"):
        weights = planner.option_weights(l, method, [1, 2, 4, 8], stats)
        sums = {k: ResidualSums(wk, bk, 1) for k, (wk, bk) in weights.items()}
        for s in sums.values():
            s.add(held, held @ w.reshape(8, -1).T)
        errors = planner.option_errors(l, weights, sums)
        values = [errors[k] for k in (1, 2, 4, 8)]
        assert all(0 <= b <= a + 1e-6 for a, b in zip(values, values[1:])), (method, values)
        assert values[0] > 0.1 and values[-1] < values[0]
        # measured on the held-out positions: the same as the statistics' closed form there
        held_stats = LayerStats.zeros(8, 36)
        held_stats.add(held.astype(np.float64), held.astype(np.float64) @ w.reshape(8, -1).T)
        for k, (wk, bk) in weights.items():
            assert errors[k] == pytest.approx(relative_error(held_stats, wk, bk), rel=1e-4, abs=1e-6)
    free = planner.option_errors(l, planner.option_weights(l, "nd", [1], None))[1]
    from onnx_dwd.fit import network_decoupling, reconstruct_weight
    rebuilt = reconstruct_weight(network_decoupling(w, 1, 1))
    assert free == pytest.approx(np.linalg.norm(rebuilt - w) / np.linalg.norm(w), rel=1e-6)


def test_decide_keeps_layers_with_nothing_faster_and_says_why():
    options = [planner.LayerOptions("a", 2.0, {1: ("multiplier", 0.5), 2: ("sum", 1.0)}, {1: 0.4, 2: 0.1}),
               planner.LayerOptions("b", 1.0, {}, {})]
    d = planner.decide(options, conv_ms=2.1)
    assert d["a"].rank == 2 and d["a"].graph_form == "sum" and d["a"].ms == 1.0
    assert d["b"].rank is None and "no decomposed form is at least 20% faster" in d["b"].reason
    d = planner.decide(options, error_proxy=0.0)
    assert d["a"].rank is None and "budget" in d["a"].reason
    fast = planner.fastest(options)
    assert fast["a"].rank == 1 and planner.predicted_ms(fast) == 1.5


def test_config_budgets_are_exclusive_and_checked():
    with pytest.raises(OptionError, match="--rank fixes the rank"):
        OptimizeConfig(rank=1, target_speedup=2)
    with pytest.raises(OptionError, match="at most one budget"):
        OptimizeConfig(max_error=0.1, latency_budget_ms=3)
    for bad in ({"target_speedup": 1.0}, {"max_error": 0}, {"latency_budget_ms": -1}, {"threads": 0},
                {"level": "max"}, {"runtime": "tvm"}, {"runtime": "ort,mnn"}):
        with pytest.raises(OptionError):
            OptimizeConfig(**bad)
    assert OptimizeConfig().budget == ("max_error", DEFAULT_MAX_ERROR) and OptimizeConfig().selects
    assert not OptimizeConfig(rank=2).selects


def _fake_measure(monkeypatch, feed_of):
    """Whole-model 'timing' from fake layer times: deterministic speed-ups for the time loop."""
    def reference_ms(self):
        self._fake_before = model_fake_ms(self.original, feed_of(self))
        return self._fake_before

    def measure(self, model):
        after = model_fake_ms(model, feed_of(self))
        before = model_fake_ms(self.original, feed_of(self))
        return {"before_ms": before, "after_ms": after, "speedup": before / after}
    monkeypatch.setattr(selection.Chooser, "_reference_ms", reference_ms)
    monkeypatch.setattr(selection.Chooser, "_measure", measure)


def test_error_budget_is_met_on_held_out_data_and_reported(model_and_feeds, tmp_path, fake_latency):
    folder, feeds = model_and_feeds
    report = optimize(folder / "m.onnx", tmp_path / "o.onnx",
                      OptimizeConfig(max_error=0.4, measure_latency=False), calibration=feeds)
    m = report["model"]
    err = m["validation"]["outputs"]["y"]["rel_error"]
    assert m["selection"]["met"] and err <= 0.4 and any(r["met"] for r in m["selection"]["rounds"])
    # random 4-8 channel layers: no rank faster by MIN_GAIN fits them within 30%, so 0.4 decomposes some
    assert m["decomposed"] >= 1 and report["config"]["budget"] == {"max_error": 0.4}
    for e in report["layers"]:
        assert e["latency_after_ms"] <= e["latency_before_ms"]
        if e["decomposed"]:
            assert e["latency_after_ms"] < e["latency_before_ms"] and 1 <= e["rank"] < 9
    # the budget's latency claim is measured, not predicted: model.latency is always there
    assert {"runtime", "threads", "before_ms", "after_ms", "speedup"} <= set(m["latency"])
    onnx.checker.check_model(onnx.load(tmp_path / "o.onnx"))


def test_a_looser_error_budget_is_never_slower(model_and_feeds, tmp_path, fake_latency):
    folder, feeds = model_and_feeds
    ms = {}
    for e in (0.02, 0.3):
        report = optimize(folder / "m.onnx", tmp_path / f"o{e}.onnx",
                          OptimizeConfig(max_error=e, measure_latency=False), calibration=feeds)
        assert report["model"]["validation"]["outputs"]["y"]["rel_error"] <= e
        ms[e] = report["model"]["selection"]["layers_ms_after"]
    assert ms[0.3] <= ms[0.02]


def test_an_error_budget_no_decomposition_meets_keeps_every_conv(model_and_feeds, tmp_path, fake_latency):
    folder, feeds = model_and_feeds
    report = optimize(folder / "m.onnx", tmp_path / "o.onnx",
                      OptimizeConfig(max_error=1e-9, measure_latency=False), calibration=feeds)
    assert report["model"]["decomposed"] == 0 and report["model"]["selection"]["met"]
    assert all(e["reason"] == "keeping it fits the budget better" for e in report["layers"])
    assert report["model"]["validation"]["outputs"]["y"]["rel_error"] < 1e-6


def test_speedup_target_is_met_with_the_least_error(model_and_feeds, tmp_path, fake_latency, monkeypatch):
    folder, feeds = model_and_feeds
    _fake_measure(monkeypatch, lambda chooser: chooser.feed)
    report = optimize(folder / "m.onnx", tmp_path / "o.onnx",
                      OptimizeConfig(target_speedup=1.6, measure_latency=False), calibration=feeds)
    sel = report["model"]["selection"]
    assert sel["met"] and any(r["met"] and r["speedup"] >= 1.6 for r in sel["rounds"])
    written = onnx.load(tmp_path / "o.onnx")
    feed = {"x": feeds[0]["x"]}
    speedup = model_fake_ms(onnx.load(folder / "m.onnx"), feed) / model_fake_ms(written, feed)
    assert speedup >= 1.6
    fastest = optimize(folder / "m.onnx", tmp_path / "f.onnx",
                       OptimizeConfig(target_speedup=50, measure_latency=False), calibration=feeds)
    assert not fastest["model"]["selection"]["met"]  # unreachable: the fastest plan, and it says so
    assert all(e["rank"] == 1 for e in fastest["layers"] if e["decomposed"])
    assert report["model"]["validation"]["outputs"]["y"]["rel_error"] <= \
        fastest["model"]["validation"]["outputs"]["y"]["rel_error"]


def test_real_timing_path_on_onnxruntime(model_and_feeds, tmp_path, monkeypatch):
    """No fakes: layers timed in onnxruntime (cache in tmp), whole model measured for the report."""
    monkeypatch.setenv("ONNX_DWD_CACHE", str(tmp_path / "cache"))
    folder, feeds = model_and_feeds
    report = optimize(folder / "m.onnx", tmp_path / "o.onnx", OptimizeConfig(max_error=0.1), calibration=feeds)
    assert (tmp_path / "cache" / "layer_latency.json").is_file()
    lat = report["model"]["latency"]
    assert lat["runtime"] == "ort" and lat["threads"] == 1 and lat["before_ms"] > 0 and lat["after_ms"] > 0
    for e in report["layers"]:
        assert e["latency_before_ms"] > 0
        if e["decomposed"]:
            assert e["latency_after_ms"] < e["latency_before_ms"]


def test_budget_option_carries_rank_and_form():
    o = Option("rank 2", 1.0, 0.1, rank=2, form="sum")
    assert (o.rank, o.form) == (2, "sum")


def test_channel_method_times_the_channel_form(fake_latency, monkeypatch):
    """--method channel writes k x k -> c' -> 1x1, so that is what its options are timed as."""
    seen = []
    monkeypatch.setattr(planner, "layer_latency",
                        lambda geo, form="original", *, rank=1, threads=1, runner=None, cache=None:
                        seen.append((form, rank)) or (10.0 if form == "original" else 1.0 + rank / 10))
    l = layer(np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32))
    keep, times, _ = planner.time_options(l, planner.geometry(l, (1, 16, 10, 10)), None, 1, None, method="channel")
    assert {f for f, _ in seen} == {"original", "channel"}
    assert all(form == "channel" for form, _ in times.values())
    from onnx_dwd.cost import channels_for_rank
    assert [r for f, r in seen if f == "channel"][:2] == [channels_for_rank(16, 16, (3, 3), k) for k in (1, 2)]


def test_out_of_reach_target_also_tries_rank_one_wherever_faster(fake_latency):
    options = [planner.LayerOptions("a", 2.0, {1: ("multiplier", 1.0)}, {1: 0.3}, ("multiplier", 1.0)),
               planner.LayerOptions("b", 1.0, {}, {1: 0.2}, ("multiplier", 0.9)),   # faster, under MIN_GAIN
               planner.LayerOptions("c", 1.0, {}, {1: 0.2}, ("multiplier", 1.1))]   # slower alone: never
    fast = planner.fastest(options)
    assert fast["a"].rank == 1 and fast["b"].rank is None and fast["c"].rank is None
    one = planner.every_layer_at_rank_one(options)
    assert one["a"].rank == 1 and one["b"].rank == 1 and one["c"].rank is None
    assert all(d.ms <= d.keep_ms for d in one.values())


def test_calibrated_rounds_replay_the_options_pass_of_the_original(model_and_feeds, fake_latency, monkeypatch):
    """The pass that scores the options records the original model's outputs; each calibrated
    round, whatever it keeps, fits against them instead of running the original again, and
    fits what a fit with its own pass fits (every position: the same statistics)."""
    import tempfile
    from pathlib import Path
    from onnx_dwd import decompose
    from onnx_dwd.calib import feed_calibration, resolve_input_specs
    folder, feeds = model_and_feeds
    original = onnx.load(folder / "m.onnx")
    config = OptimizeConfig(max_error=0.4, measure_latency=False, position_budget=0)
    calib = feed_calibration(feeds, resolve_input_specs(original, {}, "m"), config.holdout)
    chooser = selection.Chooser(original, config, calib, {"x": feeds[0]["x"][:1]}, calib.holdout.batches, "m",
                                decompose.no_progress)
    recorded = []
    record = decompose._record_reference
    monkeypatch.setattr(decompose, "_record_reference", lambda *a: recorded.append(1) or record(*a))

    def at_rank_one(options, kept=()):
        return {o.name: planner.Decision(None, None, "kept by the test", o.keep_ms, o.keep_ms, 0.0) if o.name in kept
                else planner.Decision(1, o.rank_one[0], None, o.keep_ms, o.rank_one[1], o.errors[1]) for o in options}

    with tempfile.TemporaryDirectory() as workdir:
        options = chooser.layer_options(Path(workdir))
        assert set(chooser.original_outputs) == {"fit", "held-out"}
        plans = [at_rank_one(options), at_rank_one(options, kept=[options[0].name]), at_rank_one(options)]
        shared = [chooser._build(plan, calibrated=True) for plan in plans]
    assert not recorded
    chooser.layer_options()  # again, without a workdir: the old recording is not reused
    assert chooser.original_outputs is None
    for plan, got in zip(plans, shared):
        own = decompose.decompose_model(original, config, chooser.feed, calibration=calib, decisions=plan)
        got_w = {t.name: onnx.numpy_helper.to_array(t) for t in got.model.graph.initializer}
        own_w = {t.name: onnx.numpy_helper.to_array(t) for t in own.model.graph.initializer}
        assert sorted(got_w) == sorted(own_w)
        for name in own_w:
            np.testing.assert_allclose(got_w[name], own_w[name], rtol=1e-4, atol=1e-5, err_msg=name)
        for a, b in zip(got.layers, own.layers):
            assert a["decomposed"] == b["decomposed"]
            if a["decomposed"]:
                assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-4)
    assert len(recorded) == 3
    assert shared[1].layers[0]["decomposed"] is False and shared[0].layers[0]["decomposed"] is True


@pytest.mark.parametrize("method", ["refit", "nd"])
def test_without_held_out_data_the_options_are_scored_on_the_fit_data(model_and_feeds, tmp_path, fake_latency,
                                                                      method):
    """--holdout 0: no held-out pass to record or score; the options' errors come from a
    second pass over the fit data, and the rounds still fit (refit) against the recording."""
    folder, feeds = model_and_feeds
    report = optimize(folder / "m.onnx", tmp_path / "o.onnx",
                      OptimizeConfig(max_error=0.4, holdout=0, method=method, measure_latency=False),
                      calibration=feeds)
    chosen = [e for e in report["layers"] if e["decomposed"]]
    assert report["model"]["selection"]["rounds"] and chosen
    assert all(0 < e["planned_rel_error"] < 1 for e in chosen)
    onnx.checker.check_model(onnx.load(tmp_path / "o.onnx"))
