#!/usr/bin/env bash
# The main job: train a small two-modality model on generated data with and without M3CoLoss.
set -euo pipefail
source "$(dirname "$0")/venv.sh" examples
cd "$M3CO_ROOT"
python examples/demo.py "$@"
