"""latency_blocks -> latency_table -> prune at a latency target -> verify, in real pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import tiny_pipeline_dict, write_pipeline
from xpdeploy.cli import cli
from xpdeploy.errors import ConfigError, PruneError
from xpdeploy.latency.table import LatencyModel, LatencyTableError
from xpdeploy.pipeline import run_pipeline
from xpdeploy.spec import load_spec

pytestmark = pytest.mark.slow

STAGES = ["load", "latency_blocks", "latency_table", "prune", "export_onnx", "simplify",
          "verify", "report"]


def _spec(tmp_path: Path, target_ms: float, stages: list[str] = STAGES, **latency):
    d = tiny_pipeline_dict(stages=stages)
    # Wide enough that a block's cuts differ by more than the timing noise (a 32-wide block's
    # whole range is a few hundredths of a ms).
    d["model"] = {**d["model"], "kwargs": {**d["model"]["kwargs"], "embed_dim": 128,
                                           "mlp_ratio": 4}}
    d["prune"] = {"criterion": "taylor", "target_latency_ms": target_ms,
                  "ranking": "sensitivity", "round_mlp_to": 128, "taylor_images": 64,
                  "sensitivity": {"images": 64, "batch_size": 64, "mlp_step": 128, "refine": 0},
                  "latency": {"iters": 6, "rounds": 3, "warmup": 1, "validation_models": 2,
                              **latency}}
    # Timings of a 0.1 ms model on a shared CI machine are reported, not gated, here.
    d["verify"] = {**d["verify"], "max_latency_miss": None}
    return load_spec(write_pipeline(tmp_path / "p.yaml", d))


def _table(tmp_path: Path) -> LatencyModel:
    """The tiny model's table (measured once here, cached for the other runs of the session)."""
    run_pipeline(_spec(tmp_path, 1.0), tmp_path / "t", until="latency_table")
    return LatencyModel.read(tmp_path / "t" / "12_latency_table" / "table.json")


def _range(table: LatencyModel) -> tuple[float, float]:
    """The predicted ms of the cheapest plan the grid allows and of the original."""
    cheapest = table.fixed_ms + sum(min(table.cost(b, h, m) for h, m in table.options(b))
                                    for b in range(table.blocks))
    return cheapest, table.predict([2, 2], [512, 512])


def test_a_latency_target_is_planned_measured_and_reported(tmp_path: Path) -> None:
    table = _table(tmp_path)
    # depth 2, 2 heads, MLP 512 every 128: one shape, 2 x 4 points
    assert table.points == 8 and [s.blocks for s in table.shapes] == [[0, 1]]
    assert all(p.ms > 0 for s in table.shapes for p in s.points)
    assert len(table.validation) == 2
    # The calibration predicts both calibration models exactly.
    assert table.predict([2, 2], [512, 512]) == pytest.approx(table.original_ms)
    assert table.predict([1, 1], [128, 128]) == pytest.approx(table.smallest_ms)
    low, high = _range(table)
    assert low < high
    target = (low + high) / 2
    run_dir = tmp_path / "run"
    result = run_pipeline(_spec(tmp_path, target), run_dir)
    assert result.passed
    plan = json.loads((run_dir / "04_prune" / "plan.json").read_text())
    record = plan["latency"]
    assert record["target_ms"] == target and record["predicted_ms"] <= target
    assert record["predicted_ms"] == pytest.approx(table.predict(
        [len(b["kept_heads"]) for b in plan["blocks"]],
        [len(b["kept_neurons"]) for b in plan["blocks"]]))
    parity = json.loads((run_dir / "09_verify" / "parity.json").read_text())
    measured = parity["latency_target"]
    assert measured["target_ms"] == target and measured["measured_ms"] > 0
    assert measured["artifact"].endswith("pruned.sim.onnx")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["latency_budget"]["target_ms"] == target
    assert "## Latency budget" in (run_dir / "report.md").read_text()
    manifest = json.loads((run_dir / "12_latency_table" / "manifest.json").read_text())
    assert manifest["outputs"]["table"]["artifact"]["source"] == "cache"  # measured in _table


