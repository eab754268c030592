r"""Online EM: M-steps from one minibatch at a time, on the whole data set's F.

One pass (one iteration of the loop) visits the data once in minibatches, in an order
drawn from the fit's key for each pass. Each minibatch $b$ of $B_b$ data gives, at the
current $\theta_{t-1}$, the exact posterior and the minibatch estimate of F,

$$\hat F_b(\theta) = -\frac{1}{B_b}\sum_{n \in b} \log p(x_n \mid \theta) - \frac1N \log p(\theta),$$

($N$ the size of the whole data set: the batch's weights are scaled by $N / B_b$, so every
statistic and loss below is an estimate of the whole data set's) and one update:

- **stepwise EM** (Cappé & Moulines 2009): $s_t = (1-\rho_t)\,s_{t-1} + \rho_t\,\hat s_b$,
  $\theta_t = \text{maximize}(s_t)$;
- **inertia EM** (Amid & Warmuth 2020): $\theta_t = \arg\min_{\tilde\theta}
  \hat F_b(\tilde\theta) + \frac{1}{\eta_t} D_{RE}(\theta_{t-1}, \tilde\theta)$, where
  $D_{RE}$ is the relative entropy between the complete-data distributions $p(x, z \mid
  \cdot)$ of one datum. With statistics it is $\text{maximize}(\hat s_b +
  \bar s(\theta_{t-1}, N/\eta_t))$, $\bar s(\theta, m)$ the complete-data statistics of $m$
  data drawn from $\theta$ (``Model.complete_data_statistics``); without, the numerical
  M-step on that objective with $D_{RE}$ estimated from samples of $p(x, z \mid \theta_{t-1})$;
- **stochastic generalized EM**: a gradient M-step (any optax optimizer) on $\hat F_b$.

The pass's F estimate, reported per iteration, is the mean of the minibatch estimates at
the parameters each minibatch saw (the parameters before its update).
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._custom_types import Array, Key
from .._data import Dataset, weighted_sum
from .._latent import Chain, Discrete
from .._model import Model, float_dtype, has_global_elbo, is_finite_tree
from .._objective import _free_energy, free_energy_from_sum
from .._q import normalize_table
from .._statistics import merge_statistics, scale_statistics
from .._steps import (
    ExactMStep,
    GradientMStep,
    _split_params,
    maximize_closed_form,
    minimize_lbfgs,
)
from ._base import AbstractSolver
from ._statistics_em import maximize_statistics, posterior_of_data, statistics_pass


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool) -> Any:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    inside = ok and (value > low if low_open else value >= low) and value <= high
    if not inside:
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return np.asarray(value, np.float64)


class _Schedule(eqx.Module):
    r"""$\rho_t = (t + \tau)^{-\kappa}$, or a user's ``t -> rho``, or a constant."""

    kappa: Any
    tau: Any
    step_size: Any  # None, a float array, or a callable t -> rho (static)

    def rho(self, t: Array, dtype: Any, *, first_whole: bool) -> Array:
        """$\rho_t$ for the ``t``-th update (from 1); ``first_whole``: $\rho_1 = 1$."""
        t = t.astype(dtype)
        if self.step_size is None:
            value = (t + jnp.asarray(self.tau, dtype)) ** (-jnp.asarray(self.kappa, dtype))
        elif callable(self.step_size):
            value = jnp.asarray(self.step_size(t), dtype)
        else:
            value = jnp.asarray(self.step_size, dtype)
        if not first_whole:
            return value
        return jnp.where(t <= 1, jnp.ones((), dtype), value)


def _schedule(kappa: Any, tau: Any, step_size: Any) -> _Schedule:
    if step_size is not None and not callable(step_size):
        step_size = _number("step_size", step_size, 0.0, 1.0, low_open=True)
    return _Schedule(
        kappa=_number("kappa", kappa, 0.5, 1.0, low_open=True),
        tau=_number("tau", tau, 0.0, math.inf, low_open=False),
        step_size=step_size,
    )


