"""Amortized q (ej.Amortized), joint gradient training, the importance-weighted bound, and
ej.models.VAE: oracles are the Gaussian q the encoder outputs, PPCA's closed-form maximum
likelihood and its exact log p(x), SciPy's densities."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.stats

import elbo_jax as ej
from elbo_jax.models import PPCA, VAE

D, L, N = 5, 2, 200


class LinearEncoder(eqx.Module):
    """One datum to (mean, log_scale) of a diagonal Gaussian over Real(L)."""

    matrix: jax.Array
    offset: jax.Array
    log_scale: jax.Array

    def __call__(self, x):
        return self.matrix @ x + self.offset, self.log_scale


def zero_encoder(dtype=jnp.float64):
    return LinearEncoder(jnp.zeros((L, D), dtype), jnp.zeros(L, dtype), jnp.zeros(L, dtype))


def ppca_data(dtype):
    w = jr.normal(jr.key(2), (D, L), jnp.float64) * jnp.array([[2.0, 1.0]])
    z = jr.normal(jr.key(3), (N, L), jnp.float64)
    x = z @ w.T + 0.5 * jr.normal(jr.key(5), (N, D), jnp.float64) + jnp.ones((N, D))
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_amortized_free_energy_is_that_of_the_encoders_gaussian(dtype):
    x = ppca_data(dtype)
    model = PPCA.initialize(jr.key(4), x, latent_dim=L)
    enc = LinearEncoder(
        0.1 * jr.normal(jr.key(6), (L, D), dtype), jnp.ones(L, dtype), -jnp.ones(L, dtype)
    )
    key = jr.key(7)
    got = ej.free_energy(model, ej.Amortized(enc, num_samples=3), x, key=key)
    mean, log_scale = jax.vmap(enc)(x)
    gaussian = ej.Gaussian(
        mean, log_scale, covariance_type="diag", expectation="monte_carlo", num_samples=3
    )
    want = ej.free_energy(model, gaussian, x, key=key)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == jnp.float32 else 1e-12)
    # and that Gaussian's F is the Monte Carlo F computed by hand (NumPy, float64)
    noise = np.asarray(jr.normal(key, (N, 3, L), dtype), np.float64)
    z = (
        np.asarray(mean, np.float64)[:, None]
        + np.exp(np.asarray(log_scale, np.float64))[:, None] * noise
    )
    w, mu = np.asarray(model.weight, np.float64), np.asarray(model.mean, np.float64)
    var = float(model.noise_variance)
    xs = np.asarray(x, np.float64)
    log_lik = scipy.stats.norm.logpdf(xs[:, None], z @ w.T + mu, np.sqrt(var)).sum(-1)
    log_prior = scipy.stats.norm.logpdf(z).sum(-1)
    entropy = 0.5 * L * (1 + np.log(2 * np.pi)) + np.asarray(log_scale, np.float64).sum(-1)
    hand = -np.mean((log_lik + log_prior).mean(-1) + entropy)
    np.testing.assert_allclose(got, hand, rtol=1e-5 if dtype == jnp.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_joint_training_reaches_ppca_maximum_likelihood(dtype):
    x = ppca_data(dtype)
    ml = float(ej.log_evidence(PPCA.maximum_likelihood(x.astype(jnp.float64), L), x))
    start = PPCA.initialize(jr.key(4), x, latent_dim=L)
    schedule = optax.cosine_decay_schedule(0.05, 1000, alpha=1e-3)
    res = ej.fit(
        start,
        x,
        q=ej.Amortized(zero_encoder(dtype), num_samples=8),
        m_step=ej.GradientMStep(optax.adam(schedule)),
        max_iters=1000,
        tol=0.0,
        key=jr.key(0),
    )
    assert res.model.weight.dtype == dtype and res.q.encoder.matrix.dtype == dtype
    fitted = (
        res.model
        if dtype == jnp.float64
        else jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, res.model
        )
    )
    assert abs(float(ej.log_evidence(fitted, x.astype(jnp.float64))) - ml) < 1e-2
    # the bound itself is tight there too: the diagonal q can match PPCA's posterior at the ML
    # solution with orthogonal loadings
    bound = -ej.free_energy(
        res.model, ej.Amortized(res.q.encoder, num_samples=256), x, key=jr.key(1)
    )
    assert abs(float(bound) - ml) < 2e-2


def test_importance_weighted_bound_rises_with_k_and_stays_below_log_evidence():
    x = ppca_data(jnp.float64)
    model = PPCA.maximum_likelihood(x, L)
    exact = float(ej.log_evidence(model, x))
    enc = zero_encoder()  # q_n = the prior: a poor proposal, so the bound has room to rise
    bounds = [
        float(
            -ej.free_energy(
                model, ej.Amortized(enc, num_samples=k, importance_weighted=True), x, key=jr.key(k)
            )
        )
        for k in (1, 10, 100, 1000)
    ]
    assert all(b < exact for b in bounds), (bounds, exact)
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3], bounds
    # k = 1 is an unbiased estimate of the ELBO of the same q (the log q term sampled rather
    # than the exact entropy): their means over 20 draws agree within their noise (~0.7)
    elbo = float(-ej.free_energy(model, ej.Amortized(enc, num_samples=1000), x, key=jr.key(3)))
    one = ej.Amortized(enc, num_samples=1, importance_weighted=True)
    draws = [float(-ej.free_energy(model, one, x, key=jr.key(100 + i))) for i in range(20)]
    assert abs(np.mean(draws) - elbo) < 2.5
    assert exact - bounds[3] < 0.1 * (exact - elbo)


def test_importance_weighted_training_objective():
    x = ppca_data(jnp.float64)
    start = PPCA.initialize(jr.key(4), x, latent_dim=L)
    q = ej.Amortized(zero_encoder(), num_samples=5, importance_weighted=True)
    res = ej.fit(
        start,
        x,
        q=q,
        m_step=ej.GradientMStep(optax.adam(0.05)),
        max_iters=60,
        tol=0.0,
        key=jr.key(0),
    )
    assert res.q.importance_weighted and res.q.num_samples == 5
    assert float(ej.log_evidence(res.model, x)) > float(ej.log_evidence(start, x)) + 1.0


class CountEncoder(eqx.Module):
    """One count to the logits of a categorical q over a Poisson mixture's components."""

    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return self.weight * x[0] + self.bias  # the exact posterior's logits are affine in x


