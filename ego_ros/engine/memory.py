# SPDX-License-Identifier: Apache-2.0
"""Concept memories and their on-disk store.

A concept memory is what Ego keeps of a reference view (Seifi et al., 2025, sec. 3): the top-K_c visual tokens of
each view, in their original order, as vectors already in the LLM's input-embedding space, concatenated over views.
The memory also records what made it (model, fingerprint, layers L, K) because the vectors mean nothing to any
other model.

On disk, under one root folder, each concept is two files:

    {stem}.json                      the commit record: name, model, layers, K, views, and which tensor file is current
    {stem}.{revision}.safetensors    vectors (T, D), indices (T,), view_sizes (V,), grids (V, 3), and for a model
                                     with DeepStack (Qwen3-VL) deepstack (L, T, D): each kept token's features of
                                     the L DeepStack layers (see engine/backends/qwen3_vl.py)

Writes are atomic: the new tensor file is written under a fresh revision name first, then the JSON is replaced in
one rename (the commit point), and only then is the old tensor file deleted. A crash at any point leaves the last
committed concept loadable, and so does a full disk: the write fails with :class:`StoreWriteError`, nothing of it is
left. Files the store cannot trust (another model's, corrupt, tampered with) are skipped with a reason and never
touched: they are the user's data.

Several processes may share one folder (two nodes of a fleet, a node and the offline CLI, a restarted node whose old
process lingers). Writers take the folder's lock (``.lock``, an advisory ``flock``) for each write, and first read
what the others committed, so a write never undoes another's (an append built on a memory that another process
changed meanwhile is refused with ConceptChanged, as on one process). Every read follows the folder: a concept
registered or forgotten by another process is seen at the next access (one ``stat`` of the folder when nothing
changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .backends import SoftTokens

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per folder
    fcntl = None

logger = logging.getLogger("ego_ros.memory")

FORMAT = 1
# A temporary file of an interrupted write untouched this long is garbage (a write takes well under a second).
STALE_TMP_SEC = 600.0
LOCK_FILE = ".lock"  # the writers' lock (flock); a dot file, so no glob of concept files sees it
# A folder changed this recently may change again within its timestamp's granularity (a few ms): read it again.
RACY_SEC = 1.0
# What a full or refusing filesystem answers a write: each becomes one StoreWriteError.
_REFUSED_WRITES = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
MAX_NAME_LENGTH = 64
# What the JSON record holds of a memory and of each view; the tensor file holds the rest (vectors, indices, grids).
_RECORD_FIELDS = ("name", "model", "fingerprint", "layers", "max_tokens_per_view", "created", "updated")
_VIEW_FIELDS = ("keywords", "area_percent", "area_parsed", "num_visual_tokens", "layers", "tiles")
_OPTIONAL_VIEW_FIELDS = ("layers", "tiles")  # absent from records written before they existed
_NAME_RULES = (
    f"a name is 1-{MAX_NAME_LENGTH} characters of ordinary text (letters in any script, digits, spaces, punctuation, "
    "emoji) with no leading or trailing whitespace, no control characters, no '/' or '\\', and not '.' or '..'"
)


class InvalidName(ValueError):
    """A concept name that cannot be stored (it could escape the store folder or is unreadable)."""


class UnknownConcept(KeyError):
    """No concept of that name. str() is the plain message (KeyError's would show it in quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown concept"


class ConceptExists(ValueError):
    """The name is taken, by a loaded concept or by a file this store did not load."""


class ConceptChanged(ValueError):
    """put(expected=...) found another memory under the name (forgotten or replaced meanwhile): nothing written."""


class StoreWriteError(OSError):
    """The folder refused a write (disk full, file too large, read-only, no permission): nothing of it was kept,
    every earlier concept is intact. ``errno`` is the filesystem's."""

    def __str__(self) -> str:
        return str(self.strerror)


_ANY = object()  # put()'s default `expected`: write whatever the name holds now


def validate_name(name: str) -> str:
    """Return `name` NFC-normalised, or raise InvalidName saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidName(f"concept name must be a str, got {type(name).__name__}; {_NAME_RULES}")
    # NFC first, so "Ñ" typed as one or two code points is the same concept and the same file.
    name = unicodedata.normalize("NFC", name)
    shown = repr(name if len(name) <= 40 else name[:40] + "...")  # never echo a huge name in full
    problem = None
    if not name.strip():
        problem = "is empty or only whitespace"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is {len(name)} characters long (the limit is {MAX_NAME_LENGTH})"
    elif bad := next((c for c in name if unicodedata.category(c).startswith("C")), None):
        problem = f"contains the control/format character U+{ord(bad):04X}"
    elif name != name.strip():
        problem = "has leading or trailing whitespace"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif name in (".", ".."):
        problem = "is a relative path"
    if problem:
        raise InvalidName(f"invalid concept name {shown}: it {problem}; {_NAME_RULES}")
    return name


def file_stem(name: str) -> str:
    """File stem for a (valid) name: readable slug + name hash, so no name can leave the root or collide."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_-]", "_", ascii_name)[:32]
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{slug}-{digest}" if slug else digest


