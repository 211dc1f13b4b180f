"""A plain PyTorch DeepCluster-v2 training loop, independent of the plugin and of VISSL.

Written from the paper's description and the recipe text (docs/recipe.md,
docs/deepcluster_sela.md; docs/small_data.md for the small-image values): a
memory bank of the L2-normalised embeddings of the ``crops_for_assign``
views, filled by one pass before the first epoch and refreshed by every
training step; at the start of every epoch, for each head, spherical k-means
on the bank (centroids started from random bank rows, ``kmeans_iterations``
assignment/mean steps, an empty cluster keeps its centroid, then one last
assignment) whose centroids become the head's prototypes and whose
assignments become the epoch's pseudo-labels; the loss is, for each head,
the cross-entropy of every crop's scores / temperature against its image's
label, averaged over heads. The prototypes are never trained. Data
pipeline, trunk, LARC and schedule are those of ``tests/plain_swav.py``
(also independent of the plugin); this file adds only the clustering, the
bank and the loss, so a defect in the plugin's DeepCluster-v2 path shows as
a gap between the two runs in ``tests/test_learning_guard.py``.

    python tests/plain_deepcluster.py --train FOLDER --val FOLDER [--set KEY=JSON ...]

prints one JSON line per epoch (loss, kNN top-1, empty clusters) and a final
JSON line with the kNN and linear-probe top-1 and the clusters in use on
``--val``.
"""

import math
import sys
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plain_swav import RECIPE as SWAV_RECIPE
from plain_swav import SwAVNet, end_epoch, finish, larc_sgd_step, prepare, run_cli

# The small-image DeepCluster-v2 recipe (docs/small_data.md): the small-image
# SwAV recipe's data, model, optimizer and schedule, DeepCluster-v2's loss.
# Written out rather than read from the plugin's YAML so that a wrong value
# there shows as a gap.
RECIPE: Dict[str, object] = {
    **{k: v for k, v in SWAV_RECIPE.items()
       if k not in ("epsilon", "sinkhorn_iterations", "freeze_prototypes_niters", "nmb_prototypes")},
    "nmb_prototypes": (100, 100, 100),
    "kmeans_iterations": 10,
    "temperature": 0.1,
    "crops_for_assign": (0, 1),
}


class IndexedMultiCrop(torch.utils.data.Dataset):
    """``(index, crops)`` of each image: the bank is addressed by dataset index."""

    def __init__(self, images, pipes):
        self.images, self.pipes = images, pipes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return i, [p(self.images[i]) for p in self.pipes]


class DeepClusterNet(SwAVNet):
    """plain_swav's trunk and head (``embed``); one prototype layer per head."""

    def __init__(self, widths: Sequence[int], hidden: int, dim: int, ks: Sequence[int]):
        super().__init__(widths, hidden, dim, ks[0])
        del self.prototypes
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in ks)


@torch.no_grad()
def spherical_kmeans(bank: torch.Tensor, k: int, iterations: int, generator: torch.Generator):
    """Centroids ``(k, D)`` (unit norm) and assignments ``(N,)`` of the bank rows."""
    centroids = bank[torch.randperm(len(bank), generator=generator)[:k]].clone()
    for it in range(iterations + 1):
        labels = (bank @ centroids.t()).argmax(dim=1)
        if it == iterations:
            break
        sums = torch.zeros_like(centroids).index_add_(0, labels, bank)
        counts = torch.bincount(labels, minlength=k)
        full = counts > 0
        centroids[full] = F.normalize(sums[full] / counts[full].unsqueeze(1).to(bank.dtype), dim=1)
    return centroids, labels


def train(train_dir: Path, val_dir: Path, recipe: Dict[str, object], seed: int = 0,
          workers: int = 1, log=print) -> Dict[str, object]:
    r = {**RECIPE, **recipe}
    data = prepare(train_dir, val_dir, r, seed, workers, dataset=IndexedMultiCrop)
    loader = data["loader"]
    ks = [int(k) for k in r["nmb_prototypes"]]
    model = DeepClusterNet(r["widths"], int(r["hidden_mlp"]), int(r["feat_dim"]), ks)
    model = model.to(memory_format=torch.channels_last)
    trained = [p for name, p in model.named_parameters() if not name.startswith("heads.")]
    opt = torch.optim.SGD(trained, lr=0.0, momentum=0.9)
    assign = [int(c) for c in r["crops_for_assign"]]
    n_crops, ipe, bs = sum(r["nmb_crops"]), len(loader), int(r["batch_size"])
    kmeans_gen = torch.Generator().manual_seed(seed)

    # The bank: one row per image, for each crop of crops_for_assign; filled
    # by a pass in train mode before the first epoch.
    bank = torch.zeros(len(assign), data["n_train"], int(r["feat_dim"]))
    with torch.no_grad():
        for idx, crops in loader:
            for j, c in enumerate(assign):
                bank[j, idx] = model.embed([crops[c]])

    it, history = 0, []
    for epoch in range(int(r["epochs"])):
        labels, empty = [], []
        with torch.no_grad():
            for h, k in enumerate(ks):
                centroids, lab = spherical_kmeans(bank[h % len(assign)], k, int(r["kmeans_iterations"]), kmeans_gen)
                model.heads[h].weight.copy_(centroids)
                labels.append(lab)
                empty.append(int((torch.bincount(lab, minlength=k) == 0).sum()))
        losses = []
        for idx, crops in loader:
            z = model.embed(crops)
            loss = sum(
                F.cross_entropy(head(z) / float(r["temperature"]), labels[h][idx].repeat(n_crops))
                for h, head in enumerate(model.heads)
            ) / len(ks)
            with torch.no_grad():
                for j, c in enumerate(assign):
                    bank[j, idx] = z[c * bs:(c + 1) * bs].detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            larc_sgd_step(opt, trained, r, it, ipe)
            losses.append(loss.item())
            it += 1
        end_epoch(model.trunk, data, history, log, epoch=epoch, loss=float(np.mean(losses)),
                  last_loss=losses[-1], ln_k=math.log(ks[0]), empty_clusters=empty)
    return finish(model, model.heads[0].weight.detach(), data, history, r)


def main(argv: Sequence[str] = None) -> int:
    return run_cli(argv, __doc__, RECIPE, train)


if __name__ == "__main__":
    sys.exit(main())
