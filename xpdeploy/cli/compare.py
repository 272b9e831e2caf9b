"""``xpdeploy compare BASE.json NEW.json``: the regression gate between two runs (the comparison
itself, its exit codes and pages: :mod:`xpdeploy.report.compare`); imports no torch."""

from __future__ import annotations

import math
from pathlib import Path

import click

from xpdeploy.cli.guard import guarded
from xpdeploy.report.compare import (
    DEFAULT_MAX_REGRESSION,
    DEFAULT_MAX_TOP1_DROP,
    ComparisonError,
    RegressionError,
    compare_reports,
    comparison_markdown,
    comparison_text,
    load_report,
    parse_fraction,
    regression_message,
)


def _run_compare(base_path: Path, new_path: Path, max_regression: str, max_top1_drop: float,
                 markdown: Path | None) -> None:
    try:
        bound = parse_fraction(max_regression)
    except ValueError as e:
        raise ComparisonError(f"--max-regression {e}") from None
    if not math.isfinite(max_top1_drop) or max_top1_drop < 0:
        raise ComparisonError(f"--max-top1-drop {max_top1_drop} must be >= 0 (percentage points)")
    base, new = load_report(base_path, "BASE"), load_report(new_path, "NEW")
    result = compare_reports(base, new, max_regression=bound, max_top1_drop=max_top1_drop)
    click.echo(comparison_text(result))
    if markdown is not None:
        from xpdeploy.fileio import write_text_atomic

        write_text_atomic(markdown, comparison_markdown(result, str(base_path), str(new_path)))
    if not result.passed:
        raise RegressionError(regression_message(result))
    click.echo(f"PASSED | compare | {len(result.latency)} latency and {len(result.accuracy)} "
               f"top-1 rows within bounds")


@click.command()
@click.argument("base", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("new", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--max-regression", default=DEFAULT_MAX_REGRESSION, show_default=True,
              metavar="BOUND", help="Allowed p50 slow-down per candidate and batch: 5% or 0.05.")
@click.option("--max-top1-drop", default=DEFAULT_MAX_TOP1_DROP, show_default=True, type=float,
              metavar="PTS", help="Allowed top-1 drop per candidate, in percentage points.")
@click.option("--markdown", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the comparison as a Markdown page to this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compare(base: Path, new: Path, max_regression: str, max_top1_drop: float,
            markdown: Path | None, debug: bool) -> None:
    """Compare NEW's report.json against BASE's: exit 3 when a p50 latency or a top-1 regressed
    beyond its bound, 1 when the reports are invalid or come from different devices."""

    guarded(debug, lambda: _run_compare(base, new, max_regression, max_top1_drop, markdown))
