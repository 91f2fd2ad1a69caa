"""Passes that pair a model's tensors with the original's recorded outputs, batch by batch.

A compensated fit reads each layer's input from the model being built (a
Lineage step) and its output from one recorded pass of the original
(ReferenceOutputs); both streams cover the same batches in the same order.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import onnx

from .background import in_background
from .capture import CaptureSpec, input_names
from .reference import ReferenceOutputs
from .segments import Lineage

Progress = Callable[[Iterable, str, Optional[int]], Iterable]


def no_progress(iterable, label, length):
    return iterable


def replayed(lineage: Lineage, model: onnx.ModelProto, specs: List[CaptureSpec], store: ReferenceOutputs, *,
             keep: bool, delete: bool):
    """(stream, batches): specs' inputs from a step of lineage over model, in a worker thread,
    paired with their outputs replayed from store."""
    inputs = in_background(lineage.step(model, input_names(specs), keep=keep))
    return inputs, paired(store.replay([s.name for s in specs], delete=delete), inputs)


def consume(stream, batches, consume_batch, progress: Progress = no_progress, label: str = "") -> None:
    """consume_batch(inputs, outputs) for every batch. An error here stops the stream (and its
    worker) before the workdir goes, and closes the replayed files."""
    try:
        for xs, ys in progress(batches, label, None):
            consume_batch(xs, ys)
    finally:
        stream.close()
        batches.close()


def paired(outputs, inputs):
    """(inputs, outputs) per batch of two streams over the same batches."""
    for ys in outputs:
        xs = next(inputs, None)
        if xs is None:
            raise RuntimeError("internal: the two streams yielded different batch counts")
        yield xs, ys
    if next(inputs, None) is not None:
        raise RuntimeError("internal: the two streams yielded different batch counts")
