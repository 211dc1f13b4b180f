"""Float tolerances of the tests, derived from the computation (one home).

Float rounding depends on the CPU: the vector width of the kernels
(ATEN_CPU_CAPABILITY, MKL's code path), the order of the sums in reductions
and BLAS, the split over threads, the exp / log implementation. A comparison
must hold for every rounding the computation allows, not for what one machine
prints, so a tolerance is

    rtol(*steps) = eps x (the steps' rounding counts, added up)

relative to the scale of the quantity, with

* eps: one rounding in the precision computed in (EPS32 = 2**-23 ~ 1.2e-7,
  which also covers a vectorised exp / log within 1 ulp);
* a sum or dot product of n terms (BLAS, torch.sum, a row reduction such as
  softmax's, an all-reduce), in any order: :func:`terms` roundings;
* exp(x / t): x carries an absolute error |x| eps, which exp turns into a
  relative error |x| eps / t of the result: |x| / t roundings;
* errors of successive steps add (first order), hence the sum of counts; two
  float32 results of the same formula computed differently (another number
  of ranks, another blocking) differ by up to twice one's error.

Exact comparisons (``torch.equal``, ``atol=0``) stay where the code promises
bit-identity: the same kernels on the same inputs, copies, all-reduced values
(bitwise identical on every rank), a resumed run against an uninterrupted one
on the same machine.
"""

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
EPS64 = torch.finfo(torch.float64).eps  # 2.22e-16


def rtol(*steps: float, eps: float = EPS32) -> float:
    """Relative error bound of a value whose computation rounds ``steps``
    times along its longest path (module docstring): ``eps * sum(steps)``."""
    return eps * float(sum(steps))


def terms(n: int) -> float:
    """Roundings of a sum of ``n`` terms, in any order, relative to the sum
    of |terms|: at most n (n - 1 roundings of eps / 2 each; Higham,
    "Accuracy and Stability of Numerical Algorithms", 4.2), and, since the
    roundings of a long sum are independent and cancel like a random walk,
    at most 6 sqrt(n) with probability 1 - 2 exp(-18) ~ 1 - 3e-8 (Higham and
    Mary, "A new approach to probabilistic rounding error analysis", SIAM J.
    Sci. Comput. 41(5), 2019, with lambda = 6). The smaller of the two."""
    return min(float(n), 6.0 * math.sqrt(n))


# ----------------------------------------------- SwAV (swav_vissl_plugin.sinkhorn)
def codes_rtol(rows, k, iterations, score_bound=1.0, epsilon=0.05, eps=EPS32):
    """Relative error of each Sinkhorn-Knopp code (all terms are positive, so
    each code has a relative bound): the exponents (s - m) / epsilon, |.| <=
    2 score_bound / epsilon, of the kernel and of the start scales; per
    iteration the sums over the ``rows`` samples and over the ``k``
    prototypes; the final softmax over ``k``."""
    return rtol(2 * 2 * score_bound / epsilon, iterations * (terms(rows) + terms(k)), terms(k), eps=eps)


def loss_rtol(batch, k, num_crops, num_assign, iterations, queue=0, score_bound=1.0,
              temperature=0.1, epsilon=0.05, eps=EPS32):
    """Relative error of the SwAV loss of one head against the scale
    ``max(1, |loss|)`` (a log-probability's error is absolute): the codes'
    (Sinkhorn over ``queue + batch`` rows), log_softmax(s / T) (exponent
    2 score_bound / T and a ``k``-term sum), the cross sum over ``batch x k``
    and the sums over the crops and assign crops."""
    return codes_rtol(queue + batch, k, iterations, score_bound, epsilon, eps) + rtol(
        2 * score_bound / temperature, terms(k), terms(batch * k), num_crops + num_assign, eps=eps
    )


def grad_rtol(batch, k, num_crops, num_assign, iterations, queue=0, score_bound=1.0,
              temperature=0.1, epsilon=0.05, eps=EPS32):
    """Relative error of the SwAV loss's gradient w.r.t. the scores against
    :func:`grad_scale`: the codes', softmax(s / T)'s, the sums over crops."""
    return codes_rtol(queue + batch, k, iterations, score_bound, epsilon, eps) + rtol(
        2 * score_bound / temperature, terms(k), num_crops + num_assign, eps=eps
    )


def grad_scale(batch, num_crops, temperature=0.1):
    """Scale of the gradient's terms: softmax(s_p / T) and the codes (each
    <= 1, per assign crop) over n T with n = num_assign (num_crops - 1) batch."""
    return 1.0 / ((num_crops - 1) * batch * temperature)


# --------------------------------------- k-means (swav_vissl_plugin.clustering)
def centroid_rtol(bank, labels, k, eps=EPS32):
    """Error of each spherical k-means centroid (a unit vector: scale 1).

    A cluster's sum of m unit rows (index_add_) is off by at most
    terms(m) eps x m in norm (each row has norm 1), relative to its norm
    m |mean|: terms(m) / |mean| roundings, twice for the normalisation that
    follows; then two normalisations (a D-term norm and a division each). m
    and |mean| are those of ``labels``."""
    x = bank.detach().double()
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).double()
    used = counts > 0
    gain = max(terms(m) * m / norm for m, norm in zip(counts[used].tolist(), sums[used].norm(dim=1).tolist()))
    return rtol(2 * gain, 2 * (terms(x.shape[1]) + 2), eps=eps)


def unit_norm_tol(dim, normalisations=1, eps=EPS32):
    """|norm - 1| of a row L2-normalised in float32 and measured again: each
    normalisation (a ``dim``-term norm, a sqrt, a division) and the
    measurement (a ``dim``-term norm, a sqrt)."""
    return rtol((normalisations + 1) * (terms(dim) + 1) + normalisations, eps=eps)
