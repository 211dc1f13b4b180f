"""Plain references of DeepCluster-v2 / SeLa-v2, for the tests.

Written from the recipe text (docs/deepcluster_sela.md, from the model
zoo's "DeepCluster-v2 and SeLa-v2 rows"); it does NOT import the
plugin. Float64, a Python loop over clusters and over samples where that is
the plainest reading. Slow on purpose: clarity over speed.
"""

from typing import List, Sequence

import torch


def kmeans_plain(bank: torch.Tensor, init: torch.Tensor, iterations: int):
    """Spherical k-means: ``iterations`` times (assign every row to the
    centroid with the largest dot product; each cluster with members: the
    mean of its members, L2-normalised; an empty cluster keeps its centroid),
    then a final assignment. Returns (centroids, labels, objective per
    assignment step) with objective = 1 - mean best dot product."""
    x = bank.double()
    c = init.double().clone()
    objective = []
    labels = None
    for it in range(iterations + 1):
        dots = x @ c.t()
        best, labels = dots.max(dim=1)
        objective.append(1.0 - best.mean().item())
        if it == iterations:
            break
        new = c.clone()
        for k in range(c.shape[0]):
            members = x[labels == k]
            if len(members) > 0:
                mean = members.mean(dim=0)
                new[k] = mean / mean.norm()
        c = new
    return c, labels, objective


def sinkhorn_hard_labels_plain(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SeLa-v2's labels: the release's Sinkhorn-Knopp verbatim in float64
    (Q = exp(s / eps).T; Q /= sum(Q); iterations x (rows /= row sums, /= K;
    columns /= column sums, /= B)), then each sample's best prototype."""
    q = torch.exp(scores.double() / epsilon).t()  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return q.argmax(dim=0)


def cluster_loss_plain(
    heads: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    image_ids: Sequence[int],
    num_crops: int,
    temperature: float,
) -> torch.Tensor:
    """mean over heads of the mean over (crop, image) pairs whose image has a
    label (!= -100) of -log softmax(scores[row] / temperature)[label[image]];
    rows are crop-major (row p*B+i is crop p of image i)."""
    batch = len(image_ids)
    per_head: List[torch.Tensor] = []
    for scores, table in zip(heads, labels):
        terms = []
        for p in range(num_crops):
            for i, image in enumerate(image_ids):
                target = int(table[image])
                if target == -100:
                    continue
                logp = torch.log_softmax(scores[p * batch + i].double() / temperature, dim=0)
                terms.append(-logp[target])
        per_head.append(torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64))
    return torch.stack(per_head).mean()
