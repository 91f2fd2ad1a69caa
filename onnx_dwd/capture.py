"""Look inside a running model: intermediate tensors become extra graph outputs.

(onnxruntime quantization's calibrators do the same: augment the graph, run,
collect.) The augmented model only ever lives in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .fit.stats import BUFFER_BYTES, LayerStats, MapBuffer, ResidualSums, StatsBuffer, conv_pads, im2col, \
    sampled_patches, shift_structured
from .runtimes import make_session, run_batches
from .segments import Feeds, Lineage
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

    @property
    def patch_key(self) -> tuple:
        """Equal for convs whose patches are equal at equal positions (one input, one geometry)."""
        return (self.input_name, self.kernel, self.strides, self.dilations, self.pads, self.auto_pad, self.group,
                self.in_channels)

    def explicit_pads(self, in_hw) -> Tuple[int, int, int, int]:
        return conv_pads(in_hw, self.kernel, self.strides, self.dilations, self.pads, self.auto_pad)

    def patches(self, x: np.ndarray, positions: Optional[np.ndarray] = None) -> np.ndarray:
        """x [B, c, H, W] -> patches [B, H'*W', c*kh*kw], or [B, P, ...] at positions [B, P] only."""
        pads = self.explicit_pads(x.shape[2:])
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


#: Elements of one im2col patch matrix (float32: 4 bytes each).
IM2COL_BUDGET = 16 * 2**20
#: Bytes a Capture's StatsBuffers aim to share (each takes at least 1 MB and 256 positions):
#: without inter-layer compensation every layer of the model is captured at once; with it a
#: level has a few (three at most on YOLOv8n), and the fit and validation statistics of three 2304-wide layers
#: get blocks of about 2360 positions each.
BUFFERS_BYTES = 128 * 2**20


def input_names(specs: Sequence[CaptureSpec]) -> List[str]:
    return list(dict.fromkeys(s.input_name for s in specs))


def output_names(specs: Sequence[CaptureSpec]) -> List[str]:
    return list(dict.fromkeys(s.output_name for s in specs))


@dataclasses.dataclass(frozen=True)
class Sampled:
    """One conv's outputs over a batch at the positions its statistics use.

    y [B, P, n]; positions [B, P]: flat indices into the output's H'*W'
    (None: every position, in order).
    """

    y: np.ndarray
    positions: Optional[np.ndarray]

    def images(self, index) -> "Sampled":
        """The images at index (an index array or a slice) of the batch."""
        return Sampled(self.y[index], None if self.positions is None else self.positions[index])


class Capture:
    """Accumulates LayerStats per spec from captured tensors, a batch at a time:
    each conv's input x (from the model being built, or the original without
    inter-layer compensation) and its output y (from the original).

    positions_per_image: sample that many output positions per image (None: all).
    position_budget, images: sample about position_budget x d positions per
    layer in total (d: its patch size), evenly from `images` images (None: no
    such limit). The d x d statistics need some multiple of d positions; past
    that, more positions cost time (d^2 each) and add little.

    Convs that read one tensor with one geometry (patch_key) get the same
    positions, so their patches are formed once and their statistics share
    one x x^T per block.

    Positions are added to the statistics in blocks (StatsBuffer; whole maps for shifted
    products, MapBuffer): call flush() before reading any of them.
    """

    def __init__(self, specs: Sequence[CaptureSpec], positions_per_image: Optional[int] = None, seed: int = 0,
                 position_budget: Optional[float] = None, images: Optional[int] = None):
        self.specs = list(specs)
        self.limits = {s.name: positions_per_image for s in self.specs}
        if position_budget and images:
            for s in self.specs:
                d = s.in_channels // s.group * s.kernel[0] * s.kernel[1]
                share = max(1, int(np.ceil(position_budget * d / images)))
                self.limits[s.name] = min(share, positions_per_image or share)
        self.rng = np.random.default_rng(seed)
        self.images = 0
        # by kind and the ids of its LayerStats (each buffer holds them)
        self.buffers: Dict[tuple, Union[StatsBuffer, MapBuffer]] = {}
        # fit and validation statistics per spec share the buffer memory
        self.buffer_bytes = int(np.clip(BUFFERS_BYTES // max(2 * len(self.specs), 1), 2**20, BUFFER_BYTES))

    def new_stats(self) -> Dict[str, LayerStats]:
        return {s.name: LayerStats.zeros(s.out_channels, s.in_channels // s.group * s.kernel[0] * s.kernel[1],
                                         s.group) for s in self.specs}

    def flush(self) -> None:
        """Add every buffered position to its statistics and free the buffers."""
        for buffer in self.buffers.values():
            buffer.flush()
        self.buffers.clear()

    def _buffer(self, kind: str, stats: Sequence[LayerStats], make):
        """The buffer of this kind for stats, made by make() on first use."""
        key = (kind,) + tuple(id(st) for st in stats)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = make()
        return buffer

    def sample(self, outputs: Dict[str, np.ndarray]) -> Dict[str, Sampled]:
        """Each spec's output (by tensor name, [B, n, H', W']) at the positions drawn for it."""
        sampled = {}
        drawn = {}  # convs with one patch_key (and so one limit and output size) share positions
        for spec in self.specs:
            y = outputs[spec.output_name]
            per_image = int(np.prod(y.shape[2:]))
            flat = y.reshape(len(y), y.shape[1], -1)  # [B, n, H'W']
            limit = self.limits[spec.name]
            if limit and limit < per_image:
                pick = drawn.get(spec.patch_key)
                if pick is None:
                    pick = drawn[spec.patch_key] = np.stack(
                        [self.rng.choice(per_image, limit, replace=False) for _ in range(len(y))])
                # one gather, [B, P, n] in C order (the recording writes it as it is): take_along_axis
                # on the transposed view cost 3x as much (YOLOv8n, 1024 images: 2.4 s), and np.stack
                # of per-image takes kept their transposed layout, which the recording then copied
                sampled[spec.name] = Sampled(flat[np.arange(len(flat))[:, None], :, pick], pick)
            else:
                sampled[spec.name] = Sampled(flat.transpose(0, 2, 1), None)  # [B, H'W', n], a view
        return sampled

    def add(self, inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray], stats: Dict[str, LayerStats],
            validation: Optional[Dict[str, LayerStats]] = None, period: int = 4) -> None:
        """Accumulate one batch into stats; with `validation`, every period-th image
        (counted across calls) goes there instead. inputs / outputs: by tensor name."""
        self.add_sampled(inputs, self.sample(outputs), stats, validation, period)

    def add_sampled(self, inputs: Dict[str, np.ndarray], sampled: Dict[str, Sampled],
                    stats: Dict[str, LayerStats], validation: Optional[Dict[str, LayerStats]] = None,
                    period: int = 4) -> None:
        """add() with the outputs already sampled (by spec name, from sample())."""
        batch = len(next(iter(sampled.values())).y)
        index = self.images + np.arange(batch)
        self.images += batch
        routes = [(stats, np.arange(batch))]
        if validation is not None:
            to_val = index % period == period - 1
            routes = [(stats, np.flatnonzero(~to_val)), (validation, np.flatnonzero(to_val))]
        for target, rows in routes:
            def add(group, patches, outputs, target=target):
                sums = [target[spec.name] for spec in group]
                self._buffer("positions", sums, lambda: StatsBuffer(sums, self.buffer_bytes)).add(patches, *outputs)

            def add_maps(group, x, outputs, target=target):
                sums, spec = [target[s.name] for s in group], group[0]
                self._buffer("maps", sums, lambda: MapBuffer(sums, spec.kernel, spec.explicit_pads(x.shape[2:]),
                                                             self.buffer_bytes)).add(x, *outputs)
            if len(rows) == batch:  # one route takes everything: no copies
                self._accumulate(inputs, sampled, add, add_maps)
            elif len(rows):
                self._accumulate({k: v[rows] for k, v in inputs.items()},
                                 {k: s.images(rows) for k, s in sampled.items()}, add, add_maps)

    def add_residuals(self, inputs: Dict[str, np.ndarray], sampled: Dict[str, Sampled],
                      sums: Dict[str, ResidualSums]) -> None:
        """Accumulate one batch's errors of fitted weights (by spec name) at the sampled positions."""
        def add(group, patches, outputs):
            for spec, y in zip(group, outputs):
                sums[spec.name].add(patches, y)
        self._accumulate(inputs, sampled, add)

    def _sharing(self, sampled: Dict[str, Sampled]) -> List[List[CaptureSpec]]:
        """The specs in groups with equal patches: one patch_key and equal positions."""
        groups: List[List[CaptureSpec]] = []
        for spec in self.specs:
            positions = sampled[spec.name].positions
            for group in groups:
                other = sampled[group[0].name].positions
                if group[0].patch_key == spec.patch_key and (
                        positions is other or (positions is not None and other is not None
                                               and np.array_equal(positions, other))):
                    group.append(spec)
                    break
            else:
                groups.append([spec])
        return groups

    def _accumulate(self, inputs, sampled, add, add_maps=None) -> None:
        """Each group of specs' patches (formed once) and outputs, a bounded number of images at
        a time, to add(group, patches [P, d], [outputs [P, n] per spec]). With add_maps, a
        group whose statistics shifted products compute (shift_structured, every position)
        goes there instead as add_maps(group, x [B, c, H, W], [outputs [B, H'*W', n] per spec])."""
        for group in self._sharing(sampled):
            spec = group[0]
            x = inputs[spec.input_name]
            ys = [sampled[s.name].y for s in group]
            positions = sampled[spec.name].positions
            for s, y in zip(group, ys):
                if len(x) != len(y):
                    raise RuntimeError(f"internal: {s.name}: {len(x)} inputs but {len(y)} outputs in a batch")
            if add_maps is not None and positions is None and shift_structured(
                    spec.kernel, spec.strides, spec.dilations, spec.group, ys[0].shape[1]):
                add_maps(group, x, ys)
                continue
            d = x.shape[1] * spec.kernel[0] * spec.kernel[1]
            # images per im2col, bounding memory; the sampled patches are gathered directly
            step = max(1, IM2COL_BUDGET // max(ys[0].shape[1] * d, 1))
            for b in range(0, x.shape[0], step):
                patches = spec.patches(x[b:b + step], None if positions is None else positions[b:b + step])
                add(group, patches.reshape(-1, d), [y[b:b + step].reshape(-1, y.shape[2]) for y in ys])


def capture_stats(model: onnx.ModelProto, specs: Sequence[CaptureSpec], feeds: Feeds,
                  capture: Optional[Capture] = None, validation: Optional[Dict[str, LayerStats]] = None,
                  what: str = "model") -> Dict[str, LayerStats]:
    """Statistics of specs' convs in one pass of model over feeds (inputs and outputs both
    from model: no inter-layer compensation)."""
    capture = capture or Capture(specs)
    stats = capture.new_stats()
    names = input_names(specs) + output_names(specs)
    for values in Lineage(feeds, what=what).step(model, names, keep=False):
        capture.add(values, values, stats, validation)
    capture.flush()
    return stats
