"""Benchmark: every criterion under every allocator at equal MACs, fine-tuned over seeds (issue 15).

On the shared CIFAR-10 base model, for each within-block order (criterion: x-pruner masks,
taylor, magnitude, random) and each way of splitting the MAC budget over blocks (allocator:
``global`` queue of type-normalised scores, learned ``threshold``s, measured ``sensitivity``),
at each kept-MACs ratio: the plan (heads and MLP width per block), val top-1 right after pruning
(one-shot), and val top-1 after **the pipeline's own fine-tuning** (``finetune`` of
pipelines/cifar10_deit_tiny.yaml: distilled from the original) once per seed, with the mean and
standard deviation over seeds. Everything through the product's planner, solver and surgery.

    tar -xf ../shared/datasets/cifar10.tar -C ~/.cache/xpdeploy/
    python bench/allocation.py --ratios 0.5 --seeds 0,1,2 --out bench/results/allocation.json
    python bench/allocation.py --ratios 0.3,0.4,0.5,0.6,0.7,0.8 --seeds "" \\
        --out bench/results/allocation.json          # one-shot only: no fine-tuning

**Resumable**: rows (criterion, allocator, ratio) and their seeds already in ``--out`` with the
same settings are kept, so an interrupted run goes on where it stopped and more seeds, ratios,
criteria or allocators add only what is new. The sensitivity curves of a criterion are measured
once and shared by every ratio (kept in ``--out`` too); the refinement is per ratio.

The x-pruner scores come from ``--xpruner-scores`` (a learn_masks folder's scores.json, by default
the product defaults' masks of issue 8: bench/results/xpruner_teacher_scores.json), so mask
learning (407 s on 2 cores, docs/benchmarks.md) is not repeated here.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench importable
from bench.pruning_quality import ROOT, load_base, require_base_inputs
from xpdeploy.fileio import sha256_file, sha256_json, write_json_atomic
from xpdeploy.prune import criteria
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.sensitivity import SensitivityCurves, measure_curves, sensitivity_plan
from xpdeploy.prune.surgery import prune_model
from xpdeploy.prune.threshold import threshold_search
from xpdeploy.prune.unit_scores import KeepSets, UnitScores
from xpdeploy.spec import SensitivityConfig, ThresholdConfig, load_spec
from xpdeploy.training.batches import fixed_images, shuffled_batches
from xpdeploy.training.distill import Distiller
from xpdeploy.training.evaluate import evaluate_top1
from xpdeploy.training.loop import train_model
from xpdeploy.xpruner.learn import load_masks
from xpdeploy.xpruner.masks import coverage_scores

CRITERIA = ("xpruner", "taylor", "magnitude", "random")
#: Within-block orders tried for the x-pruner masks (issue 15, item 3): the product's hybrid with
#: Taylor, and class coverage (needs the mask tables: --xpruner-masks).
EXPERIMENTS = ("xpruner_taylor", "xpruner_coverage")
ALLOCATORS = ("global", "threshold", "sensitivity")
#: Arguments that do not change a row's numbers (the resume key leaves them out).
#: The allocators' own settings are not in it either: they are part of each row's identity, so
#: several threshold or sensitivity settings can sit side by side in one file.
NOT_SETTINGS = ("criteria", "allocators", "ratios", "seeds", "out", "markdown", "curves_cache",
                "threshold", "sensitivity")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path,
                   default=ROOT.parent / "shared/models/cifar10_deit_tiny_d6_p4.pth")
    p.add_argument("--data", type=Path, default=Path("~/.cache/xpdeploy/cifar10").expanduser())
    p.add_argument("--pipeline", type=Path, default=ROOT / "pipelines/cifar10_deit_tiny.yaml",
                   help="its finetune section is the fine-tuning budget")
    p.add_argument("--xpruner-scores", type=Path,
                   default=ROOT / "bench/results/xpruner_teacher_scores.json")
    p.add_argument("--xpruner-masks", type=Path,
                   default=ROOT / "bench/results/xpruner_teacher_masks.safetensors",
                   help="masks.safetensors of the same learn_masks run (for xpruner_coverage)")
    p.add_argument("--criteria", default=",".join(CRITERIA),
                   help=f"any of {', '.join(CRITERIA + EXPERIMENTS)}")
    p.add_argument("--allocators", default=",".join(ALLOCATORS))
    p.add_argument("--ratios", default="0.5", help="kept-MACs ratios, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds ('' = one-shot only)")
    p.add_argument("--taylor-images", type=int, default=1280)
    p.add_argument("--threshold", default="{}", help="ThresholdConfig fields as JSON")
    p.add_argument("--sensitivity", default="{}", help="SensitivityConfig fields as JSON")
    p.add_argument("--curves-cache", type=Path,
                   default=ROOT / "bench/results/allocation_curves.json",
                   help="the original's sensitivity curves, keyed by scores, images and grid "
                        "(shared by every --out)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/allocation.json")
    p.add_argument("--markdown", type=Path, default=None, help="the table, also printed")
    return p.parse_args(argv)


def _settings_key(args: argparse.Namespace) -> str:
    settings = {k: str(v) for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings["xpruner_scores"] = sha256_json(json.loads(args.xpruner_scores.read_text()))
    if args.xpruner_masks is not None:
        settings["xpruner_masks"] = sha256_file(args.xpruner_masks)
    settings["finetune"] = load_spec(args.pipeline).finetune.model_dump(mode="json")
    return sha256_json(settings)


def summarize(seeds: dict[str, float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the fine-tuned top-1 over seeds (None if absent)."""
    values = list(seeds.values())
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_finetuned(seeds: dict[str, float]) -> str:
    """``mean +- sd (n)`` of the fine-tuned top-1 over seeds, ``-`` when none ran."""
    mean, sd = summarize(seeds)
    return f"{mean:.2f} +- {sd:.2f} ({len(seeds)})" if mean is not None else "-"


