#!/usr/bin/env bash
# The GPU check, one command on a fresh machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--quick] [--python PY [--wheels DIR]] [OUT_DIR]
#                                                               (OUT_DIR default: gpu_results)
#
# 1. setup:   a virtual environment (OUT_DIR/venv, or $M3CO_VENV; reused if it exists) with torch
#             for CUDA, the package with its test extra, matplotlib and the pinned peer libraries
#             (benchmarks/install_peers.sh);
# 2. tests:   the CUDA-marked tests, `pytest -m cuda`;
# 3. kernels: benchmarks/bench_kernels.py --device cuda, dense / tiled / triton / floor, m3co_pair
#             at D = 768 and N = 8192, 32768, 131072, in float32 then bfloat16, the tiled backend
#             with 4096 x 16384 tiles at N = 32768 (then multisoftclip_pair if time is left);
# 4. peers:   benchmarks/bench_peers.py --device cuda at D = 768, N = 1024 and 32768.
#
# Everything lands in OUT_DIR: one log per step, the benchmarks' JSON / Markdown / plots, and
# summary.md (each step's status and seconds, the machine, the tables; written as summary.md.partial
# and moved into place, its last line "Complete.", only when the check ends). Each step runs under
# `timeout` and the whole check within $M3CO_GPU_CHECK_SECONDS (default 480): time a step leaves
# unused passes to the next ones; a step that runs out is recorded as timed out, and the
# benchmarks keep every figure finished before (they write after each one): run the same command
# again with the same OUT_DIR to go on where it stopped (the venv is reused, figures are not redone).
#
# Assumed: this checkout, a Python >= 3.9 with venv ($PYTHON, default python3) and a pip index
# that holds torch wheels for CUDA: PyPI's Linux x86-64 torch wheels are CUDA builds, or a local
# mirror configured for pip (pip.conf / PIP_INDEX_URL). No other network access.
#   M3CO_TORCH_VERSION    torch version to install (default 2.13.0)
#   M3CO_TORCH_INDEX_URL  index for torch only, e.g. a CUDA wheel index (pip --index-url)
#   M3CO_VENV             virtual environment to create or reuse
#
# --python PY: use that Python's environment as it is (a machine image with torch for CUDA and
# Triton already in it, and no package index): nothing is installed, the package is imported
# from this checkout. --wheels DIR: install the wheels in DIR (the peer libraries, fetched
# elsewhere with `pip download --no-deps`) into OUT_DIR/site for this check only.
# --quick: one point only (N = 32768, D = 768) in the kernel and peer benchmarks.
# --only STEPS: run only these of tests, kernels, peers (comma-separated; setup always runs).
#
# --dry-run: no installs (they are printed) and no GPU: each step's CPU path on tiny sizes, with
# the Python that runs this script's environment ($PYTHON, default python3), to check the script.
# shellcheck disable=SC2317  # the step functions are called through `bash -c`
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0
QUICK=0
OUT=gpu_results
USE_PYTHON=
WHEELS=
ONLY=tests,kernels,peers
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --python|--wheels|--only)
      [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
      case "$1" in
        --python) USE_PYTHON=$2 ;;
        --wheels) WHEELS=$(cd "$2" && pwd) || exit 2 ;;
        --only) ONLY=$2 ;;
      esac
      shift ;;
    -h|--help) sed -n '2,39p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done
for step in ${ONLY//,/ }; do
  case "$step" in
    tests|kernels|peers) ;;
    *) echo "--only: unknown step $step (the steps are tests, kernels, peers)" >&2; exit 2 ;;
  esac
done
if [ -n "$WHEELS" ] && [ -z "$USE_PYTHON" ]; then
  echo "--wheels goes with --python (a created environment installs the peers from the index)" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TOTAL=${M3CO_GPU_CHECK_SECONDS:-480}
START=$(date +%s)
# the summary is written beside its place and moved there at the end: a run killed part-way leaves
# summary.md.partial, never a summary.md that looks complete (a previous run's is removed now)
FINAL_SUMMARY=$OUT/summary.md
SUMMARY=$FINAL_SUMMARY.partial
rm -f "$FINAL_SUMMARY"
STATUS=0
# the later steps' shares of the total: a step may use what they do not need
declare -A SHARE=([setup]=150 [tests]=60 [kernels]=130 [peers]=130)
# an environment used as it is installs nothing, and the CUDA tests compile many Triton kernels
[ -z "$USE_PYTHON" ] || SHARE=([setup]=10 [tests]=120 [kernels]=130 [peers]=130)
ORDER=(setup)
for step in tests kernels peers; do
  [[ ",$ONLY," == *",$step,"* ]] && ORDER+=("$step")
