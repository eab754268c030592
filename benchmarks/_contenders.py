"""The contenders: elbo_jax (built-in models, a user-written model, gradient M-steps), a
hand-written JAX EM, dynamax (JAX), and the CPU peers of ``_peers.py`` (scikit-learn,
pomegranate, hmmlearn, pykalman). Each ``run_*`` takes a task, the data and the shared start
and returns timings, the final parameters (float64 NumPy) and notes.

Timing rules (see benchmarks/README.md): elbo_jax, the hand-written EM and dynamax are timed
on a first call (compilation included) and on warm calls (best of up to ``max_repeats``);
the CPU peers on whole ``fit`` calls.
"""

import contextlib
import functools
import math
import time

import numpy as np

from . import _peers
from ._score import LGSSM_KEYS

GRADIENT_METHODS = {  # name -> (optimizer factory, num_steps); built lazily (no optax at import)
    "adam(1e-2) x1": ("adam", 1e-2, 1),
    "adam(1e-2) x10": ("adam", 1e-2, 10),
    "sgd(1e-2, momentum 0.9) x1": ("sgd", 1e-2, 1),
    "lbfgs x5": ("lbfgs", None, 5),
}


def _now() -> float:
    return time.perf_counter()


def _repeats(first_s: float, task: dict) -> int:
    return task["max_repeats"] if first_s < task["cheap_s"] else 1


# --------------------------------------------------------------------------- elbo_jax
def _user_model_class():
    import jax
    import jax.numpy as jnp
    import jax.scipy.special as jss

    import elbo_jax as ej

    class UserPoissonMixture(ej.Model):
        """A Poisson mixture written as a user would: parameters, a latent, a log-joint.

        No hooks: ``ej.fit`` enumerates the K states with ``vmap`` and, having no closed
        form, solves each M-step numerically.
        """

        weight_logits: jax.Array  # (K,) log mixing weights up to a constant
        log_rates: jax.Array  # (K, D)
        latent = ej.Discrete(8)

        def log_joint(self, x, z):  # one datum x (D,) of counts, one component z
            log_rate = self.log_rates[z]
            log_pi = jax.nn.log_softmax(self.weight_logits)[z]
            return log_pi + jnp.sum(x * log_rate - jnp.exp(log_rate) - jss.gammaln(x + 1.0))

    return UserPoissonMixture


@functools.cache
def user_model_class():
    return _user_model_class()


def _ej_model(task: dict, init: dict, dtype):
    import jax.numpy as jnp

    import elbo_jax as ej

    p = {key: np.asarray(v, dtype) for key, v in init.items()}
    family, contender = task["family"], task["contender"]
    if family == "gmm":
        return ej.models.GaussianMixture(
            p["weights"] / p["weights"].sum(),
            p["means"],
            p["covariances"],
            covariance_type=task["covariance_type"],
            reg_covar=1e-6,
        )
    if family == "bernoulli":
        return ej.models.BernoulliMixture(p["weights"] / p["weights"].sum(), p["probs"])
    if contender == "elbo_jax-generic" or task.get("generic"):
        cls = user_model_class()
        return cls(jnp.log(jnp.asarray(p["weights"])), jnp.log(jnp.asarray(p["rates"])))
    return ej.models.PoissonMixture(p["weights"] / p["weights"].sum(), p["rates"])


def _ej_params(model) -> dict:
    import jax

    if hasattr(model, "covariances"):
        keys = {"weights": model.weights, "means": model.means, "covariances": model.covariances}
    elif hasattr(model, "probs"):
        keys = {"weights": model.weights, "probs": model.probs}
    elif hasattr(model, "rates"):
        keys = {"weights": model.weights, "rates": model.rates}
    else:  # the user model
        keys = {
            "weights": jax.nn.softmax(model.weight_logits),
            "rates": jax.numpy.exp(model.log_rates),
        }
    return {key: np.asarray(v, np.float64) for key, v in keys.items()}


