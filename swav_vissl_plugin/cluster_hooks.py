"""Hooks that run DeepCluster-v2 and SeLa-v2 inside VISSL's trainer.

Recipe (docs/deepcluster_sela.md, from the paper's "DeepCluster-v2 and SeLa-v2
rows"): "Each epoch first clusters the memory bank (the embeddings of the
crops_for_assign views from the previous epoch; filled by one pass before
epoch 0) [...] freeze_prototypes_niters 300000 (the prototypes are the
centroids, copied in after each clustering)".

:class:`ClusterMemoryHook` does, around VISSL's train step:

* ``on_start``: the fill pass, unless every rank's bank was restored from
  the checkpoint: under ``no_grad``, one pass over the training data loader
  with the model in train mode (as the release's ``init_memory``), each
  crop of ``crops_for_assign`` forwarded on its own; its L2-normalised
  embeddings and the batch's ``data_idx`` are written to the bank
  (:meth:`~swav_vissl_plugin.losses.deepcluster_v2.ClusterMemoryLoss.update_memory`).
  The bank has ``len(train loader) x DATA.TRAIN.BATCHSIZE_PER_REPLICA`` rows.
  SeLa-v2 also L2-normalises the prototypes here.
* ``on_phase_start`` (training phases): ``loss.cluster(prototype weights)``
  under ``no_grad``: DeepCluster-v2 copies each head's centroids into its
  prototype layer, SeLa-v2 labels the bank with the current prototypes.
  Not when the run resumes inside the epoch (an iteration checkpoint): the
  epoch's clustering was restored with the checkpoint
  (:func:`swav_vissl_plugin.resume.continues_phase`).
* ``on_forward``: hands the batch's ``data_idx`` (replicated per crop by
  the multi-crop collator) to the loss, which writes the bank in training.
* ``on_backward``: drops the prototypes' gradients while ``task.iteration <
  freeze_prototypes_niters`` (DeepCluster-v2: always, the centroids are not
  trained).
* ``on_update`` (SeLa-v2): L2-normalises the learned prototypes after every
  update, so they are unit-norm before every forward pass and clustering.
"""

import logging
from typing import List

import torch
import torch.distributed as dist
from classy_vision.hooks.classy_hook import ClassyHook

from swav_vissl_plugin.hooks import register_loss_hooks
from swav_vissl_plugin.losses.deepcluster_v2 import DEEPCLUSTER_V2, SELA_V2
from swav_vissl_plugin.resume import continues_phase

__all__ = ["ClusterMemoryHook", "fill_memory"]


def _head(task):
    head = task.base_model.heads[0]
    if not hasattr(head, "prototype_layers"):
        raise RuntimeError(
            f"{task.config['LOSS']['name']} needs MODEL.HEAD.PARAMS to start with "
            f"swav_plugin_head, got {type(head).__name__}"
        )
    return head


def _loss(task):
    loss = getattr(task, "base_loss", None) or task.loss
    return getattr(loss, "module", loss)


def _head_output(output):
    """``[embeddings, scores_0, ...]`` from the model's output (VISSL wraps
    the head's list in a one-element list)."""
    while isinstance(output, (list, tuple)) and len(output) == 1 and isinstance(output[0], (list, tuple)):
        output = output[0]
    return output


