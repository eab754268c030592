"""Fits over ``ej.Stream``: exact EM read batch by batch equals exact EM in memory; a fit
resumed from its result equals the uninterrupted fit bit for bit; bad streams raise errors
that name the batch and the problem."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import poisson_data, poisson_mixture

import elbo_jax as ej
from elbo_jax.models import GaussianMixture, GaussianMixturePrior, PoissonHMM


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float64) - jnp.asarray(v, jnp.float64))))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = np.asarray([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    x = centres[rng.choice(3, 1000)] + rng.normal(size=(1000, 2))
    path = tmp_path_factory.mktemp("stream") / "x.npy"
    np.save(path, x)
    start = GaussianMixture.initialize(jax.random.key(0), jnp.asarray(x), 3)
    return x, np.load(path, mmap_mode="r"), start


def test_streamed_exact_em_over_a_memmap_equals_in_memory_em(mixture):
    x, memmap, start = mixture
    prior = GaussianMixturePrior(2, concentration=2.0)
    memory = ej.fit(start, x, max_iters=15, tol=0, prior=prior)
    streamed = ej.fit(start, ej.Stream(memmap, batch_size=300), max_iters=15, tol=0, prior=prior)
    assert streamed.num_iters == 15 and streamed.status == ej.Status.MAX_ITERS
    assert _max_diff(streamed.model, memory.model) < 1e-12
    np.testing.assert_allclose(streamed.history, memory.history, rtol=0, atol=1e-12)
    np.testing.assert_allclose(streamed.initial_elbo, memory.initial_elbo, rtol=0, atol=1e-12)
    assert streamed.num_increases == 0
    # Convergence by tol stops at the same iteration.
    memory = ej.fit(start, x, tol=1e-6)
    streamed = ej.fit(start, ej.Stream(memmap, batch_size=256), tol=1e-6)
    assert streamed.num_iters == memory.num_iters and streamed.converged


def test_float32_streamed_em_matches_float64(mixture):
    x, memmap, start = mixture
    start32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else a, start
    )
    reference = ej.fit(start, x, max_iters=10, tol=0)
    streamed = ej.fit(start32, ej.Stream(memmap, batch_size=300), max_iters=10, tol=0)
    assert streamed.model.loc.dtype == jnp.float32
    np.testing.assert_allclose(streamed.model.loc, reference.model.loc, atol=1e-5)
    np.testing.assert_allclose(streamed.model.covariances, reference.model.covariances, atol=1e-5)
    np.testing.assert_allclose(streamed.history, reference.history, rtol=1e-6)


def test_streams_from_functions_iterables_and_generators(mixture):
    x, _, start = mixture
    memory = ej.fit(start, x, max_iters=5, tol=0)

    def batches():
        for i in range(0, len(x), 400):
            yield x[i : i + 400]

    for source in (ej.Stream(batches), ej.Stream(list(batches())), ej.Stream(x, batch_size=400)):
        streamed = ej.fit(start, source, max_iters=5, tol=0)
        assert _max_diff(streamed.model, memory.model) < 1e-12
    # A one-shot generator is read once: an online fit of one pass works ...
    online = ej.fit(start, batches(), m_step=ej.StepwiseMStep(), max_iters=1)
    assert online.num_iters == 1 and math.isfinite(float(online.history[0]))
    # ... exact EM needs a pass per iteration, and says how to give one.
    with pytest.raises(ValueError, match="one-shot iterator"):
        ej.fit(start, batches(), max_iters=3)


def test_online_em_over_a_stream_equals_online_em_in_memory_on_the_same_batches(mixture):
    x, memmap, start = mixture
    rule = ej.StepwiseMStep(kappa=0.7)
    # One batch per pass: the in-memory fit's whole data is the stream's one batch.
    memory = ej.fit(start, x, m_step=rule, max_iters=4, tol=0)
    streamed = ej.fit(start, ej.Stream(memmap, batch_size=len(x)), m_step=rule, max_iters=4, tol=0)
    assert _max_diff(streamed.model, memory.model) < 1e-12
    np.testing.assert_allclose(streamed.history, memory.history, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m_step", ["exact", "stepwise"])
def test_resuming_a_streamed_fit_equals_the_uninterrupted_fit_bit_for_bit(mixture, m_step):
    _, memmap, start = mixture
    rule = "exact" if m_step == "exact" else ej.StepwiseMStep()
    stream = lambda: ej.Stream(memmap, batch_size=256, shuffle=True)
    key = jax.random.key(3)
    whole = ej.fit(start, stream(), m_step=rule, max_iters=6, tol=0, key=key)
    half = ej.fit(start, stream(), m_step=rule, max_iters=2, tol=0, key=key)
    resumed = ej.fit(half, stream(), m_step=rule, max_iters=4, tol=0, key=key)
    assert resumed.num_iters == 6
    for a, b in zip(
        jax.tree_util.tree_leaves(resumed.model),
        jax.tree_util.tree_leaves(whole.model),
        strict=True,
    ):
        assert bool(jnp.all(a == b))
    assert bool(jnp.all(resumed.history == whole.history))


@pytest.mark.default_compiler
def test_resuming_an_online_fit_in_memory_is_bit_identical(mixture):
    x, _, start = mixture
    rule = ej.InertiaMStep()
    key = jax.random.key(4)
    whole = ej.fit(start, x, m_step=rule, batch_size=128, max_iters=5, tol=0, key=key)
    half = ej.fit(start, x, m_step=rule, batch_size=128, max_iters=3, tol=0, key=key)
    resumed = ej.fit(half, x, m_step=rule, batch_size=128, max_iters=2, tol=0)
    for a, b in zip(
        jax.tree_util.tree_leaves(resumed.model),
        jax.tree_util.tree_leaves(whole.model),
        strict=True,
    ):
        assert bool(jnp.all(a == b))


def test_streamed_hmm_and_found_statistics():
    """Sequences in a stream (an HMM's statistics merge over batches of sequences) and a
    user model whose M-step uses the statistics elbo_jax finds in its log_joint."""
    hmm = PoissonHMM.initialize(jax.random.key(0), jnp.ones((3, 40, 2)) * 4.0, 3)
    seqs, _ = hmm.sample(jax.random.key(1), 12, 40)
    start = PoissonHMM.initialize(jax.random.key(2), seqs, 3)
    memory = ej.fit(start, seqs, max_iters=4, tol=0)
    streamed = ej.fit(start, ej.Stream(np.asarray(seqs), batch_size=5), max_iters=4, tol=0)
    assert _max_diff(streamed.model, memory.model) < 1e-10
    counts = poisson_data(n=200)
    user = poisson_mixture([0.0, 0.1, -0.1], [0.5, 1.5, 2.5])
    memory = ej.fit(user, counts, max_iters=3, tol=0)
    streamed = ej.fit(user, ej.Stream(counts, batch_size=64), max_iters=3, tol=0)
    assert float(jnp.max(jnp.abs(streamed.model.log_rates - memory.model.log_rates))) < 1e-8


def test_a_stream_progress_bar_counts_passes(mixture, capsys):
    _, memmap, start = mixture
    result = ej.fit(start, ej.Stream(memmap, batch_size=500), max_iters=3, tol=0, progress=True)
    assert result.num_iters == 3
    assert "3/3" in capsys.readouterr().err


def test_stream_errors(mixture):
    x, memmap, start = mixture
    with pytest.raises(ValueError, match="the stream yielded no batches"):
        ej.fit(start, ej.Stream([]))
    with pytest.raises(ValueError, match="pass batch_size="):
        ej.Stream(memmap)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ej.Stream(memmap, batch_size=0)
    with pytest.raises(TypeError, match="source must be an array-like"):
        ej.Stream(3.0)
    with pytest.raises(ValueError, match="shuffle=True draws the order of an array-like"):
        ej.Stream([x], shuffle=True)
    with pytest.raises(ValueError, match=r"draws each pass's order from key="):
        ej.fit(start, ej.Stream(memmap, batch_size=100, shuffle=True))
    wrong_width = [x[:300], x[300:600, :1], x[600:]]
    with pytest.raises(ValueError, match=r"batch 1 of the stream has shape \(rows, 1\)"):
        ej.fit(start, ej.Stream(wrong_width), max_iters=2)
    wrong_dtype = [x[:300], x[300:600].astype(np.float32), x[600:]]
    with pytest.raises(ValueError, match="batch 1 of the stream has dtype float32"):
        ej.fit(start, ej.Stream(wrong_dtype), max_iters=2)
    too_long = [x[:300], x[300:]]
    with pytest.raises(ValueError, match="batch 1 of the stream has 700 rows, more than"):
        ej.fit(start, ej.Stream(too_long), max_iters=2)
    with_nan = [x[:300], np.where(np.arange(2) == 0, np.nan, x[300:600]), x[600:]]
    with pytest.raises(ValueError, match="batch 1 of the stream: x contains NaN"):
        ej.fit(start, ej.Stream(with_nan), max_iters=2)
    with pytest.raises(ValueError, match="no restarts=, sharding= or batch_size="):
        ej.fit(start, ej.Stream(memmap, batch_size=100), batch_size=10)
    with pytest.raises(ValueError, match="num_data=N"):
        ej.fit(
            start,
            ej.Stream(lambda: iter([x])),
            m_step=ej.StepwiseMStep(),
            prior=GaussianMixturePrior(2),
        )
