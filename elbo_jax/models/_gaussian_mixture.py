r"""The Gaussian mixture: $p(x, z{=}k) = w_k\,\mathcal N(x \mid \mu_k, \Sigma_k)$, with a
closed-form (maximum-likelihood or MAP) M-step, a conjugate prior and k-means++ start."""

import functools
import math
from typing import Any, ClassVar, Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import jax.scipy.special as jss
import numpy as np

from .._custom_types import Array, Float, Int, Key, LogTable, Scalar
from .._statistics import AbstractStatistics
from .._validate import canonical_float_dtype, check_number, is_concrete, is_integer
from ._mixture import AbstractMixture, _check_data_shape

_LOG_2PI = math.log(2 * math.pi)
_COVARIANCE_TYPES = ("full", "diag")


# --------------------------------------------------------------------------- helpers
def _tiny(dtype: Any) -> float:
    """The count added to every component (scikit-learn's ``10 * eps``) so none is exactly 0."""
    return 10 * float(jnp.finfo(dtype).eps)


def _eye(d: int, dtype: Any) -> Array:
    return jnp.eye(d, dtype=dtype)


def _diag_embed(v: Array) -> Array:
    d = v.shape[-1]
    return v[..., :, None] * jnp.broadcast_to(_eye(d, v.dtype), (*v.shape, d))


def _check_covariance_type(covariance_type: Any) -> None:
    if covariance_type not in _COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be 'full' or 'diag', got {covariance_type!r}")


def _check_reg_covar(reg_covar: Any) -> float:
    """``reg_covar`` as a Python float (NumPy scalars too); ``ValueError`` unless finite, >= 0."""
    return check_number("reg_covar", reg_covar, low=0.0)


def _precision_factor_from_covariance(cov: Array, covariance_type: str) -> Array:
    r"""The stored precision factor: full, $A = L^{-1}$ ($\Sigma = LL^\top$) with a log diagonal;
    diag, $\log \sigma^{-1}$. Non-finite where $\Sigma$ is not positive definite."""
    if covariance_type == "diag":
        return -0.5 * jnp.log(cov)
    chol = jnp.linalg.cholesky(cov)
    eye = jnp.broadcast_to(_eye(cov.shape[-1], cov.dtype), cov.shape)
    factor = jsl.solve_triangular(chol, eye, lower=True)
    diag = jnp.diagonal(factor, axis1=-2, axis2=-1)
    return jnp.tril(factor, -1) + _diag_embed(jnp.log(diag))


def _use_quadratic_features(d: int, k: int, dtype: Any) -> bool:
    r"""Whether the full-covariance table and statistics go through the $D(D+1)/2$ products
    of centred data: float64 only (the expanded quadratic form loses about
    $\epsilon\|\tilde x\|^2/\sigma^2$, too much in float32), and only when the features are
    no bigger than the $(N, K, D)$ differences they replace."""
    return jnp.dtype(dtype) == jnp.float64 and d * (d + 1) // 2 <= k * d


