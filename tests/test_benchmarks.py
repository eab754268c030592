"""The benchmark entry point, ``python -m benchmarks run --quick``, at a tiny scale and
in-process: it runs end to end, writes JSON and markdown with the expected keys, and
elbo_jax's exact EM agrees with scikit-learn (GMM full and diag, float64), with the
hand-written EM (user-model) and with hmmlearn (the HMM workloads, equal and ragged
lengths). No time is asserted: speed claims live in the benchmark."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
HAVE_POMEGRANATE = all(importlib.util.find_spec(m) is not None for m in ("torch", "pomegranate"))
WORKLOADS = {
    "gmm-full",
    "gmm-diag",
    "bernoulli-digits",
    "user-model",
    "hmm-gauss",
    "hmm-ragged",
    "lgssm",
}
ROW_KEYS = {
    "workload",
    "contender",
    "dtype",
    "iters",
    "iters_requested",
    "status",
    "first_s",
    "warm_s",
    "compile_s",
    "s_per_iter",
    "peak_mib",
    "loglik",
    "rel_diff",
    "ratio",
    "note",
    "warnings",
}
GRADIENT_KEYS = {
    "workload",
    "dtype",
    "method",
    "iters",
    "s_per_iter",
    "compile_s",
    "loglik",
    "best",
    "iters_to_target",
    "time_to_target_s",
    "history",
    "status",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if str(ROOT) not in sys.path:  # `benchmarks` is not installed; it lives in the checkout
        sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import main

    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELBO_JAX_BENCH_CACHE", str(out / "cache"))
        mp.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # restored
        results = main(
            [
                "run",
                "--quick",
                "--scale",
                "0.001",
                "--in-process",
                "--out",
                str(out),
                "--methods",
                "adam(1e-2) x1",
            ]
        )
    return results, out


def _row(results, workload, contender, dtype="float64"):
    (row,) = [
        r
        for r in results["rows"]
        if (r["workload"], r["contender"], r["dtype"]) == (workload, contender, dtype)
    ]
    return row


def test_files_and_keys(run):
    results, out = run
    saved = json.loads((out / "results_quick.json").read_text())
    assert saved["mode"] == "quick"
    for key in ("device", "ceilings", "rows", "gradient", "targets", "workloads", "wall_s"):
        assert key in saved
    for key in (
        "platform",
        "device_kind",
        "cpu_model",
        "cpu_count",
        "versions",
        "git_commit",
        "date_utc",
    ):
        assert key in saved["device"]
    assert set(saved["ceilings"]["matmul_flops"]) == {"float32", "float64"}
    assert saved["ceilings"]["bandwidth_bytes_per_s"] > 0
    assert set(saved["workloads"]) == WORKLOADS
    for row in saved["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["peak_mib"] is None  # in-process: no peak memory
    for row in saved["gradient"]:
        assert GRADIENT_KEYS <= set(row) or row["status"].startswith("failed")
    methods = {r["method"] for r in saved["gradient"]}
    assert {"exact EM", "adam(1e-2) x1", "hand-written EM"} <= methods
    assert {t["target"] for t in saved["targets"]}  # every target listed, met or not
    assert all({"target", "goal", "value", "met"} <= set(t) for t in saved["targets"])
    md = (out / "results_quick.md").read_text()
    for heading in (
        "**Targets**",
        "| target | goal | measured | met? |",
        "**elbo_jax against its peers**",
        "**Exact against gradient M-steps**",
        "**Machine ceilings**",
        "| gmm-full | sklearn | float64 |",
    ):
        assert heading in md
    for name in saved["figures"]:
        assert (out / name).stat().st_size > 0
    assert len(saved["figures"]) == 4


def test_every_elbo_jax_row_ran(run):
    results, _ = run
    import elbo_jax as ej

    for row in results["rows"]:
        if row["workload"] == "lgssm" and not hasattr(ej.models, "LinearGaussianSSM"):
            assert "not available" in row["status"]  # skipped until the model exists
            continue
        if row["contender"] in ("elbo_jax", "elbo_jax-generic", "hand-em", "sklearn"):
            assert row["status"] == "MAX_ITERS", row
            assert row["iters"] == row["iters_requested"]
            assert math.isfinite(row["loglik"]) and row["s_per_iter"] > 0


@pytest.mark.parametrize("workload", ["gmm-full", "gmm-diag"])
def test_elbo_jax_agrees_with_sklearn(run, workload):
    results, _ = run
    ej, sk = _row(results, workload, "elbo_jax"), _row(results, workload, "sklearn")
    assert math.isfinite(ej["loglik"])
    assert abs(sk["rel_diff"]) < 1e-6
    assert abs(sk["loglik"] - ej["loglik"]) / abs(ej["loglik"]) < 1e-6


def test_elbo_jax_agrees_with_hand_written_em(run):
    results, _ = run
    hand = _row(results, "user-model", "hand-em")
    for contender in ("elbo_jax", "elbo_jax-generic"):
        row = _row(results, "user-model", contender)
        assert abs(row["loglik"] - hand["loglik"]) / abs(hand["loglik"]) < 1e-6, contender
    # the histories agree too: the same iterations, the same log-likelihoods
    ej = _row(results, "user-model", "elbo_jax")["history"]
    assert len(ej) == len(hand["history"])
    assert max(abs(a - b) for a, b in zip(ej, hand["history"], strict=True)) < 1e-8


@pytest.mark.parametrize("workload", ["hmm-gauss", "hmm-ragged"])
def test_elbo_jax_hmm_agrees_with_hmmlearn(run, workload):
    pytest.importorskip("hmmlearn")
    results, _ = run
    ej, hl = _row(results, workload, "elbo_jax"), _row(results, workload, "hmmlearn")
    assert ej["status"] == "MAX_ITERS" and hl["iters"] == hl["iters_requested"]
    assert abs(hl["rel_diff"]) < 1e-8


def test_ragged_hmm_fit_on_new_lengths_does_not_recompile(run):
    results, _ = run
    assert _row(results, "hmm-ragged", "elbo_jax")["extra"]["new_lengths_compiles"] == 0


def test_pomegranate_rows(run):
    results, _ = run
    rows = [r for r in results["rows"] if r["contender"] == "pomegranate"]
    assert {r["workload"] for r in rows} == {
        "gmm-full",
        "gmm-diag",
        "bernoulli-digits",
        "user-model",
        "hmm-gauss",
    }
    if not HAVE_POMEGRANATE:
        assert all("not installed" in r["status"] for r in rows)
        pytest.skip("pomegranate or torch not installed")
    for r in rows:
        assert not r["status"].startswith("failed"), r["status"]


def test_rounds_merge_to_the_best_warm_time_and_the_smallest_overhead():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks._runner import _merge_rounds

    slow = {"result": {"warm_s": [2.0, 2.5], "first_s": 3.0, "params": "slow"}, "peak_mib": 10}
    fast = {"result": {"warm_s": [1.5, 1.8], "first_s": 4.0, "params": "fast"}, "peak_mib": 12}
    merged = _merge_rounds([slow, {"error": "timed out"}, fast])
    assert merged["result"]["params"] == "fast" and merged["rounds"] == 2
    assert sorted(merged["result"]["warm_s"]) == [1.5, 1.8, 2.0, 2.5]
    assert merged["result"]["first_s"] == 1.5 + 1.0  # best warm + the smaller overhead (3 - 2)
    assert merged["peak_mib"] == 12
    assert _merge_rounds([{"error": "x"}]) == {"error": "x"}


# ------------------------------------------------------------ python -m benchmarks online
ONLINE_ROW_KEYS = {"workload", "dtype", "method", "batch_size", "kappa", "curve", "loglik"}
ONLINE_ROW_KEYS |= {"l10", "passes_to_target", "s_per_pass", "compile_s", "status"}


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """``python -m benchmarks online`` on its test grid (gmm-diag only, N=5,000, one batch
    size and kappa, two passes; the out-of-core rows in this process; 1 and 2 devices)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import main

    out = tmp_path_factory.mktemp("online")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELBO_JAX_BENCH_CACHE", str(out / "cache"))
        args = ["online", "--quick", "--scale", "0.1", "--smoke", "--in-process", "--out", str(out)]
        results = main(args)
    return results, out


