"""Stop training at the first non-finite loss, model output or parameter.

Implements "a non-finite loss stops the run with a message naming the
iteration and rank, writes the offending scores for debugging, and never
overwrites the last good checkpoint" (checkpoints-and-failures work, "Bad
inputs"); user documentation: ``docs/data.md``.

What is computed
----------------
:class:`NonFiniteLossHook` runs at ``on_update`` of every training iteration:
after the loss, backward and optimizer step, and before VISSL's ``on_step``
hooks, where checkpoints are written. Each rank sets bits in its slot of a
world-size vector:

* 1: its local loss (taken from the loss module's forward) is not finite;
* 2: its model output (the head's embeddings and prototype scores, every
  head) has a non-finite value;
* 4: a parameter is not finite after the optimizer step (weights that
  overflowed while the loss was still finite);
* 8: the all-reduced loss that VISSL logs is not finite;

and one ``all_reduce`` (sum) gives every rank every rank's bits. When any is
set, the offending ranks (those with bit 1, 2 or 4; every rank when only the
all-reduced loss is non-finite) each write
``<checkpoint dir>/nonfinite_iter{N}_rank{R}.torch`` (atomically; loadable
with ``torch.load(weights_only=True)``) holding the iteration, the rank, the
reasons, the local and all-reduced loss, the model output (scores) and the
batch's ``data_idx`` / ``data_valid``, and the names of non-finite
parameters; all ranks wait until the files exist, then every rank raises
:class:`NonFiniteLossError` naming the iteration, the offending ranks and the
files. ``N`` is ``task.iteration`` at the failing step: the 0-based training
iteration, i.e. the number of updates completed before it.

Why here
--------
Raising before ``on_step`` means the failing iteration never reaches a
checkpoint hook: no checkpoint is written at or after iteration ``N``, and
the newest checkpoint on disk (from before ``N``) is left as it is. The
parameter check catches the one case the loss cannot: an update that makes
the weights overflow at iteration ``N`` with a finite loss, whose iteration
checkpoint would otherwise hold them. It replaces VISSL's ``CheckNanLossHook``
and ``CheckNanModelOutputHook`` (``HOOKS.CHECK_NAN``), which stop without
saying which rank failed, and the second of which tries to write an
iteration checkpoint of the broken model.
"""

import logging
import os
from typing import Any, Dict, List, Optional

import torch

from swav_vissl_plugin.hooks import NoopHook

__all__ = ["NonFiniteLossError", "NonFiniteLossHook", "debug_file", "LOCAL_LOSS", "MODEL_OUTPUT", "PARAMETERS", "REDUCED_LOSS"]

LOCAL_LOSS, MODEL_OUTPUT, PARAMETERS, REDUCED_LOSS = 1, 2, 4, 8
_REASONS = {
    LOCAL_LOSS: "loss",
    MODEL_OUTPUT: "model output (prototype scores)",
    PARAMETERS: "parameters after the optimizer step",
}
#: How many non-finite parameter names the debug file and message list.
_MAX_PARAMS = 20


class NonFiniteLossError(RuntimeError):
    """A training iteration produced a non-finite loss, output or parameter."""


def debug_file(folder: str, iteration: int, rank: int) -> str:
    """Where rank ``rank`` writes the debug data of ``iteration``."""
    return os.path.join(folder, f"nonfinite_iter{iteration}_rank{rank}.torch")


def _tensors(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def _nonfinite(tensors: List[torch.Tensor], device) -> torch.Tensor:
    """0-d bool tensor: any value of ``tensors`` is NaN or infinite (no host sync)."""
    tensors = [t.detach() for t in tensors if t.is_floating_point() or t.is_complex()]
    if not tensors:
        return torch.zeros((), dtype=torch.bool, device=device)
    # max |x| per tensor in one fused call: NaN and inf survive, finite values cannot overflow
    norms = torch._foreach_norm(tensors, float("inf"))
    return ~torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, (list, tuple)):
        return [_cpu(y) for y in x]
    if isinstance(x, dict):
        return {str(k): _cpu(v) for k, v in x.items()}
    return None


