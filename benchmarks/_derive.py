"""Derived columns: work per iteration, ratios, relative differences, fractions of the
machine ceilings, the exact-vs-gradient summary and the library's targets."""

import numpy as np

from . import _score, _workloads

TARGET_GAP = 1e-4  # "within 1e-4 per datum of the best log-likelihood"


def work_per_iter(
    w: _workloads.Workload, n: int, dtype: str, frames: int | None = None
) -> tuple[float, float, str]:
    """FLOPs and bytes of one EM iteration (the GEMM work an ideal implementation does, and
    one pass over the data in the E-step and one in the M-step plus the (N, K) table
    written once and read twice), and the formula in words. Sequence workloads count
    ``frames`` (the real frames, ``sum(lengths)``; default ``n * seq_len``) as N."""
    d, k = w.d, w.k
    item = np.dtype(dtype).itemsize
    if w.is_sequences:
        f = float(frames if frames is not None else n * w.seq_len)
        if w.family == "lgssm":
            s, o = k, d
            flops = f * (14.0 * s**3 + 4.0 * s * s * o + 4.0 * s * o * o)
            bytes_ = f * (2.0 * o + 2.0 * (s + s * s)) * item
            formula = (
                "F·(14·S³ + 4·S²·O + 4·S·O²), F frames, S = K states, O = D observed (Kalman "
                "filter 4·S³ + 4·S²·O + 4·S·O², RTS smoother 8·S³, statistics 2·S³; a rough "
                "count); bytes F·(2·O + 2·(S + S²))·itemsize (data twice, smoothed moments "
                "written and read)"
            )
            return flops, bytes_, formula
        flops = f * (4.0 * k * d * d + 6.0 * k * k)
        bytes_ = f * (2.0 * d + 3.0 * k) * item
        formula = (
            "F·(4·K·D² + 6·K²), F = real frames (the full GMM's 4·N·K·D² with N = F, and "
            "forward, backward and transition counts, 2·K² each per frame); bytes "
            "F·(2·D + 3·K)·itemsize"
        )
        return flops, bytes_, formula
    if w.family == "gmm" and w.covariance_type == "full":
        flops = 4.0 * n * k * d * d
        formula = "4·N·K·D² (E-step ‖A_k(x−μ_k)‖² and M-step Σ r(x−μ)(x−μ)ᵀ, 2·N·K·D² each)"
    elif w.family == "gmm":
        flops = 8.0 * n * k * d
        formula = "8·N·K·D (E-step x²·Pᵀ and x·(μP)ᵀ, M-step Rᵀx and Rᵀx², 2·N·K·D each)"
    else:
        flops = 4.0 * n * k * d
        formula = "4·N·K·D (E-step x·θᵀ, M-step Rᵀx, 2·N·K·D each)"
    bytes_ = (2.0 * n * d + 3.0 * n * k) * item
    return flops, bytes_, formula + "; bytes (2·N·D + 3·N·K)·itemsize"


def gradient_rows(w, iters: int, report: dict, exact_rows: list, x) -> list[dict]:
    """The exact-vs-gradient table of one workload: the exact rows of the peer comparison
    (their first ``iters`` iterations) and the gradient runs, with iterations and time to
    come within ``TARGET_GAP`` of the best ELBO any of them reached."""
    dtype = w.grad_dtype
    runs = []
    for r in exact_rows:
        if r.get("history"):
            label = {
                "elbo_jax": "exact EM",
                "elbo_jax-generic": "exact EM, generic path",
                "hand-em": "hand-written EM",
            }[r["contender"]]
            run = {
                "method": label,
                "iters": r["iters"],
                "s_per_iter": r["s_per_iter"],
                "compile_s": r["compile_s"],
                "history": r["history"],
                "loglik": r["loglik"],
                "status": r["status"],
            }
            if r["iters"] > iters:  # the same budget as the gradient runs
                run.update(
                    iters=iters,
                    history=r["history"][:iters],
                    loglik=r["history"][iters - 1],  # exact E-step: the log-likelihood
                    status=f"first {iters} of its {r['iters']} iterations; log-lik from its history",
                )
            runs.append(run)
    if "error" in report:
        runs.append({"method": "gradient M-steps", "status": f"failed: {report['error']}"})
    for method, sub in report.get("result", {}).get("methods", {}).items():
        if "history" not in sub:
            runs.append({"method": method, "status": sub.get("status")})
            continue
        warm = min(sub["warm_s"])
        runs.append(
            {
                "method": method,
                "iters": sub["iters"],
                "s_per_iter": warm / sub["iters"],
                "compile_s": max(sub["first_s"] - warm, 0.0),
                "history": sub["history"],
                "loglik": _score.score(w.family, x, sub["params"], w.covariance_type),
                "status": sub["status"],
            }
        )
    finite = [np.nanmax(np.asarray(r["history"], float)) for r in runs if r.get("history")]
    finite = [v for v in finite if np.isfinite(v)]
    best = max(finite) if finite else None
    for r in runs:
        r.update(
            workload=w.name, dtype=dtype, best=best, iters_to_target=None, time_to_target_s=None
        )
        if best is None or not r.get("history"):
            continue
        h = np.asarray(r["history"], float)
        hit = np.flatnonzero(h >= best - TARGET_GAP)
        if hit.size:
            r["iters_to_target"] = int(hit[0]) + 1
            r["time_to_target_s"] = r["iters_to_target"] * r["s_per_iter"]
    return runs


