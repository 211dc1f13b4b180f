"""Clustering of a (distributed) memory bank: DeepCluster-v2's spherical
k-means and SeLa-v2's Sinkhorn-Knopp hard labels, as plain functions.

Nothing here depends on VISSL or on the rest of the plugin: only ``torch``
and ``torch.distributed`` (the file can be loaded on its own). The
VISSL losses (:mod:`swav_vissl_plugin.losses.deepcluster_v2`) call these at
the start of every epoch. Every function works on one rank's part of the
memory bank; with ``distributed`` on (default: whenever ``torch.distributed``
is initialised with a world size above 1) the result on N ranks is that of
one rank holding the concatenated bank (rank 0's rows first). Every rank must
call them (collectives).

Recipe (docs/deepcluster_sela.md, from the paper's "DeepCluster-v2 and SeLa-v2
rows"): "k-means: 10 iterations, spherical (dot product), centroids
initialised from random memory-bank rows"; "Head h clusters the memory bank
of crop (h mod 2)"; SeLa-v2: "the k-means step is replaced by Sinkhorn-Knopp
equipartition of the whole memory bank's prototype scores into hard
pseudo-labels".

Memory and compute (``N`` bank rows on this rank, ``K`` clusters, ``D``
dimensions, ``C`` rows per chunk):

* E step (assignment) and every Sinkhorn pass process the bank in chunks of
  ``C`` rows, scored into one ``(C, K)`` buffer allocated once per call and
  reused (the Sinkhorn kernel is computed in place in it): never the
  ``N x K`` matrix (1.28M x 3000 fp32 = 15 GB). Default ``C = max(1, 2**24 // K)``: 64 MB of fp32 scores per chunk
  (5592 rows for K = 3000). Compute: ``2 N K D`` flops per pass.
* M step: one ``index_add_`` of the bank rows into ``K x D`` sums and one
  ``bincount`` for the counts (no Python loop over clusters), then one
  all-reduce of each; ``O(N D + K D)`` work, ``O(K D)`` extra memory.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def distributed_is_on(distributed: Optional[bool] = None) -> bool:
    """The ``distributed`` switch (as :func:`swav_vissl_plugin.sinkhorn.
    distributed_is_on`; restated so that this module imports nothing but
    torch and can be loaded on its own, e.g. by ``benchmarks/bench_kmeans.py``):
    ``None`` means on when ``torch.distributed`` is initialised with a world
    size above 1; ``True`` requires an initialised process group."""
    if distributed is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return bool(distributed)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "IGNORE_LABEL",
    "KMeansResult",
    "assign_to_centroids",
    "chunk_rows",
    "gather_labels",
    "sinkhorn_labels",
    "spherical_kmeans",
]

#: Scores per chunk when ``chunk_size`` is not given: 2**24 (64 MB in fp32).
DEFAULT_CHUNK_ELEMENTS = 2 ** 24

#: Label of a dataset index that no rank's memory bank holds (ignored by the
#: cross-entropy, as ``ignore_index=-100`` in the release).
IGNORE_LABEL = -100


def _world(on: bool) -> "tuple[int, int]":
    if on:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chunk_rows(num_clusters: int, chunk_size: Optional[int] = None) -> int:
    """Rows of the bank scored at once: ``chunk_size`` if given (>= 1), else
    ``max(1, DEFAULT_CHUNK_ELEMENTS // num_clusters)``."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, int(num_clusters)))


def _check_bank(bank: Tensor, name: str = "bank") -> None:
    if bank.dim() != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(bank.shape)}")
    if not bank.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {bank.dtype}")


def _assign_into(
    bank: Tensor, weights_t: Tensor, step: int, buffer: Tensor, labels: Tensor, best: Tensor
) -> None:
    """E step into ``labels``/``best``, scoring ``step`` rows at a time into
    the reused ``(step, K)`` ``buffer`` (no allocation per chunk)."""
    n = bank.shape[0]
    for start in range(0, n, step):
        stop = min(start + step, n)
        scores = buffer[: stop - start]
        torch.mm(bank[start:stop], weights_t, out=scores)
        torch.max(scores, dim=1, out=(best[start:stop], labels[start:stop]))


def _score_buffer(rows: int, step: int, k: int, dtype: torch.dtype, device) -> Tensor:
    return torch.empty(max(1, min(step, rows)), k, dtype=dtype, device=device)


