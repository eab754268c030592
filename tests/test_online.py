"""Online EM: stepwise (Cappé–Moulines), inertia (Amid–Warmuth) and stochastic generalized EM.

Oracles: batch EM itself (stepwise EM with rho = 1 on the whole data, inertia EM with
eta = inf, and stochastic EM on the whole data are batch EM / generalized EM, iteration by
iteration); SciPy's minimiser of the inertia objective written out in NumPy (the Gaussian
relative entropy in closed form); the batch optimum for stepwise EM on a stream.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.special
from helpers import PoissonMixture, poisson_data, poisson_mixture, sample_poisson_mixture

import elbo_jax as ej
from elbo_jax.models import GaussianHMM, GaussianMixture, GaussianMixturePrior


def _leaves_close(a, b, tol):
    diffs = [
        float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float64) - jnp.asarray(v, jnp.float64))))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    ]
    assert max(diffs) <= tol, diffs


@pytest.fixture(scope="module")
def gmm_data():
    key = jax.random.key(0)
    true = GaussianMixture.initialize(key, jax.random.normal(key, (40, 2)) * 4, 3)
    x, _ = true.sample(jax.random.key(1), 600)
    return x, GaussianMixture.initialize(jax.random.key(2), x, 3)


@pytest.mark.parametrize("map_prior", [False, True])
def test_stepwise_with_rho_one_and_inertia_with_infinite_eta_are_batch_em(gmm_data, map_prior):
    x, model = gmm_data
    prior = GaussianMixturePrior(2, concentration=2.0) if map_prior else None
    for iters in (1, 2, 4):
        batch = ej.fit(model, x, max_iters=iters, tol=0, prior=prior)
        stepwise = ej.fit(
            model, x, max_iters=iters, tol=0, prior=prior, m_step=ej.StepwiseMStep(step_size=1.0)
        )
        inertia = ej.fit(
            model, x, max_iters=iters, tol=0, prior=prior, m_step=ej.InertiaMStep(eta=math.inf)
        )
        _leaves_close(stepwise.model, batch.model, 1e-12)
        _leaves_close(inertia.model, batch.model, 1e-12)
    # An online pass reports F at the parameters it visited the data with: batch EM's F one
    # iteration earlier (the prior's weight 1/N of the whole data included).
    np.testing.assert_allclose(stepwise.history[1:], batch.history[:-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(stepwise.initial_elbo, batch.initial_elbo, rtol=0, atol=1e-12)


def test_stepwise_with_rho_one_is_batch_em_for_sequence_models_and_a_found_m_step():
    key = jax.random.key(3)
    hmm = GaussianHMM.initialize(key, 3 * jax.random.normal(key, (4, 30, 2)), 3)
    x, _ = hmm.sample(jax.random.key(4), 6, 30)
    start = GaussianHMM.initialize(jax.random.key(5), x, 3)
    for iters in (1, 3):
        batch = ej.fit(start, x, max_iters=iters, tol=0)
        online = ej.fit(start, x, max_iters=iters, tol=0, m_step=ej.StepwiseMStep(step_size=1.0))
        _leaves_close(online.model, batch.model, 1e-12)
    # A linear-Gaussian state-space model (no complete-data statistics: no inertia EM).
    from elbo_jax.models import LinearGaussianSSM

    y = jnp.cumsum(jax.random.normal(jax.random.key(6), (4, 30, 2)), axis=1) * 0.3
    lgssm = LinearGaussianSSM.initialize(jax.random.key(7), y, 2)
    batch = ej.fit(lgssm, y, max_iters=2, tol=0)
    online = ej.fit(lgssm, y, max_iters=2, tol=0, m_step=ej.StepwiseMStep(step_size=1.0))
    _leaves_close(online.model, batch.model, 1e-12)
    with pytest.raises(TypeError, match="for a sequence model; LinearGaussianSSM has none"):
        ej.fit(lgssm, y, m_step=ej.InertiaMStep())
    # A user model without a closed form: the statistics elbo_jax finds in its log_joint.
    counts = poisson_data(n=120)
    user = poisson_mixture([0.0, 0.1, -0.1], [0.5, 1.5, 2.5])
    batch = ej.fit(user, counts, max_iters=2, tol=0)
    online = ej.fit(user, counts, max_iters=2, tol=0, m_step=ej.StepwiseMStep(step_size=1.0))
    # (The mixing logits are defined up to a constant: compare the log-weights.)
    log_weights = lambda m: jax.nn.log_softmax(m.mix_logits)
    _leaves_close(log_weights(online.model), log_weights(batch.model), 1e-9)
    _leaves_close(online.model.log_rates, batch.model.log_rates, 1e-9)


def _np_params(theta, k, d):
    logits = theta[:k]
    means = theta[k : k + k * d].reshape(k, d)
    raw = theta[k + k * d :].reshape(k, d * (d + 1) // 2)
    chols = np.zeros((k, d, d))
    rows, cols = np.tril_indices(d)
    chols[:, rows, cols] = raw
    diag = np.arange(d)
    chols[:, diag, diag] = np.exp(chols[:, diag, diag])
    weights = scipy.special.softmax(logits)
    return weights, means, chols @ np.swapaxes(chols, 1, 2)


def _np_log_normal(x, mean, cov):
    d = x.shape[-1]
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - mean).T)
    return -0.5 * np.sum(sol**2, 0) - np.sum(np.log(np.diag(chol))) - 0.5 * d * np.log(2 * np.pi)


def _np_kl_normal(m1, c1, m2, c2):
    d = m1.shape[0]
    inv2 = np.linalg.inv(c2)
    diff = m2 - m1
    return 0.5 * (
        np.trace(inv2 @ c1)
        + diff @ inv2 @ diff
        - d
        + np.linalg.slogdet(c2)[1]
        - np.linalg.slogdet(c1)[1]
    )


def test_inertia_closed_form_is_the_minimiser_of_the_batch_loss_plus_relative_entropy():
    """One inertia update on a small mixture against SciPy's minimiser of
    U(theta~) + (1/eta) D_RE(theta, theta~), both written out in NumPy: U the minibatch's
    expected complete-data negative log-likelihood per datum under the posterior at theta,
    D_RE the relative entropy of the complete-data distributions p(x, z)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (30, 2)), rng.normal(2, 0.7, (20, 2))])
    fitted = GaussianMixture.initialize(jax.random.key(0), jnp.asarray(x), 2, reg_covar=0.0)
    model = eqx.tree_at(lambda m: m.loc, fitted, fitted.loc + 1.0)  # away from the optimum
    eta = 0.4
    update = ej.fit(model, jnp.asarray(x), m_step=ej.InertiaMStep(eta=eta), max_iters=1, tol=0)

    w0 = np.asarray(model.weights)
    mu0 = np.asarray(model.loc)
    cov0 = np.asarray(model.covariances)
    table = np.stack([np.log(w0[j]) + _np_log_normal(x, mu0[j], cov0[j]) for j in range(2)], 1)
    resp = scipy.special.softmax(table, axis=1)

    def objective(theta):
        w, mu, cov = _np_params(theta, 2, 2)
        logs = np.stack([np.log(w[j]) + _np_log_normal(x, mu[j], cov[j]) for j in range(2)], 1)
        u = -np.mean(np.sum(resp * logs, 1))
        d_re = sum(
            w0[j] * (np.log(w0[j] / w[j]) + _np_kl_normal(mu0[j], cov0[j], mu[j], cov[j]))
            for j in range(2)
        )
        return u + d_re / eta

    chol0 = np.linalg.cholesky(cov0)
    rows, cols = np.tril_indices(2)
    raw0 = chol0[:, rows, cols]
    raw0[:, [0, 2]] = np.log(raw0[:, [0, 2]])
    theta0 = np.concatenate([np.log(w0), mu0.ravel(), raw0.ravel()])
    found = scipy.optimize.minimize(objective, theta0, method="BFGS", options={"gtol": 1e-10})
    w, mu, cov = _np_params(found.x, 2, 2)
    np.testing.assert_allclose(update.model.weights, w, atol=1e-5)
    np.testing.assert_allclose(update.model.loc, mu, atol=1e-5)
    np.testing.assert_allclose(update.model.covariances, cov, atol=1e-5)
    # The update is not the plain M-step: the inertia holds it back towards the model.
    plain = ej.fit(model, jnp.asarray(x), max_iters=1, tol=0).model
    assert float(jnp.max(jnp.abs(plain.loc - update.model.loc))) > 1e-2


