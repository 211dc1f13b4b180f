"""The VISSL loss ``swav_plugin_loss``: config, parity with the plain reference
(with and without queue), queue semantics, checkpoint state."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from classy_vision.losses import build_loss

import reference_swav as ref
from tolerances import grad_rtol, grad_scale, loss_rtol, rtol, terms
from swav_vissl_plugin.losses import swav as swav_module
from swav_vissl_plugin.losses.swav import SwAVPluginLoss

try:
    from vissl.config import AttrDict
except Exception:  # pragma: no cover - vissl is installed in the venv
    AttrDict = dict

T, EPS, ITERS = 0.1, 0.05, 3


def make_cfg(**kw):
    cfg = dict(
        name="swav_plugin_loss",
        num_crops=4,
        crops_for_assign=[0, 1],
        temperature=T,
        epsilon=EPS,
        sinkhorn_iterations=ITERS,
        nmb_prototypes=[17],
        queue_length=0,
        epoch_queue_starts=0,
        freeze_prototypes_niters=313,
        output_dir="",
    )
    cfg.update(kw)
    return cfg


def make_batch(num_crops, b, ks, d=16, seed=0, dtype=torch.float32):
    """[embeddings, scores per head] and the prototype weights, like the head."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(num_crops * b, d, generator=g), dim=1)
    weights = [F.normalize(torch.randn(k, d, generator=g), dim=1) for k in ks]
    heads = [(emb @ w.t()).to(dtype) for w in weights]
    return emb.to(dtype), heads, weights


def loss_tol(num_crops, cfa, b, ks, queue=0, dim=16):
    """Relative tolerance (scale max(1, |loss|)) of the float32 loss, the mean
    over heads of tolerances.loss_rtol (cosine scores: |s| <= 1); a queue is
    scored inside the loss in float32 (``dim``-term products, an absolute
    error dim x eps of its scores, dim / epsilon in the exponents)."""
    per_head = max(loss_rtol(b, k, num_crops, len(cfa), ITERS, queue=queue) for k in ks)
    return per_head + rtol(len(ks), terms(dim) / EPS if queue else 0)


def close(a, b, tol):
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


# -------------------------------------------------------------------- config
def test_registered_and_built_from_vissl_style_config():
    loss = build_loss(AttrDict(make_cfg(unknown_extra_key=1)))
    assert isinstance(loss, SwAVPluginLoss)
    assert loss.num_crops == 4 and loss.crops_for_assign == [0, 1]
    assert (loss.temperature, loss.epsilon, loss.sinkhorn_iterations) == (T, EPS, ITERS)
    assert loss.nmb_prototypes == [17] and loss.local_queue_length == 0
    text = repr(loss)
    for part in ("swav_plugin_loss", "'epsilon': 0.05", "'num_crops': 4", "'sinkhorn_iterations': 3"):
        assert part in text


def test_defaults_are_the_recipe():
    loss = SwAVPluginLoss.from_config({"num_crops": 8})
    assert loss.crops_for_assign == [0, 1]
    assert (loss.temperature, loss.epsilon, loss.sinkhorn_iterations) == (0.1, 0.05, 3)
    assert loss.local_queue_length == 0
    assert SwAVPluginLoss.from_config({"num_crops": 8, "nmb_prototypes": 3000}).nmb_prototypes == [3000]


@pytest.mark.parametrize(
    "key,value",
    [
        ("epsilon", 0),
        ("epsilon", -0.05),
        ("temperature", 0.0),
        ("sinkhorn_iterations", 0),
        ("crops_for_assign", []),
        ("crops_for_assign", [0, 4]),
        ("crops_for_assign", [-1]),
        ("num_crops", 1),
        ("nmb_prototypes", []),
        ("nmb_prototypes", [3000, 0]),
        ("nmb_prototypes", -5),
        ("queue_length", -1),
        ("local_queue_length", -2),
    ],
)
def test_invalid_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"LOSS\.swav_plugin_loss\.{key}\b"):
        SwAVPluginLoss.from_config(make_cfg(**{key: value}))


def test_invalid_epsilon_message():
    with pytest.raises(ValueError, match=r"^LOSS\.swav_plugin_loss\.epsilon must be > 0, got 0$"):
        SwAVPluginLoss.from_config(make_cfg(epsilon=0))


