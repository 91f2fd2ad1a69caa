"""Decompose a model in memory: fold, classify, capture, fit and rewrite. No files, no validation.

decompose_model is the one place a model's candidate convs are fitted and
replaced; optimize() (api.py) and the budgeted choice (selection.py) call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from . import __version__
from .background import in_background
from .calib import Calibration
from .capture import Capture, CaptureSpec, dependency_levels, input_names, output_names, tensor_shapes
from .config import DATA_FREE_METHODS, OptimizeConfig
from .cost import channel_macs, channels_for_rank, conv_macs, decomposed_macs
from .errors import DwdError
from .fit import network_decoupling, reconstruct_weight
from .fit.data import channel, dwd, dwd_comp, refit
from .fit.stats import ResidualSums
from .fold import fold_affine_into_convs
from .heldout import HeldOutErrors, any_batch_size
from .modelio import check_model, export_graph
from .passes import Progress, consume, no_progress, replayed
from .planner import Decision
from .reference import ReferenceOutputs
from .rewrite import replace_conv, replace_conv_with_channel
from .segments import Lineage
from .select import ConvLayer, classify_convs
from .tensors import NameAllocator
from .validate import RecordedReference

_DATA_FITS = {"dwd": dwd, "dwd-comp": dwd_comp}


def _layer_entry(layer: ConvLayer, out_shape: Optional[tuple]) -> Dict:
    macs = None
    if out_shape is not None and layer.in_channels is not None:
        macs = conv_macs(out_shape, layer.out_channels, layer.in_channels, layer.group, layer.kernel)
    return {
        "name": layer.name, "op": layer.op, "kernel": list(layer.kernel),
        "in_channels": layer.in_channels, "out_channels": layer.out_channels, "group": layer.group,
        "decomposed": False, "reason": layer.reason, "rank": None, "graph_form": None,
        "output_shape": list(out_shape) if out_shape else None,
        "macs_before": macs, "macs_after": macs, "weight_rel_error": None, "rel_error": None,
    }


@dataclasses.dataclass
class Decomposed:
    """Result of decompose_model: the new model, one report entry per conv, folded node names."""

    model: onnx.ModelProto
    layers: List[Dict]
    folded: List[str]
    method: str
    inter_layer: bool


def _fit_and_replace(graph, layer, entry, method, rank, graph_form, config, names, fit_stats, val_stats=None):
    """Fit one candidate at rank (in graph_form), rewrite it in graph, fill its report entry.
    Returns the weight and bias the new nodes compute together ([n, c/G, kh, kw], [n] or None)."""
    w = layer.weight.astype(np.float64)
    out_shape = entry["output_shape"]
    if method == "channel":
        channels = channels_for_rank(layer.out_channels, layer.in_channels, layer.kernel, rank)
        ch = channel(layer.weight, fit_stats, channels)
        rebuilt = (ch.second[:, :, 0, 0].astype(np.float64) @ ch.first.reshape(ch.channels, -1)).reshape(w.shape)
        bias = ch.bias
        entry["graph_form"] = replace_conv_with_channel(graph, layer, ch.first, ch.second, ch.bias, names)
        entry.update(decomposed=True, rank=rank, channels=ch.channels)
        if out_shape:
            entry["macs_after"] = channel_macs(out_shape, layer.out_channels, layer.in_channels, layer.kernel,
                                               ch.channels)
    else:
        if method == "nd":
            dec = network_decoupling(layer.weight, rank, layer.group)
        elif method == "refit":
            fixed = None if config.refit_variant == "auto" else config.refit_variant
            dec = refit(layer.weight, fit_stats, rank, validation=val_stats, variant=fixed,
                        sweeps=config.refit_sweeps)
            entry["refit_variant"] = dec.detail
        else:
            dec = _DATA_FITS[method](layer.weight, fit_stats, rank)
        rebuilt = reconstruct_weight(dec).astype(np.float64)
        bias = dec.bias if dec.bias is not None else layer.bias
        entry["graph_form"] = replace_conv(graph, layer, dec, graph_form, names)
        entry.update(decomposed=True, rank=dec.rank)
        if out_shape:
            entry["macs_after"] = decomposed_macs(out_shape, layer.out_channels, layer.in_channels,
                                                  layer.group, layer.kernel, dec.rank)
    entry["weight_rel_error"] = float(np.linalg.norm(rebuilt - w) / max(np.linalg.norm(w), 1e-30))
    return rebuilt, bias


#: onnxruntime threads of a level's pass, which runs beside the statistics (YOLOv8n, 256
#: images on 2 cores, rank 1: 58-59 s with one thread, 61-63 s with two).
PASS_THREADS = max(1, (os.cpu_count() or 2) // 2)


def _fit_levels(graph, original, prepared, levels, entries, plan, method, config, names, calibration, workdir,
                inter_layer, what, progress, reference=None, validation=None) -> None:
    """Capture and fit level by level. With inter_layer, each level's inputs come from the
    model whose lower levels are already replaced (a Lineage: every node run once over the
    fit data) and its outputs from one pass of the original (ReferenceOutputs: recorded
    here, or given by the caller to share between models, covering every level). The
    held-out errors of every level are measured in a few Lineage steps of their own
    (HeldOutErrors), beside the later levels."""
    needs_fit_data = method not in DATA_FREE_METHODS
    parts = calibration_parts(calibration, needs_fit_data)
    # the held-out part's Lineage, with inter-layer fitting, is HeldOutErrors' own
    current = {p: Lineage(part.batches, workdir, f"current-{p}", what, PASS_THREADS) for p, part in parts.items()
               if p == "fit" or not inter_layer}
    shared = reference is not None
    if shared and (set(reference) != set(parts) or any(l.name not in reference[p].paths for p in parts
                                                         for group in levels for l in group)):
        raise RuntimeError("internal: the shared reference outputs do not cover these parts and layers")
    if inter_layer and not shared:
        reference = _record_reference(prepared, [l for group in levels for l in group], parts, config,
                                      calibration.fit.count, workdir, what, progress, validation)
    errors: Dict[str, ResidualSums] = {}
    held_out = None  # with inter-layer fitting, measured beside the later levels
    if "held-out" in parts and inter_layer:
        held_out = HeldOutErrors(parts["held-out"].batches, reference["held-out"],
                                 [CaptureSpec.of(l) for group in levels for l in group], entries, errors, workdir,
                                 delete=not shared, per_image=any_batch_size(prepared), what=what,
                                 threads=PASS_THREADS)
    model = prepared
    try:
        for index, group in enumerate(levels):
            last = index == len(levels) - 1
            specs = [CaptureSpec.of(l) for l in group]
            capture = configured_capture(specs, config, calibration.fit.count, config.seed + index)
            stage = f"level {index + 1}/{len(levels)}" if inter_layer else "capture"

            def each_batch(p, label, consume_batch):
                """consume_batch(inputs, sampled outputs) for every batch of part p, this level's
                pass running in a worker thread meanwhile."""
                if inter_layer:
                    inputs, batches = replayed(current[p], model, specs, reference[p], keep=not last,
                                               delete=not shared)
                else:  # inputs and outputs from one pass of the original
                    inputs = in_background(current[p].step(model, input_names(specs) + output_names(specs),
                                                           keep=False))
                    batches = ((values, capture.sample(values)) for values in inputs)
                consume(inputs, batches, consume_batch, progress, label)

            stats = capture.new_stats() if needs_fit_data else None  # d x d each: only for the fits that read them
            # refit picks its variant on images of the fit data it does not fit on first
            val_stats = capture.new_stats() if method == "refit" and config.refit_variant == "auto" else None
            if "fit" in parts:
                each_batch("fit", f"{stage}: fit data, {len(group)} layers",
                           lambda xs, ys: capture.add_sampled(xs, ys, stats, val_stats))
                capture.flush()
            replaced = {}  # output tensor -> the nodes now computing it
            for layer in progress(group, f"{stage}: fitting ({method})", len(group)):
                start, output = len(graph.nodes), layer.output_name  # the node loses its outputs
                weight, bias = _fit_and_replace(graph, layer, entries[layer.name], method, *plan[layer.name],
                                                config, names, stats[layer.name] if stats is not None else None,
                                                val_stats[layer.name] if val_stats else None)
                replaced[output] = graph.nodes[start:]  # the rewrites append their nodes
                errors[layer.name] = ResidualSums(weight, bias, layer.group)
            if inter_layer:
                model = with_replacements(model, replaced)
            if held_out is not None:
                held_out.released(model, set(errors))
            # the fitted weights' own errors: cheaper than held-out statistics (n d per position, not d^2)
            if "held-out" in parts and not inter_layer:
                each_batch("held-out", f"{stage}: held-out data",
                           lambda xs, ys: capture.add_residuals(xs, ys, errors))
        if held_out is not None:
            held_out.finish(model, progress)
    finally:
        if held_out is not None:
            held_out.close()
    for name, sums in errors.items():
        if sums.count:
            entries[name]["rel_error"] = sums.relative_error()


def with_replacements(model: onnx.ModelProto, replaced: Mapping[str, List[gs.Node]]) -> onnx.ModelProto:
    """A copy of model in which the node computing each tensor of replaced is swapped for the
    graph nodes now computing it, each exported on its own, with their constants: what a
    Lineage reads of an export of the whole graph (the nodes in an order that computes
    every input first, and their initializers), at the cost of the new nodes only.
    Exporting the whole graph per level cost 26 ms a time on YOLOv8n, and a cleanup and
    sort of the graph as much again. The replaced nodes' own weights stay, unused."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = list(result.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    for index, new_nodes in sorted(((producer[t], new) for t, new in replaced.items()), key=lambda p: -p[0]):
        nodes[index:index + 1] = [OnnxExporter.export_node(n) for n in new_nodes]
        result.graph.initializer.extend(OnnxExporter.export_tensor_proto(t) for n in new_nodes for t in n.inputs
                                        if isinstance(t, gs.Constant))
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