@pytest.fixture(scope="module")
def separated_mixture():
    rng = np.random.default_rng(7)
    centres = np.asarray([[-6.0, 0.0], [0.0, 5.0], [6.0, 0.0]])
    x = jnp.asarray(centres[rng.choice(3, 3000, p=[0.5, 0.3, 0.2])] + rng.normal(size=(3000, 2)))
    start = GaussianMixture.initialize(jax.random.key(9), x, 3)
    batch = ej.fit(start, x, max_iters=200, tol=1e-12)
    return x, start, batch


@pytest.mark.parametrize("m_step", ["stepwise", "averaged", "inertia"])
def test_online_em_on_minibatches_reaches_the_batch_optimum(separated_mixture, m_step):
    x, start, batch = separated_mixture
    rule = {
        "stepwise": ej.StepwiseMStep(kappa=0.7),
        "averaged": ej.StepwiseMStep(kappa=0.6, average=True),
        "inertia": ej.InertiaMStep(kappa=0.7),
    }[m_step]
    online = ej.fit(
        start, x, m_step=rule, batch_size=300, max_iters=8, tol=0, key=jax.random.key(10)
    )
    assert online.num_iters == 8
    _leaves_close(online.model.loc, batch.model.loc, 1e-2)
    _leaves_close(online.model.covariances, batch.model.covariances, 1e-2)
    _leaves_close(online.model.weights, batch.model.weights, 1e-2)
    gap = float(ej.log_evidence(batch.model, x) - ej.log_evidence(online.model, x))
    assert 0 <= gap < 1e-3


