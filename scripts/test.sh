#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set everything up (scripts/setup.sh, the browser, scripts/setup_vllm.sh) and run the whole test suite. Extra
# arguments go to pytest.
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k fidelity -x
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VENV:-$repo/.venv}
bash "$repo/scripts/setup.sh"
bash "$repo/scripts/test_browser.sh"
bash "$repo/scripts/setup_vllm.sh"  # the vLLM server's own venv (test/test_vllm.py starts the server from it)
export EGO_ROS_REQUIRE_VLLM=1        # so that those tests fail, not skip, if it is missing
cd "$repo"
# The trained toy model that the quality tests measure the method on: the committed one (ego_ros/toy/model/, checked
# against the recipe by the tests), or $EGO_ROS_TOY_MODEL.
exec "$venv/bin/python" -m pytest "$@"
