"""The latency budget in report.json, report.md and ``xpdeploy show`` (prune.target_latency_ms).

The artifacts are built here as the stages write them: a two-block latency table on disk
(``table.json``), a plan pruned to 3.5 ms per batch, and verify's result on that target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.report import make_parity
from tests.report.test_markdown import table_rows
from xpdeploy import environment
from xpdeploy.artifacts import (
    ArchSpec,
    DataConfig,
    LatencySetting,
    LatencyTable,
    LatencyTargetResult,
    ParityReport,
    PrunePlan,
    TorchModel,
)
from xpdeploy.latency.table import GridPoint, LatencyModel, ShapeTable, TableKey, ValidationRow
from xpdeploy.report.markdown import render_markdown
from xpdeploy.report.schema import build_report, latency_budget_section, validate_report
from xpdeploy.runfolder import RESOLVED_PIPELINE
from xpdeploy.spec import ReportConfig
from xpdeploy.stages import report as report_stage
from xpdeploy.stages.context import StageContext
from xpdeploy.summary import _describe_outputs, summarize_run

SETTING = LatencySetting(runtime="onnxruntime-cpu", precision="fp32", batch=1, threads=4)
TABLE_JSON = "03_latency_table/table.json"
TABLE_PNG = "03_latency_table/latency_table.png"


def latency_model() -> LatencyModel:
    """Two blocks of one shape (2 heads, MLP 8), one grid point unstable, two validation models
    (predicted 3.1 vs measured 3.0 ms: +3.3%; 2.4 vs 2.5 ms: -4.0%)."""
    points = [GridPoint(heads=h, mlp=m, ms=0.5 * h + 0.1 * m, spread=0.01, stable=(h, m) != (1, 4))
              for h in (1, 2) for m in (4, 8)]
    return LatencyModel(
        key=TableKey(arch_digest="0" * 64, arch_name="deit_tiny", runtime="onnxruntime-cpu",
                     precision="fp32", batch=1, threads=4, device_id="dev4f2a"),
        measured_at="2024-05-06T07:00:00Z", original_ms=6.0, original_spread=0.01,
        smallest_ms=2.2, fixed_ms=0.5, scale=1.0, per_block_ms=0.1,
        shapes=[ShapeTable(blocks=[0, 1], heads=2, mlp=8, reference_ms=1.8, points=points)],
        validation=[
            ValidationRow(name="half", heads=[1, 2], mlp=[4, 8], predicted_ms=3.1,
                          measured_ms=3.0, spread=0.02),
            ValidationRow(name="quarter", heads=[1, 1], mlp=[4, 4], predicted_ms=2.4,
                          measured_ms=2.5, spread=0.01),
        ],
    )


def latency_table(run_dir: Path | None = None) -> LatencyTable:
    """The LatencyTable artifact of :func:`latency_model`, its table.json written to ``run_dir``."""
    table = latency_model()
    if run_dir is not None:
        (run_dir / TABLE_JSON).parent.mkdir(parents=True, exist_ok=True)
        table.write(run_dir / TABLE_JSON)
    return LatencyTable(
        file=TABLE_JSON, setting=SETTING, device_id=table.key.device_id,
        original_ms=table.original_ms, points=table.points,
        unstable_points=table.unstable_points,
        prediction_error_pct=[round(r.error_pct, 2) for r in table.validation],
        source="measured", plots=[TABLE_PNG])


def plan() -> PrunePlan:
    """Pruned to 3.5 ms per batch of 1; the table predicts 3.4 ms."""
    return PrunePlan(
        file="05_prune/plan.json", criterion="taylor", ranking="sensitivity", normalize="none",
        target_gmacs=0.7, gmacs_before=1.26, gmacs_after=0.7, params_before_m=5.717,
        params_after_m=3.1, heads_per_block=[1, 2], mlp_per_block=[4, 8],
        plots=["05_prune/allocation.png"], target_latency_ms=3.5, predicted_latency_ms=3.4,
        latency=SETTING)


def parity(measured_ms: float = 3.6, spread: float = 0.02, tolerance: float | None = 0.1,
           passed: bool = True) -> ParityReport:
    """make_parity() with verify's result on the 3.5 ms target (the original timed at 6.1 ms)."""
    target = LatencyTargetResult(
        setting=SETTING, artifact="07_simplify/pruned.sim.onnx", target_ms=3.5, predicted_ms=3.4,
        measured_ms=measured_ms, spread=spread, original_ms=6.1, ratio=measured_ms / 6.1,
        ratio_spread=spread, table_original_ms=None, drift=None, checked_ms=measured_ms,
        tolerance=tolerance, stable=spread <= 0.1, passed=passed,
        detail=f"measured {measured_ms:.3f} ms (+-{spread:.0%} over rounds) vs target 3.500 ms "
               f"({(measured_ms - 3.5) / 3.5 * 100:+.1f}%), predicted 3.400 ms"
               + ("" if passed else ": misses the target by more than 10%"))
    base = make_parity()
    return base.model_copy(update={"latency_target": target})


