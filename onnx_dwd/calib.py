"""Where model inputs come from: fixed input shapes, generated inputs, image folders."""

from __future__ import annotations

import csv
import dataclasses
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from .errors import DwdError, OptionError
from .spill import FileWriter, RawArray

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
        given = input_shapes.get(vi.name)
        if not tt.HasField("shape"):  # not even the rank is known
            if given is None:
                raise OptionError(f"{model_name}: input {vi.name} has no shape in the model; "
                                  f"give one with --input-shape {vi.name}:D0,D1,...")
            specs.append(InputSpec(vi.name, _NP_TYPES[tt.elem_type], tuple(given), False))
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        dynamic_batch = bool(dims) and dims[0] is None
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


def image_layout(spec: InputSpec, layout: str = "auto") -> ImageLayout:
    """NCHW or NHWC with 1 or 3 channels, read off the input shape (or forced by layout)."""
    shape = spec.shape
    if len(shape) == 4:
        if layout in ("auto", "nchw") and shape[1] in (1, 3):
            return ImageLayout(False, shape[1], shape[2], shape[3])
        if layout in ("auto", "nhwc") and shape[3] in (1, 3):
            return ImageLayout(True, shape[3], shape[1], shape[2])
    raise OptionError(f"input {spec.name} of shape {list(shape)} does not look like an image batch "
                      f"({'N,C,H,W or N,H,W,C' if layout == 'auto' else layout.upper()} with 1 or 3 channels)")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image file becomes an input tensor.

    resize: shorter side resized to this, then a centre crop to the model's
        H x W; None resizes straight to H x W.
    scale, mean, std: value = (pixel * scale - mean) / std, per channel in the
        model's channel order (after `channel_order`).
    channel_order: "rgb" or "bgr" for 3-channel inputs (1-channel inputs are grey).
    layout: "auto" (from the input shape), "nchw" or "nhwc".
    """

    resize: Optional[int] = None
    scale: float = 1 / 255
    mean: Tuple[float, ...] = (0.0,)
    std: Tuple[float, ...] = (1.0,)
    channel_order: str = "rgb"
    layout: str = "auto"

    def __post_init__(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise OptionError(f"--channel-order {self.channel_order!r}: choose rgb or bgr")
        if self.layout not in ("auto", "nchw", "nhwc"):
            raise OptionError(f"--layout {self.layout!r}: choose auto, nchw or nhwc")
        if any(s == 0 for s in self.std):
            raise OptionError("--std values must be non-zero")
        if self.resize is not None and self.resize < 1:
            raise OptionError(f"--resize must be positive, got {self.resize}")


def list_images(folder: Path) -> List[Path]:
    """Image files under folder, recursively, in a stable order."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise OptionError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) or arrays (.npy, .npz) found")
    return files


def read_labels(folder: Path, files: Sequence[Path]) -> Optional[np.ndarray]:
    """Integer labels from folder/labels.csv (columns file,label), if that file exists."""
    path = folder / LABELS_FILE
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as f:
            rows = {r["file"]: int(r["label"]) for r in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError) as exc:
        raise OptionError(f"{path}: expected a header 'file,label' and an integer label on every row "
                          f"({type(exc).__name__}: {exc})") from None
    missing = [p for p in files if p.relative_to(folder).as_posix() not in rows]
    if missing:
        raise OptionError(f"{path}: no label for {missing[0].relative_to(folder).as_posix()} "
                          f"(and {len(missing) - 1} more)")
    return np.array([rows[p.relative_to(folder).as_posix()] for p in files])


def load_image(path: Path, layout: ImageLayout, pre: Preprocess) -> np.ndarray:
    """One image as float32 [H, W, C], preprocessed."""
    return normalize_images(decode_image(path, layout, pre), layout, pre)


