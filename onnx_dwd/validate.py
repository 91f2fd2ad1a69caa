"""Original vs optimized on the same inputs: per-output error, agreement, accuracy."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

#: Relative output error below which a full-rank decomposition counts as exact.
EXACT_REL_ERROR = 1e-5


def agreement(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """rel_error = |a-b|/|a|, max_abs_error, cosine and SQNR (dB) of candidate vs reference."""
    a = reference.astype(np.float64).ravel()
    b = candidate.astype(np.float64).ravel()
    diff = a - b
    na, nb, nd = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(diff)
    return {
        "rel_error": float(nd / na) if na > 0 else float(nd > 0),
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "cosine": float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb),
        "sqnr_db": float(20 * math.log10(na / nd)) if nd > 0 and na > 0 else math.inf,
    }


def classifier_output(outputs: List[np.ndarray]) -> Optional[int]:
    """Index of the first output shaped [N, classes] (classes > 1), if any."""
    for i, arr in enumerate(outputs):
        if arr.ndim == 2 and arr.shape[1] > 1:
            return i
    return None


def compare_runs(names: Sequence[str], reference: List[List[np.ndarray]], candidate: List[List[np.ndarray]],
                 labels: Optional[np.ndarray] = None) -> Dict:
    """Metrics over all feeds. reference/candidate: per feed, outputs in names order.

    Returns {"samples", "outputs": {name: agreement}, and for classifiers
    "top1_agreement" (and with labels "accuracy_before"/"accuracy_after")}.
    """
    joined_ref = [np.concatenate([r[i].reshape(-1) for r in reference]) for i in range(len(names))]
    joined_cand = [np.concatenate([c[i].reshape(-1) for c in candidate]) for i in range(len(names))]
    result: Dict = {"samples": int(sum(r[0].shape[0] if r[0].ndim else 1 for r in reference)),
                    "outputs": {n: agreement(a, b) for n, a, b in zip(names, joined_ref, joined_cand)}}
    cls = classifier_output(reference[0])
    if cls is not None:
        ref_top1 = np.concatenate([r[cls].argmax(axis=1) for r in reference])
        cand_top1 = np.concatenate([c[cls].argmax(axis=1) for c in candidate])
        result["classifier_output"] = names[cls]
        result["top1_agreement"] = float(np.mean(ref_top1 == cand_top1))
        if labels is not None and len(labels) == len(ref_top1):
            result["accuracy_before"] = float(np.mean(ref_top1 == labels))
            result["accuracy_after"] = float(np.mean(cand_top1 == labels))
    return result
