r"""Combining models fitted apart: ``ej.combine``.

Amid & Warmuth (2020) show that EM and its online forms minimise relative entropies between
models; combining $M$ models is the same operation,

$$\tilde\theta = \arg\min_{\tilde\theta} \sum_m \alpha_m\, D_{RE}(\theta_m, \tilde\theta),$$

$D_{RE}$ the relative entropy between the complete-data distributions $p(x, z \mid \cdot)$
of one datum. For a model with statistics it is the closed form ``maximize`` of the merged
complete-data statistics $\sum_m \bar s(\theta_m, \alpha_m)$; otherwise it is solved
numerically, each $D_{RE}$ estimated from samples of $p(x, z \mid \theta_m)$.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._custom_types import Key
from ._latent import Chain
from ._model import Model, float_dtype, has_complete_data_statistics
from ._statistics import merge_statistics
from ._steps import _split_params, minimize_lbfgs
from ._validate import check_model


def combine(
    models: Sequence[Model],
    weights: Any = None,
    *,
    lengths: Any = None,
    key: Key | None = None,
    num_samples: int = 1024,
) -> Model:
    r"""The model closest to ``models`` in relative entropy:
    $\arg\min_{\tilde\theta} \sum_m \alpha_m D_{RE}(\theta_m, \tilde\theta)$.

    For models with a closed-form M-step and complete-data statistics (the mixtures,
    PPCA / factor analysis) this is ``maximize`` of $\sum_m \bar s(\theta_m, \alpha_m)$, where
    $\bar s(\theta, m)$ = ``model.complete_data_statistics(m)``. When the statistics
    determine $\theta$ one to one (the mixtures), models that were each one M-step from a
    common $\theta$ on shards of one data set, combined with the shards' sizes as
    ``weights``, give exactly the batch M-step on the whole; fitted further apart, the
    combination is the relative-entropy compromise above. Other models need
    ``key`` and ``model.sample(key, n) -> (x, z)``: each $D_{RE}$ is estimated from
    ``num_samples`` draws and the minimiser is found numerically (L-BFGS from ``models[0]``).

    **Arguments:**

    - `models`: two or more models of one class, with parameters of the same shapes.
    - `weights`: $\alpha_m \ge 0$, one per model (default: all 1), e.g. the number of data
      each model was fitted to.
    - `lengths`: for sequence models (the HMMs), the relative entropies are between
      distributions of whole sequences: their lengths (an int, or an array of lengths, each
      equally likely — such as the data's).
    - `key`, `num_samples`: for the finite-sample approximation only.

    ```python
    whole = ej.combine([fit_a.model, fit_b.model], weights=[len(xa), len(xb)])
    ```
    """
    models = _check_models(models)
    dtype = float_dtype(models[0])
    alphas = _check_weights(weights, len(models), dtype)
    first = models[0]
    if has_complete_data_statistics(first) and first.has_closed_form(None):
        if isinstance(first.latent, Chain):
            if lengths is None:
                raise ValueError(
                    f"combining {type(first).__name__}s compares distributions of whole "
                    "sequences: pass lengths= (an int, or the lengths of the data's sequences)"
                )
            lengths = np.atleast_1d(np.asarray(lengths))
            if lengths.ndim != 1 or lengths.size == 0 or np.any(lengths < 1):
                raise ValueError(f"lengths must be positive ints, got {lengths.tolist()}")
            own = lambda m, a: m.complete_data_statistics(a, lengths, num_steps=int(lengths.max()))
        else:
            own = lambda m, a: m.complete_data_statistics(a)
        return _combine_statistics(models, alphas, own)
    sample = getattr(first, "sample", None)
    if not callable(sample):
        raise TypeError(
            f"combine needs {type(first).__name__}'s complete-data statistics "
            "(complete_data_statistics and a closed-form maximize) or, for the finite-sample "
            "approximation, model.sample(key, n) -> (x, z); it has neither"
        )
    if key is None:
        raise ValueError(
            f"{type(first).__name__} has no complete-data statistics, so combine estimates the "
            "relative entropies from samples: pass key=jax.random.key(...)"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return _combine_samples(models, alphas, key, num_samples)


def _check_models(models: Any) -> list:
    if isinstance(models, Model) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of models, got {type(models).__name__}")
    models = list(models)
    if len(models) < 1:
        raise ValueError("models is empty: combine needs at least one model")
    for i, m in enumerate(models):
        if not isinstance(m, Model):
            raise TypeError(f"models[{i}] must be an ej.Model, got {type(m).__name__}")
    first = check_model(models[0])
    name = type(first).__name__
    params, static = eqx.partition(first, eqx.is_array)
    paths = jax.tree_util.tree_leaves_with_path(params)
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(first):
            raise TypeError(
                f"models[{i}] is a {type(m).__name__}, but models[0] is a {name}: "
                "combine needs models of one class"
            )
        other, other_static = eqx.partition(m, eqx.is_array)
        if jax.tree_util.tree_structure(other) != jax.tree_util.tree_structure(params) or (
            not _same_static(other_static, static)
        ):
            raise ValueError(
                f"models[{i}] and models[0] are {name}s with different settings "
                "(fields or static options such as covariance_type)"
            )
        for (path, a), b in zip(paths, jax.tree_util.tree_leaves(other), strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                where = jax.tree_util.keystr(path)
                raise ValueError(
                    f"models[{i}]{where} has shape {b.shape} and dtype {b.dtype}, but "
                    f"models[0]{where} has {a.shape} and {a.dtype}"
                )
    return models


def _same_static(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - static parts that cannot be compared: by structure
        return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def _check_weights(weights: Any, count: int, dtype: Any) -> np.ndarray:
    if weights is None:
        return np.ones((count,), dtype)
    alphas = np.asarray(weights, dtype=np.float64)
    if alphas.shape != (count,):
        raise ValueError(
            f"weights must hold one number per model, shape ({count},); got shape {alphas.shape}"
        )
    if not np.all(np.isfinite(alphas)) or np.any(alphas < 0) or not np.sum(alphas) > 0:
        raise ValueError(
            f"weights must be finite, >= 0 and not all 0; got {np.asarray(weights).tolist()}"
        )
    return alphas.astype(dtype)


def _combine_statistics(models: list, alphas: Any, own: Any) -> Model:
    merged = own(models[0], alphas[0])
    for model, alpha in zip(models[1:], alphas[1:], strict=True):
        merged = merge_statistics(merged, own(model, alpha))
    return models[0].maximize(merged, None)


@eqx.filter_jit
def _combine_samples(models: list, alphas: Any, key: Key, num_samples: int) -> Model:
    keys = jr.split(key, len(models))
    draws = [
        jax.lax.stop_gradient(m.sample(k, num_samples)) for m, k in zip(models, keys, strict=True)
    ]
    shares = alphas / jnp.sum(alphas)
    params, static = _split_params(models[0])

    def loss(p):
        m = eqx.combine(p, static)
        # sum_m alpha_m D_RE(theta_m, m), up to terms free of m, per unit of weight.
        cross = [jnp.mean(jax.vmap(m.log_joint)(*draw)) for draw in draws]
        return -jnp.sum(shares * jnp.stack(cross))

    return eqx.combine(minimize_lbfgs(loss, params, max_steps=500), static)
