"""Command line: ``xpdeploy bundle RUN_DIR -o OUT.tar [--stages ...]`` packs a run for a
torch-free device: an engine bundle (build_engine, verify, report) by default, a latency bundle
with ``--stages latency_table`` (:mod:`xpdeploy.bundle`). It states the bundle's size per part;
``--dry-run`` only does that.

Errors follow :mod:`xpdeploy.cli.guard`: one stderr line, exit code 1, no traceback. Registered on
the main group with ``cli.add_command(bundle)``; imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import click

from xpdeploy.cli.guard import guarded


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False),
              help="Bundle file: .tar (recommended, ONNX hardly compresses), .tar.gz or .tgz. "
                   "Required unless --dry-run (then default: RUN_DIR/bundle.tar).")
@click.option("--calibration-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder the calibration manifest's paths are relative to (default: the "
                   "source recorded in the manifest).")
@click.option("--stages", "device_stages", metavar="LIST",
              help="What the device continues with: build_engine,verify,report (the default; "
                   "RUN_DIR finished verify) or latency_table (RUN_DIR finished latency_blocks: "
                   "the device measures the latency table).")
@click.option("--with-exported", is_flag=True,
              help="Pack the exported ONNX files too (by default only the simplified file of "
                   "each model travels when the pipeline simplifies; the device then also "
                   "verifies the exported ones).")
@click.option("--dry-run", is_flag=True,
              help="State the bundle's size per part and what it leaves out; write nothing.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bundle(run_dir: Path, out: Path | None, calibration_root: Path | None,
           device_stages: str | None, with_exported: bool, dry_run: bool, debug: bool) -> None:
    """Pack RUN_DIR for a torch-free device (see --stages) and state its size per part."""
    from xpdeploy.bundle import (
        BundleManifest,
        bundle_stages,
        continuation_command,
        make_bundle,
        size_report,
    )
    from xpdeploy.errors import ConfigError

    def pack() -> tuple[Path, BundleManifest]:
        if out is None and not dry_run:
            raise ConfigError("missing -o/--out: name the bundle file, e.g. -o bundle.tar "
                              "(or pass --dry-run to only size it)")
        target = out if out is not None else run_dir / "bundle.tar"
        return target, make_bundle(run_dir, target, stages=bundle_stages(device_stages),
                                   calibration_root=calibration_root,
                                   include_exported=with_exported, dry_run=dry_run)

    target, manifest = guarded(debug, pack)
    head, *parts = size_report(manifest, target, dry_run=dry_run)
    click.echo(f"bundle {head}")
    for line in parts:
        click.echo(line)
    if dry_run:
        return
    click.echo("continue on the device with:")
    click.echo(f"  {continuation_command(target, manifest.device_stages)}")
