r"""What the built-in finite mixtures share: the abstract ``AbstractMixture`` and its helpers.

A mixture has a ``Discrete(K)`` latent $z$ and mixing weights $\pi$ = softmax(``weight_logits``),
so $p(z{=}k \mid x_n, \theta) \propto \exp T_{nk}$ with $T_{nk} = \log p(x_n, z{=}k \mid \theta)$
from ``log_joint_table``.
"""

import abc
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Data, Float, Int, Scalar
from .._latent import Discrete
from .._model import Model
from .._q import AbstractQ
from .._validate import canonical_float_dtype, is_concrete, is_integer, prepare_data


# --------------------------------------------------------------------------- helpers
def _float_dtype(*arrays: Array) -> Any:
    """The promoted floating dtype of ``arrays`` (the default float if none is floating),
    as JAX stores it (float32 for float64 input with x64 off)."""
    return canonical_float_dtype(*arrays)


def _check_weights(weights: Array) -> None:
    """``weights`` must be a 1-D vector of positive numbers summing to one."""
    if weights.ndim != 1 or weights.shape[0] < 1:
        raise ValueError(f"weights has shape {weights.shape}, expected (K,) with K >= 1")
    if is_concrete(weights):
        w = np.asarray(weights, np.float64)
        tol = math.sqrt(float(jnp.finfo(weights.dtype).eps))
        if not (np.all(np.isfinite(w)) and np.all(w > 0) and abs(w.sum() - 1) <= tol):
            raise ValueError(
                f"weights must be a probability vector (positive entries summing to 1), got {w}"
            )


