"""Fold per-channel affine ops that follow a Conv into its weight and bias.

Rewrite: ``Conv(W, b) -> BatchNormalization | Mul(s) | Add(a)`` becomes a
single ``Conv(W', b')`` when the op is the Conv output's only consumer and its
parameters are constants that act per output channel. Folding first means the
decomposition fits the layer the network actually computes, and the rewritten
graph has no leftover affine op to run.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .tensors import NameAllocator, constant_value


def _per_channel(value: Optional[np.ndarray], channels: int) -> Optional[np.ndarray]:
    """A constant broadcast against [N, C, H, W] as one value per channel, or None.

    Accepts scalars and shapes [..., C, 1, 1] with leading ones; a plain [C]
    would broadcast along W, not C, so it is not per-channel.
    """
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), dtype=np.float64)
    shape = value.shape
    if len(shape) >= 3 and shape[-3] == channels and shape[-2:] == (1, 1) and all(d == 1 for d in shape[:-3]):
        return value.reshape(channels).astype(np.float64)
    return None


def _affine_of(node: gs.Node, conv_out: gs.Tensor, channels: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(scale, shift) per channel if node computes y*scale + shift on the conv output."""
    if node.op == "BatchNormalization":
        if len(node.inputs) != 5 or node.inputs[0] is not conv_out:
            return None
        if any(o.outputs for o in node.outputs[1:]):  # training-mode outputs in use
            return None
        if node.attrs.get("spatial", 1) != 1 or node.attrs.get("training_mode", 0):
            return None
        gamma, beta, mean, var = (constant_value(t) for t in node.inputs[1:])
        if any(v is None or v.shape != (channels,) for v in (gamma, beta, mean, var)):
            return None
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + node.attrs.get("epsilon", 1e-5))
        return scale, beta.astype(np.float64) - mean.astype(np.float64) * scale
    if node.op in ("Add", "Mul") and len(node.inputs) == 2:
        other = node.inputs[1] if node.inputs[0] is conv_out else node.inputs[0]
        if other is conv_out:
            return None
        value = _per_channel(constant_value(other), channels)
        if value is None:
            return None
        if node.op == "Add":
            return np.ones(channels), value
        return value, np.zeros(channels)
    return None


def fold_affine_into_convs(graph: gs.Graph) -> List[str]:
    """Fold BN / per-channel Mul / Add into preceding Convs, in place.

    Returns the names of the folded nodes (for the report). The caller runs
    graph.cleanup() afterwards to drop the detached nodes.
    """
    names = NameAllocator(graph)
    graph_outputs = {id(t) for t in graph.outputs}
    folded: List[str] = []
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        if len(conv.inputs) < 2:
            continue
        weight = constant_value(conv.inputs[1])
        if weight is None or weight.ndim < 3 or not np.issubdtype(weight.dtype, np.floating):
            continue
        channels = weight.shape[0]
        bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(channels)
        if bias is None:
            continue
        w, b = weight.astype(np.float64), bias.astype(np.float64)
        changed = False
        while True:
            out = conv.outputs[0]
            if id(out) in graph_outputs or len(out.outputs) != 1:
                break
            nxt = out.outputs[0]
            affine = _affine_of(nxt, out, channels)
            if affine is None:
                break
            scale, shift = affine
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            b = b * scale + shift
            new_out = nxt.outputs[0]
            nxt.outputs.clear()
            nxt.inputs.clear()
            conv.outputs.clear()
            conv.outputs.append(new_out)
            folded.append(nxt.name or nxt.op)
            changed = True
        if changed:
            base = conv.name or "conv"
            w_t = gs.Constant(names(f"{base}.weight_folded"), w.astype(weight.dtype))
            b_t = gs.Constant(names(f"{base}.bias_folded"), b.astype(weight.dtype))
            conv.inputs[1] = w_t
            if len(conv.inputs) > 2:
                conv.inputs[2] = b_t
            else:
                conv.inputs.append(b_t)
    return folded
