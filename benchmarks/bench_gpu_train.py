"""SwAV training throughput on one device (issue 6, GPU part): images/s, MFU, epoch projection.

One iteration is the plugin's training iteration (``swav_plugin_train_step``,
docs: ``swav_vissl_plugin/train_step.py``) on one device, built from the
plugin's own config (``config=swav_plugin/pretrain/swav_base``, recipe row 1:
ResNet-50, 2x224 + 6x96 crops, per-GPU batch 64) by VISSL's builders:

* model: ``vissl.models.build_model`` -> VISSL's ``resnet`` trunk (depth 50)
  and ``swav_plugin_head`` (2048-2048-128, 3000 prototypes); its forward is
  VISSL's ``multi_res_input_forward`` (the crops of one resolution
  concatenated through the trunk, then every crop through the head);
* loss: ``SwAVPluginLoss.from_config(LOSS.swav_plugin_loss)`` (no queue,
  epsilon 0.05, 3 Sinkhorn iterations, crops for assignment [0, 1],
  temperature 0.1);
* optimizer: ``swav_plugin_larc`` (SGD momentum 0.9 + LARC) over VISSL's
  ``get_optimizer_param_groups``, stepped as the train step does
  (``scaler.step(optimizer, where=...)`` with fp16, else ``optimizer.step``);
* per iteration, as the step and ``SwAVPrototypesHook`` do after the
  prototype freeze: prototypes handed to the loss, ``zero_grad``, forward
  and loss under ``torch.autocast``, the loss read back (``.item()``),
  backward (scaled with fp16), step, prototypes L2-normalised.

Not included (one device, no process group): SyncBN (BatchNorm stays local),
the gradient and loss all-reduces, VISSL's hooks other than the prototypes',
its async GPU copy wrapper. The LR schedule runs at a fixed ``where``.

Variants (each a fresh copy of the same initial model):

* precision: ``fp32``; ``fp16`` (the recipe's mixed precision: autocast +
  ``GradScaler``); ``bf16`` (autocast, no scaler); each with NCHW and
  ``channels_last`` model and inputs;
* ``torch.compile`` of the trunk (``mode`` default, ``dynamic=False``: one
  static graph per crop size) for the fastest eager variant, in a child
  process whose run time is capped (``--compile-cap-s``); its compile time
  (first iteration minus the median one) is reported separately;
* data: ``synthetic`` (random crops already on the device: compute bound) and
  ``pipeline`` (a DataLoader with ``--workers`` processes, each image a
  500x375 JPEG file read by the plugin's data-source loader, then the
  config's ``SwavPluginMultiCrop`` through VISSL's transform wrapper, then
  ``swav_plugin_multicrop_collator``; pinned memory, ``non_blocking``
  copies), for the fastest fp16 variant and the fastest overall; the loader
  alone is also timed (its ceiling). Workers are forked (VISSL's configs
  use forkserver: a slower start, the same steady state).

On CPU the fp16 variants are skipped (fp16 autocast + GradScaler is the
recipe's GPU path; bf16 autocast is measured instead), and so is
``torch.compile`` unless ``--compile on`` (its C++ build takes minutes).

Timing: per iteration, ``perf_counter`` around the whole iteration (batch
fetch included) closed by ``torch.cuda.synchronize``; the median of the
timed iterations after the warmup (pipeline runs warm up ``workers *
prefetch_factor`` more iterations, to drain the loader's initial backlog).
images/s = batch / median iteration time. Peak memory: ``max_memory_allocated``.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + loss +
backward at the real crop sizes; MFU = FLOPs / median time / the device's
dense peak for the variant's precision (:data:`PEAK_TFLOPS`; "n/a" for a
device not in the table).

Projection: one 8-GPU node at the best end-to-end (pipeline) images/s per
GPU: ``1,281,167 / (8 * images/s)`` seconds per ImageNet epoch, against the
release's 3 min 40 s on 64 V100 (its running-time anchor for SwAV at batch
4096, 2x224 + 6x96) and the target of half of it; per GPU the target is
>= 1,600 images/s. The projection assumes every GPU of the node runs as the
measured one, fed by as many CPU cores as ``--workers`` here, and leaves out
SyncBN and the gradient all-reduce.

    .venv/bin/python benchmarks/bench_gpu_train.py [--json F] [--budget-s 330]
    .venv/bin/python benchmarks/bench_gpu_train.py --device cpu --tiny   # smoke run

``--tiny`` composes the same config with the plugin's small residual CNN
trunk (``swav_plugin_small_cnn``, widths 8-16-32), a 32-64-16 head with 30
prototypes, 2x32 + 2x16 crops of 64x48 JPEGs, batch 4, 1 + 2 iterations: a
few seconds on a CPU (``tests/test_benchmarks.py`` runs it).
"""

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
GPUS_PER_NODE = 8
#: The SwAV release's running-time anchor: SwAV, batch 4096 on 64 V100,
#: 2x224 + 6x96 crops, 3 min 40 s per ImageNet epoch.
SEED_EPOCH_S = 220.0
TARGET_EPOCH_S = SEED_EPOCH_S / 2
TARGET_IMAGES_PER_S = 1600.0

