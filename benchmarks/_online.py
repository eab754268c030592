"""``python -m benchmarks online [--quick]``: online, out-of-core and sharded EM (issue #10,
item 5). Writes ``results_online[_quick].json`` and ``.md`` beside the main benchmark's.

1. **Online.** Batch EM for 10 iterations from the shared start of ``gmm-diag`` and
   ``hmm-gauss`` gives L10, its log-likelihood per datum. Stepwise and inertia EM start from
   the same parameters; after each pass their model is scored on the whole data (float64,
   ``ej.log_evidence``) and the passes to come within 1e-3 per datum of L10 are counted.
2. **Out of core.** A float32 ``.npy`` of 10^7 x 32 rows drawn from gmm-diag's ground truth
   (made once in the cache folder) is fitted by exact EM over ``ej.Stream(memmap)``, in
   memory, and over the same batches already on the device (compute alone), each in its own
   process (peak memory); the file's read bandwidth beside them.
3. **Sharded.** Exact EM on gmm-diag over 1, 2, 4, 8 devices (fake CPU devices: each count
   in its own process, ``jax_num_cpu_devices`` set before the backend starts).

Timing is warm and by difference: seconds per pass (or iteration) = ``(T(max_iters=P) -
T(max_iters=1)) / (P - 1)``, so the start's pass, the result's posterior, checks and dispatch
are left out on both sides of every comparison. The models after pass p come from
``ej.fit(..., max_iters=p)``, identical to resuming one fit pass by pass (``max_iters`` is
not compiled in, so the P fits compile once).
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import _workloads
from ._report import _f, _table

TARGET_GAP = 1e-3  # per datum (per frame for the HMM) below L10
BATCH_ITERS = 10
_VERSIONS = ("elbo_jax", "jax", "jaxlib", "numpy", "equinox")
_GMM_TASK = {"family": "gmm", "covariance_type": "diag", "contender": "elbo_jax"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings(quick: bool, scale: float, devices: str | None = None, smoke: bool = False) -> dict:
    """Sizes of a run. ``quick``: N / 20 (as ``run --quick``), float64 only. ``smoke`` (for
    the test): gmm-diag only, one batch size and kappa, two passes, devices 1 and 2."""
    s = scale / 20 if quick else scale
    ooc_batches = tuple(max(1000, round(b * s)) for b in (250_000, 1_000_000))
    return {
        "mode": "quick" if quick else "full",
        "scale": scale,
        "smoke": smoke,
        "data_scale": s,
        "passes": 2 if smoke else 3,
        "online_workloads": ("gmm-diag",) if smoke else ("gmm-diag", "hmm-gauss"),
        "gmm_dtypes": ("float64",) if quick or smoke else ("float64", "float32"),
        "gmm_batches": (10_000,) if smoke else (10_000, 100_000),
        "hmm_batches": (5, 20),
        "kappas": (0.6,) if smoke else (0.6, 0.9),
        "inertia_kappas": (0.6,),
        "ooc_rows": max(20_000, round(10**7 * s)),
        "ooc_batches": ooc_batches[-1:] if smoke else ooc_batches,
        "ooc_iters": 3,
        "devices": tuple(int(d) for d in (devices or ("1,2" if smoke else "1,2,4,8")).split(",")),
        "sharded_iters": 3 if smoke else (10 if quick else 5),
        "timeout_s": float(os.environ.get("ELBO_JAX_BENCH_TIMEOUT_S", 300 if quick else 600)),
        "repeat_budget_s": 0.0 if smoke else 1.0,  # warm fits repeated within this, best kept
    }


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _fit(model, x, **options):
    """A timed ``ej.fit(..., tol=0)``, synchronised on its result, and the parts of the
    result that are used: ``(model, history)``. The fit's ``q`` (an (N, K) posterior for a
    mixture) is dropped at once, so timing loops hold one at a time, as a user would."""
    import jax

    import elbo_jax as ej

    def call():
        res = jax.block_until_ready(ej.fit(model, x, tol=0.0, **options))
        return _Fitted(res.model, np.asarray(res.history, np.float64))

    return _time(call)


class _Fitted:
    def __init__(self, model, history: np.ndarray):
        self.model, self.history = model, history


def _best(call, budget_s: float = 1.0, most: int = 5):
    """``call()`` (returning ``(result, seconds)``) repeated while the calls take under
    ``budget_s`` in all (at most ``most`` times): the last result and the fastest time. At
    full size one call; at smoke sizes a few, so differences are above the timer's noise."""
    result, best = call()
    spent, count = best, 1
    while spent < budget_s and count < most:
        result, took = call()
        best, spent, count = min(best, took), spent + took, count + 1
    return result, best


