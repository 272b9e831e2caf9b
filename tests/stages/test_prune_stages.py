"""learn_masks -> prune -> finetune inside a real pipeline, for every criterion and ranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_SWIN, tiny_pipeline_dict, write_pipeline
from xpdeploy.errors import ConfigError
from xpdeploy.pipeline import run_pipeline
from xpdeploy.report.schema import validate_report
from xpdeploy.spec import MASK_CRITERIA, load_spec

pytestmark = pytest.mark.slow

PRUNE_STAGES = ["load", "train", "learn_masks", "prune", "finetune", "export_onnx", "simplify",
                "verify", "report"]


def _pipeline(tmp_path: Path, criterion: str, ranking: str = "global", **extra):
    d = tiny_pipeline_dict(stages=[s for s in PRUNE_STAGES
                                   if criterion in MASK_CRITERIA or s != "learn_masks"])
    d["learn_masks"] = {"epochs": 1, "batch_size": 128, "max_images": 256}
    d["prune"] = {"criterion": criterion, "target_ratio": 0.6, "ranking": ranking,
                  "round_mlp_to": 8, "taylor_images": 128, "block_floors": {0: [2, 64]},
                  "threshold": {"steps": 5, "batch_size": 32},
                  "sensitivity": {"images": 128, "batch_size": 64, "mlp_step": 32}}
    d["finetune"] = {"epochs": 1, "batch_size": 64, "max_images": 256, "warmup_epochs": 0}
    d.update(extra)
    return load_spec(write_pipeline(tmp_path / "p.yaml", d))


def _run_passing(spec, run_dir: Path) -> dict:
    """Run ``spec`` in ``run_dir``; it must pass; its report.json, validated against the schema."""
    result = run_pipeline(spec, run_dir)
    assert result.passed, result
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    return report


@pytest.mark.parametrize(("criterion", "ranking"), [
    ("xpruner", "global"), ("magnitude", "global"), ("taylor", "global"), ("random", "global"),
    ("xpruner", "threshold"), ("xpruner", "sensitivity"), ("taylor", "sensitivity"),
])
def test_pruning_pipeline_end_to_end(tmp_path: Path, criterion: str, ranking: str) -> None:
    spec = _pipeline(tmp_path, criterion, ranking)
    run_dir = tmp_path / "run"
    report = _run_passing(spec, run_dir)
    pruning = report["pruning"]
    assert pruning["criterion"] == criterion and pruning["ranking"] == ranking
    assert pruning["gmacs_after"] <= pruning["target_gmacs"] + 1e-12
    assert pruning["gmacs_after"] >= pruning["target_gmacs"] * (1 - 0.05)
    assert all(w % 8 == 0 for w in pruning["mlp"]) and all(h >= 1 for h in pruning["heads"])
    assert pruning["heads"][0] == 2 and pruning["mlp"][0] >= 64  # block_floors of block 0
    names = {c["name"]: c for c in report["candidates"]}
    assert {"pruned (torch)", "pruned.onnx", "pruned.sim.onnx", "original.onnx"} <= set(names)
    assert names["pruned.sim.onnx"]["baseline"] == "original.sim.onnx"
    assert names["pruned.onnx"]["source_max_abs_diff"] < 1e-3
    assert names["pruned.onnx"]["gmacs"] == pytest.approx(pruning["gmacs_after"])
    plan = json.loads((run_dir / "04_prune" / "plan.json").read_text())
    assert [len(b["kept_heads"]) for b in plan["blocks"]] == pruning["heads"]
    if ranking != "global":  # how the allocation was decided, plotted and in the report
        assert f"![04_prune/{ranking}.png](04_prune/{ranking}.png)" in (
            run_dir / "report.md").read_text()
        assert (run_dir / "04_prune" / f"{ranking}.png").stat().st_size > 10_000
    if ranking == "sensitivity":
        rounds = plan["sensitivity"]["rounds"]
        assert rounds[0]["curves"]["images"] == 128 and rounds[-1]["heads"] == pruning["heads"]
        assert plan["sensitivity"]["plan_loss"] >= 0.0
    if criterion == "xpruner":
        assert (run_dir / "03_learn_masks" / "masks_heatmap.png").is_file()
        # mask_score auto: class coverage where only the order inside a block counts
        assert plan["mask_score"] == ("coverage" if ranking == "sensitivity" else "sum")
        if ranking == "sensitivity":  # each block keeps its best units by coverage
            from xpdeploy.artifacts import ArchSpec
            from xpdeploy.models.arch import rebuild_model
            from xpdeploy.xpruner.learn import load_masks
            from xpdeploy.xpruner.masks import coverage_scores

            trained = run_dir / "02_train"
            arch = ArchSpec.model_validate_json((trained / "arch.json").read_text())
            net = rebuild_model(arch, trained / "model.safetensors")
            masks = load_masks(run_dir / "03_learn_masks" / "masks.safetensors", net, 10)
            kept = coverage_scores(masks).keep_top(pruning["heads"], pruning["mlp"])
            assert kept.to_json() == plan["blocks"]
        assert "## Pruning" in (run_dir / "report.md").read_text()
    again = run_pipeline(spec, run_dir)
    assert again.ran == []


@pytest.mark.parametrize("criterion", MASK_CRITERIA)
def test_mask_criteria_without_learn_masks_are_refused(tmp_path: Path, criterion: str) -> None:
    d = tiny_pipeline_dict(stages=["load", "prune", "export_onnx", "verify", "report"])
    d["prune"] = {"criterion": criterion, "target_ratio": 0.5}
    spec = load_spec(write_pipeline(tmp_path / "p.yaml", d))
    with pytest.raises(ConfigError, match=f"'{criterion}' needs the 'learn_masks' stage"):
        spec.check_runnable()


def test_hybrid_criterion_plans_from_masks_and_taylor(tmp_path: Path) -> None:
    """``xpruner_taylor`` plans from the geometric mean of the stage's mask scores and Taylor
    scores of the same images: the plan equals the planner's on hybrid_scores of the two."""
    from xpdeploy.artifacts import ArchSpec
    from xpdeploy.data.sources import open_split
    from xpdeploy.models.arch import rebuild_model
    from xpdeploy.models.data_config import resolve_data_config
    from xpdeploy.prune import criteria
    from xpdeploy.prune.mac_model import MacModel
    from xpdeploy.prune.planner import PlanConstraints, plan_global
    from xpdeploy.prune.unit_scores import UnitScores
    from xpdeploy.training.batches import shuffled_batches

    spec = _pipeline(tmp_path, "xpruner_taylor")
    run_dir = tmp_path / "run"
    run_pipeline(spec, run_dir, until="prune")
    plan = json.loads((run_dir / "04_prune" / "plan.json").read_text())
    assert plan["criterion"] == "xpruner_taylor"
    masks = UnitScores.from_json(json.loads(
        (run_dir / "03_learn_masks" / "scores.json").read_text()))
    trained = run_dir / "02_train"
    arch = ArchSpec.model_validate_json((trained / "arch.json").read_text())
    net = rebuild_model(arch, trained / "model.safetensors")
    dc = resolve_data_config(net, spec.data.preprocess)
    train = open_split(spec.data, dc, "train", num_classes=10, seed=spec.seed)
    taylor = criteria.taylor_scores(net, shuffled_batches(train, spec.data.batch_size,
                                                          seed=spec.seed), 128)
    macs = MacModel.from_model(net, dc.input_size)
    keep = plan_global(criteria.hybrid_scores(masks, taylor), macs, plan["target_gmacs"] * 1e9,
                       PlanConstraints.from_config(spec.prune), spec.prune.normalize)
    assert [b["kept_heads"] for b in plan["blocks"]] == [h.tolist() for h in keep.heads]
    assert [b["kept_neurons"] for b in plan["blocks"]] == [n.tolist() for n in keep.neurons]


