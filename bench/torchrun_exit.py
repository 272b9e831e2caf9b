"""Reliability loop: the two-process pipeline under the real torchrun, N times in a row (issue 20).

A distributed run that passed must exit 0. Before issue 20, rank 0 aborted at interpreter exit
in about one run of three on a quiet 2-core machine, and in most runs while another process kept
a core busy (gloo's workers outlived the run; see xpdeploy/distributed.py). This script runs the
pipeline of ``tests/test_torchrun.py::test_train_and_finetune_on_two_processes`` (load, train,
prune, finetune, export, verify, report on digits; gloo, 2 CPU processes) ``--runs`` times through
``python -m torch.distributed.run`` and counts the runs that did not end with exit code 0, one
PASSED line and no abort; ``--load K`` keeps K busy-looping processes running meanwhile, which
makes the exit race far more likely (a harder test, not a benchmark of speed).

    python bench/torchrun_exit.py --runs 30
    python bench/torchrun_exit.py --runs 30 --load 1 --out bench/results/torchrun_exit.json

Exits 1 when any run failed, so it can gate a release.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: tests importable
from tests.test_torchrun import ENV, torchrun_cmd, two_process_pipeline
from xpdeploy.progress import format_duration

BUSY_LOOP = "while True: pass"


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="runs in a row")
    ap.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    ap.add_argument("--load", type=int, default=0,
                    help="busy-looping processes kept running meanwhile (0: a quiet machine)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    return ap.parse_args(argv)


def one_run(pipe: Path, run_dir: Path, nproc: int) -> dict[str, object]:
    """One torchrun of ``pipe``: exit code, seconds, and what its output says about the exit."""
    t0 = time.monotonic()
    proc = subprocess.run(torchrun_cmd(pipe, run_dir, nproc), env=ENV, capture_output=True,
                          text=True, timeout=600)
    passed_lines = sum(line.startswith("PASSED |") for line in proc.stdout.splitlines())
    aborted = "terminate called" in proc.stderr or "SIGABRT" in proc.stderr
    ok = proc.returncode == 0 and passed_lines == 1 and not aborted
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "passed_lines": passed_lines, "aborted": aborted, "ok": ok,
            "stderr_tail": "" if ok else proc.stderr[-1500:]}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.load)]
    runs: list[dict[str, object]] = []
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="torchrun-exit-") as tmp:
            pipe = two_process_pipeline(Path(tmp))
            for i in range(args.runs):
                run = one_run(pipe, Path(tmp) / f"run{i}", args.nproc)
                runs.append(run)
                left = (time.monotonic() - t0) / (i + 1) * (args.runs - i - 1)
                print(f"run {i + 1}/{args.runs}: exit {run['returncode']} in {run['seconds']} s"
                      f"{'' if run['ok'] else ' FAILED (abort)' if run['aborted'] else ' FAILED'}"
                      f" | ETA {format_duration(left)}", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    failed = [i + 1 for i, r in enumerate(runs) if not r["ok"]]
    print(f"\n{len(runs) - len(failed)} of {len(runs)} runs passed with exit 0 "
          f"({args.nproc} processes, load {args.load}); failed: {failed or 'none'}")
    for i in failed[:3]:
        print(f"--- run {i} stderr (tail) ---\n{runs[i - 1]['stderr_tail']}")
    if args.out:
        from xpdeploy.fileio import write_json_atomic

        write_json_atomic(args.out, {"runs": len(runs), "failed": failed, "nproc": args.nproc,
                                     "load": args.load, "details": runs})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
