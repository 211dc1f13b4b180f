"""SwAV warmup + cosine learning-rate schedule vs an independent reference.

Reference, written from the recipe text (docs/recipe.md, "lr schedule" row: "per
iteration: linear warmup from start_warmup to base_lr over warmup_epochs (numpy
linspace, endpoints included), then cosine from base_lr to final_lr over the
remaining epochs"), as the SwAV release computes it:

    W = iterations_per_epoch * warmup_epochs
    warmup[i] = start_warmup + i * (base_lr - start_warmup) / (W - 1), last = base_lr
    T = iterations_per_epoch * (epochs - warmup_epochs)
    cosine[t] = final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * t / T))
    schedule = warmup ++ cosine

with a hand-written linspace and math.cos, one value at a time.
"""

import math
import os
import random

import pytest

import swav_vissl_plugin  # noqa: F401  (registration)
from swav_vissl_plugin.optim import (
    SwavWarmupCosineParamScheduler,
    scale_lr,
    set_schedulers_iterations_per_epoch,
    warmup_cosine_lr,
)

from classy_vision.optim import build_optimizer_schedulers
from classy_vision.optim.param_scheduler import (
    PARAM_SCHEDULER_REGISTRY,
    UpdateInterval,
    build_param_scheduler,
)
from tolerances import EPS64, rtol


def ref_lr(i, base_lr, final_lr, epochs, n, warmup_epochs, start_warmup):
    """The schedule's value at iteration i (independent of optim.py)."""
    W = n * warmup_epochs
    if i < W:
        if W == 1:
            return start_warmup
        if i == W - 1:
            return base_lr
        return start_warmup + i * ((base_lr - start_warmup) / (W - 1))
    T = n * (epochs - warmup_epochs)
    t = i - W
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / T))


# float64, relative: ~20 roundings (linspace or the cosine, on either side,
# math.cos within 1 ulp) and the cancellation in 1 + cos(pi t / T) at the end
# of the schedule, which scales an absolute error by up to base_lr / final_lr
# (1000 in the recipe) relative to the value
REL = rtol(20, 1000, eps=EPS64)


def assert_close(a, b, rel=REL, what=""):
    assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-300), f"{what}: {a} != {b}"


SMALL = [
    # (base_lr, final_lr, epochs, n, warmup_epochs, start_warmup)
    (0.8, 0.008, 4, 5, 1, 0.1),
    (0.6, 0.0006, 5, 7, 0, 0.0),   # no warmup
    (4.8, 0.0048, 4, 1, 2, 0.3),
    (1.0, 0.0, 3, 1, 1, 0.0),      # a 1-iteration warmup: linspace of 1 point
    (2.0, 0.5, 6, 3, 5, 0.2),
]


@pytest.mark.parametrize("args", SMALL)
def test_array_matches_reference_everywhere(args):
    base_lr, final_lr, epochs, n, warmup_epochs, start_warmup = args
    arr = warmup_cosine_lr(base_lr, final_lr, epochs, n, warmup_epochs, start_warmup)
    assert arr.shape == (epochs * n,)
    for i in range(epochs * n):
        assert_close(float(arr[i]), ref_lr(i, *args), what=f"iteration {i}")
    if warmup_epochs:
        assert arr[0] == start_warmup
    if n * warmup_epochs > 1:
        assert arr[n * warmup_epochs - 1] == base_lr  # endpoint included
    assert arr[n * warmup_epochs] == base_lr  # cosine starts at base_lr


