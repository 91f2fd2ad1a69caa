"""Data-driven fits on statistics: planted solutions, the paper's ordering, streaming sums."""

import numpy as np
import pytest

from onnx_dwd.fit import network_decoupling, reconstruct_weight
from onnx_dwd.fit.common import assemble
from onnx_dwd.fit.data import channel, dwd, dwd_comp, reduced_rank_fit, refit
from onnx_dwd.fit.stats import LayerStats, ResidualSums, StatsBuffer, conv_pads, im2col, relative_error

FITS = {"dwd": dwd, "dwd_comp": dwd_comp, "refit": refit}


def stats_for(weight, bias, x, group=1):
    """Statistics of y = W x + b over patches x [P, c*k2]."""
    n = weight.shape[0]
    ng, d = n // group, weight[0].size
    y = np.concatenate([x[:, k * d:(k + 1) * d] @ weight[k * ng:(k + 1) * ng].reshape(ng, -1).T
                        for k in range(group)], axis=1) + (0 if bias is None else bias)
    st = LayerStats.zeros(n, d, group)
    st.add(x, y)
    return st


def error_of(st, dec):
    return relative_error(st, reconstruct_weight(dec), dec.bias)


@pytest.mark.parametrize("name", sorted(FITS))
@pytest.mark.parametrize("group", [1, 2])
def test_planted_rank_k_weight_is_recovered_exactly(name, group, rng):
    n, c, k = 8, 6, 2
    p = rng.standard_normal((group, c // group, n // group, k))
    d = rng.standard_normal((group, c // group, k, 9))
    w = reconstruct_weight(assemble(p, d, (3, 3), group))
    bias = rng.standard_normal(n)
    x = rng.standard_normal((4000, c * 9)) + rng.standard_normal(c * 9)  # non-zero mean
    st = stats_for(w, bias, x, group)
    dec = FITS[name](w, st, k)
    assert error_of(st, dec) < 1e-5
    assert np.abs(dec.bias - bias).max() < 1e-4


@pytest.mark.parametrize("name", sorted(FITS))
def test_full_rank_is_exact_with_data(name, rng):
    w = rng.standard_normal((6, 4, 3, 3))
    st = stats_for(w, None, rng.standard_normal((2000, 36)))
    assert error_of(st, FITS[name](w, st, 9)) < 1e-5


def test_paper_ordering_on_random_layer(rng):
    """Table 2's setting, smaller: refit < dwd_comp < dwd <= nd (all in-sample)."""
    w = rng.standard_normal((64, 16, 3, 3))
    st = stats_for(w, None, rng.standard_normal((3000, 144)))
    errs = {name: error_of(st, f(w, st, 1)) for name, f in FITS.items()}
    errs["nd"] = relative_error(st, reconstruct_weight(network_decoupling(w, 1)), None)
    assert errs["refit"] < errs["dwd_comp"] < errs["dwd"] <= errs["nd"] + 1e-3


def test_correlated_inputs_reward_data_driven_fits(rng):
    """When inputs are correlated (as real activations are), fitting to them beats the data-free SVD."""
    w = rng.standard_normal((32, 8, 3, 3))
    mix = rng.standard_normal((72, 72)) * np.linspace(3, 0.05, 72)
    st = stats_for(w, None, rng.standard_normal((4000, 72)) @ mix.T)
    nd = relative_error(st, reconstruct_weight(network_decoupling(w, 1)), None)
    errs = [error_of(st, f(w, st, 1)) for f in (refit, dwd_comp, dwd)] + [nd]
    assert errs == sorted(errs) and errs[0] < 0.85 * nd  # seen: 0.715, 0.788, 0.858, 0.887


def test_refit_never_worse_than_its_start(rng):
    for seed in range(5):
        r = np.random.default_rng(seed)
        w = r.standard_normal((16, 8, 3, 3))
        st = stats_for(w, r.standard_normal(16), r.standard_normal((1500, 72)) @ r.standard_normal((72, 72)))
        for k in (1, 2, 4):
            assert error_of(st, refit(w, st, k)) <= error_of(st, dwd_comp(w, st, k)) + 1e-9


def test_reduced_rank_fit_matches_brute_force(rng):
    x = rng.standard_normal((5000, 7)) @ rng.standard_normal((7, 7))
    t = x @ rng.standard_normal((7, 5)) + 0.1 * rng.standard_normal((5000, 5))
    p, d = reduced_rank_fit(t.T @ x / len(x), x.T @ x / len(x), 2)
    best = np.linalg.norm(t - x @ (p @ d).T)
    # any other rank-2 map (e.g. truncated least squares) does no better
    b, *_ = np.linalg.lstsq(x, t, rcond=None)
    u, s, vt = np.linalg.svd(b.T)
    assert best <= np.linalg.norm(t - x @ (u[:, :2] * s[:2] @ vt[:2]).T) + 1e-9


def test_channel_decomposition_planted(rng):
    w = (rng.standard_normal((12, 3)) @ rng.standard_normal((3, 4 * 9))).reshape(12, 4, 3, 3)
    st = stats_for(w, None, rng.standard_normal((2000, 36)))
    ch = channel(w, st, 3)
    rebuilt = (ch.second[:, :, 0, 0] @ ch.first.reshape(3, -1)).reshape(w.shape)
    assert relative_error(st, rebuilt, ch.bias) < 1e-5


def test_statistics_merge_equals_one_pass(rng):
    x, y = rng.standard_normal((300, 18)), rng.standard_normal((300, 4))
    whole = LayerStats.zeros(4, 9, 2)
    whole.add(x, y)
    a, b = LayerStats.zeros(4, 9, 2), LayerStats.zeros(4, 9, 2)
    a.add(x[:100], y[:100])
    b.add(x[100:], y[100:])
    merged = a.merge(b)
    for field in ("sxx", "syx", "sx", "sy"):
        assert np.allclose(getattr(merged, field), getattr(whole, field))
    assert merged.count == 300 and np.isclose(merged.syy, whole.syy)


@pytest.mark.parametrize("group", [1, 2])
def test_split_products_equal_one_threads_and_repeat_exactly(rng, monkeypatch, group):
    import onnx_dwd.fit.stats as stats_module
    x = rng.standard_normal((333, 2 * 18)).astype(np.float32)  # odd: the halves differ in size
    y = rng.standard_normal((333, 6)).astype(np.float32)
    whole = LayerStats.zeros(6, 36 // group, group)
    whole.add(x, y)
    monkeypatch.setattr(stats_module, "SPLIT_MACS", 1)  # split every product
    helper = stats_module.ThreadPoolExecutor(1)  # split on a single core too
    monkeypatch.setattr(stats_module, "_split_helper", lambda: helper)
    split, again = LayerStats.zeros(6, 36 // group, group), LayerStats.zeros(6, 36 // group, group)
    split.add(x, y)
    again.add(x, y)
    helper.shutdown()
    for field in ("sxx", "syx", "sx", "sy"):
        np.testing.assert_allclose(getattr(split, field), getattr(whole, field), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(getattr(split, field), getattr(again, field))  # no dependence on timing


def test_buffered_statistics_equal_direct_ones(rng, monkeypatch):
    import onnx_dwd.fit.stats as stats_module
    monkeypatch.setattr(stats_module, "BUFFER_BYTES", 4 * 300 * (18 + 4) // 7)  # below the 256-row floor
    direct, buffered = LayerStats.zeros(4, 9, 2), LayerStats.zeros(4, 9, 2)
    buffer = StatsBuffer(buffered)
    assert buffer.rows == 256
    sizes = [50, 100, 300, 7, 200, 1]  # fills, overflows, bypasses (300 >= rows) and leaves a rest
    for size in sizes:
        x, y = rng.standard_normal((size, 18)).astype(np.float32), rng.standard_normal((size, 4)).astype(np.float32)
        direct.add(x, y)
        buffer.add(x, y)
    assert buffered.count < sum(sizes)  # the rest waits for flush
    buffer.flush()
    for field in ("sxx", "syx", "sx", "sy"):
        np.testing.assert_allclose(getattr(buffered, field), getattr(direct, field), rtol=1e-5, atol=1e-4)
    assert buffered.count == direct.count == sum(sizes) and np.isclose(buffered.syy, direct.syy)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_residual_sums_give_the_relative_error_of_the_statistics(rng, group, with_bias):
    n, c = 6, 4
    x = rng.standard_normal((500, c // group * 9 * group)).astype(np.float32) + 0.3
    y = rng.standard_normal((500, n)).astype(np.float32)
    weight, bias = rng.standard_normal((n, c // group, 3, 3)), rng.standard_normal(n) if with_bias else None
    st = LayerStats.zeros(n, c // group * 9, group)
    st.add(x, y)
    sums = ResidualSums(weight, bias, group)
    sums.add(x[:123], y[:123])
    sums.add(x[123:], y[123:])
    assert sums.count == 500
    assert np.isclose(sums.relative_error(), relative_error(st, weight, bias), rtol=1e-5)
    # a weight that explains y exactly has no error
    exact = ResidualSums(weight, bias, group)
    d = c // group * 9
    ys = np.concatenate([x[:, k * d:(k + 1) * d] @ weight[k * (n // group):(k + 1) * (n // group)].reshape(n // group, -1).T
                         for k in range(group)], axis=1) + (0 if bias is None else bias)
    exact.add(x, ys.astype(np.float32))
    assert exact.relative_error() < 1e-5


@pytest.mark.parametrize("kernel,strides,dilations,pads,auto_pad", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET"), ((2, 2), (2, 2), (1, 1), (0, 0, 1, 1), "NOTSET"),
    ((3, 5), (2, 1), (2, 1), None, "SAME_UPPER"), ((1, 3), (1, 2), (1, 1), None, "SAME_LOWER"),
    ((3, 3), (1, 1), (2, 2), (2, 0, 1, 3), "NOTSET"), ((7, 7), (2, 2), (1, 1), None, "VALID")])
def test_im2col_reproduces_onnxruntime_conv(kernel, strides, dilations, pads, auto_pad, rng):
    from conftest import conv_model, run
    if auto_pad.startswith("SAME") and dilations != (1, 1):
        dilations = (1, 1)
    w = rng.standard_normal((5, 3) + kernel).astype(np.float32)
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations)}
    attrs.update({"pads": list(pads)} if pads else {"auto_pad": auto_pad})
    x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
    (y,) = run(conv_model(w, None, x.shape, attrs=attrs), {"x": x})
    patches = im2col(x, kernel, strides, dilations, conv_pads(x.shape[2:], kernel, strides, dilations, pads, auto_pad))
    assert patches.shape[:3] == (2,) + y.shape[2:]
    assert np.allclose(patches @ w.reshape(5, -1).T, y.transpose(0, 2, 3, 1), atol=1e-4)


def test_refit_picks_the_variant_that_validates_best(rng):
    """Few positions per dimension: the least-squares step overfits, and the validation notices."""
    from onnx_dwd.fit.data import REFIT_VARIANTS, _refit_variant
    w = rng.standard_normal((24, 16, 3, 3))
    mix = rng.standard_normal((144, 144))
    train = stats_for(w, None, rng.standard_normal((200, 144)) @ mix)   # 200 positions for 144 dims
    val = stats_for(w, None, rng.standard_normal((200, 144)) @ mix)
    held = stats_for(w, None, rng.standard_normal((4000, 144)) @ mix)
    dec = refit(w, train, 1, validation=val)
    assert dec.detail in REFIT_VARIANTS
    scores = {name: error_of(val, _refit_variant(w, train, 1, *v)) for name, v in REFIT_VARIANTS.items()}
    assert scores[dec.detail] == min(scores.values())
    # the chosen variant, refitted on train + val, generalises no worse than the paper's Algorithm 2
    assert error_of(held, dec) <= error_of(held, dwd_comp(w, train.merge(val), 1)) + 0.01
    # plenty of data: the full joint solve wins
    big_train = stats_for(w, None, rng.standard_normal((20000, 144)) @ mix)
    big_val = stats_for(w, None, rng.standard_normal((5000, 144)) @ mix)
    assert refit(w, big_train, 1, validation=big_val).detail == "sweeps+ls"


def test_refit_sweeps_sets_how_far_the_sweeps_go(rng):
    """sweeps=0 is Algorithm 2 itself (plus least squares in sweeps+ls); each further sweep
    fits the statistics at least as well; a negative count is refused."""
    w = rng.standard_normal((12, 8, 3, 3))
    st = stats_for(w, rng.standard_normal(12), rng.standard_normal((300, 72)) @ rng.standard_normal((72, 72)))
    plain, paper = refit(w, st, 1, variant="sweeps", sweeps=0), dwd_comp(w, st, 1)
    for field in ("depthwise", "pointwise", "bias"):
        assert np.array_equal(getattr(plain, field), getattr(paper, field)), field
    errors = [error_of(st, refit(w, st, 1, sweeps=s)) for s in (0, 1, 3)]
    assert errors[0] > errors[1] > errors[2]
    assert error_of(st, refit(w, st, 1)) == errors[2]  # 3 by default
    with pytest.raises(ValueError, match="sweeps >= 0"):
        refit(w, st, 1, sweeps=-1)


@pytest.mark.parametrize("group", [1, 2])
def test_refit_auto_without_extra_sweeps_scores_equal_variants_once(rng, group):
    """sweeps=0 makes "alg2" and "sweeps" the same variant: auto still fits and picks."""
    w = rng.standard_normal((12, 8 // group, 3, 3))
    mix = rng.standard_normal((72, 72))
    train = stats_for(w, None, rng.standard_normal((300, 72)) @ mix, group)
    val = stats_for(w, None, rng.standard_normal((300, 72)) @ mix, group)
    dec = refit(w, train, 1, validation=val, sweeps=0)
    assert dec.detail in ("alg2", "sweeps", "sweeps+ls") and dec.depthwise.shape == (8, 1, 3, 3)


@pytest.mark.parametrize("group", [1, 2])
def test_refit_variants_from_one_run_of_sweeps_equal_each_fitted_alone(rng, group):
    """The variants are snapshots of one run of sweeps: a later sweep must not change an
    earlier variant's result, and the least-squares step must not change the plain one."""
    from onnx_dwd.fit.data import REFIT_VARIANTS, _refit_variant, _refit_variants
    w = rng.standard_normal((12, 8 // group, 3, 3))
    st = stats_for(w, rng.standard_normal(12), rng.standard_normal((300, 72)) @ rng.standard_normal((72, 72)),
                   group)
    together = _refit_variants(w, st, 2, list(REFIT_VARIANTS.values()))
    for dec, variant in zip(together, REFIT_VARIANTS.values()):
        alone = _refit_variant(w, st, 2, *variant)
        for field in ("depthwise", "pointwise", "bias"):
            assert np.array_equal(getattr(dec, field), getattr(alone, field)), (variant, field)
    errors = [error_of(st, dec) for dec in together]
    assert errors[0] > errors[1] > errors[2]  # more sweeps, then least squares: each fits better


@pytest.mark.parametrize("n, q", [(16, 9), (9, 9), (40, 25)])
def test_rank_1_channel_fit_is_the_general_one(rng, n, q):
    """A sweep's rank-1 shortcut gives what the general reduced-rank fit gives (sign, scale
    balance and all), also where q = n and where the cross term's sign must flip."""
    from onnx_dwd.fit.data import _rank1_whitened_fit, _whitened_fit, inverse_cholesky
    a = rng.standard_normal((4 * q, q)) @ rng.standard_normal((q, q))
    linv = inverse_cholesky(a.T @ a / len(a))
    for cross in (rng.standard_normal((n, q)), -np.abs(rng.standard_normal((n, q)))):
        p, d = _rank1_whitened_fit(cross, linv)
        p_general, d_general = _whitened_fit(cross, linv, 1, gram=True)
        assert p.shape == p_general.shape and d.shape == d_general.shape
        np.testing.assert_allclose(p, p_general, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(d, d_general, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel, pads", [((3, 3), (1, 1, 1, 1)), ((3, 3), (0, 0, 0, 0)), ((3, 2), (2, 0, 1, 1)),
                                          ((5, 5), (2, 2, 2, 2)), ((3, 3), (0, 2, 1, 0)), ((3, 3), (3, 3, 3, 3)),
                                          ((1, 3), (0, 1, 0, 1)), ((5, 3), (4, 0, 0, 2))])
def test_shifted_statistics_equal_im2col_ones(rng, kernel, pads):
    """Every sum of add_shifted (correlations less the borders) is add_shared's on im2col, for
    asymmetric, missing and oversized pads, with two layers sharing the patches (one given
    as the transposed view a capture passes)."""
    from onnx_dwd.fit.stats import add_shared, add_shifted
    x = rng.standard_normal((3, 4, 7, 6))
    ho, wo = 7 + pads[0] + pads[2] - kernel[0] + 1, 6 + pads[1] + pads[3] - kernel[1] + 1
    ys = [rng.standard_normal((3, 5, ho * wo)).transpose(0, 2, 1), rng.standard_normal((3, ho * wo, 2))]
    d = 4 * kernel[0] * kernel[1]
    shifted, direct = [LayerStats.zeros(5, d), LayerStats.zeros(2, d)], [LayerStats.zeros(5, d), LayerStats.zeros(2, d)]
    add_shifted(shifted, x, ys, kernel, pads)
    add_shared(direct, im2col(x, kernel, (1, 1), (1, 1), pads).reshape(-1, d), [y.reshape(-1, y.shape[2]) for y in ys])
    for got, want in zip(shifted, direct):
        assert got.count == want.count == 3 * ho * wo
        for field in ("sxx", "syx", "sx", "sy", "syy"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-10, err_msg=field)
    # float32 maps, as onnxruntime gives: the products in float32, summed into float64
    x32, ys32 = x.astype(np.float32), [y.astype(np.float32) for y in ys]
    single = [LayerStats.zeros(5, d), LayerStats.zeros(2, d)]
    add_shifted(single, x32, ys32, kernel, pads)
    for got, want in zip(single, direct):
        np.testing.assert_allclose(got.sxx, want.sxx, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("max_bytes", [1, 3 * 4 * (4 * 42 + 36 * 7), None])
def test_map_buffer_sums_equal_one_add_shifted_whatever_the_batches(rng, max_bytes):
    """Maps added in uneven batches (one image, five, two) reach the sums exactly as one
    add_shifted over all of them: with a buffer of one image (1 byte), of three images
    (blocks filled across the batches), and of the default size."""
    from onnx_dwd.fit.stats import MapBuffer, add_shifted
    kernel, pads = (3, 3), (1, 0, 1, 1)
    x = rng.standard_normal((8, 4, 6, 7))
    ys = [rng.standard_normal((8, 36, 5)), rng.standard_normal((8, 2, 36)).transpose(0, 2, 1)]
    d = 4 * 9
    buffered, direct = [LayerStats.zeros(5, d), LayerStats.zeros(2, d)], [LayerStats.zeros(5, d), LayerStats.zeros(2, d)]
    buffer = MapBuffer(buffered, kernel, pads, max_bytes)
    for start, stop in ((0, 1), (1, 6), (6, 8)):
        buffer.add(x[start:stop], *(y[start:stop] for y in ys))
    if max_bytes is None:
        assert buffered[0].count == 0  # all eight images still in the buffer
    buffer.flush()
    add_shifted(direct, x, ys, kernel, pads)
    for got, want in zip(buffered, direct):
        assert got.count == want.count == 8 * 6 * 6
        for field in ("sxx", "syx", "sx", "sy", "syy"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-10, err_msg=field)


@pytest.mark.parametrize("args", [((3, 2), (2, 1), (1, 2), (1, 0, 2, 1)), ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
                                  ((5, 5), (2, 2), (1, 1), (2, 2, 2, 2)), ((3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),
                                  ((1, 3), (1, 2), (1, 1), (0, 3, 0, 0)), ((2, 2), (2, 2), (1, 1), (0, 0, 0, 0))])
@pytest.mark.parametrize("share", [1.0, 0.1])
def test_sampled_patches_equal_the_same_rows_of_im2col(rng, args, share):
    """Every position (share 1: gathered from the padded map by flat index) or a few (share
    0.1: from the map itself), the padded ones included, with asymmetric pads, strides and
    dilations."""
    from onnx_dwd.fit.stats import sampled_patches
    x = rng.standard_normal((3, 4, 11, 9)).astype(np.float32)
    full = im2col(x, *args)
    b, ho, wo, d = full.shape
    pick = np.stack([rng.permutation(ho * wo)[:max(1, int(share * ho * wo))] for _ in range(b)])
    want = np.take_along_axis(full.reshape(b, ho * wo, d), pick[:, :, None], axis=1)
    assert np.array_equal(sampled_patches(x, pick, *args), want)


@pytest.mark.parametrize("group, rank", [(1, 1), (1, 3), (2, 2), (4, 1)])
def test_decomposed_relative_error_equals_the_weights_own(rng, group, rank):
    """The error from D C D^T and the factors is relative_error of the weight they compute."""
    from onnx_dwd.fit import network_decoupling, reconstruct_weight
    from onnx_dwd.fit.stats import decomposed_relative_error
    n, c = 8, 8
    w = rng.standard_normal((n, c // group, 3, 3))
    x = rng.standard_normal((500, c * 9))
    y = x.reshape(500, group, -1).transpose(1, 0, 2) @ w.reshape(group, n // group, -1).transpose(0, 2, 1)
    y = y.transpose(1, 0, 2).reshape(500, n) + 0.3 * rng.standard_normal((500, n)) + 1.0
    stats = LayerStats.zeros(n, c // group * 9, group)
    stats.add(x, y)
    dec = network_decoupling(w, rank, group)
    bias = rng.standard_normal(n)
    want = relative_error(stats, reconstruct_weight(dec), bias)
    assert 0.05 < want < 2
    assert decomposed_relative_error(stats, dec.depthwise, dec.pointwise, dec.rank, bias) == pytest.approx(want, rel=1e-10)
    assert decomposed_relative_error(stats, dec.depthwise, dec.pointwise, dec.rank, None) == pytest.approx(
        relative_error(stats, reconstruct_weight(dec), None), rel=1e-10)


def test_moments_centre_in_row_blocks_exactly_and_without_a_second_d_by_d_array(rng):
    """d = 600 spans three MOMENT_ROWS blocks (the last one partial); the wide head layers
    (d = 2304) made a whole outer product beside C_xx the fit's memory peak."""
    import tracemalloc

    from onnx_dwd.fit.stats import MOMENT_ROWS
    d = 600
    assert d > 2 * MOMENT_ROWS and d % MOMENT_ROWS
    x = rng.standard_normal((2000, d)) + 3.0
    st = LayerStats.zeros(4, d)
    st.add(x, rng.standard_normal((2000, 4)))
    tracemalloc.start()
    try:
        mx, _, cxx, _ = st.moments()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = st.sxx[0] / st.count - np.outer(st.sx[0] / st.count, st.sx[0] / st.count)
    np.testing.assert_array_equal(cxx, want)  # the same products, the same rounding
    assert peak < 1.5 * cxx.nbytes
