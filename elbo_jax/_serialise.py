r"""Saving and loading models without pickle: ``save(path, model)`` and ``load(path)``.

**The format.** One ``.npz`` archive (a zip of ``.npy`` members, readable by
``np.load(path, allow_pickle=False)``), written at exactly ``path``, whatever its suffix:

- ``elbo_jax-config``: a ``uint8`` array, the UTF-8 bytes of a JSON object ``{"format":
  "elbo_jax.save", "format_version": 1, "elbo_jax_version": ..., "class": ..., "tree": ...,
  "arrays": {path: {"dtype", "shape", "type"}}}``. ``tree`` describes the model node by node:
  ``{"module": class name, "static": {field: value}, "fields": {field: node}}`` for an
  ``eqx.Module``; ``{"array": path}``, ``{"value": number}``, ``{"none": null}``,
  ``{"tuple": [...]}``, ``{"list": [...]}`` or ``{"dict": {...}}`` below it. Static values
  are JSON, with ``{"tuple": [...]}`` and ``{"dict": {...}}`` keeping their Python types.
- one member per array, named by its path in the model (``encoder.network.layers[0].weight``),
  in its own dtype; a dtype that NumPy lacks (``bfloat16``) is stored as its raw bits
  (``uint16``), its name in the config. Every array comes back bit for bit.

Loading never runs code named by the file: class names are looked up in an allowlist
(the concrete Modules of ``elbo_jax``, ``elbo_jax.models`` and ``equinox.nn``) or taken from
the ``like=`` skeleton; each Module is rebuilt as equinox's own ``tree_unflatten`` does
(``object.__new__`` and its fields), after which its ``__check_init__`` checks run.
"""

import dataclasses
import functools
import inspect
import json
import os
import zipfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._model import Model

FORMAT = "elbo_jax.save"
FORMAT_VERSION = 1
CONFIG_KEY = "elbo_jax-config"  # never an array path: those start with a field name
_SCALARS = (bool, int, float, str, type(None))
_NATIVE_DTYPES = {
    np.dtype(name).name: np.dtype(name)
    for name in "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64".split()
    + "float16 float32 float64 complex64 complex128".split()
}
# Dtypes NumPy does not know (ml_dtypes'): stored as raw bits in an unsigned int of their size.
_BIT_DTYPES = {
    name: np.dtype(getattr(jnp, name))
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(jnp, name)
}
_NO_LIKE = object()
_CONTAINERS = {"tuple": list, "list": list, "dict": dict}  # JSON's type for each


class _FileError(ValueError):
    """A problem with the file's contents; ``load`` adds the file's path to the message."""


@functools.cache
def _allowed_classes() -> dict[str, type]:
    """The Module classes a file may name, by public name (``elbo_jax.models.GaussianMixture``)."""
    import elbo_jax

    from . import models

    allowed = {}
    namespaces = {"elbo_jax.models": models, "elbo_jax": elbo_jax, "equinox.nn": eqx.nn}
    for prefix, namespace in namespaces.items():
        for name, obj in vars(namespace).items():
            module = isinstance(obj, type) and issubclass(obj, eqx.Module)
            if module and not inspect.isabstract(obj) and not name.startswith("Abstract"):
                allowed[f"{prefix}.{name}"] = obj
    return allowed


def _class_name(cls: type) -> str:
    names = [name for name, obj in _allowed_classes().items() if obj is cls]
    return names[0] if names else f"{cls.__module__}.{cls.__qualname__}"


def _names_class(name: str, cls: type) -> bool:
    """Whether a file's class name names ``cls``; outside the allowlist the module may differ
    (a model saved from a script's ``__main__`` loads into a notebook's class)."""
    full = _class_name(cls)
    if full in _allowed_classes():
        return name == full
    return name == full or name.endswith("." + cls.__qualname__)


def _library_version() -> str:
    import elbo_jax

    return elbo_jax.__version__


