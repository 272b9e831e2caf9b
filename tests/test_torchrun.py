"""``torchrun --nproc_per_node 2 -m xpdeploy run``: the real launcher, 2 CPU processes, gloo.

Checks what issue 4 asks of a distributed run: the collective stages (train, finetune) run on both
ranks over different shards of the data, artifacts are written once (rank 0), and the result loads
and evaluates like any other run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    kill_at_mid_epoch_checkpoint,
    tiny_pipeline_dict,
    torchrun_pipeline_dict,
    write_pipeline,
)
from tests.distributed_utils import launch_ranks
from xpdeploy.data.sources import open_split
from xpdeploy.fileio import sha256_file
from xpdeploy.models.arch import rebuild_model
from xpdeploy.runfolder import RunFolder, parse_outputs
from xpdeploy.spec import load_spec
from xpdeploy.training.evaluate import evaluate_top1


def two_process_pipeline(tmp_path: Path) -> Path:
    """The pipeline of the two-process test (also looped by bench/torchrun_exit.py)."""
    return write_pipeline(tmp_path / "p.yaml", torchrun_pipeline_dict())


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_cmd(pipe: Path, run_dir: Path, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "xpdeploy", "run", str(pipe), "--run-dir",
            str(run_dir), *extra]


def _torchrun(pipe: Path, run_dir: Path, nproc: int,
              *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(torchrun_cmd(pipe, run_dir, nproc, *extra), env=ENV,
                          capture_output=True, text=True, timeout=600)


def _kill_processes_mentioning(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (Linux /proc)."""
    import signal

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def test_train_and_finetune_on_two_processes(tmp_path: Path) -> None:
    pipe = two_process_pipeline(tmp_path)
    run_dir = tmp_path / "ddp"
    proc = _torchrun(pipe, run_dir, 2)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "distributed: 2 processes, backend gloo" in out
    # Only rank 0 logs and writes: one line per stage, one verdict.
    assert out.count("[train] running") == 1 and out.count("[finetune] running") == 1
    assert sum(line.startswith("PASSED | tiny |") for line in out.splitlines()) == 1

    for stage, folder in (("train", "02_train"), ("finetune", "05_finetune")):
        history = json.loads((run_dir / folder / "history.json").read_text())
        for epoch in history:  # both ranks trained, on disjoint halves of the train split
            a, b = epoch["images_per_rank"]
            assert a > 0 and b > 0 and abs(a - b) <= 1, (stage, epoch)
            assert epoch["images_overlap"] <= 1, (stage, epoch)
        recipe = json.loads((run_dir / folder / "recipe.json").read_text())
        assert recipe["processes"] == 2 and recipe["global_batch"] == 64
    assert not list(run_dir.rglob("*.tmp"))

    # The same pipeline in one process writes exactly the same set of files: nothing extra
    # came from rank 1.
    single = tmp_path / "single"
    one = subprocess.run([sys.executable, "-m", "xpdeploy", "run", str(pipe), "--run-dir",
                          str(single)], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "distributed:" not in one.stdout  # no torchrun: no process group
    assert _files(run_dir) == _files(single)

    # The fine-tuned model loads like any other and evaluates to the figure the run recorded.
    spec = load_spec(pipe)
    manifest = RunFolder(run_dir).read_manifest("finetune")
    assert manifest is not None
    outputs = parse_outputs(manifest)
    model = outputs["model"]
    net = rebuild_model(model.arch, run_dir / model.weights_file)
    val = open_split(spec.data, model.data_config, "val", num_classes=10, seed=spec.seed)
    top1 = evaluate_top1(net, val, batch_size=64)
    assert top1 == model.top1
    assert top1 > 30.0  # well above chance (10%) after 2 + 2 short epochs


def test_one_process_under_torchrun_joins_a_group_of_one(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 1``: the collective stages take their distributed path with
    one rank (how a one-GPU machine checks NCCL, bench/gpu_check.sh); a plain process joins
    none (the two-process test's single run prints no "distributed:" line)."""
    pipe = two_process_pipeline(tmp_path)
    run_dir = tmp_path / "one"
    proc = _torchrun(pipe, run_dir, 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "distributed: 1 processes, backend gloo" in proc.stdout
    assert sum(line.startswith("PASSED | tiny |") for line in proc.stdout.splitlines()) == 1
    recipe = json.loads((run_dir / "02_train" / "recipe.json").read_text())
    assert recipe["processes"] == 1 and recipe["global_batch"] == 32


def test_a_bad_input_stops_every_rank_with_one_error_line(tmp_path: Path) -> None:
    d = tiny_pipeline_dict()
    d["data"] = {**d["data"], "source": "imagefolder", "root": str(tmp_path / "missing")}
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    proc = _torchrun(pipe, tmp_path / "run", 2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: data.root" in line]
    assert len(errors) == 1, proc.stderr  # rank 0 says it; rank 1 exits quietly
    assert "does not exist" in errors[0]
    assert "[rank 1]" not in proc.stderr
    assert not (tmp_path / "run" / "01_load" / "manifest.json").exists()


@pytest.mark.parametrize("case", ["passed", "bad input", "parity gate"])
def test_every_rank_exits_with_the_runs_code(tmp_path: Path, case: str) -> None:
    """Each rank's own exit code (torchrun reports only the first failure): 0 for a passing run
    on every rank, and a failure's code on every rank, with no abort at interpreter exit."""
    d = tiny_pipeline_dict(stages=["load", "train", "export_onnx", "verify", "report"],
                           verify={"batch_sizes": [1], "warmup": 1, "iters": 3})
    d["train"]["threads"] = 1
    if case == "bad input":
        d["data"] = {**d["data"], "source": "imagefolder", "root": str(tmp_path / "missing")}
    if case == "parity gate":
        d["verify"]["gates"] = {"max_abs_diff": 1e-15}
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    ranks = launch_ranks([sys.executable, "-m", "xpdeploy", "run", str(pipe), "--run-dir",
                          str(tmp_path / "run")], 2, timeout_s=300)
    expected = {"passed": 0, "bad input": 1, "parity gate": 3}[case]
    assert [r.returncode for r in ranks] == [expected, expected], [r.stderr for r in ranks]
    verdict = "PASSED" if case == "passed" else "FAILED"
    assert ranks[0].stdout.splitlines()[-1].startswith(f"{verdict} | tiny |")
    assert ranks[1].stdout == "" and ranks[1].stderr == ""  # rank 0 alone speaks
    assert "terminate called" not in ranks[0].stderr


def test_a_killed_distributed_run_resumes_with_the_same_weights(tmp_path: Path) -> None:
    """SIGKILL to torchrun and both workers mid-epoch; the same command resumes from the step
    checkpoint (every rank's RNG state and partial metrics) and ends with the weights of an
    uninterrupted 2-process run."""
    d = tiny_pipeline_dict()
    d["train"].update({"epochs": 3, "batch_size": 16, "checkpoint_every_steps": 10,
                       "threads": 1})
    pipe = write_pipeline(tmp_path / "p.yaml", d)
    clean = _torchrun(pipe, tmp_path / "clean", 2, "--until", "train")
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-2000:]

    killed = tmp_path / "killed"
    cmd = torchrun_cmd(pipe, killed, 2, "--until", "train")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # torchrun starts its workers in sessions of their own: kill every process of this run (as
    # a scheduler preempting the job would), not only torchrun's group.
    state = kill_at_mid_epoch_checkpoint(
        proc, killed / "02_train" / "checkpoints" / "last.pt",
        lambda: _kill_processes_mentioning(str(killed)))
    assert state, "the run ended before a mid-epoch checkpoint was seen"
    position = (state["epoch"], state["step_in_epoch"])
    assert len(state["rng"]) == 2  # both ranks' RNG states

    rerun = _torchrun(pipe, killed, 2, "--until", "train")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "resuming from step" in rerun.stdout, (position, rerun.stdout)
    assert not (killed / "02_train" / "manifest.json").exists() or "[train] running" in rerun.stdout
    assert sha256_file(killed / "02_train" / "model.safetensors") == sha256_file(
        tmp_path / "clean" / "02_train" / "model.safetensors")
