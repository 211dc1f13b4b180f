"""DeepCluster-v2 / SeLa-v2 on one process: k-means, Sinkhorn hard labels,
the label table, the loss (cross-entropy, memory bank, checkpoint state),
config inference and the k-means benchmark script.

References: ``reference_cluster.py`` (plain, written from the recipe text)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reference_cluster as ref
from swav_vissl_plugin.clustering import (
    IGNORE_LABEL,
    assign_to_centroids,
    gather_labels,
    sinkhorn_labels,
    spherical_kmeans,
)
from swav_vissl_plugin.config import ConfigError
from tolerances import centroid_rtol, rtol, terms, unit_norm_tol

ROOT = Path(__file__).resolve().parents[1]


def unit(x):
    return F.normalize(x, dim=1)


def blobs(k, per, dim, noise, seed):
    """k well-separated directions on the sphere, ``per`` noisy points each."""
    g = torch.Generator().manual_seed(seed)
    centers = unit(torch.randn(k, dim, generator=g))
    truth = torch.arange(k).repeat_interleave(per)
    x = unit(centers[truth] + noise * torch.randn(k * per, dim, generator=g))
    perm = torch.randperm(k * per, generator=g)
    return x[perm], truth[perm], centers


# ----------------------------------------------------------------- k-means
def test_kmeans_recovers_known_clusters():
    k, per = 12, 60
    x, truth, _ = blobs(k, per, dim=16, noise=0.15, seed=0)
    # one random member of each cluster as initial centroid: the worst
    # members (farthest from their cluster's mean) so that iterations matter
    means = unit(torch.stack([x[truth == c].mean(0) for c in range(k)]))
    init = torch.stack([x[truth == c][(x[truth == c] @ means[c]).argmin()] for c in range(k)])
    res = spherical_kmeans(x, k, 10, init_centroids=init)
    first = (x @ init.t()).argmax(1)
    assert (first != truth).sum() > 0  # the initial assignment is imperfect ...
    assert torch.equal(res.labels, truth)  # ... k-means recovers every cluster
    # centroids: the normalised means of the true clusters (independent; two
    # float32 computations of the same unit vectors)
    torch.testing.assert_close(res.centroids, means, atol=2 * centroid_rtol(x, truth, k), rtol=0)
    assert res.counts.tolist() == [per] * k


def test_kmeans_objective_never_increases_and_matches_the_plain_reference():
    g = torch.Generator().manual_seed(1)
    x = unit(torch.randn(1500, 8, generator=g))
    res = spherical_kmeans(x, 40, 10, generator=torch.Generator().manual_seed(5))
    obj = res.objective
    assert len(obj) == 11
    # the same run from the same initial rows in the plain reference
    init = x[torch.randperm(1500, generator=torch.Generator().manual_seed(5))[:40]]
    c_ref, labels_ref, obj_ref = ref.kmeans_plain(x, init, 10)
    # float32 centroids (unit vectors); the objective 1 - mean best dot (dots
    # <= 1, summed in float64): the centroids' error and an 8-term dot product
    c_tol = centroid_rtol(x, labels_ref, 40)
    obj_tol = c_tol + rtol(terms(8))
    assert all(b <= a + 2 * obj_tol for a, b in zip(obj, obj[1:])), obj  # never increases beyond rounding
    assert obj[-1] < obj[0] - 0.01
    torch.testing.assert_close(res.centroids.double(), c_ref, atol=c_tol, rtol=0)
    assert torch.equal(res.labels, labels_ref)
    assert obj == pytest.approx(obj_ref, abs=obj_tol)
    assert torch.equal(res.counts, torch.bincount(labels_ref, minlength=40))


def test_kmeans_default_init_is_random_bank_rows():
    g = torch.Generator().manual_seed(2)
    x = unit(torch.randn(300, 6, generator=g))
    res = spherical_kmeans(x, 25, 0, generator=torch.Generator().manual_seed(9))
    # zero iterations: the centroids are the initial ones, 25 distinct bank rows
    match = (res.centroids.unsqueeze(1) - x.unsqueeze(0)).abs().amax(-1) == 0
    rows = match.float().argmax(1)
    assert match.any(1).all() and len(set(rows.tolist())) == 25
    other = spherical_kmeans(x, 25, 0, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(other.centroids, res.centroids)


def test_empty_cluster_keeps_its_centroid_and_all_are_unit_norm():
    x, _, centers = blobs(3, 50, dim=8, noise=0.1, seed=3)
    far = -unit(x.mean(0, keepdim=True))  # opposite every point: wins no row
    init = torch.cat([centers, far])
    res = spherical_kmeans(x, 4, 5, init_centroids=init)
    assert res.counts[3] == 0
    # kept, only normalised again at each of the 5 iterations (unit vectors)
    torch.testing.assert_close(res.centroids[3], far[0], atol=rtol(5 * (terms(8) + 2)), rtol=0)
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(4), atol=unit_norm_tol(8), rtol=0)


def test_chunked_e_step_equals_one_matrix():
    g = torch.Generator().manual_seed(4)
    x, c = unit(torch.randn(1000, 16, generator=g)), unit(torch.randn(37, 16, generator=g))
    best, labels = (x @ c.t()).max(dim=1)
    for chunk in (1, 7, 333, 5000):
        got_labels, got_best = assign_to_centroids(x, c, chunk_size=chunk)
        # (BLAS may block a smaller product differently: equal up to the
        # rounding of either 16-term dot product of unit vectors)
        assert torch.equal(got_labels, labels)
        torch.testing.assert_close(got_best, best, atol=2 * rtol(terms(16)), rtol=0)
    a = spherical_kmeans(x, 37, 4, init_centroids=c, chunk_size=13)
    b = spherical_kmeans(x, 37, 4, init_centroids=c)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.centroids, b.centroids, atol=2 * centroid_rtol(x, a.labels, 37), rtol=0)


def test_kmeans_needs_enough_rows_on_rank_0():
    with pytest.raises(ValueError, match="fewer than the 10 clusters"):
        spherical_kmeans(unit(torch.randn(5, 4)), 10, 3)


# ---------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("n,k,iters,chunk", [(500, 7, 1, None), (1000, 40, 3, 64), (777, 150, 10, 100)])
def test_sinkhorn_labels_are_the_argmax_of_the_plain_sinkhorn(n, k, iters, chunk):
    g = torch.Generator().manual_seed(n + k)
    x, p = unit(torch.randn(n, 16, generator=g)), unit(torch.randn(k, 16, generator=g))
    got = sinkhorn_labels(x, p, 0.05, iters, chunk_size=chunk)
    expected = ref.sinkhorn_hard_labels_plain(x @ p.t(), 0.05, iters)
    assert torch.equal(got, expected)


def test_sinkhorn_labels_equipartition_a_skewed_bank():
    # 60% of the rows crowd around one prototype: plain argmax is far from equal
    g = torch.Generator().manual_seed(7)
    dim, k, n = 32, 50, 10000
    protos = unit(torch.randn(k, dim, generator=g))
    crowd = unit(protos[0] + 0.6 * torch.randn(6000, dim, generator=g))
    x = torch.cat([crowd, unit(torch.randn(n - 6000, dim, generator=g))])
    plain = torch.bincount((x @ protos.t()).argmax(1), minlength=k)
    labels = sinkhorn_labels(x, protos, 0.05, 10)
    counts = torch.bincount(labels, minlength=k)
    mean = n / k
    # equipartition tolerance (docs/deepcluster_sela.md): rounding noise of
    # the balanced soft assignment, within 5 sqrt(N/K) of N/K
    tol = 5 * math.sqrt(mean)
    assert (plain - mean).abs().max() > 10 * tol
    assert (counts - mean).abs().max() <= tol, counts.tolist()


# -------------------------------------------------------------- label table
def test_gather_labels_single_process():
    table = gather_labels(torch.tensor([3, 1, 4]), torch.tensor([9, 0, 5]), 10)
    expected = torch.full((10,), IGNORE_LABEL)
    expected[9], expected[0], expected[5] = 3, 1, 4
    assert torch.equal(table, expected)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        gather_labels(torch.tensor([1]), torch.tensor([4]), 4)


# -------------------------------------------------------------------- loss
NUM_CROPS, CFA, KS, DIM, B = 3, [0, 2], [5, 7, 4], 8, 6


def make_loss(cls_name="deepclusterv2_plugin_loss", **extra):
    from classy_vision.losses import build_loss

    cfg = {
        "name": cls_name,
        "num_crops": NUM_CROPS,
        "crops_for_assign": CFA,
        "temperature": 0.1,
        "nmb_prototypes": KS,
        "feat_dim": DIM,
        "num_train_samples": 20,
        **extra,
    }
    return build_loss(cfg)


def batch(ids, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    emb = unit(torch.randn(NUM_CROPS * len(ids), DIM, generator=g))
    heads = [torch.randn(NUM_CROPS * len(ids), k, generator=g).requires_grad_(requires_grad) for k in KS]
    idx = torch.tensor(list(ids) * NUM_CROPS)  # crop-major replication
    return emb, heads, idx


def test_loss_is_cross_entropy_against_the_image_cluster_and_fills_the_bank():
    loss_fn = make_loss()
    loss_fn.allocate_memory(2 * B, DIM)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 20), generator=g)
    labels[:, 7] = IGNORE_LABEL  # image 7 is in no bank: ignored
    loss_fn.labels = labels
    ids = [3, 7, 11, 0, 19, 5]
    emb, heads, idx = batch(ids, 1, requires_grad=True)
    loss_fn.set_indices(idx)
    loss = loss_fn([emb] + heads)
    expected = ref.cluster_loss_plain(heads, labels, ids, NUM_CROPS, 0.1)
    # float32 cross-entropy: log_softmax(s / T) (exponent 2 max|s| / T, K
    # terms), the sum over the labelled rows, the mean over heads; scale
    # max(1, |loss|) (a log-probability's error is absolute)
    s_max = max(float(h.abs().max()) for h in heads)
    tol = rtol(2 * s_max / 0.1, terms(max(KS)), terms(NUM_CROPS * B), len(KS))
    assert loss.item() == pytest.approx(expected.item(), abs=tol * max(1.0, abs(expected.item())))
    loss.backward()
    assert all(h.grad is not None and torch.isfinite(h.grad).all() for h in heads)
    # bank rows 0..5: the assign crops' embeddings and the image ids
    for j, crop in enumerate(CFA):
        assert torch.equal(loss_fn.memory_embeddings[j, :B], emb[crop * B:(crop + 1) * B])
    assert loss_fn.memory_index[:B].tolist() == ids and loss_fn.memory_position == B
    # no indices: refused (never a silent fall back to the target)
    with pytest.raises(RuntimeError, match="no dataset indices"):
        loss_fn([emb] + heads, idx)
    # indices that are not the same image's for every crop: refused
    loss_fn.set_indices(torch.arange(NUM_CROPS * B))
    with pytest.raises(ValueError, match="same image"):
        loss_fn([emb] + heads)


def test_loss_with_only_unlabelled_images_is_zero_not_nan():
    loss_fn = make_loss()
    loss_fn.allocate_memory(B, DIM)
    loss_fn.labels = torch.full((3, 20), IGNORE_LABEL)
    emb, heads, idx = batch(range(B), 2)
    loss_fn.set_indices(idx)
    assert loss_fn([emb] + heads).item() == 0.0


def test_deepcluster_cluster_copies_centroids_and_labels_every_image():
    loss_fn = make_loss()
    loss_fn.allocate_memory(20, DIM)
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(20, generator=g)
    bank = unit(torch.randn(2, 20, DIM, generator=g))
    for s in range(0, 20, 5):
        loss_fn.update_memory(bank[:, s:s + 5], ids[s:s + 5])
    weights = [torch.zeros(k, DIM) for k in KS]
    loss_fn.cluster(weights)
    assert loss_fn.memory_position == 0
    for h, w in enumerate(weights):
        rows = bank[h % 2]  # head h clusters the bank of assign crop h mod 2
        torch.testing.assert_close(w.norm(dim=1), torch.ones(KS[h]), atol=unit_norm_tol(DIM), rtol=0)
        nearest = (rows @ w.t()).argmax(1)  # labels = nearest centroid of each image
        assert torch.equal(loss_fn.labels[h][ids], nearest)
        assert (loss_fn.labels[h] >= 0).all()


def test_sela_cluster_uses_the_prototypes_and_keeps_them():
    loss_fn = make_loss("selav2_plugin_loss", epsilon=0.05, sinkhorn_iterations=3)
    loss_fn.allocate_memory(20, DIM)
    g = torch.Generator().manual_seed(4)
    ids = torch.arange(20).flip(0)
    bank = unit(torch.randn(2, 20, DIM, generator=g))
    loss_fn.update_memory(bank, ids)
    weights = [unit(torch.randn(k, DIM, generator=g)) for k in KS]
    before = [w.clone() for w in weights]
    loss_fn.cluster(weights)
    for h, w in enumerate(weights):
        assert torch.equal(w, before[h])
        expected = ref.sinkhorn_hard_labels_plain(bank[h % 2] @ w.t(), 0.05, 3)
        assert torch.equal(loss_fn.labels[h][ids], expected)


def test_loss_state_round_trips_through_weights_only_load(tmp_path):
    loss_fn = make_loss()
    loss_fn.allocate_memory(10, DIM)
    g = torch.Generator().manual_seed(5)
    loss_fn.update_memory(unit(torch.randn(2, 10, DIM, generator=g)), torch.arange(10) + 3)
    loss_fn.cluster([torch.zeros(k, DIM) for k in KS])
    path = tmp_path / "state.pt"
    torch.save({"loss": loss_fn.state_dict()}, path)
    state = torch.load(path, weights_only=True)["loss"]
    assert state["memory_embeddings"].shape == (1, 2, 10, DIM)
    fresh = make_loss()
    assert not fresh.memory_ready
    fresh.load_state_dict(state)
    assert fresh.memory_ready
    assert torch.equal(fresh.memory_embeddings, loss_fn.memory_embeddings)
    assert torch.equal(fresh.memory_index, loss_fn.memory_index)
    assert torch.equal(fresh.labels, loss_fn.labels)
    assert loss_fn.get_classy_state() == {}  # not saved twice in the task state


# ------------------------------------------------------------------ config
DC = "config.LOSS.deepclusterv2_plugin_loss"
DC_QUICK = "swav_plugin/pretrain/deepclusterv2_quickstart"


def test_configs_carry_the_recipe(compose_cfg):
    c = compose_cfg(config="swav_plugin/pretrain/deepclusterv2_base")
    loss = c.LOSS.deepclusterv2_plugin_loss
    assert c.LOSS.name == "deepclusterv2_plugin_loss"
    assert list(loss.nmb_prototypes) == [3000, 3000, 3000] and loss.feat_dim == 128
    assert (loss.temperature, list(loss.crops_for_assign), loss.kmeans_iterations) == (0.1, [0, 1], 10)
    assert loss.freeze_prototypes_niters == 300000 and loss.num_crops == 6
    assert loss.num_train_samples == -1  # VISSL's _build_loss fills it
    mc = c.DATA.TRAIN.TRANSFORMS[0]
    assert list(mc["nmb_crops"]) == [2, 4] and list(mc["size_crops"]) == [160, 96]
    assert list(mc["min_scale_crops"]) == [0.08, 0.05] and list(mc["max_scale_crops"]) == [1.0, 0.14]
    assert c.MODEL.AMP_PARAMS.USE_AMP is False and c.OPTIMIZER.num_epochs == 400
    lr = c.OPTIMIZER.param_schedulers.lr
    assert (lr.base_lr, lr.final_lr, lr.warmup_epochs, lr.start_warmup) == (4.8, 0.0048, 10, 0.3)
    assert c.OPTIMIZER.weight_decay == 1e-6 and c.OPTIMIZER.name == "swav_plugin_larc"
    assert c.DATA.TRAIN.BATCHSIZE_PER_REPLICA * c.DISTRIBUTED.NUM_NODES * c.DISTRIBUTED.NUM_PROC_PER_NODE == 4096
    s = compose_cfg(config="swav_plugin/pretrain/selav2_base")
    sela = s.LOSS.selav2_plugin_loss
    assert s.LOSS.name == "selav2_plugin_loss"
    assert (sela.epsilon, sela.sinkhorn_iterations, sela.freeze_prototypes_niters) == (0.05, 10, 0)
    assert list(sela.nmb_prototypes) == [3000, 3000, 3000] and sela.temperature == 0.1


@pytest.mark.parametrize(
    "override,key",
    [
        (f"{DC}.crops_for_assign=[0,6]", f"{DC}.crops_for_assign"),
        (f"{DC}.kmeans_iterations=0", f"{DC}.kmeans_iterations"),
        (f"{DC}.temperature=0", f"{DC}.temperature"),
        (f"{DC}.chunk_size=0", f"{DC}.chunk_size"),
        ("+config.MODEL.HEAD.PARAMS.0.1.normalize=false", "MODEL.HEAD.PARAMS[0][1].normalize"),
    ],
)
def test_bad_values_name_their_key(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace("config.", "")):
        compose_cfg(override, config=DC_QUICK)


def test_sela_bad_epsilon_names_its_key(compose_cfg):
    with pytest.raises(ConfigError, match="LOSS.selav2_plugin_loss.epsilon"):
        compose_cfg("config.LOSS.selav2_plugin_loss.epsilon=-1", config="swav_plugin/pretrain/selav2_quickstart")


# --------------------------------------------------------------- benchmark
def test_benchmark_script_prints_a_row_and_the_e_step_memory_is_bounded():
    # A small run of benchmarks/bench_kmeans.py. 100,000 x 1,000 scores would
    # be 400 MB at once; the chunked E step (2**24 // 1000 rows at a time,
    # 64 MB) must stay far below that.
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kmeans.py"), "--size", "100000", "--clusters", "1000",
         "--dim", "8", "--iterations", "2", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    row = [l for l in lines if l.startswith("| 100,000 ")]
    assert row, out.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1:4] == ["8", "1000", "2"] and float(cells[4].split()[0]) > 0
    result = json.loads(lines[-1])
    assert result["full_score_matrix_mb"] > 380
    assert result["peak_rss_increase_mb"] < 150, result


# ------------------------------------------------------------------- hooks
def _fake_task(loss, iteration=0):
    from types import SimpleNamespace

    from swav_vissl_plugin.heads import SwAVPluginPrototypeHead

    head = SwAVPluginPrototypeHead(SimpleNamespace(HEAD={}), in_dim=4, hidden_mlp=0, feat_dim=DIM, nmb_prototypes=KS)
    with torch.no_grad():
        for w in head.prototype_parameters():
            w.mul_(3.0)  # not unit-norm
    return SimpleNamespace(
        base_model=SimpleNamespace(heads=[head]), base_loss=loss, loss=loss, iteration=iteration, train=True,
        config={"LOSS": {"name": loss.NAME}}, checkpoint=None,  # VISSL's task on a fresh start
    ), head


def test_sela_hook_normalises_and_trains_the_prototypes_dc_hook_freezes_them():
    from types import SimpleNamespace

    from swav_vissl_plugin.hooks import LOSS_HOOKS

    def cfg(name, **loss):
        return SimpleNamespace(LOSS={"name": name, name: loss})

    sela_hook = LOSS_HOOKS["selav2_plugin_loss"](cfg("selav2_plugin_loss", freeze_prototypes_niters=0))[0]
    dc_hook = LOSS_HOOKS["deepclusterv2_plugin_loss"](cfg("deepclusterv2_plugin_loss"))[0]
    assert dc_hook.freeze_prototypes_niters == 300000  # recipe: prototypes = centroids, never trained

    loss = make_loss("selav2_plugin_loss")
    loss.allocate_memory(4, DIM)
    loss.update_memory(unit(torch.randn(2, 4, DIM)), torch.arange(4))  # bank restored: no fill pass
    task, head = _fake_task(loss)
    sela_hook.on_start(task)
    for w in head.prototype_parameters():
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), atol=unit_norm_tol(DIM), rtol=0)
    for w in head.prototype_parameters():
        w.grad = torch.ones_like(w)
    sela_hook.on_backward(task)  # freeze 0: gradients kept
    assert all(w.grad is not None for w in head.prototype_parameters())
    with torch.no_grad():
        for w in head.prototype_parameters():
            w.add_(w.grad)  # an update
    sela_hook.on_update(task)  # normalised again after every update
    for w in head.prototype_parameters():
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), atol=unit_norm_tol(DIM), rtol=0)

    task, head = _fake_task(make_loss(), iteration=5)
    for w in head.prototype_parameters():
        w.grad = torch.ones_like(w)
    dc_hook.on_backward(task)
    assert all(w.grad is None for w in head.prototype_parameters())
    before = [w.clone() for w in head.prototype_parameters()]
    dc_hook.on_update(task)  # DeepCluster-v2 never renormalises: prototypes = centroids
    assert all(torch.equal(a, b) for a, b in zip(before, head.prototype_parameters()))
