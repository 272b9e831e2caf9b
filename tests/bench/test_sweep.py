"""bench/sweep.py: points are real pipeline runs cached by digest, resumed and extended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.sweep import expand, main, override_args, point_spec, read_sweep
from tests.conftest import tiny_pipeline_dict, write_pipeline

pytestmark = pytest.mark.slow


def _pipeline(tmp_path: Path) -> Path:
    d = tiny_pipeline_dict(stages=["load", "train", "learn_masks", "prune", "export_onnx",
                                   "verify", "report"])
    d["learn_masks"] = {"epochs": 1, "batch_size": 128, "max_images": 256}
    d["prune"] = {"criterion": "xpruner", "target_ratio": 0.6, "ranking": "global",
                  "round_mlp_to": 8}
    return write_pipeline(tmp_path / "p.yaml", d)


def _sweep(tmp_path: Path, grid: dict, points: list | None = None) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"pipeline": "p.yaml", "until": "prune", "grid": grid,
                                    "points": points or []}))
    return path


def _manifest_times(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): json.loads(p.read_text())["finished"]
            for p in sorted(out.glob("points/*/*/manifest.json"))}


def test_grid_and_points_expand_in_file_order(tmp_path: Path) -> None:
    _pipeline(tmp_path)
    sweep = read_sweep(_sweep(tmp_path, {"learn_masks.lr": [0.01, 0.05],
                                         "learn_masks.project": [False, True]},
                              [{"prune.criterion": "magnitude"}]))
    assert sweep.pipeline == (tmp_path / "p.yaml").resolve()
    assert expand(sweep) == [
        {"learn_masks.lr": 0.01, "learn_masks.project": False},
        {"learn_masks.lr": 0.01, "learn_masks.project": True},
        {"learn_masks.lr": 0.05, "learn_masks.project": False},
        {"learn_masks.lr": 0.05, "learn_masks.project": True},
        {"prune.criterion": "magnitude"}]
    assert override_args({"a.b": 0.5, "c": "x", "d": [1, 2]}) == ["a.b=0.5", "c=x", "d=[1, 2]"]


def test_base_overrides_every_point_and_a_point_wins(tmp_path: Path) -> None:
    """``base`` pins settings for the whole file (e.g. a default that changed since it ran)."""
    _pipeline(tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"pipeline": "p.yaml", "base": {
        "learn_masks.target": "label", "learn_masks.lr": 0.01}}))
    sweep = read_sweep(path)
    plain = point_spec(sweep, {})
    assert plain.learn_masks.target == "label" and plain.learn_masks.lr == 0.01
    own = point_spec(sweep, {"learn_masks.target": "teacher"})
    assert own.learn_masks.target == "teacher" and own.learn_masks.lr == 0.01


def test_sweep_runs_caches_resumes_and_extends(tmp_path: Path, capsys) -> None:
    _pipeline(tmp_path)
    out = tmp_path / "out"
    sweep = _sweep(tmp_path, {"learn_masks.lr": [0.01, 0.05]}, [{"prune.criterion": "magnitude"}])
    assert main([str(sweep), "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["overrides"] for r in rows] == [{"learn_masks.lr": 0.01}, {"learn_masks.lr": 0.05},
                                              {"prune.criterion": "magnitude"}]
    assert len({r["digest"] for r in rows}) == 3
    for r in rows:
        assert 0.0 <= r["result"]["one_shot_top1"] <= 100.0
        assert r["result"]["gmacs_ratio"] <= 0.6 + 1e-9
    assert rows[0]["result"]["criterion"] == "xpruner" and rows[0]["result"]["mask_steps"] == 2
    assert rows[2]["result"]["criterion"] == "magnitude"
    table = (out / "sweep.md").read_text()
    assert table.count("\n") == 2 + 3 and "| 0.05 |" in table
    first = capsys.readouterr().out
    assert "early stages from" in first  # later points took over the first one's load/train

    times = _manifest_times(out)
    assert main([str(sweep), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": cached") == 3
    assert _manifest_times(out) == times, "a rerun changes nothing"

    wider = _sweep(tmp_path, {"learn_masks.lr": [0.01, 0.05, 0.1]},
                   [{"prune.criterion": "magnitude"}])
    assert main([str(wider), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count(": cached") == 3 and log.count(": running") == 1
    new = [d for d in (out / "points").iterdir() if str(d.relative_to(out)) not in
           {k.split("/")[0] + "/" + k.split("/")[1] for k in times}]
    (new_dir,) = new
    # its load and train stages were reused from a donor, not rerun
    donor_times = {k.split("/", 2)[2]: v for k, v in times.items() if "01_load" in k}
    assert json.loads((new_dir / "01_load" / "manifest.json").read_text())["finished"] in (
        donor_times.values())
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 4


def test_a_bad_key_is_one_line_before_anything_runs(tmp_path: Path, capsys) -> None:
    _pipeline(tmp_path)
    out = tmp_path / "out"
    bad = _sweep(tmp_path, {"learn_masks.lr": [0.01], "learn_masks.epocs": [2]})
    assert main([str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "epocs" in err and err.count("\n") == 1
    assert not (out / "points").exists() or not any((out / "points").iterdir())
    assert main([str(tmp_path / "absent.yaml"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