def test_impossible_and_pointless_targets_are_one_clear_error(tmp_path: Path) -> None:
    table = _table(tmp_path)
    low, high = _range(table)
    with pytest.raises(PruneError, match=r"below the smallest model the constraints allow "
                       r"\([0-9.]+ ms predicted on onnxruntime-cpu \(fp32\) at batch 1"):
        run_pipeline(_spec(tmp_path, low * 0.9), tmp_path / "r1")
    with pytest.raises(PruneError, match=r"nothing to prune; target [0-9.]+ ms >= the "
                       r"original's"):
        run_pipeline(_spec(tmp_path, high * 1.1), tmp_path / "r2")
    assert not (tmp_path / "r1" / "04_prune" / "plan.json").exists()


def test_the_cli_says_it_in_one_line_with_a_non_zero_exit(tmp_path: Path) -> None:
    _table(tmp_path)
    spec = _spec(tmp_path, 1e-6)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml"), "--run-dir",
                                       str(tmp_path / "r")])
    assert result.exit_code != 0 and result.exit_code != 3
    assert "Traceback" not in result.output
    assert "below the smallest model the constraints allow" in result.output
    assert spec.prune is not None


def test_a_latency_target_without_the_table_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="add 'latency_blocks' and 'latency_table' to 'stages'"):
        run_pipeline(_spec(tmp_path, 1.0, stages=["load", "prune"]), tmp_path / "r")


def test_a_table_of_another_batch_is_refused(tmp_path: Path) -> None:
    table = _table(tmp_path)
    other = tmp_path / "batch32.json"
    table.model_copy(update={"key": table.key.model_copy(update={"batch": 32})}).write(other)
    with pytest.raises(LatencyTableError, match=r"measured for another setting \(batch 1 != 32"):
        run_pipeline(_spec(tmp_path, 1.0, table=str(other)), tmp_path / "r",
                     until="latency_table")
    # The same table given as a file (the device's way) is used as it is.
    same = tmp_path / "same.json"
    table.write(same)
    run_pipeline(_spec(tmp_path, 1.0, table=str(same)), tmp_path / "r2", until="latency_table")
    manifest = json.loads((tmp_path / "r2" / "12_latency_table" / "manifest.json").read_text())
    assert manifest["outputs"]["table"]["artifact"]["source"] == "file"


def test_the_default_stage_list_inserts_the_latency_stages() -> None:
    d = tiny_pipeline_dict()
    del d["stages"]
    d["prune"] = {"criterion": "taylor", "target_latency_ms": 1.0}
    spec = load_spec_from_dict(d)
    assert spec.stage_list()[:5] == ["load", "train", "latency_blocks", "latency_table", "prune"]


def load_spec_from_dict(d: dict):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_spec(write_pipeline(Path(tmp) / "p.yaml", d))


def _fake_times(original_ms: float, pruned_ms: float, wobble: float = 0.0):
    """RoundTimes of 3 rounds of 2 calls: the original, then the pruned model (ms)."""
    from xpdeploy.verify.latency import RoundTimes

    rounds = [(1 - wobble, 1 - wobble), (1.0, 1.0), (1 + wobble, 1 + wobble)]
    return RoundTimes(batch=1, times=(
        tuple((original_ms, original_ms) for _ in rounds),
        tuple((pruned_ms * a, pruned_ms * b) for a, b in rounds)))


