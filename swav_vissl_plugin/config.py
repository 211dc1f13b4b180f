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
  gives 4.8 at 4096; ``final_lr`` keeps its ratio to ``base_lr``).

Every error is a :class:`ConfigError` (a ``ValueError``) whose message starts
with the offending key.
"""

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

SWAV_LOSS = "swav_plugin_loss"
MULTICROP = "SwavPluginMultiCrop"
WARMUP_COSINE = "swav_plugin_warmup_cosine"
PLUGIN_HEAD = "swav_plugin_head"

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
def _check_registered(cfg) -> None:
    from classy_vision.dataset.transforms import TRANSFORM_REGISTRY
    from classy_vision.losses import LOSS_REGISTRY
    from classy_vision.optim import OPTIMIZER_REGISTRY
    from classy_vision.optim.param_scheduler import PARAM_SCHEDULER_REGISTRY
    from vissl.data.collators import COLLATOR_REGISTRY
    from vissl.models.heads import MODEL_HEADS_REGISTRY
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY

    def check(key, name, registry, extra=()):
        if name not in registry and name not in extra:
            known = sorted(list(registry) + list(extra))
            close = [k for k in known if k.lower().startswith(str(name)[:4].lower())]
            hint = f" (similar: {', '.join(close[:5])})" if close else ""
            _fail(key, f"unknown component name {name!r}{hint}")

    import torch.nn.modules.loss as torch_losses
    import torchvision.transforms as tv_transforms

    torch_loss_names = [n for n in dir(torch_losses) if n[0].isupper()]
    check("LOSS.name", cfg.LOSS.name, LOSS_REGISTRY, torch_loss_names)
    check("MODEL.TRUNK.NAME", cfg.MODEL.TRUNK.NAME, MODEL_TRUNKS_REGISTRY)
    for i, head in enumerate(cfg.MODEL.HEAD.PARAMS):
        check(f"MODEL.HEAD.PARAMS[{i}][0]", head[0], MODEL_HEADS_REGISTRY)
    check("OPTIMIZER.name", cfg.OPTIMIZER.name, OPTIMIZER_REGISTRY)
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
        base = scale_lr(scaling.base_value, global_batch_size(cfg), scaling.base_lr_batch_size)
        ratio = lr.final_lr / lr.base_lr if lr.base_lr else 0.0
        lr["base_lr"] = float(base)
        lr["final_lr"] = float(base * ratio)
    # VISSL copies lr into lr_head unless the head has its own schedule.
    if not cfg.OPTIMIZER.head_optimizer_params.use_different_lr:
        cfg.OPTIMIZER.param_schedulers.lr_head = lr


def describe(cfg) -> str:
    """One line with the effective recipe values a run trains with."""
    parts = [
        f"world size {world_size(cfg)}",
        f"global batch {global_batch_size(cfg)} ({cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA}/rank)",
        f"epochs {cfg.OPTIMIZER.num_epochs}",
    ]
    lr = cfg.OPTIMIZER.param_schedulers.lr
    if lr.get("name") == WARMUP_COSINE:
        parts.append(
            f"lr {lr.base_lr:g} -> {lr.final_lr:g}, warmup {lr.warmup_epochs} epochs from {lr.start_warmup:g}"
        )
    if cfg.LOSS.name == SWAV_LOSS:
        loss = cfg.LOSS[SWAV_LOSS]
        parts.append(f"crops {loss.num_crops}, assign {list(loss.crops_for_assign)}")
        parts.append(f"prototypes {list(loss.nmb_prototypes)}")
        parts.append(f"freeze_prototypes_niters {loss.get('freeze_prototypes_niters', 0)}")
        parts.append(
            f"queue {loss.queue_length} total / {loss.local_queue_length} per rank from epoch {loss.get('epoch_queue_starts', 0)}"
            if loss.queue_length
            else "no queue"
        )
    return "; ".join(parts)


#: loss name -> function(cfg) completing and checking that loss's config in place.
LOSS_INFERENCE: Dict[str, Callable[[Any], None]] = {SWAV_LOSS: _infer_swav_loss}


def register_loss_inference(loss_name: str):
    """Decorator: ``fn(cfg)`` completes/checks the config when ``LOSS.name == loss_name``."""

    def wrap(fn):
        LOSS_INFERENCE[loss_name] = fn
        return fn

    return wrap


def infer_and_validate(cfg, auto_scale_lr: bool = False):
    """Check and complete a VISSL ``config`` (AttrDict) in place; returns it."""
    _check_registered(cfg)
    if cfg.LOSS.name in LOSS_INFERENCE:
        LOSS_INFERENCE[cfg.LOSS.name](cfg)
    _infer_lr(cfg, auto_scale_lr)
    return cfg


def compose(overrides: Sequence[str], dump_config: bool = True):
    """VISSL's composition of ``overrides`` plus the plugin's inference.

    Returns ``(args, config)`` like ``vissl.utils.hydra_config.convert_to_attrdict``.
    """
    import swav_vissl_plugin  # noqa: F401  (registration)
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf
    from vissl.config import AttrDict
    from vissl.utils.hydra_config import convert_to_attrdict

    with initialize_config_module(config_module="vissl.config", version_base=None):
        cfg = hydra_compose("defaults", overrides=list(overrides))
    # VISSL's own LR scaling knows only its schedulers: take ours out of its way.
    lr = cfg.config.OPTIMIZER.param_schedulers.lr
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
    infer_and_validate(config, auto_scale_lr=ours)
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
