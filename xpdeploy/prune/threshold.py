"""``ranking: threshold`` (v2): learned per-(block, unit type) thresholds under a MAC budget.

method.md, "Stage 2". Each block b has one threshold per unit type, ``theta_h[b]`` for heads and
``theta_n[b]`` for MLP neurons. A unit with normalised score ``s_i`` is multiplied by the soft gate

    g_i = (1 + tanh(n * (s_i - theta))) / 2

(shape ``(units,)``, the same for every sample: no class masks, so training and deployment see the
same model). The expected MACs follow analytically from the gates, because :class:`MacModel` is
linear in each block's head count and MLP width: ``macs([sum g_heads_b], [sum g_neurons_b])``.
With ``R = 1 - expected / original`` (the removed share now) and ``alpha = 1 - target / original``
(the removed share wanted) the loss is

    CE(gated model(x), y) + beta * (alpha - R)^2 + gamma * (alpha - R)

minimised over the thresholds by Adam, while the Lagrange multipliers beta and gamma follow
gradient **ascent** (``beta += multiplier_lr * (alpha - R)^2``, ``gamma += multiplier_lr *
(alpha - R)``), so the pressure toward the budget grows for as long as the budget is missed.

Decisions (ours, where the paper is silent to us):

- **Loss: cross-entropy on the true labels**, not a KL to the unpruned model's logits. The gates
  are shared by every sample, so the label cannot be routed through class-specific units as with
  the stage-1 masks; CE needs no second forward pass of the original model.
- **Sharpness anneals geometrically** from ``sharpness_start`` to ``sharpness_end``:
  ``n_t = n_0 * (n_T / n_0) ** (t / (steps - 1))``. The transition width of the gate is ~1/n, so a
  geometric schedule narrows it by the same factor every step instead of spending most steps
  already sharp (linear).
- **Initial thresholds**: every block starts at the same value per type, the quantile of that
  type's normalised scores (over the whole model) that keeps the share of units the budget allows
  for the blocks' MACs, ``(target - fixed) / (original - fixed)``. Starting from one common value
  keeps the blocks' score differences, so the start is already layer-adaptive.
- The model runs in **eval mode** throughout (no dropout / drop-path noise in the gates' gradient).
- The rate of a block is derived from its thresholds only: kept = units with ``s > theta`` (``g >
  0.5`` at any sharpness); there is no separate free rate variable (it would get no gradient).
- A threshold outside its scores' range gets no gradient (every gate saturated, tanh' = 0), and
  at n = 100 only units within ~0.02 of theta pass gradient: the quantile start puts every
  threshold inside the range; Adam's per-parameter step keeps tiny gradients moving.
- The keep sets from the thresholds then go through the planner's exact-budget greedy repair,
  the same as ``ranking: global``, so the plan meets the target MACs within its tolerance.

**Under torchrun** the search is collective: every rank calls :func:`threshold_search` with the
same scores and target and its own shard of the batches (``shuffled_batches(..., rank=,
world_size=)``; the batch size is per rank). The thresholds (fp32 parameters) and the backbone
live in one module that is wrapped in DDP, so their gradients are averaged over ranks and every
rank takes the same Adam step. The multipliers need no communication: they follow from the
expected MACs, a function of the thresholds and scores only, which are identical on every rank,
so every rank computes the same beta and gamma. The ``ce`` of the history is the mean over all
ranks' images of the step. N ranks with batch b therefore search as one process with batch N x b,
to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xpdeploy import distributed
from xpdeploy.errors import PruneError
from xpdeploy.models.units import gated_units, unit_sites
from xpdeploy.progress import progress
from xpdeploy.prune.planner import PlanConstraints, repair_to_budget, smallest_macs
from xpdeploy.prune.units import KeepSets, UnitScores
from xpdeploy.training.precision import autocast, autocast_dtype

if TYPE_CHECKING:
    from xpdeploy.prune.macs import MacModel
    from xpdeploy.spec import ThresholdConfig

#: Keys of every :attr:`ThresholdResult.history` entry.
HISTORY_KEYS: tuple[str, ...] = (
    "step", "ce", "budget", "R", "R_hard", "n", "beta", "gamma", "macs",
)


@dataclass(frozen=True)
class ThresholdResult:
    """What the threshold search produced.

    ``keep``: kept units after the exact-budget repair (the plan). ``threshold_keep``: the units
    with ``s > theta`` before the repair (how far the thresholds alone were from the budget).
    ``thresholds[b] = (head theta, neuron theta)`` in normalised-score units. ``history``: one
    entry per step with :data:`HISTORY_KEYS` (``ce`` in nats, ``R`` the expected removed share of
    MACs from the soft gates, ``R_hard`` the removed share of the hard ``s > theta`` sets at that
    step (before the update; how far the relaxation is from the deployed structure), ``n`` the
    sharpness, ``beta``/``gamma`` the multipliers used at that step, ``macs`` the
    expected MACs per image). ``alpha``: the removed share the target asks for.
    ``backbone_adapted``: True when the backbone weights were trained (``backbone_lr`` set): the
    caller's model was modified in place.
    """

    keep: KeepSets
    threshold_keep: KeepSets
    thresholds: list[tuple[float, float]]
    history: list[dict[str, float]]
    alpha: float
    backbone_adapted: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "keep": self.keep.to_json(),
            "threshold_keep": self.threshold_keep.to_json(),
            "thresholds": [{"heads": h, "neurons": n} for h, n in self.thresholds],
            "history": self.history,
            "alpha": self.alpha,
            "backbone_adapted": self.backbone_adapted,
        }


def sharpness(step: int, steps: int, start: float, end: float) -> float:
    """Geometric anneal of n: ``start`` at step 0, ``end`` at step ``steps - 1``."""
    if steps <= 1:
        return float(end)
    return float(start * (end / start) ** (step / (steps - 1)))


def initial_thresholds(
    scores: UnitScores, macs: MacModel, target_macs: float
) -> tuple[float, float]:
    """(head theta, neuron theta): the per-type score quantile that keeps the budget's share.

    The blocks' share of MACs that the target leaves, ``(target - fixed) / (original - fixed)``,
    is kept of each unit type, counted over the whole model (scores normalised, so unitless).
    """
    keep_share = (target_macs - macs.fixed) / (macs.original - macs.fixed)
    keep_share = float(np.clip(keep_share, 0.0, 1.0))
    heads = np.concatenate([np.asarray(t, dtype=np.float64) for t in scores.heads])
    neurons = np.concatenate([np.asarray(t, dtype=np.float64) for t in scores.neurons])
    return (float(np.quantile(heads, 1.0 - keep_share)),
            float(np.quantile(neurons, 1.0 - keep_share)))


def _batches_forever(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Restart a re-iterable (a DataLoader) when it runs out; refuse a spent one-shot iterator."""
    it = iter(batches)
    done = 0
    while True:
        try:
            yield next(it)
            done += 1
        except StopIteration:
            it = iter(batches)
            try:
                yield next(it)
                done += 1
            except StopIteration:
                raise PruneError(
                    f"threshold search: the train batches ran out after {done} of {steps} steps; "
                    "pass a re-iterable loader (a DataLoader) or lower prune.threshold.steps"
                ) from None


