"""Saving and loading fitted estimators without pickle: ``estimator.save(path)``,
``Estimator.load(path)`` and ``elbo_jax.sklearn.load(path)``, in ``ej.save``'s kind of file."""

import dataclasses
import os
from typing import Any

import equinox as eqx
import numpy as np

import elbo_jax as ej

from ._base import BaseEstimator, check_is_fitted

# ----------------------------------------------------------------------------- save / load
SAVE_FORMAT = "elbo_jax.sklearn.save"


def _estimator_classes() -> dict[str, type]:
    """The estimator classes a file may name: those ``elbo_jax.sklearn`` exports, by name."""
    from elbo_jax import sklearn as package

    return {
        name: obj
        for name, obj in vars(package).items()
        if isinstance(obj, type) and issubclass(obj, BaseEstimator)
    }


def _record_classes() -> dict[str, type]:
    """The (frozen dataclass) records a fitted attribute may hold, by name."""
    from ._hmm import ConvergenceMonitor

    return {"ConvergenceMonitor": ConvergenceMonitor}


def _encode_value(value: Any, key: str, arrays: dict, specs: dict) -> Any:
    """The JSON description of one parameter or fitted attribute (named ``key``); its arrays
    go into ``arrays`` (their dtype/shape into ``specs``) under names starting with ``key``
    (a fitted model's under ``model_.<path in the model>``)."""
    from .. import _serialise

    if isinstance(value, eqx.Module):
        return {"model": _serialise._encode(value, f".{key}", arrays, specs)}
    if type(value) in (bool, int, float, str, type(None)):
        return {"value": value}
    if isinstance(value, np.ndarray) and value.dtype == object:
        if not all(type(v) is str for v in value.flat) or value.ndim != 1:
            raise TypeError(f"{key} is an object array that is not a vector of str")
        return {"strings": value.tolist()}
    if isinstance(value, (np.ndarray, np.generic)):
        kind = "array" if isinstance(value, np.ndarray) else "scalar"
        return {kind: _serialise._encode(np.asarray(value), f".{key}", arrays, specs)["array"]}
    if type(value) in (list, tuple) and value and all(isinstance(v, np.generic) for v in value):
        # A list of NumPy scalars (``list(history)``): one array, not one entry per item.
        array = np.asarray(value)
        if all(type(v) is type(value[0]) and v.dtype == array.dtype for v in value):
            stored = _serialise._encode(array, f".{key}", arrays, specs)["array"]
            return {"scalars": stored, "type": type(value).__name__}
    if type(value) in (list, tuple):
        items = [_encode_value(v, f"{key}[{i}]", arrays, specs) for i, v in enumerate(value)]
        return {type(value).__name__: items}
    if type(value) is dict and all(type(k) is str for k in value):
        return {
            "dict": {k: _encode_value(v, f"{key}[{k!r}]", arrays, specs) for k, v in value.items()}
        }
    record = {cls: name for name, cls in _record_classes().items()}.get(type(value))
    if record is not None:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {
            "record": record,
            "fields": {k: _encode_value(v, f"{key}.{k}", arrays, specs) for k, v in fields.items()},
        }
    raise TypeError(
        f"{key} is a {type(value).__name__} ({value!r:.80}), which save cannot store without "
        "pickle (it stores None, bool, int, float, str, NumPy arrays and scalars, elbo_jax "
        "models, and lists, tuples and str-keyed dicts of them)"
    )


def _decode_value(node: Any, key: str, arrays: dict) -> Any:
    """The value that ``node`` (from ``_encode_value``) describes; ``arrays`` are popped."""
    from .. import _serialise

    kind = next(iter(node)) if isinstance(node, dict) and node else None
    if kind == "model" and len(node) == 1:
        return _serialise._decode(node["model"], f".{key}", arrays, _serialise._NO_LIKE)
    if kind == "value" and len(node) == 1 and type(node["value"]) in _serialise._SCALARS:
        return node["value"]
    if kind == "strings" and len(node) == 1 and type(node["strings"]) is list:
        if all(type(v) is str for v in node["strings"]):
            return np.asarray(node["strings"], dtype=object)
    if kind in ("array", "scalar", "scalars") and node[kind] == key and key in arrays:
        array = arrays.pop(key)
        if not isinstance(array, np.ndarray):
            raise _serialise._FileError(f"{key} is stored as a JAX array, not a NumPy one")
        if kind == "array" and len(node) == 1:
            return array
        if kind == "scalar" and len(node) == 1 and array.ndim == 0:
            return array[()]
        if kind == "scalars" and node.keys() == {"scalars", "type"} and array.ndim == 1:
            if node["type"] in ("list", "tuple"):
                return (list if node["type"] == "list" else tuple)(array)
    if kind in ("list", "tuple") and len(node) == 1 and type(node[kind]) is list:
        items = [_decode_value(v, f"{key}[{i}]", arrays) for i, v in enumerate(node[kind])]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and len(node) == 1 and type(node["dict"]) is dict:
        return {k: _decode_value(v, f"{key}[{k!r}]", arrays) for k, v in node["dict"].items()}
    if kind == "record" and node.keys() == {"record", "fields"} and type(node["fields"]) is dict:
        cls = _record_classes().get(node["record"])
        names = {f.name for f in dataclasses.fields(cls)} if cls is not None else None
        if names is not None and set(node["fields"]) == names:
            fields = node["fields"].items()
            return cls(**{k: _decode_value(v, f"{key}.{k}", arrays) for k, v in fields})
    raise _serialise._FileError(f"malformed config: {key} is described as {node!r:.200}")


