"""PPCA and factor analysis: exact hooks against NumPy/SciPy/scikit-learn oracles, EM to ML."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.stats
from sklearn.decomposition import FactorAnalysis as SklearnFactorAnalysis

import elbo_jax as ej
from elbo_jax._statistics import merge_statistics

FactorAnalysis = ej.models.FactorAnalysis
PPCA = ej.models.PPCA

N, D, L = 400, 6, 2


# ----------------------------------------------------------------------------- fixtures
def _make_data(seed, noise, n=N):
    """Data from a linear-Gaussian model whose signal eigenvalues are well above the noise
    (EM's rate on the column scales is about 1 - 2 psi / lambda, so psi is not tiny)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(D, L)) * np.array([2.0, 1.5])
    mean = rng.normal(size=D)
    z = rng.normal(size=(n, L))
    x = z @ weight.T + mean + np.sqrt(noise) * rng.normal(size=(n, D))
    return x, weight, mean


@functools.cache
def ppca_data():
    return _make_data(0, 1.0)[0]


@functools.cache
def fa_data():
    return _make_data(1, np.array([0.3, 1.0, 0.6, 1.5, 0.5, 0.8]))[0]


def _random_model(cls, seed):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(D, L))
    mean = rng.normal(size=D)
    noise = rng.uniform(0.3, 2.0) if cls is PPCA else rng.uniform(0.3, 2.0, size=D)
    return cls(weight, mean, noise)


def _numpy_params(model):
    return (
        np.asarray(model.weight),
        np.asarray(model.mean),
        np.broadcast_to(np.asarray(model.noise_variance), (model.dim,)),
    )


def _tipping_bishop_loglik(x, latent_dim):
    """Per-datum log-likelihood of the ML PPCA, from the eigenvalues of the sample covariance."""
    n, d = x.shape
    evals = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    noise = evals[latent_dim:].mean()
    log_det = np.sum(np.log(evals[:latent_dim])) + (d - latent_dim) * np.log(noise)
    return -0.5 * (d * np.log(2 * np.pi) + log_det + d)


def _numpy_posterior(x, weight, mean, noise):
    """p(z | x) by conditioning the joint Gaussian of (z, x): K = W^T C^{-1}."""
    cov_x = weight @ weight.T + np.diag(noise)
    gain = np.linalg.solve(cov_x, weight).T
    return (x - mean) @ gain.T, np.eye(weight.shape[1]) - gain @ weight


def _random_gaussian_q(seed, n, d):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n, d))
    factors = rng.normal(size=(n, d, d)) * 0.5
    covs = factors @ np.swapaxes(factors, -1, -2) + 0.2 * np.eye(d)
    chol = np.linalg.cholesky(covs)
    raw = np.tril(chol, -1) + np.eye(d) * np.log(np.diagonal(chol, axis1=-2, axis2=-1))[:, :, None]
    return ej.Gaussian(jnp.asarray(means), jnp.asarray(raw)), means, covs


def _assert_monotone(res):
    history = np.asarray(res.history)
    assert res.num_increases == 0
    assert np.all(np.diff(history) >= -1e-10 * (1 + np.abs(history[1:])))
    assert history[0] >= float(res.initial_elbo) - 1e-12


# ----------------------------------------------------------------------------- EM to ML
def test_ppca_em_reaches_tipping_bishop_maximum_likelihood():
    x = ppca_data()
    model = PPCA.initialize(jr.key(0), x, L)
    res = ej.fit(model, x, max_iters=500, tol=1e-12)
    assert res.converged, res.message
    _assert_monotone(res)
    oracle = _tipping_bishop_loglik(x, L)
    assert abs(float(ej.log_evidence(res.model, x)) - oracle) < 1e-6
    assert abs(float(res.elbo) - oracle) < 1e-6  # exact E-step: the ELBO is the log-likelihood

    # the fitted covariance W W^T + s^2 I (rotation-free) is the ML one
    evals, evecs = np.linalg.eigh(np.cov(x.T, bias=True))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    noise = evals[L:].mean()
    ml_cov = evecs[:, :L] @ np.diag(evals[:L] - noise) @ evecs[:, :L].T + noise * np.eye(D)
    np.testing.assert_allclose(np.asarray(res.model.covariance), ml_cov, atol=1e-4)
    np.testing.assert_allclose(float(res.model.noise_variance), noise, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.model.mean), x.mean(0), atol=1e-10)


