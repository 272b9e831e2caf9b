"""``verify``: the same cached batches through the original and every candidate runner.

Accuracy parity (top-1, agreement, logit differences) and latency measured interleaved with the
original in this process, so machine drift cancels in the speedup (design.md section 4).
"""

from __future__ import annotations

import os

from xpdeploy.artifacts import (
    Artifact,
    CandidateResult,
    OnnxModels,
    ParityReport,
    TorchModel,
    VerifySet,
)
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.torch_runner import TorchRunner
from xpdeploy.data.verify_set import load_verify_set
from xpdeploy.fileio import write_json_atomic
from xpdeploy.progress import log
from xpdeploy.stages.context import StageContext
from xpdeploy.verify.compare import compare_logits, top1
from xpdeploy.verify.gates import evaluate_gates
from xpdeploy.verify.latency import measure_interleaved
from xpdeploy.verify.outputs import infer_all


def run(
    ctx: StageContext,
    model: TorchModel,
    verify_set: VerifySet,
    exported: OnnxModels | None = None,
    simplified: OnnxModels | None = None,
) -> dict[str, Artifact]:
    cfg = ctx.spec.verify
    # CPUs this process may use (a container's affinity mask, not the host's core count).
    threads = cfg.threads or len(os.sched_getaffinity(0))
    batch = load_verify_set(ctx.path(verify_set.file))
    synthetic = batch.synthetic
    onnx_files = [m for group in (exported, simplified) if group for m in group.models.values()]
    results: list[CandidateResult] = []
    with TorchRunner(model, ctx.run_dir, threads=threads) as original:
        ref_logits = infer_all(original, batch.pixels, ctx.spec.data.batch_size)
        ref_top1 = None if synthetic else top1(ref_logits, batch.labels)
        for onnx_model in onnx_files:
            name = onnx_model.file.rsplit("/", 1)[-1]
            with OrtRunner(ctx.path(onnx_model.file), threads=threads) as candidate:
                fixed = None if onnx_model.dynamic_batch else ctx.spec.export_onnx.trace_batch
                logits = infer_all(candidate, batch.pixels, fixed or ctx.spec.data.batch_size,
                                   fixed_batch=fixed is not None)
                cmp = compare_logits(ref_logits, logits)
                cand_top1 = None if synthetic else top1(logits, batch.labels)
                delta = None if cand_top1 is None or ref_top1 is None else cand_top1 - ref_top1
                lat_c, lat_o = [], []
                for b in [fixed] if fixed else cfg.batch_sizes:
                    log(f"  timing {name} vs the original at batch {b} ({threads} threads)")
                    stats_o, stats_c = measure_interleaved(
                        [original, candidate], batch.pixels, b, cfg.warmup, cfg.iters
                    )
                    lat_o.append(stats_o)
                    lat_c.append(stats_c)
                speedup = {o.batch: o.p50 / c.p50 for o, c in zip(lat_o, lat_c, strict=True)}
                gates = evaluate_gates(
                    cfg.gates, top1_delta=delta, agreement=cmp.agreement,
                    max_abs_diff=cmp.max_abs_diff, cosine=cmp.cosine, speedup=speedup,
                    synthetic=synthetic,
                )
                results.append(CandidateResult(
                    name=name, runner=candidate.name, artifact=onnx_model.file,
                    gmacs=onnx_model.gmacs, params_m=onnx_model.params_m, top1=cand_top1,
                    top1_delta=delta, agreement=cmp.agreement, max_abs_diff=cmp.max_abs_diff,
                    mean_abs_diff=cmp.mean_abs_diff, cosine=cmp.cosine, latency_ms=lat_c,
                    baseline_latency_ms=lat_o, speedup=speedup, gates=gates,
                    passed=all(g.passed for g in gates),
                ))
                verdict = "passed" if results[-1].passed else "FAILED"
                log(f"  {name}: agreement {cmp.agreement:.4f}, max |diff| "
                    f"{cmp.max_abs_diff:.2e}, speedup "
                    + ", ".join(f"b{b} {s:.2f}x" for b, s in speedup.items()) + f": {verdict}")
        original_name = original.name
    path = ctx.stage_dir / "parity.json"
    report = ParityReport(
        file=ctx.rel(path), original_name=model.label, original_runner=original_name,
        original_top1=ref_top1, original_gmacs=model.gmacs, original_params_m=model.params_m,
        samples=len(batch.labels), data_source=batch.source, synthetic=synthetic,
        threads=threads, candidates=results, passed=all(r.passed for r in results),
    )
    write_json_atomic(path, report.model_dump(mode="json", exclude={"file"}))
    return {"parity": report}
