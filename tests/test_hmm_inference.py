"""Exact inference in a hidden Markov chain (``elbo_jax._inference.hmm``) against brute force.

The oracle enumerates all K^L state paths of a short sequence in NumPy (K = 3, T <= 5):
log p(x), the marginals, the transition counts, the best path and, by Fisher's identity,
the gradient of log p(x). The parallel (associative-scan) path is checked against the
sequential one on longer sequences, and float32 against float64 on a long sequence with
strongly peaked emissions.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp, softmax

from elbo_jax._inference import hmm

K = 3
T = 5
LENGTHS = np.array([5, 3, 1, 4])


def random_chain(rng, num_states, *, impossible=True):
    """log p(z_0) and log p(z_{t+1} | z_t), with a zero initial and a zero transition
    probability when ``impossible``."""
    log_initial = np.log(rng.dirichlet(np.ones(num_states)))
    log_transition = np.log(rng.dirichlet(np.ones(num_states), size=num_states))
    if impossible:
        log_initial[1] = -np.inf
        log_initial = log_initial - logsumexp(log_initial)
        log_transition[0, 2] = -np.inf
        log_transition[0] = log_transition[0] - logsumexp(log_transition[0])
    return log_initial, log_transition


def pad_with_garbage(rng, log_emissions, lengths):
    """Frames t >= length replaced by large finite nonsense."""
    out = log_emissions.copy()
    for b, length in enumerate(lengths):
        out[b, length:] = rng.normal(size=out[b, length:].shape) * 1e3
    return out


def brute_force(log_initial, log_transition, log_emissions, length):
    """Everything by enumerating the K^L paths z_{0:L-1}: log p(x), q(z_t | x) (T, K),
    sum_t q(z_t, z_{t+1} | x), the argmax path (padded by its last state) and its
    log p(x, z)."""
    num_steps, num_states = log_emissions.shape
    paths = np.array(list(itertools.product(range(num_states), repeat=length)))
    with np.errstate(invalid="ignore"):
        log_joint = (
            log_initial[paths[:, 0]]
            + log_emissions[np.arange(length), paths].sum(axis=1)
            + log_transition[paths[:, :-1], paths[:, 1:]].sum(axis=1)
        )
    log_z = logsumexp(log_joint)
    weights = np.exp(log_joint - log_z)
    marginals = np.zeros((num_steps, num_states))
    counts = np.zeros((num_states, num_states))
    for path, w in zip(paths, weights, strict=True):
        marginals[np.arange(length), path] += w
        np.add.at(counts, (path[:-1], path[1:]), w)
    best = paths[np.argmax(log_joint)]
    best_path = np.concatenate([best, np.full(num_steps - length, best[-1])])
    return log_z, marginals, counts, best_path, log_joint.max()


def fisher_gradient(initial_logits, transition_logits, log_emissions, length):
    """E_{p(z | x)}[d log p(x, z) / d (initial logits, transition logits, log emissions)]
    with log p(z_0) = log_softmax(initial logits), rows of log p(z_{t+1} | z_t) likewise."""
    log_initial = log_softmax(initial_logits)
    log_transition = log_softmax(transition_logits, axis=1)
    _, marginals, counts, _, _ = brute_force(log_initial, log_transition, log_emissions, length)
    pi, A = softmax(initial_logits), softmax(transition_logits, axis=1)
    # d log softmax(theta)[k] / d theta = onehot(k) - softmax(theta), in expectation.
    g_initial = marginals[0] - pi
    g_transition = counts - counts.sum(axis=1, keepdims=True) * A
    return g_initial, g_transition, marginals


# ---------------------------------------------------------------------------------------
# Compiled once, reused (lengths differ across the batch).


@functools.partial(jax.jit, static_argnames="parallel")
def batch_forward_backward(li, lt, e, lengths, parallel=False):
    return jax.vmap(lambda e, n: hmm.forward_backward(li, lt, e, n, parallel=parallel))(e, lengths)


@functools.partial(jax.jit, static_argnames="parallel")
def batch_log_normalizer(li, lt, e, lengths, parallel=False):
    return jax.vmap(lambda e, n: hmm.log_normalizer(li, lt, e, n, parallel=parallel))(e, lengths)


@jax.jit
def batch_viterbi(li, lt, e, lengths):
    return jax.vmap(lambda e, n: hmm.viterbi(li, lt, e, n))(e, lengths)


@functools.partial(jax.jit, static_argnames="parallel")
def batch_grad(li, lt, e, lengths, parallel=False):
    grad = jax.grad(
        lambda li, lt, e, n: hmm.log_normalizer(li, lt, e, n, parallel=parallel), argnums=(0, 1, 2)
    )
    return jax.vmap(grad, in_axes=(None, None, 0, 0))(li, lt, e, lengths)


@jax.jit
def batch_grad_logits(initial_logits, transition_logits, e, lengths):
    def f(a, b, e, n):
        return hmm.log_normalizer(
            jax.nn.log_softmax(a), jax.nn.log_softmax(b, axis=1), e, n, parallel=False
        )

    grad = jax.grad(f, argnums=(0, 1, 2))
    return jax.vmap(grad, in_axes=(None, None, 0, 0))(initial_logits, transition_logits, e, lengths)


@pytest.fixture(scope="module")
def short_batch():
    rng = np.random.default_rng(0)
    log_initial, log_transition = random_chain(rng, K)
    log_emissions = rng.normal(size=(len(LENGTHS), T, K)) * 2
    log_emissions = pad_with_garbage(rng, log_emissions, LENGTHS)
    return log_initial, log_transition, log_emissions


# ---------------------------------------------------------------------------------------
# 1. Brute force


@pytest.mark.parametrize("parallel", [False, True])
def test_forward_backward_matches_brute_force(short_batch, parallel):
    li, lt, e = short_batch
    out = batch_forward_backward(li, lt, e, LENGTHS, parallel=parallel)
    lz = batch_log_normalizer(li, lt, e, LENGTHS, parallel=parallel)
    for b, length in enumerate(LENGTHS):
        log_z, marginals, counts, _, _ = brute_force(li, lt, e[b], length)
        np.testing.assert_allclose(out.log_normalizer[b], log_z, rtol=0, atol=1e-10)
        np.testing.assert_allclose(lz[b], log_z, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.marginals[b], marginals, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.transition_counts[b], counts, rtol=0, atol=1e-10)
        assert np.all(np.asarray(out.marginals[b, length:]) == 0.0)
    # The impossible initial state and transition get exactly zero posterior mass.
    assert np.all(np.asarray(out.marginals[:, 0, 1]) == 0.0)
    assert np.all(np.asarray(out.transition_counts[:, 0, 2]) == 0.0)


def test_padding_is_ignored(short_batch):
    """Other garbage in the padding frames gives bit-identical results; length=None is T."""
    li, lt, e = short_batch
    other = pad_with_garbage(np.random.default_rng(1), e, LENGTHS)
    for f in (batch_forward_backward, batch_viterbi, batch_log_normalizer):
        here, there = f(li, lt, e, LENGTHS), f(li, lt, other, LENGTHS)
        for x, y in zip(jax.tree.leaves(here), jax.tree.leaves(there), strict=True):
            np.testing.assert_array_equal(x, y)
    full = jax.jit(hmm.forward_backward)(li, lt, e[0])
    np.testing.assert_allclose(
        full.marginals, batch_forward_backward(li, lt, e, LENGTHS).marginals[0], atol=1e-14
    )


def test_viterbi_matches_brute_force(short_batch):
    li, lt, e = short_batch
    paths, values = batch_viterbi(li, lt, e, LENGTHS)
    assert paths.dtype == jnp.argmax(jnp.zeros(2)).dtype
    assert paths.shape == (len(LENGTHS), T)
    for b, length in enumerate(LENGTHS):
        _, _, _, best_path, best_value = brute_force(li, lt, e[b], length)
        np.testing.assert_array_equal(paths[b], best_path)
        np.testing.assert_allclose(values[b], best_value, rtol=0, atol=1e-10)


def test_single_frame():
    """T = 1: empty scans; log p(x) = logsumexp(log p(z_0) + e_0), no transitions."""
    rng = np.random.default_rng(2)
    li, lt = random_chain(rng, K)
    e = rng.normal(size=(1, K))
    log_z, marginals, counts, best_path, best_value = brute_force(li, lt, e, 1)
    for parallel in (False, True):
        out = hmm.forward_backward(li, lt, e, parallel=parallel)
        np.testing.assert_allclose(out.log_normalizer, log_z, atol=1e-12)
        np.testing.assert_allclose(out.marginals, marginals, atol=1e-12)
        np.testing.assert_array_equal(out.transition_counts, counts)
        np.testing.assert_allclose(
            hmm.log_normalizer(li, lt, e, parallel=parallel), log_z, atol=1e-12
        )
    path, value = hmm.viterbi(li, lt, e)
    np.testing.assert_array_equal(path, best_path)
    np.testing.assert_allclose(value, best_value, atol=1e-12)


# ---------------------------------------------------------------------------------------
# 2. Gradient = Fisher's identity


def test_gradient_is_fishers_identity():
    rng = np.random.default_rng(3)
    initial_logits = rng.normal(size=K)
    transition_logits = rng.normal(size=(K, K))
    e = pad_with_garbage(rng, rng.normal(size=(len(LENGTHS), T, K)) * 2, LENGTHS)
    grads = batch_grad_logits(initial_logits, transition_logits, e, LENGTHS)
    for b, length in enumerate(LENGTHS):
        expected = fisher_gradient(initial_logits, transition_logits, e[b], length)
        for got, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("parallel", [False, True])
def test_gradient_with_impossible_entries_is_finite(short_batch, parallel):
    """d log p(x) / d (log p(z_0), log A, log p(x_t | z_t)) = (q(z_0), counts, marginals),
    0 (not NaN) at the -inf entries and on padding frames."""
    li, lt, e = short_batch
    g_initial, g_transition, g_emissions = batch_grad(li, lt, e, LENGTHS, parallel=parallel)
    out = batch_forward_backward(li, lt, e, LENGTHS)
    for g in (g_initial, g_transition, g_emissions):
        assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g_initial, out.marginals[:, 0], atol=1e-10)
    np.testing.assert_allclose(g_transition, out.transition_counts, atol=1e-10)
    np.testing.assert_allclose(g_emissions, out.marginals, atol=1e-10)


# ---------------------------------------------------------------------------------------
# 3. parallel=True equals parallel=False


def test_parallel_matches_sequential():
    rng = np.random.default_rng(4)
    num_states, num_steps = 4, 200
    lengths = np.array([200, 137, 1])
    li, lt = random_chain(rng, num_states)
    lt[1, 3] = -np.inf
    lt[1] = lt[1] - logsumexp(lt[1])
    e = rng.normal(size=(len(lengths), num_steps, num_states)) * 3
    e[0, 50:60, 2] = -np.inf  # state 2 impossible for a while
    e = pad_with_garbage(rng, e, lengths)
    sequential = batch_forward_backward(li, lt, e, lengths, parallel=False)
    parallel = batch_forward_backward(li, lt, e, lengths, parallel=True)
    for x, y in zip(sequential, parallel, strict=True):
        assert np.all(np.isfinite(x)) and np.all(np.isfinite(y))
        np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        batch_log_normalizer(li, lt, e, lengths, parallel=True),
        sequential.log_normalizer,
        rtol=1e-10,
        atol=0,
    )
    np.testing.assert_allclose(
        sequential.marginals.sum(axis=-1), np.arange(num_steps) < lengths[:, None], atol=1e-12
    )
    np.testing.assert_allclose(
        sequential.transition_counts.sum(axis=(1, 2)), lengths - 1, atol=1e-10
    )


# ---------------------------------------------------------------------------------------
# 4. float32 is right, not just finite


def peaked_sequence(rng, num_states, num_steps):
    """A sticky chain with well-separated Gaussian emissions: log p(x_t | z_t = k) spans
    hundreds of nats per frame and log p(x) is about -5e4."""
    A = 0.8 * np.eye(num_states) + 0.2 * rng.dirichlet(np.ones(num_states), size=num_states)
    pi = rng.dirichlet(np.ones(num_states))
    z = [rng.choice(num_states, p=pi)]
    for _ in range(num_steps - 1):
        z.append(rng.choice(num_states, p=A[z[-1]]))
    means = np.linspace(-10.0, 10.0, num_states)
    x = means[np.array(z)] + 1.5 * rng.normal(size=num_steps)
    e = -0.5 * ((x[:, None] - means[None, :]) / 0.5) ** 2 - 50.0
    return np.log(pi), np.log(A), e


@pytest.fixture(scope="module")
def peaked_pair():
    """The float32 arguments and the float64 answer on exactly those (rounded) inputs, so
    that only the algorithm's error is measured; two sequences, one padded."""
    rng = np.random.default_rng(5)
    num_states, num_steps = 8, 1000
    li, lt, e = peaked_sequence(rng, num_states, num_steps)
    assert np.mean(e.max(axis=1) - e.min(axis=1)) > 100
    lengths = np.array([num_steps, 731])
    args32 = [jnp.asarray(a, jnp.float32) for a in (li, lt, np.stack([e, e]))]
    args64 = [np.asarray(a, np.float64) for a in args32]
    reference = batch_forward_backward(*args64, lengths)
    assert np.all(np.abs(np.asarray(reference.log_normalizer)) > 3e4)
    return args32, args64, lengths, reference


