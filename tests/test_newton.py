"""Newton's method with a diagonal-plus-rank-one Hessian, the Dirichlet MLE, NewtonMStep.

Oracles: SciPy's L-BFGS-B on the same objective, a NumPy implementation of Minka's
fixed-point iteration, the batched routine against a loop over problems.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special as sps

from elbo_jax._newton import fit_dirichlet, inverse_digamma, minimize_diagonal_plus_rank_one


# --------------------------------------------------------------------------- references
def _dirichlet_nll(a, mean_log_p):
    """The negative log-likelihood per datum and its gradient (NumPy, float64)."""
    total = a.sum()
    value = -(sps.gammaln(total) - sps.gammaln(a).sum() + ((a - 1) * mean_log_p).sum())
    grad = sps.digamma(a) - sps.digamma(total) - mean_log_p
    return value, grad


def _scipy_mle(sum_log_p, count):
    """L-BFGS-B in log a (a > 0 without bounds), tight tolerances."""
    m = np.asarray(sum_log_p, np.float64) / float(count)

    def f(log_a):
        a = np.exp(log_a)
        value, grad = _dirichlet_nll(a, m)
        return value, grad * a

    # L-BFGS-B stops on a failed line search with a gradient near 1e-8; restarting it
    # from its own answer (fresh curvature memory) takes it to rounding level.
    x = np.zeros_like(m)
    for _ in range(5):
        res = scipy.optimize.minimize(
            f,
            x,
            jac=True,
            method="L-BFGS-B",
            options={"ftol": 0.0, "gtol": 1e-14, "maxiter": 10_000, "maxcor": 30},
        )
        x = res.x
    return np.exp(x)


def _np_inverse_digamma(y):
    x = np.where(y >= -2.22, np.exp(y) + 0.5, -1 / (y - sps.digamma(1)))
    for _ in range(8):
        x = x - (sps.digamma(x) - y) / sps.polygamma(1, x)
    return x


def _minka_fixed_point(sum_log_p, count, iters=200_000, rtol=1e-15):
    """alpha_k <- psi^{-1}(psi(sum alpha) + mean log p_k), run to convergence (NumPy)."""
    m = np.asarray(sum_log_p, np.float64) / float(count)
    a = np.ones_like(m)
    for _ in range(iters):
        new = _np_inverse_digamma(sps.digamma(a.sum()) + m)
        if np.max(np.abs(new - a) / a) < rtol:
            return new
        a = new
    raise AssertionError("Minka's fixed point did not converge")


# --------------------------------------------------------------------------- data
ALPHAS = np.array(
    [
        [0.5, 2.0, 5.0, 0.1],
        [3.0, 3.0, 1.0, 10.0],
        [0.05, 0.2, 0.3, 0.08],
    ]
)


@pytest.fixture(scope="module")
def dirichlet_stats():
    """Sufficient statistics (3, 4) of 300 draws from each of three Dirichlets."""
    rng = np.random.default_rng(0)
    sums = []
    for alpha in ALPHAS:
        p = rng.dirichlet(alpha, size=300)
        p = np.clip(p, 1e-300, None)
        sums.append(np.log(p).sum(axis=0))
    return np.stack(sums), np.full((3,), 300.0)


_fit = jax.jit(fit_dirichlet)


# --------------------------------------------------------------------------- tests
def test_inverse_digamma():
    y = jnp.linspace(-20.0, 5.0, 50)
    np.testing.assert_allclose(sps.digamma(np.asarray(inverse_digamma(y))), y, rtol=0, atol=1e-12)


def test_fit_dirichlet_equals_scipy_and_minka_float64(dirichlet_stats):
    sums, counts = dirichlet_stats
    alpha, info = _fit(jnp.asarray(sums), jnp.asarray(counts), None)
    assert np.all(np.asarray(info.converged)) and not np.any(np.asarray(info.failed))
    for j in range(len(sums)):
        # L-BFGS ends where the objective stops changing in float64 (a gradient near 1e-8
        # remains on flat problems); Minka's fixed point, run to a 1e-15 step, is tighter.
        np.testing.assert_allclose(alpha[j], _scipy_mle(sums[j], counts[j]), rtol=1e-7)
        np.testing.assert_allclose(alpha[j], _minka_fixed_point(sums[j], counts[j]), rtol=1e-9)


def test_fit_dirichlet_float32(dirichlet_stats):
    sums, counts = dirichlet_stats
    alpha, info = _fit(jnp.asarray(sums, jnp.float32), jnp.asarray(counts, jnp.float32), None)
    assert alpha.dtype == jnp.float32
    assert np.all(np.asarray(info.converged)) and not np.any(np.asarray(info.failed))
    for j in range(len(sums)):
        np.testing.assert_allclose(alpha[j], _minka_fixed_point(sums[j], counts[j]), rtol=1e-4)


def test_batched_equals_loop_and_vmap(dirichlet_stats):
    sums, counts = dirichlet_stats
    sums, counts = jnp.asarray(sums), jnp.asarray(counts)
    batched, info = _fit(sums, counts, None)
    mapped, mapped_info = jax.vmap(lambda s, n: fit_dirichlet(s, n))(sums, counts)
    for j in range(sums.shape[0]):
        single, single_info = _fit(sums[j], counts[j], None)
        np.testing.assert_allclose(batched[j], single, rtol=1e-12)
        np.testing.assert_allclose(mapped[j], single, rtol=1e-12)
        assert int(info.num_steps[j]) == int(single_info.num_steps)
        assert bool(mapped_info.converged[j])


def test_start_given_and_jit_under_jit(dirichlet_stats):
    sums, counts = dirichlet_stats
    s, n = jnp.asarray(sums[0]), jnp.asarray(counts[0])
    start = jnp.full((4,), 30.0)  # far from the answer: the line search must keep a > 0
    alpha, info = jax.jit(lambda s, n, a: fit_dirichlet(s, n, a))(s, n, start)
    assert bool(info.converged) and not bool(info.failed)
    np.testing.assert_allclose(alpha, _minka_fixed_point(sums[0], counts[0]), rtol=1e-9)


@pytest.mark.parametrize(
    "sum_log_p, count",
    [
        ([0.5, -2.0, -3.0], 1.0),  # log p_1 > 0: the likelihood grows without bound
        ([-0.1, -0.1, -0.1], 1.0),  # sum_k exp(mean log p_k) > 1: no finite maximum
        ([np.nan, -2.0, -3.0], 1.0),  # non-finite statistics
        ([-1.0, -2.0, -3.0], 0.0),  # no data
    ],
)
def test_impossible_problem_reports_failed(sum_log_p, count):
    alpha, info = _fit(jnp.asarray(sum_log_p), jnp.asarray(count), None)
    assert bool(info.failed) and not bool(info.converged)


def test_failed_keeps_last_good_point():
    # fn is finite only for x < 2 and its minimum (x = 3) lies outside: the solver stops
    # at a point where everything is finite, with failed set.
    def fn(x):
        inside = x < 2
        value = jnp.sum(jnp.where(inside, (x - 3) ** 2, jnp.nan), axis=-1)
        return value, 2 * (x - 3), jnp.full_like(x, 2.0), jnp.zeros(x.shape[:-1], x.dtype)

    x, info = minimize_diagonal_plus_rank_one(fn, jnp.array([1.0, 1.0]))
    assert bool(info.failed) and not bool(info.converged)
    assert np.all(np.asarray(x) < 2) and np.all(np.asarray(x) >= 1)


def test_minimize_general_rank_one_batch():
    # f(x) = sum_v (w_v x_v - log x_v) + (sum x)^2 / 2, per problem: argmin where
    # w_v - 1/x_v + sum x = 0. Batched (2, 3) problems of V = 4.
    w = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, (2, 3, 4)))

    def fn(x):
        s = jnp.sum(x, axis=-1)
        value = jnp.sum(w * x - jnp.log(x), axis=-1) + s**2 / 2
        return value, w - 1 / x + s[..., None], 1 / x**2, jnp.ones_like(s)

    x, info = jax.jit(lambda x0: minimize_diagonal_plus_rank_one(fn, x0))(jnp.ones((2, 3, 4)))
    assert np.all(np.asarray(info.converged))
    s = jnp.sum(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(w - 1 / x + s, 0.0, atol=1e-12)


def test_a_step_that_rounds_to_no_move_ends_the_search():
    # The only point no higher than the start is the start itself: every step that moves x
    # is rejected until x + t p rounds back to x. That is not a step taken: the problem
    # fails at once (it used to count as a step and repeat until max_steps).
    def fn(x):
        at_start = jnp.all(x == 1.0, axis=-1)
        return (
            jnp.where(at_start, 0.0, 1.0).astype(x.dtype),
            jnp.ones_like(x),
            jnp.ones_like(x),
            jnp.zeros(x.shape[:-1], x.dtype),
        )

    for dtype in (jnp.float32, jnp.float64):
        x, info = minimize_diagonal_plus_rank_one(fn, jnp.ones((2, 3), dtype), max_steps=50)
        assert bool(info.failed.all()) and not bool(info.converged.any())
        assert (np.asarray(info.num_steps) == 0).all()
        np.testing.assert_array_equal(x, 1.0)
