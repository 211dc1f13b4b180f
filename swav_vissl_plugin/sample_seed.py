"""Per-sample random streams for data augmentation.

What is computed
----------------
``stream_seed(base_seed, epoch, index)`` maps a (run seed, epoch, dataset
index) triple to a 63-bit seed through NumPy's ``SeedSequence`` hash.  A data
source calls :func:`begin_sample` when it loads dataset item ``index``; the
multi-crop transform that VISSL's ``GenericSSLDataset`` applies right after,
in the same process, takes that stream with :func:`take_generator` and draws
every crop parameter from it.

Why
---
The recipe's augmentations are random; for a run to resume bit-exactly after a
kill (docs/checkpointing.md), the crops of a sample must not depend on which
data-loader worker happened to load it, on how many workers there are, nor on
how many samples that worker loaded before (which is all that torch's
per-worker seeding fixes).  Keyed by (seed, epoch, index), a sample's crops
are the same whether the epoch runs uninterrupted, resumes mid-way with a
freshly started loader, or runs on another number of ranks.
"""

from typing import Optional

import numpy as np
import torch

__all__ = ["stream_seed", "begin_sample", "take_generator"]

_pending: Optional[torch.Generator] = None


def stream_seed(base_seed: int, epoch: int, index: int) -> int:
    """The seed of the random stream of dataset item ``index`` in ``epoch``."""
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(epoch), int(index)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def begin_sample(base_seed: int, epoch: int, index: int) -> None:
    """Make the stream of (``base_seed``, ``epoch``, ``index``) the one the
    next :func:`take_generator` call in this process returns."""
    global _pending
    gen = torch.Generator()
    gen.manual_seed(stream_seed(base_seed, epoch, index))
    _pending = gen


def take_generator() -> Optional[torch.Generator]:
    """The stream set by the last :func:`begin_sample`, or ``None`` (then the
    caller uses torch's global RNG).  A stream is handed out once, so a
    sample never reuses the previous sample's stream."""
    global _pending
    gen, _pending = _pending, None
    return gen
