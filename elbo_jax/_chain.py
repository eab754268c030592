r"""Exact inference for ``Chain`` latents, and the chain posterior as a recognition distribution.

A model with ``latent = ej.Chain(K)`` gives its factors (``initial_log_probs``,
``transition_log_probs``, ``emission_log_table``); here they meet the pure forward–backward
and Viterbi of ``_inference.hmm``, over the sequences of a batch. The posterior of
sequence $n$ is kept as what the M-step and F need, $O(TK)$ per sequence: the marginals
$q(z_t{=}k)$, the expected transition counts $\sum_t q(z_t{=}i, z_{t+1}{=}j)$ and its
entropy — never the $(T, K, K)$ pairwise marginals.
"""

from typing import Any

import jax
import jax.numpy as jnp

from ._custom_types import Array, PerDatum
from ._inference import hmm
from ._latent import AbstractLatent, Chain
from ._q import AbstractQ, PointMass, _weighted_table_sum, num_data
from ._sequences import Sequences

# On an accelerator, sequences of at least this many frames use the parallel (associative
# scan) forward-backward: the sequential scan's cost there is T dependent steps, the
# parallel one's about log T. On CPU the sequential scan is faster at every length.
PARALLEL_MIN_FRAMES = 256


def use_parallel(model: Any, num_frames: int) -> bool:
    """Whether inference over sequences of ``num_frames`` frames uses the parallel scans:
    the model's ``parallel_scan`` if it sets one (``True``/``False``), else automatically —
    on an accelerator (GPU, TPU) for ``num_frames >= PARALLEL_MIN_FRAMES``."""
    choice = getattr(model, "parallel_scan", None)
    if choice is not None:
        return bool(choice)
    return jax.default_backend() != "cpu" and num_frames >= PARALLEL_MIN_FRAMES


def chain_factors(model: Any, x: Sequences) -> tuple[Array, Array, Array]:
    """``(log p(z_0) (K,), log p(z_{t+1} | z_t) (K, K), log p(x_t | z_t) (N, T, K))``."""
    return (
        model.initial_log_probs(),
        model.transition_log_probs(),
        model.emission_log_table(x.frames),
    )


def _weighted(probs: Array, logs: Array) -> Array:
    """``sum p * logs`` over every axis but the first (0 * (-inf) := 0)."""
    n = probs.shape[0]
    return _weighted_table_sum(probs.reshape(n, -1), logs.reshape(n, -1))


def expected_log_joint(
    log_initial: Array, log_transition: Array, emissions: Array, marginals: Array, counts: Array
) -> PerDatum:
    r"""$E_q[\log p(x_n, z)] = \sum_k q(z_0{=}k)\log\pi_k + \sum_{ij} \bar\xi_{ij}\log A_{ij}
    + \sum_{t,k} q(z_t{=}k)\log p(x_t\mid k)$ per sequence (padding frames have
    $q = 0$)."""
    initial = _weighted(marginals[:, 0], jnp.broadcast_to(log_initial[None], marginals[:, 0].shape))
    transitions = _weighted(counts, jnp.broadcast_to(log_transition[None], counts.shape))
    return initial + transitions + _weighted(marginals, emissions)


