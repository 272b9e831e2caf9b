"""Seeded, endless streams of training batches for the search loops (taylor, thresholds)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset


def shuffled_batches(
    dataset: Dataset, batch_size: int, *, seed: int, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (pixels, labels) in a fresh seeded order every pass, without end."""
    import torch
    from torch.utils.data import DataLoader

    n = len(dataset)  # type: ignore[arg-type]
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(),
                            num_workers=workers)
        for pixels, labels in loader:
            yield pixels.float(), labels
        epoch += 1
