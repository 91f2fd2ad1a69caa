"""The paper's whole-model experiment (He et al., Table 3) in miniature, on Fashion-MNIST.

    nice -n 10 python benchmarks/table3.py --seeds 0,1,2 --json benchmarks/results/table3.json
    python benchmarks/table3.py --show benchmarks/results/table3.json     # the Markdown table

Per seed:
  1. train ShuffleNet V2 0.5x (benchmarks/shufflenet.py, 28x28 adaptation)
     and its "folded" twin (every dw3x3+BN+1x1 is one regular 3x3 conv)
     from scratch with the same schedule;
  2. fold BN, export the folded net's body (everything after the stem, which
     both architectures share as a regular conv) to ONNX, and decompose it
     with `onnx-dwd optimize` at rank 1: dwd-comp (paper Algorithm 2 with
     inter-layer compensation, as the paper), refit (ours), and channel
     (Zhang et al., c' for the MACs of the depthwise form). Calibration:
     stem outputs of training images as .npy batches;
  3. load each decomposed ONNX's conv weights into a torch twin of the
     matching architecture (checked against onnxruntime on the same inputs),
     and fine-tune it; fine-tune the original for the same extra epochs.
     Fine-tuning is the same for every row (paper section 3.7: a small
     learning rate): the BN-free inference form (BN folded into the convs,
     as in every ONNX model here), Adam at --ft-lr, constant, --ft-epochs;
  4. top-1 error on the whole Fashion-MNIST test split (10,000 images).

Threads: torch and the optimizer's numpy run on 1 thread (onnxruntime
sessions inside the optimizer use its defaults). Pure measurement: the JSON
holds every number and the per-row CPU time.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

import shufflenet as sn  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ROWS = ["folded", "original", "original+ft", "channel", "channel+ft", "dwd-comp", "dwd-comp+ft", "refit", "refit+ft"]
DECOMPOSE = {"channel": "channel", "dwd-comp": "dwd-comp", "refit": "refit"}
MATCH_TOL = 1e-4  # torch twin vs onnxruntime, relative max abs difference


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte.gz file (Fashion-MNIST / MNIST format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion(split: str):
    images, labels = DATA_DIR / f"{split}-images-idx3-ubyte.gz", DATA_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file():
        sys.exit(f"{images} is missing: apt-get install dataset-fashion-mnist")
    x = torch.from_numpy(read_idx(images).astype(np.float32) / 255).unsqueeze(1)
    return x, torch.from_numpy(read_idx(labels).astype(np.int64))


def train(net, x, y, *, epochs: int, lr: float, batch: int, seed: int, schedule: str) -> None:
    """Adam, cross-entropy; schedule "onecycle" (from scratch) or "constant" (fine-tune)."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2) \
        if schedule == "onecycle" else None
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            if sched:
                sched.step()
    net.eval()


