r"""``LatentDirichletAllocation``: scikit-learn's API on ``ej.models.LDA``.

Batch VB is ``ej.fit(lda, counts)``, one compiled call; online VB (Hoffman et al.) is
``ej.fit`` with ``ej.StepwiseMStep(kappa=learning_decay, tau=learning_offset)`` and
``batch_size``; ``partial_fit`` takes one online step per minibatch on the host, as
scikit-learn's. The model's variational bound and perplexity are scikit-learn's definitions.

**Differences from scikit-learn:**

- Batch VB keeps, document by document, the previous local factors where they are better
  (``ej.models.LDAPosterior``: the bound never falls), where scikit-learn restarts every
  document from a random $\gamma$ each iteration; ``transform``, ``score`` and ``perplexity``
  fit the local factors from the deterministic start $\gamma_d = \alpha + n_d / K$
  (scikit-learn's draws it at random only in training).
- ``mean_change_tol`` is required of every document of a batch at once (scikit-learn: each
  document stops on its own); ``max_doc_update_iter`` must be >= 1.
- Online VB visits the minibatches in a random order each pass, drawn from
  ``random_state``, in ``ceil(n_samples / batch_size)`` batches of near-equal size
  (scikit-learn: in order, the last one smaller); ``learning_decay`` must lie in
  $(0.5, 1]$ (Robbins–Monro; scikit-learn allows $[0, 1]$).
- ``doc_topic_prior`` and ``topic_word_prior`` may be any positive number (scikit-learn:
  at most 1). ``n_jobs`` is accepted and ignored (JAX uses the device's cores).
- ``evaluate_every > 0`` runs the fit in segments of that many iterations (each a compiled
  call) and stops when the training perplexity changes by less than ``perp_tol``, as
  scikit-learn; ``n_iter_`` then counts every iteration run (scikit-learn's omits the last).
- Computation in float64 with JAX's x64 on, else float32, whatever the input's dtype.
"""

import numbers
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.sparse
import scipy.special
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data

import elbo_jax as ej

from ._base import (
    bucket,
    check_int,
    check_option,
    check_real,
    compute_dtype,
    key_from_random_state,
    run_fit,
)
from ._saving import SaveLoadMixin

DocumentTerms = ej.models.DocumentTerms


# ----------------------------------------------------------------------------- data
def _pad_documents(x: Any, rows: int) -> Any:
    """``x`` (dense counts or ``DocumentTerms``) with empty documents appended up to
    ``rows``: an empty document contributes nothing to the statistics or the bound."""
    if isinstance(x, DocumentTerms):
        extra = rows - x.counts.shape[0]
        pad = lambda a: np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)])
        return DocumentTerms(pad(x.word_ids), pad(x.counts), x.num_words)
    return np.concatenate([x, np.zeros((rows - x.shape[0], x.shape[1]), x.dtype)])


def _document_terms(matrix: scipy.sparse.csr_matrix) -> DocumentTerms:
    """A sparse count matrix as ``DocumentTerms``, its slots per document padded to a bucket
    (count-0 slots), so that matrices with nearby densities share a compiled program."""
    docs = DocumentTerms.from_matrix(matrix)
    ids, counts = np.asarray(docs.word_ids), np.asarray(docs.counts)
    extra = bucket(ids.shape[1], 8, 8) - ids.shape[1]
    pad = lambda a: np.concatenate([a, np.zeros((a.shape[0], extra), a.dtype)], axis=1)
    return DocumentTerms(pad(ids), pad(counts), docs.num_words)


def _num_documents(x: Any) -> int:
    return (x.counts if isinstance(x, DocumentTerms) else x).shape[0]


def _num_words(x: Any) -> float:
    return float(np.sum(x.counts if isinstance(x, DocumentTerms) else x))


# ----------------------------------------------------------------------------- compiled
@eqx.filter_jit
def _gamma(model: Any, x: Any) -> jax.Array:
    return model.posterior(x).gamma


@eqx.filter_jit
def _bounds(model: Any, x: Any) -> tuple[jax.Array, jax.Array]:
    return model.exact_posterior(x)[0], model.global_elbo()


