"""Type aliases shared across elbo_jax (jaxtyping, with named dimensions)."""

from typing import Any, TypeAlias

from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

Scalar: TypeAlias = Float[Array, ""]
PerDatum: TypeAlias = Float[Array, " N"]
LogTable: TypeAlias = Float[Array, "N K"]
Data: TypeAlias = Any  # an array (or pytree of arrays) whose leading axis indexes data
Stats: TypeAlias = PyTree
Key: TypeAlias = PRNGKeyArray

__all__ = [
    "Array",
    "Data",
    "Float",
    "Int",
    "Key",
    "LogTable",
    "PerDatum",
    "PyTree",
    "Scalar",
    "Stats",
]
