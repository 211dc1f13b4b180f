"""SwAV loss for VISSL, registered as ``swav_plugin_loss``.

The math lives in :mod:`swav_vissl_plugin.sinkhorn`; this class only adds what
needs state: the embedding queue of the small-batch recipes (``docs/recipe.md``
rows 5, 6 and 14) and its checkpointing.

Config (``LOSS.swav_plugin_loss``; names are the SwAV release's arguments,
defaults its defaults):

=========================  ==========================================================
``num_crops``              total crops per image (required, >= 2), e.g. 8
``crops_for_assign``       crops whose codes are targets, default ``[0, 1]``
``temperature``            softmax temperature, default 0.1
``epsilon``                Sinkhorn regularisation, default 0.05
``sinkhorn_iterations``    default 3
``nmb_prototypes``         int or one int per head (checked against the scores;
                           absent: not checked)
``queue_length``           total over all ranks, 0 = no queue (default)
``local_queue_length``     per rank; absent/None: ``queue_length`` trimmed to a
                           multiple of ``global_batch_size`` (if given), then
                           divided by the world size
``epoch_queue_starts``     epoch from which the queue exists, default 15
``freeze_prototypes_niters``  consumed by the hooks, accepted here
``feat_dim``               embedding size (from swav_plugin_head); absent: not
                           checked. A restored queue of another size is refused
``output_dir``             accepted (VISSL convention), unused
=========================  ==========================================================

Queue semantics (the release's): one queue per assign crop of
``local_queue_length`` embeddings on each rank, created as zeros by
:meth:`SwAVPluginLoss.on_epoch_start` once ``epoch >= epoch_queue_starts``; every
forward pushes the batch's embeddings of that crop at the front (oldest rows
drop off the back); once full, its prototype scores under the *current*
prototypes (given each iteration by :meth:`SwAVPluginLoss.set_prototypes`) are
prepended to the batch's before Sinkhorn, and only the batch's codes are kept.

Checkpoints: VISSL saves ``task.loss.state_dict()`` on the primary rank only.
So that a multi-rank resume restores every rank's own queue, each rank keeps a
copy of all ranks' queues (the pushed embeddings are all-gathered, one small
collective per iteration while a queue exists, ``world_size * n_assign * B *
D`` floats); the state holds the ``(world_size, n_assign, L, D)`` tensor and
each rank takes back its own slice.

Resuming on another world size or queue length (``docs/world_size.md``):
:func:`reshard_queue` keeps the queue's global content and its age order.
Row ``j`` of every rank was pushed at the same iteration, so listing the rows
position by position (rank 0..W-1 at position 0, then at position 1, ...)
lists the whole queue newest first; the new ranks deal that list out in turn
(global row ``g`` goes to rank ``g mod W'``, position ``g // W'``), so every
rank's queue is again newest first and each push evicts the globally oldest
rows. A queue longer than the new total keeps its newest rows; a shorter one
counts as partly filled, so it is used once full, as the release's. A queue
of another number of assign crops or embedding size cannot be used: loading
it raises :class:`~swav_vissl_plugin.config.ConfigError` naming the key.
"""

import logging
import numbers
import pprint
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from classy_vision.losses import ClassyLoss, register_loss
from torch import Tensor

from swav_vissl_plugin.config import ConfigError
from swav_vissl_plugin.sinkhorn import (
    ScoreProduct,
    SinkhornWorkspace,
    sinkhorn_codes,
    swapped_prediction_loss,
)

__all__ = ["SwAVPluginLoss", "reshard_queue"]

_PREFIX = "LOSS.swav_plugin_loss"
_STATE_QUEUE = "queue"
_STATE_FILLED = "queue_filled"


def _world() -> "tuple[int, int]":
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cfg_get(config: Mapping, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else default
    return default if value is None else value


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{_PREFIX}.{key} must be an integer, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_PREFIX}.{key} must be a number, got {value!r}") from None


def _as_int_list(key: str, value: Any) -> List[int]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{_PREFIX}.{key} must be a list of integers, got {value!r}")
    return [_as_int(key, v) for v in value]


def _mean_entropy(codes: Tensor) -> Tensor:
    """Mean over samples of ``-sum_k q log q`` (0 log 0 = 0), as
    ``torch.special.entr(codes).sum(1).mean()`` but with the vectorised
    ``log`` (``entr`` is an order of magnitude slower on CPU)."""
    tiny = torch.finfo(codes.dtype).tiny
    return -(codes.clamp(min=tiny).log_().mul_(codes)).sum(1).mean()


