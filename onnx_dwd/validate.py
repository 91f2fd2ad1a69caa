"""Original vs optimized on the same inputs: per-output error, agreement, accuracy."""

from __future__ import annotations

import math
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .background import lowest_priority
from .runtimes import make_session, run_batches
from .spill import FileWriter, RawArray

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
    reference: a session, or a BackgroundReference or RecordedReference: the feeds it holds
    are read back, the rest run here."""
    comparison = Comparison(names, labels)
    recorded: List[List[RawArray]] = []
    model = None
    if isinstance(reference, _FeedOutputs):
        recorded, model, reference = reference.recorded(), reference.model, None
    count = 0
    for count, feed in enumerate(feeds, 1):
        if count <= len(recorded):
            ref = [f.load() for f in recorded[count - 1]]
        else:
            if reference is None:
                reference = make_session(model, what=what[0])
            (ref,) = run_batches(reference, [feed], names, what=what[0])
        (cand,) = run_batches(candidate, [feed], names, what=what[1])
        comparison.add(ref, cand)
    if count < len(recorded):
        raise RuntimeError(f"internal: the reference ran {len(recorded)} feeds, validation has {count}")
    return comparison.result()


#: Bytes of outputs a BackgroundReference or RecordedReference keeps on disk; validation runs the
#: original on the rest.
MAX_RECORDED_BYTES = 2**30


class _FeedOutputs:
    """The original's outputs per validation feed, in raw files of a folder of their own, in
    feed order (compare_models reads them back); a context manager that deletes them."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]):
        self.model = model
        self.names = list(names)
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-dwd-validation-")
        self._saved: List[List[RawArray]] = []  # a feed's files join once all are written (or queued)
        self._bytes = 0

    @property
    def full(self) -> bool:
        return self._bytes >= MAX_RECORDED_BYTES

    def _keep(self, outputs: Sequence[np.ndarray], write: Callable[[RawArray, np.ndarray], None]) -> None:
        """The next feed's outputs, in the order of names, each written by write(file, value)."""
        index = len(self._saved)
        files = [RawArray.of(o, Path(self._dir.name) / f"{index:07d}-{k:03d}.bin") for k, o in enumerate(outputs)]
        for f, o in zip(files, outputs):
            write(f, o)
        self._saved.append(files)
        self._bytes += sum(o.nbytes for o in outputs)

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BackgroundReference(_FeedOutputs):
    """The original model's outputs on the validation feeds, computed while the optimizer works.

    Once the feeds are ready (`ready`: a cached part's first whole pass has
    saved them, so reading them from another thread only reads files), a
    thread at the lowest CPU priority (Linux: a thread's own nice value) runs
    the model on one onnxruntime thread and keeps each output in a raw file.
    It takes the cores where the calibrated fit leaves them idle (its level
    passes use about 1.5 of 2); validation then runs the original only on
    the feeds the thread did not reach (YOLOv8n, 204 held-out images: about
    2 s of a 1024-image run). The thread stops at validation (after its
    current feed), at MAX_RECORDED_BYTES, and at any error: validation runs
    the rest itself, and meets a real error there. Not for runs that time
    models while it may run (the budgeted choice), nor for a compensated fit,
    whose own pass records the outputs (RecordedReference). Its Python-level work holds
    the GIL at nice 19, which could stall the fit briefly on a busy machine;
    measured, the run is faster (RESULTS §5, run 9). One onnxruntime thread's
    outputs can differ from a two-thread run in float rounding (YOLOv8n:
    output rel_error 0.0697004142 against 0.0697004049).
    """

    def __init__(self, model: onnx.ModelProto, feeds: Callable[[], Iterable[Dict[str, np.ndarray]]],
                 ready: threading.Event, names: Sequence[str], what: str = "model"):
        super().__init__(model, names)
        self.what = what
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(feeds, ready), name="onnx-dwd-reference",
                                        daemon=True)
        self._thread.start()

    def _run(self, feeds, ready: threading.Event) -> None:
        while not ready.wait(0.1):
            if self._hurry.is_set():
                return
        try:
            lowest_priority()  # where threads have no nice value of their own: normal priority
            session = make_session(self.model, threads=1, what=self.what)
            for feed in feeds():
                if self._hurry.is_set() or self.full:
                    return
                (outs,) = run_batches(session, [feed], self.names, what=self.what)
                self._keep(outs, RawArray.write)
        except Exception:  # noqa: BLE001 - validation runs the feeds not recorded, and meets any real error
            return

    def recorded(self) -> List[List[RawArray]]:
        """Stop the thread (after its current feed); the files of the feeds it ran, in order."""
        self._hurry.set()
        self._thread.join()
        return list(self._saved)

    def close(self) -> None:
        self._hurry.set()
        self._thread.join()
        super().close()


class RecordedReference(_FeedOutputs):
    """The original model's outputs on the validation feeds, recorded by a pass that runs the
    model over them anyway: inter-layer compensation's pass over the held-out part adds the
    graph outputs to the layer outputs it samples and hands them to record(). A
    BackgroundReference ran the original a second time over the same images instead
    (YOLOv8n, 1024 images, side by side: CPU median 110.1 -> 101.0 s, wall 63.3 -> 60.4 s;
    benchmarks/RESULTS.md section 5, run 18). That pass runs the prepared model (affine
    nodes folded into convs, extra outputs), which computes the same function and can
    differ from a plain session of the original in float rounding (YOLOv8n, 64 and 1024
    images: the same validation to every digit). The files are written in a thread of
    their own, beside the pass. Feeds past MAX_RECORDED_BYTES, or all of them if no pass
    ran, are run by validation itself.
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]):
        super().__init__(model, names)
        self._writer = FileWriter(depth=1)  # each pending write holds its outputs (YOLOv8n: 5.6 MB a batch)

    def record(self, outputs: Sequence[np.ndarray]) -> None:
        """Keep the next feed's outputs (in the order of names), while under MAX_RECORDED_BYTES."""
        if not self.full:  # the count only grows: no feed is kept after one that was not
            self._keep(outputs, lambda file, value: self._writer.submit(file.write, value))

    def recorded(self) -> List[List[RawArray]]:
        """The files of the feeds recorded, in order (once every write is done)."""
        self._writer.wait()
        return list(self._saved)

    def close(self) -> None:
        self._writer.close()
        super().close()
