"""DirichletMultinomialMixture and NewtonMStep.

Oracles: SciPy's Dirichlet-multinomial pmf; SciPy's L-BFGS-B on each component's weighted
Pólya likelihood with the same responsibilities; a NumPy implementation of Minka's fixed
point for the one-component MLE; data drawn with NumPy. Compiled functions are shared:
one Newton M-step per dtype, one fit program for the 3-component float32 fits.
"""

import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special as sps
from scipy.stats import dirichlet_multinomial

import elbo_jax as ej
from elbo_jax._newton import minimize_diagonal_plus_rank_one
from elbo_jax._newton_step import NewtonStepState

DM = ej.models.DirichletMultinomialMixture
WEIGHTS = np.array([0.3, 0.5, 0.2])
CONCENTRATIONS = np.array([[20.0, 5, 1, 1, 3, 0.5], [1.0, 2, 10, 10, 1, 1], [2.0, 2, 2, 2, 30, 30]])


def _draw(seed, n, trials, weights=WEIGHTS, concentrations=CONCENTRATIONS):
    """``n`` count vectors of ``trials`` counts from a DM mixture (NumPy), and their labels."""
    rng = np.random.default_rng(seed)
    z = rng.choice(len(weights), n, p=weights)
    x = np.stack([rng.multinomial(trials, rng.dirichlet(concentrations[k])) for k in z])
    return x.astype(np.float64), z


X, _ = _draw(0, 200, 30)
STEP = ej.NewtonMStep()


@jax.jit
def _newton_step(model, q, x):
    return STEP.step(model, q, STEP.init(model), x, key=None, prior=None)


def _posterior(model, x):
    """The exact posterior as a plain ``Categorical(logits)`` (one pytree structure for all
    calls of ``_newton_step``)."""
    table = model.log_joint_table(jnp.asarray(x, model.log_concentrations.dtype))
    return ej.Categorical(table - jax.nn.logsumexp(table, axis=-1, keepdims=True))


def _polya_nll(log_a, x, r):
    """Component objective -L(a)/N_k in log a, and its gradient (NumPy, float64)."""
    a = np.exp(log_a)
    total, n = a.sum(), x.sum(axis=1)
    per = sps.gammaln(total) - sps.gammaln(n + total)
    per = per + (sps.gammaln(x + a) - sps.gammaln(a)).sum(axis=1)
    grad = r @ (sps.digamma(x + a) - sps.digamma(a)) + r @ (
        sps.digamma(total) - sps.digamma(n + total)
    )
    return -(r @ per) / r.sum(), -grad * a / r.sum()


def _polish(a, x, r, num_steps=3):
    """Dense Newton steps on the gradient of -L(a) (NumPy: the full V x V Hessian and
    ``np.linalg.solve``, not the library's Sherman-Morrison): the root of the gradient does
    not depend on how the Hessian is formed, and Newton reaches it to rounding level."""
    n = x.sum(axis=1)
    for _ in range(num_steps):
        total = a.sum()
        grad = r @ (sps.digamma(x + a) - sps.digamma(a)) + r @ (
            sps.digamma(total) - sps.digamma(n + total)
        )
        hess = np.diag(r @ (sps.polygamma(1, x + a) - sps.polygamma(1, a)))
        hess = hess + r @ (sps.polygamma(1, total) - sps.polygamma(1, n + total))
        a = a - np.linalg.solve(hess, grad)
    return a


def _scipy_m_step(x, r, start):
    """Each component's concentrations by L-BFGS-B on the same responsibilities. L-BFGS-B
    stops on a failed line search with a gradient of 1e-10 to 1e-8 even when restarted from
    its own answer (measured: 7e-8 relative in one concentration), so its answer is
    polished by dense Newton steps (``_polish``) to rounding level."""
    out = []
    for k in range(r.shape[1]):
        log_a = np.log(start[k])
        for _ in range(3):
            options = {"ftol": 0.0, "gtol": 1e-14, "maxiter": 10_000, "maxcor": 30}
            res = scipy.optimize.minimize(
                _polya_nll, log_a, args=(x, r[:, k]), jac=True, method="L-BFGS-B", options=options
            )
            log_a = res.x
        out.append(_polish(np.exp(log_a), x, r[:, k]))
    return np.array(out)


