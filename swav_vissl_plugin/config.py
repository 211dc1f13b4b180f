"""Composing, completing and checking VISSL configs that use the plugin.

:func:`compose` is VISSL's hydra composition (``config=<path>
config.KEY=value ...``) followed by VISSL's own inference and then
:func:`infer_and_validate`, which

* checks every component name against its registry, so an unknown name stops
  the run before any data or model is built, with the config key in the
  message;
* fills the keys the SwAV loss needs from the rest of the config (number of
  crops from the multi-crop transform, ``nmb_prototypes`` from the head, the
  per-rank queue length, the output folder) and checks them;
* applies the linear learning-rate scaling rule to the warmup+cosine
  schedule when ``auto_lr_scaling.auto_scale`` is on (recipe: 0.3 per 256
  gives 4.8 at 4096; ``final_lr`` keeps its ratio to ``base_lr``);
* keeps a model-zoo row's recipe on any number of GPUs (see "Scaling rules"
  below) and says what it changed (:func:`describe`, :func:`recipe_warnings`);
* stops configs that VISSL would only reject once training starts (mixed
  precision or SyncBN on CPU, Apex AMP without Apex, an AMP dtype the train
  step ignores).

Every error is a :class:`ConfigError` (a ``ValueError``) whose message starts
with the offending key.

Scaling rules (a row launched on other than its published number of GPUs)
-------------------------------------------------------------------------
A model-zoo row states its published global batch in
``SWAV_PLUGIN.RECIPE_GLOBAL_BATCH`` (4096 for 64 GPUs x 64; 256 for the bs256
rows; 2560 for RN50-w4). Launched with another ``DISTRIBUTED.NUM_NODES x
NUM_PROC_PER_NODE``, the composed config

* keeps ``DATA.TRAIN.BATCHSIZE_PER_REPLICA`` (the global batch changes);
* keeps the row's learning rate *per 256 images*: ``auto_lr_scaling`` is on
  with ``base_value`` = the row's base_lr x 256 / its global batch (0.3 for
  4.8 at 4096, 0.6 for 0.6 at 256, 0.48 for 4.8 at 2560); ``final_lr`` keeps
  its ratio to ``base_lr``; ``start_warmup`` is not scaled. ``base_lr`` in the
  file must equal ``base_value`` at the published batch (checked, so a row
  cannot state one LR and train another);
* keeps everything counted in iterations covering the same number of images
  (epochs): the active loss's ``freeze_prototypes_niters`` is restated as
  ``ceil(niters x RECIPE_GLOBAL_BATCH / global batch)`` (313 at 4096 -> 5008 at
  256, 5005 at 256 -> 313 at 4096; rounded up so the freeze never covers fewer
  images than the recipe's). The recipe value and the one used are recorded in
  ``SWAV_PLUGIN.SCALED_ITERATIONS``;
* keeps epochs, warmup epochs, ``epoch_queue_starts`` (epochs) and
  ``queue_length`` (embeddings; trimmed to a multiple of the new global batch).

Without ``RECIPE_GLOBAL_BATCH`` (e.g. the quickstart) nothing is rescaled.
"""

import logging
import math
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

SWAV_LOSS = "swav_plugin_loss"
MULTICROP = "SwavPluginMultiCrop"
WARMUP_COSINE = "swav_plugin_warmup_cosine"
PLUGIN_HEAD = "swav_plugin_head"
PLUGIN_TRAIN_STEP = "swav_plugin_train_step"