class SaveLoadMixin:
    """``estimator.save(path)`` and ``Estimator.load(path)``: a fitted estimator in one
    ``.npz`` file, without pickle (``elbo_jax.sklearn.load(path)`` loads any of them).

    The file is ``ej.save``'s kind of archive (one ``.npy`` entry per array, a JSON config in
    the ``uint8`` entry ``elbo_jax-config``), whose config, of format
    ``"elbo_jax.sklearn.save"``, holds the estimator's class name, its ``get_params()`` and
    its fitted attributes; the fitted ``model_`` is described as ``ej.save`` describes a
    model, its arrays under ``model_.<path>``. Arrays come back bit for bit, so the loaded
    estimator predicts, scores and transforms exactly as the saved one did."""

    def save(self, path: str | os.PathLike) -> None:
        """Write this fitted estimator to the file ``path`` (exactly that name), without pickle.

        Stores the class name, ``get_params()`` and every fitted attribute (``model_``,
        ``n_iter_``, ``n_features_in_``, ...). Raises ``NotFittedError`` if not fitted, and
        ``TypeError`` naming a parameter or attribute that cannot be stored without pickle
        (a ``RandomState`` as ``random_state``: pass an int or ``None``)."""
        from .. import _serialise

        check_is_fitted(self, "model_")
        name = type(self).__name__
        if _estimator_classes().get(name) is not type(self):
            raise TypeError(f"save stores the estimators of elbo_jax.sklearn, not a {name}")
        params = self.get_params(deep=False)
        arrays: dict[str, np.ndarray] = {}
        specs: dict[str, dict] = {}
        encoded = {}
        for key, value in params.items():
            if isinstance(value, (eqx.Module, np.ndarray, np.generic)):
                raise TypeError(
                    f"parameter {key} is a {type(value).__name__}, which save does not store: "
                    "parameters must be JSON values (None, bool, int, float, str, lists and "
                    "str-keyed dicts of them)"
                )
            try:
                encoded[key] = _encode_value(value, f"param:{key}", arrays, specs)
            except TypeError as error:
                raise TypeError(f"parameter {key}: {error}") from None
        attributes = {}
        for key, value in vars(self).items():
            if key not in params:
                attributes[key] = _encode_value(value, key, arrays, specs)
        config = {
            "format": SAVE_FORMAT,
            "format_version": _serialise.FORMAT_VERSION,
            "elbo_jax_version": ej.__version__,
            "estimator": name,
            "params": encoded,
            "attributes": attributes,
            "arrays": specs,
        }
        _serialise._write(path, config, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        """Read an estimator of this class that ``save`` wrote to ``path`` (no pickle, no
        code from the file runs); ``ValueError`` for a file of another class or a bad file."""
        estimator = load(path)
        if type(estimator) is not cls:
            raise ValueError(
                f"{os.fspath(path)}: holds a {type(estimator).__name__}, not a {cls.__name__}"
            )
        return estimator


def load(path: str | os.PathLike) -> Any:
    """Read a fitted estimator that ``estimator.save`` wrote to ``path``, of whichever
    ``elbo_jax.sklearn`` class it names (only those are allowed); without pickle.

    Raises ``ValueError`` naming the file and the problem (not such a file, another
    elbo_jax version, an unknown class, a malformed config, arrays that disagree with it)."""
    from .. import _serialise

    path = os.fspath(path)
    try:
        entries = _serialise._read(path)
        config = _serialise._parse_config(entries, SAVE_FORMAT)
        name, params = config.get("estimator"), config.get("params")
        attributes, specs = config.get("attributes"), config.get("arrays")
        if not all(type(v) is dict for v in (params, attributes, specs)):
            raise _serialise._FileError("malformed config: needs 'params', 'attributes', 'arrays'")
        cls = _estimator_classes().get(name) if type(name) is str else None
        if cls is None:
            raise _serialise._FileError(f"names the unknown estimator class {name!r}")
        arrays = _serialise._check_arrays(entries, specs)
        values = {k: _decode_value(v, f"param:{k}", arrays) for k, v in params.items()}
        fitted = {k: _decode_value(v, k, arrays) for k, v in attributes.items()}
        if arrays:
            raise _serialise._FileError(f"malformed config: arrays {sorted(arrays)} have no place")
        if set(values) != set(cls._get_param_names()) or set(fitted) & set(values):
            raise _serialise._FileError(f"malformed config: the parameters are not {name}'s")
    except _serialise._FileError as error:
        raise ValueError(f"{path}: {error}") from None
    estimator = cls(**values)
    vars(estimator).update(fitted)  # as unpickling does: no property setter runs
    return estimator
