"""LiteRT (TensorFlow Lite) with the XNNPACK delegate, converted from ONNX by onnx2tf 2.x.

onnx2tf 2.x converts without TensorFlow but pins exact versions of its
dependencies (and says it needs a newer Python than 3.11, where it works), so
it lives in its own virtual environment and runs as a subprocess:
$ONNX_DWD_ONNX2TF names its `onnx2tf` executable, else
$ONNX_DWD_CACHE/onnx2tf-venv (default ~/.cache/onnx-dwd/onnx2tf-venv), which
`bash tools/install_runtimes.sh litert` creates.

onnx2tf turns 4-D inputs to NHWC, as a deployed model has them; feeds are
transposed before they are copied in (outside the timed call). Outputs come
out NHWC or as in ONNX depending on the graph; each output's layout is read
off its shape, or where the shape cannot tell (C = H = W), off a comparison
with onnxruntime at load time.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ModelError
from .base import (Loaded, Runner, cache_root, for_converter, import_optional, missing, model_digest,
                   quiet_native_output, random_feed, reference_outputs, run_converter, scratch_dir,
                   static_input_shapes)

INSTALL = "pip install 'onnx-dwd[litert]'  (or: pip install ai-edge-litert)"
ONNX2TF_VERSION = "2.6.9"


def onnx2tf_venv() -> Path:
    return cache_root() / "onnx2tf-venv"


def install_onnx2tf_hint() -> str:
    venv = onnx2tf_venv()
    return (f"`bash tools/install_runtimes.sh litert` in the onnx-dwd source tree, or by hand: "
            f"python3 -m venv {venv} && {venv}/bin/pip install --ignore-requires-python onnx2tf=={ONNX2TF_VERSION} "
            "(or point $ONNX_DWD_ONNX2TF at an onnx2tf 2.x executable)")


def find_onnx2tf() -> Optional[Path]:
    """The onnx2tf executable: $ONNX_DWD_ONNX2TF, else the one in onnx2tf_venv(), else in the
    default ~/.cache/onnx-dwd/onnx2tf-venv (where a run with its own $ONNX_DWD_CACHE still finds it)."""
    given = os.environ.get("ONNX_DWD_ONNX2TF")
    if given:
        candidates = [Path(given)]
    else:
        default = Path(os.path.expanduser("~")) / ".cache" / "onnx-dwd" / "onnx2tf-venv"
        candidates = [onnx2tf_venv() / "bin" / "onnx2tf", default / "bin" / "onnx2tf"]
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def _layouts(rank: int, first: Optional[Tuple[int, ...]]) -> List[Optional[Tuple[int, ...]]]:
    """Candidate axis permutations: `first` (channels moved), then none; just none below rank 3."""
    return [first, None] if rank >= 3 else [None]


def _to_last(rank: int) -> Tuple[int, ...]:
    """NCHW-style -> NHWC-style axes permutation."""
    return (0,) + tuple(range(2, rank)) + (1,)


def _to_first(rank: int) -> Tuple[int, ...]:
    """NHWC-style -> NCHW-style axes permutation."""
    return (0, rank - 1) + tuple(range(1, rank - 1))


class _LiteRTLoaded(Loaded):
    def __init__(self, interpreter, inputs, outputs):
        self.interpreter = interpreter
        self.inputs = inputs    # [(onnx name, tflite index, perm or None)]
        self.outputs = outputs  # [(tflite index, perm or None, ONNX shape)] in ONNX order

    def _set(self, feed):
        for name, index, perm in self.inputs:
            arr = feed[name] if perm is None else feed[name].transpose(perm)
            self.interpreter.set_tensor(index, np.ascontiguousarray(arr, dtype=np.float32))

    def run(self, feed):
        self._set(feed)
        self.interpreter.invoke()
        outs = []
        for index, perm, shape in self.outputs:
            arr = self.interpreter.get_tensor(index)
            arr = arr if perm is None else np.ascontiguousarray(arr.transpose(perm))
            outs.append(arr if shape is None else arr.reshape(shape))
        return outs

    def bind(self, feed):
        self._set(feed)
        return self.interpreter.invoke


class LiteRTRunner(Runner):
    """LiteRT's interpreter with XNNPACK (its default CPU delegate), fp32."""

    name = "litert"

    def __init__(self):
        self.litert = import_optional("ai_edge_litert.interpreter", self.name, INSTALL)
        self.onnx2tf = find_onnx2tf()
        if self.onnx2tf is None:
            raise missing(self.name, f"the onnx2tf converter (expected {onnx2tf_venv() / 'bin' / 'onnx2tf'})",
                          install_onnx2tf_hint())
        import ai_edge_litert
        self.version = getattr(ai_edge_litert, "__version__", "?")
        self._converted: Dict[str, bytes] = {}

    def describe(self) -> str:
        return f"LiteRT {self.version} + XNNPACK, fp32 (onnx2tf)"

    def cache_key(self) -> str:
        return f"litert|{self.version}"

    def convert(self, model, what="model") -> bytes:
        """The float32 .tflite of `model`, converted once per runner."""
        key = model_digest(model)
        if key not in self._converted:
            with scratch_dir(self.name) as tmp:
                (tmp / "model.onnx").write_bytes(for_converter(model))
                run_converter([str(self.onnx2tf), "-i", "model.onnx", "-o", "out", "-n"], "LiteRT (onnx2tf)",
                              what, cwd=tmp)
                tflite = tmp / "out" / "model_float32.tflite"
                if not tflite.is_file():
                    raise ModelError(f"{what}: onnx2tf wrote no model_float32.tflite")
                self._converted[key] = tflite.read_bytes()
        return self._converted[key]

    def load(self, model, threads, what="model"):
        shapes = static_input_shapes(model, what)
        data = self.convert(model, what)
        try:
            with quiet_native_output(stderr=True):  # "INFO: Created TensorFlow Lite XNNPACK delegate"
                interpreter = self.litert.Interpreter(model_content=data, num_threads=int(threads))
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{what}: LiteRT cannot load the converted model: {str(exc).strip()}") from None
        details_in = _by_onnx_name(interpreter.get_input_details(), list(shapes), "input", what)
        out_names = [o.name for o in model.graph.output]
        details_out = _by_onnx_name(interpreter.get_output_details(), out_names, "output", what)
        feed = random_feed(model, what)
        reference = reference_outputs(model, feed, what)
        # Input layouts: each input's shape in the tflite model tells NHWC from NCHW,
        # except when C equals the spatial dims; then both are tried (NHWC first).
        choices = []
        for name, d in zip(shapes, details_in):
            shape = shapes[name]
            fits = [p for p in _layouts(len(shape), _to_last(len(shape))) if tuple(d["shape"]) == _permuted(shape, p)]
            if not fits:
                raise ModelError(f"{what}: LiteRT input {d['name']} has shape {list(d['shape'])}; "
                                 f"the ONNX input {name} is {list(shape)}")
            choices.append(fits)
        best = None
        for combo in itertools.product(*choices):
            inputs = [(name, d["index"], perm) for name, d, perm in zip(shapes, details_in, combo)]
            raw = _LiteRTLoaded(interpreter, inputs, [(d["index"], None, None) for d in details_out]).run(feed)
            outputs, err = _output_layouts(raw, reference, details_out, what)
            if best is None or err < best[0]:
                best = (err, inputs, outputs)
        _, inputs, outputs = best
        return _LiteRTLoaded(interpreter, inputs, outputs)


