"""Streaming second-order statistics of a conv's patches and outputs.

For every output position, x is the layer's input patch (im2col, with the
conv's padding, stride and dilation; for group G one patch per group of c/G
channels, laid out channel-major like W[o].ravel()) and y the output vector.
Everything the fits need is in these sums (float64), so they merge across
batches and memory does not grow with the number of images:

    sxx [G, d, d] = sum x x^T   per group, d = (c/G)*kh*kw
    syx [n, d]    = sum y x^T   (row o pairs with its group's patch)
    sx  [G, d], sy [n], syy = sum |y|^2, count

StatsBuffer gathers positions into blocks before they are added (a product
over few rows is slow); ResidualSums measures one fitted weight's error
directly, for data that is only scored, not fitted on.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np


#: Positions per partial sum in LayerStats.add.
CHUNK_ROWS = 4096

#: Products of at least this many multiply-adds are split by rows between the calling thread
#: and a helper: the deep layers' d x d products (d up to 2304) are most of a compensated
#: fit's statistics, and the fit holds BLAS to one thread. Below it the handover costs more
#: than it saves (d = 576 over 442 rows gained nothing).
SPLIT_MACS = 10**9


@functools.lru_cache(maxsize=None)
def _split_helper() -> Optional[ThreadPoolExecutor]:
    """The one helper thread of split products, made on first use (None on a single core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-dwd-products") if cores >= 2 else None


def _products(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(x^T x, y^T x) in the inputs' precision; a large one in two halves of rows, the second
    half in the helper thread (numpy's BLAS calls release the GIL). The halves are summed
    in a fixed order, so the result does not depend on timing."""
    rows, d = x.shape
    helper = _split_helper() if rows * d * d >= SPLIT_MACS and rows >= 2 else None
    if helper is None:
        return _products_unsplit(x, y)
    half = rows // 2
    second = helper.submit(_products_unsplit, x[half:], y[half:])
    xx, yx = _products_unsplit(x[:half], y[:half])
    xx2, yx2 = second.result()
    xx += xx2
    yx += yx2
    return xx, yx


def _products_unsplit(x, y):
    return x.T @ x, y.T @ x


def same_pads(in_size: int, kernel: int, stride: int, dilation: int, upper: bool):
    """(begin, end) padding of auto_pad SAME_UPPER / SAME_LOWER along one axis."""
    out = -(-in_size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - in_size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def conv_pads(in_hw: Sequence[int], kernel, strides, dilations, pads=None, auto_pad="NOTSET"):
    """Explicit (top, left, bottom, right) pads of an ONNX Conv."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        (t, b), (l, r) = (same_pads(in_hw[a], kernel[a], strides[a], dilations[a], auto_pad == "SAME_UPPER")
                          for a in (0, 1))
        return t, l, b, r
    if auto_pad == "VALID" or pads is None:
        return 0, 0, 0, 0
    return tuple(int(p) for p in pads)


def _windows(x, kernel, strides, dilations, pads) -> np.ndarray:
    """A view [B, c, H', W', kh, kw] of the conv's receptive fields (no copy but the padding)."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    t, l, b, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return windows[:, :, ::sh, ::sw, ::dh, ::dw]


def im2col(x: np.ndarray, kernel, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0)) -> np.ndarray:
    """Patches of x [B, c, H, W] -> [B, H', W', c*kh*kw] (channel-major, like W[o].ravel())."""
    windows = _windows(x, kernel, strides, dilations, pads)
    bsz, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(bsz, ho, wo, c * kernel[0] * kernel[1])


def sampled_patches(x: np.ndarray, positions: np.ndarray, kernel, strides=(1, 1), dilations=(1, 1),
                    pads=(0, 0, 0, 0)) -> np.ndarray:
    """Patches at chosen output positions only: positions [B, P] (flat indices into H'*W') -> [B, P, c*kh*kw].

    Few positions: gathers the sampled receptive fields from x itself, reading
    zeros where they reach into the padding (padding all of x first cost more
    than the gather, a 160x160 map with 36 positions). Many: pads x and takes
    each patch by flat index.
    """
    bsz, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (t, l, b, r) = kernel, strides, dilations, pads
    wo = (w + l + r - (kw - 1) * dw - 1) // sw + 1
    rows, cols = np.divmod(positions, wo)
    hp, wp = h + t + b, w + l + r
    if positions.shape[1] * kh * kw >= hp * wp:
        # the patches outnumber the padded map's pixels (small maps, most positions sampled):
        # pad once and take each patch's pixels by flat index, per image in channel-major order
        # (YOLOv8n's 10x10 maps at 91 of 100 positions: 1.2 ms a batch, 6.6 ms the other way)
        flat = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r))).reshape(bsz, c, hp * wp)
        offsets = (np.arange(kh)[:, None] * dh * wp + np.arange(kw)[None, :] * dw).ravel()
        index = (rows * sh * wp + cols * sw)[:, :, None] + offsets  # [B, P, kh*kw]
        out = np.empty((bsz, positions.shape[1], c, kh * kw), x.dtype)
        for i in range(bsz):
            out[i] = flat[i][:, index[i]].transpose(1, 0, 2)
        return out.reshape(bsz, positions.shape[1], c * kh * kw)
    iy = rows[:, :, None] * sh - t + np.arange(kh) * dh  # [B, P, kh] input rows
    ix = cols[:, :, None] * sw - l + np.arange(kw) * dw  # [B, P, kw] input columns
    inside = ((iy >= 0) & (iy < h))[:, :, :, None] & ((ix >= 0) & (ix < w))[:, :, None, :]
    picked = x[np.arange(bsz)[:, None, None, None], :, np.clip(iy, 0, h - 1)[:, :, :, None],
               np.clip(ix, 0, w - 1)[:, :, None, :]]  # [B, P, kh, kw, c]: the sliced axis goes last
    picked[~inside] = 0  # exact zeros, as padding (not a product: inf * 0 is nan)
    return picked.transpose(0, 1, 4, 2, 3).reshape(bsz, positions.shape[1], c * kh * kw)


#: Rows of C_xx centred at a time in LayerStats.moments.
MOMENT_ROWS = 256


@dataclasses.dataclass
class LayerStats:
    """Sums over output positions; see the module docstring for shapes."""

    sxx: np.ndarray
    syx: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    syy: float = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, out_channels: int, patch_size: int, group: int = 1) -> "LayerStats":
        return cls(np.zeros((group, patch_size, patch_size)), np.zeros((out_channels, patch_size)),
                   np.zeros((group, patch_size)), np.zeros(out_channels))

    @property
    def group(self) -> int:
        return self.sxx.shape[0]

    def add(self, patches: np.ndarray, outputs: np.ndarray) -> None:
        """Accumulate patches [P, G*d] and outputs [P, n] of P positions (add_shared, one layer)."""
        add_shared([self], patches, [outputs])

    def merge(self, other: "LayerStats") -> "LayerStats":
        return LayerStats(self.sxx + other.sxx, self.syx + other.syx, self.sx + other.sx, self.sy + other.sy,
                          self.syy + other.syy, self.count + other.count)

    def group_view(self, k: int) -> "LayerStats":
        """The statistics of group k alone (G = 1)."""
        ng = self.sy.shape[0] // self.group
        rows = slice(k * ng, (k + 1) * ng)
        return LayerStats(self.sxx[k:k + 1], self.syx[rows], self.sx[k:k + 1], self.sy[rows], float("nan"),
                          self.count)

    def moments(self, k: int = 0):
        """Means and covariances of group k: (mu_x [d], mu_y [n/G], C_xx [d, d], C_yx [n/G, d])."""
        ng = self.sy.shape[0] // self.group
        rows = slice(k * ng, (k + 1) * ng)
        mx, my = self.sx[k] / self.count, self.sy[rows] / self.count
        cxx = self.sxx[k] / self.count
        # a few rows at a time: a whole d x d outer product beside C_xx was the fit's peak
        # (d = 2304: 42 MB more for a moment)
        for start in range(0, len(mx), MOMENT_ROWS):
            cxx[start:start + MOMENT_ROWS] -= np.outer(mx[start:start + MOMENT_ROWS], mx)
        cyx = self.syx[rows] / self.count - np.outer(my, mx)
        return mx, my, cxx, cyx


def add_shared(stats: Sequence[LayerStats], patches: np.ndarray, outputs: Sequence[np.ndarray]) -> None:
    """Accumulate patches [P, G*d] with each layer's outputs [P, n_i] into stats[i].

    Layers that read one tensor with one geometry at the same positions (the
    branches of a detection head) have the same patches: their x x^T is formed
    once, and their y x^T in one product. Products are formed in the inputs'
    precision (float32 from onnxruntime is about 2x faster than float64) over
    chunks of at most CHUNK_ROWS positions and summed into the float64 totals,
    which keeps the rounding error of each partial sum small.
    """
    g, d = stats[0].sx.shape
    if any(st.sx.shape != (g, d) for st in stats) or len(outputs) != len(stats):
        raise RuntimeError("internal: statistics that share patches need one patch size and one output each")
    widths = [st.sy.shape[0] // g for st in stats]  # outputs per group of each layer
    x_all = patches.reshape(-1, g, d)
    y_all = [y.reshape(len(x_all), -1) for y in outputs]
    for start in range(0, len(x_all), CHUNK_ROWS):
        x = x_all[start:start + CHUNK_ROWS]
        ys = [y[start:start + CHUNK_ROWS] for y in y_all]
        for k in range(g):
            xk = np.ascontiguousarray(x[:, k])
            yk = [y[:, k * w:(k + 1) * w] for y, w in zip(ys, widths)]
            xx, yx = _products(xk, yk[0] if len(yk) == 1 else np.concatenate(yk, axis=1))
            sx = xk.sum(axis=0, dtype=np.float64)
            row = 0
            for st, w in zip(stats, widths):
                st.sxx[k] += xx
                st.sx[k] += sx
                st.syx[k * w:(k + 1) * w] += yx[row:row + w]
                row += w
        for st, y in zip(stats, ys):
            st.sy += y.sum(axis=0, dtype=np.float64)
            st.syy += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
    for st in stats:
        st.count += len(x_all)


#: Output maps of at least this many positions per image get their statistics from shifted
#: products (add_shifted, through a MapBuffer) when every position is used. With forty 10x10
#: maps per call YOLOv8n's 256-channel layer took 0.24 s over 58 images against im2col's
#: 0.46 s; eight maps per call (one calibration batch, before MapBuffer) made the 10x10 maps
#: slower than im2col, and this bound was 256. Smaller maps (none in YOLOv8n at 320x320)
#: were not measured: their zero border is a growing share of the grid.
SHIFT_MIN_POSITIONS = 64


def shift_structured(kernel, strides, dilations, group: int, out_positions: int) -> bool:
    """Whether add_shifted computes a conv's statistics (and is worth it)."""
    return (tuple(strides) == (1, 1) and tuple(dilations) == (1, 1) and group == 1
            and kernel[0] * kernel[1] > 1 and out_positions >= SHIFT_MIN_POSITIONS)


def _in_pairs(tasks):
    """Run zero-argument tasks, every second one in the products' helper thread when there
    is one; results in task order (the sums do not depend on timing)."""
    helper = _split_helper()
    if helper is None or len(tasks) < 2:
        return [t() for t in tasks]
    futures = {i: helper.submit(t) for i, t in enumerate(tasks) if i % 2}
    results = [None if i % 2 else t() for i, t in enumerate(tasks)]
    for i, f in futures.items():
        results[i] = f.result()
    return results


def add_shifted(stats: Sequence[LayerStats], x: np.ndarray, outputs: Sequence[np.ndarray], kernel, pads) -> None:
    """add_shared for a stride-1, undilated, ungrouped conv at every output position, from x
    [B, c, H, W] itself: outputs[i] [B, H'*W', n_i] (row-major positions), pads (t, l, b, r).

    Block (p, q) of x x^T (kernel offsets p, q; c x c) sums x(u) x(u + q - p)^T over the
    inputs u that offset p reads. For stride 1 that is the correlation of the whole map at
    displacement q - p, less the rows and columns at the borders that offset p does not
    read. The correlations are single products over the map laid out flat, with enough
    zeros after each row and image that no displacement wraps onto another pixel: 13
    products of [B*Hg*Wg, c] for a 3x3 kernel where im2col's x x^T is one of [B*H'*W', 9c]
    (40.5 c^2 multiply-adds per position with the symmetric product, about 15 here, and
    the borders' corrections). y x^T per offset is a product with y on the same grid.
    """
    bsz, c, h, w = x.shape
    kh, kw = kernel
    t, l, b, r = pads
    ho, wo = h + t + b - kh + 1, w + l + r - kw + 1
    # the map at (t, l) in a zero grid with at least kh-1 / kw-1 zero rows / columns beside it
    hg, wg = h + max(t + b, kh - 1), w + max(l + r, kw - 1)
    grid = np.zeros((bsz, hg, wg, c), x.dtype)
    grid[:, t:t + h, l:l + w] = x.transpose(0, 2, 3, 1)
    flat = grid.reshape(-1, c)
    size = len(flat)
    offsets = [(py, px) for py in range(kh) for px in range(kw)]
    k = len(offsets)
    shifts = sorted({(qy - py, qx - px) for i, (py, px) in enumerate(offsets) for qy, qx in offsets[i:]})

    def correlation(dy, dx):
        o = dy * wg + dx
        return flat.T @ flat if o == 0 else flat[:size - o].T @ flat[o:]

    n_total = sum(y.shape[2] for y in outputs)
    ygrid = np.zeros((bsz, hg, wg, n_total), outputs[0].dtype)
    col = 0
    for y in outputs:
        ygrid[:, :ho, :wo, col:col + y.shape[2]] = y.reshape(bsz, ho, wo, y.shape[2])
        col += y.shape[2]
    yflat = ygrid.reshape(-1, n_total)

    def cross(py, px):
        o = py * wg + px
        return yflat[:size - o].T @ flat[o:]

    products = _in_pairs([functools.partial(correlation, *s) for s in shifts]
                         + [functools.partial(cross, *o) for o in offsets])
    corr = dict(zip(shifts, products))
    yx_by_offset = products[len(shifts):]

    def border(r0, r1, c0, c1, dy, dx):
        """sum of x(u) x(u + (dy, dx))^T over u in rows [r0, r1) x columns [c0, c1) of the grid
        whose partner is on the map too (elsewhere one of the two is zero)."""
        r0, r1 = max(r0, t - dy), min(r1, t + h - dy)
        c0, c1 = max(c0, l - dx), min(c1, l + w - dx)
        if r1 <= r0 or c1 <= c0:
            return None
        a = grid[:, r0:r1, c0:c1].reshape(-1, c)
        return a.T @ grid[:, r0 + dy:r1 + dy, c0 + dx:c1 + dx].reshape(-1, c)

    blocks = np.empty((k, k, c, c), x.dtype)  # block (p, q) contiguous, added into the sums in one pass
    for i, (py, px) in enumerate(offsets):
        # the map's rows and columns (grid coordinates) that offset p does not read
        rows = [(a, z) for a, z in ((t, min(py, t + h)), (max(py + ho, t), t + h)) if z > a]
        cols = [(a, z) for a, z in ((l, min(px, l + w)), (max(px + wo, l), l + w)) if z > a]
        # inclusion-exclusion: less the border rows, less the border columns, plus their corners
        boxes = [(False, rr + (l, l + w)) for rr in rows] + [(False, (t, t + h) + cc) for cc in cols] \
            + [(True, rr + cc) for rr in rows for cc in cols]
        for j in range(i, k):
            dy, dx = offsets[j][0] - py, offsets[j][1] - px
            block = blocks[i, j]
            block[...] = corr[dy, dx]
            for add, box in boxes:
                part = border(*box, dy, dx)
                if part is not None:
                    (np.add if add else np.subtract)(block, part, out=block)
            if j != i:
                blocks[j, i] = block.T
    xx = blocks.transpose(2, 0, 3, 1).reshape(c * k, c * k)  # [c, k, c, k]: channel-major like W[o]
    yx = np.stack(yx_by_offset, axis=2).reshape(n_total, c * k)  # [n, c, k]
    # window sums from the integral image of the map summed over the batch
    integral = np.zeros((hg + 1, wg + 1, c))
    integral[1:, 1:] = grid.sum(axis=0, dtype=np.float64).cumsum(axis=0).cumsum(axis=1)
    sx = np.stack([integral[py + ho, px + wo] - integral[py, px + wo] - integral[py + ho, px] + integral[py, px]
                   for py, px in offsets], axis=1).reshape(c * k)
    row = 0
    for st, y in zip(stats, outputs):
        st.sxx[0] += xx
        st.sx[0] += sx
        st.syx += yx[row:row + y.shape[2]]
        row += y.shape[2]
        y2 = y.reshape(-1, y.shape[2])
        st.sy += y2.sum(axis=0, dtype=np.float64)
        st.syy += float(np.einsum("ij,ij->", y2, y2, dtype=np.float64))
        st.count += bsz * ho * wo


class ResidualSums:
    """|Y - (W x + b)|^2 and |Y|^2 of one conv summed over positions: a fitted weight's
    error on data it was not fitted on. n*d per position, where LayerStats costs d^2 + n*d.

    weight: [n, c/G, kh, kw] (reconstructed or original); bias [n] or None.
    """

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray], group: int = 1):
        n = weight.shape[0]
        self.group = group
        # one [d, n/G] matrix per group, in float32 like the patches (sums in float64)
        self.maps = [m.T.astype(np.float32) for m in np.split(weight.reshape(n, -1), group)]
        self.bias = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32)
        self.err = 0.0
        self.syy = 0.0
        self.count = 0

    def add(self, patches: np.ndarray, outputs: np.ndarray) -> None:
        """patches [P, G*d], outputs [P, n] (as LayerStats.add)."""
        x = patches.reshape(len(patches), self.group, -1)
        ng = len(self.bias) // self.group
        for k, m in enumerate(self.maps):
            y = outputs[:, k * ng:(k + 1) * ng]
            r = y - (x[:, k] @ m + self.bias[k * ng:(k + 1) * ng])
            self.err += float(np.einsum("ij,ij->", r, r, dtype=np.float64))
            self.syy += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.count += len(patches)

    def relative_error(self) -> float:
        """|Y - (W x + b)| / |Y|, uncentred like relative_error()."""
        return float(np.sqrt(self.err / self.syy)) if self.syy > 0 else 0.0


