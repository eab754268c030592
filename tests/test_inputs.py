"""Inputs as users pass them: NumPy scalars and lists where numbers and arrays are expected,
data checked by the evaluation functions as ``fit`` checks it, and float64 NumPy input with
x64 off (no warning from inside elbo_jax)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import elbo_jax as ej
from elbo_jax.models import (
    PPCA,
    BernoulliMixture,
    BernoulliMixturePrior,
    FactorAnalysis,
    GaussianMixture,
    PoissonMixture,
    PoissonMixturePrior,
)

X = np.concatenate([np.random.default_rng(0).normal(size=(30, 2)), 5 + np.zeros((30, 2))])


def test_numpy_scalars_and_lists():
    model = GaussianMixture.initialize(
        jr.key(0), X, np.int64(2), "diag", reg_covar=np.float32(1e-5), num_kmeans_iters=np.int32(5)
    )
    assert model.reg_covar == pytest.approx(1e-5) and type(model.reg_covar) is float
    listed = GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [2.0, 2.0]], "diag")
    assert listed.means.shape == (2, 2)
    assert ej.Discrete(np.int64(3)).num_states == 3
    assert type(ej.Discrete(np.int64(3)).num_states) is int
    assert ej.Real(np.int64(2)).shape == (2,)
    xl = np.random.default_rng(1).normal(size=(40, 4))
    for cls in (PPCA, FactorAnalysis):
        m = cls.initialize(jr.key(0), xl, np.int64(2), min_noise_variance=np.float64(1e-4))
        assert m.min_noise_variance == pytest.approx(1e-4)
    prior = BernoulliMixturePrior(concentration=np.float64(1.0), a=np.int64(2), b=np.float32(2))
    assert (
        prior.a == 2
        and type(prior.a) is int
        and hash(prior) == hash(BernoulliMixturePrior(1.0, 2.0, 2.0))
    )
    assert type(PoissonMixturePrior(shape=np.float64(2.0), rate=np.int64(1)).shape) is float
    xb = (np.random.default_rng(2).random((40, 3)) < 0.5).astype(np.int64)
    BernoulliMixture.initialize(jr.key(0), xb, np.int64(2), min_prob=np.float64(1e-5))
    PoissonMixture.initialize(jr.key(0), xb, np.int32(2), min_rate=np.float32(1e-5))
    with pytest.raises(TypeError, match="num_components must be an int"):
        GaussianMixture.initialize(jr.key(0), X, 2.0)
    with pytest.raises(ValueError, match="reg_covar must be a finite number"):
        GaussianMixture.initialize(jr.key(0), X, 2, reg_covar=np.True_)


def _fitted():
    gmm = GaussianMixture.initialize(jr.key(0), X, 2)
    ppca = PPCA.initialize(jr.key(0), np.random.default_rng(1).normal(size=(40, 3)), 1)
    return gmm, ppca


@pytest.mark.parametrize("name", ["predict", "predict_proba", "score", "bic", "aic"])
def test_evaluation_functions_check_x(name):
    gmm, _ = _fitted()
    fn = getattr(gmm, name)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"x contains NaN or Inf.*index \(3, 1\)"):
        fn(bad)
    with pytest.raises(ValueError, match=r"x contains NaN or Inf"):
        fn(jnp.asarray(bad))
    with pytest.raises(ValueError, match=r"x has shape \(60, 3\), expected \(N, D\) with D=2"):
        fn(np.zeros((60, 3)))
    with pytest.raises(ValueError, match=r"x has shape \(2,\)"):
        fn(np.zeros(2))
    fn(X[:1])  # one datum is fine to evaluate (fewer than K)
    # inside a user's jit: shapes checked, values not
    out = jax.jit(lambda x: getattr(gmm, name)(x))(jnp.asarray(X))
    assert np.all(np.isfinite(np.asarray(out, np.float64)))


def test_transform_and_mixtures_check_x():
    _, ppca = _fitted()
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ppca.transform(np.full((4, 3), np.inf))
    with pytest.raises(ValueError, match=r"x has shape \(4, 2\)"):
        ppca.transform(np.zeros((4, 2)))
    xb = (np.random.default_rng(2).random((40, 3)) < 0.5).astype(np.float64)
    bern = BernoulliMixture.initialize(jr.key(0), xb, 2)
    with pytest.raises(ValueError, match="x must be binary"):
        bern.predict(xb + 0.5)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        bern.predict_proba(np.where(xb > 0, np.nan, 0.0))


def test_a_model_without_float_parameters_gets_a_clear_error():
    from elbo_jax._validate import check_has_parameters

    class Empty(ej.Model):
        latent = ej.Discrete(2)

        def log_joint(self, x, z):
            return -0.5 * jnp.sum((x - z.astype(x.dtype)) ** 2)

    with pytest.raises(TypeError, match="no floating-point array fields"):
        check_has_parameters(Empty())
    assert np.isfinite(float(ej.log_evidence(Empty(), X)))  # evaluating it is fine


_X64_OFF = """
    import numpy as np, jax, jax.numpy as jnp
    import elbo_jax as ej
    from elbo_jax.models import *
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(50, 2)), 5 + rng.normal(size=(50, 2))])
    key = jax.random.key(0)
    for cov in ("full", "diag"):
        m = GaussianMixture.initialize(key, x, np.int64(2), cov, reg_covar=np.float64(1e-5))
        r = ej.fit(m, x, max_iters=5)
        r.model.predict(x); r.model.predict_proba(x); r.model.score(x); r.model.bic(x)
        covs = np.stack([np.eye(2)] * 2) if cov == "full" else np.ones((2, 2))
        ej.fit(GaussianMixture(np.array([0.5, 0.5]), np.array([[0., 0.], [5., 5.]]), covs, cov),
               x, max_iters=3, tol=0)
    xb = (rng.random((100, 4)) < 0.3).astype(np.float64)
    b = BernoulliMixture.initialize(key, xb, 2, min_prob=np.float64(1e-6))
    ej.fit(b, xb, max_iters=3, tol=0, prior=BernoulliMixturePrior(a=np.float64(2.0))).model.predict(xb)
    xp = rng.poisson(3.0, (100, 3)).astype(np.float64)
    p = PoissonMixture(np.array([0.5, 0.5]), np.full((2, 3), 2.0))
    ej.fit(p, xp, max_iters=3, tol=0, prior=PoissonMixturePrior(shape=np.float64(2.0))).model.predict(xp)
    ej.fit(PoissonMixture.initialize(key, xp, 2), xp, max_iters=3, tol=0)
    xl = rng.normal(size=(100, 4))
    for cls in (PPCA, FactorAnalysis):
        m = cls.initialize(key, xl, 2, min_noise_variance=np.float64(1e-6))
        ej.fit(m, xl, max_iters=3, tol=0).model.transform(xl)
    PPCA(np.ones((4, 2)), np.zeros(4), np.float64(1.0))

    class User(ej.Model):
        mu: jax.Array
        latent = ej.Discrete(np.int64(2))

        def log_joint(self, x, z):
            return -0.5 * jnp.sum((x - jnp.take(self.mu, z, axis=0)) ** 2)

    user = User(np.array([[0., 0.], [5., 5.]]))
    ej.fit(user, x, max_iters=3, tol=0)
    ej.log_evidence(user, x)
    print("done")
"""


def test_float64_numpy_input_with_x64_off_does_not_warn():
    env = {"JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu", "PATH": ""}
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")  # the test run's (conftest.py)
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(_X64_OFF)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done" in out.stdout