def derive(rows: list[dict], ceilings: dict) -> None:
    """Relative differences and ratios against the elbo_jax row of the same workload and
    dtype; achieved fractions of the FLOP and bandwidth ceilings."""
    ref = {(r["workload"], r["dtype"]): r for r in rows if r["contender"] == "elbo_jax"}
    for r in rows:
        base = ref.get((r["workload"], r["dtype"]))
        if r["s_per_iter"] is None:
            continue
        if base and base["s_per_iter"]:
            r["ratio"] = r["s_per_iter"] / base["s_per_iter"]
        comparable = r["iters"] == r["iters_requested"] and r.get("comparable", True)
        if base and base["loglik"] is not None and r["loglik"] is not None and comparable:
            if np.isfinite(base["loglik"]) and np.isfinite(r["loglik"]):
                r["rel_diff"] = (r["loglik"] - base["loglik"]) / abs(base["loglik"])
        peak = (ceilings.get("matmul_flops") or {}).get(r["dtype"])
        bw = ceilings.get("bandwidth_bytes_per_s")
        r["flops_per_s"] = r["flops_per_iter"] / r["s_per_iter"]
        r["bytes_per_s"] = r["bytes_per_iter"] / r["s_per_iter"]
        r["flop_frac"] = r["flops_per_s"] / peak if peak else None
        r["bw_frac"] = r["bytes_per_s"] / bw if bw else None


def _find(rows, workload, contender, dtype):
    for r in rows:
        if (r["workload"], r["contender"], r["dtype"]) == (workload, contender, dtype):
            return r
    return None


def targets(rows: list[dict]) -> list[dict]:
    """The library's speed targets, each with the measured value and whether it is met."""
    out = []

    def speedup(workload, dtype, goal):
        sk, ej = _find(rows, workload, "sklearn", dtype), _find(rows, workload, "elbo_jax", dtype)
        value = sk["ratio"] if sk and ej and ej["s_per_iter"] and sk["s_per_iter"] else None
        out.append(
            {
                "target": f"{workload} {dtype}: sklearn s/it ÷ elbo_jax s/it",
                "goal": f">= {goal}",
                "value": value,
                "met": None if value is None else bool(value >= goal),
            }
        )

    speedup("gmm-full", "float64", 8)
    speedup("gmm-diag", "float64", 5)
    speedup("gmm-diag", "float32", 8)
    for dtype in ("float64", "float32"):
        sk, ej = (
            _find(rows, "gmm-diag", "sklearn", dtype),
            _find(rows, "gmm-diag", "elbo_jax", dtype),
        )
        ok = sk and ej and sk["peak_mib"] and ej["peak_mib"] is not None and ej["s_per_iter"]
        value = ej["peak_mib"] / sk["peak_mib"] if ok else None
        out.append(
            {
                "target": f"gmm-diag {dtype}: elbo_jax peak memory ÷ sklearn peak memory",
                "goal": "<= 1",
                "value": value,
                "met": None if value is None else bool(value <= 1),
            }
        )
    gen, hand = (_find(rows, "user-model", c, "float64") for c in ("elbo_jax-generic", "hand-em"))
    value = (
        gen["s_per_iter"] / hand["s_per_iter"]
        if gen and hand and gen["s_per_iter"] and hand["s_per_iter"]
        else None
    )
    out.append(
        {
            "target": "user-model: generic-path s/it ÷ hand-written EM s/it",
            "goal": "<= 1.5",
            "value": value,
            "met": None if value is None else bool(value <= 1.5),
        }
    )
    compiles = [
        r["compile_s"]
        for r in rows
        if r["contender"] == "elbo_jax"
        and r["workload"].startswith("gmm")
        and r["compile_s"] is not None
    ]
    value = max(compiles) if compiles else None
    out.append(
        {
            "target": "compile time of a GMM fit (worst elbo_jax GMM row), s",
            "goal": "<= 2",
            "value": value,
            "met": None if value is None else bool(value <= 2),
        }
    )
    if any(r["workload"] in ("hmm-gauss", "hmm-ragged", "lgssm") for r in rows):
        out += sequence_targets(rows)
    return out


