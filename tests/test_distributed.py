"""xpdeploy.distributed: leaving the process group stops its native threads (issue 20).

A process group whose gloo workers still run when the interpreter finalises can abort the process
(SIGABRT, "terminate called without an active exception") after a run that passed. These tests
look at the threads themselves, which is deterministic, where the abort is a race.
"""

from __future__ import annotations

import sys

from tests.distributed_utils import launch_ranks, run_ranks


def _ddp_step_then_shutdown(hold_group: bool) -> tuple[list[str], bool]:
    """One DDP step and a broadcast (what a run does), leave the group, report its threads."""
    import torch
    from torch import nn

    from xpdeploy import distributed

    before = distributed.group_threads()
    assert before, "a joined gloo group runs named native threads; the check below needs them"
    model = distributed.wrap_ddp(nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    distributed.broadcast_object({"kind": "end"})
    del model
    held = torch.distributed.group.WORLD if hold_group else None
    distributed.shutdown()
    seen = (distributed.group_threads(), distributed._group_outlived)
    del held  # the group's destructor joins its threads now, so this child exits cleanly
    return seen


def test_leaving_the_group_after_ddp_stops_its_threads() -> None:
    # Fails when torch.distributed.nn.functional is first imported after init_process_group
    # (DDP imports it): its default arguments then hold the group past destroy_process_group.
    for threads, outlived in run_ranks(_ddp_step_then_shutdown, 2, False):
        assert threads == [] and outlived is False


def test_a_group_something_else_holds_is_seen_after_shutdown() -> None:
    for threads, outlived in run_ranks(_ddp_step_then_shutdown, 2, True):
        assert any(t.startswith("pt_gloo") for t in threads) and outlived is True


_END_PROCESS = """
import sys
import torch.distributed as dist
from xpdeploy import distributed
distributed.init_from_env()
held = dist.group.WORLD if sys.argv[1] == "hold" else None
distributed.shutdown()
sys.stdout.write("written before the exit")
distributed.end_process(7)
print(" / end_process returned")
"""


def test_end_process_exits_with_the_code_only_when_the_group_outlived_the_run() -> None:
    held = launch_ranks([sys.executable, "-c", _END_PROCESS, "hold"], 2, timeout_s=120)
    assert [p.returncode for p in held] == [7, 7], [p.stderr for p in held]
    assert all(p.stdout == "written before the exit" for p in held)  # flushed, then ended
    freed = launch_ranks([sys.executable, "-c", _END_PROCESS, "free"], 2, timeout_s=120)
    assert [p.returncode for p in freed] == [0, 0], [p.stderr for p in freed]
    assert all(p.stdout == "written before the exit / end_process returned\n" for p in freed)

