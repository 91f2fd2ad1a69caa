#!/usr/bin/env bash
# Install the real models and labelled data of ../shared/MODELS.md (see tools/install_models.py).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/install_models.py" "$@"
