"""The bookkeeping of ``bench/gpu_check.sh``: the machine's facts before the parts run, and
``summary.json`` / ``summary.md`` after them (the layout is documented in the script's header).

Two subcommands:

``env FILE``
    Writes the machine's facts to FILE (JSON): Python, torch and its CUDA, the GPU (name,
    compute capability, bf16 support, driver via nvidia-smi), TensorRT (absent on the H200), and
    which of the modules xpdeploy and its tests import are missing (the H200 image has no
    pydantic and no onnxsim; they must travel as wheels). Prints ``cuda`` or ``cpu`` on its last
    line: the device the check runs its parts on.

``write OUT_DIR WORK_DIR [--started ISO] [--wall S] [--smoke 0|1] [--python CMD]``
    Reads ``WORK_DIR/parts.tsv`` (one line per part, written by the script: name, state, exit
    code, wall seconds, timeout seconds, log file), the environment file and each part's own
    output (junit XML, the quickstart's run folder, latency JSON, the torchrun log), decides
    each part's status and writes ``OUT_DIR/summary.json`` and ``OUT_DIR/summary.md``. Prints
    ``status: pass`` or ``status: fail`` on its last line (the script's exit code follows it).

Standard library only in ``write`` (json, xml), so the summary is written even where torch or
xpdeploy's dependencies are broken; ``env`` imports torch when it can and says so when it cannot.
Units: seconds (``wall_s``, ``timeout_s``, stage times), milliseconds (latency), percent (top-1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

SCHEMA = 1
PARTS = ("pytest", "quickstart", "latency", "nccl")
#: Top-level modules xpdeploy (and its tests) import, by import name; the H200 image lacks some.
MODULES = ("torch", "torchvision", "timm", "numpy", "onnx", "onnxruntime", "onnxsim", "pydantic",
           "click", "yaml", "sklearn", "scipy", "safetensors", "matplotlib", "rich", "PIL",
           "pytest")
PROBE_PREFIX = "gpu_nccl probe: "  # bench/gpu_nccl.py's line (not imported: that imports torch)
DIST_LINE = re.compile(r"^distributed: (\d+) processes, backend (\w+)", re.MULTILINE)
#: The first line of a log that says what went wrong: xpdeploy's one-line errors, a Python
#: exception's last line, pytest's "E   SomeError: ...".
ERROR_LINE = re.compile(r"^(?:E\s+)?(?:error: .+|[A-Za-z_.]*(?:Error|Exception): .+)$",
                        re.MULTILINE)


# -- env ----------------------------------------------------------------------------------------


def capture_env() -> dict[str, Any]:
    """The facts summary.json reports about the machine; never raises (a fact it cannot read is
    None, with a note)."""
    env: dict[str, Any] = {"python": platform.python_version(), "python_executable": sys.executable,
                           "missing_modules": [m for m in MODULES
                                               if importlib.util.find_spec(m) is None],
                           "notes": [], "device": "cpu", "device_name": None, "torch": None,
                           "cuda": None, "capability": None, "bf16_supported": None,
                           "driver": None, "tensorrt": None}
    env["tensorrt"] = _tensorrt_version()
    try:
        import torch
    except Exception as e:  # ImportError, or a broken CUDA build that fails on import
        env["notes"].append(f"torch does not import: {type(e).__name__}: {e}")
        return env
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        env["device"] = "cuda"
        env["device_name"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        env["gpus"] = torch.cuda.device_count()
    facts = _host_facts(env["device"] == "cuda")
    if "note" in facts:
        env["notes"].append(facts.pop("note"))
    env.update(facts)
    return env


def _tensorrt_version() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as e:
        return f"present but does not import ({type(e).__name__})"


def _host_facts(cuda: bool) -> dict[str, Any]:
    """CPU model and GPU driver from xpdeploy.environment's probes, which need pydantic through
    their imports; without it the CPU falls back to the machine type and the driver is None."""
    try:
        from xpdeploy.environment import cpu_model, gpu_facts
    except ImportError as e:
        return {"cpu": platform.machine(),
                "note": f"xpdeploy.environment does not import ({e}): no driver version"}
    facts: dict[str, Any] = {"cpu": cpu_model() or platform.machine()}
    gpus = gpu_facts() if cuda else None
    if gpus:
        facts["driver"] = gpus[0].get("driver")
    return facts


# -- parts --------------------------------------------------------------------------------------


def read_parts(work: Path) -> dict[str, dict[str, Any]]:
    """``parts.tsv`` as {name: {state, exit_code, wall_s, timeout_s, log}}; missing lines are
    parts that never got to run (the script died first)."""
    parts: dict[str, dict[str, Any]] = {}
    tsv = work / "parts.tsv"
    lines = tsv.read_text().splitlines() if tsv.is_file() else []
    for line in lines:
        fields = line.split("\t")
        if len(fields) != 6:
            continue
        name, state, rc, wall, limit, log = fields
        parts[name] = {"state": state, "exit_code": int(rc), "wall_s": float(wall),
                       "timeout_s": int(limit), "log": log or None}
    return parts


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_numbers(xml_file: Path) -> dict[str, Any] | None:
    """Counts from pytest's junit XML (tests, passed, failed, errors, skipped) and the distinct
    skip reasons; None when there is no readable file."""
    try:
        root = ET.parse(xml_file).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    reasons = sorted({(el.get("message") or "").strip() for el in root.iter("skipped")} - {""})
    failed = [f"{case.get('classname') or ''}::{case.get('name')}".lstrip(":")
              for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": counts["tests"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"],
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "skip_reasons": reasons[:10], "failed_tests": failed[:10]}


def judge_pytest(part: dict[str, Any], out: Path, work: Path, device: str) -> None:
    """pass: gpu tests ran and passed; skip: every selected test skipped (a CPU machine, or a GPU
    machine where they all need TensorRT or onnxruntime-gpu); fail: anything else."""
    numbers = pytest_numbers(out / "pytest.xml")
    part["numbers"] = numbers or {}
    if numbers is not None:
        part["files"].append("pytest.xml")
    rc = part["exit_code"]
    if numbers is None:
        part["status"] = "skip" if rc == 5 else "fail"
        part["note"] = "no tests selected" if rc == 5 else "pytest wrote no junit XML"
    elif rc == 0 and numbers["passed"] > 0:
        part["status"] = "pass"
    elif rc in (0, 5) and numbers["passed"] == 0:
        part["status"] = "skip"
        part["note"] = (f"every gpu-marked test skipped ({numbers['skipped']})"
                        + ("" if device == "cuda" else ": no GPU here"))
    else:
        part["status"] = "fail"


def stage_times(run: Path) -> dict[str, float]:
    """Seconds per finished stage, from each stage folder's manifest.json (``duration_s``)."""
    times = {}
    for manifest in sorted(run.glob("*/manifest.json")):
        m = _load_json(manifest)
        if isinstance(m, dict) and "stage" in m and "duration_s" in m:
            times[str(m["stage"])] = round(float(m["duration_s"]), 2)
    return times


