"""Pipeline files: YAML -> :class:`PipelineSpec`, one config model per stage section.

Why pydantic: it gives typed, nested validation with exact error locations for free; what we add is
the wording users need (the path, the expected type, a "did you mean" for typos), ``${ENV}``
interpolation, and ``--set a.b=value`` overrides that go through the same validation as the file.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from xpdeploy.errors import ConfigError

#: Every stage xpdeploy knows, in pipeline order (docs/architecture.md section 2).
STAGE_ORDER: tuple[str, ...] = (
    "load",
    "train",
    "latency_blocks",
    "latency_table",
    "learn_masks",
    "prune",
    "finetune",
    "export_onnx",
    "simplify",
    "build_engine",
    "verify",
    "report",
)
#: Stages that consume another stage's output.
STAGE_NEEDS: dict[str, str] = {
    "simplify": "export_onnx", "report": "verify", "finetune": "prune",
    "build_engine": "export_onnx", "latency_table": "latency_blocks",
}
#: Stage folders are numbered in this order, which never changes: a new stage is appended, so the
#: folders of existing run folders keep their names (``runfolder.stage_folder_name``).
FOLDER_ORDER: tuple[str, ...] = (
    "load", "train", "learn_masks", "prune", "finetune", "export_onnx", "simplify",
    "build_engine", "verify", "report", "latency_blocks", "latency_table",
)
#: Runtimes a latency table can be measured on (``prune.latency.runtime``).
LatencyRuntime = Literal["onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"]

#: Prune criteria whose scores come from the learned masks (they need ``learn_masks``).
MASK_CRITERIA: tuple[str, ...] = ("xpruner", "xpruner_taylor")

Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos"]


@dataclass(frozen=True)
class ContentDigest:
    """Marks a config field that names a file whose *content* a stage's outputs depend on.

    The executor (``xpdeploy.stages.fingerprint.fingerprint``) hashes what the file holds into the
    stage's fingerprint, so rewriting the file at the same path reruns the stage. ``kind`` says how:
    ``"file"`` (its bytes) or ``"calibration"`` (a calibration manifest and every image it lists).
    """

    kind: Literal["file", "calibration"]


def _expand_home(v: Path | None) -> Path | None:
    return v.expanduser() if v is not None else v


#: A path where ``~`` means the home folder.
UserPath = Annotated[Path | None, AfterValidator(_expand_home)]
#: A path whose file's bytes enter the fingerprint of the stages that read it.
InputFile = Annotated[Path | None, AfterValidator(_expand_home), ContentDigest("file")]
#: A calibration manifest: its text and the images it lists enter the fingerprint.
CalibrationFile = Annotated[Path | None, AfterValidator(_expand_home), ContentDigest("calibration")]


class Section(BaseModel):
    """Base for every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which network to load (any timm model name) and where its weights come from."""

    name: str = Field(description="timm model name, e.g. deit_tiny_patch16_224")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="overrides for timm.create_model: img_size, depth, ..."
    )
    pretrained: bool = Field(False, description="download timm's pretrained weights (network)")
    checkpoint: InputFile = Field(None, description="a .pth/.pt/.safetensors state dict")

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelConfig:
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("set either 'pretrained: true' or 'checkpoint', not both")
        return self


class PreprocessConfig(Section):
    """Explicit preprocessing; each unset field comes from the model's timm data config."""

    size: int | None = Field(None, gt=0, description="square input size in pixels")
    crop_pct: float | None = Field(None, gt=0, le=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Interpolation | None = None


class DataConfigSection(Section):
    """Where images come from. ``synthetic`` is for smoke runs: it yields no accuracy figure."""

    source: Literal["imagefolder", "digits", "synthetic"]
    root: UserPath = Field(None, description="imagefolder: folder holding the split folders")
    train_dir: str = "train"
    val_dir: str = "val"
    val_fraction: float = Field(0.2, gt=0, lt=1, description="digits: share held out for val")
    synthetic_samples: int = Field(256, gt=0, description="synthetic: images per split")
    num_classes: int | None = Field(None, gt=1, description="synthetic: default = the model's")
    verify_samples: int = Field(512, gt=0, description="size of the fixed verification set")
    batch_size: int = Field(64, gt=0, description="evaluation batch size")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> DataConfigSection:
        if self.source == "imagefolder" and self.root is None:
            raise ValueError("source 'imagefolder' needs 'root' (the folder with train/ and val/)")
        return self


class LoadConfig(Section):
    """``load``: build the model and measure its baseline."""

    evaluate: bool = Field(True, description="measure the loaded model's val top-1")


class AugmentConfig(Section):
    """Training augmentation, seeded per draw (the same image at the same epoch and position gets
    the same augmentation in every run, with any number of workers and after a resume).

    ``hflip`` and ``crop_padding`` work on the preprocessed pixels. The DeiT recipe (Touvron et al.
    2021: RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25) comes from timm's data
    utilities: ``rand_augment`` and ``random_resized_crop`` act on the decoded image, random erasing
    on the normalised tensor, mixup/cutmix on the batch (the targets become soft labels).
    """

    hflip: bool = Field(False, description="random horizontal flip (wrong for digits and text)")
    crop_padding: int = Field(0, ge=0, description="pixels of reflect padding before random crop")
    rand_augment: str | None = Field(
        None, description="timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1' (DeiT); null: off"
    )
    random_resized_crop: tuple[float, float] | None = Field(
        None, description="scale range of a random resized crop, e.g. [0.08, 1.0]; null: off"
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability per image (DeiT 0.25)")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (DeiT 0.8); 0: off")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (DeiT 1.0); 0: off")
    mix_prob: float = Field(1.0, ge=0, le=1, description="share of batches mixed")
    mix_switch_prob: float = Field(0.5, ge=0, le=1, description="cutmix instead of mixup")

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment_spec(cls, v: str | None) -> str | None:
        # The shape of timm's spec only (timm itself checks the values when training starts;
        # importing it here would pull torch into the torch-free device side).
        if v is not None and not re.fullmatch(r"rand(-[a-z]+[0-9.]*)*", v):
            raise ValueError(
                f"'{v}' is not a timm RandAugment spec like 'rand-m9-mstd0.5-inc1' (DeiT)"
            )
        return v

    @field_validator("random_resized_crop")
    @classmethod
    def _scale_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError("random_resized_crop must be [min, max] with 0 < min <= max <= 1")
        return v


class TrainConfig(Section):
    """``train``: supervised training, AdamW with warm-up + cosine, checkpoint every epoch.

    ``batch_size`` is per process (per GPU): under torchrun with N processes and
    ``accumulate_steps`` k an optimiser step sees N * k * batch_size images. ``lr`` is used as
    given unless ``lr_scale_batch`` is set (the linear scaling rule, opt-in).
    """

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0, description="images per process per forward pass")
    accumulate_steps: int = Field(1, ge=1, description="forward passes per optimiser step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    lr_scale_batch: int | None = Field(
        None, gt=0, description="scale lr by global batch / this (e.g. 512 as in DeiT); null: off"
    )
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an EMA of the weights (e.g. 0.9998) and output it"
    )
    eval_every: int = Field(1, ge=1, description="evaluate on val every this many epochs (+ last)")
    keep: Literal["last", "best"] = Field(
        "last", description="output the last weights or the best on val (val then selects!)"
    )
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="also checkpoint every this many optimiser steps (mid-epoch)"
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="autocast: auto = bf16 (else fp16) on GPU, off on CPU"
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: all cores)")
    max_images: int | None = Field(
        None, gt=0, description="train images per epoch over all ranks (a new seeded subset each)"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class LearnMasksConfig(Section):
    """``learn_masks``: class-wise explainability masks, trained with the backbone frozen.

    Loss = CE(masked model) + lambda_sparse * L_sparse + lambda_smooth * L_smooth (docs/method.md).
    The defaults are the settings that measured best on the CIFAR-10 val split (docs/benchmarks.md,
    "Defaults by evidence"; tests/test_spec.py keeps the two in step).
    """

    epochs: int = Field(6, gt=0, description="passes over the (possibly capped) train split")
    max_images: int | None = Field(None, gt=0, description="cap on train images per epoch")
    batch_size: int = Field(128, gt=0, description="images per process per step (torchrun: x N)")
    lr: float = Field(5e-2, gt=0, description="peak learning rate (no weight decay)")
    min_lr: float = Field(0.0, ge=0, description="the cosine schedule's floor")
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="adam: every mask moves ~lr per step; sgd: moves follow the gradient")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: lr -> min_lr over all steps; constant: lr throughout")
    sparsity: Literal["l2", "l1"] = "l2"
    lambda_sparse: float = Field(3e-3, ge=0, description="sum over units, mean over classes")
    smoothness: Literal["class_tv", "unit_tv", "none"] = "class_tv"
    lambda_smooth: float = Field(1e-3, ge=0)
    penalty_norm: Literal["units", "entries"] = Field(
        "units", description="units: penalties summed over units, mean over classes; entries: "
        "mean over every mask entry (the prototype's scaling, ~1e-5 of the CE gradient)")
    project: bool = Field(True, description="clip masks to [0, 1] after every step")
    target: Literal["label", "teacher"] = Field(
        "teacher", description="label: rows and CE from the true label (the paper); teacher: rows "
        "mixed by the unmasked model's softmax, KL to it (no label leak)")
    converged_eps: float = Field(1e-3, gt=0, description="a mask 'moved' if it changed by more")
    amp: Literal["auto", "off", "bf16"] = Field(
        "auto", description="backbone autocast: auto = bf16 on GPUs that have it; masks stay fp32"
    )
    threads: int | None = Field(None, gt=0)


