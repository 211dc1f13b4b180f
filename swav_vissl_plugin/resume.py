"""Resuming a killed run on the trajectory it was on.

The pieces, installed by :mod:`swav_vissl_plugin.compat` and
:func:`swav_vissl_plugin.hooks.swav_plugin_hook_generator`
(docs/checkpointing.md describes the whole path):

* :func:`find_resume_checkpoint` / :func:`get_resume_checkpoint` choose the
  file to resume from: the newest readable checkpoint by training progress
  (the ``iteration`` it holds) among phase, iteration and final checkpoints.
  Each candidate is validated before it is chosen (every zip record's CRC,
  then ``torch.load(weights_only=True)`` of its structure); an unreadable one
  is reported with a warning naming it and the next newest is taken. VISSL's
  own choice looks only at ``model_iteration*`` once iteration checkpoints
  are on (an earlier, newer phase checkpoint is ignored; none yet gives the
  path ``<dir>/None``) and never checks that the file loads.
* :class:`ResumeCheckpointLoader` is what VISSL's task loads the resume
  checkpoint with: it hands the loaded dict to
  ``swav_vissl_plugin.world_size.adapt_checkpoint`` before VISSL reads any
  counter from it, and corrects VISSL's
  off-by-one in ``iteration_num`` after an iteration checkpoint.
* :func:`start_iteration` and :func:`continues_phase` say where in its
  phase the run resumes: :class:`swav_vissl_plugin.checkpoint_hook.ResumeStateHook`
  restores the random streams at the right moment with them, and hooks whose
  ``on_phase_start`` begins an epoch (DeepCluster-v2's clustering) skip it
  when the phase had already begun before the checkpoint (its start-of-phase
  state was restored with it).
"""

import contextlib
import contextvars
import logging
import os
import re
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from vissl.utils.checkpoint import CheckpointLoader

from swav_vissl_plugin import world_size


__all__ = [
    "find_resume_checkpoint",
    "get_resume_checkpoint",
    "is_training_finished",
    "read_checkpoint",
    "checkpoint_problem",
    "UnreadableCheckpoint",
    "ResumeCheckpointLoader",
    "start_iteration",
    "continues_phase",
    "resume_config",
]

_PREFIX = "swav_vissl_plugin"
_PHASE = re.compile(r"^model_phase(\d+)\.torch$")
_FINAL = re.compile(r"^model_final_checkpoint_phase(\d+)\.torch$")
_ITERATION = re.compile(r"^model_iteration(\d+)\.torch$")
#: keys every resumable training checkpoint has
_REQUIRED = ("phase_idx", "iteration", "iteration_num", "train_phase_idx", "classy_state_dict")

# The config of the training this process runs; set around the trainer's
# train() (see compat.patch_trainer_resume_context), read by the loader.
_CONFIG: contextvars.ContextVar = contextvars.ContextVar("swav_plugin_resume_config", default=None)


