"""latency/table.py and latency/cache.py: the model, its key, reading, refusing, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.latency.tables import block_ms, small_table, table_key
from xpdeploy.latency.cache import ENV_VAR, cache_root, cached_table, store_table
from xpdeploy.latency.table import LatencyModel, LatencyTableError


def test_predict_is_fixed_plus_the_calibrated_block_costs() -> None:
    table = small_table().model_copy(update={"scale": 0.9, "per_block_ms": -0.05})
    got = table.predict([3, 1, 2], [32, 8, 24])
    want = 0.5 + sum(0.9 * block_ms(h, m) - 0.05 for h, m in ((3, 32), (1, 8), (2, 24)))
    assert got == pytest.approx(want)
    assert table.cost(1, 1, 8) == pytest.approx(0.9 * block_ms(1, 8) - 0.05)
    assert table.options(0)[0] == (1, 8) and table.options(0)[-1] == (3, 32)


def test_a_point_off_the_grid_or_a_plan_of_another_depth_is_refused() -> None:
    table = small_table()
    with pytest.raises(LatencyTableError, match=r"no point \(2 heads, MLP 12\) for block 1"):
        table.block_ms(1, 2, 12)
    with pytest.raises(LatencyTableError, match="the plan has 2 blocks, the latency table 3"):
        table.predict([1, 1], [8, 8])


def test_shapes_must_cover_every_block_once() -> None:
    data = small_table().model_dump(mode="json")
    data["shapes"][0]["blocks"] = [0, 2]
    with pytest.raises(ValueError, match=r"cover blocks \[0, 2\]"):
        LatencyModel.model_validate(data)


def test_round_trip_and_one_line_errors_for_bad_files(tmp_path: Path) -> None:
    table = small_table()
    table.write(tmp_path / "t.json")
    assert LatencyModel.read(tmp_path / "t.json") == table
    with pytest.raises(LatencyTableError, match=r"missing.json does not exist"):
        LatencyModel.read(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(LatencyTableError, match=r"is not JSON \(JSONDecodeError\)"):
        LatencyModel.read(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(LatencyTableError, match="not a format-2 table"):
        LatencyModel.read(tmp_path / "other.json")
    damaged = table.model_dump(mode="json")
    del damaged["fixed_ms"]
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    with pytest.raises(LatencyTableError, match=r"is damaged \(fixed_ms: Field required\)"):
        LatencyModel.read(tmp_path / "damaged.json")


def test_a_table_measured_elsewhere_is_refused_naming_what_differs() -> None:
    table = small_table()
    table.check(table_key())  # the same key: fine
    with pytest.raises(LatencyTableError, match=r"batch 32 != 1"):
        table.check(table_key(batch=32))
    other_machine = table_key(device_id="cpu1", device={"cpu_model": "other cpu"})
    with pytest.raises(LatencyTableError, match=r"device_id \{'cpu_model': 'other cpu'\} != "):
        table.check(other_machine)
    table.check(other_machine, device=False)  # a device's table checked on the host: allowed
    with pytest.raises(LatencyTableError, match="arch_digest"):
        table.check(table_key(arch_digest="b" * 64), device=False)


def test_the_cache_hits_only_on_the_same_key(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert cache_root() == tmp_path
    table = small_table()
    path = store_table(table)
    assert path is not None and path.parent == tmp_path / "latency_tables"
    assert cached_table(table_key()) == table
    for changed in (table_key(batch=32), table_key(threads=2), table_key(device_id="cpu1"),
                    table_key(runtime="onnxruntime-cuda"), table_key(arch_digest="c" * 64)):
        assert cached_table(changed) is None
    # A file under the right name that holds another key (copied by hand) is not used either.
    foreign = small_table(device_id="cpu9")
    foreign.write(tmp_path / "latency_tables" / table_key().cache_name())
    assert cached_table(table_key()) is None


def test_an_unwritable_cache_is_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be
    assert store_table(small_table(), root=blocker) is None
