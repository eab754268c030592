"""BernoulliMixture and PoissonMixture against independent oracles.

- a plain-NumPy EM written here (same start, same floors) for the fitted parameters;
- the generic vmapped ``ej.Model.log_joint_table`` for the fast table;
- SciPy log-pmfs + logsumexp for the log-evidence, SciPy log-pdfs for the priors;
- the numerical L-BFGS M-step (``ExactMStep(use_closed_form=False)``) for the closed form,
  with and without the conjugate priors.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats

import elbo_jax as ej
from elbo_jax.models import (
    BernoulliMixture,
    BernoulliMixturePrior,
    PoissonMixture,
    PoissonMixturePrior,
)
from elbo_jax.models import _emissions as emissions

# Every fit below uses the same max_iters (part of the compiled loop's static config) and,
# per model, the same data shape, so the compiled fit is shared between tests.
ITERS = 40

# --------------------------------------------------------------------------- fixtures / data


def _bernoulli_truth(dtype=jnp.float64):
    weights = jnp.array([0.2, 0.5, 0.3], dtype)
    probs = jnp.array(
        [
            [0.9, 0.8, 0.1, 0.2, 0.7],
            [0.1, 0.2, 0.8, 0.9, 0.3],
            [0.5, 0.9, 0.9, 0.1, 0.1],
        ],
        dtype,
    )
    return BernoulliMixture(weights, probs)


def _poisson_truth(dtype=jnp.float64):
    weights = jnp.array([0.3, 0.7], dtype)
    rates = jnp.array([[1.5, 8.0], [6.0, 0.7]], dtype)
    return PoissonMixture(weights, rates)


@pytest.fixture(scope="module")
def bernoulli_data():
    x, z = _bernoulli_truth().sample(jr.key(0), 400)
    return np.asarray(x), np.asarray(z)


@pytest.fixture(scope="module")
def poisson_data():
    x, z = _poisson_truth().sample(jr.key(1), 400)
    return np.asarray(x), np.asarray(z)


@eqx.filter_jit
def _numerical_m_step(model, q, x, prior=None):
    new, _ = ej.ExactMStep(use_closed_form=False).step(model, q, None, x, key=None, prior=prior)
    return new


@eqx.filter_jit
def _generic_table(model, x):
    """The base class's table: ``log_joint`` vmapped over data and states (no fast path)."""
    return ej.Model.log_joint_table(model, x)


@eqx.filter_jit
def _em_step(model, x):
    """One exact EM step outside ``fit``: exact posterior, then the closed-form M-step."""
    return model.maximize(model.sufficient_statistics(x, model.posterior(x)))


@eqx.filter_jit
def _closed_m_step(model, q, x, prior=None):
    assert model.has_closed_form(prior)
    new, _ = ej.ExactMStep().step(model, q, None, x, key=None, prior=prior)
    return new


# --------------------------------------------------------------------------- NumPy EM oracles


def _numpy_bernoulli_em(weights, probs, x, num_iters, min_prob):
    w, p, x = np.array(weights, np.float64), np.array(probs, np.float64), np.asarray(x, np.float64)
    for _ in range(num_iters):
        table = np.log(w) + x @ np.log(p).T + (1 - x) @ np.log1p(-p).T
        r = np.exp(table - scipy.special.logsumexp(table, axis=1, keepdims=True))
        counts = r.sum(0)
        w = counts / counts.sum()
        p = np.clip((r.T @ x) / counts[:, None], min_prob, 1 - min_prob)
    return w, p


def _numpy_poisson_em(weights, rates, x, num_iters, min_rate):
    w, lam, x = (
        np.array(weights, np.float64),
        np.array(rates, np.float64),
        np.asarray(x, np.float64),
    )
    log_fact = scipy.special.gammaln(x + 1).sum(1, keepdims=True)
    for _ in range(num_iters):
        table = np.log(w) + x @ np.log(lam).T - lam.sum(1) - log_fact
        r = np.exp(table - scipy.special.logsumexp(table, axis=1, keepdims=True))
        counts = r.sum(0)
        w = counts / counts.sum()
        lam = np.maximum((r.T @ x) / counts[:, None], min_rate)
    return w, lam