@dataclass
class ViewRecord:
    """What was kept of one reference view."""

    grid_thw: tuple[int, int, int]  # the image's patch grid as the model saw it
    indices: list[int]  # kept visual-token indices, ascending (the paper keeps the original order)
    keywords: list[str]  # the VLM's keywords for the subject, whose attention scored the tokens
    area_percent: float  # alpha: how much of the image the subject covers, in percent
    area_parsed: bool  # False when the VLM's answer could not be parsed and a default was used
    num_visual_tokens: int  # N_r: visual tokens of the view before selection
    # The decoder layers whose attention scored this view (eq. 3). Views appended later may have been scored with
    # other layers than the first ones; None only in records written before views kept their own.
    layers: list[int] | None = None
    # InternVL: the (columns, rows) tiles the view was cut into (see token_layout); None for an untiled grid
    tiles: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
        if self.tiles is not None:
            self.tiles = tuple(int(x) for x in self.tiles)
            if len(self.tiles) != 2 or min(self.tiles) < 1:
                raise ValueError(f"tiles: expected two positive ints (columns, rows), got {self.tiles}")
        self.grid_thw = tuple(int(x) for x in self.grid_thw)
        self.indices = [int(i) for i in self.indices]
        if len(self.grid_thw) != 3 or min(self.grid_thw) < 1:
            raise ValueError(f"grid_thw: expected three positive ints (t, h, w), got {self.grid_thw}")
        if self.num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens: expected >= 1, got {self.num_visual_tokens}")
        if any(b <= a for a, b in zip(self.indices, self.indices[1:])):
            raise ValueError("indices: must be strictly ascending")
        if self.indices and not 0 <= self.indices[0] <= self.indices[-1] < self.num_visual_tokens:
            raise ValueError(f"indices: must lie in [0, num_visual_tokens={self.num_visual_tokens})")
        if not isinstance(self.keywords, list) or not all(isinstance(k, str) for k in self.keywords):
            raise ValueError(f"keywords: expected a list of str, got {self.keywords!r}")
        if not (math.isfinite(self.area_percent) and 0 <= self.area_percent <= 100):
            raise ValueError(f"area_percent: expected a percentage in [0, 100], got {self.area_percent}")


