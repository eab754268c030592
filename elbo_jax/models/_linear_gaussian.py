r"""Linear-Gaussian latent-variable models: probabilistic PCA and factor analysis.

Both are $x = W z + \mu + \varepsilon$ with $z \sim \mathcal N(0, I_L)$ and
$\varepsilon \sim \mathcal N(0, \Psi)$; PPCA has $\Psi = \sigma^2 I_D$, factor analysis a
diagonal $\Psi$. Everything about them is exact: the posterior $p(z \mid x)$ is Gaussian,
the marginal is $\mathcal N(\mu, W W^\top + \Psi)$, and the M-step is a linear regression
of $x$ on $\tilde z = [z; 1]$ from expected sufficient statistics. The shared maths lives
in ``_AbstractLinearGaussian``; the two final classes differ only in the noise.
"""

import abc
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import numpy as np

from .._custom_types import Array, Data, Float, Key, PerDatum, Scalar, Stats
from .._latent import Real
from .._model import Model
from .._q import AbstractQ, Gaussian

DEFAULT_MIN_NOISE_VARIANCE = 1e-6
"""Default floor on the noise variances set by the closed-form M-step (``reg_covar``-style)."""


# --------------------------------------------------------------------------- helpers
def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _float_dtype(a: Array) -> Any:
    """``a``'s dtype if floating, else the default float dtype."""
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a.dtype
    return jnp.result_type(float)


def _check_min_noise_variance(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"min_noise_variance must be a finite number > 0, got {value!r}")
    return float(value)


def _check_parameters(
    cls_name: str, weight: Any, mean: Any, noise_variance: Any, noise_shape: str
) -> tuple[Array, Array, Array]:
    """Convert to arrays of one floating dtype (``weight``'s) and check shapes and values."""
    weight = jnp.asarray(weight)
    dtype = _float_dtype(weight)
    weight = weight.astype(dtype)
    if weight.ndim != 2:
        raise ValueError(f"{cls_name}: weight has shape {weight.shape}, expected (D, L)")
    d, latent_dim = weight.shape
    if latent_dim < 1 or d < 1:
        raise ValueError(
            f"{cls_name}: weight has shape {weight.shape}, expected (D, L) with D, L >= 1"
        )
    mean = jnp.asarray(mean, dtype)
    if mean.shape != (d,):
        raise ValueError(f"{cls_name}: mean has shape {mean.shape}, expected (D,) = ({d},)")
    noise = jnp.asarray(noise_variance, dtype)
    expected = () if noise_shape == "scalar" else (d,)
    if noise.shape != expected:
        raise ValueError(
            f"{cls_name}: noise_variance has shape {noise.shape}, expected {expected} "
            f"({'a scalar' if noise_shape == 'scalar' else f'one variance per dimension, D={d}'})"
        )
    for name, value in (("weight", weight), ("mean", mean)):
        if _is_concrete(value) and not np.all(np.isfinite(np.asarray(value))):
            raise ValueError(f"{cls_name}: {name} contains NaN or Inf")
    if _is_concrete(noise):
        arr = np.asarray(noise)
        if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
            raise ValueError(f"{cls_name}: noise_variance must be finite and > 0, got {arr}")
    return weight, mean, noise


def _check_x(x: Any, dim: int | None = None) -> None:
    shape = jnp.shape(x)
    if len(shape) != 2 or (dim is not None and shape[1] != dim):
        want = "(N, D)" if dim is None else f"(N, D) with D={dim}"
        raise ValueError(f"x has shape {shape}, expected {want}")
    if shape[0] < 1:
        raise ValueError(f"x has shape {shape}: there are no data (N = 0)")


def _prepare_x(x: Any) -> Array:
    """Data for a classmethod: a 2-D floating array with finite entries."""
    x = jnp.asarray(x)
    x = x.astype(_float_dtype(x))
    _check_x(x)
    if _is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError("x contains NaN or Inf")
    return x