#: Dense peak TFLOPS (no structured sparsity) by device-name substring (the
#: first that the name contains) and precision. Source: NVIDIA H200 Tensor
#: Core GPU datasheet. H200 SXM: FP32 67 (66.9), TF32 Tensor Core 989 with
#: sparsity (494.7 dense), BF16/FP16 Tensor Core 1,979 with sparsity (989.4
#: dense). H200 NVL: FP32 60, TF32 835 with sparsity, BF16/FP16 1,671 with
#: sparsity.
PEAK_TFLOPS = {
    "H200 NVL": {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
}

FULL = dict(
    batch=64, warmup=5, iters=20, jpeg_size=(500, 375),
    overrides=[],
)
TINY = dict(
    batch=4, warmup=1, iters=2, jpeg_size=(64, 48),
    # The plugin's small residual CNN (VISSL's ResNet-50 needs seconds per
    # bf16 CPU iteration here), a small head, 2x32 + 2x16 crops.
    overrides=[
        "config.MODEL.TRUNK.NAME=swav_plugin_small_cnn",
        "+config.MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.WIDTHS=[8,16,32]",
        "config.MODEL.HEAD.PARAMS=[[swav_plugin_head,{in_dim:32,hidden_mlp:64,feat_dim:16,nmb_prototypes:30}]]",
        "config.DATA.TRAIN.TRANSFORMS=[{name:SwavPluginMultiCrop,nmb_crops:[2,2],size_crops:[32,16],"
        "min_scale_crops:[0.14,0.05],max_scale_crops:[1.0,0.14]}]",
    ],
)
PRECISIONS = ("fp16", "bf16", "fp32")
SCHEDULE_WHERE = 0.5  # any point of the schedule: the LR value does not change the cost


def variant_name(precision: str, channels_last: bool, compiled: bool = False) -> str:
    name = precision + ("+GradScaler" if precision == "fp16" else "")
    name += "/channels_last" if channels_last else "/NCHW"
    return name + ("/compile" if compiled else "")


# ------------------------------------------------------------------ set-up
class Setup:
    """The composed config, an initial model (on CPU), synthetic crops and
    the per-iteration FLOPs; builds one variant's model/loss/optimizer."""

    def __init__(self, args, size):
        import torch

        import swav_vissl_plugin  # noqa: F401  (registers the plugin's components)
        from swav_vissl_plugin.config import compose
        from vissl.models import build_model

        self.device = torch.device(args.device)
        self.batch = args.batch or size["batch"]
        overrides = [
            "config=swav_plugin/pretrain/swav_base",
            # one GPU of an 8-GPU node
            "config.DISTRIBUTED.NUM_NODES=1",
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={GPUS_PER_NODE}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={self.batch}",
            "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=false",
        ] + list(size["overrides"])
        if self.device.type != "cuda":
            overrides += ["config.MACHINE.DEVICE=cpu", "config.MODEL.AMP_PARAMS.USE_AMP=false"]
        # The recipe warnings (e.g. a small global batch without a queue) are
        # about training outcomes, not about the cost measured here.
        config_log = logging.getLogger("swav_vissl_plugin.config")
        level = config_log.level
        config_log.setLevel(logging.ERROR)
        try:
            self.cfg = compose(overrides, dump_config=False)[1]
        finally:
            config_log.setLevel(level)
        crops = self.cfg.DATA.TRAIN.TRANSFORMS[0]
        self.nmb_crops = list(crops["nmb_crops"])
        self.size_crops = list(crops["size_crops"])
        torch.manual_seed(0)
        self.template = build_model(self.cfg.MODEL, self.cfg.OPTIMIZER)
        self.template.train()
        self.jpeg_size = size["jpeg_size"]

    def describe(self) -> dict:
        cfg = self.cfg
        return {
            "config": "swav_plugin/pretrain/swav_base",
            "trunk": dict(
                name=cfg.MODEL.TRUNK.NAME,
                **({"depth": cfg.MODEL.TRUNK.RESNETS.DEPTH} if cfg.MODEL.TRUNK.NAME == "resnet"
                   else {"widths": list(cfg.MODEL.TRUNK.get("SWAV_PLUGIN_SMALL_CNN", {}).get("WIDTHS", []))}),
            ),
            "head": dict(cfg.MODEL.HEAD.PARAMS[0][1]),
            "parameters": sum(p.numel() for p in self.template.parameters()),
            "batch": self.batch,
            "nmb_crops": self.nmb_crops,
            "size_crops": self.size_crops,
            "loss": {k: cfg.LOSS.swav_plugin_loss[k] for k in
                     ("num_crops", "crops_for_assign", "temperature", "epsilon",
                      "sinkhorn_iterations", "queue_length")},
            "optimizer": cfg.OPTIMIZER.name,
        }

    def crop_shapes(self):
        return [(self.batch, 3, s, s) for n, s in zip(self.nmb_crops, self.size_crops) for _ in range(n)]

    def synthetic_crops(self, channels_last: bool):
        import torch

        g = torch.Generator().manual_seed(1)
        out = [torch.randn(shape, generator=g).to(self.device) for shape in self.crop_shapes()]
        return [_layout(x, channels_last) for x in out]

    def build(self, precision: str, channels_last: bool, compiled: bool, compile_backend: str):
        """A fresh copy of the initial model on the device, its loss,
        optimizer and (fp16) GradScaler: a :class:`Trainer`."""
        import torch
        from classy_vision.optim import build_optimizer, build_optimizer_schedulers
        from swav_vissl_plugin.losses.swav import SwAVPluginLoss
        from vissl.optimizers import get_optimizer_param_groups

        model = copy.deepcopy(self.template).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compiled:
            model.trunk.compile(dynamic=False, backend=compile_backend)
        loss = SwAVPluginLoss.from_config(self.cfg.LOSS.swav_plugin_loss)
        optimizer = build_optimizer(self.cfg.OPTIMIZER)
        optimizer.set_param_groups(
            get_optimizer_param_groups(
                model=model,
                model_config=self.cfg.MODEL,
                optimizer_config=self.cfg.OPTIMIZER,
                optimizer_schedulers=build_optimizer_schedulers(self.cfg.OPTIMIZER),
            )
        )
        return Trainer(model, loss, optimizer, precision, self.device)

    def count_flops(self) -> int:
        """FLOPs of one forward + loss + backward at the real crop sizes (fp32)."""
        from torch.utils.flop_counter import FlopCounterMode

        trainer = self.build("fp32", False, False, "inductor")
        crops = self.synthetic_crops(False)
        with FlopCounterMode(display=False) as counter:
            loss = trainer.loss(_unwrap(trainer.model(crops)), None)
            loss.backward()
        return int(counter.get_total_flops())


def _layout(x, channels_last: bool):
    import torch

    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _unwrap(output):
    # a single head: its output, not a list of one (as the train step does)
    return output[0] if len(output) == 1 else output


class Trainer:
    """One SwAV training iteration (see the module docstring)."""

    def __init__(self, model, loss, optimizer, precision, device):
        import torch

        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.head = model.heads[0]
        self.device = device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.iterations = 0

    def step(self, crops) -> float:
        import torch

        self.loss.set_prototypes([w.detach() for w in self.head.prototype_parameters()])
        self.optimizer.zero_grad()
        amp = (torch.autocast(device_type=self.device.type, dtype=self.dtype)
               if self.dtype is not None else contextlib.nullcontext())
        with amp:
            loss = self.loss(_unwrap(self.model(crops)), None)
        value = loss.detach().cpu().item()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer, where=SCHEDULE_WHERE)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step(where=SCHEDULE_WHERE)
        self.head.normalize_prototypes()
        self.iterations += 1
        return value


