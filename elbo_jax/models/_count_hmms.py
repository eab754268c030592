r"""HMMs with count emissions: categorical symbols (``CategoricalHMM``) and Poisson counts
(``PoissonHMM``), on the shared emission families (``_emissions``)."""

from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._custom_types import Array, Float, Int, Key, Scalar
from .._sequences import Sequences, as_sequences
from .._validate import canonical_float_dtype, check_number, is_integer
from ._emissions import (
    categorical_log_density,
    categorical_maximize,
    categorical_statistics,
    complete_data_count_statistics,
    count_statistics,
    poisson_log_density,
    poisson_maximize,
)
from ._hmm import (
    HMM,
    HMMPrior,
    chain_complete_statistics,
    chain_statistics,
    check_chain_parameters,
    check_frames,
    maximize_chain,
    safe_log,
)
from ._poisson_mixture import DEFAULT_MIN_RATE


def _check_states(num_states: Any) -> int:
    if not is_integer(num_states) or num_states < 1:
        raise ValueError(f"num_states must be a positive int, got {num_states!r}")
    return int(num_states)


def _uniform_chain(k: int, dtype: Any) -> tuple[Array, Array]:
    return jnp.full((k,), 1.0 / k, dtype), jnp.full((k, k), 1.0 / k, dtype)


def _real_frames(x: Any) -> np.ndarray:
    seqs = as_sequences(x)
    return np.concatenate(seqs.to_list())


@final
class CategoricalHMM(HMM):
    r"""A hidden Markov model whose frames are symbols $x_t \in \{0, \dots, M-1\}$:
    $p(x_t{=}m \mid z_t{=}k) = B_{km}$.

    Exact EM in closed form: $B_{km} \propto \sum_{n,t} q(z_t{=}k)[x_t{=}m]$ (hmmlearn's
    ``CategoricalHMM``), $\pi$ and $A$ as for every built-in HMM (``HMMPrior`` for MAP).

    **Arguments:** `initial_probs` ``(K,)``, `transition_matrix` ``(K, K)``,
    `emission_probs` ``(K, M)`` (rows summing to 1). Data: integer symbols ``(N, T)`` or
    ``ej.Sequences``.
    """

    printed_parameters: ClassVar[tuple[str, ...]] = (
        "initial_probs",
        "transition_matrix",
        "emission_probs",
    )
    emission_logits: Float[Array, "K M"]

    def __init__(self, initial_probs: Any, transition_matrix: Any, emission_probs: Any):
        dtype = canonical_float_dtype(initial_probs, transition_matrix, emission_probs)
        initial, transition = check_chain_parameters(initial_probs, transition_matrix, dtype)
        k = initial.shape[0]
        emission = jnp.asarray(emission_probs, dtype)
        if emission.ndim != 2 or emission.shape[0] != k or emission.shape[1] < 1:
            raise ValueError(
                f"emission_probs has shape {emission.shape}, expected (K, M) with K={k}"
            )
        if not isinstance(emission, jax.core.Tracer):
            b = np.asarray(emission, np.float64)
            tol = float(jnp.finfo(dtype).eps) ** 0.5
            if not (np.all(b >= 0) and np.all(np.abs(b.sum(1) - 1) <= tol)):
                raise ValueError("emission_probs must have rows of entries >= 0 summing to 1")
        self.initial_logits = safe_log(initial)
        self.transition_logits = safe_log(transition)
        self.emission_logits = safe_log(emission)

    @property
    def num_symbols(self) -> int:
        return self.emission_logits.shape[-1]

    @property
    def emission_probs(self) -> Float[Array, "K M"]:
        r"""$B_{km} = p(x_t{=}m \mid z_t{=}k)$."""
        return jax.nn.softmax(self.emission_logits, axis=-1)

    @property
    def n_parameters(self) -> int:
        k = self.num_states
        return k - 1 + k * (k - 1) + k * (self.num_symbols - 1)

    def _log_probs(self) -> Array:
        return jax.nn.log_softmax(self.emission_logits, axis=-1)

    def emission_log_density(self, frame: Int[Array, ""], state: Int[Array, ""]) -> Scalar:
        return self._log_probs()[state, frame.astype(jnp.int32)]

    def emission_log_table(self, frames: Int[Array, "N T"]) -> Float[Array, "N T K"]:
        return categorical_log_density(frames.astype(jnp.int32), self._log_probs())

    def check_data(self, x: Any) -> None:
        """Integer symbols ``(N, T)`` in ``[0, M)``."""
        check_frames(x, (), "CategoricalHMM")
        frames = x.frames
        if isinstance(frames, jax.core.Tracer):
            return
        values = np.asarray(frames)
        real = np.asarray(x.mask())
        if values.dtype.kind == "f" and not np.all(values[real] == np.round(values[real])):
            raise ValueError("x must hold integer symbols, got non-integer values")
        if values[real].size and (values[real].min() < 0 or values[real].max() >= self.num_symbols):
            raise ValueError(
                f"x holds symbols outside [0, M) = [0, {self.num_symbols}): "
                f"min {values[real].min()}, max {values[real].max()}"
            )

    def has_closed_form(self, prior: Any) -> bool:
        return prior is None or isinstance(prior, HMMPrior)

    def sufficient_statistics(self, x: Sequences, q: Any, *, weights: Any = None) -> dict:
        r"""The chain's statistics and $C_{km} = \sum_{n,t} w_n q(z_{nt}{=}k)[x_{nt}{=}m]$."""
        stats, marginals = chain_statistics(self, x, q, weights)
        n, t, k = marginals.shape
        symbols = x.frames.reshape(n * t).astype(jnp.int32)
        stats["emissions"] = categorical_statistics(
            symbols, marginals.reshape(n * t, k), self.num_symbols
        )
        return stats

    def complete_data_statistics(
        self, num_data: Any, lengths: Any, *, weights: Any = None, num_steps: int | None = None
    ) -> dict:
        """The expected statistics of ``num_data`` sequences drawn from the model, of the
        ``lengths`` given (``chain_complete_statistics``): $C_{km} = o_k p_{km}$."""
        stats, occupancy = chain_complete_statistics(self, num_data, lengths, weights, num_steps)
        stats["emissions"] = occupancy[:, None] * jnp.exp(self._log_probs())
        return stats

    def maximize(self, stats: dict, prior: Any = None) -> "CategoricalHMM":
        initial_logits, transition_logits = maximize_chain(self, stats, prior)
        emission = categorical_maximize(stats["emissions"], self._log_probs())
        return eqx.tree_at(
            lambda m: (m.initial_logits, m.transition_logits, m.emission_logits),
            self,
            (initial_logits, transition_logits, emission),
        )

    def sample_frames(self, key: Key, states: Int[Array, "N T"]) -> Int[Array, "N T"]:
        return jr.categorical(key, self._log_probs()[states], axis=-1)

    @classmethod
    def initialize(cls, key: Key, x: Any, num_states: int) -> "CategoricalHMM":
        r"""A starting model: uniform initial and transition probabilities, and emission
        probabilities that are the symbols' frequencies in the data perturbed at random per
        state (a symmetric start would never break symmetry)."""
        k = _check_states(num_states)
        frames = _real_frames(x).astype(np.int64).ravel()
        dtype = canonical_float_dtype(np.zeros((), float))
        m = int(frames.max()) + 1
        freq = np.bincount(frames, minlength=m) + 1.0
        # In JAX, so that a vmapped initializer (ej.fit(..., restarts=R)) can trace it.
        noise = jr.uniform(key, (k, m), dtype, minval=0.5, maxval=1.5)
        emission = jnp.asarray(freq, dtype)[None] * noise
        initial, transition = _uniform_chain(k, dtype)
        return cls(initial, transition, emission / emission.sum(1, keepdims=True))


@final
class PoissonHMM(HMM):
    r"""A hidden Markov model with independent Poisson counts in $D$ dimensions:
    $x_{td} \mid z_t{=}k \sim \mathrm{Poisson}(\lambda_{kd})$.

    Exact EM in closed form: $\lambda_{kd} = \sum_{n,t} q(z_t{=}k)x_{td} / \sum_{n,t} q(z_t{=}k)$
    (hmmlearn's ``PoissonHMM``), floored at ``min_rate``.

    **Arguments:** `initial_probs` ``(K,)``, `transition_matrix` ``(K, K)``, `rates` ``(K, D)``
    positive; `min_rate`. Data: counts ``(N, T, D)`` or ``ej.Sequences``.
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("initial_probs", "transition_matrix", "rates")
    log_rates: Float[Array, "K D"]
    min_rate: float = eqx.field(static=True)

    def __init__(
        self,
        initial_probs: Any,
        transition_matrix: Any,
        rates: Any,
        *,
        min_rate: float = DEFAULT_MIN_RATE,
    ):
        dtype = canonical_float_dtype(initial_probs, transition_matrix, rates)
        initial, transition = check_chain_parameters(initial_probs, transition_matrix, dtype)
        k = initial.shape[0]
        rates = jnp.asarray(rates, dtype)
        if rates.ndim != 2 or rates.shape[0] != k or rates.shape[1] < 1:
            raise ValueError(f"rates has shape {rates.shape}, expected (K, D) with K={k}")
        if not isinstance(rates, jax.core.Tracer) and not np.all(np.asarray(rates) > 0):
            raise ValueError("rates must be positive")
        self.min_rate = check_number("min_rate", min_rate, low=0, low_inclusive=False)
        self.initial_logits = safe_log(initial)
        self.transition_logits = safe_log(transition)
        self.log_rates = jnp.log(rates)

    @property
    def dim(self) -> int:
        return self.log_rates.shape[-1]

    @property
    def rates(self) -> Float[Array, "K D"]:
        r"""$\lambda_{kd}$."""
        return jnp.exp(self.log_rates)

    @property
    def n_parameters(self) -> int:
        k = self.num_states
        return k - 1 + k * (k - 1) + k * self.dim

    def emission_log_density(self, frame: Float[Array, " D"], state: Int[Array, ""]) -> Scalar:
        return poisson_log_density(frame[None], self.log_rates)[0, state]

    def emission_log_table(self, frames: Float[Array, "N T D"]) -> Float[Array, "N T K"]:
        n, t, d = frames.shape
        return poisson_log_density(frames.reshape(n * t, d), self.log_rates).reshape(n, t, -1)

    def check_data(self, x: Any) -> None:
        """Counts ``(N, T, D)``: non-negative integers."""
        check_frames(x, (self.dim,), "PoissonHMM")
        frames = x.frames
        if isinstance(frames, jax.core.Tracer):
            return
        values = np.asarray(frames)
        if np.any(values < 0) or not np.all(values == np.round(values)):
            raise ValueError("x must hold counts: non-negative integers")

    def has_closed_form(self, prior: Any) -> bool:
        return prior is None or isinstance(prior, HMMPrior)

    def sufficient_statistics(self, x: Sequences, q: Any, *, weights: Any = None) -> dict:
        r"""The chain's statistics and $N_k = \sum q(z_t{=}k)$, $S_{kd} = \sum q(z_t{=}k)x_{td}$."""
        stats, marginals = chain_statistics(self, x, q, weights)
        n, t, k = marginals.shape
        frames = x.frames.reshape(n * t, -1).astype(marginals.dtype)
        stats["emissions"] = count_statistics(frames, marginals.reshape(n * t, k))
        return stats

    def complete_data_statistics(
        self, num_data: Any, lengths: Any, *, weights: Any = None, num_steps: int | None = None
    ) -> dict:
        r"""The expected statistics of ``num_data`` sequences drawn from the model, of the
        ``lengths`` given (``chain_complete_statistics``): $N_k = o_k$, $S_{kd} = o_k
        \lambda_{kd}$."""
        stats, occupancy = chain_complete_statistics(self, num_data, lengths, weights, num_steps)
        stats["emissions"] = complete_data_count_statistics(occupancy, self.rates)
        return stats

    def maximize(self, stats: dict, prior: Any = None) -> "PoissonHMM":
        initial_logits, transition_logits = maximize_chain(self, stats, prior)
        emission = stats["emissions"]
        log_rates = poisson_maximize(
            emission["counts"], emission["sums"], self.log_rates, min_rate=self.min_rate
        )
        return eqx.tree_at(
            lambda m: (m.initial_logits, m.transition_logits, m.log_rates),
            self,
            (initial_logits, transition_logits, log_rates),
        )

    def sample_frames(self, key: Key, states: Int[Array, "N T"]) -> Float[Array, "N T D"]:
        rates = self.rates[states]
        return jr.poisson(key, rates, rates.shape).astype(rates.dtype)

    @classmethod
    def initialize(cls, key: Key, x: Any, num_states: int) -> "PoissonHMM":
        r"""A starting model: uniform initial and transition probabilities, and the rates
        of ``PoissonMixture.initialize`` on all frames (random frames blended with the mean)."""
        from ._poisson_mixture import PoissonMixture

        k = _check_states(num_states)
        frames = _real_frames(x)
        if frames.ndim != 2:
            raise ValueError(f"x has frames of shape {frames.shape[1:]}, expected (D,)")
        start = PoissonMixture.initialize(key, frames, k)
        initial, transition = _uniform_chain(k, start.log_rates.dtype)
        return cls(initial, transition, start.rates, min_rate=start.min_rate)