def test_stepwise_em_on_a_stream_reaches_the_batch_optimum(separated_mixture, tmp_path):
    """The data set on disk, streamed in slices of 300 rows in a new order each pass."""
    x, start, batch = separated_mixture
    np.save(tmp_path / "x.npy", np.asarray(x))
    stream = ej.Stream(np.load(tmp_path / "x.npy", mmap_mode="r"), batch_size=300, shuffle=True)
    rule = ej.StepwiseMStep(kappa=0.7)
    online = ej.fit(start, stream, m_step=rule, max_iters=8, tol=0, key=jax.random.key(12))
    _leaves_close(online.model.loc, batch.model.loc, 1e-2)
    _leaves_close(online.model.covariances, batch.model.covariances, 1e-2)
    _leaves_close(online.model.weights, batch.model.weights, 1e-2)
    gap = float(ej.log_evidence(batch.model, x) - ej.log_evidence(online.model, x))
    assert 0 <= gap < 1e-3


def test_float32_online_em_matches_float64(separated_mixture):
    x, start, _ = separated_mixture
    as32 = lambda tree: jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx_inexact(a) else a, tree
    )
    rule = ej.StepwiseMStep(kappa=0.7)
    key = jax.random.key(11)
    fit64 = ej.fit(start, x, m_step=rule, batch_size=200, max_iters=3, tol=0, key=key)
    fit32 = ej.fit(
        as32(start), x.astype(jnp.float32), m_step=rule, batch_size=200, max_iters=3, tol=0, key=key
    )
    assert fit32.model.loc.dtype == jnp.float32
    np.testing.assert_allclose(fit32.model.loc, fit64.model.loc, atol=2e-4)
    np.testing.assert_allclose(fit32.model.covariances, fit64.model.covariances, rtol=2e-4)
    np.testing.assert_allclose(fit32.history, fit64.history, rtol=1e-5)


def eqx_inexact(a):
    return isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.inexact)


def test_stochastic_em_on_the_whole_data_is_generalized_em(gmm_data):
    """A gradient M-step per minibatch, with the whole data as the one minibatch, is
    generalized EM (the same optimizer state carried from step to step)."""
    x, model = gmm_data
    step = ej.GradientMStep(optax.adam(1e-2), num_steps=3)
    gem = ej.fit(model, x, m_step=step, max_iters=4, tol=0)
    online = ej.fit(model, x, m_step=step, batch_size=len(x), max_iters=4, tol=0)
    _leaves_close(online.model, gem.model, 1e-12)


def test_stochastic_em_on_minibatches_lowers_f(gmm_data):
    x, fitted = gmm_data
    model = eqx.tree_at(lambda m: m.loc, fitted, fitted.loc + 1.5)
    step = ej.GradientMStep(optax.adam(5e-2))
    online = ej.fit(model, x, m_step=step, batch_size=50, max_iters=5, tol=0, key=jax.random.key(1))
    assert float(ej.log_evidence(online.model, x)) > float(ej.log_evidence(model, x)) + 0.1
    assert online.history.shape == (5,)


