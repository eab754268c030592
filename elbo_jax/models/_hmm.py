r"""Hidden Markov models: the abstract ``HMM`` (a user writes one emission log-density) and
what the built-in HMMs share — the Dirichlet prior, the chain's statistics and M-step.

$$p(x, z \mid \theta) = \pi_{z_0} \prod_{t=1}^{L-1} A_{z_{t-1} z_t} \prod_{t=0}^{L-1}
  p(x_t \mid z_t)$$

for one sequence of $L$ frames. The chain's parameters are stored as logits
(``initial_logits`` $\to \pi = \mathrm{softmax}$, ``transition_logits`` $\to A$ by rows),
so gradient steps move them freely; the exact E-step is forward–backward (``ej.Chain``).
"""

import abc
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._chain import chain_mode, chain_moments
from .._custom_types import Array, Float, Int, Key, Scalar
from .._inference import hmm
from .._latent import Chain
from .._model import Model, float_dtype
from .._q import AbstractQ
from .._sequences import Sequences
from .._validate import canonical_float_dtype, prepare_data

# --------------------------------------------------------------------------- helpers


def safe_log(probs: Array) -> Array:
    """``log(probs)`` with zeros floored at the smallest normal number, so that a
    structural zero stays (practically) zero and every logit stays finite."""
    return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))


def check_chain_parameters(initial_probs: Any, transition_matrix: Any, dtype: Any) -> tuple:
    """``initial_probs`` ``(K,)`` and ``transition_matrix`` ``(K, K)`` as arrays of ``dtype``,
    checked to be a probability vector and a row-stochastic matrix (``ValueError`` naming
    the argument)."""
    initial = jnp.asarray(initial_probs, dtype)
    transition = jnp.asarray(transition_matrix, dtype)
    if initial.ndim != 1 or initial.shape[0] < 1:
        raise ValueError(f"initial_probs has shape {initial.shape}, expected (K,) with K >= 1")
    k = initial.shape[0]
    if transition.shape != (k, k):
        raise ValueError(
            f"transition_matrix has shape {transition.shape}, expected (K, K) = {(k, k)}"
        )
    if not any(isinstance(a, jax.core.Tracer) for a in (initial, transition)):
        tol = math.sqrt(float(jnp.finfo(dtype).eps))
        p, a = np.asarray(initial, np.float64), np.asarray(transition, np.float64)
        if not (np.all(np.isfinite(p)) and np.all(p >= 0) and abs(p.sum() - 1) <= tol):
            raise ValueError(
                f"initial_probs must be a probability vector (entries >= 0 summing to 1), got {p}"
            )
        rows = a.sum(axis=1)
        if not (np.all(np.isfinite(a)) and np.all(a >= 0) and np.all(np.abs(rows - 1) <= tol)):
            bad = int(np.argmax(~np.isfinite(rows) | (np.abs(rows - 1) > tol) | (a < 0).any(1)))
            raise ValueError(
                "transition_matrix must be row-stochastic (entries >= 0, each row summing to 1); "
                f"row {bad} is {a[bad]}"
            )
    return initial, transition


def check_frames(x: Any, frame_shape: tuple | None, name: str) -> None:
    """``x`` (``Sequences``) must hold frames of ``frame_shape`` (``None``: any)."""
    frames = x.frames
    if frame_shape is not None and tuple(frames.shape[2:]) != tuple(frame_shape):
        want = ", ".join(["N", "T", *map(str, frame_shape)])
        raise ValueError(
            f"x has frames of shape {tuple(frames.shape)}, expected ({want}) for this {name} "
            f"(N sequences of T frames, each of shape {tuple(frame_shape)})"
        )


