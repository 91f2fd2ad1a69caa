"""Look inside a running model: intermediate tensors become extra graph outputs.

(onnxruntime quantization's calibrators do the same: augment the graph, run,
collect.) The augmented model only ever lives in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .modelio import export_graph
from .fit.stats import LayerStats, conv_pads, im2col, sampled_patches
from .runtimes import make_session, run_batches
from .select import ConvLayer


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


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """What to capture for one conv: its input (in the model being built) and
    its output (in the original), with the geometry im2col needs."""

    name: str
    input_name: str
    output_name: str
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    dilations: Tuple[int, int]
    pads: Optional[Tuple[int, ...]]
    auto_pad: str
    group: int
    in_channels: int
    out_channels: int

    @classmethod
    def of(cls, layer: ConvLayer) -> "CaptureSpec":
        a = layer.node.attrs
        auto_pad = a.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return cls(layer.name, layer.node.inputs[0].name, layer.output_name, tuple(layer.kernel),
                   tuple(a.get("strides", (1, 1))), tuple(a.get("dilations", (1, 1))),
                   tuple(a["pads"]) if "pads" in a else None, auto_pad, layer.group,
                   layer.in_channels, layer.out_channels)

    def patches(self, x: np.ndarray, positions: Optional[np.ndarray] = None) -> np.ndarray:
        """x [B, c, H, W] -> patches [B, H'*W', c*kh*kw], or [B, P, ...] at positions [B, P] only."""
        pads = conv_pads(x.shape[2:], self.kernel, self.strides, self.dilations, self.pads, self.auto_pad)
        if positions is not None:
            return sampled_patches(x, positions, self.kernel, self.strides, self.dilations, pads)
        p = im2col(x, self.kernel, self.strides, self.dilations, pads)
        return p.reshape(p.shape[0], -1, p.shape[-1])


def dependency_levels(graph: gs.Graph, candidates: Sequence[ConvLayer]) -> List[List[ConvLayer]]:
    """Candidates grouped so that no layer depends on another of its own or a later group.

    A layer's level is 1 + the highest level of the candidates upstream of
    its input (0 if none): all layers of a level can be fitted from one pass
    over the model whose lower levels are already decomposed.
    """
    ids = {id(l.node): l for l in candidates}
    height: Dict[int, int] = {}  # tensor id -> 1 + highest candidate level upstream (0: none)
    level: Dict[str, int] = {}
    for node in _toposorted(graph):
        h = max((height.get(id(t), 0) for t in node.inputs), default=0)
        if id(node) in ids:
            level[ids[id(node)].name] = h
            h += 1
        for t in node.outputs:
            height[id(t)] = h
    groups: Dict[int, List[ConvLayer]] = {}
    for l in candidates:
        groups.setdefault(level[l.name], []).append(l)
    return [groups[k] for k in sorted(groups)]


def _toposorted(graph: gs.Graph) -> List[gs.Node]:
    """graph's nodes in topological order, without reordering graph itself."""
    seen, order = set(), []
    producers = {id(t): t.inputs[0] for n in graph.nodes for t in n.outputs if t.inputs}
    for root in graph.nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in seen:
                continue
            if expanded:
                seen.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            for t in node.inputs:
                p = producers.get(id(t))
                if p is not None and id(p) not in seen:
                    stack.append((p, False))
    return order


def truncated(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The part of model needed to compute the named tensors, which become its outputs."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = [tensors[n] for n in dict.fromkeys(names)]
    graph.cleanup(remove_unused_graph_inputs=False)
    return export_graph(graph, model, do_type_check=False)


#: Elements of one im2col patch matrix (float32: 4 bytes each).
IM2COL_BUDGET = 16 * 2**20


class Capture:
    """Streams feeds through the original model (outputs y) and the model being
    built (inputs x) in lockstep and accumulates LayerStats per spec.

    With current=None the inputs come from the original too (no inter-layer
    compensation). positions_per_image: sample that many output positions per
    image (None: all).
    """

    def __init__(self, reference: onnx.ModelProto, current: Optional[onnx.ModelProto],
                 specs: Sequence[CaptureSpec], positions_per_image: Optional[int] = None, seed: int = 0,
                 what: str = "model"):
        self.specs = list(specs)
        graph_inputs = {i.name for i in reference.graph.input}
        ref_names = [s.output_name for s in self.specs]
        cur_names = [s.input_name for s in self.specs if s.input_name not in graph_inputs]
        if current is None:
            ref_names += cur_names
            cur_names = []
        self.ref_names, self.cur_names = list(dict.fromkeys(ref_names)), list(dict.fromkeys(cur_names))
        self.ref = make_session(truncated(reference, self.ref_names), what=what)
        self.cur = make_session(truncated(current, self.cur_names), what=what) if self.cur_names else None
        self.positions = positions_per_image
        self.rng = np.random.default_rng(seed)
        self.what = what
        self.images = 0

    def new_stats(self) -> Dict[str, LayerStats]:
        return {s.name: LayerStats.zeros(s.out_channels, s.in_channels // s.group * s.kernel[0] * s.kernel[1],
                                         s.group) for s in self.specs}

    def add(self, feed: Dict[str, np.ndarray], stats: Dict[str, LayerStats],
            validation: Optional[Dict[str, LayerStats]] = None, period: int = 4) -> None:
        """Accumulate one feed's positions into stats; with `validation`, every
        period-th image (counted across calls) goes there instead."""
        (ref_vals,) = run_batches(self.ref, [feed], self.ref_names, what=self.what)
        values = dict(zip(self.ref_names, ref_vals))
        if self.cur is not None:
            (cur_vals,) = run_batches(self.cur, [feed], self.cur_names, what=self.what)
            values.update(zip(self.cur_names, cur_vals))
        batch = len(next(iter(values.values())))
        index = self.images + np.arange(batch)
        self.images += batch
        routes = [(stats, np.arange(batch))]
        if validation is not None:
            to_val = index % period == period - 1
            routes = [(stats, np.flatnonzero(~to_val)), (validation, np.flatnonzero(to_val))]
        for target, rows in routes:
            if len(rows) == batch:  # one route takes everything: no copies
                self._accumulate(values, feed, target)
            elif len(rows):
                self._accumulate({k: v[rows] for k, v in values.items()},
                                 {k: v[rows] for k, v in feed.items()}, target)

    def _accumulate(self, values, feed, stats) -> None:
        for spec in self.specs:
            x = feed[spec.input_name] if spec.input_name in feed else values[spec.input_name]
            y = values[spec.output_name]
            per_image = int(np.prod(y.shape[2:]))
            d = x.shape[1] * spec.kernel[0] * spec.kernel[1]
            step = max(1, IM2COL_BUDGET // max(per_image * d, 1))  # images per im2col, bounding memory
            sample = bool(self.positions and self.positions < per_image)
            if sample:  # the sampled patches are gathered directly: far less memory, more images per step
                step = max(1, IM2COL_BUDGET // max(self.positions * d, 1))
            for b in range(0, x.shape[0], step):
                xs = x[b:b + step]
                outs = y[b:b + step].reshape(len(xs), y.shape[1], -1).transpose(0, 2, 1)  # [B, H'W', n]
                if sample:
                    pick = np.stack([self.rng.choice(per_image, self.positions, replace=False)
                                     for _ in range(len(xs))])
                    patches = spec.patches(xs, pick)
                    outs = np.take_along_axis(outs, pick[:, :, None], axis=1)
                else:
                    patches = spec.patches(xs)  # [B, H'W', d]
                stats[spec.name].add(patches.reshape(-1, d), outs.reshape(-1, y.shape[1]))
