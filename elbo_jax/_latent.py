"""Latent spaces: what kind of value z is. They carry no parameters."""

import math
import numbers
from typing import Any

import equinox as eqx
import jax
import numpy as np


def _is_integer(value: Any) -> bool:
    """A Python or NumPy integer (``np.int64(3)`` too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _to_int(value: Any) -> Any:
    """A (NumPy) integer as a Python ``int`` (static, hashable); anything else unchanged,
    for the check to reject."""
    return int(value) if _is_integer(value) else value


def _to_shape(value: Any) -> tuple:
    return (_to_int(value),) if _is_integer(value) else tuple(_to_int(s) for s in value)


class AbstractLatent(eqx.Module):
    """The space a model's latent variable z lives in (for one datum).

    Besides the built-in spaces, a model may define its own (LDA's per-document topic
    proportions and word topics); it then brings its own recognition family (``default_q``)
    and exact-posterior hooks, since elbo_jax knows no generic inference for it.
    """

    def value_struct(self, datum: Any, dtype: Any) -> Any:
        """The shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of one latent value for the
        datum of the given shapes, with which ``fit`` checks that ``log_joint`` returns a
        scalar; ``None`` (the default for a model's own space): not checked."""
        del datum, dtype
        return None


class _AbstractStates(AbstractLatent):
    """A latent made of states in ``[0, num_states)``: one (``Discrete``) or a path (``Chain``)."""

    num_states: eqx.AbstractVar[int]

    @property
    def dtype(self):
        """The dtype of a state as elbo_jax enumerates and decodes them (``jnp.arange``'s and
        ``jnp.argmax``'s: int32, or int64 with x64)."""
        return jax.dtypes.canonicalize_dtype(np.int64)

    def __check_init__(self):
        name = type(self).__name__
        if not _is_integer(self.num_states):
            raise TypeError(f"{name}(num_states) needs an int, got {self.num_states!r}")
        if self.num_states < 1:
            raise ValueError(f"{name}(num_states) needs num_states >= 1, got {self.num_states}")


class Discrete(_AbstractStates):
    """z is an integer in ``[0, num_states)``.

    Expectations over z are exact sums over the ``num_states`` values, so every
    model with a ``Discrete`` latent gets an exact E-step by enumeration.

    **Example**

    ```python
    class Coins(ej.Model):
        latent = ej.Discrete(2)
    ```
    """

    num_states: int = eqx.field(static=True, converter=_to_int)


class Real(AbstractLatent):
    """z is a real array of the given shape (``Real(3)`` is a vector of length 3).

    Expectations over z use a Gaussian recognition family (``ej.Gaussian``), or the
    model's own ``posterior`` hook for an exact E-step.
    """

    shape: tuple[int, ...] = eqx.field(static=True, converter=_to_shape)

    def __check_init__(self):
        if any(not _is_integer(s) or s < 1 for s in self.shape):
            raise ValueError(f"Real(shape) needs positive integer sizes, got {self.shape!r}")

    @property
    def size(self) -> int:
        """Number of scalar entries in z."""
        return math.prod(self.shape)


class Chain(_AbstractStates):
    r"""z is a path $z_{0:T-1}$ of a Markov chain over ``num_states`` states, one state per
    frame of a sequence (one datum is one sequence: ``ej.Sequences``).

    The model gives the chain's factors, and elbo_jax does exact inference by
    forward–backward (the E-step), Viterbi (the mode) and their sums over sequences:

    - ``initial_log_probs()``: $\log p(z_0 = k)$, ``(K,)``;
    - ``transition_log_probs()``: $[i, j] = \log p(z_{t+1} = j \mid z_t = i)$, ``(K, K)``;
    - ``emission_log_table(frames)``: $[n, t, k] = \log p(x_{n,t} \mid z_t = k)$ for frames
      ``(N, T, ...)``, ``(N, T, K)``.

    ``ej.models.HMM`` provides all three from an emission log-density for one frame.
    """

    num_states: int = eqx.field(static=True, converter=_to_int)


class GaussianChain(AbstractLatent):
    r"""z is a sequence of real states $z_{0:T-1}$, each of size ``state_dim``, that follow a
    linear-Gaussian Markov chain (one datum is one sequence: ``ej.Sequences``). Exact
    inference is Kalman filtering and RTS smoothing (``ej.models.LinearGaussianSSM``)."""

    state_dim: int = eqx.field(static=True, converter=_to_int)

    def __check_init__(self):
        if not _is_integer(self.state_dim) or self.state_dim < 1:
            raise ValueError(
                f"GaussianChain(state_dim) needs a positive int, got {self.state_dim!r}"
            )


def is_sequence_latent(latent: AbstractLatent) -> bool:
    """Whether one datum of a model with this latent space is a whole sequence."""
    return isinstance(latent, (Chain, GaussianChain))