class HMMPrior(eqx.Module):
    r"""Dirichlet priors on the initial and transition probabilities (MAP-EM):

    $$\log p(\theta) = \sum_k (\alpha_k - 1)\log\pi_k + \sum_{i,j}(\beta_{ij} - 1)\log A_{ij}
      + \text{const}$$

    ``initial_concentration`` $\alpha$ (a number or ``(K,)``) and
    ``transition_concentration`` $\beta$ (a number, ``(K,)`` per row or ``(K, K)``), each
    $\ge 1$ so that the mode exists (1: no prior). With it, the built-in HMMs' M-step is
    the posterior mode $\pi_k \propto n_k + \alpha_k - 1$,
    $A_{ij} \propto \bar\xi_{ij} + \beta_{ij} - 1$.
    """

    initial_concentration: Any = 1.0
    transition_concentration: Any = 1.0

    def __check_init__(self):
        for name in ("initial_concentration", "transition_concentration"):
            value = np.asarray(getattr(self, name), np.float64)
            if not np.all(np.isfinite(value)) or np.any(value < 1):
                raise ValueError(f"{name} must be >= 1 (1: no prior), got {value}")

    def _terms(self, model: "HMM") -> tuple[Array, Array]:
        dtype = float_dtype(model)
        k = model.num_states
        alpha = jnp.broadcast_to(jnp.asarray(self.initial_concentration, dtype), (k,))
        beta = jnp.asarray(self.transition_concentration, dtype)
        beta = jnp.broadcast_to(beta[:, None] if beta.ndim == 1 else beta, (k, k))
        return alpha - 1, beta - 1

    def __call__(self, model: "HMM") -> Scalar:
        a, b = self._terms(model)
        return jnp.sum(a * model.initial_log_probs()) + jnp.sum(b * model.transition_log_probs())


