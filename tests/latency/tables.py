"""A small latency table built in code, shared by the latency, prune and report tests."""

from __future__ import annotations

from xpdeploy.latency.table import GridPoint, LatencyModel, ShapeTable, TableKey


def table_key(**changes: object) -> TableKey:
    base = {"arch_digest": "a" * 64, "arch_name": "vit_tiny", "runtime": "onnxruntime-cpu",
            "precision": "fp32", "batch": 1, "threads": 1, "device_id": "cpu0",
            "device": {"cpu_model": "test cpu", "logical_cores": 2}}
    return TableKey(**{**base, **changes})


def block_ms(heads: int, mlp: int) -> float:
    """A made-up block latency: 0.1 ms per head, 0.01 ms per 8 neurons, and a tile step (a width
    that is not a multiple of 16 costs as much as the next multiple)."""
    return 0.2 + 0.1 * heads + 0.01 * (-(-mlp // 16) * 2)


def small_table(blocks: int = 3, heads: int = 3, mlp: int = 32, **key: object) -> LatencyModel:
    """Every block one shape: heads 1..``heads``, MLP 8..``mlp`` every 8; fixed 0.5 ms."""
    points = [GridPoint(heads=h, mlp=m, ms=block_ms(h, m), spread=0.01, stable=True)
              for h in range(1, heads + 1) for m in range(8, mlp + 1, 8)]
    full = block_ms(heads, mlp)
    return LatencyModel(key=table_key(**key), measured_at="2026-12-01T00:00:00+00:00",
                        original_ms=0.5 + blocks * full, original_spread=0.01,
                        smallest_ms=0.5 + blocks * block_ms(1, 8), fixed_ms=0.5, scale=1.0,
                        per_block_ms=0.0,
                        shapes=[ShapeTable(blocks=list(range(blocks)), heads=heads, mlp=mlp,
                                           reference_ms=full, points=points)])
