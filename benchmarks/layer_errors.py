#!/usr/bin/env python3
"""Per-layer output reconstruction error of every fitting method on a real model (the paper's Fig. 3 idea).

For every candidate conv (kernel > 1x1, regular or grouped) each method is
fitted at rank K, each layer in isolation: its input comes from the original
model (no inter-layer compensation), its target is the original layer's
output. All data-driven methods are fitted from the same statistics of the
fit part of the calibration data; every error is measured on the held-out
part, never fitted on:

    error = |Y - (W' x + b')| / |Y|    over all held-out output positions

with W' the weight the decomposed layer computes and b' its bias.

Methods (onnx_dwd.fit):
  nd        Network Decoupling, data-free per-channel SVD; bias = original bias
  dwd       paper Algorithm 1
  dwd_comp  paper Algorithm 2
  refit     ours (Algorithm 2 + more sweeps + least-squares pointwise), the default
  refit_auto  ours with --refit-variant auto (step chosen per layer on every 4th fit image)
  channel   Zhang et al.: k x k conv to c' channels + 1x1, c' for the MACs of
            rank K (group-1 layers only)

Usage:
  python benchmarks/layer_errors.py --model M.onnx --calib DIR --json OUT.json \\
      [--input-shape NAME:dims] [--resize N] [--scale F] [--mean a,b,c] [--std a,b,c] \\
      [--channel-order rgb|bgr] [--layout auto|nchw|nhwc] [--holdout 0.2] \\
      [--positions-per-image N] [--rank 1]

Pure measurement: nothing is asserted; the table and the JSON hold every number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
import scipy
from threadpoolctl import threadpool_limits

import onnx_dwd
from onnx_dwd.calib import Preprocess, image_calibration, resolve_input_specs
from onnx_dwd.capture import Capture, CaptureSpec, capture_stats
from onnx_dwd.config import parse_input_shape
from onnx_dwd.cost import channels_for_rank
from onnx_dwd.fit import network_decoupling, reconstruct_weight
from onnx_dwd.fit.data import channel, dwd, dwd_comp, refit
from onnx_dwd.fit.stats import relative_error
from onnx_dwd.fold import fold_affine_into_convs
from onnx_dwd.modelio import export_graph, load_model
from onnx_dwd.select import classify_convs

METHODS = ("nd", "dwd", "dwd_comp", "refit", "refit_auto", "channel")
variants = {}  # layer name -> the refit variant its validation chose
DEPTHWISE = ("nd", "dwd", "dwd_comp", "refit")
DATA_DRIVEN_DEPTHWISE = ("dwd", "dwd_comp", "refit")


def _floats(text):
    return tuple(float(v) for v in text.split(","))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True, help="folder of images (recursive)")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...")
    p.add_argument("--resize", type=int, default=None)
    p.add_argument("--scale", type=float, default=1 / 255)
    p.add_argument("--mean", default="0")
    p.add_argument("--std", default="1")
    p.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb")
    p.add_argument("--layout", choices=("auto", "nchw", "nhwc"), default="auto")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--positions-per-image", type=int, default=None,
                   help="sample this many output positions per image for the statistics (default: all)")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the position sampling")
    return p.parse_args(argv)


def fit_layer(layer, train_stats, val_stats, rank):
    """Every method on one layer.

    Returns ({method: (rebuilt weight float64, bias)}, {method: seconds},
    c' of the channel method, {method: error message} for fits that raised).
    A fit that raises is recorded, not hidden: its error is None in the results.
    """
    w = layer.weight
    fit_stats = train_stats.merge(val_stats)  # every method but refit fits on all fit images

    def nd():
        dec = network_decoupling(w, rank, layer.group)
        return reconstruct_weight(dec).astype(np.float64), layer.bias

    def data_fit(fn):
        dec = fn(w, fit_stats, rank)
        return reconstruct_weight(dec).astype(np.float64), dec.bias

    c_prime = channels_for_rank(layer.out_channels, layer.in_channels, layer.kernel, rank) \
        if layer.group == 1 else None

    def chan():
        ch = channel(w, fit_stats, c_prime)
        rebuilt = ch.second[:, :, 0, 0].astype(np.float64) @ ch.first.reshape(ch.channels, -1).astype(np.float64)
        return rebuilt.reshape(w.shape), ch.bias

    jobs = {"nd": nd, "dwd": lambda: data_fit(dwd), "dwd_comp": lambda: data_fit(dwd_comp),
            "refit": lambda: data_fit(refit), "refit_auto": lambda: refit_fit()}

    def refit_fit():  # --refit-variant auto: variant chosen on every 4th fit image, then refitted on all
        dec = refit(w, train_stats, rank, validation=val_stats)
        variants[layer.name] = dec.detail
        return reconstruct_weight(dec).astype(np.float64), dec.bias
    if layer.group == 1:
        jobs["channel"] = chan
    results, seconds, failures = {}, {}, {}
    for name, job in jobs.items():
        t0 = time.perf_counter()
        try:
            results[name] = job()
        except (np.linalg.LinAlgError, ValueError) as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
        seconds[name] = time.perf_counter() - t0
    return results, seconds, c_prime, failures


def geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows):
    def errs(m):
        return [r["errors"][m] for r in rows if r["errors"].get(m) is not None]

    both = [r for r in rows if all(r["errors"].get(m) is not None for m in DEPTHWISE)]
    ratios = [r["errors"]["refit"] / r["errors"]["dwd_comp"] for r in both if r["errors"]["dwd_comp"] > 0]
    with_channel = [r for r in rows if r["errors"].get("channel") is not None]
    return {
        "layers": len(rows),
        "mean_error": {m: (float(np.mean(errs(m))) if errs(m) else None) for m in METHODS},
        "median_error": {m: (float(np.median(errs(m))) if errs(m) else None) for m in METHODS},
        "layers_with": {m: len(errs(m)) for m in METHODS},
        "dwd_comp_below_dwd": sum(r["errors"]["dwd_comp"] < r["errors"]["dwd"] for r in both),
        "every_depthwise_data_driven_below_nd": sum(
            all(r["errors"][m] < r["errors"]["nd"] for m in DATA_DRIVEN_DEPTHWISE) for r in both),
        "every_data_driven_incl_channel_below_nd": sum(
            all(r["errors"][m] < r["errors"]["nd"] for m in DATA_DRIVEN_DEPTHWISE + ("channel",))
            for r in with_channel),
        "below_nd": {m: sum(r["errors"][m] < r["errors"]["nd"] for r in rows if r["errors"].get(m) is not None)
                     for m in METHODS if m != "nd"},
        "refit_lowest_depthwise": sum(
            r["errors"]["refit"] <= min(r["errors"][m] for m in DEPTHWISE) for r in both),
        "refit_below_channel": sum(r["errors"]["refit"] < r["errors"]["channel"] for r in with_channel),
        "geomean_refit_over_dwd_comp": geomean(ratios),
        "refit_le_0.8_dwd_comp": sum(r["errors"]["refit"] <= 0.8 * r["errors"]["dwd_comp"] for r in both),
        "refit_auto_lowest_depthwise": sum(
            r["errors"]["refit_auto"] <= min(r["errors"][m] for m in ("nd", "dwd", "dwd_comp", "refit_auto"))
            for r in both if r["errors"].get("refit_auto") is not None),
        "geomean_refit_auto_over_dwd_comp": geomean(
            [r["errors"]["refit_auto"] / r["errors"]["dwd_comp"] for r in both
             if r["errors"].get("refit_auto") is not None and r["errors"]["dwd_comp"] > 0]),
        "failures": [{"layer": r["name"], "method": m, "error": msg} for r in rows for m, msg in r["failures"].items()],
        "seconds_total": {m: float(sum(r["seconds"].get(m, 0.0) for r in rows)) for m in METHODS},
    }


def _fmt(v, width=8):
    return f"{v:{width}.4f}" if v is not None else f"{'-':>{width}}"


def print_table(rows, summary, rank):
    name_w = max(12, max((len(r["name"]) for r in rows), default=4))
    name_w = min(name_w, 48)
    head = (f"{'layer':<{name_w}} {'kernel':>6} {'c->n':>11} {'str':>3} {'HxW':>7} {'pos/d':>6} "
            + " ".join(f"{m:>8}" for m in METHODS) + "  best(dw)")
    print(f"\nrelative output error on held-out data, rank {rank}, each layer in isolation")
    print(head)
    print("-" * len(head))
    for r in rows:
        e = r["errors"]
        ok = [m for m in DEPTHWISE if e.get(m) is not None]
        best = min(ok, key=lambda m: e[m]) if ok else "-"
        name = r["name"] if len(r["name"]) <= name_w else "…" + r["name"][-(name_w - 1):]
        hw = "x".join(str(v) for v in r["output_hw"]) if r["output_hw"] else "?"
        print(f"{name:<{name_w}} {'x'.join(map(str, r['kernel'])):>6} "
              f"{str(r['in_channels']) + '->' + str(r['out_channels']):>11} {r['strides'][0]:>3} {hw:>7} "
              f"{r['fit_positions'] / r['patch_size']:6.1f} "
              + " ".join(f"{'FAIL':>8}" if m in r["failures"] else _fmt(e.get(m)) for m in METHODS)
              + f"  {best}")
    print("-" * len(head))
    print(f"{'mean':<{name_w}} {'':>6} {'':>11} {'':>3} {'':>7} {'':>6} "
          + " ".join(_fmt(summary["mean_error"][m]) for m in METHODS))
    print(f"{'median':<{name_w}} {'':>6} {'':>11} {'':>3} {'':>7} {'':>6} "
          + " ".join(_fmt(summary["median_error"][m]) for m in METHODS))
    n = summary["layers"]
    print(f"\nlayers: {n}")
    print(f"dwd_comp < dwd:                         {summary['dwd_comp_below_dwd']}/{n}")
    print(f"dwd, dwd_comp, refit all < nd:          {summary['every_depthwise_data_driven_below_nd']}/{n}")
    print(f"  ... and channel < nd too:             {summary['every_data_driven_incl_channel_below_nd']}/"
          f"{summary['layers_with']['channel']}")
    print("below nd per method:                    "
          + ", ".join(f"{m} {v}" for m, v in summary["below_nd"].items()))
    print(f"refit lowest of nd/dwd/dwd_comp/refit:  {summary['refit_lowest_depthwise']}/{n}")
    print(f"refit < channel:                        {summary['refit_below_channel']}/{summary['layers_with']['channel']}")
    g = summary["geomean_refit_over_dwd_comp"]
    print(f"geomean refit/dwd_comp:                 {g:.4f}" if g is not None else "geomean refit/dwd_comp: -")
    print(f"refit <= 0.8 * dwd_comp:                {summary['refit_le_0.8_dwd_comp']}/{n}")
    print(f"refit_auto lowest of nd/dwd/dwd_comp/refit_auto: {summary['refit_auto_lowest_depthwise']}/{n}")
    g = summary["geomean_refit_auto_over_dwd_comp"]
    print(f"geomean refit_auto/dwd_comp:            {g:.4f}" if g is not None else "")
    for f in summary["failures"]:
        print(f"FAILED: {f['layer']} {f['method']}: {f['error']}")
    print("fit seconds (all layers):               "
          + ", ".join(f"{m} {v:.2f}" for m, v in summary["seconds_total"].items()))


def main(argv=None):
    args = parse_args(argv)
    # One BLAS thread, as onnx_dwd.api.decompose_model runs its capture and fits:
    # OpenBLAS's spinning workers make the many small products 5-20x slower on a
    # shared 2-core machine, which would distort the per-method seconds.
    with threadpool_limits(limits=1, user_api="blas"):
        run(args, argv)


def run(args, argv):
    started = time.perf_counter()
    git = _git_state()
    original = load_model(args.model)
    input_shapes = dict(parse_input_shape(s) for s in args.input_shape)
    specs = resolve_input_specs(original, input_shapes, str(args.model))
    pre = Preprocess(resize=args.resize, scale=args.scale, mean=_floats(args.mean), std=_floats(args.std),
                     channel_order=args.channel_order, layout=args.layout)
    calibration = image_calibration(args.calib, specs, pre, args.holdout)

    graph = gs.import_onnx(original)
    folded = fold_affine_into_convs(graph)
    graph.cleanup()
    layers = classify_convs(graph)
    prepared = export_graph(graph, original)
    candidates = [l for l in layers if l.is_candidate]
    print(f"{args.model}: {len(layers)} convs, {len(candidates)} candidates, {len(folded)} affine ops folded; "
          f"{calibration.description}: fit {calibration.fit.count}, held out {calibration.holdout.count}",
          flush=True)

    specs = [CaptureSpec.of(l) for l in candidates]
    capture = Capture(specs, args.positions_per_image, args.seed)  # every position unless sampled per image
    val_stats = capture.new_stats()
    t0 = time.perf_counter()
    train_stats = capture_stats(prepared, specs, calibration.fit.batches, capture, val_stats, what=str(args.model))
    t_fit_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    held_stats = capture_stats(prepared, specs, calibration.holdout.batches, capture, what=str(args.model))
    t_held_capture = time.perf_counter() - t0
    print(f"captured statistics: fit {t_fit_capture:.1f} s, held-out {t_held_capture:.1f} s", flush=True)

    rows = []
    for layer in candidates:
        fs, hs = train_stats[layer.name].merge(val_stats[layer.name]), held_stats[layer.name]
        results, seconds, c_prime, failures = fit_layer(layer, train_stats[layer.name], val_stats[layer.name],
                                                        args.rank)
        errors = {m: relative_error(hs, *results[m]) for m in results}
        fit_errors = {m: relative_error(fs, *results[m]) for m in results}
        w64 = layer.weight.astype(np.float64)
        weight_errors = {m: float(np.linalg.norm(results[m][0] - w64) / max(np.linalg.norm(w64), 1e-30))
                         for m in results}
        a = layer.node.attrs
        rows.append({
            "name": layer.name,
            "kernel": list(layer.kernel),
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "group": layer.group,
            "strides": list(a.get("strides", (1, 1))),
            "output_hw": None,  # filled by _fill_output_hw
            "patch_size": int(fs.sxx.shape[1]),
            "fit_positions": int(fs.count),
            "refit_variant": variants.get(layer.name),
            "held_positions": int(hs.count),
            "channel_c_prime": c_prime,
            "errors": {m: errors.get(m) for m in METHODS},
            "fit_errors": {m: fit_errors.get(m) for m in METHODS},
            "weight_rel_errors": {m: weight_errors.get(m) for m in METHODS},
            "original_held_error": relative_error(hs, layer.weight, layer.bias),
            "seconds": {m: round(seconds[m], 4) for m in seconds},
            "failures": failures,
        })
        print(f"  {layer.name}: " + " ".join(f"{m}={errors[m]:.4f}" for m in results)
              + "".join(f"  [{m} failed: {msg}]" for m, msg in failures.items()), flush=True)
    _fill_output_hw(prepared, candidates, calibration, rows)

    summary = summarize(rows)
    summary["seconds_capture_fit"] = round(t_fit_capture, 2)
    summary["seconds_capture_held"] = round(t_held_capture, 2)
    summary["seconds_wall"] = round(time.perf_counter() - started, 2)
    print_table(rows, summary, args.rank)
    print(f"wall time {summary['seconds_wall']:.1f} s")

    meta = {
        "git": git,
        "blas_threads": 1,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else " ".join(shlex.quote(a) for a in argv),
        "model": str(args.model),
        "calib": calibration.description,
        "preprocess": {"resize": args.resize, "scale": args.scale, "mean": list(_floats(args.mean)),
                       "std": list(_floats(args.std)), "channel_order": args.channel_order, "layout": args.layout},
        "input_specs": [{"name": s.name, "shape": list(s.shape)} for s in specs],
        "fit_images": calibration.fit.count,
        "held_out_images": calibration.holdout.count,
        "holdout": args.holdout,
        "positions_per_image": args.positions_per_image,
        "seed": args.seed,
        "rank": args.rank,
        "inter_layer": False,
        "folded": len(folded),
        "convs": len(layers),
        "candidates": len(candidates),
        "error": "sqrt(sum |y - W'x - b'|^2 / sum |y|^2) over held-out output positions (uncentred)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnx_graphsurgeon": gs.__version__, "onnx_dwd": onnx_dwd.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "layers": rows, "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.json}")


def _git_state():
    """Commit and uncommitted library files of the checkout the package runs from."""
    import subprocess

    root = Path(onnx_dwd.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnx_dwd"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "uncommitted_library_files": [l[3:] for l in dirty if l.strip()]}


def _fill_output_hw(prepared, candidates, calibration, rows):
    """Output H x W of every candidate, from one held-out (or fit) feed."""
    from onnx_dwd.capture import tensor_shapes

    part = calibration.holdout if calibration.holdout.count else calibration.fit
    feed = next(iter(part.batches()), None)
    if feed is None:
        return
    shapes = tensor_shapes(prepared, feed, [l.output_name for l in candidates])
    for layer, row in zip(candidates, rows):
        shape = shapes.get(layer.output_name)
        row["output_hw"] = list(shape[2:]) if shape else None


if __name__ == "__main__":
    main()