# ---------------------------------------------------------------- pipeline
class JpegMultiCropDataset:
    """JPEG files -> the sample dict VISSL's dataset builds: each file read
    and decoded by the plugin's data sources' loader
    (``swav_vissl_plugin.data_source.load_rgb``), then the config's transforms
    (VISSL's ``get_transform``: ``SwavPluginMultiCrop`` in
    ``SSLTransformsWrapper``). Index ``i`` is file ``i mod len(paths)``."""

    def __init__(self, paths: List[str], transforms_cfg, length: int):
        from vissl.data.ssl_transforms import get_transform

        self.paths = list(paths)
        self.transform = get_transform(transforms_cfg)
        self.length = int(length)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        from swav_vissl_plugin.data_source import load_rgb

        img = load_rgb(self.paths[index % len(self.paths)])
        return self.transform({"data": [img], "label": [0], "data_valid": [1], "data_idx": [index]})


def sample_files(size) -> List[str]:
    """The photographs of the transform benchmark (``bench_transforms.sample_jpegs``:
    scikit-learn's china and flower, resized, JPEG quality 90) written to a
    temporary folder that lives as long as this process."""
    from bench_transforms import sample_jpegs

    global _SAMPLE_DIR
    if _SAMPLE_DIR is None:
        _SAMPLE_DIR = tempfile.TemporaryDirectory(prefix="bench_gpu_train_")
    paths = []
    for i, data in enumerate(sample_jpegs(size)):
        path = os.path.join(_SAMPLE_DIR.name, f"{size[0]}x{size[1]}_{i}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


_SAMPLE_DIR = None


def make_loader(setup: Setup, workers: int, prefetch_factor: int, batches: int):
    import torch
    from vissl.data.collators import get_collator

    cfg = setup.cfg.DATA.TRAIN
    dataset = JpegMultiCropDataset(sample_files(setup.jpeg_size), cfg.TRANSFORMS, batches * setup.batch)
    extra = dict(prefetch_factor=prefetch_factor) if workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=setup.batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=get_collator(cfg.COLLATE_FUNCTION, cfg.COLLATE_FUNCTION_PARAMS),
        pin_memory=setup.device.type == "cuda",
        drop_last=True,
        **extra,
    )


