"""VISSL's training iteration with ``torch.autocast``: float16 or bfloat16.

``TRAINER.TRAIN_STEP_NAME: swav_plugin_train_step`` selects it (the SwAV
base config does). It is VISSL's ``standard_train_step`` (read sample,
forward, loss, all-reduced loss for logging, meters, backward, optimizer
step, the same hooks at the same points) with one difference: mixed
precision is ``torch.autocast(device_type, dtype)`` with the dtype chosen by
``MODEL.AMP_PARAMS.DTYPE`` instead of the float16-only, deprecated
``torch.cuda.amp.autocast()``:

* ``float16`` (the recipe's ``use_fp16``, formerly Apex O1): autocast to
  float16, loss scaled by the task's ``GradScaler`` (VISSL creates it for
  ``AMP_TYPE: pytorch``);
* ``bfloat16``: autocast to bfloat16; no loss scaling (bfloat16 has
  float32's exponent range), the optimizer steps directly.

Mixed precision is on when VISSL's task says so (``MODEL.AMP_PARAMS.USE_AMP:
true`` with ``AMP_TYPE: pytorch``; VISSL allows it on GPU only). Apex AMP is
not supported by this step.

At the first training iteration of a run, rank 0 logs the effective recipe
(:func:`swav_vissl_plugin.config.describe`) with the iterations per epoch,
which only exist once the dataset is built.
"""

import contextlib
import logging
from typing import Optional

import torch
from classy_vision.generic.distributed_util import all_reduce_mean, is_primary
from classy_vision.tasks import ClassyTask
from classy_vision.tasks.classification_task import AmpType
from vissl.hooks import SSLClassyHookFunctions
from vissl.trainer.train_steps import register_train_step
from vissl.trainer.train_steps.standard_train_step import LastBatchInfo, construct_sample_for_model
from vissl.utils.activation_checkpointing import manual_gradient_all_reduce, manual_sync_params
from vissl.utils.perf_stats import PerfTimer
from vissl.utils.profiler import record_function

TRAIN_STEP_NAME = "swav_plugin_train_step"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(task) -> Optional[torch.dtype]:
    """The autocast dtype of ``task``'s iterations, or None for full precision."""
    if task.amp_type is None:
        return None
    if task.amp_type != AmpType.PYTORCH:
        raise RuntimeError(
            f"{TRAIN_STEP_NAME} supports torch.amp only: set MODEL.AMP_PARAMS.AMP_TYPE=pytorch "
            f"(got {task.amp_type})"
        )
    name = task.config.MODEL.AMP_PARAMS.get("DTYPE", "float16")
    if name not in DTYPES:
        raise ValueError(f"MODEL.AMP_PARAMS.DTYPE must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _log_run_start(task) -> None:
    if getattr(task, "_swav_plugin_start_logged", False):
        return
    task._swav_plugin_start_logged = True
    if is_primary():
        from swav_vissl_plugin.config import describe

        text = describe(task.config, iterations_per_epoch=task.num_batches_per_phase)
        for line in text.splitlines():
            (logging.warning if line.startswith("WARNING") else logging.info)(
                "swav_vissl_plugin: start of training: %s", line
            )


def _forward_loss_meters(task, sample, dtype):
    """Forward, loss and meters under the grad and autocast contexts; returns the local loss."""
    grad = torch.enable_grad() if task.train else torch.no_grad()
    no_sync = task.model.no_sync() if task.enable_manual_gradient_reduction else contextlib.nullcontext()
    amp = (
        torch.autocast(device_type=task.device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    perf = task.perf_stats
    with grad, no_sync, amp:
        with PerfTimer("forward", perf), record_function("forward"):
            if task.enable_manual_gradient_reduction:
                manual_sync_params(task.model)
            output = task.model(sample["input"])
        if len(output) == 1:  # a single head: its output, not a list of one
            output = output[0]
        target = sample["target"]
        task.last_batch.sample = sample
        task.last_batch.model_output = output
        task.run_hooks(SSLClassyHookFunctions.on_forward.name)

        with PerfTimer("loss_compute", perf), record_function("loss_compute"):
            local_loss = task.loss(output, target)
        with PerfTimer("loss_all_reduce", perf):
            task.last_batch.loss = all_reduce_mean(local_loss.detach().clone())
        task.losses.append(task.last_batch.loss.data.cpu().item() * target.size(0))

        if task.meters and (not task.train or task.config["METERS"]["enable_training_meter"]):
            with PerfTimer("meters_update", perf):
                cpu_output = [x.cpu() for x in output] if isinstance(output, list) else output.cpu()
                for meter in task.meters:
                    meter.update(cpu_output, target.detach().cpu())
        task.last_batch.model_output = output
        task.last_batch.target = target
        task.run_hooks(SSLClassyHookFunctions.on_loss_and_meter.name)
    return local_loss


def _backward_and_update(task, local_loss, dtype) -> None:
    scaler = task.amp_grad_scaler if dtype == torch.float16 else None
    perf = task.perf_stats
    with PerfTimer("backward", perf), record_function("backward"):
        task.optimizer.zero_grad()
        (scaler.scale(local_loss) if scaler is not None else local_loss).backward()
        if task.enable_manual_gradient_reduction:
            manual_gradient_all_reduce(task.model)
    task.run_hooks(SSLClassyHookFunctions.on_backward.name)

    with PerfTimer("optimizer_step", perf), record_function("optimizer_step"):
        if not task.where < 1.0:
            raise RuntimeError(
                f"optimizer step at where={task.where}: training is already finished "
                "(a resumed run whose data sampler did not resume?)"
            )
        if scaler is not None:
            scaler.step(task.optimizer, where=task.where)
            scaler.update()
        else:
            task.optimizer.step(where=task.where)
    task.run_hooks(SSLClassyHookFunctions.on_update.name)
    task.num_updates += task.get_global_batchsize()


@register_train_step(TRAIN_STEP_NAME)
def swav_plugin_train_step(task):
    """One iteration: VISSL's ``standard_train_step`` with ``torch.autocast``."""
    if not isinstance(task, ClassyTask):
        raise TypeError(f"expected a ClassyTask, got {type(task).__name__}")
    task.last_batch = LastBatchInfo()
    dtype = autocast_dtype(task)
    if task.train:
        _log_run_start(task)

    timer = PerfTimer("train_step_total", task.perf_stats)
    timer.start()
    with PerfTimer("read_sample", task.perf_stats):
        batch = next(task.data_iterator)
    sample = construct_sample_for_model(batch, task)

    local_loss = _forward_loss_meters(task, sample, dtype)
    if task.train:
        _backward_and_update(task, local_loss, dtype)
    timer.stop()
    timer.record()
    return task
