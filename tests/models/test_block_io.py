"""models/block_io: every block's input and the rest of the forward from it equal model(x)."""

from __future__ import annotations

import pytest
import timm
import torch

from tests.conftest import TINY_MODEL, TINY_SWIN
from xpdeploy.models.block_io import block_inputs, forward_from_block
from xpdeploy.models.unit_sites import transformer_blocks


@pytest.mark.parametrize("arch", [TINY_MODEL, TINY_SWIN], ids=["vit", "swin"])
def test_the_rest_of_the_forward_from_any_block_gives_the_models_logits(arch) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch["name"], **arch["kwargs"]).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        logits, inputs = block_inputs(model, x)
        assert torch.equal(logits, full)
        assert len(inputs) == len(transformer_blocks(model))
        for b, block_input in enumerate(inputs):
            assert torch.allclose(forward_from_block(model, b, block_input), full, atol=1e-6), b


def test_a_block_index_outside_the_model_is_refused() -> None:
    model = timm.create_model(TINY_MODEL["name"], **TINY_MODEL["kwargs"]).eval()
    with pytest.raises(IndexError, match="block 2 of a model with 2 transformer blocks"):
        forward_from_block(model, 2, torch.zeros(1, 17, 32))
