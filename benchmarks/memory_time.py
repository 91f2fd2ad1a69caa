"""Peak memory and wall time of a calibrated run vs onnxruntime's quantize_static.

    python tools/make_photos.py /tmp/crops1024 --crops 1024
    python benchmarks/memory_time.py --images /tmp/crops1024 --counts 64,1024 \
        --json benchmarks/results/memory_time.json

Each measurement is a fresh subprocess that reports its own peak RSS
(getrusage ru_maxrss) and wall time, so runs do not share memory. Measured on
YOLOv8n (320x320) with the same images read by the same loader:
- "onnx-dwd OPTIONS": `onnx-dwd optimize MODEL OUT --calib IMAGES --max-images N
  --input-shape images:1,3,320,320 -q OPTIONS`, in process through the CLI;
  the time includes loading, fitting, validating and writing the model;
- onnxruntime.quantization.quantize_static (MinMax, QDQ, uint8 activations),
  default options. Its calibrator keeps per-batch ReduceMin/ReduceMax
  results, which are small. (Its CalibMaxIntermediateOutputs option is not
  usable in onnxruntime 1.32: reaching the cap clears the collected data
  without merging it into the ranges, and a batch count that is a multiple
  of the cap ends in "No data is collected".)
Tools alternate within each image count so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["onnx-dwd --rank 1 --no-latency", "onnx-dwd --rank 1 --no-latency --position-budget 0",
         "onnx-dwd --rank 1 --no-latency --no-inter-layer", "onnx-dwd", "ort quantize_static"]
SHAPE = (1, 3, 320, 320)


def child(tool: str, images: Path, count: int) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    from real_models import model_path

    from onnx_dwd.calib import Preprocess, image_calibration, resolve_input_specs
    from onnx_dwd.modelio import load_model

    model = model_path("yolov8n")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        if tool.startswith("onnx-dwd"):
            from click.testing import CliRunner

            from onnx_dwd import cli
            args = ["optimize", str(model), str(out), "--calib", str(images), "--max-images", str(count),
                    "--input-shape", "images:" + ",".join(map(str, SHAPE)), "-q"] + tool.split()[1:]
            result = CliRunner().invoke(cli.main, args)
            if result.exit_code:
                raise SystemExit(f"onnx-dwd failed: {result.output.strip()}")
        else:
            from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

            specs = resolve_input_specs(load_model(model), {"images": SHAPE}, str(model))
            part = image_calibration(images, specs, Preprocess(), holdout=0.0, limit=count).fit

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = part.batches()

                def get_next(self):
                    return next(self.it, None)

            quantize_static(str(model), str(out), Reader(), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--counts", default="64,1024")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.count)
        return
    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        for tool in args.tools.split(","):
            proc = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--child", tool,
                                   "--count", str(count)], capture_output=True, text=True)
            if proc.returncode:  # recorded, not hidden; the other measurements still count
                rows.append({"tool": tool, "images": count, "failed": proc.stderr.strip().splitlines()[-1]})
                print(f"{tool:32s} {count:5d} images: FAILED: {rows[-1]['failed']}", flush=True)
                continue
            row = {"tool": tool, "images": count, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{tool:32s} {count:5d} images: {row['seconds']:8.1f} s, peak RSS {row['peak_rss_mb']:7.0f} MB",
                  flush=True)
    result = {"meta": {"command": " ".join(["python", "benchmarks/memory_time.py"] + sys.argv[1:]),
                       "model": "yolov8n (nudenet 3.4.2) at 320x320", "python": platform.python_version(),
                       "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