def original_curves(cache: dict[str, Any], criterion: str, base: Any, scores: UnitScores,
                    images: Any, floors: Any, *, count: int, mlp_step: int, model: Path
                    ) -> tuple[SensitivityCurves, str, bool]:
    """The original's sensitivity curves of ``scores`` from ``cache`` (keyed by the scores, the
    image count, the grid and the model file), measured and added when missing; also the key,
    and whether they were measured now (the caller then writes the cache)."""
    key = sha256_json({"scores": scores.to_json(), "images": count, "mlp_step": mlp_step,
                       "model": str(model)})
    measured = key not in cache
    if measured:  # the original's curves: once per criterion
        t0 = time.monotonic()
        curves = measure_curves(base, scores, images, floors, mlp_step=mlp_step)
        cache[key] = {"criterion": criterion, "curves": curves.to_json(),
                      "seconds": time.monotonic() - t0}
    return SensitivityCurves.from_json(cache[key]["curves"]), key, measured


def finetuned_top1(base: Any, blocks: list[dict[str, list[int]]], train: Any, val: Any,
                   finetune: Any, folder: Path, tag: str, seed: int) -> float:
    """Val top-1 of ``base`` cut to ``blocks`` (a plan's kept units) after the pipeline's own
    fine-tuning (distilled from ``base``) with ``seed``; checkpoints in ``folder``/``tag``."""
    model = prune_model(copy.deepcopy(base), KeepSets.from_json(blocks))
    distiller = Distiller.from_config(copy.deepcopy(base), finetune)
    train_model(model, train, None, finetune, checkpoint_dir=folder / tag, fingerprint=tag,
                seed=seed, eval_batch_size=250, distiller=distiller)
    return evaluate_top1(model, val, batch_size=250, label=f"{tag} fine-tuned")


