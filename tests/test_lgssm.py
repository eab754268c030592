"""The linear-Gaussian state-space model: EM against pykalman (all parameters, some frozen,
missing frames), its log-likelihood against statsmodels, missing values and ragged lengths
against the same data without them, 100 finite monotone iterations, float32, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pykalman import KalmanFilter

import elbo_jax as ej

S, OBS = 2, 2
ALL = [
    "initial_state_mean",
    "initial_state_covariance",
    "transition_matrices",
    "transition_covariance",
    "observation_matrices",
    "observation_covariance",
]
_PYKALMAN_NAMES = dict(
    zip(ALL, ej.models._lgssm.PARAMETERS, strict=True)  # pykalman's em_vars -> ours
)


def _truth(dtype=np.float64):
    return ej.models.LinearGaussianSSM(
        np.array([1.0, -1.0], dtype),
        np.array([[1.0, 0.2], [0.2, 0.5]], dtype),
        np.array([[0.9, 0.2], [-0.1, 0.8]], dtype),
        np.array([[0.3, 0.05], [0.05, 0.2]], dtype),
        np.array([[1.0, 0.5], [0.0, 1.0]], dtype),
        np.array([[0.5, 0.1], [0.1, 0.4]], dtype),
    )


def _start(**kwargs):
    return ej.models.LinearGaussianSSM(
        np.zeros(S),
        np.eye(S),
        0.5 * np.eye(S),
        0.5 * np.eye(S),
        np.array([[1.0, 0.0], [0.3, 1.0]]),
        np.eye(OBS),
        **kwargs,
    )


def _pykalman(start, frozen=()):
    p = start.params()
    return KalmanFilter(
        transition_matrices=np.asarray(p.transition_matrix),
        observation_matrices=np.asarray(p.observation_matrix),
        transition_covariance=np.asarray(p.transition_covariance),
        observation_covariance=np.asarray(p.observation_covariance),
        initial_state_mean=np.asarray(p.initial_mean),
        initial_state_covariance=np.asarray(p.initial_covariance),
        em_vars=[name for name in ALL if _PYKALMAN_NAMES[name] not in frozen],
    )


def _assert_same_model(model, kf, rtol=1e-6):
    p = model.params()
    pairs = [
        (p.initial_mean, kf.initial_state_mean),
        (p.initial_covariance, kf.initial_state_covariance),
        (p.transition_matrix, kf.transition_matrices),
        (p.transition_covariance, kf.transition_covariance),
        (p.observation_matrix, kf.observation_matrices),
        (p.observation_covariance, kf.observation_covariance),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * 1e-2)


@pytest.fixture(scope="module")
def one_sequence():
    _, y = _truth().sample(jax.random.key(0), 1, 80)
    return np.asarray(y)


@pytest.mark.parametrize(
    "frozen",
    [(), ("transition_matrix", "observation_covariance"), ("initial_mean", "observation_matrix")],
    ids=["all", "frozen-F-R", "frozen-m0-H"],
)
def test_em_equals_pykalman(one_sequence, frozen):
    start = _start(frozen=frozen)
    res = ej.fit(start, one_sequence, max_iters=5, tol=0)
    assert res.num_increases == 0
    kf = _pykalman(start, frozen).em(one_sequence[0], n_iter=5)
    _assert_same_model(res.model, kf)
    for name in frozen:  # kept exactly
        np.testing.assert_array_equal(getattr(res.model, name), getattr(start, name))


def test_missing_frames_equal_pykalman_masked(one_sequence):
    y = one_sequence.copy()
    y[0, [5, 6, 30, 79]] = np.nan
    start = _start()
    res = ej.fit(start, y, max_iters=4, tol=0)
    masked = np.ma.masked_invalid(y[0])
    kf = _pykalman(start).em(masked, n_iter=4)
    _assert_same_model(res.model, kf)
    np.testing.assert_allclose(ej.log_evidence(res.model, y), kf.loglikelihood(masked), rtol=1e-8)


def test_log_likelihood_equals_statsmodels():
    from statsmodels.tsa.statespace.mlemodel import MLEModel

    model = _truth()
    _, y = model.sample(jax.random.key(1), 1, 60)
    y = np.asarray(y[0])
    p = model.params()
    sm = MLEModel(y, k_states=S)
    sm["design"] = np.asarray(p.observation_matrix)
    sm["obs_cov"] = np.asarray(p.observation_covariance)
    sm["transition"] = np.asarray(p.transition_matrix)
    sm["selection"] = np.eye(S)
    sm["state_cov"] = np.asarray(p.transition_covariance)
    sm.initialize_known(np.asarray(p.initial_mean), np.asarray(p.initial_covariance))
    want = sm.loglike(np.array([]))
    np.testing.assert_allclose(ej.log_evidence(model, y[None]), want, rtol=1e-10)


def test_many_sequences_ragged_equal_the_sequences_one_by_one():
    model = _truth()
    _, y = model.sample(jax.random.key(2), 4, 50)
    y = np.asarray(y)
    lengths = np.array([50, 31, 12, 50])
    seqs = [y[i, :n] for i, n in enumerate(lengths)]
    garbage = y.copy()
    for i, n in enumerate(lengths):
        garbage[i, n:] = np.nan if i % 2 else 1e6  # padding is never read
    ragged = ej.Sequences(garbage, lengths)
    start = _start()
    # The statistics of the batch are the merged statistics of the sequences one by one.
    # (Each sequence alone, in one padded shape with garbage padding: one compiled call.)
    statistics = eqx.filter_jit(lambda m, x: m.sufficient_statistics(x, ej.ExactPosterior()))
    alone = [ej.Sequences(garbage[i : i + 1], lengths[i : i + 1]) for i in range(4)]
    batch = statistics(start, ej._validate.prepare_data(start, ragged))
    parts = [statistics(start, ej._validate.prepare_data(start, s)) for s in alone]
    total = parts[0]
    for part in parts[1:]:
        total = ej.merge_statistics(total, part)
    for name in batch:
        np.testing.assert_allclose(batch[name], total[name], rtol=1e-10, atol=1e-10)
    each = sum(float(ej.log_evidence(start, s)) for s in alone)
    np.testing.assert_allclose(ej.log_evidence(start, ragged) * 4, each, rtol=1e-12)
    # Trailing missing frames have the likelihood of the shorter sequence.
    trailing = np.where(np.arange(50)[None, :, None] < lengths[:, None, None], y, np.nan)
    np.testing.assert_allclose(
        ej.log_evidence(start, trailing), ej.log_evidence(start, ragged), rtol=1e-12
    )
    # The same fit from another padding of the same sequences.
    a = ej.fit(start, ragged, max_iters=5, tol=0)
    b = ej.fit(start, ej.Sequences.from_list(seqs, pad_to=64), max_iters=5, tol=0)
    for got, want in zip(a.model.params(), b.model.params(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.history, b.history, rtol=1e-10)


def test_partly_observed_frames_keep_em_monotone_and_f_exact():
    model = _truth()
    _, y = model.sample(jax.random.key(3), 3, 60)
    y = np.array(y)
    rng = np.random.default_rng(0)
    y[rng.uniform(size=y.shape) < 0.2] = np.nan  # single entries missing
    res = ej.fit(_start(), y, max_iters=30, tol=0)
    assert res.num_increases == 0
    assert np.all(np.diff(np.asarray(res.history)) >= -1e-10)
    # At the exact posterior F equals -log p(y): the entropy and expected log-joint agree.
    q = res.model.posterior(ej._validate.prepare_data(res.model, y))
    f = ej.free_energy(res.model, q, y)
    np.testing.assert_allclose(f, -ej.log_evidence(res.model, y), rtol=1e-10)


def test_hundred_iterations_stay_finite_and_monotone():
    _, y = _truth().sample(jax.random.key(4), 20, 100)
    res = ej.fit(_start(), y, max_iters=100, tol=0)
    assert res.status == ej.Status.MAX_ITERS and res.num_iters == 100
    assert res.num_increases == 0
    history = np.asarray(res.history)
    assert np.all(np.isfinite(history)) and np.all(np.diff(history) >= -1e-9)
    for cov in (res.model.transition_covariance, res.model.observation_covariance):
        assert np.all(np.linalg.eigvalsh(np.asarray(cov)) > 0)


def test_float32_fit_equals_float64():
    _, y = _truth().sample(jax.random.key(5), 10, 200)
    start64 = _start()
    start32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else a, start64
    )
    a = ej.fit(start64, y, max_iters=10, tol=0)
    b = ej.fit(start32, np.asarray(y, np.float32), max_iters=10, tol=0)
    assert b.model.transition_matrix.dtype == jnp.float32
    for got, want in zip(b.model.params(), a.model.params(), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(b.elbo, a.elbo, rtol=1e-5)


def test_filter_smooth_sample_and_gradient_m_step():
    model = _truth()
    states, y = model.sample(jax.random.key(6), 3, 40)
    assert states.shape == (3, 40, S) and y.shape == (3, 40, OBS)
    smoothed = model.smooth(y)
    filtered = model.filter(y)
    np.testing.assert_allclose(smoothed.means[:, -1], filtered.means[:, -1], rtol=1e-10)
    np.testing.assert_allclose(smoothed.log_likelihood.mean(), ej.log_evidence(model, y))
    # Gradient M-steps go through the same F (E_q[log p] from the posterior's moments).
    import optax

    res = ej.fit(_start(), y, m_step=ej.GradientMStep(optax.adam(1e-2), num_steps=5), max_iters=20)
    assert res.elbo > res.initial_elbo


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _start(frozen=("bogus",)), "frozen names unknown"),
        (
            lambda: ej.models.LinearGaussianSSM(
                np.zeros(2), -np.eye(2), np.eye(2), np.eye(2), np.eye(2), np.eye(2)
            ),
            "initial_covariance must be a symmetric positive-definite",
        ),
        (
            lambda: ej.models.LinearGaussianSSM(
                np.zeros(2), np.eye(2), np.eye(3), np.eye(2), np.eye(2), np.eye(2)
            ),
            "transition_matrix has shape",
        ),
    ],
)
def test_bad_parameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_data_are_refused_naming_x():
    with pytest.raises(ValueError, match="x has frames of shape"):
        ej.fit(_start(), np.zeros((2, 10, 3)))
    y = np.zeros((2, 10, 2))
    y[0, 3, 1] = np.inf
    with pytest.raises(ValueError, match="x contains Inf"):
        ej.fit(_start(), y)


def test_parallel_scan_fit_equals_the_sequential_one():
    _, y = _truth().sample(jax.random.key(7), 3, 40)
    a = ej.fit(_start(), y, max_iters=3, tol=0)
    b = ej.fit(_start(parallel_scan=True), y, max_iters=3, tol=0)
    for got, want in zip(b.model.params(), a.model.params(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.history, a.history, rtol=1e-10)
