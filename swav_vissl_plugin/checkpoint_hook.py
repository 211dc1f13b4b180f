"""Checkpoints that survive a kill, carry what an exact resume needs, and
never hold a non-finite model; and the hook that restores, on resume, what
VISSL's own resume leaves out.

:class:`PluginCheckpointHook` takes the place of VISSL's
``LogLossMetricsCheckpointHook`` in :func:`swav_vissl_plugin.hooks.swav_plugin_hook_generator`.
It checkpoints at the same moments, under the same names and with the same
content (phase checkpoints every ``CHECKPOINT.CHECKPOINT_FREQUENCY`` epochs and
at the last one, ``model_final_checkpoint_phase<N>.torch``; iteration
checkpoints every ``CHECKPOINT.CHECKPOINT_ITER_FREQUENCY`` iterations; the
``checkpoint.torch`` link to the newest), and differs where VISSL loses work
(docs/checkpointing.md):

* **atomic files** (:func:`write_atomically`): the content goes to a
  temporary file in the same folder (a name VISSL and the resume never take
  for a checkpoint), is flushed and fsynced, then renamed over the final
  name, and the folder is fsynced; the link is replaced the same way. A kill
  at any moment leaves either the previous file or the new one, never a
  truncated one. VISSL writes the final name directly and removes the link
  before recreating it.
* **resume metadata**: ``checkpoint["swav_plugin"]`` per the checkpoint
  schema (world size, batch sizes, iterations per phase, mode, and the RNG
  state of every rank, gathered with ``all_gather_object`` whenever a
  checkpoint is due), read back by :mod:`swav_vissl_plugin.resume`.
* **no non-finite checkpoint**: once any rank has seen a non-finite model
  output or loss, or holds a non-finite parameter, when a checkpoint falls
  due, no checkpoint is written for the rest of the run (VISSL's hook
  *writes* one when the output is NaN), so the newest checkpoint is always the
  last good one.
* **bounded disk use**: after an iteration checkpoint, older iteration
  checkpoints beyond the newest
  ``SWAV_PLUGIN.CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS`` are deleted
  (never a phase checkpoint, never one newer than the file just written).

:class:`ResumeStateHook`, the last hook, restores each rank's random streams
and the interrupted phase's loss history from the resume checkpoint.
"""

import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from classy_vision.generic.distributed_util import get_rank, is_primary
from classy_vision.hooks.classy_hook import ClassyHook
from vissl.hooks.log_hooks import LogLossMetricsCheckpointHook
from vissl.utils.checkpoint import CheckpointItemType, is_checkpoint_phase

from swav_vissl_plugin import rng_state
from swav_vissl_plugin.checkpoints import (  # noqa: F401  (re-exported)
    LINK_NAME,
    TEMP_MARKER,
    _fsync_folder,
    _temp_path,
    point_link,
    write_atomically,
)
from swav_vissl_plugin.hooks import NoopHook
from swav_vissl_plugin.resume import start_iteration

__all__ = [
    "checkpoint_hooks",
    "PluginCheckpointHook",
    "ResumeStateHook",
    "write_atomically",
    "point_link",
    "checkpoint_name",
    "TEMP_MARKER",
    "LINK_NAME",
    "SCHEMA_VERSION",
]

_LOG = "swav_vissl_plugin"
#: Version of ``checkpoint["swav_plugin"]``.
SCHEMA_VERSION = 1
ITERATION_FILE = re.compile(r"^model_iteration(\d+)\.torch$")
#: Default number of iteration checkpoints kept (the newest and one before it,
#: so that a damaged newest one still leaves an iteration checkpoint to resume from).
DEFAULT_KEEP_ITERATION_CHECKPOINTS = 2


def checkpoint_name(mode: str, mode_num: int, final: bool) -> str:
    """VISSL's file names (``CheckpointWriter.get_checkpoint_name``)."""
    if final:
        return f"model_final_checkpoint_{mode}{mode_num}.torch"
    return f"model_{mode}{mode_num}.torch"


