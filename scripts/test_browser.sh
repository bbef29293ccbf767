#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The browser the teleop page's tests drive (test/test_web.py): Debian's (or Ubuntu's) chromium, from the system's
# package manager. Playwright (requirements-test.txt) launches it by path; its own browser download is not used.
# Run by scripts/test.sh; safe to run again (nothing to do once chromium is on the PATH).
set -euo pipefail

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "test_browser: chromium is missing and there is no apt-get here: install chromium with your package" \
       "manager (test/test_web.py needs it)" >&2
  exit 1
fi
as_root=()
if [[ $(id -u) != 0 ]]; then
  as_root=(sudo)
fi
echo "test_browser: installing chromium (apt)" >&2
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
