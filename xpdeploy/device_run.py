"""``xpdeploy run BUNDLE.tar --stages verify,report``: continue a pipeline on the device.

The host writes a bundle (:mod:`xpdeploy.bundle`), a partial run folder: ONNX files, the fixed
verification set, the torch reference logits, calibration batches, and the outputs of every host
stage. Here, without torch, the bundle is extracted into the run folder (digests checked) and the
asked-for stages run through the host's executor and stage functions
(:func:`xpdeploy.pipeline.run_pipeline` with a :class:`~xpdeploy.pipeline.Continuation`): the same
manifests, reuse of finished stages, and resume after an interruption; ``build_engine`` builds the
TensorRT engines from the bundle's ONNX files (int8: from its calibration batches), ``verify``
checks every ONNX file and engine against the reference logits, ``report`` writes the report.

A latency bundle continues with ``latency_table`` instead: the block grid's ONNX files are timed
on the pipeline's latency runtime (TensorRT) and the table is written to
``12_latency_table/table.json``, for the host to plan with (``prune.latency.table``).

Which stages a bundle may run is its own (``device_stages`` in ``bundle.json``, read before
anything is extracted); without ``--stages``, all of them but ``build_engine``, which TensorRT
needs and runs only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from xpdeploy.artifacts import LatencyTable
from xpdeploy.bundle import (
    CALIBRATION_NPZ,
    DEVICE_STAGES,
    LATENCY_STAGES,
    RESOLVED_PIPELINE,
    BundleManifest,
    bundle_command,
    bundle_header,
    open_bundle,
    plan_command,
)
from xpdeploy.errors import ConfigError, MissingDependencyError
from xpdeploy.pipeline import Continuation, PipelineResult, run_pipeline
from xpdeploy.progress import log
from xpdeploy.runfolder import RunFolder, parse_outputs
from xpdeploy.spec import STAGE_ORDER, BuildEngineConfig, PipelineSpec, load_spec

#: File name endings ``run`` treats as a bundle instead of a pipeline file.
BUNDLE_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")


def is_bundle(path: Path) -> bool:
    return path.name.endswith(BUNDLE_SUFFIXES)


def parse_stages(text: str | None, device_stages: tuple[str, ...] = DEVICE_STAGES, *,
                 bundle: str = "a bundle", source_run: str = "RUN_DIR") -> list[str]:
    """``"verify,report"`` -> ["verify", "report"] in pipeline order; stages the bundle does not
    continue with (``device_stages``) are errors, naming the bundle to make on the host from
    ``source_run`` instead. None: the bundle's stages but build_engine."""
    if not text:
        return [s for s in device_stages if s != "build_engine"]
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in device_stages]
    if unknown or not stages:
        other = next((kind for kind in (DEVICE_STAGES, LATENCY_STAGES)
                      if kind != device_stages and set(unknown) & set(kind)), None)
        hint = ""
        if other == LATENCY_STAGES:
            hint = ("; a latency table is measured from a latency bundle: "
                    f"{bundle_command(Path(source_run), Path('latency.tar'), LATENCY_STAGES)}")
        elif other == DEVICE_STAGES:
            hint = ("; engines and verification continue from an engine bundle of a run that "
                    f"finished verify: {bundle_command(Path(source_run), Path('bundle.tar'))}")
        raise ConfigError(
            f"--stages {text!r}: {bundle} continues with {', '.join(device_stages)} only "
            f"(unknown: {', '.join(unknown) or 'none given'}){hint}"
        )
    if "report" in stages and "verify" not in stages:
        raise ConfigError("--stages: 'report' needs 'verify'; use --stages verify,report")
    return sorted(set(stages), key=device_stages.index)


def _require_tensorrt(stage: str, instead: str) -> None:
    """Fail before running anything when ``stage`` cannot run here."""
    from xpdeploy.backends.trt_versions import TRT_INSTALL_HINT, detect

    if detect() is None:
        raise MissingDependencyError(
            f"{stage} needs TensorRT, which is not installed here; {TRT_INSTALL_HINT}{instead}")


def run_bundle(tar: Path, run_dir: Path | None, stages: str | Sequence[str] | None = None, *,
               overrides: tuple[str, ...] = (), force: bool = False) -> PipelineResult:
    """Extract ``tar`` into ``run_dir`` and run ``stages`` there; see the module doc.

    ``stages``: ``--stages`` text or a list; None: the bundle's default (module doc).
    ``overrides``: ``--set`` for the bundle's pipeline (e.g. ``verify.iters=50``); ``force``
    reruns the stages even if they finished with the same inputs.
    """
    head = bundle_header(tar)  # what it continues with, before anything is extracted
    text = stages if stages is None or isinstance(stages, str) else ",".join(stages)
    chosen = parse_stages(text, head.device_stages, bundle=f"bundle {tar.name}",
                          source_run=head.source_run)
    if "build_engine" in chosen:
        _require_tensorrt("build_engine", "; or continue without engines: --stages verify,report")
    root = run_dir or Path("runs") / f"{tar.name.split('.')[0]}-device"
    manifest = open_bundle(tar, root)
    log(f"[bundle] {tar}: {len(manifest.members)} files, digests checked, pipeline "
        f"'{manifest.pipeline}'")
    spec = load_spec(root / RESOLVED_PIPELINE, overrides)
    # The device runs the asked-for stages even where the host's pipeline stopped before them.
    spec.stages = [s for s in STAGE_ORDER if s in spec.stage_list() or s in chosen]
    if "build_engine" in chosen:
        cfg = spec.build_engine or BuildEngineConfig()
        if manifest.calibration is not None:  # the images stay on the host: their batches travel
            cfg = cfg.model_copy(update={"calibration": (root / CALIBRATION_NPZ).resolve()})
        spec.build_engine = cfg
    if "latency_table" in chosen:
        _measure_here(spec)
    continuation = Continuation(stages=tuple(chosen), outputs=manifest.recorded(),
                                reference=manifest.reference, origin=manifest.origin())
    result = run_pipeline(spec, root, force=force, continuation=continuation)
    if "latency_table" in chosen:
        _say_how_to_plan(root, manifest)
    return result


def _measure_here(spec: PipelineSpec) -> None:
    """A latency bundle is for measuring: a table the host's pipeline names is not used here."""
    if spec.prune is None:
        return
    latency = spec.prune.latency
    if latency.table is not None:
        log(f"[bundle] prune.latency.table {latency.table} is the host's; the table is measured "
            "here")
        latency.table = None
    if latency.runtime == "tensorrt":
        _require_tensorrt("latency_table (prune.latency.runtime: tensorrt)", "")


def table_file(run_dir: Path) -> Path | None:
    """The latency table a (device) run in ``run_dir`` wrote, or None."""
    manifest = RunFolder(run_dir).read_manifest("latency_table")
    table = parse_outputs(manifest).get("table") if manifest else None
    return run_dir / table.file if isinstance(table, LatencyTable) else None


def _say_how_to_plan(root: Path, manifest: BundleManifest) -> None:
    """Where the table is, and the host command that plans with it."""
    path = table_file(root)
    if path is None:
        return
    log(f"[bundle] latency table: {path}")
    log("  copy it to the host and plan with it there:")
    log(f"    {plan_command(manifest.source_run, path.name)}")