def test_amortized_discrete_latent_is_exact_categorical():
    true = ej.models.PoissonMixture(jnp.array([0.5, 0.5]), jnp.array([[2.0], [12.0]]))
    x, _ = true.sample(jr.key(0), 300)
    model = ej.models.PoissonMixture.initialize(jr.key(1), x, 2)
    enc = CountEncoder(jnp.array([0.1, -0.1]), jnp.array([0.0, 1.0]))
    got = ej.free_energy(model, ej.Amortized(enc), x)
    logits = jax.vmap(enc)(jnp.asarray(x, jnp.float64))
    want = ej.free_energy(model, ej.Categorical(logits), x)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    res = ej.fit(
        model,
        x,
        q=ej.Amortized(enc),
        m_step=ej.GradientMStep(optax.adam(0.05)),
        batch_size=150,
        max_iters=150,
        tol=0.0,
        key=jr.key(2),
    )
    exact = float(-ej.log_evidence(ej.fit(model, x).model, x))  # exact EM's optimum
    assert float(ej.free_energy(res.model, res.q, x)) < exact + 0.01


def test_amortized_bad_input():
    x = ppca_data(jnp.float64)
    model = PPCA.initialize(jr.key(4), x, latent_dim=L)
    adam = ej.GradientMStep(optax.adam(1e-2))
    key = jr.key(0)

    class OneArray(eqx.Module):
        def __call__(self, x):
            return x[:L]

    class WrongShape(eqx.Module):
        def __call__(self, x):
            return x[:3], x[:3]

    with pytest.raises(
        ValueError, match=r"must return \(mean, log_scale\): two arrays of shape \(2,\)"
    ):
        ej.fit(model, x, q=ej.Amortized(OneArray()), m_step=adam, key=key)
    with pytest.raises(ValueError, match=r"returned \(\(\(3,\), 'float64'\)"):
        ej.fit(model, x, q=ej.Amortized(WrongShape()), m_step=adam, key=key)
    with pytest.raises(TypeError, match="by gradient steps: pass m_step=ej.GradientMStep"):
        ej.fit(model, x, q=ej.Amortized(zero_encoder()), key=key)
    with pytest.raises(TypeError, match="leave e_step at its default"):
        ej.fit(
            model,
            x,
            q=ej.Amortized(zero_encoder()),
            m_step=adam,
            key=key,
            e_step=ej.GradientEStep(optax.adam(1e-2)),
        )
    with pytest.raises(ValueError, match="needs a random key"):
        ej.fit(model, x, q=ej.Amortized(zero_encoder()), m_step=adam)
    with pytest.raises(TypeError, match="has none: pass ej.Amortized"):
        ej.fit(model, x, q=ej.Amortized(), m_step=adam, key=key)
    with pytest.raises(TypeError, match="encoder must be a callable"):
        ej.Amortized(3)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ej.Amortized(zero_encoder(), num_samples=0)


# ---------------------------------------------------------------------------------- VAE
def digits(n=400):
    from sklearn.datasets import load_digits

    return (load_digits().data[:n] > 7).astype(np.float32)


