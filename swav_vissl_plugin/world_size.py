"""Resuming a run on another number of processes (world size).

Issue "Resume on a different number of GPUs": a run resumed with another
world size continues with the LR and iteration counters of the new global
batch and says so in the log; it is refused, with the reason, only where
continuing cannot be right. The resume path
(:func:`swav_vissl_plugin.resume.prepare_checkpoint`) calls
:func:`adapt_checkpoint` on the loaded checkpoint before VISSL reads any
counter from it; the queue and memory bank are resharded by the losses'
``load_state_dict`` (:func:`swav_vissl_plugin.losses.swav.reshard_queue`,
:func:`swav_vissl_plugin.losses.deepcluster_v2.reshard_bank`).
``docs/world_size.md`` describes the whole behaviour.

The rule: what is preserved is the number of images trained on and the
position in the schedule, in epochs. With ``n`` iterations per phase (epoch)
before and ``n'`` now (:func:`iterations_per_phase`), a checkpoint after
``E`` complete phases and ``k`` iterations into the next resumes at

* ``iteration' = E * n' + k'``, with ``k' = 0`` at a phase boundary,
  ``k' = n'`` when the phase was complete, else ``k' = k * B / B'`` (``B``,
  ``B'``: the global batches) -- the same images of the epoch consumed;
* ``classy_state_dict.num_updates' = iteration' * B'`` (images at the new
  batch, what VISSL's ``where = num_updates / B' / (phases * n')`` reads),
  so the LR schedule (a function of ``where``) is at the same fraction of
  training and its values are those of the new global batch (the config's
  ``base_lr``, scaled by ``auto_lr_scaling`` for the new batch);
* ``iteration_num' = iteration_num + iteration' - iteration``;
* phase indices unchanged.

Inside an epoch the continuation is exact only when the images consumed so
far are exactly the ones the new run's sampler skips: with a sampler that
orders the whole dataset independently of the world size (torch's
``DistributedSampler`` order, which the plugin's resumable sampler keeps),
when ``k * B`` is a multiple of ``B'``; with VISSL's
``StatefulDistributedSampler`` (rank-contiguous blocks) only on the same
world size. Otherwise :class:`~swav_vissl_plugin.config.ConfigError` names
the checkpoint and the phase checkpoint to resume from instead.
"""

import logging
import math
from typing import Any, Dict, Mapping, Optional, Tuple

from swav_vissl_plugin.config import (
    ITERATION_KEYS,
    WARMUP_COSINE,
    ConfigError,
    global_batch_size,
    recipe_global_batch,
    scale_iterations,
    world_size,
)

__all__ = [
    "adapt_checkpoint",
    "iterations_per_phase",
    "samples_per_rank",
    "train_dataset_size",
    "META_KEY",
    "ADAPTED_KEY",
]

_LOG = "swav_vissl_plugin"
#: The plugin's resume metadata in every checkpoint it writes (checkpoint schema).
META_KEY = "swav_plugin"
#: Set on a checkpoint dict once adapted (world size, global batch): adapting twice is a no-op.
ADAPTED_KEY = "swav_plugin_adapted"
#: Sampler orders: one permutation of the whole dataset, rank r taking every
#: W-th index (torch's DistributedSampler); a contiguous block per rank
#: shuffled inside it (VISSL's StatefulDistributedSampler).
GLOBAL_ORDER, RANK_BLOCKS = "global order", "rank blocks"


# ------------------------------------------------------------ data loading
def _sampler(cfg) -> Tuple[str, str, bool]:
    """(order, description, can start inside an epoch) of the training
    sampler ``vissl.data.get_sampler`` builds for ``cfg`` (with the plugin's
    patches applied)."""
    import torch.utils.data.distributed as torch_dist
    from vissl import data as vissl_data
    from vissl.data import data_helper

    train = cfg.DATA.TRAIN
    if train.get("USE_DEBUGGING_SAMPLER"):
        cls, key = vissl_data.DeterministicDistributedSampler, "DATA.TRAIN.USE_DEBUGGING_SAMPLER=true"
    elif train.get("USE_STATEFUL_DISTRIBUTED_SAMPLER"):
        cls, key = vissl_data.StatefulDistributedSampler, "DATA.TRAIN.USE_STATEFUL_DISTRIBUTED_SAMPLER=true"
    else:
        cls, key = torch_dist.DistributedSampler, "DATA.TRAIN.USE_STATEFUL_DISTRIBUTED_SAMPLER=false"
    order = RANK_BLOCKS if issubclass(cls, data_helper.StatefulDistributedSampler) else GLOBAL_ORDER
    return order, f"{cls.__module__}.{cls.__name__} ({key})", hasattr(cls, "set_start_iter")