class NonFiniteLossHook(NoopHook):
    """See the module docstring."""

    def __init__(self):
        super().__init__()
        self._local_loss: Optional[torch.Tensor] = None
        self._handle = None

    def on_start(self, task) -> None:
        loss = getattr(task, "loss", None)
        if isinstance(loss, torch.nn.Module) and self._handle is None:
            self._handle = loss.register_forward_hook(self._keep_local_loss)

    def _keep_local_loss(self, module, inputs, output) -> None:
        self._local_loss = output.detach() if isinstance(output, torch.Tensor) else None

    def on_end(self, task) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_update(self, task) -> None:
        if not task.train:
            return
        device = task.device
        last = task.last_batch
        bits = torch.zeros((), dtype=torch.int32, device=device)
        if self._local_loss is not None:
            bits += LOCAL_LOSS * _nonfinite([self._local_loss], device).int()
        bits += MODEL_OUTPUT * _nonfinite(_tensors(getattr(last, "model_output", None)), device).int()
        bits += PARAMETERS * _nonfinite(list(task.base_model.parameters()), device).int()
        reduced = getattr(last, "loss", None)
        if reduced is not None:
            bits += REDUCED_LOSS * _nonfinite([reduced], device).int()

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        flags = torch.zeros(world, dtype=torch.int32, device=device)
        flags[rank] = bits
        if distributed and world > 1:
            torch.distributed.all_reduce(flags)
        flags = flags.tolist()
        if not any(flags):
            return
        self._stop(task, flags, rank, distributed and world > 1)

    def _stop(self, task, flags: List[int], rank: int, distributed: bool) -> None:
        iteration = int(task.iteration)
        offending = [r for r, f in enumerate(flags) if f & (LOCAL_LOSS | MODEL_OUTPUT | PARAMETERS)]
        if not offending:  # only the mean over ranks overflowed: every rank's data is evidence
            offending = list(range(len(flags)))
        folder = getattr(task, "checkpoint_folder", None)
        if not folder:
            from vissl.utils.checkpoint import get_checkpoint_folder

            folder = get_checkpoint_folder(task.config)
        reasons = [text for bit, text in _REASONS.items() if flags[rank] & bit]
        if rank in offending:
            self._write(task, debug_file(folder, iteration, rank), iteration, rank, len(flags), reasons)
        if distributed:
            torch.distributed.barrier()  # every file exists before any rank raises
        described = "; ".join(
            f"rank {r}: {', '.join(t for b, t in _REASONS.items() if flags[r] & b) or 'all-reduced loss'}"
            for r in offending
        )
        reduced = getattr(task.last_batch, "loss", None)
        message = (
            f"non-finite values at training iteration {iteration} (0-based; train phase "
            f"{task.train_phase_idx}; all-reduced loss {float(reduced) if reduced is not None else 'n/a'}) "
            f"on rank(s) {offending} ({described}); raised on rank {rank}. Scores, loss and data_idx: "
            f"{', '.join(debug_file(folder, iteration, r) for r in offending)}. Training stopped before "
            f"this iteration's checkpoint hooks: no checkpoint holds iteration {iteration}; the newest "
            f"one in {folder} is the last good state."
        )
        logging.error("swav_vissl_plugin: %s", message)
        raise NonFiniteLossError(message)

    def _write(self, task, path: str, iteration: int, rank: int, world: int, reasons: List[str]) -> None:
        from swav_vissl_plugin.checkpoints import save_atomic

        last = task.last_batch
        sample = getattr(last, "sample", None) or {}
        data_idx = sample.get("data_idx")
        if isinstance(data_idx, (list, tuple)) and data_idx:
            data_idx = data_idx[0]
        bad_params = [
            name
            for name, p in task.base_model.named_parameters()
            if not bool(torch.isfinite(p.detach()).all())
        ]
        record: Dict[str, Any] = {
            "iteration": iteration,
            "train_phase_idx": int(task.train_phase_idx),
            "rank": rank,
            "world_size": world,
            "reasons": reasons,
            "loss": _cpu(self._local_loss),
            "all_reduced_loss": _cpu(getattr(last, "loss", None)),
            "model_output": _cpu(getattr(last, "model_output", None)),
            "data_idx": _cpu(data_idx),
            "data_valid": _cpu(sample.get("data_valid")),
            "nonfinite_parameters": bad_params[:_MAX_PARAMS],
            "num_nonfinite_parameters": len(bad_params),
        }
        save_atomic(record, path, overwrite=True)
        logging.error("swav_vissl_plugin: rank %d wrote %s", rank, path)
