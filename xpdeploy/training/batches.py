"""Seeded batches for the search loops: endless streams (taylor, thresholds) and one fixed set
(sensitivity)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset


def shuffled_batches(
    dataset: Dataset, batch_size: int, *, seed: int, workers: int = 0, rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (pixels, labels) in a fresh seeded order every pass, without end.

    Pass p takes this rank's share of :func:`rank_shard` (epoch = p), so under torchrun every rank
    draws its own disjoint part of one global order, with ``batch_size`` images **per rank**: N
    ranks with batch b see, step by step, the images one process sees with batch N * b (when the
    split divides evenly). Every rank gets as many batches per pass (the sampler pads), so ranks
    stepping together never wait on a rank that has run dry.
    """
    from torch.utils.data import DataLoader

    n = len(dataset)  # type: ignore[arg-type]
    epoch = 0
    while True:
        order = rank_shard(n, per_epoch=None, seed=seed, epoch=epoch, rank=rank,
                           world_size=world_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers)
        for pixels, labels in loader:
            yield pixels.float(), labels
        epoch += 1


def fixed_images(
    dataset: Dataset, images: int, batch_size: int, *, seed: int, workers: int = 0, rank: int = 0,
    world_size: int = 1,
) -> list[torch.Tensor]:
    """One fixed, seeded set of ``images`` images (pixels only), as this rank's batches.

    The first ``images`` of epoch 0's global order (:func:`rank_shard`), so a world of one and a
    world of N hold the same images, split (exactly when N divides ``images``). For measurements
    repeated on the same images (the sensitivity curves); held in memory.
    """
    from torch.utils.data import DataLoader

    mine = rank_shard(len(dataset), per_epoch=images, seed=seed, epoch=0, rank=rank,  # type: ignore[arg-type]
                      world_size=world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=mine, num_workers=workers)
    return [pixels.float() for pixels, _ in loader]


def rank_shard(n: int, *, per_epoch: int | None, seed: int, epoch: int, rank: int = 0,
               world_size: int = 1) -> list[int]:
    """This rank's sample indices for ``epoch``: a seeded permutation of ``range(n)``, sharded.

    torch's ``DistributedSampler`` (seeded with ``seed + epoch``, padded so every rank gets as
    many) does the permuting and sharding, so a world of one and a world of N see the same global
    order: rank r takes positions r, r + N, r + 2N, ... The optional ``per_epoch`` cap keeps the
    first ``ceil(per_epoch / N)`` of each shard, i.e. a fresh random subset of about ``per_epoch``
    images per epoch over all ranks.
    """
    import math

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    if per_epoch is not None:
        indices = indices[: math.ceil(min(per_epoch, n) / world_size)]
    return indices