def _m_step(method: str | None):
    import optax

    import elbo_jax as ej

    if method is None:
        return "exact"
    name, lr, steps = GRADIENT_METHODS[method]
    if name == "adam":
        opt = optax.adam(lr)
    elif name == "sgd":
        opt = optax.sgd(lr, momentum=0.9)
    else:
        opt = optax.lbfgs()
    return ej.GradientMStep(opt, num_steps=steps)


def _fit_timed(model, xj, iters: int, method: str | None, task: dict, repeats: bool = True):
    import jax

    import elbo_jax as ej

    def call():
        t = _now()
        res = ej.fit(model, xj, m_step=_m_step(method), max_iters=iters, tol=0.0)
        jax.block_until_ready(res)
        return res, _now() - t

    res, first = call()
    warm = []
    for _ in range(_repeats(first, task) if repeats else 1):
        res, dt = call()
        warm.append(dt)
    return res, first, warm


def _device_peak_mib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def run_elbo_jax(task: dict, x: np.ndarray, init: dict) -> dict:
    """An exact-EM fit with ``ej.fit`` (the built-in model, or the user model when the
    contender is ``elbo_jax-generic``)."""
    import jax.numpy as jnp

    if task["family"] in ("hmm", "lgssm"):
        return run_elbo_jax_sequences(task, x, init)

    xj = jnp.asarray(x)
    model = _ej_model(task, init, x.dtype)
    res, first, warm = _fit_timed(model, xj, task["iters"], None, task)
    return dict(
        _fit_report(res, first, warm),
        num_increases=res.num_increases,
        device_peak_mib=_device_peak_mib(),
    )


def _fit_report(res, first: float, warm: list) -> dict:
    """What every elbo_jax row reports of a timed fit."""
    return {
        "params": _ej_params(res.model),
        "first_s": first,
        "warm_s": warm,
        "iters": res.num_iters,
        "status": res.status.name,
        "history": np.asarray(res.history, np.float64).tolist(),
    }


def run_gradients(task: dict, x: np.ndarray, init: dict) -> dict:
    """Every gradient M-step method of ``GRADIENT_METHODS`` from the same start, for the
    same number of iterations: first call and one warm call each, with the ELBO history."""
    import jax.numpy as jnp

    xj = jnp.asarray(x)
    out = {}
    for method in task["methods"]:
        model = _ej_model(dict(task, generic=task["family"] == "poisson"), init, x.dtype)
        try:
            res, first, warm = _fit_timed(model, xj, task["iters"], method, task, repeats=False)
        except Exception as err:  # noqa: BLE001 - one failing optimizer must not sink the rest
            out[method] = {"status": f"failed: {type(err).__name__}: {str(err)[:200]}"}
            continue
        out[method] = _fit_report(res, first, warm)
    return {"methods": out}


# --------------------------------------------------------------------------- sequences


@contextlib.contextmanager
def count_compiles():
    """Collect the names of the functions XLA compiles inside the block (as
    tests/test_solvers.py's ``_count_compiles``)."""
    import jax

    names: list = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _ej_sequence_model(task: dict, init: dict, dtype):
    import elbo_jax as ej

    p = {key: np.asarray(v, dtype) for key, v in init.items()}
    if task["family"] == "hmm":
        return ej.models.GaussianHMM(
            p["initial_probs"],
            p["transition_matrix"],
            p["means"],
            p["covariances"],
            covariance_type=task["covariance_type"],
        )
    cls = getattr(ej.models, "LinearGaussianSSM", None)
    if cls is None:
        raise RuntimeError("not available: this elbo_jax has no ej.models.LinearGaussianSSM")
    return cls(*(p[key] for key in LGSSM_KEYS))


def _ej_sequence_params(model, family: str) -> dict:
    if family == "hmm":
        keys = {
            "initial_probs": model.initial_probs,
            "transition_matrix": model.transition_matrix,
            "means": model.means,
            "covariances": model.covariances,
        }
    else:
        keys = {key: getattr(model, key) for key in LGSSM_KEYS}
    return {key: np.asarray(v, np.float64) for key, v in keys.items()}