def test_local_queue_length_inferred(monkeypatch):
    cfg = make_cfg(queue_length=3900, global_batch_size=256, local_queue_length=None)
    assert SwAVPluginLoss.from_config(cfg).local_queue_length == 3840  # trimmed, 1 rank
    assert SwAVPluginLoss.from_config(make_cfg(queue_length=3840)).local_queue_length == 3840
    monkeypatch.setattr(swav_module, "_world", lambda: (0, 4))
    assert SwAVPluginLoss.from_config(cfg).local_queue_length == 960
    # given explicitly (config inference elsewhere): used as is
    assert SwAVPluginLoss.from_config(make_cfg(queue_length=3840, local_queue_length=7)).local_queue_length == 7
    assert SwAVPluginLoss.from_config(make_cfg(queue_length=100, global_batch_size=256)).local_queue_length == 0


# ------------------------------------------------------------ forward, no queue
@pytest.mark.parametrize("num_crops,cfa", [(2, [0, 1]), (2, [0]), (8, [0, 1]), (8, [1, 3])])
@pytest.mark.parametrize("b,ks", [(1, [17]), (3, [101]), (7, [17, 101]), (33, [17, 3000])])
def test_forward_matches_reference(num_crops, cfa, b, ks):
    loss_fn = SwAVPluginLoss.from_config(
        make_cfg(num_crops=num_crops, crops_for_assign=cfa, nmb_prototypes=ks)
    )
    emb, heads, _ = make_batch(num_crops, b, ks, seed=b * 7 + num_crops)
    heads = [h.requires_grad_() for h in heads]
    loss = loss_fn([emb] + heads, None)
    grads = torch.autograd.grad(loss, heads)
    heads_ref = [h.detach().double().requires_grad_() for h in heads]
    loss_ref = ref.loss_plain(heads_ref, num_crops, cfa, T, EPS, ITERS)
    grads_ref = torch.autograd.grad(loss_ref, heads_ref)
    assert loss.dtype == torch.float32
    assert close(loss, loss_ref, loss_tol(num_crops, cfa, b, ks)), (loss.item(), loss_ref.item())
    for k, g, g_ref in zip(ks, grads, grads_ref):
        # the mean over heads scales each head's gradient by 1 / len(ks)
        atol = grad_rtol(b, k, num_crops, len(cfa), ITERS) * grad_scale(b, num_crops) / len(ks)
        torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=atol)
    assert loss_fn.last_stats["queue_in_use"] is False
    assert len(loss_fn.last_stats["code_entropy"]) == len(ks)


def test_output_wrapped_in_a_list_and_half_scores():
    loss_fn = SwAVPluginLoss.from_config(make_cfg(nmb_prototypes=[17, 101]))
    emb, heads, _ = make_batch(4, 5, [17, 101], seed=3, dtype=torch.float16)
    a = loss_fn([[emb] + heads], None)
    b = loss_fn([emb] + heads, None)
    assert a.dtype == torch.float32 and torch.isfinite(a)
    assert torch.equal(a, b)  # the same computation on the same inputs: bit-identical
    # float32 from the (exactly upcast) half scores
    assert close(a, ref.loss_plain(heads, 4, [0, 1], T, EPS, ITERS), loss_tol(4, [0, 1], 5, [17, 101]))


def test_shape_mismatches_raise():
    loss_fn = SwAVPluginLoss.from_config(make_cfg(nmb_prototypes=[17]))
    emb, heads, _ = make_batch(4, 3, [17, 17])
    with pytest.raises(ValueError, match="nmb_prototypes"):
        loss_fn([emb] + heads, None)
    with pytest.raises(ValueError, match="num_crops"):
        loss_fn([emb[:-1], heads[0][:-1]], None)
    with pytest.raises(ValueError):
        loss_fn([emb], None)