def _check_shapes(model: nn.Module, scores: UnitScores, macs: MacModel) -> None:
    sites = unit_sites(model)
    heads = [s.heads for s in sites]
    mlp = [s.mlp_hidden for s in sites]
    got_h = [len(t) for t in scores.heads]
    got_m = [len(t) for t in scores.neurons]
    if got_h != heads or got_m != mlp:
        raise PruneError(
            f"scores cover heads {got_h} and neurons {got_m} per block but the model has heads "
            f"{heads} and MLP widths {mlp}; compute the scores on this model"
        )
    if list(macs.heads) != heads or list(macs.mlp) != mlp:
        raise PruneError(
            f"the MAC model was measured on heads {list(macs.heads)} / MLP {list(macs.mlp)}, the "
            f"model has {heads} / {mlp}; measure it on the unpruned model"
        )


class GatedThresholds(nn.Module):
    """The backbone with its heads and neurons gated by per-block thresholds (what DDP wraps).

    ``theta_h`` / ``theta_n`` (fp32, shape (blocks,), normalised-score units) are parameters and
    the backbone a submodule, so that DDP averages the gradients of the thresholds, and of the
    backbone's weights when they train. The scores and the MAC model are constants held as plain
    attributes (buffers would be re-broadcast by DDP every step).
    """

    def __init__(self, model: nn.Module, scores: UnitScores, macs: MacModel,
                 initial: tuple[float, float]) -> None:
        super().__init__()
        device = next(model.parameters()).device
        blocks = len(scores.heads)
        self.model = model
        self.theta_h = nn.Parameter(torch.full((blocks,), initial[0], dtype=torch.float32,
                                               device=device))
        self.theta_n = nn.Parameter(torch.full((blocks,), initial[1], dtype=torch.float32,
                                               device=device))
        self.s_h = [torch.as_tensor(np.asarray(t), dtype=torch.float32, device=device)
                    for t in scores.heads]
        self.s_n = [torch.as_tensor(np.asarray(t), dtype=torch.float32, device=device)
                    for t in scores.neurons]
        self.mac_model = macs
        #: The gates of the current step, read by the backbone's hooks (:func:`gated_units`).
        self.gates: dict[str, list[torch.Tensor]] = {"heads": [], "neurons": []}

    @property
    def blocks(self) -> int:
        return len(self.s_h)

    def forward(self, x: torch.Tensor, n: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, expected MACs per image as a float64 scalar) with gates of sharpness ``n``.

        Call it inside ``gated_units(self.model, heads=..., neurons=...)`` reading
        :attr:`gates`; the expected MACs depend on the thresholds only (identical on all ranks).
        """
        b = range(self.blocks)
        self.gates["heads"] = [(1 + torch.tanh(n * (self.s_h[i] - self.theta_h[i]))) / 2
                               for i in b]
        self.gates["neurons"] = [(1 + torch.tanh(n * (self.s_n[i] - self.theta_n[i]))) / 2
                                 for i in b]
        expected = self.mac_model.macs([g.sum().double() for g in self.gates["heads"]],
                                       [g.sum().double() for g in self.gates["neurons"]])
        return self.model(x), expected

    def hard_macs(self) -> float:
        """MACs per image of the units with ``s > theta`` (the deployed structure now)."""
        with torch.no_grad():
            b = range(self.blocks)
            return float(self.mac_model.macs(
                [int((self.s_h[i] > self.theta_h[i]).sum()) for i in b],
                [int((self.s_n[i] > self.theta_n[i]).sum()) for i in b]))


def _global_mean(value: float, count: int) -> float:
    """The mean over all ranks' samples of a per-rank mean ``value`` over ``count`` samples."""
    if distributed.current() is None:
        return value  # as is: value * count / count may differ in the last bit
    total, samples = distributed.all_reduce_sum([value * count, count])
    return total / max(samples, 1.0)


