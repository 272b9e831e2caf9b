"""A TensorRT latency table measured on the device, from a latency bundle, then planned with.

The whole hand-off as a user meets it: the host run (no TensorRT here) stops at ``latency_table``
with the bundle route; the commands it prints are run as printed: ``xpdeploy bundle``, the
device's ``xpdeploy run latency.tar --stages latency_table`` (in a subprocess with torch blocked
and the onnxruntime-backed TensorRT stand-in, :mod:`tests.engine.ort_backed_trt`), then the host
plans with the device's ``table.json``.

The stand-in's engines run their ONNX file in onnxruntime, which on a tiny model takes about the
same time whatever the model; so here each engine call also waits 1 ms plus 1 ms per 20 kB of its
ONNX file, a device whose time grows with the weights, so that the table's figures are ordered
like a real device's and the plan's target can lie between the smallest and the original model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import tiny_pipeline_dict, write_pipeline
from tests.engine.trt_api import TABLE_VERSIONS
from tests.test_torch_free import _BLOCK
from xpdeploy.bundle import (
    BUNDLE_JSON,
    DEVICE_STAGES,
    LATENCY_STAGES,
    bundle_command,
    bundle_header,
    continuation_command,
    make_bundle,
    open_bundle,
    plan_command,
    read_bundle,
    size_report,
)
from xpdeploy.cli import cli
from xpdeploy.device_run import parse_stages
from xpdeploy.errors import ConfigError, RunFolderError
from xpdeploy.latency.grid import BlockGrid
from xpdeploy.latency.table import LatencyModel
from xpdeploy.pipeline import run_pipeline
from xpdeploy.spec import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BATCH = 2
#: The tiny ViT (tests/conftest.py): 2 blocks of 2 heads, MLP 128; widths every 16.
HEADS, MLP, STEP = 2, 128, 16

_DEVICE = """
import os, sys, time
from tests.engine import ort_backed_trt as stand_in
stand_in.install_stand_in(setattr)
_execute = stand_in.OrtContext.execute_async_v3
def _timed(self, stream):  # 1 ms + 1 ms per 20 kB of weights (module doc)
    time.sleep(1e-3 + os.path.getsize(self.engine._note["onnx"]) / 20e6)
    return _execute(self, stream)
stand_in.OrtContext.execute_async_v3 = _timed
from xpdeploy.cli import main
sys.argv = ["xpdeploy", *sys.argv[1:]]
try:
    main()
finally:
    assert "torch" not in sys.modules, "the device run imported torch"
"""


def _pipeline(tmp: Path) -> Path:
    d = tiny_pipeline_dict(prune={
        "criterion": "magnitude", "target_latency_ms": 1.0, "round_mlp_to": STEP,
        "sensitivity": {"images": 64, "batch_size": 64, "mlp_step": STEP},
        "latency": {"runtime": "tensorrt", "precision": "fp16", "batch": BATCH,
                    "validation_models": 2, "warmup": 1, "iters": 4, "rounds": 2}})
    d["stages"] = ["load", "latency_blocks", "latency_table", "prune"]
    return write_pipeline(tmp / "latency.yaml", d)


@dataclass(frozen=True)
class Measured:
    """The host run, the commands its error printed, the bundle and the device's run."""

    pipeline: Path
    run_dir: Path
    error: str
    bundle_cmd: str
    device_cmd: str
    plan_cmd: str
    tar: Path
    device_dir: Path
    device: subprocess.CompletedProcess[str]

    def table(self) -> Path:
        return self.device_dir / "runs" / "latency-device" / "12_latency_table" / "table.json"


