r"""A mixture of products of Poissons: $K$ components for $D$-dimensional count data.

$$p(x, z{=}k \mid \theta) = \pi_k \prod_{d=1}^D \frac{\lambda_{kd}^{x_d} e^{-\lambda_{kd}}}{x_d!},
\qquad x \in \{0, 1, 2, \dots\}^D,$$

an exponential family in $x$ given $z$, so the exact M-step is closed form from the
expected counts $N_k = \sum_n r_{nk}$ and sums $S_{kd} = \sum_n r_{nk} x_{nd}$ (with
$r_{nk} = q_n(z{=}k)$): $\pi_k = N_k / N$, $\lambda_{kd} = S_{kd} / N_k$. With the conjugate
``PoissonMixturePrior`` (Dirichlet on $\pi$, Gamma on each $\lambda_{kd}$) the MAP M-step is
closed form too.
"""

import math
from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.special as jss
import numpy as np

from .._custom_types import Array, Data, Float, Int, Key, LogTable, Scalar, Stats
from .._q import AbstractQ
from .._validate import is_concrete, is_number, to_python_number
from ._emissions import (
    complete_data_count_statistics,
    count_statistics,
    poisson_log_density,
    poisson_maximize,
)
from ._mixture import (
    AbstractMixture,
    _check_data,
    _check_num_components,
    _check_weights,
    _complete_data_counts,
    _float_dtype,
    _log_symmetric_dirichlet,
    _responsibilities,
    _weight_logits,
)

DEFAULT_MIN_RATE = 1e-6
"""Default floor on the Poisson rates set by the closed-form M-step."""


# --------------------------------------------------------------------------- helpers
def _check_positive_number(name: str, value: Any, *, at_least_one: bool = False) -> float:
    bad = not is_number(value) or not math.isfinite(value)
    if bad or (value < 1 if at_least_one else value <= 0):
        want = ">= 1 (so the MAP mode exists)" if at_least_one else "> 0"
        raise ValueError(f"{name} must be a finite number {want}, got {value!r}")
    return float(value)


def _count_entries(x: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(x, np.float64)
    return v, np.isfinite(v) & (v >= 0) & (v == np.round(v))


def _check_counts(x: Any, dim: int | None) -> None:
    """``x`` must be ``(N, D)`` (with the model's ``D``), entries nonnegative integers."""
    requirement = "x must hold nonnegative integer counts for a PoissonMixture"
    _check_data(x, dim, _count_entries, requirement)


# --------------------------------------------------------------------------- prior
class PoissonMixturePrior(eqx.Module):
    r"""Conjugate prior for ``PoissonMixture``: $\pi \sim \mathrm{Dir}(\alpha 1_K)$,
    $\lambda_{kd} \sim \mathrm{Gamma}(\text{shape}, \text{rate})$ independently.

    Called on a model it gives $\log p(\theta)$ in the constrained parameters
    $(\pi, \lambda)$ (no Jacobian), which is what MAP-EM maximises; ``PoissonMixture.maximize``
    knows its closed-form mode
    $\pi_k \propto N_k + \alpha - 1$,
    $\lambda_{kd} = (S_{kd} + \text{shape} - 1)/(N_k + \text{rate})$.

    **Arguments:** ``concentration`` ($\alpha \ge 1$), ``shape`` $\ge 1$ (so that the mode
    exists), ``rate`` $> 0$. The default Gamma(1, 1) is an Exponential(1) prior on each rate.

    ```python
    prior = ej.models.PoissonMixturePrior(concentration=1.0, shape=2.0, rate=0.5)
    res = ej.fit(model, x, prior=prior)     # closed-form MAP-EM
    ```
    """

    # NumPy scalars become Python floats: static fields, and no NumPy dtype in the maths.
    concentration: float = eqx.field(static=True, default=1.0, converter=to_python_number)
    shape: float = eqx.field(static=True, default=1.0, converter=to_python_number)
    rate: float = eqx.field(static=True, default=1.0, converter=to_python_number)

    def __check_init__(self):
        _check_positive_number("concentration", self.concentration, at_least_one=True)
        _check_positive_number("shape", self.shape, at_least_one=True)
        _check_positive_number("rate", self.rate)

    def __call__(self, model: "PoissonMixture") -> Scalar:
        r"""$\log \mathrm{Dir}(\pi \mid \alpha) + \sum_{k,d} \log \mathrm{Gamma}(\lambda_{kd} \mid
        \text{shape}, \text{rate})$."""
        if not isinstance(model, PoissonMixture):
            raise TypeError(
                f"PoissonMixturePrior needs a PoissonMixture, got {type(model).__name__}"
            )
        alpha, shape, rate = float(self.concentration), float(self.shape), float(self.rate)
        k, d = model.num_components, model.dim
        log_dirichlet = _log_symmetric_dirichlet(model.log_weights, alpha)
        log_gamma = (shape - 1) * jnp.sum(model.log_rates) - rate * jnp.sum(model.rates)
        log_gamma_norm = k * d * (shape * math.log(rate) - math.lgamma(shape))
        return log_dirichlet + log_gamma + log_gamma_norm


# --------------------------------------------------------------------------- model
@final
class PoissonMixture(AbstractMixture):
    r"""A mixture of $K$ products of $D$ Poissons, for count data $x \in \mathbb N^D$.

    $$\log p(x, z{=}k \mid \theta) = \log \pi_k + \sum_{d=1}^D \big[x_d \log \lambda_{kd}
      - \lambda_{kd} - \log \Gamma(x_d + 1)\big]$$

    The $\log x_d!$ term is included, so ``ej.log_evidence`` is the true log-likelihood.
    ``log_joint`` acts on one datum; elbo_jax does the ``vmap`` over data, and
    ``log_joint_table`` gives the whole $(N, K)$ table with one matmul,
    $T = x\, (\log\lambda)^\top + \mathbf 1 (\log \pi - \lambda \mathbf 1)^\top
    - \log\Gamma(x + 1) \mathbf 1\, \mathbf 1^\top$.

    Parameters are stored unconstrained — ``weight_logits`` ($\log \pi$ up to a constant)
    and ``log_rates`` — so ``ej.GradientMStep`` works on them directly.

    **Closed-form M-step** (``ej.fit``'s default): $\pi_k = N_k / N$,
    $\lambda_{kd} = S_{kd} / N_k$, or the MAP mode under ``PoissonMixturePrior``. A component
    whose data are all zero in a dimension would get $\lambda = 0$ and
    $\log\lambda = -\infty$, so the M-step floors the rates at ``min_rate``. A component with
    (numerically) zero expected count keeps its previous rates and gets the smallest normal
    weight, so empty components never give NaN.

    **Arguments:**

    - `weights`: mixing weights $\pi$, shape ``(K,)``, positive, summing to 1.
    - `rates`: $\lambda$, shape ``(K, D)``, positive.
    - `min_rate`: the floor described above (static; default ``1e-6``).

    The model's dtype is that of the inputs (float32 in, float32 model).

    ```python
    model = ej.models.PoissonMixture.initialize(jax.random.key(0), counts, 3)
    res = ej.fit(model, counts)
    res.model.rates, res.model.predict(counts)
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("weights", "rates")
    weight_logits: Float[Array, " K"]
    log_rates: Float[Array, "K D"]
    min_rate: float = eqx.field(static=True)
    # In fit's exact EM, x and log x! are computed once and each pass's table is their
    # product with (log rates, -1) (see Model); the hook would redo gammaln every pass.
    _table_from_features = True

    def __init__(self, weights: Any, rates: Any, *, min_rate: float = DEFAULT_MIN_RATE):
        min_rate = _check_positive_number("min_rate", min_rate)
        weights, rates = jnp.asarray(weights), jnp.asarray(rates)
        dtype = _float_dtype(weights, rates)
        weights, rates = weights.astype(dtype), rates.astype(dtype)
        _check_weights(weights)
        if rates.ndim != 2 or rates.shape[0] != weights.shape[0] or rates.shape[1] < 1:
            raise ValueError(
                f"rates has shape {rates.shape}, expected (K, D) with K={weights.shape[0]} "
                "(the length of weights) and D >= 1"
            )
        if is_concrete(rates):
            r = np.asarray(rates)
            if not np.all(np.isfinite(r) & (r > 0)):
                raise ValueError("rates must be finite and > 0")
        self.min_rate = min_rate
        self.weight_logits = jnp.log(weights)
        self.log_rates = jnp.log(rates)

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """$D$, the number of counts per datum."""
        return self.log_rates.shape[1]

    @property
    def rates(self) -> Float[Array, "K D"]:
        r"""$\lambda = \exp$(``log_rates``)."""
        return jnp.exp(self.log_rates)

    def _as_data(self, x: Data) -> Array:
        return jnp.asarray(x).astype(self.log_rates.dtype)

    # ------------------------------------------------------------ densities
    def log_joint(self, x: Float[Array, " D"], z: Int[Array, ""]) -> Scalar:
        r"""$\log \pi_z + \sum_d [x_d \log \lambda_{zd} - \lambda_{zd} - \log \Gamma(x_d + 1)]$
        for one datum."""
        x = self._as_data(x)
        log_rates = self.log_rates[z]
        log_w = self.log_weights[z]
        return log_w + jnp.sum(x * log_rates - jnp.exp(log_rates) - jss.gammaln(x + 1))

    def log_joint_table(self, x: Data) -> LogTable:
        r"""$T_{nk} = \log p(x_n, z{=}k)$, shape ``(N, K)``, by one matmul (see the class docs).

        A hook for data already checked (``fit``, ``predict``, … check ``x`` first)."""
        x = self._as_data(x)  # a hook on prepared data: the evaluation functions check x
        return poisson_log_density(x, self.log_rates) + self.log_weights[None, :]

    def check_data(self, x: Data) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, D)`` with this model's ``D`` and counts."""
        _check_counts(x, self.dim)

    # ------------------------------------------------------------ closed-form M-step
    def has_closed_form(self, prior: Any) -> bool:
        """True for maximum likelihood (``None``) and for a ``PoissonMixturePrior``."""
        return prior is None or isinstance(prior, PoissonMixturePrior)

    def sufficient_statistics(
        self, x: Data, q: AbstractQ, *, weights: Array | None = None
    ) -> Stats:
        r"""``{"counts": N_k (K,), "sums": S_kd (K, D)}`` with $N_k = \sum_n w_n r_{nk}$ and
        $S_{kd} = \sum_n w_n r_{nk} x_{nd}$, $r_{nk} = q_n(z{=}k)$, $w_n$ = ``weights``
        (``None``: all 1).

        Plain sums of nonnegative terms: they merge by addition and keep float32's relative
        accuracy whatever the data's magnitude (no cancellation, so no shift is needed).
        """
        r = _responsibilities(self, x, q, weights=weights, dtype=self.log_rates.dtype)
        return count_statistics(self._as_data(x), r)

    def complete_data_statistics(self, num_data: Any) -> Stats:
        r"""The expected statistics of $m$ = ``num_data`` draws from this model:
        $N_k = m \pi_k$, $S_{kd} = m \pi_k \lambda_{kd}$, so that ``maximize`` gives back the
        model (up to rounding and the ``min_rate`` floor)."""
        return complete_data_count_statistics(_complete_data_counts(self, num_data), self.rates)

    def maximize(self, stats: Stats, prior: Any = None) -> "PoissonMixture":
        r"""The closed-form (MAP) M-step from ``sufficient_statistics``.

        $\pi_k \propto N_k + \alpha - 1$, $\lambda_{kd} = \max\big((S_{kd} + \text{shape} - 1)
        / (N_k + \text{rate}),\ \text{min\_rate}\big)$ ($\alpha = \text{shape} = 1$,
        $\text{rate} = 0$ without a prior); a component whose denominator is zero keeps its
        previous rates.
        """
        if prior is None:
            alpha, shape, rate = 1.0, 1.0, 0.0
        elif isinstance(prior, PoissonMixturePrior):
            alpha, shape, rate = float(prior.concentration), float(prior.shape), float(prior.rate)
        else:
            raise TypeError(
                f"PoissonMixture.maximize knows PoissonMixturePrior or None, got {prior!r}"
            )
        dtype = self.log_rates.dtype
        counts = stats["counts"].astype(dtype)
        sums = stats["sums"].astype(dtype)
        log_rates = poisson_maximize(
            counts, sums, self.log_rates, min_rate=self.min_rate, shape=shape, rate=rate
        )
        weight_logits = _weight_logits(jnp.maximum(counts + (alpha - 1), 0.0))
        new = (weight_logits, log_rates)
        return eqx.tree_at(lambda m: (m.weight_logits, m.log_rates), self, new)

    # ------------------------------------------------------------ use
    def sample(self, key: Key, n: int) -> tuple[Float[Array, "N D"], Int[Array, " N"]]:
        """``n`` draws ``(x, z)``: counts ``x`` ``(n, D)`` as the model's floats, ``z`` ``(n,)``."""
        key_z, key_x = jr.split(key)
        z = jr.categorical(key_z, self.weight_logits, shape=(n,))
        x = jr.poisson(key_x, self.rates[z]).astype(self.log_rates.dtype)
        return x, z

    @classmethod
    def initialize(
        cls, key: Key, x: Data, num_components: int, *, min_rate: float = DEFAULT_MIN_RATE
    ) -> "PoissonMixture":
        r"""A random start from the data: uniform weights and
        $\lambda_k = \max\big((\tfrac12 \bar x + \tfrac12 x_{i_k}) e^{u_k}, \text{min\_rate}\big)$
        for ``num_components`` distinct random data points $x_{i_k}$ ($\bar x$: the data mean,
        $u_k \sim \mathrm U(-\tfrac12, \tfrac12)^D$ random factors that break ties).

        Float data give a model of the same dtype; integer data the default float.
        Raises ``ValueError`` if ``num_components`` exceeds the number of data.
        """
        min_rate = _check_positive_number("min_rate", min_rate)
        x = jnp.asarray(x)
        _check_counts(x, None)
        dtype = _float_dtype(x)
        x = x.astype(dtype)
        n = x.shape[0]
        k = _check_num_components(num_components, n)
        key_idx, key_u = jr.split(key)
        idx = jr.choice(key_idx, n, (k,), replace=False)
        u = jr.uniform(key_u, (k, x.shape[1]), dtype, -0.5, 0.5)
        mean = jnp.mean(x, axis=0)
        rates = jnp.maximum((0.5 * mean[None, :] + 0.5 * x[idx]) * jnp.exp(u), min_rate)
        weights = jnp.full((k,), 1.0 / k, dtype)
        return cls(weights, rates, min_rate=min_rate)
