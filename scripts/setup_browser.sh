#!/usr/bin/env bash
# Installs what the browser test (tests/server/test_workflows_browser.py) needs, idempotently:
# Debian's `chromium` package (/usr/bin/chromium), driven headless by Playwright (the `playwright`
# Python package comes with requirements-test.txt; it never downloads a browser of its own).
# Runs as root (apt-get) or with sudo available. A second run returns in about a second.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version 2>/dev/null  # the Debian wrapper prints a harmless /dev/shm test warning on stderr
