"""``report.json``: a run's versioned, machine-readable outcome (docs/architecture.md section 2).

The report is plain JSON built from the :class:`~xpdeploy.artifacts.ParityReport` so that CI, the
Markdown page and the plots all read the same numbers. Bump :data:`REPORT_SCHEMA_VERSION` when a
key is renamed or removed (adding keys is compatible). Units: top-1 in percent, ``top1_delta`` in
percentage points, latency in ms per batch, throughput in images/s, ``gmacs`` in 1e9
multiply-accumulates per image, ``params_m`` in millions. Non-finite numbers (a NaN logit diff, an
infinite speedup from a zero median) are written as ``null`` so the file stays strict JSON.
Optional candidate keys (absent from older reports): ``speedup_spread`` (batch -> half the range of
the rounds' speedups over the speedup, a fraction) and ``unstable`` (batch sizes whose spread
exceeded ``verify.max_spread``). Optional latency key ``p10`` (the 10th percentile, ms per batch;
absent from older reports, ``null`` where the run's results predate it).

Optional top-level key ``latency_budget`` (absent from reports of runs without
``prune.target_latency_ms``, and from older reports): the budget, what the latency table predicted,
what verify measured and the table it was planned with (:func:`latency_budget_section`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from xpdeploy.artifacts import (
    CandidateResult,
    EngineSet,
    LatencyStats,
    LatencyTable,
    ParityReport,
    PrunePlan,
)
from xpdeploy.fileio import write_json_atomic

if TYPE_CHECKING:
    from xpdeploy.latency.table import LatencyModel

REPORT_SCHEMA_VERSION = 1

SYNTHETIC_NOTE = "synthetic data: labels are random; accuracy figures are not reported"
STATUSES = ("passed", "failed")

TOP_KEYS = (
    "schema_version",
    "status",
    "pipeline",
    "title",
    "created",
    "run_dir",
    "data",
    "threads",
    "environment",
    "original",
    "candidates",
)
DATA_KEYS = ("source", "synthetic", "samples", "note")
ORIGINAL_KEYS = ("name", "runner", "top1", "gmacs", "params_m", "params")
CANDIDATE_KEYS = (
    "name",
    "runner",
    "artifact",
    "gmacs",
    "params_m",
    "top1",
    "top1_delta",
    "agreement",
    "max_abs_diff",
    "mean_abs_diff",
    "cosine",
    "latency_ms",
    "baseline_latency_ms",
    "speedup",
    "gates",
    "passed",
)
LATENCY_KEYS = ("batch", "p50", "p90", "p99", "mean", "iters", "throughput")
LATENCY_OPTIONAL_KEYS = ("p10",)
"""Latency keys written by this version but absent from older reports (validated when present)."""
GATE_KEYS = ("name", "value", "limit", "passed", "detail")
LATENCY_BUDGET_KEYS = ("target_ms", "predicted_ms", "original_ms", "runtime", "precision", "batch",
                       "threads", "measured", "passed", "table")
LATENCY_MEASURED_KEYS = ("artifact", "measured_ms", "spread", "original_ms", "tolerance",
                         "stable", "passed", "detail", "ratio", "ratio_spread",
                         "table_original_ms", "drift", "checked_ms")
LATENCY_TABLE_KEYS = ("file", "source", "device_id", "measured_at", "points", "unstable_points",
                      "original_ms", "validation", "plots")
LATENCY_VALIDATION_KEYS = ("name", "predicted_ms", "measured_ms", "spread", "error_pct")


def _json_safe(obj: Any) -> Any:
    """Copy ``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity).

    numpy scalars become Python numbers on the way, so ``json`` writes them as numbers.
    """
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _latency(rows: list[LatencyStats]) -> list[dict[str, Any]]:
    keys = LATENCY_KEYS + LATENCY_OPTIONAL_KEYS
    return [{k: getattr(s, k) for k in keys} for s in sorted(rows, key=lambda s: s.batch)]


def _candidate(c: CandidateResult, synthetic: bool) -> dict[str, Any]:
    return {
        "name": c.name,
        "runner": c.runner,
        "artifact": c.artifact,
        "gmacs": c.gmacs,
        "params_m": c.params_m,
        "top1": None if synthetic else c.top1,
        "top1_delta": None if synthetic else c.top1_delta,
        "agreement": c.agreement,
        "max_abs_diff": c.max_abs_diff,
        "mean_abs_diff": c.mean_abs_diff,
        "cosine": c.cosine,
        "latency_ms": _latency(c.latency_ms),
        "baseline_latency_ms": _latency(c.baseline_latency_ms),
        "speedup": {str(b): float(s) for b, s in sorted(c.speedup.items())},
        "speedup_spread": {str(b): float(s) for b, s in sorted(c.speedup_spread.items())},
        "unstable": sorted(c.unstable),
        "source": c.source,
        "baseline": c.baseline,
        "source_max_abs_diff": c.source_max_abs_diff,
        "gates": [g.model_dump(mode="python") for g in c.gates],
        "passed": c.passed,
        "gpu_latency_ms": _latency(c.gpu_latency_ms) if c.gpu_latency_ms else None,
        "runner_info": dict(c.runner_info),
    }


def _with_verify_temperatures(environment: Mapping[str, Any], parity: ParityReport
                              ) -> dict[str, Any]:
    """The environment plus the temperatures read during verify and their throttling warnings."""
    env = dict(environment)
    if parity.temperatures_c:
        from xpdeploy.verify.thermal import thermal_warnings

        env["temperatures_during_verify_c"] = parity.temperatures_c
        env["warnings"] = [*(env.get("warnings") or []),
                           *thermal_warnings(parity.temperatures_c)]
    return env


def engines_section(engines: EngineSet | None, parity: ParityReport) -> dict[str, Any] | None:
    """The engines built for this report's candidates and the ``precision: best`` choices."""
    if engines is None or engines.deferred:
        return None
    keys = ("name", "source", "precision", "label", "build_path", "file", "cache_hit", "build_s",
            "fused_attention_kernels", "attention_blocks", "layernorm_layers_pinned", "warnings",
            "log_file", "layers_file")
    return {
        "tensorrt": engines.tensorrt,
        "precision": engines.precision,
        "device": dict(engines.device),
        "engines": [{k: getattr(e, k) for k in keys} for e in engines.engines],
        "choices": [c.model_dump(mode="python") for c in parity.choices],
    }


