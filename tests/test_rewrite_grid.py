"""Seeded grid: kernel x stride x padding x dilation x bias x group, checked in onnxruntime.

Full rank must reproduce the original conv; rank 1 and 2 must compute exactly
the conv whose weight is the fitted factorization (so the graph edit is right
whatever the fit's error is), in every graph form.
"""

import itertools

import numpy as np
import pytest

from conftest import conv_model, rel_error, run
from onnx_dwd.api import decompose_model
from onnx_dwd.config import OptimizeConfig
from onnx_dwd.fit import network_decoupling, reconstruct_weight
from onnx_dwd.validate import EXACT_REL_ERROR

KERNELS = [(2, 2), (3, 3), (5, 5), (1, 3), (7, 7)]
STRIDES = [1, 2]
PADDINGS = ["none", "symmetric", "asymmetric", "SAME_UPPER", "SAME_LOWER", "VALID"]
DILATIONS = [1, 2]
BIASES = [True, False]
GROUPS = [1, 2]
FORMS = ["split", "multiplier", "concat-input", "sum"]
C, N, H, W = 4, 6, 15, 17

# onnxruntime cannot run SAME_* auto_pad with dilation > 1 (the original has no reference).
GRID = [case for case in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS, BIASES, GROUPS)
        if not (case[2].startswith("SAME") and case[3] > 1)]


def conv_attrs(kernel, stride, padding, dilation, group):
    attrs = {"kernel_shape": list(kernel), "strides": [stride, stride], "dilations": [dilation, dilation],
             "group": group}
    kh, kw = kernel
    if padding == "symmetric":
        attrs["pads"] = [kh // 2, kw // 2, kh // 2, kw // 2]
    elif padding == "asymmetric":
        attrs["pads"] = [0, kw // 2, kh - 1, 1]
    elif padding in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        attrs["auto_pad"] = padding
    return attrs


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias,group", GRID,
                         ids=["k{}x{}-s{}-{}-d{}-{}-g{}".format(*k, s, p, d, "b" if b else "nob", g)
                              for k, s, p, d, b, g in GRID])
def test_decomposed_conv_matches_onnxruntime(kernel, stride, padding, dilation, bias, group):
    case = GRID.index((kernel, stride, padding, dilation, bias, group))
    rng = np.random.default_rng(case)
    weight = rng.standard_normal((N, C // group) + kernel).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    attrs = conv_attrs(kernel, stride, padding, dilation, group)
    original = conv_model(weight, b, [1, C, H, W], attrs=attrs)
    x = {"x": rng.standard_normal((1, C, H, W)).astype(np.float32)}
    (expected,) = run(original, x)

    full = decompose_model(original, OptimizeConfig(rank=kernel[0] * kernel[1]), x)
    assert [n.op_type for n in full.model.graph.node].count("Conv") >= 2
    (got,) = run(full.model, x)
    assert got.shape == expected.shape
    assert rel_error(expected, got) < EXACT_REL_ERROR

    rank = 1 + case % 3
    form = FORMS[case % 4]
    low = decompose_model(original, OptimizeConfig(rank=rank, graph_form=form), x)
    dec = network_decoupling(weight, rank, group)
    fitted = conv_model(reconstruct_weight(dec), b, [1, C, H, W], attrs=attrs)
    (want,) = run(fitted, x)
    (got,) = run(low.model, x)
    assert rel_error(want, got) < EXACT_REL_ERROR
    entry = low.layers[0]
    assert entry["decomposed"] and entry["rank"] == rank
    expected_form = "multiplier" if rank == 1 else ("sum" if group > 1 and form in ("split", "concat-input") else form)
    assert entry["graph_form"] == expected_form
    pixels = expected.shape[2] * expected.shape[3]
    kk = kernel[0] * kernel[1]
    assert entry["macs_before"] == pixels * N * (C // group) * kk
    assert entry["macs_after"] == pixels * (C * rank * kk + N * C * rank // group)
