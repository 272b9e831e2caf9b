"""Latency tables kept across runs, one file per :class:`~xpdeploy.latency.table.TableKey`.

Measuring a table takes minutes (hundreds of ONNX files timed in rounds); it depends on the
architecture and where it runs, not on the weights or the pipeline, so every run that plans the
same architecture on the same machine and runtime reuses it. The folder is
``$XPDEPLOY_CACHE/latency_tables`` (default ``~/.cache/xpdeploy``); a file is used only when the
key it holds equals the key asked for, so another machine's table is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

from xpdeploy.latency.table import LatencyModel, LatencyTableError, TableKey

ENV_VAR = "XPDEPLOY_CACHE"


def cache_root() -> Path:
    """``$XPDEPLOY_CACHE`` or ``~/.cache/xpdeploy``."""
    return Path(os.environ.get(ENV_VAR) or "~/.cache/xpdeploy").expanduser()


def cached_table(key: TableKey, root: Path | None = None) -> LatencyModel | None:
    """The cached table of ``key``, or None (none, unreadable, or another key in the file)."""
    path = (root or cache_root()) / "latency_tables" / key.cache_name()
    if not path.is_file():
        return None
    try:
        table = LatencyModel.read(path)
    except LatencyTableError:
        return None
    return table if table.key == key else None


def store_table(table: LatencyModel, root: Path | None = None) -> Path | None:
    """Keep ``table`` under its key; None when the cache folder cannot be written (a read-only
    home is not an error: the run keeps its own copy)."""
    path = (root or cache_root()) / "latency_tables" / table.key.cache_name()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.write(path)
    except OSError:
        return None
    return path
