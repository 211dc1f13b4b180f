"""A model-zoo row launched on another number of GPUs keeps its recipe, and says so.

Recipe: "base_lr 4.8 at 4096 and 0.6 at 256" (0.3 and 0.6 per 256 images);
"freeze_prototypes_niters: 313 at 4096 and 5005 at 256 are both one epoch";
the bs256 rows' queue: 3840 from epoch 15.
"""

import logging
import math

import pytest

from swav_vissl_plugin.config import ConfigError, describe, infer_and_validate

LOSS = "config.LOSS.swav_plugin_loss"
LR = "config.OPTIMIZER.param_schedulers.lr"


def gpus(nodes, per_node):
    return [f"config.DISTRIBUTED.NUM_NODES={nodes}", f"config.DISTRIBUTED.NUM_PROC_PER_NODE={per_node}"]


def row(name):
    return f"swav_plugin/pretrain/{name}"


def test_published_launch_is_the_recipe(compose_cfg):
    c = compose_cfg(config=row("swav_800ep"))
    lr, loss = c.OPTIMIZER.param_schedulers.lr, c.LOSS.swav_plugin_loss
    assert (lr.base_lr, lr.final_lr, loss.freeze_prototypes_niters) == (pytest.approx(4.8), pytest.approx(0.0048), 313)
    c = compose_cfg(config=row("swav_200ep_bs256"))
    lr, loss = c.OPTIMIZER.param_schedulers.lr, c.LOSS.swav_plugin_loss
    assert (lr.base_lr, lr.final_lr, loss.freeze_prototypes_niters) == (pytest.approx(0.6), pytest.approx(0.0006), 5005)
    assert (loss.queue_length, loss.local_queue_length, loss.epoch_queue_starts) == (3840, 960, 15)


class _Records(logging.Handler):
    """Records of one logger, whatever the root logger is (VISSL's launcher replaces
    ``logging.root`` in-process, which detaches pytest's caplog)."""

    def __init__(self, name):
        super().__init__(logging.WARNING)
        self.logger, self.records = logging.getLogger(name), []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_row1_on_4_gpus_keeps_per_gpu_batch_lr_rule_and_freeze_epochs(compose_cfg):
    with _Records("swav_vissl_plugin.config") as caplog:
        c = compose_cfg(*gpus(1, 4), config=row("swav_800ep"))
    assert c.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 64  # per-GPU batch kept: global 256
    lr = c.OPTIMIZER.param_schedulers.lr
    assert lr.base_lr == pytest.approx(0.3) and lr.final_lr == pytest.approx(0.0003)  # 0.3 per 256
    assert (lr.warmup_epochs, lr.start_warmup, c.OPTIMIZER.num_epochs) == (10, 0.3, 800)  # epochs unchanged
    # 313 iterations x 4096 images = 5008 iterations x 256 (>= the recipe's images, one epoch)
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == 5008
    assert c.SWAV_PLUGIN.SCALED_ITERATIONS == {"LOSS.swav_plugin_loss.freeze_prototypes_niters": [313, 5008]}
    # small batch, no queue: the log says so and names the bs256 rows' queue
    warning = " ".join(r.getMessage() for r in caplog.records)
    for needle in ("global batch 256 without a queue", "swav_200ep_bs256", "swav_400ep_bs256",
                   f"{LOSS}.queue_length=3840", f"{LOSS}.epoch_queue_starts=15"):
        assert needle in warning, warning
    text = describe(c, iterations_per_epoch=5004)
    first, *warnings = text.splitlines()
    for needle in ("global batch 256 (64/rank), recipe 4096", "5004 iterations per epoch",
                   "lr 0.3 -> 0.0003 (0.3 per 256 images; recipe 4.8 -> 0.0048 at 4096)",
                   "freeze_prototypes_niters 5008 (recipe 313 at 4096) = 1.00 epochs", "no queue"):
        assert needle in first, first
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: global batch 256 without a queue")


def test_bs256_row_on_64_gpus(compose_cfg):
    # 5005 iterations at 256 = 313 at 4096: the two published freezes agree
    c = compose_cfg(f"{LOSS}.queue_length=0", *gpus(8, 8), config=row("swav_400ep_bs256"))
    lr = c.OPTIMIZER.param_schedulers.lr
    assert lr.base_lr == pytest.approx(9.6) and lr.final_lr == pytest.approx(0.0096)  # 0.6 per 256 kept
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == 313
    # with its queue, 3840 embeddings cannot hold one 4096 batch: stops with the key
    with pytest.raises(ConfigError, match=r"config\.LOSS\.swav_plugin_loss\.queue_length: 3840 is shorter"):
        compose_cfg(*gpus(8, 8), config=row("swav_400ep_bs256"))


