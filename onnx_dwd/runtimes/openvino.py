"""OpenVINO's CPU plugin, reading the ONNX model directly (no separate converter).

Precision is pinned to f32: OpenVINO's CPU plugin otherwise infers in bf16 on
x86 CPUs that have it and in f16 on ARM, which would not be the model's
numerics. One stream and the latency hint: one inference at a time, as on a
device.
"""

from __future__ import annotations

from ..errors import ModelError
from .base import Loaded, Runner, for_converter, import_optional, scratch_dir

INSTALL = "pip install 'onnx-dwd[openvino]'  (or: pip install openvino)"


class _OpenVINOLoaded(Loaded):
    def __init__(self, compiled, input_names, output_names):
        self.request = compiled.create_infer_request()
        self.input_names = input_names
        self.output_index = {}
        for i, port in enumerate(compiled.outputs):
            for name in port.get_names():
                self.output_index[name] = i
        missing = [n for n in output_names if n not in self.output_index]
        if missing:
            raise ModelError(f"OpenVINO lost the model outputs {', '.join(missing)}")
        self.order = [self.output_index[n] for n in output_names]

    def run(self, feed):
        self.request.infer({name: feed[name] for name in self.input_names})
        return [self.request.get_output_tensor(i).data.copy() for i in self.order]

    def bind(self, feed):
        inputs = {name: feed[name] for name in self.input_names}
        self.request.infer(inputs)  # copies the inputs in once; later calls reuse them
        return self.request.infer


class OpenVINORunner(Runner):
    """OpenVINO CPU, f32, one stream."""

    name = "openvino"

    def __init__(self):
        self.ov = import_optional("openvino", self.name, INSTALL)
        self.core = self.ov.Core()

    def describe(self) -> str:
        return f"OpenVINO {self.ov.get_version().split('-')[0]} CPU, f32"

    def cache_key(self) -> str:
        return f"openvino|{self.ov.get_version().split('-')[0]}"

    def load(self, model, threads, what="model"):
        config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        try:
            with scratch_dir(self.name) as tmp:
                path = tmp / "model.onnx"
                path.write_bytes(for_converter(model))
                compiled = self.core.compile_model(self.core.read_model(str(path)), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            raise ModelError(f"{what}: OpenVINO cannot load it: {str(exc).strip().splitlines()[0]}") from None
        inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        try:
            return _OpenVINOLoaded(compiled, inputs, [o.name for o in model.graph.output])
        except ModelError as exc:
            raise ModelError(f"{what}: {exc}") from None