def report_with_budget(p: ParityReport, *, table: LatencyTable | None = None,
                       model: LatencyModel | None = None, with_plan: bool = True
                       ) -> dict[str, Any]:
    r = build_report(p, pipeline="quickstart", run_dir="runs/quickstart",
                     status="passed" if p.passed else "failed", title=None, environment={})
    budget = latency_budget_section(p, plan() if with_plan else None, table, model)
    if budget is not None:
        r["latency_budget"] = budget
    validate_report(r)
    return r


def test_section_carries_target_prediction_measurement_and_table() -> None:
    r = report_with_budget(parity(), table=latency_table(), model=latency_model())
    b = r["latency_budget"]
    assert b["target_ms"] == 3.5 and b["predicted_ms"] == 3.4 and b["original_ms"] == 6.1
    assert (b["runtime"], b["precision"], b["batch"], b["threads"]) == (
        "onnxruntime-cpu", "fp32", 1, 4)
    assert b["passed"] is True
    m = b["measured"]
    assert m["measured_ms"] == 3.6 and m["spread"] == 0.02 and m["stable"] is True
    assert m["tolerance"] == 0.1 and m["artifact"] == "07_simplify/pruned.sim.onnx"
    t = b["table"]
    assert t["source"] == "measured" and t["device_id"] == "dev4f2a"
    assert t["points"] == 4 and t["unstable_points"] == 1 and t["original_ms"] == 6.0
    assert t["measured_at"] == "2024-05-06T07:00:00Z" and t["plots"] == [TABLE_PNG]
    assert [(v["name"], v["predicted_ms"], v["measured_ms"]) for v in t["validation"]] == [
        ("half", 3.1, 3.0), ("quarter", 2.4, 2.5)]
    assert [v["error_pct"] for v in t["validation"]] == [pytest.approx(10 / 3), pytest.approx(-4)]
    json.dumps(r, allow_nan=False)


def test_markdown_shows_the_budget_its_verdict_and_the_table_plot() -> None:
    md = render_markdown(report_with_budget(parity(), table=latency_table(),
                                            model=latency_model()))
    assert "## Latency budget" in md
    assert "Target 3.50 ms per batch of 1 on `onnxruntime-cpu` (fp32, 4 threads)." in md
    rows = table_rows(md, "|  | ms per batch | vs target |")
    assert rows[2:] == [
        "| target | 3.50 |  |",
        "| predicted (latency table) | 3.40 | -2.9% |",
        "| measured now (verify, +-2% over rounds) | 3.60 | +2.9% |",
        "| original (timed interleaved with it) | 6.10 | +74.3% |",
    ]
    assert ("Latency target passed (up to 10% over the target allowed; "
            "`07_simplify/pruned.sim.onnx`): measured 3.600 ms (+-2% over rounds) vs target "
            "3.500 ms (+2.9%), predicted 3.400 ms.") in md
    assert ("Latency table `03_latency_table/table.json`, measured in this run, on device "
            "`dev4f2a` at 2024-05-06T07:00:00Z: 4 grid points, **1 unstable**") in md
    assert table_rows(md, "| validation model |")[2:] == [
        "| half | 3.10 | 3.00 | +3.3% |", "| quarter | 2.40 | 2.50 | -4.0% |"]
    assert f"![{TABLE_PNG}]({TABLE_PNG})" in md
    # the section sits between the pruning and the parity sections
    assert md.index("## Latency budget") < md.index("## Parity vs the original")


