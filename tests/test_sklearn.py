"""elbo_jax.sklearn: scikit-learn's estimator checks, and agreement with scikit-learn.

Compiling the fit dominates this file's time (each new data shape compiles a fit), so the
tests share data shapes where they can: the grid search fits 30 x 3 training folds, the
shape of scikit-learn's ``check_fit_score_takes_y`` (K = 1) and of X30, on which the
scikit-learn comparison, n_init and pickle tests fit K = 3.
"""

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import GaussianMixture as SkGaussianMixture  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import estimator_checks_generator  # noqa: E402

from elbo_jax.sklearn import (  # noqa: E402
    PPCA,
    BernoulliMixture,
    FactorAnalysis,
    GaussianMixture,
    PoissonMixture,
)


def _blobs(seed: int = 0) -> np.ndarray:
    """Three separated clusters in 3-D, 15 points each (45 x 3), in random order."""
    rng = np.random.RandomState(seed)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 1.0, 0.0], [2.0, 7.0, 3.0]])
    scales = np.array([[1.0, 0.5, 0.7], [0.6, 1.2, 0.5], [0.8, 0.8, 1.0]])
    x = np.concatenate([c + s * rng.randn(15, 3) for c, s in zip(centres, scales, strict=True)])
    return x[rng.permutation(45)]


BLOBS = _blobs()
X30 = BLOBS[:30]


# ------------------------------------------------------------------ scikit-learn's checks
class _RoundedPoissonMixture(PoissonMixture):  # a test shim: PoissonMixture is final
    """PoissonMixture on the checks' data rounded to whole numbers: scikit-learn's checks
    generate continuous data (made nonnegative for the ``positive_only`` tag), which a
    Poisson mixture rightly refuses; everything else is PoissonMixture's own code."""

    def _counts(self, x):
        return np.round(x)


# scikit-learn's checks fit data of about a dozen shapes, and each new shape compiles a fit
# (seconds each): all checks on all five estimators take minutes. Every check that needs no
# fit runs on every estimator, and so do the pickle, pipeline and transformer checks (one
# shared shape); each other fitting check runs on one estimator (they share their base
# class's fit and validation). ELBO_JAX_ALL_SKLEARN_CHECKS=1 runs every check on every
# estimator (all pass).
_ON_EVERY_ESTIMATOR = {
    "check_fit_score_takes_y",
    "check_pipeline_consistency",
    "check_estimators_pickle",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_transformer_n_iter",
}
_FITTING_CHECKS = {
    GaussianMixture: {
        "check_dont_overwrite_parameters",
        "check_f_contiguous_array_estimator",
        "check_methods_sample_order_invariance",
        "check_methods_subset_invariance",
        "check_dict_unchanged",
        "check_fit2d_predict1d",
        "check_estimators_dtypes",
    },
    BernoulliMixture: {
        "check_estimators_overwrite_params",
        "check_estimators_fit_returns_self",
        "check_readonly_memmap_input",
        "check_estimators_nan_inf",
        "check_fit_idempotent",
    },
    _RoundedPoissonMixture: {
        "check_positive_only_tag_during_fit",
        "check_fit_check_is_fitted",
        "check_n_features_in",
        "check_n_features_in_after_fitting",
    },
    FactorAnalysis: {"check_dtype_object"},
    PPCA: {"check_fit2d_1feature"},
}
_ASSIGNED = set().union(*_FITTING_CHECKS.values())
_ALL_CHECKS = os.environ.get("ELBO_JAX_ALL_SKLEARN_CHECKS") == "1"


def _checks():
    estimators = [
        GaussianMixture(random_state=0),
        BernoulliMixture(random_state=0),
        _RoundedPoissonMixture(random_state=0),
        FactorAnalysis(2, random_state=0),  # L = 2: the FactorAnalysis comparison's program
        PPCA(),
    ]
    for estimator in estimators:
        for est, check in estimator_checks_generator(estimator):
            name = getattr(check, "func", check).__name__
            if (
                _ALL_CHECKS
                or name in _ON_EVERY_ESTIMATOR
                or name not in _ASSIGNED  # needs no fit (or is new)
                or name in _FITTING_CHECKS[type(estimator)]
            ):
                yield pytest.param(est, check, id=f"{type(est).__name__}-{name}")


@pytest.mark.parametrize("estimator, check", list(_checks()))
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        # The checks fit arbitrary data with the default tol; whether a fit of random
        # noise converges within max_iter is not what they test.
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


