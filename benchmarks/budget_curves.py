"""Speed-up vs output error under --target-speedup budgets, per model, method and threads.

    python benchmarks/budget_curves.py --calib PHOTOS --json OUT.json [--png OUT.png]
        [--models yolov8n,open-nsfw] [--methods refit,nd] [--threads 1,2] [--budgets 1.25,1.5,2,3]

Each row runs two commands, printed and stored with the row:
  onnx-dwd optimize M OUT --calib PHOTOS --target-speedup X --method METHOD --threads T ...
  onnx-dwd bench M OUT --threads T --json BENCH
and records the speed-up `bench` measures (median of per-block ratios of
interleaved blocks, with the interquartile range) next to the report's
held-out output error, top-1 agreement (classifiers), the layers decomposed
and whether the choice met its target while choosing. Layer timings are
cached (runtimes/layer_latency.py), so the first row of a model and thread
count is the slow one. With --png, draws the curves (needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from real_models import model_path  # noqa: E402

#: optimize flags each model needs (its input and preprocessing).
MODEL_FLAGS = {
    "yolov8n": ["--input-shape", "images:1,3,320,320"],
    "open-nsfw": ["--resize", "256", "--scale", "1", "--mean", "104,117,123", "--channel-order", "bgr"],
}
BENCH_FLAGS = {"yolov8n": ["--input-shape", "images:1,3,320,320"], "open-nsfw": []}


def run(cmd):
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def row(model: str, method: str, threads: int, budget: float, calib: str, tmp: Path) -> dict:
    src = str(model_path(model))
    out, report, bench_json = tmp / "out.onnx", tmp / "report.json", tmp / "bench.json"
    optimize = ["onnx-dwd", "optimize", src, str(out), "--calib", calib, "--target-speedup", str(budget),
                "--method", method, "--threads", str(threads), "--report", str(report), "-q"] + MODEL_FLAGS[model]
    bench = ["onnx-dwd", "bench", src, str(out), "--threads", str(threads), "--json", str(bench_json)] + \
        BENCH_FLAGS[model]
    seconds = run(optimize)
    run(bench)
    rep, b = json.loads(report.read_text()), json.loads(bench_json.read_text())
    (brow,) = [r for r in b["rows"] if r["threads"] == threads]
    v, m = rep["model"]["validation"], rep["model"]
    return {
        "model": model, "method": method, "threads": threads, "target": budget,
        "bench_speedup": brow["speedup"], "bench_speedup_iqr": brow["speedup_iqr"],
        "bench_before_ms": brow["before_ms"], "bench_after_ms": brow["after_ms"],
        "met_while_choosing": m["selection"]["met"],
        "report_speedup": m["latency"]["speedup"],
        "output_rel_error": max(o["rel_error"] for o in v["outputs"].values()),
        "top1_agreement": v.get("top1_agreement"),
        "decomposed": m["decomposed"], "convs": m["convs"],
        "ranks": [l["rank"] for l in rep["layers"] if l["decomposed"]],
        "slower_layers": sum(1 for l in rep["layers"] if l.get("latency_after_ms") is not None
                             and l["latency_after_ms"] > l["latency_before_ms"]),
        "held_out": v["inputs"], "optimize_seconds": round(seconds, 1),
        "commands": [" ".join(optimize).replace(src, f"$(python tools/real_models.py {model})"),
                     " ".join(bench).replace(src, f"$(python tools/real_models.py {model})")],
    }


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in sorted({r["method"] for r in rows}):
            for threads in sorted({r["threads"] for r in rows}):
                pts = sorted((r["bench_speedup"], r["output_rel_error"]) for r in rows
                             if r["model"] == model and r["method"] == method and r["threads"] == threads)
                if pts:
                    ax.plot(*zip(*pts), marker="o" if method == "refit" else "s",
                            linestyle="-" if threads == 1 else "--", label=f"{method}, {threads} thread(s)")
        ax.set_xlabel("whole-model speed-up, measured by onnx-dwd bench")
        ax.set_ylabel("output relative error (held-out photos)")
        ax.set_yscale("log")
        ax.set_title(f"{model}: --target-speedup 1.25 / 1.5 / 2 / 3")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows) -> str:
    """The rows as the Markdown table of RESULTS.md."""
    out = ["| model | method | threads | target | bench speed-up [IQR] | output rel. error | top-1 agreement "
           "| convs decomposed | met while choosing | optimize s |", "|" + "---|" * 10]
    for r in rows:
        top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.0f}%"
        out.append(f"| {r['model']} | {r['method']} | {r['threads']} | {r['target']:g}x | "
                   f"{r['bench_speedup']:.2f}x [{r['bench_speedup_iqr'][0]:.2f}-{r['bench_speedup_iqr'][1]:.2f}] | "
                   f"{r['output_rel_error']:.4f} | {top1} | {r['decomposed']}/{r['convs']} | "
                   f"{'yes' if r['met_while_choosing'] else 'no (fastest plan)'} | {r['optimize_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--png")
    parser.add_argument("--models", default="yolov8n,open-nsfw")
    parser.add_argument("--methods", default="refit,nd")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--budgets", default="1.25,1.5,2,3")
    parser.add_argument("--plot-only", action="store_true", help="redraw --png from an existing --json")
    parser.add_argument("--show", action="store_true", help="print the Markdown table of an existing --json")
    args = parser.parse_args()
    if args.plot_only or args.show:
        rows = json.loads(Path(args.json).read_text())["rows"]
        if args.png:
            plot(rows, Path(args.png))
        if args.show:
            print(markdown(rows), end="")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for threads in [int(t) for t in args.threads.split(",")]:
                for method in args.methods.split(","):
                    for budget in [float(b) for b in args.budgets.split(",")]:
                        r = row(model, method, threads, budget, args.calib, Path(tmp))
                        rows.append(r)
                        print(f"{model:10s} {method:5s} t{threads} target {budget:4g}: bench {r['bench_speedup']:.2f}x "
                              f"[{r['bench_speedup_iqr'][0]:.2f}-{r['bench_speedup_iqr'][1]:.2f}] "
                              f"err {r['output_rel_error']:.4f} top1 {r['top1_agreement']} "
                              f"met {r['met_while_choosing']} ({r['optimize_seconds']} s)", flush=True)
                        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "python": platform.python_version(), "calib": args.calib, "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        plot(rows, Path(args.png))


if __name__ == "__main__":
    main()
