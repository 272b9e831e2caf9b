"""PNG plots for the report, drawn through :mod:`xpdeploy.figures` (Agg backend, atomic PNG).

``latency.png`` (:func:`plot_latency`) draws every candidate as a *pair* of adjacent bars: the
baseline it was timed against and the candidate itself, both from the same interleaved run (the
candidate's ``baseline_latency_ms`` and ``latency_ms`` rows). A speedup only compares numbers
within such a pair. Two candidates timed against "the original" get two different baseline
figures (the machine drifts between their runs, and the baseline may be a different file), so
one shared "original" bar would set a candidate beside a number it was never timed against: a
candidate labelled 1.17x faster could then be drawn taller than the original.

matplotlib is imported only when a plot is drawn, so importing :mod:`xpdeploy.report` stays cheap
and works where matplotlib is missing until a plot is actually requested.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xpdeploy.figures import figure
from xpdeploy.report.markdown import NA, candidate_speedup

BAR_WIDTH = 0.38
"""Width of one bar; a pair's bars sit at -/+ half a width around its centre, pairs 1.0 apart
(the gap between pairs is 1 - 2 * BAR_WIDTH)."""
MIN_SLOTS = 5
"""A panel is at least this many pairs wide, so a report with one or two candidates gets bars of a
sensible width."""
MAX_LABEL = 30
"""Tick labels longer than this many characters are shortened in the middle."""


@dataclass(frozen=True)
class BarStats:
    """One runner's latency at one batch size, ms per batch: the bar (p50) and its whisker.

    ``p10`` is None in reports written before it was recorded: the whisker then starts at p50.
    """

    p50: float
    p10: float | None
    p90: float | None

    @property
    def whisker(self) -> tuple[float, float]:
        """(low, high) end of the whisker: p10 (p50 when p10 is missing) to p90."""
        low = self.p50 if self.p10 is None else min(self.p10, self.p50)
        high = self.p50 if self.p90 is None else max(self.p90, self.p50)
        return low, high

    @classmethod
    def of(cls, row: Mapping[str, Any] | None) -> BarStats | None:
        """From a report's latency row; None without a row or without a finite p50."""
        if row is None or _number(row.get("p50")) is None:
            return None
        return cls(p50=float(row["p50"]), p10=_number(row.get("p10")),
                   p90=_number(row.get("p90")))


@dataclass(frozen=True)
class Pair:
    """One candidate at one batch size, beside the baseline it was timed against.

    Both stats come from the same interleaved run: ``candidate`` from the candidate's
    ``latency_ms`` row of this batch, ``base`` from its own ``baseline_latency_ms`` row (None when
    that batch was not measured). ``speedup``: the candidate's speedup as written above the pair,
    with the spread of its rounds ("1.85x +-3%", "2.10x +-14% (unstable)"), "n/a" when the
    candidate was not measured at this batch (or the speedup is not finite).
    """

    name: str
    runner: str
    baseline: str
    candidate: BarStats | None
    base: BarStats | None
    speedup: str
    unstable: bool