def device_run(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """``xpdeploy ARGS`` on the "device": torch blocked, the TensorRT stand-in, its own cache."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XPDEPLOY_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", _BLOCK + _DEVICE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    tmp = tmp_path_factory.mktemp("latency-bundle")
    pipe, run_dir = _pipeline(tmp), tmp / "run"
    host = CliRunner().invoke(cli, ["run", str(pipe), "--run-dir", str(run_dir)])
    assert host.exit_code == 1, host.output
    error = host.output.strip().splitlines()[-1]
    found = re.search(r"Pack the block files with '([^']+)', run '([^']+)' on the device, copy "
                      r"the table\.json it writes here and plan with it: '([^']+)'$", error)
    assert found, error
    bundle_cmd, device_cmd, plan_cmd = found.groups()
    # The bundle command as printed.
    argv = shlex.split(bundle_cmd)
    assert argv[0] == "xpdeploy"
    packed = CliRunner().invoke(cli, argv[1:])
    assert packed.exit_code == 0, packed.output
    tar = Path(argv[argv.index("-o") + 1])
    # Copied to the device, continued there with the command as printed (after the image name).
    device_dir = tmp / "device"
    device_dir.mkdir()
    shutil.copy(tar, device_dir)
    device = device_run(shlex.split(device_cmd.split("xpdeploy-jetson:r36 xpdeploy ", 1)[1]),
                        device_dir, tmp / "device-cache")
    return Measured(pipe, run_dir, error, bundle_cmd, device_cmd, plan_cmd, tar, device_dir,
                    device)


def test_a_host_without_tensorrt_names_the_bundle_route(measured: Measured) -> None:
    run_dir, tar = measured.run_dir, measured.run_dir / "latency.tar"
    assert measured.error.startswith("error: latency_table needs TensorRT, which is not "
                                     "installed")
    assert measured.bundle_cmd == bundle_command(run_dir, tar, LATENCY_STAGES) == (
        f"xpdeploy bundle {run_dir} -o {tar} --stages latency_table")
    assert measured.device_cmd == continuation_command(tar, LATENCY_STAGES)
    assert measured.device_cmd.endswith(" xpdeploy run latency.tar --stages latency_table")
    assert measured.plan_cmd == plan_command(run_dir, "table.json") == (
        f"xpdeploy run {run_dir}/pipeline.yaml --run-dir {run_dir} "
        "--set prune.latency.table=table.json")
    assert (run_dir / "11_latency_blocks" / "manifest.json").is_file()
    assert not (run_dir / "12_latency_table").exists()  # failed: nothing half-written
    with pytest.raises(ConfigError, match="measured where TensorRT runs"):
        run_pipeline(load_spec(measured.pipeline), run_dir)


def test_the_latency_bundle_holds_the_grid_and_no_verification(measured: Measured,
                                                               tmp_path: Path) -> None:
    head = bundle_header(measured.tar)
    assert head.device_stages == LATENCY_STAGES and head.reference is None
    assert head.calibration is None and set(head.stages) == {"load", "latency_blocks"}
    opened = open_bundle(measured.tar, tmp_path / "x")
    grid = BlockGrid.read(tmp_path / "x" / "11_latency_blocks" / "grid.json")
    expected = {"pipeline.yaml", "11_latency_blocks/grid.json",
                *(f"11_latency_blocks/{f}" for f in grid.files())}
    assert set(opened.member_paths()) == expected
    assert len(grid.shapes) == 1 and len(grid.shapes[0].points) == HEADS * MLP // STEP
    assert len(grid.validation) == 2
    # The size report sums the grid's many files per folder instead of listing each.
    sized = head.model_copy(update={"tar_bytes": measured.tar.stat().st_size})
    lines = size_report(sized, measured.tar)
    blocks = [line for line in lines if "latency grid: blocks/" in line]
    assert len(blocks) == 1 and blocks[0].endswith(f"({HEADS * MLP // STEP} files)")
    assert any("latency grid: models/" in line for line in lines)
    assert not any("left out" in line for line in lines)
    # An older (format-2) bundle.json has no device_stages: it is an engine bundle.
    data = json.loads((tmp_path / "x" / BUNDLE_JSON).read_text())
    del data["device_stages"]
    (tmp_path / "x" / BUNDLE_JSON).write_text(json.dumps({**data, "format": 2}))
    assert read_bundle(tmp_path / "x").device_stages == DEVICE_STAGES


def test_the_device_measures_the_tensorrt_table_without_torch(measured: Measured) -> None:
    out = measured.device
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    table_path = measured.table()
    assert lines[-1].startswith("PASSED | tiny (device) |")
    assert lines[-1].endswith(f"| {table_path.relative_to(measured.device_dir)}")
    assert lines[-4] == f"[bundle] latency table: {table_path.relative_to(measured.device_dir)}"
    assert lines[-2] == f"    {measured.plan_cmd}"
    assert "[latency_blocks] from the bundle (ran on the host)" in out.stdout

    table = LatencyModel.read(table_path)
    key = table.key
    assert (key.runtime, key.precision, key.batch, key.threads) == ("tensorrt", "fp16", BATCH, 0)
    grid = BlockGrid.read(measured.run_dir / "11_latency_blocks" / "grid.json")
    assert key.arch_digest == grid.arch_digest
    (shape,) = table.shapes
    assert {(p.heads, p.mlp) for p in shape.points} == {
        (h, m) for h in range(1, HEADS + 1) for m in range(STEP, MLP + 1, STEP)}
    # Every engine call waits >= 1 ms: every figure is at least that, none absurd.
    assert all(1.0 <= p.ms < 100.0 for p in shape.points), shape.points
    full, one = shape.lookup()[(HEADS, MLP)], shape.lookup()[(1, STEP)]
    assert full.ms > one.ms  # more weights, more time
    assert 1.0 <= table.fixed_ms < table.smallest_ms < table.original_ms < 100.0
    assert len(table.validation) == 2 and all(r.measured_ms > 1.0 for r in table.validation)

    # One static-profile engine per grid file, at the table's batch and precision.
    engines = measured.device_dir / "runs" / "latency-device" / "12_latency_table" / \
        "checkpoints" / "engines" / "engines"
    notes = {p.name: json.loads(p.read_bytes()) for p in engines.glob("*.plan")}
    assert len(notes) == len(grid.files())
    block = notes[f"blocks_s0_h1_m{STEP}.fp16-b{BATCH}.plan"]
    sample = grid.shapes[0].input_shape
    assert block["profile"] == [[BATCH, *sample]] * 3 and block["flags"] == ["FP16"]
    assert notes[f"models_original.fp16-b{BATCH}.plan"]["profile"] == \
        [[BATCH, *grid.input_size]] * 3

    again = device_run(["run", "latency.tar", "--stages", "latency_table"], measured.device_dir,
                       measured.device_dir / "cache")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "[latency_table] unchanged since the last run: reused" in again.stdout


def test_the_host_plans_with_the_device_table(measured: Measured, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert measured.device.returncode == 0, measured.device.stderr[-2000:]
    table = LatencyModel.read(measured.table())
    # Halfway between the plans the planner can choose, by the table's own prediction (what the
    # planner compares with). The calibration predicts the original and the smallest model
    # exactly, so this target is exactly the cost of one block full and one smallest: the
    # solver's edge case that once made this test flaky (tests/prune/test_allocation.py, the
    # rounding-error test).
    blocks = table.blocks
    cheapest = table.predict([1] * blocks, [STEP] * blocks)
    full = min(table.predict([HEADS] * blocks, [MLP] * blocks), table.original_ms)
    target = (cheapest + full) / 2  # (a target at or above the original is refused)
    monkeypatch.chdir(tmp_path)
    shutil.copy(measured.table(), tmp_path / "table.json")  # "copy it to the host"
    argv = shlex.split(measured.plan_cmd)
    result = CliRunner().invoke(cli, [*argv[1:], "--set", f"prune.target_latency_ms={target}"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED | tiny |")
    run_dir = measured.run_dir
    assert "[latency_blocks] unchanged since the last run: reused" in result.output
    manifest = json.loads((run_dir / "12_latency_table" / "manifest.json").read_text())
    assert manifest["outputs"]["table"]["artifact"]["source"] == "file"
    plan = json.loads((run_dir / "04_prune" / "plan.json").read_text())
    latency = plan["latency"]
    assert (latency["runtime"], latency["precision"], latency["batch"]) == (
        "tensorrt", "fp16", BATCH)
    assert latency["target_ms"] == pytest.approx(target)
    assert 0 < latency["predicted_ms"] <= target
    assert latency["original_ms"] == pytest.approx(table.original_ms)


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_refusals_are_one_line_with_the_fix(measured: Measured, tmp_path: Path) -> None:
    runner = CliRunner()
    # A run that did not finish latency_blocks.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(measured.run_dir, unfinished, ignore=shutil.ignore_patterns("*.tar"))
    (unfinished / "11_latency_blocks" / "manifest.json").unlink()
    out = runner.invoke(cli, ["bundle", str(unfinished), "-o", str(tmp_path / "x.tar"),
                              "--stages", "latency_table"])
    assert out.exit_code == 1
    assert _one_error_line(out.output) == (
        f"error: run folder {unfinished} has no finished 'latency_blocks' stage "
        f"(11_latency_blocks/manifest.json is missing); finish the run first with xpdeploy run "
        f"{unfinished}/pipeline.yaml --run-dir {unfinished} --until latency_blocks")
    assert not (tmp_path / "x.tar").exists()
    with pytest.raises(RunFolderError, match="no finished 'latency_blocks' stage"):
        make_bundle(unfinished, tmp_path / "x.tar", stages=LATENCY_STAGES)
    # An engine bundle of a run that never verified.
    out = runner.invoke(cli, ["bundle", str(measured.run_dir), "-o", str(tmp_path / "x.tar")])
    assert out.exit_code == 1
    assert _one_error_line(out.output) == (
        f"error: pipeline 'tiny' in {measured.run_dir} has no 'verify' stage, so there is "
        "nothing to continue with build_engine,verify,report on a device")
    # Stages of two kinds of bundle, or of none.
    for stages in ("latency_table,verify", "deploy"):
        out = runner.invoke(cli, ["bundle", str(measured.run_dir), "-o",
                                  str(tmp_path / "x.tar"), "--stages", stages])
        assert out.exit_code == 1
        assert _one_error_line(out.output) == (
            f"error: --stages '{stages}': a bundle continues with build_engine,verify,report (a "
            "run finished up to verify) or latency_table (a run finished up to latency_blocks); "
            "one kind per bundle")
    # A latency bundle asked for engine stages: refused before anything is extracted.
    dev = tmp_path / "dev"
    out = runner.invoke(cli, ["run", str(measured.tar), "--run-dir", str(dev),
                              "--stages", "build_engine,verify"])
    assert out.exit_code == 1
    assert _one_error_line(out.output) == (
        "error: --stages 'build_engine,verify': bundle latency.tar continues with latency_table "
        "only (unknown: build_engine, verify); engines and verification continue from an engine "
        f"bundle of a run that finished verify: xpdeploy bundle {measured.run_dir} -o bundle.tar")
    assert out.output.strip().splitlines()[-2].startswith("FAILED | latency (device) |")
    assert not dev.exists()


def test_stage_lists_follow_the_bundle() -> None:
    assert parse_stages(None, LATENCY_STAGES) == ["latency_table"]
    assert parse_stages(None) == ["verify", "report"]
    with pytest.raises(ConfigError, match=r"a latency table is measured from a latency bundle: "
                       r"xpdeploy bundle /r -o latency\.tar --stages latency_table"):
        parse_stages("latency_table", DEVICE_STAGES, source_run="/r")


def test_the_bundle_header_comes_first(measured: Measured) -> None:
    """bundle.json is the tar's first member: a device reads what a bundle continues with before
    extracting anything."""
    with tarfile.open(measured.tar) as tar:
        first = tar.next()
    assert first is not None and first.name == BUNDLE_JSON
    assert bundle_header(measured.tar).pipeline == "tiny"


@pytest.mark.parametrize("version", TABLE_VERSIONS)
def test_the_tensorrt_opener_shares_one_backend_and_reuses_plans(
        measured: Measured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        version: str) -> None:
    """In process, on a stand-in of each TensorRT version (tests/engine/trt_api.py): runners open
    together share one CUDA backend, closed with the last; a file opened again is not built
    again; a file fed the wrong input name is refused. JetPack 5's 8.5 refuses the grid's
    opset-17 files in one line before any build."""
    import numpy as np

    from tests.engine.ort_backed_trt import install_stand_in
    from xpdeploy.artifacts import LatencySetting
    from xpdeploy.errors import BuildError
    from xpdeploy.verify.latency_grid import runtime_opener

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # restored after the test
    trt, calls, loader = install_stand_in(monkeypatch.setattr, version=version)
    folder = measured.run_dir / "11_latency_blocks"
    grid = BlockGrid.read(folder / "grid.json")
    setting = LatencySetting(runtime="tensorrt", precision="fp32", batch=BATCH, threads=0)
    opener = runtime_opener(setting, tmp_path / "engines")
    block = folder / grid.shapes[0].reference().file
    tokens = np.ones((BATCH, *grid.shapes[0].input_shape), np.float32)
    if version.startswith("8.5"):
        with pytest.raises(BuildError, match=r"TensorRT 8\.5\.2 cannot parse .*opset"), \
                opener(block, "tokens"):
            pass
        assert calls == []
        return
    with opener(block, "tokens") as a, opener(folder / grid.original.file, "pixels") as b:
        assert a.name == b.name == "trt-fp32"
        assert a.infer(tokens).shape == tokens.shape  # the block's tokens out, (B, T, D)
        assert b.infer(np.ones((BATCH, *grid.input_size), np.float32)).shape == (BATCH, 10)
        assert len(loader.opened) == 1 and not loader.opened[0].closed
    assert loader.opened[0].closed and loader.opened[0].live_allocations == 0
    with opener(block, "tokens"):
        pass
    assert len(trt._builds) == 2  # the block's plan came from the engine cache
    assert trt._builds[0]["flags"] == []  # fp32: no precision flag
    assert trt._builds[0]["profile"][1] == [BATCH, *grid.shapes[0].input_shape]  # static, tokens
    with pytest.raises(BuildError, match=r"takes input 'tokens', the latency grid feeds it "
                                         r"'pixels'; rerun latency_blocks"), \
            opener(block, "pixels"):
        pass
