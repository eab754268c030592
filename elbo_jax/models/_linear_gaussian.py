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
from typing import Any, ClassVar, final

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
from .._statistics import AbstractStatistics
from .._validate import canonical_float_dtype, is_concrete, is_integer, is_number, prepare_data

DEFAULT_MIN_NOISE_VARIANCE = 1e-6
"""Default floor on the noise variances set by the closed-form M-step (``reg_covar``-style)."""


# --------------------------------------------------------------------------- helpers
def _float_dtype(a: Array) -> Any:
    """``a``'s dtype if floating, else the default float dtype (as JAX stores either)."""
    return canonical_float_dtype(a)


def _check_min_noise_variance(value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
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
        if is_concrete(value) and not np.all(np.isfinite(np.asarray(value))):
            raise ValueError(f"{cls_name}: {name} contains NaN or Inf")
    if is_concrete(noise):
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
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError("x contains NaN or Inf")
    return x


def _check_latent_dim(latent_dim: Any, x: Array) -> int:
    n, d = x.shape
    if not is_integer(latent_dim) or latent_dim < 1:
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


# --------------------------------------------------------------------------- statistics
@final
class LinearGaussianStatistics(AbstractStatistics):
    r"""Expected sufficient statistics of PPCA / factor analysis, about a shift $c$.

    With $\tilde z = [z; 1]$ and weights $w_n$:

    - ``count``: $N = \sum_n w_n$;
    - ``shift``: $c$, ``(D,)`` — any point; ``sufficient_statistics`` uses the data's
      weighted mean;
    - ``sum_x_ez``: $B = \sum_n w_n (x_n - c)\, E[\tilde z_n]^\top$, ``(D, L+1)``;
    - ``sum_ezz``: $A = \sum_n w_n E[\tilde z_n \tilde z_n^\top]$, ``(L+1, L+1)``;
    - ``sum_xx``: $s = \sum_n w_n (x_n - c) \odot (x_n - c)$, ``(D,)``.

    **Why the shift.** The M-step's residual $s_d - [W, \mu - c]_d B_d^\top$ subtracts two
    sums of squares. About $c = 0$ each is of order $N (\mu_d^2 + \mathrm{Var}\,x_d)$ while
    their difference is $N \Psi_{dd}$: data at $10^3$ with unit noise lose six of float32's
    seven digits. About a $c$ near the data the sums are of order $N\,\mathrm{Var}\,x_d$ and
    only the cancellation intrinsic to the model remains.

    **Merging.** The statistics about another point $c'$, with $\delta = c - c'$, follow
    exactly from these, since $A$'s last row is $\sum_n w_n E[\tilde z_n]^\top$ and $B$'s last
    column is $\sum_n w_n (x_n - c)$:
    $B' = B + \delta\, A_{L+1,\cdot}$, $s' = s + 2 \delta \odot B_{\cdot, L+1} + N \delta \odot \delta$.
    ``merge`` moves both operands to the count-weighted mean of their shifts (so merged data
    stay centred) and adds; when one side has no data the other's shift is kept as it is, so
    zero statistics are exactly neutral.
    """

    count: Float[Array, ""]
    shift: Float[Array, " D"]
    sum_x_ez: Float[Array, "D L1"]
    sum_ezz: Float[Array, "L1 L1"]
    sum_xx: Float[Array, " D"]

    def shifted(self, shift: Array) -> "LinearGaussianStatistics":
        """The same statistics about the point ``shift`` instead of ``self.shift``."""
        delta = self.shift - shift
        sum_z = self.sum_ezz[-1]  # (sum w E[z]^T, N)
        sum_x = self.sum_x_ez[:, -1]  # sum w (x - c)
        return LinearGaussianStatistics(
            count=self.count,
            shift=shift,
            sum_x_ez=self.sum_x_ez + delta[:, None] * sum_z[None, :],
            sum_ezz=self.sum_ezz,
            sum_xx=self.sum_xx + 2 * delta * sum_x + self.count * delta * delta,
        )

    def merge(self, other: "LinearGaussianStatistics") -> "LinearGaussianStatistics":
        if not isinstance(other, LinearGaussianStatistics):
            raise TypeError(
                f"LinearGaussianStatistics merge with {type(other).__name__}: both sides must "
                "come from the same kind of model"
            )
        total = self.count + other.count
        safe = jnp.where(total != 0, total, 1.0)
        # A symmetric formula, so that merge is exactly commutative.
        mean_shift = (self.count * self.shift + other.count * other.shift) / safe
        shift = jnp.where(
            self.count == 0, other.shift, jnp.where(other.count == 0, self.shift, mean_shift)
        )
        a, b = self.shifted(shift), other.shifted(shift)
        return LinearGaussianStatistics(
            count=total,
            shift=shift,
            sum_x_ez=a.sum_x_ez + b.sum_x_ez,
            sum_ezz=a.sum_ezz + b.sum_ezz,
            sum_xx=a.sum_xx + b.sum_xx,
        )

    def scale(self, factor: Any) -> "LinearGaussianStatistics":
        c = jnp.asarray(factor, self.count.dtype)
        return LinearGaussianStatistics(
            count=c * self.count,
            shift=self.shift,
            sum_x_ez=c * self.sum_x_ez,
            sum_ezz=c * self.sum_ezz,
            sum_xx=c * self.sum_xx,
        )


# --------------------------------------------------------------------------- shared maths
class _AbstractLinearGaussian(Model):
    r"""The shared maths of $x = W z + \mu + \varepsilon$, $z \sim \mathcal N(0, I_L)$,
    $\varepsilon \sim \mathcal N(0, \Psi)$.

    Shared exact maths for PPCA ($\Psi = \sigma^2 I$) and factor analysis (diagonal $\Psi$).
    Subclasses store ``log_noise_variance`` (unconstrained) and say how to turn residual
    sums into the noise.
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("weight", "mean", "noise_variance")
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

    def _prepared(self, x: Data) -> Array:
        """``x`` in the model's dtype, its shape checked (a hook's input: the values were
        checked by ``fit`` or the evaluation function that called it)."""
        _check_x(x, self.dim)
        return jnp.asarray(x, self.dtype)

    def _data(self, x: Data) -> Array:
        """``x`` checked as ``fit`` checks it (``ValueError`` naming ``x`` for NaN/Inf, a wrong
        rank or ``D``, no data; inside a user's ``jit`` the shape only), in the model's dtype."""
        return jnp.asarray(prepare_data(self, x), self.dtype)

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
        x = self._prepared(x)
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
        x = self._prepared(x)
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

    def sufficient_statistics(
        self, x: Data, q: AbstractQ, *, weights: PerDatum | None = None
    ) -> "LinearGaussianStatistics":
        r"""Expected sufficient statistics under $q$, about the data's weighted mean.

        Uses only $q$'s moments $m_n = E_q[z_n]$, $S_n = \mathrm{Cov}_q[z_n]$ (an
        ``ej.Gaussian``, or an ``ej.PointMass`` with $S_n = 0$) and the data, each datum
        weighed by $w_n$ = ``weights`` (``None``: all 1). The shift is
        $c = \sum_n w_n x_n / \sum_n w_n$, which depends on the data only, so statistics taken at
        different $\theta$ differ only through $q$. See ``LinearGaussianStatistics`` for the
        fields and why they carry $c$.
        """
        x = self._prepared(x)
        q = q.resolve(self, x)
        if not (hasattr(q, "mean") and hasattr(q, "covariance")):
            raise TypeError(
                f"{type(self).__name__}.sufficient_statistics needs a q with Gaussian moments "
                f"(ej.Gaussian or ej.PointMass), got {type(q).__name__}"
            )
        n = x.shape[0]
        if weights is None:
            w = jnp.ones((n,), self.dtype)
        else:
            w = jnp.asarray(weights)
            if w.shape != (n,):
                raise ValueError(f"weights has shape {w.shape}, expected (N,) = ({n},)")
            w = w.astype(self.dtype)
        m = jnp.asarray(q.mean, self.dtype)
        cov = jnp.asarray(q.covariance, self.dtype)
        count = jnp.sum(w)
        safe = jnp.where(count > 0, count, 1.0)
        shift = (w @ x) / safe
        xc = x - shift[None, :]
        ez = jnp.concatenate([m, jnp.ones((n, 1), self.dtype)], axis=1)
        wez = w[:, None] * ez
        sum_ezz = ez.T @ wez
        sum_ezz = sum_ezz.at[:-1, :-1].add(jnp.einsum("n,nij->ij", w, cov))
        return LinearGaussianStatistics(
            count=count,
            shift=shift,
            sum_x_ez=xc.T @ wez,
            sum_ezz=sum_ezz,
            sum_xx=w @ (xc * xc),
        )

    def complete_data_statistics(self, num_data: Any) -> "LinearGaussianStatistics":
        r"""The expected statistics of $m$ = ``num_data`` draws $(x_n, z_n)$ from this model.

        With $z \sim \mathcal N(0, I)$ observed and the shift $c = \mu$:
        $\sum E[\tilde z \tilde z^\top] = m I_{L+1}$,
        $\sum E[(x - \mu) \tilde z^\top] = m\,[W, 0]$ and
        $\sum E[(x_d - \mu_d)^2] = m\,(\|W_{d\cdot}\|^2 + \Psi_{dd})$, so ``maximize`` gives back
        $W$, $\mu$ and $\Psi$ themselves (not merely $W W^\top + \Psi$: the regression of $x$
        on $z$ is exact), up to rounding and ``min_noise_variance``.
        """
        m = jnp.asarray(num_data, self.dtype)
        d, latent_dim = self.weight.shape
        return LinearGaussianStatistics(
            count=m,
            shift=self.mean,
            sum_x_ez=m * jnp.concatenate([self.weight, jnp.zeros((d, 1), self.dtype)], axis=1),
            sum_ezz=m * jnp.eye(latent_dim + 1, dtype=self.dtype),
            sum_xx=m * (jnp.sum(self.weight**2, axis=1) + self.noise_diagonal),
        )

    def maximize(self, stats: Stats, prior: Any = None) -> "_AbstractLinearGaussian":
        r"""The exact M-step: the joint maximiser of $\sum_n w_n E_q[\log p(x_n, z_n)]$.

        With the shift $c$, $B = \sum_n w_n (x_n - c) E[\tilde z_n]^\top$ and
        $A = \sum_n w_n E[\tilde z_n \tilde z_n^\top]$, the regression of $x - c$ on $\tilde z$
        gives $[W, \mu - c] = B A^{-1}$ (Cholesky solve); then the residuals
        $r_d = \big(\sum_n w_n (x_n - c)_d^2 - [W, \mu - c]_d B_d^\top\big)$ give
        $\sigma^2 = \sum_d r_d / (N D)$ (PPCA) or $\Psi_{dd} = r_d / N$ (FA), $N = \sum_n w_n$,
        floored at ``min_noise_variance``. Statistics of no data (``count`` 0) keep the
        model as it is.
        """
        if prior is not None:
            raise NotImplementedError(
                f"{type(self).__name__} has a closed-form M-step only for prior=None"
            )
        if not isinstance(stats, LinearGaussianStatistics):
            raise TypeError(
                f"{type(self).__name__}.maximize needs LinearGaussianStatistics (from "
                f"sufficient_statistics), got {type(stats).__name__}"
            )
        stats = jax.tree_util.tree_map(lambda leaf: leaf.astype(self.dtype), stats)
        count = stats.count
        sum_x_ez = stats.sum_x_ez
        chol = jnp.linalg.cholesky(stats.sum_ezz)
        w_tilde = jsl.cho_solve((chol, True), sum_x_ez.T).T  # (D, L+1): [W, mu - c]
        residual = stats.sum_xx - jnp.sum(w_tilde * sum_x_ez, axis=1)
        noise = jnp.maximum(self._noise_from_residuals(residual, count), self.min_noise_variance)
        new = (w_tilde[:, :-1], stats.shift + w_tilde[:, -1], jnp.log(noise))
        # No data: A = 0 has no Cholesky factor (NaN), so keep the parameters instead.
        has_data = count > jnp.finfo(self.dtype).tiny
        old = (self.weight, self.mean, self.log_noise_variance)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(has_data, a, b), new, old)
        return eqx.tree_at(lambda m: (m.weight, m.mean, m.log_noise_variance), self, new)

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
@final
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
        min_noise_variance = _check_min_noise_variance(min_noise_variance)  # a Python float
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
        min_noise_variance = _check_min_noise_variance(min_noise_variance)  # a Python float
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


@final
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
        min_noise_variance = _check_min_noise_variance(min_noise_variance)  # a Python float
        x, weight, mean, var, _ = _initial_parts(key, x, latent_dim)
        var = jnp.maximum(var, min_noise_variance)
        return cls(weight, mean, var, min_noise_variance=min_noise_variance)
