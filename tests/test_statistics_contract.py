"""The statistics contract, held to every built-in model with a closed-form M-step.

A model's ``sufficient_statistics(x, q, *, weights)`` are $\\sum_n w_n E_{q_n}[s(x_n, z)]$;
statistics of any split of the data, taken by models at *different* $\\theta$, merge with
``merge_statistics`` into the statistics of the union, so that ``maximize`` of the merged
statistics is the M-step on the whole data. Zero statistics are neutral, ``scale_statistics``
is a weight on every datum, and ``maximize(complete_data_statistics(m))`` gives the model
back. Float32 statistics keep their accuracy for data far from zero (the shift travels
inside the statistics).

To add a model, append a ``Case`` to ``CASES``: a random model at a seed (optionally "far"
from zero, where the family allows it), and the quantities its M-step identifies.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import compiled_maximize as _maximize
from helpers import compiled_posterior as _posterior
from helpers import compiled_statistics as _statistics

import elbo_jax as ej
from elbo_jax._statistics import merge_statistics, scale_statistics
from elbo_jax.models import PPCA, BernoulliMixture, FactorAnalysis, PoissonMixture

N = 60
K, D, L = 3, 4, 2
FAR = 1e3  # the offset of "far" data
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-4}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    # A random model of this kind: (seed, dtype, far) -> model. Models at different seeds
    # are the "different θ"; far=True puts the data (as far as the family allows) at ~FAR.
    make_model: Callable[[int, Any, bool], ej.Model]
    # The quantities maximize identifies, as arrays (the model's own parameters, or for
    # non-identifiable ones a function of them).
    params: Callable[[ej.Model], tuple]

    def __repr__(self):
        return self.name


def _bernoulli(seed, dtype, far):
    del far  # binary data cannot be far from zero
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(K, 2.0))
    probs = rng.uniform(0.1, 0.9, (K, D))
    return BernoulliMixture(jnp.asarray(weights, dtype), jnp.asarray(probs, dtype))


def _poisson(seed, dtype, far):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(K, 2.0))
    # far: counts near 1e3 whose components still overlap (Poisson sd ~ 32)
    rates = FAR + rng.uniform(0.0, 60.0, (K, D)) if far else rng.uniform(0.5, 8.0, (K, D))
    return PoissonMixture(jnp.asarray(weights, dtype), jnp.asarray(rates, dtype))


def _linear_gaussian(cls):
    def make(seed, dtype, far):
        rng = np.random.default_rng(seed)
        weight = rng.normal(size=(D, L))
        mean = rng.normal(size=D) + (FAR if far else 0.0)
        noise = rng.uniform(0.3, 1.0) if cls is PPCA else rng.uniform(0.3, 1.0, D)
        return cls(jnp.asarray(weight, dtype), jnp.asarray(mean, dtype), jnp.asarray(noise, dtype))

    return make


def _mixture_params(attr):
    return lambda m: (m.weights, getattr(m, attr))


def _linear_gaussian_params(m):
    return (m.weight, m.mean, m.noise_diagonal)


CASES = [
    Case("bernoulli", _bernoulli, _mixture_params("probs")),
    Case("poisson", _poisson, _mixture_params("rates")),
    Case("ppca", _linear_gaussian(PPCA), _linear_gaussian_params),
    Case("factor_analysis", _linear_gaussian(FactorAnalysis), _linear_gaussian_params),
]
DTYPES = [jnp.float64, jnp.float32]


# --------------------------------------------------------------------------- helpers


@eqx.filter_jit
def _sample(model, key, n):
    return model.sample(key, n)


def _data(case, dtype, *, far=False, seed=0, n=N):
    """``n`` draws from a float64 model of the case, in ``dtype`` (float32 data are the
    rounded draws, so a float64 reference can use exactly the same numbers)."""
    x, _ = _sample(case.make_model(1000 + seed, jnp.float64, far), jr.key(seed), n)
    return x.astype(dtype)


def _rows(tree, idx):
    """Rows ``idx`` of every array leaf (a q for a subset of the data)."""
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _is_float(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.inexact)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, tree)


def _assert_same_params(case, got, want, rtol):
    """Each identified quantity of ``got`` equals ``want``'s to ``rtol`` relative to the
    quantity's largest entry (so that entries near zero are compared on its scale)."""
    for g, w in zip(case.params(got), case.params(want), strict=True):
        g = np.asarray(g, np.float64)
        w = np.asarray(w, np.float64)
        scale = float(np.max(np.abs(w)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def _assert_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for u, v in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _split(n, seed):
    """A random split of ``range(n)`` into three parts of unequal sizes."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = [n // 5, n // 5 + n // 3]
    return np.split(perm, cut)


# --------------------------------------------------------------------------- (i) merge
@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_statistics_taken_at_different_theta_merge_into_the_whole(case, dtype, far):
    x = _data(case, dtype, far=far)
    theta0 = case.make_model(1, dtype, far)
    q = _posterior(theta0, x)  # one q for the whole data: statistics may depend on θ only via q
    parts = _split(N, seed=2)
    thetas = [case.make_model(10 + i, dtype, far) for i in range(3)]
    pieces = [
        _statistics(theta, x[idx], _rows(q, idx)) for theta, idx in zip(thetas, parts, strict=True)
    ]
    merged = merge_statistics(merge_statistics(pieces[0], pieces[1]), pieces[2])
    whole = _statistics(theta0, x, q)
    _assert_same_params(case, _maximize(theta0, merged), _maximize(theta0, whole), RTOL[dtype])
    # associativity: another bracketing, another order
    other = merge_statistics(pieces[2], merge_statistics(pieces[0], pieces[1]))
    _assert_same_params(case, _maximize(theta0, other), _maximize(theta0, whole), RTOL[dtype])


# --------------------------------------------------------------------------- (ii) algebra
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_merge_is_commutative_and_zero_is_neutral(case):
    x = _data(case, jnp.float64)
    model = case.make_model(1, jnp.float64, False)
    q = _posterior(model, x)
    a = _statistics(model, x[:20], _rows(q, slice(0, 20)))
    b = _statistics(case.make_model(2, jnp.float64, False), x[20:], _rows(q, slice(20, None)))
    ab, ba = merge_statistics(a, b), merge_statistics(b, a)
    for u, v in zip(jax.tree_util.tree_leaves(ab), jax.tree_util.tree_leaves(ba), strict=True):
        scale = float(jnp.max(jnp.abs(v)))
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-15, atol=1e-15 * scale)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, a)
    _assert_identical(merge_statistics(zeros, a), a)
    _assert_identical(merge_statistics(a, zeros), a)
    # zero weight on every datum gives the zero statistics, neutral as well
    nothing = _statistics(model, x[20:], _rows(q, slice(20, None)), jnp.zeros(N - 20))
    _assert_identical(merge_statistics(nothing, a), a)
    # scaling by zero removes the data
    _assert_same_params(
        case,
        _maximize(model, merge_statistics(scale_statistics(b, 0.0), a)),
        _maximize(model, a),
        1e-12,
    )
    # complete-data statistics have the same structure (they merge with data statistics)
    complete = model.complete_data_statistics(5)
    assert jax.tree_util.tree_structure(complete) == jax.tree_util.tree_structure(a)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_scale_and_weights_are_data_multiplicities(case):
    x = _data(case, jnp.float64)
    model = case.make_model(1, jnp.float64, False)
    q = _posterior(model, x)
    first, rest = np.arange(25), np.arange(25, N)
    stats_rest = _statistics(model, x[rest], _rows(q, rest))

    # scale_statistics(s, 2) is the statistics of the data twice over (with other data
    # beside them, so that the weight matters to the M-step)
    twice = np.concatenate([first, first])
    doubled = merge_statistics(
        scale_statistics(_statistics(model, x[first], _rows(q, first)), 2.0), stats_rest
    )
    duplicated = merge_statistics(_statistics(model, x[twice], _rows(q, twice)), stats_rest)
    _assert_same_params(case, _maximize(model, doubled), _maximize(model, duplicated), 1e-10)

    # weight 2 on some rows == those rows duplicated; weight 0 == those rows dropped, even
    # when their q is nonsense (but finite, as padding rows are)
    weights = np.ones(N)
    weights[:10] = 2.0
    weights[40:] = 0.0
    noise = jax.tree_util.tree_map(
        lambda a: 10.0 * jr.normal(jr.key(7), a.shape, a.dtype) if _is_float(a) else a, q
    )
    garbage_q = jax.tree_util.tree_map(
        lambda a, g: a.at[40:].set(g[40:]) if _is_float(a) else a, q, noise
    )
    weighted = _statistics(model, x, garbage_q, jnp.asarray(weights))
    rows = np.concatenate([np.arange(10), np.arange(40)])
    explicit = _statistics(model, x[rows], _rows(q, rows))
    _assert_same_params(case, _maximize(model, weighted), _maximize(model, explicit), 1e-10)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_weights_of_the_wrong_shape_are_refused(case):
    x = _data(case, jnp.float64, n=6)
    model = case.make_model(1, jnp.float64, False)
    with pytest.raises(ValueError, match=r"weights has shape \(5,\), expected \(N,\) = \(6,\)"):
        model.sufficient_statistics(x, _posterior(model, x), weights=jnp.ones(5))


# --------------------------------------------------------------------------- (iii) round trip
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_complete_data_statistics_give_the_model_back(case, dtype):
    rtol = {jnp.float64: 1e-12, jnp.float32: 1e-5}[dtype]
    for far in (False, True):
        model = case.make_model(3, dtype, far)
        again = model.maximize(model.complete_data_statistics(37))
        _assert_same_params(case, again, model, rtol)
        # complete-data statistics of two sample sizes merge to the model too
        both = merge_statistics(
            model.complete_data_statistics(jnp.asarray(5.0, dtype)),
            model.complete_data_statistics(1000),
        )
        _assert_same_params(case, model.maximize(both), model, rtol)


# --------------------------------------------------------------------------- (iv) float32
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float32_statistics_of_far_data_give_the_float64_m_step(case):
    x32 = _data(case, jnp.float32, far=True, n=200)
    x64 = x32.astype(jnp.float64)
    model64 = case.make_model(1, jnp.float64, True)
    q64 = _posterior(model64, x64)
    want = _maximize(model64, _statistics(model64, x64, q64))
    # the same q in float32, so that only the statistics and the M-step run in float32
    model32 = case.make_model(1, jnp.float32, True)
    q32 = _cast(q64, jnp.float32)
    stats32 = _statistics(model32, x32, q32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(stats32))
    got = _maximize(model32, stats32)
    _assert_same_params(case, got, want, 1e-4)
    # and merged from three float32 parts
    parts = _split(200, seed=4)
    merged = _statistics(model32, x32[parts[0]], _rows(q32, parts[0]))
    for idx in parts[1:]:
        merged = merge_statistics(merged, _statistics(model32, x32[idx], _rows(q32, idx)))
    _assert_same_params(case, _maximize(model32, merged), want, 1e-4)
