r"""Mean-field inference for latent Dirichlet allocation (``LDA``): the two data forms, the
documents' latent space, the per-document coordinate ascent and the family ``LDAPosterior``.

For one document $d$ with word counts $n_{ds}$ in its slots $s$ (one slot per word type:
every column of a dense row, or every entry of a ``DocumentTerms`` row) and the global
factor $q(\beta_k) = \mathrm{Dir}(\lambda_k)$, the local factors are
$q(\theta_d) = \mathrm{Dir}(\gamma_d)$ and $q(z_{ds}) = \mathrm{Cat}(\phi_{ds})$ (shared by
the $n_{ds}$ copies of the word). With $E\log\theta_{dk} = \psi(\gamma_{dk}) -
\psi(\sum_j\gamma_{dj})$ and $E\log\beta_{kw} = \psi(\lambda_{kw}) - \psi(\sum_v\lambda_{kv})$
the coordinate updates are

$$\phi_{dsk} \propto \exp(E\log\theta_{dk} + E\log\beta_{k w_s}),\qquad
  \gamma_{dk} = \alpha_k + \textstyle\sum_s n_{ds}\phi_{dsk}.$$

They are computed as products, $\phi_{dsk} = a_{dk} b_{sk} / \nu_{ds}$ with
$a_{dk} = \exp(E\log\theta_{dk} - \max_j E\log\theta_{dj})$, $b_{sk} = \exp(E\log\beta_{kw_s}
- \max_j E\log\beta_{jw_s})$ and $\nu_{ds} = \sum_k a_{dk} b_{sk}$ (matrix products; no
$(N, V, K)$ array for dense data, one exp per entry of $a$ and $b$). Both factors lie in
$(0, 1]$ with a 1 in every row, but their product can still underflow when a document
rules out every topic that likes one of its words; where some $\nu_{ds}$ falls below
``tiny / eps`` (flushed terms could then matter) the whole batch is recomputed in log
space ($\log\nu$ by ``logsumexp`` over the topics), so float32 gives the right answer.
"""

from typing import Any, NamedTuple, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np

from .._custom_types import Array, Float, Int, PerDatum
from .._latent import AbstractLatent
from .._q import AbstractQ, num_data

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- data
@final
class DocumentTerms(eqx.Module):
    r"""Documents as padded lists of (word id, count) pairs: the sparse form of a document-term
    matrix, so that a large vocabulary needs no dense rows.

    - ``word_ids``: ``(N, L)`` integers in ``[0, num_words)``;
    - ``counts``: ``(N, L)`` nonnegative counts or real weights (any integer or float
      dtype); a padding slot has count 0 (its word id is any valid id);
    - ``num_words``: the vocabulary size $V$ (static).

    Both leaves have the document axis first, so elbo_jax chunks, pads and minibatches them
    like any data. ``LDA`` gives the same numbers on this form as on the dense matrix.

    ```python
    docs = ej.models.DocumentTerms.from_matrix(scipy_csr)   # or a dense (N, V) array
    res = ej.fit(ej.models.LDA.initialize(key, docs, 20), docs)
    ```
    """

    word_ids: Int[Array, "N L"]
    counts: Array
    num_words: int = eqx.field(static=True)

    @classmethod
    def from_matrix(cls, matrix: Any, *, num_words: int | None = None) -> "DocumentTerms":
        """The padded form of a document-term matrix ``(N, V)``: a dense array (NumPy, JAX,
        nested lists) or a ``scipy.sparse`` matrix or array (converted to CSR). Each row keeps
        its nonzero entries in column order, padded with count-0 slots to the longest row
        ($L \\ge 1$). ``num_words`` defaults to ``V``. Integer counts stay integers (int32),
        float counts keep a float dtype; values are checked when the data meet a model."""
        if hasattr(matrix, "tocsr"):
            csr = matrix.tocsr()
            csr.sum_duplicates()
            n, v = csr.shape
            indptr = np.asarray(csr.indptr, np.int64)
            cols, values = np.asarray(csr.indices), np.asarray(csr.data)
        else:
            dense = np.asarray(matrix)
            if dense.ndim != 2:
                raise ValueError(
                    f"matrix has shape {dense.shape}, expected a document-term matrix (N, V)"
                )
            n, v = dense.shape
            rows, cols = np.nonzero(dense)
            values = dense[rows, cols]
            indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        if np.dtype(values.dtype).kind not in "biuf":
            raise TypeError(f"matrix must hold numbers, got dtype {values.dtype}")
        num_words = v if num_words is None else num_words
        lengths = np.diff(indptr)
        width = max(1, int(lengths.max(initial=0)))
        rows = np.repeat(np.arange(n), lengths)
        slots = np.arange(len(cols)) - indptr[rows]
        float_counts = np.dtype(values.dtype).kind == "f"
        dtype = jax.dtypes.canonicalize_dtype(values.dtype) if float_counts else np.int32
        word_ids = np.zeros((n, width), np.int32)
        counts = np.zeros((n, width), dtype)
        word_ids[rows, slots] = cols
        counts[rows, slots] = values
        return cls(jnp.asarray(word_ids), jnp.asarray(counts), int(num_words))

    def to_dense(self) -> Array:
        """The dense ``(N, V)`` matrix (in the counts' dtype)."""
        n = self.word_ids.shape[0]
        rows = jnp.broadcast_to(jnp.arange(n)[:, None], self.word_ids.shape)
        out = jnp.zeros((n, self.num_words), self.counts.dtype)
        return out.at[rows, self.word_ids].add(self.counts)


