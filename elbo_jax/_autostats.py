r"""Sufficient statistics found automatically, for log-joints that are affine in data features.

Many log-joints combine the data and the parameters only through sums of products
$a(\theta, z)\,\phi(x, z)$: a Poisson mixture's $x \log\lambda_z - \lambda_z - \log x!$,
a Bernoulli's $x\log p_z + (1-x)\log(1-p_z)$. Then the M-step objective needs the data
only through $n_k = \sum_n r_{nk}$ and $\Phi_k = \sum_n r_{nk}\,\phi(x_n, k)$:

$$\sum_n r_{nk} \log p(x_n, k\mid\theta) = n_k\,\ell(\theta, k, \Phi_k / n_k),$$

where $\ell(\theta, k, \phi)$ is ``log_joint`` with its data-only intermediate values
replaced by $\phi$. ``affine_split`` finds these features by reading the jaxpr of
``log_joint``: the values that depend on the datum but not on the parameters, where they
enter the parameter-dependent computation, are the features, and the rest of the
computation must be affine in them (checked op by op; otherwise there is no split and the
numerical M-step runs on the whole data). The numerical M-step then runs on $K$ evaluations
of the log-joint per step instead of $N K$.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from ._custom_types import Array, Data, Stats
from ._latent import Discrete
from ._model import Model
from ._validate import datum_shapes, remembered

# Primitives that are linear in every operand: affine inputs give an affine output.
_LINEAR = {
    "add",
    "add_any",
    "sub",
    "neg",
    "reshape",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "transpose",
    "slice",
    "reduce_sum",
    "concatenate",
    "copy",
    "copy_p",
    "convert_element_type",
}
# Primitives linear in one operand: only the first operand may be affine (others index or divide).
_FIRST_ONLY = {"div", "gather", "dynamic_slice"}
_CALLS = {"pjit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr"}


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex_core.Literal)


def _inner(eqn: Any) -> Any:
    name = _CALLS.get(eqn.primitive.name)
    if name is None or name not in eqn.params:
        return None
    inner = eqn.params[name]
    return inner.jaxpr if hasattr(inner, "jaxpr") else inner


def _affine_ok(jaxpr: Any, affine_in: list[bool]) -> list[bool] | None:
    """Which outputs of ``jaxpr`` are affine in the inputs flagged ``affine_in``; ``None`` if
    a non-affine operation touches a flagged value."""
    affine: dict[Any, bool] = dict(zip(jaxpr.invars, affine_in, strict=True))
    for eqn in jaxpr.eqns:
        out = _affine_eqn(eqn, [affine.get(v, False) if _is_var(v) else False for v in eqn.invars])
        if out is None:
            return None
        affine.update(zip(eqn.outvars, out, strict=True))
    return [affine.get(v, False) if _is_var(v) else False for v in jaxpr.outvars]


def _affine_eqn(eqn: Any, flags: list[bool]) -> list[bool] | None:
    """The affine flags of one equation's outputs, or ``None`` if it breaks affinity."""
    if not any(flags):
        return [False] * len(eqn.outvars)
    inner = _inner(eqn)
    if inner is not None:
        return _affine_ok(inner, flags)
    name = eqn.primitive.name
    if name in _LINEAR:
        if name == "convert_element_type" and not jnp.issubdtype(
            eqn.outvars[0].aval.dtype, jnp.inexact
        ):
            return None
        return [True] * len(eqn.outvars)
    if name in ("mul", "dot_general") and sum(flags) == 1:
        return [True]
    if name in _FIRST_ONLY and flags[0] and not any(flags[1:]):
        return [True]
    if name == "select_n" and not flags[0]:
        return [True]
    return None


class AffineSplit(eqx.Module):
    """``log_joint`` split into data features and a part affine in them (see module doc)."""

    closed: Any = eqx.field(static=True)  # ClosedJaxpr of (params, x, z) -> log p(x, z)
    num_params: int = eqx.field(static=True)
    data_side: frozenset = eqx.field(static=True)  # eqn indices computed from data only
    features: tuple = eqx.field(static=True)  # the feature vars
    per_state: tuple = eqx.field(static=True)  # does feature j depend on z?

    # -- evaluation
    def _eval(self, env: dict, *, features: bool) -> Any:
        """Run the jaxpr: for ``features``, every equation whose inputs are known (the
        parameters are not given, so only data-only ones run); otherwise every equation
        that is not data-only, with the features' values given."""
        jaxpr = self.closed.jaxpr
        env.update(zip(jaxpr.constvars, self.closed.consts, strict=True))
        read = lambda v: env[v] if _is_var(v) else v.val
        for i, eqn in enumerate(jaxpr.eqns):
            if features:
                if any(_is_var(v) and v not in env for v in eqn.invars):
                    continue
            elif i in self.data_side:
                continue
            ans = eqn.primitive.bind(
                *map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params)
            )
            env.update(
                zip(eqn.outvars, ans if eqn.primitive.multiple_results else [ans], strict=True)
            )
        if features:
            return [env[v] for v in self.features]
        return read(jaxpr.outvars[0])

    def feature_values(self, x_datum: Any, z: Any) -> list:
        """The features $\\phi(x, z)$ of one datum (a list of arrays)."""
        invars = self.closed.jaxpr.invars
        env = {invars[self.num_params]: x_datum, invars[-1]: z}
        return self._eval(env, features=True)

    def reduced_log_joint(self, model: Model, values: list, z: Any) -> Array:
        r"""$\ell(\theta, z, \phi)$: ``log_joint`` with its features set to ``values``."""
        params, _ = eqx.partition(model, eqx.is_inexact_array)
        invars = self.closed.jaxpr.invars
        env = dict(zip(invars[: self.num_params], jax.tree_util.tree_leaves(params), strict=True))
        env[invars[-1]] = z
        env.update(zip(self.features, values, strict=True))
        return self._eval(env, features=False)

    # -- per-datum features, the table and the statistics
    def datum_features(self, x: Data) -> tuple:
        """The features that do not depend on $z$, for every datum: one ``(N, ...)`` array
        each. They are the same in every iteration, so ``fit`` computes them once."""
        state = jnp.zeros((), self.closed.jaxpr.invars[-1].aval.dtype)
        values = jax.vmap(lambda xn: self.feature_values(xn, state))(x)
        return tuple(v for v, depends in zip(values, self.per_state, strict=True) if not depends)

    def feature_size(self) -> int:
        """Elements per datum of ``datum_features``."""
        return sum(
            max(1, v.aval.size)
            for v, depends in zip(self.features, self.per_state, strict=True)
            if not depends
        )

    def _all_features(self, x: Data, datum: tuple | None, k: int) -> list:
        """Every feature for every datum and state: per-datum ones ``(N, ...)`` (from
        ``datum`` when given), per-state ones ``(N, K, ...)``."""
        states = jnp.arange(k)
        if datum is None:
            datum = self.datum_features(x)
        per_both = None
        if any(self.per_state):
            per_both = jax.vmap(lambda xn: jax.vmap(lambda z: self.feature_values(xn, z))(states))(
                x
            )
        datum_iter = iter(datum)
        return [
            per_both[j] if depends else next(datum_iter) for j, depends in enumerate(self.per_state)
        ]

    def coefficients(self, model: Model) -> tuple[Array, list]:
        r"""$\ell(\theta, k, \phi) = c_k + \sum_j \langle W_{kj}, \phi_j\rangle$: the offsets
        ``c`` ``(K,)`` and the coefficients ``W`` (one ``(K, *shape_j)`` array per feature),
        from the value and gradient of $\ell$ at $\phi = 0$ (exact, as $\ell$ is affine)."""
        zeros = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in self.features]

        def at(z):
            return jax.value_and_grad(lambda v: self.reduced_log_joint(model, v, z))(zeros)

        return jax.vmap(at)(jnp.arange(model.latent.num_states))

    def table(self, model: Model, x: Data, datum: tuple | None = None) -> Array:
        r"""$T_{nk} = c_k + \sum_j \langle W_{kj}, \phi_j(x_n, k)\rangle$, the ``(N, K)``
        log-joint table as matrix products of the features (``datum``: precomputed
        ``datum_features``) with ``coefficients``. A coefficient that is infinite (a
        $\log 0$ in the model) makes its rows NaN, as ``log_joint`` is NaN at a zero feature."""
        k = model.latent.num_states
        offsets, weights = self.coefficients(model)
        values = self._all_features(x, datum, k)
        n = values[0].shape[0] if values else 0
        table = jnp.broadcast_to(offsets, (n, k))
        for f, w, depends in zip(values, weights, self.per_state, strict=True):
            w = w.reshape(k, -1)
            if depends:
                table = table + jnp.einsum("nkf,kf->nk", f.reshape(n, k, -1).astype(w.dtype), w)
            else:
                table = table + f.reshape(n, -1).astype(w.dtype) @ w.T
        return table

    def statistics(
        self, model: Model, x: Data, q: Any, datum: tuple | None = None, weights: Any = None
    ) -> Stats:
        r"""``{"counts": n_k, "features": [Φ_k per feature]}`` for responsibilities ``q.probs``
        (each datum's weighted by ``weights``, if given)."""
        resp = q.probs
        if weights is not None:
            resp = resp * weights.astype(resp.dtype)[:, None]
        sums = []
        values = self._all_features(x, datum, model.latent.num_states)
        for f, depends in zip(values, self.per_state, strict=True):
            f = f.astype(resp.dtype)
            if depends:
                sums.append(jnp.einsum("nk,nk...->k...", resp, f))
            else:
                sums.append(jnp.tensordot(resp, f, axes=(0, 0)))
        return {"counts": jnp.sum(resp, axis=0), "features": sums}

    def objective(self, model: Model, stats: Stats) -> Array:
        r"""$\sum_n E_{q_n}[\log p(x_n, z\mid\theta)] = \sum_k n_k \ell(\theta, k, \Phi_k/n_k)$."""
        counts = stats["counts"]
        safe = jnp.maximum(counts, jnp.finfo(counts.dtype).tiny)
        means = [
            f / safe.reshape(-1, *([1] * (f.ndim - 1))).astype(f.dtype) for f in stats["features"]
        ]
        states = jnp.arange(model.latent.num_states)
        per_k = jax.vmap(lambda z, *v: self.reduced_log_joint(model, list(v), z))(states, *means)
        return jnp.sum(jnp.where(counts > 0, counts * per_k, 0.0))


_CACHE: dict[Any, AffineSplit | None] = {}


def affine_split(model: Model, x: Data) -> AffineSplit | None:
    """The split of ``model.log_joint`` (for a ``Discrete`` latent), or ``None`` if it has none.

    Cached per model structure and data shape, so the same split (and compiled fit) is
    reused by later fits.
    """
    if not isinstance(model.latent, Discrete):
        return None
    x_avals = tuple(jax.tree_util.tree_leaves(datum_shapes(x)))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    shapes = tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(params))
    # ``static`` by value: its arrays (integer ones) are constants of the analysed jaxpr.
    key = (jax.tree_util.tree_structure(params), shapes, jax.tree_util.tree_structure(x))
    key = (key, static, x_avals)
    try:
        hash(key)
    except TypeError:
        key = None
    return remembered(_CACHE, key, lambda: _analyse(model, x_avals))


def _analyse(model: Model, x_avals: tuple) -> AffineSplit | None:
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    num_x = len(x_avals)

    def flat(*args):
        p = jax.tree_util.tree_unflatten(treedef, args[: len(leaves)])
        m = eqx.combine(p, static)
        xs = args[len(leaves) : len(leaves) + num_x]
        x_tree = xs[0] if num_x == 1 else xs
        return m.log_joint(x_tree, args[-1])

    z = jax.ShapeDtypeStruct((), model.latent.dtype)
    try:
        closed = jax.make_jaxpr(flat)(*leaves, *x_avals, z)
    except Exception:  # noqa: BLE001 - any failure means: no split, use the generic path
        return None
    jaxpr = closed.jaxpr
    if num_x != 1 or len(jaxpr.outvars) != 1:
        return None
    theta = set(jaxpr.invars[: len(leaves)])
    data = set(jaxpr.invars[len(leaves) : len(leaves) + num_x])
    zvar = jaxpr.invars[-1]
    tainted_theta, tainted_x, tainted_z = set(theta), set(data), {zvar}
    data_side = set()
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [v for v in eqn.invars if _is_var(v)]
        has_theta = any(v in tainted_theta for v in ins)
        has_x = any(v in tainted_x for v in ins)
        has_z = any(v in tainted_z for v in ins)
        for v in eqn.outvars:
            if has_theta:
                tainted_theta.add(v)
            if has_x:
                tainted_x.add(v)
            if has_z:
                tainted_z.add(v)
        if has_x and not has_theta:
            data_side.add(i)
    is_data = lambda v: _is_var(v) and v in tainted_x and v not in tainted_theta
    features: list = []
    for i, eqn in enumerate(jaxpr.eqns):
        if i in data_side:
            continue
        for v in eqn.invars:
            if is_data(v) and v not in features:
                features.append(v)
    for v in jaxpr.outvars:
        if is_data(v) and v not in features:
            features.append(v)
    if not features:
        return None
    # The part that is not data-only, as a function of the features, must be affine in them.
    affine: dict[Any, bool] = {v: True for v in features}
    for i, eqn in enumerate(jaxpr.eqns):
        if i in data_side:
            continue
        flags = [affine.get(v, False) if _is_var(v) else False for v in eqn.invars]
        outs = _affine_eqn(eqn, flags)
        if outs is None:
            return None
        affine.update(zip(eqn.outvars, outs, strict=True))
    if not all(jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in features):
        return None
    return AffineSplit(
        closed=closed,
        num_params=len(leaves),
        data_side=frozenset(data_side),
        features=tuple(features),
        per_state=tuple(v in tainted_z for v in features),
    )
