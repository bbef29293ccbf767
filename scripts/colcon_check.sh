#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Check that the package builds with colcon the way it would on a ROS 2 distro, using the PyPI ROS 2
# wheels of a venv as the underlay in place of /opt/ros/<distro>, and that the generated
# ego_ros.msg / .srv / .action import from colcon's install folder.
#
#   bash scripts/colcon_check.sh VENV      # VENV has requirements-ros.txt installed
#
# Builds in place (nothing is copied): build/colcon, build/colcon-install, build/colcon-log.
# Exits non-zero if the build or the import fails.
set -euo pipefail

die() { echo "colcon_check: error: $*" >&2; exit 1; }
step() { echo "colcon_check: $*"; }

[[ $# -eq 1 ]] || die "usage: $0 VENV"
venv=$(cd "$1" 2>/dev/null && pwd) || die "no such venv folder: $1"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -x $venv/bin/colcon ]] || die "$venv/bin/colcon not found: run '$venv/bin/pip install -r $repo/requirements-ros.txt'"

build_base=$repo/build/colcon
install_base=$repo/build/colcon-install

# colcon-ros warns that the venv has no local_setup.* files: harmless, the venv is the underlay as is.
SECONDS=0
step "colcon build of $repo (underlay: $venv)"
(
  cd "$repo"
  export AMENT_PREFIX_PATH=$venv CMAKE_PREFIX_PATH=$venv PATH=$venv/bin:$PATH
  colcon --log-base build/colcon-log build \
    --base-paths . \
    --build-base "$build_base" \
    --install-base "$install_base" \
    --event-handlers console_direct+ \
    --cmake-args -DPython3_EXECUTABLE="$venv/bin/python" -DBUILD_TESTING=OFF
) || die "colcon build failed (logs in $repo/build/colcon-log/latest_build)"
step "colcon build took ${SECONDS}s"

# A fresh shell, with no environment but the basics and the venv, sources colcon's install
# (colcon-core writes POSIX sh scripts; bash can source them). LD_LIBRARY_PATH is then set here in a
# fixed order, colcon's install first, and the wheels' bootstrap re-exec is switched off: it would
# rebuild LD_LIBRARY_PATH from a set and could put the venv's own copy of our libraries first.
step "importing the interfaces from $install_base"
env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin" TERM="${TERM:-dumb}" \
  VENV="$venv" INSTALL="$install_base" bash --noprofile --norc -c '
set -eu
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
set +u; . "$INSTALL/local_setup.sh"; set -u  # colcon'"'"'s scripts read unset variables
wheel_libs=$(ls -d "$VENV"/lib/python3.*/site-packages/ros_*.libs 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="$INSTALL/ego_ros/lib:$INSTALL/lib:$VENV/lib${wheel_libs:+:$wheel_libs}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
cd /
exec "$VENV/bin/python" - <<"EOF"
import os
import sys

install = os.environ["INSTALL"]
import ego_ros.action
import ego_ros.msg
import ego_ros.srv
from ego_ros.action import Answer
from ego_ros.msg import ConceptDetection, ConceptInfo, RecognitionEvent
from ego_ros.srv import Ask, ForgetConcept, ListConcepts, Recognize, RegisterConcept

# Load the C type support of each type (what rclpy does on create_publisher), build one of each,
# then say where everything came from.
for t in (ConceptInfo, ConceptDetection, RecognitionEvent, RegisterConcept, Ask, Recognize, ListConcepts,
          ForgetConcept, Answer):
    t.__class__.__import_type_support__()
    assert t._TYPE_SUPPORT is not None, t
for t in (ConceptInfo, RecognitionEvent, Ask.Request, Answer.Goal, ListConcepts.Response):
    t()
assert Ask.Request.SOURCE_VIDEO == 1
modules = [ego_ros.msg.__file__, ego_ros.srv.__file__, ego_ros.action.__file__]
with open("/proc/self/maps") as maps:
    libs = sorted({line.split()[-1] for line in maps if "ego_ros" in line and line.rstrip().endswith(".so")})
for path in modules + libs:
    print("colcon_check:   ", path)
if not libs:
    sys.exit("colcon_check: error: no ego_ros type support library was loaded")
outside = [p for p in modules + libs if not os.path.realpath(p).startswith(os.path.realpath(install) + os.sep)]
if outside:
    sys.exit(f"colcon_check: error: loaded from outside {install}: {outside}")
print("colcon_check: ok: ego_ros.msg, .srv and .action import from the colcon install")
EOF
' || die "the interfaces do not import from the colcon install"
