"""SwAV's math as plain functions: (distributed) Sinkhorn-Knopp and the swapped loss.

Nothing here depends on VISSL: only ``torch`` and ``torch.distributed``. The
VISSL loss (:mod:`swav_vissl_plugin.losses.swav`) only combines these
functions with its queue.

Recipe (``docs/recipe.md``, "Shared by all SwAV rows"): ``temperature 0.1``,
``epsilon 0.05``, ``sinkhorn_iterations 3``, ``crops_for_assign 0 1``;
queue (rows 5, 6, 14): the queue's prototype scores, computed with the current
prototypes, are prepended to the batch's before Sinkhorn and only the batch's
codes are kept.

Semantics of the SwAV release's ``distributed_sinkhorn`` (Caron et al. 2020)::

    Q = exp(scores / epsilon).T          # K x B, B = global number of samples
    Q /= sum(Q)                          # all-reduced
    repeat sinkhorn_iterations times:
        Q /= row_sums(Q); Q /= K         # per prototype, all-reduced over ranks
        Q /= col_sums(Q); Q /= B         # per sample, local
    codes = (Q * B).T                    # each sample's row sums to 1

How :func:`sinkhorn_knopp` computes exactly this, faster and without overflow:

* ``Q`` is always ``diag(a) P diag(c)`` with ``P = exp(scores / epsilon).T``.
  Normalising the rows sets ``a = 1 / (K * P c)`` whatever ``a`` was, and
  normalising the columns sets ``c = 1 / (B * P.T a)``. So each half-iteration
  is one matrix-vector product over ``P`` (read once, never rewritten), and
  the last column normalisation followed by ``* B`` is a row-wise softmax of
  ``scores / epsilon + log a`` over the prototypes.
* Scalar factors cancel exactly: scaling ``c`` by ``mu`` scales the next ``a``
  by ``1 / mu`` and the codes do not change. Hence the division by the total
  sum, by ``K``, by ``B`` and the final ``* B`` change nothing but rounding and
  are not performed; in particular no all-reduce of the total sum nor of the
  sample count is needed. The one all-reduce per iteration is that of the
  per-prototype sums ``P c`` (as in the release), plus one scalar MAX.
* Each sample's row of ``P`` is shifted by its own maximum (so every row keeps
  an entry 1 and no sample's row can underflow to zeros); the shift is
  compensated exactly by starting from ``c_b = exp(m_b - M)`` instead of a
  constant, with ``M`` the global (all-reduced MAX) maximum of
  ``scores / epsilon``: the release's "subtract the max", moved to where it
  cannot lose a sample.
* Work is in float32 (float64 stays float64) with autocast disabled; the
  denominators are clamped away from 0 and ``a`` is rescaled to max 1, so
  fp16/bf16 scores, and even scores of magnitude 30 with epsilon 0.05, give
  finite codes whose rows sum to 1. On ordinary inputs (``|scores| <= 1``,
  every ``exp`` within float32's range) the clamps do not engage and fp32
  codes match the float64 formula to ~1e-7. Beyond float32's exponent range
  (``|scores / epsilon|`` spreads over ~100) fp32 codes are a finite
  approximation; float64 scores are still computed exactly.
"""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "distributed_is_on",
    "sinkhorn_codes",
    "sinkhorn_knopp",
    "swapped_prediction_loss",
    "swav_loss",
]


def distributed_is_on(distributed: Optional[bool] = None) -> bool:
    """Resolve the ``distributed`` switch of the functions in this module.

    ``None`` means on when ``torch.distributed`` is initialised with a world
    size above 1; ``True`` requires an initialised process group.
    """
    if distributed is None:
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sinkhorn_knopp(distributed=True) needs an initialised "
            "torch.distributed process group"
        )
    return bool(distributed)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Samples per block of the per-prototype sums (see :func:`_prototype_sums`).
_SUM_BLOCK = 256


def _prototype_sums(kernel: Tensor, col_scale: Tensor) -> Tensor:
    """``kernel.T @ col_scale`` (sum over samples), accumulated in blocks.

    A plain ``mv`` accumulates thousands of samples in one running fp32 sum
    (error ~4e-7 on codes at B=16k); summing blocks of ``_SUM_BLOCK`` samples
    with one batched product and then adding the blocks pairwise keeps the
    error near 1e-7 at the same cost (one read of ``kernel``).
    """
    n, num_k = kernel.shape
    blocks = n // _SUM_BLOCK
    if blocks < 2:
        return torch.mv(kernel.t(), col_scale)
    main = blocks * _SUM_BLOCK
    sums = torch.bmm(
        col_scale[:main].view(blocks, 1, _SUM_BLOCK),
        kernel[:main].view(blocks, _SUM_BLOCK, num_k),
    ).sum(dim=0).view(num_k)
    if main < n:
        sums.add_(torch.mv(kernel[main:].t(), col_scale[main:]))
    return sums