def test_impossible_target_is_one_clear_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xpdeploy.cli import cli

    d = tiny_pipeline_dict(stages=["load", "prune", "export_onnx", "verify", "report"])
    d["prune"] = {"criterion": "magnitude", "target_ratio": 0.01}
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    result = CliRunner().invoke(cli, ["run", str(pipe), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "GMACs" in result.stderr
    assert not (tmp_path / "run" / "04_prune").exists()


def test_saved_plan_replays_on_a_fresh_run(tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_pipeline(_pipeline(tmp_path, "magnitude"), first)
    plan = json.loads((first / "04_prune" / "plan.json").read_text())
    d_spec = _pipeline(tmp_path, "magnitude")
    replay = d_spec.model_copy(update={"prune": d_spec.prune.model_copy(
        update={"plan_file": first / "04_prune" / "plan.json", "target_ratio": None})})
    second = tmp_path / "second"
    run_pipeline(replay, second, until="prune")
    again = json.loads((second / "04_prune" / "plan.json").read_text())
    assert again["blocks"] == plan["blocks"]
    assert again["replayed_from"].endswith("plan.json")


@pytest.mark.parametrize("ranking", ["global", "threshold", "sensitivity"])
def test_swin_pipeline_end_to_end(tmp_path: Path, ranking: str) -> None:
    """A Swin through learn_masks, prune, finetune, export, simplify, verify and report: blocks of
    both stages pruned, MACs on target, ONNX files of the pruned Swin verified in onnxruntime."""
    spec = _pipeline(tmp_path, "xpruner", ranking, model=TINY_SWIN)
    run_dir = tmp_path / "run"
    report = _run_passing(spec, run_dir)
    pruning = report["pruning"]
    assert len(pruning["heads"]) == 4 and pruning["heads"][0] == 2  # block_floors of block 0
    assert pruning["gmacs_after"] <= pruning["target_gmacs"] + 1e-12
    assert pruning["gmacs_after"] >= pruning["target_gmacs"] * (1 - 0.05)
    names = {c["name"]: c for c in report["candidates"]}
    assert names["pruned.sim.onnx"]["passed"] and names["pruned.onnx"]["source_max_abs_diff"] < 1e-3
    assert names["pruned.onnx"]["gmacs"] == pytest.approx(pruning["gmacs_after"])
    arch = json.loads((run_dir / "04_prune" / "arch.json").read_text())
    assert arch["timm_name"] == TINY_SWIN["name"]
    assert [b["heads"] for b in arch["blocks"]] == pruning["heads"]
