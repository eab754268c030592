r"""Recognition families: the distributions $q(z) = \prod_n q_n(z_n)$ that the E-step fits.

A family object either holds its per-datum parameters (a *realised* q) or not yet
(a *spec*, such as ``ej.Categorical()``); ``initialize`` turns a spec into a realised q
for the data. Every realised q gives, per datum, $E_{q_n}[\log p(x_n, z)]$ and the
entropy $H[q_n]$ — all that ``free_energy`` needs.
"""

import abc
import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._custom_types import Array, Data, Key, LogTable, PerDatum
from ._latent import AbstractLatent, Chain, Discrete, Real
from ._model import Model
from ._validate import is_integer, to_python_number


def num_data(x: Data) -> int:
    """The number of data: the length of the leading axis."""
    return jax.tree_util.tree_leaves(x)[0].shape[0]


def _name(obj: Any) -> str:
    return type(obj).__name__


class AbstractQ(eqx.Module):
    r"""A recognition distribution over the latent variables of a batch of data."""

    def resolve(self, model: Model, x: Data) -> "AbstractQ":
        """The realised q this object stands for (``ExactPosterior`` computes it)."""
        del model, x
        return self

    @property
    def is_realised(self) -> bool:
        """Whether this q holds its per-datum parameters (a spec such as
        ``ej.Categorical()`` does not)."""
        leaves = jax.tree_util.tree_leaves(self, is_leaf=lambda v: v is None)
        return not any(leaf is None for leaf in leaves)

    @abc.abstractmethod
    def initialize(self, model: Model, x: Data, *, key: Key | None = None) -> "AbstractQ":
        """A realised q for data ``x`` (returns ``self`` if already realised and valid)."""

    @abc.abstractmethod
    def exact_update(self, model: Model, x: Data, *, table: LogTable | None = None) -> "AbstractQ":
        r"""The exact E-step within this family: $\arg\min_{q} F(q, \theta)$."""

    @abc.abstractmethod
    def expected_log_joint(
        self, model: Model, x: Data, *, key: Key | None = None, table: LogTable | None = None
    ) -> PerDatum:
        r"""$E_{q_n}[\log p(x_n, z \mid \theta)]$ for every datum, shape ``(N,)``.

        ``table``, if given, is ``model.log_joint_table(x)`` already computed.
        """

    @abc.abstractmethod
    def entropy(self) -> PerDatum:
        r"""$H[q_n] = -E_{q_n}[\log q_n(z)]$ for every datum, shape ``(N,)``."""

    @abc.abstractmethod
    def check(self, latent: AbstractLatent, n: int) -> None:
        """Raise ``TypeError``/``ValueError`` if this q does not fit the latent space or ``n`` data."""

    @property
    def needs_key(self) -> bool:
        """Whether expectations under this q are Monte Carlo (and so need a key)."""
        return False

    def elbo_terms(
        self, model: Model, x: Data, *, key: Key | None = None, table: LogTable | None = None
    ) -> PerDatum:
        r"""The bracket of F for every datum of a realised q, shape ``(N,)``: by default
        $E_{q_n}[\log p(x_n, z \mid \theta)] + H[q_n]$."""
        expected = self.expected_log_joint(model, x, key=key, table=table)
        return expected + self.entropy().astype(expected.dtype)

    def split_rows(self) -> tuple[Any, Any]:
        """``(rows, rest)``: the per-datum arrays (one row per datum, sliced, padded and
        sharded with the data) and everything else (``eqx.combine`` joins them). By default
        every array is per datum; an amortized q has none."""
        return eqx.partition(self, eqx.is_array)


class ExactPosterior(AbstractQ):
    r"""$q_n = p(z \mid x_n, \theta)$, recomputed from the model at every use.

    By enumeration for ``Discrete`` latents; from the model's ``posterior`` hook otherwise.
    With it, $F(q, \theta) = -\frac1N\sum_n \log p(x_n \mid \theta)$.
    """

    def resolve(self, model: Model, x: Data) -> AbstractQ:
        return model.posterior(x)

    def initialize(self, model, x, *, key=None):
        return model.posterior(x)

    def exact_update(self, model, x, *, table=None):
        return model.posterior(x)

    def expected_log_joint(self, model, x, *, key=None, table=None):
        return self.resolve(model, x).expected_log_joint(model, x, key=key, table=table)

    def entropy(self):
        raise TypeError("ExactPosterior has no entropy of its own: call q.resolve(model, x) first")

    def check(self, latent, n):
        del latent, n


# --------------------------------------------------------------------------- discrete
def _table_or_compute(model: Model, x: Data, table: LogTable | None) -> LogTable:
    return model.log_joint_table(x) if table is None else table


def _weighted_table_sum(probs: Array, table: LogTable) -> PerDatum:
    # sum_k p_k T_k, with 0 * (-inf) := 0 and a gradient that stays finite there.
    # (`!= 0`, not `> 0`: NaN probabilities must propagate, not be dropped as zeros.)
    nonzero = probs != 0
    safe_table = jnp.where(nonzero, table, 0.0)
    return jnp.sum(jnp.where(nonzero, probs * safe_table, 0.0), axis=-1)


def normalize_table(table: LogTable) -> tuple[Array, "Categorical"]:
    r"""The exact posterior of a log-joint table: ``(log_normalizer (N, 1), Categorical)``,
    with one exp per entry (``logsumexp`` then ``softmax`` would take two)."""
    top = jnp.max(table, axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    weights = jnp.exp(table - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    log_normalizer = top + jnp.log(total)
    return log_normalizer, Categorical(table - log_normalizer, weights / total)


def _check_discrete(q: AbstractQ, latent: AbstractLatent) -> Discrete:
    if not isinstance(latent, Discrete):
        raise TypeError(
            f"q={_name(q)} is a distribution over a Discrete latent, but the model's latent "
            f"space is {latent!r}; use ej.Gaussian() or ej.PointMass() for Real latents"
        )
    return latent


class Categorical(AbstractQ):
    r"""Free-form categorical $q_n(z{=}k) = \mathrm{softmax}(\ell_n)_k$ for ``Discrete`` latents.

    Its exact E-step is the exact posterior. With ``ej.GradientEStep`` it gives partial
    E-steps (Neal & Hinton, 1998): a few optimizer steps on the logits ``(N, K)``.
    ``ej.Categorical()`` starts from the uniform distribution.
    """

    logits: Array | None = None
    # The normalised probabilities when they are already known (``normalize_table``), so
    # that ``probs`` costs no second exp per entry. Internal; None otherwise.
    known_probs: Array | None = eqx.field(default=None, repr=False)

    @property
    def is_realised(self) -> bool:
        return self.logits is not None

    @property
    def log_probs(self) -> Array:
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def probs(self) -> Array:
        """Responsibilities $q_n(z{=}k)$, shape ``(N, K)``."""
        if self.known_probs is not None:
            return self.known_probs
        return jax.nn.softmax(self.logits, axis=-1)

    def initialize(self, model, x, *, key=None):
        latent = _check_discrete(self, model.latent)
        if self.logits is not None:
            self.check(latent, num_data(x))
            return self
        from ._model import float_dtype

        return Categorical(jnp.zeros((num_data(x), latent.num_states), float_dtype(model)))

    def exact_update(self, model, x, *, table=None):
        table = _table_or_compute(model, x, table)
        return Categorical(table - jax.nn.logsumexp(table, axis=-1, keepdims=True))

    def expected_log_joint(self, model, x, *, key=None, table=None):
        return _weighted_table_sum(self.probs, _table_or_compute(model, x, table))

    def entropy(self):
        log_p = self.log_probs
        return -_weighted_table_sum(jnp.exp(log_p), log_p)

    def check(self, latent, n):
        latent = _check_discrete(self, latent)
        if self.logits is None:
            return
        expected = (n, latent.num_states)
        if self.logits.shape != expected:
            raise ValueError(
                f"Categorical logits have shape {self.logits.shape}, expected (N, K) = {expected}"
            )


class PointMass(AbstractQ):
    r"""A point mass $q_n = \delta(z - \hat z_n)$: hard EM.

    Its exact E-step is the posterior mode: $\hat z_n = \arg\max_z \log p(x_n, z)$ for
    ``Discrete`` latents, the Viterbi path for ``Chain`` ones, and the mode of the model's
    ``posterior`` for ``Real`` ones (or fit it with ``ej.GradientEStep``). The entropy term is taken as zero, so
    $F = -\frac1N\sum_n \log p(x_n, \hat z_n)$: the hard-EM ("classification") objective.
    """

    value: Array | None = None
    num_states: int | None = eqx.field(static=True, default=None)

    @property
    def probs(self) -> Array:
        """One-hot responsibilities ``(N, K)`` (``Discrete`` latents only)."""
        if self.num_states is None:
            raise TypeError("PointMass.probs is only defined for Discrete latents")
        return jax.nn.one_hot(self.value, self.num_states)

    @property
    def mean(self) -> Array:
        """The point itself, flattened to ``(N, d)`` (``Real`` latents)."""
        return self.value.reshape(self.value.shape[0], -1)

    @property
    def covariance(self) -> Array:
        n, d = self.mean.shape
        return jnp.zeros((n, d, d), self.value.dtype)

    def initialize(self, model, x, *, key=None):
        latent = model.latent
        n = num_data(x)
        if self.value is not None:
            self.check(latent, n)
            return self
        if isinstance(latent, (Discrete, Chain)):
            return self.exact_update(model, x)
        if isinstance(latent, Real):
            from ._model import float_dtype

            return PointMass(jnp.zeros((n, *latent.shape), float_dtype(model)))
        raise TypeError(f"PointMass does not support latent space {latent!r}")

    def exact_update(self, model, x, *, table=None):
        latent = model.latent
        if isinstance(latent, Discrete):
            table = _table_or_compute(model, x, table)
            return PointMass(jnp.argmax(table, axis=-1), latent.num_states)
        if isinstance(latent, Chain):
            from ._chain import chain_mode

            return PointMass(chain_mode(model, x)[0])
        posterior = model.posterior(x)
        mode = posterior.mean.reshape(num_data(x), *latent.shape)
        return PointMass(mode)

    def expected_log_joint(self, model, x, *, key=None, table=None):
        if self.num_states is not None and table is not None:
            return jnp.take_along_axis(table, self.value[:, None], axis=-1)[:, 0]
        return jax.vmap(model.log_joint)(x, self.value)

    def entropy(self):
        return jnp.zeros(self.value.shape[:1], jnp.result_type(float))

    def check(self, latent, n):
        if self.value is None:
            return
        if isinstance(latent, Discrete):
            if self.value.shape != (n,) or not jnp.issubdtype(self.value.dtype, jnp.integer):
                raise ValueError(
                    f"PointMass value has shape {self.value.shape} and dtype {self.value.dtype}, "
                    f"expected integers of shape (N,) = ({n},) for a Discrete latent"
                )
        elif isinstance(latent, Chain):
            if (
                self.value.ndim != 2
                or self.value.shape[0] != n
                or not jnp.issubdtype(self.value.dtype, jnp.integer)
            ):
                raise ValueError(
                    f"PointMass value has shape {self.value.shape} and dtype {self.value.dtype}, "
                    f"expected integer paths of shape (N, T) with N={n} for a Chain latent"
                )
        elif isinstance(latent, Real):
            if self.value.shape != (n, *latent.shape):
                raise ValueError(
                    f"PointMass value has shape {self.value.shape}, expected (N, *latent.shape) "
                    f"= {(n, *latent.shape)}"
                )
        else:
            raise TypeError(f"PointMass does not support latent space {latent!r}")


# --------------------------------------------------------------------------- gaussian
def _check_real(q: AbstractQ, latent: AbstractLatent) -> Real:
    if not isinstance(latent, Real):
        raise TypeError(
            f"q={_name(q)} is a distribution over a Real latent, but the model's latent space "
            f"is {latent!r}; use ej.Categorical() or ej.PointMass() for Discrete latents"
        )
    return latent


class Gaussian(AbstractQ):
    r"""A Gaussian $q_n = \mathcal N(\mu_n, L_n L_n^\top)$ per datum, for ``Real`` latents.

    ``covariance_type="full"`` (a lower-triangular $L_n$) or ``"diag"`` (mean-field).
    The parameters are unconstrained (``raw_scale`` holds $\log$ of the diagonal of
    $L_n$), so ``ej.GradientEStep`` can fit them directly. The entropy is exact.

    Expectations $E_{q_n}[f(z)]$ use ``expectation="cubature"`` by default: the
    $2d$-point spherical cubature rule $z = \mu_n \pm \sqrt d\, L_n e_i$, deterministic and
    exact when $\log p(x, z)$ is a polynomial of degree $\le 3$ in $z$ — so for every
    linear-Gaussian model (PPCA, factor analysis, Kalman) $F$ is exact. For other models
    it is an approximation; ``expectation="monte_carlo"`` uses ``num_samples``
    reparameterised samples instead (unbiased, needs a ``key``).

    ``importance_weighted=True`` (with ``"monte_carlo"``): the bracket of F for a datum is
    the importance-weighted bound of Burda et al. (2016) with $k$ = ``num_samples`` draws,
    $\log \frac1k \sum_{i=1}^k p(x_n, z_i \mid \theta) / q_n(z_i)$, which is at most
    $\log p(x_n \mid \theta)$ and rises towards it as $k$ grows ($k = 1$: the ELBO).
    """

    mean: Array | None = None
    raw_scale: Array | None = None
    covariance_type: Literal["full", "diag"] = eqx.field(static=True, default="full")
    expectation: Literal["cubature", "monte_carlo"] = eqx.field(static=True, default="cubature")
    num_samples: int = eqx.field(static=True, default=1, converter=to_python_number)
    importance_weighted: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.importance_weighted and self.expectation != "monte_carlo":
            raise ValueError(
                "importance_weighted=True draws samples: it needs expectation='monte_carlo'"
            )
        if self.covariance_type not in ("full", "diag"):
            raise ValueError(
                f"covariance_type must be 'full' or 'diag', got {self.covariance_type!r}"
            )
        if self.expectation not in ("cubature", "monte_carlo"):
            raise ValueError(
                f"expectation must be 'cubature' or 'monte_carlo', got {self.expectation!r}"
            )
        if not is_integer(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")

    @classmethod
    def from_moments(cls, mean: Array, covariance: Array, **kwargs) -> "Gaussian":
        """A full-covariance Gaussian from means ``(N, d)`` and covariances ``(N, d, d)``."""
        chol = jnp.linalg.cholesky(covariance)
        diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
        raw = jnp.tril(chol, -1) + _diag_embed(jnp.log(diag))
        return cls(mean, raw, covariance_type="full", **kwargs)

    @property
    def scale_tril(self) -> Array:
        """$L_n$, shape ``(N, d, d)``."""
        if self.covariance_type == "diag":
            return _diag_embed(jnp.exp(self.raw_scale))
        diag = jnp.exp(jnp.diagonal(self.raw_scale, axis1=-2, axis2=-1))
        return jnp.tril(self.raw_scale, -1) + _diag_embed(diag)

    @property
    def covariance(self) -> Array:
        """$\\Sigma_n = L_n L_n^\\top$, shape ``(N, d, d)``."""
        scale = self.scale_tril
        return scale @ jnp.swapaxes(scale, -1, -2)

    @property
    def needs_key(self) -> bool:
        return self.expectation == "monte_carlo"

    def initialize(self, model, x, *, key=None):
        latent = _check_real(self, model.latent)
        n = num_data(x)
        if self.mean is not None:
            self.check(latent, n)
            return self
        from ._model import float_dtype

        dtype = float_dtype(model)
        d = latent.size
        raw_shape = (n, d) if self.covariance_type == "diag" else (n, d, d)
        return eqx.tree_at(
            lambda q: (q.mean, q.raw_scale),
            self,
            (jnp.zeros((n, d), dtype), jnp.zeros(raw_shape, dtype)),
            is_leaf=lambda v: v is None,
        )

    def exact_update(self, model, x, *, table=None):
        posterior = model.posterior(x)
        if not isinstance(posterior, Gaussian):
            raise TypeError(
                f"{_name(model)}.posterior returned {_name(posterior)}, not a Gaussian, so "
                "q=ej.Gaussian() has no exact E-step; use e_step=ej.GradientEStep(...)"
            )
        if self.covariance_type == "diag":
            raise TypeError(
                "q=ej.Gaussian(covariance_type='diag') has no exact E-step (the posterior is not "
                "mean-field in general); use e_step=ej.GradientEStep(...) or the full covariance"
            )
        return Gaussian(
            posterior.mean,
            posterior.raw_scale
            if posterior.covariance_type == "full"
            else _diag_embed(posterior.raw_scale),
            covariance_type="full",
            expectation=self.expectation,
            num_samples=self.num_samples,
        )

    def _noise(self, key: Key | None) -> Array:
        """Standard normal draws ``(N, S, d)`` for the Monte Carlo points."""
        if key is None:
            raise ValueError(
                "q=ej.Gaussian(expectation='monte_carlo') needs a random key: pass key=jax.random.key(...)"
            )
        n, d = self.mean.shape
        return jr.normal(key, (n, self.num_samples, d), self.mean.dtype)

    def _points(self, key: Key | None, noise: Array | None = None) -> Array:
        """Evaluation points ``(N, S, d)`` and their equal weights (implicit: the mean over S)."""
        n, d = self.mean.shape
        scale = self.scale_tril
        if self.expectation == "cubature":
            unit = math.sqrt(d) * jnp.concatenate([jnp.eye(d), -jnp.eye(d)], axis=0).astype(
                self.mean.dtype
            )
            return self.mean[:, None, :] + jnp.einsum("nij,sj->nsi", scale, unit)
        noise = self._noise(key) if noise is None else noise
        if self.covariance_type == "diag":
            return self.mean[:, None, :] + jnp.exp(self.raw_scale)[:, None, :] * noise
        return self.mean[:, None, :] + jnp.einsum("nij,nsj->nsi", scale, noise)

    def _log_joint_at(self, model: Model, x: Data, points: Array) -> Array:
        r"""$\log p(x_n, z)$ at each datum's points, ``(N, S)``."""
        shape = model.latent.shape
        per_datum = lambda xn, zs: jax.vmap(lambda z: model.log_joint(xn, z.reshape(shape)))(zs)
        return jax.vmap(per_datum)(x, points)

    def expected_log_joint(self, model, x, *, key=None, table=None):
        return jnp.mean(self._log_joint_at(model, x, self._points(key)), axis=-1)

    def elbo_terms(self, model, x, *, key=None, table=None):
        if not self.importance_weighted:
            return super().elbo_terms(model, x, key=key, table=table)
        noise = self._noise(key)
        log_p = self._log_joint_at(model, x, self._points(key, noise))
        # log q(z) at z = mean + L noise: -|noise|^2/2 - log|det L| - d log(2 pi)/2
        d = self.mean.shape[-1]
        log_det = self._log_diag().sum(axis=-1)
        log_q = -0.5 * jnp.sum(noise**2, axis=-1) - log_det[:, None]
        log_q = log_q - 0.5 * d * math.log(2 * math.pi)
        log_w = log_p - log_q.astype(log_p.dtype)
        return jax.nn.logsumexp(log_w, axis=-1) - math.log(self.num_samples)

    def _log_diag(self) -> Array:
        if self.covariance_type == "diag":
            return self.raw_scale
        return jnp.diagonal(self.raw_scale, axis1=-2, axis2=-1)

    def entropy(self):
        d = self.mean.shape[-1]
        return 0.5 * d * (1.0 + math.log(2 * math.pi)) + jnp.sum(self._log_diag(), axis=-1)

    def check(self, latent, n):
        latent = _check_real(self, latent)
        if self.mean is None:
            return
        d = latent.size
        if self.mean.shape != (n, d):
            raise ValueError(
                f"Gaussian mean has shape {self.mean.shape}, expected (N, d) = {(n, d)}"
            )
        raw_shape = (n, d) if self.covariance_type == "diag" else (n, d, d)
        if self.raw_scale is None or self.raw_scale.shape != raw_shape:
            got = None if self.raw_scale is None else self.raw_scale.shape
            raise ValueError(f"Gaussian raw_scale has shape {got}, expected {raw_shape}")


def _diag_embed(v: Array) -> Array:
    # Broadcast explicitly: jax_numpy_rank_promotion="raise" forbids the implicit kind.
    eye = jnp.broadcast_to(jnp.eye(v.shape[-1], dtype=v.dtype), (*v.shape, v.shape[-1]))
    return v[..., :, None] * eye
