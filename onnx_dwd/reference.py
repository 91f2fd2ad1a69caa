"""The original model's candidate outputs, computed in one pass and kept at the sampled positions.

Inter-layer compensation fits every level's convs against the original
model's outputs. Running the original level by level (a Lineage, as the
model being built is) kept its frontier on disk between levels: YOLOv8n with
1024 images wrote about 11 GB, and spent a pass per level. The statistics
need each output only at the positions sampled for its layer (about
position_budget x d per layer, whatever the number of images), so one pass
of the original records just those, one file per level, read back once when
that level is fitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence

import numpy as np

from .capture import Sampled


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one layer's arrays of one batch sit in its level's file (in write order)."""

    name: str
    y_dtype: np.dtype
    y_shape: tuple  # [B, P, n]; positions, when kept, are [B, P]
    sampled: bool


#: Positions are stored as int32: an output map has far fewer than 2**31 positions.
_POSITION_DTYPE = np.int32


class ReferenceOutputs:
    """Sampled outputs per batch, grouped by level; levels: the layer names of each level."""

    def __init__(self, workdir: Path, tag: str, levels: Sequence[Sequence[str]]):
        self.levels = [list(names) for names in levels]
        self.paths = [Path(workdir) / f"{tag}-level{index:03d}.bin" for index in range(len(levels))]
        self.layout: List[List[List[_Entry]]] = [[] for _ in levels]  # level -> batch -> entries
        self.recorded = False

    @property
    def batches(self) -> int:
        """Batches recorded so far."""
        return len(self.layout[0]) if self.layout else 0

    def record(self, batches: Iterable[Dict[str, Sampled]]) -> None:
        """Write every batch's sampled outputs (by layer name), each level's to its file. Once."""
        if self.recorded:
            raise RuntimeError("internal: ReferenceOutputs.record runs once")
        self.recorded = True
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(path, "wb")) for path in self.paths]
            for sampled in batches:
                for names, file, layout in zip(self.levels, files, self.layout):
                    entries = []
                    for name in names:
                        s = sampled[name]
                        np.ascontiguousarray(s.y).tofile(file)
                        if s.positions is not None:
                            s.positions.astype(_POSITION_DTYPE).tofile(file)
                        entries.append(_Entry(name, s.y.dtype, s.y.shape, s.positions is not None))
                    layout.append(entries)

    def replay(self, level: int) -> Iterator[Dict[str, Sampled]]:
        """Yield level's sampled outputs batch by batch, in recorded order; the file is
        deleted once read to the end (each level is fitted once)."""
        with open(self.paths[level], "rb") as file:
            for entries in self.layout[level]:
                batch = {}
                for e in entries:
                    y = np.fromfile(file, e.y_dtype, int(np.prod(e.y_shape))).reshape(e.y_shape)
                    positions = None
                    if e.sampled:
                        positions = np.fromfile(file, _POSITION_DTYPE, y.shape[0] * y.shape[1]).reshape(y.shape[:2])
                    batch[e.name] = Sampled(y, positions)
                yield batch
        self.paths[level].unlink()
