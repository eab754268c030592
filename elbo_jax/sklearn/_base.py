r"""What every scikit-learn estimator of ``elbo_jax.sklearn`` shares.

An estimator here is a thin scikit-learn face on an ``ej.models`` model fitted by ``ej.fit``:
it validates its input the scikit-learn way, turns ``random_state`` into a JAX key, runs the
fit (``n_init`` restarts as ONE vmapped compiled call, ``ej.fit(..., restarts=n_init)``), and
exposes NumPy attributes. This module holds those pieces, for the mixtures, the linear-Gaussian
models and the sequence and topic models alike:

- ``compute_dtype()`` — the **dtype policy**: float64 when JAX's x64 is on, float32 when it is
  off. Input of any float (or int, bool) dtype, lists and DataFrames are accepted without a
  warning and converted by NumPy before JAX sees them; fitted attributes are NumPy arrays of
  this dtype. There is no ``dtype=`` parameter: JAX cannot compute in float64 with x64 off.
- ``validate(estimator, X, reset=...)`` — ``sklearn.utils.validation.validate_data`` (sets or
  checks ``n_features_in_`` / ``feature_names_in_``), then the cast to ``compute_dtype()``.
- ``key_from_random_state(random_state)`` — a JAX key drawn from scikit-learn's
  ``check_random_state``: ``None`` differs per call, an ``int`` is reproducible, a
  ``RandomState`` is advanced.
- ``run_fit(init, x, *, n_init, key, tol, max_iter, ...)`` — ``ej.fit`` with the restarts, its
  ``ej.ConvergenceWarning`` re-issued as ``sklearn.exceptions.ConvergenceWarning``.
- ``em_like_sklearn(...)`` — exact EM counted as scikit-learn's mixtures (and hmmlearn) count
  it (``n_iter_``, ``lower_bound_``, ``converged_``), for models with a closed-form M-step.
- ``to_numpy(tree)`` — JAX arrays to NumPy; ``evaluate_rows(fn, model, x)`` — a per-sample
  function compiled once per size bucket; ``check_int`` / ``check_real`` / ``check_option``
  — parameter checks that name the parameter.
- scikit-learn's own names the estimators need (``BaseEstimator``, ``check_is_fitted``, ...):
  estimator modules import scikit-learn only through this module, so that a missing
  scikit-learn always raises the ``ImportError`` that says how to install it.

scikit-learn >= 1.6 is needed (``validate_data``, ``__sklearn_tags__``); it is an optional
dependency, ``pip install 'elbo_jax[sklearn]'``.
"""

import dataclasses
import numbers
import warnings
from collections.abc import Callable
from typing import Any

# The one place that imports scikit-learn: the estimator modules take its names from here,
# so that a missing scikit-learn always gives this message.
try:
    import sklearn
    from sklearn.base import (
        BaseEstimator,
        ClassNamePrefixFeaturesOutMixin,
        DensityMixin,
        TransformerMixin,
    )
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils import check_random_state, check_scalar
    from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "elbo_jax.sklearn needs scikit-learn >= 1.6: pip install 'elbo_jax[sklearn]' "
        f"(importing it failed: {error})"
    ) from error

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import elbo_jax as ej

__all__ = [
    "BaseEstimator",
    "ClassNamePrefixFeaturesOutMixin",
    "ConvergenceWarning",
    "DensityMixin",
    "EMOutcome",
    "bucket",
    "TransformerMixin",
    "check_int",
    "check_is_fitted",
    "check_non_negative",
    "check_option",
    "check_random_state",
    "check_real",
    "compute_dtype",
    "em_like_sklearn",
    "evaluate_rows",
    "fit_quietly",
    "key_from_random_state",
    "run_fit",
    "to_numpy",
    "validate",
    "warn_not_converged",
]

if tuple(int(p) for p in sklearn.__version__.split(".")[:2] if p.isdigit()) < (1, 6):
    raise ImportError(
        f"elbo_jax.sklearn needs scikit-learn >= 1.6, found {sklearn.__version__}: "
        "pip install -U 'elbo_jax[sklearn]'"
    )


def compute_dtype() -> np.dtype:
    """The floating dtype the estimators compute in: float64 with JAX's x64 on, else float32.

    Read at each ``fit`` (not at import), so ``jax.config.update("jax_enable_x64", ...)``
    before a fit decides it. Prediction uses the fitted model's own dtype."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def validate(
    estimator: Any, X: Any, *, reset: bool, dtype: Any = None, **kwargs: Any
) -> np.ndarray:
    """``X`` checked by scikit-learn's ``validate_data`` and cast to ``dtype`` by NumPy.

    ``reset=True`` (in ``fit``) records ``n_features_in_`` and ``feature_names_in_``;
    ``reset=False`` (after) checks ``X`` against them. ``dtype`` defaults to
    ``compute_dtype()``; ``kwargs`` go to ``validate_data`` (``ensure_min_samples=2``, ...).
    The cast happens in NumPy, so float64 input with x64 off never meets JAX's truncation
    warning."""
    dtype = compute_dtype() if dtype is None else np.dtype(dtype)
    X = validate_data(estimator, X, reset=reset, dtype=[np.float64, np.float32], **kwargs)
    return np.asarray(X, dtype)


def key_from_random_state(random_state: Any) -> jax.Array:
    """A JAX key from a scikit-learn ``random_state`` (``None``, an int or a ``RandomState``),
    drawn through ``check_random_state`` as scikit-learn's own estimators draw their seeds."""
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    return jr.key(int(seed))


def to_numpy(tree: Any) -> Any:
    """Every JAX array in ``tree`` as a NumPy array (other leaves unchanged)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a) if isinstance(a, jax.Array) else a, tree)


def run_fit(
    init: ej.Model | Callable[[jax.Array], ej.Model],
    x: Any,
    *,
    key: jax.Array,
    tol: float,
    max_iter: int,
    n_init: int | None = None,
    what: str = "fit",
    **fit_kwargs: Any,
) -> ej.FitResult:
    """``ej.fit(init, x, restarts=n_init, key=key, tol=tol, max_iters=max_iter, ...)``.

    ``init`` is a model or an initializer ``key -> model``; with ``n_init`` the restarts run as
    one vmapped compiled call and the best by final ELBO is returned (``n_init=None``: one
    plain fit). ``ej.ConvergenceWarning`` (a fit with ``tol > 0`` that stopped at
    ``max_iter``) becomes ``sklearn.exceptions.ConvergenceWarning``, with ``what`` naming the
    estimator in the message; other warnings pass through unchanged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ej.ConvergenceWarning)
        result = ej.fit(
            init, x, key=key, tol=tol, max_iters=max_iter, restarts=n_init, **fit_kwargs
        )
    if result.status == ej.Status.MAX_ITERS and tol > 0:
        warn_not_converged(what, max_iter, tol)
    return result


def warn_not_converged(what: str, max_iter: int, tol: float) -> None:
    """Issue scikit-learn's ``ConvergenceWarning`` for a fit that stopped at ``max_iter``."""
    warnings.warn(
        f"{what} did not converge: it stopped at max_iter={max_iter} before the change of the "
        f"objective fell below tol={tol:g}. Increase max_iter or tol, or check the data.",
        ConvergenceWarning,
        stacklevel=3,
    )


@dataclasses.dataclass(frozen=True)
class EMOutcome:
    """What ``em_like_sklearn`` returns: the model (JAX), and scikit-learn's bookkeeping.

    - ``model``: $\\theta_T$, the parameters after the last M-step;
    - ``lower_bound``: $\\frac1N \\log p(x \\mid \\theta_{T-1})$, the mean log-likelihood that
      the last E-step computed (scikit-learn's ``lower_bound_``);
    - ``lower_bounds``: the same after each of the ``n_iter`` iterations, ``(n_iter,)``;
    - ``n_iter``: $T$, the number of M-steps; ``converged``: whether the change fell below tol;
    - ``restart_lower_bounds``: every restart's final ``lower_bound`` (``None`` for one fit);
    - ``extras``: what ``finish(model)`` gave, as NumPy (``None`` without ``finish``).
    """

    model: Any
    lower_bound: float
    lower_bounds: np.ndarray
    n_iter: int
    converged: bool
    restart_lower_bounds: np.ndarray | None
    extras: Any = None


@eqx.filter_jit
def _maximize(model: ej.Model, stats: Any, finish: Callable) -> tuple[ej.Model, Any]:
    model = model.maximize(stats)
    return model, finish(model)


@eqx.filter_jit
def _apply(fn: Callable, model: Any) -> Any:
    return fn(model)


def _nothing(model: Any) -> None:
    del model


def _last_statistics(result: ej.FitResult) -> Any:
    """The expected statistics of the fit's last E-step, at ``result.model``, where the fit
    ran exact EM by statistics passes and stopped normally (else ``None``).

    They sit in the solver's state (``StatisticsState.stats``); reading them saves compiling
    a separate E-step. Anything unexpected gives ``None``, and the E-step is recomputed."""
    if result.status not in (ej.Status.CONVERGED, ej.Status.MAX_ITERS):
        return None
    state = getattr(result.state, "solver_state", None)
    if getattr(state, "model", None) is None or getattr(state, "stats", None) is None:
        return None
    if not result.model.has_closed_form(None):
        return None
    return state.stats


