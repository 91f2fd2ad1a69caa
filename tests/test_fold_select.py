"""Folding affine ops into convs, and the reason given for every kept conv."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, rel_error, run
from onnx_dwd.api import decompose_model
from onnx_dwd.config import OptimizeConfig
from onnx_dwd.fold import fold_affine_into_convs
from onnx_dwd.select import classify_convs
from onnx_dwd.validate import EXACT_REL_ERROR


def bn_inits(rng, n, prefix="bn"):
    vals = [rng.uniform(0.5, 2, n), rng.standard_normal(n), rng.standard_normal(n), rng.uniform(0.5, 2, n)]
    names = [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return names, [numpy_helper.from_array(v.astype(np.float32), nm) for v, nm in zip(vals, names)]


def folded(model):
    graph = gs.import_onnx(model)
    names = fold_affine_into_convs(graph)
    graph.cleanup()
    return graph, names


def test_bn_then_add_then_mul_fold_into_the_conv(rng):
    names, inits = bn_inits(rng, 6)
    add_c = numpy_helper.from_array(rng.standard_normal((6, 1, 1)).astype(np.float32), "add_c")  # opset-8 style bias
    mul_c = numpy_helper.from_array(rng.standard_normal((1, 6, 1, 1)).astype(np.float32), "mul_c")
    after = [helper.make_node("BatchNormalization", ["conv_out"] + names, ["bn_out"], name="bn", epsilon=1e-3),
             helper.make_node("Add", ["add_c", "bn_out"], ["add_out"], name="add"),
             helper.make_node("Mul", ["add_out", "mul_c"], ["y"], name="mul")]
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    model = conv_model(w, None, [2, 3, 9, 9], attrs={"pads": [1, 1, 1, 1]}, after=after,
                       extra_inits=inits + [add_c, mul_c])
    graph, names_folded = folded(model)
    assert names_folded == ["bn", "add", "mul"]
    assert [n.op for n in graph.nodes] == ["Conv"]
    x = {"x": rng.standard_normal((2, 3, 9, 9)).astype(np.float32)}
    (want,) = run(model, x)
    (got,) = run(gs.export_onnx(graph), x)
    assert rel_error(want, got) < EXACT_REL_ERROR
    # and the whole pipeline at full rank reproduces the unfolded original
    (full,) = run(decompose_model(model, OptimizeConfig(rank=9), x).model, x)
    assert rel_error(want, full) < EXACT_REL_ERROR


@pytest.mark.parametrize("shape", [(9,), (1, 1, 1, 9), (6, 9, 1)])
def test_add_that_is_not_per_channel_is_left_alone(rng, shape):
    c = numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "c")
    after = [helper.make_node("Add", ["conv_out", "c"], ["y"], name="add")]
    model = conv_model(rng.standard_normal((6, 3, 3, 3)), None, [1, 3, 11, 11], after=after, extra_inits=[c])
    graph, names = folded(model)
    assert names == [] and [n.op for n in graph.nodes] == ["Conv", "Add"]


def test_conv_output_with_two_consumers_is_not_folded(rng):
    names, inits = bn_inits(rng, 4)
    after = [helper.make_node("BatchNormalization", ["conv_out"] + names, ["bn_out"], name="bn"),
             helper.make_node("Add", ["conv_out", "bn_out"], ["y"], name="add")]
    model = conv_model(rng.standard_normal((4, 2, 3, 3)), None, [1, 2, 8, 8], after=after, extra_inits=inits)
    graph, names = folded(model)
    assert names == []


def test_reasons_for_every_kept_conv(rng):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    wdyn = helper.make_tensor_value_info("wdyn", TensorProto.FLOAT, [4, 4, 3, 3])
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w1x1", (4, 4, 1, 1)), ("wdw", (4, 1, 3, 3)), ("w3", (4, 4, 3, 3)), ("wg", (4, 2, 3, 3))]]
    const_w = helper.make_node("Constant", [], ["wconst"], name="const",
                               value=numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32)))
    nodes = [const_w,
             helper.make_node("Conv", ["x", "w1x1"], ["a"], name="pointwise"),
             helper.make_node("Conv", ["a", "wdw"], ["b"], name="depthwise", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "wdyn"], ["c"], name="dynamic", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "wconst"], ["d"], name="from_constant_node", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "wg"], ["e"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["e", "w3"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [x, wdyn], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    layers = {l.name: l for l in classify_convs(gs.import_onnx(model))}
    assert "1x1" in layers["pointwise"].reason
    assert "depthwise" in layers["depthwise"].reason
    assert "not a constant" in layers["dynamic"].reason
    assert layers["from_constant_node"].is_candidate
    assert layers["grouped"].is_candidate and layers["grouped"].in_channels == 4
    unnamed = [l for l in layers.values() if l.name.startswith("Conv_")]
    assert len(unnamed) == 1 and unnamed[0].is_candidate
    # the decomposed model still matches at full rank, with the dynamic weight fed in
    feed = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
            "wdyn": rng.standard_normal((4, 4, 3, 3)).astype(np.float32)}
    result = decompose_model(model, OptimizeConfig(rank=9), feed)
    assert [l["decomposed"] for l in result.layers] == [False, False, False, True, True, True]
    assert rel_error(run(model, feed)[0], run(result.model, feed)[0]) < EXACT_REL_ERROR


def test_quantized_convs_are_kept_with_a_reason(rng):
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 6, 6])
    w = numpy_helper.from_array(rng.integers(0, 255, (3, 2, 3, 3)).astype(np.uint8), "w")
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="qconv")
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 3, 4, 4])],
                              initializer=[w])
    (layer,) = classify_convs(gs.import_onnx(helper.make_model(graph)))
    assert not layer.is_candidate and "quantized" in layer.reason
