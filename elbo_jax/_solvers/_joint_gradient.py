r"""Joint gradient descent on $F(q, \theta)$ for an amortized q (a VAE; SVI).

The encoder's weights $\phi$ (in the q, or in the model) and the model's $\theta$ are one
set of parameters, moved by one optax optimizer on the gradient of F: the reparameterised
Monte Carlo estimate for Gaussian latents, exact for discrete ones. One iteration of the loop
is one pass over the data in minibatches (``batch_size``; the whole data when ``None``), in
an order drawn from the fit's key each pass; each minibatch's weights are scaled by
$N / B_b$, so its loss

$$\hat F_b(q, \theta) = -\frac1{B_b} \sum_{n \in b} \big(E_{q_n}[\log p(x_n, z \mid \theta)]
  + H[q_n]\big) - \frac1N \log p(\theta)$$

is an unbiased estimate of F. The pass's F, reported per iteration, is the mean of the
minibatch estimates at the parameters each minibatch saw (before its update).

A pass that leaves a parameter or its F non-finite is not taken: the fit stops with
``Status.NONFINITE`` and the model of the last finite pass. To skip non-finite minibatch
updates instead, wrap the optimizer: ``optax.apply_if_finite(optax.adam(1e-3), 10)``.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from .. import _optax
from .._custom_types import Array, Key
from .._data import Dataset
from .._model import Model, float_dtype, is_finite_tree
from .._objective import _free_energy
from .._q import AbstractQ
from .._steps import GradientMStep, _split_params
from ._base import AbstractSolver
from ._online import for_whole_data, minibatches


class JointState(eqx.Module):
    model: Model
    q: AbstractQ
    opt_state: Any
    passes: Array  # passes completed
    key: Key


def joint_parameters(m_step: GradientMStep, model: Model, q: AbstractQ) -> tuple[Any, Any]:
    """``(params, static)``: the trainable arrays of the model and of q together, and the rest."""
    model_params, model_static = _split_params(model, m_step.trainable)
    q_params, q_static = eqx.partition(q, eqx.is_inexact_array)
    return (model_params, q_params), (model_static, q_static)


class JointGradient(AbstractSolver):
    """One optimizer over the model and an amortized q (see the module docstring).

    ``m_step``: the ``GradientMStep`` whose optimizer (and ``num_steps`` updates per
    minibatch) moves both; ``batch_size``: rows per minibatch (``None``: the whole data).
    """

    m_step: GradientMStep
    prior: Any
    batch_size: int | None = eqx.field(static=True, default=None)

    @property
    def monotone(self) -> bool:
        return False

    def init(self, model, q, data, key):
        q = q.initialize(model, data.x)
        params, _ = joint_parameters(self.m_step, model, q)
        opt_state = self.m_step.init_optimizer(params)
        state = JointState(model, q, opt_state, jnp.zeros((), jnp.int32), key)
        return state, jnp.full((), jnp.nan, float_dtype(model))

    def _loss(self, static: Any, batch: Dataset):
        def loss(params, key):
            (model_params, q_params), (model_static, q_static) = params, static
            model = eqx.combine(model_params, model_static)
            q = eqx.combine(q_params, q_static)
            return _free_energy(model, q, batch, key=key, prior=self.prior)

        return _optax.user_promotion(loss)

    def _update(self, carry: tuple, batch: Dataset) -> tuple:
        """One minibatch: its F estimate at the current parameters, then ``num_steps``
        optimizer updates."""
        state, total, weight = carry
        dtype = float_dtype(state.model)
        batch, visited, _ = for_whole_data(batch, dtype)
        params, static = joint_parameters(self.m_step, state.model, state.q)
        loss = self._loss(static, batch)
        key, step_key = jr.split(state.key)
        optimizer = self.m_step.transform

        def body(i, inner):
            params, opt_state, _ = inner
            value_fn = lambda p: loss(p, jr.fold_in(step_key, i))
            value, grads = jax.value_and_grad(value_fn)(params)
            updates, opt_state = _optax.update(optimizer, grads, opt_state, params, value, value_fn)
            return optax.apply_updates(params, updates), opt_state, value

        with _optax.library_promotion():
            first = body(0, (params, state.opt_state, jnp.zeros((), dtype)))
            params, opt_state, value = jax.lax.fori_loop(1, self.m_step.num_steps, body, first)
        del value
        estimate = first[2]
        (model_params, q_params), (model_static, q_static) = params, static
        new = JointState(
            eqx.combine(model_params, model_static),
            eqx.combine(q_params, q_static),
            opt_state,
            state.passes,
            key,
        )
        # No per-minibatch finiteness check (a select over every weight and optimizer
        # moment costs as much as the update): a pass that ends non-finite is not taken by
        # the fit loop (``is_finite``), which stops there with the last finite model.
        return new, total + estimate.astype(dtype) * visited, weight + visited

    def step(self, state, data, started):
        def evaluate(state):
            key = jr.fold_in(state.key, 0xE7A1)
            return state, _free_energy(state.model, state.q, data, key=key, prior=self.prior)

        def one_pass(state):
            batch_fn, num_batches = minibatches(data, self.batch_size, state.key, state.passes)
            zero = jnp.zeros((), float_dtype(state.model))
            state, total, weight = jax.lax.fori_loop(
                0, num_batches, lambda i, c: self._update(c, batch_fn(i)), (state, zero, zero)
            )
            state = eqx.tree_at(lambda s: s.passes, state, state.passes + 1)
            return state, total / jnp.maximum(weight, 1)

        return jax.lax.cond(started, one_pass, evaluate, state)

    def result(self, state, data):
        return state.model, state.q

    def is_finite(self, state):
        return is_finite_tree(state.model) & is_finite_tree(state.q)
