r"""User functions as programs whose numbers are data, so that a fresh one is not a new program.

``optax.adam(1e-3)`` and ``prior=lambda m: -0.5 * lam * jnp.sum(m.w ** 2)`` are new Python
closures every time they are written, and jit would compile a new fit for each. ``Traced``
traces such a function once to a jaxpr and keeps apart what it computes (the jaxpr, compared
by its text with its floating-point literals blanked out: static) and the numbers it
computes with (its captured arrays and those literals: dynamic leaves). Two functions that
differ only in such numbers — a learning rate, a prior's strength — share one compiled fit;
two that compute different things do not.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex_core.Literal)


def _lifted(v: Any) -> bool:
    """A literal worth making dynamic: a floating-point number."""
    return not _is_var(v) and jnp.issubdtype(v.aval.dtype, jnp.inexact)


class _Program:
    """The static part of a ``Traced``: a jaxpr and the trees of its inputs and outputs,
    equal to another when they compute the same thing up to floating-point literals."""

    def __init__(self, closed: Any, in_tree: Any, out_tree: Any):
        self.jaxpr = closed.jaxpr
        self.in_tree = in_tree
        self.out_tree = out_tree
        self.slots = tuple(
            (i, j)
            for i, eqn in enumerate(self.jaxpr.eqns)
            for j, v in enumerate(eqn.invars)
            if _lifted(v)
        )
        self._signature = (self._text(), str(in_tree), str(out_tree))
        self._hash = hash(self._signature)

    def _text(self) -> str:
        names: dict[Any, int] = {}

        def name(v: Any) -> str:
            if not _is_var(v):
                return "?" if _lifted(v) else repr(v.val)
            return f"v{names.setdefault(v, len(names))}:{v.aval.str_short()}"

        lines = [" ".join(map(name, (*self.jaxpr.constvars, *self.jaxpr.invars)))]
        for eqn in self.jaxpr.eqns:
            params = sorted((k, str(p)) for k, p in eqn.params.items())
            ins = " ".join(map(name, eqn.invars))
            outs = " ".join(map(name, eqn.outvars))
            lines.append(f"{outs} = {eqn.primitive.name}[{params}] {ins}")
        lines.append(" ".join(map(name, self.jaxpr.outvars)))
        return "\n".join(lines)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Program) and self._signature == other._signature

    def __hash__(self) -> int:
        return self._hash

    def run(self, consts: tuple, literals: tuple, args: list) -> list:
        env: dict[Any, Any] = {}
        env.update(zip(self.jaxpr.constvars, consts, strict=True))
        env.update(zip(self.jaxpr.invars, args, strict=True))
        values = dict(zip(self.slots, literals, strict=True))
        for i, eqn in enumerate(self.jaxpr.eqns):
            ins = [
                env[v] if _is_var(v) else values.get((i, j), v.val)
                for j, v in enumerate(eqn.invars)
            ]
            out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            env.update(
                zip(eqn.outvars, out if eqn.primitive.multiple_results else [out], strict=True)
            )
        return [env[v] if _is_var(v) else v.val for v in self.jaxpr.outvars]


class Traced(eqx.Module):
    """``fn`` traced for arguments like ``example_args``; call it with such arguments."""

    program: _Program = eqx.field(static=True)
    consts: tuple
    literals: tuple

    def __init__(self, fn: Callable, *example_args: Any):
        shapes = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), example_args
        )
        flat, in_tree = jax.tree_util.tree_flatten(shapes)
        out_tree = []

        def flat_fn(*leaves):
            out = fn(*jax.tree_util.tree_unflatten(in_tree, leaves))
            out_leaves, tree = jax.tree_util.tree_flatten(out)
            out_tree.append(tree)
            return out_leaves

        closed = jax.make_jaxpr(flat_fn)(*flat)
        self.program = _Program(closed, in_tree, out_tree[0])
        self.consts = tuple(jnp.asarray(c) for c in closed.consts)
        jaxpr = closed.jaxpr
        self.literals = tuple(
            jnp.asarray(jaxpr.eqns[i].invars[j].val, jaxpr.eqns[i].invars[j].aval.dtype)
            for i, j in self.program.slots
        )

    def __call__(self, *args: Any) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(args)
        if tree != self.program.in_tree:
            raise TypeError(
                f"a traced function was called with arguments of structure {tree}, "
                f"expected {self.program.in_tree}"
            )
        out = self.program.run(self.consts, self.literals, leaves)
        return jax.tree_util.tree_unflatten(self.program.out_tree, out)
