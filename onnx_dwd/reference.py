"""The original model's candidate outputs, computed in one pass and kept at the sampled positions.

Inter-layer compensation fits every level's convs against the original
model's outputs. Running the original level by level (a Lineage, as the
model being built is) kept its frontier on disk between levels: YOLOv8n with
1024 images wrote about 11 GB, and spent a pass per level. The statistics
need each output only at the positions sampled for its layer (about
position_budget x d per layer, whatever the number of images), so one pass
of the original records just those, one file per layer.

A file per layer (not per level) lets one recording serve any grouping of
the layers: the budgeted choice (selection.py) records once and each of its
calibrated rounds, which decompose different subsets in different levels,
replays it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence

import numpy as np

from .capture import Sampled


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One batch's arrays in a layer's file (in write order)."""

    y_dtype: np.dtype
    y_shape: tuple  # [B, P, n]; positions, when kept, are [B, P]
    sampled: bool


#: Positions are stored as int32: an output map has far fewer than 2**31 positions.
_POSITION_DTYPE = np.int32


class ReferenceOutputs:
    """Sampled outputs per batch of the named layers, one file each."""

    def __init__(self, workdir: Path, tag: str, names: Sequence[str]):
        self.paths = {name: Path(workdir) / f"{tag}-{index:03d}.bin" for index, name in enumerate(names)}
        self.layout: Dict[str, List[_Entry]] = {name: [] for name in names}  # name -> batch -> entry
        self.recorded = False

    @property
    def batches(self) -> int:
        """Batches recorded so far."""
        return len(next(iter(self.layout.values()), []))

    @contextlib.contextmanager
    def recording(self) -> Iterator[Callable[[Dict[str, Sampled]], None]]:
        """A function that writes one batch's sampled outputs (by layer name). Once per store.

        Each write opens the layers' files in turn and closes them again: a model with
        hundreds of candidates would otherwise hold a file open per layer, past the
        256 open files macOS allows by default."""
        if self.recorded:
            raise RuntimeError("internal: a ReferenceOutputs is recorded once")
        self.recorded = True
        for path in self.paths.values():
            path.write_bytes(b"")

        def write(sampled: Dict[str, Sampled]) -> None:
            entries = {}
            for name, path in self.paths.items():
                s = sampled[name]
                with open(path, "ab") as file:
                    np.ascontiguousarray(s.y).tofile(file)
                    if s.positions is not None:
                        s.positions.astype(_POSITION_DTYPE).tofile(file)
                entries[name] = _Entry(s.y.dtype, s.y.shape, s.positions is not None)
            for name, entry in entries.items():  # only a batch written whole counts
                self.layout[name].append(entry)

        yield write

    def record(self, batches: Iterable[Dict[str, Sampled]]) -> None:
        """Write every batch of batches (see recording)."""
        with self.recording() as write:
            for sampled in batches:
                write(sampled)

    def replay(self, names: Sequence[str], delete: bool = True) -> Iterator[Dict[str, Sampled]]:
        """Yield the named layers' sampled outputs batch by batch, in recorded order. With
        delete, each file goes once read to the end (a layer fitted once); without, the
        store can be replayed again. Files are opened a batch at a time, as they are written:
        the held-out errors replay a dozen layers or more at once."""
        offsets = {name: 0 for name in names}
        for index in range(self.batches):
            batch = {}
            for name in names:
                e = self.layout[name][index]
                with open(self.paths[name], "rb") as file:
                    file.seek(offsets[name])
                    y = np.fromfile(file, e.y_dtype, int(np.prod(e.y_shape))).reshape(e.y_shape)
                    positions = None
                    if e.sampled:
                        positions = np.fromfile(file, _POSITION_DTYPE, y.shape[0] * y.shape[1]).reshape(y.shape[:2])
                    offsets[name] = file.tell()
                batch[name] = Sampled(y, positions)
            yield batch
        if delete:
            for name in names:
                self.paths[name].unlink()
