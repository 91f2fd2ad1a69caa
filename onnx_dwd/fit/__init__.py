"""Pure numpy fits: a regular conv weight in, depthwise + pointwise weights out.

Nothing here sees ONNX or onnxruntime. Shapes (G = group, K = rank):

    W  [n, c/G, kh, kw]     the original weight
    D  [c*K, 1, kh, kw]     depthwise; output channel i*K + r reads input channel i
    P  [n, c*K/G, 1, 1]     pointwise, grouped like the original

so that for every group g and input channel i of that group,
``W[outputs of g, i] ~= P[outputs of g, iK:(i+1)K] @ D[iK:(i+1)K]``.
"""

from .common import Decomposition, max_rank, reconstruct_weight
from .nd import network_decoupling

__all__ = ["Decomposition", "max_rank", "reconstruct_weight", "network_decoupling"]