class ThresholdConfig(Section):
    """``prune.ranking: threshold`` (v2): learned per-(block, type) thresholds under the budget."""

    steps: int = Field(200, gt=0)
    batch_size: int = Field(64, gt=0, description="images per process per step (torchrun: x N)")
    lr: float = Field(0.02, gt=0, description="threshold learning rate")
    multiplier_lr: float = Field(0.01, gt=0, description="gradient ascent on beta and gamma")
    sharpness_start: float = Field(10.0, gt=0, description="n in tanh(n (s - theta)), first step")
    sharpness_end: float = Field(100.0, gt=0, description="n at the last step (annealed)")
    backbone_lr: float | None = Field(None, gt=0, description="also adapt the backbone (small lr)")
    loss: Literal["ce", "kl"] = Field(
        "ce", description="data term: ce = cross-entropy on the labels; kl = KL from the unpruned "
        "model's outputs (no labels, one more forward pass per step)"
    )
    budget: Literal["lagrangian", "projection"] = Field(
        "lagrangian", description="how the MAC budget is held: lagrangian = multipliers by "
        "gradient ascent (v1); projection = every step shifts all thresholds by one amount so the "
        "expected MACs equal the target (the search only reallocates)"
    )
    amp: Literal["auto", "off", "bf16"] = Field(
        "auto", description="backbone autocast: auto = bf16 on GPUs that have it; thresholds fp32"
    )


