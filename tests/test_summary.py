"""``xpdeploy show``: the report lines of a run folder, speedups with their spread."""

from __future__ import annotations

import json
from pathlib import Path

from tests.report import make_report
from xpdeploy.runfolder import RESOLVED_PIPELINE
from xpdeploy.summary import summarize_run


def _run_folder(tmp_path: Path, report: dict) -> Path:
    (tmp_path / RESOLVED_PIPELINE).write_text("name: quickstart\nstages: []\n")
    (tmp_path / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_summary_shows_each_speedup_with_its_spread_and_marks_unstable(tmp_path: Path) -> None:
    text = summarize_run(_run_folder(tmp_path, make_report()))
    lines = text.splitlines()
    assert f"report: FAILED  ({tmp_path / 'report.md'})" in lines
    pruned = next(line for line in lines if line.lstrip().startswith("pruned "))
    assert pruned.endswith("speedup b1 1.80x +-3%, b32 1.80x +-2%  ok")
    fp16 = next(line for line in lines if line.lstrip().startswith("pruned-fp16 "))
    assert fp16.endswith("speedup b1 2.33x +-14% (unstable), b32 2.60x +-5%  FAILED")


def test_summary_of_an_older_report_without_spreads(tmp_path: Path) -> None:
    report = make_report()
    for c in report["candidates"]:
        del c["speedup_spread"], c["unstable"]
    report["candidates"][0]["speedup"]["1"] = None  # a non-finite speedup is written as null
    text = summarize_run(_run_folder(tmp_path, report))
    assert "speedup b1 n/a, b32 1.80x  ok" in text
    assert "speedup b1 2.33x, b32 2.60x  FAILED" in text and "+-" not in text
