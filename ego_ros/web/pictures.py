# SPDX-License-Identifier: Apache-2.0
"""Each concept's picture on the page: what ``ego-ros show`` draws (:func:`ego_ros.engine.figure.concept_figure`),
as a PNG, from the memory folder the node keeps its concepts in.

The node keeps vectors and views in its memory folder; the page reads that folder directly (it runs on the robot,
beside the node), the one the node's ``memory_dir`` parameter names (empty: this machine's default, as for the
node), unless ``ego-ros web --memory-dir`` says otherwise. A picture is drawn once per concept version (its
``updated`` stamp) and kept.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path


class PictureUnavailable(LookupError):
    """The concept's files are not in the memory folder this page reads (another machine, or just forgotten)."""


class Pictures:
    def __init__(self, memory_dir: Path | None = None, max_cached: int = 64):
        self.memory_dir = memory_dir
        self._cache: dict[tuple[str, float], bytes] = {}
        self._max_cached = max_cached
        self._lock = threading.Lock()

    def png(self, name: str, updated: float) -> bytes:
        """The figure of ``name`` as of ``updated`` (seconds; the node's ConceptInfo.updated), as PNG bytes.
        Blocking (reads the memory, draws): call it off the event loop."""
        key = (name, updated)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        if self.memory_dir is None:
            raise PictureUnavailable("no memory folder known: pass ego-ros web --memory-dir DIR")
        from ego_ros.engine.figure import concept_figure, load_views
        from ego_ros.engine.memory import MemoryStore

        store = MemoryStore(self.memory_dir, fingerprint=None)
        try:
            memory = store.get(name)
        except KeyError:  # UnknownConcept
            raise PictureUnavailable(f"{name!r} is not in {self.memory_dir} (is the node's memory folder on "
                                     "another machine? pass ego-ros web --memory-dir DIR)") from None
        figure = concept_figure(memory, load_views(self.memory_dir, memory.name, memory.num_views))
        out = io.BytesIO()
        figure.save(out, format="PNG", optimize=True)
        data = out.getvalue()
        with self._lock:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = data
        return data