def calibration_parts(calibration: Calibration, needs_fit_data: bool) -> Dict[str, object]:
    """The parts of the data a calibrated fit passes over, by name ("fit", "held-out"):
    the fit part only for methods that fit on data, and no empty part (--holdout 0), whose
    Lineage would not even learn tensor types."""
    parts = {"fit": calibration.fit, "held-out": calibration.holdout} if needs_fit_data \
        else {"held-out": calibration.holdout}
    return {p: part for p, part in parts.items() if part.count}


def uses_inter_layer(config: OptimizeConfig, method: str, calibration: Optional[Calibration]) -> bool:
    """Whether the fit is compensated across layers (paper section 3.6): data methods only."""
    return config.inter_layer and method not in DATA_FREE_METHODS and calibration is not None


def configured_capture(specs, config: OptimizeConfig, fit_images: int, seed: int) -> Capture:
    """A Capture sampling positions as config asks. A recording of the original's outputs
    and the statistics fitted on it must sample alike, so both are made here.
    fit_images counts items: with batched arrays the budget over-samples, never under."""
    return Capture(specs, config.positions_per_image, seed, config.position_budget, fit_images)


def _record_reference(prepared, layers, parts, config, fit_images, workdir, what, progress, validation=None
                      ) -> Dict[str, ReferenceOutputs]:
    """One pass of the original over each part, its candidates' outputs kept at the positions
    each layer's statistics will use; validation (a RecordedReference): the pass over the
    held-out part also records the model's outputs there."""
    specs = [CaptureSpec.of(l) for l in layers]
    capture = configured_capture(specs, config, fit_images, config.seed)
    stores = {}
    for p, part in parts.items():
        stores[p] = ReferenceOutputs(workdir, f"reference-{p}", [s.name for s in specs])
        original_pass(prepared, specs, part.batches, capture, store=stores[p], what=what, progress=progress,
                      label=f"original model: {p} data", outputs=validation if p == "held-out" else None)
    return stores