#: Bytes of positions StatsBuffer gathers before adding them: a product over the few dozen
#: positions one image gives a sampled layer runs at half BLAS's speed or less, and adding
#: each d x d product into the float64 sums costs half as much again. A split product
#: wants thousands of rows (d = 2304, two threads: 94 GMAC/s over 885 rows, 155 over 3540;
#: one thread 72 and 86), so a deep layer's buffer holds up to 3540 positions (32 MB).
BUFFER_BYTES = 32 * 2**20


class StatsBuffer:
    """Positions on their way into LayerStats, added in blocks of `rows` (flush() adds the rest).

    stats: one LayerStats, or several whose layers share patches (add_shared).
    max_bytes: the buffer's size in float32 (at least 256 positions, at most CHUNK_ROWS).
    """

    def __init__(self, stats, max_bytes: Optional[int] = None):
        self.stats: List[LayerStats] = [stats] if isinstance(stats, LayerStats) else list(stats)
        # G*d patch values and every layer's n outputs per position
        width = self.stats[0].sx.size + sum(st.sy.size for st in self.stats)
        self.rows = int(np.clip((max_bytes or BUFFER_BYTES) // (4 * width), 256, CHUNK_ROWS))
        self.patches: Optional[np.ndarray] = None
        self.outputs: List[np.ndarray] = []
        self.used = 0

    def add(self, patches: np.ndarray, *outputs: np.ndarray) -> None:
        """patches [P, G*d] and each layer's outputs [P, n_i], in the order of stats."""
        if len(patches) >= self.rows:
            self.flush()
            add_shared(self.stats, patches, outputs)
            return
        if self.patches is None or self.patches.dtype != patches.dtype \
                or any(b.dtype != o.dtype for b, o in zip(self.outputs, outputs)):
            self.flush()
            self.patches = np.empty((self.rows, patches.shape[1]), patches.dtype)
            self.outputs = [np.empty((self.rows, o.shape[1]), o.dtype) for o in outputs]
        if self.used + len(patches) > self.rows:
            self.flush()
        self.patches[self.used:self.used + len(patches)] = patches
        for buffer, o in zip(self.outputs, outputs):
            buffer[self.used:self.used + len(patches)] = o
        self.used += len(patches)

    def flush(self) -> None:
        if self.used:
            add_shared(self.stats, self.patches[:self.used], [o[:self.used] for o in self.outputs])
            self.used = 0


class MapBuffer:
    """Whole input maps and outputs on their way into add_shifted, a few images per call
    (flush() adds the rest). A call's work beside its products is the same for one image as
    for forty (about 80 border products and an integral image for a 3x3 kernel), and one
    image's products are small: YOLOv8n's 10x10 map with 256 channels took 1.35 s over 58
    images one at a time, 0.24 s forty at a time, where im2col's buffered products took 0.46 s.

    stats: the LayerStats of the layers sharing the input (add_shared); kernel, pads as
    add_shifted. max_bytes: the buffer's size in float32 (at least one image), at most about
    CHUNK_ROWS grid rows per call.
    """

    def __init__(self, stats: Sequence[LayerStats], kernel, pads, max_bytes: Optional[int] = None):
        self.stats = list(stats)
        self.kernel, self.pads = tuple(kernel), tuple(pads)
        self.max_bytes = max_bytes or BUFFER_BYTES
        self.maps: Optional[np.ndarray] = None
        self.outputs: List[np.ndarray] = []
        self.used = 0

    def _images_per_call(self, x: np.ndarray, outputs: Sequence[np.ndarray]) -> int:
        (h, w), (t, l, b, r) = x.shape[2:], self.pads
        grid = (h + max(t + b, self.kernel[0] - 1)) * (w + max(l + r, self.kernel[1] - 1))
        per_image = 4 * (x[0].size + sum(o[0].size for o in outputs))
        return max(1, min(CHUNK_ROWS // grid, self.max_bytes // per_image))

    def add(self, x: np.ndarray, *outputs: np.ndarray) -> None:
        """x [B, c, H, W] and each layer's outputs [B, H'*W', n_i], in the order of stats."""
        if self.maps is None or self.maps.shape[1:] != x.shape[1:] or self.maps.dtype != x.dtype \
                or any(b.shape[1:] != o.shape[1:] or b.dtype != o.dtype for b, o in zip(self.outputs, outputs)):
            self.flush()
            images = self._images_per_call(x, outputs)
            self.maps = np.empty((images,) + x.shape[1:], x.dtype)
            self.outputs = [np.empty((images,) + o.shape[1:], o.dtype) for o in outputs]
        start = 0
        while start < len(x):
            take = min(len(self.maps) - self.used, len(x) - start)
            self.maps[self.used:self.used + take] = x[start:start + take]
            for buffer, o in zip(self.outputs, outputs):
                buffer[self.used:self.used + take] = o[start:start + take]
            self.used += take
            start += take
            if self.used == len(self.maps):
                self.flush()

    def flush(self) -> None:
        if self.used:
            add_shifted(self.stats, self.maps[:self.used], [o[:self.used] for o in self.outputs],
                        self.kernel, self.pads)
            self.used = 0


def relative_error(stats: LayerStats, weight: np.ndarray, bias: Optional[np.ndarray]) -> float:
    """|Y - (W x + b)| / |Y| over the positions summed in stats (uncentred, as the paper).

    weight: [n, c/G, kh, kw] (an original or a reconstructed weight); bias [n] or None.
    """
    g = stats.group
    n = weight.shape[0]
    ng = n // g
    b = np.zeros(n) if bias is None else bias.astype(np.float64)
    m = weight.reshape(n, -1).astype(np.float64)
    err = stats.syy
    for k in range(g):
        rows = slice(k * ng, (k + 1) * ng)
        mk, bk = m[rows], b[rows]
        err -= 2 * (np.einsum("ij,ij->", mk, stats.syx[rows]) + bk @ stats.sy[rows])
        err += np.einsum("ij,ij->", mk @ stats.sxx[k], mk) + 2 * bk @ (mk @ stats.sx[k]) + stats.count * bk @ bk
    return float(np.sqrt(max(err, 0.0) / stats.syy)) if stats.syy > 0 else 0.0


def decomposed_relative_error(stats: LayerStats, depthwise: np.ndarray, pointwise: np.ndarray, rank: int,
                              bias: Optional[np.ndarray]) -> float:
    """relative_error of the weight that depthwise D [c*K, 1, kh, kw] then pointwise P
    [n, c*K/G, 1, 1] compute, without forming it: W C W^T = P (D C D^T) P^T, where D is
    block diagonal (K rows of kh*kw per input channel), so the d x d statistics meet D at
    K d^2 multiply-adds where the weight's W C costs n d^2 (refit scores three variants
    per layer: 3 x 340 M multiply-adds for a 256 -> 64 channel 3x3 layer)."""
    g = stats.group
    n = pointwise.shape[0]
    ng = n // g
    ck, _, kh, kw = depthwise.shape
    k2, cg = kh * kw, ck // rank // g
    d_all = depthwise.reshape(g, cg, rank, k2).astype(np.float64)
    p_all = pointwise.reshape(n, cg * rank).astype(np.float64)
    b = np.zeros(n) if bias is None else bias.astype(np.float64)
    err = stats.syy
    for k in range(g):
        rows = slice(k * ng, (k + 1) * ng)
        dk, pk, bk = d_all[k], p_all[rows], b[rows]
        dc = dk @ stats.sxx[k].reshape(cg, k2, cg * k2)  # [c_g, K, d]: D C, one channel's rows at a time
        dcd = dc.reshape(cg * rank, cg, k2).transpose(1, 0, 2) @ dk.transpose(0, 2, 1)  # [c_g (j), c_g*K, K]
        dcd = dcd.transpose(1, 0, 2).reshape(cg * rank, cg * rank)  # D C D^T
        dyx = np.einsum("ira,oia->oir", dk, stats.syx[rows].reshape(ng, cg, k2)).reshape(ng, cg * rank)
        dx = (dk @ stats.sx[k].reshape(cg, k2, 1)).reshape(cg * rank)  # D mu-sums
        err -= 2 * (np.einsum("ij,ij->", pk, dyx) + bk @ stats.sy[rows])
        err += np.einsum("ij,ij->", pk @ dcd, pk) + 2 * bk @ (pk @ dx) + stats.count * bk @ bk
    return float(np.sqrt(max(err, 0.0) / stats.syy)) if stats.syy > 0 else 0.0
