"""Run a function on N local CPU processes joined in one gloo process group, as torchrun would.

For tests of collective code (DDP, all-reduce, rank-0-only writes)::

    from tests.distributed_utils import run_ranks

    def _on_rank(data):                      # module level: the children import it by name
        from xpdeploy import distributed
        return distributed.rank(), work(data)   # anything picklable

    def test_it():
        first, second = run_ranks(_on_rank, 2, data)

Each child gets the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), joins through :func:`xpdeploy.distributed.init_from_env`
(gloo forced, even where a GPU exists), calls ``fn(*args)`` and leaves the group with
:func:`xpdeploy.distributed.shutdown`. Results come back through pickle files in a temporary
folder, in rank order. A child's exception fails the caller with that child's traceback; a run
longer than ``timeout_s`` (a deadlock: ranks waiting in different collectives) is killed and
raises :class:`TimeoutError` instead of hanging the test session.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Seconds a whole multi-rank run may take before its processes are killed.
DEFAULT_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(index: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str,
           timeout_min: int, threads: int, args: tuple[Any, ...]) -> None:
    """One rank: torchrun's environment, join the group, run ``fn``, pickle its result."""
    os.environ.update({
        "RANK": str(index), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(index),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "XPDEPLOY_DIST_BACKEND": "gloo", "XPDEPLOY_DIST_TIMEOUT_MIN": str(timeout_min),
    })
    import torch

    from xpdeploy import distributed

    torch.set_num_threads(threads)
    distributed.init_from_env()
    try:
        result = fn(*args)
    finally:
        distributed.shutdown()
    with open(Path(out_dir) / f"rank{index}.pkl", "wb") as fh:
        pickle.dump(result, fh)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
              timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1) -> list[Any]:
    """``fn(*args)`` on ``world_size`` spawned processes in one gloo group; results by rank.

    ``fn`` must be importable (defined at module level) and ``args`` and its result picklable.
    Inside ``fn``, :mod:`xpdeploy.distributed` reports the rank and world and its collectives
    work. ``threads``: torch intra-op threads per process (1 keeps N processes off each other's
    cores). ``timeout_s`` bounds the whole run (seconds, process start included); collectives
    time out after about as long, so a hung rank fails with torch's message when it can.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ranks-") as out_dir:
        timeout_min = max(1, math.ceil(timeout_s / 60))
        ctx = mp.start_processes(
            _child, args=(fn, world_size, free_port(), out_dir, timeout_min, threads, args),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):  # raises a child's exception, with its traceback
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish in "
                                       f"{timeout_s:.0f} s (a deadlock?); killed them")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as fh:
                results.append(pickle.load(fh))
        return results


def launch_ranks(cmd: list[str], world_size: int, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 cwd: Path | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Start ``cmd`` ``world_size`` times as the ranks of one group and wait for every one.

    Each process gets the variables torchrun sets (gloo forced) and nothing else of torchrun, so
    the caller sees **every rank's own exit code** and output: torchrun reports only the first
    failure and stops the other ranks with SIGTERM. A rank still running after ``timeout_s``
    seconds is killed, and :class:`TimeoutError` names it.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="launch-") as logs, contextlib.ExitStack() as files:
        procs = []
        for rank in range(world_size):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "XPDEPLOY_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1",
                   "PYTHONUNBUFFERED": "1"}
            out = files.enter_context(open(Path(logs) / f"{rank}.out", "w+"))
            err = files.enter_context(open(Path(logs) / f"{rank}.err", "w+"))
            procs.append((subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err,
                                           text=True), out, err))
        deadline = time.monotonic() + timeout_s
        results = []
        for rank, (proc, out, err) in enumerate(procs):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p, _, _ in procs:
                    p.kill()
                    p.wait()
                raise TimeoutError(f"rank {rank} of {cmd} still ran after {timeout_s:.0f} s; "
                                   "killed every rank") from None
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, code, out.read(), err.read()))
        return results
