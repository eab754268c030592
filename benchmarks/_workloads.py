"""The benchmark workloads: deterministic synthetic data (fixed seeds) and one shared start.

Every contender of a workload gets the same data (cached as ``.npy``, one file per dtype, so
that a worker loads exactly the array it uses) and the same initial parameters (an ``.npz``).
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

ALL_METHODS = ("adam(1e-2) x1", "adam(1e-2) x10", "sgd(1e-2, momentum 0.9) x1", "lbfgs x5")
CHEAP_METHODS = ALL_METHODS[:3]  # no L-BFGS on the two N = 10^6 workloads (time budget)
DATA_VERSION = 1  # bump when the data or the start change, so stale caches are not reused
INIT_SUBSAMPLE = 100_000  # rows used for the GMM start if initialize fails on the full data


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark problem. ``iters`` applies to the full run, ``quick_iters`` to ``--quick``."""

    name: str
    family: str  # "gmm", "bernoulli" or "poisson"
    n: int
    d: int
    k: int
    iters: int
    quick_iters: int
    dtypes: tuple[str, ...]  # dtypes of the peer-comparison rows
    grad_dtype: str  # dtype of the exact-vs-gradient comparison
    seed: int
    description: str
    covariance_type: str | None = None
    scalable: bool = True  # False: real data of fixed size (digits)
    grad_methods: tuple[str, ...] = ALL_METHODS  # gradient M-steps compared with exact EM
    grad_iters: int | None = None  # iterations of the exact-vs-gradient runs (None: iters)

    def num_data(self, scale: float) -> int:
        if not self.scalable:
            return self.n
        return max(50 * self.k, int(round(self.n * scale)))

    def num_iters(self, quick: bool) -> int:
        return self.quick_iters if quick else self.iters

    def num_grad_iters(self, quick: bool) -> int:
        return min(self.num_iters(quick), self.grad_iters or self.iters)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "gmm-full",
            "gmm",
            100_000,
            16,
            16,
            20,
            10,
            ("float64", "float32"),
            "float64",
            1,
            "Gaussian mixture, full covariances: N=100,000 draws in D=16 from a random "
            "16-component ground truth",
            covariance_type="full",
            grad_iters=10,
        ),
        Workload(
            "gmm-diag",
            "gmm",
            1_000_000,
            32,
            64,
            10,
            5,
            ("float64", "float32"),
            "float64",
            2,
            "Gaussian mixture, diagonal covariances: N=1,000,000 draws in D=32 from a random "
            "64-component ground truth (10 iterations: the largest workload)",
            covariance_type="diag",
            grad_methods=CHEAP_METHODS,
            grad_iters=5,
        ),
        Workload(
            "bernoulli-digits",
            "bernoulli",
            1797,
            64,
            10,
            100,
            30,
            ("float64",),
            "float64",
            3,
            "Bernoulli mixture, K=10, on scikit-learn's load_digits() binarised (pixel > 7): "
            "N=1,797, D=64 (real data, not scaled)",
            scalable=False,
        ),
        Workload(
            "user-model",
            "poisson",
            1_000_000,
            4,
            8,
            10,
            5,
            ("float64",),
            "float64",
            4,
            "Poisson mixture, K=8, on N=1,000,000 count vectors of D=4 from a random ground "
            "truth; the log-joint is written in benchmarks/_contenders.py as a plain ej.Model "
            "(latent + log_joint, no hooks)",
            grad_methods=CHEAP_METHODS,
        ),
    ]
}


def cache_dir() -> Path:
    """``$ELBO_JAX_BENCH_CACHE``, else ``<tmp>/elbo_jax_bench`` (never committed)."""
    path = os.environ.get("ELBO_JAX_BENCH_CACHE") or os.path.join(
        tempfile.gettempdir(), "elbo_jax_bench"
    )
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _stem(w: Workload, n: int) -> str:
    what = [w.name, w.family, w.d, w.k, w.seed, w.covariance_type, n, DATA_VERSION]
    key = json.dumps(what)
    return f"{w.name}-n{n}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def data_path(w: Workload, n: int, dtype: str) -> Path:
    return cache_dir() / f"{_stem(w, n)}-{dtype}.npy"


def init_path(w: Workload, n: int) -> Path:
    return cache_dir() / f"{_stem(w, n)}-init.npz"


# --------------------------------------------------------------------------- data
def _random_gmm(rng: np.random.Generator, w: Workload):
    k, d = w.k, w.d
    weights = rng.dirichlet(np.full(k, 5.0))
    means = rng.normal(0.0, 2.0, size=(k, d))
    scale = rng.uniform(0.5, 2.0, size=k)
    if w.covariance_type == "full":
        a = rng.normal(size=(k, d, d)) / np.sqrt(d)
        covs = scale[:, None, None] * (a @ np.swapaxes(a, 1, 2)) + 0.3 * np.eye(d)[None]
    else:
        covs = scale[:, None] * rng.uniform(0.3, 2.0, size=(k, d))
    return weights, means, covs


