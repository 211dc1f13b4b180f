"""DeepCluster-v2 and SeLa-v2 losses for VISSL, registered as
``deepclusterv2_plugin_loss`` and ``selav2_plugin_loss``.

Recipe (docs/deepcluster_sela.md, from the paper's "DeepCluster-v2 and SeLa-v2
rows"): "Each epoch first clusters the memory bank (the embeddings of the
crops_for_assign views from the previous epoch; filled by one pass before
epoch 0), then trains with cross-entropy between every crop's prototype
scores / temperature and the image's cluster id, averaged over the heads.
Head h clusters the memory bank of crop (h mod 2)."

The loss owns the state of the method:

* the memory bank of this rank: for each crop of ``crops_for_assign`` the
  ``(L, D)`` embeddings of the images this rank saw in the previous epoch,
  and their ``(L,)`` dataset indices (``data_idx`` from VISSL's data
  pipeline). Every forward writes the batch's embeddings (detached) at the
  current position; :meth:`ClusterMemoryLoss.cluster` (epoch start) rewinds
  the position;
* the label table ``(n_heads, num_train_samples)``: the cluster id of every
  dataset index, :data:`~swav_vissl_plugin.clustering.IGNORE_LABEL` (-100)
  for an index that no rank's bank holds (ignored by the cross-entropy, as in
  the release).

What runs when is decided by :mod:`swav_vissl_plugin.cluster_hooks`: the
memory-bank fill pass before epoch 0, :meth:`cluster` at every epoch start
(DeepCluster-v2: k-means whose centroids are copied into the head's
prototype layers; SeLa-v2: Sinkhorn labels from the learned prototypes), and
:meth:`set_indices` before every loss call.

Config (``LOSS.<name>``; filled/checked by the registered config inference):

=============================  ===================================================
``num_crops``                  total crops per image (from SwavPluginMultiCrop)
``crops_for_assign``           crops whose embeddings fill the bank, ``[0, 1]``
``temperature``                softmax temperature of the loss, 0.1
``nmb_prototypes``             clusters per head (from swav_plugin_head),
                               ``[3000, 3000, 3000]``
``feat_dim``                   embedding size (from swav_plugin_head), 128
``num_train_samples``          dataset size (VISSL fills it), label-table length
``chunk_size``                 bank rows scored at once; null = 2**24 / K
``freeze_prototypes_niters``   consumed by the hooks
``kmeans_iterations``          DeepCluster-v2 only, 10
``epsilon``                    SeLa-v2 only, 0.05
``sinkhorn_iterations``        SeLa-v2 only, 10
=============================  ===================================================

Checkpoints: VISSL saves ``task.loss.state_dict()`` from rank 0 only and
loads it on every rank. So that each rank gets its own bank back, rank 0
keeps a CPU copy of all ranks' banks: every bank write is all-gathered (one
collective of ``world x n_assign x B x D`` floats per iteration) and rank 0
stores it. The state holds ``memory_embeddings (R, n_assign, L, D)``,
``memory_index (R, L)``, ``memory_filled (R,)``, ``memory_ranks (R,)`` (the
ranks held: all on rank 0, the own rank elsewhere), ``world_size``,
``memory_position`` and ``labels``: tensors, ints and None only, loadable
with ``torch.load(weights_only=True)``. ``get_classy_state`` returns ``{}``
so that the bank is not written a second time inside the task state.

Resuming on another world size (``docs/world_size.md``): :func:`reshard_bank`
deals the saved banks out to the new ranks, every row keeping its dataset
index, so the next clustering sees the same images; the label table (by
dataset index) is kept as is. A bank of another number of assign crops or
embedding size, or a label table of other heads or another dataset size,
cannot be used: loading it raises
:class:`~swav_vissl_plugin.config.ConfigError` naming the key.
"""

import logging
import numbers
import pprint
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from classy_vision.losses import ClassyLoss, register_loss
from torch import Tensor

from swav_vissl_plugin.config import ConfigError
from swav_vissl_plugin.losses.swav import _cfg_get, _world
from swav_vissl_plugin.clustering import (
    IGNORE_LABEL,
    gather_labels,
    sinkhorn_labels,
    spherical_kmeans,
)

__all__ = ["ClusterMemoryLoss", "DeepClusterV2PluginLoss", "SeLaV2PluginLoss", "BankLayout", "reshard_bank"]

DEEPCLUSTER_V2 = "deepclusterv2_plugin_loss"
SELA_V2 = "selav2_plugin_loss"

_STATE_KEYS = (
    "memory_embeddings",
    "memory_index",
    "memory_filled",
    "memory_ranks",
    "memory_position",
    "world_size",
    "labels",
)
#: Optional state entry, set by ``world_size.adapt_checkpoint`` on a resume on
#: another world size: the bank rows each rank writes per epoch from now on.
RESHARD_ROWS_KEY = "reshard_rows_per_rank"


class BankLayout(NamedTuple):
    """Every rank's memory bank, as :func:`reshard_bank` returns it."""

    embeddings: Tensor  # (W, n_assign, L, D)
    indices: Tensor  # (W, L), -1 past ``filled``
    filled: Tensor  # (W,) rows [0, filled) hold embeddings
    position: Tensor  # (W,) the next row each rank writes
    duplicates: int  # rows dropped: another row of the same dataset index is kept
    superseded: int  # previous-epoch rows dropped: the image was embedded this epoch
    over_capacity: int  # rows dropped: more than a rank writes per epoch


