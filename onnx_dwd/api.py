"""optimize(): the one orchestrator. Load, decompose (or choose per layer under a budget), validate, save."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Dict, Optional


from . import __version__
from .calib import IMAGE_SUFFIXES, Calibration, DiskCache, array_calibration, feed_calibration, image_calibration, \
    random_feeds, resolve_input_specs
from .config import DATA_FREE_METHODS, OptimizeConfig
from .cost import count_params
from .decompose import Progress, decompose_model, no_progress, uses_inter_layer  # decompose_model: re-exported
from .errors import OptionError
from .modelio import check_writable, default_opset, load_model, refuse_to_overwrite, staged_model, write_text_atomic
from .report import render_markdown, to_json
from .runtimes import make_session
from .selection import Chooser, measure_latency
from .validate import BackgroundReference, RecordedReference, compare_models


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
             calibration=None, progress: Progress = no_progress) -> Dict:
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
    with DiskCache() as cache, contextlib.ExitStack() as stack:
        reference = None
        if calib is not None:  # fitting reads the data once per dependency level
            calib = dataclasses.replace(calib, fit=cache.wrap(calib.fit), holdout=cache.wrap(calib.holdout))
            # the original's outputs on the held-out data, while the fit runs; not beside the
            # budgeted choice's whole-model timings. A compensated fit runs the original over
            # that data anyway (and records the outputs there), others in a thread of its own.
            if calib.holdout.count and not config.selects:
                if uses_inter_layer(config, config.resolved_method(True), calib):
                    reference = stack.enter_context(RecordedReference(original, output_names(original)))
                else:
                    reference = stack.enter_context(BackgroundReference(
                        original, calib.holdout.batches, calib.holdout.filled, output_names(original),
                        what=str(input_path)))
        return _optimize(input_path, output_path, config, original, specs, calib, progress, started, reference)


def output_names(model) -> list:
    return [o.name for o in model.graph.output]


def _optimize(input_path, output_path, config, original, specs, calib, progress, started, reference=None) -> Dict:

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
    what = str(input_path)
    selection = None
    if config.selects:
        chooser = Chooser(original, config, calib, first, validation_feeds, what, progress)
        result, selection = chooser.choose()
    else:
        result = decompose_model(original, config, first, calibration=calib, what=what, progress=progress,
                                 validation=reference if isinstance(reference, RecordedReference) else None)
    entries = result.layers

    with staged_model(result.model, output_path) as staged:
        if reference is None:
            reference = make_session(original, what=str(input_path))
        opt_session = make_session(staged, what=f"optimized model for {output_path}")
        validation = compare_models(reference, opt_session, validation_feeds(), output_names(original), labels,
                                    what=(str(input_path), f"optimized model for {output_path}"))
        validation["inputs"] = inputs_desc
        latency = None
        if config.measure_latency or config.selects:
            latency = measure_latency(original, result.model, first, config, what)  # the model staged
            if selection is not None and config.budget[0] != "max_error":
                kind, value = config.budget
                selection["met_in_report_measurement"] = bool(
                    latency["speedup"] >= value if kind == "target_speedup" else latency["after_ms"] <= value)

    def total(key):
        vals = [e[key] for e in entries if e[key] is not None]
        return int(sum(vals)) if vals else None

    report = {
        "tool": {"name": "onnx-dwd", "version": __version__},
        "input": str(input_path), "output": str(output_path),
        "config": {"method": result.method, "rank": config.rank, "graph_form": config.graph_form,
                   "budget": dict([config.budget]) if config.selects else None,
                   "runtime": config.runtime, "level": config.level, "threads": config.threads,
                   "refit_variant": config.refit_variant if result.method == "refit" else None,
                   "refit_sweeps": (config.refit_sweeps if result.method == "refit"
                                    and config.refit_variant != "alg2" else None),
                   "inter_layer": result.inter_layer,
                   "input_shapes": {k: list(v) for k, v in config.input_shapes.items()},
                   "calib": calib.description if calib else None, "holdout": config.holdout,
                   "positions_per_image": config.positions_per_image, "position_budget": config.position_budget,
                   "validation_samples": config.validation_samples, "seed": config.seed},
        "model": {
            "opset": default_opset(original),
            "convs": len(entries), "decomposed": sum(e["decomposed"] for e in entries),
            "folded": result.folded,
            "macs_before": total("macs_before"), "macs_after": total("macs_after"),
            "params_before": count_params(original), "params_after": count_params(result.model),
            "validation": validation,
            "latency": latency,
            "selection": selection,
            "seconds": round(time.perf_counter() - started, 3),
        },
        "layers": entries,
    }
    if config.report_json:
        write_text_atomic(config.report_json, to_json(report))
    if config.report_markdown:
        write_text_atomic(config.report_markdown, render_markdown(report))
    return report