def test_a_missed_target_fails_in_the_section_and_in_the_failed_gates() -> None:
    p = parity(measured_ms=4.2, passed=False)
    good = p.candidates[0]  # only the latency target fails: no candidate gate does
    p = p.model_copy(update={"candidates": [good], "passed": False})
    md = render_markdown(report_with_budget(p, table=latency_table()))
    assert "Latency target **FAILED** (up to 10% over the target allowed;" in md
    assert "| measured now (verify, +-2% over rounds) | 4.20 | +20.0% |" in md
    failed = md[md.index("## Failed gates"):]
    assert "- latency target: measured 4.200 ms" in failed
    assert "misses the target by more than 10%" in failed
    assert "All gates passed." not in md


def test_ungated_target_and_an_unread_table() -> None:
    """Without verify.max_latency_miss only stability gates; without table.json (a device run)
    the validation rows keep their errors but have no names or ms."""
    r = report_with_budget(parity(tolerance=None), table=latency_table(), model=None)
    rows = r["latency_budget"]["table"]["validation"]
    assert [v["name"] for v in rows] == [None, None]
    assert [v["error_pct"] for v in rows] == [3.33, -4.0]
    md = render_markdown(r)
    assert "misses not gated: verify.max_latency_miss is unset" in md
    assert table_rows(md, "| validation model |")[2:] == [
        "| #1 | n/a | n/a | +3.3% |", "| #2 | n/a | n/a | -4.0% |"]


def test_a_target_not_measured_in_this_run() -> None:
    """A TensorRT target is timed on the device: the host's report shows the plan's side only."""
    trt = LatencySetting(runtime="tensorrt", precision="fp16", batch=8, threads=0)
    table = latency_table().model_copy(update={"setting": trt, "source": "file"})
    pl = plan().model_copy(update={"latency": trt})
    p = make_parity()
    r = build_report(p, pipeline="q", run_dir="r", status="failed", title=None, environment={})
    r["latency_budget"] = latency_budget_section(p, pl, table, None)
    validate_report(r)
    b = r["latency_budget"]
    assert b["measured"] is None and b["passed"] is None and b["original_ms"] == 6.0
    md = render_markdown(r)
    assert "Target 3.50 ms per batch of 8 on `tensorrt` (fp16)." in md
    assert "| original (latency table) | 6.00 | +71.4% |" in md
    assert "Not measured in this run: a TensorRT target is timed where its engine runs" in md
    assert "read from prune.latency.table (measured elsewhere)" in md
    assert "- latency target" not in md


def test_device_report_without_the_plan_takes_the_target_from_verify() -> None:
    r = report_with_budget(parity(), with_plan=False)
    b = r["latency_budget"]
    assert b["target_ms"] == 3.5 and b["predicted_ms"] == 3.4 and b["table"] is None
    assert "## Latency budget" in render_markdown(r)


def test_no_latency_target_changes_nothing() -> None:
    p = make_parity()
    gmacs_plan = plan().model_copy(update={"target_latency_ms": None,
                                           "predicted_latency_ms": None, "latency": None})
    assert latency_budget_section(p, gmacs_plan, latency_table(), latency_model()) is None
    assert latency_budget_section(p, None) is None
    r = build_report(p, pipeline="q", run_dir="r", status="failed", title=None, environment={})
    assert "latency_budget" not in r
    assert "Latency budget" not in render_markdown(r)


def test_schema_checks_the_section() -> None:
    r = report_with_budget(parity(), table=latency_table(), model=latency_model())
    assert r["schema_version"] == 1  # the section is additive
    del r["latency_budget"]["table"]["validation"][1]["error_pct"]
    with pytest.raises(ValueError, match=r"latency_budget.table.validation\[1\]: .*'error_pct'"):
        validate_report(r)
    del r["latency_budget"]["measured"]
    with pytest.raises(ValueError, match=r"latency_budget: missing required key 'measured'"):
        validate_report(r)
    r["latency_budget"] = None  # a null section is no section
    validate_report(r)


