"""Network Decoupling math: planted factorizations come back, full rank is exact."""

import itertools

import numpy as np
import pytest

from onnx_dwd.fit import max_rank, network_decoupling, reconstruct_weight
from onnx_dwd.fit.common import assemble

SHAPES = [  # (n, c, kh, kw, group)
    (16, 8, 3, 3, 1), (8, 4, 5, 5, 1), (12, 6, 1, 3, 1), (6, 4, 2, 2, 2),
    (16, 8, 3, 3, 4), (4, 6, 3, 3, 1), (32, 3, 7, 7, 1), (8, 1, 3, 3, 1),
]


def planted(rng, n, c, kh, kw, group, rank):
    """A weight that is exactly rank-`rank` per input channel, and its factors."""
    ng, cg = n // group, c // group
    p = rng.standard_normal((group, cg, ng, rank))
    d = rng.standard_normal((group, cg, rank, kh * kw))
    dec = assemble(p, d, (kh, kw), group)
    return reconstruct_weight(dec), dec


@pytest.mark.parametrize("n,c,kh,kw,group", SHAPES)
def test_full_rank_is_exact(rng, n, c, kh, kw, group):
    w = rng.standard_normal((n, c // group, kh, kw)).astype(np.float32)
    dec = network_decoupling(w, rank=kh * kw, group=group)
    assert dec.rank == max_rank(w.shape, group)
    assert dec.depthwise.shape == (c * dec.rank, 1, kh, kw)
    assert dec.pointwise.shape == (n, c * dec.rank // group, 1, 1)
    assert dec.depthwise.dtype == np.float32
    assert np.abs(reconstruct_weight(dec) - w).max() < 1e-5


@pytest.mark.parametrize("shape,rank",
                         [(s, r) for s, r in itertools.product(SHAPES, (1, 2)) if r <= max_rank((s[0], 1, s[2], s[3]), s[4])])
def test_planted_low_rank_comes_back(rng, shape, rank):
    n, c, kh, kw, group = shape
    w, _ = planted(rng, n, c, kh, kw, group, rank)
    dec = network_decoupling(w, rank=rank, group=group)
    assert np.abs(reconstruct_weight(dec) - w).max() < 1e-5 * np.abs(w).max()


def test_error_falls_with_rank_and_matches_svd_tail(rng):
    w = rng.standard_normal((16, 8, 3, 3))
    errors = []
    for k in range(1, 10):
        rec = reconstruct_weight(network_decoupling(w, k))
        errors.append(np.linalg.norm(rec - w))
        # Eckart-Young: the error is the tail of the singular values, channel by channel
        tail = sum(np.sum(np.linalg.svd(w[:, i].reshape(16, 9), compute_uv=False)[k:] ** 2) for i in range(8))
        assert errors[-1] ** 2 == pytest.approx(tail, rel=1e-9, abs=1e-9)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10


def test_deterministic_signs(rng):
    w = rng.standard_normal((8, 4, 3, 3))
    a, b = network_decoupling(w, 2), network_decoupling(w.copy(), 2)
    assert np.array_equal(a.depthwise, b.depthwise) and np.array_equal(a.pointwise, b.pointwise)
    # largest-magnitude pointwise entry of every column is positive
    cols = a.pointwise[:, :, 0, 0]
    assert np.all(cols[np.abs(cols).argmax(axis=0), np.arange(cols.shape[1])] > 0)


def test_rank_is_clamped_for_few_outputs(rng):
    w = rng.standard_normal((2, 4, 3, 3))
    dec = network_decoupling(w, rank=5)
    assert dec.rank == 2
    assert np.abs(reconstruct_weight(dec) - w).max() < 1e-10


def test_rejects_bad_arguments(rng):
    with pytest.raises(ValueError):
        network_decoupling(rng.standard_normal((4, 4, 3)), 1)
    with pytest.raises(ValueError):
        network_decoupling(rng.standard_normal((4, 4, 3, 3)), 0)