def _recipe(run: Path, folder: str) -> dict[str, Any] | None:
    r = _load_json(run / folder / "recipe.json")
    if not isinstance(r, dict):
        return None
    return {k: r.get(k) for k in ("device", "amp", "processes", "epochs", "global_batch")}


def judge_quickstart(part: dict[str, Any], out: Path, work: Path, device: str) -> None:
    """pass: the run passed (exit 0, report status passed). Numbers: top-1 of the original, the
    pruned model one-shot and after fine-tuning (%), GMACs, stage seconds, the device and
    autocast dtype train and finetune used, the pruned candidates' speedups (onnxruntime and
    torch on the CPU, as verify measures them), and the overrides the check passed."""
    run = work / "quickstart"
    args = work / "quickstart.args"
    numbers: dict[str, Any] = {
        "run_dir": str(run),
        "overrides": [a for a in args.read_text().splitlines() if a != "--set"]
        if args.is_file() else [],
        "stage_s": stage_times(run),
        "train": _recipe(run, "02_train"),
        "finetune": _recipe(run, "05_finetune"),
    }
    report = _load_json(run / "report.json")
    if isinstance(report, dict):
        pruning = report.get("pruning") or {}
        candidates = report.get("candidates") or []
        finetuned = next((c for c in candidates if c.get("name") == "pruned (torch)"), {})
        numbers.update({
            "report_status": report.get("status"),
            "top1_original": (report.get("original") or {}).get("top1"),
            "top1_one_shot": pruning.get("one_shot_top1"),
            "top1_finetuned": finetuned.get("top1"),
            "gmacs_original": pruning.get("gmacs_before"),
            "gmacs_pruned": pruning.get("gmacs_after"),
            "speedups_cpu": {c.get("name"): c.get("speedup") for c in candidates
                             if str(c.get("name", "")).startswith("pruned")},
        })
    part["numbers"] = numbers
    rc = part["exit_code"]
    if rc == 0 and numbers.get("report_status") == "passed":
        part["status"] = "pass"
    else:
        part["status"] = "fail"
        if rc == 3:
            part["note"] = f"a verification gate failed (exit 3): see {run / 'report.md'}"
    if device != "cuda":
        part["note"] = _join(part.get("note"), "CPU fallback: fewer epochs and no accuracy "
                             "floors (see overrides), so top-1 is not the published figure")


