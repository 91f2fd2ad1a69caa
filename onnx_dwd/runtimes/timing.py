"""Side-by-side timing of callables: the one way onnx-dwd measures latency.

On a shared machine only ratios measured together hold, so the runs go in
interleaved blocks (order alternating), each block long enough to time
reliably, after a warm-up; the first block is discarded.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .ort import calls_per_block


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def interleaved_ms(runs: Mapping[str, Callable[[], object]], blocks: int, warmup: int = 3,
                   block_seconds: float = 0.05) -> Tuple[Dict[str, List[float]], Dict[str, int]]:
    """ms per call of each run in each of `blocks` interleaved blocks (after `warmup` calls
    and one discarded block), and the calls per block."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    calls = {k: calls_per_block(run, block_seconds) for k, run in runs.items()}
    names = list(runs)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for block in range(blocks + 1):
        for k in (names if block % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            for _ in range(calls[k]):
                runs[k]()
            if block:  # the first block is warm-up too
                times[k].append((time.perf_counter() - started) / calls[k] * 1e3)
    return times, calls


def side_by_side(times: Mapping[str, Sequence[float]]) -> Dict:
    """Medians and interquartile ranges of times["before"] and times["after"], and the
    speed-up as the median of the per-block ratios."""
    b, a = quartiles(times["before"]), quartiles(times["after"])
    r = quartiles([x / y for x, y in zip(times["before"], times["after"])])
    return {"before_ms": b[1], "after_ms": a[1], "before_iqr_ms": [b[0], b[2]], "after_iqr_ms": [a[0], a[2]],
            "speedup": r[1], "speedup_iqr": [r[0], r[2]]}


def compare(before: Callable[[], object], after: Callable[[], object], blocks: int = 20,
            block_seconds: float = 0.05) -> Dict:
    """Medians with interquartile ranges of both, and the speed-up as the median per-block ratio."""
    times, _ = interleaved_ms({"before": before, "after": after}, blocks, block_seconds=block_seconds)
    return {**side_by_side(times), "blocks": blocks}
