"""How many threads a host-side step may use: the CPUs this process may run on (its affinity, which a batch scheduler
narrows), at most the step's own limit."""

from __future__ import annotations

import os


def usable_cpus(limit: int) -> int:
    """The CPUs this process may run on, between 1 and `limit`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity call
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, limit))
