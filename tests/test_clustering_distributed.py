"""Two real gloo ranks: k-means, Sinkhorn hard labels and the label table,
each rank holding part of the memory bank (uneven parts), equal those of one
process holding the concatenated bank (rank 0's rows first). Also: k-means'
initial centroids are rank 0's rows, broadcast; the DeepCluster-v2 loss's
clustering gives every rank the same centroids and label table, and rank 0's
checkpoint state restores every rank's own memory bank."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import reference_cluster as ref
from gloo_ranks import spawn
from tolerances import centroid_rtol, rtol, terms

WORLD = 2
N0, N1, DIM, K = 700, 500, 16, 30  # rows of rank 0 and rank 1
EPS, SK_ITERS = 0.05, 10
# loss-level run: 3 heads on the banks of 2 assign crops
KS, CFA, NUM_CROPS, BANK, BATCH = [9, 11, 7], [0, 1], 2, 40, 8


def make_data():
    g = torch.Generator().manual_seed(2024)
    bank = F.normalize(torch.randn(N0 + N1, DIM, generator=g), dim=1)
    init = bank[torch.randperm(N0, generator=g)[:K]]  # rows of rank 0's part
    protos = F.normalize(torch.randn(K, DIM, generator=g), dim=1)
    # loss-level: each rank sees 40 images (ids interleaved over ranks), as
    # 5 batches of 8, embeddings of 2 assign crops
    ids = torch.randperm(WORLD * BANK, generator=g).view(WORLD, BANK)
    emb = F.normalize(torch.randn(WORLD, len(CFA), BANK, DIM, generator=g), dim=-1)
    return {"bank": bank, "init": init, "protos": protos, "ids": ids, "emb": emb}


def part(x, rank):
    return x[:N0] if rank == 0 else x[N0:]


def dc_loss():
    from classy_vision.losses import build_loss

    return build_loss(
        {
            "name": "deepclusterv2_plugin_loss",
            "num_crops": NUM_CROPS,
            "crops_for_assign": CFA,
            "nmb_prototypes": KS,
            "feat_dim": DIM,
            "num_train_samples": WORLD * BANK,
            "chunk_size": 7,
        }
    )


def worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        from swav_vissl_plugin.clustering import gather_labels, sinkhorn_labels, spherical_kmeans

        data = torch.load(f"{tmp}/data.pt", weights_only=True)
        mine = part(data["bank"], rank)
        out = {}
        # 1. k-means from given initial centroids (only rank 0's are used)
        res = spherical_kmeans(mine, K, 10, init_centroids=data["init"] if rank == 0 else None, chunk_size=64)
        out["km"] = (res.centroids, res.labels, torch.tensor(res.objective), res.counts)
        # 2. default initialisation: random rows of rank 0's bank, broadcast
        g = torch.Generator().manual_seed(100 + rank)  # ranks draw differently
        out["init0"] = spherical_kmeans(mine, K, 0, generator=g).centroids
        out["km_random"] = spherical_kmeans(mine, K, 10, generator=g).centroids
        # 3. Sinkhorn hard labels of the whole bank
        out["sk"] = sinkhorn_labels(mine, data["protos"], EPS, SK_ITERS, chunk_size=50)
        # 4. label table from uneven parts
        out["table"] = gather_labels(res.labels, torch.arange(N0) if rank == 0 else torch.arange(N0, N0 + N1) , N0 + N1 + 3)

        # 5. the loss: bank filled batch by batch, clustering, checkpoint
        loss = dc_loss()
        loss.allocate_memory(BANK, DIM)
        for s in range(0, BANK, BATCH):
            loss.update_memory(data["emb"][rank][:, s:s + BATCH], data["ids"][rank][s:s + BATCH])
        weights = [torch.zeros(k, DIM) for k in KS]
        torch.manual_seed(rank)  # k-means initial rows: rank 0's draw is used
        loss.cluster(weights)
        out["loss_weights"] = weights
        out["loss_labels"] = loss.labels.clone()
        out["own_state_ranks"] = loss.state_dict()["memory_ranks"]
        if rank == 0:
            torch.save({"loss": loss.state_dict()}, f"{tmp}/ckpt.pt")
        dist.barrier()
        restored = dc_loss()
        restored.load_state_dict(torch.load(f"{tmp}/ckpt.pt", weights_only=True)["loss"])
        out["restored_bank"] = restored.memory_embeddings.clone()
        out["restored_index"] = restored.memory_index.clone()
        out["restored_ready"] = restored.memory_ready
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster_dist")
    data = make_data()
    torch.save(data, tmp / "data.pt")
    spawn(worker, tmp, preload=("torch", "swav_vissl_plugin", "reference_cluster"), nprocs=WORLD, deadline_s=180)
    return data, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_kmeans_two_ranks_equal_one_rank_with_the_concatenated_bank(results):
    from swav_vissl_plugin.clustering import spherical_kmeans

    data, ranks = results
    single = spherical_kmeans(data["bank"], K, 10, init_centroids=data["init"])
    # float32 rounding of either: the centroids (unit vectors, the 2 ranks'
    # sums all-reduced), the objective (the centroids' error and a DIM-term
    # dot product; dots <= 1)
    c_tol = centroid_rtol(data["bank"], single.labels, K) + rtol(WORLD)
    for r in ranks:
        torch.testing.assert_close(r["km"][0], single.centroids, atol=2 * c_tol, rtol=0)
        torch.testing.assert_close(r["km"][2], torch.tensor(single.objective), atol=2 * (c_tol + rtol(terms(DIM))), rtol=0)
        assert torch.equal(r["km"][3], single.counts)
    assert torch.equal(torch.cat([ranks[0]["km"][1], ranks[1]["km"][1]]), single.labels)
    # (the single-process k-means is checked against the plain reference in test_clustering.py)


def test_kmeans_initial_centroids_are_rank0_rows_broadcast(results):
    data, ranks = results
    init0, init1 = ranks[0]["init0"], ranks[1]["init0"]
    assert torch.equal(init0, init1)
    rank0_rows = data["bank"][:N0]
    match = (init0.unsqueeze(1) - rank0_rows.unsqueeze(0)).abs().amax(-1) == 0
    assert match.any(1).all() and len(set(match.float().argmax(1).tolist())) == K
    assert torch.equal(ranks[0]["km_random"], ranks[1]["km_random"])


def test_sinkhorn_labels_two_ranks_equal_one_rank(results):
    from swav_vissl_plugin.clustering import sinkhorn_labels

    data, ranks = results
    together = torch.cat([ranks[0]["sk"], ranks[1]["sk"]])
    assert torch.equal(together, sinkhorn_labels(data["bank"], data["protos"], EPS, SK_ITERS))
    assert torch.equal(together, ref.sinkhorn_hard_labels_plain(data["bank"] @ data["protos"].t(), EPS, SK_ITERS))


def test_label_table_gathered_from_uneven_ranks(results):
    _, ranks = results
    labels = torch.cat([ranks[0]["km"][1], ranks[1]["km"][1]])
    for r in ranks:
        assert torch.equal(r["table"][: N0 + N1], labels)
        assert r["table"][N0 + N1:].tolist() == [-100] * 3


def test_deepcluster_loss_clustering_is_the_same_on_every_rank(results):
    data, ranks = results
    for h in range(len(KS)):
        assert torch.equal(ranks[0]["loss_weights"][h], ranks[1]["loss_weights"][h])
        assert torch.equal(ranks[0]["loss_labels"][h], ranks[1]["loss_labels"][h])
        # every image has a label, and it is its nearest centroid (head h
        # clusters the bank of assign crop h mod 2, all ranks' rows)
        table, w = ranks[0]["loss_labels"][h], ranks[0]["loss_weights"][h]
        assert (table >= 0).all()
        for rank in range(WORLD):
            rows = data["emb"][rank][h % len(CFA)]
            assert torch.equal(table[data["ids"][rank]], (rows @ w.t()).argmax(1))


def test_rank0_checkpoint_restores_every_rank_bank(results):
    data, ranks = results
    assert ranks[0]["own_state_ranks"].tolist() == [0, 1]  # rank 0 holds all
    assert ranks[1]["own_state_ranks"].tolist() == [1]
    for rank, r in enumerate(ranks):
        assert r["restored_ready"]
        assert torch.equal(r["restored_bank"], data["emb"][rank])
        assert torch.equal(r["restored_index"], data["ids"][rank])