def original_pass(model: onnx.ModelProto, specs, batches, capture: Capture, *, consume=None,
                  store: Optional[ReferenceOutputs] = None, threads: Optional[int] = None, what: str = "model",
                  progress: Progress = no_progress, label: str = "original model",
                  outputs: Optional[RecordedReference] = None) -> None:
    """One pass of model over batches (a re-iterable of feeds), sampling specs' outputs with
    capture: each batch's sampled outputs go to store, and with its inputs to
    consume(values by tensor name, sampled by spec name); outputs: each batch's values of
    outputs.names (the graph's outputs) go to outputs.record. The pass runs in a worker thread;
    threads: its onnxruntime threads (None: every core, when this thread only writes). They do
    not spin while idle: this thread's sampling and writing need a core meanwhile (YOLOv8n,
    256 images: 6-16% less CPU in the pass, benchmarks/RESULTS.md section 5)."""
    names = (input_names(specs) if consume is not None else []) + output_names(specs)
    if outputs is not None:
        names += [n for n in outputs.names if n not in names]
    values = in_background(Lineage(batches, what=what, threads=threads, spin=False).step(model, names, keep=False))
    try:
        with contextlib.ExitStack() as stack:
            write = stack.enter_context(store.recording()) if store is not None else None
            for batch in progress(values, label, None):
                sampled = capture.sample(batch)
                if write is not None:
                    write(sampled)
                if outputs is not None:
                    outputs.record([batch[n] for n in outputs.names])
                if consume is not None:
                    consume(batch, sampled)
    finally:
        values.close()


