"""A recording hook for end-to-end tests (imported by VISSL's spawned workers).

Written per rank to ``<checkpoint dir>/probe_rank<r>.jsonl``: one line per
training step with the loss, the prototypes' norms and how much they moved.
"""

import json
import os

import torch
from classy_vision.hooks.classy_hook import ClassyHook

from swav_vissl_plugin.hooks import swav_plugin_hook_generator


class ProbeHook(ClassyHook):
    on_start = ClassyHook._noop
    on_phase_start = ClassyHook._noop
    on_forward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop
    on_end = ClassyHook._noop

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self.prev = None

    def on_update(self, task) -> None:
        head = task.base_model.heads[0]
        w = torch.cat([p.detach().clone() for p in head.prototype_parameters()])
        moved = None if self.prev is None else float((w - self.prev).abs().max())
        self.prev = w
        loss = task.base_loss
        rec = {
            "iteration": int(task.iteration),  # completed updates before this step
            "epoch": int(task.train_phase_idx),
            "loss": float(task.last_batch.loss),
            "local_loss_finite": bool(torch.isfinite(task.last_batch.loss).all()),
            "max_norm_error": float((w.norm(dim=1) - 1).abs().max()),
            "moved": moved,
            "lr": float(task.optimizer.options_view.lr) if hasattr(task.optimizer, "options_view") else None,
            "queue_in_use": bool(getattr(loss, "last_stats", {}).get("queue_in_use", False)),
        }
        rank = int(os.environ.get("RANK", 0))
        with open(os.path.join(self.folder, f"probe_rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


def probe_hook_generator(cfg):
    return swav_plugin_hook_generator(cfg) + [ProbeHook(cfg.CHECKPOINT.DIR)]
