#!/usr/bin/env bash
# Build the docs and take headless-browser screenshots of some pages, in light and dark mode.
#
# Usage: bash scripts/screenshot_docs.sh OUT_DIR [PAGE ...]
#   PAGE: a page name without .html (default: index quickstart kernels medical api)
#   WIDTH, HEIGHT (environment): the browser window in pixels (default 1280 x 2000; a larger
#   HEIGHT shows more of a long page, WIDTH=420 the phone layout)
# Writes OUT_DIR/<page>-light.png and OUT_DIR/<page>-dark.png.
#
# Needs Debian's chromium (`apt-get install -y chromium`). Formulas need MathJax, which the
# published pages load from a CDN; for an offline browser this script installs MathJax 3 from
# the npm registry once into ~/.cache/m3co-docs (skipped, with a note, when npm is missing:
# formulas then show as LaTeX source). The pages are built into docs/_build/screenshots, apart
# from docs/_build/html, because they point at that local MathJax.
set -euo pipefail
out=${1:?usage: bash scripts/screenshot_docs.sh OUT_DIR [PAGE ...]}
shift
pages=("$@")
[ ${#pages[@]} -gt 0 ] || pages=(index quickstart kernels medical api)
width=${WIDTH:-1280}
height=${HEIGHT:-2000}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 1; }

source "$(dirname "$0")/venv.sh" docs
cd "$M3CO_ROOT"

cache=${XDG_CACHE_HOME:-$HOME/.cache}/m3co-docs
mathjax=$cache/mathjax/node_modules/mathjax/es5/tex-mml-chtml.js
if [ ! -f "$mathjax" ] && command -v npm > /dev/null; then
  npm install --silent --no-audit --no-fund --prefix "$cache/mathjax" mathjax@3 > /dev/null
fi
if [ -f "$mathjax" ]; then
  export M3CO_DOCS_MATHJAX="file://$mathjax"
else
  echo "note: npm not found, formulas will show as LaTeX source" >&2
fi

html=docs/_build/screenshots
# -E: a fresh build, so every page reflects the current conf.py and theme files
sphinx-build -E -W --keep-going -q -b html docs "$html"
mkdir -p "$out"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
for page in "${pages[@]}"; do
  [ -f "$html/$page.html" ] || { echo "no page $page.html in $html" >&2; exit 1; }
  for mode in light dark; do
    flags=()
    # furo follows the browser's prefers-color-scheme until the reader picks a theme
    [ "$mode" = dark ] && flags=(--force-dark-mode --blink-settings=preferredColorScheme=0)
    # a fresh profile per shot: no theme choice or cache carried over; the time budget lets MathJax finish
    rm -rf "${profile:?}"/*
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
      "${flags[@]}" --virtual-time-budget=10000 --window-size="$width,$height" \
      --screenshot="$out/$page-$mode.png" "file://$PWD/$html/$page.html" > /dev/null 2>&1
    echo "$out/$page-$mode.png"
  done
done
