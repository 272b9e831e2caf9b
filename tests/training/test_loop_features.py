"""Training options of issue 4: DDP equivalence, accumulation, EMA, best/last, eval cadence,
mixed precision, the linear lr scaling rule, mixup + distillation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import xpdeploy.training.loop as loop
from tests.conftest import TINY_MODEL
from tests.distributed_utils import run_ranks
from xpdeploy.data.sources import open_split
from xpdeploy.errors import ConfigError
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.spec import (
    DataConfigSection,
    FinetuneConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
)
from xpdeploy.training.checkpoint import BEST_NAME
from xpdeploy.training.distill import Distiller
from xpdeploy.training.precision import autocast_dtype


def _setup(max_images: int | None = None) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(**TINY_MODEL))
    section = DataConfigSection(source="digits", preprocess=PreprocessConfig(size=16, crop_pct=1))
    data_config = resolve_data_config(model, section.preprocess)
    train = open_split(section, data_config, "train", num_classes=10, seed=0)
    val = open_split(section, data_config, "val", num_classes=10, seed=0)
    return model, train, val


def _train(cfg: TrainConfig, tmp: Path, *, val: bool = False, **kw: Any) -> tuple[Any, Any]:
    model, train, val_set = _setup()
    result = loop.train_model(model, train, val_set if val else None, cfg, checkpoint_dir=tmp,
                              fingerprint="f", seed=0, eval_batch_size=128, **kw)
    return model, result


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in model.state_dict().values()])


def _ddp_rank(cfg: TrainConfig, tmp: str) -> tuple[int, list[float], list[dict[str, Any]]]:
    from xpdeploy import distributed

    model, result = _train(cfg, Path(tmp))
    return distributed.rank(), _flat(model).tolist(), result.history


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tmp_path: Path) -> None:
    """DistributedSampler's global order + DDP's gradient averaging: same weights."""
    common = {"epochs": 1, "warmup_epochs": 0.2, "max_images": 512, "threads": 1}
    single, _ = _train(TrainConfig(batch_size=64, **common), tmp_path / "one")
    ranks = run_ranks(_ddp_rank, 2, TrainConfig(batch_size=32, **common), str(tmp_path / "two"))
    (r0, w0, h0), (r1, w1, h1) = ranks
    assert (r0, r1) == (0, 1)
    assert torch.equal(torch.tensor(w0), torch.tensor(w1))  # replicas stay identical
    assert torch.allclose(torch.tensor(w0), _flat(single), atol=2e-5)
    assert h0 == h1 and h0[0]["images_per_rank"] == [256, 256] and h0[0]["images_overlap"] == 0
    assert (tmp_path / "two" / "last.pt").is_file()


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path: Path) -> None:
    common = {"epochs": 1, "warmup_epochs": 0.2, "max_images": 512, "threads": 1}
    full, _ = _train(TrainConfig(batch_size=64, **common), tmp_path / "a")
    acc, result = _train(TrainConfig(batch_size=32, accumulate_steps=2, **common), tmp_path / "b")
    assert torch.allclose(_flat(full), _flat(acc), atol=2e-5)
    assert result.history[0]["images"] == 512


def test_ema_is_the_output_and_both_are_evaluated(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=64, max_images=256, ema_decay=0.9, threads=1)
    model, result = _train(cfg, tmp_path, val=True)
    assert all("val_top1_raw" in h for h in result.history)
    assert result.final_top1 == result.history[-1]["val_top1"]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["ema"][k])
    assert not torch.equal(_flat(model), torch.cat([v.flatten().float()
                                                    for v in state["model"].values()]))


def test_keep_best_outputs_the_best_epoch_and_eval_every_skips_epochs(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=3, batch_size=64, max_images=256, eval_every=2, keep="best",
                      lr=3e-3, threads=1)
    model, result = _train(cfg, tmp_path, val=True)
    assert ["val_top1" in h for h in result.history] == [False, True, True]
    scored = {int(h["epoch"]): h["val_top1"] for h in result.history if "val_top1" in h}
    assert result.best_epoch == max(scored, key=lambda e: scored[e])
    assert result.final_top1 == result.best_top1 == max(scored.values())
    best = torch.load(tmp_path / BEST_NAME, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k])


def test_mixup_cutmix_with_distillation_trains(tmp_path: Path) -> None:
    teacher, _, _ = _setup()
    cfg = FinetuneConfig(epochs=1, batch_size=33, max_images=200, threads=1,
                         augment={"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25})
    _, result = _train(cfg, tmp_path, distiller=Distiller.from_config(teacher, cfg))
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
    assert result.history[0]["images"] == 200


def test_autocast_choice_per_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", gpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16' needs a GPU"):
        autocast_dtype("fp16", cpu)


def test_bf16_autocast_on_cpu_keeps_fp32_weights(tmp_path: Path) -> None:
    model, result = _train(TrainConfig(epochs=1, batch_size=64, max_images=128, amp="bf16",
                                       threads=1), tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))


def test_linear_lr_scaling_is_opt_in() -> None:
    assert loop.effective_lr(TrainConfig(lr=1e-3, batch_size=64)) == 1e-3
    cfg = TrainConfig(lr=1e-3, batch_size=64, accumulate_steps=2, lr_scale_batch=256)
    assert loop.effective_lr(cfg) == pytest.approx(5e-4)
