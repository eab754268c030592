"""scikit-learn estimators on elbo_jax's models (``pip install 'elbo_jax[sklearn]'``).

Importing this package imports scikit-learn (an ``ImportError`` says how to install it);
``import elbo_jax`` never does.

A fitted estimator saves without pickle: ``estimator.save(path)`` writes one ``.npz`` (its
class, ``get_params()``, fitted attributes and ``model_``), read back by
``Estimator.load(path)`` or ``elbo_jax.sklearn.load(path)`` (any of this package's classes).
"""

# _base first: without scikit-learn, its ImportError says how to install it.
from . import _base as _base
from ._hmm import CategoricalHMM as CategoricalHMM
from ._hmm import GaussianHMM as GaussianHMM
from ._hmm import PoissonHMM as PoissonHMM
from ._lda import LatentDirichletAllocation as LatentDirichletAllocation
from ._linear_gaussian import PPCA as PPCA
from ._linear_gaussian import FactorAnalysis as FactorAnalysis
from ._mixtures import BernoulliMixture as BernoulliMixture
from ._mixtures import GaussianMixture as GaussianMixture
from ._mixtures import PoissonMixture as PoissonMixture
from ._saving import load as load
