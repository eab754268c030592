r"""The one objective: the variational free energy $F(q, \theta)$, and $\log p(x \mid \theta)$."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from ._custom_types import Data, Key, LogTable, Scalar
from ._model import Model
from ._q import AbstractQ, num_data

Prior = Callable[[Model], Scalar] | None


@eqx.filter_jit
def free_energy(
    model: Model,
    q: AbstractQ,
    x: Data,
    *,
    key: Key | None = None,
    prior: Prior = None,
) -> Scalar:
    r"""The free energy (negative ELBO) per datum.

    $$F(q, \theta) = \frac1N \sum_{n=1}^N E_{q_n}\big[\log q_n(z) - \log p(x_n, z \mid \theta)\big]
      \;-\; \frac1N \log p(\theta)$$

    It decomposes as $F = -\frac1N\sum_n \log p(x_n\mid\theta) + \frac1N\sum_n
    \mathrm{KL}(q_n \,\|\, p(z\mid x_n,\theta)) - \frac1N\log p(\theta)$, so it is an upper
    bound on the negative log-evidence per datum, tight at ``q=ej.ExactPosterior()``.
    Every step in elbo_jax lowers this one function.

    **Arguments:**

    - `model`: an ``ej.Model``.
    - `q`: a recognition distribution (``ej.ExactPosterior()``, a realised
      ``ej.Categorical``, ``ej.PointMass`` or ``ej.Gaussian``).
    - `x`: data whose leading axis indexes the $N$ data.
    - `key`: a JAX random key, needed only for Monte Carlo expectations.
    - `prior`: optional ``prior(model) -> log p(θ)`` (MAP-EM).

    **Returns:** a scalar.

    ```python
    F = ej.free_energy(model, ej.ExactPosterior(), x)   # == -ej.log_evidence(model, x)
    ```
    """
    q = q.resolve(model, x)
    if not q.is_realised:
        raise ValueError(
            f"q={type(q).__name__}() has no parameters yet: pass a realised q such as "
            "ej.Categorical(logits), or q.initialize(model, x)"
        )
    q.check(model.latent, num_data(x))
    return _free_energy(model, q, x, key=key, prior=prior)


def _free_energy(
    model: Model,
    q: AbstractQ,
    x: Data,
    *,
    key: Key | None = None,
    prior: Prior = None,
    table: LogTable | None = None,
) -> Scalar:
    """``free_energy`` for a realised, checked q; ``table`` reuses a computed log-joint table."""
    expected = q.expected_log_joint(model, x, key=key, table=table)
    entropy = q.entropy().astype(expected.dtype)
    return _with_prior(-jnp.mean(expected + entropy), model, prior, num_data(x))


def _with_prior(value: Scalar, model: Model, prior: Prior, n: Any) -> Scalar:
    r"""F per datum with the prior's term: ``value`` $- \log p(\theta)/n$ (MAP-EM)."""
    if prior is None:
        return value
    return value - jnp.asarray(prior(model), value.dtype) / n


@eqx.filter_jit
def log_evidence(model: Model, x: Data) -> Scalar:
    r"""The log-evidence per datum, $\frac1N\sum_n \log p(x_n \mid \theta)$.

    Exact by enumeration for ``Discrete`` latents; from the model's ``log_marginal`` hook
    otherwise (``NotImplementedError`` if it has none).
    """
    return jnp.mean(model.log_marginal(x))