def _keep_from_thresholds(scores: UnitScores, th_h: np.ndarray, th_n: np.ndarray) -> KeepSets:
    blocks = range(len(scores.heads))
    return KeepSets(
        heads=[np.flatnonzero(np.asarray(scores.heads[b]) > th_h[b]).astype(np.int64)
               for b in blocks],
        neurons=[np.flatnonzero(np.asarray(scores.neurons[b]) > th_n[b]).astype(np.int64)
                 for b in blocks],
    )


def threshold_search(
    model: nn.Module,
    scores: UnitScores,
    macs: MacModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: ThresholdConfig,
    target_macs: float,
    constraints: PlanConstraints,
    *,
    seed: int = 0,
    initial: tuple[float, float] | None = None,
) -> ThresholdResult:
    """Learn per-(block, type) thresholds under the MAC budget, then repair to the exact budget.

    ``scores`` must already be normalised (``UnitScores.normalized``); ``target_macs`` is MACs per
    image (not G), at least the smallest model ``constraints`` allow and below ``macs.original``.
    ``batches`` yields ``(x, y)`` train batches (y: class indices or soft labels); a re-iterable
    loader is restarted when it runs out. ``initial``: (head theta, neuron theta) for every block
    instead of :func:`initial_thresholds` (a warm start; tests start far from the budget).
    Without ``cfg.backbone_lr`` the backbone is frozen and left bit-identical (its
    ``requires_grad`` flags are restored); with it the backbone trains with AdamW (no weight decay:
    a short adaptation should not shrink the weights) **in place**, and ``backbone_adapted`` is
    True. ``seed`` seeds torch (the data order is the caller's). Collective under torchrun, with
    ``batches`` this rank's shard (module docstring); every rank gets the same result.
    """
    import torch.nn.functional as F

    _check_shapes(model, scores, macs)
    original = float(macs.original)
    smallest = smallest_macs(macs, constraints)
    if not smallest <= target_macs < original:
        # Refused before the search, not after it by the repair.
        raise PruneError(
            f"target {target_macs / 1e9:.4g} GMACs must lie between the smallest model the "
            f"constraints allow ({smallest / 1e9:.4g}) and the original ({original / 1e9:.4g}) "
            "GMACs; change the target or the prune constraints"
        )
    torch.manual_seed(seed)
    alpha = 1.0 - target_macs / original
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    adapt = cfg.backbone_lr is not None
    was_training = model.training
    model.eval()
    for p in params:  # before wrapping: DDP syncs exactly the parameters that need a gradient
        p.requires_grad_(adapt)
    search = GatedThresholds(model, scores, macs, initial if initial is not None
                             else initial_thresholds(scores, macs, target_macs))
    optimizer = torch.optim.Adam([search.theta_h, search.theta_n], lr=cfg.lr)
    backbone_opt = (torch.optim.AdamW(params, lr=cfg.backbone_lr, weight_decay=0.0)
                    if adapt else None)
    device = search.theta_h.device

    amp = autocast_dtype("auto-bf16" if cfg.amp == "auto" else cfg.amp, device)
    beta = gamma = 0.0
    history: list[dict[str, float]] = []
    try:
        ddp = distributed.wrap_ddp(search)
        with progress(cfg.steps, "threshold") as advance, gated_units(
            model, heads=lambda b: search.gates["heads"][b],
            neurons=lambda b: search.gates["neurons"][b],
        ):
            data = _batches_forever(batches, cfg.steps)
            for step in range(cfg.steps):
                x, y = next(data)
                x, y = x.to(device), torch.as_tensor(y).to(device)
                n = sharpness(step, cfg.steps, cfg.sharpness_start, cfg.sharpness_end)
                with autocast(amp, device):
                    logits, expected = ddp(x, n)
                removed = 1.0 - expected / original
                gap = alpha - removed
                budget = beta * gap**2 + gamma * gap
                ce = F.cross_entropy(logits.float(), y)
                loss = ce + budget.float()
                optimizer.zero_grad(set_to_none=True)
                if backbone_opt is not None:
                    backbone_opt.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if backbone_opt is not None:
                    backbone_opt.step()
                g = float(gap.detach())
                hard = search.hard_macs()
                history.append({
                    "step": float(step), "ce": _global_mean(float(ce.detach()), int(x.shape[0])),
                    "budget": float(budget.detach()), "R": float(removed.detach()),
                    "R_hard": 1.0 - hard / original, "n": n,
                    "beta": beta, "gamma": gamma, "macs": float(expected.detach()),
                })
                # Gradient ascent on the multipliers: dL/dbeta = gap^2, dL/dgamma = gap. The gap
                # comes from the thresholds alone, so every rank makes the same update.
                beta += cfg.multiplier_lr * g**2
                gamma += cfg.multiplier_lr * g
                advance(ce=history[-1]["ce"], R=history[-1]["R"])
    finally:
        search.gates["heads"], search.gates["neurons"] = [], []
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
            if adapt:
                p.grad = None
        model.train(was_training)

    th_h = search.theta_h.detach().cpu().double().numpy()
    th_n = search.theta_n.detach().cpu().double().numpy()
    threshold_keep = _keep_from_thresholds(scores, th_h, th_n)
    keep = repair_to_budget(threshold_keep, scores, macs, target_macs, constraints)
    return ThresholdResult(
        keep=keep,
        threshold_keep=threshold_keep,
        thresholds=[(float(th_h[b]), float(th_n[b])) for b in range(search.blocks)],
        history=history,
        alpha=float(alpha),
        backbone_adapted=adapt,
    )
