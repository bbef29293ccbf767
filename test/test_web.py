# SPDX-License-Identifier: Apache-2.0
"""``ego-ros web`` in a real headless Chromium (Debian's chromium, driven by Playwright) against a real node on the
trained toy model and the toy-world camera (``ego-ros camera toy``), each its own process over real DDS.

The page is used as a person uses it: a box dragged on the live view (with a mouse, and with touch on a phone-sized
page), a name typed, a question asked, a concept forgotten; what the node then holds is checked through a real
rclpy client. Set ``EGO_ROS_WEB_SCREENSHOTS=docs`` to write the docs' screenshots there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ego_ros.testing.rosgraph import REPO, Client, NodeProcess, free_domain, ros_env, wait_for
from ego_ros.web import inputs
from ego_ros.web.guard import Guard, is_loopback

CAMERA = "/camera/image_raw"
SCREENSHOTS = os.environ.get("EGO_ROS_WEB_SCREENSHOTS")
URL_LINE = re.compile(r"serving (http://\S+)")


# --- what the page may send, and who may send it (no browser, no ROS) -------------------------------------------


def test_a_box_must_be_four_numbers_inside_the_frame_with_an_area():
    assert inputs.box({"box": [10, 20.4, 110, 90.6]}, 224, 224) == (10, 20, 110, 91)
    assert inputs.box({"box": [0, 0, 224, 224]}, 224, 224) == (0, 0, 224, 224)
    for bad, says in (([10, 10, 10, 50], "no area"), ([10, 50, 60, 20], "no area"), ([-5, 0, 50, 50], "not inside"),
                      ([0, 0, 225, 50], "not inside"), ([0, 0, 50], "four numbers"), ([0, 0, "a", 9], "four numbers"),
                      ([0, 0, True, 9], "four numbers"), ([0, 0, float("nan"), 9], "finite"), ("0,0,9,9", "a list")):
        with pytest.raises(inputs.BadInput, match=says):
            inputs.box({"box": bad}, 224, 224)
    with pytest.raises(inputs.BadInput, match="box is missing"):
        inputs.box({}, 224, 224)


def test_names_questions_and_frame_ids_are_checked_before_anything_is_sent():
    assert inputs.name({"name": "my mug"}) == "my mug"
    for body, says in (({"name": "  "}, "name is empty"), ({}, "name is missing"), ({"name": 5}, "must be text"),
                       ({"name": "a\x00b"}, "NUL"), ({"name": "x" * 201}, "201 characters")):
        with pytest.raises(inputs.BadInput, match=says):
            inputs.name(body)
    assert inputs.description({}) == "" and inputs.description({"description": " the star "}) == "the star"
    with pytest.raises(inputs.BadInput, match="4001 characters"):
        inputs.question({"question": "?" * 4001})
    assert inputs.frame_id({"frame": None}, required=False) is None
    for body in ({"frame": 0}, {"frame": "3"}, {"frame": 2.5}, {"frame": True}):
        with pytest.raises(inputs.BadInput):
            inputs.frame_id(body)


def test_the_guard_keeps_other_sites_and_tokenless_requests_out():
    local, exposed = Guard(None), Guard("s3cret")
    json_post = {"Host": "127.0.0.1:8080", "Content-Type": "application/json"}
    assert local.refusal("POST", "/api/forget", json_post, {}) is None
    assert "not a local address" in local.refusal("GET", "/api/status", {"Host": "evil.example:8080"}, {})
    assert "application/json" in local.refusal("POST", "/api/forget", {"Host": "127.0.0.1:8080",
                                                                       "Content-Type": "text/plain"}, {})
    assert "another site" in local.refusal("POST", "/api/forget", {**json_post, "Origin": "http://evil.example"}, {})
    assert local.refusal("POST", "/api/forget", {**json_post, "Origin": "http://127.0.0.1:8080"}, {}) is None
    robot = {"Host": "robot.local:8080", "Content-Type": "application/json"}
    assert "token" in exposed.refusal("POST", "/api/forget", robot, {})
    assert "token" in exposed.refusal("GET", "/api/frame", robot, {})
    assert "token" in exposed.refusal("POST", "/api/forget", {**robot, "X-Ego-Token": "s3cre"}, {})
    assert exposed.refusal("POST", "/api/forget", {**robot, "X-Ego-Token": "s3cret"}, {}) is None
    assert exposed.refusal("GET", "/api/events", robot, {"token": "s3cret"}) is None
    assert exposed.refusal("GET", "/", robot, {}) is None  # the page itself holds nothing
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_frames_are_decoded_once_when_looked_at_and_held_frames_outlive_the_rolling_ones():
    from ego_ros.web.frames import FrameGone, FrameStore

    decoded = []

    def frame_of(value):
        def decode():
            decoded.append(value)
            return np.full((4, 6, 3), value, np.uint8)
        return decode
    store = FrameStore(max_recent=3, max_served=2, max_held=2)
    frames = [store.add(float(i), "camera", frame_of(i)) for i in range(3)]
    assert [f.id for f in frames] == [1, 2, 3] and store.latest() is frames[-1] and decoded == []
    assert store.get(2).size == (6, 4) and store.get(2).pixels()[0, 0, 0] == 1 and decoded == [1]
    assert store.get(2).jpeg()[:2] == b"\xff\xd8" and decoded == [1]  # a JPEG, from the pixels decoded once
    store.hold(1)
    store.served(store.get(2))
    for i in range(3, 9):
        store.add(float(i), "camera", frame_of(i))
    assert store.get(1).pixels()[0, 0, 0] == 0, "held"
    assert store.get(2).id == 2, "still shown on a page"
    with pytest.raises(FrameGone, match="frame 3 is no longer kept"):
        store.get(3)
    store.hold(7)
    store.hold(8)  # a third hold lets the oldest go
    with pytest.raises(FrameGone):
        store.get(1)
    store.release(7)
    assert store.get(8).id == 8


# --- the graph: node, camera, pages --------------------------------------------------------------------------


def start_web(domain: int, *args) -> tuple[subprocess.Popen, str]:
    """``ego-ros web --port 0 ARGS`` and the address it printed."""
    process = subprocess.Popen([sys.executable, "-m", "ego_ros.cli", "web", "--port", "0", *map(str, args)],
                               cwd=REPO, env=ros_env(domain), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    match = URL_LINE.search(line)
    if match is None:
        process.kill()
        raise AssertionError(f"ego-ros web printed {line!r}; stderr: {process.stderr.read()[-2000:]}")
    return process, match.group(1)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def graph(toy_model_dir, tmp_path_factory):
    """The node on the toy model (recognition events at 2 Hz), the toy camera, a client that records the camera's
    frames, and the page on loopback."""
    from sensor_msgs.msg import Image

    domain = free_domain()
    folder = tmp_path_factory.mktemp("web")
    memory = folder / "memory"
    node = NodeProcess(domain, folder / "node.log", params_file=REPO / "config" / "ego.yaml",
                       model=str(toy_model_dir), memory_dir=str(memory), recognition_rate_hz=2.0,
                       recognition_threshold=0.3, max_new_tokens=24, autostart=True).start()
    camera = subprocess.Popen([sys.executable, "-m", "ego_ros.cli", "camera", "toy"], cwd=REPO, env=ros_env(domain),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(domain, name="web_test_client")
    published: dict[float, np.ndarray] = {}

    def record(msg) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        published[round(stamp, 6)] = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        if len(published) > 400:
            published.pop(next(iter(published)))

    client.node.create_subscription(Image, CAMERA, record, 50)
    web = None
    try:
        wait_for(lambda: concepts(client) is not None, 180, "the node to be active")
        web, url = start_web(domain)
        yield {"domain": domain, "client": client, "url": url, "memory": memory, "published": published,
               "node": node}
    finally:
        if web is not None:
            stop(web)
        stop(camera)
        client.close()
        node.stop()


def concepts(client) -> list[str] | None:
    """The node's concept names (a real ListConcepts call), None while it is not active."""
    from ego_ros.srv import ListConcepts

    try:
        response = client.call(ListConcepts, "/ego/list_concepts", ListConcepts.Request(), timeout=20, wait=2)
    except TimeoutError:
        return None
    return sorted(c.name for c in response.concepts)


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Debian's chromium is needed (scripts/test.sh installs it: apt-get install chromium)"
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    made = context.new_page()
    errors = []
    made.on("pageerror", lambda error: errors.append(str(error)))
    yield made
    context.close()
    assert errors == [], errors  # no script error on the page, whatever the test did


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#live[data-frame]", timeout=60_000)  # a camera frame is on the canvas