def test_ppca_maximum_likelihood_classmethod():
    x = ppca_data()
    best = PPCA.maximum_likelihood(x, L)
    assert best.latent == ej.Real(L) and best.weight.dtype == jnp.float64
    np.testing.assert_allclose(
        float(ej.log_evidence(best, x)), _tipping_bishop_loglik(x, L), atol=1e-10
    )
    # it is a fixed point of exact EM
    step = best.maximize(best.sufficient_statistics(x, best.posterior(x)))
    np.testing.assert_allclose(np.asarray(step.covariance), np.asarray(best.covariance), atol=1e-9)


def test_factor_analysis_em_matches_scikit_learn():
    x = fa_data()
    model = FactorAnalysis.initialize(jr.key(1), x, L)
    res = ej.fit(model, x, max_iters=3000, tol=1e-12)
    assert res.converged, res.message
    _assert_monotone(res)
    sk = SklearnFactorAnalysis(
        n_components=L, tol=1e-12, max_iter=100_000, svd_method="lapack"
    ).fit(x)
    assert abs(float(ej.log_evidence(res.model, x)) - sk.score(x)) < 1e-4
    # with L = 2 < D = 6 and no Heywood case the ML covariance is identified
    np.testing.assert_allclose(np.asarray(res.model.covariance), sk.get_covariance(), atol=1e-3)


# ----------------------------------------------------------------------------- exact hooks
@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_log_marginal_matches_scipy(cls):
    model = _random_model(cls, 3)
    x = np.asarray(model.sample(jr.key(4), 50)[0])
    weight, mean, noise = _numpy_params(model)
    cov = weight @ weight.T + np.diag(noise)
    np.testing.assert_allclose(np.asarray(model.covariance), cov, rtol=1e-12)
    expected = scipy.stats.multivariate_normal(mean, cov).logpdf(x)
    np.testing.assert_allclose(np.asarray(model.log_marginal(x)), expected, rtol=1e-10)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_posterior_matches_bayes_rule(cls):
    model = _random_model(cls, 5)
    x = np.asarray(model.sample(jr.key(6), 40)[0])
    post_mean, post_cov = _numpy_posterior(x, *_numpy_params(model))
    q = model.posterior(x)
    assert isinstance(q, ej.Gaussian) and q.mean.shape == (40, L)
    np.testing.assert_allclose(np.asarray(q.mean), post_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(q.covariance), np.broadcast_to(post_cov, (40, L, L)), atol=1e-12
    )
    np.testing.assert_allclose(np.asarray(model.transform(x)), post_mean, rtol=1e-10, atol=1e-12)


@eqx.filter_jit
def _values_and_grads(model, x):
    def f_exact(m):
        return ej.free_energy(m, ej.ExactPosterior(), x)

    def f_fixed_q(m):  # Fisher's identity: q held at the posterior of the current model
        return ej.free_energy(m, jax.lax.stop_gradient(model.posterior(x)), x)

    def neg_log_evidence(m):
        return -ej.log_evidence(m, x)

    return [eqx.filter_value_and_grad(f)(model) for f in (neg_log_evidence, f_exact, f_fixed_q)]


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_free_energy_at_exact_posterior_is_minus_log_evidence(cls):
    model = _random_model(cls, 7)
    x = jnp.asarray(model.sample(jr.key(8), 60)[0])
    (value, grads), *others = _values_and_grads(model, x)
    expected = jax.tree_util.tree_leaves(grads)
    assert len(expected) == 3 and all(np.abs(np.asarray(g)).max() > 1e-3 for g in expected)
    for other_value, other_grads in others:
        np.testing.assert_allclose(float(other_value), float(value), rtol=1e-12)
        for got, want in zip(jax.tree_util.tree_leaves(other_grads), expected, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-8, atol=1e-11)


