# SPDX-License-Identifier: Apache-2.0
"""Tests of the concept memory store: real files under tmp_path, real child processes, no mocks of the store."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ego_ros.engine import memory
from ego_ros.engine.memory import (
    ConceptExists,
    ConceptMemory,
    InvalidName,
    MemoryStore,
    UnknownConcept,
    ViewRecord,
    file_stem,
    validate_name,
)

FP = "tiny-qwen2.5-vl:0123abcd"
HIDDEN = 8
TESTS = Path(__file__).resolve().parent
# Child processes import the package from this checkout and make_memory from this file.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


def make_memory(name="my mug", seed=0, dtype=torch.float32, hidden=HIDDEN, fingerprint=FP, created=1000.0):
    """A two-view memory; `seed` changes the vectors, one index, one area and `updated`."""
    views = [
        ViewRecord((1, 8, 8), [1, 5, 9 + seed], ["mug", "blue"], 12.5 + seed, True, 16),
        ViewRecord((1, 6, 8), [0, 3], ["mug", "handle"], 30.0, False, 12),
    ]
    vectors = torch.randn(5, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return ConceptMemory(name, vectors, views, [3, 5], 4, "tiny-qwen2.5-vl", fingerprint, created, created + seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_same(got: ConceptMemory, want: ConceptMemory) -> None:
    assert same_bits(got.vectors, want.vectors)
    assert got.views == want.views
    for field in ("name", "layers", "max_tokens_per_view", "model", "fingerprint", "created", "updated"):
        assert getattr(got, field) == getattr(want, field), field


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes and mtime: to prove the store touched nothing."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def files_of(root: Path, name: str) -> tuple[Path, Path]:
    """The committed JSON of a concept and the tensor file it points to."""
    json_path = root / f"{file_stem(name)}.json"
    return json_path, root / json.loads(json_path.read_text(encoding="utf-8"))["tensors"]


# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_put_get_round_trip(tmp_path, dtype):
    mug = make_memory(dtype=dtype)
    store = MemoryStore(tmp_path, FP, hidden_size=HIDDEN)
    store.put(mug)
    assert_same(store.get("my mug"), mug)

    loaded = MemoryStore(tmp_path, FP, hidden_size=HIDDEN).get("my mug")
    assert_same(loaded, mug)
    assert loaded.vectors.device.type == "cpu"
    assert (loaded.num_views, loaded.num_tokens) == (2, 5)
    assert loaded.keywords == ["mug", "blue", "handle"]
    assert loaded.area_percent == pytest.approx((12.5 + 30.0) / 2)
    assert same_bits(loaded.view_vectors(0), mug.vectors[:3])
    assert same_bits(loaded.view_vectors(-1), mug.vectors[3:])


def test_update_replaces_and_leaves_one_tensor_file(tmp_path):
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory(seed=0))
    store.put(make_memory(seed=1))
    assert_same(MemoryStore(tmp_path, FP).get("my mug"), make_memory(seed=1))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    with pytest.raises(ConceptExists):
        store.put(make_memory(seed=2), replace=False)


def test_names_are_sorted_by_creation_time(tmp_path):
    store = MemoryStore(tmp_path, FP)
    for name, created in [("b", 3.0), ("c", 1.0), ("a", 2.0)]:
        store.put(make_memory(name, created=created))
    assert store.names() == ["c", "a", "b"]
    assert MemoryStore(tmp_path, FP).names() == ["c", "a", "b"]
    assert len(store) == 3 and "a" in store and "z" not in store


PERSIST_CHILD = """
import json, sys
from ego_ros.engine.memory import MemoryStore
from test_memory import FP, make_memory
store = MemoryStore(sys.argv[1], FP, hidden_size=8)
rex = store.get("Rex")
print(json.dumps({"names": store.names(), "vectors": rex.vectors.tolist(), "views": [v.indices for v in rex.views]}))
store.put(make_memory("小明", seed=2, created=2000.0))
"""


def test_persistence_across_processes(tmp_path):
    rex = make_memory("Rex")
    MemoryStore(tmp_path, FP).put(rex)

    child = subprocess.run([sys.executable, "-c", PERSIST_CHILD, str(tmp_path)], capture_output=True, text=True,
                           env=CHILD_ENV, timeout=120)
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)  # what the child read of the parent's write
    assert seen["names"] == ["Rex"]
    assert torch.equal(torch.tensor(seen["vectors"]), rex.vectors)
    assert seen["views"] == [v.indices for v in rex.views]

    store = MemoryStore(tmp_path, FP)  # what the parent reads of the child's write
    assert store.names() == ["Rex", "小明"]
    assert_same(store.get("小明"), make_memory("小明", seed=2, created=2000.0))


# Crashes


@pytest.mark.parametrize("failing_rename", [".safetensors", ".json"])
def test_failed_rename_keeps_old_commit(tmp_path, monkeypatch, failing_rename):
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory(seed=0))
    committed = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(failing_rename):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(memory.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(make_memory(seed=1))
    monkeypatch.undo()

    fresh = MemoryStore(tmp_path, FP)
    assert fresh.skipped == []
    assert_same(fresh.get("my mug"), make_memory(seed=0))
    assert_same(store.get("my mug"), make_memory(seed=0))
    assert snapshot(tmp_path) == committed  # the failed write cleaned up after itself and touched nothing old


def crash_during_put(root: Path, point: str) -> int:
    """Fork a child that updates the concept and dies at `point` as a killed process would (os._exit: no cleanup,
    no finally blocks). Returns its exit code: 3 if it reached the point."""
    pid = os.fork()
    if pid == 0:
        try:
            real_replace, real_unlink = os.replace, os.unlink

            def replace(src, dst):
                if str(dst).endswith(point):
                    os._exit(3)
                real_replace(src, dst)

            def unlink(path):
                if point == "unlink-old":
                    os._exit(3)
                real_unlink(path)

            os.replace, os.unlink = replace, unlink
            MemoryStore(root, FP).put(make_memory(seed=1))
        finally:
            os._exit(4)  # never return into pytest
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize(
    ("point", "seed_after"),
    [(".safetensors", 0), (".json", 0), ("unlink-old", 1)],  # the JSON rename is the commit point
)
def test_hard_crash_at_any_point_leaves_a_loadable_concept(tmp_path, point, seed_after):
    MemoryStore(tmp_path, FP).put(make_memory(seed=0))
    assert crash_during_put(tmp_path, point) == 3, "the crash point was not reached"
    store = MemoryStore(tmp_path, FP)
    assert store.skipped == []  # temp files and orphan tensor files are not concepts
    assert_same(store.get("my mug"), make_memory(seed=seed_after))


def test_gc_deletes_only_older_orphans(tmp_path):
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory())
    _, tensor = files_of(tmp_path, "my mug")
    revision = int(tensor.name.split(".")[1], 16)
    older = tmp_path / f"{file_stem('my mug')}.{revision - 1:016x}.safetensors"
    newer = tmp_path / f"{file_stem('my mug')}.{revision + 1:016x}.safetensors"
    older.write_bytes(b"orphan")
    newer.write_bytes(b"write in progress")
    assert MemoryStore(tmp_path, FP).skipped == []
    assert store.gc() == [older]
    assert not older.exists() and newer.exists() and tensor.exists()


# Files the store must skip and leave alone


def test_other_models_memory_is_skipped_and_untouched(tmp_path, caplog):
    MemoryStore(tmp_path, "other-model:ffff").put(make_memory("Rex", fingerprint="other-model:ffff"))
    MemoryStore(tmp_path, FP).put(make_memory("Anna"))
    before = snapshot(tmp_path)

    with caplog.at_level("WARNING", logger="ego_ros.memory"):
        store = MemoryStore(tmp_path, FP)
    assert store.names() == ["Anna"]
    [(path, reason)] = store.skipped
    assert path == tmp_path / f"{file_stem('Rex')}.json"
    assert "other-model:ffff" in reason and FP in reason
    assert "other-model:ffff" in caplog.text
    with pytest.raises(ConceptExists, match="other-model"):  # re-registering must not overwrite the user's file
        store.put(make_memory("Rex"))
    assert snapshot(tmp_path) == before


def corrupt_json(json_path, tensor_path):
    json_path.write_text('{"format": 1, "name": "Rex", ', encoding="utf-8")


def truncate_tensor(json_path, tensor_path):
    tensor_path.write_bytes(tensor_path.read_bytes()[:40])


def truncate_tensor_keep_checksum(json_path, tensor_path):
    # A truncated file whose record was rewritten to match: the safetensors parser itself must refuse it.
    import hashlib

    data = tensor_path.read_bytes()[:40]
    tensor_path.write_bytes(data)
    record = json.loads(json_path.read_text(encoding="utf-8"))
    json_path.write_text(json.dumps({**record, "sha256": hashlib.sha256(data).hexdigest()}), encoding="utf-8")


def flip_a_byte(json_path, tensor_path):
    data = bytearray(tensor_path.read_bytes())
    data[-1] ^= 0xFF
    tensor_path.write_bytes(bytes(data))


def delete_tensor(json_path, tensor_path):
    tensor_path.unlink()


def rename_record(json_path, tensor_path):
    json_path.rename(json_path.with_name(f"{file_stem('Someone else')}.json"))


def hostile_name_in_record(json_path, tensor_path):
    record = json.loads(json_path.read_text(encoding="utf-8"))
    json_path.write_text(json.dumps({**record, "name": "../Rex"}), encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_json, "JSONDecodeError"),
        (truncate_tensor, "checksum mismatch"),
        (truncate_tensor_keep_checksum, "not a valid safetensors"),
        (flip_a_byte, "checksum mismatch"),
        (delete_tensor, "missing"),
        (rename_record, "belongs in"),
        (hostile_name_in_record, "path separator"),
    ],
)
def test_damaged_concept_is_skipped_and_untouched(tmp_path, damage, reason):
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory("Rex"))
    store.put(make_memory("Anna"))
    damage(*files_of(tmp_path, "Rex"))
    before = snapshot(tmp_path)

    fresh = MemoryStore(tmp_path, FP)
    assert fresh.names() == ["Anna"]
    [(path, why)] = fresh.skipped
    assert path.suffix == ".json" and reason in why
    assert snapshot(tmp_path) == before


def test_wrong_hidden_size_is_skipped(tmp_path):
    MemoryStore(tmp_path, FP).put(make_memory("Rex", hidden=16))
    MemoryStore(tmp_path, FP).put(make_memory("Anna", hidden=HIDDEN))
    before = snapshot(tmp_path)
    store = MemoryStore(tmp_path, FP, hidden_size=HIDDEN)
    assert store.names() == ["Anna"]
    [(_, reason)] = store.skipped
    assert "16" in reason and "hidden size is 8" in reason
    assert snapshot(tmp_path) == before
    with pytest.raises(ValueError, match="hidden_size"):
        store.put(make_memory("Bob", hidden=16))


def test_put_refuses_another_models_memory(tmp_path):
    store = MemoryStore(tmp_path, FP)
    with pytest.raises(ValueError, match="fingerprint"):
        store.put(make_memory(fingerprint="other"))
    assert list(tmp_path.iterdir()) == []


# Names

HOSTILE = ["", "   ", "../x", "a/b", "a\\b", "..", ".", "x\n", "\x00", " Rex", "Rex\u200b", "x" * 10_000, None]


@pytest.mark.parametrize("name", HOSTILE, ids=lambda name: repr(name)[:12])
def test_hostile_names_are_refused_and_write_nothing(tmp_path, name):
    root = tmp_path / "store"
    store = MemoryStore(root, FP)
    before = snapshot(tmp_path)
    with pytest.raises(InvalidName) as refused:
        make_memory(name)
    assert "characters of ordinary text" in str(refused.value)  # says what is allowed
    assert len(str(refused.value)) < 400  # and never echoes a huge name
    mug = make_memory()
    mug.name = name  # the dataclass is mutable: put must check again
    with pytest.raises(InvalidName):
        store.put(mug)
    with pytest.raises(InvalidName):
        store.get(name)
    assert name not in store
    assert snapshot(tmp_path) == before


FRIENDLY = ["my mug", "Rex", "Anna", "小明", "Ñoño", "Rex 🐶", "R2-D2", "mug (blue)", "x" * 64]


def test_friendly_names_round_trip(tmp_path):
    store = MemoryStore(tmp_path, FP)
    for i, name in enumerate(FRIENDLY):
        store.put(make_memory(name, created=float(i)))
    store = MemoryStore(tmp_path, FP)
    assert store.names() == FRIENDLY
    assert len(list(tmp_path.glob("*.json"))) == len(FRIENDLY)
    assert all(store.get(name).name == name for name in FRIENDLY)


def test_names_are_nfc_normalised():
    decomposed = "N\u0303on\u0303o"  # "Ñoño" typed with combining tildes
    assert validate_name(decomposed) == "Ñoño"
    assert file_stem(validate_name(decomposed)) == file_stem("Ñoño")


def test_names_that_slug_alike_get_different_files(tmp_path):
    assert file_stem("a b").startswith("a_b-") and file_stem("a_b").startswith("a_b-")
    assert file_stem("a b") != file_stem("a_b")
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory("a b", seed=0))
    store.put(make_memory("a_b", seed=1))
    store = MemoryStore(tmp_path, FP)
    assert_same(store.get("a b"), make_memory("a b", seed=0))
    assert_same(store.get("a_b"), make_memory("a_b", seed=1))


# Remove and errors


def test_remove_deletes_files_and_persists(tmp_path):
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory("Rex"))
    store.put(make_memory("Anna"))
    rex_files = files_of(tmp_path, "Rex")
    store.remove("Rex")
    assert not any(p.exists() for p in rex_files)
    assert "Rex" not in store
    assert MemoryStore(tmp_path, FP).names() == ["Anna"]
    with pytest.raises(UnknownConcept):
        store.remove("Rex")


def test_unknown_concept_message_lists_known_names(tmp_path):
    store = MemoryStore(tmp_path, FP)
    store.put(make_memory("Rex", created=1.0))
    store.put(make_memory("小明", created=2.0))
    with pytest.raises(KeyError) as missing:
        store.get("Anna")
    assert isinstance(missing.value, UnknownConcept)
    assert str(missing.value) == "no concept named 'Anna'; known concepts: 'Rex', '小明'"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vectors": torch.zeros(5)}, "vectors"),
        ({"vectors": torch.zeros(4, HIDDEN)}, "vectors"),
        ({"vectors": torch.zeros(5, HIDDEN, dtype=torch.int64)}, "vectors"),
        ({"views": []}, "views"),
        ({"layers": []}, "layers"),
        ({"max_tokens_per_view": 2}, "max_tokens_per_view"),
        ({"fingerprint": ""}, "fingerprint"),
    ],
)
def test_concept_memory_checks_its_fields(change, field):
    fields = {**make_memory().__dict__, **change}
    with pytest.raises(ValueError, match=field):
        ConceptMemory(**fields)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"indices": [3, 1]}, "indices"),
        ({"indices": [1, 1]}, "indices"),
        ({"indices": [1, 16]}, "indices"),
        ({"grid_thw": (1, 8)}, "grid_thw"),
        ({"area_percent": 101.0}, "area_percent"),
        ({"keywords": "mug"}, "keywords"),
    ],
)
def test_view_record_checks_its_fields(change, field):
    fields = {"grid_thw": (1, 8, 8), "indices": [1, 5], "keywords": ["mug"], "area_percent": 10.0,
              "area_parsed": True, "num_visual_tokens": 16, **change}
    with pytest.raises(ValueError, match=field):
        ViewRecord(**fields)


def test_concurrent_puts_from_threads(tmp_path):
    # Updates of one name race on "which revision is committed"; without the lock they leave orphans or a store
    # whose idea of the committed file differs from the disk's.
    store = MemoryStore(tmp_path, FP)
    memories = [make_memory(name, seed=seed) for name in ("Rex", "Anna") for seed in range(3)]

    def put_all(offset):
        for i in range(len(memories)):
            store.put(memories[(i + offset) % len(memories)])

    threads = [threading.Thread(target=put_all, args=(offset,)) for offset in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = MemoryStore(tmp_path, FP)
    assert sorted(fresh.names()) == ["Anna", "Rex"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    for name in ("Rex", "Anna"):
        assert_same(fresh.get(name), store.get(name))


def test_reader_without_fingerprint_sees_every_model_and_cannot_write(tmp_path):
    MemoryStore(tmp_path, FP, HIDDEN).put(make_memory("mug"))
    MemoryStore(tmp_path, "other-model", HIDDEN).put(make_memory("Rex", fingerprint="other-model", created=2000.0))
    before = snapshot(tmp_path)
    reader = MemoryStore(tmp_path, fingerprint=None)
    assert reader.names() == ["mug", "Rex"] and reader.skipped == []
    assert reader.get("Rex").fingerprint == "other-model"
    with pytest.raises(ValueError, match="cannot write"):
        reader.put(make_memory("Anna"))
    assert snapshot(tmp_path) == before
    reader.remove("Rex")  # forgetting needs no model
    assert MemoryStore(tmp_path, "other-model", HIDDEN).names() == []
    assert not MemoryStore(tmp_path / "absent", fingerprint=None).names()
    assert not (tmp_path / "absent").exists()  # looking does not create the folder


# --- readers beside a writer: snapshots and conditional puts ----------------------------------------------------


def test_snapshot_is_consistent_and_names_unknown_requests(tmp_path):
    store = MemoryStore(tmp_path, FP, HIDDEN)
    store.put(make_memory("a"))
    store.put(make_memory("b", seed=1, created=2000.0))
    assert list(store.snapshot()) == ["a", "b"]
    assert list(store.snapshot(["b"])) == ["b"]
    store.remove("a")
    assert list(store.snapshot()) == ["b"]  # a forgotten concept is simply absent
    with pytest.raises(UnknownConcept, match="'a'"):
        store.snapshot(["a", "b"])
    assert store.find("a") is None and store.find("b") is store.get("b")


def test_a_put_expecting_a_forgotten_memory_writes_nothing(tmp_path):
    store = MemoryStore(tmp_path, FP, HIDDEN)
    store.put(make_memory("a"))
    read = store.find("a")
    store.remove("a")  # forgotten on another thread while "a" was being appended to
    files = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(memory.ConceptChanged, match="forgotten"):
        store.put(make_memory("a", seed=2), expected=read)
    assert "a" not in store and sorted(p.name for p in tmp_path.iterdir()) == files
    assert "a" not in MemoryStore(tmp_path, FP, HIDDEN)  # and not on disk either
    store.put(make_memory("a", seed=3), expected=None)  # "no concept of that name" holds: written
    with pytest.raises(memory.ConceptChanged, match="changed"):
        store.put(make_memory("a", seed=4), expected=None)


def test_each_view_keeps_the_layers_it_was_scored_with(tmp_path):
    views = [ViewRecord((1, 8, 8), [1, 5], ["mug"], 12.5, True, 16, layers=[1, 2]),
             ViewRecord((1, 8, 8), [0], ["mug"], 30.0, True, 16, layers=[0])]
    store = MemoryStore(tmp_path, FP, HIDDEN)
    store.put(ConceptMemory("m", torch.zeros(3, HIDDEN), views, [0], 4, "tiny", FP, 1.0, 2.0))
    loaded = MemoryStore(tmp_path, FP, HIDDEN).get("m")
    assert [v.layers for v in loaded.views] == [[1, 2], [0]]
    # A record written before views kept their layers still loads (layers None: the memory's own).
    record_path = tmp_path / f"{file_stem('m')}.json"
    record = json.loads(record_path.read_text())
    for view in record["views"]:
        del view["layers"]
    record_path.write_text(json.dumps(record))
    assert [v.layers for v in MemoryStore(tmp_path, FP, HIDDEN).get("m").views] == [None, None]


def test_gc_deletes_stale_temporary_files_of_interrupted_writes(tmp_path):
    store = MemoryStore(tmp_path, FP, HIDDEN)
    store.put(make_memory("a"))
    stale = tmp_path / f".{file_stem('a')}.json.0badc0de.tmp"  # a write killed before its rename
    fresh = tmp_path / f".{file_stem('a')}.json.12345678.tmp"  # maybe another process's write in progress
    stale.write_bytes(b"{")
    fresh.write_bytes(b"{")
    old = stale.stat().st_mtime - 3600
    os.utime(stale, (old, old))
    assert store.gc() == [stale]
    assert fresh.exists() and not stale.exists() and store.get("a").num_views == 2


# The machine's faults: a full disk, several processes on one folder

FULL_DISK_CHILD = """
import json, resource, signal, sys, torch
from ego_ros.engine.memory import MemoryStore, StoreWriteError, ConceptMemory
from test_memory import FP, make_memory
store = MemoryStore(sys.argv[1], FP, hidden_size=8)
mug = store.get("my mug")
# The process may write files of at most 16 KB from now on (a write beyond fails with EFBIG, as on a full disk).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
errors = []
big = make_memory("Rex")
big.vectors, big.views[0].indices = torch.randn(4096 + 2, 8), list(range(4096))
big.views[0].num_visual_tokens = big.max_tokens_per_view = 4096
grown = make_memory("my mug")
grown.vectors, grown.views[1].indices = torch.randn(3 + 4096, 8), list(range(4096))
grown.views[1].num_visual_tokens = grown.max_tokens_per_view = 4096
for memory, expected in ((big, None), (grown, mug)):  # a registration, then an append to the existing concept
    try:
        store.put(memory, expected=expected)
        errors.append(None)
    except StoreWriteError as error:
        errors.append([error.errno, str(error)])
