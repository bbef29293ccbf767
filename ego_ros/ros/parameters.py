# SPDX-License-Identifier: Apache-2.0
"""The ego node's parameters: names, defaults and descriptors (with ranges), and their validated snapshot.

``config/ego.yaml`` documents the same set, and test_launch checks that the two agree. ``docs/node.md``'s table of
them is this module's output (test_docs checks it)::

    python -m ego_ros.ros.parameters     # the Markdown table
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.parameter import Parameter


def _describe(description: str, *, floats: tuple[float, float] | None = None, ints: tuple[int, int] | None = None,
              kind: int | None = None) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=description, read_only=False)
    if floats is not None:
        descriptor.floating_point_range = [FloatingPointRange(from_value=floats[0], to_value=floats[1], step=0.0)]
    if ints is not None:
        descriptor.integer_range = [IntegerRange(from_value=ints[0], to_value=ints[1], step=1)]
    if kind is not None:
        descriptor.type = kind
    return descriptor


# name -> (default, descriptor). config/ego.yaml documents the same set; test_launch checks they agree.
PARAMETER_SPECS = {
    "model": ("", _describe("VLM to load: a local folder or a hub id in the local Hugging Face cache")),
    "device": ("auto", _describe("torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")),
    "dtype": ("auto", _describe("weights' dtype: auto (bf16 on a GPU that has it, else float32), float32, bfloat16, "
                                "float16")),
    "memory_dir": ("", _describe("folder of the concept memories; empty: $EGO_ROS_MEMORY_DIR or "
                                 "~/.local/share/ego_ros/memory")),
    "camera_topics": (["camera/image_raw"], _describe(
        "image topics, one rolling buffer each; a topic ending in /compressed is sensor_msgs/CompressedImage",
        kind=ParameterType.PARAMETER_STRING_ARRAY)),
    "buffer_seconds": (10.0, _describe("how much recent video each camera buffer keeps, seconds",
                                       floats=(0.5, 600.0))),
    "buffer_fps": (2.0, _describe("frames per second kept in the buffers (input is decimated to this)",
                                  floats=(0.1, 60.0))),
    "max_image_pixels": (640 * 480, _describe("frames and views are downscaled to at most this many pixels",
                                              ints=(784, 16_777_216))),
    "max_tokens_per_view": (64, _describe("K: at most this many visual tokens kept per reference view",
                                          ints=(1, 16384))),
    "layers": ([], _describe("decoder layers scoring the tokens (eq. 3); empty: the middle half of the decoder",
                             kind=ParameterType.PARAMETER_INTEGER_ARRAY)),
    "max_concepts_in_context": (8, _describe("at most this many concept memories in one prompt (most similar first)",
                                             ints=(1, 256))),
    "video_frames": (8, _describe("frames sampled from the buffer window for a video question", ints=(1, 64))),
    "max_new_tokens": (128, _describe("default answer length bound, tokens", ints=(1, 8192))),
    "recognition_order": ("image_first", _describe(
        "recognition prompt: image_first (the frame prefilled once for all concepts: faster with many concepts) or "
        "concept_first (one prompt per concept, the paper's order)")),
    "memory_layout": ("text", _describe(
        "how a memory sits in a prompt: text (placeholders at text positions, the paper's layout) or image (an image "
        "of its own: vision delimiters, a synthetic grid, 2-D positions; how vLLM takes embeddings); Qwen only")),
    "generation": ("transformers", _describe(
        "who answers and scores recognition: transformers (in this process) or vllm (a vLLM server at vllm_url serving "
        "the same checkpoint; needs memory_layout image; docs/serving.md)")),
    "vllm_url": ("", _describe("the vLLM server's address for generation vllm, e.g. http://localhost:8000")),
    "static_cache": (False, _describe("decode with a static KV cache, compiled on a GPU: faster answers and "
                                      "registrations after a one-time compile")),
    "recognition_rate_hz": (0.0, _describe("how often each camera's latest frame is checked for concepts; 0 = off",
                                           floats=(0.0, 30.0))),
    "recognition_threshold": (0.5, _describe("probability above which a concept counts as present", floats=(0.0, 1.0))),
    "recognition_hysteresis": (0.1, _describe(
        "a present concept is announced gone once its score stays below recognition_threshold minus this for two "
        "checks; 0: no hysteresis, each check's own score decides", floats=(0.0, 1.0))),
    "recognition_confirm_frames": (1, _describe(
        "a concept is announced present once its score is at or above recognition_threshold this many checks in a "
        "row; 2 keeps one check's false alarm out of the events and the sightings", ints=(1, 30))),
    "pose_topic": ("", _describe("the robot's pose (geometry_msgs/PoseStamped or nav_msgs/Odometry), kept with "
                                 "each sighting; empty: none")),
    "sightings_max_age": (30 * 86400.0, _describe("visits older than this many seconds are pruned from the "
                                                  "sightings memory", floats=(60.0, 3.2e9))),
    "sightings_max_rows": (100_000, _describe("at most this many visits are kept (the oldest go first)",
                                              ints=(1, 100_000_000))),
    "autostart": (False, _describe("configure and activate at start-up instead of waiting for lifecycle transitions")),
}
PARAMETERS = {name: default for name, (default, _) in PARAMETER_SPECS.items()}
# Taken while the node is active (the others are read on configure).
LIVE = ("recognition_threshold", "recognition_hysteresis", "recognition_confirm_frames", "recognition_rate_hz",
        "max_new_tokens")


@dataclass(frozen=True)
class Settings:
    model: str
    device: str
    dtype: str
    memory_dir: Path | None
    camera_topics: tuple[str, ...]
    buffer_seconds: float
    buffer_fps: float
    max_image_pixels: int
    max_tokens_per_view: int
    layers: tuple[int, ...] | None
    max_concepts_in_context: int
    video_frames: int
    max_new_tokens: int
    recognition_order: str
    memory_layout: str
    generation: str
    vllm_url: str
    static_cache: bool
    recognition_rate_hz: float
    recognition_threshold: float
    recognition_hysteresis: float
    recognition_confirm_frames: int
    pose_topic: str
    sightings_max_age: float
    sightings_max_rows: int

    @property
    def recognition_off_threshold(self) -> float:
        return max(0.0, self.recognition_threshold - self.recognition_hysteresis)

    @property
    def recognition_off_frames(self) -> int:
        """Checks in a row below the off threshold before a concept is gone: one without hysteresis."""
        return 2 if self.recognition_hysteresis > 0 else 1

    @classmethod
    def from_node(cls, node) -> "Settings":
        # An empty list in a params file arrives as "not set": that means the default, not an error.
        p = {name: node.get_parameter_or(name, Parameter(name, value=default)).value
             for name, (default, _) in PARAMETER_SPECS.items()}
        if not str(p["model"]).strip():
            raise ValueError("parameter model is empty: set it to a model folder or a cached hub id")
        topics = tuple(str(t) for t in (p["camera_topics"] or ()))
        if len(set(topics)) != len(topics) or any(not t.strip() for t in topics):  # none at all is allowed
            raise ValueError(f"camera_topics must be distinct, non-empty topic names, got {list(topics)}")
        layers = tuple(int(i) for i in (p["layers"] or ()))
        if p["recognition_order"] not in ("concept_first", "image_first"):
            raise ValueError(f"recognition_order must be concept_first or image_first, got {p['recognition_order']!r}")
        if p["memory_layout"] not in ("text", "image"):
            raise ValueError(f"memory_layout must be text or image, got {p['memory_layout']!r}")
        if p["generation"] not in ("transformers", "vllm"):
            raise ValueError(f"generation must be transformers or vllm, got {p['generation']!r}")
        return cls(
            model=str(p["model"]).strip(), device=str(p["device"]), dtype=str(p["dtype"]),
            memory_dir=Path(p["memory_dir"]).expanduser() if str(p["memory_dir"]).strip() else None,
            camera_topics=topics, buffer_seconds=float(p["buffer_seconds"]), buffer_fps=float(p["buffer_fps"]),
            max_image_pixels=int(p["max_image_pixels"]), max_tokens_per_view=int(p["max_tokens_per_view"]),
            layers=layers or None, max_concepts_in_context=int(p["max_concepts_in_context"]),
            video_frames=int(p["video_frames"]), max_new_tokens=int(p["max_new_tokens"]),
            recognition_order=str(p["recognition_order"]), memory_layout=str(p["memory_layout"]),
            generation=str(p["generation"]), vllm_url=str(p["vllm_url"]).strip(),
            static_cache=bool(p["static_cache"]),
            recognition_rate_hz=float(p["recognition_rate_hz"]),
            recognition_threshold=float(p["recognition_threshold"]),
            recognition_hysteresis=float(p["recognition_hysteresis"]),
            recognition_confirm_frames=int(p["recognition_confirm_frames"]),
            pose_topic=str(p["pose_topic"]).strip(), sightings_max_age=float(p["sightings_max_age"]),
            sightings_max_rows=int(p["sightings_max_rows"]),
        )


def markdown_table() -> str:
    """The parameters as a Markdown table: name, default, range, whether live, what."""
    rows = ["| parameter | default | range | live | what |", "| --- | --- | --- | --- | --- |"]
    for name, (default, descriptor) in PARAMETER_SPECS.items():
        span = ""
        for bound in descriptor.floating_point_range:
            span = f"{bound.from_value:g} to {bound.to_value:g}"
        for bound in descriptor.integer_range:
            span = f"{bound.from_value:,} to {bound.to_value:,}"
        shown = f"`{default!r}`" if not isinstance(default, bool) else f"`{str(default).lower()}`"
        rows.append(f"| `{name}` | {shown} | {span} | {'yes' if name in LIVE else ''} | "
                    f"{descriptor.description.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
