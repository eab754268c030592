r"""Latent Dirichlet allocation by mean-field variational EM, batch and online (Blei, Ng &
Jordan 2003, with the smoothed topic-word prior; Hoffman, Blei & Bach 2010).

$$\beta_k \sim \mathrm{Dir}(\eta 1_V),\quad \theta_d \sim \mathrm{Dir}(\alpha),\quad
  z_{di} \sim \mathrm{Cat}(\theta_d),\quad w_{di} \sim \mathrm{Cat}(\beta_{z_{di}}).$$

The topics are held as a variational factor $q(\beta_k) = \mathrm{Dir}(\lambda_k)$ (the model's
parameters are $\lambda$, $\alpha$, $\eta$), each document has the mean-field factors of
``LDAPosterior``. The free energy is the negative ELBO of Blei et al. per document,

$$F = -\frac1N\Big(\sum_d \big(E_q[\log p(w_d, \theta_d, z_d \mid \alpha, \beta)] + H[q(\theta_d)]
  + H[q(z_d)]\big) - \sum_k \mathrm{KL}\big(\mathrm{Dir}(\lambda_k) \,\|\, \mathrm{Dir}(\eta 1_V)\big)\Big),$$

the last sum being ``global_elbo``. Batch VB (``ej.fit(lda, counts)``) alternates the
per-document coordinate ascent (restarted each iteration, keeping a document's previous
factors where they are better) with $\lambda = \eta + \sum_d \sum_s n_{ds}
\phi_{ds}$; online VB is stepwise EM on those statistics (``ej.StepwiseMStep``).
"""

import math
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.special as jss
import numpy as np

from .._custom_types import Array, Data, Float, Key, PerDatum, Scalar, Stats
from .._model import Model
from .._q import AbstractQ, ExactPosterior
from .._validate import canonical_float_dtype, is_concrete, is_integer, is_number, prepare_data
from ._lda_inference import (
    DocumentTerms,
    LDAPosterior,
    Topics,
    Words,
    as_words,
    dirichlet_elbo,
    dirichlet_expectation,
    explicit_terms,
    fit_local,
    initial_gamma,
    optimal_terms,
    topic_factors,
)

# The learned eta stays in this range (the Polya likelihood's optimum may lie at infinity).
ETA_RANGE = (1e-6, 1e6)


def _check_positive(name: str, value: Array) -> None:
    if is_concrete(value):
        v = np.asarray(value, np.float64)
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"{name} must be finite and > 0, got {np.asarray(value)}")


def _check_counts_entries(name: str, values: Any) -> None:
    """Finite and nonnegative, else a ``ValueError`` naming the first bad entry. Word counts
    need not be whole numbers: the bound is linear in them, so real weights (tf-idf, say) fit
    as counts would (scikit-learn's LDA accepts them too)."""
    if not is_concrete(values):
        return
    v = np.asarray(values)
    ok = (np.isfinite(v) & (v >= 0)) if v.dtype.kind == "f" else (v >= 0)
    if not np.all(ok):
        bad = tuple(int(i) for i in np.argwhere(~ok)[0])
        raise ValueError(
            f"{name} must hold finite, nonnegative word counts (or weights) for LDA, got "
            f"{name}[{', '.join(map(str, bad))}] = {v[bad]}"
        )


