"""Every CLI command's error handling: one stderr line and an exit code, never a traceback.

In its own module so the commands defined in this package's other modules (``bundle``, ``calib``,
``compare``) share it without importing ``xpdeploy.cli`` itself (which registers them).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import NoReturn, TypeVar

import click

from xpdeploy.distributed import env_rank
from xpdeploy.errors import EXIT_ERROR, PeerStoppedError, XpdeployError

T = TypeVar("T")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exc()
    rank = env_rank()
    click.echo(f"{f'[rank {rank}] ' if rank else ''}error: {one_line(message)}", err=True)
    sys.exit(code)


def guarded(debug: bool, fn: Callable[[], T], on_error: Callable[[], None] | None = None) -> T:
    """Run ``fn``; turn every failure into one stderr line and an exit code (no traceback)."""
    try:
        return fn()
    except PeerStoppedError as e:  # rank 0 printed the reason
        sys.exit(e.exit_code)
    except XpdeployError as e:
        if on_error:
            on_error()
        fail(str(e), e.exit_code, debug)
    except KeyboardInterrupt:
        if on_error:
            on_error()
        fail("interrupted; rerun the same command to resume where it stopped", 130, debug)
    except Exception as e:  # a bug of ours: still one line, with the way to get the traceback
        if on_error:
            on_error()
        fail(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and "
            "please report it)",
            EXIT_ERROR,
            debug,
        )
