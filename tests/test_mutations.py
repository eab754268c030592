"""Tests that close gaps a mutation probe found: one-line bugs the rest of the suite let through.

Each test names the bug it guards against. They go through the public API only (``ej.fit``,
``FitResult``, model methods, ``ej.free_energy``), with hand-written references: a generalized
EM loop on ``ej.free_energy`` with optax, NumPy for k-means and sample moments, scikit-learn
for the prior's defaults. Random checks use tolerances of a few standard errors.
"""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import TOSSES, coin_data, coins_em_np, three_coins
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture

import elbo_jax as ej
from elbo_jax.models import GaussianMixture, GaussianMixturePrior

N_COINS = 60
X_COINS = coin_data(n=N_COINS, seed=21)
COIN_INIT = np.array([0.1, 0.5, -0.5])
GEM_ITERS = 6  # generalized-EM fits: tol=0, this many iterations (one compile per optimizer)


# ------------------------------------------------------------------ references
def _gem_reference(model, x, optimizer, *, num_steps, num_iters, reinitialise=False):
    """Generalized EM by hand: exact E-step (``model.posterior``), then ``num_steps`` optax
    steps on ``ej.free_energy(model, q, x)`` over the model's float leaves, q fixed; the
    optimizer state carries over between iterations (unless ``reinitialise``)."""
    x = jnp.asarray(x, jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    @eqx.filter_jit
    def grad(params, q):
        return jax.grad(lambda p: ej.free_energy(eqx.combine(p, static), q, x))(params)

    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict promotion
        state = optimizer.init(params)
    q = model.posterior(x)
    for _ in range(num_iters):
        if reinitialise:
            with jax.numpy_dtype_promotion("standard"):
                state = optimizer.init(params)
        for _ in range(num_steps):
            g = grad(params, q)
            with jax.numpy_dtype_promotion("standard"):
                updates, state = optimizer.update(g, state, params)
                params = optax.apply_updates(params, updates)
        q = eqx.combine(params, static).posterior(x)
    return eqx.combine(params, static)


def _gem_fit(optimizer, *, num_steps=2, max_iters=GEM_ITERS):
    m_step = ej.GradientMStep(optimizer, num_steps=num_steps)
    return ej.fit(three_coins(COIN_INIT), X_COINS, m_step=m_step, max_iters=max_iters, tol=0)


# -------------------------------------------- 1. the optimizer's signature includes its update
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(optax.adam, id="adam"),
        pytest.param(optax.sgd, id="sgd"),
        pytest.param(lambda lr: optax.adam(jnp.asarray(lr)), id="adam-array-lr"),
    ],
)
def test_optimizers_with_different_learning_rates_do_not_share_a_compiled_fit(make):
    """Bug: optimizers compared by their ``init`` alone (the learning rate is not in it), so a
    fit with a second learning rate would silently reuse the compiled fit of the first."""
    rates = (0.2, 0.01)
    results = [_gem_fit(make(lr)) for lr in rates]
    for lr, res in zip(rates, results, strict=True):
        ref = _gem_reference(
            three_coins(COIN_INIT), X_COINS, make(lr), num_steps=2, num_iters=GEM_ITERS
        )
        np.testing.assert_allclose(res.model.logits, ref.logits, rtol=1e-10, atol=1e-12)
    assert np.abs(np.asarray(results[0].model.logits - results[1].model.logits)).max() > 1e-2
    # and in the other order, with fresh optimizers: the same answers
    again = [_gem_fit(make(lr)) for lr in reversed(rates)][::-1]
    for res, res_again in zip(results, again, strict=True):
        np.testing.assert_array_equal(res.model.logits, res_again.model.logits)


def test_two_fresh_equal_optimizers_give_identical_fits():
    first = _gem_fit(optax.adam(1e-2))
    second = _gem_fit(optax.adam(1e-2))
    np.testing.assert_array_equal(first.model.logits, second.model.logits)
    np.testing.assert_array_equal(first.history, second.history)
    ref = _gem_reference(
        three_coins(COIN_INIT), X_COINS, optax.adam(1e-2), num_steps=2, num_iters=GEM_ITERS
    )
    np.testing.assert_allclose(first.model.logits, ref.logits, rtol=1e-10, atol=1e-12)


