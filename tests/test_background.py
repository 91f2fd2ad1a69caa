"""in_background: the same items in the same order, errors where they happened, no stray workers;
lowest_priority: the calling thread only, and only on Linux."""

import threading
import time

import pytest

from onnx_dwd.background import in_background


def test_items_come_in_order_and_the_source_has_finished_at_the_end():
    finished = []

    def source():
        for i in range(50):
            yield i
        finished.append(True)  # what a Lineage step does after its last batch

    assert list(in_background(source(), depth=2)) == list(range(50))
    assert finished == [True]


def test_an_error_in_the_worker_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("batch 3 is broken")

    got = []
    with pytest.raises(ValueError, match="batch 3 is broken"):
        for item in in_background(source()):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_the_worker():
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    items = in_background(source(), depth=1)
    assert next(items) == 0
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "onnx-dwd-background"]
    assert len(produced) <= 2  # at most depth + 1 alive, the consumer's included: never ran on
    time.sleep(0.05)
    assert len(produced) <= 2


@pytest.mark.parametrize("depth", [1, 3])
def test_at_most_depth_plus_one_items_are_alive(depth):
    """Items the consumer has not let go of yet, counting its own and the one being made."""
    alive, most = [0], [0]
    lock = threading.Lock()

    class Item:
        def __init__(self):
            with lock:
                alive[0] += 1
                most[0] = max(most[0], alive[0])

        def __del__(self):
            with lock:
                alive[0] -= 1

    def source():
        for _ in range(30):
            yield Item()

    count = 0
    for item in in_background(source(), depth=depth):
        time.sleep(0.002)  # a slow consumer: the worker waits for it
        count += 1
        del item
    assert count == 30 and most[0] == depth + 1


def test_the_next_item_is_produced_while_this_one_is_consumed():
    second_made = threading.Event()

    def source():
        yield 0
        second_made.set()
        yield 1

    items = in_background(source())
    assert next(items) == 0
    # still holding item 0: the worker has gone on to item 1 meanwhile
    assert second_made.wait(timeout=10)
    assert list(items) == [1]


def test_lowest_priority_renices_the_calling_thread_only_on_linux(monkeypatch):
    """On Linux the calling thread (not the process) goes to nice 19; elsewhere setpriority is
    not called at all (macOS would read the thread id as a process id)."""
    import os
    import sys
    import threading

    from onnx_dwd.background import lowest_priority
    if sys.platform.startswith("linux"):
        seen = {}

        def worker():
            lowest_priority()
            seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["thread"] == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # this thread untouched
    calls = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(os, "setpriority", lambda *a: calls.append(a))
    lowest_priority()
    assert calls == []
