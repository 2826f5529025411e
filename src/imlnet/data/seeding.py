"""Seeds derived from several integers, shared by the datasets, transforms and data module."""

from __future__ import annotations

import numpy as np


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (a hash: nearby inputs give unrelated seeds).

    ``seed + epoch`` style sums collide (seed 0 epoch 1 == seed 1 epoch 0); a SeedSequence
    does not.
    """
    words = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2)
    return (int(words[0]) << 31 ^ int(words[1])) % 2**63
