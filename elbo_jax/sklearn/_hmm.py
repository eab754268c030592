r"""hmmlearn-style hidden Markov models: ``GaussianHMM``, ``CategoricalHMM`` and ``PoissonHMM``,
with hmmlearn's API on ``ej.models.GaussianHMM`` / ``CategoricalHMM`` / ``PoissonHMM``.

As in hmmlearn, ``X`` is the concatenation of the sequences, ``(n_samples, n_features)``, and
``lengths`` their lengths (``None``: one sequence). The estimators split ``X`` into
``ej.Sequences`` padded to a common length (rounded up to a size bucket, so that data of a
new length rarely compile a new program; padding frames are never read) and fit them by
exact EM (``ej.fit``: forward–backward and the closed-form M-step, as one compiled call).
Iterations are counted as hmmlearn counts them (``_em_like_hmmlearn``), so from the same
start and with the same priors, ``n_iter_`` and the parameters equal hmmlearn's.

**Differences from hmmlearn** (beyond speed and compilation):

- ``params`` must name every parameter (elbo_jax's closed-form M-steps update them all);
  ``init_params`` may name any subset, as in hmmlearn (attributes set before ``fit`` and
  not named are the start).
- The start: uniform ``startprob_`` and ``transmat_`` (hmmlearn draws them from a
  Dirichlet); the Gaussian means and covariances of k-means++ clusters of all frames
  (``ej.models.GaussianHMM.initialize``; hmmlearn gives every state the whole data's
  covariance); categorical emissions as the symbols' frequencies perturbed per state
  (hmmlearn: uniform random rows); Poisson rates as ``ej.models.PoissonHMM.initialize``.
- ``GaussianHMM(min_covar=...)`` is added to the diagonal of every covariance at the start
  and in every M-step (hmmlearn documents it as a floor on the diagonal but uses it only at
  the start, regularising instead with ``covars_prior=1e-2``). The Normal / inverse-gamma /
  inverse-Wishart priors (``means_prior``, ``means_weight``, ``covars_prior``,
  ``covars_weight``), ``emissionprob_prior``, ``lambdas_prior`` / ``lambdas_weight`` and the
  ``"spherical"`` and ``"tied"`` covariances are not available. ``startprob_prior`` and
  ``transmat_prior`` (Dirichlet, MAP-EM) are, for concentrations >= 1. To reproduce
  hmmlearn's ``GaussianHMM`` exactly, use ``min_covar=0`` here and ``covars_prior=0`` there.
- ``tol`` is hmmlearn's (on the total log-likelihood of ``X``); with a prior the monitored
  value includes $\log p(\theta)$ (hmmlearn's does not).
- ``n_init`` (not in hmmlearn): that many starts, fitted as one vmapped compiled call, the
  best final log-likelihood kept.
- ``monitor_`` is a record (``history``, ``iter``, ``n_iter``, ``tol``, ``converged``), not
  hmmlearn's ``ConvergenceMonitor``: ``history`` holds the total log-likelihood before each
  M-step *and* after the last, and ``converged`` is True only when ``tol`` was met (hmmlearn's
  is also True after ``n_iter`` iterations). ``verbose`` prints it after the compiled fit.
- ``covars_`` returns full matrices ``(K, D, D)`` for either covariance type, as hmmlearn's;
  it may be set in hmmlearn's shape (``(K, D)`` for ``"diag"``).
- ``CategoricalHMM(n_features=None)`` is not overwritten by ``fit`` (scikit-learn's rule):
  the number of symbols is ``emissionprob_.shape[1]``.
- ``sample(n_samples, random_state)`` has no ``currstate``; ``implementation`` is not a
  parameter (forward–backward uses scaled messages with a log-space fallback).
- ``fit(X, lengths)``: a second positional argument is ``lengths``, as in hmmlearn, not
  scikit-learn's ``y`` (the estimator checks that pass ``y`` fail, by design).
"""

import abc
import dataclasses
import sys
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, check_non_negative

import elbo_jax as ej

from .._chain import chain_mode
from .._validate import prepare_data
from ._base import (
    bucket,
    check_int,
    check_option,
    check_real,
    compute_dtype,
    fit_quietly,
    key_from_random_state,
    validate,
    warn_not_converged,
)
from ._saving import SaveLoadMixin


