"""Sweep: a grid of pipeline settings, each point a real pipeline run cached by its config digest.

    python bench/sweep.py bench/sweeps/xpruner_masks_cifar10.yaml

A sweep file names a base pipeline, the stage each point runs until (``prune``: one-shot top-1;
``finetune``: also top-1 after the pipeline's fine-tune budget), a ``grid`` of dotted keys to
lists of values (their cartesian product, in file order) and optional single ``points``. Every
point is the base pipeline with those values set exactly as ``xpdeploy run --set`` would, run in
this process in its own folder ``<out>/points/<digest>``, where the digest covers the whole
resolved pipeline and ``until``. So:

* rerunning a sweep skips every finished point (the pipeline reuses its stages), and an
  interrupted point resumes where its stages left off;
* extending the grid runs only the new points; a new point first receives the finished stage
  folders of the finished point whose early sections (model, data, train, learn_masks) match it
  best, and the pipeline's own fingerprints decide what of that is reused (a wrong guess only
  costs time, never a stale result).

Why the pipeline and not a loop of its own: the numbers then come from exactly the code a user
runs (same splits, planner, surgery, evaluation), and the pipeline's cache is the sweep's cache.
Accuracies are on the pipeline's val split; never tune on anything else (issue 8).

Writes ``<out>/sweep.json`` (one row per point: overrides, digest, one-shot and fine-tuned top-1,
MACs, kept structure, mask-learning seconds and convergence) and ``<out>/sweep.md`` (the table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from xpdeploy.errors import XpdeployError
from xpdeploy.fileio import sha256_json, write_json_atomic, write_text_atomic
from xpdeploy.pipeline import run_pipeline
from xpdeploy.spec import PipelineSpec, load_spec

ROOT = Path(__file__).resolve().parent.parent
#: Sections whose equality lets a new point take over a finished point's early stage folders, in
#: the order the stages use them (load/train: model, data, seed, train; learn_masks: its own).
DONOR_LEVELS: tuple[tuple[str, ...], ...] = (("model", "data", "seed", "load", "train"),
                                             ("learn_masks",))
EARLY_STAGES = ("load", "train", "learn_masks")


class SweepFile(BaseModel):
    """What a sweep file holds (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Path
    until: Literal["prune", "finetune"] = "prune"
    #: Overrides every point starts from (a point's own keys win): pins settings whose defaults
    #: may change later, so a sweep file keeps meaning what it measured.
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    points: list[dict[str, Any]] = Field(default_factory=list)


def read_sweep(path: Path) -> SweepFile:
    """The sweep file, validated; ``pipeline`` relative to the file's folder when not absolute."""
    try:
        sweep = SweepFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except FileNotFoundError:
        raise XpdeployError(f"sweep file {path} does not exist") from None
    except (yaml.YAMLError, ValueError) as e:
        raise XpdeployError(f"sweep file {path} is not valid: {str(e).splitlines()[0]} "
                            f"({' '.join(str(e).split())[:200]})") from None
    if not sweep.pipeline.is_absolute():
        sweep.pipeline = (path.parent / sweep.pipeline).resolve()
    return sweep


def expand(sweep: SweepFile) -> list[dict[str, Any]]:
    """The points: the grid's cartesian product (keys in file order), then the single points.
    No grid and no points: the base pipeline alone."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, values, strict=True))
              for values in itertools.product(*(sweep.grid[k] for k in keys))] if keys else []
    points += [dict(p) for p in sweep.points]
    return points or [{}]


def override_args(point: dict[str, Any]) -> list[str]:
    """``--set`` texts for a point; values are written as JSON (which YAML reads back as is)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in point.items()]


def point_spec(sweep: SweepFile, point: dict[str, Any]) -> PipelineSpec:
    """The pipeline with the sweep's ``base`` overrides, then the point's own."""
    return load_spec(sweep.pipeline, override_args({**sweep.base, **point}))


def point_digest(spec: PipelineSpec, until: str) -> str:
    """16 hex digits over the resolved pipeline (name and description aside) and ``until``."""
    settings = spec.model_dump(mode="json", exclude={"name", "description"})
    return sha256_json({"spec": settings, "until": until})[:16]


def _sections(spec_json: dict[str, Any], level: int) -> list[Any]:
    return [spec_json.get(k) for group in DONOR_LEVELS[:level + 1] for k in group]