@torch.no_grad()
def assign_to_centroids(
    bank: Tensor, centroids: Tensor, chunk_size: Optional[int] = None
) -> "tuple[Tensor, Tensor]":
    """E step: each row's best centroid by dot product, chunk by chunk.

    Returns ``(labels, best)``: ``labels[i] = argmax_k bank[i] . centroids[k]``
    (int64, ``(N,)``; the first maximum on ties) and ``best[i]`` that maximum
    dot product (bank dtype). At most ``chunk_size`` rows (default
    :func:`chunk_rows`) are scored at once, into one reused buffer. Local: no
    collective.
    """
    _check_bank(bank)
    n, k = bank.shape[0], centroids.shape[0]
    step = chunk_rows(k, chunk_size)
    labels = torch.empty(n, dtype=torch.long, device=bank.device)
    best = torch.empty(n, dtype=bank.dtype, device=bank.device)
    buffer = _score_buffer(n, step, k, bank.dtype, bank.device)
    _assign_into(bank, centroids.to(bank.dtype).t(), step, buffer, labels, best)
    return labels, best


@dataclass
class KMeansResult:
    """Output of :func:`spherical_kmeans`.

    Attributes:
        centroids: ``(K, D)`` unit-norm centroids after the last M step (the
            same tensor on every rank).
        labels: ``(N_local,)`` int64, this rank's rows' assignments to
            ``centroids`` (the E step after the last M step).
        objective: ``iterations + 1`` floats, the mean cosine distance
            ``1 - mean_i max_k x_i . c_k`` over all ranks' rows at every E
            step (before each M step and after the last one). Non-increasing
            for unit-norm rows.
        counts: ``(K,)`` int64, all ranks' rows per cluster under ``labels``.
    """

    centroids: Tensor
    labels: Tensor
    objective: List[float]
    counts: Tensor


@torch.no_grad()
def spherical_kmeans(
    bank: Tensor,
    num_clusters: int,
    iterations: int = 10,
    *,
    init_centroids: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> KMeansResult:
    """Distributed spherical k-means of DeepCluster-v2 (recipe: "k-means: 10
    iterations, spherical (dot product), centroids initialised from random
    memory-bank rows").

    1. Initial centroids: on rank 0, ``init_centroids`` if given, else the
       rows ``torch.randperm(N_0, generator=generator)[:K]`` of rank 0's bank;
       broadcast from rank 0 (other ranks' ``init_centroids`` are ignored).
       Raises ``ValueError`` on every rank when rank 0 holds fewer than K rows.
    2. ``iterations`` times: E step (:func:`assign_to_centroids`, chunked),
       then M step: per-cluster sums of the assigned rows (``index_add_``)
       and counts (``bincount``), both all-reduced; every cluster with a
       non-zero count (and non-zero sum) gets the L2-normalised sum (the
       normalised mean), an empty cluster keeps its centroid.
    3. A last E step gives the labels under the final centroids.

    Args:
        bank: ``(N_local, D)`` this rank's memory-bank rows, expected unit-norm
            (the head's L2-normalised embeddings). float32 or float64; the
            centroids have its dtype. Not modified.
        num_clusters: K >= 1.
        iterations: number of M steps (>= 0; 10 in the recipe).
        init_centroids: ``(K, D)`` initial centroids (used on rank 0 only).
        generator: random generator for the initial rows (rank 0).
        chunk_size: rows per E-step chunk (default :func:`chunk_rows`).
        distributed: see the module docstring.

    Returns:
        :class:`KMeansResult`.
    """
    _check_bank(bank)
    k = int(num_clusters)
    if k < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if int(iterations) < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    on = distributed_is_on(distributed)
    rank, _ = _world(on)
    n_local, dim = bank.shape
    device, dtype = bank.device, bank.dtype

    # -- initial centroids from rank 0 -------------------------------------
    if init_centroids is not None and rank == 0:
        if tuple(init_centroids.shape) != (k, dim):
            raise ValueError(
                f"init_centroids must be ({k}, {dim}), got {tuple(init_centroids.shape)}"
            )
    rows0 = torch.tensor([n_local], dtype=torch.long, device=device)
    if on:
        dist.broadcast(rows0, 0)
    if init_centroids is None and int(rows0) < k:
        raise ValueError(
            f"k-means: rank 0's memory bank has {int(rows0)} rows, fewer than the "
            f"{k} clusters to initialise from it; reduce the number of prototypes"
        )
    if rank == 0:
        if init_centroids is not None:
            centroids = init_centroids.detach().to(device=device, dtype=dtype).clone()
        else:
            perm = torch.randperm(n_local, generator=generator)[:k]
            centroids = bank[perm.to(device)].clone()
    else:
        centroids = torch.empty(k, dim, dtype=dtype, device=device)
    if on:
        dist.broadcast(centroids, 0)

    step = chunk_rows(k, chunk_size)
    buffer = _score_buffer(n_local, step, k, dtype, device)  # one (C, K) workspace for every E step
    labels = torch.empty(n_local, dtype=torch.long, device=device)
    best = torch.empty(n_local, dtype=dtype, device=device)
    objective: List[float] = []
    total_rows = torch.tensor([float(n_local)], dtype=torch.float64, device=device)
    if on:
        dist.all_reduce(total_rows)
    total = max(float(total_rows), 1.0)
    for it in range(int(iterations) + 1):
        # -- E step ---------------------------------------------------------
        _assign_into(bank, centroids.t(), step, buffer, labels, best)
        score = best.sum(dtype=torch.float64).reshape(1)
        if on:
            dist.all_reduce(score)
        objective.append(1.0 - float(score) / total)
        if it == int(iterations):
            break
        # -- M step ---------------------------------------------------------
        sums = torch.zeros(k, dim, dtype=dtype, device=device)
        sums.index_add_(0, labels, bank)  # per-cluster sums, no loop over clusters
        counts = torch.bincount(labels, minlength=k)
        if on:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        norms = sums.norm(dim=1)
        update = (counts > 0) & (norms > 0)
        centroids = torch.where(
            update.unsqueeze(1), sums / norms.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1), centroids
        )
        # Every centroid unit-norm (kept ones were bank rows or earlier means).
        centroids = F.normalize(centroids, dim=1)

    counts = torch.bincount(labels, minlength=k)
    if on:
        dist.all_reduce(counts)
    return KMeansResult(centroids=centroids, labels=labels, objective=objective, counts=counts)


