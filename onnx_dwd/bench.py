"""Whole-model latency and numerics of two models on each runtime: `onnx-dwd bench`.

For every runtime asked for (runtimes/base.py: ort, litert, ncnn, mnn,
openvino) both models are converted and loaded at each thread count, their
outputs are checked against onnxruntime's on the same input (the model's
function must survive the conversion: max abs and relative error, within
MATCH_REL_TOL), and then they are timed. On a shared machine only ratios
measured together hold, so the two models run in interleaved blocks (order
alternating), each block long enough to time reliably, after a warm-up; the
first block is discarded. Reported per runtime and thread count: median ms per
inference of each model with the interquartile range over blocks, and the
speed-up as the median of the per-block ratios.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .calib import random_feeds, resolve_input_specs
from .errors import DwdError, OptionError
from .modelio import load_model
from .runtimes.base import Runner, get_runner, reference_outputs, with_static_inputs
from .runtimes.timing import interleaved_ms, side_by_side
from .validate import agreement

#: Target length of one timed block (each model runs this long per block).
BLOCK_SECONDS = 0.05

#: A runtime's outputs match onnxruntime's when every output's relative error
#: |a - b| / |a| is within this.
MATCH_REL_TOL = 1e-3


def _match(reference: List[np.ndarray], outputs: List[np.ndarray]) -> Dict[str, float]:
    """Worst relative and max abs error over the outputs, vs onnxruntime's."""
    if len(reference) != len(outputs):
        return {"rel_error": float("inf"), "max_abs_error": float("inf")}
    worst = {"rel_error": 0.0, "max_abs_error": 0.0}
    for ref, out in zip(reference, outputs):
        if ref.shape != out.shape:
            return {"rel_error": float("inf"), "max_abs_error": float("inf")}
        a = agreement(ref, out)
        worst = {k: max(worst[k], a[k]) for k in worst}
    return worst


def bench(before: os.PathLike, after: os.PathLike, *, runtimes: Sequence[Union[str, Runner]] = ("ort",),
          threads: Sequence[int] = (1,), level: str = "all",
          input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None, blocks: int = 20, warmup: int = 3,
          seed: int = 0, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Check and time `before` and `after` on each runtime; returns the result dict (see module doc).

    runtimes: names (runtimes/base.py) or Runner objects. A runtime that is
    not installed raises OptionError before anything runs; a model that one
    runtime cannot convert or run gives that runtime's rows an "error" and the
    others go on. `level` is onnxruntime's optimisation level
    for the "ort" rows; `log` (if given) hears what is being done.
    """
    if blocks < 2:
        raise OptionError(f"--blocks must be at least 2, got {blocks}")
    if any(t < 1 for t in threads):
        raise OptionError(f"--threads must be positive, got {list(threads)}")
    log = log or (lambda message: None)
    # names fail here, before anything runs, if a runtime is missing
    runners = [r if isinstance(r, Runner) else get_runner(r, level) for r in runtimes]
    paths = {"before": before, "after": after}
    models = {k: load_model(p) for k, p in paths.items()}
    specs = resolve_input_specs(models["before"], input_shapes or {}, str(before))
    after_inputs = {i.name for i in models["after"].graph.input} - {t.name for t in models["after"].graph.initializer}
    if after_inputs != {s.name for s in specs}:
        raise OptionError(f"{after}: inputs {sorted(after_inputs)} differ from {before}'s "
                          f"{sorted(s.name for s in specs)}; bench compares two versions of one model")
    shapes = {s.name: s.shape for s in specs}
    static = {k: with_static_inputs(m, shapes) for k, m in models.items()}
    (feed,) = random_feeds(specs, 1, seed)
    reference = {k: reference_outputs(m, feed, str(paths[k])) for k, m in static.items()}
    rows: List[Dict] = []
    for runner in runners:
        for n_threads in threads:
            row: Dict = {"runtime": runner.name, "description": runner.describe(), "threads": n_threads}
            rows.append(row)
            try:
                log(f"{runner.name}, {n_threads} thread(s): converting and loading both models")
                loaded = {k: runner.load(m, n_threads, what=str(paths[k])) for k, m in static.items()}
                outputs = {k: lm.run(feed) for k, lm in loaded.items()}
            except DwdError as exc:
                row["error"] = str(exc)
                log(f"{runner.name}: {exc}")
                continue
            row["match"] = {k: _match(reference[k], outputs[k]) for k in loaded}
            row["match_ok"] = all(m["rel_error"] <= MATCH_REL_TOL for m in row["match"].values())
            log(f"{runner.name}, {n_threads} thread(s): timing")
            times, calls = interleaved_ms({k: lm.bind(feed) for k, lm in loaded.items()}, blocks, warmup,
                                          BLOCK_SECONDS)
            pairs = list(zip(outputs["before"], outputs["after"]))
            row.update({
                **side_by_side(times), "blocks": blocks, "calls_per_block": calls,
                "output_rel_error": max((agreement(b, a)["rel_error"] for b, a in pairs if b.shape == a.shape),
                                        default=float("nan"))})
    return {"before": str(before), "after": str(after), "input_shapes": {k: list(v) for k, v in shapes.items()},
            "seed": seed, "level": level, "match_rel_tol": MATCH_REL_TOL, "rows": rows,
            "errors": [f"{r['runtime']} ({r['threads']} thread(s)): {r['error']}" for r in rows if "error" in r]}


def render(result: Dict) -> str:
    """The result as a table: one row per runtime and thread count."""
    def cell(median, iqr, unit=""):
        return f"{median:.3f}{unit} [{iqr[0]:.3f}-{iqr[1]:.3f}]"
    header = ["runtime", "threads", "before ms", "after ms", "speed-up", "numeric match (rel. err.)",
              "before vs after"]
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["runtime"], str(r["threads"]), "-", "-", "-", "failed: see below", "-"])
            continue
        worst = max(m["rel_error"] for m in r["match"].values())
        rows.append([r["runtime"], str(r["threads"]), cell(r["before_ms"], r["before_iqr_ms"]),
                     cell(r["after_ms"], r["after_iqr_ms"]), cell(r["speedup"], r["speedup_iqr"], "x"),
                     f"{'ok' if r['match_ok'] else 'NO'} {worst:.1e}", f"{r['output_rel_error']:.3g}"])
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    lines = ["input " + ", ".join(f"{k} {v}" for k, v in result["input_shapes"].items())]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header] + rows]
    described = dict.fromkeys(f"{r['runtime']}: {r['description']}" for r in result["rows"])
    lines.append("runtimes: " + "; ".join(described))
    timed = [r for r in result["rows"] if "error" not in r]
    if timed:
        lines.append(f"medians over {timed[0]['blocks']} interleaved blocks after warm-up; [..] = interquartile "
                     "range over blocks; speed-up = median of the per-block ratios")
    lines.append(f"numeric match: worst relative error of either model's outputs vs onnxruntime's on the same "
                 f"input (ok within {result['match_rel_tol']:g}); before vs after: relative error of the "
                 "optimized model's outputs on that runtime")
    lines += [f"error: {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"
