"""Strict test configuration: float64 available, strict dtype promotion, rank promotion raises.

float32 tests build float32 models and data explicitly; float64 is on so that comparisons
with NumPy / SciPy / scikit-learn references can be made at 1e-6 relative or better.
"""

import os
import subprocess
import sys

# Compiling dominates the test run (two thirds of it). The tests' arrays are small, so they
# trade the speed of the generated CPU code for compile time: LLVM optimisation at level 0
# and XLA's older (elemental) emitters for fusions, together 2-2.5x faster compiles of the
# fit programs. XLA's HLO passes are unchanged: the same operations in the same precision
# (two programs may differ in the last bit where by default they agree exactly). The flags
# are tried in a subprocess first (an XLA that does not know one aborts at start-up); the
# test workers, subprocesses and notebook kernels inherit them, and a user's XLA_FLAGS come
# after them and win. Tests marked ``default_compiler`` (such bit-for-bit equalities) run in
# a subprocess without them.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_DEFAULT_COMPILER = "ELBO_JAX_TESTS_DEFAULT_COMPILER"


def _compile_fast() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if _FAST_COMPILE in flags or os.environ.get(_DEFAULT_COMPILER):
        return  # set by the parent process (pytest-xdist's controller), or not wanted
    trial = f"{_FAST_COMPILE} {flags}".strip()
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env={**os.environ, "XLA_FLAGS": trial},
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        os.environ["XLA_FLAGS"] = trial


_compile_fast()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

# A third of Linux's default vm.max_map_count (65,530).
_MAX_MAPS = 20_000


def _memory_maps() -> int | None:
    """The number of memory maps of this process (Linux), else None."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Release the compiled programs after a test module once they hold many memory maps.
    Each XLA CPU executable maps several regions of JIT-compiled code, and a test worker that
    kept the programs of a few hundred tests reached the kernel's limit on memory maps
    (``vm.max_map_count``, 65,530): the next compile aborted the process. Below the threshold
    the programs are kept, so that later modules reuse them (compiling dominates the run);
    where the count cannot be read, they are released after every module."""
    yield
    maps = _memory_maps()
    if maps is None or maps > _MAX_MAPS:
        jax.clear_caches()


# The longest tests (each a notebook, the README, a benchmark's smoke run) start first, so
# that a parallel run (pytest -n) does not end with one worker running one of them alone.
_LONGEST_FIRST = ("tests/test_notebooks.py", "tests/test_readme.py", "tests/test_benchmark")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(_LONGEST_FIRST))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "default_compiler: run with XLA's default compiler flags (in a subprocess when the "
        "run's own flags are set)",
    )


def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A ``default_compiler`` test under the fast-compile flags: run it in a subprocess
    without them (its fixtures, set up here too, are recomputed there)."""
    if pyfuncitem.get_closest_marker("default_compiler") is None:
        return None
    if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        return None
    flags = os.environ["XLA_FLAGS"].replace(_FAST_COMPILE, "").strip()
    env = {**os.environ, "XLA_FLAGS": flags, _DEFAULT_COMPILER: "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
        env=env,
        cwd=pyfuncitem.config.rootpath,
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        pytest.fail(f"under XLA's default flags:\n{child.stdout[-6000:]}{child.stderr[-2000:]}")
    return True
