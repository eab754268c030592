"""Built-in models. Each is an ``ej.Model`` with fast-path hooks, fitted by the same ``ej.fit``."""

from ._bernoulli_mixture import BernoulliMixture as BernoulliMixture
from ._bernoulli_mixture import BernoulliMixturePrior as BernoulliMixturePrior
from ._count_hmms import CategoricalHMM as CategoricalHMM
from ._count_hmms import PoissonHMM as PoissonHMM
from ._dirichlet_multinomial import DirichletMultinomialMixture as DirichletMultinomialMixture
from ._gaussian_hmm import GaussianHMM as GaussianHMM
from ._gaussian_mixture import GaussianMixture as GaussianMixture
from ._gaussian_mixture import GaussianMixturePrior as GaussianMixturePrior
from ._gaussian_mixture import GaussianMixtureStatistics as GaussianMixtureStatistics
from ._hmm import HMM as HMM
from ._hmm import HMMPrior as HMMPrior
from ._lda import LDA as LDA
from ._lda_inference import DocumentTerms as DocumentTerms
from ._lda_inference import LDAPosterior as LDAPosterior
from ._lgssm import LGSSMPosterior as LGSSMPosterior
from ._lgssm import LinearGaussianSSM as LinearGaussianSSM
from ._linear_gaussian import PPCA as PPCA
from ._linear_gaussian import FactorAnalysis as FactorAnalysis
from ._linear_gaussian import LinearGaussianStatistics as LinearGaussianStatistics
from ._poisson_mixture import PoissonMixture as PoissonMixture
from ._poisson_mixture import PoissonMixturePrior as PoissonMixturePrior
from ._vae import MLP as MLP
from ._vae import VAE as VAE
from ._vae import GaussianEncoder as GaussianEncoder


def __dir__() -> list[str]:
    """The public names only (not the private modules that hold the code)."""
    return sorted(name for name in globals() if not name.startswith("_"))
