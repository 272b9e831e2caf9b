"""Accuracy of a torch model over a data split, sharded over ranks under torchrun."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xpdeploy import distributed
from xpdeploy.progress import progress

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset


def evaluate_top1(
    model: nn.Module, dataset: Dataset, *, batch_size: int, workers: int = 0, label: str = "eval",
    sharded: bool = False,
) -> float:
    """Top-1 accuracy in percent of ``model`` on every sample of ``dataset``.

    ``sharded`` (collective: every rank must call it): under torchrun each rank evaluates every
    N-th sample (rank r: r, r + N, ...) and the counts are summed, so every sample counts once
    and every rank gets the same figure. Unsharded, the caller's rank evaluates everything alone.
    Inputs go to the device of the model's parameters.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    n = len(dataset)  # type: ignore[arg-type]
    step = distributed.world_size() if sharded else 1
    shard = Subset(dataset, range(distributed.rank() if sharded else 0, n, step))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = seen = 0
    with torch.inference_mode(), progress(len(loader), label) as advance:
        for pixels, labels in loader:
            pred = model(pixels.float().to(device)).argmax(dim=1).cpu()
            correct += int((pred == labels).sum())
            seen += int(labels.numel())
            advance()
    model.train(was_training)
    if sharded:
        correct, seen = distributed.all_reduce_sum([correct, seen])
    return 100.0 * correct / max(seen, 1)
