"""The real ONNX models from ../shared/MODELS.md: rank 1 writes a valid model, full rank reproduces it."""

import sys

import onnx
import pytest

from conftest import REPO
from onnx_dwd import OptimizeConfig, optimize
from onnx_dwd.config import parse_input_shape
from onnx_dwd.validate import EXACT_REL_ERROR

sys.path.insert(0, str(REPO / "tools"))
from real_models import MODELS, model_path  # noqa: E402

# name: (regular convs it must decompose, largest kernel area = full rank)
EXPECTED = {"yolov8n": (39, 9), "open-nsfw": (17, 49), "mnist": (2, 25)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_rank1_and_full_rank(name, tmp_path):
    shape = MODELS[name][3]
    shapes = dict([parse_input_shape(shape)]) if shape else {}
    convs, full_rank = EXPECTED[name]
    source = model_path(name)

    low = optimize(source, tmp_path / "r1.onnx", OptimizeConfig(rank=1, input_shapes=shapes, validation_samples=2))
    onnx.checker.check_model(onnx.load(tmp_path / "r1.onnx"))
    assert low["model"]["decomposed"] == convs
    assert low["model"]["macs_after"] < low["model"]["macs_before"]
    assert all(l["reason"] for l in low["layers"] if not l["decomposed"])

    full = optimize(source, tmp_path / "full.onnx",
                    OptimizeConfig(rank=full_rank, input_shapes=shapes, validation_samples=2))
    for out, metrics in full["model"]["validation"]["outputs"].items():
        assert metrics["rel_error"] < EXACT_REL_ERROR, out
    written = onnx.load(tmp_path / "full.onnx")
    assert written.opset_import == onnx.load(source).opset_import