def decompose_model(original: onnx.ModelProto, config: OptimizeConfig,
                    shape_feed: Optional[Dict[str, np.ndarray]] = None, *,
                    calibration: Optional[Calibration] = None, what: str = "model",
                    progress: Progress = no_progress,
                    decisions: Optional[Mapping[str, Decision]] = None,
                    reference: Optional[Mapping[str, ReferenceOutputs]] = None,
                    validation: Optional[RecordedReference] = None) -> Decomposed:
    """Fold, classify, capture, fit and rewrite in memory; no files, no model validation.

    shape_feed: one input to learn conv output shapes for the MAC counts
    (without it MACs are None). calibration: data to fit on (its fit part)
    and to measure per-layer errors on (its held-out part). decisions: rank
    and graph form (or keep) per candidate, from the planner; without them
    every candidate gets config.rank in config.graph_form. reference: the
    original model's sampled outputs over each part of calibration, for every
    candidate (original_pass with a store per part, as selection.py does), to
    share one pass of the original between models; without it a compensated
    fit records its own (sampled positions are drawn for the layers recorded,
    so the two can fit on different positions). validation: where that own pass
    over the held-out part records the model's outputs (see RecordedReference;
    it stays empty if no such pass runs).
    """
    # One BLAS thread: the fits loop over small matrices, where OpenBLAS's
    # spinning worker threads cost 5-20x on a 2-core machine with anything
    # else running (onnxruntime included); measured in benchmarks/RESULTS.md.
    with threadpool_limits(limits=1, user_api="blas"):
        return _decompose(original, config, shape_feed, calibration, what, progress, decisions, reference,
                          validation)


@dataclasses.dataclass
class Prepared:
    """The model with affine nodes folded into convs, and every conv classified."""

    graph: gs.Graph
    model: onnx.ModelProto
    folded: List[str]
    layers: List[ConvLayer]
    candidates: List[ConvLayer]


def prepare(original: onnx.ModelProto, method: str, what: str) -> Prepared:
    graph = gs.import_onnx(original)
    folded = fold_affine_into_convs(graph)
    graph.cleanup()
    layers = classify_convs(graph)
    if not layers:
        raise DwdError(f"{what}: the model has no Conv nodes; nothing to do")
    if method == "channel":
        for l in layers:
            if l.is_candidate and l.group > 1:
                l.reason = "grouped conv: the channel method supports group 1 only"
    return Prepared(graph, export_graph(graph, original), folded, layers, [l for l in layers if l.is_candidate])


def _decompose(original, config, shape_feed, calibration, what, progress, decisions, reference, validation
               ) -> Decomposed:
    method = config.resolved_method(calibration is not None)
    prep = prepare(original, method, what)
    graph, prepared, layers = prep.graph, prep.model, prep.layers
    shapes = {}
    if shape_feed is not None:
        shapes = tensor_shapes(prepared, shape_feed, [l.output_name for l in layers], what=what)
    entries = {l.name: _layer_entry(l, shapes.get(l.output_name)) for l in layers}
    candidates = prep.candidates
    plan = {l.name: (config.rank, config.graph_form) for l in candidates}
    if decisions is not None:
        for l in candidates:
            d = decisions[l.name]
            entries[l.name].update(latency_before_ms=d.keep_ms, latency_after_ms=d.ms,
                                   planned_rel_error=d.error_estimate)
            if d.rank is None:
                l.reason = entries[l.name]["reason"] = d.reason
            plan[l.name] = (d.rank, d.graph_form)
        candidates = [l for l in candidates if l.is_candidate]
    names = NameAllocator(graph)

    inter_layer = uses_inter_layer(config, method, calibration)
    if calibration is None:
        for layer in candidates:
            _fit_and_replace(graph, layer, entries[layer.name], method, *plan[layer.name], config, names, None)
    else:
        levels = dependency_levels(graph, candidates) if inter_layer else [candidates]
        levels = [group for group in levels if group]  # every candidate may be kept: nothing to pass over
        if levels:
            with tempfile.TemporaryDirectory(prefix="onnx-dwd-levels-") as workdir:
                _fit_levels(graph, original, prepared, levels, entries, plan, method, config, names, calibration,
                            Path(workdir), inter_layer, what, progress, reference if inter_layer else None,
                            validation)
    graph.cleanup().toposort()
    model = export_graph(graph, original)
    kept = [p for p in model.metadata_props if p.key != "onnx_dwd"]  # a model optimized before
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    ranks = config.rank if decisions is None else "per-layer"
    model.metadata_props.add(key="onnx_dwd", value=f"version={__version__} method={method} rank={ranks}")
    check_model(model, f"optimized {what}")
    return Decomposed(model, [entries[l.name] for l in layers], prep.folded, method, inter_layer)