def run_elbo_jax_sequences(task: dict, x, init: dict) -> dict:
    """``ej.fit(model, x, max_iters=iters, tol=0)`` on ``(N, T, D)`` (equal lengths) or on
    ``ej.Sequences.from_list(list_of_arrays)`` (ragged). On ragged data, one more fit on
    the same padded frames with new lengths counts XLA compilations (expected: none)."""
    import jax
    import jax.numpy as jnp

    import elbo_jax as ej

    from . import _workloads

    family = task["family"]
    if x.equal_lengths:
        data = jnp.asarray(x.frames)
    else:
        data = ej.Sequences.from_list(x.to_list())  # what a user with a list of arrays does
    model = _ej_sequence_model(task, init, x.dtype)
    with count_compiles() as names:
        res, first, warm = _fit_timed(model, data, task["iters"], None, task)
    out = {
        "params": _ej_sequence_params(res.model, family),
        "first_s": first,
        "warm_s": warm,
        "iters": res.num_iters,
        "status": res.status.name,
        "history": np.asarray(res.history, np.float64).tolist(),
        "device_peak_mib": _device_peak_mib(),
        "extra": {"compiles_in_timed_fits": len(names)},
    }
    if not x.equal_lengths:
        w = _workloads.WORKLOADS[task["workload"]]
        t = x.frames.shape[1]
        rng = np.random.default_rng(w.seed + 2000)
        lengths = rng.integers(min(w.min_seq_len, t), t + 1, size=x.num_sequences)
        other = ej.Sequences(data.frames, lengths)
        with count_compiles() as names:
            start = _now()
            jax.block_until_ready(ej.fit(model, other, max_iters=task["iters"], tol=0.0))
            took = _now() - start
        out["extra"].update(
            new_lengths_compiles=len(names),
            new_lengths_compiled=names[:10],
            new_lengths_s=took,
            new_lengths_vs_warm=took / min(warm),
        )
        out["note"] = (
            f"a fit on new lengths (same padded size {t}) compiled {len(names)} time(s) and "
            f"took {took / min(warm):.2f}x the warm fit"
        )
    return out


DYNAMAX_DIRICHLET_EPS = 1e-6


def _dynamax_model_and_params(task: dict, x, init: dict):
    """A dynamax model doing maximum-likelihood EM (its priors made flat) and its
    parameters at the shared start, in ``x``'s dtype."""
    import jax.numpy as jnp

    dt = x.dtype

    def a(v):
        return jnp.asarray(np.asarray(v, np.float64), dt)

    if task["family"] == "hmm":
        from dynamax.hidden_markov_model import GaussianHMM

        k, d = init["means"].shape
        # As close to maximum likelihood as dynamax allows: Dirichlet(1 + 1e-6) on the
        # chain (mode ~ counts / total, as hmmlearn's; with exactly 1, tfp's Dirichlet mode
        # is NaN as soon as a count underflows to 0, which happens within a few iterations
        # to the initial probabilities); the NIW prior on the emissions with concentration
        # 0 and scale 0 (ML means) and the smallest df its inverse-Wishart accepts, D
        # (extra_df = 0), so Σ_k = S_k / (N_k + 2D + 2) instead of S_k / N_k.
        model = GaussianHMM(
            k,
            d,
            initial_probs_concentration=1.0 + DYNAMAX_DIRICHLET_EPS,
            transition_matrix_concentration=1.0 + DYNAMAX_DIRICHLET_EPS,
            emission_prior_mean=0.0,
            emission_prior_concentration=0.0,
            emission_prior_scale=0.0,
            emission_prior_extra_df=0.0,
        )
        params, props = model.initialize(
            initial_probs=a(init["initial_probs"]),
            transition_matrix=a(init["transition_matrix"]),
            emission_means=a(init["means"]),
            emission_covariances=a(init["covariances"]),
        )
        return model, params, props
    from dynamax.linear_gaussian_ssm import LinearGaussianSSM

    s = init["initial_mean"].shape[0]
    o = init["observation_matrix"].shape[0]
    model = LinearGaussianSSM(s, o, has_dynamics_bias=False, has_emissions_bias=False)
    params, props = model.initialize(
        initial_mean=a(init["initial_mean"]),
        initial_covariance=a(init["initial_covariance"]),
        dynamics_weights=a(init["transition_matrix"]),
        dynamics_covariance=a(init["transition_covariance"]),
        emission_weights=a(init["observation_matrix"]),
        emission_covariance=a(init["observation_covariance"]),
    )
    return model, params, props


