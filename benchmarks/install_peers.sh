#!/usr/bin/env bash
# Install the peer libraries that benchmarks/bench_peers.py compares, at the versions pinned in
# pyproject.toml's "peers" extra, into the Python given as $PYTHON (default: python3 on PATH).
#
# `pip install "m3co-loss[peers]"` would resolve their requirements: open-clip-torch and lightly
# ask for torchvision (and lightly for pytorch_lightning), which pulls another torch, several GB
# of CUDA wheels where the installed torch is a CPU build. So the pinned packages go in with
# --no-deps, followed by the small dependencies that their loss code imports: numpy, scikit-learn
# and tqdm (pytorch-metric-learning) and triton (Inf-CL, Linux x86-64; CUDA torch wheels bring
# it). The installed torch is held at its version throughout. bench_peers.py loads open_clip's
# and lightly's loss modules from the installed files when their packages fail to import
# without torchvision, and says so in its results.
#
# Usage: bash benchmarks/install_peers.sh [--print]   (--print: show the pip commands only)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PRINT=0
case "${1:-}" in
  --print) PRINT=1 ;;
  "") ;;
  *) echo "usage: $0 [--print]" >&2; exit 2 ;;
esac

# The pins, read from the "peers" extra of pyproject.toml (one source of truth).
mapfile -t PINS < <("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import re
import sys

text = open(sys.argv[1]).read()
match = re.search(r"^peers\s*=\s*\[(.*?)\]", text, flags=re.M | re.S)
if not match:
    sys.exit("pyproject.toml has no peers extra")
for pin in re.findall(r'"([^"]+)"', match.group(1)):
    print(pin)
EOF
)
DEPS=(numpy scikit-learn tqdm)
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  DEPS+=(triton)
fi

run() {
  if [ "$PRINT" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

TORCH=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ -z "$TORCH" ]; then
  echo "install torch first (scripts/venv.sh does): the peers are installed without their dependencies" >&2
  [ "$PRINT" = 1 ] || exit 1
  TORCH=installed
fi
run "$PY" -m pip install -q --disable-pip-version-check --no-deps "${PINS[@]}"
# torch==<installed> keeps pip from replacing the installed torch while it resolves these
run "$PY" -m pip install -q --disable-pip-version-check "${DEPS[@]}" "torch==${TORCH}"
