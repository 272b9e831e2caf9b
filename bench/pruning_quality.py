"""Benchmark: pruning criteria at equal MACs on the shared CIFAR-10 base model (not a test).

For each method (x-pruner with global and threshold ranking, the x-pruner x Taylor hybrid,
magnitude, taylor, random, Torch-Pruning's recipe) and each kept-MACs ratio, through the same
planner, surgery and export path: val top-1 right after pruning, val top-1 after the same short
fine-tuning budget, the kept structure per block, and onnxruntime CPU latency of the pruned model
vs the original (batch 1 and 32), measured interleaved in one process. Writes JSON, a Markdown
table and (with several ratios) the accuracy-vs-MACs plot.

    tar -xf ../shared/datasets/cifar10.tar -C ~/.cache/xpdeploy/
    python bench/pruning_quality.py --out bench/results/pruning_quality.json
    python bench/pruning_quality.py --ratios 0.3,0.4,0.5,0.6,0.7,0.8 \\
        --methods xpruner-global,taylor,magnitude,random,torch-pruning \\
        --out bench/results/pruning_curve.json --plot docs/img/pruning_curve_cifar10.png

**Resumable**: rows already in ``--out`` with the same settings (everything but --methods,
--ratios and the output paths) are kept and not measured again, so an interrupted curve goes on
where it stopped and a new method or ratio adds only its own rows. The scores of a method are
computed once and shared by all ratios; ``--xpruner-scores`` takes the x-pruner scores from a
``learn_masks`` stage folder's ``scores.json`` (e.g. a sweep point's) instead of learning masks.

Needs ../shared/models/cifar10_deit_tiny_d6_p4.pth and the extracted CIFAR-10 (or --model/--data).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from xpdeploy.artifacts import DataConfig
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.data.sources import open_split
from xpdeploy.data.verify_set import select_indices
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.fileio import sha256_json, write_json_atomic
from xpdeploy.models.complexity import count_gmacs
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.prune import criteria
from xpdeploy.prune.mac_model import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.surgery import prune_model
from xpdeploy.prune.threshold import threshold_search
from xpdeploy.prune.unit_scores import UnitScores
from xpdeploy.spec import (
    DataConfigSection,
    LearnMasksConfig,
    ModelConfig,
    PreprocessConfig,
    ThresholdConfig,
    TrainConfig,
)
from xpdeploy.training.batches import shuffled_batches
from xpdeploy.training.evaluate import evaluate_top1
from xpdeploy.training.loop import train_model
from xpdeploy.verify.latency import measure_interleaved
from xpdeploy.xpruner.learn import learn_masks

ROOT = Path(__file__).resolve().parent.parent
BASE_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
               "mlp_ratio": 4, "num_classes": 10}
METHODS = ("xpruner-global", "xpruner-threshold", "xpruner_taylor-global", "taylor", "magnitude",
           "random", "torch-pruning")
#: Arguments that do not change a row's numbers (the resume key leaves them out).
NOT_SETTINGS = ("methods", "ratios", "out", "plot", "markdown")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path,
                   default=ROOT.parent / "shared/models/cifar10_deit_tiny_d6_p4.pth")
    p.add_argument("--data", type=Path, default=Path("~/.cache/xpdeploy/cifar10").expanduser())
    p.add_argument("--ratios", default="0.5", help="kept-MACs ratios, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--xpruner-scores", type=Path, default=None,
                   help="scores.json of a learn_masks stage folder (skips mask learning)")
    p.add_argument("--mask-images", type=int, default=5000, help="train images for the masks")
    p.add_argument("--mask-epochs", type=int, default=2)
    p.add_argument("--mask-lr", type=float, default=1e-2)
    p.add_argument("--mask-project", action="store_true", help="clip masks to [0, 1]")
    p.add_argument("--mask-target", choices=("label", "teacher"), default="label")
    p.add_argument("--lambda-sparse", type=float, default=3e-3)
    p.add_argument("--taylor-images", type=int, default=1280)
    p.add_argument("--threshold-steps", type=int, default=100)
    p.add_argument("--finetune-images", type=int, default=5000, help="per epoch, every method")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--latency-iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/pruning_quality.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG: top-1 vs kept-MACs ratio")
    p.add_argument("--markdown", type=Path, default=None, help="the table, also printed")
    return p.parse_args()


def _settings_key(args: argparse.Namespace) -> str:
    """Digest of the arguments that decide a row's numbers (resume only rows with the same)."""
    settings = {k: str(v) for k, v in vars(args).items() if k not in NOT_SETTINGS}
    if args.xpruner_scores is not None:  # the file's content, not its name, decides
        settings["xpruner_scores"] = sha256_json(json.loads(args.xpruner_scores.read_text()))
    return sha256_json(settings)


def _previous_rows(out: Path, key: str) -> list[dict[str, Any]]:
    """Rows of an earlier run with the same settings (none when the file is absent or other)."""
    if not out.is_file():
        return []
    data = json.loads(out.read_text())
    if data.get("settings_key") != key:
        print(f"{out} holds rows of other settings: measuring everything again")
        return []
    return list(data.get("rows", []))


def require_base_inputs(model: Path, data: Path) -> None:
    """Exit with one line when the base model or the CIFAR-10 folder is missing."""
    if not model.is_file() or not (data / "val").is_dir():
        sys.exit(f"error: needs {model} and {data}/val (see the docstring)")


def load_base(model: Path, data: Path, seed: int) -> tuple[Any, DataConfig, Any, Any]:
    """The shared base model (its own 32 px preprocessing) and CIFAR-10's train and val splits.

    Returns (model, data config, train split, val split); every benchmark on the base model
    loads it this way so their numbers share one preprocessing.
    """
    base = create_model(ModelConfig(name="deit_tiny_patch16_224", kwargs=BASE_KWARGS,
                                    checkpoint=model))
    pre = PreprocessConfig(size=32, crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465),
                           std=(0.247, 0.243, 0.261))
    section = DataConfigSection(source="imagefolder", root=data, preprocess=pre)
    dc = resolve_data_config(base, pre)
    train = open_split(section, dc, "train", num_classes=10, seed=seed)
    val = open_split(section, dc, "val", num_classes=10, seed=seed)
    return base, dc, train, val


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (method, ratio), sorted by method then ratio."""
    lines = ["| method | target ratio | GMACs (ratio) | one-shot top-1 | fine-tuned top-1 | "
             "heads per block | MLP per block | ORT speedup b1 | b32 |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["target_ratio"])):
        lat = r["latency"]
        lines.append(
            f"| {r['method']} | {r['target_ratio']:.1f} | {r['gmacs']:.4f} ({r['ratio']:.3f}) | "
            f"{r['one_shot_top1']:.2f} | {r['finetuned_top1']:.2f} | "
            f"{', '.join(map(str, r['heads']))} | {', '.join(map(str, r['mlp']))} | "
            f"{lat['1']['speedup']:.2f}x | {lat['32']['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot_curve(rows: list[dict[str, Any]], base_top1: float, path: Path) -> None:
    """Top-1 vs the kept-MACs ratio per method: fine-tuned solid, one-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = sorted({r["method"] for r in rows})
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"])
        x = [r["ratio"] for r in mine]
        color = f"C{i}"
        ax.plot(x, [r["finetuned_top1"] for r in mine], "o-", color=color,
                label=f"{method}, fine-tuned")
        ax.plot(x, [r["one_shot_top1"] for r in mine], "s--", color=color, alpha=0.6,
                label=f"{method}, one-shot")
    ax.axhline(base_top1, color="k", lw=0.8, ls=":", label=f"original {base_top1:.2f}%")
    ax.set_xlabel("kept MACs / original MACs")
    ax.set_ylabel("CIFAR-10 val top-1 (%)")
    ax.set_title("Accuracy vs MACs, shared CIFAR-10 base model (same planner and surgery)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = _args()
    require_base_inputs(args.model, args.data)
    if args.xpruner_scores is not None and not args.xpruner_scores.is_file():
        sys.exit(f"error: --xpruner-scores {args.xpruner_scores} does not exist")
    ratios = [float(r) for r in args.ratios.split(",")]
    key = _settings_key(args)
    rows = _previous_rows(args.out, key)
    done = {(r["method"], r["target_ratio"]) for r in rows}
    torch.manual_seed(args.seed)
    base, dc, train, val = load_base(args.model, args.data, args.seed)
    macs = MacModel.from_model(base, dc.input_size)
    constraints = PlanConstraints()
    base_top1 = evaluate_top1(base, val, batch_size=250, label="base")
    print(f"base model: {macs.original / 1e9:.4f} GMACs, val top-1 {base_top1:.2f}%")
    idx = select_indices(val.labels, 256, args.seed)
    pixels = torch.stack([torch.from_numpy(val[int(i)][0]) for i in idx]).numpy()
    work = Path(tempfile.mkdtemp(prefix="xpd-bench-"))
    export_onnx(base, work / "original.onnx", input_size=dc.input_size, opset=17, trace_batch=2,
                dynamic_batch=True)

    scores_cache: dict[str, tuple[UnitScores, dict[str, Any]]] = {}

    def scores_for(name: str) -> tuple[UnitScores, dict[str, Any]]:
        if name in scores_cache:
            return scores_cache[name]
        t0 = time.monotonic()
        extra: dict[str, Any] = {}
        if name == "xpruner" and args.xpruner_scores is not None:
            scores = UnitScores.from_json(json.loads(args.xpruner_scores.read_text()))
            extra = {"scores_from": str(args.xpruner_scores)}
        elif name == "xpruner":
            cfg = LearnMasksConfig(epochs=args.mask_epochs, max_images=args.mask_images,
                                   lr=args.mask_lr, lambda_sparse=args.lambda_sparse,
                                   project=args.mask_project, target=args.mask_target)
            res = learn_masks(copy.deepcopy(base), train, cfg, num_classes=10, seed=args.seed)
            scores, extra = res.scores, {"converged": res.converged, "steps": res.steps}
        elif name == "xpruner_taylor":
            scores = criteria.hybrid_scores(scores_for("xpruner")[0], scores_for("taylor")[0])
        elif name == "taylor":
            batches = shuffled_batches(train, 64, seed=args.seed)
            scores = criteria.taylor_scores(copy.deepcopy(base), batches, args.taylor_images)
        elif name == "magnitude":
            scores = criteria.magnitude_scores(base)
        else:
            scores = criteria.random_scores(list(macs.heads), list(macs.mlp), args.seed)
        scores_cache[name] = (scores, {**extra, "score_seconds": time.monotonic() - t0})
        return scores_cache[name]

    def write() -> None:
        write_json_atomic(args.out, {"base_top1": base_top1, "base_gmacs": macs.original / 1e9,
                                     "settings_key": key,
                                     "args": {k: str(v) for k, v in vars(args).items()},
                                     "rows": rows})

    for method, ratio in itertools.product(args.methods.split(","), ratios):
        if (method, ratio) in done:
            print(f"{method} @ {ratio}: kept from {args.out}")
            continue
        if method == "torch-pruning":
            try:
                import torch_pruning  # noqa: F401  (optional peer)
            except ImportError:
                print("torch-pruning: skipped (pip install torch-pruning)")
                continue
        target = ratio * macs.original
        model = copy.deepcopy(base)
        t0 = time.monotonic()
        extra: dict[str, Any] = {}
        keep = None
        if method == "torch-pruning":
            sys.path.insert(0, str(ROOT))
            from bench.peers.torch_pruning_vit import prune_with_torch_pruning

            batches = list(itertools.islice(shuffled_batches(train, 64, seed=args.seed),
                                            max(1, args.taylor_images // 64)))
            model, info = prune_with_torch_pruning(
                model, batches, target, lambda m: count_gmacs(m, dc.input_size) * 1e9,
                dc.input_size)
            extra = {"peer": info}
        elif method.endswith("threshold"):
            scores, extra = scores_for(method.split("-")[0])
            batches = shuffled_batches(train, 32, seed=args.seed)
            res = threshold_search(model, scores.normalized("type"), macs, batches,
                                   ThresholdConfig(steps=args.threshold_steps, batch_size=32),
                                   target, constraints)
            keep = res.keep
        else:
            scores, extra = scores_for(method.split("-")[0])
            keep = plan_global(scores, macs, target, constraints, "type")
        plan_seconds = time.monotonic() - t0
        if keep is not None:
            prune_model(model, keep)
            heads, mlp = keep.head_counts, keep.mlp_widths
        else:
            heads, mlp = extra["peer"]["num_heads_per_block"], extra["peer"]["mlp_per_block"]
        gmacs = count_gmacs(model, dc.input_size)
        one_shot = evaluate_top1(model, val, batch_size=250, label=f"{method} one-shot")
        ft = TrainConfig(epochs=args.finetune_epochs, max_images=args.finetune_images,
                         batch_size=128, lr=5e-4, warmup_epochs=0.1, label_smoothing=0.1)
        tag = f"{method}-{ratio}"
        train_model(model, train, None, ft, checkpoint_dir=work / tag, fingerprint=tag,
                    seed=args.seed, eval_batch_size=250)
        tuned = evaluate_top1(model, val, batch_size=250, label=f"{method} fine-tuned")
        export_onnx(model, work / f"{tag}.onnx", input_size=dc.input_size, opset=17,
                    trace_batch=2, dynamic_batch=True)
        latency = {}
        with OrtRunner(work / "original.onnx") as o, OrtRunner(work / f"{tag}.onnx") as p:
            for b in (1, 32):
                lo, lp = measure_interleaved([o, p], pixels, b, 5, args.latency_iters)
                latency[str(b)] = {"original_p50": lo.p50, "pruned_p50": lp.p50,
                                   "speedup": lo.p50 / lp.p50}
        rows.append({"method": method, "target_ratio": ratio, "gmacs": gmacs,
                     "ratio": gmacs * 1e9 / macs.original, "one_shot_top1": one_shot,
                     "finetuned_top1": tuned, "heads": heads, "mlp": mlp, "latency": latency,
                     "plan_seconds": plan_seconds, **extra})
        print(f"{method} @ {ratio}: {gmacs:.4f} GMACs, one-shot {one_shot:.2f}%, fine-tuned "
              f"{tuned:.2f}%, speedup b1 {latency['1']['speedup']:.2f}x "
              f"b32 {latency['32']['speedup']:.2f}x", flush=True)
        write()
    write()
    table = markdown_table(rows)
    print("\n" + table)
    if args.markdown is not None:
        args.markdown.write_text(table)
    if args.plot is not None and rows:
        plot_curve(rows, base_top1, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
