"""``run_pipeline()``: calls the stages in order, reusing every stage whose inputs are unchanged.

The data flow is ordinary Python and reads top to bottom in :func:`_flow`. The executor decides for
each stage whether to reuse its outputs (manifest fingerprint matches), rerun it, or stop. A stage's
fingerprint covers exactly what it reads: its module's ``Settings`` (files it names by content, see
:mod:`xpdeploy.stages.fingerprint`) and the digests of its input artifacts.

A device run on a bundle (:mod:`xpdeploy.device_run`) goes through the same executor and flow: the
bundle is a partial run folder, a :class:`Continuation` hands the executor the outputs of the
stages that ran on the host, and the stages asked for run here with manifests, reuse and resume.

Under ``torchrun`` rank 0 runs :func:`_flow` exactly as a single process does and owns the run
folder. The other ranks run :func:`_follow`: they wait for rank 0 to announce each collective stage
(:data:`COLLECTIVE_STAGES`) it is about to run, with its inputs and fingerprint, run the same stage
function on their data shard, and wait again; every other stage (load, export, simplify, verify,
report) runs on rank 0 alone. The run folder must be on a filesystem every rank can read.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xpdeploy import distributed
from xpdeploy.artifacts import (
    Artifact,
    BundleOrigin,
    EngineSet,
    ParityReport,
    ReferenceLogits,
    RunReport,
)
from xpdeploy.errors import (
    EXIT_ERROR,
    ConfigError,
    ParityError,
    PeerStoppedError,
    RunFolderError,
    XpdeployError,
)
from xpdeploy.fileio import sha256_json
from xpdeploy.progress import format_duration, log
from xpdeploy.runfolder import RunFolder, now_iso, stage_folder_name
from xpdeploy.spec import PipelineSpec
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings, read_settings, settings_json

StageFn = Callable[..., dict[str, Artifact]]

#: Stages whose function runs on every rank under torchrun (each on its shard of the data).
COLLECTIVE_STAGES: frozenset[str] = frozenset({"train", "learn_masks", "prune", "finetune"})
#: Written by rank 0 at the start of a distributed run; every rank must read it back.
SHARED_CHECK_FILE = ".ranks-see-this"


@dataclass(frozen=True)
class Continuation:
    """A device run on a bundle: the stages to run here and what the host's stages produced.

    ``outputs``: stage -> output name -> (artifact, digest the host recorded). Not every file of
    these artifacts travels (model weights stay on the host), so the recorded digests stand for
    them; the bundle's member digests were checked when it was extracted.
    ``reference``: the torch logits ``verify`` compares with (no torch on the device); None for
    a bundle that does not verify (a latency bundle).
    """

    stages: tuple[str, ...]
    outputs: dict[str, dict[str, tuple[Artifact, str]]]
    reference: ReferenceLogits | None
    origin: BundleOrigin


@dataclass
class PipelineResult:
    """How a run ended; ``passed`` is False only when a verification gate failed."""

    name: str
    run_dir: Path
    passed: bool
    duration_s: float
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: RunReport | None = None
    parity: ParityReport | None = None
    bundle: Path | None = None


class _UntilReached(Exception):
    """Internal: the ``--until`` stage finished."""


def _check_stage_option(option: str, value: str | None, stages: list[str]) -> None:
    if value is None or value in stages:
        return
    close = difflib.get_close_matches(value, stages, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"{option} '{value}' is not a stage of this pipeline (stages: {', '.join(stages)}){hint}"
    )


class StageExecutor:
    """Runs or reuses one stage at a time and records what it did."""

    def __init__(
        self,
        spec: PipelineSpec,
        folder: RunFolder,
        *,
        from_stage: str | None,
        until: str | None,
        force: bool,
        continuation: Continuation | None = None,
    ) -> None:
        self.spec, self.folder = spec, folder
        self.continuation = continuation
        self.stages = spec.stage_list()
        self.from_stage = from_stage
        self.from_index = self.stages.index(from_stage) if from_stage else 0
        self.until = until
        self.force = force
        self.ran: list[str] = []
        self.skipped: list[str] = []
        #: True while every rank is inside a collective stage (no announcement can reach them).
        self.in_collective = False
        #: build_engine's output, when the pipeline has that stage.
        self.engines: EngineSet | None = None
        self._digests: dict[int, tuple[Artifact, str]] = {}
        for outputs in (continuation.outputs.values() if continuation else ()):
            for artifact, recorded in outputs.values():
                self._digests[id(artifact)] = (artifact, recorded)

    def digest(self, artifact: Artifact) -> str:
        """An artifact's digest, hashed once per instance in this run.

        A stage's outputs are hashed when its manifest is written or checked, and are the next
        stages' inputs: without the memo every file would be hashed again by each consumer.
        Instances read back from a manifest are new objects, so a check always hashes afresh;
        the entry keeps its artifact alive so its ``id`` cannot be reused by another object.
        """
        hit = self._digests.get(id(artifact))
        if hit is None or hit[0] is not artifact:
            hit = (artifact, artifact.digest(self.folder.root))
            self._digests[id(artifact)] = hit
        return hit[1]

    def wants(self, stage: str) -> bool:
        """The pipeline has ``stage`` and (on a device) it runs here or the bundle holds it."""
        c = self.continuation
        return stage in self.stages and (c is None or stage in c.stages or stage in c.outputs)

    def step(self, stage: str, inputs: dict[str, Artifact | None]) -> dict[str, Any]:
        """Reuse or run ``stage``; returns its named output artifacts.

        The stage is the module ``xpdeploy.stages.<stage>`` (its ``settings`` and ``run``),
        imported only when it runs: a device run never imports the torch-side stages.
        """
        c = self.continuation
        if c is not None and stage not in c.stages:
            log(f"[{stage}] from the bundle (ran on the host)")
            return {name: artifact for name, (artifact, _) in c.outputs[stage].items()}
        present = {k: v for k, v in inputs.items() if v is not None}
        module = importlib.import_module(f"xpdeploy.stages.{stage}")
        settings = read_settings(module, self.spec)  # what the stage reads: all it sees
        config = settings_json(settings)
        input_digests = {k: self.digest(v) for k, v in present.items()}
        fingerprint = sha256_json({"config": config, "inputs": input_digests})
        before_slice = self.stages.index(stage) < self.from_index
        forced = self.force or stage == self.from_stage  # --from STAGE reruns STAGE itself
        cached = None if forced else self.folder.current_outputs(stage, fingerprint, self.digest)
        if cached is not None:
            log(f"[{stage}] unchanged since the last run: reused ({stage_folder_name(stage)}/)")
            self.skipped.append(stage)
        elif before_slice:
            raise RunFolderError(
                f"--from {self.stages[self.from_index]}: stage '{stage}' has no current output in "
                f"{self.folder.root} (never finished, or its config or inputs changed); run "
                "without --from first"
            )
        else:
            cached = self._run(stage, module.run, settings, present, config, input_digests,
                               fingerprint, forced)
        if stage == self.until:
            raise _UntilReached
        return cached

    def _run(
        self,
        stage: str,
        fn: StageFn,
        settings: StageSettings,
        inputs: dict[str, Artifact],
        config: dict[str, Any],
        input_digests: dict[str, str],
        fingerprint: str,
        forced: bool,
    ) -> dict[str, Artifact]:
        log(f"[{stage}] running")
        stage_dir = self.folder.begin_stage(stage, keep_checkpoints=not forced)
        ctx = StageContext(stage, self.folder.root, stage_dir, settings, fingerprint)
        started, t0 = now_iso(), time.monotonic()
        collective = distributed.current() is not None and stage in COLLECTIVE_STAGES
        if collective:
            distributed.broadcast_object(
                {"kind": "stage", "stage": stage, "inputs": inputs, "fingerprint": fingerprint,
                 "settings": settings, "stage_dir": str(stage_dir)}
            )
            self.in_collective = True
        try:
            outputs = fn(ctx, **inputs)
        except BaseException:
            # Nothing half-written: drop this attempt's files, keep resumable checkpoints.
            self.folder.clear_stage(stage)
            raise
        self.in_collective = False
        duration = time.monotonic() - t0
        self.folder.write_manifest(
            stage,
            config=config,
            fingerprint=fingerprint,
            inputs=input_digests,
            outputs=outputs,
            started=started,
            duration_s=duration,
            digest=self.digest,
        )
        log(f"[{stage}] done in {format_duration(duration)}")
        self.ran.append(stage)
        return outputs


def _flow(ex: StageExecutor) -> tuple[ParityReport | None, RunReport | None]:
    """The pipeline's data flow, top to bottom (each stage is ``xpdeploy.stages.<name>``)."""
    loaded = ex.step("load", {})
    model, verify_set = loaded["model"], loaded["verify_set"]
    masks = pruned = plan = exported = simplified = parity = run_report = latency = None
    if ex.wants("train"):
        model = ex.step("train", {"model": model})["model"]
    if ex.wants("latency_blocks"):
        blocks = ex.step("latency_blocks", {"model": model})["blocks"]
        if ex.wants("latency_table"):
            latency = ex.step("latency_table", {"blocks": blocks})["table"]
    if ex.wants("learn_masks"):
        masks = ex.step("learn_masks", {"model": model})["masks"]
    if ex.wants("prune"):
        out = ex.step("prune", {"model": model, "masks": masks, "latency": latency})
        pruned, plan = out["model"], out["plan"]
    if ex.wants("finetune"):
        pruned = ex.step("finetune", {"model": pruned, "teacher": model})["model"]
    models = {"model": model, "pruned": pruned}
    if ex.wants("export_onnx"):
        exported = ex.step("export_onnx", {**models, "verify_set": verify_set})["onnx"]
    if ex.wants("simplify"):
        simplified = ex.step("simplify", {"onnx": exported, "verify_set": verify_set})["onnx"]
    if ex.wants("build_engine"):
        ex.engines = ex.step("build_engine",
                             {"onnx": exported, "simplified": simplified, **models})["engines"]
    built = ex.engines if ex.engines is not None and not ex.engines.deferred else None
    device = ex.continuation
    if ex.wants("verify"):
        parity = ex.step("verify", {
            **models, "verify_set": verify_set, "exported": exported, "simplified": simplified,
            "engines": built, "reference": device.reference if device else None,
            "plan": plan})["parity"]
    if ex.wants("report"):
        run_report = ex.step("report", {
            "model": model, "parity": parity, "plan": plan, "masks": masks, "pruned": pruned,
            "engines": built, "origin": device.origin if device else None,
            "latency": latency})["report"]
    return parity, run_report