def judge_latency(part: dict[str, Any], out: Path, work: Path, device: str) -> None:
    """pass: bench/gpu_latency.py exited 0 and wrote rows. Numbers: per (model, dtype, batch) the
    p10/p50/p90 ms of both models and the speedup (median over rounds, with its spread)."""
    data = _load_json(out / "latency.json")
    rows = data.get("rows", []) if isinstance(data, dict) else []
    if isinstance(data, dict):
        part["files"].append("latency.json")
        part["numbers"] = {
            "device_name": data.get("device_name"),
            "settings": data.get("settings"),
            "models": data.get("models"),
            "rows": [{"model": r["model"], "dtype": r["dtype"], "batch": r["batch"],
                      **{f"original_{k}_ms": round(r["original"][k], 4)
                         for k in ("p10", "p50", "p90")},
                      **{f"pruned_{k}_ms": round(r["pruned"][k], 4)
                         for k in ("p10", "p50", "p90")},
                      "speedup": round(r["speedup"], 4),
                      "speedup_spread": round(r["speedup_spread"], 4)} for r in rows],
        }
    part["status"] = "pass" if part["exit_code"] == 0 and rows else "fail"
    if device != "cuda":
        part["note"] = _join(part.get("note"), "CPU fallback: perf_counter instead of CUDA "
                             "events, smaller batches and fewer calls")


def judge_nccl(part: dict[str, Any], out: Path, work: Path, device: str) -> None:
    """pass: the pipeline under torchrun (1 process) passed and the backend probe's collectives
    gave the expected results. Numbers: the pipeline's exit code, the backend it reported
    (a group of one under torchrun; "none" if it joined none), the probe's backend, device,
    NCCL version and timings."""
    log = (out / part["log"]).read_text(errors="replace") if part.get("log") and \
        (out / part["log"]).is_file() else ""
    pipeline_rc = _marker(log, "== xpdeploy run exit code: ")
    probe_rc = _marker(log, "== probe exit code: ")
    dist = DIST_LINE.search(log)
    probe = None
    for line in log.splitlines():
        if line.startswith(PROBE_PREFIX):
            try:
                probe = json.loads(line[len(PROBE_PREFIX):])
            except ValueError:
                probe = None
    train = _recipe(work / "nccl" / "run", "02_train")
    part["numbers"] = {
        "pipeline_exit": pipeline_rc,
        "pipeline_passed": any(line.startswith("PASSED | ") for line in log.splitlines()),
        "pipeline_backend": dist.group(2) if dist else "none",
        "pipeline_processes": int(dist.group(1)) if dist else 1,
        "train": train,
        "probe_exit": probe_rc,
        "probe": probe,
    }
    ok = pipeline_rc == 0 and probe_rc == 0 and bool(probe and probe.get("ok"))
    part["status"] = "pass" if part["exit_code"] == 0 and ok else "fail"
    backend = probe.get("backend") if probe else None
    notes = []
    if not dist and pipeline_rc == 0:
        notes.append("the pipeline reported no process group, so its collective stages ran "
                     "without a collective; the probe exercised "
                     f"{backend or 'the backend'} directly")
    if device != "cuda":
        notes.append("CPU fallback: gloo in place of NCCL")
    part["note"] = _join(part.get("note"), "; ".join(notes) or None)


