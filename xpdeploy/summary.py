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
        elif kind == "RunReport":
            parts.append(f"{artifact.markdown_file} ({artifact.status})")
        elif kind == "MaskSet":
            parts.append(f"masks: {artifact.steps} steps, "
                         + ("converged" if artifact.converged else "NOT converged"))
        elif kind == "PrunePlan":
            parts.append(f"plan {artifact.criterion}/{artifact.ranking}: "
                         f"{artifact.gmacs_before:.4f} -> {artifact.gmacs_after:.4f} GMACs")
        elif kind == "VerifySet":
            parts.append(f"verify set {artifact.samples} images ({artifact.source})")
    return "; ".join(parts)


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
        for c in data.get("candidates", []):
            speed = ", ".join(f"b{b} {s:.2f}x" for b, s in c.get("speedup", {}).items())
            top1 = "n/a" if c.get("top1") is None else f"{c['top1']:.2f}%"
            lines.append(f"  {c['name']:<24} top-1 {top1:>7}  agreement {c['agreement']:.4f}  "
                         f"speedup {speed}  {'ok' if c.get('passed') else 'FAILED'}")
    return "\n".join(lines)
