"""Pass/fail gates of a candidate vs the original (``verify.gates`` in the pipeline file).

A gate set to ``null`` is off and yields no result. A gate that is on but cannot be measured is
reported explicitly: the top-1 gate on synthetic data is *skipped* (value ``None``, detail says
why), never shown as a measured pass. A NaN value fails its gate, because NaN never compares as
within a limit. A speedup whose interleaved rounds disagree by more than ``verify.max_spread`` is
*unstable*: the min_speedup gate fails on it, with a detail that says how to get a stable figure,
rather than passing or failing on a number that another run would not reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from xpdeploy.artifacts import GateResult
from xpdeploy.spec import GatesConfig

SKIPPED_SYNTHETIC = "skipped: synthetic data has no accuracy"
SKIPPED_NO_TOP1 = "skipped: no top-1 accuracy was measured"
UNSTABLE_FIX = "rerun on a quieter machine, raise verify.iters/rounds, or set verify.threads: 1"


def fmt_spread(spread: float) -> str:
    """A spread (half-range / median, a fraction) as "+-3%" ("+-0.4%" below 1%, "+-?" if unknown).
    """
    if not math.isfinite(spread):
        return "+-?"
    return f"+-{spread:.1%}" if spread < 0.01 else f"+-{spread:.0%}"


def fmt_speedup(value: float, spread: float | None = None, unstable: bool = False) -> str:
    """A speedup with the spread of its rounds: "1.85x +-3%", "2.10x +-14% (unstable)"; just
    "1.85x" when no spread was measured (results from before rounds)."""
    text = f"{value:.2f}x" + ("" if spread is None else f" {fmt_spread(spread)}")
    return text + (" (unstable)" if unstable else "")


def _pair(value: float, limit: float, spec: str) -> tuple[str, str]:
    """Format value and limit with ``spec``; add digits where unequal values would look equal.

    Without this, agreement 0.98999 against a 0.99 limit would read "0.99 < 0.99".
    """
    a, b = format(value, spec), format(limit, spec)
    if a != b or value == limit or math.isnan(value):
        return a, b
    for digits in range(4, 18):
        a, b = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if a != b:
            return a, b
    return repr(value), repr(limit)


def _check(
    name: str,
    label: str,
    value: float,
    limit: float,
    *,
    at_most: bool,
    spec: str,
    unit: str = "",
) -> GateResult:
    """``value <= limit`` (at_most) or ``value >= limit``; the detail states the comparison.

    ``spec`` is the format of both numbers in the detail, e.g. ".4g" or ".2e".
    """
    passed = value <= limit if at_most else value >= limit
    op = ("<=" if passed else ">") if at_most else (">=" if passed else "<")
    v, lim = _pair(value, limit, spec)
    detail = f"{label} {v}{unit} {op} {lim}{unit}"
    return GateResult(name=name, value=value, limit=limit, passed=passed, detail=detail)


def evaluate_gates(
    gates: GatesConfig,
    *,
    top1: float | None = None,
    top1_delta: float | None,
    agreement: float,
    max_abs_diff: float,
    cosine: float,
    speedup: dict[int, float],
    synthetic: bool,
    unstable: Collection[int] = (),
    speedup_spread: Mapping[int, float] | None = None,
    max_spread: float | None = None,
) -> list[GateResult]:
    """One :class:`GateResult` per gate that is on, in the order of :class:`GatesConfig`.

    top1: the candidate's top-1 (%); top1_delta: candidate top-1 minus original top-1, in
    percentage points (negative = a drop).
    agreement: share (0..1) of samples with the original's top-1 class.
    max_abs_diff: largest absolute logit difference. cosine: mean logit cosine similarity.
    speedup: batch size -> original p50 / candidate p50; the gate reads the worst batch size.
    unstable: batch sizes whose speedup is not trusted (its rounds disagree by more than
    ``max_spread``); the speedup gate fails on any of them. speedup_spread (batch size -> spread,
    a fraction) and max_spread only word that failure.
    """
    out: list[GateResult] = []
    g = gates
    if g.max_top1_drop is not None:
        if synthetic or top1_delta is None:
            detail = SKIPPED_SYNTHETIC if synthetic else SKIPPED_NO_TOP1
            out.append(
                GateResult(
                    name="max_top1_drop",
                    value=None,
                    limit=g.max_top1_drop,
                    passed=True,
                    detail=detail,
                )
            )
        else:
            drop = -top1_delta  # percentage points lost; negative when the candidate is better
            out.append(
                _check(
                    "max_top1_drop",
                    "top-1 drop",
                    drop,
                    g.max_top1_drop,
                    at_most=True,
                    spec=".2f",
                    unit=" pts",
                )
            )
    if g.min_top1 is not None:
        if synthetic or top1 is None:
            out.append(GateResult(name="min_top1", value=None, limit=g.min_top1, passed=True,
                                  detail=SKIPPED_SYNTHETIC if synthetic else SKIPPED_NO_TOP1))
        else:
            out.append(_check("min_top1", "top-1", top1, g.min_top1, at_most=False, spec=".2f",
                              unit=" %"))
    if g.min_agreement is not None:
        out.append(
            _check(
                "min_agreement", "agreement", agreement, g.min_agreement, at_most=False, spec=".4g"
            )
        )
    if g.max_abs_diff is not None:
        out.append(
            _check(
                "max_abs_diff",
                "max abs diff",
                max_abs_diff,
                g.max_abs_diff,
                at_most=True,
                spec=".2e",
            )
        )
    if g.min_cosine is not None:
        out.append(_check("min_cosine", "cosine", cosine, g.min_cosine, at_most=False, spec=".6f"))
    if g.min_speedup is not None:
        out.append(_speedup_gate(speedup, g.min_speedup, unstable, speedup_spread or {},
                                 max_spread))
    return out


def _speedup_gate(speedup: dict[int, float], limit: float, unstable: Collection[int] = (),
                  spread: Mapping[int, float] | None = None, max_spread: float | None = None
                  ) -> GateResult:
    """The slowest batch size decides: a model faster at batch 32 but slower at 1 is not faster.

    Every batch size is read to find the slowest, so an unstable figure at any of them fails the
    gate (its true value may be the lowest), unless a stable figure already fails it: then the
    detail names that one, since no rerun would make it pass.
    """
    if not speedup:
        return GateResult(
            name="min_speedup",
            value=None,
            limit=limit,
            passed=False,
            detail="no latency was measured, so the speedup gate cannot pass",
        )
    batch, worst = min(speedup.items(), key=lambda kv: (kv[1], kv[0]))
    if any(math.isnan(s) for s in speedup.values()):
        batch, worst = next((b, s) for b, s in speedup.items() if math.isnan(s))
    res = _check("min_speedup", "speedup", worst, limit, at_most=False, spec=".2f", unit="x")
    shaky = sorted((b for b in speedup if b in unstable),
                   key=lambda b: (math.isnan(speedup[b]), speedup[b], b))
    if not shaky:
        return res.model_copy(update={"detail": f"{res.detail} (batch {batch})"})
    if not res.passed and (batch not in unstable or math.isnan(worst)):
        # a stable (or unmeasurable) figure fails by itself: no rerun would make it pass
        listed = ", ".join(str(b) for b in shaky)
        return res.model_copy(update={
            "detail": f"{res.detail} (batch {batch}); unstable at batch {listed}"})
    first, rest = shaky[0], shaky[1:]
    spreads = spread or {}
    how = "rounds disagree" + (f" by {fmt_spread(spreads[first])}" if first in spreads else "")
    how += f" > {fmt_spread(max_spread)}" if max_spread is not None else " beyond verify.max_spread"
    more = f"; also unstable at batch {', '.join(str(b) for b in rest)}" if rest else ""
    return GateResult(
        name="min_speedup", value=speedup[first], limit=limit, passed=False,
        detail=f"speedup {speedup[first]:.2f}x at batch {first} is unstable ({how}){more}: "
               f"{UNSTABLE_FIX}")
