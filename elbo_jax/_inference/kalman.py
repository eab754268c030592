r"""Exact inference in a linear-Gaussian state-space model, for one sequence.

The model (pykalman's convention: the initial state is the state at the first observation)

$$z_0 \sim \mathcal N(m_0, P_0),\qquad z_{t+1} = F z_t + w_t,\ w_t \sim \mathcal N(0, Q),
\qquad y_t = H z_t + v_t,\ v_t \sim \mathcal N(0, R),\qquad t = 0, \dots, T-1,$$

with states $z_t \in \mathbb R^S$ and observations $y_t \in \mathbb R^O$.

Conventions shared by every function:

* ``y`` has shape ``(T, O)``; its NaN entries are missing, in any pattern. An update uses the
  observed entries of a frame only: the rows of $H$ and the rows and columns of $R$ of the
  missing entries are replaced by zeros and by the identity, and the entries by 0, which adds an
  independent dummy observation $0 \sim \mathcal N(0, 1)$ per missing entry; its
  $-\tfrac12\log 2\pi$ is left out of the log-likelihood. A frame with no observed entry is a
  pure prediction step.
* ``length`` ($L$, ``None`` for $T$, may be traced, $1 \le L \le T$): frames $t \ge L$ are
  padding, ignored whatever they hold; the outputs there are 0.
* Linear systems are solved with Cholesky factors, updates are in Joseph form and covariances
  are symmetrised, so that they stay positive definite in float32.
* ``parallel=True`` is the parallel-in-time filter and smoother of Särkkä and García-Fernández
  (2021, "Temporal parallelization of Bayesian smoothers"), by ``jax.lax.associative_scan``:
  $O(\log T)$ depth instead of $O(T)$, the same results.

Functions act on one sequence; callers ``jax.vmap`` over sequences.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
from jax.scipy.linalg import cho_solve as _lapack_cho_solve
from jax.scipy.linalg import solve_triangular as _lapack_solve_triangular

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)
# Time steps per trip of the sequential scans' loops.
_UNROLL = 2


class LGSSMParams(NamedTuple):
    r"""$\theta = (m_0, P_0, F, Q, H, R)$ of the linear-Gaussian state-space model."""

    initial_mean: Array  # (S,)  m_0 = E[z_0]
    initial_covariance: Array  # (S, S)  P_0 = Cov[z_0]
    transition_matrix: Array  # (S, S)  F
    transition_covariance: Array  # (S, S)  Q = Cov[z_{t+1} | z_t]
    observation_matrix: Array  # (O, S)  H
    observation_covariance: Array  # (O, O)  R = Cov[y_t | z_t]


class FilterResult(NamedTuple):
    r"""The filter's output; entries at $t \ge L$ are 0."""

    log_likelihood: Array  # ()  log p(y_{0:L-1}), observed entries only
    means: Array  # (T, S)  E[z_t | y_{0:t}]
    covariances: Array  # (T, S, S)  Cov[z_t | y_{0:t}]


class SmootherResult(NamedTuple):
    r"""The smoother's output; entries at $t \ge L$ (``cross_covariances``: $t \ge L-1$) are 0."""

    log_likelihood: Array  # ()  log p(y_{0:L-1})
    means: Array  # (T, S)  E[z_t | y_{0:L-1}]
    covariances: Array  # (T, S, S)  Cov[z_t | y_{0:L-1}]
    cross_covariances: Array  # (T, S, S)  [t] = Cov[z_{t+1}, z_t | y_{0:L-1}]


# --------------------------------------------------------------------------- helpers
def _sym(a: Array) -> Array:
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


# Matrices up to this size are factorised and solved by unrolled elementwise formulas
# (the same Cholesky algorithm, written out), which XLA fuses across the batch: on CPU a
# LAPACK call per small matrix per time step made the smoother cost ~3 us per frame.
_SMALL = 8


