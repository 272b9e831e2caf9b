"""Benchmark: torch vs onnxruntime (exported and simplified) latency of a finished run's model.

Not a test. Prints one table of p50 latencies and the ratios measured side by side, interleaved in
one process (so machine drift cancels), for each thread count and batch size:

    python bench/runtime_latency.py runs/quickstart --threads 1,2 --batches 1,32 --iters 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.torch_runner import TorchRunner
from xpdeploy.data.verify_set import load_verify_set
from xpdeploy.runfolder import RunFolder, parse_outputs
from xpdeploy.verify.latency import measure_interleaved


def _latest(folder: RunFolder, stages: tuple[str, ...], key: str):
    for stage in stages:
        manifest = folder.read_manifest(stage)
        if manifest is not None:
            return parse_outputs(manifest)[key]
    sys.exit(f"error: {folder.root} has no finished {' or '.join(stages)} stage; run it first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()

    folder = RunFolder(args.run_dir)
    model = _latest(folder, ("train", "load"), "model")
    exported = _latest(folder, ("export_onnx",), "onnx").models["original"]
    simplified = _latest(folder, ("simplify",), "onnx").models["original"]
    pixels = load_verify_set(folder.root / _latest(folder, ("load",), "verify_set").file).pixels

    print(f"model {model.arch.timm_name} {model.gmacs:.4f} GMACs, "
          f"input {model.data_config.input_size}")
    print("threads | batch | torch p50 ms | ort p50 ms | ort-sim p50 ms | torch/ort | "
          "torch/ort-sim")
    print("---:|---:|---:|---:|---:|---:|---:")
    for threads in (int(t) for t in args.threads.split(",")):
        with (
            TorchRunner(model, folder.root, threads=threads) as t,
            OrtRunner(folder.root / exported.file, threads=threads) as o,
            OrtRunner(folder.root / simplified.file, threads=threads) as s,
        ):
            for batch in (int(b) for b in args.batches.split(",")):
                lt, lo, ls = measure_interleaved([t, o, s], pixels, batch, args.warmup, args.iters)
                print(f"{threads} | {batch} | {lt.p50:.3f} | {lo.p50:.3f} | {ls.p50:.3f} | "
                      f"{lt.p50 / lo.p50:.2f}x | {lt.p50 / ls.p50:.2f}x")


if __name__ == "__main__":
    main()