# --------------------------------------------------------------------------- log-joint, evidence


@pytest.mark.parametrize("cast", [np.float64, np.int32, bool])
def test_bernoulli_table_matches_generic(bernoulli_data, cast):
    x = bernoulli_data[0][:50].astype(cast)
    model = _bernoulli_truth()
    fast = model.log_joint_table(x)
    generic = _generic_table(model, jnp.asarray(x))
    assert fast.shape == (50, 3) and fast.dtype == jnp.float64
    np.testing.assert_allclose(fast, generic, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cast", [np.float64, np.int32])
def test_poisson_table_matches_generic(poisson_data, cast):
    x = poisson_data[0][:50].astype(cast)
    model = _poisson_truth()
    fast = model.log_joint_table(x)
    generic = _generic_table(model, jnp.asarray(x))
    assert fast.shape == (50, 2) and fast.dtype == jnp.float64
    np.testing.assert_allclose(fast, generic, rtol=1e-12, atol=1e-12)


def test_bernoulli_log_evidence_matches_scipy(bernoulli_data):
    x = bernoulli_data[0]
    model = _bernoulli_truth()
    w, p = np.asarray(model.weights), np.asarray(model.probs)
    per_k = np.stack(
        [scipy.stats.bernoulli.logpmf(x, p[k]).sum(1) + np.log(w[k]) for k in range(3)], axis=1
    )
    expected = scipy.special.logsumexp(per_k, axis=1).mean()
    np.testing.assert_allclose(ej.log_evidence(model, x), expected, rtol=1e-12)


def test_poisson_log_evidence_matches_scipy(poisson_data):
    x = poisson_data[0]
    model = _poisson_truth()
    w, lam = np.asarray(model.weights), np.asarray(model.rates)
    per_k = np.stack(
        [scipy.stats.poisson.logpmf(x, lam[k]).sum(1) + np.log(w[k]) for k in range(2)], axis=1
    )
    expected = scipy.special.logsumexp(per_k, axis=1).mean()
    np.testing.assert_allclose(ej.log_evidence(model, x), expected, rtol=1e-12)


# --------------------------------------------------------------------------- EM vs NumPy EM


def test_emission_families_match_scipy(bernoulli_data, poisson_data):
    """The shared emission functions (used by the mixtures, later by HMMs): per-state
    log-densities against SciPy, and the M-step of count statistics (an empty state kept)."""
    x, _ = bernoulli_data
    p = np.asarray(_bernoulli_truth().probs)
    table = emissions.bernoulli_log_density(jnp.asarray(x), emissions.clipped_logit(p, 1e-6))
    want = np.stack([scipy.stats.bernoulli.logpmf(x, p[k]).sum(1) for k in range(3)], axis=1)
    np.testing.assert_allclose(np.asarray(table), want, rtol=1e-10)
    x, _ = poisson_data
    lam = np.asarray(_poisson_truth().rates)
    table = emissions.poisson_log_density(jnp.asarray(x), jnp.log(jnp.asarray(lam)))
    want = np.stack([scipy.stats.poisson.logpmf(x, lam[k]).sum(1) for k in range(2)], axis=1)
    np.testing.assert_allclose(np.asarray(table), want, rtol=1e-10)
    resp = np.zeros((x.shape[0], 3))
    resp[:, 0] = 0.25
    resp[:, 2] = 0.75
    stats = emissions.count_statistics(jnp.asarray(x), jnp.asarray(resp))
    old = jnp.full((3, 2), 0.5)
    new = emissions.poisson_maximize(stats["counts"], stats["sums"], old, min_rate=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(new[0])), x.mean(0), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(new[1]), 0.5)  # no data: the old log-rates


def test_bernoulli_fit_matches_numpy_em(bernoulli_data):
    x = bernoulli_data[0]
    model = BernoulliMixture.initialize(jr.key(2), x, 3)
    res = ej.fit(model, x, tol=0.0, max_iters=ITERS)
    assert res.num_iters == ITERS and res.num_increases == 0
    w, p = _numpy_bernoulli_em(model.weights, model.probs, x, ITERS, model.min_prob)
    np.testing.assert_allclose(res.model.weights, w, rtol=1e-6)
    np.testing.assert_allclose(res.model.probs, p, rtol=1e-6)


