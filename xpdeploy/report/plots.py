"""PNG plots for the report, drawn through :mod:`xpdeploy.figures` (Agg backend, atomic PNG).

matplotlib is imported only when a plot is drawn, so importing :mod:`xpdeploy.report` stays cheap
and works where matplotlib is missing until a plot is actually requested.
"""

from __future__ import annotations

import os
from typing import Any

from xpdeploy.figures import figure
from xpdeploy.report.markdown import candidate_speedup

Bar = tuple[str, float | None, float | None, float | None, str | None]
"""(label, p50 ms, p90 ms, speedup vs the original or None, the speedup as written above the bar
with the spread of its rounds, e.g. "1.85x +-3%" or "2.10x +-14% (unstable)", or None)."""


def _bars_per_batch(report: dict[str, Any]) -> dict[int, list[Bar]]:
    """For each batch size: the original's bar, then one bar per candidate.

    Each candidate's speedup is against the original timed interleaved with *that* candidate; the
    original's bar shows the baseline timed next to the first candidate measured at that batch.
    """
    out: dict[int, list[Bar]] = {}
    cands = report["candidates"]
    batches = sorted({row["batch"] for c in cands for row in c["latency_ms"]})
    for b in batches:
        base = next(
            (row for c in cands for row in c["baseline_latency_ms"] if row["batch"] == b), None
        )
        bars: list[Bar] = [
            (
                f"original ({report['original']['runner']})",
                base["p50"] if base else None,
                base["p90"] if base else None,
                None,
                None,
            )
        ]
        for c in cands:
            row = next((r for r in c["latency_ms"] if r["batch"] == b), None)
            bars.append(
                (
                    f"{c['name']} ({c['runner']})",
                    row["p50"] if row else None,
                    row["p90"] if row else None,
                    c["speedup"].get(str(b)),
                    candidate_speedup(c, b) if c["speedup"].get(str(b)) is not None else None,
                )
            )
        out[b] = bars
    return out


def plot_latency(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG of p50 latency (ms per batch) per batch size: original vs every candidate.

    One panel per batch size (each with its own y scale, since batch 1 and batch 32 differ by an
    order of magnitude), bars coloured consistently by model, error bars from p50 up to p90, and
    each candidate's speedup (original p50 / candidate p50) written above its bar with the spread
    of its rounds; an unstable one says so, in red.
    """
    groups = _bars_per_batch(report)
    n = max(len(groups), 1)
    per_panel = len(report["candidates"]) + 1
    with figure(path, 1, n, figsize=(1.0 + n * (0.9 * per_panel + 1.2), 4.2), squeeze=False,
                dpi=120) as (fig, axes):
        fig.suptitle(f"{report['pipeline']}: p50 latency per batch (error bar to p90)")
        if not groups:
            ax = axes[0][0]
            ax.text(0.5, 0.5, "no latency was measured", ha="center", va="center")
            ax.set_axis_off()
        for ax, (batch, bars) in zip(axes[0], groups.items(), strict=False):
            _draw_panel(ax, batch, bars)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
        fig.tight_layout(rect=(0, 0.12 if handles else 0, 1, 0.93))


def _draw_panel(ax: Any, batch: int, bars: list[Bar]) -> None:
    """One batch size: a bar per model at its p50, whisker up to p90, speedup labels on top."""
    xs = list(range(len(bars)))
    p50 = [b[1] if b[1] is not None else 0.0 for b in bars]
    up = [max(b[2] - b[1], 0.0) if b[1] is not None and b[2] is not None else 0.0 for b in bars]
    for i, (label, value, _, _, _) in enumerate(bars):
        ax.bar(
            xs[i],
            p50[i],
            yerr=[[0.0], [up[i]]],
            capsize=4,
            color=f"C{i % 10}",
            label=label,
            hatch=None if value is not None else "//",
        )
    top = max((p + u for p, u in zip(p50, up, strict=True)), default=0.0) or 1.0
    for i, (_, value, _, _, speedup) in enumerate(bars):
        if value is None:
            text = "n/a"
        elif speedup is None:
            continue
        else:
            text = speedup.replace(" +-", "\n+-").replace(" (unstable)", "\nunstable")
        ax.text(xs[i], p50[i] + up[i] + 0.02 * top, text, ha="center", va="bottom", fontsize=9,
                color="red" if "unstable" in text else "black")
    ax.set_ylim(0, top * 1.3)  # room for up to three lines of speedup label
    ax.set_xticks(xs)
    ax.set_xticklabels([])
    ax.tick_params(axis="x", length=0)
    ax.set_title(f"batch {batch}")
    ax.set_ylabel("p50 latency (ms)")