def _cholesky(a: Array) -> Array:
    """The lower Cholesky factor (NaN where ``a`` is not positive definite, as LAPACK's)."""
    n = a.shape[-1]
    if n > _SMALL:
        return jnp.linalg.cholesky(a)
    rows = [[jnp.zeros_like(a[..., 0, 0])] * n for _ in range(n)]
    for j in range(n):
        diag = a[..., j, j] - sum((rows[j][k] ** 2 for k in range(j)), jnp.zeros_like(a[..., 0, 0]))
        root = jnp.sqrt(diag)
        rows[j][j] = root
        for i in range(j + 1, n):
            dot = sum((rows[i][k] * rows[j][k] for k in range(j)), jnp.zeros_like(root))
            rows[i][j] = (a[..., i, j] - dot) / root
    return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def solve_triangular(chol: Array, b: Array, *, lower: bool = True) -> Array:
    """``chol^{-1} b`` (``lower``) or ``chol^{-T} b`` (``lower=False``: the transpose of the
    lower factor), for ``b`` of shape ``(n,)`` or ``(n, m)``."""
    n = chol.shape[-1]
    if n > _SMALL:
        if lower:
            return _lapack_solve_triangular(chol, b, lower=True)
        return _lapack_solve_triangular(chol, b, lower=True, trans="T")
    vector = b.ndim == chol.ndim - 1
    rhs = b[..., None] if vector else b
    out = [None] * n
    order = range(n) if lower else range(n - 1, -1, -1)
    for i in order:
        others = range(i) if lower else range(i + 1, n)
        coef = (lambda k, i=i: chol[..., i, k]) if lower else (lambda k, i=i: chol[..., k, i])
        acc = rhs[..., i, :]
        for k in others:
            acc = acc - coef(k)[..., None] * out[k]
        out[i] = acc / chol[..., i, i][..., None]
    x = jnp.stack(out, axis=-2)
    return x[..., 0] if vector else x


def cho_solve(factor: tuple[Array, bool], b: Array) -> Array:
    """``a^{-1} b`` from ``a``'s lower Cholesky factor (``factor = (chol, True)``)."""
    chol, lower = factor
    assert lower
    if chol.shape[-1] > _SMALL:
        return _lapack_cho_solve((chol, True), b)
    return solve_triangular(chol, solve_triangular(chol, b, lower=True), lower=False)


def _chol(a: Array) -> Array:
    return _cholesky(_sym(a))


def mm(a: Array, b: Array) -> Array:
    """``a @ b`` for small matrices as a broadcast product and sum, which XLA fuses: on CPU
    a batched ``dot`` of 4 x 4 matrices runs about 10x slower (a GEMM call per matrix)."""
    if max(a.shape[-2:] + b.shape[-1:]) > _SMALL:
        return a @ b
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def mv(a: Array, v: Array) -> Array:
    """``a @ v`` for a small matrix and a vector (see ``mm``)."""
    if max(a.shape[-2:]) > _SMALL:
        return a @ v
    return jnp.sum(a * v[..., None, :], axis=-1)


def _valid(y: Array, length) -> Array:
    """``(T,)``: whether frame t is data ($t < L$)."""
    steps = jnp.arange(y.shape[0])
    if length is None:
        return jnp.ones(steps.shape, dtype=bool)
    return steps < jnp.asarray(length).astype(steps.dtype)


def _masked(params: LGSSMParams, y_t: Array, observed: Array) -> tuple[Array, Array, Array]:
    r"""$(H_t, R_t, y_t)$ with each missing entry turned into an independent $0 \sim N(0, 1)$."""
    h, r = params.observation_matrix, params.observation_covariance
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    h_t = jnp.where(observed[:, None], h, jnp.zeros_like(h))
    r_t = jnp.where(observed[:, None] & observed[None, :], r, eye)
    y_t = jnp.where(observed, y_t, jnp.zeros_like(y_t))
    return h_t, r_t, y_t


def _observed(y: Array, valid: Array) -> Array:
    """``(T, O)``: the entries that count (not NaN, not padding)."""
    return ~jnp.isnan(y) & valid[:, None]


def _update(
    mean: Array, cov: Array, h: Array, r: Array, y: Array, num_observed: Array
) -> tuple[Array, Array, Array, Array, Array]:
    r"""Condition $z \sim N(\text{mean}, \text{cov})$ on $y = h z + v$, $v \sim N(0, r)$.

    Returns $E[z \mid y]$, $Cov[z \mid y]$ (Joseph form), $\log p(y)$ (the dummy entries'
    $-\tfrac12 \log 2\pi$ left out: ``num_observed`` counts the real ones), the gain $K$ and
    the lower Cholesky factor of $Cov[y] = h\,\text{cov}\,h^\top + r$.
    """
    chol_s = _chol(h @ cov @ h.T + r)
    residual = y - h @ mean
    gain = cho_solve((chol_s, True), h @ cov).T  # cov h^T S^{-1}
    new_mean = mean + gain @ residual
    i_kh = jnp.eye(mean.shape[0], dtype=cov.dtype) - gain @ h
    new_cov = _sym(i_kh @ cov @ i_kh.T + gain @ r @ gain.T)
    whitened = solve_triangular(chol_s, residual, lower=True)
    log_lik = -0.5 * (
        num_observed.astype(mean.dtype) * _LOG_2PI
        + jnp.sum(whitened**2)
        + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_s)))
    )
    return new_mean, new_cov, log_lik, gain, chol_s


