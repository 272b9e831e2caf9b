"""The verify package as the device imports it."""

from __future__ import annotations


def test_verify_and_report_import_without_torch() -> None:
    """Device machines have no torch: these packages must not pull it (or onnx/timm) in."""
    import subprocess
    import sys

    code = (
        "import sys, xpdeploy.verify.candidates, xpdeploy.verify.accelerators, "
        "xpdeploy.verify.gates, xpdeploy.verify.latency, xpdeploy.verify.thermal, "
        "xpdeploy.report.schema, xpdeploy.report.markdown; "
        "bad = [m for m in ('torch', 'timm', 'onnx', 'matplotlib') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
