# SPDX-License-Identifier: Apache-2.0
"""``python -m ego_ros.cli``: the ``ego-ros`` command."""

import sys

from ego_ros.cli import main

sys.exit(main())
