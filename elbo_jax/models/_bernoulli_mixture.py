r"""A mixture of products of Bernoullis: $K$ "coins" for $D$-dimensional binary data.

$$p(x, z{=}k \mid \theta) = \pi_k \prod_{d=1}^D \mu_{kd}^{x_d} (1 - \mu_{kd})^{1 - x_d},
\qquad x \in \{0, 1\}^D,$$

an exponential family in $x$ given $z$, so the exact M-step is closed form from the
expected counts $N_k = \sum_n r_{nk}$ and sums $S_{kd} = \sum_n r_{nk} x_{nd}$ (with
$r_{nk} = q_n(z{=}k)$): $\pi_k = N_k / N$, $\mu_{kd} = S_{kd} / N_k$. With the conjugate
``BernoulliMixturePrior`` (Dirichlet on $\pi$, Beta on each $\mu_{kd}$) the MAP M-step is
closed form too.
"""

import math
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._custom_types import Array, Data, Float, Int, Key, LogTable, Scalar, Stats
from .._q import AbstractQ
from .._validate import is_concrete, is_number, to_python_number
from ._emissions import (
    bernoulli_log_density,
    bernoulli_maximize,
    clipped_logit,
    complete_data_count_statistics,
    count_statistics,
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

DEFAULT_MIN_PROB = 1e-6
"""Default floor (and ``1 - min_prob`` ceiling) on the Bernoulli probabilities."""


# --------------------------------------------------------------------------- helpers
def _check_min_prob(value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or not 0 < value < 0.5:
        raise ValueError(f"min_prob must be a number in (0, 0.5), got {value!r}")
    return float(value)


def _binary_entries(x: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(x)
    return v, (v == 0) | (v == 1)


def _check_binary(x: Any, dim: int | None) -> None:
    """``x`` must be ``(N, D)`` (with the model's ``D``), entries in {0, 1}."""
    requirement = "x must be binary (entries 0 or 1) for a BernoulliMixture"
    _check_data(x, dim, _binary_entries, requirement)


# --------------------------------------------------------------------------- prior
class BernoulliMixturePrior(eqx.Module):
    r"""Conjugate prior for ``BernoulliMixture``: $\pi \sim \mathrm{Dir}(\alpha 1_K)$,
    $\mu_{kd} \sim \mathrm{Beta}(a, b)$ independently.

    Called on a model it gives $\log p(\theta)$ in the constrained parameters $(\pi, \mu)$
    (no Jacobian), which is what MAP-EM maximises; ``BernoulliMixture.maximize`` knows its
    closed-form mode
    $\pi_k \propto N_k + \alpha - 1$, $\mu_{kd} = (S_{kd} + a - 1) / (N_k + a + b - 2)$.
    ``a = b = 2`` is add-one (Laplace) smoothing; ``alpha = a = b = 1`` is maximum likelihood.

    **Arguments:** ``concentration`` ($\alpha \ge 1$), ``a`` $\ge 1$, ``b`` $\ge 1$ — at least
    one so that the mode exists in the interior whatever the data.

    ```python
    prior = ej.models.BernoulliMixturePrior(concentration=1.0, a=2.0, b=2.0)
    res = ej.fit(model, x, prior=prior)     # closed-form MAP-EM
    ```
    """

    # NumPy scalars become Python floats: static fields, and no NumPy dtype in the maths.
    concentration: float = eqx.field(static=True, default=1.0, converter=to_python_number)
    a: float = eqx.field(static=True, default=2.0, converter=to_python_number)
    b: float = eqx.field(static=True, default=2.0, converter=to_python_number)

    def __check_init__(self):
        for name in ("concentration", "a", "b"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value) or value < 1:
                raise ValueError(
                    f"{name} must be a finite number >= 1 (so the MAP mode exists), got {value!r}"
                )

    def __call__(self, model: "BernoulliMixture") -> Scalar:
        r"""$\log \mathrm{Dir}(\pi \mid \alpha)
        + \sum_{k,d} \log \mathrm{Beta}(\mu_{kd} \mid a, b)$."""
        if not isinstance(model, BernoulliMixture):
            raise TypeError(
                f"BernoulliMixturePrior needs a BernoulliMixture, got {type(model).__name__}"
            )
        alpha, a, b = float(self.concentration), float(self.a), float(self.b)
        k, d = model.num_components, model.dim
        log_dirichlet = _log_symmetric_dirichlet(model.log_weights, alpha)
        log_beta_fn = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        log_beta = (a - 1) * jnp.sum(jax.nn.log_sigmoid(model.logits)) + (b - 1) * jnp.sum(
            jax.nn.log_sigmoid(-model.logits)
        )
        return log_dirichlet + log_beta - k * d * log_beta_fn


# --------------------------------------------------------------------------- model
@final
class BernoulliMixture(AbstractMixture):
    r"""A mixture of $K$ products of $D$ Bernoullis, for binary data $x \in \{0,1\}^D$.

    $$\log p(x, z{=}k \mid \theta) = \log \pi_k + \sum_{d=1}^D \big[x_d \log \mu_{kd}
      + (1 - x_d) \log(1 - \mu_{kd})\big]$$

    ``log_joint`` acts on one datum; elbo_jax does the ``vmap`` over data, and
    ``log_joint_table`` gives the whole $(N, K)$ table with one matmul,
    $T = x\, \ell^\top + \mathbf 1 \big(\sum_d \log \sigma(-\ell_{kd}) + \log \pi_k\big)^\top$
    with $\ell = \mathrm{logit}\,\mu$.

    Parameters are stored unconstrained — ``weight_logits`` ($\log \pi$ up to a constant)
    and ``logits`` ($\ell$) — so ``ej.GradientMStep`` works on them directly.

    **Closed-form M-step** (``ej.fit``'s default): $\pi_k = N_k / N$,
    $\mu_{kd} = S_{kd} / N_k$, or the MAP mode under ``BernoulliMixturePrior``. An MLE of
    exactly 0 or 1 would make a logit infinite, so the M-step clips $\mu$ to
    ``[min_prob, 1 - min_prob]`` (by clipping $|\ell| \le \mathrm{logit}(1 - $ ``min_prob``$)$).
    A component with (numerically) zero expected count keeps its previous $\mu_k$ and gets
    the smallest normal weight, so empty components never give NaN.

    **Arguments:**

    - `weights`: mixing weights $\pi$, shape ``(K,)``, positive, summing to 1.
    - `probs`: $\mu$, shape ``(K, D)``, in $[0, 1]$ (clipped to
      ``[min_prob, 1 - min_prob]``).
    - `min_prob`: the floor described above (static; default ``1e-6``).

    The model's dtype is that of the inputs (float32 in, float32 model).

    ```python
    model = ej.models.BernoulliMixture.initialize(jax.random.key(0), x, 10)
    res = ej.fit(model, x)
    res.model.probs, res.model.predict(x)
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("weights", "probs")
    weight_logits: Float[Array, " K"]
    logits: Float[Array, "K D"]
    min_prob: float = eqx.field(static=True)

    def __init__(self, weights: Any, probs: Any, *, min_prob: float = DEFAULT_MIN_PROB):
        min_prob = _check_min_prob(min_prob)
        weights, probs = jnp.asarray(weights), jnp.asarray(probs)
        dtype = _float_dtype(weights, probs)
        weights, probs = weights.astype(dtype), probs.astype(dtype)
        _check_weights(weights)
        if probs.ndim != 2 or probs.shape[0] != weights.shape[0] or probs.shape[1] < 1:
            raise ValueError(
                f"probs has shape {probs.shape}, expected (K, D) with K={weights.shape[0]} "
                "(the length of weights) and D >= 1"
            )
        if is_concrete(probs):
            p = np.asarray(probs)
            if not np.all((p >= 0) & (p <= 1)):
                raise ValueError("probs must lie in [0, 1] (and be finite)")
        self.min_prob = min_prob
        self.weight_logits = jnp.log(weights)
        self.logits = clipped_logit(probs, min_prob)

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """$D$, the number of binary variables per datum."""
        return self.logits.shape[1]

    @property
    def probs(self) -> Float[Array, "K D"]:
        r"""$\mu = \sigma$(``logits``)."""
        return jax.nn.sigmoid(self.logits)

    def _as_data(self, x: Data) -> Array:
        return jnp.asarray(x).astype(self.logits.dtype)

    # ------------------------------------------------------------ densities
    def log_joint(self, x: Float[Array, " D"], z: Int[Array, ""]) -> Scalar:
        r"""$\log \pi_z + \sum_d [x_d \log \mu_{zd} + (1 - x_d) \log(1 - \mu_{zd})]$, one datum."""
        x = self._as_data(x)
        logits = self.logits[z]
        log_w = self.log_weights[z]
        return log_w + jnp.sum(
            x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits)
        )

    def log_joint_table(self, x: Data) -> LogTable:
        r"""$T_{nk} = \log p(x_n, z{=}k)$, shape ``(N, K)``, by one matmul (see the class docs).

        A hook for data already checked (``fit``, ``predict``, … check ``x`` first)."""
        x = self._as_data(x)  # a hook on prepared data: the evaluation functions check x
        return bernoulli_log_density(x, self.logits) + self.log_weights[None, :]

    def check_data(self, x: Data) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(N, D)`` with this model's ``D`` and binary."""
        _check_binary(x, self.dim)

    # ------------------------------------------------------------ closed-form M-step
    def has_closed_form(self, prior: Any) -> bool:
        """True for maximum likelihood (``None``) and for a ``BernoulliMixturePrior``."""
        return prior is None or isinstance(prior, BernoulliMixturePrior)

    def sufficient_statistics(
        self, x: Data, q: AbstractQ, *, weights: Array | None = None
    ) -> Stats:
        r"""``{"counts": N_k (K,), "sums": S_kd (K, D)}`` with $N_k = \sum_n w_n r_{nk}$ and
        $S_{kd} = \sum_n w_n r_{nk} x_{nd}$, $r_{nk} = q_n(z{=}k)$, $w_n$ = ``weights``
        (``None``: all 1).

        Plain sums of nonnegative terms: they merge by addition and keep float32's relative
        accuracy whatever the data's magnitude (no cancellation, so no shift is needed).
        """
        r = _responsibilities(self, x, q, weights=weights, dtype=self.logits.dtype)
        return count_statistics(self._as_data(x), r)

    def complete_data_statistics(self, num_data: Any) -> Stats:
        r"""The expected statistics of $m$ = ``num_data`` draws from this model:
        $N_k = m \pi_k$, $S_{kd} = m \pi_k \mu_{kd}$, so that ``maximize`` gives back the
        model (up to rounding and the ``min_prob`` clip)."""
        return complete_data_count_statistics(_complete_data_counts(self, num_data), self.probs)

    def maximize(self, stats: Stats, prior: Any = None) -> "BernoulliMixture":
        r"""The closed-form (MAP) M-step from ``sufficient_statistics``.

        $\pi_k \propto N_k + \alpha - 1$, $\mu_{kd} = (S_{kd} + a - 1)/(N_k + a + b - 2)$
        ($\alpha = a = b = 1$ without a prior), clipped as described in the class docs; a
        component whose denominator is zero keeps its previous $\mu_k$.
        """
        if prior is None:
            alpha, a, b = 1.0, 1.0, 1.0
        elif isinstance(prior, BernoulliMixturePrior):
            alpha, a, b = float(prior.concentration), float(prior.a), float(prior.b)
        else:
            raise TypeError(
                f"BernoulliMixture.maximize knows BernoulliMixturePrior or None, got {prior!r}"
            )
        dtype = self.logits.dtype
        counts = stats["counts"].astype(dtype)
        sums = stats["sums"].astype(dtype)
        logits = bernoulli_maximize(counts, sums, self.logits, min_prob=self.min_prob, a=a, b=b)
        weight_logits = _weight_logits(jnp.maximum(counts + (alpha - 1), 0.0))
        return eqx.tree_at(lambda m: (m.weight_logits, m.logits), self, (weight_logits, logits))

    # ------------------------------------------------------------ use
    def sample(self, key: Key, n: int) -> tuple[Float[Array, "N D"], Int[Array, " N"]]:
        """``n`` draws ``(x, z)``: ``x`` ``(n, D)`` in the model's float dtype, ``z`` ``(n,)``."""
        key_z, key_x = jr.split(key)
        z = jr.categorical(key_z, self.weight_logits, shape=(n,))
        x = jr.bernoulli(key_x, self.probs[z]).astype(self.logits.dtype)
        return x, z

    @classmethod
    def initialize(
        cls, key: Key, x: Data, num_components: int, *, min_prob: float = DEFAULT_MIN_PROB
    ) -> "BernoulliMixture":
        r"""A random start from the data: uniform weights and
        $\mu_k = \mathrm{clip}(0.5\, \bar x + 0.3\, x_{i_k} + 0.2\, u_k,\ 0.05,\ 0.95)$ for
        ``num_components`` distinct random data points $x_{i_k}$ ($\bar x$: the data mean,
        $u_k \sim \mathrm{U}(0, 1)^D$ breaks ties between identical data points).

        Float data give a model of the same dtype; integer or bool data the default float.
        Raises ``ValueError`` if ``num_components`` exceeds the number of data.
        """
        x = jnp.asarray(x)
        _check_binary(x, None)
        dtype = _float_dtype(x)
        x = x.astype(dtype)
        n = x.shape[0]
        k = _check_num_components(num_components, n)
        key_idx, key_u = jr.split(key)
        idx = jr.choice(key_idx, n, (k,), replace=False)
        u = jr.uniform(key_u, (k, x.shape[1]), dtype)
        mean = jnp.mean(x, axis=0)
        probs = jnp.clip(0.5 * mean[None, :] + 0.3 * x[idx] + 0.2 * u, 0.05, 0.95)
        weights = jnp.full((k,), 1.0 / k, dtype)
        return cls(weights, probs, min_prob=min_prob)