def _difference(t1: float, tk: float, k: int) -> float | None:
    """Seconds per pass from warm fits of 1 and ``k`` passes (``None`` below resolution)."""
    per = (tk - t1) / (k - 1)
    return per if per > 0 else None


def _warm_fits(model, x, k: int, budget_s: float = 1.0, **options) -> tuple:
    """A first fit (it compiles), then warm fits of 1 and ``k`` passes (each the best of
    repeats within ``budget_s``): their results and ``{"fit_s", "compile_s", "s_per_pass"}``."""
    _, first = _fit(model, x, max_iters=1, **options)
    res1, t1 = _best(lambda: _fit(model, x, max_iters=1, **options), budget_s)
    resk, tk = _best(lambda: _fit(model, x, max_iters=k, **options), budget_s)
    timing = {
        "fit_s": [first, t1, tk],
        "compile_s": max(first - t1, 0.0),
        "s_per_pass": _difference(t1, tk, k),
    }
    return res1, resk, timing


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _float64(model):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
    )


def _passes_to(curve: list, target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= target), None)


def _time_to_target(row: dict) -> float | None:
    """Passes (iterations) to the target times the warm seconds per pass."""
    passes, per = row.get("passes_to_target"), row.get("s_per_pass")
    return None if passes is None or per is None else passes * per


