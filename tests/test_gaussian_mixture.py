"""GaussianMixture: scikit-learn and SciPy as oracles, the generic paths as twins.

Shapes are shared (N=240, D=2, K=3, ``N_ITERS`` iterations) so compiled fits are reused.
"""

import functools
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.stats as st
from helpers import compiled_maximize as _maximize
from helpers import compiled_posterior as _posterior
from helpers import compiled_statistics as _statistics
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import elbo_jax as ej
from elbo_jax._statistics import merge_statistics, scale_statistics
from elbo_jax.models import GaussianMixture, GaussianMixturePrior

N_ITERS = 5
COVARIANCE_TYPES = ["full", "diag"]
# "diag" runs with reg_covar=0.0 (scikit-learn allows it too) to show it works on good data
REG_COVAR = {"full": 1e-6, "diag": 0.0}


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 4.0], [0.0, 5.0]])
    scales = [
        np.array([[1.0, 0.0], [0.6, 0.5]]),
        0.7 * np.eye(2),
        np.array([[0.5, 0.0], [-0.2, 0.3]]),
    ]
    parts = [c + rng.normal(size=(80, 2)) @ s.T for c, s in zip(centres, scales, strict=True)]
    return np.concatenate(parts)


X = _blobs()
CENTRES = np.array([[0.0, 0.0], [4.0, 4.0], [0.0, 5.0]])


def _start(covariance_type, dtype=np.float64):
    """Deliberately poor starting parameters, so that the EM iterations matter."""
    weights = np.array([0.2, 0.3, 0.5])
    means = np.array([[2.0, 2.0], [2.5, 2.5], [1.0, 3.0]])
    if covariance_type == "full":
        covs = np.array([[[1.0, 0.3], [0.3, 1.0]], np.eye(2), [[2.0, -0.5], [-0.5, 1.0]]])
    else:
        covs = np.array([[1.0, 1.0], [1.0, 2.0], [0.5, 1.0]])
    return weights.astype(dtype), means.astype(dtype), covs.astype(dtype)


def _model(covariance_type, reg_covar=1e-6, dtype=np.float64):
    return GaussianMixture(*_start(covariance_type, dtype), covariance_type, reg_covar)


