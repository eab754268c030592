r"""One pass over the data for exact EM: the posterior, its expected statistics and $\log p(x)$.

When the E-step is exact and the M-step is closed form, an EM iteration needs only the
additive statistics $\sum_n E_{p(z\mid x_n,\theta)}[s(x_n, z)]$, never the $(N, K)$
posterior itself. ``statistics_pass`` computes them chunk by chunk: per chunk the
log-joint table, its log-normaliser and the chunk's statistics, summed. Nothing of size
$N \times K$ is ever held, and on CPU each chunk's table stays in cache.

At the exact posterior the free energy is $F = -\frac1N\sum_n \log p(x_n\mid\theta)$, so
the same pass gives the objective: the sum of the log-normalisers.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Array, Data, Stats
from ._model import Model
from ._q import normalize_table, num_data


# --------------------------------------------------------------------------- the contract
class AbstractStatistics(eqx.Module):
    r"""Expected sufficient statistics that are not plain sums of arrays.

    **The statistics contract.** A model with a closed-form M-step returns from
    ``sufficient_statistics(x, q, *, weights=None)`` the statistics
    $\sum_n w_n E_{q_n}[s(x_n, z)]$ of the data it is given. Statistics of any two sets of
    data — chunks, shards, minibatches, or data seen by models at different $\theta$ —
    **merge** exactly (up to rounding) with ``merge_statistics``, a commutative and associative
    operation; ``maximize`` of the merged statistics is the M-step on the union of the data.
    ``scale_statistics(s, c)`` multiplies the weight of every datum by ``c`` (online EM's
    $(1-\rho)\,s$). A plain pytree of arrays (a dict of sums) is merged by adding leaves.
    Statistics that need more than a sum — a shift carried inside them so that float32 keeps
    its accuracy, for example — subclass this and define ``merge`` and ``scale``. Statistics
    whose leaves are all zero (no data) must be neutral: ``merge(zeros, s) == s``, since
    reductions start from them.
    """

    @abc.abstractmethod
    def merge(self, other: Any) -> Any:
        """The statistics of the union of the data of ``self`` and ``other``."""

    @abc.abstractmethod
    def scale(self, factor: Any) -> Any:
        """The statistics with every datum's weight multiplied by ``factor``."""


def merge_statistics(a: Stats, b: Stats) -> Stats:
    """Merge two statistics of the same model structure (see ``AbstractStatistics``)."""
    if isinstance(a, AbstractStatistics):
        return a.merge(b)
    return jax.tree_util.tree_map(jnp.add, a, b)


def scale_statistics(stats: Stats, factor: Any) -> Stats:
    """``stats`` with every datum's weight multiplied by ``factor``."""
    if isinstance(stats, AbstractStatistics):
        return stats.scale(factor)
    return jax.tree_util.tree_map(lambda leaf: leaf * jnp.asarray(factor, leaf.dtype), stats)


# Rows per chunk on CPU are chosen so that one chunk's table and data take about this many
# elements (a few MB in float64: cache-sized, and large enough for efficient matmuls).
_CPU_CHUNK_ELEMENTS = 2**17


