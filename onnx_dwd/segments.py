"""Run a model step by step over calibration data, each node once.

Inter-layer compensation fits the candidate convs level by level
(capture.dependency_levels): each level needs its convs' inputs in the model
whose lower levels are already replaced. Running that model from its graph
inputs at every level costs one prefix pass per level (30 levels on YOLOv8n:
half of a calibrated run). A Lineage instead keeps, per calibration batch, the
tensors that the nodes not run yet will need (its frontier) in files, and each
step runs only the nodes that no earlier step ran.

That is exact because a node run in an earlier step never changes later: the
nodes replaced after a level are that level's candidates, which are not
upstream of their own or lower levels' inputs, so no step had run them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set

import numpy as np
import onnx

from .runtimes import make_session, run_batches
from .spill import FileWriter, RawArray

Feeds = Callable[[], Iterable[Dict[str, np.ndarray]]]


def _subgraph_names(node: onnx.NodeProto) -> List[str]:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read: a superset of what
    they take from the outer scope."""
    names = []
    for attr in node.attribute:
        for g in list(attr.g.node and [attr.g]) + list(attr.graphs):
            for n in g.node:
                names.extend(n.input)
                names.extend(_subgraph_names(n))
    return names


def _reads(node: onnx.NodeProto) -> List[str]:
    return [t for t in list(node.input) + _subgraph_names(node) if t]


@dataclasses.dataclass
class Segment:
    """The nodes (indices into graph.node, in graph order) that compute some targets from
    already computed tensors; inputs: the computed tensors they read."""

    nodes: List[int]
    inputs: List[str]
    produced: Set[str]


def plan_segment(graph: onnx.GraphProto, frontier: Set[str], computed: Set[str],
                 targets: Sequence[str]) -> Segment:
    """The nodes not run yet that targets need. frontier: computed tensors still kept;
    computed: every tensor computed so far (a needed one outside the frontier is a bug)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    constants = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
    needed: Set[int] = set()
    inputs: Dict[str, None] = {}
    stack, seen = list(targets), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in frontier:
            inputs[name] = None
        elif name in computed:
            raise RuntimeError(f"internal: tensor {name!r} was computed but not kept for later steps")
        elif name in producer:
            index = producer[name]
            if index not in needed:
                needed.add(index)
                stack.extend(_reads(graph.node[index]))
        elif name not in constants:
            # an outer-scope name of a subgraph that the subgraph defines itself
            continue
    nodes = sorted(needed)
    produced = {o for i in nodes for o in graph.node[i].output if o}
    return Segment(nodes, [n for n in inputs if n not in produced], produced)


def frontier_after(graph: onnx.GraphProto, computed: Set[str]) -> List[str]:
    """The computed tensors that a node not run yet reads: what later steps need."""
    keep: Dict[str, None] = {}
    for node in graph.node:
        if all(o in computed for o in node.output if o):
            continue
        for name in _reads(node):
            if name in computed:
                keep[name] = None
    return list(keep)


def segment_model(model: onnx.ModelProto, segment: Segment, outputs: Sequence[str],
                  input_types: Dict[str, int]) -> onnx.ModelProto:
    """A model of segment's nodes: its inputs (typed, shapes left open) in, outputs out."""
    graph = model.graph
    nodes = [graph.node[i] for i in segment.nodes]
    used = {t for n in nodes for t in _reads(n)}
    sub = onnx.helper.make_graph(
        nodes, f"{graph.name}_segment",
        [onnx.helper.make_tensor_value_info(n, input_types[n], None) for n in segment.inputs],
        # onnxruntime infers the type of a bare-named output
        [onnx.ValueInfoProto(name=n) for n in outputs],
        initializer=[i for i in graph.initializer if i.name in used],
        sparse_initializer=[i for i in graph.sparse_initializer if i.values.name in used])
    result = onnx.ModelProto(ir_version=model.ir_version, graph=sub)
    result.opset_import.extend(model.opset_import)
    result.functions.extend(model.functions)
    return result