def _sinkhorn(
    scores: Tensor,
    epsilon: float,
    iterations: int,
    distributed: bool,
    keep_last: Optional[int] = None,
) -> Tensor:
    """Body of :func:`sinkhorn_knopp`; ``keep_last=n`` returns only the last
    ``n`` samples' codes (the batch behind a queue) and skips the final
    softmax of the others."""
    n_local, num_k = scores.shape
    dtype = _compute_dtype(scores.dtype)
    tiny = torch.finfo(dtype).tiny
    # Floor of the per-sample sums P.T a (a has max 1): no effect on ordinary
    # inputs, keeps c = 1 / (P.T a) and then P c finite on degenerate ones.
    floor_sample = tiny ** 0.5

    # Per-sample maxima, in score units: (s - m) is exact near the maximum
    # (Sterbenz), so only the division by epsilon rounds.
    if n_local > 0:
        row_max = scores.amax(dim=1).to(dtype)
        global_max = row_max.max()
    else:
        row_max = scores.new_empty((0,), dtype=dtype)
        global_max = torch.full((), float("-inf"), dtype=dtype, device=scores.device)
    if distributed:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)

    # logits = (s - m_b) / epsilon <= 0, one max-1 entry per sample (type
    # promotion gives the compute dtype directly for fp16/bf16 input).
    logits = torch.sub(scores, row_max.unsqueeze(1))
    if logits.dtype != dtype:
        logits = logits.to(dtype)
    logits.div_(epsilon)
    kernel = torch.exp(logits)  # B x K, the transpose of the release's P

    # c_b = exp(m_b - M): the per-sample shift, compensated.
    col_scale = torch.sub(row_max, global_max).div_(epsilon).exp_()

    proto_sums = None
    for it in range(iterations):
        # Per-prototype sums of Q (the release's row sums), global.
        proto_sums = _prototype_sums(kernel, col_scale)
        if distributed:
            dist.all_reduce(proto_sums, op=dist.ReduceOp.SUM)
        proto_sums.clamp_(min=tiny)
        if it == iterations - 1:
            break
        # a = 1 / (K * P c), rescaled to max 1 (scale is irrelevant, see above).
        proto_scale = torch.reciprocal(proto_sums).mul_(proto_sums.min())
        # c = 1 / (B * P.T a), per sample, local.
        col_scale = torch.mv(kernel, proto_scale).clamp_(min=floor_sample).reciprocal_()
    del kernel

    # Last column normalisation and * B: softmax over prototypes of
    # logits + log a (with log a = -log(P c) up to a constant).
    if keep_last is not None:
        logits = logits[n_local - keep_last:] if keep_last > 0 else logits[:0]
    logits.sub_(proto_sums.log_())
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor,
    epsilon: float,
    iterations: int,
    *,
    distributed: Optional[bool] = None,
) -> Tensor:
    """Equipartitioned soft assignments (codes) of samples to prototypes.

    SwAV's Sinkhorn-Knopp, with exactly the semantics of the release's
    ``distributed_sinkhorn`` (see the module docstring): ``Q = exp(scores /
    epsilon).T``, divided by its total sum, then ``iterations`` times each
    prototype's row divided by its sum and by ``K``, each sample's column by
    its sum and by ``B``; finally ``Q * B`` transposed. Recipe
    (``docs/recipe.md``): ``epsilon 0.05``, ``sinkhorn_iterations 3``.

    Args:
        scores: ``(B, K)`` prototype scores of this rank's samples, any float
            dtype (fp16/bf16/fp32/fp64). Not modified.
        epsilon: entropic regularisation (> 0); smaller is sharper.
        iterations: number of (row, column) normalisation rounds (>= 1).
        distributed: all-reduce across ranks, so that on N ranks the codes
            equal those of one rank holding the concatenated global batch.
            ``None``: on when ``torch.distributed`` is initialised with a
            world size above 1. Every rank must call it (collectives).

    Returns:
        ``(B, K)`` codes, float32 (float64 for float64 input), each row summing
        to 1; always finite for finite scores. Computed under ``no_grad``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    on = distributed_is_on(distributed)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        return _sinkhorn(scores.detach(), float(epsilon), int(iterations), on)


def swapped_prediction_loss(
    scores: Tensor,
    codes: Sequence[Tensor],
    num_crops: int,
    crops_for_assign: Sequence[int],
    temperature: float,
) -> Tensor:
    """SwAV's swapped prediction loss for one prototype head.

    ``loss = mean_i mean_{p != crops_for_assign[i]} mean_b
    -sum_k codes[i][b, k] * log_softmax(scores_p[b] / temperature)[k]``.

    One log_softmax over the whole ``(num_crops * B, K)`` matrix, computed in
    float32 (float64 stays float64) even for fp16/bf16 scores; for each assign
    crop the other crops' log-probabilities are the sum over all crops minus
    its own, so there is no loop over crop pairs. Recipe: ``temperature 0.1``.

    Args:
        scores: ``(num_crops * B, K)``, crop-major (rows ``[c*B:(c+1)*B]`` are
            crop ``c``). Gradient flows into it.
        codes: ``codes[i]`` is the ``(B, K)`` target of crop
            ``crops_for_assign[i]``; treated as constants.
        num_crops: total crops per image (>= 2).
        crops_for_assign: crops whose codes are targets.
        temperature: softmax temperature (> 0).

    Returns:
        A scalar tensor (float32, or float64 for float64 scores).
    """
    if num_crops < 2:
        raise ValueError(f"num_crops must be >= 2, got {num_crops}")
    if len(codes) != len(crops_for_assign) or len(codes) == 0:
        raise ValueError(
            f"need one codes tensor per assign crop: {len(codes)} codes for "
            f"crops_for_assign={list(crops_for_assign)}"
        )
    rows, num_k = scores.shape
    if rows % num_crops != 0:
        raise ValueError(
            f"scores has {rows} rows, not a multiple of num_crops={num_crops}"
        )
    batch = rows // num_crops
    dtype = _compute_dtype(scores.dtype)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_probs = F.log_softmax(scores.to(dtype) / temperature, dim=1)
        log_probs = log_probs.view(num_crops, batch, num_k)
        total = log_probs.sum(dim=0)  # (B, K): sum over all crops
        loss = scores.new_zeros((), dtype=dtype)
        for crop, target in zip(crops_for_assign, codes):
            if not 0 <= crop < num_crops:
                raise ValueError(f"assign crop {crop} not in [0, {num_crops})")
            if target.shape != (batch, num_k):
                raise ValueError(
                    f"codes for crop {crop} have shape {tuple(target.shape)}, "
                    f"expected {(batch, num_k)}"
                )
            target = target.detach().to(dtype)
            # sum over the other crops = all crops - the assign crop itself
            cross = torch.sum(target * total) - torch.sum(target * log_probs[crop])
            loss = loss - cross
        return loss / (len(codes) * (num_crops - 1) * batch)


def swav_loss(
    scores: Tensor,
    num_crops: int,
    crops_for_assign: Sequence[int],
    temperature: float,
    epsilon: float,
    sinkhorn_iterations: int,
    queue_scores: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    distributed: Optional[bool] = None,
) -> Tensor:
    """SwAV loss of one prototype head: Sinkhorn codes, then swapped prediction.

    For each assign crop ``i`` (crop ``c = crops_for_assign[i]``) the codes are
    ``sinkhorn_knopp(cat([queue_scores[i], scores_c.detach()]))[-B:]`` when a
    queue is given (its rows first, only the batch's codes kept; recipe rows
    5, 6, 14), else ``sinkhorn_knopp(scores_c.detach())``; then
    :func:`swapped_prediction_loss`. Recipe: ``temperature 0.1``, ``epsilon
    0.05``, ``sinkhorn_iterations 3``.

    Args:
        scores: ``(num_crops * B, K)`` crop-major prototype scores.
        queue_scores: optional, one entry per assign crop: ``(L, K)`` scores
            of that crop's queue under the current prototypes, or ``None``.
        distributed: passed to :func:`sinkhorn_knopp`.
    """
    codes = sinkhorn_codes(
        scores,
        num_crops,
        crops_for_assign,
        epsilon,
        sinkhorn_iterations,
        queue_scores,
        distributed=distributed,
    )
    return swapped_prediction_loss(
        scores, codes, num_crops, crops_for_assign, temperature
    )


@torch.no_grad()
def sinkhorn_codes(
    scores: Tensor,
    num_crops: int,
    crops_for_assign: Sequence[int],
    epsilon: float,
    sinkhorn_iterations: int,
    queue_scores: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    distributed: Optional[bool] = None,
) -> List[Tensor]:
    """The targets of :func:`swav_loss`: one ``(B, K)`` codes tensor per
    assign crop, the queue's scores (if any) prepended before Sinkhorn and
    only the batch's codes kept."""
    rows = scores.shape[0]
    if num_crops < 1 or rows % num_crops != 0:
        raise ValueError(
            f"scores has {rows} rows, not a multiple of num_crops={num_crops}"
        )
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if sinkhorn_iterations < 1:
        raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
    if queue_scores is not None and len(queue_scores) != len(crops_for_assign):
        raise ValueError(
            f"{len(queue_scores)} queue_scores for {len(crops_for_assign)} assign crops"
        )
    batch = rows // num_crops
    on = distributed_is_on(distributed)
    codes = []
    with torch.autocast(device_type=scores.device.type, enabled=False):
        for i, crop in enumerate(crops_for_assign):
            if not 0 <= crop < num_crops:
                raise ValueError(f"assign crop {crop} not in [0, {num_crops})")
            crop_scores = scores[crop * batch:(crop + 1) * batch].detach()
            queued = None if queue_scores is None else queue_scores[i]
            if queued is not None:
                dtype = _compute_dtype(
                    torch.promote_types(queued.dtype, crop_scores.dtype)
                )
                crop_scores = torch.cat(
                    [queued.detach().to(dtype), crop_scores.to(dtype)]
                )
            codes.append(
                _sinkhorn(
                    crop_scores,
                    float(epsilon),
                    int(sinkhorn_iterations),
                    on,
                    keep_last=batch if queued is not None else None,
                )
            )
    return codes
