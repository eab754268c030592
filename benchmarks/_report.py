"""Reports: markdown tables (to stdout and ``results*.md``), ``results*.json`` and PNGs."""

import json
import math
from pathlib import Path

import numpy as np


def _f(v, spec: str, none: str = "—") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none if v is None else "nan"
    return format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header_md(results: dict) -> str:
    dev = results["device"]
    v = dev["versions"]
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return "\n".join(
        [
            f"Run: `{results['mode']}` (scale {results['scale']}), {dev['date_utc']}, commit "
            f"`{dev['git_commit']}`, total wall time {results['wall_s']:.0f} s.",
            f"Machine: {dev['cpu_model']}, {dev['cpu_count']} cores; JAX device `{dev['jax_device']}` "
            f"(platform {dev['platform']}, kind {dev['device_kind']}). {results['elbo_jax_device_note']}.",
            f"Versions: {versions}.",
            f"Load average (1, 5, 15 min) at the start {results.get('load_average_start')}, "
            f"at the end {results.get('load_average_end')}.",
        ]
    )


def targets_md(results: dict) -> str:
    rows = []
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        rows.append([t["target"], t["goal"], _f(t["value"], t.get("fmt", ".2f")), met])
    return _table(["target", "goal", "measured", "met?"], rows)


def main_md(results: dict) -> str:
    rows = []
    for r in results["rows"]:
        gflops = None if r.get("flops_per_s") is None else r["flops_per_s"] / 1e9
        gbs = None if r.get("bytes_per_s") is None else r["bytes_per_s"] / 1e9
        flop_col = (
            "—" if gflops is None else f"{gflops:.1f} ({_f(100 * (r['flop_frac'] or 0), '.1f')}%)"
        )
        bw_col = "—" if gbs is None else f"{gbs:.1f} ({_f(100 * (r['bw_frac'] or 0), '.1f')}%)"
        status = r["status"] or ""
        notes = [status] if status not in ("MAX_ITERS",) else []
        if r.get("note"):
            notes.append(r["note"])
        if r.get("compute_dtype") and r["compute_dtype"] != r["dtype"]:
            notes.append(f"computes in {r['compute_dtype']}")
        if r.get("warnings"):
            notes.append(f"{len(r['warnings'])} warning(s), see JSON")
        rows.append(
            [
                r["workload"],
                r["contender"],
                r["dtype"],
                _f(r["iters"], "d"),
                _f(r["s_per_iter"], ".4g"),
                _f(r["ratio"], ".2f"),
                _f(r["compile_s"], ".2f"),
                _f(r["peak_mib"], ".0f"),
                _f(r["loglik"], ".6f"),
                _f(r["rel_diff"], "+.1e"),
                flop_col,
                bw_col,
                "; ".join(notes),
            ]
        )
    return _table(
        [
            "workload",
            "contender",
            "dtype",
            "iters",
            "s/it",
            "ratio",
            "compile s",
            "peak MiB",
            "log-lik/datum",
            "rel. diff",
            "GFLOP/s (% peak)",
            "GB/s (% peak)",
            "notes",
        ],
        rows,
    )


def gradient_md(results: dict) -> str:
    rows = []
    for r in results["gradient"]:
        reached = "not reached" if r.get("iters") and r["iters_to_target"] is None else ""
        rows.append(
            [
                r["workload"],
                r["dtype"],
                r["method"],
                _f(r.get("iters"), "d"),
                _f(r.get("s_per_iter"), ".4g"),
                _f(r.get("compile_s"), ".2f"),
                _f(r.get("loglik"), ".6f"),
                _f(r.get("iters_to_target"), "d", reached or "—"),
                _f(r.get("time_to_target_s"), ".3g", reached or "—"),
                "" if r.get("status") == "MAX_ITERS" else (r.get("status") or ""),
            ]
        )
    return _table(
        [
            "workload",
            "dtype",
            "M-step",
            "iters",
            "s/it",
            "compile s",
            "final log-lik/datum",
            "iters to target",
            "time to target s",
            "status",
        ],
        rows,
    )


def ceilings_md(results: dict) -> str:
    c = results["ceilings"]
    flops = c["matmul_flops"]
    rows = [
        [f"matmul float32 ({c['matmul_n']}²)", _f(flops["float32"] / 1e9, ".1f") + " GFLOP/s"],
        [
            f"matmul float64 ({c['matmul_n']}²)",
            "—" if flops["float64"] is None else _f(flops["float64"] / 1e9, ".1f") + " GFLOP/s",
        ],
        [
            "memory bandwidth: " + c["bandwidth_method"],
            _f(c["bandwidth_bytes_per_s"] / 1e9, ".1f") + " GB/s",
        ],
    ]
    return _table(["ceiling", "measured"], rows)


