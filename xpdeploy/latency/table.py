"""A measured latency model: per block shape, the latency of every (heads kept, MLP width).

``predict(heads, mlp) = fixed_ms + sum over blocks of cost(b, heads[b], mlp[b])`` in ms per batch,
``cost`` being the block's measured time alone, calibrated (below). ``block_ms`` is measured, never
derived from MACs: one ONNX file per grid point, timed on the target runtime interleaved against the
full block (``verify/latency_grid.py``), because at the edges MACs predict latency badly (batch 1 is
overhead-bound; a width that is not a multiple of the kernel tile costs as much as the next
multiple; attention and MLP scale differently with tokens).

``fixed_ms`` is the model without its blocks, measured: the parts pruning does not touch (patch
embedding, Swin's patch merging, norm, head). A block timed alone is not what it costs inside the
model: alone it pays its own call and its input and output copies, and finds its weights in
cache. So the blocks' times alone are calibrated into their cost in the model,
``cost = scale * alone + per_block_ms``, from two whole models measured side by side: the original
(every block full) and the smallest (every block at its smallest grid point). Measured on the
shared CIFAR-10 model at batch 1 on one thread, neither term alone would do: an additive
correction mispredicted a model cut to a quarter by -25%, a proportional one by +19%. The
prediction of both calibration models equals their measurement; the validation models (whole
pruned models of other shapes, measured) say how well the rest holds (``validation``, error in
percent).

A table is only valid where it was measured: :class:`TableKey` names the architecture (digest of
its ``arch.json``), runtime, precision, batch, CPU threads and device, and
:meth:`LatencyModel.check` refuses a table whose key differs, naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from xpdeploy.errors import PruneError
from xpdeploy.fileio import sha256_json, write_json_atomic

TABLE_FORMAT = 2  # 2: the original timed alone (1: interleaved with a block, 20-25% low)


class LatencyTableError(PruneError):
    """A latency table that cannot be used here (missing, corrupt, or measured elsewhere)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableKey(_Frozen):
    """Where a table holds. ``device``: the machine facts that must match
    (``environment.device_fingerprint``), ``device_id`` their short digest."""

    arch_digest: str
    arch_name: str
    runtime: str
    precision: str
    batch: int
    threads: int
    device_id: str
    device: dict[str, Any] = Field(default_factory=dict)

    def cache_name(self) -> str:
        """File name of this key in a cache folder (the digest of the whole key)."""
        return f"{self.arch_name}-{self.runtime}-{self.precision}-b{self.batch}-" \
               f"{sha256_json(self.model_dump(mode='json'))[:16]}.json"

    def differences(self, other: TableKey, *, device: bool = True) -> list[str]:
        """``field: mine != theirs`` for every field that differs (device facts: when asked)."""
        fields = ["arch_digest", "runtime", "precision", "batch", "threads"]
        if device:
            fields.append("device_id")
        out = []
        for name in fields:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                shown = (self.device, other.device) if name == "device_id" else (a, b)
                out.append(f"{name} {shown[0]} != {shown[1]}")
        return out


class GridPoint(_Frozen):
    """One (heads, MLP width) of a block shape: ms per batch, and how stable the figure was."""

    heads: int
    mlp: int
    ms: float
    spread: float = Field(description="half-range / median of the rounds' ratios to the "
                          "reference block")
    stable: bool


class ShapeTable(_Frozen):
    """Every grid point of one block shape, and the blocks (global indices) that have it."""

    blocks: list[int]
    heads: int = Field(description="the unpruned block's heads")
    mlp: int = Field(description="the unpruned block's MLP width")
    reference_ms: float = Field(description="the full block, ms per batch")
    points: list[GridPoint]

    def lookup(self) -> dict[tuple[int, int], GridPoint]:
        return {(p.heads, p.mlp): p for p in self.points}