class StepwiseMStep(eqx.Module):
    r"""Stepwise (online) EM: each minibatch moves running statistics towards its own,
    $s_t = (1-\rho_t)\,s_{t-1} + \rho_t\,\hat s_b$, and $\theta_t = \text{maximize}(s_t)$
    (Cappé & Moulines 2009).

    $\hat s_b$ is the minibatch's expected statistics at $\theta_{t-1}$, scaled to the whole
    data set ($N / B_b$). The step sizes are $\rho_t = (t + \tau)^{-\kappa}$ for the $t$-th
    minibatch (Cappé & Moulines need $\kappa \in (0.5, 1]$), or ``step_size``: a constant in
    (0, 1] or a function ``t -> rho_t`` of a float array. The running statistics start from
    the start model's own, $s_0 = \bar s(\theta_0, N)$ (``complete_data_statistics``), so the
    first minibatches refine the start rather than replace it; for a model without them
    (statistics found in ``log_joint``) the first update takes $\rho_1 = 1$. With
    ``step_size=1.0`` and the whole data as one batch it is batch EM.

    ``average=True``: the returned model is ``maximize`` of the running mean of $s_t$ over
    all updates after the first pass (Polyak–Ruppert averaging, in the statistics), while the
    iterates themselves move as above.

    Needs a model with a closed-form M-step (``sufficient_statistics`` / ``maximize``), or a
    ``Discrete`` latent whose ``log_joint`` elbo_jax can split into statistics (the M-step is
    then solved numerically on them).

    ```python
    ej.fit(model, x, m_step=ej.StepwiseMStep(kappa=0.7), batch_size=1024, key=key)
    ```
    """

    schedule: _Schedule
    average: bool = eqx.field(static=True)

    def __init__(
        self,
        kappa: float = 0.6,
        tau: float = 2.0,
        *,
        step_size: float | Callable | None = None,
        average: bool = False,
    ):
        self.schedule = _schedule(kappa, tau, step_size)
        if not isinstance(average, bool):
            raise TypeError(f"average must be True or False, got {average!r}")
        self.average = average


class InertiaMStep(eqx.Module):
    r"""Online EM with inertia (Amid & Warmuth 2020): each minibatch's M-step stays close to
    the current model, $\theta_t = \arg\min_{\tilde\theta}\ \hat F_b(\tilde\theta) +
    \frac{1}{\eta_t} D_{RE}(\theta_{t-1}, \tilde\theta)$.

    $D_{RE}$ is the relative entropy between the complete-data distributions
    $p(x, z \mid \theta)$ of one datum. For a model with statistics the minimiser is the
    closed form $\text{maximize}(\hat s_b + \bar s(\theta_{t-1}, N/\eta_t))$, where
    $\bar s(\theta, m)$ = ``model.complete_data_statistics(m)``; otherwise the M-step is solved
    numerically with $D_{RE}$ estimated from ``num_samples`` draws of ``model.sample``
    (the finite-sample approximation). $\eta_t \to \infty$ is the plain M-step on the minibatch.

    ``eta``: a positive number (``math.inf`` allowed), a function ``t -> eta_t``, or ``None``
    (default): $\eta_t = \rho_t / (1 - \rho_t)$ with $\rho_t = (t + \tau)^{-\kappa}$, which gives
    the minibatch the weight that stepwise EM's $\rho_t$ gives it. (For a model whose
    statistics determine $\theta$ one to one — a mixture with no prior and no floor in
    play — the two then take the same steps: the model's own statistics are stepwise EM's
    running ones. They differ under a prior, floors, or statistics that lose information,
    such as an HMM's.)
    """

    schedule: _Schedule
    eta: Any
    num_samples: int = eqx.field(static=True)

    def __init__(
        self,
        eta: float | Callable | None = None,
        *,
        kappa: float = 0.6,
        tau: float = 2.0,
        num_samples: int = 256,
    ):
        self.schedule = _schedule(kappa, tau, None)
        if eta is not None and not callable(eta):
            eta = _number("eta", eta, 0.0, math.inf, low_open=True)
        self.eta = eta
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples

    def inverse_eta(self, t: Array, dtype: Any) -> Array:
        r"""$1/\eta_t$."""
        if self.eta is None:
            rho = self.schedule.rho(t, dtype, first_whole=False)
            return (1 - rho) / rho
        eta = self.eta(t.astype(dtype)) if callable(self.eta) else self.eta
        return 1 / jnp.asarray(eta, dtype)


