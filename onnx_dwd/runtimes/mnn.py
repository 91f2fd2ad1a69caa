"""MNN on CPU, converted from ONNX by MNN's own converter.

The converter is the compiled module `_tools` that the MNN wheel installs at
top level, called in a subprocess. The `mnnconvert` console command is not
used: its Python wrapper runs a pip install and sends usage telemetry.

Sessions use precision "high" (fp32): "normal" lets MNN compute in fp16 on
ARM CPUs that support it. MNN runs 3x3 convs with Winograd by default, which
changes the last digits (relative error ~1e-6 on real models, ~1e-3 on
single random-weight layers); that is what deployments run, so timings keep it.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Dict

import numpy as np

from ..errors import ModelError
from .base import (Loaded, Runner, for_converter, import_optional, missing, model_digest, quiet_native_output,
                   reorder_outputs, run_converter, scratch_dir, static_input_shapes)

INSTALL = "pip install 'onnx-dwd[mnn]'  (or: pip install MNN)"

#: Its return value is not an exit status; success is the "Converted Success" line.
_CONVERT = ("import sys, _tools; _tools.mnnconvert(['mnnconvert', '-f', 'ONNX', '--modelFile', sys.argv[1], "
            "'--MNNModel', sys.argv[2], '--bizCode', 'onnx-dwd'])")


class _MNNLoaded(Loaded):
    def __init__(self, mnn, interpreter, session, input_shapes: Dict[str, tuple], output_names):
        self.mnn, self.interpreter, self.session = mnn, interpreter, session
        self.inputs = {name: interpreter.getSessionInput(session, name) for name in input_shapes}
        self.input_shapes = input_shapes
        self.output_names = list(output_names)

    def _copy_in(self, feed):
        mnn = self.mnn
        for name, tensor in self.inputs.items():
            arr = np.ascontiguousarray(feed[name], dtype=np.float32)
            host = mnn.Tensor(self.input_shapes[name], mnn.Halide_Type_Float, arr, mnn.Tensor_DimensionType_Caffe)
            tensor.copyFrom(host)

    def _invoke(self):
        self.interpreter.runSession(self.session)

    def run(self, feed):
        mnn = self.mnn
        self._copy_in(feed)
        self._invoke()
        produced = {}
        for name, tensor in self.interpreter.getSessionOutputAll(self.session).items():
            shape = tuple(tensor.getShape())
            host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32),
                              mnn.Tensor_DimensionType_Caffe)
            tensor.copyToHostTensor(host)
            produced[name] = np.array(host.getNumpyData(), dtype=np.float32).reshape(shape)
        return reorder_outputs(self.output_names, produced, "model", "MNN")

    def bind(self, feed):
        self._copy_in(feed)
        return self._invoke


class MNNRunner(Runner):
    """MNN CPU backend, precision high."""

    name = "mnn"

    def __init__(self):
        self.mnn = import_optional("MNN", self.name, INSTALL)
        if importlib.util.find_spec("_tools") is None:
            raise missing(self.name, "MNN's converter module `_tools`", INSTALL)
        self.version = self.mnn.version()
        self._converted: Dict[str, bytes] = {}

    def describe(self) -> str:
        return f"MNN {self.version} CPU, precision high"

    def cache_key(self) -> str:
        return f"mnn|{self.version}"

    def convert(self, model, what="model") -> bytes:
        """The .mnn file for `model` (converted once per runner)."""
        key = model_digest(model)
        if key not in self._converted:
            with scratch_dir(self.name) as tmp:
                src, dst = tmp / "model.onnx", tmp / "model.mnn"
                src.write_bytes(for_converter(model))
                run_converter([sys.executable, "-c", _CONVERT, str(src), str(dst)], "MNN", what,
                              success="Converted Success")
                self._converted[key] = dst.read_bytes()
        return self._converted[key]

    def load(self, model, threads, what="model"):
        shapes = static_input_shapes(model, what)
        data = self.convert(model, what)
        mnn = self.mnn
        with scratch_dir(self.name) as tmp, quiet_native_output():
            path = tmp / "model.mnn"
            path.write_bytes(data)
            interpreter = mnn.Interpreter(str(path))  # reads the whole file
            session = interpreter.createSession({"backend": "CPU", "numThread": int(threads), "precision": "high"})
        if session is None:
            raise ModelError(f"{what}: MNN could not create a session for it")
        for name, shape in shapes.items():
            tensor = interpreter.getSessionInput(session, name)
            if tensor is None:
                raise ModelError(f"{what}: the MNN model has no input named {name}")
            if tuple(tensor.getShape()) != tuple(shape):
                interpreter.resizeTensor(tensor, tuple(shape))
        interpreter.resizeSession(session)
        return _MNNLoaded(mnn, interpreter, session, shapes, [o.name for o in model.graph.output])
