"""Original vs optimized on the same inputs: per-output error, agreement, accuracy."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .runtimes import run_batches

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


class Comparison:
    """The metrics of compare_models, summed one feed at a time so that memory does not
    grow with the number of held-out inputs."""

    def __init__(self, names: Sequence[str], labels: Optional[np.ndarray] = None):
        self.names = list(names)
        self.labels = labels
        self.sums = {n: np.zeros(4) for n in self.names}  # |a|^2, |b|^2, a.b, |a-b|^2
        self.max_abs = {n: 0.0 for n in self.names}
        self.samples = 0
        self.classifier: Optional[int] = None
        self.top1: List[np.ndarray] = []  # [2, N] per feed: reference and candidate classes

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> None:
        """One feed's outputs (in names order) from both models."""
        if self.samples == 0:
            self.classifier = classifier_output(list(reference))
        self.samples += int(reference[0].shape[0]) if reference[0].ndim else 1
        for name, ref, cand in zip(self.names, reference, candidate):
            a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
            diff = a - b
            self.sums[name] += (a @ a, b @ b, a @ b, diff @ diff)
            if diff.size:
                self.max_abs[name] = max(self.max_abs[name], float(np.abs(diff).max()))
        if self.classifier is not None:
            i = self.classifier
            self.top1.append(np.stack([reference[i].argmax(axis=1), candidate[i].argmax(axis=1)]))

    def result(self) -> Dict:
        """{"samples", "outputs": {name: rel_error, max_abs_error, cosine, sqnr_db}, and for
        classifiers "top1_agreement" (with labels "accuracy_before" / "accuracy_after")}."""
        outputs = {}
        for name in self.names:
            aa, bb, ab, dd = self.sums[name]
            na, nb, nd = math.sqrt(aa), math.sqrt(bb), math.sqrt(max(dd, 0.0))
            outputs[name] = {
                "rel_error": nd / na if na > 0 else float(nd > 0),
                "max_abs_error": self.max_abs[name],
                "cosine": ab / (na * nb) if na > 0 and nb > 0 else float(na == nb),
                "sqnr_db": 20 * math.log10(na / nd) if nd > 0 and na > 0 else math.inf,
            }
        result: Dict = {"samples": self.samples, "outputs": outputs}
        if self.classifier is not None:
            ref_top1, cand_top1 = np.concatenate(self.top1, axis=1) if self.top1 else np.zeros((2, 0), int)
            result["classifier_output"] = self.names[self.classifier]
            result["top1_agreement"] = float(np.mean(ref_top1 == cand_top1))
            if self.labels is not None and len(self.labels) == len(ref_top1):
                result["accuracy_before"] = float(np.mean(ref_top1 == self.labels))
                result["accuracy_after"] = float(np.mean(cand_top1 == self.labels))
        return result


def compare_models(reference, candidate, feeds: Iterable[Dict[str, np.ndarray]], names: Sequence[str],
                   labels: Optional[np.ndarray] = None, what: Tuple[str, str] = ("model", "model")) -> Dict:
    """Run two onnxruntime sessions on every feed and compare their outputs (Comparison.result)."""
    comparison = Comparison(names, labels)
    for feed in feeds:
        (ref,) = run_batches(reference, [feed], names, what=what[0])
        (cand,) = run_batches(candidate, [feed], names, what=what[1])
        comparison.add(ref, cand)
    return comparison.result()
