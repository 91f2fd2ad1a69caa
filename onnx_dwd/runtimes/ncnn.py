"""ncnn on CPU, converted from ONNX by pnnx's standalone binary.

pnnx (the binary shipped inside the `pnnx` wheel) writes its outputs beside
its input, so it converts a copy in a temporary directory. fp16=0 keeps the
weights in fp32, and the net's options turn off fp16/bf16 storage and
arithmetic (on by default where the CPU has them; ~3e-4 relative error).
ncnn has no batch dimension: inputs must have batch 1, which is dropped going
in and put back coming out. pnnx names the blobs in0.. and out0.. in the ONNX
model's input and output order.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import numpy as np

from ..errors import ModelError
from .base import (Loaded, Runner, for_converter, import_optional, missing, model_digest, package_dir,
                   random_feed, reference_outputs, run_converter, scratch_dir, static_input_shapes)

INSTALL = "pip install 'onnx-dwd[ncnn]' && pip install --no-deps pnnx  (plain `pip install pnnx` pulls a CUDA torch)"


def _in_order(blobs) -> List[str]:
    """pnnx's in0, in1, .. / out0, out1, .. sorted by their number (the ONNX order)."""
    return sorted(blobs, key=lambda b: int(re.sub(r"\D", "", b) or 0))


class _NcnnLoaded(Loaded):
    def __init__(self, ncnn, net, input_names: List[str], output_shapes: List[Tuple[int, ...]]):
        self.ncnn, self.net = ncnn, net
        self.inputs = list(zip(input_names, _in_order(net.input_names())))
        self.outputs = list(zip(_in_order(net.output_names()), output_shapes))

    def _mats(self, feed):
        mats = []
        for name, blob in self.inputs:
            arr = feed[name][0]  # batch 1, dropped
            # a Mat allocated by ncnn and filled through its buffer: Mats wrapping
            # numpy memory crash this binding in some cases
            mat = self.ncnn.Mat(*arr.shape[::-1])
            np.asarray(mat)[...] = arr
            mats.append((blob, mat))
        return mats

    def _extract(self, mats):
        ex = self.net.create_extractor()
        for blob, mat in mats:
            ex.input(blob, mat)
        results = []
        for blob, _ in self.outputs:
            ret, out = ex.extract(blob)
            if ret != 0:
                raise ModelError(f"ncnn failed to compute output {blob} (error {ret})")
            results.append(out)
        return results

    def run(self, feed):
        mats = self._extract(self._mats(feed))
        return [np.array(m, dtype=np.float32).reshape(shape) for m, (_, shape) in zip(mats, self.outputs)]

    def bind(self, feed):
        mats = self._mats(feed)
        return lambda: self._extract(mats)


class NcnnRunner(Runner):
    """ncnn CPU, fp32 throughout."""

    name = "ncnn"

    def __init__(self):
        self.ncnn = import_optional("ncnn", self.name, INSTALL)
        pnnx_dir = package_dir("pnnx")
        self.pnnx = pnnx_dir / "pnnx" if pnnx_dir is not None else None
        if self.pnnx is None or not self.pnnx.is_file():
            raise missing(self.name, "the pnnx converter", INSTALL)
        if not os.access(self.pnnx, os.X_OK):
            raise missing(self.name, f"an executable pnnx (found {self.pnnx} without execute permission)", INSTALL)
        self._converted: Dict[str, Tuple[str, bytes]] = {}

    def describe(self) -> str:
        return f"ncnn {self.ncnn.__version__} CPU, fp32"

    def cache_key(self) -> str:
        return f"ncnn|{self.ncnn.__version__}"

    def convert(self, model, what="model") -> Tuple[str, bytes]:
        """(param text, weights) for `model`, converted once per runner."""
        key = model_digest(model)
        if key not in self._converted:
            shapes = static_input_shapes(model, what)
            for name, shape in shapes.items():
                if not shape or shape[0] != 1:
                    raise ModelError(f"{what}: input {name} has shape {list(shape)}; ncnn runs batch 1 only")
            inputshape = ",".join("[" + ",".join(map(str, s)) + "]" for s in shapes.values())
            with scratch_dir(self.name) as tmp:
                (tmp / "model.onnx").write_bytes(for_converter(model))
                run_converter([str(self.pnnx), "model.onnx", f"inputshape={inputshape}", "fp16=0",
                               "ncnnparam=model.param", "ncnnbin=model.bin"], "ncnn (pnnx)", what, cwd=tmp)
                self._converted[key] = ((tmp / "model.param").read_text(), (tmp / "model.bin").read_bytes())
        return self._converted[key]

    def load(self, model, threads, what="model"):
        param, weights = self.convert(model, what)
        net = self.ncnn.Net()
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_bf16_packed"):
            if hasattr(net.opt, flag):
                setattr(net.opt, flag, False)
        net.opt.num_threads = int(threads)
        with scratch_dir(self.name) as tmp:  # load from files: the Python binding's *_mem calls vary by version
            (tmp / "model.param").write_text(param)
            (tmp / "model.bin").write_bytes(weights)
            if net.load_param(str(tmp / "model.param")) != 0 or net.load_model(str(tmp / "model.bin")) != 0:
                raise ModelError(f"{what}: ncnn cannot load the model pnnx wrote")
        inputs = list(static_input_shapes(model, what))
        if len(net.input_names()) != len(inputs) or len(net.output_names()) != len(model.graph.output):
            raise ModelError(f"{what}: pnnx wrote {len(net.input_names())} inputs and {len(net.output_names())} "
                             f"outputs; the ONNX model has {len(inputs)} and {len(model.graph.output)}")
        shapes = [o.shape for o in reference_outputs(model, random_feed(model, what), what)]
        return _NcnnLoaded(self.ncnn, net, inputs, shapes)
