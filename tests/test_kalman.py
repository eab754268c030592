"""Kalman filter and smoother (``elbo_jax._inference.kalman``) against exact references.

The main oracle writes the whole sequence as one dense Gaussian over
$(z_0, \\dots, z_{T-1}, y_0, \\dots, y_{T-1})$ and conditions it on the observed entries;
statsmodels' Kalman filter checks the log-likelihood on a longer sequence.
"""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg
from scipy.stats import multivariate_normal

from elbo_jax._inference import kalman

sample_jit = jax.jit(kalman.sample, static_argnames="num_steps")


@functools.partial(jax.jit, static_argnames="parallel")
def run_batch(params, ys, lengths, parallel):
    """Every function on each sequence of ``ys`` (B, T, O) with its length: the filter
    (sequential only, ``None`` when ``parallel``), the smoother and ``log_likelihood``."""

    def one(y, length):
        filtered = None if parallel else kalman.kalman_filter(params, y, length)
        smoothed = kalman.kalman_smoother(params, y, length, parallel=parallel)
        return filtered, smoothed, kalman.log_likelihood(params, y, length, parallel=parallel)

    return jax.vmap(one)(ys, lengths)


@jax.jit
def parallel_smoother(params, ys, lengths):
    """The parallel smoother alone (its compilation is the slow one)."""
    return jax.vmap(lambda y, n: kalman.kalman_smoother(params, y, n, parallel=True))(ys, lengths)


# --------------------------------------------------------------------------- problems
def _spd(rng, n, scale=1.0):
    a = rng.normal(size=(n, n))
    return scale * (a @ a.T / n + 0.3 * np.eye(n))


