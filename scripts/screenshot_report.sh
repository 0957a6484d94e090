#!/usr/bin/env bash
# Screenshot a report.html with headless Chromium, to check how the page reads.
#
#   scripts/screenshot_report.sh results/report.html report.png [WIDTH] [HEIGHT]
#
# Chromium runs with a throwaway profile and every background network feature off: the
# page is self-contained, so nothing needs to be fetched. Debian: apt-get install chromium.
set -euo pipefail

report=${1:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTH] [HEIGHT]}
screenshot=${2:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTH] [HEIGHT]}
width=${3:-1280}
height=${4:-5200}

browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "no Chromium found: install it (Debian: apt-get install chromium)" >&2
    exit 2
fi
if [[ ! -f "$report" ]]; then
    echo "$report: no such report" >&2
    exit 2
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --no-first-run --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$width,$height" \
    --screenshot="$(realpath -m "$screenshot")" "file://$(realpath "$report")" 2>/dev/null
echo "wrote $screenshot (${width}x${height})"
