"""Benchmark: pruning criteria at equal MACs on the shared CIFAR-10 base model (not a test).

For each method (x-pruner with global and threshold ranking, magnitude, taylor, random), through
the same planner, surgery and export path: val top-1 right after pruning, val top-1 after the same
short fine-tuning budget, the kept structure per block, and onnxruntime CPU latency of the pruned
model vs the original (batch 1 and 32), measured interleaved in one process. Prints a Markdown
table and writes JSON.

    tar -xf ../shared/datasets/cifar10.tar -C ~/.cache/xpdeploy/
    python bench/pruning_quality.py --out bench/results/pruning_quality.json

Needs ../shared/models/cifar10_deit_tiny_d6_p4.pth and the extracted CIFAR-10 (or --model/--data).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.data.sources import open_split
from xpdeploy.data.verify_set import select_indices
from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.fileio import write_json_atomic
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.models.macs import count_gmacs
from xpdeploy.prune import criteria
from xpdeploy.prune.macs import MacModel
from xpdeploy.prune.planner import PlanConstraints, plan_global
from xpdeploy.prune.surgery import prune_model
from xpdeploy.prune.threshold import threshold_search
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
METHODS = ("xpruner-global", "xpruner-threshold", "taylor", "magnitude", "random",
           "torch-pruning")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path,
                   default=ROOT.parent / "shared/models/cifar10_deit_tiny_d6_p4.pth")
    p.add_argument("--data", type=Path, default=Path("~/.cache/xpdeploy/cifar10").expanduser())
    p.add_argument("--target-ratio", type=float, default=0.5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--mask-images", type=int, default=5000, help="train images for the masks")
    p.add_argument("--mask-epochs", type=int, default=2)
    p.add_argument("--mask-lr", type=float, default=1e-2)
    p.add_argument("--lambda-sparse", type=float, default=3e-3)
    p.add_argument("--taylor-images", type=int, default=1280)
    p.add_argument("--threshold-steps", type=int, default=100)
    p.add_argument("--finetune-images", type=int, default=5000, help="per epoch, every method")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--latency-iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/pruning_quality.json")
    return p.parse_args()


def main() -> None:
    args = _args()
    if not args.model.is_file() or not (args.data / "val").is_dir():
        sys.exit(f"error: needs {args.model} and {args.data}/val (see the docstring)")
    torch.manual_seed(args.seed)
    base = create_model(ModelConfig(name="deit_tiny_patch16_224", kwargs=BASE_KWARGS,
                                    checkpoint=args.model))
    pre = PreprocessConfig(size=32, crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465),
                           std=(0.247, 0.243, 0.261))
    section = DataConfigSection(source="imagefolder", root=args.data, preprocess=pre)
    dc = resolve_data_config(base, pre)
    train = open_split(section, dc, "train", num_classes=10, seed=args.seed)
    val = open_split(section, dc, "val", num_classes=10, seed=args.seed)
    macs = MacModel.from_model(base, dc.input_size)
    target = args.target_ratio * macs.original
    constraints = PlanConstraints()
    base_top1 = evaluate_top1(base, val, batch_size=250, label="base")
    print(f"base model: {macs.original / 1e9:.4f} GMACs, val top-1 {base_top1:.2f}%")
    idx = select_indices(val.labels, 256, args.seed)
    pixels = torch.stack([torch.from_numpy(val[int(i)][0]) for i in idx]).numpy()
    work = Path(tempfile.mkdtemp(prefix="xpd-bench-"))
    export_onnx(base, work / "original.onnx", input_size=dc.input_size, opset=17, trace_batch=2,
                dynamic_batch=True)

    scores_cache: dict[str, object] = {}

    def scores_for(method: str):
        name = method.split("-")[0]
        if name in scores_cache:
            return scores_cache[name]
        t0 = time.monotonic()
        if name == "xpruner":
            cfg = LearnMasksConfig(epochs=args.mask_epochs, max_images=args.mask_images,
                                   lr=args.mask_lr, lambda_sparse=args.lambda_sparse)
            res = learn_masks(copy.deepcopy(base), train, cfg, num_classes=10, seed=args.seed)
            scores, extra = res.scores, {"converged": res.converged, "steps": res.steps}
        elif name == "taylor":
            batches = shuffled_batches(train, 64, seed=args.seed)
            scores, extra = criteria.taylor_scores(copy.deepcopy(base), batches,
                                                   args.taylor_images), {}
        elif name == "magnitude":
            scores, extra = criteria.magnitude_scores(base), {}
        else:
            scores, extra = criteria.random_scores(list(macs.heads), list(macs.mlp),
                                                   args.seed), {}
        scores_cache[name] = (scores, {**extra, "score_seconds": time.monotonic() - t0})
        return scores_cache[name]

    rows = []
    for method in args.methods.split(","):
        if method == "torch-pruning":
            try:
                import torch_pruning  # noqa: F401  (optional peer)
            except ImportError:
                print("torch-pruning: skipped (pip install torch-pruning)")
                continue
        model = copy.deepcopy(base)
        t0 = time.monotonic()
        extra: dict[str, object] = {}
        if method == "torch-pruning":
            sys.path.insert(0, str(ROOT))
            from bench.peers.torch_pruning_vit import prune_with_torch_pruning

            batches = list(itertools.islice(shuffled_batches(train, 64, seed=args.seed),
                                            max(1, args.taylor_images // 64)))
            model, info = prune_with_torch_pruning(
                model, batches, target, lambda m: count_gmacs(m, dc.input_size) * 1e9,
                dc.input_size)
            keep = None
            extra = {"peer": info}
        elif method.endswith("threshold"):
            scores, extra = scores_for(method)
            batches = shuffled_batches(train, 32, seed=args.seed)
            res = threshold_search(model, scores.normalized("type"), macs, batches,
                                   ThresholdConfig(steps=args.threshold_steps, batch_size=32),
                                   target, constraints)
            keep = res.keep
        else:
            scores, extra = scores_for(method)
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
        train_model(model, train, None, ft, checkpoint_dir=work / method, fingerprint=method,
                    seed=args.seed, eval_batch_size=250)
        tuned = evaluate_top1(model, val, batch_size=250, label=f"{method} fine-tuned")
        export_onnx(model, work / f"{method}.onnx", input_size=dc.input_size, opset=17,
                    trace_batch=2, dynamic_batch=True)
        latency = {}
        with OrtRunner(work / "original.onnx") as o, OrtRunner(work / f"{method}.onnx") as p:
            for b in (1, 32):
                lo, lp = measure_interleaved([o, p], pixels, b, 5, args.latency_iters)
                latency[b] = {"original_p50": lo.p50, "pruned_p50": lp.p50,
                              "speedup": lo.p50 / lp.p50}
        row = {"method": method, "gmacs": gmacs, "ratio": gmacs * 1e9 / macs.original,
               "one_shot_top1": one_shot, "finetuned_top1": tuned, "heads": heads,
               "mlp": mlp, "latency": latency, "plan_seconds": plan_seconds, **extra}
        rows.append(row)
        print(f"{method}: {gmacs:.4f} GMACs, one-shot {one_shot:.2f}%, fine-tuned {tuned:.2f}%, "
              f"speedup b1 {latency[1]['speedup']:.2f}x b32 {latency[32]['speedup']:.2f}x",
              flush=True)
        write_json_atomic(args.out, {"base_top1": base_top1, "base_gmacs": macs.original / 1e9,
                                     "args": {k: str(v) for k, v in vars(args).items()},
                                     "rows": rows})
    print("\n| method | GMACs | one-shot top-1 | fine-tuned top-1 | heads per block | "
          "MLP per block | ORT speedup b1 | b32 |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['gmacs']:.4f} | {r['one_shot_top1']:.2f} | "
              f"{r['finetuned_top1']:.2f} | {r['heads']} | {r['mlp']} | "
              f"{r['latency'][1]['speedup']:.2f}x | {r['latency'][32]['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
