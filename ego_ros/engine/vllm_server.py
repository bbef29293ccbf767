# SPDX-License-Identifier: Apache-2.0
"""Answers and recognition from a vLLM server (``generation: vllm``), over its OpenAI-compatible chat API.

The engine keeps what no serving engine returns or does: the vision encoder (frames become the embeddings it
already computes), eq. 3's attention pass at registration, the memories. What it sends is the prompt it would
have run itself, part by part: text as text, a frame as an ``image_embeds`` item with its own grid, a memory as an
``image_embeds`` item on its synthetic grid (``memory_layout: image``, ``backends.qwen2_5_vl.memory_grid``). The
server renders the same chat template over the same parts, so its tokens are the engine's (tested: greedy answers
identical, P(yes) within float tolerance). A server is shared: several robots' nodes send it requests, and it
batches them (continuous batching) instead of queueing them behind one thread.

The server is started apart, in its own venv (``scripts/setup_vllm.sh``), for example::

    vllm serve MODEL --enable-mm-embeds --logprobs-mode processed_logprobs --limit-mm-per-prompt '{"image": 16}'

``--logprobs-mode processed_logprobs`` makes a recognition's log-probabilities those of the yes/no tokens alone
(``allowed_token_ids``), the engine's own softmax over them. Only the standard library speaks HTTP here.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

import torch

from .backends import EncodedImage, SoftTokens
from .backends.qwen2_5_vl import memory_grid

# An embedding item larger than this never leaves the engine (a 640x480 frame of a 7B model is ~1.6 MB of float32).
MAX_ITEM_BYTES = 64 * 1024 * 1024


class ServerError(RuntimeError):
    """The vLLM server could not be reached or failed a request: one line, for a user."""

    expected = True  # a node refuses the request with this message alone (ros/requests.message_of)


class WrongModel(ServerError):
    """The vLLM server serves another model than the engine's weights."""


