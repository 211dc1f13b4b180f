"""End to end through VISSL's real trainer: 2 gloo ranks on CPU.

The run uses the quickstart config on a 384-image slice of its real image
folder: 2 ranks x 16 images, 2x28 + 4x14 crops, 2 epochs of 12 iterations,
prototypes frozen for 4 iterations, and a queue of 64 embeddings (2 global
batches) that starts at epoch 1.
"""

import json
from pathlib import Path

import pytest
import torch

from tolerances import unit_norm_tol

FREEZE = 4


def _records(folder: Path, rank: int):
    lines = (folder / f"probe_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_folder):
    from vissl.utils.distributed_launcher import launch_distributed

    import e2e_probe
    from swav_vissl_plugin.config import compose

    ckpt = tmp_path_factory.mktemp("e2e") / "checkpoints"
    _, config = compose(
        [
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.DATA.TRAIN.DATA_PATHS=[{mnist_folder['train']}]",
            "config.DATA.TRAIN.DATA_LIMIT=384",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
            "config.DATA.NUM_DATALOADER_WORKERS=0",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            "config.OPTIMIZER.num_epochs=2",
            "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
            "config.OPTIMIZER.param_schedulers.lr.base_lr=4.8",
            f"config.LOSS.swav_plugin_loss.freeze_prototypes_niters={FREEZE}",
            "config.LOSS.swav_plugin_loss.queue_length=64",
            "config.LOSS.swav_plugin_loss.epoch_queue_starts=1",
            f"config.CHECKPOINT.DIR={ckpt}",
            "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
            "config.LOG_FREQUENCY=1",
        ]
    )
    launch_distributed(config, node_id=0, engine_name="train", hook_generator=e2e_probe.probe_hook_generator)
    return config, ckpt


def test_loss_finite_and_falling(trained):
    _, ckpt = trained
    recs = _records(ckpt, 0)
    assert len(recs) == 2 * 384 // 32  # 12 iterations per epoch, 2 epochs
    losses = [r["loss"] for r in recs]
    assert all(r["local_loss_finite"] for r in recs)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, losses


def test_ranks_agree_on_the_reduced_loss(trained):
    _, ckpt = trained
    r0, r1 = _records(ckpt, 0), _records(ckpt, 1)
    # exact: an all-reduced value is bitwise identical on every rank
    assert [r["loss"] for r in r0] == [r["loss"] for r in r1]


def test_prototypes_unit_norm_after_every_step(trained):
    _, ckpt = trained
    for r in _records(ckpt, 0):
        assert r["max_norm_error"] <= unit_norm_tol(64), r  # the quickstart's feat_dim


def test_prototypes_frozen_then_trained(trained):
    _, ckpt = trained
    recs = _records(ckpt, 0)
    # records[i].moved compares the prototypes after step i with those after step i-1
    frozen = [r["moved"] for r in recs[1:FREEZE]]
    trained_moves = [r["moved"] for r in recs[FREEZE:]]
    assert frozen and max(frozen) == 0.0, frozen
    assert min(trained_moves) > 0.0, trained_moves


def test_checkpoint_loads_back(trained):
    from vissl.models import build_model

    config, ckpt = trained
    finals = sorted(ckpt.glob("model_final_checkpoint_phase*.torch"))
    assert finals, list(ckpt.iterdir())
    state = torch.load(finals[-1], map_location="cpu", weights_only=True)
    assert state["iteration"] == 24 and state["phase_idx"] == 1
    model = build_model(config.MODEL, config.OPTIMIZER)
    model.set_classy_state(state["classy_state_dict"]["base_model"])
    protos = model.heads[0].prototype_parameters()[0]
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(protos.shape[0]), rtol=0, atol=unit_norm_tol(protos.shape[1]))
    # the loss state (queue) travels with the checkpoint
    assert "loss" in state


def test_queue_starts_fills_and_is_checkpointed(trained):
    _, ckpt = trained
    for rank in (0, 1):
        used = [r["queue_in_use"] for r in _records(ckpt, rank)]
        # epoch 0: no queue; epoch 1: created, filled by 2 iterations of 16, then used
        assert used == [False] * 12 + [False, False] + [True] * 10, used
    state = torch.load(sorted(ckpt.glob("model_final_checkpoint_phase*.torch"))[-1], weights_only=True)
    queue = state["loss"]["queue"]
    assert tuple(queue.shape) == (2, 2, 32, 64)  # ranks, assign crops, 64 / 2 ranks, feat_dim
    assert state["loss"]["queue_filled"] == 32
    # L2-normalised embeddings
    torch.testing.assert_close(queue.norm(dim=-1), torch.ones(2, 2, 32), rtol=0, atol=unit_norm_tol(queue.shape[-1]))