@torch.no_grad()
def fill_memory(task, loss) -> int:
    """The release's ``init_memory``: one pass over the training loader that
    fills ``loss``'s bank; returns the rows written on this rank."""
    loader = task.dataloaders["train"]
    model = task.base_model
    device = loss.device
    batch_size = int(task.config["DATA"]["TRAIN"]["BATCHSIZE_PER_REPLICA"])
    rows = len(loader) * batch_size
    feat_dim = loss.feat_dim
    was_training = model.training
    model.train(True)
    allocated = False
    try:
        for batch in loader:
            crops = batch["data"][0]
            indices = batch["data_idx"][0]
            b = crops[0].shape[0]
            embeddings = []
            for c in loss.crops_for_assign:
                out = _head_output(model(crops[c].to(device, non_blocking=True)))
                embeddings.append(out[0].float())
            if not allocated:
                loss.allocate_memory(rows, feat_dim or embeddings[0].shape[1], device)
                allocated = True
            loss.update_memory(torch.stack(embeddings), indices.reshape(-1)[:b])
    finally:
        model.train(was_training)
    if not allocated:
        raise RuntimeError("the training data loader is empty: nothing to fill the memory bank with")
    logging.info(
        "%s: memory bank filled with %d rows (of %d) on this rank", loss.NAME, loss.memory_filled, rows
    )
    return loss.memory_filled


def _all_ranks(flag: bool, device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(int(t))


class ClusterMemoryHook(ClassyHook):
    """Fill pass, epoch-start clustering, indices, prototype freeze and
    normalisation for DeepCluster-v2 / SeLa-v2 (see the module docstring)."""

    on_loss_and_meter = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop
    on_end = ClassyHook._noop

    def __init__(self, freeze_prototypes_niters: int, normalize_prototypes: bool):
        super().__init__()
        self.freeze_prototypes_niters = int(freeze_prototypes_niters)
        self.normalize_prototypes = bool(normalize_prototypes)
        #: rows written by the fill pass of this run (None: bank restored).
        self.filled_rows = None

    def on_start(self, task) -> None:
        loss, head = _loss(task), _head(task)
        if self.normalize_prototypes and task.checkpoint is None:
            # resumed: the checkpoint's prototypes are already unit-norm, and
            # normalising them again would change their last bits
            head.normalize_prototypes()
        if _all_ranks(loss.memory_ready, loss.device):
            logging.info("%s: memory bank restored from the checkpoint", loss.NAME)
            return
        self.filled_rows = fill_memory(task, loss)

    def on_phase_start(self, task) -> None:
        if not task.train:
            return
        loss, head = _loss(task), _head(task)
        if continues_phase(task):
            # resumed inside this epoch: its clustering (labels, centroids,
            # bank position) is in the checkpoint; redoing it would cluster a
            # partly refreshed bank and leave the uninterrupted trajectory
            logging.info("%s: epoch %d resumed mid-way: clustering restored from the checkpoint", loss.NAME, task.train_phase_idx)
            return
        with torch.no_grad():
            loss.cluster([layer.weight for layer in head.prototype_layers()])

    def on_forward(self, task) -> None:
        sample = task.last_batch.sample
        if "data_idx" not in sample:
            raise RuntimeError("the batch has no data_idx: the memory bank needs dataset indices")
        _loss(task).set_indices(sample["data_idx"][0], update_memory=bool(task.train))

    def on_backward(self, task) -> None:
        # task.iteration counts completed updates: the release's `iteration`.
        if task.iteration < self.freeze_prototypes_niters:
            for layer in _head(task).prototype_layers():
                layer.weight.grad = None

    def on_update(self, task) -> None:
        if self.normalize_prototypes and task.iteration >= self.freeze_prototypes_niters:
            _head(task).normalize_prototypes()


@register_loss_hooks(DEEPCLUSTER_V2)
def _deepcluster_v2_hooks(cfg) -> List[ClassyHook]:
    loss_cfg = cfg.LOSS[DEEPCLUSTER_V2]
    freeze = loss_cfg.get("freeze_prototypes_niters")
    return [ClusterMemoryHook(300000 if freeze is None else freeze, normalize_prototypes=False)]


@register_loss_hooks(SELA_V2)
def _sela_v2_hooks(cfg) -> List[ClassyHook]:
    loss_cfg = cfg.LOSS[SELA_V2]
    return [ClusterMemoryHook(loss_cfg.get("freeze_prototypes_niters") or 0, normalize_prototypes=True)]