def _latency_table_section(table: LatencyTable, model: LatencyModel | None) -> dict[str, Any]:
    """The latency table the plan was made with. Its validation rows come from ``table.json``
    (``model``); where that file is not at hand (a device run) only the artifact's errors are
    known, so name and ms are null."""
    if model is not None:
        validation = [{"name": r.name, "predicted_ms": r.predicted_ms,
                       "measured_ms": r.measured_ms, "spread": r.spread,
                       "error_pct": r.error_pct} for r in model.validation]
    else:
        validation = [{"name": None, "predicted_ms": None, "measured_ms": None, "spread": None,
                       "error_pct": e} for e in table.prediction_error_pct]
    return {
        "file": table.file,
        "source": table.source,
        "device_id": table.device_id,
        "measured_at": model.measured_at if model is not None else None,
        "points": table.points,
        "unstable_points": table.unstable_points,
        "original_ms": table.original_ms,
        "validation": validation,
        "plots": list(table.plots),
    }


def has_latency_budget(parity: ParityReport, plan: PrunePlan | None) -> bool:
    """Whether the run pruned to a latency (``prune.target_latency_ms``): the plan says so, or,
    on a device run without the plan, verify's result on the target."""
    return parity.latency_target is not None or (
        plan is not None and plan.target_latency_ms is not None)


def latency_budget_section(parity: ParityReport, plan: PrunePlan | None,
                           table: LatencyTable | None = None,
                           model: LatencyModel | None = None) -> dict[str, Any] | None:
    """Section ``latency_budget``: None without a latency target (``prune.target_latency_ms``).

    All latencies in ms per batch of ``batch`` on ``runtime``. ``target_ms`` and ``predicted_ms``
    (by the latency table) come from the plan, else from verify's result; ``measured`` is verify's
    result (null where it did not time the target, e.g. a TensorRT target off the device);
    ``original_ms`` is the unpruned model on this runtime, verify's interleaved measurement where
    there is one, else the table's; ``passed`` is verify's verdict on the target (null when not
    measured); ``table`` the latency table (null when the report stage did not get it).
    ``spread`` is half the range of the rounds' medians over their median (a fraction);
    ``tolerance`` the allowed miss above the target as a fraction of it (null: not gated);
    ``error_pct`` is (predicted - measured) / measured in percent.
    """
    if not has_latency_budget(parity, plan):
        return None
    result = parity.latency_target
    target = plan.target_latency_ms if plan is not None else None
    setting = (result.setting if result is not None
               else plan.latency if plan is not None and plan.latency is not None
               else table.setting if table is not None else None)
    predicted = plan.predicted_latency_ms if plan is not None else None
    measured = None
    if result is not None:
        target = target if target is not None else result.target_ms
        predicted = predicted if predicted is not None else result.predicted_ms
        measured = {k: getattr(result, k) for k in LATENCY_MEASURED_KEYS}
    section = {
        "target_ms": target,
        "predicted_ms": predicted,
        "original_ms": (result.original_ms if result is not None
                        else table.original_ms if table is not None else None),
        "runtime": setting.runtime if setting else None,
        "precision": setting.precision if setting else None,
        "batch": setting.batch if setting else None,
        "threads": setting.threads if setting else None,
        "measured": measured,
        "passed": result.passed if result is not None else None,
        "table": _latency_table_section(table, model) if table is not None else None,
    }
    return _json_safe(section)


def default_title(pipeline: str) -> str:
    """A report's title when the pipeline sets none."""
    return f"xpdeploy report: {pipeline}"


