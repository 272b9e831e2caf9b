"""Per-block budgets from loss curves at an exact MAC budget: a multiple-choice knapsack.

Every (block, unit type) is a group that must take exactly one option: a kept count k between its
floor and its full size (every head count; MLP widths in multiples of ``round_mlp_to``, the
planner's rule), costing ``k x`` the unit's MACs (:class:`MacModel` is linear) and the loss its
:class:`~xpdeploy.prune.sensitivity.LossCurve` gives at k. The budgets minimise the summed loss
with ``target x (1 - tolerance) <= MACs <= target``: the same band every plan meets (when no
combination lands in the band, the solver keeps only the upper bound and the planner's repair
fills the rest).

A latency budget (:class:`LatencyTarget`, ``prune.target_latency_ms``) changes the cost, not the
method: each block becomes one group whose options are the (heads, MLP width) points of its
measured latency table, costing their measured ms in the model (``LatencyModel.cost``; latency
is not additive over heads and MLP width: the joint grid is what was timed), with the loss of
both curves; the budget is
``target - fixed_ms`` with no lower band (the least loss under it uses the budget by itself, and
latency has no exact arithmetic a band could be checked in).

Solved exactly as a 0/1 integer programme by HiGHS through ``scipy.optimize.milp`` (one binary
per option, one equality per group, the MAC band as one two-sided row) rather than by a dynamic
programme of our own: a DP needs the MAC axis cut into bins, which is exact only when the unit
costs share a large common divisor; the solver needs no bins, and its result is checked against
exact arithmetic before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy.errors import PruneError

if TYPE_CHECKING:
    from xpdeploy.latency.table import LatencyModel
    from xpdeploy.prune.mac_model import MacModel
    from xpdeploy.prune.planner import PlanConstraints
    from xpdeploy.prune.sensitivity import SensitivityCurves


@dataclass(frozen=True)
class Budgets:
    """Kept heads and MLP width per block, and the summed loss the curves predict for them."""

    heads: list[int]
    mlp: list[int]
    predicted_loss: float


def kept_counts(size: int, floor: int, step: int) -> list[int]:
    """Kept counts from ``floor`` to ``size``: the floor, the multiples of ``step`` above it and
    the full size (a unit type left whole need not be a multiple). The solver's options (step:
    1 for heads, ``round_mlp_to`` for MLP widths) and the sensitivity grid (``mlp_step``)."""
    floor = min(floor, size)
    return sorted({floor, size, *range(-(-floor // step) * step, size, step)})


@dataclass(frozen=True)
class LatencyTarget:
    """A latency budget: ``target_ms`` per batch on the runtime ``table`` was measured on."""

    table: LatencyModel
    target_ms: float


def solve_budgets(curves: SensitivityCurves, macs: MacModel, target: float | LatencyTarget,
                  constraints: PlanConstraints) -> Budgets:
    """The per-block counts with the least summed loss within the budget (see module):
    ``target`` in MACs per image, or a :class:`LatencyTarget`."""
    if isinstance(target, LatencyTarget):
        return _solve_latency(curves, macs, target, constraints)
    floor_h, floor_m = constraints.floors(macs)
    groups: list[_Group] = []
    for b, curve in enumerate(curves.heads):
        ks = kept_counts(macs.heads[b], floor_h[b], 1)
        groups.append(_Group(ks, [curve.at(k) for k in ks],
                             [k * macs.head_cost[b] for k in ks]))
    for b, curve in enumerate(curves.neurons):
        ks = kept_counts(macs.mlp[b], floor_m[b], constraints.round_mlp_to)
        groups.append(_Group(ks, [curve.at(k) for k in ks],
                             [k * macs.neuron_cost[b] for k in ks]))
    room = target - macs.fixed  # what the blocks may cost
    chosen, loss = _solve_groups(groups, room - target * constraints.tolerance, room)
    if chosen is None:
        raise PruneError(f"no per-block budget fits {target / 1e9:.4g} GMACs under the "
                         "prune constraints; raise the target or lower the floors")
    blocks = len(curves.heads)
    counts = [g.options[i] for g, i in zip(groups, chosen, strict=True)]
    return Budgets(heads=counts[:blocks], mlp=counts[blocks:], predicted_loss=loss)


def _solve_latency(curves: SensitivityCurves, macs: MacModel, target: LatencyTarget,
                   constraints: PlanConstraints) -> Budgets:
    """One group per block over its table's (heads, width) points that the floors allow."""
    table = target.table
    floor_h, floor_m = constraints.floors(macs)
    groups: list[_Group] = []
    for b in range(len(curves.heads)):
        options = [(h, m) for h, m in table.options(b) if h >= floor_h[b] and m >= floor_m[b]]
        groups.append(_Group(options, [curves.heads[b].at(h) + curves.neurons[b].at(m)
                                       for h, m in options],
                             [table.cost(b, h, m) for h, m in options]))
    # 1e-9 ms below the budget: table.predict sums fixed + costs in another order, and the plan
    # it predicts must not read one rounding error above the target.
    chosen, loss = _solve_groups(groups, -np.inf, target.target_ms - table.fixed_ms - 1e-9)
    if chosen is None:
        cheapest = table.fixed_ms + sum(min(g.costs) for g in groups if g.costs)
        raise PruneError(f"no per-block budget fits {target.target_ms:.4g} ms under the prune "
                         f"constraints: the cheapest plan they allow is predicted at "
                         f"{cheapest:.4g} ms; raise the target or lower the floors")
    picks = [g.options[i] for g, i in zip(groups, chosen, strict=True)]
    return Budgets(heads=[h for h, _ in picks], mlp=[m for _, m in picks], predicted_loss=loss)


