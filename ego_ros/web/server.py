# SPDX-License-Identifier: Apache-2.0
"""``ego-ros web``: start the bridge to the node, serve the page, print where it is, run until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

from ego_ros.web.guard import is_loopback, new_token

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def page_url(host: str, port: int, token: str | None) -> str:
    """The address to open: a wildcard host is shown as this machine's name; the token goes in the fragment."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"#token={token}" if token else "")


async def _serve(app, host: str, port: int, say) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as error:  # the port is taken, the address is not this machine's...
            raise OSError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
        bound = site._server.sockets[0].getsockname()[1]  # the real port when --port 0 asked for any free one
        say(bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, node: str | None = None, camera: str,
          memory_dir: Path | None = None, timeout: float | None = None) -> int:
    """Serve the page until SIGINT/SIGTERM. Bound beyond loopback, a token is made and printed in the address."""
    from ego_ros.web.app import make_app
    from ego_ros.web.bridge import NODE_TIMEOUT, RobotBridge
    from ego_ros.web.frames import FrameStore

    token = None if is_loopback(host) else new_token()
    bridge = RobotBridge(node, camera, FrameStore(), timeout=timeout or NODE_TIMEOUT)
    try:
        app = make_app(bridge, token=token, memory_dir=memory_dir)

        def say(bound: int) -> None:
            where = "this machine only" if token is None else "the network: the token is needed, it is in the address"
            print(f"ego-ros web: serving {page_url(host, bound, token)} ({where}; node {bridge.node}, camera "
                  f"{bridge.camera}); Ctrl-C stops it", flush=True)

        asyncio.run(_serve(app, host, port, say))
    finally:
        bridge.close()
    print("ego-ros web: stopped", file=sys.stderr, flush=True)
    return 0