def _dynamax_params(params, family: str) -> dict:
    if family == "hmm":
        keys = {
            "initial_probs": params.initial.probs,
            "transition_matrix": params.transitions.transition_matrix,
            "means": params.emissions.means,
            "covariances": params.emissions.covs,
        }
    else:
        keys = {
            "initial_mean": params.initial.mean,
            "initial_covariance": params.initial.cov,
            "transition_matrix": params.dynamics.weights,
            "transition_covariance": params.dynamics.cov,
            "observation_matrix": params.emissions.weights,
            "observation_covariance": params.emissions.cov,
        }
    return {key: np.asarray(v, np.float64) for key, v in keys.items()}


def run_dynamax(task: dict, x, init: dict) -> dict:
    """dynamax's ``fit_em(params, props, y, num_iters, verbose=False)`` inside one
    ``jax.jit`` (dynamax's own ``fit_em`` jits a fresh closure per call, so a plain second
    call traces and compiles again), on the ``(N, T, D)`` batch: timed as elbo_jax, first
    call and warm calls. Ragged sequences go in padded to the longest (dynamax has no
    lengths): not the same problem, so the row's log-likelihood is not compared."""
    import jax
    import jax.numpy as jnp

    family = task["family"]
    # float32: JAX's 32-bit mode for the whole fit, as a float32 user runs dynamax (with
    # 64-bit types enabled, its tfp distributions mix float32 and float64 and fail)
    with jax.enable_x64(x.dtype == np.float64):
        model, params, props = _dynamax_model_and_params(task, x, init)
        y = jnp.asarray(x.frames)
        fit = jax.jit(
            lambda p, data: model.fit_em(p, props, data, num_iters=task["iters"], verbose=False)
        )

        def call():
            t = _now()
            out = jax.block_until_ready(fit(params, y))
            return out, _now() - t

        (fitted, log_probs), first = call()
        warm = []
        for _ in range(_repeats(first, task)):
            (fitted, log_probs), dt = call()
            warm.append(dt)
    out = {
        "params": _dynamax_params(fitted, family),
        "first_s": first,
        "warm_s": warm,
        "iters": task["iters"],
        "status": "MAX_ITERS",
        "device_peak_mib": _device_peak_mib(),
    }
    notes = []
    lp = np.asarray(log_probs, np.float64)
    if family == "lgssm":  # no prior: log_probs are the log-likelihoods before each M-step
        out["history"] = (lp / x.num_frames).tolist()
    bad = np.flatnonzero(~np.isfinite(lp))
    if family == "lgssm" and bad.size:
        # log_probs[i]: the log-likelihood of the parameters after i M-steps
        notes.append(
            f"log-likelihood NaN from iteration {int(bad[0]) + 1}'s E-step on (the parameters "
            f"after {int(bad[0])} M-step(s))"
            + (
                "; dynamax 1.0.3's M-step sets the initial covariance to "
                "(Σ E[z0 z0ᵀ] − (Σ E[z0])(Σ E[z0])ᵀ) / N, not positive definite for a batch "
                "of N > 1 sequences"
                if x.num_sequences > 1
                else ""
            )
        )
    if not all(np.all(np.isfinite(v)) for v in out["params"].values()):
        notes.append("final parameters not finite")
    if family == "hmm":
        notes.append(
            "MAP, not ML: dynamax's emission prior cannot be made flat (its inverse-Wishart "
            "needs df >= D), covariances S_k / (N_k + 2D + 2) instead of S_k / N_k; "
            f"Dirichlet(1 + {DYNAMAX_DIRICHLET_EPS:g}) on the chain"
        )
    if not x.equal_lengths:
        out["comparable"] = False
        notes.append(
            f"padded to the longest sequence ({x.frames.shape[1]} frames, "
            f"{x.frames.shape[0] * x.frames.shape[1]:,} frames in all for {x.num_frames:,} real): "
            "dynamax has no ragged sequences, so it fits the padding too; a different problem, "
            "timing only (log-lik of its parameters on the real frames shown, not compared)"
        )
    out["note"] = "; ".join(notes) or None
    return out


