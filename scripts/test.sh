#!/usr/bin/env bash
# The test command: builds (or checks) the environment and the browser the frontend test drives,
# then runs the suite in two legs:
#   1. the whole suite (tests/) on the pinned ComfyUI 0.3.75, in .venv/ (or on the tree
#      $FREESEG_COMFYUI_DIR in the environment $FREESEG_VENV, see scripts/setup_env.sh);
#   2. the server tests (tests/server, the workflows and the browser test included) on the newer
#      ComfyUI 0.33.0 with frontend 1.58.1, in its own environment .venv-comfy-0.33/. Its tree is
#      the unmodified tarball ../shared/comfyui/ComfyUI-0.33.0.tar.gz (beside the clone),
#      extracted once into .cache/ComfyUI-0.33.0/. Without the tarball this leg is skipped with a
#      message, except in CI (CI set, e.g. CI=true), where that is an error.
# Extra arguments go to pytest in both legs (leg 2 runs tests/server, or the test paths they name).
# The exit status is 0 only when both legs pass; the time of each leg (its environment check or
# build included) is printed at the end.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
newer="0.33.0"
newer_frontend="1.58.1"
newer_tarball="$here/../shared/comfyui/ComfyUI-$newer.tar.gz"
newer_tree="$here/.cache/ComfyUI-$newer"
newer_venv="$here/.venv-comfy-0.33"

t0=$(date +%s)
bash scripts/setup_env.sh
bash scripts/setup_browser.sh
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
status1=0
"${FREESEG_VENV:-.venv}/bin/python" -m pytest "$@" || status1=$?
leg1="leg 1 (ComfyUI ${FREESEG_COMFYUI_DIR:-0.3.75}): exit $status1 in $(( $(date +%s) - t0 )) s"
echo "$leg1"

# Leg 2 runs tests/server unless an argument names a test path (file, folder or file::test).
leg2_paths=(tests/server)
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then leg2_paths=(); break; fi
done

t0=$(date +%s)
status2=0
if [ ! -f "$newer_tarball" ]; then
  if [ -n "${CI:-}" ]; then
    echo "leg 2 (ComfyUI $newer): $newer_tarball is missing; CI needs it (it lives in shared/ beside the clone)" >&2
    status2=1
  else
    echo "leg 2 (ComfyUI $newer): SKIPPED, no $newer_tarball"
  fi
  leg2="leg 2 (ComfyUI $newer): not run, no tarball"
else
  if [ ! -f "$newer_tree/main.py" ]; then
    echo "extracting $newer_tarball into $newer_tree"
    rm -rf "$newer_tree" "$newer_tree.tmp"
    mkdir -p "$newer_tree.tmp"
    tar -xzf "$newer_tarball" -C "$newer_tree.tmp" --strip-components=1
    mv "$newer_tree.tmp" "$newer_tree"
  fi
  FREESEG_VENV="$newer_venv" FREESEG_COMFYUI_DIR="$newer_tree" FREESEG_FRONTEND="$newer_frontend" \
    bash scripts/setup_env.sh
  FREESEG_COMFYUI_DIR="$newer_tree" "$newer_venv/bin/python" -m pytest "${leg2_paths[@]}" "$@" || status2=$?
  if [ "$status2" = 5 ]; then
    echo "leg 2 (ComfyUI $newer): the arguments select no server test"
    status2=0
  fi
  leg2="leg 2 (ComfyUI $newer, frontend $newer_frontend): exit $status2 in $(( $(date +%s) - t0 )) s"
fi
echo "$leg1"
echo "$leg2"
[ "$status1" = 0 ] && [ "$status2" = 0 ]