class SensitivityConfig(Section):
    """``prune.ranking: sensitivity``: per-block budgets from measured loss (prune/sensitivity.py).

    Every (block, unit type) is cut alone to each kept count of a grid in the criterion's order,
    and the KL from the original's outputs measured on a fixed, seeded set of train images; the
    per-block counts with the least summed KL at the MAC budget are then solved for exactly.
    """

    images: int = Field(1000, gt=0, description="train images every cut is measured on (torchrun:"
                        " split over the processes)")
    batch_size: int = Field(250, gt=0, description="images per forward pass, per process")
    mlp_step: int = Field(32, gt=0, description="MLP widths measured every this many neurons "
                          "(interpolated between); every head count is measured")
    refine: int = Field(1, ge=0, description="re-measure around the chosen budgets and solve "
                        "again, up to this many times")


class LatencyConfig(Section):
    """``prune.latency``: the latency model a ``target_latency_ms`` is planned with.

    Every (heads kept, MLP width) of every distinct block shape is exported to ONNX and timed on
    ``runtime`` at ``batch``, interleaved against the full block, in ``rounds`` rounds (the ratio
    of medians and its spread); the table is cached by architecture, runtime, precision, batch,
    threads and device fingerprint (docs/method.md, "Latency budgets").
    """

    runtime: LatencyRuntime = Field(
        "onnxruntime-cpu", description="what the table is measured on: onnxruntime-cpu here, "
        "onnxruntime-cuda on a GPU host, tensorrt on the device (a latency bundle)")
    precision: Literal["fp32", "fp16"] = Field(
        "fp32", description="tensorrt only: the engines' precision (onnxruntime runs fp32)")
    batch: int = Field(1, gt=0, description="images per call the latency is planned for")
    threads: int = Field(1, gt=0, description="onnxruntime-cpu intra-op threads: 1 holds still "
                         "on a small shared machine (docs/benchmarks.md, issue 17)")
    mlp_step: int | None = Field(None, gt=0, description="MLP widths on the grid every this many "
                                 "neurons; null: prune.round_mlp_to (must be a multiple of it)")
    warmup: int = Field(3, ge=0, description="untimed calls per grid point and runner")
    iters: int = Field(15, gt=0, description="timed calls per grid point, over all rounds")
    rounds: int = Field(3, gt=0, description="interleaved rounds: the spread of their ratios "
                        "says how stable a figure is")
    max_spread: float = Field(0.05, gt=0, lt=1, description="a point whose ratio spread over "
                              "rounds (half-range / median) exceeds this is re-measured, then "
                              "marked unstable")
    validation_models: int = Field(5, ge=0, description="whole pruned models of different shapes "
                                   "whose measured latency checks the table's prediction")
    table: InputFile = Field(None, description="a table measured elsewhere (the device's "
                             "latency_table/table.json); checked against this model and runtime")
    cache: bool = Field(True, description="reuse and store tables in XPDEPLOY_CACHE "
                        "(default ~/.cache/xpdeploy)/latency_tables")

    @model_validator(mode="after")
    def _precision_of_runtime(self) -> LatencyConfig:
        if self.precision != "fp32" and self.runtime != "tensorrt":
            raise ValueError(f"precision {self.precision!r} is for runtime 'tensorrt'; "
                             f"{self.runtime} runs fp32")
        return self


