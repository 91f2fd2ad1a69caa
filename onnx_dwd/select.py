"""Find the convolutions to decompose, and say why every other one is kept."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .tensors import constant_value

CONV_OPS = ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose")


@dataclasses.dataclass
class ConvLayer:
    """One convolution node of the graph and what the optimizer will do with it.

    reason is None for a candidate (to be decomposed), else why it is kept.
    weight [n, c/G, kh, kw] and bias [n] are set for candidates.
    """

    node: gs.Node
    name: str
    op: str
    kernel: Tuple[int, ...]
    in_channels: Optional[int]
    out_channels: Optional[int]
    group: int
    reason: Optional[str]
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    @property
    def is_candidate(self) -> bool:
        return self.reason is None

    @property
    def output_name(self) -> str:
        return self.node.outputs[0].name


def _keep(node, name, kernel, weight, group, reason) -> ConvLayer:
    n = c = None
    if weight is not None and weight.ndim >= 3:
        n, c = int(weight.shape[0]), int(weight.shape[1]) * group
    return ConvLayer(node, name, node.op, kernel, c, n, group, reason)


def classify_convs(graph: gs.Graph) -> List[ConvLayer]:
    """Every conv-like node in graph order, each a candidate or kept with a reason.

    Candidates: Conv with a constant float 4-D weight, a kernel larger than 1x1,
    and group 1 or 1 < group < in_channels (decomposed group by group).
    Nodes without a name get one (``Conv_<index>``) so the report can name them.
    """
    layers: List[ConvLayer] = []
    for index, node in enumerate(graph.nodes):
        if node.op not in CONV_OPS:
            continue
        if not node.name:
            node.name = f"{node.op}_{index}"
        name = node.name
        group = int(node.attrs.get("group", 1))
        weight_input = node.inputs[3] if node.op == "QLinearConv" else node.inputs[1]
        weight = constant_value(weight_input) if weight_input is not None else None
        kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", weight.shape[2:] if weight is not None else ()))
        if node.op in ("ConvInteger", "QLinearConv"):
            layers.append(_keep(node, name, kernel, weight, group,
                                "quantized conv (integer weights): nothing to decompose in float"))
            continue
        if node.op == "ConvTranspose":
            layers.append(_keep(node, name, kernel, weight, group, "transposed conv: not supported"))
            continue
        if weight is None:
            layers.append(_keep(node, name, kernel, None, group,
                                "weight is not a constant (computed at run time)"))
            continue
        if not np.issubdtype(weight.dtype, np.floating):
            layers.append(_keep(node, name, kernel, weight, group,
                                f"weight type {weight.dtype} is not floating point"))
            continue
        if weight.ndim != 4:
            layers.append(_keep(node, name, kernel, weight, group,
                                f"{weight.ndim - 2}-D conv: only 2-D convs are decomposed"))
            continue
        if kernel[0] * kernel[1] == 1:
            layers.append(_keep(node, name, kernel, weight, group,
                                "1x1 (pointwise) conv: nothing to decompose"))
            continue
        if group > 1 and weight.shape[1] == 1:
            layers.append(_keep(node, name, kernel, weight, group,
                                "depthwise conv (group = in channels): already depthwise"))
            continue
        bias = None
        if len(node.inputs) > 2:
            bias = constant_value(node.inputs[2])
            if bias is None:
                layers.append(_keep(node, name, kernel, weight, group,
                                    "bias is not a constant (computed at run time)"))
                continue
        layer = _keep(node, name, kernel, weight, group, None)
        layer.weight, layer.bias = weight, bias
        layers.append(layer)
    return layers