def decode_image(path: Path, layout: ImageLayout, pre: Preprocess) -> np.ndarray:
    """One image as uint8 [H, W, C], resized and cropped: a quarter of its float32 size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if layout.channels == 1 else "RGB")
            if pre.resize:
                w, h = im.size
                ratio = pre.resize / min(w, h)
                im = im.resize((max(layout.width, round(w * ratio)), max(layout.height, round(h * ratio))),
                               Image.BILINEAR)
                left, top = (im.size[0] - layout.width) // 2, (im.size[1] - layout.height) // 2
                im = im.crop((left, top, left + layout.width, top + layout.height))
            elif im.size != (layout.width, layout.height):
                im = im.resize((layout.width, layout.height), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).reshape(layout.height, layout.width, layout.channels)
    except (UnidentifiedImageError, OSError) as exc:
        raise OptionError(f"{path}: cannot read image ({exc})") from None


def normalize_images(pixels: np.ndarray, layout: ImageLayout, pre: Preprocess, channels_first: bool = False
                     ) -> np.ndarray:
    """Decoded pixels uint8 [..., H, W, C] -> float32, preprocessed (channel order, scale, mean,
    std); channels_first: laid out [..., C, H, W]. One array written in place: a float
    temporary per step cost more than the arithmetic (YOLOv8n, 1024 images: 2.4 s)."""
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if mean.size not in (1, layout.channels) or std.size not in (1, layout.channels):
        raise OptionError(f"--mean/--std need 1 or {layout.channels} values for a {layout.channels}-channel input")
    if layout.channels == 3 and pre.channel_order == "bgr":
        pixels = pixels[..., ::-1]
    if channels_first:
        pixels = np.moveaxis(pixels, -1, -3)
        mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
    arr = pixels.astype(np.float32, order="C")
    arr *= np.float32(pre.scale)
    arr -= mean
    arr /= std
    return arr


@dataclasses.dataclass
class Part:
    """One part (fit or held out) of a calibration source: a re-iterable of feed dicts."""

    batches: Callable[[], Iterator[Dict[str, np.ndarray]]]
    labels: Optional[np.ndarray]
    count: int
    # optional: the feeds in a smaller form (decoded images) and the function that makes a
    # feed of one; batches() is expand() over compact(). A cache keeps the smaller form.
    compact: Optional[Callable[[], Iterator[Dict[str, np.ndarray]]]] = None
    expand: Optional[Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]] = None
    # a cached part: set once a pass driven to its end has saved every feed (reading it
    # from then on only reads files, from any thread); a pass stopped at the last feed
    # without asking for the next does not count
    filled: Optional[threading.Event] = None


@dataclasses.dataclass
class Calibration:
    """Calibration data split into a part to fit on and a part held out for validation."""

    fit: Part
    holdout: Part
    description: str


def _is_heldout(index: int, period: int) -> bool:
    return period > 0 and index % period == period - 1


def holdout_period(fraction: float) -> int:
    """Every period-th item is held out (0: none)."""
    if not 0 <= fraction < 1:
        raise OptionError(f"--holdout must be in [0, 1), got {fraction}")
    return 0 if fraction == 0 else max(2, round(1 / fraction))


def _split_indices(count: int, period: int) -> Tuple[List[int], List[int]]:
    held = [i for i in range(count) if _is_heldout(i, period)]
    fit = [i for i in range(count) if not _is_heldout(i, period)]
    if not held and period and count >= 2:
        held, fit = fit[-1:], fit[:-1]
    return fit, held


def image_calibration(folder: Path, specs: Sequence[InputSpec], pre: Preprocess, holdout: float,
                      limit: Optional[int] = None, max_batch: int = 8) -> Calibration:
    """Images under folder (recursive), read lazily; labels.csv beside them optional."""
    if len(specs) != 1:
        raise OptionError(f"--calib {folder}: images can feed a model with one input; this one has "
                          f"{len(specs)} ({', '.join(s.name for s in specs)}); use .npz files")
    spec = specs[0]
    layout = image_layout(spec, pre.layout)
    files = list_images(folder)[:limit]
    labels = read_labels(folder, files)
    batch = max_batch if spec.dynamic_batch else spec.shape[0]

    def part(indices: List[int]) -> Part:
        usable = indices if spec.dynamic_batch else indices[:len(indices) - len(indices) % batch]

        def compact():
            for start in range(0, len(usable), batch):
                yield {spec.name: np.stack([decode_image(files[i], layout, pre) for i in usable[start:start + batch]])}

        def expand(pixels: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
            chunk = normalize_images(pixels[spec.name], layout, pre, channels_first=not layout.channels_last)
            return {spec.name: chunk.astype(spec.dtype, copy=False)}

        return Part(lambda: map(expand, compact()), labels[usable] if labels is not None else None, len(usable),
                    compact, expand)

    fit, held = _split_indices(len(files), holdout_period(holdout))
    return Calibration(part(fit), part(held), f"{len(files)} images from {folder}")


def array_calibration(path: Path, specs: Sequence[InputSpec], holdout: float,
                      limit: Optional[int] = None) -> Calibration:
    """.npy (single-input models) or .npz (arrays keyed by input name) files: a file, or a folder of them.

    Each array holds a batch; every file is one feed (limit: the first files only). Files are read lazily.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in (".npy", ".npz"))
    files = files[:limit]
    if not files:
        raise OptionError(f"--calib {path}: no .npy/.npz files found")
    names = [s.name for s in specs]

    def load(f: Path) -> Dict[str, np.ndarray]:
        try:
            if f.suffix.lower() == ".npy":
                if len(specs) != 1:
                    raise OptionError(f"{f}: a .npy file can feed a single-input model; this one has inputs "
                                      f"{', '.join(names)}: use .npz with those keys")
                feed = {names[0]: np.load(f)}
            else:
                with np.load(f) as z:
                    feed = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise OptionError(f"{f}: cannot read array file ({exc})") from None
        if set(feed) != set(names):
            raise OptionError(f"{f}: holds arrays {sorted(feed)}, the model's inputs are {sorted(names)}")
        for s in specs:
            arr = feed[s.name]
            if arr.ndim != len(s.shape) or arr.shape[1:] != s.shape[1:] or (not s.dynamic_batch and arr.shape[0] != s.shape[0]):
                raise OptionError(f"{f}: array {s.name} has shape {list(arr.shape)}, the model needs {list(s.shape)}"
                                  + (" (any batch size)" if s.dynamic_batch else ""))
            feed[s.name] = arr.astype(s.dtype, copy=False)
        return feed

    def part(indices):
        return Part(lambda: (load(files[i]) for i in indices), None, len(indices))

    fit, held = _split_indices(len(files), holdout_period(holdout))
    return Calibration(part(fit), part(held), f"{len(files)} array files from {path}")


