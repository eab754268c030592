"""How models and fit results print: a model's parameters in their natural (constrained)
form — weights, means, covariances — with dtype and shape, rather than its raw fields."""

import dataclasses
import textwrap
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._validate import is_concrete

_PRINT_OPTIONS = dict(precision=4, threshold=60, edgeitems=3, suppress_small=True)
_LINE = 88  # a value that prints longer than this goes on lines of its own


def array_spec(value: Any) -> str:
    """``f32[3,2]``: the dtype and shape, as equinox prints an array."""
    dtype = np.dtype(value.dtype)
    short = {"f": "f", "i": "i", "u": "u", "b": "bool", "c": "c"}.get(dtype.kind, dtype.name)
    name = short if dtype.kind == "b" else f"{short}{dtype.itemsize * 8}"
    if dtype.name == "bfloat16":
        name = "bf16"
    return f"{name}[{','.join(str(d) for d in value.shape)}]"


def _format_value(name: str, value: Any) -> str:
    if not eqx.is_array(value):
        return f"{name}={value!r}"
    spec = array_spec(value)
    if not is_concrete(value):
        return f"{name}: {spec}"
    text = np.array2string(np.asarray(value), **_PRINT_OPTIONS)
    line = f"{name}: {spec} = {text}"
    if "\n" not in text and len(line) <= _LINE:
        return line
    return f"{name}: {spec} =\n" + textwrap.indent(text, "  ")


def static_fields(module: eqx.Module) -> str:
    """``covariance_type='full', reg_covar=1e-06``: the hyperparameters (static fields)."""
    return ", ".join(
        f"{field.name}={getattr(module, field.name)!r}"
        for field in dataclasses.fields(module)
        if field.metadata.get("static") and not field.name.startswith("_")
    )


def format_model(model: Any, names: tuple[str, ...]) -> str:
    """``Class(hyperparameters)`` and then one entry per name in ``names`` (the model's
    ``display``): its dtype, shape and values (only dtype and shape while traced)."""
    head = f"{type(model).__name__}({static_fields(model)})"
    body = []
    for name in names:
        try:
            value = getattr(model, name)
        except Exception as error:  # noqa: BLE001 - printing must not raise
            body.append(f"{name}: <{type(error).__name__}: {error}>")
            continue
        body.append(_format_value(name, value))
    return "\n".join([head, *(textwrap.indent(entry, "  ") for entry in body)])


def format_scalar(value: Any) -> str:
    if value is None:
        return "None"
    if eqx.is_array(value) and not is_concrete(value):
        return array_spec(value)
    return f"{float(jax.device_get(value)):.6g}"
