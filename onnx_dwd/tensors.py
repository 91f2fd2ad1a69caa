"""Small helpers over an onnx-graphsurgeon graph: constant values and fresh names."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(tensor: gs.Tensor) -> Optional[np.ndarray]:
    """The value of a tensor known when the model is loaded, else None.

    Covers initializers (gs.Constant) and outputs of Constant nodes, which some
    exporters (PaddlePaddle) use for weights instead of initializers.
    """
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return np.asarray(attrs["value"].values)
        if "value_float" in attrs:
            return np.asarray(attrs["value_float"], dtype=np.float32)
        if "value_floats" in attrs:
            return np.asarray(attrs["value_floats"], dtype=np.float32)
    return None


class NameAllocator:
    """Hands out tensor/node names that do not clash with any in the graph."""

    def __init__(self, graph: gs.Graph):
        self._taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name
