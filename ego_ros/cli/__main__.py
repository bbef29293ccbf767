# SPDX-License-Identifier: Apache-2.0
"""``python -m ego_ros.cli``: the ``ego-ros`` command."""

from ego_ros.cli import entry

entry()
