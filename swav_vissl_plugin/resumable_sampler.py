"""A distributed sampler that shuffles like the release's and resumes mid-epoch.

What is computed
----------------
:class:`ResumableDistributedSampler` yields, on each rank, exactly what
``torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)``
yields in epoch ``set_epoch(e)`` (a permutation of the whole dataset by
``seed + e``, padded to a multiple of the world size, rank ``r`` taking every
``world``-th index from ``r``), minus its first ``start_iter * batch_size``
indices after ``set_start_iter(start_iter)``. Its length stays the full
epoch's, so ``len(loader)`` (iterations per epoch) does not change on resume.

Why
---
The release samples with ``DistributedSampler`` (a global shuffle). VISSL's
sampler without resume support restarts an interrupted epoch from its first
batch; VISSL's resumable one, ``StatefulDistributedSampler``, gives rank
``r`` the fixed block ``[r N / W, (r + 1) N / W)`` of the dataset and only
shuffles inside it, so a rank never sees the rest (with a class-sorted image
folder, only some classes, and each rank's batch-norm statistics come from
those). Skipping ``start_iter * batch_size`` indices of every rank's share
equals skipping the first ``start_iter * batch_size * world`` indices of the
global order, so the resumed epoch continues the uninterrupted one's
(docs/checkpointing.md).

:mod:`swav_vissl_plugin.compat` makes VISSL build this sampler wherever it
would build ``StatefulDistributedSampler``
(``DATA.TRAIN.USE_STATEFUL_DISTRIBUTED_SAMPLER: True``, set in the plugin's
pretraining configs).
"""

from typing import Iterator, Optional

from torch.utils.data.distributed import DistributedSampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True)`` that can start an epoch at a
    given iteration (see the module docstring). Same constructor as VISSL's
    ``StatefulDistributedSampler``."""

    def __init__(self, dataset, batch_size: Optional[int] = None, seed: int = 0):
        super().__init__(dataset, shuffle=True, seed=int(seed), drop_last=False)
        self.batch_size = batch_size
        self.start_iter = 0

    def set_start_iter(self, start_iter: int) -> None:
        """Skip the first ``start_iter`` batches of the current epoch."""
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.start_iter = int(start_iter)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.start_iter:
            if not self.batch_size or self.batch_size <= 0:
                raise ValueError("ResumableDistributedSampler: batch_size is needed to resume mid-epoch")
            indices = indices[self.start_iter * self.batch_size:]
        return iter(indices)
