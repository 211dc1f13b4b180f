"""Short trainings through VISSL's trainer for tests/test_world_size.py, and
the hook that records what they did (imported by VISSL's spawned workers).

    python tests/world_size_probe.py SPEC.json RESULTS.json

``SPEC.json`` is a list of steps, run in order in this one process: ``{"name",
"overrides": [...]}`` composes the config with
:func:`swav_vissl_plugin.config.compose` and launches it with VISSL's
``launch_distributed``, the plugin's hooks and :class:`WorldSizeProbe`;
``{"copy": [file, folder]}`` copies a checkpoint into a new run folder.
``RESULTS.json`` maps each name to ``{"ok", "error"}``.

:class:`WorldSizeProbe` (the last hook) writes ``<CHECKPOINT.DIR>/ws_probe/rank<r>.pt``:
the counters and the loss's queue or memory bank right after the trainer
started (after any checkpoint was loaded), the memory bank and label table
at every training phase start, one record per step (iteration, LR, where,
num_updates, whether the queue was used, the step's dataset indices), the
bank at the end, and the log
lines of the plugin's resume and resharding.
"""

import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from swav_vissl_plugin.hooks import NoopHook

_KEEP = ("resharded", "resuming", "random streams", "memory bank restored", "queue resized")


class _Capture(logging.Handler):
    def __init__(self, sink):
        super().__init__(level=logging.INFO)
        self.sink = sink

    def emit(self, record):
        msg = record.getMessage()
        if any(k in msg for k in _KEEP):
            self.sink.append(msg)


def _rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _loss_state(loss):
    if hasattr(loss, "memory_embeddings"):
        n = loss.memory_filled
        bank = None if loss.memory_embeddings is None else loss.memory_embeddings[:, :n].detach().cpu().clone()
        index = None if loss.memory_index is None else loss.memory_index[:n].detach().cpu().clone()
        labels = None if loss.labels is None else loss.labels.detach().cpu().clone()
        return {"bank": bank, "index": index, "position": int(loss.memory_position), "labels": labels}
    queue = getattr(loss, "_queue_all", None)
    return {"queue": None if queue is None else queue.detach().cpu().clone(), "queue_filled": int(loss.queue_filled)}


class WorldSizeProbe(NoopHook):
    def __init__(self, folder):
        super().__init__()
        self.folder = os.path.join(folder, "ws_probe")
        self.record = {"log": [], "steps": [], "phases": []}
        self.handler = _Capture(self.record["log"])
        logging.getLogger().addHandler(self.handler)  # before the checkpoint is loaded

    def on_start(self, task) -> None:
        fill = [h for h in task.hooks if type(h).__name__ == "ClusterMemoryHook"]
        self.record["start"] = {
            "iteration": int(task.iteration),
            "num_updates": int(task.num_updates),
            "iterations_per_phase": len(task.dataloaders["train"]),
            "filled_rows": fill[0].filled_rows if fill else None,
            **_loss_state(task.base_loss),
        }

    def on_phase_start(self, task) -> None:
        if task.train:
            self.record["phases"].append({"epoch": int(task.train_phase_idx), **_loss_state(task.base_loss)})

    def on_forward(self, task) -> None:
        if task.train:  # the images of the step (data_idx is replicated per crop)
            self.images = sorted(set(task.last_batch.sample["data_idx"][0].reshape(-1).tolist()))

    def on_update(self, task) -> None:
        self.record["steps"].append(
            {
                "images": self.images,
                "iteration": int(task.iteration),
                "epoch": int(task.train_phase_idx),
                "lr": float(task.optimizer.options_view.lr),
                "where": float(task.where),
                "num_updates": int(task.num_updates),
                "queue_in_use": bool(getattr(task.base_loss, "last_stats", {}).get("queue_in_use", False)),
            }
        )

    def on_end(self, task) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.record["end"] = _loss_state(task.base_loss)
        os.makedirs(self.folder, exist_ok=True)
        torch.save(self.record, os.path.join(self.folder, f"rank{_rank()}.pt"))


def probe_hook_generator(cfg):
    from swav_vissl_plugin.hooks import swav_plugin_hook_generator

    return swav_plugin_hook_generator(cfg) + [WorldSizeProbe(cfg.CHECKPOINT.DIR)]


def _spawn_from_forkserver(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn"):
    """``torch.multiprocessing.spawn`` whose ranks fork from one server that
    imported torch, VISSL and the plugin once (the trainer's code is the
    same; each spawned rank would import them again, most of a short run)."""
    import torch.multiprocessing as mp

    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, daemon=daemon, start_method="forkserver")


def main(spec_path, results_path):
    import torch.multiprocessing as mp
    from vissl.utils.distributed_launcher import launch_distributed

    import world_size_probe
    from swav_vissl_plugin.config import compose

    mp.set_forkserver_preload(["torch", "vissl.engines.train", "swav_vissl_plugin", "world_size_probe"])
    mp.spawn = _spawn_from_forkserver

    results = {}
    for step in json.loads(Path(spec_path).read_text()):
        if "copy" in step:
            source, folder = step["copy"]
            os.makedirs(folder, exist_ok=True)
            shutil.copy(source, folder)
            continue
        record = {"ok": False, "error": None}
        start = time.time()
        try:
            _, config = compose(step["overrides"])
            launch_distributed(
                config, node_id=0, engine_name="train", hook_generator=world_size_probe.probe_hook_generator
            )
            record["ok"] = True
        except BaseException:  # noqa: BLE001  (reported to the test)
            record["error"] = traceback.format_exc()[-4000:]
        record["seconds"] = time.time() - start
        results[step["name"]] = record
        Path(results_path).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
