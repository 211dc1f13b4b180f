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

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ScoreProduct",
    "SinkhornWorkspace",
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


#: Upper bound (elements) of one block of the kernel that is built and then
#: swept while it is still in cache (see :func:`_sinkhorn`): 2**18 float32
#: values = 1 MiB, one core's L2 on the development machine.
_BLOCK_ELEMENTS = 1 << 18


def _row_blocks(sizes: Sequence[int], num_k: int):
    """(part index, first row in part, last row in part, first global row)
    for blocks of at most ``_SUM_BLOCK`` and about ``_BLOCK_ELEMENTS / K``
    rows (at least 16) over parts of ``sizes`` rows, in row order."""
    step = max(16, min(_SUM_BLOCK, _BLOCK_ELEMENTS // max(num_k, 1)))
    blocks = []
    offset = 0
    for index, rows in enumerate(sizes):
        for a in range(0, rows, step):
            b = min(a + step, rows)
            blocks.append((index, a, b, offset + a))
        offset += rows
    return blocks


class ScoreProduct(NamedTuple):
    """Scores ``embeddings @ weights.T`` that :func:`sinkhorn_codes` computes
    block by block of rows inside Sinkhorn-Knopp, so that the ``(L, K)``
    matrix (a queue's scores: 3840 x 3000 in the recipe) is never
    materialised. The product is computed in the embeddings' dtype."""

    embeddings: Tensor  # (L, D)
    weights: Tensor  # (K, D)


class SinkhornWorkspace:
    """A reusable buffer for the ``rows x K`` kernel of Sinkhorn-Knopp.

    On CPU every fresh tensor above glibc's mmap threshold (32 MiB at most)
    is page-faulted in again on each call, which costs as much as an ``exp``
    over it; a loss that runs every iteration keeps one of these (grown as
    needed, never shrunk) and passes it to :func:`sinkhorn_codes`. The
    buffer's content is scratch: nothing returned aliases it."""

    def __init__(self) -> None:
        self._buffer: Optional[Tensor] = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = rows * cols
        buf = self._buffer
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = self._buffer = None  # free before allocating the larger one
            buf = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(rows, cols)

    def clear(self) -> None:
        self._buffer = None

    @property
    def nbytes(self) -> int:
        buf = self._buffer
        return 0 if buf is None else buf.numel() * buf.element_size()


def _part_dtype(part) -> torch.dtype:
    return part.embeddings.dtype if isinstance(part, ScoreProduct) else part.dtype


def _part_shape(part) -> "tuple[int, int]":
    if isinstance(part, ScoreProduct):
        return int(part.embeddings.shape[0]), int(part.weights.shape[0])
    return int(part.shape[0]), int(part.shape[1])


def _part_rows(part, a: int, b: int) -> Tensor:
    if isinstance(part, ScoreProduct):
        return torch.mm(part.embeddings[a:b], part.weights.t())
    return part[a:b]


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
    return _sinkhorn_parts([scores], epsilon, iterations, distributed, keep_last)


def _sinkhorn_parts(
    parts: Sequence,
    epsilon: float,
    iterations: int,
    distributed: bool,
    keep_last: Optional[int] = None,
    workspace: Optional[SinkhornWorkspace] = None,
) -> Tensor:
    """:func:`_sinkhorn` on the row-wise concatenation of ``parts`` (score
    tensors or :class:`ScoreProduct`, e.g. a queue's then the batch's),
    without materialising it.

    Same arithmetic as the algorithm of the module docstring, organised for
    memory traffic: the kernel ``P = exp((s - m_b) / epsilon)`` is built
    block by block of rows (each block's scores, maximum, shift, division and
    ``exp`` while it is in cache, and its contribution to the first
    per-prototype sums taken there), and each further iteration is a single
    sweep over the blocks that computes the block's column scales ``c = 1 /
    (P a)`` and at once its contribution ``P.T c`` to the next sums. The
    kernel is written once and read ``iterations - 1`` times (instead of a
    separate max pass, then two reads per iteration), and nothing else of
    size ``rows x K`` is allocated: the logits of the returned rows are
    recomputed at the end, after the kernel is released, block by block
    into the codes.

    In the first sums each block ``j`` uses ``c_b = exp((m_b - mu_j) / eps)``
    with ``mu_j`` the block's largest ``m_b``, and its sum is multiplied by
    ``exp((mu_j - M) / eps)`` once ``M`` (the global maximum) is known: the
    same ``c_b = exp((m_b - M) / eps)`` up to rounding. Prototype sums are
    accumulated per block (<= 256 samples) and then across blocks, as in
    :func:`_prototype_sums`.
    """
    num_k = _part_shape(parts[0])[1]
    dtype = _compute_dtype(_part_dtype(parts[0]))
    for part in parts[1:]:
        dtype = _compute_dtype(torch.promote_types(dtype, _part_dtype(part)))
    first_part = parts[0].embeddings if isinstance(parts[0], ScoreProduct) else parts[0]
    device = first_part.device
    sizes = [_part_shape(part)[0] for part in parts]
    n_local = sum(sizes)
    tiny = torch.finfo(dtype).tiny
    # Floor of the per-sample sums P.T a (a has max 1): no effect on ordinary
    # inputs, keeps c = 1 / (P.T a) and then P c finite on degenerate ones.
    floor_sample = tiny ** 0.5

    blocks = _row_blocks(sizes, num_k)
    if workspace is not None:
        kernel = workspace.get(n_local, num_k, dtype, device)
    else:
        kernel = torch.empty((n_local, num_k), dtype=dtype, device=device)  # P.T
    row_max = torch.empty((n_local,), dtype=dtype, device=device)
    partials, block_max = [], []

    def logits_of(block_scores: Tensor, g: int, n: int) -> Tensor:
        # (s - m_b) / epsilon <= 0, one max-1 entry per sample. Per-sample
        # maxima are in score units: (s - m) is exact near the maximum
        # (Sterbenz), so only the division by epsilon rounds (type promotion
        # gives the compute dtype directly for fp16/bf16 input).
        out = torch.sub(block_scores, row_max[g:g + n].unsqueeze(1))
        if out.dtype != dtype:
            out = out.to(dtype)
        return out.div_(epsilon)

    for index, a, b, g in blocks:
        n = b - a
        block_scores = _part_rows(parts[index], a, b)
        m = row_max[g:g + n]
        if block_scores.dtype == dtype:
            torch.amax(block_scores, dim=1, out=m)
        else:
            m.copy_(block_scores.amax(dim=1))
        k_blk = kernel[g:g + n]
        torch.exp(logits_of(block_scores, g, n), out=k_blk)
        del block_scores
        mu = m.max()
        block_max.append(mu)
        # c_b = exp(m_b - mu_j); the block's factor exp(mu_j - M) comes below
        partials.append(torch.mv(k_blk.t(), torch.sub(m, mu).div_(epsilon).exp_()))

    if blocks:
        block_max = torch.stack(block_max)
        global_max = block_max.max()
    else:
        global_max = torch.full((), float("-inf"), dtype=dtype, device=device)
    if distributed:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)

    proto_sums = None
    for it in range(iterations):
        if it == 0:
            if blocks:
                # the per-sample shift compensated: c_b = exp(m_b - M)
                factors = torch.sub(block_max, global_max).div_(epsilon).exp_()
                proto_sums = (torch.stack(partials) * factors.unsqueeze(1)).sum(dim=0)
            else:
                proto_sums = kernel.new_zeros((num_k,))
        else:
            # a = 1 / (K * P c), rescaled to max 1 (scale is irrelevant);
            # then per block: c = 1 / (B * P.T a) and its share of P c.
            proto_scale = torch.reciprocal(proto_sums).mul_(proto_sums.min())
            partials = []
            for _, a, b, g in blocks:
                k_blk = kernel[g:g + b - a]
                col = torch.mv(k_blk, proto_scale).clamp_(min=floor_sample).reciprocal_()
                partials.append(torch.mv(k_blk.t(), col))
            proto_sums = _sum_partials(partials, num_k, row_max)
        # Per-prototype sums of Q (the release's row sums), global.
        if distributed:
            dist.all_reduce(proto_sums, op=dist.ReduceOp.SUM)
        proto_sums.clamp_(min=tiny)
    # release the kernel (and the last block's view of it) before the codes
    k_blk = None
    del kernel, partials, k_blk

    # Last column normalisation and * B: softmax over prototypes of
    # logits + log a (with log a = -log(P c) up to a constant).
    # Row by row, so computed block by block into the output (no rows x K
    # logits besides it).
    keep = n_local if keep_last is None else max(0, min(int(keep_last), n_local))
    first = n_local - keep
    codes = torch.empty((keep, num_k), dtype=dtype, device=device)
    log_sums = proto_sums.log_()
    for index, a, b, g in blocks:
        if g + (b - a) <= first:
            continue
        skip = max(0, first - g)
        logits = logits_of(_part_rows(parts[index], a + skip, b), g + skip, b - a - skip)
        logits.sub_(log_sums)
        row = g + skip - first
        codes[row:row + logits.shape[0]] = torch.softmax(logits, dim=1)
    return codes


def _sum_partials(partials: List[Tensor], num_k: int, like: Tensor) -> Tensor:
    """Sum of per-block prototype sums (blocks first, then across blocks:
    the same two-level accumulation as :func:`_prototype_sums`)."""
    if not partials:
        return like.new_zeros((num_k,))
    if len(partials) == 1:
        return partials[0]
    return torch.stack(partials).sum(dim=0)


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
    for crop, target in zip(crops_for_assign, codes):
        if not 0 <= crop < num_crops:
            raise ValueError(f"assign crop {crop} not in [0, {num_crops})")
        if target.shape != (batch, num_k):
            raise ValueError(
                f"codes for crop {crop} have shape {tuple(target.shape)}, "
                f"expected {(batch, num_k)}"
            )
    with torch.autocast(device_type=scores.device.type, enabled=False):
        return _SwappedPrediction.apply(
            scores,
            float(temperature),
            int(num_crops),
            tuple(int(c) for c in crops_for_assign),
            *[c.detach() for c in codes],
        )


class _SwappedPrediction(torch.autograd.Function):
    """Forward and backward of :func:`swapped_prediction_loss` in a few fused
    passes over the ``(num_crops * B, K)`` scores.

    With ``S = sum_i codes_i`` and ``W_p = S - sum_{i: crop_i = p} codes_i``
    (the targets crop ``p`` is predicted against), the loss is
    ``-sum_p <W_p, log_softmax(s_p / T)> / n``, ``n = len(codes) *
    (num_crops - 1) * B``, computed as ``<S, sum_p logp_p> - sum_i <codes_i,
    logp_{crop_i}>`` (one log_softmax over all rows, one sum over crops).
    Its gradient is the log_softmax backward of ``G_p = -W_p / (n T)``,
    ``G - softmax * rowsum(G)``, one fused kernel, instead of autograd's
    chain (division, select/sum/mul backwards, gradient accumulation).
    Float32 (float64 stays float64) whatever the scores' dtype; the gradient
    is returned in the scores' dtype.
    """

    @staticmethod
    def forward(ctx, scores, temperature, num_crops, crops, *codes):
        dtype = _compute_dtype(scores.dtype)
        rows, num_k = scores.shape
        batch = rows // num_crops
        x = scores.detach()
        z = torch.div(x if x.dtype == dtype else x.to(dtype), temperature)
        log_probs = torch.log_softmax(z, dim=1)
        del z
        targets = [c if c.dtype == dtype else c.to(dtype) for c in codes]
        per_crop = log_probs.view(num_crops, batch, num_k)
        total = per_crop.sum(dim=0)  # (B, K): sum over all crops
        summed = targets[0] if len(targets) == 1 else torch.stack(targets).sum(dim=0)
        cross = torch.sum(summed * total)
        for crop, target in zip(crops, targets):
            # each assign crop is not predicted against its own codes
            cross = cross - torch.sum(target * per_crop[crop])
        norm = len(targets) * (num_crops - 1) * batch
        ctx.save_for_backward(log_probs, summed, *targets)
        ctx.temperature = temperature
        ctx.num_crops = num_crops
        ctx.crops = crops
        ctx.norm = norm
        ctx.scores_dtype = scores.dtype
        return -cross / norm

    @staticmethod
    def backward(ctx, grad_output):
        log_probs, summed, *targets = ctx.saved_tensors
        rows, num_k = log_probs.shape
        num_crops = ctx.num_crops
        batch = rows // num_crops
        # G_p = -W_p * grad / (n T): d loss / d log_softmax(z), with the
        # division by T of z = s / T folded in (the backward is linear in G).
        coef = grad_output.to(log_probs.dtype) / (ctx.norm * ctx.temperature)
        grad = torch.empty_like(log_probs)
        per_crop = grad.view(num_crops, batch, num_k)
        per_crop.copy_((summed * -coef).unsqueeze(0).expand(num_crops, batch, num_k))
        for crop, target in zip(ctx.crops, targets):
            per_crop[crop].add_(target * coef)
        grad = torch._log_softmax_backward_data(grad, log_probs, 1, log_probs.dtype)
        if grad.dtype != ctx.scores_dtype:
            grad = grad.to(ctx.scores_dtype)
        return (grad, None, None, None) + (None,) * len(targets)


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
    workspace: Optional[SinkhornWorkspace] = None,
) -> List[Tensor]:
    """The targets of :func:`swav_loss`: one ``(B, K)`` codes tensor per
    assign crop, the queue's scores (if any) prepended before Sinkhorn and
    only the batch's codes kept.

    A ``queue_scores`` entry may also be a :class:`ScoreProduct` (queue
    embeddings and prototype weights): its scores are then computed block by
    block inside Sinkhorn-Knopp and never stored. ``workspace``: an optional
    :class:`SinkhornWorkspace` reused for the kernel (same results)."""
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
            # The queue's rows come first; they are not concatenated with the
            # batch's (_sinkhorn_parts sweeps both), only the batch's codes
            # are computed at the end.
            if queued is None:
                parts = [crop_scores]
            elif isinstance(queued, ScoreProduct):
                emb = queued.embeddings.detach()
                parts = [ScoreProduct(emb, queued.weights.detach().to(emb.dtype)), crop_scores]
            else:
                parts = [queued.detach(), crop_scores]
            codes.append(
                _sinkhorn_parts(
                    parts,
                    float(epsilon),
                    int(sinkhorn_iterations),
                    on,
                    keep_last=batch if queued is not None else None,
                    workspace=workspace,
                )
            )
    return codes
