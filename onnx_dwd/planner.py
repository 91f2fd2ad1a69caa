"""Per layer: keep the conv, or decompose it at rank K in its fastest graph form.

The options of a candidate layer are rank K = 1 .. max_rank - 1 (full rank is
exact but never cheaper). Each gets
- a time: the layer alone at its real input shape, timed on the target
  runtime (runtimes/layer_latency.py, cached on disk), in every graph form
  for K > 1, keeping the fastest. Ranks stop at the first whose fastest form
  is not clearly faster than the original conv (MIN_GAIN; higher ranks only
  cost more);
- an error: the relative output error of the method's fit at that rank,
  fitted on the calibration statistics and measured on the held-out data
  (the fit data with --holdout 0), the layer's input taken from the original
  model. refit is estimated by its first stage, Algorithm 2 (an upper bound:
  refit's later steps only lower it). Without calibration data: the weight's
  relative error.
budget.plan then picks per layer; api.py validates the whole model and
adjusts the budget when the model misses it (errors and times do not add up
exactly across layers).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .budget import LayerChoices, Option, Plan, plan as solve
from .cost import channels_for_rank
from .fit import network_decoupling, reconstruct_weight
from .fit.common import max_rank
from .fit.data import channel, dwd, dwd_comp
from .fit.stats import LayerStats, ResidualSums, conv_pads
from .rewrite import resolve_graph_form
from .runtimes.base import Runner
from .runtimes.layer_latency import ConvGeometry, LatencyCache, layer_latency
from .select import ConvLayer

#: A rank counts as faster only if, alone, it takes at most 1 - MIN_GAIN of the original
#: conv's time: smaller gains measured in isolation did not survive in the whole model
#: (YOLOv8n, onnxruntime: a plan of such options saved 1.95 ms predicted, -0.13 ms measured).
MIN_GAIN = 0.2

#: Graph forms timed for K > 1 (rewrite.py); grouped convs only have these two.
FORMS = ("sum", "split", "multiplier", "concat-input")
GROUPED_FORMS = ("sum", "multiplier")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with one candidate layer: rank None keeps the conv (reason says why)."""

    rank: Optional[int]
    graph_form: Optional[str]
    reason: Optional[str]
    keep_ms: float
    ms: float
    error_estimate: float


@dataclasses.dataclass
class LayerOptions:
    """A candidate's measured options: time of the original, and per rank (form, ms) and error."""

    name: str
    keep_ms: float
    times: Dict[int, tuple]  # rank -> (graph form, ms), the ranks clearly faster alone
    errors: Dict[int, float]  # rank -> relative error
    rank_one: Optional[tuple] = None  # (graph form, ms) at rank 1, faster alone or not

    def choices(self) -> LayerChoices:
        return LayerChoices(self.name, self.keep_ms, [
            Option(f"rank {k}", ms, self.errors[k], rank=k, form=form)
            for k, (form, ms) in sorted(self.times.items()) if k in self.errors])


def geometry(layer: ConvLayer, in_shape: Sequence[int]) -> ConvGeometry:
    """The layer's ConvGeometry at input shape [N, C, H, W] (batch 1 for timing)."""
    a = layer.node.attrs
    auto_pad = a.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    strides, dilations = tuple(a.get("strides", (1, 1))), tuple(a.get("dilations", (1, 1)))
    pads = conv_pads(in_shape[2:], layer.kernel, strides, dilations, a.get("pads"), auto_pad)
    return ConvGeometry(layer.in_channels, layer.out_channels, tuple(layer.kernel), strides, tuple(pads),
                        dilations, layer.group, int(in_shape[2]), int(in_shape[3]))


def option_ranks(layer: ConvLayer) -> List[int]:
    """Ranks worth considering: below full rank, where the decomposition is exact."""
    return list(range(1, max_rank(layer.weight.shape, layer.group)))


def _fastest_form(layer: ConvLayer, geo: ConvGeometry, k: int, runner: Runner, threads: int,
                  cache: Optional[LatencyCache], method: str) -> tuple:
    """(form, ms) of the layer's fastest form at rank k; for method "channel", rank k stands for
    c' = channels_for_rank(k), timed as that baseline writes it."""
    if method == "channel":
        channels = channels_for_rank(layer.out_channels, layer.in_channels, layer.kernel, k)
        return "channel", layer_latency(geo, "channel", rank=channels, threads=threads, runner=runner, cache=cache)
    forms = {resolve_graph_form(f, k, layer.group) for f in (FORMS if layer.group == 1 else GROUPED_FORMS)}
    timed = {f: layer_latency(geo, f, rank=k, threads=threads, runner=runner, cache=cache) for f in sorted(forms)}
    form = min(timed, key=timed.get)
    return form, timed[form]