def test_poisson_fit_matches_numpy_em(poisson_data):
    x = poisson_data[0].astype(np.int64)
    model = PoissonMixture.initialize(jr.key(3), x, 2)
    res = ej.fit(model, x, tol=0.0, max_iters=ITERS)
    assert res.num_iters == ITERS and res.num_increases == 0
    w, lam = _numpy_poisson_em(model.weights, model.rates, x, ITERS, model.min_rate)
    np.testing.assert_allclose(res.model.weights, w, rtol=1e-6)
    np.testing.assert_allclose(res.model.rates, lam, rtol=1e-6)


def test_poisson_fit_recovers_truth(poisson_data):
    x, z = poisson_data
    res = ej.fit(PoissonMixture.initialize(jr.key(4), x, 2), x, max_iters=ITERS)
    assert res.num_increases == 0
    order = np.argsort(np.asarray(res.model.rates[:, 0]))  # truth: component 0 has rate 1.5
    np.testing.assert_allclose(res.model.weights[order], [0.3, 0.7], atol=0.07)
    np.testing.assert_allclose(res.model.rates[order], [[1.5, 8.0], [6.0, 0.7]], rtol=0.15)


def test_bernoulli_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x = sklearn_datasets.load_digits().data > 7  # bool (1797, 64)
    model = BernoulliMixture.initialize(jr.key(5), x, 10)
    res = ej.fit(model, x, tol=0.0, max_iters=ITERS)
    history = np.asarray(res.history)
    assert res.num_iters == ITERS and res.num_increases == 0
    assert np.all(np.isfinite(history))
    assert np.all(np.diff(history) >= -1e-12 * np.abs(history[1:]))
    assert history[-1] > float(res.initial_elbo) + 1.0
    # the same EM in NumPy (some pixels are never on, so the min_prob floor is active)
    w, p = _numpy_bernoulli_em(model.weights, model.probs, x, ITERS, model.min_prob)
    assert np.any(p == model.min_prob)
    np.testing.assert_allclose(res.model.weights, w, rtol=1e-6)
    np.testing.assert_allclose(res.model.probs, p, rtol=1e-6)


# ------------------------------------------------------------------ closed form vs numerical


@pytest.mark.parametrize("prior", [None, BernoulliMixturePrior(2.0, 3.0, 1.5)])
def test_bernoulli_closed_form_equals_numerical(bernoulli_data, prior):
    x = jnp.asarray(bernoulli_data[0])
    model = BernoulliMixture.initialize(jr.key(6), x, 3)
    q = model.posterior(x)
    closed = _closed_m_step(model, q, x, prior)
    numerical = _numerical_m_step(model, q, x, prior)
    probs = np.asarray(closed.probs)
    assert np.all((probs > 1e-3) & (probs < 1 - 1e-3))  # the floor is inactive here
    assert not np.allclose(closed.probs, model.probs, atol=1e-3)  # the step moved
    np.testing.assert_allclose(closed.weights, numerical.weights, rtol=1e-6)
    np.testing.assert_allclose(closed.probs, numerical.probs, rtol=1e-6)


@pytest.mark.parametrize("prior", [None, PoissonMixturePrior(2.0, 3.0, 0.5)])
def test_poisson_closed_form_equals_numerical(poisson_data, prior):
    x = jnp.asarray(poisson_data[0])
    model = PoissonMixture.initialize(jr.key(7), x, 2)
    q = model.posterior(x)
    closed = _closed_m_step(model, q, x, prior)
    numerical = _numerical_m_step(model, q, x, prior)
    assert np.all(np.asarray(closed.rates) > 1e-2)  # the floor is inactive here
    np.testing.assert_allclose(closed.weights, numerical.weights, rtol=1e-6)
    np.testing.assert_allclose(closed.rates, numerical.rates, rtol=1e-6)