class Lineage:
    """One model's tensors over one stream of feeds, computed a step at a time.

    feeds: a re-iterable of feed dicts (the same batches in the same order on
    every call). Each step() may use a newer version of the model, as long as
    only nodes it has not run yet changed. Between steps the frontier is kept
    in workdir, one raw file per batch and tensor: a tensor is written once,
    when it joins the frontier, read only by the steps that need it, and its
    file deleted when it leaves (the owner of workdir deletes the rest), both
    in a writer thread beside onnxruntime. The graph inputs are not written:
    a step that needs them iterates the feeds again, in step with the files.
    Rewriting the whole frontier at every step cost more than running the
    nodes (YOLOv8n: 10 s of 55 s for 256 images).
    """

    def __init__(self, feeds: Feeds, workdir: Optional[Path] = None, tag: str = "lineage",
                 what: str = "model", threads: Optional[int] = None, spin: bool = True):
        self.feeds = feeds
        self.threads = threads  # onnxruntime's intra-op threads (None: its default)
        self.spin = spin  # make_session's
        self.workdir = Path(workdir) if workdir is not None else None
        self.tag = tag
        self.what = what
        self.steps = 0
        self.computed: Optional[Set[str]] = None  # None: nothing run yet, the frontier is the feeds
        self.frontier: List[str] = []
        self.types: Dict[str, int] = {}
        self.graph_inputs: Set[str] = set()  # what the feeds hold
        self.kept: List[Dict[str, RawArray]] = []  # per batch: the frontier tensors on disk
        self.saved = 0  # files written so far: each file's own number
        self.ended = False

    def step(self, model: onnx.ModelProto, targets: Sequence[str], keep: bool = True,
             joined: Optional[List[int]] = None) -> Iterator[Dict[str, np.ndarray]]:
        """Yield, per batch, the targets' values; run only nodes no earlier step ran.

        keep=False: the last step; nothing is saved for later steps. The
        generator must be run to the end for the lineage to advance.
        joined (the last step only): run consecutive batches together, joined[b]
        of them for the b-th run (concatenated along the first axis), and yield
        per run: the pieces of OneImageEach's batches made whole again.
        """
        if self.ended:
            raise RuntimeError("internal: the lineage's last step has run")
        if keep and self.workdir is None:
            raise RuntimeError("internal: a lineage that keeps its frontier needs a workdir")
        if keep and joined is not None:
            raise RuntimeError("internal: only a lineage's last step joins its batches")
        graph = model.graph
        first = self.computed is None
        if first:
            constants = {i.name for i in graph.initializer}
            inputs = [i for i in graph.input if i.name not in constants]
            self.computed = {i.name for i in inputs}
            self.frontier = [i.name for i in inputs]
            self.types = {i.name: i.type.tensor_type.elem_type for i in inputs}
            self.graph_inputs = set(self.types)
        targets = list(dict.fromkeys(targets))
        segment = plan_segment(graph, set(self.frontier), self.computed, targets)
        computed = self.computed | segment.produced
        frontier = frontier_after(graph, computed) if keep else []
        run = [n for n in dict.fromkeys(targets + frontier) if n in segment.produced]
        reads = list(dict.fromkeys(segment.inputs + [t for t in targets if t not in segment.produced]))
        # the feeds are never written: a later step reads them from the feeds again (a calibration
        # cache's compact pixels cost less to read and expand than a float copy costs to write)
        joining = [n for n in frontier if n not in self.graph_inputs and (first or n not in self.frontier)]
        session = None
        if run:
            session = make_session(segment_model(model, segment, run, self.types), threads=self.threads,
                                   what=self.what, spin=self.spin)
        types = {}
        writer = FileWriter()
        try:
            loaded = enumerate(self._load(reads))
            for index, values in loaded if joined is None else self._joined(loaded, joined, writer):
                if session is not None:
                    (outs,) = run_batches(session, [{n: values[n] for n in segment.inputs}], run, what=self.what)
                    values.update(zip(run, outs))
                if joined is None:
                    if first:
                        self.kept.append({})
                    self._release(index, frontier, writer)
                    kept = self.kept[index]  # updated in place: a tensor still in the frontier stays on disk
                    for name in joining:
                        self.saved += 1
                        kept[name] = RawArray.of(values[name],
                                                 self.workdir / f"{self.tag}-{index:06d}-{self.saved:08d}.bin")
                        writer.submit(kept[name].write, values[name])
                if not types:
                    types = {n: onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype) for n in run}
                yield {t: values[t] for t in targets}
            writer.wait()  # every file of this step written before a later step reads it
        finally:
            writer.close()
        self.computed, self.frontier = computed, frontier
        self.types.update(types)
        self.steps += 1
        self.ended = not keep

    def _release(self, index: int, frontier: Sequence[str], writer: FileWriter) -> None:
        """Delete batch index's files of the kept tensors that are not in frontier."""
        kept = self.kept[index]
        for name in [n for n in kept if n not in frontier]:
            writer.submit(kept.pop(name).path.unlink)

    def _joined(self, loaded: Iterable, counts: List[int], writer: FileWriter) -> Iterator:
        """(run index, values) of loaded's (index, values) joined counts[b] at a time for run b;
        each batch's kept files go as it is read (the step that joins is the last)."""
        pending: List[Dict[str, np.ndarray]] = []
        runs = 0
        for index, values in loaded:
            if index < len(self.kept):
                self._release(index, [], writer)
            if runs >= len(counts) or counts[runs] < 1:
                raise RuntimeError(f"internal: {self.what}: no piece count for joined run {runs + 1}")
            pending.append(values)
            if len(pending) < counts[runs]:
                continue
            yield runs, pending[0] if len(pending) == 1 else {
                name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
            pending = []
            runs += 1
        if pending:
            raise RuntimeError(f"internal: {self.what}: the last of {runs + 1} joined runs stopped short")

    def _load(self, names: Sequence[str]) -> Iterator[Dict[str, np.ndarray]]:
        if self.steps == 0:
            for feed in self.feeds():
                yield dict(feed)
            return
        from_feeds = [n for n in names if n in self.graph_inputs]
        feeds = iter(self.feeds()) if from_feeds else None
        for kept in self.kept:
            values = {name: kept[name].load() for name in names if name not in self.graph_inputs}
            if feeds is not None:
                feed = next(feeds, None)
                if feed is None:
                    raise RuntimeError(f"internal: {self.what}: the feeds gave fewer batches than the "
                                       f"lineage's first step ({len(self.kept)})")
                values.update((n, feed[n]) for n in from_feeds)
            yield values
        if feeds is not None and next(feeds, None) is not None:
            raise RuntimeError(f"internal: {self.what}: the feeds gave more batches than the "
                               f"lineage's first step ({len(self.kept)})")
