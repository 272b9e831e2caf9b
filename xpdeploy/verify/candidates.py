"""Verifying one candidate runner against the original (and its own torch source)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from xpdeploy.artifacts import CandidateResult, GateResult, TorchModel
from xpdeploy.backends.runner import Runner, infer_all
from xpdeploy.data.verify_set import VerifyBatch
from xpdeploy.logits import compare_logits, top1
from xpdeploy.progress import log
from xpdeploy.spec import GatesConfig, VerifyConfig
from xpdeploy.verify.gates import evaluate_gates, fmt_speedup
from xpdeploy.verify.latency import Clock, latency_stats, measure_rounds
from xpdeploy.verify.thermal import TemperatureSampler


@runtime_checkable
class GpuTimedRunner(Protocol):
    """A runner that also records GPU compute per call (TensorRT's CUDA events), in ms."""

    def gpu_times_ms(self, batch: int | None = None) -> list[float]: ...


def _runner_info(runner: Runner) -> dict[str, float]:
    """One-off costs a runner recorded (TensorRT: deserialise and first inference, ms)."""
    info = {}
    for key in ("deserialize_ms", "first_inference_ms"):
        value = getattr(runner, key, None)
        if isinstance(value, int | float):
            info[key] = float(value)
    return info


@dataclass
class Candidate:
    """A runner to verify, the torch model it came from, and the baseline it is timed against."""

    name: str
    runner: Runner
    artifact: str
    source: TorchModel
    baseline_name: str
    baseline: Runner
    fixed_batch: int | None = None
    gates: GatesConfig | None = None  # None: the config's gates for the source model


def evaluate_candidate(c: Candidate, batch: VerifyBatch, ref_logits: np.ndarray,
                       source_logits: np.ndarray, ref_top1: float | None, *,
                       cfg: VerifyConfig, eval_batch_size: int, threads: int,
                       clock: Clock = time.perf_counter) -> CandidateResult:
    """Accuracy, agreement, logit differences, interleaved latency and gates of one candidate.

    Each batch size is timed in ``cfg.rounds`` interleaved rounds against the baseline
    (:func:`~xpdeploy.verify.latency.measure_rounds`); the speedup is the median of the rounds'
    ratios of medians, and a batch size whose rounds disagree by more than ``cfg.max_spread`` is
    listed in ``unstable`` and fails the min_speedup gate. ``clock``: seconds, for tests.
    """
    logits = infer_all(c.runner, batch.pixels, c.fixed_batch or eval_batch_size,
                       fixed_batch=c.fixed_batch is not None)
    gpu_timed = isinstance(c.runner, GpuTimedRunner)
    cmp = compare_logits(ref_logits, logits)
    source_diff = compare_logits(source_logits, logits).max_abs_diff  # export fidelity
    cand_top1 = None if batch.synthetic else top1(logits, batch.labels)
    delta = None if cand_top1 is None or ref_top1 is None else cand_top1 - ref_top1
    lat_b, lat_c = [], []
    speedup: dict[int, float] = {}
    spread: dict[int, float] = {}
    unstable: list[int] = []
    for b in [c.fixed_batch] if c.fixed_batch else cfg.batch_sizes:
        log(f"  timing {c.name} vs {c.baseline_name} at batch {b} ({threads} threads, "
            f"{cfg.rounds} rounds)")
        times = measure_rounds([c.baseline, c.runner], batch.pixels, b, warmup=cfg.warmup,
                               iters=cfg.iters, rounds=cfg.rounds, clock=clock)
        lat_b.append(times.stats(0))
        lat_c.append(times.stats(1))
        ratio = times.ratio(0, 1)  # baseline / candidate: > 1 is faster
        speedup[b], spread[b] = ratio.value, ratio.spread
        if not ratio.stable(cfg.max_spread):
            unstable.append(b)
    gpu_lat = None
    if gpu_timed:  # the timed calls are the last ones of each batch size (after warm-up)
        gpu_lat = [latency_stats(c.runner.gpu_times_ms(s.batch)[-s.iters:], s.batch)
                   for s in lat_c]
    gates_cfg = c.gates or (cfg.gates if c.source.label == "original" else cfg.pruned_gates)
    gates = evaluate_gates(gates_cfg, top1=cand_top1, top1_delta=delta, agreement=cmp.agreement,
                           max_abs_diff=cmp.max_abs_diff, cosine=cmp.cosine, speedup=speedup,
                           synthetic=batch.synthetic, unstable=unstable, speedup_spread=spread,
                           max_spread=cfg.max_spread)
    if cfg.max_export_diff is not None and c.runner.name.startswith("ort-cpu"):
        ok = source_diff <= cfg.max_export_diff
        gates.append(GateResult(
            name="max_export_diff", value=source_diff, limit=cfg.max_export_diff, passed=ok,
            detail=f"vs its torch model {source_diff:.3g} {'<=' if ok else '>'} "
                   f"{cfg.max_export_diff:g}"))
    result = CandidateResult(
        name=c.name, runner=c.runner.name, artifact=c.artifact, source=c.source.label,
        baseline=c.baseline_name, source_max_abs_diff=source_diff, gmacs=c.source.gmacs,
        params_m=c.source.params_m, top1=cand_top1, top1_delta=delta, agreement=cmp.agreement,
        max_abs_diff=cmp.max_abs_diff, mean_abs_diff=cmp.mean_abs_diff, cosine=cmp.cosine,
        latency_ms=lat_c, baseline_latency_ms=lat_b, speedup=speedup, speedup_spread=spread,
        unstable=unstable, gates=gates,
        passed=all(g.passed for g in gates), gpu_latency_ms=gpu_lat,
        runner_info=_runner_info(c.runner),
    )
    acc = "" if cand_top1 is None else f"top-1 {cand_top1:.2f}% ({delta:+.2f}), "
    log(f"  {c.name}: {acc}agreement {cmp.agreement:.4f}, speedup "
        + ", ".join(f"b{b} {fmt_speedup(s, spread[b], b in unstable)}"
                    for b, s in speedup.items())
        + (": passed" if result.passed else ": FAILED"))
    return result


def evaluate_plan(
    plan: list[Candidate],
    batch: VerifyBatch,
    reference: dict[str, np.ndarray],
    ref_top1: float | None,
    *,
    cfg: VerifyConfig,
    eval_batch_size: int,
    threads: int,
) -> tuple[list[CandidateResult], dict[str, dict[str, float]]]:
    """Evaluate every candidate of ``plan`` in order while temperatures are sampled (throttling
    shows in the report). ``reference``: torch logits per source label ("original" first of all).
    Returns the results and :meth:`TemperatureSampler.summary` (degrees C per zone)."""
    with TemperatureSampler() as thermal:
        results = [evaluate_candidate(c, batch, reference["original"], reference[c.source.label],
                                      ref_top1, cfg=cfg, eval_batch_size=eval_batch_size,
                                      threads=threads)
                   for c in plan]
    return results, thermal.summary()
