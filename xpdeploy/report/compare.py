"""``xpdeploy compare BASE.json NEW.json``: a regression gate between two runs' report.json.

For every (candidate, batch) measured in both reports it compares the p50 latency (ms), and for
every candidate with a top-1 in both it compares the accuracy (percentage points). Rows present in
only one report are listed, never silently dropped. Latency is only comparable on the same device,
so reports whose device fingerprints (:func:`xpdeploy.environment.device_fingerprint`)
differ are refused. The command itself is :mod:`xpdeploy.cli.compare`.

Exit codes: 0 within bounds, 3 a regression beyond a bound (:class:`RegressionError`, a
:class:`~xpdeploy.errors.ParityError`), 1 unreadable or invalid reports, or different devices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xpdeploy.environment import (
    FINGERPRINT_KEYS,
    device_fingerprint,
    fingerprint_id,
    is_legacy,
)
from xpdeploy.errors import ParityError, XpdeployError

DEFAULT_MAX_REGRESSION = "5%"
DEFAULT_MAX_TOP1_DROP = 0.5  # percentage points
# Fingerprint keys an old report (flat tool versions in "environment") can still vouch for.
LEGACY_KEYS = ("tensorrt", "onnxruntime")
_LABELS = {
    "cpu_model": "CPU", "logical_cores": "logical cores", "gpu_name": "GPU",
    "gpu_driver": "GPU driver", "tensorrt": "TensorRT", "l4t": "L4T", "onnxruntime": "onnxruntime",
    "nvpmodel": "nvpmodel mode",
}


class ComparisonError(XpdeployError):
    """The reports cannot be compared: unreadable, invalid, or measured on different devices."""


class RegressionError(ParityError):
    """Latency or top-1 regressed beyond a bound (exit code 3, like a failed parity gate)."""


@dataclass(frozen=True)
class LatencyRow:
    """p50 latency (ms per batch) of one candidate at one batch size in BASE and NEW.

    change: NEW / BASE - 1 as a fraction (+0.1 = 10 % slower); None when either p50 is missing.
    verdict: "ok", "regression" (change > the bound) or "n/a".
    """

    candidate: str
    batch: int
    base_p50: float | None
    new_p50: float | None
    change: float | None
    verdict: str


@dataclass(frozen=True)
class AccuracyRow:
    """Top-1 (%) of one candidate in BASE and NEW; drop = BASE - NEW in points (None if unknown,
    e.g. synthetic data). verdict: "ok", "regression" or "n/a"."""

    candidate: str
    base_top1: float | None
    new_top1: float | None
    drop: float | None
    verdict: str


@dataclass
class Comparison:
    """The outcome of :func:`compare_reports`. Bounds: ``max_regression`` a fraction (0.05 = 5 %),
    ``max_top1_drop`` in percentage points (None: accuracy not gated)."""

    max_regression: float
    max_top1_drop: float | None
    fingerprint_id: str
    latency: list[LatencyRow] = field(default_factory=list)
    accuracy: list[AccuracyRow] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[LatencyRow | AccuracyRow]:
        return [r for r in [*self.latency, *self.accuracy] if r.verdict == "regression"]

    @property
    def passed(self) -> bool:
        return not self.regressions


# -- parsing ------------------------------------------------------------------------------------


def parse_fraction(text: str) -> float:
    """"5%" -> 0.05, "0.05" -> 0.05. A bare number must be a fraction below 1: "5" is ambiguous
    (5 % or 500 %?) and is refused, like a negative bound."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; write e.g. 5% or 0.05") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} must be a finite, non-negative bound; write e.g. 5% or 0.05")
    if percent:
        return value / 100.0
    if value >= 1:
        raise ValueError(f"{text!r} is ambiguous; write {value:g}% for percent or a fraction < 1")
    return value


