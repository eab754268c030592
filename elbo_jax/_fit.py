"""``fit``: coordinate descent on the free energy, compiled whole."""

import enum
import math
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._autostats import affine_split
from ._custom_types import Array, Data, Key
from ._latent import Discrete
from ._model import Model, float_dtype, is_finite_tree
from ._objective import Prior, _free_energy, _with_prior
from ._q import AbstractQ, Categorical, ExactPosterior, num_data
from ._statistics import posterior_log_probs, statistics_pass
from ._steps import (
    AbstractEStep,
    AbstractMStep,
    ExactEStep,
    ExactMStep,
    GradientEStep,
    _OptaxStep,
    minimize_lbfgs,
)
from ._validate import check_log_joint, check_model, prepare_data


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


class FitResult(eqx.Module):
    """What ``fit`` returns.

    - ``model``, ``q``: the fitted model and recognition distribution (the last finite ones).
    - ``history``: the ELBO per datum, $-F$, after each iteration (MAP: includes $\\log p(\\theta)/N$);
      ``history[-1]`` is the final value, shape ``(num_iters,)``.
    - ``initial_elbo``: $-F$ before the first iteration.
    - ``status``: a ``Status``; ``converged`` and ``message`` say the same.
    - ``num_increases``: how many iterations of an exact E-step and exact M-step raised $F$
      beyond rounding (should be 0; anything else is reported with a warning).
    """

    model: Model
    q: AbstractQ
    history: Array
    initial_elbo: Array
    num_iters: int = eqx.field(static=True)
    status: Status = eqx.field(static=True)
    num_increases: int = eqx.field(static=True)

    @property
    def converged(self) -> bool:
        return self.status == Status.CONVERGED

    @property
    def message(self) -> str:
        return self.status.message

    @property
    def elbo(self) -> Array:
        """The final ELBO per datum (MAP: plus $\\log p(\\theta)/N$)."""
        return self.history[-1] if self.num_iters else self.initial_elbo


class _Config(eqx.Module):
    e_step: AbstractEStep
    m_step: AbstractMStep
    prior: Any
    max_iters: int = eqx.field(static=True)
    use_table: bool = eqx.field(static=True)
    # Exact EM through statistics: each iteration is maximize(stats) then one statistics_pass.
    use_statistics: bool = eqx.field(static=True, default=False)
    # On the statistics path: the M-step is the model's closed form (else L-BFGS on the
    # objective the found statistics determine).
    closed_form: bool = eqx.field(static=True, default=False)
    # log_joint split into data features and a part affine in them (_autostats.AffineSplit),
    # or None. It gives the table on the statistics path, and the statistics when there is
    # no closed form.
    split: Any = None


class _State(eqx.Module):
    model: Model
    q: AbstractQ
    e_state: Any
    m_state: Any
    key: Key
    objective: Array
    initial_objective: Array
    iteration: Array
    history: Array
    status: Array
    num_increases: Array
    stats: Any = None  # the exact posterior's statistics, when config.use_statistics
    # Statistics path: the start's pass has not run yet. It runs as the loop's first trip,
    # with no M-step, so the pass is compiled once.
    pending: Array | None = None


def _table(model: Model, x: Data, use_table: bool) -> Array | None:
    return model.log_joint_table(x) if use_table else None


@eqx.filter_jit
def _initialize(
    model: Model, q: AbstractQ, x: Data, config: _Config, key: Key, features: Any = None
) -> _State:
    stats, pending = None, jnp.array(False)
    if config.use_statistics:
        shapes = jax.eval_shape(lambda m: _statistics_objective(m, x, config, features), model)
        stats, objective = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        objective = jnp.full_like(objective, jnp.nan)
        e_state = m_state = None
        pending = jnp.array(True)
    else:
        key, init_key, e_key, f_key = jr.split(key, 4)
        q = q.initialize(model, x, key=init_key)
        table = _table(model, x, config.use_table)
        # Coordinate descent starts with an E-step, so the first M-step sees a q fitted to the
        # initial model (a uniform or zero-mean q would make every component look alike).
        e_state = config.e_step.init(q)
        q, e_state = config.e_step.step(model, q, e_state, x, key=e_key, table=table)
        objective = _free_energy(model, q, x, key=f_key, prior=config.prior, table=table)
        m_state = config.m_step.init(model)
    return _State(
        model=model,
        q=q,
        e_state=e_state,
        m_state=m_state,
        key=key,
        objective=objective,
        initial_objective=objective,
        iteration=jnp.array(0, jnp.int32),
        history=jnp.full((config.max_iters,), jnp.nan, objective.dtype),
        status=jnp.array(Status.RUNNING, jnp.int32),
        num_increases=jnp.array(0, jnp.int32),
        stats=stats,
        pending=pending,
    )


def _statistics_objective(
    model: Model, x: Data, config: _Config, features: Any = None
) -> tuple[Any, Array]:
    """The exact posterior's statistics and F there, $-\\frac1N\\sum_n \\log p(x_n) - \\log p(θ)/N$."""
    stats, total = statistics_pass(
        model, x, split=config.split, features=features, closed_form=config.closed_form
    )
    return stats, _with_prior(-total / num_data(x), model, config.prior, num_data(x))


def _maximize(model: Model, stats: Any, config: _Config) -> Model:
    """The exact M-step from the exact posterior's statistics."""
    if config.closed_form:
        return model.maximize(stats, config.prior)
    # No closed form: the numerical M-step on the objective the statistics determine, which
    # costs K evaluations of the log-joint per step instead of N K.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    total = jnp.sum(stats["counts"])

    def loss(p):
        m = eqx.combine(p, static)
        return _with_prior(-config.split.objective(m, stats) / total, m, config.prior, total)

    m_step = config.m_step
    params = minimize_lbfgs(loss, params, max_steps=m_step.max_steps, tol=m_step.tol)
    return eqx.combine(params, static)


def _iterate(state: _State, x: Data, config: _Config, tol: Array, features: Any) -> _State:
    """One coordinate-descent iteration: M-step on θ, then E-step on q, then F(q, θ)."""
    key, m_key, e_key, f_key = jr.split(state.key, 4)
    stats = None
    if config.use_statistics:
        # Exact EM: the M-step is the closed form on the exact posterior's statistics, and the
        # E-step is one pass that leaves only the new statistics and F (q stays implicit).
        # The first trip only makes the start's pass (no M-step).
        model = jax.lax.cond(
            state.pending,
            lambda m, _: m,
            lambda m, s: _maximize(m, s, config),
            state.model,
            state.stats,
        )
        m_state = state.m_state
        q, e_state = state.q, state.e_state
        stats, objective = _statistics_objective(model, x, config, features)
    else:
        model, m_state = config.m_step.step(
            state.model, state.q, state.m_state, x, key=m_key, prior=config.prior
        )
        table = _table(model, x, config.use_table)
        q, e_state = config.e_step.step(model, state.q, state.e_state, x, key=e_key, table=table)
        objective = _free_energy(model, q, x, key=f_key, prior=config.prior, table=table)

    # q may put log-probability -inf on states the model rules out (log_joint = -inf there);
    # that is a valid q, and any other non-finite q makes the objective non-finite too.
    q_ok = is_finite_tree(q, allow_minus_inf=True)
    finite = jnp.isfinite(objective) & is_finite_tree(model) & q_ok
    increase = objective - state.objective
    rounding = 64 * jnp.finfo(objective.dtype).eps * (1 + jnp.abs(state.objective))
    increased = (config.e_step.exact and config.m_step.exact) & (increase > rounding)
    iteration = state.iteration + 1
    status = jnp.where(
        jnp.abs(increase) < tol,
        Status.CONVERGED,
        jnp.where(iteration >= config.max_iters, Status.MAX_ITERS, Status.RUNNING),
    )
    start = jnp.asarray(state.pending)  # this trip was the start's pass
    iteration = jnp.where(start, state.iteration, iteration)
    status = jnp.where(start, Status.RUNNING, status)
    new = _State(
        model=model,
        q=q,
        e_state=e_state,
        m_state=m_state,
        key=key,
        objective=objective,
        initial_objective=jnp.where(start, objective, state.initial_objective),
        iteration=iteration,
        history=jnp.where(start, state.history, state.history.at[state.iteration].set(-objective)),
        status=status.astype(jnp.int32),
        num_increases=state.num_increases + (increased & ~start).astype(jnp.int32),
        stats=stats,
        pending=jnp.zeros_like(start),
    )
    # A non-finite step is not taken: the state stays at the last finite iteration.
    kept = eqx.tree_at(lambda s: s.status, state, jnp.array(Status.NONFINITE, jnp.int32))
    return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, kept)


