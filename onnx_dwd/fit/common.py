"""Shared pieces of the fits: the result type and the weight bookkeeping."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """Depthwise + pointwise factors of one conv weight.

    depthwise: D [c*K, 1, kh, kw]; output channel i*K + r reads input channel i.
    pointwise: P [n, c*K/G, 1, 1]; grouped like the original conv.
    rank: K, the depthwise filters per input channel.
    group: G, the original conv's group.
    bias: [n] new bias of the pointwise conv, or None to keep the original one
        (data-driven fits move the bias to absorb the mean of the error).
    detail: which variant a fit chose, for the report (refit), else None.
    """

    depthwise: np.ndarray
    pointwise: np.ndarray
    rank: int
    group: int
    bias: Optional[np.ndarray] = None
    detail: Optional[str] = None


def max_rank(weight_shape, group: int) -> int:
    """Largest rank that can lower the error: min(kh*kw, n/G); beyond it is exact."""
    n, _, kh, kw = weight_shape
    return min(kh * kw, n // group)


def per_channel_blocks(weight: np.ndarray, group: int) -> np.ndarray:
    """W [n, c/G, kh, kw] -> blocks [G, c/G, n/G, kh*kw]: one matrix per input channel."""
    n, cg, kh, kw = weight.shape
    if n % group:
        raise ValueError(f"out channels {n} not divisible by group {group}")
    ng = n // group
    return weight.reshape(group, ng, cg, kh * kw).transpose(0, 2, 1, 3)


def assemble(p_blocks: np.ndarray, d_blocks: np.ndarray, kernel, group: int,
             bias: Optional[np.ndarray] = None) -> Decomposition:
    """Per-channel factors -> conv weights.

    p_blocks: [G, c/G, n/G, K] pointwise columns of each input channel.
    d_blocks: [G, c/G, K, kh*kw] depthwise filters of each input channel.
    """
    g, cg, ng, k = p_blocks.shape
    kh, kw = kernel
    depthwise = d_blocks.reshape(g * cg * k, 1, kh, kw)
    # P[g*ng + o, j*K + r] = p_blocks[g, j, o, r]
    pointwise = p_blocks.transpose(0, 2, 1, 3).reshape(g * ng, cg * k, 1, 1)
    return Decomposition(np.ascontiguousarray(depthwise), np.ascontiguousarray(pointwise), k, group, bias)


def reconstruct_weight(dec: Decomposition) -> np.ndarray:
    """The regular conv weight [n, c/G, kh, kw] that D then P computes."""
    d, p, k, g = dec.depthwise, dec.pointwise, dec.rank, dec.group
    ck, _, kh, kw = d.shape
    c = ck // k
    n = p.shape[0]
    cg, ng = c // g, n // g
    d_blocks = d.reshape(g, cg, k, kh * kw)
    p_blocks = p.reshape(g, ng, cg, k).transpose(0, 2, 1, 3)  # [G, c/G, n/G, K]
    w = np.einsum("gjok,gjkx->gojx", p_blocks, d_blocks)  # [G, n/G, c/G, kh*kw]
    return w.reshape(n, cg, kh, kw)


def svd_flip(u: np.ndarray, vt: np.ndarray):
    """Fix SVD signs (largest |u| entry of each column positive) for determinism.

    u: [..., m, r], vt: [..., r, q]; batched over leading axes.
    """
    if u.ndim == 2:  # one matrix (a sweep's channel fit): plain indexing costs half as much
        idx = np.abs(u).argmax(axis=0)
        signs = np.where(u[idx, np.arange(u.shape[1])] < 0, -1, 1).astype(u.dtype)
        return u * signs, vt * signs[:, None]
    idx = np.argmax(np.abs(u), axis=-2)  # [..., r]
    signs = np.sign(np.take_along_axis(u, idx[..., None, :], axis=-2))  # [..., 1, r]
    signs[signs == 0] = 1.0
    return u * signs, vt * np.swapaxes(signs, -1, -2)
