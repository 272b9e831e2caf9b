"""The engine cache: a plan is only returned for exactly the key it was stored under."""

from __future__ import annotations

import dataclasses
import json

import pytest

from xpdeploy.engine.cache import META_NAME, EngineCache, EngineKey


def key(**kw) -> EngineKey:
    base = dict(
        onnx_sha256="a" * 64,
        trt_version="10.3.0.30",
        device_name="Orin",
        compute_capability="8.7",
        l4t_release="36.3.0",
        precision="fp16",
        profiles=(("pixels", (1, 3, 224, 224), (1, 3, 224, 224), (1, 3, 224, 224)),),
        calibration_sha256=None,
    )
    base.update(kw)
    return EngineKey(**base)


def test_store_then_lookup(tmp_path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.lookup(key()) is None
    path = cache.store(key(), b"PLAN", {"label": "fp16-b1"})
    assert path.read_bytes() == b"PLAN"
    assert cache.lookup(key()) == path
    meta = json.loads((path.parent / META_NAME).read_text())
    assert EngineKey.from_json(meta["key"]) == key()
    assert meta["metadata"] == {"label": "fp16-b1"}


def test_key_round_trips_through_json_lists() -> None:
    k = key(profiles=[["pixels", [1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]]])
    assert EngineKey.from_json(json.loads(json.dumps(k.to_json()))) == k
    assert k.digest() == EngineKey.from_json(k.to_json()).digest()


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"trt_version": "10.3.0.26"},
        {"device_name": "Xavier"},
        {"compute_capability": "7.2"},
        {"l4t_release": None},
        {"precision": "int8"},
        {"profiles": (("pixels", *((8, 3, 224, 224),) * 3),)},
        {"calibration_sha256": "c" * 64},
    ],
)
def test_every_field_is_part_of_the_key(tmp_path, change) -> None:
    cache = EngineCache(tmp_path)
    cache.store(key(), b"PLAN", {})
    other = key(**change)
    assert other.digest() != key().digest()
    assert cache.lookup(other) is None


def test_stored_key_must_equal_requested_key_not_just_the_digest(tmp_path) -> None:
    """Even if two keys shared a folder, the field-by-field check refuses the other one's plan."""
    cache = EngineCache(tmp_path)
    path = cache.store(key(), b"PLAN", {})
    meta_path = path.parent / META_NAME
    meta = json.loads(meta_path.read_text())
    meta["key"]["device_name"] = "Xavier"  # as if another key's entry sat in this folder
    meta_path.write_text(json.dumps(meta))
    assert cache.lookup(key()) is None


def test_damaged_or_uncommitted_entries_are_ignored(tmp_path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(key(), b"PLAN", {})
    path.write_bytes(b"PLAM")  # damaged plan: sha256 no longer matches
    assert cache.lookup(key()) is None
    (path.parent / META_NAME).unlink()  # killed before the JSON was written
    assert cache.lookup(key()) is None
    (path.parent / META_NAME).write_text("{not json")
    assert cache.lookup(key()) is None
    cache.store(key(), b"PLAN2", {})  # the next store repairs the entry
    assert cache.lookup(key()).read_bytes() == b"PLAN2"


def test_empty_plan_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty"):
        EngineCache(tmp_path).store(key(), b"", {})


def test_unknown_fields_are_refused() -> None:
    data = dataclasses.asdict(key()) | {"extra": 1}
    with pytest.raises(ValueError, match="fields"):
        EngineKey.from_json(data)
