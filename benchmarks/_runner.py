"""Orchestration: data and start, one worker per (workload, contender, dtype), scoring,
derived columns (ratios, relative differences, ceilings fractions) and the targets."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _ceilings, _derive, _device, _score, _worker, _workloads
from ._contenders import GRADIENT_METHODS

ROOT = _device.ROOT
JAX_CONTENDERS = ("elbo_jax", "elbo_jax-generic", "hand-em")
CONTENDERS = {
    "gmm": ("elbo_jax", "sklearn", "pomegranate"),
    "bernoulli": ("elbo_jax", "pomegranate"),
    "poisson": ("elbo_jax", "elbo_jax-generic", "hand-em", "pomegranate"),
    "hmm": ("elbo_jax", "hmmlearn", "dynamax", "pomegranate"),
    "lgssm": ("elbo_jax", "dynamax", "pykalman"),
}


def contenders_for(w, dtype: str) -> tuple[str, ...]:
    """Who runs on workload ``w`` in ``dtype``: the workload's own list, else its family's."""
    own = dict(w.contenders)
    return own.get(dtype, CONTENDERS[w.family]) if own else CONTENDERS[w.family]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tasks
def _settings(quick: bool) -> dict:
    env = os.environ.get
    return {
        "max_repeats": 3,
        # Each timed contender runs this many times, the contenders of a workload and dtype
        # interleaved (A B C A B C): on a machine whose speed drifts, each contender's best
        # comes from a comparable state. A round is repeated only if it took at most
        # round_budget_s.
        "rounds": int(env("ELBO_JAX_BENCH_ROUNDS", 1 if quick else 2)),
        "round_budget_s": 60.0,
        "peer_repeats": 1 if quick else 2,
        "cheap_s": float(env("ELBO_JAX_BENCH_CHEAP_S", 10 if quick else 30)),
        "peer_cheap_s": 10.0,
        "peer_budget_s": float(env("ELBO_JAX_BENCH_PEER_BUDGET_S", 15 if quick else 150)),
        "timeout_s": float(env("ELBO_JAX_BENCH_TIMEOUT_S", 300 if quick else 600)),
    }


def _describe_exit(rc: int) -> str:
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with status {rc}"


def run_task(task: dict, in_process: bool, timeout_s: float) -> dict:
    """Run one task in a worker process (or here) and return its report, params loaded."""
    if in_process:
        try:
            report = _worker.execute(task)
        except Exception as err:  # noqa: BLE001 - a failing contender becomes a table row
            return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        report["peak_mib"] = None
        return report
    with tempfile.TemporaryDirectory(prefix="elbo_jax_bench_") as tmp:
        task = dict(task, result_out=f"{tmp}/result.json", params_out=f"{tmp}/params")
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see README: torch on a busy machine
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks._worker", json.dumps(task)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        path = Path(task["result_out"])
        if proc.returncode != 0 or not path.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            return {"error": f"{_describe_exit(proc.returncode)}; {tail}"[:500]}
        report = json.loads(path.read_text())
        result = report.get("result", {})
        if Path(_worker.params_file(task["params_out"])).exists():
            result["params"] = _worker.load_params(_worker.params_file(task["params_out"]))
        for name, sub in result.get("methods", {}).items():
            p = _worker.params_file(task["params_out"], name)
            if Path(p).exists():
                sub["params"] = _worker.load_params(p)
        return report


def ensure_start(w, n: int, in_process: bool, timeout_s: float) -> tuple[dict, str]:
    """The shared start, made once and cached next to the data."""
    x = _workloads.prepare_data(w, n)
    try:
        return _workloads.load_init(w, n)
    except FileNotFoundError:
        pass
    if w.family == "lgssm":
        note = "deterministic start (m0 = 0, P0 = I, F = 0.9 I, Q = 0.1 I, H seeded Gaussian, R = 0.5 diag(var y))"
        _workloads.save_init(w, n, _workloads.lgssm_init(w, x), note)
    elif w.family not in ("gmm", "hmm"):
        _workloads.save_init(w, n, _workloads.simple_init(w, x), "simple deterministic start")
    else:
        log(f"[{w.name}] computing the shared start (cached afterwards)")
        report = run_task(
            {"workload": w.name, "n": n, "contender": "init", "dtype": "float64"},
            in_process,
            timeout_s,
        )
        if "error" in report:
            raise RuntimeError(f"[{w.name}] could not make the start: {report['error']}")
    return _workloads.load_init(w, n)


# --------------------------------------------------------------------------- one workload
def _row(w, n, contender, dtype, iters, report, x, settings) -> dict:
    row = {
        "workload": w.name,
        "contender": contender,
        "dtype": dtype,
        "iters_requested": iters,
        "iters": None,
        "status": None,
        "first_s": None,
        "warm_s": None,
        "compile_s": None,
        "s_per_iter": None,
        "peak_mib": None,
        "device_peak_mib": None,
        "loglik": None,
        "rel_diff": None,
        "ratio": None,
        "note": None,
        "warnings": report.get("warnings", []),
        "compute_dtype": None,
        "history": None,
        "comparable": True,
        "extra": None,
    }
    if "error" in report:
        row["status"] = f"failed: {report['error']}"
        return row
    res = report["result"]
    row.update(
        iters=res["iters"],
        status=res["status"],
        first_s=res.get("first_s"),
        warm_s=res["warm_s"],
        peak_mib=report.get("peak_mib"),
        note=res.get("note"),
        device_peak_mib=res.get("device_peak_mib"),
        compute_dtype=res.get("compute_dtype"),
        history=res.get("history"),
        comparable=res.get("comparable", True),
        extra=res.get("extra"),
    )
    best = min(res["warm_s"])
    row["s_per_iter"] = best / res["iters"]
    if row["first_s"] is not None:
        row["compile_s"] = max(row["first_s"] - best, 0.0)
    if res.get("params") is not None:
        row["loglik"] = _score.score(w.family, x, res["params"], w.covariance_type)
    frames = x.num_frames if isinstance(x, _workloads.SeqData) else None
    flops, bytes_, _ = _derive.work_per_iter(w, n, dtype, frames)
    row["flops_per_iter"], row["bytes_per_iter"] = flops, bytes_
    return row


def _merge_rounds(reports: list) -> dict:
    """One report from a contender's rounds: the round with the best warm time (its
    parameters, history and notes), with every round's warm times, the smallest first-call
    overhead (first call minus best warm call) of any round, and the largest peak memory."""
    good = [r for r in reports if "error" not in r]
    if not good:
        return reports[0]
    best = min(good, key=lambda r: min(r["result"]["warm_s"]))
    merged = dict(best, result=dict(best["result"]))
    res = merged["result"]
    res["warm_s"] = [t for r in good for t in r["result"]["warm_s"]]
    overheads = [
        r["result"]["first_s"] - min(r["result"]["warm_s"])
        for r in good
        if r["result"].get("first_s") is not None
    ]
    if overheads:
        res["first_s"] = min(res["warm_s"]) + min(overheads)
    peaks = [r.get("peak_mib") for r in good if r.get("peak_mib") is not None]
    merged["peak_mib"] = max(peaks) if peaks else None
    merged["rounds"] = len(good)
    return merged


def run_workload(
    w, *, quick, scale, in_process, settings, available, methods
) -> tuple[list, list, dict]:
    n = w.num_data(scale / 20 if quick else scale)
    iters = w.num_iters(quick)
    init, init_note = ensure_start(w, n, in_process, settings["timeout_s"])
    x64 = _workloads.load_data(w, n, "float64")  # for scoring, in float64
    rows = []
    for dtype in w.dtypes:
        reports: dict[str, list] = {}
        contenders = contenders_for(w, dtype)
        again = set(contenders)
        for round_ in range(max(1, settings["rounds"])):
            for contender in contenders:
                if contender not in again:
                    continue
                task = {
                    "workload": w.name,
                    "n": n,
                    "contender": contender,
                    "dtype": dtype,
                    "family": w.family,
                    "covariance_type": w.covariance_type,
                    "iters": iters,
                    **settings,
                }
                why_not = available.get(contender) or available.get(f"{contender}@{w.family}")
                if why_not:
                    report, took = {"error": f"skipped: {why_not}"}, 0.0
                else:
                    t = time.perf_counter()
                    report = run_task(task, in_process, settings["timeout_s"])
                    took = time.perf_counter() - t
                    log(
                        f"[{w.name} {dtype} {contender} round {round_ + 1}] {took:.1f} s"
                        + (f" -- {report['error']}" if "error" in report else "")
                    )
                reports.setdefault(contender, []).append(report)
                if why_not or "error" in report or took > settings["round_budget_s"]:
                    again.discard(contender)
        for contender in contenders:
            report = _merge_rounds(reports[contender])
            rows.append(_row(w, n, contender, dtype, iters, report, x64, settings))
    grad_rows = []
    methods = [m for m in methods if m in w.grad_methods]
    grad_iters = w.num_grad_iters(quick)
    if methods:
        task = {
            "workload": w.name,
            "n": n,
            "contender": "gradients",
            "dtype": w.grad_dtype,
            "family": w.family,
            "covariance_type": w.covariance_type,
            "iters": grad_iters,
            "methods": list(methods),
            **settings,
        }
        t = time.perf_counter()
        report = run_task(task, in_process, settings["timeout_s"])
        log(
            f"[{w.name} {w.grad_dtype} gradient M-steps] {time.perf_counter() - t:.1f} s"
            + (f" -- {report['error']}" if "error" in report else "")
        )
        exact = [r for r in rows if r["dtype"] == w.grad_dtype and r["contender"] in JAX_CONTENDERS]
        grad_rows = _derive.gradient_rows(w, grad_iters, report, exact, x64)
    info = {
        "name": w.name,
        "description": w.description,
        "family": w.family,
        "n": n,
        "d": w.d,
        "k": w.k,
        "iters": iters,
        "covariance_type": w.covariance_type,
        "dtypes": list(w.dtypes),
        "gradient_dtype": w.grad_dtype,
        "gradient_methods": list(w.grad_methods),
        "gradient_iters": grad_iters,
        "start": init_note,
        "work_formula": _derive.work_per_iter(w, n, "float64")[2],
        "contenders": {dtype: list(contenders_for(w, dtype)) for dtype in w.dtypes},
    }
    if isinstance(x64, _workloads.SeqData):
        info.update(
            num_sequences=x64.num_sequences,
            num_frames=x64.num_frames,
            seq_lengths=[int(x64.lengths.min()), int(x64.lengths.max())],
        )
    return rows, grad_rows, info


# --------------------------------------------------------------------------- the run
def run(*, names, quick, scale, in_process, methods=None) -> dict:
    import jax

    start = time.perf_counter()
    settings = _settings(quick)
    workloads = [_workloads.WORKLOADS[name] for name in names]
    needed = {c for w in workloads for dtype in w.dtypes for c in contenders_for(w, dtype)}
    available = _device.peers_available(needed, {w.family for w in workloads})
    methods = list(GRADIENT_METHODS) if methods is None else methods
    results = {
        "schema": 1,
        "mode": "quick" if quick else "full",
        "scale": scale,
        "in_process": in_process,
        "device": _device.device_info(),
        "elbo_jax_device_note": (
            f"elbo_jax, hand-written EM and dynamax rows run on {jax.devices()[0].platform}; "
            "scikit-learn, pomegranate, hmmlearn and pykalman run on the CPU"
        ),
        "settings": settings,
        "peers": available,
        "load_average_start": _device.load_average(),
    }
    busy = results["load_average_start"]
    if busy and busy[0] > 0.5 * (os.cpu_count() or 1):
        log(
            f"warning: the machine is busy (load average {busy}); multi-threaded peers "
            "(OpenBLAS in scikit-learn, torch) can then be many times slower than on a quiet one"
        )
    log(
        f"device: {results['device']['jax_device']} ({results['device']['cpu_model']}, "
        f"{results['device']['cpu_count']} cores); {results['elbo_jax_device_note']}"
    )
    results["ceilings"] = _ceilings.measure(tiny=scale < 0.05)
    rows, grad_rows, infos = [], [], {}
    for name in names:
        w = _workloads.WORKLOADS[name]
        r, g, info = run_workload(
            w,
            quick=quick,
            scale=scale,
            in_process=in_process,
            settings=settings,
            available=available,
            methods=methods,
        )
        rows += r
        grad_rows += g
        infos[name] = info
    _derive.derive(rows, results["ceilings"])
    results.update(workloads=infos, rows=rows, gradient=grad_rows, targets=_derive.targets(rows))
    results["load_average_end"] = _device.load_average()
    results["wall_s"] = time.perf_counter() - start
    return results