def _gaussian_kl(m1, s1, m2, s2):
    """KL(N(m1, s1) || N(m2, s2)) per row, in NumPy."""
    d = m1.shape[-1]
    s2_inv = np.linalg.inv(s2)
    diff = m2 - m1
    trace = np.einsum("ij,nji->n", s2_inv, s1)
    quad = np.einsum("ni,ij,nj->n", diff, s2_inv, diff)
    logdet = np.linalg.slogdet(s2)[1] - np.linalg.slogdet(s1)[1]
    return 0.5 * (trace + quad - d + logdet)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_free_energy_decomposition_with_random_gaussian_q(cls):
    model = _random_model(cls, 9)
    x = np.asarray(model.sample(jr.key(10), 30)[0])
    q, q_means, q_covs = _random_gaussian_q(11, 30, L)
    weight, mean, noise = _numpy_params(model)
    post_mean, post_cov = _numpy_posterior(x, weight, mean, noise)
    kl = _gaussian_kl(q_means, q_covs, post_mean, post_cov)
    log_p = scipy.stats.multivariate_normal(mean, weight @ weight.T + np.diag(noise)).logpdf(x)
    free = float(ej.free_energy(model, q, x))
    np.testing.assert_allclose(-log_p.mean(), free - kl.mean(), rtol=1e-10)
    assert kl.mean() > 0.1  # the check is not vacuous


# ----------------------------------------------------------------------------- M-step
def _m_step_qs(model, x):
    other = eqx.tree_at(lambda m: m.weight, model, model.weight * 0.7 + 0.1)
    exact = other.posterior(x)
    random_q = _random_gaussian_q(12, x.shape[0], L)[0]
    return {"posterior": exact, "random": random_q}


@eqx.filter_jit
def _closed_and_numerical_m_steps(model, q, x):
    closed, _ = ej.ExactMStep().step(model, q, None, x, key=None, prior=None)
    numeric_step = ej.ExactMStep(use_closed_form=False, max_steps=2000)
    numeric, _ = numeric_step.step(model, q, None, x, key=None, prior=None)
    values = [ej.free_energy(m, q, x) for m in (model, closed, numeric)]
    return closed, numeric, *values


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_closed_form_m_step_equals_numerical_m_step(cls):
    model = _random_model(cls, 13)
    x = jnp.asarray(model.sample(jr.key(14), 80)[0])
    assert model.has_closed_form(None) and not model.has_closed_form(lambda m: 0.0)
    for name, q in _m_step_qs(model, x).items():
        closed, numeric, f_start, f_closed, f_numeric = _closed_and_numerical_m_steps(model, q, x)
        assert float(f_closed) <= float(f_numeric) + 1e-12, name
        assert float(f_closed) < float(f_start) - 1e-3, name
        for a, b in zip(_numpy_params(closed), _numpy_params(numeric), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_closed_form_m_step_with_point_mass_is_least_squares(cls):
    # With q_n = delta(z - zhat_n) the M-step is ordinary least squares of x on [zhat, 1].
    model = _random_model(cls, 27)
    x = np.asarray(model.sample(jr.key(28), 80)[0])
    zhat = np.random.default_rng(29).normal(size=(80, L))
    new = model.maximize(model.sufficient_statistics(x, ej.PointMass(jnp.asarray(zhat))))
    design = np.concatenate([zhat, np.ones((80, 1))], axis=1)
    coef = np.linalg.lstsq(design, x, rcond=None)[0].T
    residual = np.mean((x - design @ coef.T) ** 2, axis=0)
    noise = residual.mean() if cls is PPCA else residual
    np.testing.assert_allclose(np.asarray(new.weight), coef[:, :L], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(new.mean), coef[:, L], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new.noise_variance), noise, rtol=1e-10)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_sufficient_statistics_are_additive(cls):
    model = _random_model(cls, 15)
    x = jnp.asarray(model.sample(jr.key(16), 50)[0])
    q = model.posterior(x)
    whole = model.sufficient_statistics(x, q)
    first = model.sufficient_statistics(x[:25], model.posterior(x[:25]))
    second = model.sufficient_statistics(x[25:], model.posterior(x[25:]))
    # merged, then moved to the whole data's shift, they are the whole data's statistics
    merged = merge_statistics(first, second).shifted(whole.shift)
    for got, want in zip(
        jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(whole), strict=True
    ):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12 * scale
        )
    # ExactPosterior resolves to the same statistics
    again = model.sufficient_statistics(x, ej.ExactPosterior())
    for got, want in zip(
        jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(whole), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)


