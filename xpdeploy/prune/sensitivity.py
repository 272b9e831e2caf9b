"""Measured sensitivity of every block to a cut: the input of ``prune.ranking: sensitivity``.

A criterion's scores are good at choosing units inside a block and bad at comparing blocks (the
x-pruner masks' scale differs from block to block: bench/plan_swap.py). So the budget of each
block is measured instead of read off the scores: for every block b and unit type t, and every
kept count k on a grid, cut only (b, t) to its k best units **in the criterion's own order** and
measure how far the model's output moves, as the KL divergence from the original model's
softmax to the cut model's, summed over a fixed set of train images and divided by their number
(nats per image). Any criterion's order works (x-pruner masks, Taylor, magnitude, random), so
every criterion can be compared under this allocator. ``allocation.solve_budgets`` then picks the
per-block counts with the least summed loss at the MAC budget.

``around`` re-measures the curves with every other (block, type) already cut to a plan's counts
(the refinement): the summed single-block losses assume the blocks' effects add up, and measuring
around the chosen plan corrects what that assumption gets wrong near it.

Cost: one forward pass per batch for the blocks' inputs, then per grid point only the blocks from
b on (``models/block_io.py``); the grid has every head count and MLP widths every ``mlp_step``
neurons (the solver interpolates between them).

**Under torchrun** every rank measures its own shard of the images (``rank_shard``: one global
seeded set, split) and the per-point sums are added over ranks once at the end, so every rank
holds the same curves, and N ranks measure what one process measures on the same images, to
float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy import distributed
from xpdeploy.errors import PruneError
from xpdeploy.models.block_io import block_inputs, forward_from_block
from xpdeploy.models.unit_sites import gated_units
from xpdeploy.progress import progress
from xpdeploy.prune.allocation import Budgets, LatencyTarget, kept_counts, solve_budgets
from xpdeploy.prune.planner import repair_to_budget
from xpdeploy.prune.unit_scores import KeepSets, UnitScores

if TYPE_CHECKING:
    import torch
    from torch import nn

    from xpdeploy.prune.mac_model import MacModel
    from xpdeploy.prune.planner import PlanConstraints

#: The two unit types, in the order every per-block pair in this package uses.
UNIT_TYPES = ("heads", "neurons")


@dataclass(frozen=True)
class LossCurve:
    """Loss (nats per image) of one (block, unit type) cut to each measured kept count.

    ``kept`` is ascending and ends at the unit type's full size; between grid points the loss is
    interpolated linearly (:meth:`at`).
    """

    kept: tuple[int, ...]
    loss: tuple[float, ...]

    def at(self, k: float) -> float:
        """The loss at ``k`` kept units (linear between measured counts; k within the grid)."""
        if not self.kept[0] <= k <= self.kept[-1]:
            raise ValueError(f"{k} kept units is outside the measured {self.kept[0]}.."
                             f"{self.kept[-1]}")
        return float(np.interp(k, self.kept, self.loss))


@dataclass(frozen=True)
class SensitivityCurves:
    """Per block: the heads' and the MLP neurons' :class:`LossCurve`; what they were measured on.

    ``around``: the (head counts, MLP widths) every other (block, type) was cut to while one was
    varied (``None``: the original model, so a curve's loss at the full size is 0). ``base_loss``:
    the loss of ``around`` itself (0 for the original). ``images``: how many images, over all
    ranks.
    """

    heads: list[LossCurve]
    neurons: list[LossCurve]
    images: int
    around: tuple[list[int], list[int]] | None = None
    base_loss: float = 0.0

    def to_json(self) -> dict[str, Any]:
        def curves(cs: list[LossCurve]) -> list[dict[str, list[Any]]]:
            return [{"kept": list(c.kept), "loss": list(c.loss)} for c in cs]

        return {"heads": curves(self.heads), "neurons": curves(self.neurons),
                "images": self.images, "base_loss": self.base_loss,
                "around": None if self.around is None else
                {"heads": list(self.around[0]), "mlp": list(self.around[1])}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SensitivityCurves:
        def curves(cs: list[dict[str, list[Any]]]) -> list[LossCurve]:
            return [LossCurve(tuple(int(k) for k in c["kept"]),
                              tuple(float(v) for v in c["loss"])) for c in cs]

        around = d.get("around")
        return cls(curves(d["heads"]), curves(d["neurons"]), int(d["images"]),
                   None if around is None else (list(around["heads"]), list(around["mlp"])),
                   float(d.get("base_loss", 0.0)))


def measure_curves(
    model: nn.Module,
    scores: UnitScores,
    batches: Sequence[torch.Tensor],
    floors: tuple[Sequence[int], Sequence[int]],
    *,
    mlp_step: int,
    around: tuple[Sequence[int], Sequence[int]] | None = None,
) -> SensitivityCurves:
    """The loss curve of every (block, unit type), cut alone in the criterion's order.

    ``batches``: this rank's images (pixels only; the same set on every call, so curves compare).
    ``floors``: per block the smallest head count and MLP width a plan may keep (the grids start
    there). ``mlp_step``: MLP widths measured every this many neurons. ``around``: (head counts,
    MLP widths) that every other (block, type) keeps meanwhile (module docstring); ``None`` for
    the original model. The model runs in eval mode, without gradients; it is not changed.
    """
    orders = scores.best_first()
    full = [[len(o) for o in orders[t]] for t in (0, 1)]
    plan = full if around is None else [list(around[0]), list(around[1])]
    # Every (block, type, kept count) to measure. Around the original the full size is 0 by
    # definition and not measured.
    points = [(b, t, k) for b in range(len(full[0])) for t in (0, 1)
              for k in kept_counts(full[t][b], floors[t][b], 1 if t == 0 else mlp_step)
              if around is not None or k < full[t][b]]
    per_image, images = _measure(model, orders, batches, plan, points)
    curves: list[list[LossCurve]] = [[], []]
    for b in range(len(full[0])):
        for t in (0, 1):
            measured = {k: float(per_image[i]) for i, (pb, pt, k) in enumerate(points)
                        if (pb, pt) == (b, t)}
            if around is None:
                measured[full[t][b]] = 0.0
            kept = sorted(measured)
            curves[t].append(LossCurve(tuple(kept), tuple(measured[k] for k in kept)))
    return SensitivityCurves(curves[0], curves[1], images,
                             None if around is None else (plan[0], plan[1]),
                             float(per_image[-1]))


def measure_plan_loss(model: nn.Module, scores: UnitScores, batches: Sequence[torch.Tensor],
                      counts: tuple[Sequence[int], Sequence[int]]) -> float:
    """The loss (nats per image) of the model cut to ``counts`` = (head counts, MLP widths) in
    the criterion's order, on ``batches`` (collective under torchrun, as the curves)."""
    per_image, _ = _measure(model, scores.best_first(), batches,
                            [list(counts[0]), list(counts[1])], [])
    return float(per_image[-1])


def _measure(model: nn.Module, orders: tuple[list[np.ndarray], list[np.ndarray]],
             batches: Sequence[torch.Tensor], plan: list[list[int]],
             points: list[tuple[int, int, int]]) -> tuple[np.ndarray, int]:
    """Per image (summed over every rank's images): the loss at each of ``points`` = (block,
    type, kept count), each varied alone on top of ``plan``, then the plan's own loss last;
    and the number of images."""
    import torch

    blocks = len(orders[0])
    device = next(model.parameters()).device

    def gate(t: int, b: int, k: int) -> torch.Tensor | None:
        order = orders[t][b]
        if k >= order.size:
            return None  # uncut: no hook work at all
        g = torch.zeros(order.size, device=device)
        g[torch.as_tensor(order[:k], device=device)] = 1.0
        return g

    plan_gates = [[gate(t, b, plan[t][b]) for b in range(blocks)] for t in (0, 1)]
    uncut = all(g is None for gates in plan_gates for g in gates)
    # What the hooks read: the plan's gates, but the varied (block, type)'s own while measured.
    state: dict[str, Any] = {"gates": plan_gates, "varied": None, "gate": None}

    def gate_fn(t: int):
        def fn(b: int) -> torch.Tensor | None:
            return state["gate"] if state["varied"] == (b, t) else state["gates"][t][b]
        return fn

    sums = np.zeros(len(points) + 2)  # per point; the plan's own loss; images
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress(len(batches) * (len(points) + 1),
                                              "sensitivity") as advance, \
                gated_units(model, heads=gate_fn(0), neurons=gate_fn(1)):
            for x in batches:
                x = x.to(device).float()
                logits, inputs = block_inputs(model, x)  # with the plan's cuts
                reference = logits
                if not uncut:
                    state["gates"] = [[None] * blocks, [None] * blocks]
                    reference = model(x)  # the original
                    state["gates"] = plan_gates
                    sums[-2] += _kl_sum(reference, logits)
                sums[-1] += x.shape[0]
                advance(1)
                for i, (b, t, k) in enumerate(points):
                    state.update(varied=(b, t), gate=gate(t, b, k))
                    sums[i] += _kl_sum(reference, forward_from_block(model, b, inputs[b]))
                    advance(1)
                state.update(varied=None, gate=None)
    finally:
        model.train(was_training)
    if distributed.current() is not None:
        sums = np.asarray(distributed.all_reduce_sum(sums.tolist()))
    images = int(sums[-1])
    if images == 0:
        raise PruneError("sensitivity: no images to measure on; the train split is empty")
    return np.delete(sums / images, -1), images


def _kl_sum(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Sum over the batch of KL(softmax(reference) || softmax(logits)), in nats, float64."""
    import torch.nn.functional as F

    return float(F.kl_div(F.log_softmax(logits.double(), dim=-1),
                          F.log_softmax(reference.double(), dim=-1), log_target=True,
                          reduction="sum"))


@dataclass(frozen=True)
class SensitivityPlan:
    """What ``ranking: sensitivity`` decided and why.

    ``keep``: the plan (each block's best units in the criterion's order, at the counts of the
    round whose plan measured the least loss, then the exact-budget repair). ``rounds``: one
    entry per solve, the first on the original's curves and one per refinement: the curves, the
    head counts and MLP widths solved for, the loss the curves predict for them, the loss the
    plan really has (``measured_loss``, nats per image) and whether it was ``chosen``.
    ``plan_loss``: the chosen plan's measured loss.
    """

    keep: KeepSets
    rounds: list[dict[str, Any]]
    plan_loss: float

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "plan_loss": self.plan_loss}


def sensitivity_plan(
    model: nn.Module,
    scores: UnitScores,
    batches: Sequence[torch.Tensor],
    macs: MacModel,
    target: float | LatencyTarget,
    constraints: PlanConstraints,
    *,
    mlp_step: int,
    refine: int,
    curves: SensitivityCurves | None = None,
) -> SensitivityPlan:
    """Measure the curves, solve for the budgets, refine ``refine`` times around the choice.

    ``target``: MACs per image (the plan is then repaired to the exact MAC band), or a
    :class:`~xpdeploy.prune.allocation.LatencyTarget` (the table's grid points are the plan).

    A refinement re-measures every curve with the others cut to the current choice and solves
    again; it stops early when the choice no longer changes. ``curves``: the original's curves
    when already measured on these ``batches`` (they do not depend on the target, so several
    targets share them). Collective under torchrun (every rank passes its shard as ``batches``;
    every rank returns the same plan).
    """
    floors = constraints.floors(macs)
    if curves is None:
        curves = measure_curves(model, scores, batches, floors, mlp_step=mlp_step)
    budgets = solve_budgets(curves, macs, target, constraints)
    rounds = [_round(curves, budgets)]
    for _ in range(refine):
        curves = measure_curves(model, scores, batches, floors, mlp_step=mlp_step,
                                around=(budgets.heads, budgets.mlp))
        rounds[-1]["measured_loss"] = curves.base_loss
        again = solve_budgets(curves, macs, target, constraints)
        if (again.heads, again.mlp) == (budgets.heads, budgets.mlp):
            break
        budgets = again
        rounds.append(_round(curves, budgets))
    if "measured_loss" not in rounds[-1]:
        rounds[-1]["measured_loss"] = measure_plan_loss(model, scores, batches,
                                                        (budgets.heads, budgets.mlp))
    # The curves predict; the measurement decides: a refined choice that measures worse than an
    # earlier one (the summed losses are only an approximation) is not taken.
    best = min(range(len(rounds)), key=lambda i: (rounds[i]["measured_loss"], i))
    for i, r in enumerate(rounds):
        r["chosen"] = i == best
    keep = scores.keep_top(rounds[best]["heads"], rounds[best]["mlp"])
    if not isinstance(target, LatencyTarget):
        keep = repair_to_budget(keep, scores.normalized("type"), macs, target, constraints)
    return SensitivityPlan(keep=keep, rounds=rounds,
                           plan_loss=float(rounds[best]["measured_loss"]))


def _round(curves: SensitivityCurves, budgets: Budgets) -> dict[str, Any]:
    # Around a plan every curve carries the plan's own loss once; the increase over it adds up.
    base = curves.base_loss
    groups = len(curves.heads) + len(curves.neurons)
    return {"curves": curves.to_json(), "heads": budgets.heads, "mlp": budgets.mlp,
            "predicted_loss": budgets.predicted_loss - (groups - 1) * base}