def time_options(layer: ConvLayer, geo: ConvGeometry, runner: Runner, threads: int,
                 cache: Optional[LatencyCache], method: str = "refit") -> tuple:
    """(keep_ms, {rank: (fastest form, ms)} for the ranks at least MIN_GAIN faster than the
    original, (form, ms) at rank 1 whether faster or not)."""
    keep_ms = layer_latency(geo, "original", threads=threads, runner=runner, cache=cache)
    rank_one = _fastest_form(layer, geo, 1, runner, threads, cache, method)
    times = {}
    for k in option_ranks(layer):
        form, ms = rank_one if k == 1 else _fastest_form(layer, geo, k, runner, threads, cache, method)
        if ms > (1 - MIN_GAIN) * keep_ms:
            break  # higher ranks only cost more
        times[k] = (form, ms)
    return keep_ms, times, rank_one


def option_weights(layer: ConvLayer, method: str, ranks: Sequence[int], fit: Optional[LayerStats]
                   ) -> Dict[int, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """The weight [n, c/G, kh, kw] and bias the method's fit computes at each rank (refit:
    its first stage, Algorithm 2; see module doc). Without fit statistics, or for nd: the
    data-free decoupling."""
    w = layer.weight
    weights = {}
    for k in ranks:
        if fit is None or not fit.count or method == "nd":
            dec = network_decoupling(w, k, layer.group)
            weights[k] = reconstruct_weight(dec), (dec.bias if dec.bias is not None else layer.bias)
        elif method == "channel":
            ch = channel(w, fit, channels_for_rank(layer.out_channels, layer.in_channels, layer.kernel, k))
            weights[k] = (ch.second[:, :, 0, 0] @ ch.first.reshape(ch.channels, -1)).reshape(w.shape), ch.bias
        else:
            dec = dwd(w, fit, k) if method == "dwd" else dwd_comp(w, fit, k)
            weights[k] = reconstruct_weight(dec), (dec.bias if dec.bias is not None else layer.bias)
    return weights


def option_errors(layer: ConvLayer, weights: Mapping[int, Tuple[np.ndarray, Optional[np.ndarray]]],
                  scored: Optional[Mapping[int, ResidualSums]] = None) -> Dict[int, float]:
    """Estimated relative output error of the layer at each rank of weights
    (option_weights): measured on data (scored: each rank's ResidualSums) where there
    was any, else the weight's own relative error."""
    errors = {}
    for k, (rebuilt, _) in weights.items():
        if scored is not None and scored[k].count:
            errors[k] = scored[k].relative_error()
        else:
            w = layer.weight
            errors[k] = float(np.linalg.norm(rebuilt - w) / max(np.linalg.norm(w), 1e-30))
    return errors


def decide(options: Sequence[LayerOptions], *, conv_ms: Optional[float] = None,
           error_proxy: Optional[float] = None, runtime: str = "the runtime") -> Dict[str, Decision]:
    """Solve the budget (total conv ms, or sum of squared layer errors) into a Decision per layer."""
    choices = [o.choices() for o in options]
    result: Plan = solve(choices, target_ms=conv_ms, max_error_proxy=error_proxy)
    decisions = {}
    for o, c in zip(options, choices):
        picked = result.choice[c.name]
        if picked is not None:
            decisions[o.name] = Decision(picked.rank, picked.form, None, o.keep_ms, picked.ms, picked.error)
        else:
            reason = (f"no decomposed form is at least {MIN_GAIN:.0%} faster on {runtime}" if not o.times
                      else "keeping it fits the budget better")
            decisions[o.name] = Decision(None, None, reason, o.keep_ms, o.keep_ms, 0.0)
    return decisions


def fastest(options: Sequence[LayerOptions], runtime: str = "the runtime") -> Dict[str, Decision]:
    """Every layer at its fastest option (the most a time budget can get)."""
    return decide(options, conv_ms=1e-9, runtime=runtime)  # unreachable: the solver returns the fastest


def every_layer_at_rank_one(options: Sequence[LayerOptions]) -> Dict[str, Decision]:
    """Rank 1 wherever it is faster alone at all (not only by MIN_GAIN): close to what --rank 1
    builds. In a whole model small gains can add up where the fastest plan keeps such layers,
    so a time target that the fastest plan misses also tries this one."""
    decisions = {}
    for o in options:
        if o.rank_one is None or o.rank_one[1] >= o.keep_ms:
            decisions[o.name] = Decision(None, None, "no decomposed form is faster", o.keep_ms, o.keep_ms, 0.0)
        else:
            form, ms = o.rank_one
            decisions[o.name] = Decision(1, form, None, o.keep_ms, ms, o.errors.get(1, float("nan")))
    return decisions


def predicted_ms(decisions: Mapping[str, Decision]) -> float:
    """Sum of the chosen layer times."""
    return sum(d.ms for d in decisions.values())