@dataclass(frozen=True)
class _Group:
    """Options of which exactly one is chosen, each with its loss and its cost."""

    options: list[Any]
    losses: list[float]
    costs: list[float]


def _solve_groups(groups: list[_Group], low: float, high: float
                  ) -> tuple[list[int] | None, float]:
    """Index of the chosen option per group, least summed loss with ``low <= cost <= high``
    (when nothing lands in the band, ``cost <= high`` only), and that loss; None: nothing fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    loss = np.concatenate([np.asarray(g.losses, dtype=np.float64) for g in groups])
    cost = np.concatenate([np.asarray(g.costs, dtype=np.float64) for g in groups])
    sizes = [len(g.options) for g in groups]
    one_each = np.zeros((len(groups), loss.size))
    start = 0
    for i, n in enumerate(sizes):
        one_each[i, start:start + n] = 1.0
        start += n
    # The cost row in units of the budget, well-conditioned for the solver. Not 1 / high alone:
    # a latency budget left after the fixed part can be <= 0 while calibrated block costs are
    # negative (a noisy table), and such a budget can still be met.
    norm = max(abs(high), float(np.abs(cost).max(initial=0.0)), 1e-12)
    scale = 1.0 / norm

    def solve(lower: float, upper: float) -> np.ndarray | None:
        res = milp(loss, integrality=np.ones(loss.size), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1),
                                LinearConstraint(cost[None, :] * scale, lower * scale,
                                                 upper * scale)],
                   options={"mip_rel_gap": 0.0, "presolve": True})
        return np.round(res.x).astype(bool) if res.status == 0 and res.x is not None else None

    chosen = None
    for lower in dict.fromkeys((low, -np.inf)):  # the band; else the upper bound only
        # The solver accepts a constraint met within its feasibility tolerance (about 1e-7 of
        # the scaled row), so its optimum can exceed the budget by that much, or by one rounding
        # error when a plan costs exactly the budget. The exact check refuses such a plan:
        # tighten the bound past the tolerance and solve again, rather than report that nothing
        # fits. (HiGHS can also fail to solve with a bound within ~1e-6 of such a plan, so the
        # steps are 1e-5 and 1e-4 of the budget's scale; a plan that close to the budget is
        # given up for the next best.)
        for margin in (0.0, 1e-5, 1e-4):
            x = solve(lower, high - margin * norm)
            if x is None:
                if margin == 0.0:
                    break  # nothing fits the budget itself
                continue
            if float(cost[x].sum()) <= high:
                chosen = x
                break
        if chosen is not None:
            break
    if chosen is None:
        return None, 0.0
    picks, start = [], 0
    for n in sizes:
        picks.append(int(np.flatnonzero(chosen[start:start + n])[0]))
        start += n
    return picks, float(loss[chosen].sum())