def run_pipeline(
    spec: PipelineSpec,
    run_dir: Path,
    *,
    from_stage: str | None = None,
    until: str | None = None,
    force: bool = False,
    continuation: Continuation | None = None,
) -> PipelineResult:
    """Run ``spec`` in ``run_dir``; raise :class:`ParityError` after the report on a failed gate.

    ``continuation``: a device run in an extracted bundle (``run_dir``), see :class:`Continuation`.
    """
    spec.check_runnable()
    stages = spec.stage_list()
    _check_stage_option("--from", from_stage, stages)
    _check_stage_option("--until", until, stages)
    if from_stage and until and stages.index(from_stage) > stages.index(until):
        raise ConfigError(f"--from {from_stage} comes after --until {until}; swap them")
    if distributed.current() is not None and not distributed.is_main():
        return _follow(spec, run_dir)
    folder = RunFolder(run_dir)
    t0 = time.monotonic()
    ex = StageExecutor(spec, folder, from_stage=from_stage, until=until, force=force,
                       continuation=continuation)
    parity = run_report = None
    try:
        folder.check_pipeline(spec)
        with folder.locked():
            if continuation is None:  # a bundle holds the host's pipeline.yaml
                folder.write_pipeline(spec)
            _check_ranks_see(folder.root)
            with contextlib.suppress(_UntilReached):
                parity, run_report = _flow(ex)
            bundle = write_device_bundle(ex, folder.root)
    except Exception as e:  # (Ctrl-C reaches every rank from torchrun itself)
        if distributed.current() is not None and not ex.in_collective:
            code = e.exit_code if isinstance(e, XpdeployError) else EXIT_ERROR
            distributed.broadcast_object({"kind": "stop", "code": code})
        raise
    result = PipelineResult(
        name=spec.name,
        run_dir=run_dir,
        passed=parity is None or parity.passed,
        duration_s=time.monotonic() - t0,
        ran=ex.ran,
        skipped=ex.skipped,
        report=run_report,
        parity=parity,
        bundle=bundle,
    )
    if not result.passed:
        assert parity is not None
        failed = [c for c in parity.candidates if not c.passed]
        details = "; ".join(
            f"{c.name}: " + ", ".join(g.detail for g in c.gates if not g.passed) for c in failed
        )
        where = run_dir / (run_report.markdown_file if run_report else parity.file)
        error = ParityError(
            f"{len(failed)} of {len(parity.candidates)} candidates failed their gates ({details}); "
            f"see {where}"
        )
        # Every rank exits with the run's code, so a scheduler reads the same verdict anywhere.
        distributed.broadcast_object({"kind": "stop", "code": error.exit_code})
        raise error
    distributed.broadcast_object({"kind": "end"})
    return result


