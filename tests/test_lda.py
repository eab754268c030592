"""LDA by mean-field variational EM: F against an independent NumPy ELBO (dense and sparse
forms, float32 and float64), the coordinate updates as exact minimisers, batch VB never
raising F, held-out perplexity against scikit-learn, online VB as stepwise EM, learning
alpha, and the input errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.sparse
from scipy.special import digamma, gammaln, logsumexp

import elbo_jax as ej
from elbo_jax.models._lda import LDA, fit_symmetric_concentration
from elbo_jax.models._lda_inference import (
    DocumentTerms,
    LDAPosterior,
    fit_local,
    topic_factors,
)

K, V = 4, 40
ALPHA, ETA = 0.3, 0.1


# ----------------------------------------------------------------------------- helpers
def sample_corpus(seed, n, *, alpha=ALPHA, beta=None, mean_length=60):
    """``n`` documents ``(n, V)`` drawn from LDA: topics ``beta`` (default: Dir(0.1) draws
    from a fixed seed, the same for every call), theta ~ Dir(alpha), lengths ~ Poisson."""
    rng = np.random.default_rng(seed)
    if beta is None:
        beta = np.random.default_rng(123).dirichlet(np.full(V, 0.1), size=K)
    alpha = np.broadcast_to(np.asarray(alpha, float), (beta.shape[0],))
    theta = rng.dirichlet(alpha, size=n)
    lengths = rng.poisson(mean_length, n)
    return np.stack([rng.multinomial(m, t @ beta) for m, t in zip(lengths, theta, strict=True)])


def elbo_np(x, gamma, phi, lam, alpha, eta):
    """The LDA ELBO of Blei, Ng & Jordan (2003, appendix A.3) with the smoothed topic prior,
    word type by word type: x (N, V) counts (or real weights: the bound is linear in them),
    phi (N, V, K) per word type (shared by its tokens)."""
    x, gamma, phi, lam = (np.asarray(a, np.float64) for a in (x, gamma, phi, lam))
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (lam.shape[0],))
    k, v = lam.shape
    elog_theta = digamma(gamma) - digamma(gamma.sum(1, keepdims=True))
    elog_beta = digamma(lam) - digamma(lam.sum(1, keepdims=True))
    total = 0.0
    for d in range(x.shape[0]):
        total += gammaln(alpha.sum()) - gammaln(alpha).sum() + ((alpha - 1) * elog_theta[d]).sum()
        total -= gammaln(gamma[d].sum()) - gammaln(gamma[d]).sum()
        total -= ((gamma[d] - 1) * elog_theta[d]).sum()
        for w in range(v):  # the x[d, w] tokens of word w share phi[d, w]; x may be real
            p = phi[d, w]
            token = p @ elog_theta[d] + p @ elog_beta[:, w] - np.sum(p[p > 0] * np.log(p[p > 0]))
            total += x[d, w] * token
    total += k * (gammaln(v * eta) - v * gammaln(eta)) + (eta - 1) * elog_beta.sum()
    for kk in range(k):
        total -= gammaln(lam[kk].sum()) - gammaln(lam[kk]).sum()
        total -= ((lam[kk] - 1) * elog_beta[kk]).sum()
    return total


def optimal_phi_np(gamma, lam):
    """phi*_dwk ∝ exp(E log theta_dk + E log beta_kw), (N, V, K), in log space."""
    elog_theta = digamma(gamma) - digamma(gamma.sum(1, keepdims=True))
    elog_beta = digamma(lam) - digamma(lam.sum(1, keepdims=True))
    logits = elog_theta[:, None, :] + elog_beta.T[None, :, :]
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))


def sparse_phi(docs, phi_dense, rng):
    """The dense phi at each slot of ``docs``; padding slots get random rows (count 0)."""
    ids = np.asarray(docs.word_ids)
    phi = phi_dense[np.arange(ids.shape[0])[:, None], ids]
    pad = np.asarray(docs.counts) == 0
    return np.where(pad[..., None], rng.dirichlet(np.ones(phi.shape[-1]), pad.shape), phi)


def small_problem(seed=0, n=6, v=8, k=3):
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, (n, v))
    x[2] = 0  # a document with no words
    lam = rng.gamma(2.0, 1.0, (k, v)) + 0.05
    alpha = rng.uniform(0.2, 1.0, k)
    gamma = rng.gamma(2.0, 2.0, (n, k)) + 0.1
    phi = rng.dirichlet(np.ones(k), (n, v))
    return x, lam, alpha, 0.3, gamma, phi


@eqx.filter_jit
def _free_energy(model, q, x):
    return ej.free_energy(model, q, x)


def matched(fitted, beta):
    """The permutation of the fitted topics that best matches the true ones."""
    _, cols = scipy.optimize.linear_sum_assignment(-np.asarray(beta) @ np.asarray(fitted).T)
    return cols


# ----------------------------------------------------------------------------- 1. F
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_free_energy_equals_numpy_elbo(dtype):
    x, lam, alpha, eta, gamma, phi = small_problem()
    n = x.shape[0]
    want = -elbo_np(x, gamma, phi, lam, alpha, eta) / n
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    model = LDA(lam.astype(dtype), alpha.astype(dtype), eta)
    q = LDAPosterior(jnp.asarray(gamma, dtype), jnp.asarray(phi, dtype))
    got = ej.free_energy(model, q, x)
    assert got.dtype == dtype
    np.testing.assert_allclose(float(got), want, rtol=rtol)
    # The sparse form, from a scipy CSR matrix, with float counts.
    docs = DocumentTerms.from_matrix(scipy.sparse.csr_matrix(x.astype(dtype)))
    q_sparse = LDAPosterior(
        jnp.asarray(gamma, dtype),
        jnp.asarray(sparse_phi(docs, phi, np.random.default_rng(1)), dtype),
    )
    np.testing.assert_allclose(float(ej.free_energy(model, q_sparse, docs)), want, rtol=rtol)
    # Without an explicit phi: the optimal one given gamma, in both forms.
    phi_star = optimal_phi_np(gamma, lam)
    want_star = -elbo_np(x, gamma, phi_star, lam, alpha, eta) / n
    for data in (x, docs):
        got = ej.free_energy(model, LDAPosterior(jnp.asarray(gamma, dtype)), data)
        np.testing.assert_allclose(float(got), want_star, rtol=rtol)
    # Real weights (tf-idf, say) in place of counts: the same bound, linear in them.
    weights = (x * np.random.default_rng(2).uniform(0.1, 1.9, x.shape)).astype(dtype)
    want_weighted = -elbo_np(weights, gamma, phi, lam, alpha, eta) / n
    np.testing.assert_allclose(float(ej.free_energy(model, q, weights)), want_weighted, rtol=rtol)


def test_float32_underflowing_products_fall_back_to_log_space():
    # A document that rules out (gamma ~ 1e-3) the only topic that likes its word, and a
    # topic it uses that has (lambda ~ 1e-3) never seen the word: exp(E log theta) and
    # exp(E log beta) underflow together, in float32 and float64 alike.
    lam = np.array([[5e2, 1e-3, 5e2], [1e-3, 5e2, 5e2]])
    gamma = np.array([[1e-3, 4e2], [3e2, 1e-3]])
    x = np.array([[0, 3, 1], [2, 0, 1]])
    alpha = np.array([1e-3, 1e-3])
    want = -elbo_np(x, gamma, optimal_phi_np(gamma, lam), lam, alpha, 1e-3) / 2
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        model = LDA(lam.astype(dtype), alpha.astype(dtype), 1e-3)
        got = ej.free_energy(model, LDAPosterior(jnp.asarray(gamma, dtype)), x)
        assert np.isfinite(float(got))
        np.testing.assert_allclose(float(got), want, rtol=rtol)


def test_empty_document_contributes_nothing():
    x, lam, alpha, eta, *_ = small_problem()
    elbo, q = LDA(lam, alpha, eta).exact_posterior(jnp.asarray(x, jnp.float64))
    assert float(elbo[2]) == 0.0
    np.testing.assert_array_equal(np.asarray(q.gamma[2]), alpha)


# ----------------------------------------------------------------------------- 2. updates
def test_coordinate_updates_are_exact_minimisers():
    x, lam, alpha, eta, gamma0, phi = small_problem(seed=3)
    model = LDA(lam, alpha, eta)
    xj = jnp.asarray(x, jnp.float64)
    # One sweep of the library's coordinate ascent: gamma1 = alpha + sum_w n_w phi*(gamma0).
    gamma1 = fit_local(
        jnp.asarray(gamma0),
        model.alpha,
        model.words(xj),
        topic_factors(model.topic_word_concentration),
        tol=0.0,
        max_iters=1,
    )
    phi0 = optimal_phi_np(gamma0, lam)

    def f_gamma(g):
        return ej.free_energy(model, LDAPosterior(g, jnp.asarray(phi0)), x)

    grad = jax.grad(f_gamma)
    scale = float(jnp.max(jnp.abs(grad(jnp.asarray(gamma0)))))
    assert scale > 1e-3
    assert float(jnp.max(jnp.abs(grad(gamma1)))) < 1e-10 * scale
    # phi given gamma: phi*(gamma1), with phi = softmax(logits); the library's implicit phi
    # is that minimiser (same F).
    phi1 = optimal_phi_np(np.asarray(gamma1), lam)

    def f_phi(logits):
        return ej.free_energy(model, LDAPosterior(gamma1, jax.nn.softmax(logits, -1)), x)

    grad = jax.grad(f_phi)
    random_logits = jnp.asarray(np.random.default_rng(0).normal(size=phi1.shape))
    scale = float(jnp.max(jnp.abs(grad(random_logits))))
    assert float(jnp.max(jnp.abs(grad(jnp.log(jnp.asarray(phi1)))))) < 1e-10 * scale
    np.testing.assert_allclose(
        float(ej.free_energy(model, LDAPosterior(gamma1), x)),
        float(f_phi(jnp.log(phi1))),
        rtol=1e-13,
    )
    # lambda = eta + statistics minimises F over lambda (q fixed), dense and sparse.
    q = LDAPosterior(jnp.asarray(gamma0), jnp.asarray(phi))
    new = model.maximize(model.sufficient_statistics(xj, q))
    np.testing.assert_allclose(
        np.asarray(new.topic_word_concentration),
        eta + np.einsum("nv,nvk->kv", x, phi),
        rtol=1e-12,
    )

    def f_lambda(log_lam):
        m = eqx.tree_at(lambda m: m.log_concentration, new, log_lam)
        return ej.free_energy(m, q, x)

    grad = jax.grad(f_lambda)
    scale = float(jnp.max(jnp.abs(grad(model.log_concentration))))
    assert float(jnp.max(jnp.abs(grad(new.log_concentration)))) < 1e-10 * scale
    docs = DocumentTerms.from_matrix(x)
    q_sparse = LDAPosterior(
        jnp.asarray(gamma0), jnp.asarray(sparse_phi(docs, phi, np.random.default_rng(2)))
    )
    sparse_new = model.maximize(model.sufficient_statistics(docs, q_sparse))
    np.testing.assert_allclose(
        np.asarray(sparse_new.log_concentration), np.asarray(new.log_concentration), rtol=1e-12
    )


def test_learned_eta_is_the_joint_minimiser():
    # With eta learned the M-step minimises F over (lambda, eta) together. (Peaked phi:
    # over-dispersed topic-word counts, so the Polya optimum is finite.)
    x, lam, alpha, _, gamma, phi = small_problem(seed=4)
    phi = np.random.default_rng(4).dirichlet(np.full(3, 0.1), phi.shape[:2])
    model = LDA(lam, alpha, 0.5, learn_eta=True)
    q = LDAPosterior(jnp.asarray(gamma), jnp.asarray(phi))
    new = model.maximize(model.sufficient_statistics(jnp.asarray(x, jnp.float64), q))

    def f(params):
        m = eqx.tree_at(lambda m: (m.log_concentration, m.log_eta), new, params)
        return ej.free_energy(m, q, x)

    grads = jax.grad(f)((new.log_concentration, new.log_eta))
    assert float(jnp.max(jnp.abs(grads[0]))) < 1e-9
    assert abs(float(grads[1])) < 1e-9
    assert abs(float(new.eta) - 0.5) > 1e-3  # it moved
    # The Polya profile's optimum does not depend on the start.
    counts = np.asarray(new.topic_word_concentration) - float(new.eta)
    other = fit_symmetric_concentration(jnp.asarray(counts), jnp.log(jnp.asarray(20.0)))
    np.testing.assert_allclose(float(other), float(new.log_eta), rtol=1e-7)


# ----------------------------------------------------------------------------- 3-5. fits
@pytest.fixture(scope="module")
def corpus():
    train = sample_corpus(1, 150)
    held_out = sample_corpus(101, 60)
    return train, held_out


def start(seed, train, **kwargs):
    return LDA.initialize(jax.random.key(seed), train, K, alpha=ALPHA, eta=ETA, **kwargs)


@pytest.fixture(scope="module")
def batch_fits(corpus):
    """Batch VB from three random starts (one compiled fit): LDA has local optima."""
    train, _ = corpus
    return [ej.fit(start(seed, train), train, max_iters=100, tol=1e-5) for seed in range(3)]


def best(results):
    return max(results, key=lambda r: float(r.elbo))


def test_batch_vb_never_raises_f(batch_fits, corpus):
    train, _ = corpus
    for res in batch_fits:
        assert res.num_increases == 0
        history = np.concatenate([[float(res.initial_elbo)], np.asarray(res.history)])
        assert np.all(np.diff(history) >= -1e-12 * np.abs(history[1:]))
        assert isinstance(res.q, LDAPosterior) and res.q.gamma.shape == (train.shape[0], K)
    # The reported ELBO is -F of the fitted pair.
    res = batch_fits[0]
    np.testing.assert_allclose(
        -float(ej.free_energy(res.model, res.q, train)), float(res.elbo), rtol=1e-12
    )


def test_batch_vb_sparse_form_equals_dense(corpus):
    train, _ = corpus
    docs = DocumentTerms.from_matrix(scipy.sparse.csr_matrix(train))
    dense = ej.fit(start(0, train), train, max_iters=5)
    sparse = ej.fit(start(0, train), docs, max_iters=5)
    np.testing.assert_allclose(np.asarray(sparse.history), np.asarray(dense.history), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(sparse.model.log_concentration),
        np.asarray(dense.model.log_concentration),
        rtol=1e-10,
    )


def test_float32_batch_vb_matches_float64(corpus):
    train, _ = corpus
    x32 = train.astype(np.float32)
    lda32 = LDA.initialize(jax.random.key(0), x32, K, alpha=ALPHA, eta=ETA)
    assert lda32.dtype == jnp.float32
    res32 = ej.fit(lda32, x32, max_iters=20, tol=0.0)
    res64 = ej.fit(
        jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), lda32), train, max_iters=20, tol=0.0
    )
    assert res32.history.dtype == jnp.float32
    assert res32.num_increases == 0
    np.testing.assert_allclose(np.asarray(res32.history), np.asarray(res64.history), rtol=1e-4)


def test_held_out_perplexity_matches_scikit_learn(batch_fits, corpus):
    from sklearn.decomposition import LatentDirichletAllocation

    train, held_out = corpus
    ours = best(batch_fits).model
    fits = [
        LatentDirichletAllocation(
            n_components=K,
            doc_topic_prior=ALPHA,
            topic_word_prior=ETA,
            learning_method="batch",
            max_iter=100,
            random_state=seed,
        ).fit(train)
        for seed in range(3)
    ]
    sk = max(fits, key=lambda f: f.score(train))
    theirs = LDA(sk.components_, ALPHA, ETA)
    # One evaluator for both fitted models.
    ours_p, theirs_p = float(ours.perplexity(held_out)), float(theirs.perplexity(held_out))
    assert abs(ours_p / theirs_p - 1) < 0.05
    # Our evaluator is scikit-learn's definition (its local fit starts elsewhere).
    np.testing.assert_allclose(theirs_p, sk.perplexity(held_out), rtol=1e-4)
    np.testing.assert_allclose(float(theirs.bound(held_out)), sk.score(held_out), rtol=1e-5)
    # Without the global term: the documents' per-word bound, a smaller perplexity here.
    assert float(ours.perplexity(held_out, include_topics=False)) < ours_p
    # transform: normalised topic proportions.
    props = np.asarray(ours.transform(held_out))
    np.testing.assert_allclose(props.sum(1), 1.0, rtol=1e-12)


def test_online_vb_one_whole_batch_step_is_batch_vb(corpus):
    train, _ = corpus
    lda = start(0, train)
    online = ej.fit(
        lda, train, q=ej.ExactPosterior(), m_step=ej.StepwiseMStep(step_size=1.0), max_iters=1
    )
    batch = ej.fit(lda, train, q=ej.ExactPosterior(), max_iters=1)
    # the pass's ELBO estimate is that of the model it visited, topics' KL term included
    np.testing.assert_allclose(float(online.history[0]), float(batch.initial_elbo), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(online.model.topic_word_concentration),
        np.asarray(batch.model.topic_word_concentration),
        rtol=1e-12,
    )
    # Fresh-start batch VB (q=ExactPosterior): lambda = eta + the counts of phi*.
    _, q = lda.exact_posterior(jnp.asarray(train, jnp.float64))
    want = lda.maximize(lda.sufficient_statistics(jnp.asarray(train, jnp.float64), q))
    np.testing.assert_allclose(
        np.asarray(batch.model.log_concentration), np.asarray(want.log_concentration), rtol=1e-12
    )
    # s_0 gives the start back.
    back = lda.maximize(lda.complete_data_statistics(150))
    np.testing.assert_allclose(
        np.asarray(back.log_concentration), np.asarray(lda.log_concentration), rtol=1e-12
    )


def test_online_vb_minibatches_reach_batch_vb(batch_fits, corpus):
    train, held_out = corpus
    step = ej.StepwiseMStep(kappa=0.7, tau=10.0)
    fits = [
        ej.fit(
            start(seed, train),
            train,
            q=ej.ExactPosterior(),
            m_step=step,
            batch_size=25,
            max_iters=20,
            tol=0.0,
            key=jax.random.key(seed),
        )
        for seed in range(3)
    ]
    online = max(fits, key=lambda r: float(r.model.bound(train)))
    batch = best(batch_fits).model
    ratio = float(online.model.perplexity(held_out)) / float(batch.perplexity(held_out))
    assert abs(ratio - 1) < 0.05
    assert float(online.model.bound(train)) > float(batch.bound(train)) - 0.02 * abs(
        float(batch.bound(train))
    )


# ----------------------------------------------------------------------------- 6. alpha
def test_learned_alpha_recovers_an_asymmetric_alpha():
    alpha_true = np.array([0.1, 0.25, 0.5, 1.0])
    beta = np.random.default_rng(7).dirichlet(np.full(V, 0.05), size=K)
    x = sample_corpus(5, 400, alpha=alpha_true, beta=beta, mean_length=100)
    # Topics started near the truth: the test is about alpha, not about finding topics.
    rng = np.random.default_rng(0)
    lam0 = 50 * beta * rng.uniform(0.5, 1.5, beta.shape) + ETA
    lda = LDA(lam0, 1.0 / K, ETA, learn_alpha=True)
    res = ej.fit(lda, x, max_iters=100, tol=1e-6)
    assert res.num_increases == 0
    history = np.asarray(res.history)
    assert np.all(np.diff(history) >= -1e-12 * np.abs(history[1:]))
    order = matched(res.model.topic_word, beta)
    np.testing.assert_allclose(np.asarray(res.model.alpha)[order], alpha_true, rtol=0.35)
    # The alpha M-step is the exact minimiser of F over alpha (q fixed).
    q, m = res.q, res.model
    new = m.maximize(m.sufficient_statistics(jnp.asarray(x, jnp.float64), q))
    grad = jax.grad(lambda la: ej.free_energy(eqx.tree_at(lambda mm: mm.log_alpha, new, la), q, x))(
        new.log_alpha
    )
    assert float(jnp.max(jnp.abs(grad))) < 1e-8
    # complete_data_statistics give alpha back.
    back = m.maximize(m.complete_data_statistics(123.0))
    np.testing.assert_allclose(np.asarray(back.alpha), np.asarray(m.alpha), rtol=1e-6)


# ----------------------------------------------------------------------------- 7. errors
def test_bad_input_errors():
    x, lam, alpha, eta, *_ = small_problem()
    model = LDA(lam, alpha, eta)
    bad = x.astype(float)
    bad[1, 2] = -1
    with pytest.raises(
        ValueError, match=r"x must hold finite, nonnegative word counts.*x\[1, 2\] = -1"
    ):
        model.transform(bad)
    bad[1, 2] = -0.5
    with pytest.raises(ValueError, match=r"nonnegative word counts.*x\[1, 2\] = -0.5"):
        ej.fit(model, bad)
    with pytest.raises(
        ValueError, match=r"x has shape \(6, 5\), expected a document-term matrix \(N, V\) with V=8"
    ):
        model.bound(x[:, :5])
    docs = DocumentTerms.from_matrix(x)
    wrong_v = DocumentTerms.from_matrix(x, num_words=9)
    with pytest.raises(
        ValueError, match=r"x.num_words = 9, but the model has a vocabulary of V = 8"
    ):
        model.perplexity(wrong_v)
    out_of_range = DocumentTerms(docs.word_ids.at[0, 0].set(8), docs.counts, 8)
    with pytest.raises(
        ValueError, match=r"x.word_ids must be in \[0, V\) = \[0, 8\), got x.word_ids\[0, 0\] = 8"
    ):
        ej.fit(model, out_of_range)
    negative = DocumentTerms(docs.word_ids, docs.counts.at[3, 1].set(-2), 8)
    with pytest.raises(
        ValueError, match=r"x.counts must hold finite, nonnegative.*x.counts\[3, 1\] = -2"
    ):
        model.transform(negative)
    with pytest.raises(
        ValueError, match=r"alpha has shape \(2,\), expected a number or \(K,\) = \(3,\)"
    ):
        LDA(lam, [1.0, 1.0], eta)
    with pytest.raises(ValueError, match=r"eta must be finite and > 0"):
        LDA(lam, alpha, 0.0)
    with pytest.raises(ValueError, match=r"alpha must be a number, 'learn' or None, got 'auto'"):
        LDA.initialize(jax.random.key(0), x, 3, alpha="auto")
    with pytest.raises(ValueError, match=r"num_topics must be a positive int"):
        LDA.initialize(jax.random.key(0), x, 0)
    with pytest.raises(
        ValueError, match=r"LDAPosterior gamma has shape \(6, 2\), expected \(N, K\) = \(6, 3\)"
    ):
        ej.free_energy(model, LDAPosterior(jnp.ones((6, 2))), x)
    with pytest.raises(TypeError, match=r"q=LDAPosterior is LDA's mean-field family"):
        ej.fit(ej.models.PoissonMixture(jnp.ones(2) / 2, jnp.ones((2, 8))), x, q=LDAPosterior())
