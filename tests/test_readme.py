"""The README's own commands: the two set-up lines, and every example block runs."""

import json
import re
import subprocess

import onnx
import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def first_commands():
    lines = [l.strip() for l in README.splitlines() if l.startswith("    ")][:2]
    return [l.split("#")[0].strip() for l in lines]


def example_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def bash(script, cwd):
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second():
    main, tests = first_commands()
    assert main == "bash tools/setup.sh && onnx-dwd demo"
    assert tests == "bash tools/setup.sh --test && python -m pytest -q"
    assert tests in (REPO / ".ci" / "run").read_text()


def test_main_job_runs_on_the_embedded_default(tmp_path):
    main = first_commands()[0].split("&&")[1].strip()
    result = bash(main, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rank per layer for max error 0.05" in result.stdout and "accuracy vs labels: 95.31%" in result.stdout
    report = json.loads((tmp_path / "fashion_mnist_dwd.report.json").read_text())
    model, validation = report["model"], report["model"]["validation"]
    assert report["config"]["method"] == "refit" and report["config"]["inter_layer"]
    assert validation["samples"] == 64  # every 5th of the 320 bundled images is held out
    # the default budget: the fastest plan within 5% output error on the held-out images
    assert model["selection"]["met"] and validation["outputs"]["logits"]["rel_error"] <= 0.05
    assert model["decomposed"] >= 1 and validation["accuracy_after"] >= 0.9
    assert {"before_ms", "after_ms", "speedup", "runtime", "threads"} <= set(model["latency"])
    for layer in report["layers"]:  # never a decomposed layer that the runtime runs slower
        assert layer["latency_after_ms"] <= layer["latency_before_ms"]
        assert (0 < layer["rel_error"] < 1) if layer["decomposed"] else "budget" in layer["reason"] or \
            "faster" in layer["reason"]
    onnx.checker.check_model(onnx.load(tmp_path / "fashion_mnist_dwd.onnx"))


@pytest.mark.parametrize("block", example_blocks(), ids=lambda b: b.splitlines()[0][:40])
def test_readme_examples_run(block, tmp_path):
    (tmp_path / "tools").symlink_to(REPO / "tools")
    result = bash(block, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for written in re.findall(r"(\S+\.onnx)\b(?!\")", block):
        if not written.startswith("$") and "real_models" not in written:
            onnx.checker.check_model(onnx.load(tmp_path / written))