def _number(x: Any) -> float | None:
    """A finite float, or None (missing, null in the JSON, not a number)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _row(rows: list[Mapping[str, Any]] | None, batch: int) -> Mapping[str, Any] | None:
    return next((r for r in rows or [] if int(r["batch"]) == batch), None)


def _pairs_per_batch(report: Mapping[str, Any]) -> dict[int, list[Pair]]:
    """For each batch size (ascending), one :class:`Pair` per candidate in the report's order.

    Every candidate appears at every batch size (so the pairs line up across panels); one not
    measured at a batch size has ``candidate`` None and speedup "n/a".
    """
    cands = report["candidates"]
    batches = sorted({int(row["batch"]) for c in cands
                      for key in ("latency_ms", "baseline_latency_ms") for row in c[key]})
    out: dict[int, list[Pair]] = {}
    for b in batches:
        pairs = []
        for c in cands:
            stats = BarStats.of(_row(c["latency_ms"], b))
            pairs.append(Pair(
                name=c["name"],
                runner=c["runner"],
                baseline=c.get("baseline", "original"),
                candidate=stats,
                base=BarStats.of(_row(c["baseline_latency_ms"], b)),
                speedup=candidate_speedup(c, b) if stats is not None else NA,
                unstable=stats is not None and b in (c.get("unstable") or []),
            ))
        out[b] = pairs
    return out


def _whisker_note(groups: Mapping[int, list[Pair]]) -> str:
    """What the whiskers span: p10-p90, or p50-p90 where the report predates p10."""
    stats = [s for pairs in groups.values() for p in pairs for s in (p.base, p.candidate)
             if s is not None]
    with_p10 = [s.p10 is not None for s in stats]
    if all(with_p10):
        return "whisker p10-p90 of all timed calls"
    if not any(with_p10):
        return "whisker p50-p90: this report predates p10"
    return "whisker p10-p90; p50-p90 where p10 was not recorded"


def _short(name: str, limit: int = MAX_LABEL) -> str:
    """``name``, shortened in the middle to ``limit`` characters."""
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[: (keep + 1) // 2] + "\u2026" + name[len(name) - keep // 2:]


def plot_latency(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG of p50 latency (ms per batch): each candidate beside its own baseline.

    One panel per batch size, stacked (each with its own y scale, since batch 1 and batch 32
    differ by an order of magnitude; candidates line up in columns). In each panel every candidate
    is a pair of bars from one interleaved run (:func:`_pairs_per_batch`): the baseline it was
    timed against (light, hatched, labelled with the baseline's name) and the candidate (solid),
    each at its p50 with a whisker from p10 to p90 over all timed calls of the rounds (from p50 in
    reports written before p10; the title says so). Above each pair, the candidate's speedup with
    the spread of its rounds (:func:`~xpdeploy.report.markdown.candidate_speedup`); an unstable
    one in red. A candidate not measured at a batch size shows "n/a" there.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = _pairs_per_batch(report)
    names = [c["name"] for c in report["candidates"]]
    baselines = [c.get("baseline", "original") for c in report["candidates"]]
    rows = max(len(groups), 1)
    longest = max((len(_short(n)) for n in names + baselines), default=0)
    width = max(8.5, 1.4 + 0.95 * len(names))  # the legend needs about 8.5 in
    height = 1.3 + 2.3 * rows + 0.05 * longest  # labels at 50 degrees, ~0.065 in a character
    with figure(path, rows, 1, figsize=(width, height), squeeze=False, sharex=True,
                layout="constrained", dpi=120) as (fig, axes):
        fig.suptitle(f"{report['pipeline']}: p50 latency per batch, each candidate beside the "
                     f"baseline it was timed against\n(interleaved in the same run; "
                     f"{_whisker_note(groups)})", fontsize=10)
        if not groups:
            ax = axes[0][0]
            ax.text(0.5, 0.5, "no latency was measured", ha="center", va="center")
            ax.set_axis_off()
            return
        for (ax,), (batch, pairs) in zip(axes, groups.items(), strict=True):
            _draw_panel(ax, batch, pairs)
        _label_pairs(axes[-1][0], names, baselines)
        grey = "0.35"
        handles = [
            Patch(facecolor=(0.35, 0.35, 0.35, 0.25), edgecolor=grey, hatch="////",
                  label="baseline (timed interleaved with the candidate to its right)"),
            Patch(facecolor=grey, edgecolor=grey, label="candidate"),
            Line2D([], [], color="black", linestyle="none", marker="|", markersize=10,
                   label=_whisker_note(groups)),
            Patch(facecolor="none", edgecolor="none",
                  label="above a pair: its speedup, +- spread of the rounds (red: unstable)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8,
                   frameon=False)


def _draw_panel(ax: Any, batch: int, pairs: list[Pair]) -> None:
    """One batch size: per candidate its baseline's bar and its own, whiskers, speedup above."""
    tops = [s.whisker[1] for p in pairs for s in (p.base, p.candidate) if s is not None]
    top = max(tops, default=0.0) or 1.0
    for i, pair in enumerate(pairs):
        color = f"C{i % 10}"
        for stats, dx, baseline in ((pair.base, -BAR_WIDTH / 2, True),
                                    (pair.candidate, BAR_WIDTH / 2, False)):
            if stats is None:
                continue
            x = i + dx
            if baseline:
                ax.bar(x, stats.p50, BAR_WIDTH, facecolor=(*_rgb(color), 0.25), edgecolor=color,
                       hatch="////", linewidth=1.0)
            else:
                ax.bar(x, stats.p50, BAR_WIDTH, color=color, edgecolor=color, linewidth=1.0)
            low, high = stats.whisker
            ax.errorbar(x, stats.p50, yerr=[[stats.p50 - low], [high - stats.p50]], fmt="none",
                        ecolor="black", elinewidth=1.0, capsize=3)
        if pair.candidate is None:
            ax.text(i, 0.03 * top, NA, ha="center", va="bottom", fontsize=8, color="0.4")
            continue
        heights = [s.whisker[1] for s in (pair.base, pair.candidate) if s is not None]
        text = pair.speedup.replace(" +-", "\n+-").replace(" (unstable)", "\nunstable")
        ax.text(i, max(heights) + 0.03 * top, text, ha="center", va="bottom", fontsize=8,
                multialignment="center",
                color="red" if pair.unstable else "black")
    ax.set_ylim(0, top * 1.4)  # room for up to three lines of speedup label
    pad = max(0.0, (MIN_SLOTS - len(pairs)) / 2)  # few candidates: narrower bars, centred
    ax.set_xlim(-0.6 - pad, len(pairs) - 0.4 + pad)
    ax.set_title(f"batch {batch}", loc="left", fontsize=9)
    ax.set_ylabel("ms per batch")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _label_pairs(ax: Any, names: list[str], baselines: list[str]) -> None:
    """Tick labels under every bar: the baseline's name (grey, italic), then the candidate's."""
    ticks, labels = [], []
    for i, (name, base) in enumerate(zip(names, baselines, strict=True)):
        ticks += [i - BAR_WIDTH / 2, i + BAR_WIDTH / 2]
        labels += [_short(base), _short(name)]
    ax.set_xticks(ticks, labels, rotation=50, ha="right", rotation_mode="anchor", fontsize=8)
    for j, label in enumerate(ax.get_xticklabels()):
        if j % 2 == 0:
            label.set_color("0.4")
            label.set_fontstyle("italic")
    ax.tick_params(axis="x", length=0)


def _rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)
