"""From unit scores to kept units at an exact MAC budget (docs/method.md, "Stage 2"); pure numpy.

``plan_global`` is docs/method.md's ``ranking: global`` (v1): one queue of every unit, heads and
neurons together, ordered by normalised score, lowest removed first. It is deliberately **not**
ordered by score per MAC saved: a head frees ~150x the MACs of a neuron, so that order strips every
block to its minimum head count first whatever the criterion says (about 25 points of one-shot
accuracy lost in our measurements).

``repair_to_budget`` is the exact-budget repair shared by every ranking (the threshold ranking
calls it with its own initial keep sets): it brings a keep set to ``target*(1-tolerance) <= MACs <=
target`` (when the granularity allows), with every pruned MLP width a multiple of ``round_mlp_to``.

All MACs here are per image and not in G (as :class:`MacModel`), except in messages and
:func:`plan_summary`, which say GMACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy.errors import PruneError
from xpdeploy.prune.unit_scores import KeepSets, Normalize, UnitScores, best_first

if TYPE_CHECKING:
    from xpdeploy.prune.mac_model import MacModel
    from xpdeploy.spec import PruneConfig

# Tie-break order between unit types at equal score: a neuron goes first because it is the finer
# step (it lands closer to the budget); heads only go first when their score is strictly lower.
_NEURON, _HEAD = 0, 1


@dataclass(frozen=True)
class PlanConstraints:
    """What every plan must respect.

    ``min_heads_per_block``: heads kept in every block (>= 1: surgery keeps every attention branch).
    ``round_mlp_to``: every pruned MLP width is a multiple of this (8: tensor-core friendly).
    ``min_mlp_per_block``: floor on every block's MLP width, rounded up to ``round_mlp_to``.
    ``tolerance``: accepted shortfall below the target, as a fraction of it (0.005 = 0.5%).
    ``block_floors``: optional ``{block: (min heads, min neurons)}`` on top of the global floors.
    Floors larger than a block's original size mean "do not prune that unit type there".
    """

    min_heads_per_block: int = 1
    round_mlp_to: int = 8
    min_mlp_per_block: int = 8
    tolerance: float = 0.005
    block_floors: dict[int, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.min_heads_per_block < 1:
            raise PruneError(f"min_heads_per_block is {self.min_heads_per_block}; it must be >= 1 "
                             "(dropping a whole attention branch is not supported)")
        if self.round_mlp_to < 1 or self.min_mlp_per_block < 1:
            raise PruneError(f"round_mlp_to ({self.round_mlp_to}) and min_mlp_per_block "
                             f"({self.min_mlp_per_block}) must be >= 1")
        if not 0 < self.tolerance < 1:
            raise PruneError(f"tolerance is {self.tolerance}; it must be in (0, 1), e.g. 0.005")

    @classmethod
    def from_config(cls, cfg: PruneConfig) -> PlanConstraints:
        """The constraints of a pipeline's ``prune`` section."""
        return cls(min_heads_per_block=cfg.min_heads_per_block, round_mlp_to=cfg.round_mlp_to,
                   min_mlp_per_block=cfg.min_mlp_per_block, tolerance=cfg.tolerance,
                   block_floors=dict(cfg.block_floors) if cfg.block_floors else None)

    def floors(self, macs: MacModel) -> tuple[list[int], list[int]]:
        """Smallest head count and MLP width allowed per block (MLP floor already rounded up)."""
        extra = self.block_floors or {}
        heads, mlp = [], []
        for b, (h0, m0) in enumerate(zip(macs.heads, macs.mlp, strict=True)):
            fh, fm = extra.get(b, (0, 0))
            heads.append(min(h0, max(self.min_heads_per_block, int(fh))))
            m = max(self.min_mlp_per_block, int(fm))
            mlp.append(min(m0, math.ceil(m / self.round_mlp_to) * self.round_mlp_to))
        return heads, mlp


def plan_global(
    scores: UnitScores,
    macs: MacModel,
    target_macs: float,
    constraints: PlanConstraints,
    normalize: Normalize = "type",
) -> KeepSets:
    """Kept units at ``target_macs`` (MACs per image) by the global v1 ranking.

    Scores are normalised (``type``: per unit type across all blocks, the default and the
    layer-adaptive one; ``block``: per block and type; ``none``), then the lowest-scored units are
    removed, heads and neurons in one queue, until the MACs fit; then widths are rounded and the
    budget repaired exactly (:func:`repair_to_budget`).
    """
    if normalize not in ("type", "block", "none"):
        raise PruneError(f"normalize is {normalize!r}; use one of type | block | none")
    _check_scores(scores, macs)
    full = KeepSets.full(list(macs.heads), list(macs.mlp))
    return repair_to_budget(full, scores.normalized(normalize), macs, target_macs, constraints)


