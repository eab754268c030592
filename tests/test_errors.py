"""Bad input gets a clear error naming the argument; a fit that goes non-finite stops safely."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    coin_data,
    linear_gaussian,
    linear_gaussian_data,
    poisson_data,
    poisson_mixture,
    poisson_table_np,
    three_coins,
)
from scipy.special import logsumexp, softmax

import elbo_jax as ej

X_COINS = coin_data(n=20, seed=0)
X_LG = linear_gaussian_data(n=20, seed=0)
COINS = three_coins([0.1, 0.5, -0.5])
GAUSSIAN_E_STEP = ej.GradientEStep(optax.adam(0.1))


# -------------------------------------------------------------------------- data
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data(bad):
    x = X_COINS.copy()
    x[7] = bad
    with pytest.raises(
        ValueError, match=r"x contains NaN or Inf: 1 entries, the first at index \(7,\)"
    ):
        ej.fit(COINS, x)


def test_scalar_data():
    with pytest.raises(ValueError, match="x is a scalar"):
        ej.fit(COINS, 3.0)


def test_empty_data():
    with pytest.raises(ValueError, match=r"x has shape \(0,\): there are no data"):
        ej.fit(COINS, np.zeros(0))
    with pytest.raises(ValueError, match="x is empty"):
        ej.fit(COINS, [])


def test_non_numeric_data():
    with pytest.raises(TypeError, match="x must hold numbers"):
        ej.fit(COINS, np.array(["a", "b"]))


def test_data_leaves_with_different_lengths():
    class Pair(ej.Model):
        a: jax.Array
        latent = ej.Discrete(2)

        def log_joint(self, x, z):
            return -((x[0] - self.a[z]) ** 2) - x[1] ** 2

    with pytest.raises(ValueError, match=r"different numbers of data.*\[3, 4\]"):
        ej.fit(Pair(jnp.zeros(2)), (np.zeros(3), np.zeros(4)))


def test_data_of_wrong_rank_names_x():
    """x (N,) for a model whose log_joint works on x in R^2: log_joint indexes a scalar."""
    with pytest.raises(
        ValueError, match=r"log_joint failed on one datum of x: x has shape \(20,\)"
    ):
        ej.fit(linear_gaussian(), X_LG[:, 0], q=ej.Gaussian(), e_step=GAUSSIAN_E_STEP)


def test_data_of_wrong_dimension_names_x():
    x = np.concatenate([X_LG, X_LG[:, :1]], axis=1)  # (N, 3) for a model of x in R^2
    with pytest.raises(
        ValueError,
        match=r"x has shape \(20, 3\), so one datum has shape \(3,\).*incompatible shapes",
    ):
        ej.fit(linear_gaussian(), x, q=ej.Gaussian(), e_step=GAUSSIAN_E_STEP)


def test_data_of_extra_rank_for_scalar_model():
    """x (N, 2) for three coins: log_joint silently broadcasts to shape (2,)."""
    with pytest.raises(
        TypeError, match=r"must return a scalar.*got shape \(2,\).*x has shape \(20, 2\)"
    ):
        ej.fit(COINS, np.stack([X_COINS, X_COINS], axis=1))


def test_a_checked_shape_is_remembered_and_a_new_one_still_checked():
    # The log_joint check is traced once per model structure and datum shape: a second fit
    # of the same shapes skips it, a fit of another datum shape is checked again.
    from elbo_jax import _validate

    ej.fit(COINS, X_COINS, max_iters=2)
    checked = len(_validate._CHECKED)
    ej.fit(COINS, X_COINS[:10], max_iters=2)  # the same datum shape
    assert len(_validate._CHECKED) == checked
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(TypeError, match=r"must return a scalar.*got shape \(2,\)"):
            ej.fit(COINS, np.stack([X_COINS, X_COINS], axis=1))
        assert len(_validate._CHECKED) == checked


# ------------------------------------------------------------------------- model
def test_model_not_an_ej_model():
    with pytest.raises(
        TypeError, match="model must be an instance of an ej.Model subclass, got dict"
    ):
        ej.fit({"logits": jnp.zeros(3)}, X_COINS)


def test_model_without_latent():
    class NoLatent(ej.Model):
        logits: jax.Array

        def log_joint(self, x, z):
            return self.logits[z]

    with pytest.raises(TypeError, match="abstract.*latent"):
        NoLatent(jnp.zeros(2))


def test_model_without_log_joint():
    class NoLogJoint(ej.Model):
        logits: jax.Array
        latent = ej.Discrete(2)

    with pytest.raises(TypeError, match="abstract.*log_joint"):
        NoLogJoint(jnp.zeros(2))


def test_log_joint_not_scalar():
    class Vector(ej.Model):
        logits: jax.Array
        latent = ej.Discrete(2)

        def log_joint(self, x, z):
            return self.logits * x  # shape (2,)

    with pytest.raises(TypeError, match=r"Vector.log_joint must return a scalar.*got shape \(2,\)"):
        ej.fit(Vector(jnp.zeros(2)), X_COINS)


def test_bad_latent_spaces():
    with pytest.raises(ValueError, match="num_states >= 1"):
        ej.Discrete(0)
    with pytest.raises(TypeError, match="Discrete\\(num_states\\) needs an int"):
        ej.Discrete(2.5)
    with pytest.raises(ValueError, match="positive integer sizes"):
        ej.Real((2, 0))


def test_non_finite_initial_free_energy():
    with pytest.raises(ValueError, match="initial model and q give a non-finite free energy"):
        ej.fit(three_coins([np.nan, 0.0, 0.0]), coin_data(n=60, seed=11), max_iters=8)


def test_real_latent_without_posterior_hook_has_no_exact_e_step():
    with pytest.raises(NotImplementedError, match="no `posterior` hook"):
        ej.fit(linear_gaussian(), X_LG)
    with pytest.raises(NotImplementedError, match="no `log_marginal`"):
        ej.log_evidence(linear_gaussian(), X_LG)


# ------------------------------------------------------------------------------ q
def test_gaussian_q_for_discrete_latent():
    with pytest.raises(
        TypeError, match="q=Gaussian is a distribution over a Real latent.*Discrete"
    ):
        ej.fit(COINS, X_COINS, q=ej.Gaussian(), e_step=GAUSSIAN_E_STEP)
    q = ej.Gaussian(jnp.zeros((20, 1)), jnp.zeros((20, 1, 1)))
    with pytest.raises(TypeError, match="q=Gaussian is a distribution over a Real latent"):
        ej.free_energy(COINS, q, X_COINS)


def test_categorical_q_for_real_latent():
    with pytest.raises(TypeError, match="q=Categorical is a distribution over a Discrete latent"):
        ej.fit(linear_gaussian(), X_LG, q=ej.Categorical(), e_step=GAUSSIAN_E_STEP)
    with pytest.raises(TypeError, match="q=Categorical is a distribution over a Discrete latent"):
        ej.free_energy(linear_gaussian(), ej.Categorical(jnp.zeros((20, 2))), X_LG)


@pytest.mark.parametrize("shape", [(20, 3), (19, 2), (20,)])
def test_categorical_logits_of_wrong_shape(shape):
    q = ej.Categorical(jnp.zeros(shape))
    match = rf"Categorical logits have shape \({shape[0]},.*expected \(N, K\) = \(20, 2\)"
    with pytest.raises(ValueError, match=match):
        ej.fit(COINS, X_COINS, q=q)
    with pytest.raises(ValueError, match=match):
        ej.free_energy(COINS, q, X_COINS)


def test_gaussian_parameters_of_wrong_shape():
    with pytest.raises(
        ValueError, match=r"Gaussian mean has shape \(20, 2\), expected \(N, d\) = \(20, 1\)"
    ):
        ej.free_energy(
            linear_gaussian(), ej.Gaussian(jnp.zeros((20, 2)), jnp.zeros((20, 2, 2))), X_LG
        )
    with pytest.raises(
        ValueError, match=r"Gaussian raw_scale has shape \(20, 1\), expected \(20, 1, 1\)"
    ):
        ej.free_energy(linear_gaussian(), ej.Gaussian(jnp.zeros((20, 1)), jnp.zeros((20, 1))), X_LG)


def test_point_mass_of_wrong_kind():
    q = ej.PointMass(jnp.zeros(20), 2)  # floats for a Discrete latent
    with pytest.raises(ValueError, match="PointMass value .* expected integers of shape"):
        ej.free_energy(COINS, q, X_COINS)


def test_bad_gaussian_options():
    with pytest.raises(ValueError, match="covariance_type must be 'full' or 'diag'"):
        ej.Gaussian(covariance_type="spherical")
    with pytest.raises(ValueError, match="expectation must be 'cubature' or 'monte_carlo'"):
        ej.Gaussian(expectation="laplace")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ej.Gaussian(expectation="monte_carlo", num_samples=0)


def test_diagonal_gaussian_has_no_exact_e_step():
    with pytest.raises(TypeError, match="covariance_type='diag'\\) has no exact E-step"):
        ej.fit(linear_gaussian(exact=True), X_LG, q=ej.Gaussian(covariance_type="diag"))


def test_monte_carlo_free_energy_needs_key():
    q = ej.Gaussian(jnp.zeros((20, 1)), jnp.zeros((20, 1, 1)), expectation="monte_carlo")
    with pytest.raises(ValueError, match="needs a random key"):
        ej.free_energy(linear_gaussian(), q, X_LG)


def test_not_a_q():
    with pytest.raises(TypeError, match="q must be an elbo_jax recognition family"):
        ej.fit(COINS, X_COINS, q="categorical")


# ------------------------------------------------------------------- fit arguments
@pytest.mark.parametrize("max_iters", [0, -1, 2.5, True, "10", None])
def test_bad_max_iters(max_iters):
    with pytest.raises(ValueError, match="max_iters must be a positive int"):
        ej.fit(COINS, X_COINS, max_iters=max_iters)


@pytest.mark.parametrize("tol", [-1e-3, np.nan, np.inf, "small", None])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        ej.fit(COINS, X_COINS, tol=tol)


def test_bad_e_step():
    with pytest.raises(ValueError, match="e_step must be 'exact' or an ej.GradientEStep"):
        ej.fit(COINS, X_COINS, e_step="gradient")
    with pytest.raises(TypeError, match="e_step must be 'exact' or an ej.GradientEStep"):
        ej.fit(COINS, X_COINS, e_step=optax.adam(0.1))
    with pytest.raises(TypeError, match="q=ej.ExactPosterior\\(\\) is always fitted exactly"):
        ej.fit(COINS, X_COINS, e_step=ej.GradientEStep(optax.adam(0.1)))
    with pytest.raises(TypeError, match="needs a q with continuous parameters.*PointMass"):
        ej.fit(COINS, X_COINS, q=ej.PointMass(), e_step=ej.GradientEStep(optax.adam(0.1)))


def test_bad_m_step():
    with pytest.raises(ValueError, match="m_step must be 'exact', ej.GradientMStep"):
        ej.fit(COINS, X_COINS, m_step="gradient")
    with pytest.raises(TypeError, match="m_step must be 'exact', ej.GradientMStep"):
        ej.fit(COINS, X_COINS, m_step=optax.adam(0.1))
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        ej.ExactMStep(max_steps=0)


@pytest.mark.parametrize("step", [ej.GradientMStep, ej.GradientEStep])
def test_bad_optimizer(step):
    with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation"):
        step("adam")
    with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation"):
        step(optax.adam)  # the factory, not an optimizer
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        step(optax.adam(0.1), num_steps=0)


def test_bad_prior():
    with pytest.raises(TypeError, match="prior must be a callable"):
        ej.fit(COINS, X_COINS, prior=1.0)


# ------------------------------------------------------------------- non-finite fit
LR_EXPLODING = 300.0  # a few finite iterations, then exp(log_rate) overflows
MIX0, LOG_RATES0 = np.array([0.3, 0.0, -0.2]), np.array([0.0, 1.0, 2.0])


def _sgd_em_np(x, lr, max_iters):
    """Exact E-step + one SGD step on F per iteration, in NumPy, to the last finite iterate."""
    mix, lam = MIX0.copy(), LOG_RATES0.copy()
    with np.errstate(all="ignore"):
        for i in range(max_iters):
            table = poisson_table_np(mix, lam, x)
            r = np.exp(table - logsumexp(table, axis=1, keepdims=True))
            grad_mix = softmax(mix) - r.mean(0)
            grad_lam = -np.mean(r * (x[:, None] - np.exp(lam)), axis=0)
            new_mix, new_lam = mix - lr * grad_mix, lam - lr * grad_lam
            table = poisson_table_np(new_mix, new_lam, x)
            log_px = logsumexp(table, axis=1)
            log_q = table - log_px[:, None]  # may be -inf: a component ruled out for a datum
            finite_params = np.isfinite(new_mix).all() and np.isfinite(new_lam).all()
            if not (finite_params and np.isfinite(log_px).all() and (log_q < np.inf).all()):
                return i, mix, lam
            mix, lam = new_mix, new_lam
    return max_iters, mix, lam


def test_exploding_learning_rate_stops_at_last_finite_iterate():
    x = poisson_data(n=60, seed=12)
    model = poisson_mixture(MIX0, LOG_RATES0)
    m_step = ej.GradientMStep(optax.sgd(LR_EXPLODING))
    num_iters, mix, lam = _sgd_em_np(x, LR_EXPLODING, 20)
    assert 1 <= num_iters < 20  # finite for a while, then not
    with pytest.warns(
        RuntimeWarning, match=f"fit stopped after {num_iters} iterations: a step made"
    ):
        res = ej.fit(model, x, m_step=m_step, max_iters=20, tol=0)
    assert res.status == ej.Status.NONFINITE
    assert not res.converged
    assert res.message == ej.Status.NONFINITE.message
    assert res.num_iters == num_iters
    assert res.history.shape == (num_iters,)
    assert np.isfinite(res.history).all()
    for leaf in jax.tree_util.tree_leaves(res.model):
        assert np.isfinite(leaf).all()
    # q's log-probabilities may be -inf (the overflowing rate rules a component out)
    np.testing.assert_allclose(res.q.probs.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(res.model.mix_logits, mix, rtol=1e-10)
    np.testing.assert_allclose(res.model.log_rates, lam, rtol=1e-10)
    np.testing.assert_allclose(res.history[-1], ej.log_evidence(res.model, x), rtol=1e-12)

    with pytest.raises(RuntimeError, match=f"fit stopped after {num_iters} iterations"):
        ej.fit(model, x, m_step=m_step, max_iters=20, tol=0, throw=True)