@functools.cache
def _triu_indices(d: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(d)


def _quadratic_features(xc: Float[Array, "N D"]) -> Float[Array, "N T"]:
    r"""The products $\tilde x_i \tilde x_j$, $i \le j$, in ``np.triu_indices`` order, ``(N, D(D+1)/2)``."""
    d = xc.shape[1]
    # D slices concatenated: ~30% faster passes than two gathers (xc[:, rows] * xc[:, cols]),
    # for ~0.3 s more compilation.
    return jnp.concatenate([xc[:, i : i + 1] * xc[:, i:] for i in range(d)], axis=1)


def _features(xc: Float[Array, "N D"], covariance_type: str) -> Array:
    r"""The data-only features of the table and the statistics, second order first:
    diag $[\tilde x^2, \tilde x]$ ``(N, 2D)``; full $[\tilde x_i\tilde x_j\ (i \le j),
    \tilde x]$ ``(N, D(D+1)/2 + D)``. One matmul against them beats two against the halves."""
    second = xc**2 if covariance_type == "diag" else _quadratic_features(xc)
    return jnp.concatenate([second, xc], axis=1)


# Bits of a result that the expansions about a common centre may lose before the exact
# differences are used instead, by dtype: (table, statistics). The log-joint table, whose
# errors enter log p(x) and the responsibilities directly, may lose fewer than the second
# moments, whose errors move an M-step that is stationary in them. float32 (or narrower)
# keeps 6 and 12 of its 24 bits: the random 64-component, 32-dimensional benchmark data lose
# about 3 and 9. float64 keeps 16 of its 53 in both: an error of 2^16 eps (1e-11
# relative) stays below what exact EM's monotonicity check allows, while a sigma = 0.01
# component 70 from the centre (about 25 bits), or a component collapsed onto repeated
# points (its scatter all but cancels), no longer passes; ordinary data lose a handful of
# bits, so the model-only bound vouches and the exact path is never run.
_FLOAT32_BITS = (6, 12)
_FLOAT64_BITS = (16, 16)


def _bits_allowed(dtype: Any) -> tuple[int, int]:
    """``(table, statistics)``: bits an expansion about the centre may lose in ``dtype``."""
    return _FLOAT64_BITS if jnp.finfo(dtype).bits >= 64 else _FLOAT32_BITS


def _unless_inaccurate(
    model_says_accurate: Array, data_say_accurate: Any, fast: Array, exact: Any
) -> Array:
    """``fast``, unless neither the model-only bound nor the data-dependent one
    (``data_say_accurate()``, computed only when the first fails) vouches for it; then
    ``exact()``. Nested conditionals, so that the common case pays for neither."""
    chosen = jax.lax.cond(
        model_says_accurate,
        lambda: fast,
        lambda: jax.lax.cond(data_say_accurate(), lambda: fast, exact),
    )
    # Derivatives come from the fast formula: differentiating the conditional would keep
    # the exact branch's intermediates as residuals even when the fast branch runs.
    return _value_of_first_derivative_of_second(chosen, fast)


@jax.custom_jvp
def _value_and_derivative(value: Array, like: Array) -> Array:
    return value


@_value_and_derivative.defjvp
def _value_and_derivative_jvp(primals, tangents):
    return primals[0], tangents[1]


def _value_of_first_derivative_of_second(value: Array, like: Array) -> Array:
    """``value``, differentiated as ``like`` (whose value it approximates)."""
    return _value_and_derivative(jax.lax.stop_gradient(value), like)


def _in_row_blocks(fn: Any, x: Array, block: int = 512) -> Array:
    """``fn(x)`` computed ``block`` rows at a time (``fn`` maps rows to rows), so that an
    ``(N, D, K)`` intermediate never exceeds ``(block, D, K)``."""
    n = x.shape[0]
    if n <= block:
        return fn(x)
    num = -(-n // block)
    padded = jnp.concatenate([x, jnp.broadcast_to(x[:1], (num * block - n, *x.shape[1:]))])
    out = jax.lax.map(fn, padded.reshape(num, block, *x.shape[1:]))
    return out.reshape(num * block, *out.shape[2:])[:n]


def _unless_far(
    far: Float[Array, " K"], quad: Float[Array, "N K"], dim: int, bits: int, exact: Any
) -> Float[Array, "N K"]:
    r"""The expanded quadratic forms ``quad`` $Q_{nk}$, unless they may have lost too much.

    $B_k$ = ``far`` bounds the size of component $k$'s terms (as $Q_{nk}$ grows they grow
    with it), so an entry loses about $\log_2(B_k / (Q_{nk} + D))$ bits. Where
    $B_k > 2^{\text{bits}}(\min_n Q_{nk} + D)$ for some $k$ in these rows, the result is
    ``exact()`` (from the differences $x_n - \mu_k$). $B_k \le 2^{\text{bits}} D$ for every
    $k$ vouches from the model alone, so ordinary data never reduce ``quad`` for the check.
    """
    allowance = 2.0**bits

    def near_enough():
        return jnp.all(far <= allowance * (jnp.min(quad, 0, initial=jnp.inf) + dim))

    return _unless_inaccurate(jnp.all(far <= allowance * dim), near_enough, quad, exact)


def _centre(x: Float[Array, "N D"]) -> Float[Array, " D"]:
    r"""The common centre $c$ of the expansions: the mean of the rows at hand. It depends on
    the data only, so the features about it are the same in every iteration of a fit
    (``GaussianMixture.datum_features``: exact EM keeps them; a centre that moved with
    $\theta$ cost a third more time per iteration on a 16-dimensional full-covariance
    mixture); the table and the statistics of a chunk share them. Padded rows (copies of a
    datum) move it a little, which only shifts where the expansion is taken."""
    return jnp.mean(x, axis=0)


# --------------------------------------------------------------------------- statistics
@final
class GaussianMixtureStatistics(AbstractStatistics):
    r"""Expected sufficient statistics of a Gaussian mixture, about a shift carried inside.

    With responsibilities $r_{nk}$, datum weights $v_n$ and, per component, a shift $a_k$
    (the means $\mu_k$ of the model that computed them, which keeps float32 accurate):

    $$n_k = \sum_n v_n r_{nk},\quad s_k = \sum_n v_n r_{nk}(x_n - a_k),\quad
      S_k = \sum_n v_n r_{nk}(x_n - a_k)(x_n - a_k)^\top$$

    (``"diag"``: the diagonal of $S_k$, shape ``(K, D)``). The same statistics about another
    shift $b_k$, with $u_k = a_k - b_k$, are $n_k$, $s_k + n_k u_k$ and
    $S_k + s_k u_k^\top + u_k s_k^\top + n_k u_k u_k^\top$ — exact algebra, so statistics
    computed at different $\theta$ **merge**: both are moved to one shift per component and
    added. The shift kept is that of the operand with the larger count (the one whose data
    set it; ties: ``self``'s, unless ``self``'s is exactly zero), so all-zero statistics are
    neutral, ``merge(zeros, s) == s`` bit for bit, and a merge never moves the larger part.
    ``GaussianMixture.maximize`` reads the shift from here, never from the model.

    **Fields:** ``counts`` ``(K,)``, ``shift`` ``(K, D)``, ``first`` ``(K, D)``,
    ``second`` ``(K, D, D)`` or ``(K, D)``.
    """

    counts: Float[Array, " K"]
    shift: Float[Array, "K D"]
    first: Float[Array, "K D"]
    second: Float[Array, "K D D"] | Float[Array, "K D"]

    @property
    def is_diagonal(self) -> bool:
        return self.second.ndim == self.first.ndim

    def about(self, shift: Float[Array, "K D"]) -> "GaussianMixtureStatistics":
        r"""The same statistics about ``shift`` $b$: moved by $u = a - b$ (see the class)."""
        u = self.shift - shift
        n = self.counts[:, None]
        first = self.first + n * u
        if self.is_diagonal:
            second = self.second + 2 * u * self.first + n * u**2
        else:
            cross = self.first[:, :, None] * u[:, None, :]
            second = (
                self.second
                + cross
                + jnp.swapaxes(cross, -1, -2)
                + n[:, :, None] * (u[:, :, None] * u[:, None, :])
            )
        return GaussianMixtureStatistics(self.counts, shift, first, second)

    def merge(self, other: Any) -> "GaussianMixtureStatistics":
        """The statistics of both data sets, about the better-supported shift per component."""
        if not isinstance(other, GaussianMixtureStatistics):
            raise TypeError(f"cannot merge GaussianMixtureStatistics with {type(other).__name__}")
        self_is_zero = jnp.all(self.shift == 0, axis=-1)
        take_other = (other.counts > self.counts) | ((other.counts == self.counts) & self_is_zero)
        shift = jnp.where(take_other[:, None], other.shift, self.shift)
        # The operand whose shift is kept moves by exactly zero, so it is added unchanged.
        a, b = self.about(shift), other.about(shift)
        return GaussianMixtureStatistics(
            a.counts + b.counts, shift, a.first + b.first, a.second + b.second
        )

    def scale(self, factor: Any) -> "GaussianMixtureStatistics":
        """Every datum's weight times ``factor``: the sums scale, the shift stays."""
        c = jnp.asarray(factor, self.counts.dtype)
        return GaussianMixtureStatistics(
            self.counts * c, self.shift, self.first * c, self.second * c
        )


# --------------------------------------------------------------------------- model
@final
class GaussianMixture(AbstractMixture):
    r"""A mixture of $K$ Gaussians in $D$ dimensions.

    $$p(x, z{=}k \mid \theta) = w_k\,\mathcal N(x \mid \mu_k, \Sigma_k),\qquad
      \log \mathcal N(x\mid\mu,\Sigma) = -\tfrac D2\log 2\pi + \log|A| - \tfrac12\|A(x-\mu)\|^2$$

    where $\Sigma^{-1} = A^\top A$. The parameters are stored unconstrained, so
    ``ej.GradientMStep`` can move them freely: ``weight_logits`` ($\log w$ up to a
    constant), ``loc`` ($\mu$) and ``raw_precision_factor`` — for ``"full"`` the
    lower-triangular $A_k = L_k^{-1}$ ($\Sigma_k = L_kL_k^\top$) with its diagonal stored
    as a log, for ``"diag"`` $\log \sigma_{kd}^{-1}$. ``log_joint`` acts on one datum;
    ``log_joint_table`` is the vectorised $(N, K)$ table.

    The exact M-step is closed form and matches scikit-learn's: with responsibilities
    $r_{nk}$, $n_k = \sum_n r_{nk}$, $w_k = n_k/N$, $\mu_k = \sum_n r_{nk}x_n/n_k$ and
    $\Sigma_k = \sum_n r_{nk}(x_n-\mu_k)(x_n-\mu_k)^\top/n_k + \text{reg\_covar}\,I$
    (``"diag"``: the diagonal). A component with $n_k \approx 0$ keeps its mean and
    covariance and gets a tiny, finite weight. With a ``GaussianMixturePrior`` the
    M-step is the joint posterior mode (MAP-EM).

    **Arguments:**

    - `weights`: mixture weights, shape ``(K,)``, positive, summing to 1.
    - `means`: component means, shape ``(K, D)``.
    - `covariances`: ``(K, D, D)`` positive-definite matrices (``"full"``) or ``(K, D)``
      positive variances (``"diag"``).
    - `covariance_type`: ``"full"`` or ``"diag"``.
    - `reg_covar`: added to the diagonal of every covariance in the M-step (``>= 0``).

    The model keeps the floating dtype of its inputs (float32 in, float32 model).

    ```python
    model = ej.models.GaussianMixture.initialize(jax.random.key(0), x, num_components=3)
    res = ej.fit(model, x)
    res.model.means, res.model.predict(x)
    ```
    """

    printed_parameters: ClassVar[tuple[str, ...]] = ("weights", "means", "covariances")
    weight_logits: Float[Array, " K"]
    loc: Float[Array, "K D"]
    raw_precision_factor: Float[Array, "K D D"] | Float[Array, "K D"]
    covariance_type: Literal["full", "diag"] = eqx.field(static=True)
    reg_covar: float = eqx.field(static=True)

    def __init__(
        self,
        weights: Float[Array, " K"],
        means: Float[Array, "K D"],
        covariances: Float[Array, "K D D"] | Float[Array, "K D"],
        covariance_type: Literal["full", "diag"] = "full",
        reg_covar: float = 1e-6,
    ):
        _check_covariance_type(covariance_type)
        self.covariance_type = covariance_type
        self.reg_covar = _check_reg_covar(reg_covar)
        dtype = canonical_float_dtype(weights, means, covariances)
        weights = jnp.asarray(weights, dtype)
        means = jnp.asarray(means, dtype)
        covariances = jnp.asarray(covariances, dtype)
        if weights.ndim != 1 or weights.shape[0] < 1:
            raise ValueError(f"weights has shape {weights.shape}, expected (K,) with K >= 1")
        k = weights.shape[0]
        if means.ndim != 2 or means.shape[0] != k or means.shape[1] < 1:
            raise ValueError(f"means has shape {means.shape}, expected (K, D) with K={k}")
        d = means.shape[1]
        expected = (k, d, d) if covariance_type == "full" else (k, d)
        if covariances.shape != expected:
            raise ValueError(
                f"covariances has shape {covariances.shape}, expected {expected} "
                f"(K={k}, D={d}) for covariance_type={covariance_type!r}"
            )
        raw = _precision_factor_from_covariance(covariances, covariance_type)
        if is_concrete(weights, means, covariances):
            w = np.asarray(weights)
            tol = math.sqrt(float(jnp.finfo(dtype).eps))
            if not np.all(np.isfinite(w)) or np.any(w <= 0) or abs(w.sum() - 1) > tol:
                raise ValueError(f"weights must be positive and sum to 1, got {w}")
            if not np.all(np.isfinite(np.asarray(means))):
                raise ValueError("means contains NaN or Inf")
            c = np.asarray(covariances)
            if covariance_type == "full":
                scale = tol * float(np.max(np.abs(c), initial=0.0))
                symmetric = np.allclose(c, np.swapaxes(c, -1, -2), rtol=tol, atol=scale)
                if not symmetric or not np.all(np.isfinite(np.asarray(raw))):
                    raise ValueError("covariances must be symmetric positive-definite matrices")
            elif not np.all(np.isfinite(c)) or np.any(c <= 0):
                raise ValueError("covariances must be positive (variances, for 'diag')")
        self.weight_logits = jnp.log(weights) - jnp.log(jnp.sum(weights))
        self.loc = means
        self.raw_precision_factor = raw

    @classmethod
    def _from_fields(
        cls,
        weight_logits: Array,
        loc: Array,
        raw_precision_factor: Array,
        covariance_type: str,
        reg_covar: float,
    ) -> "GaussianMixture":
        """A mixture with these stored fields as they are (no checks, no conversion): the
        Gaussian emissions of an HMM reuse the mixture's densities, statistics and M-step."""
        model = object.__new__(cls)
        fields = {
            "weight_logits": weight_logits,
            "loc": loc,
            "raw_precision_factor": raw_precision_factor,
            "covariance_type": covariance_type,
            "reg_covar": reg_covar,
        }
        for name, value in fields.items():
            object.__setattr__(model, name, value)
        return model

    # ------------------------------------------------------------- parameters
    @property
    def dim(self) -> int:
        return self.loc.shape[1]

    @property
    def means(self) -> Float[Array, "K D"]:
        r"""Component means $\mu_k$, shape ``(K, D)``."""
        return self.loc

    @property
    def _log_precision_diag(self) -> Float[Array, "K D"]:
        r"""$\log$ of the diagonal of $A_k$ (so $\log|\Sigma_k^{-1}|^{1/2}$ is its sum)."""
        if self.covariance_type == "diag":
            return self.raw_precision_factor
        return jnp.diagonal(self.raw_precision_factor, axis1=-2, axis2=-1)

    @property
    def _precision_factor(self) -> Array:
        r"""$A_k$, lower triangular with $\Sigma_k^{-1} = A_k^\top A_k$ (full, ``(K, D, D)``),
        or $\sigma_{kd}^{-1}$ (diag, ``(K, D)``)."""
        if self.covariance_type == "diag":
            return jnp.exp(self.raw_precision_factor)
        raw = self.raw_precision_factor
        return jnp.tril(raw, -1) + _diag_embed(jnp.exp(self._log_precision_diag))

    @property
    def precisions_cholesky(self) -> Array:
        r"""scikit-learn's ``precisions_cholesky_``: upper-triangular $U_k = A_k^\top$ with
        $\Sigma_k^{-1} = U_kU_k^\top$ (full), or $1/\sigma_{kd}$ (diag)."""
        factor = self._precision_factor
        return factor if self.covariance_type == "diag" else jnp.swapaxes(factor, -1, -2)

    @property
    def _covariance_cholesky(self) -> Array:
        r"""$L_k = A_k^{-1}$ with $\Sigma_k = L_kL_k^\top$ (full), or $\sigma_{kd}$ (diag)."""
        if self.covariance_type == "diag":
            return jnp.exp(-self.raw_precision_factor)
        factor = self._precision_factor
        eye = jnp.broadcast_to(_eye(self.dim, factor.dtype), factor.shape)
        return jsl.solve_triangular(factor, eye, lower=True)

    @property
    def covariances(self) -> Array:
        r"""$\Sigma_k$, shape ``(K, D, D)`` (full) or the variances ``(K, D)`` (diag)."""
        if self.covariance_type == "diag":
            return jnp.exp(-2 * self.raw_precision_factor)
        chol = self._covariance_cholesky
        return chol @ jnp.swapaxes(chol, -1, -2)

    @property
    def n_parameters(self) -> int:
        """Number of free parameters, counted as scikit-learn does (for ``bic`` / ``aic``)."""
        k, d = self.num_components, self.dim
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return cov + k * d + k - 1

    # ------------------------------------------------------------- densities
    def log_joint(self, x: Float[Array, " D"], z: Int[Array, ""]) -> Scalar:
        r"""$\log w_z + \log\mathcal N(x \mid \mu_z, \Sigma_z)$ for one datum ``x`` ``(D,)``."""
        diff = x - self.loc[z]
        if self.covariance_type == "diag":
            y = diff * self._precision_factor[z]
        else:
            y = self._precision_factor[z] @ diff
        log_det = jnp.sum(self._log_precision_diag[z])
        return self.log_weights[z] - 0.5 * self.dim * _LOG_2PI + log_det - 0.5 * jnp.sum(y**2)

    def datum_features(self, x: Float[Array, "N D"]) -> Array | None:
        r"""The products $[\tilde x_i\tilde x_j\ (i \le j), \tilde x]$ that the full-covariance
        table and statistics read in float64 (with $\tilde x_n = x_n - c$ about the rows'
        mean $c$), ``(N, D(D+1)/2 + D)``: building them takes about a sixth of a pass, so
        exact EM keeps them when they fit its budget. ``None`` otherwise: the diagonal
        features $[\tilde x^2, \tilde x]$ are one elementwise pass (measured: no faster
        read back than recomputed, and twice the data's memory), and full covariances in
        float32 (or with $D(D+1)/2 > KD$) use the differences $x_n - \mu_k$."""
        if self.covariance_type != "full" or not _use_quadratic_features(
            self.dim, self.num_components, self.loc.dtype
        ):
            return None
        return _features(x - _centre(x)[None], "full")

    def log_joint_table(self, x: Float[Array, "N D"], *, features: Array | None = None) -> LogTable:
        r"""The table $T_{nk} = \log w_k + \log\mathcal N(x_n\mid\mu_k,\Sigma_k)$, ``(N, K)``.

        The quadratic forms are expanded about the rows' mean $c$ (``_centre``), with
        $\tilde x_n = x_n - c$ and $\delta_k = \mu_k - c$, so that they become matrix products
        with data-only features. Diag: $Q_{nk} = \sum_d p_{kd}^2 (\tilde x_{nd} -
        \delta_{kd})^2$ ($p_{kd} = 1/\sigma_{kd}$) is one matmul of $[\tilde x^2, \tilde x]$.
        Full: in float64, when $D(D+1)/2 \le KD$, $\tilde x^\top P_k \tilde x - 2\tilde
        x^\top P_k\delta_k$ ($P_k = \Sigma_k^{-1}$) is one matmul of the features
        $[\tilde x_i\tilde x_j\ (i \le j), \tilde x]$; otherwise $\|A_k(\tilde x_n -
        \delta_k)\|^2$ from one $(N, D) \times (D, KD)$ matmul. ``sufficient_statistics`` uses
        the same features, so in a fit's pass XLA computes them once for both.

        **Accuracy.** The expansions round terms of size up to $4Q_{nk} + 6B_k$, with
        $B_k = \sum_d p_{kd}^2\delta_{kd}^2$ (diag) or $(\sum_i \sqrt{P_{k,ii}}\,
        |\delta_{ki}|)^2$ (full, which bounds $\sum_{ij}|P_{k,ij}\delta_{ki}\delta_{kj}|$), so
        a narrow component far from $c$ cancels catastrophically. Where some
        $B_k > 2^{b}(\min_n Q_{nk} + D)$ in these rows (an entry could lose more than $b$ bits
        relative to its own size; $b = 6$ in float32, 16 in float64), the table is computed
        from the exact differences $x_n - \mu_k$ instead (a few times slower; under ``vmap``
        over models both are computed). The full $(N, D) \times (D, KD)$ path loses only
        about $\log_2\sqrt{B_k/Q_{nk}}$ bits (the differences are formed before squaring).

        ``features``: ``datum_features(x)`` of these rows, if already computed.
        """
        x = self._as_data(x)  # a hook on prepared data: the evaluation functions check x
        c = _centre(x)
        xc = x - c[None]
        delta = self.loc - c[None]
        k, d = self.num_components, self.dim
        table_bits = _bits_allowed(x.dtype)[0]
        if self.covariance_type == "diag":
            p = self._precision_factor
            p2 = p**2
            weight = jnp.concatenate([p2, -2 * delta * p2], axis=1)  # (K, 2D)
            far = jnp.sum(delta**2 * p2, axis=-1)  # B_k
            quad = jnp.maximum(_features(xc, "diag") @ weight.T + far[None], 0.0)

            def exact():
                def rows(xb):  # (B, D, K): the reduction over D runs along contiguous K
                    return jnp.sum(((xb[:, :, None] - self.loc.T[None]) * p.T[None]) ** 2, 1)

                return _in_row_blocks(rows, x)

            quad = _unless_far(far, quad, d, table_bits, exact)
        elif _use_quadratic_features(d, k, x.dtype):
            factor = self._precision_factor
            precision = jnp.einsum("kai,kaj->kij", factor, factor)  # A^T A
            rows, cols = _triu_indices(d)
            upper = 2 * precision - precision * _eye(d, x.dtype)[None]
            p_delta = jnp.einsum("kij,kj->ki", precision, delta)
            weight = jnp.concatenate([upper[:, rows, cols], -2 * p_delta], axis=1)  # (K, T + D)
            if features is None:
                features = _features(xc, "full")
            quad = features @ weight.T + jnp.sum(p_delta * delta, axis=-1)[None]
            quad = jnp.maximum(quad, 0.0)
            # (sum_i sqrt(P_ii) |delta_i|)^2 bounds sum_ij |P_ij delta_i delta_j|, the size of
            # the constant term, and with it that of the terms linear in x (Cauchy-Schwarz).
            root = jnp.sqrt(jnp.diagonal(precision, axis1=-2, axis2=-1))
            far = jnp.sum(root * jnp.abs(delta), axis=-1) ** 2

            def exact():
                def rows(xb):
                    diff = xb[:, None, :] - self.loc[None]  # (B, K, D)
                    return jnp.sum(jnp.einsum("kij,nkj->nki", factor, diff) ** 2, axis=-1)

                return _in_row_blocks(rows, x)

            quad = _unless_far(far, quad, d, table_bits, exact)
        else:
            factor = self._precision_factor
            stacked = jnp.transpose(factor, (2, 0, 1)).reshape(d, k * d)  # [j, (k, i)] = A_kij
            y = (xc @ stacked).reshape(-1, k, d) - jnp.einsum("kij,kj->ki", factor, delta)[None]
            quad = jnp.sum(y**2, axis=-1)
        log_det = jnp.sum(self._log_precision_diag, axis=-1)
        per_k = self.log_weights - 0.5 * d * _LOG_2PI + log_det
        return per_k[None] - 0.5 * quad

    # ------------------------------------------------------------- closed-form M-step
    def m_step_penalty(self, stats: Any = None) -> Scalar:
        r"""$\tfrac12\,\text{reg\_covar}\sum_k w_k \operatorname{tr}\Sigma_k^{-1}$: adding
        ``reg_covar`` to the covariances is the exact M-step for data blurred by
        $\mathcal N(0, \text{reg\_covar}\,I)$, whose expected log-density is
        $\log\mathcal N(x\mid\mu_k,\Sigma_k) - \tfrac12\,\text{reg\_covar}\operatorname{tr}
        \Sigma_k^{-1}$ (with the weights standing in for the responsibilities' shares)."""
        if self.reg_covar == 0:
            return jnp.zeros((), self.loc.dtype)
        factor = self._precision_factor
        if self.covariance_type == "diag":
            trace = jnp.sum(factor**2, axis=-1)
        else:
            trace = jnp.sum(factor**2, axis=(-2, -1))  # tr(A^T A) = ||A||_F^2
        return 0.5 * self.reg_covar * jnp.sum(self.weights * trace)

    def has_closed_form(self, prior: Any) -> bool:
        return prior is None or isinstance(prior, GaussianMixturePrior)

    def sufficient_statistics(
        self,
        x: Float[Array, "N D"],
        q: Any,
        *,
        weights: Float[Array, " N"] | None = None,
        features: Array | None = None,
    ) -> GaussianMixtureStatistics:
        r"""Expected statistics about the current means $a_k = \mu_k$ (carried as the shift):
        $n_k = \sum_n v_n r_{nk}$, $s_k = \sum_n v_n r_{nk}(x_n - a_k)$ and
        $S_k = \sum_n v_n r_{nk}(x_n - a_k)(x_n - a_k)^\top$ (diag: its diagonal), with
        $r_{nk} = q_n(z{=}k)$ and the datum weights $v_n$ (``weights``, default 1; a row of
        weight 0 contributes nothing, whatever its responsibilities). A
        ``GaussianMixtureStatistics``: statistics of other data, or of other models, merge.

        They are matmuls of the responsibilities against the data-only features about the
        rows' mean $c$ (as ``log_joint_table``), moved to $a_k$ with
        $\delta_k = a_k - c$: $s_k = \tilde s_k - n_k\delta_k$, $S_k = \tilde S_k -
        \tilde s_k\delta_k^\top - \delta_k\tilde s_k^\top + n_k\delta_k\delta_k^\top$. Full
        covariances in float32 (or with $D(D+1)/2 > KD$) use the differences $x_n - a_k$.
        Where the move would lose more than 12 bits (float32; float64: 16) of $S_k$ (its terms,
        per dimension, exceed $2^{12}(|S_{k,dd}| + n_k\Sigma_{k,dd})$), $S_k$ comes from the
        differences instead. ``features``: ``datum_features(x)`` of these rows, if already
        computed.
        """
        q = q.resolve(self, x)
        dtype = self.loc.dtype
        k, d = self.num_components, self.dim
        resp = q.probs.astype(dtype)
        if weights is not None:
            weights = jnp.asarray(weights, dtype)
            if weights.shape != (x.shape[0],):
                raise ValueError(
                    f"weights has shape {weights.shape}, expected (N,) with N={x.shape[0]}"
                )
            # where, not a product: padded rows may carry any responsibilities, NaN included
            resp = jnp.where((weights != 0)[:, None], resp * weights[:, None], 0.0)
        counts = jnp.sum(resp, axis=0)
        shift = self.loc
        full = self.covariance_type == "full"
        if full and not _use_quadratic_features(d, k, dtype):
            diff = x[:, None, :] - shift[None]
            first = jnp.einsum("nk,nkd->kd", resp, diff)
            second = jnp.einsum("nk,nki,nkj->kij", resp, diff, diff)
            return GaussianMixtureStatistics(counts, shift, first, second)
        c = _centre(x)
        xc = x - c[None]
        delta = shift - c[None]
        if features is None:
            features = _features(xc, self.covariance_type)
        sums = resp.T @ features  # one matmul: [second, first]
        first_c = sums[:, -d:]
        first = first_c - counts[:, None] * delta
        if not full:
            second_c = sums[:, :d]
            second = second_c - 2 * delta * first_c + counts[:, None] * delta**2
            variances = self.covariances
            # Each entry's terms: second_c, 2 delta first_c and n delta^2.
            size = lambda: second_c + 2 * jnp.abs(delta * first_c) + counts[:, None] * delta**2
            scale = lambda: jnp.abs(second) + counts[:, None] * variances

            def exact():
                def block(xb, rb):
                    diff = xb[:, :, None] - shift.T[None]  # (B, D, K), as in the table
                    return jnp.sum(rb[:, None, :] * diff**2, axis=0).T

                return _sum_with_responsibilities(block, x, resp, (k, d))

        else:
            rows, cols = _triu_indices(d)
            upper = sums[:, :-d]
            second_c = jnp.zeros((k, d, d), dtype).at[:, rows, cols].set(upper)
            second_c = second_c + jnp.swapaxes(jnp.triu(second_c, 1), -1, -2)
            cross = jnp.einsum("ki,kj->kij", delta, first_c)
            second = (
                second_c
                - cross
                - jnp.swapaxes(cross, -1, -2)
                + counts[:, None, None] * jnp.einsum("ki,kj->kij", delta, delta)
            )
            # 1 / P_ii <= Sigma_ii: a smaller scale, so a stricter check, without inverting A.
            variances = 1 / jnp.sum(self._precision_factor**2, axis=-2)
            diag_c = jnp.diagonal(second_c, axis1=-2, axis2=-1)
            # Entry (i, j)'s terms are at most t_i t_j, with t_i^2 the bound below on those of
            # entry (i, i) (Cauchy-Schwarz), so checking the diagonal checks every entry
            # against sqrt of the product of the diagonal scales.
            size = lambda: (
                (jnp.sqrt(jnp.maximum(diag_c, 0.0)) + jnp.sqrt(counts)[:, None] * jnp.abs(delta))
                ** 2
            )
            scale = lambda: (
                jnp.abs(jnp.diagonal(second, axis1=-2, axis2=-1)) + counts[:, None] * variances
            )

            def exact():
                def block(xb, rb):
                    diff = xb[:, None, :] - shift[None]  # (B, K, D)
                    return jnp.einsum("nk,nki,nkj->kij", rb, diff, diff)

                return _sum_with_responsibilities(block, x, resp, (k, d, d))

        # The terms are at most 4 S_k + 6 n_k delta_k^2 (per dimension), so the model alone
        # can vouch that they stay within 2^bits (S_k + n_k sigma_k^2).
        allowance = 2.0 ** _bits_allowed(dtype)[1]
        second = _unless_inaccurate(
            jnp.all(6 * delta**2 / variances + 4 <= allowance),
            lambda: jnp.all(size() <= allowance * scale()),
            second,
            exact,
        )
        return GaussianMixtureStatistics(counts, shift, first, second)

    def complete_data_statistics(self, num_data: Any) -> GaussianMixtureStatistics:
        r"""The statistics that $m$ = ``num_data`` data drawn from the model itself have in
        expectation, less the floor: about the shift $\mu_k$, $n_k = m w_k$, $s_k = 0$,
        $S_k = m w_k(\Sigma_k - r I)$ (diag: the variances less $r$), $r$ = ``reg_covar``.
        The M-step adds $r$ back, so ``maximize`` of them gives this model back (up to
        rounding), and merged with other statistics the floor is added once, not once per
        part (online EM's inertia, ``ej.combine``)."""
        return self.statistics_for_counts(jnp.asarray(num_data, self.loc.dtype) * self.weights)

    def statistics_for_counts(self, counts: Float[Array, " K"]) -> GaussianMixtureStatistics:
        """``complete_data_statistics`` with ``counts[k]`` data drawn from component ``k``
        (the mixture's weights play no part: an HMM's state occupancies)."""
        dtype = self.loc.dtype
        expand = (slice(None),) + (None,) * (self.raw_precision_factor.ndim - 1)
        floor = self.reg_covar * (
            jnp.ones((self.dim,), dtype)
            if self.covariance_type == "diag"
            else _eye(self.dim, dtype)
        )
        scatter = counts[expand] * (self.covariances - floor[None])
        return GaussianMixtureStatistics(counts, self.loc, jnp.zeros_like(self.loc), scatter)

    def honours_frozen(self, frozen: Any) -> bool:
        """Any whole field may be frozen (the weights, the means, the covariances): with the
        means fixed the covariances are the scatter about them, which ``maximize`` does."""
        fields = (frozen.weight_logits, frozen.loc, frozen.raw_precision_factor)
        return all(isinstance(f, bool) for f in fields)

    def maximize(
        self,
        stats: GaussianMixtureStatistics,
        prior: "GaussianMixturePrior | None" = None,
        *,
        frozen: Any = None,
    ) -> "GaussianMixture":
        r"""The closed-form M-step from ``GaussianMixtureStatistics`` (maximum likelihood, or
        the MAP with a ``GaussianMixturePrior``; see the class and the prior for the formulas).

        Everything is computed about the statistics' own shift $a_k$, never about this
        model's means, so statistics from any $\theta$ (merged or not) give the same model.
        A component with (almost) no data keeps this model's mean and covariance. With
        ``frozen.loc`` (``fit(..., frozen=lambda m: m.loc)``) the means stay and the
        covariances are the scatter about them; other frozen fields are restored by ``fit``."""
        if not isinstance(stats, GaussianMixtureStatistics):
            raise TypeError(f"maximize needs GaussianMixtureStatistics, got {type(stats).__name__}")
        if stats.is_diagonal != (self.covariance_type == "diag"):
            raise ValueError(
                f"statistics with second moments of shape {stats.second.shape} do not fit a "
                f"{self.covariance_type!r} model"
            )
        dtype = self.loc.dtype
        k, d = self.num_components, self.dim
        tiny = _tiny(dtype)
        counts, shift, first, second = stats.counts, stats.shift, stats.first, stats.second
        # n_k gets scikit-learn's 10 eps where it divides, so an empty component stays finite.
        if prior is None:
            offset = jnp.zeros((k, d), dtype)
            psi = jnp.zeros((d, d), dtype)
            mean_denominator = counts + tiny
            denominator = counts + tiny
            weight_counts = counts + tiny
        else:
            prior = prior._cast(self)
            kappa = prior.mean_precision
            offset = kappa * (prior.mean[None] - shift)
            psi = prior.scale
            mean_denominator = counts + kappa
            denominator = counts + prior.dof + (d + 2 if self.covariance_type == "full" else 3)
            weight_counts = counts + (prior.concentration - 1) + tiny
        # The new (posterior) mean m_k, as an offset e_k = m_k - a_k from the shift.
        e = (first + offset) / mean_denominator[:, None]
        if frozen is not None and frozen.loc:
            e = self.loc - shift  # the means stay: the scatter is taken about them
        if self.covariance_type == "diag":
            scatter = second - 2 * first * e + counts[:, None] * e**2
            psi_n = jnp.diagonal(psi)[None] + scatter
            if prior is not None:
                psi_n = psi_n + kappa * (shift + e - prior.mean[None]) ** 2
            cov = psi_n / denominator[:, None] + self.reg_covar
        else:
            fe = jnp.einsum("ki,kj->kij", first, e)
            scatter = (
                second
                - fe
                - jnp.swapaxes(fe, -1, -2)
                + counts[:, None, None] * (jnp.einsum("ki,kj->kij", e, e))
            )
            psi_n = psi[None] + scatter
            if prior is not None:
                dm = shift + e - prior.mean[None]  # m_k - m0
                psi_n = psi_n + kappa * jnp.einsum("ki,kj->kij", dm, dm)
            psi_n = 0.5 * (psi_n + jnp.swapaxes(psi_n, -1, -2))
            cov = psi_n / denominator[:, None, None] + self.reg_covar * _eye(d, dtype)[None]
        raw = _precision_factor_from_covariance(cov, self.covariance_type)
        axes = tuple(range(1, raw.ndim))
        # An (almost) empty component, n_k < 10 eps N, keeps its mean and covariance (ML only:
        # a prior keeps the mode well defined); a covariance that is not positive definite
        # (possible with reg_covar=0) is not taken.
        if prior is None:
            take_mean = counts >= tiny * jnp.sum(counts)
        else:
            take_mean = jnp.ones((k,), bool)
        take_cov = take_mean & jnp.all(jnp.isfinite(raw), axis=axes)
        loc = jnp.where(take_mean[:, None], shift + e, self.loc)
        expand = (slice(None),) + (None,) * (raw.ndim - 1)
        raw = jnp.where(take_cov[expand], raw, self.raw_precision_factor)
        logits = jnp.log(weight_counts) - jnp.log(jnp.sum(weight_counts))
        return eqx.tree_at(
            lambda m: (m.weight_logits, m.loc, m.raw_precision_factor), self, (logits, loc, raw)
        )

    # ------------------------------------------------------------- data and helpers
    def check_data(self, x: Any) -> None:
        """``x`` must be ``(N, D)`` with this model's ``D`` and at least ``K`` data."""
        self._check_shape(x)
        n, k = x.shape[0], self.num_components
        if k > n:
            raise ValueError(f"num_components K={k} is larger than the number of data N={n} in x")

    def _check_shape(self, x: Any) -> None:
        _check_data_shape(tuple(np.shape(x)), self.dim)

    def _check_evaluation_data(self, x: Any) -> None:
        self._check_shape(x)  # any N >= 1: evaluating needs no K data

    def _as_data(self, x: Any) -> Array:
        self._check_shape(x)
        return jnp.asarray(x, self.loc.dtype)

    def score(self, x: Float[Array, "N D"]) -> Scalar:
        r"""Mean log-likelihood $\frac1N\sum_n\log p(x_n\mid\theta)$ (``ej.log_evidence``).

        ``x`` is checked as ``fit`` checks it: NaN/Inf, a wrong rank or ``D`` raise a
        ``ValueError`` naming ``x`` (inside a user's ``jit``, the shape only)."""
        # Any N >= 1 (ej.log_evidence would ask for N >= K, as fit does).
        return jnp.mean(self.log_marginal(self._evaluation_data(x)))

    def bic(self, x: Float[Array, "N D"]) -> Scalar:
        r"""Bayesian information criterion $-2\log p(x\mid\theta) + P\log N$ (lower is better)."""
        n = np.shape(x)[0]
        return -2 * self.score(x) * n + self.n_parameters * math.log(n)

    def aic(self, x: Float[Array, "N D"]) -> Scalar:
        r"""Akaike information criterion $-2\log p(x\mid\theta) + 2P$ (lower is better)."""
        return -2 * self.score(x) * np.shape(x)[0] + 2 * self.n_parameters

    def sample(self, key: Key, n: int) -> tuple[Float[Array, "n D"], Int[Array, " n"]]:
        r"""Draw $z_i \sim \mathrm{Cat}(w)$, $x_i \sim \mathcal N(\mu_{z_i}, \Sigma_{z_i})$.

        **Returns:** ``(x, z)`` with shapes ``(n, D)`` and ``(n,)``.
        """
        key_z, key_x = jr.split(key)
        z = jr.categorical(key_z, self.weight_logits, shape=(n,))
        eps = jr.normal(key_x, (n, self.dim), self.loc.dtype)
        chol = self._covariance_cholesky[z]
        if self.covariance_type == "diag":
            return self.loc[z] + chol * eps, z
        return self.loc[z] + jnp.einsum("nij,nj->ni", chol, eps), z

    @classmethod
    def initialize(
        cls,
        key: Key,
        x: Float[Array, "N D"],
        num_components: int,
        covariance_type: Literal["full", "diag"] = "full",
        reg_covar: float = 1e-6,
        num_kmeans_iters: int = 10,
    ) -> "GaussianMixture":
        r"""A starting model from k-means++ seeding and a few Lloyd iterations.

        Seeds are drawn by greedy $D^2$ sampling (Arthur & Vassilvitskii, 2007; as
        scikit-learn, the best of $2 + \lfloor\log K\rfloor$ candidates each time), refined by
        ``num_kmeans_iters`` Lloyd steps (an empty cluster keeps its centre), all compiled.
        From the hard assignment: $w_k = n_k/N$, $\mu_k$ the cluster mean, $\Sigma_k$ the
        cluster covariance (the whole data's if the cluster has fewer than 2 points) plus
        ``reg_covar``. The same key gives the same model; the dtype is that of ``x``.

        Scatters are sums of the differences from each point's own centre (never
        $E[xx^\top] - mm^\top$), symmetrised; a full covariance that is still not positive
        definite (repeated points, collinear columns, a ``reg_covar`` below float32's
        resolution) gets the smallest of a few jitters $\propto D\epsilon\max_i\Sigma_{ii}$
        that makes it so. The data are read in blocks of rows, so the temporaries stay well
        below the size of ``x`` itself.

        ```python
        model = ej.models.GaussianMixture.initialize(jax.random.key(0), x, 3, "diag")
        ```
        """
        _check_covariance_type(covariance_type)
        reg_covar = _check_reg_covar(reg_covar)
        if not is_integer(num_components):
            raise TypeError(f"num_components must be an int, got {num_components!r}")
        num_components = int(num_components)
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if not is_integer(num_kmeans_iters) or num_kmeans_iters < 0:
            raise ValueError(f"num_kmeans_iters must be an int >= 0, got {num_kmeans_iters!r}")
        num_kmeans_iters = int(num_kmeans_iters)
        shape = tuple(np.shape(x))
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"x has shape {shape}, expected (N, D) with N >= 1 and D >= 1")
        if num_components > shape[0]:
            raise ValueError(
                f"num_components={num_components} is larger than the number of data N={shape[0]}"
            )
        x = jnp.asarray(x, canonical_float_dtype(x))
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError("x contains NaN or Inf")
        weights, means, covs = _kmeans_start(
            key,
            x,
            jnp.asarray(reg_covar, x.dtype),
            jnp.asarray(num_kmeans_iters, jnp.int32),
            num_components=num_components,
            covariance_type=covariance_type,
        )
        return cls(weights, means, covs, covariance_type, reg_covar)


# Rows per block in ``initialize``: about this many elements in a block's largest temporary
# ((rows, K) distances, or (rows, K D) for the full scatter), so that only one block's
# temporaries are alive at a time and memory stays near the data's own size.
_INIT_BLOCK_ELEMENTS = 2**18


def _sum_over_row_blocks(fn: Any, x: Array, width: int, init: Any) -> Any:
    """$\\sum_b$ ``fn(x_b)`` over blocks $x_b$ of rows of ``x`` (pytrees added leafwise).

    Blocks have about ``_INIT_BLOCK_ELEMENTS / width`` rows; full blocks are read with a
    dynamic slice inside a ``fori_loop`` (a static slice of ``x`` would be copied whole),
    the remainder once more."""
    n = x.shape[0]
    size = int(min(n, max(8, _INIT_BLOCK_ELEMENTS // max(width, 1))))
    num_full, rest = divmod(n, size)

    def add(total, block):
        return jax.tree_util.tree_map(jnp.add, total, fn(block))

    total = jax.lax.fori_loop(
        0,
        num_full,
        lambda i, t: add(t, jax.lax.dynamic_slice_in_dim(x, i * size, size)),
        init,
    )
    return add(total, x[num_full * size :]) if rest else total


def _sum_with_responsibilities(fn: Any, x: Array, resp: Array, shape: tuple) -> Array:
    r"""$\sum_b$ ``fn(x_b, r_b)`` over blocks of rows of the data and their responsibilities,
    so that an exact fallback's ``(B, K, D)`` differences never take a whole chunk's rows."""
    d = x.shape[1]
    return _sum_over_row_blocks(
        lambda rows: fn(rows[:, :d], rows[:, d:]),
        jnp.concatenate([x, resp], axis=1),
        d * resp.shape[1],
        jnp.zeros(shape, resp.dtype),
    )


def _positive_definite(cov: Float[Array, "K D D"]) -> Float[Array, "K D D"]:
    r"""``cov`` where its precision factor (what the constructor checks) is finite; else
    ``cov`` plus the first jitter $j\,s\,D\,\epsilon\,I$, $j \in \{1, 10^2, 10^4\}$ ($s$ the
    largest variance of that matrix), that makes it so; else $sI$. A scatter of collinear or
    repeated data is singular, and ``reg_covar`` may be below float32's resolution of it."""
    d = cov.shape[-1]
    dtype = cov.dtype
    eye = _eye(d, dtype)[None]
    s = jnp.max(jnp.diagonal(cov, axis1=-2, axis2=-1), axis=-1)
    s = jnp.maximum(s, jnp.finfo(dtype).tiny)[:, None, None]
    eps = float(jnp.finfo(dtype).eps)
    candidates = [cov] + [cov + (level * d * eps) * s * eye for level in (1.0, 1e2, 1e4)]
    result = s * eye
    for candidate in reversed(candidates):
        raw = _precision_factor_from_covariance(candidate, "full")
        ok = jnp.all(jnp.isfinite(raw), axis=(-2, -1))
        result = jnp.where(ok[:, None, None], candidate, result)
    return result


@functools.partial(jax.jit, static_argnames=("num_components", "covariance_type"))
def _kmeans_start(key, x, reg_covar, num_iters, *, num_components, covariance_type):
    n, d = x.shape
    k = num_components
    dtype = x.dtype
    key_first, key_rest = jr.split(key)
    full = covariance_type == "full"

    def sq_dist(c):  # fused: no (N, D) temporary
        return jnp.sum((x - c[None]) ** 2, axis=-1)

    num_trials = 2 + int(math.log(k))

    def seed(i, carry):
        centres, d2 = carry
        # Greedy D^2 sampling: draw a few candidates, keep the one that lowers the k-means
        # potential most; if every point is already a centre, draw uniformly. Drawn by
        # inverting the cumulative sum (one (N,) array; categorical would hold (trials, N)
        # random bits and noise).
        mass = jnp.where(jnp.sum(d2) > 0, d2, 1.0)
        cumulative = jnp.cumsum(mass)
        u = jr.uniform(jr.fold_in(key_rest, i), (num_trials,), dtype) * cumulative[-1]
        picks = jnp.minimum(jnp.searchsorted(cumulative, u, side="right"), n - 1)
        candidates = x[picks]
        cand_d2 = jnp.minimum(d2[None], jax.vmap(sq_dist)(candidates))
        best = jnp.argmin(jnp.sum(cand_d2, axis=-1))
        return centres.at[i].set(candidates[best]), cand_d2[best]

    first = x[jr.randint(key_first, (), 0, n)]
    centres = jnp.zeros((k, d), dtype).at[0].set(first)
    centres, _ = jax.lax.fori_loop(1, k, seed, (centres, sq_dist(first)))

    # Distances are expanded about the data mean (so they do not cancel as they would about
    # the origin), one block of rows at a time.
    shift = jnp.mean(x, axis=0)

    def labels(centres, xb):
        cc = centres - shift[None]
        xcb = xb - shift[None]
        d2 = jnp.sum(xcb**2, axis=-1)[:, None] - 2 * xcb @ cc.T + jnp.sum(cc**2, axis=-1)[None]
        return jnp.argmin(d2, axis=-1)

    def block_statistics(centres, xb, with_second):
        # Sums of the differences from each row's own centre: exact and small, so the
        # scatter below needs no E[x x^T] - m m^T.
        lab = labels(centres, xb)
        onehot = jax.nn.one_hot(lab, k, dtype=dtype)
        diff = xb - centres[lab]
        out = (jnp.sum(onehot, axis=0), onehot.T @ diff)
        if not with_second:
            return out
        if not full:
            return (*out, onehot.T @ diff**2)
        spread = (onehot[:, :, None] * diff[:, None, :]).reshape(-1, k * d)
        return (*out, (spread.T @ diff).reshape(k, d, d))

    def lloyd(_, centres):
        init = (jnp.zeros((k,), dtype), jnp.zeros((k, d), dtype))
        counts, sums = _sum_over_row_blocks(
            lambda xb: block_statistics(centres, xb, False), x, max(k, d), init
        )
        moved = centres + sums / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where((counts > 0)[:, None], moved, centres)  # an empty cluster stays

    centres = jax.lax.fori_loop(0, num_iters, lloyd, centres)
    second_shape = (k, d, d) if full else (k, d)
    init = (jnp.zeros((k,), dtype), jnp.zeros((k, d), dtype), jnp.zeros(second_shape, dtype))
    counts, sums, second = _sum_over_row_blocks(
        lambda xb: block_statistics(centres, xb, True), x, k * d if full else max(k, d), init
    )
    # Cluster means and scatters about them, from the sums about each cluster's centre.
    safe = jnp.maximum(counts, 1.0)
    offset = sums / safe[:, None]
    means = jnp.where((counts > 0)[:, None], centres + offset, centres)
    # The whole data's scatter by the law of total variance: within plus between clusters.
    mean = counts @ means / n
    between = means - mean[None]
    tiny = _tiny(dtype)
    weights = (counts + tiny) / jnp.sum(counts + tiny)
    few = counts < 2
    if not full:
        within = jnp.maximum(second - counts[:, None] * offset**2, 0.0)
        overall = (jnp.sum(within, axis=0) + counts @ between**2) / n + reg_covar
        covs = jnp.where(few[:, None], overall[None], within / safe[:, None] + reg_covar)
        # A variance that is still 0 (constant data, reg_covar=0) becomes a tiny positive one.
        floor = jnp.maximum(
            jnp.max(overall) * d * float(jnp.finfo(dtype).eps), jnp.finfo(dtype).tiny
        )
        covs = jnp.where(covs > 0, covs, floor)
        return weights, means, covs
    within = second - counts[:, None, None] * (offset[:, :, None] * offset[:, None, :])
    within = 0.5 * (within + jnp.swapaxes(within, -1, -2))
    spread = jnp.einsum("k,ki,kj->ij", counts, between, between)
    overall = (jnp.sum(within, axis=0) + spread) / n
    overall = 0.5 * (overall + overall.T)
    eye = _eye(d, dtype)[None]
    covs = jnp.where(few[:, None, None], overall[None], within / safe[:, None, None])
    return weights, means, _positive_definite(covs + reg_covar * eye)


# --------------------------------------------------------------------------- prior
@final
class GaussianMixturePrior(eqx.Module):
    r"""The conjugate prior on a Gaussian mixture, for MAP-EM: ``ej.fit(model, x, prior=prior)``.

    $w \sim \mathrm{Dir}(\alpha)$ and, independently per component,
    $(\mu_k, \Sigma_k) \sim \mathrm{NIW}(m_0, \kappa_0, \nu_0, \Psi_0)$:
    $\mu_k\mid\Sigma_k \sim \mathcal N(m_0, \Sigma_k/\kappa_0)$, $\Sigma_k \sim
    \mathcal{W}^{-1}(\Psi_0, \nu_0)$. For ``"diag"`` models each dimension has the
    normal-inverse-gamma prior $\mu_{kd}\mid\sigma^2_{kd} \sim \mathcal N(m_{0d},
    \sigma^2_{kd}/\kappa_0)$, $\sigma^2_{kd} \sim \mathrm{IG}(\nu_0/2, \Psi_{0,dd}/2)$.

    Calling it, ``prior(model)``, gives the exact $\log p(\theta)$ as a density in the
    constrained parameters $(w, \mu, \Sigma)$. ``GaussianMixture.maximize`` with it gives
    the joint posterior mode: $m_k = (\sum_n r_{nk}x_n + \kappa_0 m_0)/(n_k+\kappa_0)$,
    $\Psi_k = \Psi_0 + \sum_n r_{nk}(x_n-m_k)(x_n-m_k)^\top + \kappa_0(m_k-m_0)(m_k-m_0)^\top$,
    $\Sigma_k = \Psi_k/(n_k+\nu_0+D+2)$ (diag: $\Psi_{k,dd}/(n_k+\nu_0+3)$) plus ``reg_covar``,
    and $w_k \propto n_k + \alpha_k - 1$.

    **Arguments** (all keyword except ``dim``):

    - `dim`: the data dimension $D$ (may be left out when `mean` is given).
    - `concentration`: $\alpha \ge 1$, a scalar or ``(K,)`` (default 1: flat on the simplex).
    - `mean`: $m_0$, shape ``(D,)`` (default zeros; ``from_data`` uses the data mean).
    - `mean_precision`: $\kappa_0 > 0$ (default 1).
    - `dof`: $\nu_0 > D-1$ (default $D$, as scikit-learn's ``BayesianGaussianMixture``).
    - `scale`: $\Psi_0$, ``(D, D)`` positive definite or ``(D,)`` diagonal (default $I$).

    ```python
    prior = ej.models.GaussianMixturePrior.from_data(x)
    res = ej.fit(model, x, prior=prior)
    ```
    """

    concentration: Array
    mean: Float[Array, " D"]
    mean_precision: Float[Array, ""]
    dof: Float[Array, ""]
    scale: Float[Array, "D D"]

    def __init__(
        self,
        dim: int | None = None,
        *,
        concentration: Any = 1.0,
        mean: Any = None,
        mean_precision: Any = 1.0,
        dof: Any = None,
        scale: Any = None,
    ):
        if mean is not None:
            mean = jnp.asarray(mean, canonical_float_dtype(mean))
            if mean.ndim != 1 or (dim is not None and mean.shape[0] != dim):
                raise ValueError(f"mean has shape {mean.shape}, expected (D,) with D={dim}")
            dim = mean.shape[0]
        if not is_integer(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int (or give mean), got {dim!r}")
        dim = int(dim)
        dtype = mean.dtype if mean is not None else jnp.zeros(()).dtype
        self.mean = jnp.zeros((dim,), dtype) if mean is None else mean
        self.concentration = jnp.asarray(concentration, dtype)
        self.mean_precision = jnp.asarray(mean_precision, dtype)
        self.dof = jnp.asarray(dim if dof is None else dof, dtype)
        scale = _eye(dim, dtype) if scale is None else jnp.asarray(scale, dtype)
        if scale.shape == (dim,):
            scale = jnp.diag(scale)
        if scale.shape != (dim, dim):
            raise ValueError(f"scale has shape {scale.shape}, expected (D, D) or (D,), D={dim}")
        self.scale = scale
        if self.concentration.ndim > 1:
            raise ValueError(
                f"concentration has shape {self.concentration.shape}, expected a scalar or (K,)"
            )
        if self.mean_precision.ndim or self.dof.ndim:
            raise ValueError("mean_precision and dof must be scalars")
        if is_concrete(self.concentration, self.mean_precision, self.dof, self.scale):
            if not bool(jnp.all(self.concentration >= 1)):
                raise ValueError(
                    f"concentration must be >= 1 (the MAP weights must lie inside the simplex), "
                    f"got {self.concentration}"
                )
            if not float(self.mean_precision) > 0:
                raise ValueError(f"mean_precision must be > 0, got {float(self.mean_precision)}")
            if not float(self.dof) > max(dim - 1, 0):
                raise ValueError(
                    f"dof must be > D - 1 = {dim - 1} (and > 0), got {float(self.dof)}"
                )
            sym = bool(jnp.allclose(scale, scale.T))
            if not sym or not bool(jnp.all(jnp.isfinite(jnp.linalg.cholesky(scale)))):
                raise ValueError("scale must be a symmetric positive-definite (D, D) matrix")

    @classmethod
    def from_data(cls, x: Float[Array, "N D"], **kwargs: Any) -> "GaussianMixturePrior":
        """Defaults as scikit-learn's ``BayesianGaussianMixture``: $m_0$ the data mean,
        $\\Psi_0$ the data covariance, $\\nu_0 = D$, $\\kappa_0 = 1$; ``kwargs`` override."""
        x = jnp.asarray(x, canonical_float_dtype(x))
        if x.ndim != 2:
            raise ValueError(f"x has shape {x.shape}, expected (N, D)")
        centred = x - jnp.mean(x, axis=0)[None]
        kwargs.setdefault("mean", jnp.mean(x, axis=0))
        kwargs.setdefault("scale", centred.T @ centred / max(x.shape[0] - 1, 1))
        return cls(x.shape[1], **kwargs)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _cast(self, model: GaussianMixture) -> "GaussianMixturePrior":
        if model.dim != self.dim:
            raise ValueError(
                f"the prior has dimension D={self.dim} but the model has D={model.dim}"
            )
        k = model.num_components
        if self.concentration.ndim == 1 and self.concentration.shape[0] != k:
            raise ValueError(
                f"concentration has shape {self.concentration.shape}, expected (K,) = ({k},)"
            )
        dtype = model.loc.dtype
        prior = jax.tree_util.tree_map(lambda a: a.astype(dtype), self)
        return eqx.tree_at(
            lambda p: p.concentration, prior, jnp.broadcast_to(prior.concentration, (k,))
        )

    def __call__(self, model: GaussianMixture) -> Scalar:
        r"""$\log p(\theta)$: Dirichlet on $w$, NIW (diag: normal-inverse-gamma) per component."""
        p = self._cast(model)
        d = model.dim
        alpha, m0, kappa, nu, psi = p.concentration, p.mean, p.mean_precision, p.dof, p.scale
        log_dir = (
            jss.gammaln(jnp.sum(alpha))
            - jnp.sum(jss.gammaln(alpha))
            + jnp.sum((alpha - 1) * model.log_weights)
        )
        factor = model._precision_factor
        log_prec_diag = model._log_precision_diag  # sum over d: 0.5 log|Sigma^{-1}|
        dm = model.loc - m0[None]
        if model.covariance_type == "diag":
            a, b = nu / 2, jnp.diagonal(psi)[None] / 2
            prec = factor**2
            log_normal = (
                0.5 * jnp.log(kappa) - 0.5 * _LOG_2PI + log_prec_diag - 0.5 * kappa * dm**2 * prec
            )
            log_ig = a * jnp.log(b) - jss.gammaln(a) + 2 * (a + 1) * log_prec_diag - b * prec
            return log_dir + jnp.sum(log_normal + log_ig)
        half_log_det_prec = jnp.sum(log_prec_diag, axis=-1)  # (K,)
        y = jnp.einsum("kij,kj->ki", factor, dm)
        log_normal = (
            0.5 * d * (jnp.log(kappa) - _LOG_2PI)
            + half_log_det_prec
            - 0.5 * kappa * jnp.sum(y**2, -1)
        )
        trace = jnp.einsum("kai,ij,kaj->k", factor, psi, factor)  # tr(Psi Sigma^-1)
        log_iw = (
            0.5 * nu * jnp.linalg.slogdet(psi)[1]
            - 0.5 * nu * d * math.log(2.0)
            - jss.multigammaln(nu / 2, d)
            + (nu + d + 1) * half_log_det_prec
            - 0.5 * trace
        )
        return log_dir + jnp.sum(log_normal + log_iw)