def test_inertia_without_statistics_uses_samples_of_the_model():
    """A user model with a sampler and no closed form: the numerical M-step on the minibatch
    loss plus the sampled relative entropy. With a large eta it is close to the plain
    numerical M-step; with a small one it barely moves."""

    class SampledPoisson(PoissonMixture):
        def sample(self, key, n):
            return sample_poisson_mixture(self, key, n)

    counts = poisson_data(n=150)
    base = poisson_mixture([0.0, 0.1, -0.1], [0.5, 1.5, 2.5])
    model = SampledPoisson(base.mix_logits, base.log_rates)
    plain = ej.fit(model, counts, max_iters=1, tol=0).model
    loose = ej.fit(
        model, counts, m_step=ej.InertiaMStep(eta=1e6), max_iters=1, tol=0, key=jax.random.key(0)
    ).model
    rule = ej.InertiaMStep(eta=1e-3, num_samples=4096)
    tight = ej.fit(model, counts, m_step=rule, max_iters=1, tol=0, key=jax.random.key(0)).model
    np.testing.assert_allclose(loose.log_rates, plain.log_rates, atol=1e-3)
    moved = float(jnp.max(jnp.abs(plain.log_rates - model.log_rates)))
    assert moved > 0.1
    # (Held back up to the sampling error of the relative entropy's estimate.)
    assert float(jnp.max(jnp.abs(tight.log_rates - model.log_rates))) < 0.3 * moved