def _predict(params: LGSSMParams, mean: Array, cov: Array) -> tuple[Array, Array]:
    r"""$E[z_{t+1} \mid \cdot]$, $Cov[z_{t+1} \mid \cdot]$ from the moments of $z_t$."""
    f = params.transition_matrix
    return f @ mean, _sym(f @ cov @ f.T + params.transition_covariance)


def _smoothing_gain(params: LGSSMParams, cov: Array) -> Array:
    r"""$G_t = P_{t|t} F^\top (F P_{t|t} F^\top + Q)^{-1}$ from $P_{t|t}$ = ``cov``."""
    f = params.transition_matrix
    _, predicted = _predict(params, jnp.zeros(cov.shape[:1], cov.dtype), cov)
    return cho_solve((_chol(predicted), True), f @ cov).T


def _backward_covariance(params: LGSSMParams, cov: Array, gain: Array) -> Array:
    r"""$Cov[z_t \mid z_{t+1}, y_{0:t}] = P_{t|t} - G (F P_{t|t} F^\top + Q) G^\top$, written as
    $(I - G F) P_{t|t} (I - G F)^\top + G Q G^\top$ (a sum of PSD terms)."""
    i_gf = jnp.eye(cov.shape[0], dtype=cov.dtype) - gain @ params.transition_matrix
    return _sym(i_gf @ cov @ i_gf.T + gain @ params.transition_covariance @ gain.T)


def _zero_padding(valid: Array, x: Array) -> Array:
    mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return jnp.where(mask, x, jnp.zeros_like(x))


# --------------------------------------------------------------------------- sequential
def _sequential_filter(params: LGSSMParams, y: Array, length, keep: bool):
    """Forward scan; ``keep``: also return the filtered moments and the one-step predictions
    ``E[z_{t+1} | y_{0:t}]``, ``Cov[z_{t+1} | y_{0:t}]`` (else only the log-likelihood).

    Lean on purpose (it is the inner loop of every LGSSM fit): the update is
    $P - K(HP)$, symmetrised, rather than the Joseph form, and the predictions are kept
    for the smoother instead of being recomputed there."""
    valid = _valid(y, length)
    observed = _observed(y, valid)
    f, q = params.transition_matrix, params.transition_covariance
    mean0 = params.initial_mean
    cov0 = _sym(params.initial_covariance)
    zero = jnp.zeros((), mean0.dtype)

    def step(carry, inputs):
        pred_mean, pred_cov, total = carry
        y_t, obs_t, valid_t = inputs
        h_t, r_t, y_t = _masked(params, y_t, obs_t)
        hp = mm(h_t, pred_cov)
        chol_s = _cholesky(_sym(mm(hp, h_t.T) + r_t))
        gain = cho_solve((chol_s, True), hp).T  # P H^T S^{-1}
        residual = y_t - mv(h_t, pred_mean)
        mean = pred_mean + mv(gain, residual)
        cov = _sym(pred_cov - mm(gain, hp))
        whitened = solve_triangular(chol_s, residual, lower=True)
        log_lik = -0.5 * (
            jnp.sum(obs_t).astype(mean.dtype) * _LOG_2PI
            + jnp.sum(whitened**2)
            + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_s)))
        )
        next_mean = mv(f, mean)
        next_cov = _sym(mm(mm(f, cov), f.T) + q)
        # Padding leaves the carry as it was.
        next_mean = jnp.where(valid_t, next_mean, pred_mean)
        next_cov = jnp.where(valid_t, next_cov, pred_cov)
        total = total + jnp.where(valid_t, log_lik, zero)
        out = (mean, cov, next_mean, next_cov) if keep else None
        return (next_mean, next_cov, total), out

    (_, _, total), out = jax.lax.scan(
        step, (mean0, cov0, zero), (y, observed, valid), unroll=_UNROLL
    )
    if not keep:
        return total, None, None, valid
    means, covs, pred_means, pred_covs = out
    filtered = (_zero_padding(valid, means), _zero_padding(valid, covs))
    return total, filtered, (pred_means, pred_covs), valid


def _sequential_smoother(params: LGSSMParams, filtered, predicted, valid: Array):
    r"""Rauch–Tung–Striebel backward scan over the filtered moments (0 at padding) and the
    filter's one-step predictions: $G_t = P_{t|t}F^\top P_{t+1|t}^{-1}$,
    $m_{t|L} = m_{t|t} + G_t(m_{t+1|L} - m_{t+1|t})$,
    $P_{t|L} = P_{t|t} + G_t(P_{t+1|L} - P_{t+1|t})G_t^\top$, and
    $\mathrm{Cov}[z_{t+1}, z_t] = P_{t+1|L}G_t^\top$."""
    means, covs = filtered
    pred_means, pred_covs = predicted
    steps = jnp.arange(means.shape[0])
    last = jnp.sum(valid.astype(steps.dtype)) - 1  # L - 1
    f = params.transition_matrix
    # Every gain depends on the filter's moments only: all of them at once, outside the
    # loop (the loop's per-step cost on CPU is mostly per operation, not per flop).
    f_cov = mm(jnp.broadcast_to(f, covs.shape), covs)
    gains = jnp.swapaxes(cho_solve((_chol(pred_covs), True), f_cov), -1, -2)

    def step(carry, inputs):
        next_mean, next_cov = carry  # E[z_{t+1} | y], Cov[z_{t+1} | y]
        mean, cov, pred_mean, pred_cov, gain, inner = inputs  # pred_*: of z_{t+1} | y_{0:t}
        sm_mean = mean + mv(gain, next_mean - pred_mean)
        sm_cov = _sym(cov + mm(mm(gain, next_cov - pred_cov), gain.T))
        sm_mean = jnp.where(inner, sm_mean, mean)  # t = L-1: filtered; t >= L: 0
        sm_cov = jnp.where(inner, sm_cov, cov)
        return (sm_mean, sm_cov), (sm_mean, sm_cov)

    init = (jnp.zeros_like(means[0]), jnp.zeros_like(covs[0]))
    inner = steps < last
    inputs = (means, covs, pred_means, pred_covs, gains, inner)
    _, (sm_means, sm_covs) = jax.lax.scan(step, init, inputs, reverse=True, unroll=_UNROLL)
    # Cov[z_{t+1}, z_t | y] = P_{t+1|L} G_t^T, for t < L - 1.
    following = jnp.concatenate([sm_covs[1:], jnp.zeros_like(sm_covs[:1])])
    crosses = mm(following, jnp.swapaxes(gains, -1, -2))
    crosses = jnp.where(inner[:, None, None], crosses, 0.0)
    return sm_means, sm_covs, crosses


# --------------------------------------------------------------------------- parallel
class _FilterElement(NamedTuple):
    r"""$p(z_t \mid y_t, z_{t-1}) = N(A z_{t-1} + b, C)$ and
    $p(y_t \mid z_{t-1}) \propto \exp(-\tfrac12 z_{t-1}^\top J z_{t-1} + \eta^\top z_{t-1})$;
    combined over $s..t$, the same for $z_t$ given $z_{s-1}$ and $y_{s:t}$."""

    a: Array
    b: Array
    c: Array
    eta: Array
    j: Array


def _filter_element(params, trans, offset, noise, y_t, obs_t) -> _FilterElement:
    r"""The element of frame t: $z_t = $ ``trans`` $z_{t-1} + $ ``offset`` $+ N(0,$ ``noise``$)$,
    conditioned on $y_t$. Frame 0: (0, $m_0$, $P_0$), so $z_{-1}$ plays no part."""
    h_t, r_t, y_t = _masked(params, y_t, obs_t)
    mean, cov, _, gain, chol_s = _update(offset, noise, h_t, r_t, y_t, jnp.sum(obs_t))
    i_kh = jnp.eye(noise.shape[0], dtype=noise.dtype) - gain @ h_t
    ha = h_t @ trans
    s_inv_ha = cho_solve((chol_s, True), ha)
    eta = s_inv_ha.T @ (y_t - h_t @ offset)
    j = _sym(ha.T @ s_inv_ha)
    return _FilterElement(i_kh @ trans, mean, cov, eta, j)


def _combine_filter(first: _FilterElement, second: _FilterElement) -> _FilterElement:
    """Associative operator of Särkkä & García-Fernández (2021), eqs. (12)-(13); ``first`` is
    the earlier block of frames."""
    eye = jnp.eye(first.b.shape[0], dtype=first.b.dtype)
    # (I + C_i J_j)^{-1} applied to [A_i, b_i + C_i eta_j, C_i] at once.
    m = eye + first.c @ second.j
    rhs = jnp.concatenate([first.a, (first.b + first.c @ second.eta)[:, None], first.c], axis=1)
    sol = jnp.linalg.solve(m, rhs)
    s = first.b.shape[0]
    sol_a, sol_b, sol_c = sol[:, :s], sol[:, s], sol[:, s + 1 :]
    a = second.a @ sol_a
    b = second.a @ sol_b + second.b
    c = _sym(second.a @ sol_c @ second.a.T + second.c)
    # (I + J_j C_i)^{-1} = ((I + C_i J_j)^{-1})^T applied to [eta_j - J_j b_i, J_j A_i].
    rhs2 = jnp.concatenate([(second.eta - second.j @ first.b)[:, None], second.j @ first.a], axis=1)
    sol2 = jnp.linalg.solve(m.T, rhs2)
    eta = first.a.T @ sol2[:, 0] + first.eta
    j = _sym(first.a.T @ sol2[:, 1:] + first.j)
    return _FilterElement(a, b, c, eta, j)


def _parallel_filter(params: LGSSMParams, y: Array, length):
    """Filtered moments by an associative scan, then $\\log p(y)$ from the one-step predictions
    (all frames at once)."""
    num_steps, s = y.shape[0], params.initial_mean.shape[0]
    dtype = params.initial_mean.dtype
    valid = _valid(y, length)
    observed = _observed(y, valid)
    f, q = params.transition_matrix, _sym(params.transition_covariance)
    first = jnp.arange(num_steps) == 0
    trans = jnp.where(first[:, None, None], jnp.zeros((1, s, s), dtype), f[None])
    offset = jnp.where(first[:, None], params.initial_mean[None], jnp.zeros((1, s), dtype))
    noise = jnp.where(first[:, None, None], _sym(params.initial_covariance)[None], q[None])
    elements = jax.vmap(lambda *args: _filter_element(params, *args))(
        trans, offset, noise, y, observed
    )
    scanned = jax.lax.associative_scan(jax.vmap(_combine_filter), elements)
    means = _zero_padding(valid, scanned.b)
    covs = _zero_padding(valid, scanned.c)

    # Predictions of z_t given y_{0:t-1}, from the filtered moments at t-1.
    pred_means, pred_covs = jax.vmap(lambda m, c: _predict(params, m, c))(means[:-1], covs[:-1])
    pred_means = jnp.concatenate([params.initial_mean[None], pred_means], axis=0)
    pred_covs = jnp.concatenate([_sym(params.initial_covariance)[None], pred_covs], axis=0)

    def frame_log_lik(pred_mean, pred_cov, y_t, obs_t):
        h_t, r_t, y_t = _masked(params, y_t, obs_t)
        return _update(pred_mean, pred_cov, h_t, r_t, y_t, jnp.sum(obs_t))[2]

    log_liks = jax.vmap(frame_log_lik)(pred_means, pred_covs, y, observed)
    total = jnp.sum(jnp.where(valid, log_liks, jnp.zeros_like(log_liks)))
    return total, means, covs, valid


class _SmootherElement(NamedTuple):
    r"""$p(z_t \mid z_{t+1}, y_{0:t}) = N(E z_{t+1} + g, L)$; combined over $t..u$, the same
    for $z_t$ given $z_{u+1}$ and $y$; at the last frame $E = 0$ and it is $p(z_t \mid y)$."""

    e: Array
    g: Array
    l: Array  # noqa: E741


def _combine_smoother(later: _SmootherElement, earlier: _SmootherElement) -> _SmootherElement:
    """Associative operator of Särkkä & García-Fernández (2021), eq. (21), for a reversed scan:
    ``later`` is the block of later frames."""
    e = earlier.e @ later.e
    g = earlier.e @ later.g + earlier.g
    l = _sym(earlier.e @ later.l @ earlier.e.T + earlier.l)  # noqa: E741
    return _SmootherElement(e, g, l)


def _parallel_smoother(params: LGSSMParams, means: Array, covs: Array, valid: Array):
    steps = jnp.arange(means.shape[0])
    last = jnp.sum(valid.astype(steps.dtype)) - 1
    inner = steps < last

    def element(mean, cov, inner_t):
        gain = _smoothing_gain(params, cov)
        g = mean - gain @ (params.transition_matrix @ mean)
        l = _backward_covariance(params, cov, gain)  # noqa: E741
        # t = L-1: (0, filtered mean, filtered covariance); padding: all 0 (filtered are 0).
        gain = jnp.where(inner_t, gain, jnp.zeros_like(gain))
        g = jnp.where(inner_t, g, mean)
        l = jnp.where(inner_t, l, cov)  # noqa: E741
        return _SmootherElement(gain, g, l)

    elements = jax.vmap(element)(means, covs, inner)
    scanned = jax.lax.associative_scan(jax.vmap(_combine_smoother), elements, reverse=True)
    sm_means, sm_covs = scanned.g, scanned.l
    # Cov[z_{t+1}, z_t | y] = Cov[z_{t+1} | y] G_t^T; G_t is 0 from t = L-1 on.
    crosses = jnp.einsum("tij,tkj->tik", sm_covs[1:], elements.e[:-1])
    crosses = jnp.concatenate([crosses, jnp.zeros_like(sm_covs[:1])], axis=0)
    return sm_means, sm_covs, crosses


# --------------------------------------------------------------------------- public
def kalman_filter(params: LGSSMParams, y: Array, length=None) -> FilterResult:
    r"""$\log p(y_{0:L-1})$, $E[z_t \mid y_{0:t}]$ and $Cov[z_t \mid y_{0:t}]$ (sequential scan).

    ``y``: ``(T, O)``, NaN entries missing; ``length``: $L$ (``None``: $T$), frames $t \ge L$
    ignored and their outputs 0.
    """
    total, (means, covs), _, _ = _sequential_filter(params, y, length, keep=True)
    return FilterResult(total, means, covs)


def kalman_smoother(
    params: LGSSMParams, y: Array, length=None, *, parallel=False
) -> SmootherResult:
    r"""$\log p(y)$, $E[z_t \mid y]$, $Cov[z_t \mid y]$ and $Cov[z_{t+1}, z_t \mid y]$, with
    $y = y_{0:L-1}$ (its observed entries).

    ``parallel=False``: forward filter and Rauch–Tung–Striebel backward pass by ``lax.scan``;
    ``parallel=True``: both by ``lax.associative_scan`` (Särkkä & García-Fernández 2021).
    ``cross_covariances[t]`` is 0 for $t \ge L-1$, the other outputs for $t \ge L$.
    """
    if parallel:
        total, means, covs, valid = _parallel_filter(params, y, length)
        sm = _parallel_smoother(params, means, covs, valid)
    else:
        total, filtered, predicted, valid = _sequential_filter(params, y, length, keep=True)
        sm = _sequential_smoother(params, filtered, predicted, valid)
    return SmootherResult(total, *sm)


def log_likelihood(params: LGSSMParams, y: Array, length=None, *, parallel=False) -> Array:
    r"""$\log p(y_{0:L-1} \mid \theta)$ over the observed entries (the filter only)."""
    if parallel:
        return _parallel_filter(params, y, length)[0]
    return _sequential_filter(params, y, length, keep=False)[0]


def sample(key: Array, params: LGSSMParams, num_steps: int) -> tuple[Array, Array]:
    r"""Draw $(z_{0:T-1}, y_{0:T-1}) \sim p(z, y \mid \theta)$: states ``(T, S)`` and
    observations ``(T, O)``, $T$ = ``num_steps``."""
    dtype = params.initial_mean.dtype
    s, o = params.initial_mean.shape[0], params.observation_matrix.shape[0]
    key0, key_w, key_v = jr.split(key, 3)
    z0 = params.initial_mean + _chol(params.initial_covariance) @ jr.normal(key0, (s,), dtype)
    w = jr.normal(key_w, (num_steps, s), dtype) @ _chol(params.transition_covariance).T
    v = jr.normal(key_v, (num_steps, o), dtype) @ _chol(params.observation_covariance).T

    def step(z, w_t):
        return params.transition_matrix @ z + w_t, z

    _, states = jax.lax.scan(step, z0, w)
    return states, states @ params.observation_matrix.T + v
