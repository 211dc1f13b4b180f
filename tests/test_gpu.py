"""The plugin's numerics on a CUDA device equal the CPU's (marked ``gpu``;
skipped without CUDA; run by ``benchmarks/gpu_check.sh``).

* SwAV loss forward + backward, and Sinkhorn codes, on CUDA vs the CPU and vs
  the float64 reference written from the recipe (``tests/reference_swav.py``);
* a LARC step (``swav_plugin_larc``: CUDA takes the multi-tensor path, the
  CPU the fused LARC+SGD path) on CUDA vs the CPU;
* one mixed-precision training iteration (fp16 + GradScaler, bf16) of a small
  model with the plugin's trunk, head, loss and optimizer: finite loss, every
  parameter updated; with fp16, inf gradients make GradScaler skip the step.
"""

import math

import pytest
import torch

import swav_vissl_plugin  # noqa: F401  (registration)
from reference_swav import loss_plain, sinkhorn_plain
from tolerances import EPS32, EPS64, codes_rtol, grad_rtol, grad_scale, loss_rtol, rtol, terms

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
CUDA = torch.device(DEVICE)
NUM_CROPS, ASSIGN, TEMPERATURE, EPSILON, ITERS = 8, [0, 1], 0.1, 0.05, 3
LARC_CONFIG = {  # recipe "optimizer" and "wd" rows
    "name": "swav_plugin_larc", "use_larc": False, "momentum": 0.9, "nesterov": False,
    "weight_decay": 1e-6, "larc_config": {"clip": False, "eps": 1e-8, "trust_coefficient": 0.001},
}


def _scores(rows=8 * 16, k=300, dim=32, seed=0, dtype=torch.float64):
    """Scores of unit embeddings against unit prototypes, as the head makes them."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(k, dim, generator=g, dtype=torch.float64), dim=1)
    return (emb @ protos.t()).to(dtype), emb.to(dtype)


def _plugin_loss(num_crops=NUM_CROPS):
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    return SwAVPluginLoss.from_config({
        "num_crops": num_crops, "crops_for_assign": ASSIGN, "temperature": TEMPERATURE,
        "epsilon": EPSILON, "sinkhorn_iterations": ITERS,
    })


def _larc(params, lr):
    from classy_vision.optim import build_optimizer

    opt = build_optimizer(dict(LARC_CONFIG))
    opt.set_param_groups([{"params": list(params), "lr": lr, "weight_decay": 1e-6}])
    return opt


def _loss_and_grad(scores, emb, device):
    s = scores.to(device).clone().requires_grad_(True)
    loss = _plugin_loss()([emb.to(device), s], None)
    loss.backward()
    return loss.detach().cpu(), s.grad.cpu()


@pytest.mark.parametrize("dtype,eps", [(torch.float64, EPS64), (torch.float32, EPS32)])
def test_swav_loss_forward_backward_cuda_equals_cpu_and_reference(dtype, eps):
    scores, emb = _scores(dtype=dtype)
    loss_cpu, grad_cpu = _loss_and_grad(scores, emb, "cpu")
    loss_gpu, grad_gpu = _loss_and_grad(scores, emb, CUDA)
    ref_s = scores.double().clone().requires_grad_(True)
    ref = loss_plain([ref_s], NUM_CROPS, ASSIGN, TEMPERATURE, EPSILON, ITERS)
    ref.backward()
    # the rounding of either side (CPU, CUDA, the float64 reference) in the
    # scores' precision; batch 16 of 8 crops, K 300, cosine scores (|s| <= 1):
    # the loss relative to max(1, |loss|), the gradient to its terms' scale
    size = (16, 300, NUM_CROPS, len(ASSIGN), ITERS)
    loss_tol = 2 * loss_rtol(*size, eps=eps) * max(1.0, abs(float(ref)))
    grad_tol = 2 * grad_rtol(*size, eps=eps) * grad_scale(16, NUM_CROPS)
    for loss, grad in ((loss_cpu, grad_cpu), (loss_gpu, grad_gpu)):
        assert loss.dtype == dtype and grad.dtype == dtype
        assert abs(float(loss) - float(ref)) <= loss_tol
        torch.testing.assert_close(grad.double(), ref_s.grad, rtol=0, atol=grad_tol)
    assert abs(float(loss_gpu) - float(loss_cpu)) <= loss_tol
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=0, atol=grad_tol)


@pytest.mark.parametrize("dtype,eps", [(torch.float64, EPS64), (torch.float32, EPS32)])
def test_sinkhorn_cuda_equals_cpu_and_reference(dtype, eps):
    from swav_vissl_plugin.sinkhorn import sinkhorn_knopp

    # more rows than one block of the plugin's blocked sums (256), K of the recipe
    scores, _ = _scores(rows=600, k=3000, dim=128, seed=1, dtype=dtype)
    cpu = sinkhorn_knopp(scores, EPSILON, ITERS)
    gpu = sinkhorn_knopp(scores.to(CUDA), EPSILON, ITERS)
    assert gpu.device.type == DEVICE and gpu.dtype == dtype
    ref = sinkhorn_plain(scores, EPSILON, ITERS)
    # each code relative to itself (|scores| <= 1), either side's rounding
    tol = 2 * codes_rtol(600, 3000, ITERS, eps=eps)
    torch.testing.assert_close(cpu.double(), ref, rtol=tol, atol=0)
    torch.testing.assert_close(gpu.cpu().double(), ref, rtol=tol, atol=0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=0)
    # each sample's codes sum to 1: the last softmax's K-term denominator and
    # division (summed in float64 here)
    row_tol = rtol(terms(3000), 1, eps=eps)
    torch.testing.assert_close(gpu.double().sum(1).cpu(), torch.ones(600, dtype=torch.float64), rtol=0, atol=row_tol)


# ---------------------------------------------------------------------- LARC
SHAPES = {"conv": (16, 8, 3, 3), "linear": (20, 12), "bias": (20,), "zero_param": (6,),
          "zero_grad": (4, 4), "prototypes": (30, 8)}


def _larc_run(device, dtype, steps=3):
    """``steps`` LARC steps (recipe: momentum 0.9, trust 0.001, eps 1e-8, wd 1e-6
    on every parameter, lr 4.8) over parameters with a zero norm, a zero
    gradient and (first step) a missing gradient; returns the parameters on
    the CPU."""
    g = torch.Generator().manual_seed(3)
    params = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    params["zero_param"].zero_()
    params = {n: torch.nn.Parameter(p.to(device=device, dtype=dtype)) for n, p in params.items()}
    opt = _larc(params.values(), 4.8)
    for step in range(steps):
        for n, p in params.items():
            grad = torch.randn(SHAPES[n], generator=g, dtype=torch.float64)
            if n == "zero_grad":
                grad.zero_()
            p.grad = None if (n == "prototypes" and step == 0) else grad.to(device=device, dtype=dtype)
        opt.step(where=step / steps)
    return {n: p.detach().cpu() for n, p in params.items()}


@pytest.mark.parametrize("dtype,eps", [(torch.float64, EPS64), (torch.float32, EPS32)])
def test_larc_step_cuda_equals_cpu(dtype, eps):
    cpu = _larc_run("cpu", dtype)
    gpu = _larc_run(CUDA, dtype)
    start = _larc_run("cpu", dtype, steps=0)
    # relative to each parameter's scale, either side, 3 steps: the update
    # (1 rounding), momentum and lr x buf (3, on a step up to the whole value:
    # zero_param's first), LARC's norms (terms(1152), the conv) on a step of
    # at most trust x lr x |w| (tests/test_larc.py, larc_rtol)
    tol = 2 * 3 * rtol(1 + 3 + 0.001 * 4.8 * (terms(16 * 8 * 3 * 3) + 10), eps=eps)
    for n in SHAPES:
        torch.testing.assert_close(gpu[n], cpu[n], rtol=0, atol=tol * float(cpu[n].abs().max()), msg=n)
        # A zero gradient is left as it is (no weight decay either): no update.
        # Every other parameter moves (zero_param: ||p|| = 0 at the first
        # step, so plain SGD moves it, LARC scales it from the second on).
        assert torch.equal(cpu[n], start[n]) == (n == "zero_grad"), n


# ------------------------------------------------------ mixed-precision step
def _small_model():
    from swav_vissl_plugin.heads import SwAVPluginPrototypeHead
    from swav_vissl_plugin.trunks import SwavPluginSmallCNN
    from vissl.config import AttrDict

    cfg = AttrDict({"TRUNK": {"SWAV_PLUGIN_SMALL_CNN": {"WIDTHS": [8, 16, 32]}}, "HEAD": {}})
    torch.manual_seed(0)
    trunk = SwavPluginSmallCNN(cfg, "trunk")
    head = SwAVPluginPrototypeHead(cfg, in_dim=32, hidden_mlp=64, feat_dim=16, nmb_prototypes=30)
    return torch.nn.ModuleDict({"trunk": trunk, "head": head}).to(CUDA)


def _forward(model, crops):
    """VISSL's multi-resolution forward: same-size crops through the trunk together."""
    feats = [model["trunk"](torch.cat(crops[:2]))[0], model["trunk"](torch.cat(crops[2:]))[0]]
    return model["head"](torch.cat(feats))