class PruneConfig(Section):
    """``prune``: scores of one criterion -> kept heads and neurons at an exact MAC budget."""

    criterion: Literal["xpruner", "xpruner_taylor", "magnitude", "taylor", "random"] = "xpruner"
    target_gmacs: float | None = Field(None, gt=0, description="kept MACs per image, in 1e9")
    target_ratio: float | None = Field(None, gt=0, lt=1, description="kept / original MACs")
    target_latency_ms: float | None = Field(
        None, gt=0, description="ms per batch of prune.latency.batch on prune.latency.runtime, "
        "planned with a measured latency table (ranking: sensitivity)")
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    ranking: Literal["global", "threshold", "sensitivity"] = Field(
        "sensitivity", description="how the MAC budget is split over blocks: measured KL per "
        "block (sensitivity, the default by evidence: docs/benchmarks.md, issue 15), one queue of "
        "normalised scores (global), learned thresholds (threshold)")
    mask_score: Literal["auto", "sum", "coverage"] = Field(
        "auto", description="how the mask criteria order units: sum over classes of |mask| "
        "(comparable across blocks), coverage (each class's best units first; within a block "
        "only); auto = coverage under ranking: sensitivity, sum otherwise")
    normalize: Literal["type", "block", "none"] = "type"
    min_heads_per_block: int = Field(1, ge=1)
    round_mlp_to: int = Field(8, ge=1, description="kept MLP widths are multiples of this")
    min_mlp_per_block: int = Field(8, ge=1, description="floor on every block's MLP width")
    block_floors: dict[int, tuple[int, int]] | None = Field(
        None, description="per-block floors: {block index: [min heads, min MLP width]}"
    )
    tolerance: float = Field(0.005, gt=0, lt=0.5, description="accepted shortfall below target")
    taylor_images: int = Field(1280, gt=0, description="taylor: train images for the gradients")
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    plan_file: InputFile = Field(
        None, description="replay a saved plan.json (kept units per block) instead of planning"
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        if self.plan_file is not None:
            if self.target_gmacs is not None or self.target_ratio is not None \
                    or self.target_latency_ms is not None:
                raise ValueError("'plan_file' replays a plan: drop target_gmacs / target_ratio / "
                                 "target_latency_ms")
        elif sum(t is not None for t in (self.target_gmacs, self.target_ratio,
                                         self.target_latency_ms)) != 1:
            raise ValueError("set exactly one of 'target_gmacs', 'target_ratio' and "
                             "'target_latency_ms'")
        if self.target_latency_ms is not None and self.ranking != "sensitivity":
            raise ValueError(f"'target_latency_ms' is spent per block by the measured allocator; "
                             f"use 'ranking: sensitivity' (not {self.ranking!r})")
        step = self.latency.mlp_step
        if step is not None and step % self.round_mlp_to:
            raise ValueError(f"latency.mlp_step {step} must be a multiple of round_mlp_to "
                             f"({self.round_mlp_to}): the grid holds the widths a plan may keep")
        if self.mask_score == "coverage" and self.ranking != "sensitivity":
            raise ValueError(f"'mask_score: coverage' orders units within a block only, so "
                             f"ranking {self.ranking!r} would cut every block alike; use "
                             f"'ranking: sensitivity' or 'mask_score: sum'")
        return self

    @property
    def effective_mask_score(self) -> Literal["sum", "coverage"]:
        """What ``mask_score: auto`` means for this ranking: coverage where only the order
        inside a block counts (sensitivity), the sum where scores meet across blocks."""
        if self.mask_score != "auto":
            return self.mask_score
        return "coverage" if self.ranking == "sensitivity" else "sum"


class FinetuneConfig(TrainConfig):
    """``finetune``: recovery training of the pruned model, distilled from the original."""

    distill: Literal["none", "soft", "hard"] = Field(
        "soft", description="knowledge distillation from the original model"
    )
    distill_weight: float = Field(0.5, ge=0, le=1, description="share of the KD term in the loss")
    temperature: float = Field(2.0, gt=0, description="soft distillation temperature")


class ExportOnnxConfig(Section):
    """``export_onnx``: opset, trace batch and the torch-vs-onnxruntime parity tolerance."""

    opset: int = Field(17, ge=13, le=23)
    trace_batch: int = Field(2, gt=0, description="batch used for tracing (>1: axis stays dynamic)")
    dynamic_batch: bool = True
    parity_atol: float = Field(1e-4, gt=0, description="max abs logit difference allowed")


class SimplifyConfig(Section):
    """``simplify``: onnxsim, then parity of the simplified vs the exported graph."""

    parity_atol: float = Field(1e-4, gt=0)
    skip_fuse_bn: bool = False


class GatesConfig(Section):
    """Pass/fail limits per candidate vs the original. ``null`` turns a gate off."""

    max_top1_drop: float | None = Field(0.5, ge=0, description="percentage points")
    min_top1: float | None = Field(None, ge=0, le=100, description="floor on the candidate's own "
                                   "top-1 on the verification set, in %")
    min_agreement: float | None = Field(0.99, ge=0, le=1, description="share of equal top-1")
    max_abs_diff: float | None = Field(1e-3, gt=0, description="max abs logit difference")
    min_cosine: float | None = Field(0.999, ge=-1, le=1)
    min_speedup: float | None = Field(None, gt=0, description="original p50 / candidate p50")


class VerifyConfig(Section):
    """``verify``: the same cached batches through every runner; interleaved latency."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    warmup: int = Field(5, ge=0, description="untimed iterations per runner and batch size")
    iters: int = Field(30, gt=0, description="timed iterations per runner and batch size, "
                       "split over the rounds (ceil(iters / rounds) calls per round)")
    rounds: int = Field(5, gt=0, description="interleaved rounds per batch size: each gives a "
                        "ratio of medians, the speedup is their median and their spread says "
                        "how stable it is")
    max_spread: float = Field(0.10, gt=0, lt=1, description="a speedup whose rounds disagree by "
                              "more than this (half-range / median, 0.10 = +-10%) is marked "
                              "unstable and fails min_speedup")
    threads: int | None = Field(1, gt=0, description="CPU threads for every runner; null: every "
                                "CPU this process may use. 1 holds still on a small shared "
                                "machine (with 2 threads on 2 cores one file measured 2.5 to "
                                "10.8 ms minutes apart, issue 17); set it to the deployment's "
                                "thread count when that is what you ship")
    gates: GatesConfig = Field(default_factory=GatesConfig)
    pruned_gates: GatesConfig = Field(
        default_factory=lambda: GatesConfig(
            max_top1_drop=5.0, min_agreement=None, max_abs_diff=None, min_cosine=None
        ),
        description="gates of the pruned model's candidates vs the original (accuracy, speed)",
    )
    engine_gates: GatesConfig = Field(
        default_factory=lambda: GatesConfig(
            max_top1_drop=1.0, min_agreement=0.97, max_abs_diff=None, min_cosine=0.99
        ),
        description="gates of the original's fp16 / int8 TensorRT engines vs the original: "
        "reduced precision moves logits by more than max_abs_diff's 1e-3 (the pruned model's "
        "engines keep pruned_gates)",
    )
    max_export_diff: float | None = Field(
        1e-3, gt=0, description="every ONNX candidate vs its own torch model: max abs logit diff"
    )
    max_latency_miss: float | None = Field(
        0.10, gt=0, description="prune.target_latency_ms: the pruned model may measure at most "
        "this fraction above its target (0.10 = 10%) or the run fails; null: report only")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of positive integers")
        return sorted(set(v))


class ReportConfig(Section):
    """``report``: report.json, report.md and PNG plots at the run folder's root."""

    title: str | None = None
    plots: bool = True


class BuildEngineConfig(Section):
    """TensorRT target settings, read by :func:`xpdeploy.engine.settings.plan_builds`.

    Engines: one static engine per entry of ``batch_sizes`` (min = opt = max), or, when
    ``profiles`` is set, one engine per (min, opt, max) batch range, which then replaces
    ``batch_sizes``. ``best`` builds an fp16 and an int8 engine and ``verify`` keeps the faster
    one that passes its gates (:mod:`xpdeploy.verify.accelerators`).
    """

    precision: Literal["fp32", "fp16", "int8", "best"] = "fp16"
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1],
        description="one static engine per batch size (images); ignored when profiles is set",
    )
    profiles: list[tuple[int, int, int]] | None = Field(
        None,
        description="dynamic batch ranges [min, opt, max] (images), one engine each; replaces "
        "batch_sizes when set",
    )
    workspace_mb: int = Field(1024, gt=0, description="builder workspace pool limit, MiB")
    calibration: CalibrationFile = Field(
        None, description="calibration set manifest for int8 (or its preprocessed .npz)"
    )
    calibrator: Literal["minmax", "entropy2"] = "minmax"
    calibration_batch_size: int | None = Field(
        None, gt=0, description="images per int8 calibration batch; null (default): each int8 "
        "engine's opt batch, the shape TensorRT reads calibration batches at (a last partial "
        "batch is dropped); a value must equal every engine's opt batch"
    )
    layernorm_fp32: Literal["auto", "on", "off"] = Field(
        "auto",
        description="pin LayerNorm layers to fp32: auto = where the TensorRT version needs it",
    )
    timing_cache: UserPath = Field(
        None,
        description="TensorRT timing cache file, read before and written after each build; "
        "default: a per-device file in the run folder",
    )
    engine_cache: UserPath = Field(
        None,
        description="folder of built engines reused when ONNX digest, TensorRT version, device, "
        "precision, profiles and calibration digest all match; null: the run folder's own "
        "engine_cache/ (a rerun or resumed run reuses its plans; other runs do not)",
    )
    device: str | None = Field(None, description="e.g. 'orin-nano' (informational)")
    required: bool = Field(False, description="error (not a bundle) when TensorRT is absent")

    @field_validator("profiles", mode="before")
    @classmethod
    def _three_per_profile(cls, v: Any) -> Any:
        # Before the tuple check, whose wording ("profiles.0.2: required key is missing") hides
        # what a profile is.
        if isinstance(v, list | tuple):
            for p in v:
                if isinstance(p, list | tuple) and len(p) != 3:
                    raise ValueError(
                        f"profile {list(p)} needs three batch sizes [min, opt, max] (images)"
                    )
        return v

    @field_validator("profiles")
    @classmethod
    def _ordered_profiles(
        cls, v: list[tuple[int, int, int]] | None
    ) -> list[tuple[int, int, int]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("profiles must hold at least one [min, opt, max]; or use null")
        for lo, mid, hi in v:
            if not 0 < lo <= mid <= hi:
                raise ValueError(
                    f"profile [{lo}, {mid}, {hi}] needs 0 < min <= opt <= max (batch, images)"
                )
        return v

    @model_validator(mode="after")
    def _calibration_at_the_engine_batch(self) -> BuildEngineConfig:
        # TensorRT's implicit calibration reads each batch at the calibration profile's opt shape,
        # which is the engine's: a batch of another size is read in part, or past its end.
        if self.calibration_batch_size is None or self.precision not in ("int8", "best"):
            return self
        opt = sorted({p[1] for p in self.profiles} if self.profiles else set(self.batch_sizes))
        if opt != [self.calibration_batch_size]:
            where = "profiles' opt" if self.profiles else "batch_sizes"
            raise ValueError(
                f"calibration_batch_size {self.calibration_batch_size} differs from the int8 "
                f"engines' batch {', '.join(map(str, opt))} ({where}): TensorRT reads "
                "calibration batches at each engine's opt batch; remove calibration_batch_size "
                "(it then follows each engine; on a bundle: --set "
                "build_engine.calibration_batch_size=null)"
            )
        return self

    def layernorm_override(self) -> bool | None:
        """``layernorm_fp32`` as :func:`~xpdeploy.engine.settings.plan_builds` takes it.

        None (auto: follow the TensorRT version rule), True (on) or False (off).
        """
        return {"auto": None, "on": True, "off": False}[self.layernorm_fp32]


class PipelineSpec(Section):
    """A whole pipeline file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the default run folder")
    description: str = ""
    seed: int = 0
    stages: list[str] | None = Field(None, description="default: load, [train], export ... report")
    model: ModelConfig
    data: DataConfigSection
    load: LoadConfig = Field(default_factory=LoadConfig)
    train: TrainConfig | None = None
    learn_masks: LearnMasksConfig = Field(default_factory=LearnMasksConfig)
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    export_onnx: ExportOnnxConfig = Field(default_factory=ExportOnnxConfig)
    simplify: SimplifyConfig = Field(default_factory=SimplifyConfig)
    build_engine: BuildEngineConfig | None = None
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for s in v:
            if s not in STAGE_ORDER:
                raise ValueError(f"unknown stage '{s}'{_did_you_mean(s, STAGE_ORDER)}")
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return sorted(v, key=STAGE_ORDER.index)

    def stage_list(self) -> list[str]:
        """The stages this pipeline runs, in order."""
        if self.stages is not None:
            return list(self.stages)
        default = ["load", "export_onnx", "simplify", "verify", "report"]
        if self.train is not None:
            default.insert(1, "train")
        if self.prune is not None:
            at = default.index("export_onnx")
            extra = (["learn_masks", "prune"] if self.prune.criterion in MASK_CRITERIA
                     else ["prune"])
            default[at:at] = extra + (["finetune"] if self.finetune is not None else [])
            if self.prune.target_latency_ms is not None:
                at = default.index("learn_masks" if "learn_masks" in default else "prune")
                default[at:at] = ["latency_blocks", "latency_table"]
        return default

    def check_runnable(self) -> None:
        """Refuse a stage without its section, or without the stage whose output it needs."""
        stages = self.stage_list()
        for stage in ("train", "prune", "finetune", "build_engine"):
            if stage in stages and getattr(self, stage) is None:
                raise ConfigError(
                    f"stage '{stage}' is listed but the pipeline has no '{stage}:' section"
                )
        if (
            "prune" in stages
            and self.prune is not None
            and self.prune.criterion in MASK_CRITERIA
            and self.prune.plan_file is None
            and "learn_masks" not in stages
        ):
            raise ConfigError(
                f"prune.criterion {self.prune.criterion!r} needs the 'learn_masks' stage; add it "
                "to 'stages' or choose criterion magnitude, taylor or random"
            )
        if (self.prune is not None and self.prune.target_latency_ms is not None
                and "prune" in stages and "latency_table" not in stages):
            raise ConfigError("prune.target_latency_ms plans with a latency table; add "
                              "'latency_blocks' and 'latency_table' to 'stages' (before 'prune')")
        for stage, needs in STAGE_NEEDS.items():
            if stage in stages and needs not in stages:
                raise ConfigError(f"stage '{stage}' needs '{needs}' in 'stages'; add it")


# --------------------------------------------------------------------------------------------------
# Reading, interpolation, overrides


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _interpolate(node: Any, where: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of the YAML tree."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def repl(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        value = os.environ.get(var)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(
                    f"{where or 'pipeline'}: environment variable {var} is not set; export it, "
                    f"or give a default as ${{{var}:-VALUE}}"
                )
            return default
        return value

    out = _ENV.sub(repl, node)
    # A value that was only a reference is re-read as YAML so "${EPOCHS:-3}" becomes the int 3.
    if out != node and _ENV.fullmatch(node):
        try:
            return yaml.safe_load(out) if out else out
        except yaml.YAMLError:
            return out
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY.PATH=VALUE, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set '{text}': empty key in '{key}'; use dotted names like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {'.'.join(parts)}: '{where}' is a value, not a section")
    node[parts[-1]] = value


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for 'did you mean' suggestions)."""
    model: Any = PipelineSpec
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = ann if isinstance(ann, type) else next(
            (a for a in args if issubclass(a, BaseModel)), None
        )
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping (a section of keys)",
    "list": "a list",
    "tuple": "a list",
}


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    path = ".".join(str(p) for p in loc) or "pipeline"
    kind, got = err["type"], err.get("input")
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in loc[:-1])
        owner = _section_model(loc)
        hint = _did_you_mean(loc[-1], owner.model_fields) if owner else ""
        place = f"in section '{section}'" if section else "at the top level"
        return f"unknown key '{loc[-1]}' {place}{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        choices = re.findall(r"'([^']*)'", allowed)
        return f"{path}: {got!r} is not one of {allowed}{_did_you_mean(got, choices)}"
    base = kind.split("_")[0]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        want = _TYPE_WORDS.get(base, base)
        return f"{path}: expected {want}, got {got!r} ({type(got).__name__})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {got!r})" if kind != "value_error" else f"{path}: {msg}"


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [_describe(e) for e in exc.errors()]
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return f"{source}: " + "; ".join(lines[:3]) + more


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    """Read, interpolate, override and validate a pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist; see pipelines/ for examples")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name:, model:, data:, ...)")
    raw = _interpolate(raw, "")
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(raw, parts, value)
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, str(path))) from None


def dump_spec(spec: PipelineSpec) -> str:
    """The resolved pipeline as YAML (every default filled in), for the run folder and validate."""
    data = spec.model_dump(mode="json")
    data["stages"] = spec.stage_list()
    return yaml.safe_dump(data, sort_keys=False)
