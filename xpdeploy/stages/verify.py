"""``verify``: the same cached batches through the original and every candidate runner.

Accuracy (top-1, delta vs the original), agreement and logit differences vs the original, export
fidelity vs each candidate's own torch model, and latency measured interleaved with a baseline in
this process, so machine drift cancels in the speedup (docs/architecture.md section 4). The
baseline of an ONNX file of the pruned model is the original's ONNX file of the same kind
(exported or simplified), so its speedup measures pruning, not a change of backend.

The same stage runs on the host and on a torch-free device (a run on a bundle). The reference is
:class:`~xpdeploy.artifacts.ReferenceLogits`: on the host this stage computes it with torch (and
adds the pruned torch model as a candidate); on the device it is the bundle's, and the original's
ONNX files are timed against ``original.onnx`` instead of torch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from xpdeploy.artifacts import (
    Artifact,
    CandidateResult,
    EngineSet,
    LatencyTargetResult,
    OnnxModel,
    OnnxModels,
    ParityReport,
    PrunePlan,
    ReferenceLogits,
    TorchModel,
    VerifySet,
)
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.runner import Runner, infer_all
from xpdeploy.data.npz import read_npz, write_npz
from xpdeploy.data.verify_set import VerifyBatch, load_verify_set
from xpdeploy.fileio import write_json_atomic
from xpdeploy.logits import top1
from xpdeploy.progress import log
from xpdeploy.spec import PipelineSpec, VerifyConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings
from xpdeploy.verify.accelerators import (
    EngineRunnerFactory,
    accelerator_candidates,
    choose_precisions,
    trt_runner_factory,
    verdict,
)
from xpdeploy.verify.candidates import Candidate, evaluate_plan
from xpdeploy.verify.latency import measure_rounds
from xpdeploy.verify.latency_grid import runtime_opener

#: Torch logits of every source model on the verify set (the device bundle carries them).
REFERENCE_LOGITS = "reference_logits.npz"


class Settings(StageSettings):
    verify: VerifyConfig
    batch_size: int  # data.batch_size: images per inference call
    trace_batch: int  # export_onnx.trace_batch: the batch a fixed-batch ONNX file runs at


def settings(spec: PipelineSpec) -> Settings:
    return Settings(verify=spec.verify, batch_size=spec.data.batch_size,
                    trace_batch=spec.export_onnx.trace_batch)


def _torch_reference(ctx: StageContext[Settings], sources: dict[str, TorchModel],
                     batch: VerifyBatch, threads: int, stack: contextlib.ExitStack
                     ) -> tuple[ReferenceLogits, dict[str, np.ndarray], dict[str, Runner]]:
    """Run every source model in torch (fp32, CPU) and save the logits; returns the artifact, the
    logits and the runners."""
    from xpdeploy.backends.torch_runner import TorchRunner  # the host only: a device has no torch

    runners: dict[str, Runner] = {
        label: stack.enter_context(TorchRunner(m, ctx.run_dir, threads=threads))
        for label, m in sources.items()}
    logits = {label: np.asarray(infer_all(r, batch.pixels, ctx.settings.batch_size),
                                dtype=np.float32) for label, r in runners.items()}
    path = ctx.stage_dir / REFERENCE_LOGITS
    write_npz(path, logits)
    top = {label: None if batch.synthetic else top1(x, batch.labels) for label, x in logits.items()}
    reference = ReferenceLogits(file=ctx.rel(path), runner=runners["original"].name, top1=top)
    return reference, logits, runners


def load_reference(run_dir: Path, reference: ReferenceLogits) -> dict[str, np.ndarray]:
    """Label -> (samples, classes) float32 logits of a :class:`ReferenceLogits`."""
    arrays = read_npz(run_dir / reference.file, tuple(reference.top1), what="reference logits",
                      fix="rerun verify on the host (and make the bundle again)")
    return {label: np.asarray(x, dtype=np.float32) for label, x in arrays.items()}


def run(
    ctx: StageContext[Settings],
    model: TorchModel,
    verify_set: VerifySet,
    pruned: TorchModel | None = None,
    exported: OnnxModels | None = None,
    simplified: OnnxModels | None = None,
    engines: EngineSet | None = None,
    reference: ReferenceLogits | None = None,
    plan: PrunePlan | None = None,
) -> dict[str, Artifact]:
    """Verify every candidate; ``reference`` given (a device run): no torch is imported."""
    cfg, eval_batch = ctx.settings.verify, ctx.settings.batch_size
    # CPUs this process may use (a container's affinity mask, not the host's core count).
    threads = cfg.threads or len(os.sched_getaffinity(0))
    batch = load_verify_set(ctx.path(verify_set.file))
    sources = {m.label: m for m in (model, pruned) if m is not None}
    with contextlib.ExitStack() as stack:
        torch_runners: dict[str, Runner] = {}
        if reference is None:
            reference, logits, torch_runners = _torch_reference(ctx, sources, batch, threads,
                                                                stack)
            original_runner = torch_runners["original"].name
        else:
            logits = load_reference(ctx.run_dir, reference)
            original_runner = f"{reference.runner} (host reference logits)"
        ref_top1 = reference.top1.get("original")

        ort_runners: dict[Path, OrtRunner] = {}

        def ort_file(path: Path, input_name: str = "pixels") -> OrtRunner:
            if path not in ort_runners:
                runner = OrtRunner(path, threads=threads, input_name=input_name)
                ort_runners[path] = stack.enter_context(runner)
            return ort_runners[path]

        def ort(onnx_model: OnnxModel) -> OrtRunner:
            return ort_file(ctx.path(onnx_model.file), onnx_model.input_name)

        candidates: list[Candidate] = []
        if "pruned" in torch_runners:
            candidates.append(Candidate("pruned (torch)", torch_runners["pruned"],
                                  sources["pruned"].weights_file, sources["pruned"],
                                  "original (torch)", torch_runners["original"]))
        # The original's ONNX files are timed against torch, or (no torch) its exported file.
        first = (exported or simplified or OnnxModels(models={})).models.get("original")
        for group in (exported, simplified):
            for label, onnx_model in (group.models.items() if group else ()):
                fixed = None if onnx_model.dynamic_batch else ctx.settings.trace_batch
                base = group.models.get("original") if label != "original" else None
                if base is None and torch_runners:
                    baseline_name, baseline = "original (torch)", torch_runners["original"]
                else:
                    base = base or first or onnx_model
                    baseline_name, baseline = Path(base.file).name, ort(base)
                candidates.append(Candidate(Path(onnx_model.file).name, ort(onnx_model),
                                      onnx_model.file, sources[label], baseline_name, baseline,
                                      fixed))
        last = simplified or exported

        def engine_runners() -> EngineRunnerFactory:
            from xpdeploy.backends.cuda_memory import load_backend

            return trt_runner_factory(stack.enter_context(load_backend()))

        candidates += accelerator_candidates(
            [(m, ctx.path(m.file)) for m in last.models.values()] if last else [], sources,
            ort_file, stack, cfg=cfg, trace_batch=ctx.settings.trace_batch,
            eval_batch=eval_batch, engines=engines, engines_root=ctx.run_dir,
            engine_runners=engine_runners)
        results, temperatures = evaluate_plan(
            candidates, batch, logits, ref_top1, cfg=cfg, eval_batch_size=eval_batch,
            threads=threads)
        target = _latency_target(ctx, plan, last, batch.pixels, results)
    choices = choose_precisions(engines, results) if engines is not None else []
    for choice in choices:
        log(f"  precision best, {choice.source} {choice.batch}: {choice.reason}")
    path = ctx.stage_dir / "parity.json"
    report = ParityReport(
        file=ctx.rel(path), original_name=model.label, original_runner=original_runner,
        original_top1=ref_top1, original_gmacs=model.gmacs, original_params_m=model.params_m,
        samples=len(batch.labels), data_source=batch.source, synthetic=batch.synthetic,
        threads=threads, candidates=results, choices=choices,
        temperatures_c=temperatures, latency_target=target,
        passed=verdict(results, choices) and (target is None or target.passed),
    )
    write_json_atomic(path, report.model_dump(mode="json", exclude={"file"}))
    return {"parity": report, "reference": reference}


def _latency_target(ctx: StageContext[Settings], plan: PrunePlan | None,
                    onnx: OnnxModels | None, pixels: np.ndarray,
                    results: list[CandidateResult]) -> LatencyTargetResult | None:
    """The pruned model's latency against ``prune.target_latency_ms`` on the table's runtime,
    batch and threads; None without a latency target (or a TensorRT target off the device).

    onnxruntime: the deployable ONNX files (simplified when the stage ran) of the original and
    the pruned model, timed interleaved in rounds here. tensorrt: the pruned engine of the
    planned precision, as its candidate measured it.
    """
    if plan is None or plan.target_latency_ms is None or plan.latency is None:
        return None
    cfg, setting = ctx.settings.verify, plan.latency
    target = plan.target_latency_ms
    if setting.runtime == "tensorrt":
        found = [(c, s) for c in results if c.source == "pruned"
                 and c.runner == f"trt-{setting.precision}"
                 for s in c.latency_ms if s.batch == setting.batch]
        if not found:
            log(f"  latency target {target:.3f} ms is on tensorrt ({setting.precision}, batch "
                f"{setting.batch}): it is checked where its engine runs (the device)")
            return None
        cand, stats = found[0]
        base = next(s for s in cand.baseline_latency_ms if s.batch == setting.batch)
        measured, original = stats.p50, base.p50
        spread = ratio_spread = cand.speedup_spread.get(setting.batch, 0.0)
        ratio = 1.0 / cand.speedup[setting.batch]
        artifact = cand.artifact
    else:
        if onnx is None or "pruned" not in onnx.models:
            return None
        files = {label: ctx.path(m.file) for label, m in onnx.models.items()}
        opener = runtime_opener(setting, ctx.stage_dir)
        log(f"  timing the latency target on {setting.runtime} at batch {setting.batch} "
            f"({setting.threads} threads)")
        with opener(files["original"], "pixels") as o, opener(files["pruned"], "pixels") as p:
            times = measure_rounds([o, p], pixels, setting.batch, warmup=cfg.warmup,
                                   iters=cfg.iters, rounds=cfg.rounds)
        estimate, relative = times.latency(1), times.ratio(1, 0)
        measured, spread = estimate.value, estimate.spread
        ratio, ratio_spread = relative.value, relative.spread
        original = times.latency(0).value
        artifact = onnx.models["pruned"].file
    tolerance = cfg.max_latency_miss
    then = plan.table_original_ms
    checked = ratio * then if then else measured
    drift = original / then - 1 if then else None
    stable = ratio_spread <= cfg.max_spread
    within = tolerance is None or checked <= target * (1 + tolerance)
    miss = (checked - target) / target * 100.0
    predicted = plan.predicted_latency_ms
    speed = (f"{ratio:.3f} x the original side by side (+-{ratio_spread:.0%} over rounds) = "
             f"{checked:.3f} ms at the table's speed ({then:.3f} ms for the original)" if then
             else f"{measured:.3f} ms (+-{spread:.0%} over rounds)")
    now = (f"; now the original measures {original:.3f} ms ({drift * 100:+.0f}% since the table)"
           f" and the pruned model {measured:.3f} ms" if drift is not None else "")
    detail = (f"{speed} vs target {target:.3f} ms ({miss:+.1f}%)"
              + (f", predicted {predicted:.3f} ms" if predicted else "") + now
              + ("" if within else f": misses the target by more than {tolerance:.0%}")
              + ("" if stable else f"; unstable: rounds disagree by more than "
                 f"{cfg.max_spread:.0%}, rerun on a quieter machine or raise verify.iters")
              + ("" if tolerance is not None else " (not gated: verify.max_latency_miss is null)"))
    result = LatencyTargetResult(
        setting=setting, artifact=artifact, target_ms=target, predicted_ms=predicted,
        measured_ms=measured, spread=spread, original_ms=original, ratio=ratio,
        ratio_spread=ratio_spread, table_original_ms=then, drift=drift, checked_ms=checked,
        tolerance=tolerance, stable=stable,
        passed=tolerance is None or (within and stable), detail=detail)
    log(f"  latency target: {detail}" + (": passed" if result.passed else ": FAILED"))
    return result
