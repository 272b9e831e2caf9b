"""``verify``: the same cached batches through the original and every candidate runner.

Accuracy (top-1, delta vs the original), agreement and logit differences vs the original, export
fidelity vs each candidate's own torch model, and latency measured interleaved with a baseline in
this process, so machine drift cancels in the speedup (design.md section 4). The baseline of an
ONNX file of the pruned model is the original's ONNX file of the same kind (exported or simplified),
so its speedup measures pruning, not a change of backend.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from xpdeploy.artifacts import (
    Artifact,
    CandidateResult,
    GateResult,
    OnnxModel,
    OnnxModels,
    ParityReport,
    TorchModel,
    VerifySet,
)
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.torch_runner import TorchRunner
from xpdeploy.data.verify_set import VerifyBatch, load_verify_set
from xpdeploy.fileio import write_json_atomic
from xpdeploy.progress import log
from xpdeploy.stages.context import StageContext
from xpdeploy.verify.compare import compare_logits, top1
from xpdeploy.verify.gates import evaluate_gates
from xpdeploy.verify.latency import Runner, measure_interleaved
from xpdeploy.verify.outputs import infer_all


@dataclass
class _Candidate:
    name: str
    runner: Runner
    artifact: str
    source: TorchModel
    baseline_name: str
    baseline: Runner
    fixed_batch: int | None = None


def _evaluate(ctx: StageContext, c: _Candidate, batch: VerifyBatch, ref_logits: np.ndarray,
              source_logits: np.ndarray, ref_top1: float | None, threads: int
              ) -> CandidateResult:
    cfg = ctx.spec.verify
    logits = infer_all(c.runner, batch.pixels, c.fixed_batch or ctx.spec.data.batch_size,
                       fixed_batch=c.fixed_batch is not None)
    cmp = compare_logits(ref_logits, logits)
    source_diff = float(np.abs(source_logits - logits).max())
    cand_top1 = None if batch.synthetic else top1(logits, batch.labels)
    delta = None if cand_top1 is None or ref_top1 is None else cand_top1 - ref_top1
    lat_b, lat_c = [], []
    for b in [c.fixed_batch] if c.fixed_batch else cfg.batch_sizes:
        log(f"  timing {c.name} vs {c.baseline_name} at batch {b} ({threads} threads)")
        stats_b, stats_c = measure_interleaved([c.baseline, c.runner], batch.pixels, b,
                                               cfg.warmup, cfg.iters)
        lat_b.append(stats_b)
        lat_c.append(stats_c)
    speedup = {o.batch: o.p50 / n.p50 for o, n in zip(lat_b, lat_c, strict=True)}
    gates_cfg = cfg.gates if c.source.label == "original" else cfg.pruned_gates
    gates = evaluate_gates(gates_cfg, top1_delta=delta, agreement=cmp.agreement,
                           max_abs_diff=cmp.max_abs_diff, cosine=cmp.cosine, speedup=speedup,
                           synthetic=batch.synthetic)
    if cfg.max_export_diff is not None and c.runner.name.startswith("ort"):
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
        latency_ms=lat_c, baseline_latency_ms=lat_b, speedup=speedup, gates=gates,
        passed=all(g.passed for g in gates),
    )
    acc = "" if cand_top1 is None else f"top-1 {cand_top1:.2f}% ({delta:+.2f}), "
    log(f"  {c.name}: {acc}agreement {cmp.agreement:.4f}, speedup "
        + ", ".join(f"b{b} {s:.2f}x" for b, s in speedup.items())
        + (": passed" if result.passed else ": FAILED"))
    return result


def run(
    ctx: StageContext,
    model: TorchModel,
    verify_set: VerifySet,
    pruned: TorchModel | None = None,
    exported: OnnxModels | None = None,
    simplified: OnnxModels | None = None,
) -> dict[str, Artifact]:
    cfg = ctx.spec.verify
    # CPUs this process may use (a container's affinity mask, not the host's core count).
    threads = cfg.threads or len(os.sched_getaffinity(0))
    batch = load_verify_set(ctx.path(verify_set.file))
    sources = {m.label: m for m in (model, pruned) if m is not None}
    results: list[CandidateResult] = []
    with contextlib.ExitStack() as stack:
        torch_runners = {label: stack.enter_context(TorchRunner(m, ctx.run_dir, threads=threads))
                         for label, m in sources.items()}
        original = torch_runners["original"]
        logits = {label: infer_all(r, batch.pixels, ctx.spec.data.batch_size)
                  for label, r in torch_runners.items()}
        ref_top1 = None if batch.synthetic else top1(logits["original"], batch.labels)

        def ort(onnx_model: OnnxModel) -> OrtRunner:
            return stack.enter_context(OrtRunner(ctx.path(onnx_model.file), threads=threads))

        plan: list[_Candidate] = []
        if pruned is not None:
            plan.append(_Candidate("pruned (torch)", torch_runners["pruned"],
                                   pruned.weights_file, pruned, "original (torch)", original))
        for group in (exported, simplified):
            if group is None:
                continue
            for label, onnx_model in group.models.items():
                fixed = None if onnx_model.dynamic_batch else ctx.spec.export_onnx.trace_batch
                name = onnx_model.file.rsplit("/", 1)[-1]
                base = group.models.get("original")
                if label == "original" or base is None:
                    baseline_name, baseline = "original (torch)", original
                else:
                    baseline_name, baseline = base.file.rsplit("/", 1)[-1], ort(base)
                plan.append(_Candidate(name, ort(onnx_model), onnx_model.file, sources[label],
                                       baseline_name, baseline, fixed))
        for c in plan:
            results.append(_evaluate(ctx, c, batch, logits["original"], logits[c.source.label],
                                     ref_top1, threads))
        original_name = original.name
    path = ctx.stage_dir / "parity.json"
    report = ParityReport(
        file=ctx.rel(path), original_name=model.label, original_runner=original_name,
        original_top1=ref_top1, original_gmacs=model.gmacs, original_params_m=model.params_m,
        samples=len(batch.labels), data_source=batch.source, synthetic=batch.synthetic,
        threads=threads, candidates=results, passed=all(r.passed for r in results),
    )
    write_json_atomic(path, report.model_dump(mode="json", exclude={"file"}))
    return {"parity": report}
