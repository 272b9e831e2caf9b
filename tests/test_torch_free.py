"""The device side must run without torch (a Jetson image with torch is several GB).

Each check runs in a fresh interpreter whose import system refuses torch, torchvision and timm, so
an accidental import anywhere in a device-side module fails here, not on a Jetson.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from tests.report.test_compare import report

#: Modules the device stages and device-side commands import.
DEVICE_MODULES = (
    "xpdeploy.cli",
    "xpdeploy.cli.calibration",
    "xpdeploy.cli.compare",
    "xpdeploy.data.calibration",
    "xpdeploy.data.preprocess",
    "xpdeploy.data.image_set",
    "xpdeploy.data.verify_set",
    "xpdeploy.data.npz",
    "xpdeploy.report.compare",
    "xpdeploy.environment",
    "xpdeploy.report.markdown",
    "xpdeploy.report.schema",
    "xpdeploy.backends.trt_versions",
    "xpdeploy.engine.settings",
    "xpdeploy.engine.cache",
    "xpdeploy.engine.calibrator",
    "xpdeploy.engine.builder",
    "xpdeploy.backends.ort_runner",
    "xpdeploy.backends.trt_runner",
    "xpdeploy.backends.cuda_memory",
    "xpdeploy.export.fp16",
    "xpdeploy.export.qdq",
    "xpdeploy.export.graph",
    "xpdeploy.engine.engines",
    "xpdeploy.verify.accelerators",
    "xpdeploy.bundle",
    "xpdeploy.cli.bundle",
    "xpdeploy.device_run",
    "xpdeploy.pipeline",
    "xpdeploy.stages.build_engine",
    "xpdeploy.stages.verify",
    "xpdeploy.stages.report",
    "xpdeploy.stages.latency_table",
    "xpdeploy.verify.latency_grid",
    "xpdeploy.latency.grid",
    "xpdeploy.latency.table",
    "xpdeploy.latency.cache",
    "xpdeploy.latency.plots",
)

_BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ImportError(f"{name} is not installed on the device")
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks() -> None:
    out = _run("import torch")
    assert out.returncode != 0 and "not installed on the device" in out.stderr


def test_device_modules_import_without_torch() -> None:
    out = _run("""
        import importlib, sys
        for name in sys.argv[1:]:
            importlib.import_module(name)
        print("ok")
    """, *DEVICE_MODULES)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_device_commands_run_without_torch(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((8, 8, 3), 40 * i + (c == "b") * 100, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "r.json").write_text(json.dumps(report()))
    out = _run("""
        import sys
        from click.testing import CliRunner
        from xpdeploy.cli import cli
        tmp = sys.argv[1]
        runner = CliRunner()
        for args in (["--help"],
                     ["calib", "make", f"{tmp}/imgs", "--count", "4", "--seed", "0",
                      "-o", f"{tmp}/set.txt"],
                     ["calib", "check", f"{tmp}/set.txt", "--root", f"{tmp}/imgs"],
                     ["compare", f"{tmp}/r.json", f"{tmp}/r.json"]):
            result = runner.invoke(cli, args)
            print(args[0], result.exit_code)
            assert result.exit_code == 0, (args, result.output)
    """, str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "set.txt").is_file()