def _problem(seed, s, o, radius=0.9):
    """Random parameters (NumPy, float64) with a stable F of spectral radius ``radius``."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(s, s))
    f = radius * f / np.max(np.abs(np.linalg.eigvals(f)))
    return kalman.LGSSMParams(
        initial_mean=rng.normal(size=s),
        initial_covariance=_spd(rng, s),
        transition_matrix=f,
        transition_covariance=_spd(rng, s, 0.5),
        observation_matrix=rng.normal(size=(o, s)),
        observation_covariance=_spd(rng, o, 0.5),
    )


def _jnp(params, dtype=jnp.float64):
    return kalman.LGSSMParams(*(jnp.asarray(p, dtype) for p in params))


def _data(params, num_steps, seed):
    _, y = sample_jit(jr.PRNGKey(seed), _jnp(params), num_steps)
    return np.array(y)  # a writable copy


# --------------------------------------------------------------------------- dense oracle
def _joint(params, num_steps, xp=np, block_diag=scipy.linalg.block_diag):
    """Mean and covariance of $(z_{0:T-1}, y_{0:T-1})$ (states first, frame by frame).

    $z = A e + \\mu_z$ with $e = (z_0 - m_0, w_0, \\dots, w_{T-2})$; $y = (I \\otimes H) z + v$.
    ``xp`` and ``block_diag``: NumPy / SciPy, or their JAX versions (for gradients).
    """
    m0, p0, f, q, h, r = params
    s = m0.shape[0]
    powers = [xp.eye(s)]
    for _ in range(num_steps):
        powers.append(f @ powers[-1])
    zero = xp.zeros((s, s))
    a = xp.block(
        [[powers[t - k] if k <= t else zero for k in range(num_steps)] for t in range(num_steps)]
    )  # column block k: z_0 (k = 0) or w_{k-1}; z_t gets F^{t-k} of it
    mu_z = xp.concatenate([powers[t] @ m0 for t in range(num_steps)])
    cov_e = block_diag(p0, *([q] * (num_steps - 1)))
    cov_z = a @ cov_e @ a.T
    big_h = block_diag(*([h] * num_steps))
    mean = xp.concatenate([mu_z, big_h @ mu_z])
    cov_zy = cov_z @ big_h.T
    cov_yy = big_h @ cov_z @ big_h.T + block_diag(*([r] * num_steps))
    cov = xp.block([[cov_z, cov_zy], [cov_zy.T, cov_yy]])
    return mean, cov


def _oracle(params, y):
    """Conditioned on the observed entries of ``y``: means (T, S), covariances (T, S, S),
    cross-covariances [t] = Cov[z_{t+1}, z_t | y] (T, S, S) and log p(y)."""
    num_steps, _ = y.shape
    s = params.initial_mean.shape[0]
    mean, cov = _joint(params, num_steps)
    nz = num_steps * s
    obs = nz + np.flatnonzero(~np.isnan(y.reshape(-1)))
    y_obs = y.reshape(-1)[~np.isnan(y.reshape(-1))]
    if obs.size:
        gain = np.linalg.solve(cov[np.ix_(obs, obs)], cov[obs, :nz]).T
        post_mean = mean[:nz] + gain @ (y_obs - mean[obs])
        post_cov = cov[:nz, :nz] - gain @ cov[obs, :nz]
        log_p = multivariate_normal(mean[obs], cov[np.ix_(obs, obs)]).logpdf(y_obs)
    else:
        post_mean, post_cov, log_p = mean[:nz], cov[:nz, :nz], 0.0
    blocks = post_cov.reshape(num_steps, s, num_steps, s)
    covs = np.stack([blocks[t, :, t] for t in range(num_steps)])
    cross = np.zeros_like(covs)
    for t in range(num_steps - 1):
        cross[t] = blocks[t + 1, :, t]
    return post_mean.reshape(num_steps, s), covs, cross, log_p


def _filter_oracle(params, y):
    """Filtered means and covariances: the oracle on $y_{0:t}$, taken at t."""
    out = [_oracle(params, y[: t + 1]) for t in range(y.shape[0])]
    return np.stack([o[0][-1] for o in out]), np.stack([o[1][-1] for o in out])


def _check_against_oracle(params, ys, lengths, atol=1e-9):
    """Run both versions on the batch and compare each sequence with the oracle on
    ``ys[i, :length]``; outputs at padded frames must be 0."""
    p, y_batch, n_batch = _jnp(params), jnp.asarray(ys), jnp.asarray(lengths)
    filt, seq, seq_ll = run_batch(p, y_batch, n_batch, parallel=False)
    _, par, par_ll = run_batch(p, y_batch, n_batch, parallel=True)
    for i, length in enumerate(lengths):
        y = ys[i, :length]
        means, covs, cross, log_p = _oracle(params, y)
        f_means, f_covs = _filter_oracle(params, y)
        np.testing.assert_allclose(filt.means[i, :length], f_means, atol=atol)
        np.testing.assert_allclose(filt.covariances[i, :length], f_covs, atol=atol)
        for value in (filt.log_likelihood, seq.log_likelihood, par.log_likelihood, seq_ll, par_ll):
            np.testing.assert_allclose(value[i], log_p, atol=atol)
        for res in (seq, par):
            np.testing.assert_allclose(res.means[i, :length], means, atol=atol)
            np.testing.assert_allclose(res.covariances[i, :length], covs, atol=atol)
            np.testing.assert_allclose(res.cross_covariances[i, :length], cross, atol=atol)
            for padded in (res.means, res.covariances, filt.means, filt.covariances):
                assert np.all(np.asarray(padded[i, length:]) == 0.0)
            assert np.all(np.asarray(res.cross_covariances[i, length - 1 :]) == 0.0)


def _batch(params, seed, num_seq=3, num_steps=6):
    return np.stack([_data(params, num_steps, seed + i) for i in range(num_seq)])


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_oracle(seed):
    params = _problem(seed, 2, 2)
    _check_against_oracle(params, _batch(params, 10 * seed), [6, 6, 6])


def test_missing_values_match_dense_oracle():
    params = _problem(4, 2, 2)
    ys = _batch(params, 40)
    ys[0, [0, 3], [1, 0]] = np.nan  # single entries
    ys[1, 2] = np.nan  # a whole frame: a pure prediction
    ys[1, 5, 1] = np.nan  # the last frame, partly
    ys[1, 0, 0] = np.nan
    ys[2] = np.nan  # nothing observed: the prior, log p = 0
    _check_against_oracle(params, ys, [6, 6, 6])
    filt, _, _ = run_batch(_jnp(params), jnp.asarray(ys), jnp.asarray([6, 6, 6]), parallel=False)
    assert float(filt.log_likelihood[2]) == 0.0


def test_ragged_lengths_equal_truncated_runs():
    params = _problem(6, 2, 2)
    lengths = [6, 4, 1]
    rng = np.random.default_rng(6)
    ys = _batch(params, 60)
    ys[0, 2, 0] = np.nan
    ys[1, 1] = np.nan
    for i, length in enumerate(lengths):  # padding: garbage, huge values and NaN
        ys[i, length:] = rng.normal(size=(6 - length, 2)) * 1e6
        ys[i, length + 1 :, 1] = np.nan
    _check_against_oracle(params, ys, lengths)
    # A Python int length, outside jit.
    np.testing.assert_allclose(
        kalman.log_likelihood(_jnp(params), jnp.asarray(ys[1]), 4),
        _oracle(params, ys[1, :4])[3],
        atol=1e-9,
    )


def test_single_frame():
    params = _problem(3, 2, 2)
    ys = _batch(params, 30, num_seq=1, num_steps=1)
    _check_against_oracle(params, ys, [1])


def _statsmodels_log_lik(params, y):
    from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

    m0, p0, f, q, h, r = (np.asarray(p, np.float64) for p in params)
    kf = KalmanFilter(k_endog=h.shape[0], k_states=m0.shape[0])
    kf.bind(np.ascontiguousarray(y))
    kf["design"] = h
    kf["obs_cov"] = r
    kf["transition"] = f
    kf["selection"] = np.eye(m0.shape[0])
    kf["state_cov"] = q
    # statsmodels' a_1, P_1 are the moments of the state at the first observation.
    kf.initialize_known(m0, p0)
    return float(np.sum(kf.loglikeobs()))


def test_log_likelihood_matches_statsmodels():
    params = _problem(7, 3, 2, radius=0.95)
    y = _data(params, 50, 7)
    y[10, 0] = np.nan
    y[20] = np.nan
    got = jax.jit(kalman.log_likelihood)(_jnp(params), jnp.asarray(y))
    np.testing.assert_allclose(got, _statsmodels_log_lik(params, y), rtol=1e-10)


def test_parallel_equals_sequential():
    params = _problem(8, 3, 2, radius=0.98)
    num_steps, lengths = 100, [100, 73, 2]
    rng = np.random.default_rng(8)
    ys = np.stack([_data(params, num_steps, 20 + i) for i in range(len(lengths))])
    ys[rng.random(ys.shape) < 0.15] = np.nan
    ys[:, 40] = np.nan
    ys[1, 73:] = 1e8
    args = (_jnp(params), jnp.asarray(ys), jnp.asarray(lengths))
    filt, seq, seq_ll = run_batch(*args, parallel=False)
    par = parallel_smoother(*args)
    for a, b in zip(seq, par, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10)
    for value in (filt.log_likelihood, seq_ll):
        np.testing.assert_allclose(value, seq.log_likelihood, rtol=1e-12)
    for i, length in enumerate(lengths):
        np.testing.assert_allclose(seq.means[i, length - 1], filt.means[i, length - 1], rtol=1e-12)
        assert np.all(np.asarray(par.covariances[i, length:]) == 0.0)


def test_gradient_matches_dense_oracle():
    params = _problem(9, 2, 2)
    y = _data(params, 4, 9)
    y[1, 0] = np.nan
    y[2] = np.nan
    observed = np.flatnonzero(~np.isnan(y.reshape(-1)))
    nz = y.shape[0] * 2

    def dense_log_p(p):
        mean, cov = _joint(p, y.shape[0], jnp, jax.scipy.linalg.block_diag)
        idx = nz + observed
        return jax.scipy.stats.multivariate_normal.logpdf(
            jnp.asarray(y.reshape(-1)[observed]), mean[idx], cov[np.ix_(idx, idx)]
        )

    p = _jnp(params)
    expected = jax.jit(jax.grad(dense_log_p))(p)
    # The sequential filter only: the parallel one's gradient costs seconds to compile.
    got = jax.jit(jax.grad(kalman.log_likelihood))(p, jnp.asarray(y))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-8, rtol=1e-8)


def test_float32_matches_float64_and_stays_positive_definite():
    s, o, num_steps = 4, 2, 500
    rng = np.random.default_rng(10)
    rotation, _ = np.linalg.qr(rng.normal(size=(s, s)))
    # Nearly a unit root: a slow random walk observed through two dimensions.
    params = kalman.LGSSMParams(
        initial_mean=np.zeros(s),
        initial_covariance=np.eye(s) * 10.0,
        transition_matrix=rotation @ np.diag([0.9999, 0.999, 0.99, 0.95]) @ rotation.T,
        transition_covariance=_spd(rng, s, 0.01),
        observation_matrix=rng.normal(size=(o, s)),
        observation_covariance=_spd(rng, o, 0.1),
    )
    y = _data(params, num_steps, 10)
    y[rng.random(y.shape) < 0.05] = np.nan
    run = jax.jit(lambda p, y: (kalman.kalman_filter(p, y), kalman.kalman_smoother(p, y)))
    _, r64 = run(_jnp(params), jnp.asarray(y))
    filt, r32 = run(_jnp(params, jnp.float32), jnp.asarray(y, jnp.float32))
    assert r32.means.dtype == jnp.float32
    np.testing.assert_allclose(r32.log_likelihood, r64.log_likelihood, rtol=1e-4)
    for a32, a64 in zip(r32[1:], r64[1:], strict=True):
        scale = np.max(np.abs(np.asarray(a64)))
        np.testing.assert_allclose(a32, a64, atol=1e-4 * scale, rtol=0)
    covs = np.asarray(r32.covariances)
    np.testing.assert_array_equal(covs, np.swapaxes(covs, 1, 2))
    assert np.all(np.isfinite(np.linalg.cholesky(covs)))
    f_covs = np.asarray(filt.covariances)
    np.testing.assert_array_equal(f_covs, np.swapaxes(f_covs, 1, 2))
    assert np.all(np.isfinite(np.linalg.cholesky(f_covs)))


def test_sample_moments():
    params = _problem(11, 2, 2)
    num_steps, num_seq = 3, 4000
    keys = jr.split(jr.PRNGKey(11), num_seq)
    states, obs = jax.vmap(lambda k: kalman.sample(k, _jnp(params), num_steps))(keys)
    assert states.shape == (num_seq, num_steps, 2) and obs.shape == (num_seq, num_steps, 2)
    mean, cov = _joint(params, num_steps)
    draws = np.concatenate(
        [np.asarray(states).reshape(num_seq, -1), np.asarray(obs).reshape(num_seq, -1)], axis=1
    )
    scale = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(draws.mean(0) / scale, mean / scale, atol=0.1)
    np.testing.assert_allclose(
        np.cov(draws.T) / np.outer(scale, scale), cov / np.outer(scale, scale), atol=0.1
    )
