"""Typed artifacts that flow between stages (docs/architecture.md section 2).

Artifacts are pydantic models so that they serialise to JSON (in each stage's manifest) and
validate when read back. File references are strings **relative to the run folder**, so a run
folder (or a device bundle made from it) can be moved and still resolves; stages turn them into
paths with ``run_dir / ref``. An artifact's digest covers its JSON and the content of every file
it names, which is what the resume logic compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from xpdeploy.fileio import sha256_file, sha256_json

ARTIFACT_SCHEMA = 1


class Artifact(BaseModel):
    """Base: frozen JSON-able record with the list of files it owns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def files(self) -> list[str]:
        """Run-folder-relative paths of the files this artifact owns (hashed into its digest)."""
        return []

    def digest(self, run_dir: Path) -> str:
        """sha256 over the artifact's JSON and the content of its files."""
        content = {ref: sha256_file(run_dir / ref) for ref in self.files()}
        return sha256_json({"artifact": self.model_dump(mode="json"), "files": content})


class DataConfig(BaseModel):
    """How images become model input; one preprocessing function reads it for every backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: tuple[int, int, int] = Field(description="(channels, height, width) in pixels")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bicubic"
    crop_pct: float = Field(1.0, description="centre crop: resize the short side to size/crop_pct")


class BlockShape(BaseModel):
    """Prunable structure of one transformer block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: int
    head_dim: int
    mlp_hidden: int


class ArchSpec(BaseModel):
    """Everything needed to rebuild a model from ``arch.json`` + safetensors with strict loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timm_name: str
    kwargs: dict[str, object] = Field(default_factory=dict)
    num_classes: int
    embed_dim: int | None = None
    blocks: list[BlockShape] = Field(default_factory=list)


class TorchModel(Artifact):
    """A PyTorch model on disk: arch.json + model.safetensors, with its costs and accuracy."""

    label: str = Field(description="'original', later 'pruned'")
    arch_file: str
    weights_file: str
    arch: ArchSpec
    data_config: DataConfig
    gmacs: float = Field(
        description="multiply-accumulates of one image, in 1e9 (docs/architecture.md section 6)"
    )
    params_m: float = Field(description="parameters, in millions")
    top1: float | None = Field(None, description="val top-1 in percent; None on synthetic data")
    top1_samples: int = 0
    epochs_trained: int = 0
    training: dict[str, object] | None = Field(
        None, description="how the last train/finetune ran: processes, batch, lr, augmentation"
    )

    def files(self) -> list[str]:
        return [self.arch_file, self.weights_file]


class MaskSet(Artifact):
    """Learned class-wise masks (``learn_masks``): tables, unit scores, curve and plots."""

    masks_file: str = Field(description="safetensors: heads.<b> and neurons.<b>, (classes, units)")
    scores_file: str = Field(description="JSON UnitScores: s_i = sum_c |M[c, i]|")
    history_file: str
    plots: list[str] = Field(default_factory=list)
    num_classes: int
    steps: int
    seconds: float
    converged: bool = Field(description="share of masks still moving in the last epoch < 5%")
    settings: dict[str, object] = Field(default_factory=dict, description="lambdas, lr, steps")

    def files(self) -> list[str]:
        return [self.masks_file, self.scores_file, self.history_file, *self.plots]


class LatencySetting(BaseModel):
    """Where a latency figure holds: runtime, precision, images per call, CPU threads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: str
    precision: str
    batch: int
    threads: int


