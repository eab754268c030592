"""Machine ceilings, measured in the same run: matmul FLOP/s and memory bandwidth.

- FLOP/s: a jitted ``a @ b`` of two square ``n x n`` matrices, ``2 n^3`` FLOPs, best of a
  few warm calls, in float32 and float64.
- Bandwidth: a jitted ``jnp.sum`` over a large float32 vector, the bytes read divided by
  the time (a read-only streaming reduction), best of a few warm calls.

Both run on JAX's default device (the one the elbo_jax rows use).
"""

import time

import jax
import jax.numpy as jnp


def _best(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(dtype, n: int, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an ``n x n`` matmul in ``dtype``."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    seconds = _best(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2.0 * n**3 / seconds


def read_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """Best achieved bytes/s of ``jnp.sum`` over ``num_bytes`` of float32."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    seconds = _best(jax.jit(jnp.sum), x, repeats=repeats)
    return x.size * 4 / seconds


def measure(tiny: bool = False) -> dict:
    """The ceilings as a dict (FLOP/s and bytes/s), with the sizes used."""
    gpu = jax.devices()[0].platform != "cpu"
    n = 512 if tiny else (8192 if gpu else 2048)
    num_bytes = (16 if tiny else (2048 if gpu else 512)) * 2**20
    f32 = matmul_flops(jnp.float32, n)
    f64 = matmul_flops(jnp.float64, n) if jax.config.jax_enable_x64 else None
    return {
        "matmul_flops": {"float32": f32, "float64": f64},
        "matmul_n": n,
        "bandwidth_bytes_per_s": read_bandwidth(num_bytes),
        "bandwidth_method": f"jitted jnp.sum over {num_bytes // 2**20} MiB of float32 (bytes read / s)",
    }