done

if [ "$DRY" = 1 ]; then
  VPY=$(command -v "${PYTHON:-python3}")
  VENV=
  DEVICE=cpu
elif [ -n "$USE_PYTHON" ]; then
  VPY=$(command -v "$USE_PYTHON") || { echo "--python: $USE_PYTHON not found" >&2; exit 2; }
  VENV=
  DEVICE=cuda
else
  VENV=${M3CO_VENV:-$OUT/venv}
  VPY=$VENV/bin/python
  DEVICE=cuda
fi

{
  echo "# GPU check $( [ "$DRY" = 1 ] && echo '(dry run: CPU, tiny sizes)')"
  echo
  echo "Started $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${TOTAL} s."
  echo
  echo '```'
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -5
  else
    echo "nvidia-smi: not found"
  fi
  echo '```'
  echo
  echo "| step | status | seconds | log |"
  echo "| --- | --- | ---: | --- |"
} > "$SUMMARY"

# run_step NAME COMMAND...: under `timeout`, its output in OUT/NAME.log, a row in the summary. The
# time left is shared between this step and the later ones in proportion to their shares.
run_step() {
  local name=$1 later=0 step
  local shares=0
  shift
  for step in "${ORDER[@]}"; do
    if [ "$step" = "$name" ]; then later=1; fi
    if [ "$later" = 1 ]; then shares=$((shares + SHARE[$step])); fi
  done
  local now left limit began rc status
  now=$(date +%s)
  left=$((TOTAL - (now - START)))
  limit=$((left * SHARE[$name] / shares))
  if [ "$limit" -lt 10 ]; then
    echo "| $name | not run: no time left | 0 | |" >> "$SUMMARY"
    STATUS=1
    return 1
  fi
  echo "== $name (up to ${limit} s)"
  began=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || STATUS=1
  echo "| $name | $status | $(( $(date +%s) - began )) | $name.log |" >> "$SUMMARY"
  echo "   $status"
  return "$rc"
}

