"""Network Decoupling (data-free): per input channel, keep the top K SVD terms.

For input channel i the filters W[:, i] form an [n, kh*kw] matrix; its rank-K
truncated SVD ``U_K S_K V_K^T`` is the best rank-K approximation in the
Frobenius norm, so P_i = U_K S_K and D_i = V_K^T. At K = min(kh*kw, n) the
factorization is exact (ND: depthwise-separable convs are the principal
components of a regular conv).
"""

from __future__ import annotations

import numpy as np

from .common import Decomposition, assemble, max_rank, per_channel_blocks, svd_flip


def network_decoupling(weight: np.ndarray, rank: int, group: int = 1) -> Decomposition:
    """Data-free depthwise decomposition of a conv weight.

    weight: W [n, c/G, kh, kw].
    rank: K >= 1; values above max_rank(W) are clamped (the fit is then exact).
    group: G of the original conv.
    Returns D [c*K, 1, kh, kw] and P [n, c*K/G, 1, 1] in W's dtype.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight, got shape {weight.shape}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = min(rank, max_rank(weight.shape, group))
    blocks = per_channel_blocks(weight.astype(np.float64), group)  # [G, c/G, n/G, kh*kw]
    u, s, vt = np.linalg.svd(blocks, full_matrices=False)
    u, vt = svd_flip(u[..., :k], vt[..., :k, :])
    p_blocks = u * s[..., None, :k]
    dec = assemble(p_blocks, vt, weight.shape[2:], group)
    return Decomposition(
        dec.depthwise.astype(weight.dtype), dec.pointwise.astype(weight.dtype), dec.rank, group
    )