# --------------------------------------------------------------------------- the model
class HMM(Model):
    r"""A hidden Markov model: subclass it and write only ``emission_log_density``.

    $$\log p(x, z \mid \theta) = \log\pi_{z_0} + \sum_{t=1}^{L-1}\log A_{z_{t-1}z_t}
      + \sum_{t=0}^{L-1}\log p(x_t \mid z_t)$$

    One datum is one sequence (``ej.Sequences``, or an array ``(N, T, ...)`` of equal-length
    sequences). The chain's parameters are the fields ``initial_logits`` ``(K,)`` and
    ``transition_logits`` ``(K, K)`` (rows are softmaxed; ``HMM.logits(probs)`` turns
    probabilities into them); add the emission parameters as more fields, and write the
    log-density of **one frame** in **one state**. elbo_jax does the rest: forward–backward
    for the exact E-step, Viterbi for ``predict`` and hard EM, and the M-step — the chain's
    in closed form, the emission's numerically (or by gradient steps).

    ```python
    class PoissonRegimes(ej.models.HMM):
        log_rates: jax.Array                  # (K,)

        def emission_log_density(self, frame, state):
            rate = jnp.exp(self.log_rates[state])
            return frame * jnp.log(rate) - rate - jax.scipy.special.gammaln(frame + 1)

    model = PoissonRegimes(*ej.models.HMM.logits(jnp.ones(3) / 3, jnp.full((3, 3), 1 / 3)),
                           log_rates=jnp.log(jnp.array([1.0, 5.0, 20.0])))
    res = ej.fit(model, counts)               # counts: (N, T) or ej.Sequences
    ```
    """

    initial_logits: Float[Array, " K"]
    transition_logits: Float[Array, "K K"]

    #: Forward–backward by the parallel associative scan (``True``), the sequential scan
    #: (``False``), or chosen by device and length (``None``: parallel on an accelerator for
    #: sequences of at least ``_chain.PARALLEL_MIN_FRAMES`` frames). Set it on a subclass.
    parallel_scan: ClassVar[bool | None] = None

    @staticmethod
    def logits(initial_probs: Any, transition_matrix: Any) -> tuple[Array, Array]:
        """``(initial_logits, transition_logits)`` for the given probabilities (checked: a
        probability vector and a row-stochastic matrix; zeros become very negative logits)."""
        dtype = canonical_float_dtype(initial_probs, transition_matrix)
        initial, transition = check_chain_parameters(initial_probs, transition_matrix, dtype)
        return safe_log(initial), safe_log(transition)

    @abc.abstractmethod
    def emission_log_density(self, frame: Any, state: Int[Array, ""]) -> Scalar:
        r"""$\log p(x_t \mid z_t = \text{state})$ for one frame and one state."""

    # ------------------------------------------------------------- the chain
    @property
    def latent(self) -> Chain:
        """``ej.Chain(K)``."""
        return Chain(self.initial_logits.shape[-1])

    @property
    def num_states(self) -> int:
        """$K$."""
        return self.initial_logits.shape[-1]

    @property
    def initial_probs(self) -> Float[Array, " K"]:
        r"""$\pi_k = p(z_0{=}k)$, ``(K,)``."""
        return jax.nn.softmax(self.initial_logits, axis=-1)

    @property
    def transition_matrix(self) -> Float[Array, "K K"]:
        r"""$A_{ij} = p(z_{t+1}{=}j \mid z_t{=}i)$, ``(K, K)``, rows summing to 1."""
        return jax.nn.softmax(self.transition_logits, axis=-1)

    def initial_log_probs(self) -> Float[Array, " K"]:
        r"""$\log \pi$, ``(K,)``."""
        return jax.nn.log_softmax(self.initial_logits, axis=-1)

    def transition_log_probs(self) -> Float[Array, "K K"]:
        r"""$\log A$, ``(K, K)``."""
        return jax.nn.log_softmax(self.transition_logits, axis=-1)

    def emission_log_table(self, frames: Any) -> Float[Array, "N T K"]:
        r"""$[n, t, k] = \log p(x_{n,t} \mid z_t{=}k)$ for frames ``(N, T, ...)``. The default
        ``vmap``s ``emission_log_density`` over sequences, frames and states; built-in models
        override it with a vectorised version."""
        states = jnp.arange(self.num_states)
        per_frame = lambda f: jax.vmap(lambda k: self.emission_log_density(f, k))(states)
        return jax.vmap(jax.vmap(per_frame))(frames)

    def log_joint(self, x: Sequences, z: Int[Array, " T"]) -> Scalar:
        r"""$\log p(x, z \mid \theta)$ for one sequence ``x`` and one path ``z`` ``(T,)``
        (frames past the sequence's length are not read)."""
        mask = x.mask()
        emissions = jax.vmap(self.emission_log_density)(x.frames, z)
        transitions = self.transition_log_probs()[z[:-1], z[1:]]
        return (
            self.initial_log_probs()[z[0]]
            + jnp.sum(jnp.where(mask[1:], transitions, 0.0))
            + jnp.sum(jnp.where(mask, emissions, 0.0))
        )

    # ------------------------------------------------------------- evaluation
    # Each compiles once per model structure and data shape (op by op, every first call of
    # a new shape would compile each operation on its own: seconds).
    def _sequences(self, x: Any) -> Sequences:
        return prepare_data(self, x)

    def predict(self, x: Any) -> Int[Array, "N T"]:
        r"""The most probable state paths $\arg\max_z p(z \mid x_n, \theta)$ (Viterbi),
        ``(N, T)``; frames past a sequence's length repeat its last state."""
        return _viterbi_paths(self, self._sequences(x))

    def predict_proba(self, x: Any) -> Float[Array, "N T K"]:
        r"""The posterior state probabilities $p(z_t{=}k \mid x_n, \theta)$ (forward–backward),
        ``(N, T, K)``; 0 on frames past a sequence's length."""
        return _marginals(self, self._sequences(x))

    def score(self, x: Any) -> Scalar:
        r"""$\frac1N\sum_n \log p(x_n \mid \theta)$ per sequence (``ej.log_evidence``)."""
        return jnp.mean(_log_marginals(self, self._sequences(x)))

    @property
    def n_parameters(self) -> int:
        """Free parameters: $K - 1 + K(K-1)$ for the chain, plus the emissions' (here: every
        other floating-point entry; built-in models count their free ones)."""
        k = self.num_states
        every = sum(
            leaf.size for leaf in jax.tree_util.tree_leaves(self) if eqx.is_inexact_array(leaf)
        )
        return k - 1 + k * (k - 1) + every - k - k * k

    def bic(self, x: Any) -> Scalar:
        r"""$-2\log p(x \mid \theta) + p\log(\text{number of frames})$ (lower is better), with
        $p$ = ``n_parameters``."""
        x = self._sequences(x)
        frames = np.sum(np.asarray(x.lengths))
        total = jnp.sum(_log_marginals(self, x))
        return -2 * total + self.n_parameters * math.log(frames)

    # ------------------------------------------------------------- sampling
    def sample(self, key: Key, num_sequences: int, num_steps: int) -> tuple[Any, Int[Array, "N T"]]:
        r"""``num_sequences`` sequences of ``num_steps`` frames from the model:
        ``(frames (N, T, ...), states (N, T))``."""
        state_key, frame_key = jr.split(key)
        states = jax.vmap(hmm.sample_states, in_axes=(0, None, None, None))(
            jr.split(state_key, num_sequences),
            self.initial_log_probs(),
            self.transition_log_probs(),
            num_steps,
        )
        return self.sample_frames(frame_key, states), states

    def sample_frames(self, key: Key, states: Int[Array, "N T"]) -> Any:
        """Frames drawn from the emissions given the states (built-in models define it)."""
        raise NotImplementedError(f"{type(self).__name__} has no sample_frames")