# --------------------------------------------------------------------------- hand-written EM
@functools.cache
def _hand_em_fn():
    import jax
    import jax.numpy as jnp
    import jax.scipy.special as jss

    @functools.partial(jax.jit, static_argnames=("num_iters",))
    def hand_em(x, weights, rates, *, num_iters: int, min_rate: float = 1e-6):
        """Closed-form EM for a Poisson mixture: ``num_iters`` (M-step, E-step) pairs after
        a first E-step, as ``ej.fit`` counts them. Returns the final weights and rates and the
        mean log-likelihood after each iteration. One matmul per E-step (the (N, K) table)
        and one per M-step (the (K, D) sums); ``log x!`` is computed once."""
        n = x.shape[0]
        log_fact = jnp.sum(jss.gammaln(x + 1.0), axis=1, keepdims=True)  # (N, 1)

        def e_step(log_w, log_rates):
            table = x @ log_rates.T + (log_w - jnp.sum(jnp.exp(log_rates), axis=1))[None, :]
            lse = jax.nn.logsumexp(table, axis=1, keepdims=True)
            loglik = jnp.mean(lse - log_fact)
            return jnp.exp(table - lse), loglik

        def body(i, carry):
            log_w, log_rates, resp, history = carry
            counts = jnp.sum(resp, axis=0)
            sums = resp.T @ x
            ok = counts > jnp.finfo(x.dtype).tiny
            safe = jnp.where(ok, counts, 1.0)
            new_rates = jnp.log(jnp.maximum(sums / safe[:, None], min_rate))
            log_rates = jnp.where(ok[:, None], new_rates, log_rates)
            log_w = jnp.log(jnp.maximum(counts, jnp.finfo(x.dtype).tiny)) - math.log(n)
            resp, loglik = e_step(log_w, log_rates)
            return log_w, log_rates, resp, history.at[i].set(loglik)

        log_w, log_rates = jnp.log(weights), jnp.log(rates)
        resp, _ = e_step(log_w, log_rates)
        history = jnp.full((num_iters,), jnp.nan, x.dtype)
        log_w, log_rates, _, history = jax.lax.fori_loop(
            0, num_iters, body, (log_w, log_rates, resp, history)
        )
        return jnp.exp(log_w), jnp.exp(log_rates), history

    return hand_em


def run_hand_em(task: dict, x: np.ndarray, init: dict) -> dict:
    import jax
    import jax.numpy as jnp

    xj = jnp.asarray(x)
    w = jnp.asarray(np.asarray(init["weights"], x.dtype))
    r = jnp.asarray(np.asarray(init["rates"], x.dtype))
    fn = _hand_em_fn()

    def call():
        t = _now()
        out = jax.block_until_ready(fn(xj, w, r, num_iters=task["iters"]))
        return out, _now() - t

    out, first = call()
    warm = []
    for _ in range(_repeats(first, task)):
        out, dt = call()
        warm.append(dt)
    weights, rates, history = (np.asarray(a, np.float64) for a in out)
    return {
        "params": {"weights": weights, "rates": rates},
        "first_s": first,
        "warm_s": warm,
        "iters": task["iters"],
        "status": "MAX_ITERS",
        "history": history.tolist(),
        "device_peak_mib": _device_peak_mib(),
    }


RUNNERS = {
    "elbo_jax": run_elbo_jax,
    "elbo_jax-generic": run_elbo_jax,
    "hand-em": run_hand_em,
    "sklearn": _peers.run_sklearn,
    "pomegranate": lambda task, x, init: (
        _peers.run_pomegranate_hmm if task["family"] == "hmm" else _peers.run_pomegranate
    )(task, x, init),
    "gradients": run_gradients,
    "dynamax": run_dynamax,
    "hmmlearn": _peers.run_hmmlearn,
    "pykalman": _peers.run_pykalman,
}
