r"""Sequences as data: equal-length ones as one array, ragged ones as a padded array plus lengths.

A model whose latent space is a chain (``ej.Chain``, ``ej.GaussianChain``) reads one datum
as one whole sequence. ``fit`` takes either an array ``(N, T, ...)`` of ``N`` sequences of
``T`` frames each, or ``ej.Sequences(frames, lengths)``: ``frames`` padded to a common
``T`` and ``lengths`` ``(N,)`` saying how many frames of each are real. Padding frames are
never read: the answer is the same as for the sequences one by one, and batches with other
lengths within the same padded shape reuse the compiled fit.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array
from ._validate import is_concrete


class Sequences(eqx.Module):
    r"""``N`` sequences of frames, padded to a common length ``T``, with their lengths.

    One datum is one sequence: ``frames[n, :lengths[n]]``. Under ``fit`` and the models'
    methods, a datum is a ``Sequences`` too, with ``frames`` ``(T, ...)`` and a scalar
    ``lengths``.

    **Arguments:**

    - `frames`: ``(N, T, ...)``; entries past a sequence's length are ignored (any value,
      NaN included).
    - `lengths`: ``(N,)`` integers in ``[1, T]``, or ``None``: every sequence has ``T`` frames.

    ```python
    x = ej.Sequences.from_list([seq_a, seq_b, seq_c])   # arrays (T_i, D) of any lengths
    res = ej.fit(ej.models.GaussianHMM.initialize(key, x, 4), x)
    ```
    """

    frames: Any
    lengths: Any

    def __init__(self, frames: Any, lengths: Any = None):
        if not isinstance(frames, jax.Array) and is_concrete(frames):
            frames = np.asarray(frames)
        if getattr(frames, "ndim", 0) < 2:
            raise ValueError(
                f"frames has shape {np.shape(frames)}, expected (N, T, ...): N sequences of T frames"
            )
        n, t = frames.shape[:2]
        if lengths is None:
            lengths = np.full((n,), t, np.int32)
        elif is_concrete(lengths):
            values = np.asarray(lengths)
            if values.shape != (n,):
                raise ValueError(f"lengths has shape {values.shape}, expected (N,) = ({n},)")
            if values.size and values.dtype.kind not in "iu":
                if values.dtype.kind != "f" or not np.all(values == np.round(values)):
                    raise ValueError(f"lengths must be integers, got dtype {values.dtype}")
            if values.size and (values.min() < 1 or values.max() > t):
                bad = int(np.argmax((values < 1) | (values > t)))
                raise ValueError(
                    f"lengths must be in [1, T] = [1, {t}] (T: the padded length of frames), "
                    f"got lengths[{bad}] = {values[bad]}"
                )
            lengths = values.astype(np.int32)
        self.frames = frames
        self.lengths = lengths

    @classmethod
    def from_list(cls, sequences: Sequence[Any], *, pad_to: int | None = None) -> "Sequences":
        """Pad a list of arrays ``(T_i, ...)`` (same trailing shape) into ``Sequences``.

        Padding frames are copies of each sequence's first frame. ``pad_to``: the padded
        length ``T`` (default: the longest sequence), so that batches of different longest
        lengths can share one compiled fit.
        """
        arrays = [np.asarray(s) for s in sequences]
        if not arrays:
            raise ValueError("sequences is empty: expected a list of arrays (T_i, ...)")
        trailing = {a.shape[1:] for a in arrays}
        if any(a.ndim < 1 or a.shape[0] < 1 for a in arrays) or len(trailing) != 1:
            shapes = [a.shape for a in arrays[:5]]
            raise ValueError(
                "sequences must be arrays (T_i, ...) with T_i >= 1 and the same shape per frame, "
                f"got shapes {shapes}{' ...' if len(arrays) > 5 else ''}"
            )
        lengths = np.array([a.shape[0] for a in arrays], np.int32)
        t = int(lengths.max()) if pad_to is None else int(pad_to)
        if t < lengths.max():
            raise ValueError(
                f"pad_to={pad_to} is shorter than the longest sequence ({lengths.max()})"
            )
        frames = np.stack(
            [np.concatenate([a, np.repeat(a[:1], t - a.shape[0], axis=0)]) for a in arrays]
        )
        return cls(frames, lengths)

    @property
    def num_frames(self) -> int:
        """``T``, the padded length."""
        return self.frames.shape[np.ndim(self.lengths)]

    def mask(self) -> Array:
        """``(..., T)`` booleans: frame ``t`` is real (``t < length``)."""
        lengths = jnp.asarray(self.lengths)
        steps = jnp.arange(self.num_frames, dtype=lengths.dtype)
        if lengths.ndim == 0:
            return steps < lengths
        return steps[None, :] < lengths[:, None]

    def to_list(self) -> list[np.ndarray]:
        """The sequences without their padding, as NumPy arrays."""
        frames, lengths = np.asarray(self.frames), np.asarray(self.lengths)
        return [frames[i, : int(n)] for i, n in enumerate(lengths)]


def as_sequences(x: Any) -> Sequences:
    """``x`` itself if it is ``Sequences``, else an array ``(N, T, ...)`` of equal-length
    sequences (with a message naming ``x`` if it is not one)."""
    if isinstance(x, Sequences):
        return x
    if isinstance(x, (list, tuple)):
        raise TypeError(
            "x is a list: pass ragged sequences as ej.Sequences.from_list(list_of_arrays), or "
            "equal-length ones as one array (N, T, ...)"
        )
    if np.ndim(x) < 2:
        raise ValueError(
            f"x has shape {np.shape(x)}; a model of sequences expects (N, T, ...) (N sequences of "
            "T frames) or ej.Sequences(frames, lengths)"
        )
    return Sequences(x)


def fill_padding(x: Sequences) -> Sequences:
    """``x`` with every padding frame replaced by its sequence's first frame (on the host for
    NumPy data), so that padding is finite wherever the real frames are."""
    frames = x.frames
    t = frames.shape[1]
    if isinstance(x.lengths, np.ndarray) and np.all(x.lengths == t):
        return x
    trailing = (1,) * (frames.ndim - 2)
    if isinstance(frames, np.ndarray) and isinstance(x.lengths, np.ndarray):
        real = (np.arange(t)[None, :] < x.lengths[:, None]).reshape(*frames.shape[:2], *trailing)
        frames = np.where(real, frames, frames[:, :1])
    else:
        real = x.mask().reshape(*frames.shape[:2], *trailing)
        frames = jnp.where(real, frames, frames[:, :1])
    return Sequences(frames, x.lengths)
