"""report.md: verdict, numbers, tables and the synthetic warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.report import make_report
from xpdeploy.report.markdown import fmt_ms, render_markdown, write_markdown


def report(synthetic: bool = False, **kw: Any) -> dict[str, Any]:
    return make_report(synthetic, **kw)


def table_rows(md: str, header_start: str) -> list[str]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_failed_report_shows_verdict_numbers_and_failed_gate() -> None:
    md = render_markdown(report())
    first = md.splitlines()[0]
    assert first.startswith("# xpdeploy report: quickstart") and "FAILED" in first
    assert "imagefolder, 512 samples" in md
    assert "top-1 72.50 %" in md and "1.26 GMACs" in md and "5.72 M params" in md
    parity = table_rows(md, "| candidate | runner |")
    assert parity[0] == (
        "| candidate | runner | top-1 (%) | Δ top-1 (pts) | agreement | max abs diff | cosine "
        "| gates |"
    )
    assert parity[2] == (
        "| pruned | ort-cpu-fp32 | 72.10 | -0.40 | 0.9961 | 1.20e-04 | 0.999998 | pass |"
    )
    assert "| pruned-fp16 | ort-cpu-fp16 | 72.20 | -0.30 | 0.9850 | 4.50e-04 |" in parity[3]
    assert parity[3].endswith("| **FAIL**: min_agreement |")
    latency = table_rows(md, "| candidate | batch |")
    assert latency[0] == (
        "| candidate | batch | p50 | p90 | p99 | img/s | baseline | baseline p50 | speedup |"
    )
    assert latency[2] == "| pruned | 1 | 2.00 | 2.20 | 2.60 | 500 | original | 3.60 | 1.80x |"
    assert latency[3] == "| pruned | 32 | 30.0 | 33.0 | 39.0 | 1067 | original | 54.0 | 1.80x |"
    assert len(latency) == 2 + 4  # two candidates x two batch sizes
    for rows in (parity, latency):
        assert len({row.count("|") for row in rows}) == 1
    assert "## Failed gates" in md
    assert "- `pruned-fp16` min_agreement: agreement 0.985 < 0.99" in md
    assert "n/a" not in md


def test_passed_report() -> None:
    md = render_markdown(report(status="passed", title="Nightly"))
    assert md.splitlines()[0] == "# Nightly — PASSED"


def test_synthetic_report_hides_accuracy() -> None:
    md = render_markdown(report(synthetic=True))
    assert (
        "**Warning: synthetic data: labels are random; accuracy figures are not reported.**" in md
    )
    assert "top-1 n/a (synthetic)" in md
    for row in table_rows(md, "| candidate | runner |")[2:]:
        assert row.count("n/a (synthetic)") == 2
    assert "72.10" not in md and "72.50" not in md and "-0.40" not in md
    assert "Skipped gates:" in md and "skipped: synthetic data has no accuracy" in md


def test_no_candidates() -> None:
    r = report()
    r["candidates"] = []
    md = render_markdown(r)
    assert "No candidates were verified." in md and "| candidate" not in md


def test_pipes_in_names_are_escaped() -> None:
    r = report()
    r["candidates"][0]["name"] = "a|b"
    row = table_rows(render_markdown(r), "| candidate | runner |")[2]
    assert row.startswith("| a\\|b |")


def test_ms_format_three_significant_digits() -> None:
    assert [fmt_ms(x) for x in (0.123456, 1.0, 12.345, 100.0, 999.4, 1234.5, None)] == [
        "0.123", "1.00", "12.3", "100", "999", "1234", "n/a",
    ]  # fmt: skip


def test_write_markdown(tmp_path: Path) -> None:
    r = report()
    target = tmp_path / "report.md"
    write_markdown(target, r)
    assert target.read_text(encoding="utf-8") == render_markdown(r)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