def _check_latent_dim(latent_dim: Any, x: Array) -> int:
    n, d = x.shape
    if (
        isinstance(latent_dim, bool)
        or not isinstance(latent_dim, (int, np.integer))
        or latent_dim < 1
    ):
        raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
    latent_dim = int(latent_dim)
    if latent_dim >= d:
        raise ValueError(
            f"latent_dim={latent_dim} must be smaller than the data dimension D={d}: "
            "with L >= D the noise is not identifiable"
        )
    if latent_dim > n:
        raise ValueError(f"latent_dim={latent_dim} is larger than the number of data N={n}")
    return latent_dim


# --------------------------------------------------------------------------- shared maths
class _AbstractLinearGaussian(Model):
    r"""The shared maths of $x = W z + \mu + \varepsilon$, $z \sim \mathcal N(0, I_L)$,
    $\varepsilon \sim \mathcal N(0, \Psi)$.

    Shared exact maths for PPCA ($\Psi = \sigma^2 I$) and factor analysis (diagonal $\Psi$).
    Subclasses store ``log_noise_variance`` (unconstrained) and say how to turn residual
    sums into the noise.
    """

    weight: eqx.AbstractVar[Float[Array, "D L"]]
    mean: eqx.AbstractVar[Float[Array, " D"]]
    log_noise_variance: eqx.AbstractVar[Array]
    min_noise_variance: eqx.AbstractVar[float]

    @abc.abstractmethod
    def _noise_from_residuals(self, residual: Float[Array, " D"], n: Scalar) -> Array:
        r"""The M-step noise variance from the residual sums
        $r_d = \sum_n E[(x_{nd} - \tilde w_d^\top \tilde z_n)^2]$."""

    # ------------------------------------------------------------ properties
    @property
    def latent(self) -> Real:
        """``ej.Real(L)``, from the shape of ``weight``."""
        return Real(self.weight.shape[1])

    @property
    def latent_dim(self) -> int:
        """$L$, the number of latent factors."""
        return self.weight.shape[1]

    @property
    def dim(self) -> int:
        """$D$, the data dimension."""
        return self.weight.shape[0]

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    @property
    def noise_variance(self) -> Array:
        r"""The noise variance: $\sigma^2$ (PPCA, scalar) or $\mathrm{diag}\,\Psi$ (FA, (D,))."""
        return jnp.exp(self.log_noise_variance)

    @property
    def noise_diagonal(self) -> Float[Array, " D"]:
        """$\\mathrm{diag}\\,\\Psi$, shape ``(D,)`` for both models."""
        return jnp.broadcast_to(self.noise_variance, (self.dim,))

    @property
    def covariance(self) -> Float[Array, "D D"]:
        """The marginal covariance $\\mathrm{Cov}[x] = W W^\\top + \\Psi$, shape ``(D, D)``."""
        return self.weight @ self.weight.T + jnp.diag(self.noise_diagonal)

    # ------------------------------------------------------------ densities
    def log_joint(self, x: Float[Array, " D"], z: Float[Array, " L"]) -> Scalar:
        r"""The log-joint of one datum and one latent value.

        $\log p(x, z) = \log \mathcal N(z \mid 0, I_L) + \log \mathcal N(x \mid W z + \mu, \Psi)$,
        for one datum ``x`` ``(D,)`` and one latent value ``z`` ``(L,)``.
        """
        psi = self.noise_diagonal
        resid = x - self.weight @ z - self.mean
        log_prior = -0.5 * (jnp.sum(z**2) + self.latent_dim * math.log(2 * math.pi))
        log_lik = -0.5 * (
            jnp.sum(resid**2 / psi) + jnp.sum(jnp.log(psi)) + self.dim * math.log(2 * math.pi)
        )
        return log_prior + log_lik

    def _data(self, x: Data) -> Array:
        self.check_data(x)
        return jnp.asarray(x, self.dtype)

    def _posterior_parts(self, x: Array) -> tuple[Array, Array, Array]:
        r"""Posterior means ``(N, L)``, $\mathrm{chol}(M)$ and residuals $x - \mu$, with
        $M = I + W^\top \Psi^{-1} W$ and mean $M^{-1} W^\top \Psi^{-1} (x - \mu)$."""
        psi = self.noise_diagonal
        scaled_w = self.weight / psi[:, None]  # Psi^{-1} W
        precision = jnp.eye(self.latent_dim, dtype=self.dtype) + self.weight.T @ scaled_w
        chol = jnp.linalg.cholesky(precision)
        resid = x - self.mean[None, :]
        means = jsl.cho_solve((chol, True), (resid @ scaled_w).T).T
        return means, chol, resid

    def posterior(self, x: Data) -> Gaussian:
        r"""The exact posterior for every datum, as an ``ej.Gaussian``.

        $p(z \mid x_n) = \mathcal N(M^{-1} W^\top \Psi^{-1}(x_n - \mu),\; M^{-1})$ with
        $M = I_L + W^\top \Psi^{-1} W$, solved by Cholesky. The covariance is the same for
        every datum.

        **Arguments:** `x`: data ``(N, D)``.

        **Returns:** an ``ej.Gaussian`` with means ``(N, L)`` and covariances ``(N, L, L)``.
        """
        x = self._data(x)
        means, chol, _ = self._posterior_parts(x)
        eye = jnp.eye(self.latent_dim, dtype=self.dtype)
        cov = jsl.cho_solve((chol, True), eye)
        cov = 0.5 * (cov + cov.T)
        # Equivalent to Gaussian.from_moments(means, cov broadcast to (N, L, L)), but
        # factorises the shared (L, L) covariance once instead of N times.
        scale = jnp.linalg.cholesky(cov)
        raw_scale = jnp.tril(scale, -1) + jnp.diag(jnp.log(jnp.diagonal(scale)))
        raw_scale = jnp.broadcast_to(raw_scale, (x.shape[0], *raw_scale.shape))
        return Gaussian(means, raw_scale, covariance_type="full")

    def transform(self, x: Data) -> Float[Array, "N L"]:
        r"""The posterior means $E[z \mid x_n] = M^{-1} W^\top \Psi^{-1}(x_n - \mu)$, ``(N, L)``."""
        return self._posterior_parts(self._data(x))[0]

    def log_marginal(self, x: Data) -> PerDatum:
        r"""$\log p(x_n) = \log \mathcal N(x_n \mid \mu, W W^\top + \Psi)$ per datum, ``(N,)``.

        Computed in $O(N D L)$ without forming the $D \times D$ covariance: with
        $m_n = E[z \mid x_n]$ and $r_n = x_n - \mu$,
        $r^\top (W W^\top + \Psi)^{-1} r = (r - W m)^\top \Psi^{-1} (r - W m) + m^\top m$ and
        $\log|W W^\top + \Psi| = \log|M| + \sum_d \log \Psi_{dd}$ (a sum of nonnegative
        terms, so no cancellation when $\Psi$ is small).
        """
        x = self._data(x)
        psi = self.noise_diagonal
        means, chol, resid = self._posterior_parts(x)
        fit_resid = resid - means @ self.weight.T
        quad = jnp.sum(fit_resid**2 / psi[None, :], axis=-1) + jnp.sum(means**2, axis=-1)
        log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(chol))) + jnp.sum(jnp.log(psi))
        return -0.5 * (quad + log_det + self.dim * math.log(2 * math.pi))

    # ------------------------------------------------------------ closed-form M-step
    def has_closed_form(self, prior: Any) -> bool:
        """``True`` for maximum likelihood (``prior=None``)."""
        return prior is None

    def sufficient_statistics(self, x: Data, q: AbstractQ) -> Stats:
        r"""Additive expected sufficient statistics under $q$, with $\tilde z = [z; 1]$.

        Uses only $q$'s moments $m_n = E_q[z_n]$, $S_n = \mathrm{Cov}_q[z_n]$ (an
        ``ej.Gaussian``, or an ``ej.PointMass`` with $S_n = 0$):

        - ``n``: $N$;
        - ``sum_x_ez``: $\sum_n x_n E[\tilde z_n]^\top$, ``(D, L+1)``;
        - ``sum_ezz``: $\sum_n E[\tilde z_n \tilde z_n^\top]$, ``(L+1, L+1)``;
        - ``sum_xx``: $\sum_n x_n \odot x_n$, ``(D,)``.

        **Returns:** a dict of arrays; statistics of disjoint batches add up.
        """
        x = self._data(x)
        q = q.resolve(self, x)
        if not (hasattr(q, "mean") and hasattr(q, "covariance")):
            raise TypeError(
                f"{type(self).__name__}.sufficient_statistics needs a q with Gaussian moments "
                f"(ej.Gaussian or ej.PointMass), got {type(q).__name__}"
            )
        m = jnp.asarray(q.mean, self.dtype)
        cov = jnp.asarray(q.covariance, self.dtype)
        n = x.shape[0]
        ez = jnp.concatenate([m, jnp.ones((n, 1), self.dtype)], axis=1)
        sum_ezz = ez.T @ ez
        sum_ezz = sum_ezz.at[:-1, :-1].add(jnp.sum(cov, axis=0))
        return {
            "n": jnp.asarray(n, self.dtype),
            "sum_x_ez": x.T @ ez,
            "sum_ezz": sum_ezz,
            "sum_xx": jnp.sum(x**2, axis=0),
        }

    def maximize(self, stats: Stats, prior: Any = None) -> "_AbstractLinearGaussian":
        r"""The exact M-step: the joint maximiser of $\sum_n E_q[\log p(x_n, z_n)]$.

        With $B = \sum_n x_n E[\tilde z_n]^\top$ and $A = \sum_n E[\tilde z_n \tilde z_n^\top]$,
        $[W, \mu] = B A^{-1}$ (Cholesky solve), then the residuals
        $r_d = \big(\sum_n x_n x_n^\top - [W, \mu] B^\top\big)_{dd}$ give
        $\sigma^2 = \sum_d r_d / (N D)$ (PPCA) or $\Psi_{dd} = r_d / N$ (FA), floored at
        ``min_noise_variance``.
        """
        if prior is not None:
            raise NotImplementedError(
                f"{type(self).__name__} has a closed-form M-step only for prior=None"
            )
        sum_x_ez = stats["sum_x_ez"]
        chol = jnp.linalg.cholesky(stats["sum_ezz"])
        w_tilde = jsl.cho_solve((chol, True), sum_x_ez.T).T  # (D, L+1)
        residual = stats["sum_xx"] - jnp.sum(w_tilde * sum_x_ez, axis=1)
        noise = jnp.maximum(
            self._noise_from_residuals(residual, stats["n"]), self.min_noise_variance
        )
        return eqx.tree_at(
            lambda m: (m.weight, m.mean, m.log_noise_variance),
            self,
            (w_tilde[:, :-1], w_tilde[:, -1], jnp.log(noise)),
        )

    # ------------------------------------------------------------ checks, sampling
    def check_data(self, x: Data) -> None:
        """``x`` must be ``(N, D)`` with this model's ``D``."""
        _check_x(x, self.dim)

    def sample(self, key: Key, n: int) -> tuple[Float[Array, "n D"], Float[Array, "n L"]]:
        r"""Draw ``n`` data: $z \sim \mathcal N(0, I)$, $x = W z + \mu + \Psi^{1/2}\epsilon$.

        **Returns:** ``(x, z)``, shapes ``(n, D)`` and ``(n, L)``.
        """
        z_key, e_key = jr.split(key)
        z = jr.normal(z_key, (n, self.latent_dim), self.dtype)
        eps = jr.normal(e_key, (n, self.dim), self.dtype)
        x = z @ self.weight.T + self.mean[None, :] + eps * jnp.sqrt(self.noise_diagonal)[None, :]
        return x, z


