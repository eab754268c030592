r"""Newton's method for objectives whose Hessian is diagonal plus rank one.

Many M-steps of Dirichlet-type models (a Dirichlet's concentrations from
$E[\log\theta]$, a Pólya distribution's, LDA's $\alpha$) minimise a function of a positive
vector $x \in \mathbb R^V_{>0}$ whose Hessian is

$$H = \mathrm{diag}(d) + c\,\mathbf 1 \mathbf 1^\top,$$

so a Newton step costs $O(V)$ by the Sherman–Morrison formula (Minka, "Estimating a
Dirichlet distribution", 2000/2012):

$$H^{-1} g = \frac{g}{d} - \frac{c\,\mathbf 1^\top (g/d)}{1 + c\,\mathbf 1^\top (1/d)}\,\frac{1}{d}.$$

``minimize_diagonal_plus_rank_one`` is that method, with a line search that keeps $x > 0$
and never raises the objective; ``fit_dirichlet`` uses it for the Dirichlet maximum
likelihood estimate.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.special as jss

from ._custom_types import Array

# Step halvings tried by the line search before a Newton iteration is declared failed
# (2**-40 ~ 1e-12: far below any step that can still lower the objective in float64).
MAX_HALVINGS = 40
# Fixed-point iterations (Minka) that refine fit_dirichlet's moment start before Newton.
FIXED_POINT_STEPS = 3
# Newton iterations for the inverse digamma function.
INVERSE_DIGAMMA_STEPS = 5


class NewtonInfo(eqx.Module):
    """How a batch of Newton solves ended, one entry per problem (the leading axes of ``x``).

    - ``converged``: the last Newton step was shorter than ``tol`` (relative to ``x``).
    - ``failed``: the objective, its gradient or Hessian was not finite at the start, or no
      step along the search direction (halved up to ``MAX_HALVINGS`` times) stayed in
      $x > 0$ and lowered the objective; the last good ``x`` is returned.
    - ``num_steps``: Newton steps taken.

    Neither flag set: ``max_steps`` ran out first.
    """

    converged: Array
    failed: Array
    num_steps: Array


# --------------------------------------------------------------------------- the solver
def _solve(grad: Array, diag: Array, rank_one: Array) -> tuple[Array, Array]:
    r"""$-H^{-1} g$ for $H = \mathrm{diag}(d) + c\,\mathbf 1\mathbf 1^\top$ (Sherman–Morrison),
    and whether $H$ is positive definite ($d > 0$ and $1 + c\,\sum_v 1/d_v > 0$)."""
    positive = jnp.all(diag > 0, axis=-1)
    inv = 1 / jnp.where(diag > 0, diag, 1)
    g_over_d = grad * inv
    denominator = 1 + rank_one * jnp.sum(inv, axis=-1)
    pd = positive & (denominator > 0)
    safe = jnp.where(pd, denominator, 1)
    coef = rank_one * jnp.sum(g_over_d, axis=-1) / safe
    return -(g_over_d - coef[..., None] * inv), pd


def _all_finite(*arrays: Array, batch_ndim: int) -> Array:
    """Per problem: every entry of every array is finite (arrays have ``batch_ndim``
    leading axes, then any number of their own)."""
    out = None
    for a in arrays:
        ok = jnp.isfinite(a)
        ok = ok.reshape(ok.shape[:batch_ndim] + (-1,)).all(axis=-1) if a.ndim > batch_ndim else ok
        out = ok if out is None else out & ok
    return out


class _State(eqx.Module):
    x: Array
    value: Array
    grad: Array
    diag: Array
    rank_one: Array
    converged: Array
    failed: Array
    num_steps: Array
    iteration: Array


def minimize_diagonal_plus_rank_one(
    fn: Callable[[Array], tuple[Array, Array, Array, Array]],
    x0: Array,
    *,
    max_steps: int = 100,
    tol: float | None = None,
) -> tuple[Array, NewtonInfo]:
    r"""Minimise ``fn`` over positive vectors ``x`` of shape ``(..., V)`` by Newton's method,
    with independent problems along the leading axes.

    ``fn(x)`` returns ``(value (...), grad (..., V), hess_diag (..., V), hess_rank_one (...))``:
    the objective, its gradient and its Hessian $\mathrm{diag}(d) + c\,\mathbf 1\mathbf 1^\top$.
    Each step solves $H p = -g$ in $O(V)$ (Sherman–Morrison). Where $H$ is not positive
    definite, or $p$ is not a descent direction, the step is a scaled gradient step in
    $\log x$ instead, $p = -\tfrac12\, x \odot (x \odot g) / \max_v |x_v g_v|$.

    **Line search.** The step $x + t p$ starts at $t = 1$ and is halved until $x + t p > 0$
    everywhere, the objective and its derivatives are finite there, and the objective does
    not rise (or, within rounding, $8\epsilon(1 + |f|)$, the largest gradient entry falls:
    near the optimum values drown in rounding while the gradient still decreases). If no
    $t \ge 2^{-40}$ qualifies before $x + t p$ rounds to $x$, the problem stops with its last good ``x``: flagged
    ``converged`` if the Newton step was already below ``tol``, else ``failed``. A problem
    whose objective or derivatives are not finite at ``x0`` (or with ``x0 <= 0``) is
    ``failed`` at once. The objective therefore never rises beyond rounding.

    **Convergence.** A full Newton step ($t = 1$) with
    $\max_v |p_v| / x_v \le$ ``tol`` (default $\sqrt\epsilon$ of the dtype): Newton's
    quadratic convergence then leaves an error of order ``tol**2``. A problem that has
    converged or failed keeps its ``x`` while the others go on; the loop (a bounded
    ``lax.while_loop``, so the routine works under ``jit`` and ``vmap``) runs at most
    ``max_steps`` iterations.

    **Arguments:** ``fn`` as above (batched like ``x``); ``x0`` the positive start, float32
    or float64; ``max_steps`` (static); ``tol`` the relative step at which to stop.

    **Returns:** ``(x, NewtonInfo)``.

    ```python
    def fn(x):  # sum_v (x_v - log x_v) + (sum_v x_v)^2 / 2
        s = jnp.sum(x, axis=-1)
        return (jnp.sum(x - jnp.log(x), axis=-1) + s**2 / 2, 1 - 1 / x + s[..., None],
                1 / x**2, jnp.ones_like(s))
    x, info = minimize_diagonal_plus_rank_one(fn, jnp.ones(3))
    ```
    """
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise TypeError(f"x0 must be a floating-point array, got dtype {x0.dtype}")
    if x0.ndim < 1 or x0.shape[-1] < 1:
        raise ValueError(f"x0 has shape {x0.shape}, expected (..., V) with V >= 1")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
        raise ValueError(f"max_steps must be a nonnegative int, got {max_steps!r}")
    dtype = x0.dtype
    eps = float(jnp.finfo(dtype).eps)
    tol = math.sqrt(eps) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    batch_ndim = x0.ndim - 1

    def evaluate(x):
        value, grad, diag, rank_one = fn(x)
        value = jnp.asarray(value, dtype)
        grad, diag = jnp.asarray(grad, dtype), jnp.asarray(diag, dtype)
        rank_one = jnp.asarray(rank_one, dtype)
        if value.shape != x.shape[:-1] or rank_one.shape != x.shape[:-1]:
            raise ValueError(
                f"fn(x) for x of shape {x.shape} must give value and hess_rank_one of shape "
                f"{x.shape[:-1]}, got {value.shape} and {rank_one.shape}"
            )
        if grad.shape != x.shape or diag.shape != x.shape:
            raise ValueError(
                f"fn(x) for x of shape {x.shape} must give grad and hess_diag of that shape, "
                f"got {grad.shape} and {diag.shape}"
            )
        ok = _all_finite(value, grad, diag, rank_one, batch_ndim=batch_ndim)
        return (value, grad, diag, rank_one), ok

    (value, grad, diag, rank_one), ok = evaluate(x0)
    ok = ok & jnp.all(x0 > 0, axis=-1)
    batch = x0.shape[:-1]
    state = _State(
        x0,
        value,
        grad,
        diag,
        rank_one,
        converged=jnp.zeros(batch, bool),
        failed=~ok,
        num_steps=jnp.zeros(batch, jnp.int32),
        iteration=jnp.array(0),
    )

    def active(s: _State) -> Array:
        return ~s.converged & ~s.failed

    def cond(s: _State) -> Array:
        return (s.iteration < max_steps) & jnp.any(active(s))

    def body(s: _State) -> _State:
        live = active(s)
        x, g = s.x, s.grad
        newton, pd = _solve(g, s.diag, s.rank_one)
        descent = jnp.sum(g * newton, axis=-1) < 0
        use_newton = pd & descent & _all_finite(newton, batch_ndim=batch_ndim)
        xg = x * g
        largest = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
        fallback = -0.5 * x * xg / jnp.where(largest > 0, largest, 1)
        p = jnp.where(use_newton[..., None], newton, fallback)
        # Relative length of the full step: the convergence test and, if the line search
        # finds nothing, the difference between "converged" and "failed".
        full = jnp.max(jnp.abs(p) / x, axis=-1)
        flat = largest[..., 0] == 0  # a zero gradient: x is a stationary point already
        g_max = jnp.max(jnp.abs(g), axis=-1)
        slack = 8 * eps * (1 + jnp.abs(s.value))

        def search_cond(ls):
            k, _, searching, *_ = ls
            return (k < MAX_HALVINGS) & jnp.any(searching)

        def search_body(ls):
            k, t, searching, found, new = ls
            trial = x + t[..., None] * p
            inside = jnp.all(trial > 0, axis=-1) & searching
            (v, gr, dg, r1), finite = evaluate(jnp.where(inside[..., None], trial, x))
            lower = v <= s.value
            flatter = (v <= s.value + slack) & (jnp.max(jnp.abs(gr), axis=-1) < g_max)
            # A step too short to change x in this precision ends the search unfound (a
            # "step" that leaves x where it is would otherwise count as taken, forever).
            moved = jnp.any(trial != x, axis=-1)
            good = inside & moved & finite & (lower | flatter)
            new = jax.tree_util.tree_map(
                lambda a, b: jnp.where(
                    good.reshape(good.shape + (1,) * (a.ndim - good.ndim)), a, b
                ),
                (trial, v, gr, dg, r1),
                new,
            )
            searching = searching & ~good & moved
            t = jnp.where(searching, t / 2, t)
            return k + 1, t, searching, found | good, new

        searching = live & ~flat
        start = (
            jnp.array(0),
            jnp.ones(batch, dtype),
            searching,
            jnp.zeros(batch, bool),
            (x, s.value, g, s.diag, s.rank_one),
        )
        _, t, _, found, new = jax.lax.while_loop(search_cond, search_body, start)
        x_new, value, grad, diag, rank_one = new
        small = use_newton & (full <= tol)
        converged = s.converged | (live & (flat | (found & small & (t == 1)) | (~found & small)))
        failed = s.failed | (live & ~flat & ~found & ~small)
        return _State(
            x_new,
            value,
            grad,
            diag,
            rank_one,
            converged,
            failed,
            s.num_steps + (live & found).astype(jnp.int32),
            s.iteration + 1,
        )

    state = jax.lax.while_loop(cond, body, state)
    return state.x, NewtonInfo(state.converged, state.failed, state.num_steps)


# --------------------------------------------------------------------------- Dirichlet
def inverse_digamma(y: Array) -> Array:
    r"""$\psi^{-1}(y)$: the $x > 0$ with $\psi(x) = y$, by Newton's method from Minka's start
    ($e^y + \tfrac12$ for $y \ge -2.22$, else $-1/(y - \psi(1))$), ``INVERSE_DIGAMMA_STEPS``
    iterations (Minka 2000, appendix C)."""
    y = jnp.asarray(y)
    euler = 0.5772156649015329  # -psi(1)
    x = jnp.where(y >= -2.22, jnp.exp(y) + 0.5, -1 / (y + euler))
    for _ in range(INVERSE_DIGAMMA_STEPS):
        x = x - (jss.digamma(x) - y) / jss.polygamma(1, x)
    return x


def _dirichlet_objective(mean_log_p: Array) -> Callable:
    r"""$f(a) = -[\log\Gamma(A) - \sum_k \log\Gamma(a_k) + \sum_k (a_k - 1)\,\overline{\log p}_k]$,
    $A = \sum_k a_k$ (the negative log-likelihood per datum), with its gradient
    $\psi(a_k) - \psi(A) - \overline{\log p}_k$ and Hessian
    $\mathrm{diag}(\psi'(a)) - \psi'(A)\,\mathbf 1 \mathbf 1^\top$."""

    def fn(a):
        total = jnp.sum(a, axis=-1)
        value = -(
            jss.gammaln(total)
            - jnp.sum(jss.gammaln(a), axis=-1)
            + jnp.sum((a - 1) * mean_log_p, axis=-1)
        )
        grad = jss.digamma(a) - jss.digamma(total)[..., None] - mean_log_p
        return value, grad, jss.polygamma(1, a), -jss.polygamma(1, total)

    return fn


def _dirichlet_start(mean_log_p: Array) -> Array:
    r"""Moment-style start from $\overline{\log p}$ alone: mean
    $\hat m_k = e^{\overline{\log p}_k} / Z$, $Z = \sum_k e^{\overline{\log p}_k}$, and
    precision $s = \tfrac{K-1}{2}/(-\log Z)$ (Minka's Stirling approximation of the
    likelihood in $s$ at fixed mean, for which $\sum_k \hat m_k(\log \hat m_k -
    \overline{\log p}_k) = -\log Z$), then ``FIXED_POINT_STEPS`` of Minka's fixed point
    $a_k \leftarrow \psi^{-1}(\psi(A) + \overline{\log p}_k)$, each of which raises the
    likelihood. Data that no Dirichlet fits ($Z \ge 1$, impossible for real data by Jensen's
    inequality) start from $s = K$."""
    k = mean_log_p.shape[-1]
    log_z = jax.nn.logsumexp(mean_log_p, axis=-1, keepdims=True)
    mean = jnp.exp(mean_log_p - log_z)
    gap = -log_z
    precision = jnp.where(gap > 0, 0.5 * max(k - 1, 1) / jnp.where(gap > 0, gap, 1), k)
    a = mean * precision
    for _ in range(FIXED_POINT_STEPS):
        proposal = inverse_digamma(jss.digamma(jnp.sum(a, axis=-1, keepdims=True)) + mean_log_p)
        a = jnp.where(
            jnp.all(jnp.isfinite(proposal) & (proposal > 0), axis=-1, keepdims=True), proposal, a
        )
    return a


def fit_dirichlet(
    sum_log_p: Array,
    count: Array,
    alpha0: Array | None = None,
    *,
    max_steps: int = 100,
    tol: float | None = None,
) -> tuple[Array, NewtonInfo]:
    r"""The Dirichlet maximum-likelihood estimate from sufficient statistics, by Newton's
    method with a diagonal-plus-rank-one Hessian (``minimize_diagonal_plus_rank_one``):

    $$\hat a = \arg\max_{a > 0}\; n\Big(\log\Gamma\big(\textstyle\sum_k a_k\big)
      - \sum_k \log\Gamma(a_k)\Big) + \sum_k (a_k - 1)\, S_k,$$

    with $S$ = ``sum_log_p`` $= \sum_i \log p_{ik}$ (or $\sum_i E_q[\log\theta_{ik}]$ in
    variational EM) and $n$ = ``count``. The objective is divided by $n$ (the solution does
    not change), so the solver works on $\overline{\log p} = S / n$.

    **Arguments:**

    - `sum_log_p`: ``(..., K)``, independent problems along the leading axes.
    - `count`: ``(...)`` (or a scalar), $n > 0$ (a problem with $n \le 0$ has no
      maximum and is reported ``failed``).
    - `alpha0`: the start ``(..., K)``, or ``None``: a moment-style start refined by Minka's
      fixed point (``_dirichlet_start``).
    - `max_steps`, `tol`: as for ``minimize_diagonal_plus_rank_one``.

    **Returns:** ``(alpha, NewtonInfo)``. Problems with no finite maximum (for example
    $\sum_k e^{S_k/n} \ge 1$, impossible for data on the simplex) or non-finite statistics
    are reported in ``info.failed`` (or ``~info.converged``), never silently "fitted".

    ```python
    alpha, info = fit_dirichlet(jnp.sum(jnp.log(p), axis=0), p.shape[0], None)
    ```
    """
    sum_log_p = jnp.asarray(sum_log_p)
    if not jnp.issubdtype(sum_log_p.dtype, jnp.floating):
        raise TypeError(f"sum_log_p must be a floating-point array, got dtype {sum_log_p.dtype}")
    if sum_log_p.ndim < 1 or sum_log_p.shape[-1] < 2:
        raise ValueError(f"sum_log_p has shape {sum_log_p.shape}, expected (..., K) with K >= 2")
    dtype = sum_log_p.dtype
    count = jnp.asarray(count).astype(dtype)
    batch = sum_log_p.shape[:-1]
    if count.shape not in ((), batch):
        raise ValueError(f"count has shape {count.shape}, expected () or {batch}")
    count = jnp.broadcast_to(count, batch)
    mean_log_p = sum_log_p / count[..., None]
    if alpha0 is None:
        alpha0 = _dirichlet_start(mean_log_p)
    else:
        alpha0 = jnp.asarray(alpha0).astype(dtype)
        if alpha0.shape != sum_log_p.shape:
            raise ValueError(f"alpha0 has shape {alpha0.shape}, expected {sum_log_p.shape}")
    return minimize_diagonal_plus_rank_one(
        _dirichlet_objective(mean_log_p), alpha0, max_steps=max_steps, tol=tol
    )


__all__ = [
    "NewtonInfo",
    "fit_dirichlet",
    "inverse_digamma",
    "minimize_diagonal_plus_rank_one",
]
