"""Environment capture on a faked Jetson tree and a faked GPU box (no real device is needed)."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from xpdeploy import environment as env_mod
from xpdeploy.environment import (
    MAX_PERFORMANCE_HINT,
    capture,
    device_fingerprint,
    fingerprint_id,
    parse_jetson_clocks,
    parse_nvpmodel,
    sample_temperatures,
)

TEGRA_RELEASE = (
    "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
    "DATE: Mon May  6 17:34:21 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
)
NVP_MAXN = "NV Power Mode: MAXN\n0\n"
NVP_15W = "NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n2\n"
CLOCKS_LOCKED = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu2: Online=0 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=729600
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
FAN Dynamic Speed control=active hwmon4_pwm=77
NV Power Mode: MAXN
"""  # noqa: E501
CLOCKS_FREE = CLOCKS_LOCKED.replace("cpu1: Online=1 Governor=schedutil MinFreq=2201600",
                                    "cpu1: Online=1 Governor=schedutil MinFreq=729600")
SMI_A100 = "NVIDIA A100-SXM4-80GB, 535.104.05, 1410 MHz, 1410 MHz, 34\n"
SMI_H100 = "NVIDIA H100 80GB HBM3, 550.54.15, 1980 MHz, 1980 MHz, 41\n"
NVINFER_H = """#define TRT_MAJOR_ENTERPRISE 10
#define TRT_MINOR_ENTERPRISE 3
#define TRT_PATCH_ENTERPRISE 0
#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE //!< TensorRT major version.
#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE
#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE
"""
CUDNN_H = "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 3\n#define CUDNN_PATCHLEVEL 0\n"
TOOLS = {"python": "3.10.12", "xpdeploy": "0.1.0", "onnxruntime": "1.18.0", "tensorrt": None}


def runner(outputs: dict[str, str | None]):
    """Fake command runner: the output for argv[0], None (missing tool) otherwise."""
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> str | None:
        calls.append(list(argv))
        return outputs.get(argv[0])

    run.calls = calls  # type: ignore[attr-defined]
    return run


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def jetson_tree(root: Path) -> Path:
    """An Orin as /etc, /proc, /sys and /usr/include show it (two zones share a type name)."""
    write(root / "etc/nv_tegra_release", TEGRA_RELEASE)
    write(root / "proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n")
    write(root / "proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    write(root / "usr/include/aarch64-linux-gnu/NvInferVersion.h", NVINFER_H)
    write(root / "usr/include/cudnn_version.h", CUDNN_H)
    write(root / "usr/local/cuda/version.json", json.dumps({"cuda": {"version": "12.2.140"}}))
    for i, (kind, milli) in enumerate([("cpu-thermal", "48500"), ("gpu-thermal", "46000"),
                                       ("cpu-thermal", "49000"), ("tj-thermal", "bad")]):
        write(root / f"sys/devices/virtual/thermal/thermal_zone{i}/type", kind + "\n")
        write(root / f"sys/devices/virtual/thermal/thermal_zone{i}/temp", milli + "\n")
    return root


def x86_tree(root: Path) -> Path:
    write(root / "proc/cpuinfo", "processor\t: 0\nmodel name\t: AMD EPYC  7763 64-Core Processor\n")
    return root


@pytest.fixture(autouse=True)
def _no_tensorrt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers, not whatever this dev box has installed, decide TensorRT's version here."""
    monkeypatch.setattr(env_mod, "_package_version", lambda name: None)

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)


def jetson_env(root: Path, nvp: str | None = NVP_MAXN, clocks: str | None = CLOCKS_LOCKED
               ) -> dict:
    run = runner({"nvpmodel": nvp, "jetson_clocks": clocks})
    return capture(jetson_tree(root), run, tools=lambda: dict(TOOLS))


def test_nvpmodel_and_clock_parsing_is_defensive() -> None:
    assert parse_nvpmodel(NVP_MAXN) == {"mode": "MAXN", "id": 0}
    assert parse_nvpmodel(NVP_15W) == {"mode": "15W", "id": 2}
    assert parse_nvpmodel("") is None and parse_nvpmodel("???") == {"mode": None, "id": None}
    locked = parse_jetson_clocks(CLOCKS_LOCKED)
    assert locked == {"gpu_min_max": [1300500000, 1300500000], "cpus_online": 2, "locked": True}
    assert parse_jetson_clocks(CLOCKS_FREE)["locked"] is False
    assert parse_jetson_clocks("Error: permission denied")["locked"] is None


