"""Device-side verification of a bundle in a fresh interpreter that cannot import torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.test_bundle import BundledRun, bundled_run  # noqa: F401 (session fixture)
from tests.test_torch_free import _BLOCK
from xpdeploy.report.schema import build_report, validate_report

pytestmark = pytest.mark.slow

_VERIFY = textwrap.dedent("""
    import json, sys
    from xpdeploy.bundle import open_bundle
    from xpdeploy.verify.device import verify_bundle
    manifest = open_bundle(sys.argv[1], sys.argv[2])
    report = verify_bundle(sys.argv[2], threads=1, batch_sizes=[1], warmup=0, iters=2)
    assert "torch" not in sys.modules
    print(report.model_dump_json())
""")


def test_verify_bundle_without_torch_matches_the_host(bundled_run: BundledRun,  # noqa: F811
                                                      tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", _BLOCK + _VERIFY, str(bundled_run.tar),
                          str(tmp_path / "dev")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    by_name = {c["name"]: c for c in report["candidates"]}
    assert set(by_name) == {"original.onnx", "pruned.onnx", "original.sim.onnx",
                            "pruned.sim.onnx"}
    original = by_name["original.onnx"]
    assert original["top1"] == pytest.approx(bundled_run.original_top1)
    assert original["max_abs_diff"] < 1e-3 and original["agreement"] == 1.0
    assert by_name["pruned.onnx"]["source_max_abs_diff"] < 1e-3
    assert by_name["pruned.sim.onnx"]["baseline"] == "original.sim.onnx"
    assert report["original_top1"] == pytest.approx(bundled_run.original_top1)
    host = json.loads((bundled_run.run_dir / "09_verify" / "parity.json").read_text())
    host_passed = {c["name"]: c["passed"] for c in host["candidates"]}
    assert original["passed"]
    assert {n: c["passed"] for n, c in by_name.items()} == {n: host_passed[n] for n in by_name}

    from xpdeploy.artifacts import ParityReport

    parity = ParityReport.model_validate(report)
    validate_report(build_report(parity, pipeline="tiny", run_dir=str(tmp_path), status="passed",
                                 title=None, environment={}))


def test_onnxruntime_gpu_providers_become_extra_candidates(
    bundled_run: BundledRun, tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Where onnxruntime offers a GPU provider, each simplified file also runs on it, timed
    against the same file on the CPU. Here the "CUDA" session is a CPU session in disguise (this
    tests our candidate plumbing and gates, not onnxruntime-gpu)."""
    from xpdeploy.backends import ort_runner
    from xpdeploy.bundle import open_bundle
    from xpdeploy.verify import device
    from xpdeploy.verify import engines as verify_engines

    class DisguisedRunner(ort_runner.OrtRunner):
        def __init__(self, path, *, provider="CPUExecutionProvider", **kw) -> None:
            super().__init__(path, **kw)
            self.name = f"ort-{provider.removesuffix('ExecutionProvider').lower()}-fp32"

    monkeypatch.setattr(verify_engines, "gpu_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(ort_runner, "OrtRunner", DisguisedRunner)
    open_bundle(bundled_run.tar, tmp_path / "dev")
    report = device.verify_bundle(tmp_path / "dev", threads=1, batch_sizes=[1], warmup=0,
                                  iters=2)
    by_name = {c.name: c for c in report.candidates}
    cuda = by_name["original.sim.onnx [cuda]"]
    assert cuda.runner == "ort-cuda-fp32" and cuda.baseline == "original.sim.onnx [cpu]"
    assert {g.name for g in cuda.gates} == {"max_top1_drop", "min_agreement", "min_cosine"}
    assert by_name["pruned.sim.onnx [cuda]"].source == "pruned"
    assert report.passed
