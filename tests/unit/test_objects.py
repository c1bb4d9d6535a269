"""Object store URLs, names and references (dagkube.store.objects), without a server."""

from __future__ import annotations

import pickle

import pytest

from dagkube.runtime.inputs import serialize
from dagkube.store.frames import Frames
from dagkube.store.objects import (
    DEFAULT_THRESHOLD_BYTES,
    OBJECT_REF,
    DirectoryStore,
    ObjectStoreError,
    decode_run_id,
    object_name,
    open_store,
    parse_threshold,
    reference,
    referenced,
    run_prefix,
    spill,
    store_from_env,
)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("objects", "unsupported scheme ''"),
        ("file://host/dir", "file:///absolute/path"),
        ("file:///dir?x=1", "file:///absolute/path"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/p?endpoint=http://x", r"unknown parameter\(s\) endpoint; accepted"),
    ],
)
def test_bad_urls_are_refused_with_the_url_named(url, message):
    with pytest.raises(ObjectStoreError, match=message) as raised:
        open_store(url)
    assert url in str(raised.value)


def test_thresholds_come_from_the_environment_and_are_checked():
    assert parse_threshold("") == DEFAULT_THRESHOLD_BYTES == 1024 * 1024
    assert parse_threshold("4096") == 4096
    for bad in ("0", "-1", "1MiB"):
        with pytest.raises(ObjectStoreError, match="DAGKUBE_OBJECT_THRESHOLD_BYTES"):
            parse_threshold(bad)
    assert store_from_env({}) is None
    assert store_from_env({"DAGKUBE_OBJECT_STORE_URL": "off"}) is None


def test_names_are_safe_for_s3_and_file_systems_and_reversible():
    run = "team-a.run 1/../x"
    name = object_name(run, "resize#3/..")
    assert name.startswith("team-a/") and name.count("/") == 2
    assert all(c.isalnum() or c in "-_/" for c in name)
    assert ".." not in name
    assert run_prefix("local1").startswith("_local/")
    assert decode_run_id(run_prefix(run).split("/")[1]) == run


def test_a_reference_never_looks_like_a_serialized_value():
    for value in (b"x" * 10, bytearray(100), {"a": 1}):
        assert not serialize(value).startswith(OBJECT_REF)
        assert not pickle.dumps(value, protocol=2).startswith(OBJECT_REF)
    assert referenced(reference("ns/run/t")) == "ns/run/t"
    assert referenced(b"\x80\x05plain") is None


def test_a_directory_store_writes_whole_files_and_spills_only_large_outputs(tmp_path):
    store = open_store((tmp_path / "o").as_uri(), threshold_bytes=10)
    assert isinstance(store, DirectoryStore)
    kept, names = spill(store, "r1", {"small": b"123", "large": b"0123456789ab"})
    assert kept["small"] == b"123" and kept["large"] == reference(names[0])
    assert bytes(store.get(names[0]) or b"") == b"0123456789ab"
    store.put("a/b/c", [b"one", memoryview(b"two"), bytearray(b"three")])
    assert bytes(store.get("a/b/c") or b"") == b"onetwothree"
    assert [p.name for p in (tmp_path / "o" / "a" / "b").iterdir()] == ["c"]  # no temp left
    assert sorted(prefix for _, prefix in store.run_prefixes()) == ["_local/r1/", "a/b/"]
    store.delete_run("r1")
    store.delete_run("r1")  # idempotent
    assert store.get(names[0]) is None


def test_arrays_read_from_the_store_are_used_in_place_and_writeable():
    np = pytest.importorskip("numpy")
    from dagkube.runtime.inputs import deserialize

    blob = bytearray(serialize(np.arange(1024.0)))  # as a directory store reads it
    array = deserialize(blob)
    assert array.flags.writeable and np.shares_memory(array, np.frombuffer(blob, np.uint8))
    array += 1
    assert float(array[0]) == 1.0
    copied = deserialize(bytes(blob))  # bytes: copied, still writeable
    assert copied.flags.writeable and float(copied[0]) == 1.0


def test_a_directory_store_maps_an_object_copy_on_write(tmp_path):
    np = pytest.importorskip("numpy")
    import mmap

    from dagkube.runtime.inputs import deserialize

    store = open_store((tmp_path / "o").as_uri(), threshold_bytes=10)
    frames = serialize(np.arange(1 << 20, dtype=np.float64))  # 8 MiB: in parts, not joined
    assert isinstance(frames, Frames) and len(frames) > 8 << 20
    kept, names = spill(store, "r", {"t": frames})  # written part by part
    assert kept["t"] == reference(names[0])
    written = bytes(frames)
    store.put("r/t", written)
    mapped = store.get("r/t")
    assert isinstance(mapped, mmap.mmap)
    array = deserialize(mapped)
    assert np.shares_memory(array, np.frombuffer(mapped, np.uint8))  # no copy was made
    assert array.flags.writeable
    array[:] = -1.0  # the task's change stays its own: the file is as written
    assert (tmp_path / "o" / "r" / "t").read_bytes() == written
    assert bytes(store.get(names[0]) or b"") == written
    store.delete("r/t")  # a value in use outlives its object
    assert float(array.sum()) == -float(1 << 20)
    assert float(deserialize(store.get("x") or serialize(0))) == 0  # absent: None
    plain = {"a": [1, 2, 3]}  # a plain pickle (no out-of-band buffers) from a mapping too
    store.put("r/plain", serialize(plain) + b"")
    assert deserialize(store.get("r/plain")) == plain
