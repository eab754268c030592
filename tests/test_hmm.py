"""Hidden Markov models: the built-in HMMs against hmmlearn (same start, same iterations), a
user HMM written as one emission log-density against the built-in one, ragged sequences
against sequences one by one, MAP against hmmlearn's Dirichlet priors, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hmmlearn import hmm as hl
from test_solvers import _count_compiles

import elbo_jax as ej

K, D = 3, 2
LENGTHS = [60, 17, 45, 1, 33]


def _stochastic(rng, k, stay=0.7):
    a = rng.uniform(0.2, 1.0, (k, k)) + np.eye(k) * stay * k
    return a / a.sum(1, keepdims=True)


def _gaussian_truth(covariance_type="full"):
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 3.0]])
    if covariance_type == "full":
        covs = np.array([[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 0.8]], np.eye(2) * 0.7])
    else:
        covs = np.array([[1.0, 0.5], [0.6, 0.8], [0.7, 0.7]])
    return ej.models.GaussianHMM(
        np.full(K, 1 / K), _stochastic(rng, K), means, covs, covariance_type
    )


def _ragged(model, key, lengths=LENGTHS):
    frames, _ = model.sample(key, len(lengths), max(lengths))
    frames = np.asarray(frames)
    return ej.Sequences(frames, np.asarray(lengths)), [
        f[:n] for f, n in zip(frames, lengths, strict=True)
    ]


def _hmmlearn_twin(start, cls, **kwargs):
    twin = cls(start.num_states, n_iter=6, tol=0, init_params="", implementation="log", **kwargs)
    twin.startprob_ = np.asarray(start.initial_probs)
    twin.transmat_ = np.asarray(start.transition_matrix)
    return twin


def _assert_close(a, b, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * 1e-3)


# ------------------------------------------------------------------ built-ins against hmmlearn
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gaussian_hmm_equals_hmmlearn_on_ragged_sequences(covariance_type):
    x, seqs = _ragged(_gaussian_truth(covariance_type), jax.random.key(0))
    start = ej.models.GaussianHMM.initialize(jax.random.key(1), x, K, covariance_type)
    res = ej.fit(start, x, max_iters=6, tol=0)
    twin = _hmmlearn_twin(start, hl.GaussianHMM, covariance_type=covariance_type, covars_prior=0)
    twin.means_ = np.asarray(start.means)
    twin.covars_ = np.asarray(start.covariances)
    twin.fit(np.concatenate(seqs), lengths=LENGTHS)
    model = res.model
    _assert_close(model.initial_probs, twin.startprob_)
    _assert_close(model.transition_matrix, twin.transmat_)
    _assert_close(model.means, twin.means_)
    _assert_close(model.covariances, twin._covars_)  # diag: the variances
    # hmmlearn's monitor logs log p(x) of the model before each M-step: ours shifted by one.
    history = np.asarray(res.history) * len(LENGTHS)
    _assert_close(history[:-1], list(twin.monitor_.history)[1:], rtol=1e-10)
    _assert_close(
        ej.log_evidence(model, x) * len(LENGTHS),
        twin.score(np.concatenate(seqs), lengths=LENGTHS),
        rtol=1e-10,
    )
    _assert_close(model.bic(x), twin.bic(np.concatenate(seqs), lengths=LENGTHS), rtol=1e-10)
    proba = model.predict_proba(x)
    want = twin.predict_proba(np.concatenate(seqs), lengths=LENGTHS)
    got = np.concatenate([p[:n] for p, n in zip(np.asarray(proba), LENGTHS, strict=True)])
    np.testing.assert_allclose(got, want, atol=1e-9)
    paths = model.predict(x)
    _, want_paths = twin.decode(np.concatenate(seqs), lengths=LENGTHS, algorithm="viterbi")
    got_paths = np.concatenate([p[:n] for p, n in zip(np.asarray(paths), LENGTHS, strict=True)])
    np.testing.assert_array_equal(got_paths, want_paths)


def test_categorical_hmm_equals_hmmlearn():
    rng = np.random.default_rng(3)
    m = 5
    emission = rng.dirichlet(np.ones(m) * 0.5, K)
    truth = ej.models.CategoricalHMM(np.full(K, 1 / K), _stochastic(rng, K), emission)
    x, seqs = _ragged(truth, jax.random.key(2))
    start = ej.models.CategoricalHMM.initialize(jax.random.key(3), x, K)
    res = ej.fit(start, x, max_iters=6, tol=0)
    twin = _hmmlearn_twin(start, hl.CategoricalHMM, n_features=m)
    twin.emissionprob_ = np.asarray(start.emission_probs)
    twin.fit(np.concatenate(seqs)[:, None].astype(int), lengths=LENGTHS)
    _assert_close(res.model.transition_matrix, twin.transmat_)
    _assert_close(res.model.initial_probs, twin.startprob_)
    np.testing.assert_allclose(res.model.emission_probs, twin.emissionprob_, rtol=1e-6, atol=1e-12)
    # the initializer traces, so restarts vmap it: restart r is the fit from initialize(keys[r])
    init = lambda k: ej.models.CategoricalHMM.initialize(k, x, K)
    best = ej.fit(init, x, restarts=2, key=jax.random.key(3), max_iters=2, tol=0)
    keys = jax.random.split(jax.random.key(3), 2)
    r = int(np.argmax(best.restart_elbos))
    np.testing.assert_allclose(
        best.model.emission_probs, ej.fit(init(keys[r]), x, max_iters=2, tol=0).model.emission_probs
    )


def test_poisson_hmm_equals_hmmlearn():
    rng = np.random.default_rng(4)
    truth = ej.models.PoissonHMM(
        np.full(K, 1 / K), _stochastic(rng, K), np.array([[1.0, 8.0], [5.0, 2.0], [12.0, 12.0]])
    )
    x, seqs = _ragged(truth, jax.random.key(4))
    start = ej.models.PoissonHMM.initialize(jax.random.key(5), x, K)
    res = ej.fit(start, x, max_iters=6, tol=0)
    twin = _hmmlearn_twin(start, hl.PoissonHMM)
    twin.lambdas_ = np.asarray(start.rates)
    twin.fit(np.concatenate(seqs).astype(int), lengths=LENGTHS)
    _assert_close(res.model.transition_matrix, twin.transmat_)
    _assert_close(res.model.rates, twin.lambdas_)


def test_map_with_dirichlet_priors_equals_hmmlearn():
    x, seqs = _ragged(_gaussian_truth(), jax.random.key(6))
    start = ej.models.GaussianHMM.initialize(jax.random.key(7), x, K)
    prior = ej.models.HMMPrior(initial_concentration=2.0, transition_concentration=3.0)
    res = ej.fit(start, x, prior=prior, max_iters=4, tol=0)
    twin = _hmmlearn_twin(
        start,
        hl.GaussianHMM,
        covariance_type="full",
        covars_prior=0,
        startprob_prior=2.0,
        transmat_prior=3.0,
    )
    twin.n_iter = 4
    twin.means_, twin.covars_ = np.asarray(start.means), np.asarray(start.covariances)
    twin.fit(np.concatenate(seqs), lengths=LENGTHS)
    _assert_close(res.model.transition_matrix, twin.transmat_)
    _assert_close(res.model.initial_probs, twin.startprob_)
    assert res.num_increases == 0


# ------------------------------------------------------------------ ragged == one by one
def test_padding_never_changes_the_answer():
    truth = _gaussian_truth()
    x, seqs = _ragged(truth, jax.random.key(8))
    # Padding frames filled with garbage (NaN included) are never read.
    garbage = np.array(x.frames)
    for i, n in enumerate(LENGTHS):
        garbage[i, n:] = np.nan if i % 2 else 1e6
    padded = ej.Sequences(garbage, x.lengths)
    one_by_one = sum(float(ej.log_evidence(truth, ej.Sequences(s[None], [len(s)]))) for s in seqs)
    _assert_close(ej.log_evidence(truth, padded) * len(seqs), one_by_one, rtol=1e-12)
    stats = truth.sufficient_statistics(
        ej._validate.prepare_data(truth, padded), ej.ExactPosterior()
    )
    parts = [
        truth.sufficient_statistics(
            ej.Sequences(jnp.asarray(s[None]), [len(s)]), ej.ExactPosterior()
        )
        for s in seqs
    ]
    total = parts[0]
    for part in parts[1:]:
        total = ej.merge_statistics(total, part)
    _assert_close(stats["transitions"], total["transitions"], rtol=1e-12)
    _assert_close(stats["initial"], total["initial"], rtol=1e-12)
    moved = stats["emissions"].about(total["emissions"].shift)
    _assert_close(moved.second, total["emissions"].second, rtol=1e-10)
    # The same fit from the padded batch and from a batch padded further.
    start = ej.models.GaussianHMM.initialize(jax.random.key(9), x, K)
    a = ej.fit(start, padded, max_iters=3, tol=0)
    b = ej.fit(start, ej.Sequences.from_list(seqs, pad_to=80), max_iters=3, tol=0)
    _assert_close(a.model.means, b.model.means, rtol=1e-10)
    _assert_close(a.history, b.history, rtol=1e-12)


def test_new_lengths_within_the_padded_size_do_not_recompile():
    truth = _gaussian_truth()
    frames, _ = truth.sample(jax.random.key(10), 6, 40)
    start = truth
    ej.fit(start, ej.Sequences(frames, [40, 3, 17, 40, 22, 9]), max_iters=2, tol=0)
    res, names = _count_compiles(
        lambda: ej.fit(start, ej.Sequences(frames, [5, 40, 31, 2, 40, 40]), max_iters=2, tol=0)
    )
    assert not any("_call" in str(name) for name in names), names
    assert res.num_iters == 2


# ------------------------------------------------------------------ a user HMM
class DiagGaussianRegimes(ej.models.HMM):
    """A user's HMM: only the emission log-density of one frame in one state."""

    loc: jax.Array  # (K, D)
    log_scale: jax.Array  # (K, D)

    def emission_log_density(self, frame, state):
        z = (frame - self.loc[state]) * jnp.exp(-self.log_scale[state])
        return jnp.sum(-0.5 * z**2 - self.log_scale[state] - 0.5 * math.log(2 * math.pi))


