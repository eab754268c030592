r"""The linear-Gaussian state-space model: Kalman/RTS smoothing as the exact E-step and a
closed-form M-step for any subset of its parameters, with missing observations.

$$z_0 \sim \mathcal N(m_0, P_0),\quad z_{t+1} = F z_t + w_t,\ w_t \sim \mathcal N(0, Q),\quad
  y_t = H z_t + v_t,\ v_t \sim \mathcal N(0, R)$$

for $t = 0, \dots, L-1$ (pykalman's convention: $z_0$ is the state at the first
observation). NaN entries of $y$ are missing and skipped exactly.
"""

import math
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import numpy as np

from .._chain import use_parallel
from .._custom_types import Array, Float, Key, PerDatum, Scalar
from .._inference import kalman
from .._latent import AbstractLatent, GaussianChain
from .._model import Model
from .._q import AbstractQ, num_data
from .._sequences import Sequences
from .._validate import canonical_float_dtype, prepare_data

_LOG_2PI = math.log(2 * math.pi)
PARAMETERS = (
    "initial_mean",
    "initial_covariance",
    "transition_matrix",
    "transition_covariance",
    "observation_matrix",
    "observation_covariance",
)
# The fields that hold each parameter (covariances as raw Cholesky factors).
_FIELDS = {
    "initial_mean": "initial_mean",
    "initial_covariance": "raw_initial_covariance",
    "transition_matrix": "transition_matrix",
    "transition_covariance": "raw_transition_covariance",
    "observation_matrix": "observation_matrix",
    "observation_covariance": "raw_observation_covariance",
}


def _eye(n: int, dtype: Any) -> Array:
    return jnp.eye(n, dtype=dtype)


def _raw_from_covariance(cov: Array) -> Array:
    r"""$L$ with $\Sigma = LL^\top$, its diagonal stored as a log (non-finite if $\Sigma$ is
    not positive definite)."""
    chol = jnp.linalg.cholesky(cov)
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    return jnp.tril(chol, -1) + jnp.diag(jnp.log(diag))


def _covariance_from_raw(raw: Array) -> Array:
    chol = jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diagonal(raw)))
    return chol @ chol.T


def _sym(a: Array) -> Array:
    return 0.5 * (a + a.T)


def _check_covariance(name: str, cov: Array, size: int) -> Array:
    if cov.shape != (size, size):
        raise ValueError(f"{name} has shape {cov.shape}, expected ({size}, {size})")
    raw = _raw_from_covariance(cov)
    if not isinstance(cov, jax.core.Tracer):
        c = np.asarray(cov, np.float64)
        tol = math.sqrt(float(jnp.finfo(cov.dtype).eps)) * max(1.0, float(np.abs(c).max()))
        if not np.allclose(c, c.T, atol=tol, rtol=0) or not np.all(np.isfinite(np.asarray(raw))):
            raise ValueError(f"{name} must be a symmetric positive-definite matrix")
    return raw


class LGSSMPosterior(AbstractQ):
    r"""The exact posterior of a ``LinearGaussianSSM``'s states, sequence by sequence:
    ``means`` ``(N, T, S)`` $E[z_t]$, ``covariances`` ``(N, T, S, S)`` $\mathrm{Cov}[z_t]$,
    ``cross_covariances`` ``(N, T, S, S)`` $\mathrm{Cov}[z_{t+1}, z_t]$ (0 past the length)
    and ``entropies`` ``(N,)`` $H[q_n]$ — what the M-step and F need."""

    means: Array | None = None
    covariances: Array | None = None
    cross_covariances: Array | None = None
    entropies: Array | None = None

    def initialize(self, model, x, *, key=None):
        if self.means is not None:
            self.check(model.latent, num_data(x))
            return self
        return model.posterior(x)

    def exact_update(self, model, x, *, table=None):
        return model.posterior(x)

    def expected_log_joint(self, model, x, *, key=None, table=None):
        return model.expected_log_joint(x, self)

    def entropy(self):
        return self.entropies

    def check(self, latent: AbstractLatent, n: int) -> None:
        if not isinstance(latent, GaussianChain):
            raise TypeError(f"q=LGSSMPosterior is for GaussianChain latents, got {latent!r}")


