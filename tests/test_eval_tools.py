"""The evaluation tools (tools/make_eval_sets.py, benchmarks/real_models_eval.py, benchmarks/shufflenet.py): fast checks."""

import gzip
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import REPO
from onnx_dwd.calib import read_labels

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
import make_eval_sets  # noqa: E402
import real_models_eval as rme  # noqa: E402


# ---------------------------------------------------------------- label files and idx files


def test_labelled_folder_round_trips_through_the_package_reader(tmp_path):
    images = [Image.fromarray(np.full((4, 4), i, np.uint8), "L") for i in range(5)]
    assert make_eval_sets.write_labelled(tmp_path, images, [3, 1, 4, 1, 5], "x") == 5
    files = sorted(tmp_path.glob("*.png"))
    assert read_labels(tmp_path, files).tolist() == [3, 1, 4, 1, 5]
    assert make_eval_sets.read_labels(tmp_path) == {f"x_{i:05d}.png": v for i, v in enumerate([3, 1, 4, 1, 5])}


def test_read_idx_reads_shape_and_payload(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + data.tobytes())
    np.testing.assert_array_equal(make_eval_sets.read_idx(path), data)


def test_settings_map_to_optimize_flags():
    assert rme.setting_flags("dwd-comp@r1") == ["--method", "dwd-comp", "--rank", "1"]
    assert rme.setting_flags("refit@x1.5") == ["--method", "refit", "--target-speedup", "1.5"]
    assert rme.setting_flags("nd@e0.1") == ["--method", "nd", "--max-error", "0.1"]
    with pytest.raises(SystemExit):
        rme.setting_flags("refit")


# ---------------------------------------------------------------- YOLO boxes


def test_iou_of_known_boxes():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    np.testing.assert_allclose(rme.iou(a, b)[0], [1.0, 50 / 150, 0.0])


def _yolo_output(boxes_xywh, class_scores):
    """[1, 4 + classes, anchors] as YOLOv8 writes it."""
    return np.concatenate([np.array(boxes_xywh, float).T, np.array(class_scores, float).T])[None].astype(np.float32)


def test_yolo_decoding_thresholds_and_nms():
    out = _yolo_output([[50, 50, 20, 20], [51, 50, 20, 20], [200, 200, 30, 30], [100, 100, 10, 10]],
                       [[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.1, 0.2]])
    boxes, cls, score = rme.yolo_detections(out)
    # the second box overlaps the first (IoU 0.9 > 0.45) and is suppressed; the last is below 0.25
    np.testing.assert_allclose(score, [0.9, 0.7], rtol=1e-6)
    assert cls.tolist() == [0, 1]
    np.testing.assert_allclose(boxes[0], [40, 40, 60, 60])


def test_box_matching_needs_same_class_and_iou_half_and_is_one_to_one():
    ref = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)
    ref_cls = np.array([0, 1])
    # shifted by 2 (IoU 0.67, matches), wrong class on the second, a duplicate of the first
    boxes = np.array([[2, 0, 12, 10], [20, 0, 30, 10], [0, 0, 10, 10]], float)
    cls = np.array([0, 0, 0])
    scores = np.array([0.5, 0.9, 0.8])
    assert rme.match_boxes(ref, ref_cls, boxes, cls, scores) == 1
    assert rme.match_boxes(ref, ref_cls, boxes, np.array([0, 1, 0]), scores) == 2
    shifted = np.array([[6, 0, 16, 10]], float)  # IoU 4/16 < 0.5
    assert rme.match_boxes(ref[:1], ref_cls[:1], shifted, np.array([0]), np.array([1.0])) == 0
    m = rme.detector_metrics([[_yolo_output([[5, 5, 10, 10]], [[0.9]])]], [[_yolo_output([[6, 5, 10, 10]], [[0.8]])]])
    assert (m["recall"], m["precision"]) == (1.0, 1.0)


# ---------------------------------------------------------------- ShuffleNet twins (torch)


@pytest.fixture(scope="module")
def sn():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    import shufflenet

    return shufflenet


def _randomize_bn(net, torch):
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def test_folded_twin_has_the_same_shapes_and_one_regular_conv_per_pair(sn):
    import torch

    x = torch.rand(3, 1, 28, 28)
    original, folded = sn.ShuffleNetV2("dw").eval(), sn.ShuffleNetV2("folded").eval()
    assert original(x).shape == folded(x).shape == (3, 10)
    dw = [m for m in original.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    regular = [m for m in folded.body.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(dw) == len(regular) == 3 + sum(sn.REPEATS)  # branch1 of each stride-2 unit, and every unit's sep
    for a, b in zip(dw, regular):
        assert a.in_channels == b.in_channels and a.stride == b.stride


@pytest.mark.parametrize("form", ["dw", "folded"])
def test_deploy_form_computes_the_same_function(sn, form):
    import torch

    net = sn.ShuffleNetV2(form)
    _randomize_bn(net, torch)
    net.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(sn.deploy(net)(x), net(x), rtol=1e-4, atol=1e-4)


def test_decomposed_onnx_loads_into_the_original_architecture(sn, tmp_path):
    """Folded body -> onnx-dwd (data-free, rank 1) -> torch twin with dw+1x1 slots matches onnxruntime."""
    import torch

    from onnx_dwd import OptimizeConfig, optimize

    folded = sn.ShuffleNetV2("folded")
    _randomize_bn(folded, torch)
    net = sn.deploy(folded)
    body = tmp_path / "body.onnx"
    sn.export_body(net, body)
    optimize(body, tmp_path / "dwd.onnx", OptimizeConfig(rank=1, method="nd", validation_samples=2))
    forms = sn.load_slots_from_onnx(net, onnx.load(str(body)), onnx.load(str(tmp_path / "dwd.onnx")))
    assert sorted(set(forms[n] for n in sn.separable_slots(net))) == ["dw+1x1"]
    assert {forms[n] for n in forms if n not in sn.separable_slots(net)} == {"1x1"}
    feats = np.random.default_rng(0).random((2, sn.WIDTHS[0], 28, 28), dtype=np.float32)
    ref = ort.InferenceSession(str(tmp_path / "dwd.onnx"), providers=["CPUExecutionProvider"]).run(None, {"features": feats})[0]
    with torch.no_grad():
        got = net.body(torch.from_numpy(feats)).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
