"""One interface for every runtime that runs or times a model.

A Runner turns an ONNX model into a Loaded model for a thread count (for
onnxruntime a session; for mobile runtimes a conversion first), and a Loaded
model maps a feed dict of NCHW float32 arrays to the outputs in the ONNX
model's output order and layout. Timing code (bench, layer latency) only calls
Loaded.run, so every runtime is timed the same way.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx

from ..errors import OptionError
from .ort import LEVELS, make_session


class Loaded(abc.ABC):
    """A model ready to run on one runtime at a fixed thread count."""

    @abc.abstractmethod
    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """Outputs in the ONNX model's output order, in its layout (NCHW stays NCHW)."""


class Runner(abc.ABC):
    """A runtime: `name` is what --runtime takes, `describe()` what reports print."""

    name: str = ""

    @abc.abstractmethod
    def describe(self) -> str:
        ...

    @abc.abstractmethod
    def load(self, model: onnx.ModelProto, threads: int, what: str = "model") -> Loaded:
        """Ready `model` (static input shapes) to run on `threads` threads; ModelError names `what`."""

    def cache_key(self) -> str:
        """What distinguishes this runner's timings in the latency cache."""
        return self.name


class _OrtLoaded(Loaded):
    def __init__(self, session):
        self.session = session

    def run(self, feed):
        return self.session.run(None, feed)


class OrtRunner(Runner):
    """onnxruntime's CPU provider at one graph optimisation level."""

    name = "ort"

    def __init__(self, level: str = "all"):
        if level not in LEVELS:
            raise OptionError(f"onnxruntime level {level!r}: expected one of {', '.join(LEVELS)}")
        self.level = level

    def describe(self) -> str:
        return f"onnxruntime CPU, level {self.level}"

    def cache_key(self) -> str:
        return f"ort|{self.level}"

    def load(self, model, threads, what="model"):
        return _OrtLoaded(make_session(model, threads=threads, level=self.level, what=what))


#: --runtime name -> factory(level) ; other runtimes register themselves here.
RUNNERS: Dict[str, Callable[[str], Runner]] = {"ort": OrtRunner}


def get_runner(name: str, level: Optional[str] = None) -> Runner:
    """The runner called `name`; OptionError (with how to install it) if unknown or missing."""
    factory = RUNNERS.get(name)
    if factory is None:
        raise OptionError(f"--runtime {name!r}: expected one of {', '.join(sorted(RUNNERS))}")
    return factory(level or "all") if name == "ort" else factory()
