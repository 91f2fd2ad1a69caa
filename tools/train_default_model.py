#!/usr/bin/env python3
"""Train and export the default model + calibration set shipped with onnx-dwd.

Produces, in ``--out-dir`` (default: ``calibration/fashion_mnist`` under the
repository root):

* ``model.onnx``   - a small VGG-style CNN for Fashion-MNIST (opset 13,
  input ``input`` [batch,1,28,28] float32 in [0,1], output ``logits``
  [batch,10]).  Normalisation (mean 0.286 / std 0.353) happens inside the
  graph, and BatchNormalization nodes are kept un-fused (inference form) so
  that the optimizer's own BN folding is exercised.
* ``images/t10k_00000.png`` ... - the first ``NUM_CALIB_IMAGES`` images of
  the Fashion-MNIST t10k (test) split as 8-bit greyscale PNGs.
* ``images/labels.csv`` - ``file,label`` (file relative to ``images/``).
* ``classes.txt``  - the 10 class names, one per line, in label order.
* ``README.md``    - provenance: accuracy, command, seed, training time, licence.

The data is read from the Debian package ``dataset-fashion-mnist``; nothing is
downloaded.  Requires torch, onnx, onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "calibration" / "fashion_mnist"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

NUM_CALIB_IMAGES = 320
OPSET = 13
MEAN = 0.286
STD = 0.353
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got_magic = int.from_bytes(data[0:4], "big")
    if got_magic != magic:
        raise ValueError(f"{path}: bad idx magic {got_magic:#x}, expected {magic:#x}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    expected = int(np.prod(dims))
    if arr.size != expected:
        raise ValueError(f"{path}: expected {expected} bytes of payload, got {arr.size}")
    return arr.reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels uint8 [N]) for 'train' or 't10k'."""
    img_path = DATA_DIR / f"{split}-images-idx3-ubyte.gz"
    lbl_path = DATA_DIR / f"{split}-labels-idx1-ubyte.gz"
    missing = [p for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise SystemExit(
            "error: Fashion-MNIST files not found: "
            + ", ".join(str(p) for p in missing)
            + "\nInstall them with:  apt-get install dataset-fashion-mnist"
        )
    images = _read_idx(img_path, 0x00000803, 3)
    labels = _read_idx(lbl_path, 0x00000801, 1)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise SystemExit(f"error: unexpected Fashion-MNIST shapes {images.shape} / {labels.shape}")
    return images, labels


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
def build_model():
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    class SmallVGG(nn.Module):
        """Input: [N,1,28,28] float in [0,1]. Output: [N,10] logits."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(STD, dtype=torch.float32))
            self.features = nn.Sequential(
                *block(1, 16),
                *block(16, 32),
                nn.MaxPool2d(2),
                *block(32, 64),
                *block(64, 64),
                nn.MaxPool2d(2),
                *block(64, 128),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(128, 10)

        def forward(self, x):
            x = (x - self.mean) / self.std
            x = self.features(x)
            x = self.pool(x)
            x = torch.flatten(x, 1)
            return self.classifier(x)

    return SmallVGG()


def to_tensor(images_u8: np.ndarray):
    import torch

    return torch.from_numpy(images_u8.astype(np.float32) / 255.0).unsqueeze(1)


def evaluate(model, images_u8: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            logits = model(to_tensor(images_u8[i: i + batch]))
            correct += int((logits.argmax(1).numpy() == labels[i: i + batch]).sum())
    return correct / len(images_u8)


def train(model, images_u8, labels, *, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    import torch
    from torch import nn

    x_all = to_tensor(images_u8)
    y_all = torch.from_numpy(labels.astype(np.int64))
    n = len(x_all)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)

    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        running, seen = 0.0, 0
        te = time.perf_counter()
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size: (step + 1) * batch_size]
            xb, yb = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if (step + 1) % 100 == 0:
                print(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} "
                      f"loss {running / seen:.4f} ({time.perf_counter() - te:.0f}s)", flush=True)
        print(f"epoch {epoch + 1}/{epochs}: train loss {running / seen:.4f}, "
              f"{time.perf_counter() - te:.1f}s", flush=True)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
def export_onnx(model, path: Path) -> tuple[bool, dict[str, int]]:
    """Export with BN preserved if possible. Returns (bn_preserved, op_counts)."""
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    common = dict(
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    # TrainingMode.PRESERVE with the model in eval() mode skips the exporter's
    # Conv+BN fusion pass, so BatchNormalization survives (inference form).
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is used on purpose (dynamo=False).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, **common)
    m = onnx.load(str(path))
    bn = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    bn_ok = bool(bn) and all(len([o for o in n.output if o]) == 1 for n in bn)
    if not bn_ok:
        print("warning: BatchNormalization not preserved in inference form; "
              "re-exporting with default (fused) settings", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (dummy,), str(path), **common)
        m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    if opsets.get("ai.onnx") != OPSET:
        raise SystemExit(f"error: exported opset {opsets}, expected {OPSET}")
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return bn_ok, counts


def check_ort_matches_torch(model, onnx_path: Path, images_u8: np.ndarray) -> float:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    max_diff = 0.0
    for bs in (1, 7, 256):  # exercise the dynamic batch axis
        x = to_tensor(images_u8[:bs])
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(["logits"], {"input": x.numpy()})
        if got.shape != (bs, 10):
            raise SystemExit(f"error: onnxruntime output shape {got.shape}, expected {(bs, 10)}")
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
    if max_diff > 1e-4:
        raise SystemExit(f"error: onnxruntime vs torch max abs diff {max_diff:.3g} > 1e-4")
    return max_diff


# --------------------------------------------------------------------------
# Calibration set
# --------------------------------------------------------------------------
def write_calibration(out_dir: Path, images_u8: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(NUM_CALIB_IMAGES):
        name = f"t10k_{i:05d}.png"
        Image.fromarray(images_u8[i], mode="L").save(img_dir / name, optimize=True)
        rows.append((name, int(labels[i])))
    with open(out_dir / "images" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "label"])
        w.writerows(rows)
    (out_dir / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def accuracy_from_pngs(out_dir: Path, onnx_path: Path) -> tuple[float, int]:
    """Read images back from disk with Pillow and score model.onnx with onnxruntime."""
    import onnxruntime as ort
    from PIL import Image

    with open(out_dir / "images" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    xs, ys = [], []
    for r in rows:
        with Image.open(out_dir / "images" / r["file"]) as im:
            if im.mode != "L" or im.size != (28, 28):
                raise SystemExit(f"error: {r['file']}: mode {im.mode} size {im.size}")
            xs.append(np.asarray(im, dtype=np.float32) / 255.0)
        ys.append(int(r["label"]))
    x = np.stack(xs)[:, None, :, :]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    correct = int((logits.argmax(1) == np.array(ys)).sum())
    return correct / len(ys), len(ys)


def write_readme(out_dir: Path, *, command: str, seed: int, epochs: int, n_train: int,
                 batch_size: int, lr: float, test_acc: float, train_seconds: float,
                 bn_preserved: bool, op_counts: dict[str, int], n_params: int,
                 onnx_bytes: int, max_diff: float) -> None:
    import onnxruntime
    import torch

    ops = ", ".join(f"{k} ×{v}" for k, v in sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    bn_note = ("kept as separate `BatchNormalization` nodes (inference form, one output) — "
               "the onnx-dwd optimizer is expected to fold them itself"
               if bn_preserved else
               "fused into the preceding Conv by the exporter (BN could not be preserved)")
    text = f"""# Fashion-MNIST default model and calibration set

Generated by `tools/train_default_model.py`; do not edit by hand.

## Model (`model.onnx`)

A small VGG-style CNN trained on Fashion-MNIST:

```
(x - {MEAN}) / {STD}                       # normalisation is inside the graph
conv3x3(1→16)-BN-ReLU, conv3x3(16→32)-BN-ReLU, maxpool2
conv3x3(32→64)-BN-ReLU, conv3x3(64→64)-BN-ReLU, maxpool2
conv3x3(64→128)-BN-ReLU, global average pool, Linear(128→10)
```

* Input `input`: float32 `[batch, 1, 28, 28]`, plain pixel values `pixel / 255` in [0, 1].
* Output `logits`: float32 `[batch, 10]` (class order in `classes.txt`).
* Only the batch axis is dynamic. ONNX opset {OPSET}, exported with the TorchScript
  exporter (`torch.onnx.export(..., dynamo=False)`).
* BatchNormalization: {bn_note}.
* Node ops: {ops}.
* {n_params:,} parameters, {onnx_bytes:,} bytes.
* **t10k (10,000 test images) accuracy: {test_acc * 100:.2f}%** (torch, measured at generation time).
  onnxruntime matches torch to max |Δlogit| = {max_diff:.2g}.

## Calibration images

* `images/t10k_00000.png` … `images/t10k_{NUM_CALIB_IMAGES - 1:05d}.png`: the first
  {NUM_CALIB_IMAGES} images (indices 0–{NUM_CALIB_IMAGES - 1}) of the Fashion-MNIST t10k
  (test) split, unmodified, as 8-bit greyscale 28×28 PNGs.
* `images/labels.csv`: `file,label` — `file` relative to `images/`, `label` an integer 0–9.
* `classes.txt`: the 10 class names, one per line, line *k* = label *k*.

These are test-split images, so they were never seen during training.

## Regenerating

From the repository root (needs `apt-get install dataset-fashion-mnist`, plus
torch, onnx, onnxruntime, numpy, Pillow):

```
{command}
```

* Seed: {seed}; epochs: {epochs}; training images: first {n_train:,} of the train split;
  batch size {batch_size}; Adam with one-cycle LR schedule, max LR {lr}; `torch.set_num_threads(2)`.
* Training time: {train_seconds:.0f} s (CPU, 2 threads; torch {torch.__version__},
  onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}).
