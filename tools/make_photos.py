"""Collect real photos shipped by PyPI packages into a calibration folder.

    python tools/make_photos.py OUT_DIR [--crops N] [--seed S]

Sources (installed by `bash tools/setup.sh --bench`): the 20 ImageNet sample
photos of foolbox 3.3.4 (512x512, label in the file name) and the natural
colour photos of scikit-image's data folder (astronaut, cat, coffee, ...).
With --crops N the folder instead holds N seeded random crops (30-100% of the
side, random aspect 3:4-4:3, random horizontal flip) of those photos, for runs
that need more images than the packages ship. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
                  "rocket.jpg", "hubble_deep_field.jpg"]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"package {name} is not installed; run `bash tools/setup.sh --bench`")
    return Path(spec.submodule_search_locations[0])


def source_photos() -> list:
    foolbox = sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg")) + \
        sorted((_package_dir("foolbox") / "data").glob("imagenet_*.png"))
    skimage = [_package_dir("skimage") / "data" / n for n in SKIMAGE_PHOTOS]
    photos = [p for p in foolbox + skimage if p.is_file()]
    if len(photos) < 20:
        sys.exit(f"expected at least 20 photos, found {len(photos)}")
    return photos


def random_crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop: 30-100% of the shorter side, aspect 3:4-4:3, flipped half the time."""
    w, h = im.size
    side = rng.uniform(0.3, 1.0) * min(w, h)
    aspect = rng.uniform(0.75, 4 / 3)
    cw, ch = min(w, int(side * aspect)), min(h, int(side / aspect))
    left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = im.crop((left, top, left + cw, top + ch))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--crops", type=int, default=0, help="write this many random crops instead of the photos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    photos = source_photos()
    if not args.crops:
        for p in photos:
            Image.open(p).convert("RGB").save(args.out_dir / f"{p.parent.parent.name}_{p.stem}.png")
        print(f"wrote {len(photos)} photos to {args.out_dir}")
        return
    rng = np.random.default_rng(args.seed)
    images = [Image.open(p).convert("RGB") for p in photos]
    for i in range(args.crops):
        crop = random_crop(images[i % len(images)], rng)
        crop.save(args.out_dir / f"crop_{i:05d}.jpg", quality=92)
    print(f"wrote {args.crops} crops of {len(photos)} photos to {args.out_dir}")


if __name__ == "__main__":
    main()
