"""Loading, checking and saving models; nothing here changes the graph's math."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, OutputError

#: onnxruntime runs default-domain opsets from 7 on; older models are upgraded.
MIN_RUNNABLE_OPSET = 7

#: Protobuf cannot serialize a single message past 2 GiB; leave some margin.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default-domain (ai.onnx) opset")


def load_model(path: os.PathLike) -> onnx.ModelProto:
    """Load a model with its external data, check it, and upgrade opsets < 7.

    Raises ModelError naming the file for anything unreadable or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: the graph has no nodes (is this an ONNX model?)")
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path}: fails onnx.checker: {first_line}") from None
    opset = default_opset(model)
    if opset < MIN_RUNNABLE_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_RUNNABLE_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ModelError(
                f"{path}: opset {opset} is older than onnxruntime runs ({MIN_RUNNABLE_OPSET}) "
                f"and the upgrade failed: {exc}"
            ) from None
    return model


def check_model(model: onnx.ModelProto, what: str) -> None:
    """onnx.checker on a model we built; failing it is a bug, reported as such."""
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"onnx-dwd built an invalid model ({what}): {exc}") from exc


def refuse_to_overwrite(input_path: os.PathLike, output_path: os.PathLike) -> None:
    src, dst = Path(input_path).resolve(), Path(output_path).resolve()
    if src == dst or (dst.exists() and os.path.samefile(src, dst)):
        raise OutputError(f"{output_path}: refusing to overwrite the input model; choose another output path")
    if not dst.parent.is_dir():
        raise OutputError(f"{output_path}: directory {dst.parent} does not exist")


def check_writable(path: os.PathLike, flag: str) -> None:
    """Fail before any work if an output file's directory does not exist."""
    if not Path(path).resolve().parent.is_dir():
        raise OutputError(f"{flag} {path}: directory {Path(path).resolve().parent} does not exist")


@contextmanager
def staged_model(model: onnx.ModelProto, output_path: os.PathLike) -> Iterator[Path]:
    """Write the model to a temporary file beside output_path and yield its path.

    The caller checks the staged file (runs it, measures it); if the block ends
    without error the file is renamed into place atomically, so what is written
    is exactly what was validated. On error the temporary file is removed and
    any existing output is left untouched.
    """
    dst = Path(output_path).resolve()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    data_name = f"{dst.name}.data"
    try:
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name)
        else:
            onnx.save_model(model, str(tmp))
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if external:
            (dst.parent / data_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: os.PathLike, text: str) -> None:
    dst = Path(path).resolve()
    if not dst.parent.is_dir():
        raise OutputError(f"{path}: directory {dst.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp_name, dst)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def export_graph(graph, like: onnx.ModelProto, do_type_check: bool = True) -> onnx.ModelProto:
    """onnx-graphsurgeon graph -> model with like's IR version, opsets and metadata.

    do_type_check=False lets intermediate tensors of unknown type be outputs
    (in-memory capture models, which onnx.checker never sees)."""
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph, do_type_check=do_type_check)
    model.ir_version = like.ir_version
    if like.ir_version < 4:  # IR 3 requires every initializer to be a graph input too
        listed = {i.name for i in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer if t.name not in listed)
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model
