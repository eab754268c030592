r"""One scoring function per model family: the mean log-likelihood per datum,
$\frac1N \sum_n \log \sum_k \pi_k\, p(x_n \mid \theta_k)$ for the mixtures, per frame for
the sequence models (forward algorithm, Kalman filter), in NumPy/SciPy float64.

Every contender's returned parameters go through the same function, so log-likelihoods
and their differences do not depend on how each library evaluates its own objective.
Non-finite parameters score NaN.
"""

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import gammaln, logsumexp, xlog1py, xlogy

_LOG_2PI = np.log(2 * np.pi)
LGSSM_KEYS = (
    "initial_mean",
    "initial_covariance",
    "transition_matrix",
    "transition_covariance",
    "observation_matrix",
    "observation_covariance",
)
_CHUNK = 65_536


def _finite(*arrays: np.ndarray) -> bool:
    return all(np.all(np.isfinite(a)) for a in arrays)


def _mean_logsumexp(x: np.ndarray, table_fn) -> float:
    total = 0.0
    for start in range(0, x.shape[0], _CHUNK):
        table = table_fn(np.asarray(x[start : start + _CHUNK], np.float64))
        total += float(np.sum(logsumexp(table, axis=1)))
    return total / x.shape[0]


def score_gmm(x, weights, means, covariances, covariance_type: str) -> float:
    r"""$\frac1N\sum_n \log\sum_k w_k \mathcal N(x_n \mid \mu_k, \Sigma_k)$; ``covariances``
    are ``(K, D, D)`` matrices (``"full"``) or ``(K, D)`` variances (``"diag"``)."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (weights, means, covariances))
    if not _finite(w, mu, cov) or np.any(w < 0):
        return float("nan")
    k, d = mu.shape
    log_w = np.log(w / w.sum())
    if covariance_type == "diag":
        if np.any(cov <= 0):
            return float("nan")
        prec = 1.0 / cov
        shift = w @ mu / w.sum()  # expand about a central point so nothing cancels badly
        mc = mu - shift[None]
        const = log_w - 0.5 * d * _LOG_2PI - 0.5 * np.sum(np.log(cov), axis=1)
        m_term = np.sum(mc**2 * prec, axis=1)

        def table(xc):
            xc = xc - shift[None]
            quad = (xc**2) @ prec.T - 2.0 * xc @ (mc * prec).T + m_term[None]
            return const[None] - 0.5 * np.maximum(quad, 0.0)

        return _mean_logsumexp(x, table)
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return float("nan")
    half_log_det = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    const = log_w - 0.5 * d * _LOG_2PI - half_log_det

    def table(xc):
        out = np.empty((xc.shape[0], k))
        for j in range(k):
            y = solve_triangular(chol[j], (xc - mu[j][None]).T, lower=True)
            out[:, j] = const[j] - 0.5 * np.sum(y**2, axis=0)
        return out

    return _mean_logsumexp(x, table)


def score_bernoulli(x, weights, probs) -> float:
    r"""$\frac1N\sum_n \log\sum_k \pi_k \prod_d \mu_{kd}^{x_{nd}}(1-\mu_{kd})^{1-x_{nd}}$
    ($0 \log 0 = 0$, so probabilities of exactly 0 or 1 are scored as given)."""
    w, p = np.asarray(weights, np.float64), np.asarray(probs, np.float64)
    if not _finite(w, p) or np.any(w < 0) or np.any((p < 0) | (p > 1)):
        return float("nan")
    log_w = np.log(w / w.sum())

    def table(xc):
        # xlogy / xlog1py give 0 log 0 = 0 entry by entry; summed over d per (n, k)
        return log_w[None] + np.stack(
            [
                np.sum(xlogy(xc, p[j][None]) + xlog1py(1.0 - xc, -p[j][None]), axis=1)
                for j in range(len(w))
            ],
            axis=1,
        )

    return _mean_logsumexp(x, table)


def score_poisson(x, weights, rates) -> float:
    r"""$\frac1N\sum_n \log\sum_k \pi_k \prod_d \mathrm{Poisson}(x_{nd} \mid \lambda_{kd})$,
    including $-\log x_{nd}!$."""
    w, lam = np.asarray(weights, np.float64), np.asarray(rates, np.float64)
    if not _finite(w, lam) or np.any(w < 0) or np.any(lam < 0):
        return float("nan")
    log_w = np.log(w / w.sum())

    def table(xc):
        log_fact = np.sum(gammaln(xc + 1.0), axis=1)
        cols = [np.sum(xlogy(xc, lam[j][None]), axis=1) for j in range(len(w))]
        return np.stack(cols, axis=1) - np.sum(lam, axis=1)[None] + log_w[None] - log_fact[:, None]

    return _mean_logsumexp(x, table)


def _gaussian_log_table(frames: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    r"""$\log\mathcal N(x_f \mid \mu_k, \Sigma_k)$, ``(F, K)`` for frames ``(F, D)``."""
    chol = np.linalg.cholesky(covs)
    d = means.shape[1]
    half_log_det = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    out = np.empty((frames.shape[0], means.shape[0]))
    for j in range(means.shape[0]):
        y = solve_triangular(chol[j], (frames - means[j][None]).T, lower=True)
        out[:, j] = -0.5 * d * _LOG_2PI - half_log_det[j] - 0.5 * np.sum(y**2, axis=0)
    return out


def score_hmm(x, initial_probs, transition_matrix, means, covariances) -> float:
    r"""$\sum_n \log p(x_n \mid \theta) / \sum_n L_n$: the log-likelihood per frame of a
    Gaussian HMM (full covariances) by the scaled forward algorithm, all sequences at once
    (each stops at its length). ``x``: ``SeqData``. The initial and transition
    probabilities are renormalised (pomegranate's rows sum to 1 minus an end probability)."""
    pi, a, mu, cov = (
        np.asarray(v, np.float64) for v in (initial_probs, transition_matrix, means, covariances)
    )
    if not _finite(pi, a, mu, cov) or np.any(pi < 0) or np.any(a < 0):
        return float("nan")
    pi = pi / pi.sum()
    a = a / a.sum(axis=1, keepdims=True)
    frames = np.asarray(x.frames, np.float64)
    n, t_max, d = frames.shape
    lengths = np.asarray(x.lengths)
    try:
        log_b = _gaussian_log_table(frames.reshape(n * t_max, d), mu, cov).reshape(n, t_max, -1)
    except np.linalg.LinAlgError:
        return float("nan")
    log_alpha = np.log(pi)[None] + log_b[:, 0]
    for t in range(1, t_max):
        top = np.max(log_alpha, axis=1, keepdims=True)
        new = np.log(np.exp(log_alpha - top) @ a) + top + log_b[:, t]
        active = (t < lengths)[:, None]
        log_alpha = np.where(active, new, log_alpha)
    return float(np.sum(logsumexp(log_alpha, axis=1)) / np.sum(lengths))


def score_lgssm(
    x,
    initial_mean,
    initial_covariance,
    transition_matrix,
    transition_covariance,
    observation_matrix,
    observation_covariance,
) -> float:
    r"""$\sum_n \log p(y_n \mid \theta) / \sum_n T_n$: the log-likelihood per frame of a
    linear-Gaussian state-space model by the Kalman filter (the initial state is the state
    at the first observation, as in pykalman and dynamax), all sequences at once. ``x``:
    ``SeqData`` of equal lengths."""
    m0, p0, f, q, h, r = (
        np.asarray(v, np.float64)
        for v in (
            initial_mean,
            initial_covariance,
            transition_matrix,
            transition_covariance,
            observation_matrix,
            observation_covariance,
        )
    )
    if not _finite(m0, p0, f, q, h, r):
        return float("nan")
    y = np.asarray(x.frames, np.float64)
    n, t_max, o = y.shape
    if not np.all(np.asarray(x.lengths) == t_max):
        raise ValueError("score_lgssm expects sequences of equal lengths")
    mean = np.broadcast_to(m0, (n, m0.shape[0])).copy()
    cov = np.broadcast_to(p0, (n, *p0.shape)).copy()
    total = 0.0
    for t in range(t_max):
        if t > 0:  # predict
            mean = mean @ f.T
            cov = f @ cov @ f.T + q
        s = h @ cov @ h.T + r  # (n, o, o)
        s = 0.5 * (s + np.swapaxes(s, 1, 2))
        try:
            chol = np.linalg.cholesky(s)
        except np.linalg.LinAlgError:
            return float("nan")
        resid = y[:, t] - mean @ h.T
        w = np.linalg.solve(chol, resid[..., None])[..., 0]  # L^{-1} resid
        half_log_det = np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
        total += float(np.sum(-0.5 * o * _LOG_2PI - half_log_det - 0.5 * np.sum(w**2, axis=1)))
        gain = np.swapaxes(np.linalg.solve(s, h @ cov), 1, 2)  # P Hᵀ S⁻¹ (S symmetric)
        mean = mean + np.einsum("nij,nj->ni", gain, resid)
        i_kh = np.eye(mean.shape[1])[None] - gain @ h
        cov = i_kh @ cov @ np.swapaxes(i_kh, 1, 2) + gain @ r @ np.swapaxes(gain, 1, 2)
    return total / (n * t_max)


def score(family: str, x, params: dict, covariance_type: str | None = None) -> float:
    """The mean log-likelihood per datum of ``params`` on ``x`` for a model ``family``
    (per frame for the sequence families, ``x`` then ``SeqData``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _score(family, x, params, covariance_type)


def _score(family: str, x, params: dict, covariance_type: str | None) -> float:
    if family == "gmm":
        return score_gmm(
            x, params["weights"], params["means"], params["covariances"], covariance_type
        )
    if family == "bernoulli":
        return score_bernoulli(x, params["weights"], params["probs"])
    if family == "poisson":
        return score_poisson(x, params["weights"], params["rates"])
    if family == "hmm":
        return score_hmm(
            x,
            params["initial_probs"],
            params["transition_matrix"],
            params["means"],
            params["covariances"],
        )
    if family == "lgssm":
        return score_lgssm(x, **{key: params[key] for key in LGSSM_KEYS})
    raise ValueError(f"unknown model family {family!r}")
