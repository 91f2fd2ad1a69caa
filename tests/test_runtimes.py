"""The runner interface: onnxruntime always; each optional runtime when installed (skipped, with the
install command as the reason, otherwise). Numerics must match onnxruntime; no timing assertions."""

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, rel_error, run
from onnx_dwd.bench import MATCH_REL_TOL, bench
from onnx_dwd.errors import ModelError, OptionError
from onnx_dwd.runtimes import base
from onnx_dwd.runtimes import layer_latency as ll

OPTIONAL = ["litert", "ncnn", "mnn", "openvino"]


def installed_runner(name):
    """The runner, or a skip whose reason is the install message."""
    try:
        return base.get_runner(name)
    except OptionError as exc:
        pytest.skip(str(exc))


def two_output_model(rng, channels, size):
    """x -> Conv 3x3 (pads 1) -> y1 (NCHW, 4-D) and -> ReduceMean over H, W -> y2 ([1, n]): tests output
    order, 4-D layouts and a non-image output at once. channels == size makes C = H = W."""
    w = numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y1"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("ReduceMean", ["y1"], ["m"], axes=[2, 3], keepdims=0, name="mean"),
             helper.make_node("Relu", ["m"], ["y2"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, channels, size, size + 1])],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)],
                              initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def square_model(rng, c):
    """Conv with C = H = W on input and output: the layout cannot be read off the shape."""
    return conv_model(rng.standard_normal((c, c, 3, 3)), rng.standard_normal(c), [1, c, c, c],
                      attrs={"pads": [1, 1, 1, 1]})


# The interface, with onnxruntime.

