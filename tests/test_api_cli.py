"""The optimize API and CLI end to end on tiny models: outputs, report, errors."""

import hashlib
import inspect
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import conv_model, run
from onnx_dwd import DwdError, OptimizeConfig, optimize
from onnx_dwd import cli
from onnx_dwd.config import parse_input_shape

REQUIRED_MODEL_KEYS = ["macs_before", "macs_after", "params_before", "params_after"]
REQUIRED_LAYER_KEYS = ["name", "kernel", "in_channels", "out_channels", "group", "decomposed", "reason",
                       "rank", "macs_before", "macs_after"]


@pytest.fixture
def small_model(tmp_path, rng):
    """Two 3x3 convs and a 1x1, dynamic batch and spatial dims."""
    from onnx import helper, numpy_helper
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "W2")
    w3 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "W3")
    after = [helper.make_node("Relu", ["conv_out"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["c2", "W3"], ["y"], name="head")]
    model = conv_model(rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8), ["batch", 3, "h", "w"],
                       attrs={"pads": [1, 1, 1, 1]}, after=after, extra_inits=[w2, w3])
    path = tmp_path / "small.onnx"
    onnx.save(model, path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_writes_a_valid_model_and_a_complete_report(small_model, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    before = digest(small_model)
    optimize(small_model, out, OptimizeConfig(rank=9, input_shapes={"x": (2, 3, 16, 16)},
                                                       report_json=report_path))
    assert digest(small_model) == before
    onnx.checker.check_model(onnx.load(out))
    saved = json.loads(report_path.read_text())
    assert saved == json.loads(json.dumps(saved)) and saved["model"]["decomposed"] == 2
    for key in REQUIRED_MODEL_KEYS:
        assert isinstance(saved["model"][key], int), key
    assert saved["model"]["validation"]["outputs"]["y"]["rel_error"] < 1e-5
    assert [l["decomposed"] for l in saved["layers"]] == [True, True, False]
    for layer in saved["layers"]:
        assert set(REQUIRED_LAYER_KEYS) <= set(layer)
    assert saved["layers"][2]["reason"].startswith("1x1")
    # MACs per image: conv 16x16x8x3x9, conv2 8x8x8x8x9, head 8x8x4x8
    assert saved["model"]["macs_before"] == 16 * 16 * 8 * 27 + 8 * 8 * 8 * 72 + 8 * 8 * 32
    # the written model keeps its dynamic dimensions and runs at another size
    dims = [d.dim_param or d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "h", "w"]
    x = {"x": np.random.default_rng(1).standard_normal((3, 3, 20, 12)).astype(np.float32)}
    want, got = run(small_model, x)[0], run(out, x)[0]
    assert np.linalg.norm(want - got) / np.linalg.norm(want) < 1e-5


def test_rank_one_reduces_macs_and_reports_the_error(small_model, tmp_path):
    report = optimize(small_model, tmp_path / "o.onnx", OptimizeConfig(rank=1, input_shapes={"x": (1, 3, 16, 16)}))
    m = report["model"]
    assert m["macs_after"] < m["macs_before"] / 3
    assert 0 < m["validation"]["outputs"]["y"]["rel_error"] < 2


def test_dynamic_spatial_dims_need_input_shape(small_model, tmp_path):
    with pytest.raises(DwdError, match=r"--input-shape x:1,3,N,N"):
        optimize(small_model, tmp_path / "o.onnx")
    with pytest.raises(DwdError, match=r"no input of that name; its inputs are x"):
        optimize(small_model, tmp_path / "o.onnx", OptimizeConfig(input_shapes={"images": (1, 3, 8, 8)}))
    with pytest.raises(DwdError, match=r"dimension 1 is fixed to 3"):
        optimize(small_model, tmp_path / "o.onnx", OptimizeConfig(input_shapes={"x": (1, 4, 8, 8)}))
    assert not (tmp_path / "o.onnx").exists()


def test_refuses_to_overwrite_the_input(small_model):
    before = digest(small_model)
    with pytest.raises(DwdError, match="refusing to overwrite the input"):
        optimize(small_model, small_model.parent / "." / small_model.name)
    assert digest(small_model) == before


def test_failure_leaves_existing_output_and_no_temporary_files(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(DwdError, match="no such file or directory"):
        optimize(small_model, out, OptimizeConfig(input_shapes={"x": (1, 3, 8, 8)}, calib=tmp_path / "nope"))
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "small.onnx"]


@pytest.mark.parametrize("content,match", [(None, "no such model file"), (b"not a model", "not a readable ONNX model")])
def test_bad_input_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DwdError, match=match):
        optimize(path, tmp_path / "o.onnx")


def test_cli_prints_errors_without_traceback(tmp_path):
    result = CliRunner().invoke(cli.main, ["optimize", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")])
    assert result.exit_code == 1
    assert "missing.onnx: no such model file" in result.output and "Traceback" not in result.output


def test_cli_end_to_end(small_model, tmp_path):
    out, rep, md = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.md"
    result = CliRunner().invoke(cli.main, ["optimize", str(small_model), str(out), "--rank", "2",
                                           "--input-shape", "x:1,3,16,16", "--report", str(rep),
                                           "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert "2 of 3 decomposed" in result.output and "rank 2 (sum)" in result.output
    assert json.loads(rep.read_text())["config"]["rank"] == 2
    assert md.read_text().startswith("# onnx-dwd report")
    onnx.checker.check_model(onnx.load(out))


def test_every_cli_option_reaches_the_config(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "run_optimize", lambda i, o, config, progress: seen.setdefault("config", config) and {})
    monkeypatch.setattr(cli, "render_table", lambda report: "")
    values = {"--rank": ("3", 3), "--method": ("dwd", "dwd"), "--graph-form": ("concat-input", "concat-input"),
              "--no-inter-layer": (None, False), "--refit-variant": ("auto", "auto"), "--refit-sweeps": ("1", 1), "--holdout": ("0.3", 0.3), "--max-images": ("9", 9),
              "--positions-per-image": ("11", 11), "--position-budget": ("8", 8.0), "--resize": ("256", 256), "--scale": ("1", 1.0),
              "--mean": ("1,2,3", (1.0, 2.0, 3.0)), "--std": ("4,5,6", (4.0, 5.0, 6.0)),
              "--channel-order": ("bgr", "bgr"), "--layout": ("nhwc", "nhwc"),
              "--input-shape": ("input:0:1,224,224,3", {"input:0": (1, 224, 224, 3)}),
              "--calib": (str(tmp_path), tmp_path), "--validation-samples": ("7", 7), "--seed": ("5", 5),
              "--report": (str(tmp_path / "r.json"), tmp_path / "r.json"),
              "--markdown": (str(tmp_path / "r.md"), tmp_path / "r.md"),
              "--runtime": ("ort", "ort"), "--level": ("extended", "extended"), "--threads": ("2", 2),
              "--no-latency": (None, False)}
    budgets = {"--target-speedup": ("1.5", 1.5, "target_speedup"), "--max-error": ("0.1", 0.1, "max_error"),
               "--latency-budget": ("3", 3.0, "latency_budget_ms")}
    for flag, (text, expected, field) in budgets.items():  # one at a time, and not with --rank
        seen.clear()
        result = CliRunner().invoke(cli.main, ["optimize", "in.onnx", "out.onnx", flag, text])
        assert result.exit_code == 0, result.output
        assert getattr(seen["config"], field) == expected and seen["config"].rank is None, flag
    seen.clear()
    args = ["optimize", "in.onnx", "out.onnx"]
    for flag, (text, _) in values.items():
        args += [flag] if text is None else [flag, text]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    fields = {"--rank": "rank", "--method": "method", "--graph-form": "graph_form", "--input-shape": "input_shapes",
              "--no-inter-layer": "inter_layer", "--refit-variant": "refit_variant", "--refit-sweeps": "refit_sweeps", "--holdout": "holdout", "--max-images": "max_images",
              "--positions-per-image": "positions_per_image", "--position-budget": "position_budget",
              "--resize": "preprocess.resize",
              "--scale": "preprocess.scale", "--mean": "preprocess.mean", "--std": "preprocess.std",
              "--channel-order": "preprocess.channel_order", "--layout": "preprocess.layout",
              "--calib": "calib", "--validation-samples": "validation_samples", "--seed": "seed",
              "--report": "report_json", "--markdown": "report_markdown", "--runtime": "runtime",
              "--level": "level", "--threads": "threads", "--no-latency": "measure_latency"}
    for flag, (_, expected) in values.items():
        obj = config
        for part in fields[flag].split("."):
            obj = getattr(obj, part)
        assert obj == expected, flag
    # every option of the command is covered here, and every config field has an option
    options = {o for p in cli.optimize.params for o in p.opts + p.secondary_opts if o.startswith("--")}
    assert options - {"--quiet", "--help", "--inter-layer", "--latency"} == set(values) | set(budgets)
    covered = {f.split(".")[0] for f in fields.values()} | {b[2] for b in budgets.values()}
    assert covered == set(inspect.signature(OptimizeConfig).parameters)


@pytest.mark.parametrize("text", ["images", "images:", "images:1,a", "images:0,3"])
def test_bad_input_shape_values(text):
    with pytest.raises(DwdError, match="--input-shape"):
        parse_input_shape(text)


def test_bad_config_values():
    with pytest.raises(DwdError, match="--rank"):
        OptimizeConfig(rank=0)
    with pytest.raises(DwdError, match="--method"):
        OptimizeConfig(method="svd")


def test_an_optimized_model_can_be_optimized_again(small_model, tmp_path):
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    shapes = {"x": (1, 3, 16, 16)}
    optimize(small_model, once, OptimizeConfig(rank=9, input_shapes=shapes))
    report = optimize(once, twice, OptimizeConfig(rank=9, input_shapes=shapes))
    onnx.checker.check_model(onnx.load(twice))
    keys = [p.key for p in onnx.load(twice).metadata_props]
    assert keys.count("onnx_dwd") == 1
    # the depthwise and 1x1 convs have nothing left to decompose
    assert report["model"]["decomposed"] == 0 and report["model"]["validation"]["outputs"]["y"]["rel_error"] < 1e-6
