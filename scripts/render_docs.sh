#!/usr/bin/env bash
# Render every page of the docs site to a PNG with headless Chromium, to look at the site as a reader does.
#   bash scripts/render_docs.sh [OUT_DIR]      (default: site-png/; needs `chromium` and the docs extra)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-site-png}
BROWSER=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n "$BROWSER" ]] || { echo "no Chromium found: apt-get install chromium (or set PATH)" >&2; exit 1; }
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -q -d "$SITE"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
find "$SITE" -name index.html ! -path "*/assets/*" | sort | while read -r page; do
  rel=${page#"$SITE"/}; name=${rel%/index.html}; name=${name%index.html}; name=${name//\//-}
  "$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${WIDTH:-1280},${HEIGHT:-2200}" \
    --screenshot="$OUT/${name:-home}.png" "file://$page" >/dev/null 2>&1
  echo "$OUT/${name:-home}.png"
done
