"""The learn_masks and prune stage functions on 2 CPU ranks (gloo), called as the executor does.

Every rank calls the stage with the same inputs; here rank 1 gets its own, empty stage folder
(the executor gives every rank the same one) so that the test can see it writes nothing. Its
learn_masks then finds no checkpoint, as rank 0 does not either: the runs are fresh on both.
A rank that skipped its part of a collective would leave the other waiting in DDP's all-reduce,
so the run would time out instead of passing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_pipeline_dict, write_pipeline
from tests.distributed_utils import run_ranks
from xpdeploy import distributed
from xpdeploy.artifacts import TorchModel
from xpdeploy.spec import PipelineSpec, SensitivityConfig, load_spec
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import read_settings

pytestmark = pytest.mark.slow

THRESHOLD_STEPS = 4


def _spec(tmp_path: Path) -> PipelineSpec:
    d = tiny_pipeline_dict(stages=["load", "learn_masks", "prune"], load={"evaluate": False})
    d["learn_masks"] = {"epochs": 1, "batch_size": 16, "max_images": 64}
    d["prune"] = {"criterion": "xpruner", "ranking": "threshold", "target_ratio": 0.6,
                  "threshold": {"steps": THRESHOLD_STEPS, "batch_size": 16}}
    return load_spec(write_pipeline(tmp_path / "p.yaml", d))


def _context(spec: PipelineSpec, run_dir: Path, stage: str) -> StageContext:
    """Rank 0 uses the folder ``stage``, rank r ``stage.rank<r>`` (see the module docstring)."""
    import importlib

    r = distributed.rank()
    folder = run_dir / (stage if r == 0 else f"{stage}.rank{r}")
    folder.mkdir(parents=True)
    name = stage.split("_", 1)[1].removesuffix("_magnitude").removesuffix("_sensitivity")
    settings = read_settings(importlib.import_module(f"xpdeploy.stages.{name}"), spec)
    return StageContext(stage, run_dir, folder, settings, "fingerprint")


def _stages_on_rank(spec: PipelineSpec, run_dir: Path, model: TorchModel) -> dict[str, Any]:
    from xpdeploy.stages import learn_masks, prune

    learned = learn_masks.run(_context(spec, run_dir, "02_learn_masks"), model)
    masks = distributed.broadcast_object(learned.get("masks"))  # the executor shares rank 0's
    pruned = prune.run(_context(spec, run_dir, "03_prune"), model, masks)
    assert spec.prune is not None
    magnitude = spec.model_copy(update={"prune": spec.prune.model_copy(
        update={"criterion": "magnitude", "ranking": "global"})})
    plain = prune.run(_context(magnitude, run_dir, "04_prune_magnitude"), model)
    measured = spec.model_copy(update={"prune": spec.prune.model_copy(update={
        "ranking": "sensitivity",
        "sensitivity": SensitivityConfig(images=64, batch_size=16, mlp_step=32)})})
    allocated = prune.run(_context(measured, run_dir, "05_prune_sensitivity"), model, masks)
    return {"learned": sorted(learned), "pruned": sorted(pruned), "plain": sorted(plain),
            "allocated": sorted(allocated)}


def test_rank_0_alone_writes_and_returns_the_outputs(tmp_path: Path) -> None:
    from xpdeploy.stages import load

    spec = _spec(tmp_path)
    run_dir = tmp_path / "run"
    model = load.run(StageContext("load", run_dir, run_dir / "01_load",
                                  read_settings(load, spec), "f"))["model"]
    first, second = run_ranks(_stages_on_rank, 2, spec, run_dir, model)

    assert first == {"learned": ["masks"], "pruned": ["model", "plan"], "plain": ["model", "plan"],
                     "allocated": ["model", "plan"]}
    assert second == {"learned": [], "pruned": [], "plain": [], "allocated": []}
    assert [p for p in run_dir.glob("*.rank1/**/*") if p.is_file()] == []
    learned = {p.name for p in (run_dir / "02_learn_masks").rglob("*") if p.is_file()}
    assert {"masks.safetensors", "scores.json", "history.json", "masks.pt"} <= learned
    plan = json.loads((run_dir / "03_prune" / "plan.json").read_text())
    assert plan["ranking"] == "threshold" and len(plan["threshold_history"]) == THRESHOLD_STEPS
    assert (run_dir / "04_prune_magnitude" / "plan.json").is_file()
    allocated = json.loads((run_dir / "05_prune_sensitivity" / "plan.json").read_text())
    assert allocated["sensitivity"]["rounds"][0]["curves"]["images"] == 64  # both ranks' halves