def _rounding(history, dtype):
    return 64 * float(np.finfo(dtype).eps) * (1 + np.max(np.abs(history))) * math.sqrt(600)


# --------------------------------------------------------------------------- density
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_log_joint_matches_scipy(dtype):
    model = DM(jnp.asarray(WEIGHTS, dtype), jnp.asarray(CONCENTRATIONS, dtype))
    x = np.concatenate([X[:6], np.zeros((1, 6)), [[0, 0, 7, 0, 0, 1]]])  # an empty document
    ref = np.array(
        [
            [
                math.log(w) + dirichlet_multinomial.logpmf(xi, a, int(xi.sum()))
                for w, a in zip(WEIGHTS, CONCENTRATIONS, strict=True)
            ]
            for xi in x
        ]
    )
    table = model.log_joint_table(jnp.asarray(x, dtype))
    states = jnp.arange(3)
    by_log_joint = jax.vmap(lambda xi: jax.vmap(lambda z: model.log_joint(xi, z))(states))(
        jnp.asarray(x, dtype)
    )
    tol = 1e-11 if dtype == jnp.float64 else 2e-5
    assert table.dtype == dtype
    np.testing.assert_allclose(np.asarray(table), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(by_log_joint), ref, rtol=tol, atol=tol)


def test_sample_moments():
    model = DM(jnp.asarray(WEIGHTS), jnp.asarray(CONCENTRATIONS))
    x, z = model.sample(jax.random.key(0), 3000, num_trials=20)
    x, z = np.asarray(x), np.asarray(z)
    assert x.shape == (3000, 6) and x.dtype == np.float64
    np.testing.assert_array_equal(x.sum(axis=1), 20)
    for k in range(3):
        mean = x[z == k].mean(axis=0) / 20
        np.testing.assert_allclose(mean, CONCENTRATIONS[k] / CONCENTRATIONS[k].sum(), atol=0.03)
    np.testing.assert_allclose(np.bincount(z) / 3000, WEIGHTS, atol=0.03)


# --------------------------------------------------------------------------- M-step
def test_newton_m_step_matches_lbfgs():
    start = DM.initialize(jax.random.key(1), X, 3)
    q = _posterior(start, X)
    new, state = _newton_step(start, q, X)
    r = np.asarray(q.probs)
    ref = _scipy_m_step(X, r, np.asarray(start.concentrations))
    np.testing.assert_allclose(np.asarray(new.concentrations), ref, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(new.weights), r.mean(axis=0), rtol=1e-12)
    assert int(state.num_failed) == 0 and int(state.num_unconverged) == 0

    # The library's own numerical M-step (ExactMStep: optax L-BFGS on F over all
    # parameters) stops at a gradient of about eps**0.75, which leaves ~5e-8 relative in
    # the concentrations (the precision direction is weakly curved): 1e-6 on parameters,
    # and Newton's F is no larger.
    numerical, _ = jax.jit(
        lambda m, q, x: ej.ExactMStep().step(m, q, None, x, key=None, prior=None)
    )(start, q, X)
    np.testing.assert_allclose(np.asarray(numerical.concentrations), ref, rtol=1e-6)
    f_newton = float(ej.free_energy(new, q, X))
    assert f_newton <= float(ej.free_energy(numerical, q, X)) + 1e-13


def test_newton_m_step_float32():
    x32 = X.astype(np.float32)
    start = DM.initialize(jax.random.key(1), x32, 3)
    q = _posterior(start, x32)
    new, state = _newton_step(start, q, x32)
    assert new.log_concentrations.dtype == jnp.float32
    r = np.asarray(q.probs, np.float64)
    ref = _scipy_m_step(X, r, np.asarray(start.concentrations, np.float64))
    np.testing.assert_allclose(np.asarray(new.concentrations), ref, rtol=1e-4)  # measured 3e-6
    assert int(state.num_failed) == 0 and int(state.num_unconverged) == 0