OnlineMStep = StepwiseMStep | InertiaMStep


# ----------------------------------------------------------------------------- the solver
class OnlineState(eqx.Module):
    model: Model
    stats: Any  # stepwise: the running statistics s_t (zeros before the first update)
    averaged: Any  # Polyak: the mean of s_t over the updates after the first pass, or None
    num_averaged: Array  # how many s_t that mean holds
    m_state: Any  # a gradient M-step's optimizer state, or None
    count: Array  # minibatch updates so far
    passes: Array  # passes completed
    key: Key


class _Carry(eqx.Module):
    """A pass in progress: the state, and the sums of the minibatch estimates."""

    state: OnlineState
    total: Array  # sum over visited data of log p(x_n | theta at its visit)
    weight: Array  # data visited


def log_likelihood_sum(model: Model, data: Dataset) -> Array:
    r"""$\sum_n w_n \log p(x_n \mid \theta)$ by the exact posterior's normaliser."""

    def chunk(values, weights):
        (x,) = values
        if isinstance(model.latent, Discrete):
            log_normalizer, _ = normalize_table(model.log_joint_table(x))
            return weighted_sum(log_normalizer[:, 0], weights)
        return weighted_sum(model.exact_posterior(x)[0], weights)

    return data.sum(chunk)


def _posterior_and_total(model: Model, batch: Dataset) -> tuple[Array, Any]:
    r"""$\sum_n w_n \log p(x_n \mid \theta)$ and the exact posterior of a minibatch's rows,
    from one inference pass (a minibatch of the gradient and sampled updates is one chunk)."""
    log_marginal, q = model.exact_posterior(batch.x)
    return weighted_sum(log_marginal, batch.weights), q