def _check_num_components(num_components: Any, n: int) -> int:
    k = num_components
    if not is_integer(k) or k < 1:
        raise ValueError(f"num_components must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"num_components={k} is larger than the number of data N={n}")
    return int(k)


def _check_data_shape(shape: tuple[int, ...], dim: int | None) -> None:
    """The data's ``shape`` must be ``(N, D)``, with the model's ``D`` unless ``dim`` is None."""
    if len(shape) != 2 or (dim is not None and shape[1] != dim):
        want = "(N, D)" if dim is None else f"(N, D) with D={dim}"
        raise ValueError(f"x has shape {shape}, expected {want}")


def _check_data(
    x: Any,
    dim: int | None,
    entries: Callable[[Any], tuple[np.ndarray, np.ndarray]],
    requirement: str,
) -> None:
    """``x`` must be ``(N, D)`` with ``N >= 1`` (and the model's ``D``) and valid entries.

    ``entries(x)`` gives ``(values, ok)`` as NumPy arrays; the first entry that is not ``ok``
    is named in a ``ValueError`` that starts with ``requirement``. Values are checked only
    where ``x`` is concrete (not inside ``jit``).
    """
    shape = jnp.shape(x)
    _check_data_shape(shape, dim)
    if shape[0] < 1:
        raise ValueError(f"x has shape {shape}: there are no data (N = 0)")
    if is_concrete(x):
        v, ok = entries(x)
        if not np.all(ok):
            bad = np.argwhere(~ok)[0]
            raise ValueError(
                f"{requirement}, got x[{int(bad[0])}, {int(bad[1])}] = {v[tuple(bad)]}"
            )


def _check_data_weights(weights: Any, n: int, dtype: Any) -> Array:
    """Per-datum ``weights`` as an ``(N,)`` array of ``dtype`` (trace-time shape check)."""
    weights = jnp.asarray(weights)
    if weights.shape != (n,):
        raise ValueError(f"weights has shape {weights.shape}, expected (N,) = ({n},)")
    return weights.astype(dtype)


def _responsibilities(
    model: Model, x: Data, q: AbstractQ, *, weights: Any = None, dtype: Any = None
) -> Array:
    r"""$w_n\, q_n(z{=}k)$, shape ``(N, K)``, in ``dtype`` (default: the responsibilities').

    Every statistic of a mixture is linear in these, so weighing them weighs each datum's
    whole contribution: a row of weight 0 adds exactly nothing (its $q_n$ only has to be
    finite, as it is for padding rows, which copy real data).
    """
    q = q.resolve(model, x)
    probs = getattr(q, "probs", None)
    if probs is None:
        raise TypeError(
            f"sufficient_statistics needs a q with responsibilities `.probs` (N, K), such as "
            f"ej.Categorical or ej.PointMass, got {type(q).__name__}"
        )
    if dtype is not None:
        probs = probs.astype(dtype)
    if weights is None:
        return probs
    return probs * _check_data_weights(weights, probs.shape[0], probs.dtype)[:, None]


def _complete_data_counts(model: "AbstractMixture", num_data: Any) -> Array:
    r"""$m \pi_k$, shape ``(K,)``: the expected number of $m$ = ``num_data`` draws from
    ``model`` that come from each component (the ``counts`` of its complete-data statistics)."""
    weights = model.weights
    return jnp.asarray(num_data, weights.dtype) * weights


def _weight_logits(counts: Array) -> Array:
    """$\\log \\pi_k$, $\\pi_k \\propto$ ``counts``; zero counts get the smallest normal."""
    tiny = jnp.finfo(counts.dtype).tiny
    return jnp.log(jnp.maximum(counts, tiny)) - jnp.log(jnp.sum(counts))


def _log_symmetric_dirichlet(log_weights: Array, concentration: float) -> Scalar:
    r"""$\log \mathrm{Dir}(\pi \mid \alpha 1_K)$ at $\log \pi$ = ``log_weights``,
    $\alpha$ = ``concentration``."""
    alpha, k = concentration, log_weights.shape[0]
    return math.lgamma(k * alpha) - k * math.lgamma(alpha) + (alpha - 1) * jnp.sum(log_weights)


# --------------------------------------------------------------------------- model
class AbstractMixture(Model):
    r"""A finite mixture: $p(x, z{=}k \mid \theta) = \pi_k\, p(x \mid z{=}k, \theta)$.

    Concrete mixtures store the unnormalised $\log \pi$ in a ``weight_logits`` field of
    shape ``(K,)``, write ``log_joint_table`` and ``_as_data``, and get the ``Discrete(K)``
    latent, the weights and the ``predict`` methods from here.
    """

    weight_logits: eqx.AbstractVar[Float[Array, " K"]]

    @abc.abstractmethod
    def _as_data(self, x: Data) -> Array:
        """``x`` as an array of the model's dtype, ready for ``log_joint_table``."""

    def _check_evaluation_data(self, x: Data) -> None:
        """What the evaluation functions require of ``x`` (default: what ``fit`` does)."""
        self.check_data(x)

    def _evaluation_data(self, x: Data) -> Array:
        """``x`` checked as ``fit`` checks it (``ValueError`` naming ``x`` for NaN/Inf, a wrong
        rank or ``D``, no data, entries the model rejects), in the model's dtype. Inside a
        user's ``jit`` only the shapes are checked."""
        return self._as_data(prepare_data(self, x, self._check_evaluation_data))

    @property
    def latent(self) -> Discrete:
        """``ej.Discrete(K)``."""
        return Discrete(self.weight_logits.shape[0])

    @property
    def num_components(self) -> int:
        """$K$."""
        return self.weight_logits.shape[0]

    @property
    def weights(self) -> Float[Array, " K"]:
        r"""The mixing weights $\mathrm{softmax}$(``weight_logits``), shape ``(K,)``."""
        return jax.nn.softmax(self.weight_logits)

    @property
    def log_weights(self) -> Float[Array, " K"]:
        r"""The log mixing weights $\mathrm{log\_softmax}$(``weight_logits``), normalised."""
        return jax.nn.log_softmax(self.weight_logits)

    def predict_proba(self, x: Data) -> Float[Array, "N K"]:
        r"""Responsibilities $p(z{=}k \mid x_n, \theta)$, shape ``(N, K)``.

        ``x`` is checked as ``fit`` checks it: NaN/Inf, a wrong shape or entries the model
        rejects raise a ``ValueError`` naming ``x``."""
        return jax.nn.softmax(self.log_joint_table(self._evaluation_data(x)), axis=-1)

    def predict(self, x: Data) -> Int[Array, " N"]:
        r"""The most probable component $\arg\max_k p(z{=}k \mid x_n)$, shape ``(N,)``."""
        return jnp.argmax(self.log_joint_table(self._evaluation_data(x)), axis=-1)
