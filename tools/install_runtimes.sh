#!/usr/bin/env bash
# Install the optional runtimes that `onnx-dwd bench --runtime` and the
# per-layer latency can use, from PyPI only (see ../shared/BACKENDS.md):
#   mnn       pip install MNN (converter included; its `mnnconvert` console
#             command is never run: it sends telemetry)
#   ncnn      pip install ncnn, and pnnx with --no-deps (plain `pip install pnnx`
#             pulls a 5 GB CUDA torch; onnx-dwd uses only its standalone binary)
#   openvino  pip install openvino
#   litert    pip install ai-edge-litert, and onnx2tf 2.x in its own virtual
#             environment ($ONNX_DWD_CACHE/onnx2tf-venv, default
#             ~/.cache/onnx-dwd/onnx2tf-venv): it pins exact versions of its
#             dependencies and declares a newer Python than 3.11 (where it works)
# Usage: bash tools/install_runtimes.sh [all | mnn ncnn openvino litert ...]
# The Python environment is $PYTHON (default python3); onnx2tf's is separate.
set -euo pipefail
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
ONNX2TF_VERSION=2.6.9
VENV="${ONNX_DWD_CACHE:-$HOME/.cache/onnx-dwd}/onnx2tf-venv"

want=("$@")
if [[ ${#want[@]} -eq 0 || "${want[0]}" == "all" ]]; then
    want=(mnn ncnn openvino litert)
fi
for rt in "${want[@]}"; do
    case "$rt" in
        mnn) "${PIP[@]}" "MNN>=3.0" ;;
        ncnn)
            "${PIP[@]}" "ncnn>=1.0.20240410"
            "${PIP[@]}" --no-deps pnnx ;;
        openvino) "${PIP[@]}" "openvino>=2024.0" ;;
        litert)
            "${PIP[@]}" "ai-edge-litert>=1.2"
            if [[ ! -x "$VENV/bin/onnx2tf" ]]; then
                # the venv's Python: onnx2tf 2.x wants >= 3.12 but works on 3.11 (--ignore-requires-python)
                "$PY" -m venv "$VENV"
                "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
                    --ignore-requires-python "onnx2tf==$ONNX2TF_VERSION"
            fi ;;
        *) echo "install_runtimes.sh: unknown runtime '$rt' (expected all, mnn, ncnn, openvino, litert)" >&2
           exit 2 ;;
    esac
    echo "installed $rt"
done
