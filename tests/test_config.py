"""Config composition, inference and the errors bad configs stop with."""

import subprocess
import sys
from pathlib import Path

import pytest

from swav_vissl_plugin.config import ConfigError

LOSS = "config.LOSS.swav_plugin_loss"
MC = "config.DATA.TRAIN.TRANSFORMS.0"


def test_quickstart_composes_from_any_directory(tmp_path):
    # Installed configs resolve through the hydra search-path plugin, not the cwd.
    code = (
        "from swav_vissl_plugin.config import compose\n"
        "_, c = compose(['config=swav_plugin/pretrain/swav_quickstart'], dump_config=False)\n"
        "print(c.LOSS.name, c.LOSS.swav_plugin_loss.num_crops, c.MODEL.TRUNK.NAME)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["swav_plugin_loss", "6", "swav_plugin_small_cnn"]


def test_compose_from_several_threads_at_once():
    # a sweep composes its runs from parallel threads; hydra's global state is
    # one per process, so each thread must still get its own config
    from concurrent.futures import ThreadPoolExecutor

    from swav_vissl_plugin.config import compose

    def batch_of(b):
        over = ["config=swav_plugin/pretrain/swav_small_images", "config.DATA.TRAIN.DATA_PATHS=[.]",
                f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={b}"]
        return compose(over, dump_config=False)[1].DATA.TRAIN.BATCHSIZE_PER_REPLICA

    batches = [64, 256, 32, 128] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(batch_of, batches)) == batches


@pytest.mark.parametrize("config", ["swav_small_images", "swav_quickstart", "deepclusterv2_small_images",
                                    "deepclusterv2_quickstart", "selav2_small_images", "selav2_quickstart"])
def test_small_image_configs_share_the_whole_image_knn_view(compose_cfg, config):
    # one view for every small-image config (monitor/small_images_knn): images
    # at their own size; the ImageNet rows keep resize 256 / crop 224
    knn = compose_cfg(config=f"swav_plugin/pretrain/{config}", data=".").SWAV_PLUGIN.MONITOR.KNN
    assert (knn.RESIZE, knn.CROP, knn.BATCH_SIZE, knn.NUM_WORKERS) == (None, None, 500, 0)
    row = compose_cfg(config="swav_plugin/pretrain/swav_200ep", data=".").SWAV_PLUGIN.MONITOR.KNN
    assert (row.RESIZE, row.CROP) == (256, 224)


def test_base_config_is_the_recipe(compose_cfg):
    c = compose_cfg(config="swav_plugin/pretrain/swav_base")
    loss = c.LOSS.swav_plugin_loss
    assert (loss.num_crops, list(loss.crops_for_assign)) == (8, [0, 1])
    assert (loss.temperature, loss.epsilon, loss.sinkhorn_iterations) == (0.1, 0.05, 3)
    assert list(loss.nmb_prototypes) == [3000] and loss.feat_dim == 128
    assert loss.freeze_prototypes_niters == 313 and loss.local_queue_length == 0
    lr = c.OPTIMIZER.param_schedulers.lr
    assert (lr.base_lr, lr.final_lr, lr.warmup_epochs, lr.start_warmup) == (4.8, 0.0048, 10, 0.3)
    assert c.OPTIMIZER.name == "swav_plugin_larc" and c.OPTIMIZER.weight_decay == 1e-6
    assert c.OPTIMIZER.num_epochs == 800 and c.SEED_VALUE == 31
    assert 64 * 64 == c.DATA.TRAIN.BATCHSIZE_PER_REPLICA * 8 * 8


def test_queue_length_trimmed_to_multiple_of_global_batch(compose_cfg):
    c = compose_cfg(
        f"{LOSS}.queue_length=3900",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
    )
    # 3900 -> 3840 = 15 x 256, i.e. 960 per rank (recipe rows 5 and 6)
    assert c.LOSS.swav_plugin_loss.queue_length == 3840
    assert c.LOSS.swav_plugin_loss.local_queue_length == 960


def test_linear_lr_scaling(compose_cfg):
    lr_key = "config.OPTIMIZER.param_schedulers.lr"
    no_recipe = "config.SWAV_PLUGIN.RECIPE_GLOBAL_BATCH=null"  # base_value alone sets the LR
    c = compose_cfg(
        no_recipe,
        f"{lr_key}.auto_lr_scaling.auto_scale=true",
        f"{lr_key}.auto_lr_scaling.base_value=0.3",
        f"{lr_key}.base_lr=4.8",
        f"{lr_key}.final_lr=0.0048",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64",
        "config.DISTRIBUTED.NUM_NODES=8",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=8",
    )
    lr = c.OPTIMIZER.param_schedulers.lr
    assert lr.base_lr == pytest.approx(4.8) and lr.final_lr == pytest.approx(0.0048)
    c = compose_cfg(
        no_recipe,
        f"{lr_key}.auto_lr_scaling.auto_scale=true",
        f"{lr_key}.auto_lr_scaling.base_value=0.3",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
    )
    lr = c.OPTIMIZER.param_schedulers.lr
    assert lr.base_lr == pytest.approx(0.3) and lr.final_lr == pytest.approx(0.0003)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([f"{LOSS}.crops_for_assign=[0,6]"], "LOSS.swav_plugin_loss.crops_for_assign"),
        ([f"{LOSS}.crops_for_assign=[]"], "LOSS.swav_plugin_loss.crops_for_assign"),
        ([f"{MC}.size_crops=[28]"], "DATA.TRAIN.TRANSFORMS[SwavPluginMultiCrop]"),
        ([f"{MC}.min_scale_crops=[0.3,0.1,0.05]"], "DATA.TRAIN.TRANSFORMS[SwavPluginMultiCrop]"),
        ([f"{LOSS}.queue_length=50"], "LOSS.swav_plugin_loss.queue_length"),  # < the batch of 64
        ([f"{LOSS}.epsilon=0"], "LOSS.swav_plugin_loss.epsilon"),
        ([f"{LOSS}.epsilon=-0.05"], "LOSS.swav_plugin_loss.epsilon"),
        ([f"{LOSS}.temperature=0"], "LOSS.swav_plugin_loss.temperature"),
        ([f"{LOSS}.sinkhorn_iterations=0"], "LOSS.swav_plugin_loss.sinkhorn_iterations"),
        (["config.LOSS.name=swav_plugin_los"], "LOSS.name"),
        (["config.MODEL.TRUNK.NAME=small_cnn"], "MODEL.TRUNK.NAME"),
        (["config.OPTIMIZER.name=larc"], "OPTIMIZER.name"),
        (["config.OPTIMIZER.param_schedulers.lr.name=warmup_cos"], "OPTIMIZER.param_schedulers.lr.name"),
        ([f"{MC}.name=SwavMultiCrop"], "DATA.TRAIN.TRANSFORMS[0].name"),
        (["config.DATA.TRAIN.COLLATE_FUNCTION=swav_collator"], "DATA.TRAIN.COLLATE_FUNCTION"),
        (["config.OPTIMIZER.param_schedulers.lr.warmup_epochs=36"], "OPTIMIZER.param_schedulers.lr.warmup_epochs"),
        (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0"], "DATA.TRAIN.BATCHSIZE_PER_REPLICA"),
        (["config.OPTIMIZER.num_epochs=0"], "OPTIMIZER.num_epochs"),
        (
            ["config.SWAV_PLUGIN.CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS=-1"],
            "SWAV_PLUGIN.CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS",
        ),
    ],
)
def test_bad_config_names_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as err:
        compose_cfg(*overrides)
    assert f"config.{key}" in str(err.value)


def test_bad_config_stops_the_launcher_before_training(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "run_distributed_engines.py"
    ckpt = tmp_path / "checkpoints"
    out = subprocess.run(
        [
            sys.executable,
            str(tool),
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.CHECKPOINT.DIR={ckpt}",
            "config.LOSS.swav_plugin_loss.crops_for_assign=[0,9]",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "config.LOSS.swav_plugin_loss.crops_for_assign" in out.stderr
    assert not list(tmp_path.rglob("*.torch")) and not (ckpt / "train_config.yaml").exists()
