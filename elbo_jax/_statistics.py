r"""The statistics contract: expected sufficient statistics that merge.

The M-step of a model with a closed form needs the data only through expected sufficient
statistics. elbo_jax asks that they **merge**: statistics of chunks, shards, minibatches and
of models at different $\theta$ combine into the statistics of the union of their data.
That one property is what lets the same ``maximize`` serve chunked passes, sharded EM,
online EM (which also scales them) and the combination of models fitted apart.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Stats


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


def is_statistics(node: Any) -> bool:
    return isinstance(node, AbstractStatistics)


def merge_statistics(a: Stats, b: Stats) -> Stats:
    """Merge two statistics of the same model structure (see ``AbstractStatistics``): a
    pytree whose nodes are arrays (added) or ``AbstractStatistics`` (their own ``merge``),
    such as an HMM's transition counts beside its emissions' shifted statistics."""
    return jax.tree_util.tree_map(_merge_node, a, b, is_leaf=is_statistics)


def _merge_node(a: Any, b: Any) -> Any:
    return a.merge(b) if isinstance(a, AbstractStatistics) else jnp.add(a, b)


def scale_statistics(stats: Stats, factor: Any) -> Stats:
    """``stats`` with every datum's weight multiplied by ``factor``."""

    def scale(node):
        if isinstance(node, AbstractStatistics):
            return node.scale(factor)
        return node * jnp.asarray(factor, node.dtype)

    return jax.tree_util.tree_map(scale, stats, is_leaf=is_statistics)
