"""A recording hook for the DeepCluster-v2 end-to-end test (imported by
VISSL's spawned workers). It runs after the plugin's hooks.

Per rank, under ``<checkpoint dir>/dc_probe/``:

* ``start_rank<r>_run<n>.pt`` (on_start, after the fill pass or the
  restore): whether the fill pass ran, the bank and its indices;
* ``epoch<e>_rank<r>.pt`` (on_phase_start, after the clustering): the bank
  the clustering used, the label table, the prototypes;
* ``steps_rank<r>.jsonl``: one line per step with the loss and how much the
  prototypes moved;
* ``end_rank<r>_run<n>.pt`` (on_end): the bank after training.
"""

import json
import os

import torch
from classy_vision.hooks.classy_hook import ClassyHook

from swav_vissl_plugin.hooks import swav_plugin_hook_generator


def _rank():
    return int(os.environ.get("RANK", 0))


def _protos(task):
    return [layer.weight.detach().clone() for layer in task.base_model.heads[0].prototype_layers()]


class DCProbeHook(ClassyHook):
    on_forward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop

    def __init__(self, folder):
        super().__init__()
        self.folder = os.path.join(folder, "dc_probe")
        os.makedirs(self.folder, exist_ok=True)
        self.prev = None

    def _path(self, name):
        return os.path.join(self.folder, name)

    def _bank(self, task):
        loss = task.base_loss
        n = loss.memory_filled
        return loss.memory_embeddings[:, :n].clone(), loss.memory_index[:n].clone()

    def _run(self, prefix):
        n = 0
        while os.path.exists(self._path(f"{prefix}_rank{_rank()}_run{n}.pt")):
            n += 1
        return n

    def on_start(self, task) -> None:
        hook = next(h for h in task.hooks if type(h).__name__ == "ClusterMemoryHook")
        emb, idx = self._bank(task)
        run = self._run("start")
        torch.save(
            {"filled_rows": hook.filled_rows, "bank": emb, "index": idx, "iteration": int(task.iteration)},
            self._path(f"start_rank{_rank()}_run{run}.pt"),
        )

    def on_phase_start(self, task) -> None:
        if not task.train:
            return
        emb, idx = self._bank(task)
        torch.save(
            {"bank": emb, "index": idx, "labels": task.base_loss.labels.clone(), "prototypes": _protos(task)},
            self._path(f"epoch{task.train_phase_idx}_rank{_rank()}.pt"),
        )
        self.prev = torch.cat(_protos(task))

    def on_update(self, task) -> None:
        w = torch.cat(_protos(task))
        moved = float((w - self.prev).abs().max())
        self.prev = w
        rec = {
            "iteration": int(task.iteration),
            "epoch": int(task.train_phase_idx),
            "loss": float(task.last_batch.loss),
            "local_loss_finite": bool(torch.isfinite(task.last_batch.loss).all()),
            "moved": moved,
        }
        with open(self._path(f"steps_rank{_rank()}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_end(self, task) -> None:
        emb, idx = self._bank(task)
        torch.save({"bank": emb, "index": idx}, self._path(f"end_rank{_rank()}_run{self._run('end')}.pt"))


def probe_hook_generator(cfg):
    return swav_plugin_hook_generator(cfg) + [DCProbeHook(cfg.CHECKPOINT.DIR)]
