#!/usr/bin/env bash
# The test command: builds (or checks) the environment and the browser the frontend test drives,
# then runs the whole suite, including the tests against a real ComfyUI server and its web page.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
bash scripts/setup_browser.sh
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
exec "${FREESEG_VENV:-.venv}/bin/python" -m pytest "$@"
