"""elbo_jax: latent-variable models by EM and its relatives, as compiled coordinate descent
on one free energy."""

import importlib.metadata as _metadata

from . import models as models
from ._amortized import Amortized as Amortized
from ._chain import ChainPosterior as ChainPosterior
from ._combine import combine as combine
from ._errors import ConvergenceWarning as ConvergenceWarning
from ._fit import FitResult as FitResult
from ._fit import Status as Status
from ._fit import fit as fit
from ._latent import AbstractLatent as AbstractLatent
from ._latent import Chain as Chain
from ._latent import Discrete as Discrete
from ._latent import GaussianChain as GaussianChain
from ._latent import Real as Real
from ._model import Model as Model
from ._newton_step import NewtonMStep as NewtonMStep
from ._objective import free_energy as free_energy
from ._objective import log_evidence as log_evidence
from ._q import (
    AbstractQ as AbstractQ,
)
from ._q import (
    Categorical as Categorical,
)
from ._q import (
    ExactPosterior as ExactPosterior,
)
from ._q import (
    Gaussian as Gaussian,
)
from ._q import (
    PointMass as PointMass,
)
from ._sequences import Sequences as Sequences
from ._serialise import load as load
from ._serialise import save as save
from ._solvers._online import InertiaMStep as InertiaMStep
from ._solvers._online import StepwiseMStep as StepwiseMStep
from ._statistics import AbstractStatistics as AbstractStatistics
from ._statistics import merge_statistics as merge_statistics
from ._statistics import scale_statistics as scale_statistics
from ._steps import (
    AbstractEStep as AbstractEStep,
)
from ._steps import (
    AbstractMStep as AbstractMStep,
)
from ._steps import (
    ExactEStep as ExactEStep,
)
from ._steps import (
    ExactMStep as ExactMStep,
)
from ._steps import (
    GradientEStep as GradientEStep,
)
from ._steps import (
    GradientMStep as GradientMStep,
)
from ._stream import Stream as Stream

try:
    __version__ = _metadata.version("elbo_jax")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"


def __dir__() -> list[str]:
    """The public names only (not the private modules that hold the code)."""
    return sorted([name for name in globals() if not name.startswith("_")] + ["__version__"])
