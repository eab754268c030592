"""The peers: scikit-learn ``GaussianMixture``, pomegranate ``GeneralMixtureModel`` and
``DenseHMM``, hmmlearn ``GaussianHMM`` and pykalman ``KalmanFilter``, from the shared start,
for the same number of iterations.

Each is timed on whole ``fit`` calls (best of up to ``peer_repeats``, repeated only when a
fit is cheap) after an untimed warm-up fit on a slice. A one-iteration fit on the full data
predicts the cost: a peer predicted to exceed ``peer_budget_s`` reports that fit instead
(flagged, its log-likelihood then not comparable).
"""

import math
import time
import warnings

import numpy as np

PROBE_ROWS = 2_000


def _now() -> float:
    return time.perf_counter()


def _peer_timed(make_and_fit, x, task: dict, probe=None) -> dict:
    """Warm up on a slice, time a one-iteration fit on the full data, then the full fit.

    The one-iteration fit (set-up, one iteration, any final pass) predicts the cost of the
    full fit from above. A peer predicted to exceed ``peer_budget_s`` is not run further:
    its row reports the one-iteration fit, flagged (its log-likelihood is then not
    comparable). Probes on a slice proved unreliable both ways (thread start-up dominates
    small fits; memory traffic makes big ones slower than linear).
    """
    iters, budget = task["iters"], task["peer_budget_s"]
    # warm-up: first-call costs (torch) stay out of the timing. ``probe``: the warm-up data
    # when the first rows of ``x`` are not (sequences).
    make_and_fit(x[:PROBE_ROWS] if probe is None else probe, 1)
    t = _now()
    fitted = make_and_fit(x, 1)
    one = _now() - t
    if iters > 1 and one * iters > budget:
        note = (
            f"ran 1 of {iters} iterations (a one-iteration fit took {one:.1f} s, so "
            f"{iters} would exceed the {budget:.0f} s budget); s/it includes the fit's "
            "fixed costs; log-likelihood not comparable"
        )
        return {"fitted": fitted, "first_s": None, "warm_s": [one], "iters": 1, "note": note}
    t = _now()
    fitted = make_and_fit(x, iters)
    times = [_now() - t]
    if times[0] < task["peer_cheap_s"]:
        for _ in range(task["peer_repeats"] - 1):
            t = _now()
            fitted = make_and_fit(x, iters)
            times.append(_now() - t)
    return {"fitted": fitted, "first_s": None, "warm_s": times, "iters": iters, "note": None}