#: Keys of the active loss (``LOSS.<LOSS.name>.<key>``) counted in iterations.
ITERATION_KEYS = ("freeze_prototypes_niters",)
#: The smallest global batch the release trains without a queue (rows 1-4, 7, 13).
SMALLEST_NO_QUEUE_BATCH = 4096
#: What the release does at a small batch: rows swav_200ep_bs256 / swav_400ep_bs256.
SMALL_BATCH_QUEUE = {"queue_length": 3840, "epoch_queue_starts": 15, "rows": ("swav_200ep_bs256", "swav_400ep_bs256")}
AMP_DTYPES = ("float16", "bfloat16")

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value that cannot be trained with; names its key."""


def _fail(key: str, msg: str):
    raise ConfigError(f"config.{key}: {msg}")


def world_size(cfg) -> int:
    return int(cfg.DISTRIBUTED.NUM_NODES) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)


def global_batch_size(cfg) -> int:
    return int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA) * world_size(cfg)


# --------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------
def _check_name(key: str, name, registry, extra=()) -> None:
    """ConfigError naming ``key`` when ``name`` is neither in ``registry`` nor in ``extra``."""
    if name not in registry and name not in extra:
        known = sorted(list(registry) + list(extra))
        close = [k for k in known if k.lower().startswith(str(name)[:4].lower())]
        hint = f" (similar: {', '.join(close[:5])})" if close else ""
        _fail(key, f"unknown component name {name!r}{hint}")


def _check_registered(cfg) -> None:
    from classy_vision.dataset.transforms import TRANSFORM_REGISTRY
    from classy_vision.losses import LOSS_REGISTRY
    from classy_vision.optim import OPTIMIZER_REGISTRY
    from classy_vision.optim.param_scheduler import PARAM_SCHEDULER_REGISTRY
    from vissl.data.collators import COLLATOR_REGISTRY
    from vissl.models.heads import MODEL_HEADS_REGISTRY
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY

    check = _check_name

    import torch.nn.modules.loss as torch_losses
    import torchvision.transforms as tv_transforms

    torch_loss_names = [n for n in dir(torch_losses) if n[0].isupper()]
    check("LOSS.name", cfg.LOSS.name, LOSS_REGISTRY, torch_loss_names)
    check("MODEL.TRUNK.NAME", cfg.MODEL.TRUNK.NAME, MODEL_TRUNKS_REGISTRY)
    for i, head in enumerate(cfg.MODEL.HEAD.PARAMS):
        check(f"MODEL.HEAD.PARAMS[{i}][0]", head[0], MODEL_HEADS_REGISTRY)
    check("OPTIMIZER.name", cfg.OPTIMIZER.name, OPTIMIZER_REGISTRY)
    from vissl.trainer.train_steps import TRAIN_STEP_REGISTRY

    check("TRAINER.TRAIN_STEP_NAME", cfg.TRAINER.TRAIN_STEP_NAME, TRAIN_STEP_REGISTRY)
    for pname, sched in (cfg.OPTIMIZER.get("param_schedulers") or {}).items():
        if sched and "name" in sched:
            check(f"OPTIMIZER.param_schedulers.{pname}.name", sched["name"], PARAM_SCHEDULER_REGISTRY)
    for split in ("TRAIN", "TEST"):
        data = cfg.DATA[split]
        collate = data.get("COLLATE_FUNCTION")
        if collate and collate != "default_collate":
            check(f"DATA.{split}.COLLATE_FUNCTION", collate, COLLATOR_REGISTRY)
        tv_names = [n for n in dir(tv_transforms) if n[0].isupper()]
        for i, t in enumerate(data.get("TRANSFORMS") or []):
            if t.get("transform_type") not in (None, "classy"):
                continue
            check(f"DATA.{split}.TRANSFORMS[{i}].name", t["name"], TRANSFORM_REGISTRY, tv_names)


# --------------------------------------------------------------------------
# SwAV loss
# --------------------------------------------------------------------------
def _multicrop(cfg) -> Optional[Dict[str, Any]]:
    for t in cfg.DATA.TRAIN.TRANSFORMS or []:
        if t.get("name") == MULTICROP:
            return t
    return None


def _positive(key: str, value, integer: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        _fail(key, f"must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _infer_swav_loss(cfg) -> None:
    key = f"LOSS.{SWAV_LOSS}"
    loss = cfg.LOSS.get(SWAV_LOSS)
    if loss is None:
        _fail(key, "missing: LOSS.name is swav_plugin_loss but it has no parameters")

    # number of crops from the multi-crop transform
    mc = _multicrop(cfg)
    if mc is not None:
        lists = {k: list(mc.get(k) or []) for k in ("nmb_crops", "size_crops", "min_scale_crops", "max_scale_crops")}
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) != 1 or lengths["nmb_crops"] == 0:
            _fail(
                f"DATA.TRAIN.TRANSFORMS[{MULTICROP}]",
                "nmb_crops, size_crops, min_scale_crops and max_scale_crops must be "
                f"non-empty lists of one length, got lengths {lengths}",
            )
        num_crops = int(sum(lists["nmb_crops"]))
        if loss.get("num_crops") not in (None, num_crops):
            _fail(f"{key}.num_crops", f"is {loss.num_crops} but the multi-crop transform makes {num_crops} crops")
        loss["num_crops"] = num_crops
    elif loss.get("num_crops") is None:
        _fail(f"{key}.num_crops", f"not set and no {MULTICROP} transform in DATA.TRAIN.TRANSFORMS to infer it from")
    num_crops = loss["num_crops"]

    for name in ("temperature", "epsilon"):
        _positive(f"{key}.{name}", loss.get(name))
    _positive(f"{key}.sinkhorn_iterations", loss.get("sinkhorn_iterations"), integer=True)
    cfa = list(loss.get("crops_for_assign") or [])
    if not cfa:
        _fail(f"{key}.crops_for_assign", "must list at least one crop index")
    for c in cfa:
        if not isinstance(c, int) or c < 0 or c >= num_crops:
            _fail(f"{key}.crops_for_assign", f"index {c!r} is outside the {num_crops} crops (0..{num_crops - 1})")
    if num_crops < 2:
        _fail(f"{key}.num_crops", f"SwAV predicts one crop's codes from another: needs >= 2 crops, got {num_crops}")

    # prototypes: one source of truth, the head
    heads = cfg.MODEL.HEAD.PARAMS
    if not heads or heads[0][0] != PLUGIN_HEAD:
        _fail("MODEL.HEAD.PARAMS", f"{SWAV_LOSS} needs {PLUGIN_HEAD} as the first head, got {heads[0][0] if heads else 'none'}")
    nmb = heads[0][1].get("nmb_prototypes", 3000)
    nmb = [nmb] if isinstance(nmb, int) else list(nmb)
    loss["nmb_prototypes"] = nmb
    loss["feat_dim"] = heads[0][1].get("feat_dim", 128)

    # queue: total over ranks, trimmed to a multiple of the global batch
    qlen = int(loss.get("queue_length", 0) or 0)
    gbs = global_batch_size(cfg)
    if qlen < 0:
        _fail(f"{key}.queue_length", f"must be >= 0, got {qlen}")
    if qlen > 0:
        if qlen < gbs:
            _fail(
                f"{key}.queue_length",
                f"{qlen} is shorter than the global batch {gbs} "
                f"(DATA.TRAIN.BATCHSIZE_PER_REPLICA x {world_size(cfg)} ranks); "
                "use 0 for no queue or a multiple of the global batch",
            )
        trimmed = qlen - qlen % gbs
        if trimmed != qlen:
            logger.info("%s.queue_length %d trimmed to %d (multiple of the global batch %d)", key, qlen, trimmed, gbs)
        loss["queue_length"] = trimmed
        loss["local_queue_length"] = trimmed // world_size(cfg)
    else:
        loss["local_queue_length"] = 0
    if int(loss.get("epoch_queue_starts", 0) or 0) < 0:
        _fail(f"{key}.epoch_queue_starts", "must be >= 0")
    if int(loss.get("freeze_prototypes_niters", 0) or 0) < 0:
        _fail(f"{key}.freeze_prototypes_niters", "must be >= 0")
    loss["global_batch_size"] = gbs

    from vissl.utils.checkpoint import get_checkpoint_folder

    loss["output_dir"] = get_checkpoint_folder(cfg)


# --------------------------------------------------------------------------
# a row's recipe on another number of GPUs
# --------------------------------------------------------------------------
def recipe_global_batch(cfg) -> Optional[int]:
    """``SWAV_PLUGIN.RECIPE_GLOBAL_BATCH`` (the row's published global batch), or None."""
    plugin = cfg.get("SWAV_PLUGIN") or {}
    ref = plugin.get("RECIPE_GLOBAL_BATCH")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, int) or ref <= 0:
        _fail("SWAV_PLUGIN.RECIPE_GLOBAL_BATCH", f"must be a positive integer or null, got {ref!r}")
    return ref


