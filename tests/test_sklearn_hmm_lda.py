"""elbo_jax.sklearn's HMM and LDA estimators: scikit-learn's estimator checks, hmmlearn and
scikit-learn as twins, and float64 input with JAX's x64 off.

Compiles dominate the time: the tests share data shapes and estimator settings, so that most
of them reuse the programs of the first."""

import copy
import pickle

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")
hl = pytest.importorskip("hmmlearn.hmm")

import scipy.sparse  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.decomposition import LatentDirichletAllocation as SkLDA  # noqa: E402
from sklearn.feature_extraction.text import TfidfTransformer  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from elbo_jax.sklearn._hmm import CategoricalHMM, GaussianHMM, PoissonHMM  # noqa: E402
from elbo_jax.sklearn._lda import LatentDirichletAllocation  # noqa: E402

LENGTHS = [60, 17, 45, 1, 33]
K = 3


# ----------------------------------------------------------------------------- estimator checks
# Every fitting check of scikit-learn's suite passes y as fit's second argument and draws
# real-valued X; these estimators' domains exclude both, by design, so those checks fail at
# input validation (fast, before anything compiles). What they would test is tested below
# on valid data (test_hmm_estimator_contract, test_lda_estimator_contract).
_FITTING_CHECKS = (
    "check_fit_score_takes_y",
    "check_estimators_overwrite_params",
    "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self",
    "check_readonly_memmap_input",
    "check_n_features_in_after_fitting",
    "check_estimators_dtypes",
    "check_dtype_object",
    "check_pipeline_consistency",
    "check_estimators_nan_inf",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_fit2d_1feature",
    "check_dict_unchanged",
    "check_fit_idempotent",
    "check_fit_check_is_fitted",
    "check_n_features_in",
    "check_fit2d_predict1d",
)
_WHY = {
    GaussianHMM: "fit's second argument is lengths (hmmlearn's API); the check passes y there",
    CategoricalHMM: "X is one column of integer symbols; the check passes real-valued features",
    PoissonHMM: "X holds whole-number counts; the check passes real values",
}


def _expected_failures(estimator) -> dict[str, str]:
    """The checks that fail by design, with the reason (none for LDA: it passes them all)."""
    if isinstance(estimator, LatentDirichletAllocation):
        return {}
    why = _WHY[type(estimator)]
    failures = dict.fromkeys(_FITTING_CHECKS, why)
    if isinstance(estimator, (GaussianHMM, CategoricalHMM)):
        failures["check_positive_only_tag_during_fit"] = why
    if isinstance(estimator, (CategoricalHMM, PoissonHMM)):
        failures["check_fit2d_1sample"] = why
    return failures


@parametrize_with_checks(
    [
        GaussianHMM(2, n_iter=2, tol=0.0, random_state=0),
        LatentDirichletAllocation(2, max_iter=2, random_state=0),
    ],
    expected_failed_checks=_expected_failures,
    xfail_strict=True,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# The count HMMs share GaussianHMM's code but for their data: the API checks suffice.
@parametrize_with_checks(
    [
        CategoricalHMM(2, n_iter=2, tol=0.0, random_state=0),
        PoissonHMM(2, n_iter=2, tol=0.0, random_state=0),
    ],
    legacy=False,
    expected_failed_checks=_expected_failures,
    xfail_strict=True,
)
def test_sklearn_compatible_api(estimator, check):
    check(estimator)


# ----------------------------------------------------------------------------- HMM data
def _stochastic(rng, k, stay=0.7):
    a = rng.uniform(0.2, 1.0, (k, k)) + np.eye(k) * stay * k
    return a / a.sum(1, keepdims=True)


def _sampled(twin, seed=0):
    """X of the LENGTHS sequences drawn from the hmmlearn model ``twin``."""
    parts = [twin.sample(n, random_state=seed + i)[0] for i, n in enumerate(LENGTHS)]
    return np.concatenate(parts)


def _set(estimator, **attributes):
    for name, value in attributes.items():
        setattr(estimator, name, np.asarray(value))
    return estimator


@pytest.fixture(scope="module")
def gaussian():
    """X, and a start (hmmlearn's attribute names) away from the truth."""
    rng = np.random.default_rng(0)
    truth = _set(
        hl.GaussianHMM(K, covariance_type="diag"),
        startprob_=np.full(K, 1 / K),
        transmat_=_stochastic(rng, K),
        means_=[[0.0, 0.0], [3.0, 1.0], [-2.0, 3.0]],
        covars_=[[1.0, 0.5], [0.6, 0.8], [0.7, 0.7]],
    )
    start = dict(
        startprob_=[0.5, 0.3, 0.2],
        transmat_=np.full((K, K), 1 / K),
        means_=[[0.5, 0.0], [2.0, 1.0], [-1.0, 2.0]],
        covars_=np.ones((K, 2)),
    )
    return _sampled(truth), start


def _assert_close(a, b, rtol=1e-9):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * 1e-3)


