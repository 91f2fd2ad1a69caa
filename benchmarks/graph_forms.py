#!/usr/bin/env python3
"""Benchmark ONNX graph forms of a depthwise-decomposed Conv in onnxruntime (CPU).

A regular Conv with weight W[n, c, kh, kw] (group 1) is replaced by a depthwise
Conv D (channel multiplier K) followed by a 1x1 Conv P[n, c*K, 1, 1].  For K > 1
the same maths can be written as several ONNX graphs; this script measures which
one onnxruntime runs fastest.

Forms (all compute exactly the same function):
  regular       original Conv, W_eff[o, i] = sum_r P[o, i*K+r] * D[i*K+r]
  k1            K=1 reference: depthwise Conv (group=c, [c,1,kh,kw]) -> 1x1 Conv
  multiplier    Conv group=c, weight D[c*K,1,kh,kw] (out i*K+r reads in i) -> 1x1 Conv P
  split         K depthwise Convs ([c,1,kh,kw] each) -> Concat(axis=1) -> 1x1 Conv P'
  concat-input  Concat K copies of X -> depthwise Conv group=c*K -> 1x1 Conv P'
  sum           K depthwise Convs, each -> own 1x1 Conv P_r (bias on r=0 only) -> Add
(P' is P with columns permuted to the concat order r*c+i.)

Every model is built in memory with onnx.helper, checked with onnx.checker, and
all forms sharing the same (D, P) are verified numerically against each other and
against the regular Conv with the equivalent dense weight.

Timing: one subprocess per (shape, threads), using a single global ORT thread
pool (per-session pools with spinning workers interfere badly on 2 cores).  The
sessions of all forms and both optimisation levels are created, warmed up, then
measured in interleaved blocks (order shuffled per block).  Each
block runs every model `inner` times (calibrated to ~--block-ms) and records the
mean time per call; the reported value is the median over blocks, with IQR and
min/max of the per-block values.  Speed-ups vs the regular Conv are computed per
block (paired, same block) and summarised by their median and IQR, both vs the
regular Conv at the same level and vs the regular Conv at ORT_ENABLE_ALL.
Runs use IOBinding with pre-allocated input/output OrtValues to keep Python
overhead small.

Usage:
  python benchmarks/graph_forms.py --json benchmarks/results/graph_forms.json
  python benchmarks/graph_forms.py --quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import subprocess
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
KS = (2, 3, 4)
DECOMP_FORMS = ("multiplier", "split", "concat-input", "sum")

# (c, n, H(=W), stride); kernel 3x3, pad 1.
SHAPES = [
    (32, 32, 56, 1),
    (64, 64, 28, 1),
    (128, 128, 14, 1),
    (256, 256, 7, 1),
    (64, 64, 56, 1),
    (128, 128, 28, 1),
    (64, 64, 56, 2),
]
QUICK_SHAPES = [(64, 64, 28, 1), (256, 256, 7, 1), (64, 64, 56, 2)]

LEVELS = {
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def shape_name(s):
    c, n, h, st = s
    return f"c{c}_n{n}_{h}x{h}_s{st}"


# ----------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------
def _init(name, arr):
    return numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name)


def _conv(inp, w, out, *, group=1, k=3, pad=1, stride=1, bias=None, name=None):
    inputs = [inp, w] + ([bias] if bias is not None else [])
    return helper.make_node(
        "Conv", inputs, [out], name=name or out,
        kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride],
        dilations=[1, 1], group=group,
    )


def _pw(inp, w, out, bias=None):
    return _conv(inp, w, out, k=1, pad=0, stride=1, bias=bias)


def _model(nodes, inits, c, n, h, stride, name):
    ho = (h + 2 - 3) // stride + 1
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, h, h])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n, ho, ho])
    g = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="onnx-dwd-bench")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def build_models(c, n, h, stride, K, D, P, B):
    """Return {form: ModelProto} for one rank K.

    D: [c*K, 1, 3, 3]  (channel-multiplier order, row i*K+r reads input i)
    P: [n, c*K]        (columns in the same i*K+r order)
    B: [n]
    """
    models = {}
    kw = dict(stride=stride)
    # concat order r*c+i  <->  multiplier order i*K+r
    perm = np.array([i * K + r for r in range(K) for i in range(c)])
    Dr = [D[np.arange(c) * K + r] for r in range(K)]  # each [c,1,3,3]
    Pcat = P[:, perm]

    if K == 1:
        nodes = [_conv("X", "D", "T", group=c, **kw), _pw("T", "P", "Y", "B")]
        models["k1"] = _model(nodes, [_init("D", D), _init("P", P.reshape(n, c, 1, 1)),
                                      _init("B", B)], c, n, h, stride, "k1")
        return models

    # (a) multiplier
    nodes = [_conv("X", "D", "T", group=c, **kw), _pw("T", "P", "Y", "B")]
    models["multiplier"] = _model(
        nodes, [_init("D", D), _init("P", P.reshape(n, c * K, 1, 1)), _init("B", B)],
        c, n, h, stride, "multiplier")

    # (b) split
    nodes, inits = [], []
    for r in range(K):
        nodes.append(_conv("X", f"D{r}", f"T{r}", group=c, **kw))
        inits.append(_init(f"D{r}", Dr[r]))
    nodes.append(helper.make_node("Concat", [f"T{r}" for r in range(K)], ["T"], axis=1))
    nodes.append(_pw("T", "P", "Y", "B"))
    inits += [_init("P", Pcat.reshape(n, c * K, 1, 1)), _init("B", B)]
    models["split"] = _model(nodes, inits, c, n, h, stride, "split")

    # (c) concat-input
    nodes = [helper.make_node("Concat", ["X"] * K, ["XK"], axis=1),
             _conv("XK", "D", "T", group=c * K, **kw),
             _pw("T", "P", "Y", "B")]
    models["concat-input"] = _model(
        nodes, [_init("D", np.concatenate(Dr, axis=0)),
                _init("P", Pcat.reshape(n, c * K, 1, 1)), _init("B", B)],
        c, n, h, stride, "concat_input")

    # (d) sum
    nodes, inits = [], []
    for r in range(K):
        nodes.append(_conv("X", f"D{r}", f"T{r}", group=c, **kw))
        nodes.append(_pw(f"T{r}", f"P{r}", f"U{r}", "B" if r == 0 else None))
        inits += [_init(f"D{r}", Dr[r]),
                  _init(f"P{r}", P[:, np.arange(c) * K + r].reshape(n, c, 1, 1))]
    inits.append(_init("B", B))
    acc = "U0"
    for r in range(1, K):
        out = "Y" if r == K - 1 else f"S{r}"
        nodes.append(helper.make_node("Add", [acc, f"U{r}"], [out], name=out))
        acc = out
    models["sum"] = _model(nodes, inits, c, n, h, stride, "sum")
    return models


def build_regular(c, n, h, stride, W, B):
    nodes = [_conv("X", "W", "Y", group=1, stride=stride, bias="B")]
    return _model(nodes, [_init("W", W), _init("B", B)], c, n, h, stride, "regular")


def build_shape_models(c, n, h, stride, rng):
    """All models for one shape, keyed 'regular', 'k1', '<form>@K'."""
    out = {}
    B = rng.standard_normal(n).astype(np.float32) * 0.1
    # regular conv weight: dense random (timing does not depend on values)
    W = (rng.standard_normal((n, c, 3, 3)) / math.sqrt(9 * c)).astype(np.float32)
    out["regular"] = build_regular(c, n, h, stride, W, B)
    for K in (1,) + KS:
        D = (rng.standard_normal((c * K, 1, 3, 3)) / 3.0).astype(np.float32)
        P = (rng.standard_normal((n, c * K)) / math.sqrt(c * K)).astype(np.float32)
        # equivalent dense weight, used to verify the decomposition end to end
        Weff = np.einsum("oir,irhw->oihw", P.reshape(n, c, K),
                         D.reshape(c, K, 3, 3)).astype(np.float32)
        ref = build_regular(c, n, h, stride, Weff, B)
        for form, m in build_models(c, n, h, stride, K, D, P, B).items():
            key = form if K == 1 else f"{form}@{K}"
            out[key] = m
        out[f"_ref@{K}"] = ref
    return out


# ----------------------------------------------------------------------------
# sessions / verification / timing
# ----------------------------------------------------------------------------
_GLOBAL_POOL = None  # intra-op size of the global thread pool, if used


def setup_global_pool(threads):
    """Use one process-wide ORT thread pool (must be set before any session)."""
    global _GLOBAL_POOL
    from onnxruntime.capi import _pybind_state as C
    C.set_global_thread_pool_sizes(threads, 1)
    _GLOBAL_POOL = threads


def make_session(model, level, threads, optimized_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    if _GLOBAL_POOL is not None:
        assert threads == _GLOBAL_POOL, (threads, _GLOBAL_POOL)
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


class Runner:
    def __init__(self, sess, x):
        self.sess = sess
        self.xv = ort.OrtValue.ortvalue_from_numpy(x)
        oshape = [d if isinstance(d, int) else 1 for d in sess.get_outputs()[0].shape]
        self.yv = ort.OrtValue.ortvalue_from_shape_and_type(oshape, np.float32)
        self.b = sess.io_binding()
        self.b.bind_ortvalue_input("X", self.xv)
        self.b.bind_ortvalue_output("Y", self.yv)

    def __call__(self):
        self.sess.run_with_iobinding(self.b)

    def output(self):
        self.sess.run_with_iobinding(self.b)
        return self.yv.numpy().copy()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def optimized_ops(model, level, threads):
    """Op types (with domain suffix when not ai.onnx) after ORT optimisation."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "opt.onnx")
        make_session(model, level, threads, optimized_path=p)
        m = onnx.load(p)
    return [nd.op_type if nd.domain in ("", "ai.onnx")
            else f"{nd.domain.split('.')[-1]}:{nd.op_type}" for nd in m.graph.node]


