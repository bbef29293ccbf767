#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k fidelity -x
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VENV:-$repo/.venv}
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