# --------------------------------------------------------------------------- latent space
@final
class Topics(AbstractLatent):
    r"""LDA's latent variables for one document: its topic proportions $\theta \in \Delta^{K-1}$
    and one topic per word slot, $z = (\theta, t)$ with ``t`` integers in ``[0, K)`` of the
    slots' shape. Inference is the model's own (mean-field coordinate ascent, ``LDAPosterior``)."""

    num_topics: int = eqx.field(static=True)

    def __check_init__(self):
        if isinstance(self.num_topics, bool) or not isinstance(self.num_topics, int):
            raise TypeError(f"Topics(num_topics) needs an int, got {self.num_topics!r}")
        if self.num_topics < 1:
            raise ValueError(f"Topics(num_topics) needs num_topics >= 1, got {self.num_topics}")

    def value_struct(self, datum: Any, dtype: Any) -> Any:
        slots = datum.word_ids.shape if isinstance(datum, DocumentTerms) else datum.shape
        int_dtype = jax.dtypes.canonicalize_dtype(np.int64)
        return (
            jax.ShapeDtypeStruct((self.num_topics,), dtype),
            jax.ShapeDtypeStruct(tuple(slots), int_dtype),
        )


# --------------------------------------------------------------------------- the maths
def dirichlet_expectation(concentration: Array) -> Array:
    r"""$E[\log p_k] = \psi(c_k) - \psi(\sum_j c_j)$ for $p \sim \mathrm{Dir}(c)$, over the last axis."""
    return jss.digamma(concentration) - jss.digamma(jnp.sum(concentration, -1, keepdims=True))


def dirichlet_elbo(gamma: Array, elog: Array, alpha: Array) -> Array:
    r"""$E_{q}[\log \mathrm{Dir}(\theta \mid \alpha)] + H[\mathrm{Dir}(\gamma)]$ for each row of
    ``gamma`` (``elog`` its ``dirichlet_expectation``); exactly 0 where $\gamma = \alpha$."""
    alpha = jnp.broadcast_to(alpha, gamma.shape)
    total = jss.gammaln(jnp.sum(alpha, -1)) - jss.gammaln(jnp.sum(gamma, -1))
    return total + jnp.sum(jss.gammaln(gamma) - jss.gammaln(alpha) + (alpha - gamma) * elog, -1)


