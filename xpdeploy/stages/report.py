"""``report``: report.json (versioned schema), report.md and the latency plot at the run root."""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, ParityReport, RunReport, TorchModel
from xpdeploy.report.markdown import write_markdown
from xpdeploy.report.plots import plot_latency
from xpdeploy.report.schema import build_report, write_report_json
from xpdeploy.runfolder import tool_versions
from xpdeploy.stages.context import StageContext


def run(ctx: StageContext, model: TorchModel, parity: ParityReport | None = None
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
        environment=tool_versions(),
        original_extra={"epochs_trained": model.epochs_trained, "top1_samples": model.top1_samples,
                        "val_top1": model.top1},
    )
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
