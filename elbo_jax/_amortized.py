r"""Amortized recognition: one network, shared by all data, gives each datum's q.

$q_n = q(z \mid \phi(x_n))$ with $\phi$ an encoder: a Gaussian for ``Real`` latents (the
encoder gives its mean and log-scale), a categorical for ``Discrete`` ones (its logits). F is
the same free energy; its per-datum bracket is that of the q the encoder outputs (a
reparameterised Monte Carlo expectation and the exact entropy for the Gaussian, exact sums
for the categorical), so the encoder's weights and the model's parameters are trained
together by gradient steps on F (``_solvers._joint_gradient``).
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Data
from ._latent import AbstractLatent, Discrete, Real
from ._model import Model
from ._q import AbstractQ, Categorical, Gaussian, num_data
from ._validate import is_integer, to_python_number


class Amortized(AbstractQ):
    r"""An amortized recognition distribution: ``encoder`` maps **one** datum to the
    parameters of its $q_n$, and elbo_jax ``vmap``s it over the data.

    - ``Real(shape)`` latent: ``encoder(x_n)`` returns ``(mean, log_scale)``, two arrays of
      the latent's shape, for the diagonal Gaussian $q_n = \mathcal N(\text{mean},
      \operatorname{diag}(e^{2\,\text{log\_scale}}))$. Expectations are reparameterised
      Monte Carlo with ``num_samples`` draws per datum (a fit needs a ``key``); the entropy
      is exact.
    - ``Discrete(K)`` latent: ``encoder(x_n)`` returns the ``(K,)`` logits of a categorical
      $q_n$; expectations and entropy are exact sums.

    ``encoder=None`` uses the model's own ``encoder`` field (``ej.models.VAE`` holds its
    encoder, so the fitted model can ``encode`` and ``reconstruct``).

    ``importance_weighted=True`` (``Real`` latents): F's per-datum bracket is the
    importance-weighted bound with $k$ = ``num_samples``, $\log \frac1k \sum_i
    p(x_n, z_i)/q_n(z_i)$, which tightens towards $\log p(x_n \mid \theta)$ as $k$ grows —
    as a training objective (IWAE) or to estimate the log-evidence:

    ```python
    q = ej.Amortized(encoder, num_samples=1000, importance_weighted=True)
    log_px = -ej.free_energy(model, q, x, key=key)   # a lower bound on mean log p(x_n)
    ```

    ``fit`` trains the encoder jointly with the model (one optimizer over both, on
    minibatches with ``batch_size=``):

    ```python
    ej.fit(decoder, x, q=ej.Amortized(encoder), m_step=ej.GradientMStep(optax.adam(1e-3)),
           batch_size=128, max_iters=50, tol=0.0, key=key)
    ```
    """

    encoder: Any = None
    num_samples: int = eqx.field(static=True, default=1, converter=to_python_number)
    importance_weighted: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.encoder is not None and not callable(self.encoder):
            raise TypeError(
                "encoder must be a callable (an equinox Module) mapping one datum to the "
                f"parameters of q, got {self.encoder!r}"
            )
        if not is_integer(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")
        if not isinstance(self.importance_weighted, bool):
            raise TypeError(
                f"importance_weighted must be True or False, got {self.importance_weighted!r}"
            )

    @property
    def is_realised(self) -> bool:
        return True

    @property
    def needs_key(self) -> bool:
        return True  # Monte Carlo for Real latents (fits on minibatches draw orders too)

    def split_rows(self) -> tuple[Any, Any]:
        return eqx.partition(self, lambda _: False)  # no per-datum arrays: all shared

    def encoder_of(self, model: Model) -> Any:
        """The encoder: this q's own, or the model's ``encoder``."""
        if self.encoder is not None:
            return self.encoder
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise TypeError(
                f"q=ej.Amortized() without an encoder uses the model's own `encoder`, and "
                f"{type(model).__name__} has none: pass ej.Amortized(my_encoder)"
            )
        return encoder

    def resolve(self, model: Model, x: Data) -> AbstractQ:
        """The realised q of the rows ``x``: the encoder's output as an ``ej.Gaussian``
        (diagonal, Monte Carlo) or an ``ej.Categorical``."""
        out = jax.vmap(self.encoder_of(model))(x)
        latent = model.latent
        if isinstance(latent, Discrete):
            return Categorical(out)
        mean, log_scale = out
        n = num_data(x)
        return Gaussian(
            mean.reshape(n, -1),
            log_scale.reshape(n, -1),
            covariance_type="diag",
            expectation="monte_carlo",
            num_samples=self.num_samples,
            importance_weighted=self.importance_weighted,
        )

    def initialize(self, model, x, *, key=None):
        del key
        self.check_encoder(model, x)
        return self

    def exact_update(self, model, x, *, table=None):
        raise TypeError(
            "q=ej.Amortized(...) has no exact E-step: its encoder is trained with the model "
            "by gradient steps (fit with m_step=ej.GradientMStep(...))"
        )

    def expected_log_joint(self, model, x, *, key=None, table=None):
        return self.resolve(model, x).expected_log_joint(model, x, key=key, table=table)

    def entropy(self):
        raise TypeError("Amortized has no entropy of its own: call q.resolve(model, x) first")

    def check(self, latent: AbstractLatent, n: int) -> None:
        del n
        if not isinstance(latent, (Real, Discrete)):
            raise TypeError(
                f"q=ej.Amortized(...) supports Real and Discrete latents, got {latent!r}"
            )
        if self.importance_weighted and isinstance(latent, Discrete):
            raise ValueError(
                "importance_weighted=True is for Real latents; a Discrete latent's expectations "
                "are exact sums (ej.log_evidence gives log p(x) exactly)"
            )

    def check_encoder(self, model: Model, x: Data) -> None:
        """Raise a ``ValueError`` naming the encoder if its output for one datum of ``x`` does
        not fit the model's latent space."""
        latent = model.latent
        self.check(latent, num_data(x))
        encoder = self.encoder_of(model)
        datum = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)
        shown = jax.tree_util.tree_map(lambda a: a.shape, datum)
        try:
            out = eqx.filter_eval_shape(encoder, datum)
        except Exception as error:  # noqa: BLE001 - re-raised with the argument named
            raise ValueError(
                f"the encoder failed on one datum of x (shape {shown}): "
                f"{type(error).__name__}: {error}"
            ) from error
        got = jax.tree_util.tree_map(lambda s: (s.shape, str(s.dtype)), out)
        if isinstance(latent, Discrete):
            want = f"one array of logits of shape ({latent.num_states},)"
            ok = _is_float_struct(out) and out.shape == (latent.num_states,)
        else:
            want = f"(mean, log_scale): two arrays of shape {latent.shape}"
            ok = (
                isinstance(out, (tuple, list))
                and len(out) == 2
                and all(_is_float_struct(o) and o.shape == latent.shape for o in out)
            )
        if not ok:
            raise ValueError(
                f"the encoder's output does not fit the latent space {latent!r}: for one datum "
                f"it must return {want} (floating point), but it returned {got}"
            )


def _is_float_struct(value: Any) -> bool:
    return isinstance(value, jax.ShapeDtypeStruct) and jnp.issubdtype(value.dtype, jnp.floating)