def _missing_given_observed(r: Array, observed: Array) -> tuple[Array, Array]:
    r"""For one frame's observed entries: $G = R_{mo}R_{oo}^{-1}$ and
    $V = R_{mm} - G R_{om}$ as ``(O, O)`` matrices (zero outside their blocks), so that
    $y_{mis} \mid z, y_{obs} \sim \mathcal N(H_m z + G(y_o - H_o z), V)$."""
    m = observed.astype(r.dtype)
    missing = 1 - m
    # R restricted to the observed entries, identity on the missing ones: its inverse holds
    # R_oo^{-1} in the observed block.
    r_obs = r * m[:, None] * m[None, :] + jnp.diag(missing)
    chol = kalman._cholesky(r_obs)
    gain = kalman.cho_solve((chol, True), (r * missing[:, None] * m[None, :]).T).T
    gain = gain * missing[:, None] * m[None, :]
    v = (r - kalman.mm(gain, r * m[:, None])) * missing[:, None] * missing[None, :]
    return gain, v


def _frame_moments(
    params: kalman.LGSSMParams, y: Array, observed: Array, mean: Array, second: Array
) -> tuple[Array, Array, Array]:
    r"""For one frame: ``(E[y y^T], E[y z^T], any entry observed)``, with the missing entries
    of a partly observed frame imputed from $p(y_{mis} \mid z_t, y_{obs})$ (Shumway &
    Stoffer): $y = a + Bz + e$, $e \sim \mathcal N(0, V)$ given $z$. Small-matrix products
    and factorisations as ``kalman``'s fused ones (this runs once per frame)."""
    h, r = params.observation_matrix, params.observation_covariance
    m = observed.astype(y.dtype)
    y0 = jnp.where(observed, y, 0.0)
    gain, v = _missing_given_observed(r, observed)
    a = y0 + kalman.mv(gain, y0)
    b = h * (1 - m)[:, None] - kalman.mm(gain, h * m[:, None])
    outer_a = a[:, None] * a[None, :]
    b_second = kalman.mm(b, second)
    cross = a[:, None] * mean[None, :] + b_second  # E[y z^T]
    mean_term = kalman.mv(b, mean)[:, None] * a[None, :]
    yy = outer_a + mean_term + mean_term.T + kalman.mm(b_second, b.T) + v
    return yy, cross, jnp.any(observed)


