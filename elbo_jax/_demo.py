"""The ``python -m elbo_jax demo`` command: exact EM and gradient-M-step EM on one Gaussian mixture.

Private: the command line is the interface (``elbo_jax/__main__.py``).
"""

import math
import os
import time
from typing import Any, NamedTuple, TextIO

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ._fit import FitResult, fit
from ._objective import log_evidence
from ._steps import GradientMStep

NUM_COMPONENTS = 4
MAX_ITERS = 500
TOL = 1e-6
# Gradient M-step: Adam on the model's unconstrained parameters, a few steps per E-step.
LEARNING_RATE = 0.05
NUM_M_STEPS = 5


class Run(NamedTuple):
    name: str
    result: FitResult
    first_seconds: float  # the first call: tracing, compilation and the run
    warm_seconds: float  # the same call again: the run alone
    log_likelihood: float  # (1/N) sum_n log p(x_n | theta)


def _rotated(angle: float, major: float, minor: float) -> np.ndarray:
    """A 2-D covariance: standard deviations ``major`` and ``minor``, rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return rotation @ np.diag([major**2, minor**2]) @ rotation.T


def true_mixture(dtype: Any) -> Any:
    """The data-generating mixture: four elongated 2-D components, separated but overlapping
    (so the spherical k-means++ start is visibly off and EM has work to do)."""
    from .models import GaussianMixture

    weights = jnp.array([0.3, 0.3, 0.2, 0.2], dtype)
    means = jnp.array([[-2.5, -1.0], [0.0, 2.5], [3.0, -0.5], [0.5, -3.5]], dtype)
    covariances = np.stack(
        [
            _rotated(0.6, 1.6, 0.4),
            _rotated(-0.3, 1.8, 0.4),
            _rotated(1.4, 1.5, 0.5),
            _rotated(0.2, 1.2, 0.5),
        ]
    )
    return GaussianMixture(weights, means, jnp.asarray(covariances, dtype), covariance_type="full")


# Compiled whole: one XLA program each, rather than many small eagerly dispatched ones.
_log_likelihood = eqx.filter_jit(log_evidence)


@eqx.filter_jit
def _sample(truth: Any, key: Any, num_data: int) -> Any:
    x, _ = truth.sample(key, num_data)
    return x


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _fit_twice(name: str, fn: Any, x: Any) -> Run:
    result, first = _timed(fn)
    _, warm = _timed(fn)
    return Run(name, result, first, warm, float(_log_likelihood(result.model, x)))


def _import_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "python -m elbo_jax demo draws its plot with matplotlib, which is not installed: "
            "pip install -e '.[plot]' (or pip install matplotlib)"
        ) from err
    return matplotlib


def run_demo(*, num_data: int, seed: int, out_dir: str, stream: TextIO) -> list[Run]:
    """Make the data, fit it both ways, print a summary to ``stream`` and write the plot."""
    from .models import GaussianMixture

    def say(*parts: Any) -> None:
        print(*parts, file=stream, flush=True)

    if num_data < 4 * NUM_COMPONENTS:
        raise ValueError(f"--num-data must be at least {4 * NUM_COMPONENTS}, got {num_data}")
    _import_matplotlib()  # fail before the fits, not after
    dtype = jnp.zeros(()).dtype  # float32 unless the user turned on jax_enable_x64
    data_key, init_key = jr.split(jr.key(seed))
    truth = true_mixture(dtype)
    x = _sample(truth, data_key, num_data)
    init = GaussianMixture.initialize(init_key, x, NUM_COMPONENTS, covariance_type="full")

    say(
        f"elbo_jax demo: a {NUM_COMPONENTS}-component Gaussian mixture, N={num_data}, "
        f"D={x.shape[1]}, {dtype}, backend={jax.default_backend()}, seed={seed}"
    )
    true_loglik, init_loglik = float(_log_likelihood(truth, x)), float(_log_likelihood(init, x))
    say(f"  log-likelihood per datum of the data-generating mixture: {true_loglik:.6f}")
    say(f"  log-likelihood per datum of the k-means++ start:          {init_loglik:.6f}")
    say(f"  both fits: max_iters={MAX_ITERS}, tol={TOL:g} (change in free energy per datum)")

    gradient_step = GradientMStep(optax.adam(LEARNING_RATE), num_steps=NUM_M_STEPS)
    runs = [
        _fit_twice("exact EM", lambda: fit(init, x, max_iters=MAX_ITERS, tol=TOL), x),
        _fit_twice(
            f"gradient M-step (adam {LEARNING_RATE:g} x {NUM_M_STEPS})",
            lambda: fit(init, x, m_step=gradient_step, max_iters=MAX_ITERS, tol=TOL),
            x,
        ),
    ]
    for run in runs:
        res = run.result
        say(f"{run.name}:")
        say(f"  iterations {res.num_iters}, status {res.status.name} ({res.message})")
        say(
            f"  first call (compile + run) {run.first_seconds:.2f} s, "
            f"warm second call {run.warm_seconds:.2f} s"
        )
        say(f"  final log-likelihood per datum {run.log_likelihood:.6f}")

    path = plot(runs, x, out_dir)
    say(f"wrote {path}")
    return runs


def plot(runs: list[Run], x: Any, out_dir: str) -> str:
    """ELBO per datum against iteration (and the gap to the best final value), plus the data."""
    matplotlib = _import_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "elbo_jax_demo.png")
    curves = [
        np.concatenate([[float(r.result.initial_elbo)], np.asarray(r.result.history)]) for r in runs
    ]
    best = max(c.max() for c in curves)
    floor = 16 * np.finfo(np.asarray(runs[0].result.history).dtype).eps * max(1.0, abs(best))

    fig, (ax_elbo, ax_gap, ax_data) = plt.subplots(1, 3, figsize=(16, 4.8))
    for run, curve, style in zip(runs, curves, ["-", "--"], strict=True):
        label = f"{run.name}: {run.result.num_iters} its"
        ax_elbo.plot(np.arange(len(curve)), curve, style, lw=2, label=label)
        # Below a few ulps of the ELBO the gap is rounding; leave those points out.
        gap = best - curve
        gap = np.where(gap > floor, gap, np.nan)
        ax_gap.semilogy(np.arange(len(curve)), gap, style, lw=2, label=label)
    lo = min(c.min() for c in curves)
    ax_elbo.set_ylim(lo - 0.05 * (best - lo), best + 0.05 * (best - lo) + 1e-12)
    ax_elbo.set(xlabel="EM iteration", ylabel="ELBO per datum  (= -F)", title="ELBO per datum")
    ax_gap.set(
        xlabel="EM iteration",
        ylabel="best final ELBO - ELBO",
        title="distance to the best final ELBO",
    )
    for ax in (ax_elbo, ax_gap):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)

    model = runs[0].result.model
    x_np = np.asarray(x, np.float64)
    labels = np.asarray(model.predict(x))
    shown = slice(0, min(len(x_np), 5000))
    ax_data.scatter(
        x_np[shown, 0],
        x_np[shown, 1],
        c=labels[shown],
        s=3,
        cmap="tab10",
        vmin=0,
        vmax=9,
        alpha=0.5,
    )
    means = np.asarray(model.means, np.float64)
    covariances = np.asarray(model.covariances, np.float64)
    if covariances.ndim == 2:
        covariances = np.stack([np.diag(c) for c in covariances])
    angle = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(angle), np.sin(angle)])
    for k in range(len(means)):
        chol = np.linalg.cholesky(covariances[k][:2, :2])
        for radius in (1.0, 2.0):
            ring = means[k][:2, None] + radius * chol @ circle
            ax_data.plot(ring[0], ring[1], "k-", lw=1.2 if radius == 1 else 0.7)
    ax_data.plot(means[:, 0], means[:, 1], "k+", ms=12, mew=2)
    ax_data.set(title=f"{runs[0].name}: clusters and 1σ, 2σ ellipses", xlabel="x₁", ylabel="x₂")
    ax_data.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
