# SPDX-License-Identifier: Apache-2.0
"""Start the ego node (a managed lifecycle node) with the shipped parameters and a few overrides.

Examples::

    ros2 launch ego_ros ego.launch.py model:=/models/Qwen2.5-VL-7B-Instruct
    ros2 launch ego_ros ego.launch.py camera_topics:=/front/image_raw,/arm/image_raw/compressed namespace:=robot1
    ros2 launch ego_ros ego.launch.py camera_topics:="['/front/image_raw']" params_file:=/etc/robot/ego.yaml
    ros2 launch ego_ros ego.launch.py autostart:=false     # stays unconfigured, for a lifecycle manager
    ros2 launch ego_ros ego.launch.py use_sim_time:=true log_level:=debug
    ros2 launch ego_ros ego.launch.py vllm_url:=http://gpu-server:8000   # answers from a vLLM server

Every argument left empty keeps the params file's value (share/ego_ros/config/ego.yaml unless params_file says
otherwise); ``autostart`` and ``use_sim_time`` are always passed (true and false by default), so the node
configures and activates itself on wall-clock time unless told otherwise. Relative camera topics (the shipped
file's ``camera/image_raw``) resolve in the node's namespace: ``namespace:=robot1`` makes it
``/robot1/camera/image_raw``. Where ``ros2 launch`` is not installed (the PyPI-wheel venv), ``ego-ros node`` runs the
same node with the same file.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument(
            "model", default_value="",
            description="the VLM: a local model folder, or a hub id already in the cache (empty: the params file's)"),
        DeclareLaunchArgument(
            "camera_topics", default_value="",
            description="image topics to buffer, comma-separated or a YAML list like ['/a', 'b/compressed'] "
                        "(relative names resolve in the node's namespace; a name ending in /compressed is a "
                        "CompressedImage; empty: the params file's)"),
        DeclareLaunchArgument(
            "memory_dir", default_value="",
            description="folder of the concept memories (empty: the params file's)"),
        DeclareLaunchArgument(
            "vllm_url", default_value="",
            description="answer and recognise on the vLLM server at this URL (generation vllm, memories as images; "
                        "docs/serving.md); empty: the params file's generation"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("ego_ros"), "config", "ego.yaml"]),
            description="the node's parameters file"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="namespace of the node, e.g. robot1 gives /robot1/ego/ask (empty: none)"),
        DeclareLaunchArgument(
            "autostart", default_value="true", choices=["true", "false"],
            description="configure and activate the node at start, loading the model"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", choices=["true", "false"],
            description="take time from /clock (a simulator or a bag) instead of the wall clock"),
        DeclareLaunchArgument(
            "log_level", default_value="info",
            description="the node's log level: debug, info, warn, error or fatal"),
        OpaqueFunction(function=_ego_node),
    ])


def _ego_node(context):
    """The node action, built once the arguments are known, so that empty ones can be left out."""
    value = {name: LaunchConfiguration(name).perform(context)
             for name in ("model", "camera_topics", "memory_dir", "params_file", "namespace", "autostart",
                          "use_sim_time", "log_level", "vllm_url")}
    overrides = parameter_overrides(value["model"], value["camera_topics"], value["memory_dir"], value["autostart"],
                                    value["use_sim_time"], value["vllm_url"])
    return [LifecycleNode(
        package="ego_ros",
        executable="ego_node",
        name="ego",
        namespace=value["namespace"],
        parameters=[value["params_file"], overrides],  # the file first: the later source wins
        ros_arguments=log_arguments(value["log_level"]),
        output="screen",
    )]


# --- pure helpers (no launch objects; test/test_launch.py runs them even where launch is not installed) ---------


def parameter_overrides(model: str, camera_topics: str, memory_dir: str, autostart: str,
                        use_sim_time: str = "false", vllm_url: str = "") -> dict:
    """The parameters given as launch arguments, typed; empty arguments are left to the params file. A vLLM URL
    also sets what it needs: generation vllm, memories laid out as images."""
    overrides = {"autostart": parse_bool(autostart, "autostart"),
                 "use_sim_time": parse_bool(use_sim_time, "use_sim_time")}
    if model.strip():
        overrides["model"] = model.strip()
    topics = topic_list(camera_topics)
    if topics:
        overrides["camera_topics"] = topics
    if memory_dir.strip():
        overrides["memory_dir"] = memory_dir.strip()
    if vllm_url.strip():
        overrides.update(generation="vllm", vllm_url=vllm_url.strip(), memory_layout="image")
    return overrides


def topic_list(text: str) -> list:
    """``/a,/b``, ``[/a, /b]``, ``['/a', "/b"]`` or ``/a`` -> ``['/a', '/b']``; empty -> ``[]``."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    topics = [part.strip().strip("'\"").strip() for part in text.split(",")]
    for topic in topics:
        if topic and (any(c.isspace() for c in topic) or any(c in topic for c in "[]'\"")):
            raise ValueError(f"camera_topics: {topic!r} is not a topic name; pass names separated by commas, "
                             f"like /front/image_raw,/arm/image_raw/compressed")
    return [topic for topic in topics if topic]


def parse_bool(text: str, name: str = "autostart") -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"{name} must be true or false, not {text!r}")
    return value == "true"


LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


def log_arguments(level: str) -> list:
    """``--log-level LEVEL`` for the node's ROS arguments; an unknown level is refused here, not by the node."""
    value = level.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return ["--log-level", value]
