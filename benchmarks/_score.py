r"""One scoring function per model family: the mean log-likelihood per datum,
$\frac1N \sum_n \log \sum_k \pi_k\, p(x_n \mid \theta_k)$, in NumPy/SciPy float64.

Every contender's returned parameters go through the same function, so log-likelihoods
and their differences do not depend on how each library evaluates its own objective.
Non-finite parameters score NaN.
"""

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import gammaln, logsumexp, xlog1py, xlogy

_LOG_2PI = np.log(2 * np.pi)
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


def score(family: str, x, params: dict, covariance_type: str | None = None) -> float:
    """The mean log-likelihood per datum of ``params`` on ``x`` for a model ``family``."""
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
    raise ValueError(f"unknown model family {family!r}")