@eqx.filter_jit
def _em_iteration(model: ej.Model, x: jax.Array) -> tuple[jax.Array, ej.Model]:
    """One iteration as scikit-learn counts it: the E-step at ``model`` (its mean
    log-likelihood) and the closed-form M-step from that posterior."""
    log_marginal, q = model.exact_posterior(x)
    return jnp.mean(log_marginal), model.maximize(model.sufficient_statistics(x, q))


def em_like_sklearn(
    init: ej.Model | Callable[[jax.Array], ej.Model],
    x: Any,
    *,
    key: jax.Array | None,
    tol: float,
    max_iter: int,
    n_init: int | None,
    what: str,
    previous_lower_bound: float | None = None,
    finish: Callable[[Any], Any] | None = None,
) -> EMOutcome:
    r"""Exact EM with scikit-learn's iteration count, for a model with a closed-form M-step.

    scikit-learn's mixtures (and hmmlearn) run, in iteration $t = 1, 2, \dots$: an E-step at
    $\theta_{t-1}$, which gives $L_{t-1} = \frac1N\log p(x\mid\theta_{t-1})$, then an M-step
    to $\theta_t$; they stop when $|L_{t-1} - L_{t-2}| <$ ``tol`` ($L_{-1} = -\infty$), or
    after ``max_iter`` iterations, and report $\theta_t$, $T = t$ and $L_{T-1}$. ``ej.fit``
    counts an iteration as M-step then E-step, with the same per-datum test on $L_t - L_{t-1}$,
    so scikit-learn's run is ``ej.fit`` with ``max_iters = max_iter - 1`` (stopping at
    $T-1$, whose ELBO is $L_{T-1}$) plus ONE more M-step, from the statistics of the fit's
    last E-step. That is what this does, so ``n_iter_``, ``lower_bound_`` and the parameters
    equal scikit-learn's from the same start. ``max_iter=0`` returns the start itself
    (``lower_bound`` $-\infty$), as scikit-learn does. A run that stops at ``max_iter`` warns
    with scikit-learn's ``ConvergenceWarning``.

    ``n_init`` starts run as ``ej.fit(..., restarts=n_init)``, one vmapped compiled call
    (``None`` counts as 1: every fit is vmapped, so that one compiled program serves one
    start, many, and the warm start). ``previous_lower_bound`` (a warm start: ``init`` is the
    previously fitted model) stands for $L_{-1}$, as in scikit-learn: the run stops after
    one iteration if $L_0$ is within ``tol`` of it.

    ``finish``: a module-level function ``model -> attributes`` (JAX arrays), computed in the
    same compiled call as the last M-step where possible (one program fewer to compile per
    data shape); its result is ``EMOutcome.extras``, as NumPy.
    """
    finish = _nothing if finish is None else finish
    restarts = 1 if n_init is None else n_init
    if key is None:  # a start given as a model: exact EM draws nothing from the key
        key = jr.key(0)
    if max_iter == 0:
        start = _starting_models(init, key, restarts)[0]
        extras = to_numpy(_apply(finish, start))
        return EMOutcome(start, -np.inf, np.zeros((0,)), 0, False, None, extras)
    if max_iter == 1 and restarts > 1:
        # scikit-learn keeps the start with the best first E-step; ej.fit would rank the
        # starts after their first iteration.
        starts = _starting_models(init, key, restarts)
        bounds = [float(_em_iteration(m, jnp.asarray(x))[0]) for m in starts]
        best = int(np.argmax(bounds))
        model = _em_iteration(starts[best], jnp.asarray(x))[1]
        extras = _apply(finish, model)
        return _outcome(
            model, bounds[best : best + 1], False, np.asarray(bounds), extras, what, 1, tol
        )
    done: list[float] = []  # L_0 of the iteration already run (a warm start)
    if previous_lower_bound is not None or max_iter == 1:
        # ej.fit with one iteration: L_0 (its start), theta_1 and L_1 (its first iteration).
        first = fit_quietly(init, x, key=key, tol=0.0, max_iters=1, restarts=restarts)
        bounds = [float(first.initial_elbo), float(first.history[-1])]
        before = [-np.inf if previous_lower_bound is None else previous_lower_bound, bounds[0]]
        for t in (1, 2):  # scikit-learn's tests in its iterations 1 and 2
            converged = abs(bounds[t - 1] - before[t - 1]) < tol
            if converged or max_iter == t:
                if t == 1:
                    model, extras = first.model, _apply(finish, first.model)
                else:
                    model, extras = _next_model(first, x, finish)
                return _outcome(model, bounds[:t], converged, None, extras, what, max_iter, tol)
        done, init, max_iter = bounds[:1], first.model, max_iter - 1
    # The rest is a run from `init` whose first test is against -inf (scikit-learn's test
    # against L_0 of a warm start was made above).
    result = fit_quietly(init, x, key=key, tol=tol, max_iters=max_iter - 1, restarts=restarts)
    # L_0 .. L_{T-1}: the start's and each iteration's ELBO (exact EM: the mean
    # log-likelihood); the last is the E-step at the model the fit returns.
    bounds = np.concatenate([done, [float(result.initial_elbo)], np.asarray(result.history)])
    model, extras = _next_model(result, x, finish)
    restart = None if n_init is None else np.asarray(result.restart_elbos)
    converged = result.status == ej.Status.CONVERGED
    return _outcome(model, bounds, converged, restart, extras, what, max_iter + len(done), tol)


