"""report.md: verdict, numbers, tables and the synthetic warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.report import make_report
from xpdeploy.report.markdown import (
    candidate_speedup,
    fmt_ms,
    render_markdown,
    write_markdown,
)


def report(synthetic: bool = False, **kw: Any) -> dict[str, Any]:
    return make_report(synthetic, **kw)


def table_rows(md: str, header_start: str) -> list[str]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_failed_report_shows_verdict_numbers_and_failed_gate() -> None:
    md = render_markdown(report())
    first = md.splitlines()[0]
    assert first.startswith("# xpdeploy report: quickstart") and "FAILED" in first
    assert "imagefolder, 512 samples" in md
    assert "top-1 72.50 %" in md and "1.26 GMACs" in md and "5.72 M params" in md
    parity = table_rows(md, "| candidate | runner |")
    assert parity[0] == (
        "| candidate | runner | top-1 (%) | Δ top-1 (pts) | agreement | max abs diff | cosine "
        "| gates |"
    )
    assert parity[2] == (
        "| pruned | ort-cpu-fp32 | 72.10 | -0.40 | 0.9961 | 1.20e-04 | 0.999998 | pass |"
    )
    assert "| pruned-fp16 | ort-cpu-fp16 | 72.20 | -0.30 | 0.9850 | 4.50e-04 |" in parity[3]
    assert parity[3].endswith("| **FAIL**: min_agreement |")
    latency = table_rows(md, "| candidate | batch |")
    assert latency[0] == (
        "| candidate | batch | p10 | p50 | p90 | p99 | img/s | baseline | baseline p50 | speedup |"
    )
    assert latency[2] == (
        "| pruned | 1 | 1.80 | 2.00 | 2.20 | 2.60 | 500 | original | 3.60 | 1.80x +-3% |"
    )
    assert latency[3] == (
        "| pruned | 32 | 27.0 | 30.0 | 33.0 | 39.0 | 1067 | original | 54.0 | 1.80x +-2% |"
    )
    assert latency[4].endswith("| original | 3.50 | **2.33x +-14% (unstable)** |")
    assert latency[5].endswith("| original | 52.0 | 2.60x +-5% |")
    assert "marked **unstable**" in md
    assert len(latency) == 2 + 4  # two candidates x two batch sizes
    for rows in (parity, latency):
        assert len({row.count("|") for row in rows}) == 1
    assert "## Failed gates" in md
    assert "- `pruned-fp16` min_agreement: agreement 0.985 < 0.99" in md
    assert "n/a" not in md


def test_passed_report() -> None:
    md = render_markdown(report(status="passed", title="Nightly"))
    assert md.splitlines()[0] == "# Nightly — PASSED"


def test_synthetic_report_hides_accuracy() -> None:
    md = render_markdown(report(synthetic=True))
    assert (
        "**Warning: synthetic data: labels are random; accuracy figures are not reported.**" in md
    )
    assert "top-1 n/a (synthetic)" in md
    for row in table_rows(md, "| candidate | runner |")[2:]:
        assert row.count("n/a (synthetic)") == 2
    assert "72.10" not in md and "72.50" not in md and "-0.40" not in md
    assert "Skipped gates:" in md and "skipped: synthetic data has no accuracy" in md


def test_no_candidates() -> None:
    r = report()
    r["candidates"] = []
    md = render_markdown(r)
    assert "No candidates were verified." in md and "| candidate" not in md


def test_pipes_in_names_are_escaped() -> None:
    r = report()
    r["candidates"][0]["name"] = "a|b"
    row = table_rows(render_markdown(r), "| candidate | runner |")[2]
    assert row.startswith("| a\\|b |")


def test_ms_format_three_significant_digits() -> None:
    assert [fmt_ms(x) for x in (0.123456, 1.0, 12.345, 100.0, 999.4, 1234.5, None)] == [
        "0.123", "1.00", "12.3", "100", "999", "1234", "n/a",
    ]  # fmt: skip


def test_write_markdown(tmp_path: Path) -> None:
    r = report()
    target = tmp_path / "report.md"
    write_markdown(target, r)
    assert target.read_text(encoding="utf-8") == render_markdown(r)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def jetson_environment() -> dict[str, Any]:
    """A captured Jetson environment (capture()'s keys) in its 15 W mode with unlocked clocks."""
    from xpdeploy.environment import (
        MAX_PERFORMANCE_HINT,
        device_fingerprint,
        fingerprint_id,
    )

    env: dict[str, Any] = {
        "host": {"platform": "Linux-5.15-tegra-aarch64", "machine": "aarch64",
                 "cpu_model": "NVIDIA Jetson Orin Nano Developer Kit", "logical_cores": 6},
        "tools": {"python": "3.10.12", "xpdeploy": "0.1.0", "onnxruntime": "1.18.0"},
        "gpus": [{"name": "Orin (nvgpu)", "driver": "540.4.0", "sm_clock_mhz": 612.0,
                  "max_sm_clock_mhz": 1020.0, "temperature_c": 48.5}],
        "libraries": {"cuda": "12.6", "cudnn": "9.3.0", "tensorrt": "10.3.0",
                      "cuda-python": None, "pycuda": None, "onnxruntime-gpu": None},
        "jetson": {"l4t": "36.4.0", "board": "NVIDIA Jetson Orin Nano Developer Kit",
                   "nvpmodel": {"mode": "15W", "id": 1},
                   "jetson_clocks": {"gpu_min_max": [306000000, 1020000000], "cpus_online": 6,
                                     "locked": False},
                   "max_performance": False, "nvpmodel_raw": "NV Power Mode: 15W\n1\n",
                   "jetson_clocks_raw": None},
        "temperatures_c": {"cpu-thermal": 47.0},
        "warnings": [MAX_PERFORMANCE_HINT],
    }
    env["fingerprint"] = device_fingerprint(env)
    env["fingerprint_id"] = fingerprint_id(env)
    return env


def cpu_environment() -> dict[str, Any]:
    """A captured environment of a plain CPU machine: no GPU, no TensorRT, not a Jetson."""
    from xpdeploy.environment import device_fingerprint, fingerprint_id

    env: dict[str, Any] = {
        "host": {"platform": "Linux-6.8-x86_64", "machine": "x86_64",
                 "cpu_model": "AMD EPYC 7763 64-Core Processor", "logical_cores": 4},
        "tools": {"python": "3.11.9", "xpdeploy": "0.1.0", "onnxruntime": "1.19.2",
                  "torch": "2.4.1"},
        "gpus": None,
        "libraries": {"cuda": None, "cudnn": None, "tensorrt": None, "cuda-python": None,
                      "pycuda": None, "onnxruntime-gpu": None},
        "jetson": None,
        "temperatures_c": {},
        "warnings": [],
    }
    env["fingerprint"] = device_fingerprint(env)
    env["fingerprint_id"] = fingerprint_id(env)
    return env


def environment_section(md: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index("## Environment")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_environment_section_of_a_jetson_not_in_max_performance_mode() -> None:
    env = jetson_environment()
    md = render_markdown(report(environment=env))
    section = environment_section(md)
    assert section[2:7] == [
        f"- Device fingerprint `{env['fingerprint_id']}`",
        "- CPU: NVIDIA Jetson Orin Nano Developer Kit, 6 logical cores",
        "- GPU: Orin (nvgpu), driver 540.4.0",
        "- Libraries: TensorRT 10.3.0, CUDA 12.6, onnxruntime 1.18.0",
        "- Jetson: L4T 36.4.0, NVIDIA Jetson Orin Nano Developer Kit, power mode 15W (id 1), "
        "clocks not locked; max-performance mode: **no**",
    ]
    assert ("**Warning: the board is not in its max-performance mode: run sudo nvpmodel -m 0 && "
            "sudo jetson_clocks.**") in section
    assert md.index("## Latency") < md.index("## Environment")  # after the numbers it qualifies
    # ...and the warning once more above every latency figure, where it cannot be missed
    head = md[: md.index("## Parity")]
    assert "**Measured on a device that was not set up for benchmarking: the board is not in its " \
        "max-performance mode" in head


def test_environment_section_of_a_jetson_in_maxn_and_unknown_verdict() -> None:
    env = jetson_environment()
    env["jetson"].update(nvpmodel={"mode": "MAXN", "id": 0}, max_performance=True,
                         jetson_clocks={"locked": True})
    env["warnings"] = []
    section = environment_section(render_markdown(report(environment=env)))
    assert any(line.endswith("power mode MAXN (id 0), clocks locked; max-performance mode: yes")
               for line in section)
    assert not any("Warning" in line for line in section)
    env["jetson"].update(nvpmodel=None, jetson_clocks=None, max_performance=None)
    section = environment_section(render_markdown(report(environment=env)))
    assert "- Jetson: L4T 36.4.0, NVIDIA Jetson Orin Nano Developer Kit; max-performance mode: " \
           "unknown" in section


def test_environment_section_of_a_plain_cpu_machine() -> None:
    env = cpu_environment()
    section = environment_section(render_markdown(report(environment=env)))
    assert section == [
        "## Environment",
        "",
        f"- Device fingerprint `{env['fingerprint_id']}`",
        "- CPU: AMD EPYC 7763 64-Core Processor, 4 logical cores",
        "- Libraries: onnxruntime 1.19.2",
    ]


def test_environment_of_older_reports_still_renders() -> None:
    legacy = {"python": "3.11.9", "onnxruntime": "1.18.0", "tensorrt": None}
    md = render_markdown(report(environment=legacy))
    assert environment_section(md) == [
        "## Environment",
        "",
        "Recorded before device capture (no device fingerprint); tools: python 3.11.9, "
        "onnxruntime 1.18.0.",
    ]
    assert "## Environment" not in render_markdown(report(environment={}))
    partial = {"host": {}, "warnings": ["clocks unknown."]}  # keys missing: still renders
    section = environment_section(render_markdown(report(environment=partial)))
    assert "- Device fingerprint `unknown`" in section and "- CPU: unknown CPU" in section
    assert "**Warning: clocks unknown.**" in section


def test_environment_after_no_candidates() -> None:
    r = report(environment=cpu_environment())
    r["candidates"] = []
    md = render_markdown(r)
    assert "No candidates were verified." in md and "## Environment" in md


def test_a_report_without_spreads_shows_bare_speedups() -> None:
    """Reports written before speedups were measured in rounds have no spread to show."""
    r = report()
    for c in r["candidates"]:
        del c["speedup_spread"], c["unstable"]
    latency = table_rows(render_markdown(r), "| candidate | batch |")
    assert latency[2].endswith("| 3.60 | 1.80x |") and latency[4].endswith("| 3.50 | 2.33x |")
    assert "unstable" not in "".join(latency)


def test_a_report_without_p10_shows_na() -> None:
    """Reports written before p10 was recorded have no p10 key in their latency rows."""
    r = report()
    for c in r["candidates"]:
        for row in c["latency_ms"] + c["baseline_latency_ms"]:
            del row["p10"]
    latency = table_rows(render_markdown(r), "| candidate | batch |")
    assert latency[2] == (
        "| pruned | 1 | n/a | 2.00 | 2.20 | 2.60 | 500 | original | 3.60 | 1.80x +-3% |"
    )


def test_speedup_cells() -> None:
    c = {"speedup": {"1": 1.5, "8": None, "32": 2.0}, "speedup_spread": {"1": None, "32": 0.004},
         "unstable": [1]}
    assert candidate_speedup(c, 1) == "1.50x +-? (unstable)"  # a non-finite spread is null
    assert candidate_speedup(c, 1, bold=True) == "**1.50x +-? (unstable)**"
    assert candidate_speedup(c, 8) == "n/a" and candidate_speedup(c, 4) == "n/a"
    assert candidate_speedup(c, 32, bold=True) == "2.00x +-0.4%"
