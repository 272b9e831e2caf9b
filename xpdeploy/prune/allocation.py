"""Per-block budgets from loss curves at an exact MAC budget: a multiple-choice knapsack.

Every (block, unit type) is a group that must take exactly one option: a kept count k between its
floor and its full size (every head count; MLP widths in multiples of ``round_mlp_to``, the
planner's rule), costing ``k x`` the unit's MACs (:class:`MacModel` is linear) and the loss its
:class:`~xpdeploy.prune.sensitivity.LossCurve` gives at k. The budgets minimise the summed loss
with ``target x (1 - tolerance) <= MACs <= target``: the same band every plan meets (when no
combination lands in the band, the solver keeps only the upper bound and the planner's repair
fills the rest).

Solved exactly as a 0/1 integer programme by HiGHS through ``scipy.optimize.milp`` (one binary
per option, one equality per group, the MAC band as one two-sided row) rather than by a dynamic
programme of our own: a DP needs the MAC axis cut into bins, which is exact only when the unit
costs share a large common divisor; the solver needs no bins, and its result is checked against
exact arithmetic before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xpdeploy.errors import PruneError

if TYPE_CHECKING:
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


def solve_budgets(curves: SensitivityCurves, macs: MacModel, target_macs: float,
                  constraints: PlanConstraints) -> Budgets:
    """The per-block counts with the least summed loss whose MACs meet the budget (see module)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    floor_h, floor_m = constraints.floors(macs)
    groups: list[tuple[list[int], list[float], float]] = []  # (counts, losses, MACs per unit)
    for b, curve in enumerate(curves.heads):
        ks = kept_counts(macs.heads[b], floor_h[b], 1)
        groups.append((ks, [curve.at(k) for k in ks], macs.head_cost[b]))
    for b, curve in enumerate(curves.neurons):
        ks = kept_counts(macs.mlp[b], floor_m[b], constraints.round_mlp_to)
        groups.append((ks, [curve.at(k) for k in ks], macs.neuron_cost[b]))
    blocks = len(curves.heads)
    loss = np.concatenate([np.asarray(g[1]) for g in groups])
    cost = np.concatenate([np.asarray(g[0], dtype=np.float64) * g[2] for g in groups])
    sizes = [len(g[0]) for g in groups]
    one_each = np.zeros((len(groups), loss.size))
    start = 0
    for i, n in enumerate(sizes):
        one_each[i, start:start + n] = 1.0
        start += n
    room = target_macs - macs.fixed  # what the blocks may cost
    low = room - target_macs * constraints.tolerance
    scale = 1.0 / room  # the MAC row in units of the budget: well-conditioned for the solver
    chosen = None
    for lower in (low, -np.inf):  # the band; else the upper bound only (repair fills the rest)
        res = milp(loss, integrality=np.ones(loss.size), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1),
                                LinearConstraint(cost[None, :] * scale, lower * scale, 1.0)],
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.status == 0 and res.x is not None:
            chosen = np.round(res.x).astype(bool)
            if float(cost[chosen].sum()) <= room:  # exact check: solver tolerances are relative
                break
            chosen = None
    if chosen is None:
        raise PruneError(f"no per-block budget fits {target_macs / 1e9:.4g} GMACs under the "
                         "prune constraints; raise the target or lower the floors")
    counts, start = [], 0
    for (ks, _, _), n in zip(groups, sizes, strict=True):
        counts.append(ks[int(np.flatnonzero(chosen[start:start + n])[0])])
        start += n
    return Budgets(heads=counts[:blocks], mlp=counts[blocks:],
                   predicted_loss=float(loss[chosen].sum()))