def workloads_md(results: dict) -> str:
    def n_col(w):
        if "num_sequences" not in w:
            return f"{w['n']:,}"
        lo, hi = w["seq_lengths"]
        lengths = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
        return f"{w['num_sequences']:,} seq. × {lengths} ({w['num_frames']:,} frames)"

    rows = [
        [w["name"], n_col(w), w["d"], w["k"], w["iters"], w["description"], w["start"]]
        for w in results["workloads"].values()
    ]
    return _table(["workload", "N", "D", "K", "iters", "what", "start"], rows)


def markdown(results: dict) -> str:
    return (
        "\n\n".join(
            [
                header_md(results),
                "**Targets**\n\n" + targets_md(results),
                "**elbo_jax against its peers** (same start, same iterations; ratio = s/it ÷ elbo_jax "
                "s/it of the same workload and dtype; rel. diff = (log-lik − elbo_jax log-lik) / "
                "|elbo_jax log-lik|)\n\n" + main_md(results),
                "**Exact against gradient M-steps** (target: within 1e-4 per datum of the best "
                "log-likelihood any run of the workload reached)\n\n" + gradient_md(results),
                "**Machine ceilings**\n\n" + ceilings_md(results),
                "**Workloads**\n\n" + workloads_md(results),
            ]
        )
        + "\n"
    )


def plot(results: dict, out_dir: Path, suffix: str) -> list[str]:
    """One PNG per workload (gradient dtype): gap to the best ELBO against iteration and
    against wall time (iteration × s/it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_workload: dict[str, list] = {}
    for r in results["gradient"]:
        if r.get("history"):
            by_workload.setdefault((r["workload"], r["dtype"]), []).append(r)
    for (name, dtype), runs in by_workload.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        best = runs[0]["best"]
        for r in runs:
            h = np.asarray(r["history"], float)
            gap = np.maximum(best - h, 1e-12)
            it = np.arange(1, h.size + 1)
            axes[0].semilogy(it, gap, label=r["method"])
            axes[1].semilogy(it * r["s_per_iter"], gap, label=r["method"])
        for ax, xlabel in zip(axes, ["iteration", "wall time (s), iteration × s/it"], strict=True):
            ax.axhline(1e-4, color="grey", ls=":", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("best ELBO − ELBO per datum")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{name} ({dtype}): exact vs gradient M-steps")
        path = out_dir / f"gradient-{name}-{dtype}{suffix}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def write(results: dict, out_dir: Path, quick: bool) -> dict[str, Path]:
    """``results[_quick].json``, ``results[_quick].md`` and the PNGs in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    try:
        results["figures"] = plot(results, out_dir, suffix)
    except ImportError:
        results["figures"] = []
    md = markdown(results)
    paths = {"json": out_dir / f"results{suffix}.json", "md": out_dir / f"results{suffix}.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    paths["md"].write_text(md)
    return paths


def run_comparison(
    name: str,
    cfg: dict,
    *,
    peer: str,
    versions: tuple,
    groups: str,
    group_rows,
    targets,
    markdown,
    out_dir: Path,
) -> dict:
    """A side-by-side run (``vae``, ``lda``): the device and versions (``peer`` the peer
    package whose version is added), ``group_rows(name, cfg) -> (rows, description)`` for
    each entry of ``cfg[groups]``, run in float32 with JAX's default promotion rules whatever
    the caller's configuration; then the targets, and ``results_<name>`` written."""
    import time

    import jax

    from . import _device

    t0 = time.perf_counter()
    info = _device.device_info()
    found = dict(info["versions"], **{peer: _device._version(peer)})
    info["versions"] = {k: found.get(k) for k in versions}
    results = {"settings": cfg, "device": info, "load_average_start": _device.load_average()}
    results["rows"], results[groups] = [], {}
    with (
        jax.enable_x64(False),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        for group in cfg[groups]:
            rows, description = group_rows(group, cfg)
            results["rows"] += rows
            results[groups][group] = description
    results["targets"] = targets(results)
    results["load_average_end"] = _device.load_average()
    results["wall_s"] = time.perf_counter() - t0
    results["paths"] = write_named(name, results, markdown(results), out_dir, cfg["mode"])
    return results


def write_named(name: str, results: dict, markdown_text: str, out_dir: Path, mode: str) -> dict:
    """``results_<name>[_<mode>].json`` and ``.md`` in ``out_dir`` (no suffix for a full
    run); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if mode == "full" else f"_{mode}"
    paths = {
        "json": out_dir / f"results_{name}{suffix}.json",
        "md": out_dir / f"results_{name}{suffix}.md",
    }
    paths["json"].write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    paths["md"].write_text(markdown_text)
    return paths


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
