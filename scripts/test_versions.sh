#!/usr/bin/env bash
# Measure the supported torch and Python versions: for each PYTHON:TORCH entry, a virtual environment of
# its own, that torch from the package index, the package (editable) with the extras of the test command
# (test, examples, docs) while a constraint holds torch at that version, then the test suite and the docs
# built with -W. Each entry's outcome (counts, the failing tests and their first error line, the docs
# build) is merged into scripts/test_versions.json; the floors in pyproject.toml are set from that file.
#
# Usage: bash scripts/test_versions.sh [PYTHON:TORCH[:CONSTRAINT,...] ...]   e.g. 3.11:2.1.0 3.13:2.15.0
#   with no argument, the matrix below. Entries run one after the other (each holds a torch of several GB).
#   CONSTRAINTs are extra pip constraints for that entry (e.g. 3.11:2.1.0:numpy<2).
# Environment:
#   M3CO_MATRIX_DIR       where the environments and logs go (default: .matrix/ in the checkout, git-ignored)
#   M3CO_MATRIX_KEEP=1    keep each environment after its run (default: removed once its entry is recorded)
#   M3CO_MATRIX_PYTEST    pytest arguments (default: -q, the whole suite)
#   M3CO_MATRIX_TIMEOUT   seconds allowed for one entry's test run (default 5400)
#   M3CO_MATRIX_RESULTS   the results file (default: scripts/test_versions.json)
#   M3CO_TORCH_INDEX_URL  index to take torch from (default: the configured one, i.e. PyPI; PyPI's Linux
#                         wheels pull CUDA libraries and run on the CPU; https://download.pytorch.org/whl/cpu
#                         has CPU-only builds)
# Interpreters are looked up as pythonX.Y on PATH, then under $PYENV_ROOT/versions/X.Y.*.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MATRIX_DIR=${M3CO_MATRIX_DIR:-$ROOT/.matrix}
RESULTS=${M3CO_MATRIX_RESULTS:-$ROOT/scripts/test_versions.json}
TIMEOUT=${M3CO_MATRIX_TIMEOUT:-5400}
read -r -a PYTEST_ARGS <<< "${M3CO_MATRIX_PYTEST:--q}"