def run_sklearn(task: dict, x: np.ndarray, init: dict) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    dt = x.dtype
    cov = np.asarray(init["covariances"], np.float64)
    if task["covariance_type"] == "full":
        prec = np.linalg.inv(cov)
        prec = 0.5 * (prec + np.swapaxes(prec, 1, 2))
    else:
        prec = 1.0 / cov
    w = np.asarray(init["weights"], np.float64)
    kwargs = dict(
        n_components=w.shape[0],
        covariance_type=task["covariance_type"],
        tol=0.0,
        reg_covar=1e-6,
        n_init=1,
        init_params="random_from_data",  # cheapest; the given start overrides it
        weights_init=(w / w.sum()).astype(dt),
        means_init=np.asarray(init["means"], dt),
        precisions_init=prec.astype(dt),
        random_state=0,
    )

    def make_and_fit(xs, iters):
        gm = GaussianMixture(max_iter=iters, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(xs)
        return gm

    out = _peer_timed(make_and_fit, x, task)
    gm = out.pop("fitted")
    out["params"] = {
        "weights": np.asarray(gm.weights_, np.float64),
        "means": np.asarray(gm.means_, np.float64),
        "covariances": np.asarray(gm.covariances_, np.float64),
    }
    out["status"] = "converged" if gm.converged_ else "MAX_ITERS"
    out["compute_dtype"] = str(gm.means_.dtype)
    return out


def run_pomegranate(task: dict, x: np.ndarray, init: dict) -> dict:
    import torch
    from pomegranate.distributions import Bernoulli, Normal, Poisson
    from pomegranate.gmm import GeneralMixtureModel

    tdt = torch.float64 if x.dtype == np.float64 else torch.float32
    family = task["family"]

    def tensor(a):
        return torch.tensor(np.asarray(a, np.float64), dtype=tdt)

    w = np.asarray(init["weights"], np.float64)

    def make_and_fit(xs, iters):
        if family == "gmm":
            dists = [
                Normal(means=tensor(m), covs=tensor(c), covariance_type=task["covariance_type"])
                for m, c in zip(init["means"], init["covariances"], strict=True)
            ]
        elif family == "bernoulli":
            dists = [Bernoulli(probs=tensor(p)) for p in init["probs"]]
        else:
            dists = [Poisson(lambdas=tensor(r)) for r in init["rates"]]
        # tol=-inf: pomegranate stops when the improvement is < tol, and with tol=0 a
        # rounding-size decrease would stop it early; -inf runs exactly max_iter iterations.
        gm = GeneralMixtureModel(dists, priors=tensor(w / w.sum()), max_iter=iters, tol=-math.inf)
        gm.fit(torch.from_numpy(np.ascontiguousarray(xs)))
        return gm

    out = _peer_timed(make_and_fit, x, task)
    gm = out.pop("fitted")

    def arr(t):
        return t.detach().cpu().numpy().astype(np.float64)

    params = {"weights": arr(gm.priors)}
    if family == "gmm":
        params["means"] = np.stack([arr(d.means) for d in gm.distributions])
        params["covariances"] = np.stack([arr(d.covs) for d in gm.distributions])
    elif family == "bernoulli":
        params["probs"] = np.stack([arr(d.probs) for d in gm.distributions])
    else:
        params["rates"] = np.stack([arr(d.lambdas) for d in gm.distributions])
    out["params"] = params
    out["status"] = "MAX_ITERS"
    if gm.dtype != tdt:  # GeneralMixtureModel.dtype is that of its float32 `_device` parameter
        emission = f"(N, K) log-probability matrix in {str(gm.dtype).replace('torch.', '')}"
        out["note"] = emission if out["note"] is None else f"{out['note']}; {emission}"
    return out


# --------------------------------------------------------------------------- sequences
def _probe_sequences(x) -> np.ndarray:
    """Warm-up data for the sequence peers: two short sequences."""
    return x.frames[:2, :100]


def run_hmmlearn(task: dict, x, init: dict) -> dict:
    """hmmlearn ``GaussianHMM(covariance_type="full", covars_prior=0, init_params="",
    params="stmc", implementation="log", tol=0)`` from the shared start, ``fit`` on the
    concatenated frames with the lengths."""
    from hmmlearn.hmm import GaussianHMM

    k = init["means"].shape[0]
    frames, lengths = x.concatenated(), np.asarray(x.lengths)

    def make_and_fit(data, iters):
        xs, ls = data
        hmm = GaussianHMM(
            n_components=k,
            covariance_type=task["covariance_type"],
            covars_prior=0,
            init_params="",
            params="stmc",
            implementation="log",
            n_iter=iters,
            tol=0,
        )
        hmm.startprob_ = np.asarray(init["initial_probs"], np.float64)
        hmm.transmat_ = np.asarray(init["transition_matrix"], np.float64)
        hmm.means_ = np.asarray(init["means"], np.float64)
        hmm.covars_ = np.asarray(init["covariances"], np.float64)
        hmm.fit(xs, ls)
        return hmm

    probe = _probe_sequences(x)
    out = _peer_timed(
        make_and_fit,
        (frames, lengths),
        task,
        probe=(probe.reshape(-1, probe.shape[-1]), [probe.shape[1]] * probe.shape[0]),
    )
    hmm = out.pop("fitted")
    ran = int(hmm.monitor_.iter)
    if out["iters"] == task["iters"] and ran != task["iters"]:  # tol=0 stops on a decrease
        out["iters"] = ran
        stop = f"stopped after {ran} of {task['iters']} iterations (tol=0: a decrease)"
        out["note"] = stop if out["note"] is None else f"{out['note']}; {stop}"
    out["params"] = {
        "initial_probs": np.asarray(hmm.startprob_, np.float64),
        "transition_matrix": np.asarray(hmm.transmat_, np.float64),
        "means": np.asarray(hmm.means_, np.float64),
        "covariances": np.asarray(hmm.covars_, np.float64),
    }
    out["status"] = "MAX_ITERS"
    out["history"] = [float(v) / x.num_frames for v in hmm.monitor_.history]
    out["compute_dtype"] = str(hmm.means_.dtype)
    return out


def run_pomegranate_hmm(task: dict, x, init: dict) -> dict:
    """pomegranate 1.x ``DenseHMM`` of full-covariance ``Normal``s from the shared start on
    the ``(N, T, D)`` tensor (sequences of equal length), on CPU torch."""
    import torch
    from pomegranate.distributions import Normal
    from pomegranate.hmm import DenseHMM

    if not x.equal_lengths:
        raise ValueError("the pomegranate row runs on sequences of equal length only")
    tdt = torch.float64 if x.dtype == np.float64 else torch.float32

    def tensor(a):
        return torch.tensor(np.asarray(a, np.float64), dtype=tdt)

    def make_and_fit(xs, iters):
        dists = [
            Normal(means=tensor(m), covs=tensor(c), covariance_type=task["covariance_type"])
            for m, c in zip(init["means"], init["covariances"], strict=True)
        ]
        k = len(dists)
        hmm = DenseHMM(
            dists,
            edges=tensor(init["transition_matrix"]),
            starts=tensor(init["initial_probs"]),
            ends=tensor(np.ones(k)),  # log 1 = 0: no end term in the first E-step
            max_iter=iters,
            tol=0.0,
        )
        # tol must be >= 0 at construction, and with 0 a rounding-size decrease would stop
        # the fit early; -inf afterwards runs exactly max_iter iterations.
        hmm.tol = -math.inf
        if tdt == torch.float64:
            # Its emission matrix takes the dtype of the module's first parameter, a float32
            # `_device` placeholder, and float32 emissions with float64 transitions fail in
            # forward(); .double() makes every parameter and buffer float64.
            hmm.double()
        hmm.fit(torch.from_numpy(np.ascontiguousarray(xs)))
        return hmm

    out = _peer_timed(make_and_fit, x.frames, task, probe=_probe_sequences(x))
    hmm = out.pop("fitted")

    def arr(t):
        return t.detach().cpu().numpy().astype(np.float64)

    out["params"] = {
        "initial_probs": np.exp(arr(hmm.starts)),
        "transition_matrix": np.exp(arr(hmm.edges)),  # rows: 1 - end probability
        "means": np.stack([arr(d.means) for d in hmm.distributions]),
        "covariances": np.stack([arr(d.covs) for d in hmm.distributions]),
    }
    out["status"] = "MAX_ITERS"
    ends = np.exp(arr(hmm.ends))
    why = (
        "DenseHMM also learns end probabilities (a different model: transition rows sum to "
        f"1 - p_end, p_end up to {ends.max():.1e}; scored with rows renormalised)"
    )
    out["note"] = why if out["note"] is None else f"{out['note']}; {why}"
    out["compute_dtype"] = str(hmm.dtype).replace("torch.", "")
    return out


LGSSM_EM_VARS = [
    "transition_matrices",
    "observation_matrices",
    "transition_covariance",
    "observation_covariance",
    "initial_state_mean",
    "initial_state_covariance",
]


def run_pykalman(task: dict, x, init: dict) -> dict:
    """pykalman ``KalmanFilter(...).em(y, n_iter)`` on ONE sequence (pykalman fits one
    sequence at a time; offsets fixed at 0, every other parameter learned). Its s/it is the
    time per EM iteration on one sequence times the number of sequences: the cost of the
    same amount of data. Its parameters are fitted to one sequence, so its log-likelihood
    is not comparable."""
    from pykalman import KalmanFilter

    s = init["initial_mean"].shape[0]
    o = init["observation_matrix"].shape[0]
    y0 = np.asarray(x.frames[0], np.float64)
    n = x.num_sequences

    def make_and_fit(ys, iters):
        kf = KalmanFilter(
            transition_matrices=np.asarray(init["transition_matrix"], np.float64),
            observation_matrices=np.asarray(init["observation_matrix"], np.float64),
            transition_covariance=np.asarray(init["transition_covariance"], np.float64),
            observation_covariance=np.asarray(init["observation_covariance"], np.float64),
            transition_offsets=np.zeros(s),
            observation_offsets=np.zeros(o),
            initial_state_mean=np.asarray(init["initial_mean"], np.float64),
            initial_state_covariance=np.asarray(init["initial_covariance"], np.float64),
            # pykalman's own EM diverges on this data (its Q loses symmetry and reaches
            # ~1e10 by iteration 29 of one sequence, then NaN): the row reports the failure.
            em_vars=LGSSM_EM_VARS,
        )
        return kf.em(ys, n_iter=iters)

    out = _peer_timed(make_and_fit, y0, task, probe=y0[:50])
    kf = out.pop("fitted")
    one_sequence = list(out["warm_s"])
    out["warm_s"] = [t * n for t in one_sequence]
    out["params"] = {
        "initial_mean": np.asarray(kf.initial_state_mean, np.float64),
        "initial_covariance": np.asarray(kf.initial_state_covariance, np.float64),
        "transition_matrix": np.asarray(kf.transition_matrices, np.float64),
        "transition_covariance": np.asarray(kf.transition_covariance, np.float64),
        "observation_matrix": np.asarray(kf.observation_matrices, np.float64),
        "observation_covariance": np.asarray(kf.observation_covariance, np.float64),
    }
    out["status"] = "MAX_ITERS"
    out["comparable"] = False
    why = (
        f"ONE sequence of T={y0.shape[0]} (pykalman fits one at a time): s/it = its time per "
        f"EM iteration on that sequence ({min(one_sequence) / out['iters']:.4g} s) × {n} "
        "sequences, the cost of the same amount of data; its parameters are fitted to one "
        "sequence, so its log-likelihood is not comparable"
    )
    out["note"] = why if out["note"] is None else f"{out['note']}; {why}"
    return out
