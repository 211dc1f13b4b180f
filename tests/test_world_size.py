"""Resuming on another world size (docs/world_size.md).

* The SwAV queue and the DeepCluster-v2 / SeLa-v2 memory bank restated for
  another number of ranks, against references written from the rule (rows
  listed by (age, sample, rank) and dealt out in turn; bank rows by dataset
  index), on states written by real 2-gloo-rank runs of the losses and
  loaded on 1 rank, and on a 1-rank state loaded on 2 ranks: the next
  iteration's loss / the next clustering equal those of the run that was not
  resharded.
* States that cannot be used: ConfigError naming the config key.
* ``adapt_checkpoint`` on checkpoint dicts, counters computed by hand from
  the rule in swav_vissl_plugin/world_size.py.
* End to end through VISSL's trainer (world_size_probe.py): SwAV with its
  queue and DeepCluster-v2 with its bank, 2 ranks -> resumed on 1 rank from
  an epoch's end and from inside an epoch (the rest of the epoch is then
  exactly the images not trained on yet).
"""

import copy
import datetime
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gloo_ranks
from swav_vissl_plugin.config import ConfigError
from tolerances import loss_rtol, rtol, terms

TESTS = Path(__file__).resolve().parent
WORLD = 2

# ------------------------------------------------------------------ queue
NUM_CROPS, CFA, KS, DIM = 3, [0, 2], [7], 6
HALF = 3  # per-rank batch on 2 ranks; one rank takes the global batch of 6
QUEUE = 12  # global: 6 rows per rank on 2 ranks, 12 on 1
PUSHES = 4  # iterations before the checkpoint: the queue is full and has evicted rows


def queue_config():
    return {
        "name": "swav_plugin_loss",
        "num_crops": NUM_CROPS,
        "crops_for_assign": CFA,
        "nmb_prototypes": KS,
        "queue_length": QUEUE,
        "global_batch_size": WORLD * HALF,
        "epoch_queue_starts": 0,
        "feat_dim": DIM,
    }


def local_rows(x, rank):
    """This rank's rows of a crop-major global batch [crop 0 (6 rows), crop 1, ...]."""
    batch = WORLD * HALF
    return torch.cat([x[c * batch + rank * HALF: c * batch + (rank + 1) * HALF] for c in range(NUM_CROPS)])


def queue_data():
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(PUSHES + 1):  # the last one runs after the checkpoint
        emb = F.normalize(torch.randn(NUM_CROPS * WORLD * HALF, DIM, generator=g), dim=1)
        weights = [F.normalize(torch.randn(k, DIM, generator=g), dim=1) for k in KS]
        steps.append((emb, [emb @ w.t() for w in weights], weights))
    return steps


def queue_loss_tol(loss):
    """Absolute tolerance between the next iteration's loss on 1 and on 2
    ranks: float32 rounding of either (cosine scores, |s| <= 1), the queue's
    rows scored inside the loss with DIM-term products (DIM / epsilon in the
    exponents), the mean over 2 ranks; scale max(1, |loss|)."""
    one = loss_rtol(WORLD * HALF, KS[0], NUM_CROPS, len(CFA), 3, queue=QUEUE) + rtol(terms(DIM) / 0.05, WORLD)
    return 2 * one * max(1.0, abs(loss))


def queue_step(loss_fn, step, rank=None):
    emb, heads, weights = step
    if rank is not None:
        emb, heads = local_rows(emb, rank), [local_rows(h, rank) for h in heads]
    loss_fn.set_prototypes(weights)
    return loss_fn([emb] + heads, None).item()


def queue_rows(steps, world, rows_per_rank):
    """Reference content of every rank's queue after ``steps`` on ``world``
    ranks of ``HALF * 2 / world`` samples each: ``rows[r]`` is the list of
    (age, sample, rank, tensor (n_assign, D)) of rank r, newest first."""
    batch = WORLD * HALF // world
    out = []
    for r in range(world):
        rows = []
        for age, (emb, _, _) in enumerate(reversed(steps)):
            for i in range(batch):
                sample = r * batch + i
                rows.append((age, i, r, torch.stack([emb[c * WORLD * HALF + sample] for c in CFA])))
        out.append(rows[:rows_per_rank])
    return out


def reference_reshard(rows_by_rank, world, length):
    """The rule of docs/world_size.md: all filled rows ordered by (age,
    position in its batch, rank), the newest first, dealt out to the new
    ranks in turn; what does not fit (the oldest) is dropped."""
    ordered = sorted((row for rows in rows_by_rank for row in rows), key=lambda x: x[:3])
    new = [[] for _ in range(world)]
    for g, row in enumerate(ordered[: world * length]):
        new[g % world].append(row)
    return new, len(ordered) - min(len(ordered), world * length)


def assert_queue(queue, rows, filled):
    """``queue`` (n_assign, L, D) holds ``rows`` in front, zeros after them
    (exactly: resharding copies rows)."""
    assert queue.shape[1] >= len(rows) >= filled
    for j, (*_, value) in enumerate(rows):
        torch.testing.assert_close(queue[:, j], value, rtol=0, atol=0)
    assert torch.count_nonzero(queue[:, len(rows):]) == 0


# ------------------------------------------------------------------- bank
BANK_CROPS, BANK_CFA, BANK_KS, BANK_DIM = 2, [0, 1], [5, 4], 8
IMAGES, BANK_B = 24, 3  # 12 images per rank on 2 ranks: 4 batches of 3


def bank_loss(name="selav2_plugin_loss"):
    from classy_vision.losses import build_loss

    return build_loss(
        {
            "name": name,
            "num_crops": BANK_CROPS,
            "crops_for_assign": BANK_CFA,
            "nmb_prototypes": BANK_KS,
            "feat_dim": BANK_DIM,
            "num_train_samples": IMAGES,
            "sinkhorn_iterations": 10,
        }
    )