def samples_per_rank(cfg, world: int, dataset_size: int) -> int:
    """Images each of ``world`` ranks draws per epoch: ``ceil(N / W)`` in
    the global order (padded with repeated images), ``N // W`` in rank
    blocks (the remainder is never drawn)."""
    order = _sampler(cfg)[0]
    return dataset_size // world if order == RANK_BLOCKS else -(-dataset_size // world)


def iterations_per_phase(cfg, world: int, dataset_size: int) -> int:
    """``len(train loader)`` of a run of ``cfg`` on ``world`` ranks over
    ``dataset_size`` images: samples per rank over
    ``DATA.TRAIN.BATCHSIZE_PER_REPLICA``, rounded down with
    ``DATA.TRAIN.DROP_LAST``, else up."""
    batch = int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA)
    samples = samples_per_rank(cfg, world, dataset_size)
    return samples // batch if cfg.DATA.TRAIN.get("DROP_LAST") else -(-samples // batch)


def train_dataset_size(cfg) -> int:
    """Images of the training set VISSL builds for ``cfg`` (``len`` of its
    dataset: ``DATA.TRAIN.DATA_LIMIT`` when set); lists the data source."""
    from vissl.data import build_dataset

    return len(build_dataset(cfg, "TRAIN"))


# ---------------------------------------------------------------- counters
def _meta(checkpoint: Mapping[str, Any]) -> Dict[str, int]:
    meta = checkpoint.get(META_KEY)
    if not isinstance(meta, Mapping):
        raise ConfigError(f"checkpoint['{META_KEY}']: expected a dict, got {type(meta).__name__}")
    out = {}
    for key in ("world_size", "batch_size_per_gpu", "iterations_per_phase"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"checkpoint['{META_KEY}']['{key}']: must be a positive integer, got {value!r} "
                "(a damaged or foreign checkpoint)"
            )
        out[key] = value
    out["global_batch_size"] = out["world_size"] * out["batch_size_per_gpu"]
    return out


def _phase_checkpoint_hint(cfg, completed: int, world: int) -> str:
    """Which phase checkpoint to resume from instead (VISSL writes one every
    ``CHECKPOINT.CHECKPOINT_FREQUENCY`` phases)."""
    from swav_vissl_plugin.checkpoint_hook import checkpoint_name

    freq = max(int(cfg.CHECKPOINT.get("CHECKPOINT_FREQUENCY", 1) or 1), 1)
    last = completed - 1 - (completed - 1) % freq
    if last < 0:
        return f"no phase checkpoint precedes it: resume on {world} rank(s), or start over"
    return (
        f"resume from the phase checkpoint {checkpoint_name('phase', last, False)} "
        f"(the end of phase {last}) instead, or resume on {world} rank(s)"
    )


def _epoch_offset(cfg, k: int, old: Dict[str, int], new_batch: int, new_world: int, name: str, completed: int) -> int:
    """``k'``: iterations of the new run consuming the ``k`` batches of the
    interrupted phase; raises ConfigError where no ``k'`` continues it exactly."""
    order, sampler, can_start = _sampler(cfg)
    new_global = new_batch * new_world
    consumed = k * old["global_batch_size"]
    why = None
    if not can_start:
        why = f"the training sampler, {sampler}, cannot start inside an epoch (VISSL would replay it)"
    elif order == RANK_BLOCKS and new_world != old["world_size"]:
        why = (
            f"the training sampler, {sampler}, gives each rank a contiguous block of the dataset "
            f"(N // world images, shuffled inside it): on {new_world} rank(s) the blocks differ, so the "
            f"rest of the epoch would repeat some of the {consumed} images already trained on and skip others"
        )
    elif order == RANK_BLOCKS and (k * old["batch_size_per_gpu"]) % new_batch:
        why = (
            f"each rank consumed {k * old['batch_size_per_gpu']} images of its block, not a whole number "
            f"of batches of {new_batch} (DATA.TRAIN.BATCHSIZE_PER_REPLICA)"
        )
    elif order == GLOBAL_ORDER and consumed % new_global:
        why = (
            f"the {consumed} images consumed so far in the epoch ({k} iterations x {old['global_batch_size']}) "
            f"are not a whole number of iterations of the new global batch {new_global} "
            f"({new_world} rank(s) x {new_batch}, DATA.TRAIN.BATCHSIZE_PER_REPLICA)"
        )
    if why:
        raise ConfigError(
            f"checkpoint {name}: written inside phase {completed} by {old['world_size']} rank(s) x "
            f"{old['batch_size_per_gpu']} images, it cannot be continued exactly on {new_world} rank(s) x "
            f"{new_batch}: {why}. {_phase_checkpoint_hint(cfg, completed, old['world_size'])}"
        )
    if order == RANK_BLOCKS:
        return k * old["batch_size_per_gpu"] // new_batch
    return consumed // new_global


