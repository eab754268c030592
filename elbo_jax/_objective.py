r"""The one objective: the variational free energy $F(q, \theta)$, and $\log p(x \mid \theta)$.

$$F(q, \theta) = -\frac1N \sum_n w_n\,\big(E_{q_n}[\log p(x_n, z \mid \theta)] + H[q_n]\big)
  \;-\; \frac1N \log p(\theta)$$

with $N$ the size of the whole data set and $w_n$ the data's weights (1, or 0 for padding).
A model that holds some parameters as a variational distribution (LDA's topics) adds its
``global_elbo`` $= -\mathrm{KL}(q(\beta) \,\|\, p(\beta))$ where the prior enters.
``elbo_terms`` gives the bracket for each datum and ``free_energy_from_sum`` the rest;
every path that reports or lowers F — ``free_energy``, the E- and M-steps, the statistics
passes of exact EM (where the bracket is $\log p(x_n \mid \theta)$) — goes through these two,
and sums over data go through ``_data.sum_over_data``.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._custom_types import Data, Key, LogTable, PerDatum, Scalar
from ._data import Dataset, weighted_sum
from ._model import Model, float_dtype, has_global_elbo
from ._q import AbstractQ, num_data

Prior = Callable[[Model], Scalar] | None


def elbo_terms(
    model: Model, q: AbstractQ, x: Data, *, key: Key | None = None, table: LogTable | None = None
) -> PerDatum:
    r"""$E_{q_n}[\log p(x_n, z \mid \theta)] + H[q_n]$ for every datum, shape ``(N,)``
    (``AbstractQ.elbo_terms``: an importance-weighted q gives its tighter bound instead).

    At the exact posterior this is $\log p(x_n \mid \theta)$. ``table``: the log-joint table
    of ``x`` already computed (``Discrete`` latents).
    """
    return q.resolve(model, x).elbo_terms(model, x, key=key, table=table)


def free_energy_from_sum(total: Scalar, model: Model, prior: Prior, n: Any) -> Scalar:
    r"""$F = -(\text{total} + \text{global\_elbo} + \log p(\theta))/N$, from
    $\text{total} = \sum_n w_n\,\text{elbo}_n$ (``Model.global_elbo``: 0 for most models)."""
    if has_global_elbo(model):
        total = total + jnp.asarray(model.global_elbo(), total.dtype)
    value = -total / jnp.asarray(n, total.dtype)
    if prior is None:
        return value
    return value - jnp.asarray(prior(model), value.dtype) / jnp.asarray(n, value.dtype)


def _per_datum(q: AbstractQ) -> tuple[Any, Any]:
    """q's per-datum arrays (sliced with the data) and the rest."""
    return q.split_rows()


def _chunk_key(key: Key | None, data: Dataset) -> Key | None:
    # Each device draws its own Monte Carlo noise.
    if key is None or data.axis_name is None:
        return key
    return jr.fold_in(key, jax.lax.axis_index(data.axis_name))


def _free_energy(
    model: Model,
    q: AbstractQ,
    data: Dataset,
    *,
    key: Key | None = None,
    prior: Prior = None,
    table: LogTable | None = None,
) -> Scalar:
    """F for a realised, checked q over a ``Dataset``; ``table`` reuses a computed
    log-joint table (``(N_pad, K)``)."""
    q_arrays, q_static = _per_datum(q)
    key = _chunk_key(key, data)

    def chunk(values, weights):
        x, q_chunk, table_chunk = values
        terms = elbo_terms(model, eqx.combine(q_chunk, q_static), x, key=key, table=table_chunk)
        return weighted_sum(terms, weights)

    total = data.sum(chunk, q_arrays, table)
    return free_energy_from_sum(total, model, prior, data.num_data)


def whole(x: Data, dtype: Any) -> Dataset:
    """``x`` as one chunk with unit weights (no padding)."""
    n = num_data(x)
    return Dataset(x, np.ones((n,), dtype), np.asarray(n, dtype), chunk_size=n)


def as_dataset(data: Any, model: Model) -> Dataset:
    """``data`` itself if it is a ``Dataset``, else the data as one chunk (a step called by
    hand on an array)."""
    return data if isinstance(data, Dataset) else whole(data, float_dtype(model))


@eqx.filter_jit
def _free_energy_whole(model, q, x, key, prior):
    return _free_energy(model, q, as_dataset(x, model), key=key, prior=prior)


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
    - `x`: data whose leading axis indexes the $N$ data (checked as ``fit`` checks them).
    - `key`: a JAX random key, needed only for Monte Carlo expectations.
    - `prior`: optional ``prior(model) -> log p(θ)`` (MAP-EM).

    **Returns:** a scalar.

    ```python
    F = ej.free_energy(model, ej.ExactPosterior(), x)   # == -ej.log_evidence(model, x)
    ```
    """
    from ._validate import check_model, prepare_data

    model = check_model(model)
    x = prepare_data(model, x)
    if not q.is_realised:
        raise ValueError(
            f"q={type(q).__name__}() has no parameters yet: pass a realised q such as "
            "ej.Categorical(logits), or q.initialize(model, x)"
        )
    q.check(model.latent, num_data(x))
    return _free_energy_whole(model, q, x, key, prior)


@eqx.filter_jit
def _log_evidence_whole(model, x):
    return jnp.mean(model.log_marginal(x))


def log_evidence(model: Model, x: Data) -> Scalar:
    r"""The log-evidence per datum, $\frac1N\sum_n \log p(x_n \mid \theta)$.

    Exact by enumeration for ``Discrete`` latents; from the model's ``log_marginal`` hook
    otherwise (``NotImplementedError`` if it has none). ``x`` is checked as ``fit`` checks it.
    """
    from ._validate import check_model, prepare_data

    model = check_model(model)
    return _log_evidence_whole(model, prepare_data(model, x))
