"""Benchmark: training throughput of one process vs N processes under torchrun (not a test).

Trains the shared CIFAR-10 base model (DeiT-Tiny shape, 32 px) for one epoch of ``--images`` train
images at the same global batch twice, back to back in one invocation: once in a single process
with N torch threads, once through the real ``torchrun`` launcher with N processes of 1 thread each
(gloo on CPU, NCCL on GPUs). Prints images/s of both and their ratio, and writes JSON.

    python bench/ddp_throughput.py --nproc 2 --out bench/results/ddp_throughput.json

On a CPU machine this measures what DDP costs (gradient all-reduce, one model replica per
process) against intra-op threading on the same cores; on a multi-GPU node run it with
``--nproc <GPUs>`` to measure scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
               "mlp_ratio": 4, "num_classes": 10}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    ap.add_argument("--images", type=int, default=4096, help="train images per run")
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--model", type=Path,
                    default=ROOT.parent / "shared/models/cifar10_deit_tiny_d6_p4.pth")
    ap.add_argument("--data", type=Path, default=Path("~/.cache/xpdeploy/cifar10").expanduser())
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: result file
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One training run (one process, or one rank under torchrun); rank 0 writes the timing."""
    import torch

    from xpdeploy import distributed
    from xpdeploy.data.sources import open_split
    from xpdeploy.models.data_config import resolve_data_config
    from xpdeploy.models.factory import create_model
    from xpdeploy.spec import DataConfigSection, ModelConfig, PreprocessConfig, TrainConfig
    from xpdeploy.training.loop import train_model

    info = distributed.init_from_env()
    world = info.world_size if info else 1
    torch.set_num_threads(args.threads)
    model = create_model(ModelConfig(name="deit_tiny_patch16_224", kwargs=BASE_KWARGS,
                                     checkpoint=args.model))
    pre = PreprocessConfig(size=32, crop_pct=1.0, interpolation="bicubic",
                           mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
    section = DataConfigSection(source="imagefolder", root=args.data, preprocess=pre)
    train = open_split(section, resolve_data_config(model, pre), "train", num_classes=10, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=args.global_batch // world, max_images=args.images,
                      lr=5e-4, warmup_epochs=0.1, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(distributed.broadcast_object(tmp))  # rank 0's folder for the checkpoint
        distributed.barrier()
        t0 = time.perf_counter()
        result = train_model(model, train, None, cfg, checkpoint_dir=shared / "ckpt",
                             fingerprint="bench", seed=0, eval_batch_size=256)
        seconds = time.perf_counter() - t0
        distributed.barrier()
    if distributed.is_main():
        args.worker.write_text(json.dumps({
            "processes": world, "threads_per_process": args.threads,
            "batch_per_process": cfg.batch_size, "images": result.history[0]["images"],
            "seconds": seconds, "images_per_s": result.history[0]["images"] / seconds,
        }))
    distributed.shutdown()


def main() -> None:
    args = _args()
    if args.worker is not None:
        worker(args)
        return
    common = ["--images", str(args.images), "--global-batch", str(args.global_batch),
              "--model", str(args.model), "--data", str(args.data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "single": [sys.executable, __file__, *common, "--threads", str(args.nproc)],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={args.nproc}", __file__, *common, "--threads", "1"],
        }
        for name, cmd in runs.items():
            out = Path(tmp) / f"{name}.json"
            print(f"{name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run([*cmd, "--worker", str(out)], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            results[name] = json.loads(out.read_text())
    one, many = results["single"], results["torchrun"]
    ratio = many["images_per_s"] / one["images_per_s"]
    print("\n| run | processes x threads | batch per process | images/s |\n|---|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['processes']} x {r['threads_per_process']} | "
              f"{r['batch_per_process']} | {r['images_per_s']:.1f} |")
    print(f"\ntorchrun / single throughput: {ratio:.2f}x")
    if args.out:
        from xpdeploy.fileio import write_json_atomic

        write_json_atomic(args.out, {"runs": results, "ratio": ratio,
                                     "global_batch": args.global_batch})


if __name__ == "__main__":
    main()
