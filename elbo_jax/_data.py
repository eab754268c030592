r"""The one reduction over data: ``sum_over_data``, and the padded ``Dataset`` it runs on.

Every sum over data in elbo_jax — the free energy, the expected statistics, gradient
losses, numerical M-steps — is a weighted sum $\sum_n w_n f(x_n)$ formed here. The data
are padded on the host to a whole number of fixed-size chunks; padded rows are copies of
a real datum (so every per-datum value stays finite) with weight $w_n = 0$. A new $N$
that pads to the same size reuses the compiled fit. Under ``shard_map`` the chunk sums of
each device are reduced across the mesh axis (``psum``, or a gather-and-merge for
statistics that carry a shift), so sharded EM equals single-device EM by construction.

$N$ of the **whole** data set travels with the data (``Dataset.num_data``), so a chunk,
a minibatch or a shard adds to — or estimates — the same per-datum sum.
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array, PyTree
from ._statistics import is_statistics, merge_statistics

# Rows per chunk on CPU are chosen so that the widest per-row intermediate of a pass (read
# from the pass's jaxpr) takes about this many elements for one chunk: 16 MB in float64.
# Every operation of a chunk costs a fixed ~10 microseconds, so small chunks lose on
# narrow data (a Poisson mixture with K = 8, D = 4 ran 1.9x slower at 6.5k rows than at
# 100k); much larger ones leave the cache (a 16-dimensional full-covariance mixture, its
# (rows, 152) features: fastest at 13k-26k rows, 1.2x slower at 51k).
_CPU_CHUNK_ELEMENTS = 2**21
_MIN_CHUNK = 256
# Rows of the probe whose jaxpr is read: a prime above the 512-row blocks that some exact
# fallbacks use, so that neither a model's dimension nor a block is mistaken for rows.
_PROBE_ROWS = 1031


class Dataset(eqx.Module):
    r"""Data padded to ``num_chunks * chunk_size`` rows, with per-row weights.

    - ``x``: the data (a pytree of arrays), leading axis $N_{\text{pad}}$.
    - ``weights``: ``(N_pad,)``, 1 for a real datum and 0 for padding (a minibatch may
      carry other weights).
    - ``num_data``: $N$ of the whole data set, a scalar of the model's float dtype: F is
      $\frac1N\sum_n w_n(\cdot)$.
    - ``chunk_size``: rows per chunk of ``sum_over_data`` (static; divides $N_{\text{pad}}$).
    - ``axis_name``: the mesh axis the data are sharded over inside ``shard_map``, or None.
    """

    x: PyTree
    weights: Array
    num_data: Array
    chunk_size: int = eqx.field(static=True)
    axis_name: str | None = eqx.field(static=True, default=None)

    @property
    def num_rows(self) -> int:
        """$N_{\\text{pad}}$ (on this device, under ``shard_map``)."""
        return self.weights.shape[0]

    def sum(self, fn: Callable, *per_datum: PyTree) -> PyTree:
        """``sum_over_data(fn, (x, *per_datum), weights)`` with this data's chunking."""
        return sum_over_data(
            fn,
            (self.x, *per_datum),
            self.weights,
            chunk_size=self.chunk_size,
            axis_name=self.axis_name,
        )


def sum_over_data(
    fn: Callable,
    per_datum: PyTree,
    weights: Array,
    *,
    chunk_size: int | None = None,
    axis_name: str | None = None,
) -> PyTree:
    r"""$\bigoplus_{\text{chunks } c} \text{fn}(\text{per\_datum}_c, w_c)$, merged across the mesh.

    ``fn(chunk, weights)`` gets ``chunk_size`` rows of every leaf of ``per_datum`` and their
    weights, and returns the chunk's weighted sums (a pytree of arrays, or statistics that
    follow the statistics contract). The chunks' results are merged with
    ``merge_statistics`` (addition for plain arrays) in a ``lax.scan``, so only one
    chunk's intermediates are alive at a time; with ``axis_name`` (inside ``shard_map``)
    the devices' results are merged too. ``chunk_size`` must divide the number of rows
    (``None``: one chunk).
    """
    n = weights.shape[0]
    size = n if chunk_size is None else chunk_size
    if n % size:
        raise ValueError(f"chunk_size={size} does not divide the number of rows {n}")
    num_chunks = n // size
    if num_chunks == 1:
        total = fn(per_datum, weights)
    else:
        chunked = jax.tree_util.tree_map(
            lambda leaf: leaf.reshape(num_chunks, size, *leaf.shape[1:]), (per_datum, weights)
        )
        first = jax.tree_util.tree_map(lambda leaf: leaf[0], chunked)
        shapes = jax.eval_shape(lambda c: fn(*c), first)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(carry, chunk):
            return merge_statistics(carry, fn(*chunk)), None

        total, _ = jax.lax.scan(body, zeros, chunked)
    if axis_name is not None:
        total = _merge_across(total, axis_name)
    return total


