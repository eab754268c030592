"""``python -m benchmarks vae`` at its smoke size, in-process: it runs end to end, writes
JSON and markdown with a row per dataset and library, numpyro visits the minibatches
``ej.fit`` visits, and numpyro's final parameters score close to elbo_jax's under the one
evaluator. No time is asserted: speed claims live in the benchmark."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numpyro")  # a benchmark dependency (the bench extra), not a test one
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ["elbo_jax", "numpyro", "numpyro (scan)"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if str(ROOT) not in sys.path:  # `benchmarks` is not installed; it lives in the checkout
        sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import main

    out = tmp_path_factory.mktemp("vae")
    return main(["vae", "--smoke", "--out", str(out)]), out


def test_files_rows_and_elbos(run):
    _, out = run
    saved = json.loads((out / "results_vae_smoke.json").read_text())
    for key in ("settings", "device", "rows", "datasets", "targets", "wall_s"):
        assert key in saved
    for key in ("cpu_model", "cpu_count", "versions", "git_commit", "date_utc"):
        assert key in saved["device"]
    assert saved["device"]["versions"]["numpyro"]
    assert set(saved["datasets"]) == {"digits", "synthetic"}
    for name in ("digits", "synthetic"):
        rows = {r["library"]: r for r in saved["rows"] if r["dataset"] == name}
        assert sorted(rows) == sorted(LIBRARIES)
        steps = {r["steps"] for r in rows.values()}
        assert steps == {saved["settings"]["datasets"][name]["passes"] * 6}  # 300 rows / 50
        for row in rows.values():
            assert row["status"] == "ok"
            assert math.isfinite(row["test_elbo"]) and math.isfinite(row["test_iw_bound"])
            assert row["test_iw_bound"] > row["test_elbo"] - 0.1  # IW(k) tightens the ELBO
            assert row["steps_per_s"] is None or row["steps_per_s"] > 0
        # Same start, same minibatches, same optimizer: a loose bound after 18 steps.
        ours, peer = rows["elbo_jax"]["test_elbo"], rows["numpyro"]["test_elbo"]
        assert abs(ours - peer) / abs(peer) < 0.02
        # The scan and the Python loop run the same numpyro updates.
        assert rows["numpyro (scan)"]["test_elbo"] == pytest.approx(peer, rel=1e-4)
    assert all({"target", "goal", "value", "met"} <= set(t) for t in saved["targets"])
    md = (out / "results_vae_smoke.md").read_text()
    for heading in ("**Targets**", "**elbo_jax VAE against numpyro SVI**", "| digits | numpyro |"):
        assert heading in md


def test_numpyro_sees_the_minibatches_fit_draws():
    """``pass_batches`` replays ``ej.fit``'s minibatches: each pass a permutation of the rows
    in equal-size (to one row) batches, and the order ``minibatches`` draws from the fit's
    key chain (its key split once per minibatch)."""
    import jax.numpy as jnp
    import jax.random as jr

    from benchmarks._vae import pass_batches
    from elbo_jax._data import Dataset
    from elbo_jax._solvers._online import minibatches

    n, size = 23, 5
    batches, num_batches = pass_batches(n, size)
    key = jr.key(3)
    index, keep, next_key = batches(key, jnp.asarray(0, jnp.int32))
    assert num_batches == 5 and index.shape == keep.shape == (5, 5)
    assert sorted(np.asarray(index)[np.asarray(keep)].tolist()) == list(range(n))
    assert set(np.asarray(keep).sum(axis=1).tolist()) == {4, 5}
    data = Dataset(jnp.arange(n), jnp.ones((n,)), jnp.asarray(float(n)), chunk_size=n)
    batch_fn, _ = minibatches(data, size, key, jnp.asarray(0, jnp.int32))
    np.testing.assert_array_equal(index[2], batch_fn(2).x)
    for _ in range(num_batches):
        key = jr.split(key)[0]
    np.testing.assert_array_equal(jr.key_data(next_key), jr.key_data(key))