def test_sufficient_statistics_are_additive(bernoulli_data):
    x = jnp.asarray(bernoulli_data[0])
    model = _bernoulli_truth()
    q = model.posterior(x)
    whole = model.sufficient_statistics(x, q)
    parts = (slice(0, 150), slice(150, None))
    halves = [model.sufficient_statistics(x[s], ej.Categorical(q.logits[s])) for s in parts]
    summed = jax.tree_util.tree_map(lambda a, b: a + b, *halves)
    for key in ("counts", "sums"):
        np.testing.assert_allclose(whole[key], summed[key], rtol=1e-12)
    np.testing.assert_allclose(whole["counts"].sum(), x.shape[0], rtol=1e-12)


# --------------------------------------------------------------------------- priors


def test_bernoulli_prior_log_density_matches_scipy():
    model, prior = _bernoulli_truth(), BernoulliMixturePrior(2.5, 3.0, 1.5)
    w, p = np.asarray(model.weights), np.asarray(model.probs)
    expected = (
        scipy.stats.dirichlet.logpdf(w, np.full(3, 2.5))
        + scipy.stats.beta.logpdf(p, 3.0, 1.5).sum()
    )
    np.testing.assert_allclose(prior(model), expected, rtol=1e-10)


def test_poisson_prior_log_density_matches_scipy():
    model, prior = _poisson_truth(), PoissonMixturePrior(1.5, 2.0, 0.5)
    w, lam = np.asarray(model.weights), np.asarray(model.rates)
    log_gamma = scipy.stats.gamma.logpdf(lam, a=2.0, scale=1 / 0.5).sum()
    expected = scipy.stats.dirichlet.logpdf(w, np.full(2, 1.5)) + log_gamma
    np.testing.assert_allclose(prior(model), expected, rtol=1e-10)


def test_map_fit_is_monotone(bernoulli_data):
    x = bernoulli_data[0]
    prior = BernoulliMixturePrior(2.0, 2.0, 2.0)
    res = ej.fit(BernoulliMixture.initialize(jr.key(9), x, 3), x, prior=prior, max_iters=ITERS)
    history = np.asarray(res.history)
    assert res.num_increases == 0
    assert np.all(np.diff(history) >= -1e-12 * np.abs(history[1:]))
    # the MAP objective: log-evidence plus log prior per datum
    expected = float(ej.log_evidence(res.model, x)) + float(prior(res.model)) / x.shape[0]
    np.testing.assert_allclose(res.elbo, expected, rtol=1e-10)


# ------------------------------------------------------------------ numerics, dtypes, steps


@pytest.mark.parametrize("kind", ["bernoulli", "poisson"])
def test_float32_fit_stays_float32(bernoulli_data, poisson_data, kind):
    if kind == "bernoulli":
        x = bernoulli_data[0].astype(np.int32)
        model = BernoulliMixture.initialize(jr.key(10), x.astype(np.float32), 3)
    else:
        x = poisson_data[0].astype(np.float32)
        model = PoissonMixture.initialize(jr.key(10), x, 2)
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    q = None if kind == "bernoulli" else ej.PointMass()  # hard EM: one-hot float64 probs
    res = ej.fit(model, x, q=q, max_iters=ITERS)
    assert res.status != ej.Status.NONFINITE
    assert res.history.dtype == jnp.float32 and np.all(np.isfinite(res.history))
    for leaf in jax.tree_util.tree_leaves(eqx.filter(res.model, eqx.is_inexact_array)):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
    if kind == "poisson":  # hard EM at its fixed point: rates are the means of the clusters
        assert res.converged and isinstance(res.q, ej.PointMass)
        labels = np.asarray(res.q.value)
        means = np.stack([x[labels == k].mean(0) for k in range(2)])
        np.testing.assert_allclose(res.model.rates, means, rtol=1e-5)
        np.testing.assert_allclose(res.model.weights, np.bincount(labels) / len(x), rtol=1e-5)
    assert model.log_joint_table(x).dtype == jnp.float32


def test_empty_component_keeps_parameters_without_nan():
    # Bernoulli: maximise directly from statistics with a zero count.
    model = _bernoulli_truth()
    stats = {"counts": jnp.array([0.0, 6.0, 4.0]), "sums": jnp.zeros((3, 5)).at[1:].set(2.0)}
    new = model.maximize(stats)
    assert np.all(np.isfinite(new.logits)) and np.all(np.isfinite(new.weight_logits))
    np.testing.assert_array_equal(new.logits[0], model.logits[0])
    np.testing.assert_allclose(new.weights, [0.0, 0.6, 0.4], atol=1e-300)
    np.testing.assert_allclose(new.probs[1:], np.full((2, 5), [[2 / 6], [2 / 4]]), rtol=1e-12)


