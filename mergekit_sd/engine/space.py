"""Free-space checks made before a step writes anything, so that a full disk stops a build with a clear message
instead of an OSError after the compute, and leaves no partial file behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergekit_sd.errors import SpaceError


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing ancestor (outputs may go to a folder not made yet)."""
    p = Path(os.path.abspath(folder))
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding `folder`."""
    return shutil.disk_usage(_existing(folder)).free


def filesystem_id(folder: Path) -> int:
    return os.stat(_existing(folder)).st_dev


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether an object in `a` can be hard-linked into `b` (else outputs are copies and need their own space)."""
    return filesystem_id(a) == filesystem_id(b)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def require(needs: dict[Path, int], what: str) -> None:
    """Raise SpaceError naming the first folder whose filesystem has less free space than `what` needs there."""
    by_fs: dict[int, tuple[Path, int]] = {}
    for folder, n in needs.items():
        dev = filesystem_id(folder)
        first, total = by_fs.get(dev, (folder, 0))
        by_fs[dev] = (first, total + n)
    for folder, n in by_fs.values():
        have = free_bytes(folder)
        if n > have:
            raise SpaceError(f"not enough free space in {folder}: {what} needs {n} bytes ({human(n)}), "
                             f"{have} bytes ({human(have)}) are available; free some space or choose another folder")
