"""Data-parallel EM across two processes (jax.distributed on 127.0.0.1, CPU collectives by
gloo): each process holds half the rows of a global array; the fit equals the one-process
fit on all the data."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np

import elbo_jax as ej

_WORKER = textwrap.dedent(
    """
    import sys
    import jax
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default, said
    jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=nproc, process_id=pid,
                               initialization_timeout=60)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import elbo_jax as ej
    x, start = np.load(out + "/x.npy"), ej.models.GaussianMixture(*np.load(out + "/start.npz").values())
    assert jax.device_count() == nproc and jax.local_device_count() == 1
    sharding = NamedSharding(jax.make_mesh((nproc,), ("data",)), P("data"))  # Explicit axes
    per = x.shape[0] // nproc
    xg = jax.make_array_from_process_local_data(sharding, x[pid * per:(pid + 1) * per], x.shape)
    assert not xg.is_fully_addressable
    res = ej.fit(start, xg, max_iters={iters}, tol=0.0, sharding=sharding)
    half = ej.fit(start, xg, max_iters={iters} // 2, tol=0.0, sharding=sharding)
    resumed = ej.fit(half, xg, max_iters={iters} - {iters} // 2, tol=0.0, sharding=sharding)
    leaves = lambda r: [np.asarray(a) for a in jax.tree_util.tree_leaves((r.model, r.q))]
    np.savez(out + f"/out{{pid}}.npz", np.asarray(res.history), *leaves(res))
    np.savez(out + f"/resumed{{pid}}.npz", np.asarray(resumed.history), *leaves(resumed))
    jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(code: str, nproc: int, out: str, timeout: float) -> None:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()  # one device per process, the run's other flags
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    )
    port = _free_port()
    logs = [open(os.path.join(out, f"log{i}.txt"), "w+") for i in range(nproc)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), str(nproc), str(port), out],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            cwd=out,
        )
        for i in range(nproc)
    ]
    # A process that fails leaves the others blocked in a collective (gloo gives up after
    # 30 s, the coordinator after 100 s): stop them all at the first failure or the timeout.
    deadline = time.monotonic() + timeout
    try:
        while True:
            rcs = [p.poll() for p in procs]
            if all(rc is not None for rc in rcs) or any(rc not in (None, 0) for rc in rcs):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = ""
    for i, log in enumerate(logs):
        log.seek(0)
        text += f"--- process {i} (rc {procs[i].returncode})\n{log.read()[-3000:]}\n"
        log.close()
    assert all(p.returncode == 0 for p in procs), text


def test_two_process_fit_equals_one_process_fit(tmp_path):
    rng = np.random.default_rng(0)
    n, iters = 1000, 30
    x = np.concatenate(
        [
            rng.normal(size=(400, 2)),
            rng.normal(size=(300, 2)) * 0.7 + [4.0, 1.0],
            rng.normal(size=(300, 2)) * 1.3 + [-2.0, 5.0],
        ]
    )[rng.permutation(n)]
    weights, means, covs = (
        np.array([0.3, 0.3, 0.4]),
        np.array([[0.5, 0.0], [3.0, 3.0], [-1.0, 4.0]]),
        np.stack([np.eye(2)] * 3),
    )
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "start.npz", weights, means, covs)
    _run_processes(_WORKER.format(iters=iters), 2, str(tmp_path), timeout=120)
    ref = ej.fit(ej.models.GaussianMixture(weights, means, covs), x, max_iters=iters, tol=0.0)
    want = [np.asarray(ref.history)] + [
        np.asarray(a) for a in jax.tree_util.tree_leaves((ref.model, ref.q))
    ]
    for name in ("out0", "out1", "resumed0", "resumed1"):
        got = np.load(tmp_path / f"{name}.npz")
        got = [got[f"arr_{i}"] for i in range(len(got.files))]
        assert len(got) == len(want)
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-12, err_msg=name)  # history
        for g, w in zip(got[1:], want[1:], strict=True):  # model, then q (logits: |.| <= 140)
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=name)
