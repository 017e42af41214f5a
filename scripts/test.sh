#!/usr/bin/env bash
# The test suite (unit and property tests, example smoke runs), the strict type check of the
# library, the pyflakes lint, and the docs built with -W.
set -euo pipefail
source "$(dirname "$0")/venv.sh" test,examples,docs
cd "$M3CO_ROOT"
python -m pytest -q "$@"
python -m mypy  # strict, on m3co_loss/ (pyproject.toml)
python -m ruff check -q --no-cache .  # pyflakes rules (pyproject.toml)
sphinx-build -W --keep-going -q -b html docs docs/_build/html
echo "tests, types, lint and docs: OK"
