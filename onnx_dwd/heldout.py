"""Per-layer errors on the held-out data, measured while the later levels are fitted.

A layer's held-out error is its replacement's output against the original's
(ResidualSums), on the input that the model with every level up to its own
replaced computes; later levels replace only convs downstream of it, so the
finished model computes the same input. The layers are measured in a few
Lineage steps over the held-out data, each returning about
HELD_OUT_STEP_BYTES of layer inputs per image: a step per level cost a
session and a pass each (29 on YOLOv8n), one step for every layer raised the
peak of a 1024-image run by 120 MB (10 MB an image, two 8-image batches alive).

A step can run once its layers are fitted, so the steps but the last run in
a thread at the lowest CPU priority beside the later levels, in core time
the level passes and fits leave idle; finish() runs the rest itself. Where
the model takes any batch size, the steps run one image at a time, so the
thread adds one image's tensors to the level pass beside it, not a batch's
(YOLOv8n, 1024 images: batches of 8 raised the run's peak from 505 to 573 MB;
one image at a time it stayed at 494-518 MB). The last step runs in the
foreground after the last level, with no level pass beside it, so it runs the
batches whole again (its Lineage step joins the pieces): image by image it
took 1.27-2.04 s, whole 1.15-1.29 s.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import onnx

from .background import in_background, lowest_priority
from .capture import Capture, CaptureSpec, Sampled, input_names
from .fit.stats import ResidualSums
from .passes import Progress, consume, no_progress, paired
from .reference import ReferenceOutputs
from .segments import Lineage

#: Bytes per image of the layer inputs one held-out step returns (see the module docstring);
#: the steps past the first read the frontier from disk.
HELD_OUT_STEP_BYTES = 2 * 2**20


def steps_by_input_bytes(specs: List[CaptureSpec], entries: Dict[str, Dict], limit: int) -> List[List[CaptureSpec]]:
    """specs (in level order) in consecutive runs whose inputs take about limit bytes per
    image (float32, the size estimated from each conv's output shape and stride); one run
    when no output shapes are known."""
    chunks: List[List[CaptureSpec]] = []
    used = 0
    for spec in specs:
        shape = entries[spec.name]["output_shape"]
        if shape is None:
            return [list(specs)]
        size = 4 * spec.in_channels * shape[2] * spec.strides[0] * shape[3] * spec.strides[1]
        if not chunks or used + size > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(spec)
        used += size
    return chunks


class _Stopped(Exception):
    """close() asked the worker to stop at its next batch."""


def any_batch_size(model: onnx.ModelProto) -> bool:
    """Whether every graph input's first dimension is symbolic (or 1): the model runs on one
    image of a batch as well as on the batch."""
    constants = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in constants:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value != 1):
            return False
    return True


def _images(batch: Dict[str, np.ndarray]) -> int:
    """The batch's image count, when every array has it as its first dimension (else 1: the
    batch stays whole)."""
    sizes = {v.shape[0] if getattr(v, "ndim", 0) else None for v in batch.values()}
    if len(sizes) != 1 or None in sizes:
        return 1
    return max(sizes.pop(), 1)


class OneImageEach:
    """Feeds with each batch as one feed per image; `pieces` holds each batch's count of them
    (1: whole), known once the batch has been read."""

    def __init__(self, feeds: Callable[[], Iterable[Dict[str, np.ndarray]]]):
        self.feeds = feeds
        self.pieces: List[int] = []

    def __call__(self) -> Iterator[Dict[str, np.ndarray]]:
        for index, feed in enumerate(self.feeds()):
            images = _images(feed)
            if index == len(self.pieces):
                self.pieces.append(images)
            if images == 1:
                yield feed
                continue
            for i in range(images):
                yield {k: v[i:i + 1] for k, v in feed.items()}


def _paired_in_pieces(outputs: Iterator[Dict[str, Sampled]], inputs, pieces: List[int]):
    """(inputs, outputs) per piece: the inputs one piece of a batch each (OneImageEach), the
    outputs recorded per batch and split alike. An input comes first: batch b's piece count
    is known once the stream has read b."""
    pending: List[Dict[str, Sampled]] = []
    batches = 0
    for xs in inputs:
        if not pending:
            batch = next(outputs, None)
            if batch is None:
                raise RuntimeError("internal: the held-out stream has more pieces than the recording")
            count = pieces[batches]
            batches += 1
            pending = [batch] if count == 1 else [{name: s.images(slice(i, i + 1)) for name, s in batch.items()}
                                                   for i in range(count)]
        yield xs, pending.pop(0)
    if pending or next(outputs, None) is not None:
        raise RuntimeError("internal: the held-out stream has fewer pieces than the recording")


class HeldOutErrors:
    """Fills errors[name] (ResidualSums, made before its layer's step is released) over the
    held-out part, a step at a time in level order, in a Lineage of its own (in workdir).

    specs: every candidate, in level order; feeds: the held-out part's batches; store: the
    original's outputs over them; delete: let each replay delete the store's files (not
    when the store is shared between models); per_image: run the steps but the last one
    image at a time (the model takes any batch size). Call released() after each level,
    finish() after the last, close() always.
    """

    def __init__(self, feeds, store: ReferenceOutputs, specs: List[CaptureSpec], entries: Dict[str, Dict],
                 errors: Dict[str, ResidualSums], workdir: Path, *, delete: bool, per_image: bool,
                 what: str = "model", threads: Optional[int] = None):
        self.steps = steps_by_input_bytes(specs, entries, HELD_OUT_STEP_BYTES)
        self.images = OneImageEach(feeds) if per_image else None
        self.lineage = Lineage(self.images or feeds, workdir, "held-out", what, threads)
        self.store, self.errors, self.delete = store, errors, delete
        self.handed = 0  # steps given to the worker
        self.measured = 0  # steps the worker finished
        self._queue: "queue.Queue" = queue.Queue()
        self._stop = threading.Event()  # take no further step
        self._abort = threading.Event()  # and leave the current one at its next batch
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="onnx-dwd-held-out", daemon=True)
        self._thread.start()

    def released(self, model: onnx.ModelProto, fitted: set) -> None:
        """Hand the worker each next step whose layers are all in fitted (names), to run over
        model (every level so far replaced). The last step is left to finish()."""
        while self.handed < len(self.steps) - 1 and all(s.name in fitted for s in self.steps[self.handed]):
            self._queue.put((self.handed, model))
            self.handed += 1

    def _run(self) -> None:
        lowest_priority()
        try:
            while True:
                item = self._queue.get()
                if item is None or self._stop.is_set():
                    return
                self._measure(*item, background=False)
                self.measured = item[0] + 1
        except _Stopped:
            return
        except BaseException as exc:  # raised again by finish()
            self._error = exc

    def _measure(self, index: int, model: onnx.ModelProto, *, background: bool, progress: Progress = no_progress,
                 label: str = "") -> None:
        step = self.steps[index]
        last = index == len(self.steps) - 1
        outputs = self.store.replay([s.name for s in step], delete=self.delete)
        pieces = self.images.pieces if self.images is not None else None
        # the last step runs in the foreground after the last level: whole batches again
        stream = self.lineage.step(model, input_names(step), keep=not last, joined=pieces if last else None)
        if background:
            stream = in_background(stream)
        batches = paired(outputs, stream) if pieces is None or last else _paired_in_pieces(outputs, stream, pieces)
        capture = Capture(step)  # positions come from the recording

        def add(xs, ys):
            if self._abort.is_set():
                raise _Stopped
            capture.add_residuals(xs, ys, self.errors)
        consume(stream, batches, add, progress, label)

    def finish(self, model: onnx.ModelProto, progress: Progress) -> None:
        """Let the worker end its current step, raise its error if it met one, and measure the
        remaining steps here over model (the finished one)."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        for index in range(self.measured, len(self.steps)):
            self._measure(index, model, background=True, progress=progress,
                          label=f"held-out data: errors per layer ({index + 1}/{len(self.steps)})")

    def close(self) -> None:
        """Stop the worker at its next batch (after an error: the workdir goes next)."""
        self._abort.set()
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