def first_error(log: Path) -> str | None:
    """The first error line of ``log`` (at most 200 characters), None when there is none."""
    try:
        match = ERROR_LINE.search(log.read_text(errors="replace"))
    except OSError:
        return None
    return match.group(0).strip()[:200] if match else None


def _marker(log: str, prefix: str) -> int | None:
    for line in log.splitlines():
        if line.startswith(prefix):
            try:
                return int(line[len(prefix):].strip())
            except ValueError:
                return None
    return None


def _join(a: str | None, b: str | None) -> str | None:
    return "; ".join(x for x in (a, b) if x) or None


JUDGES = {"pytest": judge_pytest, "quickstart": judge_quickstart, "latency": judge_latency,
          "nccl": judge_nccl}


def build_summary(out: Path, work: Path, started: str | None, wall: float | None, smoke: bool,
                  python: str | None) -> dict[str, Any]:
    """summary.json's content (its keys are listed in bench/gpu_check.sh's header)."""
    env = _load_json(work / "env.json")
    notes: list[str] = []
    if not isinstance(env, dict):
        env = {}
        notes.append(f"the environment probe failed: see {work / 'setup.log'}")
    notes += env.get("notes", [])
    device = env.get("device") or "cpu"
    recorded = read_parts(work)
    parts: dict[str, dict[str, Any]] = {}
    for name in PARTS:
        rec = recorded.get(name)
        if rec is None:
            parts[name] = {"status": "fail", "wall_s": 0.0, "timeout_s": None, "exit_code": None,
                           "log": None, "files": [], "numbers": {},
                           "note": "never ran (the check stopped before it)"}
            continue
        part = {"status": "fail", "wall_s": rec["wall_s"], "timeout_s": rec["timeout_s"],
                "exit_code": rec["exit_code"], "log": rec["log"],
                "files": [rec["log"]] if rec["log"] else [], "numbers": {}, "note": None}
        if rec["state"] == "skip":
            part.update(status="skip", note="not selected (XPDEPLOY_GPU_CHECK_PARTS)", files=[])
        else:
            JUDGES[name](part, out, work, device)
            if rec["state"] == "injected":
                part.update(status="fail", note="failure injected (XPDEPLOY_GPU_CHECK_FAIL)")
            elif rec["exit_code"] in (124, 137):
                part["status"] = "fail"
                part["note"] = _join(f"timed out after {rec['timeout_s']} s", part["note"])
        part["files"] = [f for f in part["files"] if (out / f).is_file()]
        if part["status"] == "fail" and rec["state"] == "ran" and rec["log"]:
            part["note"] = _join(part["note"], first_error(out / rec["log"]))
        parts[name] = part
    failed = [n for n, p in parts.items() if p["status"] == "fail"]
    if device != "cuda":
        notes.append("no CUDA GPU: every part ran its CPU fallback (smaller sizes)")
    if env.get("missing_modules"):
        notes.append("missing Python modules: " + ", ".join(env["missing_modules"])
                     + " (bring them as wheels: XPDEPLOY_GPU_CHECK_WHEELS)")
    if device == "cuda" and not env.get("tensorrt"):
        notes.append("no TensorRT here: no engine is built (build_engine defers to a bundle)")
    return {
        "schema": SCHEMA,
        "kind": "xpdeploy-gpu-check",
        "status": "fail" if failed else "pass",
        "exit_code": 1 if failed else 0,
        "started": started,
        "wall_s": wall,
        "device": device,
        "device_name": env.get("device_name") if device == "cuda" else env.get("cpu"),
        "capability": env.get("capability"),
        "bf16_supported": env.get("bf16_supported"),
        "driver": env.get("driver"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "tensorrt": env.get("tensorrt"),
        "python": env.get("python"),
        "python_cmd": python,
        "fallback": device != "cuda",
        "smoke": smoke,
        "missing_modules": env.get("missing_modules", []),
        "work_dir": str(work),
        "notes": notes,
        "parts": parts,
    }


def _headline(name: str, part: dict[str, Any]) -> str:
    """One line of key numbers for summary.md's table."""
    n = part.get("numbers") or {}
    if name == "pytest" and n:
        return (f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, "
                f"{n['skipped']} skipped")
    if name == "quickstart" and n.get("top1_original") is not None:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}%"
        train = n.get("train") or {}
        return (f"top-1 {pct(n['top1_original'])} original, {pct(n.get('top1_one_shot'))} "
                f"one-shot, {pct(n.get('top1_finetuned'))} fine-tuned; train on "
                f"{train.get('device')} amp {train.get('amp')}")
    if name == "latency" and n.get("rows"):
        return "; ".join(f"{r['model']} {r['dtype']} b{r['batch']} {r['speedup']:.2f}x"
                         for r in n["rows"])
    if name == "nccl" and n:
        probe = n.get("probe") or {}
        return (f"pipeline exit {n.get('pipeline_exit')} (group: {n.get('pipeline_backend')}); "
                f"probe {probe.get('backend')} {'ok' if probe.get('ok') else 'FAILED'}")
    return ""