@dataclass(eq=False)  # tensors have no truth value, so a generated __eq__ would only raise
class ConceptMemory:
    """One concept: the kept tokens of all its views, and what made them."""

    name: str
    vectors: torch.Tensor  # (T, D): kept tokens of all views, concatenated in view order
    views: list[ViewRecord]  # sum(len(v.indices)) == T
    # What made the vectors: they are only meaningful to this model, at these layers, with this K.
    layers: list[int]
    max_tokens_per_view: int
    model: str
    fingerprint: str
    created: float  # unix seconds
    updated: float
    # (L, T, D) for a model with DeepStack (Qwen3-VL): what the model adds at each kept token's row after decoder
    # layers 0..L-1, so the token enters the decoder as the model saw it; None for other families.
    deepstack: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.name = validate_name(self.name)
        if not isinstance(self.vectors, torch.Tensor) or self.vectors.dim() != 2:
            shape = getattr(self.vectors, "shape", type(self.vectors).__name__)
            raise ValueError(f"vectors: expected a 2-D tensor (T, D), got {shape}")
        if not self.vectors.is_floating_point():
            raise ValueError(f"vectors: expected a floating dtype, got {self.vectors.dtype}")
        if not self.views or not all(isinstance(v, ViewRecord) for v in self.views):
            raise ValueError("views: expected a non-empty list of ViewRecord")
        if (selected := sum(len(v.indices) for v in self.views)) != self.vectors.shape[0]:
            raise ValueError(f"vectors: {self.vectors.shape[0]} rows, but the views select {selected} tokens")
        if not self.layers or not all(isinstance(layer, int) and layer >= 0 for layer in self.layers):
            raise ValueError(f"layers: expected a non-empty list of layer indices, got {self.layers!r}")
        if self.max_tokens_per_view < 1:
            raise ValueError(f"max_tokens_per_view: expected >= 1, got {self.max_tokens_per_view}")
        for i, view in enumerate(self.views):
            if len(view.indices) > self.max_tokens_per_view:
                raise ValueError(f"views[{i}].indices: {len(view.indices)} tokens > max_tokens_per_view")
        if not self.fingerprint:
            raise ValueError("fingerprint: must not be empty")
        if self.deepstack is not None and (
                not isinstance(self.deepstack, torch.Tensor) or self.deepstack.dim() != 3
                or self.deepstack.shape[0] < 1 or self.deepstack.shape[1:] != self.vectors.shape):
            shape = tuple(getattr(self.deepstack, "shape", ()))
            raise ValueError(f"deepstack: expected (L, {self.vectors.shape[0]}, {self.vectors.shape[1]}) beside "
                             f"vectors {tuple(self.vectors.shape)}, got {shape}")

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def num_tokens(self) -> int:
        return self.vectors.shape[0]

    @property
    def keywords(self) -> list[str]:
        return list(dict.fromkeys(k for v in self.views for k in v.keywords))  # union, first-seen order

    @property
    def area_percent(self) -> float:
        return sum(v.area_percent for v in self.views) / len(self.views)

    @property
    def deepstack_layers(self) -> int:
        return 0 if self.deepstack is None else self.deepstack.shape[0]

    @property
    def soft_tokens(self) -> SoftTokens:
        """The memory as a prompt part: vectors, and DeepStack features where the model has them."""
        return SoftTokens(self.vectors, self.deepstack)

    def view_vectors(self, i: int) -> torch.Tensor:
        """Rows of `vectors` kept from view i: (len(views[i].indices), D)."""
        i = range(self.num_views)[i]  # negative indices and IndexError, as for a list
        start = sum(len(v.indices) for v in self.views[:i])
        return self.vectors[start : start + len(self.views[i].indices)]


class _Skip(Exception):
    """A stored concept that load() must leave alone, with the reason; ``retry``: reading it again may succeed
    (another process was replacing it)."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def _identity(path: Path) -> tuple | None:
    """What changes when a file or folder is written, replaced or removed: (mtime_ns, inode, size); None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def _racy(identity: tuple) -> bool:
    """Whether a file or folder changed so recently that a further change might leave its identity as it is."""
    return time.time() - identity[0] / 1e9 <= RACY_SEC


