r"""Solvers: a small state plus ``init`` / ``step``, driven by ONE compiled bounded loop.

Every algorithm in elbo_jax is a solver: exact EM by statistics passes, coordinate descent
with a recognition distribution q, and (later) stochastic, online and amortized ones. The
loop in ``run`` is the same for all: it counts iterations, records the ELBO in a history
buffer, stops on convergence ($|F_t - F_{t-1}| <$ ``tol``), on ``max_iters`` or on a
non-finite step (which is not taken: the state stays at the last finite iteration), and
counts the iterations of a monotone solver that raised F beyond rounding.

``solve`` is pure: it can be ``jax.jit``-ted, ``jax.vmap``-ped (restarts) and run under
``shard_map`` (sharded EM); ``fit`` is its host driver.
"""

import abc
import enum
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Key
from .._data import Dataset
from .._model import Model
from .._q import AbstractQ

# The history buffer holds this many iterations; a longer fit runs in segments of this
# length, and the host copies each segment's history out (so max_iters costs no memory).
HISTORY_SIZE = 1024


class Status(enum.IntEnum):
    """Why a fit stopped. ``Status.X.message`` says it in words."""

    RUNNING = 0
    CONVERGED = 1
    MAX_ITERS = 2
    NONFINITE = 3

    @property
    def message(self) -> str:
        return _MESSAGES[self]

    def __str__(self) -> str:
        return self.name


_MESSAGES = {
    Status.RUNNING: "the fit has not finished",
    Status.CONVERGED: "converged: the free energy per datum changed by less than tol",
    Status.MAX_ITERS: "stopped at max_iters before the free energy settled to within tol",
    Status.NONFINITE: (
        "a step made the free energy or the parameters non-finite; "
        "the model and q are those of the last finite iteration"
    ),
}


class AbstractSolver(eqx.Module):
    """One algorithm as coordinate (or stochastic) descent on F.

    - ``init(model, q, data, key)``: the solver's state and F there (NaN when the first
      ``step`` computes it: see ``started``).
    - ``step(state, data, started)``: the next state and F at it. With ``started`` false
      (only for solvers whose ``init`` gave NaN) the step only evaluates the start: it must
      not change the model, and it is not counted as an iteration.
    - ``result(state, data)``: the model and the q over the data's rows.
    - ``is_finite(state)``: whether the state is usable (parameters and q finite).
    - ``monotone``: whether every step provably lowers F (exact E- and M-steps), so that a
      rise beyond rounding is reported.
    """

    @property
    @abc.abstractmethod
    def monotone(self) -> bool: ...

    @abc.abstractmethod
    def init(self, model: Model, q: AbstractQ, data: Dataset, key: Key) -> tuple[Any, Array]: ...

    @abc.abstractmethod
    def step(self, state: Any, data: Dataset, started: Array) -> tuple[Any, Array]: ...

    @abc.abstractmethod
    def result(self, state: Any, data: Dataset) -> tuple[Model, AbstractQ]: ...

    @abc.abstractmethod
    def is_finite(self, state: Any) -> Array: ...

    def slack(self, old: Any, new: Any) -> Array:
        r"""How far F may rise from state ``old`` to ``new`` when the M-step is exact on
        $F + P$ rather than on $F$ (``Model.m_step_penalty``): $P(\theta_{old}) - P(\theta_{new})$,
        at least 0."""
        return jnp.maximum(old.model.m_step_penalty() - new.model.m_step_penalty(), 0.0)


class LoopState(eqx.Module):
    """What the loop carries besides the solver's own state."""

    solver_state: Any
    objective: Array
    initial_objective: Array
    iteration: Array
    history: Array  # ELBO of iteration i at slot i % HISTORY_SIZE
    status: Array
    num_increases: Array
    started: Array  # the start's F is known (else the next trip computes it)


