"""ClassyVision hooks that run the SwAV recipe inside VISSL's trainer.

VISSL's train step calls hooks around forward, backward and update
(``standard_train_step``); these hooks are where the plugin's components
meet the trainer, so that no component reaches into another:

* :class:`SwAVPrototypesHook`: L2-normalises the prototypes before every
  forward pass (at start and after every update), hands the current
  prototypes to the loss for the queue's scores, and drops the prototypes'
  gradients during the first ``freeze_prototypes_niters`` iterations
  (recipe "prototypes" row).
* :class:`SwAVQueueHook`: tells the loss the epoch, so its queue is created
  at ``epoch_queue_starts`` (recipe "Queue details").
* :class:`WarmupCosineIterationsHook`: gives the warmup+cosine schedule the
  number of iterations per epoch, so it equals the release's per-iteration
  array exactly (recipe "lr schedule" row).
* the monitoring hooks of :mod:`swav_vissl_plugin.monitoring` (TensorBoard
  signals, collapse warning, cluster sizes) and :mod:`swav_vissl_plugin.knn`
  (kNN monitor), as ``config.SWAV_PLUGIN.MONITOR`` asks.
* :class:`~swav_vissl_plugin.nonfinite.NonFiniteLossHook` (stops at the first
  non-finite loss, output or parameter, before any checkpoint holds it) and
  :class:`~swav_vissl_plugin.data_source.UnreadableImagesHook` (counts and
  names the samples replaced because their file was unreadable).
* last, :func:`~swav_vissl_plugin.checkpoint_hook.checkpoint_hooks`: the
  plugin's checkpoint hook (atomic files, resume metadata, never a
  non-finite model) in place of VISSL's, and the hook that restores what
  VISSL's resume leaves out (docs/checkpointing.md).

:func:`swav_plugin_hook_generator` returns VISSL's default hooks (without
its NaN checks, which ``NonFiniteLossHook`` replaces) plus these, and is what
the plugin's launcher hands to VISSL.
"""

import logging
from typing import Any, Callable, Dict, List

from classy_vision.hooks.classy_hook import ClassyHook

from swav_vissl_plugin.optim import set_schedulers_iterations_per_epoch

PLUGIN_LOSSES = ("swav_plugin_loss",)


def _head(task):
    heads = task.base_model.heads
    head = heads[0]
    if not hasattr(head, "prototype_parameters"):
        raise RuntimeError(
            "swav_plugin_loss needs MODEL.HEAD.PARAMS to start with "
            f"swav_plugin_head, got {type(head).__name__}"
        )
    return head


def _loss(task):
    loss = getattr(task, "base_loss", None) or task.loss
    return getattr(loss, "module", loss)


class NoopHook(ClassyHook):
    """A ClassyHook that does nothing; subclasses override the events they need."""

    on_start = ClassyHook._noop
    on_phase_start = ClassyHook._noop
    on_forward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_update = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop
    on_end = ClassyHook._noop


class SwAVPrototypesHook(NoopHook):
    """Normalise, hand over and (early on) freeze the prototypes."""

    def __init__(self, freeze_prototypes_niters: int):
        super().__init__()
        self.freeze_prototypes_niters = int(freeze_prototypes_niters)

    def on_start(self, task) -> None:
        # A resumed run's prototypes are the checkpoint's, already unit-norm;
        # normalising again would change their last bits (and the trajectory).
        if task.checkpoint is None:
            _head(task).normalize_prototypes()

    def on_forward(self, task) -> None:
        if task.train:
            _loss(task).set_prototypes([w.detach() for w in _head(task).prototype_parameters()])

    def on_backward(self, task) -> None:
        # task.iteration counts completed updates: this is the release's
        # 0-based `iteration` of the current step.
        if task.iteration < self.freeze_prototypes_niters:
            for p in _head(task).prototype_parameters():
                p.grad = None

    def on_update(self, task) -> None:
        # Frozen prototypes received no update (no gradient, so no weight decay
        # or momentum either): they are still unit-norm, and leaving them alone
        # keeps them bit-identical through the freeze.
        if task.iteration >= self.freeze_prototypes_niters:
            _head(task).normalize_prototypes()


