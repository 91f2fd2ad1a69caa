"""The budgeted choice: rank or keep per layer, validated on the whole model and adjusted.

1. planner.py gives every candidate its options: time of the original conv
   and of each rank on the target runtime, and each rank's estimated error.
2. budget.plan picks per layer under the budget:
   - a time budget (--target-speedup X, --latency-budget MS) becomes the
     share q of their isolated time the layers may keep (total conv ms);
   - an error budget (--max-error E) becomes a bound on the sum of squared
     layer errors, first E^2.
3. The whole model is built and measured, and the budget adjusted:
   - time: the speed-up is measured side by side with the original, and the
     share of the layers' time the plan may keep is searched (isolated layer
     times do not add up to the model's, and only ratios measured together
     are trusted; see _for_time). The structure decides the time, not the
     weights, so these rounds build data-free models; the calibrated fit
     runs once at the end;
   - error: the model's output error on the held-out data is measured; the
     bound is scaled by (E / measured)^2, tighter when over, looser when well
     under, keeping the fastest model that met E.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from .capture import CaptureSpec, tensor_shapes
from .config import DATA_FREE_METHODS, OptimizeConfig
from .decompose import (PASS_THREADS, Decomposed, calibration_parts, configured_capture, decompose_model,
                        original_pass, prepare, uses_inter_layer)
from .fit.stats import ResidualSums
from .planner import (Decision, LayerOptions, decide, every_layer_at_rank_one, fastest, geometry, option_errors,
                      option_weights, predicted_ms, time_options)
from .reference import ReferenceOutputs
from .runtimes import make_session
from .runtimes.base import get_runner, with_static_inputs
from .runtimes.layer_latency import LatencyCache
from .runtimes.timing import compare, interleaved_ms
from .validate import compare_models

#: Adjustment rounds after the first plan (each builds and measures a model).
TIME_ROUNDS = 5
ERROR_ROUNDS = 5
#: Timing blocks when judging a plan (the report's own measurement uses REPORT_BLOCKS).
PLAN_BLOCKS = 12
REPORT_BLOCKS = 20
REPORT_BLOCK_SECONDS = 0.02
#: Ask for this much more saving than needed, and count a plan as meeting a time
#: target only with this much to spare: measurements have spread.
TIME_MARGIN = 1.03
#: The error bound changes at most this factor per round (an error of 0 says little).
MAX_STEP = 16.0
#: An error plan this close under the budget is good enough to stop at.
ERROR_CLOSE = 0.85


def measure_latency(original: onnx.ModelProto, optimized: onnx.ModelProto, feed: Dict[str, np.ndarray],
                    config: OptimizeConfig, what: str) -> Dict:
    """model.latency of the report: both models side by side on the configured runtime."""
    runner = get_runner(config.runtime, config.level)
    before = runner.load(_static(original, feed), config.threads, what=what)
    after = runner.load(_static(optimized, feed), config.threads, what=f"optimized {what}")
    result = compare(before.bind(feed), after.bind(feed), blocks=REPORT_BLOCKS,
                     block_seconds=REPORT_BLOCK_SECONDS)
    return {"runtime": runner.name, "runtime_detail": runner.describe(), "threads": config.threads, **result}


@dataclasses.dataclass
class Chooser:
    """Runs steps 1-3 of the module doc for one optimize call."""

    original: onnx.ModelProto
    config: OptimizeConfig
    calib: object  # Calibration or None
    feed: Dict[str, np.ndarray]  # one input (batch 1): shapes, timing
    validation_feeds: Callable
    what: str
    progress: Callable

    def __post_init__(self):
        self.method = self.config.resolved_method(self.calib is not None)
        self.runner = get_runner(self.config.runtime, self.config.level)
        self.runtime = f"{self.runner.describe()}, {self.config.threads} thread(s)"
        # the original model's sampled outputs by part, kept while choose() runs for its calibrated rounds
        self.original_outputs: Optional[Dict[str, ReferenceOutputs]] = None

    def choose(self) -> Tuple[Decomposed, Dict]:
        """The decomposed model and the report's model.selection."""
        with tempfile.TemporaryDirectory(prefix="onnx-dwd-reference-") as workdir:
            try:
                return self._choose(Path(workdir))
            finally:
                self.original_outputs = None

    def _choose(self, workdir: Path) -> Tuple[Decomposed, Dict]:
        options = self.layer_options(workdir)
        kind, value = self.config.budget
        if kind == "max_error":
            result, rounds, met = self._for_error(options, value)
        else:
            decisions, rounds, met = self._for_time(options, kind, value)
            result = self._build(decisions, calibrated=True)
        keep_total = sum(o.keep_ms for o in options)
        chosen = [e for e in result.layers if e.get("latency_before_ms") is not None]
        selection = {"budget": {kind: value}, "met": met, "runtime": self.runtime,
                     "layers_ms_before": keep_total,
                     "layers_ms_after": sum(e["latency_after_ms"] for e in chosen),
                     "rounds": rounds}
        return result, selection

    # step 1 ---------------------------------------------------------------
    def layer_options(self, workdir: Optional[Path] = None) -> List[LayerOptions]:
        """Every candidate's options. With workdir and a compensated fit, the pass of the
        original also keeps its outputs there for the calibrated rounds (self.original_outputs)."""
        prep = prepare(self.original, self.method, self.what)
        cands = prep.candidates
        shapes = tensor_shapes(prep.model, self.feed, [l.node.inputs[0].name for l in cands], what=self.what)
        cache = LatencyCache()
        times = {}
        for layer in self.progress(cands, f"timing layers on {self.runtime}", len(cands)):
            geo = geometry(layer, shapes[layer.node.inputs[0].name])
            times[layer.name] = time_options(layer, geo, self.runner, self.config.threads, cache, self.method)
        ranks = {l.name: sorted(set(times[l.name][1]) | {1}) for l in cands}
        scored = self._score_options(prep, ranks, workdir) if self.calib is not None else {}
        options = []
        for layer in cands:
            keep_ms, by_rank, rank_one = times[layer.name]
            # no data: the data-free weights, scored by their own error
            weights, sums = scored.get(layer.name) or (
                option_weights(layer, self.method, ranks[layer.name], None), None)
            options.append(LayerOptions(layer.name, keep_ms, by_rank, option_errors(layer, weights, sums), rank_one))
        return options

    def _score_options(self, prep, ranks, workdir) -> Dict[str, tuple]:
        """Per candidate: each rank's (weight, bias) fitted on the fit data (data methods),
        and its ResidualSums on the held-out data, or with --holdout 0 on a second pass
        over the fit data."""
        cands = prep.candidates
        specs = [CaptureSpec.of(l) for l in cands]
        capture = configured_capture(specs, self.config, self.calib.fit.count, self.config.seed)
        parts = calibration_parts(self.calib, self.method not in DATA_FREE_METHODS)
        self.original_outputs = None  # a recording of an earlier call is not this one's
        if workdir is not None and uses_inter_layer(self.config, self.method, self.calib):
            self.original_outputs = {p: ReferenceOutputs(workdir, f"reference-{p}", [s.name for s in specs])
                                     for p in parts}
        store = self.original_outputs or {}
        # one BLAS thread: onnxruntime runs beside the statistics, as in decompose.py
        with threadpool_limits(limits=1, user_api="blas"):
            stats = {}
            if "fit" in parts:
                stats = capture.new_stats()
                original_pass(prep.model, specs, self.calib.fit.batches, capture, store=store.get("fit"),
                              consume=lambda values, sampled: capture.add_sampled(values, sampled, stats),
                              threads=PASS_THREADS, what=self.what, progress=self.progress,
                              label="errors per rank: fit data")
                capture.flush()
            weights = {l.name: option_weights(l, self.method, ranks[l.name], stats.get(l.name))
                       for l in self.progress(cands, f"errors per rank ({self.method}): fitting", len(cands))}
            stats.clear()  # d x d each: gone before the next pass
            sums = {l.name: {k: ResidualSums(w, b, l.group) for k, (w, b) in weights[l.name].items()} for l in cands}
            sinks = {name: _EachOf(list(by_rank.values())) for name, by_rank in sums.items()}
            # held-out data, or with --holdout 0 the fit data again (not recorded twice)
            name, part = ("held-out", self.calib.holdout) if "held-out" in parts else ("fit", self.calib.fit)
            original_pass(prep.model, specs, part.batches, capture,
                          store=store.get(name) if name == "held-out" else None,
                          consume=lambda values, sampled: capture.add_residuals(values, sampled, sinks),
                          threads=PASS_THREADS, what=self.what, progress=self.progress,
                          label="errors per rank: held-out data" if name == "held-out"
                          else "errors per rank: scoring on the fit data (nothing held out)")
        return {layer: (weights[layer], sums[layer]) for layer in weights}

    # step 3, time ---------------------------------------------------------
    def _for_time(self, options, kind, value) -> Tuple[Dict[str, Decision], List[Dict], bool]:
        """Search q, the fraction of their time the layers may keep: the largest (least error)
        whose model meets the target, inside a bracket.

        Only ratios measured side by side are trusted (the cached layer times and
        the whole model's time may come from moments of different load): each
        measured speed-up s of a plan that keeps q' of the layer time gives the
        share phi of the model's time that those layers behave as, from
        s = 1 / (1 - phi (1 - q')), and the next q aims at the target with it.
        """
        keep_total = sum(o.keep_ms for o in options)
        before_ms = self._reference_ms()
        phi = min(max(keep_total / before_ms, 0.2), 0.9)  # first guess; measured from the first round on
        limit = _ranks(fastest(options, self.runtime))
        rounds, tried = [], {}
        met_q, failed_q = None, 1.0  # largest q that met, smallest that missed (keeping all never meets)
        best = None
        for _ in range(TIME_ROUNDS):
            speedup = value if kind == "target_speedup" else before_ms / value
            if speedup <= 1:  # a latency budget the original already meets
                return decide(options, error_proxy=0.0, runtime=self.runtime), rounds, True
            guess = 1 - (1 - 1 / (speedup * TIME_MARGIN)) / phi
            q = _inside(min(max(guess, 0.0), 1.0), met_q, failed_q)
            decisions = decide(options, conv_ms=keep_total * q, runtime=self.runtime)
            key = _ranks(decisions)
            if key in tried:  # no new plan in the bracket
                break
            m = tried[key] = self._measure(self._build(decisions, calibrated=False).model)
            # a margin: the report's own measurement, later, has its spread too
            met = m["speedup"] >= value * TIME_MARGIN if kind == "target_speedup" \
                else m["after_ms"] * TIME_MARGIN <= value
            kept = predicted_ms(decisions) / keep_total  # the fraction the plan really keeps
            rounds.append({"layer_time_kept": q, "planned_layer_time_kept": kept, "before_ms": m["before_ms"],
                           "after_ms": m["after_ms"], "speedup": m["speedup"], "met": met})
            if met:
                met_q = q if met_q is None else max(met_q, q)
                if best is None or q > best[0]:
                    best = (q, decisions)
            else:
                failed_q = min(failed_q, q)
                if key == limit:
                    break  # the fastest plan misses: nothing more to try
            if kept < 1 and m["speedup"] > 0:
                phi = min(max((1 - 1 / m["speedup"]) / (1 - kept), 0.05), 1.0)
            before_ms = m["before_ms"]
            close = m["speedup"] <= value * 1.1 if kind == "target_speedup" else m["after_ms"] * 1.1 >= value
            if met and close:
                break  # met with less than 10% to spare: more rounds would gain little
        if best is not None:
            return best[1], rounds, True
        return self._fastest_measured(options, kind, value, tried, rounds)

    def _fastest_measured(self, options, kind, value, tried, rounds):
        """The target is out of reach: the faster, measured, of the fastest plan and rank 1 everywhere."""
        candidates = [fastest(options, self.runtime), every_layer_at_rank_one(options)]
        measured = []
        for decisions in candidates:
            key = _ranks(decisions)
            if key not in tried:
                m = tried[key] = self._measure(self._build(decisions, calibrated=False).model)
                met = m["speedup"] >= value * TIME_MARGIN if kind == "target_speedup" \
                    else m["after_ms"] * TIME_MARGIN <= value
                rounds.append({"layer_time_kept": None, "planned_layer_time_kept": predicted_ms(decisions) /
                               sum(o.keep_ms for o in options), "before_ms": m["before_ms"],
                               "after_ms": m["after_ms"], "speedup": m["speedup"], "met": met,
                               "plan": "fastest" if decisions is candidates[0] else "rank 1 everywhere"})
            measured.append((tried[key]["speedup"], decisions))
        _, decisions = max(measured, key=lambda t: t[0])
        m = tried[_ranks(decisions)]
        met = m["speedup"] >= value * TIME_MARGIN if kind == "target_speedup" else m["after_ms"] * TIME_MARGIN <= value
        return decisions, rounds, met

    # step 3, error --------------------------------------------------------
    def _for_error(self, options, limit_error) -> Tuple[Decomposed, List[Dict], bool]:
        """Search the bound on the sum of squared layer errors: the largest that keeps the
        model's error within the limit (fastest), by extrapolation inside a bracket."""
        reference = make_session(self.original, what=self.what)
        names = [o.name for o in reference.get_outputs()]
        proxy, rounds, tried = limit_error ** 2, [], {}
        met_at, failed = 0.0, None  # largest bound that met, smallest that missed
        best: Optional[Tuple[float, Decomposed]] = None
        limit = _ranks(fastest(options, self.runtime))
        for _ in range(3 * ERROR_ROUNDS):
            if len(rounds) == ERROR_ROUNDS:
                break
            decisions = decide(options, error_proxy=proxy, runtime=self.runtime)
            key = _ranks(decisions)
            if key in tried:  # a plan already built: its outcome narrows the bracket
                if tried[key]:
                    met_at = max(met_at, proxy)
                else:
                    failed = proxy if failed is None else min(failed, proxy)
                if failed is not None and failed / met_at < 1.05:
                    break
                proxy = proxy * MAX_STEP if failed is None else float(np.sqrt(met_at * failed))
                continue
            result = self._build(decisions, calibrated=True)
            validation = compare_models(reference, make_session(result.model, what=self.what),
                                        self.validation_feeds(), names, what=(self.what, self.what))
            err = max(o["rel_error"] for o in validation["outputs"].values())
            ms = predicted_ms(decisions)
            met = err <= limit_error
            rounds.append({"error_proxy": proxy, "predicted_layers_ms": ms, "rel_error": err, "met": met})
            tried[key] = met
            if met:
                met_at = max(met_at, proxy)
                if best is None or ms < best[0]:
                    best = (ms, result)
                if err >= ERROR_CLOSE * limit_error or key == limit:
                    break
            else:
                failed = proxy if failed is None else min(failed, proxy)
            step = min(max((limit_error / max(err, 1e-12)) ** 2, 1 / MAX_STEP), MAX_STEP)
            proxy = _inside(proxy * step, met_at, failed, geometric=True)
        if best is None:  # nothing met it: keep every conv (error 0)
            keep_all = decide(options, error_proxy=0.0, runtime=self.runtime)
            return self._build(keep_all, calibrated=True), rounds, False
        return best[1], rounds, True

    # helpers ----------------------------------------------------------------
    def _build(self, decisions, calibrated: bool) -> Decomposed:
        if calibrated:
            return decompose_model(self.original, self.config, self.feed, calibration=self.calib, what=self.what,
                                   progress=self.progress, decisions=decisions, reference=self.original_outputs)
        structure_only = dataclasses.replace(self.config, method="nd")
        return decompose_model(self.original, structure_only, self.feed, what=self.what, decisions=decisions)

    def _load(self, model, what):
        return self.runner.load(_static(model, self.feed), self.config.threads, what=what)

    def _reference_ms(self) -> float:
        """Median ms of the original model alone."""
        self._reference = self._load(self.original, self.what)
        times, _ = interleaved_ms({"original": self._reference.bind(self.feed)}, PLAN_BLOCKS)
        return float(np.median(times["original"]))

    def _measure(self, model) -> Dict:
        """The candidate model side by side with the original (runtimes/timing.compare)."""
        after = self._load(model, f"candidate for {self.what}")
        return compare(self._reference.bind(self.feed), after.bind(self.feed), blocks=PLAN_BLOCKS)


class _EachOf:
    """A sink (add(patches, outputs)) that feeds each of several: one layer's patches
    gathered once for every rank's ResidualSums."""

    def __init__(self, sinks):
        self.sinks = sinks

    def add(self, patches: np.ndarray, outputs: np.ndarray) -> None:
        for sink in self.sinks:
            sink.add(patches, outputs)


def _ranks(decisions: Dict[str, Decision]) -> tuple:
    return tuple(sorted((name, d.rank or 0, d.graph_form or "") for name, d in decisions.items()))


def _inside(guess: float, low: Optional[float], high: Optional[float], geometric: bool = False) -> float:
    """guess if strictly inside the bracket (low, high) (None: open), else its midpoint;
    with one side open, a step of 2x away from the known side."""
    if (low is None or guess > low) and (high is None or guess < high):
        return guess
    if low is not None and high is not None:
        return float(np.sqrt(low * high)) if geometric else (low + high) / 2
    return low * 2 if low is not None else high / 2


def _static(model: onnx.ModelProto, feed: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """model with the input shapes of feed (converting runtimes need static shapes)."""
    return with_static_inputs(model, {name: value.shape for name, value in feed.items()})
