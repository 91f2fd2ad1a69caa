"""Choosing per layer between keeping the conv and each decomposed option, under a budget.

Pure functions on tables: per layer, the time of the original conv and, per
option (rank K in some graph form), its time and its error. A multiple-choice
knapsack, solved by dynamic programming over the layers on a budget split
into BINS steps (exact up to that discretisation; a returned plan that meets
its budget is checked on the true totals). Options that are not
faster than keeping the layer are never chosen, nor options that another
option of the same layer beats on both time and error.

Errors add up across layers as squared relative errors (independent errors);
how that proxy maps to the model's output error is checked by validating the
whole model afterwards (the caller's loop).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run a layer: a label (e.g. "rank 2"), its time and its relative error;
    rank and graph form say how to build it."""

    label: str
    ms: float
    error: float
    rank: Optional[int] = None
    form: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class LayerChoices:
    """A layer: its name, the time of the original conv, and the decomposed options."""

    name: str
    keep_ms: float
    options: Sequence[Option]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen option per layer (None = keep), with the totals the budget was judged on."""

    choice: Dict[str, Optional[Option]]
    ms: float
    keep_ms: float
    error_proxy: float  # sum over layers of squared relative errors

    @property
    def saved_ms(self) -> float:
        return self.keep_ms - self.ms


def useful_options(layer: LayerChoices) -> List[Option]:
    """The options worth considering: faster than keeping the layer and not beaten by another
    option on both time and error (the Pareto front), fastest first."""
    faster = sorted((o for o in layer.options if o.ms < layer.keep_ms), key=lambda o: (o.ms, o.error))
    front: List[Option] = []  # strictly less error as time grows
    for o in faster:
        if not front or o.error < front[-1].error:
            front.append(o)
    return front


#: Resolution of the dynamic program: the budget is split into this many steps.
BINS = 4000


def _solve(tables: List[List[Tuple[float, float, Optional[Option]]]], budget: float, spend,
           round_up: bool = False) -> List[int]:
    """Multiple-choice knapsack by dynamic programming.

    tables: per layer, candidates (ms, squared error, option). spend(candidate)
    is what the budget limits (ms or squared error); the other one is minimised.
    Costs are rounded down to multiples of budget / BINS, so no plan that fits
    is excluded; the caller checks the true total. With round_up, every plan
    found fits for sure (some that fit may be missed). Returns the chosen index
    per layer, or [] if nothing fits.
    """
    unit = budget / BINS
    best = np.full(BINS + 1, np.inf)  # best[b]: least objective with at most b units spent
    best[0] = 0.0
    best = np.minimum.accumulate(best)
    choices = []
    for table in tables:
        new = np.full(BINS + 1, np.inf)
        pick = np.full(BINS + 1, -1)
        for j, cand in enumerate(table):
            units = spend(cand) / unit if unit > 0 else (0 if spend(cand) == 0 else BINS + 1)
            cost = int(np.ceil(units - 1e-9)) if round_up else int(units)
            if cost > BINS:
                continue
            gain = cand[1] if spend is _ms else cand[0]
            shifted = np.full(BINS + 1, np.inf)
            shifted[cost:] = best[:BINS + 1 - cost] + gain
            better = shifted < new
            new[better], pick[better] = shifted[better], j
        best = new
        choices.append(pick)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return []
    picked = []
    for table, pick in zip(reversed(tables), reversed(choices)):  # walk back
        j = int(pick[end])
        picked.append(j)
        units = spend(table[j]) / unit if unit > 0 else 0
        end -= int(np.ceil(units - 1e-9)) if round_up else int(units)
    return list(reversed(picked))


def _ms(cand) -> float:
    return cand[0]


def _err(cand) -> float:
    return cand[1]


def plan(layers: Sequence[LayerChoices], *, target_ms: Optional[float] = None,
         max_error_proxy: Optional[float] = None) -> Plan:
    """Least-error plan whose total layer time is <= target_ms, or the fastest plan whose
    error proxy is <= max_error_proxy (exactly one budget). A target that cannot be met
    returns the fastest plan the options allow; the caller compares Plan.ms with its target."""
    if (target_ms is None) == (max_error_proxy is None):
        raise ValueError("give exactly one of target_ms and max_error_proxy")
    tables = [[(l.keep_ms, 0.0, None)] + [(o.ms, o.error ** 2, o) for o in useful_options(l)] for l in layers]
    keep_total = sum(l.keep_ms for l in layers)
    limit, spend = (target_ms, _ms) if target_ms is not None else (max_error_proxy, _err)
    budget, picked = limit, []
    for _ in range(8):  # rounding down may overshoot the true budget by < layers/BINS of it: tighten
        picked = _solve(tables, budget, spend) if budget > 0 or spend is _err else []
        if not picked or sum(spend(t[j]) for t, j in zip(tables, picked)) <= limit * (1 + 1e-12):
            break
        budget -= sum(spend(t[j]) for t, j in zip(tables, picked)) - limit
    else:  # still over after tightening: solve with costs rounded up, which always fits
        picked = _solve(tables, limit, spend, round_up=True) if limit > 0 or spend is _err else []
    if not picked:  # nothing fits: the fastest plan allowed (time budget) or keep everything (error budget)
        picked = [min(range(len(t)), key=lambda j: t[j][0]) if spend is _ms else 0 for t in tables]
    chosen = [t[j] for t, j in zip(tables, picked)]
    return Plan({l.name: c[2] for l, c in zip(layers, chosen)}, sum(c[0] for c in chosen), keep_total,
                sum(c[1] for c in chosen))
