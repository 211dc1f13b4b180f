"""swav_vissl_plugin.sinkhorn against the plain float64 reference (reference_swav)."""

import pytest
import torch
import torch.nn.functional as F

import reference_swav as ref
import swav_vissl_plugin.sinkhorn as sinkhorn_mod
from tolerances import EPS64, codes_rtol, grad_rtol, grad_scale, loss_rtol, rtol, terms
from swav_vissl_plugin.sinkhorn import (
    sinkhorn_codes,
    sinkhorn_knopp,
    swapped_prediction_loss,
    swav_loss,
)

EPS = 0.05


def cosine_scores(b, k, d=32, seed=0, dtype=torch.float32):
    """Scores like SwAV's: L2-normalised embeddings x L2-normalised prototypes."""
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return (e @ w.t()).to(dtype)


def uniform_scores(b, k, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(b, k, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype)


SHAPES = [(1, 17), (3, 101), (7, 3000), (33, 17), (33, 101), (64, 3000)]


def row_sum_tol(k):
    """Rows of codes sum to 1 whatever Sinkhorn's error: the last step is a
    softmax (a K-term denominator, one division per code), summed again by
    torch.sum over K."""
    return rtol(terms(k), 1, terms(k))


# ---------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_float64_matches_plain_formula(b, k, iterations):
    s = uniform_scores(b, k, seed=b * k + iterations, dtype=torch.float64)
    codes = sinkhorn_knopp(s, EPS, iterations)
    assert codes.dtype == torch.float64 and codes.shape == (b, k)
    # float64 rounding of the algorithm (|s| <= 1), twice: the reference
    # rounds as much as the code under test
    tol = 2 * codes_rtol(b, k, iterations, eps=EPS64)
    torch.testing.assert_close(codes, ref.sinkhorn_plain(s, EPS, iterations), rtol=tol, atol=0)


@pytest.mark.parametrize("b,k", SHAPES + [(1000, 3000)])  # 1000: blocked sums + remainder
@pytest.mark.parametrize("kind", ["uniform", "cosine"])
def test_float32_matches_float64_formula_to_float32_rounding(b, k, kind):
    s = uniform_scores(b, k, seed=b + k) if kind == "uniform" else cosine_scores(b, k, seed=b + k)
    assert s.abs().max() <= 1
    codes = sinkhorn_knopp(s, EPS, 3)
    assert codes.dtype == torch.float32
    # each code relative to itself: float32 rounding of the algorithm (|s| <= 1)
    torch.testing.assert_close(codes.double(), ref.sinkhorn_plain(s, EPS, 3), rtol=codes_rtol(b, k, 3), atol=0)
    torch.testing.assert_close(codes.sum(1), torch.ones(b), rtol=0, atol=row_sum_tol(k))


def test_equipartition_after_many_iterations():
    s = cosine_scores(60, 12, seed=3, dtype=torch.float64)
    codes = sinkhorn_knopp(s, EPS, 500)
    # each prototype gets B / K of the mass, each sample sums to 1
    # convergence, not rounding: after 500 iterations within 1e-6 of B / K
    torch.testing.assert_close(codes.sum(0), torch.full((12,), 5.0, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codes.sum(1), torch.ones(60, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_are_finite_and_exact(dtype):
    s = cosine_scores(64, 3000, seed=1, dtype=dtype)
    codes = sinkhorn_knopp(s, EPS, 3)
    assert codes.dtype == torch.float32
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(64), rtol=0, atol=row_sum_tol(3000))
    # same values as the float64 formula on the (exactly upcast) half scores
    torch.testing.assert_close(codes.double(), ref.sinkhorn_plain(s, EPS, 3), rtol=codes_rtol(64, 3000, 3), atol=0)


def extreme_scores(case, scale, dtype):
    s = uniform_scores(64, 3000, seed=7, scale=scale)
    if case == "dead_prototypes":  # columns far below every sample: zero prototype sums
        s[:, :10] = -scale
    elif case == "far_samples":  # samples far below the global max: zero weights
        s[:5] -= 2 * scale
        s[5] = -scale
    elif case == "constant":  # ties everywhere
        s[:] = scale
    return s.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [30.0, 1000.0])
@pytest.mark.parametrize("case", ["uniform", "dead_prototypes", "far_samples", "constant"])
def test_extreme_scores_give_finite_codes(case, dtype, scale):
    codes = sinkhorn_knopp(extreme_scores(case, scale, dtype), EPS, 3)
    assert torch.isfinite(codes).all()
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(64), rtol=0, atol=row_sum_tol(3000))


def test_extreme_scores_exact_in_float64():
    # |s/eps| up to 600: beyond float32's exponent, within float64's; the
    # shifted algorithm must still equal the unshifted float64 formula.
    s = uniform_scores(40, 50, seed=9, scale=30.0, dtype=torch.float64)
    # float64 rounding with |s| <= 30, either side; codes far below the
    # row's largest are compared on the row's scale (each row sums to 1)
    tol = 2 * codes_rtol(40, 50, 3, score_bound=30.0, eps=EPS64)
    torch.testing.assert_close(sinkhorn_knopp(s, EPS, 3), ref.sinkhorn_plain(s, EPS, 3), rtol=tol, atol=tol)


def test_blocked_prototype_sums_are_accurate():
    # Positive terms: a relative bound. Blocks of 256 samples (BLAS, any
    # order), then the 78 block sums, then the remainder's: ~150 roundings,
    # where one running sum over the 20k samples may take terms(20000) ~ 850.
    g = torch.Generator().manual_seed(5)
    kernel, col = torch.rand(20000, 17, generator=g), torch.rand(20000, generator=g)
    exact = kernel.double().t() @ col.double()
    rel = ((sinkhorn_mod._prototype_sums(kernel, col).double() - exact) / exact).abs().max()
    assert rel <= rtol(1, terms(256), terms(78), 1), rel.item()  # the products, the blocks, the remainder
    torch.testing.assert_close(
        sinkhorn_mod._prototype_sums(kernel[:300], col[:300]).double(),
        kernel[:300].double().t() @ col[:300].double(),
        rtol=rtol(1, terms(300)),  # one block: a 300-term dot product
        atol=0,
    )


def test_does_not_modify_input_and_has_no_grad():
    s = uniform_scores(5, 7).requires_grad_()
    before = s.detach().clone()
    codes = sinkhorn_knopp(s, EPS, 3)
    assert not codes.requires_grad
    assert torch.equal(s.detach(), before)


def test_autocast_does_not_lower_precision():
    s = cosine_scores(1000, 101, seed=4)  # >= 2 blocks: the batched-product path
    plain = sinkhorn_knopp(s, EPS, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sinkhorn_knopp(s, EPS, 3)
    assert under.dtype == torch.float32
    # autocast is disabled inside: the same float32 kernels on the same input
    assert torch.equal(under, plain)


def test_invalid_arguments():
    s = uniform_scores(4, 5)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(s, 0.0, 3)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(s, EPS, 0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(s[0], EPS, 3)
    with pytest.raises(RuntimeError, match="process group"):
        sinkhorn_knopp(s, EPS, 3, distributed=True)


# ------------------------------------------------------------------- loss
CROP_CASES = [(2, [0, 1]), (2, [0]), (8, [0, 1]), (8, [0]), (8, [1, 3]), (4, [3, 0, 2])]


def crop_scores(num_crops, b, k, seed, dtype=torch.float32):
    return cosine_scores(num_crops * b, k, seed=seed, dtype=dtype)


@pytest.mark.parametrize("num_crops,cfa", CROP_CASES)
@pytest.mark.parametrize("b,k", [(1, 17), (3, 101), (7, 17), (33, 101)])
def test_swav_loss_and_gradient_match_reference(num_crops, cfa, b, k):
    seed = num_crops * 1000 + b * 10 + k + len(cfa)
    s = crop_scores(num_crops, b, k, seed).requires_grad_()
    loss = swav_loss(s, num_crops, cfa, 0.1, EPS, 3)
    loss.backward()
    s_ref = s.detach().double().requires_grad_()
    loss_ref = ref.head_loss_plain(s_ref, num_crops, cfa, 0.1, EPS, 3)
    loss_ref.backward()
    assert loss.dtype == torch.float32
    tol = loss_rtol(b, k, num_crops, len(cfa), 3)  # cosine scores: |s| <= 1
    assert abs(loss.item() - loss_ref.item()) <= tol * max(1.0, abs(loss_ref.item()))
    atol = grad_rtol(b, k, num_crops, len(cfa), 3) * grad_scale(b, num_crops)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=0, atol=atol)


@pytest.mark.parametrize("num_crops,cfa", [(2, [0, 1]), (8, [1, 3])])
def test_swapped_prediction_loss_float64_exact(num_crops, cfa):
    b, k = 7, 101
    s = crop_scores(num_crops, b, k, seed=11, dtype=torch.float64).requires_grad_()
    codes = [ref.sinkhorn_plain(s[c * b:(c + 1) * b], EPS, 3) for c in cfa]
    loss = swapped_prediction_loss(s, codes, num_crops, cfa, 0.1)
    (g,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_()
    loss_ref = ref.head_loss_plain(s2, num_crops, cfa, 0.1, EPS, 3)
    (g_ref,) = torch.autograd.grad(loss_ref, s2)
    # float64 with the same codes, either side: log_softmax(s / T) (|s| <= 1,
    # K terms) and the sums
    tol = 2 * rtol(2 / 0.1, terms(k), terms(b * k), num_crops + len(cfa), eps=EPS64)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=tol * max(1.0, abs(loss_ref.item())))
    torch.testing.assert_close(g, g_ref, rtol=0, atol=tol * grad_scale(b, num_crops))


def test_codes_are_constants():
    s = crop_scores(2, 5, 17, seed=2).requires_grad_()
    codes = sinkhorn_codes(s, 2, [0, 1], EPS, 3)
    assert all(not c.requires_grad for c in codes)
    # gradient flows into scores only through the log-probabilities: with
    # fixed codes, d loss / d s_p = (softmax(s_p / T) - mean target) / T / ...
    loss = swapped_prediction_loss(s, codes, 2, [0, 1], 0.1)
    (g,) = torch.autograd.grad(loss, s)
    b = 5
    expected = torch.cat(
        [
            (torch.softmax(s[:b] / 0.1, 1) - codes[1]) / 0.1 / (2 * b),
            (torch.softmax(s[b:] / 0.1, 1) - codes[0]) / 0.1 / (2 * b),
        ]
    )
    # two float32 formulas of the same gradient: twice softmax(s / T)'s rounding
    atol = 2 * rtol(2 / 0.1, terms(17), 2 + 2) * grad_scale(b, 2)
    torch.testing.assert_close(g, expected.detach(), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_in_float32_for_half_scores(dtype):
    s = crop_scores(4, 9, 101, seed=5, dtype=dtype).requires_grad_()
    loss = swav_loss(s, 4, [0, 1], 0.1, EPS, 3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
    loss_ref = ref.head_loss_plain(s.detach(), 4, [0, 1], 0.1, EPS, 3)
    # float32 from the (exactly upcast) half scores
    assert abs(loss.item() - loss_ref.item()) <= loss_rtol(9, 101, 4, 2, 3) * max(1.0, abs(loss_ref.item()))


@pytest.mark.parametrize("b,queue_len", [(1, 4), (3, 9), (7, 5)])
@pytest.mark.parametrize("cfa", [[0, 1], [1]])
def test_swav_loss_with_queue_scores(b, queue_len, cfa):
    num_crops, k = 4, 101
    s = crop_scores(num_crops, b, k, seed=b + queue_len).requires_grad_()
    queue = [cosine_scores(queue_len, k, seed=100 + i) for i in range(len(cfa))]
    loss = swav_loss(s, num_crops, cfa, 0.1, EPS, 3, queue_scores=queue)
    (g,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().double().requires_grad_()
    loss_ref = ref.head_loss_plain(s_ref, num_crops, cfa, 0.1, EPS, 3, queue_scores=queue)
    (g_ref,) = torch.autograd.grad(loss_ref, s_ref)
    tol = loss_rtol(b, k, num_crops, len(cfa), 3, queue=queue_len) * max(1.0, abs(loss_ref.item()))
    assert abs(loss.item() - loss_ref.item()) <= tol
    atol = grad_rtol(b, k, num_crops, len(cfa), 3, queue=queue_len) * grad_scale(b, num_crops)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=atol)
    # the queue changes the codes (it is really used): by more than the
    # rounding of both losses
    no_queue = swav_loss(s.detach(), num_crops, cfa, 0.1, EPS, 3)
    assert abs(no_queue.item() - loss.item()) > 2 * tol


def test_queue_codes_keep_only_the_batch():
    b, k = 3, 17
    s = crop_scores(2, b, k, seed=8)
    queue = [cosine_scores(6, k, seed=9), None]  # second crop without queue
    codes = sinkhorn_codes(s, 2, [0, 1], EPS, 3, queue)
    assert [c.shape for c in codes] == [(b, k), (b, k)]
    full = ref.sinkhorn_plain(torch.cat([queue[0].double(), s[:b].double()]), EPS, 3)
    torch.testing.assert_close(codes[0].double(), full[-b:], rtol=codes_rtol(6 + b, k, 3), atol=0)
    torch.testing.assert_close(codes[1].double(), ref.sinkhorn_plain(s[b:], EPS, 3), rtol=codes_rtol(b, k, 3), atol=0)


def test_loss_argument_errors():
    s = crop_scores(2, 3, 5, seed=0)
    with pytest.raises(ValueError, match="num_crops"):
        swav_loss(s[:5], 2, [0, 1], 0.1, EPS, 3)
    with pytest.raises(ValueError, match="assign crop"):
        swav_loss(s, 2, [0, 2], 0.1, EPS, 3)
    with pytest.raises(ValueError, match="codes"):
        swapped_prediction_loss(s, [torch.zeros(3, 5)], 2, [0, 1], 0.1)
