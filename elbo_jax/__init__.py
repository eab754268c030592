"""elbo_jax: latent-variable models by EM and its relatives, as compiled coordinate descent
on one free energy."""

import importlib.metadata

from . import models as models
from ._fit import FitResult as FitResult, Status as Status, fit as fit
from ._latent import AbstractLatent as AbstractLatent, Discrete as Discrete, Real as Real
from ._model import Model as Model
from ._objective import free_energy as free_energy, log_evidence as log_evidence
from ._q import (
    AbstractQ as AbstractQ,
    Categorical as Categorical,
    ExactPosterior as ExactPosterior,
    Gaussian as Gaussian,
    PointMass as PointMass,
)
from ._steps import (
    AbstractEStep as AbstractEStep,
    AbstractMStep as AbstractMStep,
    ExactEStep as ExactEStep,
    ExactMStep as ExactMStep,
    GradientEStep as GradientEStep,
    GradientMStep as GradientMStep,
)

try:
    __version__ = importlib.metadata.version("elbo_jax")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