def _revision(stem: str, tensor_name: str) -> int | None:
    """Revision number of a tensor file name of this stem, None if the name is not one of ours."""
    match = re.fullmatch(re.escape(stem) + r"\.([0-9a-f]{1,32})\.safetensors", tensor_name)
    return int(match.group(1), 16) if match else None


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable. Some platforms (Windows) cannot open a folder; there is nothing to do there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part.

    The rename is durable only once the caller fsyncs the folder (put orders two renames with it)."""
    # Temp names start with "." and end with ".tmp": load() never mistakes them for concept files.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MemoryStore:
    """The concepts of one model, persisted under `root`. Thread-safe.

    With ``fingerprint=None`` the store reads every model's concepts (for listing, showing and forgetting them
    without loading a model) and refuses to write: a memory is only ever written by the model that made it.
    """

    def __init__(self, root: Path | str, fingerprint: str | None, hidden_size: int | None = None,
                 deepstack_layers: int | None = None):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.hidden_size = hidden_size
        self.deepstack_layers = deepstack_layers  # the model's DeepStack layers (0: none); None: any
        self.skipped: list[tuple[Path, str]] = []
        self._memories: dict[str, ConceptMemory] = {}
        self._tensor_files: dict[str, str] = {}  # name -> committed tensor file name
        self._files: dict[str, tuple] = {}  # record file name -> (its stat identity, what it held: a name or a reason)
        self._folder_seen: tuple | None = None  # the folder's stat identity at the last full read, if not racy
        self._lock = threading.RLock()
        if fingerprint is not None:  # a reader does not create the folder just to look into it
            self.root.mkdir(parents=True, exist_ok=True)
        self.load()

    def load(self) -> None:
        """(Re)read every committed concept under root; skip, log and keep any file that cannot be trusted."""
        with self._lock:
            self._memories, self._tensor_files, self._files, self._folder_seen = {}, {}, {}, None
            self._follow()

    def _follow(self) -> None:
        """Catch up with the folder (call with the lock held): read the records that are new or changed since the
        last look, drop the concepts whose records are gone. One stat when the folder has not changed."""
        folder = _identity(self.root)
        if folder is not None and folder == self._folder_seen:
            return
        files = {}
        # Temp and orphan tensor files are never looked at: a concept is its .json record.
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            identity = _identity(path)
            if identity is None:
                continue  # removed since the glob
            known = self._files.get(path.name)
            files[path.name] = known if known is not None and known[0] == identity else (identity, self._take(path))
            if _racy(identity):  # may be replaced again unseen (same tick, a reused inode): look again next time
                files[path.name] = (None, files[path.name][1])
        held = {what for _, what in files.values() if isinstance(what, str)}
        for name in [name for name in self._memories if name not in held]:  # forgotten by another process
            del self._memories[name], self._tensor_files[name]
        self._files = files
        self.skipped = [(self.root / file, what.reason) for file, (_, what) in sorted(files.items())
                        if isinstance(what, _Skip)]
        # A folder changed within its timestamps' granularity (a few ms) may change again unseen: look again.
        self._folder_seen = folder if folder is not None and not _racy(folder) else None

    def _take(self, path: Path) -> str | _Skip:
        """Read one record into the store: the concept's name, or the _Skip saying why not (logged once per
        version of the file). A record that names the tensor file already held keeps its memory object, so that a
        caller's ``expected`` memory stays valid across a look at the folder."""
        for attempt in range(3):
            try:
                if (name := self._holds(path)) is not None:
                    return name
                memory, tensor_name = self._read(path)
            except Exception as e:  # whatever is wrong with one file must not stop the others loading
                if isinstance(e, _Skip) and e.retry and attempt < 2:
                    continue  # another process replaced the record and deleted its old tensor file meanwhile
                skip = e if isinstance(e, _Skip) else _Skip(f"unreadable ({type(e).__name__}: {e})")
                logger.warning("skipping concept file %s: %s", path, skip.reason)
                return skip
            self._memories[memory.name], self._tensor_files[memory.name] = memory, tensor_name
            return memory.name

    def _holds(self, path: Path) -> str | None:
        """The name of the concept ``path`` records, if this store already holds that very revision of it."""
        try:
            record = json.loads(path.read_bytes())
            name, tensors = record["name"], record["tensors"]
        except Exception:  # noqa: BLE001 - _read says what is wrong with it
            return None
        if isinstance(name, str) and name in self._tensor_files and self._tensor_files[name] == tensors \
                and path.name == f"{file_stem(name)}.json":
            return name
        return None

    def names(self) -> list[str]:
        """Concept names, oldest first."""
        with self._lock:
            self._follow()
            return self._names()

    def get(self, name: str) -> ConceptMemory:
        """The memory of `name` (shared with the store: do not modify it)."""
        name = validate_name(name)
        with self._lock:
            self._follow()
            if name not in self._memories:
                raise self._unknown(name)
            return self._memories[name]

    def __contains__(self, name: object) -> bool:
        try:
            name = validate_name(name)
        except InvalidName:
            return False
        with self._lock:
            self._follow()
            return name in self._memories

    def __len__(self) -> int:
        with self._lock:
            self._follow()
            return len(self._memories)

    def find(self, name: str) -> ConceptMemory | None:
        """The memory of `name`, or None when there is none (one look under the lock, unlike `in` then get)."""
        name = validate_name(name)
        with self._lock:
            self._follow()
            return self._memories.get(name)

    def snapshot(self, names: list[str] | None = None) -> dict[str, ConceptMemory]:
        """{name: memory} of `names` (None: every concept, oldest first), read together under the lock.

        A reader on another thread (recognition on the inference worker) sees one consistent set even while a
        concept is forgotten, instead of listing names and then failing on one removed in between. A name asked
        for explicitly that is unknown raises UnknownConcept.
        """
        with self._lock:
            self._follow()
            if names is None:
                return {name: self._memories[name] for name in self._names()}
            result = {}
            for name in names:
                name = validate_name(name)
                if name not in self._memories:
                    raise self._unknown(name)
                result[name] = self._memories[name]
            return result

    def put(self, memory: ConceptMemory, *, replace: bool = True, expected=_ANY) -> None:
        """Persist `memory` atomically and make it the current memory of its name.

        ``expected``: the memory (as returned by get/find, or None for "no concept of that name") that the caller
        built `memory` from; if the name holds anything else now (forgotten or replaced meanwhile), nothing is
        written and ConceptChanged is raised. This is what keeps an append from resurrecting a forgotten concept.
        """
        # A copy, validated again (the dataclass is mutable), that is what a reload would give: vectors on CPU.
        vectors = memory.vectors.detach().to("cpu").contiguous()
        deepstack = memory.deepstack.detach().to("cpu").contiguous() if memory.deepstack is not None else None
        memory = dataclasses.replace(memory, vectors=vectors, deepstack=deepstack,
                                     views=[dataclasses.replace(v) for v in memory.views])
        if self.fingerprint is None:
            raise ValueError("this store reads every model's concepts and cannot write; open it with a fingerprint")
        if memory.fingerprint != self.fingerprint:
            raise ValueError(f"fingerprint: memory made by {memory.fingerprint!r}, this store is {self.fingerprint!r}")
        if self.hidden_size is not None and vectors.shape[1] != self.hidden_size:
            raise ValueError(f"vectors: width {vectors.shape[1]} != store hidden_size {self.hidden_size}")
        if self.deepstack_layers is not None and memory.deepstack_layers != self.deepstack_layers:
            raise ValueError(f"deepstack: the memory has {memory.deepstack_layers} DeepStack layers, this model "
                             f"{self.deepstack_layers}")
        name, stem = memory.name, file_stem(memory.name)
        json_path = self.root / f"{stem}.json"
        with self._lock, self._writing(f"store concept {name!r}"):
            old_tensor_name = self._tensor_files.get(name)
            if expected is not _ANY and self._memories.get(name) is not expected:
                now = "was forgotten" if name not in self._memories else "was changed"
                raise ConceptChanged(f"concept {name!r} {now} while this memory was being built; nothing was stored")
            if old_tensor_name is not None and not replace:
                raise ConceptExists(f"a concept named {name!r} already exists")
            if old_tensor_name is None and json_path.exists():
                # A skipped file (another model's, corrupt) holds this name's slot: it is the user's, not ours.
                why = next((r for p, r in self.skipped if p == json_path), "unreadable")
                raise ConceptExists(f"{json_path} holds a concept this store did not load ({why}); move it away first")
            # A new revision name, never the committed one, so the commit below is the only thing readers can see.
            revision = max(time.time_ns(), (_revision(stem, old_tensor_name or "") or 0) + 1)
            tensor_name = f"{stem}.{revision:016x}.safetensors"
            data = safetensors.torch.save(
                {
                    "vectors": vectors,  # (T, D), dtype as given (bf16 included)
                    "indices": torch.tensor([i for v in memory.views for i in v.indices], dtype=torch.int64),  # (T,)
                    "view_sizes": torch.tensor([len(v.indices) for v in memory.views], dtype=torch.int64),  # (V,)
                    "grids": torch.tensor([v.grid_thw for v in memory.views], dtype=torch.int64).reshape(-1, 3),
                    **({"deepstack": deepstack} if deepstack is not None else {}),  # (L, T, D)
                },
                metadata={"name": name, "fingerprint": self.fingerprint},
            )
            record = {
                "format": FORMAT,
                **{field: getattr(memory, field) for field in _RECORD_FIELDS},
                "tensors": tensor_name,  # the commit: which revision of the tensors is current
                "sha256": hashlib.sha256(data).hexdigest(),
                "views": [{field: getattr(v, field) for field in _VIEW_FIELDS} for v in memory.views],
            }
            _atomic_write(self.root / tensor_name, data)
            _fsync_dir(self.root)  # the tensor file must be durable before the record that names it
            try:
                _atomic_write(json_path, json.dumps(record, ensure_ascii=False, indent=2).encode())  # the commit
            except BaseException:
                with contextlib.suppress(OSError):  # best effort; a real crash leaves an orphan that load ignores
                    os.unlink(self.root / tensor_name)
                raise
            self._memories[name], self._tensor_files[name] = memory, tensor_name
            _fsync_dir(self.root)  # the commit must be durable before the old revision goes
            if old_tensor_name is not None:
                self._unlink_quietly(self.root / old_tensor_name)

    def remove(self, name: str) -> None:
        name = validate_name(name)
        with self._lock, self._writing(f"forget concept {name!r}"):
            if name not in self._memories:
                raise self._unknown(name)
            with contextlib.suppress(FileNotFoundError):  # uncommit first: a crash now leaves only an orphan
                os.unlink(self.root / f"{file_stem(name)}.json")
            del self._memories[name]
            tensor_name = self._tensor_files.pop(name)
            _fsync_dir(self.root)
            self._unlink_quietly(self.root / tensor_name)

    def gc(self, stale_tmp_sec: float = STALE_TMP_SEC) -> list[Path]:
        """Delete what crashes leave behind: tensor files older than the committed revision of a loaded concept,
        and temporary files of interrupted writes (``.*.tmp``) untouched for ``stale_tmp_sec`` (a younger one
        may be another process's write in progress)."""
        deleted = []
        now = time.time()
        for path in self.root.glob(".*.tmp") if self.root.is_dir() else []:
            try:
                if now - path.stat().st_mtime > stale_tmp_sec:
                    self._unlink_quietly(path)
                    deleted.append(path)
            except FileNotFoundError:
                pass  # its writer renamed or removed it meanwhile
        with self._lock:
            for name, tensor_name in self._tensor_files.items():
                stem = file_stem(name)
                committed = _revision(stem, tensor_name)
                for path in self.root.glob(f"{stem}.*.safetensors"):
                    # Newer revisions may be another process's write in progress: leave them.
                    if (revision := _revision(stem, path.name)) is not None and revision < committed:
                        self._unlink_quietly(path)
                        deleted.append(path)
        return deleted

    def _read(self, json_path: Path) -> tuple[ConceptMemory, str]:
        """Load one concept from its commit record, or raise _Skip (or anything else) saying why not."""
        record = json.loads(json_path.read_bytes())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise _Skip(f"not a format-{FORMAT} concept record")
        try:
            name = validate_name(record["name"])
        except InvalidName as e:
            raise _Skip(str(e)) from None
        if name != record["name"] or json_path.name != f"{file_stem(name)}.json":
            raise _Skip(f"the record for {name!r} belongs in {file_stem(name)}.json, not {json_path.name}")
        if self.fingerprint is not None and record["fingerprint"] != self.fingerprint:
            raise _Skip(f"made by another model ({record.get('model')!r}, fingerprint {record['fingerprint']!r}); "
                        f"this store expects {self.fingerprint!r}")
        tensor_name = record["tensors"]
        if not isinstance(tensor_name, str) or _revision(file_stem(name), tensor_name) is None:
            raise _Skip(f"tensor file name {tensor_name!r} is not one of this concept's")
        try:
            data = (self.root / tensor_name).read_bytes()
        except FileNotFoundError:
            raise _Skip(f"its tensor file {tensor_name} is missing", retry=True) from None
        if (digest := hashlib.sha256(data).hexdigest()) != record["sha256"]:
            raise _Skip(f"checksum mismatch for {tensor_name}: record says {record['sha256']}, file is {digest}")
        try:
            tensors = safetensors.torch.load(data)
            header_size = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        except Exception as e:
            raise _Skip(f"{tensor_name} is not a valid safetensors file ({e})") from None
        if metadata.get("name") != name or metadata.get("fingerprint") != record["fingerprint"]:
            raise _Skip(f"{tensor_name} was written for another concept or model")
        vectors = tensors["vectors"]  # (T, D)
        if self.hidden_size is not None and (vectors.dim() != 2 or vectors.shape[1] != self.hidden_size):
            raise _Skip(f"vectors have shape {tuple(vectors.shape)}, but the model's hidden size is {self.hidden_size}")
        deepstack = tensors.get("deepstack")  # (L, T, D) or absent
        layers = 0 if deepstack is None else deepstack.shape[0]
        if self.deepstack_layers is not None and layers != self.deepstack_layers:
            raise _Skip(f"it holds {layers} DeepStack layers per token, but this model has {self.deepstack_layers}")
        sizes = tensors["view_sizes"].tolist()
        grids_shape, num_indices = tuple(tensors["grids"].shape), tensors["indices"].numel()
        if len(record["views"]) != len(sizes) or grids_shape != (len(sizes), 3) or sum(sizes) != num_indices:
            raise _Skip("the record's views do not match the tensor file")
        views = [
            ViewRecord(grid_thw=grid, indices=indices.tolist(),
                       **{field: view.get(field) if field in _OPTIONAL_VIEW_FIELDS else view[field]
                          for field in _VIEW_FIELDS})
            for grid, indices, view in zip(tensors["grids"].tolist(), tensors["indices"].split(sizes), record["views"])
        ]
        fields = {field: record[field] for field in _RECORD_FIELDS}
        return ConceptMemory(vectors=vectors, views=views, deepstack=deepstack, **fields), tensor_name

    @contextlib.contextmanager
    def _writing(self, what: str):
        """The folder's write lock, held for one write, after catching up with what other processes committed
        (call with the thread lock held). A write the filesystem refuses becomes one StoreWriteError."""
        lock = None
        try:
            if fcntl is not None and self.root.is_dir():
                lock = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._follow()
            yield
        except OSError as error:
            if isinstance(error, StoreWriteError) or error.errno not in _REFUSED_WRITES:
                raise
            raise StoreWriteError(error.errno, f"could not {what} in {self.root}: {error.strerror or error}; nothing "
                                  "of it was kept, and every earlier concept is intact") from error
        finally:
            if lock is not None:
                os.close(lock)  # releases the flock

    def _names(self) -> list[str]:  # call with the lock held
        return [m.name for m in sorted(self._memories.values(), key=lambda m: (m.created, m.name))]

    def _unknown(self, name: str) -> UnknownConcept:  # call with the lock held
        known = ", ".join(repr(n) for n in self._names()) or "none"
        return UnknownConcept(f"no concept named {name!r}; known concepts: {known}")

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        # Only ever called on files no commit record points to: failing to delete one costs disk, not correctness.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("could not delete %s: %s", path, e)
