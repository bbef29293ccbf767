#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The pip step on a ROS 2 distro (Ubuntu 24.04 + Jazzy, ...): a venv that sees the distro's packages (rclpy, the
# messages, apt's numpy 1.x) and adds only what rosdep cannot install (torch, transformers, ...: requirements.txt),
# without replacing the distro's numpy (constraints-distro.txt). PEP 668 forbids pip in the system Python; this
# never touches it.
#
#   bash scripts/distro_venv.sh VENV             # create VENV (python3 -m venv --system-site-packages) and install
#   bash scripts/distro_venv.sh VENV --dry-run   # resolve only: print what pip would install
#
# torch: one already in VENV (or the system) is kept, so a GPU user installs the CUDA build of their choice first;
# otherwise torch==2.13.0 is added. $EGO_ROS_PYTHON picks the Python (default: python3, the distro's).
# Exits non-zero if VENV does not see the system's packages, or if the install would change the distro's numpy.
set -euo pipefail

die() { echo "distro_venv: error: $*" >&2; exit 1; }
step() { echo "distro_venv: $*"; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 VENV [--dry-run]"
venv=$1
dry_run=${2:-}
[[ -z $dry_run || $dry_run == --dry-run ]] || die "unknown option $dry_run (usage: $0 VENV [--dry-run])"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${EGO_ROS_PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if [[ ! -x $venv/bin/python ]]; then
  step "creating $venv with $python -m venv --system-site-packages"
  "$python" -m venv --system-site-packages "$venv"
  touch "$venv/COLCON_IGNORE"  # a venv inside a workspace is not a package
fi
grep -Eq '^include-system-site-packages *= *true' "$venv/pyvenv.cfg" \
  || die "$venv does not see the system's packages (rclpy, numpy): recreate it with $python -m venv --system-site-packages"

numpy_before=$("$venv/bin/python" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo none)
step "numpy seen by $venv: $numpy_before"
extra=()
"$venv/bin/python" -c 'import torch' 2>/dev/null || extra+=(torch==2.13.0)

requirements=$repo/requirements.txt
if "$venv/bin/python" -c 'import cv2' 2>/dev/null; then
  # The distro's OpenCV (python3-opencv, what cv_bridge is built with) stays: a second cv2 from PyPI would shadow it.
  step "keeping the distro's OpenCV ($("$venv/bin/python" -c 'import cv2; print(cv2.__version__)')): opencv-python-headless is not installed"
  requirements=$scratch/requirements.txt
  grep -v '^opencv-python' "$repo/requirements.txt" > "$requirements"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -r "$requirements"
     -c "$repo/constraints-distro.txt" "${extra[@]}")
if [[ -n $dry_run ]]; then
  report=$scratch/report.json
  "${pip[@]}" --quiet --dry-run --report "$report"
  "$venv/bin/python" - "$report" <<'EOF'
import json
import sys

install = json.load(open(sys.argv[1]))["install"]
for item in sorted(install, key=lambda i: i["metadata"]["name"].lower()):
    print(f"distro_venv: would install {item['metadata']['name']}=={item['metadata']['version']}")
if any(item["metadata"]["name"].lower() == "numpy" for item in install):
    sys.exit("distro_venv: error: the install would replace the distro's numpy")
EOF
  step "ok (dry run): the distro's numpy ($numpy_before) stays"
  exit 0
fi

"${pip[@]}"
numpy_after=$("$venv/bin/python" -c 'import numpy; print(numpy.__version__)')
[[ $numpy_before == none || $numpy_after == "$numpy_before" ]] \
  || die "numpy changed from $numpy_before to $numpy_after: the distro's ROS message modules are built against $numpy_before"
step "ready: source /opt/ros/<distro>/setup.bash, then source $venv/bin/activate, then colcon build"
