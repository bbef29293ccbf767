# SPDX-License-Identifier: Apache-2.0
"""The HTTP side of ``ego-ros web``: the page's files and its JSON API, on aiohttp.

| request | what |
| --- | --- |
| ``GET /`` | the page (``static/``: plain HTML, CSS and JavaScript; nothing from elsewhere) |
| ``GET /api/status`` | the node (ready or not), the camera, the latest frame's id, size and age |
| ``GET /api/frame?after=ID`` | the newest frame after ``ID`` as JPEG (waits up to 2 s; 204 if none came); its |
| | id, stamp and size in ``X-Frame-*`` headers |
| ``POST /api/hold {frame}`` | keep that frame (the page froze on it to draw a box) |
| ``GET /api/events`` | Server-Sent Events: the node's recognition events about this camera (boxes, names, scores) |
| ``GET /api/concepts`` | the node's concepts, each with its last visit (when, which camera, a crop) or null |
| ``GET /api/picture?name=N&updated=T`` | what ``ego-ros show`` draws for ``N``, as PNG |
| ``POST /api/register {frame, box, name, description}`` | register what the box holds, from that frame's own pixels |
| ``POST /api/recognize {frame}`` | the concepts in that frame, with boxes |
| ``POST /api/ask {question, frame}`` | the answer action about that frame, streamed back as Server-Sent Events |
| ``POST /api/forget {name}`` | forget a concept |

Errors are JSON ``{"error": message}``: 400 for bad input (nothing sent to the node), 403 without the token when
one is needed (:mod:`ego_ros.web.guard`), 410 for a frame no longer kept, 422 for the node's own refusal, 503 when
the node (or the camera) is not there. Every message is meant for the person at the page.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

from aiohttp import web

from ego_ros.ros.client import seconds

from ego_ros.web import inputs
from ego_ros.web.frames import FrameGone
from ego_ros.web.guard import Guard
from ego_ros.web.inputs import BadInput
from ego_ros.web.pictures import PictureUnavailable, Pictures

STATIC = Path(__file__).parent / "static"
FRAME_WAIT = 2.0  # GET /api/frame waits this long for a newer frame
KEEPALIVE = 15.0  # an SSE comment this often keeps proxies and phones from closing an idle stream
SECURITY_HEADERS = {
    # No inline script, no other origin: a hostile concept name shown on the page cannot run as code.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Api:
    """The handlers, over a :class:`~ego_ros.web.bridge.RobotBridge` (or anything with its attributes)."""

    def __init__(self, bridge, pictures: Pictures, memory_dir_given: bool):
        self.bridge, self.frames, self.pictures = bridge, bridge.frames, pictures
        self._memory_dir_known = memory_dir_given
        self._frame_waiters: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        self.frames.on_frame(lambda frame: self._loop.call_soon_threadsafe(self._wake_frame_waiters))

    def _wake_frame_waiters(self) -> None:
        for waiter in self._frame_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._frame_waiters.clear()

    # -- reading

    async def status(self, request: web.Request) -> web.Response:
        frame = self.frames.latest()
        latest = None
        if frame is not None:
            width, height = await asyncio.to_thread(lambda: frame.size)
            latest = {"id": frame.id, "stamp": frame.stamp, "width": width, "height": height,
                      "age": round(time.monotonic() - frame.arrived, 3)}
        return web.json_response({"node": self.bridge.node, "ready": self.bridge.node_ready(),
                                  "camera": self.bridge.camera, "frame": latest})

    async def frame(self, request: web.Request) -> web.StreamResponse:
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return error(400, "after must be a frame id")
        deadline = time.monotonic() + FRAME_WAIT
        frame = self.frames.latest()
        while frame is None or frame.id <= after:
            left = deadline - time.monotonic()
            if left <= 0:
                if frame is None:
                    return error(503, f"no frame from {self.bridge.camera} yet: is the camera publishing?")
                return web.Response(status=204)
            waiter = self._loop.create_future()
            self._frame_waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except asyncio.TimeoutError:
                pass
            frame = self.frames.latest()
        try:
            jpeg = await asyncio.to_thread(frame.jpeg)
            width, height = frame.size
            self.frames.served(frame)
        except ValueError as bad:  # a frame the converter refuses (an encoding it does not know, a wrong size)
            return error(503, f"the camera's frames cannot be shown: {bad}")
        return web.Response(body=jpeg, content_type="image/jpeg", headers={
            "X-Frame-Id": str(frame.id), "X-Frame-Stamp": f"{frame.stamp:.6f}", "X-Frame-Width": str(width),
            "X-Frame-Height": str(height)})

    async def hold(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        frame = self.frames.hold(inputs.frame_id(body))
        width, height = await asyncio.to_thread(lambda: frame.size)
        return web.json_response({"frame": frame.id, "width": width, "height": height})

    async def events(self, request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue = asyncio.Queue(maxsize=32)

        def push(event: dict) -> None:
            def put() -> None:
                if not queue.full():  # a page that does not read fast enough misses events, not memory
                    queue.put_nowait(event)
            self._loop.call_soon_threadsafe(put)

        stop = self.bridge.on_event(push)
        response = await start_stream(request)
        try:
            if self.bridge.latest_event is not None:
                await send(response, "recognition", self.bridge.latest_event)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                await send(response, "recognition", event)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            stop()
        return response

    async def concepts(self, request: web.Request) -> web.Response:
        concepts = sorted(await self._node(self.bridge.commander.list_concepts()), key=lambda c: c.name.casefold())
        visits = await asyncio.gather(*(self.bridge.commander.last_seen(c.name, max_results=1) for c in concepts),
                                      return_exceptions=True)
        now = time.time()
        return web.json_response({"concepts": [{
            "name": c.name, "views": c.num_views, "tokens": c.num_tokens, "area": round(float(c.area_percent), 1),
            "keywords": list(c.keywords), "updated": seconds(c.updated), "last_seen": last_visit(found, now),
        } for c, found in zip(concepts, visits)]})

    async def picture(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        try:
            updated = float(request.query.get("updated", "0"))
        except ValueError:
            return error(400, "updated must be a number")
        if not name:
            return error(400, "name is missing")
        await self._find_memory_dir()
        try:
            png = await asyncio.to_thread(self.pictures.png, name, updated)
        except PictureUnavailable as missing:
            return error(404, str(missing))
        return web.Response(body=png, content_type="image/png")

    # -- changing

    async def register(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name, description = inputs.name(body), inputs.description(body)
        frame = self.frames.get(inputs.frame_id(body))
        pixels = await asyncio.to_thread(frame.pixels)
        height, width = pixels.shape[:2]
        box = inputs.box(body, width, height)
        await self._require_node()
        registering = self.bridge.commander.register(name, [pixels], regions=[box], description=description)
        concept = await self._node(registering)
        self.frames.release(frame.id)
        return web.json_response({
            "message": f"registered {concept.name!r} from frame {frame.id}: {concept.num_tokens} tokens kept",
            "concept": {"name": concept.name, "views": concept.num_views, "tokens": concept.num_tokens},
            "frame": frame.id, "stamp": frame.stamp, "box": list(box)})

    async def recognize(self, request: web.Request) -> web.Response:
        from ego_ros.ros.client import recognize_request
        from ego_ros.web.bridge import detections_of

        body = await json_body(request)
        frame = self.frames.get(inputs.frame_id(body))
        pixels = await asyncio.to_thread(frame.pixels)
        await self._require_node()
        response = await self._node(self.bridge.commander.call("recognize", recognize_request(pixels)))
        if not response.success:
            return error(422, response.message)
        return web.json_response({"frame": frame.id, "detections": detections_of(response.detections)})

    async def forget(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name = inputs.name(body)
        await self._require_node()
        message = await self._node(self.bridge.commander.forget(name))
        return web.json_response({"message": message})

    async def ask(self, request: web.Request) -> web.StreamResponse:
        """Events: ``text`` ({text, tokens}: what each token added), then ``done`` ({answer, concepts, latency,
        frame}) or ``error`` ({error}). The page closing the stream cancels the goal on the node."""
        body = await json_body(request)
        question = inputs.question(body)
        wanted = inputs.frame_id(body, required=False)
        pixels = None
        if wanted is not None:
            pixels = await asyncio.to_thread(self.frames.get(wanted).pixels)
        await self._require_node()
        queue: asyncio.Queue = asyncio.Queue()
        loop = self._loop

        def on_feedback(feedback) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", feedback.new_text, feedback.tokens))

        task = self.bridge.commander.ask(question, image=pixels, on_feedback=on_feedback)
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, ("done", "", 0)))
        response = await start_stream(request)
        streamed = ""
        try:
            while True:
                kind, piece, tokens = await queue.get()
                if kind == "done":
                    break
                if piece:
                    streamed += piece
                    await send(response, "text", {"text": piece, "tokens": tokens})
            failure = task.exception()
            if failure is None:
                answer = task.result()
                # The result and the last feedback travel on different topics: the result may come first. What the
                # feedback did not bring yet is sent as the last piece, so the pieces always make the whole answer.
                if answer.answer.startswith(streamed) and len(answer.answer) > len(streamed):
                    await send(response, "text", {"text": answer.answer[len(streamed):], "tokens": answer.tokens})
                await send(response, "done", {"answer": answer.answer, "concepts": answer.concepts_used,
                                              "latency": round(answer.latency_sec, 3), "tokens": answer.tokens,
                                              "frame": wanted})
            else:
                await send(response, "error", {"error": node_message(failure, self.bridge.node)})
        except ConnectionError:  # the page went away (closed, or Stop): stop generating on the node
            task.cancel()
        except asyncio.CancelledError:  # the server is stopping
            task.cancel()
            raise
        return response

    # -- the node

    async def _require_node(self) -> None:
        """Wait (up to the command's --timeout) for the node's services to be seen: just after start, or after the
        node restarted, discovery takes a moment."""
        deadline = time.monotonic() + self.bridge.commander.timeout
        while not self.bridge.node_ready():
            if time.monotonic() > deadline:
                raise NodeAbsent(f"the ego node {self.bridge.node} is not running or not active (start it with "
                                 "'ego-ros node', or wait for it to load its model)")
            await asyncio.sleep(0.1)

    async def _node(self, task):
        """The task's result; its failure becomes the page's message (:func:`node_message`)."""
        from ego_ros.ros.client import NodeInactive, NodeNotFound

        try:
            return await task
        except (NodeNotFound, NodeInactive) as absent:
            raise NodeAbsent(node_message(absent, self.bridge.node)) from None
        except Exception as refused:  # noqa: BLE001 - NodeError: the node's own message
            raise NodeRefused(node_message(refused, self.bridge.node)) from None

    async def _find_memory_dir(self) -> None:
        """The node's memory_dir parameter (empty: this machine's default), once, unless --memory-dir was given."""
        if self._memory_dir_known:
            return
        try:
            values = await self.bridge.commander.parameters(["memory_dir"])
        except Exception:  # noqa: BLE001 - no node: try again at the next picture
            return
        given = values.get("memory_dir") or ""
        if given:
            self.pictures.memory_dir = Path(given).expanduser()
        else:
            from ego_ros.engine.config import default_memory_dir

            self.pictures.memory_dir = default_memory_dir()
        self._memory_dir_known = True


class NodeAbsent(Exception):
    """503: the node is not there."""


class NodeRefused(Exception):
    """422: the node answered with a refusal."""


def last_visit(visits, now: float) -> dict | None:
    """The newest visit as the page shows it ("last seen 12 s ago, camera ..." beside its crop), or None: never seen,
    or the node could not say (an older node without ``last_seen``: the page then shows no line at all)."""
    if isinstance(visits, BaseException) or not visits:
        return None
    visit = visits[0]
    crop = bytes(visit.crop.data)
    return {"seen": seconds(visit.last_seen), "ago": round(max(0.0, now - seconds(visit.last_seen)), 1),
            "camera": visit.camera, "score": round(float(visit.best_score), 3), "sightings": visit.sightings,
            "crop": "data:image/jpeg;base64," + base64.b64encode(crop).decode() if crop else None}


def node_message(failure: BaseException, node: str) -> str:
    from ego_ros.ros.client import NodeInactive, NodeNotFound

    if isinstance(failure, NodeNotFound):
        return f"no ego node answering at {node}: start one with 'ego-ros node' (or scripts/run.sh)"
    if isinstance(failure, NodeInactive):
        return f"the ego node {node} is running but not active: it may still be loading its model"
    return " ".join(str(failure).split()) or type(failure).__name__


async def json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the request is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the request must be a JSON object")
    return body


async def start_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, event: str, data: dict) -> None:
    """One Server-Sent Event (JSON data on one line), flushed at once."""
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


def make_app(bridge, *, token: str | None, memory_dir: Path | None = None) -> web.Application:
    """The page and its API over ``bridge``; ``token`` None: loopback only (see :mod:`ego_ros.web.guard`)."""
    guard = Guard(token)
    api = Api(bridge, Pictures(memory_dir), memory_dir_given=memory_dir is not None)

    @web.middleware
    async def checks(request: web.Request, handler):
        refusal = guard.refusal(request.method, request.path, request.headers, request.query)
        if refusal is not None:
            return error(403, refusal)
        try:
            response = await handler(request)
        except BadInput as bad:
            response = error(400, str(bad))
        except FrameGone as gone:
            response = error(410, str(gone))
        except NodeRefused as refused:
            response = error(422, str(refused))
        except NodeAbsent as absent:
            response = error(503, str(absent))
        except ValueError as bad:  # sendable_name, region_msg: refused before anything is sent
            response = error(400, str(bad))
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    app = web.Application(middlewares=[checks], client_max_size=64 * 1024)
    app.on_startup.append(api.start)
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))  # none: no 404 in the log
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/status", api.status)
    app.router.add_get("/api/frame", api.frame)
    app.router.add_post("/api/hold", api.hold)
    app.router.add_get("/api/events", api.events)
    app.router.add_get("/api/concepts", api.concepts)
    app.router.add_get("/api/picture", api.picture)
    app.router.add_post("/api/register", api.register)
    app.router.add_post("/api/recognize", api.recognize)
    app.router.add_post("/api/ask", api.ask)
    app.router.add_post("/api/forget", api.forget)
    return app