def init(solver: AbstractSolver, model: Model, q: AbstractQ, data: Dataset, key: Key) -> LoopState:
    """The loop's state at the start."""
    state, objective = solver.init(model, q, data, key)
    started = jnp.isfinite(objective) | ~jnp.isnan(objective)
    # A start with a non-finite F (not merely "to be computed") runs no iteration.
    status = jnp.where(started & ~jnp.isfinite(objective), Status.NONFINITE, Status.RUNNING)
    return LoopState(
        solver_state=state,
        objective=objective,
        initial_objective=objective,
        iteration=jnp.array(0, jnp.int32),
        history=jnp.full((HISTORY_SIZE,), jnp.nan, objective.dtype),
        status=status.astype(jnp.int32),
        num_increases=jnp.array(0, jnp.int32),
        started=started,
    )


def _iterate(
    solver: AbstractSolver, loop: LoopState, data: Dataset, tol: Array, max_iters: Array
) -> LoopState:
    state, objective = solver.step(loop.solver_state, data, loop.started)
    return advance(solver, loop, state, objective, data.num_data, tol, max_iters)


def advance(
    solver: AbstractSolver,
    loop: LoopState,
    state: Any,
    objective: Array,
    num_data: Array,
    tol: Array,
    max_iters: Array,
) -> LoopState:
    """The loop's bookkeeping after one trip that took ``loop.solver_state`` to ``state``
    with F = ``objective`` (the step itself may have run in memory or over a stream)."""
    finite = jnp.isfinite(objective) & solver.is_finite(state)
    started = loop.started
    increase = objective - loop.objective
    # F is a mean of N terms: its rounding error grows like sqrt(N) eps (1 + |F|).
    scale = jnp.sqrt(jnp.maximum(jnp.asarray(num_data).astype(objective.dtype), 1.0))
    rounding = 64 * jnp.finfo(objective.dtype).eps * (1 + jnp.abs(loop.objective)) * scale
    # A floor in a closed-form M-step (reg_covar) makes it exact on F + P, not on F: F may
    # then rise by up to P(old) - P(new) (Model.m_step_penalty, AbstractSolver.slack).
    slack = solver.slack(loop.solver_state, state).astype(objective.dtype)
    increased = started & solver.monotone & (increase > rounding + slack)
    iteration = loop.iteration + started.astype(jnp.int32)
    status = jnp.where(
        jnp.abs(increase) < tol,
        Status.CONVERGED,
        jnp.where(iteration >= max_iters, Status.MAX_ITERS, Status.RUNNING),
    )
    status = jnp.where(started, status, Status.RUNNING)
    slot = loop.iteration % HISTORY_SIZE
    new = LoopState(
        solver_state=state,
        objective=objective,
        initial_objective=jnp.where(started, loop.initial_objective, objective),
        iteration=iteration,
        history=jnp.where(started, loop.history.at[slot].set(-objective), loop.history),
        status=status.astype(jnp.int32),
        num_increases=loop.num_increases + increased.astype(jnp.int32),
        started=jnp.ones_like(started),
    )
    # A non-finite step is not taken: the state stays at the last finite iteration.
    kept = eqx.tree_at(lambda s: s.status, loop, jnp.array(Status.NONFINITE, jnp.int32))
    return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, kept)


def run(
    solver: AbstractSolver,
    loop: LoopState,
    data: Dataset,
    tol: Array,
    max_iters: Array,
    stop_at: Array,
) -> LoopState:
    """Iterate until the fit stops or ``stop_at`` iterations are done: one bounded
    ``lax.while_loop`` for every solver."""

    def cond(s):
        return (s.status == Status.RUNNING) & ((s.iteration < stop_at) | ~s.started)

    return jax.lax.while_loop(cond, lambda s: _iterate(solver, s, data, tol, max_iters), loop)


def solve(
    solver: AbstractSolver,
    model: Model,
    q: AbstractQ,
    data: Dataset,
    key: Key,
    tol: Array,
    max_iters: Array,
) -> LoopState:
    """A whole fit, or its first ``HISTORY_SIZE`` iterations (``run`` continues it): pure,
    so it can be jitted, vmapped over models and keys, and run under ``shard_map``."""
    loop = init(solver, model, q, data, key)
    return run(solver, loop, data, tol, max_iters, jnp.minimum(max_iters, HISTORY_SIZE))