# --------------------------------------------------------------------------- 1. online
def _online_workload(name: str, cfg: dict) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import elbo_jax as ej

    from . import _contenders, _runner

    w = _workloads.WORKLOADS[name]
    n = w.num_data(cfg["data_scale"])
    init, _ = _runner.ensure_start(w, n, True, cfg["timeout_s"])
    x64 = _workloads.load_data(w, n, "float64")
    seq = w.is_sequences
    per = x64.frames.shape[1] if seq else 1  # log-lik per frame = per sequence / T
    x64j = jnp.asarray(x64.frames if seq else x64)
    task = {"family": w.family, "covariance_type": w.covariance_type, "contender": "elbo_jax"}
    build = _contenders._ej_sequence_model if seq else _contenders._ej_model

    def score(model) -> float:
        return float(ej.log_evidence(_float64(model), x64j)) / per

    sizes = cfg["hmm_batches"] if seq else cfg["gmm_batches"]
    cap = max(1, n // 4)  # at small scales: at least 4 minibatches a pass
    sizes = sorted({min(b, cap) for b in sizes})
    rows = []
    for dtype in ("float64",) if seq else cfg["gmm_dtypes"]:
        data = _workloads.load_data(w, n, dtype)
        x = jnp.asarray(data.frames if seq else data)
        model = build(task, init, np.dtype(dtype))
        common = {"workload": name, "dtype": dtype, "n": n}
        _, res, timing = _warm_fits(model, x, BATCH_ITERS, cfg["repeat_budget_s"])
        l10 = score(res.model)
        history = (np.asarray(res.history, np.float64) / per).tolist()
        batch = dict(
            common,
            method="batch EM",
            batch_size=n,
            kappa=None,
            curve=history,
            loglik=l10,
            l10=l10,
            passes_to_target=_passes_to(history, l10 - TARGET_GAP),
            status="ok",
            **timing,
            note=f"iterations, not passes; curve: the fit's own history (of {BATCH_ITERS})",
        )
        rows.append(batch)
        log(
            f"[online] {name} {dtype} batch EM: L10 {l10:.6f}, {_f(batch['s_per_pass'], '.4g')} s/it"
        )
        grid = [("stepwise", b, k) for b in sizes for k in cfg["kappas"]]
        grid += [("inertia", b, k) for b in sizes for k in cfg["inertia_kappas"]]
        for method, size, kappa in grid:
            row = dict(common, method=method, batch_size=size, kappa=kappa, l10=l10)
            if method == "stepwise":
                m_step = ej.StepwiseMStep(kappa=kappa, tau=2.0)
            else:
                m_step = ej.InertiaMStep(kappa=kappa, tau=2.0)
            options = dict(m_step=m_step, batch_size=size, key=jax.random.key(w.seed))
            try:
                row.update(_online_passes(model, x, options, cfg, score))
            except Exception as err:  # noqa: BLE001 - a failing setting becomes a table row
                row.update(status=f"failed: {type(err).__name__}: {str(err)[:300]}")
                log(f"[online] {name} {dtype} {method} B={size}: {row['status']}")
                rows.append(row)
                continue
            row["passes_to_target"] = _passes_to(row["curve"], l10 - TARGET_GAP)
            row["pass_ratio"] = _ratio(row["s_per_pass"], batch["s_per_pass"])
            rows.append(row)
            log(
                f"[online] {name} {dtype} {method} B={size} kappa={kappa}: "
                f"{[round(v, 5) for v in row['curve']]}, {_f(row['s_per_pass'], '.4g')} s/pass"
            )
        _same_as_stepwise(rows, name, dtype)
    return rows


def _online_passes(model, x, options: dict, cfg: dict, score) -> dict:
    """The model after each of ``cfg["passes"]`` passes scored, and the warm s per pass."""
    passes = cfg["passes"]
    first, last, timing = _warm_fits(model, x, passes, cfg["repeat_budget_s"], **options)
    models = [_fit(model, x, max_iters=p, **options)[0].model for p in range(2, passes)]
    curve = [score(m) for m in [first.model, *models, last.model]]
    return {
        "curve": curve,
        "pass_estimates": np.asarray(last.history, np.float64).tolist(),
        "loglik": curve[-1],
        "status": "ok",
        **timing,
    }


def _same_as_stepwise(rows: list, name: str, dtype: str) -> None:
    """Note where inertia EM's curve equals stepwise EM's of the same batch size and kappa
    (their updates coincide when ``maximize`` matches moments and eta is the default)."""
    ok = [r for r in rows if r["workload"] == name and r["dtype"] == dtype and "curve" in r]
    for r in ok:
        if r["method"] != "inertia":
            continue
        for s in ok:
            if s["method"] == "stepwise" and (s["batch_size"], s["kappa"]) == (
                r["batch_size"],
                r["kappa"],
            ):
                diff = max(abs(a - b) for a, b in zip(r["curve"], s["curve"], strict=True))
                r["max_diff_to_stepwise"] = diff
                r["note"] = f"max |log-lik - stepwise's| over the passes: {diff:.1e}"


# --------------------------------------------------------------------------- 2. out of core
def ooc_path(rows: int) -> Path:
    return _workloads.cache_dir() / f"gmm-diag-ooc-n{rows}-v{_workloads.DATA_VERSION}-float32.npy"


def make_ooc_data(rows: int, chunk: int = 1_000_000) -> tuple[Path, float]:
    """The float32 ``.npy`` of ``rows`` x 32 draws from gmm-diag's ground truth (written in
    chunks to a temporary name, then renamed; reused when present) and the seconds it took."""
    path = ooc_path(rows)
    if path.exists():
        return path, 0.0
    w = _workloads.WORKLOADS["gmm-diag"]
    t = time.perf_counter()
    weights, means, covs = _workloads._random_gmm(np.random.default_rng(w.seed), w)
    scales = np.sqrt(covs)
    rng = np.random.default_rng(w.seed + 10_000)
    tmp = path.with_name(path.stem + ".partial.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, w.d))
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        z = rng.choice(w.k, size=m, p=weights)
        out[start : start + m] = means[z] + scales[z] * rng.standard_normal((m, w.d))
    out.flush()
    del out
    os.replace(tmp, path)
    return path, time.perf_counter() - t


def read_bandwidth(path: Path, batch: int) -> dict:
    """Bytes/s of reading the file in batches of rows with ``np.array(memmap[a:b])``: once
    after ``posix_fadvise(DONTNEED)`` (which drops the file's clean cached pages, if the
    kernel honours it: "cold"), then twice more from the page cache ("warm", the best)."""

    def read() -> float:
        mm = np.load(path, mmap_mode="r")
        t = time.perf_counter()
        total = 0
        for a in range(0, mm.shape[0], batch):
            total += np.array(mm[a : a + batch]).nbytes
        return total / (time.perf_counter() - t)

    dropped = False
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped = True
        except OSError:
            pass
        finally:
            os.close(fd)
    cold = read()
    warm = max(read(), read())
    return {"cold_bytes_per_s": cold if dropped else None, "warm_bytes_per_s": warm}


class _MemorySampler:
    """Peak ``RssAnon`` (anonymous memory: what the process allocated, not the file pages a
    memmap maps) sampled every 10 ms from ``/proc/self/status``."""

    def __init__(self):
        self.peak_kib = self.base_kib = _status_kib("RssAnon") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon") or 0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon") or 0)