class ChainPosterior(AbstractQ):
    r"""The posterior of a ``Chain`` latent, sequence by sequence, as forward–backward gives it.

    - ``marginals`` ``(N, T, K)``: $q(z_t{=}k)$ (0 on padding frames);
    - ``transition_counts`` ``(N, K, K)``: $\sum_{t} q(z_t{=}i, z_{t+1}{=}j)$;
    - ``entropies`` ``(N,)``: $H[q_n]$.

    It is what ``ej.ExactPosterior()`` resolves to for a chain; its exact update is
    forward–backward under the current model.
    """

    marginals: Array | None = None
    transition_counts: Array | None = None
    entropies: Array | None = None

    @property
    def probs(self) -> Array:
        """The marginals $q(z_t{=}k)$, ``(N, T, K)``."""
        return self.marginals

    def initialize(self, model, x, *, key=None):
        if self.marginals is not None:
            self.check(model.latent, num_data(x))
            return self
        return chain_posterior(model, x)[1]

    def exact_update(self, model, x, *, table=None):
        return chain_posterior(model, x)[1]

    def expected_log_joint(self, model, x, *, key=None, table=None):
        log_initial, log_transition, emissions = chain_factors(model, x)
        return expected_log_joint(
            log_initial, log_transition, emissions, self.marginals, self.transition_counts
        )

    def entropy(self):
        return self.entropies

    def check(self, latent: AbstractLatent, n: int) -> None:
        if not isinstance(latent, Chain):
            raise TypeError(f"q=ChainPosterior is for Chain latents, but the model's is {latent!r}")
        if self.marginals is None:
            return
        k = latent.num_states
        if self.marginals.ndim != 3 or self.marginals.shape[::2] != (n, k):
            raise ValueError(
                f"ChainPosterior marginals have shape {self.marginals.shape}, expected (N, T, K) "
                f"with N={n}, K={k}"
            )


def chain_posterior(model: Any, x: Sequences) -> tuple[PerDatum, ChainPosterior]:
    r"""$\log p(x_n \mid \theta)$ ``(N,)`` and the exact posterior of every sequence."""
    log_initial, log_transition, emissions = chain_factors(model, x)
    lengths = jnp.asarray(x.lengths)
    if use_parallel(model, x.num_frames):
        smooth = lambda *args: hmm.forward_backward(*args, parallel=True)
        out = jax.vmap(smooth, in_axes=(None, None, 0, 0))(
            log_initial, log_transition, emissions, lengths
        )
    else:
        out = hmm.forward_backward_batch(log_initial, log_transition, emissions, lengths)
    expected = expected_log_joint(
        log_initial, log_transition, emissions, out.marginals, out.transition_counts
    )
    # H[q] = log p(x) - E_q[log p(x, z)] at the exact posterior.
    q = ChainPosterior(out.marginals, out.transition_counts, out.log_normalizer - expected)
    return out.log_normalizer, q


def chain_log_marginal(model: Any, x: Sequences) -> PerDatum:
    r"""$\log p(x_n \mid \theta)$ by the forward pass alone, ``(N,)``."""
    log_initial, log_transition, emissions = chain_factors(model, x)
    lengths = jnp.asarray(x.lengths)
    if use_parallel(model, x.num_frames):
        forward = lambda *args: hmm.log_normalizer(*args, parallel=True)
        return jax.vmap(forward, in_axes=(None, None, 0, 0))(
            log_initial, log_transition, emissions, lengths
        )
    return hmm.log_normalizer_batch(log_initial, log_transition, emissions, lengths)


def chain_mode(model: Any, x: Sequences) -> tuple[Array, PerDatum]:
    r"""The most probable paths $\arg\max_z p(z \mid x_n)$ ``(N, T)`` (Viterbi; padding frames
    repeat the last real state) and $\max_z \log p(x_n, z)$ ``(N,)``."""
    log_initial, log_transition, emissions = chain_factors(model, x)
    return jax.vmap(hmm.viterbi, in_axes=(None, None, 0, 0))(
        log_initial, log_transition, emissions, x.lengths
    )


def chain_moments(q: AbstractQ, x: Sequences, num_states: int, dtype: Any) -> tuple[Array, Array]:
    r"""``(marginals (N, T, K), transition counts (N, K, K))`` of a chain q: a
    ``ChainPosterior``'s own, or a ``PointMass`` path's one-hot states and transitions."""
    if isinstance(q, ChainPosterior):
        return q.marginals, q.transition_counts
    if isinstance(q, PointMass):
        mask = x.mask()
        states = jax.nn.one_hot(q.value, num_states, dtype=dtype) * mask[..., None].astype(dtype)
        counts = jnp.einsum("nti,ntj->nij", states[:, :-1], states[:, 1:])
        return states, counts
    raise TypeError(f"a Chain latent needs q=ChainPosterior or PointMass, got {type(q).__name__}")
