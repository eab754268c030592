"""elbo_jax benchmarks: ``python -m benchmarks run [--quick] [--only NAME[,NAME]] [--out DIR]``.

See benchmarks/README.md for the workloads, the columns and the latest numbers.
"""
