"""Accuracy and logits of a torch model over a data split."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xpdeploy.progress import progress

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset


def evaluate_top1(
    model: nn.Module, dataset: Dataset, *, batch_size: int, workers: int = 0, label: str = "eval"
) -> float:
    """Top-1 accuracy in percent of ``model`` on every sample of ``dataset``."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    was_training = model.training
    model.eval()
    correct = seen = 0
    with torch.inference_mode(), progress(len(loader), label) as advance:
        for pixels, labels in loader:
            pred = model(pixels.float()).argmax(dim=1)
            correct += int((pred == labels).sum())
            seen += int(labels.numel())
            advance()
    model.train(was_training)
    return 100.0 * correct / max(seen, 1)
