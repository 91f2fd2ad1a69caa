"""Whole-model latency and numerics of original vs optimized models on every runtime.

    python benchmarks/runtimes.py --preset rank1 --json benchmarks/results/runtimes.json
    python benchmarks/runtimes.py --pair NAME=BEFORE.onnx,AFTER.onnx[,INPUT:D0,D1,...] ... --json FILE

Runs `onnx_dwd.bench.bench` (the code behind `onnx-dwd bench`) on each pair:
for each runtime, both models converted, checked against onnxruntime on the
same random input, then timed in interleaved blocks at each thread count.
`--preset rank1` first makes the rank-1 models of the embedded Fashion-MNIST
CNN (refit on its bundled images) and of YOLOv8n (data-free, 320x320) with
`onnx-dwd optimize` in a temporary directory. Pairs are merged into --json by
name (and, within a pair, by runtime and thread count), so rows for other
models (e.g. the 1.5x-budget ones) or runtimes can be added later without
re-running the rest. --markdown writes the table of every pair in FILE.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

from click.testing import CliRunner

from onnx_dwd import __version__, cli
from onnx_dwd.bench import bench, render
from onnx_dwd.config import parse_input_shape
from onnx_dwd.runtimes.base import RUNTIMES, parse_runtimes

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "calibration" / "fashion_mnist"


def parse_pair(text: str) -> Tuple[str, Path, Path, Dict]:
    name, _, rest = text.partition("=")
    parts = rest.split(",", 2)
    if not name or len(parts) < 2:
        sys.exit(f"--pair {text!r}: expected NAME=BEFORE.onnx,AFTER.onnx[,INPUT:D0,D1,...]")
    shapes = dict([parse_input_shape(parts[2])]) if len(parts) == 3 else {}
    return name, Path(parts[0]), Path(parts[1]), shapes


def optimize(args: List[str]) -> None:
    result = CliRunner().invoke(cli.main, ["optimize"] + args + ["-q"])
    if result.exit_code:
        sys.exit(f"onnx-dwd optimize {' '.join(args)} failed:\n{result.output}")


def rank1_pairs(tmp: Path) -> List[Tuple[str, Path, Path, Dict]]:
    """The embedded model (refit on its images) and YOLOv8n (data-free) at rank 1."""
    sys.path.insert(0, str(REPO / "tools"))
    from real_models import model_path
    yolo = model_path("yolov8n")
    optimize([str(FASHION / "model.onnx"), str(tmp / "fashion_r1.onnx"), "--calib", str(FASHION / "images"),
              "--rank", "1"])
    optimize([str(yolo), str(tmp / "yolov8n_r1.onnx"), "--rank", "1", "--input-shape", "images:1,3,320,320"])
    return [("fashion-mnist rank 1", FASHION / "model.onnx", tmp / "fashion_r1.onnx", {}),
            ("yolov8n rank 1", Path(yolo), tmp / "yolov8n_r1.onnx", {"images": (1, 3, 320, 320)})]


def markdown(pairs: Dict[str, Dict]) -> str:
    lines = ["| model | runtime | threads | before ms [IQR] | after ms [IQR] | speed-up [IQR] | "
             "max rel. error vs onnxruntime (before / after) | before vs after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in pairs.items():
        for r in result["rows"]:
            if "error" in r:
                lines.append(f"| {name} | {r['runtime']} | {r['threads']} | failed: {r['error'].splitlines()[0]} "
                             "| | | | |")
                continue
            m = r["match"]
            lines.append(
                f"| {name} | {r['runtime']} | {r['threads']} | {r['before_ms']:.2f} "
                f"[{r['before_iqr_ms'][0]:.2f}–{r['before_iqr_ms'][1]:.2f}] | {r['after_ms']:.2f} "
                f"[{r['after_iqr_ms'][0]:.2f}–{r['after_iqr_ms'][1]:.2f}] | **{r['speedup']:.2f}×** "
                f"[{r['speedup_iqr'][0]:.2f}–{r['speedup_iqr'][1]:.2f}] | "
                f"{m['before']['rel_error']:.1e} / {m['after']['rel_error']:.1e} "
                f"{'ok' if r['match_ok'] else '**no**'} | {r['output_rel_error']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", action="append", default=[], help="NAME=BEFORE,AFTER[,INPUT:D0,D1,...]")
    parser.add_argument("--preset", choices=["rank1"], default=None)
    parser.add_argument("--runtime", default="ort,ort:extended,litert,ncnn,mnn,openvino")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    runtimes = parse_runtimes(args.runtime)
    threads = [int(t) for t in args.threads.split(",")]
    path = Path(args.json)
    stored = json.loads(path.read_text()) if path.is_file() else {"pairs": {}}
    with tempfile.TemporaryDirectory(prefix="onnx-dwd-runtimes-") as tmp:
        pairs = [parse_pair(p) for p in args.pair]
        if args.preset == "rank1":
            pairs = rank1_pairs(Path(tmp)) + pairs
        if not pairs:
            sys.exit("nothing to run: give --preset rank1 or --pair NAME=BEFORE,AFTER")
        for name, before, after, shapes in pairs:
            started = time.perf_counter()
            result = bench(before, after, runtimes=runtimes, threads=threads, input_shapes=shapes,
                           blocks=args.blocks)
            result["seconds"] = round(time.perf_counter() - started, 1)
            result["before"], result["after"] = _portable(before), _portable(after)
            result["command"] = " ".join(["python", "benchmarks/runtimes.py"] + sys.argv[1:])
            old = stored["pairs"].get(name)
            if old is not None:  # keep the rows of runtimes and thread counts not run this time
                ran = {(r["runtime"], r["threads"]) for r in result["rows"]}
                rows = [r for r in old["rows"] if (r["runtime"], r["threads"]) not in ran] + result["rows"]
                order = list(RUNTIMES)
                result["rows"] = sorted(rows, key=lambda r: (order.index(r["runtime"].partition(":")[0]),
                                                             r["runtime"], r["threads"]))
                result["errors"] = [e for e in old["errors"] if not any(e.startswith(f"{rt} ({t} ") for rt, t in ran)] \
                    + result["errors"]
            stored["pairs"][name] = result
            print(f"== {name} ({result['seconds']} s)\n{render(result)}", flush=True)
    stored["meta"] = {"command": " ".join(["python", "benchmarks/runtimes.py"] + sys.argv[1:]),
                      "onnx_dwd": __version__, "python": platform.python_version(),
                      "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps(stored, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(stored["pairs"]))


def _portable(p: Path) -> str:
    """A path as the reader can find it again: relative to the repo, or the file name for temporary files."""
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return Path(p).name if str(p).startswith(tempfile.gettempdir()) else str(p)


if __name__ == "__main__":
    main()
