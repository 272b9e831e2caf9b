"""GitHub workflows: valid YAML with the jobs, steps, artifacts and summaries they promise.

Only the structure is checked here (no GitHub runner); ``actionlint`` is the fuller check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOWS = Path(__file__).parent.parent / ".github" / "workflows"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("jobs"), dict)
    return data


def triggers(wf: dict[str, Any]) -> dict[str, Any]:
    """The ``on:`` mapping (YAML 1.1 reads the bare key ``on`` as True)."""
    on = wf.get("on", wf.get(True))
    return {on: None} if isinstance(on, str) else dict(on)


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["steps"])


def step_using(job: dict[str, Any], action: str, **with_: Any) -> dict[str, Any]:
    """The one step that uses ``action`` (a prefix such as actions/upload-artifact@) whose
    ``with`` includes ``with_``."""
    found = [
        s for s in steps(job)
        if str(s.get("uses", "")).startswith(action)
        and all((s.get("with") or {}).get(k) == v for k, v in with_.items())
    ]
    assert len(found) == 1, f"expected one step using {action} with {with_}, got {found}"
    return found[0]


def run_text(job: dict[str, Any]) -> str:
    return "\n".join(str(s.get("run", "")) for s in steps(job))


@pytest.mark.parametrize("name", ["ci.yml", "jetson.yml"])
def test_workflow_is_valid_yaml_with_named_steps(name: str) -> None:
    wf = load(name)
    assert wf["name"] and triggers(wf)
    for job in wf["jobs"].values():
        assert job["runs-on"] and job["timeout-minutes"] > 0
        for s in steps(job):
            assert ("uses" in s) != ("run" in s), s


def test_ci_runs_the_project_ci_script_and_publishes_the_quickstart_report() -> None:
    wf = load("ci.yml")
    assert {"push", "pull_request"} <= set(triggers(wf))
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] == 60
    assert step_using(job, "actions/setup-python@")["with"]["python-version"] == "3.11"
    cache = step_using(job, "actions/cache@")
    assert "hashFiles('pyproject.toml')" in cache["with"]["key"]
    assert "~/.cache/pip" in cache["with"]["path"]
    runs = [s for s in steps(job) if s.get("run", "").strip() == "bash .ci/run"]
    assert len(runs) == 1
    upload = step_using(job, "actions/upload-artifact@v4")
    assert upload["if"] == "always()"
    for f in ("report.json", "report.md", "latency.png"):
        assert f"runs/ci-quickstart/{f}" in upload["with"]["path"]
    summary = [s for s in steps(job) if "GITHUB_STEP_SUMMARY" in s.get("run", "")]
    assert len(summary) == 1 and summary[0]["if"] == "always()"
    assert "runs/ci-quickstart/report.md" in summary[0]["run"]
    order = steps(job)
    assert order.index(runs[0]) < order.index(upload) and order.index(runs[0]) < order.index(
        summary[0])


def test_jetson_workflow_host_bundle_then_device_stages_and_compare() -> None:
    wf = load("jetson.yml")
    on = triggers(wf)
    assert "workflow_dispatch" in on and on["push"]["branches"] == ["main"]
    host, jetson = wf["jobs"]["host"], wf["jobs"]["jetson"]

    assert host["runs-on"] == "ubuntu-latest"
    host_runs = run_text(host)
    assert "--until simplify" in host_runs and "pipelines/quickstart.yaml" in host_runs
    assert "xpdeploy bundle runs/ci-quickstart -o bundle.tar" in host_runs
    raw = (WORKFLOWS / "jetson.yml").read_text(encoding="utf-8")
    assert "issue 5" in raw  # the bundle step is marked as depending on the bundle command
    assert step_using(host, "actions/upload-artifact@v4", name="device-bundle")

    assert jetson["runs-on"] == ["self-hosted", "jetson"] and jetson["needs"] == "host"
    assert step_using(jetson, "actions/download-artifact@v4", name="device-bundle")
    device_runs = run_text(jetson)
    assert "docker build -f docker/jetson/Dockerfile" in device_runs
    assert "--runtime nvidia" in device_runs
    assert "xpdeploy run bundle.tar --stages build_engine,verify,report" in device_runs
    compare = next(s for s in steps(jetson) if "xpdeploy compare" in s.get("run", ""))
    assert "--max-regression 5%" in compare["run"]
    assert jetson["env"]["BASELINE"] == "benchmarks/baselines/jetson-orin.json"
    assert '[ ! -f "$BASELINE" ]' in compare["run"] and "exit 0" in compare["run"]  # skipped
    upload = step_using(jetson, "actions/upload-artifact@v4", name="jetson-report")
    assert upload["if"] == "always()" and "runs/jetson/report.md" in upload["with"]["path"]
    summary = [s for s in steps(jetson) if "GITHUB_STEP_SUMMARY" in s.get("run", "")]
    assert len(summary) == 1 and summary[0]["if"] == "always()"
    assert "report.md" in summary[0]["run"]