# ----------------------------------------------------------------------------- sequences
def _check_lengths(lengths: Any, n: int) -> np.ndarray:
    """``lengths`` as positive ints summing to ``n`` (``None``: one sequence of ``n``)."""
    if lengths is None:
        return np.array([n], np.int64)
    values = np.asarray(lengths)
    whole = values.dtype.kind in "iu" or (
        values.dtype.kind == "f" and np.all(values == np.round(values))
    )
    if values.ndim != 1 or values.size == 0 or not whole or np.any(values < 1):
        raise ValueError(
            "lengths must be a 1-D array of positive integers (the lengths of the sequences "
            f"concatenated in X), got {np.asarray(lengths)!r}"
        )
    values = values.astype(np.int64)
    if values.sum() != n:
        raise ValueError(f"lengths array {values} doesn't sum to {n} samples")
    return values


def _to_sequences(frames: np.ndarray, lengths: np.ndarray, *, num_sequences: int) -> ej.Sequences:
    """The concatenated ``frames`` ``(n_samples, ...)`` as ``ej.Sequences`` padded to a bucket
    of frames (padding repeats each sequence's last frame; it is never read), with copies of
    the first sequence appended up to ``num_sequences`` (for evaluation only)."""
    t = bucket(int(lengths.max()), 8, 8)
    starts = np.cumsum(lengths) - lengths
    steps = np.minimum(np.arange(t)[None, :], lengths[:, None] - 1)
    padded = frames[starts[:, None] + steps]
    extra = num_sequences - len(lengths)
    if extra > 0:
        padded = np.concatenate([padded, np.repeat(padded[:1], extra, axis=0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[:1], extra)])
    return ej.Sequences(padded, lengths.astype(np.int32))