class PrunePlan(Artifact):
    """Kept heads and neurons per block (``plan.json``, replayable on a fresh model)."""

    file: str
    criterion: str
    ranking: str
    normalize: str
    target_gmacs: float
    gmacs_before: float
    gmacs_after: float
    params_before_m: float
    params_after_m: float
    heads_per_block: list[int]
    mlp_per_block: list[int]
    one_shot_top1: float | None = Field(None, description="val top-1 right after pruning")
    plots: list[str] = Field(default_factory=list, description="how the budget was allocated")
    target_latency_ms: float | None = Field(None, description="the latency budget, ms per batch")
    predicted_latency_ms: float | None = Field(
        None, description="what the latency table predicts for this plan, ms per batch")
    latency: LatencySetting | None = Field(None, description="what the latency is measured on")
    table_original_ms: float | None = Field(
        None, description="the original's latency when the table was measured (drift check)")

    def files(self) -> list[str]:
        return [self.file, *self.plots]


class LatencyBlocks(Artifact):
    """Block ONNX files at every grid point, and whole pruned models to check the prediction.

    ``file``: ``grid.json`` (the block shapes, which blocks share each, the ONNX file of every
    (heads, MLP width), the validation models). The ONNX files are torch-free inputs of
    ``latency_table``: a latency bundle carries them to the device.
    """

    file: str
    arch_digest: str = Field(description="sha256 of the architecture the grid was cut from")
    shapes: int = Field(description="distinct block shapes")
    points: int = Field(description="block ONNX files over all shapes")
    onnx_files: list[str]

    def files(self) -> list[str]:
        return [self.file, *self.onnx_files]


class LatencyTable(Artifact):
    """A measured latency model (``table.json``, :mod:`xpdeploy.latency.table`), ms per batch."""

    file: str
    setting: LatencySetting
    device_id: str = Field(description="fingerprint id of the machine it was measured on")
    original_ms: float = Field(description="the unpruned model, measured")
    points: int
    unstable_points: int = Field(description="grid points whose spread stayed above max_spread")
    prediction_error_pct: list[float] = Field(
        default_factory=list, description="(predicted - measured) / measured of each validation "
        "model, in percent")
    source: str = Field(description="measured | cache | file")
    plots: list[str] = Field(default_factory=list)

    def files(self) -> list[str]:
        return [self.file, *self.plots]


class VerifySet(Artifact):
    """The fixed verification batch (.npz with ``pixels`` float32 NCHW and ``labels`` int64)."""

    file: str
    samples: int
    num_classes: int
    source: str
    synthetic: bool = Field(description="True: labels are random; no accuracy may be reported")
    class_names: list[str] = Field(default_factory=list)

    def files(self) -> list[str]:
        return [self.file]


class OnnxModel(Artifact):
    """An ONNX file with its interface and the checks it passed."""

    label: str
    file: str
    opset: int
    input_name: str = "pixels"
    output_name: str = "logits"
    dynamic_batch: bool = True
    nodes: int
    simplified: bool = False
    nodes_before_simplify: int | None = None
    tensorrt_notes: list[str] = Field(
        default_factory=list,
        description="op types some TensorRT release cannot parse, with the release each needs")
    max_abs_diff: float = Field(description="vs the model it came from, on the verify set")
    gmacs: float
    params_m: float

    def files(self) -> list[str]:
        return [self.file]


class OnnxModels(Artifact):
    """All ONNX files a stage produced, keyed by label ('original', 'pruned', ...)."""

    models: dict[str, OnnxModel]

    def files(self) -> list[str]:
        return [ref for m in self.models.values() for ref in m.files()]


class LatencyStats(BaseModel):
    """Latency of one runner at one batch size, in milliseconds per batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: int
    p10: float | None = Field(
        None, description="10th percentile over every timed call, ms per batch: the low end of "
        "the spread (with p90); None in results written before it was recorded")
    p50: float
    p90: float
    p99: float
    mean: float
    iters: int
    throughput: float = Field(description="images per second at the median latency")


class GateResult(BaseModel):
    """One pass/fail check of a candidate against the original."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    value: float | None
    limit: float
    passed: bool
    detail: str = ""