def test_one_component_fit_matches_minka_fixed_point():
    x, _ = _draw(1, 150, 25)
    res = ej.fit(DM.initialize(jax.random.key(3), x, 1), x, tol=1e-12)
    assert res.converged and isinstance(res.state.solver_state.m_state, NewtonStepState)
    n, a = x.sum(axis=1), np.ones(x.shape[1])
    for _ in range(100_000):  # Minka (2000), eq. (55): a fixed point that raises L
        total = a.sum()
        ratio = (sps.digamma(x + a) - sps.digamma(a)).sum(axis=0)
        new = a * ratio / (sps.digamma(n + total) - sps.digamma(total)).sum()
        done = np.max(np.abs(new / a - 1)) < 1e-15
        a = new
        if done:
            break
    np.testing.assert_allclose(np.asarray(res.model.concentrations[0]), a, rtol=1e-8)


def test_zero_counts_and_an_empty_column():
    x = X.copy()
    x[:, 5] = 0  # a category never seen
    x[:5] = 0  # documents of no words
    start = DM.initialize(jax.random.key(1), x, 3)
    q = _posterior(start, x)
    new, state = _newton_step(start, q, x)
    a = np.asarray(new.concentrations)
    assert np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(a[:, 5], new.min_concentration, rtol=1e-12)  # the floor
    assert int(state.num_failed) == 0 and int(state.num_unconverged) == 0
    assert float(ej.free_energy(new, q, x)) <= float(ej.free_energy(start, q, x))


def test_failed_solve_keeps_parameters():
    start = DM.initialize(jax.random.key(1), X, 3)
    q = _posterior(start, X)
    q = eqx.tree_at(lambda q: q.logits, q, q.logits.at[3].set(jnp.nan))  # non-finite stats
    new, state = _newton_step(start, q, X)
    assert int(state.num_failed) == 3
    np.testing.assert_array_equal(np.asarray(new.concentrations), start.concentrations)


# --------------------------------------------------------------------------- fits
FIT_X, FIT_Z = _draw(2, 600, 50)


def _check_history(res, dtype):
    history = np.asarray(res.history)
    assert np.all(np.isfinite(history)) and res.num_increases == 0
    assert np.all(np.diff(history) >= -_rounding(history, dtype))  # the ELBO never falls


def test_fit_recovers_three_components():
    x = FIT_X.astype(np.float32)
    # float32 F is accurate to ~1e-5 here (a mean of 600 terms of size ~12): tol above it.
    res = ej.fit(DM.initialize(jax.random.key(4), x, 3), x, max_iters=300, tol=1e-4)
    assert res.converged and isinstance(res.state.solver_state.m_state, NewtonStepState)
    assert res.model.log_concentrations.dtype == jnp.float32
    _check_history(res, np.float32)
    a, w = np.asarray(res.model.concentrations, np.float64), np.asarray(res.model.weights)
    best = min(
        itertools.permutations(range(3)),
        key=lambda p: np.abs(w[list(p)] - WEIGHTS).sum(),
    )
    a, w = a[list(best)], w[list(best)]
    np.testing.assert_allclose(w, WEIGHTS, atol=0.05)
    means = a / a.sum(axis=1, keepdims=True)
    true_means = CONCENTRATIONS / CONCENTRATIONS.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(means, true_means, atol=0.03)
    np.testing.assert_allclose(a.sum(axis=1), CONCENTRATIONS.sum(axis=1), rtol=0.3)
    accuracy = np.mean(np.argsort(best)[np.asarray(res.model.predict(x))] == FIT_Z)
    assert accuracy > 0.95


def test_fit_with_zero_counts_and_an_empty_column():
    x = FIT_X.astype(np.float32)
    x[:, 5] = 0
    x[:10] = 0
    res = ej.fit(DM.initialize(jax.random.key(5), x, 3), x, max_iters=300, tol=1e-4)
    assert res.converged
    a = np.asarray(res.model.concentrations)
    assert np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(a[:, 5], res.model.min_concentration, rtol=1e-6)
    _check_history(res, np.float32)


