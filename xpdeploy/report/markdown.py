"""``report.md``: the page a person reads in a CI job summary or a pull request.

It is rendered from the report dict (:mod:`xpdeploy.report.schema`), never from live objects, so
the page and ``report.json`` cannot disagree. Units: top-1 in percent, deltas in percentage points,
latency in ms per batch (3 significant digits), throughput in images/s.

The page ends with the environment the numbers were measured in (device fingerprint, CPU, GPU,
TensorRT/CUDA, Jetson power state) and its warnings in bold; a report written before environment
capture (a flat dict of tool versions) lists those versions instead.
"""

from __future__ import annotations

import math
import os
from typing import Any

from xpdeploy.environment import is_legacy
from xpdeploy.fileio import write_text_atomic
from xpdeploy.verify.gates import fmt_speedup, fmt_spread

NA = "n/a"
NA_SYNTHETIC = "n/a (synthetic)"
#: Where the latency table came from (``LatencyTable.source``), as the page says it.
TABLE_SOURCES = {
    "measured": "measured in this run",
    "cache": "from the latency cache (measured earlier on this machine)",
    "file": "read from prune.latency.table (measured elsewhere)",
}


def _cell(text: object) -> str:
    """Make a value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_top1(x: float | None, synthetic: bool) -> str:
    """Top-1 in percent with 2 decimals."""
    if synthetic:
        return NA_SYNTHETIC
    return NA if x is None else f"{x:.2f}"


def fmt_delta(x: float | None, synthetic: bool) -> str:
    """Signed change in percentage points with 2 decimals."""
    if synthetic:
        return NA_SYNTHETIC
    return NA if x is None else f"{x:+.2f}"


def fmt_sci(x: float | None) -> str:
    """Logit differences span many decades: scientific notation, 2 decimals."""
    return NA if x is None else f"{x:.2e}"


def fmt_ms(x: float | None) -> str:
    """Milliseconds with 3 significant digits (whole numbers from 1000 up)."""
    if x is None:
        return NA
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:#.3g}".rstrip(".")


def fmt_rate(x: float | None) -> str:
    """Images per second: whole numbers from 100 up, 1 decimal below."""
    if x is None:
        return NA
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def fmt_signed_pct(x: float | None) -> str:
    """A relative difference in percent, signed, 1 decimal: "+1.7%"."""
    return NA if x is None else f"{x:+.1f}%"


def fmt_ratio(x: float | None) -> str:
    """A speedup such as 1.84x."""
    return NA if x is None else f"{x:.2f}x"


def candidate_speedup(c: dict[str, Any], batch: int, *, bold: bool = False) -> str:
    """One candidate's speedup at ``batch`` from the report dict, with the spread of its rounds:
    "1.85x +-3%", "2.10x +-14% (unstable)" (in bold with ``bold``), "1.85x" in reports written
    before rounds were measured, "n/a" when none was measured (or it was not finite)."""
    value = c["speedup"].get(str(batch))
    if value is None:
        return NA
    spreads = c.get("speedup_spread") or {}
    spread: float | None = None
    if str(batch) in spreads:  # null in the JSON: the spread was not finite
        spread = math.inf if spreads[str(batch)] is None else float(spreads[str(batch)])
    unstable = batch in (c.get("unstable") or [])
    text = fmt_speedup(value, spread, unstable)
    return f"**{text}**" if bold and unstable else text


def _fmt_share(x: float | None) -> str:
    return NA if x is None else f"{x:.4f}"


def _fmt_cosine(x: float | None) -> str:
    return NA if x is None else f"{x:.6f}"


def _gates_cell(c: dict[str, Any]) -> str:
    failed = [g["name"] for g in c["gates"] if not g["passed"]]
    if failed:
        return "**FAIL**: " + ", ".join(failed)
    return "pass" if c["gates"] else "no gates"


def _header(cols: list[str], align: str) -> list[str]:
    """Table header; ``align`` has one letter per column: l(eft) for text, r(ight) for numbers."""
    marks = {"l": "---", "r": "---:"}
    return ["| " + " | ".join(cols) + " |", "|" + "|".join(marks[a] for a in align) + "|"]


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _parity_table(report: dict[str, Any], synthetic: bool) -> list[str]:
    cols = ["candidate", "runner", "top-1 (%)", "Δ top-1 (pts)", "agreement", "max abs diff"]
    lines = _header([*cols, "cosine", "gates"], "llrrrrrl")
    for c in report["candidates"]:
        lines.append(
            _row(
                [
                    c["name"],
                    c["runner"],
                    fmt_top1(c["top1"], synthetic),
                    fmt_delta(c["top1_delta"], synthetic),
                    _fmt_share(c["agreement"]),
                    fmt_sci(c["max_abs_diff"]),
                    _fmt_cosine(c["cosine"]),
                    _gates_cell(c),
                ]
            )
        )
    return lines


def _pruning_section(pruning: dict[str, Any] | None, synthetic: bool) -> list[str]:
    """What was pruned, by which criterion, to which budget, and the explainability plots."""
    if not pruning:
        return []
    lines = [
        "## Pruning",
        "",
        f"Criterion `{pruning['criterion']}`, ranking `{pruning['ranking']}`: "
        f"{pruning['gmacs_before']:.4g} -> {pruning['gmacs_after']:.4g} GMACs "
        f"({pruning['gmacs_after'] / pruning['gmacs_before']:.1%} of the original; target "
        f"{pruning['target_gmacs']:.4g}), {pruning['params_before_m']:.3g} -> "
        f"{pruning['params_after_m']:.3g} M params.",
    ]
    if pruning.get("one_shot_top1") is not None and not synthetic:
        lines.append(f"One-shot top-1 (right after pruning, before recovery training): "
                     f"{pruning['one_shot_top1']:.2f} %.")
    if pruning.get("masks_converged") is False:
        lines.append("**The masks had not converged** (see the mask-learning curve).")
    lines += _finetune_line(pruning.get("finetune"))
    lines += ["", *_header(["block", "heads kept", "MLP width kept"], "rrr")]
    for i, (h, m) in enumerate(zip(pruning["heads"], pruning["mlp"], strict=True)):
        lines.append(_row([i, h, m]))
    lines.append("")
    lines += [f"![{p}]({p})" for p in pruning.get("plots", [])]
    return [*lines, ""]


def _vs_target(ms: float | None, target: float | None) -> str:
    """How far ``ms`` is from the latency target, in percent of it ("" without both)."""
    if ms is None or not target:
        return ""
    return fmt_signed_pct((ms - target) / target * 100.0)


def _latency_budget_section(budget: dict[str, Any] | None) -> list[str]:
    """The latency budget: target, predicted, measured and original (ms per batch), verify's
    verdict, and the latency table behind the plan with its validation and plots."""
    if not budget:
        return []
    target, predicted, m = budget["target_ms"], budget["predicted_ms"], budget["measured"]
    threads = f", {budget['threads']} threads" if budget.get("threads") else ""
    lines = ["## Latency budget", "",
             f"Target {fmt_ms(target)} ms per batch of {budget['batch']} on "
             f"`{budget['runtime']}` ({budget['precision']}{threads}).", "",
             *_header(["", "ms per batch", "vs target"], "lrr"),
             _row(["target", fmt_ms(target), ""]),
             _row(["predicted (latency table)", fmt_ms(predicted), _vs_target(predicted, target)])]
    if m is not None:
        spread = math.inf if m["spread"] is None else m["spread"]  # null: not finite
        if m.get("checked_ms") is not None and m.get("table_original_ms") is not None:
            ratio_spread = math.inf if m["ratio_spread"] is None else m["ratio_spread"]
            lines.append(_row([f"measured at the table's speed ({m['ratio']:.3f} x the original "
                               f"side by side, {fmt_spread(ratio_spread)}; the gate reads this)",
                               fmt_ms(m["checked_ms"]), _vs_target(m["checked_ms"], target)]))
        lines.append(_row([f"measured now (verify, {fmt_spread(spread)} over rounds)",
                           fmt_ms(m["measured_ms"]), _vs_target(m["measured_ms"], target)]))
    original = "original (timed interleaved with it)" if m is not None else \
        "original (latency table)"
    lines += [_row([original, fmt_ms(budget["original_ms"]),
                    _vs_target(budget["original_ms"], target)]), ""]
    if m is None:
        why = ("a TensorRT target is timed where its engine runs (the device)"
               if budget["runtime"] == "tensorrt" else "verify timed no pruned model")
        lines.append(f"Not measured in this run: {why}.")
    else:
        verdict = "passed" if m["passed"] else "**FAILED**"
        tolerance = ("misses not gated: verify.max_latency_miss is unset" if m["tolerance"] is None
                     else f"up to {m['tolerance']:.0%} over the target allowed")
        lines.append(f"Latency target {verdict} ({tolerance}; `{m['artifact']}`): "
                     f"{_one_line(m['detail']).rstrip('.')}.")
    lines += _latency_table_lines(budget.get("table"))
    return [*lines, ""]


def _latency_table_lines(table: dict[str, Any] | None) -> list[str]:
    """Provenance of the latency table, its prediction of whole pruned models, its plots."""
    if not table:
        return []
    source = TABLE_SOURCES.get(table["source"], table["source"])
    when = f" at {table['measured_at']}" if table.get("measured_at") else ""
    unstable = table["unstable_points"]
    stability = (f"**{unstable} unstable** (their spread stayed above prune.latency.max_spread "
                 "after retries; the plan used them)" if unstable else "all stable")
    lines = ["", f"Latency table `{table['file']}`, {source}, on device `{table['device_id']}`"
                 f"{when}: {table['points']} grid points, {stability}; it measured the original "
                 f"at {fmt_ms(table['original_ms'])} ms."]
    rows = table["validation"]
    if rows:
        lines += ["", "Its prediction of whole pruned models (error = (predicted - measured) / "
                      "measured):", "",
                  *_header(["validation model", "predicted", "measured", "error"], "lrrr")]
        lines += [_row([r["name"] or f"#{i + 1}", fmt_ms(r["predicted_ms"]),
                        fmt_ms(r["measured_ms"]), fmt_signed_pct(r["error_pct"])])
                  for i, r in enumerate(rows)]
    plots = table.get("plots") or []
    if plots:
        lines += ["", *(f"![{p}]({p})" for p in plots)]
    return lines


def _finetune_line(ft: dict[str, Any] | None) -> list[str]:
    """One sentence on the recovery training: budget, distillation, processes, augmentation."""
    if not ft:
        return []
    aug = ", ".join(f"{k} {v}" for k, v in (ft.get("augment") or {}).items()) or "none"
    best = ft.get("best_top1")
    return [
        f"Fine-tuned {ft['epochs']} epochs x {ft['images_per_epoch']:.0f} images (distillation "
        f"`{ft['distill']}`; global batch {ft['global_batch']} on {ft['processes']} process(es), "
        f"peak lr {ft['peak_lr']:.3g}, amp {ft['amp']}, EMA {ft['ema_decay'] or 'off'}, "
        f"augmentation: {aug}; output: {ft['keep']} weights"
        + (f", best val top-1 {best:.2f} % at epoch {ft['best_epoch']}" if best is not None else "")
        + ")."
    ]


def _latency_table(report: dict[str, Any]) -> list[str]:
    """A row per (candidate, batch): its p10/p50/p90/p99 (p10 n/a in reports written before it
    was recorded), img/s, the baseline it was timed against with that baseline's p50, speedup."""
    cols = ["candidate", "batch", "p10", "p50", "p90", "p99", "img/s", "baseline", "baseline p50",
            "speedup"]
    lines = _header(cols, "lrrrrrrlrr")
    for c in report["candidates"]:
        base = {row["batch"]: row for row in c["baseline_latency_ms"]}
        for row in c["latency_ms"]:
            b = row["batch"]
            lines.append(
                _row(
                    [
                        c["name"],
                        b,
                        fmt_ms(row.get("p10")),  # absent from reports written before p10
                        fmt_ms(row["p50"]),
                        fmt_ms(row["p90"]),
                        fmt_ms(row["p99"]),
                        fmt_rate(row["throughput"]),
                        c.get("baseline", "original"),
                        fmt_ms(base[b]["p50"]) if b in base else NA,
                        candidate_speedup(c, b, bold=True),
                    ]
                )
            )
    return lines


