"""Command line: ``xpdeploy bundle RUN_DIR -o OUT.tar [--stages ...]`` packs a run for a
torch-free device: an engine bundle (build_engine, verify, report) by default, a latency bundle
with ``--stages latency_table`` (:mod:`xpdeploy.bundle`).

Errors follow :mod:`xpdeploy.cli.guard`: one stderr line, exit code 1, no traceback. Registered on
the main group with ``cli.add_command(bundle)``; imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import click

from xpdeploy.cli.guard import guarded

_MIB = 1024 * 1024
#: Members listed one per line; the rest are summed up in one line.
_LISTED = 12


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Bundle file: .tar (recommended, ONNX hardly compresses), .tar.gz or .tgz.")
@click.option("--calibration-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder the calibration manifest's paths are relative to (default: the "
                   "source recorded in the manifest).")
@click.option("--stages", "device_stages", metavar="LIST",
              help="What the device continues with: build_engine,verify,report (the default; "
                   "RUN_DIR finished verify) or latency_table (RUN_DIR finished latency_blocks: "
                   "the device measures the latency table).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bundle(run_dir: Path, out: Path, calibration_root: Path | None, device_stages: str | None,
           debug: bool) -> None:
    """Pack RUN_DIR for a torch-free device (see --stages)."""
    from xpdeploy.bundle import bundle_stages, continuation_command, make_bundle

    manifest = guarded(debug, lambda: make_bundle(
        run_dir, out, stages=bundle_stages(device_stages), calibration_root=calibration_root))
    total = sum(m.size for m in manifest.members)
    click.echo(f"bundle {out}: {len(manifest.members)} members, {total / _MIB:.1f} MiB")
    for m in manifest.members[:_LISTED]:
        click.echo(f"  {m.path}  {m.size / _MIB:.2f} MiB")
    rest = manifest.members[_LISTED:]
    if rest:  # a latency bundle holds hundreds of block files
        click.echo(f"  ... and {len(rest)} more, {sum(m.size for m in rest) / _MIB:.1f} MiB")
    click.echo("continue on the device with:")
    click.echo(f"  {continuation_command(out, manifest.device_stages)}")
