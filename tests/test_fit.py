"""ej.fit on user models against plain-NumPy EM, and the properties every EM run must have.

Compiles dominate the run time, so the tests share a few configurations: exact EM runs use
``max_iters=EM_ITERS`` and data of fixed sizes, so one compile serves many fits.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    coin_data,
    coins_em_np,
    linear_gaussian,
    linear_gaussian_data,
    linear_gaussian_loglik_np,
    linear_gaussian_ml_np,
    poisson_data,
    poisson_em_np,
    poisson_mixture,
    three_coins,
)
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from scipy.special import expit, logit, softmax

import elbo_jax as ej

EM_ITERS = 8  # exact-EM runs: tol=0, this many iterations
N_COINS = 60
N_POISSON = 60
COIN_INIT = np.array([0.1, 0.5, -0.5])
# No shrinking (a failure that retraces would recompile for every shrink step) and no
# example database written into the working tree.
PROPERTY = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate])


def _coins_np_from_logits(logits):
    return expit(logits[0]), expit(logits[1:])


def _coin_model_params(model):
    logits = np.asarray(model.logits)
    return expit(logits[0]), expit(logits[1:])


def _assert_monotone(res, rel=1e-12):
    """The ELBO never goes down: initial -> history[0] -> ... within rounding."""
    elbo = np.concatenate([[float(res.initial_elbo)], np.asarray(res.history)])
    slack = rel * (1 + np.abs(elbo[:-1]))
    assert np.all(np.diff(elbo) >= -slack), np.diff(elbo).min()
    assert res.num_increases == 0


# ------------------------------------------------------------------------- exact EM
@settings(max_examples=20, **PROPERTY)
@given(
    logits=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3),
    pi=st.floats(0.1, 0.9),
    p=st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)),
    seed=st.integers(0, 2**16),
)
def test_exact_em_never_lowers_elbo_three_coins(logits, pi, p, seed):
    x = coin_data(n=N_COINS, seed=seed, pi=pi, p=p)
    res = ej.fit(three_coins(logits), x, max_iters=EM_ITERS, tol=0)
    assert res.num_iters == EM_ITERS
    _assert_monotone(res)


@settings(max_examples=15, **PROPERTY)
@given(
    mix_logits=st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3),
    log_rates=st.lists(st.floats(-1.0, 3.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_exact_em_never_lowers_elbo_poisson_mixture(mix_logits, log_rates, seed):
    x = poisson_data(n=N_POISSON, seed=seed)
    res = ej.fit(poisson_mixture(mix_logits, log_rates), x, max_iters=EM_ITERS, tol=0)
    assert res.num_iters == EM_ITERS
    _assert_monotone(res)


def test_exact_em_three_coins_matches_numpy_em():
    x = coin_data(n=N_COINS, seed=11)
    res = ej.fit(three_coins(COIN_INIT), x, max_iters=EM_ITERS, tol=0)
    pi, p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, EM_ITERS)
    got_pi, got_p = _coin_model_params(res.model)
    np.testing.assert_allclose(got_pi, pi, atol=1e-6)
    np.testing.assert_allclose(got_p, p, atol=1e-6)
    # the last ELBO is the log-evidence of the final model (exact E-step)
    np.testing.assert_allclose(res.history[-1], ej.log_evidence(res.model, x), rtol=1e-12)


def test_exact_em_poisson_mixture_matches_numpy_em():
    x = poisson_data(n=N_POISSON, seed=12)
    mix_logits, log_rates = np.array([0.3, 0.0, -0.2]), np.array([0.0, 1.0, 2.0])
    res = ej.fit(poisson_mixture(mix_logits, log_rates), x, max_iters=EM_ITERS, tol=0)
    weights, rates = poisson_em_np(softmax(mix_logits), np.exp(log_rates), x, EM_ITERS)
    np.testing.assert_allclose(jax.nn.softmax(res.model.mix_logits), weights, atol=1e-6)
    np.testing.assert_allclose(np.exp(res.model.log_rates), rates, rtol=1e-6)


def test_progress_bar_gives_the_same_result():
    x = coin_data(n=N_COINS, seed=11)
    plain = ej.fit(three_coins(COIN_INIT), x, max_iters=EM_ITERS, tol=0)
    shown = ej.fit(three_coins(COIN_INIT), x, max_iters=EM_ITERS, tol=0, progress=True)
    np.testing.assert_array_equal(plain.model.logits, shown.model.logits)
    np.testing.assert_array_equal(plain.history, shown.history)
    assert shown.status == plain.status == ej.Status.MAX_ITERS


def test_status_and_result_fields():
    x = coin_data(n=N_COINS, seed=11)
    capped = ej.fit(three_coins(COIN_INIT), x, max_iters=EM_ITERS, tol=0)
    assert capped.status == ej.Status.MAX_ITERS
    assert not capped.converged
    assert capped.message == ej.Status.MAX_ITERS.message
    assert "max_iters" in capped.message
    assert capped.num_iters == EM_ITERS == capped.history.shape[0]
    assert capped.elbo == capped.history[-1]
    assert isinstance(capped.q, ej.Categorical)
    np.testing.assert_allclose(capped.q.probs.sum(-1), 1.0, rtol=1e-12)

    converged = ej.fit(three_coins(COIN_INIT), x, max_iters=EM_ITERS, tol=1e-2)
    assert converged.status == ej.Status.CONVERGED
    assert converged.converged
    assert "converged" in converged.message
    assert 1 <= converged.num_iters < EM_ITERS
    assert converged.history.shape == (converged.num_iters,)
    assert not np.isnan(converged.history).any()
    assert abs(converged.history[-1] - converged.history[-2]) < 1e-2
    # the same iterations as the capped run, up to where it stopped
    np.testing.assert_array_equal(converged.history, capped.history[: converged.num_iters])
    assert {s.name for s in ej.Status} == {"RUNNING", "CONVERGED", "MAX_ITERS", "NONFINITE"}
    assert all(isinstance(s.message, str) and s.message for s in ej.Status)


def test_float32_stays_float32_and_matches_float64():
    x = coin_data(n=N_COINS, seed=11)
    res64 = ej.fit(three_coins(COIN_INIT), x, max_iters=EM_ITERS, tol=0)
    res32 = ej.fit(
        three_coins(COIN_INIT, jnp.float32), x.astype(np.float32), max_iters=EM_ITERS, tol=0
    )
    assert res32.model.logits.dtype == jnp.float32
    assert res32.q.logits.dtype == jnp.float32
    assert res32.history.dtype == jnp.float32
    assert res32.initial_elbo.dtype == jnp.float32
    assert res64.history.dtype == jnp.float64
    np.testing.assert_allclose(res32.model.logits, res64.model.logits, rtol=1e-3, atol=1e-4)
    # float32 M-steps are solved to about sqrt(eps32) in the parameters, so early
    # iterates differ by ~1e-4 relative; the fits agree as they settle.
    np.testing.assert_allclose(res32.history, res64.history, rtol=1e-4)
    np.testing.assert_allclose(res32.history[-1], res64.history[-1], rtol=1e-6)


# ------------------------------------------------------------------------- MAP-EM
BETA = (3.0, 2.0)


def _beta_log_prior(m):
    """Beta(a, b) on pi and both head probabilities, as a density of the probabilities.

    No Jacobian: the M-step maximises E_q[log p(x, z | θ)] + log p(θ) as written, and the
    maximiser of a function does not depend on how its argument is parameterised. So
    with the density of the *probabilities* we get the MAP of the probabilities, which is
    the textbook closed form. (Adding log|dp/dlogit| would give the MAP of the logits.)
    """
    a, b = BETA
    return jnp.sum((a - 1) * jax.nn.log_sigmoid(m.logits) + (b - 1) * jax.nn.log_sigmoid(-m.logits))


def test_map_em_three_coins_matches_closed_form_numpy():
    x = coin_data(n=N_COINS, seed=11)
    res = ej.fit(three_coins(COIN_INIT), x, prior=_beta_log_prior, max_iters=EM_ITERS, tol=0)
    pi, p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, EM_ITERS, prior=BETA)
    got_pi, got_p = _coin_model_params(res.model)
    np.testing.assert_allclose(got_pi, pi, atol=1e-6)
    np.testing.assert_allclose(got_p, p, atol=1e-6)
    ml_pi, ml_p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, EM_ITERS)
    assert np.abs(np.r_[pi, p] - np.r_[ml_pi, ml_p]).max() > 1e-3  # the prior matters here
    _assert_monotone(res)
    # history is the ELBO plus log p(θ)/N
    expected = ej.log_evidence(res.model, x) + _beta_log_prior(res.model) / N_COINS
    np.testing.assert_allclose(res.history[-1], expected, rtol=1e-12)


# ----------------------------------------------------------- gradient M-steps
def test_small_step_gradient_m_step_is_monotone_and_reaches_em_optimum():
    x = coin_data(n=N_COINS, seed=11)
    m_step = ej.GradientMStep(optax.sgd(0.3), num_steps=2)
    res = ej.fit(three_coins(COIN_INIT), x, m_step=m_step, max_iters=3000, tol=1e-14)
    assert res.converged
    elbo = np.concatenate([[float(res.initial_elbo)], np.asarray(res.history)])
    assert np.all(np.diff(elbo) >= -1e-13)
    pi, p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, 5000)
    got_pi, got_p = _coin_model_params(res.model)
    np.testing.assert_allclose(got_pi, pi, atol=1e-5)
    np.testing.assert_allclose(got_p, p, atol=1e-5)


def test_fresh_optimizer_does_not_recompile():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    x = coin_data(n=N_COINS, seed=11)

    def run(lr):
        m_step = ej.GradientMStep(optax.adam(lr), num_steps=3)  # a fresh optimizer each time
        return ej.fit(three_coins(COIN_INIT), x, m_step=m_step, max_iters=7, tol=0)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = run(1e-2)
        num_first = len(compiles)
        second = run(1e-2)
        num_second = len(compiles) - num_first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # The listener does see compiles (max_iters=7 is unique to this test, so the first fit
    # compiles); a different learning rate is allowed to recompile, and is not tested.
    assert any("_call" in str(name) for name in compiles[:num_first]), compiles
    assert num_second == 0, compiles[num_first:]
    np.testing.assert_array_equal(first.model.logits, second.model.logits)


class ZeroInflatedPoisson(ej.Model):
    """z = 0: a structural zero (log p(x | z=0) = -inf for x > 0); z = 1: Poisson."""

    logits: jax.Array  # (2,)
    log_rate: jax.Array  # ()
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        log_w = jax.nn.log_softmax(self.logits)[z]
        poisson = x * self.log_rate - jnp.exp(self.log_rate) - jax.scipy.special.gammaln(x + 1)
        return log_w + jnp.where(z == 0, jnp.where(x == 0, 0.0, -jnp.inf), poisson)


def test_exact_em_with_impossible_states_matches_numpy_em():
    """log p(x, z) = -inf for some (x, z): q holds -inf log-probabilities, which is fine."""
    rng = np.random.default_rng(5)
    x = np.where(rng.random(N_POISSON) < 0.3, 0, rng.poisson(3.0, N_POISSON)).astype(float)
    res = ej.fit(ZeroInflatedPoisson(jnp.zeros(2), jnp.zeros(())), x, max_iters=EM_ITERS, tol=0)
    assert res.status == ej.Status.MAX_ITERS
    _assert_monotone(res)
    w0, rate = 0.5, 1.0
    for _ in range(EM_ITERS):
        r0 = np.where(x == 0, w0 / (w0 + (1 - w0) * np.exp(-rate)), 0.0)
        w0, rate = r0.mean(), np.sum((1 - r0) * x) / np.sum(1 - r0)
    np.testing.assert_allclose(jax.nn.softmax(res.model.logits)[0], w0, atol=1e-6)
    np.testing.assert_allclose(np.exp(res.model.log_rate), rate, rtol=1e-6)


# ------------------------------------------------------------------ partial E-steps
def test_partial_e_steps_reach_em_optimum():
    x = coin_data(n=N_COINS, seed=11)
    e_step = ej.GradientEStep(optax.adam(0.1), num_steps=10)
    res = ej.fit(
        three_coins(COIN_INIT), x, q=ej.Categorical(), e_step=e_step, max_iters=400, tol=0
    )
    pi, p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, 5000)
    got_pi, got_p = _coin_model_params(res.model)
    np.testing.assert_allclose(got_pi, pi, atol=1e-3)
    np.testing.assert_allclose(got_p, p, atol=1e-3)
    em = ej.fit(three_coins(np.r_[logit(pi), logit(p)]), x, max_iters=EM_ITERS, tol=0)
    optimum = float(em.history[-1])
    assert res.elbo <= optimum + 1e-9
    assert res.elbo >= optimum - 1e-5


def test_hard_em_matches_numpy_classification_em():
    x = coin_data(n=N_COINS, seed=11)
    res = ej.fit(three_coins(COIN_INIT), x, q=ej.PointMass(), max_iters=EM_ITERS, tol=1e-12)
    assert res.converged
    pi, p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, 50, hard=True)
    got_pi, got_p = _coin_model_params(res.model)
    np.testing.assert_allclose(got_pi, pi, atol=1e-6)
    np.testing.assert_allclose(got_p, p, atol=1e-6)
    soft_pi, soft_p = coins_em_np(*_coins_np_from_logits(COIN_INIT), x, 50)
    assert np.abs(np.r_[pi, p] - np.r_[soft_pi, soft_p]).max() > 1e-3  # hard EM differs
    _assert_monotone(res)
    assert isinstance(res.q, ej.PointMass)
    table = np.log([pi, 1 - pi]) + x[:, None] * np.log(p) + (10 - x[:, None]) * np.log1p(-p)
    np.testing.assert_array_equal(res.q.value, np.argmax(table, axis=1))


# ------------------------------------------------------------------- Real latent
N_LG = 60


def test_exact_em_linear_gaussian_reaches_maximum_likelihood():
    x = linear_gaussian_data(n=N_LG, seed=3)
    res = ej.fit(linear_gaussian(exact=True), x, max_iters=300, tol=1e-12)
    assert res.converged
    _assert_monotone(res)
    np.testing.assert_allclose(res.elbo, linear_gaussian_ml_np(x), rtol=1e-7)


def test_gaussian_q_gradient_e_step_approaches_log_likelihood():
    x = linear_gaussian_data(n=N_LG, seed=3)
    e_step = ej.GradientEStep(optax.adam(0.05), num_steps=10)
    res = ej.fit(linear_gaussian(), x, q=ej.Gaussian(), e_step=e_step, max_iters=300, tol=0)
    m = res.model
    loglik = linear_gaussian_loglik_np(m.w, m.b, np.exp(float(m.log_sigma)), x)
    assert res.elbo <= loglik + 1e-10  # a lower bound on the log-likelihood ...
    assert res.elbo >= loglik - 1e-3  # ... that has become tight
    np.testing.assert_allclose(res.elbo, linear_gaussian_ml_np(x), atol=2e-3)


def test_monte_carlo_gaussian_q_needs_key_and_is_reproducible():
    x = linear_gaussian_data(n=N_LG, seed=3)
    q = ej.Gaussian(expectation="monte_carlo", num_samples=8)
    steps = dict(
        e_step=ej.GradientEStep(optax.adam(0.05), num_steps=10),
        m_step=ej.GradientMStep(optax.adam(0.05), num_steps=5),  # fully stochastic EM
        max_iters=150,
        tol=0,
    )
    with pytest.raises(ValueError, match="Monte Carlo.*key"):
        ej.fit(linear_gaussian(), x, q=q, **steps)
    a = ej.fit(linear_gaussian(), x, q=q, **steps, key=jr.key(1))
    b = ej.fit(linear_gaussian(), x, q=q, **steps, key=jr.key(1))
    c = ej.fit(linear_gaussian(), x, q=q, **steps, key=jr.key(2))
    np.testing.assert_array_equal(a.history, b.history)
    np.testing.assert_array_equal(a.model.w, b.model.w)
    assert not np.array_equal(a.history, c.history)
    m = a.model
    loglik = linear_gaussian_loglik_np(m.w, m.b, np.exp(float(m.log_sigma)), x)
    np.testing.assert_allclose(loglik, linear_gaussian_ml_np(x), atol=5e-2)
