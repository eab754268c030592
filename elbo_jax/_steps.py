r"""E-steps and M-steps: each lowers ``free_energy`` over q (E) or over $\theta$ (M)."""

import abc
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import optax

from . import _optax
from ._custom_types import Key, LogTable, Stats
from ._data import Dataset
from ._model import Model
from ._objective import Prior, _free_energy, as_dataset
from ._q import AbstractQ


def _split_params(tree: Any, trainable: tuple | None = None) -> tuple[Any, Any]:
    """The floating-point arrays of ``tree`` that steps move (all, or those flagged in
    ``trainable``, one bool per leaf of ``tree``), and the rest."""
    if trainable is None:
        return eqx.partition(tree, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    spec = [eqx.is_inexact_array(leaf) and t for leaf, t in zip(leaves, trainable, strict=True)]
    return eqx.partition(tree, jax.tree_util.tree_unflatten(treedef, spec))


def frozen_tree(model: Model, trainable: tuple | None) -> Any:
    """``True`` at the model's frozen leaves (a pytree like the model), or None."""
    if trainable is None or all(trainable):
        return None
    treedef = jax.tree_util.tree_structure(model)
    return jax.tree_util.tree_unflatten(treedef, [not t for t in trainable])


def uses_closed_form(model: Model, prior: Prior, trainable: tuple | None) -> bool:
    """Whether the M-step is the model's closed form: it has one for ``prior`` and, with
    frozen parameters, its ``maximize`` honours them (``Model.honours_frozen``)."""
    if not model.has_closed_form(prior):
        return False
    frozen = frozen_tree(model, trainable)
    return frozen is None or bool(model.honours_frozen(frozen))


def maximize_closed_form(model: Model, stats: Stats, prior: Prior, trainable: tuple | None):
    """``model.maximize``, told which parameters are frozen, with those kept exactly."""
    frozen = frozen_tree(model, trainable)
    if frozen is None:
        return model.maximize(stats, prior)
    new = model.maximize(stats, prior, frozen=frozen)
    moved, _ = _split_params(new, trainable)
    _, kept = _split_params(model, trainable)
    return eqx.combine(moved, kept)


def _maybe_fold(key: Key | None, i: Any) -> Key | None:
    return None if key is None else jr.fold_in(key, i)


def _optax_steps(
    optimizer: Any, num_steps: int, loss: Any, params: Any, opt_state: Any, key: Key | None
):
    """``num_steps`` optax updates of ``params`` on ``loss(params, key)``, in a ``fori_loop``."""
    loss = _optax.user_promotion(loss)

    def body(i, carry):
        params, opt_state = carry
        step_key = _maybe_fold(key, i)
        value_fn = lambda p: loss(p, step_key)
        value, grads = jax.value_and_grad(value_fn)(params)
        updates, opt_state = _optax.update(optimizer, grads, opt_state, params, value, value_fn)
        return optax.apply_updates(params, updates), opt_state

    with _optax.library_promotion():
        return jax.lax.fori_loop(0, num_steps, body, (params, opt_state))


class _OptaxStep(eqx.Module):
    optimizer: Any
    num_steps: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if (
            not isinstance(self.num_steps, int)
            or isinstance(self.num_steps, bool)
            or self.num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        compiled = (_optax.HashableOptimizer, _optax.TracedOptimizer)
        if not isinstance(self.optimizer, (optax.GradientTransformation, *compiled)):
            raise TypeError(
                "optimizer must be an optax.GradientTransformation such as optax.adam(1e-2), "
                f"got {self.optimizer!r}"
            )

    def init_optimizer(self, params: Any) -> Any:
        """The optimizer's state for ``params``."""
        with _optax.library_promotion():
            return self.transform.init(params)

    @property
    def transform(self) -> Any:
        opt = self.optimizer
        return opt.optimizer if isinstance(opt, _optax.HashableOptimizer) else opt

    def hashable(self, params: Any) -> "_OptaxStep":
        """This step with its optimizer in a form jit compares by computation (``_optax``)."""
        optimizer = _optax.compiled_optimizer(self.optimizer, params)
        return dataclasses.replace(self, optimizer=optimizer)


# ---------------------------------------------------------------------------- E-steps
class AbstractEStep(eqx.Module):
    """Lowers F over q with the model fixed."""

    exact: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def init(self, q: AbstractQ) -> Any:
        """The step's own state (optimizer state), from the initial q."""

    @abc.abstractmethod
    def step(
        self,
        model: Model,
        q: AbstractQ,
        state: Any,
        data: Dataset,
        *,
        key: Key | None,
        table: LogTable | None,
    ) -> tuple[AbstractQ, Any]:
        """One E-step: a new q and step state."""


class ExactEStep(AbstractEStep):
    r"""The exact E-step within q's family, $q \leftarrow \arg\min_q F(q, \theta)$.

    For ``ExactPosterior`` and ``Categorical``: the posterior; for ``PointMass``: its mode.
    Selected by ``e_step="exact"``.
    """

    exact = True

    def init(self, q):
        return None

    def step(self, model, q, state, data, *, key, table):
        return q.exact_update(model, as_dataset(data, model).x, table=table), state


class GradientEStep(_OptaxStep, AbstractEStep):
    r"""A partial E-step: ``num_steps`` steps of an optax ``optimizer`` on $\nabla_q F(q, \theta)$.

    Works with every q that has continuous parameters: ``ej.Categorical()`` (logits),
    ``ej.Gaussian()`` (mean and scale), ``ej.PointMass()`` over a ``Real`` latent. The
    optimizer state carries over from one EM iteration to the next.

    ```python
    ej.fit(model, x, q=ej.Gaussian(), e_step=ej.GradientEStep(optax.adam(1e-2), num_steps=20))
    ```
    """

    exact = False

    def init(self, q):
        params, _ = _split_params(q)
        return self.init_optimizer(params)

    def step(self, model, q, state, data, *, key, table):
        data = as_dataset(data, model)
        params, static = _split_params(q)
        table = None if table is None else jax.lax.stop_gradient(table)
        model = jax.lax.stop_gradient(model)

        def loss(p, k):
            return _free_energy(model, eqx.combine(p, static), data, key=k, table=table)

        params, state = _optax_steps(self.transform, self.num_steps, loss, params, state, key)
        return eqx.combine(params, static), state


# ---------------------------------------------------------------------------- M-steps
class AbstractMStep(eqx.Module):
    r"""Lowers F over $\theta$ with q fixed."""

    exact: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def init(self, model: Model) -> Any:
        """The step's own state (optimizer state), from the initial model."""

    @abc.abstractmethod
    def step(
        self,
        model: Model,
        q: AbstractQ,
        state: Any,
        data: Dataset,
        *,
        key: Key | None,
        prior: Prior,
    ) -> tuple[Model, Any]:
        """One M-step: a new model and step state."""


def _m_loss(static: Any, q: AbstractQ, data: Dataset, prior: Prior) -> Any:
    def loss(params, key):
        return _free_energy(eqx.combine(params, static), q, data, key=key, prior=prior)

    return loss


def expected_statistics(model: Model, q: AbstractQ, data: Dataset) -> Stats:
    r"""$\sum_n w_n E_{q_n}[s(x_n, z)]$: the model's statistics, merged over chunks and shards."""
    q_arrays, q_static = q.split_rows()

    def chunk(values, weights):
        x, q_chunk = values
        return model.sufficient_statistics(x, eqx.combine(q_chunk, q_static), weights=weights)

    return data.sum(chunk, q_arrays)


class ExactMStep(AbstractMStep):
    r"""The exact M-step, $\theta \leftarrow \arg\min_\theta F(q, \theta)$.

    The model's closed form when ``model.has_closed_form(prior)`` (and ``use_closed_form``);
    otherwise the problem is solved numerically inside the compiled step by L-BFGS (optax, zoom line search),
    started from the current $\theta$ and run until the objective stops decreasing
    (relative change below ``tol``, default a few machine epsilons) or ``max_steps``.
    Selected by ``m_step="exact"``.
    """

    max_steps: int = eqx.field(static=True, default=500)
    tol: float | None = eqx.field(static=True, default=None)
    use_closed_form: bool = eqx.field(static=True, default=True)
    # One bool per leaf of the model: False for a frozen parameter (set by fit(frozen=...)).
    trainable: tuple | None = eqx.field(static=True, default=None)
    exact = True

    def __check_init__(self):
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")

    def init(self, model):
        return None

    def step(self, model, q, state, data, *, key, prior):
        data = as_dataset(data, model)
        if self.use_closed_form and uses_closed_form(model, prior, self.trainable):
            stats = expected_statistics(model, q, data)
            return maximize_closed_form(model, stats, prior, self.trainable), state
        params, static = _split_params(model, self.trainable)
        q = jax.lax.stop_gradient(q)
        loss = _m_loss(static, q, data, prior)
        params = minimize_lbfgs(
            lambda p: loss(p, key), params, max_steps=self.max_steps, tol=self.tol
        )
        return eqx.combine(params, static), state


def minimize_lbfgs(fn: Any, params: Any, *, max_steps: int, tol: float | None = None) -> Any:
    """Minimise ``fn(params)`` by optax L-BFGS in a bounded ``while_loop``.

    Stops when three steps in a row lower ``fn`` by less than ``tol * (1 + |fn|)``, when the
    largest gradient entry is below ``eps**0.75 * (1 + |fn|)``, or after ``max_steps``. A step that would make
    ``fn`` non-finite or larger is not taken, so the result never has a larger value.
    """
    leaves = jax.tree_util.tree_leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.zeros(()).dtype
    if tol is None:
        tol = 4 * float(jnp.finfo(dtype).eps)
    dtypes = jax.tree_util.tree_map(lambda leaf: leaf.dtype, params)

    # optax's zoom line search evaluates some trial points in the default float dtype
    # (float64 under x64) even for float32 parameters; the user's model sees its own.
    def fn_in_own_dtype(p):
        return fn(jax.tree_util.tree_map(lambda leaf, dtype: leaf.astype(dtype), p, dtypes))

    with _optax.library_promotion():
        return _minimize_lbfgs(_optax.user_promotion(fn_in_own_dtype), params, max_steps, tol)


def _minimize_lbfgs(fn: Any, params: Any, max_steps: int, tol: float) -> Any:
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fn)
    init_value = fn(params)

    gtol = float(jnp.finfo(jnp.result_type(init_value)).eps) ** 0.75

    def cond(carry):
        _, _, i, _, done, _ = carry
        return (i < max_steps) & ~done

    def body(carry):
        params, opt_state, i, value, _, stalled = carry
        value_now, grads = value_and_grad(params, state=opt_state)
        updates, new_state = opt.update(
            grads, opt_state, params, value=value_now, grad=grads, value_fn=fn
        )
        new_params = optax.apply_updates(params, updates)
        new_value = optax.tree_utils.tree_get(new_state, "value")
        good = jnp.isfinite(new_value) & (new_value <= value)
        # no optax norm: tree_l2_norm warns (deprecated) from optax 0.2.5, tree_norm is newer
        largest = jnp.max(
            jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree_util.tree_leaves(grads)])
        )
        flat = largest <= gtol * (1 + jnp.abs(value_now))
        # A decrease within rounding is not yet convergence: near the optimum the decrease
        # is quadratic in the distance, so a few more (superlinear) steps still move the
        # parameters a long way; stop after three such steps in a row, or on a flat gradient.
        small = (value - new_value) <= tol * (1 + jnp.abs(new_value))
        stalled = jnp.where(small, stalled + 1, 0)
        done = ~good | flat | ((i >= 3) & (stalled >= 3))
        params, opt_state, value = jax.tree_util.tree_map(
            lambda new, old: jnp.where(good, new, old),
            (new_params, new_state, new_value),
            (params, opt_state, value),
        )
        return params, opt_state, i + 1, value, done, stalled

    carry = (params, opt.init(params), jnp.array(0), init_value, jnp.array(False), jnp.array(0))
    params, *_ = jax.lax.while_loop(cond, body, carry)
    return params


# Newton polishing is used for problems with at most this many parameters (a dense Hessian).
NEWTON_MAX_PARAMS = 64


def polish_newton(fn: Any, params: Any, *, num_steps: int = 2) -> Any:
    r"""A few Newton steps $\theta \leftarrow \theta - H^{-1}\nabla f$ after a value-based
    minimiser, for small problems.

    A line search on values cannot place the minimum closer than about $\sqrt{\epsilon}$
    (the decrease is quadratic in the distance and drowns in rounding); Newton steps use the
    gradient, which is linear in it, and reach rounding level. A step is kept only if it
    makes the gradient smaller and everything finite, so polishing never makes things worse.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    if flat.size == 0 or flat.size > NEWTON_MAX_PARAMS:
        return params
    flat_fn = _optax.user_promotion(lambda v: fn(unravel(v)))
    grad_fn = jax.grad(flat_fn)
    hess_fn = jax.hessian(flat_fn)

    def step(_, v):
        g = grad_fn(v)
        new = v - jnp.linalg.solve(hess_fn(v), g)
        g_new = grad_fn(new)
        better = jnp.all(jnp.isfinite(new)) & (jnp.max(jnp.abs(g_new)) < jnp.max(jnp.abs(g)))
        return jnp.where(better, new, v)

    return unravel(jax.lax.fori_loop(0, num_steps, step, flat))


class GradientMStep(_OptaxStep, AbstractMStep):
    r"""Generalized EM: ``num_steps`` steps of an optax ``optimizer`` on $\nabla_\theta F(q, \theta)$.

    Any optax optimizer works (``optax.sgd``, ``optax.adam``, ``optax.lbfgs()`` …); its
    state carries over from one EM iteration to the next. A freshly built optimizer that
    computes the same thing does not trigger a recompile.

    ```python
    ej.fit(model, x, m_step=ej.GradientMStep(optax.adam(1e-2), num_steps=10))
    ```
    """

    # One bool per leaf of the model: False for a frozen parameter (set by fit(frozen=...)).
    trainable: tuple | None = eqx.field(static=True, default=None)
    exact = False

    def init(self, model):
        params, _ = _split_params(model, self.trainable)
        return self.init_optimizer(params)

    def step(self, model, q, state, data, *, key, prior):
        data = as_dataset(data, model)
        params, static = _split_params(model, self.trainable)
        q = jax.lax.stop_gradient(q)
        loss = _m_loss(static, q, data, prior)
        params, state = _optax_steps(self.transform, self.num_steps, loss, params, state, key)
        return eqx.combine(params, static), state
