"""Built engines kept on disk under the full key they were built for (pure, no TensorRT).

A TensorRT plan only runs on the TensorRT version, GPU model (compute capability) and, on Jetson,
L4T release it was built with, and it embeds the precision, shapes and int8 scales of its build.
So the key holds all of them, and a plan is returned only when its stored key equals the requested
key field by field: the digest only names the folder, it is never trusted on its own.

Layout: ``<root>/<digest[:16]>/engine.plan`` and ``engine.json`` (the full key, the plan's sha256
and free-form build metadata). The plan is written first and the JSON last, both atomically, so
the JSON is the commit marker: a process killed between the two leaves a plan without JSON, which
``lookup`` ignores and the next ``store`` overwrites.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from xpdeploy.fileio import sha256_file, sha256_json, write_bytes_atomic, write_json_atomic

PLAN_NAME = "engine.plan"
META_NAME = "engine.json"
#: Bumped when the meaning of a key field changes, so old entries stop matching.
KEY_SCHEMA = 1

ProfileTuple = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class EngineKey:
    """Everything a built plan depends on; engines are never reused across any of it."""

    onnx_sha256: str  # content digest of the ONNX file given to the parser
    trt_version: str  # full tensorrt.__version__, e.g. "10.3.0.30"
    device_name: str  # e.g. "Orin" or "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "8.7"
    l4t_release: str | None  # "36.3.0" on Jetson, None elsewhere
    precision: str  # fp32 | fp16 | int8 | best
    profiles: tuple[ProfileTuple, ...]  # (input name, min, opt, max) per input
    calibration_sha256: str | None  # digest of the calibration data; None when not int8
    schema: int = KEY_SCHEMA

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; normalise so keys read back compare equal.
        object.__setattr__(self, "profiles", _profiles(self.profiles))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field."""
        d = asdict(self)
        d["profiles"] = [[n, list(lo), list(mid), list(hi)] for n, lo, mid, hi in self.profiles]
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineKey:
        """The key stored by :meth:`to_json`; raises KeyError/TypeError/ValueError if malformed."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"engine key fields {sorted(data)} differ from {sorted(names)}")
        return cls(**dict(data))

    def digest(self) -> str:
        """Hex sha256 of the canonical JSON of every field."""
        return sha256_json(self.to_json())


def _profiles(value: Sequence[Sequence[Any]]) -> tuple[ProfileTuple, ...]:
    out = []
    for item in value:
        name, lo, mid, hi = item
        out.append((str(name), _ints(lo), _ints(mid), _ints(hi)))
    return tuple(out)


def _ints(dims: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class EngineCache:
    """Plans on disk under ``root``, looked up by :class:`EngineKey`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, key: EngineKey) -> Path:
        """Where ``key``'s plan lives (16 hex digits of the digest; collisions are caught)."""
        return self.root / key.digest()[:16]

    def find(self, key: EngineKey) -> tuple[Path, dict[str, Any]] | None:
        """The stored plan for exactly ``key`` and the metadata stored with it, or None.

        None as well when the metadata is missing or unreadable, when its key differs from ``key``
        in any field, or when the plan's sha256 differs from the one recorded (a damaged file).
        """
        folder = self.folder(key)
        plan, meta_path = folder / PLAN_NAME, folder / META_NAME
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            stored = EngineKey.from_json(meta["key"])
            recorded_sha = str(meta["plan_sha256"])
            metadata = dict(meta.get("metadata") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if stored != key or not plan.is_file():
            return None
        if sha256_file(plan) != recorded_sha:
            return None
        return plan, metadata

    def lookup(self, key: EngineKey) -> Path | None:
        """The stored plan for exactly ``key``, or None (see :meth:`find`)."""
        found = self.find(key)
        return found[0] if found is not None else None

    def store(self, key: EngineKey, plan_bytes: bytes, metadata: Mapping[str, Any]) -> Path:
        """Save ``plan_bytes`` under ``key`` (replacing what was there); returns the plan's path.

        ``metadata`` (build log path, layer counts, warnings...) is stored next to the key.
        """
        if not plan_bytes:
            raise ValueError("refusing to cache an empty engine plan")
        folder = self.folder(key)
        plan = folder / PLAN_NAME
        write_bytes_atomic(plan, plan_bytes)
        write_json_atomic(
            folder / META_NAME,
            {"key": key.to_json(), "plan_sha256": sha256_file(plan), "metadata": dict(metadata)},
        )
        return plan