def test_empty_component_in_fit(poisson_data):
    # Poisson: a component so far from the data that its responsibilities underflow to 0.
    x = poisson_data[0]
    model = PoissonMixture(jnp.array([0.5, 0.5]), jnp.array([[1.0, 1.0], [1e4, 1e4]]))
    assert np.all(np.asarray(model.predict_proba(x))[:, 1] == 0)
    res = ej.fit(model, x, max_iters=ITERS)
    assert res.status != ej.Status.NONFINITE
    assert np.all(np.isfinite(res.model.log_rates)) and np.all(np.isfinite(res.model.weight_logits))
    np.testing.assert_allclose(res.model.rates[1], [1e4, 1e4], rtol=1e-12)
    np.testing.assert_allclose(res.model.rates[0], x.mean(0), rtol=1e-12)
    assert float(res.model.weights[1]) < 1e-300


def test_bernoulli_floor_keeps_logits_finite():
    # Dimension 0 is always 1, dimension 1 always 0: the MLE is 1 and 0, the floor keeps
    # the logits finite.
    x = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 1], [1, 0, 0]])
    model = BernoulliMixture(jnp.array([1.0]), jnp.array([[0.5, 0.5, 0.5]]), min_prob=1e-4)
    new = _em_step(model, jnp.asarray(x))
    assert np.all(np.isfinite(new.logits))
    np.testing.assert_allclose(new.probs[0], [1 - 1e-4, 1e-4, 0.5], rtol=1e-12)


@pytest.mark.parametrize("kind", ["bernoulli", "poisson"])
def test_gradient_m_step_increases_elbo(bernoulli_data, poisson_data, kind):
    if kind == "bernoulli":
        x = bernoulli_data[0]
        model = BernoulliMixture.initialize(jr.key(11), x, 3)
    else:
        x = poisson_data[0]
        model = PoissonMixture.initialize(jr.key(11), x, 2)
    m_step = ej.GradientMStep(optax.adam(0.05), num_steps=5)
    res = ej.fit(model, x, m_step=m_step, tol=0.0, max_iters=ITERS)
    history = np.asarray(res.history)
    assert np.all(np.isfinite(history))
    assert history[-1] > float(res.initial_elbo) + 0.01
    assert history[-1] >= history.max() - 1e-3  # adam may wobble a little near the optimum


def test_sample_predict_and_initialize(bernoulli_data):
    model = _bernoulli_truth()
    x, z = model.sample(jr.key(12), 400)
    assert x.shape == (400, 5) and z.shape == (400,) and x.dtype == jnp.float64
    np.testing.assert_allclose(
        np.bincount(np.asarray(z), minlength=3) / 400, model.weights, atol=0.07
    )
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model.predict(x), np.argmax(proba, 1))
    np.testing.assert_allclose(proba, model.posterior(x).probs, rtol=1e-10)
    counts, _ = _poisson_truth().sample(jr.key(12), 10)
    assert counts.shape == (10, 2) and np.all(np.asarray(counts) == np.round(np.asarray(counts)))

    data = bernoulli_data[0]
    a = BernoulliMixture.initialize(jr.key(13), data, 3)
    b = BernoulliMixture.initialize(jr.key(13), data, 3)
    c = BernoulliMixture.initialize(jr.key(14), data, 3)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert not np.allclose(a.logits, c.logits)
    assert a.num_components == 3 and a.dim == 5 and a.latent == ej.Discrete(3)
    p = PoissonMixture.initialize(jr.key(13), data, 3)
    assert p.rates.shape == (3, 5) and np.all(np.asarray(p.rates) > 0)


