"""optimize(): the one orchestrator. Load, fold, classify, capture, fit, rewrite, validate, save."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from . import __version__
from .calib import (IMAGE_SUFFIXES, Calibration, DiskCache, array_calibration, feed_calibration,
                    image_calibration, random_feeds, resolve_input_specs)
from .capture import Capture, CaptureSpec, dependency_levels, tensor_shapes
from .config import DATA_FREE_METHODS, OptimizeConfig
from .cost import channel_macs, channels_for_rank, conv_macs, count_params, decomposed_macs
from .errors import DwdError, OptionError
from .fit import network_decoupling, reconstruct_weight
from .fit.data import channel, dwd, dwd_comp, refit
from .fit.stats import relative_error
from .fold import fold_affine_into_convs
from .modelio import (check_model, check_writable, default_opset, export_graph, load_model, refuse_to_overwrite,
                      staged_model, write_text_atomic)
from .report import render_markdown, to_json
from .rewrite import replace_conv, replace_conv_with_channel
from .runtimes import make_session, run_batches
from .select import ConvLayer, classify_convs
from .tensors import NameAllocator
from .validate import compare_runs

#: progress(iterable, label, length) -> iterable; the CLI shows a bar, the API default shows nothing.
Progress = Callable[[Iterable, str, Optional[int]], Iterable]

_DATA_FITS = {"dwd": dwd, "dwd-comp": dwd_comp}


def _no_progress(iterable, label, length):
    return iterable


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


def _fit_and_replace(graph, layer, entry, method, config, names, fit_stats, held_stats, val_stats=None):
    """Fit one candidate, rewrite it in graph, fill its report entry."""
    rank, graph_form = config.rank, config.graph_form
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
            dec = refit(layer.weight, fit_stats, rank, validation=val_stats, variant=fixed)
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
    if held_stats is not None and held_stats.count:
        entry["rel_error"] = relative_error(held_stats, rebuilt, bias)


def decompose_model(original: onnx.ModelProto, config: OptimizeConfig,
                    shape_feed: Optional[Dict[str, np.ndarray]] = None, *,
                    calibration: Optional[Calibration] = None, what: str = "model",
                    progress: Progress = _no_progress) -> Decomposed:
    """Fold, classify, capture, fit and rewrite in memory; no files, no model validation.

    shape_feed: one input to learn conv output shapes for the MAC counts
    (without it MACs are None). calibration: data to fit on (its fit part)
    and to measure per-layer errors on (its held-out part).
    """
    # One BLAS thread: the fits loop over small matrices, where OpenBLAS's
    # spinning worker threads cost 5-20x on a 2-core machine with anything
    # else running (onnxruntime included); measured in benchmarks/RESULTS.md.
    with threadpool_limits(limits=1, user_api="blas"):
        return _decompose(original, config, shape_feed, calibration, what, progress)


def _decompose(original, config, shape_feed, calibration, what, progress) -> Decomposed:
    method = config.resolved_method(calibration is not None)
    graph = gs.import_onnx(original)
    folded = fold_affine_into_convs(graph)
    graph.cleanup()
    layers = classify_convs(graph)
    if not layers:
        raise DwdError(f"{what}: the model has no Conv nodes; nothing to do")
    prepared = export_graph(graph, original)
    shapes = {}
    if shape_feed is not None:
        shapes = tensor_shapes(prepared, shape_feed, [l.output_name for l in layers], what=what)
    entries = {l.name: _layer_entry(l, shapes.get(l.output_name)) for l in layers}
    candidates = [l for l in layers if l.is_candidate]
    if method == "channel":
        for l in [l for l in candidates if l.group > 1]:
            l.reason = entries[l.name]["reason"] = "grouped conv: the channel method supports group 1 only"
        candidates = [l for l in candidates if l.group == 1]
    names = NameAllocator(graph)

    inter_layer = config.inter_layer and method not in DATA_FREE_METHODS and calibration is not None
    if calibration is None:
        for layer in candidates:
            _fit_and_replace(graph, layer, entries[layer.name], method, config, names, None, None)
    else:
        needs_fit_data = method not in DATA_FREE_METHODS
        levels = dependency_levels(graph, candidates) if inter_layer else [candidates]
        for index, group in enumerate(levels):
            graph.cleanup().toposort()
            current = export_graph(graph, original) if inter_layer and index > 0 else None
            capture = Capture(prepared, current, [CaptureSpec.of(l) for l in group],
                              config.positions_per_image, config.seed + index, what=what)
            fit_stats = capture.new_stats() if needs_fit_data else None
            # refit picks its variant on images of the fit data it does not fit on first
            val_stats = capture.new_stats() if method == "refit" and config.refit_variant == "auto" else None
            held_stats = capture.new_stats()
            stage = f"level {index + 1}/{len(levels)}" if inter_layer else "capture"
            if needs_fit_data:
                for feed in progress(calibration.fit.batches(), f"{stage}: fit data, {len(group)} layers",
                                     None):
                    capture.add(feed, fit_stats, val_stats)
            for feed in progress(calibration.holdout.batches(), f"{stage}: held-out data", None):
                capture.add(feed, held_stats)
            for layer in progress(group, f"{stage}: fitting ({method})", len(group)):
                _fit_and_replace(graph, layer, entries[layer.name], method, config, names,
                                 fit_stats[layer.name] if fit_stats else None, held_stats[layer.name],
                                 val_stats[layer.name] if val_stats else None)
    graph.cleanup().toposort()
    model = export_graph(graph, original)
    kept = [p for p in model.metadata_props if p.key != "onnx_dwd"]  # a model optimized before
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key="onnx_dwd", value=f"version={__version__} method={method} rank={config.rank}")
    check_model(model, f"optimized {what}")
    return Decomposed(model, [entries[l.name] for l in layers], folded, method, inter_layer)


def load_calibration(config: OptimizeConfig, specs, calibration=None) -> Optional[Calibration]:
    """The calibration source: the API's iterable of feed dicts, or config.calib (images or arrays)."""
    if calibration is not None:
        return feed_calibration(calibration, specs, config.holdout)
    if config.calib is None:
        return None
    path = Path(config.calib)
    if not path.exists():
        raise OptionError(f"--calib {path}: no such file or directory")
    if path.is_file():
        if path.suffix not in (".npy", ".npz"):
            raise OptionError(f"--calib {path}: expected a folder of images, or .npy/.npz files")
        return array_calibration(path, specs, config.holdout, limit=config.max_images)
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
    if suffixes & {".npy", ".npz"} and not suffixes & set(IMAGE_SUFFIXES):
        return array_calibration(path, specs, config.holdout, limit=config.max_images)
    return image_calibration(path, specs, config.preprocess, config.holdout, limit=config.max_images)