def test_online_errors(gmm_data):
    x, model = gmm_data
    for kappa in (0.5, 1.2, -1.0):
        with pytest.raises(ValueError, match=r"kappa must be a number in \(0.5, 1.0\]"):
            ej.StepwiseMStep(kappa=kappa)
    with pytest.raises(ValueError, match=r"step_size must be a number in \(0.0, 1.0\]"):
        ej.StepwiseMStep(step_size=1.5)
    with pytest.raises(ValueError, match="tau must be"):
        ej.StepwiseMStep(tau=-1.0)
    with pytest.raises(ValueError, match="eta must be"):
        ej.InertiaMStep(eta=0.0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ej.fit(model, x, m_step=ej.StepwiseMStep(), batch_size=0)
    with pytest.raises(ValueError, match="pass key="):
        ej.fit(model, x, m_step=ej.StepwiseMStep(), batch_size=10)
    with pytest.raises(ValueError, match="batch_size= needs an M-step that learns"):
        ej.fit(model, x, batch_size=10, key=jax.random.key(0))
    with pytest.raises(NotImplementedError, match="exact posterior of each minibatch"):
        ej.fit(model, x, q=ej.Categorical(), m_step=ej.StepwiseMStep())
    with pytest.raises(TypeError, match="frozen="):
        ej.fit(model, x, m_step=ej.StepwiseMStep(), frozen=lambda m: m.loc)
    counts = poisson_data(n=50)
    with pytest.raises(TypeError, match="InertiaMStep needs the model's complete-data"):
        ej.fit(poisson_mixture([0.0, 0.1, -0.1], [0.5, 1.5, 2.5]), counts, m_step=ej.InertiaMStep())


def test_new_step_sizes_and_streams_do_not_recompile(gmm_data, tmp_path):
    x, model = gmm_data
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    np.save(tmp_path / "x.npy", np.asarray(x))
    memmap = np.load(tmp_path / "x.npy", mmap_mode="r")

    def run(kappa, eta):
        key = jax.random.key(0)
        a = ej.fit(
            model, x, m_step=ej.StepwiseMStep(kappa=kappa), batch_size=64, max_iters=3, key=key
        )
        b = ej.fit(model, x, m_step=ej.InertiaMStep(eta=eta), batch_size=64, max_iters=3, key=key)
        c = ej.fit(model, ej.Stream(memmap, batch_size=250), max_iters=3)
        return a, b, c

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = run(0.6, 1.0)
        num_first = len(compiles)
        second = run(0.9, 3.0)
        num_second = len(compiles) - num_first
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert num_first > 0
    assert num_second == 0, compiles[num_first:]
    assert float(jnp.max(jnp.abs(first[0].model.loc - second[0].model.loc))) > 0


def test_online_restarts(gmm_data):
    x, _ = gmm_data
    init = lambda k: GaussianMixture.initialize(k, x, 3)
    rule = ej.StepwiseMStep()
    best = ej.fit(
        init, x, m_step=rule, batch_size=100, restarts=3, max_iters=3, key=jax.random.key(1)
    )
    assert best.restart_elbos.shape == (3,)
    keys = jax.random.split(jax.random.key(1), 3)
    single = [
        ej.fit(init(k), x, m_step=rule, batch_size=100, max_iters=3, key=k).history[-1]
        for k in keys
    ]
    np.testing.assert_allclose(best.restart_elbos, single, rtol=1e-10)


def test_hmm_complete_data_statistics_by_enumeration():
    """The chain's expected complete-data statistics against the sum over all state paths
    of length 2 and 4 (K = 2), each weighted by its probability; the emissions' follow the
    state occupancies; maximize of them gives the model back."""
    import itertools

    from elbo_jax.models import CategoricalHMM, PoissonHMM

    seqs = jnp.asarray(np.random.default_rng(0).poisson(3.0, (3, 6, 2)), jnp.float64)
    model = PoissonHMM.initialize(jax.random.key(0), seqs, 2)
    pi = np.exp(np.asarray(model.initial_log_probs()))
    a = np.exp(np.asarray(model.transition_log_probs()))

    def enumerate_paths(length):
        initial, transitions, occupancy = np.zeros(2), np.zeros((2, 2)), np.zeros(2)
        for path in itertools.product(range(2), repeat=length):
            p = pi[path[0]] * np.prod([a[i, j] for i, j in itertools.pairwise(path)])
            initial[path[0]] += p
            for i, j in itertools.pairwise(path):
                transitions[i, j] += p
            for s in path:
                occupancy[s] += p
        return initial, transitions, occupancy

    short, long = enumerate_paths(2), enumerate_paths(4)
    stats = model.complete_data_statistics(
        10.0, jnp.asarray([2, 4, 4]), weights=jnp.asarray([1.0, 0.5, 0.5])
    )
    # Half the 10 sequences have length 2, half length 4.
    want = [5 * (a2 + a4) for a2, a4 in zip(short, long, strict=True)]
    np.testing.assert_allclose(stats["initial"], want[0], rtol=1e-12)
    np.testing.assert_allclose(stats["transitions"], want[1], rtol=1e-12)
    np.testing.assert_allclose(stats["emissions"]["counts"], want[2], rtol=1e-12)
    np.testing.assert_allclose(
        stats["emissions"]["sums"], want[2][:, None] * np.asarray(model.rates), rtol=1e-12
    )
    back = model.maximize(stats)
    _leaves_close(back.transition_log_probs(), model.transition_log_probs(), 1e-12)
    _leaves_close(back.log_rates, model.log_rates, 1e-12)
    symbols = jnp.asarray(np.random.default_rng(1).integers(0, 4, (3, 6)))
    categorical = CategoricalHMM.initialize(jax.random.key(1), symbols, 2)
    back = categorical.maximize(categorical.complete_data_statistics(7.0, 6))
    _leaves_close(back._log_probs(), categorical._log_probs(), 1e-12)
    _leaves_close(back.initial_log_probs(), categorical.initial_log_probs(), 1e-12)


def test_inertia_em_on_an_hmm():
    key = jax.random.key(3)
    hmm = GaussianHMM.initialize(key, 3 * jax.random.normal(key, (4, 30, 2)), 3)
    x, _ = hmm.sample(jax.random.key(4), 12, 30)
    start = GaussianHMM.initialize(jax.random.key(5), x, 3)
    batch = ej.fit(start, x, max_iters=2, tol=0)
    plain = ej.fit(start, x, max_iters=2, tol=0, m_step=ej.InertiaMStep(eta=math.inf))
    _leaves_close(plain.model, batch.model, 1e-12)
    rule = ej.InertiaMStep(kappa=0.7)
    online = ej.fit(start, x, m_step=rule, batch_size=3, max_iters=6, tol=0, key=jax.random.key(6))
    gain = float(ej.log_evidence(online.model, x) - ej.log_evidence(start, x))
    assert gain > 0.1