def _engines_section(section: dict[str, Any] | None,
                     candidates: list[dict[str, Any]]) -> list[str]:
    """Engines built (with build time, cache use, fused attention), GPU compute, best choices."""
    if not section:
        return []
    dev = section.get("device") or {}
    l4t = f", L4T {dev['l4t_release']}" if dev.get("l4t_release") else ""
    lines = ["## TensorRT engines", "",
             f"TensorRT {section.get('tensorrt')} on {dev.get('name')} (compute capability "
             f"{dev.get('compute_capability')}{l4t}), precision `{section.get('precision')}`.", ""]
    by_file = {c["artifact"]: c for c in candidates}
    lines += _header(["engine", "path", "built", "fused attention", "GPU p50", "host p50",
                      "deserialize", "first inference"], "llrrrrrr")
    for e in section.get("engines", []):
        c = by_file.get(e["file"], {})
        gpu = (c.get("gpu_latency_ms") or [{}])[0].get("p50")
        host = (c.get("latency_ms") or [{}])[0].get("p50")
        info = c.get("runner_info") or {}
        blocks = e.get("attention_blocks")
        fused = NA if e.get("fused_attention_kernels") is None else (
            f"{e['fused_attention_kernels']}" + (f" / {blocks} blocks" if blocks else ""))
        built = "engine cache" if e["cache_hit"] else f"{e['build_s']:.1f} s"
        lines.append(_row([e["name"], e["build_path"], built, fused, fmt_ms(gpu), fmt_ms(host),
                           fmt_ms(info.get("deserialize_ms")),
                           fmt_ms(info.get("first_inference_ms"))]))
    lines += ["", "GPU p50: CUDA events around the enqueue (GPU compute); host p50: wall time of "
              "the call with both copies (ms per batch)."]
    warned = [(e["name"], w) for e in section.get("engines", []) for w in e.get("warnings", [])]
    if warned:
        lines += ["", "Build warnings:", ""]
        lines += [f"- `{name}`: {_one_line(w)}" for name, w in warned]
    for choice in section.get("choices", []):
        lines += ["", f"precision best, {choice['source']} {choice['batch']}: "
                      f"{_one_line(choice['reason'])}"]
    lines.append("")
    return lines


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _versions(pairs: list[tuple[str, object]]) -> str:
    """E.g. "TensorRT 10.3.0, CUDA 12.6": the pairs whose version is known ("" when none is)."""
    return ", ".join(f"{label} {_one_line(v)}" for label, v in pairs if v not in (None, ""))


