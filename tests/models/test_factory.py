"""Model creation and checkpoint loading, including every way a checkpoint can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL
from xpdeploy.errors import ModelError
from xpdeploy.models.arch import describe_arch, rebuild_model, save_model
from xpdeploy.models.complexity import count_gmacs, count_params_m
from xpdeploy.models.factory import create_model
from xpdeploy.spec import ModelConfig


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, **kw})


def test_checkpoint_round_trip_and_wrappers(tmp_path: Path) -> None:
    model = create_model(_cfg())
    for name, obj in {
        "plain.pth": model.state_dict(),
        "wrapped.pth": {"model": model.state_dict(), "epoch": 3},
        "ddp.pth": {f"module.{k}": v for k, v in model.state_dict().items()},
    }.items():
        torch.save(obj, tmp_path / name)
        loaded = create_model(_cfg(checkpoint=tmp_path / name))
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(loaded(x), model(x))


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"checkpoint .*nope\.pth does not exist"):
        create_model(_cfg(checkpoint=tmp_path / "nope.pth"))


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a zip or pickle" * 10)
    with pytest.raises(ModelError, match="is not a readable weights file"):
        create_model(_cfg(checkpoint=bad))
    good = tmp_path / "trunc.pth"
    torch.save(create_model(_cfg()).state_dict(), good)
    good.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ModelError, match="is not a readable weights file"):
        create_model(_cfg(checkpoint=good))


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    other = create_model(_cfg(kwargs={**TINY_MODEL["kwargs"], "depth": 3}))
    torch.save(other.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ModelError, match=r"does not fit .*unexpected keys \(blocks\.2\..*another "
                                          r"architecture"):
        create_model(_cfg(checkpoint=tmp_path / "deeper.pth"))


def test_checkpoint_with_other_num_classes(tmp_path: Path) -> None:
    other = create_model(_cfg(kwargs={**TINY_MODEL["kwargs"], "num_classes": 7}))
    torch.save(other.state_dict(), tmp_path / "seven.pth")
    with pytest.raises(ModelError, match=r"head\.weight has shape \[7, 32\] but the model expects "
                                          r"\[10, 32\].*set model\.kwargs\.num_classes: 7"):
        create_model(_cfg(checkpoint=tmp_path / "seven.pth"))


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(ModelError, match="did you mean 'deit_tiny_patch16_224'"):
        create_model(_cfg(name="deit_tiny_patch16_22"))


def test_pretrained_offline_says_to_use_checkpoint(monkeypatch) -> None:
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 does (the library reads the variable once, at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"model\.checkpoint"):
        create_model(ModelConfig(name="deit_tiny_patch16_224", pretrained=True,
                                 kwargs={"num_classes": 10}))


def test_arch_round_trip_is_strict_and_exact(tmp_path: Path) -> None:
    model = create_model(_cfg())
    arch = describe_arch(model, TINY_MODEL["name"], TINY_MODEL["kwargs"])
    assert [(b.heads, b.head_dim, b.mlp_hidden) for b in arch.blocks] == [(2, 16, 128)] * 2
    _, weights = save_model(model, arch, tmp_path)
    again = rebuild_model(arch, weights)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(again(x), model(x))


def test_macs_and_params_match_hand_count() -> None:
    model = create_model(_cfg())
    tokens, dim, hidden, depth = 17, 32, 128, 2
    per_block = tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim
    patch = 16 * (3 * 4 * 4) * dim
    head = dim * 10
    assert count_gmacs(model, (3, 16, 16)) * 1e9 == pytest.approx(depth * per_block + patch + head)
    assert count_params_m(model) == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
