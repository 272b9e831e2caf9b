"""``ranking: threshold`` (v2): learned per-(block, unit type) thresholds under a MAC budget.

docs/method.md, "Stage 2". Each block b has one threshold per unit type, ``theta_h[b]`` for heads
and ``theta_n[b]`` for MLP neurons. A unit with normalised score ``s_i`` is multiplied by the soft
gate

    g_i = (1 + tanh(n * (s_i - theta))) / 2

(shape ``(units,)``, the same for every sample: no class masks, so training and deployment see the
same model). The expected MACs follow analytically from the gates, because :class:`MacModel` is
linear in each block's head count and MLP width: ``macs([sum g_heads_b], [sum g_neurons_b])``.
With ``R = 1 - expected / original`` (the removed share now) and ``alpha = 1 - target / original``
(the removed share wanted), two ways to hold the budget (``budget``):

- ``lagrangian`` (the first version): minimise
  ``data term + beta * (alpha - R)^2 + gamma * (alpha - R)`` over the thresholds by Adam, while
  the multipliers follow gradient **ascent** (``beta += multiplier_lr * (alpha - R)^2``, ``gamma
  += multiplier_lr * (alpha - R)``). Its record (issue 15, shared CIFAR-10 model) shows why it
  does not reallocate: Adam moves every threshold by about ``lr`` in its gradient's sign whatever
  the gradient's size, so the data term pulls all thresholds down together (R fell from 0.50 to
  0.14 in 50 steps), the slow multipliers pull them back together, head thresholds that left
  their scores' range froze (zero gradient) for good, and the search ended far from the budget
  (R 0.31 vs 0.50), leaving the global repair queue to decide the allocation.
- ``projection``: projected gradient descent on the budget. Each step moves the thresholds along
  the data term's gradient minus its component along the MAC gradient (so, to first order, no
  MACs move: the step only reallocates), scaled so the largest move is ``lr`` (the others keep
  their ratio: a block whose loss barely changes barely moves), then shifts every threshold by
  one common amount so the expected MACs equal the target exactly. At rest the data term's
  gradient is parallel to the MAC gradient: a MAC costs the same loss in every block. No
  multipliers.

In both, every threshold stays within ``2 / n`` of its own block's scores (beyond, its gradient
is 0 and it could never come back).

Decisions (ours, where the paper is silent to us):

- **Data term** (``loss``): ``ce``, cross-entropy on the true labels (the first version's; the
  gates are shared by every sample, so the label cannot be routed through class-specific units as
  with the stage-1 masks), or ``kl``, the KL divergence from the unpruned model's softmax (what
  the pruned model should keep doing, with no label noise; one more forward pass per step).
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
- At n = 100 only units within ~0.02 of theta pass gradient: the quantile start puts every
  threshold inside its scores' range and the clamp keeps it within reach.
- The keep sets from the thresholds then go through the planner's exact-budget greedy repair,
  the same as ``ranking: global``, so the plan meets the target MACs within its tolerance.

**Under torchrun** the search is collective: every rank calls :func:`threshold_search` with the
same scores and target and its own shard of the batches (``shuffled_batches(..., rank=,
world_size=)``; the batch size is per rank). The thresholds (fp32 parameters) and the backbone
live in one module that is wrapped in DDP, so their gradients are averaged over ranks and every
rank takes the same step. The multipliers, the MAC gradient and the projection need no
communication: they follow from the thresholds and scores only, which are identical on every
rank. The ``ce`` of the history is the mean over all
ranks' images of the step. N ranks with batch b therefore search as one process with batch N x b,
to float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xpdeploy import distributed
from xpdeploy.errors import PruneError
from xpdeploy.models.unit_sites import gated_units, unit_sites
from xpdeploy.progress import log, progress
from xpdeploy.prune.planner import PlanConstraints, repair_to_budget, smallest_macs
from xpdeploy.prune.unit_scores import KeepSets, UnitScores
from xpdeploy.training import checkpoint as ckpt
from xpdeploy.training.precision import autocast, autocast_dtype

#: Steps between checkpoints of the search (each a few KiB without backbone adaptation).
CHECKPOINT_EVERY = 25

if TYPE_CHECKING:
    from xpdeploy.prune.mac_model import MacModel
    from xpdeploy.spec import ThresholdConfig

#: Scalar keys of every :attr:`ThresholdResult.history` entry.
HISTORY_KEYS: tuple[str, ...] = (
    "step", "ce", "budget", "R", "R_hard", "n", "beta", "gamma", "macs",
)
#: Per-block keys of every entry (one value per block): the hard kept counts, the thresholds and
#: their gradients at that step (before its update), so the record shows whether and why the
#: per-block allocation moves.
BLOCK_KEYS: tuple[str, ...] = (
    "kept_heads", "kept_neurons", "theta_heads", "theta_neurons", "grad_heads", "grad_neurons",
)


@dataclass(frozen=True)
class ThresholdResult:
    """What the threshold search produced.

    ``keep``: kept units after the exact-budget repair (the plan). ``threshold_keep``: the units
    with ``s > theta`` before the repair (how far the thresholds alone were from the budget).
    ``thresholds[b] = (head theta, neuron theta)`` in normalised-score units. ``history``: one
    entry per step with :data:`HISTORY_KEYS` (``ce`` the data term in nats: cross-entropy or KL
    as ``loss`` says, ``R`` the expected removed share of MACs from the soft gates, ``R_hard``
    the removed share of the hard ``s > theta`` sets at that step (before the update; how far the
    relaxation is from the deployed structure), ``n`` the sharpness, ``beta``/``gamma`` the
    multipliers used at that step, ``macs`` the expected MACs per image) and
    :data:`BLOCK_KEYS` (lists over blocks). ``alpha``: the removed share the target asks for.
    ``backbone_adapted``: True when the backbone weights were trained (``backbone_lr`` set): the
    caller's model was modified in place.
    """

    keep: KeepSets
    threshold_keep: KeepSets
    thresholds: list[tuple[float, float]]
    history: list[dict[str, Any]]
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
                 initial: tuple[float, float],
                 floors: tuple[list[int], list[int]] | None = None) -> None:
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
        # The highest threshold each block may take and still keep its floor of units (the
        # floor-th best score, a hair below): a search that dropped a block's last head would
        # leave the repair to buy it back with other blocks' units.
        floors = floors or ([0] * blocks, [0] * blocks)
        self.floor_h = [_ceiling(s, f) for s, f in zip(self.s_h, floors[0], strict=True)]
        self.floor_n = [_ceiling(s, f) for s, f in zip(self.s_n, floors[1], strict=True)]
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

    def _bounds(self, n: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per type, the (low, high) each block's threshold may take: within ``2 / n`` of the
        block's own scores (:meth:`clamp_` says why), and low enough to keep its floor."""
        out = []
        for scores, floor in ((self.s_h, self.floor_h), (self.s_n, self.floor_n)):
            low = torch.stack([s.min() for s in scores]) - 2.0 / n
            high = torch.stack([s.max() for s in scores]) + 2.0 / n
            high = torch.minimum(high, torch.tensor(floor, dtype=high.dtype, device=high.device))
            out.append((torch.minimum(low, high), high))
        return out

    def clamp_(self, n: float) -> None:
        """Keep every threshold within ``2 / n`` of its own block's scores (in place).

        Beyond that every gate of the block is saturated, the threshold's gradient is 0 and it
        could never come back: the record of the first version showed head thresholds that fell
        below all their scores early (keeping every head) and stayed frozen for the rest of the
        search. ``2 / n`` is twice the gates' transition width, where the gradient is still alive.
        """
        with torch.no_grad():
            for theta, (low, high) in zip((self.theta_h, self.theta_n), self._bounds(n),
                                          strict=True):
                theta.copy_(torch.minimum(torch.maximum(theta, low), high))

    def project_(self, n: float, target_macs: float) -> None:
        """Move every threshold by one common amount (then clamp it, :meth:`clamp_`) so that the
        soft gates' expected MACs equal ``target_macs``; bisection on the amount, since expected
        MACs fall as it grows. The thresholds' differences, i.e. the allocation the data term
        asks for, are kept except where a bound stops a threshold."""
        with torch.no_grad():
            bounds = self._bounds(n)
            pairs = ((self.theta_h, self.s_h, bounds[0]), (self.theta_n, self.s_n, bounds[1]))

            def moved(shift: float) -> list[torch.Tensor]:
                return [torch.minimum(torch.maximum(theta + shift, low), high)
                        for theta, _, (low, high) in pairs]

            def expected(shift: float) -> float:
                th_h, th_n = moved(shift)
                return float(self.mac_model.macs(
                    [float(((1 + torch.tanh(n * (s - th_h[b]))) / 2).sum())
                     for b, s in enumerate(self.s_h)],
                    [float(((1 + torch.tanh(n * (s - th_n[b]))) / 2).sum())
                     for b, s in enumerate(self.s_n)]))

            scores = torch.cat([*self.s_h, *self.s_n])
            thetas = torch.cat([self.theta_h, self.theta_n])
            # Shifts that keep every unit (low) and none (high), with room for the gates' width.
            low = float(scores.min() - thetas.max()) - 4.0 / n
            high = float(scores.max() - thetas.min()) + 4.0 / n
            for _ in range(60):
                mid = (low + high) / 2
                if expected(mid) > target_macs:
                    low = mid
                else:
                    high = mid
            for theta, value in zip((self.theta_h, self.theta_n), moved(high), strict=True):
                theta.copy_(value)

    def mac_gradient(self, n: float) -> tuple[torch.Tensor, torch.Tensor]:
        """d(expected MACs)/d(theta) per block and type (closed form; negative: a higher
        threshold keeps fewer units): ``-cost * sum_i n / 2 * (1 - tanh^2(n (s_i - theta)))``."""
        with torch.no_grad():
            def one(scores: list[torch.Tensor], theta: torch.Tensor,
                    cost: tuple[float, ...]) -> torch.Tensor:
                return torch.stack([
                    -cost[b] * (n / 2 * (1 - torch.tanh(n * (s - theta[b])) ** 2)).sum()
                    for b, s in enumerate(scores)])

            return (one(self.s_h, self.theta_h, self.mac_model.head_cost),
                    one(self.s_n, self.theta_n, self.mac_model.neuron_cost))

    def projected_step_(self, n: float, lr: float) -> None:
        """One step of projected gradient descent on the budget (``budget: projection``).

        The data term's gradient ``g`` (in ``.grad``) minus its component along the MAC gradient
        ``c``: ``d = g - (g.c / c.c) c`` moves no MACs to first order, so the step only
        reallocates between blocks and types, and it stops where ``g`` is parallel to ``c``,
        i.e. where a MAC costs the same loss in every block (the optimum's condition). The step
        is ``lr * d / max|d|``: the largest move is ``lr`` and the others keep their ratio to it
        (Adam, in the first version, moved every threshold by about ``lr`` whatever its gradient,
        so all of them rose and fell together and the allocation stayed where it started).
        """
        with torch.no_grad():
            g = torch.cat([self.theta_h.grad, self.theta_n.grad]).double()
            c = torch.cat(self.mac_gradient(n)).double()
            d = g - (g @ c) / (c @ c).clamp_min(1e-300) * c
            step = lr * d / d.abs().max().clamp_min(1e-300)
            blocks = self.blocks
            self.theta_h.sub_(step[:blocks].to(self.theta_h.dtype))
            self.theta_n.sub_(step[blocks:].to(self.theta_n.dtype))

    def hard_counts(self) -> tuple[list[int], list[int]]:
        """Per block, the heads and neurons with ``s > theta`` (the deployed structure now)."""
        with torch.no_grad():
            b = range(self.blocks)
            return ([int((self.s_h[i] > self.theta_h[i]).sum()) for i in b],
                    [int((self.s_n[i] > self.theta_n[i]).sum()) for i in b])


