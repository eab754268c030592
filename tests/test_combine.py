"""``ej.combine``: models fitted on shards, each one M-step from a common start, combined with
their shards' sizes as weights, give the batch M-step on all the data (the statistics
merge exactly); models without statistics are combined by the sampled approximation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PoissonMixture, poisson_data, poisson_mixture, sample_poisson_mixture

import elbo_jax as ej
from elbo_jax.models import (
    BernoulliMixture,
    FactorAnalysis,
    GaussianMixture,
)
from elbo_jax.models import (
    PoissonMixture as BuiltinPoisson,
)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _shards(x):
    # Unequal sizes that pad to one bucket (144 rows): one compiled fit serves them all.
    return [x[:130], x[130:260], x[260:]]


def _gaussian(covariance_type):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(400, 3)) + 3 * rng.choice(3, (400, 1)))
    return GaussianMixture.initialize(jax.random.key(0), x, 3, covariance_type=covariance_type), x


def _counts(kind):
    rng = np.random.default_rng(1)
    if kind == "poisson":
        x = jnp.asarray(rng.poisson(rng.choice([1.0, 6.0], (400, 1)), (400, 4)).astype(float))
        return BuiltinPoisson.initialize(jax.random.key(1), x, 2), x
    x = jnp.asarray((rng.random((400, 6)) < rng.choice([0.2, 0.8], (400, 1))).astype(float))
    return BernoulliMixture.initialize(jax.random.key(1), x, 2), x


def _factor_analysis():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(400, 2)) @ rng.normal(size=(2, 5)) + rng.normal(size=(400, 5)))
    return FactorAnalysis.initialize(jax.random.key(2), x, 2), x


@pytest.mark.parametrize("case", ["full", "diag", "poisson", "bernoulli"])
def test_combined_shard_models_equal_the_batch_m_step(case):
    if case in ("full", "diag"):
        start, x = _gaussian(case)
    else:
        start, x = _counts(case)
    batch = ej.fit(start, x, max_iters=1, tol=0).model
    shards = _shards(x)
    models = [ej.fit(start, shard, max_iters=1, tol=0).model for shard in shards]
    combined = ej.combine(models, weights=[len(s) for s in shards])
    assert _max_diff(combined, batch) < 1e-12
    # Unweighted, they are not the batch M-step; one model combined is itself.
    assert _max_diff(ej.combine(models), batch) > 1e-6
    assert _max_diff(ej.combine([batch]), batch) < 1e-12


def test_combined_factor_analysers_match_the_complete_data_moments():
    """Factor analysis's statistics do not determine theta one to one (E[z z^T] is I under
    the model but not under a posterior), so shards do not combine to the batch M-step;
    the combination matches the mixture's complete-data moments: the mean of the means and
    the covariance of (x, z) averaged over the models."""
    start, x = _factor_analysis()
    a = ej.fit(start, x[:200], max_iters=20).model
    b = ej.fit(start, x[200:], max_iters=20).model
    combined = ej.combine([a, b])
    np.testing.assert_allclose(combined.mean, (a.mean + b.mean) / 2, atol=1e-12)
    # Cov(x, z) = W for each model, and z ~ N(0, I) under both: W is averaged.
    np.testing.assert_allclose(combined.weight, (a.weight + b.weight) / 2, atol=1e-12)
    assert _max_diff(ej.combine([a, a]), a) < 1e-12


def test_combine_in_float32():
    start, x = _gaussian("full")
    start32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else a, start
    )
    batch = ej.fit(start, x, max_iters=1, tol=0).model
    shards = _shards(x.astype(jnp.float32))
    models = [ej.fit(start32, s, max_iters=1, tol=0).model for s in shards]
    combined = ej.combine(models, weights=[len(s) for s in shards])
    assert combined.loc.dtype == jnp.float32
    np.testing.assert_allclose(combined.loc, batch.loc, atol=1e-5)
    np.testing.assert_allclose(combined.covariances, batch.covariances, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(combined.weights, batch.weights, atol=1e-6)


class SampledPoisson(PoissonMixture):
    """The user's Poisson mixture (no closed form), with a sampler."""

    def sample(self, key, n):
        return sample_poisson_mixture(self, key, n)


def test_combine_without_statistics_uses_samples():
    """Two fitted user models combined by sampling: close to the closed form that the
    same mixture has (weights and rates averaged in their complete-data statistics)."""
    counts = poisson_data(n=300)
    base = poisson_mixture([0.0, 0.1, -0.1], [0.5, 1.5, 2.5])
    start = SampledPoisson(base.mix_logits, base.log_rates)
    a = ej.fit(start, counts[:150], max_iters=30).model
    b = ej.fit(start, counts[150:], max_iters=30).model
    combined = ej.combine([a, b], key=jax.random.key(0), num_samples=20000)
    # The closed form: pi = (pi_a + pi_b) / 2, rate_k = (pi_ak r_ak + pi_bk r_bk) / (2 pi_k).
    pa, pb = jax.nn.softmax(a.mix_logits), jax.nn.softmax(b.mix_logits)
    ra, rb = jnp.exp(a.log_rates), jnp.exp(b.log_rates)
    weights = (pa + pb) / 2
    rates = (pa * ra + pb * rb) / (pa + pb)
    np.testing.assert_allclose(jax.nn.softmax(combined.mix_logits), weights, atol=0.02)
    np.testing.assert_allclose(jnp.exp(combined.log_rates), rates, rtol=0.05)


def test_combine_errors():
    start, x = _gaussian("full")
    diag, _ = _gaussian("diag")
    poisson, _ = _counts("poisson")
    with pytest.raises(ValueError, match="models is empty"):
        ej.combine([])
    with pytest.raises(TypeError, match="models must be a list of models"):
        ej.combine(start)
    with pytest.raises(TypeError, match=r"models\[1\] must be an ej.Model"):
        ej.combine([start, 3])
    with pytest.raises(
        TypeError, match=r"models\[1\] is a PoissonMixture, but models\[0\] is a GaussianMixture"
    ):
        ej.combine([start, poisson])
    with pytest.raises(
        ValueError,
        match=r"models\[1\] and models\[0\] are GaussianMixtures with different settings",
    ):
        ej.combine([start, diag])
    bigger = GaussianMixture.initialize(jax.random.key(0), x, 4)
    with pytest.raises(ValueError, match=r"models\[1\]\.weight_logits has shape \(4,\)"):
        ej.combine([start, bigger])
    with pytest.raises(ValueError, match=r"weights must hold one number per model, shape \(2,\)"):
        ej.combine([start, start], weights=[1.0])
    with pytest.raises(ValueError, match="weights must be finite, >= 0 and not all 0"):
        ej.combine([start, start], weights=[1.0, -1.0])
    user = poisson_mixture([0.0, 0.1, -0.1], [0.5, 1.5, 2.5])
    with pytest.raises(TypeError, match="combine needs PoissonMixture's complete-data statistics"):
        ej.combine([user, user])
    sampled = SampledPoisson(user.mix_logits, user.log_rates)
    with pytest.raises(ValueError, match="pass key="):
        ej.combine([sampled, sampled])


def test_combine_hmms_over_sequences_of_given_lengths():
    from elbo_jax.models import GaussianHMM

    key = jax.random.key(3)
    x = 3 * jax.random.normal(key, (6, 20, 2))
    a = GaussianHMM.initialize(jax.random.key(1), x, 2)
    assert _max_diff(ej.combine([a, a], lengths=20), a) < 1e-12
    b = ej.fit(a, x, max_iters=3).model
    both = ej.combine([a, b], weights=[1.0, 3.0], lengths=[10, 20])
    assert jnp.all(jnp.isfinite(both.loc))
    # Between the two (the means of each state are mixed by the states' occupancies).
    lo, hi = jnp.minimum(a.loc, b.loc), jnp.maximum(a.loc, b.loc)
    assert bool(jnp.all((both.loc >= lo - 1e-12) & (both.loc <= hi + 1e-12)))
    with pytest.raises(ValueError, match="pass lengths="):
        ej.combine([a, b])
