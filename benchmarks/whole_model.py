"""Whole-model accuracy of each method: output error and agreement on held-out data.

    python benchmarks/whole_model.py --model M.onnx --calib DIR --json OUT.json [optimize options...]

Runs `onnx_dwd.optimize` once per method (nd, dwd, dwd-comp, refit, channel;
`refit@VARIANT` fixes refit's variant, e.g. refit@sweeps+ls) and rank, on the same calibration folder (every 5th item held out and never
fitted on), and collects from each report: conv MACs before/after, output
relative error / cosine / SQNR on the held-out data, top-1 agreement with
the original and accuracy against labels when the folder has labels.csv,
and the wall time. Extra arguments after -- go to every optimize run
(e.g. -- --input-shape images:1,3,320,320).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from onnx_dwd import __version__, cli

METHODS = ["nd", "dwd", "dwd-comp", "refit", "channel"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ranks", default="1")
    parser.add_argument("--label", default=None, help="name of the model in the output")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in [int(r) for r in args.ranks.split(",")]:
            for method in args.methods.split(","):
                out, rep = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
                name, _, variant = method.partition("@")  # refit@alg2 fixes refit's variant
                cmd = ["optimize", args.model, str(out), "--calib", args.calib, "--method", name,
                       "--rank", str(rank), "--report", str(rep), "-q"] + extra
                if variant:
                    cmd += ["--refit-variant", variant]
                started = time.perf_counter()
                result = CliRunner().invoke(cli.main, cmd)
                seconds = time.perf_counter() - started
                if result.exit_code:
                    sys.exit(f"optimize failed for {method}: {result.output}")
                report = json.loads(rep.read_text())
                m, v = report["model"], report["model"]["validation"]
                row = {"method": method, "rank": rank, "macs_before": m["macs_before"], "macs_after": m["macs_after"],
                       "mac_reduction": m["macs_before"] / m["macs_after"], "seconds": round(seconds, 1),
                       "validation_inputs": v["inputs"], "samples": v["samples"], "outputs": v["outputs"]}
                for key in ("top1_agreement", "accuracy_before", "accuracy_after"):
                    if key in v:
                        row[key] = v[key]
                layer_errors = [l["rel_error"] for l in report["layers"] if l.get("rel_error") is not None]
                variants = [l["refit_variant"] for l in report["layers"] if l.get("refit_variant")]
                if variants:
                    row["refit_variants"] = {v: variants.count(v) for v in sorted(set(variants))}
                row["mean_layer_rel_error"] = sum(layer_errors) / len(layer_errors) if layer_errors else None
                rows.append(row)
                out_err = ", ".join(f"{k} {o['rel_error']:.4f}" for k, o in v["outputs"].items())
                extra_txt = "".join(f", {k} {row[k]:.4f}" for k in ("top1_agreement", "accuracy_after") if k in row)
                print(f"rank {rank} {method:9s} MACs /{row['mac_reduction']:.2f}: output rel_error {out_err}"
                      f"{extra_txt}  ({seconds:.0f} s)", flush=True)
    result = {"meta": {"command": " ".join(["python", "benchmarks/whole_model.py"] + sys.argv[1:]),
                       "model": args.label or args.model, "calib": args.calib, "onnx_dwd": __version__,
                       "python": platform.python_version(), "machine": platform.machine(),
                       "date": time.strftime("%Y-%m-%d")},
              "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
