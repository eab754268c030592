"""User-level models for the core tests, and plain-NumPy oracles for them.

The models are written as a user would: an ``ej.Model`` subclass with parameters as
fields, a ``latent`` and a ``log_joint`` for one datum — no hooks, unless a test needs
the exact posterior of a ``Real`` latent (``LinearGaussianExact``).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln, logsumexp

import elbo_jax as ej

TOSSES = 10


class ThreeCoins(ej.Model):
    """Pick coin 0 with probability sigmoid(logits[0]), else coin 1; toss it 10 times.

    x is the number of heads (a float); z is which coin. Parameters are logits.
    """

    logits: jax.Array  # (3,): choice logit, head logit of coin 0, head logit of coin 1
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        log_w = jax.nn.log_sigmoid(jnp.where(z == 0, self.logits[0], -self.logits[0]))
        logit = self.logits[1 + z]
        return log_w + x * jax.nn.log_sigmoid(logit) + (TOSSES - x) * jax.nn.log_sigmoid(-logit)


class PoissonMixture(ej.Model):
    """A K-component Poisson mixture with mixing logits and log-rates (no closed form)."""

    mix_logits: jax.Array  # (K,)
    log_rates: jax.Array  # (K,)
    latent = ej.Discrete(3)

    def log_joint(self, x, z):
        log_w = jax.nn.log_softmax(self.mix_logits)[z]
        log_rate = self.log_rates[z]
        return log_w + x * log_rate - jnp.exp(log_rate) - jax.scipy.special.gammaln(x + 1)


def sample_poisson_mixture(model, key, n, max_count=80):
    """``n`` draws ``(x, z)`` from a ``PoissonMixture``: counts by a categorical over 0 ..
    ``max_count`` with the Poisson probabilities (the tail beyond is negligible for the rates
    used here), which compiles to a smaller program than ``jax.random.poisson``'s rejection
    loop."""
    k1, k2 = jax.random.split(key)
    z = jax.random.categorical(k1, model.mix_logits, shape=(n,))
    support = jnp.arange(max_count + 1, dtype=model.log_rates.dtype)
    log_pmf = (
        support[None, :] * model.log_rates[:, None]
        - jnp.exp(model.log_rates)[:, None]
        - jax.scipy.special.gammaln(support + 1)[None, :]
    )
    return jax.random.categorical(k2, log_pmf[z]).astype(model.log_rates.dtype), z


class LinearGaussian(ej.Model):
    """x = w z + b + noise in R^2, z ~ N(0, 1) in R^1, noise ~ N(0, sigma^2 I)."""

    w: jax.Array  # (2, 1)
    b: jax.Array  # (2,)
    log_sigma: jax.Array  # ()
    latent = ej.Real(1)

    def log_joint(self, x, z):
        resid = x - self.w @ z - self.b
        var = jnp.exp(2 * self.log_sigma)
        log_pz = -0.5 * jnp.sum(z**2) - 0.5 * math.log(2 * math.pi)
        d = x.shape[0]
        log_px = -0.5 * jnp.sum(resid**2) / var - 0.5 * d * jnp.log(2 * math.pi * var)
        return log_pz + log_px


class LinearGaussianExact(LinearGaussian):
    """The same model with the exact ``posterior`` and ``log_marginal`` written by the user."""

    def posterior(self, x):
        var = jnp.exp(2 * self.log_sigma)
        precision = jnp.eye(1, dtype=self.w.dtype) + self.w.T @ self.w / var
        cov = jnp.linalg.inv(precision)
        mean = (x - self.b[None, :]) @ self.w @ cov.T / var
        covs = jnp.broadcast_to(cov, (x.shape[0], 1, 1))
        return ej.Gaussian.from_moments(mean, covs)

    def log_marginal(self, x):
        var = jnp.exp(2 * self.log_sigma)
        cov = self.w @ self.w.T + var * jnp.eye(2, dtype=self.w.dtype)
        return jax.vmap(lambda xn: jax.scipy.stats.multivariate_normal.logpdf(xn, self.b, cov))(x)


# ------------------------------------------------------------------------------ data
def coin_data(n=200, seed=0, pi=0.3, p=(0.8, 0.35)):
    rng = np.random.default_rng(seed)
    z = rng.random(n) < pi
    return np.where(z, rng.binomial(TOSSES, p[0], n), rng.binomial(TOSSES, p[1], n)).astype(float)


def poisson_data(n=150, seed=0, weights=(0.5, 0.3, 0.2), rates=(1.0, 5.0, 12.0)):
    rng = np.random.default_rng(seed)
    z = rng.choice(len(weights), size=n, p=weights)
    return rng.poisson(np.asarray(rates)[z]).astype(float)


def linear_gaussian_data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 1))
    w = np.array([[1.5], [-0.7]])
    return z @ w.T + np.array([0.5, -1.0]) + 0.4 * rng.normal(size=(n, 2))


def three_coins(logits, dtype=jnp.float64):
    return ThreeCoins(jnp.asarray(logits, dtype))


def poisson_mixture(mix_logits, log_rates, dtype=jnp.float64):
    return PoissonMixture(jnp.asarray(mix_logits, dtype), jnp.asarray(log_rates, dtype))


def linear_gaussian(w=((1.0,), (0.5,)), b=(0.0, 0.0), log_sigma=0.0, *, exact=False):
    cls = LinearGaussianExact if exact else LinearGaussian
    return cls(
        jnp.asarray(w, jnp.float64),
        jnp.asarray(b, jnp.float64),
        jnp.asarray(log_sigma, jnp.float64),
    )


# ----------------------------------------------------------------- NumPy oracles
def log_sigmoid_np(v):
    return -np.logaddexp(0.0, -v)


def coins_table_np(logits, x):
    """log p(x_n, z=k) for three coins, (N, 2), in NumPy."""
    logits = np.asarray(logits, float)
    x = np.asarray(x, float)[:, None]
    log_w = np.array([log_sigmoid_np(logits[0]), log_sigmoid_np(-logits[0])])
    heads = logits[1:]
    return log_w + x * log_sigmoid_np(heads) + (TOSSES - x) * log_sigmoid_np(-heads)


def poisson_table_np(mix_logits, log_rates, x):
    mix_logits = np.asarray(mix_logits, float)
    log_rates = np.asarray(log_rates, float)
    x = np.asarray(x, float)[:, None]
    log_w = mix_logits - logsumexp(mix_logits)
    return log_w + x * log_rates - np.exp(log_rates) - gammaln(x + 1)


def coins_em_np(pi, p, x, num_iters, *, prior=None, hard=False):
    """EM (or hard/classification EM) for three coins in probability space.

    ``prior=(a, b)`` puts Beta(a, b) on pi and on both head probabilities (MAP-EM).
    Returns (pi, p) after ``num_iters`` iterations of (E-step, M-step).
    """
    x = np.asarray(x, float)
    p = np.asarray(p, float)
    a, b = (1.0, 1.0) if prior is None else prior
    for _ in range(num_iters):
        log_w = np.log([pi, 1 - pi])
        table = log_w + x[:, None] * np.log(p) + (TOSSES - x[:, None]) * np.log1p(-p)
        if hard:
            r = np.eye(2)[np.argmax(table, axis=1)]
        else:
            r = np.exp(table - logsumexp(table, axis=1, keepdims=True))
        counts = r.sum(0)
        heads = r.T @ x
        pi = (counts[0] + a - 1) / (len(x) + a + b - 2)
        p = (heads + a - 1) / (TOSSES * counts + a + b - 2)
    return pi, p


def poisson_em_np(weights, rates, x, num_iters):
    """EM for a Poisson mixture in NumPy; returns (weights, rates)."""
    x = np.asarray(x, float)
    weights = np.asarray(weights, float)
    rates = np.asarray(rates, float)
    for _ in range(num_iters):
        table = np.log(weights) + x[:, None] * np.log(rates) - rates - gammaln(x[:, None] + 1)
        r = np.exp(table - logsumexp(table, axis=1, keepdims=True))
        counts = r.sum(0)
        weights = counts / len(x)
        rates = (r.T @ x) / counts
    return weights, rates


def linear_gaussian_loglik_np(w, b, sigma, x):
    """Mean log p(x_n) for x ~ N(b, w w^T + sigma^2 I), in NumPy."""
    w = np.asarray(w, float)
    cov = w @ w.T + sigma**2 * np.eye(2)
    resid = np.asarray(x, float) - np.asarray(b, float)
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    maha = np.einsum("ni,ij,nj->n", resid, np.linalg.inv(cov), resid)
    return float(np.mean(-0.5 * (maha + logdet + 2 * np.log(2 * np.pi))))


def linear_gaussian_ml_np(x):
    """Maximum-likelihood mean log p(x_n) of the linear-Gaussian model (PPCA, q=1, D=2)."""
    x = np.asarray(x, float)
    mean = x.mean(0)
    cov = np.cov(x.T, bias=True)
    evals, evecs = np.linalg.eigh(cov)
    sigma2 = evals[0]
    w = evecs[:, [1]] * np.sqrt(evals[1] - sigma2)
    return linear_gaussian_loglik_np(w, mean, np.sqrt(sigma2), x)


def gaussian_kl_np(m1, s1, m2, s2):
    """KL(N(m1, s1) || N(m2, s2)) per datum for (N, d) means and (N, d, d) covariances."""
    out = []
    for a, sa, b, sb in zip(m1, s1, m2, s2, strict=True):
        d = a.shape[0]
        inv = np.linalg.inv(sb)
        diff = b - a
        out.append(
            0.5
            * (
                np.trace(inv @ sa)
                + diff @ inv @ diff
                - d
                + np.linalg.slogdet(sb)[1]
                - np.linalg.slogdet(sa)[1]
            )
        )
    return np.asarray(out)


# Model methods compiled once per model kind, dtype and shape, shared by the statistics tests
# (eager calls compile each primitive anew for every data size they meet).
@eqx.filter_jit
def compiled_posterior(model, x):
    return model.posterior(x)


@eqx.filter_jit
def compiled_statistics(model, x, q, weights=None):
    return model.sufficient_statistics(x, q, weights=weights)


@eqx.filter_jit
def compiled_maximize(model, stats):
    return model.maximize(stats)