def _permuted(shape: Sequence[int], perm) -> Tuple[int, ...]:
    return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


def _output_layouts(raw: List[np.ndarray], reference: List[np.ndarray], details, what: str) -> Tuple[list, float]:
    """Per output (tflite index, perm back to ONNX layout, shape to reshape to), chosen by
    shape and, where both layouts fit, by agreement with `reference`; and the worst
    relative error of that choice."""
    layouts, worst = [], 0.0
    for arr, ref, d in zip(raw, reference, details):
        candidates = [(p, None) for p in _layouts(arr.ndim, _to_first(arr.ndim))
                      if _permuted(arr.shape, p) == ref.shape]
        if not candidates and arr.size == ref.size:  # dims squeezed or merged by the converter
            candidates = [(None, ref.shape)]
        best = None
        for perm, shape in candidates:
            got = (arr if perm is None else arr.transpose(perm)).reshape(ref.shape).astype(np.float64)
            err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
            if best is None or err < best[0]:
                best = (err, perm, shape)
        if best is None:
            raise ModelError(f"{what}: LiteRT output {d['name']} has shape {list(arr.shape)}; "
                             f"onnxruntime gives {list(ref.shape)}")
        layouts.append((d["index"], best[1], best[2]))
        worst = max(worst, best[0])
    return layouts, worst


def _by_onnx_name(details, names: List[str], kind: str, what: str):
    """The tflite tensors in ONNX order: by name where onnx2tf kept the names, else in order."""
    by_name = {d["name"]: d for d in details}
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    if len(details) != len(names):
        raise ModelError(f"{what}: the LiteRT model has {len(details)} {kind}s, the ONNX model {len(names)}")
    return list(details)
