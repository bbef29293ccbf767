# SPDX-License-Identifier: Apache-2.0
"""A local vLLM server for tests and benchmarks: ``scripts/serve_vllm.sh`` from the server's venv
(``$EGO_ROS_VLLM_VENV``, default ``.venv-vllm``, made by ``scripts/setup_vllm.sh``), started and stopped here."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def venv() -> Path:
    return Path(os.environ.get("EGO_ROS_VLLM_VENV", REPO / ".venv-vllm"))


def start(model_dir, port: int, log: Path, extra: list[str] = (), timeout: float = 300.0) -> subprocess.Popen:
    """The server on ``model_dir`` at ``port``, once it answers GET /v1/models; RuntimeError with the end of its
    log if it exits or does not answer within ``timeout`` seconds."""
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", str(REPO / "scripts" / "serve_vllm.sh"), str(model_dir), str(port), *extra],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                raise RuntimeError(f"the vLLM server did not start:\n{Path(log).read_text()[-3000:]}") from None
            time.sleep(1)


def stop(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop the server and everything it started (its process group)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
