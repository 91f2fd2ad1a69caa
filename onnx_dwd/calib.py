"""Where model inputs come from: fixed input shapes, generated inputs, image folders."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from .errors import DwdError, OptionError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
LABELS_FILE = "labels.csv"

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input with every dimension fixed.

    dynamic_batch: dimension 0 was symbolic in the model, so inputs may be batched.
    """

    name: str
    dtype: type
    shape: Tuple[int, ...]
    dynamic_batch: bool


def resolve_input_specs(model: onnx.ModelProto, input_shapes: Mapping[str, Tuple[int, ...]],
                        model_name: str) -> List[InputSpec]:
    """Fix every graph input's shape from the model and --input-shape values.

    A dynamic dimension 0 (the batch) defaults to 1; any other dynamic
    dimension must come from --input-shape, else OptionError names the flag.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    known = {i.name for i in inputs}
    for name in input_shapes:
        if name not in known:
            raise OptionError(f"--input-shape {name}: {model_name} has no input of that name; "
                              f"its inputs are {', '.join(sorted(known))}")
    specs = []
    for vi in inputs:
        tt = vi.type.tensor_type
        if tt.elem_type not in _NP_TYPES:
            raise DwdError(f"{model_name}: input {vi.name} has element type "
                           f"{onnx.TensorProto.DataType.Name(tt.elem_type)}, which onnx-dwd cannot feed")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        dynamic_batch = bool(dims) and dims[0] is None
        given = input_shapes.get(vi.name)
        if given is not None:
            if len(given) != len(dims):
                raise OptionError(f"--input-shape {vi.name}: {len(given)} dimensions given, "
                                  f"but the input has {len(dims)} ({_show(dims)})")
            for axis, (g, d) in enumerate(zip(given, dims)):
                if d is not None and g != d:
                    raise OptionError(f"--input-shape {vi.name}: dimension {axis} is fixed to {d} in "
                                      f"{model_name}, got {g} (input shape {_show(dims)})")
            shape = tuple(given)
        else:
            if dynamic_batch:
                dims[0] = 1
            if any(d is None for d in dims):
                raise OptionError(
                    f"{model_name}: input {vi.name} has dynamic dimensions {_show(vi_dims(vi))}; "
                    f"give a shape with --input-shape {vi.name}:" + ",".join(str(d or "N") for d in dims))
            shape = tuple(dims)
        specs.append(InputSpec(vi.name, _NP_TYPES[tt.elem_type], shape, dynamic_batch))
    return specs


def vi_dims(vi: onnx.ValueInfoProto) -> List:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _show(dims: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def random_feeds(specs: Sequence[InputSpec], count: int, seed: int) -> List[Dict[str, np.ndarray]]:
    """count feed dicts of uniform [0, 1) floats (zeros for integer inputs), seeded."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for s in specs:
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = rng.random(s.shape, dtype=np.float64).astype(s.dtype)
            else:
                feed[s.name] = np.zeros(s.shape, dtype=s.dtype)
        feeds.append(feed)
    return feeds


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How a batch of images maps onto an input tensor."""

    channels_last: bool
    channels: int
    height: int
    width: int


def image_layout(spec: InputSpec) -> ImageLayout:
    """NCHW or NHWC with 1 or 3 channels, read off the input shape."""
    shape = spec.shape
    if len(shape) == 4 and shape[1] in (1, 3):
        return ImageLayout(False, shape[1], shape[2], shape[3])
    if len(shape) == 4 and shape[3] in (1, 3):
        return ImageLayout(True, shape[3], shape[1], shape[2])
    raise OptionError(f"input {spec.name} of shape {list(shape)} does not look like an image batch "
                      "(N,C,H,W or N,H,W,C with 1 or 3 channels)")


def list_images(folder: Path) -> List[Path]:
    """Image files under folder, recursively, in a stable order."""
    if not folder.is_dir():
        raise OptionError(f"--calib {folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise OptionError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def read_labels(folder: Path, files: Sequence[Path]) -> Optional[np.ndarray]:
    """Integer labels from folder/labels.csv (columns file,label), if that file exists."""
    path = folder / LABELS_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = {r["file"]: int(r["label"]) for r in csv.DictReader(f)}
    missing = [p for p in files if p.relative_to(folder).as_posix() not in rows]
    if missing:
        raise OptionError(f"{path}: no label for {missing[0].relative_to(folder).as_posix()} "
                          f"(and {len(missing) - 1} more)")
    return np.array([rows[p.relative_to(folder).as_posix()] for p in files])


def load_image(path: Path, layout: ImageLayout) -> np.ndarray:
    """One image as float32 [H, W, C] in [0, 1], resized to the input's size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if layout.channels == 1 else "RGB")
            if im.size != (layout.width, layout.height):
                im = im.resize((layout.width, layout.height), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise OptionError(f"{path}: cannot read image ({exc})") from None
    return arr.reshape(layout.height, layout.width, layout.channels)


def image_feeds(folder: Path, specs: Sequence[InputSpec], max_batch: int = 16,
                limit: Optional[int] = None) -> Tuple[List[Dict[str, np.ndarray]], Optional[np.ndarray]]:
    """Feeds of the images under folder for a single-input model, plus labels if any."""
    if len(specs) != 1:
        raise OptionError(f"--calib {folder}: images can feed a model with one input; this one has "
                          f"{len(specs)} ({', '.join(s.name for s in specs)})")
    spec = specs[0]
    layout = image_layout(spec)
    files = list_images(folder)[:limit]
    labels = read_labels(folder, files)
    batch = max_batch if spec.dynamic_batch else spec.shape[0]
    feeds = []
    for start in range(0, len(files) - batch + 1 if not spec.dynamic_batch else len(files), batch):
        chunk = np.stack([load_image(p, layout) for p in files[start:start + batch]])
        if not layout.channels_last:
            chunk = chunk.transpose(0, 3, 1, 2)
        feeds.append({spec.name: np.ascontiguousarray(chunk.astype(spec.dtype))})
    used = sum(len(f[spec.name]) for f in feeds)
    return feeds, (labels[:used] if labels is not None else None)