# ------------------------------------------------------------------ Gaussian mixture
def test_pipeline_grid_search_picks_the_number_of_clusters():
    pipe = make_pipeline(StandardScaler(), GaussianMixture(random_state=0))
    # refit=False: a refit on all 45 rows would compile one more fit for no more insight.
    search = GridSearchCV(pipe, {"gaussianmixture__n_components": [1, 2, 3]}, cv=3, refit=False)
    search.fit(BLOBS)  # scored by GaussianMixture.score: the held-out log-likelihood
    assert search.best_params_ == {"gaussianmixture__n_components": 3}
    scores = search.cv_results_["mean_test_score"]
    assert scores[0] < scores[1] < scores[2]


def _start(covariance_type):
    weights = np.array([0.2, 0.3, 0.5])
    means = np.array([[1.0, 1.0, 1.0], [4.0, 2.0, 0.0], [3.0, 5.0, 2.0]])  # off the centres
    if covariance_type == "full":
        tilted = np.array([[1.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 2.0]])
        precisions = np.linalg.inv(np.stack([tilted, np.eye(3), np.diag([2.0, 1.0, 0.5])]))
    else:
        precisions = 1 / np.array([[1.0, 1.0, 2.0], [1.0, 2.0, 1.0], [0.5, 1.0, 1.0]])
    return {"weights_init": weights, "means_init": means, "precisions_init": precisions}


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("max_iter", [3, 100])
def test_gaussian_mixture_equals_sklearn(covariance_type, max_iter):
    options = dict(covariance_type=covariance_type, tol=1e-3, max_iter=max_iter)
    options.update(_start(covariance_type))
    sk = SkGaussianMixture(3, **options)
    ours = GaussianMixture(3, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=3 stops early: both warn
        sk.fit(X30)
        ours.fit(X30)
    assert ours.n_iter_ == sk.n_iter_
    assert sk.n_iter_ == 3 if max_iter == 3 else sk.n_iter_ > 3
    assert ours.converged_ == sk.converged_ == (max_iter == 100)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(sk, name), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(ours.lower_bound_, sk.lower_bound_, rtol=1e-6)
    np.testing.assert_allclose(ours.lower_bounds_, sk.lower_bounds_, rtol=1e-6)
    held_out = BLOBS[30:]
    np.testing.assert_allclose(ours.score_samples(held_out), sk.score_samples(held_out), rtol=1e-6)
    np.testing.assert_allclose(ours.predict_proba(held_out), sk.predict_proba(held_out), atol=1e-9)
    np.testing.assert_allclose(ours.bic(X30), sk.bic(X30), rtol=1e-6)
    np.testing.assert_allclose(ours.aic(X30), sk.aic(X30), rtol=1e-6)


def test_warm_start_continues_like_sklearn():
    options = dict(warm_start=True, max_iter=2, **_start("full"))
    sk, ours = SkGaussianMixture(3, **options), GaussianMixture(3, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(3):  # each fit continues from the last, its first test against it
            sk.fit(X30)
            ours.fit(X30)
            assert (ours.n_iter_, ours.converged_) == (sk.n_iter_, sk.converged_)
            np.testing.assert_allclose(ours.means_, sk.means_, rtol=1e-6)
            np.testing.assert_allclose(ours.lower_bound_, sk.lower_bound_, rtol=1e-6)


def test_gaussian_mixture_warns_like_sklearn_when_not_converged():
    options = dict(max_iter=3, **_start("full"))
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixture(3, **options).fit(X30)


def test_n_init_fits_the_starts_together_and_keeps_the_best():
    gm = GaussianMixture(3, n_init=4, init_params="random", random_state=0).fit(X30)
    assert gm.init_lower_bounds_.shape == (4,)  # one vmapped ej.fit with restarts=4
    assert gm.lower_bound_ == np.max(gm.init_lower_bounds_)
    assert np.ptp(gm.init_lower_bounds_) > 1e-3  # the starts differ, and end differently


def test_covariance_types_the_model_lacks_are_refused():
    for covariance_type in ("tied", "spherical"):
        with pytest.raises(ValueError, match="not available.*'full' and 'diag'"):
            GaussianMixture(covariance_type=covariance_type).fit(BLOBS)


def test_pickle_round_trip_predicts_the_same():
    gm = GaussianMixture(3, random_state=0, **_start("full")).fit(X30)
    again = pickle.loads(pickle.dumps(gm))
    np.testing.assert_array_equal(again.predict(BLOBS), gm.predict(BLOBS))
    np.testing.assert_array_equal(again.score_samples(BLOBS), gm.score_samples(BLOBS))


# ------------------------------------------------------------------ factor analysis
def test_factor_analysis_score_matches_sklearn():
    # 56 x 10 with L = 2: the shape of check_dtype_object, whose fit program this shares.
    rng = np.random.RandomState(0)
    loadings = 2 * rng.randn(10, 2)
    x = rng.randn(56, 2) @ loadings.T + rng.randn(56, 10) * np.sqrt(rng.uniform(0.5, 1.5, 10))
    sk = SkFactorAnalysis(2, tol=1e-6, svd_method="lapack").fit(x)
    ours = FactorAnalysis(2, tol=1e-6).fit(x)
    # Both maximise the same likelihood and stop when an iteration adds less than tol = 1e-6
    # to the total log-likelihood (2e-8 per sample). Both converge linearly (EM here at a
    # rate near 0.95), so each stops within about 20 tol / N of the maximum per sample:
    # asserted below 1e-6 per sample (|score| ~ 20). Near the maximum a parameter error e
    # costs ~e^2 in log-likelihood, so the rotation-invariant covariance W W^T + Psi and the
    # noise variances (identifiable: L = 2, D = 10) agree to ~sqrt(1e-6): asserted at 1e-2
    # relative; each sample's log-likelihood, first order in them, to 1e-3.
    assert abs(ours.score(x) - sk.score(x)) < 1e-6
    np.testing.assert_allclose(ours.score_samples(x), sk.score_samples(x), rtol=1e-3)
    covariance = ours.get_covariance()
    scale = np.max(np.abs(covariance))
    np.testing.assert_allclose(covariance, sk.get_covariance(), rtol=0, atol=1e-2 * scale)
    np.testing.assert_allclose(ours.noise_variance_, sk.noise_variance_, rtol=1e-2)
    np.testing.assert_allclose(ours.get_precision() @ covariance, np.eye(10), atol=1e-9)
    assert ours.components_.shape == (2, 10) and ours.transform(x).shape == (56, 2)
    assert ours.loglike_[-1] == pytest.approx(56 * ours.score(x), rel=1e-9)


def test_ppca_is_the_closed_form_maximum_likelihood():
    from sklearn.decomposition import PCA

    n = 30  # 30 x 3 with L = 2: the shape of PPCA's check_fit_score_takes_y
    x = np.random.RandomState(1).randn(n, 3) @ np.diag([3.0, 2.0, 0.5])
    ppca = PPCA(2).fit(x)
    # PCA.score is the PPCA log-likelihood at PCA's estimate, Tipping & Bishop's closed form
    # from the covariance with 1/(N-1): the maximum likelihood is the same with 1/N.
    pca = PCA(2).fit(x)
    np.testing.assert_allclose(ppca.noise_variance_, pca.noise_variance_ * (n - 1) / n, rtol=1e-9)
    assert pca.score(x) < ppca.score(x) < pca.score(x) + 1e-3
    assert ppca.n_iter_ <= 2


# ------------------------------------------------------------------ installation, dtypes
def test_import_without_sklearn_and_float64_input_with_x64_off():
    """In a fresh interpreter (JAX's default: x64 off): ``import elbo_jax`` never imports
    scikit-learn, ``import elbo_jax.sklearn`` without it says how to install it, and with it
    float64 input fits, predicts and scores with no warning at all, in float32."""
    script = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("error")
        sys.modules["sklearn"] = None  # as if scikit-learn were not installed
        import elbo_jax
        assert "sklearn" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
        try:
            import elbo_jax.sklearn
        except ImportError as error:
            assert "pip install 'elbo_jax[sklearn]'" in str(error), error
        else:
            raise AssertionError("no ImportError without scikit-learn")
        for name in [m for m in sys.modules if m == "sklearn" or m.startswith("elbo_jax.sklearn")]:
            del sys.modules[name]
        import numpy as np
        from elbo_jax.sklearn import GaussianMixture
        x = np.random.RandomState(0).randn(40, 2)  # float64, as are the starting values
        start = dict(weights_init=[0.5, 0.5], means_init=[[0.0, 0.0], [1.0, 1.0]],
                     precisions_init=np.stack([np.eye(2)] * 2))
        gm = GaussianMixture(2, **start)
        gm.fit(x.tolist()).predict(x)
        assert gm.means_.dtype == np.float32 and isinstance(gm.means_, np.ndarray)
        assert np.isfinite(gm.score(x)) and np.isfinite(gm.bic(x))
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
