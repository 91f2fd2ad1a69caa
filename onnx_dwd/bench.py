"""Whole-model latency of two models, measured side by side: `onnx-dwd bench`.

On a shared machine only ratios measured together hold, so the two models run
in interleaved blocks (order alternating), each block long enough to time
reliably, after a warm-up; the first block is discarded. Reported per thread
count: median ms per inference of each model with the interquartile range over
blocks, and the speed-up as the median of the per-block ratios.
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .calib import random_feeds, resolve_input_specs
from .errors import OptionError
from .modelio import load_model
from .runtimes import make_session
from .runtimes.ort import calls_per_block
from .validate import agreement

#: Target length of one timed block (each model runs this long per block).
BLOCK_SECONDS = 0.05


def _quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def bench(before: os.PathLike, after: os.PathLike, *, threads: Sequence[int] = (1,), level: str = "all",
          input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None, blocks: int = 20, warmup: int = 3,
          seed: int = 0) -> Dict:
    """Time `before` and `after` on the same random input; returns the result dict (see module doc)."""
    if blocks < 2:
        raise OptionError(f"--blocks must be at least 2, got {blocks}")
    if any(t < 1 for t in threads):
        raise OptionError(f"--threads must be positive, got {list(threads)}")
    models = {"before": load_model(before), "after": load_model(after)}
    specs = resolve_input_specs(models["before"], input_shapes or {}, str(before))
    after_inputs = {i.name for i in models["after"].graph.input} - {t.name for t in models["after"].graph.initializer}
    if after_inputs != {s.name for s in specs}:
        raise OptionError(f"{after}: inputs {sorted(after_inputs)} differ from {before}'s "
                          f"{sorted(s.name for s in specs)}; bench compares two versions of one model")
    (feed,) = random_feeds(specs, 1, seed)
    rows: List[Dict] = []
    for n_threads in threads:
        sessions = {k: make_session(m, threads=n_threads, level=level, what=str(p))
                    for (k, m), p in zip(models.items(), (before, after))}
        outputs = {k: s.run(None, feed) for k, s in sessions.items()}
        runs = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
        for _ in range(warmup):
            for run in runs.values():
                run()
        calls = {k: calls_per_block(run, BLOCK_SECONDS) for k, run in runs.items()}
        times: Dict[str, List[float]] = {"before": [], "after": []}
        for block in range(blocks + 1):
            order = ("before", "after") if block % 2 == 0 else ("after", "before")
            for k in order:
                started = time.perf_counter()
                for _ in range(calls[k]):
                    runs[k]()
                if block:  # the first block is warm-up too
                    times[k].append((time.perf_counter() - started) / calls[k] * 1e3)
        ratios = [b / a for b, a in zip(times["before"], times["after"])]
        stats = {k: _quartiles(v) for k, v in times.items()}
        r = _quartiles(ratios)
        max_err = max(agreement(o_b, o_a)["rel_error"] for o_b, o_a in zip(outputs["before"], outputs["after"]))
        rows.append({"threads": n_threads, "before_ms": stats["before"][1], "after_ms": stats["after"][1],
                     "before_iqr_ms": [stats["before"][0], stats["before"][2]],
                     "after_iqr_ms": [stats["after"][0], stats["after"][2]],
                     "speedup": r[1], "speedup_iqr": [r[0], r[2]], "blocks": blocks,
                     "calls_per_block": calls, "output_rel_error": max_err})
    return {"runtime": f"onnxruntime CPU, level {level}", "before": str(before), "after": str(after),
            "input_shapes": {s.name: list(s.shape) for s in specs}, "rows": rows}


def render(result: Dict) -> str:
    """The result as a table: one row per thread count."""
    def cell(median, iqr, unit=""):
        return f"{median:.3f}{unit} [{iqr[0]:.3f}-{iqr[1]:.3f}]"
    header = ["threads", "before ms", "after ms", "speed-up", "output rel. error"]
    rows = [[str(r["threads"]), cell(r["before_ms"], r["before_iqr_ms"]), cell(r["after_ms"], r["after_iqr_ms"]),
             cell(r["speedup"], r["speedup_iqr"], "x"), f"{r['output_rel_error']:.3g}"] for r in result["rows"]]
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    lines = [f"{result['runtime']}; input " + ", ".join(f"{k} {v}" for k, v in result["input_shapes"].items())]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header] + rows]
    lines.append(f"medians over {result['rows'][0]['blocks']} interleaved blocks after warm-up; "
                 "[..] = interquartile range over blocks; speed-up = median of the per-block ratios")
    return "\n".join(lines) + "\n"
