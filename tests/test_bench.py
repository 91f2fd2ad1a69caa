"""`onnx-dwd bench`: structure and errors on tiny models (no timing assertions: speed claims live in benchmarks/)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import conv_model
from onnx_dwd import DwdError, OptimizeConfig, cli, optimize
from onnx_dwd.bench import bench


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A model and its full-rank optimized version (made once: optimize takes a few seconds)."""
    tmp_path, rng = tmp_path_factory.mktemp("pair"), np.random.default_rng(0)
    before = tmp_path / "before.onnx"
    onnx.save(conv_model(rng.standard_normal((16, 8, 3, 3)), None, ["n", 8, 16, 16], attrs={"pads": [1, 1, 1, 1]}),
              before)
    after = tmp_path / "after.onnx"
    optimize(before, after, OptimizeConfig(rank=9, input_shapes={"x": (1, 8, 16, 16)}))
    return before, after


def test_bench_reports_medians_spread_and_ratio(pair):
    result = bench(*pair, threads=[1, 2], blocks=4, warmup=1)
    assert [r["threads"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        assert r["before_ms"] > 0 and r["after_ms"] > 0
        lo, hi = r["speedup_iqr"]
        assert lo <= r["speedup"] <= hi
        assert r["before_iqr_ms"][0] <= r["before_ms"] <= r["before_iqr_ms"][1]
        assert r["output_rel_error"] < 1e-5  # full rank: the same function
    assert result["input_shapes"] == {"x": [1, 8, 16, 16]}


def test_bench_refuses_models_with_different_inputs(pair, tmp_path, rng):
    other = tmp_path / "other.onnx"
    model = conv_model(rng.standard_normal((4, 8, 3, 3)), None, [1, 8, 16, 16])
    model.graph.input[0].name = "z"
    model.graph.node[0].input[0] = "z"
    onnx.save(model, other)
    with pytest.raises(DwdError, match="bench compares two versions of one model"):
        bench(pair[0], other, blocks=2)


def test_bench_cli_writes_json_and_checks_options(pair, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.main, ["bench", str(pair[0]), str(pair[1]), "--threads", "1",
                                           "--blocks", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output
    assert json.loads(out.read_text())["rows"][0]["threads"] == 1
    bad = CliRunner().invoke(cli.main, ["bench", str(pair[0]), str(pair[1]), "--threads", "one"])
    assert bad.exit_code == 1 and "--threads 'one'" in bad.output


def test_bench_cli_runtime_option(pair, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.main, ["bench", str(pair[0]), str(pair[1]), "--runtime", "ort",
                                           "--blocks", "2", "-q", "--json", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["rows"][0]
    assert row["runtime"] == "ort" and row["match_ok"] and "numeric match" in result.output
    bad = CliRunner().invoke(cli.main, ["bench", str(pair[0]), str(pair[1]), "--runtime", "ort,tflite"])
    assert bad.exit_code == 1 and "--runtime 'tflite': expected one of ort, litert" in bad.output
