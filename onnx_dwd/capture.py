"""Look inside a running model: intermediate tensors become extra graph outputs.

(onnxruntime quantization's calibrators do the same: augment the graph, run,
collect.) The augmented model only ever lives in memory.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import onnx

from .runtimes import make_session, run_batches


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of model that also outputs the named intermediate tensors."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    # onnxruntime infers the type of a bare-named output (onnx.checker would not).
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in present)
    return augmented


def tensor_shapes(model: onnx.ModelProto, feed: Dict[str, np.ndarray], names: Sequence[str],
                  what: str = "model") -> Dict[str, tuple]:
    """Shapes of the named tensors when model runs on feed."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    session = make_session(with_outputs(model, names), what=what)
    (values,) = run_batches(session, [feed], names, what=what)
    return {n: tuple(v.shape) for n, v in zip(names, values)}