def _lr_text(cfg, iteration: int, n: int, global_batch: int) -> str:
    """The LR the schedule gives at ``iteration`` with ``n`` iterations per
    epoch at ``global_batch`` (the plugin's warmup+cosine; other schedules: ``where`` only)."""
    epochs = int(cfg.OPTIMIZER.num_epochs)
    where = iteration / (epochs * n)
    lr = cfg.OPTIMIZER.param_schedulers.lr
    if lr.get("name") != WARMUP_COSINE:
        return f"where {where:.6g}"
    from swav_vissl_plugin.optim import scale_lr, warmup_cosine_lr

    base, final = float(lr.base_lr), float(lr.final_lr)
    scaling = lr.get("auto_lr_scaling") or {}
    if scaling.get("auto_scale"):
        ratio = final / base if base else 0.0
        base = scale_lr(scaling.base_value, global_batch, scaling.base_lr_batch_size)
        final = base * ratio
    values = warmup_cosine_lr(base, final, epochs, n, int(lr.warmup_epochs), float(lr.start_warmup))
    return f"where {where:.6g}, lr {values[min(iteration, len(values) - 1)]:.6g}"


def _check_freeze(cfg, old_iteration: int, new_iteration: int, old_global: int, new_global: int, name: str) -> None:
    """Refuse a resume that would freeze prototypes the run already trains;
    warn when it ends the freeze earlier (in images) than the old run."""
    loss_name = cfg.LOSS.name
    loss = cfg.LOSS.get(loss_name) or {}
    plugin = cfg.get("SWAV_PLUGIN") or {}
    for key in ITERATION_KEYS:
        if loss.get(key) is None:
            continue
        full_key = f"LOSS.{loss_name}.{key}"
        new_value = int(loss[key])
        ref = recipe_global_batch(cfg)
        recorded = (plugin.get("SCALED_ITERATIONS") or {}).get(full_key)
        old_value = scale_iterations(recorded[0], ref, old_global) if ref and recorded else new_value
        was, now = old_iteration < old_value, new_iteration < new_value
        same_images = scale_iterations(old_value, old_global, new_global)
        if not was and now:
            raise ConfigError(
                f"config.{full_key}: {new_value} iterations would freeze the prototypes again at iteration "
                f"{new_iteration}, but the run resumed from {name} trained them since iteration {old_value} "
                f"at the global batch {old_global}; set it to {same_images} (the same images at the global "
                f"batch {new_global}) or less"
            )
        if was and not now:
            logging.warning(
                "%s: config.%s = %d ends the prototype freeze at iteration %d of the global batch %d, "
                "earlier in images than the %d iterations of the run at %d (%d would keep it)",
                _LOG, full_key, new_value, new_value, new_global, old_value, old_global, same_images,
            )


def _check_loss_state(checkpoint: Mapping[str, Any], cfg) -> None:
    """The checkpoint's loss state against this run's loss, before any data
    is listed: the losses' ``check_state_dict`` raises ConfigError."""
    state = checkpoint.get("loss")
    loss_cfg = cfg.LOSS.get(cfg.LOSS.name)
    if not state or loss_cfg is None:
        return
    from classy_vision.losses import LOSS_REGISTRY

    cls = LOSS_REGISTRY.get(cfg.LOSS.name)
    if cls is None or not hasattr(cls, "check_state_dict"):
        return
    params = dict(loss_cfg)
    params["name"] = cfg.LOSS.name
    cls.from_config(params).check_state_dict(state)