def scale_iterations(niters: int, recipe_batch: int, batch: int) -> int:
    """``niters`` iterations at ``recipe_batch`` restated at ``batch`` images per
    iteration, covering at least as many images: ``ceil(niters * recipe_batch / batch)``."""
    return -(-int(niters) * int(recipe_batch) // int(batch))


def _infer_recipe_scaling(cfg) -> None:
    ref = recipe_global_batch(cfg)
    if ref is None:
        return
    gbs = global_batch_size(cfg)
    loss = cfg.LOSS.get(cfg.LOSS.name)
    plugin = cfg.SWAV_PLUGIN
    record = dict(plugin.get("SCALED_ITERATIONS") or {})
    for name in ITERATION_KEYS:
        if not loss or loss.get(name) is None:
            continue
        key = f"LOSS.{cfg.LOSS.name}.{name}"
        # idempotent: a config inferred twice is scaled from the recipe's value once
        recipe = record[key][0] if key in record else loss[name]
        if isinstance(recipe, bool) or not isinstance(recipe, int) or recipe < 0:
            _fail(key, f"must be an integer >= 0, got {recipe!r}")
        loss[name] = scale_iterations(recipe, ref, gbs)
        record[key] = [recipe, loss[name]]
    plugin["SCALED_ITERATIONS"] = record
    if loss and loss.get("queue_length") and plugin.get("RECIPE_QUEUE_LENGTH") is None:
        plugin["RECIPE_QUEUE_LENGTH"] = loss["queue_length"]  # before trimming to the new global batch


def _check_runtime(cfg) -> None:
    """What VISSL would reject only once processes and models exist."""
    # a batch of 0 fails only inside the first data loader, after the model is built
    _positive("DATA.TRAIN.BATCHSIZE_PER_REPLICA", cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA, integer=True)
    _positive("OPTIMIZER.num_epochs", cfg.OPTIMIZER.num_epochs, integer=True)
    amp = cfg.MODEL.AMP_PARAMS
    on_cpu = cfg.MACHINE.DEVICE != "gpu"
    dtype = amp.get("DTYPE", "float16")
    if dtype not in AMP_DTYPES:
        _fail("MODEL.AMP_PARAMS.DTYPE", f"must be one of {', '.join(AMP_DTYPES)}, got {dtype!r}")
    if amp.USE_AMP:
        if on_cpu:
            _fail("MODEL.AMP_PARAMS.USE_AMP", "VISSL runs mixed precision on GPU only; set it false with MACHINE.DEVICE=cpu")
        if str(amp.AMP_TYPE).lower() == "apex":
            from vissl.utils.misc import is_apex_available

            if not is_apex_available():
                _fail("MODEL.AMP_PARAMS.AMP_TYPE", "apex is not installed; use 'pytorch' (torch.amp)")
        if dtype != "float16" and cfg.TRAINER.TRAIN_STEP_NAME != PLUGIN_TRAIN_STEP:
            _fail(
                "MODEL.AMP_PARAMS.DTYPE",
                f"{dtype} needs TRAINER.TRAIN_STEP_NAME={PLUGIN_TRAIN_STEP} "
                f"({cfg.TRAINER.TRAIN_STEP_NAME} always autocasts to float16)",
            )
    keep = ((cfg.get("SWAV_PLUGIN") or {}).get("CHECKPOINT") or {}).get("KEEP_LAST_ITERATION_CHECKPOINTS")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        # Checked here, not only when each rank builds its checkpoint hook.
        _fail(
            "SWAV_PLUGIN.CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS",
            f"must be an integer >= 0 (0 keeps every iteration checkpoint), got {keep!r}",
        )
    sync = cfg.MODEL.SYNC_BN_CONFIG
    if sync.CONVERT_BN_TO_SYNC_BN and on_cpu:
        _fail("MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN", "torch's SyncBatchNorm runs on GPU only; set it false with MACHINE.DEVICE=cpu")


def recipe_warnings(cfg) -> List[str]:
    """What a run of a model-zoo row does differently from the published run."""
    ref = recipe_global_batch(cfg)
    if ref is None:
        return []
    out = []
    gbs = global_batch_size(cfg)
    lr = cfg.OPTIMIZER.param_schedulers.lr
    if gbs != ref and lr.get("name") == WARMUP_COSINE and not lr.auto_lr_scaling.auto_scale:
        out.append(
            f"global batch {gbs} differs from the recipe's {ref} but "
            "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale is false: "
            f"the LR ({lr.base_lr:g}) is the recipe's LR for {ref} images, not scaled"
        )
    loss = cfg.LOSS.get(cfg.LOSS.name) or {}
    # Below the batch the recipe was measured at (the release: 4096; the
    # small-image recipe: 64 with its 100 prototypes) and without a queue.
    if cfg.LOSS.name == SWAV_LOSS and not loss.get("queue_length") and gbs < min(ref, SMALLEST_NO_QUEUE_BATCH):
        q = SMALL_BATCH_QUEUE
        out.append(
            f"global batch {gbs} without a queue, below the recipe's {ref}: the release trains without a queue only at "
            f"{SMALLEST_NO_QUEUE_BATCH}, and small batches without one often collapse. Its "
            f"batch-256 rows ({', '.join(q['rows'])}) use queue_length {q['queue_length']} from "
            f"epoch {q['epoch_queue_starts']}: config.LOSS.{SWAV_LOSS}.queue_length={q['queue_length']} "
            f"config.LOSS.{SWAV_LOSS}.epoch_queue_starts={q['epoch_queue_starts']}"
        )
    return out


# --------------------------------------------------------------------------
# learning rate
# --------------------------------------------------------------------------
def _infer_lr(cfg, auto_scale: bool) -> None:
    lr = cfg.OPTIMIZER.param_schedulers.lr
    if lr.get("name") != WARMUP_COSINE:
        return
    key = "OPTIMIZER.param_schedulers.lr"
    for name in ("base_lr", "final_lr", "start_warmup", "warmup_epochs"):
        v = lr.get(name)
        if not isinstance(v, (int, float)) or v < 0:
            _fail(f"{key}.{name}", f"must be a number >= 0, got {v!r}")
    if lr.warmup_epochs >= cfg.OPTIMIZER.num_epochs and lr.warmup_epochs > 0:
        _fail(f"{key}.warmup_epochs", f"({lr.warmup_epochs}) must be < OPTIMIZER.num_epochs ({cfg.OPTIMIZER.num_epochs})")
    if auto_scale:
        from swav_vissl_plugin.optim import scale_lr

        scaling = lr.auto_lr_scaling
        if scaling.get("scaling_type", "linear") != "linear":
            _fail(f"{key}.auto_lr_scaling.scaling_type", "only 'linear' is supported for the SwAV recipe")
        ref = recipe_global_batch(cfg)
        if ref is not None:
            plugin = cfg.SWAV_PLUGIN
            if plugin.get("RECIPE_LR"):  # inferred before: scale from the file's values, once
                lr["base_lr"], lr["final_lr"] = plugin.RECIPE_LR
            at_ref = scale_lr(scaling.base_value, ref, scaling.base_lr_batch_size)
            if not math.isclose(at_ref, lr.base_lr, rel_tol=1e-6):
                _fail(
                    f"{key}.base_lr",
                    f"{lr.base_lr:g} at the recipe's global batch {ref} (SWAV_PLUGIN.RECIPE_GLOBAL_BATCH) "
                    f"disagrees with auto_lr_scaling.base_value {scaling.base_value:g} per "
                    f"{scaling.base_lr_batch_size} (= {at_ref:g} at {ref}); change both together",
                )
            plugin["RECIPE_LR"] = [float(lr.base_lr), float(lr.final_lr)]
        base = scale_lr(scaling.base_value, global_batch_size(cfg), scaling.base_lr_batch_size)
        ratio = lr.final_lr / lr.base_lr if lr.base_lr else 0.0
        lr["base_lr"] = float(base)
        lr["final_lr"] = float(base * ratio)
    # VISSL copies lr into lr_head unless the head has its own schedule.
    if not cfg.OPTIMIZER.head_optimizer_params.use_different_lr:
        cfg.OPTIMIZER.param_schedulers.lr_head = lr


def describe(cfg, iterations_per_epoch: Optional[int] = None) -> str:
    """The effective recipe a run trains with.

    One line of values (world size, global batch, LR, crops, prototypes,
    iteration-counted values and queue, each with the recipe's value where
    the run differs from it), then one ``WARNING: ...`` line per
    :func:`recipe_warnings` entry. With ``iterations_per_epoch`` (known once
    the dataset is built; the plugin's train step logs this at the first
    iteration) the iteration counts are also given in epochs.
    """
    gbs = global_batch_size(cfg)
    ref = recipe_global_batch(cfg)
    ipe = int(iterations_per_epoch) if iterations_per_epoch else None
    batch = f"global batch {gbs} ({cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA}/rank)"
    if ref is not None and ref != gbs:
        batch += f", recipe {ref}"
    parts = [f"world size {world_size(cfg)}", batch]
    if ipe:
        parts.append(f"{ipe} iterations per epoch")
    parts.append(f"epochs {cfg.OPTIMIZER.num_epochs}")
    lr = cfg.OPTIMIZER.param_schedulers.lr
    if lr.get("name") == WARMUP_COSINE:
        text = f"lr {lr.base_lr:g} -> {lr.final_lr:g}"
        scaling = lr.auto_lr_scaling
        if scaling.auto_scale:
            text += f" ({scaling.base_value:g} per {scaling.base_lr_batch_size} images"
            recipe_lr = (cfg.get("SWAV_PLUGIN") or {}).get("RECIPE_LR")
            if recipe_lr and ref != gbs:
                text += f"; recipe {recipe_lr[0]:g} -> {recipe_lr[1]:g} at {ref}"
            text += ")"
        parts.append(f"{text}, warmup {lr.warmup_epochs} epochs from {lr.start_warmup:g}")
    loss = cfg.LOSS.get(cfg.LOSS.name) or {}
    if cfg.LOSS.name == SWAV_LOSS:
        parts.append(f"crops {loss.num_crops}, assign {list(loss.crops_for_assign)}")
        parts.append(f"prototypes {list(loss.nmb_prototypes)}")
    scaled = (cfg.get("SWAV_PLUGIN") or {}).get("SCALED_ITERATIONS") or {}
    for name in ITERATION_KEYS:
        if loss.get(name) is None:
            continue
        text = f"{name} {loss[name]}"
        recipe = scaled.get(f"LOSS.{cfg.LOSS.name}.{name}")
        if recipe and recipe[0] != loss[name]:
            text += f" (recipe {recipe[0]} at {ref})"
        if ipe:
            text += f" = {loss[name] / ipe:.2f} epochs"
        parts.append(text)
    if cfg.LOSS.name == SWAV_LOSS:
        if loss.queue_length:
            n = loss.queue_length // gbs
            text = (
                f"queue {loss.queue_length} total / {loss.local_queue_length} per rank from epoch "
                f"{loss.get('epoch_queue_starts', 0)} (= {n} global batch{'es' if n > 1 else ''}"
            )
            stated = (cfg.get("SWAV_PLUGIN") or {}).get("RECIPE_QUEUE_LENGTH")
            if stated and stated != loss.queue_length:
                text += f"; recipe {stated}, trimmed to a multiple of {gbs}"
            parts.append(text + ")")
        else:
            parts.append("no queue")
    lines = ["; ".join(parts)]
    lines += [f"WARNING: {w}" for w in recipe_warnings(cfg)]
    return "\n".join(lines)


#: loss name -> function(cfg) completing and checking that loss's config in place.
LOSS_INFERENCE: Dict[str, Callable[[Any], None]] = {SWAV_LOSS: _infer_swav_loss}


def register_loss_inference(loss_name: str):
    """Decorator: ``fn(cfg)`` completes/checks the config when ``LOSS.name == loss_name``."""

    def wrap(fn):
        LOSS_INFERENCE[loss_name] = fn
        return fn

    return wrap


def infer_and_validate(cfg, auto_scale_lr: bool = False, check_data: bool = False):
    """Check and complete a VISSL ``config`` (AttrDict) in place; returns it.

    ``check_data``: also check that every disk data path the run reads
    exists and holds images (:func:`swav_vissl_plugin.data_source.check_data_paths`).
    """
    _check_registered(cfg)
    _check_runtime(cfg)
    _infer_recipe_scaling(cfg)
    if cfg.LOSS.name in LOSS_INFERENCE:
        LOSS_INFERENCE[cfg.LOSS.name](cfg)
    _infer_lr(cfg, auto_scale_lr)
    if check_data:  # after the config's own values: this one reads the file system
        from swav_vissl_plugin.data_source import check_data_paths

        check_data_paths(cfg)
    for warning in recipe_warnings(cfg):
        logger.warning("%s", warning)
    return cfg


# hydra's GlobalHydra is one per process: two threads composing at once (a
# sweep's parallel runs) would find it initialised by the other.
_HYDRA_LOCK = threading.Lock()


def compose(overrides: Sequence[str], dump_config: bool = True):
    """VISSL's composition of ``overrides`` plus the plugin's inference.
    Safe to call from several threads (hydra's part runs one at a time).

    ``dump_config`` composes the config of a run, as VISSL's command line
    does: its data paths are checked (before any rank or data-loader worker
    starts), then ``train_config.yaml`` is written. Without it the config is
    only composed and checked (e.g. to inspect a row without its data).

    Returns ``(args, config)`` like ``vissl.utils.hydra_config.convert_to_attrdict``.
    """
    import swav_vissl_plugin  # noqa: F401  (registration)
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf
    from vissl.config import AttrDict
    from vissl.utils.hydra_config import convert_to_attrdict

    with _HYDRA_LOCK, initialize_config_module(config_module="vissl.config", version_base=None):
        cfg = hydra_compose("defaults", overrides=list(overrides))
    # VISSL's own LR scaling knows only its schedulers: take ours out of its way
    # (and name an unknown one before VISSL fails on it with a RuntimeError).
    lr = cfg.config.OPTIMIZER.param_schedulers.lr
    if lr.auto_lr_scaling.auto_scale:
        from classy_vision.optim.param_scheduler import PARAM_SCHEDULER_REGISTRY

        _check_name("OPTIMIZER.param_schedulers.lr.name", lr.get("name"), PARAM_SCHEDULER_REGISTRY)
    ours = lr.get("name") == WARMUP_COSINE and bool(lr.auto_lr_scaling.auto_scale)
    if ours:
        OmegaConf.set_struct(cfg, False)
        lr.auto_lr_scaling.auto_scale = False
    try:
        args, config = convert_to_attrdict(cfg, dump_config=False)
    except AssertionError as e:
        raise ConfigError(f"VISSL rejected the config: {e}") from e
    if ours:
        config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale = True
    infer_and_validate(config, auto_scale_lr=ours, check_data=dump_config)
    if dump_config:
        _dump(config)
    return args, config


def _dump(config) -> None:
    """Write train_config.yaml as VISSL does (its dtype conversion is not YAML)."""
    from vissl.utils.hydra_config import save_attrdict_to_disk

    fsdp = config.MODEL.FSDP_CONFIG
    dtype = fsdp["compute_dtype"]
    fsdp["compute_dtype"] = str(dtype).replace("torch.", "")
    try:
        save_attrdict_to_disk(config)
    finally:
        fsdp["compute_dtype"] = dtype