@torch.no_grad()
def sinkhorn_labels(
    bank: Tensor,
    prototypes: Tensor,
    epsilon: float = 0.05,
    iterations: int = 10,
    *,
    chunk_size: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> Tensor:
    """SeLa-v2's hard pseudo-labels: Sinkhorn-Knopp equipartition of the
    whole (all ranks') memory bank's prototype scores, then the best
    prototype of each row (recipe: "Sinkhorn-Knopp equipartition of the
    whole memory bank's prototype scores into hard pseudo-labels").

    With ``S = bank @ prototypes.T`` over all ranks' rows (``N x K``), this is
    the release's ``distributed_sinkhorn`` (:func:`swav_vissl_plugin.sinkhorn.
    sinkhorn_knopp`) run on the whole bank: ``Q = exp(S / epsilon).T``
    normalised ``iterations`` times per prototype (rows, sums all-reduced)
    then per sample (columns); the label of row ``b`` is ``argmax_k Q[k, b]``
    (the first maximum on ties). Written as ``Q = diag(a) P diag(c)``, the
    last column normalisation does not change a column's argmax, so the
    label is ``argmax_k (S[b, k] + epsilon * log a_k)``.

    Bounded memory: ``S`` is never stored. Each pass recomputes the scores
    of ``chunk_size`` rows at a time (default :func:`chunk_rows`): one pass
    for the per-row maxima, one per iteration, one for the labels
    (``iterations + 2`` passes of ``2 N K D`` flops). Numerics as in
    :mod:`swav_vissl_plugin.sinkhorn`: each row's kernel is shifted by its own
    maximum and compensated in its starting column scale, the prototype
    scales are rescaled to max 1, work is in float32 (float64 stays float64).

    Args:
        bank: ``(N_local, D)`` this rank's memory-bank rows.
        prototypes: ``(K, D)`` prototype vectors (the same on every rank).
        epsilon: entropic regularisation (> 0).
        iterations: Sinkhorn iterations (>= 1).
        chunk_size: rows per chunk.
        distributed: see the module docstring.

    Returns:
        ``(N_local,)`` int64 labels in ``[0, K)``.
    """
    _check_bank(bank)
    _check_bank(prototypes, "prototypes")
    if prototypes.shape[1] != bank.shape[1]:
        raise ValueError(
            f"prototypes of dimension {prototypes.shape[1]} for a bank of dimension {bank.shape[1]}"
        )
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    on = distributed_is_on(distributed)
    dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
    n, k = bank.shape[0], prototypes.shape[0]
    device = bank.device
    eps = float(epsilon)
    tiny = torch.finfo(dtype).tiny
    step = chunk_rows(k, chunk_size)
    weights_t = prototypes.detach().to(device=device, dtype=dtype).t()
    buffer = _score_buffer(n, step, k, dtype, device)  # one (C, K) workspace for every pass

    def scores(start: int, stop: int) -> Tensor:
        out = buffer[: stop - start]
        return torch.mm(bank[start:stop].to(dtype), weights_t, out=out)

    # Pass 1: per-row maxima m_b and the global maximum M.
    row_max = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        torch.amax(scores(start, stop), dim=1, out=row_max[start:stop])
    global_max = row_max.max() if n > 0 else torch.tensor(float("-inf"), dtype=dtype, device=device)
    global_max = global_max.reshape(1).clone()
    if on:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)

    # Kernel of a chunk: exp((S_b - m_b) / eps), every row has an entry 1.
    def kernel(start: int, stop: int) -> Tensor:
        s = scores(start, stop)
        s.sub_(row_max[start:stop].unsqueeze(1)).div_(eps).exp_()
        return s

    # Column scales start at c_b = exp((m_b - M) / eps): the shift compensated.
    col_scale = (row_max - global_max).div_(eps).exp_()
    floor_sample = tiny ** 0.5
    proto_scale = None
    for it in range(int(iterations)):
        proto_sums = torch.zeros(k, dtype=dtype, device=device)
        for start in range(0, n, step):
            stop = min(start + step, n)
            kern = kernel(start, stop)
            if it > 0:
                # c = 1 / (P.T a): per-sample normalisation, local.
                col_scale[start:stop] = torch.mv(kern, proto_scale).clamp_(min=floor_sample).reciprocal_()
            proto_sums.add_(torch.mv(kern.t(), col_scale[start:stop]))
        if on:
            dist.all_reduce(proto_sums)
        proto_sums.clamp_(min=tiny)
        # a = 1 / (P c), rescaled to max 1 (a common factor changes nothing).
        proto_scale = torch.reciprocal(proto_sums).mul_(proto_sums.min())

    # Labels: argmax_k (S_bk + eps * log a_k).
    bias = proto_scale.log().mul_(eps)
    labels = torch.empty(n, dtype=torch.long, device=device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        torch.argmax(scores(start, stop).add_(bias), dim=1, out=labels[start:stop])
    return labels


@torch.no_grad()
def gather_labels(
    labels: Tensor,
    indices: Tensor,
    num_samples: int,
    *,
    distributed: Optional[bool] = None,
) -> Tensor:
    """The full-dataset label table from every rank's bank labels.

    ``table[indices_r[i]] = labels_r[i]`` for every rank ``r`` (all-gathered;
    ranks may hold different numbers of rows), every other entry
    :data:`IGNORE_LABEL`. An index held twice keeps one of its labels.

    Args:
        labels: ``(N_local,)`` int labels of this rank's bank rows.
        indices: ``(N_local,)`` their dataset indices, in ``[0, num_samples)``.
        num_samples: dataset size.

    Returns:
        ``(num_samples,)`` int64 on ``labels``' device, the same on every rank.
    """
    if labels.shape != indices.shape or labels.dim() != 1:
        raise ValueError(
            f"labels {tuple(labels.shape)} and indices {tuple(indices.shape)} must be "
            "1-d of one length"
        )
    on = distributed_is_on(distributed)
    device = labels.device
    labels = labels.to(torch.long)
    indices = indices.to(device=device, dtype=torch.long)
    if on:
        world = dist.get_world_size()
        size = torch.tensor([labels.numel()], dtype=torch.long, device=device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s) for s in sizes))
        both = torch.full((2, longest), -1, dtype=torch.long, device=device)
        both[0, : labels.numel()] = labels
        both[1, : labels.numel()] = indices
        gathered = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(gathered, both)
        labels = torch.cat([g[0, : int(s)] for g, s in zip(gathered, sizes)])
        indices = torch.cat([g[1, : int(s)] for g, s in zip(gathered, sizes)])
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        raise ValueError(
            f"dataset indices must be in [0, {num_samples}), got "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    table = torch.full((int(num_samples),), IGNORE_LABEL, dtype=torch.long, device=device)
    table[indices] = labels
    return table
