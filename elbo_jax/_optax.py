"""Optax optimizers inside compiled steps, without a recompile for every fresh optimizer.

``optax.adam(1e-3)`` returns new closures each time it is called, and jit would treat each
as a new static argument. ``compiled_optimizer`` turns an optimizer into one that jit can
compare: a plain ``GradientTransformation`` becomes a ``TracedOptimizer`` whose ``init`` and
``update`` are ``_traced.Traced`` programs — the learning rate and every other number are
dynamic leaves, so ``optax.adam(1e-2)`` and ``optax.adam(1e-3)`` share one compiled fit
while computing with their own rates. An optimizer whose ``update`` takes extra arguments
(L-BFGS: the loss function itself) is compared by the text and constants of its jaxprs
(``HashableOptimizer``): the same optimizer shares a fit, another rate compiles anew.
"""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._traced import Traced


def library_promotion() -> Any:
    """A context in which optax's own code is traced under standard dtype promotion.

    optax is not written for ``jax_numpy_dtype_promotion="strict"`` (with x64 on, L-BFGS
    adds its int32 memory index to an int64 ``arange``), so a user who turns strict
    promotion on would find every numerical M-step broken. The user's own functions
    are still traced under the user's setting: wrap them in ``user_promotion``.
    """
    return jax.numpy_dtype_promotion("standard")


def user_promotion(fn: Callable) -> Callable:
    """``fn`` traced under the dtype-promotion setting in force now (the caller's)."""
    mode = jax.config.jax_numpy_dtype_promotion

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion(mode):
            return fn(*args, **kwargs)

    return wrapped


def _zero_value_fn(params: Any) -> jax.Array:
    del params
    return jnp.zeros(())


def _canonical(closed_jaxpr: Any) -> tuple:
    consts = tuple(
        (np.shape(c), str(np.asarray(c).dtype), np.asarray(c).tobytes())
        for c in closed_jaxpr.consts
    )
    return (str(closed_jaxpr.jaxpr), consts)


def takes_extra_args(optimizer: Any) -> bool:
    return isinstance(optimizer, optax.GradientTransformationExtraArgs)


def update(optimizer: Any, grads: Any, state: Any, params: Any, value: Any, value_fn: Any) -> tuple:
    """``optimizer.update``, passing ``value``/``grad``/``value_fn`` to those that take them (L-BFGS)."""
    if isinstance(optimizer, TracedOptimizer):
        return optimizer.update(grads, state, params, jnp.asarray(value, jnp.zeros(()).dtype))
    if takes_extra_args(optimizer):
        return optimizer.update(grads, state, params, value=value, grad=grads, value_fn=value_fn)
    return optimizer.update(grads, state, params)


class HashableOptimizer:
    """An optax ``GradientTransformation`` that is equal to another computing the same thing."""

    def __init__(self, optimizer: Any, params: Any):
        if isinstance(optimizer, HashableOptimizer):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "optimizer must be an optax.GradientTransformation such as optax.adam(1e-2), "
                f"got {optimizer!r}"
            )
        self.optimizer = optimizer
        params = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
        with library_promotion():
            state = jax.eval_shape(optimizer.init, params)
            init_jaxpr = jax.make_jaxpr(optimizer.init)(params)
            value = jax.ShapeDtypeStruct((), jnp.zeros(()).dtype)
            update_jaxpr = jax.make_jaxpr(
                lambda g, s, p, v: update(optimizer, g, s, p, v, _zero_value_fn)
            )(params, state, params, value)
        self._signature = (_canonical(init_jaxpr), _canonical(update_jaxpr))
        self._hash = hash(self._signature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashableOptimizer) and self._signature == other._signature

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"HashableOptimizer({self.optimizer!r})"


class TracedOptimizer(eqx.Module):
    """A plain optax optimizer with its numbers as dynamic leaves (see the module docstring)."""

    init_fn: Traced
    update_fn: Traced  # (grads, state, params, value) -> (updates, state)

    def init(self, params: Any) -> Any:
        return self.init_fn(params)

    def update(self, grads: Any, state: Any, params: Any, value: Any) -> tuple:
        return self.update_fn(grads, state, params, value)


def _uses_value_fn(optimizer: Any, params: Any, state: Any, value: Any) -> bool:
    """Whether ``optimizer.update`` calls its ``value_fn`` (a line search: L-BFGS)."""
    called = []

    def value_fn(p):
        called.append(True)
        return jnp.zeros((), value.dtype)

    jax.eval_shape(
        lambda g, s, p, v: optimizer.update(g, s, p, value=v, grad=g, value_fn=value_fn),
        params,
        state,
        params,
        value,
    )
    return bool(called)


def compiled_optimizer(optimizer: Any, params: Any) -> Any:
    """``optimizer`` in a form that jit compares by computation (see the module docstring)."""
    if isinstance(optimizer, (HashableOptimizer, TracedOptimizer)):
        return optimizer
    shapes = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    value = jax.ShapeDtypeStruct((), jnp.zeros(()).dtype)
    with library_promotion():
        state = jax.eval_shape(optimizer.init, shapes)
        if takes_extra_args(optimizer) and _uses_value_fn(optimizer, shapes, state, value):
            return HashableOptimizer(optimizer, params)

        def update_fn(g, s, p, v):
            return update(optimizer, g, s, p, v, _zero_value_fn)

        return TracedOptimizer(
            Traced(optimizer.init, shapes), Traced(update_fn, shapes, state, shapes, value)
        )
