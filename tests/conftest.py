"""Strict test configuration: float64 available, strict dtype promotion, rank promotion raises.

float32 tests build float32 models and data explicitly; float64 is on so that comparisons
with NumPy / SciPy / scikit-learn references can be made at 1e-6 relative or better.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