* Results are seeded but bit-exact reproducibility across machines / library versions is not
  guaranteed; accuracy should be within a few tenths of a percent.

## Licence

Fashion-MNIST © 2017 Zalando SE, released under the MIT (Expat) licence
(<https://github.com/zalandoresearch/fashion-mnist>); read from the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`, see
`/usr/share/doc/dataset-fashion-mnist/copyright`). The images here are unmodified
copies of test-split samples and the model is trained on the train split.
"""
    (out_dir / "README.md").write_text(text)


# --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help="output directory (default: calibration/fashion_mnist under the repo root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-images", type=int, default=60000,
                   help="use only the first N images of the train split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="max learning rate (one-cycle)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    train_x, train_y = load_split("train")
    test_x, test_y = load_split("t10k")
    n_train = min(args.train_images, len(train_x))
    if n_train <= 0:
        raise SystemExit("error: --train-images must be positive")
    train_x, train_y = train_x[:n_train], train_y[:n_train]
    print(f"train images: {n_train}, test images: {len(test_x)}", flush=True)

    model = build_model()
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model parameters: {n_params}", flush=True)
    train_seconds = train(model, train_x, train_y, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"training time: {train_seconds:.1f}s", flush=True)

    test_acc = evaluate(model, test_x, test_y)
    print(f"t10k accuracy (torch): {test_acc * 100:.2f}%", flush=True)

    onnx_path = out_dir / "model.onnx"
    bn_preserved, op_counts = export_onnx(model, onnx_path)
    onnx_bytes = onnx_path.stat().st_size
    if onnx_bytes > 2 * 1024 * 1024:
        raise SystemExit(f"error: {onnx_path} is {onnx_bytes} bytes (> 2 MB)")
    max_diff = check_ort_matches_torch(model, onnx_path, test_x)
    print(f"exported {onnx_path} ({onnx_bytes} bytes, opset {OPSET}); "
          f"BatchNormalization preserved: {bn_preserved}", flush=True)
    print("ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(op_counts.items())), flush=True)
    print(f"onnxruntime vs torch max abs diff: {max_diff:.3g}", flush=True)

    write_calibration(out_dir, test_x, test_y)

    cmd = "python tools/train_default_model.py"
    extra = []
    if args.seed != 0:
        extra.append(f"--seed {args.seed}")
    if args.epochs != 2:
        extra.append(f"--epochs {args.epochs}")
    if n_train != 60000:
        extra.append(f"--train-images {n_train}")
    if args.batch_size != 128:
        extra.append(f"--batch-size {args.batch_size}")
    if args.lr != 3e-3:
        extra.append(f"--lr {args.lr}")
    if out_dir != DEFAULT_OUT_DIR.resolve():
        extra.append(f"--out-dir {args.out_dir}")
    if extra:
        cmd += " " + " ".join(extra)
    write_readme(out_dir, command=cmd, seed=args.seed, epochs=args.epochs, n_train=n_train,
                 batch_size=args.batch_size, lr=args.lr, test_acc=test_acc,
                 train_seconds=train_seconds, bn_preserved=bn_preserved, op_counts=op_counts,
                 n_params=n_params, onnx_bytes=onnx_bytes, max_diff=max_diff)

    png_acc, n_png = accuracy_from_pngs(out_dir, onnx_path)
    print(f"onnxruntime accuracy on {n_png} calibration PNGs: {png_acc * 100:.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
