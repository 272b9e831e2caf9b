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
from pathlib import Path

import numpy as np

from xpdeploy.artifacts import (
    Artifact,
    EngineSet,
    OnnxModel,
    OnnxModels,
    ParityReport,
    TorchModel,
    VerifySet,
)
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.backends.torch_runner import TorchRunner
from xpdeploy.data.verify_set import load_verify_set
from xpdeploy.fileio import write_json_atomic, write_with
from xpdeploy.stages.context import StageContext
from xpdeploy.verify.candidates import Candidate, evaluate_plan
from xpdeploy.verify.compare import top1
from xpdeploy.verify.engines import (
    EngineRunnerFactory,
    accelerator_candidates,
    choose_precisions,
    trt_runner_factory,
    verdict,
)
from xpdeploy.verify.outputs import infer_all

#: Torch logits of every source model on the verify set, for the device bundle (xpdeploy.bundle).
REFERENCE_LOGITS = "reference_logits.npz"


def save_reference_logits(path: Path, logits: dict[str, np.ndarray]) -> None:
    """Write ``label -> (samples, classes)`` float32 logits as an .npz, atomically.

    Why: a torch-free device compares its ONNX/TensorRT outputs with these instead of rerunning
    torch. The ParityReport owns the file (``reference_file``), so its digest guards it too.
    """
    arrays = {label: np.asarray(x, dtype=np.float32) for label, x in logits.items()}

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_with(path, writer)


def run(
    ctx: StageContext,
    model: TorchModel,
    verify_set: VerifySet,
    pruned: TorchModel | None = None,
    exported: OnnxModels | None = None,
    simplified: OnnxModels | None = None,
    engines: EngineSet | None = None,
) -> dict[str, Artifact]:
    cfg = ctx.spec.verify
    # CPUs this process may use (a container's affinity mask, not the host's core count).
    threads = cfg.threads or len(os.sched_getaffinity(0))
    batch = load_verify_set(ctx.path(verify_set.file))
    sources = {m.label: m for m in (model, pruned) if m is not None}
    with contextlib.ExitStack() as stack:
        torch_runners = {label: stack.enter_context(TorchRunner(m, ctx.run_dir, threads=threads))
                         for label, m in sources.items()}
        original = torch_runners["original"]
        logits = {label: infer_all(r, batch.pixels, ctx.spec.data.batch_size)
                  for label, r in torch_runners.items()}
        ref_top1 = None if batch.synthetic else top1(logits["original"], batch.labels)
        save_reference_logits(ctx.stage_dir / REFERENCE_LOGITS, logits)

        ort_runners: dict[Path, OrtRunner] = {}

        def ort_file(path: Path) -> OrtRunner:
            if path not in ort_runners:
                ort_runners[path] = stack.enter_context(OrtRunner(path, threads=threads))
            return ort_runners[path]

        def ort(onnx_model: OnnxModel) -> OrtRunner:
            return ort_file(ctx.path(onnx_model.file))

        plan: list[Candidate] = []
        if pruned is not None:
            plan.append(Candidate("pruned (torch)", torch_runners["pruned"],
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
                plan.append(Candidate(name, ort(onnx_model), onnx_model.file, sources[label],
                                       baseline_name, baseline, fixed))
        last = simplified or exported

        def engine_runners() -> EngineRunnerFactory:
            from xpdeploy.engine.cuda_memory import load_backend

            return trt_runner_factory(stack.enter_context(load_backend()))

        plan += accelerator_candidates(
            [(m, ctx.path(m.file)) for m in last.models.values()] if last else [], sources,
            ort_file, stack, cfg=cfg, trace_batch=ctx.spec.export_onnx.trace_batch,
            eval_batch=ctx.spec.data.batch_size, engines=engines, engines_root=ctx.run_dir,
            engine_runners=engine_runners)
        results, temperatures = evaluate_plan(
            plan, batch, logits, ref_top1, cfg=cfg, eval_batch_size=ctx.spec.data.batch_size,
            threads=threads)
        original_name = original.name
    choices = choose_precisions(engines, results) if engines is not None else []
    path = ctx.stage_dir / "parity.json"
    report = ParityReport(
        file=ctx.rel(path), reference_file=ctx.rel(ctx.stage_dir / REFERENCE_LOGITS),
        original_name=model.label, original_runner=original_name,
        original_top1=ref_top1, original_gmacs=model.gmacs, original_params_m=model.params_m,
        samples=len(batch.labels), data_source=batch.source, synthetic=batch.synthetic,
        threads=threads, candidates=results, choices=choices,
        temperatures_c=temperatures, passed=verdict(results, choices),
    )
    write_json_atomic(path, report.model_dump(mode="json", exclude={"file"}))
    return {"parity": report}