@final
class LDA(Model):
    r"""Latent Dirichlet allocation with $K$ topics over a vocabulary of $V$ words, fitted by
    mean-field variational EM (batch VB) or online VB.

    **Data:** a document-term count matrix ``(N, V)`` (dense; any integer or float dtype;
    nonnegative real weights such as tf-idf are allowed, the bound being linear in them) or
    ``DocumentTerms`` (padded word ids and counts, for large vocabularies:
    ``DocumentTerms.from_matrix(dense_or_scipy_sparse)``). Both give the same numbers. A
    document with no words is allowed and contributes 0 to the ELBO.

    **Parameters** (stored unconstrained, so gradient steps work on them):
    ``log_concentration`` $= \log\lambda$ ``(K, V)``, ``log_alpha`` ``(K,)``, ``log_eta``
    ``()``; read them as ``topic_word_concentration`` ($\lambda$), ``topic_word``
    ($E_q[\beta_k] = \lambda_k / \sum_w \lambda_{kw}$), ``alpha``, ``eta``.

    **Learning.** ``maximize`` sets $\lambda = \eta + \sum_d\sum_s n_{ds}\phi_{ds}$; with
    ``learn_alpha`` it also sets $\alpha$ to the maximiser of
    $\sum_d E_q[\log\mathrm{Dir}(\theta_d \mid \alpha)]$ (Newton, ``_newton.fit_dirichlet``);
    with ``learn_eta`` it maximises over $(\lambda, \eta)$ jointly: $\lambda = \eta + c$ for any
    $\eta$, and the profile in $\eta$ is the Polya (Dirichlet-multinomial) log-likelihood of the
    expected topic-word counts $c$, maximised by a 1-D Newton in $\log\eta$ (kept in
    ``ETA_RANGE``). Each is the exact M-step, so batch VB never raises F.

    **Inference** (static settings): ``local_tol`` and ``local_max_iters`` are the
    per-document coordinate ascent's stopping rule (see ``LDAPosterior``) for ``default_q``
    and for ``exact_posterior`` (online fits, ``transform``, ``bound``).

    ``ej.fit(lda, counts)`` is batch VB with ``q = LDAPosterior()`` (F never rises);
    ``ej.fit(lda, counts, q=ej.ExactPosterior())`` takes the fresh local fit each time, as
    scikit-learn does (F may then rise slightly); ``m_step=ej.StepwiseMStep(kappa, tau)``
    with ``batch_size=`` is Hoffman et al.'s online VB ($\rho_t = (t + \tau)^{-\kappa}$).

    ```python
    lda = ej.models.LDA.initialize(jax.random.key(0), counts, 10)
    res = ej.fit(lda, counts, max_iters=50)
    res.model.topic_word, res.model.transform(counts), res.model.perplexity(held_out)
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("alpha", "eta", "topic_word")
    log_concentration: Float[Array, "K V"]
    log_alpha: Float[Array, " K"]
    log_eta: Float[Array, ""]
    learn_alpha: bool = eqx.field(static=True)
    learn_eta: bool = eqx.field(static=True)
    local_tol: float = eqx.field(static=True)
    local_max_iters: int = eqx.field(static=True)

    def __init__(
        self,
        topic_word_concentration: Any,
        alpha: Any,
        eta: Any,
        *,
        learn_alpha: bool = False,
        learn_eta: bool = False,
        local_tol: float = 1e-3,
        local_max_iters: int = 100,
    ):
        lam = jnp.asarray(topic_word_concentration)
        dtype = canonical_float_dtype(lam)
        lam = lam.astype(dtype)
        if lam.ndim != 2 or min(lam.shape) < 1:
            raise ValueError(
                f"topic_word_concentration has shape {lam.shape}, expected (K, V) with K, V >= 1"
            )
        k = lam.shape[0]
        alpha = jnp.asarray(alpha).astype(dtype)
        if alpha.ndim == 0:
            alpha = jnp.full((k,), alpha, dtype)
        if alpha.shape != (k,):
            raise ValueError(f"alpha has shape {alpha.shape}, expected a number or (K,) = ({k},)")
        eta = jnp.asarray(eta).astype(dtype)
        if eta.shape != ():
            raise ValueError(f"eta has shape {eta.shape}, expected a number")
        _check_positive("topic_word_concentration", lam)
        _check_positive("alpha", alpha)
        _check_positive("eta", eta)
        for name, flag in (("learn_alpha", learn_alpha), ("learn_eta", learn_eta)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if not (is_number(local_tol) and math.isfinite(local_tol) and local_tol >= 0):
            raise ValueError(f"local_tol must be a finite number >= 0, got {local_tol!r}")
        if not is_integer(local_max_iters) or local_max_iters < 1:
            raise ValueError(f"local_max_iters must be a positive int, got {local_max_iters!r}")
        self.log_concentration = jnp.log(lam)
        self.log_alpha = jnp.log(alpha)
        self.log_eta = jnp.log(eta)
        self.learn_alpha = learn_alpha
        self.learn_eta = learn_eta
        self.local_tol = float(local_tol)
        self.local_max_iters = int(local_max_iters)

    # ------------------------------------------------------------ properties
    @property
    def num_topics(self) -> int:
        return self.log_concentration.shape[0]

    @property
    def num_words(self) -> int:
        return self.log_concentration.shape[1]

    @property
    def dtype(self) -> Any:
        return self.log_concentration.dtype

    @property
    def latent(self) -> Topics:
        return Topics(self.num_topics)

    @property
    def topic_word_concentration(self) -> Float[Array, "K V"]:
        r"""$\lambda$: $q(\beta_k) = \mathrm{Dir}(\lambda_k)$."""
        return jnp.exp(self.log_concentration)

    @property
    def topic_word(self) -> Float[Array, "K V"]:
        r"""$E_q[\beta_k] = \lambda_k / \sum_w \lambda_{kw}$: each row a distribution over words."""
        return jax.nn.softmax(self.log_concentration, axis=1)

    @property
    def alpha(self) -> Float[Array, " K"]:
        r"""$\alpha$, the document-topic Dirichlet's concentration."""
        return jnp.exp(self.log_alpha)

    @property
    def eta(self) -> Float[Array, ""]:
        r"""$\eta$, the topic-word Dirichlet's (symmetric) concentration."""
        return jnp.exp(self.log_eta)

    def words(self, x: Data) -> Words:
        """Documents (dense rows or ``DocumentTerms``) as counts in slots (internal)."""
        return as_words(x, self.dtype)

    # ------------------------------------------------------------ densities
    def log_joint(self, x: Any, z: Any) -> Scalar:
        r"""$E_{q(\beta)}[\log p(w, \theta, t \mid \alpha, \beta)]$ for one document ``x``
        (a dense row ``(V,)`` or one ``DocumentTerms`` row) and $z = (\theta, t)$: topic
        proportions $\theta$ ``(K,)`` and one topic per slot ``t`` (the slot's $n_s$ words
        share it),
        $\log\mathrm{Dir}(\theta \mid \alpha) + \sum_s n_s\,(\log\theta_{t_s} +
        E_q[\log\beta_{t_s w_s}])$ — what F needs, the expectation over the global factor."""
        theta, topics = z
        if isinstance(x, DocumentTerms):
            counts, ids = x.counts.astype(self.dtype), x.word_ids
        else:
            counts = jnp.asarray(x).astype(self.dtype)
            ids = jnp.arange(counts.shape[0])
        alpha = self.alpha
        log_theta = jnp.log(theta)
        log_prior = (
            jss.gammaln(jnp.sum(alpha))
            - jnp.sum(jss.gammaln(alpha))
            + jnp.sum((alpha - 1) * log_theta)
        )
        elog_beta = dirichlet_expectation(self.topic_word_concentration)
        per_slot = log_theta[topics] + elog_beta[topics, ids]
        return log_prior + jnp.sum(jnp.where(counts > 0, counts * per_slot, 0))

    def global_elbo(self) -> Scalar:
        r"""$-\sum_k \mathrm{KL}(\mathrm{Dir}(\lambda_k) \,\|\, \mathrm{Dir}(\eta 1_V))$
        $= \sum_k \big(E_q[\log p(\beta_k \mid \eta)] + H[q(\beta_k)]\big)$."""
        lam = self.topic_word_concentration
        eta = jnp.broadcast_to(self.eta, lam.shape)
        return jnp.sum(dirichlet_elbo(lam, dirichlet_expectation(lam), eta))

    def default_q(self) -> AbstractQ:
        """``LDAPosterior`` with this model's ``local_tol`` and ``local_max_iters``."""
        return LDAPosterior(tol=self.local_tol, max_iters=self.local_max_iters)

    def _fit_documents(self, x: Data) -> tuple[Words, Array]:
        words = self.words(x)
        gamma = fit_local(
            initial_gamma(self.alpha, words),
            self.alpha,
            words,
            topic_factors(self.topic_word_concentration),
            tol=self.local_tol,
            max_iters=self.local_max_iters,
        )
        return words, gamma

    def exact_posterior(self, x: Data) -> tuple[PerDatum, LDAPosterior]:
        r"""The documents' local factors fitted by coordinate ascent from the fresh start
        $\gamma_d = \alpha + n_d / K$, and each document's ELBO at them (with
        $E_{q(\beta)}$; without the global term): ``(elbo (N,), LDAPosterior)``. LDA has no
        exact posterior; this is what ``q=ej.ExactPosterior()``, online fits and
        ``transform`` / ``bound`` use."""
        _, gamma = self._fit_documents(x)
        q = LDAPosterior(gamma, tol=self.local_tol, max_iters=self.local_max_iters)
        q = q.resolve(self, x)
        elbo = q.expected_log_joint(self, x) + q.entropy()
        return elbo, q

    def posterior(self, x: Data) -> LDAPosterior:
        """The local factors of ``exact_posterior``."""
        return self.exact_posterior(x)[1]

    def check_data(self, x: Data) -> None:
        """Raise ``ValueError`` unless ``x`` is an ``(N, V)`` count matrix with this model's $V$,
        or ``DocumentTerms`` with ``num_words == V``, ids in ``[0, V)`` and nonnegative counts."""
        v = self.num_words
        if isinstance(x, DocumentTerms):
            ids, counts = x.word_ids, x.counts
            if ids.ndim != 2 or counts.shape != ids.shape:
                raise ValueError(
                    f"x.word_ids has shape {tuple(ids.shape)} and x.counts "
                    f"{tuple(counts.shape)}, expected both (N, L)"
                )
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"x.word_ids must be integers, got dtype {ids.dtype}")
            if x.num_words != v:
                raise ValueError(
                    f"x.num_words = {x.num_words}, but the model has a vocabulary of V = {v} words"
                )
            if is_concrete(ids):
                i = np.asarray(ids)
                bad = (i < 0) | (i >= v)
                if np.any(bad):
                    at = tuple(int(j) for j in np.argwhere(bad)[0])
                    raise ValueError(
                        f"x.word_ids must be in [0, V) = [0, {v}), got "
                        f"x.word_ids[{at[0]}, {at[1]}] = {i[at]}"
                    )
            _check_counts_entries("x.counts", counts)
            return
        shape = tuple(jnp.shape(x))
        if len(shape) != 2 or shape[1] != v:
            raise ValueError(
                f"x has shape {shape}, expected a document-term matrix (N, V) with V={v}, "
                "or ej.models.DocumentTerms"
            )
        _check_counts_entries("x", x)

    # ------------------------------------------------------------ statistics contract
    def has_closed_form(self, prior: Any) -> bool:
        """True for no prior on $(\\lambda, \\alpha, \\eta)$ (``None``)."""
        return prior is None

    def sufficient_statistics(
        self, x: Data, q: AbstractQ, *, weights: Array | None = None
    ) -> Stats:
        r"""``{"topic_word": (K, V), "log_theta": (K,), "num_docs": ()}``: the expected
        topic-word counts $\sum_d w_d \sum_s n_{ds}\phi_{dsk}$ (at word $w_s$), the sums
        $\sum_d w_d E_q[\log\theta_d]$ and $\sum_d w_d$ (``weights`` $w_d$; ``None``: all 1).
        Plain sums: they merge by addition. ``q``: an ``LDAPosterior`` (without ``phi``: the
        optimal one given $\gamma$), or ``ExactPosterior()``."""
        if isinstance(q, ExactPosterior):
            q = self.posterior(x)
        if not isinstance(q, LDAPosterior):
            raise TypeError(f"LDA.sufficient_statistics needs an LDAPosterior, got {q!r}")
        words = self.words(x)
        factors = topic_factors(self.topic_word_concentration)
        elog = dirichlet_expectation(q.gamma.astype(self.dtype))
        n = elog.shape[0]
        w = jnp.ones((n,), self.dtype) if weights is None else weights.astype(self.dtype)
        if q.phi is None:
            terms = optimal_terms(elog, words, factors, w, outputs=("statistics",))
        else:
            terms = explicit_terms(q.phi, elog, words, factors, w, ("statistics",))
        return {
            "topic_word": terms.statistics,
            "log_theta": jnp.sum(w[:, None] * elog, axis=0),
            "num_docs": jnp.sum(w),
        }

    def complete_data_statistics(self, num_data: Any) -> Stats:
        r"""The statistics that ``maximize`` turns back into this model: topic-word counts
        $\lambda - \eta$, $m\,(\psi(\alpha) - \psi(\sum\alpha))$ (the expected
        $\sum_d \log\theta_d$ of $m$ = ``num_data`` documents drawn from $\mathrm{Dir}(\alpha)$)
        and $m$. (With ``learn_eta``, $\eta$ is re-estimated from the counts, not given back.)"""
        m = jnp.asarray(num_data, self.dtype)
        return {
            "topic_word": self.topic_word_concentration - self.eta,
            "log_theta": m * dirichlet_expectation(self.alpha),
            "num_docs": m,
        }

    def maximize(self, stats: Stats, prior: Any = None) -> "LDA":
        r"""$\lambda = \eta + c$ ($c$ = ``stats["topic_word"]``); $\alpha$ by Newton when
        learned; $(\lambda, \eta)$ jointly when $\eta$ is learned (class docstring)."""
        if prior is not None:
            raise TypeError(f"LDA.maximize takes no prior (None), got {prior!r}")
        dtype = self.dtype
        counts = jnp.maximum(stats["topic_word"].astype(dtype), 0)
        log_eta = self.log_eta
        if self.learn_eta:
            log_eta = fit_symmetric_concentration(counts, log_eta)
        log_concentration = jnp.log(jnp.exp(log_eta) + counts)
        log_alpha = self.log_alpha
        if self.learn_alpha:
            log_alpha = _maximize_alpha(stats, self.alpha)
        return eqx.tree_at(
            lambda m: (m.log_concentration, m.log_alpha, m.log_eta),
            self,
            (log_concentration, log_alpha, log_eta),
        )

    # ------------------------------------------------------------ use
    @classmethod
    def initialize(
        cls,
        key: Key,
        x: Any,
        num_topics: int,
        *,
        alpha: Any = None,
        eta: Any = None,
        local_tol: float = 1e-3,
        local_max_iters: int = 100,
    ) -> "LDA":
        r"""A random start for data ``x`` (a count matrix ``(N, V)``, a ``scipy.sparse``
        matrix or ``DocumentTerms``; only $V$ and the dtype are read): $\lambda_{kw} \sim
        \mathrm{Gamma}(100, 1/100)$, as scikit-learn and gensim start.

        - ``alpha``: a number ($\alpha_k$ for all $k$), a ``(K,)`` vector, ``"learn"``
          (start $1/K$ and learn it), or ``None``: $1/K$ (scikit-learn's default).
        - ``eta``: a number, ``"learn"`` (start $1/K$), or ``None``: $1/K$.

        Float counts give a model of their dtype; integer counts the default float.
        To learn $\alpha$ from another start, use the constructor with ``learn_alpha=True``.
        """
        if isinstance(num_topics, bool) or not is_integer(num_topics) or num_topics < 1:
            raise ValueError(f"num_topics must be a positive int, got {num_topics!r}")
        k = int(num_topics)
        if isinstance(x, DocumentTerms):
            v, dtype = x.num_words, canonical_float_dtype(x.counts)
        elif hasattr(x, "tocsr"):
            v, dtype = x.shape[1], canonical_float_dtype(np.zeros((), x.dtype))
        else:
            x = jnp.asarray(x)
            if x.ndim != 2:
                raise ValueError(f"x has shape {x.shape}, expected a document-term matrix (N, V)")
            v, dtype = x.shape[1], canonical_float_dtype(x)
        learn_alpha = isinstance(alpha, str)
        learn_eta = isinstance(eta, str)
        for name, value in (("alpha", alpha), ("eta", eta)):
            if isinstance(value, str) and value != "learn":
                raise ValueError(f"{name} must be a number, 'learn' or None, got {value!r}")
        alpha = 1.0 / k if alpha is None or learn_alpha else alpha
        eta = 1.0 / k if eta is None or learn_eta else eta
        lam = jr.gamma(key, 100.0, (k, v), dtype) / 100.0
        return cls(
            lam,
            alpha,
            eta,
            learn_alpha=learn_alpha,
            learn_eta=learn_eta,
            local_tol=local_tol,
            local_max_iters=local_max_iters,
        )

    def transform(self, x: Data) -> Float[Array, "N K"]:
        r"""The documents' topic proportions $E_q[\theta_d] = \gamma_d / \sum_k\gamma_{dk}$,
        with the local factors fitted from a fresh start (``exact_posterior``)."""
        return _transform(self, prepare_data(self, x))

    def bound(self, x: Data, *, include_topics: bool = True) -> Scalar:
        r"""The ELBO of the documents ``x`` (a lower bound on $\log p(x)$, summed over them):
        $\sum_d \big(E_q[\log p(w_d, \theta_d, z_d \mid \alpha, \beta)] + H[q(\theta_d)] +
        H[q(z_d)]\big)$ with each document's local factors fitted to convergence from a fresh
        start at the model's topics (``exact_posterior``), plus, with ``include_topics``
        (default), the global term $-\sum_k \mathrm{KL}(\mathrm{Dir}(\lambda_k) \,\|\,
        \mathrm{Dir}(\eta))$ — scikit-learn's ``score``. Held-out documents: ``x`` other than
        the training data."""
        total = _document_bound(self, prepare_data(self, x))
        return total + self.global_elbo() if include_topics else total

    def perplexity(self, x: Data, *, include_topics: bool = True) -> Scalar:
        r"""$\exp(-\text{bound}(x) / \sum_{d,s} n_{ds})$: the per-word bound's exponential.
        ``include_topics=True`` (default) is scikit-learn's ``perplexity`` (the global
        $\beta$ term divided by the word count of ``x``); ``False`` counts the documents
        alone (the usual held-out per-word bound). On a small held-out set the topics' term
        dominates the first (30 held-out Lee stories: about 6 nats per word, perplexity near
        $10^6$ against $2.5 \cdot 10^3$ for the documents alone)."""
        x = prepare_data(self, x)
        total = _document_bound(self, x)
        if include_topics:
            total = total + self.global_elbo()
        num_words = jnp.sum(self.words(x).counts)
        return jnp.exp(-total / num_words)


