# SPDX-License-Identifier: Apache-2.0
"""launch_testing test of launch/ego.launch.py: the real launch file starts the real node, seen over ROS 2.

Registered by CMakeLists.txt (``add_launch_test``) where launch_testing_ament_cmake is installed, so ``colcon test``
runs it on a ROS 2 distro; pytest runs it too there (launch_testing's pytest plugin). launch, launch_ros and
launch_testing are not on PyPI: in the PyPI-wheel venv this file is SKIPPED, not passed.

Launched with namespace:=robot1, autostart:=false (no model is loaded: the test needs no weights), use_sim_time:=true
and log_level:=debug; the node must come up unconfigured as /robot1/ego with those parameters and the shipped
relative camera topic, and stop cleanly at the end.
"""

import unittest
from pathlib import Path

import pytest

LAUNCH_SKIP = ("launch_testing is not installed: launch, launch_ros and launch_testing are not on PyPI, so the "
               "launch file is not run in this venv; colcon test runs this on a ROS 2 distro")
launch_testing = pytest.importorskip("launch_testing", reason=LAUNCH_SKIP)
pytest.importorskip("launch_ros", reason=LAUNCH_SKIP)

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parents[2] / "launch" / "ego.launch.py"
ARGUMENTS = {"namespace": "robot1", "autostart": "false", "use_sim_time": "true", "log_level": "debug",
             "model": "/models/not-loaded-by-this-test"}


@pytest.mark.launch_test
def generate_test_description():
    ego = IncludeLaunchDescription(PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
                                   launch_arguments=ARGUMENTS.items())
    return launch.LaunchDescription([ego, launch_testing.actions.ReadyToTest()])


class TestTheLaunchedNode(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("ego_launch_test_probe")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def call(self, srv_type, name, request):
        client = self.node.create_client(srv_type, name)
        self.assertTrue(client.wait_for_service(timeout_sec=60.0), f"{name} did not appear")
        future = client.call_async(request)
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=10.0)
        self.assertTrue(future.done(), f"{name} did not answer")
        return future.result()

    def test_the_node_is_up_unconfigured_in_the_namespace(self):
        state = self.call(GetState, "/robot1/ego/get_state", GetState.Request()).current_state
        self.assertEqual(state.label, "unconfigured")

    def test_the_launch_arguments_reach_the_node(self):
        names = ["use_sim_time", "autostart", "model", "camera_topics"]
        values = self.call(GetParameters, "/robot1/ego/get_parameters", GetParameters.Request(names=names)).values
        self.assertTrue(values[0].bool_value)
        self.assertFalse(values[1].bool_value)
        self.assertEqual(values[2].string_value, ARGUMENTS["model"])
        self.assertEqual(list(values[3].string_array_value), ["camera/image_raw"])


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_the_node_exits_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
