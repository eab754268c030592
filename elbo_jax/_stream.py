r"""Data that arrive in batches from the host: ``ej.Stream`` and the reader that feeds fits.

A fit over a stream runs the same solvers as a fit over an array. Each pass reads the
batches in turn; a background thread reads, checks and copies the next batches to the
device while the current one computes, and every batch is padded to the batch size (weight
0 for the padding), so that one compiled update serves them all. Exact EM merges the
batches' statistics, so a pass over a stream gives the statistics of the whole data set,
exactly as a pass over the same data in memory.
"""

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.random as jr
import numpy as np

from ._custom_types import Key


def _is_array_like(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "__getitem__") and len(leaf.shape) >= 1


class Stream:
    r"""Data read batch by batch from the host: for data that do not fit on the device
    (a NumPy ``memmap``, an HDF5 dataset), that are generated on the fly, or that come from a
    data loader. Pass it to ``fit`` as ``x``.

    - ``source``:
        - an array-like with a leading data axis and slicing (``np.memmap``, ``h5py``,
          ``zarr``, a NumPy array), or a pytree of them other than a list or tuple (a dict,
          ``ej.Sequences`` of memmaps): read in slices of ``batch_size`` rows, in order or (``shuffle=True``) in
          an order of the slices drawn from the fit's key for each pass;
        - a function ``() -> iterable of batches``: called once per pass;
        - an iterable of batches (a list or tuple, a data loader): iterated once per pass;
          a one-shot iterator such as a generator can be read only once (a fit that needs a
          second pass raises a ``ValueError``: pass a function that returns a new generator).

      A batch is an array (or pytree) whose leading axis indexes its data; every batch has
      the same shape after that axis and the same dtype.
    - ``batch_size``: rows per batch; required for an array-like source. For iterables it is
      the largest batch allowed (default: the first batch's rows). Smaller batches (the last
      one) are padded with rows of weight 0.
    - ``shuffle``: draw the order of an array-like's slices anew each pass (needs ``key``).
    - ``num_data``: the number of data in a pass, when the source does not say (only a fit
      with a prior needs it before its first pass ends); an array-like's own length is used.
    - ``prefetch``: how many batches are read ahead of the one computing.

    ```python
    x = np.load("big.npy", mmap_mode="r")
    ej.fit(model, ej.Stream(x, batch_size=100_000), max_iters=50)
    ```
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        num_data: int | None = None,
        prefetch: int = 2,
    ):
        for name, value in (("batch_size", batch_size), ("num_data", num_data)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be True or False, got {shuffle!r}")
        # A list or tuple holds batches; any other pytree of array-likes (a dict, Sequences)
        # is one data set read in slices.
        batches = isinstance(source, (list, tuple, Iterator)) or (
            callable(source) and not _is_array_like(source)
        )
        leaves = [] if batches else jax.tree_util.tree_leaves(source)
        self.sliced = bool(leaves) and all(_is_array_like(leaf) for leaf in leaves)
        if self.sliced:
            lengths = {int(leaf.shape[0]) for leaf in leaves}
            if len(lengths) != 1:
                raise ValueError(
                    f"the arrays of source have different lengths {sorted(lengths)}: "
                    "their leading axes must all index the same data"
                )
            (length,) = lengths
            if length == 0:
                raise ValueError("source has no data (its leading axis has length 0)")
            if batch_size is None:
                raise ValueError("an array-like source is read in slices: pass batch_size=")
            if num_data is not None and num_data != length:
                raise ValueError(f"num_data={num_data} but source has {length} rows")
            num_data = length
        elif callable(source) or isinstance(source, Iterable):
            if shuffle:
                raise ValueError(
                    "shuffle=True draws the order of an array-like's slices; a function or an "
                    "iterable of batches comes in its own order (shuffle in the loader)"
                )
        else:
            raise TypeError(
                "source must be an array-like (with .shape and slicing), a function returning "
                f"an iterable of batches, or an iterable of batches; got {type(source).__name__}"
            )
        self.source = source
        self.batch_size = None if batch_size is None else int(batch_size)
        self.shuffle = shuffle
        self.num_data = None if num_data is None else int(num_data)
        self.prefetch = prefetch
        self._used = False  # a one-shot iterator that has been read

    def __repr__(self) -> str:
        kind = "sliced" if self.sliced else type(self.source).__name__
        return f"Stream({kind}, batch_size={self.batch_size}, num_data={self.num_data})"

    @property
    def num_batches(self) -> int | None:
        """Batches per pass, when known."""
        if self.num_data is None or self.batch_size is None or not self.sliced:
            return None
        return -(-self.num_data // self.batch_size)

    def host_batches(self, key: Key | None, pass_index: int) -> Iterator[Any]:
        """The batches of one pass, as the source gives them (host arrays or pytrees)."""
        if self.sliced:
            yield from self._slices(key, pass_index)
            return
        source = self.source
        if callable(source) and not isinstance(source, Iterable):
            yield from source()
            return
        iterator = iter(source)
        if iterator is source:  # a one-shot iterator
            if self._used:
                raise ValueError(
                    "this stream is a one-shot iterator (such as a generator) that a previous "
                    "pass has read; a fit that reads the data more than once needs "
                    "ej.Stream(lambda: make_batches()) or a re-iterable source"
                )
            self._used = True
        yield from iterator

    def _slices(self, key: Key | None, pass_index: int) -> Iterator[Any]:
        size, n = self.batch_size, self.num_data
        order = np.arange(self.num_batches)
        if self.shuffle:
            if key is None:
                raise ValueError(
                    "Stream(shuffle=True) draws its order from the fit's key: pass key="
                )
            order = np.asarray(jr.permutation(jr.fold_in(key, pass_index + 1), len(order)))
        for i in order:
            start = int(i) * size
            yield jax.tree_util.tree_map(
                lambda leaf, a=start: np.asarray(leaf[a : min(a + size, n)]), self.source
            )


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead (0: in this thread).
    An exception in the producer is raised here, where the item would have been."""
    if depth == 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            slots.put(_Failure(error))

    thread = threading.Thread(target=produce, name="elbo_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class BatchReader:
    """Reads a ``Stream`` for a fit: checks every batch against the first (structure, shape
    after the leading axis, dtype), prepares it as ``fit`` prepares an array (the model's
    dtype, NaN checks, on the device) and yields ``(x, rows)``, read ahead by
    ``stream.prefetch`` batches in a background thread."""

    def __init__(self, stream: Stream, prepare: Callable[[Any], Any], dtype: Any):
        self.stream = stream
        self.prepare = prepare
        self.dtype = dtype
        self.like: Any = None  # (treedef, [(trailing shape, dtype)]) of the first batch
        self.batch_size = stream.batch_size
        self._first: Any = None  # the first pass's first batch, read early for planning

    def first(self, key: Key | None) -> Any:
        """The first batch of the first pass, prepared (it sets the shapes of all others)."""
        if self._first is None:
            iterator = self.stream.host_batches(key, FIRST_PASS)
            self._pending = iterator
            try:
                raw = next(iterator)
            except StopIteration:
                raise ValueError("the stream yielded no batches: there are no data") from None
            self._first = self._prepared(0, raw)
        return self._first

    def _describe(self, raw: Any) -> tuple:
        leaves, treedef = jax.tree_util.tree_flatten(raw)
        return treedef, [(tuple(np.shape(leaf)[1:]), np.dtype(leaf.dtype)) for leaf in leaves]

    def _prepared(self, index: int, raw: Any) -> tuple[Any, int]:
        leaves = jax.tree_util.tree_leaves(raw)
        if not leaves or any(not hasattr(leaf, "shape") or np.ndim(leaf) == 0 for leaf in leaves):
            raise ValueError(
                f"batch {index} of the stream is not an array (or pytree of arrays) with a "
                f"leading data axis: got {type(raw).__name__}"
            )
        treedef, described = self._describe(raw)
        rows = int(np.shape(leaves[0])[0])
        if self.like is None:
            self.like = (treedef, described)
            if self.batch_size is None:
                self.batch_size = rows
        else:
            want_tree, want = self.like
            if treedef != want_tree:
                raise ValueError(
                    f"batch {index} of the stream has structure {treedef}; the first batch had "
                    f"{want_tree}"
                )
            for (shape, dtype), (shape0, dtype0) in zip(described, want, strict=True):
                if shape != shape0:
                    raise ValueError(
                        f"batch {index} of the stream has shape (rows, {', '.join(map(str, shape))}) "
                        f"after its first axis, but the first batch had "
                        f"(rows, {', '.join(map(str, shape0))}): every batch must have the same "
                        "shape apart from its number of rows"
                    )
                if dtype != dtype0:
                    raise ValueError(
                        f"batch {index} of the stream has dtype {dtype}, but the first batch had "
                        f"{dtype0}: every batch must have the same dtype"
                    )
        if rows > self.batch_size:
            raise ValueError(
                f"batch {index} of the stream has {rows} rows, more than the batch size "
                f"{self.batch_size} (Stream(batch_size=...) or the first batch's rows)"
            )
        try:
            x = self.prepare(raw)
        except (ValueError, TypeError) as error:
            raise type(error)(f"batch {index} of the stream: {error}") from error
        return x, rows

    def pass_batches(self, key: Key | None, pass_index: int) -> Iterator[tuple[Any, int]]:
        """The prepared batches ``(x, rows)`` of one pass, read ahead in a thread."""
        first, self._first = self._first, None
        if first is not None and not self.stream.sliced:
            # The batch read for planning opens the first pass (an iterable cannot be rewound;
            # an array-like is read again, in this pass's order).
            rest = self._pending
            yield first
            start = 1
        else:
            rest = self.stream.host_batches(key, pass_index)
            start = 0
        raws = ((i, raw) for i, raw in enumerate(rest, start=start))
        prepared = (self._prepared(i, raw) for i, raw in raws)
        count = start
        for item in prefetched(prepared, self.stream.prefetch):
            count += 1
            yield item
        if count == 0:
            raise ValueError("the stream yielded no batches in this pass: there are no data")


# The pass of a fit's start (exact EM's first statistics pass) draws its shuffled order from
# this index; later passes from their iteration number.
FIRST_PASS = -1