def _iteration(precision, poison_grad=False):
    """The plugin's train step on 2x32 + 2x16 crops of batch 4: autocast
    forward and loss, (scaled) backward, (scaler) LARC step."""
    model = _small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _larc(model.parameters(), 0.6)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12) if precision == "fp16" else None
    g = torch.Generator().manual_seed(2)
    crops = [torch.randn(4, 3, s, s, generator=g).to(CUDA) for s in (32, 32, 16, 16)]
    loss_fn = _plugin_loss(num_crops=4)
    opt.zero_grad()
    with torch.autocast(DEVICE, dtype=dtype):
        out = _forward(model, crops)
        loss = loss_fn(out, None)
    assert out[1].dtype == dtype  # the prototype scores came out of autocast
    if scaler is not None:
        scaler.scale(loss).backward()
        if poison_grad:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt, where=0.0)
        scaler.update()
    else:
        loss.backward()
        opt.step(where=0.0)
    after = {n: p.detach() for n, p in model.named_parameters()}
    return loss.detach().float().cpu(), before, after, scaler


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_iteration_finite_and_updates_every_parameter(precision):
    loss, before, after, scaler = _iteration(precision)
    assert math.isfinite(float(loss)) and float(loss) > 0  # a cross-entropy
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == list(before), sorted(set(before) - set(changed))
    assert all(torch.isfinite(p).all() for p in after.values())
    if scaler is not None:
        assert scaler.get_scale() == 2.0 ** 12  # no step was skipped


def test_fp16_grad_scaler_skips_the_step_on_inf_gradients():
    loss, before, after, scaler = _iteration("fp16", poison_grad=True)
    assert math.isfinite(float(loss))
    for n in before:
        assert torch.equal(before[n], after[n]), n
    assert scaler.get_scale() == 2.0 ** 11  # halved by the skipped step
