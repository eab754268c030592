r"""A mixture of Dirichlet-multinomial (Pólya) distributions: $K$ components for count
vectors $x \in \{0, 1, 2, \dots\}^V$ (word counts of documents, say).

$$p(x, z{=}k \mid \theta) = \pi_k\, \frac{n!}{\prod_v x_v!}\,
  \frac{\Gamma(A_k)}{\Gamma(n + A_k)} \prod_{v=1}^V \frac{\Gamma(x_v + a_{kv})}{\Gamma(a_{kv})},
\qquad n = \sum_v x_v,\ A_k = \sum_v a_{kv},$$

the multinomial with probabilities drawn from $\mathrm{Dir}(a_k)$ and integrated out. The
E-step is exact (enumeration over $k$). The M-step on the weights is closed form,
$\pi_k = N_k / N$; the concentrations have no closed form, and each component's

$$L_k(a) = \sum_n r_{nk}\Big[\log\Gamma(A) - \log\Gamma(n_n + A)
  + \sum_v \log\Gamma(x_{nv} + a_v) - \log\Gamma(a_v)\Big]$$

has the Hessian $\mathrm{diag}(d) + c\,\mathbf 1\mathbf 1^\top$ with
$d_v = \sum_n r_{nk}[\psi'(x_{nv} + a_v) - \psi'(a_v)]$ and
$c = \sum_n r_{nk}[\psi'(A) - \psi'(n_n + A)]$, so Newton's method takes $O(V)$ per datum and
step (``ej.NewtonMStep``, this model's default M-step; Minka, "Estimating a Dirichlet
distribution", 2000/2012, for the Pólya case).
"""

import math
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.special as jss
import numpy as np

from .._custom_types import Array, Data, Float, Int, Key, LogTable, Scalar
from .._newton import NewtonInfo, minimize_diagonal_plus_rank_one
from .._newton_step import NewtonMStep
from .._validate import is_concrete, is_integer, is_number
from ._mixture import (
    AbstractMixture,
    _check_data,
    _check_num_components,
    _check_weights,
    _float_dtype,
    _responsibilities,
    _weight_logits,
)

DEFAULT_MIN_CONCENTRATION = 1e-10
"""Default floor on the concentrations set by the M-step (see the class docstring)."""

# A component's gradient counts as zero when every entry is within this many machine
# epsilons of the sum of the magnitudes of its terms (its rounding error).
GRADIENT_ROUNDING = 4

# Minka's fixed-point iterations from the current concentrations before Newton's method.
START_FIXED_POINT_STEPS = 2


# --------------------------------------------------------------------------- helpers
def _count_entries(x: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(x, np.float64)
    return v, np.isfinite(v) & (v >= 0) & (v == np.round(v))


def _check_counts(x: Any, dim: int | None) -> None:
    """``x`` must be ``(N, V)`` (with the model's ``V``), entries nonnegative integers."""
    requirement = "x must hold nonnegative integer counts for a DirichletMultinomialMixture"
    _check_data(x, dim, _count_entries, requirement)


def _check_min_concentration(value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or not 0 < value < 1:
        raise ValueError(f"min_concentration must be a number in (0, 1), got {value!r}")
    return float(value)


def _special(fn: Any, *arrays: Array) -> list[Array]:
    """``fn`` applied to each of ``arrays`` by one call on their concatenation.

    XLA expands a special function into a few hundred elementwise operations and fuses a
    copy of them into every consumer; one call whose result is materialised (the
    ``optimization_barrier``) leaves one copy, which cuts the compile time of the Newton
    M-step (it evaluates its objective in two places) by about a third."""
    flat = jnp.concatenate([a.reshape(-1) for a in arrays])
    values = jax.lax.optimization_barrier(fn(flat))
    out, start = [], 0
    for a in arrays:
        out.append(values[start : start + a.size].reshape(a.shape))
        start += a.size
    return out


def _trigamma(x: Array) -> Array:
    return jss.polygamma(1, x)


def _fixed_point_sums(x: Array, r: Array, a: Array) -> tuple[Array, Array]:
    r"""Minka's fixed point's sums over the rows ``x`` ``(N, V)`` with responsibilities ``r``
    ``(N, K)`` at ``a`` ``(K, V)``: $\sum_n r_{nk}[\psi(x_{nv} + a_{kv}) - \psi(a_{kv})]$
    ``(K, V)`` and $\sum_n r_{nk}[\psi(n_n + A_k) - \psi(A_k)]$ ``(K,)``. A zero count adds
    exactly 0 to the first."""
    total = jnp.sum(a, axis=-1)
    xa = x[:, None, :] + a[None]
    n_total = jnp.sum(x, axis=-1)[:, None] + total[None, :]
    psi_xa, psi_a, psi_nt, psi_t = _special(jss.digamma, xa, a, n_total, total)
    numer = jnp.einsum("nk,nkv->kv", r, psi_xa - psi_a[None])
    denom = jnp.sum(r * (psi_nt - psi_t[None, :]), axis=0)
    return numer, denom


def _polya_sums(x: Array, r: Array, a: Array) -> tuple[Array, ...]:
    r"""$L_k(a)$ ``(K,)``, its gradient ``(K, V)``, and its Hessian's diagonal part $d$
    ``(K, V)`` and rank-one coefficient $c$ ``(K,)`` (module docstring), summed over the rows;
    and the gradient's scale ``(K, V)``, $\sum_n r_{nk}(|\psi(x_{nv} + a_v)| + |\psi(a_v)|
    + |\psi(n_n + A)| + |\psi(A)|)$ over the terms that are not exactly zero, which bounds
    its rounding error (in units of $\epsilon$)."""
    total = jnp.sum(a, axis=-1)
    xa = x[:, None, :] + a[None]
    n_total = jnp.sum(x, axis=-1)[:, None] + total[None, :]
    args = (xa, a, n_total, total)
    log_xa, log_a, log_nt, log_t = _special(jss.gammaln, *args)
    psi_xa, psi_a, psi_nt, psi_t = _special(jss.digamma, *args)
    tri_xa, tri_a, tri_nt, tri_t = _special(_trigamma, *args)
    per_datum = log_t[None, :] - log_nt + jnp.sum(log_xa - log_a[None], axis=-1)
    value = jnp.sum(r * per_datum, axis=0)
    numer = jnp.einsum("nk,nkv->kv", r, psi_xa - psi_a[None])
    denom = jnp.sum(r * (psi_nt - psi_t[None, :]), axis=0)
    diag = jnp.einsum("nk,nkv->kv", r, tri_xa - tri_a[None])
    rank_one = jnp.sum(r * (tri_t[None, :] - tri_nt), axis=0)
    size_xa = jnp.where(x[:, None, :] > 0, jnp.abs(psi_xa) + jnp.abs(psi_a)[None], 0)
    size_nt = jnp.where(n_total > total[None, :], jnp.abs(psi_nt) + jnp.abs(psi_t)[None, :], 0)
    scale = jnp.einsum("nk,nkv->kv", r, size_xa) + jnp.sum(r * size_nt, axis=0)[:, None]
    return value, numer - denom[:, None], diag, rank_one, scale


# --------------------------------------------------------------------------- model
@final
class DirichletMultinomialMixture(AbstractMixture):
    r"""A mixture of $K$ Dirichlet-multinomial (Pólya) distributions over count vectors of
    length $V$.

    $$\log p(x, z{=}k \mid \theta) = \log \pi_k + \log n! - \sum_v \log x_v!
      + \log\Gamma(A_k) - \log\Gamma(n + A_k)
      + \sum_{v=1}^V \big[\log\Gamma(x_v + a_{kv}) - \log\Gamma(a_{kv})\big]$$

    with $n = \sum_v x_v$ and $A_k = \sum_v a_{kv}$. The multinomial coefficient is
    included, so $p(x \mid z{=}k)$ is a pmf over count vectors with $n$ trials and
    ``ej.log_evidence`` is the true log-likelihood. A datum of zero counts is allowed
    (probability 1 under every component: it adds nothing but its weight). ``log_joint``
    acts on one datum; elbo_jax does the ``vmap`` over data, and ``log_joint_table`` gives
    the $(N, K)$ table vectorised.

    Parameters are stored unconstrained — ``weight_logits`` ($\log \pi$ up to a constant)
    and ``log_concentrations`` ($\log a$) — so ``ej.ExactMStep()`` (L-BFGS) and
    ``ej.GradientMStep`` work on them directly.

    **M-step** (``ej.fit``'s default, ``m_step="exact"``, is ``ej.NewtonMStep()``):
    $\pi_k = N_k / N$ with $N_k = \sum_n r_{nk}$, and each component's concentrations
    maximise its weighted Pólya likelihood $L_k$ (module docstring) by
    ``START_FIXED_POINT_STEPS`` of Minka's fixed point
    $a_v \leftarrow a_v \sum_n r_{nk}[\psi(x_{nv} + a_v) - \psi(a_v)] /
    \sum_n r_{nk}[\psi(n_n + A) - \psi(A)]$ from the current $a$, then Newton's method with
    the diagonal-plus-rank-one Hessian ($O(V)$ per datum and step; the objective never
    rises), which stops when a full step is shorter than ``tol`` (relative) or the gradient
    is within its rounding error (``GRADIENT_ROUNDING``; in float32 that is where the
    optimum stops being resolved). Only maximum likelihood (``prior=None``); for a prior pass
    ``m_step=ej.ExactMStep()`` (numerical).

    **Floor.** A category that a component has (nearly) never seen — all its counts zero,
    zero counts being allowed anywhere — has its maximum-likelihood concentration at 0,
    outside the parameter space ($\log a = -\infty$). Such a concentration is set to
    ``min_concentration`` and held there during the solve: category $v$ of component $k$
    is held when $\sum_n r_{nk}[x_{nv} > 0] \le$ ``min_concentration``
    $\cdot \sum_n r_{nk}[\psi(n_n + A_k) - \psi(A_k)]$, that is when $L_k$ falls as $a_v$
    rises from the floor (approximately: $\psi(x + a) - \psi(a) \approx 1/a$ there). Other
    concentrations are floored at ``min_concentration`` as well. A component with
    (numerically) zero expected count keeps its concentrations and gets the smallest
    normal weight; a component whose Newton solve fails keeps its concentrations and the
    failure is reported by ``fit`` (``ej.NewtonMStep``).

    **Arguments:**

    - `weights`: mixing weights $\pi$, shape ``(K,)``, positive, summing to 1.
    - `concentrations`: $a$, shape ``(K, V)``, positive.
    - `min_concentration`: the floor described above (static; default ``1e-10``).

    The model's dtype is that of the inputs (float32 in, float32 model).

    ```python
    model = ej.models.DirichletMultinomialMixture.initialize(jax.random.key(0), counts, 3)
    res = ej.fit(model, counts)                 # exact E-step, Newton M-step
    res.model.concentrations, res.model.predict(counts)
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("weights", "concentrations")
    weight_logits: Float[Array, " K"]
    log_concentrations: Float[Array, "K V"]
    min_concentration: float = eqx.field(static=True)

    def __init__(
        self,
        weights: Any,
        concentrations: Any,
        *,
        min_concentration: float = DEFAULT_MIN_CONCENTRATION,
    ):
        min_concentration = _check_min_concentration(min_concentration)
        weights, concentrations = jnp.asarray(weights), jnp.asarray(concentrations)
        dtype = _float_dtype(weights, concentrations)
        weights, concentrations = weights.astype(dtype), concentrations.astype(dtype)
        _check_weights(weights)
        k = weights.shape[0]
        if concentrations.ndim != 2 or concentrations.shape[0] != k or concentrations.shape[1] < 1:
            raise ValueError(
                f"concentrations has shape {concentrations.shape}, expected (K, V) with K={k} "
                "(the length of weights) and V >= 1"
            )
        if is_concrete(concentrations):
            a = np.asarray(concentrations)
            if not np.all(np.isfinite(a) & (a > 0)):
                raise ValueError("concentrations must be finite and > 0")
        self.min_concentration = min_concentration
        self.weight_logits = jnp.log(weights)
        self.log_concentrations = jnp.log(concentrations)

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """$V$, the length of each count vector."""
        return self.log_concentrations.shape[1]

    @property
    def concentrations(self) -> Float[Array, "K V"]:
        r"""$a = \exp$(``log_concentrations``)."""
        return jnp.exp(self.log_concentrations)

    def _as_data(self, x: Data) -> Array:
        return jnp.asarray(x).astype(self.log_concentrations.dtype)

    # ------------------------------------------------------------ densities
    def log_joint(self, x: Float[Array, " V"], z: Int[Array, ""]) -> Scalar:
        r"""$\log \pi_z + \log n! - \sum_v \log x_v! + \log\Gamma(A_z) - \log\Gamma(n + A_z)
        + \sum_v [\log\Gamma(x_v + a_{zv}) - \log\Gamma(a_{zv})]$ for one datum."""
        x = self._as_data(x)
        a = jnp.exp(self.log_concentrations[z])
        n, total = jnp.sum(x), jnp.sum(a)
        multinomial = jss.gammaln(n + 1) - jnp.sum(jss.gammaln(x + 1))
        polya = (
            jss.gammaln(total)
            - jss.gammaln(n + total)
            + jnp.sum(jss.gammaln(x + a) - jss.gammaln(a))
        )
        return self.log_weights[z] + multinomial + polya

    def log_joint_table(self, x: Data) -> LogTable:
        r"""$T_{nk} = \log p(x_n, z{=}k)$, shape ``(N, K)`` (see the class docs).

        A hook for data already checked (``fit``, ``predict``, … check ``x`` first)."""
        x = self._as_data(x)
        a = self.concentrations
        n, total = jnp.sum(x, axis=-1), jnp.sum(a, axis=-1)
        xa, n_total = x[:, None, :] + a[None], n[:, None] + total[None, :]
        log_n, log_x, log_xa, log_a, log_nt, log_t = _special(
            jss.gammaln, n + 1, x + 1, xa, a, n_total, total
        )
        multinomial = log_n - jnp.sum(log_x, axis=-1)
        pairs = jnp.sum(log_xa - log_a[None], axis=-1)
        polya = log_t[None, :] - log_nt + pairs
        return self.log_weights[None, :] + multinomial[:, None] + polya

    def check_data(self, x: Data) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, V)`` with this model's ``V`` and counts."""
        _check_counts(x, self.dim)

    # ------------------------------------------------------------ M-step
    def default_m_step(self) -> NewtonMStep:
        """``ej.NewtonMStep()``: what ``ej.fit``'s ``m_step="exact"`` means for this model."""
        return NewtonMStep()

    def newton_maximize(
        self, data_sum: Any, prior: Any = None, *, max_steps: int = 50, tol: float | None = None
    ) -> tuple["DirichletMultinomialMixture", NewtonInfo]:
        r"""The M-step (class docstring) from the data and the responsibilities that
        ``data_sum`` reduces over (``ej.NewtonMStep``'s hook): the closed-form weights and,
        per component, Minka's fixed point then Newton's method on $-L_k(a) / N_k$.

        **Returns:** the new model and the ``NewtonInfo`` of the $K$ solves. Components
        with (numerically) zero expected count, or whose data all have zero counts, are
        reported converged and keep their concentrations; failed ones keep theirs too."""
        if prior is not None:
            raise TypeError(
                "DirichletMultinomialMixture's Newton M-step is maximum likelihood (prior=None); "
                f"for a prior pass m_step=ej.ExactMStep() (numerical), got prior={prior!r}"
            )
        dtype = self.log_concentrations.dtype
        floor = self.min_concentration
        old = self.concentrations

        def rows(x, q, weights):
            x = self._as_data(x)
            return x, _responsibilities(self, x, q, weights=weights, dtype=dtype)

        def first_pass(x, q, weights):
            x, r = rows(x, q, weights)
            numer, denom = _fixed_point_sums(x, r, old)
            present = r.T @ (x > 0).astype(dtype)
            return jnp.sum(r, axis=0), present, numer, denom

        counts, present, numer, denom = data_sum(first_pass)
        # Nothing to fit: no weight, or every count zero (L_k does not depend on a).
        keep = (counts <= jnp.finfo(dtype).tiny) | (denom <= 0)
        held = (present <= floor * denom[:, None]) & ~keep[:, None]

        def fixed_point(a, numer, denom):
            safe = jnp.where(keep, 1, denom)[:, None]
            proposal = jnp.where(held, floor, jnp.maximum(a * numer / safe, floor))
            return jnp.where(keep[:, None], old, proposal)

        start = fixed_point(old, numer, denom)
        for _ in range(START_FIXED_POINT_STEPS - 1):
            numer, denom = data_sum(lambda x, q, w, a=start: _fixed_point_sums(*rows(x, q, w), a))
            start = fixed_point(start, numer, denom)

        inverse_count = 1 / jnp.where(keep, 1, counts)
        # A held coordinate gets no gradient and an (effectively) infinite curvature, so the
        # Sherman-Morrison step leaves it where it is and the others see the Hessian of
        # the free coordinates alone.
        huge = float(jnp.finfo(dtype).max)
        eps = float(jnp.finfo(dtype).eps)

        def objective(a):
            sums = data_sum(lambda x, q, w: _polya_sums(*rows(x, q, w), a))
            value, grad, diag, rank_one, scale = sums
            free = ~held & ~keep[:, None]
            value = jnp.where(keep, 0, -value * inverse_count)
            grad = jnp.where(free, -grad * inverse_count[:, None], 0)
            # A gradient within its rounding error is zero: Newton's method then stops
            # (converged) instead of chasing rounding noise, which in float32 near the
            # optimum gives steps that neither lower F nor shrink.
            noise = GRADIENT_ROUNDING * eps * scale * inverse_count[:, None]
            at_rounding = jnp.all(jnp.abs(grad) <= noise, axis=-1)
            grad = jnp.where(at_rounding[:, None], 0, grad)
            diag = jnp.where(free, -diag * inverse_count[:, None], jnp.where(held, huge, 1))
            rank_one = jnp.where(keep, 0, -rank_one * inverse_count)
            return value, grad, diag, rank_one

        solved, info = minimize_diagonal_plus_rank_one(
            objective, start, max_steps=max_steps, tol=tol
        )
        ok = ~info.failed & jnp.all(jnp.isfinite(solved) & (solved > 0), axis=-1)
        new = jnp.where(held, floor, jnp.maximum(solved, floor))
        new = jnp.where((keep | ~ok)[:, None], old, new)
        info = NewtonInfo(info.converged | keep, ~ok & ~keep, info.num_steps)
        model = eqx.tree_at(
            lambda m: (m.weight_logits, m.log_concentrations),
            self,
            (_weight_logits(counts), jnp.log(new)),
        )
        return model, info

    # ------------------------------------------------------------ use
    def sample(
        self, key: Key, n: int, *, num_trials: Any
    ) -> tuple[Float[Array, "N V"], Int[Array, " N"]]:
        r"""``n`` draws ``(x, z)``: $z \sim \pi$, $p \sim \mathrm{Dir}(a_z)$,
        $x \sim \mathrm{Multinomial}(\text{num\_trials}, p)$; counts ``x`` ``(n, V)`` as the
        model's floats, ``z`` ``(n,)``.

        ``num_trials``: the number of counts per datum, an int or an ``(n,)`` array of them.
        """
        if not is_integer(n) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dtype = self.log_concentrations.dtype
        trials = jnp.asarray(num_trials)
        if trials.shape not in ((), (n,)):
            raise ValueError(f"num_trials has shape {trials.shape}, expected () or ({n},)")
        if is_concrete(trials):
            t = np.asarray(trials, np.float64)
            if not np.all(np.isfinite(t) & (t >= 0) & (t == np.round(t))):
                raise ValueError(f"num_trials must be nonnegative integers, got {num_trials!r}")
        trials = jnp.broadcast_to(trials.astype(dtype), (n,))
        key_z, key_p, key_x = jr.split(key, 3)
        z = jr.categorical(key_z, self.weight_logits, shape=(n,))
        p = jr.dirichlet(key_p, self.concentrations[z], dtype=dtype)
        x = jr.multinomial(key_x, trials, p, dtype=dtype)
        return x, z

    @classmethod
    def initialize(
        cls,
        key: Key,
        x: Data,
        num_components: int,
        *,
        min_concentration: float = DEFAULT_MIN_CONCENTRATION,
    ) -> "DirichletMultinomialMixture":
        r"""A random start from the data: uniform weights and concentrations
        $a_k = V\, m_k$ (total $V$) with means
        $m_k \propto (\tfrac12 \bar p + \tfrac12 p_{i_k}) e^{u_k}$, where $\bar p$ are the
        data's category frequencies and $p_{i_k}$ those of ``num_components`` distinct
        random data (both with one pseudo-count per category, so every mean is positive) and
        $u_k \sim \mathrm U(-\tfrac12, \tfrac12)^V$ random factors that break ties.

        Float data give a model of the same dtype; integer data the default float.
        Raises ``ValueError`` if ``num_components`` exceeds the number of data.
        """
        min_concentration = _check_min_concentration(min_concentration)
        x = jnp.asarray(x)
        _check_counts(x, None)
        dtype = _float_dtype(x)
        x = x.astype(dtype)
        n, v = x.shape
        k = _check_num_components(num_components, n)
        key_idx, key_u = jr.split(key)
        idx = jr.choice(key_idx, n, (k,), replace=False)
        totals = jnp.sum(x, axis=0)
        overall = (totals + 1) / (jnp.sum(totals) + v)
        chosen = (x[idx] + 1) / (jnp.sum(x[idx], axis=1, keepdims=True) + v)
        u = jr.uniform(key_u, (k, v), dtype, -0.5, 0.5)
        means = (0.5 * overall[None, :] + 0.5 * chosen) * jnp.exp(u)
        means = means / jnp.sum(means, axis=1, keepdims=True)
        concentrations = jnp.maximum(v * means, min_concentration)
        weights = jnp.full((k,), 1.0 / k, dtype)
        return cls(weights, concentrations, min_concentration=min_concentration)
