"""Exact EM through chunked statistics passes, and the GMM's matmul table and statistics.

Oracles: the same statistics from the whole posterior at once, the generic (vmapped
``log_joint``) table, plain-NumPy sums over differences, and ``fit`` through the
q-carrying path (``q=ej.Categorical()`` with exact steps runs M-step, E-step, F as before).
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import elbo_jax as ej
from elbo_jax import _data, _fit
from elbo_jax._solvers import _statistics_em
from elbo_jax.models import BernoulliMixture, GaussianMixture, PoissonMixture

RNG = np.random.default_rng(7)


def _gmm(covariance_type, k, d, n, dtype=np.float64, offset=0.0):
    rng = np.random.default_rng(k * 100 + d)
    means = rng.normal(0.0, 2.0, (k, d)) + offset
    if covariance_type == "full":
        a = rng.normal(0.0, 0.3, (k, d, d)) + np.eye(d)
        covs = a @ np.swapaxes(a, -1, -2)
    else:
        covs = rng.uniform(0.5, 2.0, (k, d))
    weights = rng.dirichlet(np.ones(k) * 3)
    z = rng.integers(0, k, n)
    x = means[z] + rng.normal(size=(n, d)) * 1.5
    model = GaussianMixture(
        *(a.astype(dtype) for a in (weights, means + 0.3, covs)), covariance_type
    )
    return model, x.astype(dtype)


def _models():
    gmm_full, x_full = _gmm("full", 3, 2, 200)
    gmm_diag, x_diag = _gmm("diag", 4, 3, 200)
    probs = RNG.uniform(0.1, 0.9, (3, 6))
    bern = BernoulliMixture(np.array([0.2, 0.3, 0.5]), probs)
    x_bern = (RNG.uniform(size=(150, 6)) < probs[RNG.integers(0, 3, 150)]).astype(np.float64)
    pois = PoissonMixture(np.array([0.5, 0.5]), np.array([[1.0, 3.0], [6.0, 0.5]]))
    x_pois = RNG.poisson(np.array([[1.0, 3.0], [6.0, 0.5]])[RNG.integers(0, 2, 120)]).astype(
        np.float64
    )
    return [
        ("gmm-full", gmm_full, x_full),
        ("gmm-diag", gmm_diag, x_diag),
        ("bernoulli", bern, x_bern),
        ("poisson", pois, x_pois),
    ]


MODELS = _models()


def _dataset(x, chunk_size=None):
    return _data.make_dataset(jnp.asarray(x), x.dtype, chunk_size or 0)


def _pass(model, x, chunk_size=None, split=None, closed_form=True):
    """The statistics pass over ``x`` padded to chunks of ``chunk_size`` rows (None: one
    chunk), with the split's features computed once, as ``fit`` does."""
    data = _dataset(x, chunk_size)
    features = None if split is None else split.datum_features(data.x)
    return _statistics_em.statistics_pass(
        model, data, split=split, features=features, closed_form=closed_form
    )


def _assert_same_statistics(got, want):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9), got, want
    )