print(json.dumps({"errors": errors, "names": store.names(), "mug views": store.get("my mug").num_views}))
"""


def test_a_full_disk_refuses_a_registration_and_an_append_with_one_error_and_keeps_every_concept(tmp_path):
    import errno

    MemoryStore(tmp_path, FP).put(make_memory("my mug"))
    before = snapshot(tmp_path)  # the lock file included: taking the lock writes nothing
    child = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path)], capture_output=True, text=True,
                           env=CHILD_ENV, timeout=120)
    assert child.returncode == 0, child.stderr
    said = json.loads(child.stdout)
    for (code, message), what in zip(said["errors"], ("store concept 'Rex'", "store concept 'my mug'")):
        assert code == errno.EFBIG
        assert message == (f"could not {what} in {tmp_path}: File too large; nothing of it was kept, and every "
                           "earlier concept is intact"), message
    # The store that failed still holds what it held, and so does the folder, byte for byte (the lock file aside).
    assert said["names"] == ["my mug"] and said["mug views"] == 2
    assert snapshot(tmp_path) == before
    assert_same(MemoryStore(tmp_path, FP).get("my mug"), make_memory("my mug"))


FOLDER_CHILD = """
import json, sys, torch
from ego_ros.engine.memory import ConceptChanged, ConceptMemory, MemoryStore, ViewRecord
from test_memory import FP, make_memory
root, command = sys.argv[1], sys.argv[2]
store = MemoryStore(root, FP, hidden_size=8)
if command == "register":
    store.put(make_memory(sys.argv[3], seed=3, created=3000.0))