def feed_calibration(source, specs: Sequence[InputSpec], holdout: float) -> Calibration:
    """Any iterable of feed dicts (a list, a generator, an onnxruntime CalibrationDataReader).

    A reader with get_next() or a one-shot iterator is read once into memory,
    because fitting makes several passes; pass a list, or a zero-argument
    callable returning a fresh iterator, to stream instead.
    """
    if hasattr(source, "get_next"):
        items = list(iter(source.get_next, None))
    elif callable(source):
        items = None
    elif isinstance(source, Iterator):
        items = list(source)
    else:
        items = source
    make = (lambda: iter(source())) if items is None else (lambda: iter(items))
    names = {s.name for s in specs}
    period = holdout_period(holdout)
    first = next(make(), None)
    if first is None:
        raise OptionError("calibration data: the feed iterable is empty")
    if set(first) != names:
        raise OptionError(f"calibration data: feeds have keys {sorted(first)}, the model's inputs are {sorted(names)}")
    count = len(items) if items is not None else sum(1 for _ in make())
    held_out = set(_split_indices(count, period)[1])

    def part(held: bool) -> Part:
        def batches():
            for i, feed in enumerate(make()):
                if (i in held_out) == held:
                    yield feed
        return Part(batches, None, len(held_out) if held else count - len(held_out))

    return Calibration(part(False), part(True), f"{count} feed dicts")


class DiskCache:
    """Re-iterable parts backed by raw files in a temporary folder (spill.py).

    The first pass over a part reads the source (decoding images, running
    preprocessing) and saves each feed, in a writer thread; later passes read
    the saved feeds. A part with a compact form (images: uint8 pixels, a
    quarter of the float32 feed) is saved in that form and expanded on every
    read: YOLOv8n's 1024 feeds take 0.3 GB, not 1.2 GB, of page cache, whose
    growth costs about 1.6 s per GB on these VMs. Memory stays at a few
    batches whatever the number of images.
    """

    def __init__(self):
        import tempfile
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-dwd-calib-")
        self._count = 0

    def wrap(self, part: Part) -> Part:
        saved: List[Dict[str, RawArray]] = []
        done = threading.Event()
        source, expand = (part.compact, part.expand) if part.compact is not None else (part.batches, lambda f: f)
        root = Path(self._dir.name)

        def batches():
            if done.is_set():
                for feed in saved:
                    yield expand({name: array.load() for name, array in feed.items()})
                return
            saved.clear()  # an earlier pass may have stopped early
            writer = FileWriter()
            try:
                for feed in source():
                    files = {}
                    for name, value in feed.items():
                        value = np.array(value)  # a copy: a source may refill its arrays for the next feed
                        files[name] = RawArray.of(value, root / f"{self._count:07d}.bin")
                        self._count += 1
                        writer.submit(files[name].write, value)
                    saved.append(files)
                    yield expand(feed)
                writer.wait()  # every file written before a later pass reads it
                done.set()
            finally:
                writer.close()

        return Part(batches, part.labels, part.count, filled=done)

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "DiskCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