def _initial_parts(key: Key, x: Any, latent_dim: Any) -> tuple[Array, Array, Array, Array, int]:
    x = _prepare_x(x)
    latent_dim = _check_latent_dim(latent_dim, x)
    mean = jnp.mean(x, axis=0)
    var = jnp.var(x, axis=0)
    scale = jnp.sqrt(jnp.mean(var))
    weight = 1e-2 * scale * jr.normal(key, (x.shape[1], latent_dim), x.dtype)
    return x, weight, mean, var, latent_dim


# --------------------------------------------------------------------------- the models
class PPCA(_AbstractLinearGaussian):
    r"""Probabilistic PCA (Tipping & Bishop, 1999).

    $$z \sim \mathcal N(0, I_L), \qquad x \mid z \sim \mathcal N(W z + \mu,\; \sigma^2 I_D),
      \qquad x \sim \mathcal N(\mu,\; W W^\top + \sigma^2 I_D).$$

    The latent space is ``ej.Real(L)``; ``log_joint`` is for one datum (elbo_jax does the
    ``vmap``). Hooks: exact Gaussian ``posterior``, ``log_marginal`` in $O(NDL)$, and a
    closed-form M-step, so ``ej.fit(model, x)`` is exact EM. The maximum-likelihood
    solution is also available in closed form: ``PPCA.maximum_likelihood(x, L)``.

    **Arguments:**

    - `weight`: the loadings $W$, shape ``(D, L)``. Its floating dtype is the model's.
    - `mean`: $\mu$, shape ``(D,)``.
    - `noise_variance`: $\sigma^2 > 0$, a scalar (stored as its log).
    - `min_noise_variance`: the floor the closed-form M-step puts on $\sigma^2$
      (default ``1e-6``, absolute: rescale data with a tiny noise level).

    ```python
    model = ej.models.PPCA.initialize(jax.random.key(0), x, latent_dim=2)
    res = ej.fit(model, x)
    z = res.model.transform(x)            # posterior means, (N, 2)
    ```
    """

    weight: Float[Array, "D L"]
    mean: Float[Array, " D"]
    log_noise_variance: Float[Array, ""]
    min_noise_variance: float = eqx.field(static=True)

    def __init__(
        self,
        weight: Any,
        mean: Any,
        noise_variance: Any,
        *,
        min_noise_variance: float = DEFAULT_MIN_NOISE_VARIANCE,
    ):
        weight, mean, noise = _check_parameters("PPCA", weight, mean, noise_variance, "scalar")
        self.weight = weight
        self.mean = mean
        self.log_noise_variance = jnp.log(noise)
        self.min_noise_variance = _check_min_noise_variance(min_noise_variance)

    def _noise_from_residuals(self, residual, n):
        return jnp.sum(residual) / (n * self.dim)

    @classmethod
    def initialize(
        cls,
        key: Key,
        x: Any,
        latent_dim: int,
        *,
        min_noise_variance: float = DEFAULT_MIN_NOISE_VARIANCE,
    ) -> "PPCA":
        r"""A starting point for EM: $\mu$ = data mean, $W$ small and random, $\sigma^2$ =
        the mean data variance. ``latent_dim`` must be in ``[1, D)`` and at most ``N``."""
        x, weight, mean, var, _ = _initial_parts(key, x, latent_dim)
        return cls(
            weight,
            mean,
            jnp.maximum(jnp.mean(var), min_noise_variance),
            min_noise_variance=min_noise_variance,
        )

    @classmethod
    def maximum_likelihood(
        cls, x: Any, latent_dim: int, *, min_noise_variance: float = DEFAULT_MIN_NOISE_VARIANCE
    ) -> "PPCA":
        r"""The closed-form maximum-likelihood PPCA (Tipping & Bishop, 1999, eq. 7-8).

        With the sample covariance $S = \frac1N \sum_n (x_n - \bar x)(x_n - \bar x)^\top$
        and its eigenvalues $\lambda_1 \ge \dots \ge \lambda_D$ (eigenvectors $U$):
        $\mu = \bar x$, $\sigma^2 = \frac{1}{D - L}\sum_{j > L} \lambda_j$ and
        $W = U_L (\Lambda_L - \sigma^2 I)^{1/2}$ (unique up to a rotation $W R$).

        ```python
        best = ej.models.PPCA.maximum_likelihood(x, 2)
        ej.log_evidence(best, x)              # the largest achievable per datum
        ```
        """
        x = _prepare_x(x)
        latent_dim = _check_latent_dim(latent_dim, x)
        mean = jnp.mean(x, axis=0)
        resid = x - mean[None, :]
        sample_cov = resid.T @ resid / x.shape[0]
        evals, evecs = jnp.linalg.eigh(sample_cov)
        evals, evecs = evals[::-1], evecs[:, ::-1]
        noise = jnp.maximum(jnp.mean(evals[latent_dim:]), min_noise_variance)
        scale = jnp.sqrt(jnp.maximum(evals[:latent_dim] - noise, 0))
        weight = evecs[:, :latent_dim] * scale[None, :]
        return cls(weight, mean, noise, min_noise_variance=min_noise_variance)


