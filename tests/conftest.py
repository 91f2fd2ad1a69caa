"""Tiny generated models for the mechanics."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent


def conv_model(weight: np.ndarray, bias: Optional[np.ndarray], input_shape: Sequence, *,
               attrs: Optional[Dict] = None, opset: int = 13, weight_as_constant_node: bool = False,
               after: Sequence[onnx.NodeProto] = (), extra_inits: Sequence[onnx.TensorProto] = (),
               output: str = "y") -> onnx.ModelProto:
    """x -> Conv(W, b, **attrs) -> [after nodes] -> output. input_shape may hold strings (dynamic)."""
    nodes, inits = [], list(extra_inits)
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=w, name="W_const"))
    else:
        inits.append(w)
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    conv_out = "conv_out" if after else output
    nodes.append(helper.make_node("Conv", inputs, [conv_out], name="conv", **(attrs or {})))
    nodes.extend(after)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["o0", "o1", "o2", "o3"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model, feed: Dict[str, np.ndarray]):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feed)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a.astype(np.float64)))


def package_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed package (tools/setup.sh installs them)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"package {package} is not installed; run `bash tools/setup.sh --test` first")
    path = Path(spec.submodule_search_locations[0]) / relative
    assert path.is_file(), path
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def latency_cache(tmp_path_factory):
    """Layer timings go to a cache of this test session, not the user's (subprocesses inherit it)."""
    import os
    path = tmp_path_factory.mktemp("latency-cache")
    old = os.environ.get("ONNX_DWD_CACHE")
    os.environ["ONNX_DWD_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ONNX_DWD_CACHE", None)
    else:
        os.environ["ONNX_DWD_CACHE"] = old
