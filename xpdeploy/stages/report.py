"""``report``: report.json (versioned schema), report.md and the latency plot at the run root."""

from __future__ import annotations

from xpdeploy import environment
from xpdeploy.artifacts import (
    Artifact,
    BundleOrigin,
    EngineSet,
    LatencyTable,
    MaskSet,
    ParityReport,
    PrunePlan,
    RunReport,
    TorchModel,
)
from xpdeploy.latency.table import LatencyModel, LatencyTableError
from xpdeploy.progress import log
from xpdeploy.report.markdown import write_markdown
from xpdeploy.report.plots import plot_latency
from xpdeploy.report.schema import (
    build_report,
    default_title,
    has_latency_budget,
    latency_budget_section,
    write_report_json,
)
from xpdeploy.spec import ReportConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings


class Settings(StageSettings):
    name: str
    report: ReportConfig


def _pruning(plan: PrunePlan, masks: MaskSet | None, pruned: TorchModel | None
             ) -> dict[str, object]:
    finetune = pruned.training if pruned is not None and pruned.training else None
    return {
        "finetune": finetune,
        "criterion": plan.criterion, "ranking": plan.ranking, "normalize": plan.normalize,
        "target_gmacs": plan.target_gmacs, "gmacs_before": plan.gmacs_before,
        "gmacs_after": plan.gmacs_after, "params_before_m": plan.params_before_m,
        "params_after_m": plan.params_after_m, "heads": plan.heads_per_block,
        "mlp": plan.mlp_per_block, "one_shot_top1": plan.one_shot_top1, "plan": plan.file,
        "masks_converged": masks.converged if masks else None,
        "plots": [*(masks.plots if masks else []), *plan.plots],
    }


def _latency_model(ctx: StageContext[Settings], latency: LatencyTable | None
                   ) -> LatencyModel | None:
    """The latency table's ``table.json`` for its validation rows; None where it is not at hand
    (a device run: the bundle does not carry it), as the report then shows what the artifact
    records."""
    if latency is None:
        return None
    try:
        return LatencyModel.read(ctx.path(latency.file))
    except LatencyTableError as e:
        log(f"  (latency budget: only the validation errors the artifact records: {e})")
        return None


def run(ctx: StageContext[Settings], model: TorchModel, parity: ParityReport | None = None,
        plan: PrunePlan | None = None, masks: MaskSet | None = None,
        pruned: TorchModel | None = None, engines: EngineSet | None = None,
        origin: BundleOrigin | None = None, latency: LatencyTable | None = None
        ) -> dict[str, Artifact]:
    """``origin``: set on a device run (the bundle it continues), which the title says.
    ``latency``: the latency table a ``prune.target_latency_ms`` plan was made with (section
    ``latency_budget``, with its plots)."""
    assert parity is not None  # PipelineSpec.check_runnable: 'report' needs 'verify'
    spec = ctx.settings
    status = "passed" if parity.passed else "failed"
    title = spec.report.title
    extra: dict[str, object] = {"epochs_trained": model.epochs_trained,
                                "top1_samples": model.top1_samples, "val_top1": model.top1}
    if origin is not None:
        title = (title or default_title(spec.name)) + " (device)"
        extra["bundle"] = {"source_run": origin.source_run, "created": origin.created}
    report = build_report(
        parity,
        pipeline=spec.name,
        run_dir=str(ctx.run_dir),
        status=status,
        title=title,
        environment=environment.capture(),  # tools, device, fingerprint
        engines=engines,
        original_extra=extra,
    )
    if plan is not None:
        report["pruning"] = _pruning(plan, masks, pruned)
        if parity.synthetic:
            report["pruning"]["one_shot_top1"] = None
    if has_latency_budget(parity, plan):
        report["latency_budget"] = latency_budget_section(
            parity, plan, latency, _latency_model(ctx, latency))
    json_path, md_path = ctx.run_dir / "report.json", ctx.run_dir / "report.md"
    plots = []
    if spec.report.plots and parity.candidates:
        plot_path = ctx.run_dir / "latency.png"
        try:
            plot_latency(report, plot_path)
            plots.append(ctx.rel(plot_path))
        except ImportError:  # matplotlib is not in the device image: report.md's table says it all
            log("  (no latency.png: matplotlib is not installed here)")
    write_report_json(json_path, report)
    write_markdown(md_path, report)
    return {"report": RunReport(json_file=ctx.rel(json_path), markdown_file=ctx.rel(md_path),
                                plots=plots, status=status)}
