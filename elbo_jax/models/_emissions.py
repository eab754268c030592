r"""Emission families: per-state log-densities, statistics and M-steps, as pure functions.

A model with a discrete state $z \in \{1..K\}$ — a mixture, or the steps of an HMM — emits
$x \mid z{=}k \sim p(x \mid \eta_k)$. Everything the exact EM needs from the emission family
is here, for all $K$ states at once (parameters with a leading axis $K$):

- ``*_log_density(x, params)``: the table $\log p(x_n \mid \eta_k)$, ``(N, K)``;
- ``count_statistics(x, resp)``: the expected statistics $N_k = \sum_n r_{nk}$,
  $S_{kd} = \sum_n r_{nk} x_{nd}$ given per-datum state probabilities $r_{nk}$ (a mixture's
  responsibilities times the data weights, an HMM's smoothed marginals $q(z_t{=}k)$);
- ``*_maximize(counts, sums, params, ...)``: the (MAP, conjugate prior) M-step, keeping a
  state's previous parameters when it has (numerically) no data.

Bernoulli and Poisson products are exponential families whose sufficient statistic is $x$
itself, so both use ``count_statistics``. The sums have nonnegative terms: they merge by
addition and need no shift for float32.
"""

import math

import jax
import jax.numpy as jnp
import jax.scipy.special as jss

from .._custom_types import Array, Float


# --------------------------------------------------------------------------- shared
def count_statistics(x: Float[Array, "N D"], resp: Float[Array, "N K"]) -> dict[str, Array]:
    r"""``{"counts": N_k (K,), "sums": S_kd (K, D)}``, $N_k = \sum_n r_{nk}$,
    $S_{kd} = \sum_n r_{nk} x_{nd}$."""
    return {"counts": jnp.sum(resp, axis=0), "sums": resp.T @ x}


def complete_data_count_statistics(
    counts: Float[Array, " K"], means: Float[Array, "K D"]
) -> dict[str, Array]:
    r"""The expected ``count_statistics`` when $N_k$ data come from state $k$ with
    $E[x \mid z{=}k]$ = ``means``: $S_{kd} = N_k\, E[x_d \mid z{=}k]$."""
    return {"counts": counts, "sums": counts[:, None] * means}


def keep_where_empty(denominator: Array, new: Array, old: Array) -> Array:
    """Row ``k`` of ``new`` where ``denominator[k]`` is a positive normal number, else ``old``."""
    ok = denominator > jnp.finfo(denominator.dtype).tiny
    return jnp.where(ok[:, None], new, old)


# --------------------------------------------------------------------------- Bernoulli
def max_logit(min_prob: float) -> float:
    r"""$\mathrm{logit}(1 - \epsilon)$: the largest logit magnitude allowed by ``min_prob``."""
    return math.log1p(-min_prob) - math.log(min_prob)


def clipped_logit(probs: Array, min_prob: float) -> Array:
    r"""$\mathrm{logit}(p)$ clipped to $\pm\mathrm{logit}(1 - $ ``min_prob``$)$ (finite)."""
    bound = max_logit(min_prob)
    probs = jnp.clip(probs, 0.0, 1.0)  # rounding in S / N can step just outside [0, 1]
    return jnp.clip(jnp.log(probs) - jnp.log1p(-probs), -bound, bound)


def bernoulli_log_density(x: Float[Array, "N D"], logits: Float[Array, "K D"]) -> Array:
    r"""$\log p(x_n \mid \mu_k) = \sum_d [x_{nd} \log \mu_{kd} + (1 - x_{nd}) \log(1 - \mu_{kd})]$,
    ``(N, K)``, with $\ell = \mathrm{logit}\,\mu$ = ``logits``: one matmul,
    $x\,\ell^\top + \mathbf 1 (\sum_d \log \sigma(-\ell_{kd}))^\top$."""
    offset = jnp.sum(jax.nn.log_sigmoid(-logits), axis=-1)
    return x @ logits.T + offset[None, :]


def bernoulli_maximize(
    counts: Float[Array, " K"],
    sums: Float[Array, "K D"],
    logits: Float[Array, "K D"],
    *,
    min_prob: float,
    a: float = 1.0,
    b: float = 1.0,
) -> Array:
    r"""The new ``logits``: $\mu_{kd} = (S_{kd} + a - 1) / (N_k + a + b - 2)$, the mode under a
    $\mathrm{Beta}(a, b)$ prior ($a = b = 1$: maximum likelihood), clipped to
    ``[min_prob, 1 - min_prob]``; a state whose denominator is zero keeps ``logits``."""
    numerator = sums + (a - 1)
    denominator = counts + (a + b - 2)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    new = clipped_logit(numerator / safe[:, None], min_prob)
    return keep_where_empty(denominator, new, logits)


# --------------------------------------------------------------------------- Poisson
def poisson_log_density(x: Float[Array, "N D"], log_rates: Float[Array, "K D"]) -> Array:
    r"""$\log p(x_n \mid \lambda_k) = \sum_d [x_{nd} \log \lambda_{kd} - \lambda_{kd}
    - \log \Gamma(x_{nd} + 1)]$, ``(N, K)``, by one matmul."""
    log_factorials = jnp.sum(jss.gammaln(x + 1), axis=-1)
    offset = -jnp.sum(jnp.exp(log_rates), axis=-1)
    return x @ log_rates.T + offset[None, :] - log_factorials[:, None]


def poisson_maximize(
    counts: Float[Array, " K"],
    sums: Float[Array, "K D"],
    log_rates: Float[Array, "K D"],
    *,
    min_rate: float,
    shape: float = 1.0,
    rate: float = 0.0,
) -> Array:
    r"""The new ``log_rates``: $\lambda_{kd} = \max\big((S_{kd} + \text{shape} - 1) /
    (N_k + \text{rate}),\ \text{min\_rate}\big)$, the mode under a
    $\mathrm{Gamma}(\text{shape}, \text{rate})$ prior (shape 1, rate 0: maximum likelihood);
    a state whose denominator is zero keeps ``log_rates``."""
    denominator = counts + rate
    ok = denominator > jnp.finfo(denominator.dtype).tiny
    safe = jnp.where(ok, denominator, 1.0)
    new = jnp.maximum((sums + (shape - 1)) / safe[:, None], min_rate)
    return keep_where_empty(denominator, jnp.log(new), log_rates)


# --------------------------------------------------------------------------- categorical
def categorical_log_density(x: Array, log_probs: Float[Array, "K M"]) -> Array:
    r"""$\log p(x_n \mid \theta_k) = \log \theta_{k, x_n}$ for symbols ``x`` (integers in
    ``[0, M)``, any shape ``S``): a gather, shape ``(*S, K)``."""
    return log_probs.T[x]


def categorical_statistics(x: Array, resp: Float[Array, "N K"], num_symbols: int) -> Array:
    r"""$C_{km} = \sum_n r_{nk}\,[x_n = m]$, ``(K, M)``, by a scatter-add (no one-hot)."""
    k = resp.shape[-1]
    return jnp.zeros((num_symbols, k), resp.dtype).at[x].add(resp).T


def categorical_maximize(
    counts: Float[Array, "K M"], log_probs: Float[Array, "K M"], *, concentration: float = 1.0
) -> Array:
    r"""The new $\log\theta$: $\theta_{km} \propto C_{km} + \text{concentration} - 1$ (the mode
    under a symmetric Dirichlet; 1: maximum likelihood); a state with no data keeps
    ``log_probs``; a symbol never seen in a state gets the smallest normal probability
    (finite logits)."""
    counts = counts + (concentration - 1)
    total = jnp.sum(counts, axis=-1, keepdims=True)
    tiny = jnp.finfo(counts.dtype).tiny
    new = jnp.log(jnp.maximum(counts / jnp.maximum(total, tiny), tiny))
    return keep_where_empty(total[:, 0], new, log_probs)