def test_noise_floor_keeps_a_constant_dimension_finite():
    x = np.array(fa_data())
    x[:, 2] = 0.25
    model = FactorAnalysis.initialize(jr.key(17), x, L)
    res = ej.fit(model, x, max_iters=3000, tol=1e-12)  # as in the scikit-learn test: one compile
    assert res.status != ej.Status.NONFINITE and res.num_iters > 10
    assert bool(jnp.all(jnp.isfinite(res.history)))
    noise = np.asarray(res.model.noise_variance)
    np.testing.assert_allclose(noise[2], res.model.min_noise_variance, rtol=1e-9)
    assert np.all(noise[[0, 1, 3, 4, 5]] > 0.1)


# ----------------------------------------------------------------------------- other steps
def test_gradient_e_step_with_gaussian_q_approaches_exact_em():
    x = ppca_data()
    model = PPCA.initialize(jr.key(18), x, L)
    # The default q_n = N(0, I) start works because fit begins with an E-step: were the
    # first M-step to see that q, it would set W = 0, a stationary point of the gradient
    # E-step (the likelihood no longer depends on z).
    res = ej.fit(
        model,
        x,
        q=ej.Gaussian(),
        e_step=ej.GradientEStep(optax.adam(0.05), num_steps=10),
        max_iters=400,
        tol=1e-9,
    )
    assert res.status != ej.Status.NONFINITE
    log_evidence = float(ej.log_evidence(res.model, x))
    oracle = _tipping_bishop_loglik(x, L)
    assert float(res.elbo) <= log_evidence + 1e-9  # the ELBO is a lower bound
    assert abs(log_evidence - oracle) < 1e-4
    assert float(res.elbo) - float(res.initial_elbo) > 1.0


def test_gradient_m_step_improves_the_fit():
    x = ppca_data()
    model = PPCA.initialize(jr.key(19), x, L)
    res = ej.fit(
        model, x, m_step=ej.GradientMStep(optax.adam(0.05), num_steps=5), max_iters=300, tol=1e-9
    )
    assert res.status != ej.Status.NONFINITE
    assert abs(float(ej.log_evidence(res.model, x)) - _tipping_bishop_loglik(x, L)) < 1e-4


def test_hard_em_with_point_mass_runs():
    x = ppca_data()
    model = PPCA.initialize(jr.key(20), x, L)
    res = ej.fit(model, x, q=ej.PointMass(), max_iters=200, tol=1e-10)
    assert res.status != ej.Status.NONFINITE
    _assert_monotone(res)
    assert isinstance(res.q, ej.PointMass) and res.q.value.shape == (N, L)
    # hard EM recovers the principal subspace (the scale of W is not identified)
    evecs = np.linalg.eigh(np.cov(x.T, bias=True))[1][:, ::-1][:, :L]
    basis = np.linalg.qr(np.asarray(res.model.weight))[0]
    cosines = np.linalg.svd(evecs.T @ basis, compute_uv=False)
    assert cosines.min() > 0.99


def test_float32_fit_stays_float32():
    x = ppca_data().astype(np.float32)
    model = PPCA.initialize(jr.key(21), x, L)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(model))
    res = ej.fit(model, x, max_iters=200, tol=1e-5)
    assert res.status != ej.Status.NONFINITE
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(res.model))
    assert res.history.dtype == jnp.float32 and res.q.mean.dtype == jnp.float32
    # float32 PPCA lands near the float64 maximum likelihood
    oracle = _tipping_bishop_loglik(ppca_data(), L)
    assert abs(float(ej.log_evidence(res.model, x)) - oracle) < 1e-3

    # the hooks keep float32 too (float64 data are cast to the model's dtype); the code is
    # shared, so FactorAnalysis covers both models
    @eqx.filter_jit
    def hooks(model, x64):
        q = model.posterior(x64)
        new = model.maximize(model.sufficient_statistics(x64, q))
        return q.mean, q.covariance, model.log_marginal(x64), new, model.sample(jr.key(0), 3)[0]

    outputs = hooks(FactorAnalysis.initialize(jr.key(22), x, L), ppca_data())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(outputs))
    assert PPCA.maximum_likelihood(x, L).weight.dtype == jnp.float32


