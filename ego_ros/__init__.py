# SPDX-License-Identifier: Apache-2.0
"""ego_ros: a personal visual memory for robots (Ego, training-free VLM personalisation) as a ROS 2 node."""

# The generated interfaces (ego_ros.msg, .srv, .action) are installed by CMake into the environment's
# site-packages/ego_ros, while a source checkout on sys.path (tests, development) holds the rest of the package:
# extend_path joins every ego_ros folder on sys.path into one package, the first one found winning for each module.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