def _sklearn(covariance_type, max_iter):
    weights, means, covs = _start(covariance_type)
    precisions = np.linalg.inv(covs) if covariance_type == "full" else 1 / covs
    sk = SkGaussianMixture(
        3,
        covariance_type=covariance_type,
        tol=0.0,
        reg_covar=REG_COVAR[covariance_type],
        max_iter=max_iter,
        n_init=1,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0 never "converges"
        sk.fit(X)
    return sk


@functools.cache
def _fit64(covariance_type):
    model = _model(covariance_type, REG_COVAR[covariance_type])
    return ej.fit(model, X, tol=0.0, max_iters=N_ITERS)


def _assert_monotone(history, initial, rtol):
    h = np.concatenate([[float(initial)], np.asarray(history, np.float64)])
    assert np.all(np.isfinite(h))
    assert np.all(np.diff(h) >= -rtol * (1 + np.abs(h[1:])))


# ----------------------------------------------------------------------- exact EM
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_matches_sklearn(covariance_type):
    res = _fit64(covariance_type)
    sk = _sklearn(covariance_type, N_ITERS)
    model = res.model
    assert res.num_iters == N_ITERS
    # the start is far from the fixed point, so the comparison pins the iteration count
    assert np.max(np.abs(np.asarray(model.means) - _start(covariance_type)[1])) > 0.1
    off_by_one = _sklearn(covariance_type, N_ITERS + 1)
    assert not np.allclose(model.means, off_by_one.means_, rtol=1e-6, atol=0)
    np.testing.assert_allclose(model.weights, sk.weights_, rtol=1e-6)
    np.testing.assert_allclose(model.means, sk.means_, rtol=1e-6)
    np.testing.assert_allclose(model.covariances, sk.covariances_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        model.precisions_cholesky, sk.precisions_cholesky_, rtol=1e-6, atol=1e-12
    )
    # exact EM never lowers the ELBO
    assert res.num_increases == 0
    _assert_monotone(res.history, res.initial_elbo, rtol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_scores_match_sklearn(covariance_type):
    model = _fit64(covariance_type).model
    sk = _sklearn(covariance_type, N_ITERS)
    np.testing.assert_allclose(model.predict_proba(X), sk.predict_proba(X), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(model.predict(X), sk.predict(X))
    np.testing.assert_allclose(model.score(X), sk.score(X), rtol=1e-9)
    np.testing.assert_allclose(model.score(X), ej.log_evidence(model, jnp.asarray(X)), rtol=1e-12)
    np.testing.assert_allclose(model.bic(X), sk.bic(X), rtol=1e-9)
    np.testing.assert_allclose(model.aic(X), sk.aic(X), rtol=1e-9)
    assert model.n_parameters == sk._n_parameters()


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_joint_and_table_match_generic_and_scipy(covariance_type):
    model = _model(covariance_type)
    x = jnp.asarray(X)
    table = model.log_joint_table(x)
    np.testing.assert_allclose(table, ej.Model.log_joint_table(model, x), rtol=1e-12)
    weights, means, covs = _start(covariance_type)
    for k in range(3):
        cov = covs[k] if covariance_type == "full" else np.diag(covs[k])
        expected = np.log(weights[k]) + st.multivariate_normal(means[k], cov).logpdf(X)
        np.testing.assert_allclose(table[:, k], expected, rtol=1e-12)
        one = model.log_joint(x[7], jnp.asarray(k))
        np.testing.assert_allclose(one, expected[7], rtol=1e-12)


def test_diag_table_is_stable_in_float32_far_from_the_origin():
    weights, means, covs = _start("diag")
    far64 = GaussianMixture(weights, means + 1000.0, covs, "diag")
    far32 = GaussianMixture(
        *(a.astype(np.float32) for a in (weights, means + 1000.0, covs)), "diag"
    )
    x = X + 1000.0
    t64 = np.asarray(far64.log_joint_table(jnp.asarray(x)))
    t32 = np.asarray(far32.log_joint_table(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(t32, t64, rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------- closed-form M-step
def _test_prior():
    return GaussianMixturePrior(
        2,
        concentration=jnp.array([1.5, 3.0, 2.0]),
        mean=jnp.array([1.0, 2.0]),
        mean_precision=3.0,
        dof=4.0,
        scale=jnp.array([[2.0, 0.5], [0.5, 1.0]]),
    )


def _m_step_problem(covariance_type):
    # reg_covar=0: only then is the M-step the exact argmin of F (see test_reg_covar_...)
    model = _model(covariance_type, reg_covar=0.0)
    x = jnp.asarray(X)
    return model, model.posterior(x), x


@eqx.filter_jit
def _closed_form_m_step(model, q, x, prior):
    return model.maximize(model.sufficient_statistics(x, q), prior)


@eqx.filter_jit
def _free_energy_grad(model, q, x, prior):
    return eqx.filter_grad(lambda m: ej.free_energy(m, q, x, prior=prior))(model)


@eqx.filter_jit
def _numerical_m_step(model, q, x, prior):
    step = ej.ExactMStep(use_closed_form=False)
    return step.step(model, q, None, x, key=None, prior=prior)[0]


def _assert_same_model(a, b, rtol):
    np.testing.assert_allclose(a.weights, b.weights, rtol=rtol)
    np.testing.assert_allclose(a.means, b.means, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(a.covariances, b.covariances, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("with_prior", [False, True])
def test_closed_form_m_step_equals_numerical(covariance_type, with_prior):
    """L-BFGS on F over the unconstrained parameters finds the closed form: ML and MAP,
    full and diag."""
    model, q, x = _m_step_problem(covariance_type)
    prior = _test_prior() if with_prior else None
    closed = _closed_form_m_step(model, q, x, prior)
    numerical = _numerical_m_step(model, q, x, prior)
    f_closed = ej.free_energy(closed, q, x, prior=prior)
    assert f_closed <= ej.free_energy(numerical, q, x, prior=prior) + 1e-12
    assert f_closed < ej.free_energy(model, q, x, prior=prior) - 1e-3
    _assert_same_model(closed, numerical, rtol=1e-5)
    if with_prior:  # the prior mattered
        assert not np.allclose(closed.means, _closed_form_m_step(model, q, x, None).means)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("with_prior", [False, True])
def test_closed_form_m_step_is_stationary(covariance_type, with_prior):
    """The gradient of the numerical solver's objective (over the unconstrained parameters)
    vanishes at the closed form: ML and MAP, full and diag."""
    model, q, x = _m_step_problem(covariance_type)
    prior = _test_prior() if with_prior else None
    closed = _closed_form_m_step(model, q, x, prior)
    for g in jax.tree_util.tree_leaves(_free_energy_grad(closed, q, x, prior)):
        np.testing.assert_allclose(g, 0.0, atol=1e-9)
    start = _free_energy_grad(model, q, x, prior)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(start)) > 1e-2


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_reg_covar_is_added_to_the_covariance(covariance_type):
    x = jnp.asarray(X)
    plain = _model(covariance_type, reg_covar=0.0)
    floored = _model(covariance_type, reg_covar=1e-2)
    stats = plain.sufficient_statistics(x, plain.posterior(x))
    a, b = plain.maximize(stats), floored.maximize(stats)
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-12)
    np.testing.assert_allclose(b.means, a.means, rtol=1e-12)
    eye = np.eye(2) if covariance_type == "full" else np.ones(2)
    expected = np.broadcast_to(1e-2 * eye, a.covariances.shape)
    np.testing.assert_allclose(b.covariances - a.covariances, expected, atol=1e-12)


def test_hard_assignment_m_step():
    model, _, x = _m_step_problem("full")
    q = ej.PointMass().initialize(model, x)  # hard EM: q is the posterior mode
    labels = np.asarray(q.value)
    new = _closed_form_m_step(model, q, x, None)
    for k in range(3):
        members = X[labels == k]
        assert len(members) > 2
        np.testing.assert_allclose(new.weights[k], len(members) / len(X), rtol=1e-10)
        np.testing.assert_allclose(new.means[k], members.mean(0), rtol=1e-10)
        np.testing.assert_allclose(new.covariances[k], np.cov(members.T, bias=True), rtol=1e-10)


def test_statistics_add_over_shards():
    model = _model("full")
    x = jnp.asarray(X)
    q = _posterior(model, x)
    whole = _statistics(model, x, q)
    parts = [
        _statistics(model, x[s], ej.Categorical(q.logits[s]))
        for s in (slice(0, 100), slice(100, None))
    ]
    merged = merge_statistics(*parts)
    for name in ("counts", "shift", "first", "second"):
        np.testing.assert_allclose(
            getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-12, err_msg=name
        )
    _assert_same_model(_maximize(model, merged), _maximize(model, whole), rtol=1e-12)


# ----------------------------------------------------------------------- statistics contract
def _other_models(covariance_type, dtype):
    """Three models at different θ (means, covariances and weights all differ)."""
    weights, means, covs = _start(covariance_type)
    shifts = ([0.0, 0.0], [1.5, -1.0], [-2.0, 3.0])
    return [
        GaussianMixture(
            np.roll(weights, i).astype(dtype),
            (means + np.asarray(shift)).astype(dtype),
            ((1 + 0.5 * i) * covs).astype(dtype),
            covariance_type,
            reg_covar=0.0,
        )
        for i, shift in enumerate(shifts)
    ]


def _reference_posterior(x):
    """Responsibilities that do not depend on which model's statistics are asked for."""
    model = _model("full")
    return _posterior(model, jnp.asarray(x, np.float64)).probs


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merged_statistics_of_models_at_different_theta_equal_the_whole(covariance_type, dtype):
    """A random 3-way split, each part's statistics computed by a different model (a
    different shift), merged and maximized == the whole data's statistics at one θ."""
    models = _other_models(covariance_type, dtype)
    x = X.astype(dtype)
    probs = np.asarray(_reference_posterior(X)).astype(dtype)
    part = np.random.default_rng(1).integers(0, 3, X.shape[0])
    stats = [
        _statistics(
            m, jnp.asarray(x[part == i]), ej.Categorical(jnp.log(jnp.asarray(probs[part == i])))
        )
        for i, m in enumerate(models)
    ]
    assert not np.allclose(stats[0].shift, stats[1].shift)
    merged = merge_statistics(merge_statistics(stats[0], stats[1]), stats[2])
    whole = _statistics(models[0], jnp.asarray(x), ej.Categorical(jnp.log(jnp.asarray(probs))))
    # maximized by yet another model: only the statistics decide
    got, want = _maximize(models[1], merged), _maximize(models[2], whole)
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    for name in ("weights", "means", "covariances"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)), err_msg=name)


def _stats(covariance_type, rows=slice(None), weights=None):
    model = _model(covariance_type, reg_covar=0.0)
    x = jnp.asarray(X[rows])
    return model, _statistics(model, x, _posterior(model, x), weights)


def _assert_same_statistics(a, b, rtol=1e-12):
    b = b.about(a.shift)
    for name in ("counts", "shift", "first", "second"):
        want = getattr(b, name)
        np.testing.assert_allclose(
            getattr(a, name), want, rtol=rtol, atol=rtol * np.max(np.abs(want)), err_msg=name
        )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_merge_is_commutative_and_zero_is_neutral(covariance_type):
    models = _other_models(covariance_type, np.float64)
    x = jnp.asarray(X)
    a = _statistics(models[0], x[:150], _posterior(models[0], x[:150]))
    b = _statistics(models[1], x[150:], _posterior(models[1], x[150:]))
    ab, ba = merge_statistics(a, b), merge_statistics(b, a)
    for la, lb in zip(jax.tree_util.tree_leaves(ab), jax.tree_util.tree_leaves(ba), strict=True):
        np.testing.assert_array_equal(la, lb)  # distinct counts: the same shift, bit for bit
    # the larger part's shift is kept, per component
    take_b = np.asarray(b.counts) > np.asarray(a.counts)
    np.testing.assert_array_equal(ab.shift, np.where(take_b[:, None], b.shift, a.shift))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, a)
    for s in (a, b, ab):
        for merged in (merge_statistics(zeros, s), merge_statistics(s, zeros)):
            for got, want in zip(
                jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(s), strict=True
            ):
                np.testing.assert_array_equal(got, want)
    # associativity, to rounding
    c = _statistics(models[2], x[:40], _posterior(models[2], x[:40]))
    left = merge_statistics(merge_statistics(a, b), c)
    right = merge_statistics(a, merge_statistics(b, c))
    _assert_same_statistics(left, right)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_scale_and_weights_are_duplicated_and_dropped_rows(covariance_type):
    model, once = _stats(covariance_type)
    twice = np.concatenate([X, X])
    doubled = _statistics(model, jnp.asarray(twice), _posterior(model, jnp.asarray(twice)))
    _assert_same_statistics(scale_statistics(once, 2.0), doubled)
    _assert_same_statistics(scale_statistics(once, 2.0), once.merge(once))
    np.testing.assert_array_equal(scale_statistics(once, 3.0).shift, once.shift)
    # weight 2 on rows 0..49 == those rows twice; weight 0 on rows 200.. == rows dropped
    w = np.ones(X.shape[0])
    w[:50] = 2.0
    w[200:] = 0.0
    _, weighted = _stats(covariance_type, weights=jnp.asarray(w))
    rows = np.concatenate([X[:50], X[:200]])
    expected = _statistics(model, jnp.asarray(rows), _posterior(model, jnp.asarray(rows)))
    _assert_same_statistics(weighted, expected)
    # padding: rows of weight 0 contribute nothing, whatever their responsibilities
    x = jnp.asarray(np.concatenate([X, np.zeros((7, 2))]))
    logits = _posterior(model, x).logits.at[-7:].set(jnp.nan)
    w = jnp.concatenate([jnp.ones(X.shape[0]), jnp.zeros(7)])
    padded = _statistics(model, x, ej.Categorical(logits), w)
    _assert_same_statistics(padded, once)
    with pytest.raises(ValueError, match=r"weights has shape \(3,\), expected \(N,\) with N=240"):
        model.sufficient_statistics(
            jnp.asarray(X), model.posterior(jnp.asarray(X)), weights=jnp.ones(3)
        )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_complete_data_statistics_round_trip(covariance_type, dtype):
    model = _model(covariance_type, reg_covar=0.0, dtype=dtype)
    stats = model.complete_data_statistics(1000)
    np.testing.assert_allclose(stats.counts, 1000 * np.asarray(model.weights), rtol=1e-6)
    back = model.maximize(stats)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    _assert_same_model(back, model, rtol=rtol)
    floored = GaussianMixture(*_start(covariance_type, dtype), covariance_type, reg_covar=1e-2)
    eye = np.eye(2) if covariance_type == "full" else np.ones(2)
    np.testing.assert_allclose(
        floored.maximize(stats).covariances - model.covariances,
        np.broadcast_to(1e-2 * eye, model.covariances.shape),
        atol=10 * rtol,
    )
    # merged with data statistics: the model acts as that many data (inertia)
    _, data = _stats(covariance_type)
    if dtype == np.float64:
        merged = model.maximize(data.merge(stats))
        assert not np.allclose(merged.means, model.maximize(data).means)


def test_maximize_rejects_other_statistics():
    with pytest.raises(TypeError, match="GaussianMixtureStatistics"):
        _model("full").maximize({"counts": jnp.ones(3)})
    with pytest.raises(ValueError, match="do not fit a 'full' model"):
        _model("full").maximize(_model("diag").complete_data_statistics(10))


def test_empty_component():
    weights, _, covs = _start("full")
    means = np.array([[0.0, 0.0], [4.0, 4.0], [100.0, 100.0]])  # the third is far from all data
    model = GaussianMixture(weights, means, covs, "full", REG_COVAR["full"])
    res = ej.fit(model, X, tol=0.0, max_iters=N_ITERS)
    assert res.status == ej.Status.MAX_ITERS and res.num_increases == 0
    fitted = res.model
    for leaf in jax.tree_util.tree_leaves(fitted):
        assert np.all(np.isfinite(leaf))
    assert 0 < float(fitted.weights[2]) < 1e-12
    np.testing.assert_allclose(fitted.means[2], means[2])
    np.testing.assert_allclose(fitted.covariances[2], covs[2], rtol=1e-12)
    np.testing.assert_allclose(jnp.sum(fitted.weights), 1.0, rtol=1e-12)
    _assert_monotone(res.history, res.initial_elbo, rtol=1e-12)
    # reg_covar=0, full and diag: one closed-form M-step from a q that gives it nothing
    x = jnp.asarray(X)
    for covariance_type, cov in (("full", covs), ("diag", np.ones((3, 2)))):
        zero = GaussianMixture(weights, means, cov, covariance_type, reg_covar=0.0)
        new = zero.maximize(zero.sufficient_statistics(x, zero.posterior(x)))
        for leaf in jax.tree_util.tree_leaves(new):
            assert np.all(np.isfinite(leaf))
        np.testing.assert_allclose(new.means[2], means[2])
        np.testing.assert_allclose(new.covariances[2], cov[2], rtol=1e-12)


# ----------------------------------------------------------------------- MAP
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_prior_log_density_matches_scipy(covariance_type):
    model = _model(covariance_type)
    alpha = np.array([1.5, 3.0, 2.0])
    m0, kappa, nu = np.array([1.0, 2.0]), 3.0, 4.0
    psi = np.array([[2.0, 0.5], [0.5, 1.0]])
    prior = GaussianMixturePrior(
        2, concentration=alpha, mean=m0, mean_precision=kappa, dof=nu, scale=psi
    )
    weights, means, covs = _start(covariance_type)
    expected = st.dirichlet(alpha).logpdf(weights)
    for k in range(3):
        if covariance_type == "full":
            expected += st.invwishart(df=nu, scale=psi).logpdf(covs[k])
            expected += st.multivariate_normal(m0, covs[k] / kappa).logpdf(means[k])
        else:
            var = covs[k]
            expected += np.sum(st.invgamma(nu / 2, scale=np.diag(psi) / 2).logpdf(var))
            expected += np.sum(st.norm(m0, np.sqrt(var / kappa)).logpdf(means[k]))
    np.testing.assert_allclose(prior(model), expected, rtol=1e-10)


def test_map_fit():
    model = _model("full")
    prior = GaussianMixturePrior.from_data(X, mean_precision=10.0)
    res = ej.fit(model, X, prior=prior, tol=0.0, max_iters=N_ITERS)
    assert res.num_increases == 0
    _assert_monotone(res.history, res.initial_elbo, rtol=1e-12)
    # the reported ELBO includes log p(theta) / N
    x = jnp.asarray(X)
    expected = ej.log_evidence(res.model, x) + prior(res.model) / x.shape[0]
    np.testing.assert_allclose(res.history[-1], expected, rtol=1e-10)
    assert not np.allclose(res.model.means, _fit64("full").model.means, rtol=1e-3)


def test_prior_validation():
    with pytest.raises(ValueError, match="concentration must be >= 1"):
        GaussianMixturePrior(2, concentration=0.5)
    with pytest.raises(ValueError, match="mean_precision"):
        GaussianMixturePrior(2, mean_precision=0.0)
    with pytest.raises(ValueError, match="dof"):
        GaussianMixturePrior(3, dof=1.0)
    with pytest.raises(ValueError, match="scale"):
        GaussianMixturePrior(2, scale=-jnp.eye(2))
    with pytest.raises(ValueError, match="mean has shape"):
        GaussianMixturePrior(3, mean=jnp.zeros(2))
    with pytest.raises(ValueError, match="D=3 but the model has D=2"):
        GaussianMixturePrior(3)(_model("full"))
    assert _model("full").has_closed_form(GaussianMixturePrior(2))
    assert not _model("full").has_closed_form(lambda m: 0.0)


# ----------------------------------------------------------------------- float32, gradient
def test_float32_fit():
    model = _model("full", dtype=np.float32)
    assert model.weight_logits.dtype == jnp.float32
    res = ej.fit(model, X.astype(np.float32), tol=0.0, max_iters=N_ITERS)
    for leaf in jax.tree_util.tree_leaves(res.model):
        assert leaf.dtype == jnp.float32
    assert res.history.dtype == jnp.float32
    assert res.num_increases == 0
    _assert_monotone(res.history, res.initial_elbo, rtol=1e-6)
    ref = _fit64("full").model
    for name in ("weights", "means", "covariances"):
        got = np.asarray(getattr(res.model, name), np.float64)
        np.testing.assert_allclose(got, getattr(ref, name), rtol=1e-4, atol=1e-5)


def _narrow_and_far():
    """500 points N(0, I) and 500 points N(100, 0.01^2 I) in 2-D: a narrow component far from
    the data's mean, where expansions about a common centre cancel in float32."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(size=(500, 2)), 100 + 0.01 * rng.normal(size=(500, 2))])


def _cast(model, dtype):
    return GaussianMixture(
        *(np.asarray(a, dtype) for a in (model.weights, model.means, model.covariances)),
        model.covariance_type,
        model.reg_covar,
    )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_fit_of_a_narrow_far_component_reaches_float64(covariance_type):
    x = _narrow_and_far()
    start = GaussianMixture.initialize(jr.key(0), x, 2, covariance_type)
    ref = ej.fit(start, x)
    got = ej.fit(_cast(start, np.float32), x.astype(np.float32))
    assert ref.status == got.status == ej.Status.CONVERGED
    elbo64 = float(ref.history[ref.num_iters - 1])
    elbo32 = float(got.history[got.num_iters - 1])
    assert elbo64 > 1.0
    assert abs(elbo32 - elbo64) < 1e-3
    np.testing.assert_allclose(ej.log_evidence(_cast(got.model, np.float64), x), elbo64, atol=1e-3)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_table_and_statistics_of_a_narrow_far_component(covariance_type):
    x32 = _narrow_and_far().astype(np.float32)
    x64 = jnp.asarray(x32, jnp.float64)  # the same data, exactly
    covs = np.array([1.0, 1e-4])[:, None] * (np.eye(2) if covariance_type == "full" else 1)
    model32 = GaussianMixture(
        np.array([0.5, 0.5], np.float32),
        np.array([[0.01, -0.02], [100.001, 99.999]], np.float32),
        np.broadcast_to(covs, (2, 2, 2) if covariance_type == "full" else (2, 2)).astype(
            np.float32
        ),
        covariance_type,
    )
    model64 = _cast(model32, np.float64)
    table = np.asarray(model32.log_joint_table(jnp.asarray(x32)), np.float64)
    reference = np.asarray(ej.Model.log_joint_table(model64, x64))
    eps = np.finfo(np.float32).eps
    # a few ulps of each point's largest entry; diag: of each entry (plus D)
    scale = np.max(np.abs(reference), axis=1, keepdims=True)
    if covariance_type == "diag":
        scale = np.abs(reference) + 2
    assert np.max(np.abs(table - reference) / scale) < 8 * eps
    # statistics about the component means: S_k to float32's rounding of itself
    probs = jnp.asarray(np.asarray(model64.posterior(x64).probs), jnp.float32)
    q32 = ej.Categorical(jnp.log(probs))
    stats = model32.sufficient_statistics(jnp.asarray(x32), q32)
    diff = np.asarray(x32, np.float64)[:, None] - np.asarray(model32.means, np.float64)[None]
    r = np.asarray(probs, np.float64)
    second = np.einsum("nk,nki,nkj->kij", r, diff, diff)
    if covariance_type == "diag":
        second = np.einsum("kii->ki", second)
    for k in range(2):
        np.testing.assert_allclose(
            stats.second[k], second[k], rtol=1e-4, atol=1e-4 * np.max(np.abs(second[k]))
        )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_initialize_on_repeated_points_and_collinear_columns(covariance_type, dtype):
    rng = np.random.default_rng(0)
    repeated = np.repeat(rng.normal(size=(5, 3)), 20, axis=0)  # K=10 > 5 distinct points
    base = rng.normal(size=(300, 1)) * 30 + 1000
    collinear = np.concatenate([base, base], axis=1)  # a duplicated column
    for x, k in ((repeated, 10), (collinear, 3)):
        model = GaussianMixture.initialize(jr.key(0), x.astype(dtype), k, covariance_type)
        assert model.means.dtype == dtype
        covs = np.asarray(model.covariances, np.float64)
        if covariance_type == "full":
            np.testing.assert_array_equal(covs, np.swapaxes(covs, -1, -2))
            assert np.all(np.linalg.eigvalsh(covs) > 0)
        else:
            assert np.all(covs > 0)
        assert np.all(np.isfinite(model.log_joint_table(jnp.asarray(x, dtype))))


def test_initialize_memory_stays_near_the_data_size():
    from elbo_jax.models._gaussian_mixture import _kmeans_start

    # (before: about 5x the data in temporaries, several (N, K) and (N, D) arrays at once)
    n, d = 100_000, 32
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    for covariance_type in COVARIANCE_TYPES:
        compiled = _kmeans_start.lower(
            jr.key(0),
            x,
            jnp.asarray(1e-6, jnp.float32),
            jnp.asarray(10, jnp.int32),
            num_components=16,
            covariance_type=covariance_type,
        ).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:  # not every backend reports it
            pytest.skip("no memory analysis on this backend")
        assert analysis.temp_size_in_bytes < 0.5 * n * d * 4


def test_gradient_m_step_raises_the_elbo():
    model = _model("full")
    step = ej.GradientMStep(optax.adam(0.05), num_steps=5)
    res = ej.fit(model, X, m_step=step, tol=0.0, max_iters=N_ITERS)
    assert np.all(np.isfinite(res.history))
    assert float(res.history[-1]) > float(res.initial_elbo) + 0.1


# ----------------------------------------------------------------------- initialize
def _match_means(means, centres):
    cost = np.linalg.norm(np.asarray(means)[:, None] - centres[None], axis=-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return cost[rows, cols]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_initialize_recovers_blobs(covariance_type):
    key = jr.key(3)
    model = GaussianMixture.initialize(key, X, 3, covariance_type)
    again = GaussianMixture.initialize(key, X, 3, covariance_type)
    for a, b in zip(
        jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(again), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert model.covariance_type == covariance_type and model.reg_covar == 1e-6
    assert np.max(_match_means(model.means, CENTRES)) < 0.3
    np.testing.assert_allclose(model.weights, np.full(3, 1 / 3), atol=0.05)
    assert np.all(np.isfinite(model.covariances))


def test_initialize_seeding_depends_on_the_key_only():
    seeds = [
        GaussianMixture.initialize(jr.key(k), X, 3, num_kmeans_iters=0).means for k in (0, 0, 1)
    ]
    np.testing.assert_array_equal(seeds[0], seeds[1])
    assert not np.array_equal(seeds[0], seeds[2])


def test_initialize_small_cluster_gets_global_covariance():
    x = X.copy()
    x[-1] = [60.0, 60.0]  # an outlier that k-means gives a cluster of its own
    model = GaussianMixture.initialize(jr.key(0), x, 3, reg_covar=1e-3)
    alone = int(np.argmax(np.asarray(model.means)[:, 0]))
    np.testing.assert_allclose(model.means[alone], [60.0, 60.0])
    expected = np.cov(x.T, bias=True) + 1e-3 * np.eye(2)
    np.testing.assert_allclose(model.covariances[alone], expected, rtol=1e-10)
    np.testing.assert_allclose(model.weights[alone], 1 / 240, rtol=1e-10)


def test_initialize_errors():
    with pytest.raises(ValueError, match="num_components=6 is larger than the number of data N=5"):
        GaussianMixture.initialize(jr.key(0), X[:5], 6)
    with pytest.raises(ValueError, match=r"x has shape \(240,\), expected \(N, D\)"):
        GaussianMixture.initialize(jr.key(0), X[:, 0], 2)
    with pytest.raises(ValueError, match="covariance_type must be 'full' or 'diag'"):
        GaussianMixture.initialize(jr.key(0), X, 2, "spherical")
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixture.initialize(jr.key(0), X, 2, reg_covar=-1.0)


# ----------------------------------------------------------------------- construction, data
def test_constructor_round_trip_and_properties():
    weights, means, covs = _start("full")
    model = GaussianMixture(weights, means, covs)
    np.testing.assert_allclose(model.weights, weights, rtol=1e-12)
    np.testing.assert_allclose(model.means, means)
    np.testing.assert_allclose(model.covariances, covs, rtol=1e-12, atol=1e-14)
    u = np.asarray(model.precisions_cholesky)
    assert np.allclose(u, np.triu(u))  # scikit-learn's upper-triangular convention
    np.testing.assert_allclose(u @ np.swapaxes(u, -1, -2), np.linalg.inv(covs), rtol=1e-12)
    assert model.latent == ej.Discrete(3)
    assert (model.num_components, model.dim) == (3, 2)
    diag = GaussianMixture(*_start("diag", np.float32), "diag")
    assert diag.raw_precision_factor.dtype == jnp.float32
    np.testing.assert_allclose(diag.covariances, _start("diag")[2], rtol=1e-6)
    np.testing.assert_allclose(diag.precisions_cholesky, 1 / np.sqrt(_start("diag")[2]), rtol=1e-6)


def test_constructor_errors():
    weights, means, covs = _start("full")
    with pytest.raises(ValueError, match="weights has shape"):
        GaussianMixture(weights[:, None], means, covs)
    with pytest.raises(ValueError, match="weights must be positive and sum to 1"):
        GaussianMixture(2 * weights, means, covs)
    with pytest.raises(ValueError, match=r"means has shape \(2, 2\), expected \(K, D\) with K=3"):
        GaussianMixture(weights, means[:2], covs)
    with pytest.raises(ValueError, match=r"covariances has shape \(3, 2\), expected \(3, 2, 2\)"):
        GaussianMixture(weights, means, covs[:, 0])
    with pytest.raises(ValueError, match="covariances must be symmetric positive-definite"):
        GaussianMixture(weights, means, -covs)
    with pytest.raises(ValueError, match="covariances must be positive"):
        GaussianMixture(weights, means, -np.ones((3, 2)), "diag")
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture(weights, means, covs, "tied")


def test_check_data():
    model = _model("full")
    with pytest.raises(ValueError, match=r"x has shape \(5,\), expected \(N, D\) with D=2"):
        model.check_data(np.zeros(5))
    with pytest.raises(ValueError, match=r"x has shape \(5, 3\), expected \(N, D\) with D=2"):
        ej.fit(model, np.zeros((5, 3)))
    with pytest.raises(
        ValueError, match="num_components K=3 is larger than the number of data N=2"
    ):
        ej.fit(model, X[:2])
    with pytest.raises(ValueError, match=r"x has shape \(4,\)"):
        model.predict(np.zeros(4))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_sample(covariance_type):
    model = _model(covariance_type)
    x, z = model.sample(jr.key(0), 4000)
    x2, z2 = model.sample(jr.key(0), 4000)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(z, z2)
    assert x.shape == (4000, 2) and z.shape == (4000,)
    x, z = np.asarray(x), np.asarray(z)
    weights, means, covs = _start(covariance_type)
    np.testing.assert_allclose(np.bincount(z, minlength=3) / 4000, weights, atol=0.03)
    for k in range(3):
        cov = covs[k] if covariance_type == "full" else np.diag(covs[k])
        np.testing.assert_allclose(x[z == k].mean(0), means[k], atol=0.15)
        np.testing.assert_allclose(np.cov(x[z == k].T), cov, atol=0.25)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float64_table_and_statistics_of_a_narrow_far_component(covariance_type):
    # (before: the float64 expansions about the mixture's mean lost ~25 bits here, 5e-9 nats
    # per point, enough for one exact-EM step to lower the ELBO)
    x = jnp.asarray(_narrow_and_far())
    covs = np.array([1.0, 1e-4])[:, None] * (np.eye(2) if covariance_type == "full" else 1)
    model = GaussianMixture(
        np.array([0.5, 0.5]),
        np.array([[0.01, -0.02], [100.001, 99.999]]),
        np.broadcast_to(covs, (2, 2, 2) if covariance_type == "full" else (2, 2)),
        covariance_type,
    )
    table = np.asarray(model.log_joint_table(x))
    reference = np.asarray(ej.Model.log_joint_table(model, x))  # exact differences
    eps = np.finfo(np.float64).eps
    assert np.max(np.abs(table - reference) / (np.abs(reference) + 2)) < 64 * eps
    q = model.posterior(x)
    stats = model.sufficient_statistics(x, q)
    diff = np.asarray(x)[:, None] - np.asarray(model.means)[None]
    r = np.asarray(q.probs)
    second = np.einsum("nk,nki,nkj->kij", r, diff, diff)
    if covariance_type == "diag":
        second = np.einsum("kii->ki", second)
    for k in range(2):
        np.testing.assert_allclose(
            stats.second[k], second[k], rtol=1e-10, atol=1e-10 * np.max(np.abs(second[k]))
        )
