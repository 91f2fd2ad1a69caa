"""Original vs optimized on the same inputs: per-output error, agreement, accuracy."""

from __future__ import annotations

import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .runtimes import make_session, run_batches
from .spill import RawArray

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
    """Run two onnxruntime sessions on every feed and compare their outputs (Comparison.result).
    reference: a session, or a BackgroundReference that ran it on the same feeds already."""
    comparison = Comparison(names, labels)
    recorded = None
    if isinstance(reference, BackgroundReference):
        recorded = reference.outputs()
        if recorded is None:  # it never started: run the original here
            reference = make_session(reference.model, what=what[0])
    for feed in feeds:
        if recorded is not None:
            ref = next(recorded, None)
            if ref is None:
                raise RuntimeError("internal: the background reference ran fewer feeds than the validation")
        else:
            (ref,) = run_batches(reference, [feed], names, what=what[0])
        (cand,) = run_batches(candidate, [feed], names, what=what[1])
        comparison.add(ref, cand)
    if recorded is not None and next(recorded, None) is not None:
        raise RuntimeError("internal: the background reference ran more feeds than the validation")
    return comparison.result()


class BackgroundReference:
    """The original model's outputs on the validation feeds, computed while the optimizer works.

    Once the feeds are ready (`ready`: a cached part's first whole pass has
    saved them, so reading them from another thread only reads files), a
    thread at the lowest CPU priority (Linux: a thread's own nice value) runs
    the model on one onnxruntime thread and keeps each output in a raw file.
    It takes the cores where the calibrated fit leaves them idle (its level
    passes use about 1.5 of 2); validation then runs only the optimized model
    (YOLOv8n, 204 held-out images: about 2 s of a 1024-image run). If the
    feeds were not ready by validation, it never starts and validation runs
    the original itself. One onnxruntime thread's outputs can differ from a
    two-thread run in float rounding (YOLOv8n: output rel_error 0.0697004142
    against 0.0697004049).
    """

    def __init__(self, model: onnx.ModelProto, feeds: Callable[[], Iterable[Dict[str, np.ndarray]]],
                 ready: threading.Event, names: Sequence[str], what: str = "model"):
        self.model = model
        self.names = list(names)
        self.what = what
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-dwd-validation-")
        self._saved: List[List[RawArray]] = []
        self._error: Optional[BaseException] = None
        self._started = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(feeds, ready), name="onnx-dwd-reference",
                                        daemon=True)
        self._thread.start()

    def _run(self, feeds, ready: threading.Event) -> None:
        while not ready.wait(0.1):
            if self._stop.is_set():
                return
        with self._lock:  # outputs() either sees it started or stops it before it starts
            if self._stop.is_set():
                return
            self._started = True
        try:
            try:  # best effort: where threads have no nice value of their own this runs at normal priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            session = make_session(self.model, threads=1, what=self.what)
            root = Path(self._dir.name)
            for index, feed in enumerate(feeds()):
                if self._stop.is_set():
                    return
                (outs,) = run_batches(session, [feed], self.names, what=self.what)
                files = [RawArray.of(o, root / f"{index:07d}-{k:03d}.bin") for k, o in enumerate(outs)]
                for f, o in zip(files, outs):
                    f.write(o)
                self._saved.append(files)
        except BaseException as exc:  # raised in the caller's thread by outputs()
            self._error = exc

    def outputs(self) -> Optional[Iterator[List[np.ndarray]]]:
        """Each feed's outputs (in names order) once the thread has finished; None if the
        feeds were not ready yet (the thread then stops without running)."""
        with self._lock:
            if not self._started:
                self._stop.set()  # still waiting for the feeds: give up
        self._thread.join()
        if not self._started:
            return None
        if self._error is not None:
            raise self._error
        return (self._load(files) for files in self._saved)

    @staticmethod
    def _load(files: List[RawArray]) -> List[np.ndarray]:
        return [f.load() for f in files]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._dir.cleanup()

    def __enter__(self) -> "BackgroundReference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
