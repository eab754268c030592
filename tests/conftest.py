"""Strict test configuration: float64 available, strict dtype promotion, rank promotion raises.

float32 tests build float32 models and data explicitly; float64 is on so that comparisons
with NumPy / SciPy / scikit-learn references can be made at 1e-6 relative or better.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Release every compiled program after each test module. Each XLA CPU executable maps
    several regions of JIT-compiled code, and a test worker that kept the programs of a few
    hundred tests reached the kernel's limit on memory maps (``vm.max_map_count``, 65,530):
    the next compile aborted the process. Tests within a module still share their programs."""
    yield
    jax.clear_caches()
