"""The one way xpdeploy draws a PNG: matplotlib's Agg backend and an atomic save.

matplotlib is imported inside :func:`pyplot` (no display needed, and importing a module that plots
stays cheap until a plot is drawn). :func:`figure` saves the figure atomically, so a killed
process leaves the old PNG or none, never half a file, and always closes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from xpdeploy.fileio import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: str | os.PathLike[str], *args: Any, dpi: int = 110,
           **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(*args, **kwargs)`` as (fig, axes); saved to ``path`` as PNG (``dpi``) when
    the block ends without an exception, closed in any case."""
    plt = pyplot()
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