def _next_model(result: ej.FitResult, x: Any, finish: Callable) -> tuple[Any, Any]:
    """The M-step after ``result.model`` and ``finish`` of its result: from the statistics of
    the fit's last E-step where they are at hand (else from a new E-step)."""
    stats = _last_statistics(result)
    if stats is not None:
        return _maximize(result.model, stats, finish)
    model = _em_iteration(result.model, jnp.asarray(x))[1]
    return model, _apply(finish, model)


def _outcome(
    model: Any,
    bounds: Any,
    converged: bool,
    restart: Any,
    extras: Any,
    what: str,
    max_iter: int,
    tol: float,
) -> EMOutcome:
    if not converged:
        warn_not_converged(what, max_iter, tol)
    bounds = np.asarray(bounds, np.float64)
    return EMOutcome(
        model, float(bounds[-1]), bounds, len(bounds), bool(converged), restart, to_numpy(extras)
    )


def fit_quietly(init: Any, x: Any, **kwargs: Any) -> ej.FitResult:
    """``ej.fit`` without its ``ConvergenceWarning`` (the caller issues scikit-learn's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ej.ConvergenceWarning)
        return ej.fit(init, x, **kwargs)


def _starting_models(init: Any, key: jax.Array, n_init: int | None) -> list:
    """The starting model(s) ``ej.fit`` would build from ``init`` with this key."""
    if isinstance(init, ej.Model):
        return [init]
    if n_init is None:
        return [init(jr.split(key)[0])]
    return [init(k) for k in jr.split(key, n_init)]


# ----------------------------------------------------------------------------- evaluation
def bucket(n: int, minimum: int = 16, sizes_per_octave: int = 4) -> int:
    """``n`` rounded up to one of ``sizes_per_octave`` sizes per power of two (a power of two
    itself; padding under 1/``sizes_per_octave``), at least ``minimum``: data of nearby sizes
    share a compiled program."""
    if n <= minimum:
        return minimum
    step = 1 << max(0, n.bit_length() - sizes_per_octave.bit_length())
    return -(-n // step) * step


@eqx.filter_jit
def _on_rows(fn: Callable, model: Any, x: jax.Array) -> Any:
    return fn(model, x)


def evaluate_rows(fn: Callable[[Any, jax.Array], Any], model: Any, x: np.ndarray) -> Any:
    """``fn(model, x)`` as NumPy, for a ``fn`` that maps rows to rows (a value per datum).

    ``x`` is padded with copies of its first row to a size bucket (four per power of two)
    and ``fn`` runs compiled, so predicting on data of a new length rarely compiles anew.
    ``fn`` must be a module-level function (compiled programs are cached per function)."""
    n = x.shape[0]
    rows = bucket(n)
    if rows != n:
        x = np.concatenate([x, np.broadcast_to(x[:1], (rows - n, *x.shape[1:]))])
    out = _on_rows(fn, model, jnp.asarray(x))
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], out)


# ----------------------------------------------------------------------------- parameters
def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int ``>= low``; scikit-learn's ``check_scalar`` errors otherwise."""
    check_scalar(value, name, numbers.Integral, min_val=low)
    return int(value)


def check_real(name: str, value: Any, low: float, *, inclusive: bool = True) -> float:
    """``value`` as a float ``>= low`` (``> low`` unless ``inclusive``)."""
    check_scalar(
        value,
        name,
        numbers.Real,
        min_val=low,
        include_boundaries="left" if inclusive else "neither",
    )
    return float(value)


def check_option(name: str, value: Any, options: tuple) -> Any:
    """``value`` if it is one of ``options``, else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value