@final
class LinearGaussianSSM(Model):
    r"""A linear-Gaussian state-space model (a Kalman filter's model), fitted by exact EM.

    $z_0 \sim \mathcal N(m_0, P_0)$, $z_{t+1} \mid z_t \sim \mathcal N(Fz_t, Q)$,
    $y_t \mid z_t \sim \mathcal N(Hz_t, R)$. One datum is one sequence of observations
    ``(T, O)`` (``ej.Sequences`` for ragged ones); NaN entries are missing and skipped
    exactly. The E-step is Kalman filtering and RTS smoothing; the M-step is closed form
    for every parameter (Shumway & Stoffer), for any subset: ``frozen=("transition_matrix",
    ...)`` keeps those fixed and maximises the rest given them (``fit(..., frozen=...)``
    works too). Missing entries of partly observed frames are imputed in the M-step from
    their conditional given the state and the observed entries; frames with nothing
    observed are skipped (pykalman's treatment of missing frames).

    The covariances are stored as Cholesky factors with a log diagonal, so they stay
    positive definite under gradient steps; the attributes of the constructor's names give
    the matrices. A closed-form covariance that is not positive definite in floating point
    is not taken (the previous one is kept).

    **Arguments:** ``initial_mean`` ``(S,)``, ``initial_covariance`` ``(S, S)``,
    ``transition_matrix`` ``(S, S)``, ``transition_covariance`` ``(S, S)``,
    ``observation_matrix`` ``(O, S)``, ``observation_covariance`` ``(O, O)``; ``frozen``:
    names of parameters to keep fixed in fits; ``parallel_scan``: Kalman filtering and
    smoothing by the parallel-in-time scans (``True``), the sequential ones (``False``), or
    chosen by device and length (``None``: parallel on an accelerator for sequences of at
    least ``_chain.PARALLEL_MIN_FRAMES`` frames, in float64 only — the parallel version
    loses about 3e-4 relative accuracy in float32).

    ```python
    model = ej.models.LinearGaussianSSM.initialize(jax.random.key(0), y, state_dim=4)
    res = ej.fit(model, y)                       # y: (N, T, O), NaN = missing
    smoothed = res.model.smooth(y)               # kalman.SmootherResult, batched
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = PARAMETERS
    initial_mean: Float[Array, " S"]
    raw_initial_covariance: Float[Array, "S S"]
    transition_matrix: Float[Array, "S S"]
    raw_transition_covariance: Float[Array, "S S"]
    observation_matrix: Float[Array, "O S"]
    raw_observation_covariance: Float[Array, "O O"]
    frozen: tuple[str, ...] = eqx.field(static=True)

    parallel_scan: bool | None = eqx.field(static=True)

    missing_values = True

    def __init__(
        self,
        initial_mean: Any,
        initial_covariance: Any,
        transition_matrix: Any,
        transition_covariance: Any,
        observation_matrix: Any,
        observation_covariance: Any,
        *,
        frozen: tuple[str, ...] | list[str] = (),
        parallel_scan: bool | None = None,
    ):
        dtype = canonical_float_dtype(
            initial_mean,
            initial_covariance,
            transition_matrix,
            transition_covariance,
            observation_matrix,
            observation_covariance,
        )
        m0 = jnp.asarray(initial_mean, dtype)
        if m0.ndim != 1 or m0.shape[0] < 1:
            raise ValueError(f"initial_mean has shape {m0.shape}, expected (S,)")
        s = m0.shape[0]
        f = jnp.asarray(transition_matrix, dtype)
        if f.shape != (s, s):
            raise ValueError(f"transition_matrix has shape {f.shape}, expected ({s}, {s})")
        h = jnp.asarray(observation_matrix, dtype)
        if h.ndim != 2 or h.shape[1] != s:
            raise ValueError(f"observation_matrix has shape {h.shape}, expected (O, {s})")
        o = h.shape[0]
        for name, value in (
            ("initial_mean", m0),
            ("transition_matrix", f),
            ("observation_matrix", h),
        ):
            if not isinstance(value, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(value))
            ):
                raise ValueError(f"{name} contains NaN or Inf")
        if isinstance(frozen, str):
            frozen = (frozen,)
        frozen = tuple(frozen)
        unknown = [name for name in frozen if name not in PARAMETERS]
        if unknown:
            raise ValueError(f"frozen names unknown parameters {unknown}; choose from {PARAMETERS}")
        self.initial_mean = m0
        self.raw_initial_covariance = _check_covariance(
            "initial_covariance", jnp.asarray(initial_covariance, dtype), s
        )
        self.transition_matrix = f
        self.raw_transition_covariance = _check_covariance(
            "transition_covariance", jnp.asarray(transition_covariance, dtype), s
        )
        self.observation_matrix = h
        self.raw_observation_covariance = _check_covariance(
            "observation_covariance", jnp.asarray(observation_covariance, dtype), o
        )
        self.frozen = frozen
        if parallel_scan not in (None, True, False):
            raise ValueError(f"parallel_scan must be True, False or None, got {parallel_scan!r}")
        self.parallel_scan = parallel_scan

    # ------------------------------------------------------------- parameters
    @property
    def latent(self) -> GaussianChain:
        return GaussianChain(self.initial_mean.shape[-1])

    @property
    def state_dim(self) -> int:
        return self.initial_mean.shape[-1]

    @property
    def obs_dim(self) -> int:
        return self.observation_matrix.shape[-2]

    @property
    def initial_covariance(self) -> Float[Array, "S S"]:
        return _covariance_from_raw(self.raw_initial_covariance)

    @property
    def transition_covariance(self) -> Float[Array, "S S"]:
        return _covariance_from_raw(self.raw_transition_covariance)

    @property
    def observation_covariance(self) -> Float[Array, "O O"]:
        return _covariance_from_raw(self.raw_observation_covariance)

    def params(self) -> kalman.LGSSMParams:
        """The parameters as the inference functions take them."""
        return kalman.LGSSMParams(
            self.initial_mean,
            self.initial_covariance,
            self.transition_matrix,
            self.transition_covariance,
            self.observation_matrix,
            self.observation_covariance,
        )

    # ------------------------------------------------------------- densities
    def log_joint(self, x: Sequences, z: Float[Array, "T S"]) -> Scalar:
        r"""$\log p(y, z \mid \theta)$ for one sequence and one state path ``(T, S)`` (missing
        entries and frames past the length are not read)."""
        p = self.params()
        mask = x.mask()
        y = x.frames
        observed = ~jnp.isnan(y) & mask[:, None]

        def gauss(value, mean, cov, keep):
            # log N restricted to the entries `keep` (the rest: a unit dummy, removed below).
            k = keep.astype(value.dtype)
            cov = cov * k[:, None] * k[None, :] + jnp.diag(1 - k)
            resid = jnp.where(keep, value - mean, 0.0)
            chol = jnp.linalg.cholesky(cov)
            sol = jsl.solve_triangular(chol, resid, lower=True)
            log_det = jnp.sum(jnp.log(jnp.diagonal(chol)))
            return -0.5 * jnp.sum(sol**2) - log_det - 0.5 * _LOG_2PI * jnp.sum(k)

        s = self.state_dim
        all_states = jnp.ones((s,), bool)
        first = gauss(z[0], p.initial_mean, p.initial_covariance, all_states)
        moves = jax.vmap(
            lambda a, b: gauss(b, p.transition_matrix @ a, p.transition_covariance, all_states)
        )(z[:-1], z[1:])
        obs = jax.vmap(
            lambda zt, yt, keep: gauss(
                yt, p.observation_matrix @ zt, p.observation_covariance, keep
            )
        )(z, y, observed)
        return first + jnp.sum(jnp.where(mask[1:], moves, 0.0)) + jnp.sum(obs)

    def _parallel(self, x: Sequences) -> bool:
        if self.parallel_scan is None and self.initial_mean.dtype != jnp.float64:
            return False
        return use_parallel(self, x.num_frames)

    def _smooth(self, x: Sequences) -> kalman.SmootherResult:
        smoother = lambda *args: kalman.kalman_smoother(*args, parallel=self._parallel(x))
        return jax.vmap(smoother, in_axes=(None, 0, 0))(
            self.params(), x.frames, jnp.asarray(x.lengths)
        )

    def exact_posterior(self, x: Sequences) -> tuple[PerDatum, LGSSMPosterior]:
        """``log p(y_n)`` and the smoothed posterior, from one filter-smoother pass."""
        out = self._smooth(x)
        q = LGSSMPosterior(out.means, out.covariances, out.cross_covariances, None)
        expected = self.expected_log_joint(x, q)
        q = eqx.tree_at(
            lambda q: q.entropies, q, out.log_likelihood - expected, is_leaf=lambda v: v is None
        )
        return out.log_likelihood, q

    def posterior(self, x: Sequences) -> LGSSMPosterior:
        return self.exact_posterior(x)[1]

    def log_marginal(self, x: Sequences) -> PerDatum:
        forward = lambda *args: kalman.log_likelihood(*args, parallel=self._parallel(x))
        return jax.vmap(forward, in_axes=(None, 0, 0))(
            self.params(), x.frames, jnp.asarray(x.lengths)
        )

    def _moments(self, x: Sequences, q: LGSSMPosterior) -> dict:
        r"""Per sequence, the expected sums the M-step and $E_q[\log p]$ need."""
        p = self.params()
        mask = x.mask()
        dtype = q.means.dtype
        mu, cov, cross = q.means, q.covariances, q.cross_covariances
        second = cov + mu[..., :, None] * mu[..., None, :]  # E[z_t z_t^T]
        # E[z_{t+1} z_t^T] at index t
        nxt = jnp.concatenate([mu[:, 1:], jnp.zeros_like(mu[:, :1])], axis=1)
        pair = cross + nxt[..., :, None] * mu[..., None, :]
        moving = (mask[:, 1:]).astype(dtype)  # pairs (t, t+1) within the sequence
        pairs = moving[..., None, None]
        s00 = jnp.sum(second[:, :-1] * pairs, axis=1)
        s11 = jnp.sum(second[:, 1:] * pairs, axis=1)
        s10 = jnp.sum(pair[:, :-1] * pairs, axis=1)
        observed = ~jnp.isnan(x.frames) & mask[..., None]
        frame = jax.vmap(
            jax.vmap(_frame_moments, in_axes=(None, 0, 0, 0, 0)), in_axes=(None, 0, 0, 0, 0)
        )

        def imputed(_):
            return frame(p, x.frames, observed, mu, second)[:2]

        def complete(_):  # no partly observed frame: E[y y^T] = y y^T, E[y z^T] = y E[z]^T
            y = jnp.where(observed, x.frames, 0.0)
            return y[..., :, None] * y[..., None, :], y[..., :, None] * mu[..., None, :]

        # The imputation costs most of the pass's statistics; data with whole frames (or
        # nothing) missing skip it (one branch runs).
        any_obs = jnp.any(observed, axis=-1)
        partly = jnp.any(any_obs & ~jnp.all(observed | ~mask[..., None], axis=-1))
        yy, yz = jax.lax.cond(partly, imputed, complete, None)
        w = any_obs.astype(dtype)[..., None, None]
        return {
            "initial_first": mu[:, 0],
            "initial_second": second[:, 0],
            "num_moves": jnp.sum(moving, axis=1),
            "s00": s00,
            "s11": s11,
            "s10": s10,
            "num_observed": jnp.sum(any_obs.astype(dtype), axis=1),
            "yy": jnp.sum(yy * w, axis=1),
            "yz": jnp.sum(yz * w, axis=1),
            "zz": jnp.sum(second * w, axis=1),
            "observed_entries": jnp.sum(observed.astype(dtype), axis=(1, 2)),
        }

    def expected_log_joint(self, x: Sequences, q: LGSSMPosterior) -> PerDatum:
        r"""$E_q[\log p(y_n, z \mid \theta)]$ per sequence, from the posterior's moments (the
        missing entries of partly observed frames enter through their conditional, which
        adds their conditional entropy back: the result is the $\log p(y_{obs}, z)$ term)."""
        m = self._moments(x, q)
        p = self.params()
        s, o = self.state_dim, self.obs_dim

        def quad(cov, scatter):
            chol = jnp.linalg.cholesky(cov)
            inv = jsl.cho_solve((chol, True), _eye(cov.shape[0], cov.dtype))
            return jnp.sum(inv * scatter), 2 * jnp.sum(jnp.log(jnp.diagonal(chol)))

        def per_sequence(mm):
            f, h = p.transition_matrix, p.observation_matrix
            m0 = p.initial_mean
            init_scatter = (
                mm["initial_second"]
                - m0[:, None] * mm["initial_first"][None, :]
                - mm["initial_first"][:, None] * m0[None, :]
                + m0[:, None] * m0[None, :]
            )
            q0, d0 = quad(p.initial_covariance, init_scatter)
            init = -0.5 * (q0 + d0 + s * _LOG_2PI)
            trans_scatter = mm["s11"] - f @ mm["s10"].T - mm["s10"] @ f.T + f @ mm["s00"] @ f.T
            qt, dt = quad(p.transition_covariance, trans_scatter)
            trans = -0.5 * (qt + mm["num_moves"] * (dt + s * _LOG_2PI))
            obs_scatter = mm["yy"] - h @ mm["yz"].T - mm["yz"] @ h.T + h @ mm["zz"] @ h.T
            qo, do = quad(p.observation_covariance, obs_scatter)
            obs = -0.5 * (qo + mm["num_observed"] * (do + o * _LOG_2PI))
            return init + trans + obs

        total = jax.vmap(per_sequence)(m)
        # The imputed entries of partly observed frames add E[log p(y_mis | z, y_obs)] =
        # -(their conditional entropy); remove it so that this is E_q[log p(y_obs, z)].
        return total + self._imputed_entropy(x)

    def _imputed_entropy(self, x: Sequences) -> PerDatum:
        r"""$\sum_t H[p(y_{t,mis} \mid z_t, y_{t,obs})]$ over partly observed frames."""
        p = self.params()
        r = p.observation_covariance
        mask = x.mask()
        observed = ~jnp.isnan(x.frames) & mask[..., None]

        def frame(obs):
            m = obs.astype(r.dtype)
            partly = jnp.any(obs) & ~jnp.all(obs)
            _, v = _missing_given_observed(r, obs)
            # V on the missing block, the identity on the observed one: its log-determinant
            # is V_mm's.
            log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(kalman._cholesky(v + jnp.diag(m)))))
            entropy = 0.5 * (log_det + jnp.sum(1 - m) * (1 + _LOG_2PI))
            return jnp.where(partly, entropy, 0.0)

        return jnp.sum(jax.vmap(jax.vmap(frame))(observed), axis=1)

    def check_data(self, x: Any) -> None:
        frames = x.frames
        if frames.ndim != 3 or frames.shape[2] != self.obs_dim:
            raise ValueError(
                f"x has frames of shape {tuple(frames.shape)}, expected (N, T, O) with "
                f"O={self.obs_dim} for this LinearGaussianSSM"
            )

    # ------------------------------------------------------------- closed-form M-step
    def has_closed_form(self, prior: Any) -> bool:
        return prior is None

    def honours_frozen(self, frozen: Any) -> bool:
        return all(isinstance(getattr(frozen, f), bool) for f in _FIELDS.values())

    def sufficient_statistics(self, x: Sequences, q: Any, *, weights: Any = None) -> dict:
        r"""Weighted sums over sequences of $E[z_0]$, $E[z_0z_0^\top]$, the transition sums
        $\sum_t E[z_tz_t^\top]$, $\sum_t E[z_{t+1}z_{t+1}^\top]$, $\sum_t E[z_{t+1}z_t^\top]$
        and the observation sums $\sum_t E[y_ty_t^\top]$, $E[y_tz_t^\top]$, $E[z_tz_t^\top]$
        over frames with an observed entry, with their counts. Plain sums: they merge by
        addition."""
        q = q.resolve(self, x)
        moments = self._moments(x, q)
        dtype = q.means.dtype
        n = q.means.shape[0]
        w = jnp.ones((n,), dtype) if weights is None else jnp.asarray(weights, dtype)
        keep = w != 0

        def total(leaf):
            wb = w.reshape((n,) + (1,) * (leaf.ndim - 1))
            kb = keep.reshape(wb.shape)
            return jnp.sum(jnp.where(kb, leaf * wb, 0.0), axis=0)

        stats = jax.tree_util.tree_map(total, moments)
        stats["num_sequences"] = jnp.sum(jnp.where(keep, w, 0.0))
        del stats["observed_entries"]
        return stats

    def maximize(
        self, stats: dict, prior: Any = None, *, frozen: Any = None
    ) -> "LinearGaussianSSM":
        """The closed-form M-step for the parameters not frozen (see the class)."""
        keep = set(self.frozen)
        if frozen is not None:
            keep |= {name for name, f in _FIELDS.items() if getattr(frozen, f) is True}
        p = self.params()
        tiny = jnp.finfo(self.initial_mean.dtype).tiny

        def solve_right(num, den):  # num @ den^{-1}
            chol = jnp.linalg.cholesky(_sym(den))
            return jsl.cho_solve((chol, True), num.T).T

        def covariance(scatter, count, old_raw):
            cov = _sym(scatter / jnp.maximum(count, tiny))
            raw = _raw_from_covariance(cov)
            ok = jnp.all(jnp.isfinite(raw)) & (count > 0)
            return jnp.where(ok, raw, old_raw)

        # observations
        h = p.observation_matrix
        if "observation_matrix" not in keep:
            new_h = solve_right(stats["yz"], stats["zz"])
            h = jnp.where(jnp.all(jnp.isfinite(new_h)), new_h, h)
        raw_r = self.raw_observation_covariance
        if "observation_covariance" not in keep:
            scatter = stats["yy"] - h @ stats["yz"].T - stats["yz"] @ h.T + h @ stats["zz"] @ h.T
            raw_r = covariance(scatter, stats["num_observed"], raw_r)
        # transitions
        f = p.transition_matrix
        if "transition_matrix" not in keep:
            new_f = solve_right(stats["s10"], stats["s00"])
            f = jnp.where(jnp.all(jnp.isfinite(new_f)), new_f, f)
        raw_q = self.raw_transition_covariance
        if "transition_covariance" not in keep:
            scatter = (
                stats["s11"] - f @ stats["s10"].T - stats["s10"] @ f.T + f @ stats["s00"] @ f.T
            )
            raw_q = covariance(scatter, stats["num_moves"], raw_q)
        # the initial state
        n = stats["num_sequences"]
        m0 = p.initial_mean
        if "initial_mean" not in keep:
            m0 = stats["initial_first"] / jnp.maximum(n, tiny)
        raw_p0 = self.raw_initial_covariance
        if "initial_covariance" not in keep:
            first = stats["initial_first"]
            scatter = (
                stats["initial_second"]
                - m0[:, None] * first[None, :]
                - first[:, None] * m0[None, :]
                + n * m0[:, None] * m0[None, :]
            )
            raw_p0 = covariance(scatter, n, raw_p0)
        return eqx.tree_at(
            lambda m: (
                m.initial_mean,
                m.raw_initial_covariance,
                m.transition_matrix,
                m.raw_transition_covariance,
                m.observation_matrix,
                m.raw_observation_covariance,
            ),
            self,
            (m0, raw_p0, f, raw_q, h, raw_r),
        )

    # ------------------------------------------------------------- evaluation
    def _sequences(self, x: Any) -> Sequences:
        return prepare_data(self, x)

    def filter(self, x: Any) -> kalman.FilterResult:
        r"""Kalman filtering of every sequence: $\log p(y_n)$ ``(N,)``, $E[z_t \mid y_{0:t}]$
        ``(N, T, S)`` and the covariances ``(N, T, S, S)`` (0 past each length)."""
        return _filter(self, self._sequences(x))

    def smooth(self, x: Any) -> kalman.SmootherResult:
        r"""RTS smoothing of every sequence: $\log p(y_n)$, $E[z_t \mid y]$, $\mathrm{Cov}[z_t
        \mid y]$ and $\mathrm{Cov}[z_{t+1}, z_t \mid y]$ (0 past each length)."""
        return _smooth(self, self._sequences(x))

    def score(self, x: Any) -> Scalar:
        r"""$\frac1N\sum_n\log p(y_n \mid \theta)$ (``ej.log_evidence``)."""
        return jnp.mean(_log_marginals(self, self._sequences(x)))

    def sample(self, key: Key, num_sequences: int, num_steps: int) -> tuple[Array, Array]:
        """``(states (N, T, S), observations (N, T, O))`` drawn from the model."""
        keys = jr.split(key, num_sequences)
        return jax.vmap(kalman.sample, in_axes=(0, None, None))(keys, self.params(), num_steps)

    @classmethod
    def initialize(cls, key: Key, x: Any, state_dim: int, **kwargs: Any) -> "LinearGaussianSSM":
        r"""A starting model from the data: $H$ the top ``state_dim`` principal directions
        of the observed frames (scaled by their standard deviations, with a small random
        perturbation from ``key``), $R$ the residual variance (diagonal), $F = 0.9 I$,
        $Q = 0.1 I$, $m_0 = 0$, $P_0 = I$. ``kwargs`` (``frozen``) go to the constructor."""
        from .._sequences import as_sequences

        seqs = as_sequences(x)
        frames = np.concatenate(seqs.to_list())
        frames = frames[~np.isnan(frames).any(axis=1)]
        if frames.shape[0] < 2:
            raise ValueError("x has fewer than 2 fully observed frames to start from")
        s = int(state_dim)
        o = frames.shape[1]
        centred = frames - frames.mean(0)
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        scale = sing / math.sqrt(frames.shape[0])
        k = min(s, o)
        h = np.zeros((o, s))
        h[:, :k] = vt[:k].T * scale[:k][None, :]
        h = h + 0.01 * np.asarray(jr.normal(key, (o, s))) * (scale[0] if scale.size else 1.0)
        explained = (vt[:k].T * scale[:k][None, :]) @ (vt[:k].T * scale[:k][None, :]).T
        resid = np.maximum(
            np.diag(np.cov(frames.T).reshape(o, o)) - np.diag(explained),
            1e-2 * np.var(frames, 0).max(),
        )
        dtype = canonical_float_dtype(np.zeros((), float))
        return cls(
            np.zeros(s, dtype),
            np.eye(s, dtype=dtype),
            0.9 * np.eye(s, dtype=dtype),
            0.1 * np.eye(s, dtype=dtype),
            h.astype(dtype),
            np.diag(resid).astype(dtype),
            **kwargs,
        )


# Compiled once per model structure and data shape (op by op, each first call would
# compile every operation on its own).
@eqx.filter_jit
def _filter(model: LinearGaussianSSM, x: Sequences) -> kalman.FilterResult:
    return jax.vmap(kalman.kalman_filter, in_axes=(None, 0, 0))(
        model.params(), x.frames, jnp.asarray(x.lengths)
    )


@eqx.filter_jit
def _smooth(model: LinearGaussianSSM, x: Sequences) -> kalman.SmootherResult:
    return model._smooth(x)


@eqx.filter_jit
def _log_marginals(model: LinearGaussianSSM, x: Sequences) -> Array:
    return model.log_marginal(x)
