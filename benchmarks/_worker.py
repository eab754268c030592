"""Run one benchmark task in a fresh process: ``python -m benchmarks._worker '<json task>'``.

The worker imports what the task needs, loads its data (the cached ``.npy`` of the task's
dtype) and the shared start, records ``ru_maxrss`` as the baseline, runs, and reports the
peak resident memory above that baseline. Results go to ``task["result_out"]`` (JSON) and
the final parameters to ``task["params_out"]`` (``.npz``), for scoring in the parent.
"""

import json
import os
import resource
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

from . import _workloads


def _setup(task: dict) -> None:
    """Imports and backend start-up, so that they are in the baseline, not in the peak."""
    jax_contenders = ("elbo_jax", "elbo_jax-generic", "hand-em", "gradients", "init", "dynamax")
    if task["contender"] in jax_contenders:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import optax  # noqa: F401

        import elbo_jax  # noqa: F401

        if task["contender"] == "dynamax":
            import dynamax.hidden_markov_model  # noqa: F401
            import dynamax.linear_gaussian_ssm  # noqa: F401

        jnp.zeros(()).block_until_ready()
    elif task["contender"] == "sklearn":
        import sklearn.mixture  # noqa: F401
    elif task["contender"] == "pomegranate":
        import pomegranate.gmm  # noqa: F401
        import torch  # noqa: F401

        if task.get("family") == "hmm":
            import pomegranate.hmm  # noqa: F401
    elif task["contender"] == "hmmlearn":
        import hmmlearn.hmm  # noqa: F401
    elif task["contender"] == "pykalman":
        import pykalman  # noqa: F401


def execute(task: dict) -> dict:
    """Run ``task`` in this process: ``{"result": ..., "warnings": [...]}`` (params inside)."""

    w = _workloads.WORKLOADS[task["workload"]]
    if task["contender"] == "init":
        x = _workloads.load_data(w, task["n"], "float64")
        out = _workloads.make_init(w, x)
        _workloads.save_init(w, task["n"], out["params"], out["note"])
        return {"result": {"note": out["note"]}, "warnings": []}
    x = _workloads.load_data(w, task["n"], task["dtype"])
    init, _ = _workloads.load_init(w, task["n"])
    return run_loaded(task, x, init)


def run_loaded(task: dict, x: np.ndarray, init: dict) -> dict:
    from . import _contenders

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _contenders.RUNNERS[task["contender"]](task, x, init)
    messages = sorted({f"{c.category.__name__}: {str(c.message)[:300]}" for c in caught})
    return {"result": result, "warnings": messages}


def _limit_memory() -> None:
    """Cap the address space (default 85% of RAM) so that a run which would exhaust the
    machine fails with an allocation error instead of waking the OOM killer."""
    cap = os.environ.get("ELBO_JAX_BENCH_MEMORY_CAP")
    if cap is None:
        try:
            cap = 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return
    cap = int(float(cap))
    if cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_baseline() -> tuple[int, str]:
    """The resident memory the run's peak is measured from, and how.

    On Linux the high-water mark of this process image (``VmHWM``) is reset to the current
    resident size (``clear_refs``), so the peak is the run's own. ``ru_maxrss`` is not usable
    as such in a child: across fork + exec it keeps the parent's high-water mark.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss, "VmHWM after reset to VmRSS at the baseline (Linux /proc)"
    except OSError:
        pass
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM (Linux /proc)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def _peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _save_params(params: dict, path: str) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in params.items()})


def main(argv: list[str]) -> int:
    task = json.loads(argv[0])
    _limit_memory()
    try:
        _setup(task)
        w = _workloads.WORKLOADS[task["workload"]]
        if task["contender"] == "init":
            report = execute(task)
            Path(task["result_out"]).write_text(json.dumps(report))
            return 0
        x = _workloads.load_data(w, task["n"], task["dtype"])
        init, _ = _workloads.load_init(w, task["n"])
        baseline_kib, how = _peak_baseline()
        report = run_loaded(task, x, init)
        report["peak_mib"] = (_peak_kib() - baseline_kib) / 1024
        report["baseline_mib"] = baseline_kib / 1024
        report["peak_method"] = how
    except BaseException as err:  # noqa: BLE001 - report every failure to the parent
        tail = traceback.format_exc().strip().splitlines()[-1]
        report = {"error": f"{type(err).__name__}: {str(err)[:300]}", "trace": tail}
    result = report.get("result", {})
    methods = result.get("methods", {})
    for name, sub in methods.items():
        if "params" in sub:
            _save_params(sub.pop("params"), params_file(task["params_out"], name))
    if "params" in result:
        _save_params(result.pop("params"), params_file(task["params_out"]))
    Path(task["result_out"]).write_text(json.dumps(report))
    return 0


def params_file(base: str, method: str | None = None) -> str:
    """Where the worker leaves the final parameters (of one gradient ``method``)."""
    if method is None:
        return base + ".npz"
    return base + "." + "".join(c if c.isalnum() else "_" for c in method) + ".npz"


def load_params(path: str) -> dict:
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
