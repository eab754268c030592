r"""scikit-learn estimators for elbo_jax's finite mixtures: ``GaussianMixture`` (a drop-in for
``sklearn.mixture.GaussianMixture``), ``BernoulliMixture`` and ``PoissonMixture``.

Each fits an ``ej.models`` mixture by exact EM (``ej.fit``; ``n_init`` starts as one vmapped
``restarts=n_init`` call) and counts iterations as scikit-learn does (see
``_base.em_like_sklearn``): from the same start, ``n_iter_``, ``lower_bound_`` and the
parameters equal scikit-learn's.
"""

import abc
import functools
from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import elbo_jax as ej

from ._base import (
    BaseEstimator,
    DensityMixin,
    check_int,
    check_is_fitted,
    check_non_negative,
    check_option,
    check_real,
    em_like_sklearn,
    evaluate_rows,
    key_from_random_state,
    validate,
)
from ._saving import SaveLoadMixin


# ----------------------------------------------------------------------------- starts
def _from_responsibilities(
    template: Any, x: jax.Array, logits: jax.Array, weights: jax.Array | None = None
) -> Any:
    r"""The M-step from responsibilities $r_{nk} = \mathrm{softmax}_k$(``logits``), rows
    weighted by ``weights``: scikit-learn's start from ``resp``. ``template`` gives the shapes
    (and the parameters a component without data keeps)."""
    q = ej.Categorical(logits)
    return template.maximize(template.sufficient_statistics(x, q, weights=weights))


def _random_logits(key: jax.Array, n: int, k: int, dtype: Any) -> jax.Array:
    """``log u``, $u_{nk} \\sim U(0, 1)$: responsibilities $u_{nk} / \\sum_j u_{nj}$."""
    return jnp.log(jr.uniform(key, (n, k), dtype, minval=float(jnp.finfo(dtype).tiny)))


