"""Data-driven fits on layer statistics: the paper's algorithms, our refit, and the baseline.

All functions take the original weight W [n, c/G, kh, kw] and LayerStats
(patches x of the layer's actual input, outputs y of the original model's
layer; see stats.py) and minimise E|y - b' - sum_i P_i D_i x_i|^2 in
different ways. Means are handled by the bias: every fit works on centred
moments and returns b' = mean(y) - M mean(x).

- dwd        paper Algorithm 1: per channel, PCA of Y_i = W_i X_i.
- dwd_comp   paper Algorithm 2: channels in order, each fitted to its own
             response plus the error carried by the channels before it
             (the "GSVD" step is reduced-rank regression, closed form below).
- refit      ours: block-coordinate descent over channels on the full
             residual, then the exact least-squares pointwise weights.
- channel    Zhang et al. (TPAMI 2016): a k x k conv to c' channels, then 1x1.

Each step that fits channel i solves, for a target t with E[t x_i^T] = B and
E[x_i x_i^T] = C = L L^T, the rank-K problem min E|t - P D x_i|^2:
A = B L^-T = U S V^T, P = U_K S_K, D = V_K^T L^-1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple

import numpy as np

from .common import Decomposition, assemble, max_rank, svd_flip
from .stats import LayerStats, decomposed_relative_error

#: Ridge added to covariance matrices, relative to their mean diagonal, so that
#: dead or constant inputs (padding, ReLU zeros) keep the solves well posed.
RIDGE = 1e-6

#: Block-coordinate sweeps of the refit over all channels.
REFIT_SWEEPS = 3


def _ridge(cov: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """cov [..., q, q] plus a small multiple of its mean diagonal (batched)."""
    q = cov.shape[-1]
    scale = np.maximum(np.trace(cov, axis1=-2, axis2=-1) / q, 1e-30)[..., None, None]
    return cov + (ridge * scale + 1e-12) * np.eye(q)


def inverse_cholesky(cov: np.ndarray) -> np.ndarray:
    """L^-1 for cov + ridge = L L^T, batched over leading axes.

    The covariance is accumulated from float32 products, so directions with
    (almost) no variance can come out slightly negative; where the Cholesky
    fails the ridge grows tenfold until it succeeds (those directions carry
    no signal to fit). numpy only: mixing scipy's LAPACK calls into these
    loops made each tiny solve take milliseconds (two OpenBLAS thread pools
    spinning against each other on 2 cores).
    """
    try:
        return np.linalg.inv(np.linalg.cholesky(_ridge(cov)))
    except np.linalg.LinAlgError:
        pass
    flat = cov.reshape(-1, cov.shape[-2], cov.shape[-1])
    out = np.empty_like(flat)
    for i, c in enumerate(flat):
        ridge = RIDGE
        while True:
            try:
                out[i] = np.linalg.inv(np.linalg.cholesky(_ridge(c, ridge)))
                break
            except np.linalg.LinAlgError:
                if ridge >= 1.0:
                    raise
                ridge *= 10
    return out.reshape(cov.shape)


def _whitened_fit(cross: np.ndarray, linv: np.ndarray, rank: int, gram: bool = False
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """reduced_rank_fit with the covariance given as L^-1. gram: take the top-K right singular
    vectors from the q x q Gram matrix (for a sweep's channel, q = kh*kw small next to n:
    half an SVD's time; it squares the condition number, so not for the wide problems)."""
    a = cross @ linv.T  # B L^-T
    if gram and a.shape[1] <= a.shape[0]:
        # P = A V_K = U_K S_K needs no division
        _, vecs = np.linalg.eigh(a.T @ a)
        v = vecs[:, ::-1][:, :rank]
        p, vt = svd_flip(a @ v, v.T)
    else:
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        u, vt = svd_flip(u[:, :rank], vt[:rank])
        p = u * s[:rank]
    d = vt @ linv  # V_K^T L^-1
    # balance the scale between the two factors (the product is unchanged)
    scale = np.sqrt(np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(p, axis=0), 1e-30))
    scale[~np.isfinite(scale) | (scale == 0)] = 1.0
    return p * scale, d / scale[:, None]


def _rank1_whitened_fit(cross: np.ndarray, linv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """_whitened_fit(cross, linv, 1, gram=True) for a sweep's channel (q <= n), in a third of
    the numpy calls: a rank-1 refit makes one per channel per sweep (about 12,000 on YOLOv8n,
    1.3 s of its 64-image run), each a few microseconds of arithmetic in calls' overhead."""
    a = cross @ linv.T
    v = np.linalg.eigh(a.T @ a)[1][:, -1]  # the top eigenvector (eigh sorts ascending)
    p = a @ v
    if p[np.abs(p).argmax()] < 0:  # svd_flip's sign: the largest |p| entry positive
        p, v = -p, -v
    d = v @ linv
    scale = math.sqrt(math.sqrt(float(d @ d)) / max(math.sqrt(float(p @ p)), 1e-30))
    if not math.isfinite(scale) or scale == 0:
        scale = 1.0
    return (p * scale)[:, None], (d / scale)[None, :]


def reduced_rank_fit(cross: np.ndarray, cov: np.ndarray, rank: int) -> Tuple[np.ndarray, np.ndarray]:
    """argmin over P [m, K], D [K, q] of E|t - P D x|^2, given cross = E[t x^T] [m, q], cov = E[x x^T] [q, q]."""
    return _whitened_fit(cross, inverse_cholesky(cov), rank)


@dataclasses.dataclass
class _Group:
    """One group's problem: W [n_g, c_g, k2], centred moments."""

    w: np.ndarray
    mx: np.ndarray
    my: np.ndarray
    cxx: np.ndarray
    cyx: np.ndarray
    _linv: Optional[np.ndarray] = None

    @property
    def k2(self) -> int:
        return self.w.shape[2]

    def block(self, i: int) -> slice:
        return slice(i * self.k2, (i + 1) * self.k2)

    @property
    def channel_linv(self) -> np.ndarray:
        """L_i^-1 of every channel's diagonal block C_ii, [c_g, k2, k2] (computed once)."""
        if self._linv is None:
            c, k2 = self.w.shape[1], self.k2
            blocks = self.cxx.reshape(c, k2, c, k2)[np.arange(c), :, np.arange(c), :]
            self._linv = inverse_cholesky(blocks)
        return self._linv


def _groups(weight: np.ndarray, stats: LayerStats):
    n, cg, kh, kw = weight.shape
    g = stats.group
    ng = n // g
    if stats.sxx.shape[1] != cg * kh * kw or stats.syx.shape[0] != n:
        raise ValueError(f"statistics of shape {stats.syx.shape} do not fit weight {weight.shape}")
    w = weight.astype(np.float64).reshape(g, ng, cg, kh * kw)
    for k in range(g):
        mx, my, cxx, cyx = stats.moments(k)
        yield _Group(w[k], mx, my, cxx, cyx)


def _finish(weight, groups_pd, groups) -> Decomposition:
    """Per-group (P [c_g, n_g, K], D [c_g, K, k2]) -> Decomposition with the mean-absorbing bias
    (groups: the _Group problems they solve)."""
    p_blocks = np.stack([p for p, _ in groups_pd])
    d_blocks = np.stack([d for _, d in groups_pd])
    biases = []
    for (p, d), grp in zip(groups_pd, groups):
        m = np.einsum("jok,jkx->ojx", p, d).reshape(p.shape[1], -1)  # [n_g, c_g*k2]
        biases.append(grp.my - m @ grp.mx)
    dec = assemble(p_blocks, d_blocks, weight.shape[2:], len(groups), np.concatenate(biases))
    dtype = weight.dtype
    return Decomposition(dec.depthwise.astype(dtype), dec.pointwise.astype(dtype), dec.rank, dec.group,
                         dec.bias.astype(dtype))


def _effective_rank(weight, rank, stats) -> int:
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return min(rank, max_rank(weight.shape, stats.group))


def dwd(weight: np.ndarray, stats: LayerStats, rank: int) -> Decomposition:
    """Paper Algorithm 1: per channel i, P_i = top-K eigenvectors of W_i C_ii W_i^T, D_i = P_i^T W_i."""
    k = _effective_rank(weight, rank, stats)
    out = []
    groups = list(_groups(weight, stats))
    for grp in groups:
        ps, ds = [], []
        for i in range(grp.w.shape[1]):
            wi = grp.w[:, i]
            cii = grp.cxx[grp.block(i), grp.block(i)]
            vals, vecs = np.linalg.eigh(wi @ cii @ wi.T)
            u = vecs[:, ::-1][:, :k]
            u, _ = svd_flip(u, np.zeros((k, 1)))
            ps.append(u)
            ds.append(u.T @ wi)
        out.append((np.stack(ps), np.stack(ds)))
    return _finish(weight, out, groups)


class _Sweeps:
    """Block-coordinate passes over one group's channels in order: channel i gets the rank-K
    best fit to the residual left by all the others.

    Channel j's current weight is P_j D_j (after its first fit; before, the original W_j),
    so what it explains of channel i's target is P_j (D_j C_{j,i}). The rows D_j C_{j,:}
    are kept (t [c_g*K, d]), and a channel's cross term costs n c_g K k2
    instead of n c_g k2^2 with the full weights (9x less at rank 1, 3x3). In the first
    pass the channels not fitted yet still have W_j: their share sum_{j>i} W_j C_{j,i}
    comes from a few products with the strictly block-lower part of C_xx (rows j > i).
    """

    def __init__(self, grp: _Group, k: int):
        self.grp, self.k = grp, k
        n, cg, k2 = grp.w.shape
        self.p_by_row = np.zeros((n, cg * k))  # [P_0 | P_1 | ...]
        self.p = self.p_by_row.reshape(n, cg, k).transpose(1, 0, 2)  # [c_g, n, K], a view of p_by_row
        self.d = np.zeros((cg, k, k2))
        self.t = np.zeros((cg * k, cg * k2))  # row block j: D_j C_{j,:} (rows: written whole)
        self.done = 0

    def sweep(self) -> None:
        grp, k = self.grp, self.k
        n, cg, k2 = grp.w.shape
        first = self.done == 0
        if first:
            unfitted = _later_channels_share(grp.w.reshape(n, -1), grp.cxx, k2)
        linv = grp.channel_linv
        fit = _rank1_whitened_fit if k == 1 and k2 <= n else functools.partial(_whitened_fit, rank=k, gram=True)
        for i in range(cg):
            blk, cols = grp.block(i), slice(i * k, (i + 1) * k)
            if first:
                cross = grp.cyx[:, blk] - unfitted[:, blk] - self.p_by_row[:, :i * k] @ self.t[:i * k, blk]
            else:
                cross = grp.cyx[:, blk] - self.p_by_row @ self.t[:, blk] + self.p[i] @ self.t[cols, blk]
            self.p[i], self.d[i] = fit(cross, linv[i])
            self.t[cols] = self.d[i] @ grp.cxx[blk]
        self.done += 1


def _later_channels_share(w: np.ndarray, cxx: np.ndarray, k2: int, parts: int = 8) -> np.ndarray:
    """[n, d]: column block i holds sum_{j>i} W_j C_{j,i} (channel j: columns j*k2 on).

    The strictly block-lower part of C (rows j > i) in a few large products: each part of
    the columns takes every row block below the part in one product, and the part's own
    diagonal square masked (half the multiply-adds of W @ C, and no d x d temporary)."""
    cg = cxx.shape[0] // k2
    out = np.zeros((w.shape[0], cxx.shape[0]))
    bounds = np.linspace(0, cg, min(parts, cg) + 1).round().astype(int) * k2
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end < cxx.shape[0]:
            out[:, start:end] = w[:, end:] @ cxx[end:, start:end]
        own = np.arange(end - start) // k2
        out[:, start:end] += w[:, start:end] @ np.where(own[:, None] > own[None, :], cxx[start:end, start:end], 0.0)
    return out


def dwd_comp(weight: np.ndarray, stats: LayerStats, rank: int) -> Decomposition:
    """Paper Algorithm 2: channel i fits Y_i + E_{i-1} (its response plus the error so far).

    With the channels after i still at their original weights, that target is
    the full residual y - sum_{j<i} M_j x_j - sum_{j>i} W_j x_j; with
    inter-layer compensation y is the original model's output and x the input
    the partly decomposed model produces (paper eq. 10).
    """
    k = _effective_rank(weight, rank, stats)
    out = []
    groups = list(_groups(weight, stats))
    for grp in groups:
        sweeps = _Sweeps(grp, k)
        sweeps.sweep()
        out.append((sweeps.p, sweeps.d))
    return _finish(weight, out, groups)


def refit_variants(sweeps: int = REFIT_SWEEPS) -> Dict[str, Tuple[int, bool]]:
    """refit's variants, from the paper's algorithm to the full joint solve:
    (extra block-coordinate sweeps, least-squares pointwise weights)."""
    return {"alg2": (0, False), "sweeps": (sweeps, False), "sweeps+ls": (sweeps, True)}


REFIT_VARIANTS = refit_variants()


def _refit_variant(weight: np.ndarray, stats: LayerStats, k: int, sweeps: int, least_squares: bool) -> Decomposition:
    (dec,) = _refit_variants(weight, stats, k, [(sweeps, least_squares)])
    return dec


def _refit_variants(weight: np.ndarray, stats: LayerStats, k: int, variants) -> list:
    """One Decomposition per (sweeps, least_squares) in variants, from one run of sweeps:
    each variant's channels are the same sweeps stopped earlier or later, so fitting them
    apart repeated most of the work (YOLOv8n's deep layers: 13 sweeps where 4 do). Equal
    variants (alg2 and sweeps with no extra sweeps) are fitted once."""
    stops = sorted({s for s, _ in variants})
    per_variant = {v: [] for v in variants}  # each distinct variant once
    groups = list(_groups(weight, stats))
    for grp in groups:
        sweeps = _Sweeps(grp, k)
        for stop in stops:
            while sweeps.done < 1 + stop:  # the first sweep is Algorithm 2; stop counts the extra ones
                sweeps.sweep()
            for v in per_variant:
                if v[0] == stop:
                    p = _pointwise_least_squares(sweeps) if v[1] else sweeps.p.copy()
                    per_variant[v].append((p, sweeps.d.copy()))
    return [_finish(weight, per_variant[v], groups) for v in variants]


def _pointwise_least_squares(sweeps: _Sweeps) -> np.ndarray:
    """P [c_g, n_g, K] = C_yz C_zz^-1 for z = D x, D block-diagonal [c_g*K, c_g*k2].

    Both moments from the blocks (a dense D would cost c_g times more):
    C_zz[i, j] = D_i C_{i,j} D_j^T = (D_i C_{i,:}) restricted to block j, times D_j^T, with
    the sweeps' D_i C_{i,:}; C_yz[:, j] = C_yx[:, block j] D_j^T.
    """
    grp, d, k = sweeps.grp, sweeps.d, sweeps.k
    cg, k2 = d.shape[0], grp.k2
    n = grp.cyx.shape[0]
    rows = sweeps.t.reshape(cg * k, cg, k2)  # [(i, K'), j, b] = (D_i C_{i, block j})[K', b]
    czz = np.einsum("ijb,jKb->ijK", rows, d).reshape(cg * k, cg * k)
    cyz = np.einsum("njb,jKb->njK", grp.cyx.reshape(n, cg, k2), d).reshape(n, cg * k)
    linv = inverse_cholesky(czz)
    pw = cyz @ linv.T @ linv
    return pw.reshape(n, cg, k).transpose(1, 0, 2)


def refit(weight: np.ndarray, stats: LayerStats, rank: int, validation: Optional[LayerStats] = None,
          variant: Optional[str] = None, sweeps: int = REFIT_SWEEPS) -> Decomposition:
    """Ours: Algorithm 2, then `sweeps` block-coordinate passes over all channels on the
    full residual, then the exact least-squares pointwise weights P given the depthwise D
    (each output's mix of all c*K depthwise channels).

    The later steps fit more freely and can overfit when the statistics hold
    few positions per patch dimension (deep 7x7 layers, few images). With
    `validation` (statistics of other images), each variant in refit_variants
    is fitted on `stats`, scored on `validation`, and the best is refitted on
    both; without it, `variant` (default "sweeps+ls") is used. The chosen
    variant is in the result's `detail`.
    """
    if sweeps < 0:
        raise ValueError(f"refit needs sweeps >= 0, got {sweeps}")
    variants = refit_variants(sweeps)
    k = _effective_rank(weight, rank, stats)
    if validation is None or not validation.count:
        name = variant or "sweeps+ls"
        return dataclasses.replace(_refit_variant(weight, stats, k, *variants[name]), detail=name)
    fitted = _refit_variants(weight, stats, k, list(variants.values()))
    scores = {name: decomposed_relative_error(validation, dec.depthwise, dec.pointwise, dec.rank, dec.bias)
              for name, dec in zip(variants, fitted)}
    best = min(scores, key=scores.get)
    merged = stats.merge(validation)
    return dataclasses.replace(_refit_variant(weight, merged, k, *variants[best]), detail=best)


@dataclasses.dataclass(frozen=True)
class ChannelDecomposition:
    """k x k conv to c' channels, then 1x1 conv to n: first [c', c, kh, kw], second [n, c', 1, 1]."""

    first: np.ndarray
    second: np.ndarray
    bias: np.ndarray

    @property
    def channels(self) -> int:
        return self.first.shape[0]


def channel(weight: np.ndarray, stats: LayerStats, channels: int) -> ChannelDecomposition:
    """Zhang et al.'s channel decomposition with asymmetric reconstruction (group 1 only):
    the rank-c' W' minimising E|y - W' x|^2, as W' = second @ first."""
    if stats.group != 1:
        raise ValueError("channel decomposition supports group 1 only")
    n, c, kh, kw = weight.shape
    channels = max(1, min(channels, n, c * kh * kw))
    (grp,) = list(_groups(weight, stats))
    p, d = reduced_rank_fit(grp.cyx, grp.cxx, channels)
    bias = grp.my - p @ (d @ grp.mx)
    dtype = weight.dtype
    return ChannelDecomposition(d.reshape(channels, c, kh, kw).astype(dtype),
                                p.reshape(n, channels, 1, 1).astype(dtype), bias.astype(dtype))