@pytest.mark.parametrize(("pruned_ms", "wobble", "miss", "passed", "says"), [
    (1.05, 0.0, 0.10, True, "= 0.997 ms at the table's speed (1.900 ms for the original) vs "
                            "target 1.000 ms (-0.3%)"),
    (1.20, 0.0, 0.10, False, "misses the target by more than 10%"),
    (1.00, 0.3, 0.10, False, "unstable: rounds disagree by more than 10%"),
    (1.20, 0.0, None, True, "(not gated: verify.max_latency_miss is null)"),
])
def test_verify_gates_the_measured_latency_against_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pruned_ms: float, wobble: float,
        miss: float | None, passed: bool, says: str) -> None:
    import contextlib

    from xpdeploy.artifacts import LatencySetting, OnnxModel, OnnxModels, PrunePlan
    from xpdeploy.spec import VerifyConfig
    from xpdeploy.stages import verify
    from xpdeploy.stages.context import StageContext

    monkeypatch.setattr(verify, "runtime_opener",
                        lambda setting, workdir: lambda path, name: contextlib.nullcontext(path))
    monkeypatch.setattr(verify, "measure_rounds",
                        lambda runners, *a, **k: _fake_times(2.0, pruned_ms, wobble))
    ctx = StageContext("verify", tmp_path, tmp_path / "09_verify", verify.Settings(
        verify=VerifyConfig(max_latency_miss=miss), batch_size=8, trace_batch=2), "f")
    setting = LatencySetting(runtime="onnxruntime-cpu", precision="fp32", batch=1, threads=1)
    plan = PrunePlan(file="p.json", criterion="taylor", ranking="sensitivity", normalize="type",
                     target_gmacs=0.1, gmacs_before=0.2, gmacs_after=0.1, params_before_m=1,
                     params_after_m=0.5, heads_per_block=[1], mlp_per_block=[8],
                     target_latency_ms=1.0, predicted_latency_ms=0.98, latency=setting,
                     table_original_ms=1.9)
    onnx = OnnxModels(models={label: OnnxModel(
        label=label, file=f"{label}.sim.onnx", opset=17, dynamic_batch=True, nodes=1,
        max_abs_diff=0.0, gmacs=0.1, params_m=1.0) for label in ("original", "pruned")})
    result = verify._latency_target(ctx, plan, onnx, np.zeros((1, 3, 4, 4)), [])
    assert result is not None and result.passed is passed
    assert result.measured_ms == pytest.approx(pruned_ms)
    assert result.original_ms == 2.0 and result.target_ms == 1.0
    assert says in result.detail
    # The gate reads the side-by-side ratio at the table's speed: the machine is 5% slower now.
    assert result.ratio == pytest.approx(pruned_ms / 2.0)
    assert result.checked_ms == pytest.approx(pruned_ms / 2.0 * 1.9)
    assert result.drift == pytest.approx(2.0 / 1.9 - 1)
    assert "now the original measures 2.000 ms (+5% since the table)" in result.detail
    # No latency target in the plan: nothing to check.
    assert verify._latency_target(ctx, plan.model_copy(update={"target_latency_ms": None}),
                                  onnx, np.zeros((1, 3, 4, 4)), []) is None


def test_a_missed_latency_target_fails_the_run_with_exit_3(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from xpdeploy.errors import EXIT_PARITY, ParityError
    from xpdeploy.stages import verify

    low, high = _range(_table(tmp_path))
    target = (low + high) / 2
    real = verify.measure_rounds

    def slow_pruned(runners, pixels, batch, **kw):
        if batch == 1 and len(runners) == 2 and kw.get("rounds") == 5 and \
                getattr(runners[1], "_path", Path()).name == "pruned.sim.onnx":
            return _fake_times(target, target * 1.5)
        return real(runners, pixels, batch, **kw)

    monkeypatch.setattr(verify, "measure_rounds", slow_pruned)
    spec = _spec(tmp_path, target)
    spec.verify.max_latency_miss = 0.10
    with pytest.raises(ParityError) as err:
        run_pipeline(spec, tmp_path / "run")
    assert err.value.exit_code == EXIT_PARITY
    parity = json.loads((tmp_path / "run" / "09_verify" / "parity.json").read_text())
    assert parity["passed"] is False and parity["latency_target"]["passed"] is False
    assert "misses the target by more than 10%" in parity["latency_target"]["detail"]
    assert "latency" in (tmp_path / "run" / "report.md").read_text().lower()