# ------------------------------------------- 7. GradientMStep carries the optimizer state
def test_gradient_m_step_carries_optimizer_state_between_iterations():
    """Bug: the optimizer state re-initialised every EM iteration. With Adam and one step per
    iteration that makes every step about ``lr * sign(grad)``."""
    optimizer = optax.adam(0.05)
    num_iters = 8
    res = _gem_fit(optimizer, num_steps=1, max_iters=num_iters)
    start = three_coins(COIN_INIT)
    carried = _gem_reference(start, X_COINS, optimizer, num_steps=1, num_iters=num_iters)
    restarted = _gem_reference(
        start, X_COINS, optimizer, num_steps=1, num_iters=num_iters, reinitialise=True
    )
    assert np.abs(np.asarray(carried.logits - restarted.logits)).max() > 1e-2
    np.testing.assert_allclose(res.model.logits, carried.logits, rtol=1e-10, atol=1e-12)
    expected_elbo = ej.log_evidence(carried, jnp.asarray(X_COINS))
    np.testing.assert_allclose(res.history[-1], expected_elbo, rtol=1e-12)


# ------------------------------------------------------ user models with closed-form hooks
def _coins_log_joint(logits, x, z):
    log_w = jax.nn.log_sigmoid(jnp.where(z == 0, logits[0], -logits[0]))
    head = logits[1 + z]
    return log_w + x * jax.nn.log_sigmoid(head) + (TOSSES - x) * jax.nn.log_sigmoid(-head)


def _coins_statistics(model, x, q, weights):
    probs = q.resolve(model, x).probs
    if weights is not None:
        probs = probs * weights[:, None]
    return {"counts": jnp.sum(probs, axis=0), "heads": probs.T @ x}


def _coins_ml(stats, swap_weights=False):
    """The exact M-step's logits; ``swap_weights`` is the deliberate bug of a faulty hook."""
    counts, heads = stats["counts"], stats["heads"]
    p = heads / (TOSSES * counts)
    first = counts[1] if swap_weights else counts[0]
    pi = first / jnp.sum(counts)
    return jnp.log(jnp.stack([pi, p[0], p[1]])) - jnp.log1p(-jnp.stack([pi, p[0], p[1]]))


class FaultyMaximizeCoins(ej.Model):
    """Three coins with a closed-form M-step that gives coin 0 the weight of coin 1: a
    ``maximize`` hook that disagrees with ``log_joint``, so exact EM raises F."""

    logits: jax.Array  # (3,)
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return _coins_log_joint(self.logits, x, z)

    def has_closed_form(self, prior):
        return prior is None

    def sufficient_statistics(self, x, q, *, weights=None):
        return _coins_statistics(self, x, q, weights)

    def maximize(self, stats, prior=None):
        return FaultyMaximizeCoins(_coins_ml(stats, swap_weights=True))


class CoinsWithUnusedParameter(ej.Model):
    """Three coins with the correct closed form, plus a parameter that ``log_joint`` never
    reads; ``maximize`` multiplies it by 1e150, so it overflows at the third iteration while
    F stays finite."""

    logits: jax.Array  # (3,)
    unused: jax.Array  # ()
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return _coins_log_joint(self.logits, x, z)

    def has_closed_form(self, prior):
        return prior is None

    def sufficient_statistics(self, x, q, *, weights=None):
        return _coins_statistics(self, x, q, weights)

    def maximize(self, stats, prior=None):
        return CoinsWithUnusedParameter(_coins_ml(stats), self.unused * 1e150)


# ------------------------------------ 2. num_increases on the statistics path (exact EM)
def test_statistics_path_counts_increases_of_the_free_energy():
    """Bug: ``num_increases`` not counted when exact EM runs as statistics passes (a Discrete
    model with a closed form), so a faulty ``maximize`` hook would go unreported."""
    model = FaultyMaximizeCoins(jnp.asarray(COIN_INIT, jnp.float64))
    with pytest.warns(RuntimeWarning, match="exact EM raised the free energy beyond rounding"):
        res = ej.fit(model, X_COINS, max_iters=10, tol=0)
    elbo = np.concatenate([[float(res.initial_elbo)], np.asarray(res.history)])
    # exact EM at the exact posterior: the history is the log-evidence of each iterate
    np.testing.assert_allclose(
        res.history[-1], ej.log_evidence(res.model, jnp.asarray(X_COINS)), rtol=1e-12
    )
    drops = int(np.sum(np.diff(elbo) < -1e-9 * (1 + np.abs(elbo[:-1]))))
    assert drops > 0
    assert res.num_increases == drops