# ----------------------------------------------------------------------------- HMMs
def test_gaussian_hmm_equals_hmmlearn(gaussian):
    x, start = gaussian
    # Identical settings: no floor here, no inverse-gamma prior there, the same start.
    ours = _set(GaussianHMM(K, min_covar=0.0, n_iter=5, tol=0.0, init_params=""), **start)
    twin = _set(
        hl.GaussianHMM(K, "diag", covars_prior=0.0, n_iter=5, tol=0.0, init_params=""), **start
    )
    assert ours.fit(x, LENGTHS) is ours
    twin.fit(x, LENGTHS)
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        _assert_close(getattr(ours, name), getattr(twin, name))
    assert ours.covars_.shape == (K, 2, 2)  # full matrices, as hmmlearn's
    # hmmlearn's history: log p(X) before each M-step; ours also after the last.
    _assert_close(ours.monitor_.history[:-1], list(twin.monitor_.history))
    assert ours.n_iter_ == twin.monitor_.iter == 5
    _assert_close(ours.monitor_.history[-1], ours.score(x, LENGTHS))
    _assert_close(ours.score(x, LENGTHS), twin.score(x, LENGTHS))
    log_p, posteriors = ours.score_samples(x, LENGTHS)
    np.testing.assert_allclose(posteriors, twin.predict_proba(x, LENGTHS), atol=1e-10)
    _assert_close(log_p, twin.score(x, LENGTHS))
    log_joint, states = ours.decode(x, LENGTHS)
    want_joint, want_states = twin.decode(x, LENGTHS)
    np.testing.assert_array_equal(states, want_states)
    _assert_close(log_joint, want_joint)
    np.testing.assert_array_equal(ours.predict(x, LENGTHS), want_states)
    _assert_close(ours.bic(x, LENGTHS), twin.bic(x, LENGTHS))
    _assert_close(ours.aic(x, LENGTHS), twin.aic(x, LENGTHS))
    # tol > 0: the same iterations as hmmlearn (its gain test, one more M-step after it).
    for tol in (1.0, 1e-3):
        ours = _set(GaussianHMM(K, min_covar=0.0, n_iter=50, tol=tol, init_params=""), **start)
        twin = _set(
            hl.GaussianHMM(K, "diag", covars_prior=0.0, n_iter=50, tol=tol, init_params=""),
            **start,
        )
        ours.fit(x, LENGTHS)
        twin.fit(x, LENGTHS)
        assert ours.converged_ and ours.n_iter_ == twin.monitor_.iter < 50
        _assert_close(ours.means_, twin.means_)
        _assert_close(ours.monitor_.history[:-1], list(twin.monitor_.history))


def test_categorical_and_poisson_hmms_equal_hmmlearn():
    rng = np.random.default_rng(1)
    m = 4
    for ours_cls, twin_cls, name, truth, begin in (
        (
            CategoricalHMM,
            lambda k, **kw: hl.CategoricalHMM(k, n_features=m, **kw),
            "emissionprob_",
            rng.dirichlet(np.full(m, 0.5), K),
            rng.dirichlet(np.full(m, 5.0), K),
        ),
        (
            PoissonHMM,
            hl.PoissonHMM,
            "lambdas_",
            np.array([[1.0, 8.0], [5.0, 2.0], [12.0, 12.0]]),
            np.array([[2.0, 5.0], [4.0, 4.0], [9.0, 10.0]]),
        ),
    ):
        chain = dict(startprob_=np.full(K, 1 / K), transmat_=_stochastic(rng, K))
        x = _sampled(_set(twin_cls(K), **chain, **{name: truth}), seed=10)
        start = dict(startprob_=[0.5, 0.3, 0.2], transmat_=np.full((K, K), 1 / K), **{name: begin})
        ours = _set(ours_cls(K, n_iter=4, tol=0.0, init_params=""), **start).fit(x, LENGTHS)
        twin = _set(twin_cls(K, n_iter=4, tol=0.0, init_params=""), **start).fit(x, LENGTHS)
        for attribute in ("startprob_", "transmat_", name):
            _assert_close(getattr(ours, attribute), getattr(twin, attribute), rtol=1e-8)
        assert ours.n_iter_ == 4 and ours.n_features_in_ == x.shape[1]