class ValidationRow(_Frozen):
    """A whole pruned model: what the table predicted and what it measured (ms per batch)."""

    name: str
    heads: list[int]
    mlp: list[int]
    predicted_ms: float
    measured_ms: float
    spread: float

    @property
    def error_pct(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms * 100.0


class LatencyModel(_Frozen):
    """``table.json``: the latency model of one architecture on one runtime (module doc)."""

    format: int = TABLE_FORMAT
    key: TableKey
    measured_at: str = Field(description="UTC, ISO-8601")
    settings: dict[str, Any] = Field(default_factory=dict, description="warmup, iters, rounds, "
                                     "max_spread the points were measured with")
    original_ms: float
    original_spread: float
    smallest_ms: float = Field(description="every block at its smallest grid point, measured")
    fixed_ms: float = Field(description="the model without its blocks, ms per batch")
    scale: float = Field(description="in-model ms per ms alone (module doc)")
    per_block_ms: float = Field(description="in-model ms per block beyond scale x alone")
    shapes: list[ShapeTable]
    validation: list[ValidationRow] = Field(default_factory=list)
    _shape_of: dict[int, int] = PrivateAttr(default_factory=dict)  # block -> index in shapes
    _points: list[dict[tuple[int, int], GridPoint]] = PrivateAttr(default_factory=list)

    def model_post_init(self, _context: Any) -> None:
        blocks = sorted(b for s in self.shapes for b in s.blocks)
        if blocks != list(range(len(blocks))):
            raise ValueError(f"the shapes cover blocks {blocks}, not 0..{len(blocks) - 1} "
                             "once each")
        self._shape_of = {b: i for i, s in enumerate(self.shapes) for b in s.blocks}
        self._points = [s.lookup() for s in self.shapes]

    @property
    def blocks(self) -> int:
        return len(self._shape_of)

    def shape(self, block: int) -> ShapeTable:
        return self.shapes[self._shape_of[block]]

    def options(self, block: int) -> list[tuple[int, int]]:
        """Every measured (heads, MLP width) of ``block``, ascending."""
        return sorted(self._points[self._shape_of[block]])

    def block_ms(self, block: int, heads: int, mlp: int) -> float:
        """Measured ms per batch of ``block`` alone with ``heads`` heads and ``mlp`` neurons kept
        (in the model: :meth:`cost`)."""
        point = self._points[self._shape_of[block]].get((heads, mlp))
        if point is None:
            raise LatencyTableError(
                f"the latency table has no point ({heads} heads, MLP {mlp}) for block {block}; "
                "its grid is every head count and MLP widths every prune.latency.mlp_step "
                "neurons: measure it again with this pipeline's round_mlp_to")
        return point.ms

    def cost(self, block: int, heads: int, mlp: int) -> float:
        """What ``block`` with ``heads`` heads and ``mlp`` neurons adds to the model, ms per batch
        (its time alone, calibrated: module doc)."""
        return self.scale * self.block_ms(block, heads, mlp) + self.per_block_ms

    def predict(self, heads: list[int], mlp: list[int]) -> float:
        """Predicted ms per batch of a model keeping ``heads[b]`` heads, ``mlp[b]`` neurons."""
        if len(heads) != self.blocks or len(mlp) != self.blocks:
            raise LatencyTableError(f"the plan has {len(heads)} blocks, the latency table "
                                    f"{self.blocks}; measure the table on this model")
        return self.fixed_ms + sum(
            self.cost(b, h, m) for b, (h, m) in enumerate(zip(heads, mlp, strict=True)))

    @property
    def unstable_points(self) -> int:
        return sum(not p.stable for s in self.shapes for p in s.points)

    @property
    def points(self) -> int:
        return sum(len(s.points) for s in self.shapes)

    def check(self, expected: TableKey, *, device: bool = True, where: str = "latency table"
              ) -> None:
        """Refuse a table measured for another model, runtime, batch or (``device``) machine."""
        diff = expected.differences(self.key, device=device)
        if diff:
            raise LatencyTableError(
                f"{where} was measured for another setting ({'; '.join(diff)}; this run first, "
                "the table second); measure it for this one (remove prune.latency.table, or "
                "measure it on the device this run targets)")

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path, *, what: str = "latency table") -> LatencyModel:
        """The table in ``path``; one-line :class:`LatencyTableError` when it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LatencyTableError(f"{what} {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LatencyTableError(f"{what} {path} is not JSON ({type(e).__name__}); measure "
                                    "it again") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"{what} {path} is not a format-{TABLE_FORMAT} table written "
                                    "by xpdeploy's latency_table stage; measure it again")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise LatencyTableError(f"{what} {path} is damaged ({loc}: {first['msg']}); "
                                    "measure it again") from None