# ------------------------------------------------------------------ queue
def run_queue_case(num_crops, cfa, b, ks, queue_len, n_iters, start_epoch=1, seed=0):
    """Loss class vs the plain simulation, iteration by iteration; epoch 0 has
    one iteration without queue, the queue starts at epoch ``start_epoch``."""
    loss_fn = SwAVPluginLoss.from_config(
        make_cfg(
            num_crops=num_crops,
            crops_for_assign=cfa,
            nmb_prototypes=ks,
            queue_length=queue_len,
            epoch_queue_starts=start_epoch,
        )
    )
    data = [make_batch(num_crops, b, ks, seed=seed * 100 + it) for it in range(n_iters)]
    expected, sim = ref.simulate(data, num_crops, cfa, T, EPS, ITERS, queue_len, start_iteration=1)
    used_flags = []
    for it, (emb, heads, weights) in enumerate(data):
        if it <= 1:
            loss_fn.on_epoch_start(it)  # epoch 0, then epoch 1 from the 2nd iteration
        loss_fn.set_prototypes(weights)  # new prototypes every iteration
        loss = loss_fn([emb] + heads, None)
        loss_ref, used = expected[it]
        used_flags.append(loss_fn.last_stats["queue_in_use"])
        assert used_flags[-1] == used, (it, used_flags)
        tol = loss_tol(num_crops, cfa, b, ks, queue=queue_len if used else 0)
        assert close(loss, loss_ref, tol), (it, loss.item(), loss_ref.item())
        if it == 0:
            assert loss_fn.queue is None  # not before epoch_queue_starts
    return loss_fn, sim, data, used_flags


