"""in_background: the same items in the same order, errors where they happened, no stray workers."""

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
    assert len(produced) <= 4  # at most depth + 2 ahead of the consumer: never ran on
    time.sleep(0.05)
    assert len(produced) <= 4


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
