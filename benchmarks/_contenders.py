"""The contenders: elbo_jax (built-in models, a user-written model, gradient M-steps), a
hand-written JAX EM, scikit-learn and pomegranate. Each ``run_*`` takes a task, the data
and the shared start and returns timings, the final parameters (float64 NumPy) and notes.

Timing rules (see benchmarks/README.md): elbo_jax and the hand-written EM are timed on a
first call (compilation included) and on warm calls (best of up to ``max_repeats``);
the peers (scikit-learn, pomegranate: ``_peers.py``) on whole ``fit`` calls.
"""

import functools
import math
import time

import numpy as np

from . import _peers

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
    "pomegranate": _peers.run_pomegranate,
    "gradients": run_gradients,
}
