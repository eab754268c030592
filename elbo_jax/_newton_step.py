r"""``NewtonMStep``: an exact M-step that the model solves by Newton's method on its own
objective (``_newton``), with the problems whose solve failed counted so that ``fit``
reports them.

**The hook.** A model opts in with

    newton_maximize(data_sum, prior, *, max_steps, tol) -> (new_model, NewtonInfo)

the counterpart of ``maximize(stats, prior)`` for M-steps whose statistics are not a fixed
set of sums (a Pólya likelihood needs each datum's counts, not only their totals).
Instead of the statistics it gets ``data_sum``: ``data_sum(fn)`` is
$\sum_n$ over the data of ``fn(x, q, weights)``, where ``fn`` receives a chunk of rows ``x``,
the recognition distribution ``q`` of those rows (``q`` fixed during the M-step) and the
rows' weights (0 for padding), and returns that chunk's weighted sums as a pytree. It is
the library's one reduction (``sum_over_data``: chunked, merged across devices), and the
hook may call it as often as it likes — once per Newton evaluation. The hook returns the
new model and the ``NewtonInfo`` of its solves (any number of problems, any batch shape);
a problem whose solve failed must keep its previous parameters.
"""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Array
from ._newton import NewtonInfo
from ._objective import as_dataset
from ._q import AbstractQ
from ._steps import AbstractMStep


class NewtonStepState(eqx.Module):
    """What ``NewtonMStep`` carries from one M-step to the next: counts over all M-steps
    so far of the problems whose Newton solve ``failed`` (they kept their previous
    parameters) and of those that ran out of ``max_steps`` (``unconverged``: they kept the
    improvement made so far)."""

    num_failed: Array
    num_unconverged: Array


def data_sum(q: AbstractQ, data: Any) -> Any:
    r"""``fn -> `` $\sum_n$ ``fn(x, q, weights)`` over the rows of ``data`` (a ``Dataset``), in
    chunks, with ``q``'s per-datum arrays sliced like the data (see the module docstring)."""
    q = jax.lax.stop_gradient(q)
    rows, rest = q.split_rows()

    def reduce(fn):
        def chunk(values, weights):
            x, q_rows = values
            return fn(x, eqx.combine(q_rows, rest), weights)

        return data.sum(chunk, rows)

    return reduce


class NewtonMStep(AbstractMStep):
    r"""The exact M-step, $\theta \leftarrow \arg\min_\theta F(q, \theta)$, solved by the
    model's own Newton's method (its ``newton_maximize`` hook; see ``_newton_step``): for
    objectives whose Hessian is diagonal plus rank one, such as the concentrations of
    ``ej.models.DirichletMultinomialMixture`` (whose default M-step it is), each Newton step
    costs $O(V)$ (``_newton.minimize_diagonal_plus_rank_one``).

    A solve never raises the objective, so F does not rise. Problems whose solve fails
    keep their previous parameters and are counted, as are problems that run out of
    ``max_steps``; ``ej.fit`` warns (``UserWarning``) with the numbers — never a silent
    skip.

    **Arguments:** ``max_steps`` Newton steps per solve (static, ``>= 0``); ``tol`` the
    relative step at which a solve has converged (``None``: $\sqrt\epsilon$ of the dtype).

    ```python
    res = ej.fit(model, counts, m_step=ej.NewtonMStep(max_steps=100))
    ```
    """

    max_steps: int = eqx.field(static=True, default=50)
    tol: float | None = eqx.field(static=True, default=None)
    exact = True

    def __check_init__(self):
        steps = self.max_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"max_steps must be a nonnegative int, got {steps!r}")
        if self.tol is not None and not (
            isinstance(self.tol, (int, float)) and not isinstance(self.tol, bool) and self.tol > 0
        ):
            raise ValueError(f"tol must be a number > 0 or None, got {self.tol!r}")

    def init(self, model):
        if not callable(getattr(model, "newton_maximize", None)):
            raise TypeError(
                f"NewtonMStep needs a model with a newton_maximize(data_sum, prior, *, "
                f"max_steps, tol) hook; {type(model).__name__} has none. Use m_step='exact' "
                "(the model's closed form, or L-BFGS) or ej.GradientMStep(...)"
            )
        zero = jnp.zeros((), jnp.int32)
        return NewtonStepState(zero, zero)

    def step(self, model, q, state, data, *, key, prior):
        del key
        data = as_dataset(data, model)
        new, info = model.newton_maximize(
            data_sum(q, data), prior, max_steps=self.max_steps, tol=self.tol
        )
        if not isinstance(info, NewtonInfo):
            raise TypeError(
                f"{type(model).__name__}.newton_maximize must return (model, NewtonInfo), got "
                f"{type(info).__name__} as the second item"
            )
        failed = jnp.sum(info.failed, dtype=jnp.int32)
        unconverged = jnp.sum(~info.converged & ~info.failed, dtype=jnp.int32)
        return new, NewtonStepState(state.num_failed + failed, state.num_unconverged + unconverged)


# ------------------------------------------------------------------ reporting (host side)
def _counts(tree: Any) -> tuple[int, int]:
    """Failed and unconverged problems summed over the ``NewtonStepState``s in ``tree``."""
    is_state = lambda node: isinstance(node, NewtonStepState)
    states = [s for s in jax.tree_util.tree_leaves(tree, is_leaf=is_state) if is_state(s)]
    failed = sum(int(jnp.sum(s.num_failed)) for s in states)
    unconverged = sum(int(jnp.sum(s.num_unconverged)) for s in states)
    return failed, unconverged


def warn_newton_failures(loop: Any, previous: Any = None, *, stacklevel: int = 2) -> None:
    """Warn (``UserWarning``) if Newton M-steps in the fit whose loop state is ``loop`` had
    failed or unconverged solves; ``previous``: the loop state the fit resumed from (its
    counts were reported then)."""
    failed, unconverged = _counts(loop)
    if previous is not None:
        before = _counts(previous)
        failed, unconverged = failed - before[0], unconverged - before[1]
    parts = []
    if failed:
        parts.append(
            f"failed on {failed} problem(s), which kept their previous parameters (the "
            "objective or its derivatives were not finite, or no step lowered it)"
        )
    if unconverged:
        parts.append(
            f"did not converge within max_steps on {unconverged} problem(s), which kept the "
            "improvement made (raise NewtonMStep(max_steps=...))"
        )
    if parts:
        warnings.warn(
            "Newton's method in the M-step " + "; it ".join(parts),
            UserWarning,
            stacklevel=stacklevel + 1,
        )


__all__ = ["NewtonMStep", "NewtonStepState", "data_sum", "warn_newton_failures"]
