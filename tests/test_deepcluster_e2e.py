"""DeepCluster-v2 end to end through VISSL's real trainer: 2 gloo ranks on
CPU, the deepclusterv2_quickstart config (with a narrower trunk) on a
64-image slice of the quickstart's image folder: 2 ranks x 16 images, 2x28 +
4x14 crops, 3 heads of 20 prototypes, 2 epochs of 2 iterations; then a
resumed run of one more epoch from the checkpoint. ``dc_probe.py`` records
what the trainer did."""

import json
import shutil

import pytest
import torch

from tolerances import unit_norm_tol

IMAGES, WORLD, BATCH, KS = 64, 2, 16, [20, 20, 20]
ITERS_PER_EPOCH = IMAGES // (WORLD * BATCH)


def _overrides(folder, ckpt, epochs):
    return [
        "config=swav_plugin/pretrain/deepclusterv2_quickstart",
        f"config.DATA.TRAIN.DATA_PATHS=[{folder}]",
        f"config.DATA.TRAIN.DATA_LIMIT={IMAGES}",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={BATCH}",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={WORLD}",
        f"config.OPTIMIZER.num_epochs={epochs}",
        "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
        "config.MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.WIDTHS=[8,16,32]",
        f"config.MODEL.HEAD.PARAMS=[[swav_plugin_head,{{in_dim:32,hidden_mlp:64,feat_dim:16,nmb_prototypes:{KS}}}]]",
        f"config.CHECKPOINT.DIR={ckpt}",
        "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
        "config.LOG_FREQUENCY=1",
    ]


def _launch(overrides):
    from vissl.utils.distributed_launcher import launch_distributed

    import dc_probe
    from swav_vissl_plugin.config import compose

    _, config = compose(overrides)
    launch_distributed(config, node_id=0, engine_name="train", hook_generator=dc_probe.probe_hook_generator)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_folder):
    root = tmp_path_factory.mktemp("dc_e2e")
    ckpt, resumed = root / "checkpoints", root / "resumed"
    config = _launch(_overrides(mnist_folder["train"], ckpt, epochs=2))
    first = sorted(ckpt.glob("model_final_checkpoint_phase*.torch"))
    assert first, list(ckpt.iterdir())
    saved = torch.load(first[-1], map_location="cpu", weights_only=True)
    # resume: VISSL does not resume from a *final* checkpoint, so the phase-1
    # checkpoint goes to a new folder as an ordinary one; AUTO_RESUME picks
    # it up and trains epoch 2
    resumed.mkdir()
    shutil.copy(first[-1], resumed / "model_phase1.torch")
    (resumed / "checkpoint.torch").symlink_to(resumed / "model_phase1.torch")
    _launch(_overrides(mnist_folder["train"], resumed, epochs=3))
    return config, ckpt, saved, resumed


def _load(ckpt, name):
    return torch.load(ckpt / "dc_probe" / name, map_location="cpu", weights_only=True)


def _steps(ckpt, rank):
    return [json.loads(l) for l in (ckpt / "dc_probe" / f"steps_rank{rank}.jsonl").read_text().splitlines()]


def test_fill_pass_fills_the_bank_with_every_image_before_epoch_0(runs):
    _, ckpt, _, resumed = runs
    seen = []
    for rank in range(WORLD):
        start = _load(ckpt, f"start_rank{rank}_run0.pt")
        assert start["filled_rows"] == IMAGES // WORLD and start["iteration"] == 0
        assert start["bank"].shape == (2, IMAGES // WORLD, 16)
        norm_tol = unit_norm_tol(start["bank"].shape[-1])  # the head's L2-normalised embeddings
        torch.testing.assert_close(start["bank"].norm(dim=-1), torch.ones(2, IMAGES // WORLD), atol=norm_tol, rtol=0)
        seen += start["index"].tolist()
    assert sorted(seen) == list(range(IMAGES))  # dataset indices, each once


def test_labels_for_every_index_and_prototypes_are_the_centroids(runs):
    _, ckpt, _, resumed = runs
    for folder, epoch in ((ckpt, 0), (ckpt, 1), (resumed, 2)):
        recs = [_load(folder, f"epoch{epoch}_rank{r}.pt") for r in range(WORLD)]
        table = recs[0]["labels"]
        assert table.shape == (3, IMAGES)
        assert (table >= 0).all() and (table < KS[0]).all()  # every index labelled
        assert torch.equal(table, recs[1]["labels"])
        for h in range(3):
            w = recs[0]["prototypes"][h]
            assert torch.equal(w, recs[1]["prototypes"][h])
            # k-means centroids: normalised twice (the mean, then every centroid)
            torch.testing.assert_close(w.norm(dim=1), torch.ones(KS[h]), atol=unit_norm_tol(w.shape[1], 2), rtol=0)
            # the labels are the nearest prototype of each image's bank row
            # (head h: bank of crop h mod 2): prototypes = k-means centroids
            for r in recs:
                rows = r["bank"][h % 2]
                assert torch.equal(table[h][r["index"]], (rows @ w.t()).argmax(1))
    # new centroids every epoch, computed from the bank refreshed by training
    e0, e1 = _load(ckpt, "epoch0_rank0.pt"), _load(ckpt, "epoch1_rank0.pt")
    assert not torch.equal(e0["prototypes"][0], e1["prototypes"][0])
    assert not torch.equal(e0["bank"], e1["bank"])


def test_loss_finite_and_prototypes_frozen_between_clusterings(runs):
    _, ckpt, _, resumed = runs
    for rank in range(WORLD):
        steps = _steps(ckpt, rank) + _steps(resumed, rank)
        assert [s["iteration"] for s in steps] == list(range(3 * ITERS_PER_EPOCH))
        assert all(s["local_loss_finite"] for s in steps)
        assert all(s["moved"] == 0.0 for s in steps), steps  # never trained
    r0, r1 = _steps(ckpt, 0) + _steps(resumed, 0), _steps(ckpt, 1) + _steps(resumed, 1)
    # exact: an all-reduced value is bitwise identical on every rank
    assert [s["loss"] for s in r0] == [s["loss"] for s in r1]


def test_memory_bank_saved_with_the_checkpoint_and_restored(runs):
    _, ckpt, saved, resumed = runs
    state = saved["loss"]
    assert saved["train_phase_idx"] == 1
    assert state["memory_embeddings"].shape == (WORLD, 2, IMAGES // WORLD, 16)
    assert state["memory_ranks"].tolist() == [0, 1] and state["world_size"] == WORLD
    assert state["labels"].shape == (3, IMAGES)
    for rank in range(WORLD):
        end = _load(ckpt, f"end_rank{rank}_run0.pt")  # the bank after epoch 1
        assert torch.equal(state["memory_embeddings"][rank], end["bank"])
        assert torch.equal(state["memory_index"][rank], end["index"])
        # the resumed run restored it instead of running the fill pass
        start = _load(resumed, f"start_rank{rank}_run0.pt")
        assert start["filled_rows"] is None
        assert start["iteration"] == 2 * ITERS_PER_EPOCH
        assert torch.equal(start["bank"], end["bank"])
        assert torch.equal(start["index"], end["index"])
        # and epoch 2 clustered that restored bank
        assert torch.equal(_load(resumed, f"epoch2_rank{rank}.pt")["bank"], end["bank"])