def bank_data():
    g = torch.Generator().manual_seed(11)
    order = torch.randperm(IMAGES, generator=g)  # the epoch's global order (DistributedSampler)
    emb = F.normalize(torch.randn(2, IMAGES, len(BANK_CFA), BANK_DIM, generator=g), dim=-1)  # 2 epochs
    protos = [F.normalize(torch.randn(k, BANK_DIM, generator=g), dim=1) for k in BANK_KS]
    return {"order": order, "emb": emb, "protos": protos}


def bank_epoch(loss, data, epoch, rank, world, batches):
    """Write ``batches`` batches of this rank's share of the epoch (image ids
    ``order[rank::world]``), embeddings of that epoch."""
    ids = data["order"][rank::world]
    b = IMAGES // world // 4
    for s in range(0, batches * b, b):
        idx = ids[s:s + b]
        loss.update_memory(data["emb"][epoch][idx].permute(1, 0, 2), idx)


def bank_rows(state):
    """{dataset index: (n_assign, D) embedding} of a saved bank (all ranks)."""
    out = {}
    emb, idx, filled = state["memory_embeddings"], state["memory_index"], state["memory_filled"]
    for r in range(emb.shape[0]):
        for j in range(int(filled[r])):
            out[int(idx[r, j])] = emb[r, :, j]
    return out


# ------------------------------------------------------- 2 gloo ranks
def worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        from swav_vissl_plugin.losses.swav import SwAVPluginLoss

        out = {}
        steps = torch.load(f"{tmp}/queue_data.pt", weights_only=True)
        # the queue: PUSHES iterations, rank 0's checkpoint state, the next iteration
        loss = SwAVPluginLoss.from_config(queue_config())
        loss.on_epoch_start(0)
        for step in steps[:PUSHES]:
            queue_step(loss, step, rank)
        if rank == 0:
            torch.save(loss.state_dict(), f"{tmp}/queue_state_2ranks.pt")
        out["queue_next_loss"] = queue_step(loss, steps[PUSHES], rank)
        # the 1-rank state on 2 ranks, then the next iteration
        resharded = SwAVPluginLoss.from_config(queue_config())
        resharded.load_state_dict(torch.load(f"{tmp}/queue_state_1rank.pt", weights_only=True))
        out["queue_from_1rank"] = resharded._queue_all.clone()
        out["queue_from_1rank_filled"] = resharded.queue_filled
        out["queue_from_1rank_next_loss"] = queue_step(resharded, steps[PUSHES], rank)
        out["queue_from_1rank_after_push"] = resharded.queue.clone()

        # the bank: one epoch of rank 0's checkpoint (end of epoch), then
        # clustering and half an epoch (inside the epoch)
        data = torch.load(f"{tmp}/bank_data.pt", weights_only=True)
        loss = bank_loss()
        loss.allocate_memory(IMAGES // WORLD, BANK_DIM)
        bank_epoch(loss, data, 0, rank, WORLD, 4)
        if rank == 0:
            torch.save(loss.state_dict(), f"{tmp}/bank_end_2ranks.pt")
        loss.cluster([p.clone() for p in data["protos"]])
        out["bank_labels"] = loss.labels.clone()
        bank_epoch(loss, data, 1, rank, WORLD, 2)
        if rank == 0:
            torch.save(loss.state_dict(), f"{tmp}/bank_mid_2ranks.pt")
        # the 1-rank end-of-epoch state on 2 ranks, then clustering
        resharded = bank_loss()
        resharded.load_state_dict(torch.load(f"{tmp}/bank_end_1rank.pt", weights_only=True))
        out["bank_from_1rank"] = (
            resharded.memory_embeddings[:, : resharded.memory_filled].clone(),
            resharded.memory_index[: resharded.memory_filled].clone(),
            resharded.memory_position,
        )
        out["bank_from_1rank_state"] = resharded.state_dict() if rank == 0 else None
        resharded.cluster([p.clone() for p in data["protos"]])
        out["bank_from_1rank_labels"] = resharded.labels.clone()

        # the training sampler VISSL builds (plugin's patches applied) against
        # the loader length the counters are computed with
        from vissl.config import AttrDict
        from vissl.data import get_sampler

        from swav_vissl_plugin.world_size import iterations_per_phase

        lengths = []
        for stateful in (False, True):
            for drop_last in (False, True):
                for n in (37, 40):
                    cfg = AttrDict({"DATA": {"TRAIN": {
                        "USE_DEBUGGING_SAMPLER": False, "USE_STATEFUL_DISTRIBUTED_SAMPLER": stateful,
                        "BATCHSIZE_PER_REPLICA": 4, "DROP_LAST": drop_last}}})
                    sampler = get_sampler(list(range(n)), cfg.DATA.TRAIN, 0)
                    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=4, sampler=sampler, drop_last=drop_last)
                    lengths.append((len(loader), iterations_per_phase(cfg, WORLD, n)))
        out["loader_lengths"] = lengths
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """States of real 2-rank runs and what 2 ranks made of 1-rank states."""
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    tmp = tmp_path_factory.mktemp("world_size")
    steps = queue_data()
    torch.save(steps, tmp / "queue_data.pt")
    single = SwAVPluginLoss.from_config(queue_config())  # 1 rank, the global batch
    single.on_epoch_start(0)
    for step in steps[:PUSHES]:
        queue_step(single, step)
    torch.save(single.state_dict(), tmp / "queue_state_1rank.pt")
    single_next = queue_step(copy.deepcopy(single), steps[PUSHES])

    data = bank_data()
    torch.save(data, tmp / "bank_data.pt")
    bank = bank_loss()
    bank.allocate_memory(IMAGES, BANK_DIM)
    bank_epoch(bank, data, 0, 0, 1, 4)
    torch.save(bank.state_dict(), tmp / "bank_end_1rank.pt")
    bank.cluster([p.clone() for p in data["protos"]])

    gloo_ranks.spawn(worker, tmp)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731
    return {
        "steps": steps, "ranks": ranks, "single_next": single_next, "single_bank_labels": bank.labels,
        "queue_2": load("queue_state_2ranks.pt"), "queue_1": load("queue_state_1rank.pt"),
        "bank_end_2": load("bank_end_2ranks.pt"), "bank_mid_2": load("bank_mid_2ranks.pt"),
        "bank_end_1": load("bank_end_1rank.pt"), "bank_data": data,
    }