def test_bs256_row_on_8_gpus_trims_queue_and_rounds_freeze_up(compose_cfg):
    c = compose_cfg(*gpus(1, 8), config=row("swav_200ep_bs256"))
    loss, lr = c.LOSS.swav_plugin_loss, c.OPTIMIZER.param_schedulers.lr
    assert lr.base_lr == pytest.approx(1.2)
    assert loss.freeze_prototypes_niters == 2503  # ceil(5005 * 256 / 512)
    assert (loss.queue_length, loss.local_queue_length, loss.epoch_queue_starts) == (3584, 448, 15)  # 7 x 512
    assert "queue 3584 total / 448 per rank from epoch 15 (= 7 global batches; recipe 3840, trimmed" in describe(c)
    assert "WARNING" not in describe(c)


def test_wide_row_keeps_its_own_lr_per_256(compose_cfg):
    # row 14: 4.8 at 2560 = 0.48 per 256; on 8 GPUs x 40 = 320
    c = compose_cfg(*gpus(1, 8), config=row("swav_RN50w4_400ep"))
    lr, loss = c.OPTIMIZER.param_schedulers.lr, c.LOSS.swav_plugin_loss
    assert lr.base_lr == pytest.approx(0.6) and lr.final_lr == pytest.approx(0.0006)
    assert loss.freeze_prototypes_niters == math.ceil(313 * 2560 / 320)
    assert loss.queue_length == 2560 and loss.epoch_queue_starts == 0


def test_a_row_cannot_state_one_lr_and_train_another(compose_cfg):
    # base_lr 4.8 at 4096 but base_value 0.6 per 256 (= 9.6): which one? Stop.
    with pytest.raises(ConfigError) as err:
        compose_cfg(f"{LR}.auto_lr_scaling.base_value=0.6", config=row("swav_400ep"))
    assert "config.OPTIMIZER.param_schedulers.lr.base_lr: 4.8 at the recipe's global batch 4096" in str(err.value)
    c = compose_cfg(f"{LR}.auto_lr_scaling.base_value=0.6", f"{LR}.base_lr=9.6", f"{LR}.final_lr=0.0096",
                    config=row("swav_400ep"))
    assert c.OPTIMIZER.param_schedulers.lr.base_lr == pytest.approx(9.6)


def test_lr_not_scaled_is_said(compose_cfg):
    c = compose_cfg(f"{LR}.auto_lr_scaling.auto_scale=false", f"{LOSS}.queue_length=3840", *gpus(1, 4),
                    config=row("swav_800ep"))
    assert c.OPTIMIZER.param_schedulers.lr.base_lr == 4.8
    assert "auto_scale is false: the LR (4.8) is the recipe's LR for 4096 images, not scaled" in describe(c)


def test_inference_twice_scales_once(compose_cfg):
    c = compose_cfg(*gpus(1, 4), config=row("swav_800ep"))
    infer_and_validate(c, auto_scale_lr=True)
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == 5008
    assert c.OPTIMIZER.param_schedulers.lr.base_lr == pytest.approx(0.3)


def test_small_image_recipe_on_two_processes_is_rescaled(compose_cfg):
    small = "swav_plugin/pretrain/swav_small_images"
    c = compose_cfg("config.DISTRIBUTED.NUM_PROC_PER_NODE=2", config=small)  # 2 x 64 = 128 images per step
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == 31  # still one epoch of 4,000 images
    assert c.OPTIMIZER.param_schedulers.lr.base_lr == pytest.approx(9.6)  # 19.2 per 256 images
    c = compose_cfg("config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
                    config=small)  # the recipe's global batch on 2 processes: nothing to restate
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == 62
    assert c.OPTIMIZER.param_schedulers.lr.base_lr == pytest.approx(4.8)
    assert "WARNING" not in describe(c)


def test_quickstart_is_not_rescaled(compose_cfg):
    c = compose_cfg("config.DISTRIBUTED.NUM_PROC_PER_NODE=2")
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == 62
    assert c.OPTIMIZER.param_schedulers.lr.base_lr == 4.8
    assert "WARNING" not in describe(c)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["config.MACHINE.DEVICE=cpu"], "MODEL.AMP_PARAMS.USE_AMP"),
        (["config.MACHINE.DEVICE=cpu", "config.MODEL.AMP_PARAMS.USE_AMP=false"], "MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN"),
        (["config.MODEL.AMP_PARAMS.DTYPE=float32"], "MODEL.AMP_PARAMS.DTYPE"),
        (["config.MODEL.AMP_PARAMS.DTYPE=bfloat16", "config.TRAINER.TRAIN_STEP_NAME=standard_train_step"], "MODEL.AMP_PARAMS.DTYPE"),
        (["config.MODEL.AMP_PARAMS.AMP_TYPE=apex"], "MODEL.AMP_PARAMS.AMP_TYPE"),
        (["config.TRAINER.TRAIN_STEP_NAME=swav_step"], "TRAINER.TRAIN_STEP_NAME"),
        (["config.SWAV_PLUGIN.RECIPE_GLOBAL_BATCH=0"], "SWAV_PLUGIN.RECIPE_GLOBAL_BATCH"),
    ],
)
def test_configs_training_would_reject_stop_at_composition(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as err:
        compose_cfg(*overrides, config=row("swav_800ep"))
    assert str(err.value).startswith(f"config.{key}:"), str(err.value)