def default_chunk_size(model: Model, x: Data, features: Any = None) -> int:
    """Rows per chunk: cache-sized on CPU; the whole data on accelerators (one chunk)."""
    n = num_data(x)
    if jax.default_backend() != "cpu":
        return n
    per_datum = model.latent.num_states + sum(
        max(1, leaf[0].size) for leaf in jax.tree_util.tree_leaves((x, features))
    )
    size = int(min(n, max(256, _CPU_CHUNK_ELEMENTS // per_datum)))
    # A size that divides N avoids a remainder chunk, which would compile a second copy
    # of the chunk's computation.
    for candidate in range(size, (size + 1) // 2 - 1, -1):
        if n % candidate == 0:
            return candidate
    return size


def _has_table_hook(model: Model) -> bool:
    return type(model).log_joint_table is not Model.log_joint_table


def _table(model: Model, x: Data, split: Any, features: tuple | None) -> Array:
    """The log-joint table: from the split's features unless the model's own hook is to be
    preferred (see ``Model._table_from_features``)."""
    if split is not None and (model._table_from_features or not _has_table_hook(model)):
        return split.table(model, x, features)
    return model.log_joint_table(x)


def _chunk_size(model: Model, x: Data, features: Any, chunk_size: int | None) -> int:
    if chunk_size is None:
        return default_chunk_size(model, x, features)
    return int(min(chunk_size, num_data(x)))


def _chunks(data: Any, n: int, size: int) -> tuple[Any, Any]:
    """``data`` as its full chunks of ``size`` rows stacked on a new leading axis (for
    ``lax.scan`` / ``lax.map``), and the remainder (``None`` when ``size`` divides ``n``)."""
    num_full, rest = divmod(n, size)
    head = jax.tree_util.tree_map(
        lambda leaf: leaf[: num_full * size].reshape(num_full, size, *leaf.shape[1:]), data
    )
    tail = None
    if rest:
        tail = jax.tree_util.tree_map(lambda leaf: leaf[num_full * size :], data)
    return head, tail


def posterior_log_probs(
    model: Model,
    x: Data,
    *,
    chunk_size: int | None = None,
    split: Any = None,
    features: tuple | None = None,
) -> Array:
    r"""$\log p(z_n{=}k \mid x_n, \theta)$, ``(N, K)``, computed chunk by chunk like
    ``statistics_pass`` (a whole-data table would hold every data-only feature at once)."""
    n = num_data(x)
    size = _chunk_size(model, x, features, chunk_size)

    def log_probs(data):
        table = _table(model, data[0], split, data[1])
        return table - jax.nn.logsumexp(table, axis=-1, keepdims=True)

    if size >= n:
        return log_probs((x, features))
    head, tail = _chunks((x, features), n, size)
    out = jax.lax.map(log_probs, head)
    out = out.reshape(-1, out.shape[-1])
    return out if tail is None else jnp.concatenate([out, log_probs(tail)])


def _chunk_statistics(
    model: Model, x: Data, split: Any, features: tuple | None, closed_form: bool
) -> tuple[Stats, Array]:
    log_normalizer, q = normalize_table(_table(model, x, split, features))
    if closed_form:
        stats = model.sufficient_statistics(x, q)
    else:
        stats = split.statistics(model, x, q, features)
    return stats, jnp.sum(log_normalizer)


def statistics_pass(
    model: Model,
    x: Data,
    *,
    chunk_size: int | None = None,
    split: Any = None,
    features: tuple | None = None,
    closed_form: bool = True,
) -> tuple[Stats, Array]:
    r"""The exact posterior's expected statistics and $\sum_n \log p(x_n \mid \theta)$.

    For a model with a ``Discrete`` latent. The statistics are the model's additive
    ``sufficient_statistics`` (``closed_form=True``) or those that ``split`` (an
    ``_autostats.AffineSplit`` of ``log_joint``) finds. With a ``split`` (and ``features``,
    its ``datum_features(x)`` computed once per fit, else computed per chunk), the
    log-joint table is the features' matrix product with the split's coefficients for a
    model without a ``log_joint_table`` hook or one that prefers it
    (``Model._table_from_features``); otherwise it is the model's ``log_joint_table``.
    The data are split into chunks of ``chunk_size`` rows (default: ``default_chunk_size``);
    the statistics of the chunks are summed.

    **Returns:** ``(stats, total_log_evidence)``.
    """
    if not closed_form and split is None:
        raise ValueError("statistics_pass needs a split when closed_form=False")
    n = num_data(x)
    size = _chunk_size(model, x, features, chunk_size)

    def chunk_statistics(m, data):
        return _chunk_statistics(m, data[0], split, data[1], closed_form)

    data = (x, features)
    if size >= n:
        return chunk_statistics(model, data)
    head, tail = _chunks(data, n, size)

    def merge(a, b):
        return merge_statistics(a[0], b[0]), a[1] + b[1]

    def body(carry, chunk):
        return merge(carry, chunk_statistics(model, chunk)), None

    first = jax.tree_util.tree_map(lambda leaf: leaf[0], head)
    shapes = jax.eval_shape(chunk_statistics, model, first)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (stats, total), _ = jax.lax.scan(body, init, head)
    if tail is not None:
        stats, total = merge((stats, total), chunk_statistics(model, tail))
    return stats, total
