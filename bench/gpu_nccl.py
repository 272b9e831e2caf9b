"""Part 4 of ``bench/gpu_check.sh``: a collective stage under ``torchrun``, and a direct probe of
the process-group backend xpdeploy would pick (NCCL on a GPU, gloo on a CPU).

Two subcommands:

``pipeline DIR``
    Writes ``DIR/p.yaml``, the pipeline of ``tests/test_torchrun.py``'s two-process test (load,
    train, prune, finetune, export, verify, report on digits; a tiny DeiT-shaped ViT, 2 + 2
    epochs), which the check then runs as ``python -m torch.distributed.run --standalone
    --nproc_per_node=1 -m xpdeploy run DIR/p.yaml``: what the two-process test and
    ``bench/torchrun_exit.py`` run, here in one process.

``probe [--out FILE]`` (run it under ``torch.distributed.run``)
    Joins a process group with the backend xpdeploy's ``init_from_env`` picks (``nccl`` when
    torch sees a GPU and ``XPDEPLOY_DIST_BACKEND`` is not ``gloo``, else ``gloo``), runs the
    collectives the pipeline relies on (all_reduce of a tensor on the collective device,
    broadcast_object_list, barrier), leaves the group, and prints one line
    ``gpu_nccl probe: {json}`` (also written to ``--out``). Exit 0 when every collective gave
    the expected result.

Why a probe as well: with one process ``WORLD_SIZE`` is 1, and ``xpdeploy.distributed.
init_from_env`` joins a group of one because torchrun launched it, so the pipeline run above
takes the collective stages' distributed path (DDP, broadcasts) on NCCL; the probe times NCCL's
init and collectives on their own and checks their results. With one GPU a second process is
refused (``LOCAL_RANK 1 but this node has 1 GPUs``), so NCCL between ranks needs two GPUs.

Units: ``init_ms`` and ``collectives_ms`` are wall-clock milliseconds of this rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

PROBE_PREFIX = "gpu_nccl probe: "


def write_pipeline(folder: Path) -> Path:
    """``folder/p.yaml``: the torchrun test's pipeline (tests/conftest.py), as YAML."""
    from tests.conftest import torchrun_pipeline_dict
    from tests.conftest import write_pipeline as write_yaml

    folder.mkdir(parents=True, exist_ok=True)
    return write_yaml(folder / "p.yaml", torchrun_pipeline_dict())


def backend_for(cuda: bool) -> str:
    """The backend ``xpdeploy.distributed.init_from_env`` chooses (the same rule, inline there)."""
    return "nccl" if cuda and os.environ.get("XPDEPLOY_DIST_BACKEND") != "gloo" else "gloo"


def probe() -> dict[str, Any]:
    """Join the group torchrun describes, run all_reduce / broadcast_object_list / barrier, and
    leave it; what happened, as a dict (``ok``: every result was as expected)."""
    import gc

    import torch
    import torch.distributed as dist

    from xpdeploy.distributed import group_threads

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out: dict[str, Any] = {"backend": backend, "world_size": world, "rank": rank,
                           "device": str(device), "torch": torch.__version__,
                           "nccl": None, "ok": False}
    if backend == "nccl":
        version = torch.cuda.nccl.version()  # a tuple in torch 2.x, an int in older releases
        out["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    try:
        t0 = time.perf_counter()
        dist.init_process_group(backend=backend, init_method="env://")
        out["init_ms"] = (time.perf_counter() - t0) * 1000.0
    except Exception as e:  # a backend that cannot start is the result to report
        out["error"] = f"init_process_group: {type(e).__name__}: {e}"
        return out
    try:
        t1 = time.perf_counter()
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x)
        expected = world * (world + 1) / 2
        box: list[Any] = [{"from": rank, "payload": [1, 2, 3]} if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=device)
        if backend == "nccl":
            dist.barrier(device_ids=[local_rank])
        else:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["collectives_ms"] = (time.perf_counter() - t1) * 1000.0
        out["all_reduce_ok"] = bool(torch.all(x == expected).item())
        out["broadcast_ok"] = box[0] == {"from": 0, "payload": [1, 2, 3]}
    except Exception as e:
        out["error"] = f"collectives: {type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
        gc.collect()
    # The group's native threads (gloo workers, NCCL watchdog) should be gone now; issue 20's
    # abort at exit came from ones that were not (xpdeploy.distributed.shutdown).
    out["group_threads_left"] = group_threads()
    out["ok"] = bool(out.get("all_reduce_ok") and out.get("broadcast_ok"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="write DIR/p.yaml (the torchrun test's pipeline)")
    p.add_argument("folder", type=Path)
    q = sub.add_parser("probe", help="run the collectives (under torch.distributed.run)")
    q.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    if args.command == "pipeline":
        print(write_pipeline(args.folder))
        return 0
    result = probe()
    print(PROBE_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    if args.out:
        from xpdeploy.fileio import write_json_atomic

        write_json_atomic(args.out, result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