def log_dirichlet_prior(elog: Array, alpha: Array) -> Array:
    r"""$E_q[\log \mathrm{Dir}(\theta \mid \alpha)]$ per row, from $E\log\theta$ = ``elog``."""
    norm = jss.gammaln(jnp.sum(alpha)) - jnp.sum(jss.gammaln(alpha))
    return norm + jnp.sum((alpha[None, :] - 1) * elog, -1)


class TopicFactors(NamedTuple):
    """The global factor's per-word quantities, ``(V, K)`` tables (see the module docstring)."""

    log_beta: Array  # E[log beta_kw], transposed: (V, K)
    shift: Array  # max_k E[log beta_kw]: (V,)
    scaled: Array  # b = exp(E[log beta] - shift): (V, K)


def topic_factors(concentration: Float[Array, "K V"]) -> TopicFactors:
    log_beta = dirichlet_expectation(concentration).T
    shift = jnp.max(log_beta, axis=1)
    return TopicFactors(log_beta, shift, jnp.exp(log_beta - shift[:, None]))


class Words(NamedTuple):
    """A batch of documents as slots: ``counts`` ``(N, S)`` in the model's dtype and the
    slots' word ids ``(N, S)`` (``None`` for dense rows: slot = word)."""

    counts: Array
    ids: Array | None

    def take(self, table: Array) -> Array:
        """A per-word table ``(V, ...)`` at the slots: itself for dense rows (shared by all
        documents), else ``(N, S, ...)``."""
        return table if self.ids is None else table[self.ids]

    def take_per_document(self, table: Array) -> Array:
        """``take``, with a leading document axis of length 1 for dense rows."""
        return table[None] if self.ids is None else table[self.ids]


def as_words(x: Any, dtype: Any) -> Words:
    if isinstance(x, DocumentTerms):
        return Words(jnp.asarray(x.counts).astype(dtype), jnp.asarray(x.word_ids))
    return Words(jnp.asarray(x).astype(dtype), None)


def _over_topics(a: Array, b: Array) -> Array:
    """$\\sum_k a_{dk} b_{[d]sk}$, ``(N, S)``."""
    if b.ndim == 2:
        return jnp.matmul(a, b.T, precision=_HIGHEST)
    return jnp.einsum("nk,nsk->ns", a, b, precision=_HIGHEST)


def _over_slots(r: Array, b: Array) -> Array:
    """$\\sum_s r_{ds} b_{[d]sk}$, ``(N, K)``."""
    if b.ndim == 2:
        return jnp.matmul(r, b, precision=_HIGHEST)
    return jnp.einsum("ns,nsk->nk", r, b, precision=_HIGHEST)


def _scatter_words(words: Words, per_slot: Array, num_words: int) -> Array:
    """``(K, V)``: the per-slot values ``(N, S, K)`` summed into their words."""
    if words.ids is None:
        return jnp.sum(per_slot, axis=0).T
    k = per_slot.shape[-1]
    out = jnp.zeros((num_words, k), per_slot.dtype)
    return out.at[words.ids.reshape(-1)].add(per_slot.reshape(-1, k)).T


class WordTerms(NamedTuple):
    """What one pass over the words gives, per document (``None`` where not asked for)."""

    topic_counts: Array | None  # sum_s n_s phi_sk: (N, K)
    log_norm: Array | None  # sum_s n_s log nu_s (the optimal phi's E[..] + H): (N,)
    beta_term: Array | None  # sum_s n_s sum_k phi_sk E[log beta_k w_s]: (N,)
    entropy: Array | None  # -sum_s n_s sum_k phi_sk log phi_sk: (N,)
    statistics: Array | None  # sum_d w_d n_ds phi_dsk scattered to words: (K, V)


def _need(outputs: tuple, name: str, fn):
    return fn() if name in outputs else None


