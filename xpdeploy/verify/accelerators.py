"""TensorRT engines as verify candidates, and the ``precision: best`` decision.

Baselines (timed interleaved, ratio of medians, as for ONNX files):

* an engine of the **pruned** model is timed against the **original's engine of the same
  precision and batch**, so its speedup measures pruning on TensorRT, not a change of backend;
* an engine of the **original** is timed against the ONNX file it was built from in onnxruntime,
  the backend speedup a user gets from building an engine at all.

``precision: best`` builds an fp16 and an int8 engine of each model
(:mod:`xpdeploy.engine.engines`); :func:`choose_precisions` keeps, per model and batch range, the
faster one (p50 host latency at the engine's batch) among those that pass their gates. The other is
reported but does not decide the verdict; when neither passes, both count and the run fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xpdeploy.artifacts import (
    CandidateResult,
    EngineSet,
    OnnxModel,
    PrecisionChoice,
    TorchModel,
    TrtEngine,
)
from xpdeploy.backends.ort_runner import gpu_providers
from xpdeploy.backends.runner import Runner
from xpdeploy.spec import GatesConfig, VerifyConfig
from xpdeploy.verify.candidates import Candidate

#: Makes the runner of one engine plan: (engine, absolute plan path) -> runner (not yet entered).
EngineRunnerFactory = Callable[[TrtEngine, Path], Runner]


def trt_runner_factory(backend: Any = None) -> EngineRunnerFactory:
    """TrtRunner per plan, named "trt-fp16"/"trt-int8", sharing one CUDA backend when given."""
    from xpdeploy.backends.trt_runner import TrtRunner

    def make(engine: TrtEngine, plan: Path) -> Runner:
        return TrtRunner(plan, name=f"trt-{engine.precision}", backend=backend)

    return make


def fixed_batch(engine: TrtEngine, batch_sizes: list[int], eval_batch: int) -> int | None:
    """The batch to run ``engine`` at: its own for a static engine, or for a dynamic one whose
    range misses the verify batch sizes or the evaluation batch; None: run those as configured."""
    if engine.batch_min == engine.batch_max:
        return engine.batch_opt
    wanted = [*batch_sizes, eval_batch]
    if all(engine.batch_min <= b <= engine.batch_max for b in wanted):
        return None
    return engine.batch_opt


def engine_candidates(
    engines: EngineSet,
    root: Path,
    sources: Mapping[str, TorchModel],
    onnx_runner: Callable[[str], Runner],
    stack: contextlib.ExitStack,
    *,
    batch_sizes: list[int],
    eval_batch: int,
    make_runner: EngineRunnerFactory,
    reduced_precision_gates: GatesConfig | None = None,
) -> list[Candidate]:
    """One :class:`Candidate` per engine (entered on ``stack``); see the module doc for baselines.

    ``root``: what engine paths are relative to; ``onnx_runner(file)``: the (entered) onnxruntime
    runner of an ONNX file of the run, the original engines' baseline.
    """
    runners: dict[str, Runner] = {}

    def runner(e: TrtEngine) -> Runner:
        if e.name not in runners:
            runners[e.name] = stack.enter_context(make_runner(e, root / e.file))
        return runners[e.name]

    by_name = {(e.source, e.label): e for e in engines.engines}
    out = []
    for e in engines.engines:
        base = by_name.get(("original", e.label)) if e.source != "original" else None
        if base is not None:
            base_name, base_runner = Path(base.file).name, runner(base)
        else:
            base_name, base_runner = Path(e.onnx_file).name, onnx_runner(e.onnx_file)
        gates = (reduced_precision_gates
                 if e.source == "original" and e.precision != "fp32" else None)
        out.append(Candidate(Path(e.file).name, runner(e), e.file, sources[e.source], base_name,
                             base_runner, fixed_batch(e, batch_sizes, eval_batch), gates))
    return out


def ort_gpu_candidates(
    models: list[tuple[OnnxModel, Path]],
    sources: Mapping[str, TorchModel],
    cpu_runner: Callable[[Path], Runner],
    stack: contextlib.ExitStack,
    *,
    providers: list[str],
    fixed: Callable[[OnnxModel], int | None],
    make_runner: Callable[[Path, str, str], Runner] | None = None,
    original_gates: GatesConfig | None = None,
) -> list[Candidate]:
    """ONNX files on onnxruntime's GPU providers, each timed against the same file on the CPU.

    ``models``: (ONNX artifact, absolute path) pairs; ``providers``: from
    :func:`~xpdeploy.backends.ort_runner.gpu_providers`. Candidates are named
    "pruned.sim.onnx [cuda]". The original's files get ``original_gates`` (TF32 / fp16 kernels move
    logits by more than the fp32 gates allow); the pruned model's keep ``pruned_gates``.
    """
    from xpdeploy.backends.ort_runner import OrtRunner

    def default(path: Path, provider: str, input_name: str) -> Runner:
        return OrtRunner(path, provider=provider, input_name=input_name)

    make = make_runner or default
    out = []
    for provider in providers:
        short = provider.removesuffix("ExecutionProvider").lower()
        for model, path in models:
            runner = stack.enter_context(make(path, provider, model.input_name))
            gates = original_gates if model.label == "original" else None
            out.append(Candidate(f"{path.name} [{short}]", runner, model.file,
                                 sources[model.label], f"{path.name} [cpu]", cpu_runner(path),
                                 fixed(model), gates))
    return out


def accelerator_candidates(
    onnx_files: list[tuple[OnnxModel, Path]],
    sources: Mapping[str, TorchModel],
    ort_file: Callable[[Path], Runner],
    stack: contextlib.ExitStack,
    *,
    cfg: VerifyConfig,
    trace_batch: int,
    eval_batch: int,
    engines: EngineSet | None,
    engines_root: Path,
    engine_runners: Callable[[], EngineRunnerFactory],
) -> list[Candidate]:
    """Every GPU candidate of a verify run, host or device: ``onnx_files`` (the last ONNX group,
    absolute paths) on onnxruntime's GPU providers when it has any, and every engine of
    ``engines`` (paths relative to ``engines_root``).

    ``ort_file(path)``: the entered CPU onnxruntime runner of an ONNX file (the baselines);
    ``engine_runners()``: called only when there are engines, so a host without TensorRT never
    loads a CUDA binding. ``trace_batch``: the batch of static-batch ONNX files (images).
    """
    plan: list[Candidate] = []
    providers = gpu_providers()
    if providers and onnx_files:
        plan += ort_gpu_candidates(
            onnx_files, sources, ort_file, stack, providers=providers,
            original_gates=cfg.engine_gates,
            fixed=lambda m: None if m.dynamic_batch else trace_batch)
    if engines is not None and engines.engines:
        plan += engine_candidates(
            engines, engines_root, sources, lambda f: ort_file(engines_root / f), stack,
            batch_sizes=list(cfg.batch_sizes), eval_batch=eval_batch,
            make_runner=engine_runners(), reduced_precision_gates=cfg.engine_gates)
    return plan


def _batch_part(label: str) -> str:
    """'fp16-b1-8-32' -> 'b1-8-32'."""
    return label.split("-", 1)[1] if "-" in label else label


def choose_precisions(engines: EngineSet, results: list[CandidateResult]) -> list[PrecisionChoice]:
    """For ``precision: best``: per (model, batch range), keep the faster passing engine."""
    if engines.precision != "best":
        return []
    by_artifact = {r.artifact: r for r in results}
    groups: dict[tuple[str, str], list[CandidateResult]] = {}
    for e in engines.engines:
        if e.file in by_artifact:
            groups.setdefault((e.source, _batch_part(e.label)), []).append(by_artifact[e.file])
    choices = []
    for (source, batch), members in groups.items():
        p50 = {r.name: r.latency_ms[0].p50 for r in members if r.latency_ms}
        passing = [r for r in members if r.passed and r.name in p50]
        if not passing:
            choices.append(PrecisionChoice(
                source=source, batch=batch, kept=None, dropped=[], p50_ms=p50,
                reason="no engine passed its gates; all count in the verdict"))
            continue
        kept = min(passing, key=lambda r: p50[r.name])
        dropped = [r.name for r in members if r is not kept]
        why = [f"{r.name} {p50[r.name]:.3f} ms" + ("" if r.passed else " (failed its gates)")
               for r in members if r is not kept and r.name in p50]
        reason = (f"kept {kept.name} ({kept.runner}, p50 {p50[kept.name]:.3f} ms)"
                  + (f" over {', '.join(why)}" if why else ""))
        choices.append(PrecisionChoice(source=source, batch=batch, kept=kept.name,
                                       dropped=dropped, p50_ms=p50, reason=reason))
    return choices


def verdict(results: list[CandidateResult], choices: list[PrecisionChoice]) -> bool:
    """All candidates pass, except those a precision choice dropped in favour of a passing one."""
    dropped = {name for c in choices if c.kept is not None for name in c.dropped}
    return all(r.passed for r in results if r.name not in dropped)
