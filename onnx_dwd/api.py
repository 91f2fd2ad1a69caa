"""optimize(): the one orchestrator. Load, fold, classify, fit, rewrite, validate, save."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .calib import image_feeds, random_feeds, resolve_input_specs
from .capture import tensor_shapes
from .config import OptimizeConfig
from .cost import conv_macs, count_params, decomposed_macs
from .errors import DwdError
from .fit import network_decoupling, reconstruct_weight
from .fold import fold_affine_into_convs
from .modelio import (check_model, check_writable, default_opset, export_graph, load_model, refuse_to_overwrite,
                      staged_model, write_text_atomic)
from .report import render_markdown, to_json
from .rewrite import replace_conv
from .runtimes import make_session, run_batches
from .select import ConvLayer, classify_convs
from .tensors import NameAllocator
from .validate import compare_runs


def _layer_entry(layer: ConvLayer, out_shape: Optional[tuple]) -> Dict:
    macs = None
    if out_shape is not None and layer.in_channels is not None:
        macs = conv_macs(out_shape, layer.out_channels, layer.in_channels, layer.group, layer.kernel)
    return {
        "name": layer.name, "op": layer.op, "kernel": list(layer.kernel),
        "in_channels": layer.in_channels, "out_channels": layer.out_channels, "group": layer.group,
        "decomposed": False, "reason": layer.reason, "rank": None, "graph_form": None,
        "output_shape": list(out_shape) if out_shape else None,
        "macs_before": macs, "macs_after": macs, "weight_rel_error": None,
    }


@dataclasses.dataclass
class Decomposed:
    """Result of decompose_model: the new model, one report entry per conv, folded node names."""

    model: onnx.ModelProto
    layers: List[Dict]
    folded: List[str]


def decompose_model(original: onnx.ModelProto, config: OptimizeConfig,
                    shape_feed: Optional[Dict[str, np.ndarray]] = None, what: str = "model") -> Decomposed:
    """Fold, classify, fit and rewrite in memory; no files, no validation.

    shape_feed: one input to run the model on, to learn conv output shapes for
    the MAC counts (without it MACs are None).
    """
    graph = gs.import_onnx(original)
    folded = fold_affine_into_convs(graph)
    graph.cleanup()
    layers = classify_convs(graph)
    if not layers:
        raise DwdError(f"{what}: the model has no Conv nodes; nothing to do")
    shapes = {}
    if shape_feed is not None:
        shapes = tensor_shapes(export_graph(graph, original), shape_feed,
                               [l.output_name for l in layers], what=what)
    entries: List[Dict] = []
    names = NameAllocator(graph)
    for layer in layers:
        out_shape = shapes.get(layer.output_name)
        entry = _layer_entry(layer, out_shape)
        if layer.is_candidate:
            dec = network_decoupling(layer.weight, config.rank, layer.group)
            w = layer.weight.astype(np.float64)
            entry["weight_rel_error"] = float(np.linalg.norm(reconstruct_weight(dec) - w) / max(np.linalg.norm(w), 1e-30))
            entry["graph_form"] = replace_conv(graph, layer, dec, config.graph_form, names)
            entry.update(decomposed=True, rank=dec.rank)
            if out_shape is not None:
                entry["macs_after"] = decomposed_macs(out_shape, layer.out_channels, layer.in_channels,
                                                      layer.group, layer.kernel, dec.rank)
        entries.append(entry)
    graph.cleanup().toposort()
    model = export_graph(graph, original)
    model.metadata_props.add(key="onnx_dwd", value=f"version={__version__} method={config.method} rank={config.rank}")
    check_model(model, f"optimized {what}")
    return Decomposed(model, entries, folded)


def optimize(input_path: os.PathLike, output_path: os.PathLike,
             config: Optional[OptimizeConfig] = None) -> Dict:
    """Decompose every regular conv of input_path and write output_path; returns the report.

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
    if config.calib is not None:
        feeds, labels = image_feeds(Path(config.calib), specs, limit=config.validation_samples)
        inputs_desc = f"{sum(len(next(iter(f.values()))) for f in feeds)} images from {config.calib}"
    else:
        feeds, labels = random_feeds(specs, config.validation_samples, config.seed), None
        inputs_desc = f"{config.validation_samples} seeded uniform [0,1) inputs (seed {config.seed})"
    first = {k: v[:1] if s.dynamic_batch else v for (k, v), s in zip(feeds[0].items(), specs)}
    result = decompose_model(original, config, first, what=str(input_path))
    entries = result.layers

    with staged_model(result.model, output_path) as staged:
        ref_session = make_session(original, what=str(input_path))
        opt_session = make_session(staged, what=f"optimized model for {output_path}")
        names_out = [o.name for o in ref_session.get_outputs()]
        reference = run_batches(ref_session, feeds, names_out, what=str(input_path))
        candidate = run_batches(opt_session, feeds, names_out, what=f"optimized model for {output_path}")
        validation = compare_runs(names_out, reference, candidate, labels)
        validation["inputs"] = inputs_desc

    def total(key):
        vals = [e[key] for e in entries if e[key] is not None]
        return int(sum(vals)) if vals else None

    report = {
        "tool": {"name": "onnx-dwd", "version": __version__},
        "input": str(input_path), "output": str(output_path),
        "config": {"method": config.method, "rank": config.rank, "graph_form": config.graph_form,
                   "input_shapes": {k: list(v) for k, v in config.input_shapes.items()},
                   "calib": str(config.calib) if config.calib else None,
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