@torch.no_grad()
def top1_error(net, x, y, batch: int = 1000) -> float:
    net.eval()
    wrong = sum(int((net(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return wrong / len(x)


def conv_macs(net, shape=(1, 1, 28, 28)) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one image."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net.eval()(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return total[0]


def check_against_onnx(net, onnx_path: Path, feats: np.ndarray) -> float:
    """Relative max abs difference of the torch body and onnxruntime on the same stem outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"features": feats})[0]
    with torch.no_grad():
        got = net.body.eval()(torch.from_numpy(feats)).numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def optimize(folded_onnx: Path, out: Path, report: Path, calib: Path, method: str, rank: int) -> float:
    cmd = ["onnx-dwd", "optimize", str(folded_onnx), str(out), "--calib", str(calib), "--method", method,
           "--rank", str(rank), "--report", str(report), "-q"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - started


def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_seed(seed: int, args, train_x, train_y, test_x, test_y, work: Path) -> dict:
    import onnx

    rows, log = {}, lambda msg: print(f"[seed {seed}] {msg}", flush=True)

    def record(name, net, started_cpu, started_wall, **extra):
        err = top1_error(net, test_x, test_y)
        rows[name] = {"top1_error": err, "macs": conv_macs(net), "cpu_s": round(cpu() - started_cpu, 1),
                      "wall_s": round(time.perf_counter() - started_wall, 1), **extra}
        log(f"{name:12s} top-1 error {100 * err:.2f}%  MACs {rows[name]['macs'] / 1e6:.2f}M  "
            f"({rows[name]['cpu_s']:.0f} s CPU)")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(train_x), generator=gen)[:args.train_images]
    x, y = train_x[subset], train_y[subset]
    nets = {}
    for form, row in (("folded", "folded"), ("dw", "original")):
        c0, w0 = cpu(), time.perf_counter()
        torch.manual_seed(seed)
        net = sn.ShuffleNetV2(form)
        train(net, x, y, epochs=args.epochs, lr=args.lr, batch=args.batch, seed=seed, schedule="onecycle")
        nets[form] = sn.deploy(net)
        record(row, nets[form], c0, w0, params=sum(p.numel() for p in nets[form].parameters()))

    def finetune(name, net, c0, w0, **extra):
        torch.manual_seed(seed + 1000)
        train(net, x, y, epochs=args.ft_epochs, lr=args.ft_lr, batch=args.ft_batch, seed=seed + 1000,
              schedule="constant")
        record(name, net, c0, w0, **extra)

    c0, w0 = cpu(), time.perf_counter()
    finetune("original+ft", nets["dw"], c0, w0)

    # the folded body as ONNX, calibration = its stem outputs on training images
    folded = nets["folded"]
    body_onnx = work / f"folded_body_s{seed}.onnx"
    sn.export_body(folded, body_onnx)
    calib = work / f"calib_s{seed}"
    calib.mkdir(exist_ok=True)
    with torch.no_grad():
        feats = folded.stem(x[:args.calib_images]).numpy()
    for i in range(0, len(feats), 50):
        np.save(calib / f"{i // 50:04d}.npy", feats[i:i + 50])
    check_feats = feats[:64]
    folded_model = onnx.load(str(body_onnx))

    for row, method in DECOMPOSE.items():
        c0, w0 = cpu(), time.perf_counter()
        out, rep = work / f"{row}_s{seed}.onnx", work / f"{row}_s{seed}.json"
        seconds = optimize(body_onnx, out, rep, calib, method, args.rank)
        report = json.loads(rep.read_text())
        net = sn.deploy(sn.ShuffleNetV2("folded"))  # architecture placeholder; every weight is replaced below
        net.stem.load_state_dict(folded.stem.state_dict())
        net.body.fc.load_state_dict(folded.body.fc.state_dict())
        decomposed = onnx.load(str(out))
        forms = sn.load_slots_from_onnx(net, folded_model, decomposed)
        # the slots the optimizer keeps (1x1 convs, conv5) come from the decomposed model too
        mismatch = check_against_onnx(net, out, check_feats)
        if mismatch > MATCH_TOL:
            sys.exit(f"{row}: torch twin differs from onnxruntime by {mismatch:.2e} (relative max abs)")
        v = report["model"]["validation"]["outputs"]["logits"]
        extra = {"optimize_s": round(seconds, 1), "onnx_vs_torch": mismatch, "decomposed": report["model"]["decomposed"],
                 "forms": sorted(set(forms.values())), "holdout_logits_rel_error": v["rel_error"]}
        record(row, net, c0, w0, **extra)
        finetune(f"{row}+ft", net, cpu(), time.perf_counter())
    return rows


def summarize(per_seed: list) -> dict:
    out = {}
    for row in ROWS:
        errs = np.array([s[row]["top1_error"] for s in per_seed])
        out[row] = {"mean": float(errs.mean()), "std": float(errs.std(ddof=1)) if len(errs) > 1 else 0.0,
                    "per_seed": errs.tolist(), "macs": per_seed[0][row]["macs"],
                    "cpu_s_mean": float(np.mean([s[row]["cpu_s"] for s in per_seed]))}
    return out


LABELS = {
    "folded": "folded ShuffleNet V2 (regular 3x3 convs), from scratch",
    "original": "ShuffleNet V2, from scratch",
    "original+ft": "ShuffleNet V2, from scratch + the fine-tune epochs",
    "channel": "channel decomposition of folded (Zhang et al.), no fine-tune",
    "channel+ft": "channel decomposition, fine-tuned",
    "dwd-comp": "DWD with compensation (paper Alg. 2 + inter-layer), no fine-tune",
    "dwd-comp+ft": "DWD with compensation, fine-tuned",
    "refit": "refit (ours), no fine-tune",
    "refit+ft": "refit (ours), fine-tuned",
}


def markdown(result: dict) -> str:
    """The table of a result JSON: top-1 error mean ± std over seeds, MACs, CPU seconds per row."""
    seeds = len(result["seeds"])
    lines = [f"| model | top-1 error, mean ± std ({seeds} seeds) | per seed | MACs | CPU s / seed |",
             "|---|---|---|---|---|"]
    for row, s in result["summary"].items():
        per = ", ".join(f"{100 * e:.2f}" for e in s["per_seed"])
        lines.append(f"| {LABELS.get(row, row)} | {100 * s['mean']:.2f}% ± {100 * s['std']:.2f} | {per} | "
                     f"{s['macs'] / 1e6:.2f}M | {s['cpu_s_mean']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--show":  # print the Markdown table of a result JSON
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-images", type=int, default=10000, help="random subset of the 60k training split")
    p.add_argument("--epochs", type=int, default=5, help="training from scratch")
    p.add_argument("--lr", type=float, default=2e-3, help="peak of the one-cycle schedule, from scratch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--calib-images", type=int, default=1000, help="training images the optimizer calibrates on")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--keep", type=Path, default=None, help="keep the ONNX models and reports in this folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    train_x, train_y = load_fashion("train")
    test_x, test_y = load_fashion("t10k")
    started = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in [int(s) for s in args.seeds.split(",")]:
            per_seed.append(run_seed(seed, args, train_x, train_y, test_x, test_y, work))
            result = {"meta": {
                "command": "python benchmarks/table3.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "test_images": len(test_x), "torch": torch.__version__, "threads": 1,
                "python": platform.python_version(), "machine": platform.machine(),
                "date": datetime.date.today().isoformat(), "wall_s": round(time.perf_counter() - started, 1)},
                "summary": summarize(per_seed), "seeds": per_seed}
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'row':14s} top-1 error (mean ± std over {len(per_seed)} seeds)   MACs")
    for row, s in result["summary"].items():
        print(f"{row:14s} {100 * s['mean']:6.2f}% ± {100 * s['std']:.2f}   {s['macs'] / 1e6:.2f}M  "
              f"cpu {s['cpu_s_mean']:.0f} s")


if __name__ == "__main__":
    main()