# --------------------------------------------------------------------------- reporting
class _Stubborn(ej.Model):
    """A model whose Newton M-step has two problems, the second with a non-finite objective:
    it fails every time (and, with max_steps=0, the first does not converge)."""

    loc: jax.Array  # (2,)
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return -0.5 * (x - self.loc[z]) ** 2 - math.log(2 * math.sqrt(2 * math.pi))

    def newton_maximize(self, data_sum, prior, *, max_steps, tol):
        count = data_sum(lambda x, q, w: jnp.sum(w))

        def fn(v):  # (v - log v) per problem; problem 1 is NaN
            value = jnp.sum(v - jnp.log(v), axis=-1) * count
            value = value.at[1].set(jnp.nan)
            return value, (1 - 1 / v) * count, count / v**2, jnp.zeros(2)

        _, info = minimize_diagonal_plus_rank_one(
            fn, jnp.full((2, 1), 2.0), max_steps=max_steps, tol=tol
        )
        return self, info


def test_fit_warns_about_failed_newton_solves():
    x = np.linspace(-2.0, 2.0, 20)
    model = _Stubborn(jnp.array([-1.0, 1.0]))
    with pytest.warns(UserWarning, match=r"failed on 3 problem\(s\), which kept"):
        res = ej.fit(model, x, m_step=ej.NewtonMStep(), max_iters=3, tol=0.0)
    np.testing.assert_array_equal(np.asarray(res.model.loc), [-1.0, 1.0])
    with pytest.warns(UserWarning, match=r"failed on 2 problem.*max_steps on 2 problem"):
        ej.fit(model, x, m_step=ej.NewtonMStep(max_steps=0), max_iters=2, tol=0.0)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (-X[:5], "nonnegative integer counts.*x\\["),
        (X[:5] + 0.5, "nonnegative integer counts.*x\\["),
        (X[0], "x has shape \\(6,\\), expected \\(N, D\\)"),
    ],
)
def test_bad_counts(bad, match):
    with pytest.raises(ValueError, match=match):
        DM.initialize(jax.random.key(0), bad, 2)
    model = DM(jnp.asarray(WEIGHTS), jnp.asarray(CONCENTRATIONS))
    with pytest.raises(ValueError, match=match):
        ej.fit(model, bad)
    with pytest.raises(ValueError, match=match):
        model.predict(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="x has shape \\(5, 4\\), expected \\(N, D\\) with D=6"):
        DM(jnp.asarray(WEIGHTS), jnp.asarray(CONCENTRATIONS)).predict(X[:5, :4])
    with pytest.raises(ValueError, match="concentrations has shape \\(2, 6\\)"):
        DM(jnp.asarray(WEIGHTS), jnp.asarray(CONCENTRATIONS[:2]))
    with pytest.raises(ValueError, match="concentrations must be finite and > 0"):
        DM(jnp.asarray(WEIGHTS), -jnp.asarray(CONCENTRATIONS))
    with pytest.raises(ValueError, match="min_concentration"):
        DM(jnp.asarray(WEIGHTS), jnp.asarray(CONCENTRATIONS), min_concentration=0.0)
    model = DM(jnp.asarray(WEIGHTS), jnp.asarray(CONCENTRATIONS))
    with pytest.raises(ValueError, match="num_trials"):
        model.sample(jax.random.key(0), 5, num_trials=2.5)
    with pytest.raises(ValueError, match="max_steps"):
        ej.NewtonMStep(max_steps=-1)
    with pytest.raises(TypeError, match="prior=None"):
        ej.fit(model, X[:20], prior=lambda m: jnp.sum(m.log_concentrations))
    with pytest.raises(ValueError, match="batch_size"):
        ej.fit(model, X[:20], batch_size=5, key=jax.random.key(0))
    with pytest.raises(TypeError, match="newton_maximize"):
        ej.fit(ej.models.PoissonMixture(WEIGHTS, CONCENTRATIONS), X[:20], m_step=ej.NewtonMStep())
