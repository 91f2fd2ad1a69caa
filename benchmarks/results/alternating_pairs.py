"""Alternating runs of memory_time.py's children for two or more code trees and quantize_static.

    git worktree add -f /tmp/before <commit>
    python benchmarks/results/alternating_pairs.py COUNT REPS /tmp/before,/path/to/repo

Each rep runs every tree's `onnx-dwd --rank 1 --no-latency` child (TOOL overrides it) and
then quantize_static (with the first tree's code), on /tmp/crops1024 (tools/make_photos.py);
each line: wall seconds, the child's CPU seconds (its rusage), peak RSS. Then medians.
"""
import json
import os
import resource
import statistics
import subprocess
import sys

count, reps, trees = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
tool = os.environ.get("TOOL", "onnx-dwd --rank 1 --no-latency")
rows = {t: [] for t in trees + ["quant"]}


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


for _ in range(reps):
    for t in trees + ["quant"]:
        tree = trees[0] if t == "quant" else t
        child_tool = "ort quantize_static" if t == "quant" else tool
        before = cpu_seconds()
        p = subprocess.run([sys.executable, f"{tree}/benchmarks/memory_time.py", "--images", "/tmp/crops1024",
                            "--child", child_tool, "--count", str(count)],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=tree))
        if p.returncode:
            print(t, "FAILED", p.stderr[-500:])
            continue
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["cpu"] = cpu_seconds() - before
        rows[t].append(row)
        print(f"{t:12s} {row['seconds']:6.2f} s cpu {row['cpu']:6.2f} {row['peak_rss_mb']:6.0f} MB", flush=True)

quant = statistics.median(r["seconds"] for r in rows["quant"])
for t, rs in rows.items():
    s = [r["seconds"] for r in rs]
    print(f"{t:12s} median {statistics.median(s):6.2f} s  min {min(s):6.2f} max {max(s):6.2f}  "
          f"ratio-to-quant-median {statistics.median(s) / quant:5.2f}  "
          f"rss max {max(r['peak_rss_mb'] for r in rs):5.0f}  cpu median {statistics.median(r['cpu'] for r in rs):6.2f}")