def _ceiling(scores: torch.Tensor, floor: int) -> float:
    """The highest threshold that still keeps ``floor`` of ``scores`` (kept: ``s > theta``): a
    hair below the floor-th best score; no limit for a floor of 0."""
    if floor <= 0:
        return float("inf")
    ordered = torch.sort(scores, descending=True).values
    return float(ordered[min(floor, ordered.numel()) - 1]) - 1e-6


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
    checkpoint: Path | None = None,
    fingerprint: str = "",
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
    ``checkpoint``: a file (:mod:`xpdeploy.training.checkpoint`, tied to ``fingerprint``) written
    every :data:`CHECKPOINT_EVERY` steps; an interrupted search resumes from it (the batches
    already drawn are drawn again and skipped, so the data order is the uninterrupted run's).
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
                             else initial_thresholds(scores, macs, target_macs),
                             constraints.floors(macs))
    optimizer = torch.optim.Adam([search.theta_h, search.theta_n], lr=cfg.lr)
    backbone_opt = (torch.optim.AdamW(params, lr=cfg.backbone_lr, weight_decay=0.0)
                    if adapt else None)
    device = search.theta_h.device

    amp = autocast_dtype("auto-bf16" if cfg.amp == "auto" else cfg.amp, device)
    # KL's reference: the unpruned model. The backbone itself with every gate off while it stays
    # frozen; a frozen copy of it when it adapts (the reference must not move with it).
    reference_model = copy.deepcopy(model) if cfg.loss == "kl" and adapt else model
    beta = gamma = 0.0
    history: list[dict[str, Any]] = []
    start = 0
    saved = ckpt.load(checkpoint, fingerprint) if checkpoint is not None else None
    if saved is not None:
        with torch.no_grad():
            search.theta_h.copy_(saved["theta_h"])
            search.theta_n.copy_(saved["theta_n"])
        optimizer.load_state_dict(saved["optimizer"])
        if backbone_opt is not None:
            model.load_state_dict(saved["backbone"])
            backbone_opt.load_state_dict(saved["backbone_optimizer"])
        beta, gamma, history, start = saved["beta"], saved["gamma"], saved["history"], saved["step"]
        log(f"  threshold search: resuming at step {start} of {cfg.steps} from {checkpoint}")
    try:
        ddp = distributed.wrap_ddp(search)
        with progress(cfg.steps, "threshold") as advance, gated_units(
            model, heads=lambda b: search.gates["heads"][b],
            neurons=lambda b: search.gates["neurons"][b],
        ):
            data = _batches_forever(batches, cfg.steps)
            for _ in range(start):  # the batches the checkpointed steps used
                next(data)
            advance(start)
            for step in range(start, cfg.steps):
                x, y = next(data)
                x, y = x.to(device), torch.as_tensor(y).to(device)
                n = sharpness(step, cfg.steps, cfg.sharpness_start, cfg.sharpness_end)
                if cfg.budget == "projection":  # onto the budget at this step's sharpness
                    search.project_(n, target_macs)
                kept_h, kept_n = search.hard_counts()
                record = {"theta_heads": search.theta_h.tolist(),
                          "theta_neurons": search.theta_n.tolist(),
                          "kept_heads": kept_h, "kept_neurons": kept_n}
                if cfg.loss == "kl":
                    search.gates["heads"] = [None] * search.blocks
                    search.gates["neurons"] = [None] * search.blocks
                    with torch.no_grad(), autocast(amp, device):
                        reference = reference_model(x)
                with autocast(amp, device):
                    logits, expected = ddp(x, n)
                removed = 1.0 - expected / original
                gap = alpha - removed
                budget = beta * gap**2 + gamma * gap
                if cfg.loss == "kl":
                    data_term = F.kl_div(F.log_softmax(logits.float(), dim=-1),
                                         F.log_softmax(reference.float(), dim=-1),
                                         log_target=True, reduction="batchmean")
                else:
                    data_term = F.cross_entropy(logits.float(), y)
                loss = data_term + budget.float()
                optimizer.zero_grad(set_to_none=True)
                if backbone_opt is not None:
                    backbone_opt.zero_grad(set_to_none=True)
                loss.backward()
                record["grad_heads"] = search.theta_h.grad.tolist()
                record["grad_neurons"] = search.theta_n.grad.tolist()
                if cfg.budget == "projection":
                    search.projected_step_(n, cfg.lr)
                else:
                    optimizer.step()
                if backbone_opt is not None:
                    backbone_opt.step()
                search.clamp_(n)
                g = float(gap.detach())
                history.append({
                    "step": float(step),
                    "ce": _global_mean(float(data_term.detach()), int(x.shape[0])),
                    "budget": float(budget.detach()), "R": float(removed.detach()),
                    "R_hard": 1.0 - macs.macs(kept_h, kept_n) / original, "n": n,
                    "beta": beta, "gamma": gamma, "macs": float(expected.detach()), **record,
                })
                # Gradient ascent on the multipliers: dL/dbeta = gap^2, dL/dgamma = gap. The gap
                # comes from the thresholds alone, so every rank makes the same update. The
                # projection holds the budget itself: no multiplier, no budget term.
                if cfg.budget == "lagrangian":
                    beta += cfg.multiplier_lr * g**2
                    gamma += cfg.multiplier_lr * g
                advance(ce=history[-1]["ce"], R=history[-1]["R"])
                if checkpoint is not None and (step + 1) % CHECKPOINT_EVERY == 0:
                    ckpt.save(checkpoint, {
                        "fingerprint": fingerprint, "step": step + 1,
                        "theta_h": search.theta_h.detach().cpu(),
                        "theta_n": search.theta_n.detach().cpu(),
                        "optimizer": optimizer.state_dict(), "beta": beta, "gamma": gamma,
                        "history": history,
                        **({"backbone": model.state_dict(),
                            "backbone_optimizer": backbone_opt.state_dict()}
                           if backbone_opt is not None else {})})
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