def optimize(input_path: os.PathLike, output_path: os.PathLike, config: Optional[OptimizeConfig] = None, *,
             calibration=None, progress: Progress = _no_progress) -> Dict:
    """Decompose every regular conv of input_path and write output_path; returns the report.

    calibration: in the Python API, any iterable of feed dicts (a list, a
    generator, an onnxruntime CalibrationDataReader) instead of config.calib.
    Raises DwdError (with a message naming the file, node or option) for
    anything the user can fix. The output is written only after it passed
    onnx.checker and ran in onnxruntime, and the report describes exactly the
    file written.
    """
    config = config or OptimizeConfig()
    input_path, output_path = Path(input_path), Path(output_path)
    started = time.perf_counter()
    refuse_to_overwrite(input_path, output_path)
    for path, flag in ((config.report_json, "--report"), (config.report_markdown, "--markdown")):
        if path is not None:
            check_writable(path, flag)
    original = load_model(input_path)
    specs = resolve_input_specs(original, config.input_shapes, str(input_path))
    calib = load_calibration(config, specs, calibration)
    config.resolved_method(calib is not None)  # fail early on a data-driven method without data
    with DiskCache() as cache:
        if calib is not None:  # fitting reads the data once per dependency level
            calib = dataclasses.replace(calib, fit=cache.wrap(calib.fit), holdout=cache.wrap(calib.holdout))
        return _optimize(input_path, output_path, config, original, specs, calib, progress, started)


def _optimize(input_path, output_path, config, original, specs, calib, progress, started) -> Dict:

    if calib is not None and calib.holdout.count:
        validation_feeds, labels = calib.holdout.batches, calib.holdout.labels
        fitted = "nd fits no data" if config.resolved_method(True) in DATA_FREE_METHODS else f"fitted on {calib.fit.count}"
        inputs_desc = f"{calib.holdout.count} held-out of {calib.description} ({fitted})"
    else:
        feeds = random_feeds(specs, config.validation_samples, config.seed)
        validation_feeds, labels = (lambda: iter(feeds)), None
        inputs_desc = f"{config.validation_samples} seeded uniform [0,1) inputs (seed {config.seed})"
        if calib is not None:
            inputs_desc += f"; nothing held out of {calib.description}"
    first_feed = next(iter((calib.fit.batches() if calib and calib.fit.count else validation_feeds())))
    first = {k: v[:1] if s.dynamic_batch else v for (k, v), s in zip(first_feed.items(), specs)}
    result = decompose_model(original, config, first, calibration=calib, what=str(input_path), progress=progress)
    entries = result.layers

    with staged_model(result.model, output_path) as staged:
        ref_session = make_session(original, what=str(input_path))
        opt_session = make_session(staged, what=f"optimized model for {output_path}")
        names_out = [o.name for o in ref_session.get_outputs()]
        reference = run_batches(ref_session, validation_feeds(), names_out, what=str(input_path))
        candidate = run_batches(opt_session, validation_feeds(), names_out, what=f"optimized model for {output_path}")
        validation = compare_runs(names_out, reference, candidate, labels)
        validation["inputs"] = inputs_desc

    def total(key):
        vals = [e[key] for e in entries if e[key] is not None]
        return int(sum(vals)) if vals else None

    report = {
        "tool": {"name": "onnx-dwd", "version": __version__},
        "input": str(input_path), "output": str(output_path),
        "config": {"method": result.method, "rank": config.rank, "graph_form": config.graph_form,
                   "refit_variant": config.refit_variant if result.method == "refit" else None,
                   "inter_layer": result.inter_layer,
                   "input_shapes": {k: list(v) for k, v in config.input_shapes.items()},
                   "calib": calib.description if calib else None, "holdout": config.holdout,
                   "positions_per_image": config.positions_per_image,
                   "validation_samples": config.validation_samples, "seed": config.seed},
        "model": {
            "opset": default_opset(original),
            "convs": len(entries), "decomposed": sum(e["decomposed"] for e in entries),
            "folded": result.folded,
            "macs_before": total("macs_before"), "macs_after": total("macs_after"),
            "params_before": count_params(original), "params_after": count_params(result.model),
            "validation": validation,
            "seconds": round(time.perf_counter() - started, 3),
        },
        "layers": entries,
    }
    if config.report_json:
        write_text_atomic(config.report_json, to_json(report))
    if config.report_markdown:
        write_text_atomic(config.report_markdown, render_markdown(report))
    return report