def measure_loader(setup: Setup, workers: int, prefetch_factor: int, batches: int) -> dict:
    """The loader alone: images/s once every worker has delivered its first
    batches (the first ``workers * prefetch_factor`` are not timed)."""
    skip = max(1, workers * prefetch_factor)
    loader = make_loader(setup, workers, prefetch_factor, skip + batches)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    del it
    return {
        "status": "measured",
        "workers": workers,
        "batches_timed": batches,
        "first_batches_s": t0 - t_start,
        "images_per_s": batches * setup.batch / seconds,
    }


# ------------------------------------------------------------------ timing
def timed_iterations(trainer: Trainer, next_batch, warmup: int, iters: int) -> dict:
    times, waits, losses = [], [], []
    first = None
    sync = C.device_sync(trainer.device) or (lambda: None)
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        crops = next_batch()
        t1 = time.perf_counter()
        loss = trainer.step(crops)
        sync()
        t2 = time.perf_counter()
        losses.append(loss)
        if first is None:
            first = t2 - t0
        if i >= warmup:
            times.append(t2 - t0)
            waits.append(t1 - t0)
    return {"times": times, "waits": waits, "losses": losses, "first_iteration_s": first}


def peak_table(device) -> Optional[Dict[str, object]]:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((dict(peaks, device_key=key) for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def peak_key(precision: str) -> str:
    import torch

    if precision != "fp32":
        return precision
    # fp32 convolutions run on TF32 tensor cores when cuDNN allows it (torch's default)
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def run_variant(setup: Setup, args, precision, channels_last, data, compiled=False, trainer=None) -> dict:
    """One variant's timed run, on a fresh model unless ``trainer`` is given
    (then training continues: the compiled trunk is not compiled again)."""
    import torch

    name = variant_name(precision, channels_last, compiled)
    entry = {"name": name, "data": data, "precision": precision,
             "channels_last": channels_last, "compile": compiled}
    t_begin = time.perf_counter()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
    if trainer is None:
        trainer = setup.build(precision, channels_last, compiled, args.compile_backend)
    first_run = trainer.iterations == 0
    warmup = args.warmup
    if data == "synthetic":
        crops = setup.synthetic_crops(channels_last)

        def next_batch():
            return crops
        loader_it = None
    else:
        warmup += args.workers * args.prefetch_factor
        loader = make_loader(setup, args.workers, args.prefetch_factor, warmup + args.iters + 1)
        loader_it = iter(loader)

        def next_batch():
            sample = next(loader_it)
            return [_layout(x.to(setup.device, non_blocking=True), channels_last)
                    for x in sample["data"][0]]
    run = timed_iterations(trainer, next_batch, warmup, args.iters)
    del loader_it
    times = run["times"]
    median = statistics.median(times)
    entry.update(
        status="measured",
        warmup=warmup,
        iters=len(times),
        median_s=median,
        p25_s=C.percentile(times, 0.25),
        p75_s=C.percentile(times, 0.75),
        images_per_s=setup.batch / median,
        images_per_s_window=setup.batch * len(times) / sum(times),
        data_wait_median_s=statistics.median(run["waits"]),
        first_iteration_s=run["first_iteration_s"],
        losses=run["losses"],
        loss_finite=all(math.isfinite(x) for x in run["losses"]),
        peak_memory_bytes=(torch.cuda.max_memory_allocated(setup.device)
                           if setup.device.type == "cuda" else None),
        flops_per_iteration=setup.flops,
        achieved_tflops=setup.flops / median / 1e12,
    )
    if compiled and first_run:
        entry["compile_s"] = max(0.0, run["first_iteration_s"] - median)
    peaks = peak_table(setup.device)
    if peaks is None:
        entry.update(mfu="n/a", mfu_peak="n/a (device not in PEAK_TFLOPS)")
    else:
        key = peak_key(precision)
        entry.update(mfu=entry["achieved_tflops"] / peaks[key], mfu_peak=f"{peaks['device_key']} {key}: {peaks[key]} TFLOPS")
    if trainer.scaler is not None:
        entry["grad_scale_final"] = float(trainer.scaler.get_scale())
    entry["wall_s"] = time.perf_counter() - t_begin
    return entry


def skipped(precision, channels_last, compiled, data, reason, status="skipped") -> dict:
    """A variant that was not measured, and why (``status`` "skipped" or "failed")."""
    return dict(name=variant_name(precision, channels_last, compiled), data=data, precision=precision,
                channels_last=channels_last, compile=compiled, status=status, reason=reason)


# --------------------------------------------------------------- projection
def projection(images_per_s: Optional[float], source: str) -> dict:
    if not images_per_s:
        return {"status": "n/a", "reason": f"no measured {source} variant"}
    epoch_s = IMAGENET_TRAIN_IMAGES / (GPUS_PER_NODE * images_per_s)
    return {
        "status": "measured",
        "source": source,
        "images_per_s_per_gpu": images_per_s,
        "gpus": GPUS_PER_NODE,
        "epoch_images": IMAGENET_TRAIN_IMAGES,
        "epoch_s": epoch_s,
        "seed_epoch_s": SEED_EPOCH_S,
        "ratio_to_seed": epoch_s / SEED_EPOCH_S,
        "target_epoch_s": TARGET_EPOCH_S,
        "meets_epoch_target": epoch_s <= TARGET_EPOCH_S,
        "target_images_per_s_per_gpu": TARGET_IMAGES_PER_S,
        "meets_images_target": images_per_s >= TARGET_IMAGES_PER_S,
    }


def _best(entries, **match) -> Optional[dict]:
    found = [e for e in entries if e["status"] == "measured" and all(e.get(k) == v for k, v in match.items())]
    return max(found, key=lambda e: e["images_per_s"]) if found else None


# ------------------------------------------------------------------ compile
def run_capped(cmd: List[str], timeout_s: float, capture_stderr: bool = False):
    """Run ``cmd`` in its own process group, killed with everything it
    started (loader workers, inductor's compile workers) after ``timeout_s``.
    Returns ``(exit status or None if it was killed, captured stderr)``;
    stdout goes to this process's stdout."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE if capture_stderr else None, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, err or ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err or ""


def run_compiled_child(args, precision, channels_last, cap_s) -> List[dict]:
    """The compiled variant (synthetic, then pipeline) in a child process
    killed after ``cap_s`` seconds; what it measured before is kept."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "compiled.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
               "--json", out, "--compile-child", f"{precision},{int(channels_last)}",
               "--compile-backend", args.compile_backend, "--warmup", str(args.warmup),
               "--iters", str(args.iters), "--workers", str(args.workers),
               "--prefetch-factor", str(args.prefetch_factor)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--batch", str(args.batch)] if args.batch else []
        status, reason = "skipped", None
        rc, err = run_capped(cmd, cap_s, capture_stderr=True)
        if rc is None:
            reason = f"stopped at the compile cap of {cap_s:.0f} s"
        elif rc != 0:
            status = "failed"
            reason = f"child exited with {rc}: {err.strip()[-600:]}"
        entries = []
        try:
            with open(out) as f:
                entries = json.load(f).get("variants", [])
        except (OSError, ValueError):  # not written yet, or cut short by the kill
            pass
    done = {e["data"] for e in entries}
    for data in ("synthetic", "pipeline"):
        if data not in done:
            entries.append(skipped(precision, channels_last, True, data, reason or "not run by the child", status))
    return entries


# --------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small model, crops and batch: a CPU smoke run")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every variant)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before them")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default 64; tiny 4)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="no variant is started that the time already spent plus the previous "
                        "variant's duration would take past this; the rest is reported as skipped")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="DataLoader worker processes (default min(16, cores))")
    p.add_argument("--prefetch-factor", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=None,
                   help="batches timed for the loader alone (default 3 x workers, tiny 2)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile of the trunk: auto = on CUDA only")
    p.add_argument("--compile-cap-s", type=float, default=180.0,
                   help="the compiled variant's child process is stopped after this")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the training process (default: torch's on "
                        "CUDA; 1 on CPU, where more threads stall whenever another job holds a core)")
    p.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = TINY if args.tiny else FULL
    args.iters = args.iters or size["iters"]
    args.warmup = size["warmup"] if args.warmup is None else args.warmup
    for key in ("iters", "batch", "workers", "prefetch_factor", "loader_batches", "threads"):
        value = getattr(args, key)
        if value is not None and value < (0 if key == "workers" else 1):
            p.error(f"--{key.replace('_', '-')} must be >= {0 if key == 'workers' else 1}, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.loader_batches is None:
        args.loader_batches = 2 if args.tiny else max(8, 3 * args.workers)
    return args, size


def main(argv=None):
    args, size = parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_train: --device cuda but torch sees no CUDA device")
    threads = args.threads or (1 if device.type == "cpu" else None)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, size, device)
    finally:
        torch.set_num_threads(previous)  # main() may run inside another process (tests)