# ----------------------------------------------------------------------------- API details
def test_construction_properties_and_dtype():
    weight = np.ones((4, 2), np.float32)
    model = PPCA(weight, np.zeros(4), 0.5)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(model))
    assert model.latent == ej.Real(2) and model.latent_dim == 2 and model.dim == 4
    np.testing.assert_allclose(float(model.noise_variance), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(model.log_noise_variance), np.log(0.5), rtol=1e-6)
    fa = FactorAnalysis(weight, np.zeros(4), [0.5, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(fa.noise_variance), [0.5, 1.0, 2.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(fa.covariance), 2.0 + np.diag([0.5, 1.0, 2.0, 3.0]), rtol=1e-6
    )


def test_initialize_and_sample():
    x = ppca_data()
    model = FactorAnalysis.initialize(jr.key(22), x, L)
    np.testing.assert_allclose(np.asarray(model.mean), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(model.noise_variance), x.var(0), rtol=1e-12)
    ppca = PPCA.initialize(jr.key(22), x, L)
    np.testing.assert_allclose(float(ppca.noise_variance), x.var(0).mean(), rtol=1e-12)
    assert np.array_equal(
        np.asarray(PPCA.initialize(jr.key(22), x, L).weight), np.asarray(ppca.weight)
    )

    truth = _random_model(FactorAnalysis, 23)
    samples, z = truth.sample(jr.key(24), 20_000)
    assert samples.shape == (20_000, D) and z.shape == (20_000, L)
    again, _ = truth.sample(jr.key(24), 20_000)
    assert np.array_equal(np.asarray(samples), np.asarray(again))
    cov = np.asarray(truth.covariance)
    np.testing.assert_allclose(np.cov(np.asarray(samples).T), cov, atol=0.08 * np.abs(cov).max())


def test_error_messages():
    w = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"weight has shape \(3,\), expected \(D, L\)"):
        PPCA(np.ones(3), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match=r"mean has shape \(4,\), expected \(D,\) = \(3,\)"):
        PPCA(w, np.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"noise_variance has shape \(3,\), expected \(\)"):
        PPCA(w, np.zeros(3), np.ones(3))
    with pytest.raises(
        ValueError, match=r"FactorAnalysis: noise_variance has shape \(\), expected \(3,\)"
    ):
        FactorAnalysis(w, np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="noise_variance must be finite and > 0"):
        PPCA(w, np.zeros(3), -1.0)
    with pytest.raises(ValueError, match="noise_variance must be finite and > 0"):
        FactorAnalysis(w, np.zeros(3), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="weight contains NaN"):
        PPCA(np.full((3, 2), np.nan), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="min_noise_variance must be a finite number > 0"):
        PPCA(w, np.zeros(3), 1.0, min_noise_variance=0.0)

    x = ppca_data()
    with pytest.raises(
        ValueError, match=r"latent_dim=6 must be smaller than the data dimension D=6"
    ):
        PPCA.initialize(jr.key(0), x, 6)
    with pytest.raises(ValueError, match=r"latent_dim=3 is larger than the number of data N=2"):
        FactorAnalysis.initialize(jr.key(0), x[:2], 3)
    with pytest.raises(ValueError, match="latent_dim must be a positive int, got 0"):
        PPCA.initialize(jr.key(0), x, 0)
    with pytest.raises(ValueError, match=r"latent_dim=7 must be smaller"):
        PPCA.maximum_likelihood(x, 7)
    with pytest.raises(ValueError, match=r"x has shape \(400,\), expected \(N, D\)"):
        PPCA.initialize(jr.key(0), x[:, 0], 1)

    model = PPCA.initialize(jr.key(0), x, L)
    with pytest.raises(ValueError, match=r"x has shape \(400, 5\), expected \(N, D\) with D=6"):
        ej.fit(model, x[:, :5])
    with pytest.raises(ValueError, match=r"x has shape \(400,\), expected \(N, D\) with D=6"):
        ej.fit(model, x[:, 0])
    with pytest.raises(ValueError, match=r"x has shape \(400, 5\), expected \(N, D\) with D=6"):
        model.log_marginal(x[:, :5])
    with pytest.raises(TypeError, match="needs a q with Gaussian moments"):
        model.sufficient_statistics(x, ej.Categorical(jnp.zeros((N, 2))))
