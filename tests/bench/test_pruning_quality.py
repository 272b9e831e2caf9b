"""bench/pruning_quality.py's curve helpers: resume by settings, the table and the plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.pruning_quality import _previous_rows, _settings_key, markdown_table, plot_curve


def _row(method: str, ratio: float, top1: float) -> dict:
    return {"method": method, "target_ratio": ratio, "gmacs": 0.1828 * ratio, "ratio": ratio,
            "one_shot_top1": top1 - 10, "finetuned_top1": top1, "heads": [3, 2],
            "mlp": [768, 384], "latency": {"1": {"speedup": 1.5}, "32": {"speedup": 1.8}}}


def _ns(tmp_path: Path, **over) -> argparse.Namespace:
    values = {"model": tmp_path / "m.pth", "ratios": "0.5", "methods": "taylor",
              "mask_epochs": 6, "xpruner_scores": None, "out": tmp_path / "o.json",
              "plot": None, "markdown": None, **over}
    return argparse.Namespace(**values)


def test_resume_keeps_rows_of_the_same_settings_only(tmp_path: Path, capsys) -> None:
    args = _ns(tmp_path)
    key = _settings_key(args)
    # Methods, ratios and output paths do not change a row's numbers; mask settings do.
    assert key == _settings_key(_ns(tmp_path, ratios="0.3,0.8", methods="random",
                                    plot=tmp_path / "p.png"))
    assert key != _settings_key(_ns(tmp_path, mask_epochs=2))
    rows = [_row("taylor", 0.5, 66.0)]
    args.out.write_text(json.dumps({"settings_key": key, "rows": rows}))
    assert _previous_rows(args.out, key) == rows
    assert _previous_rows(args.out, _settings_key(_ns(tmp_path, mask_epochs=2))) == []
    assert "other settings" in capsys.readouterr().out
    assert _previous_rows(tmp_path / "absent.json", key) == []


def test_scores_file_content_decides_the_key(tmp_path: Path) -> None:
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"heads": [[1.0, 2.0]], "neurons": [[3.0]]}))
    a = _settings_key(_ns(tmp_path, xpruner_scores=scores))
    scores.write_text(json.dumps({"heads": [[2.0, 1.0]], "neurons": [[3.0]]}))
    assert _settings_key(_ns(tmp_path, xpruner_scores=scores)) != a


def test_table_and_plot(tmp_path: Path) -> None:
    rows = [_row("taylor", r, 60 + 10 * r) for r in (0.3, 0.5)] + [_row("random", 0.5, 55.0)]
    table = markdown_table(rows).splitlines()
    assert len(table) == 5 and table[2].startswith("| random | 0.5 |")
    assert "| taylor | 0.3 | 0.0548 (0.300) | 53.00 | 63.00 | 3, 2 | 768, 384 | 1.50x | 1.80x |" \
        in table
    png = tmp_path / "img" / "curve.png"
    plot_curve(rows, 69.44, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
