"""Progress for long work: a rich bar with ETA on a terminal, periodic plain lines elsewhere.

CI logs are not terminals: a live bar there either prints nothing until the end or floods the log,
so off a TTY we print a line every ~10% with the same counts and ETA. Under torchrun only rank 0
logs and shows progress; the other ranks' output would repeat it N times.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from xpdeploy.distributed import is_main

Advance = Callable[..., None]
QUIET_S = 2.0  # seconds between plain progress lines off a terminal


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``1h05m``."""
    seconds = max(0, round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def log(message: str) -> None:
    """One status line on stdout; stderr is kept for errors, so a failure is one stderr line."""
    if is_main():
        print(message, flush=True)


@contextmanager
def progress(total: int, description: str) -> Iterator[Advance]:
    """Yield ``advance(n=1, **fields)``; fields (e.g. loss=0.31) are shown beside the bar."""
    if not is_main():
        yield lambda n=1, **fields: None
        return
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=Console(), transient=True) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields: float) -> None:
                info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
                bar.update(task, advance=n, info=info)

            yield advance
        return

    start, done, next_report = time.monotonic(), 0, max(1, total // 10)
    last_line = start

    def advance(n: int = 1, **fields: float) -> None:
        nonlocal done, next_report, last_line
        done += n
        now = time.monotonic()
        # A line per ~10% of the work, but not more often than every QUIET_S seconds: short
        # loops (an eval of a few batches) print nothing.
        if (done >= next_report and now - last_line >= QUIET_S) or (
            done == total and now - start >= QUIET_S
        ):
            next_report, last_line = done + max(1, total // 10), now
            elapsed = now - start
            eta = elapsed / done * (total - done) if done else 0.0
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            log(f"  {description} {done}/{total} elapsed {format_duration(elapsed)} "
                f"eta {format_duration(eta)} {info}".rstrip())

    yield advance