@pytest.mark.parametrize("name, model, x", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("chunk_size", [None, 7, 64, 10_000])
def test_statistics_pass_equals_whole_posterior(name, model, x, chunk_size):
    x = jnp.asarray(x)
    stats, total = _pass(model, x, chunk_size)
    _assert_same_statistics(stats, model.sufficient_statistics(x, model.posterior(x)))
    np.testing.assert_allclose(total / x.shape[0], ej.log_evidence(model, x), rtol=1e-12)


def _fit_both(model, x, **kwargs):
    via_stats = ej.fit(model, x, tol=0.0, max_iters=6, **kwargs)
    via_q = ej.fit(model, x, q=ej.Categorical(), tol=0.0, max_iters=6, **kwargs)
    return via_stats, via_q


def _assert_same_fit(a, b):
    assert a.num_iters == b.num_iters and a.status == b.status
    np.testing.assert_allclose(a.history, b.history, rtol=1e-12)
    np.testing.assert_allclose(a.initial_elbo, b.initial_elbo, rtol=1e-12)
    for la, lb in zip(
        jax.tree_util.tree_leaves(a.model), jax.tree_util.tree_leaves(b.model), strict=True
    ):
        np.testing.assert_allclose(la, lb, rtol=1e-9, atol=1e-12)
    # result.q of the statistics path is the exact posterior of the returned model
    np.testing.assert_allclose(a.q.probs, b.q.probs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name, model, x", MODELS, ids=[m[0] for m in MODELS])
def test_fit_through_statistics_equals_fit_through_q(name, model, x):
    _assert_same_fit(*_fit_both(model, x))


def test_fit_through_small_chunks_with_a_remainder(monkeypatch):
    # 2**9 elements per chunk: at most ~256 rows, so 403 rows make two chunks of 208 rows
    monkeypatch.setattr(_data, "_CPU_CHUNK_ELEMENTS", 2**9)
    monkeypatch.setattr(_fit, "_CHUNK_ROWS", {})
    model, x = _gmm("full", 3, 2, 403)
    solver, rows = _fit._choose_solver(
        model, x, ej.ExactPosterior(), ej.ExactEStep(), ej.ExactMStep(), None
    )
    assert rows == 256
    assert _data.padded_size(403, 256) == (416, 208)
    _assert_same_fit(*_fit_both(model, x))


def test_kept_features_give_the_fit_computed_without_them(monkeypatch):
    # A full-covariance GMM in float64 keeps its quadratic features for the whole fit
    # (computed chunk by chunk about each chunk's mean, 3 chunks and a padded remainder):
    # the same fit as recomputing them in every pass, and as the q path.
    monkeypatch.setattr(_data, "_CPU_CHUNK_ELEMENTS", 2**10)
    monkeypatch.setattr(_fit, "_CHUNK_ROWS", {})
    model, x = _gmm("full", 3, 4, 700, offset=30.0)
    solver, rows = _fit._choose_solver(
        model, x, ej.ExactPosterior(), ej.ExactEStep(), ej.ExactMStep(), None
    )
    data = _data.make_dataset(jnp.asarray(x), np.float64, rows)
    assert data.num_rows // data.chunk_size == 3
    kept = solver._features(model, data)
    assert kept.shape == (data.num_rows, 4 * 5 // 2 + 4)
    with_features = ej.fit(model, x, tol=0.0, max_iters=6)
    monkeypatch.setattr(_statistics_em, "FEATURE_BUDGET_BYTES", 0)
    monkeypatch.setattr(_statistics_em, "MAX_FEATURE_RATIO", 0)
    assert solver._features(model, data) is None
    _assert_same_fit(with_features, ej.fit(model, x, tol=0.0, max_iters=6))
    _assert_same_fit(with_features, ej.fit(model, x, q=ej.Categorical(), tol=0.0, max_iters=6))


def test_map_fit_through_statistics():
    model, x = _gmm("diag", 3, 2, 150)
    prior = ej.models.GaussianMixturePrior.from_data(x)
    _assert_same_fit(*_fit_both(model, x, prior=prior))


def test_statistics_path_is_used_only_for_exact_em_on_a_discrete_model():
    from elbo_jax._fit import _statistics_plan
    from elbo_jax._steps import ExactEStep, ExactMStep

    model, x = _gmm("diag", 2, 2, 10)
    exact = ExactEStep(), ExactMStep()
    # A GMM's log-joint is quadratic in x: closed form, no split.
    assert _statistics_plan(model, x, ej.ExactPosterior(), *exact, None) == (True, None)
    for q in (ej.Categorical(), ej.PointMass()):
        assert _statistics_plan(model, x, q, *exact, None) == (False, None)
    no_closed_form = ExactMStep(use_closed_form=False)
    assert _statistics_plan(model, x, ej.ExactPosterior(), exact[0], no_closed_form, None) == (
        False,
        None,
    )
    assert _statistics_plan(model, x, ej.ExactPosterior(), *exact, lambda m: 0.0) == (False, None)
    # A Poisson mixture's log-joint is affine in x and log x!: closed form and a split.
    counts = jnp.asarray(np.random.default_rng(0).poisson(3.0, (10, 2)), jnp.float64)
    poisson = ej.models.PoissonMixture(jnp.array([0.5, 0.5]), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
    closed_form, split = _statistics_plan(poisson, counts, ej.ExactPosterior(), *exact, None)
    assert closed_form and split is not None and not any(split.per_state)


# ------------------------------------------------------------ the GMM's table and statistics
# (K, D, dtype): full float64 with K >= (D+1)/2 uses the quadratic features, full float64 with
# K < (D+1)/2 and full float32 use the differences; diag always uses the matmul expansion.
BRANCHES = [
    ("full", 3, 2, np.float64),
    ("full", 2, 6, np.float64),
    ("full", 3, 2, np.float32),
    ("diag", 3, 4, np.float64),
    ("diag", 3, 4, np.float32),
]


def _brute_force_statistics(model, x, resp):
    x, resp = np.asarray(x, np.float64), np.asarray(resp, np.float64)
    diff = x[:, None, :] - np.asarray(model.means, np.float64)[None]
    second = np.einsum("nk,nki,nkj->kij", resp, diff, diff)
    if model.covariance_type == "diag":
        second = np.einsum("kii->ki", second)
    return {
        "counts": resp.sum(0),
        "first": np.einsum("nk,nkd->kd", resp, diff),
        "second": second,
    }


@pytest.mark.parametrize("covariance_type, k, d, dtype", BRANCHES)
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_gmm_table_and_statistics_on_every_branch(covariance_type, k, d, dtype, offset):
    model, x = _gmm(covariance_type, k, d, 300, dtype, offset)
    x = jnp.asarray(x)
    rtol = 1e-10 if dtype == np.float64 else 2e-4
    table = model.log_joint_table(x)
    assert table.dtype == dtype
    generic = ej.Model.log_joint_table(model, x)
    np.testing.assert_allclose(table, generic, rtol=rtol, atol=rtol * 10)
    q = model.posterior(x)
    stats = model.sufficient_statistics(x, q)
    expected = _brute_force_statistics(model, x, q.probs)
    for key, value in expected.items():
        assert getattr(stats, key).dtype == dtype
        scale = np.max(np.abs(value))
        np.testing.assert_allclose(
            getattr(stats, key), value, rtol=rtol, atol=rtol * scale, err_msg=key
        )
    # The hooks given their own precomputed features give the same (bitwise: same maths).
    features = model.datum_features(x)
    if features is not None:
        assert covariance_type == "full" and dtype == np.float64
        np.testing.assert_array_equal(model.log_joint_table(x, features=features), table)
        given = model.sufficient_statistics(x, q, features=features)
        jax.tree_util.tree_map(np.testing.assert_array_equal, given, stats)


def test_kmeans_start_covariances_are_cluster_scatters():
    model, x = _gmm("full", 3, 2, 300)
    init = GaussianMixture.initialize(jr.key(1), x, 3, reg_covar=0.0, num_kmeans_iters=50)
    labels = np.argmin(((x[:, None] - np.asarray(init.means)[None]) ** 2).sum(-1), axis=1)
    for k in range(3):
        members = x[labels == k]
        np.testing.assert_allclose(init.means[k], members.mean(0), rtol=1e-10)
        np.testing.assert_allclose(
            init.covariances[k], np.cov(members.T, bias=True), rtol=1e-8, atol=1e-12
        )
        np.testing.assert_allclose(init.weights[k], len(members) / len(x), rtol=1e-10)


# ------------------------------------------------------------ the result's posterior, in chunks
@pytest.mark.parametrize("name, model, x", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("chunk_size", [None, 7, 10_000])
def test_posterior_of_data_in_chunks_equals_the_whole_posterior(name, model, x, chunk_size):
    from elbo_jax import _autostats

    n = x.shape[0]
    data = _dataset(x, chunk_size)
    x = jnp.asarray(x)
    expected = model.posterior(x).log_probs
    got = _statistics_em.posterior_of_data(model, data).logits[:n]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    split = _autostats.affine_split(model, x)
    if split is not None:  # the Poisson and Bernoulli mixtures: the table from features
        features = split.datum_features(data.x)
        got = _statistics_em.posterior_of_data(model, data, split=split, features=features)
        got = got.logits
        np.testing.assert_allclose(got[:n], expected, rtol=1e-10, atol=1e-10)
        stats, total = _pass(model, x, chunk_size, split=split)
        _assert_same_statistics(stats, model.sufficient_statistics(x, model.posterior(x)))
        np.testing.assert_allclose(total / n, ej.log_evidence(model, x), rtol=1e-12)


def test_statistics_path_keeps_the_last_finite_model():
    # A closed-form M-step that overflows after a few iterations: the fit stops with
    # NONFINITE and returns the last finite model and its posterior.
    from helpers import poisson_data

    class Overflowing(ej.Model):
        log_rates: jax.Array
        boost: jax.Array
        latent = ej.Discrete(2)

        def log_joint(self, x, z):
            rate = jnp.exp(self.log_rates[z])
            return x * self.log_rates[z] - rate - jax.scipy.special.gammaln(x + 1) - jnp.log(2.0)

        def has_closed_form(self, prior):
            return prior is None

        def sufficient_statistics(self, x, q, *, weights=None):
            resp = q.probs * weights[:, None]
            return {"counts": jnp.sum(resp, 0), "sums": resp.T @ x}

        def maximize(self, stats, prior=None):
            log_rates = jnp.log(stats["sums"] / stats["counts"]) + self.boost
            return Overflowing(log_rates, self.boost * 8.0)

    x = poisson_data(n=80, seed=3)
    model = Overflowing(jnp.log(jnp.array([1.0, 6.0])), jnp.array(1.0))
    with pytest.warns(RuntimeWarning) as record:  # the boosted M-steps also raise F
        res = ej.fit(model, x, max_iters=20, tol=0.0)
    assert any("a step made the free energy" in str(w.message) for w in record)
    assert res.status == ej.Status.NONFINITE and 1 <= res.num_iters < 20
    assert np.isfinite(res.history).all() and np.isfinite(res.initial_elbo)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(res.model))
    np.testing.assert_allclose(res.history[-1], ej.log_evidence(res.model, x), rtol=1e-12)
    np.testing.assert_allclose(res.q.probs, res.model.posterior(jnp.asarray(x)).probs, rtol=1e-10)


def test_a_table_hook_is_kept_unless_the_model_prefers_features():
    # A log-joint affine in x has a split; its table hook (here marked by a constant shift,
    # which moves log p(x) but not the posterior) is what the pass uses, unless the class
    # sets _table_from_features (as PoissonMixture does).
    from elbo_jax import _autostats

    class Hooked(ej.Model):
        logits: jax.Array
        latent = ej.Discrete(2)

        def log_joint(self, x, z):
            return jax.nn.log_softmax(self.logits)[z] + x * self.logits[z] - jnp.exp(self.logits[z])

        def log_joint_table(self, x):
            return (
                jax.vmap(lambda xn: jax.vmap(lambda z: self.log_joint(xn, z))(jnp.arange(2)))(x)
                + 1.0
            )

    class PrefersFeatures(Hooked):
        _table_from_features = True

    x = jnp.asarray(RNG.poisson(2.0, 20), jnp.float64)
    exact = float(
        jnp.sum(jax.nn.logsumexp(Hooked(jnp.array([0.2, 1.1])).log_joint_table(x) - 1.0, -1))
    )
    for cls, shift in ((Hooked, 20.0), (PrefersFeatures, 0.0)):
        model = cls(jnp.array([0.2, 1.1]))
        split = _autostats.affine_split(model, x)
        assert split is not None
        _, total = _pass(model, x, split=split, closed_form=False)
        np.testing.assert_allclose(float(total), exact + shift, rtol=1e-12)
