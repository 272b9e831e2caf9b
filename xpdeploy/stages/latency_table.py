"""``latency_table``: the measured latency model of the target runtime (torch-free).

Three ways to a table, in order: ``prune.latency.table`` (a file measured elsewhere, the device's:
checked against this architecture, runtime, precision and batch, and for a runtime of this machine
also against this machine); the cache (the same key measured before on this machine); or measured
here, now (:mod:`xpdeploy.verify.latency_grid`), then cached. A TensorRT table is measured where
TensorRT runs: on a host without it the stage says how (a latency bundle).
"""

from __future__ import annotations

from xpdeploy.artifacts import Artifact, LatencyBlocks, LatencySetting, LatencyTable
from xpdeploy.bundle import LATENCY_STAGES, bundle_command, continuation_command, plan_command
from xpdeploy.environment import capture, device_fingerprint, fingerprint_id
from xpdeploy.errors import ConfigError, MissingDependencyError
from xpdeploy.latency.cache import cached_table, store_table
from xpdeploy.latency.grid import BlockGrid
from xpdeploy.latency.plots import plot_latency_table
from xpdeploy.latency.table import LatencyModel, TableKey
from xpdeploy.progress import log
from xpdeploy.spec import LatencyConfig, PipelineSpec
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import StageSettings
from xpdeploy.verify.latency_grid import TimingSettings, measure_table, runtime_opener

TABLE_JSON = "table.json"
#: The latency bundle the stage's hand-off message names, in the run folder.
LATENCY_BUNDLE = "latency.tar"


class Settings(StageSettings):
    latency: LatencyConfig  # prune.latency


def settings(spec: PipelineSpec) -> Settings:
    return Settings(latency=spec.prune.latency if spec.prune else LatencyConfig())


def setting_of(cfg: LatencyConfig) -> LatencySetting:
    """Runtime, precision, batch; threads only where they change the figure (onnxruntime-cpu)."""
    return LatencySetting(runtime=cfg.runtime, precision=cfg.precision, batch=cfg.batch,
                          threads=cfg.threads if cfg.runtime == "onnxruntime-cpu" else 0)


def table_key(grid: BlockGrid, setting: LatencySetting) -> TableKey:
    """Where a table of ``grid`` measured on this machine with ``setting`` holds (this machine's
    fingerprint: ``environment.device_fingerprint``)."""
    env = capture()
    return TableKey(arch_digest=grid.arch_digest, arch_name=grid.arch_name,
                    runtime=setting.runtime, precision=setting.precision, batch=setting.batch,
                    threads=setting.threads, device_id=fingerprint_id(env),
                    device=device_fingerprint(env))


def run(ctx: StageContext[Settings], blocks: LatencyBlocks) -> dict[str, Artifact]:
    cfg = ctx.settings.latency
    grid_path = ctx.path(blocks.file)
    grid = BlockGrid.read(grid_path)
    setting = setting_of(cfg)
    key = table_key(grid, setting)
    if cfg.table is not None:
        table = LatencyModel.read(cfg.table, what="prune.latency.table")
        # A CPU or onnxruntime table holds on the machine it was measured on; a TensorRT table
        # comes from the device by design, so only what it was measured for is checked here.
        table.check(key, device=cfg.runtime != "tensorrt", where=f"prune.latency.table "
                    f"{cfg.table}")
        source = "file"
    elif cfg.cache and (hit := cached_table(key)) is not None:
        table, source = hit, "cache"
    else:
        try:
            # TensorRT plans under checkpoints/ outlive an interrupted attempt: a rerun reuses them.
            opener = runtime_opener(setting, ctx.stage_dir / "checkpoints" / "engines")
        except MissingDependencyError as e:
            if cfg.runtime != "tensorrt":
                raise
            tar = ctx.run_dir / LATENCY_BUNDLE
            raise ConfigError(
                f"{e}: a tensorrt latency table is measured where TensorRT runs. Pack the block "
                f"files with '{bundle_command(ctx.run_dir, tar, LATENCY_STAGES)}', run "
                f"'{continuation_command(tar, LATENCY_STAGES)}' on the device, copy the "
                f"{TABLE_JSON} it writes here and plan with it: "
                f"'{plan_command(ctx.run_dir, TABLE_JSON)}'") from None
        table = measure_table(grid, grid_path.parent, key, opener,
                              TimingSettings(warmup=cfg.warmup, iters=cfg.iters,
                                             rounds=cfg.rounds, max_spread=cfg.max_spread),
                              seed=0)
        source = "measured"
        if cfg.cache:
            store_table(table)
    path = ctx.stage_dir / TABLE_JSON
    table.write(path)
    plots = plot_latency_table(table, ctx.stage_dir)
    errors = [round(r.error_pct, 2) for r in table.validation]
    log(f"  latency table ({source}): original {table.original_ms:.3f} ms at batch "
        f"{setting.batch} on {setting.runtime}, {table.points} points, "
        f"{table.unstable_points} unstable; prediction error on "
        f"{len(errors)} pruned models: {errors} %")
    if table.unstable_points:
        log(f"  warning: {table.unstable_points} of {table.points} points kept a spread above "
            f"{cfg.max_spread:.0%} after retries (marked in {TABLE_JSON}); the plan uses them")
    return {"table": LatencyTable(
        file=ctx.rel(path), setting=setting, device_id=table.key.device_id,
        original_ms=table.original_ms, points=table.points,
        unstable_points=table.unstable_points, prediction_error_pct=errors, source=source,
        plots=[ctx.rel(p) for p in plots])}
