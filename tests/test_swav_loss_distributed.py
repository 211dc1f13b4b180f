"""Two real gloo ranks on this machine: Sinkhorn codes, the loss (and its
gradients) and the queue-enabled loss over several iterations, each rank with
half of a global batch, equal those of one process holding the whole batch.
Also: rank 0's checkpoint state restores every rank's own queue."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import reference_swav as ref
from gloo_ranks import spawn
from tolerances import codes_rtol, grad_rtol, grad_scale, loss_rtol, rtol, terms

WORLD = 2
T, EPS, ITERS = 0.1, 0.05, 3

# Sinkhorn cases: (global rows, K, rows of rank 0) - uneven splits included;
# 1100 rows make rank 0 and 1 use the blocked prototype sums with a remainder.
SINKHORN_CASES = [(7, 101, 3), (66, 3000, 33), (1100, 17, 520)]
NUM_CROPS, CFA, KS, DIM = 4, [0, 2], [17, 101], 16
HALF = 3  # per-rank batch; the global batch is 6
QUEUE_LENGTH = 12  # total: 6 per rank on 2 ranks, 12 on 1 rank
N_ITERS = 6  # queue from iteration 1 (epoch 1), full (2 pushes) from iteration 3


def make_data():
    g = torch.Generator().manual_seed(1234)
    sinkhorn = [torch.rand(n, k, generator=g) * 2 - 1 for n, k, _ in SINKHORN_CASES]
    iters = []
    for _ in range(N_ITERS + 1):  # the last one runs after the checkpoint
        emb = F.normalize(torch.randn(NUM_CROPS * WORLD * HALF, DIM, generator=g), dim=1)
        weights = [F.normalize(torch.randn(k, DIM, generator=g), dim=1) for k in KS]
        iters.append((emb, [emb @ w.t() for w in weights], weights))
    return {"sinkhorn": sinkhorn, "iters": iters}


def local_rows(x, rank, batch=WORLD * HALF):
    """This rank's rows of a crop-major global tensor: [crop0 half, crop1 half, ...]."""
    return torch.cat(
        [x[c * batch + rank * HALF: c * batch + (rank + 1) * HALF] for c in range(NUM_CROPS)]
    )


def loss_config(queue=True):
    return {
        "name": "swav_plugin_loss",
        "num_crops": NUM_CROPS,
        "crops_for_assign": CFA,
        "temperature": T,
        "epsilon": EPS,
        "sinkhorn_iterations": ITERS,
        "nmb_prototypes": KS,
        "queue_length": QUEUE_LENGTH if queue else 0,
        "global_batch_size": WORLD * HALF,
        "epoch_queue_starts": 1,
    }


def run_loss(loss_fn, iters, rank=None):
    """Iterations of the queue-enabled loss; rank=None: the whole batch."""
    out = []
    for it, (emb, heads, weights) in enumerate(iters):
        if it <= 1:
            loss_fn.on_epoch_start(it)
        if rank is not None:
            emb, heads = local_rows(emb, rank), [local_rows(h, rank) for h in heads]
        loss_fn.set_prototypes(weights)
        out.append((loss_fn([emb] + heads, None).item(), loss_fn.last_stats["queue_in_use"]))
    return out


def worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/pg",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        from swav_vissl_plugin.losses.swav import SwAVPluginLoss
        from swav_vissl_plugin.sinkhorn import sinkhorn_knopp

        data = torch.load(f"{tmp}/data.pt", weights_only=True)
        result = {}
        # 1. Sinkhorn codes of this rank's rows (distributed=None: auto on)
        codes = []
        for (n, k, n0), scores in zip(SINKHORN_CASES, data["sinkhorn"]):
            mine = scores[:n0] if rank == 0 else scores[n0:]
            codes.append(sinkhorn_knopp(mine, EPS, ITERS))
        result["codes"] = codes

        # 2. loss and gradients without queue
        emb, heads, _ = data["iters"][0]
        loss_fn = SwAVPluginLoss.from_config(loss_config(queue=False))
        local_heads = [local_rows(h, rank).requires_grad_() for h in heads]
        loss = loss_fn([local_rows(emb, rank)] + local_heads, None)
        result["loss"] = loss.item()
        result["grads"] = [g for g in torch.autograd.grad(loss, local_heads)]

        # 3. queue-enabled loss over several iterations
        loss_fn = SwAVPluginLoss.from_config(loss_config())
        result["local_queue_length"] = loss_fn.local_queue_length
        result["queue_run"] = run_loss(loss_fn, data["iters"][:N_ITERS], rank)
        result["queue"] = loss_fn.queue.clone()

        # 4. checkpoint: VISSL saves rank 0's loss state only
        if rank == 0:
            torch.save({"loss": loss_fn.state_dict()}, f"{tmp}/ckpt.pt")
        dist.barrier()
        state = torch.load(f"{tmp}/ckpt.pt", weights_only=True)["loss"]
        restored = SwAVPluginLoss.from_config(loss_config())
        restored.load_state_dict(state)
        result["restored_queue"] = restored.queue.clone()
        emb, heads, weights = data["iters"][N_ITERS]
        local = [local_rows(emb, rank)] + [local_rows(h, rank) for h in heads]
        for f in (loss_fn, restored):
            f.on_epoch_start(N_ITERS)
            f.set_prototypes(weights)
        result["after_continued"] = loss_fn(local, None).item()
        result["after_restored"] = restored(local, None).item()
        torch.save(result, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = make_data()
    torch.save(data, tmp / "data.pt")
    spawn(worker, tmp, preload=("torch", "swav_vissl_plugin", "reference_swav"), nprocs=WORLD, deadline_s=120)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return data, ranks


def test_sinkhorn_codes_equal_single_process(results):
    from swav_vissl_plugin.sinkhorn import sinkhorn_knopp

    data, ranks = results
    for i, scores in enumerate(data["sinkhorn"]):
        together = torch.cat([ranks[0]["codes"][i], ranks[1]["codes"][i]])
        single = sinkhorn_knopp(scores, EPS, ITERS)
        # each code relative to itself (|scores| <= 1): float32 rounding of
        # either computation against the other, of one against float64
        tol = codes_rtol(SINKHORN_CASES[i][0], SINKHORN_CASES[i][1], ITERS)
        torch.testing.assert_close(together, single, rtol=2 * tol, atol=0, msg=str(SINKHORN_CASES[i]))
        torch.testing.assert_close(together.double(), ref.sinkhorn_plain(scores, EPS, ITERS), rtol=tol, atol=0)


def test_loss_and_gradients_equal_single_process(results):
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    data, ranks = results
    emb, heads, _ = data["iters"][0]
    heads = [h.clone().requires_grad_() for h in heads]
    loss = SwAVPluginLoss.from_config(loss_config(queue=False))([emb] + heads, None)
    grads = torch.autograd.grad(loss, heads)
    # the global loss is the mean of the ranks' losses (equal halves): float32
    # rounding of the mean over heads of either loss (|scores| <= 1), scale
    # max(1, |loss|)
    batch = WORLD * HALF
    tol = max(loss_rtol(batch, k, NUM_CROPS, len(CFA), ITERS) for k in KS) + rtol(len(KS), WORLD)
    scale = max(1.0, abs(loss.item()))
    assert abs(sum(r["loss"] for r in ranks) / WORLD - loss.item()) <= 2 * tol * scale
    ref_loss = ref.loss_plain(heads, NUM_CROPS, CFA, T, EPS, ITERS)
    assert abs(loss.item() - ref_loss.item()) <= tol * scale
    for h, k in enumerate(KS):
        # either gradient's float32 rounding; the mean over heads scales it by 1 / len(KS)
        atol = 2 * grad_rtol(batch, k, NUM_CROPS, len(CFA), ITERS) * grad_scale(batch, NUM_CROPS) / len(KS)
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][h] / WORLD, local_rows(grads[h], r), rtol=0, atol=atol)


def test_queue_loss_over_iterations_equals_single_process(results):
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    data, ranks = results
    assert [r["local_queue_length"] for r in ranks] == [QUEUE_LENGTH // WORLD] * WORLD
    single_fn = SwAVPluginLoss.from_config(loss_config())
    assert single_fn.local_queue_length == QUEUE_LENGTH
    single = run_loss(single_fn, data["iters"][:N_ITERS])
    expected, _ = ref.simulate(
        data["iters"][:N_ITERS], NUM_CROPS, CFA, T, EPS, ITERS, QUEUE_LENGTH, start_iteration=1
    )
    used = [u for _, u in single]
    assert used == [False, False, False, True, True, True]
    for it in range(N_ITERS):
        dist_loss = sum(r["queue_run"][it][0] for r in ranks) / WORLD
        assert [r["queue_run"][it][1] for r in ranks] == [used[it]] * WORLD
        # float32 rounding as above; the queue (scored inside the loss with
        # DIM-term products) adds its rows and DIM / EPS to the exponents
        queue = QUEUE_LENGTH if used[it] else 0
        tol = max(loss_rtol(WORLD * HALF, k, NUM_CROPS, len(CFA), ITERS, queue=queue) for k in KS)
        tol = (tol + rtol(len(KS), WORLD, terms(DIM) / EPS if queue else 0)) * max(1.0, abs(single[it][0]))
        assert abs(dist_loss - single[it][0]) <= 2 * tol, (it, dist_loss, single[it][0])
        assert abs(single[it][0] - expected[it][0].item()) <= tol
    # each rank's queue: its own halves of the last pushed batches, newest first
    for r in range(WORLD):
        for i, c in enumerate(CFA):
            rows = [local_rows(data["iters"][it][0], r)[c * HALF:(c + 1) * HALF] for it in (5, 4)]
            torch.testing.assert_close(ranks[r]["queue"][i], torch.cat(rows), rtol=0, atol=0)


def test_rank0_checkpoint_restores_every_ranks_queue(results):
    _, ranks = results
    for r in ranks:
        # copies, then the same computation on every rank: bit-identical
        torch.testing.assert_close(r["restored_queue"], r["queue"], rtol=0, atol=0)
        assert r["after_restored"] == r["after_continued"]
