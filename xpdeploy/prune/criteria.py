"""Baseline importance criteria: every one returns :class:`UnitScores` (higher = more important).

They plug into the same planner as the x-pruner masks, so every comparison in the benchmark is at
equal MACs through the same surgery (docs/method.md, "Other criteria"). One array per block: heads
``(H_b,)`` and MLP neurons ``(M_b,)``, float64 (the planner normalises them per unit type).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from xpdeploy.errors import PruneError
from xpdeploy.models.unit_sites import UnitSite, gated_units, unit_sites
from xpdeploy.progress import progress
from xpdeploy.prune.unit_scores import UnitScores

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Criterion names a pipeline may set in ``prune.criterion``. ``xpruner`` scores come from the
#: learned class-wise masks (stage ``learn_masks``), not from this module; ``xpruner_taylor``
#: combines them with Taylor scores (:func:`hybrid_scores`).
CRITERIA: tuple[str, ...] = ("xpruner", "xpruner_taylor", "magnitude", "taylor", "random")


def magnitude_scores(model: nn.Module) -> UnitScores:
    """L1 norm of each unit's weights; needs no data.

    A head owns rows ``h*hd:(h+1)*hd`` of each of the q, k and v blocks (``attn_dim`` rows each) of
    the fused ``qkv.weight`` and the same columns of ``proj.weight``; a neuron owns its row of
    ``fc1.weight`` and its column of ``fc2.weight``. Biases are not counted (a bias is not
    multiplied by anything the unit receives). Units: sum of absolute weight values.
    """
    import torch

    heads, neurons = [], []
    with torch.no_grad():
        for site in unit_sites(model):
            hd, nh = site.head_dim, site.heads
            attn_dim = nh * hd
            qkv = site.attn.qkv.weight.detach().abs().double()  # (3 * attn_dim, D)
            proj = site.attn.proj.weight.detach().abs().double()  # (D, attn_dim)
            if qkv.shape[0] != 3 * attn_dim or proj.shape[1] != attn_dim:
                raise PruneError(
                    f"block {site.index}: qkv has {qkv.shape[0]} rows and proj {proj.shape[1]} "
                    f"columns, expected {3 * attn_dim} and {attn_dim} ({nh} heads x {hd})"
                )
            # (3, H, hd, D) -> per head: sum over q/k/v, its hd rows and the input width.
            qkv_per_head = qkv.reshape(3, nh, hd, -1).sum(dim=(0, 2, 3))
            proj_per_head = proj.reshape(proj.shape[0], nh, hd).sum(dim=(0, 2))
            heads.append((qkv_per_head + proj_per_head).cpu().numpy())
            fc1 = site.mlp.fc1.weight.detach().abs().double()  # (M, D)
            fc2 = site.mlp.fc2.weight.detach().abs().double()  # (D, M)
            neurons.append((fc1.sum(dim=1) + fc2.sum(dim=0)).cpu().numpy())
    return UnitScores(heads=heads, neurons=neurons)


def taylor_scores(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_images: int,
) -> UnitScores:
    """First-order Taylor importance ``|activation x gradient|`` of each unit, per image.

    Every unit's output is multiplied by a gate of ones, one gate per sample (``(B, units)``,
    requires grad). ``dL_n/dgate`` is the sum over the unit's channels and tokens of
    ``a * dL_n/da`` for sample n, i.e. the first-order change of that sample's loss when the unit
    is removed; its absolute value is summed over samples (per-sample, so opposite-signed samples do
    not cancel) and divided by the image count. The loss is cross-entropy on the true labels,
    summed over the batch so each sample's gradient is its own (not scaled by 1/B).

    The model runs in eval mode (no dropout); only the gates get gradients, so the parameters are
    neither updated nor given ``.grad``. Stops after ``max_images`` images (the last batch is cut).
    Units of the result: nats per image.
    """
    import torch
    import torch.nn.functional as F

    if max_images <= 0:
        raise PruneError(f"taylor: max_images must be positive, got {max_images}")
    sites = unit_sites(model)
    device = next(model.parameters()).device
    head_sum = [torch.zeros(s.heads, dtype=torch.float64, device=device) for s in sites]
    neuron_sum = [torch.zeros(s.mlp_hidden, dtype=torch.float64, device=device) for s in sites]
    was_training = model.training
    model.eval()
    seen = 0
    gates: dict[str, list[torch.Tensor]] = {}
    try:
        with progress(max_images, "taylor") as advance, _gated_per_sample(model, gates):
            for x, y in batches:
                take = min(int(x.shape[0]), max_images - seen)
                if take <= 0:
                    break
                x, y = x[:take].to(device), torch.as_tensor(y[:take]).to(device)
                gates["heads"] = [torch.ones(take, s.heads, device=device, requires_grad=True)
                                  for s in sites]
                gates["neurons"] = [torch.ones(take, s.mlp_hidden, device=device,
                                               requires_grad=True) for s in sites]
                loss = F.cross_entropy(model(x), y, reduction="sum")
                grads = torch.autograd.grad(loss, [*gates["heads"], *gates["neurons"]])
                n = len(sites)
                for b in range(n):
                    head_sum[b] += grads[b].abs().sum(dim=0).double()
                    neuron_sum[b] += grads[n + b].abs().sum(dim=0).double()
                seen += take
                advance(take, loss=float(loss.detach()) / take)
                if seen >= max_images:
                    break
    finally:
        model.train(was_training)
    if seen == 0:
        raise PruneError("taylor: the batches held no images; the train split is empty")
    return UnitScores(heads=[(t / seen).cpu().numpy() for t in head_sum],
                      neurons=[(t / seen).cpu().numpy() for t in neuron_sum])


def _gated_per_sample(
    model: nn.Module, gates: dict[str, list[torch.Tensor]]
) -> contextlib.AbstractContextManager[list[UnitSite]]:
    """``gated_units`` reading the current per-sample gates from ``gates`` (filled per batch)."""
    return gated_units(model, heads=lambda b: gates["heads"][b],
                       neurons=lambda b: gates["neurons"][b])


def random_scores(heads: list[int], mlp: list[int], seed: int) -> UnitScores:
    """Uniform [0, 1) scores from ``seed``: the floor every criterion must beat."""
    rng = np.random.default_rng(seed)
    h = [rng.uniform(size=int(n)) for n in heads]
    m = [rng.uniform(size=int(n)) for n in mlp]
    return UnitScores(heads=h, neurons=m)


def hybrid_scores(a: UnitScores, b: UnitScores) -> UnitScores:
    """Geometric mean of two criteria, each first normalised by unit type: sqrt(a / mean_a x b /
    mean_b) per unit.

    ``xpruner_taylor`` = the X-Pruner mask scores with the Taylor scores: a unit ranks low when
    either says it matters little (a product, not a sum, so neither scale dominates and a unit one
    criterion calls useless is not rescued by the other). Each is normalised per type first so
    head and neuron scores of both criteria are on one scale (mean 1); the result is
    dimensionless.
    """
    na, nb = a.normalized("type"), b.normalized("type")

    def combine(x: list[np.ndarray], y: list[np.ndarray]) -> list[np.ndarray]:
        pairs = zip(x, y, strict=True)
        return [np.sqrt(np.clip(p, 0, None) * np.clip(q, 0, None)) for p, q in pairs]

    return UnitScores(heads=combine(na.heads, nb.heads), neurons=combine(na.neurons, nb.neurons))
