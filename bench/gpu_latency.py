"""Benchmark: torch latency of an original vs an X-Pruner-style pruned ViT, CUDA events or CPU.

Part 3 of ``bench/gpu_check.sh``, and runnable on its own. It times, in one process:

- a real timm DeiT-Tiny (``deit_tiny_patch16_224``, 224 px, ``pretrained=False``: no download)
  and the same model pruned to ``--target-ratio`` of its MACs (0.5) by xpdeploy's own planner
  and surgery (``MacModel`` -> ``plan_global`` -> ``prune_model``). The ranking is by weight
  magnitude (or random) on the untrained weights: latency depends on the pruned shapes, not on
  the weights, and the MAC target is met exactly either way;
- optionally the quickstart's original and fine-tuned pruned models from a finished run folder
  (``--quickstart-run``), when that folder and pydantic (to read its manifests) are there.

Each (model pair, dtype, batch) is timed interleaved, call by call (original, pruned, pruned,
original, ...: the order flips every iteration as in ``xpdeploy.verify.latency``), after
``--warmup`` untimed iterations, so clock boost, thermal drift and other processes land on both
models and cancel in the ratio. On CUDA every call is bracketed by two CUDA events and
synchronised, so a time is the GPU's wall time for one call including launch gaps (the latency
a single request sees), not a pipelined throughput figure. On CPU ``time.perf_counter`` brackets
the call. The timed calls are split into ``--rounds`` rounds; the speedup is the median over
rounds of median(original) / median(pruned), with its spread (half the range over rounds, as a
fraction of the speedup).

Why not ``xpdeploy.verify.latency.measure_rounds``: it times numpy-in, numpy-out runners (host
copies inside every timed call) and imports pydantic through ``xpdeploy.artifacts``; the GPU
machine's image has no pydantic, and this part should give GPU numbers even where nothing else
of the check can run. The statistics are the same few lines of numpy.

Units: milliseconds per batch (``p10``, ``p50``, ``p90``, ``mean``), images per second at the
median (``images_per_s``), GMACs per image, millions of parameters.

    python bench/gpu_latency.py --out latency.json                  # CUDA when there is one
    python bench/gpu_latency.py --out latency.json --device cpu --batches 1,8 --iters 20
    python bench/gpu_latency.py --out latency.json --quickstart-run runs/quickstart
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from xpdeploy.fileio import write_json_atomic  # standard library only, like the prune modules

if TYPE_CHECKING:
    import torch
    from torch import nn

DEIT_TINY = "deit_tiny_patch16_224"
DEIT_INPUT = (3, 224, 224)

#: Defaults per device: (batches, warmup iterations, timed iterations per model, rounds, dtypes).
#: CUDA: ~0.1-10 ms per call, so 200 timed calls per model cost seconds. CPU (2 cores): DeiT-Tiny
#: takes ~15-30 ms at batch 1 and ~0.1-0.2 s at batch 8, so fewer calls and a smaller batch.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"batches": "1,64", "warmup": 20, "iters": 200, "rounds": 5, "dtypes": "fp32,bf16"},
    "cpu": {"batches": "1,8", "warmup": 3, "iters": 20, "rounds": 4, "dtypes": "fp32"},
}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="write the results here (JSON)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA when torch sees a GPU, else CPU")
    ap.add_argument("--batches", help="comma-separated batch sizes (cuda 1,64; cpu 1,8)")
    ap.add_argument("--warmup", type=int, help="untimed interleaved iterations first (cuda 20)")
    ap.add_argument("--iters", type=int, help="timed calls per model and batch (cuda 200)")
    ap.add_argument("--rounds", type=int, help="rounds the timed calls are split into (cuda 5)")
    ap.add_argument("--dtypes", help="comma-separated fp32|bf16|fp16 (cuda fp32,bf16; cpu fp32)")
    ap.add_argument("--target-ratio", type=float, default=0.5,
                    help="the pruned DeiT-Tiny keeps this fraction of the MACs")
    ap.add_argument("--criterion", choices=("magnitude", "random"), default="magnitude",
                    help="unit ranking of the pruned DeiT-Tiny (weights are untrained either way)")
    ap.add_argument("--seed", type=int, default=0, help="weights init, random ranking, inputs")
    ap.add_argument("--quickstart-run", type=Path,
                    help="also time this finished quickstart run's original and pruned models")
    args = ap.parse_args(argv)
    if not 0 < args.target_ratio < 1:
        ap.error(f"--target-ratio must be in (0, 1), got {args.target_ratio}")
    return args


def pick_device(choice: str) -> torch.device:
    """``cuda`` (GPU 0) or ``cpu``; ``auto`` is CUDA when torch sees a GPU. Asking for CUDA where
    there is none is an error rather than a silent CPU run: the numbers would be mislabelled."""
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (torch.cuda.is_available())")
    return torch.device("cuda", 0) if choice == "cuda" else torch.device("cpu")


def deit_tiny_pair(ratio: float, criterion: str, seed: int) -> tuple[nn.Module, nn.Module,
                                                                      dict[str, Any]]:
    """A fresh DeiT-Tiny and a copy pruned to ``ratio`` of its MACs by xpdeploy's planner and
    surgery (the global ranking, type-normalised scores, MLP widths rounded to 8); the plan's
    summary (per-block heads and MLP widths, GMACs before and after) comes with them."""
    import timm
    import torch

    from xpdeploy.models.complexity import count_params_m
    from xpdeploy.prune.criteria import magnitude_scores, random_scores
    from xpdeploy.prune.mac_model import MacModel
    from xpdeploy.prune.planner import PlanConstraints, plan_global, plan_summary
    from xpdeploy.prune.surgery import prune_model

    torch.manual_seed(seed)
    original = timm.create_model(DEIT_TINY, pretrained=False).eval()
    macs = MacModel.from_model(original, DEIT_INPUT)
    scores = (magnitude_scores(original) if criterion == "magnitude"
              else random_scores(list(macs.heads), list(macs.mlp), seed))
    keep = plan_global(scores, macs, ratio * macs.original, PlanConstraints(), "type")
    pruned = prune_model(copy.deepcopy(original), keep).eval()
    plan = plan_summary(keep, macs)
    info = {
        "timm_name": DEIT_TINY,
        "input": list(DEIT_INPUT),
        "weights": "random init (pretrained=False)",
        "criterion": criterion,
        "target_ratio": ratio,
        "gmacs_original": plan["gmacs_before"],
        "gmacs_pruned": plan["gmacs_after"],
        "mac_ratio": plan["ratio"],
        "params_m_original": count_params_m(original),
        "params_m_pruned": count_params_m(pruned),
        "heads": list(keep.head_counts),
        "mlp": list(keep.mlp_widths),
    }
    return original, pruned, info


def quickstart_pair(run_dir: Path) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The quickstart run's trained original (``train``, else ``load``) and its fine-tuned
    pruned model (``finetune``, else ``prune``), rebuilt from arch.json + safetensors."""
    from xpdeploy.models.arch import rebuild_model
    from xpdeploy.runfolder import RunFolder, parse_outputs

    folder = RunFolder(run_dir)

    def latest(stages: tuple[str, ...]) -> tuple[str, Any]:
        for stage in stages:
            manifest = folder.read_manifest(stage)
            if manifest is not None:
                return stage, parse_outputs(manifest)["model"]
        raise FileNotFoundError(f"{run_dir} has no finished {' or '.join(stages)} stage")

    o_stage, o = latest(("train", "load"))
    p_stage, p = latest(("finetune", "prune"))
    info = {
        "run_dir": str(run_dir),
        "original_stage": o_stage,
        "pruned_stage": p_stage,
        "input": list(o.data_config.input_size),
        "gmacs_original": o.gmacs,
        "gmacs_pruned": p.gmacs,
        "mac_ratio": p.gmacs / o.gmacs if o.gmacs else None,
    }
    return (rebuild_model(o.arch, run_dir / o.weights_file),
            rebuild_model(p.arch, run_dir / p.weights_file), info)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs one call and returns its time in ms: CUDA events around the call and
    a synchronisation after it on a GPU (nothing queued before or after it is counted), the
    host's ``perf_counter`` on a CPU."""
    import torch

    if device.type == "cuda":
        def time_cuda(call: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return time_cuda

    def time_cpu(call: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1000.0

    return time_cpu


def interleaved_times(calls: list[Callable[[], object]], time_call: Callable[[Callable[[], object]],
                      float], warmup: int, iters: int, rounds: int) -> list[list[list[float]]]:
    """Per call, per round, the timed milliseconds: ``warmup`` untimed iterations, then ``rounds``
    rounds of ``ceil(iters / rounds)`` iterations; every iteration calls each in turn, forward on
    even iterations and backward on odd ones (neither model always runs right after the other)."""
    if iters <= 0 or rounds <= 0 or warmup < 0:
        raise ValueError(f"need iters > 0, rounds > 0, warmup >= 0 (got {iters}, {rounds}, "
                         f"{warmup})")
    forward = list(range(len(calls)))
    for i in range(warmup):
        for k in forward if i % 2 == 0 else forward[::-1]:
            calls[k]()
    per_round = -(-iters // rounds)
    times: list[list[list[float]]] = [[[] for _ in range(rounds)] for _ in calls]
    for r in range(rounds):
        for i in range(per_round):
            for k in forward if i % 2 == 0 else forward[::-1]:
                times[k][r].append(time_call(calls[k]))
    return times


def stats(rounds: list[list[float]], batch: int) -> dict[str, float | int]:
    """p10/p50/p90/mean (ms per batch) over every timed call, and images per second at p50."""
    t = np.asarray([x for r in rounds for x in r], dtype=np.float64)
    p10, p50, p90 = (float(v) for v in np.percentile(t, [10, 50, 90]))
    return {"p10": p10, "p50": p50, "p90": p90, "mean": float(t.mean()), "iters": int(t.size),
            "images_per_s": batch / p50 * 1000.0 if p50 > 0 else float("inf")}


def speedup(original: list[list[float]], pruned: list[list[float]]) -> dict[str, Any]:
    """median(original) / median(pruned) per round; the median over rounds, its spread (half
    the range over rounds / the median) and the rounds' values."""
    ratios = np.asarray([np.median(o) / np.median(p) for o, p in zip(original, pruned,
                                                                     strict=True)])
    value = float(np.median(ratios))
    spread = float((ratios.max() - ratios.min()) / 2 / value) if value > 0 else float("inf")
    return {"speedup": value, "speedup_spread": spread,
            "speedup_rounds": [float(r) for r in ratios]}


def measure_pair(name: str, original: nn.Module, pruned: nn.Module, input_size: tuple[int, ...],
                 device: torch.device, dtypes: list[str], batches: list[int], warmup: int,
                 iters: int, rounds: int, seed: int) -> list[dict[str, Any]]:
    """One result row per (dtype, batch): both models' stats and the pruned model's speedup."""
    import torch

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    time_call = timer(device)
    rows = []
    for dtype in dtypes:
        models = [copy.deepcopy(m).to(device=device, dtype=torch_dtypes[dtype]).eval()
                  for m in (original, pruned)]
        for batch in batches:
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, *input_size, generator=gen).to(device=device,
                                                                   dtype=torch_dtypes[dtype])

            def call(m: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
                def run() -> object:
                    with torch.inference_mode():
                        return m(x)

                return run

            times = interleaved_times([call(m) for m in models], time_call, warmup, iters,
                                      rounds)
            row = {"model": name, "dtype": dtype, "batch": batch,
                   "original": stats(times[0], batch), "pruned": stats(times[1], batch),
                   **speedup(times[0], times[1])}
            rows.append(row)
            print(f"  {name} {dtype} batch {batch}: original p50 {row['original']['p50']:.3f} ms"
                  f" (p10 {row['original']['p10']:.3f}, p90 {row['original']['p90']:.3f}), "
                  f"pruned p50 {row['pruned']['p50']:.3f} ms (p10 {row['pruned']['p10']:.3f}, "
                  f"p90 {row['pruned']['p90']:.3f}), speedup {row['speedup']:.2f}x "
                  f"+-{row['speedup_spread'] * 100:.0f}%", flush=True)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: torch and CUDA versions, the GPU (or CPU) and the
    math settings that change fp32 speed on a GPU (TF32)."""
    import torch

    env: dict[str, Any] = {"device": device.type, "torch": torch.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version(),
                           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update({"device_name": torch.cuda.get_device_name(device),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                    "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                    "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)})
    else:
        env["device_name"] = cpu_name()
    return env


def cpu_name() -> str:
    """The CPU's model name (xpdeploy.environment's probe, which needs pydantic through its
    imports), else the machine type (``x86_64``)."""
    try:
        from xpdeploy.environment import cpu_model
    except ImportError:
        return platform.machine()
    return cpu_model() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    t0 = time.monotonic()
    device = pick_device(args.device)
    d = DEFAULTS[device.type]
    batches = [int(b) for b in (args.batches or d["batches"]).split(",")]
    dtypes = (args.dtypes or d["dtypes"]).split(",")
    bad = [t for t in dtypes if t not in ("fp32", "bf16", "fp16")]
    if bad:
        raise SystemExit(f"error: unknown dtype {bad[0]!r}; use fp32, bf16 or fp16")
    settings = {"batches": batches, "dtypes": dtypes,
                "warmup": args.warmup if args.warmup is not None else d["warmup"],
                "iters": args.iters or d["iters"], "rounds": args.rounds or d["rounds"]}
    result: dict[str, Any] = {"schema": 1, **environment(device), "settings": settings,
                              "models": {}, "rows": []}
    print(f"device {result['device_name']} ({device.type}), torch {result['torch']}, "
          f"settings {settings}", flush=True)

    original, pruned, info = deit_tiny_pair(args.target_ratio, args.criterion, args.seed)
    result["models"]["deit_tiny"] = info
    print(f"deit_tiny: {info['gmacs_original']:.3f} -> {info['gmacs_pruned']:.3f} GMACs "
          f"({info['mac_ratio']:.3f}), heads {info['heads']}, mlp {info['mlp']}", flush=True)
    result["rows"] += measure_pair("deit_tiny", original, pruned, DEIT_INPUT, device,
                                   dtypes, batches, settings["warmup"], settings["iters"],
                                   settings["rounds"], args.seed)
    del original, pruned

    if args.quickstart_run is not None:
        try:
            q_original, q_pruned, q_info = quickstart_pair(args.quickstart_run)
        except Exception as e:  # no run, a partial one, or no pydantic to read its manifests
            result["models"]["quickstart"] = {"skipped": f"{type(e).__name__}: {e}"}
            print(f"quickstart models not timed: {type(e).__name__}: {e}", flush=True)
        else:
            result["models"]["quickstart"] = q_info
            result["rows"] += measure_pair(
                "quickstart", q_original, q_pruned, tuple(q_info["input"]), device, dtypes,
                batches, settings["warmup"], settings["iters"], settings["rounds"], args.seed)

    result["wall_s"] = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out} ({len(result['rows'])} rows, {result['wall_s']:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