def _jetson_line(jetson: dict[str, Any]) -> str:
    """L4T release, board, power mode and the max-performance verdict of a Jetson."""
    parts = [f"L4T {_one_line(jetson.get('l4t') or 'unknown')}"]
    if jetson.get("board"):
        parts.append(_one_line(jetson["board"]))
    nvp = jetson.get("nvpmodel") or {}
    mode, ident = nvp.get("mode"), nvp.get("id")
    if mode is not None or ident is not None:
        parts.append(f"power mode {mode or '?'}" + (f" (id {ident})" if ident is not None else ""))
    locked = (jetson.get("jetson_clocks") or {}).get("locked")
    if locked is not None:
        parts.append("clocks locked" if locked else "clocks not locked")
    verdict = {True: "yes", False: "**no**"}.get(jetson.get("max_performance"), "unknown")
    return "Jetson: " + ", ".join(parts) + f"; max-performance mode: {verdict}"


def _environment_section(env: dict[str, Any] | None) -> list[str]:
    """Where the numbers were measured, with every warning in bold (empty for no environment).

    Every key is optional, as report.json files from other versions may lack some.
    """
    if not env:
        return []
    lines = ["## Environment", ""]
    if is_legacy(env):
        versions = _versions([(str(k), v) for k, v in env.items()])
        lines.append("Recorded before device capture (no device fingerprint)"
                     + (f"; tools: {versions}." if versions else "."))
        return [*lines, ""]
    host = env.get("host") or {}
    tools = env.get("tools") or {}
    libs = env.get("libraries") or {}
    items = [f"Device fingerprint `{env.get('fingerprint_id') or 'unknown'}`"]
    cpu = _one_line(host.get("cpu_model") or "unknown CPU")
    cores = host.get("logical_cores")
    items.append(f"CPU: {cpu}" + (f", {cores} logical cores" if cores else ""))
    for gpu in env.get("gpus") or []:
        driver = gpu.get("driver")
        items.append(f"GPU: {_one_line(gpu.get('name') or 'unknown')}"
                     + (f", driver {_one_line(driver)}" if driver else ""))
    versions = _versions([
        ("TensorRT", libs.get("tensorrt") or tools.get("tensorrt")),
        ("CUDA", libs.get("cuda")),
        ("onnxruntime", tools.get("onnxruntime") or libs.get("onnxruntime-gpu")),
    ])
    if versions:
        items.append(f"Libraries: {versions}")
    if env.get("jetson"):
        items.append(_jetson_line(env["jetson"]))
    temps = env.get("temperatures_during_verify_c") or {}
    if temps:
        ranges = ", ".join(f"{_one_line(zone)} {t['min']:.0f}-{t['max']:.0f} C"
                           for zone, t in temps.items())
        items.append(f"Temperatures during verify: {ranges}")
    lines += [f"- {item}" for item in items]
    warnings = [w for w in env.get("warnings") or [] if w]
    if warnings:
        lines.append("")
        lines += [f"**Warning: {_one_line(w).rstrip('.')}.**" for w in warnings]
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (title with PASSED/FAILED, data, pruning, latency budget,
    parity, latency, gates, environment)."""
    data, orig = report["data"], report["original"]
    synthetic = bool(data["synthetic"])
    verdict = "PASSED" if report["status"] == "passed" else "FAILED"
    lines = [f"# {report['title']} — {verdict}", ""]
    lines.append(
        f"Pipeline `{report['pipeline']}` · created {report['created']} · "
        f"{report['threads']} CPU threads · run folder `{report['run_dir']}`"
    )
    lines.append("")
    data_line = f"Data: {data['source']}, {data['samples']} samples."
    if synthetic:
        data_line += f" **Warning: {data['note'] or 'synthetic data'}.**"
    lines += [data_line, ""]
    env = report.get("environment")
    env_warnings = [w for w in (env.get("warnings") or [] if isinstance(env, dict) else []) if w]
    if env_warnings:  # before any latency figure: they say whether those figures can be trusted
        joined = "; ".join(_one_line(w).rstrip(".") for w in env_warnings)
        lines += [f"**Measured on a device that was not set up for benchmarking: {joined}** "
                  "(see Environment).", ""]
    lines.append(
        f"Original: `{orig['name']}` ({orig['runner']}): top-1 {fmt_top1(orig['top1'], synthetic)}"
        f"{'' if synthetic or orig['top1'] is None else ' %'}, {orig['gmacs']:.3g} GMACs, "
        f"{orig['params_m']:.2f} M params"
    )
    if not synthetic and orig.get("val_top1") is not None:
        epochs = orig.get("epochs_trained")
        trained = f", after {epochs} epochs of training" if epochs else ""
        lines[-1] += (
            f" (top-1 on the verification set; {orig['val_top1']:.2f} % on the whole val split "
            f"of {orig.get('top1_samples')} images{trained})"
        )
    lines.append("")
    if not report["candidates"]:
        lines += ["No candidates were verified.", ""]
        lines += _environment_section(report.get("environment"))
        return "\n".join(lines)

    lines += _pruning_section(report.get("pruning"), synthetic)
    lines += _latency_budget_section(report.get("latency_budget"))
    lines += ["## Parity vs the original", "", *_parity_table(report, synthetic), ""]
    lines += [
        "## Latency (ms per batch)",
        "",
        "Each candidate is timed interleaved with its baseline in the same process (the "
        "original model in the same backend where there is one), in interleaved rounds; "
        "speedup = the median over rounds of baseline p50 / candidate p50, +- half the range of "
        "the rounds' speedups. A speedup whose rounds disagree by more than verify.max_spread is "
        "marked **unstable**: it is not trusted and fails the min_speedup gate (where it is on).",
        "",
        *_latency_table(report),
        "",
    ]
    lines += _engines_section(report.get("engines"), report["candidates"])
    failed = [(c["name"], g) for c in report["candidates"] for g in c["gates"] if not g["passed"]]
    skipped = [
        (c["name"], g)
        for c in report["candidates"]
        for g in c["gates"]
        if g["passed"] and g["value"] is None
    ]
    budget = report.get("latency_budget") or {}
    missed = budget.get("passed") is False  # verify's verdict on the latency target
    if failed or missed:
        lines += ["## Failed gates", ""]
        lines += [f"- `{name}` {g['name']}: {g['detail']}" for name, g in failed]
        if missed:
            lines.append(f"- latency target: {_one_line(budget['measured']['detail'])}")
    else:
        lines.append("All gates passed.")
    if skipped:
        lines += ["", "Skipped gates:", ""]
        lines += [f"- `{name}` {g['name']}: {g['detail']}" for name, g in skipped]
    lines.append("")
    lines += _environment_section(report.get("environment"))
    return "\n".join(lines)


def write_markdown(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Render ``report`` and write it atomically as UTF-8."""
    write_text_atomic(path, render_markdown(report))
