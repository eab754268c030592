r"""Exact EM as passes over the data that leave only statistics.

When the E-step is exact and the M-step needs only expected statistics — the model's
closed form, or the statistics that ``_autostats`` finds in ``log_joint`` — an iteration
never needs the $(N, K)$ posterior: it is ``maximize(stats)`` followed by one pass that
computes, chunk by chunk, the log-joint table (a ``Discrete`` latent) or the model's
exact posterior (a chain: forward–backward or Kalman smoothing), its log-normaliser and
the chunk's statistics (``statistics_pass``). At the exact posterior the bracket of F is
$\log p(x_n \mid \theta)$, so the same pass gives F. The posterior of the final model is
computed once, at the end (``posterior_of_data``).

The start's pass runs as the loop's first trip (``started`` false, no M-step), so the pass
is compiled once.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Data, Stats
from .._data import Dataset, map_over_data, weighted_sum
from .._latent import Discrete
from .._model import Model, float_dtype, is_finite_tree
from .._objective import free_energy_from_sum
from .._q import AbstractQ, Categorical, normalize_table
from .._statistics import merge_statistics
from .._steps import (
    ExactMStep,
    _split_params,
    maximize_closed_form,
    minimize_lbfgs,
    polish_newton,
)
from ._base import AbstractSolver

# Data-only per-datum features (the found split's, or a model's ``datum_features``) are
# computed once per fit when they take at most this many times the data's memory, or at
# most FEATURE_BUDGET_BYTES (per device); otherwise each pass computes them per chunk.
# Keeping them costs memory and saves their computation in every pass: the quadratic
# features of a 16-dimensional full-covariance mixture (9.5x the data) take a sixth of a
# pass to build.
MAX_FEATURE_RATIO = 4
FEATURE_BUDGET_BYTES = 2**28


def _has_table_hook(model: Model) -> bool:
    return type(model).log_joint_table is not Model.log_joint_table


def log_joint_table(model: Model, x: Data, split: Any, features: Any) -> Array:
    """The log-joint table: from the split's features unless the model's own hook is to be
    preferred (see ``Model._table_from_features``); the model's hook takes its own
    ``datum_features`` when they were kept."""
    if split is not None and (model._table_from_features or not _has_table_hook(model)):
        return split.table(model, x, features)
    if split is None and features is not None:
        return model.log_joint_table(x, features=features)
    return model.log_joint_table(x)


def statistics_pass(
    model: Model, data: Dataset, *, split: Any = None, features: Any = None, closed_form: bool
) -> tuple[Stats, Array]:
    r"""The exact posterior's statistics and $\sum_n w_n \log p(x_n \mid \theta)$.

    The statistics are the model's ``sufficient_statistics`` (``closed_form``) or those that
    ``split`` (an ``_autostats.AffineSplit`` of ``log_joint``) finds; ``features`` are the
    data rows' features kept for the fit (``StatisticsEM._features``: the split's, or else
    the model's own ``datum_features``), or ``None``: each chunk computes what it needs.
    Reduced by ``sum_over_data``: chunk by chunk, merged, across devices if sharded.
    """
    own = split is None and features is not None  # the model's own datum_features
    discrete = isinstance(model.latent, Discrete)

    def chunk(values, weights):
        x, feats = values
        if not discrete:  # a chain, or a model's own exact posterior
            log_marginal, q = model.exact_posterior(x)
            stats = model.sufficient_statistics(x, q, weights=weights)
            return stats, weighted_sum(log_marginal, weights)
        log_normalizer, q = normalize_table(log_joint_table(model, x, split, feats))
        if closed_form and own:
            stats = model.sufficient_statistics(x, q, weights=weights, features=feats)
        elif closed_form:
            stats = model.sufficient_statistics(x, q, weights=weights)
        else:
            stats = split.statistics(model, x, q, feats, weights=weights)
        return stats, weighted_sum(log_normalizer[:, 0], weights)

    return data.sum(chunk, features)


def posterior_of_data(
    model: Model, data: Dataset, *, split: Any = None, features: Any = None
) -> AbstractQ:
    r"""The exact posterior $p(z \mid x_n, \theta)$ of every row, chunk by chunk like the
    passes: a ``Categorical`` for a ``Discrete`` latent, else the model's ``exact_posterior``."""
    if isinstance(model.latent, Discrete):

        def table_chunk(values):
            x, feats = values
            table = log_joint_table(model, x, split, feats)
            return table - jax.nn.logsumexp(table, axis=-1, keepdims=True)

        return Categorical(map_over_data(table_chunk, data, features))
    posterior = lambda x: model.exact_posterior(x)[1]
    first = jax.tree_util.tree_map(lambda leaf: leaf[: data.chunk_size], data.x)
    shapes = eqx.filter_eval_shape(posterior, first)
    _, static = eqx.partition(shapes, lambda v: isinstance(v, jax.ShapeDtypeStruct))
    arrays = map_over_data(lambda values: eqx.filter(posterior(values[0]), eqx.is_array), data)
    return eqx.combine(arrays, static)


def maximize_statistics(
    model: Model,
    stats: Stats,
    prior: Any,
    num_data: Array,
    *,
    closed_form: bool,
    split: Any,
    m_step: ExactMStep,
) -> Model:
    """The M-step from expected statistics: the model's closed form, or else the numerical
    M-step on the objective that the found statistics (``split``) determine, which costs K
    evaluations of the log-joint per step instead of N K."""
    trainable = m_step.trainable
    if closed_form:
        return maximize_closed_form(model, stats, prior, trainable)
    params, static = _split_params(model, trainable)

    def loss(p):
        m = eqx.combine(p, static)
        return free_energy_from_sum(split.objective(m, stats), m, prior, num_data)

    params = minimize_lbfgs(loss, params, max_steps=m_step.max_steps, tol=m_step.tol)
    return eqx.combine(polish_newton(loss, params), static)


class StatisticsState(eqx.Module):
    model: Model
    stats: Any  # the exact posterior's statistics at ``model`` (zeros before the start's pass)
    features: Any  # the split's per-datum features of the data rows, or None


class _PassCarry(eqx.Module):
    """A pass over a stream in progress."""

    model: Model
    stats: Any
    total: Array  # sum of w_n log p(x_n | theta) so far


class StatisticsEM(AbstractSolver):
    """Exact EM by statistics passes (see the module docstring)."""

    prior: Any
    m_step: ExactMStep
    closed_form: bool = eqx.field(static=True)
    split: Any = None  # _autostats.AffineSplit, or None

    @property
    def monotone(self) -> bool:
        return True

    def _features(self, model: Model, data: Dataset) -> Any:
        """The data-only features kept for the fit (see ``FEATURE_BUDGET_BYTES``): the
        split's, or the model's own ``datum_features`` computed chunk by chunk (a model's
        may depend on the rows taken together, such as their mean); ``None`` if there are
        none or they are over the budget."""
        if self.split is not None:
            compute = lambda: self.split.datum_features(data.x)
        elif self.closed_form:
            compute = lambda: map_over_data(lambda values: model.datum_features(values[0]), data)
        else:
            return None
        shapes = jax.eval_shape(compute)
        if not jax.tree_util.tree_leaves(shapes):
            return None
        size = sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(shapes))
        data_size = sum(
            leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(data.x)
        )
        if size > max(MAX_FEATURE_RATIO * data_size, FEATURE_BUDGET_BYTES):
            return None
        return compute()

    def pass_over(self, model: Model, data: Dataset) -> tuple[Stats, Array]:
        """One statistics pass over ``data`` (computing the split's features as well)."""
        return self._pass(model, data, self._features(model, data))

    def _pass(self, model: Model, data: Dataset, features: Any) -> tuple[Stats, Array]:
        stats, total = statistics_pass(
            model, data, split=self.split, features=features, closed_form=self.closed_form
        )
        return stats, free_energy_from_sum(total, model, self.prior, data.num_data)

    def init(self, model, q, data, key):
        features = self._features(model, data)
        shapes = jax.eval_shape(lambda m: self._pass(m, data, features), model)
        stats, objective = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return StatisticsState(model, stats, features), jnp.full_like(objective, jnp.nan)

    def _maximize(self, model: Model, stats: Stats, num_data: Array) -> Model:
        return maximize_statistics(
            model,
            stats,
            self.prior,
            num_data,
            closed_form=self.closed_form,
            split=self.split,
            m_step=self.m_step,
        )

    def _next_model(self, state: StatisticsState, started: Array, num_data: Array) -> Model:
        """The M-step from the last pass's statistics (none before the start's pass)."""
        return jax.lax.cond(
            started,
            lambda m, s: self._maximize(m, s, num_data),
            lambda m, _: m,
            state.model,
            state.stats,
        )

    def step(self, state, data, started):
        model = self._next_model(state, started, data.num_data)
        stats, objective = self._pass(model, data, state.features)
        return StatisticsState(model, stats, state.features), objective

    # ------------------------------------------------ a pass over a stream, batch by batch
    def start(self, state: StatisticsState, started: Array, num_data: Array) -> "_PassCarry":
        """Begin a pass: the M-step (``_next_model``), and empty statistics to merge the
        batches' into."""
        model = self._next_model(state, started, num_data)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.stats)
        return _PassCarry(model, zeros, jnp.zeros((), float_dtype(model)))

    def update(self, carry: "_PassCarry", batch: Dataset) -> "_PassCarry":
        """Merge one batch's statistics into the pass's."""
        stats, total = statistics_pass(
            carry.model, batch, split=self.split, closed_form=self.closed_form
        )
        return _PassCarry(
            carry.model,
            merge_statistics(carry.stats, stats),
            carry.total + total.astype(carry.total.dtype),
        )

    def finish(self, carry: "_PassCarry", num_data: Array) -> tuple[StatisticsState, Array]:
        """The state after the pass, and F at its model."""
        objective = free_energy_from_sum(carry.total, carry.model, self.prior, num_data)
        return StatisticsState(carry.model, carry.stats, None), objective

    def final_model(self, state: StatisticsState, num_data: Array) -> Model:
        """The fitted model (the last M-step's)."""
        del num_data
        return state.model

    def result(self, state, data):
        q = posterior_of_data(state.model, data, split=self.split, features=state.features)
        return state.model, q

    def is_finite(self, state):
        return is_finite_tree(state.model)

    def slack(self, old, new):
        # The M-step from old to new used old's statistics: the penalty of both models is
        # taken with them (Model.m_step_penalty).
        before = old.model.m_step_penalty(old.stats)
        return jnp.maximum(before - new.model.m_step_penalty(old.stats), 0.0)
