"""Every random stream of a run is seeded from the run's seed and a few integers: the round, the
client, and a tag naming the stream, so that no stream depends on what ran before it and no two
streams share a seed. The tags live here, in one place.

A client's local training (data order, rounding keys) uses ``derive_seed(seed, round, client)``
with no tag.
"""

from __future__ import annotations

import numpy as np

INIT_TAG = 0x11  # the model's initial parameters: (seed, tag)
SAMPLING_TAG = 0x5A  # the clients of a round: (seed, round, tag)
DROPOUT_TAG = 0xD0  # whether a sampled client fails (--dropout): (seed, round, client, tag)
DOWNLINK_TAG = 0xD0  # the served model's stochastic rounding: (seed, round, tag), a shorter key than DROPOUT's
VALIDATION_TAG = 0xAB  # ABAvg's held-out validation split: (seed, tag)
FEDGEN_TAG = 0xF6  # FedGen's generator: its initialisation (seed, tag) and each round's training (seed, round, tag)
FEDFTG_TAG = 0xF7  # FedFTG's generator: its initialisation (seed, tag) and each round's fine-tuning (seed, round, tag)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. ``(seed, round, client)``), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))