def _ratio_target(rows, workload, dtype, peer, goal, label=None) -> dict:
    """``peer s/it ÷ elbo_jax s/it >= goal`` on ``workload`` and ``dtype``."""
    p, ej = _find(rows, workload, peer, dtype), _find(rows, workload, "elbo_jax", dtype)
    ok = p and ej and ej["s_per_iter"] and p["s_per_iter"] and p["iters"] == p["iters_requested"]
    value = p["s_per_iter"] / ej["s_per_iter"] if ok else None
    return {
        "target": label or f"{workload} {dtype}: {peer} s/it ÷ elbo_jax s/it",
        "goal": f">= {goal}",
        "value": value,
        "met": None if value is None else bool(value >= goal),
    }


def monotone_violations(history, rtol: float = 1e-9) -> int | None:
    """Iterations whose log-likelihood is not finite or falls below the previous one by more
    than ``rtol`` of its size (``None`` without a history)."""
    if not history:
        return None
    h = np.asarray(history, float)
    bad = int(np.sum(~np.isfinite(h)))
    drops = h[:-1] - h[1:]
    tol = rtol * np.maximum(np.abs(h[:-1]), 1.0)
    with np.errstate(invalid="ignore"):
        bad += int(np.sum(np.isfinite(drops) & (drops > tol)))
    return bad


def sequence_targets(rows: list[dict]) -> list[dict]:
    """The targets of the sequence workloads (issue "Sequences: HMMs and LGSSMs")."""
    out = [
        _ratio_target(rows, "hmm-gauss", "float64", "dynamax", 2),
        _ratio_target(rows, "hmm-gauss", "float64", "hmmlearn", 5),
    ]
    hl = _find(rows, "hmm-gauss", "hmmlearn", "float64")
    value = abs(hl["rel_diff"]) if hl and hl.get("rel_diff") is not None else None
    out.append(
        {
            "target": "hmm-gauss float64: hmmlearn's final log-lik, abs. relative difference "
            "to elbo_jax's",
            "goal": "<= 1e-8",
            "value": value,
            "met": None if value is None else bool(value <= 1e-8),
            "fmt": ".1e",
        }
    )
    ej = _find(rows, "hmm-gauss", "elbo_jax", "float64")
    value = ej["compile_s"] if ej else None
    out.append(
        {
            "target": "hmm-gauss float64: compile time of the elbo_jax fit, s",
            "goal": "<= 3",
            "value": value,
            "met": None if value is None else bool(value <= 3),
        }
    )
    out.append(
        _ratio_target(
            rows,
            "hmm-ragged",
            "float64",
            "dynamax",
            2,
            "hmm-ragged float64: dynamax (padded data) s/it ÷ elbo_jax s/it",
        )
    )
    ej = _find(rows, "hmm-ragged", "elbo_jax", "float64")
    extra = (ej or {}).get("extra") or {}
    value = extra.get("new_lengths_compiles")
    out.append(
        {
            "target": "hmm-ragged: compilations in an elbo_jax fit on new lengths (same padded size)",
            "goal": "== 0",
            "value": value,
            "met": None if value is None else bool(value == 0),
            "fmt": "d",
        }
    )
    ej, dx = _find(rows, "lgssm", "elbo_jax", "float64"), _find(rows, "lgssm", "dynamax", "float64")
    ok = ej and dx and ej["s_per_iter"] and dx["s_per_iter"]
    value = ej["s_per_iter"] / dx["s_per_iter"] if ok else None
    out.append(
        {
            "target": "lgssm float64: elbo_jax s/it ÷ dynamax s/it",
            "goal": "<= 1",
            "value": value,
            "met": None if value is None else bool(value <= 1),
        }
    )
    value = monotone_violations(ej.get("history")) if ej else None
    iters = ej["iters"] if ej and ej.get("iters") else None
    out.append(
        {
            "target": f"lgssm float64: elbo_jax iterations (of {iters or 100}) with a non-finite "
            "or decreasing log-likelihood (by > 1e-9 relative)",
            "goal": "== 0",
            "value": value,
            "met": None if value is None else bool(value == 0),
            "fmt": "d",
        }
    )
    return out
