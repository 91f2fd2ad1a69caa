"""onnxruntime sessions with explicit threads and optimisation level."""

from __future__ import annotations

import os
import time
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ModelError

LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


def make_session(model: ModelSource, *, threads: Optional[int] = None, level: str = "all",
                 what: str = "model", spin: bool = True) -> ort.InferenceSession:
    """A CPU session; a model onnxruntime refuses raises ModelError naming `what`.
    spin=False: its idle intra-op threads sleep instead of spinning, for a session that
    shares the cores with other work of ours (onnxruntime's default spins)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise ModelError(f"{what}: onnxruntime cannot load it: {str(exc).strip().splitlines()[0]}") from None


def run_batches(session: ort.InferenceSession, feeds: Iterable[Dict[str, np.ndarray]],
                output_names: Optional[Sequence[str]] = None, what: str = "model") -> List[List[np.ndarray]]:
    """Run every feed dict; returns, per feed, the outputs in output_names order."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        try:
            results.append(session.run(names, feed))
        except Exception as exc:
            raise ModelError(f"{what}: onnxruntime failed to run it: {str(exc).strip().splitlines()[0]}") from None
    return results


def calls_per_block(run, seconds: float) -> int:
    """How many calls of run() fill a timing block of about `seconds` (at least 1)."""
    started = time.perf_counter()
    run()
    return max(1, int(seconds / max(time.perf_counter() - started, 1e-6)))
