#!/usr/bin/env bash
# The test suite: unit and property tests, example smoke runs, and the docs built with -W.
set -euo pipefail
source "$(dirname "$0")/venv.sh" test,examples,docs
cd "$M3CO_ROOT"
python -m pytest -q "$@"
sphinx-build -W --keep-going -q -b html docs docs/_build/html
echo "tests and docs: OK"
