"""MAC and parameter counts, per image (batch 1)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx


def conv_macs(out_shape: Sequence[int], out_channels: int, in_channels: int, group: int, kernel: Sequence[int]) -> int:
    """Multiply-accumulates of a regular/grouped conv for one image."""
    pixels = int(np.prod(out_shape[2:]))
    return pixels * out_channels * (in_channels // group) * int(np.prod(kernel))


def decomposed_macs(out_shape: Sequence[int], out_channels: int, in_channels: int, group: int,
                    kernel: Sequence[int], rank: int) -> int:
    """Depthwise (c*K filters of kh*kw) plus grouped pointwise (n x c*K/G) for one image."""
    pixels = int(np.prod(out_shape[2:]))
    return pixels * (in_channels * rank * int(np.prod(kernel)) + out_channels * in_channels * rank // group)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all floating-point initializers and Constant-node tensors."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.extend(a.t for a in node.attribute if a.name == "value")
    return int(sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats))


def channel_macs(out_shape: Sequence[int], out_channels: int, in_channels: int, kernel: Sequence[int],
                 channels: int) -> int:
    """k x k conv to c' channels, then 1x1 to n, for one image."""
    pixels = int(np.prod(out_shape[2:]))
    return pixels * channels * (in_channels * int(np.prod(kernel)) + out_channels)


def channels_for_rank(out_channels: int, in_channels: int, kernel: Sequence[int], rank: int) -> int:
    """c' whose channel decomposition costs the MACs of the rank-K depthwise form (group 1)."""
    k2 = int(np.prod(kernel))
    dw = rank * in_channels * (k2 + out_channels)
    return max(1, round(dw / (in_channels * k2 + out_channels)))