def reshard_queue(queue: Tensor, filled: int, world_size: int, length: int) -> "tuple[Tensor, int, int]":
    """All ranks' queues restated for ``world_size`` ranks of ``length`` rows.

    Args:
        queue: ``(W, n_assign, L, D)``, every rank's queue newest row first.
        filled: rows ``[0, filled)`` of every rank hold embeddings.
        world_size, length: the new number of ranks and rows per rank.

    Returns:
        ``(queue', filled', dropped)``: ``queue'`` of shape ``(world_size,
        n_assign, length, D)``; global row ``g`` of the newest-first list
        (position ``g // W``, rank ``g % W``) is at rank ``g % world_size``,
        position ``g // world_size``; rows beyond the new total
        ``world_size * length`` (the oldest) are ``dropped``; ``filled'`` is
        the number of leading rows filled on every new rank.
    """
    old_world, n_assign, old_length, dim = queue.shape
    filled = min(max(int(filled), 0), old_length)
    rows = queue[:, :, :filled].permute(2, 0, 1, 3).reshape(filled * old_world, n_assign, dim)
    capacity = int(world_size) * int(length)
    kept = min(rows.shape[0], capacity)
    out = queue.new_zeros(capacity, n_assign, dim)
    out[:kept] = rows[:kept]
    out = out.view(length, world_size, n_assign, dim).permute(1, 2, 0, 3).contiguous()
    return out, kept // world_size, rows.shape[0] - kept