def test_ort_runner_runs_and_binds(rng):
    model = conv_model(rng.standard_normal((6, 4, 3, 3)), None, [1, 4, 9, 9])
    feed = {"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32)}
    for level in ("all", "extended"):
        runner = base.get_runner("ort", level)
        assert runner.cache_key() == f"ort|{level}" and level in runner.describe()
        loaded = runner.load(model, threads=1)
        (y,) = loaded.run(feed)
        assert rel_error(run(model, feed)[0], y) < 1e-6
        loaded.bind(feed)()


def test_a_session_that_shares_the_cores_does_not_spin_and_computes_the_same(rng):
    from onnx_dwd.runtimes import make_session
    model = conv_model(rng.standard_normal((6, 4, 3, 3)), None, [1, 4, 9, 9])
    feed = {"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32)}
    default, quiet = make_session(model, threads=2), make_session(model, threads=2, spin=False)
    entry = "session.intra_op.allow_spinning"
    assert quiet.get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default, which spins
        default.get_session_options().get_session_config_entry(entry)
    assert np.array_equal(default.run(None, feed)[0], quiet.run(None, feed)[0])


def test_unknown_runtime_and_option_errors():
    with pytest.raises(OptionError, match="--runtime 'tflite': expected one of ort, litert, ncnn, mnn, openvino "):
        base.get_runner("tflite")
    with pytest.raises(OptionError, match="--runtime 'x'"):
        base.parse_runtimes("ort,x")
    assert base.parse_runtimes("ort, mnn,ort") == ["ort", "mnn"]
    assert base.parse_runtimes("ort,ort:extended") == ["ort", "ort:extended"]
    assert base.get_runner("ort:extended").level == "extended"
    assert base.get_runner("ort:extended").name == "ort:extended" and base.get_runner("ort", "all").name == "ort"
    with pytest.raises(OptionError, match="onnxruntime levels are"):
        base.parse_runtimes("ort:fast")
    with pytest.raises(OptionError, match="--runtime 'mnn:high'"):
        base.parse_runtimes("mnn:high")
    with pytest.raises(OptionError, match="onnxruntime level"):
        base.get_runner("ort", "fast")


@pytest.mark.parametrize("name, module, hint", [
    ("mnn", "MNN", "pip install 'onnx-dwd[mnn]'"),
    ("ncnn", "ncnn", "pip install 'onnx-dwd[ncnn]'"),
    ("openvino", "openvino", "pip install 'onnx-dwd[openvino]'"),
    ("litert", "ai_edge_litert.interpreter", "pip install 'onnx-dwd[litert]'"),
])
def test_missing_runtime_says_how_to_install(name, module, hint, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(OptionError, match=f"--runtime {name}: .* is not installed; install it with: ") as info:
        base.get_runner(name)
    assert hint in str(info.value)


def test_missing_onnx2tf_names_the_command_that_creates_it(monkeypatch, tmp_path):
    pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT not installed: pip install 'onnx-dwd[litert]'")
    monkeypatch.setenv("ONNX_DWD_ONNX2TF", str(tmp_path / "no-onnx2tf"))
    with pytest.raises(OptionError, match="onnx2tf converter .* tools/install_runtimes.sh litert"):
        base.get_runner("litert")


def test_static_inputs(rng):
    model = conv_model(rng.standard_normal((6, 4, 3, 3)), None, ["n", 4, "h", "w"])
    with pytest.raises(ModelError, match="input x has a dynamic shape.*--input-shape x:"):
        base.static_input_shapes(model, "m.onnx")
    fixed = base.with_static_inputs(model, {"x": (1, 4, 8, 8)})
    assert base.static_input_shapes(fixed, "m.onnx") == {"x": (1, 4, 8, 8)}
    assert not any(d.HasField("dim_param") for d in fixed.graph.output[0].type.tensor_type.shape.dim)
    onnx.checker.check_model(fixed)


def test_bench_goes_on_when_one_runtime_fails(tmp_path, rng, monkeypatch):
    before = tmp_path / "b.onnx"
    onnx.save(conv_model(rng.standard_normal((4, 4, 3, 3)), None, [1, 4, 8, 8]), before)

    class Broken(base.OrtRunner):
        name = "broken"

        def load(self, model, threads, what="model"):
            raise ModelError(f"{what}: cannot convert")

    real = base.get_runner
    monkeypatch.setattr("onnx_dwd.bench.get_runner", lambda n, level=None: Broken() if n == "x" else real(n, level))
    result = bench(before, before, runtimes=["x", "ort"], blocks=2, warmup=0)
    assert "cannot convert" in result["rows"][0]["error"] and result["errors"]
    assert result["rows"][1]["match_ok"] and result["rows"][1]["speedup"] > 0


# Each optional runtime, when installed.

@pytest.mark.parametrize("name", OPTIONAL)
def test_runtime_matches_onnxruntime(name, rng):
    runner = installed_runner(name)
    assert runner.describe() and runner.cache_key().startswith(name)
    for model in (two_output_model(rng, 8, 10), square_model(rng, 6)):
        loaded = runner.load(model, threads=1, what="test model")
        feed = base.random_feed(model, "test model")
        want = run(model, feed)
        got = loaded.run(feed)
        assert [g.shape for g in got] == [w.shape for w in want]
        for w, g in zip(want, got):
            assert rel_error(w, g) < MATCH_REL_TOL
        loaded.bind(feed)()  # the timed call runs
    threaded = runner.load(square_model(rng, 6), threads=2)
    feed = base.random_feed(square_model(rng, 6), "m")
    assert threaded.run(feed)[0].shape == (1, 6, 6, 6)


GEO = ll.ConvGeometry(8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 12, 12)


@pytest.fixture(scope="module")
def runners():
    """One runner per runtime for the module, so a model converted once is not converted again."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = installed_runner(name)
        return made[name]
    return get


@pytest.mark.parametrize("name", OPTIONAL)
def test_layer_latency_on_runtime(name, runners, tmp_path):
    runner = runners(name)
    cache = ll.LatencyCache(tmp_path / "lat.json")
    assert ll.layer_latency(GEO, "original", runner=runner, cache=cache) > 0
    assert ll.layer_latency(GEO, "sum", rank=1, runner=runner, cache=cache) > 0
    assert all(k.startswith(f"{ll.CACHE_VERSION}|{runner.cache_key()}|") for k in cache._data)


@pytest.mark.parametrize("name", OPTIONAL)
def test_bench_on_runtime(name, runners, tmp_path):
    runner = runners(name)
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    for path, model in ((before, ll.single_conv_model(GEO)), (after, ll.decomposed_conv_model(GEO, 9, "sum"))):
        onnx.save(model, path)  # full rank: the same function
    result = bench(before, after, runtimes=[runner], blocks=2, warmup=1)
    (row,) = result["rows"]
    assert row["runtime"] == name and not result["errors"]
    assert row["match_ok"], row["match"]
    assert row["output_rel_error"] < 1e-4
    assert row["before_ms"] > 0 and row["after_ms"] > 0
