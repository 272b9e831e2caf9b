"""Benchmark: how much a latency table moves from one measurement to the next (issue 17).

On the shared CIFAR-10 base model (onnxruntime, CPU, 1 thread), ``--tables`` times: the original
timed alone (in rounds), a fresh latency table at ``--batch`` (never the cache), the original alone
again. Prints the table's original, the alone measurements around it (so a bias of the table's
absolute scale shows against drift of the machine), and the table's prediction error on its 5
validation models. The grid is exported once (the product's exporter and simplifier).

    python bench/latency_table_stability.py --batch 1 --tables 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench importable
from bench.pruning_quality import ROOT, load_base, require_base_inputs
from xpdeploy.artifacts import LatencySetting
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.export.block_grid import export_block_grid
from xpdeploy.spec import LatencyConfig
from xpdeploy.stages.latency_table import table_key
from xpdeploy.verify.latency import RatioEstimate, measure_rounds
from xpdeploy.verify.latency_grid import TimingSettings, measure_table, runtime_opener


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path,
                   default=ROOT.parent / "shared/models/cifar10_deit_tiny_d6_p4.pth")
    p.add_argument("--data", type=Path, default=Path("~/.cache/xpdeploy/cifar10").expanduser())
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tables", type=int, default=2)
    args = p.parse_args(argv)
    require_base_inputs(args.model, args.data)
    base, dc, _, _ = load_base(args.model, args.data, seed=0)
    work = Path(tempfile.mkdtemp(prefix="xpd-table-stability-"))
    grid = export_block_grid(base, dc.input_size, work, arch_name="cifar10_deit_tiny",
                             arch_digest="stability", mlp_step=8, validation_models=5, seed=0,
                             opset=17)
    setting = LatencySetting(runtime="onnxruntime-cpu", precision="fp32", batch=args.batch,
                             threads=1)
    key = table_key(grid, setting)
    cfg = LatencyConfig()
    x = np.random.default_rng(0).standard_normal((args.batch, *dc.input_size)).astype(np.float32)

    def alone() -> RatioEstimate:
        with OrtRunner(work / grid.original.file, threads=1) as runner:
            return measure_rounds([runner], x, args.batch, warmup=5, iters=60,
                                  rounds=5).latency(0)

    for i in range(args.tables):
        before = alone()
        table = measure_table(grid, work, key, runtime_opener(setting, work / "engines"),
                              TimingSettings(warmup=cfg.warmup, iters=cfg.iters,
                                             rounds=cfg.rounds, max_spread=cfg.max_spread),
                              seed=i)
        after = alone()
        errors = [round(v.error_pct, 1) for v in table.validation]
        print(f"table {i}: original alone before {before.value:.3f} ms (+-{before.spread:.0%}), "
              f"in the table {table.original_ms:.3f} ms, alone after {after.value:.3f} ms "
              f"(+-{after.spread:.0%}); prediction errors {errors} %; "
              f"{table.unstable_points} of {table.points} points unstable", flush=True)


if __name__ == "__main__":
    main()
