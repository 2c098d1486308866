#!/usr/bin/env bash
# Installs what the browser test (tests/server/test_workflows_browser.py) needs, idempotently:
#   - Debian's `chromium` package (/usr/bin/chromium), driven headless by Playwright;
#   - the `playwright` Python package in .venv (it only drives the system chromium: no browser is
#     ever downloaded by Playwright; PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD is set to be sure).
# Runs as root (apt-get) or with sudo available. A second run returns in about a second.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version

py="$here/.venv/bin/python"
if [ -x "$py" ] && ! "$py" -c "import playwright" >/dev/null 2>&1; then
  "$py" -m pip install --disable-pip-version-check -q -c "$here/scripts/torch-constraints.txt" "playwright>=1.50"
fi
[ -x "$py" ] && "$py" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))" || true