def build_report(
    parity: ParityReport,
    *,
    pipeline: str,
    run_dir: str,
    status: str,
    title: str | None,
    environment: dict[str, Any],
    original_extra: dict[str, Any] | None = None,
    created: datetime | None = None,
    engines: EngineSet | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict (schema version :data:`REPORT_SCHEMA_VERSION`).

    status: "passed" or "failed". title: defaults to "xpdeploy report: <pipeline>".
    environment: tool versions, device, ... copied as given. original_extra: additional keys for
    the "original" section (e.g. its ONNX file); the keys computed from ``parity`` win on a clash.
    created: report time (default now), written as ISO-8601 UTC. engines: TensorRT engines that
    were built (section "engines", with the ``precision: best`` choices). On synthetic data every
    ``top1`` and ``top1_delta`` is null whatever ``parity`` carried: random labels have no
    accuracy.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    synthetic = parity.synthetic
    when = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    original = {
        **(original_extra or {}),
        "name": parity.original_name,
        "runner": parity.original_runner,
        "top1": None if synthetic else parity.original_top1,
        "gmacs": parity.original_gmacs,
        "params_m": parity.original_params_m,
        "params": round(parity.original_params_m * 1e6),
    }
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": status,
        "pipeline": pipeline,
        "title": title or default_title(pipeline),
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_dir": run_dir,
        "data": {
            "source": parity.data_source,
            "synthetic": synthetic,
            "samples": parity.samples,
            "note": SYNTHETIC_NOTE if synthetic else None,
        },
        "threads": parity.threads,
        "environment": _with_verify_temperatures(environment, parity),
        "original": original,
        "candidates": [_candidate(c, synthetic) for c in parity.candidates],
        "engines": engines_section(engines, parity),
    }
    return _json_safe(report)


def _require(d: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    for k in keys:
        if k not in d:
            raise ValueError(f"{where}: missing required key '{k}'")


def _require_list(d: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = d[key]
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key}: expected a list, got {type(value).__name__}")
    return value


def validate_report(d: dict[str, Any]) -> None:
    """Raise ValueError naming the first missing required key (or a broken invariant).

    Checks every section of schema version 1 (``latency_budget`` where present), that ``status``
    is passed/failed, and that no top-1 figure appears on synthetic data.
    """
    _require(d, TOP_KEYS, "report")
    if d["schema_version"] != REPORT_SCHEMA_VERSION:
        raise ValueError(
            f"report: schema_version {d['schema_version']!r} is not {REPORT_SCHEMA_VERSION}"
        )
    if d["status"] not in STATUSES:
        raise ValueError(f"report.status: {d['status']!r} is not one of {STATUSES}")
    _require(d["data"], DATA_KEYS, "report.data")
    if not isinstance(d["environment"], Mapping):
        raise ValueError("report.environment: expected an object")
    _require(d["original"], ORIGINAL_KEYS, "report.original")
    synthetic = bool(d["data"]["synthetic"])
    if synthetic and d["original"]["top1"] is not None:
        raise ValueError("report.original.top1: must be null on synthetic data")
    for i, c in enumerate(_require_list(d, "candidates", "report")):
        where = f"report.candidates[{i}]"
        _require(c, CANDIDATE_KEYS, where)
        if synthetic and (c["top1"] is not None or c["top1_delta"] is not None):
            raise ValueError(f"{where}: top1 and top1_delta must be null on synthetic data")
        for key in ("latency_ms", "baseline_latency_ms"):
            for j, row in enumerate(_require_list(c, key, where)):
                _require(row, LATENCY_KEYS, f"{where}.{key}[{j}]")
                p10 = row.get("p10")
                if p10 is not None and (isinstance(p10, bool) or not isinstance(p10, int | float)):
                    raise ValueError(f"{where}.{key}[{j}].p10: expected a number or null, got "
                                     f"{type(p10).__name__}")
        if not isinstance(c["speedup"], Mapping):
            raise ValueError(f"{where}.speedup: expected an object of batch -> ratio")
        for j, g in enumerate(_require_list(c, "gates", where)):
            _require(g, GATE_KEYS, f"{where}.gates[{j}]")
    if d.get("latency_budget") is not None:
        _validate_latency_budget(d["latency_budget"])


def _validate_latency_budget(budget: Any) -> None:
    """The optional ``latency_budget`` section: required keys of it and its parts."""
    where = "report.latency_budget"
    _require(budget, LATENCY_BUDGET_KEYS, where)
    if budget["measured"] is not None:
        _require(budget["measured"], LATENCY_MEASURED_KEYS, f"{where}.measured")
    if budget["table"] is not None:
        _require(budget["table"], LATENCY_TABLE_KEYS, f"{where}.table")
        for j, row in enumerate(_require_list(budget["table"], "validation", f"{where}.table")):
            _require(row, LATENCY_VALIDATION_KEYS, f"{where}.table.validation[{j}]")


def write_report_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Validate ``report`` and write it atomically as indented, key-sorted JSON."""
    validate_report(report)
    write_json_atomic(path, report)