def test_constructor_keeps_dtype_and_validates():
    m = BernoulliMixture(
        np.array([0.5, 0.5], np.float32), np.array([[0.0, 1.0], [0.3, 0.6]], np.float32)
    )
    assert m.logits.dtype == jnp.float32 and m.weight_logits.dtype == jnp.float32
    assert np.all(np.isfinite(m.logits))  # probs 0 and 1 are clipped by min_prob
    p = PoissonMixture(np.array([1.0], np.float32), np.array([[2.0, 3.0]], np.float32))
    assert p.log_rates.dtype == jnp.float32
    np.testing.assert_allclose(p.rates, [[2.0, 3.0]], rtol=1e-6)


# --------------------------------------------------------------------------- errors


def test_error_messages():
    bm = _bernoulli_truth()
    pm = _poisson_truth()
    with pytest.raises(ValueError, match=r"x has shape \(5,\), expected \(N, D\) with D=5"):
        bm.check_data(jnp.zeros(5))
    with pytest.raises(ValueError, match=r"x has shape \(4, 3\), expected \(N, D\) with D=5"):
        ej.fit(bm, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"x must be binary.*x\[1, 2\] = 2"):
        ej.fit(bm, _with(np.zeros((4, 5)), (1, 2), 2))
    with pytest.raises(ValueError, match=r"x has shape \(3, 1\), expected \(N, D\) with D=2"):
        pm.check_data(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"nonnegative integer counts.*x\[0, 1\] = -1"):
        ej.fit(pm, _with(np.zeros((4, 2)), (0, 1), -1))
    with pytest.raises(ValueError, match=r"nonnegative integer counts.*x\[2, 0\] = 0.5"):
        pm.check_data(_with(np.zeros((4, 2)), (2, 0), 0.5))
    with pytest.raises(ValueError, match=r"num_components=5 is larger than the number of data N=4"):
        BernoulliMixture.initialize(jr.key(0), np.zeros((4, 2)), 5)
    with pytest.raises(ValueError, match=r"num_components=5 is larger than the number of data N=4"):
        PoissonMixture.initialize(jr.key(0), np.zeros((4, 2)), 5)
    with pytest.raises(ValueError, match=r"num_components must be a positive int"):
        PoissonMixture.initialize(jr.key(0), np.zeros((4, 2)), 0)
    with pytest.raises(ValueError, match=r"weights must be a probability vector"):
        BernoulliMixture(jnp.array([0.5, 0.6]), jnp.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"weights must be a probability vector"):
        PoissonMixture(jnp.array([1.2, -0.2]), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"weights has shape \(2, 1\), expected \(K,\)"):
        PoissonMixture(jnp.full((2, 1), 0.5), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        BernoulliMixture(jnp.array([0.5, 0.5]), jnp.array([[0.5, 1.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"probs has shape \(3, 2\), expected \(K, D\) with K=2"):
        BernoulliMixture(jnp.array([0.5, 0.5]), jnp.full((3, 2), 0.5))
    with pytest.raises(ValueError, match=r"rates must be finite and > 0"):
        PoissonMixture(jnp.array([0.5, 0.5]), jnp.array([[1.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"rates has shape \(2,\), expected \(K, D\) with K=2"):
        PoissonMixture(jnp.array([0.5, 0.5]), jnp.ones(2))
    with pytest.raises(ValueError, match=r"min_prob must be a number in \(0, 0.5\)"):
        BernoulliMixture(jnp.array([1.0]), jnp.full((1, 2), 0.5), min_prob=0.0)
    with pytest.raises(ValueError, match=r"min_rate must be a finite number > 0"):
        PoissonMixture(jnp.array([1.0]), jnp.ones((1, 2)), min_rate=-1.0)
    with pytest.raises(ValueError, match=r"a must be a finite number >= 1"):
        BernoulliMixturePrior(1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"rate must be a finite number > 0"):
        PoissonMixturePrior(1.0, 1.0, 0.0)
    with pytest.raises(TypeError, match=r"knows BernoulliMixturePrior or None"):
        bm.maximize(
            bm.sufficient_statistics(jnp.zeros((2, 5)), bm.posterior(jnp.zeros((2, 5)))),
            PoissonMixturePrior(),
        )
    assert not bm.has_closed_form(PoissonMixturePrior()) and bm.has_closed_form(None)
    assert pm.has_closed_form(PoissonMixturePrior()) and not pm.has_closed_form(lambda m: 0.0)


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array