# --------------------------------------------------------------------------------------------------
# Hand-off to the device

#: The bundle a run writes when build_engine deferred, relative to the run folder.
DEVICE_BUNDLE = "bundle.tar"


def write_device_bundle(ex: StageExecutor, root: Path) -> Path | None:
    """When build_engine deferred, pack the device bundle and print the command that continues.

    It needs the verify stage's reference logits, so a run stopped before verify (``--until``)
    only says what is missing.
    """
    if ex.engines is None or not ex.engines.deferred:
        return None
    if not (ex.wants("verify") and (ex.folder.stage_dir("verify") / "manifest.json").is_file()):
        log("[bundle] not written: the device bundle needs the verify stage; run without --until")
        return None
    from xpdeploy.bundle import continuation_command, make_bundle, size_report

    out = root / DEVICE_BUNDLE
    manifest = make_bundle(root, out)
    head, *parts = size_report(manifest, out)
    log(f"[bundle] {head} ({ex.engines.reason})")
    for line in parts:
        log(line)
    log("  copy it to the device and continue there, in its folder (docker/README.md):")
    log(f"    {continuation_command(out)}")
    log("  (builds the TensorRT engines there, then verifies them and the ONNX files against "
        "these torch logits; --stages verify,report skips the engines)")
    return out


# --------------------------------------------------------------------------------------------------
# Ranks other than 0 under torchrun


def _check_ranks_see(root: Path) -> None:
    """Refuse a distributed run whose run folder some rank cannot read (rank 0 side).

    The other ranks read their inputs and checkpoints from the run folder, so it must be shared.
    """
    if distributed.current() is None:
        return
    token = secrets.token_hex(8)
    (root / SHARED_CHECK_FILE).write_text(token)
    distributed.broadcast_object({"kind": "check", "path": str(root.resolve() / SHARED_CHECK_FILE),
                                  "token": token})
    seen = distributed.all_gather_object(True)
    (root / SHARED_CHECK_FILE).unlink()  # every rank has read it
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise RunFolderError(
            f"ranks {', '.join(map(str, blind))} cannot read the run folder {root}; put it on a "
            "filesystem every node mounts at the same path (--run-dir)"
        )


def _follow(spec: PipelineSpec, run_dir: Path) -> PipelineResult:
    """A rank other than 0: run the collective stages rank 0 announces, until it ends the run."""
    t0 = time.monotonic()
    ran: list[str] = []
    while True:
        msg: dict[str, Any] = distributed.broadcast_object(None)
        kind = msg["kind"]
        if kind == "check":
            path = Path(msg["path"])
            run_dir = path.parent  # rank 0's absolute path: the same on every node
            ok = path.is_file() and path.read_text().strip() == msg["token"]
            distributed.all_gather_object(ok)
        elif kind == "stage":
            stage = msg["stage"]
            module = importlib.import_module(f"xpdeploy.stages.{stage}")
            ctx = StageContext(stage, run_dir, Path(msg["stage_dir"]), msg["settings"],
                               msg["fingerprint"])
            module.run(ctx, **msg["inputs"])
            ran.append(stage)
        elif kind == "stop":
            raise PeerStoppedError(int(msg["code"]))
        else:  # "end"
            return PipelineResult(spec.name, run_dir, passed=True,
                                  duration_s=time.monotonic() - t0, ran=ran)