def render_markdown(s: dict[str, Any]) -> str:
    """summary.md: the device, one table row per part, the latency table, and the notes."""
    lines = [f"# xpdeploy GPU check: {s['status'].upper()}", "",
             f"- device: {s['device']} ({s['device_name'] or 'unknown'})"
             + (" - CPU fallback" if s["fallback"] else ""),
             f"- torch {s['torch']} (CUDA {s['cuda']}), driver {s['driver'] or '-'}, "
             f"TensorRT {s['tensorrt'] or 'none'}, Python {s['python']}",
             f"- started {s['started']}, wall {s['wall_s']} s"
             + (", smoke mode" if s["smoke"] else ""),
             f"- run folders: {s['work_dir']}", "",
             "| part | status | wall s | key numbers | log |", "|---|---|---:|---|---|"]
    for name, p in s["parts"].items():
        lines.append(f"| {name} | {p['status']} | {p['wall_s']} | "
                     f"{_headline(name, p).replace('|', '/')} | {p['log'] or '-'} |")
    rows = (s["parts"]["latency"].get("numbers") or {}).get("rows") or []
    if rows:
        lines += ["", "Latency, ms per batch (p10 / p50 / p90), original vs pruned, interleaved:",
                  "", "| model | dtype | batch | original | pruned | speedup |",
                  "|---|---|---:|---|---|---:|"]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['batch']} | "
                f"{r['original_p10_ms']:.3f} / {r['original_p50_ms']:.3f} / "
                f"{r['original_p90_ms']:.3f} | {r['pruned_p10_ms']:.3f} / "
                f"{r['pruned_p50_ms']:.3f} / {r['pruned_p90_ms']:.3f} | "
                f"{r['speedup']:.2f}x +-{r['speedup_spread'] * 100:.0f}% |")
    qs = s["parts"]["quickstart"].get("numbers") or {}
    if qs.get("stage_s"):
        lines += ["", "Quickstart stage seconds: " + ", ".join(
            f"{k} {v:.1f}" for k, v in qs["stage_s"].items())]
    notes = s["notes"] + [f"{n}: {p['note']}" for n, p in s["parts"].items() if p.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="write the machine's facts (JSON); print cuda or cpu")
    e.add_argument("file", type=Path)
    w = sub.add_parser("write", help="write OUT_DIR/summary.json and summary.md")
    w.add_argument("out", type=Path)
    w.add_argument("work", type=Path)
    w.add_argument("--started")
    w.add_argument("--wall", type=float, help="seconds the parts took, setup included")
    w.add_argument("--smoke", default="0")
    w.add_argument("--python", help="the python command the parts ran with")
    args = ap.parse_args(argv)
    if args.command == "env":
        env = capture_env()
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
        print(env["device"])
        return 0
    summary = build_summary(args.out, args.work, args.started, args.wall, args.smoke == "1",
                            args.python)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(render_markdown(summary))
    print(f"status: {summary['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
