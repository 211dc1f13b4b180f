"""The whole training path learns, as independent plain loops do.

Parity tests prove each component against a reference; only a training run
proves that data, model, hooks, optimizer and schedule learn together. The
slow test trains the quickstart (the small-image recipe on the MNIST
sample, through VISSL's real trainer with every plugin hook) and
``tests/plain_swav.py`` (no VISSL, nothing of the plugin: torchvision's
transforms, its own model, Sinkhorn-Knopp, loss, LARC, schedule and
prototype freezing) on the same split, recipe and seed. Both must clear the
quickstart's quality bar and their kNN accuracies must agree within 2
points: a defect anywhere on the plugin's path that hurts learning (say,
prototypes never normalised, or crops of one image batched with another
image's) fails it, which no piecewise test can show. The same for
DeepCluster-v2: its quickstart against ``tests/plain_deepcluster.py`` (its
own memory bank, spherical k-means and cross-entropy to the cluster ids),
with the siblings' bar and no cluster empty two epochs running.
"""

import math

import pytest

import plain_deepcluster
import plain_swav

# The quickstart's bar (README, "What `make quickstart` does"), on held-out images.
LINEAR_BAR = 97.0
KNN_BAR = 95.0
KNN_AGREEMENT = 2.0  # points; seeds alone move the quickstart's kNN by about 1 (README, three seeds)
# The siblings' bar (README, "Three methods side by side").
SIBLING_LINEAR_BAR = 95.0
SIBLING_KNN_BAR = 92.0


def quickstart_recipe_common(cfg) -> dict:
    """What every small-image quickstart shares: data, model, optimizer, schedule."""
    crop = cfg.DATA.TRAIN.TRANSFORMS[0]
    head = cfg.MODEL.HEAD.PARAMS[0][1]
    lr = cfg.OPTIMIZER.param_schedulers.lr
    return {
        "nmb_crops": tuple(crop["nmb_crops"]),
        "size_crops": tuple(crop["size_crops"]),
        "min_scale_crops": tuple(crop["min_scale_crops"]),
        "max_scale_crops": tuple(crop["max_scale_crops"]),
        "blur_radius_fraction": tuple(crop["blur_radius_fraction"]),
        "flip_p": crop.get("flip_p", 0.5),
        "widths": tuple(cfg.MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.WIDTHS),
        "hidden_mlp": head["hidden_mlp"],
        "feat_dim": head["feat_dim"],
        "batch_size": cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        "base_lr": lr.base_lr,
        "final_lr": lr.final_lr,
        "warmup_epochs": lr.warmup_epochs,
        "start_warmup": lr.start_warmup,
        "weight_decay": cfg.OPTIMIZER.weight_decay,
        "epochs": cfg.OPTIMIZER.num_epochs,
    }


def quickstart_recipe(cfg) -> dict:
    """The composed quickstart config in the plain SwAV loop's terms."""
    out = quickstart_recipe_common(cfg)
    loss = cfg.LOSS.swav_plugin_loss
    out.update({
        "nmb_prototypes": cfg.MODEL.HEAD.PARAMS[0][1]["nmb_prototypes"],
        "epsilon": loss.epsilon,
        "temperature": loss.temperature,
        "sinkhorn_iterations": loss.sinkhorn_iterations,
        "crops_for_assign": tuple(loss.crops_for_assign),
        "freeze_prototypes_niters": loss.freeze_prototypes_niters,
    })
    return out


def deepcluster_recipe(cfg) -> dict:
    """The composed DeepCluster-v2 quickstart config in the plain loop's terms."""
    out = quickstart_recipe_common(cfg)
    loss = cfg.LOSS.deepclusterv2_plugin_loss
    head = cfg.MODEL.HEAD.PARAMS[0][1]
    out.update({
        "nmb_prototypes": tuple(head["nmb_prototypes"]),
        "kmeans_iterations": loss.kmeans_iterations,
        "temperature": loss.temperature,
        "crops_for_assign": tuple(loss.crops_for_assign),
    })
    return out


def assert_same_recipe(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, float):
            assert math.isclose(ours[key], value, rel_tol=1e-9), key
        else:
            assert ours[key] == value, key


