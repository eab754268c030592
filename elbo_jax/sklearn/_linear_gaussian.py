r"""scikit-learn estimators for elbo_jax's linear-Gaussian models: ``FactorAnalysis`` (the API
of ``sklearn.decomposition.FactorAnalysis``) and ``PPCA``, both fitted by exact EM.

$x = W z + \mu + \varepsilon$, $z \sim \mathcal N(0, I_L)$, $\varepsilon \sim \mathcal N(0,
\Psi)$: diagonal $\Psi$ (factor analysis) or $\sigma^2 I$ (PPCA).
"""

import abc
from typing import Any, final

import equinox as eqx
import jax
import numpy as np

import elbo_jax as ej

from ._base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    check_int,
    check_is_fitted,
    check_random_state,
    check_real,
    evaluate_rows,
    run_fit,
    to_numpy,
    validate,
)
from ._saving import SaveLoadMixin


# Module-level row functions, so that evaluate_rows' compiled programs are shared.
def _transform(model: Any, x: jax.Array) -> jax.Array:
    return model.transform(x)


def _log_marginal(model: Any, x: jax.Array) -> jax.Array:
    return model.log_marginal(x)


@eqx.filter_jit
def _attributes(model: Any) -> tuple:
    return model.weight.T, model.noise_variance, model.mean, model.covariance