# ------------------------- 3. the non-finite guard looks at the parameters, not only at F
def test_closed_form_step_that_overflows_an_unused_parameter_stops_nonfinite():
    """Bug: only F (and q) checked for finiteness; a parameter that does not enter log_joint
    could become inf while F stays finite, and the fit would go on and return it."""
    model = CoinsWithUnusedParameter(
        jnp.asarray(COIN_INIT, jnp.float64), jnp.asarray(1.0, jnp.float64)
    )
    with pytest.warns(RuntimeWarning, match="fit stopped after 2 iterations: a step made"):
        res = ej.fit(model, X_COINS, max_iters=10, tol=0)
    assert res.status == ej.Status.NONFINITE and not res.converged
    assert res.num_iters == 2 and res.history.shape == (2,)
    assert res.num_increases == 0
    assert np.isfinite(res.history).all()
    # the last finite model: two exact-EM iterations, unused = 1e300
    np.testing.assert_allclose(res.model.unused, 1e300, rtol=1e-12)
    pi0, p0 = expit(COIN_INIT[0]), expit(COIN_INIT[1:])
    pi, p = coins_em_np(pi0, p0, X_COINS, 2)
    np.testing.assert_allclose(expit(np.asarray(res.model.logits)), np.r_[pi, p], rtol=1e-10)


class CoinsWithUnusedGradientParameter(ej.Model):
    """Three coins plus a parameter that ``log_joint`` never reads (no hooks)."""

    logits: jax.Array  # (3,)
    unused: jax.Array  # ()
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return _coins_log_joint(self.logits, x, z)