def test_jetson_in_max_performance(tmp_path: Path) -> None:
    env = jetson_env(tmp_path)
    jetson = env["jetson"]
    assert jetson["l4t"] == "36.3.0" and jetson["nvpmodel"]["mode"] == "MAXN"
    assert jetson["board"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert jetson["max_performance"] is True and env["warnings"] == []
    assert env["host"]["cpu_model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert env["libraries"]["tensorrt"] == "10.3.0"
    assert env["libraries"]["cudnn"] == "9.3.0" and env["libraries"]["cuda"] == "12.2.140"
    assert env["gpus"] is None  # no nvidia-smi on this board
    assert env["fingerprint"]["l4t"] == "36.3.0" and env["fingerprint"]["nvpmodel"] == "MAXN"
    assert env["fingerprint_id"] == fingerprint_id(env)
    json.dumps(env)  # JSON-able as captured


@pytest.mark.parametrize(("nvp", "clocks"), [(NVP_15W, CLOCKS_LOCKED), (NVP_MAXN, CLOCKS_FREE)])
def test_jetson_not_in_max_performance_warns(tmp_path: Path, nvp: str, clocks: str) -> None:
    env = jetson_env(tmp_path, nvp, clocks)
    assert env["jetson"]["max_performance"] is False
    assert env["warnings"] == [MAX_PERFORMANCE_HINT]
    assert "sudo nvpmodel -m 0 && sudo jetson_clocks" in env["warnings"][0]


def test_jetson_unknown_power_state_warns_without_failing(tmp_path: Path) -> None:
    env = jetson_env(tmp_path, nvp=None, clocks=None)
    assert env["jetson"]["max_performance"] is None
    assert env["jetson"]["nvpmodel"] is None
    assert len(env["warnings"]) == 1 and "could not tell" in env["warnings"][0]


def test_gpu_box(tmp_path: Path) -> None:
    run = runner({"nvidia-smi": SMI_A100 + SMI_A100.replace("34\n", "[N/A]\n")})
    env = capture(x86_tree(tmp_path), run, tools=lambda: dict(TOOLS))
    assert env["jetson"] is None and env["warnings"] == []
    assert env["host"]["cpu_model"] == "AMD EPYC 7763 64-Core Processor"
    assert env["gpus"][0] == {"name": "NVIDIA A100-SXM4-80GB", "driver": "535.104.05",
                              "sm_clock_mhz": 1410.0, "max_sm_clock_mhz": 1410.0,
                              "temperature_c": 34.0}
    assert env["gpus"][1]["temperature_c"] is None
    assert env["fingerprint"]["gpu_name"] == "NVIDIA A100-SXM4-80GB"
    smi = next(c for c in run.calls if c[0] == "nvidia-smi")
    assert smi[1] == f"--query-gpu={env_mod.GPU_QUERY}" and "--format=csv,noheader" in smi


def test_no_gpu_gives_none_fields(tmp_path: Path) -> None:
    env = capture(x86_tree(tmp_path), runner({}), tools=lambda: dict(TOOLS))
    assert env["gpus"] is None and env["jetson"] is None
    assert env["libraries"]["cuda"] is None and env["libraries"]["tensorrt"] is None
    fp = env["fingerprint"]
    assert fp["gpu_name"] is None and fp["gpu_driver"] is None and fp["l4t"] is None
    assert fp["onnxruntime"] == "1.18.0" and fp["logical_cores"] == env["host"]["logical_cores"]


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    tools = lambda: dict(TOOLS)  # noqa: E731
    a = capture(x86_tree(tmp_path), runner({"nvidia-smi": SMI_A100}), tools=tools)
    again = capture(tmp_path, runner({"nvidia-smi": SMI_A100.replace("34\n", "71\n")}),
                    tools=tools)
    assert fingerprint_id(a) == fingerprint_id(again)  # temperature and clocks are not identity
    assert len(fingerprint_id(a)) == 12
    h100 = capture(tmp_path, runner({"nvidia-smi": SMI_H100}), tools=tools)
    assert fingerprint_id(h100) != fingerprint_id(a)
    newer_trt = json.loads(json.dumps(a))
    newer_trt["libraries"]["tensorrt"] = "10.3.0"
    assert device_fingerprint(newer_trt)["tensorrt"] == "10.3.0"
    assert fingerprint_id(newer_trt) != fingerprint_id(a)
    trt_via_tools = json.loads(json.dumps(a))
    trt_via_tools["tools"]["tensorrt"] = "8.6.1"
    assert fingerprint_id(trt_via_tools) != fingerprint_id(a)


def test_fingerprint_of_a_legacy_environment() -> None:
    legacy = {"python": "3.11.7", "onnxruntime": "1.32.0", "tensorrt": None}
    fp = device_fingerprint(legacy)
    assert fp["onnxruntime"] == "1.32.0" and fp["cpu_model"] is None


def test_sample_temperatures(tmp_path: Path) -> None:
    jetson_tree(tmp_path)
    temps = sample_temperatures(tmp_path, runner({}))
    assert temps == {"cpu-thermal": 48.5, "gpu-thermal": 46.0, "cpu-thermal.2": 49.0}
    temps = sample_temperatures(tmp_path / "nowhere", runner({"nvidia-smi": SMI_H100}))
    assert temps == {"gpu0": 41.0}


def test_real_capture_is_cheap_and_torch_free() -> None:
    """The real probes on this machine: JSON-able, and no torch import (device machines)."""
    had_torch = "torch" in sys.modules
    env = capture()
    json.dumps(env)
    assert set(env["fingerprint"]) == set(env_mod.FINGERPRINT_KEYS)
    if not had_torch:
        assert "torch" not in sys.modules