def allocator_label(row: dict[str, Any]) -> str:
    """The allocator and the settings that tell its rows apart (threshold loss and budget,
    sensitivity refinement)."""
    c = row["config"]
    if row["allocator"] == "threshold":
        return f"threshold ({c['loss']}, {c['budget']})"
    if row["allocator"] == "sensitivity":
        return f"sensitivity (refine {c['refine']})"
    return row["allocator"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (ratio, criterion, allocator)."""
    lines = ["| ratio | criterion | allocator | one-shot top-1 | fine-tuned top-1 (mean +- sd, "
             "seeds) | heads per block | MLP per block | plan s |",
             "|---:|---|---|---:|---:|---|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["criterion"], r["allocator"],
                                         json.dumps(r["config"], sort_keys=True))):
        lines.append(f"| {r['ratio']:.1f} | {r['criterion']} | {allocator_label(r)} | "
                     f"{r['one_shot_top1']:.2f} | {fmt_finetuned(r['finetuned'])} | "
                     f"{', '.join(map(str, r['heads']))} | {', '.join(map(str, r['mlp']))} | "
                     f"{r['plan_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    require_base_inputs(args.model, args.data)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    key = _settings_key(args)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if previous and previous.get("settings_key") != key:
        sys.exit(f"error: {args.out} holds results of other settings; choose another --out")
    rows: list[dict[str, Any]] = previous.get("rows", [])
    curves_cache: dict[str, Any] = (json.loads(args.curves_cache.read_text())
                                    if args.curves_cache.is_file() else {})
    timings: dict[str, float] = previous.get("timings", {})
    finetune = load_spec(args.pipeline).finetune
    assert finetune is not None
    threshold_cfg = ThresholdConfig(**json.loads(args.threshold))
    sens_cfg = SensitivityConfig(**json.loads(args.sensitivity))

    base, dc, train, val = load_base(args.model, args.data, seed=0)
    macs = MacModel.from_model(base, dc.input_size)
    constraints = PlanConstraints()
    base_top1 = previous.get("base_top1") or evaluate_top1(base, val, batch_size=250,
                                                           label="base")
    print(f"base model: {macs.original / 1e9:.4f} GMACs, val top-1 {base_top1:.2f}%")
    sens_images = fixed_images(train, sens_cfg.images, sens_cfg.batch_size, seed=0)  # as the stage
    work = Path(tempfile.mkdtemp(prefix="xpd-alloc-"))

    def write() -> None:
        write_json_atomic(args.curves_cache, curves_cache)
        write_json_atomic(args.out, {"base_top1": base_top1, "base_gmacs": macs.original / 1e9,
                                     "settings_key": key, "rows": rows, "timings": timings,
                                     "args": {k: str(v) for k, v in vars(args).items()}})

    scores_cache: dict[str, UnitScores] = {}

    def allocator_config(allocator: str) -> dict[str, Any]:
        """The settings of ``allocator`` that decide its rows (none for the global queue)."""
        cfg = {"threshold": threshold_cfg, "sensitivity": sens_cfg}.get(allocator)
        return cfg.model_dump(mode="json") if cfg is not None else {}

    def scores_for(name: str) -> UnitScores:
        if name not in scores_cache:
            t0 = time.monotonic()
            if name == "xpruner":
                s = UnitScores.from_json(json.loads(args.xpruner_scores.read_text()))
            elif name == "taylor":
                s = criteria.taylor_scores(copy.deepcopy(base), shuffled_batches(train, 64, seed=0),
                                           args.taylor_images)
            elif name == "xpruner_taylor":
                s = criteria.hybrid_scores(scores_for("xpruner"), scores_for("taylor"))
            elif name == "xpruner_coverage":  # what prune.mask_score: coverage ranks by
                s = coverage_scores(load_masks(args.xpruner_masks, base, 10))
            elif name == "magnitude":
                s = criteria.magnitude_scores(base)
            else:
                s = criteria.random_scores(list(macs.heads), list(macs.mlp), 0)
            scores_cache[name] = s
            timings.setdefault(f"scores {name}", time.monotonic() - t0)
        return scores_cache[name]

    def plan(criterion: str, allocator: str, target: float) -> tuple[KeepSets, dict[str, Any]]:
        scores = scores_for(criterion)
        if allocator == "global":
            return plan_global(scores, macs, target, constraints, "type"), {}
        if allocator == "threshold":
            batches = shuffled_batches(train, threshold_cfg.batch_size, seed=0)
            res = threshold_search(copy.deepcopy(base), scores.normalized("type"), macs, batches,
                                   threshold_cfg, target, constraints)
            first, last = res.history[0], res.history[-1]
            return res.keep, {"threshold_start": [first["kept_heads"], first["kept_neurons"]],
                              "threshold_end": [last["kept_heads"], last["kept_neurons"]]}
        curves, curves_key, measured = original_curves(
            curves_cache, criterion, base, scores, sens_images, constraints.floors(macs),
            count=sens_cfg.images, mlp_step=sens_cfg.mlp_step, model=args.model)
        if measured:
            write()
        res = sensitivity_plan(base, scores, sens_images, macs, target, constraints,
                               mlp_step=sens_cfg.mlp_step, refine=sens_cfg.refine, curves=curves)
        rounds = [{k: v for k, v in r.items() if k != "curves"} for r in res.rounds]
        for r in rounds:  # each round's own plan, so the refinement's worth is on record
            cut = prune_model(copy.deepcopy(base), scores.keep_top(r["heads"], r["mlp"]))
            r["one_shot_top1"] = evaluate_top1(cut, val, batch_size=250, label="round")
        return res.keep, {"plan_loss": res.plan_loss, "rounds": rounds,
                          "curves_seconds": curves_cache[curves_key]["seconds"]}

    for ratio in ratios:
        for criterion in args.criteria.split(","):
            for allocator in args.allocators.split(","):
                config = allocator_config(allocator)
                row = next((r for r in rows if (r["criterion"], r["allocator"], r["ratio"],
                                                r["config"])
                            == (criterion, allocator, ratio, config)), None)
                if row is None:
                    t0 = time.monotonic()
                    keep, extra = plan(criterion, allocator, ratio * macs.original)
                    seconds = time.monotonic() - t0
                    pruned = prune_model(copy.deepcopy(base), keep)
                    one_shot = evaluate_top1(pruned, val, batch_size=250,
                                             label=f"{criterion}/{allocator} one-shot")
                    row = {"criterion": criterion, "allocator": allocator, "ratio": ratio,
                           "config": config,
                           "heads": keep.head_counts, "mlp": keep.mlp_widths,
                           "gmacs": macs.macs(keep.head_counts, keep.mlp_widths) / 1e9,
                           "one_shot_top1": one_shot, "plan_seconds": seconds,
                           "blocks": keep.to_json(), "finetuned": {}, **extra}
                    rows.append(row)
                    print(f"{ratio} {criterion}/{allocator}: heads {keep.head_counts} mlp "
                          f"{keep.mlp_widths}, one-shot {one_shot:.2f}% ({seconds:.0f} s)",
                          flush=True)
                    write()
                for seed in seeds:
                    if str(seed) in row["finetuned"]:
                        continue
                    tag = f"{criterion}-{allocator}-{ratio}-{seed}"
                    row["finetuned"][str(seed)] = finetuned_top1(base, row["blocks"], train, val,
                                                                 finetune, work, tag, seed)
                    mean, sd = summarize(row["finetuned"])
                    print(f"  seed {seed}: fine-tuned {row['finetuned'][str(seed)]:.2f}% "
                          f"(mean {mean:.2f} +- {sd:.2f})", flush=True)
                    write()
    write()
    table = markdown_table(rows)
    print("\n" + table)
    if args.markdown is not None:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
