"""``report``: report.json (versioned schema), report.md and the latency plot at the run root."""

from __future__ import annotations

from xpdeploy.artifacts import (
    Artifact,
    EngineSet,
    MaskSet,
    ParityReport,
    PrunePlan,
    RunReport,
    TorchModel,
)
from xpdeploy.report import environment
from xpdeploy.report.markdown import write_markdown
from xpdeploy.report.plots import plot_latency
from xpdeploy.report.schema import build_report, write_report_json
from xpdeploy.stages.context import StageContext


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


def run(ctx: StageContext, model: TorchModel, parity: ParityReport | None = None,
        plan: PrunePlan | None = None, masks: MaskSet | None = None,
        pruned: TorchModel | None = None, engines: EngineSet | None = None
        ) -> dict[str, Artifact]:
    assert parity is not None  # PipelineSpec.check_runnable: 'report' needs 'verify'
    spec = ctx.spec
    status = "passed" if parity.passed else "failed"
    report = build_report(
        parity,
        pipeline=spec.name,
        run_dir=str(ctx.run_dir),
        status=status,
        title=spec.report.title,
        environment=environment.capture(),  # tools, device, fingerprint
        engines=engines,
        original_extra={"epochs_trained": model.epochs_trained, "top1_samples": model.top1_samples,
                        "val_top1": model.top1},
    )
    if plan is not None:
        report["pruning"] = _pruning(plan, masks, pruned)
        if parity.synthetic:
            report["pruning"]["one_shot_top1"] = None
    json_path, md_path = ctx.run_dir / "report.json", ctx.run_dir / "report.md"
    plots = []
    if spec.report.plots and parity.candidates:
        plot_path = ctx.run_dir / "latency.png"
        plot_latency(report, plot_path)
        plots.append(ctx.rel(plot_path))
    write_report_json(json_path, report)
    write_markdown(md_path, report)
    return {"report": RunReport(json_file=ctx.rel(json_path), markdown_file=ctx.rel(md_path),
                                plots=plots, status=status)}
