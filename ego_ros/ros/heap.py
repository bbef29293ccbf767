# SPDX-License-Identifier: Apache-2.0
"""Give the memory freed with the model back to the system.

glibc's malloc keeps freed memory for later allocations, in one arena per thread that allocates at the same time
(up to 8 per core). A model and its generations leave many small blocks, from the worker's thread and the
executor's, and the pages between the blocks still in use stay resident after everything else is freed. Measured
on the node's process with the tiny model, four activate / register (8 views) / ask (200 tokens) / deactivate
cycles, MB of RSS after each deactivate (the first cycle also imports torch and transformers, and sets up what a
first generation does once: ~437 MB is the level before the later activates):

    glibc defaults                          457  491  508  548
    malloc_trim(0) after the release        437  441  463  484
    and at most 2 arenas                    436  441  437  441

So the node caps the arenas when it starts (:func:`limit_arenas`, before any thread allocates) and trims the heap
once the model is released (:func:`trim_heap`). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
ARENAS = 2


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)``: threads share that many arenas, so freed memory is not scattered over
    one per thread. Call it before threads are started. False where the C library is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas))


def trim_heap() -> bool:
    """``malloc_trim(0)``: every arena's free pages back to the system. False where the C library is not glibc (or
    nothing could be given back)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