class OnlineEM(AbstractSolver):
    """Online EM over minibatches of in-memory data or of a stream (see the module docstring).

    ``batch_size``: rows per minibatch (``None``: the whole data, one update per pass).
    ``closed_form`` / ``split``: how statistics are maximised (stepwise and inertia EM);
    ``m_step``: the update (``StepwiseMStep``, ``InertiaMStep``, or a ``GradientMStep``).
    """

    m_step: Any  # StepwiseMStep, InertiaMStep or GradientMStep
    prior: Any
    closed_form: bool = eqx.field(static=True)
    split: Any = None
    batch_size: int | None = eqx.field(static=True, default=None)
    seeded: bool = eqx.field(static=True, default=False)  # stepwise s_0 from the start

    @property
    def monotone(self) -> bool:
        return False

    # ---------------------------------------------------------------- state
    def init(self, model, q, data, key):
        del q
        stats = averaged = None
        if isinstance(self.m_step, StepwiseMStep):
            shapes = jax.eval_shape(lambda m: self._statistics(m, data)[0], model)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            # s_0: the start's own statistics for the whole data set, so that the first
            # minibatches refine the start rather than replace it; none without them.
            stats = self.own_statistics(model, data.num_data, data) if self.seeded else zeros
            averaged = zeros if self.m_step.average else None
        m_state = self.m_step.init(model) if isinstance(self.m_step, GradientMStep) else None
        dtype = _dtype(model)
        zero = jnp.zeros((), jnp.int32)
        state = OnlineState(model, stats, averaged, zero, m_state, zero, zero, key)
        return state, jnp.full((), jnp.nan, dtype)

    def own_statistics(self, model: Model, num_data: Any, like: Dataset) -> Any:
        """The model's complete-data statistics for ``num_data`` data (sequences: with the
        lengths of ``like``'s)."""
        if isinstance(model.latent, Chain):
            x = like.x
            return model.complete_data_statistics(
                num_data, x.lengths, weights=like.weights, num_steps=x.frames.shape[1]
            )
        return model.complete_data_statistics(num_data)

    def _statistics(self, model: Model, batch: Dataset) -> tuple[Any, Array]:
        return statistics_pass(model, batch, split=self.split, closed_form=self.closed_form)

    def _maximize(self, model: Model, stats: Any, num_data: Array) -> Model:
        return maximize_statistics(
            model,
            stats,
            self.prior,
            num_data,
            closed_form=self.closed_form,
            split=self.split,
            m_step=ExactMStep(),
        )

    # ---------------------------------------------------------------- one minibatch
    def update(self, carry: _Carry, batch: Dataset) -> _Carry:
        r"""One minibatch: its estimate at the current $\theta$, then the rule's update.
        ``batch.weights`` are the rows' own (1, or 0 for padding); they are scaled here to
        stand for the whole data set."""
        state = carry.state
        dtype = _dtype(state.model)
        batch, visited, scale = for_whole_data(batch, dtype)
        count = state.count + 1
        key, step_key = jr.split(state.key)
        rule = self.m_step
        model, stats, m_state = state.model, state.stats, state.m_state
        averaged, num_averaged = state.averaged, state.num_averaged
        if isinstance(rule, GradientMStep):
            total, q = _posterior_and_total(model, batch)
            model, m_state = rule.step(model, q, m_state, batch, key=step_key, prior=self.prior)
        elif isinstance(rule, StepwiseMStep):
            batch_stats, total = self._statistics(model, batch)
            rho = rule.schedule.rho(count, dtype, first_whole=not self.seeded)
            stats = merge_statistics(
                scale_statistics(stats, 1 - rho), scale_statistics(batch_stats, rho)
            )
            model = self._maximize(model, stats, batch.num_data)
            if averaged is not None:
                # The running mean of s_t over the updates of the passes after the first.
                counted = state.passes >= 1
                num_averaged = num_averaged + counted.astype(jnp.int32)
                weight = jnp.where(counted, 1 / jnp.maximum(num_averaged, 1).astype(dtype), 0)
                averaged = merge_statistics(
                    scale_statistics(averaged, 1 - weight), scale_statistics(stats, weight)
                )
        else:
            total, model = self._inertia(model, batch, count, step_key)
        new = OnlineState(model, stats, averaged, num_averaged, m_state, count, state.passes, key)
        # A minibatch update that leaves the model non-finite is not taken.
        finite = is_finite_tree(model)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        # The minibatch's ELBO at the parameters it was visited with (its share of the global
        # terms too).
        elbo = total / scale + visited * self._global_per_datum(state.model, batch.num_data)
        return _Carry(new, carry.total + elbo, carry.weight + visited)

    def _inertia(self, model: Model, batch: Dataset, count: Array, key: Key):
        dtype = _dtype(model)
        inverse_eta = self.m_step.inverse_eta(count, dtype)
        if self.closed_form:
            batch_stats, total = self._statistics(model, batch)
            own = self.own_statistics(model, batch.num_data * inverse_eta, batch)
            return total, maximize_closed_form(
                model, merge_statistics(batch_stats, own), self.prior, None
            )
        total, q = _posterior_and_total(model, batch)
        q = jax.lax.stop_gradient(q)
        samples = jax.lax.stop_gradient(model.sample(key, self.m_step.num_samples))
        params, static = _split_params(model)

        def loss(p):
            m = eqx.combine(p, static)
            batch_f = _free_energy(m, q, batch, prior=self.prior)
            # D_RE(theta, m) up to a constant: -E_theta[log p(x, z | m)], by the samples.
            cross = -jnp.mean(jax.vmap(m.log_joint)(*samples))
            return batch_f + inverse_eta * cross

        return total, eqx.combine(minimize_lbfgs(loss, params, max_steps=200), static)

    def estimate(self, state: OnlineState, batch: Dataset) -> tuple[OnlineState, Array]:
        """F estimated on one batch at the state's model (the state unchanged)."""
        dtype = _dtype(state.model)
        visited = jnp.maximum(jnp.sum(batch.weights).astype(dtype), 1)
        mean = log_likelihood_sum(state.model, batch).astype(dtype) / visited
        return state, -(mean + self._global_per_datum(state.model, batch.num_data))

    def _global_per_datum(self, model: Model, num_data: Array) -> Array:
        r"""$(\text{global\_elbo} + \log p(\theta)) / N$: the terms F counts once for the
        whole data set (LDA's topics, the prior), 1/N of them per datum."""
        dtype = _dtype(model)
        total = jnp.zeros((), dtype)
        if has_global_elbo(model):
            total = total + jnp.asarray(model.global_elbo(), dtype)
        if self.prior is not None:
            total = total + jnp.asarray(self.prior(model), dtype)
        return total / jnp.asarray(num_data, dtype)

    def start(self, state: OnlineState, started: Array = None, num_data: Array = None) -> _Carry:
        """Begin a pass (over a stream: ``update`` each batch, then ``finish``)."""
        del started, num_data
        zero = jnp.zeros((), _dtype(state.model))
        return _Carry(state, zero, zero)

    def finish(self, carry: _Carry, num_data: Array) -> tuple[OnlineState, Array]:
        """The state after a pass and the pass's F estimate."""
        del num_data  # each minibatch added its share of the global terms
        state = carry.state
        state = eqx.tree_at(lambda s: s.passes, state, state.passes + 1)
        return state, -carry.total / jnp.maximum(carry.weight, 1)

    # ---------------------------------------------------------------- in memory
    def step(self, state, data, started):
        def evaluate(state):
            total = log_likelihood_sum(state.model, data)
            return state, free_energy_from_sum(total, state.model, self.prior, data.num_data)

        def one_pass(state):
            batch_fn, num_batches = minibatches(data, self.batch_size, state.key, state.passes)
            carry = jax.lax.fori_loop(
                0, num_batches, lambda i, c: self.update(c, batch_fn(i)), self.start(state)
            )
            return self.finish(carry, data.num_data)

        return jax.lax.cond(started, one_pass, evaluate, state)

    def result(self, state, data):
        model = self.final_model(state, data.num_data)
        return model, posterior_of_data(model, data, split=self.split)

    def final_model(self, state: OnlineState, num_data: Array) -> Model:
        """The fitted model: the iterate, or with ``average=True`` the maximiser of the
        averaged statistics once there are any."""
        if state.averaged is None:
            return state.model
        averaged = self._maximize(state.model, state.averaged, num_data)
        return jax.tree_util.tree_map(
            lambda a, b: jnp.where(state.num_averaged > 0, a, b), averaged, state.model
        )

    def is_finite(self, state):
        return is_finite_tree(state.model)


