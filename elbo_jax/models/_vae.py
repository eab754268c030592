r"""The variational autoencoder (Kingma & Welling 2014; Rezende et al. 2014).

$$z \sim \mathcal N(0, I_L), \qquad x \mid z \sim p(x \mid f_\theta(z)),$$

with $f_\theta$ the decoder network and $p$ Bernoulli (binary data; the decoder gives logits)
or Gaussian (the decoder gives means; per-dimension noise scales are parameters). The
recognition distribution is amortized: $q_n = \mathcal N(\mu_\phi(x_n),
\operatorname{diag}\sigma_\phi(x_n)^2)$ from the encoder network, which the model holds so
that the fitted model can encode and reconstruct. ``ej.fit`` trains both by gradient steps
on minibatch estimates of the one free energy F (``_solvers._joint_gradient``).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, final

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._amortized import Amortized
from .._custom_types import Array, Data, Float, Key, Scalar
from .._latent import Real
from .._model import Model
from .._validate import is_integer
from ._mixture import _check_data

_ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu,
}


@final
class MLP(eqx.Module):
    """A multilayer perceptron on one vector: ``Linear`` layers of the given widths with
    an activation between them (none after the last)."""

    layers: tuple[eqx.nn.Linear, ...]
    activation: str = eqx.field(static=True, default="tanh")

    def __call__(self, x: Array) -> Array:
        act = _ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)

    @classmethod
    def initialize(
        cls, key: Key, sizes: Sequence[int], *, activation: str = "tanh", dtype: Any = None
    ) -> "MLP":
        """Layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` (equinox's default init)."""
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        keys = jr.split(key, len(sizes) - 1)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        layers = tuple(
            eqx.nn.Linear(a, b, key=k, dtype=dtype)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        return cls(layers, activation)


@final
class GaussianEncoder(eqx.Module):
    """An encoder for ``ej.Amortized``: one datum to ``(mean, log_scale)`` of its Gaussian
    $q_n$ over a ``Real(L)`` latent, from one network with $2L$ outputs."""

    network: MLP
    latent_dim: int = eqx.field(static=True)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        out = self.network(x)
        return out[: self.latent_dim], out[self.latent_dim :]


@final
class VAE(Model):
    r"""A variational autoencoder with MLP encoder and decoder.

    $z \sim \mathcal N(0, I_L)$; $x \mid z$ is a product of Bernoullis with logits
    ``decoder(z)`` (``likelihood="bernoulli"``, data in {0, 1}) or of Gaussians with means
    ``decoder(z)`` and learned per-dimension scales (``likelihood="gaussian"``).
    ``log_joint`` is for one datum (elbo_jax does the ``vmap``). The model holds its encoder,
    and its ``default_q`` is ``ej.Amortized()`` (the model's own encoder), so

    ```python
    model = ej.models.VAE.initialize(key, data_dim=64, latent_dim=2, hidden=(128,))
    res = ej.fit(model, x, m_step=ej.GradientMStep(optax.adam(1e-3)), batch_size=128,
                 max_iters=100, tol=0.0, key=key)          # 100 passes (epochs)
    mean, scale = res.model.encode(x)
    ```

    trains encoder and decoder jointly on the reparameterised Monte Carlo ELBO. For the
    importance-weighted bound pass ``q=ej.Amortized(num_samples=k, importance_weighted=True)``
    (to ``fit`` as the training objective, or to ``ej.free_energy`` to estimate
    $\log p(x)$).
    """

    encoder: GaussianEncoder
    decoder: MLP
    log_noise_scale: Float[Array, " D"] | None
    likelihood: Literal["bernoulli", "gaussian"] = eqx.field(static=True)

    def __check_init__(self):
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(
                f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}"
            )
        if (self.likelihood == "gaussian") != (self.log_noise_scale is not None):
            raise ValueError("log_noise_scale is a parameter of the Gaussian likelihood only")

    @property
    def latent(self) -> Real:
        return Real(self.encoder.latent_dim)

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def data_dim(self) -> int:
        return self.decoder.layers[-1].out_features

    @classmethod
    def initialize(
        cls,
        key: Key,
        data_dim: int,
        latent_dim: int,
        *,
        hidden: Sequence[int] = (256,),
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        activation: str = "tanh",
        dtype: Any = None,
    ) -> "VAE":
        """A VAE with encoder ``data_dim -> hidden -> 2 latent_dim`` and decoder
        ``latent_dim -> reversed(hidden) -> data_dim``; Gaussian noise scales start at 1."""
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden = tuple(hidden)
        if not all(is_integer(h) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        enc_key, dec_key = jr.split(key)
        encoder = GaussianEncoder(
            MLP.initialize(
                enc_key, (data_dim, *hidden, 2 * latent_dim), activation=activation, dtype=dtype
            ),
            int(latent_dim),
        )
        decoder = MLP.initialize(
            dec_key, (latent_dim, *hidden[::-1], data_dim), activation=activation, dtype=dtype
        )
        noise = jnp.zeros((data_dim,), dtype) if likelihood == "gaussian" else None
        return cls(encoder, decoder, noise, likelihood)

    def default_q(self) -> Amortized:
        """``ej.Amortized()``: the model's own encoder."""
        return Amortized()

    def log_joint(self, x: Float[Array, " D"], z: Float[Array, " L"]) -> Scalar:
        r"""$\log \mathcal N(z; 0, I) + \log p(x \mid \text{decoder}(z))$ for one datum."""
        log_prior = -0.5 * jnp.sum(z**2) - 0.5 * self.latent_dim * math.log(2 * math.pi)
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # x log sigmoid(l) + (1 - x) log sigmoid(-l) = x l - softplus(l)
            return log_prior + jnp.sum(x * out - jax.nn.softplus(out))
        log_scale = self.log_noise_scale
        resid = (x - out) * jnp.exp(-log_scale)
        log_lik = -0.5 * jnp.sum(resid**2) - jnp.sum(log_scale)
        return log_prior + log_lik - 0.5 * self.data_dim * math.log(2 * math.pi)

    def check_data(self, x: Data) -> None:
        """``x`` must be ``(N, D)`` with this model's ``D``; binary for the Bernoulli likelihood."""
        if self.likelihood == "bernoulli":
            requirement = "x must be binary (entries 0 or 1) for a VAE with a Bernoulli likelihood"
            entries = lambda v: (np.asarray(v), (np.asarray(v) == 0) | (np.asarray(v) == 1))
        else:
            requirement = "x must be finite"
            entries = lambda v: (np.asarray(v), np.isfinite(np.asarray(v)))
        _check_data(x, self.data_dim, entries, requirement)

    # ---------------------------------------------------------------- use
    def encode(self, x: Data) -> tuple[Float[Array, "N L"], Float[Array, "N L"]]:
        """The mean and scale of each datum's $q_n$ (rows of ``x``)."""
        mean, log_scale = jax.vmap(self.encoder)(jnp.asarray(x, self._dtype))
        return mean, jnp.exp(log_scale)

    def decode(self, z: Float[Array, "N L"]) -> Float[Array, "N D"]:
        """The mean of $p(x \\mid z)$ for each row of ``z``: probabilities (Bernoulli) or means."""
        out = jax.vmap(self.decoder)(jnp.asarray(z, self._dtype))
        return jax.nn.sigmoid(out) if self.likelihood == "bernoulli" else out

    def reconstruct(self, x: Data) -> Float[Array, "N D"]:
        """``decode`` of each datum's posterior mean under its $q_n$."""
        return self.decode(self.encode(x)[0])

    def sample(self, key: Key, n: int) -> tuple[Float[Array, "n D"], Float[Array, "n L"]]:
        """``(x, z)``: ``n`` draws from the model (``decode(z)`` gives their means)."""
        z_key, x_key = jr.split(key)
        z = jr.normal(z_key, (n, self.latent_dim), self._dtype)
        mean = self.decode(z)
        if self.likelihood == "bernoulli":
            x = jr.bernoulli(x_key, mean).astype(self._dtype)
        else:
            x = mean + jnp.exp(self.log_noise_scale) * jr.normal(x_key, mean.shape, self._dtype)
        return x, z

    @property
    def _dtype(self) -> Any:
        return self.decoder.layers[-1].weight.dtype
