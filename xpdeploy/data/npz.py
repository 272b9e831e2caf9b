"""Byte-stable ``.npz`` files for fixed data sets (verification set, calibration batches).

One writer and one reader so every such file has the same guarantees: the same arrays give the
same bytes (fixed zip timestamps, no compression, no pickles), and a missing, truncated or foreign
file is a one-line DataError that names the file and says how to fix it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from xpdeploy.errors import DataError
from xpdeploy.fileio import write_with

#: Zip entry timestamp: np.savez would stamp the current time and change the bytes on every run.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed .npz with fixed entry timestamps at ``path``, written atomically."""

    def writer(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for key, array in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                with zf.open(info, "w", force_zip64=True) as out:
                    np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)

    write_with(path, writer)


def read_npz(path: str | Path, keys: tuple[str, ...], *, what: str, fix: str,
             optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of ``path``, loaded, and those of ``optional`` the file has; ``what``
    names the file in errors ("verification set"), ``fix`` says what to do about a missing or
    unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(
                    f"{what} {path} lacks {', '.join(missing)} (has: "
                    f"{', '.join(z.files) or 'nothing'}); {fix}"
                )
            return {k: z[k] for k in (*keys, *optional) if k in z.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        reason = str(e).replace("\n", " ") or type(e).__name__
        raise DataError(f"{what} {path} is unreadable ({reason}); {fix}") from None
