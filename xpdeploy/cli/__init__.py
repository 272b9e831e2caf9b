"""Command line: ``xpdeploy run | validate | show``. Maps errors to exit codes
(docs/architecture.md section 5).

The main group lives here; the other commands are in this package's modules (``bundle``,
``calibration``, ``compare``) and share the error handling of :mod:`xpdeploy.cli.guard`.

Only click, pyyaml and pydantic are imported at start-up, so ``xpdeploy --help`` works (and is fast)
on a machine without torch, onnxsim or TensorRT.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xpdeploy import __version__, distributed
from xpdeploy.cli.bundle import bundle
from xpdeploy.cli.calibration import calib
from xpdeploy.cli.compare import compare
from xpdeploy.cli.guard import guarded as _guarded
from xpdeploy.distributed import is_main
from xpdeploy.errors import ConfigError, XpdeployError
from xpdeploy.progress import format_duration

if TYPE_CHECKING:
    from xpdeploy.spec import PipelineSpec

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a pipeline value, e.g. --set train.epochs=3 (repeatable; type-checked).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xpdeploy")
def cli() -> None:
    """xpdeploy: explainable pruning (X-Pruner) and edge deployment for vision transformers.

    Exit codes: 0 passed, 1 user/config/environment error, 2 usage error, 3 parity gate failed.
    """


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Run folder (default: runs/<pipeline name>/).")
@set_option
@click.option("--from", "from_stage", metavar="STAGE",
              help="Rerun from STAGE; earlier stages must have finished in the run folder.")
@click.option("--until", metavar="STAGE", help="Stop after STAGE.")
@click.option("--force", is_flag=True, help="Rerun every selected stage even if unchanged.")
@click.option("--stages", "device_stages", metavar="LIST",
              help="Bundles only: device stages, build_engine,verify,report or verify,report "
                   "(the default: no TensorRT needed); latency_table for a latency bundle.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run(pipeline: Path, run_dir: Path | None, overrides: tuple[str, ...], from_stage: str | None,
        until: str | None, force: bool, device_stages: str | None, debug: bool) -> None:
    """Run PIPELINE (a YAML file); finished stages whose inputs are unchanged are reused.

    PIPELINE may also be a device bundle (X.tar from `xpdeploy bundle`): it then continues here,
    without torch: TensorRT engines are built (--stages build_engine,verify,report) and they and
    the ONNX files verified against the host's reference logits; or, from a latency bundle, the
    latency table is measured (--stages latency_table) for the host to plan with.
    """
    from xpdeploy.device_run import is_bundle

    if is_bundle(pipeline):
        host_options = bool(from_stage or until)
        _run_bundle(pipeline, run_dir, device_stages, host_options, overrides, force, debug)
        return
    if device_stages:
        _guarded(debug, lambda: _refuse("--stages is for bundles; a pipeline's stages come from "
                                        "its 'stages:' list (or --from / --until)"))
    from xpdeploy.spec import load_spec

    t0 = time.monotonic()
    spec = _guarded(
        debug,
        lambda: load_spec(pipeline, overrides),
        on_error=lambda: click.echo(f"FAILED | {pipeline.stem} | 0s | invalid pipeline"),
    )
    folder = run_dir or Path("runs") / spec.name

    def failed_line() -> None:
        where = folder / "report.md" if (folder / "report.md").is_file() else folder
        if is_main():
            click.echo(f"FAILED | {spec.name} | {format_duration(time.monotonic() - t0)} | {where}")

    def go() -> None:
        from xpdeploy.pipeline import run_pipeline

        info = distributed.init_from_env()  # under torchrun: join the process group
        if info is not None and info.is_main:
            click.echo(f"distributed: {info.world_size} processes, backend {info.backend}")
        try:
            result = run_pipeline(spec, folder, from_stage=from_stage, until=until, force=force)
        finally:
            distributed.shutdown()
        where = folder / result.report.markdown_file if result.report else folder
        extra = f" (stopped after {until})" if until else ""
        if is_main():
            click.echo(
                f"PASSED | {spec.name} | {format_duration(result.duration_s)} | {where}{extra}"
            )

    _guarded(debug, go, on_error=failed_line)


def _refuse(message: str) -> None:
    raise ConfigError(message)


def _run_bundle(tar: Path, run_dir: Path | None, stages: str | None, host_options: bool,
                overrides: tuple[str, ...], force: bool, debug: bool) -> None:
    """``run X.tar``: the device side of a pipeline (xpdeploy.device_run), torch-free."""
    from xpdeploy.device_run import run_bundle, table_file

    t0 = time.monotonic()
    name = tar.name.split(".")[0]

    def go() -> None:
        if host_options:
            raise ConfigError("--from/--until apply to pipeline files, not to bundles; choose "
                              "the device stages with --stages")
        result = run_bundle(tar, run_dir, stages, overrides=overrides, force=force)
        where = (result.run_dir / result.report.markdown_file if result.report
                 else table_file(result.run_dir) or result.run_dir)
        click.echo(f"PASSED | {result.name} (device) | {format_duration(result.duration_s)} "
                   f"| {where}")

    def failed_line() -> None:
        click.echo(f"FAILED | {name} (device) | {format_duration(time.monotonic() - t0)} | {tar}")

    _guarded(debug, go, on_error=failed_line)


@cli.command()
@click.argument("pipeline", type=click.Path(path_type=Path, dir_okay=False))
@set_option
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def validate(pipeline: Path, overrides: tuple[str, ...], debug: bool) -> None:
    """Check PIPELINE and print it resolved (every default filled in); exit 0 or 1."""
    from xpdeploy.spec import dump_spec, load_spec

    def go() -> None:
        spec = load_spec(pipeline, overrides)
        click.echo(dump_spec(spec), nl=False)
        for warning in _path_warnings(spec):
            click.echo(f"warning: {warning}", err=True)
        try:
            spec.check_runnable()
        except XpdeployError as e:
            raise type(e)(f"{pipeline}: {e}") from None
        click.echo(f"# {pipeline}: valid", err=True)

    _guarded(debug, go)


def _path_warnings(spec: PipelineSpec) -> list[str]:
    """Paths the pipeline names that do not exist here (fine on another machine; worth a word)."""
    out = []
    if spec.model.checkpoint is not None and not spec.model.checkpoint.exists():
        out.append(f"model.checkpoint {spec.model.checkpoint} does not exist on this machine")
    if spec.data.root is not None and not spec.data.root.exists():
        out.append(f"data.root {spec.data.root} does not exist on this machine")
    return out


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def show(run_dir: Path, debug: bool) -> None:
    """One-screen summary of a finished or partial run in RUN_DIR."""
    from xpdeploy.summary import summarize_run

    click.echo(_guarded(debug, lambda: summarize_run(run_dir)))


cli.add_command(bundle)
cli.add_command(calib)
cli.add_command(compare)


def main() -> None:
    """Console-script entry point (also ``python -m xpdeploy`` and ``torchrun -m xpdeploy``).

    Every exit passes through here: a distributed run whose process group outlived it ends with
    its own exit code before the interpreter finalises (distributed.end_process says why).
    """
    try:
        cli(prog_name="xpdeploy")
    except SystemExit as e:
        distributed.end_process(e.code if isinstance(e.code, int) else int(e.code is not None))
        raise