def _concatenate(per_frame: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-frame values ``(N, T, ...)`` of padded sequences back to ``(n_samples, ...)``."""
    per_frame = np.asarray(per_frame)[: len(lengths)]
    real = np.arange(per_frame.shape[1])[None, :] < lengths[:, None]
    return per_frame[real]


# ----------------------------------------------------------------------------- compiled
@eqx.filter_jit
def _log_likelihoods(model: Any, x: ej.Sequences) -> jax.Array:
    return model.log_marginal(x)


@eqx.filter_jit
def _posteriors(model: Any, x: ej.Sequences) -> tuple[jax.Array, jax.Array]:
    log_marginal, q = model.exact_posterior(x)
    return log_marginal, q.marginals


@eqx.filter_jit
def _viterbi(model: Any, x: ej.Sequences) -> tuple[jax.Array, jax.Array]:
    return chain_mode(model, x)


@eqx.filter_jit
def _sample(model: Any, key: jax.Array, num_steps: int) -> tuple[Any, jax.Array]:
    return model.sample(key, 1, num_steps)


# ----------------------------------------------------------------------------- EM
@final
@dataclasses.dataclass(frozen=True)
class ConvergenceMonitor:
    """What a fit reports, with hmmlearn's names: ``history``, the total log-likelihood of
    ``X`` before each of the ``iter`` M-steps and after the last (with a prior: plus
    $\\log p(\\theta)$); ``converged``: whether the gain fell below ``tol``."""

    tol: float
    n_iter: int
    iter: int
    history: tuple[float, ...]
    converged: bool


def _em_like_hmmlearn(
    init: Any, x: ej.Sequences, *, key: jax.Array, tol: float, n_iter: int, n_init: int, prior: Any
) -> tuple[Any, ConvergenceMonitor]:
    r"""Exact EM counted as hmmlearn counts it.

    hmmlearn's iteration $t = 0, 1, \dots$ is an E-step at $\theta_t$ (giving $L_t = \log
    p(X \mid \theta_t)$), then an M-step to $\theta_{t+1}$; it stops after the iteration
    where $L_t - L_{t-1} <$ ``tol``, or after ``n_iter``, and keeps $\theta_{t+1}$.
    ``ej.fit`` counts an iteration as M-step then E-step with the same test (per sequence),
    so that is ``ej.fit`` with ``max_iters = n_iter - 1`` and then ``ej.fit`` for one more
    iteration (the same compiled program: only ``max_iters`` and ``tol`` differ), whose
    E-step also gives the final log-likelihood."""
    num_sequences = len(np.asarray(x.lengths))
    restarts = None if n_init == 1 else n_init
    first = None
    if n_iter > 1:
        first = fit_quietly(
            init,
            x,
            key=key,
            max_iters=n_iter - 1,
            tol=tol / num_sequences,
            restarts=restarts,
            prior=prior,
        )
        last = fit_quietly(first.model, x, max_iters=1, tol=0.0, prior=prior)
    else:
        last = fit_quietly(init, x, key=key, max_iters=1, tol=0.0, restarts=restarts, prior=prior)
    if first is None:
        per_sequence = [float(last.initial_elbo), float(last.history[-1])]
        converged = False
    else:
        per_sequence = [float(first.initial_elbo), *np.asarray(first.history).tolist()]
        per_sequence.append(float(last.history[-1]))
        converged = first.status == ej.Status.CONVERGED
    history = tuple(float(v) * num_sequences for v in per_sequence)
    monitor = ConvergenceMonitor(tol, n_iter, len(history) - 1, history, converged)
    return last.model, monitor


# ----------------------------------------------------------------------------- base
class _AbstractHMM(SaveLoadMixin, BaseEstimator, metaclass=abc.ABCMeta):
    """What the HMM estimators share: ``fit`` by exact EM over ``X`` and ``lengths``, and
    hmmlearn's evaluation methods. Concrete classes give their ``__init__`` (scikit-learn
    reads the parameters from it), the parameter letters, the frames (``_frames``), the
    start (``_start``) and the fitted attributes (``_set_attributes``)."""

    #: hmmlearn's letters: parameter letter -> fitted attribute.
    _letters: ClassVar[dict[str, str]]
    n_components: int
    startprob_prior: Any
    transmat_prior: Any
    algorithm: str
    random_state: Any
    n_iter: int
    tol: float
    verbose: bool
    params: str
    init_params: str
    n_init: int

    @abc.abstractmethod
    def _frames(self, X: Any, *, reset: bool) -> np.ndarray:
        """``X`` validated (``reset``: in ``fit``) as the model's frames."""

    @abc.abstractmethod
    def _start(self, key: jax.Array, x: ej.Sequences, given: dict[str, Any]) -> Any:
        """The starting model (traceable in ``key``: vmapped over restarts), with the
        attributes in ``given`` (letter -> array) instead of drawn ones."""

    @abc.abstractmethod
    def _set_attributes(self, model: Any) -> None:
        """The fitted attributes from the fitted ``model``."""

    # ------------------------------------------------------------------ fit
    def _check_parameters(self) -> Any:
        """The parameters checked; returns the Dirichlet prior (``None``: none)."""
        check_int("n_components", self.n_components, 1)
        check_int("n_iter", self.n_iter, 1)
        check_real("tol", self.tol, 0.0)
        check_int("n_init", self.n_init, 1)
        check_option("algorithm", self.algorithm, ("viterbi", "map"))
        letters = "".join(self._letters)
        if not isinstance(self.params, str) or set(self.params) != set(letters):
            raise ValueError(
                f"params={self.params!r} is not supported: elbo_jax's closed-form M-step updates "
                f"every parameter, so params must name them all ({letters!r})"
            )
        if not isinstance(self.init_params, str) or not set(self.init_params) <= set(letters):
            raise ValueError(
                f"init_params must be letters of {letters!r}, got {self.init_params!r}"
            )
        priors = (self.startprob_prior, self.transmat_prior)
        if all(np.all(np.asarray(p, np.float64) == 1) for p in priors):
            return None
        return ej.models.HMMPrior(*priors)

    def _given(self, dtype: Any) -> dict[str, Any]:
        """Attributes set before ``fit`` whose letters are not in ``init_params``."""
        return {
            letter: np.asarray(getattr(self, name), dtype)
            for letter, name in self._letters.items()
            if letter not in self.init_params and hasattr(self, name)
        }

    def fit(self, X: Any, lengths: Any = None) -> "_AbstractHMM":
        """Estimate the parameters by exact EM from ``X`` ``(n_samples, n_features)``, the
        sequences of ``lengths`` concatenated (``None``: one sequence).

        Stops when the total log-likelihood gains less than ``tol`` in an iteration, or
        after ``n_iter`` iterations (then a ``sklearn.exceptions.ConvergenceWarning`` when
        ``tol > 0``)."""
        prior = self._check_parameters()
        frames = self._frames(X, reset=True)
        lengths = _check_lengths(lengths, frames.shape[0])
        if frames.shape[0] < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {frames.shape[0]}"
            )
        x = _to_sequences(frames, lengths, num_sequences=len(lengths))
        given = self._given(compute_dtype())
        model, monitor = _em_like_hmmlearn(
            lambda key: self._start(key, x, given),
            x,
            key=key_from_random_state(self.random_state),
            tol=float(self.tol),
            n_iter=int(self.n_iter),
            n_init=int(self.n_init),
            prior=prior,
        )
        self.model_ = model
        self.monitor_ = monitor
        self.n_iter_ = monitor.iter
        self.converged_ = monitor.converged
        self._set_attributes(model)
        if self.verbose:
            for i, value in enumerate(monitor.history):
                delta = value - monitor.history[i - 1] if i else np.nan
                print(f"{i + 1:>10d} {value:>16.8f} {delta:>+16.8f}", file=sys.stderr)
        if not monitor.converged and self.tol > 0:
            warn_not_converged(type(self).__name__, int(self.n_iter), float(self.tol))
        return self

    # ------------------------------------------------------------------ evaluation
    def _evaluation_data(self, X: Any, lengths: Any) -> tuple[np.ndarray, Any]:
        check_is_fitted(self, "model_")
        frames = self._frames(X, reset=False)
        lengths = _check_lengths(lengths, frames.shape[0])
        x = _to_sequences(frames, lengths, num_sequences=bucket(len(lengths), 1, 8))
        return lengths, prepare_data(self.model_, x)

    def score_samples(self, X: Any, lengths: Any = None) -> tuple[float, np.ndarray]:
        """``(log p(X), posteriors)``: the total log-likelihood and the posterior state
        probabilities $p(z_t{=}k \\mid X)$ of every sample, ``(n_samples, n_components)``."""
        lengths, x = self._evaluation_data(X, lengths)
        log_marginal, marginals = _posteriors(self.model_, x)
        total = float(np.sum(np.asarray(log_marginal)[: len(lengths)]))
        return total, _concatenate(marginals, lengths)

    def score(self, X: Any, lengths: Any = None) -> float:
        """$\\log p(X \\mid \\theta)$, summed over the sequences (hmmlearn's ``score``)."""
        lengths, x = self._evaluation_data(X, lengths)
        return float(np.sum(np.asarray(_log_likelihoods(self.model_, x))[: len(lengths)]))

    def predict_proba(self, X: Any, lengths: Any = None) -> np.ndarray:
        """The posterior state probabilities, ``(n_samples, n_components)``."""
        return self.score_samples(X, lengths)[1]

    def decode(
        self, X: Any, lengths: Any = None, algorithm: str | None = None
    ) -> tuple[float, np.ndarray]:
        """``(log_prob, states)``: ``"viterbi"`` (default: ``self.algorithm``), the most
        probable state sequences and $\\log p(X, z^*)$; ``"map"``, the most probable state
        of each sample and, as hmmlearn returns, $\\sum_t \\max_k p(z_t{=}k \\mid X)$."""
        algorithm = check_option("algorithm", algorithm or self.algorithm, ("viterbi", "map"))
        if algorithm == "map":
            posteriors = self.predict_proba(X, lengths)
            return float(np.max(posteriors, axis=1).sum()), np.argmax(posteriors, axis=1)
        lengths, x = self._evaluation_data(X, lengths)
        paths, log_joint = _viterbi(self.model_, x)
        total = float(np.sum(np.asarray(log_joint)[: len(lengths)]))
        return total, _concatenate(paths, lengths).astype(np.int64)

    def predict(self, X: Any, lengths: Any = None) -> np.ndarray:
        """The decoded state of every sample (``decode`` with ``self.algorithm``)."""
        return self.decode(X, lengths)[1]

    def _n_parameters(self) -> int:
        return int(self.model_.n_parameters)

    def bic(self, X: Any, lengths: Any = None) -> float:
        """$-2\\log p(X) + P\\log(n_\\text{samples})$, $P$ free parameters (hmmlearn's count)."""
        n = self._frames(X, reset=False).shape[0]
        return -2 * self.score(X, lengths) + self._n_parameters() * np.log(n)

    def aic(self, X: Any, lengths: Any = None) -> float:
        """$-2\\log p(X) + 2P$."""
        return -2 * self.score(X, lengths) + 2 * self._n_parameters()

    def get_stationary_distribution(self) -> np.ndarray:
        """The stationary distribution of ``transmat_`` (its left eigenvector for 1)."""
        check_is_fitted(self, "model_")
        values, vectors = np.linalg.eig(np.asarray(self.transmat_, np.float64).T)
        vector = np.real_if_close(vectors[:, np.argmax(values.real)])
        return vector / vector.sum()

    def sample(self, n_samples: int = 1, random_state: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """One sequence of ``n_samples`` frames from the model: ``(X, states)``; drawn from
        ``random_state``, or the estimator's when ``None``."""
        check_is_fitted(self, "model_")
        n = check_int("n_samples", n_samples, 1)
        seed = self.random_state if random_state is None else random_state
        frames, states = _sample(self.model_, key_from_random_state(seed), n)
        frames = np.asarray(frames)[0]
        return frames.reshape(n, -1), np.asarray(states)[0].astype(np.int64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # A fit draws its start from random_state; None (the default) differs per fit.
        tags.non_deterministic = self.random_state is None
        return tags


def _chain_start(given: dict[str, Any], k: int, dtype: Any) -> tuple[Any, Any]:
    """``startprob`` and ``transmat``: the given ones, else uniform."""
    uniform = np.full((k,), 1.0 / k, dtype)
    start = given.get("s", uniform)
    return start, given.get("t", np.broadcast_to(uniform, (k, k)))


# ----------------------------------------------------------------------------- Gaussian
@final
class GaussianHMM(_AbstractHMM):
    r"""A hidden Markov model with Gaussian emissions, hmmlearn's ``GaussianHMM`` API on
    ``ej.models.GaussianHMM``: $x_t \mid z_t{=}k \sim \mathcal N(\mu_k, \Sigma_k)$.

    **Parameters** (hmmlearn's names and defaults; see the module for the differences):

    - `n_components`: $K$, the number of states.
    - `covariance_type`: ``"diag"`` or ``"full"``.
    - `min_covar`: added to the diagonal of every covariance, at the start and in every
      M-step (``ej.models.GaussianHMM``'s ``reg_covar``).
    - `startprob_prior`, `transmat_prior`: Dirichlet concentrations (numbers or arrays,
      each >= 1; 1: none) for MAP-EM.
    - `algorithm`: ``"viterbi"`` or ``"map"``, for ``decode`` and ``predict``.
    - `random_state`: the seed of the start (and of ``sample``).
    - `n_iter`, `tol`: at most ``n_iter`` EM iterations; stop when the total
      log-likelihood of ``X`` gains less than ``tol``.
    - `verbose`: print hmmlearn's per-iteration report (after the compiled fit).
    - `params`: must be ``"stmc"``; `init_params`: the letters (``s`` startprob, ``t``
      transmat, ``m`` means, ``c`` covars) drawn at the start; the others come from the
      attributes set before ``fit``.
    - `n_init`: the number of starts (one vmapped compiled fit), the best kept.

    **Attributes:** ``startprob_`` ``(K,)``, ``transmat_`` ``(K, K)``, ``means_`` ``(K, D)``,
    ``covars_`` ``(K, D, D)`` (full matrices for either type, as hmmlearn), ``n_iter_``,
    ``converged_``, ``monitor_``, ``n_features_in_``, and ``model_`` (the fitted
    ``ej.models.GaussianHMM``). NumPy arrays, float64 with JAX's x64 on, else float32.

    ```python
    from elbo_jax.sklearn import GaussianHMM
    hmm = GaussianHMM(3, random_state=0).fit(X, lengths)
    hmm.transmat_, hmm.predict(X, lengths), hmm.score(X, lengths)
    ```
    """

    _letters = {"s": "startprob_", "t": "transmat_", "m": "means_", "c": "covars_"}

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: str = "diag",
        min_covar: float = 1e-3,
        startprob_prior: Any = 1.0,
        transmat_prior: Any = 1.0,
        algorithm: str = "viterbi",
        random_state: Any = None,
        n_iter: int = 10,
        tol: float = 1e-2,
        verbose: bool = False,
        params: str = "stmc",
        init_params: str = "stmc",
        n_init: int = 1,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.n_init = n_init

    @property
    def covars_(self) -> np.ndarray:
        """The covariances as full matrices ``(K, D, D)`` (hmmlearn's ``covars_``)."""
        covars = self._covars_
        if covars.ndim == 2:
            return np.stack([np.diag(c) for c in covars])
        return covars

    @covars_.setter
    def covars_(self, value: Any) -> None:
        self._covars_ = np.array(value)

    def _check_parameters(self) -> Any:
        prior = super()._check_parameters()
        if self.covariance_type in ("spherical", "tied"):
            raise ValueError(
                f"covariance_type={self.covariance_type!r} is not available: "
                "ej.models.GaussianHMM has 'diag' and 'full' covariances"
            )
        check_option("covariance_type", self.covariance_type, ("diag", "full"))
        check_real("min_covar", self.min_covar, 0.0)
        return prior

    def _frames(self, X: Any, *, reset: bool) -> np.ndarray:
        return validate(self, X, reset=reset)

    def _start(self, key: jax.Array, x: ej.Sequences, given: dict[str, Any]) -> Any:
        k, covariance_type = int(self.n_components), self.covariance_type
        dtype = compute_dtype()
        if "c" in given and covariance_type == "diag" and given["c"].ndim == 3:
            given = {**given, "c": np.diagonal(given["c"], axis1=1, axis2=2)}  # as covars_ reads
        if "m" in given and "c" in given:
            means, covars = given["m"], given["c"]
        else:
            drawn = ej.models.GaussianHMM.initialize(
                key, x, k, covariance_type, float(self.min_covar)
            )
            means, covars = given.get("m", drawn.means), given.get("c", drawn.covariances)
        start, transmat = _chain_start(given, k, dtype)
        return ej.models.GaussianHMM(
            start, transmat, means, covars, covariance_type, float(self.min_covar)
        )

    def _set_attributes(self, model: Any) -> None:
        dtype = compute_dtype()
        self.startprob_ = np.asarray(model.initial_probs, dtype)
        self.transmat_ = np.asarray(model.transition_matrix, dtype)
        self.means_ = np.asarray(model.means, dtype)
        self._covars_ = np.asarray(model.covariances, dtype)


# ----------------------------------------------------------------------------- categorical
@final
class CategoricalHMM(_AbstractHMM):
    r"""A hidden Markov model of symbols, hmmlearn's ``CategoricalHMM`` API on
    ``ej.models.CategoricalHMM``: $p(x_t{=}m \mid z_t{=}k) = B_{km}$.

    ``X``: ``(n_samples, 1)`` integer symbols in ``[0, n_features)``. **Parameters**: as
    ``GaussianHMM``'s (letters ``s``, ``t``, ``e``), and `n_features`: the number of symbols
    $M$ (``None``: the largest symbol in the data plus one). **Attributes:**
    ``startprob_``, ``transmat_``, ``emissionprob_`` ``(K, M)``, ``n_iter_``, ``converged_``,
    ``monitor_``, ``n_features_in_`` (1), ``model_``.
    """

    _letters = {"s": "startprob_", "t": "transmat_", "e": "emissionprob_"}

    def __init__(
        self,
        n_components: int = 1,
        startprob_prior: Any = 1.0,
        transmat_prior: Any = 1.0,
        *,
        n_features: int | None = None,
        algorithm: str = "viterbi",
        random_state: Any = None,
        n_iter: int = 10,
        tol: float = 1e-2,
        verbose: bool = False,
        params: str = "ste",
        init_params: str = "ste",
        n_init: int = 1,
    ):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.n_features = n_features
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.n_init = n_init

    def _check_parameters(self) -> Any:
        prior = super()._check_parameters()
        if self.n_features is not None:
            check_int("n_features", self.n_features, 1)
        return prior

    def _frames(self, X: Any, *, reset: bool) -> np.ndarray:
        x = validate(self, X, reset=reset, dtype=np.float64)
        if x.shape[1] != 1:
            raise ValueError(
                f"X has {x.shape[1]} features, expected 1: a column of integer symbols "
                "(n_samples, 1)"
            )
        if np.any(x < 0) or not np.all(x == np.round(x)):
            raise ValueError(f"{type(self).__name__} needs X of integer symbols >= 0")
        symbols = x[:, 0].astype(np.int32)
        m = self._num_symbols(symbols) if reset else self.model_.num_symbols
        if symbols.max() >= m:
            raise ValueError(f"X holds symbol {symbols.max()}, outside [0, n_features) = [0, {m})")
        return symbols

    def _num_symbols(self, symbols: np.ndarray) -> int:
        if "e" not in self.init_params and hasattr(self, "emissionprob_"):
            return int(np.shape(self.emissionprob_)[1])
        if self.n_features is not None:
            return int(self.n_features)
        return int(symbols.max()) + 1

    def _start(self, key: jax.Array, x: ej.Sequences, given: dict[str, Any]) -> Any:
        k, dtype = int(self.n_components), compute_dtype()
        if "e" in given:
            emission = given["e"]
        else:
            symbols = np.concatenate(x.to_list()).astype(np.int64)
            m = self._num_symbols(symbols)
            freq = jnp.asarray(np.bincount(symbols, minlength=m) + 1.0, dtype)
            # The symbols' frequencies, perturbed per state (a symmetric start never breaks).
            emission = freq[None] * jr.uniform(key, (k, m), dtype, minval=0.5, maxval=1.5)
            emission = emission / jnp.sum(emission, axis=1, keepdims=True)
        start, transmat = _chain_start(given, k, dtype)
        return ej.models.CategoricalHMM(start, transmat, emission)

    def _set_attributes(self, model: Any) -> None:
        dtype = compute_dtype()
        self.startprob_ = np.asarray(model.initial_probs, dtype)
        self.transmat_ = np.asarray(model.transition_matrix, dtype)
        self.emissionprob_ = np.asarray(model.emission_probs, dtype)


# ----------------------------------------------------------------------------- Poisson
@final
class PoissonHMM(_AbstractHMM):
    r"""A hidden Markov model of counts, hmmlearn's ``PoissonHMM`` API on
    ``ej.models.PoissonHMM``: $x_{td} \mid z_t{=}k \sim \mathrm{Poisson}(\lambda_{kd})$.

    ``X``: ``(n_samples, n_features)`` nonnegative whole numbers. **Parameters**: as
    ``GaussianHMM``'s (letters ``s``, ``t``, ``l``); the rates are floored at
    ``ej.models.PoissonHMM``'s ``min_rate``. **Attributes:** ``startprob_``, ``transmat_``,
    ``lambdas_`` ``(K, D)``, ``n_iter_``, ``converged_``, ``monitor_``, ``n_features_in_``,
    ``model_``.
    """

    _letters = {"s": "startprob_", "t": "transmat_", "l": "lambdas_"}

    def __init__(
        self,
        n_components: int = 1,
        startprob_prior: Any = 1.0,
        transmat_prior: Any = 1.0,
        *,
        algorithm: str = "viterbi",
        random_state: Any = None,
        n_iter: int = 10,
        tol: float = 1e-2,
        verbose: bool = False,
        params: str = "stl",
        init_params: str = "stl",
        n_init: int = 1,
    ):
        self.n_components = n_components
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.n_init = n_init

    def _frames(self, X: Any, *, reset: bool) -> np.ndarray:
        x = validate(self, X, reset=reset)
        check_non_negative(x, f"{type(self).__name__}")
        if not np.all(x == np.round(x)):
            raise ValueError(f"{type(self).__name__} needs X of counts (whole numbers)")
        return x

    def _start(self, key: jax.Array, x: ej.Sequences, given: dict[str, Any]) -> Any:
        k, dtype = int(self.n_components), compute_dtype()
        if "l" in given:
            rates = given["l"]
        else:
            rates = ej.models.PoissonHMM.initialize(key, x, k).rates
        start, transmat = _chain_start(given, k, dtype)
        return ej.models.PoissonHMM(start, transmat, rates)

    def _set_attributes(self, model: Any) -> None:
        dtype = compute_dtype()
        self.startprob_ = np.asarray(model.initial_probs, dtype)
        self.transmat_ = np.asarray(model.transition_matrix, dtype)
        self.lambdas_ = np.asarray(model.rates, dtype)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags
