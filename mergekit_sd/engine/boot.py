"""Which boot of the machine this is, so that the store can tell objects written since the last power loss or OS
crash (whose bytes may never have reached the disk) from objects that have.

Objects are written without a blocking fsync: each records the boot id it was written under, and an object from
an earlier boot is re-verified against its recorded digest before its first use. Where the kernel offers no boot
id, objects are fsynced as they are written instead. Imports no torch (the no-op path keys stamps with it).
"""

from __future__ import annotations

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """The kernel's id of the current boot, or None where there is none (then writes must be fsynced)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None
