"""Running under ``torchrun``: process group, rank queries and the few collectives we need.

We do not ship a launcher: ``torchrun`` (PyTorch's standard one) starts the processes and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
joins the group through ``env://``. Without those variables (a plain ``xpdeploy run``) every helper
here is a cheap no-op for a world of one, so single-process code needs no special case.

Rank queries read the environment (not ``torch.distributed``) so that logging and progress can ask
"am I rank 0?" without importing torch, which the device side must not need.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from xpdeploy.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

T = TypeVar("T")

#: Minutes a rank waits in a collective before giving up. Ranks other than 0 wait in one while
#: rank 0 alone runs load, export, simplify and verify, which can take long on ImageNet, so the
#: default is far above torch's (10 minutes for NCCL). Override with XPDEPLOY_DIST_TIMEOUT_MIN.
DEFAULT_TIMEOUT_MIN = 180

#: Name prefixes of the native threads a process group runs, as Linux shows them in
#: ``/proc/self/task/*/comm``: gloo's transport loop (``gloo_tcp_loop``), ProcessGroupGloo's
#: workers (``pt_gloo_runloop``) and NCCL's watchdog and heartbeat monitor (``pt_nccl_*``).
GROUP_THREAD_PREFIXES = ("gloo", "pt_gloo", "pt_nccl")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group: global ``rank`` of ``world_size``, ``local_rank`` on
    its node (= its GPU index), and the torch.distributed ``backend`` (nccl on GPUs, else gloo)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current: DistInfo | None = None
#: Set by :func:`shutdown` when the group's native threads were still running after it.
_group_outlived = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def env_rank() -> int:
    """This process's global rank from the environment torchrun sets (0 without torchrun)."""
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """True on rank 0, the only rank that writes artifacts, logs and shows progress."""
    return env_rank() == 0


def current() -> DistInfo | None:
    """The joined process group, or None for a single process."""
    return _current


def world_size() -> int:
    return _current.world_size if _current else 1


def rank() -> int:
    return _current.rank if _current else 0


def launched_by_torchrun() -> bool:
    """True in a process torchrun started (it sets TORCHELASTIC_RUN_ID, ``--standalone`` too)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def init_from_env() -> DistInfo | None:
    """Join the process group torchrun describes; None (and nothing done) for a plain process.

    GPUs present: NCCL, one GPU per process (``LOCAL_RANK``). Otherwise gloo on CPU, which is what
    the tests use. ``torchrun --nproc_per_node 1`` joins a group of one: the collective stages
    then take the same path (DDP, broadcasts, NCCL on a GPU) as with N processes, which is how a
    one-GPU machine checks it. Idempotent.
    """
    global _current
    if _current is not None:
        return _current
    world = env_world_size()
    if world <= 1 and not launched_by_torchrun():
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; start distributed runs with "
            "torchrun --nproc_per_node N -m xpdeploy run PIPELINE"
        )
    import torch
    import torch.distributed as dist

    # Before the group exists, on purpose: torch.distributed.nn.functional binds ``group.WORLD``
    # as the default argument of its collectives when it is imported. Imported after
    # init_process_group (DDP's first construction imports it), those defaults hold the WORLD
    # group past destroy_process_group(), so its gloo workers still run while the interpreter
    # finalises; a worker that then frees the last broadcast's tensors takes the GIL, is ended
    # by the finalising interpreter, and the process aborts with "terminate called without an
    # active exception" (SIGABRT) after a run that passed (issue 20). Imported now, the
    # defaults are None (the default group, looked up at call time).
    import torch.distributed.nn.functional

    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and os.environ.get("XPDEPLOY_DIST_BACKEND") != "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "set --nproc_per_node to at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(minutes=_env_int("XPDEPLOY_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    _current = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    return _current


def shutdown() -> None:
    """Leave the process group, and stop its native threads while the interpreter is whole.

    Called by every rank after its last collective (the run's "end" or "stop" broadcast). The
    group's threads stop only when the group object is freed: ``destroy_process_group`` drops
    torch's own references, ``gc.collect`` first frees DDP wrappers left in reference cycles
    (each holds the group), and ProcessGroupGloo's destructor then drains its work queue and
    joins its workers. Threads still running afterwards mean something else holds the group;
    :func:`end_process` then ends the process before the interpreter finalises (see there).
    """
    global _current, _group_outlived
    if _current is None:
        return
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None
    _group_outlived = bool(group_threads())


def group_threads() -> list[str]:
    """Names of this process's native threads that belong to a process group ([] where Linux's
    ``/proc/self/task`` is not there to tell)."""
    names = []
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return names
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if name.startswith(GROUP_THREAD_PREFIXES):
            names.append(name)
    return sorted(names)


def end_process(code: int) -> None:
    """Exit with ``code`` now if :func:`shutdown` left the group's threads running; else return.

    A process group that outlives the run keeps native worker threads that can touch Python
    objects while the interpreter finalises, which aborts the process (SIGABRT) after a run
    that passed, so torchrun marks the job failed. torch offers no way to stop those threads
    while something holds the group, so the process ends here, deliberately, with the run's
    own exit code: every artifact is already written and closed (the run folder writes
    atomically), and only stdout and stderr need flushing. Not reached when shutdown() freed
    the group, which is the normal case.
    """
    if not _group_outlived:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to save
            stream.flush()
    os._exit(code)


def device() -> torch.device:
    """Where this rank computes: its own GPU (``cuda:LOCAL_RANK``) when there is one, else CPU."""
    import torch

    if torch.cuda.is_available() and (_current is None or _current.backend == "nccl"):
        return torch.device("cuda", _current.local_rank if _current else 0)
    return torch.device("cpu")


def _collective_device() -> torch.device:
    import torch

    return torch.device("cuda", _current.local_rank) if _current and _current.backend == "nccl" \
        else torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here."""
    if _current is None:
        return
    import torch.distributed as dist

    if _current.backend == "nccl":
        dist.barrier(device_ids=[_current.local_rank])
    else:
        dist.barrier()


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects only)."""
    if _current is None:
        return obj  # type: ignore[return-value]
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]  # type: ignore[return-value]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    if _current is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _current.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks of a few scalars (loss sums, correct counts), in float64."""
    if _current is None:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def wrap_ddp(module: nn.Module) -> nn.Module:
    """``module`` inside DistributedDataParallel when distributed, else ``module`` itself.

    Gradients of every parameter that requires them (weights, or masks and thresholds when those
    are parameters of ``module``) are averaged over ranks in ``backward``.
    """
    if _current is None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if _current.backend == "nccl":
        return DistributedDataParallel(module, device_ids=[_current.local_rank])
    return DistributedDataParallel(module)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``module`` itself)."""
    return getattr(module, "module", module)