@pytest.mark.parametrize(
    "args",
    [
        (4.8, 0.0048, 800, 313, 10, 0.3),  # rows 1-4, 7: 800 epochs x 313 it
        (4.8, 0.0048, 100, 313, 10, 0.3),
        (0.6, 0.0006, 200, 5005, 0, 0.0),  # row 5: bs 256, no warmup
    ],
)
def test_recipe_rows_sampled(args):
    base_lr, final_lr, epochs, n, warmup_epochs, start_warmup = args
    arr = warmup_cosine_lr(*args)
    total = epochs * n
    assert len(arr) == total
    W = n * warmup_epochs
    rng = random.Random(0)
    idx = {0, 1, total - 1, total // 2, max(W - 1, 0), W, W + 1}
    idx |= {rng.randrange(total) for _ in range(200)}
    for i in sorted(idx):
        assert_close(float(arr[i]), ref_lr(i, *args), what=f"iteration {i}")
    assert arr[-1] > final_lr and arr[-1] - final_lr < 1e-4 * base_lr


def test_registered():
    assert PARAM_SCHEDULER_REGISTRY["swav_plugin_warmup_cosine"] is SwavWarmupCosineParamScheduler


def vissl_optimizer_config(lr_overrides, num_epochs):
    """VISSL's defaults.yaml + our lr config, through VISSL's own inference."""
    import vissl.config
    from omegaconf import OmegaConf
    from vissl.utils.hydra_config import convert_to_attrdict

    base = OmegaConf.load(os.path.join(os.path.dirname(vissl.config.__file__), "defaults.yaml"))
    for k in ("defaults", "hydra"):
        base.pop(k, None)
    ov = {"config": {"OPTIMIZER": {
        "name": "swav_plugin_larc",
        "num_epochs": num_epochs,
        "param_schedulers": {"lr": lr_overrides},
    }}}
    _, config = convert_to_attrdict(OmegaConf.merge(base, OmegaConf.create(ov)), dump_config=False)
    return config.OPTIMIZER


LR_CFG = {
    "name": "swav_plugin_warmup_cosine",
    "update_interval": "step",
    "base_lr": 0.8,
    "final_lr": 0.008,
    "warmup_epochs": 1,
    "start_warmup": 0.1,
    "auto_lr_scaling": {"auto_scale": False},
}


def test_vissl_inference_keeps_config_and_scheduler_equals_array():
    epochs, n = 4, 5
    opt_cfg = vissl_optimizer_config(LR_CFG, epochs)
    lr = opt_cfg.param_schedulers.lr
    # VISSL's infer_learning_rate left our keys alone and copied lr to lr_head
    for k in ("name", "update_interval", "base_lr", "final_lr", "warmup_epochs", "start_warmup"):
        assert lr[k] == LR_CFG[k], k
    assert opt_cfg.param_schedulers.lr_head == lr

    scheds = build_optimizer_schedulers(opt_cfg)
    assert set(scheds) == {"lr", "lr_head"}
    for s in scheds.values():
        assert isinstance(s, SwavWarmupCosineParamScheduler)
        assert s.update_interval == UpdateInterval.STEP
        assert s.num_epochs == epochs
    assert set_schedulers_iterations_per_epoch(scheds, n) == 2
    arr = warmup_cosine_lr(0.8, 0.008, epochs, n, 1, 0.1)
    total = epochs * n
    global_batch = 4096
    for i in range(total):
        # ClassyVision's task.where: (num_updates / global_batch) / num_steps
        where = (i * global_batch / global_batch) / total
        for s in scheds.values():
            assert s(where) == arr[i], i
        assert scheds["lr"](i / total) == arr[i]
        assert_close(scheds["lr"](where), ref_lr(i, 0.8, 0.008, epochs, n, 1, 0.1), what=str(i))


def test_continuous_fallback_before_iterations_known():
    s = build_param_scheduler(dict(LR_CFG, num_epochs=4))
    assert s.lr_schedule is None
    assert s(0.0) == 0.1                       # start_warmup
    assert_close(s(0.125), 0.1 + 0.7 * 0.5)    # half-way through the 1-epoch warmup
    assert_close(s(0.25), 0.8)                 # warmup end == cosine start
    assert_close(s(0.625), 0.008 + 0.5 * 0.792)  # cosine mid-point
    assert abs(s(0.999999) - 0.008) < 1e-9
    # it approximates the per-iteration array
    n = 50
    arr = warmup_cosine_lr(0.8, 0.008, 4, n, 1, 0.1)
    assert max(abs(s(i / (4 * n)) - arr[i]) for i in range(4 * n)) < 0.02
    s.set_iterations_per_epoch(n)
    assert all(s(i / (4 * n)) == arr[i] for i in range(4 * n))


def test_where_rounding_and_clamping():
    s = build_param_scheduler(dict(LR_CFG, num_epochs=4))
    s.set_iterations_per_epoch(5)
    arr = warmup_cosine_lr(0.8, 0.008, 4, 5, 1, 0.1)
    assert s(3 / 20 - 1e-12) == arr[3] and s(3 / 20 + 1e-12) == arr[3]
    assert s(0.9999999) == arr[-1]


def test_scale_lr():
    assert scale_lr(0.3, 4096) == 4.8
    assert scale_lr(0.3, 256) == 0.3
    assert scale_lr(4.8, 256, reference_batch_size=4096) == 0.3
    assert scale_lr(0.6, 128) == 0.3
    with pytest.raises(ValueError, match="global_batch_size"):
        scale_lr(0.3, 0)


def _build(**over):
    cfg = dict(LR_CFG, num_epochs=10)
    cfg.update(over)
    return build_param_scheduler(cfg)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"warmup_epochs": 12}, r"OPTIMIZER\.param_schedulers\.lr\.warmup_epochs \(12\) must be < num_epochs \(10\)"),
        ({"warmup_epochs": 10}, r"param_schedulers\.lr\.warmup_epochs"),
        ({"warmup_epochs": -1}, r"param_schedulers\.lr\.warmup_epochs"),
        ({"warmup_epochs": 1.5}, r"param_schedulers\.lr\.warmup_epochs"),
        ({"base_lr": -0.1}, r"param_schedulers\.lr\.base_lr"),
        ({"final_lr": -1e-3}, r"param_schedulers\.lr\.final_lr"),
        ({"start_warmup": -0.3}, r"param_schedulers\.lr\.start_warmup"),
        ({"base_lr": "fast"}, r"param_schedulers\.lr\.base_lr"),
        ({"base_lr": None}, r"param_schedulers\.lr\.base_lr"),
        ({"final_lr": None}, r"param_schedulers\.lr\.final_lr"),
        ({"update_interval": "epoch"}, r"param_schedulers\.lr\.update_interval"),
        ({"num_epochs": 0}, r"OPTIMIZER\.num_epochs"),
    ],
)
def test_validation_errors_name_the_key(over, key):
    with pytest.raises(ValueError, match=key):
        _build(**over)


def test_set_iterations_per_epoch_validation():
    s = _build()
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        s.set_iterations_per_epoch(0)


def test_iterations_per_epoch_can_change():
    s = _build()
    s.set_iterations_per_epoch(5)
    s.set_iterations_per_epoch(7)
    arr = warmup_cosine_lr(0.8, 0.008, 10, 7, 1, 0.1)
    assert s.iterations_per_epoch == 7 and len(s.lr_schedule) == 70
    assert all(s(i / 70) == arr[i] for i in range(70))
