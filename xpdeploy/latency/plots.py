"""PNG plot of a latency table: per block shape, ms per batch against MLP width, one line per
head count, unstable points crossed, and the validation models' predicted against measured
latency. It goes into the run report, so a reader sees what the budget was spent on."""

from __future__ import annotations

from pathlib import Path

from xpdeploy.figures import figure
from xpdeploy.latency.table import LatencyModel

PLOT_NAME = "latency_table.png"


def plot_latency_table(table: LatencyModel, folder: Path) -> list[Path]:
    """Draw ``table`` into ``folder``/latency_table.png; returns the paths written."""
    path = folder / PLOT_NAME
    panels = len(table.shapes) + 1
    with figure(path, 1, panels, figsize=(5 * panels, 4), squeeze=False) as (fig, axes):
        for ax, (i, shape) in zip(axes[0], enumerate(table.shapes), strict=False):
            for heads in range(1, shape.heads + 1):
                pts = sorted((p for p in shape.points if p.heads == heads), key=lambda p: p.mlp)
                line = ax.plot([p.mlp for p in pts], [p.ms for p in pts], marker=".", ms=3,
                               lw=1, label=f"{heads} heads")[0]
                bad = [p for p in pts if not p.stable]
                if bad:
                    ax.scatter([p.mlp for p in bad], [p.ms for p in bad], marker="x", s=30,
                               color=line.get_color())
            first, last = shape.blocks[0], shape.blocks[-1]
            ax.set_title(f"shape {i} (blocks {first}..{last}): ms per block", fontsize=9)
            ax.set_xlabel("MLP width kept")
            ax.set_ylabel(f"ms per batch of {table.key.batch}")
            ax.legend(fontsize=7)
        ax = axes[0][-1]
        rows = table.validation
        if rows:
            ax.scatter([r.measured_ms for r in rows], [r.predicted_ms for r in rows], s=20)
            lo = min(min(r.measured_ms, r.predicted_ms) for r in rows)
            hi = max(max(r.measured_ms, r.predicted_ms) for r in rows)
            ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
            for r in rows:
                ax.annotate(f"{r.error_pct:+.1f}%", (r.measured_ms, r.predicted_ms), fontsize=7)
        ax.set_title("whole pruned models: predicted vs measured", fontsize=9)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms")
        fig.suptitle(f"{table.key.arch_name} on {table.key.runtime} ({table.key.precision}), "
                     f"batch {table.key.batch}; x = unstable", fontsize=10)
        fig.tight_layout()
    return [path]