def _last_occurrence(values: Tensor) -> Tensor:
    """Mask keeping, of every value, its last occurrence."""
    n = values.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if n:
        _, inverse = torch.unique(values, return_inverse=True)
        last = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long)
        last.scatter_reduce_(0, inverse, torch.arange(n), reduce="amax")
        keep[last] = True
    return keep


def reshard_bank(
    embeddings: Tensor,
    indices: Tensor,
    filled: Tensor,
    position: int,
    world_size: int,
    rows_per_rank: Optional[int] = None,
    min_rows: int = 0,
) -> BankLayout:
    """Every rank's memory bank restated for ``world_size`` ranks.

    A bank row is one image's embedding, attached to its dataset index; rank
    ``r`` holds rows ``[0, filled[r])``, of which ``[0, position)`` were
    written this epoch ("current") and the rest in the previous one.

    * At an epoch's end (``position >= filled`` everywhere) all rows are
      current; of a dataset index held twice (the sampler pads the last
      batches with repeated images) the later row is kept.
    * Inside an epoch, the current rows go first on every new rank (the
      rest of the epoch overwrites the rows after them, as on the old
      ranks): the ``C`` current rows must split evenly, ``position' = C /
      world_size``. Previous-epoch rows follow, except those of an image
      already embedded this epoch.

    Rows are dealt out position by position (global row ``g`` to rank ``g %
    world_size``), at most ``rows_per_rank`` per rank when given (the rows a
    rank writes per epoch, so that no row outlives an epoch unwritten). Each
    new bank has ``max(ceil(W * L / world_size), min_rows, rows_per_rank,
    rows held)`` rows.
    """
    old_world, n_assign, old_size, dim = embeddings.shape
    filled = filled.to(torch.long).clamp(0, old_size)
    current = filled.clamp(max=max(int(position), 0))
    inside_epoch = bool((current < filled).any())
    pos = torch.arange(old_size).unsqueeze(1)
    by_position = embeddings.permute(2, 0, 1, 3)  # (L, W, n, D): row g = position * W + rank
    index_by_position = indices.to(torch.long).t()
    valid = index_by_position >= 0
    cur_mask = (pos < current.unsqueeze(0)) & valid
    old_mask = (pos >= current.unsqueeze(0)) & (pos < filled.unsqueeze(0)) & valid
    cur_e, cur_i = by_position[cur_mask], index_by_position[cur_mask]
    old_e, old_i = by_position[old_mask], index_by_position[old_mask]

    duplicates = 0
    if not inside_epoch:
        keep = _last_occurrence(cur_i)
        duplicates += int((~keep).sum())
        cur_e, cur_i = cur_e[keep], cur_i[keep]
    superseded = torch.isin(old_i, cur_i)
    old_e, old_i = old_e[~superseded], old_i[~superseded]
    keep = _last_occurrence(old_i)
    duplicates += int((~keep).sum())
    old_e, old_i = old_e[keep], old_i[keep]
    if inside_epoch and cur_i.numel() % world_size:
        raise ConfigError(
            f"the memory bank was saved inside an epoch, after {int(position)} rows on each of "
            f"{old_world} ranks: its {cur_i.numel()} rows of this epoch do not split evenly over "
            f"{world_size} ranks; resume from the epoch's phase checkpoint"
        )

    shares, over = [], 0
    for r in range(world_size):
        ce, ci = cur_e[r::world_size], cur_i[r::world_size]
        oe, oi = old_e[r::world_size], old_i[r::world_size]
        if rows_per_rank is not None:
            if inside_epoch:
                room = max(int(rows_per_rank) - ci.numel(), 0)
                over += max(oi.numel() - room, 0)
                oe, oi = oe[:room], oi[:room]
            else:
                over += max(ci.numel() - int(rows_per_rank), 0)
                ce, ci = ce[: int(rows_per_rank)], ci[: int(rows_per_rank)]
        shares.append((torch.cat([ce, oe]), torch.cat([ci, oi]), ci.numel()))
    held = max(i.numel() for _, i, _ in shares)
    size = max(-(-old_world * old_size // world_size), int(min_rows), int(rows_per_rank or 0), held, 1)
    out_e = embeddings.new_zeros(world_size, n_assign, size, dim)
    out_i = torch.full((world_size, size), -1, dtype=torch.long)
    out_filled = torch.zeros(world_size, dtype=torch.long)
    out_position = torch.zeros(world_size, dtype=torch.long)
    for r, (e, i, n_current) in enumerate(shares):
        out_e[r, :, : i.numel()] = e.permute(1, 0, 2)
        out_i[r, : i.numel()] = i
        out_filled[r] = i.numel()
        out_position[r] = n_current if inside_epoch else i.numel()
    return BankLayout(out_e, out_i, out_filled, out_position, duplicates, int(superseded.sum()), over)


def _int(prefix: str, key: str, value: Any, minimum: Optional[int] = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{prefix}.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{prefix}.{key} must be >= {minimum}, got {value}")
    return int(value)


def _int_list(prefix: str, key: str, value: Any, minimum: Optional[int] = None) -> List[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{prefix}.{key} must be a list of integers, got {value!r}")
    return [_int(prefix, key, v, minimum) for v in value]


def _positive(prefix: str, key: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{prefix}.{key} must be a number, got {value!r}") from None
    if not value > 0:
        raise ValueError(f"{prefix}.{key} must be > 0, got {value:g}")
    return value


class ClusterMemoryLoss(ClassyLoss):
    """Memory bank, label table and the cross-entropy of DeepCluster-v2 and
    SeLa-v2; subclasses define :meth:`_cluster_head`.

    ``forward(output)`` with ``output = [embeddings (num_crops*B, D),
    scores_0 (num_crops*B, K_0), ...]`` (crop-major rows, as the head and the
    multi-crop collator produce them) and the ``(num_crops*B,)`` dataset
    indices given by :meth:`set_indices` returns

        ``mean_h CE(scores_h / temperature, labels[h][indices])``

    with ``CE`` the mean cross-entropy over the rows whose label is not -100
    (0 if there is none), i.e. the release's ``CrossEntropyLoss(
    ignore_index=-100)`` on ``assignments[h][idx].repeat(num_crops)``.
    """

    NAME = ""

    def __init__(
        self,
        num_crops: int,
        nmb_prototypes: Sequence[int],
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        feat_dim: Optional[int] = None,
        num_train_samples: Optional[int] = None,
        chunk_size: Optional[int] = None,
        freeze_prototypes_niters: Optional[int] = None,
        output_dir: str = "",
    ):
        super().__init__()
        self.num_crops = int(num_crops)
        self.nmb_prototypes = [int(k) for k in nmb_prototypes]
        self.crops_for_assign = [int(c) for c in crops_for_assign]
        self.temperature = float(temperature)
        self.feat_dim = None if feat_dim is None else int(feat_dim)
        self.num_train_samples = (
            None if num_train_samples is None or int(num_train_samples) < 0 else int(num_train_samples)
        )
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.output_dir = output_dir
        # Local bank (n_assign, L, D), its indices (L,), both on the training
        # device; None until allocated (fill pass) or restored.
        self.memory_embeddings: Optional[Tensor] = None
        self.memory_index: Optional[Tensor] = None
        self.memory_filled = 0  # valid rows [0, filled)
        self.memory_position = 0  # next row written
        # All ranks' banks on rank 0 (CPU), world > 1 only.
        self._all_embeddings: Optional[Tensor] = None
        self._all_index: Optional[Tensor] = None
        self._all_filled: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None  # (n_heads, num_train_samples)
        self._indices: Optional[Tensor] = None
        self._update_memory = True
        self.last_stats: Dict[str, Any] = {}
        # Follows .to()/.cuda(): the device a restored bank goes to.
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the loss was moved to (where the bank lives)."""
        return self._device_probe.device

    # ------------------------------------------------------------------ config
    @classmethod
    def _common_from_config(cls, cfg: Mapping) -> Dict[str, Any]:
        prefix = f"LOSS.{cls.NAME}"
        if _cfg_get(cfg, "num_crops") is None:
            raise ValueError(f"{prefix}.num_crops is required (total crops per image)")
        num_crops = _int(prefix, "num_crops", _cfg_get(cfg, "num_crops"), 1)
        if _cfg_get(cfg, "nmb_prototypes") is None:
            raise ValueError(f"{prefix}.nmb_prototypes is required (clusters per head)")
        nmb = _int_list(prefix, "nmb_prototypes", _cfg_get(cfg, "nmb_prototypes"), 1)
        if not nmb:
            raise ValueError(f"{prefix}.nmb_prototypes must list at least one head")
        cfa = _int_list(prefix, "crops_for_assign", _cfg_get(cfg, "crops_for_assign", [0, 1]))
        if not cfa or len(set(cfa)) != len(cfa) or not all(0 <= c < num_crops for c in cfa):
            raise ValueError(
                f"{prefix}.crops_for_assign must be distinct crops in [0, {num_crops}), got {cfa}"
            )
        chunk = _cfg_get(cfg, "chunk_size")
        freeze = _cfg_get(cfg, "freeze_prototypes_niters")
        feat_dim = _cfg_get(cfg, "feat_dim")
        return dict(
            num_crops=num_crops,
            nmb_prototypes=nmb,
            crops_for_assign=cfa,
            temperature=_positive(prefix, "temperature", _cfg_get(cfg, "temperature", 0.1)),
            feat_dim=None if feat_dim is None else _int(prefix, "feat_dim", feat_dim, 1),
            num_train_samples=_int(prefix, "num_train_samples", _cfg_get(cfg, "num_train_samples", -1)),
            chunk_size=None if chunk is None else _int(prefix, "chunk_size", chunk, 1),
            freeze_prototypes_niters=None if freeze is None else _int(prefix, "freeze_prototypes_niters", freeze, 0),
            output_dir=str(_cfg_get(cfg, "output_dir", "")),
        )

    # ------------------------------------------------------------ memory bank
    @property
    def nmb_heads(self) -> int:
        return len(self.nmb_prototypes)

    @property
    def memory_ready(self) -> bool:
        """Whether the bank holds embeddings (filled once, or restored)."""
        return self.memory_embeddings is not None and self.memory_filled > 0

    def allocate_memory(self, size: int, dim: int, device: Any = None) -> None:
        """Create an empty bank of ``size`` rows of dimension ``dim`` per
        assign crop on ``device`` (default: the loss's device; indices -1),
        and rank 0's all-ranks copy (CPU)."""
        device = self.device if device is None else device
        if size < 1 or dim < 1:
            raise ValueError(f"memory bank of {size} rows x {dim} dims")
        if self.feat_dim is not None and dim != self.feat_dim:
            raise ValueError(f"embeddings of dimension {dim}, feat_dim is {self.feat_dim}")
        n_mb = len(self.crops_for_assign)
        self.memory_embeddings = torch.zeros(n_mb, size, dim, dtype=torch.float32, device=device)
        self.memory_index = torch.full((size,), -1, dtype=torch.long, device=device)
        self.memory_filled = 0
        self.memory_position = 0
        rank, world = _world()
        if world > 1 and rank == 0:
            self._all_embeddings = torch.zeros(world, n_mb, size, dim, dtype=torch.float32)
            self._all_index = torch.full((world, size), -1, dtype=torch.long)
            self._all_filled = torch.zeros(world, dtype=torch.long)
        else:
            self._all_embeddings = self._all_index = self._all_filled = None

    @torch.no_grad()
    def update_memory(self, embeddings: Tensor, indices: Tensor) -> None:
        """Write one batch at the current position and advance it.

        Args:
            embeddings: ``(n_assign, b, D)``, the batch's embeddings of each
                crop of ``crops_for_assign`` (in that order).
            indices: ``(b,)`` their dataset indices.

        Every rank must call it (the batch is all-gathered for rank 0's copy).
        """
        if self.memory_embeddings is None:
            raise RuntimeError(
                f"{self.NAME}: the memory bank does not exist; the memory hook "
                "fills it before the first epoch (allocate_memory)"
            )
        n_mb, size, dim = self.memory_embeddings.shape
        b = int(indices.shape[0])
        if tuple(embeddings.shape) != (n_mb, b, dim):
            raise ValueError(
                f"memory update of shape {tuple(embeddings.shape)}, expected {(n_mb, b, dim)}"
            )
        pos = self.memory_position
        if pos + b > size:
            raise RuntimeError(
                f"{self.NAME}: {pos + b} rows written to a memory bank of {size} rows "
                "in one epoch (is cluster() called at every epoch start?)"
            )
        device = self.memory_embeddings.device
        emb = embeddings.detach().to(device=device, dtype=torch.float32)
        idx = indices.detach().to(device=device, dtype=torch.long)
        self.memory_embeddings[:, pos:pos + b] = emb
        self.memory_index[pos:pos + b] = idx
        self.memory_position = pos + b
        self.memory_filled = max(self.memory_filled, pos + b)
        rank, world = _world()
        if world > 1:
            self._gather_to_primary(emb, idx, pos, rank, world)

    def _gather_to_primary(self, emb: Tensor, idx: Tensor, pos: int, rank: int, world: int) -> None:
        b = idx.shape[0]
        count = torch.tensor([b], dtype=torch.long, device=idx.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        longest = max(int(c) for c in counts)
        if longest != b:  # pad to one shape for all_gather
            emb = torch.cat([emb, emb.new_zeros(emb.shape[0], longest - b, emb.shape[2])], 1)
            idx = torch.cat([idx, idx.new_full((longest - b,), -1)])
        embs = [torch.empty_like(emb) for _ in range(world)]
        idxs = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(embs, emb.contiguous())
        dist.all_gather(idxs, idx.contiguous())
        if rank != 0 or self._all_embeddings is None:
            return
        for r in range(world):
            n = int(counts[r])
            self._all_embeddings[r, :, pos:pos + n] = embs[r][:, :n].cpu()
            self._all_index[r, pos:pos + n] = idxs[r][:n].cpu()
            self._all_filled[r] = max(int(self._all_filled[r]), pos + n)

    def set_indices(self, indices: Tensor, update_memory: bool = True) -> None:
        """The ``(num_crops*B,)`` dataset indices of the next forward's rows
        (VISSL's ``sample["data_idx"]``, replicated per crop, crop-major),
        and whether that forward writes the memory bank (training)."""
        self._indices = indices
        self._update_memory = bool(update_memory)

    # -------------------------------------------------------------- clustering
    def _cluster_head(self, head: int, bank: Tensor, weight: Tensor) -> Tensor:
        """Labels ``(L_valid,)`` of this rank's bank rows for ``head``."""
        raise NotImplementedError

    @torch.no_grad()
    def cluster(self, prototype_weights: Sequence[Tensor]) -> None:
        """Epoch start: for each head ``h``, cluster the bank of crop
        ``crops_for_assign[h % n_assign]`` (:meth:`_cluster_head`, collective),
        gather every rank's labels into ``labels[h]`` and rewind the bank's
        write position. ``prototype_weights[h]`` is head ``h``'s ``(K_h, D)``
        prototype weight (DeepCluster-v2 overwrites it with the centroids)."""
        if not self.memory_ready:
            raise RuntimeError(f"{self.NAME}: cluster() before the memory bank was filled")
        if len(prototype_weights) != self.nmb_heads:
            raise ValueError(
                f"{len(prototype_weights)} prototype layers for nmb_prototypes={self.nmb_prototypes}"
            )
        for h, (w, k) in enumerate(zip(prototype_weights, self.nmb_prototypes)):
            if w.shape[0] != k:
                raise ValueError(f"prototype layer {h} has {w.shape[0]} rows, nmb_prototypes[{h}] = {k}")
        n_valid = self.memory_filled
        indices = self.memory_index[:n_valid]
        num_samples = self.num_train_samples
        if num_samples is None:  # not given: the largest index held + 1, all ranks
            top = indices.max().reshape(1).clone() if n_valid else torch.full((1,), -1, device=indices.device)
            if _world()[1] > 1:
                dist.all_reduce(top, op=dist.ReduceOp.MAX)
            num_samples = int(top) + 1
        device = self.memory_embeddings.device
        tables, counts = [], []
        n_mb = len(self.crops_for_assign)
        self.last_stats = {"kmeans_objective": []}
        for h, weight in enumerate(prototype_weights):
            bank = self.memory_embeddings[h % n_mb, :n_valid]
            local = self._cluster_head(h, bank, weight)
            table = gather_labels(local, indices, num_samples)
            tables.append(table)
            counts.append(torch.bincount(table[table >= 0], minlength=self.nmb_prototypes[h]))
        self.labels = torch.stack(tables).to(device)
        self.last_stats["label_counts"] = counts
        self.memory_position = 0

    # ----------------------------------------------------------------- forward
    def forward(self, output: Sequence[Tensor], target: Any = None) -> Tensor:
        if (
            isinstance(output, (list, tuple))
            and len(output) == 1
            and isinstance(output[0], (list, tuple))
        ):
            output = output[0]
        if not isinstance(output, (list, tuple)) or len(output) < 2:
            raise ValueError(f"{self.NAME} expects [embeddings, scores_head0, ...]")
        embeddings, heads = output[0], list(output[1:])
        rows = embeddings.shape[0]
        if len(heads) != self.nmb_heads:
            raise ValueError(
                f"{len(heads)} prototype heads for nmb_prototypes={self.nmb_prototypes}"
            )
        if rows % self.num_crops:
            raise ValueError(f"{rows} embeddings are not num_crops={self.num_crops} crops")
        batch = rows // self.num_crops
        if self._indices is None:
            raise RuntimeError(
                f"{self.NAME}: no dataset indices for this batch; the memory hook "
                "gives them (loss.set_indices(sample['data_idx'])) before every loss"
            )
        if self.labels is None:
            raise RuntimeError(f"{self.NAME}: no cluster labels yet (cluster() at epoch start)")
        indices = self._indices.reshape(-1).to(device=self.labels.device, dtype=torch.long)
        self._indices = None
        if indices.shape[0] != rows:
            raise ValueError(f"{indices.shape[0]} dataset indices for {rows} rows")
        if not torch.equal(indices.view(self.num_crops, batch), indices[:batch].expand(self.num_crops, batch)):
            raise ValueError(
                "dataset indices are not the same image's for every crop (expected "
                "crop-major rows: entry p*B+i is crop p of sample i)"
            )
        total = None
        for h, scores in enumerate(heads):
            if tuple(scores.shape) != (rows, self.nmb_prototypes[h]):
                raise ValueError(
                    f"scores of head {h} have shape {tuple(scores.shape)}, expected "
                    f"{(rows, self.nmb_prototypes[h])}"
                )
            targets = self.labels[h][indices].to(scores.device)
            dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
            with torch.autocast(device_type=scores.device.type, enabled=False):
                ce = F.cross_entropy(
                    scores.to(dtype) / self.temperature, targets, ignore_index=IGNORE_LABEL, reduction="sum"
                )
            valid = int((targets != IGNORE_LABEL).sum())
            ce = ce / max(valid, 1)
            total = ce if total is None else total + ce
        if self._update_memory:
            with torch.no_grad():
                emb = embeddings.detach()
                per_crop = torch.stack([emb[c * batch:(c + 1) * batch] for c in self.crops_for_assign])
                self.update_memory(per_crop, indices[:batch])
        return total / self.nmb_heads

    # ------------------------------------------------------------------- state
    def get_classy_state(self) -> Dict[str, Any]:
        """Empty: VISSL already saves :meth:`state_dict` as the checkpoint's
        ``loss`` entry; the task state would hold the whole bank again."""
        return {}

    def set_classy_state(self, state: Dict[str, Any]) -> None:
        if state:
            self.load_state_dict(state)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        rank, world = _world()
        if self.memory_embeddings is None:
            emb = idx = filled = ranks = None
        elif world > 1 and rank == 0 and self._all_embeddings is not None:
            emb, idx = self._all_embeddings, self._all_index
            filled = self._all_filled.clone()
            ranks = torch.arange(world, dtype=torch.long)
        else:
            emb = self.memory_embeddings.detach().cpu().unsqueeze(0)
            idx = self.memory_index.detach().cpu().unsqueeze(0)
            filled = torch.tensor([self.memory_filled], dtype=torch.long)
            ranks = torch.tensor([rank], dtype=torch.long)
        destination[prefix + "memory_embeddings"] = emb
        destination[prefix + "memory_index"] = idx
        destination[prefix + "memory_filled"] = filled
        destination[prefix + "memory_ranks"] = ranks
        destination[prefix + "memory_position"] = int(self.memory_position)
        destination[prefix + "world_size"] = int(world)
        destination[prefix + "labels"] = None if self.labels is None else self.labels.detach().cpu()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {prefix + k for k in _STATE_KEYS + (RESHARD_ROWS_KEY,)}
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)
        get = lambda k: state_dict.get(prefix + k)  # noqa: E731
        self.check_state_dict(state_dict, prefix)
        device = self.device
        labels = get("labels")
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.long).clone()
        emb, idx, filled, ranks = (get(k) for k in ("memory_embeddings", "memory_index", "memory_filled", "memory_ranks"))
        rank, world = _world()
        if emb is None or ranks is None:
            return
        ranks_held = [int(r) for r in ranks]
        saved_world = int(get("world_size") or 1)
        rows_per_rank = get(RESHARD_ROWS_KEY)
        too_small = rows_per_rank is not None and int(rows_per_rank) > emb.shape[2]
        if (saved_world != world or too_small) and ranks_held == list(range(saved_world)):
            self._load_resharded(emb, idx, filled, int(get("memory_position") or 0), saved_world, rows_per_rank)
            return
        primary_needs_all = world > 1 and rank == 0 and len(ranks_held) != world
        if saved_world != world or rank not in ranks_held or primary_needs_all:
            logging.warning(
                "%s: the checkpoint's memory bank was saved by %d rank(s) (ranks held %s); "
                "rank %d of %d cannot use it and refills its bank",
                self.NAME, saved_world, ranks_held, rank, world,
            )
            return
        slot = ranks_held.index(rank)
        self.memory_embeddings = emb[slot].to(device=device, dtype=torch.float32).clone()
        self.memory_index = idx[slot].to(device=device, dtype=torch.long).clone()
        self.memory_filled = int(filled[slot])
        self.memory_position = int(get("memory_position") or 0)
        if world > 1 and rank == 0:
            self._all_embeddings = emb.to(dtype=torch.float32).cpu().clone()
            self._all_index = idx.to(dtype=torch.long).cpu().clone()
            self._all_filled = filled.to(dtype=torch.long).cpu().clone()

    def _load_resharded(self, emb, idx, filled, position, saved_world, rows_per_rank) -> None:
        rank, world = _world()
        min_rows = -(-self.num_train_samples // world) if self.num_train_samples else 0
        layout = reshard_bank(
            emb.to(dtype=torch.float32).cpu(), idx.cpu(), filled.cpu(), position, world,
            rows_per_rank=None if rows_per_rank is None else int(rows_per_rank), min_rows=min_rows,
        )
        device = self.device
        self.memory_embeddings = layout.embeddings[rank].to(device).clone()
        self.memory_index = layout.indices[rank].to(device).clone()
        self.memory_filled = int(layout.filled[rank])
        self.memory_position = int(layout.position[rank])
        if world > 1 and rank == 0:
            self._all_embeddings, self._all_index = layout.embeddings, layout.indices
            self._all_filled = layout.filled.clone()
        else:
            self._all_embeddings = self._all_index = self._all_filled = None
        saved_rows = int(filled.to(torch.long).clamp(0, emb.shape[2]).sum())
        what = f"resharded from {saved_world} to {world} ranks" if saved_world != world else "resized"
        logging.info(
            "%s: memory bank %s: %d of %d rows kept with their dataset indices (dropped: %d "
            "duplicate, %d superseded by this epoch's, %d beyond the %s rows a rank writes per "
            "epoch); rows per rank %s, next row written %s",
            self.NAME, what, int(layout.filled.sum()), saved_rows, layout.duplicates,
            layout.superseded, layout.over_capacity, rows_per_rank, layout.filled.tolist(),
            layout.position.tolist(),
        )

    def check_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`~swav_vissl_plugin.config.ConfigError` if the bank or
        label table in ``state_dict`` cannot be used with this loss's config:
        another number of assign crops, embeddings of another size than
        ``feat_dim``, labels of another number of heads or dataset size. Any
        world size can be (see :func:`reshard_bank`)."""
        key = f"config.LOSS.{self.NAME}"
        emb, labels = state_dict.get(prefix + "memory_embeddings"), state_dict.get(prefix + "labels")
        if isinstance(emb, Tensor):
            if emb.dim() != 4:
                raise ConfigError(
                    f"{prefix}memory_embeddings: a bank of shape {tuple(emb.shape)}, expected "
                    "(ranks, assign crops, rows, embedding size)"
                )
            if emb.shape[1] != len(self.crops_for_assign):
                raise ConfigError(
                    f"{key}.crops_for_assign: the checkpoint's memory bank holds {emb.shape[1]} "
                    f"assign crop(s), the config assigns from {len(self.crops_for_assign)} "
                    f"({self.crops_for_assign}); resume with the checkpoint's crops_for_assign"
                )
            if self.feat_dim is not None and emb.shape[3] != self.feat_dim:
                raise ConfigError(
                    f"config.MODEL.HEAD.PARAMS[0][1].feat_dim: the checkpoint's memory bank holds "
                    f"embeddings of size {emb.shape[3]}, the head makes {self.feat_dim} "
                    f"({key}.feat_dim); resume with the checkpoint's feat_dim"
                )
        if isinstance(labels, Tensor):
            if labels.dim() != 2 or labels.shape[0] != self.nmb_heads:
                raise ConfigError(
                    f"{key}.nmb_prototypes: the checkpoint's label table {tuple(labels.shape)} is for "
                    f"{labels.shape[0] if labels.dim() == 2 else '?'} head(s), the config has "
                    f"{self.nmb_heads} ({self.nmb_prototypes})"
                )
            if self.num_train_samples is not None and labels.shape[1] != self.num_train_samples:
                raise ConfigError(
                    f"config.DATA.TRAIN.DATA_PATHS: the checkpoint's label table covers "
                    f"{labels.shape[1]} images, the training set has {self.num_train_samples} "
                    "(DATA.TRAIN.DATA_PATHS / DATA_LIMIT); labels by dataset index belong to the "
                    "checkpoint's training set"
                )

    def _apply(self, fn, *args, **kwargs):
        # .to(device)/.cuda() also move the local bank and the labels (plain
        # attributes, not buffers: the state is written by _save_to_state_dict).
        super()._apply(fn, *args, **kwargs)
        for name in ("memory_embeddings", "memory_index", "labels"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        return self

    # --------------------------------------------------------------------- repr
    def _repr_dict(self) -> Dict[str, Any]:
        return {
            "name": self.NAME,
            "num_crops": self.num_crops,
            "crops_for_assign": self.crops_for_assign,
            "temperature": self.temperature,
            "nmb_prototypes": self.nmb_prototypes,
            "feat_dim": self.feat_dim,
            "num_train_samples": self.num_train_samples,
            "chunk_size": self.chunk_size,
            "freeze_prototypes_niters": self.freeze_prototypes_niters,
            "memory_rows": None if self.memory_embeddings is None else int(self.memory_embeddings.shape[1]),
        }

    def __repr__(self) -> str:
        return pprint.pformat(self._repr_dict(), indent=2)


@register_loss(DEEPCLUSTER_V2)
class DeepClusterV2PluginLoss(ClusterMemoryLoss):
    """DeepCluster-v2: at every epoch start, for each head, distributed
    spherical k-means (:func:`~swav_vissl_plugin.clustering.spherical_kmeans`,
    ``kmeans_iterations`` M steps, centroids initialised from random rows of
    rank 0's bank) of the bank; the centroids are copied into that head's
    prototype layer and the final assignments become the labels."""

    NAME = DEEPCLUSTER_V2

    def __init__(self, *args, kmeans_iterations: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.kmeans_iterations = int(kmeans_iterations)

    @classmethod
    def from_config(cls, loss_config: Mapping) -> "DeepClusterV2PluginLoss":
        common = cls._common_from_config(loss_config)
        iters = _int(f"LOSS.{cls.NAME}", "kmeans_iterations", _cfg_get(loss_config, "kmeans_iterations", 10), 1)
        return cls(kmeans_iterations=iters, **common)

    def _cluster_head(self, head: int, bank: Tensor, weight: Tensor) -> Tensor:
        result = spherical_kmeans(
            bank, self.nmb_prototypes[head], self.kmeans_iterations, chunk_size=self.chunk_size
        )
        weight.copy_(result.centroids.to(weight.dtype))
        self.last_stats["kmeans_objective"].append(result.objective)
        return result.labels

    def _repr_dict(self) -> Dict[str, Any]:
        return {**super()._repr_dict(), "kmeans_iterations": self.kmeans_iterations}


@register_loss(SELA_V2)
class SeLaV2PluginLoss(ClusterMemoryLoss):
    """SeLa-v2: at every epoch start, for each head, hard labels of the bank
    by Sinkhorn-Knopp equipartition of its scores under the head's (learned,
    L2-normalised) prototypes over all ranks
    (:func:`~swav_vissl_plugin.clustering.sinkhorn_labels`). The prototypes
    are not changed by clustering; they are trained by the loss."""

    NAME = SELA_V2

    def __init__(self, *args, epsilon: float = 0.05, sinkhorn_iterations: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)

    @classmethod
    def from_config(cls, loss_config: Mapping) -> "SeLaV2PluginLoss":
        prefix = f"LOSS.{cls.NAME}"
        common = cls._common_from_config(loss_config)
        eps = _positive(prefix, "epsilon", _cfg_get(loss_config, "epsilon", 0.05))
        iters = _int(prefix, "sinkhorn_iterations", _cfg_get(loss_config, "sinkhorn_iterations", 10), 1)
        return cls(epsilon=eps, sinkhorn_iterations=iters, **common)

    def _cluster_head(self, head: int, bank: Tensor, weight: Tensor) -> Tensor:
        return sinkhorn_labels(
            bank, weight.detach(), self.epsilon, self.sinkhorn_iterations, chunk_size=self.chunk_size
        )

    def _repr_dict(self) -> Dict[str, Any]:
        return {
            **super()._repr_dict(),
            "epsilon": self.epsilon,
            "sinkhorn_iterations": self.sinkhorn_iterations,
        }


# --------------------------------------------------------------------------
# config inference (run by swav_vissl_plugin.config.infer_and_validate)
# --------------------------------------------------------------------------
def _infer_cluster_loss(cfg, name: str) -> None:
    """Complete and check ``LOSS.<name>`` in place: ``num_crops`` from the
    SwavPluginMultiCrop transform, ``nmb_prototypes``/``feat_dim`` from the
    swav_plugin_head, ``num_train_samples`` (-1: VISSL sets the dataset size),
    ``output_dir``; every bad value raises ``ConfigError`` naming its key."""
    from swav_vissl_plugin.config import MULTICROP, PLUGIN_HEAD, ConfigError

    key = f"LOSS.{name}"

    def fail(sub: str, msg: str):
        raise ConfigError(f"config.{key}{'.' + sub if sub else ''}: {msg}")

    loss = cfg.LOSS.get(name)
    if loss is None:
        fail("", f"missing: LOSS.name is {name} but it has no parameters")

    # crops: from the multi-crop transform
    mc = next((t for t in cfg.DATA.TRAIN.TRANSFORMS or [] if t.get("name") == MULTICROP), None)
    if mc is not None:
        nmb_crops = list(mc.get("nmb_crops") or [])
        if not nmb_crops:
            raise ConfigError(f"config.DATA.TRAIN.TRANSFORMS[{MULTICROP}].nmb_crops: must be a non-empty list")
        num_crops = int(sum(nmb_crops))
        if loss.get("num_crops") not in (None, num_crops):
            fail("num_crops", f"is {loss.num_crops} but the multi-crop transform makes {num_crops} crops")
        loss["num_crops"] = num_crops
    elif loss.get("num_crops") is None:
        fail("num_crops", f"not set and no {MULTICROP} transform in DATA.TRAIN.TRANSFORMS to infer it from")
    num_crops = loss["num_crops"]
    if not isinstance(num_crops, int) or num_crops < 1:
        fail("num_crops", f"must be a positive integer, got {num_crops!r}")

    cfa = loss.get("crops_for_assign")
    cfa = [0, 1] if cfa is None else list(cfa)
    if not cfa:
        fail("crops_for_assign", "must list at least one crop index")
    for c in cfa:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_crops:
            fail("crops_for_assign", f"index {c!r} is outside the {num_crops} crops (0..{num_crops - 1})")
    if len(set(cfa)) != len(cfa):
        fail("crops_for_assign", f"has duplicates: {cfa}")
    loss["crops_for_assign"] = cfa

    def positive(sub: str, default, integer: bool = False, minimum=None):
        value = loss.get(sub)
        value = default if value is None else value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and integer:
            ok = float(value).is_integer()
        if ok and minimum is not None:
            ok = value >= minimum
        elif ok:
            ok = value > 0 and value == value and value != float("inf")
        if not ok:
            what = "integer" if integer else "number"
            bound = f">= {minimum}" if minimum is not None else "> 0"
            fail(sub, f"must be a {what} {bound}, got {value!r}")
        loss[sub] = int(value) if integer else float(value)

    positive("temperature", 0.1)
    if name == DEEPCLUSTER_V2:
        positive("kmeans_iterations", 10, integer=True, minimum=1)
        positive("freeze_prototypes_niters", 300000, integer=True, minimum=0)
    else:
        positive("epsilon", 0.05)
        positive("sinkhorn_iterations", 10, integer=True, minimum=1)
        positive("freeze_prototypes_niters", 0, integer=True, minimum=0)
    if loss.get("chunk_size") is not None:
        positive("chunk_size", None, integer=True, minimum=1)

    # prototypes and embedding size: the head is the one source of truth
    heads = cfg.MODEL.HEAD.PARAMS
    if not heads or heads[0][0] != PLUGIN_HEAD:
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: {name} needs {PLUGIN_HEAD} as the first head, "
            f"got {heads[0][0] if heads else 'none'}"
        )
    params = heads[0][1]
    nmb = params.get("nmb_prototypes", 3000)
    nmb = [nmb] if isinstance(nmb, int) else list(nmb)
    if not nmb or any(not isinstance(k, int) or k < 1 for k in nmb):
        raise ConfigError(f"config.MODEL.HEAD.PARAMS[0][1].nmb_prototypes: must be positive integers, got {nmb}")
    if loss.get("nmb_prototypes") not in (None, nmb, nmb[0] if len(nmb) == 1 else None):
        fail("nmb_prototypes", f"is {loss.nmb_prototypes} but the head has {nmb}")
    loss["nmb_prototypes"] = nmb
    if not params.get("normalize", True):
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS[0][1].normalize: {name} clusters L2-normalised "
            "embeddings (spherical k-means / dot-product scores); it must be true"
        )
    loss["feat_dim"] = int(params.get("feat_dim", 128))
    if loss.get("num_train_samples") is None:
        loss["num_train_samples"] = -1  # VISSL's _build_loss sets the dataset size

    from vissl.utils.checkpoint import get_checkpoint_folder

    loss["output_dir"] = get_checkpoint_folder(cfg)


def _register_inference() -> None:
    from swav_vissl_plugin.config import register_loss_inference

    register_loss_inference(DEEPCLUSTER_V2)(lambda cfg: _infer_cluster_loss(cfg, DEEPCLUSTER_V2))
    register_loss_inference(SELA_V2)(lambda cfg: _infer_cluster_loss(cfg, SELA_V2))


_register_inference()
