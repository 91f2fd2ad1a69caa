"""One interface for every runtime that runs or times a model.

A Runner turns an ONNX model into a Loaded model for a thread count (for
onnxruntime a session; for mobile runtimes a conversion first), and a Loaded
model maps a feed dict of NCHW float32 arrays to the outputs in the ONNX
model's output order and layout. Timing code (bench, layer latency) only calls
Loaded.run, or the call Loaded.bind returns, so every runtime is timed the
same way.

Runners are found by the name --runtime takes (RUNTIMES); each optional
runtime lives in its own module, imported only when asked for, and a missing
one raises OptionError saying how to install it.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..errors import ModelError, OptionError
from .ort import LEVELS, make_session

#: How long one model conversion may take before it counts as failed.
CONVERT_TIMEOUT_S = 600

#: Niceness added to converter subprocesses.
CONVERTER_NICE = 10


class Loaded(abc.ABC):
    """A model ready to run on one runtime at a fixed thread count."""

    @abc.abstractmethod
    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """Outputs in the ONNX model's output order, in its layout (NCHW stays NCHW)."""

    def bind(self, feed: Dict[str, np.ndarray]) -> Callable[[], object]:
        """A call that runs inference on `feed`, with inputs already copied in where the
        runtime allows: what timing loops call, so they time the runtime, not glue code."""
        return lambda: self.run(feed)


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
    """onnxruntime's CPU provider at one graph optimisation level ("ort" at level all, else "ort:LEVEL")."""

    def __init__(self, level: str = "all"):
        if level not in LEVELS:
            raise OptionError(f"onnxruntime level {level!r}: expected one of {', '.join(LEVELS)}")
        self.level = level
        self.name = "ort" if level == "all" else f"ort:{level}"

    def describe(self) -> str:
        return f"onnxruntime CPU, level {self.level}"

    def cache_key(self) -> str:
        return f"ort|{self.level}"

    def load(self, model, threads, what="model"):
        return _OrtLoaded(make_session(model, threads=threads, level=self.level, what=what))


#: --runtime name -> (module in this package, class, what it is). Modules are imported on demand.
RUNTIMES: Dict[str, Tuple[str, str, str]] = {
    "ort": ("base", "OrtRunner", "onnxruntime CPU (levels all, extended, basic)"),
    "litert": ("litert", "LiteRTRunner", "LiteRT with XNNPACK, converted by onnx2tf"),
    "ncnn": ("ncnn", "NcnnRunner", "ncnn, converted by pnnx"),
    "mnn": ("mnn", "MNNRunner", "MNN, converted by its own converter"),
    "openvino": ("openvino", "OpenVINORunner", "OpenVINO CPU, reading ONNX directly"),
}


def get_runner(name: str, level: Optional[str] = None) -> Runner:
    """The runner called `name`; OptionError (with how to install it) if unknown or missing.

    `level` is onnxruntime's optimisation level and applies to "ort" only;
    "ort:LEVEL" names a level too (so one bench can compare levels).
    """
    name, _, named_level = name.partition(":")
    if name not in RUNTIMES or (named_level and name != "ort"):
        raise OptionError(f"--runtime {name!r}: expected one of {', '.join(RUNTIMES)} (or ort:LEVEL)")
    module, cls, _ = RUNTIMES[name]
    factory = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    return factory(named_level or level or "all") if name == "ort" else factory()