def explicit_terms(
    phi: Array,
    elog: Array,
    words: Words,
    factors: TopicFactors,
    weights: Array | None,
    outputs: tuple,
    log_phi: Array | None = None,
) -> WordTerms:
    """``WordTerms`` of an explicit $\\phi$ ``(N, S, K)`` (``log_phi``: its log, if known)."""
    n = words.counts
    weighted = n[..., None] * phi
    log_beta = words.take_per_document(factors.log_beta)

    def entropy():
        lp = jnp.log(jnp.where(phi > 0, phi, 1)) if log_phi is None else log_phi
        return -jnp.sum(jnp.where(phi > 0, weighted * lp, 0), axis=(1, 2))

    def statistics():
        w = weighted if weights is None else weighted * weights.astype(phi.dtype)[:, None, None]
        return _scatter_words(words, w, factors.log_beta.shape[0])

    return WordTerms(
        topic_counts=_need(outputs, "topic_counts", lambda: jnp.sum(weighted, axis=1)),
        log_norm=None,
        beta_term=_need(outputs, "beta_term", lambda: jnp.sum(weighted * log_beta, axis=(1, 2))),
        entropy=_need(outputs, "entropy", entropy),
        statistics=_need(outputs, "statistics", statistics),
    )


def optimal_terms(
    elog: Array,
    words: Words,
    factors: TopicFactors,
    weights: Array | None = None,
    outputs: tuple = ("topic_counts",),
    scaled: Array | None = None,
) -> WordTerms:
    r"""``WordTerms`` of the optimal $\phi$ given $E\log\theta$ = ``elog`` ``(N, K)`` and the
    topics: by products, or in log space where they would underflow (module docstring).
    ``scaled``: ``words.take(factors.scaled)`` already gathered."""
    n = words.counts
    dtype = n.dtype
    b = words.take(factors.scaled) if scaled is None else scaled
    top = jnp.max(elog, axis=1, keepdims=True)
    a = jnp.exp(elog - top)
    nu = _over_topics(a, b)
    floor = jnp.finfo(dtype).tiny / jnp.finfo(dtype).eps
    present = n > 0
    bad = jnp.any(present & ~(nu >= floor))

    def products():
        ratio = jnp.where(present, n / jnp.where(present, nu, 1), 0)
        shift = words.take(factors.shift)
        shift = jnp.broadcast_to(shift, n.shape)

        def log_norm():
            log_nu = jnp.log(jnp.where(present, nu, 1))
            return jnp.sum(jnp.where(present, n * (log_nu + top + shift), 0), axis=1)

        def beta_term():
            return jnp.sum(a * _over_slots(ratio, b * words.take(factors.log_beta)), axis=1)

        def entropy():  # H = log nu-sum - E[log theta]-part - E[log beta]-part
            tc = a * _over_slots(ratio, b)
            return log_norm() - jnp.sum(elog * tc, axis=1) - beta_term()

        def statistics():
            r = ratio if weights is None else ratio * weights.astype(dtype)[:, None]
            if words.ids is None:
                return jnp.matmul(a.T, r, precision=_HIGHEST) * b.T
            per_slot = a[:, None, :] * r[:, :, None] * b
            return _scatter_words(words, per_slot, factors.log_beta.shape[0])

        return WordTerms(
            topic_counts=_need(outputs, "topic_counts", lambda: a * _over_slots(ratio, b)),
            log_norm=_need(outputs, "log_norm", log_norm),
            beta_term=_need(outputs, "beta_term", beta_term),
            entropy=_need(outputs, "entropy", entropy),
            statistics=_need(outputs, "statistics", statistics),
        )

    def log_space():
        logits = elog[:, None, :] + words.take_per_document(factors.log_beta)
        log_nu = jax.nn.logsumexp(logits, axis=-1)
        log_phi = logits - log_nu[..., None]
        phi = jnp.exp(log_phi)
        terms = explicit_terms(phi, elog, words, factors, weights, outputs, log_phi)
        log_norm = _need(
            outputs, "log_norm", lambda: jnp.sum(jnp.where(present, n * log_nu, 0), axis=1)
        )
        return terms._replace(log_norm=log_norm)

    return jax.lax.cond(bad, log_space, products)