def _sgd_that_blows_up_unused(lr):
    """SGD on every leaf, except that ``unused`` grows by a factor 1e150 + 1 per step."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(grads, state, params=None):
        updates = jax.tree_util.tree_map(lambda g: -lr * g, grads)
        return eqx.tree_at(lambda u: u.unused, updates, params.unused * 1e150), state

    return optax.GradientTransformation(init, update)


def test_gradient_step_that_overflows_an_unused_parameter_stops_nonfinite():
    """The same guard on the path that carries q (a gradient M-step)."""
    model = CoinsWithUnusedGradientParameter(
        jnp.asarray(COIN_INIT, jnp.float64), jnp.asarray(1.0, jnp.float64)
    )
    optimizer = _sgd_that_blows_up_unused(0.5)
    m_step = ej.GradientMStep(optimizer, num_steps=1)
    with pytest.warns(RuntimeWarning, match="fit stopped after 2 iterations: a step made"):
        res = ej.fit(model, X_COINS, m_step=m_step, max_iters=10, tol=0)
    assert res.status == ej.Status.NONFINITE
    assert res.num_iters == 2 and np.isfinite(res.history).all()
    assert np.isfinite(float(res.model.unused))
    ref = _gem_reference(model, X_COINS, optimizer, num_steps=1, num_iters=2)
    np.testing.assert_allclose(res.model.unused, ref.unused, rtol=1e-12)
    assert float(ref.unused) > 1e299
    np.testing.assert_allclose(res.model.logits, ref.logits, rtol=1e-10, atol=1e-12)


# ------------------------------- 4. full-covariance sampling uses L, not L^T (Σ = L L^T)
def test_full_covariance_samples_have_the_model_covariance():
    """Bug: ``x = μ + L^T ε`` (covariance L^T L) instead of ``μ + L ε``. Strongly correlated,
    anisotropic covariances, and tolerances of 5 standard errors of the sample moments."""
    weights = np.array([0.4, 0.6])
    means = np.array([[1.0, -2.0, 0.5], [-3.0, 0.0, 2.0]])
    a = np.array([[1.0, 0.0, 0.0], [1.8, 0.6, 0.0], [-0.9, 1.2, 0.3]])
    b = np.array([[0.3, 0.0, 0.0], [-0.5, 2.0, 0.0], [0.2, 1.5, 0.8]])
    covs = np.stack([a @ a.T, b @ b.T])
    model = GaussianMixture(weights, means, covs, "full")
    n = 20_000
    x, z = model.sample(jr.key(7), n)
    x, z = np.asarray(x), np.asarray(z)
    counts = np.bincount(z, minlength=2)
    se_w = np.sqrt(weights * (1 - weights) / n)
    assert np.all(np.abs(counts / n - weights) < 5 * se_w)
    for k in range(2):
        xk, nk, cov = x[z == k], counts[k], covs[k]
        se_mean = np.sqrt(np.diag(cov) / nk)
        assert np.all(np.abs(xk.mean(0) - means[k]) < 5 * se_mean)
        var = np.diag(cov)
        se_cov = np.sqrt((np.outer(var, var) + cov**2) / nk)  # Var(S_ij) for Gaussian data
        err = np.abs(np.cov(xk.T) - cov) / se_cov
        assert err.max() < 5, (k, err)


# ---------------------------------- 5. the k-means start's covariances are the clusters'
def _separated_blobs():
    rng = np.random.default_rng(5)
    centres = np.array([[0.0, 0.0], [12.0, 0.0], [0.0, 12.0]])
    scales = [np.array([0.5, 2.0]), np.array([1.5, 0.3]), np.array([1.0, 1.0])]
    sizes = [60, 90, 50]
    parts = [
        c + s * rng.normal(size=(m, 2)) for c, s, m in zip(centres, scales, sizes, strict=True)
    ]
    return np.concatenate(parts)


@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_kmeans_start_covariances_are_the_cluster_covariances(covariance_type):
    """Bug: the diag start's variance taken about 0 instead of the cluster mean (no ``- mc²``)
    or from the whole data. The start's w, μ, Σ must be the clusters' of the final hard
    assignment (reconstructed as nearest returned mean: the clusters are far apart, so the
    Lloyd steps have converged) plus ``reg_covar``."""
    x = _separated_blobs()
    reg_covar = 1e-3
    model = GaussianMixture.initialize(
        jr.key(1), x, 3, covariance_type, reg_covar=reg_covar, num_kmeans_iters=20
    )
    means = np.asarray(model.means)
    labels = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(labels, minlength=3)
    assert sorted(counts) == [50, 60, 90]  # the blobs themselves
    np.testing.assert_allclose(model.weights, counts / len(x), rtol=1e-9)
    for k in range(3):
        xk = x[labels == k]
        np.testing.assert_allclose(means[k], xk.mean(0), rtol=1e-10, atol=1e-12)
        if covariance_type == "diag":
            expected = xk.var(0) + reg_covar
        else:
            expected = np.cov(xk.T, bias=True) + reg_covar * np.eye(2)
        np.testing.assert_allclose(model.covariances[k], expected, rtol=1e-9)


# -------------------------- 6. GaussianMixturePrior.from_data vs scikit-learn's priors
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_prior_from_data_matches_sklearn_bayesian_mixture_priors(covariance_type):
    """``from_data`` claims scikit-learn's ``BayesianGaussianMixture`` defaults: m0 the data
    mean, Ψ0 the data covariance (``np.cov``, ddof=1; diag: ``np.var(ddof=1)``), ν0 = D,
    κ0 = 1. A small N makes ddof visible (a factor N/(N-1))."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3)) @ np.array([[2.0, 0.0, 0.0], [0.7, 1.0, 0.0], [-1.0, 0.4, 0.5]])
    x = x + np.array([1.0, -2.0, 3.0])
    sk = BayesianGaussianMixture(
        n_components=2,
        covariance_type=covariance_type,
        weight_concentration_prior_type="dirichlet_distribution",
        max_iter=5,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(x)
    prior = GaussianMixturePrior.from_data(x)
    np.testing.assert_allclose(prior.mean, sk.mean_prior_, rtol=1e-12)
    np.testing.assert_allclose(prior.mean_precision, sk.mean_precision_prior_, rtol=1e-12)
    np.testing.assert_allclose(prior.dof, sk.degrees_of_freedom_prior_, rtol=1e-12)
    scale = np.asarray(prior.scale)
    if covariance_type == "diag":
        np.testing.assert_allclose(np.diag(scale), sk.covariance_prior_, rtol=1e-12)
    else:
        np.testing.assert_allclose(scale, sk.covariance_prior_, rtol=1e-12)
    assert math.isclose(float(prior.dof), x.shape[1])
