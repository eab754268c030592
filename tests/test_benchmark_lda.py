"""``python -m benchmarks lda`` at its smoke size, in-process: it runs end to end, writes JSON
and markdown with a row per corpus, mode and library, every contender runs the work it was
given from the shared start, and the one evaluator agrees with scikit-learn's own
perplexity. No time is asserted: speed claims live in the benchmark."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gensim")  # a benchmark dependency (the bench extra), not a test one
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = {  # at the smoke size: no scikit-learn n_jobs=2 batch row
    "batch": ["elbo_jax", "scikit-learn"],
    "online": ["elbo_jax", "scikit-learn", "gensim"],
}


def _benchmarks():
    if str(ROOT) not in sys.path:  # `benchmarks` is not installed; it lives in the checkout
        sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _benchmarks()
    from benchmarks.__main__ import main

    out = tmp_path_factory.mktemp("lda")
    return main(["lda", "--smoke", "--out", str(out)]), out


def test_files_rows_and_scores(run):
    _, out = run
    saved = json.loads((out / "results_lda_smoke.json").read_text())
    for key in ("settings", "device", "rows", "corpora", "targets", "wall_s"):
        assert key in saved
    for key in ("cpu_model", "cpu_count", "versions", "git_commit", "date_utc"):
        assert key in saved["device"]
    assert saved["device"]["versions"]["gensim"]
    assert saved["settings"]["sklearn_two_jobs"] is False
    assert set(saved["corpora"]) == {"synthetic", "lee"}
    for name, corpus in saved["corpora"].items():
        spec = saved["settings"]["corpora"][name]
        for mode, units in (("batch", spec["iters"]), ("online", spec["passes"])):
            rows = {
                r["library"]: r for r in saved["rows"] if (r["corpus"], r["mode"]) == (name, mode)
            }
            assert sorted(rows) == sorted(LIBRARIES[mode])
            for row in rows.values():
                assert row["status"] == "ok"
                assert row["units"] == row["units_run"] == units
                assert row["docs"] == corpus["n_train"] * units
                assert row["docs_per_s"] > 0 and row["wall_s"] > 0
                assert math.isfinite(row["bound_per_word"]) and row["bound_per_word"] < 0
                assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
                # Every contender learned something like the others from the same start.
                assert abs(row["bound_rel_diff"]) < 0.1
                if row["library"].startswith("scikit-learn"):
                    # one evaluator, scikit-learn's definition: its own number to 1e-3
                    assert row["perplexity"] == pytest.approx(row["sklearn_perplexity"], rel=1e-3)
                else:
                    assert row["sklearn_perplexity"] is None
            assert rows["elbo_jax"]["speed_ratio"] == 1.0
    assert len(saved["targets"]) == 8
    assert all({"target", "goal", "value", "met"} <= set(t) for t in saved["targets"])
    md = (out / "results_lda_smoke.md").read_text()
    for heading in (
        "**Targets**",
        "**elbo_jax LDA against scikit-learn",
        "| lee | online | gensim |",
    ):
        assert heading in md


def test_peers_start_from_the_shared_topics():
    """With no iterations, scikit-learn (batch and online) and gensim give back the start
    $\\lambda_0$ they were handed, so every contender starts where elbo_jax does."""
    import scipy.sparse as sp

    _benchmarks()
    from benchmarks._lda import gensim_online, settings, sklearn_lda

    cfg = settings(quick=False, smoke=True)
    spec = cfg["corpora"]["synthetic"]
    rng = np.random.default_rng(0)
    lam0 = (rng.gamma(100.0, 1 / 100.0, (3, 12)) + 0.5).astype(np.float32)
    x = sp.csr_matrix(rng.poisson(1.0, (40, 12)).astype(np.float32))
    corpus = [[(j, float(c)) for j, c in enumerate(row) if c] for row in x.toarray()]
    for online in (False, True):
        lam, iters, _ = sklearn_lda(lam0, x, cfg, spec, online=online)(0)
        assert iters == 0
        np.testing.assert_array_equal(lam, lam0)
    lam, _ = gensim_online(lam0, corpus, cfg, spec)(0)
    np.testing.assert_allclose(lam, lam0, rtol=1e-6)
