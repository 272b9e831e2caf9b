"""Tests of xpdeploy.report; :func:`make_parity` builds the ParityReport they all render."""

from __future__ import annotations

from typing import Any

from xpdeploy.artifacts import CandidateResult, LatencyStats, ParityReport
from xpdeploy.report.schema import build_report
from xpdeploy.spec import GatesConfig
from xpdeploy.verify.gates import evaluate_gates


def lat(batch: int, p50: float, p90: float, p99: float, p10: float | None = None) -> LatencyStats:
    """Latency row with a consistent mean and throughput (p10 None: as written before p10)."""
    return LatencyStats(
        batch=batch,
        p10=p10,
        p50=p50,
        p90=p90,
        p99=p99,
        mean=(p50 + p90) / 2,
        iters=30,
        throughput=batch / p50 * 1000,
    )


def candidate(
    name: str,
    runner: str,
    *,
    top1: float,
    agreement: float,
    max_abs_diff: float,
    cosine: float,
    p50: dict[int, float],
    base_p50: dict[int, float],
    synthetic: bool,
    spread: dict[int, float] | None = None,
    unstable: list[int] | None = None,
) -> CandidateResult:
    """A candidate 0.4 points below the original (72.5 %), gates from the default GatesConfig.

    Latency rows: p10/p90/p99 at 0.9/1.1/1.3 times the p50, for the candidate and its baseline.

    spread: batch -> spread of the speedup over rounds; unstable: batch sizes marked unstable.
    """
    speedup = {b: base_p50[b] / p50[b] for b in p50}
    delta = top1 - 72.5
    gates = evaluate_gates(
        GatesConfig(),
        top1_delta=delta,
        agreement=agreement,
        max_abs_diff=max_abs_diff,
        cosine=cosine,
        speedup=speedup,
        synthetic=synthetic,
    )
    return CandidateResult(
        name=name,
        runner=runner,
        artifact=f"04_simplify/{name}.onnx",
        gmacs=0.63,
        params_m=3.1,
        top1=top1,
        top1_delta=delta,
        agreement=agreement,
        max_abs_diff=max_abs_diff,
        mean_abs_diff=max_abs_diff / 4,
        cosine=cosine,
        latency_ms=[lat(b, v, v * 1.1, v * 1.3, v * 0.9) for b, v in p50.items()],
        baseline_latency_ms=[lat(b, v, v * 1.1, v * 1.3, v * 0.9) for b, v in base_p50.items()],
        speedup=speedup,
        speedup_spread=spread or {},
        unstable=unstable or [],
        gates=gates,
        passed=all(g.passed for g in gates),
    )


def make_parity(synthetic: bool = False) -> ParityReport:
    """Two candidates: 'pruned' passes every gate, 'pruned-fp16' fails min_agreement (0.985).

    Speedups carry their spread over rounds: 'pruned' +-3% (b1) and +-2% (b32); 'pruned-fp16'
    +-14% at batch 1, marked unstable, and +-5% at batch 32.

    The synthetic variant still carries top-1 numbers, to prove the report drops them.
    """
    good = candidate(
        "pruned",
        "ort-cpu-fp32",
        top1=72.1,
        agreement=0.9961,
        max_abs_diff=1.2e-4,
        cosine=0.999998,
        p50={1: 2.0, 32: 30.0},
        base_p50={1: 3.6, 32: 54.0},
        synthetic=synthetic,
        spread={1: 0.03, 32: 0.02},
    )
    bad = candidate(
        "pruned-fp16",
        "ort-cpu-fp16",
        top1=72.2,
        agreement=0.985,
        max_abs_diff=4.5e-4,
        cosine=0.9995,
        p50={1: 1.5, 32: 20.0},
        base_p50={1: 3.5, 32: 52.0},
        synthetic=synthetic,
        spread={1: 0.14, 32: 0.05},
        unstable=[1],
    )
    return ParityReport(
        file="08_verify/parity.json",
        original_name="deit_tiny_patch16_224",
        original_runner="ort-cpu-fp32",
        original_top1=72.5,
        original_gmacs=1.26,
        original_params_m=5.717,
        samples=512,
        data_source="synthetic" if synthetic else "imagefolder",
        synthetic=synthetic,
        threads=4,
        candidates=[good, bad],
        passed=good.passed and bad.passed,
    )


def make_report(synthetic: bool = False, **kw: Any) -> dict[str, Any]:
    """``build_report`` on :func:`make_parity`; keyword arguments override its arguments."""
    parity = make_parity(synthetic)
    args: dict[str, Any] = {
        "pipeline": "quickstart",
        "run_dir": "runs/quickstart",
        "status": "passed" if parity.passed else "failed",
        "title": None,
        "environment": {},
    }
    args.update(kw)
    return build_report(parity, **args)
