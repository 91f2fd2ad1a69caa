"""Paper Table 2, "sanity check": random W[128, 64, 3, 3], random input patches.

    python benchmarks/sanity_check.py --json benchmarks/results/sanity_check.json

Per run: W and N = 3000 patches x (standard normal), y = W x; every method
fits on the statistics of those patches and is scored in-sample by the
relative error |Y - Y_hat| / |Y| (as the paper). 10 runs, seeds 0-9.
Depthwise methods use rank 1 (8.4x fewer MACs: 64*(9+128) vs 128*64*9).
Channel decomposition is reported twice: `channel` with c' = 12, the same
MACs as the depthwise form (12*(576+128) = 8448), and `channel_paper` with
c' = 14, which reproduces the paper's 0.887 (it matches the k x k conv
alone to ~9x fewer MACs, ignoring the 1x1's).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from onnx_dwd.cost import channels_for_rank
from onnx_dwd.fit import network_decoupling, reconstruct_weight
from onnx_dwd.fit.data import channel, dwd, dwd_comp, refit
from onnx_dwd.fit.stats import LayerStats, relative_error

PAPER = {"channel_paper": 0.887, "dwd": 0.914, "dwd_comp": 0.906}
N_OUT, C_IN, K, PATCHES, RUNS = 128, 64, 3, 3000, 10


def one_run(seed: int, channels: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N_OUT, C_IN, K, K))
    x = rng.standard_normal((PATCHES, C_IN * K * K))
    stats = LayerStats.zeros(N_OUT, C_IN * K * K)
    stats.add(x, x @ w.reshape(N_OUT, -1).T)
    errors, seconds = {}, {}
    for name, fit in [("nd", lambda: network_decoupling(w, 1)), ("dwd", lambda: dwd(w, stats, 1)),
                      ("dwd_comp", lambda: dwd_comp(w, stats, 1)), ("refit", lambda: refit(w, stats, 1))]:
        t = time.perf_counter()
        dec = fit()
        seconds[name] = time.perf_counter() - t
        errors[name] = relative_error(stats, reconstruct_weight(dec), dec.bias)
    for name, cp in [("channel", channels), ("channel_paper", 14)]:
        t = time.perf_counter()
        ch = channel(w, stats, cp)
        seconds[name] = time.perf_counter() - t
        rebuilt = (ch.second[:, :, 0, 0].astype(np.float64) @ ch.first.reshape(cp, -1)).reshape(w.shape)
        errors[name] = relative_error(stats, rebuilt, ch.bias)
    return errors, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    channels = channels_for_rank(N_OUT, C_IN, (K, K), 1)
    runs = [one_run(seed, channels) for seed in range(args.runs)]
    result = {"meta": {"command": "python benchmarks/sanity_check.py --json benchmarks/results/sanity_check.json",
                       "weight": [N_OUT, C_IN, K, K], "patches": PATCHES, "runs": args.runs,
                       "channel_c_prime": channels, "channel_paper_c_prime": 14,
                       "python": platform.python_version(), "numpy": np.__version__,
                       "date": time.strftime("%Y-%m-%d")}}
    print(f"{'method':14s} {'mean':>7s} {'std':>7s} {'paper':>7s} {'s/fit':>7s}")
    for name in ["nd", "dwd", "dwd_comp", "refit", "channel", "channel_paper"]:
        errs = np.array([r[0][name] for r in runs])
        secs = np.array([r[1][name] for r in runs])
        result[name] = {"mean": float(errs.mean()), "std": float(errs.std()), "seconds": float(np.median(secs))}
        paper = f"{PAPER[name]:.3f}" if name in PAPER else "-"
        print(f"{name:14s} {errs.mean():7.4f} {errs.std():7.4f} {paper:>7s} {np.median(secs):7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