def _run(args, size, device):
    import torch

    t_start = time.perf_counter()
    if device.type == "cuda":
        # as VISSL's copy_model_to_gpu does
        torch.backends.cudnn.benchmark = True
    setup = Setup(args, size)
    setup.flops = setup.count_flops()
    info = C.machine_info()
    info["device"] = str(device)
    info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else C.cpu_model()
    result = {
        "benchmark": "gpu_train",
        "command": C.command_line(),
        "machine": info,
        "settings": dict(setup.describe(), warmup=args.warmup, iters=args.iters, workers=args.workers,
                         torch_threads=torch.get_num_threads(),
                         prefetch_factor=args.prefetch_factor, tiny=args.tiny, budget_s=args.budget_s,
                         cudnn_benchmark=torch.backends.cudnn.benchmark,
                         cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                         matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32),
        "flops_per_iteration": setup.flops,
        "flops_per_image": setup.flops / setup.batch,
        "peak_tflops": peak_table(device),
        "variants": [],
    }
    variants = result["variants"]

    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        C.write_json(args.json, result)

    if args.compile_child:
        precision, cl = args.compile_child.split(",")
        trainer = setup.build(precision, cl == "1", True, args.compile_backend)
        for data in ("synthetic", "pipeline"):
            variants.append(run_variant(setup, args, precision, cl == "1", data, True, trainer))
            save()
        return result

    last = {"wall": 0.0}

    def budget_left(estimate):
        spent = time.perf_counter() - t_start
        return spent + estimate <= args.budget_s

    def attempt(precision, channels_last, data):
        name = variant_name(precision, channels_last)
        if not budget_left(last["wall"]):
            variants.append(skipped(precision, channels_last, False, data, f"budget of {args.budget_s:.0f} s spent"))
        else:
            t0 = time.perf_counter()
            try:
                entry = run_variant(setup, args, precision, channels_last, data)
            except Exception as e:  # e.g. out of memory: the other variants still run
                entry = skipped(precision, channels_last, False, data, f"{type(e).__name__}: {e}"[:600], "failed")
            last["wall"] = time.perf_counter() - t0
            variants.append(entry)
            shown = f"{entry['images_per_s']:9.1f} images/s" if entry["status"] == "measured" else entry["reason"]
            print(f"  {data:9s} {name:32s} {shown} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        save()

    # 1. compute bound: every precision x layout, synthetic crops on the device
    for precision in PRECISIONS:
        for channels_last in (True, False):
            if precision == "fp16" and device.type != "cuda":
                variants.append(skipped(
                    precision, channels_last, False, "synthetic",
                    "fp16 autocast + GradScaler is the recipe's GPU mixed precision; "
                    "on CPU bf16 autocast is measured instead"))
                continue
            attempt(precision, channels_last, "synthetic")
    eager = [e for e in variants if e["data"] == "synthetic"]
    best = _best(eager)
    best_fp16 = _best(eager, precision="fp16")

    # 2. the loader alone, then end to end with it
    if budget_left(last["wall"]):
        result["pipeline_alone"] = measure_loader(setup, args.workers, args.prefetch_factor, args.loader_batches)
    else:
        result["pipeline_alone"] = {"status": "skipped", "reason": f"budget of {args.budget_s:.0f} s spent"}
    save()
    chosen = [e for e in (best_fp16, best) if e is not None]
    for e in {e["name"]: e for e in chosen}.values():
        attempt(e["precision"], e["channels_last"], "pipeline")

    # 3. torch.compile of the trunk, for the fastest eager variant
    want_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    remaining = args.budget_s - (time.perf_counter() - t_start)
    cap = min(args.compile_cap_s, remaining)
    if best is None or not want_compile or remaining < 30:
        if best is None:
            reason = "no eager variant was measured"
        elif not want_compile:
            reason = ("--compile off" if args.compile == "off" else
                      "off on CPU unless --compile on (inductor's C++ build takes minutes)")
        else:
            reason = f"budget of {args.budget_s:.0f} s spent"
        precision, cl = (best["precision"], best["channels_last"]) if best else ("fp16", True)
        for data in ("synthetic", "pipeline"):
            variants.append(skipped(precision, cl, True, data, f"torch.compile: {reason}"))
    else:
        t0 = time.perf_counter()
        variants.extend(run_compiled_child(args, best["precision"], best["channels_last"], cap))
        result["compile_child_wall_s"] = time.perf_counter() - t0
    save()

    # 4. projection to one 8-GPU node
    e2e = _best(variants, data="pipeline")
    synth = _best(variants, data="synthetic")
    result["projection"] = projection(e2e and e2e["images_per_s"], "pipeline")
    if e2e:
        result["projection"]["variant"] = e2e["name"]
    result["projection_compute_bound"] = projection(synth and synth["images_per_s"], "synthetic")
    if synth:
        result["projection_compute_bound"]["variant"] = synth["name"]
    save()
    print(report(result))
    return result


def _fmt_mem(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def _fmt_flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} FLOP"


def _fmt_mfu(m) -> str:
    return m if isinstance(m, str) else f"{100 * m:.1f} %"


def report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"SwAV training iteration on {result['machine']['device_name']} ({result['machine']['device']}): "
        f"{s['trunk']['name']}, batch {s['batch']}, crops {s['nmb_crops']} x {s['size_crops']}, "
        f"{_fmt_flops(result['flops_per_iteration'])} per iteration "
        f"({_fmt_flops(result['flops_per_image'])} per image, forward + backward)",
        "",
    ]
    rows = []
    for e in result["variants"]:
        if e["status"] != "measured":
            rows.append([e["data"], e["name"], "-", "-", "-", "-", "-", "-", f"{e['status']}: {e['reason']}"])
            continue
        notes = []
        if e.get("compile_s") is not None:
            notes.append(f"compile {e['compile_s']:.0f} s")
        if e["data"] == "pipeline":
            notes.append(f"data wait {1e3 * e['data_wait_median_s']:.1f} ms")
        rows.append([
            e["data"], e["name"], f"{e['images_per_s']:.1f}",
            f"{C.fmt_time(e['median_s'])} ({C.fmt_time(e['p25_s'])}-{C.fmt_time(e['p75_s'])})",
            _fmt_mem(e["peak_memory_bytes"]), _fmt_flops(1e12 * e["achieved_tflops"]) + "/s", _fmt_mfu(e["mfu"]),
            f"{e['losses'][-1]:.4f}", ", ".join(notes),
        ])
    lines.append(C.md_table(
        ["data", "variant", "images/s", "iteration, median (p25-p75)", "peak memory",
         "FLOP rate", "MFU", "last loss", "notes"], rows))
    pa = result.get("pipeline_alone", {})
    if pa.get("status") == "measured":
        lines += ["", f"Loader alone ({pa['workers']} workers): {pa['images_per_s']:.1f} images/s."]
    for key, title in (("projection", "end to end"), ("projection_compute_bound", "compute bound")):
        pr = result.get(key, {})
        if pr.get("status") != "measured":
            lines += ["", f"Projection ({title}): {pr.get('reason', 'n/a')}."]
            continue
        lines += ["", (
            f"Projection ({title}, {pr['variant']}): {pr['images_per_s_per_gpu']:.1f} images/s per GPU "
            f"(target >= {pr['target_images_per_s_per_gpu']:.0f}: {'met' if pr['meets_images_target'] else 'not met'}); "
            f"one {pr['gpus']}-GPU node: {pr['epoch_s']:.1f} s per ImageNet epoch = "
            f"{pr['ratio_to_seed']:.2f} x the release's {pr['seed_epoch_s']:.0f} s on 64 V100 "
            f"(target <= {pr['target_epoch_s']:.0f} s: {'met' if pr['meets_epoch_target'] else 'not met'})."
        )]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