def repair_to_budget(
    keep: KeepSets,
    scores: UnitScores,
    macs: MacModel,
    target_macs: float,
    constraints: PlanConstraints,
) -> KeepSets:
    """Bring ``keep`` to ``target*(1-tolerance) <= MACs <= target`` with rounded MLP widths.

    ``scores`` must already be normalised (the caller chose how). Steps:
    (0) blocks below a floor get their best removed units back (a threshold plan may undershoot);
    (1) while MACs > target, remove the lowest-scored kept unit that a floor does not protect;
    (2) round every pruned MLP width down to a multiple of ``round_mlp_to`` (never below the floor),
    dropping the block's lowest-scored kept neurons; an MLP at its original width stays as it is;
    (3) while MACs < target*(1-tolerance), add back the highest-scored removed unit that still fits:
    a head, or a block's best ``round_mlp_to`` removed neurons as one group (ranked by their mean
    score; fewer when that restores the original width), until nothing fits.
    Deterministic: ties are broken by (type, block, index).
    """
    _check_scores(scores, macs)
    _check_keep(keep, macs)
    check_target(target_macs, macs, constraints)
    floor_h, floor_m = constraints.floors(macs)
    r = constraints.round_mlp_to
    hs = [np.asarray(s, dtype=np.float64) for s in scores.heads]
    ns = [np.asarray(s, dtype=np.float64) for s in scores.neurons]
    kh = [_mask(k, n) for k, n in zip(keep.heads, macs.heads, strict=True)]
    kn = [_mask(k, n) for k, n in zip(keep.neurons, macs.mlp, strict=True)]

    def total() -> float:
        return float(macs.macs([int(k.sum()) for k in kh], [int(k.sum()) for k in kn]))

    # (0) floors: add back each block's best removed units up to its floor.
    for b in range(len(kh)):
        _restore_best(kh[b], hs[b], floor_h[b])
        _restore_best(kn[b], ns[b], floor_m[b])

    # (1) one queue of kept units, lowest normalised score first.
    current = total()
    if current > target_macs:
        queue = _queue(hs, ns, kh, kn)
        counts_h = [int(k.sum()) for k in kh]
        counts_n = [int(k.sum()) for k in kn]
        for _, kind, b, i in queue:
            if kind == _HEAD:
                if counts_h[b] <= floor_h[b]:
                    continue
                kh[b][i] = False
                counts_h[b] -= 1
            else:
                if counts_n[b] <= floor_m[b]:
                    continue
                kn[b][i] = False
                counts_n[b] -= 1
            current = float(macs.macs(counts_h, counts_n))
            if current <= target_macs:
                break

    # (2) round pruned MLP widths down to a multiple of r (not below the floor, itself a multiple
    # of r unless it is the original width).
    for b, k in enumerate(kn):
        width = int(k.sum())
        if width == macs.mlp[b] or width % r == 0:
            continue
        goal = max(floor_m[b], (width // r) * r)
        kept = np.flatnonzero(k)
        order = kept[np.lexsort((kept, ns[b][kept]))]  # lowest score first, then lowest index
        k[order[: width - goal]] = False

    # (3) add back the best removed units that still fit, until within tolerance. Removed sets
    # only shrink here, and always from the top of their block's order, so each block's removed
    # units are ordered once (best first, then lowest index) and consumed from a cursor.
    low = target_macs * (1.0 - constraints.tolerance)
    counts_h = [int(k.sum()) for k in kh]
    counts_n = [int(k.sum()) for k in kn]
    order_h = [best_first(s, np.flatnonzero(~k)) for k, s in zip(kh, hs, strict=True)]
    order_n = [best_first(s, np.flatnonzero(~k)) for k, s in zip(kn, ns, strict=True)]
    next_h, next_n = [0] * len(kh), [0] * len(kn)
    current = float(macs.macs(counts_h, counts_n))
    while current < low:
        best = None  # ((score, -kind, -block, -first index), kind, block, units); max wins
        for b in range(len(kh)):
            if next_h[b] < order_h[b].size and _fits(macs, counts_h, counts_n, b, 1, 0,
                                                     target_macs):
                i = int(order_h[b][next_h[b]])
                cand = (float(hs[b][i]), -_HEAD, -b, -i)
                if best is None or cand > best[0]:
                    best = (cand, _HEAD, b, order_h[b][next_h[b]:next_h[b] + 1])
            # fewer than r left only when the group restores the original width
            group = order_n[b][next_n[b]:next_n[b] + r]
            if group.size and _fits(macs, counts_h, counts_n, b, 0, group.size, target_macs):
                cand = (float(ns[b][group].mean()), -_NEURON, -b, -int(group.min()))
                if best is None or cand > best[0]:
                    best = (cand, _NEURON, b, group)
        if best is None:
            break
        _, kind, b, idx = best
        if kind == _HEAD:
            kh[b][idx] = True
            counts_h[b] += idx.size
            next_h[b] += idx.size
        else:
            kn[b][idx] = True
            counts_n[b] += idx.size
            next_n[b] += idx.size
        current = float(macs.macs(counts_h, counts_n))

    assert current <= target_macs, "repair must never exceed the target"
    return KeepSets(heads=[np.flatnonzero(k).astype(np.int64) for k in kh],
                    neurons=[np.flatnonzero(k).astype(np.int64) for k in kn])


def smallest_macs(macs: MacModel, constraints: PlanConstraints) -> float:
    """MACs per image of the smallest model the constraints allow."""
    floor_h, floor_m = constraints.floors(macs)
    return float(macs.macs(floor_h, floor_m))


def plan_summary(keep: KeepSets, macs: MacModel) -> dict[str, Any]:
    """Per-block heads and MLP neurons kept/removed, MACs before and after (GMACs), their ratio."""
    _check_keep(keep, macs)
    before = float(macs.original)
    after = float(macs.macs(keep.head_counts, keep.mlp_widths))
    blocks = [
        {"block": b, "heads_kept": hk, "heads_removed": h0 - hk, "mlp_kept": mk,
         "mlp_removed": m0 - mk}
        for b, (hk, h0, mk, m0) in enumerate(
            zip(keep.head_counts, macs.heads, keep.mlp_widths, macs.mlp, strict=True))
    ]
    return {
        "blocks": blocks,
        "heads_kept": sum(keep.head_counts),
        "heads_total": sum(macs.heads),
        "mlp_kept": sum(keep.mlp_widths),
        "mlp_total": sum(macs.mlp),
        "gmacs_before": before / 1e9,
        "gmacs_after": after / 1e9,
        "ratio": after / before,
    }


# ---------------------------------------------------------------------------------------------


def _queue(
    hs: list[np.ndarray], ns: list[np.ndarray], kh: list[np.ndarray], kn: list[np.ndarray]
) -> list[tuple[float, int, int, int]]:
    """Every kept unit as (score, kind, block, index), sorted ascending (lowest removed first)."""
    items: list[tuple[float, int, int, int]] = []
    for b in range(len(kh)):
        items += [(float(hs[b][i]), _HEAD, b, int(i)) for i in np.flatnonzero(kh[b])]
        items += [(float(ns[b][i]), _NEURON, b, int(i)) for i in np.flatnonzero(kn[b])]
    items.sort()
    return items


def _fits(macs: MacModel, counts_h: list[int], counts_n: list[int], b: int, dh: int, dn: int,
          target: float) -> bool:
    """Whether block b can take dh more heads and dn more neurons within ``target`` (exact)."""
    h, n = list(counts_h), list(counts_n)
    h[b] += dh
    n[b] += dn
    return float(macs.macs(h, n)) <= target


def _mask(indices: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[np.asarray(indices, dtype=np.int64)] = True
    return m


def _restore_best(kept: np.ndarray, scores: np.ndarray, floor: int) -> None:
    """Mark the best-scored removed units kept until ``floor`` are kept (in place)."""
    missing = floor - int(kept.sum())
    if missing <= 0:
        return
    kept[best_first(scores, np.flatnonzero(~kept))[:missing]] = True


def _check_scores(scores: UnitScores, macs: MacModel) -> None:
    got = ([len(h) for h in scores.heads], [len(n) for n in scores.neurons])
    want = (list(macs.heads), list(macs.mlp))
    if got != want:
        raise PruneError(f"scores cover heads {got[0]} / neurons {got[1]} per block but the model "
                         f"has {want[0]} / {want[1]}; recompute the scores on this model")
    for t in [*scores.heads, *scores.neurons]:
        if not np.all(np.isfinite(t)):
            raise PruneError("scores contain NaN or inf; recompute them (mask learning diverged?)")


def _check_keep(keep: KeepSets, macs: MacModel) -> None:
    if len(keep.heads) != len(macs.heads) or len(keep.neurons) != len(macs.mlp):
        raise PruneError(f"plan has {len(keep.heads)} blocks but the model has "
                         f"{len(macs.heads)}; make the plan on this model")
    for b, (h, n) in enumerate(zip(keep.heads, keep.neurons, strict=True)):
        for idx, size, what in ((h, macs.heads[b], "head"), (n, macs.mlp[b], "neuron")):
            idx = np.asarray(idx)
            if idx.size and (idx.min() < 0 or idx.max() >= size or np.unique(idx).size != idx.size):
                raise PruneError(f"block {b}: kept {what} indices must be unique and in "
                                 f"[0, {size}); make the plan on this model")


def check_target(target: float, macs: MacModel, constraints: PlanConstraints) -> None:
    """One-line :class:`PruneError` when no plan can reach ``target`` (MACs per image): the stage
    asks before it scores or measures anything, so an impossible target costs no minutes."""
    original = float(macs.original)
    if target >= original:
        raise PruneError(f"nothing to prune; target {target / 1e9:.4g} GMACs >= original "
                         f"{original / 1e9:.4g} GMACs; use target_ratio < 1")
    smallest = smallest_macs(macs, constraints)
    if target < smallest:
        raise PruneError(
            f"target {target / 1e9:.4g} GMACs is below the smallest model the constraints allow "
            f"({smallest / 1e9:.4g} GMACs with min_heads_per_block="
            f"{constraints.min_heads_per_block}, min_mlp_per_block={constraints.min_mlp_per_block}"
            f", round_mlp_to={constraints.round_mlp_to}); raise the target or lower "
            "min_heads_per_block / min_mlp_per_block")
