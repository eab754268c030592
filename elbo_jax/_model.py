"""The abstract ``Model``: a log-joint for one datum, plus optional fast-path hooks."""

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Array, Data, LogTable, PerDatum, Scalar, Stats
from ._latent import AbstractLatent, Chain, Discrete

if TYPE_CHECKING:
    from ._q import AbstractQ
    from ._steps import AbstractMStep


class Model(eqx.Module):
    r"""A latent-variable model, written as $\log p(x, z \mid \theta)$ for one datum.

    Subclass it, put the parameters $\theta$ in fields (any parameterisation you like;
    gradient steps act on every floating-point array field), declare the latent space
    as a class attribute and write ``log_joint`` for **one** datum ``x`` and **one**
    latent value ``z``. elbo_jax does the ``vmap`` over data and over latent values.

    ```python
    class ThreeCoins(ej.Model):
        logits: jax.Array            # (3,): coin choice weight logit, then two head logits
        latent = ej.Discrete(2)

        def log_joint(self, x, z):   # x: number of heads in 10 tosses; z: which coin
            log_w = jax.nn.log_sigmoid(jnp.where(z == 0, self.logits[0], -self.logits[0]))
            l = self.logits[1 + z]
            return log_w + x * jax.nn.log_sigmoid(l) + (10 - x) * jax.nn.log_sigmoid(-l)
    ```

    **Optional hooks.** A model may override these to be faster or to unlock exact
    steps; every hook must agree with ``log_joint`` (the test suite holds built-ins
    to that):

    - ``log_joint_table(x)``: the $(N, K)$ table $\log p(x_n, z{=}k)$ for ``Discrete`` latents;
    - ``posterior(x)``: the exact $p(z \mid x_n)$ as a recognition distribution
      (required for an exact E-step with a ``Real`` latent);
    - ``log_marginal(x)``: $\log p(x_n \mid \theta)$ per datum (``Real`` latents);
    - ``exact_posterior(x)``: both at once, ``(log_marginal, posterior)``;
    - ``has_closed_form(prior)``, ``sufficient_statistics(x, q, *, weights)``,
      ``maximize(stats, prior)``, ``complete_data_statistics(num_data)``: a closed-form M-step
      from expected sufficient statistics that merge (the statistics contract, ``_statistics``);
    - ``datum_features(x)``: data-only values of the rows ``x`` that ``log_joint_table`` and
      ``sufficient_statistics`` take precomputed (``features=``), so that exact EM computes
      them once per fit rather than in every pass;
    - ``check_data(x)``: raise a clear ``ValueError`` for data of the wrong shape.
    """

    latent: eqx.AbstractVar[AbstractLatent]

    # Exact EM on a Discrete latent reads log_joint for data-only values it uses affinely
    # (_autostats) and, for a model without a log_joint_table hook, computes the table from
    # them (computed once per fit). A model whose hook repeats data-only work in every call
    # (the Poisson mixture's log x!) and loses no accuracy to the plain affine form sets this
    # to take that path too; hooks that are more careful than log_joint (the Gaussian
    # mixture's centring) keep the default, False.
    _table_from_features: ClassVar[bool] = False

    #: NaN entries of the data mark missing observations that the model skips exactly
    #: (``LinearGaussianSSM``); otherwise NaN in the data is an error.
    missing_values: ClassVar[bool] = False

    #: The parameters that ``repr(model)`` shows with their values, in their natural
    #: (constrained) form: names of properties or fields, e.g. ``("weights", "means",
    #: "covariances")``. Empty (the default): equinox's repr, each field with its shape.
    printed_parameters: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        if not self.printed_parameters:
            return eqx.tree_pformat(self)
        from ._format import format_model

        return format_model(self, self.printed_parameters)

    @abc.abstractmethod
    def log_joint(self, x: Any, z: Any) -> Scalar:
        r"""$\log p(x, z \mid \theta)$ for one datum ``x`` and one latent value ``z``."""

    # ----------------------------------------------------------------- hooks
    def log_joint_table(self, x: Data) -> LogTable:
        r"""The table $T_{nk} = \log p(x_n, z{=}k \mid \theta)$, shape ``(N, K)``.

        Only for ``Discrete`` latents. The default ``vmap``s ``log_joint`` over data and
        over the ``K`` states; override it with a vectorised version for speed.
        """
        latent = self.latent
        if not isinstance(latent, Discrete):
            raise TypeError(
                f"log_joint_table needs a Discrete latent space, but {type(self).__name__}"
                f".latent is {latent!r}"
            )
        states = jnp.arange(latent.num_states)
        per_datum = lambda xn: jax.vmap(lambda z: self.log_joint(xn, z))(states)
        return jax.vmap(per_datum)(x)

    def posterior(self, x: Data) -> "AbstractQ":
        r"""The exact posterior $p(z \mid x_n, \theta)$ for every datum, as a ``q``.

        ``Discrete`` latents: by enumeration (a ``Categorical``). ``Real`` latents: the
        model must override this (for example returning an ``ej.Gaussian``).
        """
        from ._q import Categorical

        latent = self.latent
        if isinstance(latent, Discrete):
            table = self.log_joint_table(x)
            return Categorical(table - jax.nn.logsumexp(table, axis=-1, keepdims=True))
        if isinstance(latent, Chain):
            from ._chain import chain_posterior

            return chain_posterior(self, x)[1]
        raise NotImplementedError(
            f"{type(self).__name__} has a {type(latent).__name__} latent and no `posterior` hook, "
            "so it has no exact E-step. Use q=ej.Gaussian() with e_step=ej.GradientEStep(...), "
            "or give the model a `posterior(x)` method."
        )

    def log_marginal(self, x: Data) -> PerDatum:
        r"""$\log p(x_n \mid \theta)$ for every datum, shape ``(N,)``."""
        latent = self.latent
        if isinstance(latent, Discrete):
            return jax.nn.logsumexp(self.log_joint_table(x), axis=-1)
        if isinstance(latent, Chain):
            from ._chain import chain_log_marginal

            return chain_log_marginal(self, x)
        raise NotImplementedError(
            f"{type(self).__name__} has a {type(latent).__name__} latent and no `log_marginal` "
            "hook, so log p(x | θ) is not available; free_energy gives an upper bound on -log p(x)."
        )

    def exact_posterior(self, x: Data) -> "tuple[PerDatum, AbstractQ]":
        r"""$\log p(x_n \mid \theta)$ ``(N,)`` and the exact posterior $p(z \mid x_n, \theta)$
        together, as one pass of inference computes them (enumeration, forward–backward);
        by default from ``log_marginal`` and ``posterior``. A model whose posterior gives
        its normaliser on the way (a Kalman smoother) overrides it."""
        latent = self.latent
        if isinstance(latent, Discrete):
            from ._q import normalize_table

            log_normalizer, q = normalize_table(self.log_joint_table(x))
            return log_normalizer[:, 0], q
        if isinstance(latent, Chain):
            from ._chain import chain_posterior

            return chain_posterior(self, x)
        return self.log_marginal(x), self.posterior(x)

    def m_step_penalty(self, stats: Stats | None = None) -> Scalar:
        r"""$P(\theta) \ge 0$ (per datum) such that the closed-form M-step is exact EM on
        $F + P$ rather than on $F$ — a floor such as ``reg_covar`` makes it so. Then one
        iteration may raise $F$ by up to $P(\theta_t) - P(\theta_{t+1})$, and ``fit`` counts
        only rises beyond that (and rounding). ``stats``: the statistics of the posterior
        that the M-step used, when the solver has them (exact EM by statistics passes
        passes the same ones for $\theta_t$ and $\theta_{t+1}$), for a penalty that depends on
        the data through them (an HMM's state occupancies). Default 0: the M-step is exact
        on $F$."""
        del stats
        return jnp.zeros((), float_dtype(self))

    def global_elbo(self) -> Scalar:
        r"""The part of the ELBO that belongs to the whole data set rather than to one datum:
        $E_{q(\beta)}[\log p(\beta)] + H[q(\beta)] = -\mathrm{KL}(q(\beta) \,\|\, p(\beta))$ for
        parameters $\beta$ that the model holds as a variational distribution (LDA's topics,
        $q(\beta_k) = \mathrm{Dir}(\lambda_k)$). F counts it once, like the prior:
        $F = -\frac1N\big(\sum_n w_n\,\text{elbo}_n + \text{global\_elbo} + \log p(\theta)\big)$.
        Default 0: the parameters are point estimates."""
        return jnp.zeros((), float_dtype(self))

    def default_q(self) -> "AbstractQ":
        """The recognition family ``fit`` uses for data in memory when no ``q`` is given:
        ``ej.ExactPosterior()`` by default. A model whose posterior is out of reach gives
        its own (LDA: its mean-field family over each document's topic proportions).
        Online and stream fits always use ``ExactPosterior()``: the model's
        ``exact_posterior`` hook for each batch."""
        from ._q import ExactPosterior

        return ExactPosterior()

    def default_m_step(self) -> "AbstractMStep":
        """What ``fit``'s ``m_step="exact"`` means for this model: ``ej.ExactMStep()`` by
        default (the closed form when ``has_closed_form``, else solved numerically). A model
        with a better exact solver gives it (the Dirichlet-multinomial mixture:
        ``ej.NewtonMStep()``)."""
        from ._steps import ExactMStep

        return ExactMStep()

    def honours_frozen(self, frozen: Any) -> bool:
        """Whether ``maximize(stats, prior, frozen=frozen)`` gives the exact M-step with the
        parameters flagged ``True`` in ``frozen`` (a pytree like the model) held fixed.
        Default False: with frozen parameters, elbo_jax then solves the M-step numerically."""
        del frozen
        return False

    def has_closed_form(self, prior: Any) -> bool:
        """Whether ``maximize`` gives the exact M-step for this prior (``None``: maximum likelihood)."""
        del prior
        return False

    def sufficient_statistics(
        self, x: Data, q: "AbstractQ", *, weights: PerDatum | None = None
    ) -> Stats:
        r"""Expected sufficient statistics $\sum_n w_n E_{q_n}[s(x_n, z)]$ of the data ``x``.

        ``weights`` ``(N,)`` weighs each datum (``None``: all 1; elbo_jax gives padded rows
        weight 0). The result follows the statistics contract (``_statistics``): statistics
        of chunks, shards, minibatches and of models at other $\theta$ merge exactly with
        ``merge_statistics``; a plain pytree of sums merges by addition.
        """
        raise NotImplementedError(f"{type(self).__name__} has no sufficient_statistics hook")

    def datum_features(self, x: Data) -> Any:
        """Values of the rows ``x`` that depend on the data only, which this model's
        ``log_joint_table(x, features=...)`` and ``sufficient_statistics(x, q, ...,
        features=...)`` take instead of computing them (with the same result), or ``None``
        (the default): there are none. Exact EM computes them once per fit, chunk by chunk
        as its passes read the data, when they fit its feature budget
        (``_solvers._statistics_em``)."""
        del x
        return None

    def complete_data_statistics(self, num_data: Any) -> Stats:
        r"""The model's own expected complete-data statistics at $\theta$:
        $E_{p(x, z \mid \theta)}[\sum_{n=1}^{m} s(x_n, z_n)]$ for ``num_data`` $= m$ data drawn
        from the model itself, so that ``maximize`` of them (no prior) gives back $\theta$
        (up to floors such as ``reg_covar``). Online EM's inertia and ``combine`` use them."""
        raise NotImplementedError(f"{type(self).__name__} has no complete_data_statistics hook")

    def maximize(self, stats: Stats, prior: Any = None) -> "Model":
        """The closed-form M-step: the parameters that maximise the expected log-joint
        (plus ``log prior``) given the statistics from ``sufficient_statistics``."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form M-step")

    def check_data(self, x: Data) -> None:
        """Raise a ``ValueError`` naming ``x`` if the data do not fit this model."""
        del x


def has_global_elbo(model: Model) -> bool:
    """Whether the model's class gives its own ``global_elbo`` (else F has no such term)."""
    return type(model).global_elbo is not Model.global_elbo


def has_complete_data_statistics(model: Model) -> bool:
    """Whether the model's class gives its own ``complete_data_statistics``."""
    return type(model).complete_data_statistics is not Model.complete_data_statistics


def float_dtype(model: Model) -> Any:
    """The floating dtype of a model's parameters (the default float dtype if it has none)."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(model) if eqx.is_inexact_array(leaf)]
    if not leaves:
        return jnp.zeros(()).dtype
    return jnp.result_type(*leaves)


def is_finite_tree(tree: Any, *, allow_minus_inf: bool = False) -> Array:
    """A scalar bool: every inexact array leaf of ``tree`` is finite.

    ``allow_minus_inf``: ``-inf`` counts as finite (a log-probability of an impossible state).
    """
    ok = (lambda a: ~jnp.isnan(a) & (a < jnp.inf)) if allow_minus_inf else jnp.isfinite
    leaves = [
        jnp.all(ok(leaf)) for leaf in jax.tree_util.tree_leaves(tree) if eqx.is_inexact_array(leaf)
    ]
    if not leaves:
        return jnp.array(True)
    return jnp.stack(leaves).all()