def _one_point_each(key: jax.Array, n: int, k: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Logits and row weights that give component $k$ the one datum $i_k$ (distinct, random)
    and every other row weight 0: scikit-learn's ``"random_from_data"`` responsibilities."""
    index = jr.choice(key, n, (k,), replace=False)
    onehot = jnp.where(jnp.eye(k, dtype=bool), 0.0, -jnp.inf).astype(dtype)
    logits = jnp.zeros((n, k), dtype).at[index].set(onehot)
    return logits, jnp.zeros((n,), dtype).at[index].set(1.0)


@eqx.filter_jit
def _random_start(
    key: jax.Array, *, x: jax.Array, template: Callable, options: tuple, from_data: bool
) -> Any:
    """scikit-learn's ``"random_from_data"`` (``from_data``) or ``"random"`` start, compiled
    (and vmapped over the restarts by ``ej.fit``). ``template(x, *options)`` is a model of
    the right shapes, whose parameters a component without data keeps."""
    template = template(x, *options)
    n, k = x.shape[0], template.num_components
    if from_data:
        return _from_responsibilities(template, x, *_one_point_each(key, n, k, x.dtype))
    return _from_responsibilities(template, x, _random_logits(key, n, k, x.dtype))


def _gaussian_template(x: jax.Array, k: int, covariance_type: str, reg_covar: float) -> Any:
    d, spread = x.shape[1], jnp.var(x, axis=0) + reg_covar
    covariances = spread if covariance_type == "diag" else jnp.diag(spread)
    return ej.models.GaussianMixture(
        jnp.full((k,), 1 / k, x.dtype),
        jnp.broadcast_to(jnp.mean(x, axis=0), (k, d)),
        jnp.broadcast_to(covariances, (k, *covariances.shape)),
        covariance_type,
        reg_covar,
    )


def _bernoulli_template(x: jax.Array, k: int, min_prob: float) -> Any:
    mean = jnp.clip(jnp.mean(x, axis=0), 0.05, 0.95)
    weights = jnp.full((k,), 1 / k, x.dtype)
    return ej.models.BernoulliMixture(
        weights, jnp.broadcast_to(mean, (k, x.shape[1])), min_prob=min_prob
    )


def _poisson_template(x: jax.Array, k: int, min_rate: float) -> Any:
    mean = jnp.maximum(jnp.mean(x, axis=0), min_rate)
    weights = jnp.full((k,), 1 / k, x.dtype)
    return ej.models.PoissonMixture(
        weights, jnp.broadcast_to(mean, (k, x.shape[1])), min_rate=min_rate
    )


@eqx.filter_jit
def _with_overrides(model: Any, weights: Any, means: Any, covariances: Any) -> Any:
    """``model`` with the given weights, means or covariances (``None``: the model's)."""
    return ej.models.GaussianMixture(
        model.weights if weights is None else weights,
        model.means if means is None else means,
        model.covariances if covariances is None else covariances,
        model.covariance_type,
        model.reg_covar,
    )


def _gaussian_attributes(model: Any) -> tuple:
    cholesky = model.precisions_cholesky
    if model.covariance_type == "diag":
        precisions = cholesky**2
    else:
        precisions = cholesky @ jnp.swapaxes(cholesky, 1, 2)
    return model.weights, model.means, model.covariances, precisions, cholesky


# ----------------------------------------------------------------------------- row functions
# Module-level, so that evaluate_rows' compiled programs are shared between calls. One
# program gives both per-sample outputs: a second would double the compiling per data size.
def _rows(model: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Responsibilities ``(N, K)`` and $\log p(x_n)$ ``(N,)`` from one log-joint table."""
    table = model.log_joint_table(x)
    log_marginal = jax.nn.logsumexp(table, axis=-1)
    return jnp.exp(table - log_marginal[:, None]), log_marginal


def _weights_and_probs(model: Any) -> tuple:
    return model.weights, model.probs


def _weights_and_rates(model: Any) -> tuple:
    return model.weights, model.rates


@eqx.filter_jit
def _initialize(key: jax.Array, x: jax.Array, cls: Any, k: int, options: tuple) -> Any:
    """``cls.initialize(key, x, k, **options)`` compiled (op by op, each of its operations
    was compiled on its own for every data size)."""
    return cls.initialize(key, x, k, **dict(options))


# ----------------------------------------------------------------------------- base
class _AbstractMixture(SaveLoadMixin, DensityMixin, BaseEstimator, metaclass=abc.ABCMeta):
    """What the mixture estimators share: ``fit`` by exact EM, and the evaluation methods.

    Concrete classes give their ``__init__`` (scikit-learn reads the parameters from it), the
    start (``_initializer``), the data check (``_data``), the fitted attributes
    (``_set_attributes``) and the parameter count (``_n_parameters``)."""

    _init_options: ClassVar[tuple[str, ...]]
    n_components: int
    tol: float
    max_iter: int
    n_init: int
    init_params: str
    random_state: Any
    warm_start: bool
    verbose: int
    verbose_interval: int

    @abc.abstractmethod
    def _initializer(self, x: np.ndarray) -> Any:
        """``key -> ej model``: the start for the data ``x`` (vmapped over restarts)."""

    @abc.abstractmethod
    def _data(self, X: Any, *, reset: bool) -> np.ndarray:
        """``X`` validated (``reset``: in ``fit``) and converted for the model."""

    @staticmethod
    @abc.abstractmethod
    def _attributes(model: Any) -> tuple:
        """The fitted attributes' values (JAX) from the fitted ``model``: compiled with the
        last M-step, so this must be a module-level function (as a staticmethod)."""

    @abc.abstractmethod
    def _set_attributes(self, values: tuple) -> None:
        """Set the fitted attributes from ``_attributes(model)`` (as NumPy)."""

    @abc.abstractmethod
    def _n_parameters(self) -> int:
        """The number of free parameters (for ``bic`` and ``aic``)."""

    # ------------------------------------------------------------------ fit
    def _check_parameters(self) -> None:
        check_int("n_components", self.n_components, 1)
        check_real("tol", self.tol, 0.0)
        check_int("max_iter", self.max_iter, 0)
        check_int("n_init", self.n_init, 1)
        check_option("init_params", self.init_params, self._init_options)
        check_int("verbose", self.verbose, 0)
        check_int("verbose_interval", self.verbose_interval, 1)

    def _warm_model(self, x: np.ndarray) -> Any:
        """The fitted model to continue from (``warm_start``), if it fits these data."""
        model = getattr(self, "model_", None)
        if not self.warm_start or model is None:
            return None
        same = model.num_components == self.n_components and model.dim == x.shape[1]
        return model if same and model.weight_logits.dtype == x.dtype else None

    def fit(self, X: Any, y: Any = None) -> "_AbstractMixture":
        """Fit by exact EM: ``n_init`` starts (one vmapped ``ej.fit`` call), the best kept.

        Stops when the mean log-likelihood per sample changes by less than ``tol``, or after
        ``max_iter`` iterations (then a ``sklearn.exceptions.ConvergenceWarning``).
        ``warm_start=True`` continues from the previous fit (``n_init`` ignored)."""
        del y
        self._check_parameters()
        x = self._data(X, reset=True)
        if x.shape[0] < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got "
                f"n_components = {self.n_components}, n_samples = {x.shape[0]}"
            )
        key = key_from_random_state(self.random_state)
        warm = self._warm_model(x)
        outcome = em_like_sklearn(
            warm if warm is not None else self._initializer(x),
            x,
            key=key,
            tol=float(self.tol),
            max_iter=int(self.max_iter),
            n_init=None if warm is not None else int(self.n_init),
            what=type(self).__name__,
            previous_lower_bound=self.lower_bound_ if warm is not None else None,
            finish=type(self)._attributes,
        )
        self.model_ = outcome.model
        self.converged_ = outcome.converged
        self.n_iter_ = outcome.n_iter
        self.lower_bound_ = outcome.lower_bound
        self.lower_bounds_ = list(outcome.lower_bounds)
        restarts = outcome.restart_lower_bounds
        self.init_lower_bounds_ = np.array([outcome.lower_bound]) if restarts is None else restarts
        self._set_attributes(outcome.extras)
        if self.verbose:
            self._report(outcome)
        return self

    def _report(self, outcome: Any) -> None:
        name = type(self).__name__
        if self.verbose >= 2:
            for i in range(0, outcome.n_iter, self.verbose_interval):
                print(f"  {name} iteration {i + 1}: lower bound {outcome.lower_bounds[i]:.6g}")
        state = "converged" if outcome.converged else "did not converge"
        print(
            f"{name}: {state} after {outcome.n_iter} iterations (best of "
            f"{1 if outcome.restart_lower_bounds is None else len(outcome.restart_lower_bounds)}"
            f" starts), lower bound {outcome.lower_bound:.6g}"
        )

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit, then the most probable component of each sample, ``(n_samples,)``."""
        return self.fit(X, y).predict(X)

    # ------------------------------------------------------------------ evaluation
    def _evaluation_data(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        # In the fitted model's dtype (the one the fit computed in).
        return self._data(X, reset=False).astype(self.model_.weight_logits.dtype, copy=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        """The responsibilities $p(z{=}k \\mid x_n)$, ``(n_samples, n_components)``."""
        x = self._evaluation_data(X)
        return evaluate_rows(_rows, self.model_, x)[0]

    def predict(self, X: Any) -> np.ndarray:
        """The most probable component $\\arg\\max_k p(z{=}k \\mid x_n)$, ``(n_samples,)``."""
        return np.argmax(self.predict_proba(X), axis=1)

    def score_samples(self, X: Any) -> np.ndarray:
        """$\\log p(x_n \\mid \\theta)$ per sample, ``(n_samples,)``."""
        x = self._evaluation_data(X)
        return evaluate_rows(_rows, self.model_, x)[1]

    def score(self, X: Any, y: Any = None) -> float:
        """The mean log-likelihood per sample, $\\frac1N \\sum_n \\log p(x_n \\mid \\theta)$."""
        del y
        return float(np.mean(self.score_samples(X)))

    def bic(self, X: Any) -> float:
        """Bayesian information criterion $-2 \\log p(X) + P \\log N$ (lower is better)."""
        n = self._evaluation_data(X).shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion $-2 \\log p(X) + 2P$ (lower is better)."""
        n = self._evaluation_data(X).shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` samples ``(X, y)`` from the fitted model, ``y`` the components.

        Drawn from ``random_state`` (an int gives the same samples every call, as in
        scikit-learn); unlike scikit-learn, the samples are not sorted by component."""
        check_is_fitted(self, "model_")
        n = check_int("n_samples", n_samples, 1)
        x, z = self.model_.sample(key_from_random_state(self.random_state), n)
        return np.asarray(x), np.asarray(z)


# ----------------------------------------------------------------------------- Gaussian
@final
class GaussianMixture(_AbstractMixture):
    r"""A Gaussian mixture fitted by exact EM: ``sklearn.mixture.GaussianMixture``'s API on
    ``ej.models.GaussianMixture``.

    $p(x) = \sum_k w_k\, \mathcal N(x \mid \mu_k, \Sigma_k)$. The M-step is scikit-learn's
    (``reg_covar`` added to every covariance's diagonal, $10\epsilon$ added to every count),
    and iterations are counted as scikit-learn counts them, so from the same
    ``weights_init``, ``means_init`` and ``precisions_init`` the fitted ``weights_``,
    ``means_``, ``covariances_``, ``lower_bound_`` and ``n_iter_`` agree with scikit-learn's
    (to about 1e-12 in float64). ``tol`` is, as there, on the change of the mean
    log-likelihood per sample (``ej.fit``'s per-datum ``tol``).

    **Parameters** (scikit-learn's names and defaults):

    - `n_components`: $K$.
    - `covariance_type`: ``"full"`` or ``"diag"``; ``"tied"`` and ``"spherical"`` are not
      available in ``ej.models.GaussianMixture`` and raise ``ValueError`` at ``fit``.
    - `tol`, `reg_covar`, `max_iter`: as scikit-learn's.
    - `n_init`: the number of starts, fitted together as one vmapped compiled call
      (``ej.fit(..., restarts=n_init)``); the best final lower bound wins.
    - `init_params`: how each start is drawn (elbo_jax's own, compiled initialisation, so the
      draws differ from scikit-learn's for the same ``random_state``):

      - ``"kmeans"``: ``ej.models.GaussianMixture.initialize``: k-means++ seeding then 10
        Lloyd iterations, all compiled (scikit-learn runs ``sklearn.cluster.KMeans``); a
        cluster of fewer than 2 points gets the whole data's covariance (scikit-learn's
        gets ``reg_covar`` alone), and the weights are normalised;
      - ``"k-means++"``: the same seeding without Lloyd iterations: each point assigned to
        its nearest seed, the clusters' means and covariances (scikit-learn's components
        sit on the seeds, with covariance ``reg_covar``);
      - ``"random"``: random responsibilities $r_{nk} \propto u_{nk}$, then the M-step, as
        scikit-learn;
      - ``"random_from_data"``: $K$ distinct random samples, one per component, then the
        M-step (covariances ``reg_covar``), as scikit-learn, with normalised weights.
    - `weights_init`, `means_init`, `precisions_init`: replace the drawn start's weights,
      means or precisions (inverse covariances; ``(K, D, D)`` or ``(K, D)``).
    - `random_state`: the seed of the starts (and of ``sample``).
    - `warm_start`: continue from the previous fit's parameters (``n_init`` ignored).
    - `verbose`, `verbose_interval`: print a summary after the fit (``verbose >= 2``: the
      lower bound every ``verbose_interval`` iterations). The fit runs compiled, so this is
      printed after it ends, not as it runs.

    **Attributes:** ``weights_`` ``(K,)``, ``means_`` ``(K, D)``, ``covariances_``,
    ``precisions_``, ``precisions_cholesky_`` (``(K, D, D)`` or ``(K, D)``), ``converged_``,
    ``n_iter_``, ``lower_bound_``, ``lower_bounds_``, ``init_lower_bounds_`` (each of the
    ``n_init`` starts' final lower bound, an elbo_jax addition), ``n_features_in_``,
    ``feature_names_in_`` (DataFrame input), and ``model_`` (the fitted
    ``ej.models.GaussianMixture``). Arrays are NumPy, float64 with JAX's x64 on, else float32.

    ```python
    from elbo_jax.sklearn import GaussianMixture
    gm = GaussianMixture(3, random_state=0).fit(X)
    gm.means_, gm.predict(X), gm.bic(X)
    ```
    """

    _init_options = ("kmeans", "k-means++", "random", "random_from_data")

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _check_parameters(self) -> None:
        super()._check_parameters()
        if self.covariance_type in ("tied", "spherical"):
            raise ValueError(
                f"covariance_type={self.covariance_type!r} is not available: "
                "ej.models.GaussianMixture has 'full' and 'diag' covariances (use "
                "sklearn.mixture.GaussianMixture for 'tied' or 'spherical')"
            )
        check_option("covariance_type", self.covariance_type, ("full", "diag"))
        check_real("reg_covar", self.reg_covar, 0.0)

    def _data(self, X: Any, *, reset: bool) -> np.ndarray:
        return validate(self, X, reset=reset, ensure_min_samples=2 if reset else 1)

    def _initial_overrides(self, d: int, dtype: Any) -> tuple:
        """``weights_init``, ``means_init`` and the covariances of ``precisions_init``,
        checked, as arrays of ``dtype`` (``None`` where not given)."""
        k, diag = self.n_components, self.covariance_type == "diag"
        weights = means = covariances = None
        if self.weights_init is not None:
            weights = np.asarray(self.weights_init, np.float64)
            if weights.shape != (k,):
                raise ValueError(f"weights_init has shape {weights.shape}, expected ({k},)")
            if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0, rtol=0, atol=1e-6):
                raise ValueError(
                    "weights_init must be nonnegative and sum to 1, got "
                    f"{weights} (sum {weights.sum():g})"
                )
        if self.means_init is not None:
            means = np.asarray(self.means_init, np.float64)
            if means.shape != (k, d):
                raise ValueError(f"means_init has shape {means.shape}, expected ({k}, {d})")
        if self.precisions_init is not None:
            precisions = np.asarray(self.precisions_init, np.float64)
            want = (k, d) if diag else (k, d, d)
            if precisions.shape != want:
                raise ValueError(
                    f"precisions_init has shape {precisions.shape}, expected {want} for "
                    f"covariance_type={self.covariance_type!r}"
                )
            if diag:
                if np.any(precisions <= 0):
                    raise ValueError("precisions_init must be positive ('diag')")
                covariances = 1 / precisions
            else:
                symmetric = np.allclose(precisions, np.swapaxes(precisions, 1, 2))
                eigenvalues = np.linalg.eigvalsh(precisions) if symmetric else None
                if not symmetric or np.any(eigenvalues <= 0):
                    raise ValueError("precisions_init must be symmetric positive-definite matrices")
                covariances = np.linalg.inv(precisions)
                covariances = 0.5 * (covariances + np.swapaxes(covariances, 1, 2))
        return tuple(None if a is None else a.astype(dtype) for a in (weights, means, covariances))

    def _initializer(self, x: np.ndarray) -> Any:
        k, covariance_type, reg_covar = self.n_components, self.covariance_type, self.reg_covar
        reg_covar = float(reg_covar)
        overrides = self._initial_overrides(x.shape[1], x.dtype)
        mixture = ej.models.GaussianMixture
        if all(a is not None for a in overrides):
            start = mixture(*overrides, covariance_type, reg_covar)
            return lambda key: start  # nothing to draw (scikit-learn draws and discards)
        method = self.init_params
        if method in ("kmeans", "k-means++"):
            iters = 10 if method == "kmeans" else 0

            def draw(key: jax.Array) -> Any:
                return mixture.initialize(
                    key, x, k, covariance_type, reg_covar, num_kmeans_iters=iters
                )
        else:
            draw = functools.partial(
                _random_start,
                x=jnp.asarray(x),
                template=_gaussian_template,
                options=(k, covariance_type, reg_covar),
                from_data=method == "random_from_data",
            )
        if all(a is None for a in overrides):
            return draw
        return lambda key: _with_overrides(draw(key), *overrides)

    _attributes = staticmethod(_gaussian_attributes)

    def _set_attributes(self, values: tuple) -> None:
        self.weights_, self.means_, self.covariances_ = values[:3]
        self.precisions_, self.precisions_cholesky_ = values[3:]

    def _n_parameters(self) -> int:
        return int(self.model_.n_parameters)


# ----------------------------------------------------------------------------- counts
class _AbstractCountMixture(_AbstractMixture):
    """The Bernoulli and Poisson mixture estimators: the model's own random start or random
    responsibilities, $K D + K - 1$ parameters."""

    _init_options = ("random_from_data", "random")
    _model_class: ClassVar[Any]
    _floor_name: ClassVar[str]

    def _initializer(self, x: np.ndarray) -> Any:
        k = self.n_components
        if self.init_params == "random_from_data":
            options = ((self._floor_name, float(getattr(self, self._floor_name))),)
            return functools.partial(
                _initialize, x=jnp.asarray(x), cls=self._model_class, k=k, options=options
            )
        return functools.partial(
            _random_start,
            x=jnp.asarray(x),
            template=self._template,
            options=(k, float(getattr(self, self._floor_name))),
            from_data=False,
        )

    _template: ClassVar[Callable]  # (x, K, floor) -> a model of the right shapes

    def _n_parameters(self) -> int:
        k, d = self.n_components, self.n_features_in_
        return k * d + k - 1


@final
class BernoulliMixture(_AbstractCountMixture):
    r"""A mixture of products of Bernoullis for binary data, fitted by exact EM, with the API
    of the scikit-learn mixtures (on ``ej.models.BernoulliMixture``).

    $p(x) = \sum_k w_k \prod_d \mu_{kd}^{x_d} (1 - \mu_{kd})^{1 - x_d}$, $x \in \{0, 1\}^D$.

    **Parameters:** ``n_components``, ``tol``, ``max_iter``, ``n_init`` (vmapped restarts),
    ``random_state``, ``warm_start``, ``verbose``, ``verbose_interval`` as in
    ``GaussianMixture``, and:

    - `init_params`: ``"random_from_data"`` (``ej.models.BernoulliMixture.initialize``:
      $\mu_k$ a blend of the data mean, a random sample and noise, uniform weights) or
      ``"random"`` (random responsibilities, then the M-step).
    - `min_prob`: the M-step clips $\mu$ to ``[min_prob, 1 - min_prob]`` (an MLE of 0 or 1
      would give $\log 0$).
    - `binarize`: as ``sklearn.naive_bayes.BernoulliNB``'s: features are mapped to
      $x > $ ``binarize`` (the default 0.0 leaves 0/1 data as they are); ``None``: the data
      must already be 0/1 (else ``ValueError``).

    **Attributes:** ``weights_`` ``(K,)``, ``means_`` ``(K, D)`` (the probabilities
    $\mu_{kd} = p(x_d{=}1 \mid z{=}k)$), ``converged_``, ``n_iter_``, ``lower_bound_``,
    ``lower_bounds_``, ``n_features_in_``, ``model_``.
    """

    _model_class = ej.models.BernoulliMixture
    _floor_name = "min_prob"
    _template = staticmethod(_bernoulli_template)

    def __init__(
        self,
        n_components: int = 1,
        *,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "random_from_data",
        min_prob: float = 1e-6,
        binarize: float | None = 0.0,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.min_prob = min_prob
        self.binarize = binarize
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _check_parameters(self) -> None:
        super()._check_parameters()
        check_real("min_prob", self.min_prob, 0.0, inclusive=False)
        if self.binarize is not None:
            check_real("binarize", self.binarize, -np.inf)

    def _data(self, X: Any, *, reset: bool) -> np.ndarray:
        x = validate(self, X, reset=reset, ensure_min_samples=2 if reset else 1)
        if self.binarize is not None:
            return (x > self.binarize).astype(x.dtype)
        if not np.all((x == 0) | (x == 1)):
            raise ValueError(
                "BernoulliMixture needs binary data (entries 0 or 1) with binarize=None; "
                "set binarize=threshold to map x > threshold to 1"
            )
        return x

    _attributes = staticmethod(_weights_and_probs)

    def _set_attributes(self, values: tuple) -> None:
        self.weights_, self.means_ = values


@final
class PoissonMixture(_AbstractCountMixture):
    r"""A mixture of products of Poissons for count data, fitted by exact EM, with the API of
    the scikit-learn mixtures (on ``ej.models.PoissonMixture``).

    $p(x) = \sum_k w_k \prod_d \lambda_{kd}^{x_d} e^{-\lambda_{kd}} / x_d!$, $x \in \mathbb N^D$
    (``score_samples`` includes the $\log x_d!$ term: it is the true log-likelihood).

    **Parameters:** ``n_components``, ``tol``, ``max_iter``, ``n_init`` (vmapped restarts),
    ``random_state``, ``warm_start``, ``verbose``, ``verbose_interval`` as in
    ``GaussianMixture``, and:

    - `init_params`: ``"random_from_data"`` (``ej.models.PoissonMixture.initialize``: rates
      from random samples blended with the data mean, uniform weights) or ``"random"``
      (random responsibilities, then the M-step).
    - `min_rate`: the floor the M-step puts on the rates.

    The data must be nonnegative (``ValueError`` "Negative values in data passed to
    PoissonMixture", scikit-learn's) whole numbers (``ValueError`` from the model).

    **Attributes:** ``weights_`` ``(K,)``, ``rates_`` ``(K, D)`` (each component's
    $\lambda_k$, its mean), ``converged_``, ``n_iter_``, ``lower_bound_``, ``lower_bounds_``,
    ``n_features_in_``, ``model_``.
    """

    _model_class = ej.models.PoissonMixture
    _floor_name = "min_rate"
    _template = staticmethod(_poisson_template)

    def __init__(
        self,
        n_components: int = 1,
        *,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "random_from_data",
        min_rate: float = 1e-6,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.min_rate = min_rate
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _check_parameters(self) -> None:
        super()._check_parameters()
        check_real("min_rate", self.min_rate, 0.0, inclusive=False)

    def _data(self, X: Any, *, reset: bool) -> np.ndarray:
        x = validate(self, X, reset=reset, ensure_min_samples=2 if reset else 1)
        check_non_negative(x, type(self).__name__)
        return self._counts(x)

    def _counts(self, x: np.ndarray) -> np.ndarray:
        """``x`` (validated, nonnegative) checked to hold whole numbers."""
        if not np.all(x == np.round(x)):
            raise ValueError(
                "PoissonMixture needs counts: nonnegative whole numbers, got "
                f"{float(x[x != np.round(x)][0])}"
            )
        return x

    _attributes = staticmethod(_weights_and_rates)

    def _set_attributes(self, values: tuple) -> None:
        self.weights_, self.rates_ = values

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags
