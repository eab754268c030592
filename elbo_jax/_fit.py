"""``fit``: the host driver. It checks the input, chooses a solver, pads (and shards) the
data, runs the solver's compiled loop, and reports: warnings, progress, ``FitResult``."""

import dataclasses
import functools
import math
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import _data
from ._amortized import Amortized
from ._autostats import affine_split
from ._custom_types import Array, Data, Key
from ._errors import ConvergenceWarning
from ._latent import Chain, Discrete, GaussianChain, Real
from ._model import Model, float_dtype, has_complete_data_statistics
from ._newton_step import NewtonMStep, warn_newton_failures
from ._objective import Prior
from ._q import AbstractQ, ExactPosterior, num_data
from ._solvers import HISTORY_SIZE, CoordinateDescent, LoopState, StatisticsEM, Status, run, solve
from ._solvers._base import AbstractSolver
from ._solvers._joint_gradient import JointGradient, joint_parameters
from ._solvers._online import InertiaMStep, OnlineEM, StepwiseMStep
from ._steps import (
    AbstractEStep,
    AbstractMStep,
    ExactEStep,
    ExactMStep,
    GradientEStep,
    GradientMStep,
    _OptaxStep,
    _split_params,
    uses_closed_form,
)
from ._stream import BatchReader, Stream
from ._streamed import fit_stream
from ._traced import Traced
from ._validate import (
    check_has_parameters,
    check_log_joint,
    check_model,
    datum_shapes,
    prepare_data,
    remembered,
    shape_key,
)


class FitResult(eqx.Module):
    """What ``fit`` returns.

    - ``model``, ``q``: the fitted model and recognition distribution (the last finite ones).
    - ``history``: the ELBO per datum, $-F$, after each iteration (MAP: includes $\\log p(\\theta)/N$);
      ``history[-1]`` is the final value, shape ``(num_iters,)``.
    - ``initial_elbo``: $-F$ before the first iteration.
    - ``status``: a ``Status``; ``converged`` and ``message`` say the same.
    - ``num_increases``: how many iterations of an exact E-step and exact M-step raised $F$
      beyond rounding (should be 0; anything else is reported with a warning).
    - ``restart_elbos``: with ``restarts=R``, the final ELBO of every restart ``(R,)``
      (the result is the best of them); ``None`` otherwise.
    - ``state``: the solver's loop state (model, q or statistics, optimizer states, key):
      ``ej.fit(result, x, ...)`` with the same options resumes from it, exactly as if the
      fit had not stopped.
    """

    model: Model
    q: AbstractQ
    history: Array
    initial_elbo: Array
    num_iters: int = eqx.field(static=True)
    status: Status = eqx.field(static=True)
    num_increases: int = eqx.field(static=True)
    restart_elbos: Array | None = None
    state: Any = None

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

    def __repr__(self) -> str:
        from ._format import format_scalar

        restarts = "" if self.restart_elbos is None else f", restarts={len(self.restart_elbos)}"
        head = (
            f"FitResult(status={self.status}, num_iters={self.num_iters}, "
            f"elbo={format_scalar(self.elbo)}, initial_elbo={format_scalar(self.initial_elbo)}"
            f"{restarts})"
        )
        q = type(self.q).__name__
        model = textwrap.indent(repr(self.model), "  ").lstrip()
        return f"{head}\n  model: {model}\n  q: {q}"


def _unused_key() -> Key:
    """A key for fits that draw nothing, made without compiling a seeding function."""
    shape, dtype = _key_data_shape(str(jax.config.jax_default_prng_impl))
    return jr.wrap_key_data(np.zeros(shape, dtype))


@functools.cache
def _key_data_shape(impl: str) -> tuple:
    shape = jax.eval_shape(lambda: jr.key_data(jr.key(0)))
    return shape.shape, shape.dtype


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


_M_STEPS = "'exact', ej.GradientMStep(...), ej.StepwiseMStep(...) or ej.InertiaMStep(...)"


def _resolve_m_step(m_step: Any, model: Model) -> Any:
    if isinstance(m_step, str):
        if m_step != "exact":
            raise ValueError(f"m_step must be {_M_STEPS}, got {m_step!r}")
        # A model may solve its exact M-step its own way (DirichletMultinomialMixture: Newton).
        return model.default_m_step()
    if isinstance(m_step, (AbstractMStep, StepwiseMStep, InertiaMStep)):
        return m_step
    raise TypeError(f"m_step must be {_M_STEPS}, got {m_step!r}")


def _check_initial(initial: float) -> None:
    if not math.isfinite(initial):
        raise ValueError(
            "the initial model and q give a non-finite free energy "
            f"({initial}); check the initial parameters and that "
            "log_joint is finite on the data"
        )


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_tol(tol: Any) -> float:
    ok = isinstance(tol, (int, float, np.integer, np.floating)) and not isinstance(tol, bool)
    if not (ok and math.isfinite(float(tol)) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


def _initial_models(model: Any, restarts: int | None, key: Key | None) -> tuple[Any, Any]:
    """The starting model (batched over restarts when ``restarts``) and the solver key(s)."""
    if isinstance(model, Model):
        if restarts is None:
            return model, key
    elif not callable(model):
        check_model(model)  # raises the TypeError naming `model`
    if key is None:
        what = "restarts=R" if restarts is not None else "an initializer key -> model"
        raise ValueError(f"{what} needs a random key: pass key=jax.random.key(...)")
    if restarts is None:
        init_key, key = jr.split(key)
        return check_model(model(init_key)), key
    keys = jr.split(key, restarts)
    if isinstance(model, Model):
        batched = jax.tree_util.tree_map(
            lambda leaf: jnp.broadcast_to(leaf, (restarts, *leaf.shape)), model
        )
        return batched, keys
    models = eqx.filter_vmap(model)(keys)
    check_model(models)
    return models, keys


def _mesh_of(x: Data, sharding: Any) -> tuple[Any, str | None]:
    """The mesh and axis name the data are split over (``sharding=``, or ``x``'s own)."""
    if sharding is None:
        found = [
            leaf.sharding
            for leaf in jax.tree_util.tree_leaves(x)
            if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)
        ]
        if not found or found[0].mesh.size == 1 or not found[0].spec or found[0].spec[0] is None:
            return None, None
        sharding = found[0]
    if not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(
            "sharding must be a jax.sharding.NamedSharding(mesh, PartitionSpec(axis)), "
            f"got {sharding!r}"
        )
    spec = tuple(sharding.spec)
    if not spec or not isinstance(spec[0], str) or any(s is not None for s in spec[1:]):
        raise ValueError(
            "sharding must split the data's leading axis over one mesh axis, e.g. "
            f"PartitionSpec('data'); got {sharding.spec}"
        )
    return sharding.mesh, spec[0]


def _pad_q(q: AbstractQ, rows: int) -> AbstractQ:
    arrays, static = q.split_rows()
    return eqx.combine(_data.pad_rows(arrays, rows), static)


def _trim_rows(tree: Any, n: int, mesh: Any = None) -> Any:
    """The first ``n`` rows of every per-datum array (gathered from the mesh first), by one
    compiled call (slicing leaf by leaf compiled a program per leaf: ~0.2 s for an HMM's q)."""
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        tree = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, replicated) if eqx.is_array(a) and a.ndim else a, tree
        )
    if all(a.shape[0] == n for a in jax.tree_util.tree_leaves(tree) if eqx.is_array(a) and a.ndim):
        return tree
    return _first_rows(tree, n)


def _trim_q(q: AbstractQ, n: int, mesh: Any) -> AbstractQ:
    rows, rest = q.split_rows()
    return eqx.combine(_trim_rows(rows, n, mesh), rest)


@eqx.filter_jit
def _first_rows(tree: Any, n: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[:n] if eqx.is_array(a) and a.ndim else a, tree)


# ------------------------------------------------------------------ compiled entry points
def _first_segment(solver, model, q, data, key, tol, max_iters, restarts):
    """Solve (the first segment), pick the best restart, and the result's model and q."""

    def one(m, k):
        return solve(solver, m, q, data, k, tol, max_iters)

    if not restarts:
        loop = one(model, key)
        return loop, None, solver.result(loop.solver_state, data)
    loops = jax.vmap(one)(model, key)
    # The best restart by final F; a non-finite start never wins.
    objective = jnp.where(jnp.isfinite(loops.objective), loops.objective, jnp.inf)
    loop = jax.tree_util.tree_map(lambda leaf: leaf[jnp.argmin(objective)], loops)
    return loop, -loops.objective, solver.result(loop.solver_state, data)


def _more(solver, loop, data, tol, max_iters, stop_at):
    return run(solver, loop, data, tol, max_iters, stop_at)


def _result(solver, loop, data):
    return solver.result(loop.solver_state, data)


_ROW_FIELDS = {"q", "e_state", "features"}  # per-datum parts of a solver's state


def _leaf_spec(kind: str, path: tuple, leaf: Any, axis: str) -> Any:
    """Whether a leaf holds one row per datum (split over ``axis``) or is replicated."""
    from jax.sharding import PartitionSpec as P

    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    if kind == "data":
        rows = names[:1] in (["x"], ["weights"])
    elif kind == "loop":
        rows = names[:1] == ["solver_state"] and len(names) > 1 and names[1] in _ROW_FIELDS
    else:
        rows = kind == "rows"
    return P(axis) if rows and leaf.ndim else P()


def _specs(tree: Any, kinds: tuple, axis: str) -> tuple:
    return tuple(
        jax.tree_util.tree_map_with_path(
            lambda path, leaf, kind=kind: _leaf_spec(kind, path, leaf, axis), sub
        )
        for sub, kind in zip(tree, kinds, strict=True)
    )


def _kind(arg: Any) -> str:
    if isinstance(arg, _data.Dataset):
        return "data"
    if isinstance(arg, LoopState):
        return "loop"
    if isinstance(arg, AbstractQ):
        return "rows"
    return "replicated"


@eqx.filter_jit
def _call(fn: Callable, mesh: Any, *args: Any) -> Any:
    """``fn(*args)`` compiled; for sharded data, under ``shard_map``: each device runs the
    solver on its rows, and ``sum_over_data`` merges across the mesh axis."""
    if mesh is None:
        return fn(*args)
    data = next(a for a in args if isinstance(a, _data.Dataset))
    axis = data.axis_name
    dynamic, static = eqx.partition(args, eqx.is_array)
    # The outputs' structure, from the unsharded function on unsharded shapes.
    plain = tuple(
        dataclasses.replace(a, axis_name=None) if isinstance(a, _data.Dataset) else a for a in args
    )
    plain = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if eqx.is_array(a) else a, plain
    )
    shapes = eqx.filter_eval_shape(fn, *plain)
    is_struct = lambda v: isinstance(v, jax.ShapeDtypeStruct)
    out_dynamic, out_static = eqx.partition(shapes, is_struct)
    flat_out = _flatten_out(out_dynamic)

    def local(*d):
        out = fn(*eqx.combine(d, static))
        return _flatten_out(eqx.partition(out, eqx.is_array)[0])

    in_specs = _specs(dynamic, tuple(_kind(a) for a in args), axis)
    out_specs = _specs(flat_out, tuple(_kind(o) for o in flat_out), axis)
    # check_vma=False: the found-statistics evaluator binds primitives directly. It also
    # makes the transpose of psum a psum, so gradients are not yet right under sharding:
    # fit refuses sharded gradient steps (_check_shardable).
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    result = mapped(*dynamic)
    return eqx.combine(_unflatten_out(result, out_dynamic), out_static)


def _flatten_out(out: Any) -> tuple:
    """Outputs as a flat tuple of loops, q's and others (nested tuples opened)."""
    if isinstance(out, tuple) and not isinstance(out, eqx.Module):
        return tuple(item for o in out for item in _flatten_out(o))
    return (out,)


def _unflatten_out(flat: tuple, like: Any) -> Any:
    items = iter(flat)

    def build(node):
        if isinstance(node, tuple) and not isinstance(node, eqx.Module):
            return tuple(build(n) for n in node)
        return next(items)

    return build(like)


def fit(
    model: Model | Callable[[Key], Model],
    x: Data,
    *,
    q: AbstractQ | None = None,
    e_step: str | AbstractEStep = "exact",
    m_step: str | AbstractMStep = "exact",
    prior: Prior = None,
    max_iters: int = 500,
    tol: float = 1e-6,
    key: Key | None = None,
    frozen: Callable[[Model], Any] | None = None,
    restarts: int | None = None,
    sharding: Any = None,
    batch_size: int | None = None,
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
      ``q=ej.Categorical()`` or ``ej.Gaussian()`` with ``e_step=ej.GradientEStep(...)``;
    - online EM: ``m_step=ej.StepwiseMStep()``, ``ej.InertiaMStep()`` or (stochastic EM) a
      ``GradientMStep`` with ``batch_size=B``: one M-step per minibatch, one iteration per
      pass over the data;
    - data that do not fit on the device: ``x=ej.Stream(memmap, batch_size=B)`` (exact EM
      read batch by batch, or online EM with an online ``m_step``).

    **Arguments:**

    - `model`: the initial ``ej.Model``, or an initializer ``key -> model`` (for example
      ``lambda k: GaussianMixture.initialize(k, x, 8)``; it then needs ``key``), or a
      ``FitResult`` to resume: ``max_iters`` more iterations from its state, with the same
      data and options, identical to a fit that had not stopped.
    - `x`: data, leading axis of length $N$. Floating data are cast to the model's dtype.
      Or an ``ej.Stream`` (or a generator of batches, a one-shot stream): then each
      iteration reads it once, ``restarts`` and ``sharding`` do not apply, and the result's
      ``q`` is ``ExactPosterior()``.
    - `q`: recognition family. Default: the model's ``default_q()`` for data in memory
      (``ej.ExactPosterior()``, except for models such as LDA whose posterior is out of
      reach), ``ej.ExactPosterior()`` for online and stream fits.
    - `e_step`: ``"exact"`` or a ``GradientEStep``.
    - `m_step`: ``"exact"``, a ``GradientMStep``, ``NewtonMStep``, or an online M-step
      (``StepwiseMStep``, ``InertiaMStep``; these need the exact E-step). A model may say
      how ``"exact"`` is solved (``default_m_step()``: ``NewtonMStep`` for the
      Dirichlet-multinomial mixture).
    - `prior`: ``prior(model) -> log p(θ)``, a scalar; ``None`` for maximum likelihood.
    - `max_iters`: at most this many iterations.
    - `tol`: stop when $|F_t - F_{t-1}| <$ ``tol`` (per datum). A fit that reaches
      ``max_iters`` first warns with ``ej.ConvergenceWarning`` (silence it with
      ``warnings.filterwarnings("ignore", category=ej.ConvergenceWarning)``); ``tol=0``
      runs exactly ``max_iters`` iterations, without the warning.
    - `key`: JAX random key, required for stochastic steps (Monte Carlo expectations);
      deterministic fits need none.
    - `frozen`: ``model -> parameter(s)`` to hold fixed, as ``eqx.tree_at``'s ``where``
      (``lambda m: m.loc`` or ``lambda m: (m.loc, m.weight_logits)``). Gradient and
      numerical M-steps move only the others; a closed form is used when the model's
      ``maximize`` honours the frozen set (``Model.honours_frozen``: the Gaussian mixture
      does for any whole field), else the M-step is solved numerically.
    - `restarts`: run ``R`` fits as one vmapped compiled call and return the best by final
      ELBO (``restart_elbos`` holds every restart's). Restart ``r`` starts from
      ``model(keys[r])`` (or ``model`` itself) with ``key=keys[r]``, where
      ``keys = jax.random.split(key, R)``: the same as ``fit(model(keys[r]), x, key=keys[r])``.
    - `sharding`: a ``NamedSharding(mesh, PartitionSpec(axis))`` to fit data-parallel over
      ``axis`` (any N: the data are padded per device). Data already placed with such a
      sharding are fitted data-parallel without it. Each device reduces its rows; statistics,
      F and gradients are merged across the mesh, so the result equals the unsharded fit.
    - `batch_size`: rows per minibatch of an online fit (with an online ``m_step``, or a
      ``GradientMStep``: stochastic EM); the order is drawn from ``key`` each pass, and the
      N real rows split into ``ceil(N / batch_size)`` minibatches of near-equal size.
      ``None`` (default): the whole data.
    - `progress`: show a tqdm bar (the loop runs in ~100 compiled chunks; no sync per iteration).
    - `throw`: raise ``RuntimeError`` instead of warning when the fit goes non-finite.

    **Returns:** a ``FitResult`` (``.model``, ``.q``, ``.history``, ``.status``, ``.converged``,
    ``.num_iters``).

    ```python
    res = ej.fit(ej.models.GaussianMixture.initialize(key, x, 3), x)
    res.model.means, res.history[-1]
    ```
    """
    previous = None
    if isinstance(model, FitResult):  # resume
        previous, model = model, model.model
        if previous.state is None:
            raise ValueError("this FitResult holds no solver state to resume from")
        if restarts is not None or progress:
            raise ValueError("resuming continues one fit: no restarts, no progress bar")
    if restarts is not None:
        restarts = _check_count("restarts", restarts)
    model, key = _initial_models(model, restarts, key)
    first = model if restarts is None else jax.tree_util.tree_map(lambda a: a[0], model)
    first = check_model(first)
    check_has_parameters(first)
    max_iters = _check_count("max_iters", max_iters)
    tol = _check_tol(tol)
    if prior is not None and not callable(prior):
        raise TypeError(
            f"prior must be a callable prior(model) -> log p(theta), or None; got {prior!r}"
        )
    q_default = q is None
    q = ExactPosterior() if q is None else q
    if not isinstance(q, AbstractQ):
        raise TypeError(
            f"q must be an elbo_jax recognition family such as ej.ExactPosterior(), got {q!r}"
        )
    stream = _as_stream(x)
    reader = None
    if stream is not None:
        if restarts is not None or sharding is not None or batch_size is not None:
            raise ValueError(
                "a stream is fitted as one fit on one device, in the stream's own batches: "
                "no restarts=, sharding= or batch_size= (set Stream(batch_size=...))"
            )
        if stream.shuffle and key is None:
            raise ValueError("Stream(shuffle=True) draws each pass's order from key=: pass one")
        reader = BatchReader(stream, lambda raw: prepare_data(first, raw), float_dtype(first))
        x, _ = reader.first(key)
        mesh, axis = None, None
    else:
        mesh, axis = _mesh_of(x, sharding)
        x = prepare_data(first, x)
    check_log_joint(first, x)
    n = num_data(x)
    m_step = _resolve_m_step(m_step, first)
    if batch_size is not None:
        batch_size = _check_count("batch_size", batch_size)
        batch_size = None if batch_size >= n else batch_size
        if key is None and batch_size is not None and previous is None:  # (resumed: its own)
            raise ValueError(
                "minibatches are drawn in a random order each pass: pass key=jax.random.key(...)"
            )
    if q_default:
        q = first.default_q()
    amortized = isinstance(q, Amortized)
    online = not amortized and (
        isinstance(m_step, (StepwiseMStep, InertiaMStep))
        or batch_size is not None
        or (stream is not None and not isinstance(m_step, (ExactMStep, NewtonMStep)))
    )
    if q_default and not amortized and (online or stream is not None):
        q = ExactPosterior()  # each batch's: the model's exact_posterior hook
    q.check(first.latent, n)
    e_step = _resolve_e_step(e_step, q)
    if key is None:
        if q.needs_key:
            raise ValueError(
                f"q={type(q).__name__}(...) takes Monte Carlo expectations, so fit needs a "
                "random key: pass key=jax.random.key(...)"
            )
        key = _unused_key()  # deterministic steps draw nothing from it

    if isinstance(e_step, _OptaxStep):
        q_shape = eqx.filter_eval_shape(q.initialize, first, x, key=_unused_key())
        params, _ = eqx.partition(q_shape, _is_inexact_struct)
        if not jax.tree_util.tree_leaves(params):
            raise TypeError(
                f"e_step=GradientEStep needs a q with continuous parameters, but {type(q).__name__} "
                f"over {first.latent!r} has none; use ej.Categorical() or ej.Gaussian()"
            )
    if frozen is not None:
        if online or not hasattr(m_step, "trainable"):
            raise TypeError(
                f"frozen= needs an M-step that moves selected parameters, got {m_step!r}"
            )
        m_step = dataclasses.replace(m_step, trainable=_trainable(first, frozen))
    dtype = float_dtype(first)
    if amortized:
        solver, chunk_size = _amortized_solver(
            first, x, q, e_step, m_step, prior, batch_size, stream is not None
        )
    elif online:
        solver, chunk_size = _online_solver(first, x, q, e_step, m_step, prior, batch_size)
    else:
        solver, chunk_size = _choose_solver(first, x, q, e_step, m_step, prior)
    if stream is not None and not (online or isinstance(solver, StatisticsEM)):
        raise NotImplementedError(
            "a stream is fitted by exact EM with statistics (a closed-form M-step, or one "
            "elbo_jax finds in log_joint) or by an online M-step (ej.StepwiseMStep(), "
            "ej.InertiaMStep(), ej.GradientMStep(...)); "
            f"{type(first).__name__} with these options needs the data in memory"
        )
    if mesh is not None and online:
        raise NotImplementedError("online fits (minibatches) on sharded data are not supported yet")
    if mesh is not None and not (
        isinstance(solver, StatisticsEM)
        or (
            isinstance(e_step, ExactEStep)
            and isinstance(m_step, ExactMStep)
            and uses_closed_form(first, prior, m_step.trainable)
        )
    ):
        raise NotImplementedError(
            "sharded fits run exact EM with a closed-form or found M-step; gradient and "
            "numerical M-steps and gradient E-steps on sharded data are not supported yet"
        )
    if stream is None:
        data = _data.make_dataset(x, dtype, chunk_size, mesh, axis)
        q = _pad_q(q, data.weights.shape[0])
    if isinstance(e_step, _OptaxStep):
        q_shape = eqx.filter_eval_shape(q.initialize, first, data.x, key=_unused_key())
        params, _ = eqx.partition(q_shape, _is_inexact_struct)
        solver = eqx.tree_at(lambda s: s.e_step, solver, e_step.hashable(params))
    if amortized:
        params, _ = joint_parameters(m_step, first, q)
        solver = eqx.tree_at(lambda s: s.m_step, solver, m_step.hashable(params))
    elif isinstance(m_step, _OptaxStep):
        params, _ = _split_params(first, getattr(m_step, "trainable", None))
        solver = eqx.tree_at(lambda s: s.m_step, solver, m_step.hashable(params))
    if prior is not None:
        solver = eqx.tree_at(lambda s: s.prior, solver, _compiled_prior(prior, first))

    tol_arr = np.asarray(tol, dtype)
    elbos = None
    if stream is not None:
        if previous is not None:
            _check_resumable(
                previous,
                eqx.filter_eval_shape(_stream_start, solver, model, q, reader, key, chunk_size),
            )
        loop, pieces, fitted = fit_stream(
            solver,
            model,
            q,
            reader,
            key=key,
            tol=tol_arr,
            max_iters=max_iters,
            chunk_rows=chunk_size,
            num_data=stream.num_data,
            previous=None if previous is None else _running(previous.state),
            progress=progress,
        )
        history = pieces if previous is None else [np.asarray(previous.history), *pieces]
        result_q = ExactPosterior()
    elif previous is not None:
        loop = _resumable(previous, solver, model, q, data, key)
        total = previous.num_iters + max_iters
        loop, pieces = _continue(solver, loop, data, tol_arr, total, mesh)
        history = [np.asarray(previous.history), *pieces]
        fitted, result_q = _call(_result, mesh, solver, loop, data)
    elif progress:
        if restarts is not None:
            raise ValueError("progress=True shows one fit; it cannot be combined with restarts")
        loop, history = _fit_with_progress(solver, model, q, data, key, tol_arr, max_iters, mesh)
        fitted, result_q = _call(_result, mesh, solver, loop, data)
    else:
        iters = np.asarray(max_iters, np.int32)
        loop, elbos, (fitted, result_q) = _call(
            _first_segment, mesh, solver, model, q, data, key, tol_arr, iters, restarts
        )
        history = [np.asarray(loop.history)[: int(loop.iteration)]]
        if int(loop.status) == Status.RUNNING:  # more than HISTORY_SIZE iterations
            loop, pieces = _continue(solver, loop, data, tol_arr, max_iters, mesh)
            history += pieces
            fitted, result_q = _call(_result, mesh, solver, loop, data)
    _check_initial(float(loop.initial_objective))

    num_iters = int(loop.iteration)
    status = Status(int(loop.status))
    num_increases = int(loop.num_increases)
    if status == Status.NONFINITE:
        msg = f"fit stopped after {num_iters} iterations: {status.message}"
        if throw:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if status == Status.MAX_ITERS and tol > 0:
        warnings.warn(
            f"fit stopped at max_iters ({num_iters} iterations) before the free energy per datum settled "
            f"to within tol={tol:g}; raise max_iters or tol (the model returned is the last "
            "iterate). Silence with warnings.filterwarnings('ignore', "
            "category=elbo_jax.ConvergenceWarning)",
            ConvergenceWarning,
            stacklevel=2,
        )
    if num_increases:
        warnings.warn(
            f"exact EM raised the free energy beyond rounding in {num_increases} of {num_iters} "
            "iterations; a model hook (log_joint_table, posterior, maximize) may disagree with "
            "log_joint, or the problem is numerically ill-conditioned",
            RuntimeWarning,
            stacklevel=2,
        )
    warn_newton_failures(loop, None if previous is None else previous.state, stacklevel=2)
    return FitResult(
        model=fitted,
        q=result_q if stream is not None else _trim_q(result_q, n, mesh),
        history=jnp.asarray(np.concatenate(history) if history else np.zeros((0,), dtype)),
        initial_elbo=jnp.asarray(-np.asarray(loop.initial_objective)),  # no compiled negation
        num_iters=num_iters,
        status=status,
        num_increases=num_increases,
        restart_elbos=None if elbos is None else jnp.asarray(elbos),
        state=loop,
    )


def _continue(
    solver, loop, data, tol, max_iters: int, mesh, until: int | None = None
) -> tuple[LoopState, list]:
    """Run the loop on from ``loop.iteration`` until it stops (or pauses at ``until``), in
    segments that end at multiples of ``HISTORY_SIZE``, and the ELBO of each iteration run,
    copied out of the history buffer after each segment."""
    pieces = []
    limit = np.asarray(max_iters, np.int32)
    until = max_iters if until is None else until
    while int(loop.status) == Status.RUNNING:
        done = int(loop.iteration)
        if done >= until:
            break
        stop_at = np.asarray(min((done // HISTORY_SIZE + 1) * HISTORY_SIZE, until), np.int32)
        loop = _call(_more, mesh, solver, loop, data, tol, limit, stop_at)
        now = int(loop.iteration)
        start = done % HISTORY_SIZE
        pieces.append(np.asarray(loop.history)[start : start + now - done])
        if now == done:
            break
    return loop, pieces


def _resumable(previous: "FitResult", solver, model, q, data, key) -> LoopState:
    """The loop state of ``previous``, checked against what this call would start from (the
    same solver and the same padded data shapes), and set running again."""
    from ._solvers._base import init as start

    # As in _call: the unsharded start on plain shapes (no mesh axis to reduce over, no
    # sharding in the types), whose shapes are those of the sharded loop state.
    plain = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if eqx.is_array(a) else a,
        (model, q, dataclasses.replace(data, axis_name=None), key),
    )
    _check_resumable(previous, eqx.filter_eval_shape(start, solver, *plain))
    return _running(previous.state)


def _check_resumable(previous: "FitResult", shapes: Any) -> None:
    have = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), previous.state)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes)
    if jax.tree_util.tree_structure(have) != jax.tree_util.tree_structure(want) or (
        jax.tree_util.tree_leaves(have) != jax.tree_util.tree_leaves(want)
    ):
        raise ValueError(
            "cannot resume: this fit's options or data (its size, after padding) differ from "
            "those of the FitResult passed as `model`; pass the same q, steps and data"
        )


def _running(loop: LoopState) -> LoopState:
    return eqx.tree_at(lambda s: s.status, loop, jnp.asarray(Status.RUNNING, jnp.int32))


def _stream_start(solver, model, q, reader, key, chunk_rows):
    """The loop state a fit over ``reader``'s stream starts from (for shapes)."""
    from ._streamed import StreamFit, _init

    driver = StreamFit(solver, reader, key, chunk_rows, reader.stream.num_data)
    return _init(solver, model, q, driver.like(), key)


def _as_stream(x: Any) -> Stream | None:
    """``x`` as a ``Stream`` when it is one, or an iterator of batches (a generator)."""
    if isinstance(x, Stream):
        return x
    if isinstance(x, Iterator):
        return Stream(x)
    return None


_FROZEN = object()


def _trainable(model: Model, frozen: Callable) -> tuple:
    """One bool per leaf of ``model``: False where ``frozen(model)`` selects it."""
    if not callable(frozen):
        raise TypeError(f"frozen must be a function model -> parameter(s), got {frozen!r}")
    try:
        marked = eqx.tree_at(
            frozen,
            model,
            replace_fn=lambda node: jax.tree_util.tree_map(lambda _: _FROZEN, node),
        )
    except Exception as error:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(
            "frozen must select parameters of the model, e.g. frozen=lambda m: m.loc; "
            f"selecting them failed: {error}"
        ) from error
    flags = tuple(leaf is not _FROZEN for leaf in jax.tree_util.tree_leaves(marked))
    if all(flags):
        raise ValueError("frozen=... selected no parameter of the model")
    return flags


def _compiled_prior(prior: Callable, model: Model) -> Callable:
    """A plain function ``prior(model)`` as a ``Traced`` program, so that a fresh lambda
    (or one with another constant) does not compile a new fit. Modules (such as
    ``GaussianMixturePrior``) are pytrees already and stay as they are; a prior that cannot
    be traced on its own stays as it is too (it then compiles per function object)."""
    if isinstance(prior, eqx.Module):
        return prior
    try:
        return Traced(prior, model)
    except Exception:  # noqa: BLE001 - any failure: keep the function, still correct
        return prior


def _amortized_solver(
    model: Model,
    x: Data,
    q: Amortized,
    e_step: Any,
    m_step: Any,
    prior: Prior,
    batch_size: Any,
    stream: bool,
) -> tuple[JointGradient, int]:
    """The joint gradient solver for an amortized q, checked against the steps and the encoder."""
    if not isinstance(e_step, ExactEStep):
        raise TypeError(
            "q=ej.Amortized(...) is trained jointly with the model by the m_step's optimizer; "
            "leave e_step at its default"
        )
    if not isinstance(m_step, GradientMStep):
        raise TypeError(
            "q=ej.Amortized(...) is trained jointly with the model by gradient steps: pass "
            f"m_step=ej.GradientMStep(optax.adam(1e-3)), got {m_step!r}"
        )
    q.check_encoder(model, x)
    if stream:
        raise NotImplementedError(
            "q=ej.Amortized(...) trains on data in memory, in minibatches (batch_size=); "
            "streams are not supported yet"
        )
    return JointGradient(m_step, prior, batch_size=batch_size), 0


def _online_solver(
    model: Model, x: Data, q: AbstractQ, e_step: Any, m_step: Any, prior: Prior, batch_size: Any
) -> tuple[OnlineEM, int]:
    """The online solver for ``m_step`` (stepwise, inertia, or a gradient M-step on
    minibatches: stochastic EM), checked against the model, and the rows per chunk of its
    passes over the whole data."""
    if not (isinstance(q, ExactPosterior) and isinstance(e_step, ExactEStep)):
        raise NotImplementedError(
            "online fits take the exact posterior of each minibatch: use q=ej.ExactPosterior() "
            "and e_step='exact' with batch_size= or an online m_step"
        )
    if isinstance(m_step, (ExactMStep, NewtonMStep)):
        raise ValueError(
            "batch_size= needs an M-step that learns from one minibatch at a time: "
            "m_step=ej.StepwiseMStep(), ej.InertiaMStep() or ej.GradientMStep(...) (stochastic EM)"
        )
    name = type(m_step).__name__
    closed_form = uses_closed_form(model, prior, None)
    split = None
    if isinstance(m_step, StepwiseMStep) and not closed_form:
        split = affine_split(model, x)
        if split is None:
            raise TypeError(
                f"StepwiseMStep needs statistics: {type(model).__name__} has no closed-form "
                "M-step for this prior and elbo_jax found no statistics in its log_joint; use "
                "ej.InertiaMStep() or ej.GradientMStep(...) with batch_size="
            )
    has_own = has_complete_data_statistics(model)
    if isinstance(m_step, InertiaMStep):
        closed_form = closed_form and has_own
    if isinstance(m_step, InertiaMStep) and not closed_form:
        if isinstance(model.latent, (Chain, GaussianChain)):
            raise TypeError(
                f"{name} needs the model's complete-data statistics (complete_data_statistics) "
                f"for a sequence model; {type(model).__name__} has none. Use "
                "ej.StepwiseMStep() or ej.GradientMStep(...)"
            )
        if not callable(getattr(model, "sample", None)):
            raise TypeError(
                f"{name} needs the model's complete-data statistics "
                "(complete_data_statistics) or, for the finite-sample approximation, "
                f"model.sample(key, n) -> (x, z); {type(model).__name__} has neither. "
                "Use ej.StepwiseMStep() or ej.GradientMStep(...)"
            )
    seeded = isinstance(m_step, StepwiseMStep) and closed_form and has_own
    solver = OnlineEM(
        m_step, prior, closed_form=closed_form, split=split, batch_size=batch_size, seeded=seeded
    )
    if not (closed_form or split is not None):
        return solver, 0
    plan = StatisticsEM(prior, ExactMStep(), closed_form=closed_form, split=split)
    return solver, _statistics_chunk_rows(plan, model, x)


def _choose_solver(
    model: Model, x: Data, q: AbstractQ, e_step: Any, m_step: Any, prior: Prior
) -> tuple[AbstractSolver, int]:
    """The solver, and the rows per chunk for its passes (0: one chunk)."""
    closed_form, split = _statistics_plan(model, x, q, e_step, m_step, prior)
    if closed_form or split is not None:
        solver = StatisticsEM(prior, m_step, closed_form=closed_form, split=split)
        return solver, _statistics_chunk_rows(solver, model, x)
    return CoordinateDescent(e_step, m_step, prior), 0


_CHUNK_ROWS: dict[Any, int] = {}


def _statistics_chunk_rows(solver: StatisticsEM, model: Model, x: Data) -> int:
    """``_data.chunk_rows`` of the solver's statistics pass, cached per model structure and
    data shape (reading the pass's jaxpr takes tens of milliseconds)."""
    dtype = float_dtype(model)

    def rows():
        return _data.chunk_rows(lambda data: solver.pass_over(model, data), x, dtype)

    key = shape_key(model, datum_shapes(x))
    if key is not None:
        key = (key, solver.closed_form, solver.split, jax.default_backend())
    return remembered(_CHUNK_ROWS, key, rows)


def _is_exact_em(model: Model, q: AbstractQ, e_step: Any, m_step: Any) -> bool:
    return (
        isinstance(q, ExactPosterior)
        and isinstance(e_step, ExactEStep)
        and isinstance(m_step, ExactMStep)
        and m_step.use_closed_form
        and not isinstance(model.latent, Real)
    )


def _statistics_plan(
    model: Model, x: Data, q: AbstractQ, e_step: Any, m_step: Any, prior: Prior
) -> tuple[bool, Any]:
    """``(closed_form, split)`` for exact EM, which runs as statistics passes when either is
    set: the model's closed-form M-step (Discrete and chain latents), and, for a Discrete
    latent, the ``log_joint`` split into data features (the table from features computed
    once; with no closed form, also the statistics). ``(False, None)`` otherwise: the fit
    carries q."""
    if not _is_exact_em(model, q, e_step, m_step):
        return False, None
    closed_form = uses_closed_form(model, prior, m_step.trainable)
    if not isinstance(model.latent, Discrete):
        return closed_form, None
    return closed_form, affine_split(model, x)


def _fit_with_progress(solver, model, q, data, key, tol, max_iters: int, mesh):
    """The same loop in ~100 compiled segments, with a tqdm bar updated between them."""
    from tqdm.auto import tqdm

    chunk = max(1, min(math.ceil(max_iters / 100), HISTORY_SIZE))
    zero = np.asarray(0, np.int32)
    # The start (no iteration yet: max_iters=0 stops the loop before its first iteration).
    loop, _, _ = _call(_first_segment, mesh, solver, model, q, data, key, tol, zero, None)
    history = []
    with tqdm(total=max_iters, desc="elbo_jax.fit", unit="it") as bar:
        while int(loop.status) == Status.RUNNING:
            done = int(loop.iteration)
            loop, pieces = _continue(
                solver, loop, data, tol, max_iters, mesh, until=min(done + chunk, max_iters)
            )
            history += pieces
            now = int(loop.iteration)
            bar.update(now - done)
            bar.set_postfix(elbo=f"{-float(loop.objective):.6g}")
            if now == done or now >= max_iters:
                break
        # A fit that stops early ends the bar there (at 100 %), not at now/max_iters.
        bar.total = int(loop.iteration)
        bar.refresh()
    return loop, history