def adapt_checkpoint(
    checkpoint: Dict[str, Any],
    cfg,
    dataset_size: Optional[int] = None,
    name: Optional[str] = None,
) -> Dict[str, Any]:
    """Restate a loaded resume checkpoint for this run's world size.

    Args:
        checkpoint: the dict VISSL loaded (adapted in place and returned).
        cfg: this run's config.
        dataset_size: training images (default: :func:`train_dataset_size`).
        name: the checkpoint's file name, for messages (default: VISSL's name
            for its mode and number).

    Returns ``checkpoint`` unchanged when it has no ``swav_plugin`` metadata
    (world size unknown) or was written on this world size and batch; else
    with the counters rescaled by the module's rule (logged, with the
    LR's position), and for a DeepCluster-v2 / SeLa-v2 loss state the rows
    each rank writes per epoch (the bank's reshard bound). Raises
    :class:`~swav_vissl_plugin.config.ConfigError` when the loss state does not
    fit this config or the run cannot continue exactly (module docstring).
    """
    if checkpoint.get(META_KEY) is None:
        return checkpoint
    old = _meta(checkpoint)
    new_world, new_batch = world_size(cfg), int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA)
    new_global = global_batch_size(cfg)
    if (old["world_size"], old["batch_size_per_gpu"]) == (new_world, new_batch):
        return checkpoint
    if checkpoint.get(ADAPTED_KEY) == {"world_size": new_world, "global_batch_size": new_global}:
        return checkpoint
    _check_loss_state(checkpoint, cfg)

    mode = checkpoint[META_KEY].get("mode", "phase")
    iteration, completed = int(checkpoint["iteration"]), int(checkpoint["train_phase_idx"]) + 1
    if name is None:
        number = iteration if mode == "iteration" else completed - 1
        from swav_vissl_plugin.checkpoint_hook import checkpoint_name

        name = checkpoint_name(mode, number, False)
    n_old = old["iterations_per_phase"]
    k = iteration - completed * n_old
    if not 0 <= k <= n_old:
        raise ConfigError(
            f"checkpoint {name}: iteration {iteration} is not within phase {completed} of "
            f"{n_old} iterations (checkpoint['{META_KEY}']['iterations_per_phase']): a damaged checkpoint"
        )
    if dataset_size is None:
        dataset_size = train_dataset_size(cfg)
    n_new = iterations_per_phase(cfg, new_world, dataset_size)
    if n_new < 1:
        raise ConfigError(
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA: {dataset_size} images on {new_world} rank(s) "
            f"give no batch of {new_batch}"
        )
    if k == 0:
        k_new, where = 0, "at the end of a phase"
    elif k == n_old:
        k_new, where = n_new, "at the end of its phase (iteration checkpoint)"
    else:
        k_new = _epoch_offset(cfg, k, old, new_batch, new_world, name, completed)
        where = f"inside phase {completed}: {k} -> {k_new} iterations done"
    new_iteration = completed * n_new + k_new
    _check_freeze(cfg, iteration, new_iteration, old["global_batch_size"], new_global, name)

    classy = checkpoint.get("classy_state_dict") or {}
    old_updates = classy.get("num_updates")
    checkpoint["iteration"] = new_iteration
    checkpoint["iteration_num"] = int(checkpoint["iteration_num"]) + new_iteration - iteration
    if "num_updates" in classy:
        classy["num_updates"] = new_iteration * new_global
    loss_state = checkpoint.get("loss")
    if isinstance(loss_state, dict) and loss_state.get("memory_embeddings") is not None:
        from swav_vissl_plugin.losses.deepcluster_v2 import RESHARD_ROWS_KEY

        samples = samples_per_rank(cfg, new_world, dataset_size)
        loss_state[RESHARD_ROWS_KEY] = min(n_new * new_batch, samples)
    checkpoint[ADAPTED_KEY] = {"world_size": new_world, "global_batch_size": new_global}

    logging.info(
        "%s: resuming %s, written by %d rank(s) x %d = global batch %d, on %d rank(s) x %d = global "
        "batch %d (%s): iterations per phase %d -> %d; iteration %d -> %d; num_updates %s -> %d; LR "
        "schedule position %s -> %s (the new global batch's schedule)",
        _LOG, name, old["world_size"], old["batch_size_per_gpu"], old["global_batch_size"], new_world,
        new_batch, new_global, where, n_old, n_new, iteration, new_iteration, old_updates,
        new_iteration * new_global, _lr_text(cfg, iteration, n_old, old["global_batch_size"]),
        _lr_text(cfg, new_iteration, n_new, new_global),
    )
    if new_world != old["world_size"]:
        logging.info(
            "%s: the per-rank random streams saved by %d rank(s) are not restored on %d rank(s) (each "
            "rank starts from this run's seeds); augmentations drawn from per-sample streams "
            "(swav_vissl_plugin.sample_seed, keyed by seed, epoch and dataset index) do not depend on "
            "the world size",
            _LOG, old["world_size"], new_world,
        )
    return checkpoint