# ----------------------------------------------------------- queue tests
def test_queue_of_2_ranks_resharded_on_1_rank(dist_results, caplog):
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    state, steps = dist_results["queue_2"], dist_results["steps"]
    assert tuple(state["queue"].shape) == (2, len(CFA), QUEUE // 2, DIM) and state["queue_filled"] == QUEUE // 2
    saved = queue_rows(steps[:PUSHES], 2, QUEUE // 2)
    for r in range(2):  # the 2-rank run's queues are what the reference says
        assert_queue(state["queue"][r], saved[r], QUEUE // 2)
    loss = SwAVPluginLoss.from_config(queue_config())
    with caplog.at_level(logging.INFO):
        loss.load_state_dict(state)
    assert "queue resharded from 2 to 1 ranks" in caplog.text
    expected, dropped = reference_reshard(saved, 1, QUEUE)
    assert dropped == 0 and loss.queue_filled == QUEUE and loss.queue_full
    assert_queue(loss.queue, expected[0], QUEUE)
    # every row of the 2-rank queues is there once, the newest first
    ages = [row[0] for row in expected[0]]
    assert ages == sorted(ages) and len(expected[0]) == 2 * (QUEUE // 2)
    # the next iteration on 1 rank equals the 2-rank run's next iteration
    # (Sinkhorn over the same queue rows and the same global batch)
    resumed = queue_step(loss, steps[PUSHES])
    mean_2 = sum(r["queue_next_loss"] for r in dist_results["ranks"]) / WORLD
    assert abs(resumed - mean_2) <= queue_loss_tol(mean_2)


def test_queue_of_1_rank_resharded_on_2_ranks(dist_results):
    steps, ranks = dist_results["steps"], dist_results["ranks"]
    saved = queue_rows(steps[:PUSHES], 1, QUEUE)
    expected, dropped = reference_reshard(saved, 2, QUEUE // 2)
    assert dropped == 0
    for rank in range(WORLD):
        out = ranks[rank]
        assert out["queue_from_1rank"].shape == (2, len(CFA), QUEUE // 2, DIM)
        assert out["queue_from_1rank_filled"] == QUEUE // 2
        for r in range(2):  # every rank holds every rank's queue (rank 0 saves them all)
            assert_queue(out["queue_from_1rank"][r], expected[r], QUEUE // 2)
        # after one more push: the newest batch in front, the oldest evicted
        pushed = queue_rows(steps[PUSHES:PUSHES + 1], 2, HALF)[rank]
        assert_queue(out["queue_from_1rank_after_push"], pushed + expected[rank][: QUEUE // 2 - HALF], QUEUE // 2)
    mean_2 = sum(r["queue_from_1rank_next_loss"] for r in ranks) / WORLD
    assert abs(mean_2 - dist_results["single_next"]) <= queue_loss_tol(mean_2)


@pytest.mark.parametrize("world,length", [(3, 3), (1, 5), (4, 6), (2, 6)])
def test_queue_reshard_keeps_age_order_and_drops_the_oldest(world, length):
    from swav_vissl_plugin.losses.swav import reshard_queue

    # 2 ranks x 6 rows, 4 filled: rows tagged (age, position in batch, rank)
    old_world, old_len, filled, batch = 2, 6, 4, 2
    queue = torch.zeros(old_world, 1, old_len, 3)
    rows = [[] for _ in range(old_world)]
    for r in range(old_world):
        for j in range(filled):
            tag = torch.tensor([j // batch, j % batch, r], dtype=torch.float32)
            queue[r, 0, j] = tag
            rows[r].append((j // batch, j % batch, r, tag.view(1, 3)))
    new, new_filled, dropped = reshard_queue(queue, filled, world, length)
    expected, expected_dropped = reference_reshard(rows, world, length)
    assert dropped == expected_dropped == max(old_world * filled - world * length, 0)
    assert new.shape == (world, 1, length, 3) and new_filled == min(old_world * filled, world * length) // world
    for r in range(world):
        assert_queue(new[r], expected[r], new_filled)
    # across ranks, a row further back is never newer than one in front
    kept = [(j, float(new[r, 0, j, 0])) for r in range(world) for j in range(len(expected[r]))]
    assert all(a1 <= a2 for j1, a1 in kept for j2, a2 in kept if j1 < j2)


# ------------------------------------------------------------ bank tests
def _rows_of(emb, idx):
    return {int(i): emb[:, j] for j, i in enumerate(idx.tolist())}


def test_bank_of_2_ranks_resharded_on_1_rank(dist_results, caplog):
    state = dist_results["bank_end_2"]
    assert state["world_size"] == 2 and state["memory_ranks"].tolist() == [0, 1]
    loss = bank_loss()
    with caplog.at_level(logging.INFO):
        loss.load_state_dict(state)
    assert "memory bank resharded from 2 to 1 ranks" in caplog.text
    n = loss.memory_filled
    assert n == IMAGES and loss.memory_position == IMAGES  # end of epoch: all rows of this epoch
    got = _rows_of(loss.memory_embeddings[:, :n], loss.memory_index[:n])
    saved = bank_rows(state)
    assert sorted(got) == sorted(saved) == list(range(IMAGES))
    for i, value in saved.items():  # each row still with its dataset index
        torch.testing.assert_close(got[i], value, rtol=0, atol=0)
        torch.testing.assert_close(value, dist_results["bank_data"]["emb"][0][i], rtol=0, atol=0)
    # the next clustering (SeLa-v2: Sinkhorn over every rank's rows) gives the
    # label table the 2-rank run computed from its own banks
    loss.cluster([p.clone() for p in dist_results["bank_data"]["protos"]])
    assert torch.equal(loss.labels, dist_results["ranks"][0]["bank_labels"])


def test_bank_of_1_rank_resharded_on_2_ranks(dist_results):
    saved = bank_rows(dist_results["bank_end_1"])
    held = {}
    for rank in range(WORLD):
        emb, idx, position = dist_results["ranks"][rank]["bank_from_1rank"]
        assert idx.numel() == IMAGES // WORLD and position == IMAGES // WORLD
        rows = _rows_of(emb, idx)
        assert not set(rows) & set(held)
        held.update(rows)
    assert sorted(held) == list(range(IMAGES))
    for i, value in saved.items():
        torch.testing.assert_close(held[i], value, rtol=0, atol=0)
    # rank 0 keeps all ranks' banks for its checkpoint
    again = dist_results["ranks"][0]["bank_from_1rank_state"]
    assert again["world_size"] == 2 and again["memory_ranks"].tolist() == [0, 1]
    assert sorted(bank_rows(again)) == list(range(IMAGES))
    for rank in range(WORLD):
        assert torch.equal(dist_results["ranks"][rank]["bank_from_1rank_labels"], dist_results["single_bank_labels"])


def test_bank_saved_inside_an_epoch_resharded_on_1_rank(dist_results):
    state, data = dist_results["bank_mid_2"], dist_results["bank_data"]
    assert state["memory_position"] == 6 and state["memory_filled"].tolist() == [12, 12]
    loss = bank_loss()
    loss.load_state_dict(state)
    # 2 ranks x 6 rows of this epoch go first; the rest of the epoch overwrites after them
    assert loss.memory_position == 12 and loss.memory_filled == IMAGES
    idx = loss.memory_index[: loss.memory_filled].tolist()
    seen = {int(i) for r in range(WORLD) for i in data["order"][r::WORLD][:6]}
    assert set(idx[:12]) == seen and sorted(idx) == list(range(IMAGES))
    for j, i in enumerate(idx):  # this epoch's embeddings for seen images, the previous epoch's for the rest
        epoch = 1 if i in seen else 0
        torch.testing.assert_close(loss.memory_embeddings[:, j], data["emb"][epoch][i], rtol=0, atol=0)
    assert torch.equal(loss.labels, dist_results["ranks"][0]["bank_labels"])  # the epoch's labels kept


def test_bank_reshard_duplicates_capacity_and_uneven_split():
    from swav_vissl_plugin.losses.deepcluster_v2 import reshard_bank

    # 2 ranks x 3 rows at the end of an epoch of 5 images padded to 6 (image 0 twice)
    idx = torch.tensor([[3, 0, 2], [4, 1, 0]])
    emb = torch.arange(12, dtype=torch.float32).view(2, 1, 3, 2)
    layout = reshard_bank(emb, idx, torch.tensor([3, 3]), 3, 3)
    assert layout.duplicates == 1 and int(layout.filled.sum()) == 5
    held = {}
    for r in range(3):
        n = int(layout.filled[r])
        assert int(layout.position[r]) == n
        held.update(_rows_of(layout.embeddings[r, :, :n], layout.indices[r, :n]))
    assert sorted(held) == [0, 1, 2, 3, 4]
    assert torch.equal(held[0], emb[1, :, 2])  # the later row of image 0 (rows are copied)
    assert torch.equal(held[4], emb[1, :, 0])
    # at most the rows a rank writes per epoch
    capped = reshard_bank(emb, idx, torch.tensor([3, 3]), 3, 1, rows_per_rank=4)
    assert capped.filled.tolist() == [4] and capped.over_capacity == 1 and capped.embeddings.shape[2] >= 6
    # inside an epoch, this epoch's rows must split evenly over the new ranks
    with pytest.raises(ConfigError, match="do not split evenly over 3 ranks"):
        reshard_bank(emb, idx, torch.tensor([3, 3]), 2, 3)


def test_iterations_per_phase_is_the_length_of_vissls_train_loader(dist_results):
    # the sampler VISSL builds on 2 ranks (plain DistributedSampler, or the
    # plugin's resumable one for USE_STATEFUL_DISTRIBUTED_SAMPLER), 37 and 40
    # images, batch 4, with and without DROP_LAST
    for rank in range(WORLD):
        lengths = dist_results["ranks"][rank]["loader_lengths"]
        assert len(lengths) == 8 and all(loader == ours for loader, ours in lengths), lengths
        # ceil(37 / 2) = 19 images per rank: 4 batches with DROP_LAST, else 5
        assert [loader for loader, _ in lengths[:2]] == [5, 5] and lengths[2][0] == 4


# ------------------------------------------------------- unusable states
def test_queue_of_other_crops_or_size_names_the_key():
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    loss = SwAVPluginLoss.from_config(queue_config())
    with pytest.raises(ConfigError, match=r"config\.LOSS\.swav_plugin_loss\.crops_for_assign: .* 3 assign crop"):
        loss.load_state_dict({"queue": torch.zeros(2, 3, 6, DIM), "queue_filled": 6})
    with pytest.raises(ConfigError, match=r"config\.MODEL\.HEAD\.PARAMS\[0\]\[1\]\.feat_dim: .* size 5, the head makes 6"):
        loss.load_state_dict({"queue": torch.zeros(2, 2, 6, 5), "queue_filled": 6})
    assert loss.queue is None  # nothing loaded


def test_bank_of_other_crops_size_heads_or_dataset_names_the_key(dist_results):
    state = dist_results["bank_end_2"]
    key = r"config\.LOSS\.selav2_plugin_loss"
    cases = [
        ({"memory_embeddings": state["memory_embeddings"][:, :1]}, key + r"\.crops_for_assign: .* 1 assign crop"),
        ({"memory_embeddings": state["memory_embeddings"][..., :4]}, r"config\.MODEL\.HEAD\.PARAMS\[0\]\[1\]\.feat_dim"),
        ({"labels": torch.zeros(3, IMAGES, dtype=torch.long)}, key + r"\.nmb_prototypes: .* 3 head"),
        ({"labels": torch.zeros(2, IMAGES + 1, dtype=torch.long)}, r"config\.DATA\.TRAIN\.DATA_PATHS: .* 25 images"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            bank_loss().load_state_dict({**state, **change})


# ------------------------------------------------------- adapt_checkpoint
N = 1000  # training images in the checkpoint dicts below


# The counters below are worked out for these values; they are pinned so that a
# change of the quickstart's recipe does not change what these tests check.
QUICK_PINS = (
    "config.OPTIMIZER.num_epochs=10",
    "config.LOSS.swav_plugin_loss.freeze_prototypes_niters=31",
)


@pytest.fixture(scope="module")
def quick_cfg(tmp_path_factory):
    """compose() of the quickstart config on ``world`` ranks x ``batch``."""
    from swav_vissl_plugin.config import compose

    folder = tmp_path_factory.mktemp("ws_cfg")
    cache = {}

    def make(world, batch=16, config="swav_plugin/pretrain/swav_quickstart", *extra):
        key = (world, batch, config, extra)
        if config.endswith("/swav_quickstart"):
            extra = (*QUICK_PINS, *extra)
        if key not in cache:
            cache[key] = compose(
                [
                    f"config={config}",
                    f"config.CHECKPOINT.DIR={folder}",
                    f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
                    f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
                    "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
                    *extra,
                ],
                dump_config=False,
            )[1]
        return cache[key]

    return make


def checkpoint(world, batch, iteration, phases_done, per_phase, mode="phase", loss=None):
    """A VISSL checkpoint dict as the plugin writes it (counters only)."""
    return {
        "phase_idx": phases_done - 1,
        "train_phase_idx": phases_done - 1,
        "iteration": iteration,
        "iteration_num": iteration + phases_done - 1,
        "loss": loss if loss is not None else {"queue": None, "queue_filled": 0},
        "classy_state_dict": {"num_updates": iteration * world * batch, "phase_idx": phases_done - 1, "train_phase_idx": phases_done - 1},
        "swav_plugin": {
            "version": 1, "world_size": world, "batch_size_per_gpu": batch, "global_batch_size": world * batch,
            "iterations_per_phase": per_phase, "mode": mode, "rng": [{} for _ in range(world)],
        },
    }


def test_phase_checkpoint_counters_for_the_new_global_batch(quick_cfg, caplog):
    from swav_vissl_plugin.world_size import adapt_checkpoint

    cfg = quick_cfg(2)
    # 4 ranks x 16: ceil(1000 / 4) = 250 images per rank, 250 // 16 = 15 iterations (DROP_LAST);
    # 2 ranks x 16: 500 per rank, 31 iterations. After 3 epochs: 45 -> 93.
    ck = checkpoint(4, 16, 45, 3, 15)
    with caplog.at_level(logging.INFO):
        out = adapt_checkpoint(ck, cfg, dataset_size=N)
    assert out["iteration"] == 93 and out["iteration_num"] == 47 + 48
    assert out["classy_state_dict"]["num_updates"] == 93 * 32
    assert out["phase_idx"] == out["train_phase_idx"] == 2
    # VISSL's where: num_updates / global batch / (epochs x iterations per epoch) = 3 / 10 as before
    assert out["classy_state_dict"]["num_updates"] / 32 / (10 * 31) == pytest.approx(45 / (10 * 15))
    log = caplog.text
    assert "model_phase2.torch, written by 4 rank(s) x 16 = global batch 64, on 2 rank(s) x 16 = global batch 32" in log
    assert "iterations per phase 15 -> 31; iteration 45 -> 93" in log and "where 0.3" in log
    assert "random streams saved by 4 rank(s) are not restored on 2 rank(s)" in log
    assert adapt_checkpoint(out, cfg, dataset_size=N)["iteration"] == 93  # adapting twice changes nothing


def test_same_world_or_no_metadata_unchanged(quick_cfg):
    from swav_vissl_plugin.world_size import adapt_checkpoint

    cfg = quick_cfg(2)
    same = checkpoint(2, 16, 31, 1, 31)
    before = copy.deepcopy(same)
    assert adapt_checkpoint(same, cfg, dataset_size=None) == before  # no data listed either
    plain = checkpoint(4, 16, 45, 3, 15)
    del plain["swav_plugin"]
    before = copy.deepcopy(plain)
    assert adapt_checkpoint(plain, cfg) == before


def test_iteration_checkpoint_inside_an_epoch(quick_cfg):
    from swav_vissl_plugin.world_size import adapt_checkpoint

    # 5 of 15 iterations of epoch 3 at 64 images = 320 images = 10 iterations at 32
    out = adapt_checkpoint(checkpoint(4, 16, 50, 3, 15, mode="iteration"), quick_cfg(2), dataset_size=N)
    assert out["iteration"] == 3 * 31 + 10 and out["classy_state_dict"]["num_updates"] == 103 * 32
    # the whole phase done (an iteration checkpoint at its last iteration)
    out = adapt_checkpoint(checkpoint(4, 16, 60, 3, 15, mode="iteration"), quick_cfg(2), dataset_size=N)
    assert out["iteration"] == 4 * 31
    # 320 images are not a whole number of iterations of 3 x 16 = 48
    with pytest.raises(ConfigError) as e:
        adapt_checkpoint(checkpoint(4, 16, 50, 3, 15, mode="iteration"), quick_cfg(3), dataset_size=N)
    message = str(e.value)
    assert message.startswith("checkpoint model_iteration50.torch: ")
    assert "320 images consumed so far" in message and "global batch 48" in message
    assert "model_phase2.torch" in message


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (("config.DATA.TRAIN.USE_STATEFUL_DISTRIBUTED_SAMPLER=false",), "cannot start inside an epoch"),
        (("config.DATA.TRAIN.USE_DEBUGGING_SAMPLER=true",), "contiguous block of the dataset"),
    ],
)
def test_inside_an_epoch_with_a_sampler_that_cannot_continue(quick_cfg, overrides, reason):
    from swav_vissl_plugin.world_size import adapt_checkpoint

    cfg = quick_cfg(2, 16, "swav_plugin/pretrain/swav_quickstart", *overrides)
    with pytest.raises(ConfigError, match=reason):
        adapt_checkpoint(checkpoint(4, 16, 50, 3, 15, mode="iteration"), cfg, dataset_size=N)
    # from the end of a phase it can (rank blocks: 1000 // 2 = 500 per rank, 31 iterations)
    assert adapt_checkpoint(checkpoint(4, 16, 45, 3, 15), cfg, dataset_size=N)["iteration"] == 93


def test_prototype_freeze(quick_cfg, caplog):
    from swav_vissl_plugin.world_size import adapt_checkpoint

    # freeze_prototypes_niters 31 (QUICK_PINS). 2 ranks -> 4:
    # iteration 31 (trained prototypes) -> 15 (< 31: frozen again): refused
    with pytest.raises(ConfigError) as e:
        adapt_checkpoint(checkpoint(2, 16, 31, 1, 31), quick_cfg(4), dataset_size=N)
    message = str(e.value)
    assert message.startswith("config.LOSS.swav_plugin_loss.freeze_prototypes_niters: 31 iterations")
    assert "set it to 16" in message  # ceil(31 x 32 / 64)
    # 4 ranks -> 2: iteration 30 (frozen) -> 62 (trained): warned
    with caplog.at_level(logging.WARNING):
        assert adapt_checkpoint(checkpoint(4, 16, 30, 2, 15), quick_cfg(2), dataset_size=N)["iteration"] == 62
    assert "ends the prototype freeze at iteration 31 of the global batch 32" in caplog.text


def test_model_zoo_row_keeps_its_freeze_and_lr_per_image(quick_cfg, caplog):
    from swav_vissl_plugin.world_size import adapt_checkpoint

    # swav_200ep_bs256 (recipe batch 256, freeze 5005 iterations, 0.6 per 256)
    # on 2 x 64: freeze ceil(5005 x 256 / 128) = 10010, lr 0.3
    cfg = quick_cfg(2, 64, "swav_plugin/pretrain/swav_200ep_bs256")
    assert cfg.LOSS.swav_plugin_loss.freeze_prototypes_niters == 10010
    images = 1281167  # 4 x 64: ceil(N / 4) // 64 = 5004 per epoch; 2 x 64: 10009
    with caplog.at_level(logging.INFO):
        out = adapt_checkpoint(checkpoint(4, 64, 5004, 1, 5004), cfg, dataset_size=images)
    assert out["iteration"] == 10009  # still frozen on both sides: no error
    lr = cfg.OPTIMIZER.param_schedulers.lr
    assert lr.base_lr == pytest.approx(0.3) and lr.warmup_epochs == 0
    ratio = lr.final_lr / lr.base_lr

    def cosine(base, t, n):  # the release's schedule without warmup, 200 epochs of n
        return base * ratio + 0.5 * (base - base * ratio) * (1 + math.cos(math.pi * t / (200 * n)))

    old, new = cosine(0.6, 5004, 5004), cosine(0.3, 10009, 10009)
    assert new == pytest.approx(old / 2)  # same point of the schedule, half the batch
    assert f"where 0.005, lr {old:.6g} -> where 0.005, lr {new:.6g}" in caplog.text


def test_bank_rows_per_rank_and_state_checked_first(quick_cfg, dist_results):
    from swav_vissl_plugin.losses.deepcluster_v2 import RESHARD_ROWS_KEY
    from swav_vissl_plugin.world_size import adapt_checkpoint

    dc = "swav_plugin/pretrain/deepclusterv2_quickstart"
    cfg = quick_cfg(1, 16, dc)
    state = dict(dist_results["bank_end_2"])
    heads = len(cfg.LOSS.deepclusterv2_plugin_loss.nmb_prototypes)
    dim = cfg.LOSS.deepclusterv2_plugin_loss.feat_dim
    state["memory_embeddings"] = torch.zeros(2, 2, 12, dim)
    state["labels"] = torch.zeros(heads, N, dtype=torch.long)
    # 2 x 16 -> 1 x 16: 1000 // 16 = 62 iterations, 992 rows written per epoch
    out = adapt_checkpoint(checkpoint(2, 16, 31, 1, 31, loss=state), cfg, dataset_size=N)
    assert out["iteration"] == 62 and out["loss"][RESHARD_ROWS_KEY] == 992
    # a bank of other crops is refused before the training data is listed
    # (the config's DATA_PATHS is a placeholder: listing it would fail otherwise)
    state["memory_embeddings"] = torch.zeros(2, 3, 12, dim)
    with pytest.raises(ConfigError, match="crops_for_assign"):
        adapt_checkpoint(checkpoint(2, 16, 31, 1, 31, loss=state), cfg)


# ------------------------------------------------------------- end to end
E2E_IMAGES = 64
SMALL_MODEL = [
    "config.MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.WIDTHS=[8,16,32]",
    "config.MODEL.HEAD.PARAMS=[[swav_plugin_head,{in_dim:32,hidden_mlp:64,feat_dim:16,nmb_prototypes:%s}]]",
]


def _e2e_overrides(config, train, folder, world, batch, prototypes, extra=()):
    return [
        f"config=swav_plugin/pretrain/{config}",
        f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
        f"config.DATA.TRAIN.DATA_LIMIT={E2E_IMAGES}",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
        "config.OPTIMIZER.num_epochs=2",
        "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
        SMALL_MODEL[0],
        SMALL_MODEL[1] % prototypes,
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
        f"config.CHECKPOINT.DIR={folder}",
        "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
        "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=-1",
        "config.LOG_FREQUENCY=1",
        *extra,
    ]


SWAV_E2E = [
    "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=true",
    "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.3",  # 0.3 per 256 images
    "config.LOSS.swav_plugin_loss.queue_length=32",  # 2 global batches of 2 x 8
    "config.LOSS.swav_plugin_loss.epoch_queue_starts=0",
    "config.LOSS.swav_plugin_loss.freeze_prototypes_niters=1",
]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, mnist_folder):
    """SwAV (queue) and DeepCluster-v2 (memory bank): 2 epochs on 2 ranks,
    then resumed on 1 rank (2 epochs in all) from the checkpoint of epoch 0
    (``*1``) and from an iteration checkpoint inside epoch 0 (``*1mid``)."""
    root = tmp_path_factory.mktemp("ws_e2e")
    train = mnist_folder["train"]
    names = ("swav2", "dc2", "swav1", "dc1", "swav1mid", "dc1mid")
    folders = {k: root / k for k in names}
    keep = "config.SWAV_PLUGIN.CHECKPOINT.KEEP_LAST_ITERATION_CHECKPOINTS=0"
    swav2 = [*SWAV_E2E, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3", keep]  # after iteration 3 of 4
    dc2 = ["config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1", keep]  # after iteration 1 of 2
    run = lambda name, config, world, batch, k, extra: {  # noqa: E731
        "name": name, "overrides": _e2e_overrides(config, train, folders[name], world, batch, k, extra)
    }
    copy_ = lambda source, file, target: {"copy": [str(folders[source] / file), str(folders[target])]}  # noqa: E731
    spec = [
        run("swav2", "swav_quickstart", 2, 8, 20, swav2),
        run("dc2", "deepclusterv2_quickstart", 2, 16, "[20,20]", dc2),
        copy_("swav2", "model_phase0.torch", "swav1"),
        copy_("dc2", "model_phase0.torch", "dc1"),
        copy_("swav2", "model_iteration3.torch", "swav1mid"),
        copy_("dc2", "model_iteration1.torch", "dc1mid"),
        run("swav1", "swav_quickstart", 1, 8, 20, SWAV_E2E),
        run("dc1", "deepclusterv2_quickstart", 1, 16, "[20,20]", ()),
        run("swav1mid", "swav_quickstart", 1, 8, 20, SWAV_E2E),
        run("dc1mid", "deepclusterv2_quickstart", 1, 16, "[20,20]", ()),
    ]
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(TESTS / "world_size_probe.py"), str(root / "spec.json"), str(root / "results.json")],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread per rank: 2 ranks on 2 cores
    )
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    for name in names:
        record = results.get(name) or {"error": f"not run (rc {proc.returncode}): {proc.stderr[-3000:]}"}
        assert record.get("ok"), f"{name}: {record['error']}"
    probe = lambda name, rank=0: torch.load(folders[name] / "ws_probe" / f"rank{rank}.pt", weights_only=True)  # noqa: E731
    saved = {k: torch.load(folders[k] / "model_phase0.torch", weights_only=True) for k in ("swav2", "dc2")}
    saved["swav2mid"] = torch.load(folders["swav1mid"] / "model_iteration3.torch", weights_only=True)
    saved["dc2mid"] = torch.load(folders["dc1mid"] / "model_iteration1.torch", weights_only=True)
    return probe, saved


def _epoch_images(steps, epoch):
    return sorted(i for s in steps if s["epoch"] == epoch for i in s["images"])


def test_e2e_swav_queue_resumed_on_fewer_ranks(e2e):
    probe, saved = e2e
    two, one = probe("swav2"), probe("swav1")
    # 64 images: 2 ranks x 8 -> 4 iterations per epoch, 1 rank x 8 -> 8
    assert two["start"]["iterations_per_phase"] == 4 and one["start"]["iterations_per_phase"] == 8
    ck = saved["swav2"]
    assert ck["swav_plugin"]["world_size"] == 2 and ck["iteration"] == 4
    log = "\n".join(one["log"])
    assert "resuming model_phase0.torch, written by 2 rank(s) x 8 = global batch 16, on 1 rank(s) x 8 = global batch 8" in log
    assert "iterations per phase 4 -> 8; iteration 4 -> 8" in log
    assert "swav_plugin_loss: queue resharded from 2 to 1 ranks: 2 x 16 -> 1 x 32 rows" in log
    assert "random streams saved by 2 rank(s) are not restored on 1 rank(s)" in log
    # counters: the second epoch of 8 iterations, where = 8 / 16
    assert one["start"]["iteration"] == 8 and one["start"]["num_updates"] == 8 * 8
    steps = one["steps"]
    assert [s["iteration"] for s in steps] == list(range(8, 16)) and {s["epoch"] for s in steps} == {1}
    assert steps[0]["where"] == pytest.approx(0.5)
    # LR: the cosine schedule (no warmup, 2 epochs) of the new global batch:
    # base 0.3 x 8 / 256, final base / 1000, at iteration t of 16
    base = 0.3 * 8 / 256
    for s in steps:
        expected = base / 1000 + 0.5 * (base - base / 1000) * (1 + math.cos(math.pi * s["iteration"] / 16))
        assert s["lr"] == pytest.approx(expected, rel=1e-9)
    # ... the 2-rank run's LR at the same point of training, for half its global batch
    first_of_epoch_1 = next(s for s in two["steps"] if s["epoch"] == 1)
    assert steps[0]["lr"] == pytest.approx(first_of_epoch_1["lr"] / 2, rel=1e-9)
    # the queue after loading: the checkpoint's two queues, resharded by the rule, and in use at once
    queue, filled = ck["loss"]["queue"], ck["loss"]["queue_filled"]
    assert tuple(queue.shape) == (2, 2, 16, 16) and filled == 16
    rows = [[(j // 8, j % 8, r, queue[r, :, j]) for j in range(filled)] for r in range(2)]
    expected, dropped = reference_reshard(rows, 1, 32)
    assert dropped == 0 and one["start"]["queue_filled"] == 32
    assert_queue(one["start"]["queue"][0], expected[0], 32)
    assert all(s["queue_in_use"] for s in steps)


def test_e2e_deepcluster_bank_resumed_on_fewer_ranks(e2e):
    probe, saved = e2e
    one = probe("dc1")
    ck = saved["dc2"]
    assert ck["swav_plugin"]["world_size"] == 2 and ck["iteration"] == 2
    log = "\n".join(one["log"])
    assert "iterations per phase 2 -> 4; iteration 2 -> 4" in log
    assert "deepclusterv2_plugin_loss: memory bank resharded from 2 to 1 ranks: 64 of 64 rows kept" in log
    start = one["start"]
    assert start["filled_rows"] is None  # no fill pass: the bank came from the checkpoint
    assert start["iteration"] == 4 and [s["iteration"] for s in one["steps"]] == [4, 5, 6, 7]
    # every image's row of the 2 ranks' banks, with its dataset index, on the one rank
    rows = _rows_of(start["bank"], start["index"])
    saved_rows = bank_rows(ck["loss"])
    assert sorted(rows) == sorted(saved_rows) == list(range(E2E_IMAGES))
    for i, value in saved_rows.items():
        torch.testing.assert_close(rows[i], value, rtol=0, atol=0)
    # the epoch-1 clustering labelled every image from that bank; the epoch
    # then rewrote it: each image once, with this run's embeddings
    (phase,) = one["phases"]
    assert phase["epoch"] == 1 and bool((phase["labels"] >= 0).all())
    assert sorted(one["end"]["index"].tolist()) == list(range(E2E_IMAGES))


def test_e2e_resumed_inside_an_epoch_continues_it_exactly(e2e):
    probe, saved = e2e
    two = [probe("swav2", r) for r in range(WORLD)]
    # SwAV: 3 of 4 iterations of epoch 0 at 2 x 8 = 48 images = 6 iterations at 1 x 8
    assert saved["swav2mid"]["iteration"] == 3 and saved["swav2mid"]["swav_plugin"]["mode"] == "iteration"
    one = probe("swav1mid")
    assert "inside phase 0: 3 -> 6 iterations done" in "\n".join(one["log"])
    assert "queue resharded from 2 to 1 ranks" in "\n".join(one["log"])
    assert one["start"]["iteration"] == 6 and one["start"]["num_updates"] == 6 * 8
    assert [s["iteration"] for s in one["steps"]] == list(range(6, 16))
    # the rest of epoch 0 is exactly the images the 2 ranks had not trained on yet
    before = sorted(i for r in two for s in r["steps"] if s["iteration"] < 3 for i in s["images"])
    after = _epoch_images(one["steps"], 0)
    assert len(before) == 48 and len(after) == 16 and sorted(before + after) == list(range(E2E_IMAGES))
    assert _epoch_images(one["steps"], 1) == list(range(E2E_IMAGES))
    base = 0.3 * 8 / 256  # LR of the new global batch at iteration 6 of 16
    expected = base / 1000 + 0.5 * (base - base / 1000) * (1 + math.cos(math.pi * 6 / 16))
    assert one["steps"][0]["lr"] == pytest.approx(expected, rel=1e-9)

    # DeepCluster-v2: 1 of 2 iterations of epoch 0 at 2 x 16 = 2 of 4 at 1 x 16
    ck = saved["dc2mid"]
    assert ck["iteration"] == 1 and ck["loss"]["memory_position"] == 16
    one = probe("dc1mid")
    log = "\n".join(one["log"])
    assert "inside phase 0: 1 -> 2 iterations done" in log and "memory bank resharded from 2 to 1 ranks" in log
    assert one["start"]["iteration"] == 2 and one["start"]["position"] == 32
    # the 32 rows this epoch wrote first (the rest of the epoch writes after them),
    # then the fill pass's rows of the 32 images not seen yet
    written = {int(ck["loss"]["memory_index"][r, j]) for r in range(WORLD) for j in range(16)}
    assert set(one["start"]["index"][:32].tolist()) == written
    assert sorted(one["start"]["index"].tolist()) == list(range(E2E_IMAGES))
    # epoch 0's clustering came with the checkpoint (not redone); the epoch
    # then ended with every image written once
    assert [p["epoch"] for p in one["phases"]] == [0, 1]
    assert torch.equal(one["phases"][0]["labels"], ck["loss"]["labels"])
    rest = _epoch_images(one["steps"], 0)
    assert sorted(rest + sorted(written)) == list(range(E2E_IMAGES))
    assert sorted(one["end"]["index"].tolist()) == list(range(E2E_IMAGES))
