"""Ablation: does a criterion lose on *how many* units each block keeps, or on *which* ones?

A plan has two parts: the per-block budget (heads and MLP width kept in each block) and the choice
of units inside a block. For two criteria A and B this prunes the shared CIFAR-10 base model with
every combination (budget of A x choice of B, ...) at the same MACs and prints one-shot val top-1
of each, so a gap between two criteria splits into an allocation part and a selection part.

    python bench/plan_swap.py --xpruner-scores RUN/03_learn_masks/scores.json \\
        --out bench/results/plan_swap.json
    python bench/plan_swap.py --xpruner-scores bench/results/xpruner_teacher_scores.json \\
        --allocation bench/results/allocation.json --out bench/results/plan_swap_sensitivity.json

With ``--allocation`` (a bench/allocation.py result) the budgets are the ``sensitivity`` rows of
each criterion at ``--ratio`` (issue 15) instead of the global queue's, and the choices include the
masks' class-coverage order (``--xpruner-masks``).

The x-pruner scores come from a ``learn_masks`` stage folder; Taylor is computed here (the same
1,280 train images and planner as the pipeline). Not a test: it needs ../shared/models and CIFAR-10.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench importable
from bench.pruning_quality import ROOT, load_base, require_base_inputs
from xpdeploy.fileio import write_json_atomic
from xpdeploy.models.complexity import count_gmacs
from xpdeploy.prune import criteria
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.surgery import prune_model
from xpdeploy.prune.unit_scores import KeepSets, UnitScores
from xpdeploy.spec import SensitivityConfig
from xpdeploy.training.batches import shuffled_batches
from xpdeploy.training.evaluate import evaluate_top1
from xpdeploy.xpruner.learn import load_masks
from xpdeploy.xpruner.masks import coverage_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path,
                   default=ROOT.parent / "shared/models/cifar10_deit_tiny_d6_p4.pth")
    p.add_argument("--data", type=Path, default=Path("~/.cache/xpdeploy/cifar10").expanduser())
    p.add_argument("--xpruner-scores", type=Path, required=True)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--taylor-images", type=int, default=1280)
    p.add_argument("--xpruner-masks", type=Path,
                   default=ROOT / "bench/results/xpruner_teacher_masks.safetensors")
    p.add_argument("--allocation", type=Path, default=None,
                   help="take the budgets from this file's sensitivity rows (default refine)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/plan_swap.json")
    args = p.parse_args()
    require_base_inputs(args.model, args.data)
    base, dc, train, val = load_base(args.model, args.data, seed=0)
    macs = MacModel.from_model(base, dc.input_size)
    target = args.ratio * macs.original
    scores = {
        "xpruner": UnitScores.from_json(json.loads(args.xpruner_scores.read_text())),
        "taylor": criteria.taylor_scores(copy.deepcopy(base), shuffled_batches(train, 250, seed=0),
                                         args.taylor_images),
    }
    if args.allocation is None:
        budgets = {name: plan_global(s, macs, target, PlanConstraints(), "type")
                   for name, s in scores.items()}
    else:  # the measured-sensitivity budgets; the masks' coverage order joins the choices
        scores["xpruner_coverage"] = coverage_scores(load_masks(args.xpruner_masks, base, 10))
        rows_in = json.loads(args.allocation.read_text())["rows"]
        budgets = {r["criterion"]: KeepSets.from_json(r["blocks"]) for r in rows_in
                   if r["allocator"] == "sensitivity" and r["ratio"] == args.ratio
                   and r["config"] == SensitivityConfig().model_dump(mode="json")
                   and r["criterion"] in scores}
    rows = []
    for budget_name, budget in budgets.items():
        for choice_name, choice in scores.items():
            keep = choice.keep_top(budget.head_counts, budget.mlp_widths)
            model = copy.deepcopy(base)
            prune_model(model, keep)
            top1 = evaluate_top1(model, val, batch_size=250, label=f"{budget_name}/{choice_name}")
            rows.append({"budget": budget_name, "choice": choice_name, "top1": top1,
                         "gmacs": count_gmacs(model, dc.input_size),
                         "heads": keep.head_counts, "mlp": keep.mlp_widths})
            print(f"budget {budget_name:16s} choice {choice_name:16s}: one-shot {top1:.2f}% "
                  f"heads {keep.head_counts} mlp {keep.mlp_widths}", flush=True)
    write_json_atomic(args.out, {"ratio": args.ratio, "xpruner_scores": str(args.xpruner_scores),
                                 "budgets": "global" if args.allocation is None else
                                 f"sensitivity rows of {args.allocation}", "rows": rows})


if __name__ == "__main__":
    main()
