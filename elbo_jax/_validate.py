"""Trace-time checks of user input, with messages that name the argument and the problem."""

import math
import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._latent import AbstractLatent, Chain, Discrete, GaussianChain, Real, is_sequence_latent
from ._model import Model, float_dtype


@jax.jit
def _all_finite(arr: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(arr))


@jax.jit
def _no_inf(arr: jax.Array) -> jax.Array:
    return ~jnp.any(jnp.isinf(arr))


def is_concrete(*arrays: Any) -> bool:
    """True unless one of ``arrays`` is a tracer (so that its values can be checked now)."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer (``np.int64(3)`` too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A Python or NumPy real number (``np.float32(1e-5)``, ``np.int64(2)`` too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def to_python_number(value: Any) -> Any:
    """``value`` as a Python ``int`` or ``float`` if it is a (NumPy) number, else unchanged.

    For static fields and hyperparameters: a NumPy scalar hashes like the Python number but
    would carry its dtype into the maths (``np.float64`` with x64 off warns); anything else
    is left for the caller's check to reject with its own message.
    """
    if is_integer(value):
        return int(value)
    if is_number(value):
        return float(value)
    return value


def check_number(name: str, value: Any, *, low: float, low_inclusive: bool = True) -> float:
    """``value`` as a finite Python float, at least (or above) ``low``.

    Raises ``ValueError`` naming ``name`` otherwise (bools and non-numbers included).
    """
    ok = is_number(value) and math.isfinite(value)
    if not ok or not (value >= low if low_inclusive else value > low):
        want = f">= {low:g}" if low_inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {want}, got {value!r}")
    return float(value)


def canonical_float_dtype(*arrays: Any) -> Any:
    """The floating dtype ``arrays`` agree on (NumPy promotion of their float dtypes; lists and
    scalars count by ``np.asarray``), as JAX will store it: float64 becomes float32 with x64
    off, so ``jnp.asarray(a, dtype)`` never asks for an unavailable dtype (which warns)."""
    kinds = [np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype) for a in arrays]
    floats = [k for k in kinds if k.kind == "f"]
    dtype = np.result_type(*floats) if floats else np.dtype(float)
    return jax.dtypes.canonicalize_dtype(dtype)


def check_model(model: Any) -> Model:
    if not isinstance(model, Model):
        raise TypeError(
            f"model must be an instance of an ej.Model subclass, got {type(model).__name__}"
        )
    return model


def check_has_parameters(model: Model) -> None:
    """Raise ``TypeError`` if ``model`` has no floating-point array field: fitting moves
    exactly those (the numerical M-step would otherwise fail deep inside optax)."""
    if not any(eqx.is_inexact_array(leaf) for leaf in jax.tree_util.tree_leaves(model)):
        raise TypeError(
            f"model ({type(model).__name__}) has no floating-point array fields: fit moves a "
            "model's floating-point arrays (its parameters), and there are none to fit"
        )


_NONFINITE = "x contains NaN or Inf (checked at run time: x was traced by jit or vmap)"


def prepare_data(model: Model, x: Any, check: Any = None) -> Any:
    """Convert ``x`` to JAX arrays, cast floating data to the model's dtype, and check it.

    Raises ``TypeError`` for non-numeric data and ``ValueError`` for data without a
    leading data axis, with no data, with NaN/Inf entries, or that the model rejects
    (``check(x)``, default ``model.check_data``; evaluation functions pass a check of the
    shape alone). Tracers (``x`` inside a user's ``jit``) get the shape checks now and the
    NaN/Inf check at run time (``eqx.error_if``); a JAX array is checked for NaN/Inf on its
    own device by one compiled reduction per shape.
    """
    if is_sequence_latent(model.latent):
        from ._sequences import as_sequences, fill_padding

        x = fill_padding(as_sequences(x))
    elif _is_nested_numbers(x):  # [[1.0, 2.0], [3.0, 4.0]]: one array, not a pytree of scalars
        x = np.asarray(x)
    leaves, treedef = jax.tree_util.tree_flatten(x)
    if not leaves:
        raise ValueError("x is empty: expected an array whose leading axis indexes the data")
    dtype = float_dtype(model)
    missing = model.missing_values  # NaN marks a missing entry; Inf is still an error
    out = []
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            # Inside a user's jit or vmap the values are unknown here: check them where they
            # are computed, as a run-time error of the compiled program.
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                bad = jnp.any(jnp.isinf(leaf)) if missing else ~jnp.all(jnp.isfinite(leaf))
                leaf = eqx.error_if(leaf, bad, _NONFINITE)
            out.append(leaf)
            continue
        arr = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        kind = np.dtype(arr.dtype).kind
        if kind not in "biuf":
            raise TypeError(f"x must hold numbers, got an array of dtype {arr.dtype}")
        if arr.ndim == 0:
            raise ValueError("x is a scalar: expected an array whose leading axis indexes the data")
        if arr.shape[0] == 0:
            raise ValueError(f"x has shape {arr.shape}: there are no data (N = 0)")
        if kind == "f":
            # A JAX array is checked where it lives (no copy of the data to the host).
            with jax.ensure_compile_time_eval():  # concrete data inside a user's jit too
                if missing:
                    all_finite = (
                        bool(_no_inf(arr))
                        if isinstance(arr, jax.Array)
                        else not np.isinf(arr).any()
                    )
                else:
                    all_finite = (
                        bool(_all_finite(arr))
                        if isinstance(arr, jax.Array)
                        else np.isfinite(arr).all()
                    )
            if not all_finite:
                values = np.asarray(arr)
                bad = np.argwhere(np.isinf(values) if missing else ~np.isfinite(values))
                what = "Inf (NaN marks a missing value)" if missing else "NaN or Inf"
                raise ValueError(
                    f"x contains {what}: {len(bad)} entries, the first at index {tuple(int(i) for i in bad[0])}"
                )
            arr = jnp.asarray(arr, dtype)
        else:
            arr = jnp.asarray(arr)
        out.append(arr)
    n = {leaf.shape[0] for leaf in out}
    if len(n) > 1:
        raise ValueError(
            f"x has leaves with different numbers of data along the leading axis: {sorted(n)}"
        )
    x = jax.tree_util.tree_unflatten(treedef, out)
    (model.check_data if check is None else check)(x)
    return x


def _is_nested_numbers(x: Any) -> bool:
    """A (nested) list of Python or NumPy numbers, as NumPy would read it into one array."""
    if not isinstance(x, list):
        return False
    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(isinstance(leaf, (numbers.Number, np.generic)) for leaf in leaves)


def shape_key(*trees: Any) -> Any:
    """A hashable key of the trees' structure, array shapes and dtypes and other leaves'
    values, or ``None`` when something in them cannot be hashed: for caches of what
    depends on shapes only (a traced check, a jaxpr read)."""
    key = []
    for tree in trees:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        key.append(treedef)
        key.extend(
            (leaf.shape, str(leaf.dtype)) if hasattr(leaf, "dtype") else leaf for leaf in leaves
        )
    key = tuple(key)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def remembered(store: dict, key: Any, compute: Callable[[], Any], limit: int = 64) -> Any:
    """``compute()``, kept in ``store`` under ``key`` for later calls (the oldest entry is
    dropped beyond ``limit``); computed afresh when ``key`` is ``None``. Nothing is kept
    when ``compute`` raises."""
    if key is None:
        return compute()
    if key not in store:
        value = compute()
        if len(store) >= limit:
            store.pop(next(iter(store)))
        store[key] = value
    return store[key]


def datum_shapes(x: Any) -> Any:
    """One datum of ``x``, abstractly (``jax.ShapeDtypeStruct`` leaves)."""
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), x)


_CHECKED: dict[Any, None] = {}


def check_log_joint(model: Model, x: Any) -> None:
    """``log_joint`` must give a scalar for one datum and one latent value (traced once per
    model structure and datum shape: later fits of the same shapes skip it)."""
    remembered(_CHECKED, shape_key(model, datum_shapes(x)), lambda: _check_log_joint(model, x), 256)


def _check_log_joint(model: Model, x: Any) -> None:
    latent = model.latent
    if isinstance(latent, Discrete):
        z = jax.ShapeDtypeStruct((), latent.dtype)  # as log_joint_table enumerates it
    elif isinstance(latent, Real):
        z = jax.ShapeDtypeStruct(latent.shape, float_dtype(model))
    elif isinstance(latent, Chain):
        z = jax.ShapeDtypeStruct((x.num_frames,), latent.dtype)  # one path per sequence
    elif isinstance(latent, GaussianChain):
        z = jax.ShapeDtypeStruct((x.num_frames, latent.state_dim), float_dtype(model))
    elif isinstance(latent, AbstractLatent):
        z = latent.value_struct(datum_shapes(x), float_dtype(model))
        if z is None:  # a model-specific latent space that gives no shape to check with
            return
    else:
        raise TypeError(
            f"{type(model).__name__}.latent must be ej.Discrete, ej.Real, ej.Chain, "
            f"ej.GaussianChain or another ej.AbstractLatent, got {latent!r}"
        )
    name = type(model).__name__
    x0 = datum_shapes(x)
    shapes = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), x)
    datum = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape[1:]), x)
    try:
        out = jax.eval_shape(model.log_joint, x0, z)
    except (TypeError, ValueError, IndexError) as error:
        # Most often x has the wrong rank or dimension and log_joint indexes or
        # broadcasts it; the bare JAX error would not mention x at all.
        raise ValueError(
            f"{name}.log_joint failed on one datum of x: x has shape {shapes}, so one datum "
            f"has shape {datum} (the leading axis of x indexes the data), with z of shape "
            f"{jax.tree_util.tree_map(lambda v: v.shape, z)}. Check that x has the shape {name} expects. "
            f"The error was {type(error).__name__}: {error}"
        ) from error
    shape = getattr(out, "shape", None)
    if shape != ():
        raise TypeError(
            f"{name}.log_joint must return a scalar log p(x, z) for one datum and one latent "
            f"value, got shape {shape} for one datum of x of shape {datum} (x has shape "
            f"{shapes}); elbo_jax does the vmap over data itself, so check the shape of x too"
        )