def _status_kib(field: str) -> int | None:
    from ._worker import _status_kib as status

    return status(field)


def _ooc_task(task: dict) -> dict:
    """One out-of-core row, in a worker process: exact EM over ``task["source"]``
    ("memory", "memmap" or "device"), timed warm by difference, with peak memory."""
    import jax
    import jax.numpy as jnp

    import elbo_jax as ej

    from . import _contenders
    from ._worker import _peak_baseline, _peak_kib

    path, batch, source = Path(task["path"]), task["batch_size"], task["source"]
    init = {k: np.asarray(v) for k, v in task["init"].items()}
    model = _contenders._ej_model(_GMM_TASK, init, np.float32)
    jnp.zeros(()).block_until_ready()
    base_kib, how = _peak_baseline()
    with _MemorySampler() as anon:
        if source == "memory":
            x = jnp.asarray(np.array(np.load(path, mmap_mode="r")[: task["rows"]]))
        elif source == "memmap":
            x = ej.Stream(np.load(path, mmap_mode="r"), batch_size=batch, prefetch=task["prefetch"])
        else:  # the same batches, already on the device: compute alone
            mm = np.load(path, mmap_mode="r")
            batches = [jnp.asarray(mm[a : a + batch]) for a in range(0, mm.shape[0], batch)]
            x = ej.Stream(lambda: batches, prefetch=0)
        _, res, timing = _warm_fits(model, x, task["iters"], task["budget_s"])
    per = timing["s_per_pass"]
    return {
        **timing,
        "rows_per_s": None if per is None else task["rows"] / per,
        "history": np.asarray(res.history, np.float64).tolist(),
        "loglik": float(res.history[-1]),
        "params": {k: np.asarray(v).tolist() for k, v in _contenders._ej_params(res.model).items()},
        "peak_mib": (_peak_kib() - base_kib) / 1024,
        "peak_method": how,
        "peak_anon_mib": (anon.peak_kib - anon.base_kib) / 1024,
        "jax_devices": len(jax.devices()),
    }


def _sharded_task(task: dict) -> dict:
    """Exact EM on gmm-diag over ``task["devices"]`` devices (set before JAX starts)."""
    import jax

    jax.config.update("jax_num_cpu_devices", task["devices"])
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from . import _contenders

    w = _workloads.WORKLOADS["gmm-diag"]
    x = jnp.asarray(_workloads.load_data(w, task["n"], task["dtype"]))
    init, _ = _workloads.load_init(w, task["n"])
    model = _contenders._ej_model(_GMM_TASK, init, np.dtype(task["dtype"]))
    devices = jax.devices()[: task["devices"]]
    if len(devices) != task["devices"]:
        raise RuntimeError(f"asked for {task['devices']} devices, JAX has {len(jax.devices())}")
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    options = {"sharding": NamedSharding(mesh, PartitionSpec("data"))}
    if task["devices"] == 1:
        options = {}  # the plain fit, the reference
    _, res, timing = _warm_fits(model, x, task["iters"], task["budget_s"], **options)
    return {
        "s_per_iter": timing.pop("s_per_pass"),
        **timing,
        "history": np.asarray(res.history, np.float64).tolist(),
        "loglik": float(res.history[-1]),
        "platform": devices[0].platform,
    }