elif command == "forget":
    store.remove(sys.argv[3])
elif command == "append":  # read the concept, add a view, write it back unless it changed meanwhile
    done = refused = 0
    for i in range(int(sys.argv[4])):
        mug = store.get(sys.argv[3])
        views = mug.views + [ViewRecord((1, 2, 2), [0], [f"view {i}"], 10.0, True, 4)]
        grown = ConceptMemory(mug.name, torch.cat([mug.vectors, torch.ones(1, 8)]), views, mug.layers,
                              mug.max_tokens_per_view, mug.model, mug.fingerprint, mug.created, mug.updated)
        try:
            store.put(grown, expected=mug)
            done += 1
        except ConceptChanged:
            refused += 1
    print(json.dumps({"done": done, "refused": refused}))
"""


def child(*args, wait=True):
    process = subprocess.Popen([sys.executable, "-c", FOLDER_CHILD, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    if not wait:
        return process
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out


def test_a_concept_registered_or_forgotten_by_another_process_is_seen_without_a_reload(tmp_path):
    store = MemoryStore(tmp_path, FP, hidden_size=HIDDEN)
    store.put(make_memory("Rex"))
    rex = store.get("Rex")
    child(tmp_path, "register", "Anna")
    assert store.names() == ["Rex", "Anna"] and "Anna" in store
    assert_same(store.get("Anna"), make_memory("Anna", seed=3, created=3000.0))
    assert store.get("Rex") is rex  # what did not change is not read again: a caller's `expected` stays valid
    child(tmp_path, "forget", "Rex")
    assert store.names() == ["Anna"] and store.find("Rex") is None
    with pytest.raises(ConceptExists):  # the other process's concept holds the name here too
        store.put(make_memory("Anna"), replace=False)
    assert store.skipped == []


def test_two_processes_appending_to_one_concept_lose_no_update_and_leave_no_stray_file(tmp_path):
    MemoryStore(tmp_path, FP).put(make_memory("my mug"))
    appenders = [child(tmp_path, "append", "my mug", 25, wait=False) for _ in range(2)]
    results = []
    for process in appenders:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    done = sum(r["done"] for r in results)
    print(f"appends: {results}")
    assert done + sum(r["refused"] for r in results) == 50 and done >= 25
    mug = MemoryStore(tmp_path, FP).get("my mug")
    assert mug.num_views == 2 + done  # every append that said it was stored is there: none undid another
    assert mug.num_tokens == 5 + done
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*.tmp"))