class CandidateResult(BaseModel):
    """Parity and speed of one candidate artifact vs the original model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    runner: str
    artifact: str
    source: str = Field("original", description="label of the torch model it was made from")
    baseline: str = Field("original", description="what it was timed against, interleaved")
    source_max_abs_diff: float | None = Field(
        None, description="max abs logit difference vs its own torch source (export fidelity)"
    )
    gmacs: float
    params_m: float
    top1: float | None
    top1_delta: float | None
    agreement: float = Field(description="share of samples whose top-1 class equals the original's")
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float = Field(description="mean cosine similarity of logit vectors vs the original")
    latency_ms: list[LatencyStats]
    baseline_latency_ms: list[LatencyStats] = Field(
        description="the baseline, timed interleaved with this candidate in the same process"
    )
    speedup: dict[int, float] = Field(
        description="batch -> baseline / candidate median latency: the median over interleaved "
        "rounds of each round's ratio of medians (one round: baseline p50 / candidate p50)")
    speedup_spread: dict[int, float] = Field(
        default_factory=dict,
        description="batch -> how far the rounds' speedups disagree: half their range over the "
        "speedup (0.03 = +-3%); empty in results written before rounds were measured")
    unstable: list[int] = Field(
        default_factory=list,
        description="batch sizes whose speedup_spread exceeded verify.max_spread: the figure is "
        "not trusted (min_speedup fails on it)")
    gates: list[GateResult]
    passed: bool
    gpu_latency_ms: list[LatencyStats] | None = Field(
        None, description="GPU compute per batch from CUDA events around the enqueue (TensorRT "
        "runners; latency_ms is host wall time with copies)"
    )
    runner_info: dict[str, float] = Field(
        default_factory=dict,
        description="one-off runner costs in ms: deserialize_ms, first_inference_ms (TensorRT)",
    )


class PrecisionChoice(BaseModel):
    """``precision: best``: which of an fp16 and an int8 engine was kept, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="label of the model the engines were built from")
    batch: str = Field(description="the engines' batch range, e.g. 'b1' or 'b1-8-32'")
    kept: str | None = Field(description="candidate name kept; None when none passed its gates")
    dropped: list[str] = Field(description="candidates not kept (informational in the verdict)")
    p50_ms: dict[str, float] = Field(description="candidate -> p50 host latency at its batch")
    reason: str


class ReferenceLogits(Artifact):
    """Torch logits of every source model on the verification set: what the other runners match.

    ``verify`` computes them with torch on the host; a device run takes them from the bundle
    (no torch there), so both compare against the same numbers.
    """

    file: str = Field(description="npz: label ('original', 'pruned') -> (samples, classes) fp32")
    runner: str = Field(description="the runner that produced them, e.g. torch-cpu-fp32")
    top1: dict[str, float | None] = Field(
        description="label -> top-1 in percent on the verification set (None: synthetic labels)"
    )

    def files(self) -> list[str]:
        return [self.file]


class BundleOrigin(Artifact):
    """Where a device run's bundle came from (shown in the device report)."""

    pipeline: str
    source_run: str = Field(description="absolute path of the host run folder")
    created: str = Field(description="UTC, ISO-8601")


