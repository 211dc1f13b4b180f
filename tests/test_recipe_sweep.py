"""The recipe sweep: its grid, the overrides of each point as the config
composes them, the collapse warnings read back from a run's log, and a tiny
sweep through VISSL's trainer that writes its table, JSON and curves."""

import json

import pytest

from swav_vissl_plugin.monitoring import collapse_message, likely_collapse_causes
from swav_vissl_plugin.quickstart import collapse_warnings
from swav_vissl_plugin.recipe_sweep import grid, markdown_table, point_overrides, sweep

SMALL = "swav_plugin/pretrain/swav_small_images"


def test_grid_is_the_full_product_with_distinct_names():
    points = grid([0.25, 1, 4], [0.03, 0.05], [64, 256])
    assert len(points) == 12
    assert len({p["name"] for p in points}) == 12
    assert {(p["lr_factor"], p["epsilon"], p["batch"]) for p in points} == {
        (f, e, b) for f in (0.25, 1.0, 4.0) for e in (0.03, 0.05) for b in (64, 256)
    }


@pytest.mark.parametrize("factor, batch", [(0.25, 64), (4.0, 256), (1.0, 128)])
def test_point_overrides_scale_the_lr_and_let_the_batch_restate_it(compose_cfg, factor, batch):
    base = compose_cfg(config=SMALL)
    lr0 = base.OPTIMIZER.param_schedulers.lr
    point = {"lr_factor": factor, "epsilon": 0.05, "batch": batch, "name": "p"}
    c = compose_cfg(*point_overrides(base, point), config=SMALL)
    lr = c.OPTIMIZER.param_schedulers.lr
    scale = factor * batch / 64  # the recipe's LR is stated at its batch of 64, per 256 images linear
    assert lr.base_lr == pytest.approx(lr0.base_lr * scale, rel=1e-9)
    assert lr.final_lr == pytest.approx(lr0.final_lr * scale, rel=1e-9)
    assert lr.start_warmup == pytest.approx(lr0.start_warmup * factor, rel=1e-9)  # not batch-scaled
    assert c.LOSS.swav_plugin_loss.epsilon == 0.05
    assert c.DATA.TRAIN.BATCHSIZE_PER_REPLICA == batch
    # one epoch of 4,000 images at 64 = 62 iterations, restated for the batch (rounded up)
    assert c.LOSS.swav_plugin_loss.freeze_prototypes_niters == -(-62 * 64 // batch)


def test_collapse_warnings_are_read_back_from_the_log(tmp_path):
    causes = likely_collapse_causes({"global_batch": 64, "freeze_prototypes_niters": 0, "num_prototypes": 100})
    msg = collapse_message(100, 412, 6, ["loss 4.6050 sits at ln K = 4.6052"], causes)
    (tmp_path / "log.txt").write_text(
        "INFO 2026-12-07 12:00:00,000 log_hooks.py: 277: Rank: 0; iter: 410\n"
        f"WARNING 2026-12-07 12:00:01,000 monitoring.py: 480: {msg}\n"
        "INFO 2026-12-07 12:00:02,000 log_hooks.py: 277: Rank: 0; iter: 415\n"
        "  - an indented line of another message\n"
    )
    (found,) = collapse_warnings(tmp_path)
    assert found["iteration"] == 412
    assert found["signals"] == "loss 4.6050 sits at ln K = 4.6052"
    assert found["marked_causes"] == [c for c in causes if "[this run:" in c]
    assert any("prototypes never frozen" in c for c in found["marked_causes"])
    assert collapse_warnings(tmp_path / "missing") == []


def test_markdown_table_names_the_collapse_and_its_cause():
    row = {"lr_factor": 4.0, "epsilon": 0.05, "batch": 256, "knn_top1": 11.3, "linear_top1": 40.2,
           "prototypes_used": 2, "num_prototypes": 100, "final_loss": 4.605, "ln_k": 4.60517,
           "collapse_warning": True, "collapse_iteration": 131,
           "collapse_causes": ["learning rate too high (OPTIMIZER...) [this run: peak LR 77 is 4.0x ...]"]}
    ok = dict(row, lr_factor=1.0, knn_top1=95.0, collapse_warning=False, collapse_causes=[])
    table = markdown_table([row, ok])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| x4 | 0.05 | 256 | 11.3 % | 40.2 % | 2/100 | 4.605 (4.605) | yes, iteration 131 (learning rate too high) |" == lines[2]
    assert lines[3].endswith("| no |")


def test_tiny_sweep_trains_evaluates_and_writes_its_outputs(mnist_folder, tmp_path):
    over = ["config.OPTIMIZER.num_epochs=2", "config.DATA.TRAIN.DATA_LIMIT=64",
            "config.SWAV_PLUGIN.MONITOR.KNN.TRAIN_LIMIT=200", "config.SWAV_PLUGIN.MONITOR.KNN.VAL_LIMIT=100"]
    rows = sweep(tmp_path / "sweep", mnist_folder, overrides=over, lr_factors=[1.0], epsilons=[0.05], batches=[16])
    (row,) = rows
    assert (row["lr_factor"], row["epsilon"], row["batch"]) == (1.0, 0.05, 16)
    assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
    assert 1 <= row["prototypes_used"] <= row["num_prototypes"] == 100
    assert row["knn_curve"] and row["final_loss"] > 0
    out = tmp_path / "sweep"
    assert json.loads((out / "sweep.json").read_text()) == rows
    md = (out / "sweep.md").read_text()
    # caption (config, overrides, epochs), blank line, header, rule, one row
    assert md.startswith("Recipe sweep of `swav_plugin/pretrain/swav_small_images`, `config.OPTIMIZER.num_epochs=2`")
    assert "(2 epochs)" in md.splitlines()[0] and md.count("\n") == 5
    assert (out / "knn_curves.png").stat().st_size > 0
    # a finished point is read back, not retrained
    assert sweep(out, mnist_folder, overrides=over, lr_factors=[1.0], epsilons=[0.05], batches=[16]) == rows
