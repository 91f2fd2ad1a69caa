"""Iterate in a worker thread, so producing the next item overlaps consuming this one.

A calibrated run alternates onnxruntime passes (the next batch's tensors)
with numpy statistics (this batch's sums). Both release the GIL, so on two
cores a worker thread running the passes hides most of one behind the other.
lowest_priority() is for threads that should only take idle cores.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_ITEM, _ERROR, _END = range(3)


def in_background(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield items' items, produced by a worker thread.

    At most depth + 1 items are alive at once, counting the one the consumer
    holds and the one being produced: the worker takes a slot before making
    an item, and the consumer gives it back when it asks for the next one. (A
    queue of depth items held one more: a batch of YOLOv8n's 39 convs' inputs
    and outputs is 135 MB.)

    An exception in the worker is raised here, at the item it stopped at.
    The worker has finished iterating when this generator ends (so a
    generator's cleanup after its last item has run); closing this generator
    early stops the worker at its next item.
    """
    if depth < 1:
        raise ValueError(f"internal: in_background needs depth >= 1, got {depth}")
    channel: "queue.Queue" = queue.Queue()  # never holds more than depth + 1: the slots bound it
    slots = threading.Semaphore(depth + 1)
    stop = threading.Event()

    def take_slot() -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=0.1):
                return True
        return False

    def work() -> None:
        try:
            source = iter(items)
            while take_slot():
                try:
                    item = next(source)
                except StopIteration:
                    channel.put((_END, None))
                    return
                channel.put((_ITEM, item))
                del item  # the consumer's now
        except BaseException as exc:  # handed to the consumer, raised there
            channel.put((_ERROR, exc))

    worker = threading.Thread(target=work, name="onnx-dwd-background", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = channel.get()
            if kind == _ITEM:
                yield value
                del value  # done with it: free before the worker makes another
                slots.release()
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        stop.set()
        worker.join()


def lowest_priority() -> None:
    """Run the calling thread at the lowest CPU priority (nice 19): on Linux, where each thread
    has a nice value of its own; elsewhere nothing changes (macOS's setpriority would take the
    thread's id for a process id)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass
