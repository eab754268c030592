r"""The Gaussian HMM: $x_t \mid z_t{=}k \sim \mathcal N(\mu_k, \Sigma_k)$, with the Gaussian
mixture's emission maths (densities, float32-accurate shifted statistics, M-step, k-means++)."""

from typing import Any, ClassVar, Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._custom_types import Array, Float, Int, Key, Scalar
from .._q import Categorical
from .._sequences import Sequences, as_sequences
from .._validate import canonical_float_dtype, is_integer
from ._gaussian_mixture import GaussianMixture
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


@final
class GaussianHMM(HMM):
    r"""A hidden Markov model with Gaussian emissions in $D$ dimensions.

    $$p(x, z \mid \theta) = \pi_{z_0}\prod_t A_{z_{t-1}z_t}\prod_t
      \mathcal N(x_t \mid \mu_{z_t}, \Sigma_{z_t})$$

    Exact EM: forward–backward, then the closed-form M-step — $\pi$ and $A$ from the
    expected initial states and transitions (with an ``ej.models.HMMPrior``: the Dirichlet
    posterior mode), $\mu_k$ and $\Sigma_k$ as a Gaussian mixture's from the marginals
    $q(z_t{=}k)$ (hmmlearn's maximum-likelihood M-step, plus ``reg_covar`` on the diagonal).
    The emission parameters are stored as the ``GaussianMixture``'s (``loc``,
    ``raw_precision_factor``), so gradient steps move them freely.

    **Arguments:**

    - `initial_probs` ``(K,)``, `transition_matrix` ``(K, K)`` (rows summing to 1);
    - `means` ``(K, D)``; `covariances` ``(K, D, D)`` positive definite (``"full"``) or
      ``(K, D)`` variances (``"diag"``);
    - `covariance_type`: ``"full"`` or ``"diag"``; `reg_covar`: added to the diagonal of
      every covariance in the M-step (default 0, as hmmlearn's; see ``m_step_penalty``).

    ```python
    model = ej.models.GaussianHMM.initialize(jax.random.key(0), x, num_states=4)
    res = ej.fit(model, x)            # x: (N, T, D) or ej.Sequences(frames, lengths)
    res.model.predict(x)              # Viterbi paths (N, T)
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = (
        "initial_probs",
        "transition_matrix",
        "means",
        "covariances",
    )
    loc: Float[Array, "K D"]
    raw_precision_factor: Float[Array, "K D D"] | Float[Array, "K D"]
    covariance_type: Literal["full", "diag"] = eqx.field(static=True)
    reg_covar: float = eqx.field(static=True)

    def __init__(
        self,
        initial_probs: Any,
        transition_matrix: Any,
        means: Any,
        covariances: Any,
        covariance_type: Literal["full", "diag"] = "full",
        reg_covar: float = 0.0,
    ):
        dtype = canonical_float_dtype(initial_probs, transition_matrix, means, covariances)
        initial, transition = check_chain_parameters(initial_probs, transition_matrix, dtype)
        k = initial.shape[0]
        means = jnp.asarray(means, dtype)
        if means.ndim != 2 or means.shape[0] != k:
            raise ValueError(f"means has shape {means.shape}, expected (K, D) with K={k}")
        uniform = jnp.full((k,), 1.0 / k, dtype)
        components = GaussianMixture(uniform, means, covariances, covariance_type, reg_covar)
        self.initial_logits = safe_log(initial)
        self.transition_logits = safe_log(transition)
        self.loc = components.loc
        self.raw_precision_factor = components.raw_precision_factor
        self.covariance_type = components.covariance_type
        self.reg_covar = components.reg_covar

    def _components(self) -> GaussianMixture:
        """The emissions as a Gaussian mixture with equal weights (its densities, statistics
        and M-step are the emissions')."""
        logits = jnp.zeros(self.loc.shape[:1], self.loc.dtype)
        return GaussianMixture._from_fields(
            logits, self.loc, self.raw_precision_factor, self.covariance_type, self.reg_covar
        )

    # ------------------------------------------------------------- parameters
    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    @property
    def means(self) -> Float[Array, "K D"]:
        r"""$\mu_k$, ``(K, D)``."""
        return self.loc

    @property
    def covariances(self) -> Array:
        r"""$\Sigma_k$, ``(K, D, D)`` (full) or the variances ``(K, D)`` (diag)."""
        return self._components().covariances

    @property
    def n_parameters(self) -> int:
        """Free parameters, counted as hmmlearn does."""
        k, d = self.num_states, self.dim
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return k - 1 + k * (k - 1) + k * d + cov

    # ------------------------------------------------------------- densities
    def emission_log_density(self, frame: Float[Array, " D"], state: Int[Array, ""]) -> Scalar:
        r"""$\log\mathcal N(x_t \mid \mu_k, \Sigma_k)$ for one frame ``(D,)``."""
        components = self._components()
        return components.log_joint(frame, state) - components.log_weights[state]

    def emission_log_table(self, frames: Float[Array, "N T D"]) -> Float[Array, "N T K"]:
        r"""$\log\mathcal N(x_{n,t} \mid \mu_k, \Sigma_k)$, ``(N, T, K)``: the mixture's table of
        all frames at once."""
        n, t, d = frames.shape
        components = self._components()
        table = components.log_joint_table(frames.reshape(n * t, d))
        return (table - components.log_weights[None]).reshape(n, t, -1)

    def check_data(self, x: Any) -> None:
        """Frames of shape ``(N, T, D)`` with this model's ``D``."""
        check_frames(x, (self.dim,), "GaussianHMM")

    # ------------------------------------------------------------- closed-form M-step
    def m_step_penalty(self, stats: Any = None) -> Scalar:
        r"""$\tfrac12\,\text{reg\_covar}\sum_k \bar n_k \operatorname{tr}\Sigma_k^{-1}$, with
        $\bar n_k$ the expected frames in state $k$ per sequence from ``stats`` (the
        posterior the M-step used): adding ``reg_covar`` is the exact M-step for frames
        blurred by $\mathcal N(0, \text{reg\_covar}\,I)$ (as for ``GaussianMixture``).
        0 without ``reg_covar`` or statistics."""
        dtype = self.loc.dtype
        if self.reg_covar == 0 or stats is None:
            return jnp.zeros((), dtype)
        sequences = jnp.sum(stats["initial"])
        occupancy = stats["emissions"].counts / jnp.maximum(sequences, jnp.finfo(dtype).tiny)
        factor = self._components()._precision_factor
        axes = tuple(range(1, factor.ndim))
        trace = jnp.sum(factor**2, axis=axes)
        return 0.5 * self.reg_covar * jnp.sum(occupancy * trace)

    def has_closed_form(self, prior: Any) -> bool:
        return prior is None or isinstance(prior, HMMPrior)

    def sufficient_statistics(self, x: Sequences, q: Any, *, weights: Any = None) -> dict:
        r"""``{"initial": sum_n q(z_0), "transitions": sum_n sum_t xi_t, "emissions":
        GaussianMixtureStatistics}``: the emissions' are the mixture's statistics of all
        frames with responsibilities $q(z_t{=}k)$ (shifted about the means, so float32
        keeps its accuracy); they merge across chunks, shards and models."""
        stats, marginals = chain_statistics(self, x, q, weights)
        n, t, k = marginals.shape
        resp = marginals.reshape(n * t, k)
        frames = x.frames.reshape(n * t, -1)
        stats["emissions"] = self._components().sufficient_statistics(
            frames, Categorical(jnp.log(resp), resp)
        )
        return stats

    def complete_data_statistics(
        self, num_data: Any, lengths: Any, *, weights: Any = None, num_steps: int | None = None
    ) -> dict:
        """The expected statistics of ``num_data`` sequences drawn from the model, of the
        ``lengths`` given (``chain_complete_statistics``; the emissions' less the
        ``reg_covar`` floor, as the mixture's), so that ``maximize`` of them gives the model
        back."""
        stats, occupancy = chain_complete_statistics(self, num_data, lengths, weights, num_steps)
        stats["emissions"] = self._components().statistics_for_counts(occupancy)
        return stats

    def maximize(self, stats: dict, prior: Any = None) -> "GaussianHMM":
        """The closed-form M-step (see the class)."""
        initial_logits, transition_logits = maximize_chain(self, stats, prior)
        components = self._components().maximize(stats["emissions"])
        return eqx.tree_at(
            lambda m: (m.initial_logits, m.transition_logits, m.loc, m.raw_precision_factor),
            self,
            (initial_logits, transition_logits, components.loc, components.raw_precision_factor),
        )

    # ------------------------------------------------------------- sampling and start
    def sample_frames(self, key: Key, states: Int[Array, "N T"]) -> Float[Array, "N T D"]:
        """Gaussian frames given the states."""
        components = self._components()
        chol = components.covariances
        if self.covariance_type == "diag":
            chol = jax.vmap(jnp.diag)(jnp.sqrt(chol))
        else:
            chol = jnp.linalg.cholesky(chol)
        noise = jr.normal(key, (*states.shape, self.dim), self.loc.dtype)
        return self.loc[states] + jnp.einsum("ntij,ntj->nti", chol[states], noise)

    @classmethod
    def initialize(
        cls,
        key: Key,
        x: Any,
        num_states: int,
        covariance_type: Literal["full", "diag"] = "full",
        reg_covar: float = 0.0,
        *,
        self_transition: float | None = None,
    ) -> "GaussianHMM":
        r"""A starting model: the means and covariances of k-means++ clusters of all frames
        (``GaussianMixture.initialize``), uniform initial probabilities, and transitions
        uniform (``self_transition=None``) or staying in a state with probability
        ``self_transition``.

        ``x``: ``(N, T, D)`` or ``ej.Sequences`` (padding frames are not used)."""
        if not is_integer(num_states) or num_states < 1:
            raise ValueError(f"num_states must be a positive int, got {num_states!r}")
        k = int(num_states)
        seqs = as_sequences(x)
        if np.ndim(seqs.frames) != 3:
            raise ValueError(f"x has frames of shape {np.shape(seqs.frames)}, expected (N, T, D)")
        frames = np.concatenate(seqs.to_list())
        start = GaussianMixture.initialize(key, frames, k, covariance_type, max(reg_covar, 1e-6))
        dtype = start.loc.dtype
        initial = np.full((k,), 1.0 / k)
        if self_transition is None:
            transition = np.full((k, k), 1.0 / k)
        else:
            stay = float(self_transition)
            if not 0 <= stay <= 1:
                raise ValueError(f"self_transition must be in [0, 1], got {self_transition!r}")
            off = (1 - stay) / (k - 1) if k > 1 else 0.0
            transition = np.full((k, k), off) + np.eye(k) * (stay - off if k > 1 else 1 - off)
        return cls(
            jnp.asarray(initial, dtype),
            jnp.asarray(transition, dtype),
            start.loc,
            start.covariances,
            covariance_type,
            reg_covar,
        )