def _spawn(task: dict, timeout_s: float, env_extra: dict | None = None) -> dict:
    """Run ``task`` in ``python -m benchmarks._online`` and return its report."""
    from . import _device

    with tempfile.TemporaryDirectory(prefix="elbo_jax_online_") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, **(env_extra or {}))
        env["PYTHONPATH"] = os.pathsep.join([str(_device.ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks._online", json.dumps(task), str(out)],
                cwd=_device.ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"status": f"failed: timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            return {"status": f"failed: exit status {proc.returncode}; {tail}"[:500]}
        return json.loads(out.read_text())


def _worker_main(argv: list[str]) -> int:
    task, out = json.loads(argv[0]), Path(argv[1])
    from ._worker import _limit_memory

    _limit_memory()
    try:
        if task["kind"] == "sharded":
            report = _sharded_task(task)
        else:
            import jax

            jax.config.update("jax_enable_x64", True)  # float32 models are built explicitly
            report = _ooc_task(task)
        report["status"] = "ok"
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
        report = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
    out.write_text(json.dumps(report))
    return 0


def out_of_core(cfg: dict, in_process: bool) -> dict:
    from . import _runner

    w = _workloads.WORKLOADS["gmm-diag"]
    init, _ = _runner.ensure_start(w, w.num_data(cfg["data_scale"]), True, cfg["timeout_s"])
    rows = cfg["ooc_rows"]
    path, made_s = make_ooc_data(rows)
    log(f"[out-of-core] {path} ({path.stat().st_size / 1e9:.2f} GB; made in {made_s:.0f} s)")
    large = max(cfg["ooc_batches"])
    memory_rows, available = _rows_in_memory(rows, path.stat().st_size)
    runs = [("memory", memory_rows, 0)]
    for b in cfg["ooc_batches"]:
        runs += [("memmap", b, 2), ("device", b, 0)]
    if not cfg["smoke"]:
        runs.append(("memmap", large, 0))  # what prefetching hides
    results = []
    for source, batch, prefetch in runs:
        task = {
            "kind": "ooc",
            "source": source,
            "path": str(path),
            "rows": memory_rows if source == "memory" else rows,
            "batch_size": batch,
            "prefetch": prefetch,
            "iters": cfg["ooc_iters"],
            "budget_s": cfg["repeat_budget_s"],
            "init": {k: v.tolist() for k, v in init.items()},
        }
        if in_process:
            try:
                report = dict(_ooc_task(task), status="ok")
            except Exception as err:  # noqa: BLE001 - a failing row becomes a table row
                report = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
            report["peak_mib"] = report["peak_anon_mib"] = None  # one process: not its own
        else:
            report = _spawn(task, cfg["timeout_s"])
        row = {"source": source, "rows": task["rows"], "batch_size": batch, "prefetch": prefetch}
        row.update(report)
        results.append(row)
        speed = _f(row.get("s_per_pass"), ".4g")
        log(f"[out-of-core] {source} B={batch} prefetch={prefetch}: {speed} s/pass {row['status']}")
    reference = _compare_ooc(results)
    bandwidth = read_bandwidth(path, large)
    return {
        "path": str(path),
        "rows": rows,
        "memory_rows": memory_rows,
        "reference": reference,
        "mem_available_bytes": available,
        "bytes": path.stat().st_size,
        "made_s": made_s,
        "rows_table": results,
        "read": bandwidth,
    }


def _rows_in_memory(rows: int, nbytes: int) -> tuple[int, int | None]:
    """Rows of the in-memory fit: all of them when its peak (measured: about 6.5 times the
    data's bytes, mostly the (N, K) posterior ``fit`` returns, plus 1 GB to spare) fits in
    75% of ``MemAvailable``; else a tenth, a hundredth, ... (then compared per row)."""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(v.split()[1]) * 1024 for v in meminfo if v.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError, IndexError):
        return rows, None
    m = rows
    while m > 20_000 and 6.5 * nbytes * m / rows + 1e9 > 0.75 * available:
        m //= 10
    return m, available


def _compare_ooc(results: list) -> str:
    """Each row against the in-memory fit (speed per row; log-lik and parameters when it
    fitted all the rows, else against the on-device batches of the largest size) and each
    memmap row against compute alone (the same batches on the device)."""
    ok = [r for r in results if r["status"] == "ok"]
    mem = next((r for r in ok if r["source"] == "memory"), None)
    full = max(r["rows"] for r in results)
    same = mem if mem is not None and mem["rows"] == full else None
    reference = "in-memory EM"
    devices = [r for r in ok if r["source"] == "device"]
    if same is None and devices:  # then the on-device batches of the largest size
        same = max(devices, key=lambda r: r["batch_size"])
        reference = f"EM over the on-device batches of {same['batch_size']:,} rows"
    for r in ok:
        if mem is not None:
            r["speed_vs_memory"] = _ratio(r["rows_per_s"], mem["rows_per_s"])
        if same is not None and r["rows"] == same["rows"]:
            r["loglik_rel_diff"] = abs(r["loglik"] - same["loglik"]) / abs(same["loglik"])
            r["max_param_diff"] = max(
                float(np.max(np.abs(np.asarray(r["params"][k]) - np.asarray(same["params"][k]))))
                for k in same["params"]
            )
        alone = next(
            (d for d in ok if d["source"] == "device" and d["batch_size"] == r["batch_size"]),
            None,
        )
        if r["source"] == "memmap" and alone is not None:
            r["vs_compute_alone"] = _ratio(r["s_per_pass"], alone["s_per_pass"])
    for r in results:
        r.pop("params", None)
    return reference


# --------------------------------------------------------------------------- 3. sharded
def sharded(cfg: dict) -> list[dict]:
    from . import _runner

    w = _workloads.WORKLOADS["gmm-diag"]
    n = w.num_data(cfg["data_scale"])
    _runner.ensure_start(w, n, True, cfg["timeout_s"])
    rows = []
    for d in cfg["devices"]:
        task = {"kind": "sharded", "devices": d, "n": n, "dtype": "float32"}
        task.update(iters=cfg["sharded_iters"], budget_s=cfg["repeat_budget_s"])
        report = _spawn(task, cfg["timeout_s"], {"JAX_PLATFORMS": "cpu"})
        rows.append({"devices": d, "n": n, "dtype": "float32", **report})
        log(
            f"[sharded] {d} device(s): {_f(report.get('s_per_iter'), '.4g')} s/it {report['status']}"
        )
    one = next((r for r in rows if r["devices"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        if one is not None and r["status"] == "ok":
            r["vs_one_device"] = _ratio(r["s_per_iter"], one["s_per_iter"])
            r["loglik_rel_diff"] = abs(r["loglik"] - one["loglik"]) / abs(one["loglik"])
    return rows


# --------------------------------------------------------------------------- targets, report
def targets(results: dict) -> list[dict]:
    out = []
    for dtype in results["settings"]["gmm_dtypes"]:
        rows = [
            r
            for r in results["online"]
            if r["workload"] == "gmm-diag" and r["dtype"] == dtype and r["method"] == "stepwise"
        ]
        reached = [r["passes_to_target"] for r in rows if r.get("passes_to_target")]
        best = min(reached) if reached else None
        out.append(
            {
                "target": f"gmm-diag {dtype}: fewest stepwise-EM passes to within "
                f"{TARGET_GAP:g} per datum of batch EM's L10 (any batch size, kappa)",
                "goal": "<= 2",
                "value": best,
                "fmt": "d",
                "met": None if not rows else (best is not None and best <= 2),
            }
        )
    ooc = results["out_of_core"]["rows_table"]
    for r in ooc:
        if r["source"] == "memmap" and r["prefetch"] > 0:
            b = f"{r['batch_size']:,}"
            speed, hide = r.get("speed_vs_memory"), r.get("vs_compute_alone")
            out += [
                {
                    "target": f"streamed (memmap, batch {b}) rows/s ÷ in-memory rows/s",
                    "goal": ">= 0.5",
                    "value": speed,
                    "met": None if speed is None else speed >= 0.5,
                },
                {
                    "target": f"streamed pass (batch {b}, prefetch 2) ÷ compute alone "
                    "(the same batches on the device)",
                    "goal": "<= 1.2",
                    "value": hide,
                    "met": None if hide is None else hide <= 1.2,
                },
            ]
    diffs = [r["loglik_rel_diff"] for r in ooc if r.get("loglik_rel_diff") is not None]
    worst = max(diffs) if diffs else None
    out.append(
        {
            "target": "streamed EM: final log-lik, abs. relative difference to "
            f"{results['out_of_core']['reference']} (worst row)",
            "goal": "<= 1e-6",
            "value": worst,
            "fmt": ".1e",
            "met": None if worst is None else worst <= 1e-6,
        }
    )
    return out


def _curve(values) -> str:
    return ", ".join(f"{v:.5f}" for v in values)


def online_md(rows: list) -> str:
    table = []
    for r in rows:
        ok = r["status"] == "ok"
        passes = (
            "—"
            if not ok
            else ("not reached" if r["passes_to_target"] is None else r["passes_to_target"])
        )
        table.append(
            [
                r["workload"],
                r["dtype"],
                r["method"],
                "all" if r["method"] == "batch EM" else f"{r['batch_size']:,}",
                _f(r["kappa"], ".1f"),
                _curve(r["curve"][:3]) + (" …" if len(r.get("curve", [])) > 3 else "")
                if ok
                else "—",
                _f(r.get("loglik"), ".6f"),
                _f(r.get("loglik") - r["l10"] if ok else None, "+.1e"),
                passes,
                _f(r.get("s_per_pass"), ".4g"),
                _f(r.get("pass_ratio"), ".2f"),
                _f(_time_to_target(r), ".3g"),
                _f(r.get("compile_s"), ".2f"),
                "" if ok and not r.get("note") else (r.get("note") or r["status"]),
            ]
        )
    return _table(
        [
            "workload",
            "dtype",
            "method",
            "batch",
            "κ",
            "log-lik/datum after passes 1, 2, …",
            "final log-lik/datum",
            "− L10",
            "passes to L10 − 1e-3",
            "s/pass",
            "÷ batch EM s/it",
            "s to target",
            "compile s",
            "notes",
        ],
        table,
    )


def ooc_md(ooc: dict) -> str:
    table = []
    for r in ooc["rows_table"]:
        what = {
            "memory": "in memory (jnp.asarray of the whole file)"
            if r["rows"] == ooc["rows"]
            else f"in memory, the first {r['rows']:,} rows (all would not fit)",
            "memmap": "ej.Stream(np.load(path, mmap_mode='r'))",
            "device": "ej.Stream(batches already on the device): compute alone",
        }[r["source"]]
        table.append(
            [
                what,
                "all" if r["source"] == "memory" else f"{r['batch_size']:,}",
                "—" if r["source"] == "memory" else r["prefetch"],
                _f(r.get("s_per_pass"), ".4g"),
                _f(None if r.get("rows_per_s") is None else r["rows_per_s"] / 1e6, ".2f"),
                _f(r.get("speed_vs_memory"), ".2f"),
                _f(r.get("vs_compute_alone"), ".2f"),
                _f(r.get("peak_mib"), ".0f"),
                _f(r.get("peak_anon_mib"), ".0f"),
                _f(r.get("loglik"), ".6f"),
                _f(r.get("loglik_rel_diff"), ".1e"),
                "" if r["status"] == "ok" else r["status"],
            ]
        )
    read = ooc["read"]
    cold = read["cold_bytes_per_s"]
    lines = [
        _table(
            [
                "source",
                "batch rows",
                "prefetch",
                "s/pass",
                "M rows/s",
                "÷ in memory (speed)",
                "÷ compute alone (time)",
                "peak RSS MiB",
                "peak anon. MiB",
                "log-lik/datum",
                "rel. diff to reference",
                "notes",
            ],
            table,
        ),
        "",
        f"Reference for the log-likelihoods: {ooc['reference']}, same start, same data. "
        f"File: {ooc['rows']:,} x 32 float32, {ooc['bytes'] / 1e9:.2f} GB. Read with "
        f"`np.array(memmap[a:b])` in batches: {_f(None if cold is None else cold / 1e9, '.2f')}"
        " GB/s after `posix_fadvise(DONTNEED)` on the file (page cache dropped if the kernel "
        f"honoured it), {read['warm_bytes_per_s'] / 1e9:.2f} GB/s from the page cache (the "
        "fits above read a warm page cache).",
    ]
    return "\n".join(lines)


def sharded_md(rows: list) -> str:
    table = [
        [
            r["devices"],
            f"{r['n']:,}",
            r["dtype"],
            _f(r.get("s_per_iter"), ".4g"),
            _f(r.get("vs_one_device"), ".2f"),
            _f(r.get("compile_s"), ".2f"),
            _f(r.get("loglik"), ".6f"),
            _f(r.get("loglik_rel_diff"), ".1e"),
            "" if r["status"] == "ok" else r["status"],
        ]
        for r in rows
    ]
    return _table(
        [
            "devices",
            "N",
            "dtype",
            "s/it",
            "÷ 1 device",
            "compile s",
            "log-lik/datum",
            "rel. diff to 1 device",
            "notes",
        ],
        table,
    )


def header_md(results: dict) -> str:
    dev = results["device"]
    versions = ", ".join(f"{k} {v}" for k, v in dev["versions"].items() if v and k in _VERSIONS)
    cfg = results["settings"]
    return "\n".join(
        [
            f"Run: `online {cfg['mode']}` (scale {cfg['scale']}), {dev['date_utc']}, commit "
            f"`{dev['git_commit']}`, total wall time {results['wall_s']:.0f} s.",
            f"Machine: {dev['cpu_model']}, {dev['cpu_count']} cores; JAX device "
            f"`{dev['jax_device']}` (platform {dev['platform']}).",
            f"Versions: {versions}.",
            f"Load average (1, 5, 15 min) at the start {results['load_average_start']}, "
            f"at the end {results['load_average_end']}.",
        ]
    )


def markdown(results: dict) -> str:
    from ._report import targets_md

    cfg = results["settings"]
    parts = [
        header_md(results),
        "**Targets**\n\n" + targets_md(results),
        f"**Online EM against batch EM** (same start; log-lik per datum, per frame for "
        f"hmm-gauss, of the whole data in float64 after each pass; L10 = batch EM's after "
        f"{BATCH_ITERS} iterations; s/pass warm, by difference)\n\n" + online_md(results["online"]),
        f"**Out-of-core exact EM** (gmm-diag's ground truth, K=64 diagonal, float32, "
        f"{cfg['ooc_iters']} iterations from the shared start; "
        + ("all rows in one process" if cfg.get("in_process") else "each row in its own process")
        + ")\n\n"
        + ooc_md(results["out_of_core"]),
        "**Sharded exact EM** (gmm-diag, float32; fake CPU devices share this machine's "
        f"{results['device']['cpu_count']} cores: this measures the overhead of sharding, "
        "not a speedup from more hardware)\n\n" + sharded_md(results["sharded"]),
    ]
    return "\n\n".join(parts) + "\n"


def run(
    *,
    quick: bool,
    scale: float,
    out_dir: Path,
    devices: str | None = None,
    in_process: bool = False,
    smoke: bool = False,
) -> dict:
    """The whole run; writes the JSON and markdown and returns the results."""
    from . import _device, _report

    t0 = time.perf_counter()
    cfg = dict(settings(quick, scale, devices, smoke), in_process=in_process)
    info = _device.device_info()
    info["versions"] = {k: v for k, v in info["versions"].items() if k in _VERSIONS}
    results = {"settings": cfg, "device": info, "load_average_start": _device.load_average()}
    sections = results["section_s"] = {}
    for name in cfg["online_workloads"]:
        t = time.perf_counter()
        results.setdefault("online", []).extend(_online_workload(name, cfg))
        sections[f"online {name}"] = time.perf_counter() - t
    t = time.perf_counter()
    results["out_of_core"] = out_of_core(cfg, in_process)
    sections["out of core"] = time.perf_counter() - t
    t = time.perf_counter()
    results["sharded"] = sharded(cfg)
    sections["sharded"] = time.perf_counter() - t
    results["targets"] = targets(results)
    results["load_average_end"] = _device.load_average()
    results["wall_s"] = time.perf_counter() - t0
    mode = "quick" if quick else "full"
    paths = _report.write_named("online", results, markdown(results), out_dir, mode)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