def _sample_gmm(rng: np.random.Generator, w: Workload, n: int) -> np.ndarray:
    weights, means, covs = _random_gmm(rng, w)
    z = rng.choice(w.k, size=n, p=weights)
    eps = rng.standard_normal((n, w.d))
    if w.covariance_type == "full":
        chol = np.linalg.cholesky(covs)
        x = np.empty((n, w.d))
        for j in range(w.k):
            idx = np.flatnonzero(z == j)
            x[idx] = means[j] + eps[idx] @ chol[j].T
        return x
    return means[z] + np.sqrt(covs[z]) * eps


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data > 7).astype(np.float64)


def _sample_poisson(rng: np.random.Generator, w: Workload, n: int) -> np.ndarray:
    weights = rng.dirichlet(np.full(w.k, 5.0))
    rates = rng.gamma(2.0, 5.0, size=(w.k, w.d))
    z = rng.choice(w.k, size=n, p=weights)
    return rng.poisson(rates[z]).astype(np.float64)


def make_data(w: Workload, n: int) -> np.ndarray:
    """The workload's float64 data, ``(n, D)`` (deterministic in ``w.seed``)."""
    rng = np.random.default_rng(w.seed)
    if w.family == "gmm":
        return _sample_gmm(rng, w, n)
    if w.family == "bernoulli":
        return _digits()
    return _sample_poisson(rng, w, n)


def prepare_data(w: Workload, n: int) -> np.ndarray:
    """Write the cached ``.npy`` files (float64 and float32) unless present; return float64."""
    p64 = data_path(w, n, "float64")
    if p64.exists():
        x = np.load(p64)
    else:
        x = make_data(w, n)
        np.save(p64, x)
    p32 = data_path(w, n, "float32")
    if not p32.exists():
        np.save(p32, x.astype(np.float32))
    return x


# --------------------------------------------------------------------------- start
def simple_init(w: Workload, x: np.ndarray) -> dict[str, np.ndarray]:
    """The deterministic start of the Bernoulli and Poisson workloads: uniform weights and
    ``0.5 * mean(x) + 0.5 * x[i_k]`` for K distinct rows ``i_k`` drawn with the workload's
    seed (clipped to [0.05, 0.95] for probabilities, plus 0.1 for rates)."""
    rng = np.random.default_rng(w.seed + 1000)
    idx = rng.choice(x.shape[0], size=w.k, replace=False)
    centre = 0.5 * x.mean(axis=0)[None] + 0.5 * x[idx]
    weights = np.full(w.k, 1.0 / w.k)
    if w.family == "bernoulli":
        return {"weights": weights, "probs": np.clip(centre, 0.05, 0.95)}
    return {"weights": weights, "rates": centre + 0.1}


def gmm_init(w: Workload, x: np.ndarray) -> dict:
    """``ej.models.GaussianMixture.initialize(jax.random.key(seed), x, K, covariance_type)``
    in float64; if that fails (e.g. out of memory), the same on the first ``INIT_SUBSAMPLE``
    rows, with a note saying so."""
    import jax

    import elbo_jax as ej

    note = "ej.models.GaussianMixture.initialize(jax.random.key(seed), x, K, covariance_type)"
    try:
        model = ej.models.GaussianMixture.initialize(
            jax.random.key(w.seed), x, w.k, covariance_type=w.covariance_type
        )
    except Exception as err:  # noqa: BLE001 - any failure: fall back and say why
        model = ej.models.GaussianMixture.initialize(
            jax.random.key(w.seed), x[:INIT_SUBSAMPLE], w.k, covariance_type=w.covariance_type
        )
        reason = str(err).splitlines()[0][:200]
        note = (
            f"initialize on the full data failed ({type(err).__name__}: {reason}); "
            f"started from initialize on x[:{INIT_SUBSAMPLE}] instead"
        )
    params = {
        "weights": np.asarray(model.weights, np.float64),
        "means": np.asarray(model.means, np.float64),
        "covariances": np.asarray(model.covariances, np.float64),
    }
    params["weights"] = params["weights"] / params["weights"].sum()
    return {"params": params, "note": note}


def load_init(w: Workload, n: int) -> tuple[dict[str, np.ndarray], str]:
    """The cached start: ``(params, note)``; raises ``FileNotFoundError`` if not made yet."""
    with np.load(init_path(w, n)) as f:
        params = {key: f[key] for key in f.files if key != "note"}
        note = str(f["note"])
    return params, note


def save_init(w: Workload, n: int, params: dict[str, np.ndarray], note: str) -> None:
    path = init_path(w, n)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, note=np.array(note), **params)
    os.replace(tmp, path)