# ---------------------------------------------------------------- selection
class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be resumed from; the message says why."""


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The training checkpoint at ``path``, validated, or
    :class:`UnreadableCheckpoint`. Reads the whole file once (the CRC of every
    record of torch's zip format; ``torch.load`` itself does not check them)
    and unpickles it with ``weights_only=True`` (tensors mapped, not copied;
    a file in torch's pre-1.6 format is loaded whole)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise UnreadableCheckpoint(f"record {bad} fails its CRC check")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:  # torch's legacy format (or not a checkpoint at all): a full load decides
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UnreadableCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001  (any failure to read = not usable)
        first = str(e).splitlines()[0] if str(e) else ""
        raise UnreadableCheckpoint(f"{type(e).__name__}: {first}".rstrip(": ")) from None
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise UnreadableCheckpoint(f"not a training checkpoint (no {', '.join(missing)})")
    return state


def checkpoint_problem(path: str) -> Optional[str]:
    """``None`` when :func:`read_checkpoint` accepts ``path``, else why not."""
    try:
        read_checkpoint(path)
    except UnreadableCheckpoint as e:
        return str(e)
    return None


def _candidates(folder: str, skip_final: bool) -> Tuple[List[str], List[str]]:
    """Phase (and final) checkpoints and iteration checkpoints of ``folder``,
    each list newest first by the number in its name."""
    phases, iterations = [], []
    for name in os.listdir(folder):
        for pattern, out in ((_PHASE, phases), (_ITERATION, iterations), (_FINAL, None if skip_final else phases)):
            m = pattern.match(name)
            if m and out is not None:
                out.append((int(m.group(1)), 1 if pattern is _FINAL else 0, os.path.join(folder, name)))
    return [p for *_, p in sorted(phases, reverse=True)], [p for *_, p in sorted(iterations, reverse=True)]


def _newest_first(folder: str, skip_final: bool) -> Iterator[str]:
    """Readable checkpoints of ``folder``, newest training progress first.

    Within each kind the numbers in the names order the files; across kinds
    the ``iteration`` stored in the two newest readable files decides, so
    only a few files are opened however many phase checkpoints there are."""
    lists = list(_candidates(folder, skip_final))  # [phases and finals, iterations]
    heads: List[Optional[Tuple[Tuple[int, int], str]]] = [None, None]
    while True:
        for i, files in enumerate(lists):
            while heads[i] is None and files:
                path = files.pop(0)
                try:
                    state = read_checkpoint(path)
                except UnreadableCheckpoint as problem:
                    logging.warning(
                        "%s: checkpoint %s is unreadable (%s); resuming from an earlier checkpoint",
                        _PREFIX, path, problem,
                    )
                    continue
                # at the same iteration a phase (or final) checkpoint, written
                # after the phase ended, comes after the iteration checkpoint
                heads[i] = ((int(state["iteration"]), 1 - i), path)
        ready = [h for h in heads if h is not None]
        if not ready:
            return
        best = max(ready)
        heads[heads.index(best)] = None
        yield best[1]


def find_resume_checkpoint(folder: str, skip_final: bool = False, nth: int = 1) -> Optional[str]:
    """The checkpoint of ``folder`` to resume from: the ``nth`` newest
    readable one (``CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM``; beyond
    the oldest, the oldest), final checkpoints skipped when ``skip_final``
    (``CHECKPOINT.OVERWRITE_EXISTING``); ``None`` when there is none."""
    if not os.path.isdir(folder):
        return None
    chosen = None
    for count, path in enumerate(_newest_first(folder, skip_final), start=1):
        chosen = path
        if count >= max(int(nth), 1):
            break
    return chosen


def get_resume_checkpoint(cfg, checkpoint_folder: str) -> Optional[str]:
    """Drop-in for ``vissl.utils.checkpoint.get_resume_checkpoint`` (same
    arguments, same ``Resume from file:`` log line), choosing with
    :func:`find_resume_checkpoint`."""
    ck = cfg["CHECKPOINT"]
    if not ck["AUTO_RESUME"]:
        return None
    path = find_resume_checkpoint(
        checkpoint_folder,
        skip_final=bool(ck["OVERWRITE_EXISTING"]),
        nth=int(ck["LATEST_CHECKPOINT_RESUME_FILE_NUM"]),
    )
    if path is not None:
        logging.info("Resume from file: %s", path)
    return path


def is_training_finished(cfg, checkpoint_folder: str) -> bool:
    """Drop-in for ``vissl.utils.checkpoint.is_training_finished``: finished
    when a *readable* final checkpoint exists (and ``OVERWRITE_EXISTING`` is
    off). An unreadable one is reported, and the run resumes from the newest
    readable checkpoint before it."""
    if cfg["CHECKPOINT"]["OVERWRITE_EXISTING"] or not os.path.isdir(checkpoint_folder):
        return False
    for name in sorted(os.listdir(checkpoint_folder)):
        if _FINAL.match(name):
            path = os.path.join(checkpoint_folder, name)
            problem = checkpoint_problem(path)
            if problem is None:
                return True
            logging.warning(
                "%s: final checkpoint %s is unreadable (%s); the run is not finished and resumes "
                "from an earlier checkpoint", _PREFIX, path, problem,
            )
    return False


# ------------------------------------------------------------------ loading
@contextlib.contextmanager
def resume_config(cfg):
    """Within this context, :class:`ResumeCheckpointLoader` adapts the
    checkpoints it loads to ``cfg``."""
    token = _CONFIG.set(cfg)
    try:
        yield
    finally:
        _CONFIG.reset(token)


def describe_resume(checkpoint: Dict[str, Any], cfg) -> str:
    """One line: where the checkpoint resumes and on what, e.g. ``resuming at
    iteration 7 (epoch 1, 3 of 4 iterations done), written by 2 rank(s) x 16
    images (iteration checkpoint); this run: 2 rank(s) x 16 images``."""
    meta = checkpoint.get("swav_plugin") or {}
    iteration, epoch = int(checkpoint["iteration"]), int(checkpoint["train_phase_idx"]) + 1
    n = meta.get("iterations_per_phase")
    where = f"resuming at iteration {iteration} (epoch {epoch}"
    if n:
        where += f", {iteration - epoch * int(n)} of {n} iterations done"
    where += ")"
    if meta:
        where += f", written by {meta['world_size']} rank(s) x {meta['batch_size_per_gpu']} images ({meta['mode']} checkpoint)"
    if cfg is not None:
        world = int(cfg.DISTRIBUTED.NUM_NODES) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
        where += f"; this run: {world} rank(s) x {int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA)} images"
    return where


def prepare_checkpoint(checkpoint: Dict[str, Any], cfg) -> Dict[str, Any]:
    """What the resume path does to a loaded checkpoint before VISSL reads it:

    * ``swav_vissl_plugin.world_size.adapt_checkpoint(checkpoint, cfg)`` (it
      restates the counters for another world size, docs/world_size.md);
    * after a plugin iteration checkpoint, ``iteration_num - 1``: VISSL's
      trainer adds one when it restarts the interrupted phase, which the
      uninterrupted run did not (the counter only feeds logging).
    """
    meta = checkpoint.get("swav_plugin")
    logging.info("%s: %s", _PREFIX, describe_resume(checkpoint, cfg))
    if meta is None:
        logging.warning(
            "%s: the resume checkpoint has no swav_plugin metadata (written without the plugin): "
            "world size unknown, random streams not restored", _PREFIX,
        )
    if cfg is not None:
        checkpoint = world_size.adapt_checkpoint(checkpoint, cfg)
    if meta is not None and meta.get("mode") == "iteration":
        checkpoint["iteration_num"] = int(checkpoint["iteration_num"]) - 1
    return checkpoint


class ResumeCheckpointLoader(CheckpointLoader):
    """VISSL's ``CheckpointLoader`` whose resume load goes through
    :func:`prepare_checkpoint`; loading initial weights
    (``MODEL.WEIGHTS_INIT``) is left as it is."""

    @classmethod
    def load_and_broadcast_checkpoint(cls, checkpoint_folder: str, checkpoint_path: str, device):
        checkpoint = CheckpointLoader.load_and_broadcast_checkpoint(checkpoint_folder, checkpoint_path, device)
        return prepare_checkpoint(checkpoint, _CONFIG.get())

    @classmethod
    def load_and_broadcast_init_weights(cls, checkpoint_path: str, device):
        return CheckpointLoader.load_and_broadcast_init_weights(checkpoint_path, device)


# ------------------------------------------------------------- restoration
def start_iteration(task) -> int:
    """Iterations of the resumed phase done before the checkpoint (0 after a
    phase checkpoint or without one): VISSL's data-sampler offset."""
    if task.checkpoint is None or "train" not in task.dataloaders:
        return 0
    return task._compute_start_iter_from_checkpoint("train")


def continues_phase(task) -> bool:
    """Whether the current training phase started before the resume
    checkpoint was written (an iteration checkpoint taken inside it): its
    ``on_phase_start`` work is already in the checkpoint and must not run
    again."""
    ck = task.checkpoint
    return (
        ck is not None
        and bool(task.train)
        and task.train_phase_idx == int(ck["train_phase_idx"]) + 1
        and start_iteration(task) > 0
    )