def _dtype(model: Model) -> Any:
    return float_dtype(model)


def for_whole_data(batch: Dataset, dtype: Any) -> tuple[Dataset, Array, Array]:
    """A minibatch whose weights are scaled by $N / B_b$ (so that its sums estimate the whole
    data set's), the number of real rows $B_b$ it holds, and the factor."""
    visited = jnp.sum(batch.weights).astype(dtype)
    scale = jnp.asarray(batch.num_data, dtype) / jnp.maximum(visited, 1)
    scaled = Dataset(
        batch.x,
        batch.weights.astype(dtype) * scale,
        batch.num_data,
        chunk_size=batch.chunk_size,
        axis_name=batch.axis_name,
    )
    return scaled, visited, scale


def minibatches(data: Dataset, size: int | None, key: Key, passes: Array):
    """``(batch_fn, num_batches)`` for one pass: ``batch_fn(i)`` is the ``i``-th minibatch
    (a ``Dataset`` of ``size`` rows, the unused ones weighted 0), in an order drawn from
    ``key`` and the pass number. The real rows are split into ``ceil(N / size)``
    minibatches whose sizes differ by at most one. ``size=None``: the whole data, once."""
    rows = data.num_rows
    if size is None or size >= rows:
        return (lambda i: data), 1
    real = jnp.sum(data.weights > 0, dtype=jnp.int32)
    key = jr.fold_in(jr.fold_in(key, 0x5EED), passes)
    draw = jr.uniform(key, (rows,))
    order = jnp.argsort(jnp.where(data.weights > 0, draw, 2.0))
    order = jnp.concatenate([order, jnp.zeros((size,), order.dtype)])
    num_batches = (real + size - 1) // size

    def batch_fn(i):
        i = jnp.asarray(i, jnp.int32)
        begin = i * real // num_batches
        end = (i + 1) * real // num_batches
        index = jax.lax.dynamic_slice(order, (begin,), (size,))
        keep = begin + jnp.arange(size, dtype=jnp.int32) < end
        x = jax.tree_util.tree_map(lambda leaf: leaf[index], data.x)
        weights = jnp.where(keep, data.weights[index], 0)
        return Dataset(x, weights, data.num_data, chunk_size=size)

    return batch_fn, num_batches