def seed_from_donor(run_dir: Path, spec: PipelineSpec, points_dir: Path) -> str | None:
    """Copy the early stage folders of the best-matching finished point into a new ``run_dir``.

    Returns the donor's digest, or None when nothing matched (the point starts from scratch).
    """
    mine = spec.model_dump(mode="json")
    best, best_level = None, -1
    for other in sorted(points_dir.glob("*/point.json")):
        record = json.loads(other.read_text(encoding="utf-8"))
        if "result" not in record:
            continue
        for level in range(len(DONOR_LEVELS) - 1, best_level, -1):
            if _sections(record["spec"], level) == _sections(mine, level):
                best, best_level = other.parent, level
                break
    if best is None:
        return None
    for folder in sorted(best.iterdir()):
        stage = folder.name.split("_", 1)[-1]
        if folder.is_dir() and stage in EARLY_STAGES[:best_level + 2]:
            shutil.copytree(folder, run_dir / folder.name, dirs_exist_ok=True)
    return best.name


def _artifact(run_dir: Path, stage_folder: str, output: str) -> dict[str, Any] | None:
    path = run_dir / stage_folder / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["outputs"][output]["artifact"]


def point_result(run_dir: Path) -> dict[str, Any]:
    """What the finished stages of a point's run folder measured."""
    plan = _artifact(run_dir, "04_prune", "plan") or {}
    tuned = _artifact(run_dir, "05_finetune", "model")
    masks = _artifact(run_dir, "03_learn_masks", "masks")
    out: dict[str, Any] = {
        "criterion": plan.get("criterion"), "ranking": plan.get("ranking"),
        "gmacs": plan.get("gmacs_after"), "gmacs_ratio": (plan["gmacs_after"] / plan["gmacs_before"]
                                                          if plan else None),
        "one_shot_top1": plan.get("one_shot_top1"),
        "finetuned_top1": tuned.get("top1") if tuned else None,
        "heads": plan.get("heads_per_block"), "mlp": plan.get("mlp_per_block"),
    }
    if masks is not None and plan.get("criterion") == "xpruner":
        history = json.loads((run_dir / masks["history_file"]).read_text(encoding="utf-8"))
        last = history[-1] if history else {}
        out.update(mask_seconds=masks.get("seconds"), mask_steps=masks.get("steps"),
                   converged=masks.get("converged"), moved_heads=last.get("moved_heads"),
                   moved_neurons=last.get("moved_neurons"))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """One line per point: its overrides, then what it measured."""
    cols = [*keys, "one-shot top-1", "fine-tuned top-1", "GMACs ratio", "mask s", "converged",
            "moved heads", "moved neurons", "heads per block"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        r = row["result"]
        cells = [_fmt(row["overrides"].get(k)) for k in keys] + [
            _fmt(r.get("one_shot_top1")), _fmt(r.get("finetuned_top1")),
            _fmt(r.get("gmacs_ratio")), _fmt(r.get("mask_seconds")), _fmt(r.get("converged")),
            _fmt(r.get("moved_heads")), _fmt(r.get("moved_neurons")), _fmt(r.get("heads"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(sweep_path: Path, out: Path) -> list[dict[str, Any]]:
    """Run (or reuse) every point of the sweep; write sweep.json and sweep.md; return the rows."""
    sweep = read_sweep(sweep_path)
    points = expand(sweep)
    specs = [point_spec(sweep, p) for p in points]  # every override checked before any run
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for p in points for k in p))
    rows = []
    for i, (point, spec) in enumerate(zip(points, specs, strict=True), 1):
        digest = point_digest(spec, sweep.until)
        run_dir = points_dir / digest
        record_path = run_dir / "point.json"
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "(base pipeline)"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if "result" in record:
            print(f"[{i}/{len(points)}] {digest} {label}: cached", flush=True)
        else:
            fresh = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            donor = seed_from_donor(run_dir, spec, points_dir) if fresh else None
            print(f"[{i}/{len(points)}] {digest} {label}: running"
                  + (f" (early stages from {donor})" if donor else ""), flush=True)
            record = {"overrides": point, "digest": digest, "until": sweep.until,
                      "spec": spec.model_dump(mode="json")}
            write_json_atomic(record_path, record)
            t0 = time.monotonic()
            run_pipeline(spec, run_dir, until=sweep.until)
            record["seconds"] = time.monotonic() - t0
            record["result"] = point_result(run_dir)
            write_json_atomic(record_path, record)
        rows.append({k: record[k] for k in ("overrides", "digest", "result")})
        r = record["result"]
        print(f"    one-shot {_fmt(r['one_shot_top1'])}%"
              + (f", fine-tuned {_fmt(r['finetuned_top1'])}%" if r["finetuned_top1"] else ""),
              flush=True)
        write_json_atomic(out / "sweep.json", {"sweep": str(sweep_path), "until": sweep.until,
                                               "pipeline": str(sweep.pipeline), "rows": rows})
        write_text_atomic(out / "sweep.md", markdown_table(rows, keys))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the sweep file (YAML)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: bench/results/sweep-<sweep file name>)")
    args = p.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"sweep-{args.sweep.stem}"
    try:
        run_sweep(args.sweep, out)
    except XpdeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{(out / 'sweep.md').read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