# Documents whose coordinate ascent has converged are dropped from the batch in stages: the
# batch shrinks by STAGE_FACTOR (moving documents first) each time at most that fraction of
# it is still moving, down to about MIN_STAGE_SIZE documents. A batch-wide loop would run
# every document for as many sweeps as the slowest needs (often 100 against a median of
# 20). Measured on 10,000 documents (V = 2,000, K = 20, 2 CPU cores): online passes in
# minibatches of 256 took 0.35 s with (8, 4) against 0.75 s with (64, 2), batch iterations
# the same, compile time the same (fewer stages).
MIN_STAGE_SIZE = 8
STAGE_FACTOR = 4


def _stage_sizes(n: int) -> list[int]:
    sizes = [n]
    while sizes[-1] > STAGE_FACTOR * MIN_STAGE_SIZE:
        sizes.append(-(-sizes[-1] // STAGE_FACTOR))
    return sizes


def fit_local(
    gamma: Array,
    alpha: Array,
    words: Words,
    factors: TopicFactors,
    *,
    tol: float,
    max_iters: int,
) -> Array:
    r"""Coordinate ascent on the documents' local factors from $\gamma$ = ``gamma`` ``(N, K)``:
    $\phi \leftarrow \phi^*(\gamma)$, $\gamma \leftarrow \alpha + \sum_s n_s \phi_s$, until
    a document's mean absolute change of $\gamma$ is below ``tol`` (or the rounding of its
    largest entry, ``16 eps max_k gamma_dk``), for at most ``max_iters`` sweeps. Documents
    are swept together; those that have converged leave the batch in stages
    (``MIN_STAGE_SIZE``, ``STAGE_FACTOR``), so the cost follows the documents' own numbers of
    sweeps, as in a loop over documents. Each sweep lowers F; returns the last $\gamma$ (its $\phi$ is
    $\phi^*(\gamma)$)."""
    dtype = gamma.dtype
    eps = float(jnp.finfo(dtype).eps)
    n = gamma.shape[0]
    # Per-document inputs: the counts and, for DocumentTerms, the topic factors at the slots.
    per_doc = (words.counts, words.ids, None if words.ids is None else words.take(factors.scaled))

    def sweep(gamma, inputs):
        counts, ids, scaled = inputs
        sub = Words(counts, ids)
        if scaled is None:
            scaled = sub.take(factors.scaled)
        elog = dirichlet_expectation(gamma)
        topic_counts = optimal_terms(elog, sub, factors, scaled=scaled).topic_counts
        new = alpha[None, :] + topic_counts
        change = jnp.mean(jnp.abs(new - gamma), axis=1)
        return new, change > jnp.maximum(tol, 16 * eps * jnp.max(new, axis=1))

    sizes = _stage_sizes(n)
    index = jnp.arange(n)
    current, inputs = gamma, per_doc
    moving = jnp.ones((n,), bool)
    i = jnp.zeros((), jnp.int32)
    for stage, size in enumerate(sizes):
        if stage > 0:
            # The moving documents first (at most `size` of them): the rest have converged.
            keep = jnp.argsort(~moving, stable=True)[:size]
            index, current, moving = index[keep], current[keep], moving[keep]
            inputs = jax.tree_util.tree_map(lambda a, keep=keep: a[keep], inputs)
        limit = sizes[stage + 1] if stage + 1 < len(sizes) else 0

        def cond(carry, limit=limit):
            _, moving, i = carry
            return (jnp.sum(moving) > limit) & (i < max_iters)

        def body(carry, inputs=inputs):
            current, moving, i = carry
            new, new_moving = sweep(current, inputs)
            return new, new_moving, i + 1

        current, moving, i = jax.lax.while_loop(cond, body, (current, moving, i))
        gamma = gamma.at[index].set(current)
    return gamma


def initial_gamma(alpha: Array, words: Words) -> Array:
    r"""$\gamma_{dk} = \alpha_k + n_d / K$: the document's words spread evenly over the topics."""
    k = alpha.shape[0]
    doc_lengths = jnp.sum(words.counts, axis=1)
    return alpha[None, :] + (doc_lengths / k)[:, None]


def _document_elbo(gamma: Array, alpha: Array, words: Words, factors: TopicFactors) -> Array:
    r"""Each document's ELBO at $\gamma$ and the optimal $\phi$ given it, ``(N,)``:
    $E_q[\log p(\theta \mid \alpha)] + H[q(\theta)] + \sum_s n_s \log\nu_s$."""
    elog = dirichlet_expectation(gamma)
    log_norm = optimal_terms(elog, words, factors, outputs=("log_norm",)).log_norm
    return dirichlet_elbo(gamma, elog, alpha) + log_norm


# --------------------------------------------------------------------------- q family
def _check_topics(q: AbstractQ, latent: AbstractLatent) -> Topics:
    if not isinstance(latent, Topics):
        raise TypeError(
            f"q={type(q).__name__} is LDA's mean-field family (a Topics latent), but the "
            f"model's latent space is {latent!r}"
        )
    return latent


@final
class LDAPosterior(AbstractQ):
    r"""LDA's mean-field family: $q(\theta_d) = \mathrm{Dir}(\gamma_d)$ and, for each word
    slot, $q(z_{ds}) = \mathrm{Cat}(\phi_{ds})$.

    - ``gamma``: $\gamma$ ``(N, K)``.
    - ``phi``: an explicit $\phi$ ``(N, S, K)`` over the data's slots (dense rows: $S = V$;
      ``DocumentTerms``: $S = L$), or ``None`` (the default and what every update returns):
      then $\phi$ is the optimal one given $\gamma$ and the model's topics,
      $\phi_{dsk} \propto \exp(E\log\theta_{dk} + E\log\beta_{kw_s})$, never stored.
    - ``tol``, ``max_iters`` (static): the coordinate ascent of ``exact_update`` stops when
      every document's mean absolute change of $\gamma$ is below ``tol`` (default ``1e-3``,
      scikit-learn's ``mean_change_tol``, here required of all documents at once) or after
      ``max_iters`` sweeps (default 100, scikit-learn's ``max_doc_update_iter``).

    ``initialize`` sets $\gamma_{dk} = \alpha_k + n_d / K$ (deterministic); ``exact_update``
    runs the coordinate ascent from that start and then keeps, document by document, the
    current $\gamma$ where it has the higher ELBO under the new topics, so batch VB never
    raises F. (A plain warm start also never raises F, but it stays in the poor local
    optima that the near-uniform topics of the first iterations leave: on a 4,000-document
    corpus drawn from a 20-topic LDA it ended 20 iterations at F = 589.5 against 527.2 from
    restarts.) ``resolve(model, x)`` computes the per-document
    $E_q[\log p(w, z \mid \theta, \beta)]$ and $H[q(z)]$ for ``expected_log_joint`` and
    ``entropy`` (they then belong to that model and data).

    ```python
    res = ej.fit(lda, counts)                       # q = lda.default_q(): LDAPosterior()
    res.q.gamma                                     # (N, K)
    ```
    """

    gamma: Float[Array, "N K"] | None = None
    phi: Float[Array, "N S K"] | None = None
    # Per-document E_q[log p(z | theta) + log p(w | z, beta)] and H[q(z)], filled by
    # resolve(model, x). Internal.
    expected_words: Float[Array, " N"] | None = eqx.field(default=None, repr=False)
    word_entropy: Float[Array, " N"] | None = eqx.field(default=None, repr=False)
    tol: float = eqx.field(static=True, default=1e-3)
    max_iters: int = eqx.field(static=True, default=100)

    def __check_init__(self):
        tol_ok = isinstance(self.tol, (int, float)) and not isinstance(self.tol, bool)
        if not (tol_ok and np.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if (
            isinstance(self.max_iters, bool)
            or not isinstance(self.max_iters, int)
            or self.max_iters < 1
        ):
            raise ValueError(f"max_iters must be a positive int, got {self.max_iters!r}")

    @property
    def is_realised(self) -> bool:
        return self.gamma is not None

    @property
    def proportions(self) -> Array:
        r"""$E_q[\theta_d] = \gamma_d / \sum_k \gamma_{dk}$, ``(N, K)``."""
        return self.gamma / jnp.sum(self.gamma, axis=1, keepdims=True)

    def _fresh(self, gamma: Array) -> "LDAPosterior":
        return LDAPosterior(gamma, tol=self.tol, max_iters=self.max_iters)

    def initialize(self, model, x, *, key=None):
        latent = _check_topics(self, model.latent)
        if self.gamma is not None:
            self.check(latent, num_data(x))
            return self
        return self._fresh(initial_gamma(model.alpha, model.words(x)))

    def exact_update(self, model, x, *, table=None):
        del table
        words = model.words(x)
        factors = topic_factors(model.topic_word_concentration)
        alpha = model.alpha
        gamma = fit_local(
            initial_gamma(alpha, words),
            alpha,
            words,
            factors,
            tol=self.tol,
            max_iters=self.max_iters,
        )
        if self.gamma is None:
            return self._fresh(gamma)
        # Keep a document's previous factors where they are better under the new topics:
        # F then never rises, and a restart escapes the basins that the near-uniform
        # topics of the first iterations leave behind (a warm start stays in them).
        self.check(model.latent, num_data(x))
        previous = self.gamma.astype(gamma.dtype)
        better = _document_elbo(previous, alpha, words, factors) > _document_elbo(
            gamma, alpha, words, factors
        )
        return self._fresh(jnp.where(better[:, None], previous, gamma))

    def resolve(self, model, x):
        if self.expected_words is not None:
            return self
        words = model.words(x)
        factors = topic_factors(model.topic_word_concentration)
        elog = dirichlet_expectation(self.gamma.astype(model.dtype))
        if self.phi is not None:
            phi = self.phi.astype(model.dtype)
            outputs = ("topic_counts", "beta_term", "entropy")
            terms = explicit_terms(phi, elog, words, factors, None, outputs)
            entropy = terms.entropy
        else:
            outputs = ("topic_counts", "beta_term", "log_norm")
            terms = optimal_terms(elog, words, factors, outputs=outputs)
        expected = jnp.sum(elog * terms.topic_counts, axis=1) + terms.beta_term
        if self.phi is None:
            entropy = terms.log_norm - expected
        return eqx.tree_at(
            lambda q: (q.expected_words, q.word_entropy),
            self,
            (expected, entropy),
            is_leaf=lambda v: v is None,
        )

    def expected_log_joint(self, model, x, *, key=None, table=None) -> PerDatum:
        q = self.resolve(model, x)
        elog = dirichlet_expectation(q.gamma.astype(model.dtype))
        return log_dirichlet_prior(elog, model.alpha) + q.expected_words

    def entropy(self) -> PerDatum:
        if self.word_entropy is None:
            raise TypeError("LDAPosterior.entropy needs the words: call q.resolve(model, x) first")
        gamma = self.gamma.astype(self.word_entropy.dtype)
        elog = dirichlet_expectation(gamma)
        dirichlet_entropy = (
            jss.gammaln(gamma).sum(1)
            - jss.gammaln(gamma.sum(1))
            - jnp.sum((gamma - 1) * elog, axis=1)
        )
        return dirichlet_entropy + self.word_entropy

    def check(self, latent, n):
        latent = _check_topics(self, latent)
        k = latent.num_topics
        if self.gamma is not None and tuple(self.gamma.shape) != (n, k):
            raise ValueError(
                f"LDAPosterior gamma has shape {tuple(self.gamma.shape)}, expected (N, K) = "
                f"{(n, k)}"
            )
        if self.phi is not None and (
            self.phi.ndim != 3 or self.phi.shape[0] != n or self.phi.shape[2] != k
        ):
            raise ValueError(
                f"LDAPosterior phi has shape {tuple(self.phi.shape)}, expected (N, S, K) with "
                f"N={n}, K={k} and S the slots of a document (V for dense rows, L for "
                "DocumentTerms)"
            )