def iqr(v):
    if len(v) < 2:
        return 0.0
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[2] - q[0]


def time_interleaved(runners, blocks, block_ms, warmup_s, rng):
    """runners: {key: callable}. Returns ({key: [per-block mean ms]}, {key: inner})."""
    keys = list(runners)
    inner = {}
    for k in keys:  # warm-up + calibration of calls per block
        f = runners[k]
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        cnt = 0
        while time.perf_counter() - t0 < warmup_s:
            f()
            cnt += 1
        per = (time.perf_counter() - t0) / cnt
        inner[k] = max(3, int(round(block_ms / 1e3 / per)))
    res = {k: [] for k in keys}
    for _ in range(blocks):
        order = keys[:]
        rng.shuffle(order)
        for k in order:
            f = runners[k]
            f()  # untimed call: re-warm caches after the previous model
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            res[k].append((time.perf_counter() - t0) / n * 1e3)
    return res, inner


def geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v))


FORMS_ALL = ["regular", "k1"] + [f"{f}@{K}" for K in KS for f in DECOMP_FORMS]


# ----------------------------------------------------------------------------
# worker: one shape, one thread count (global thread pool is per process)
# ----------------------------------------------------------------------------
def run_worker(shp, nt, levels, blocks, block_ms, warmup_s, seed):
    setup_global_pool(nt)
    c, n, h, st = shp
    sname = shape_name(shp)
    # same weights/input for every thread count of this shape
    rng = np.random.default_rng([seed, c, n, h, st])
    prng = random.Random(hash((seed, sname, nt)) & 0xFFFFFFFF)
    models = build_shape_models(c, n, h, st, rng)
    x = rng.standard_normal((1, c, h, h)).astype(np.float32)
    results, verification, graphs = [], [], {}
    runners = {}
    for level in levels:
        graphs[level] = {k: optimized_ops(models[k], level, nt) for k in FORMS_ALL}
        lr = {k: Runner(make_session(models[k], level, nt), x) for k in FORMS_ALL}

        # ---- numerical verification ---------------------------------------
        outs = {k: lr[k].output() for k in FORMS_ALL}
        ver = {"shape": sname, "level": level, "threads": nt, "max_rel_err": {}}
        for K in (1,) + KS:
            ref = make_session(models[f"_ref@{K}"], level, nt).run(None, {"X": x})[0]
            keys = ["k1"] if K == 1 else [f"{f}@{K}" for f in DECOMP_FORMS]
            for k in keys:
                e = max([rel_err(outs[k], ref)] + [rel_err(outs[k], outs[k2]) for k2 in keys])
                ver["max_rel_err"][k] = e
                if not e < 1e-5:
                    raise SystemExit(f"VERIFY FAILED {sname} {level} t{nt} {k}: rel err {e:.3g}")
        verification.append(ver)
        runners.update({(level, k): r for k, r in lr.items()})

    # ---- timing: all forms of all levels interleaved in the same blocks ------
    per_block, inner = time_interleaved(runners, blocks, block_ms, warmup_s, prng)
    base_level = "ALL" if "ALL" in levels else levels[0]
    base = per_block[(base_level, "regular")]
    for level in levels:
        reg = per_block[(level, "regular")]
        entry = {"shape": sname, "c": c, "n": n, "hw": h, "stride": st,
                 "level": level, "threads": nt, "blocks": blocks,
                 "inner": {k: inner[(level, k)] for k in FORMS_ALL},
                 "cross_level_baseline": f"{base_level}/regular", "forms": {}}
        for k in FORMS_ALL:
            v = per_block[(level, k)]
            ratios = [a / b for a, b in zip(reg, v)]
            entry["forms"][k] = {
                "median_ms": statistics.median(v),
                "iqr_ms": iqr(v),
                "min_ms": min(v),
                "max_ms": max(v),
                "speedup_vs_regular": statistics.median(reg) / statistics.median(v),
                "speedup_paired_median": statistics.median(ratios),
                "speedup_paired_iqr": iqr(ratios),
                "speedup_paired_min": min(ratios),
                "speedup_paired_max": max(ratios),
                # vs the regular conv at the baseline level (ORT default ALL),
                # valid because both levels are timed interleaved
                "speedup_vs_baseline_paired_median": statistics.median(
                    [a / b for a, b in zip(base, v)]),
                "per_block_ms": [round(t, 5) for t in v],
            }
        entry["best_form"] = {}
        for K in KS:
            ks = sorted((f"{f}@{K}" for f in DECOMP_FORMS),
                        key=lambda kk: entry["forms"][kk]["median_ms"])
            bt = entry["forms"][ks[0]]["median_ms"]
            wins_blocks = sum(a < b for a, b in zip(per_block[(level, ks[0])],
                                                     per_block[(level, ks[1])]))
            entry["best_form"][str(K)] = {
                "form": ks[0].split("@")[0],
                "runner_up": ks[1].split("@")[0],
                "frac_blocks_beating_runner_up": wins_blocks / blocks,
                "time_rel_to_best": {kk.split("@")[0]: entry["forms"][kk]["median_ms"] / bt
                                     for kk in ks},
            }
        results.append(entry)
    del runners
    return {"results": results, "verification": verification, "graphs": graphs}


