# SPDX-License-Identifier: Apache-2.0
"""The real node as its own process, and a real rclpy client beside it: for tests, benchmarks and smoke runs.

Each node process and its client share a ROS domain of their own, with discovery limited to this machine, so
tests neither see each other nor anything else on the network.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data

REPO = Path(__file__).resolve().parents[2]


def ros_env(domain_id: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ROS_LOCALHOST_ONLY", "EGO_ROS_MODEL")}
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONPATH=str(REPO),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


# A domain no test starts anything in (free_domain never draws it), for the checks that nobody answers: another
# drawn domain may still hold a node of an earlier test that is shutting down.
EMPTY_DOMAIN = 101


def free_domain() -> int:
    return random.Random(os.getpid() * 1000 + time.time_ns()).randint(1, EMPTY_DOMAIN - 1)


class NodeProcess:
    """``python -m ego_ros.ros.node`` (or ``command``, e.g. the node with a probe) with the given parameters; its
    log is kept for assertions."""

    def __init__(self, domain_id: int, log_path: Path, namespace: str = "/", params_file: Path | None = None,
                 command: list[str] | None = None, **params):
        self.domain_id, self.log_path, self.params, self.namespace = domain_id, log_path, params, namespace
        self.params_file = params_file
        self.command = command or [sys.executable, "-m", "ego_ros.ros.node"]
        self.process: subprocess.Popen | None = None

    def start(self) -> "NodeProcess":
        args = [*self.command, "--ros-args", "-r", f"__ns:={self.namespace}"]
        if self.params_file is not None:
            args += ["--params-file", str(self.params_file)]
        for name, value in self.params.items():
            args += ["-p", f"{name}:={_param(value)}"]
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(args, env=ros_env(self.domain_id), stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=REPO)
        return self

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        self.process = None
        return code

    def output(self) -> str:
        return self.log_path.read_text()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _param(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"'{v}'" if isinstance(v, str) else str(v) for v in value) + "]"
    return str(value)


class Client:
    """A real rclpy node in this process, spinning in a background thread, with blocking helpers."""

    def __init__(self, domain_id: int, name: str = "ego_test_client"):
        os.environ.pop("ROS_LOCALHOST_ONLY", None)
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_forever, daemon=True)
        self._spin.start()
        self._clients, self._publishers = {}, {}

    def _spin_forever(self):
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - shutting down
            pass

    def call(self, srv_type, name: str, request, timeout: float = 120.0, wait: float = 60.0,
             resend_after: float | None = None):
        """Call ``name`` and return its answer. ``resend_after``, for a request that may be sent twice (a query):
        send it again whenever it has gone that many seconds unanswered, the first answer winning. A request sent
        just after its service appeared was seen to lose its reply in full suite runs (a lifecycle node's first
        get_state unanswered for 120 s), as the product's clients know (they send once more after 3 s)."""
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self.node.create_client(srv_type, name)
        if not client.wait_for_service(timeout_sec=wait):
            raise TimeoutError(f"service {name} not available")
        futures = [client.call_async(request)]
        started = time.monotonic()
        resend_at = started + resend_after if resend_after else float("inf")
        try:
            while not any(future.done() for future in futures):
                now = time.monotonic()
                if now > started + timeout:
                    raise TimeoutError(f"{name} did not answer in {timeout} s")
                if now > resend_at:
                    futures.append(client.call_async(request))
                    resend_at = now + resend_after
                time.sleep(0.005)
            return next(future for future in futures if future.done()).result()
        finally:  # as the product's client does: no unanswered request stays pending on the reused client
            for future in futures:
                if not future.done():
                    client.remove_pending_request(future)

    def action_client(self, action_type, name: str) -> ActionClient:
        return ActionClient(self.node, action_type, name)

    def publisher(self, msg_type, topic: str):
        if topic not in self._publishers:
            self._publishers[topic] = self.node.create_publisher(msg_type, topic, qos_profile_sensor_data)
        return self._publishers[topic]

    def subscribe(self, msg_type, topic: str, qos=10) -> list:
        received = []
        self.node.create_subscription(msg_type, topic, received.append, qos)
        return received

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


class CameraPublisher:
    """Publishes frames on a topic at a fixed rate from a thread, with increasing header stamps."""

    def __init__(self, client: Client, topic: str, rate_hz: float, size=(224, 224), compressed: bool = False):
        from sensor_msgs.msg import CompressedImage, Image

        from ego_ros.ros.image_msgs import compressed_to_msg, image_to_msg

        self.topic, self.rate_hz, self.published = topic, rate_hz, 0
        self.publisher = client.publisher(CompressedImage if compressed else Image, topic)
        rng = np.random.default_rng(7)
        frames = [rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) for _ in range(4)]
        if compressed:
            self.msgs = [compressed_to_msg(f, CompressedImage) for f in frames]
        else:
            self.msgs = [image_to_msg(f, Image) for f in frames]
        self.clock = client.node.get_clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "CameraPublisher":
        self._thread.start()
        return self

    def _run(self):
        period = 1.0 / self.rate_hz
        next_time = time.monotonic()
        while not self._stop.is_set():
            msg = self.msgs[self.published % len(self.msgs)]
            msg.header.stamp = self.clock.now().to_msg()
            msg.header.frame_id = f"frame_{self.published}"
            self.publisher.publish(msg)
            self.published += 1
            next_time += period
            self._stop.wait(max(0.0, next_time - time.monotonic()))

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
