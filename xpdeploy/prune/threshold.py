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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy.errors import PruneError
from xpdeploy.models.units import gated_units, unit_sites
from xpdeploy.progress import progress
from xpdeploy.prune.planner import PlanConstraints, repair_to_budget, smallest_macs
from xpdeploy.prune.units import KeepSets, UnitScores

if TYPE_CHECKING:
    import torch
    from torch import nn

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
    True. ``seed`` seeds torch (the data order is the caller's).
    """
    import torch
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
    device = next(model.parameters()).device
    alpha = 1.0 - target_macs / original
    blocks = len(scores.heads)
    theta0_h, theta0_n = (initial if initial is not None
                          else initial_thresholds(scores, macs, target_macs))
    theta_h = torch.full((blocks,), theta0_h, dtype=torch.float32, device=device,
                         requires_grad=True)
    theta_n = torch.full((blocks,), theta0_n, dtype=torch.float32, device=device,
                         requires_grad=True)
    s_h = [torch.as_tensor(np.asarray(t), dtype=torch.float32, device=device)
           for t in scores.heads]
    s_n = [torch.as_tensor(np.asarray(t), dtype=torch.float32, device=device)
           for t in scores.neurons]
    optimizer = torch.optim.Adam([theta_h, theta_n], lr=cfg.lr)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    adapt = cfg.backbone_lr is not None
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(adapt)
    backbone_opt = (torch.optim.AdamW(params, lr=cfg.backbone_lr, weight_decay=0.0)
                    if adapt else None)

    gates: dict[str, list[torch.Tensor]] = {"heads": [], "neurons": []}
    beta = gamma = 0.0
    history: list[dict[str, float]] = []
    try:
        with progress(cfg.steps, "threshold") as advance, gated_units(
            model, heads=lambda b: gates["heads"][b], neurons=lambda b: gates["neurons"][b]
        ):
            data = _batches_forever(batches, cfg.steps)
            for step in range(cfg.steps):
                x, y = next(data)
                x, y = x.to(device), torch.as_tensor(y).to(device)
                n = sharpness(step, cfg.steps, cfg.sharpness_start, cfg.sharpness_end)
                gates["heads"] = [(1 + torch.tanh(n * (s_h[b] - theta_h[b]))) / 2
                                  for b in range(blocks)]
                gates["neurons"] = [(1 + torch.tanh(n * (s_n[b] - theta_n[b]))) / 2
                                    for b in range(blocks)]
                expected = macs.macs([g.sum().double() for g in gates["heads"]],
                                     [g.sum().double() for g in gates["neurons"]])
                removed = 1.0 - expected / original
                gap = alpha - removed
                budget = beta * gap**2 + gamma * gap
                ce = F.cross_entropy(model(x), y)
                loss = ce + budget.float()
                optimizer.zero_grad(set_to_none=True)
                if backbone_opt is not None:
                    backbone_opt.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if backbone_opt is not None:
                    backbone_opt.step()
                g = float(gap.detach())
                with torch.no_grad():
                    hard = macs.macs([int((s_h[b] > theta_h[b]).sum()) for b in range(blocks)],
                                     [int((s_n[b] > theta_n[b]).sum()) for b in range(blocks)])
                history.append({
                    "step": float(step), "ce": float(ce.detach()),
                    "budget": float(budget.detach()), "R": float(removed.detach()),
                    "R_hard": 1.0 - float(hard) / original, "n": n,
                    "beta": beta, "gamma": gamma, "macs": float(expected.detach()),
                })
                # Gradient ascent on the multipliers: dL/dbeta = gap^2, dL/dgamma = gap.
                beta += cfg.multiplier_lr * g**2
                gamma += cfg.multiplier_lr * g
                advance(ce=history[-1]["ce"], R=history[-1]["R"])
    finally:
        gates["heads"], gates["neurons"] = [], []
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
            if adapt:
                p.grad = None
        model.train(was_training)

    th_h = theta_h.detach().cpu().double().numpy()
    th_n = theta_n.detach().cpu().double().numpy()
    threshold_keep = KeepSets(
        heads=[np.flatnonzero(np.asarray(scores.heads[b]) > th_h[b]).astype(np.int64)
               for b in range(blocks)],
        neurons=[np.flatnonzero(np.asarray(scores.neurons[b]) > th_n[b]).astype(np.int64)
                 for b in range(blocks)],
    )
    keep = repair_to_budget(threshold_keep, scores, macs, target_macs, constraints)
    return ThresholdResult(
        keep=keep,
        threshold_keep=threshold_keep,
        thresholds=[(float(th_h[b]), float(th_n[b])) for b in range(blocks)],
        history=history,
        alpha=float(alpha),
        backbone_adapted=adapt,
    )
