"""Where a report was measured: host, tools, GPU, accelerator libraries and Jetson power state.

Latency numbers mean nothing without the machine they were taken on: a Jetson in its 15 W mode or
with unlocked clocks is several times slower than the same board in MAXN with ``jetson_clocks``.
:func:`capture` records those facts in every report, :func:`device_fingerprint` picks the subset
that must match for two reports' latencies to be comparable (``xpdeploy compare`` refuses
otherwise), and :func:`sample_temperatures` reads the thermal zones so benchmarks can note
throttling.

Standard library only (plus :func:`xpdeploy.runfolder.tool_versions` and the TensorRT, L4T and
header probes of :mod:`xpdeploy.backends.trt_versions`, which the engine cache key uses too; neither
imports torch or TensorRT), so it runs on a bare device machine. Every probe is a small function
taking the file-system root and a command runner as arguments; tests pass a fake tree and a fake
runner. A probe that fails returns None (or an empty result): capturing the environment never
fails a run.

Units: clocks in MHz, temperatures in degrees Celsius, ``logical_cores`` a count.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xpdeploy.backends.trt_versions import header_version, l4t_release, tensorrt_version
from xpdeploy.fileio import read_text_or_none
from xpdeploy.runfolder import tool_versions

Runner = Callable[[Sequence[str]], str | None]
"""Runs a command (argv) and returns its stdout, or None when it is missing, fails or times out."""

COMMAND_TIMEOUT_S = 5.0
MAX_PERFORMANCE_HINT = (
    "the board is not in its max-performance mode: run sudo nvpmodel -m 0 && sudo jetson_clocks"
)
GPU_QUERY = "name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu"
TEGRA_RELEASE = "etc/nv_tegra_release"
THERMAL_GLOB = "sys/devices/virtual/thermal/thermal_zone*"
# Python distributions whose versions shape GPU latency (metadata only: nothing is imported).
ACCELERATOR_PACKAGES = ("tensorrt", "cuda-python", "pycuda", "onnxruntime-gpu")
FINGERPRINT_KEYS = (
    "cpu_model",
    "logical_cores",
    "gpu_name",
    "gpu_driver",
    "tensorrt",
    "l4t",
    "onnxruntime",
    "nvpmodel",
)


def run_command(argv: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str | None:
    """stdout of ``argv``; None when the program is not on PATH, exits non-zero or hangs.

    The timeout (seconds) matters: ``nvidia-smi`` can block for many seconds on a wedged driver.
    """
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


# -- host ---------------------------------------------------------------------------------------


def cpu_model(root: Path = Path("/")) -> str | None:
    """The CPU's marketing name: x86 ``model name`` in /proc/cpuinfo, else the board's device-tree
    model (ARM boards such as Jetson have no model name there), else ``platform.processor()``."""
    info = read_text_or_none(root / "proc/cpuinfo") or ""
    match = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE | re.IGNORECASE)
    if match:
        return " ".join(match.group(1).split())
    board = read_text_or_none(root / "proc/device-tree/model")
    if board:
        return board
    return platform.processor() or None


def host_facts(root: Path = Path("/"), cpu_count: Callable[[], int | None] = os.cpu_count
               ) -> dict[str, Any]:
    """Platform string, architecture, CPU model and the number of logical cores."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(root),
        "logical_cores": cpu_count(),
    }


# -- NVIDIA GPU ---------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    """First number in ``text`` ("1410 MHz" -> 1410.0); None for "[N/A]" and the like."""
    match = re.search(r"-?\d+(?:\.\d+)?", text)
    return float(match.group()) if match else None


def gpu_facts(run: Runner = run_command) -> list[dict[str, Any]] | None:
    """One dict per GPU as ``nvidia-smi`` lists them (name, driver, SM clock and its maximum in MHz,
    temperature in C); None when there is no nvidia-smi or it fails."""
    out = run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader"])
    if not out:
        return None
    gpus = []
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5 or not fields[0]:
            continue
        name, driver, sm, max_sm, temp = fields
        gpus.append({
            "name": name,
            "driver": driver if _number(driver) is not None else None,
            "sm_clock_mhz": _number(sm),
            "max_sm_clock_mhz": _number(max_sm),
            "temperature_c": _number(temp),
        })
    return gpus or None


