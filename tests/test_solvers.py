"""Core v2: one F on every path, padded reductions, restarts in one call, sharded EM, long fits.

Oracles: ``free_energy`` itself (the statistics path's F and the coordinate-descent F must
equal it), sequential fits (for vmapped restarts), the unsharded fit (for sharded EM, in a
subprocess with 8 fake CPU devices), and NumPy sums (for ``sum_over_data``).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import coin_data, poisson_data, three_coins

import elbo_jax as ej
from elbo_jax import _data

COINS = three_coins([0.3, 0.9, -0.4])
X = coin_data(n=203, seed=5)
COUNTS = poisson_data(n=240, seed=6)[:, None]


def _count_compiles(fn):
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, names


# --------------------------------------------------------------------- the one reduction
@pytest.mark.parametrize("n, chunk", [(1, 0), (37, 0), (300, 256), (1000, 256), (513, 256)])
def test_sum_over_data_of_padded_chunks_is_the_plain_sum(n, chunk):
    x = np.random.default_rng(n).normal(size=(n, 3))
    data = _data.make_dataset(x, np.float64, chunk)
    assert data.num_rows % data.chunk_size == 0 and data.num_rows >= n
    assert float(np.sum(data.weights)) == n

    def fn(values, weights):
        (rows,) = values
        return {"sum": jnp.sum(weights[:, None] * rows, 0), "count": jnp.sum(weights)}

    out = jax.jit(lambda d: d.sum(fn))(data)
    np.testing.assert_allclose(out["sum"], x.sum(0), rtol=1e-12)
    assert float(out["count"]) == n


def test_padded_size_buckets_nearby_n():
    # Small data: eight buckets per power of two, so nearby N share a size; large data: the
    # fewest chunks of at most about chunk_size rows, in sixteen buckets per power of two.
    assert _data.padded_size(1000, 0) == _data.padded_size(990, 0)
    rows, chunk = _data.padded_size(1000, 0)
    assert rows == chunk and 1000 <= rows <= 1000 * 9 / 8
    assert _data.padded_size(10_001, 512) == (10_240, 512)
    assert _data.padded_size(100_000, 13_760) == (102_400, 12_800)  # not 8 x 13,760
    assert _data.padded_size(8 * 5 + 3, 0, num_shards=8) == (48, 6)


def test_chunk_rows_follow_the_widest_per_row_intermediate(monkeypatch):
    # The rows per chunk come from the pass's widest per-row value, wherever it is made
    # (here inside a nested jit): 999 elements per row -> budget // 999 rows, rounded down
    # to a multiple of 64; a pass with nothing wider than the data: budget // 3 rows.
    x = np.zeros((50, 3))
    wide = jax.jit(lambda rows: jnp.sum(jnp.tile(rows, (1, 333)) ** 2))  # (rows, 999)

    def pass_of(fn):
        return lambda data: data.sum(lambda values, weights: fn(values[0]))

    budget = _data._CPU_CHUNK_ELEMENTS
    assert _data.chunk_rows(pass_of(wide), x, np.float64) == (budget // 999) // 64 * 64
    assert _data.chunk_rows(pass_of(jnp.sum), x, np.float64) == (budget // 3) // 64 * 64
    monkeypatch.setattr(_data, "_CPU_CHUNK_ELEMENTS", 2**9)  # never below the minimum
    assert _data.chunk_rows(pass_of(wide), x, np.float64) == _data._MIN_CHUNK


# --------------------------------------------------------------------- F in one place
def test_statistics_path_coordinate_descent_and_free_energy_agree():
    # The built-in Poisson mixture takes its closed form on both paths: the statistics path
    # (exact EM) and coordinate descent with an exact Categorical q report the same F, and
    # both equal free_energy at the model they return.
    start = ej.models.PoissonMixture.initialize(jr.key(1), COUNTS, 3)
    via_stats = ej.fit(start, COUNTS, max_iters=4, tol=0.0)
    via_q = ej.fit(start, COUNTS, q=ej.Categorical(), max_iters=4, tol=0.0)
    np.testing.assert_allclose(via_stats.history, via_q.history, rtol=1e-12)
    for res in (via_stats, via_q, ej.fit(COINS, X, max_iters=4, tol=0.0)):
        x = COUNTS if res.model.latent.num_states == 3 else X
        f = ej.free_energy(res.model, ej.ExactPosterior(), x)
        np.testing.assert_allclose(-res.elbo, f, rtol=1e-12)
        np.testing.assert_allclose(ej.free_energy(res.model, res.q, x), f, rtol=1e-12)


def test_map_prior_is_weighted_by_the_whole_data_set():
    prior = lambda m: -0.5 * jnp.sum(m.logits**2)
    res = ej.fit(COINS, X, prior=prior, max_iters=3, tol=0.0)
    n = X.shape[0]
    expected = ej.log_evidence(res.model, X) + prior(res.model) / n
    np.testing.assert_allclose(res.elbo, expected, rtol=1e-12)


# --------------------------------------------------------------------- restarts
def _init(key):
    return ej.models.PoissonMixture.initialize(key, COUNTS, 3)


def test_restarts_equal_sequential_fits_and_compile_once():
    key = jr.key(3)
    res, names = _count_compiles(lambda: ej.fit(_init, COUNTS, restarts=8, key=key, max_iters=40))
    assert sum("_call" in str(name) for name in names) == 1, names
    singles = [ej.fit(_init(k), COUNTS, key=k, max_iters=40) for k in jr.split(key, 8)]
    elbos = np.array([float(s.elbo) for s in singles])
    np.testing.assert_allclose(res.restart_elbos, elbos, rtol=1e-12)
    best = singles[int(np.argmax(elbos))]
    assert res.num_iters == best.num_iters and res.status == best.status
    np.testing.assert_allclose(res.history, best.history, rtol=1e-12)
    leaves = jax.tree_util.tree_leaves
    for got, want in zip(leaves(res.model), leaves(best.model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.q.probs, best.q.probs, rtol=1e-10, atol=1e-14)


def test_restarts_need_a_key_and_a_positive_count():
    with pytest.raises(ValueError, match="needs a random key"):
        ej.fit(_init, COUNTS, restarts=2)
    with pytest.raises(ValueError, match="restarts must be a positive int"):
        ej.fit(_init, COUNTS, restarts=0, key=jr.key(0))


# --------------------------------------------------------------------- recompiles, long fits
def test_new_n_within_a_bucket_does_not_recompile():
    # N = 990 and 1000 pad to the same size: the second fit reuses the compiled one.
    x = coin_data(n=1000, seed=2)
    ej.fit(COINS, x[:990], max_iters=3, tol=0.0)
    res, names = _count_compiles(lambda: ej.fit(COINS, x, max_iters=3, tol=0.0))
    assert not any("_call" in str(name) for name in names), names
    np.testing.assert_allclose(res.elbo, ej.log_evidence(res.model, x), rtol=1e-12)


@pytest.mark.parametrize("q", [None, ej.Categorical()], ids=["statistics", "coordinate"])
def test_a_fresh_prior_lambda_with_another_constant_does_not_recompile(q):
    def fit_with(strength):
        prior = lambda m: -0.5 * strength * jnp.sum(m.logits**2)  # a new function each time
        return ej.fit(COINS, X, q=q, prior=prior, max_iters=5, tol=0.0)

    first = fit_with(0.25)
    second, names = _count_compiles(lambda: fit_with(4.0))
    assert not any("_call" in str(name) for name in names), names
    # ... and each computes with its own constant: F includes its own log p(θ)/N.
    for res, strength in ((first, 0.25), (second, 4.0)):
        log_prior = -0.5 * strength * float(jnp.sum(res.model.logits**2))
        expected = float(ej.log_evidence(res.model, X)) + log_prior / X.shape[0]
        np.testing.assert_allclose(float(res.elbo), expected, rtol=1e-12)
    assert abs(float(first.elbo) - float(second.elbo)) > 1e-4


def test_traced_programs_differ_by_what_they_compute_not_by_their_float_numbers():
    from elbo_jax._traced import Traced

    v = jnp.arange(4.0)
    scaled = [Traced(lambda a, c=c: c * a, v) for c in (0.5, 3.0)]
    assert scaled[0].program == scaled[1].program  # only a float literal differs
    np.testing.assert_array_equal(scaled[1](v), 3.0 * v)
    # Integer literals (indices, thresholds) are part of the program.
    masked = [Traced(lambda a, k=k: jnp.where(jnp.arange(4) > k, a, 0.0), v) for k in (0, 2)]
    assert masked[0].program != masked[1].program
    np.testing.assert_array_equal(masked[1](v), np.array([0.0, 0.0, 0.0, 3.0]))
    squares = Traced(lambda a: a**2, v)
    assert squares.program != scaled[0].program


def test_a_new_learning_rate_does_not_recompile_and_is_used():
    import optax

    def fit_with(lr):
        m_step = ej.GradientMStep(optax.adam(lr), num_steps=2)
        return ej.fit(COINS, X, m_step=m_step, max_iters=6, tol=0.0)

    fit_with(0.05)
    slow, names = _count_compiles(lambda: fit_with(1e-3))
    assert not any("_call" in str(name) for name in names), names
    fast = fit_with(0.05)
    # Six iterations of two Adam steps move each logit by at most ~12 lr.
    assert np.max(np.abs(slow.model.logits - COINS.logits)) < 12 * 1e-3 * 1.01
    assert np.max(np.abs(fast.model.logits - COINS.logits)) > 12 * 1e-3 * 2


def test_a_fit_longer_than_the_history_buffer_keeps_every_iteration():
    from elbo_jax._solvers import HISTORY_SIZE

    iters = HISTORY_SIZE + 37
    res = ej.fit(COINS, X, max_iters=iters, tol=0.0)
    assert res.num_iters == iters and res.history.shape == (iters,)
    assert np.all(np.isfinite(res.history))
    assert np.all(np.diff(res.history) >= -1e-12)  # exact EM: the ELBO never falls
    short = ej.fit(COINS, X, max_iters=50, tol=0.0)
    np.testing.assert_allclose(res.history[:50], short.history, rtol=1e-12)


@pytest.mark.default_compiler
@pytest.mark.parametrize("how", ["statistics", "adam"])
def test_resuming_a_fit_is_identical_to_not_stopping(how):
    import optax

    kwargs = {"tol": 0.0}
    if how == "adam":  # optimizer state, q and key all carry over
        kwargs.update(
            q=ej.Categorical(),
            e_step=ej.GradientEStep(optax.adam(0.1), num_steps=2),
            m_step=ej.GradientMStep(optax.adam(0.05), num_steps=2),
            key=jr.key(0),
        )
    whole = ej.fit(COINS, X, max_iters=12, **kwargs)
    half = ej.fit(COINS, X, max_iters=5, **kwargs)
    assert half.status == ej.Status.MAX_ITERS
    resumed = ej.fit(half, X, max_iters=7, **kwargs)
    assert resumed.num_iters == 12 and resumed.status == whole.status
    np.testing.assert_array_equal(resumed.history, whole.history)
    np.testing.assert_array_equal(resumed.model.logits, whole.model.logits)
    np.testing.assert_array_equal(resumed.q.logits, whole.q.logits)


def test_resuming_with_other_data_is_refused():
    half = ej.fit(COINS, X, max_iters=3, tol=0.0)
    with pytest.raises(ValueError, match="cannot resume"):
        ej.fit(half, coin_data(n=2000, seed=1), max_iters=3)


def test_progress_bar_fit_equals_the_plain_fit():
    plain = ej.fit(COINS, X, max_iters=40, tol=0.0)
    shown = ej.fit(COINS, X, max_iters=40, tol=0.0, progress=True)
    np.testing.assert_array_equal(shown.history, plain.history)
    np.testing.assert_array_equal(shown.model.logits, plain.model.logits)


def test_huge_max_iters_costs_no_memory_when_the_fit_converges():
    res = ej.fit(COINS, X, max_iters=50_000_000)
    assert res.converged and res.history.shape == (res.num_iters,)


# --------------------------------------------------------------------- float32 and rounding
def _random_problem(i, dtype):
    """A random 3-component, 2-D Gaussian mixture problem (N=300: one compiled fit for all);
    every fifth has a quarter of its points at one place, so a component may collapse."""
    rng = np.random.default_rng(i)
    means = rng.normal(0, 3, (3, 2)) + rng.normal(0, 20)
    z = rng.integers(0, 3, 300)
    x = means[z] + rng.normal(size=(300, 2)) * rng.uniform(0.05, 2, (3, 2))[z]
    if i % 5 == 0:
        x[:75] = x[0]
    start = ej.models.GaussianMixture.initialize(
        jr.key(i), x.astype(dtype), 3, ["full", "diag"][i % 2]
    )
    return start, x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_em_on_random_problems_never_counts_an_increase(dtype):
    # 200 random problems: exact EM must never raise F beyond rounding — in float32 a real
    # rise would be counted, and in float64 nothing may be flagged by mistake.
    flagged = []
    for i in range(200):
        start, x = _random_problem(i, dtype)
        res = ej.fit(start, x, max_iters=100)
        if res.num_increases:
            flagged.append((i, res.num_increases, res.status.name))
    assert not flagged, flagged


def test_fit_refuses_a_model_without_parameters():
    class Fixed(ej.Model):
        latent = ej.Discrete(2)

        def log_joint(self, x, z):
            return -0.5 * (x - z) ** 2

    with pytest.raises(TypeError, match="no floating-point array fields"):
        ej.fit(Fixed(), X)


def test_data_traced_by_jit_are_checked_at_run_time():
    bad = X.astype(float).copy()
    bad[7] = np.nan
    evaluate = jax.jit(lambda x: ej.log_evidence(COINS, x))
    assert np.isfinite(float(evaluate(X.astype(float))))
    with pytest.raises(Exception, match="x contains NaN or Inf"):
        jax.block_until_ready(evaluate(bad))
    gmm = ej.models.GaussianMixture(np.array([0.5, 0.5]), np.zeros((2, 2)), np.ones((2, 2)), "diag")
    with pytest.raises(Exception, match="x contains NaN or Inf"):
        jax.block_until_ready(jax.jit(lambda x: gmm.predict(x))(np.full((3, 2), np.nan)))


# --------------------------------------------------------------------- sharded EM
_SHARDED = textwrap.dedent(
    """
    import jax, numpy as np, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    import sys; sys.path.insert(0, {tests!r})
    from jax.sharding import NamedSharding, PartitionSpec as P
    import elbo_jax as ej
    from helpers import coin_data, poisson_data, three_coins
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    n = 8 * 40 + 3
    out = {{}}
    x = coin_data(n=n, seed=4)
    start = three_coins([0.3, 0.9, -0.4])
    a = ej.fit(start, x, max_iters=30, tol=0.0, sharding=sharding)
    b = ej.fit(start, x, max_iters=30, tol=0.0)
    out["coins_history"] = float(np.max(np.abs(a.history - b.history)))
    out["coins_params"] = float(np.max(np.abs(a.model.logits - b.model.logits)))
    out["coins_q"] = float(np.max(np.abs(a.q.probs - b.q.probs)))
    rng = np.random.default_rng(0)
    xg = np.concatenate([rng.normal(size=(n // 2, 2)), rng.normal(size=(n - n // 2, 2)) + 4])
    gmm = ej.models.GaussianMixture(
        np.array([0.5, 0.5]), np.array([[0.5, 0.0], [3.0, 3.0]]), np.stack([np.eye(2)] * 2)
    )
    a = ej.fit(gmm, xg, max_iters=20, tol=0.0, sharding=sharding)
    b = ej.fit(gmm, xg, max_iters=20, tol=0.0)
    out["gmm_history"] = float(np.max(np.abs(a.history - b.history)))
    out["gmm_params"] = max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree_util.tree_leaves(a.model), jax.tree_util.tree_leaves(b.model))
    )
    # The work is split: the compiled fit holds a cross-device reduction.
    from elbo_jax import _data, _fit
    data = _data.make_dataset(xg, np.float64, 0, mesh, "data")
    solver, _ = _fit._choose_solver(gmm, jnp.asarray(xg), ej.ExactPosterior(), ej.ExactEStep(), ej.ExactMStep(), None)
    hlo = _fit._call.lower(_fit._first_segment, mesh, solver, gmm, ej.ExactPosterior(), data,
        _fit._unused_key(), np.asarray(0.0), np.asarray(5, np.int32), None).as_text()
    out["reduction"] = any(op in hlo for op in ("all-reduce", "all_reduce", "all-gather", "all_gather"))
    print(repr(out))

    """
)


def test_sharded_em_equals_unsharded_em():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED.format(tests=tests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own dict literal
    assert out["reduction"], str(out)
    assert out["gmm_history"] < 1e-12 and out["gmm_params"] < 1e-10, str(out)
    # Three coins has no closed form: its numerical M-step (L-BFGS, then Newton polishing)
    # reaches rounding level, so another summation order changes nothing beyond it.
    assert out["coins_history"] < 1e-12 and out["coins_params"] < 1e-10, str(out)
    assert out["coins_q"] < 1e-10, str(out)


def test_sharding_argument_is_checked_and_gradient_steps_are_refused_for_now():
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match="sharding must split the data's leading axis"):
        ej.fit(COINS, X, sharding=NamedSharding(mesh, P()))
    with pytest.raises(TypeError, match="sharding must be a jax.sharding.NamedSharding"):
        ej.fit(COINS, X, sharding="data")
    with pytest.raises(NotImplementedError, match="sharded fits run exact EM"):
        ej.fit(
            COINS,
            X,
            sharding=NamedSharding(mesh, P("data")),
            m_step=ej.GradientMStep(optax.adam(1e-2)),
        )


# --------------------------------------------------------------------- frozen parameters
def _gmm_problem():
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(size=(120, 2)), rng.normal(size=(80, 2)) * 0.5 + 3.0])
    # reg_covar=0: the closed form is then exactly the maximiser the numerical step finds
    start = ej.models.GaussianMixture(
        np.array([0.4, 0.6]),
        np.array([[0.5, 0.5], [2.0, 2.5]]),
        np.stack([np.eye(2)] * 2),
        reg_covar=0.0,
    )
    return start, x


@pytest.mark.parametrize(
    "frozen",
    [lambda m: m.loc, lambda m: (m.weight_logits, m.raw_precision_factor)],
    ids=["means", "weights-and-covariances"],
)
def test_frozen_gmm_closed_form_equals_the_numerical_m_step(frozen):
    start, x = _gmm_problem()
    closed = ej.fit(start, x, frozen=frozen, max_iters=6, tol=0.0)
    numeric = ej.fit(
        start, x, frozen=frozen, m_step=ej.ExactMStep(use_closed_form=False), max_iters=6, tol=0.0
    )
    np.testing.assert_allclose(closed.history, numeric.history, rtol=1e-8)
    for held in jax.tree_util.tree_leaves(frozen(start)):
        got = [leaf for leaf in jax.tree_util.tree_leaves(frozen(closed.model))]
        assert any(np.array_equal(np.asarray(g), np.asarray(held)) for g in got)
    assert np.all(np.diff(closed.history) >= -1e-12)
    free = ej.fit(start, x, max_iters=6, tol=0.0)
    assert float(free.elbo) > float(closed.elbo)  # freezing costs something here


def test_frozen_parameters_stay_under_gradient_and_found_statistics_m_steps():
    import optax

    frozen = lambda m: m.logits  # noqa: E731 - the whole array
    for kwargs in ({}, {"m_step": ej.GradientMStep(optax.adam(0.05), num_steps=2)}):
        with pytest.raises(ValueError, match="selected no parameter|select parameters"):
            ej.fit(COINS, X, frozen=lambda m: (), max_iters=2, **kwargs)
    res = ej.fit(
        COINS, X, frozen=frozen, m_step=ej.GradientMStep(optax.adam(0.05)), max_iters=3, tol=0.0
    )
    np.testing.assert_array_equal(res.model.logits, COINS.logits)
    # A user model with two parameter arrays: freeze one, the other moves (found statistics).
    model = ej.models.PoissonMixture.initialize(jr.key(2), COUNTS, 3)
    res = ej.fit(model, COUNTS, frozen=lambda m: m.weight_logits, max_iters=5, tol=0.0)
    np.testing.assert_array_equal(res.model.weight_logits, model.weight_logits)
    assert not np.array_equal(np.asarray(res.model.log_rates), np.asarray(model.log_rates))
    assert np.all(np.diff(res.history) >= -1e-12)