def test_plain_loop_trains_the_quickstart_recipe(compose_cfg):
    """The plain loop's recipe is written out by hand (docs/small_data.md);
    this keeps it equal to the composed quickstart config, value for value,
    so the slow test below compares two implementations of one recipe."""
    cfg = compose_cfg()
    assert_same_recipe(quickstart_recipe(cfg), plain_swav.RECIPE)
    # and the transform the plugin builds has the recipe's augmentation values
    crop = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert crop.get("color_jitter_strength", 1.0) == 1.0
    assert (crop.get("color_jitter_p", 0.8), crop.get("grayscale_p", 0.2), crop.get("blur_p", 0.5)) == (0.8, 0.2, 0.5)


def test_plain_deepcluster_loop_trains_the_deepcluster_quickstart_recipe(compose_cfg):
    cfg = compose_cfg(config="swav_plugin/pretrain/deepclusterv2_quickstart")
    assert_same_recipe(deepcluster_recipe(cfg), plain_deepcluster.RECIPE)
    # the plugin never trains DeepCluster-v2's prototypes (they are the centroids)
    assert cfg.LOSS.deepclusterv2_plugin_loss.freeze_prototypes_niters >= cfg.OPTIMIZER.num_epochs * 4000 // 64


@pytest.mark.slow
def test_plugin_run_learns_as_the_plain_loop(mnist_folder, tmp_path):
    from swav_vissl_plugin.quickstart import run

    vissl = run(tmp_path / "quickstart")
    seed = vissl["seed"]
    plain = plain_swav.train(mnist_folder["train"], mnist_folder["val"], {}, seed=seed)
    summary = (f"plugin: kNN {vissl['knn_top1']:.1f}, linear {vissl['linear_probe_top1']['pretrained']:.1f}, "
               f"{vissl['prototypes_used']} prototypes; plain loop: kNN {plain['knn_top1']:.1f}, "
               f"linear {plain['linear_top1']:.1f}, {plain['prototypes_used']} prototypes")
    for name, knn, linear, used in (
        ("plugin", vissl["knn_top1"], vissl["linear_probe_top1"]["pretrained"], vissl["prototypes_used"]),
        ("plain loop", plain["knn_top1"], plain["linear_top1"], plain["prototypes_used"]),
    ):
        assert knn >= KNN_BAR, f"{name} kNN below the bar: {summary}"
        assert linear >= LINEAR_BAR, f"{name} linear probe below the bar: {summary}"
        assert used >= plain_swav.RECIPE["nmb_prototypes"] / 2, f"{name} uses too few prototypes: {summary}"
    assert abs(vissl["knn_top1"] - plain["knn_top1"]) <= KNN_AGREEMENT, summary
    assert not vissl["collapse_warnings"], summary


@pytest.mark.slow
def test_deepcluster_run_learns_as_the_plain_loop(mnist_folder, tmp_path):
    from swav_vissl_plugin.quickstart import run

    vissl = run(tmp_path / "deepclusterv2", method="deepclusterv2")
    plain = plain_deepcluster.train(mnist_folder["train"], mnist_folder["val"], {}, seed=vissl["seed"])
    summary = (f"plugin: kNN {vissl['knn_top1']:.1f}, linear {vissl['linear_probe_top1']['pretrained']:.1f}, "
               f"{vissl['prototypes_used']} clusters in use, clusters {vissl['clusters']}; plain loop: kNN "
               f"{plain['knn_top1']:.1f}, linear {plain['linear_top1']:.1f}, {plain['prototypes_used']} in use")
    for name, knn, linear in (
        ("plugin", vissl["knn_top1"], vissl["linear_probe_top1"]["pretrained"]),
        ("plain loop", plain["knn_top1"], plain["linear_top1"]),
    ):
        assert knn >= SIBLING_KNN_BAR, f"{name} kNN below the bar: {summary}"
        assert linear >= SIBLING_LINEAR_BAR, f"{name} linear probe below the bar: {summary}"
    # every epoch was clustered and no cluster stayed empty two epochs running
    assert vissl["clusters"]["epochs"] == plain_deepcluster.RECIPE["epochs"], summary
    assert vissl["clusters"]["empty_epochs_max"] <= 1, summary
    assert abs(vissl["knn_top1"] - plain["knn_top1"]) <= KNN_AGREEMENT, summary
