#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Set everything up (scripts/setup.sh) and start the ego node with config/ego.yaml, as
# `ros2 launch ego_ros ego.launch.py` does on a ROS 2 distro. Ctrl-C stops it.
#
#   EGO_ROS_MODEL=/models/Qwen2.5-VL-7B-Instruct bash scripts/run.sh
#   bash scripts/run.sh --ros-args -p camera_topics:="['/head/image_raw']" -p recognition_rate_hz:=1.0
#
# Without EGO_ROS_MODEL it builds and serves a tiny random Qwen2.5-VL (real plumbing, gibberish answers), so that
# the node, its services and `ego-ros` can be tried on any machine, with no weights to download.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VENV:-$repo/.venv}
bash "$repo/scripts/setup.sh"

model=${EGO_ROS_MODEL:-}
if [[ -z $model ]]; then
  model=$repo/build/tiny-qwen2_5_vl
  [[ -f $model/config.json ]] || "$venv/bin/python" -m ego_ros.testing.tiny_model --arch qwen2_5_vl "$model"
  echo "run: EGO_ROS_MODEL is not set: serving the tiny random model $model (answers are gibberish)" >&2
fi
echo "run: starting the ego node; in another shell: ego-ros list, ego-ros register NAME --camera, ego-ros watch" >&2
exec "$venv/bin/ego-ros" node --params-file "$repo/config/ego.yaml" --model "$model" "$@"
