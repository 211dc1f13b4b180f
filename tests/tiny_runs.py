"""Runs several short trainings through VISSL's real trainer in one process.

    python tests/tiny_runs.py SPEC.json RESULTS.json

``SPEC.json`` is a list of runs ``{"name", "overrides": [...], "autocast":
null | "float16" | "bfloat16"}``; each is composed with
:func:`swav_vissl_plugin.config.compose` and launched with VISSL's
``launch_distributed`` (one process, so all runs share this interpreter and
its imports) and the plugin's hooks plus :class:`RecordingHook`.
``RESULTS.json`` maps each name to ``{"ok", "error", "steps": [...],
"start_log": [...], "checkpoint"}``; a failing run does not stop the others.

``autocast`` simulates on CPU what VISSL's task sets up on GPU for
``MODEL.AMP_PARAMS.USE_AMP: true, AMP_TYPE: pytorch`` (which VISSL refuses on
CPU): ``task.amp_type = PYTORCH``, ``MODEL.AMP_PARAMS.DTYPE``, and for
float16 a ``GradScaler`` (the CPU one), so the plugin's train step runs its
mixed-precision path.
"""

import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch
from classy_vision.hooks.classy_hook import ClassyHook


def _dtypes(x):
    if isinstance(x, torch.Tensor):
        return [str(x.dtype).replace("torch.", "")]
    if isinstance(x, (list, tuple)):
        return [d for y in x for d in _dtypes(y)]
    return []


def _shapes(x):
    if isinstance(x, torch.Tensor):
        return [list(x.shape)]
    if isinstance(x, (list, tuple)):
        return [s for y in x for s in _shapes(y)]
    return []


class _Capture(logging.Handler):
    def __init__(self, sink):
        super().__init__(level=logging.INFO)
        self.sink = sink

    def emit(self, record):
        msg = record.getMessage()
        if "start of training" in msg:
            self.sink.append(msg)


class RecordingHook(ClassyHook):
    on_phase_start = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_step = ClassyHook._noop
    on_phase_end = ClassyHook._noop

    def __init__(self, record, autocast):
        super().__init__()
        self.record = record
        self.autocast = autocast
        self.prev = None
        self.handler = _Capture(record["start_log"])

    def _prototypes(self, task):
        head = task.base_model.heads[0]
        if not hasattr(head, "prototype_parameters"):
            return None
        return torch.cat([p.detach().float().clone() for p in head.prototype_parameters()])

    def on_start(self, task):
        logging.getLogger().addHandler(self.handler)
        if self.autocast:
            from classy_vision.tasks.classification_task import AmpType

            task.amp_type = AmpType.PYTORCH
            task.config.MODEL.AMP_PARAMS["DTYPE"] = self.autocast
            task.amp_grad_scaler = torch.amp.GradScaler("cpu") if self.autocast == "float16" else None
        self.prev = self._prototypes(task)
        self.record["trunk_frozen"] = all(not p.requires_grad for p in task.base_model.trunk.parameters())

    def on_forward(self, task):
        self.current = {
            "train": bool(task.train),
            "input_shapes": _shapes(task.last_batch.sample["input"]),
            "output_dtypes": _dtypes(task.last_batch.model_output),
            "output_shapes": _shapes(task.last_batch.model_output),
        }

    def on_loss_and_meter(self, task):
        self.current["loss"] = float(task.last_batch.loss)
        if not task.train:
            self.record["steps"].append(self.current)

    def on_update(self, task):
        rec = self.current
        rec["iteration"] = int(task.iteration)
        rec["lr"] = float(task.optimizer.options_view.lr)
        scaler = getattr(task, "amp_grad_scaler", None)
        rec["grad_scale"] = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        w = self._prototypes(task)
        if w is not None:
            rec["prototypes_moved"] = float((w - self.prev).abs().max())
            rec["prototypes_norm_error"] = float((w.norm(dim=1) - 1).abs().max())
            self.prev = w
        self.record["steps"].append(rec)

    def on_end(self, task):
        logging.getLogger().removeHandler(self.handler)


def run(spec, out_dir: Path):
    from vissl.utils.distributed_launcher import launch_distributed

    import swav_vissl_plugin  # noqa: F401
    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.hooks import swav_plugin_hook_generator

    record = {"ok": False, "error": None, "steps": [], "start_log": []}
    start = time.time()
    try:
        _, config = compose(spec["overrides"])
        record["global_batch"] = config.DATA.TRAIN.BATCHSIZE_PER_REPLICA * config.DISTRIBUTED.NUM_PROC_PER_NODE
        hook = RecordingHook(record, spec.get("autocast"))
        launch_distributed(config, node_id=0, engine_name="train", hook_generator=lambda cfg: swav_plugin_hook_generator(cfg) + [hook])
        finals = sorted(Path(config.CHECKPOINT.DIR).glob("model_final_checkpoint_phase*.torch"))
        record["checkpoint"] = str(finals[-1]) if finals else None
        record["ok"] = True
    except BaseException:  # noqa: BLE001  (reported to the test)
        record["error"] = traceback.format_exc()[-4000:]
    record["seconds"] = time.time() - start
    return record


def main(spec_path, results_path):
    specs = json.loads(Path(spec_path).read_text())
    results = {}
    for spec in specs:
        results[spec["name"]] = run(spec, Path(results_path).parent)
        Path(results_path).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
