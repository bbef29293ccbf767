# SPDX-License-Identifier: Apache-2.0
"""pip metadata for the plain-venv path (``pip install -e .``); on a ROS 2 distro, colcon builds CMakeLists.txt.

The pip dependencies are pinned in requirements.txt and read from there, so there is one list to maintain.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="ego_ros",
    version="0.1.0",
    description="A personal visual memory for robots: training-free VLM personalisation (Ego) as a ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ego_ros", "ego_ros.*"]),
    package_data={"ego_ros.ros": ["tools.json"],  # the services as LLM tools (ego_ros/ros/tools.py)
                  "ego_ros.testing": ["presets/*.json"],  # real architectures for benchmarks (real_sizes.py)
                  "ego_ros.toy": ["model/*"],  # the committed toy model and its card (ego_ros/toy/__init__.py)
                  "ego_ros.web": ["static/*"]},  # the teleop page's HTML, CSS and JavaScript (ego-ros web)
    install_requires=requirements,
    entry_points={"console_scripts": ["ego-ros = ego_ros.cli:entry"]},
)