class SwAVQueueHook(NoopHook):
    """Start the loss's queue at ``epoch_queue_starts``."""

    def on_phase_start(self, task) -> None:
        if task.train:
            _loss(task).on_epoch_start(task.train_phase_idx)


class WarmupCosineIterationsHook(NoopHook):
    """Tell iteration-exact schedulers how many iterations an epoch has."""

    def on_phase_start(self, task) -> None:
        if task.train:
            set_schedulers_iterations_per_epoch(task, task.num_batches_per_phase)


#: loss name -> function(cfg) returning the hooks that loss needs.
LOSS_HOOKS: Dict[str, Callable[[Any], List[ClassyHook]]] = {}


def register_loss_hooks(loss_name: str):
    """Decorator: ``fn(cfg) -> [hooks]`` runs whenever ``LOSS.name == loss_name``."""

    def wrap(fn):
        if loss_name in LOSS_HOOKS:
            raise ValueError(f"hooks for loss {loss_name!r} already registered")
        LOSS_HOOKS[loss_name] = fn
        return fn

    return wrap


@register_loss_hooks("swav_plugin_loss")
def _swav_hooks(cfg) -> List[ClassyHook]:
    loss_cfg = cfg.LOSS["swav_plugin_loss"]
    return [SwAVPrototypesHook(loss_cfg.get("freeze_prototypes_niters", 0)), SwAVQueueHook()]


def plugin_hooks(cfg) -> List[ClassyHook]:
    """The plugin's hooks for ``cfg``: the schedule's, its loss's if any, then
    the monitors of ``config.SWAV_PLUGIN.MONITOR``
    (:func:`swav_vissl_plugin.monitoring.monitoring_hooks`; after the loss's
    hooks, so they see each step's finished state)."""
    from swav_vissl_plugin.data_source import UnreadableImagesHook
    from swav_vissl_plugin.monitoring import monitoring_hooks
    from swav_vissl_plugin.nonfinite import NonFiniteLossHook

    # NonFiniteLossHook first: its on_update check must precede every other
    # hook's reaction to the step (see swav_vissl_plugin/nonfinite.py).
    hooks: List[ClassyHook] = [NonFiniteLossHook(), UnreadableImagesHook(), WarmupCosineIterationsHook()]
    if cfg.LOSS.name in LOSS_HOOKS:
        hooks += LOSS_HOOKS[cfg.LOSS.name](cfg)
    hooks += monitoring_hooks(cfg)
    return hooks


def swav_plugin_hook_generator(cfg) -> List[ClassyHook]:
    """VISSL's ``default_hook_generator`` plus the plugin's hooks."""
    # Imported here as VISSL's launcher does: submitit jobs must import it late.
    from vissl.hooks import CheckNanLossHook, CheckNanModelOutputHook, LogLossMetricsCheckpointHook, default_hook_generator

    ours = plugin_hooks(cfg)
    logging.info("swav_vissl_plugin hooks: %s", [type(h).__name__ for h in ours])
    # NonFiniteLossHook replaces VISSL's NaN checks (HOOKS.CHECK_NAN), which
    # name no rank and try to checkpoint the broken model.
    vissl = [h for h in default_hook_generator(cfg) if not isinstance(h, (CheckNanLossHook, CheckNanModelOutputHook))]
    # The plugin's checkpoint hook replaces VISSL's and goes last, with the
    # resume hook: a checkpoint then holds every other hook's work of the step,
    # and restored random streams are drawn from by the training step first.
    from swav_vissl_plugin.checkpoint_hook import checkpoint_hooks

    vissl = [h for h in vissl if type(h) is not LogLossMetricsCheckpointHook]
    return vissl + ours + checkpoint_hooks(cfg)