@eqx.filter_jit
def _online_step(model: Any, x: Any, weights: jax.Array, rho: jax.Array, scale: jax.Array) -> Any:
    r"""One step of online VB on the minibatch ``x`` (rows of weight 0 are padding):
    $\lambda \leftarrow (1-\rho)\lambda + \rho(\eta + \text{scale} \cdot \hat s)$, with
    $\hat s$ the minibatch's expected topic-word counts — stepwise EM on the model's
    statistics, $s \leftarrow (1-\rho)s + \rho\,\text{scale}\,\hat s$ from $s = \lambda - \eta$."""
    stats = model.sufficient_statistics(x, ej.ExactPosterior(), weights=weights)
    current = model.complete_data_statistics(jnp.sum(weights) * scale)
    mixed = jax.tree_util.tree_map(lambda s0, s: (1 - rho) * s0 + rho * scale * s, current, stats)
    return model.maximize(mixed)


# ----------------------------------------------------------------------------- estimator
@final
class LatentDirichletAllocation(
    SaveLoadMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator
):
    r"""Latent Dirichlet allocation by variational Bayes, scikit-learn's
    ``LatentDirichletAllocation`` API on ``ej.models.LDA`` (see the module for the
    differences).

    **Parameters** (scikit-learn's names and defaults):

    - `n_components`: $K$ topics.
    - `doc_topic_prior` ($\alpha$), `topic_word_prior` ($\eta$): ``None`` is $1/K$.
    - `learning_method`: ``"batch"`` (batch VB, one compiled ``ej.fit``) or ``"online"``
      (online VB: ``ej.StepwiseMStep``, minibatches of `batch_size`, step sizes
      $\rho_t = (\text{learning\_offset} + t)^{-\text{learning\_decay}}$).
    - `max_iter`: passes over the data.
    - `evaluate_every`, `perp_tol`: every ``evaluate_every`` passes (> 0), stop when the
      training perplexity changes by less than ``perp_tol``; otherwise exactly
      ``max_iter`` passes.
    - `total_samples`: the number of documents ``partial_fit`` stands for.
    - `mean_change_tol`, `max_doc_update_iter`: the per-document coordinate ascent's stop.
    - `n_jobs` (ignored), `verbose`, `random_state` (the start, and the online order).

    **Attributes:** ``components_`` ($\lambda$, ``(K, V)``), ``exp_dirichlet_component_``
    ($\exp E_q[\log\beta]$), ``n_iter_``, ``n_batch_iter_``, ``bound_`` (the final training
    perplexity, as scikit-learn's), ``doc_topic_prior_``, ``topic_word_prior_``,
    ``n_features_in_``, ``model_`` (the fitted ``ej.models.LDA``).

    ```python
    from elbo_jax.sklearn import LatentDirichletAllocation
    lda = LatentDirichletAllocation(10, random_state=0).fit(counts)
    lda.transform(counts), lda.perplexity(held_out)
    ```
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        doc_topic_prior: float | None = None,
        topic_word_prior: float | None = None,
        learning_method: str = "batch",
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        max_iter: int = 10,
        batch_size: int = 128,
        evaluate_every: int = -1,
        total_samples: float = 1e6,
        perp_tol: float = 1e-1,
        mean_change_tol: float = 1e-3,
        max_doc_update_iter: int = 100,
        n_jobs: int | None = None,
        verbose: int = 0,
        random_state: Any = None,
    ):
        self.n_components = n_components
        self.doc_topic_prior = doc_topic_prior
        self.topic_word_prior = topic_word_prior
        self.learning_method = learning_method
        self.learning_decay = learning_decay
        self.learning_offset = learning_offset
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.evaluate_every = evaluate_every
        self.total_samples = total_samples
        self.perp_tol = perp_tol
        self.mean_change_tol = mean_change_tol
        self.max_doc_update_iter = max_doc_update_iter
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.random_state = random_state

    # ------------------------------------------------------------------ checks
    def _check_parameters(self) -> None:
        check_int("n_components", self.n_components, 1)
        for name in ("doc_topic_prior", "topic_word_prior"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name), 0.0, inclusive=False)
        check_option("learning_method", self.learning_method, ("batch", "online"))
        decay = check_real("learning_decay", self.learning_decay, 0.5, inclusive=False)
        if decay > 1:
            raise ValueError(f"learning_decay must be in (0.5, 1], got {self.learning_decay!r}")
        check_real("learning_offset", self.learning_offset, 0.0)
        check_int("max_iter", self.max_iter, 0)
        check_int("batch_size", self.batch_size, 1)
        if isinstance(self.evaluate_every, bool) or not isinstance(
            self.evaluate_every, numbers.Integral
        ):
            raise TypeError(f"evaluate_every must be an int, got {self.evaluate_every!r}")
        check_real("total_samples", self.total_samples, 0.0, inclusive=False)
        check_real("perp_tol", self.perp_tol, 0.0)
        check_real("mean_change_tol", self.mean_change_tol, 0.0)
        check_int("max_doc_update_iter", self.max_doc_update_iter, 1)
        check_int("verbose", self.verbose, 0)

    def _counts(self, X: Any, *, reset: bool, whom: str) -> Any:
        """``X`` validated: dense ``(N, V)`` NumPy counts (or real weights), or
        ``DocumentTerms`` for sparse input, in the compute dtype (``reset``: in ``fit``,
        records ``n_features_in_``)."""
        X = validate_data(self, X, reset=reset, accept_sparse="csr", dtype=[np.float64, np.float32])
        check_non_negative(X, whom)
        dtype = compute_dtype()
        if scipy.sparse.issparse(X):
            return _document_terms(X.astype(dtype))
        return np.asarray(X, dtype)

    def _start(self, key: jax.Array, x: Any) -> Any:
        r"""$\lambda_{kw} \sim \mathrm{Gamma}(100, 1/100)$ (``ej.models.LDA.initialize``, as
        scikit-learn draws it); sets ``doc_topic_prior_`` and ``topic_word_prior_``."""
        k = int(self.n_components)
        self.doc_topic_prior_ = (
            1.0 / k if self.doc_topic_prior is None else float(self.doc_topic_prior)
        )
        self.topic_word_prior_ = (
            1.0 / k if self.topic_word_prior is None else float(self.topic_word_prior)
        )
        return ej.models.LDA.initialize(
            key,
            x,
            k,
            alpha=self.doc_topic_prior_,
            eta=self.topic_word_prior_,
            local_tol=float(self.mean_change_tol),
            local_max_iters=int(self.max_doc_update_iter),
        )

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> "LatentDirichletAllocation":
        """Fit the topics to the document-term counts ``X`` ``(n_samples, n_features)``
        (dense or ``scipy.sparse``) by batch or online VB."""
        del y
        self._check_parameters()
        x = self._counts(X, reset=True, whom="LatentDirichletAllocation.fit")
        init_key, fit_key = jr.split(key_from_random_state(self.random_state))
        model = self._start(init_key, x)
        n, size = _num_documents(x), int(self.batch_size)
        online = self.learning_method == "online"
        per_pass = -(-n // size) if online and size < n else 1  # minibatches per pass
        passes, done, last = int(self.max_iter), 0, None
        segment = passes if self.evaluate_every <= 0 else int(self.evaluate_every)
        while done < passes:
            steps = min(segment, passes - done)
            fit_key, key = jr.split(fit_key)
            options: dict[str, Any] = {}
            if online:
                # A later segment starts from the running statistics (lambda - eta, the
                # model's own) and continues the step sizes: tau shifted by the steps taken.
                tau = self.learning_offset + done * per_pass
                options = dict(
                    q=ej.ExactPosterior(),
                    m_step=ej.StepwiseMStep(kappa=self.learning_decay, tau=tau),
                    batch_size=size,
                )
            model = run_fit(model, x, key=key, tol=0.0, max_iter=steps, **options).model
            done += steps
            if self.evaluate_every > 0:
                perplexity = self._perplexity(model, x)
                if self.verbose:
                    print(f"iteration: {done} of max_iter: {passes}, perplexity: {perplexity:.4f}")
                if last is not None and abs(last - perplexity) < self.perp_tol:
                    break
                last = perplexity
            elif self.verbose:
                print(f"iteration: {done} of max_iter: {passes}")
        self.n_iter_ = done
        self.n_batch_iter_ = 1 + done * per_pass
        self._set_model(model)
        self.bound_ = self._perplexity(model, x)
        return self

    def partial_fit(self, X: Any, y: Any = None) -> "LatentDirichletAllocation":
        """One online VB step per minibatch of ``batch_size`` rows of ``X`` (in order), each
        standing for ``total_samples`` documents (scikit-learn's ``partial_fit``)."""
        del y
        first = not hasattr(self, "model_")
        self._check_parameters()
        x = self._counts(X, reset=first, whom="LatentDirichletAllocation.partial_fit")
        if first:
            self.n_iter_, self.n_batch_iter_ = 0, 1
            model = self._start(key_from_random_state(self.random_state), x)
        else:
            model = self.model_
        n, size = _num_documents(x), int(self.batch_size)
        rows = bucket(min(size, n), 8, 8)
        dtype = compute_dtype()
        for begin in range(0, n, size):
            batch = jax.tree_util.tree_map(lambda a, b=begin: a[b : b + size], x)
            real = _num_documents(batch)
            weights = (np.arange(rows) < real).astype(dtype)
            rho = (self.learning_offset + self.n_batch_iter_) ** (-self.learning_decay)
            model = _online_step(
                model,
                _pad_documents(batch, rows),
                weights,
                np.asarray(rho, dtype),
                np.asarray(self.total_samples / real, dtype),
            )
            self.n_batch_iter_ += 1
        self._set_model(model)
        return self

    def _set_model(self, model: Any) -> None:
        dtype = compute_dtype()
        self.model_ = model
        self.components_ = np.asarray(model.topic_word_concentration, dtype)
        lam = self.components_.astype(np.float64)
        elog = scipy.special.psi(lam) - scipy.special.psi(lam.sum(axis=1, keepdims=True))
        self.exp_dirichlet_component_ = np.exp(elog).astype(dtype)

    # ------------------------------------------------------------------ evaluation
    def _evaluation_data(self, X: Any, whom: str) -> Any:
        check_is_fitted(self, "model_")
        return self._counts(X, reset=False, whom=whom)

    def _document_bounds(self, model: Any, x: Any) -> tuple[np.ndarray, float]:
        """Each document's bound ``(N,)`` (local factors fitted from the fresh start) and the
        topics' term $-\\sum_k \\mathrm{KL}(q(\\beta_k) \\| p(\\beta_k))$."""
        n = _num_documents(x)
        per_document, topics = _bounds(model, _pad_documents(x, bucket(n, 8, 8)))
        return np.asarray(per_document)[:n], float(topics)

    def _perplexity(self, model: Any, x: Any, scale: float = 1.0) -> float:
        documents, topics = self._document_bounds(model, x)
        bound = scale * float(np.sum(documents)) + topics
        return float(np.exp(-bound / (scale * _num_words(x))))

    def transform(self, X: Any, *, normalize: bool = True) -> np.ndarray:
        r"""The documents' topic proportions $E_q[\theta_d]$ ``(n_samples, n_components)``
        (``normalize=False``: the Dirichlet parameters $\gamma_d$ themselves)."""
        x = self._evaluation_data(X, "LatentDirichletAllocation.transform")
        n = _num_documents(x)
        gamma = np.asarray(_gamma(self.model_, _pad_documents(x, bucket(n, 8, 8))))[:n]
        return gamma / gamma.sum(axis=1, keepdims=True) if normalize else gamma

    def fit_transform(self, X: Any, y: Any = None, *, normalize: bool = True) -> np.ndarray:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X, y).transform(X, normalize=normalize)

    def score(self, X: Any, y: Any = None) -> float:
        r"""The variational bound on $\log p(X)$, the topics' term included (scikit-learn's)."""
        del y
        x = self._evaluation_data(X, "LatentDirichletAllocation.score")
        documents, topics = self._document_bounds(self.model_, x)
        return float(np.sum(documents)) + topics

    def perplexity(self, X: Any, sub_sampling: bool = False) -> float:
        r"""$\exp(-\text{bound} / \text{words})$, scikit-learn's perplexity
        (``sub_sampling``: the documents' part scaled to ``total_samples`` documents)."""
        x = self._evaluation_data(X, "LatentDirichletAllocation.perplexity")
        scale = float(self.total_samples) / _num_documents(x) if sub_sampling else 1.0
        return self._perplexity(self.model_, x, scale)

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        # A fit draws its start from random_state; None (the default) differs per fit.
        tags.non_deterministic = self.random_state is None
        return tags
