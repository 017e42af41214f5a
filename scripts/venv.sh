#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install the package with the given extras.
# torch is pinned and installed first: an unpinned torch (or a package asking for a newer one)
# pulls several GB of CUDA wheels on machines without the local CPU wheel (see DEVELOPERS.md).
# Usage: source scripts/venv.sh EXTRAS   (e.g. "examples" or "test,examples,docs")
# Environment: M3CO_TORCH_VERSION (default 2.13.0); M3CO_TORCH_INDEX_URL, an index to take torch from
# (CI: https://download.pytorch.org/whl/cpu, PyTorch's CPU-only wheels); PYTHON, the interpreter.
set -euo pipefail
M3CO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
M3CO_VENV=${M3CO_VENV:-$M3CO_ROOT/.venv}
if [ ! -x "$M3CO_VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$M3CO_VENV"
fi
"$M3CO_VENV/bin/python" -m pip install -q --disable-pip-version-check ${M3CO_TORCH_INDEX_URL:+--index-url "$M3CO_TORCH_INDEX_URL"} "torch==${M3CO_TORCH_VERSION:-2.13.0}"
"$M3CO_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$M3CO_ROOT[${1:-examples}]"
export PATH="$M3CO_VENV/bin:$PATH"
