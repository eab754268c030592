"""Statistics found in a user's log_joint (``_autostats``): oracles are brute-force sums of
``log_joint`` over data and states, and the numerical M-step on the whole data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PoissonMixture, ThreeCoins

import elbo_jax as ej
from elbo_jax import _autostats

RNG = np.random.default_rng(3)


class PerStateFeatures(ej.Model):
    """x is a K-vector; state z looks only at x[z] (a feature that depends on z)."""

    logits: jax.Array
    scale: jax.Array
    latent = ej.Discrete(3)

    def log_joint(self, x, z):
        return (
            jax.nn.log_softmax(self.logits)[z]
            - 0.5 * x[z] * jnp.exp(self.scale[z])
            + (0.5 * self.scale[z])
        )


class Quadratic(ej.Model):
    """A Gaussian-mixture log-joint: (x - mu)^2 is not affine in any data-only value."""

    loc: jax.Array
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return -0.5 * (x - self.loc[z]) ** 2


def _cases():
    pois = PoissonMixture(jnp.array([0.1, -0.2, 0.3]), jnp.log(jnp.array([1.0, 4.0, 9.0])))
    x_pois = RNG.poisson(4.0, 60).astype(np.float64)
    coins = ThreeCoins(jnp.array([0.3, -0.5, 1.0]))
    x_coins = RNG.integers(0, 11, 40).astype(np.float64)
    per_state = PerStateFeatures(jnp.zeros(3), jnp.array([0.0, 0.5, -0.5]))
    x_state = RNG.exponential(size=(50, 3))
    return [("poisson", pois, x_pois), ("coins", coins, x_coins), ("per-state", per_state, x_state)]


CASES = _cases()


def _perturbed(model):
    return jax.tree_util.tree_map(
        lambda a: a + 0.1 * jnp.asarray(RNG.normal(size=a.shape)) if eqx_inexact(a) else a, model
    )


def eqx_inexact(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.inexact)


@pytest.mark.parametrize("name, model, x", CASES, ids=[c[0] for c in CASES])
def test_objective_equals_the_brute_force_expected_log_joint(name, model, x):
    x = jnp.asarray(x)
    split = _autostats.affine_split(model, x)
    assert split is not None
    q = model.posterior(x)
    stats = split.statistics(model, x, q)
    other = _perturbed(model)  # the objective at parameters other than q's
    table = np.asarray(ej.Model.log_joint_table(other, x))
    expected = np.sum(np.asarray(q.probs) * table)
    np.testing.assert_allclose(split.objective(other, stats), expected, rtol=1e-12)
    assert any(split.per_state) == (name == "per-state")


def test_no_split_for_a_log_joint_that_is_not_affine_in_data_features():
    assert _autostats.affine_split(Quadratic(jnp.array([0.0, 1.0])), jnp.ones((5,))) is None


def test_split_is_cached_per_structure():
    x = jnp.asarray(CASES[0][2])
    a = _autostats.affine_split(CASES[0][1], x)
    b = _autostats.affine_split(_perturbed(CASES[0][1]), x)
    assert a is b


@pytest.mark.parametrize("name, model, x", CASES, ids=[c[0] for c in CASES])
def test_fit_with_found_statistics_equals_the_numerical_m_step_on_all_data(name, model, x):
    fast = ej.fit(model, x, tol=0.0, max_iters=4)
    slow = ej.fit(model, x, q=ej.Categorical(), tol=0.0, max_iters=4)  # the whole-data path
    np.testing.assert_allclose(fast.history, slow.history, rtol=1e-8)
    assert fast.num_increases == 0
    np.testing.assert_allclose(fast.q.probs, fast.model.posterior(jnp.asarray(x)).probs)


def test_map_fit_with_found_statistics():
    model, x = CASES[0][1], CASES[0][2]
    prior = lambda m: -0.5 * jnp.sum(m.log_rates**2)
    fast = ej.fit(model, x, tol=0.0, max_iters=4, prior=prior)
    slow = ej.fit(model, x, q=ej.Categorical(), tol=0.0, max_iters=4, prior=prior)
    np.testing.assert_allclose(fast.history, slow.history, rtol=1e-8)


# ------------------------------------------------------------ the table from features
def _vmapped_table(model, x):
    states = jnp.arange(model.latent.num_states)
    return jax.vmap(lambda xn: jax.vmap(lambda z: model.log_joint(xn, z))(states))(x)


@pytest.mark.parametrize("name, model, x", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("precomputed", [True, False])
def test_table_from_features_equals_the_log_joint_of_every_datum_and_state(
    name, model, x, precomputed
):
    x = jnp.asarray(x)
    split = _autostats.affine_split(model, x)
    other = _perturbed(model)
    datum = split.datum_features(x) if precomputed else None
    expected = _vmapped_table(other, x)
    np.testing.assert_allclose(split.table(other, x, datum), expected, rtol=1e-12, atol=1e-12)
    offsets, weights = split.coefficients(other)
    assert offsets.shape == (other.latent.num_states,)
    assert len(weights) == len(split.features)


def test_built_in_models_split_into_features():
    # The built-in Poisson and Bernoulli log-joints are affine in data features; the GMM's
    # is quadratic.
    counts = jnp.asarray(RNG.poisson(3.0, (30, 2)), jnp.float64)
    pois = ej.models.PoissonMixture(jnp.array([0.4, 0.6]), jnp.array([[1.0, 2.0], [5.0, 0.5]]))
    bits = jnp.asarray(RNG.integers(0, 2, (30, 4)), jnp.float64)
    bern = ej.models.BernoulliMixture(jnp.array([0.5, 0.5]), jnp.full((2, 4), 0.3).at[1].set(0.8))
    for model, x in ((pois, counts), (bern, bits)):
        split = _autostats.affine_split(model, x)
        assert split is not None
        np.testing.assert_allclose(
            split.table(model, x, split.datum_features(x)), model.log_joint_table(x), rtol=1e-12
        )
    gmm = ej.models.GaussianMixture(
        jnp.array([0.5, 0.5]), jnp.zeros((2, 2)), jnp.ones((2, 2)), "diag"
    )
    assert _autostats.affine_split(gmm, counts) is None


@pytest.mark.parametrize("name, model, x", CASES, ids=[c[0] for c in CASES])
def test_fit_without_precomputed_features_is_the_same(name, model, x, monkeypatch):
    from elbo_jax._solvers import _statistics_em

    with_features = ej.fit(model, x, tol=0.0, max_iters=3)
    monkeypatch.setattr(_statistics_em, "MAX_FEATURE_RATIO", 0)  # features computed chunk by chunk
    jax.clear_caches()
    without = ej.fit(model, x, tol=0.0, max_iters=3)
    np.testing.assert_allclose(without.history, with_features.history, rtol=1e-12)
    np.testing.assert_allclose(without.q.probs, with_features.q.probs, rtol=1e-10, atol=1e-14)
