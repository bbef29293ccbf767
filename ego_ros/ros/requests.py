# SPDX-License-Identifier: Apache-2.0
"""What a request may ask of the node, and how a refusal quotes it.

Every bound here is about the node's survival, not the model's quality: a request is untrusted input. Without
them a 100,000-character question held the model for 90 s, an ``Ask`` with ``max_new_tokens`` = 2^32-1 generated
without end (a service cannot be cancelled), and a 10,000-character camera name came back whole in the refusal
and the log.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")

# The question is text for the prompt; a page of it is plenty.
MAX_QUESTION_CHARS = 4000
# The same bound as the max_new_tokens parameter's range.
MAX_ANSWER_TOKENS = 8192
# Reference views in one registration (given, or num_views taken from the buffer).
MAX_VIEWS = 16
# Concept names listed in one request.
MAX_REQUEST_CONCEPTS = 64
# Images in requests and camera frames: up to 8K UHD (7680x4320). Checked from the header fields (or the PNG/JPEG
# header) before anything is decoded or allocated: a 62 KB PNG can claim 8000x8000 (192 MB decoded).
MAX_REQUEST_PIXELS = 7680 * 4320
# Qwen2.5-VL's image processor refuses images more elongated than this (its smart_resize).
MAX_ASPECT_RATIO = 200
# A refusal quotes at most this many characters of a field that was sent, and is at most MAX_MESSAGE_CHARS long.
SHOWN_CHARS = 60
MAX_MESSAGE_CHARS = 600
# Request ids (RegisterConcept, ForgetConcept): how long and how many the node remembers, and their length.
REQUEST_ID_KEEP_SEC = 600.0
MAX_REMEMBERED_REQUESTS = 1024
MAX_REQUEST_ID_CHARS = 128


class RequestError(ValueError):
    """A request that cannot be served as asked; the message says what to fix."""


def shown(text, limit: int = SHOWN_CHARS) -> str:
    """``repr(text)`` of at most ``limit`` characters of it, saying how long it really was when cut."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def message_of(error: BaseException) -> str:
    """The refusal for ``error``: its message (with the type for unexpected ones), at most MAX_MESSAGE_CHARS.

    Expected: bad input (ValueError, KeyError), and errors that say they are (``expected = True``: a vLLM server
    gone, engine/vllm_server.ServerError, whose message is already one line for the user)."""
    text = str(error) or type(error).__name__
    if not isinstance(error, (ValueError, KeyError)) and not getattr(error, "expected", False):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 20] + f"... ({len(text)} chars)"


def check_request(request) -> None:
    """Refuse what no request may ask for, from the cheap fields alone, before anything is converted or queued."""
    question = getattr(request, "question", None)
    if question is not None and len(question) > MAX_QUESTION_CHARS:
        raise RequestError(f"the question is {len(question)} characters long; at most {MAX_QUESTION_CHARS}")
    tokens = getattr(request, "max_new_tokens", None)
    if tokens is not None and tokens > MAX_ANSWER_TOKENS:
        raise RequestError(f"max_new_tokens {tokens} is more than the {MAX_ANSWER_TOKENS} a request may ask for "
                           "(0 = the node's default)")
    views = getattr(request, "views", None)
    if views is not None and len(views) > MAX_VIEWS:
        raise RequestError(f"{len(views)} views given; at most {MAX_VIEWS} per request (append adds more)")
    num_views = getattr(request, "num_views", None)
    if num_views is not None and num_views > MAX_VIEWS:
        raise RequestError(f"num_views {num_views}: at most {MAX_VIEWS} views per request (append adds more)")
    concepts = getattr(request, "concepts", None)
    if concepts is not None and len(concepts) > MAX_REQUEST_CONCEPTS:
        raise RequestError(f"{len(concepts)} concepts named; at most {MAX_REQUEST_CONCEPTS}")
    request_id = getattr(request, "request_id", None)
    if request_id is not None and len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_CHARS}")


def check_model_can_take(image) -> None:
    """Refuse a (decoded, downscaled) image the model's processor would refuse, so that a camera sending such
    frames is told once, on arrival, instead of failing every later recognition."""
    height, width = np.asarray(image).shape[:2]  # (H, W, 3) RGB
    if min(height, width) < 1 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise RequestError(f"a {width}x{height} image is more elongated than the model takes (aspect ratio at most "
                           f"{MAX_ASPECT_RATIO})")


class RepeatedRequests:
    """The answers of requests that carry a request id, remembered for ``keep_sec`` (at most ``max_kept``).

    A client that got no answer cannot tell a request lost on the way (DDS discovery drops the first request of a
    fresh client now and then) from a slow one, so it sends it again with the same id. :meth:`answer` carries out
    the first and gives every repetition the first one's answer, waiting for it while it is still being carried
    out: a registration sent twice registers once.
    """

    def __init__(self, keep_sec: float = REQUEST_ID_KEEP_SEC, max_kept: int = MAX_REMEMBERED_REQUESTS,
                 clock: Callable[[], float] = time.monotonic):
        self.keep_sec, self.max_kept, self._clock = keep_sec, max_kept, clock
        self._lock = threading.Lock()
        self._answers: OrderedDict[tuple, tuple[Future, float]] = OrderedDict()  # key -> (answer, when asked)
        self.repeated = 0  # repetitions answered from memory

    def answer(self, key: tuple, request_id: str, work: Callable[[], T]) -> T:
        """``work()``'s result, once per ``(key, request_id)``; an empty id (or one too long to be one: ``work``
        refuses it) is never remembered."""
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            return work()
        key = (*key, request_id)
        with self._lock:
            now = self._clock()
            while self._answers and (len(self._answers) >= self.max_kept
                                     or now - next(iter(self._answers.values()))[1] > self.keep_sec):
                self._answers.popitem(last=False)  # the oldest first: asked earliest
            known = self._answers.get(key)
            if known is None:
                answer: Future = Future()
                self._answers[key] = (answer, now)
            else:
                self.repeated += 1
        if known is not None:
            return known[0].result()
        try:
            result = work()
        except BaseException as error:
            answer.set_exception(error)
            raise
        answer.set_result(result)
        return result
