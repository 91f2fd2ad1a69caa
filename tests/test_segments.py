"""Lineage: a model run step by step, each node once, equals running it whole."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from onnx_dwd.segments import Lineage, frontier_after, plan_segment


def model_of(nodes, weights, shape=("N", 2, 6, 6)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 6, 6])],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def skip_model(rng, scale_b=1.0):
    """x -> a -> c1 -> relu -> r1 -> b -> c2; s = r1 + c2 + x -> c -> y: r1 and x are read late."""
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["c1"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "Wb"], ["c2"], name="b", pads=[1, 1, 1, 1]),
             helper.make_node("Sum", ["r1", "c2", "x"], ["s"], name="sum"),
             helper.make_node("Conv", ["s", "Wc"], ["y"], name="c", pads=[1, 1, 1, 1])]
    r = np.random.default_rng(0)
    return model_of(nodes, {"Wa": r.standard_normal((2, 2, 3, 3)), "Wb": scale_b * r.standard_normal((2, 2, 3, 3)),
                            "Wc": r.standard_normal((3, 2, 3, 3))})


def full(model, feed, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return dict(zip(names, run(m, feed)))


@pytest.fixture
def feeds(rng):
    return [{"x": rng.standard_normal((b, 2, 6, 6)).astype(np.float32)} for b in (2, 1, 3)]


def test_steps_equal_the_whole_model_and_keep_only_what_later_nodes_read(rng, feeds, tmp_path):
    model = skip_model(rng)
    lineage = Lineage(lambda: feeds, tmp_path, "t")
    first = list(lineage.step(model, ["c1"]))
    assert set(lineage.frontier) == {"x", "c1"}  # relu (not run) reads c1, sum reads x
    # one file per batch and kept tensor, but none for x: a graph input is read from the feeds again
    assert len(list(tmp_path.iterdir())) == len(feeds) and all(set(kept) == {"c1"} for kept in lineage.kept)
    second = list(lineage.step(model, ["c2", "x"]))
    assert set(lineage.frontier) == {"r1", "c2", "x"}
    assert len(list(tmp_path.iterdir())) == 2 * len(feeds)  # c1's files deleted, r1's and c2's written
    third = list(lineage.step(model, ["y"], keep=False))
    assert list(tmp_path.iterdir()) == []  # every file deleted once it left the frontier; the last step saves none
    for feed, a, b, c in zip(feeds, first, second, third):
        want = full(model, feed, ["c1", "c2", "y"])
        np.testing.assert_allclose(a["c1"], want["c1"], rtol=1e-5, atol=1e-5)
        # onnxruntime fuses differently across a step boundary: float32 rounding only
        np.testing.assert_allclose(b["c2"], want["c2"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(b["x"], feed["x"])  # a kept tensor is served as a target too
        np.testing.assert_allclose(c["y"], want["y"], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="last step"):
        next(lineage.step(model, ["y"]))


@pytest.mark.parametrize("steps", [1, 2])
def test_a_joined_last_step_runs_consecutive_batches_together(rng, tmp_path, steps):
    """joined: the last step runs joined[b] batches at a time (pieces of a batch made whole
    again), yields per run, and deletes every batch's kept files."""
    model = skip_model(rng)
    pieces = [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)} for _ in range(5)]
    lineage = Lineage(lambda: pieces, tmp_path, "t")
    if steps == 2:
        list(lineage.step(model, ["c1"]))
        assert list(tmp_path.iterdir())
    runs = list(lineage.step(model, ["y", "x"], keep=False, joined=[2, 3]))
    assert [len(r["y"]) for r in runs] == [2, 3]
    assert list(tmp_path.iterdir()) == []
    for run_values, batch in zip(runs, (pieces[:2], pieces[2:])):
        x = np.concatenate([p["x"] for p in batch])
        np.testing.assert_array_equal(run_values["x"], x)
        np.testing.assert_allclose(run_values["y"], full(model, {"x": x}, ["y"])["y"], rtol=1e-5, atol=1e-5)


def test_a_joined_step_that_keeps_its_frontier_or_stops_short_is_a_bug(rng, tmp_path):
    model = skip_model(rng)
    pieces = [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)} for _ in range(3)]
    with pytest.raises(RuntimeError, match="last step"):
        next(Lineage(lambda: pieces, tmp_path, "t").step(model, ["c1"], joined=[3]))
    with pytest.raises(RuntimeError, match="stopped short"):
        list(Lineage(lambda: pieces, tmp_path, "t").step(model, ["y"], keep=False, joined=[2, 2]))
    with pytest.raises(RuntimeError, match="no piece count for joined run 2"):
        list(Lineage(lambda: pieces, tmp_path, "t").step(model, ["y"], keep=False, joined=[2]))


@pytest.mark.parametrize("later", [1, 5])
def test_feeds_that_change_their_batch_count_between_steps_are_an_error(rng, tmp_path, later):
    """Later steps read the graph inputs from the feeds again, in step with the files."""
    model = skip_model(rng)
    batches = [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)} for _ in range(5)]
    calls = []

    def feeds():
        calls.append(None)
        return iter(batches if len(calls) == 1 else batches[:later] + batches[:later])

    lineage = Lineage(feeds, tmp_path, "t")
    list(lineage.step(model, ["c1"]))
    with pytest.raises(RuntimeError, match="fewer" if later == 1 else "more"):
        list(lineage.step(model, ["y"]))


def test_each_node_runs_in_exactly_one_step(rng):
    graph = skip_model(rng).graph
    frontier, computed, ran = {"x"}, {"x"}, []
    for targets in (["c1"], ["c2"], ["y"]):
        segment = plan_segment(graph, frontier, computed, targets)
        ran.append([graph.node[i].name for i in segment.nodes])
        computed |= segment.produced
        frontier = set(frontier_after(graph, computed))
    assert ran == [["a"], ["relu", "b"], ["sum", "c"]]
    assert frontier == set()  # nothing left to run reads anything


def test_nodes_not_run_yet_may_change_between_steps(rng, feeds, tmp_path):
    """What inter-layer compensation relies on: conv b replaced after step 1 counts in step 2."""
    before, after = skip_model(rng), skip_model(rng, scale_b=-3.0)
    lineage = Lineage(lambda: feeds, tmp_path, "t")
    list(lineage.step(before, ["r1"]))
    got = list(lineage.step(after, ["y"], keep=False))
    for feed, values in zip(feeds, got):
        want = full(after, feed, ["y"])["y"]
        np.testing.assert_allclose(values["y"], want, rtol=1e-5, atol=1e-5)
        assert np.abs(values["y"] - full(before, feed, ["y"])["y"]).max() > 1e-2


def test_a_needed_tensor_that_was_not_kept_is_a_bug_not_a_silent_rerun(rng):
    graph = skip_model(rng).graph
    with pytest.raises(RuntimeError, match="'r1' was computed but not kept"):
        plan_segment(graph, {"x"}, {"x", "c1", "r1"}, ["c2"])


def test_a_step_needs_a_workdir_to_keep_its_frontier(rng, feeds):
    with pytest.raises(RuntimeError, match="workdir"):
        next(Lineage(lambda: feeds).step(skip_model(rng), ["c1"]))


def test_a_failed_write_stops_the_step_with_its_error(rng, feeds, tmp_path):
    model = skip_model(rng)
    lineage = Lineage(lambda: feeds, tmp_path / "gone", "t")  # no such folder: the writer thread fails
    with pytest.raises(FileNotFoundError):
        list(lineage.step(model, ["c1"]))
    assert lineage.steps == 0  # the lineage did not advance past a step it could not keep