# 2.1.0: the floor the package claimed before it was measured; 2.6.0 with Python 3.9: the oldest torch
# that the image-text examples' transformers accepts, and torch 2.8 is the last for Python 3.9; 2.13.0
# with Python 3.10 (torch 2.9 dropped 3.9): the floor pair; 2.15.0: the newest torch, with 3.11 and 3.13.
DEFAULT_MATRIX=(3.11:2.1.0 3.9:2.6.0 3.10:2.13.0 3.11:2.15.0 3.13:2.15.0)
ENTRIES=("$@")
[ ${#ENTRIES[@]} -gt 0 ] || ENTRIES=("${DEFAULT_MATRIX[@]}")

find_python() {
  local version=$1 candidate
  # a pyenv shim answers to every pythonX.Y name, so each candidate must run and be that version
  for candidate in "$(command -v "python$version" || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python; do
    if [ -x "$candidate" ] && "$candidate" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$version'" 2> /dev/null; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

mkdir -p "$MATRIX_DIR/logs"
for entry in "${ENTRIES[@]}"; do
  IFS=: read -r py torch_version constraints <<< "$entry"
  name="py$py-torch$torch_version"
  [ -z "$constraints" ] || name="$name-$(tr -c 'A-Za-z0-9.\n' _ <<< "$constraints")"
  venv="$MATRIX_DIR/$name" log="$MATRIX_DIR/logs/$name.log" junit="$MATRIX_DIR/logs/$name.xml"
  rm -f "$junit"
  echo "== $name (log: $log)"
  start=$(date +%s) stage=install docs_status=
  set +e  # a failing entry is recorded, and the next one runs
  (
    set -e
    interpreter=$(find_python "$py") || { echo "no Python $py found"; exit 3; }
    rm -rf "$venv"
    "$interpreter" -m venv "$venv"
    # The pin file replaces any configured constraint file: it holds torch at this entry's version
    # while the extras resolve (a package asking for a newer torch must fail, not replace it).
    { echo "torch==$torch_version"; [ -z "$constraints" ] || tr , '\n' <<< "$constraints"; } > "$venv/torch-pin.txt"
    export PIP_CONSTRAINT="$venv/torch-pin.txt" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
    index=()
    [ -z "${M3CO_TORCH_INDEX_URL:-}" ] || index=(--index-url "$M3CO_TORCH_INDEX_URL")
    "$venv/bin/python" -m pip install -q "${index[@]}" "torch==$torch_version"
    "$venv/bin/python" -m pip install -q -e "$ROOT[test,examples,docs]"
    "$venv/bin/python" -m pip list --format=freeze > "$MATRIX_DIR/logs/$name.freeze.txt"
  ) > "$log" 2>&1
  status=$?
  if [ "$status" -eq 0 ]; then
    stage=test
    # the pin also holds while the tests run pip (the packaging tests install the built package)
    # Left out: the test that compares pyproject.toml's floors with the results file, which checks
    # that file and the repository, not the versions (before the floors are set from a run, it fails).
    (cd "$ROOT" && PIP_CONSTRAINT="$venv/torch-pin.txt" timeout "$TIMEOUT" "$venv/bin/python" -m pytest -p no:cacheprovider --junitxml="$junit" \
      --deselect tests/packaging/test_release.py::test_declared_versions_were_measured "${PYTEST_ARGS[@]}") >> "$log" 2>&1
    status=$?
    (cd "$ROOT" && "$venv/bin/python" -m sphinx -W --keep-going -q -b html docs "$MATRIX_DIR/logs/$name-docs") >> "$log" 2>&1
    docs_status=$?
    rm -rf "$MATRIX_DIR/logs/$name-docs"
  fi
  set -e
  seconds=$(( $(date +%s) - start ))
  # the lock lets several runs of this script (on different entries) share the results file
  flock "$MATRIX_DIR/results.lock" python3 - "$RESULTS" "$name" "$py" "$torch_version" "$stage" "$status" "$seconds" "$junit" "$venv" "$log" "${PYTEST_ARGS[*]}" "$docs_status" "$constraints" <<'PY'
"""Merge one entry's outcome into the results file (written whole, then renamed)."""
import datetime, json, os, subprocess, sys, xml.etree.ElementTree as ET
results, name, py, torch_version, stage, status, seconds, junit, venv, log, pytest_args, docs_status, constraints = sys.argv[1:]
entry = {"python": py, "torch": torch_version, "stage": stage, "exit_status": int(status), "seconds": int(seconds),
         "date": datetime.date.today().isoformat(), "pytest_args": pytest_args}
if constraints:
    entry["constraints"] = constraints.split(",")
try:
    probe = "import sys, torch, numpy; print(sys.version.split()[0], torch.__version__, numpy.__version__)"
    found = subprocess.run([os.path.join(venv, "bin", "python"), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    entry.update(python_full=found[0], torch_full=found[1], numpy=found[2])
except (OSError, subprocess.CalledProcessError, IndexError):
    pass
if os.path.exists(junit):
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append({"test": test, "error": message[0][:300] if message else ""})
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").strip()[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    entry.update(counts=counts, failures=failures, skip_reasons=skips)
else:
    with open(log, errors="replace") as f:
        entry["log_tail"] = f.read().strip().splitlines()[-15:]
if docs_status:
    entry["docs"] = "passed" if docs_status == "0" else f"failed (exit status {docs_status})"
entry["outcome"] = "passed" if stage == "test" and int(status) == 0 else f"{stage} failed"
data = {}
if os.path.exists(results):
    with open(results) as f:
        data = json.load(f)
data.setdefault("entries", {})[name] = entry
data["entries"] = dict(sorted(data["entries"].items()))
tmp = results + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
os.replace(tmp, results)
print(f"   {entry['outcome']} in {seconds} s", entry.get("counts", ""))
PY
  [ "${M3CO_MATRIX_KEEP:-0}" = 1 ] || rm -rf "$venv"
done
