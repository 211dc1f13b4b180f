"""The quickstart's pieces, and a shortened run of the whole job."""

import json

import numpy as np
import pytest


def test_image_folder_split(mnist_folder):
    counts = {}
    for split, folder in mnist_folder.items():
        labels = {d.name: len(list(d.iterdir())) for d in folder.iterdir()}
        assert sorted(labels) == [str(i) for i in range(10)]
        counts[split] = sum(labels.values())
    assert counts == {"train": 4000, "val": 1000}
    train = {p.name for p in mnist_folder["train"].rglob("*.png")}
    val = {p.name for p in mnist_folder["val"].rglob("*.png")}
    assert not train & val  # held-out images are never trained on


def test_linear_probe_separates_and_does_not_overfit():
    from swav_vissl_plugin.quickstart import linear_probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 800)
    centers = rng.normal(size=(4, 16)) * 5
    x = centers[y] + rng.normal(size=(800, 16))
    assert linear_probe((x[:600], y[:600]), (x[600:], y[600:])) > 98
    noise = rng.normal(size=(800, 16))
    assert linear_probe((noise[:600], y[:600]), (noise[600:], y[600:])) < 40


def test_short_quickstart_run_writes_its_outputs(tmp_path):
    from PIL import Image

    from swav_vissl_plugin.quickstart import run

    out = tmp_path / "qs"
    metrics = run(
        out,
        [
            "config.OPTIMIZER.num_epochs=2",
            "config.DATA.TRAIN.DATA_LIMIT=512",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64",
            "config.LOG_FREQUENCY=1",
        ],
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["linear_probe_top1"] == metrics["linear_probe_top1"]
    assert set(saved["linear_probe_top1"]) == {"pretrained", "random_init"}
    assert all(0 <= v <= 100 for v in saved["linear_probe_top1"].values())
    log = saved["training_log"]
    assert [r["iter"] for r in log] == list(range(16))  # 2 epochs x 8 iterations
    assert all(np.isfinite(r["loss"]) for r in log)
    assert Image.open(out / "curves.png").size == (1000, 360)
    assert (out / "checkpoints" / "model_final_checkpoint_phase1.torch").exists()