# ----------------------------------------------------------------------------
def print_table(summary, forms, field="speedup_vs_regular"):
    cols = list(summary)
    print(f"{'form':14s}" + "".join(f"{c:>20s}" for c in cols))
    for k in forms:
        cells = []
        for c in cols:
            d = summary[c][field][k]
            cells.append(f"{d['geomean']:.2f} ({d['min']:.2f}-{d['max']:.2f})".rjust(20))
        print(f"{k:14s}" + "".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="OUT", help="write results JSON here")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts (comma list)")
    ap.add_argument("--levels", default="ALL,EXTENDED", help="ORT graph optimisation levels")
    ap.add_argument("--repeats", type=int, default=30,
                    help="interleaved timing blocks per configuration (default 30)")
    ap.add_argument("--block-ms", type=float, default=10.0,
                    help="target wall time per model per block in ms (default 10)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 shapes, <=6 blocks of 4 ms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)  # "shapeidx,threads,outpath"
    args = ap.parse_args(argv)

    threads = [int(t) for t in args.threads.split(",") if t]
    levels = [lv.strip().upper() for lv in args.levels.split(",") if lv.strip()]
    shapes = SHAPES
    blocks, block_ms, warmup_s = args.repeats, args.block_ms, 0.15
    if args.quick:
        shapes, blocks, block_ms, warmup_s = QUICK_SHAPES, min(args.repeats, 6), 4.0, 0.05

    if args._worker:
        si, nt, outp = args._worker.split(",", 2)
        res = run_worker(shapes[int(si)], int(nt), levels, blocks, block_ms, warmup_s, args.seed)
        with open(outp, "w") as f:
            json.dump(res, f)
        return

    t_start = time.time()
    results, verification, graphs = [], [], {}
    with tempfile.TemporaryDirectory() as td:
        for si, shp in enumerate(shapes):
            # alternate thread counts per shape so slow drifts in machine load
            # do not line up with one thread count
            order = threads if si % 2 == 0 else threads[::-1]
            for nt in order:
                outp = os.path.join(td, f"w{si}_{nt}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--_worker",
                       f"{si},{nt},{outp}", "--levels", ",".join(levels),
                       "--repeats", str(args.repeats), "--block-ms", str(args.block_ms),
                       "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
                subprocess.run(cmd, check=True)
                with open(outp) as f:
                    w = json.load(f)
                results += w["results"]
                verification += w["verification"]
                graphs.setdefault(shape_name(shp), w["graphs"])
                for e in w["results"]:
                    line = " ".join(f"{k}={e['forms'][k]['speedup_paired_median']:.2f}"
                                    for k in FORMS_ALL[1:])
                    print(f"[{time.time() - t_start:6.1f}s] {e['shape']:18s} {e['level']:8s} "
                          f"t{nt} ref={e['forms']['regular']['median_ms']:.3f}ms {line}",
                          flush=True)

    # ---- summary over shapes --------------------------------------------------
    results.sort(key=lambda e: (levels.index(e["level"]), e["threads"],
                                [shape_name(s) for s in shapes].index(e["shape"])))
    summary = {}
    for level in levels:
        for nt in threads:
            rows = [r for r in results if r["level"] == level and r["threads"] == nt]
            d = {}
            for k in FORMS_ALL[1:]:
                sp = [r["forms"][k]["speedup_paired_median"] for r in rows]
                d[k] = {"geomean": geomean(sp), "min": min(sp), "max": max(sp)}
            rel = {}
            wins = {}
            for K in KS:
                wins[str(K)] = {}
                for r in rows:
                    b = r["best_form"][str(K)]["form"]
                    wins[str(K)][b] = wins[str(K)].get(b, 0) + 1
                rel[str(K)] = {f: geomean([r["best_form"][str(K)]["time_rel_to_best"][f]
                                           for r in rows]) for f in DECOMP_FORMS}
            dx = {}
            for k in FORMS_ALL:
                sp = [r["forms"][k]["speedup_vs_baseline_paired_median"] for r in rows]
                dx[k] = {"geomean": geomean(sp), "min": min(sp), "max": max(sp)}
            fr = {str(K): {} for K in KS}
            for K in KS:
                for r in rows:
                    bf = r["best_form"][str(K)]
                    fr[str(K)][r["shape"]] = {"form": bf["form"], "runner_up": bf["runner_up"],
                                              "frac_blocks": bf["frac_blocks_beating_runner_up"]}
            summary[f"{level}/t{nt}"] = {
                "speedup_vs_regular": d,
                "speedup_vs_regular_ALL": dx,
                "winner_vs_runner_up": fr,
                "wins_per_K": wins,
                "geomean_time_rel_to_per_shape_best": rel,
            }

    print("\nSpeed-up vs regular conv (paired per-block median), geomean over "
          f"{len(shapes)} shapes (min-max over shapes):")
    print_table(summary, FORMS_ALL[1:])
    print("\nSame, but vs the regular conv at ORT_ENABLE_ALL (same threads; levels timed "
          "interleaved, so absolute comparison across levels is valid):")
    print_table(summary, FORMS_ALL, "speedup_vs_regular_ALL")
    print("\nWins per K (fastest decomposed form by median, count over shapes) and "
          "geomean time relative to the per-shape best:")
    for s_ in summary:
        for K in KS:
            rel = summary[s_]["geomean_time_rel_to_per_shape_best"][str(K)]
            fb = [v["frac_blocks"] for v in
                  summary[s_]["winner_vs_runner_up"][str(K)].values()]
            print(f"  {s_:12s} K={K}: wins {summary[s_]['wins_per_K'][str(K)]}  rel "
                  + " ".join(f"{f}={rel[f]:.3f}" for f in DECOMP_FORMS)
                  + f"  winner beats runner-up in {min(fb):.0%}-{max(fb):.0%} of blocks")
    max_err = max(e for v in verification for e in v["max_rel_err"].values())
    elapsed = time.time() - t_start
    print(f"\nmax rel err over all checks: {max_err:.2e}; total time {elapsed:.1f}s")

    out = {
        "meta": {
            "command": " ".join(["python"] + [os.path.relpath(os.path.abspath(sys.argv[0]))]
                                + sys.argv[1:]),
            "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(), "opset": OPSET,
            "threads": threads, "levels": levels, "blocks": blocks,
            "block_ms": block_ms, "quick": args.quick, "seed": args.seed,
            "elapsed_s": elapsed, "max_rel_err": max_err,
            "kernel": "3x3 pad 1", "batch": 1, "dtype": "float32",
            "method": (
                "one subprocess per (shape, threads) with a global ORT thread pool "
                "(intra=threads, inter=1, sequential, spinning default) shared by all "
                "sessions; sessions of all levels and forms: warm-up, then `blocks` "
                "interleaved blocks in "
                "shuffled order, each running every model `inner` times (~block_ms) "
                "via IOBinding; per-block mean ms per call; median_ms = median over blocks; "
                "speedup_vs_regular = median(regular)/median(form); "
                "speedup_paired_* = stats of per-block regular/form ratios (same level); "
                "speedup_vs_baseline_paired_median = per-block regular@ALL/form; summary "
                "uses the paired medians"),
        },
        "summary": summary,
        "results": results,
        "verification": verification,
        "optimized_graphs": graphs,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
