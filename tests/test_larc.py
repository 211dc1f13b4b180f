"""LARC optimizer ``swav_plugin_larc`` vs an independent reference.

Reference, written from the recipe text (docs/recipe.md, "optimizer" row: "SGD
momentum 0.9 wrapped by LARC: trust_coefficient 0.001, clip False, eps 1e-8";
"wd" row: "1e-6 (applied to every parameter, biases and BN included)"), in the
Apex LARC formulation the SwAV release used. Per parameter w with gradient g
(parameters whose gradient is None are skipped entirely), wd = its group's
weight decay, lr = its group's lr:

    if ||w|| != 0 and ||g|| != 0:
        a = trust * ||w|| / (||g|| + wd * ||w|| + eps)
        if clip: a = min(a / lr, 1)
        g = (g + wd * w) * a            # weight decay folded in before scaling
    (otherwise g is used as is, without weight decay)
    buf = g                    on the parameter's first update
    buf = momentum * buf + g   afterwards (dampening 0)
    w = w - lr * buf           (nesterov: w = w - lr * (g + momentum * buf))

Everything below is a Python loop in float64 with a hand-written SGD, no
torch.optim.
"""

import io
import math
import os

import pytest
import torch
import torch.nn as nn

import swav_vissl_plugin  # noqa: F401  (registration)
from swav_vissl_plugin.optim import (
    LARC,
    SwavPluginLARC,
    set_schedulers_iterations_per_epoch,
    warmup_cosine_lr,
)

from classy_vision.optim import (
    OPTIMIZER_REGISTRY,
    build_optimizer,
    build_optimizer_schedulers,
)
from classy_vision.optim.param_scheduler import ParamScheduler, UpdateInterval
from tolerances import EPS32, EPS64, rtol, terms

TRUST, EPS, MOMENTUM = 0.001, 1e-8, 0.9

# lrs taken from the SwAV schedule (2 "epochs" of 3 iterations, 1 warmup from 0.3)
LRS = [float(x) for x in warmup_cosine_lr(4.8, 0.0048, 3, 2, 1, 0.3)]


# --------------------------------------------------------------------------- #
# independent reference
# --------------------------------------------------------------------------- #
def _norm(t):
    return math.sqrt(sum(float(v) ** 2 for v in t.reshape(-1).tolist()))


def reference_run(init, groups, grads, lrs, momentum=MOMENTUM, nesterov=False,
                  trust=TRUST, eps=EPS, clip=False, bufs=None, start=0):
    """init: name -> tensor; groups: [(names, wd)]; grads[step][name] or None."""
    w = {k: v.detach().clone().double() for k, v in init.items()}
    bufs = {} if bufs is None else {k: v.clone() for k, v in bufs.items()}
    for step in range(start, len(lrs)):
        lr = lrs[step]
        for names, wd in groups:
            for n in names:
                g = grads[step][n]
                if g is None:
                    continue
                g = g.detach().clone().double()
                pn, gn = _norm(w[n]), _norm(g)
                if pn != 0 and gn != 0:
                    a = trust * pn / (gn + wd * pn + eps)
                    if clip:
                        a = min(a / lr, 1.0)
                    g = (g + wd * w[n]) * a
                if n not in bufs:
                    bufs[n] = g.clone()
                else:
                    bufs[n] = momentum * bufs[n] + g
                d = g + momentum * bufs[n] if nesterov else bufs[n]
                w[n] = w[n] - lr * d
    return w, bufs


