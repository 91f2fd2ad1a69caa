"""Iterate in a worker thread, so producing the next item overlaps consuming this one.

A calibrated run alternates onnxruntime passes (the next batch's tensors)
with numpy statistics (this batch's sums). Both release the GIL, so on two
cores a worker thread running the passes hides most of one behind the other.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_ITEM, _ERROR, _END = range(3)


def in_background(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield items' items, produced by a worker thread at most depth + 1 ahead.

    An exception in the worker is raised here, at the item it stopped at.
    The worker has finished iterating when this generator ends (so a
    generator's cleanup after its last item has run); closing this generator
    early stops the worker at its next item.
    """
    channel: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def send(message) -> bool:
        while not stop.is_set():
            try:
                channel.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not send((_ITEM, item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            send((_ERROR, exc))
            return
        send((_END, None))

    worker = threading.Thread(target=work, name="onnx-dwd-background", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = channel.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        stop.set()
        worker.join()
