"""Verification on a torch-free device, from a bundle (:mod:`xpdeploy.bundle`).

The host's verify stage runs torch; a device cannot. Instead every ONNX file of the bundle runs in
onnxruntime on the bundle's fixed verify pixels and is compared with the torch logits the host
recorded for its source model (``original.*`` with the original's, ``pruned.*`` with the pruned
model's), through the same :func:`~xpdeploy.verify.candidates.evaluate_candidate` as the host, so
the numbers, gates and the resulting :class:`~xpdeploy.artifacts.ParityReport` mean the same thing
(and :func:`xpdeploy.report.schema.build_report` reads it unchanged).

Baselines for latency (interleaved, ratio of medians): an ONNX file of the pruned model is timed
against the original's file of the same kind, as on the host; the original's exported file
(``original.onnx``) against itself (no torch to time here; speedup about 1), and its simplified file
against ``original.onnx``. TensorRT engines built on the device (``engines``) are candidates too,
with the baselines of :mod:`xpdeploy.verify.engines`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xpdeploy.artifacts import EngineSet, OnnxModel, ParityReport
from xpdeploy.backends.ort_runner import OrtRunner
from xpdeploy.bundle import BundleManifest, load_reference_logits, read_bundle
from xpdeploy.data.verify_set import load_verify_set
from xpdeploy.progress import log
from xpdeploy.spec import VerifyConfig, load_spec
from xpdeploy.verify.candidates import Candidate, evaluate_plan
from xpdeploy.verify.compare import top1
from xpdeploy.verify.engines import (
    EngineRunnerFactory,
    accelerator_candidates,
    choose_precisions,
    trt_runner_factory,
    verdict,
)

#: Where a device-side verify writes its report, relative to the bundle root (as on the host).
PARITY_FILE = "09_verify/parity.json"
REFERENCE_RUNNER = "torch-fp32 (host reference logits)"


def _verify_config(
    cfg: VerifyConfig,
    batch_sizes: Sequence[int] | None,
    warmup: int | None,
    iters: int | None,
) -> VerifyConfig:
    """The pipeline's verify section with the given overrides, validated again."""
    data = cfg.model_dump()
    for key, value in (("batch_sizes", batch_sizes), ("warmup", warmup), ("iters", iters)):
        if value is not None:
            data[key] = list(value) if key == "batch_sizes" else value
    return VerifyConfig.model_validate(data)


def _onnx_plan(bundle: BundleManifest) -> list[tuple[OnnxModel, OnnxModel]]:
    """(candidate, baseline) pairs, exported files first, then simplified ones."""
    exported = bundle.onnx.get("export_onnx")
    first = exported.models.get("original") if exported else None
    plan = []
    for group in bundle.onnx.values():
        base = group.models.get("original")
        for label, model in group.models.items():
            baseline = base if label != "original" and base is not None else first or model
            plan.append((model, baseline))
    return plan


def verify_bundle(
    bundle: str | Path | BundleManifest,
    *,
    threads: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    engines: EngineSet | None = None,
    engines_root: Path | None = None,
    backend: Any = None,
    make_runner: EngineRunnerFactory | None = None,
) -> ParityReport:
    """Verify every ONNX file of an extracted bundle in onnxruntime, without torch.

    ``bundle``: the folder :func:`~xpdeploy.bundle.open_bundle` extracted into (digests are
    checked again) or its manifest. Gates, warm-up and iterations come from the pipeline's verify
    section; ``batch_sizes`` (images), ``warmup`` and ``iters`` (calls per runner) override it.
    ``threads``: CPU threads per session (default: the pipeline's, else every CPU this process may
    use). The report is returned, not written; its ``file`` is :data:`PARITY_FILE`.
    ``engines`` (paths relative to ``engines_root``) adds one TensorRT candidate per engine, run
    through ``make_runner`` (default: :class:`~xpdeploy.backends.trt_runner.TrtRunner` sharing
    ``backend``).
    """
    manifest = bundle if isinstance(bundle, BundleManifest) else read_bundle(bundle)
    spec = load_spec(manifest.path("pipeline.yaml"))
    cfg = _verify_config(spec.verify, batch_sizes, warmup, iters)
    threads = threads or cfg.threads or len(os.sched_getaffinity(0))
    batch = load_verify_set(manifest.path(manifest.verify_set.file))
    reference = load_reference_logits(manifest)
    ref_top1 = None if batch.synthetic else top1(reference["original"], batch.labels)
    with contextlib.ExitStack() as stack:
        runners: dict[Path, OrtRunner] = {}

        def ort_file(path: Path, input_name: str = "pixels") -> OrtRunner:
            if path not in runners:
                runner = OrtRunner(path, threads=threads, input_name=input_name)
                runners[path] = stack.enter_context(runner)
            return runners[path]

        def ort(model: OnnxModel) -> OrtRunner:
            return ort_file(manifest.path(model.file), model.input_name)

        plan = []
        for model, base in _onnx_plan(manifest):
            fixed = None if model.dynamic_batch else spec.export_onnx.trace_batch
            plan.append(Candidate(Path(model.file).name, ort(model), model.file,
                                  manifest.models[model.label], Path(base.file).name, ort(base),
                                  fixed))
        group = manifest.onnx.get("simplify") or manifest.onnx["export_onnx"]
        plan += accelerator_candidates(
            [(m, manifest.path(m.file)) for m in group.models.values()], manifest.models,
            ort_file, stack, cfg=cfg, trace_batch=spec.export_onnx.trace_batch,
            eval_batch=spec.data.batch_size, engines=engines,
            engines_root=engines_root or manifest.path(""),
            engine_runners=lambda: make_runner or trt_runner_factory(backend))
        results, temperatures = evaluate_plan(
            plan, batch, reference, ref_top1, cfg=cfg, eval_batch_size=spec.data.batch_size,
            threads=threads)
    choices = choose_precisions(engines, results) if engines is not None else []
    for choice in choices:
        log(f"  precision best, {choice.source} {choice.batch}: {choice.reason}")
    original = manifest.models["original"]
    return ParityReport(
        file=PARITY_FILE, reference_file=manifest.reference_logits, original_name=original.label,
        original_runner=REFERENCE_RUNNER,
        original_top1=ref_top1, original_gmacs=original.gmacs,
        original_params_m=original.params_m, samples=len(batch), data_source=batch.source,
        synthetic=batch.synthetic, threads=threads, candidates=results, choices=choices,
        temperatures_c=temperatures,
        passed=verdict(results, choices),
    )