@eqx.filter_jit
def _transform(model: LDA, x: Data) -> Array:
    return model.posterior(x).proportions


@eqx.filter_jit
def _document_bound(model: LDA, x: Data) -> Array:
    return jnp.sum(model.exact_posterior(x)[0])


def _maximize_alpha(stats: Stats, alpha: Array) -> Array:
    r"""$\log\alpha$ maximising $\sum_d E_q[\log\mathrm{Dir}(\theta_d \mid \alpha)]$ from its
    statistics (kept where there are no documents or Newton fails)."""
    from .._newton import fit_dirichlet

    count = stats["num_docs"].astype(alpha.dtype)
    sum_log = stats["log_theta"].astype(alpha.dtype)
    new, info = fit_dirichlet(sum_log, count, alpha)
    keep = (count <= 0) | info.failed | ~jnp.all(jnp.isfinite(new) & (new > 0))
    return jnp.log(jnp.where(keep, alpha, new))


def fit_symmetric_concentration(counts: Float[Array, "K V"], log_eta: Array, max_steps: int = 50):
    r"""$\log\eta$ maximising the Polya log-likelihood of the rows of ``counts`` with a
    symmetric concentration, $G(\eta) = \sum_k [\log\Gamma(V\eta) - \log\Gamma(V\eta + C_k) +
    \sum_w (\log\Gamma(\eta + c_{kw}) - \log\Gamma(\eta))]$, from ``log_eta``.

    Newton steps in $u = \log\eta$ where $G$ is locally concave, unit steps uphill where it
    is convex, within a trust radius (2 at most, halved after a failed step), each taken if it
    does not lower $G$ beyond rounding; otherwise Minka's fixed-point step
    $\eta \leftarrow \eta\,\frac{\sum_{kw}[\psi(\eta + c_{kw}) - \psi(\eta)]}
    {V\sum_k[\psi(V\eta + C_k) - \psi(V\eta)]}$, which never lowers $G$. Stops after a Newton
    step below $\sqrt{\epsilon}$, a step at rounding level, or ``max_steps``; $\eta$ stays in
    ``ETA_RANGE``. Without counts, $\eta$ is kept."""
    dtype = counts.dtype
    k, v = counts.shape
    totals = jnp.sum(counts, axis=1)
    low, high = (math.log(b) for b in ETA_RANGE)
    eps = float(jnp.finfo(dtype).eps)

    def value(u):
        eta = jnp.exp(u)
        rows = jss.gammaln(v * eta) - jss.gammaln(v * eta + totals)
        return jnp.sum(rows) + jnp.sum(jss.gammaln(eta + counts) - jss.gammaln(eta))

    def derivatives(u):
        eta = jnp.exp(u)
        d1 = v * jnp.sum(jss.digamma(v * eta) - jss.digamma(v * eta + totals))
        n1 = jnp.sum(jss.digamma(eta + counts) - jss.digamma(eta))
        trigamma = lambda t: jss.polygamma(1, t)
        d2 = v * v * jnp.sum(trigamma(v * eta) - trigamma(v * eta + totals))
        n2 = jnp.sum(trigamma(eta + counts) - trigamma(eta))
        first = eta * (d1 + n1)
        second = first + eta * eta * (d2 + n2)
        fixed = u + jnp.log(jnp.maximum(n1, 0) / jnp.maximum(-d1, jnp.finfo(dtype).tiny))
        return first, second, fixed

    def body(carry):
        u, i, _, radius = carry
        first, second, fixed = derivatives(u)
        # Where G is concave in u a Newton step; where it is convex (G is unimodal, so
        # past the optimum's concave region) a unit step uphill.
        concave = second < 0
        step = jnp.where(concave, -first / jnp.where(concave, second, -1), jnp.sign(first))
        step = jnp.clip(step, -radius, radius)
        trial = jnp.clip(u + step, low, high)
        g_now, g_new = value(u), value(trial)
        slack = 16 * eps * (jnp.abs(g_now) + jnp.abs(g_new) + 1)
        take = jnp.isfinite(g_new) & (g_new >= g_now - slack)
        fixed = jnp.clip(jnp.where(jnp.isfinite(fixed), fixed, u), low, high)
        new = jnp.where(take, trial, fixed)
        change = jnp.abs(new - u)
        # A Newton step below sqrt(eps) leaves the optimum at rounding level; a fixed-point
        # step may be small far from it, so only a step at rounding level stops.
        newton = take & concave
        moving = jnp.where(newton, change > math.sqrt(eps), change > 4 * eps * (1 + jnp.abs(u)))
        # A trust radius: halved after a step that failed, doubled (up to 2) after one taken.
        radius = jnp.where(take, jnp.minimum(2 * radius, 2.0), jnp.abs(step) / 2)
        return new, i + 1, moving, radius

    def cond(carry):
        _, i, moving, _ = carry
        return moving & (i < max_steps)

    start = (
        log_eta.astype(dtype),
        jnp.zeros((), jnp.int32),
        jnp.array(True),
        jnp.asarray(2.0, dtype),
    )
    u, _, _, _ = jax.lax.while_loop(cond, body, start)
    return jnp.where(jnp.sum(totals) > 0, u, log_eta)