@pytest.mark.parametrize(
    "num_crops,cfa,b,ks,queue_len",
    [
        (2, [0, 1], 3, [17], 9),  # fills in exactly 3 pushes
        (4, [0], 1, [101], 4),
        (8, [1, 3], 7, [17, 101], 14),
        (4, [0, 1], 3, [3000], 5),  # not a multiple of B: partial last push
        (4, [0, 1], 5, [17], 3),  # B larger than the queue
    ],
)
def test_queue_matches_reference_simulation(num_crops, cfa, b, ks, queue_len):
    n_iters = 2 + -(-queue_len // b) + 2
    loss_fn, sim, data, used = run_queue_case(num_crops, cfa, b, ks, queue_len, n_iters)
    fills = -(-queue_len // b)
    # unused on iteration 0 (no queue) and while filling, used once full
    assert used == [False] * (1 + fills) + [True] * (n_iters - 1 - fills)
    # the queue holds the last pushed embeddings, newest first
    queue = loss_fn.queue
    assert queue.shape == (len(cfa), queue_len, data[0][0].shape[1]) and queue.dtype == torch.float32
    torch.testing.assert_close(queue.double(), sim.as_tensor(queue.shape[2]), rtol=0, atol=0)  # copies
    last_emb = data[-1][0]
    for i, c in enumerate(cfa):
        n = min(b, queue_len)
        assert torch.equal(queue[i, :n], last_emb[c * b:c * b + n])  # copies
    assert loss_fn.queue_filled == queue_len


def test_queue_exists_only_from_epoch_queue_starts_and_is_never_recreated():
    loss_fn = SwAVPluginLoss.from_config(make_cfg(queue_length=6, epoch_queue_starts=2))
    emb, heads, w = make_batch(4, 3, [17], seed=1)
    loss_fn.on_epoch_start(0)
    loss_fn.on_epoch_start(1)
    loss_fn([emb] + heads, None)
    assert loss_fn.queue is None and loss_fn.last_stats["queue_filled"] == 0
    loss_fn.on_epoch_start(2)
    loss_fn([emb] + heads, None)
    q = loss_fn.queue
    assert q is not None and loss_fn.queue_filled == 3
    assert torch.count_nonzero(q[:, 3:]) == 0  # created as zeros, front filled
    loss_fn.on_epoch_start(3)
    assert loss_fn.queue is not None and loss_fn.queue_filled == 3
    assert torch.equal(loss_fn.queue, q)  # kept as it was


def test_no_queue_when_length_zero():
    loss_fn = SwAVPluginLoss.from_config(make_cfg(queue_length=0))
    loss_fn.on_epoch_start(100)
    emb, heads, _ = make_batch(4, 3, [17])
    loss_fn([emb] + heads, None)
    assert loss_fn.queue is None


def test_full_queue_without_prototypes_raises():
    loss_fn = SwAVPluginLoss.from_config(make_cfg(queue_length=3))
    loss_fn.on_epoch_start(0)
    emb, heads, _ = make_batch(4, 3, [17])
    loss_fn([emb] + heads, None)  # fills it
    with pytest.raises(RuntimeError, match="set_prototypes"):
        loss_fn([emb] + heads, None)


def test_queue_uses_the_current_prototypes():
    loss_fn = SwAVPluginLoss.from_config(make_cfg(queue_length=3))
    loss_fn.on_epoch_start(0)
    emb, heads, w = make_batch(4, 3, [17], seed=2)
    loss_fn.set_prototypes(w)
    loss_fn([emb] + heads, None)  # fills the queue
    state = copy.deepcopy(loss_fn.state_dict())
    a = loss_fn([emb] + heads, None)
    loss_fn.load_state_dict(state)
    w[0].mul_(-1)  # the head changes its weights in place: the loss must see it
    b = loss_fn([emb] + heads, None)
    assert not close(a, b, 2 * loss_tol(4, [0, 1], 3, [17], queue=3))  # more than both losses' rounding
    loss_fn.load_state_dict(state)
    w[0].mul_(-1)
    assert torch.equal(loss_fn([emb] + heads, None), a)  # the same state and inputs: bit-identical


# ------------------------------------------------------------------ state
def test_state_round_trip_weights_only(tmp_path):
    cfg = make_cfg(queue_length=6, nmb_prototypes=[17, 101])
    loss_fn = SwAVPluginLoss.from_config(cfg)
    loss_fn.on_epoch_start(0)
    data = [make_batch(4, 3, [17, 101], seed=s) for s in range(5)]
    for emb, heads, w in data[:3]:
        loss_fn.set_prototypes(w)
        loss_fn([emb] + heads, None)
    path = tmp_path / "loss.pth"
    torch.save({"loss": loss_fn.state_dict()}, path)
    state = torch.load(path, weights_only=True)["loss"]
    assert set(state) == {"queue", "queue_filled"} and state["queue_filled"] == 6

    fresh = SwAVPluginLoss.from_config(cfg)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.queue, loss_fn.queue, rtol=0, atol=0)
    assert fresh.queue_filled == 6
    for emb, heads, w in data[3:]:
        for f in (loss_fn, fresh):
            f.set_prototypes(w)
        # the restored queue is a copy: the same computation, bit-identical
        assert torch.equal(loss_fn([emb] + heads, None), fresh([emb] + heads, None))
        assert fresh.last_stats["queue_in_use"]
    # resume flow: on_epoch_start after loading keeps the loaded queue
    fresh.on_epoch_start(5)
    torch.testing.assert_close(fresh.queue, loss_fn.queue, rtol=0, atol=0)


def test_state_without_queue_and_vice_versa(tmp_path):
    cfg = make_cfg(queue_length=6)
    no_queue = SwAVPluginLoss.from_config(cfg)
    state_none = no_queue.state_dict()
    assert state_none["queue"] is None and state_none["queue_filled"] == 0
    torch.save(state_none, tmp_path / "none.pth")
    state_none = torch.load(tmp_path / "none.pth", weights_only=True)

    with_queue = SwAVPluginLoss.from_config(cfg)
    with_queue.on_epoch_start(0)
    emb, heads, w = make_batch(4, 3, [17])
    with_queue([emb] + heads, None)
    state_q = with_queue.state_dict()

    with_queue.load_state_dict(state_none)  # queue -> absent
    assert with_queue.queue is None and with_queue.queue_filled == 0
    no_queue.load_state_dict(state_q)  # absent -> queue
    assert no_queue.queue is not None and no_queue.queue_filled == 3
    no_queue.load_state_dict({})  # nothing at all: absent
    assert no_queue.queue is None


def test_state_unknown_key_strict_and_shape_mismatch(caplog):
    cfg = make_cfg(queue_length=6)
    loss_fn = SwAVPluginLoss.from_config(cfg)
    with pytest.raises(RuntimeError, match="bogus"):
        loss_fn.load_state_dict({"queue": None, "queue_filled": 0, "bogus": 1})
    # a queue of another length: its 4 rows kept in front, counted as filled,
    # the rest empty, so it is used once full (tests/test_world_size.py)
    with caplog.at_level(logging.INFO):
        loss_fn.load_state_dict({"queue": torch.ones(1, 2, 4, 16), "queue_filled": 4})
    assert "queue resized" in caplog.text
    assert loss_fn.queue.shape == (2, 6, 16) and loss_fn.queue_filled == 4 and not loss_fn.queue_full
    assert torch.equal(loss_fn.queue[:, :4], torch.ones(2, 4, 16))
    assert torch.count_nonzero(loss_fn.queue[:, 4:]) == 0
