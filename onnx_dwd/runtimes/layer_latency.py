"""Latency of one conv layer, original or decomposed, measured as a single-layer model.

The selection of rank per layer needs, for each candidate layer, the time of
the original conv and of each decomposed form on the target runtime at the
layer's real input shape. Each is timed as a model holding just that layer
(random weights: the time does not depend on their values), and results are
cached on disk by (runtime, level, threads, layer geometry, form), so a
layer shape seen once is never timed again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from ..fit import network_decoupling
from ..modelio import export_graph
from ..rewrite import replace_conv, replace_conv_with_channel
from ..select import classify_convs
from .base import OrtRunner, Runner
from .timing import interleaved_ms

#: Timing of one layer: warm-up calls, then the median over this many blocks.
WARMUP_CALLS = 3
BLOCKS = 7
BLOCK_SECONDS = 0.02

#: Part of every cache key: bumped when the way layers are timed changes (v2: Loaded.bind).
CACHE_VERSION = "v2"


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv that its run time depends on (batch 1)."""

    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    pads: Tuple[int, int, int, int]
    dilations: Tuple[int, int]
    group: int
    height: int
    width: int

    def output_hw(self) -> Tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        return ((self.height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (self.width + left + right - dw * (kw - 1) - 1) // sw + 1)

    def key(self) -> str:
        return (f"c{self.in_channels}-n{self.out_channels}-k{self.kernel[0]}x{self.kernel[1]}"
                f"-s{self.strides[0]}x{self.strides[1]}-p{'_'.join(map(str, self.pads))}"
                f"-d{self.dilations[0]}x{self.dilations[1]}-g{self.group}-{self.height}x{self.width}")


def single_conv_model(geo: ConvGeometry, seed: int = 0) -> onnx.ModelProto:
    """A model holding one Conv of the given geometry, with random weights and a bias
    (it passes onnx.checker, so converters that check it accept it)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((geo.out_channels, geo.in_channels // geo.group) + tuple(geo.kernel)).astype(np.float32)
    b = rng.standard_normal(geo.out_channels).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", kernel_shape=list(geo.kernel),
                            strides=list(geo.strides), pads=list(geo.pads), dilations=list(geo.dilations),
                            group=geo.group)
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, geo.in_channels, geo.height, geo.width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, geo.out_channels, *geo.output_hw()])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def decomposed_conv_model(geo: ConvGeometry, rank: int, graph_form: str) -> onnx.ModelProto:
    """The single-conv model rewritten by the same code path as optimize (rank K, graph form)."""
    model = single_conv_model(geo)
    graph = gs.import_onnx(model)
    (layer,) = classify_convs(graph)
    if not layer.is_candidate:
        raise ValueError(f"{geo.key()}: not a decomposable conv ({layer.reason})")
    replace_conv(graph, layer, network_decoupling(layer.weight, rank, layer.group), graph_form)
    graph.cleanup().toposort()
    return export_graph(graph, model)


def channel_conv_model(geo: ConvGeometry, channels: int) -> onnx.ModelProto:
    """The single-conv model as the channel baseline writes it: k x k conv to c' channels, then 1x1."""
    model = single_conv_model(geo)
    graph = gs.import_onnx(model)
    (layer,) = classify_convs(graph)
    rng = np.random.default_rng(1)
    first = rng.standard_normal((channels, geo.in_channels) + tuple(geo.kernel)).astype(np.float32)
    second = rng.standard_normal((geo.out_channels, channels, 1, 1)).astype(np.float32)
    replace_conv_with_channel(graph, layer, first, second, layer.bias)
    graph.cleanup().toposort()
    return export_graph(graph, model)


def time_model(model: onnx.ModelProto, runner: Runner, threads: int) -> float:
    """Median ms per call of the single-input model on runner over BLOCKS blocks after a warm-up."""
    loaded = runner.load(model, threads, what="layer model")
    (inp,) = model.graph.input
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    # inputs copied in once (bind): time the runtime, not the glue
    times, _ = interleaved_ms({"layer": loaded.bind(feed)}, BLOCKS, WARMUP_CALLS, BLOCK_SECONDS)
    return float(np.median(times["layer"]))


def default_cache_path() -> Path:
    root = os.environ.get("ONNX_DWD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "onnx-dwd")
    return Path(root) / "layer_latency.json"


class LatencyCache:
    """Measured layer times in a JSON file; keys name runtime, level, threads, geometry and form."""

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self._data: Dict[str, float] = {}
        if self.path.is_file():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}  # a damaged cache is only a cache: measure again

    @staticmethod
    def key(geo: ConvGeometry, form: str, threads: int, runner: Runner) -> str:
        return f"{CACHE_VERSION}|{runner.cache_key()}|t{threads}|{geo.key()}|{form}"

    def get(self, key: str) -> Optional[float]:
        return self._data.get(key)

    def put(self, key: str, ms: float) -> None:
        self._data[key] = ms
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def layer_latency(geo: ConvGeometry, form: str = "original", *, rank: int = 1, threads: int = 1,
                  runner: Optional[Runner] = None, cache: Optional[LatencyCache] = None) -> float:
    """ms per call of the layer: form "original", a graph form of rank K (see rewrite.py), or
    "channel" with rank = c' (the channel baseline), on runner (default onnxruntime at level ALL)."""
    runner = runner or OrtRunner()
    name = "original" if form == "original" else f"{form}@{rank}"
    key = LatencyCache.key(geo, name, threads, runner)
    if cache is not None and cache.get(key) is not None:
        return cache.get(key)
    if form == "original":
        model = single_conv_model(geo)
    elif form == "channel":
        model = channel_conv_model(geo, rank)
    else:
        model = decomposed_conv_model(geo, rank, form)
    ms = time_model(model, runner, threads)
    if cache is not None:
        cache.put(key, ms)
    return ms