@eqx.filter_jit
def _run(
    state: _State, x: Data, config: _Config, tol: Array, stop_at: Array, features: Any = None
) -> _State:
    def cond(s):
        return (s.status == Status.RUNNING) & ((s.iteration < stop_at) | s.pending)

    return jax.lax.while_loop(cond, lambda s: _iterate(s, x, config, tol, features), state)


@eqx.filter_jit
def _solve(
    model: Model, q: AbstractQ, x: Data, config: _Config, key: Key, tol: Array
) -> tuple[_State, AbstractQ]:
    features = _datum_features.__wrapped__(x, config)
    state = _initialize.__wrapped__(model, q, x, config, key, features)
    # A non-finite start runs no iteration (fit then raises). On the statistics path the
    # start's pass is the loop's first trip, which stops the loop if it is non-finite.
    started = jnp.isfinite(state.objective) | state.pending
    stop_at = jnp.where(started, config.max_iters, 0).astype(jnp.int32)
    state = _run.__wrapped__(state, x, config, tol, stop_at, features)
    return state, (
        _result_posterior.__wrapped__(state.model, x, config, features)
        if config.use_statistics
        else state.q
    )


@eqx.filter_jit
def _result_posterior(model: Model, x: Data, config: _Config, features: Any) -> AbstractQ:
    """The exact posterior of the fitted model (the statistics path carries no q), chunk
    by chunk as the statistics passes are."""
    log_probs = posterior_log_probs(model, x, split=config.split, features=features)
    return Categorical(log_probs)


@eqx.filter_jit
def _datum_features(x: Data, config: _Config) -> Any:
    """The found split's per-datum features, computed once per fit (they do not change
    between iterations), unless they would take more than ``_MAX_FEATURE_RATIO`` times
    the data's memory (then each pass computes them chunk by chunk)."""
    if config.split is None:
        return None
    data_size = sum(max(1, leaf[0].size) for leaf in jax.tree_util.tree_leaves(x))
    if config.split.feature_size() > _MAX_FEATURE_RATIO * data_size:
        return None
    return config.split.datum_features(x)


_MAX_FEATURE_RATIO = 4


def _check_initial(state: _State) -> None:
    initial = float(state.initial_objective)  # on the host: no compiled isfinite
    if not math.isfinite(initial):
        raise ValueError(
            "the initial model and q give a non-finite free energy "
            f"({initial}); check the initial parameters and that "
            "log_joint is finite on the data"
        )


def _unused_key() -> Key:
    """A key for fits that draw nothing, made without compiling a seeding function."""
    shape = jax.eval_shape(lambda: jr.key_data(jr.key(0)))
    return jr.wrap_key_data(np.zeros(shape.shape, shape.dtype))


def _is_inexact_struct(leaf: Any) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _resolve_e_step(e_step: Any, q: AbstractQ) -> AbstractEStep:
    if isinstance(e_step, str):
        if e_step != "exact":
            raise ValueError(f"e_step must be 'exact' or an ej.GradientEStep(...), got {e_step!r}")
        return ExactEStep()
    if isinstance(e_step, AbstractEStep):
        if isinstance(e_step, GradientEStep) and isinstance(q, ExactPosterior):
            raise TypeError(
                "q=ej.ExactPosterior() is always fitted exactly; for gradient E-steps choose a family "
                "with parameters, e.g. q=ej.Categorical() or q=ej.Gaussian()"
            )
        return e_step
    raise TypeError(f"e_step must be 'exact' or an ej.GradientEStep(...), got {e_step!r}")


def _resolve_m_step(m_step: Any) -> AbstractMStep:
    if isinstance(m_step, str):
        if m_step != "exact":
            raise ValueError(f"m_step must be 'exact' or an ej.GradientMStep(...), got {m_step!r}")
        return ExactMStep()
    if isinstance(m_step, AbstractMStep):
        return m_step
    raise TypeError(f"m_step must be 'exact' or an ej.GradientMStep(...), got {m_step!r}")


def fit(
    model: Model,
    x: Data,
    *,
    q: AbstractQ | None = None,
    e_step: str | AbstractEStep = "exact",
    m_step: str | AbstractMStep = "exact",
    prior: Prior = None,
    max_iters: int = 500,
    tol: float = 1e-6,
    key: Key | None = None,
    progress: bool = False,
    throw: bool = False,
) -> FitResult:
    r"""Fit ``model`` to data ``x`` by coordinate descent on the free energy $F(q, \theta)$.

    Each iteration is an M-step on $\theta$ (q fixed) followed by an E-step on q
    ($\theta$ fixed); before the first, q is initialised (and, for an exact E-step, set
    to its optimum). The whole loop runs compiled, in a bounded ``lax.while_loop``.

    - exact EM: the defaults (``q=ExactPosterior()``, ``e_step="exact"``, ``m_step="exact"``);
      the M-step is the model's closed form if it has one, else solved numerically;
    - generalized EM: ``m_step=ej.GradientMStep(optax.adam(1e-2), num_steps=10)``;
    - MAP-EM: ``prior=lambda model: log p(θ)``;
    - hard EM: ``q=ej.PointMass()``; partial/variational E-steps:
      ``q=ej.Categorical()`` or ``ej.Gaussian()`` with ``e_step=ej.GradientEStep(...)``.

    **Arguments:**

    - `model`: the initial ``ej.Model``.
    - `x`: data, leading axis of length $N$. Floating data are cast to the model's dtype.
    - `q`: recognition family (default ``ej.ExactPosterior()``).
    - `e_step`, `m_step`: ``"exact"`` or a gradient step.
    - `prior`: ``prior(model) -> log p(θ)``, a scalar; ``None`` for maximum likelihood.
    - `max_iters`: at most this many iterations.
    - `tol`: stop when $|F_t - F_{t-1}| <$ ``tol`` (per datum). ``tol=0`` runs ``max_iters``.
    - `key`: JAX random key, required for stochastic steps (Monte Carlo expectations);
      deterministic fits need none.
    - `progress`: show a tqdm bar (the loop runs in ~100 compiled chunks; no sync per iteration).
    - `throw`: raise ``RuntimeError`` instead of warning when the fit goes non-finite.

    **Returns:** a ``FitResult`` (``.model``, ``.q``, ``.history``, ``.status``, ``.converged``,
    ``.num_iters``).

    ```python
    res = ej.fit(ej.models.GaussianMixture.initialize(key, x, 3), x)
    res.model.means, res.history[-1]
    ```
    """
    model = check_model(model)
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if prior is not None and not callable(prior):
        raise TypeError(
            f"prior must be a callable prior(model) -> log p(theta), or None; got {prior!r}"
        )
    q = ExactPosterior() if q is None else q
    if not isinstance(q, AbstractQ):
        raise TypeError(
            f"q must be an elbo_jax recognition family such as ej.ExactPosterior(), got {q!r}"
        )
    x = prepare_data(model, x)
    check_log_joint(model, x)
    q.check(model.latent, num_data(x))
    e_step = _resolve_e_step(e_step, q)
    m_step = _resolve_m_step(m_step)
    if key is None:
        if q.needs_key:
            raise ValueError(
                f"q={type(q).__name__}(...) takes Monte Carlo expectations, so fit needs a "
                "random key: pass key=jax.random.key(...)"
            )
        key = _unused_key()  # deterministic steps draw nothing from it

    if isinstance(e_step, _OptaxStep):
        q_shape = eqx.filter_eval_shape(q.initialize, model, x, key=key)
        params, _ = eqx.partition(q_shape, _is_inexact_struct)
        if not jax.tree_util.tree_leaves(params):
            raise TypeError(
                f"e_step=GradientEStep needs a q with continuous parameters, but {type(q).__name__} "
                f"over {model.latent!r} has none; use ej.Categorical() or ej.Gaussian()"
            )
        e_step = e_step.hashable(params)
    if isinstance(m_step, _OptaxStep):
        params, _ = eqx.partition(model, eqx.is_inexact_array)
        m_step = m_step.hashable(params)

    closed_form, split = _statistics_plan(model, x, q, e_step, m_step, prior)
    config = _Config(
        e_step=e_step,
        m_step=m_step,
        prior=prior,
        max_iters=max_iters,
        use_table=isinstance(model.latent, Discrete),
        use_statistics=closed_form or split is not None,
        closed_form=closed_form,
        split=split,
    )
    dtype = float_dtype(model)
    tol_arr = jnp.asarray(tol, dtype)
    if progress:
        features = _datum_features(x, config)
        state = _initialize(model, q, x, config, key, features)
        if config.use_statistics:  # the start's pass: the loop's first trip
            state = _run(state, x, config, tol_arr, jnp.asarray(0, jnp.int32), features)
        _check_initial(state)
        state = _run_with_progress(state, x, config, tol_arr, max_iters, features)
        result_q = (
            _result_posterior(state.model, x, config, features)
            if config.use_statistics
            else state.q
        )
    else:
        # One compiled call (one compilation): start, loop, and the posterior of the result.
        state, result_q = _solve(model, q, x, config, key, tol_arr)
        _check_initial(state)

    num_iters = int(state.iteration)
    status = Status(int(state.status))
    num_increases = int(state.num_increases)
    if status == Status.NONFINITE:
        msg = f"fit stopped after {num_iters} iterations: {status.message}"
        if throw:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if num_increases:
        warnings.warn(
            f"exact EM raised the free energy beyond rounding in {num_increases} of {num_iters} "
            "iterations; a model hook (log_joint_table, posterior, maximize) may disagree with "
            "log_joint, or the problem is numerically ill-conditioned",
            RuntimeWarning,
            stacklevel=2,
        )
    return FitResult(
        model=state.model,
        q=result_q,
        history=state.history[:num_iters],
        initial_elbo=jnp.asarray(-np.asarray(state.initial_objective)),  # no compiled negation
        num_iters=num_iters,
        status=status,
        num_increases=num_increases,
    )


def _is_exact_discrete_em(model: Model, q: AbstractQ, e_step: Any, m_step: Any) -> bool:
    return (
        isinstance(q, ExactPosterior)
        and isinstance(e_step, ExactEStep)
        and isinstance(m_step, ExactMStep)
        and m_step.use_closed_form
        and isinstance(model.latent, Discrete)
    )


def _statistics_plan(
    model: Model, x: Data, q: AbstractQ, e_step: Any, m_step: Any, prior: Prior
) -> tuple[bool, Any]:
    """``(closed_form, split)`` for exact EM on a Discrete model, which runs as statistics
    passes when either is set: the model's closed-form M-step, and the ``log_joint`` split
    into data features (the table from features computed once; with no closed form, also
    the statistics). ``(False, None)`` otherwise: the fit carries q."""
    if not _is_exact_discrete_em(model, q, e_step, m_step):
        return False, None
    return model.has_closed_form(prior), affine_split(model, x)


def _run_with_progress(
    state: _State, x: Data, config: _Config, tol: Array, max_iters: int, features: Any
) -> _State:
    from tqdm.auto import tqdm

    chunk = max(1, math.ceil(max_iters / 100))
    with tqdm(total=max_iters, desc="elbo_jax.fit", unit="it") as bar:
        done = 0
        while done < max_iters:
            stop_at = jnp.asarray(min(done + chunk, max_iters), jnp.int32)
            state = _run(state, x, config, tol, stop_at, features)
            now = int(state.iteration)
            bar.update(now - done)
            bar.set_postfix(elbo=f"{-float(state.objective):.6g}")
            if int(state.status) != Status.RUNNING or now == done:
                break
            done = now
    return state
