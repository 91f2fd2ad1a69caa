"""Arrays spilled to raw files between passes over the calibration data, written in a thread.

A calibrated run keeps more per image than memory should hold (the
calibration feeds, a Lineage's frontier): each array goes to a file of its
own, raw (no header to parse, no zip CRC: numpy's .npz cost YOLOv8n's 1024
feeds 3.5 s of writing), and a writer thread beside onnxruntime writes it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import List

import numpy as np


@dataclasses.dataclass(frozen=True)
class RawArray:
    """One array, raw on disk (dtype and shape kept here)."""

    path: Path
    dtype: np.dtype
    shape: tuple

    @classmethod
    def of(cls, value: np.ndarray, path: Path) -> "RawArray":
        return cls(path, value.dtype, value.shape)

    def write(self, value: np.ndarray) -> None:
        np.ascontiguousarray(value).tofile(self.path)

    def load(self) -> np.ndarray:
        value = np.fromfile(self.path, dtype=self.dtype)
        if value.size != int(np.prod(self.shape)):
            raise RuntimeError(f"internal: {self.path} holds {value.size} values, {self.shape} expected")
        return value.reshape(self.shape)


class FileWriter:
    """File writes and deletions in a thread of their own, at most `depth` pending (each holds
    its array). Writing new files costs about 1.6 s per GB on these VMs where the page
    cache grows (the first touch of fresh memory), as much as running onnxruntime's nodes;
    in a thread of its own it overlaps them (a Lineage's levels: 94.3 -> 88.1 s in all).
    An error in a write is raised by a later submit() (once `depth` more are pending) or by
    wait(); close(), for when the caller stops early, drops it."""

    def __init__(self, depth: int = 4):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-dwd-writer")
        self.pending: List[Future] = []
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.pop(0).result()

    def wait(self) -> None:
        """Return once everything submitted is done."""
        while self.pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        """Drop what has not started, finish what has, and stop the thread."""
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)