def test_hmm_estimator_contract(gaussian):
    """What scikit-learn's fitting checks would test, on sequences (they pass y as lengths)."""
    x, _ = gaussian
    hmm = GaussianHMM(K, min_covar=0.0, n_iter=5, tol=0.0, random_state=0)  # programs shared
    params = hmm.get_params()
    hmm.fit(x, LENGTHS)
    assert hmm.get_params() == params
    again = clone(hmm).fit(x, LENGTHS)  # the same random_state: the same fit
    np.testing.assert_array_equal(again.means_, hmm.means_)
    restored = pickle.loads(pickle.dumps(hmm))
    np.testing.assert_array_equal(restored.predict(x, LENGTHS), hmm.predict(x, LENGTHS))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hmm.predict(bad, LENGTHS)
    with pytest.raises(ValueError, match="features"):
        hmm.score(x[:, :1], LENGTHS)
    with pytest.raises(ValueError, match="doesn't sum to 156 samples"):
        hmm.score(x, [60, 17])
    with pytest.raises(ValueError, match="params='st' is not supported"):
        GaussianHMM(K, params="st").fit(x, LENGTHS)
    with pytest.raises(ValueError, match="covariance_type='tied' is not available"):
        GaussianHMM(K, covariance_type="tied").fit(x, LENGTHS)
    with pytest.raises(ValueError, match="initial_concentration must be >= 1"):
        GaussianHMM(K, startprob_prior=0.5).fit(x, LENGTHS)


# ----------------------------------------------------------------------------- LDA
@pytest.fixture(scope="module")
def corpus():
    """Counts of 256 documents from a 4-topic LDA over 30 words: 128 to train, 128 held out
    (one shape: one compiled program per function)."""
    rng = np.random.default_rng(0)
    beta = rng.dirichlet(np.full(30, 0.1), 4)
    theta = rng.dirichlet(np.full(4, 0.3), 256)
    x = np.stack([rng.multinomial(rng.poisson(60) + 1, t @ beta) for t in theta]).astype(float)
    return x[:128], x[128:]


@pytest.fixture(scope="module")
def fitted_lda(corpus):
    """Ours, the best of two starts by training perplexity (one compiled program)."""
    train, _ = corpus
    fits = [LatentDirichletAllocation(4, max_iter=30, random_state=s).fit(train) for s in (0, 1)]
    return min(fits, key=lambda f: f.bound_)


def _sklearn_twin(ours):
    """scikit-learn's estimator holding our fitted topics."""
    twin = SkLDA(ours.n_components, random_state=0).fit(np.ones((2, ours.n_features_in_)))
    twin.components_ = ours.components_.copy()
    twin.exp_dirichlet_component_ = ours.exp_dirichlet_component_.copy()
    return twin


def test_lda_bound_and_perplexity_are_scikit_learns(fitted_lda, corpus):
    train, held_out = corpus
    twin = _sklearn_twin(fitted_lda)
    # The same definitions at the same topics (their local fits start elsewhere and stop
    # at mean_change_tol: agreement to that level).
    _assert_close(fitted_lda.score(held_out), twin.score(held_out), rtol=1e-5)
    _assert_close(fitted_lda.perplexity(held_out), twin.perplexity(held_out), rtol=1e-4)
    _assert_close(fitted_lda.bound_, twin.perplexity(train), rtol=1e-4)
    np.testing.assert_allclose(fitted_lda.transform(held_out), twin.transform(held_out), atol=2e-3)
    gamma = fitted_lda.transform(held_out, normalize=False)
    np.testing.assert_allclose(gamma.sum(1), held_out.sum(1) + 4 * fitted_lda.doc_topic_prior_)
    # Sparse input (as ej.models.DocumentTerms): the same numbers.
    sparse = scipy.sparse.csr_matrix(held_out)
    _assert_close(fitted_lda.transform(sparse), fitted_lda.transform(held_out))
    # Real weights (tf-idf) in place of counts, as scikit-learn's estimator takes them.
    tfidf = TfidfTransformer(norm=None).fit_transform(held_out).toarray()
    _assert_close(fitted_lda.score(tfidf), twin.score(tfidf), rtol=1e-5)
    np.testing.assert_allclose(fitted_lda.transform(tfidf), twin.transform(tfidf), atol=2e-3)