class FactorAnalysis(_AbstractLinearGaussian):
    r"""Factor analysis: PPCA with a separate noise variance per dimension.

    $$z \sim \mathcal N(0, I_L), \qquad x \mid z \sim \mathcal N(W z + \mu,\; \Psi),
      \quad \Psi = \mathrm{diag}(\psi_1, \dots, \psi_D), \qquad
      x \sim \mathcal N(\mu,\; W W^\top + \Psi).$$

    The latent space is ``ej.Real(L)``; ``log_joint`` is for one datum. Exact
    ``posterior``, ``log_marginal`` and a closed-form M-step, as for ``PPCA``; the
    maximum-likelihood fit has no closed form, so use ``ej.fit``.

    **Arguments:**

    - `weight`: the loadings $W$, shape ``(D, L)``. Its floating dtype is the model's.
    - `mean`: $\mu$, shape ``(D,)``.
    - `noise_variance`: $\mathrm{diag}\,\Psi$, shape ``(D,)``, all $> 0$ (stored as logs).
    - `min_noise_variance`: the floor the closed-form M-step puts on each $\psi_d$
      (default ``1e-6``; guards against Heywood cases $\psi_d \to 0$).

    ```python
    model = ej.models.FactorAnalysis.initialize(jax.random.key(0), x, latent_dim=2)
    res = ej.fit(model, x, max_iters=1000, tol=1e-9)
    res.model.weight, res.model.noise_variance
    ```
    """

    weight: Float[Array, "D L"]
    mean: Float[Array, " D"]
    log_noise_variance: Float[Array, " D"]
    min_noise_variance: float = eqx.field(static=True)

    def __init__(
        self,
        weight: Any,
        mean: Any,
        noise_variance: Any,
        *,
        min_noise_variance: float = DEFAULT_MIN_NOISE_VARIANCE,
    ):
        weight, mean, noise = _check_parameters(
            "FactorAnalysis", weight, mean, noise_variance, "diagonal"
        )
        self.weight = weight
        self.mean = mean
        self.log_noise_variance = jnp.log(noise)
        self.min_noise_variance = _check_min_noise_variance(min_noise_variance)

    def _noise_from_residuals(self, residual, n):
        return residual / n

    @classmethod
    def initialize(
        cls,
        key: Key,
        x: Any,
        latent_dim: int,
        *,
        min_noise_variance: float = DEFAULT_MIN_NOISE_VARIANCE,
    ) -> "FactorAnalysis":
        r"""A starting point for EM: $\mu$ = data mean, $W$ small and random, $\Psi$ = the
        per-dimension data variances. ``latent_dim`` must be in ``[1, D)`` and at most ``N``."""
        x, weight, mean, var, _ = _initial_parts(key, x, latent_dim)
        var = jnp.maximum(var, min_noise_variance)
        return cls(weight, mean, var, min_noise_variance=min_noise_variance)