def load_report(path: Path, label: str) -> dict[str, Any]:
    """Read and validate one report.json; any problem is a one-line :class:`ComparisonError`."""
    from xpdeploy.report.schema import validate_report  # numpy: only when a command runs

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ComparisonError(f"{label} {path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ComparisonError(f"{label} {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ComparisonError(f"{label} {path}: not a report.json (top level is not an object)")
    try:
        validate_report(data)
    except ValueError as e:
        raise ComparisonError(f"{label} {path}: not a valid report.json: {e}") from None
    return data


# -- comparing ----------------------------------------------------------------------------------


def check_same_device(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Raise :class:`ComparisonError` naming every fingerprint field that differs; return warnings.

    A report written before environment capture only vouches for :data:`LEGACY_KEYS`; the others
    are then not checked, and a warning says so.
    """
    env_base, env_new = base["environment"], new["environment"]
    warnings = []
    keys: tuple[str, ...] = FINGERPRINT_KEYS
    if is_legacy(env_base) or is_legacy(env_new):
        keys = LEGACY_KEYS
        warnings.append("a report has no device fingerprint (written before environment capture):"
                        " only the TensorRT and onnxruntime versions were checked")
    fp_base, fp_new = device_fingerprint(env_base), device_fingerprint(env_new)
    diffs = [f"{_LABELS[k]} {fp_base[k]!r} vs {fp_new[k]!r}"
             for k in keys if fp_base[k] != fp_new[k]]
    if diffs:
        raise ComparisonError(
            f"BASE and NEW were measured on different devices ({', '.join(diffs)}); their "
            "latencies are not comparable: rerun BASE on NEW's device"
        )
    return warnings


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _p50s(candidate: Mapping[str, Any]) -> dict[int, float | None]:
    return {int(row["batch"]): _finite(row["p50"]) for row in candidate["latency_ms"]}


def _latency_rows(name: str, base: Mapping[str, Any], new: Mapping[str, Any], bound: float,
                  missing: list[str]) -> list[LatencyRow]:
    old, cur = _p50s(base), _p50s(new)
    for b in sorted(old.keys() - cur.keys()):
        missing.append(f"'{name}' batch {b}: measured in BASE, not in NEW")
    for b in sorted(cur.keys() - old.keys()):
        missing.append(f"'{name}' batch {b}: measured in NEW only (no baseline)")
    rows = []
    for b in sorted(old.keys() & cur.keys()):
        p_old, p_new = old[b], cur[b]
        if p_old is None or p_new is None or p_old <= 0:
            rows.append(LatencyRow(name, b, p_old, p_new, None, "n/a"))
            continue
        change = p_new / p_old - 1.0
        rows.append(LatencyRow(name, b, p_old, p_new, change,
                               "regression" if change > bound else "ok"))
    return rows


def _accuracy_row(name: str, base: Mapping[str, Any], new: Mapping[str, Any],
                  bound: float | None) -> AccuracyRow:
    old, cur = _finite(base.get("top1")), _finite(new.get("top1"))
    if old is None or cur is None:
        return AccuracyRow(name, old, cur, None, "n/a")
    drop = old - cur
    failed = bound is not None and drop > bound
    return AccuracyRow(name, old, cur, drop, "regression" if failed else "ok")


def compare_reports(base: dict[str, Any], new: dict[str, Any], *, max_regression: float,
                    max_top1_drop: float | None) -> Comparison:
    """Compare NEW against BASE (both valid report.json dicts).

    max_regression: allowed p50 slow-down as a fraction (0.05 = NEW may be 5 % slower).
    max_top1_drop: allowed top-1 drop in percentage points; None to report accuracy without gating.
    Raises :class:`ComparisonError` when the device fingerprints differ.
    """
    warnings = check_same_device(base, new)
    env = new["environment"]
    device = "unknown" if is_legacy(env) else fingerprint_id(env)
    result = Comparison(max_regression, max_top1_drop, device, warnings=warnings)
    old = {c["name"]: c for c in base["candidates"]}
    cur = {c["name"]: c for c in new["candidates"]}
    for name in old:
        if name not in cur:
            result.missing.append(f"'{name}': in BASE, not in NEW")
            continue
        result.latency += _latency_rows(name, old[name], cur[name], max_regression, result.missing)
        result.accuracy.append(_accuracy_row(name, old[name], cur[name], max_top1_drop))
    result.missing += [f"'{name}': in NEW only (no baseline)" for name in cur if name not in old]
    return result


# -- rendering ----------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _tables(c: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    lat_head = ["candidate", "batch", "BASE p50 ms", "NEW p50 ms", "change", "verdict"]
    lat = [[r.candidate, str(r.batch), _ms(r.base_p50), _ms(r.new_p50), _pct(r.change),
            r.verdict.upper() if r.verdict == "regression" else r.verdict] for r in c.latency]
    acc_head = ["candidate", "BASE top-1 %", "NEW top-1 %", "drop pts", "verdict"]
    acc = [[r.candidate, _pts(r.base_top1), _pts(r.new_top1), _pts(r.drop),
            r.verdict.upper() if r.verdict == "regression" else r.verdict] for r in c.accuracy]
    return lat_head, lat, acc_head, acc


def _bounds(c: Comparison) -> str:
    top1 = "not gated" if c.max_top1_drop is None else f"<= {c.max_top1_drop:.2f} pts"
    return f"p50 slow-down <= {c.max_regression:.1%}, top-1 drop {top1}"


def _text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), *(fmt.format(*r) for r in rows)]


def comparison_text(c: Comparison) -> str:
    """The comparison for a terminal: bounds, latency table, top-1 table, missing rows, warnings."""
    lat_head, lat, acc_head, acc = _tables(c)
    lines = [f"device {c.fingerprint_id}; bounds: {_bounds(c)}", ""]
    lines += _text_table(lat_head, lat) if lat else ["no latency rows in common"]
    lines += ["", *(_text_table(acc_head, acc) if acc else ["no candidates in common"])]
    lines += [f"missing: {m}" for m in c.missing]
    lines += [f"warning: {w}" for w in c.warnings]
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}",
            *(f"| {' | '.join(r)} |" for r in rows)]


def comparison_markdown(c: Comparison, base_name: str, new_name: str) -> str:
    """The comparison as a Markdown page (for a CI summary or a pull request)."""
    lat_head, lat, acc_head, acc = _tables(c)
    verdict = "passed" if c.passed else f"FAILED ({_count(len(c.regressions))})"
    lines = [f"# xpdeploy compare: {verdict}", "",
             f"BASE `{base_name}` vs NEW `{new_name}` on device `{c.fingerprint_id}`; "
             f"bounds: {_bounds(c)}.", "", "## Latency (p50)", ""]
    lines += _md_table(lat_head, lat) if lat else ["No latency rows in common."]
    lines += ["", "## Top-1", ""]
    lines += _md_table(acc_head, acc) if acc else ["No candidates in common."]
    if c.missing:
        lines += ["", "## Not compared", "", *(f"- {m}" for m in c.missing)]
    if c.warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in c.warnings)]
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n} regression{'' if n == 1 else 's'}"


def regression_message(c: Comparison) -> str:
    """Why a failed comparison failed: the count, the bounds, and every regressed row."""
    bad = c.regressions
    return (f"{_count(len(bad))} beyond the bounds "
            f"({_bounds(c)}): {'; '.join(_describe(r) for r in bad)}")


def _describe(row: LatencyRow | AccuracyRow) -> str:
    if isinstance(row, LatencyRow):
        return (f"'{row.candidate}' batch {row.batch} p50 {_ms(row.base_p50)} -> "
                f"{_ms(row.new_p50)} ms ({_pct(row.change)})")
    return (f"'{row.candidate}' top-1 {_pts(row.base_top1)} -> {_pts(row.new_top1)} % "
            f"(-{_pts(row.drop)} pts)")
