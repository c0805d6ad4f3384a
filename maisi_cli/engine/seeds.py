"""Seeds derived from (run seed, index[, attempt]) alone, so any sharding or re-run gives the same outputs.
NumPy only: phantoms and planning use it without loading torch."""

from __future__ import annotations

import numpy as np


def _derive(*keys: int) -> int:
    # A 63-bit value from NumPy's SeedSequence: well mixed, so seeds 0/1 and indices 0/1 never collide.
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def derive_sample_seed(seed: int, index: int) -> int:
    """Sample (or phantom, or file) `index`'s seed from the run seed."""
    return _derive(seed, index)


def derive_attempt_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of sample `index`'s attempt `attempt` (a quality-check retry). Attempt 0 is
    `derive_sample_seed(seed, index)`, so runs without a retry give the files they always gave."""
    return derive_sample_seed(seed, index) if attempt == 0 else _derive(seed, index, attempt)