@register_loss("swav_plugin_loss")
class SwAVPluginLoss(ClassyLoss):
    """SwAV's swapped-prediction loss, averaged over prototype heads, with the
    release's optional embedding queue. See the module docstring for the
    config keys and the queue semantics."""

    def __init__(
        self,
        num_crops: int,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        nmb_prototypes: Optional[Sequence[int]] = None,
        local_queue_length: int = 0,
        epoch_queue_starts: int = 15,
        queue_length: Optional[int] = None,
        freeze_prototypes_niters: Optional[int] = None,
        output_dir: str = "",
        feat_dim: Optional[int] = None,
    ):
        super().__init__()
        self.num_crops = int(num_crops)
        self.crops_for_assign = [int(c) for c in crops_for_assign]
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.nmb_prototypes = (
            None if nmb_prototypes is None else [int(k) for k in nmb_prototypes]
        )
        self.local_queue_length = int(local_queue_length)
        self.queue_length = queue_length
        self.epoch_queue_starts = int(epoch_queue_starts)
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.output_dir = output_dir
        self.feat_dim = None if feat_dim is None else int(feat_dim)
        # All ranks' queues, (world_size, n_assign, L, D); a buffer so that
        # .to(device) moves it, non-persistent because the state is written by
        # _save_to_state_dict below (None must be saved too).
        self.register_buffer("_queue_all", None, persistent=False)
        self.queue_filled = 0
        self._queue_requested = False
        self._prototypes: Optional[List[Tensor]] = None
        self.last_stats: Dict[str, Any] = {}
        # Scratch buffer of Sinkhorn's (queue + batch) x K kernel, reused
        # from one iteration to the next (not state: never saved).
        self._workspace = SinkhornWorkspace()

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, loss_config: Mapping) -> "SwAVPluginLoss":
        """Build from ``LOSS.swav_plugin_loss`` (AttrDict or dict); unknown
        keys (VISSL adds ``name``) are ignored. Raises ``ValueError`` naming
        the key for invalid values."""
        cfg = loss_config

        def positive(key: str, default: float) -> float:
            value = _as_float(key, _cfg_get(cfg, key, default))
            if not value > 0:
                raise ValueError(f"{_PREFIX}.{key} must be > 0, got {value:g}")
            return value

        if _cfg_get(cfg, "num_crops") is None:
            raise ValueError(f"{_PREFIX}.num_crops is required (total crops per image)")
        num_crops = _as_int("num_crops", _cfg_get(cfg, "num_crops"))
        if num_crops < 2:
            raise ValueError(f"{_PREFIX}.num_crops must be >= 2, got {num_crops}")
        crops_for_assign = _as_int_list(
            "crops_for_assign", _cfg_get(cfg, "crops_for_assign", [0, 1])
        )
        if not crops_for_assign:
            raise ValueError(f"{_PREFIX}.crops_for_assign must not be empty")
        for crop in crops_for_assign:
            if not 0 <= crop < num_crops:
                raise ValueError(
                    f"{_PREFIX}.crops_for_assign entries must be in "
                    f"[0, num_crops={num_crops}), got {crops_for_assign}"
                )
        if len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(
                f"{_PREFIX}.crops_for_assign has duplicates: {crops_for_assign}"
            )
        temperature = positive("temperature", 0.1)
        epsilon = positive("epsilon", 0.05)
        iterations = _as_int(
            "sinkhorn_iterations", _cfg_get(cfg, "sinkhorn_iterations", 3)
        )
        if iterations < 1:
            raise ValueError(
                f"{_PREFIX}.sinkhorn_iterations must be >= 1, got {iterations}"
            )
        nmb_prototypes = _cfg_get(cfg, "nmb_prototypes")
        if nmb_prototypes is not None:
            nmb_prototypes = _as_int_list("nmb_prototypes", nmb_prototypes)
            if not nmb_prototypes or min(nmb_prototypes) < 1:
                raise ValueError(
                    f"{_PREFIX}.nmb_prototypes must be one or more positive "
                    f"integers, got {nmb_prototypes}"
                )
        queue_length = _as_int("queue_length", _cfg_get(cfg, "queue_length", 0))
        if queue_length < 0:
            raise ValueError(f"{_PREFIX}.queue_length must be >= 0, got {queue_length}")
        local = _cfg_get(cfg, "local_queue_length")
        if local is None:
            global_batch = _cfg_get(cfg, "global_batch_size")
            trimmed = queue_length
            if global_batch is not None:
                global_batch = _as_int("global_batch_size", global_batch)
                if global_batch < 1:
                    raise ValueError(
                        f"{_PREFIX}.global_batch_size must be >= 1, got {global_batch}"
                    )
                trimmed -= trimmed % global_batch
            local = trimmed // _world()[1]
            if queue_length > 0 and local == 0:
                logging.warning(
                    "%s.queue_length=%d is smaller than the global batch: no queue",
                    _PREFIX,
                    queue_length,
                )
        local = _as_int("local_queue_length", local)
        if local < 0:
            raise ValueError(f"{_PREFIX}.local_queue_length must be >= 0, got {local}")
        epoch_queue_starts = _as_int(
            "epoch_queue_starts", _cfg_get(cfg, "epoch_queue_starts", 15)
        )
        freeze = _cfg_get(cfg, "freeze_prototypes_niters")
        if freeze is not None:
            freeze = _as_int("freeze_prototypes_niters", freeze)
        feat_dim = _cfg_get(cfg, "feat_dim")
        if feat_dim is not None:
            feat_dim = _as_int("feat_dim", feat_dim)
            if feat_dim < 1:
                raise ValueError(f"{_PREFIX}.feat_dim must be >= 1, got {feat_dim}")
        return cls(
            num_crops=num_crops,
            crops_for_assign=crops_for_assign,
            temperature=temperature,
            epsilon=epsilon,
            sinkhorn_iterations=iterations,
            nmb_prototypes=nmb_prototypes,
            local_queue_length=local,
            epoch_queue_starts=epoch_queue_starts,
            queue_length=queue_length,
            freeze_prototypes_niters=freeze,
            output_dir=str(_cfg_get(cfg, "output_dir", "")),
            feat_dim=feat_dim,
        )

    # ------------------------------------------------------------------- queue
    @property
    def queue(self) -> Optional[Tensor]:
        """This rank's queue, ``(len(crops_for_assign), local_queue_length,
        D)`` float32, newest rows first; ``None`` before it exists."""
        if self._queue_all is None:
            return None
        rank, world = _world()
        return self._queue_all[rank if self._queue_all.shape[0] == world else 0]

    @property
    def queue_full(self) -> bool:
        """Whether the queue exists and has been filled (then it is used)."""
        return self._queue_all is not None and self.queue_filled >= self.local_queue_length

    def on_epoch_start(self, epoch: int) -> None:
        """Create the (zero) queue once ``epoch >= epoch_queue_starts``; it is
        allocated at the next forward, when the embedding size is known, and
        never recreated."""
        if self.local_queue_length > 0 and epoch >= self.epoch_queue_starts:
            self._queue_requested = True

    def set_prototypes(self, weights: Sequence[Tensor]) -> None:
        """Current prototype weights, one ``(K_h, D)`` tensor per head (the
        hook calls this every iteration, before the loss); used for the
        queue's scores. Kept by reference, read (detached) at forward."""
        self._prototypes = list(weights)

    def _make_queue(self, dim: int, device: torch.device) -> None:
        world = _world()[1]
        self._queue_all = torch.zeros(
            world,
            len(self.crops_for_assign),
            self.local_queue_length,
            dim,
            dtype=torch.float32,
            device=device,
        )
        self.queue_filled = 0

    @torch.no_grad()
    def _push(self, embeddings: Tensor, batch: int) -> None:
        """Push the batch's embeddings of each assign crop at the front of the
        queue, on every rank's copy (all-gathered when distributed)."""
        queue = self._queue_all
        new = torch.stack(
            [embeddings[c * batch:(c + 1) * batch] for c in self.crops_for_assign]
        ).to(queue.dtype)
        world = queue.shape[0]
        if world > 1:
            gathered = [torch.empty_like(new) for _ in range(world)]
            dist.all_gather(gathered, new.contiguous())
            new = torch.stack(gathered)
        else:
            new = new.unsqueeze(0)
        length = self.local_queue_length
        if batch >= length:
            queue.copy_(new[:, :, :length])
        else:
            queue[:, :, batch:] = queue[:, :, : length - batch].clone()
            queue[:, :, :batch] = new
        self.queue_filled = min(self.queue_filled + batch, length)

    # ----------------------------------------------------------------- forward
    def forward(self, output: Sequence[Tensor], target: Any = None) -> Tensor:
        """``output = [embeddings (num_crops*B, D), scores_head0 (num_crops*B,
        K0), ...]`` (a one-element list around it is unwrapped). Returns the
        mean over heads of the SwAV loss."""
        if (
            isinstance(output, (list, tuple))
            and len(output) == 1
            and isinstance(output[0], (list, tuple))
        ):
            output = output[0]
        if not isinstance(output, (list, tuple)) or len(output) < 2:
            raise ValueError(
                "swav_plugin_loss expects [embeddings, scores_head0, ...], got "
                f"{type(output).__name__} of length "
                f"{len(output) if hasattr(output, '__len__') else '?'}"
            )
        embeddings, heads = output[0], list(output[1:])
        rows, dim = embeddings.shape
        if rows % self.num_crops != 0:
            raise ValueError(
                f"{rows} embeddings are not num_crops={self.num_crops} crops of "
                "the same batch"
            )
        batch = rows // self.num_crops
        if self.nmb_prototypes is not None and [h.shape[1] for h in heads] != list(
            self.nmb_prototypes
        ):
            raise ValueError(
                f"prototype heads of sizes {[tuple(h.shape) for h in heads]} do not "
                f"match {_PREFIX}.nmb_prototypes={self.nmb_prototypes}"
            )
        for h in heads:
            if h.shape[0] != rows:
                raise ValueError(
                    f"scores of shape {tuple(h.shape)} for {rows} embeddings"
                )

        if self._queue_requested and self._queue_all is None:
            self._make_queue(dim, embeddings.device)
        if self._queue_all is not None and self._queue_all.device != embeddings.device:
            self._queue_all = self._queue_all.to(embeddings.device)
        use_queue = self.queue_full
        if use_queue:
            if self._prototypes is None:
                raise RuntimeError(
                    "swav_plugin_loss: the queue is full but no prototype weights "
                    "were given; call loss.set_prototypes([W_0, ...]) every "
                    "iteration before the loss (the prototypes hook does)"
                )
            if len(self._prototypes) != len(heads):
                raise RuntimeError(
                    f"set_prototypes got {len(self._prototypes)} weight tensors "
                    f"for {len(heads)} prototype heads"
                )
            local_queue = self.queue

        total = None
        entropies = []
        for h, scores in enumerate(heads):
            queue_scores = None
            if use_queue:
                # The queue's scores under the current prototypes, computed
                # block by block inside Sinkhorn-Knopp (never stored whole).
                weights = self._prototypes[h].detach().to(local_queue.dtype)
                queue_scores = [ScoreProduct(q, weights) for q in local_queue.unbind(0)]
            codes = sinkhorn_codes(
                scores,
                self.num_crops,
                self.crops_for_assign,
                self.epsilon,
                self.sinkhorn_iterations,
                queue_scores,
                workspace=self._workspace,
            )
            loss = swapped_prediction_loss(
                scores, codes, self.num_crops, self.crops_for_assign, self.temperature
            )
            total = loss if total is None else total + loss
            with torch.no_grad():
                entropies.append(torch.stack([_mean_entropy(q) for q in codes]).mean())
        if self._queue_all is not None:
            self._push(embeddings.detach(), batch)
        self.last_stats = {
            "queue_in_use": use_queue,
            "queue_filled": self.queue_filled if self._queue_all is not None else 0,
            "code_entropy": entropies,  # per head, mean over assign crops (tensors)
        }
        return total / len(heads)

    # ------------------------------------------------------------------- state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Only tensors, ints and None: loadable with torch.load(weights_only=True).
        queue = self._queue_all
        if queue is not None and not keep_vars:
            queue = queue.detach()
        destination[prefix + _STATE_QUEUE] = queue
        destination[prefix + _STATE_FILLED] = int(self.queue_filled)

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        ours = {prefix + _STATE_QUEUE, prefix + _STATE_FILLED}
        if strict:
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in ours
            )
        queue = state_dict.get(prefix + _STATE_QUEUE)
        filled = int(state_dict.get(prefix + _STATE_FILLED, 0) or 0)
        if queue is None:
            self._queue_all = None
            self.queue_filled = 0
            self._queue_requested = False
            return
        if not isinstance(queue, Tensor):
            error_msgs.append(f"{prefix}{_STATE_QUEUE}: expected a tensor or None")
            return
        if self.local_queue_length == 0:
            logging.warning("%s: checkpoint has a queue but the queue is off; dropped", _PREFIX)
            self._queue_all, self.queue_filled = None, 0
            return
        self.check_state_dict(state_dict, prefix)
        if queue.dim() == 3:  # one rank's queue: (n_assign, L, D)
            queue = queue.unsqueeze(0)
        world = _world()[1]
        device = self._queue_all.device if self._queue_all is not None else queue.device
        queue = queue.detach().to(device=device, dtype=torch.float32)
        old_world, _, old_length, _ = queue.shape
        if (old_world, old_length) == (world, self.local_queue_length):
            self._queue_all = queue.clone()
            self.queue_filled = min(max(filled, 0), self.local_queue_length)
            return
        self._queue_all, self.queue_filled, dropped = reshard_queue(
            queue, filled, world, self.local_queue_length
        )
        what = f"resharded from {old_world} to {world} ranks" if old_world != world else "resized"
        logging.info(
            "%s: queue %s: %d x %d -> %d x %d rows per assign crop; the %d filled rows "
            "kept in age order (newest first on every rank), %d oldest dropped; %d of %d "
            "rows filled per rank%s",
            _PREFIX,
            what,
            old_world,
            old_length,
            world,
            self.local_queue_length,
            old_world * min(max(filled, 0), old_length) - dropped,
            dropped,
            self.queue_filled,
            self.local_queue_length,
            "" if self.queue_full else " (used once full)",
        )

    def check_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`~swav_vissl_plugin.config.ConfigError` if the queue in
        ``state_dict`` cannot be used with this loss's config: another number
        of assign crops, or embeddings of another size than ``feat_dim``.
        Any world size and queue length can be (see :func:`reshard_queue`);
        with the queue off, a saved queue is dropped, not checked."""
        queue = state_dict.get(prefix + _STATE_QUEUE)
        if not isinstance(queue, Tensor) or self.local_queue_length == 0:
            return  # no queue saved, or the queue is off (a saved one is dropped)
        if queue.dim() not in (3, 4):
            raise ConfigError(
                f"{prefix}{_STATE_QUEUE}: a queue of shape {tuple(queue.shape)}, expected "
                "(world size, assign crops, rows, embedding size)"
            )
        n_assign, dim = queue.shape[-3], queue.shape[-1]
        if n_assign != len(self.crops_for_assign):
            raise ConfigError(
                f"config.{_PREFIX}.crops_for_assign: the checkpoint's queue holds "
                f"{n_assign} assign crop(s), the config assigns from "
                f"{len(self.crops_for_assign)} ({self.crops_for_assign}); the queue of "
                "other crops cannot be used (resume with the checkpoint's crops_for_assign)"
            )
        if self.feat_dim is not None and dim != self.feat_dim:
            raise ConfigError(
                f"config.MODEL.HEAD.PARAMS[0][1].feat_dim: the checkpoint's queue holds "
                f"embeddings of size {dim}, the head makes {self.feat_dim} "
                f"({_PREFIX}.feat_dim); resume with the checkpoint's feat_dim"
            )

    # --------------------------------------------------------------------- repr
    def __repr__(self) -> str:
        return pprint.pformat(
            {
                "name": "swav_plugin_loss",
                "num_crops": self.num_crops,
                "crops_for_assign": self.crops_for_assign,
                "temperature": self.temperature,
                "epsilon": self.epsilon,
                "sinkhorn_iterations": self.sinkhorn_iterations,
                "nmb_prototypes": self.nmb_prototypes,
                "queue_length": self.queue_length,
                "local_queue_length": self.local_queue_length,
                "epoch_queue_starts": self.epoch_queue_starts,
                "freeze_prototypes_niters": self.freeze_prototypes_niters,
                "queue_filled": self.queue_filled if self._queue_all is not None else None,
            },
            indent=2,
        )