def _stage_context(run_dir: Path) -> StageContext[report_stage.Settings]:
    settings = report_stage.Settings(name="quickstart", report=ReportConfig(plots=False))
    return StageContext(stage="report", run_dir=run_dir, stage_dir=run_dir / "10_report",
                        settings=settings, fingerprint="f")


def _model() -> TorchModel:
    return TorchModel(
        label="original", arch_file="01_load/arch.json", weights_file="01_load/model.safetensors",
        arch=ArchSpec(timm_name="deit_tiny_patch16_224", num_classes=10),
        data_config=DataConfig(input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5),
                               std=(0.5, 0.5, 0.5)),
        gmacs=1.26, params_m=5.717)


def test_report_stage_reads_the_table_and_show_prints_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "capture", lambda: {})
    p = parity()
    out = report_stage.run(_stage_context(tmp_path), _model(), parity=p, plan=plan(),
                           latency=latency_table(tmp_path))
    assert out["report"].markdown_file == "report.md"
    data = json.loads((tmp_path / "report.json").read_text())
    assert [v["name"] for v in data["latency_budget"]["table"]["validation"]] == [
        "half", "quarter"]
    md = (tmp_path / "report.md").read_text()
    assert "## Latency budget" in md and f"![{TABLE_PNG}]({TABLE_PNG})" in md

    (tmp_path / RESOLVED_PIPELINE).write_text("name: quickstart\nstages: []\n")
    lines = summarize_run(tmp_path).splitlines()
    assert "  latency 3.600 ms (target 3.500, predicted 3.400) on onnxruntime-cpu b1  ok" in lines


def test_report_stage_without_a_latency_target(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "capture", lambda: {})
    report_stage.run(_stage_context(tmp_path), _model(), parity=make_parity(),
                     latency=latency_table())  # a table, but no target: no section
    data = json.loads((tmp_path / "report.json").read_text())
    assert "latency_budget" not in data
    (tmp_path / RESOLVED_PIPELINE).write_text("name: quickstart\nstages: []\n")
    lines = summarize_run(tmp_path).splitlines()
    assert not any(line.lstrip().startswith("latency") for line in lines)


def test_show_describes_the_plan_and_verify_outputs_with_their_latency() -> None:
    """A partial run (no report yet) still shows the budget: planned, then measured."""

    def manifest(**outputs: Any) -> dict[str, Any]:
        return {"outputs": {name: {"type": type(a).__name__, "artifact": a.model_dump(mode="json")}
                            for name, a in outputs.items()}}

    assert _describe_outputs(manifest(plan=plan())).endswith(
        "0.7000 GMACs, latency target 3.500 ms (predicted 3.400)")
    text = _describe_outputs(manifest(parity=parity(measured_ms=4.2, passed=False)))
    assert text.endswith("; latency 4.200 ms (target 3.500, predicted 3.400) FAILED")


def test_the_gate_reads_the_ratio_at_the_tables_speed_when_the_machine_drifted() -> None:
    # The original measured 6.1 ms now but 5.0 ms when the table was made (+22%): the pruned
    # model at 0.7 x the original is 3.5 ms at the table's speed, whatever it measures now.
    p = parity(measured_ms=4.27)
    result = p.latency_target.model_copy(update={
        "ratio": 0.7, "ratio_spread": 0.01, "table_original_ms": 5.0, "drift": 0.22,
        "checked_ms": 3.5})
    p = p.model_copy(update={"latency_target": result})
    r = report_with_budget(p, table=latency_table(), model=latency_model())
    m = r["latency_budget"]["measured"]
    assert (m["checked_ms"], m["ratio"], m["table_original_ms"], m["drift"]) == (3.5, 0.7, 5.0,
                                                                                  0.22)
    md = render_markdown(r)
    assert ("| measured at the table's speed (0.700 x the original side by side, +-1%; the gate "
            "reads this) | 3.50 | +0.0% |") in md
    assert "| measured now (verify, +-2% over rounds) | 4.27 | +22.0% |" in md