def test_lda_held_out_perplexity_near_scikit_learns(fitted_lda, corpus):
    """Different algorithms for the same bound: fitted to convergence from a good start
    (the best of two by training bound; a poor start stalls near 13.4 against 11.3), both
    reach the same optimum: held-out perplexities within 1 % (0.1 % here)."""
    train, held_out = corpus
    fits = [SkLDA(4, max_iter=100, random_state=s).fit(train) for s in (0, 1)]
    theirs = max(fits, key=lambda f: f.score(train))
    ratio = fitted_lda.perplexity(held_out) / theirs.perplexity(held_out)
    assert abs(ratio - 1) < 0.01


def test_online_lda(fitted_lda, corpus):
    train, held_out = corpus
    online = LatentDirichletAllocation(
        4, learning_method="online", batch_size=32, max_iter=20, random_state=0
    ).fit(train)
    assert online.n_iter_ == 20 and online.n_batch_iter_ == 1 + 20 * 4
    # From this start online VB reaches batch VB's optimum (12 % higher from some others).
    ratio = online.perplexity(held_out) / fitted_lda.perplexity(held_out)
    assert abs(ratio - 1) < 0.03
    # partial_fit: scikit-learn's online step from the same topics on the same minibatches.
    ours = copy.deepcopy(fitted_lda).set_params(batch_size=32, total_samples=1000)
    ours.n_batch_iter_ = 7
    twin = _sklearn_twin(fitted_lda).set_params(batch_size=32, total_samples=1000)
    twin.n_batch_iter_ = 7
    ours.partial_fit(train[:70])
    twin.partial_fit(train[:70])
    assert ours.n_batch_iter_ == twin.n_batch_iter_ == 10
    np.testing.assert_allclose(ours.components_, twin.components_, rtol=2e-3)


def test_lda_estimator_contract(fitted_lda, corpus):
    """Fitting twice, pickling, subsets, evaluate_every, and the input errors."""
    train, held_out = corpus
    lda = LatentDirichletAllocation(4, max_iter=30, random_state=fitted_lda.random_state)
    assert lda.fit(train) is lda and lda.get_params() == fitted_lda.get_params()
    np.testing.assert_array_equal(lda.components_, fitted_lda.components_)  # idempotent
    restored = pickle.loads(pickle.dumps(lda))
    np.testing.assert_array_equal(restored.transform(held_out), lda.transform(held_out))
    # Documents are independent: a subset transforms as in the whole.
    np.testing.assert_allclose(lda.transform(held_out[:7]), lda.transform(held_out)[:7], atol=1e-12)
    # evaluate_every: stops once the training perplexity settles (same compiled fit).
    settled = LatentDirichletAllocation(4, max_iter=30, evaluate_every=5, perp_tol=0.05)
    assert settled.set_params(random_state=0).fit(train).n_iter_ < 30
    with pytest.raises(ValueError, match="Negative values"):
        lda.transform(-held_out)
    with pytest.raises(ValueError, match="learning_decay == 0.5, must be > 0.5"):
        LatentDirichletAllocation(learning_decay=0.5).fit(train)


# ----------------------------------------------------------------------------- x64 off
def test_float64_input_with_x64_off(gaussian, corpus):
    """float64 NumPy input (and attributes) with JAX's x64 off: computed in float32, no
    warning (the test run turns every warning into an error)."""
    x, start = gaussian
    train, _ = corpus
    with jax.enable_x64(False):
        hmm = _set(GaussianHMM(K, n_iter=1, tol=0.0, init_params=""), **start)  # float64
        hmm.fit(x, LENGTHS)
        assert hmm.means_.dtype == np.float32 and np.all(np.isfinite(hmm.covars_))
        # partial_fit: the start and one online step (a smaller program than fit's).
        lda = LatentDirichletAllocation(4, batch_size=128, random_state=0).partial_fit(train)
        assert lda.components_.dtype == np.float32 and np.all(np.isfinite(lda.components_))