def assert_close_to_float64(out32, reference):
    assert out32.marginals.dtype == jnp.float32
    log_z, marginals, counts = (np.asarray(x, np.float64) for x in out32)
    np.testing.assert_allclose(log_z, reference.log_normalizer, rtol=1e-6)
    np.testing.assert_allclose(marginals, reference.marginals, rtol=0, atol=2e-6)
    np.testing.assert_allclose(counts, reference.transition_counts, rtol=1e-5, atol=1e-4)


def test_float32_matches_float64(peaked_pair):
    """log p(x) ~ -5e4: an unnormalised float32 forward pass would resolve only ~4e-3 nats
    in its messages; the normalised one keeps the marginals to ~1e-7."""
    args32, args64, lengths, reference = peaked_pair
    assert_close_to_float64(batch_forward_backward(*args32, lengths), reference)
    lz32 = batch_log_normalizer(*args32, lengths)
    np.testing.assert_allclose(np.asarray(lz32, np.float64), reference.log_normalizer, rtol=1e-6)
    path32, value32 = batch_viterbi(*args32, lengths)
    path64, value64 = batch_viterbi(*args64, lengths)
    np.testing.assert_array_equal(path32, path64)
    np.testing.assert_allclose(np.asarray(value32, np.float64), value64, rtol=1e-6)


def test_float32_parallel_matches_float64(peaked_pair):
    args32, _, lengths, reference = peaked_pair
    assert_close_to_float64(batch_forward_backward(*args32, lengths, parallel=True), reference)


# ---------------------------------------------------------------------------------------
# 5. Sampling


def test_sample_states_frequencies():
    rng = np.random.default_rng(6)
    li, lt = random_chain(rng, K)
    num_draws, num_steps = 2000, 50
    keys = jr.split(jr.key(0), num_draws)
    draws = jax.jit(jax.vmap(lambda k: hmm.sample_states(k, li, lt, num_steps)))(keys)
    draws = np.asarray(draws)
    assert draws.shape == (num_draws, num_steps)
    assert draws.dtype == jnp.argmax(jnp.zeros(2)).dtype
    initial = np.bincount(draws[:, 0], minlength=K) / num_draws
    np.testing.assert_allclose(initial, np.exp(li), atol=0.04)
    assert initial[1] == 0.0
    counts = np.zeros((K, K))
    np.add.at(counts, (draws[:, :-1].ravel(), draws[:, 1:].ravel()), 1.0)
    assert counts[0, 2] == 0.0
    np.testing.assert_allclose(counts / counts.sum(axis=1, keepdims=True), np.exp(lt), atol=0.02)


# ---------------------------------------------------------------------------------------
# 6. Batches: the scaled recursion and its log-space fallback

batch_fast = jax.jit(hmm.forward_backward_batch)
batch_fast_log_z = jax.jit(hmm.log_normalizer_batch)


def test_batch_scaled_recursion_matches_brute_force(short_batch):
    li, lt, e = short_batch
    out = batch_fast(li, lt, e, LENGTHS)
    lz = batch_fast_log_z(li, lt, e, LENGTHS)
    for b, length in enumerate(LENGTHS):
        log_z, marginals, counts, _, _ = brute_force(li, lt, e[b], length)
        np.testing.assert_allclose(out.log_normalizer[b], log_z, rtol=0, atol=1e-10)
        np.testing.assert_allclose(lz[b], log_z, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.marginals[b], marginals, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.transition_counts[b], counts, rtol=0, atol=1e-10)
        assert np.all(np.asarray(out.marginals[b, length:]) == 0.0)


def test_batch_float32_matches_float64(peaked_pair):
    args32, _, lengths, reference = peaked_pair
    assert_close_to_float64(batch_fast(*args32, lengths), reference)
    lz32 = batch_fast_log_z(*args32, lengths)
    np.testing.assert_allclose(np.asarray(lz32, np.float64), reference.log_normalizer, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_falls_back_to_log_space_where_scaling_would_underflow(dtype):
    """A left-to-right chain (structural zeros) and a frame that an unreachable state
    explains e^4000 better than the reachable ones: the scaled normaliser underflows, the
    batch is done in log space, and the answer is the log-space one (finite, no NaN)."""
    rng = np.random.default_rng(7)
    k, t = 4, 60
    li = np.full(k, -np.inf)
    li[0] = 0.0
    stay = rng.uniform(0.3, 0.9, k)
    lt = np.full((k, k), -np.inf)
    for i in range(k):  # stay, or move one state on
        lt[i, i] = np.log(stay[i]) if i < k - 1 else 0.0
        if i < k - 1:
            lt[i, i + 1] = np.log1p(-stay[i])
    e = rng.normal(size=(2, t, k))
    e[:, 1, 3] = 2000.0  # state 3 cannot be reached at t = 1
    e[:, 1, :3] = -2000.0
    args = [jnp.asarray(v, dtype) for v in (li, lt, e)]
    lengths = np.array([t, 40])
    log_z, _, _, smallest = hmm._scaled_batch(*args, lengths, smooth=False)
    assert hmm._fallback_needed(smallest, log_z)  # the scaled recursion alone would fail here
    got = batch_fast(*args, lengths)
    want = batch_forward_backward(*args, lengths)
    for x, y in zip(got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(x)))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch_fast_log_z(*args, lengths), want.log_normalizer, rtol=1e-6)
