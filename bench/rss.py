"""The process's resident memory from /proc/self/status (Linux), for the benches that report a peak rise: reset the
peak (VmHWM) through /proc/self/clear_refs, run a step, read the peak again."""

from __future__ import annotations


def status_bytes(key: str) -> int:
    """A /proc/self/status field given in kB (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))


def reset_peak() -> int:
    """Reset the peak resident size to the current one; the current resident size in bytes."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_bytes("VmRSS")