setup() {
  set -e
  local pip=("$VPY" -m pip install -q --disable-pip-version-check)
  local torch_pin="torch==${M3CO_TORCH_VERSION:-2.13.0}"
  local index=()
  [ -z "${M3CO_TORCH_INDEX_URL:-}" ] || index=(--index-url "$M3CO_TORCH_INDEX_URL")
  if [ "$DRY" = 1 ]; then
    echo "would run: ${PYTHON:-python3} -m venv ${M3CO_VENV:-$OUT/venv}"
    echo "would run: ${pip[*]} $torch_pin ${index[*]}"
    echo "would run: ${pip[*]} -e ${ROOT}[test] matplotlib $torch_pin"
    PYTHON=$VPY bash "$ROOT/benchmarks/install_peers.sh" --print
    "$VPY" -c 'import torch, m3co_loss; print("torch", torch.__version__, "m3co_loss", m3co_loss.__version__)'
    return 0
  fi
  if [ -n "$USE_PYTHON" ]; then
    echo "using $VPY as it is"
    [ -z "$WHEELS" ] || "${pip[@]}" --no-index --no-deps --no-compile --target "$OUT/site" "$WHEELS"/*.whl
  else
    [ -x "$VPY" ] || "${PYTHON:-python3}" -m venv "$VENV"
    "${pip[@]}" "$torch_pin" "${index[@]}"
    # torch pinned again: nothing below may replace the CUDA build
    "${pip[@]}" -e "${ROOT}[test]" matplotlib "$torch_pin" "${index[@]/#--index-url/--extra-index-url}"
    PYTHON=$VPY bash "$ROOT/benchmarks/install_peers.sh"
  fi
  "$VPY" - <<'EOF'
import importlib.util
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
for name in ("triton", "numpy", "open_clip", "info_nce", "pytorch_metric_learning", "lightly", "inf_cl"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {spec.origin if spec else 'not found'}")
if not torch.cuda.is_available():
    raise SystemExit("torch.cuda.is_available() is False: install a CUDA build (M3CO_TORCH_INDEX_URL) on a machine with a GPU")
print(torch.cuda.get_device_name())
EOF
}

kernels() {
  local sizes=(8192 32768 131072)
  [ "$QUICK" = 0 ] || sizes=(32768)
  local run=(--n "${sizes[@]}" --d 768 --repeats 3 --timeout 120 --mem-budget-gb 100 --impl dense tiled triton floor)
  # dry run: each code path once (triton is recorded as skipped without a GPU)
  [ "$DRY" = 0 ] || run=(--n 64 --d 8 --repeats 1 --timeout 120 --impl tiled triton floor)
  local dtype
  # float32 at the default precision (IEEE unless torch allows TF32); bfloat16 with the Triton
  # products on bfloat16 tensor cores (float32 accumulation)
  local dtype precision
  for dtype in float32 bfloat16; do
    precision=auto
    [ "$dtype" = bfloat16 ] && precision=bf16
    "$VPY" "$ROOT/benchmarks/bench_kernels.py" --device "$DEVICE" --dtype "$dtype" --precision "$precision" --loss m3co_pair \
      "${run[@]}" --out-dir "$OUT" || return
  done
  # the tiled backend with tiles sized for a GPU rather than for a CPU's cache (bfloat16 inputs)
  local tiles=(--impl tiled --n 32768 --d 768 --repeats 3 --timeout 120 --tile-rows 4096 --tile-cols 16384)
  [ "$DRY" = 0 ] || tiles=(--impl tiled --n 64 --d 8 --repeats 1 --timeout 120 --tile-rows 32 --tile-cols 16)
  "$VPY" "$ROOT/benchmarks/bench_kernels.py" --device "$DEVICE" --dtype bfloat16 --loss m3co_pair "${tiles[@]}" \
    --tag "kernels_${DEVICE}_bfloat16_tiles" --out-dir "$OUT" || return
  [ "$DRY" = 0 ] || return 0
  "$VPY" "$ROOT/benchmarks/bench_kernels.py" --device "$DEVICE" --loss multisoftclip_pair "${run[@]}" --out-dir "$OUT"
}

peers() {
  local sizes=(1024 32768)
  [ "$QUICK" = 0 ] || sizes=(32768)
  local run=(--n "${sizes[@]}" --d 768 --rounds 7 --min-rounds 3 --budget-seconds 20)
  [ "$DRY" = 0 ] || run=(--n 64 --d 8 --rounds 2 --min-rounds 1 --budget-seconds 20 --impl auto tiled open_clip inf_cl floor)
  "$VPY" "$ROOT/benchmarks/bench_peers.py" --device "$DEVICE" "${run[@]}" --out-dir "$OUT"
}

cd "$ROOT" || exit 1
export PYTHONPATH=$ROOT${WHEELS:+:$OUT/site}${PYTHONPATH:+:$PYTHONPATH}
# `timeout` runs programs, not shell functions: the steps run in `bash -c` with these exported
export ROOT OUT DRY QUICK DEVICE VPY VENV USE_PYTHON WHEELS
export -f setup kernels peers
if run_step setup bash -c setup; then
  for step in "${ORDER[@]:1}"; do
    case "$step" in
      # a test module that needs a package this environment lacks must not stop the CUDA tests
      tests) run_step tests "$VPY" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors -rs tests ;;
      *) run_step "$step" bash -c "$step" ;;
    esac
  done
else
  echo "| tests, kernels, peers | not run: setup failed | 0 | |" >> "$SUMMARY"
fi

{
  echo
  echo "Finished after $(( $(date +%s) - START )) s."
  if [ -f "$OUT/tests.log" ]; then
    echo
    echo "Tests: $(tail -n 1 "$OUT/tests.log")"
  fi
  for table in "$OUT"/kernels_*.md "$OUT"/peers_*.md; do
    [ -f "$table" ] || continue
    echo
    echo "---"
    echo
    sed 's/^# /## /' "$table"
  done
  echo
  echo "Complete."
} >> "$SUMMARY"
mv -f "$SUMMARY" "$FINAL_SUMMARY"
echo "summary: $FINAL_SUMMARY"
exit "$STATUS"
