"""ego_ros: a personal visual memory for robots (Ego, training-free VLM personalisation) as a ROS 2 node."""

__version__ = "0.1.0"
