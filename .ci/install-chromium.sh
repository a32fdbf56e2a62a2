#!/usr/bin/env bash
# Headless Chromium for tests/evaluate/test_report.py (renders reports/index.html). Debian's package.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update
  apt-get install -y --no-install-recommends chromium
fi
/usr/bin/chromium --version