class LatencyTargetResult(BaseModel):
    """The pruned model's measured latency against its budget (``prune.target_latency_ms``).

    Absolute milliseconds drift with the machine (on a shared 2-core VM the same file measured
    5.3 and 7.5 ms minutes apart, on one thread) while the ratio of the pruned model to the
    original timed side by side holds still. So the gate reads ``checked_ms``: that ratio times
    the original's latency when the table was measured, the pruned model's latency at the speed
    the plan was made for; ``measured_ms`` and ``drift`` show what the machine does now.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    setting: LatencySetting
    artifact: str = Field(description="what was timed: the pruned model's deployable file")
    target_ms: float
    predicted_ms: float | None
    measured_ms: float = Field(description="now: median over rounds, ms per batch")
    spread: float = Field(description="half-range / median of the per-round medians")
    original_ms: float = Field(description="the original now, timed interleaved with it")
    ratio: float = Field(description="pruned / original, the median of the rounds' ratios")
    ratio_spread: float = Field(description="half-range / median of the rounds' ratios")
    table_original_ms: float | None = Field(description="the original when the table was measured")
    drift: float | None = Field(description="original now / original then - 1 (a fraction)")
    checked_ms: float = Field(description="ratio x table_original_ms (else measured_ms): what "
                              "the gate reads")
    tolerance: float | None = Field(description="allowed miss above the target, as a fraction "
                                    "of it (None: not gated)")
    stable: bool = Field(description="ratio_spread within verify.max_spread")
    passed: bool
    detail: str


class ParityReport(Artifact):
    """Outcome of ``verify``: its truth value is the overall verdict."""

    file: str
    original_name: str
    original_runner: str
    original_top1: float | None
    original_gmacs: float
    original_params_m: float
    samples: int
    data_source: str
    synthetic: bool
    threads: int
    candidates: list[CandidateResult]
    choices: list[PrecisionChoice] = Field(
        default_factory=list, description="precision: best decisions; dropped candidates do not "
        "decide the verdict"
    )
    temperatures_c: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="zone -> min/max/mean C and samples, read while the candidates were timed",
    )
    latency_target: LatencyTargetResult | None = None
    passed: bool

    def files(self) -> list[str]:
        return [self.file]

    def __bool__(self) -> bool:
        return self.passed


class RunReport(Artifact):
    """Files written by ``report``: report.json, report.md and plots at the run folder's root."""

    json_file: str
    markdown_file: str
    plots: list[str]
    status: Literal["passed", "failed"]

    def files(self) -> list[str]:
        return [self.json_file, self.markdown_file, *self.plots]


class TrtEngine(BaseModel):
    """One TensorRT plan: what it was built from, for which device, and how the build went."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="file-name-safe id, e.g. 'pruned.fp16-b1'")
    source: str = Field(description="label of the model it was built from ('original', 'pruned')")
    onnx_file: str = Field(description="the ONNX file it was built from (before any host step)")
    graph_file: str = Field(description="the ONNX file TensorRT parsed (a host fp16/Q/DQ graph on "
                            "the strongly typed path, else onnx_file)")
    precision: Literal["fp32", "fp16", "int8"]
    label: str = Field(description="precision and batch range, e.g. 'fp16-b1', 'int8-b1-8-32'")
    build_path: Literal["weak", "strong"]
    file: str = Field(description="the serialized plan")
    batch_min: int
    batch_opt: int
    batch_max: int
    cache_hit: bool = Field(description="reused from the engine cache (same full key)")
    build_s: float = Field(description="seconds spent building (0 for a cache hit)")
    fused_attention_kernels: int | None = None
    attention_blocks: int | None = None
    layernorm_layers_pinned: int = 0
    log_file: str | None = None
    layers_file: str | None = None
    host_step: dict[str, object] | None = Field(
        None, description="what the host-side fp16 cast or Q/DQ insertion did (strong path)"
    )
    warnings: list[str] = Field(default_factory=list)

    def files(self) -> list[str]:
        return [self.file] + [f for f in (self.log_file, self.layers_file) if f]


class EngineSet(Artifact):
    """What ``build_engine`` produced. ``deferred``: no engine was built on this machine (no
    TensorRT here); the run then ends with a device bundle that continues on the target."""

    deferred: bool
    reason: str = Field(description="why the engines were deferred, for the log and the report")
    tensorrt: str | None = Field(None, description="TensorRT version found here, if any")
    precision: str
    device: dict[str, str | None] = Field(
        default_factory=dict,
        description="GPU name, compute capability, L4T release, CUDA binding of the build",
    )
    engines: list[TrtEngine] = Field(default_factory=list)

    def files(self) -> list[str]:
        return [ref for e in self.engines for ref in e.files()]