def _unlink(paths) -> List[str]:
    """Delete ``paths``; returns those that existed."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def remove_stale_temporaries(folder: str) -> List[str]:
    """Delete the temporary files a killed writer left in ``folder``."""
    if not os.path.isdir(folder):
        return []
    return _unlink(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(".") and TEMP_MARKER in n)


def prune_iteration_checkpoints(folder: str, current: int, keep: int) -> List[str]:
    """Delete ``model_iteration<i>.torch`` for ``i < current`` except the
    newest ``keep - 1`` of them (with ``model_iteration<current>.torch``,
    ``keep`` remain). Files numbered above ``current`` (left by a run that
    resumed from an earlier checkpoint) are not touched. ``keep <= 0`` keeps all."""
    if keep <= 0:
        return []
    older = sorted(
        (int(m.group(1)) for m in map(ITERATION_FILE.match, os.listdir(folder)) if m and int(m.group(1)) < current),
        reverse=True,
    )
    return _unlink(os.path.join(folder, f"model_iteration{i}.torch") for i in older[max(keep - 1, 0):])


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _gather(obj) -> List[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _keep_iteration_checkpoints(cfg) -> int:
    plugin = cfg.get("SWAV_PLUGIN") or {}
    value = (plugin.get("CHECKPOINT") or {}).get("KEEP_LAST_ITERATION_CHECKPOINTS", DEFAULT_KEEP_ITERATION_CHECKPOINTS)
    if value is None:
        return DEFAULT_KEEP_ITERATION_CHECKPOINTS
    if isinstance(value, bool) or int(value) != value:
        from swav_vissl_plugin.config import ConfigError

        raise ConfigError(f"SWAV_PLUGIN.CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS: expected an integer, got {value!r}")
    return int(value)


class PluginCheckpointHook(LogLossMetricsCheckpointHook):
    """VISSL's checkpoint hook with atomic files, resume metadata and no
    checkpoint of a non-finite model (see the module docstring)."""

    def __init__(self, world_size: int, keep_iteration_checkpoints: int = DEFAULT_KEEP_ITERATION_CHECKPOINTS):
        super().__init__(world_size)
        self.keep_iteration_checkpoints = int(keep_iteration_checkpoints)
        #: (rank, iteration, what) of the first non-finite value this rank saw
        self.local_nonfinite: Optional[Dict[str, Any]] = None
        #: set on every rank once any rank reported a non-finite value
        self.stopped_by: Optional[List[Dict[str, Any]]] = None

    @classmethod
    def from_config(cls, cfg) -> "PluginCheckpointHook":
        world = int(cfg.DISTRIBUTED.NUM_NODES) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
        return cls(world, _keep_iteration_checkpoints(cfg))

    # --------------------------------------------------------------- events
    def on_start(self, task) -> None:
        if is_primary() and task.checkpoint_folder:
            for path in remove_stale_temporaries(task.checkpoint_folder):
                logging.info("swav_vissl_plugin: removed %s, left by an interrupted checkpoint write", path)

    def on_forward(self, task) -> None:
        # Replaces VISSL's, which writes a checkpoint of the NaN model.
        output = task.last_batch.model_output
        pending = list(output) if isinstance(output, (list, tuple)) else [output]
        flat = []
        while pending:
            x = pending.pop()
            if isinstance(x, (list, tuple)):
                pending.extend(x)
            elif isinstance(x, torch.Tensor):
                flat.append(x)
        if task.train and self.local_nonfinite is None and not _all_finite(flat):
            self._note_nonfinite(task, "model output")

    def on_loss_and_meter(self, task) -> None:
        loss = getattr(task.last_batch, "loss", None)
        if task.train and self.local_nonfinite is None and loss is not None and not _all_finite([loss]):
            self._note_nonfinite(task, "loss")

    def _note_nonfinite(self, task, what: str) -> None:
        self.local_nonfinite = {"rank": get_rank(), "iteration": int(task.iteration), "what": what}
        logging.error(
            "swav_vissl_plugin: non-finite %s at iteration %d on rank %d: no checkpoint is "
            "written from now on; the newest checkpoint stays the last good one",
            what, task.iteration, get_rank(),
        )

    # ----------------------------------------------------------- checkpoint
    def _checkpoint_model(self, task, mode_frequency: int, mode_num: int, mode: str = "phase"):
        from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

        if isinstance(task.base_model, FSDP):
            raise NotImplementedError("swav_vissl_plugin checkpoints consolidated (non-FSDP) models only")
        train_phase_idx = task.train_phase_idx
        due = is_checkpoint_phase(mode_num, mode_frequency, train_phase_idx, task.num_train_phases, mode)
        final = train_phase_idx == task.num_train_phases - 1 and task.train and mode == "phase"
        if not (task.train and (due or final)):
            return
        if hasattr(task.optimizer, "consolidate_state_dict") and mode != "phase":
            task.optimizer.consolidate_state_dict()

        # Every rank takes part: the RNG of each rank, and whether any rank
        # has gone non-finite (then the primary must not write either).
        nonfinite = self.local_nonfinite
        if nonfinite is None and not _all_finite(p.detach() for p in task.base_model.parameters()):
            self._note_nonfinite(task, "parameter")
            nonfinite = self.local_nonfinite
        gathered = _gather({"rng": rng_state.capture(), "nonfinite": nonfinite})
        bad = [g["nonfinite"] for g in gathered if g["nonfinite"] is not None]
        if bad or self.stopped_by:
            self.stopped_by = self.stopped_by or bad
            logging.error(
                "swav_vissl_plugin: %s checkpoint %d not written: non-finite values %s",
                mode, mode_num, self.stopped_by,
            )
            return
        if not is_primary():
            return

        folder = task.checkpoint_folder
        content = self._content(task, mode)
        content["swav_plugin"] = self._metadata(task, mode, [g["rng"] for g in gathered])
        content["type"] = CheckpointItemType.consolidated.name
        name = checkpoint_name(mode, mode_num, final)
        logging.info("[%s: %d] Saving checkpoint to %s", mode, mode_num, folder)
        write_atomically(os.path.join(folder, name), lambda f: torch.save(content, f))
        point_link(folder, name)
        logging.info("Saved checkpoint: %s/%s", folder, name)
        if mode == "iteration":
            for path in prune_iteration_checkpoints(folder, mode_num, self.keep_iteration_checkpoints):
                logging.info("swav_vissl_plugin: removed old iteration checkpoint %s", path)

    @staticmethod
    def _content(task, mode: str) -> Dict[str, Any]:
        """VISSL's checkpoint content (``_checkpoint_model``), unchanged: an
        iteration checkpoint restarts the phase it was taken in."""
        state = task.get_classy_state()
        train_phase_idx = task.train_phase_idx
        restart_phase = task.phase_idx
        if mode == "iteration":
            state["phase_idx"] = state["phase_idx"] - 1
            train_phase_idx -= 1
            state["train_phase_idx"] = train_phase_idx
            restart_phase -= 1
        return {
            "phase_idx": restart_phase,
            "iteration": task.iteration,
            "loss": task.loss.state_dict(),
            "iteration_num": task.local_iteration_num,
            "train_phase_idx": train_phase_idx,
            "classy_state_dict": state,
        }

    @staticmethod
    def _metadata(task, mode: str, rng: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = int(task.config["DATA"]["TRAIN"]["BATCHSIZE_PER_REPLICA"])
        world = len(rng)
        return {
            "version": SCHEMA_VERSION,
            "world_size": world,
            "batch_size_per_gpu": batch,
            "global_batch_size": world * batch,
            "iterations_per_phase": len(task.dataloaders["train"]),
            "mode": mode,
            "rng": rng,
        }


class ResumeStateHook(NoopHook):
    """Puts back what VISSL's resume does not: each rank's random streams
    (``checkpoint["swav_plugin"]["rng"]``, only when the world size is
    unchanged) and, inside a phase, the phase's loss history. Does nothing on
    a fresh start. Must be the last hook, so nothing draws from the restored
    streams before the training step does.

    After a phase checkpoint the streams are restored at ``on_start``, before
    the trainer recreates the data iterator: ``iter(DataLoader)`` draws its
    base seed from torch's generator, as the uninterrupted run did right
    after writing that checkpoint. After an iteration checkpoint they are
    restored at the phase start, after that draw, which the uninterrupted
    run did not make in the middle of its phase."""

    def __init__(self):
        super().__init__()
        self._pending_rng: Optional[Dict[str, Any]] = None
        self._pending_losses: Optional[list] = None

    def _rng_for_this_rank(self, task) -> Optional[Dict[str, Any]]:
        meta = task.checkpoint.get("swav_plugin")
        if not meta or not meta.get("rng"):
            return None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if int(meta.get("world_size", -1)) != world or len(meta["rng"]) != world:
            logging.info(
                "%s: checkpoint written by %s rank(s), resumed on %d: random streams start "
                "from this run's seeds", _LOG, meta.get("world_size"), world,
            )
            return None
        return meta["rng"][get_rank()]

    def on_start(self, task) -> None:
        if task.checkpoint is None:
            return
        rng = self._rng_for_this_rank(task)
        if start_iteration(task) > 0:
            # inside a phase: restore after the trainer recreated the data iterator
            self._pending_rng = rng
            self._pending_losses = list(task.checkpoint["classy_state_dict"].get("losses") or [])
        elif rng is not None:
            rng_state.restore(rng)
            logging.info("%s: random streams of rank %d restored from the checkpoint", _LOG, get_rank())

    def on_phase_start(self, task) -> None:
        if self._pending_losses is None or not task.train:
            return
        task.losses = self._pending_losses
        self._pending_losses = None
        if self._pending_rng is not None:
            rng_state.restore(self._pending_rng)
            self._pending_rng = None
            logging.info("%s: random streams of rank %d restored from the checkpoint", _LOG, get_rank())


def checkpoint_hooks(cfg) -> List[ClassyHook]:
    """The hooks that take the place of VISSL's checkpoint hook, in order
    (they must come after every other hook)."""
    return [PluginCheckpointHook.from_config(cfg), ResumeStateHook()]
