"""Graph edits: replace a Conv by a depthwise Conv followed by a 1x1 Conv.

Rewrite, for a Conv ``Y = Conv(X, W, b)`` with group G:

    Y = Conv(Conv(X, D; group = c, original strides/pads/auto_pad/dilations),
             P, b; kernel 1x1, group = G)

The output tensor Y keeps its name, so consumers and graph outputs are
untouched. For rank K > 1 the depthwise stage has several graph forms that
compute the same thing but run at different speeds (DESIGN.md section 2):

- ``multiplier``: one depthwise Conv with channel multiplier K;
- ``split``: K depthwise Convs with multiplier 1, concatenated;
- ``concat-input``: K copies of X concatenated, one depthwise Conv with
  multiplier 1 over them;
- ``sum``: K depthwise Convs with multiplier 1, each with its own 1x1 Conv,
  added up (the bias rides on the first).

``split`` and ``concat-input`` reorder the depthwise channels to r*c + i,
which a grouped pointwise Conv cannot follow, so grouped convs (G > 1) use
``sum`` in their place.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx_graphsurgeon as gs

from .fit import Decomposition
from .select import ConvLayer
from .tensors import NameAllocator

#: The K > 1 form used for graph_form="auto": fastest in onnxruntime CPU at
#: optimisation level ALL, as measured by benchmarks/graph_forms.py (at level
#: EXTENDED "multiplier" wins instead; see benchmarks/RESULTS.md).
DEFAULT_GRAPH_FORM = "sum"

_SPATIAL_ATTRS = ("strides", "pads", "dilations", "auto_pad")


def resolve_graph_form(graph_form: str, rank: int, group: int) -> str:
    """The form actually written: K = 1 has only one; grouped convs cannot reorder channels."""
    if rank == 1:
        return "multiplier"
    form = DEFAULT_GRAPH_FORM if graph_form == "auto" else graph_form
    if group > 1 and form in ("split", "concat-input"):
        return "sum"
    return form


def _rank_major(channels: int, rank: int) -> np.ndarray:
    """Index map from the r*c + i order to the i*K + r order."""
    r, i = np.meshgrid(np.arange(rank), np.arange(channels), indexing="ij")
    return (i * rank + r).reshape(-1)


def replace_conv(graph: gs.Graph, layer: ConvLayer, dec: Decomposition, graph_form: str,
                 names: Optional[NameAllocator] = None) -> str:
    """Replace layer's Conv node in graph by the decomposed form; returns the form used.

    The caller runs graph.cleanup().toposort() once after all replacements.
    """
    names = names or NameAllocator(graph)
    node = layer.node
    x, y = node.inputs[0], node.outputs[0]
    dtype = layer.weight.dtype
    c, k, g = layer.in_channels, dec.rank, dec.group
    kh, kw = layer.kernel
    form = resolve_graph_form(graph_form, k, g)
    spatial = {a: node.attrs[a] for a in _SPATIAL_ATTRS if a in node.attrs}
    base = layer.name

    def depthwise(inp: gs.Tensor, weight: np.ndarray, suffix: str, channels: int) -> gs.Variable:
        out = gs.Variable(names(f"{base}/depthwise{suffix}_output"), dtype=dtype)
        graph.nodes.append(gs.Node(
            "Conv", names(f"{base}/depthwise{suffix}"),
            attrs={"kernel_shape": [kh, kw], **spatial, "group": channels},
            inputs=[inp, gs.Constant(names(f"{base}/depthwise{suffix}.weight"), weight.astype(dtype))],
            outputs=[out]))
        return out

    def concat(inputs: List[gs.Tensor], what: str) -> gs.Variable:
        out = gs.Variable(names(f"{base}/{what}_concat_output"), dtype=dtype)
        graph.nodes.append(gs.Node("Concat", names(f"{base}/{what}_concat"), attrs={"axis": 1},
                                   inputs=list(inputs), outputs=[out]))
        return out

    bias = dec.bias if dec.bias is not None else layer.bias
    pointwise = dec.pointwise
    if form == "sum":
        partial = []
        for r in range(k):
            mid = depthwise(x, dec.depthwise[r::k], f"_{r}", c)
            out = y if k == 1 else gs.Variable(names(f"{base}/pointwise_{r}_output"), dtype=dtype)
            inputs = [mid, gs.Constant(names(f"{base}/pointwise_{r}.weight"), pointwise[:, r::k].astype(dtype))]
            if r == 0 and bias is not None:
                inputs.append(gs.Constant(names(f"{base}/pointwise.bias"), bias.astype(dtype)))
            graph.nodes.append(gs.Node("Conv", names(f"{base}/pointwise_{r}"),
                                       attrs={"kernel_shape": [1, 1], "group": g}, inputs=inputs, outputs=[out]))
            partial.append(out)
        node.outputs.clear()
        node.inputs.clear()
        total = partial[0]
        for r in range(1, k):
            out = y if r == k - 1 else gs.Variable(names(f"{base}/sum_{r}_output"), dtype=dtype)
            graph.nodes.append(gs.Node("Add", names(f"{base}/sum_{r}"), inputs=[total, partial[r]], outputs=[out]))
            total = out
        return form
    if form == "multiplier":
        mid = depthwise(x, dec.depthwise, "", c)
    else:
        order = _rank_major(c, k)
        pointwise = pointwise[:, order]
        if form == "split":
            parts = [depthwise(x, dec.depthwise[r::k], f"_{r}", c) for r in range(k)]
            mid = concat(parts, "depthwise")
        elif form == "concat-input":
            mid = depthwise(concat([x] * k, "input"), dec.depthwise[order], "", c * k)
        else:
            raise ValueError(f"unknown graph form {form!r}")

    pw_inputs = [mid, gs.Constant(names(f"{base}/pointwise.weight"), pointwise.astype(dtype))]
    if bias is not None:
        pw_inputs.append(gs.Constant(names(f"{base}/pointwise.bias"), bias.astype(dtype)))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("Conv", names(f"{base}/pointwise"),
                               attrs={"kernel_shape": [1, 1], "group": g},
                               inputs=pw_inputs, outputs=[y]))
    return form


def replace_conv_with_channel(graph: gs.Graph, layer: ConvLayer, first: np.ndarray, second: np.ndarray,
                              bias: np.ndarray, names: Optional[NameAllocator] = None) -> str:
    """Channel-decomposition baseline: Conv(X, first; original geometry) -> 1x1 Conv(second, bias)."""
    names = names or NameAllocator(graph)
    node = layer.node
    x, y = node.inputs[0], node.outputs[0]
    dtype = layer.weight.dtype
    base = layer.name
    mid = gs.Variable(names(f"{base}/reduce_output"), dtype=dtype)
    spatial = {a: node.attrs[a] for a in _SPATIAL_ATTRS if a in node.attrs}
    graph.nodes.append(gs.Node("Conv", names(f"{base}/reduce"),
                               attrs={"kernel_shape": list(layer.kernel), **spatial},
                               inputs=[x, gs.Constant(names(f"{base}/reduce.weight"), first.astype(dtype))],
                               outputs=[mid]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.append(gs.Node("Conv", names(f"{base}/expand"), attrs={"kernel_shape": [1, 1]},
                               inputs=[mid, gs.Constant(names(f"{base}/expand.weight"), second.astype(dtype)),
                                       gs.Constant(names(f"{base}/expand.bias"), bias.astype(dtype))],
                               outputs=[y]))
    return "channel"
