"""An independent, deliberately plain reference of SwAV, for the tests.

Written from the recipe text (``docs/recipe.md``) and the
SwAV release's description of Sinkhorn-Knopp; it does NOT import the plugin.
Everything is float64, with one log_softmax per (assign crop, other crop) pair
and a list-based queue. Slow on purpose: clarity over speed.
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


def sinkhorn_plain(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The release's Sinkhorn-Knopp, verbatim in float64 (no max shift, no
    guards): Q = exp(s / eps).T; Q /= sum(Q); iterations x (rows /= row sums,
    /= K; columns /= column sums, /= B); return (Q * B).T."""
    q = torch.exp(scores.detach().double() / epsilon).t()  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / b
    q = q * b
    return q.t()


def head_loss_plain(
    scores: torch.Tensor,
    num_crops: int,
    crops_for_assign: Sequence[int],
    temperature: float,
    epsilon: float,
    iterations: int,
    queue_scores: Optional[Sequence[torch.Tensor]] = None,
    codes_out: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """SwAV loss of one head, float64, pair by pair.

    For each assign crop: codes = Sinkhorn(cat(queue scores, crop scores))[-B:]
    (queue rows first) or Sinkhorn(crop scores); then the mean over the other
    crops of the mean over samples of -sum_k codes * log_softmax(s_p / T);
    then the mean over assign crops. ``scores`` may require grad (any dtype:
    it is converted to float64 inside the graph).
    """
    s64 = scores.double()
    batch = s64.shape[0] // num_crops
    total = 0.0
    for i, crop in enumerate(crops_for_assign):
        with torch.no_grad():
            target_scores = s64[crop * batch:(crop + 1) * batch].detach()
            if queue_scores is not None:
                target_scores = torch.cat([queue_scores[i].double(), target_scores])
            codes = sinkhorn_plain(target_scores, epsilon, iterations)[-batch:]
        if codes_out is not None:
            codes_out.append(codes)
        subloss = 0.0
        for p in range(num_crops):
            if p == crop:
                continue
            log_p = F.log_softmax(s64[p * batch:(p + 1) * batch] / temperature, dim=1)
            subloss = subloss - torch.mean(torch.sum(codes * log_p, dim=1))
        total = total + subloss / (num_crops - 1)
    return total / len(crops_for_assign)


def loss_plain(
    heads: Sequence[torch.Tensor],
    num_crops: int,
    crops_for_assign: Sequence[int],
    temperature: float,
    epsilon: float,
    iterations: int,
    queue_scores_per_head: Optional[Sequence[Sequence[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Mean over prototype heads of :func:`head_loss_plain`."""
    losses = []
    for h, scores in enumerate(heads):
        queue_scores = None if queue_scores_per_head is None else queue_scores_per_head[h]
        losses.append(
            head_loss_plain(
                scores, num_crops, crops_for_assign, temperature, epsilon, iterations, queue_scores
            )
        )
    return sum(losses) / len(losses)


class QueueSim:
    """The release's queue as Python lists: per assign crop, a list of
    embedding rows, newest first, at most ``length`` of them. It exists from
    ``start()`` on, is used only when it holds ``length`` rows."""

    def __init__(self, num_assign: int, length: int):
        self.num_assign = num_assign
        self.length = length
        self.rows: Optional[List[List[torch.Tensor]]] = None

    def start(self) -> None:
        if self.rows is None:
            self.rows = [[] for _ in range(self.num_assign)]

    @property
    def full(self) -> bool:
        return self.rows is not None and all(len(r) >= self.length for r in self.rows)

    def scores(self, weights: torch.Tensor) -> List[torch.Tensor]:
        """Each crop's queue scored with the given (current) prototypes."""
        out = []
        for rows in self.rows:
            out.append(torch.stack([row.double() @ weights.double().t() for row in rows]))
        return out

    def push(self, embeddings: torch.Tensor, crops_for_assign: Sequence[int], num_crops: int) -> None:
        if self.rows is None:
            return
        batch = embeddings.shape[0] // num_crops
        for i, crop in enumerate(crops_for_assign):
            new = [embeddings[crop * batch + j].detach().clone() for j in range(batch)]
            self.rows[i] = (new + self.rows[i])[: self.length]

    def as_tensor(self, dim: int) -> torch.Tensor:
        """The queue as (num_assign, length, dim), zero rows where unfilled."""
        out = torch.zeros(self.num_assign, self.length, dim, dtype=torch.float64)
        for i, rows in enumerate(self.rows):
            for j, row in enumerate(rows):
                out[i, j] = row.double()
        return out


def simulate(
    iterations_data,
    num_crops: int,
    crops_for_assign: Sequence[int],
    temperature: float,
    epsilon: float,
    sinkhorn_iterations: int,
    queue_length: int,
    start_iteration: int,
):
    """Run the plain loss with the plain queue over a list of iterations.

    ``iterations_data``: list of (embeddings, [scores per head], [weights per
    head]). The queue is started before iteration ``start_iteration``. Returns
    a list of (loss, queue_used) per iteration and the final QueueSim.
    """
    sim = QueueSim(len(crops_for_assign), queue_length)
    results = []
    for it, (emb, heads, weights) in enumerate(iterations_data):
        if it == start_iteration and queue_length > 0:
            sim.start()
        used = sim.full
        queue_scores = [sim.scores(w) for w in weights] if used else None
        loss = loss_plain(
            heads, num_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations, queue_scores
        )
        sim.push(emb, crops_for_assign, num_crops)
        results.append((loss, used))
    return results, sim