def test_online_files_and_keys(online):
    _, out = online
    saved = json.loads((out / "results_online_quick.json").read_text())
    for key in ("settings", "device", "online", "out_of_core", "sharded", "targets", "wall_s"):
        assert key in saved
    for key in ("cpu_model", "cpu_count", "versions", "git_commit", "date_utc"):
        assert key in saved["device"]
    for row in saved["online"]:
        assert ONLINE_ROW_KEYS <= set(row), row
    assert all({"target", "goal", "value", "met"} <= set(t) for t in saved["targets"])
    assert saved["out_of_core"]["read"]["warm_bytes_per_s"] > 0
    md = (out / "results_online_quick.md").read_text()
    for heading in (
        "**Targets**",
        "**Online EM against batch EM**",
        "**Out-of-core exact EM**",
        "**Sharded exact EM**",
        "| gmm-diag | float64 | stepwise |",
    ):
        assert heading in md


def test_online_passes_against_batch_em(online):
    results, _ = online
    rows = {r["method"]: r for r in results["online"]}
    assert set(rows) == {"batch EM", "stepwise", "inertia"}
    batch = rows["batch EM"]
    # Batch EM's own history reaches L10 - 1e-3 within its 10 iterations.
    assert math.isfinite(batch["l10"]) and 1 <= batch["passes_to_target"] <= 10
    passes = results["settings"]["passes"]
    for name in ("stepwise", "inertia"):
        row = rows[name]
        assert row["status"] == "ok" and len(row["curve"]) == passes
        assert all(math.isfinite(v) for v in row["curve"])
        reached = [i + 1 for i, v in enumerate(row["curve"]) if v >= batch["l10"] - 1e-3]
        assert row["passes_to_target"] == (reached[0] if reached else None)
        assert row["s_per_pass"] is None or row["s_per_pass"] > 0
    # With eta's default, inertia EM's update is stepwise EM's (moment-matching M-step).
    assert rows["inertia"]["max_diff_to_stepwise"] < 1e-9


def test_streamed_equals_in_memory(online):
    results, _ = online
    table = results["out_of_core"]["rows_table"]
    assert {r["source"] for r in table} == {"memory", "memmap", "device"}
    for row in table:
        assert row["status"] == "ok", row
        assert row["loglik_rel_diff"] <= 1e-6, row
        assert math.isfinite(row["loglik"])


def test_sharded_equals_one_device(online):
    results, _ = online
    rows = results["sharded"]
    assert [r["devices"] for r in rows] == [1, 2]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["loglik_rel_diff"] <= 1e-6