class VllmServer:
    """One vLLM server's OpenAI-compatible API, for one engine's prompts."""

    def __init__(self, url: str, backend, *, hidden_size: int, timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"vllm_url must be an http(s) URL, got {url!r}")
        self.url = url.rstrip("/")
        self.backend = backend  # the engine's: its merge size, and a Qwen3-VL part's DeepStack rows
        self.hidden_size = hidden_size
        self.timeout = timeout
        self.model: str | None = None  # the served model's id, once the server was reached and checked
        self.last_error: str | None = None  # the last request's failure, None once one succeeds (diagnostics)

    # --- the model it serves ------------------------------------------------------------------------------------

    def served_model(self) -> str:
        """The id of the one model the server serves (GET /v1/models)."""
        models = [m["id"] for m in self._request("GET", "/v1/models")["data"]]
        if len(models) != 1:
            raise ServerError(f"vLLM server at {self.url} serves {len(models)} models ({', '.join(models)}); "
                              "ego_ros needs one")
        return models[0]

    # --- requests -----------------------------------------------------------------------------------------------

    def generate(self, parts: list, max_tokens: int, *, on_text: Callable[[str], None] | None = None,
                 on_new_text: Callable[[str, int], None] | None = None, cancel: threading.Event | None = None,
                 banned: list[int] = ()) -> tuple[str, int]:
        """Greedy answer to the prompt ``parts``: (text, tokens), streamed as the engine streams its own:
        ``on_new_text`` gets each piece and the count so far, ``on_text`` the answer so far. ``banned`` tokens are
        never generated (the engine's placeholder and chat-control tokens). Setting ``cancel`` closes the stream,
        which aborts the request on the server."""
        body = self._body(parts, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                          logit_bias={str(t): -100 for t in banned})
        text, pieces, tokens, finished = "", 0, 0, None
        with self._open("POST", "/v1/chat/completions", body) as response:
            for line in self._lines(response):
                if cancel is not None and cancel.is_set():
                    break
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    finished = choice.get("finish_reason") or finished
                    piece = choice.get("delta", {}).get("content") or ""
                    if not piece:
                        continue
                    text, pieces = text + piece, pieces + 1
                    if on_new_text is not None:
                        on_new_text(piece, pieces)
                    if on_text is not None:
                        on_text(text)
        if finished is None and not (cancel is not None and cancel.is_set()):
            self.last_error = f"vLLM server at {self.url} ended the answer's stream before the answer ended"
            raise ServerError(self.last_error)
        if finished == "stop" and tokens:  # the server counts the end-of-turn token; the engine does not
            tokens -= 1
        return text, tokens or pieces

    def yes_probability(self, parts: list, yes: list[int], no: list[int]) -> float:
        """P(yes) of the next token after ``parts``, over the yes and no tokens alone (the engine's softmax)."""
        allowed = sorted(set(yes) | set(no))
        found = self.top_logprobs(parts, len(allowed), allowed_token_ids=allowed)
        total = sum(math.exp(lp) for lp in found.values())
        return sum(math.exp(found[t]) for t in yes if t in found) / total

    def top_logprobs(self, parts: list, k: int, *, model: str | None = None, **options) -> dict[int, float]:
        """{token id: log-probability} of the ``k`` likeliest next tokens after ``parts``."""
        body = self._body(parts, model=model, max_tokens=1, logprobs=True, top_logprobs=k,
                          return_tokens_as_token_ids=True, **options)
        (first,) = self._request("POST", "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"][:1]
        return {int(t["token"].split(":", 1)[1]): t["logprob"] for t in first["top_logprobs"]}

    # --- the prompt -----------------------------------------------------------------------------------------------

    def _body(self, parts: list, model: str | None = None, **options) -> dict:
        return {"model": model or self.model or self.served_model(), "temperature": 0.0, "seed": 0,
                "messages": [{"role": "user", "content": [self._content(part) for part in parts]}], **options}

    def _content(self, part) -> dict:
        if isinstance(part, str):
            return {"type": "text", "text": part}
        if isinstance(part, EncodedImage):
            return self._embeds(part, part.features, part.grid_thw)
        vectors = part.vectors if isinstance(part, SoftTokens) else part
        return self._embeds(part, vectors, memory_grid(vectors.shape[0], self.backend.merge_size))

    def _embeds(self, part, vectors: torch.Tensor, grid: tuple[int, int, int]) -> dict:
        """An ``image_embeds`` item for a frame or a memory ``part``: its vectors (N, D) and their grid, each as
        ``_tensor_base64`` writes it. For a DeepStack family the rows are what vLLM takes for Qwen3-VL: the vectors
        and each DeepStack layer's features side by side, (N, D * (1 + L)), as the backend gives them (zeros for a bare
        memory, as in the engine). Checked here, so that a malformed or oversized embedding never reaches the
        server."""
        t, h, w = grid
        rows = t * h * w // self.backend.merge_size**2
        if vectors.ndim != 2 or vectors.shape != (rows, self.hidden_size):
            raise ValueError(f"embeddings of shape {tuple(vectors.shape)} for a grid of {rows} tokens of width "
                             f"{self.hidden_size}")
        if self.backend.deepstack_layers:
            deepstack = self.backend.deepstack_rows(part)
            vectors = torch.cat([vectors, *deepstack.to(vectors.device, vectors.dtype)], dim=-1)
        elif getattr(part, "deepstack", None) is not None:
            raise ValueError("embeddings with DeepStack features, which this model has no use for")
        vectors = vectors.detach().to("cpu", torch.float32)
        if not torch.isfinite(vectors).all():
            raise ValueError("embeddings hold NaN or infinite values")
        size = vectors.numel() * vectors.element_size()
        if size > MAX_ITEM_BYTES:
            raise ValueError(f"an embedding item of {size} bytes exceeds {MAX_ITEM_BYTES}")
        return {"type": "image_embeds",
                "image_embeds": {"image_embeds": _tensor_base64(vectors),
                                 "image_grid_thw": _tensor_base64(torch.tensor(grid, dtype=torch.int64))}}

    # --- HTTP -----------------------------------------------------------------------------------------------------

    def _lines(self, response):
        """The lines of a streamed response; a connection lost mid-stream is a ServerError."""
        try:
            yield from response
        except (OSError, http.client.HTTPException) as error:
            self.last_error = f"vLLM server at {self.url} failed mid-answer: {error or type(error).__name__}"
            raise ServerError(self.last_error) from error

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def _open(self, method: str, path: str, body: dict | None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            detail = " ".join(error.read().decode(errors="replace").split())[:300]
            self.last_error = f"vLLM server at {self.url} refused {path}: HTTP {error.code} {detail}"
            raise ServerError(self.last_error) from error
        except (urllib.error.URLError, OSError) as error:
            self.last_error = f"vLLM server at {self.url} unreachable: {getattr(error, 'reason', error)}"
            raise ServerError(self.last_error) from error
        self.last_error = None
        return response


def _tensor_base64(tensor: torch.Tensor) -> str:
    """``tensor`` in base64 as vLLM loads an embedding with ``torch.load(weights_only=True)``. Not as .npy, which
    vLLM also takes: it reads an .npy header with ``ast.literal_eval`` on a pool of threads, and concurrent requests
    (one per concept) then fail now and then on CPython 3.11.0-3.11.8 and 3.12.0-3.12.2 with "AST constructor
    recursion depth mismatch" (CPython gh-106905; seen in CI)."""
    buffer = io.BytesIO()
    torch.save(tensor.contiguous().clone(), buffer)  # a copy: torch.save writes a view's whole storage
    return base64.b64encode(buffer.getvalue()).decode()