def test_user_hmm_fits_to_the_built_in_answer():
    x, _ = _ragged(_gaussian_truth("diag"), jax.random.key(11))
    start = ej.models.GaussianHMM.initialize(jax.random.key(12), x, K, "diag")
    built_in = ej.fit(start, x, max_iters=200, tol=1e-12)
    user = DiagGaussianRegimes(
        start.initial_logits,
        start.transition_logits,
        start.means,
        0.5 * jnp.log(start.covariances),
    )
    assert user.latent == ej.Chain(K)
    # The generic log_joint equals the built-in's on a path.
    datum = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), x)
    path = jnp.arange(x.frames.shape[1]) % K
    _assert_close(user.log_joint(datum, path), start.log_joint(datum, path), rtol=1e-12)
    res = ej.fit(user, x, max_iters=200, tol=1e-12)
    assert res.num_increases == 0
    # Both stop at max_iters on a flat stretch: the numerical M-step is exact to ~1e-9.
    _assert_close(res.elbo, built_in.elbo, rtol=1e-8)
    _assert_close(res.model.loc, built_in.model.means, rtol=1e-5)
    _assert_close(jnp.exp(2 * res.model.log_scale), built_in.model.covariances, rtol=1e-5)
    _assert_close(res.model.transition_matrix, built_in.model.transition_matrix, rtol=1e-5)


# ------------------------------------------------------------------ hard EM, float32
def test_hard_em_runs_viterbi_and_is_monotone():
    x, _ = _ragged(_gaussian_truth(), jax.random.key(13))
    start = ej.models.GaussianHMM.initialize(jax.random.key(14), x, K)
    res = ej.fit(start, x, q=ej.PointMass(), max_iters=20)
    assert res.num_increases == 0
    np.testing.assert_array_equal(res.q.value, res.model.predict(x))
    assert np.all(np.diff(np.asarray(res.history)) >= -1e-9)


def test_float32_fit_equals_the_float64_fit():
    truth = _gaussian_truth()
    frames, _ = truth.sample(jax.random.key(15), 20, 300)
    start = ej.models.GaussianHMM.initialize(jax.random.key(16), frames, K)
    start32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if eqx_float(a) else a, start)
    res64 = ej.fit(start, frames, max_iters=10, tol=0)
    res32 = ej.fit(start32, np.asarray(frames, np.float32), max_iters=10, tol=0)
    assert res32.model.means.dtype == jnp.float32
    _assert_close(res32.model.means, res64.model.means, rtol=1e-4)
    _assert_close(res32.model.transition_matrix, res64.model.transition_matrix, rtol=1e-4)
    _assert_close(res32.elbo, res64.elbo, rtol=1e-6)


def eqx_float(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ej.Sequences(np.zeros((2, 5, 2)), [5, 6]), "lengths must be in"),
        (lambda: ej.Sequences(np.zeros((2, 5, 2)), [0, 5]), "lengths must be in"),
        (lambda: ej.Sequences(np.zeros((2, 5, 2)), [5]), "lengths has shape"),
        (lambda: ej.Sequences(np.zeros((5,)), None), "frames has shape"),
        (
            lambda: ej.models.GaussianHMM(
                np.ones(2) / 2, [[0.5, 0.6], [0.5, 0.5]], np.zeros((2, 1)), np.ones((2, 1, 1))
            ),
            "transition_matrix must be row-stochastic",
        ),
        (
            lambda: ej.models.GaussianHMM(
                [0.5, 0.6], np.eye(2), np.zeros((2, 1)), np.ones((2, 1, 1))
            ),
            "initial_probs must be a probability vector",
        ),
        (
            lambda: ej.models.GaussianHMM(
                np.ones(2) / 2, np.eye(2), np.zeros((2, 2)), -np.stack([np.eye(2)] * 2)
            ),
            "covariances must be symmetric positive-definite",
        ),
    ],
)
def test_bad_parameters_and_lengths_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_data_are_refused_naming_x():
    model = _gaussian_truth()
    with pytest.raises(ValueError, match="x has frames of shape"):
        ej.fit(model, np.zeros((4, 10, 3)))  # D = 3, the model has 2
    with pytest.raises(ValueError, match="expects \\(N, T, ...\\)"):
        ej.fit(model, np.zeros((10,)))
    bad = np.zeros((4, 10, 2))
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        ej.fit(model, bad)
    with pytest.raises(TypeError, match="ej.Sequences.from_list"):
        ej.fit(model, [np.zeros((3, 2)), np.zeros((4, 2))])


def test_parallel_scan_fits_equal_the_sequential_ones():
    x, _ = _ragged(_gaussian_truth(), jax.random.key(17))
    start = ej.models.GaussianHMM.initialize(jax.random.key(18), x, K)

    class ParallelRegimes(ej.models.HMM):
        loc: jax.Array
        log_scale: jax.Array
        parallel_scan = True
        emission_log_density = DiagGaussianRegimes.emission_log_density

    user = dict(loc=start.means, log_scale=jnp.zeros((K, D)))
    a = ParallelRegimes(start.initial_logits, start.transition_logits, **user)
    b = DiagGaussianRegimes(start.initial_logits, start.transition_logits, **user)
    xs = ej._validate.prepare_data(a, x)
    la, qa = a.exact_posterior(xs)
    lb, qb = b.exact_posterior(xs)
    np.testing.assert_allclose(la, lb, rtol=1e-10)
    np.testing.assert_allclose(qa.marginals, qb.marginals, atol=1e-10)
    np.testing.assert_allclose(qa.transition_counts, qb.transition_counts, atol=1e-9)
    np.testing.assert_allclose(qa.entropies, qb.entropies, rtol=1e-9)


def test_reg_covar_fit_is_monotone_on_f_plus_its_penalty():
    # reg_covar makes the M-step exact on F + P, P from the posterior's state occupancies;
    # without that allowance these fits report dozens of "increases".
    x, _ = _ragged(_gaussian_truth(), jax.random.key(19))
    start = ej.models.GaussianHMM.initialize(jax.random.key(20), x, K, reg_covar=0.1)
    res = ej.fit(start, x, max_iters=60, tol=1e-10)
    assert res.num_increases == 0
    cov = np.asarray(res.model.covariances)
    assert np.all(np.linalg.eigvalsh(cov) >= 0.1 * (1 - 1e-9))