def drag_box(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag on the live view, from and to fractions of its width and height."""
    area = page.locator("#live").bounding_box()
    page.mouse.move(area["x"] + start[0] * area["width"], area["y"] + start[1] * area["height"])
    page.mouse.down()
    page.mouse.move(area["x"] + end[0] * area["width"], area["y"] + end[1] * area["height"], steps=8)
    page.mouse.up()


def wait_for_instance(page, published: dict, name: str, timeout: float = 90.0) -> tuple[float, float, float, float]:
    """Wait until the live view shows the toy camera's instance ``name`` still and wholly in view (a dwell frame of
    one of its shots, rendered here from the camera's seeded world); its box as fractions of the frame."""
    from ego_ros.toy.camera import ToyCamera

    toy = ToyCamera()
    instance = toy.names[name]
    shots = [toy.shot(i) for i in range(0, 80, 2) if instance in [p.instance for p in toy.shot(i).objects]]

    def shown():
        stamp = float(page.locator("#live").get_attribute("data-stamp"))
        frame = next((f for s, f in list(published.items()) if abs(s - stamp) < 1e-5), None)
        scene = next((shot for shot in shots if frame is not None and np.array_equal(np.asarray(shot.image), frame)),
                     None)
        return scene and next(p.box for p in scene.objects if p.instance == instance)
    x0, y0, x1, y1 = wait_for(shown, timeout, f"the toy camera to show {name}", interval=0.1)
    size = 224.0
    return (max(0.0, x0 - 6) / size, max(0.0, y0 - 6) / size, min(size, x1 + 6) / size, min(size, y1 + 6) / size)


def register_by_box(page, name: str, description: str = ""):
    """Drag a box, wait 2 s (the camera moves on), type the name, register; the server's answer, and the id of the
    frame the page was paused on."""
    drag_box(page, (0.15, 0.2), (0.75, 0.8))
    page.wait_for_selector("#register-form:not([hidden])")
    page.wait_for_timeout(2000)
    page.fill("#name", name)
    page.fill("#description", description)
    frozen = int(page.locator("#live").get_attribute("data-frozen"))
    with page.expect_response("**/api/register") as answered:
        page.click("#register")
    return answered.value, frozen


def message_reads(page, start: str) -> str:
    """The page's message once it starts with ``start``: the page writes it after the server's answer has arrived,
    so a test that has the answer may still be ahead of the page."""
    page.wait_for_function("start => document.getElementById('message').textContent.startsWith(start)", arg=start,
                           timeout=30_000)
    return page.locator("#message").inner_text()


def ensure_star(graph) -> None:
    """The concept "my star" on the node (registered by the first test; again here when a test runs alone)."""
    if "my star" not in concepts(graph["client"]):
        frame = wait_for(lambda: api(graph["url"], "/api/status")[1]["frame"], 60, "a frame")["id"]
        status, answer = api(graph["url"], "/api/register", {"frame": frame, "box": [30, 30, 190, 190],
                                                             "name": "my star"})
        assert status == 200, answer


def shot(page, name: str, selector: str) -> None:
    """A screenshot of ``selector`` for the docs, at most 480 px wide, in 64 colours (small to commit)."""
    if SCREENSHOTS:
        from PIL import Image

        path = Path(SCREENSHOTS) / name
        page.locator(selector).screenshot(path=str(path))
        picture = Image.open(path).convert("RGB")
        if picture.width > 480:
            picture = picture.resize((480, round(picture.height * 480 / picture.width)), Image.Resampling.LANCZOS)
        picture.quantize(64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def api(url: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict | bytes]:
    """One real HTTP request to the page's server: (status, JSON or bytes)."""
    base = url.split("#")[0].rstrip("/")
    request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="GET" if body is None
                                     else "POST")
    if token:
        request.add_header("X-Ego-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as refused:
        status, data = refused.code, refused.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


# --- the page, in Chromium ----------------------------------------------------------------------------------------


def test_a_box_dragged_on_the_live_view_registers_that_frame_and_the_concept_appears_with_its_picture(graph, page):
    from PIL import Image

    from ego_ros.engine.figure import views_dir

    open_page(page, graph["url"])
    shown = page.evaluate("""() => new Promise((done) => {  // frames drawn on the page in 3 s
        let count = 0;
        const watch = new MutationObserver(() => count++);
        watch.observe(document.getElementById('live'), {attributes: true, attributeFilter: ['data-frame']});
        setTimeout(() => { watch.disconnect(); done(count); }, 3000);
    })""")
    print(f"the page drew {shown} frames in 3 s (the toy camera publishes 10 per second)")
    assert shown >= 3
    published = graph["published"]
    x0, y0, x1, y1 = wait_for_instance(page, published, "Rex")  # a red star with stripes
    drag_box(page, (x0, y0), (x1, y1))
    page.wait_for_selector("#register-form:not([hidden])")
    frozen = int(page.locator("#live").get_attribute("data-frozen"))
    stamp = float(page.locator("#live").get_attribute("data-stamp"))
    seen = next(frame for s, frame in list(published.items()) if abs(s - stamp) < 1e-5)  # what the camera sent

    def moved_on():  # the camera's newest frame is another picture: a late registration would differ
        return not np.array_equal(published[next(reversed(list(published)))], seen)
    wait_for(moved_on, 30, "the toy camera to show something else")
    page.fill("#name", "my star")
    page.fill("#description", "the red star with stripes")
    with page.expect_response("**/api/register") as answered:
        page.click("#register")
    result = answered.value.json()
    assert answered.value.status == 200, result
    assert result["frame"] == frozen and result["stamp"] == pytest.approx(stamp, abs=1e-5)
    message_reads(page, "registered 'my star'")
    item = page.locator('#concepts li[data-name="my star"]')
    item.wait_for(timeout=30_000)
    page.wait_for_function(
        "() => document.querySelector('#concepts li[data-name=\"my star\"] .picture img')?.naturalWidth > 0",
        timeout=30_000)
    assert "1 view" in item.inner_text()
    assert concepts(graph["client"]) == ["my star"]
    # The view the node stored is the very frame the page showed when the box was drawn, pixel for pixel.
    stored = np.asarray(Image.open(views_dir(graph["memory"], "my star") / "0.png").convert("RGB"))
    assert np.array_equal(stored, seen)
    assert page.locator("#live").get_attribute("data-frozen") is None, "back to the live view after registering"


def test_each_concept_says_when_and_where_it_was_last_seen_with_its_crop(graph, page):
    from PIL import Image

    ensure_star(graph)

    def seen():  # the node recognises Rex in its camera's frames (events at 2 Hz) and keeps the visit
        listed = {c["name"]: c for c in api(graph["url"], "/api/concepts")[1]["concepts"]}
        return listed["my star"]["last_seen"]
    visit = wait_for(seen, 90, "a sighting of 'my star'")
    assert visit["camera"] in ("camera/image_raw", "") and 0 <= visit["ago"] < 90 and visit["score"] >= 0.3
    crop = Image.open(io.BytesIO(base64.b64decode(visit["crop"].removeprefix("data:image/jpeg;base64,"))))
    assert crop.format == "JPEG" and max(crop.size) <= 96
    open_page(page, graph["url"])
    line = page.locator('#concepts li[data-name="my star"] .last-seen')
    line.wait_for(timeout=30_000)
    assert re.fullmatch(r"last seen \d+ (s|min) ago, (camera camera/image_raw|in a sent image) \(score [01]\.\d\d\)",
                        line.inner_text().strip()), line.inner_text()  # a score of 0.995 shows as 1.00
    page.wait_for_function(
        "() => document.querySelector('#concepts li[data-name=\"my star\"] .last-seen img')?.naturalWidth > 0",
        timeout=30_000)
    shot(page, "web_concepts.png", "#concepts-panel")


def test_found_concepts_are_boxed_on_the_frame_they_were_found_in(graph, page):
    ensure_star(graph)
    open_page(page, graph["url"])
    wait_for_instance(page, graph["published"], "Rex")
    with page.expect_response("**/api/recognize") as answered:
        page.click("#find")
    result = answered.value.json()
    assert answered.value.status == 200, result
    (detection,) = result["detections"]
    assert detection["name"] == "my star" and detection["box"] is not None
    assert int(page.locator("#live").get_attribute("data-frozen")) == result["frame"]
    assert "my star" in page.locator("#view-note").inner_text()
    shot(page, "web_live.png", "#live-panel")
    # The box's left edge, drawn in the first colour (red) on the canvas, where the node said the concept is.
    x0, y0, x1, y1 = detection["box"]
    row = page.evaluate("""([x, y]) => {  // 5 canvas pixels across the edge (the line is 3 px wide, antialiased)
        const canvas = document.getElementById('live');
        const k = canvas.width / Number(canvas.dataset.width);
        const left = Math.max(0, Math.round(x * k) - 2);
        return Array.from(canvas.getContext('2d').getImageData(left, Math.round(y * k), 5, 1).data);
    }""", [x0, (y0 + y1) / 2])
    pixels = np.array(row).reshape(-1, 4)[:, :3]
    assert (np.abs(pixels - [255, 64, 64]).max(axis=1) <= 12).any(), pixels  # COLOURS[0], #ff4040
    page.click("#resume")
    assert page.locator("#live").get_attribute("data-frozen") is None
    # Recognition events (2 Hz) name the concept under the live view, with its score.
    page.wait_for_function("() => document.getElementById('seen').textContent.includes('my star')", timeout=30_000)


def test_an_answer_streams_into_the_page_before_it_is_complete(graph, page):
    from ego_ros.srv import ForgetConcept

    # Without a concept in context the toy model describes the frame in a sentence; with one it was only taught to
    # answer whether (or where) the concept is, in a word or two: too short to show streaming.
    for name in concepts(graph["client"]) or []:
        assert graph["client"].call(ForgetConcept, "/ego/forget_concept", ForgetConcept.Request(name=name)).success
    open_page(page, graph["url"])
    page.evaluate("""() => {
        window.answerSnapshots = [];
        const answer = document.getElementById('answer');
        new MutationObserver(() => window.answerSnapshots.push([performance.now(), answer.textContent]))
            .observe(answer, {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#question", "Describe this image in one short sentence.")
    # The toy model's answer is a few tokens: on a loaded machine all of them can reach the browser in one network
    # read, and the page then renders them in one go. Streaming is shown by one of three answers rendering part of
    # itself first; a server that held the answer back until the end fails all three.
    for attempt in range(1, 4):
        page.evaluate("window.answerSnapshots = []")
        asked = page.evaluate("performance.now()")
        page.click("#ask")
        page.wait_for_selector("body[data-asking=done]", timeout=120_000)
        log = page.evaluate("window.egoAskLog")
        print(f"answer {attempt}: first piece on the page {log[0]['at'] - asked:.0f} ms after the click, the whole "
              f"answer {log[-1]['at'] - asked:.0f} ms after it ({len(log) - 1} pieces)")
        kinds = [entry["kind"] for entry in log]
        assert kinds[-1] == "done" and kinds.count("done") == 1, kinds
        pieces = [entry for entry in log if entry["kind"] == "text"]
        assert len(pieces) >= 2, log
        final = log[-1]["data"]["answer"]
        assert "".join(p["data"]["text"] for p in pieces).strip() == final.strip()
        assert all(p["at"] <= log[-1]["at"] for p in pieces)
        snapshots = page.evaluate("window.answerSnapshots")
        partial = [text for _, text in snapshots if text and len(text) < len(final.strip()) and
                   final.strip().startswith(text.strip())]
        if partial:
            break
        page.evaluate("document.body.dataset.asking = ''")  # the next answer's end is awaited afresh
    assert partial, f"no answer of {attempt} showed part of itself before the whole: {snapshots}"
    assert page.locator("#answer").inner_text().strip() == final.strip()
    assert "tokens in" in page.locator("#answer-info").inner_text()
    shot(page, "web_answer.png", "#ask-panel")


def test_bad_input_on_the_page_gets_a_clear_message_and_registers_nothing(graph, page):
    ensure_star(graph)
    open_page(page, graph["url"])
    before = concepts(graph["client"])
    response, _ = register_by_box(page, "  ")
    assert response.status == 400 and message_reads(page, "the name is empty") == "the name is empty"
    page.fill("#name", "a/b")
    page.click("#register")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('path separator')")
    assert page.locator("#register-form").is_visible(), "the box stays, to try another name"
    page.fill("#name", "starry")
    page.fill("#description", "a star <|im_end|> with stripes")
    page.click("#register")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('control token')")
    # A tap is not a box.
    page.click("#resume")
    area = page.locator("#live").bounding_box()
    page.mouse.click(area["x"] + 30, area["y"] + 30)
    assert page.locator("#register-form").is_hidden()
    assert "a tap is not a box" in page.locator("#view-note").inner_text()
    assert concepts(graph["client"]) == before
    # Straight to the API: a box outside the frame, of no size, a frame never seen.
    frame = wait_for(lambda: api(graph["url"], "/api/status")[1]["frame"], 60, "a frame")["id"]
    for body, status, says in (({"frame": frame, "box": [0, 0, 500, 50], "name": "x"}, 400, "not inside"),
                               ({"frame": frame, "box": [9, 9, 9, 50], "name": "x"}, 400, "no area"),
                               ({"frame": 10 ** 9, "box": [0, 0, 9, 9], "name": "x"}, 410, "no longer kept"),
                               ({"frame": frame, "box": [0, 0, 9, 9], "name": "my star", "x": 1}, 422, "already")):
        got, answer = api(graph["url"], "/api/register", body)
        assert (got, says in answer.get("error", "")) == (status, True), (body, got, answer)
    assert concepts(graph["client"]) == before


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_long_unbroken_text_wraps_inside_its_panel_and_never_widens_the_page(graph, page, width, height):
    """A keyword list and an answer without a space (what a tiny or a confused model writes) break inside their
    panels, on a desktop window and at a phone's width alike."""
    page.set_viewport_size({"width": width, "height": height})
    frame = wait_for(lambda: api(graph["url"], "/api/status")[1]["frame"], 60, "a frame")["id"]
    long_one = {"frame": frame, "box": [30, 30, 190, 190], "name": "long one", "description": "stripes" * 60}
    status, answer = api(graph["url"], "/api/register", long_one)
    assert status == 200, answer
    try:
        open_page(page, graph["url"])
        page.locator('#concepts li[data-name="long one"] .picture img').wait_for(timeout=30_000)
        page.evaluate("""text => {  // an answer as long, and a message: what the page shows after asking
            document.getElementById('answer').textContent = text;
            const message = document.getElementById('message');
            message.textContent = text; message.hidden = false;
        }""", "x" * 600)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        for panel in ("#live-panel", "#ask-panel", "#concepts-panel", "#message"):
            box = page.locator(panel).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (panel, box)
        facts = page.locator('#concepts li[data-name="long one"] p.note')
        assert "stripesstripes" in facts.inner_text() and facts.bounding_box()["width"] <= width
        if width < 500:
            shot(page, "web_phone.png", "main")
    finally:
        api(graph["url"], "/api/forget", {"name": "long one"})


def test_a_hostile_name_is_shown_as_text_and_forget_removes_the_concept(graph, page):
    hostile = '<img src=x onerror="document.body.dataset.owned=1">'
    open_page(page, graph["url"])
    response, _ = register_by_box(page, hostile)
    assert response.status == 200, response.json()
    item = page.locator("#concepts li").filter(has_text="onerror")
    item.wait_for(timeout=30_000)
    assert item.locator(".name").inner_text() == hostile
    assert page.locator("img[src=x]").count() == 0 and page.evaluate("document.body.dataset.owned") is None
    forget = item.locator("button", has_text="Forget")
    forget.click()
    assert forget.inner_text() == "Really forget?", "one tap arms it; nothing is forgotten yet"
    assert hostile in concepts(graph["client"])
    forget.click()
    item.wait_for(state="detached", timeout=30_000)
    assert hostile not in concepts(graph["client"])
    message_reads(page, "forgot")


# --- beyond localhost: the token ----------------------------------------------------------------------------------


def touch_drag(page, start, end) -> None:
    """A finger's drag on the live view: real touch input through Chromium's DevTools protocol."""
    area = page.locator("#live").bounding_box()
    cdp = page.context.new_cdp_session(page)
    points = [(start[0] + (end[0] - start[0]) * t / 8, start[1] + (end[1] - start[1]) * t / 8) for t in range(9)]

    def touch(kind, point=None):
        at = [] if point is None else [{"x": area["x"] + point[0] * area["width"],
                                        "y": area["y"] + point[1] * area["height"]}]
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": at})
    touch("touchStart", points[0])
    for point in points[1:]:
        touch("touchMove", point)
    touch("touchEnd")


def test_beyond_localhost_every_request_needs_the_printed_token_and_a_phone_registers_by_touch(graph, browser):
    web, url = start_web(graph["domain"], "--host", "0.0.0.0")
    try:
        token = re.search(r"#token=([\w-]+)$", url).group(1)
        local = re.sub(r"//[^:/]+:", "//127.0.0.1:", url)  # the printed host is this machine's name
        before = concepts(graph["client"])
        frame = wait_for(lambda: api(local, "/api/status", token=token)[1]["frame"], 60, "a frame")["id"]
        for path, body in (("/api/register", {"frame": frame, "box": [0, 0, 50, 50], "name": "sneaky"}),
                           ("/api/forget", {"name": before[0] if before else "x"}), ("/api/ask", {"question": "hi"}),
                           ("/api/hold", {"frame": frame}), ("/api/status", None), ("/api/frame", None),
                           ("/api/concepts", None)):
            for wrong in (None, token[:-1] + ("A" if token[-1] != "A" else "B")):
                status, answer = api(local, path, body, token=wrong)
                assert status == 403 and "token" in answer["error"], (path, wrong, status, answer)
        assert concepts(graph["client"]) == before, "nothing changed without the token"
        # The printed address (with its #token) on a phone: a finger drags the box.
        phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                    has_touch=True)
        page = phone.new_page()
        try:
            open_page(page, local)
            touch_drag(page, (0.1, 0.15), (0.8, 0.85))
            page.wait_for_selector("#register-form:not([hidden])")
            page.fill("#name", "phone star")
            with page.expect_response("**/api/register") as answered:
                page.click("#register")
            assert answered.value.status == 200, answered.value.json()
            page.locator('#concepts li[data-name="phone star"]').wait_for(timeout=30_000)
            assert "phone star" in concepts(graph["client"])
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, "the page fits a phone's width"
            # The same page without the token: it says what is missing, and changes nothing.
            bare = phone.new_page()
            bare.goto(local.split("#")[0])
            bare.wait_for_function("() => document.getElementById('status').textContent.includes('token')")
        finally:
            phone.close()
        assert api(local, "/api/forget", {"name": "phone star"}, token=token)[0] == 200
    finally:
        stop(web)


def test_no_node_and_no_camera_are_said_on_the_page(graph, page):
    before = concepts(graph["client"])
    web, url = start_web(graph["domain"], "--node", "/nobody", "--camera", "/no_camera/image_raw",
                         "--timeout", "2")
    try:
        page.goto(url)
        page.wait_for_function("() => document.getElementById('status').textContent.includes('not running')")
        page.wait_for_function("() => document.getElementById('view-note').textContent.includes('no frame from')",
                               timeout=20_000)
        status, answer = api(url, "/api/forget", {"name": "my star"})
        assert status == 503 and "not running" in answer["error"]
        status, answer = api(url, "/api/ask", {"question": "What is this?"})
        assert status == 503 and "not running" in answer["error"]
        assert "no frame from /no_camera/image_raw yet" in api(url, "/api/frame")[1]["error"]
        page.fill("#question", "What is this?")
        page.click("#ask")
        page.wait_for_function("() => document.getElementById('message').textContent.includes('not running')")
    finally:
        stop(web)
    assert concepts(graph["client"]) == before, "nothing changed on the real node"


def test_an_address_that_cannot_be_served_is_one_error_line():
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for args, says in ((["--port", taken.getsockname()[1]], "address already in use"),
                           (["--port", "70000"], "expected a TCP port"),
                           (["--host", "192.0.2.1", "--port", "0"], "cannot serve on 192.0.2.1:0")):
            done = subprocess.run([sys.executable, "-m", "ego_ros.cli", "web", *map(str, args)], cwd=REPO,
                                  env=ros_env(free_domain()), capture_output=True, text=True, timeout=120)
            lines = done.stderr.strip().splitlines()
            assert done.returncode in (1, 2) and len(lines) == 1, (args, done.stderr)
            assert lines[0].startswith("ego-ros: error: ") and says in lines[0], lines
            assert done.stdout == ""
    finally:
        taken.close()