def weighted_sum(values: Array, weights: Array) -> Array:
    r"""$\sum_n w_n v_n$, with padded rows ($w_n = 0$) contributing exactly 0 whatever their
    values (a padded row's value may be non-finite)."""
    return jnp.sum(jnp.where(weights > 0, weights.astype(values.dtype) * values, 0.0))


def _merge_across(total: PyTree, axis_name: str) -> PyTree:
    """Merge each device's ``total`` over the mesh axis: ``psum`` for plain sums; statistics
    with their own ``merge`` are gathered and merged (they are small)."""

    def across(node):
        if not is_statistics(node):
            return jax.lax.psum(node, axis_name)
        gathered = jax.lax.all_gather(node, axis_name)
        size = jax.tree_util.tree_leaves(gathered)[0].shape[0]
        out = jax.tree_util.tree_map(lambda leaf: leaf[0], gathered)
        for i in range(1, size):
            out = out.merge(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], gathered))
        return out

    return jax.tree_util.tree_map(across, total, is_leaf=is_statistics)


# ------------------------------------------------------------------ padding on the host
def chunk_rows(pass_fn: Callable[["Dataset"], Any], x: PyTree, dtype: Any) -> int:
    """Rows per chunk for the passes ``pass_fn(data)`` over data shaped like ``x``: on CPU,
    a multiple of 64 for which the pass's widest per-row intermediate takes about
    ``_CPU_CHUNK_ELEMENTS`` elements per chunk; 0 (the whole data are one chunk) on an
    accelerator. The widths are read from the jaxpr of ``pass_fn`` on a probe of
    ``_PROBE_ROWS`` rows in one chunk (abstract: nothing is computed)."""
    if jax.default_backend() != "cpu":
        return 0
    rows = _PROBE_ROWS
    probe = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct((rows, *leaf.shape[1:]), leaf.dtype), x
    )

    def traced(values, weights):
        return pass_fn(Dataset(values, weights, jnp.asarray(rows, dtype), chunk_size=rows))

    closed = jax.make_jaxpr(traced)(probe, jax.ShapeDtypeStruct((rows,), dtype))
    widest = max(per_datum_size(x), _widest_row(closed.jaxpr, rows))
    return max(_MIN_CHUNK, _CPU_CHUNK_ELEMENTS // widest) // 64 * 64


def _widest_row(jaxpr: Any, rows: int) -> int:
    """The most elements per row of any value in ``jaxpr`` (and the jaxprs inside it) with
    an axis of length ``rows``."""
    widest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if rows in shape:
                widest = max(widest, math.prod(shape) // rows)
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    widest = max(widest, _widest_row(inner, rows))
    return widest


def padded_size(n: int, chunk_size: int, num_shards: int = 1) -> tuple[int, int]:
    r"""``(rows, chunk)``: the padded number of rows and the rows per chunk for $N$ = ``n``.

    Each shard gets ``rows / num_shards`` rows, a whole number of chunks. Data within one
    chunk (or any data when ``chunk_size`` is 0: one chunk, on accelerators) are padded to a
    bucket, eight per power of two (under 1/8 padding), so nearby $N$ share a compiled fit.
    Larger data are split into the fewest chunks of at most about ``chunk_size`` rows, their
    rows rounded up to sixteen buckets per power of two (under 1/16 padding; a fixed chunk
    padded a 100,000-row data set with 13,760-row chunks by a tenth).
    """
    per_shard = -(-n // num_shards)
    if not chunk_size or per_shard <= chunk_size:
        rows = _bucket(per_shard, 8)
        return rows * num_shards, rows
    num_chunks = -(-per_shard // chunk_size)
    rows = _bucket(-(-per_shard // num_chunks), 16)
    return rows * num_chunks * num_shards, rows


def _bucket(n: int, per_power_of_two: int) -> int:
    """``n`` rounded up to one of ``per_power_of_two`` sizes per power of two."""
    step = 1 << max(0, n.bit_length() - per_power_of_two.bit_length())
    return -(-n // step) * step


def pad_rows(x: PyTree, rows: int) -> PyTree:
    """``x`` with copies of its first datum appended up to ``rows`` rows (on its device), by
    one compiled call (op by op, each leaf's slice, broadcast and concatenation compiled
    programs of their own)."""
    if all(leaf.shape[0] == rows for leaf in jax.tree_util.tree_leaves(x)):
        return x
    return _pad_rows(x, rows)


@eqx.filter_jit
def _pad_rows(x: PyTree, rows: int) -> PyTree:
    def pad(leaf):
        extra = rows - leaf.shape[0]
        if extra == 0:
            return leaf
        fill = jnp.broadcast_to(leaf[:1], (extra, *leaf.shape[1:]))
        return jnp.concatenate([leaf, fill.astype(leaf.dtype)])

    return jax.tree_util.tree_map(pad, x)


def _auto_axes(leaf: Any) -> Any:
    """``leaf`` on the same devices and layout (no copy), its mesh axes made ``Auto``: the
    padding's slice and concatenation along a sharded axis are left to XLA, which an
    ``Explicit`` axis (``jax.make_mesh``'s default) refuses at trace time."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or not sharding.mesh.explicit_axes:
        return leaf
    mesh = sharding.mesh
    auto = mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    return jax.device_put(leaf, jax.sharding.NamedSharding(auto, sharding.spec))


def row_weights(n: int, rows: int, dtype: Any) -> np.ndarray:
    """1 for the ``n`` real rows, 0 for the padding."""
    w = np.zeros((rows,), dtype)
    w[:n] = 1
    return w


def make_dataset(
    x: PyTree, dtype: Any, chunk_size: int = 0, mesh: Any = None, axis: str | None = None
) -> Dataset:
    """``x`` padded to whole chunks (per device: ``mesh`` split over ``axis``) with weights,
    placed on the mesh if one is given. ``chunk_size`` 0: one chunk per device."""
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    shards = 1 if mesh is None else mesh.shape[axis]
    rows, chunk = padded_size(n, chunk_size, shards)
    padded = pad_rows(jax.tree_util.tree_map(_auto_axes, x), rows)
    weights = row_weights(n, rows, dtype)
    if mesh is not None:
        place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
        padded, weights = jax.device_put((padded, weights), place)
    return Dataset(padded, weights, np.asarray(n, dtype), chunk_size=chunk, axis_name=axis)


def per_datum_size(x: PyTree) -> int:
    """Elements per datum of every leaf of ``x``."""
    return sum(max(1, math.prod(leaf.shape[1:])) for leaf in jax.tree_util.tree_leaves(x))


def map_over_data(fn: Callable, data: Dataset, *per_datum: PyTree) -> PyTree:
    """``fn(chunk)`` for each chunk of ``(x, *per_datum)``, its per-row outputs concatenated
    back to ``(N_pad, ...)`` (``lax.map`` over chunks: one chunk's intermediates at a time)."""
    values = (data.x, *per_datum)
    size, n = data.chunk_size, data.num_rows
    if size >= n:
        return fn(values)
    chunked = jax.tree_util.tree_map(
        lambda leaf: leaf.reshape(n // size, size, *leaf.shape[1:]), values
    )
    out = jax.lax.map(fn, chunked)
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(n, *leaf.shape[2:]), out)
