#!/usr/bin/env bash
# The test command: builds (or checks) the environment, then runs the whole suite, including
# the integration tests against a real ComfyUI server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