# ----------------------------------------------------------------------------- save
def _encode_static(value: Any, where: str) -> Any:
    if type(value) in _SCALARS:
        return value
    if type(value) in (tuple, list):
        items = [_encode_static(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"tuple": items} if type(value) is tuple else items
    if type(value) is dict and all(type(k) is str for k in value):
        return {"dict": {k: _encode_static(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise TypeError(
        f"{where} is a static {type(value).__name__} ({value!r}), which save cannot store as "
        "JSON (static fields must be None, bool, int, float, str, or tuples, lists and "
        "str-keyed dicts of them)"
    )


def _items(node: Any) -> dict:
    return node if type(node) is dict else dict(enumerate(node))


def _encode(node: Any, path: str, arrays: dict[str, np.ndarray], specs: dict) -> Any:
    """The JSON description of ``node`` (at ``path``, ``""`` for the model); its arrays go
    into ``arrays`` and their dtype/shape/type into ``specs``, keyed by path."""
    where = f"model{path}"
    if isinstance(node, eqx.Module):
        fields = dataclasses.fields(node)
        if set(vars(node)) != {f.name for f in fields}:
            raise TypeError(f"{where} ({type(node).__name__}) holds attributes that are not fields")
        static, dynamic = {}, {}
        for f in fields:
            value, at = getattr(node, f.name), f"{path}.{f.name}"
            if f.metadata.get("static", False):
                static[f.name] = _encode_static(value, f"model{at}")
            else:
                dynamic[f.name] = _encode(value, at, arrays, specs)
        return {"module": _class_name(type(node)), "static": static, "fields": dynamic}
    if isinstance(node, jax.core.Tracer):
        raise TypeError(f"{where} is a traced array: save a model outside jit, vmap and grad")
    if isinstance(node, jax.Array) and node.weak_type:  # no public way to restore it
        raise TypeError(
            f"{where} is a weakly typed array (made from a Python scalar), which save cannot "
            "keep: give it a dtype, as in jnp.asarray(value, jnp.float32)"
        )
    if isinstance(node, (jax.Array, np.ndarray)):
        array = np.asarray(node)
        name = array.dtype.name
        if name not in _NATIVE_DTYPES and name not in _BIT_DTYPES:
            raise TypeError(f"{where} is an array of dtype {name}, which save cannot store")
        arrays[path[1:]] = array.view(f"u{array.dtype.itemsize}") if name in _BIT_DTYPES else array
        kind = "numpy" if isinstance(node, np.ndarray) else "jax"
        specs[path[1:]] = {"dtype": name, "shape": list(array.shape), "type": kind}
        return {"array": path[1:]}
    if node is None:
        return {"none": None}
    if type(node) in (bool, int, float):
        return {"value": node}
    if type(node) in (tuple, list) or (type(node) is dict and all(type(k) is str for k in node)):
        items = {k: _encode(v, f"{path}[{k!r}]", arrays, specs) for k, v in _items(node).items()}
        return {type(node).__name__: items if type(node) is dict else list(items.values())}
    raise TypeError(
        f"{where} is a {type(node).__name__}, which save cannot store (it stores eqx.Modules, "
        "arrays, Python numbers, None, and tuples, lists and str-keyed dicts of them)"
    )


def save(path: str | os.PathLike, model: Model) -> None:
    """Write ``model`` to the file ``path`` (exactly that name: add ``.npz`` yourself), without pickle.

    The file is one ``.npz`` archive: a JSON config (format name and version, the
    ``elbo_jax`` version, the class, its static fields, each array's path, dtype and shape)
    in the ``uint8`` entry ``elbo_jax-config``, and one entry per array, named by its path.
    Arrays round-trip bit for bit; ``ej.load`` reads the file back.

    **Arguments:**

    - `path`: a ``str`` or ``os.PathLike``; an existing file is replaced.
    - `model`: an ``ej.Model`` (a built-in or your own) or a built-in prior
      (``ej.models.GaussianMixturePrior``, ...), with concrete arrays.

    Raises ``TypeError`` for anything it cannot store faithfully: a non-Model, a traced array,
    a static field that is not JSON (a function, a NumPy scalar), an object held in a field.

    ```python
    model = ej.fit(ej.models.GaussianMixture.initialize(key, x, 3), x).model
    ej.save("mixture.npz", model)
    again = ej.load("mixture.npz")
    ```
    """
    if not isinstance(model, Model) and not _class_name(type(model)).startswith("elbo_jax.models."):
        raise TypeError(
            f"model must be an ej.Model or a built-in prior, got {type(model).__name__}"
        )
    arrays: dict[str, np.ndarray] = {}
    specs: dict[str, dict] = {}
    tree = _encode(model, "", arrays, specs)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "elbo_jax_version": _library_version(),
        "class": tree["module"],
        "tree": tree,
        "arrays": specs,
    }
    _write(path, config, arrays)


def _write(path: str | os.PathLike, config: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON ``config`` (as the ``uint8`` entry ``CONFIG_KEY``) to the
    ``.npz`` archive ``path``. Shared with ``elbo_jax.sklearn``'s estimator saves."""
    arrays = {**arrays, CONFIG_KEY: np.frombuffer(json.dumps(config).encode("utf-8"), np.uint8)}
    # zipfile rather than np.savez: no ".npz" appended, no clash of array names with its kwargs.
    with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


# ----------------------------------------------------------------------------- load
def _read(path: str) -> dict[str, np.ndarray]:
    """Every entry of the archive at ``path``, read without pickle."""
    with open(path, "rb") as file:
        try:
            contents = np.load(file, allow_pickle=False)
            if not isinstance(contents, np.lib.npyio.NpzFile):
                raise _FileError("a single .npy array, not an .npz archive")
            with contents:
                return {name: contents[name] for name in contents.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise _FileError(f"not an elbo_jax save ({error})") from None


def _parse_config(entries: dict[str, np.ndarray], expected: str = FORMAT) -> dict:
    """The config of a file of the format ``expected`` (another is ``elbo_jax.sklearn``'s
    estimator save, whose model tree is checked there), its version checked."""
    raw = entries.pop(CONFIG_KEY, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise _FileError(f"not an elbo_jax save (no uint8 entry {CONFIG_KEY!r})")
    try:
        config = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _FileError(f"malformed config: {error}") from None
    if not isinstance(config, dict) or config.get("format") != expected:
        raise _FileError(f"not an elbo_jax save (its config has no format {expected!r})")
    if config.get("elbo_jax_version") != _library_version():
        raise _FileError(
            f"saved by elbo_jax {config.get('elbo_jax_version')}, this is {_library_version()}; "
            "load it with that version"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise _FileError(
            f"format version {config.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if expected != FORMAT:
        return config
    tree, specs = config.get("tree"), config.get("arrays")
    if (
        not isinstance(tree, dict)
        or not isinstance(specs, dict)
        or config.get("class") != tree.get("module")
    ):
        raise _FileError("malformed config: needs 'class', 'tree' and 'arrays' that agree")
    return config


def _check_arrays(entries: dict[str, np.ndarray], specs: dict) -> dict[str, Any]:
    """The file's arrays, checked against the config's dtypes and shapes, in their own types."""
    missing = sorted(set(specs) - set(entries))
    if missing:
        raise _FileError(f"arrays {missing} are listed in the config but missing from the file")
    extra = sorted(set(entries) - set(specs))
    if extra:
        raise _FileError(f"holds arrays {extra} that the config does not list")
    arrays = {}
    for key, spec in specs.items():
        if not isinstance(spec, dict) or spec.keys() != {"dtype", "shape", "type"}:
            raise _FileError(f"malformed config: array {key!r} has the entry {spec!r}")
        name, shape, kind = spec["dtype"], spec["shape"], spec["type"]
        dtype = _NATIVE_DTYPES.get(name) or _BIT_DTYPES.get(name)
        if dtype is None or kind not in ("jax", "numpy") or not isinstance(shape, list):
            raise _FileError(f"malformed config: array {key!r} has the entry {spec!r}")
        array = entries[key]
        stored = dtype if name in _NATIVE_DTYPES else np.dtype(f"u{dtype.itemsize}")
        if array.dtype != stored or list(array.shape) != shape:
            raise _FileError(
                f"array {key!r} has dtype {array.dtype.name} and shape {array.shape}, but the "
                f"config says {name} {tuple(shape)}"
            )
        if kind == "jax" and jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise _FileError(
                f"array {key!r} is {name}, which JAX would truncate: turn on 64-bit mode "
                "(jax.config.update('jax_enable_x64', True)) before loading"
            )
        array = array.view(dtype)
        arrays[key] = jnp.asarray(array) if kind == "jax" else array
    return arrays


def _decode_static(value: Any, where: str) -> Any:
    if type(value) in _SCALARS:
        return value
    if type(value) is list:
        return [_decode_static(v, where) for v in value]
    if type(value) is dict and value.keys() == {"tuple"} and type(value["tuple"]) is list:
        return tuple(_decode_static(v, where) for v in value["tuple"])
    if type(value) is dict and value.keys() == {"dict"} and type(value["dict"]) is dict:
        return {k: _decode_static(v, where) for k, v in value["dict"].items()}
    raise _FileError(f"malformed config: {where} has the static value {value!r}")


def _check_init(module: eqx.Module) -> None:
    """Run the ``__check_init__`` of each class in the MRO, as equinox does after ``__init__``."""
    for cls in type(module).__mro__:
        if "__check_init__" in cls.__dict__:
            cls.__dict__["__check_init__"](module)


def _decode_module(node: dict, path: str, arrays: dict, like: Any) -> eqx.Module:
    where, name = f"model{path}", node["module"]
    if like is not _NO_LIKE:
        if not isinstance(like, eqx.Module) or not _names_class(name, type(like)):
            got = _class_name(type(like)) if isinstance(like, eqx.Module) else type(like).__name__
            raise _FileError(f"{where} is a {name} in the file, but a {got} in like")
        cls = type(like)
    elif name in _allowed_classes():
        cls = _allowed_classes()[name]
    else:
        raise _FileError(f"{where} is of the unknown class {name!r}; pass like= a model of it")
    fields = [f.name for f in dataclasses.fields(cls)]
    static, dynamic = node["static"], node["fields"]
    wanted = {f.name for f in dataclasses.fields(cls) if f.metadata.get("static", False)}
    if not isinstance(static, dict) or not isinstance(dynamic, dict) or static.keys() != wanted:
        raise _FileError(f"malformed config: the static fields of {where} are not {name}'s")
    if dynamic.keys() != set(fields) - wanted:
        raise _FileError(f"malformed config: the fields of {where} are not {name}'s")
    module = object.__new__(cls)  # as equinox's tree_unflatten: no __init__ runs
    for field in sorted(fields, key=lambda name: name not in static):  # static ones first
        sub_like = _NO_LIKE if like is _NO_LIKE else getattr(like, field)
        if field in static:
            value = _decode_static(static[field], f"{where}.{field}")
            if sub_like is not _NO_LIKE and json.dumps(static[field]) != json.dumps(
                _encode_static(sub_like, f"like.{field}")
            ):
                raise _FileError(
                    f"{where}.{field} is {value!r} in the file, but {sub_like!r} in like"
                )
        else:
            value = _decode(dynamic[field], f"{path}.{field}", arrays, sub_like)
        object.__setattr__(module, field, value)
    try:
        _check_init(module)
    except (ValueError, TypeError) as error:
        raise _FileError(f"the loaded {where} fails its checks: {error}") from None
    return module


def _decode(node: Any, path: str, arrays: dict, like: Any) -> Any:
    """The model part that ``node`` describes, checked against ``like`` (unless ``_NO_LIKE``)."""
    where, has_like = f"model{path}", like is not _NO_LIKE
    kind = next(iter(node)) if isinstance(node, dict) and node else None
    got = type(like).__name__
    if kind == "module" and node.keys() == {"module", "static", "fields"}:
        return _decode_module(node, path, arrays, like)
    if kind == "array" and node == {"array": path[1:]} and path[1:] in arrays:
        array = arrays.pop(path[1:])  # popped: each array fills one place
        if has_like and not (hasattr(like, "shape") and hasattr(like, "dtype")):
            raise _FileError(f"{where} is an array in the file, but a {got} in like")
        if has_like and (tuple(like.shape), np.dtype(like.dtype)) != (array.shape, array.dtype):
            raise _FileError(
                f"{where} is {array.dtype.name} {array.shape} in the file, but "
                f"{np.dtype(like.dtype).name} {tuple(like.shape)} in like"
            )
        return array
    if kind == "none" and node == {"none": None}:
        if has_like and like is not None:
            raise _FileError(f"{where} is None in the file, but a {got} in like")
        return None
    if kind == "value" and len(node) == 1 and type(node["value"]) in (bool, int, float):
        if has_like and type(like) is not type(node["value"]):
            raise _FileError(f"{where} is {node['value']!r} in the file, but a {got} in like")
        return node["value"]
    if kind in _CONTAINERS and len(node) == 1 and type(node[kind]) is _CONTAINERS[kind]:
        items = _items(node[kind])
        if has_like and (got != kind or list(_items(like)) != list(items)):
            raise _FileError(f"{where} is a {kind} of {list(items)} in the file, not so in like")
        decoded = [
            _decode(v, f"{path}[{k!r}]", arrays, like[k] if has_like else _NO_LIKE)
            for k, v in items.items()
        ]
        if kind == "dict":
            return dict(zip(items, decoded, strict=True))
        return tuple(decoded) if kind == "tuple" else decoded
    raise _FileError(f"malformed config: {where} is described as {node!r}")


def load(path: str | os.PathLike, *, like: Any = _NO_LIKE) -> Any:
    """Read a model that ``ej.save`` wrote to ``path``; no pickle, no code from the file runs.

    The file (one ``.npz``: a JSON config in ``elbo_jax-config`` plus one entry per array,
    see ``ej.save``) must come from this very ``elbo_jax`` version. Without ``like``, the
    model is rebuilt from the config: every class it names must be an elbo_jax built-in (or
    an ``equinox.nn`` layer inside one). For your own ``ej.Model`` subclass pass ``like=``, a
    skeleton of the same structure: a model built with any values, or
    ``eqx.filter_eval_shape`` of a constructor. The file's arrays fill it, after a check of
    every class name, static field, array path, shape and dtype against it.

    **Arguments:**

    - `path`: a ``str`` or ``os.PathLike``, the name the model was saved under.
    - `like`: optional, the skeleton (any model; the file's classes must match its classes).

    **Returns:** the model, with its arrays bit for bit as saved (JAX arrays on the default
    device).

    Raises ``ValueError`` naming the file and the problem: not an elbo_jax save (a pickle, an
    object array, another archive), a malformed config, another elbo_jax version, an
    unknown class, a missing or extra array, an array whose shape or dtype disagrees with the
    config or with ``like``, a class or static field that differs from ``like``'s.

    ```python
    ej.save("coins.npz", res.model)
    model = ej.load("coins.npz", like=ThreeCoins(jnp.zeros(3)))
    ```
    """
    path = os.fspath(path)
    try:
        entries = _read(path)
        config = _parse_config(entries)
        arrays = _check_arrays(entries, config["arrays"])
        model = _decode(config["tree"], "", arrays, like)
        if arrays:
            raise _FileError(f"malformed config: arrays {sorted(arrays)} have no place in the tree")
    except _FileError as error:
        raise ValueError(f"{path}: {error}") from None
    except RecursionError:
        raise ValueError(f"{path}: malformed config: nested too deeply") from None
    return model