# -- CUDA, cuDNN, TensorRT ----------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def cuda_version(root: Path = Path("/")) -> str | None:
    """CUDA toolkit version from /usr/local/cuda/version.json (11.1+) or version.txt (older)."""
    text = read_text_or_none(root / "usr/local/cuda/version.json")
    if text:
        try:
            return str(json.loads(text)["cuda"]["version"])
        except (ValueError, KeyError, TypeError):
            pass
    text = read_text_or_none(root / "usr/local/cuda/version.txt") or ""
    match = re.search(r"CUDA Version\s+([\d.]+)", text)
    return match.group(1) if match else None


def accelerator_libraries(root: Path = Path("/")) -> dict[str, str | None]:
    """CUDA, cuDNN and TensorRT versions plus GPU Python packages; None where absent."""
    libs: dict[str, str | None] = {
        "cuda": cuda_version(root),
        "cudnn": header_version(root, "cudnn_version.h",
                                ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL")),
        "tensorrt": tensorrt_version(root),
    }
    for name in ACCELERATOR_PACKAGES:
        if name != "tensorrt":
            libs[name] = _package_version(name)
    return libs


# -- Jetson -------------------------------------------------------------------------------------


def parse_nvpmodel(text: str | None) -> dict[str, Any] | None:
    """``nvpmodel -q`` -> {"mode": "MAXN", "id": 0}; either may be None. None without output.

    The output is "NV Power Mode: <name>" then the mode id on its own line, sometimes after
    "NVPM WARN" lines. Whether a mode is the fastest is read from the name (MAXN, MAXN_SUPER):
    the id of the MAXN mode differs between boards.
    """
    if not text:
        return None
    name = re.search(r"NV Power Mode\s*:\s*(\S+)", text)
    ident = re.search(r"^\s*(\d+)\s*$", text, re.MULTILINE)
    return {
        "mode": name.group(1) if name else None,
        "id": int(ident.group(1)) if ident else None,
    }


def _freqs(line: str) -> tuple[int, int] | None:
    """(MinFreq, MaxFreq) from a ``jetson_clocks --show`` line, in the tool's units (kHz/Hz)."""
    low = re.search(r"MinFreq=(\d+)", line)
    high = re.search(r"MaxFreq=(\d+)", line)
    return (int(low.group(1)), int(high.group(1))) if low and high else None


def parse_jetson_clocks(text: str | None) -> dict[str, Any] | None:
    """``jetson_clocks --show`` -> GPU and CPU frequency ranges and ``locked``.

    jetson_clocks pins each clock's minimum to its maximum, so ``locked`` is True when the GPU and
    every online CPU show MinFreq == MaxFreq, False when one does not, None when no line parses.
    """
    if not text:
        return None
    gpu, cpus = None, []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("GPU ") or stripped.startswith("GPU:"):
            gpu = _freqs(stripped)
        elif re.match(r"cpu\d+:", stripped) and "Online=1" in stripped:
            freq = _freqs(stripped)
            if freq:
                cpus.append(freq)
    ranges = ([gpu] if gpu else []) + cpus
    locked = all(low == high for low, high in ranges) if ranges else None
    return {
        "gpu_min_max": list(gpu) if gpu else None,
        "cpus_online": len(cpus),
        "locked": locked,
    }


def jetson_facts(root: Path = Path("/"), run: Runner = run_command) -> dict[str, Any] | None:
    """L4T release, board, power mode, clock lock and the ``max_performance`` verdict on a Jetson
    (detected by /etc/nv_tegra_release); None elsewhere. Raw outputs are kept for the reader."""
    if not (root / TEGRA_RELEASE).is_file():
        return None
    nvp_raw = run(["nvpmodel", "-q"])
    clocks_raw = run(["jetson_clocks", "--show"])
    nvpmodel = parse_nvpmodel(nvp_raw)
    clocks = parse_jetson_clocks(clocks_raw)
    return {
        "l4t": l4t_release(root / TEGRA_RELEASE),
        "board": read_text_or_none(root / "proc/device-tree/model"),
        "nvpmodel": nvpmodel,
        "jetson_clocks": clocks,
        "max_performance": max_performance(nvpmodel, clocks),
        "nvpmodel_raw": nvp_raw,
        "jetson_clocks_raw": clocks_raw,
    }


def max_performance(nvpmodel: Mapping[str, Any] | None, clocks: Mapping[str, Any] | None
                    ) -> bool | None:
    """True for a MAXN power mode with locked clocks, False if either is known to be off, None
    when it cannot be told (e.g. ``jetson_clocks --show`` needs root on some releases)."""
    mode = (nvpmodel or {}).get("mode")
    is_maxn = None if mode is None else str(mode).upper().startswith("MAXN")
    locked = (clocks or {}).get("locked")
    if is_maxn is False or locked is False:
        return False
    if is_maxn and locked:
        return True
    return None


def environment_warnings(env: Mapping[str, Any]) -> list[str]:
    """Things that make this machine's latencies unrepresentative, one sentence each."""
    jetson = env.get("jetson")
    if not jetson:
        return []
    verdict = jetson.get("max_performance")
    if verdict is False:
        return [MAX_PERFORMANCE_HINT]
    if verdict is None:
        return ["could not tell whether the board is in its max-performance mode (nvpmodel -q and "
                "jetson_clocks --show need to run; jetson_clocks may need sudo)"]
    return []


# -- temperatures -------------------------------------------------------------------------------


def thermal_zones(root: Path = Path("/")) -> dict[str, float]:
    """{zone type: C} from the kernel thermal zones (millidegrees there); a repeated type gets
    its zone number appended so no reading is lost."""
    out: dict[str, float] = {}
    for zone in sorted(root.glob(THERMAL_GLOB)):
        raw = read_text_or_none(zone / "temp")
        if raw is None or not raw.lstrip("-").isdigit():
            continue
        name = read_text_or_none(zone / "type") or zone.name
        if name in out:
            name = f"{name}.{zone.name.removeprefix('thermal_zone')}"
        out[name] = int(raw) / 1000.0
    return out


def gpu_temperatures(run: Runner = run_command) -> dict[str, float]:
    """{"gpu<i>": C} from nvidia-smi; empty without it."""
    gpus = gpu_facts(run) or []
    return {f"gpu{i}": g["temperature_c"] for i, g in enumerate(gpus)
            if g["temperature_c"] is not None}


def sample_temperatures(root: Path = Path("/"), run: Runner = run_command) -> dict[str, float]:
    """One reading of every temperature we can see, {zone: C}: Jetson/Linux thermal zones and
    NVIDIA GPUs. Cheap enough to call between benchmark iterations to spot thermal throttling."""
    return {**thermal_zones(root), **gpu_temperatures(run)}


# -- the whole picture ----------------------------------------------------------------------------


def capture(root: Path = Path("/"), run: Runner = run_command,
            tools: Callable[[], dict[str, str | None]] = tool_versions) -> dict[str, Any]:
    """Everything above as one JSON-able dict, plus ``warnings``, ``fingerprint`` (see
    :func:`device_fingerprint`) and its short ``fingerprint_id``.

    Keys: host, tools (runfolder.tool_versions), gpus, libraries, jetson, temperatures_c, warnings,
    fingerprint, fingerprint_id.
    """
    env: dict[str, Any] = {
        "host": host_facts(root),
        "tools": tools(),
        "gpus": gpu_facts(run),
        "libraries": accelerator_libraries(root),
        "jetson": jetson_facts(root, run),
        "temperatures_c": thermal_zones(root),
    }
    env["warnings"] = environment_warnings(env)
    env["fingerprint"] = device_fingerprint(env)
    env["fingerprint_id"] = fingerprint_id(env)
    return env


def is_legacy(env: Mapping[str, Any]) -> bool:
    """True for an environment written before :func:`capture`: a flat dict of tool versions."""
    return "tools" not in env and "host" not in env


def device_fingerprint(env: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for two latency measurements to be comparable (:data:`FINGERPRINT_KEYS`).

    CPU model and logical cores (CPU runners, and the host feeding a GPU), the first GPU's name and
    driver, TensorRT, the L4T release, onnxruntime and the Jetson power mode. An environment from
    an older report (flat tool versions) yields None for the facts it lacks.
    """
    tools = env.get("tools") if not is_legacy(env) else env
    tools = tools or {}
    host = env.get("host") or {}
    libs = env.get("libraries") or {}
    gpus = env.get("gpus") or []
    jetson = env.get("jetson") or {}
    first_gpu = gpus[0] if gpus else {}
    return {
        "cpu_model": host.get("cpu_model"),
        "logical_cores": host.get("logical_cores"),
        "gpu_name": first_gpu.get("name"),
        "gpu_driver": first_gpu.get("driver"),
        "tensorrt": libs.get("tensorrt") or tools.get("tensorrt"),
        "l4t": jetson.get("l4t"),
        "onnxruntime": tools.get("onnxruntime") or libs.get("onnxruntime-gpu"),
        "nvpmodel": (jetson.get("nvpmodel") or {}).get("mode"),
    }


def fingerprint_id(env: Mapping[str, Any]) -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of :func:`device_fingerprint`."""
    canonical = json.dumps(device_fingerprint(env), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