@eqx.filter_jit
def _viterbi_paths(model: HMM, x: Sequences) -> Array:
    return chain_mode(model, x)[0]


@eqx.filter_jit
def _marginals(model: HMM, x: Sequences) -> Array:
    return model.posterior(x).marginals


@eqx.filter_jit
def _log_marginals(model: HMM, x: Sequences) -> Array:
    return model.log_marginal(x)


# --------------------------------------------------------------------------- closed forms
def chain_statistics(model: HMM, x: Sequences, q: AbstractQ, weights: Any) -> tuple[dict, Array]:
    r"""The chain's expected statistics ``{"initial": sum_n w_n q(z_0), "transitions":
    sum_n w_n xi_n}`` and the weighted marginals ``(N, T, K)`` for the emissions' (padded
    rows, weight 0, contribute nothing whatever their values)."""
    dtype = float_dtype(model)
    q = q.resolve(model, x)
    marginals, counts = chain_moments(q, x, model.num_states, dtype)
    marginals = marginals.astype(dtype)
    if weights is not None:
        w = jnp.asarray(weights, dtype)
        keep = w != 0
        marginals = jnp.where(keep[:, None, None], marginals * w[:, None, None], 0.0)
        counts = jnp.where(keep[:, None, None], counts * w[:, None, None], 0.0)
    stats = {"initial": jnp.sum(marginals[:, 0], axis=0), "transitions": jnp.sum(counts, axis=0)}
    return stats, marginals


def chain_complete_statistics(
    model: HMM, num_data: Any, lengths: Any, weights: Any = None, num_steps: int | None = None
) -> tuple[dict, Array]:
    r"""The chain's expected complete-data statistics for $m$ = ``num_data`` sequences drawn
    from the model, with lengths distributed as ``lengths`` (an int, or an array of lengths
    weighted by ``weights``): ``{"initial": m pi, "transitions": m sum_{t < L-1} p_t(i) A_ij}``
    averaged over the lengths, with $p_t = \pi A^t$ the state marginals; and the expected
    state occupancies $m \sum_{t < L} p_t$ ``(K,)`` for the emissions'. ``num_steps``: a bound
    on the lengths known at trace time (default: the largest of ``lengths``)."""
    dtype = float_dtype(model)
    lengths = jnp.atleast_1d(jnp.asarray(lengths, jnp.int32))
    if num_steps is None:
        num_steps = int(np.max(np.asarray(lengths)))
    share = jnp.ones(lengths.shape, dtype) if weights is None else jnp.asarray(weights, dtype)
    share = share / jnp.sum(share)
    initial = jnp.exp(model.initial_log_probs())
    transition = jnp.exp(model.transition_log_probs())
    _, marginals = jax.lax.scan(lambda p, _: (p @ transition, p), initial, None, length=num_steps)
    # before[L] = sum_{t < L} p_t, for L = 0 .. num_steps.
    before = jnp.concatenate([jnp.zeros((1, initial.shape[0]), dtype), jnp.cumsum(marginals, 0)])
    m = jnp.asarray(num_data, dtype)
    occupancy = m * (share @ before[lengths])
    leaving = m * (share @ before[jnp.maximum(lengths - 1, 0)])
    stats = {"initial": m * initial, "transitions": leaving[:, None] * transition}
    return stats, occupancy


def maximize_chain(model: HMM, stats: dict, prior: Any) -> tuple[Array, Array]:
    r"""The chain's M-step: $\pi_k \propto n_k + \alpha_k - 1$, $A_{ij} \propto \bar\xi_{ij}
    + \beta_{ij} - 1$ (no prior: $\alpha = \beta = 1$), as logits; a row with no
    transitions keeps the model's."""
    initial, transitions = stats["initial"], stats["transitions"]
    if isinstance(prior, HMMPrior):
        a, b = prior._terms(model)
        initial, transitions = initial + a, transitions + b
    tiny = jnp.finfo(initial.dtype).tiny
    initial_logits = safe_log(initial / jnp.maximum(jnp.sum(initial), tiny))
    rows = jnp.sum(transitions, axis=-1, keepdims=True)
    new = safe_log(transitions / jnp.maximum(rows, tiny))
    transition_logits = jnp.where(rows > tiny, new, model.transition_log_probs())
    return initial_logits, transition_logits