def test_vae_fits_digits_and_its_methods():
    x = digits()
    model = VAE.initialize(jr.key(0), 64, 2, hidden=(32,))
    res = ej.fit(
        model,
        x,
        m_step=ej.GradientMStep(optax.adam(3e-3)),
        batch_size=100,
        max_iters=20,
        tol=0.0,
        key=jr.key(1),
    )
    assert isinstance(res.q, ej.Amortized) and res.q.encoder is None
    assert res.history[-1] > res.initial_elbo + 10  # 40 nats per image at the start
    mean, scale = res.model.encode(x[:5])
    assert mean.shape == (5, 2) and bool(jnp.all(scale > 0))
    assert res.model.reconstruct(x[:5]).shape == (5, 64)
    samples, z = res.model.sample(jr.key(2), 7)
    assert samples.shape == (7, 64) and z.shape == (7, 2)
    assert set(np.unique(np.asarray(samples))) <= {0.0, 1.0}
    # the fitted model's F with the encoder's q, the same function fit lowered
    f = ej.free_energy(res.model, ej.Amortized(num_samples=64), x, key=jr.key(3))
    assert abs(float(-f) - float(res.history[-1])) < 1.0


def test_vae_log_joint_matches_scipy():
    model = VAE.initialize(jr.key(0), 4, 2, hidden=(3,), likelihood="gaussian", dtype=jnp.float64)
    model = eqx.tree_at(
        lambda m: m.log_noise_scale, model, jnp.log(jnp.array([0.5, 1.0, 2.0, 0.3]))
    )
    x, z = np.array([0.3, -1.0, 2.0, 0.0]), np.array([0.5, -0.2])
    mean = np.asarray(model.decoder(jnp.asarray(z)))
    want = (
        scipy.stats.norm.logpdf(z).sum()
        + scipy.stats.norm.logpdf(x, mean, [0.5, 1.0, 2.0, 0.3]).sum()
    )
    np.testing.assert_allclose(model.log_joint(jnp.asarray(x), jnp.asarray(z)), want, rtol=1e-12)
    bern = VAE.initialize(jr.key(0), 4, 2, hidden=(3,), dtype=jnp.float64)
    xb = np.array([1.0, 0.0, 1.0, 1.0])
    probs = 1 / (1 + np.exp(-np.asarray(bern.decoder(jnp.asarray(z)))))
    want = scipy.stats.norm.logpdf(z).sum() + scipy.stats.bernoulli.logpmf(xb, probs).sum()
    np.testing.assert_allclose(bern.log_joint(jnp.asarray(xb), jnp.asarray(z)), want, rtol=1e-12)


def test_vae_fresh_optimizer_does_not_recompile_and_bad_input():
    x = digits(200)
    model = VAE.initialize(jr.key(0), 64, 2, hidden=(16,))
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    def run():
        m_step = ej.GradientMStep(optax.adam(1e-3))  # a fresh optimizer each time
        return ej.fit(model, x, m_step=m_step, batch_size=50, max_iters=3, tol=0.0, key=jr.key(1))

    first = run()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [c for c in compiles if "_call" in str(c)], compiles
    np.testing.assert_array_equal(first.history, second.history)

    with pytest.raises(ValueError, match="x must be binary"):
        ej.fit(model, x * 0.5 + 0.25, m_step=ej.GradientMStep(optax.adam(1e-3)), key=jr.key(0))
    with pytest.raises(ValueError, match=r"expected \(N, D\) with D=64"):
        ej.fit(model, x[:, :10], m_step=ej.GradientMStep(optax.adam(1e-3)), key=jr.key(0))
    with pytest.raises(ValueError, match="likelihood must be 'bernoulli' or 'gaussian'"):
        VAE.initialize(jr.key(0), 4, 2, likelihood="poisson")


def test_a_pass_that_turns_non_finite_leaves_the_last_finite_model():
    x = ppca_data(jnp.float64)
    start = PPCA.initialize(jr.key(4), x, latent_dim=L)
    limit = float(jnp.abs(start.weight).max()) + 0.4  # the ML loadings reach ~2: crossed
    prior = lambda m: jnp.where(jnp.abs(m.weight).max() > limit, jnp.nan, 0.0)

    def fit(max_iters):
        return ej.fit(
            start,
            x,
            q=ej.Amortized(zero_encoder(), num_samples=2),
            m_step=ej.GradientMStep(optax.adam(0.05)),
            prior=prior,
            batch_size=50,
            max_iters=max_iters,
            tol=0.0,
            key=jr.key(0),
        )

    with pytest.warns(RuntimeWarning, match="the model and q are those of the last finite"):
        res = fit(100)
    assert res.status == ej.Status.NONFINITE and 1 <= res.num_iters < 100
    assert np.isfinite(res.history).all()
    assert float(jnp.abs(res.model.weight).max()) <= limit
    # the same fit stopped by max_iters at that pass ends on the same model
    same = fit(res.num_iters)
    assert same.status == ej.Status.MAX_ITERS
    np.testing.assert_array_equal(res.model.weight, same.model.weight)
    np.testing.assert_array_equal(res.q.encoder.matrix, same.q.encoder.matrix)