def parse_runtimes(text: str) -> List[str]:
    """`ort,ort:extended,litert` -> ["ort", "ort:extended", "litert"], each checked against RUNTIMES."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise OptionError(f"--runtime {text!r}: expected comma-separated names from {', '.join(RUNTIMES)}")
    for n in names:
        base, _, level = n.partition(":")
        if base not in RUNTIMES or (level and base != "ort"):
            raise OptionError(f"--runtime {n!r}: expected one of {', '.join(RUNTIMES)} (or ort:LEVEL)")
        if level and level not in LEVELS:
            raise OptionError(f"--runtime {n!r}: onnxruntime levels are {', '.join(LEVELS)}")
    return list(dict.fromkeys(names))


# Helpers the converting runners share.

def missing(runtime: str, what: str, install: str) -> OptionError:
    """The error for an optional runtime that is not installed."""
    return OptionError(f"--runtime {runtime}: {what} is not installed; install it with: {install}")


def import_optional(module: str, runtime: str, install: str):
    """import `module`, or OptionError saying how to install it."""
    try:
        with quiet_native_output():
            return importlib.import_module(module)
    except ImportError:
        raise missing(runtime, f"the Python package providing `{module}`", install) from None


@contextlib.contextmanager
def quiet_native_output(stderr: bool = False) -> Iterator[None]:
    """Silence what native libraries write to stdout (and stderr if asked): MNN and LiteRT
    print banners when they load. Python exceptions still carry their messages."""
    streams = [sys.stdout] + ([sys.stderr] if stderr else [])
    saved = []
    try:
        for stream in streams:
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # not a real file (e.g. click's test runner)
                continue
            stream.flush()
            saved.append((fd, os.dup(fd)))
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def static_input_shapes(model: onnx.ModelProto, what: str) -> Dict[str, Tuple[int, ...]]:
    """Input name -> shape, all dims fixed; ModelError if any is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            raise ModelError(f"{what}: input {vi.name} has a dynamic shape; mobile runtimes need a static one "
                             f"(give --input-shape {vi.name}:D0,D1,...)")
        shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def with_static_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of `model` whose inputs have the given static shapes.

    Symbolic output dims and intermediate shapes written for the dynamic model
    are dropped (converters cannot resolve them); converters infer them again
    from the static inputs.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for vi in fixed.graph.input:
        if vi.name in shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    for vi in fixed.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.ClearField("dim_param")
    del fixed.graph.value_info[:]
    return fixed


def reference_outputs(model: onnx.ModelProto, feed: Dict[str, np.ndarray], what: str) -> List[np.ndarray]:
    """The model's outputs in onnxruntime (basic optimisations only), the yardstick for converters."""
    return make_session(model, threads=1, level="basic", what=what).run(None, feed)


def random_feed(model: onnx.ModelProto, what: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """Uniform [0, 1) float32 inputs of the model's static shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.random(shape, dtype=np.float32) for name, shape in static_input_shapes(model, what).items()}


#: Converters bundle their own ONNX readers, often older than the onnx package
#: that wrote the model (pnnx's rejects IR 11+); models go to them at this IR
#: version at most, which every opset since ONNX 1.15 can use.
CONVERTER_IR_VERSION = 10


def for_converter(model: onnx.ModelProto) -> bytes:
    """The model serialized for a converter: IR version capped at CONVERTER_IR_VERSION."""
    if model.ir_version <= CONVERTER_IR_VERSION:
        return model.SerializeToString()
    capped = onnx.ModelProto()
    capped.CopyFrom(model)
    capped.ir_version = CONVERTER_IR_VERSION
    return capped.SerializeToString()


def model_digest(model: onnx.ModelProto) -> str:
    """A key for conversions of this exact model."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _lower_priority() -> None:
    """Converters run niced: on a shared machine they should not disturb timings."""
    os.nice(CONVERTER_NICE)


def run_converter(cmd: Sequence[str], runtime: str, what: str, cwd: Optional[Path] = None,
                  success: Optional[str] = None) -> str:
    """Run a converter subprocess; ModelError naming `what` with the end of its output if it fails."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, errors="replace",
                              timeout=CONVERT_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              preexec_fn=_lower_priority if os.name == "posix" else None)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{what}: conversion for {runtime} took longer than {CONVERT_TIMEOUT_S} s") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or (success is not None and success not in output):
        tail = "\n".join(line for line in output.strip().splitlines()[-8:])
        raise ModelError(f"{what}: conversion for {runtime} failed (exit {proc.returncode}):\n{tail}")
    return output


@contextlib.contextmanager
def scratch_dir(runtime: str) -> Iterator[Path]:
    """A temporary directory for one conversion, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"onnx-dwd-{runtime}-") as tmp:
        yield Path(tmp)


def package_dir(module: str) -> Optional[Path]:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def reorder_outputs(names: Sequence[str], produced: Mapping[str, np.ndarray], what: str,
                    runtime: str) -> List[np.ndarray]:
    """The runtime's outputs (by name) in the ONNX output order."""
    missing_names = [n for n in names if n not in produced]
    if missing_names:
        raise ModelError(f"{what}: {runtime} has no output named {', '.join(missing_names)} "
                         f"(it has {', '.join(sorted(produced))})")
    return [produced[n] for n in names]


def cache_root() -> Path:
    """Where onnx-dwd keeps things between runs ($ONNX_DWD_CACHE or ~/.cache/onnx-dwd)."""
    root = os.environ.get("ONNX_DWD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "onnx-dwd")
    return Path(root)