# --------------------------------------------------------------------------- #
# test problem
# --------------------------------------------------------------------------- #
SHAPES = {
    "conv_w": (8, 4, 3, 3),
    "linear_w": (10, 7),
    "linear_b": (10,),
    "zero_w": (5,),          # ||w|| == 0 at the first step
    "prototypes": (6, 4),    # grad None for the first 2 steps (frozen)
    "bn_w": (16,),
    "bn_b": (16,),
    "zero_grad": (3, 3),     # ||g|| == 0 always: no LARC, no weight decay
    "tiny_grad": (4,),       # ||g|| ~ 1e-8: eps matters; clip saturates at 1
}
# group weight decays: the recipe's 1e-6, a large one (so that where weight
# decay is applied is visible), and 0 (VISSL's unregularized group).
GROUPS = [
    (["conv_w", "linear_w", "linear_b", "zero_w", "prototypes"], 1e-6),
    (["bn_w", "bn_b", "zero_grad"], 0.05),
    (["tiny_grad"], 0.0),
    ([], 0.0),  # VISSL may hand over an empty group
]


def make_problem(steps=len(LRS), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    init = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
    init["zero_w"].zero_()
    init["bn_w"] = 1.0 + 0.1 * init["bn_w"]
    grads = []
    for step in range(steps):
        g = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
        g["zero_grad"].zero_()
        g["tiny_grad"] *= 1e-8 / _norm(g["tiny_grad"])
        if step < 2:
            g["prototypes"] = None
        grads.append(g)
    init = {k: v.to(dtype) for k, v in init.items()}
    grads = [{k: (None if v is None else v.to(dtype)) for k, v in g.items()} for g in grads]
    return init, grads


class ListScheduler(ParamScheduler):
    """Returns lrs[i] at where = i / len(lrs) (a stand-in, independent of optim.py)."""

    def __init__(self, lrs):
        self.lrs = list(lrs)
        self.update_interval = UpdateInterval.STEP

    def __call__(self, where):
        return self.lrs[min(int(round(where * len(self.lrs))), len(self.lrs) - 1)]


def make_optimizer(params, lrs=LRS, clip=False, foreach=True, nesterov=False, fused_sgd=True):
    opt = build_optimizer({
        "name": "swav_plugin_larc",
        "use_larc": False,
        "momentum": MOMENTUM,
        "nesterov": nesterov,
        "weight_decay": 1e-6,
        "larc_config": {"clip": clip, "eps": EPS, "trust_coefficient": TRUST, "foreach": foreach,
                        "fused_sgd": fused_sgd},
    })
    sched = ListScheduler(lrs)
    opt.set_param_groups([
        {"params": [params[n] for n in names], "lr": sched, "weight_decay": wd}
        for names, wd in GROUPS
    ])
    return opt


def run_ours(opt, params, grads, lrs, start=0, stop=None):
    stop = len(lrs) if stop is None else stop
    for step in range(start, stop):
        for n, p in params.items():
            g = grads[step][n]
            p.grad = None if g is None else g.clone()
        opt.step(where=step / len(lrs))


def as_params(init):
    return {n: nn.Parameter(v.clone()) for n, v in init.items()}


def larc_rtol(eps):
    """Error of a parameter after the len(LRS) steps, relative to its scale
    (max |w|), in the precision of ``eps``. Per step: the update w - lr buf
    rounds once; the momentum's multiply-add and lr x buf three times, on a
    step that may be the parameter's whole value (zero_w's first, plain
    step); LARC's factor trust ||w|| / (||g|| + wd ||w|| + eps) carries its
    norms' error (terms(288), the largest parameter, and ~10 roundings) into
    a step of at most trust x lr x ||w||."""
    return len(LRS) * rtol(1 + 3 + TRUST * max(LRS) * (terms(288) + 10), eps=eps)


def assert_matches(params, ref, tol=2 * larc_rtol(EPS64)):
    """Each parameter within ``tol`` x its scale of the reference (default:
    float64 against the float64 reference, either side's rounding)."""
    for n, p in params.items():
        scale = float(ref[n].abs().max())
        torch.testing.assert_close(p.detach().double(), ref[n], rtol=0, atol=tol * scale, msg=n)


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
def test_registered():
    assert OPTIMIZER_REGISTRY["swav_plugin_larc"] is SwavPluginLARC


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(clip, foreach):
    init, grads = make_problem()
    params = as_params(init)
    opt = make_optimizer(params, clip=clip, foreach=foreach)
    assert isinstance(opt.optimizer, LARC)
    run_ours(opt, params, grads, LRS)
    ref, _ = reference_run(init, GROUPS, grads, LRS, clip=clip)
    assert_matches(params, ref)
    # frozen-then-trained prototypes moved only after their grads appeared
    assert not torch.equal(params["prototypes"].detach(), init["prototypes"])
    # ||g|| == 0: neither LARC nor weight decay touched it
    assert torch.equal(params["zero_grad"].detach(), init["zero_grad"])
    # weight decay restored in the param groups after the step
    assert [g["weight_decay"] for g in opt.param_groups] == [wd for _, wd in GROUPS]


def test_nesterov_matches_reference():
    init, grads = make_problem(seed=1)
    params = as_params(init)
    opt = make_optimizer(params, nesterov=True)
    run_ours(opt, params, grads, LRS)
    ref, _ = reference_run(init, GROUPS, grads, LRS, nesterov=True)
    assert_matches(params, ref)


def test_foreach_identical_to_loop_fp32_without_fused_sgd():
    # The multi-tensor gradient rewrite followed by torch's SGD rounds exactly
    # like the per-parameter loop.
    init, grads = make_problem(seed=2, dtype=torch.float32)
    out = []
    for foreach in (True, False):
        params = as_params(init)
        opt = make_optimizer(params, foreach=foreach, fused_sgd=False)
        run_ours(opt, params, grads, LRS)
        out.append(params)
    for n in SHAPES:
        assert torch.equal(out[0][n], out[1][n]), n
    ref, _ = reference_run(init, GROUPS, grads, LRS)
    assert_matches(out[0], ref, larc_rtol(EPS32))


def test_fused_larc_sgd_step_fp32_matches_reference_and_loop():
    """The recipe's setting (foreach, fused SGD, CPU, float32) runs LARC and
    the momentum update as one fused kernel per parameter. Against the
    float64 reference: within the float32 rounding of 6 steps relative to
    the parameter's scale (larc_rtol, ~3e-6; about 3e-7 seen). Against the
    per-parameter loop in float32: within 2 ulp per step (the fused kernel
    may use one multiply-add where the loop rounds twice). ``p.grad`` is
    left as the backward wrote it."""
    init, grads = make_problem(seed=2, dtype=torch.float32)
    out = []
    for foreach in (True, False):
        params = as_params(init)
        opt = make_optimizer(params, foreach=foreach)
        assert opt.optimizer.optim.param_groups[0]["fused"]
        run_ours(opt, params, grads, LRS)
        out.append(params)
        if foreach:
            for n, p in params.items():
                if grads[-1][n] is not None:
                    assert torch.equal(p.grad, grads[-1][n]), n
    ref, _ = reference_run(init, GROUPS, grads, LRS)
    for n in SHAPES:
        r = ref[n].float()
        scale = r.abs().max().clamp_min(1e-30)
        # (+1: the reference rounded to float32)
        assert float((out[0][n].detach() - r).abs().max() / scale) <= larc_rtol(EPS32) + rtol(1), n
        ulp = EPS32 * scale
        assert float((out[0][n] - out[1][n]).abs().max()) <= 2 * len(LRS) * ulp, n
    assert_matches(out[0], ref, larc_rtol(EPS32))


def test_fused_larc_sgd_step_tiny_factor_falls_back_exactly():
    # a = trust * ||w|| / ||g|| ~ 1e-12: 1 - (1 - a) != a in double, so the
    # factor cannot go through the kernel's dampening; that parameter's
    # gradient is rewritten first. Its update must still be LARC's (float64,
    # to the reference's rounding).
    gen = torch.Generator().manual_seed(11)
    init = {"small": 1e-4 * torch.randn(6, 5, generator=gen, dtype=torch.float64),
            "normal": torch.randn(7, generator=gen, dtype=torch.float64)}
    steps = [{"small": 1e5 * torch.randn(6, 5, generator=gen, dtype=torch.float64),
              "normal": torch.randn(7, generator=gen, dtype=torch.float64)} for _ in LRS]
    params = as_params(init)
    opt = build_optimizer({"name": "swav_plugin_larc", "weight_decay": 1e-6})
    opt.set_param_groups([{"params": [params["small"], params["normal"]],
                           "lr": ListScheduler(LRS), "weight_decay": 1e-6}])
    run_ours(opt, params, steps, LRS)
    ref, _ = reference_run(init, [(["small", "normal"], 1e-6)], steps, LRS)
    assert not torch.equal(params["small"].detach(), init["small"])
    assert_matches(params, ref)


def test_state_roundtrip_keeps_momentum():
    init, grads = make_problem(seed=3)
    params = as_params(init)
    opt = make_optimizer(params)
    run_ours(opt, params, grads, LRS, stop=3)
    buf = io.BytesIO()
    torch.save(opt.get_classy_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    assert any("momentum_buffer" in s for s in state["optim"]["state"].values())

    params2 = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt2 = make_optimizer(params2)
    opt2.set_classy_state(state)
    run_ours(opt, params, grads, LRS, start=3)
    run_ours(opt2, params2, grads, LRS, start=3)
    for n in SHAPES:  # the restored state continues the same computation: bit-identical
        assert torch.equal(params[n], params2[n]), n
    ref, _ = reference_run(init, GROUPS, grads, LRS)
    assert_matches(params2, ref)

    # without the restored momentum the continuation differs
    params3 = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    fresh = make_optimizer(params3)
    _, bufs = reference_run(init, GROUPS, grads, LRS[:3])
    assert bufs  # the reference did build momentum
    run_ours(fresh, params3, grads, LRS, start=3)
    assert not torch.equal(params3["conv_w"], params2["conv_w"])


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable: {e}")


def test_grad_scaler_step_equals_unscaled():
    init, grads = make_problem(seed=4, dtype=torch.float32)
    # unscaled
    p_a = as_params(init)
    opt_a = make_optimizer(p_a)
    run_ours(opt_a, p_a, grads, LRS)
    # through a GradScaler, the way VISSL's train step calls it
    scaler = _grad_scaler()
    p_b = as_params(init)
    opt_b = make_optimizer(p_b)
    for step in range(len(LRS)):
        opt_b.zero_grad()
        loss = sum((p_b[n] * g).sum() for n, g in grads[step].items() if g is not None)
        scaler.scale(loss).backward()
        scaler.step(opt_b, where=step / len(LRS))
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 12  # never skipped
    for n in SHAPES:  # unscaling by a power of 2 is exact: the same step, bit-identical
        assert torch.equal(p_a[n], p_b[n]), n


def test_grad_scaler_skips_on_inf():
    init, grads = make_problem(seed=5, dtype=torch.float32)
    scaler = _grad_scaler()
    params = as_params(init)
    opt = make_optimizer(params)
    loss = sum((params[n] * g).sum() for n, g in grads[2].items() if g is not None)
    loss = loss + params["bn_w"].sum() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt, where=0.0)
    scaler.update()
    for n in SHAPES:
        assert torch.equal(params[n].detach(), init[n]), n
    assert scaler.get_scale() < 2.0 ** 12


def test_config_validation():
    with pytest.raises(ValueError, match="use_larc"):
        build_optimizer({"name": "swav_plugin_larc", "use_larc": True})
    with pytest.raises(ValueError, match="larc_config"):
        build_optimizer({"name": "swav_plugin_larc", "larc_config": {"trust": 0.1}})
    with pytest.raises(ValueError, match="trust_coefficient"):
        build_optimizer({"name": "swav_plugin_larc", "larc_config": {"trust_coefficient": 0.0}})
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer({"name": "swav_plugin_larc", "momentum": 1.5})
    opt = build_optimizer({"name": "swav_plugin_larc"})
    assert (opt._momentum, opt._trust_coefficient, opt._eps, opt._clip) == (0.9, 0.001, 1e-8, False)


# --------------------------------------------------------------------------- #
# the VISSL path: VISSL's config inference, build_optimizer,
# build_optimizer_schedulers, get_optimizer_param_groups, set_param_groups
# --------------------------------------------------------------------------- #
def vissl_config(optimizer_overrides):
    """VISSL's defaults.yaml + overrides, through VISSL's convert_to_attrdict."""
    import vissl.config
    from omegaconf import OmegaConf
    from vissl.utils.hydra_config import convert_to_attrdict

    base = OmegaConf.load(os.path.join(os.path.dirname(vissl.config.__file__), "defaults.yaml"))
    for k in ("defaults", "hydra"):
        base.pop(k, None)
    cfg = OmegaConf.merge(base, OmegaConf.create({"config": {"OPTIMIZER": optimizer_overrides}}))
    _, config = convert_to_attrdict(cfg, dump_config=False)
    return config


SWAV_OPTIMIZER = {
    "name": "swav_plugin_larc",
    "use_larc": False,
    "larc_config": {"clip": False, "eps": 1e-8, "trust_coefficient": 0.001},
    "weight_decay": 1e-6,
    "momentum": 0.9,
    "nesterov": False,
    "regularize_bn": True,
    "regularize_bias": True,
    "num_epochs": 3,
    "param_schedulers": {"lr": {
        "name": "swav_plugin_warmup_cosine", "update_interval": "step",
        "base_lr": 4.8, "final_lr": 0.0048, "warmup_epochs": 1, "start_warmup": 0.3,
        "auto_lr_scaling": {"auto_scale": False},
    }},
}


class TinySwav(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.heads = nn.ModuleList([
            nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
            nn.Linear(3, 5, bias=False),  # prototypes
        ])


def test_vissl_build_path():
    from vissl.optimizers.optimizer_helper import get_optimizer_param_groups

    config = vissl_config(SWAV_OPTIMIZER)
    opt_cfg = config.OPTIMIZER
    epochs, n = 3, 2
    model = TinySwav().double()
    optim = build_optimizer(opt_cfg)
    assert isinstance(optim, SwavPluginLARC)
    schedulers = build_optimizer_schedulers(opt_cfg)
    assert set_schedulers_iterations_per_epoch(schedulers, n) == 2  # lr, lr_head
    groups = get_optimizer_param_groups(model, config.MODEL, opt_cfg, schedulers)
    optim.set_param_groups(groups)
    # regularize_bn / regularize_bias: every parameter decays with 1e-6
    decayed = [p for g in optim.param_groups if g["params"] for p in g["params"]
               if g["weight_decay"] == 1e-6]
    assert len(decayed) == len(list(model.parameters()))

    lrs = [float(x) for x in warmup_cosine_lr(4.8, 0.0048, epochs, n, 1, 0.3)]
    named = dict(model.named_parameters())
    init = {k: v.detach().clone() for k, v in named.items()}
    gen = torch.Generator().manual_seed(7)
    grads = []
    for step in range(epochs * n):
        g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in named.items()}
        if step < 2:
            g["heads.1.weight"] = None  # frozen prototypes
        grads.append(g)
    for step in range(epochs * n):
        for k, p in named.items():
            p.grad = None if grads[step][k] is None else grads[step][k].clone()
        optim.step(where=step / (epochs * n))
        assert optim.options_view.lr == lrs[step]
    ref, _ = reference_run(init, [(list(named), 1e-6)], grads, lrs)
    assert_matches(named, ref)
