"""``xpdeploy show``: a one-screen summary of a run folder, finished or partial."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from xpdeploy.errors import RunFolderError
from xpdeploy.runfolder import RESOLVED_PIPELINE, RunFolder, parse_outputs, stage_folder_name


def _describe_outputs(manifest: dict) -> str:
    parts = []
    for artifact in parse_outputs(manifest).values():
        kind = type(artifact).__name__
        if kind == "TorchModel":
            acc = f", top-1 {artifact.top1:.2f}%" if artifact.top1 is not None else ""
            parts.append(f"{artifact.label}: {artifact.gmacs:.4f} GMACs, "
                         f"{artifact.params_m:.2f} M params{acc}")
        elif kind == "OnnxModels":
            parts += [f"{m.file} ({m.nodes} nodes)" for m in artifact.models.values()]
        elif kind == "ParityReport":
            parts.append(f"{len(artifact.candidates)} candidates, "
                         f"{'all gates passed' if artifact.passed else 'GATES FAILED'}")
            if (t := artifact.latency_target) is not None:
                parts.append(_latency(t.measured_ms, t.target_ms, t.predicted_ms)
                             + ("" if t.passed else " FAILED"))
        elif kind == "RunReport":
            parts.append(f"{artifact.markdown_file} ({artifact.status})")
        elif kind == "MaskSet":
            parts.append(f"masks: {artifact.steps} steps, "
                         + ("converged" if artifact.converged else "NOT converged"))
        elif kind == "PrunePlan":
            parts.append(f"plan {artifact.criterion}/{artifact.ranking}: "
                         f"{artifact.gmacs_before:.4f} -> {artifact.gmacs_after:.4f} GMACs"
                         + ("" if artifact.target_latency_ms is None else ", " + _latency(
                             None, artifact.target_latency_ms, artifact.predicted_latency_ms)))
        elif kind == "VerifySet":
            parts.append(f"verify set {artifact.samples} images ({artifact.source})")
    return "; ".join(parts)


def _latency(measured: float | None, target: float, predicted: float | None) -> str:
    """A latency budget in ms per batch: "latency 3.050 ms (target 3.000, predicted 2.950)", or
    "latency target 3.000 ms (predicted 2.950)" before verify measured it."""
    pred = "" if predicted is None else f", predicted {predicted:.3f}"
    if measured is None:
        return f"latency target {target:.3f} ms" + (f" (predicted {predicted:.3f})"
                                                    if predicted is not None else "")
    return f"latency {measured:.3f} ms (target {target:.3f}{pred})"


def _speedup(candidate: dict, batch: str) -> str:
    """E.g. "b1 1.85x +-3%" or "b1 2.10x +-14% (unstable)" from a report.json candidate; the
    spread (half the range of the rounds' speedups over the speedup) is absent from older reports.
    """
    value = candidate["speedup"][batch]
    if value is None:  # not finite: written as null
        return f"b{batch} n/a"
    text = f"b{batch} {value:.2f}x"
    spreads = candidate.get("speedup_spread") or {}
    if batch in spreads:
        spread = spreads[batch]
        text += (" +-?" if spread is None else
                 f" +-{spread:.1%}" if spread < 0.01 else f" +-{spread:.0%}")
    if int(batch) in (candidate.get("unstable") or []):
        text += " (unstable)"
    return text


def summarize_run(run_dir: Path) -> str:
    """Stages with their state, duration and main outputs, then the report's verdict."""
    pipeline_file = run_dir / RESOLVED_PIPELINE
    if not pipeline_file.is_file():
        raise RunFolderError(f"{run_dir} is not an xpdeploy run folder (no {RESOLVED_PIPELINE})")
    resolved = yaml.safe_load(pipeline_file.read_text()) or {}
    folder = RunFolder(run_dir)
    lines = [f"run {run_dir}  pipeline '{resolved.get('name')}'", ""]
    for stage in resolved.get("stages", []):
        name = stage_folder_name(stage)
        manifest = folder.read_manifest(stage)
        if manifest is not None:
            state = f"done    {manifest.get('duration_s', 0):8.1f}s  {_describe_outputs(manifest)}"
        elif (run_dir / name / "checkpoints").is_dir():
            state = "partial  (checkpoint present: rerun to resume)"
        elif (run_dir / name).is_dir():
            state = "partial  (interrupted: rerun to redo)"
        else:
            state = "pending"
        lines.append(f"  {name:<16} {state}")
    report = run_dir / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        lines += ["", f"report: {data.get('status', '?').upper()}  ({run_dir / 'report.md'})"]
        budget = data.get("latency_budget")  # absent without prune.target_latency_ms
        if budget and budget.get("target_ms") is not None:
            measured = (budget.get("measured") or {}).get("measured_ms")
            verdict = {True: "  ok", False: "  FAILED"}.get(budget.get("passed"), "")
            lines.append(f"  {_latency(measured, budget['target_ms'], budget.get('predicted_ms'))}"
                         f" on {budget.get('runtime')} b{budget.get('batch')}{verdict}")
        for c in data.get("candidates", []):
            speed = ", ".join(_speedup(c, b) for b in c.get("speedup", {}))
            top1 = "n/a" if c.get("top1") is None else f"{c['top1']:.2f}%"
            lines.append(f"  {c['name']:<24} top-1 {top1:>7}  agreement {c['agreement']:.4f}  "
                         f"speedup {speed}  {'ok' if c.get('passed') else 'FAILED'}")
    return "\n".join(lines)