class _AbstractLinearGaussian(
    SaveLoadMixin,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    BaseEstimator,
    metaclass=abc.ABCMeta,
):
    """What ``FactorAnalysis`` and ``PPCA`` share: ``fit`` by ``ej.fit`` from a start near
    the optimum, and the evaluation methods."""

    n_components: int | None
    tol: float
    max_iter: int
    min_noise_variance: float

    @abc.abstractmethod
    def _start(self, x: np.ndarray, latent_dim: int) -> Any:
        """The starting ``ej.models`` model for the data ``x``."""

    @abc.abstractmethod
    def _latent_dim(self, n: int, d: int) -> int:
        """$L$ for ``n`` samples of ``d`` features (``ValueError`` if impossible)."""

    def _check_parameters(self) -> None:
        if self.n_components is not None:
            check_int("n_components", self.n_components, 1)
        check_real("tol", self.tol, 0.0)
        check_int("max_iter", self.max_iter, 1)
        check_real("min_noise_variance", self.min_noise_variance, 0.0, inclusive=False)

    def fit(self, X: Any, y: Any = None) -> "_AbstractLinearGaussian":
        """Fit by exact EM (``ej.fit``), from a start computed from the sample covariance.

        Stops when the total log-likelihood $\\sum_n \\log p(x_n)$ rises by less than ``tol``
        in an iteration (scikit-learn's ``FactorAnalysis`` convention; ``ej.fit`` gets
        ``tol / n_samples`` per datum), or after ``max_iter`` iterations (then a
        ``sklearn.exceptions.ConvergenceWarning``)."""
        del y
        self._check_parameters()
        x = validate(self, X, reset=True, ensure_min_samples=2)
        n, d = x.shape
        latent_dim = self._latent_dim(n, d)
        result = run_fit(
            self._start(x, latent_dim),
            x,
            key=None,
            tol=float(self.tol) / n,
            max_iter=int(self.max_iter),
            what=type(self).__name__,
        )
        self.model_ = result.model
        self.n_iter_ = result.num_iters
        self.loglike_ = list(n * np.asarray(result.history, np.float64))
        components, noise, mean, covariance = to_numpy(_attributes(result.model))
        self.components_, self.noise_variance_, self.mean_ = components, noise, mean
        self._covariance = covariance
        self._n_features_out = latent_dim
        return self

    def _evaluation_data(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        return validate(self, X, reset=False, dtype=self.components_.dtype)

    def transform(self, X: Any) -> np.ndarray:
        """The posterior means $E[z \\mid x_n]$, ``(n_samples, n_components)``."""
        x = self._evaluation_data(X)
        return evaluate_rows(_transform, self.model_, x)

    def score_samples(self, X: Any) -> np.ndarray:
        """$\\log p(x_n) = \\log \\mathcal N(x_n \\mid \\mu, W W^\\top + \\Psi)$, ``(n_samples,)``."""
        x = self._evaluation_data(X)
        return evaluate_rows(_log_marginal, self.model_, x)

    def score(self, X: Any, y: Any = None) -> float:
        """The mean log-likelihood per sample."""
        del y
        return float(np.mean(self.score_samples(X)))

    def get_covariance(self) -> np.ndarray:
        """The model's covariance of $x$: $W W^\\top + \\Psi$, ``(n_features, n_features)``."""
        check_is_fitted(self, "model_")
        return self._covariance.copy()

    def get_precision(self) -> np.ndarray:
        """The inverse of ``get_covariance()``."""
        covariance = self.get_covariance()
        return np.linalg.inv(covariance.astype(np.float64)).astype(covariance.dtype)


def _loadings(x: np.ndarray, noise: np.ndarray, latent_dim: int) -> np.ndarray:
    r"""$W$ maximising the likelihood for the noise variances $\Psi$ = ``noise`` ``(D,)``:
    $\Psi^{1/2} U_L (\Lambda_L - I)_+^{1/2}$ from the eigendecomposition $U \Lambda U^\top$
    of $\Psi^{-1/2} S \Psi^{-1/2}$, $S$ the sample covariance (scikit-learn's step)."""
    scale = np.sqrt(noise)
    xs = (x - x.mean(axis=0)) / scale
    eigenvalues, eigenvectors = np.linalg.eigh(xs.T @ xs / x.shape[0])
    eigenvalues, eigenvectors = (
        eigenvalues[::-1][:latent_dim],
        eigenvectors[:, ::-1][:, :latent_dim],
    )
    return scale[:, None] * eigenvectors * np.sqrt(np.maximum(eigenvalues - 1, 0))[None, :]


@final
class FactorAnalysis(_AbstractLinearGaussian):
    r"""Factor analysis by exact EM on ``ej.models.FactorAnalysis``, with the API of
    ``sklearn.decomposition.FactorAnalysis``.

    $x = W z + \mu + \varepsilon$, $z \sim \mathcal N(0, I_L)$,
    $\varepsilon \sim \mathcal N(0, \Psi)$, $\Psi$ diagonal. scikit-learn maximises the same
    likelihood by an SVD-based fixed point; at convergence both reach a maximum of it (the
    loadings only up to a rotation $W R$, which leaves the likelihood unchanged).

    **Parameters:**

    - `n_components`: $L$; ``None`` (scikit-learn's default) is ``n_features``.
    - `tol`: stop when the total log-likelihood rises by less than this in an iteration
      (scikit-learn's convention: not per sample).
    - `max_iter`: at most this many EM iterations.
    - `noise_variance_init`: the starting $\mathrm{diag}\,\Psi$ ``(n_features,)``; ``None``:
      the variance of each feature (scikit-learn starts from ones).
    - `min_noise_variance`: the floor the M-step puts on each noise variance (a guard
      against Heywood cases; scikit-learn's is 1e-12).
    - `random_state`: seeds a small perturbation of the starting loadings (so that EM never
      starts at the stationary point $W = 0$).

    The start is scikit-learn's first step: from $\Psi_0$, the loadings that maximise the
    likelihood given it. ``rotation``, ``svd_method``, ``iterated_power`` and ``copy`` are
    not available.

    **Attributes:** ``components_`` ``(L, D)`` ($W^\top$), ``noise_variance_`` ``(D,)``,
    ``mean_`` ``(D,)``, ``loglike_`` (the total log-likelihood after each iteration),
    ``n_iter_``, ``n_features_in_``, ``feature_names_in_``, ``model_``.

    ```python
    from elbo_jax.sklearn import FactorAnalysis
    fa = FactorAnalysis(2).fit(X)
    fa.transform(X), fa.score(X), fa.get_covariance()
    ```
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        tol: float = 1e-2,
        max_iter: int = 1000,
        noise_variance_init: Any = None,
        min_noise_variance: float = 1e-6,
        random_state: Any = 0,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.noise_variance_init = noise_variance_init
        self.min_noise_variance = min_noise_variance
        self.random_state = random_state

    def _latent_dim(self, n: int, d: int) -> int:
        latent_dim = d if self.n_components is None else int(self.n_components)
        if latent_dim > d:
            raise ValueError(
                f"n_components={latent_dim} is larger than n_features={d}: factor analysis "
                "needs n_components <= n_features"
            )
        return latent_dim

    def _start(self, x: np.ndarray, latent_dim: int) -> Any:
        floor = float(self.min_noise_variance)
        d = x.shape[1]
        x64 = x.astype(np.float64)
        if self.noise_variance_init is None:
            noise = np.var(x64, axis=0)
        else:
            noise = np.asarray(self.noise_variance_init, np.float64)
            if noise.shape != (d,):
                raise ValueError(
                    f"noise_variance_init has shape {noise.shape}, expected ({d},) = (n_features,)"
                )
        noise = np.maximum(noise, floor)
        weight = _loadings(x64, noise, latent_dim)
        scale = np.sqrt(np.mean(noise))
        rng = check_random_state(self.random_state)
        weight = weight + 1e-3 * scale * rng.standard_normal(weight.shape)
        return ej.models.FactorAnalysis(
            weight.astype(x.dtype),
            x64.mean(axis=0).astype(x.dtype),
            noise.astype(x.dtype),
            min_noise_variance=floor,
        )


@final
class PPCA(_AbstractLinearGaussian):
    r"""Probabilistic PCA (Tipping & Bishop, 1999) by exact EM on ``ej.models.PPCA``.

    $x = W z + \mu + \varepsilon$, $z \sim \mathcal N(0, I_L)$,
    $\varepsilon \sim \mathcal N(0, \sigma^2 I)$. EM starts from the closed-form maximum
    likelihood (``ej.models.PPCA.maximum_likelihood``: the top-$L$ eigenvectors of the
    sample covariance), so it converges within an iteration or two; ``n_iter_`` and
    ``loglike_`` say so. ``score`` is the same log-likelihood as ``sklearn.decomposition.PCA``'s.

    **Parameters:**

    - `n_components`: $L$, at most ``n_features - 1`` (with $L = D$ the noise is not
      identifiable); ``None``: ``n_features - 1``.
    - `tol`, `max_iter`: as in ``FactorAnalysis`` (``tol`` on the total log-likelihood).
    - `min_noise_variance`: the floor on $\sigma^2$.

    **Attributes:** ``components_`` ``(L, D)`` ($W^\top$), ``noise_variance_`` (a float
    array of shape ``()``), ``mean_``, ``loglike_``, ``n_iter_``, ``n_features_in_``,
    ``model_``.
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        tol: float = 1e-2,
        max_iter: int = 1000,
        min_noise_variance: float = 1e-6,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.min_noise_variance = min_noise_variance

    def _latent_dim(self, n: int, d: int) -> int:
        if d < 2:
            raise ValueError(
                f"PPCA needs n_features >= 2 (got n_features = {d}): with n_components >= "
                "n_features the noise variance is not identifiable"
            )
        latent_dim = d - 1 if self.n_components is None else int(self.n_components)
        if latent_dim >= d or latent_dim > n:
            raise ValueError(
                f"n_components={latent_dim} must be below n_features={d} and at most n_samples={n}"
            )
        return latent_dim

    def _start(self, x: np.ndarray, latent_dim: int) -> Any:
        return ej.models.PPCA.maximum_likelihood(
            x, latent_dim, min_noise_variance=float(self.min_noise_variance)
        )
