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
    # Sequence workloads ("hmm", "lgssm"): ``n`` is the number of sequences, each of
    # ``seq_len`` frames, or of a length drawn uniformly in [min_seq_len, seq_len] (ragged).
    seq_len: int | None = None
    min_seq_len: int | None = None
    # ((dtype, (contender, ...)), ...): who runs for each dtype; empty: the family's list
    contenders: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def is_sequences(self) -> bool:
        return self.seq_len is not None

    @property
    def ragged(self) -> bool:
        return self.min_seq_len is not None

    def num_data(self, scale: float) -> int:
        if not self.scalable:
            return self.n
        if self.is_sequences:  # sequences keep their length; their number scales
            return max(2, int(round(self.n * scale)))
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
        Workload(
            "hmm-gauss",
            "hmm",
            100,
            4,
            8,
            20,
            10,
            ("float64", "float32"),
            "float64",
            5,
            "Gaussian HMM, K=8 states, full covariances: N=100 sequences of T=1,000 frames in "
            "D=4 from a random sticky ground truth (0.9 on the diagonal); N counts sequences, "
            "log-lik per frame",
            covariance_type="full",
            grad_methods=(),
            seq_len=1000,
            contenders=(
                ("float64", ("elbo_jax", "hmmlearn", "dynamax", "pomegranate")),
                ("float32", ("elbo_jax", "dynamax")),
            ),
        ),
        Workload(
            "hmm-ragged",
            "hmm",
            1000,
            4,
            8,
            10,
            5,
            ("float64",),
            "float64",
            6,
            "Gaussian HMM, K=8 states, full covariances, ragged: N=1,000 sequences of lengths "
            "uniform in [200, 2,000] in D=4 from a random sticky ground truth; N counts "
            "sequences, log-lik per frame",
            covariance_type="full",
            grad_methods=(),
            seq_len=2000,
            min_seq_len=200,
            contenders=(("float64", ("elbo_jax", "hmmlearn", "dynamax")),),
        ),
        Workload(
            "lgssm",
            "lgssm",
            20,
            2,
            4,
            100,
            20,
            ("float64",),
            "float64",
            7,
            "linear-Gaussian state-space model, state dimension 4 (the K column), observations "
            "D=2: N=20 sequences of T=500 frames from a random stable ground truth (spectral "
            "radius 0.95); N counts sequences, log-lik per frame",
            grad_methods=(),
            seq_len=500,
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
    if w.is_sequences:  # (the mixtures' cache names stay as they were)
        what += [w.seq_len, w.min_seq_len]
    key = json.dumps(what)
    return f"{w.name}-n{n}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def data_path(w: Workload, n: int, dtype: str) -> Path:
    return cache_dir() / f"{_stem(w, n)}-{dtype}.npy"


def init_path(w: Workload, n: int) -> Path:
    return cache_dir() / f"{_stem(w, n)}-init.npz"


def lengths_path(w: Workload, n: int) -> Path:
    return cache_dir() / f"{_stem(w, n)}-lengths.npy"


class SeqData:
    """``N`` sequences: ``frames`` ``(N, T, D)`` padded to the longest (padding frames are
    copies of each sequence's first frame, as ``ej.Sequences.from_list`` pads) and
    ``lengths`` ``(N,)``."""

    def __init__(self, frames: np.ndarray, lengths: np.ndarray):
        self.frames = frames
        self.lengths = np.asarray(lengths, np.int64)

    @property
    def dtype(self):
        return self.frames.dtype

    @property
    def num_sequences(self) -> int:
        return self.frames.shape[0]

    @property
    def num_frames(self) -> int:
        """The real frames, ``sum(lengths)``."""
        return int(self.lengths.sum())

    @property
    def equal_lengths(self) -> bool:
        return bool(np.all(self.lengths == self.frames.shape[1]))

    def to_list(self) -> list[np.ndarray]:
        return [self.frames[i, :length] for i, length in enumerate(self.lengths)]

    def concatenated(self) -> np.ndarray:
        """The real frames one sequence after another, ``(sum(lengths), D)``."""
        if self.equal_lengths:
            return self.frames.reshape(-1, self.frames.shape[-1])
        return np.concatenate(self.to_list())


def load_data(w: Workload, n: int, dtype: str):
    """The cached data of one dtype: an array ``(N, D)`` for the mixtures, ``SeqData`` for
    the sequence workloads."""
    x = np.load(data_path(w, n, dtype))
    if not w.is_sequences:
        return x
    path = lengths_path(w, n)
    lengths = np.load(path) if path.exists() else np.full(x.shape[0], x.shape[1])
    return SeqData(x, lengths)


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


def _lengths(rng: np.random.Generator, w: Workload, n: int) -> np.ndarray:
    if w.ragged:
        return rng.integers(w.min_seq_len, w.seq_len + 1, size=n)
    return np.full(n, w.seq_len)


def _pad_with_first_frame(frames: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Padding frames (past each length) replaced by the sequence's first frame, as
    ``ej.Sequences.from_list`` pads."""
    real = np.arange(frames.shape[1])[None, :] < lengths[:, None]
    return np.where(real[..., None], frames, frames[:, :1])


def random_hmm(w: Workload) -> dict[str, np.ndarray]:
    """The ground-truth Gaussian HMM: initial probabilities Dirichlet(5), sticky transitions
    (0.9 on the diagonal, the rest Dirichlet(1)-spread over the other states), emissions as
    the GMM workloads' (means N(0, 2²), covariances ``s·AAᵀ + 0.3 I``)."""
    rng = np.random.default_rng(w.seed)
    k = w.k
    initial = rng.dirichlet(np.full(k, 5.0))
    transition = np.zeros((k, k))
    for i in range(k):
        others = [j for j in range(k) if j != i]
        transition[i, others] = 0.1 * rng.dirichlet(np.ones(k - 1))
        transition[i, i] = 0.9
    _, means, covs = _random_gmm(rng, w)
    return {"initial": initial, "transition": transition, "means": means, "covariances": covs}


def _sample_hmm(rng: np.random.Generator, w: Workload, n: int) -> SeqData:
    truth = random_hmm(w)
    lengths = _lengths(rng, w, n)
    t_max = int(lengths.max())
    cum = np.cumsum(truth["transition"], axis=1)
    z = np.empty((n, t_max), np.int64)
    z[:, 0] = rng.choice(w.k, size=n, p=truth["initial"])
    u = rng.random((n, t_max))
    for t in range(1, t_max):  # inverse-CDF draws, all sequences at once
        z[:, t] = np.minimum((cum[z[:, t - 1]] < u[:, t, None]).sum(axis=1), w.k - 1)
    chol = np.linalg.cholesky(truth["covariances"])
    eps = rng.standard_normal((n, t_max, w.d))
    frames = truth["means"][z] + np.einsum("ntij,ntj->nti", chol[z], eps)
    return SeqData(_pad_with_first_frame(frames, lengths), lengths)


def random_lgssm(w: Workload) -> dict[str, np.ndarray]:
    """The ground-truth linear-Gaussian SSM (state ``w.k``, observations ``w.d``): a
    Gaussian transition matrix scaled to spectral radius 0.95, covariances ``0.1·(BBᵀ/S +
    0.5 I)`` (transition) and ``0.5·(CCᵀ/O + 0.5 I)`` (observation), ``H`` Gaussian,
    initial state N(N(0, 1), I)."""
    rng = np.random.default_rng(w.seed)
    s, o = w.k, w.d
    a = rng.normal(size=(s, s))
    f = 0.95 * a / np.max(np.abs(np.linalg.eigvals(a)))
    b = rng.normal(size=(s, s))
    c = rng.normal(size=(o, o))
    return {
        "initial_mean": rng.normal(size=s),
        "initial_covariance": np.eye(s),
        "transition_matrix": f,
        "transition_covariance": 0.1 * (b @ b.T / s + 0.5 * np.eye(s)),
        "observation_matrix": rng.normal(size=(o, s)),
        "observation_covariance": 0.5 * (c @ c.T / o + 0.5 * np.eye(o)),
    }


def _sample_lgssm(rng: np.random.Generator, w: Workload, n: int) -> SeqData:
    p = random_lgssm(w)
    t_max = w.seq_len
    lq = np.linalg.cholesky(p["transition_covariance"])
    lr = np.linalg.cholesky(p["observation_covariance"])
    z = (
        p["initial_mean"]
        + rng.standard_normal((n, w.k)) @ np.linalg.cholesky(p["initial_covariance"]).T
    )
    y = np.empty((n, t_max, w.d))
    for t in range(t_max):
        y[:, t] = z @ p["observation_matrix"].T + rng.standard_normal((n, w.d)) @ lr.T
        z = z @ p["transition_matrix"].T + rng.standard_normal((n, w.k)) @ lq.T
    return SeqData(y, np.full(n, t_max))


def make_data(w: Workload, n: int):
    """The workload's float64 data, ``(n, D)`` or ``SeqData`` (deterministic in ``w.seed``)."""
    rng = np.random.default_rng(w.seed)
    if w.family == "gmm":
        return _sample_gmm(rng, w, n)
    if w.family == "bernoulli":
        return _digits()
    if w.family == "hmm":
        return _sample_hmm(np.random.default_rng(w.seed + 1), w, n)
    if w.family == "lgssm":
        return _sample_lgssm(np.random.default_rng(w.seed + 1), w, n)
    return _sample_poisson(rng, w, n)


def prepare_data(w: Workload, n: int):
    """Write the cached ``.npy`` files (float64 and float32, and the lengths of ragged
    sequences) unless present; return the float64 data (``SeqData`` for sequences)."""
    p64 = data_path(w, n, "float64")
    if not p64.exists():
        x = make_data(w, n)
        if isinstance(x, SeqData):
            if not x.equal_lengths:
                np.save(lengths_path(w, n), x.lengths)
            x = x.frames
        np.save(p64, x)
    p32 = data_path(w, n, "float32")
    if not p32.exists():
        np.save(p32, np.load(p64).astype(np.float32))
    return load_data(w, n, "float64")


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


def hmm_init(w: Workload, x: SeqData) -> dict:
    """``ej.models.GaussianHMM.initialize(jax.random.key(seed), x, K)`` in float64 (``x``
    as ``ej.Sequences`` when ragged): k-means++ emissions, uniform initial and transition
    probabilities."""
    import jax

    import elbo_jax as ej

    data = x.frames if x.equal_lengths else ej.Sequences.from_list(x.to_list())
    model = ej.models.GaussianHMM.initialize(
        jax.random.key(w.seed), data, w.k, covariance_type=w.covariance_type
    )
    params = {
        "initial_probs": np.asarray(model.initial_probs, np.float64),
        "transition_matrix": np.asarray(model.transition_matrix, np.float64),
        "means": np.asarray(model.means, np.float64),
        "covariances": np.asarray(model.covariances, np.float64),
    }
    note = "ej.models.GaussianHMM.initialize(jax.random.key(seed), x, K)"
    return {"params": params, "note": note}


def lgssm_init(w: Workload, x: SeqData) -> dict[str, np.ndarray]:
    """The deterministic start of the LGSSM workload: ``m0 = 0``, ``P0 = I``,
    ``F = 0.9 I``, ``Q = 0.1 I``, ``H`` Gaussian (seed ``seed + 1000``) with rows scaled to
    the observations' standard deviations over ``sqrt(S)``, ``R = 0.5·diag(var(y))``."""
    rng = np.random.default_rng(w.seed + 1000)
    s = w.k
    y = x.concatenated()
    sd = y.std(axis=0)
    return {
        "initial_mean": np.zeros(s),
        "initial_covariance": np.eye(s),
        "transition_matrix": 0.9 * np.eye(s),
        "transition_covariance": 0.1 * np.eye(s),
        "observation_matrix": rng.normal(size=(w.d, s)) * (sd / np.sqrt(s))[:, None],
        "observation_covariance": np.diag(0.5 * sd**2),
    }


def make_init(w: Workload, x) -> dict:
    """The start that needs JAX (GMMs, HMMs): ``{"params", "note"}``."""
    if w.family == "hmm":
        return hmm_init(w, x)
    return gmm_init(w, x)


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
